"""The streaming engine: walks an exposure through the chain of steps in bounded chunks.

Two passes, so that peak memory is one integration plus one band, whatever the number
of integrations:

1. **integration pass** — each integration, all rows, goes through the steps before the
   first step of granularity EXPOSURE (dq_init ... refpix for MIRI). EXPOSURE steps
   ``survey`` every integration as it leaves this pass (e.g. ramp_fit learns which groups
   are unusable everywhere). The result is spilled to a scratch file (kept in memory
   when the exposure has one integration).
2. **band pass** — bands of rows spanning every integration (plus the halo rows the
   steps ask for) are read back and go through the remaining steps (jump, ramp_fit);
   the rate producer's results for the band's own rows land in the product arrays.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import references as refmod
from .errors import BadInputError, PluginError
from .exposure import Exposure, ExposureMeta
from .plugins import Registry, get_registry
from .products import CubeStore, RateArrays, check_writable, write_products, write_ramp
from .step import Chunk, Granularity, Step

#: default memory for one band of the band pass (data + groupdq)
DEFAULT_BAND_BYTES = 48 * 1024**2
#: rateints arrays larger than this are kept in scratch files rather than memory
RATEINTS_IN_MEMORY_BYTES = 64 * 1024**2


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

    One integration stays in memory; more go to scratch files written with plain file
    writes and read back a band at a time through a short-lived memory map, so that
    neither the process's memory nor its resident pages grow with the integrations."""

    def __init__(self, meta: ExposureMeta, directory: Path | None):
        self.shape = (meta.nints, meta.ngroups, meta.ny, meta.nx)
        self.dir = None
        if meta.nints == 1:
            self.data = np.empty(self.shape, np.float32)
            self.groupdq = np.empty(self.shape, np.uint8)
            return
        self.dir = Path(tempfile.mkdtemp(prefix="streamdet-", dir=directory))
        self.files = {}
        for name, dtype in (("data", np.float32), ("groupdq", np.uint8)):
            path = self.dir / f"{name}.raw"
            handle = open(path, "w+b")
            handle.truncate(int(np.prod(self.shape)) * np.dtype(dtype).itemsize)
            self.files[name] = (path, handle, np.dtype(dtype))

    def write(self, i: int, data: np.ndarray, groupdq: np.ndarray) -> None:
        if self.dir is None:
            self.data[i], self.groupdq[i] = data[0], groupdq[0]
            return
        for name, array in (("data", data), ("groupdq", groupdq)):
            _, handle, dtype = self.files[name]
            block = np.ascontiguousarray(array[0], dtype=dtype)
            os.pwrite(handle.fileno(), memoryview(block).cast("B"), i * block.nbytes)

    def read(self, rows: slice) -> tuple[np.ndarray, np.ndarray]:
        if self.dir is None:
            return self.data[:, :, rows].copy(), self.groupdq[:, :, rows].copy()
        out = []
        for name in ("data", "groupdq"):
            path, handle, dtype = self.files[name]
            handle.flush()
            mapped = np.memmap(path, dtype=dtype, mode="r", shape=self.shape)
            out.append(np.array(mapped[:, :, rows]))
            del mapped
        return out[0], out[1]

    def close(self) -> None:
        self.data = self.groupdq = None
        if self.dir is not None:
            for _, handle, _ in self.files.values():
                handle.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def output_paths(meta: ExposureMeta, output_dir: Path | None, save_ramp: bool = False) -> dict[str, Path]:
    directory = Path(output_dir) if output_dir else meta.path.parent
    kinds = ("rate", "rateints", "ramp") if save_ramp else ("rate", "rateints")
    return {kind: directory / f"{meta.base_name}_{kind}.fits" for kind in kinds}


def process_file(path: str | Path, config: RunConfig | None = None, registry: Registry | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None) -> Result:
    """Process one Level 1B file into rate products; returns where they are."""
    config = config or RunConfig()
    registry = registry or get_registry()
    hook = registry.pm.hook
    started = time.perf_counter()
    timings: dict[str, float] = defaultdict(float)
    chain = build_chain(registry, config)
    with Exposure(path) as exposure:
        meta = exposure.meta
        outputs = output_paths(meta, config.output_dir, config.save_ramp)
        check_writable(outputs.values(), config.overwrite, meta.path)

        active = [s for s in chain if not s.skip]
        reftypes = list(dict.fromkeys(r for s in active for r in s.reftypes))
        resolved = refmod.resolve(meta, reftypes, config.overrides)
        refs = refmod.References(meta, resolved)
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
                raise PluginError("the chain must end with a step that produces the rate "
                                  "(ramp_fit); it is skipped or followed by another step")
            hook.streamdet_exposure_started(exposure=exposure, chain=chain)
            rate, rateints, ramp, scratch_dir = _run(exposure, active, pixeldq, config, timings,
                                                     hook, on_progress)
            try:
                keywords = _keywords(chain, resolved)
                history = [f"streamdet: step {s.name} served by implementation {s.implementation} "
                           f"of {s.package} {s.package_version}" for s in chain if not s.skip]
                t0 = time.perf_counter()
                write_products(meta, outputs, rate, rateints, keywords, history)
                if ramp is not None:
                    write_ramp(meta, outputs["ramp"], ramp, pixeldq, keywords, history)
                timings["write"] += time.perf_counter() - t0
            finally:
                if scratch_dir is not None:
                    shutil.rmtree(scratch_dir, ignore_errors=True)
        finally:
            refs.close()
    hook.streamdet_exposure_finished(exposure=exposure, products=outputs, timings=dict(timings))
    return Result(outputs, dict(timings), chain, resolved, time.perf_counter() - started)


def _keywords(chain: list[Step], resolved: dict[str, refmod.Resolved]) -> dict[str, object]:
    out: dict[str, object] = {}
    for step in chain:
        if step.status_keyword:
            out[step.status_keyword] = "SKIPPED" if step.skip else "COMPLETE"
        if not step.skip:
            out.update(step.finish())
    for reftype, res in resolved.items():
        out[_REF_KEYWORDS.get(reftype, f"R_{reftype.upper()[:6]}")] = res.header_value
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


def _run(exposure: Exposure, active: list[Step], pixeldq: np.ndarray, config: RunConfig,
         timings: dict[str, float], hook, on_progress) -> tuple[RateArrays, RateArrays | CubeStore, CubeStore | None, Path | None]:
    meta = exposure.meta
    first_exposure = next((i for i, s in enumerate(active)
                           if s.granularity == Granularity.EXPOSURE), len(active) - 1)
    pass1, pass2 = active[:first_exposure], active[first_exposure:]
    late = [s.name for s in pass2 if s.granularity == Granularity.INTEGRATION]
    if late:
        raise PluginError(f"step {late[0]!r} needs whole integrations but comes after a step "
                          "that needs all integrations; this order is not supported")
    int_index = meta.int_index
    total = meta.nints
    scratch = _Scratch(meta, config.scratch_dir)
    spill_dir = None
    try:
        for i in range(meta.nints):
            data, groupdq = exposure.read(slice(i, i + 1))
            chunk = Chunk(data, groupdq, pixeldq, int_index[i:i + 1], slice(0, meta.ny))
            for step in pass1:
                t0 = time.perf_counter()
                step.process(chunk)
                dt = time.perf_counter() - t0
                timings[step.name] += dt
                hook.streamdet_step_finished(exposure=exposure, step=step, chunk=chunk, seconds=dt)
            for step in pass2:
                t0 = time.perf_counter()
                step.survey(chunk)
                timings[step.name] += time.perf_counter() - t0
            scratch.write(i, chunk.data, chunk.groupdq)
            del chunk, data, groupdq
            if on_progress:
                on_progress("integrations", i + 1, total)

        rate = RateArrays.allocate((meta.ny, meta.nx))
        cube_bytes = meta.nints * meta.ny * meta.nx * 4 * 5
        if cube_bytes > config.rateints_in_memory_bytes:
            spill_dir = Path(tempfile.mkdtemp(prefix="streamdet-rateints-", dir=config.scratch_dir))
            rateints = CubeStore((meta.nints, meta.ny, meta.nx), spill_dir)
        else:
            rateints = RateArrays.allocate((meta.nints, meta.ny, meta.nx))
        ramp = None
        if config.save_ramp:
            if spill_dir is None:
                spill_dir = Path(tempfile.mkdtemp(prefix="streamdet-ramp-", dir=config.scratch_dir))
            ramp_dir = spill_dir / "ramp"
            ramp_dir.mkdir()
            ramp = CubeStore((meta.nints, meta.ngroups, meta.ny, meta.nx), ramp_dir,
                             extensions=(("SCI", np.float32), ("GROUPDQ", np.uint8)))

        halo = max((s.halo for s in pass2), default=0)
        row_bytes = meta.nints * meta.ngroups * meta.nx * 5
        band = max(1, int(config.band_bytes // row_bytes) - 2 * halo)
        bands = [slice(y0, min(meta.ny, y0 + band)) for y0 in range(0, meta.ny, band)]

        def run_band(core: slice) -> None:
            r0, r1 = max(0, core.start - halo), min(meta.ny, core.stop + halo)
            data, groupdq = scratch.read(slice(r0, r1))
            chunk = Chunk(data, groupdq, pixeldq[r0:r1], int_index, slice(r0, r1),
                          core=slice(core.start - r0, core.stop - r0))
            result = None
            for step in pass2:
                if ramp is not None and step is pass2[-1]:
                    local = chunk.core
                    ramp.put(np.s_[:, :, core], (data[:, :, local], groupdq[:, :, local]))
                t0 = time.perf_counter()
                result = step.process(chunk)
                dt = time.perf_counter() - t0
                timings[step.name] += dt
                hook.streamdet_step_finished(exposure=exposure, step=step, chunk=chunk, seconds=dt)
            band_rate, band_rateints = result
            rate.put(np.s_[core], band_rate)
            rateints.put(np.s_[:, core], band_rateints)

        for b, core in enumerate(bands):
            run_band(core)
            if on_progress:
                on_progress("bands", b + 1, len(bands))
        redo = {(s.start, s.stop) for step in pass2 for s in step.rerun_rows()}
        for start, stop in sorted(redo):
            run_band(slice(start, stop))
        return rate, rateints, ramp, spill_dir
    except BaseException:
        if spill_dir is not None:
            shutil.rmtree(spill_dir, ignore_errors=True)
        raise
    finally:
        scratch.close()
