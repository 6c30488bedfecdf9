"""ramp_fit's ``save_opt``: jwst's optional-results product (``_fitopt.fits``,
RampFitOutputModel) at parity with jwst 3.0 (marked ``parity``), and the default path
untouched by it."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

import streamdet
from streamdet.algorithms.ramp_fit_opt import SEGMENT_ARRAYS
from streamdet.simulate import SimParams, simulate

from .oracle import assert_parity, run_jwst_detector1

ARRAYS = tuple(name.upper() for name in (*SEGMENT_ARRAYS, "pedestal", "crmag"))
SAVE_OPT = {"ramp_fit": {"save_opt": True}}


def assert_fitopt_parity(mine, theirs):
    """Same arrays, shapes and dtypes; values within the rate products' tolerance
    (tests/oracle.py)."""
    with fits.open(mine) as a, fits.open(theirs) as b:
        assert a[0].header["DATAMODL"] == b[0].header["DATAMODL"] == "RampFitOutputModel"
        for ext in ARRAYS:
            assert a[ext].data.shape == b[ext].data.shape, ext
            assert a[ext].data.dtype == b[ext].data.dtype, ext
    assert_parity(mine, theirs, extensions=ARRAYS)


def _env(sim, monkeypatch):
    for key, value in sim.env.items():
        monkeypatch.setenv(key, value)


#: name -> (simulate arguments, ramp_fit settings for both)
CASES = {
    # jumps from showers and snowballs: two segments and jump magnitudes
    "sub64_8x3_large_events": (dict(subarray="SUB64", ngroups=8, nints=3, seed=21,
                                     large_events=True), {}),
    # one-group ramps kept (the first group's own timing) and saturated pedestals
    "sub64_8x2_one_group_ramps": (dict(subarray="SUB64", ngroups=8, nints=2, seed=41,
                                       params=SimParams(saturating_source_at=0.12)),
                                  {"suppress_one_group": False}),
    # >= 100 integrations: stored per chunk and integration
    "sub64_5x100": (dict(subarray="SUB64", ngroups=5, nints=100, seed=15), {}),
    "full_10x2_large_events": (dict(subarray="FULL", ngroups=10, nints=2, seed=22,
                                    large_events=True), {}),
}


@pytest.mark.parity
@pytest.mark.parametrize("case", list(CASES))
def test_fitopt_matches_jwst(case, tmp_path, monkeypatch):
    args, settings = CASES[case]
    steps = {"ramp_fit": {"save_opt": True, **settings}}
    sim = simulate(tmp_path / "sim", **args)
    theirs = run_jwst_detector1(sim.uncal, sim.env, tmp_path / "jwst", steps=steps,
                                products=("rate", "rateints", "fitopt"))
    _env(sim, monkeypatch)
    mine = streamdet.process(sim.uncal, tmp_path / "streamdet", steps=steps)
    assert_fitopt_parity(mine["fitopt"], theirs["fitopt"])
    for kind in ("rate", "rateints"):
        assert_parity(mine[kind], theirs[kind])


def test_default_run_writes_no_fitopt_and_the_same_rates(tmp_path, monkeypatch):
    sim = simulate(tmp_path / "sim", subarray="SUB64", ngroups=6, nints=2, seed=21,
                   large_events=True)
    _env(sim, monkeypatch)
    plain = streamdet.process(sim.uncal, tmp_path / "plain")
    opt = streamdet.process(sim.uncal, tmp_path / "opt", steps=SAVE_OPT)
    assert "fitopt" not in plain
    assert sorted(p.name.split("_")[-1] for p in (tmp_path / "plain").glob("*.fits")) == [
        "rate.fits", "rateints.fits"]
    assert opt["fitopt"].exists()
    for kind in ("rate", "rateints"):
        with fits.open(plain[kind]) as a, fits.open(opt[kind]) as b:
            for ext in ("SCI", "ERR", "DQ", "VAR_POISSON", "VAR_RNOISE"):
                assert a[ext].data.tobytes() == b[ext].data.tobytes()
    # the product is jwst's model, readable by stdatamodels
    from stdatamodels.jwst import datamodels

    with datamodels.open(opt["fitopt"]) as model:
        assert isinstance(model, datamodels.RampFitOutputModel)
        assert model.slope.shape[0] == 2 and model.pedestal.shape == (2, 64, 72)
    # no scratch left behind in the output directory
    assert [p.name for p in (tmp_path / "opt").iterdir() if p.name.startswith(".")] == []


def test_an_existing_fitopt_is_not_overwritten_without_overwrite(tmp_path, monkeypatch):
    sim = simulate(tmp_path / "sim", subarray="SUB64", ngroups=5, nints=1, seed=2)
    _env(sim, monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    stem = sim.uncal.name.replace("_uncal.fits", "")
    (out / f"{stem}_fitopt.fits").write_text("mine")
    from streamdet.core.errors import BadInputError

    with pytest.raises(BadInputError, match="fitopt"):
        streamdet.process(sim.uncal, out, steps=SAVE_OPT)
    assert (out / f"{stem}_fitopt.fits").read_text() == "mine"
    assert not list(out.glob("*_rate.fits"))


@pytest.mark.parity
def test_save_opt_from_a_crds_pars_file_with_shower_flagging(tmp_path, monkeypatch):
    """pars-rampfitstep may switch save_opt on: both write the product from the CRDS
    environment alone, here with operations' shower flagging (tests/test_operations.py)."""
    from .test_operations import OPERATIONS_PARS

    pars = {**OPERATIONS_PARS, "RampFitStep": {**OPERATIONS_PARS["RampFitStep"],
                                               "save_opt": True}}
    sim = simulate(tmp_path / "sim", subarray="SUB64", ngroups=10, nints=2, seed=3,
                   large_events=True, params=SimParams(crds_pars=pars))
    theirs = run_jwst_detector1(sim.uncal, sim.env, tmp_path / "jwst",
                                products=("rate", "rateints", "fitopt"))
    _env(sim, monkeypatch)
    monkeypatch.delenv("STPIPE_DISABLE_CRDS_STEPPARS", raising=False)
    mine = streamdet.process(sim.uncal, tmp_path / "streamdet")
    assert_fitopt_parity(mine["fitopt"], theirs["fitopt"])
    with fits.open(mine["fitopt"]) as hdul:
        assert hdul["CRMAG"].data.shape[1] >= 1
