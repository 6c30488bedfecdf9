"""Operations as MAST runs them: the CRDS cache ships a ``pars-jumpstep`` with shower
flagging on and changed thresholds, and a ``pars-rampfitstep``; the exposures carry large
cosmic-ray events (showers, snowballs). jwst runs through ``Detector1Pipeline.call()`` (only
``.call()``/strun apply CRDS parameters) and streamdet with nothing but the CRDS environment
(issue 13, "Measured against")."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits

import streamdet
from streamdet.core.engine import RunConfig, process_file
from streamdet.simulate import SimParams, simulate

from .oracle import assert_parity, run_jwst_detector1

#: parameter references as operations ship them for MIRI: shower flagging on, a lower
#: jump threshold, a changed shower search; ramp_fit keeps one-group ramps
OPERATIONS_PARS = {
    "JumpStep": {"find_showers": True, "rejection_threshold": 3.5,
                 "extend_snr_threshold": 1.3, "extend_min_area": 60,
                 "time_masked_after_shower": 10.0},
    "RampFitStep": {"suppress_one_group": False},
}


def _cli(args, env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    full.update(env)
    full.pop("STPIPE_DISABLE_CRDS_STEPPARS", None)
    return subprocess.run([sys.executable, "-m", "streamdet.cli", *map(str, args)], env=full,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def operations_sim(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("ops"), subarray="SUB64", ngroups=10, nints=2,
                    seed=3, large_events=True, params=SimParams(crds_pars=OPERATIONS_PARS))


def test_shower_flagging_from_the_pars_file_is_accepted_and_applied(operations_sim, tmp_path,
                                                                     monkeypatch):
    for key, value in operations_sim.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("STPIPE_DISABLE_CRDS_STEPPARS", raising=False)
    result = process_file(operations_sim.uncal, RunConfig(output_dir=tmp_path))
    jump = next(s for s in result.chain if s.name == "jump")
    assert jump.params["find_showers"] is True
    assert jump.params["extend_min_area"] == 60
    record = {(s.step, s.name): s for s in result.parameters.settings}
    assert record[("jump", "find_showers")].source == "crds"
    assert "pars-jumpstep" in record[("jump", "find_showers")].origin
    # the shower search ran: it counts the extended events it flagged
    assert fits.getval(result.products["rate"], "EXTNCRS") > 0


def test_refs_and_verbose_show_find_showers_from_the_pars_file(operations_sim, tmp_path):
    done = _cli(["refs", operations_sim.uncal], operations_sim.env)
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if "jump.find_showers" in ln)
    assert "True" in line and "jwst_miri_pars-jumpstep_" in line
    done = _cli(["process", operations_sim.uncal, "-o", tmp_path, "-v"], operations_sim.env)
    assert done.returncode == 0, done.stderr
    text = done.stdout + done.stderr
    assert "jump.find_showers = True  [crds://jwst_miri_pars-jumpstep_" in text
    assert "jump.rejection_threshold = 3.5  [crds://jwst_miri_pars-jumpstep_" in text


#: name -> simulate arguments; every case ships OPERATIONS_PARS
OPERATIONS_CASES = {
    "sub64_10x2_large_events": dict(subarray="SUB64", ngroups=10, nints=2, seed=3,
                                   large_events=True),
    # full frame: about 30 s of jwst
    "full_10x2_large_events": dict(subarray="FULL", ngroups=10, nints=2, seed=22,
                                   large_events=True),
    # >= 100 integrations: jump's significances come from sigma clipping across them
    "sub64_6x100_showers": dict(subarray="SUB64", ngroups=6, nints=100, seed=15,
                                params=dict(showers_per_int=0.3, snowballs_per_int=0.2,
                                            shower_radius_px=(8.0, 14.0))),
}


@pytest.mark.parity
@pytest.mark.parametrize("case", list(OPERATIONS_CASES))
def test_operations_pars_parity_with_jwst_call(case, tmp_path, monkeypatch):
    args = dict(OPERATIONS_CASES[case])
    params = SimParams(**args.pop("params", {}), crds_pars=OPERATIONS_PARS)
    sim = simulate(tmp_path / "sim", **args, params=params)
    theirs = run_jwst_detector1(sim.uncal, sim.env, tmp_path / "jwst")
    for key, value in sim.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("STPIPE_DISABLE_CRDS_STEPPARS", raising=False)
    ours = streamdet.process(sim.uncal, tmp_path / "streamdet")
    for kind in ("rate", "rateints"):
        assert_parity(ours[kind], theirs[kind])
    with fits.open(theirs["rate"]) as jw, fits.open(ours["rate"]) as sd:
        # jwst applied the pars file's shower flagging, and so did streamdet
        assert jw[0].header["EXTNCRS"] > 0
        assert sd[0].header["EXTNCRS"] == pytest.approx(jw[0].header["EXTNCRS"], rel=1e-9)
    # the pars really changed the result: without them DQ differs beyond the tolerance
    defaults = process_file(sim.uncal, RunConfig(output_dir=tmp_path / "defaults",
                                                 crds_pars=False)).products["rate"]
    with fits.open(theirs["rate"]) as jw, fits.open(defaults) as plain:
        dq_differ = np.count_nonzero(jw["DQ"].data != plain["DQ"].data)
        assert dq_differ > 0.0002 * plain["DQ"].data.size
