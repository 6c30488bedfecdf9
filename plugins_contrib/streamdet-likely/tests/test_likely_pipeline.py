"""streamdet-likely through the real chain: the CLI, the test kit, truth, bands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits

from streamdet.core.errors import BadInputError
from streamdet.testing import run_chain
from streamdet_likely.step import LikelyRampFitStep

SIM = dict(subarray="SUB128", ngroups=20, nints=2, seed=7)
USE = {"ramp_fit": "likely"}


def _read(path):
    with fits.open(path) as hdul:
        return {ext: hdul[ext].data.copy() for ext in ("SCI", "ERR", "DQ", "VAR_POISSON",
                                                         "VAR_RNOISE")}, hdul[0].header.copy()


def _ramp_fit(result):
    return next(step for step in result.chain if step.name == "ramp_fit")


def _pulls(rate, truth, dq_value=0):
    sel = (rate["DQ"] == dq_value) & np.isfinite(rate["SCI"]) & (rate["ERR"] > 0)
    return ((rate["SCI"].astype(float) - truth) / rate["ERR"])[sel]


def _robust_sigma(x):
    return 1.4826 * np.median(np.abs(x - np.median(x)))


def test_cli_process_with_likely(streamdet_sim, tmp_path):
    sim = streamdet_sim(**SIM)
    out = tmp_path / "products"
    env = {**os.environ, **sim.env}
    beside = Path(sys.executable).with_name("streamdet")  # the environment running the tests
    cli = str(beside) if beside.exists() else shutil.which("streamdet")
    proc = subprocess.run(
        [cli, "process", str(sim.uncal), "-o", str(out), "--use", "ramp_fit=likely", "-q"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rate_path = out / sim.uncal.name.replace("_uncal.fits", "_rate.fits")
    ints_path = out / sim.uncal.name.replace("_uncal.fits", "_rateints.fits")
    assert rate_path.exists() and ints_path.exists()

    from stdatamodels.jwst import datamodels

    with datamodels.open(rate_path) as model:
        model.validate()
        assert type(model).__name__ == "ImageModel"
        assert model.data.shape == (128, 136)
        assert model.meta.cal_step.ramp_fit == "COMPLETE"
    with datamodels.open(ints_path) as model:
        model.validate()
        assert type(model).__name__ == "CubeModel"
        assert model.data.shape == (2, 128, 136)

    rate, header = _read(rate_path)
    assert header["S_RAMP"] == "COMPLETE"
    history = [str(card) for card in header["HISTORY"]]
    assert any(card.startswith("streamdet: ramp_fit=likely (streamdet-likely ") for card in history)
    assert np.isfinite(rate["SCI"][rate["DQ"] == 0]).all()
    assert np.all(rate["ERR"][rate["DQ"] == 0] > 0)


def test_test_kit_run_agrees_with_truth(streamdet_sim, streamdet_run):
    sim = streamdet_sim(**SIM)
    result = streamdet_run(sim, use=USE)
    step = _ramp_fit(result)
    assert (step.implementation, step.package) == ("likely", "streamdet-likely")
    rate, _ = _read(result.products["rate"])
    truth = fits.getdata(sim.truth_rate).astype(np.float64)
    pulls = _pulls(rate, truth)
    assert pulls.size > 15000
    assert abs(np.median(pulls)) < 0.1
    assert 0.8 < _robust_sigma(pulls) < 1.3
    # ramps split by a flagged jump: still consistent with the truth within their errors
    split = _pulls(rate, truth, dq_value=4)
    assert split.size > 50
    assert abs(np.median(split)) < 0.2
    assert 0.8 < _robust_sigma(split) < 1.5
    # the per-integration products too
    ints, _ = _read(result.products["rateints"])
    for i in range(2):
        one = {k: v[i] for k, v in ints.items()}
        p = _pulls(one, truth)
        assert abs(np.median(p)) < 0.1 and 0.8 < _robust_sigma(p) < 1.3


def test_default_chain_is_unchanged_and_flags_match_the_builtin(streamdet_sim, streamdet_run):
    sim = streamdet_sim(**SIM)
    builtin = streamdet_run(sim)
    assert _ramp_fit(builtin).implementation == "builtin"
    likely = streamdet_run(sim, use=USE)
    for kind in ("rate", "rateints"):
        ours, _ = _read(likely.products[kind])
        theirs, _ = _read(builtin.products[kind])
        assert np.mean(ours["DQ"] == theirs["DQ"]) >= 0.9999
        assert np.array_equal(np.isnan(ours["SCI"]), np.isnan(theirs["SCI"]))
        good = (theirs["DQ"] == 0) & np.isfinite(theirs["SCI"])
        # two estimates of the same ramps: close, but not the same numbers
        diff = (ours["SCI"] - theirs["SCI"])[good] / theirs["ERR"][good]
        assert abs(np.median(diff)) < 0.02
        assert 0 < np.std(diff) < 0.3


def test_band_invariance(streamdet_sim, tmp_path):
    sim = streamdet_sim(**SIM)
    small = run_chain(sim.uncal, tmp_path / "small", sim=sim, use=USE,
                      band_bytes=2 * 20 * 136 * 5 * 7)  # bands of ~7 rows
    large = run_chain(sim.uncal, tmp_path / "large", sim=sim, use=USE, band_bytes=1 << 30)
    for kind in ("rate", "rateints"):
        a, _ = _read(small.products[kind])
        b, _ = _read(large.products[kind])
        for ext in a:
            np.testing.assert_array_equal(a[ext], b[ext], err_msg=f"{kind} {ext}")


@pytest.mark.parametrize("nframes, ngroups, message", [(4, 10, "NFRAMES=4"),
                                                       (1, 1, "at least 2 groups")])
def test_refuses_read_patterns_it_does_not_model(nframes, ngroups, message):
    meta = SimpleNamespace(path="x_uncal.fits", nframes=nframes, ngroups=ngroups,
                           group_time=2.775)
    with pytest.raises(BadInputError, match=message):
        LikelyRampFitStep().prepare(meta, refs=None, pixeldq=None)


def test_jump_mask_parameter_only_changes_jump_split_ramps(streamdet_sim, streamdet_run):
    sim = streamdet_sim(**SIM)
    by_read, _ = _read(streamdet_run(sim, use=USE).products["rateints"])
    by_difference, _ = _read(streamdet_run(sim, use=USE, steps={
        "ramp_fit": {"jump_mask": "difference"}}).products["rateints"])
    # a ramp's covariance uses the pixel's exposure rate: a jump in any integration counts
    jumped = np.broadcast_to(((by_read["DQ"] & 4) != 0).any(axis=0), by_read["DQ"].shape)
    np.testing.assert_array_equal(by_read["DQ"], by_difference["DQ"])
    same = ~jumped & np.isfinite(by_read["SCI"])
    np.testing.assert_array_equal(by_read["SCI"][same], by_difference["SCI"][same])
    changed = jumped & np.isfinite(by_read["SCI"]) & (by_read["SCI"] != by_difference["SCI"])
    assert changed.sum() > 0.5 * (jumped & np.isfinite(by_read["SCI"])).sum()
