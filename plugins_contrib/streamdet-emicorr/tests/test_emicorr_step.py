"""The emicorr step in streamdet's chain, on simulated MIRI exposures with EMI injected.

Stripe amplitude: the rms over rows of each row's median of ``rate - truth`` (DN/s). The
EMI lines of these simulations run along rows (a cycle spans ~61 rows in BRIGHTSKY at
10 Hz, ~48 rows in SUB256 at 218 Hz), so uncorrected EMI shows up as that number.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from streamdet.core.engine import RunConfig, process_file
from streamdet.core.plugins import build_registry
from streamdet.simulate import SimParams, simulate
from streamdet.testing import crds_environment, run_chain
from streamdet_emicorr import builtin_table, correct_exposure, write_reference
from streamdet_emicorr.kernel import Readout

EXTENSIONS = ("SCI", "ERR", "DQ", "VAR_POISSON", "VAR_RNOISE")

#: BRIGHTSKY: the table's 10 Hz line at 20 DN, and a 390.625 Hz line at 4 DN (in phase in
#: every group of BRIGHTSKY, so it leaves the slopes alone and the table does not fit it)
BRIGHTSKY_EMI = SimParams(emi_frequencies_hz=(10.039216, 390.625), emi_amplitudes_dn=(20.0, 4.0),
                          emi_phases_rad=(1.0, 2.0))
#: SUB256: a 218.52055 Hz line at 10 DN (about half a cycle per group)
SUB256_EMI = SimParams(emi_frequencies_hz=(218.52055,), emi_amplitudes_dn=(10.0,),
                       emi_phases_rad=(2.5,))


def stripe_amplitude(rate: Path, truth: Path) -> float:
    residual = fits.getdata(rate, "SCI").astype(np.float64) - fits.getdata(truth)
    keep = np.isfinite(residual) & (np.abs(residual) < 50)
    rows = [np.median(residual[y][keep[y]]) for y in range(residual.shape[0]) if keep[y].any()]
    return float(np.std(rows))


def same_products(a: Path, b: Path) -> None:
    with fits.open(a) as x, fits.open(b) as y:
        for ext in EXTENSIONS:
            np.testing.assert_array_equal(x[ext].data, y[ext].data, err_msg=ext)


def fitted_line(step, name):
    (line,) = [f for f in step.fitted if f.name == name]
    amp, off = float(line.amplitudes[0]), float(line.offsets[0])
    if amp < 0:  # -A at phase p is +A at phase p + 1/2
        amp, off = -amp, off + 0.5
    return amp, off % 1


def cycles(phase_rad: float) -> float:
    return (phase_rad / (2 * math.pi)) % 1


def phase_gap(a: float, b: float) -> float:
    return abs((a - b + 0.5) % 1 - 0.5)


@pytest.fixture(scope="module")
def brightsky(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("emi-brightsky"), subarray="BRIGHTSKY", ngroups=10,
                    nints=2, seed=1, params=BRIGHTSKY_EMI)


@pytest.fixture(scope="module")
def brightsky_runs(brightsky, tmp_path_factory):
    """The BRIGHTSKY exposure through the chain with emicorr off (default) and on."""
    out = tmp_path_factory.mktemp("emi-brightsky-runs")
    return {"off": run_chain(brightsky.uncal, out / "off", sim=brightsky),
            "on": run_chain(brightsky.uncal, out / "on", sim=brightsky,
                            steps={"emicorr": {"skip": False}})}


@pytest.fixture(scope="module")
def sub256(tmp_path_factory):
    emi = simulate(tmp_path_factory.mktemp("emi-sub256"), subarray="SUB256", ngroups=10,
                   nints=2, seed=2, params=SUB256_EMI)
    clean = simulate(tmp_path_factory.mktemp("clean-sub256"), subarray="SUB256", ngroups=10,
                     nints=2, seed=2)
    return emi, clean


def streamdet_command() -> list[str]:
    """The installed ``streamdet`` console script (or the same entry point via Python)."""
    exe = shutil.which("streamdet")
    return [exe] if exe else [sys.executable, "-c", "from streamdet.cli import main; main()"]


def emicorr_of(result):
    return next(s for s in result.chain if s.name == "emicorr")


# --- the chain --------------------------------------------------------------------------
def test_chain_order_and_default():
    order = build_registry().order
    assert order.index("emicorr") == order.index("dq_init") + 1
    assert order.index("saturation") == order.index("emicorr") + 1
    out = subprocess.run([*streamdet_command(), "steps"], capture_output=True, text=True,
                         check=True).stdout
    names = [line.split()[0] for line in out.splitlines()[1:] if line.strip()]
    assert names[names.index("emicorr") + 1] == "saturation"
    line = next(line for line in out.splitlines() if line.startswith("emicorr"))
    assert "streamdet-emicorr" in line and "True" in line.split()


def test_off_by_default_changes_nothing(brightsky, brightsky_runs, tmp_path):
    with_plugin = brightsky_runs["off"]
    assert emicorr_of(with_plugin).skip
    registry = build_registry()
    registry.order.remove("emicorr")
    registry.implementations.pop("emicorr")
    with crds_environment(brightsky):
        without = process_file(brightsky.uncal, RunConfig(output_dir=tmp_path / "without",
                                                         overwrite=True), registry=registry)
    assert "emicorr" not in [s.name for s in without.chain]
    for kind in ("rate", "rateints"):
        same_products(with_plugin.products[kind], without.products[kind])
    assert fits.getval(with_plugin.products["rate"], "S_MIREMI") == "SKIPPED"


# --- BRIGHTSKY, the built-in table ------------------------------------------------------
def test_brightsky_stripes_removed(brightsky, brightsky_runs):
    off, on = brightsky_runs["off"], brightsky_runs["on"]
    before = stripe_amplitude(off.products["rate"], brightsky.truth_rate)
    after = stripe_amplitude(on.products["rate"], brightsky.truth_rate)
    print(f"BRIGHTSKY stripe amplitude: {before:.3f} -> {after:.3f} DN/s")
    assert before > 5.0
    assert after < before / 50
    step = emicorr_of(on)
    assert [f.name for f in step.fitted] == ["Hz10"]
    amp, off_cycles = fitted_line(step, "Hz10")
    assert amp == pytest.approx(20.0, rel=0.01)
    assert phase_gap(off_cycles, cycles(1.0)) < 0.002
    header = fits.getheader(on.products["rate"])
    assert header["S_MIREMI"] == "COMPLETE"
    assert header["R_EMICOR"] == "streamdet-emicorr built-in table"


def test_cli_enables_it(brightsky, brightsky_runs, tmp_path):
    """``streamdet process --set emicorr.skip=false``, the real command in a fresh process
    with the simulation's CRDS environment, gives the products of the Python run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    env.update(brightsky.env)
    proc = subprocess.run([*streamdet_command(), "process", str(brightsky.uncal), "-o", str(tmp_path),
                           "--set", "emicorr.skip=false", "-q"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    rate = tmp_path / brightsky.uncal.name.replace("_uncal.fits", "_rate.fits")
    assert fits.getval(rate, "S_MIREMI") == "COMPLETE"
    assert stripe_amplitude(rate, brightsky.truth_rate) < 0.1
    same_products(rate, brightsky_runs["on"].products["rate"])


# --- SUB256: a frequency asked for, a reference file ----------------------------------
def test_sub256_default_table_has_nothing_to_do(sub256, streamdet_run):
    emi, _ = sub256
    result = streamdet_run(emi, steps={"emicorr": {"skip": False}})
    step = emicorr_of(result)
    assert step.skip and "no EMI frequency" in step.skip_reason
    assert fits.getval(result.products["rate"], "S_MIREMI") == "SKIPPED"


def test_sub256_218hz(sub256, streamdet_run, tmp_path):
    emi, clean = sub256
    floor = stripe_amplitude(streamdet_run(clean).products["rate"], clean.truth_rate)
    before = stripe_amplitude(streamdet_run(emi).products["rate"], emi.truth_rate)
    on = streamdet_run(emi, steps={"emicorr": {"skip": False, "frequencies": "Hz218a"}})
    after = stripe_amplitude(on.products["rate"], emi.truth_rate)
    print(f"SUB256 218 Hz stripe amplitude: {before:.3f} -> {after:.3f} DN/s "
          f"(no EMI: {floor:.3f})")
    assert before > 5 * floor
    assert after < 1.3 * floor
    amp, off_cycles = fitted_line(emicorr_of(on), "Hz218a")
    assert amp == pytest.approx(10.0, rel=0.02)
    assert phase_gap(off_cycles, cycles(2.5)) < 0.005

    # the same through a reference file in jwst's format naming the line for SUB256
    table = builtin_table()
    table.subarray_cases["SUB256"]["freqs"]["FAST"] = ["Hz218a"]
    ref = write_reference(table, tmp_path / "emicorr_sub256.asdf")
    by_ref = streamdet_run(emi, steps={"emicorr": {"skip": False, "reference": str(ref)}})
    same_products(by_ref.products["rate"], on.products["rate"])
    assert fits.getval(by_ref.products["rate"], "R_EMICOR") == str(ref)
    # and given like any other reference (CRDS says N/A for emicorr in this cache)
    by_override = streamdet_run(emi, steps={"emicorr": {"skip": False}},
                                overrides={"emicorr": str(ref)})
    same_products(by_override.products["rate"], on.products["rate"])
    assert fits.getval(by_override.products["rate"], "R_EMICOR") == str(ref.resolve())


def test_sub256_ramp_residual(sub256):
    """Per read: the corrected raw ramp against the same simulation without EMI (the
    simulator's noise does not depend on the EMI, so the difference is EMI + rounding)."""
    emi, clean = sub256
    data = fits.getdata(emi.uncal, "SCI").astype(np.float32)
    truth = fits.getdata(clean.uncal, "SCI").astype(np.float64)
    before = np.std(data - truth)
    correct_exposure(data, np.zeros(data.shape[2:], np.uint32),
                     builtin_table().parse("Hz218a"), Readout(96, 29952, 1))
    after = np.std(data - truth)
    print(f"SUB256 218 Hz ramp residual: {before:.3f} -> {after:.3f} DN rms per read")
    assert before == pytest.approx(10 / math.sqrt(2), rel=0.02)
    assert after < 0.45  # rounding to whole DN alone leaves 0.29 x sqrt(2)


def test_too_few_groups(streamdet_sim, streamdet_run):
    sim = streamdet_sim(subarray="SUB64", ngroups=2, nints=1)
    step = emicorr_of(streamdet_run(sim, steps={"emicorr": {"skip": False}}))
    assert step.skip and "ngroups=2" in step.skip_reason


def test_bad_parameters(brightsky, streamdet_run, tmp_path):
    from streamdet.core.errors import BadInputError

    with pytest.raises(BadInputError, match="algorithm"):
        streamdet_run(brightsky, steps={"emicorr": {"skip": False, "algorithm": "sequential"}})
    with pytest.raises(BadInputError, match="Hz999"):
        streamdet_run(brightsky, steps={"emicorr": {"skip": False, "frequencies": "Hz999"}})
    (tmp_path / "x.asdf").write_text("nonsense")
    with pytest.raises(BadInputError, match="emicorr.reference"):
        streamdet_run(brightsky, steps={"emicorr": {"skip": False,
                                                    "reference": str(tmp_path / "x.asdf")}})


def test_fit_reads_the_input_the_engine_reads_even_when_its_name_is_replaced(sub256, tmp_path):
    """The daemon hands the engine an open descriptor of the file it checked: a file
    renamed over the name since must not be what emicorr fits (it used to reopen the
    exposure by name; the engine's pre-pass reads through the descriptor)."""
    emi, clean = sub256
    steps = {"emicorr": {"skip": False, "frequencies": "Hz218a"}}
    name = tmp_path / "in" / emi.uncal.name
    name.parent.mkdir()
    shutil.copyfile(emi.uncal, name)
    registry = build_registry()
    with crds_environment(emi):
        expected = process_file(name, RunConfig(params=steps, output_dir=tmp_path / "expected"),
                                registry=registry)
        fd = os.open(name, os.O_RDONLY)
        try:
            shutil.copyfile(clean.uncal, tmp_path / "other.fits")
            os.replace(tmp_path / "other.fits", name)  # the EMI exposure now has no name
            got = process_file(name, RunConfig(params=steps, output_dir=tmp_path / "got"),
                               registry=registry, source_fd=fd)
        finally:
            os.close(fd)
    same_products(got.products["rate"], expected.products["rate"])
