"""Kernel tests of streamdet-emicorr on synthetic ramps (no files, no jwst)."""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from streamdet.simulate import SUBARRAYS, emi_read_clocks
from streamdet_emicorr import builtin_table, read_reference, write_reference
from streamdet_emicorr.kernel import (
    Component,
    PhaseGrid,
    Readout,
    StdStack,
    correct_exposure,
    exact_median,
    sinusoid,
)
from streamdet_emicorr.table import CLOCKS


def _clocks(subarray):
    name = "FULL_FAST" if subarray == "FULL" else subarray
    rows, frame = CLOCKS[name]
    return Readout(rows, frame, 1)


def synthetic(subarray, ngroups, nints, lines, *, noise=3.0, seed=0, rows=None):
    """Straight ramps (random slope and bias per pixel) plus sinusoidal EMI read on the
    simulator's clock, and the EMI alone."""
    spatial, frame, integration = emi_read_clocks(subarray, "FASTR1", ngroups)
    if rows is not None:
        spatial = spatial[:rows]
    ny, nx = spatial.shape
    rng = np.random.default_rng(seed)
    bias = rng.normal(12000, 500, (ny, nx))
    slope = rng.uniform(0, 30, (ny, nx))
    data = np.empty((nints, ngroups, ny, nx), np.float32)
    emi = np.zeros((nints, ngroups, ny, nx))
    for i in range(nints):
        for g in range(ngroups):
            ticks = i * integration + g * frame + spatial
            for hz, amp, phase in lines:
                emi[i, g] += amp * np.sin(2 * math.pi * hz * 1e-5 * ticks + phase)
            data[i, g] = bias + slope * g + emi[i, g] + rng.normal(0, noise, (ny, nx))
    return data, emi


@pytest.mark.parametrize("separate", [False, True])
def test_joint_fit_recovers_a_sinusoid(separate):
    # 390.625 Hz in SUB64 moves by a quarter cycle per group: well constrained
    hz, amp, phase = 390.625, 4.0, 2.0
    data, emi = synthetic("SUB64", 8, 2, [(hz, amp, phase)])
    raw = data.copy()
    comp = Component("Hz390", hz, sinusoid())
    fitted = correct_exposure(data, np.zeros(data.shape[2:], np.uint32), [comp],
                              _clocks("SUB64"), separate=separate)
    (f,) = fitted
    # the waveform's sign and half-cycle shift are the same model
    for i in range(2):
        a, off = f.amplitudes[i], f.offsets[i]
        if a < 0:
            a, off = -a, off + 0.5
        assert a == pytest.approx(amp, rel=0.02)
        expected = (phase / (2 * math.pi) + i * f.grid.dphase_int) % 1
        assert abs((off - expected + 0.5) % 1 - 0.5) < 0.005
    residual = (data - (raw - emi)).astype(np.float64)
    assert np.std(residual) < 0.05 * np.std(emi)


def test_two_lines_one_after_the_other():
    lines = [(390.625, 4.0, 0.7), (10.039216, 6.0, 1.9)]
    data, emi = synthetic("SUB128", 10, 2, lines, seed=3)
    raw = data.copy()
    table = builtin_table()
    comps = [table.component(n) for n in table.case("SUB128", "FASTR1", "MIRIMAGE").names]
    assert [c.name for c in comps] == ["Hz390", "Hz10"]
    correct_exposure(data, np.zeros(data.shape[2:], np.uint32), comps, _clocks("SUB128"))
    before = np.std(raw - (raw - emi))
    after = np.std(data.astype(np.float64) - (raw - emi))
    assert after < 0.1 * before


def test_phase_grid_matches_the_simulator_clock():
    """The correction's phases are the simulator's read times modulo the period."""
    hz, ngroups = 218.52055, 5
    for name in SUBARRAYS:
        spatial, frame, integration = emi_read_clocks(name, "FASTR1", ngroups)
        ny, nx = spatial.shape
        grid = PhaseGrid(hz, _clocks(name), ny, nx, ngroups)
        period = 1 / (hz * 1e-5)
        for i, g in ((0, 0), (0, 3), (1, 2)):
            expected = ((i * integration + g * frame + spatial[:, ::4]) / period) % 1
            ours = (grid.phase + g * grid.dphase + i * grid.dphase_int) % 1
            diff = (ours - expected + 0.5) % 1 - 0.5
            assert np.abs(diff).max() < 1e-9, (name, i, g)
        assert frame * 1e-5 == pytest.approx(SUBARRAYS[name].fast_frame_time)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 1001])
def test_exact_median_is_numpys(n):
    rng = np.random.default_rng(n)
    values = np.abs(rng.normal(0, 3, (3, n))).astype(np.float32)
    values[:, ::5] = values[0, 0]  # ties
    assert exact_median(values) == np.median(values)
    assert exact_median(values).dtype == np.float32


def test_std_stack_in_a_file_gives_the_same_median():
    rng = np.random.default_rng(1)
    maps = np.abs(rng.normal(0, 2, (4, 30, 40))).astype(np.float32)
    stack = StdStack(4, 30, 40, in_memory_bytes=0)
    try:
        assert isinstance(stack.maps, np.memmap)
        for i in range(4):
            stack[i] = maps[i]
        assert exact_median(stack) == np.median(maps)
    finally:
        stack.close()


def test_nan_gives_nan_median():
    values = np.ones((2, 5), np.float32)
    values[1, 2] = np.nan
    assert np.isnan(exact_median(values))


def test_builtin_cases():
    table = builtin_table()

    def names(sub, patt="FASTR1"):
        case = table.case(sub, patt, "MIRIMAGE")
        return None if case is None else case.names

    assert names("FULL") == ["Hz10"]
    assert names("FULL", "SLOWR1") == ["Hz10_slow_MIRIMAGE"]
    assert names("BRIGHTSKY") == ["Hz10"]
    assert names("SUB256") == []
    for sub in ("SUB64", "SUB128", "MASK1065", "MASK1140", "MASK1550", "MASKLYOT",
                "SLITLESSPRISM"):
        assert names(sub) == ["Hz390", "Hz10"], sub
    assert names("SUB64", "SLOWR1") is None
    assert names("SUB64", "ANY") is None
    case = table.case("SUB256", "FASTR1", "MIRIMAGE")
    assert (case.rowclocks, case.frameclocks) == (96, 29952)
    assert [c.name for c in table.parse("Hz218a, 390.625 ,12.5")] == ["Hz218a", "Hz390", "12.5Hz"]
    with pytest.raises(KeyError):
        table.parse("Hz999")


def test_clocks_are_jwsts():
    """Our clock table is jwst 3.0's ``subarray_clocks`` (read from its source without
    importing jwst, which would configure crds in this process)."""
    spec = importlib.util.find_spec("jwst")
    if spec is None:
        pytest.skip("jwst is not installed")
    source = Path(spec.origin).parent / "emicorr" / "emicorr.py"
    tree = ast.parse(source.read_text())
    found = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign)
                 and any(getattr(t, "id", None) == "subarray_clocks" for t in node.targets))
    assert set(found) == set(CLOCKS)
    for name, (rows, frame) in CLOCKS.items():
        assert found[name] == {"rowclocks": rows, "frameclocks": frame}


def test_reference_round_trip(tmp_path):
    table = builtin_table()
    table.subarray_cases["SUB256"]["freqs"]["FAST"] = ["Hz218a"]
    path = write_reference(table, tmp_path / "emicorr.asdf")
    back = read_reference(path)
    assert back.source == str(path)
    assert back.case("SUB256", "FASTR1", "MIRIMAGE").names == ["Hz218a"]
    for name, (hz, wave) in table.frequencies.items():
        assert back.frequencies[name][0] == hz
        np.testing.assert_array_equal(back.frequencies[name][1], wave)
    (tmp_path / "bad.asdf").write_text("not asdf")
    with pytest.raises(ValueError):
        read_reference(tmp_path / "bad.asdf")
