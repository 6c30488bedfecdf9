"""The products as files: what stdatamodels and jwst find in them, streamed and in-memory
writing agreeing, saved ramps (``--save-ramp``, ``--save-after``), resuming from them,
and the product writer's safety rules (mode, never over the input, any file name)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from streamdet.core.engine import RunConfig, process_file
from streamdet.core.products import JWST_MIRI_REFERENCES, JWST_MIRI_STEPS
from streamdet.simulate import simulate

CLI = [sys.executable, "-m", "streamdet.cli"]
ARRAYS = ("SCI", "ERR", "DQ", "VAR_POISSON", "VAR_RNOISE")
#: what may differ between two runs' products of the same input
RUN_DEPENDENT = {"DATE", "FILENAME"}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("sim"), subarray="SUB64", ngroups=6, nints=3, seed=3)


@pytest.fixture
def crds_env(sim, monkeypatch):
    for key, value in sim.env.items():
        monkeypatch.setenv(key, value)
    return sim.env


@pytest.fixture(scope="module")
def cli_env(sim):
    out = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    out.update(sim.env)
    return out


def run_cli(args, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def headers_without(path: Path, ext, drop=RUN_DEPENDENT) -> dict:
    with fits.open(path) as hdul:
        return {k: v for k, v in hdul[ext].header.items() if k not in drop}


def assert_same_arrays(a: Path, b: Path, extensions=ARRAYS) -> None:
    with fits.open(a) as x, fits.open(b) as y:
        for ext in extensions:
            np.testing.assert_array_equal(x[ext].data, y[ext].data, err_msg=ext)


# -- what the products hold -------------------------------------------------------------

def test_products_are_jwst_models_with_metadata_and_provenance(sim, crds_env, tmp_path):
    from stdatamodels.jwst import datamodels

    config = RunConfig(output_dir=tmp_path, params={"jump": {"rejection_threshold": 5.0}})
    products = process_file(sim.uncal, config).products
    for kind, model_type in (("rate", "ImageModel"), ("rateints", "CubeModel")):
        with fits.open(products[kind]) as hdul:
            assert "ASDF" in hdul, kind
            primary = hdul[0].header
            assert primary["DATAMODL"] == model_type
            assert primary["FILENAME"] == products[kind].name
            assert primary["CAL_VER"].startswith("streamdet ")
            assert primary["CAL_VCS"].startswith("streamdet ")
            assert primary["FILETYPE"] != "uncalibrated"
            statuses = {k for k in primary if k.startswith("S_")}
            assert statuses == {keyword for _, keyword in JWST_MIRI_STEPS}, kind
            assert "S_SUPERB" not in primary
            assert {k for k in primary if k.startswith("R_")} >= set(JWST_MIRI_REFERENCES)
            assert primary["R_IPC"] == primary["R_SUPERB"] == "N/A"
            with fits.open(sim.uncal) as uncal:  # the input's metadata carried over
                for key in ("PROGRAM", "TARGNAME", "FILTER", "SUBSTRT2", "EXPSTART"):
                    assert primary[key] == uncal[0].header[key], key
                for key in ("CRPIX1", "PA_V3", "V3I_YANG", "XREF_SCI"):
                    assert hdul["SCI"].header[key] == uncal["SCI"].header[key], key
        model = datamodels.open(products[kind])
        assert type(model).__name__ == model_type
        model.validate()
        jump = next(s for s in model.instance["streamdet"]["steps"] if s["step"] == "jump")
        assert jump["parameters"] == {"rejection_threshold": 5.0}
        assert jump["implementation"] == "builtin" and jump["status"] == "COMPLETE"
        firstframe = next(s for s in model.instance["streamdet"]["steps"] if s["step"] == "firstframe")
        assert firstframe["status"] == "SKIPPED" and firstframe["parameters"] == {}
        assert any("rejection_threshold" in line for line in model.instance["cal_logs"]["streamdet"])
        model.close()


def test_streamed_rateints_equal_the_in_memory_ones(sim, crds_env, tmp_path):
    """rateints beyond ``rateints_in_memory_bytes`` are streamed from scratch files: the
    file must be the one the in-memory path writes."""
    memory = process_file(sim.uncal, RunConfig(output_dir=tmp_path / "memory")).products
    streamed = process_file(sim.uncal, RunConfig(output_dir=tmp_path / "streamed",
                                                 rateints_in_memory_bytes=0)).products
    assert_same_arrays(memory["rateints"], streamed["rateints"])
    for ext in (0, "SCI", "DQ", "INT_TIMES"):
        assert headers_without(memory["rateints"], ext) == headers_without(streamed["rateints"], ext)
    with fits.open(memory["rateints"]) as a, fits.open(streamed["rateints"]) as b:
        assert [h.name for h in a] == [h.name for h in b]
        np.testing.assert_array_equal(a["INT_TIMES"].data, b["INT_TIMES"].data)


# -- saved ramps and resuming ---------------------------------------------------------------

def test_saved_ramp_is_a_ramp_model_without_s_ramp(sim, crds_env, tmp_path):
    from stdatamodels.jwst import datamodels

    products = process_file(sim.uncal, RunConfig(output_dir=tmp_path, save_ramp=True,
                                                 save_after=("jump", "saturation"))).products
    with fits.open(products["ramp"]) as ramp, fits.open(sim.uncal) as uncal:
        assert [h.name for h in ramp] == ["PRIMARY", "SCI", "PIXELDQ", "GROUPDQ", "AVDRKCUR",
                                          "GROUP", "INT_TIMES", "ASDF"]
        assert "S_RAMP" not in ramp[0].header and "S_GANSCL" not in ramp[0].header
        assert ramp[0].header["S_JUMP"] == "COMPLETE"
        assert ramp[0].header["S_PERSIS"] == "SKIPPED"  # jwst's steps before ramp_fit
        assert ramp["SCI"].data.shape == uncal["SCI"].data.shape
        assert np.any(ramp["AVDRKCUR"].data != 0)
        np.testing.assert_array_equal(ramp["GROUP"].data, uncal["GROUP"].data)
    with fits.open(products["jump"]) as jump, fits.open(products["ramp"]) as ramp:
        # nothing runs between jump and ramp_fit: the same ramp
        for ext in ("SCI", "PIXELDQ", "GROUPDQ", "AVDRKCUR"):
            np.testing.assert_array_equal(jump[ext].data, ramp[ext].data)
        assert "S_PERSIS" not in jump[0].header  # jwst's _jump.fits stops at jump
    with fits.open(products["saturation"]) as saturation:
        header = saturation[0].header
        assert header["S_SATURA"] == "COMPLETE" and "S_LINEAR" not in header
        assert products["saturation"].name.endswith("_saturation.fits")
    datamodels.open(products["saturation"]).validate()


@pytest.mark.parametrize("saved", ["jump", "dark_current", "dq_init", "ramp"])
def test_resume_from_a_saved_ramp_gives_the_direct_rate(sim, crds_env, tmp_path, saved):
    """uncal -> save the ramp after a step -> process that file: only the steps still to
    do run, and the rate products are those of the direct run."""
    config = RunConfig(output_dir=tmp_path / "direct", save_ramp=saved == "ramp",
                       save_after=() if saved == "ramp" else (saved,))
    direct = process_file(sim.uncal, config)
    resumed = process_file(direct.products[saved], RunConfig(output_dir=tmp_path / "resumed"))
    ran = [s.name for s in resumed.chain if not s.skip]
    if saved in ("jump", "ramp"):
        assert ran == ["ramp_fit"]
    elif saved == "dark_current":
        assert ran == ["jump", "ramp_fit"]  # refpix: subarray, skipped either way
    else:
        assert "dq_init" not in ran and "saturation" in ran
    from stdatamodels.jwst import datamodels

    with datamodels.open(resumed.products["rate"]) as model:
        earlier = model.instance["streamdet"]["resumed_from"]  # the run that saved it
        now = {s["step"]: s["status"] for s in model.instance["streamdet"]["steps"]}
    assert {s["step"]: s["status"] for s in earlier["steps"]}["dq_init"] == "COMPLETE"
    assert now["dq_init"] == "DONE IN INPUT" and now["ramp_fit"] == "COMPLETE"
    for kind in ("rate", "rateints"):
        assert_same_arrays(direct.products[kind], resumed.products[kind])
        for ext in (0, "SCI"):
            ours, theirs = (headers_without(direct.products[kind], ext),
                            headers_without(resumed.products[kind], ext))
            assert ours == theirs, {k: (ours.get(k), theirs.get(k))
                                    for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}


# -- the writer's safety rules (issue 11, findings 6 and 11) -------------------------------

def test_saved_ramp_has_the_mode_of_the_other_products(sim, cli_env, tmp_path):
    result = run_cli(["process", sim.uncal, "-o", tmp_path, "--save-ramp"], cli_env, tmp_path)
    assert result.returncode == 0, result.stderr
    modes = {p.name.rsplit("_", 1)[1]: p.stat().st_mode & 0o777 for p in tmp_path.glob("*.fits")}
    assert modes["ramp.fits"] == modes["rate.fits"] == modes["rateints.fits"], modes
    umask = os.umask(0)
    os.umask(umask)
    assert modes["rate.fits"] == 0o666 & ~umask


def test_save_ramp_overwrite_never_replaces_the_input(sim, cli_env, tmp_path):
    named_ramp = tmp_path / "jw09999001001_01101_00001_mirimage_ramp.fits"
    shutil.copy(sim.uncal, named_ramp)
    before = named_ramp.read_bytes()
    result = run_cli(["process", named_ramp, "--save-ramp", "--overwrite"], cli_env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "would replace the input" in result.stderr
    assert "Traceback" not in result.stderr
    assert named_ramp.read_bytes() == before
    assert not list(tmp_path.glob("*_rate*.fits"))


def test_non_ascii_input_name_is_processed_and_recorded_fits_safe(sim, cli_env, tmp_path):
    odd = tmp_path / "jw09999001001_01101_00001_mirimage_é–x_uncal.fits"
    shutil.copy(sim.uncal, odd)
    gain = tmp_path / "gäin.fits"  # a reference path is recorded in R_GAIN
    shutil.copy(sim.refs["gain"], gain)
    result = run_cli(["process", odd, "-o", tmp_path / "out", "--override", f"gain={gain}"],
                     cli_env, tmp_path)
    assert result.returncode == 0, result.stderr
    rate = tmp_path / "out" / "jw09999001001_01101_00001_mirimage_é–x_rate.fits"
    with fits.open(rate) as hdul:
        recorded = hdul[0].header["FILENAME"]
        assert hdul[0].header["R_GAIN"].endswith("/g\\xe4in.fits")
    assert recorded.isascii() and recorded.isprintable()
    assert recorded == "jw09999001001_01101_00001_mirimage_\\xe9\\u2013x_rate.fits"


def test_input_values_the_schema_refuses_are_listed_not_carried(sim, crds_env, tmp_path):
    from stdatamodels.jwst import datamodels

    odd = tmp_path / "odd_uncal.fits"
    shutil.copy(sim.uncal, odd)
    with fits.open(odd, mode="update") as hdul:
        hdul[0].header["EXPSTART"] = "not a date"
    products = process_file(odd, RunConfig(output_dir=tmp_path / "out")).products
    assert "EXPSTART" not in fits.getheader(products["rate"])
    with datamodels.open(products["rate"]) as model:
        rejected = model.instance["streamdet"]["input_values_not_carried"]
    assert len(rejected) == 1 and "meta.exposure.start_time" in rejected[0]


@pytest.mark.parametrize("step, message", [("nosuch", "no such step"),
                                           ("ramp_fit", "makes the rate products")])
def test_save_after_a_step_that_cannot_be_saved_is_bad_input(sim, crds_env, tmp_path, step, message):
    from streamdet.core.errors import BadInputError

    with pytest.raises(BadInputError, match=message):
        process_file(sim.uncal, RunConfig(output_dir=tmp_path, save_after=(step,)))
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_writing_products_leaves_the_callers_warning_filters_alone(sim, cli_env, tmp_path):
    """astropy's "Card is too long" warnings from writing the products (rate, rateints,
    a saved ramp, fitopt) never reach the caller, even when streamdet's modules were
    first imported inside someone's ``warnings.catch_warnings()`` block (which took a
    filter installed at import time away with it); and the caller's filters are the same
    after the run as before."""
    code = f"""
import json, warnings
from pathlib import Path
with warnings.catch_warnings():
    from streamdet.core import products  # first imported here, as inside a test's block
from streamdet.core.engine import RunConfig, process_file

def run(out):
    config = RunConfig(output_dir=Path(out), save_ramp=True,
                       params={{"ramp_fit": {{"save_opt": True}}}})
    return process_file(Path({str(sim.uncal)!r}), config)

run({str(tmp_path / "warm")!r})  # every import done before the recorded run
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    before = list(warnings.filters)
    result = run({str(tmp_path / "recorded")!r})
    after = list(warnings.filters)
print(json.dumps({{"long_cards": [str(w.message) for w in caught
                                  if "Card is too long" in str(w.message)],
                  "filters_kept": before == after, "products": sorted(result.products)}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["products"] == ["fitopt", "ramp", "rate", "rateints"]
    assert report["long_cards"] == []
    assert report["filters_kept"]


def test_output_paths_name_every_product_as_jwst_does(tmp_path):
    from streamdet.core.products import output_paths, product_path

    src = tmp_path / "in" / "jw01_mirimage_uncal.fits"
    assert output_paths(src) == {"rate": tmp_path / "in" / "jw01_mirimage_rate.fits",
                                 "rateints": tmp_path / "in" / "jw01_mirimage_rateints.fits"}
    got = output_paths(src, tmp_path / "out", save_ramp=True, save_after=("jump", "jump"),
                       extra=("fitopt",))
    assert list(got) == ["rate", "rateints", "ramp", "jump", "fitopt"]
    assert got["jump"] == tmp_path / "out" / "jw01_mirimage_jump.fits"
    # a saved ramp's products are named after the exposure, not after the ramp
    assert product_path(tmp_path, "jw01_mirimage_jump.fits", "rate") == \
        tmp_path / "jw01_mirimage_rate.fits"
