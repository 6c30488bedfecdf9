"""ramp_fit's jwst parameters firstgroup, lastgroup, suppress_one_group (and
maximum_cores, served as threads) at parity with jwst 3.0."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

import streamdet
from streamdet import config as configmod
from streamdet.core.dqflags import DO_NOT_USE
from streamdet.core.errors import BadInputError
from streamdet.algorithms.ramp_fit import ignored_groups
from streamdet.plugins.ramp_fit import RampFitStep
from streamdet.simulate import SimParams, simulate

from .oracle import assert_parity, run_jwst_detector1


@pytest.mark.parametrize("first, last, expect", [
    (None, None, None), (0, None, None), (None, 7, None), (None, 9, None),
    (2, None, [1, 1, 0, 0, 0, 0, 0, 0]), (None, 5, [0, 0, 0, 0, 0, 0, 1, 1]),
    (1, 5, [1, 0, 0, 0, 0, 0, 1, 1]), (-3, 5, [0, 0, 0, 0, 0, 0, 1, 1]),
    (5, 5, None), (6, 2, None), (3, 100, [1, 1, 1, 0, 0, 0, 0, 0]),
])
def test_ignored_groups_as_jwst_sets_them(first, last, expect):
    got = ignored_groups(8, first, last)
    if expect is None:
        assert got is None
    else:
        np.testing.assert_array_equal(got, np.array(expect, np.uint8) * DO_NOT_USE)


def test_parameter_values():
    assert RampFitStep({"firstgroup": "2", "lastgroup": "None"}).params == {
        "suppress_one_group": True, "firstgroup": 2, "lastgroup": None, "save_opt": False,
        "algorithm": "OLS_C"}
    with pytest.raises(BadInputError, match="firstgroup"):
        RampFitStep({"firstgroup": 1.5})
    with pytest.raises(BadInputError, match="save_opt"):
        RampFitStep({"save_opt": "perhaps"})
    with pytest.raises(BadInputError, match="maximum_cores"):
        configmod.load(sets=["ramp_fit.maximum_cores=lots"])


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    # the saturating source saturates in group 1: ramps with one good group exist
    return simulate(tmp_path_factory.mktemp("rf"), subarray="SUB64", ngroups=8, nints=2,
                    seed=41, params=SimParams(saturating_source_at=0.12))


def test_the_parameters_change_the_products(sim, tmp_path, monkeypatch):
    for key, value in sim.env.items():
        monkeypatch.setenv(key, value)
    base = streamdet.process(sim.uncal, tmp_path / "base")["rate"]
    sci = fits.getdata(base, "SCI")
    for n, steps in enumerate([{"firstgroup": 2}, {"lastgroup": 4},
                               {"suppress_one_group": False}]):
        other = streamdet.process(sim.uncal, tmp_path / str(n), steps={"ramp_fit": steps})
        assert not np.array_equal(sci, fits.getdata(other["rate"], "SCI"), equal_nan=True), steps


def test_maximum_cores_becomes_threads(sim, tmp_path, monkeypatch):
    from streamdet.core.engine import RunConfig, process_file

    for key, value in sim.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("STREAMDET_THREADS", raising=False)
    result = process_file(sim.uncal, RunConfig(output_dir=tmp_path,
                                               params={"ramp_fit": {"maximum_cores": "3"}}))
    assert result.parameters.threads == 3
    assert [(s.step, s.name, s.value) for s in result.parameters.settings] == [
        ("ramp_fit", "maximum_cores", "3")]


@pytest.mark.parity
@pytest.mark.parametrize("steps", [
    {"firstgroup": 1, "lastgroup": 5}, {"firstgroup": 2}, {"lastgroup": 3},
    {"suppress_one_group": False}, {"firstgroup": 6, "lastgroup": 2},
], ids=str)
def test_parity_with_jwst(sim, tmp_path, monkeypatch, steps):
    theirs = run_jwst_detector1(sim.uncal, sim.env, tmp_path / "jwst",
                                steps={"ramp_fit": steps})
    for key, value in sim.env.items():
        monkeypatch.setenv(key, value)
    ours = streamdet.process(sim.uncal, tmp_path / "streamdet", steps={"ramp_fit": steps})
    for kind in ("rate", "rateints"):
        assert_parity(ours[kind], theirs[kind])
