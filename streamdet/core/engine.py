"""The streaming engine: walks an exposure through the chain of steps in bounded chunks.

What steps may expect of it is written in core/step.py. One exposure, phase by phase
(:func:`_process_file`): configure the chain (:func:`_configure_chain`), resume,
resolve the references, ``prepare`` the steps, split off the ``on_products`` steps,
then the passes (:func:`_run`: the steps' whole-exposure pre-pass, the first
integration pass, the band passes), and finally :func:`_finish_and_write`.

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

When pass 1's steps are recomputable GROUP steps and pass 2's surveyors can survey band
by band, the two are **fused** (:func:`_fusion`): the band pass reads its bands from the
input and runs pass 1's steps on them itself, and no scratch copy is kept (see the
"fused pass" of core/step.py).

A step that needs frame-wide work on its own band results first (jump's shower and
snowball searches look at whole planes) declares ``frame_passes()``: the band pass then
runs that many extra times beforehand, up to that step, handing each band to its
``gather`` and calling its ``between_passes`` after each (see ``Step``).

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
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from streamdet._ckernels import pointer
# the scratch files' rows move with vectored positioned I/O (see _ckernels/scratch.h)
from streamdet._ckernels._scratch import ffi as _scratch_ffi, lib as _scratch

from . import jwstparams
from . import references as refmod
from .buffers import ThreadBuffers
from .errors import BadInputError, PluginError
from .exposure import Exposure, ExposureMeta
from .parameters import Parameters, effective as effective_parameters
from .plugins import Observers, Registry, get_registry
from .products import (CubeStore, InputMetadata, ProductRecord, RateArrays, check_writable,
                       output_paths, product_path, write_products, write_ramp)
from .record import product_record
from .step import Chunk, FrameContext, Granularity, InputRamp, RateProducer, RateResult, Step

#: default memory for the bands of the band pass in flight at once (data + groupdq, all
#: integrations; shared among the threads)
DEFAULT_BAND_BYTES = 128 * 1024**2
#: the band pass's bands in flight are at most this many rows tall together (smaller
#: bands use the caches better and share out better between threads; thick exposures
#: reach the memory bound first)
MAX_BAND_ROWS = 48
#: ... unless their halos are deep: then up to this many times the halo rows each band
#: reads on each side, so that the halo rows stay a small part of what is read and
#: recomputed (jump's shower search reads 5 on each side: 80 rows, not 48)
BAND_ROWS_PER_HALO_ROW = 16
#: default memory for one band of the integration pass (data + groupdq, one integration)
DEFAULT_PASS1_BAND_BYTES = 16 * 1024**2
#: a fused pass runs the first pass's steps on this much of a band at a time (whole
#: integrations): small enough to stay in the CPU's caches between the steps, large
#: enough that the Python between the calls is not what the time goes to
LEAD_BATCH_BYTES = 4 * 1024**2
#: rateints arrays larger than this are kept in scratch files rather than memory
RATEINTS_IN_MEMORY_BYTES = 16 * 1024**2
#: the integration pass's output is kept in memory up to this size (and up to
#: ``band_bytes``), else in a scratch file
SCRATCH_IN_MEMORY_BYTES = 64 * 1024**2


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
    #: write the ramp as ramp_fit receives it (``_ramp.fits``, jwst's save_calibrated_ramp)
    save_ramp: bool = False
    #: steps after which the ramp is written (``_<step>.fits``, jwst's step save_results)
    save_after: tuple[str, ...] = ()
    band_bytes: int = DEFAULT_BAND_BYTES
    rateints_in_memory_bytes: int = RATEINTS_IN_MEMORY_BYTES
    scratch_dir: Path | None = None
    #: threads processing bands (1: serial); None: :func:`default_threads`, decided in the
    #: process that runs the file
    threads: int | None = None
    pass1_band_bytes: int = DEFAULT_PASS1_BAND_BYTES
    #: published stpipe steps run through the adapter (streamdet/plugins/stpipe_adapter.py):
    #: ``(when, step, "pkg.Class")``, ``when`` being ``"pre"`` or ``"post"`` (a hook of
    #: chain step ``step``, in the order given, like jwst's pre_hooks/post_hooks)
    hooks: list[tuple[str, str, str]] = field(default_factory=list)
    scratch_in_memory_bytes: int = SCRATCH_IN_MEMORY_BYTES
    #: apply the CRDS step-parameter references (``pars-*``) selected for each exposure
    #: (``--no-crds-pars``: False; ``STPIPE_DISABLE_CRDS_STEPPARS=true`` also switches
    #: them off)
    crds_pars: bool = True
    #: (step, parameter) -> the option or file that set it in ``params`` (for messages
    #: and the record of where each value came from)
    param_origins: dict[tuple[str, str], str] = field(default_factory=dict)


@dataclass
class Result:
    products: dict[str, Path]
    timings: dict[str, float]
    chain: list[Step]
    references: dict[str, refmod.Resolved]
    seconds: float
    #: the parameters applied, each non-default value with where it came from, and the
    #: CRDS parameter references selected (core/parameters.py)
    parameters: Parameters | None = None


def build_chain(registry: Registry, config: RunConfig,
                params: dict[str, dict[str, Any]] | None = None) -> list[Step]:
    """One instance of each step of the chain, built with ``params`` (default: the
    run's own ``config.params``), with the steps the run adds (stpipe hooks) in place.
    Settings for jwst steps streamdet does not have are accepted when they leave them
    skipped or at jwst's defaults (core/jwstparams.py); a parameter that chooses the
    implementation (ramp_fit.algorithm) does so here."""
    registry = registry.for_run(config)
    params = config.params if params is None else params
    classes = registry.chain(registry.resolve_use(config.use, params))
    known = {cls.name for cls in classes}
    for name, values in params.items():
        if name not in known:
            if name in jwstparams.STEP_CLASSES:
                jwstparams.check_missing_step(name, values)
                continue
            raise BadInputError(f"unknown step {name!r} in parameters (steps: {', '.join(known)})")
    chain = [cls(params.get(cls.name, {})) for cls in classes]
    for step in chain:  # what was asked, before prepare or resume skip a step
        step.skip_requested = step.skip
    return chain


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
            _check(_scratch.streamdet_scratch_write(self.fds[name], pointer(_scratch_ffi, array),
                                                    i, rows.start, array.shape[1], nints,
                                                    ngroups, nx * array.itemsize, step[0],
                                                    step[1]),
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
            _check(_scratch.streamdet_scratch_read(self.fds[name], pointer(_scratch_ffi, array),
                                                   rows.start, rows.stop - rows.start, nints,
                                                   ngroups, nx * array.itemsize, step[0],
                                                   step[1], step[2]),
                   self.where)

    def read_integration(self, i: int, data: np.ndarray, groupdq: np.ndarray) -> None:
        """Integration ``i``, every row, into ``data``/``groupdq`` ``[ngroups, ny, nx]``
        (for an integration pass after a band pass)."""
        if self.files is None:
            data[...] = self.data[i]
            groupdq[...] = self.groupdq[i]
            return
        nints, ngroups, ny, nx = self.shape
        for name, array in (("data", data), ("groupdq", groupdq)):
            step = array.strides
            if step[2] != array.itemsize:
                raise ValueError("scratch rows are read into arrays with contiguous lines")
            _check(_scratch.streamdet_scratch_read_integration(
                self.fds[name], pointer(_scratch_ffi, array), i, 0, ny, nints, ngroups,
                nx * array.itemsize, step[0], step[1]), self.where)

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
                 on_progress: Callable[[str, int, int], None] | None = None, *,
                 source_fd: int | None = None) -> Result:
    """Process one Level 1B file into rate products; returns where they are.
    ``source_fd``: read the file through this open descriptor (``path`` names it)."""
    with _collector_paused():
        return _process_file(path, config, registry, on_progress, source_fd)


def _process_file(path, config, registry, on_progress, source_fd=None) -> Result:
    """One exposure, phase by phase (each phase a function below, in this order)."""
    config = config or RunConfig()
    registry = registry or get_registry()
    observers = Observers(registry.pm, where=path)
    started = time.perf_counter()
    timings: dict[str, float] = defaultdict(float)
    with Exposure(path, fd=source_fd) as exposure:
        meta = exposure.meta
        chain, config, parameters = _configure_chain(meta, config, registry, timings)
        outputs = output_paths(meta.path, config.output_dir, config.save_ramp, config.save_after)
        check_writable(outputs.values(), config.overwrite, meta.path)
        resumed = _resume(chain, meta)
        source = InputMetadata.beside(meta)  # header copies; the model is built at writing
        resolved, refs = _resolve_references(meta, chain, config, timings)
        pixeldq = exposure.initial_pixeldq()
        try:
            _prepare_steps(meta, chain, refs, resolved, pixeldq, timings)
            active, on_products = _ramp_and_product_steps(meta, chain, resolved)
            extra = _extra_product_writers(meta, active, outputs, config)
            observers.notify("streamdet_exposure_started", exposure=exposure, chain=chain)
            captures = _capture_points(chain, active, config)
            rate, rateints, saved = _run(exposure, refs, active, pixeldq, config, timings,
                                         observers, on_progress, captures)
            record = partial(product_record, chain, resolved, resumed=resumed,
                             parameters=parameters)
            _finish_and_write(meta, chain, on_products, rate, rateints, saved, extra,
                              outputs, pixeldq, source.result(), record, timings)
        finally:
            refs.close()
    observers.notify("streamdet_exposure_finished", exposure=exposure, products=outputs,
                     timings=dict(timings))
    return Result(outputs, dict(timings), chain, resolved, time.perf_counter() - started,
                  parameters)


def _configure_chain(meta: ExposureMeta, config: RunConfig, registry: Registry,
                     timings: dict[str, float]
                     ) -> tuple[list[Step], RunConfig, Parameters]:
    """The chain with this exposure's effective parameters (the run's, the CRDS
    ``pars-*`` references', jwst's spellings), and the run's configuration completed by
    them (threads, save_ramp); refuses a ``--save-after`` naming no step or the rate
    producer."""
    t0 = time.perf_counter()
    parameters = effective_parameters(config, meta, registry, usable_cpus())
    timings["parameters"] += time.perf_counter() - t0
    chain = build_chain(registry, config, parameters.steps)
    if config.threads is None and parameters.threads is not None:
        config = replace(config, threads=parameters.threads)
    if parameters.save_ramp and not config.save_ramp:
        config = replace(config, save_ramp=True)
    names = [s.name for s in chain]
    for name in config.save_after:
        if name not in names:
            raise BadInputError(f"--save-after {name}: no such step (steps: {', '.join(names)})")
        if isinstance(chain[names.index(name)], RateProducer):
            raise BadInputError(f"--save-after {name}: {name} makes the rate products themselves")
    return chain, config, parameters


def _resolve_references(meta: ExposureMeta, chain: list[Step], config: RunConfig,
                        timings: dict[str, float]
                        ) -> tuple[dict[str, refmod.Resolved], refmod.References]:
    """The reference files of the steps that will run (``--override`` first, then
    CRDS), the optional ones included, and the reader over them (close it)."""
    active = [s for s in chain if not s.skip]
    reftypes = list(dict.fromkeys(r for s in active for r in s.reftypes))
    t0 = time.perf_counter()
    resolved = refmod.resolve(meta, reftypes, config.overrides)
    optional = [r for s in active for r in s.optional_reftypes if r not in resolved]
    resolved.update(refmod.resolve_optional(meta, list(dict.fromkeys(optional)),
                                            config.overrides))
    refs = refmod.References(meta, resolved)
    timings["references"] += time.perf_counter() - t0
    return resolved, refs


def _prepare_steps(meta: ExposureMeta, chain: list[Step], refs: refmod.References,
                   resolved: dict[str, refmod.Resolved], pixeldq: np.ndarray,
                   timings: dict[str, float]) -> None:
    """``prepare`` of every step that is to run, in chain order; a step whose reference
    is N/A, or whose ``prepare`` gives a reason, is skipped with that reason."""
    for step in [s for s in chain if not s.skip]:
        missing = [r for r in step.reftypes if resolved[r].not_applicable]
        if missing:
            step.skip, step.skip_reason = True, f"reference {', '.join(missing)} is N/A"
            continue
        t0 = time.perf_counter()
        reason = step.prepare(meta, refs, pixeldq)
        timings[step.name] += time.perf_counter() - t0
        if reason:
            step.skip, step.skip_reason = True, reason


def _ramp_and_product_steps(meta: ExposureMeta, chain: list[Step],
                            resolved: dict[str, refmod.Resolved]
                            ) -> tuple[list[Step], list[Step]]:
    """The steps that run, as those on the ramp (the passes: ending with the rate
    producer) and the ``on_products`` ones (after the passes). Refuses a chain whose
    ramp steps do not end with a :class:`RateProducer`: the input's fault when its
    reference is N/A, a plugin's otherwise."""
    on_products = [s for s in chain if not s.skip and s.on_products]
    active = [s for s in chain if not s.skip and s not in on_products]
    producers = [s for s in active if isinstance(s, RateProducer)]
    if not producers or producers[-1] is not active[-1]:
        # a rate producer skipped for want of a reference: the input's fault
        needed = [(s, r) for s in chain if isinstance(s, RateProducer)
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
    return active, on_products


def _extra_product_writers(meta: ExposureMeta, active: list[Step], outputs: dict[str, Path],
                           config: RunConfig) -> dict[str, tuple[Path, Callable]]:
    """The steps' products beyond rate and rateints (``Step.extra_products``): kind ->
    (path beside the rate, writer), checked writable before any work."""
    extra = {kind: write for s in active for kind, write in s.extra_products().items()}
    if extra:
        directory = outputs["rate"].parent
        extra = {kind: (product_path(directory, meta.path, kind), write)
                 for kind, write in extra.items()}
        check_writable([path for path, _ in extra.values()], config.overwrite, meta.path)
    return extra


def _finish_and_write(meta: ExposureMeta, chain: list[Step], on_products: list[Step],
                      rate: RateArrays, rateints: RateArrays | CubeStore,
                      saved: dict[str, CubeStore], extra: dict[str, tuple[Path, Callable]],
                      outputs: dict[str, Path], pixeldq: np.ndarray, source: InputMetadata,
                      record: Callable[..., ProductRecord], timings: dict[str, float]) -> None:
    """The ``on_products`` steps, every step's ``finish``, then the products: rate and
    rateints, the saved ramps, the steps' extra products (added to ``outputs``). All
    or none: on failure the products this run put in place are withdrawn. ``record``
    makes a product's :class:`ProductRecord` from the steps' ``finish`` keywords."""
    placed: list[tuple[Path, int, int]] = []  # the products this run put in place
    try:
        for step in on_products:
            t0 = time.perf_counter()
            step.process_products(rate, rateints)
            timings[step.name] += time.perf_counter() - t0
        t0 = time.perf_counter()
        finished = {s.name: s.finish() for s in chain if not s.skip}
        write_products(meta, outputs, rate, rateints, record(finished), source, placed=placed)
        for kind, store in saved.items():
            upto = None if kind == "ramp" else kind
            write_ramp(meta, outputs[kind], store, pixeldq,
                       record(finished, upto=upto, before_rate=kind == "ramp"),
                       source, meta.state.average_dark_current, placed=placed)
        for kind, (path, write) in extra.items():
            write(path, record(finished), source)
            st = os.stat(path)
            placed.append((path, st.st_dev, st.st_ino))
            outputs[kind] = path
        timings["write"] += time.perf_counter() - t0
    except BaseException:
        withdraw(placed)  # no partial set of products
        raise
    finally:
        _close_stores(rateints, *saved.values())


def _resume(chain: list[Step], meta: ExposureMeta) -> set[str]:
    """A partly calibrated ramp records in S_* which steps it went through (COMPLETE or
    SKIPPED): those do not run again; their keywords come with the input's metadata.
    Returns the names of those steps. Only a RampModel resumes: a Level 1B file's
    S_* keywords (none in real ones) say nothing of its data."""
    done: set[str] = set()
    if str(meta.header.get("DATAMODL", "")).strip() != "RampModel":
        return done
    for step in chain:
        status = step.status_keyword and meta.header.get(step.status_keyword)
        if status is not None and str(status).strip() in ("COMPLETE", "SKIPPED"):
            step.skip = True
            step.skip_reason = f"done in the input ({step.status_keyword}={str(status).strip()})"
            done.add(step.name)
    if "dark_current" in done and meta.extra.get("avdrkcur") is not None:
        meta.state.average_dark_current = meta.extra["avdrkcur"]
    return done


def _capture_points(chain: list[Step], active: list[Step], config: RunConfig) -> dict[str, int]:
    """Saved ramp kind -> how many active steps have run on the ramp it holds."""
    points = {}
    for name in config.save_after:
        upto = [s.name for s in chain[:[c.name for c in chain].index(name) + 1]]
        points[name] = sum(1 for s in active if s.name in upto)
    if config.save_ramp:
        points["ramp"] = len(active) - 1  # what the rate producer receives
    return points


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


def stages(active: list[Step]) -> list[tuple[str, list[Step]]]:
    """The active steps cut into the passes that run them, as ``(kind, steps)``.

    The first pass is always an ``"integration"`` pass (the steps before the first
    EXPOSURE step, possibly none); from the first EXPOSURE step on a ``"band"`` pass
    (bands of rows spanning every integration). A step needing whole integrations after
    that (an INTEGRATION step: an stpipe step hooked after jump, say) starts another
    integration pass, which reads each integration back from the band pass's output; the
    next EXPOSURE step starts another band pass, and so on. The rate producer (the last
    step) always runs in a band pass."""
    out: list[tuple[str, list[Step]]] = []
    kind, steps = "integration", []
    for k, step in enumerate(active):
        last = k == len(active) - 1
        if kind == "integration" and (step.granularity == Granularity.EXPOSURE or last):
            out.append((kind, steps))
            kind, steps = "band", []
        elif kind == "band" and step.granularity == Granularity.INTEGRATION and not last:
            out.append((kind, steps))
            kind, steps = "integration", []
        steps.append(step)
    out.append((kind, steps))
    return out


def _run(exposure: Exposure, refs: refmod.References, active: list[Step], pixeldq: np.ndarray,
         config: RunConfig, timings: dict[str, float], observers: Observers, on_progress,
         captures: dict[str, int] | None = None,
         ) -> tuple[RateArrays, RateArrays | CubeStore, dict[str, CubeStore]]:
    """The passes (see :func:`stages`). ``captures`` maps a saved ramp's kind to the number of active
    steps that have run on the ramp it keeps; returns the rate arrays, the rateints
    arrays (or their store) and the saved ramps' stores (nameless scratch files: close
    them once written)."""
    meta = exposure.meta
    passes = stages(active)
    _check_producer_placement(active)
    pool = _Pool(max(1, int(config.threads or default_threads())), timings, observers, exposure)
    run = _Passes(exposure, pixeldq, config, pool, on_progress)
    rateints = None
    saved: dict[str, CubeStore] = {}
    try:
        # ramps to save, kept in scratch files as they leave the step they are saved after
        for kind in captures or {}:
            saved[kind] = CubeStore((meta.nints, meta.ngroups, meta.ny, meta.nx),
                                    config.scratch_dir,
                                    extensions=(("SCI", np.float32), ("GROUPDQ", np.uint8)))
        capture = _capture_plan(passes, captures or {}, saved)
        run.prepass(active)
        fusion = _fusion(passes, capture, run.scratch_fits_in_memory(),
                         run.fused_rows(passes))
        if fusion:
            if fusion == "survey first":  # a first pass for the surveys only
                # of the steps that cannot survey band by band; the others do
                run.first_pass(passes[0][1], [s for s in passes[1][1] if _surveys_alone(s)],
                               None, {})
                exposure.drop_buffers()  # its read buffers: the band pass reads its own way
            rate, rateints = _allocate_products(meta, config)
            run.fused_pass(passes[0][1], passes[1][1], rate, rateints, capture[1],
                           surveyed=fusion == "survey first")
            exposure.drop_buffers()
            return rate, rateints, saved
        scratch = run.new_scratch()
        run.first_pass(passes[0][1], passes[1][1], scratch, capture[0])
        # reading is over: the band pass has buffers of its own
        exposure.drop_buffers()
        refs.drop_buffers()
        rate, rateints = _allocate_products(meta, config)
        run.later_passes(passes, scratch, rate, rateints, capture)
        return rate, rateints, saved
    except BaseException:
        _close_stores(rateints, *saved.values())
        raise
    finally:
        run.close()


def _fusion(passes: list[tuple[str, list[Step]]], capture: list[dict[int, list[CubeStore]]],
            scratch_in_memory: bool, rows: tuple[int, int]) -> str | None:
    """Whether the band pass reads its bands from the input and runs the first pass's
    steps on them itself, with no copy of the first pass's output kept (see
    ``Step.recomputable`` and ``Step.survey_with_bands``): two passes, the first all
    recomputable GROUP steps, and no ramp saved from inside the first. "fused" when
    every surveyor of the second pass can survey band by band; "survey first" when one
    cannot (refpix) and the copy would go to a file: a first pass then runs for the
    surveys alone, and the band pass computes its output again, which costs less than
    writing it out and reading it back; None: the two passes, with the copy. ``rows``:
    a fused band's own rows and the halo rows it reads on each side; when the halos
    would be most of what is read and recomputed (thick exposures, whose bands are a
    row or two: 60 groups x 500 integrations read 5 rows for 1), the copy costs less."""
    band, margin = rows
    if len(passes) != 2 or capture[0] or band < 2 * margin:
        return None
    (_, lead), (_, steps) = passes
    if not all(s.granularity == Granularity.GROUP and s.recomputable for s in lead):
        return None
    if not any(_surveys_alone(s) for s in steps):
        return "fused"
    return None if scratch_in_memory else "survey first"


def _surveys(step: Step) -> bool:
    """Whether ``step`` surveys (overrides ``Step.survey``)."""
    return type(step).survey is not Step.survey


def _surveys_alone(step: Step) -> bool:
    """Whether ``step`` surveys and cannot do it band by band (refpix): before a fused
    band pass, it needs a pass for its survey."""
    return _surveys(step) and not step.survey_with_bands


def _check_producer_placement(active: list[Step]) -> None:
    """The rate producer (the last step) runs in a band pass: one that needs whole
    integrations cannot come after a step that needs all integrations."""
    producer = active[-1]
    if producer.granularity == Granularity.INTEGRATION and any(
            s.granularity == Granularity.EXPOSURE for s in active[:-1]):
        raise PluginError(f"step {producer.name!r} produces the rate and needs whole "
                          "integrations, but comes after a step that needs all integrations; "
                          "this order is not supported")


def _capture_plan(passes: list[tuple[str, list[Step]]], captures: dict[str, int],
                  saved: dict[str, CubeStore]) -> list[dict[int, list[CubeStore]]]:
    """Per pass, its step index -> the stores of ``saved`` filled just before that step
    runs (a ramp saved after the last step of the first pass is taken there, not re-read
    later). ``captures``: saved ramp kind -> active steps that have run on it."""
    capture = [defaultdict(list) for _ in passes]
    for kind, count in captures.items():
        first = 0
        for n, (_, steps) in enumerate(passes):
            if count <= first + len(steps) if n == 0 else count < first + len(steps):
                capture[n][count - first].append(saved[kind])
                break
            first += len(steps)
    return capture


def _allocate_products(meta: ExposureMeta, config: RunConfig
                       ) -> tuple[RateArrays, RateArrays | CubeStore]:
    """The rate arrays, and the rateints arrays (in a scratch store when large)."""
    rate = RateArrays.allocate((meta.ny, meta.nx))
    cube_bytes = meta.nints * meta.ny * meta.nx * 4 * 5
    if cube_bytes > config.rateints_in_memory_bytes:
        return rate, CubeStore((meta.nints, meta.ny, meta.nx), config.scratch_dir)
    return rate, RateArrays.allocate((meta.nints, meta.ny, meta.nx))


class _Passes:
    """What the passes of one exposure share (the input, the exposure-wide pixel flags,
    the thread pool, the scratch files), and the passes themselves, in the order
    :func:`_run` calls them."""

    def __init__(self, exposure: Exposure, pixeldq: np.ndarray, config: RunConfig,
                 pool: "_Pool", on_progress):
        self.exposure, self.meta = exposure, exposure.meta
        self.pixeldq, self.config, self.pool = pixeldq, config, pool
        self.on_progress = on_progress
        # in memory only when no bigger than what one band of the band pass may hold anyway
        self.scratch_in_memory = min(config.scratch_in_memory_bytes, config.band_bytes)
        self.scratches: list[_Scratch] = []

    def fused_rows(self, passes: list[tuple[str, list[Step]]]) -> tuple[int, int]:
        """A fused pass's band rows and the halo rows read on each side."""
        (_, lead), (_, steps) = passes[0], passes[-1]
        margin = _sizing_halo(steps, _frame_stages(steps)) + _lead_margins(lead)[0]
        band, _ = _band_rows(self.meta, self.config.band_bytes, self.pool.threads, margin)
        return band, margin

    def scratch_fits_in_memory(self) -> bool:
        meta = self.meta
        return meta.nints * meta.ngroups * meta.ny * meta.nx * 5 <= self.scratch_in_memory

    def new_scratch(self) -> _Scratch:
        scratch = _Scratch(self.meta, self.config.scratch_dir, self.scratch_in_memory)
        self.scratches.append(scratch)
        return scratch

    def close(self) -> None:
        self.pool.close()
        for scratch in self.scratches:
            scratch.close()

    def threads_for(self, steps: list[Step]) -> int:
        """Threads for one pass: several only when every step in it says it may."""
        return self.pool.threads if all(s.thread_safe for s in steps) else 1

    def prepass(self, active: list[Step]) -> None:
        """The steps declaring ``prepass_exposure`` see the input's integrations, one
        at a time, before any step runs on them."""
        exposure = self.exposure

        def read(i: int) -> tuple[np.ndarray, np.ndarray]:
            data, groupdq = exposure.read(slice(i, i + 1))
            return data[0], groupdq[0]

        ramp = InputRamp(self.meta.nints, read)
        for step in active:
            if step.prepass_exposure:
                t0 = time.perf_counter()
                step.prepass(ramp)
                self.pool.add(step.name, time.perf_counter() - t0)

    def first_pass(self, steps: list[Step], surveyors: list[Step], scratch: _Scratch | None,
                   captures: dict[int, list[CubeStore]]) -> None:
        """The integration pass from the input into ``scratch`` (None: for the surveys
        alone): integrations in bands of rows when every step is pixel-local (whole
        otherwise); ``surveyors`` (the next pass's steps) survey each piece as it
        leaves."""
        _FirstPass(self, steps, surveyors, scratch, captures).run()
        for step in surveyors:
            step.survey_complete()  # nothing processed yet: nothing to redo

    def fused_pass(self, lead: list[Step], steps: list[Step], rate: RateArrays, rateints,
                   captures: dict[int, list[CubeStore]], surveyed: bool) -> None:
        """The fused band pass (see :func:`_fusion`): bands of rows of every integration,
        read from the input, through the first pass's steps (``lead``), surveyed by the
        steps that survey band by band (by every surveyor, unless ``surveyed``: a first
        pass surveyed for the others), then through ``steps``."""
        _BandPass(self, steps, None, None,
                  self.threads_for(lead + steps), rate, rateints, captures, "",
                  lead=lead, surveyed=surveyed).run()

    def later_passes(self, passes: list[tuple[str, list[Step]]], scratch: _Scratch,
                     rate: RateArrays, rateints, capture: list[dict[int, list[CubeStore]]]
                     ) -> None:
        """The passes after the first, from ``scratch`` (the first pass's output): band
        passes, and integration passes between them. A band pass that is not the last
        writes to a second scratch file, which becomes the next pass's source."""
        spare: _Scratch | None = None
        for n, (kind, steps) in enumerate(passes[1:], start=1):
            last = n == len(passes) - 1
            label = "" if n == 1 else f" ({steps[0].name}...)"
            if kind == "band":
                target = None
                if not last:
                    if spare is None:
                        spare = self.new_scratch()
                    target = spare
                _BandPass(self, steps, scratch, target, self.threads_for(steps), rate,
                          rateints, capture[n], label).run()
                if target is not None:
                    scratch, spare = target, scratch
            else:
                surveyors = passes[n + 1][1]
                _LaterIntegrationPass(self, steps, surveyors, scratch,
                                      self.threads_for(steps + surveyors), capture[n],
                                      label).run()
                for step in surveyors:
                    step.survey_complete()


class _FirstPass:
    """The integration pass that reads the input: each integration, in bands of rows
    (plus the margins the steps' halos need) or whole, through the steps before the
    first EXPOSURE step, surveyed by the next pass's steps, into the scratch file."""

    def __init__(self, run: _Passes, steps: list[Step], surveyors: list[Step],
                 scratch: _Scratch, captures: dict[int, list[CubeStore]]):
        meta, config = run.meta, run.config
        self.run_, self.steps, self.surveyors = run, steps, surveyors
        self.scratch, self.captures = scratch, captures
        self.threads = run.threads_for(steps + surveyors)  # the next pass's steps survey here
        self.margins = _lead_margins(steps)
        # a pass for the surveys alone computes the surveyed columns only: all of the
        # pass on them and their neighbours (``narrow``), or its data_only steps
        self.narrow = self.columns = None
        if scratch is None:
            self.narrow = _narrowed_columns(steps, surveyors, meta.nx, self.margins[0])
            if self.narrow is None:
                self.columns = _surveyed_columns(steps, surveyors, meta.nx)
            else:  # the surveyed columns, and where they are among the narrowed
                self.surveyed = _named_columns(surveyors, meta.nx)
                self.surveyed_at = np.searchsorted(self.narrow, self.surveyed)
        if all(s.granularity == Granularity.GROUP for s in steps):
            # a row takes 5 bytes a sample as data and flags, or, narrowed, the 2 of the
            # input's row as read
            row_bytes = meta.ngroups * meta.nx * (5 if self.narrow is None else 2)
            rows = max(1, int(config.pass1_band_bytes // (row_bytes * self.threads))
                       - 2 * self.margins[0])
        else:
            rows = meta.ny
        self.bands = _bands(meta.ny, rows)
        self.tall = min(meta.ny, rows + 2 * self.margins[0])
        self.buffers = ThreadBuffers()

    def run(self) -> None:
        meta, pool, on_progress = self.run_.meta, self.run_.pool, self.run_.on_progress
        tasks = [(i, core) for i in range(meta.nints) for core in self.bands]
        for n, _ in enumerate(pool.map(self.piece, tasks, at_once=self.threads), start=1):
            if on_progress and n % len(self.bands) == 0:
                on_progress("integrations", n // len(self.bands), meta.nints)
        self.buffers.drop()

    def piece(self, task: tuple[int, slice]) -> None:
        """Integration ``i``, rows ``core`` (and their margins), through the pass."""
        i, core = task
        run, meta, margins = self.run_, self.run_.meta, self.margins
        ny, pool, pixeldq = meta.ny, run.pool, run.pixeldq
        r0, r1 = max(0, core.start - margins[0]), min(ny, core.stop + margins[0])
        t0 = time.perf_counter()
        narrow = self.narrow
        shape = (1, meta.ngroups, r1 - r0, meta.nx if narrow is None else narrow.size)
        plane = meta.ngroups * shape[-1]
        # sized for the tallest piece, so that a buffer is never grown
        data = self.buffers.get("data", (plane * self.tall,), np.float32)[:plane * (r1 - r0)]
        groupdq = self.buffers.get("groupdq", (plane * self.tall,), np.uint8)[:data.size]
        data, groupdq = data.reshape(shape), groupdq.reshape(shape)
        run.exposure.read_into(slice(i, i + 1), slice(r0, r1), data, groupdq, columns=narrow)
        pool.add("read", time.perf_counter() - t0)
        int_index = meta.int_index
        if narrow is not None:  # the pixel flags of those columns: a copy
            pixeldq = pixeldq[r0:r1, narrow]
        for k, step in enumerate(self.steps + [None]):
            a, b = max(0, core.start - margins[k]), min(ny, core.stop + margins[k])
            p0 = a - r0 if narrow is not None else a
            chunk = Chunk(data[:, :, a - r0:b - r0], groupdq[:, :, a - r0:b - r0],
                          pixeldq[p0:p0 + b - a], int_index[i:i + 1], slice(a, b),
                          core=slice(core.start - a, core.stop - a), columns=narrow)
            for store in self.captures.get(k, ()):
                local = slice(core.start - r0, core.stop - r0)
                store.put(np.s_[i, :, core], (data[0, :, local], groupdq[0, :, local]))
            if step is None:
                continue
            if step.data_only and self.columns is not None:
                self.on_columns(step, chunk)
            else:
                pool.step(step, chunk)
        if narrow is not None:
            # the pixel flags the steps set on the surveyed columns, for the surveyors
            # (refpix measures with the exposure-wide flags as they stand)
            own = slice(core.start - r0, core.stop - r0)
            run.pixeldq[core, self.surveyed] = pixeldq[own, self.surveyed_at]
        for step in self.surveyors:  # chunk now covers the core rows only
            pool.step(step, chunk, survey=True)
        t0 = time.perf_counter()
        if self.scratch is not None:  # None: a pass for the surveys alone
            self.scratch.write(i, core, chunk.data[0], chunk.groupdq[0])
            pool.add("scratch", time.perf_counter() - t0)

    def on_columns(self, step: Step, chunk: Chunk) -> None:
        """A ``data_only`` step on the surveyed columns of ``chunk`` alone (copies, by
        numpy's indexing; the data come back into ``chunk``)."""
        columns = self.columns
        if columns.size == 0:
            return
        part = Chunk(chunk.data[..., columns], chunk.groupdq[..., columns],
                     chunk.pixeldq[:, columns], chunk.int_index, chunk.rows,
                     core=chunk.core, columns=columns)
        self.run_.pool.step(step, part)
        chunk.data[..., columns] = part.data


def _named_columns(surveyors: list[Step], nx: int) -> np.ndarray | None:
    """The columns whose data ``surveyors`` read (``survey_columns``), in order; None
    when one of them does not name its columns."""
    named = [s.survey_columns(nx) for s in surveyors]
    if any(c is None for c in named):
        return None
    return np.unique(np.concatenate([np.asarray(c, np.int64) for c in named]
                                    or [np.zeros(0, np.int64)]))


def _narrowed_columns(steps: list[Step], surveyors: list[Step], nx: int, margin: int
                      ) -> np.ndarray | None:
    """The columns every step of a pass for the surveys alone runs on, when each step
    is ``column_local`` (or ``data_only``): those the surveyors read, and ``margin``
    columns (the steps' halos, as for rows) on each side of them; None: every column
    (or the ``data_only`` steps alone narrowed, see :func:`_surveyed_columns`)."""
    columns = _named_columns(surveyors, nx)
    if columns is None or columns.size == 0 or not all(
            s.column_local or s.data_only for s in steps):
        return None
    reach = np.arange(-margin, margin + 1)
    columns = np.unique(np.clip((columns[:, None] + reach).ravel(), 0, nx - 1))
    return columns if columns.size < nx else None


def _surveyed_columns(steps: list[Step], surveyors: list[Step], nx: int) -> np.ndarray | None:
    """The columns whose data a pass for the surveys alone must compute (see
    ``Step.data_only``) when not every step is ``column_local``: those the surveyors
    read, when each names them and no step after a ``data_only`` one reads the data;
    None: every column."""
    columns = _named_columns(surveyors, nx)
    if columns is None or not any(s.data_only for s in steps):
        return None
    after_data_only = False
    for step in steps:
        if after_data_only and not step.data_only and step.reads_data:
            return None
        after_data_only = after_data_only or step.data_only
    return columns if columns.size < nx else None


class _BandPass:
    """Bands of rows spanning every integration, read from ``source`` (None: from the input,
    in a fused pass, through the first pass's steps ``lead``), through ``steps``.
    The last band pass ends with the rate producer, whose results land in ``rate`` and
    ``rateints``; an earlier one writes its bands' core rows to ``target`` (``source``
    stays as it was, so that the bands a step asks to re-run start from the same data).
    ``captures``: step index -> saved-ramp stores that take the band's core rows just
    before that step runs. The steps' extra passes (``frame_passes``) and re-runs
    (``rerun_rows``) happen here (see core/step.py)."""

    def __init__(self, run: _Passes, steps: list[Step], source: _Scratch | None,
                 target: _Scratch | None, threads: int, rate: RateArrays, rateints,
                 captures: dict[int, list[CubeStore]], label: str, lead: list[Step] = (),
                 surveyed: bool = False):
        meta = run.meta
        self.run_, self.steps, self.source, self.target = run, steps, source, target
        self.rate, self.rateints, self.captures, self.label = rate, rateints, captures, label
        self.halo = max((s.halo for s in steps), default=0)
        # a fused pass (``source`` None, see _fusion): the bands are read from the input
        # and the first pass's steps run on them first, each on the rows the band needs
        # plus the halos of it and of the lead steps after it
        self.lead = list(lead)
        self.fused = source is None
        self.lead_margins = _lead_margins(self.lead)
        # the steps surveying as the bands go (when a first pass surveyed, the others)
        self.surveyors = ([s for s in steps if _surveys(s)
                           and not (surveyed and _surveys_alone(s))]
                          if self.fused else [])
        # extra band passes before this one, for steps that need frame-wide work on their
        # band results (jump's snowball and shower searches); none by default
        self.frame_stages = _frame_stages(steps)
        sizing_halo = _sizing_halo(steps, self.frame_stages) + self.lead_margins[0]
        band, self.sharing = _band_rows(meta, run.config.band_bytes, threads, sizing_halo)
        if any(s.needs_whole_exposure for s in steps):
            # a step that asked for the whole exposure at once (at that memory cost)
            band, self.sharing = meta.ny, 1
        self.bands = _bands(meta.ny, band)
        self.plane = meta.nints * meta.ngroups * meta.nx
        self.tall = min(meta.ny, band + 2 * sizing_halo)
        self.buffers = ThreadBuffers()
        pool = run.pool
        self.context = FrameContext(run.config.scratch_dir, lambda fn, items: pool.map(fn, items))

    def run(self) -> None:
        for stage in self.frame_stages:
            self.extra_pass(stage)
        self.sweep()
        self.rerun(self.steps)
        self.buffers.drop()

    def sweep(self, stage: tuple | None = None) -> None:
        """Every band once. In a fused pass the first sweep is also the survey: a band is
        surveyed just before its steps run, which use what has been surveyed so far; a
        surveyor whose bands saw less than the whole survey (``survey_complete``) has
        the sweep made again, with the survey whole."""
        pool, on_progress = self.run_.pool, self.run_.on_progress
        band = self.band if stage is None else partial(self.band, stage=stage)
        label = "bands" + self.label if stage is None else None
        for _ in range(2):
            for b, _ in enumerate(pool.map(band, self.bands, at_once=self.sharing), start=1):
                if on_progress and label:
                    on_progress(label, b, len(self.bands))
            redo = [s for s in self.surveyors if not s.survey_complete()]
            self.surveyors = []  # whole from now on
            if not redo:
                return

    def extra_pass(self, stage: tuple) -> None:
        """One of a step's ``frame_passes``: every band up to that step and into its
        ``gather``, the re-runs asked for, then its ``between_passes``."""
        k, gatherer, j, _ = stage
        pool = self.run_.pool
        self.sweep(stage)
        self.rerun(self.steps[:k + 1], stage)
        t0 = time.perf_counter()
        gatherer.between_passes(j, self.context)
        pool.add(gatherer.name, time.perf_counter() - t0)

    def rerun(self, steps: list[Step], stage: tuple | None = None) -> None:
        """The bands ``steps`` ask to re-run (``rerun_rows``), in row order, once each."""
        redo = {(s.start, s.stop) for step in steps for s in step.rerun_rows()}
        for start, stop in sorted(redo):
            self.band(slice(start, stop), stage)

    def band_buffers(self, nrows: int) -> tuple[np.ndarray, np.ndarray]:
        """This thread's band buffers (sized for the tallest band, never grown)."""
        meta, plane, tall = self.run_.meta, self.plane, self.tall
        shape = (meta.nints, meta.ngroups, nrows, meta.nx)
        return (self.buffers.get("data", (plane * tall,), np.float32)[:plane * nrows].reshape(shape),
                self.buffers.get("groupdq", (plane * tall,), np.uint8)[:plane * nrows].reshape(shape))

    def band(self, core: slice, stage: tuple | None = None) -> None:
        """The band of rows ``core`` (and its halo): through every step of the pass, or,
        in an extra pass ``stage``, up to the gathering step and into its ``gather``."""
        run, meta = self.run_, self.run_.meta
        pool, ny = run.pool, meta.ny
        band_halo = self.halo if stage is None else stage[3]
        margin = band_halo + self.lead_margins[0]
        r0, r1 = max(0, core.start - margin), min(ny, core.stop + margin)
        data, groupdq = self.band_buffers(r1 - r0)
        if self.fused:
            data, groupdq, r0 = self.lead_steps(data, groupdq, r0, core, band_halo)
            r1 = r0 + data.shape[2]
        else:
            t0 = time.perf_counter()
            self.source.read(slice(r0, r1), data, groupdq)
            pool.add("scratch", time.perf_counter() - t0)
        chunk = Chunk(data, groupdq, run.pixeldq[r0:r1], meta.int_index, slice(r0, r1),
                      core=slice(core.start - r0, core.stop - r0))
        if stage is not None:  # an extra pass: up to the gathering step only
            k, gatherer, j, _ = stage
            for step in self.steps[:k + 1]:
                pool.step(step, chunk)
            t0 = time.perf_counter()
            gatherer.gather(chunk, j, self.context)
            pool.add(gatherer.name, time.perf_counter() - t0)
            return
        result = None
        for j, step in enumerate(self.steps):
            for store in self.captures.get(j, ()):
                local = chunk.core
                store.put(np.s_[:, :, core], (data[:, :, local], groupdq[:, :, local]))
            result = pool.step(step, chunk)
        if self.target is not None:
            t0 = time.perf_counter()
            local = chunk.core
            for i in range(meta.nints):
                self.target.write(i, core, data[i, :, local], groupdq[i, :, local])
            pool.add("scratch", time.perf_counter() - t0)
            return
        producer = self.steps[-1]
        if not isinstance(result, RateResult):
            raise PluginError(f"step {producer.describe()} makes the rate but its process "
                              f"returned {type(result).__name__}, not a RateResult")
        self.rate.put(np.s_[core], result.rate)
        self.rateints.put(np.s_[:, core], result.rateints)


    def lead_steps(self, data: np.ndarray, groupdq: np.ndarray, r0: int, core: slice,
                   band_halo: int) -> tuple[np.ndarray, np.ndarray, int]:
        """A fused pass's band (rows from ``r0``), read from the input and through the
        first pass's steps a few integrations at a time (while in the CPU's caches),
        then surveyed (while the survey is not whole); returns the views of the rows the
        band's own steps get (``core`` and ``band_halo`` rows each side) and their
        first row."""
        run, meta = self.run_, self.run_.meta
        pool, pixeldq = run.pool, run.pixeldq
        rows = slice(r0, r0 + data.shape[2])
        at_once = max(1, LEAD_BATCH_BYTES // (data[0].nbytes + groupdq[0].nbytes))
        for i in range(0, meta.nints, at_once):
            plane = np.s_[i:i + at_once]
            t0 = time.perf_counter()
            run.exposure.read_into(plane, rows, data[plane], groupdq[plane])
            pool.add("read", time.perf_counter() - t0)
            for k, step in enumerate(self.lead):
                reach = band_halo + self.lead_margins[k]
                a, b = max(r0, core.start - reach), min(rows.stop, core.stop + reach)
                part = np.s_[plane, :, a - r0:b - r0]
                pool.step(step, Chunk(data[part], groupdq[part], pixeldq[a:b],
                                      meta.int_index[plane], slice(a, b),
                                      core=slice(core.start - a, core.stop - a)))
        a, b = max(r0, core.start - band_halo), min(rows.stop, core.stop + band_halo)
        part = np.s_[:, :, a - r0:b - r0]
        if self.surveyors:
            own = np.s_[:, :, core.start - r0:core.stop - r0]
            piece = Chunk(data[own], groupdq[own], pixeldq[core], meta.int_index, core,
                          core=slice(0, core.stop - core.start))
            for step in self.surveyors:
                pool.step(step, piece, survey=True)
        return data[part], groupdq[part], a


def _frame_stages(steps: list[Step]) -> list[tuple[int, Step, int, int]]:
    """The extra band passes ``steps`` ask for (``frame_passes``): (index in steps, step,
    stage, halo of that pass)."""
    return [(k, step, j, max(max(s.halo for s in steps[:k + 1]),
                             step.halo + max(0, int(step.gather_halo(j)))))
            for k, step in enumerate(steps) for j in range(step.frame_passes())]


def _sizing_halo(steps: list[Step], frame_stages: list[tuple]) -> int:
    """The halo a band pass's bands are sized for: its steps', its extra passes'."""
    return max([max((s.halo for s in steps), default=0)] + [h for *_, h in frame_stages])


def _lead_margins(steps: list[Step]) -> list[int]:
    """margins[k]: rows beyond a piece's core that step k of an integration pass (or of a
    fused pass's lead) must cover so that the halos of it and of every later one are
    correct (and 0 after the last)."""
    halos = [max(0, int(s.halo or 0)) for s in steps]
    return [sum(halos[k:]) for k in range(len(steps))] + [0]


def _band_rows(meta: ExposureMeta, band_bytes: int, threads: int, halo: int
               ) -> tuple[int, int]:
    """Rows of a band pass's bands, and how many bands are in flight at once.

    The band budget is for all bands in flight, so memory does not grow with the number
    of threads; an exposure so thick that a thread's share would be mostly halo
    (recomputed) rows runs its bands on fewer threads instead."""
    row_bytes = meta.nints * meta.ngroups * meta.nx * 5

    def rows_each(sharing: int) -> int:
        return int(band_bytes // (row_bytes * sharing)) - 2 * halo

    sharing = threads
    while sharing > 1 and rows_each(sharing) < max(2, 2 * halo):
        sharing -= 1
    tallest = max(MAX_BAND_ROWS, BAND_ROWS_PER_HALO_ROW * halo)
    return max(1, min(max(1, tallest // sharing), rows_each(sharing))), sharing


class _LaterIntegrationPass:
    """Each integration, whole, read back from ``scratch`` (the output of the band pass
    before), through ``steps``; the next band pass's steps survey it; written back in
    place (integrations are independent: nothing re-reads the old values). Memory: one
    integration per thread."""

    def __init__(self, run: _Passes, steps: list[Step], surveyors: list[Step],
                 scratch: _Scratch, threads: int, captures: dict[int, list[CubeStore]],
                 label: str):
        self.run_, self.steps, self.surveyors, self.scratch = run, steps, surveyors, scratch
        self.threads, self.captures, self.label = threads, captures, label
        self.buffers = ThreadBuffers()

    def run(self) -> None:
        meta, pool, on_progress = self.run_.meta, self.run_.pool, self.run_.on_progress
        for n, _ in enumerate(pool.map(self.piece, range(meta.nints), at_once=self.threads),
                              start=1):
            if on_progress:
                on_progress("integrations" + self.label, n, meta.nints)
        self.buffers.drop()

    def piece(self, i: int) -> None:
        run, meta = self.run_, self.run_.meta
        pool = run.pool
        shape = (1, meta.ngroups, meta.ny, meta.nx)
        data = self.buffers.get("data", shape, np.float32)
        groupdq = self.buffers.get("groupdq", shape, np.uint8)
        t0 = time.perf_counter()
        self.scratch.read_integration(i, data[0], groupdq[0])
        pool.add("scratch", time.perf_counter() - t0)
        chunk = Chunk(data, groupdq, run.pixeldq, meta.int_index[i:i + 1], slice(0, meta.ny),
                      core=slice(0, meta.ny))
        for j, step in enumerate(self.steps):
            for store in self.captures.get(j, ()):
                store.put(np.s_[i, :, 0:meta.ny], (data[0], groupdq[0]))
            pool.step(step, chunk)
        for step in self.surveyors:
            pool.step(step, chunk, survey=True)
        t0 = time.perf_counter()
        self.scratch.write(i, slice(0, meta.ny), data[0], groupdq[0])
        pool.add("scratch", time.perf_counter() - t0)
