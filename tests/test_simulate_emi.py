"""EMI injection in ``streamdet.simulate``: off by default, and when on, every raw read
carries ``A sin(2 pi f t + phi)`` on the MIRI pixel clock."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from streamdet.simulate import (
    EMI_ROW_CLOCKS,
    SUBARRAYS,
    SimParams,
    SimulationError,
    emi_read_clocks,
    simulate,
)

EMI_KEYS = {"emi_frequencies_hz", "emi_amplitudes_dn", "emi_phases_rad"}
LINES = ((390.625, 4.0, 2.0), (10.039216, 6.0, 0.0), (218.52055, 3.0, -1.0))


def test_off_by_default_leaves_no_trace(tmp_path):
    assert not SimParams().has_emi
    assert not EMI_KEYS & set(SimParams().to_dict())
    res = simulate(tmp_path / "plain", subarray="SUB64", ngroups=3, nints=1, seed=4)
    catalog = json.loads(res.truth_catalog.read_text())
    assert "emi" not in catalog
    assert not EMI_KEYS & set(catalog["params"])
    manifest = json.loads((res.outdir / "simulation.json").read_text())
    assert not EMI_KEYS & set(manifest["params"])


def test_injected_emi_is_the_clock_model(tmp_path):
    freqs, amps, phases = zip(*LINES)
    params = SimParams(emi_frequencies_hz=freqs, emi_amplitudes_dn=amps,
                       emi_phases_rad=phases[:2])  # the third phase defaults to 0
    ngroups, nints = 4, 2
    emi = simulate(tmp_path / "emi", subarray="SUB64", ngroups=ngroups, nints=nints, seed=7,
                   params=params)
    clean = simulate(tmp_path / "clean", subarray="SUB64", ngroups=ngroups, nints=nints, seed=7)
    with_emi = fits.getdata(emi.uncal, "SCI").astype(np.float64)
    without = fits.getdata(clean.uncal, "SCI").astype(np.float64)

    # independent evaluation of the documented model
    ny, nx = SUBARRAYS["SUB64"].shape
    y, x = np.mgrid[0:ny, 0:nx]
    rowclocks, frame = 28, 8512
    expected = np.zeros_like(with_emi)
    for i in range(nints):
        for g in range(ngroups):
            ticks = i * (ngroups + 1) * frame + g * frame + y * rowclocks + x // 4
            for (f, a, _), ph in zip(LINES, (2.0, 0.0, 0.0)):
                expected[i, g] += a * np.sin(2 * math.pi * f * 10e-6 * ticks + ph)
    # both files are rounded to whole DN, so they differ by the EMI to within +-1 DN,
    # with the rms of two independent roundings (0.29 x sqrt 2)
    difference = with_emi - without
    assert np.abs(difference - expected).max() <= 1.0 + 1e-3
    assert np.std(difference - expected) < 0.45
    assert np.sum(difference * expected) / np.sum(expected**2) == pytest.approx(1.0, abs=0.01)

    catalog = json.loads(emi.truth_catalog.read_text())
    assert catalog["emi"]["components"] == [
        {"frequency_hz": 390.625, "amplitude_dn": 4.0, "phase_rad": 2.0},
        {"frequency_hz": 10.039216, "amplitude_dn": 6.0, "phase_rad": 0.0},
        {"frequency_hz": 218.52055, "amplitude_dn": 3.0, "phase_rad": 0.0}]
    assert (catalog["emi"]["row_clocks"], catalog["emi"]["frame_clocks"],
            catalog["emi"]["integration_clocks"], catalog["emi"]["nsamples"]) == (
                rowclocks, frame, (ngroups + 1) * frame, 1)
    assert catalog["params"]["emi_frequencies_hz"] == list(freqs)
    # the truth rate does not change: EMI is noise, not signal
    np.testing.assert_array_equal(fits.getdata(emi.truth_rate), fits.getdata(clean.truth_rate))


def test_clock_model_matches_the_frame_times():
    for name, sub in SUBARRAYS.items():
        for readpatt in sub.readpatts:
            spatial, frame, integration = emi_read_clocks(name, readpatt, 5)
            assert spatial.shape == sub.shape
            assert frame * 1e-5 == pytest.approx(sub.frame_time(readpatt)), (name, readpatt)
            assert integration == 6 * frame
            assert spatial[0, 4] - spatial[0, 3] == 1 and spatial[0, 3] == 0


@pytest.mark.parity
def test_row_clocks_are_jwsts():
    """The row clocks are those of jwst's emicorr ``subarray_clocks`` (read from its
    source, without importing jwst, which would configure crds in this process)."""
    spec = importlib.util.find_spec("jwst")
    if spec is None:
        pytest.skip("jwst is not installed")
    tree = ast.parse((Path(spec.origin).parent / "emicorr" / "emicorr.py").read_text())
    table = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign)
                 and any(getattr(t, "id", None) == "subarray_clocks" for t in node.targets))
    for name, rows in EMI_ROW_CLOCKS.items():
        if isinstance(rows, dict):
            assert table["FULL_FAST"]["rowclocks"] == rows["FASTR1"]
            assert table["FULL_SLOW"]["rowclocks"] == rows["SLOWR1"]
        else:
            assert table[name]["rowclocks"] == rows


@pytest.mark.parametrize("params, message", [
    (SimParams(emi_frequencies_hz=(10.0,)), "emi_amplitudes_dn has 0 entries"),
    (SimParams(emi_frequencies_hz=(10.0,), emi_amplitudes_dn=(1.0,), emi_phases_rad=(0.0, 1.0)),
     "emi_phases_rad has 2 entries"),
    (SimParams(emi_frequencies_hz=(-3.0,), emi_amplitudes_dn=(1.0,)), "must be > 0"),
    (SimParams(emi_frequencies_hz=(math.nan,), emi_amplitudes_dn=(1.0,)), "finite numbers"),
])
def test_bad_emi_parameters(tmp_path, params, message):
    with pytest.raises(SimulationError, match=message):
        simulate(tmp_path / "bad", subarray="SUB64", ngroups=3, nints=1, params=params)
