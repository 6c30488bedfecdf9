"""streamdet-likely through the real chain: the CLI, jwst's parameter spelling, the test
kit, the simulator's truth, bands and threads, the short-ramp fallback."""

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
LIKELY = {"ramp_fit": {"algorithm": "LIKELY"}}


def _read(path):
    with fits.open(path) as hdul:
        return {ext: hdul[ext].data.copy() for ext in ("SCI", "ERR", "DQ", "VAR_POISSON",
                                                         "VAR_RNOISE")}, hdul[0].header.copy()


def _ramp_fit(result):
    return next(step for step in result.chain if step.name == "ramp_fit")


def _robust_sigma(x):
    return 1.4826 * np.median(np.abs(x - np.median(x)))


def _cli():
    beside = Path(sys.executable).with_name("streamdet")  # the environment running the tests
    return str(beside) if beside.exists() else shutil.which("streamdet")


def _same_products(a, b):
    for kind in ("rate", "rateints"):
        x, _ = _read(a[kind])
        y, _ = _read(b[kind])
        for ext in x:
            np.testing.assert_array_equal(x[ext], y[ext], err_msg=f"{kind} {ext}")


def test_cli_algorithm_likely(streamdet_sim, tmp_path):
    sim = streamdet_sim(**SIM)
    out = tmp_path / "products"
    proc = subprocess.run(
        [_cli(), "process", str(sim.uncal), "-o", str(out), "--set",
         "ramp_fit.algorithm=LIKELY", "-q"],
        env={**os.environ, **sim.env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rate_path = out / sim.uncal.name.replace("_uncal.fits", "_rate.fits")
    ints_path = out / sim.uncal.name.replace("_uncal.fits", "_rateints.fits")

    from stdatamodels.jwst import datamodels

    with datamodels.open(rate_path) as model:
        model.validate()
        assert type(model).__name__ == "ImageModel"
        assert model.meta.cal_step.ramp_fit == "COMPLETE"
    with datamodels.open(ints_path) as model:
        model.validate()
        assert type(model).__name__ == "CubeModel"
        assert model.data.shape == (2, 128, 136)
    rate, header = _read(rate_path)
    history = [str(card) for card in header["HISTORY"]]
    assert any(card.startswith("streamdet: ramp_fit=likely (streamdet-likely ") for card in history)
    assert np.isfinite(rate["SCI"][rate["DQ"] == 0]).all()


def test_algorithm_and_use_are_the_same_choice(streamdet_sim, streamdet_run):
    sim = streamdet_sim(**SIM)
    by_algorithm = streamdet_run(sim, steps=LIKELY)
    by_use = streamdet_run(sim, use={"ramp_fit": "likely"})
    assert _ramp_fit(by_algorithm).implementation == "likely"
    assert _ramp_fit(by_algorithm).package == "streamdet-likely"
    _same_products(by_algorithm.products, by_use.products)
    # the built-in stays the default, and OLS_C names it
    assert _ramp_fit(streamdet_run(sim)).implementation == "builtin"
    assert _ramp_fit(streamdet_run(sim, steps={"ramp_fit": {"algorithm": "OLS_C"}})
                     ).implementation == "builtin"


def test_missing_package_is_one_line_exit_2(streamdet_sim, tmp_path):
    sim = streamdet_sim(subarray="SUB64", ngroups=5, nints=1, seed=2)
    env = {**os.environ, **sim.env, "STREAMDET_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = tmp_path / "out"
    proc = subprocess.run([_cli(), "process", str(sim.uncal), "-o", str(out), "--set",
                           "ramp_fit.algorithm=LIKELY"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "ramp_fit.algorithm=LIKELY" in lines[0]
    assert "not installed: install streamdet-likely" in lines[0]
    assert not out.exists()


def test_rates_agree_with_truth_and_errors_are_calibrated(streamdet_sim, streamdet_run):
    sim = streamdet_sim(**SIM)
    rate, _ = _read(streamdet_run(sim, steps=LIKELY).products["rate"])
    truth = fits.getdata(sim.truth_rate).astype(np.float64)
    for dq_value, min_count, width in ((0, 15000, (0.85, 1.15)), (4, 50, (0.8, 1.5))):
        sel = (rate["DQ"] == dq_value) & np.isfinite(rate["SCI"]) & (truth > 0)
        pulls = ((rate["SCI"].astype(float) - truth) / rate["ERR"])[sel]
        assert pulls.size > min_count
        assert abs(np.median(pulls)) < 0.1
        assert width[0] < _robust_sigma(pulls) < width[1]


def test_bands_and_threads_do_not_change_products(streamdet_sim, tmp_path):
    sim = streamdet_sim(**SIM)
    small = run_chain(sim.uncal, tmp_path / "small", sim=sim, steps=LIKELY,
                      band_bytes=2 * 20 * 136 * 5 * 7)  # bands of ~7 rows
    large = run_chain(sim.uncal, tmp_path / "large", sim=sim, steps=LIKELY, band_bytes=1 << 30)
    _same_products(small.products, large.products)


def test_fewer_than_four_groups_fall_back_to_ols_as_jwst(streamdet_sim, streamdet_run):
    sim = streamdet_sim(subarray="SUB64", ngroups=3, nints=2, seed=3)
    likely = streamdet_run(sim, steps=LIKELY)
    assert _ramp_fit(likely).implementation == "likely"
    _same_products(likely.products, streamdet_run(sim).products)


def test_refuses_multi_frame_groups():
    meta = SimpleNamespace(path="x_uncal.fits", nframes=4, ngroups=10, group_time=2.775)
    with pytest.raises(BadInputError, match="NFRAMES=4"):
        LikelyRampFitStep().prepare(meta, refs=None, pixeldq=None)


def test_likely_step_refuses_algorithm_ols_c():
    with pytest.raises(BadInputError, match="is algorithm LIKELY, not 'OLS_C'"):
        meta = SimpleNamespace(path="x_uncal.fits", nframes=1, ngroups=10, group_time=2.775)
        LikelyRampFitStep({"algorithm": "OLS_C"}).prepare(meta, refs=None, pixeldq=None)
