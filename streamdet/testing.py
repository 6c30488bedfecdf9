"""A test kit for plugin authors (in the spirit of pytest's ``pytester``).

Simulate an exposure with its references and CRDS cache, run the chain with your plugin
registered (installed or not) or a step replaced, and compare products. Loaded as a
pytest plugin (entry point ``pytest11``), so its fixtures need no import::

    def test_my_jump(streamdet_sim, streamdet_run):
        sim = streamdet_sim(subarray="SUB128", ngroups=20)
        mine = streamdet_run(sim, plugins=[my_jump_module], use={"jump": "mine"})
        builtin = streamdet_run(sim)
        report = compare_products(mine.products["rate"], builtin.products["rate"])

Comparison tolerances are those of streamdet's own parity tests against jwst: this module
is the one place they are stated (:data:`PRODUCTS`, :data:`KERNEL`).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pytest

VALUE_EXTENSIONS = ("SCI", "ERR", "VAR_POISSON", "VAR_RNOISE")


@dataclass(frozen=True)
class Tolerance:
    """When two results count as the same. NaN must always be in the same places."""

    rtol: float                        # relative, on the values finite in both ...
    atol: float = 0.0                  # ... plus this much absolutely (the values' unit)
    min_value_agreement: float = 1.0   # fraction of the values finite in both within it
    min_dq_agreement: float = 1.0      # fraction of the DQ values that are bit-identical


#: whole products (streamdet's against jwst's Detector1, or a plugin's against the
#: built-in step's): a chain of float32 steps computed in another order, where a few
#: pixels at a threshold (a jump, a saturation level) may go the other way
PRODUCTS = Tolerance(rtol=1e-4, min_value_agreement=0.999, min_dq_agreement=0.9999)
#: one kernel against the stcal function it mirrors, on the same arrays: every value
#: (measured: at most 1e-7 relative, ~5e-6 for slopes that are zero to float32 precision,
#: where stcal's rounding dominates: hence atol, in the values' unit), every DQ bit
KERNEL = Tolerance(rtol=1e-5, atol=1e-7)

# the product tolerances by their earlier names
RTOL = PRODUCTS.rtol
MIN_VALUE_AGREEMENT = PRODUCTS.min_value_agreement
MIN_DQ_AGREEMENT = PRODUCTS.min_dq_agreement


@contextlib.contextmanager
def crds_environment(sim) -> Iterator[None]:
    """Select a simulation's CRDS cache for the duration of the block."""
    saved = {k: os.environ.get(k) for k in sim.env}
    os.environ.update(sim.env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_chain(uncal: Path, output_dir: Path, *, sim=None, plugins: Iterable = (),
              use: dict[str, str] | None = None, steps: dict[str, dict[str, Any]] | None = None,
              overrides: dict[str, str] | None = None, band_bytes: int | None = None,
              only_builtin: bool = False):
    """Process ``uncal`` with ``plugins`` (modules or objects with hook implementations)
    registered besides the installed ones (or besides the built-in steps alone, with
    ``only_builtin``, to test a plugin in isolation); returns the engine's Result."""
    from .core.engine import DEFAULT_BAND_BYTES, RunConfig, process_file
    from .core.plugins import build_registry

    registry = build_registry(tuple(plugins), only_builtin=only_builtin)
    config = RunConfig(params=steps or {}, use=use or {}, overrides=overrides or {},
                       output_dir=Path(output_dir), overwrite=True,
                       band_bytes=band_bytes or DEFAULT_BAND_BYTES)
    with (crds_environment(sim) if sim is not None else contextlib.nullcontext()):
        return process_file(uncal, config, registry=registry)


@dataclass
class Agreement:
    """How one extension of two products agrees."""

    extension: str
    fraction: float        # agreeing pixels / compared pixels
    compared: int
    nan_mismatch: int      # pixels NaN in one product and not in the other
    worst: float           # largest relative difference among pixels finite in both

    def __str__(self) -> str:
        return (f"{self.extension}: {self.fraction:.6f} of {self.compared} agree, "
                f"{self.nan_mismatch} NaN mismatches, worst rel diff {self.worst:.3g}")


def metadata_tree_text(hdu) -> str:
    """A product's ASDF extension (``hdu``) as YAML text without what differs between
    two runs of the same input: the dates (of the file, of its history entries), the
    file name and the hash of the headers that hold them."""
    text = bytes(hdu.data[0][0]).decode()
    text = re.sub(r"(\b(date|time): )'[^']*'", r"\1''", text)
    text = re.sub(r"(\bfilename: )\S+", r"\1-", text)
    return re.sub(r"(_fits_hash: )\S+", r"\1-", text)


def _is_dq(name: str) -> bool:
    return name.upper().replace(".", "_").endswith("DQ")


def compare_extension(ours: np.ndarray, theirs: np.ndarray, extension: str,
                      tolerance: Tolerance = PRODUCTS) -> Agreement:
    """How ``ours`` agrees with ``theirs``: bit for bit if ``extension`` names DQ
    (``DQ``, ``PIXELDQ``, ``rate.dq``...), else within ``tolerance``."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    if ours.shape != theirs.shape:
        raise AssertionError(f"{extension}: shape {ours.shape} != {theirs.shape}")
    if _is_dq(extension):
        same = ours.astype(np.uint32) == theirs.astype(np.uint32)
        return Agreement(extension, float(same.mean()) if same.size else 1.0, same.size, 0, 0.0)
    ours, theirs = ours.astype(np.float64), theirs.astype(np.float64)
    both = np.isfinite(ours) & np.isfinite(theirs)
    diff = np.abs(ours[both] - theirs[both])
    scale = np.abs(theirs[both])
    rel = diff / np.where(scale > 0, scale, 1.0)
    ok = diff <= tolerance.atol + tolerance.rtol * scale
    return Agreement(extension, float(ok.mean()) if ok.size else 1.0, int(both.sum()),
                     int((np.isnan(ours) != np.isnan(theirs)).sum()),
                     float(rel.max()) if rel.size else 0.0)


def compare_products(ours: Path, theirs: Path, tolerance: Tolerance = PRODUCTS,
                     extensions: Iterable[str] = (*VALUE_EXTENSIONS, "DQ")) -> list[Agreement]:
    from astropy.io import fits

    with fits.open(ours) as a, fits.open(theirs) as b:
        return [compare_extension(a[ext].data, b[ext].data, ext, tolerance)
                for ext in extensions]


def check_agreement(report: list[Agreement], tolerance: Tolerance, what: str) -> list[Agreement]:
    """Raise AssertionError (listing every extension) unless each one of ``report`` is
    within ``tolerance``."""
    text = f"{what}:\n  " + "\n  ".join(map(str, report))
    for agreement in report:
        if _is_dq(agreement.extension):
            assert agreement.fraction >= tolerance.min_dq_agreement, text
        else:
            assert agreement.nan_mismatch == 0, text
            assert agreement.fraction >= tolerance.min_value_agreement, text
    return report


def assert_products_agree(ours: Path, theirs: Path, tolerance: Tolerance = PRODUCTS,
                          extensions: Iterable[str] = (*VALUE_EXTENSIONS, "DQ")
                          ) -> list[Agreement]:
    """Two product files agree (by default: values within 1e-4 on >= 99.9 % of the
    pixels finite in both, NaN in the same places, DQ bit-identical on >= 99.99 % of the
    pixels)."""
    return check_agreement(compare_products(ours, theirs, tolerance, extensions), tolerance,
                           f"{Path(ours).name} vs {Path(theirs).name}")


def assert_arrays_agree(ours: Mapping[str, np.ndarray], theirs: Mapping[str, np.ndarray],
                        tolerance: Tolerance = KERNEL) -> list[Agreement]:
    """Two sets of named arrays agree (by default every value within :data:`KERNEL`,
    NaN in the same places, DQ bit-identical); the names must be the same."""
    assert list(ours) == list(theirs), (list(ours), list(theirs))
    return check_agreement([compare_extension(ours[k], theirs[k], k, tolerance) for k in ours],
                           tolerance, "arrays")


# -- pytest fixtures ----------------------------------------------------------------------
@pytest.fixture
def streamdet_sim(tmp_path_factory):
    """Factory: ``streamdet_sim(**simulate_args)`` -> SimResult (cached per argument set
    within the test)."""
    from .simulate import simulate

    made: dict = {}

    def make(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in made:
            made[key] = simulate(tmp_path_factory.mktemp("streamdet-sim"), **kwargs)
        return made[key]
    return make


@pytest.fixture
def streamdet_run(tmp_path):
    """Factory: ``streamdet_run(sim, plugins=[...], use={...}, steps={...})`` -> Result,
    products in a fresh directory per call."""
    counter = iter(range(1_000_000))

    def run(sim, **kwargs):
        return run_chain(sim.uncal, tmp_path / f"run{next(counter)}", sim=sim, **kwargs)
    return run
