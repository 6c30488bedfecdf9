"""group_scale: groups rescaled by FRMDIVSR/NFRAMES when the on-board divisor was not
NFRAMES, as jwst 3.0 does; FRMDIVSR=0 is bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits

import streamdet
from streamdet.core.errors import BadInputError
from streamdet.core.exposure import Exposure
from streamdet.plugins.group_scale import GroupScaleStep, group_scale_factor
from streamdet.simulate import simulate

from .oracle import assert_parity, run_jwst_detector1


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("gs"), subarray="SUB64", ngroups=6, nints=2,
                    seed=31)


def _with_header(sim, tmp_path, **cards):
    """A copy of the simulated exposure with header cards changed (None deletes)."""
    path = tmp_path / sim.uncal.name
    shutil.copyfile(sim.uncal, path)
    with fits.open(path, mode="update") as hdul:
        for key, value in cards.items():
            if value is None:
                hdul[0].header.remove(key, ignore_missing=True)
            else:
                hdul[0].header[key] = value
    return path


@pytest.mark.parametrize("cards, factor", [
    ({"FRMDIVSR": 1}, None), ({"FRMDIVSR": None}, None), ({"FRMDIVSR": 2}, 2.0),
    ({"FRMDIVSR": 4, "NFRAMES": 5}, 0.8), ({"FRMDIVSR": 5, "NFRAMES": 5}, None)])
def test_factor_follows_the_header(sim, tmp_path, cards, factor):
    with Exposure(_with_header(sim, tmp_path, **cards)) as exposure:
        assert group_scale_factor(exposure.meta) == factor
        step = GroupScaleStep()
        reason = step.prepare(exposure.meta, None, None)
        assert (reason is None) == (factor is not None)


@pytest.mark.parametrize("value", [0, -2, "four"])
def test_bad_frame_divisor_is_bad_input(sim, tmp_path, value):
    path = _with_header(sim, tmp_path, FRMDIVSR=value)
    # refused when the file is opened, before any step runs
    with pytest.raises(BadInputError, match="FRMDIVSR"):
        Exposure(path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")} | sim.env
    done = subprocess.run([sys.executable, "-m", "streamdet.cli", "process", str(path),
                           "-o", str(tmp_path / "out")], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "FRMDIVSR" in line and path.name in line
    assert not list((tmp_path / "out").glob("*.fits"))


def test_scaling_multiplies_every_group_in_float32(sim, tmp_path):
    from streamdet.core.step import Chunk

    with Exposure(_with_header(sim, tmp_path, FRMDIVSR=4, NFRAMES=5)) as exposure:
        step = GroupScaleStep()
        assert step.prepare(exposure.meta, None, None) is None
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 65535, (2, 3, 4, 5)).astype(np.float32)
    chunk = Chunk(data.copy(), np.zeros(data.shape, np.uint8), np.zeros((4, 5), np.uint32),
                  np.arange(2), slice(0, 4))
    step.process(chunk)
    np.testing.assert_array_equal(chunk.data, data * np.float32(0.8))


def test_products_record_the_step(sim, tmp_path, monkeypatch):
    for key, value in sim.env.items():
        monkeypatch.setenv(key, value)
    a = streamdet.process(sim.uncal, tmp_path / "a")
    b = streamdet.process(_with_header(sim, tmp_path, FRMDIVSR=2), tmp_path / "b")
    assert fits.getheader(a["rate"])["S_GRPSCL"] == "SKIPPED"
    assert fits.getheader(b["rate"])["S_GRPSCL"] == "COMPLETE"
    assert not np.allclose(fits.getdata(a["rate"], "SCI"), fits.getdata(b["rate"], "SCI"),
                           equal_nan=True)


@pytest.mark.parity
def test_parity_with_jwst_group_scale(sim, tmp_path, monkeypatch):
    # NFRAMES stays 1: with NFRAMES > 1 streamdet and jwst differ elsewhere (dark and
    # linearity handling of frame-averaged groups), group_scale or not
    scaled = _with_header(sim, tmp_path, FRMDIVSR=2)
    theirs = run_jwst_detector1(scaled, sim.env, tmp_path / "jwst")
    for key, value in sim.env.items():
        monkeypatch.setenv(key, value)
    ours = streamdet.process(scaled, tmp_path / "streamdet")
    for kind in ("rate", "rateints"):
        assert_parity(ours[kind], theirs[kind])
    assert fits.getheader(ours["rate"])["S_GRPSCL"] == fits.getheader(theirs["rate"])["S_GRPSCL"] == "COMPLETE"
