""":func:`simulate`: checks the arguments and writes the exposure, its references, the
CRDS cache and the truth into one directory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .crds_cache import crds_env, write_crds_cache
from .level1b import write_uncal
from .model import ExposureModel
from .params import LARGE_EVENT_RATES, SimParams, SimulationError
from .readout import SUBARRAYS, Subarray, emi_read_clocks
from .references import write_references
from .truth import write_truth


@dataclass
class SimResult:
    """What :func:`simulate` wrote."""

    uncal: Path  #: the Level 1B exposure
    refs: dict[str, Path]  #: reference type -> file under ``refs/``
    crds_path: Path  #: root of the CRDS cache (CRDS_PATH)
    context: str  #: the .pmap that resolves this exposure (CRDS_CONTEXT)
    truth_rate: Path  #: 2-D FITS of the true rate, linearized DN/s
    truth_catalog: Path  #: JSON catalogue of injected effects
    env: dict[str, str] = field(default_factory=dict)  #: CRDS_* variables for this cache
    outdir: Path | None = None
    name: str = ""

    def shell_exports(self) -> str:
        """``export CRDS_PATH=... CRDS_CONTEXT=...`` for a POSIX shell."""
        return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())


_DEFAULT_NAME = "jw09999001001_01101_00001"
_PRODUCTS = ("refs", "crds_cache", "truth", "simulation.json", "crds_env.sh")


def _check_args(outdir, subarray, ngroups, nints, seed, readpatt, name) -> tuple[Path, Subarray, str]:
    if not isinstance(subarray, str) or subarray.upper() not in SUBARRAYS:
        raise SimulationError(
            f"unknown subarray {subarray!r}; choose one of {', '.join(SUBARRAYS)}")
    sub = SUBARRAYS[subarray.upper()]
    for label, v in (("ngroups", ngroups), ("nints", nints)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise SimulationError(f"{label} must be an integer >= 1, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SimulationError(f"seed must be an integer >= 0, got {seed!r}")
    readpatt = str(readpatt).upper()
    if readpatt not in ("FASTR1", "SLOWR1"):
        raise SimulationError(f"unknown read pattern {readpatt!r}; choose FASTR1 or SLOWR1")
    sub.frame_time(readpatt)  # raises for SLOWR1 on a subarray
    if nints * ngroups > 65535:
        raise SimulationError(f"ngroups x nints = {ngroups * nints} is too large")
    if name is not None and (not name or any(c in name for c in "/\\ \t\n") or name.startswith(".")):
        raise SimulationError(f"name must be a plain file-name prefix, got {name!r}")
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise SimulationError(f"output path {str(outdir)!r} exists and is not a directory")
    return outdir, sub, readpatt


def _check_emi(p: SimParams, sub: Subarray, readpatt: str) -> None:
    freqs, amps, phases = p.emi_frequencies_hz, p.emi_amplitudes_dn, p.emi_phases_rad
    if len(amps) != len(freqs):
        raise SimulationError(f"emi_amplitudes_dn has {len(amps)} entries but "
                              f"emi_frequencies_hz has {len(freqs)}")
    if len(phases) > len(freqs):
        raise SimulationError(f"emi_phases_rad has {len(phases)} entries, more than the "
                              f"{len(freqs)} frequencies")
    for label, values in (("emi_frequencies_hz", freqs), ("emi_amplitudes_dn", amps),
                          ("emi_phases_rad", phases)):
        for v in values:
            if (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
                    or not math.isfinite(v)):
                raise SimulationError(f"{label} must hold finite numbers, got {v!r}")
    if any(f <= 0 for f in freqs):
        raise SimulationError(f"emi_frequencies_hz must be > 0, got {list(freqs)}")
    if freqs:
        emi_read_clocks(sub.name, readpatt, 1)  # raises for a readout without a clock model


#: Serials handed out in this process: serial -> output directory. crds caches mappings by
#: name per process, so two caches used in one process must not share a serial.
_SERIALS_IN_PROCESS: dict[str, str] = {}


def _serial(outdir: Path, sub: Subarray, ngroups, nints, seed, readpatt, params: SimParams,
            name: str) -> str:
    """A 4-digit serial for the mapping and reference names, unique to this output.

    crds caches mappings by name within a process, so two caches resolved in one process
    must not share names. crds' naming convention (``config.MAPPING_RE``) has exactly 4
    digits (longer serials also resolve, but are not valid CRDS names), so the serial is
    derived from a hash of the output directory and all parameters, and moved on if this
    process already gave it to another directory. Caches made by different processes
    clash with probability 1/9000 per pair.
    """
    key = json.dumps([str(outdir.resolve()), sub.name, int(ngroups), int(nints), int(seed),
                      readpatt, params.to_dict(), name], sort_keys=True)
    n = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    here = str(outdir.resolve())
    for k in range(9000):
        serial = f"{1000 + (n + k) % 9000:04d}"
        owner = _SERIALS_IN_PROCESS.get(serial)
        if owner is None or owner == here:
            _SERIALS_IN_PROCESS[serial] = here
            return serial
    raise SimulationError("no free CRDS serial left in this process")  # pragma: no cover


def simulate(
    outdir: str | os.PathLike,
    *,
    subarray: str = "SUB64",
    ngroups: int = 10,
    nints: int = 2,
    seed: int = 0,
    readpatt: str = "FASTR1",
    overwrite: bool = False,
    params: SimParams | None = None,
    name: str | None = None,
    large_events: bool = False,
) -> SimResult:
    """Simulate one MIRI imager exposure, its reference files and a CRDS cache in ``outdir``.

    Parameters
    ----------
    outdir
        Output directory; created if missing. An existing non-empty directory is refused
        unless ``overwrite`` is true, in which case this function's own products in it are
        replaced (other files are left alone).
    subarray
        A key of :data:`SUBARRAYS`.
    ngroups, nints
        Groups per integration and integrations (NFRAMES = 1, GROUPGAP = 0).
    seed
        Everything is a deterministic function of the seed and the other arguments
        (except ``outdir``, which only changes the CRDS names).
    readpatt
        FASTR1, or SLOWR1 (FULL only).
    params
        Physical parameters; :class:`SimParams` defaults if None.
    name
        File-name prefix; the exposure is ``<name>_mirimage_uncal.fits``.
    large_events
        Add MIRI showers and snowballs (:data:`LARGE_EVENT_RATES` per integration, unless
        ``params`` sets their rates).
    """
    outdir, sub, readpatt = _check_args(outdir, subarray, ngroups, nints, seed, readpatt, name)
    params = params if params is not None else SimParams()
    if not isinstance(params, SimParams):
        raise SimulationError(f"params must be a SimParams, got {type(params).__name__}")
    if large_events and not params.has_large_events:
        params = dataclasses.replace(params, **LARGE_EVENT_RATES)
    _check_emi(params, sub, readpatt)
    name = name or _DEFAULT_NAME
    uncal_name = f"{name}_mirimage_uncal.fits"
    if outdir.exists() and any(outdir.iterdir()):
        if not overwrite:
            raise SimulationError(
                f"output directory {str(outdir)!r} is not empty (overwrite=True / --overwrite replaces it)")
        for item in (*_PRODUCTS, uncal_name):
            target = outdir / item
            if target.is_dir() and not target.is_symlink():
                for sub_p in target.rglob("*"):  # a read-only cache may have been left behind
                    try:
                        sub_p.chmod(0o755 if sub_p.is_dir() else 0o644)
                    except OSError:
                        pass
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    outdir.mkdir(parents=True, exist_ok=True)

    serial = _serial(outdir, sub, ngroups, nints, seed, readpatt, params, name)
    model = ExposureModel(params, sub, int(ngroups), int(nints), readpatt, int(seed))

    crds_root = outdir / "crds_cache"
    cache_refdir = crds_root / "references" / "jwst" / "miri"
    cache_refdir.mkdir(parents=True, exist_ok=True)
    refdir = outdir / "refs"
    refdir.mkdir(exist_ok=True)
    truthdir = outdir / "truth"
    truthdir.mkdir(exist_ok=True)

    cache_refs = write_references(model, params, cache_refdir, serial)
    refs: dict[str, Path] = {}
    for reftype, pth in cache_refs.items():
        dst = refdir / pth.name
        try:
            os.link(pth, dst)  # same bytes, no extra disk space
        except OSError:
            shutil.copy2(pth, dst)
        refs[reftype] = dst.resolve()
    context = write_crds_cache(model, params, crds_root, serial, cache_refs)

    uncal = outdir / uncal_name
    first_sat = write_uncal(model, params, uncal, name)

    meta = {"seed": int(seed), "subarray": sub.name, "readpatt": readpatt,
            "ngroups": int(ngroups), "nints": int(nints), "name": name}
    truth_rate, truth_cat = write_truth(model, params, truthdir, name, first_sat, meta)
    env = crds_env(crds_root, context)
    result = SimResult(
        uncal=uncal.resolve(), refs=refs, crds_path=crds_root.resolve(), context=context,
        truth_rate=truth_rate.resolve(), truth_catalog=truth_cat.resolve(), env=env,
        outdir=outdir.resolve(), name=name,
    )
    manifest = {
        **meta,
        "uncal": str(result.uncal),
        "refs": {k: str(v) for k, v in refs.items()},
        "crds_path": str(result.crds_path),
        "context": context,
        "truth_rate": str(result.truth_rate),
        "truth_catalog": str(result.truth_catalog),
        "env": env,
        "params": params.to_dict(),
    }
    (outdir / "simulation.json").write_text(json.dumps(manifest, indent=1))
    (outdir / "crds_env.sh").write_text(result.shell_exports() + "\n")
    return result
