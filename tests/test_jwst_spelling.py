"""jwst's ways of giving parameters: ``--steps.STEP.PARAM=VALUE`` on the command line,
its ASDF parameter files as ``--config``, and ``--save-parameters`` writing one jwst
reads back. jwst parameters streamdet does not implement are refused unless they are
at jwst's default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamdet import config as configmod
from streamdet.config import jwst_spelling
from streamdet.core import jwstparams
from streamdet.core.engine import RunConfig, build_chain
from streamdet.core.errors import BadInputError
from streamdet.core.plugins import get_registry
from streamdet.simulate import simulate

from .oracle import last_json, run_python


def _cli(args, env=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "streamdet.cli", *map(str, args)], env=full,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("spell"), subarray="SUB64", ngroups=5, nints=1,
                    seed=5)


def _chain(run: RunConfig) -> dict:
    return {s.name: s for s in build_chain(get_registry(), run)}


def test_steps_spelling_becomes_set():
    assert jwst_spelling(["process", "f.fits", "--steps.jump.rejection_threshold=5",
                          "--steps.firstframe.skip", "true", "--", "--steps.x=1"]) == [
        "process", "f.fits", "--set", "jump.rejection_threshold=5",
        "--set", "firstframe.skip=true", "--", "--steps.x=1"]
    with pytest.raises(BadInputError, match="--steps.jump.rejection_threshold"):
        jwst_spelling(["--steps.jump.rejection_threshold"])


def test_steps_spelling_on_the_command_line(sim, tmp_path):
    done = _cli(["process", sim.uncal, "-o", tmp_path, "-v", "--no-crds-pars",
                 "--steps.jump.rejection_threshold=5", "--steps.firstframe.skip", "false"],
                sim.env)
    assert done.returncode == 0, done.stderr
    text = done.stdout + done.stderr
    assert "jump.rejection_threshold = 5.0  [--set jump.rejection_threshold=5]" in text
    assert "firstframe.skip = False" in text
    done = _cli(["process", sim.uncal, "-o", tmp_path / "x",
                 "--steps.jump.no_such=1"], sim.env)
    assert done.returncode == 2 and "no_such" in done.stderr


@pytest.mark.parametrize("setting, named", [
    ("refpix.side_gain=2", "side_gain"),
    ("persistence.skip=false", "persistence"),
])
def test_unimplemented_jwst_parameters_are_refused_by_name(setting, named):
    with pytest.raises(BadInputError, match=named):
        configmod.load(sets=[setting])


@pytest.mark.parametrize("setting", [
    "jump.use_ellipses=false", "refpix.side_gain=1.0", "persistence.skip=true",
    "ipc.skip=true", "dark_current.average_dark_current=None", "jump.maximum_cores=half",
    "ramp_fit.maximum_cores=2", "jump.output_ext=.fits",
])
def test_jwst_parameters_at_their_default_are_accepted(setting):
    run = configmod.load(sets=[setting])
    _chain(run)  # builds


def test_every_jwst_miri_parameter_name_is_known():
    """Each parameter jwst 3.0 declares for a step streamdet has is either implemented or
    in the jwst table (so it is refused or accepted by value, never unknown)."""
    registry = get_registry()
    for step, params in jwstparams.STEP_PARAMS.items():
        if step not in registry.implementations:
            continue
        cls = registry.implementation(step)
        for name, default in params.items():
            cls.validate_params({name: default})  # accepted at jwst's default


@pytest.mark.parity
def test_config_reads_what_jwst_exports(sim, tmp_path):
    code = f"""
    from jwst.pipeline import Detector1Pipeline
    from jwst.jump import JumpStep
    p = Detector1Pipeline()
    p.jump.rejection_threshold = 5.5
    p.firstframe.skip = False
    p.ramp_fit.suppress_one_group = False
    p.export_config({str(tmp_path / 'd1.asdf')!r})
    JumpStep(three_group_rejection_threshold=7.0).export_config(
        {str(tmp_path / 'jump.asdf')!r}, include_metadata=True)
    """
    run_python(code, sim.env)
    run = configmod.load(tmp_path / "d1.asdf")
    chain = _chain(run)
    assert chain["jump"].params["rejection_threshold"] == 5.5
    assert chain["firstframe"].skip is False
    assert chain["ramp_fit"].params["suppress_one_group"] is False
    assert "emicorr" not in chain or chain["emicorr"].skip  # jwst: skipped by default
    run = configmod.load(tmp_path / "jump.asdf", sets=["jump.rejection_threshold=4.5"])
    chain = _chain(run)
    assert chain["jump"].params["three_group_rejection_threshold"] == 7.0
    assert chain["jump"].params["rejection_threshold"] == 4.5  # the command line wins
    done = _cli(["process", sim.uncal, "-o", tmp_path / "out", "--config", tmp_path / "d1.asdf"],
                sim.env)
    assert done.returncode == 0, done.stderr


@pytest.mark.parity
def test_save_parameters_writes_a_file_jwst_reads(sim, tmp_path):
    saved = tmp_path / "mine.asdf"
    done = _cli(["process", sim.uncal, "-o", tmp_path / "out", "--save-parameters", saved,
                 "--steps.jump.rejection_threshold=6.5", "--set", "firstframe.skip=false",
                 "--set", "ramp_fit.suppress_one_group=false", "--save-ramp"], sim.env)
    assert done.returncode == 0, done.stderr
    code = f"""
    import json
    from jwst.pipeline import Detector1Pipeline
    p = Detector1Pipeline.from_config_file({str(saved)!r})
    print(json.dumps([p.jump.rejection_threshold, p.firstframe.skip,
                      p.ramp_fit.suppress_one_group, p.save_calibrated_ramp,
                      p.output_dir, p.emicorr.skip]))
    """
    got = last_json(run_python(code, sim.env))
    assert got == [6.5, False, False, True, str(tmp_path / "out"), True]
    # and it reads back here the same
    chain = _chain(configmod.load(saved))
    assert chain["jump"].params["rejection_threshold"] == 6.5
    assert chain["firstframe"].skip is False


def test_save_parameters_refuses_what_jwst_cannot_say(tmp_path):
    run = RunConfig(params={"jump": {"rejection_threshold": 5.0}})
    configmod.save_parameters(tmp_path / "ok.asdf", run)
    back = jwstparams.read_parameter_file(tmp_path / "ok.asdf")
    assert back.steps["jump"]["rejection_threshold"] == 5.0
    assert back.class_name == jwstparams.PIPELINE_CLASS
    with pytest.raises(BadInputError, match="no jwst equivalent"):
        configmod.save_parameters(tmp_path / "bad.asdf", RunConfig(params={"row_median": {"skip": False}}))


def test_python_api_refuses_what_it_cannot_honour(sim, tmp_path, monkeypatch):
    import streamdet

    for key, value in sim.env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(BadInputError, match="persistence"):
        streamdet.process(sim.uncal, tmp_path, steps={"persistence": {"skip": False}})
    with pytest.raises(BadInputError, match="no_such_step"):
        streamdet.process(sim.uncal, tmp_path, steps={"no_such_step": {"skip": True}})
    with pytest.raises(BadInputError, match="side_gain"):
        streamdet.process(sim.uncal, tmp_path, steps={"refpix": {"side_gain": 2.0}})
    assert not list(tmp_path.glob("*.fits"))
    done = streamdet.process(sim.uncal, tmp_path, steps={"ipc": {"skip": True},
                                                         "refpix": {"side_gain": 1.0}})
    assert done["rate"].exists()


def test_parameter_files_that_are_not_for_detector1_are_bad_input(tmp_path):
    import asdf

    other = tmp_path / "resample.asdf"
    asdf.AsdfFile({"class": "jwst.resample.resample_step.ResampleStep", "name": "resample",
                   "parameters": {"pixfrac": 0.5}}).write_to(str(other))
    with pytest.raises(BadInputError, match="ResampleStep"):
        configmod.load(other)
    broken = tmp_path / "broken.asdf"
    broken.write_bytes(b"#ASDF 1.0.0\n%YAML 1.1\n--- [unclosed\n")
    with pytest.raises(BadInputError, match="broken.asdf"):
        configmod.load(broken)
    done = _cli(["process", "nothing_uncal.fits", "--config", broken])
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
