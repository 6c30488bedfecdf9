"""The optional-results product's storage and writer (streamdet/core/fitopt.py): bands of
rows go into scratch files sized for the most segments a ramp can have, and the product
comes out at the exposure's own counts as jwst's RampFitOutputModel. (The fit's
``save_opt`` itself is still refused: tests/test_ramp_fit_params.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from streamdet.core.exposure import Exposure
from streamdet.algorithms.ramp_fit_opt import SEGMENT_ARRAYS, segment_bound
from streamdet.core.fitopt import FitoptStore, write_fitopt
from streamdet.core.products import InputMetadata, ProductRecord
from streamdet.simulate import simulate

from .oracle import run_jwst_detector1


def test_bounds_cover_the_most_segments_a_ramp_can_have():
    # clean, jump, clean, jump ... : a segment every other group
    assert segment_bound(8) == 4 and segment_bound(9) == 5 and segment_bound(1) == 1


def _bands(store, arrays, ny, band_rows):
    for r0 in range(0, ny, band_rows):
        rows = slice(r0, min(ny, r0 + band_rows))
        band = {name: a[..., rows, :] for name, a in arrays.items()}
        used = band["slope"].reshape(*band["slope"].shape[:2], -1).any(axis=(0, 2))
        crs = band["crmag"].reshape(*band["crmag"].shape[:2], -1).any(axis=(0, 2))
        nsegs = int(np.flatnonzero(used)[-1] + 1) if used.any() else 0
        ncrs = int(np.flatnonzero(crs)[-1] + 1) if crs.any() else 0
        # a band is handed over with the full bound of slots, zero past its own counts
        padded = {}
        for name, a in band.items():
            if name == "pedestal":
                padded[name] = a
                continue
            full = np.zeros((a.shape[0], store.bounds[name], *a.shape[2:]), np.float32)
            full[:, :a.shape[1]] = a
            padded[name] = full
        store.put(rows, padded, nsegs, ncrs)


@pytest.mark.parity
def test_jwst_fitopt_arrays_stored_in_bands_come_out_as_jwst_wrote_them(tmp_path):
    sim = simulate(tmp_path / "sim", subarray="SUB64", ngroups=8, nints=3, seed=21,
                   large_events=True)
    theirs = run_jwst_detector1(sim.uncal, sim.env, tmp_path / "jwst",
                                steps={"ramp_fit": {"save_opt": True}},
                                products=("fitopt",))["fitopt"]
    with fits.open(theirs) as hdul:
        arrays = {name: hdul[name.upper()].data.astype(np.float32)
                  for name in (*SEGMENT_ARRAYS, "pedestal", "crmag")}
    nints, nsegs, ny, nx = arrays["slope"].shape
    assert nsegs >= 2 and arrays["crmag"].shape[1] >= 1  # jumps split ramps here
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    store = FitoptStore(nints, 8, ny, nx, scratch)
    _bands(store, arrays, ny, band_rows=13)
    out = tmp_path / "mine_fitopt.fits"
    write_fitopt(out, store, _source(sim.uncal), _record({"S_RAMP": "COMPLETE"}))
    with fits.open(out) as mine, fits.open(theirs) as jw:
        assert mine[0].header["DATAMODL"] == "RampFitOutputModel"
        assert mine[0].header["S_RAMP"] == "COMPLETE"
        assert mine[0].header["EXP_TYPE"] == jw[0].header["EXP_TYPE"]
        for name in (*SEGMENT_ARRAYS, "pedestal", "crmag"):
            ext = name.upper()
            assert mine[ext].data.dtype == jw[ext].data.dtype
            assert mine[ext].data.shape == jw[ext].data.shape, ext
            np.testing.assert_array_equal(mine[ext].data, jw[ext].data, err_msg=ext)
    # no partial file left beside the product
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_exposure_without_jumps_has_an_empty_crmag_axis(tmp_path):
    store = FitoptStore(2, 5, 4, 6, tmp_path)
    zeros = {name: np.zeros((2, store.bounds[name], 4, 6), np.float32) for name in SEGMENT_ARRAYS}
    zeros["slope"][:, 0] = 1.5
    zeros["crmag"] = np.zeros((2, store.bounds["crmag"], 4, 6), np.float32)
    zeros["pedestal"] = np.full((2, 4, 6), 3.0, np.float32)
    store.put(slice(0, 4), zeros, 1, 0)
    assert store.compact("slope").shape == (2, 1, 4, 6)
    assert store.compact("crmag").shape == (2, 0, 4, 6)
    np.testing.assert_array_equal(store.compact("pedestal"), 3.0)
    sim = simulate(tmp_path / "sim", subarray="SUB64", ngroups=5, nints=1, seed=2)
    out = tmp_path / "x_fitopt.fits"
    write_fitopt(out, store, _source(sim.uncal), _record({}))
    from stdatamodels.jwst import datamodels

    with datamodels.open(out) as model:
        assert model.crmag.shape == (2, 0, 4, 6)
        np.testing.assert_array_equal(model.slope, 1.5)


def test_a_band_with_more_segments_than_a_ramp_can_have_is_refused(tmp_path):
    store = FitoptStore(1, 4, 2, 2, tmp_path)
    with pytest.raises(ValueError, match="segments"):
        store.put_pixels(0, 0, {"pedestal": np.zeros(4, np.float32)}, segment_bound(4) + 1, 0)


def test_storing_pixels_again_replaces_them_counts_included(tmp_path):
    """The engine may re-run a band: what the first run stored must not survive."""
    store = FitoptStore(1, 6, 2, 3, tmp_path)
    first = {name: np.zeros((store.bounds[name], 6), np.float32) for name in store.bounds}
    first["slope"][:3] = 7.0
    first["crmag"][:2] = 5.0
    first["pedestal"] = np.ones(6, np.float32)
    store.put_pixels(0, 0, first, 3, 2)
    again = {name: np.zeros_like(a) for name, a in first.items()}
    again["slope"][0] = 2.0
    again["pedestal"] = np.full(6, 4.0, np.float32)
    store.put_pixels(0, 0, again, 1, 0)
    assert (store.nsegs, store.ncrs) == (1, 0)
    np.testing.assert_array_equal(store.compact("slope"), 2.0)
    assert store.compact("crmag").shape == (1, 0, 2, 3)
    store.put_pixels(0, 0, first, 3, 2)
    np.testing.assert_array_equal(store.compact("slope")[0, 1], 7.0)


def _source(uncal) -> InputMetadata:
    """The input's metadata as the engine hands it to the product writers."""
    with Exposure(uncal) as exposure:
        return InputMetadata(exposure.meta)


def _record(keywords: dict) -> ProductRecord:
    return ProductRecord(keywords, [], {}, [])
