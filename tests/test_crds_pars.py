"""CRDS step-parameter references (``pars-*``), applied as stpipe's ``Step.call`` applies
them: step defaults < CRDS < configuration file < command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import streamdet
from streamdet.core.engine import RunConfig, process_file
from streamdet.core.errors import BadInputError
from streamdet.simulate import SimParams, simulate

from .oracle import assert_parity, run_jwst_detector1

#: what operations-like CRDS parameter references change here: a lower jump threshold
#: (many more jumps on this exposure) and ramp_fit's one-group suppression
PARS = {"JumpStep": {"rejection_threshold": 3.0},
        "RampFitStep": {"suppress_one_group": False}}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("pars"), subarray="SUB64", ngroups=8, nints=2,
                    seed=21, params=SimParams(crds_pars=PARS))


@pytest.fixture
def crds_env(sim, monkeypatch):
    for key, value in sim.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("STPIPE_DISABLE_CRDS_STEPPARS", raising=False)
    return sim


def _cli(args, env, cwd=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "streamdet.cli", *map(str, args)], env=full,
                          capture_output=True, text=True, cwd=cwd)


def _jump_pixels(rate: Path) -> int:
    return int(np.count_nonzero(fits.getdata(rate, "DQ") & 4))


def test_cache_ships_real_pars_files_and_keeps_the_rest_na(sim):
    import asdf

    mappings = sim.crds_path / "mappings" / "jwst"
    imap = next(mappings.glob("jwst_miri_*.imap")).read_text()
    assert "'pars-jumpstep' : 'jwst_miri_pars-jumpstep_" in imap
    assert "'pars-rampfitstep' : 'jwst_miri_pars-rampfitstep_" in imap
    for other in ("pars-detector1pipeline", "pars-dqinitstep", "pars-emicorrstep",
                  "pars-saturationstep", "pars-darkcurrentstep"):
        assert f"'{other}' : 'N/A'" in imap
    rmap = next(mappings.glob("jwst_miri_pars-jumpstep_*.rmap")).read_text()
    assert "'file_ext' : '.asdf'" in rmap
    ref = next((sim.crds_path / "references" / "jwst" / "miri").glob("*pars-jumpstep*.asdf"))
    with asdf.open(ref) as af:
        assert af.tree["class"] == "jwst.jump.jump_step.JumpStep"
        assert af.tree["name"] == "jump"
        assert af.tree["parameters"] == {"rejection_threshold": 3.0}
        assert af.tree["meta"]["reftype"] == "pars-jumpstep"


def test_default_simulation_ships_none(tmp_path):
    plain = simulate(tmp_path, subarray="SUB64", ngroups=5, nints=1, seed=2)
    imap = next((plain.crds_path / "mappings" / "jwst").glob("*.imap")).read_text()
    assert "'pars-jumpstep' : 'N/A'" in imap
    assert not list((plain.crds_path / "mappings" / "jwst").glob("*pars*.rmap"))


def test_crds_pars_apply_and_are_recorded(crds_env, tmp_path):
    result = process_file(crds_env.uncal, RunConfig(output_dir=tmp_path / "a"))
    jump = next(s for s in result.chain if s.name == "jump")
    ramp_fit = next(s for s in result.chain if s.name == "ramp_fit")
    assert jump.params["rejection_threshold"] == 3.0
    assert ramp_fit.params["suppress_one_group"] is False
    record = {(s.step, s.name): s for s in result.parameters.settings}
    assert record[("jump", "rejection_threshold")].source == "crds"
    assert "pars-jumpstep" in record[("jump", "rejection_threshold")].origin
    assert {p.reftype for p in result.parameters.pars} == {"pars-jumpstep", "pars-rampfitstep"}
    history = str(fits.getheader(result.products["rate"])["HISTORY"])
    assert "pars-jumpstep=crds://jwst_miri_pars-jumpstep_" in history
    # and they matter: without them jump flags fewer pixels
    off = process_file(crds_env.uncal, RunConfig(output_dir=tmp_path / "b", crds_pars=False))
    assert next(s for s in off.chain if s.name == "jump").params["rejection_threshold"] == 4.0
    assert off.parameters.pars == []
    assert _jump_pixels(result.products["rate"]) > _jump_pixels(off.products["rate"])


def test_environment_switch_turns_them_off(crds_env, tmp_path, monkeypatch):
    monkeypatch.setenv("STPIPE_DISABLE_CRDS_STEPPARS", "true")
    result = process_file(crds_env.uncal, RunConfig(output_dir=tmp_path))
    assert next(s for s in result.chain if s.name == "jump").params["rejection_threshold"] == 4.0
    assert result.parameters.pars == []


def test_precedence_crds_then_config_then_command_line(crds_env, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[steps.jump]\nrejection_threshold = 6.0\n")
    done = _cli(["process", crds_env.uncal, "-o", tmp_path / "c", "--config", config, "-v",
                 "-q"], crds_env.env)
    assert done.returncode == 0, done.stderr
    from streamdet import config as configmod
    from streamdet.core.exposure import Exposure
    from streamdet.core.parameters import effective
    from streamdet.core.plugins import get_registry

    with Exposure(crds_env.uncal) as exposure:
        run = configmod.load(config)
        got = effective(run, exposure.meta, get_registry())
        assert got.steps["jump"]["rejection_threshold"] == 6.0
        assert got.steps["ramp_fit"]["suppress_one_group"] is False  # CRDS still applies
        run = configmod.load(config, sets=["jump.rejection_threshold=7"])
        got = effective(run, exposure.meta, get_registry())
        assert float(got.steps["jump"]["rejection_threshold"]) == 7.0
        (setting,) = [s for s in got.settings if s.name == "rejection_threshold"]
        assert (setting.source, setting.origin) == ("command line",
                                                    "--set jump.rejection_threshold=7")


def test_refs_and_verbose_show_which_file_set_what(crds_env, tmp_path):
    done = _cli(["refs", crds_env.uncal], crds_env.env)
    assert done.returncode == 0, done.stderr
    assert "pars-jumpstep" in done.stdout
    line = next(ln for ln in done.stdout.splitlines() if "jump.rejection_threshold" in ln)
    assert "3.0" in line and "jwst_miri_pars-jumpstep_" in line
    done = _cli(["process", crds_env.uncal, "-o", tmp_path, "-v"], crds_env.env)
    assert done.returncode == 0, done.stderr
    text = done.stdout + done.stderr
    assert "ramp_fit.suppress_one_group = False  [crds://jwst_miri_pars-rampfitstep_" in text
    done = _cli(["refs", crds_env.uncal, "--no-crds-pars"], crds_env.env)
    assert "pars-jumpstep" not in done.stdout


def _sim_with(tmp_path, pars):
    return simulate(tmp_path, subarray="SUB64", ngroups=5, nints=1, seed=4,
                    params=SimParams(fullframe_refs=False, crds_pars=pars))


@pytest.mark.parametrize("pars, named", [
    ({"JumpStep": {"no_such_threshold": 2.0}}, "no_such_threshold"),
    ({"RefPixStep": {"use_side_ref_pixels": False}}, "use_side_ref_pixels"),
    ({"PersistenceStep": {"skip": False}}, "persistence"),
    ({"Detector1Pipeline": {"steps": {"jump": {"bogus": 1}}}}, "bogus"),
])
def test_a_pars_file_streamdet_cannot_honour_is_bad_input(tmp_path, pars, named):
    bad = _sim_with(tmp_path / "sim", pars)
    done = _cli(["process", bad.uncal, "-o", tmp_path / "out"], bad.env)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert named in line and "pars-" in line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_pipeline_pars_steps_section_wins_over_the_steps_own(tmp_path, monkeypatch):
    both = _sim_with(tmp_path / "sim", {
        "JumpStep": {"rejection_threshold": 3.0, "flag_4_neighbors": False},
        "Detector1Pipeline": {"steps": {"jump": {"rejection_threshold": 5.5}}}})
    for key, value in both.env.items():
        monkeypatch.setenv(key, value)
    result = process_file(both.uncal, RunConfig(output_dir=tmp_path / "out"))
    jump = next(s for s in result.chain if s.name == "jump")
    assert jump.params["rejection_threshold"] == 5.5
    assert jump.params["flag_4_neighbors"] is False


#: parity cases: simulate arguments and the pars references the cache ships
PARITY = {
    "sub64_8x2": (dict(subarray="SUB64", ngroups=8, nints=2, seed=21), PARS),
    "sub64_6x100_sigma_clip": (dict(subarray="SUB64", ngroups=6, nints=100, seed=15), PARS),
    # the pipeline's steps section wins over the step's own file, in jwst as here
    "sub128_6x2_pipeline_pars": (dict(subarray="SUB128", ngroups=6, nints=2, seed=16), {
        "JumpStep": {"rejection_threshold": 3.0, "flag_4_neighbors": False},
        "Detector1Pipeline": {"steps": {"jump": {"rejection_threshold": 3.5},
                                        "firstframe": {"skip": False}}}}),
}


@pytest.mark.parity
@pytest.mark.parametrize("case", list(PARITY))
def test_parity_with_jwst_call_applying_the_same_pars(case, tmp_path, monkeypatch):
    args, pars = PARITY[case]
    sim = simulate(tmp_path / "sim", **args, params=SimParams(crds_pars=pars))
    theirs = run_jwst_detector1(sim.uncal, sim.env, tmp_path / "jwst")
    for key, value in sim.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("STPIPE_DISABLE_CRDS_STEPPARS", raising=False)
    ours = streamdet.process(sim.uncal, tmp_path / "streamdet")
    for kind in ("rate", "rateints"):
        assert_parity(ours[kind], theirs[kind])
    # the pars really changed jwst's result (a test that cannot fail is none)
    defaults = process_file(sim.uncal, RunConfig(output_dir=tmp_path / "defaults",
                                                 crds_pars=False)).products["rate"]
    assert _jump_pixels(theirs["rate"]) != _jump_pixels(defaults)

def test_a_selected_pars_file_missing_from_the_cache_is_an_error(tmp_path):
    gone = _sim_with(tmp_path / "sim", {"JumpStep": {"rejection_threshold": 3.0}})
    asdf_file = next((gone.crds_path / "references" / "jwst" / "miri").glob("*pars-jumpstep*"))
    asdf_file.unlink()
    done = _cli(["process", gone.uncal, "-o", tmp_path / "out"], gone.env)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert asdf_file.name in line and "--no-crds-pars" in line
    done = _cli(["process", gone.uncal, "-o", tmp_path / "out", "--no-crds-pars"], gone.env)
    assert done.returncode == 0, done.stderr


def test_rules_selecting_on_other_header_keywords_still_match(tmp_path, monkeypatch):
    """A pars rmap may select on any header value (here PROGRAM): it is matched like
    stpipe matches it, from the whole header."""
    from streamdet.simulate.crds_cache import mapping_text

    other = _sim_with(tmp_path / "sim", {"JumpStep": {"rejection_threshold": 3.5}})
    program = str(fits.getval(other.uncal, "PROGRAM"))
    rmap = next((other.crds_path / "mappings" / "jwst").glob("*pars-jumpstep*.rmap"))
    asdf_name = next((other.crds_path / "references" / "jwst" / "miri").glob("*pars-jumpstep*")).name
    header = {"classes": ("Match", "UseAfter"), "derived_from": "test", "file_ext": ".asdf",
              "filekind": "PARS-JUMPSTEP", "instrument": "MIRI", "mapping": "REFERENCE",
              "name": rmap.name, "observatory": "JWST",
              "parkey": (("META.INSTRUMENT.DETECTOR", "META.OBSERVATION.PROGRAM_NUMBER"),
                         ("META.OBSERVATION.DATE", "META.OBSERVATION.TIME"))}
    sel = ("Match({\n    ('MIRIMAGE', " + repr(program) + ") : UseAfter({\n        "
           "'2000-01-01 00:00:00' : " + repr(asdf_name) + ",\n    }),\n})")
    rmap.write_text(mapping_text(header, sel))
    for key, value in other.env.items():
        monkeypatch.setenv(key, value)
    result = process_file(other.uncal, RunConfig(output_dir=tmp_path / "out"))
    assert next(s for s in result.chain if s.name == "jump").params["rejection_threshold"] == 3.5
