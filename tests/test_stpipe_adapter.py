"""Published stpipe steps inside the chain (streamdet/plugins/stpipe_adapter.py): snowblind
as jwst's post-hook of jump, at parity with jwst running the same hook; jwst's own
RefPixStep replacing the built-in refpix; references, parameters, logs and errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from streamdet.simulate import simulate

from .oracle import assert_parity, run_python

pytest.importorskip("snowblind")

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "streamdet.cli"]
HOOK = "jump=snowblind.SnowblindStep"


def run_cli(args, env, cwd) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    return subprocess.run([*CLI, *map(str, args)], env=full, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def one_error_line(result) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("streamdet: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def snowball_sim(tmp_path_factory):
    # the simulator's own large events (showers and snowballs, deterministic from the
    # seed), as the issue asks
    return simulate(tmp_path_factory.mktemp("sim"), subarray="SUB128", ngroups=10, nints=3,
                    seed=16, large_events=True)


def jwst_with_hook(sim, outdir: Path, hook_args: dict) -> dict[str, Path]:
    """jwst's Detector1Pipeline with SnowblindStep(**hook_args) as post-hook of jump."""
    outdir.mkdir(parents=True, exist_ok=True)
    run_python(f"""
    import snowblind
    from jwst.pipeline import Detector1Pipeline
    hook = snowblind.SnowblindStep(**{hook_args!r})
    Detector1Pipeline.call({str(sim.uncal)!r}, output_dir={str(outdir)!r}, save_results=True,
                           steps={{"jump": {{"post_hooks": [hook]}}}})
    """, sim.env)
    stem = sim.uncal.name.replace("_uncal.fits", "")
    return {kind: outdir / f"{stem}_{kind}.fits" for kind in ("rate", "rateints")}


def jumps(path: Path) -> int:
    with fits.open(path) as hdul:
        return int(np.count_nonzero(hdul["DQ"].data & 4))


@pytest.mark.parity
@pytest.mark.parametrize("hook_args", [{}, {"min_radius": 1, "growth_factor": 1.5,
                                            "ring_width": 1.0, "after_jumps": 1}],
                         ids=["defaults", "non_default"])
def test_snowblind_post_hook_matches_jwst(snowball_sim, tmp_path, hook_args):
    sim = snowball_sim
    theirs = jwst_with_hook(sim, tmp_path / "jwst", hook_args)
    sets = [a for k, v in hook_args.items() for a in ("--set", f"snowblind.{k}={v}")]
    result = run_cli(["process", sim.uncal, "-o", tmp_path / "sd", "--post-hook", HOOK, *sets],
                     sim.env, tmp_path)
    assert result.returncode == 0, result.stderr
    stem = sim.uncal.name.replace("_uncal.fits", "")
    ours = {kind: tmp_path / "sd" / f"{stem}_{kind}.fits" for kind in ("rate", "rateints")}
    plain = run_cli(["process", sim.uncal, "-o", tmp_path / "plain", "-q"], sim.env, tmp_path)
    assert plain.returncode == 0, plain.stderr
    # snowblind acted: it grew the large events' jump flags
    assert jumps(ours["rate"]) > jumps(tmp_path / "plain" / f"{stem}_rate.fits") + 100
    for kind in ("rate", "rateints"):
        assert_parity(ours[kind], theirs[kind])
    with fits.open(ours["rate"]) as a, fits.open(theirs["rate"]) as b:
        # EXTNCRS: snowblind's count of large events over the whole exposure, combined
        # from the integrations it was handed one at a time
        assert b[0].header["EXTNCRS"] > 0
        assert a[0].header["EXTNCRS"] == pytest.approx(b[0].header["EXTNCRS"], rel=1e-9)
        assert a[0].header["S_SNOWBL"] == "COMPLETE"
        assert any("snowblind=stpipe:snowblind.SnowblindStep (snowblind" in h
                   for h in a[0].header["HISTORY"])


def test_config_file_hooks_and_whole_exposure_granularity(snowball_sim, tmp_path):
    """``[steps.jump] post_hooks`` in the configuration file (or ``--set
    jump.post_hooks=...``) is the same hook as ``--post-hook``; handing
    snowblind the whole exposure at once (with a warning saying what it costs) gives the
    same products as one integration at a time."""
    sim = snowball_sim
    config = tmp_path / "run.toml"
    config.write_text('[steps.jump]\npost_hooks = ["snowblind.SnowblindStep"]\n'
                      '[steps.snowblind]\nmin_radius = 2\n')
    by_file = run_cli(["process", sim.uncal, "-o", tmp_path / "file", "--config", config],
                      sim.env, tmp_path)
    assert by_file.returncode == 0, by_file.stderr
    by_set = run_cli(["process", sim.uncal, "-o", tmp_path / "set", "--set",
                      "jump.post_hooks=snowblind.SnowblindStep", "--set", "snowblind.min_radius=2"],
                     sim.env, tmp_path)
    assert by_set.returncode == 0, by_set.stderr
    whole = run_cli(["process", sim.uncal, "-o", tmp_path / "whole", "--post-hook", HOOK,
                     "--set", "snowblind.min_radius=2", "--set", "snowblind.granularity=exposure"],
                    sim.env, tmp_path)
    assert whole.returncode == 0, whole.stderr
    assert "streamdet: snowblind: snowblind.granularity=exposure: the whole exposure is in " \
           "memory at once" in whole.stderr
    assert "memory at once" not in by_file.stderr
    stem = sim.uncal.name.replace("_uncal.fits", "")
    for kind, other in [(k, o) for k in ("rate", "rateints") for o in ("whole", "set")]:
        a, b = tmp_path / "file" / f"{stem}_{kind}.fits", tmp_path / other / f"{stem}_{kind}.fits"
        with fits.open(a) as ha, fits.open(b) as hb:
            for ext in ("SCI", "ERR", "DQ", "VAR_POISSON", "VAR_RNOISE"):
                assert np.array_equal(ha[ext].data, hb[ext].data, equal_nan=True), ext
            assert ha[0].header["EXTNCRS"] == pytest.approx(hb[0].header["EXTNCRS"], rel=1e-12)


@pytest.mark.parity
def test_jwst_refpix_replaces_builtin_at_parity(tmp_path):
    """jwst's own RefPixStep through the adapter, on a full frame, against the built-in
    refpix (which is at parity with jwst)."""
    sim = simulate(tmp_path / "sim", subarray="FULL", ngroups=8, nints=2, seed=11)
    runs = {}
    for name, extra in (("adapter", ["--use", "refpix=stpipe:jwst.refpix.RefPixStep"]),
                        ("builtin", []), ("none", ["--skip", "refpix"])):
        result = run_cli(["process", sim.uncal, "-o", tmp_path / name, "-q", *extra], sim.env,
                         tmp_path)
        assert result.returncode == 0, result.stderr
        runs[name] = tmp_path / name / sim.uncal.name.replace("_uncal", "_rate")
    assert_parity(runs["adapter"], runs["builtin"])
    assert_parity(runs["adapter"].with_name(runs["adapter"].name.replace("_rate", "_rateints")),
                  runs["builtin"].with_name(runs["builtin"].name.replace("_rate", "_rateints")))
    with pytest.raises(AssertionError):  # the correction is not a no-op on this exposure
        assert_parity(runs["none"], runs["builtin"])
    with fits.open(runs["adapter"]) as hdul:
        assert hdul[0].header["S_REFPIX"] == "COMPLETE"
        assert "streamdet: refpix=stpipe:jwst.refpix.RefPixStep (jwst 3.0.0)" in \
            [str(h) for h in hdul[0].header["HISTORY"]]


@pytest.fixture(scope="module")
def small_sim(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("sim"), subarray="SUB64", ngroups=5, nints=2, seed=3)


def test_references_logs_and_pieces(small_sim, tmp_path):
    """The step's get_reference_file is served by streamdet (CRDS, then --override); its
    log lines reach streamdet's log under its alias; it gets one integration at a time
    with the exposure's metadata."""
    sim = small_sim
    hook = "jump=tests.stpipe_steps.RecordGain"
    crds = run_cli(["process", sim.uncal, "-o", tmp_path / "a", "--post-hook", hook,
                    "--set", "record_gain.label=GAIN"], sim.env, tmp_path)
    assert crds.returncode == 0, crds.stderr
    lines = [l for l in crds.stderr.splitlines() if l.startswith("streamdet: record_gain:")]
    gain = Path(sim.env["CRDS_PATH"]) / "references" / "jwst" / "miri"
    assert lines == [f"streamdet: record_gain: GAIN reference {p}, integrations {i}-{i} of 2, "
                     f"data (1, 5, 64, 72)"
                     for p, i in zip([sorted(gain.glob('*gain*.fits'))[0]] * 2, (1, 2))], crds.stderr
    own = tmp_path / "my_gain.fits"
    own.write_bytes(sorted(gain.glob("*gain*.fits"))[0].read_bytes())
    override = run_cli(["process", sim.uncal, "-o", tmp_path / "b", "--post-hook", hook,
                        "--override", f"gain={own}"], sim.env, tmp_path)
    assert override.returncode == 0, override.stderr
    assert f"gain reference {own}, integrations 1-1" in override.stderr
    quiet = run_cli(["process", sim.uncal, "-o", tmp_path / "c", "-q", "--post-hook", hook],
                    sim.env, tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_steps_lists_the_hooked_step(small_sim, tmp_path):
    result = run_cli(["steps", "--post-hook", HOOK], small_sim.env, tmp_path)
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert names[names.index("jump") + 1] == "snowblind"
    row = next(l for l in result.stdout.splitlines() if l.startswith("snowblind"))
    assert "stpipe:snowblind.SnowblindStep" in row and "min_radius=4" in row


@pytest.mark.parametrize("args, code, words", [
    (["--post-hook", "jump=nosuchpkg.Step"], 2, ["'nosuchpkg.Step' cannot be imported"]),
    (["--post-hook", "jump=tests.stpipe_steps.NotAStep"], 2,
     ["'tests.stpipe_steps.NotAStep' is not an stpipe Step class"]),
    (["--post-hook", "jupm=snowblind.SnowblindStep"], 2, ["unknown step 'jupm'"]),
    (["--post-hook", HOOK, "--set", "snowblind.min_radius=wide"], 2,
     ["snowblind.min_radius", "'wide'"]),
    (["--post-hook", HOOK, "--set", "snowblind.nope=1"], 2, ["no parameter 'nope'"]),
    (["--pre-hook", "ramp_fit=tests.stpipe_steps.Crash"], 1,
     ["stpipe step tests.stpipe_steps.Crash failed on integration 1",
      "RuntimeError: boom in the third-party step"]),
])
def test_bad_hooks_are_one_line(small_sim, tmp_path, args, code, words):
    result = run_cli(["process", small_sim.uncal, "-o", tmp_path / "out", *args],
                     small_sim.env, tmp_path)
    assert result.returncode == code, result.stderr
    line = one_error_line(result)
    for word in words:
        assert word in line, line
    assert not list((tmp_path / "out").glob("*.fits")) if (tmp_path / "out").exists() else True


def test_post_hook_of_ramp_fit_gets_the_rate_models(snowball_sim, tmp_path):
    """A hook after ramp_fit is handed the rate image (ImageModel) and the rateints cube
    (CubeModel, one integration at a time, from memory or from the scratch files): the
    products equal snowblind run by hand on the products of a plain run."""
    import snowblind
    from stdatamodels.jwst import datamodels

    from streamdet.core.engine import RunConfig, process_file
    from streamdet.testing import crds_environment

    sim = snowball_sim
    by_cli = run_cli(["process", sim.uncal, "-o", tmp_path / "cli", "-q",
                      "--post-hook", "ramp_fit=snowblind.SnowblindStep"], sim.env, tmp_path)
    assert by_cli.returncode == 0, by_cli.stderr
    with crds_environment(sim):
        spilled = process_file(sim.uncal, RunConfig(
            output_dir=tmp_path / "spilled", rateints_in_memory_bytes=0,
            hooks=[("post", "ramp_fit", "snowblind.SnowblindStep")])).products
        plain = process_file(sim.uncal, RunConfig(output_dir=tmp_path / "plain")).products
    stem = sim.uncal.name.replace("_uncal.fits", "")
    for kind, model_class in (("rate", datamodels.ImageModel), ("rateints", datamodels.CubeModel)):
        with model_class(str(plain[kind])) as model:
            by_hand = snowblind.SnowblindStep.call(model)
            grown = np.count_nonzero(by_hand.dq & 4) - np.count_nonzero(model.dq & 4)
            assert grown > 100, kind  # snowblind grew the large events on the rate products
            for ours in (tmp_path / "cli" / f"{stem}_{kind}.fits", spilled[kind]):
                with fits.open(ours) as hdul:
                    assert np.array_equal(hdul["DQ"].data, by_hand.dq), (kind, ours)
                    assert np.array_equal(hdul["SCI"].data, by_hand.data, equal_nan=True)
                    assert hdul[0].header["S_SNOWBL"] == "COMPLETE"


@pytest.mark.parity
def test_jwst_dq_init_replaces_builtin_bit_for_bit(small_sim, tmp_path):
    """jwst's DQInitStep through ``--use`` (its mask from CRDS through streamdet's
    resolver) gives the built-in dq_init's products exactly, and the product records the
    reference as streamdet resolved it (crds://...), not the path stpipe was handed."""
    sim = small_sim
    for name, extra in (("adapter", ["--use", "dq_init=stpipe:jwst.dq_init.DQInitStep"]),
                        ("builtin", [])):
        result = run_cli(["process", sim.uncal, "-o", tmp_path / name, "-q", *extra],
                         sim.env, tmp_path)
        assert result.returncode == 0, result.stderr
    for kind in ("rate", "rateints"):
        name = sim.uncal.name.replace("_uncal", f"_{kind}")
        with fits.open(tmp_path / "adapter" / name) as a, fits.open(tmp_path / "builtin" / name) as b:
            for ext in ("SCI", "ERR", "DQ", "VAR_POISSON", "VAR_RNOISE"):
                assert np.array_equal(a[ext].data, b[ext].data, equal_nan=True), ext
            for key in ("S_DQINIT", "R_MASK", "CRDS_CTX"):
                assert a[0].header[key] == b[0].header[key], key
            assert a[0].header["R_MASK"].startswith("crds://")


@pytest.mark.parity
def test_exotic_miri_pre_hook_matches_jwst(tmp_path):
    """ExoTiC-MIRI's DropGroupsStep (LRS slitless only) as jwst's pre-hook of jump, its
    list parameter given as strun takes it (``2,3``): at parity with jwst running it."""
    pytest.importorskip("exotic_miri")
    sim = simulate(tmp_path / "sim", subarray="SUB128", ngroups=10, nints=2, seed=7)
    with fits.open(sim.uncal, mode="update") as hdul:
        hdul[0].header["EXP_TYPE"] = "MIR_LRS-SLITLESS"
    (tmp_path / "jwst").mkdir()
    run_python(f"""
    from exotic_miri.stage_1 import DropGroupsStep
    from jwst.pipeline import Detector1Pipeline
    hook = DropGroupsStep(drop_groups=[2, 3])
    Detector1Pipeline.call({str(sim.uncal)!r}, output_dir={str(tmp_path / 'jwst')!r},
                           save_results=True, steps={{"jump": {{"pre_hooks": [hook]}}}})
    """, sim.env)
    result = run_cli(["process", sim.uncal, "-o", tmp_path / "sd", "-q", "--pre-hook",
                      "jump=exotic_miri.stage_1.DropGroupsStep",
                      "--set", "dropgroupsstep.drop_groups=2,3"], sim.env, tmp_path)
    assert result.returncode == 0, result.stderr
    plain = run_cli(["process", sim.uncal, "-o", tmp_path / "plain", "-q"], sim.env, tmp_path)
    assert plain.returncode == 0, plain.stderr
    for kind in ("rate", "rateints"):
        name = sim.uncal.name.replace("_uncal", f"_{kind}")
        assert_parity(tmp_path / "sd" / name, tmp_path / "jwst" / name)
        with pytest.raises(AssertionError):  # dropping the groups changed the products
            assert_parity(tmp_path / "plain" / name, tmp_path / "jwst" / name)


def test_replacement_takes_parameters_by_its_alias(small_sim, tmp_path):
    """``--use refpix=stpipe:...RecordGain``: the step serves refpix (its log lines come
    as ``refpix``) and takes ``--set record_gain.PARAM`` (its class_alias) as well as
    ``--set refpix.PARAM``."""
    sim = small_sim
    for key in ("record_gain", "refpix"):
        result = run_cli(["process", sim.uncal, "-o", tmp_path / key, "--use",
                          "refpix=stpipe:tests.stpipe_steps.RecordGain",
                          "--set", f"{key}.label=BY_{key.upper()}"], sim.env, tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"streamdet: refpix: BY_{key.upper()} reference " in result.stderr, result.stderr
