"""The fused pass (core/engine.py ``_fusable``): time series read their bands from the
input and run the first pass's steps on them, with no scratch copy of the ramp; the
surveys come band by band, and the bands are done again when a partial survey misled
them. Its products must be those of the two-pass run (forced here by saving the ramp
after dark_current, which the first pass must then hand over)."""

from __future__ import annotations

import shutil
from collections import defaultdict

import numpy as np
import pytest
from astropy.io import fits

from streamdet.core.dqflags import DO_NOT_USE
from streamdet.core.engine import RunConfig, process_file
from streamdet.core.plugins import build_registry, hookimpl
from streamdet.simulate import simulate
from streamdet.testing import crds_environment

IMAGES = ("SCI", "ERR", "DQ", "VAR_POISSON", "VAR_RNOISE")


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("sim"), subarray="SUB64", ngroups=8, nints=6, seed=5)


def run(sim, uncal, out, two_pass=False, registry=None, **config):
    bands = []

    def progress(kind, done, total):
        if kind == "bands":
            bands.append(done)

    extra = {"save_after": ("dark_current",)} if two_pass else {}
    with crds_environment(sim):
        result = process_file(uncal, RunConfig(output_dir=out, **extra, **config),
                              registry=registry, on_progress=progress)
    return result, bands


def images(path):
    with fits.open(path) as hdul:
        return {name: hdul[name].data.copy() for name in IMAGES}


def assert_same_products(a, b):
    for kind in ("rate", "rateints"):
        x, y = images(a.products[kind]), images(b.products[kind])
        for name in IMAGES:
            assert np.array_equal(x[name], y[name], equal_nan=True), (kind, name)


def test_time_series_keep_no_copy_of_the_ramp(sim, tmp_path):
    fused, bands = run(sim, sim.uncal, tmp_path / "fused", band_bytes=200_000)
    two_pass, _ = run(sim, sim.uncal, tmp_path / "two", two_pass=True, band_bytes=200_000)
    assert "scratch" not in fused.timings and "scratch" in two_pass.timings
    assert len(bands) > 3 and bands == list(range(1, len(bands) + 1))  # one sweep
    assert_same_products(fused, two_pass)


@pytest.mark.parametrize("groups", [slice(2, 7), slice(1, 2), slice(0, 8)],
                         ids=["jump-mode", "ramp_fit-discard", "no-rate-there"])
def test_bands_misled_by_a_partial_survey_are_done_again(sim, tmp_path, groups):
    """The input flags ``groups`` DO_NOT_USE in the top half of the frame, in every
    integration: the first bands alone say those groups are unusable everywhere, which
    the whole frame does not. Misled, jump would skip its search there (too few groups
    left), ramp_fit would drop the second group too (RSCD flags the first), or find no
    rate to make at all."""
    uncal = tmp_path / sim.uncal.name
    shutil.copy(sim.uncal, uncal)
    with fits.open(uncal, mode="update") as hdul:
        groupdq = np.zeros(hdul["SCI"].data.shape, np.uint8)
        groupdq[:, groups, :32, :] = DO_NOT_USE
        hdul.append(fits.ImageHDU(groupdq, name="GROUPDQ"))
    fused, bands = run(sim, uncal, tmp_path / "fused", threads=2, band_bytes=150_000)
    two_pass, _ = run(sim, uncal, tmp_path / "two", two_pass=True, threads=2,
                      band_bytes=150_000)
    assert "scratch" not in fused.timings
    sweep = len(bands) // 2
    assert bands == list(range(1, sweep + 1)) * 2  # every band twice
    assert_same_products(fused, two_pass)
    with fits.open(fused.products["rate"]) as hdul:
        assert np.isfinite(hdul["SCI"].data[32:]).mean() > 0.9  # the other half has rates


@pytest.mark.parametrize("large_events", [False, True], ids=["plain", "showers-snowballs"])
def test_full_frame_surveys_first_then_recomputes(tmp_path_factory, tmp_path, large_events):
    """refpix needs every row of an integration before it corrects any: a full frame
    whose copy of the ramp would go to a file gets a first pass for the surveys alone,
    then the fused band pass (and jump's extra passes for its large-event searches),
    with the two-pass products. That first pass is for refpix's survey alone (jump and
    ramp_fit survey with the bands), which reads the data of the eight reference
    columns: every step of it is column-local, so each runs on those columns and the
    neighbours saturation's flag growth reaches, one column on each side."""
    full = simulate(tmp_path_factory.mktemp("full"), subarray="FULL", ngroups=10, nints=2,
                    seed=22 if large_events else 9, large_events=large_events)
    params = ({"jump": {"find_showers": True, "expand_large_events": True}}
              if large_events else {})
    widths = defaultdict(set)  # step -> the column sets its chunks held

    class Widths:
        @hookimpl
        def streamdet_step_finished(self, step, chunk):
            columns = None if chunk.columns is None else tuple(chunk.columns.tolist())
            assert chunk.data.shape[-1] == (1032 if columns is None else len(columns))
            widths[step.name].add(columns)

    registry = build_registry((Widths(),), only_builtin=True)
    kept, bands = run(full, full.uncal, tmp_path / "recomputed", scratch_in_memory_bytes=0,
                      params=params, registry=registry)
    narrowed = (0, 1, 2, 3, 4, 1027, 1028, 1029, 1030, 1031)
    first_pass = ("dq_init", "saturation", "lastframe", "reset", "linearity", "rscd",
                  "dark_current")
    assert set(first_pass) | {"refpix", "jump", "ramp_fit"} <= set(widths)
    for name, seen in widths.items():  # survey pass and band pass, or every column
        assert seen == ({None, narrowed} if name in first_pass else {None}), name
    two_pass, _ = run(full, full.uncal, tmp_path / "two", two_pass=True,
                      scratch_in_memory_bytes=0, params=params)
    assert "scratch" not in kept.timings and "scratch" in two_pass.timings
    assert kept.timings["refpix"] > 0
    assert bands == list(range(1, len(bands) + 1))  # one sweep: the survey was whole
    assert_same_products(kept, two_pass)
    if large_events:
        with fits.open(kept.products["rate"]) as hdul:
            assert hdul[0].header["EXTNCRS"] > 0  # the searches found events


def test_thick_exposures_keep_the_copy(sim, tmp_path):
    """Bands of a row or two would read and recompute mostly halo rows (60 groups x 500
    integrations: 5 rows for each of its own): such an exposure keeps the two passes."""
    thin, _ = run(sim, sim.uncal, tmp_path / "thin", band_bytes=40_000)
    fused, _ = run(sim, sim.uncal, tmp_path / "fused")
    assert "scratch" in thin.timings and "scratch" not in fused.timings
    assert_same_products(thin, fused)


def test_the_survey_pass_narrows_only_when_every_rule_allows():
    """The columns a pass for the surveys alone computes. Every step on the surveyors'
    columns and the neighbours the steps' halos reach (engine ``_narrowed_columns``),
    when every step is column_local and every surveyor names its columns; otherwise the
    data_only steps on the surveyors' columns (``_surveyed_columns``), when no step
    after one of them reads the data; every column (None) otherwise."""
    from streamdet.core.engine import _narrowed_columns, _surveyed_columns
    from streamdet.core.step import Step

    def step(data_only=False, reads_data=True, columns="all", column_local=False):
        attrs = {"name": "s", "data_only": data_only, "reads_data": reads_data,
                 "column_local": column_local}
        if not isinstance(columns, str):
            attrs["survey_columns"] = lambda self, nx: columns
        return type("S", (Step,), attrs)()

    flags = step(reads_data=False)
    reader = step()  # reads the data (saturation)
    data = step(data_only=True)
    edges, flags_only, everything = (step(columns=np.array([0, 9])),
                                     step(columns=np.zeros(0, np.int64)), step())
    narrowed = _surveyed_columns([reader, data, flags, data], [edges, flags_only], 10)
    assert narrowed.tolist() == [0, 9]
    assert _surveyed_columns([reader, data], [flags_only], 10).size == 0
    assert _surveyed_columns([reader, data, reader], [edges], 10) is None  # reads after
    assert _surveyed_columns([reader, data], [edges, everything], 10) is None  # unnamed
    assert _surveyed_columns([reader, flags], [edges], 10) is None  # nothing to narrow
    assert _surveyed_columns([data], [step(columns=np.arange(10))], 10) is None  # all

    local, local_flags = step(column_local=True), step(column_local=True, reads_data=False)
    assert _narrowed_columns([local, data, local_flags], [edges, flags_only], 10, 0
                             ).tolist() == [0, 9]
    assert _narrowed_columns([local, data], [step(columns=np.array([4]))], 10, 2
                             ).tolist() == [2, 3, 4, 5, 6]
    assert _narrowed_columns([local], [edges], 10, 1).tolist() == [0, 1, 8, 9]  # clipped
    assert _narrowed_columns([local, flags], [edges], 10, 0) is None  # not column_local
    assert _narrowed_columns([local], [edges, everything], 10, 0) is None  # unnamed
    assert _narrowed_columns([local], [flags_only], 10, 0) is None  # no data read
    assert _narrowed_columns([local], [edges], 10, 4) is None  # reaches every column


def test_bands_grow_with_deep_halos_within_the_memory_budget():
    """Band rows (engine ``_band_rows``): at most 48 rows in flight together, or 16 rows
    per halo row read on each side when the halos are deep (jump's shower search reads
    5), so the halos stay a small part of what is read; the memory budget comes first."""
    from types import SimpleNamespace

    from streamdet.core.engine import DEFAULT_BAND_BYTES, _band_rows

    full = SimpleNamespace(nints=2, ngroups=50, ny=1024, nx=1032)
    assert _band_rows(full, DEFAULT_BAND_BYTES, 2, 2) == (24, 2)
    assert _band_rows(full, DEFAULT_BAND_BYTES, 1, 2) == (48, 1)
    assert _band_rows(full, DEFAULT_BAND_BYTES, 2, 5) == (40, 2)
    # 16 MB hold 32 rows: two bands of 16 would be mostly halo, so one band at a time
    assert _band_rows(full, 16 * 1024**2, 2, 5) == (22, 1)
    series = SimpleNamespace(nints=100, ngroups=30, ny=256, nx=256)
    assert _band_rows(series, DEFAULT_BAND_BYTES, 2, 2) == (13, 2)
