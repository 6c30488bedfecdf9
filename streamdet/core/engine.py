"""The streaming engine: walks an exposure through the chain of steps in bounded chunks.

Two passes, so that peak memory is one band of rows (plus the frame-sized results),
whatever the number of integrations:

1. **integration pass** — each integration goes through the steps before the first step
   of granularity EXPOSURE (dq_init ... dark_current for MIRI). When all of them are
   GROUP steps it goes a band of rows at a time (with the halo rows the steps ask for:
   saturation's flag growth needs one); when one of them needs whole integrations
   (INTEGRATION granularity) the integration goes whole. EXPOSURE steps ``survey`` every
   piece as it leaves this pass (e.g. ramp_fit learns which groups are unusable
   everywhere, refpix measures its reference columns). The result is spilled to a
   scratch file (kept in memory when small).
2. **band pass** — bands of rows spanning every integration (plus the halo rows the
   steps ask for) are read back and go through the remaining steps (refpix, jump,
   ramp_fit); the rate producer's results for the band's own rows land in the product
   arrays.

With ``RunConfig.threads`` > 1 the bands of both passes are processed by a thread pool
(numpy releases the GIL in its loops), provided every active step declares
``thread_safe = True`` (its ``process`` and ``survey`` may run concurrently on disjoint
rows); otherwise the run is serial. Results do not depend on the band sizes nor on the
number of threads.
"""

from __future__ import annotations

import gc
import os
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from streamdet._ckernels import declare, ptr

from . import references as refmod
from .buffers import ThreadBuffers
from .errors import BadInputError, PluginError
from .exposure import Exposure, ExposureMeta
from .plugins import Observers, Registry, get_registry
from .products import CubeStore, RateArrays, check_writable, write_products, write_ramp
from .step import Chunk, Granularity, Step

# the scratch files' rows move with vectored positioned I/O (see _ckernels/scratch.c)
_scratch_read = declare("scratch", "streamdet_scratch_read", "ipiiiiiiii", "i")
_scratch_write = declare("scratch", "streamdet_scratch_write", "ipiiiiiiii", "i")

#: default memory for the bands of the band pass in flight at once (data + groupdq, all
#: integrations; shared among the threads)
DEFAULT_BAND_BYTES = 128 * 1024**2
#: the band pass's bands in flight are at most this many rows tall together (smaller
#: bands use the caches better and share out better between threads; thick exposures
#: reach the memory bound first)
MAX_BAND_ROWS = 48
#: default memory for one band of the integration pass (data + groupdq, one integration)
DEFAULT_PASS1_BAND_BYTES = 16 * 1024**2
#: rateints arrays larger than this are kept in scratch files rather than memory
RATEINTS_IN_MEMORY_BYTES = 16 * 1024**2
#: the integration pass's output is kept in memory up to this size (and up to
#: ``band_bytes``), else in a scratch file
SCRATCH_IN_MEMORY_BYTES = 64 * 1024**2
#: characters of one FITS HISTORY card's text: a longer entry is continued on a second
#: card, and readers look for one card per step
HISTORY_WIDTH = 72


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, so a container's or taskset's
    limit counts)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """$STREAMDET_THREADS if set, else every usable CPU: one file is one job, and its row
    bands share out over the cores (the watch daemon divides the cores among its workers
    instead)."""
    value = os.environ.get("STREAMDET_THREADS", "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            pass
    return usable_cpus()


@dataclass
class RunConfig:
    """How to process: step parameters, implementation choices, reference overrides."""

    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    use: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)
    output_dir: Path | None = None
    overwrite: bool = False
    save_ramp: bool = False
    band_bytes: int = DEFAULT_BAND_BYTES
    rateints_in_memory_bytes: int = RATEINTS_IN_MEMORY_BYTES
    scratch_dir: Path | None = None
    #: threads processing bands (1: serial); None: :func:`default_threads`, decided in the
    #: process that runs the file
    threads: int | None = None
    pass1_band_bytes: int = DEFAULT_PASS1_BAND_BYTES
    scratch_in_memory_bytes: int = SCRATCH_IN_MEMORY_BYTES


@dataclass
class Result:
    products: dict[str, Path]
    timings: dict[str, float]
    chain: list[Step]
    references: dict[str, refmod.Resolved]
    seconds: float


def build_chain(registry: Registry, config: RunConfig) -> list[Step]:
    classes = registry.chain(config.use)
    known = {cls.name for cls in classes}
    for name in config.params:
        if name not in known:
            raise BadInputError(f"unknown step {name!r} in parameters (steps: {', '.join(known)})")
    return [cls(config.params.get(cls.name, {})) for cls in classes]


class _Scratch:
    """Where the integration pass leaves the ramp for the band pass.

    Small ramps stay in memory; larger ones go to two raw files (data float32, groupdq
    uint8) written and read with plain positioned file I/O, so that neither the process's
    memory nor its resident pages grow with the integrations. The files are laid out row
    by row, ``[ny, nints, ngroups, nx]``: a band of rows spanning every integration is
    then one contiguous stretch. Rows move with vectored positioned I/O in C
    (``_ckernels/scratch.c``): the kernel scatters and gathers the lines, with no
    transposed copy in memory and without the GIL."""

    def __init__(self, meta: ExposureMeta, directory: Path | None, in_memory_bytes: int):
        self.shape = (meta.nints, meta.ngroups, meta.ny, meta.nx)
        self.files = None
        nbytes = int(np.prod(self.shape)) * 5
        if nbytes <= in_memory_bytes:
            self.data = np.empty(self.shape, np.float32)
            self.groupdq = np.empty(self.shape, np.uint8)
            return
        self.where = Path(directory or tempfile.gettempdir())
        self.files, self.fds = {}, {}
        try:
            for name, dtype in (("data", np.float32), ("groupdq", np.uint8)):
                # nameless (O_TMPFILE, else unlinked at once): nothing is left behind
                # however the process ends, a kill -9 included
                f = self.files[name] = tempfile.TemporaryFile(prefix="streamdet-", dir=directory)
                self.fds[name] = f.fileno()
                os.ftruncate(f.fileno(), int(np.prod(self.shape)) * np.dtype(dtype).itemsize)
        except BaseException:
            self.close()
            raise

    def write(self, i: int, rows: slice, data: np.ndarray, groupdq: np.ndarray) -> None:
        """Integration ``i``, rows ``rows``: ``data``/``groupdq`` ``[ngroups, nrows, nx]``."""
        if self.files is None:
            self.data[i, :, rows] = data
            self.groupdq[i, :, rows] = groupdq
            return
        nints, ngroups, _, nx = self.shape
        for name, array in (("data", data), ("groupdq", groupdq)):
            if array.strides[2] != array.itemsize:
                array = np.ascontiguousarray(array)
            step = array.strides
            _check(_scratch_write(self.fds[name], ptr(array), i, rows.start, array.shape[1],
                                  nints, ngroups, nx * array.itemsize, step[0], step[1]),
                   self.where)

    def read(self, rows: slice, data: np.ndarray, groupdq: np.ndarray) -> None:
        """Rows ``rows`` of every integration into ``data``/``groupdq``
        ``[nints, ngroups, nrows, nx]``."""
        if self.files is None:
            data[...] = self.data[:, :, rows]
            groupdq[...] = self.groupdq[:, :, rows]
            return
        nints, ngroups, _, nx = self.shape
        for name, array in (("data", data), ("groupdq", groupdq)):
            step = array.strides
            if step[3] != array.itemsize:
                raise ValueError("scratch rows are read into arrays with contiguous lines")
            _check(_scratch_read(self.fds[name], ptr(array), rows.start, rows.stop - rows.start,
                                 nints, ngroups, nx * array.itemsize, step[0], step[1], step[2]),
                   self.where)

    def close(self) -> None:
        self.data = self.groupdq = None
        if self.files is not None:
            for f in self.files.values():
                f.close()
            self.files, self.fds = {}, {}


def _close_stores(*stores) -> None:
    """Free the scratch space of the :class:`CubeStore` among ``stores``."""
    for store in stores:
        if isinstance(store, CubeStore):
            store.close()


def _check(code: int, where: Path) -> None:
    if code:
        raise OSError(-code, f"scratch file I/O failed: {os.strerror(-code)}", str(where))


def output_paths(meta: ExposureMeta, output_dir: Path | None, save_ramp: bool = False) -> dict[str, Path]:
    directory = Path(output_dir) if output_dir else meta.path.parent
    kinds = ("rate", "rateints", "ramp") if save_ramp else ("rate", "rateints")
    return {kind: directory / f"{meta.base_name}_{kind}.fits" for kind in kinds}


_collector_lock = threading.Lock()
_collector_holds = 0
_collector_was_enabled = False


@contextmanager
def _collector_paused():
    """Keep Python's cyclic garbage collector off while files are processed.

    Its sweeps walk every object the imports created while holding the GIL, stalling
    every band thread at once (~0.05 s a file, more on a loaded machine); a run creates
    few reference cycles, and they are collected once the last file in flight is done.
    """
    global _collector_holds, _collector_was_enabled
    with _collector_lock:
        if _collector_holds == 0:
            _collector_was_enabled = gc.isenabled()
            gc.disable()
        _collector_holds += 1
    try:
        yield
    finally:
        with _collector_lock:
            _collector_holds -= 1
            if _collector_holds == 0 and _collector_was_enabled:
                gc.enable()


def process_file(path: str | Path, config: RunConfig | None = None, registry: Registry | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None) -> Result:
    """Process one Level 1B file into rate products; returns where they are."""
    with _collector_paused():
        return _process_file(path, config, registry, on_progress)


def _process_file(path, config, registry, on_progress) -> Result:
    config = config or RunConfig()
    registry = registry or get_registry()
    observers = Observers(registry.pm, where=path)
    started = time.perf_counter()
    timings: dict[str, float] = defaultdict(float)
    chain = build_chain(registry, config)
    with Exposure(path) as exposure:
        meta = exposure.meta
        outputs = output_paths(meta, config.output_dir, config.save_ramp)
        check_writable(outputs.values(), config.overwrite, meta.path)

        active = [s for s in chain if not s.skip]
        reftypes = list(dict.fromkeys(r for s in active for r in s.reftypes))
        t0 = time.perf_counter()
        resolved = refmod.resolve(meta, reftypes, config.overrides)
        optional = [r for s in active for r in s.optional_reftypes if r not in resolved]
        resolved.update(refmod.resolve_optional(meta, list(dict.fromkeys(optional)),
                                                config.overrides))
        refs = refmod.References(meta, resolved)
        timings["references"] += time.perf_counter() - t0
        pixeldq = exposure.initial_pixeldq()
        try:
            for step in active:
                missing = [r for r in step.reftypes if resolved[r].not_applicable]
                if missing:
                    step.skip, step.skip_reason = True, f"reference {', '.join(missing)} is N/A"
                    continue
                t0 = time.perf_counter()
                reason = step.prepare(meta, refs, pixeldq)
                timings[step.name] += time.perf_counter() - t0
                if reason:
                    step.skip, step.skip_reason = True, reason
            active = [s for s in chain if not s.skip]
            producers = [s for s in active if getattr(s, "produces_rate", False)]
            if not producers or producers[-1] is not active[-1]:
                # a rate producer skipped for want of a reference: the input's fault
                needed = [(s, r) for s in chain if getattr(s, "produces_rate", False)
                          for r in s.reftypes if r in resolved and resolved[r].not_applicable]
                if not producers and needed:
                    step, reftype = needed[0]
                    given = ("--override" if resolved[reftype].source == "override"
                             else "CRDS")
                    raise BadInputError(
                        f"{meta.path}: the {reftype} reference is N/A (from {given}): step "
                        f"{step.name} cannot compute the rate without it")
                raise PluginError("the chain must end with a step that produces the rate "
                                  "(ramp_fit); it is skipped or followed by another step")
            observers.notify("streamdet_exposure_started", exposure=exposure, chain=chain)
            rate, rateints, ramp = _run(exposure, refs, active, pixeldq, config, timings,
                                        observers, on_progress)
            placed: list[tuple[Path, int, int]] = []  # the products this run put in place
            try:
                keywords = _keywords(chain, resolved)
                history = [history_line(s) for s in chain if not s.skip]
                t0 = time.perf_counter()
                write_products(meta, outputs, rate, rateints, keywords, history, placed=placed)
                if ramp is not None:
                    write_ramp(meta, outputs["ramp"], ramp, pixeldq, keywords, history,
                               placed=placed)
                timings["write"] += time.perf_counter() - t0
            except BaseException:
                withdraw(placed)  # no partial set of products
                raise
            finally:
                _close_stores(rateints, ramp)
        finally:
            refs.close()
    observers.notify("streamdet_exposure_finished", exposure=exposure, products=outputs,
                     timings=dict(timings))
    return Result(outputs, dict(timings), chain, resolved, time.perf_counter() - started)


def withdraw(placed: list[tuple[Path, int, int]]) -> None:
    """Remove the files of ``placed`` (``(path, st_dev, st_ino)`` as this run wrote them)
    that are still the very files written: one replaced since by someone else is theirs."""
    for path, dev, ino in placed:
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(path)
        except OSError:
            pass


def history_line(step: Step) -> str:
    """The HISTORY record of a step that ran, one card long:
    ``streamdet: STEP=IMPLEMENTATION (DISTRIBUTION VERSION)``.

    Beyond :data:`HISTORY_WIDTH` characters the distribution name and version give way
    first, sharing the room left (the shorter keeps its length if it takes no more than
    half; a cut is marked ``...``), as the step and implementation are what readers look
    for; a step and implementation too long for even that cut the line itself."""
    head = f"streamdet: {step.name}={step.implementation}"
    package, version = str(step.package), str(step.package_version)
    room = HISTORY_WIDTH - len(head) - len(" ( )")  # for the distribution and version
    if len(package) + len(version) > room >= 2 * len("..."):
        half = room // 2
        if len(version) <= half:
            package = _cut(package, room - len(version))
        elif len(package) <= half:
            version = _cut(version, room - len(package))
        else:
            package, version = _cut(package, room - half), _cut(version, half)
    return _cut(f"{head} ({package} {version})", HISTORY_WIDTH)


def _cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` (>= 3) characters, a cut marked ``...``."""
    return text if len(text) <= width else text[:width - 3] + "..."


def _keywords(chain: list[Step], resolved: dict[str, refmod.Resolved]) -> dict[str, object]:
    out: dict[str, object] = {}
    for reftype, res in resolved.items():
        out[_REF_KEYWORDS.get(reftype, f"R_{reftype.upper()[:6]}")] = res.header_value
    for step in chain:  # a step's own keywords win (it knows which reference it used)
        if step.status_keyword:
            out[step.status_keyword] = "SKIPPED" if step.skip else "COMPLETE"
        if not step.skip:
            out.update(step.finish())
    contexts = {r.context for r in resolved.values() if r.context}
    if contexts:
        out["CRDS_CTX"] = sorted(contexts)[0]
        out["CRDS_VER"] = refmod.crds_version()
    return out


#: the R_* keyword jwst writes for each reference type
_REF_KEYWORDS = {"mask": "R_MASK", "saturation": "R_SATURA", "linearity": "R_LINEAR",
                 "rscd": "R_RSCD", "dark": "R_DARK", "reset": "R_RESET", "gain": "R_GAIN",
                 "readnoise": "R_READNO", "superbias": "R_SUPERB", "ipc": "R_IPC",
                 "emicorr": "R_EMICOR", "refpix": "R_REFPIX"}


class _Pool:
    """Runs tasks in order on ``threads`` threads (or inline for one), timing each step
    and calling the observer hook under one lock."""

    def __init__(self, threads: int, timings: dict[str, float], observers: Observers,
                 exposure: Exposure):
        self.threads = threads
        self.timings, self.observers, self.exposure = timings, observers, exposure
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="streamdet") if threads > 1 else None

    def map(self, fn, items, at_once: int | None = None):
        """``fn`` over ``items`` (results in order) on at most ``at_once`` threads."""
        at_once = self.threads if at_once is None else max(1, min(at_once, self.threads))
        if self.executor is None or at_once == 1:
            return map(fn, items)
        if at_once < self.threads:
            gate = threading.BoundedSemaphore(at_once)

            def gated(item, fn=fn):
                with gate:
                    return fn(item)

            return self.executor.map(gated, items)
        return self.executor.map(fn, items)

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.timings[name] += seconds

    def step(self, step: Step, chunk: Chunk, survey: bool = False):
        t0 = time.perf_counter()
        out = step.survey(chunk) if survey else step.process(chunk)
        dt = time.perf_counter() - t0
        with self.lock:
            self.timings[step.name] += dt
            if not survey:
                self.observers.notify("streamdet_step_finished", exposure=self.exposure,
                                      step=step, chunk=chunk, seconds=dt)
        return out

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


def _bands(ny: int, rows: int) -> list[slice]:
    return [slice(y0, min(ny, y0 + rows)) for y0 in range(0, ny, rows)]


def _run(exposure: Exposure, refs: refmod.References, active: list[Step], pixeldq: np.ndarray, config: RunConfig,
         timings: dict[str, float], observers: Observers, on_progress) -> tuple[RateArrays, RateArrays | CubeStore, CubeStore | None]:
    meta = exposure.meta
    first_exposure = next((i for i, s in enumerate(active)
                           if s.granularity == Granularity.EXPOSURE), len(active) - 1)
    pass1, pass2 = active[:first_exposure], active[first_exposure:]
    late = [s.name for s in pass2 if s.granularity == Granularity.INTEGRATION]
    if late:
        raise PluginError(f"step {late[0]!r} needs whole integrations but comes after a step "
                          "that needs all integrations; this order is not supported")
    int_index = meta.int_index
    ny = meta.ny
    threads = max(1, int(config.threads or default_threads()))
    if threads > 1 and not all(getattr(s, "thread_safe", False) for s in active):
        threads = 1
    pool = _Pool(threads, timings, observers, exposure)
    # in memory only when no bigger than what one band of the band pass may hold anyway
    scratch = _Scratch(meta, config.scratch_dir,
                       min(config.scratch_in_memory_bytes, config.band_bytes))
    rateints = ramp = None
    try:
        # -- pass 1: integrations, in bands of rows when every step is pixel-local -------
        # margins[k]: rows beyond the core that step k's chunk must cover so that the
        # halos of it and of every later step are correct
        halos = [max(0, int(getattr(s, "halo", 0) or 0)) for s in pass1]
        margins = [sum(halos[k:]) for k in range(len(pass1))] + [0]
        if all(s.granularity == Granularity.GROUP for s in pass1):
            row_bytes = meta.ngroups * meta.nx * 5
            rows1 = max(1, int(config.pass1_band_bytes // (row_bytes * pool.threads))
                        - 2 * margins[0])
        else:
            rows1 = ny
        bands1 = _bands(ny, rows1)

        tall1 = min(ny, rows1 + 2 * margins[0])
        plane1 = meta.ngroups * meta.nx
        pass1_buffers = ThreadBuffers()

        def pass1_piece(task: tuple[int, slice]) -> None:
            i, core = task
            r0, r1 = max(0, core.start - margins[0]), min(ny, core.stop + margins[0])
            t0 = time.perf_counter()
            shape = (1, meta.ngroups, r1 - r0, meta.nx)
            size = plane1 * (r1 - r0)
            # sized for the tallest piece, so that a buffer is never grown
            data = pass1_buffers.get("data", (plane1 * tall1,), np.float32)[:size].reshape(shape)
            groupdq = pass1_buffers.get("groupdq", (plane1 * tall1,), np.uint8)[:size].reshape(shape)
            exposure.read_into(slice(i, i + 1), slice(r0, r1), data, groupdq)
            pool.add("read", time.perf_counter() - t0)
            for k, step in enumerate(pass1 + [None]):
                a, b = max(0, core.start - margins[k]), min(ny, core.stop + margins[k])
                chunk = Chunk(data[:, :, a - r0:b - r0], groupdq[:, :, a - r0:b - r0],
                              pixeldq[a:b], int_index[i:i + 1], slice(a, b),
                              core=slice(core.start - a, core.stop - a))
                if step is not None:
                    pool.step(step, chunk)
            for step in pass2:  # chunk now covers the core rows only
                pool.step(step, chunk, survey=True)
            t0 = time.perf_counter()
            scratch.write(i, core, chunk.data[0], chunk.groupdq[0])
            pool.add("scratch", time.perf_counter() - t0)

        tasks = [(i, core) for i in range(meta.nints) for core in bands1]
        for n, _ in enumerate(pool.map(pass1_piece, tasks), start=1):
            if on_progress and n % len(bands1) == 0:
                on_progress("integrations", n // len(bands1), meta.nints)

        # reading is over: the band pass has buffers of its own
        pass1_buffers.drop()
        exposure.drop_buffers()
        refs.drop_buffers()

        # -- products -------------------------------------------------------------------
        rate = RateArrays.allocate((meta.ny, meta.nx))
        cube_bytes = meta.nints * meta.ny * meta.nx * 4 * 5
        if cube_bytes > config.rateints_in_memory_bytes:
            rateints = CubeStore((meta.nints, meta.ny, meta.nx), config.scratch_dir)
        else:
            rateints = RateArrays.allocate((meta.nints, meta.ny, meta.nx))
        if config.save_ramp:
            ramp = CubeStore((meta.nints, meta.ngroups, meta.ny, meta.nx), config.scratch_dir,
                             extensions=(("SCI", np.float32), ("GROUPDQ", np.uint8)))

        # -- pass 2: bands of rows spanning all integrations ------------------------------
        halo = max((s.halo for s in pass2), default=0)
        row_bytes = meta.nints * meta.ngroups * meta.nx * 5
        # the band budget is for all bands in flight, so memory does not grow with the
        # number of threads; an exposure so thick that a thread's share would be mostly
        # halo (recomputed) rows runs its bands on fewer threads instead
        def rows_each(sharing: int) -> int:
            return int(config.band_bytes // (row_bytes * sharing)) - 2 * halo

        sharing = pool.threads
        while sharing > 1 and rows_each(sharing) < max(2, 2 * halo):
            sharing -= 1
        band = max(1, min(max(1, MAX_BAND_ROWS // sharing), rows_each(sharing)))
        bands = _bands(ny, band)
        plane = meta.nints * meta.ngroups * meta.nx

        tall = min(ny, band + 2 * halo)
        band_buffers = ThreadBuffers()

        def buffers(nrows: int) -> tuple[np.ndarray, np.ndarray]:
            """This thread's band buffers (sized for the tallest band, never grown)."""
            shape = (meta.nints, meta.ngroups, nrows, meta.nx)
            return (band_buffers.get("data", (plane * tall,), np.float32)[:plane * nrows].reshape(shape),
                    band_buffers.get("groupdq", (plane * tall,), np.uint8)[:plane * nrows].reshape(shape))

        def run_band(core: slice) -> None:
            r0, r1 = max(0, core.start - halo), min(ny, core.stop + halo)
            data, groupdq = buffers(r1 - r0)
            t0 = time.perf_counter()
            scratch.read(slice(r0, r1), data, groupdq)
            pool.add("scratch", time.perf_counter() - t0)
            chunk = Chunk(data, groupdq, pixeldq[r0:r1], int_index, slice(r0, r1),
                          core=slice(core.start - r0, core.stop - r0))
            result = None
            for step in pass2:
                if ramp is not None and step is pass2[-1]:
                    local = chunk.core
                    ramp.put(np.s_[:, :, core], (data[:, :, local], groupdq[:, :, local]))
                result = pool.step(step, chunk)
            band_rate, band_rateints = result
            rate.put(np.s_[core], band_rate)
            rateints.put(np.s_[:, core], band_rateints)

        for b, _ in enumerate(pool.map(run_band, bands, at_once=sharing), start=1):
            if on_progress:
                on_progress("bands", b, len(bands))
        redo = {(s.start, s.stop) for step in pass2 for s in step.rerun_rows()}
        for start, stop in sorted(redo):
            run_band(slice(start, stop))
        return rate, rateints, ramp
    except BaseException:
        _close_stores(rateints, ramp)
        raise
    finally:
        pool.close()
        scratch.close()
