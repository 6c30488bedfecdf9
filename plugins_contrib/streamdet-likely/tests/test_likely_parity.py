"""Parity with jwst 3.0's LIKELY: ``Detector1Pipeline`` with
``steps={'ramp_fit': {'algorithm': 'LIKELY'}}`` and streamdet with the same setting, on
the same simulated exposures and CRDS cache; rate and rateints within the project's
parity tolerances (streamdet.testing: SCI/ERR/VAR within 1e-4 on >= 99.9 % of the
pixels finite in both, NaN in the same places, DQ identical on >= 99.99 %)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

import streamdet
from streamdet.simulate import simulate
from streamdet.testing import assert_products_agree

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(importlib.util.find_spec("jwst") is None, reason="jwst is not installed"),
]

LIKELY = {"ramp_fit": {"algorithm": "LIKELY"}}

NO_NETWORK = """
import sys
def _no_network(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.sendto", "socket.bind"):
        raise RuntimeError(f"network access attempted: {event} {args!r}")
sys.addaudithook(_no_network)
"""

JWST = """
import sys
from jwst.pipeline import Detector1Pipeline
Detector1Pipeline.call(sys.argv[1], output_dir=sys.argv[2], save_results=True,
                       steps={"ramp_fit": {"algorithm": "LIKELY"}})
"""

#: name -> simulate arguments
CASES = {
    "full_12x2": dict(subarray="FULL", ngroups=12, nints=2, seed=3),
    "sub256_20x3": dict(subarray="SUB256", ngroups=20, nints=3, seed=5),
    "sub128_10x1": dict(subarray="SUB128", ngroups=10, nints=1, seed=6),
    "sub64_10x100": dict(subarray="SUB64", ngroups=10, nints=100, seed=9),
    "sub64_3x2_ols_fallback": dict(subarray="SUB64", ngroups=3, nints=2, seed=8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_likely_matches_jwst(case, tmp_path, monkeypatch):
    sim = simulate(tmp_path / "sim", **CASES[case])
    jwst_out = tmp_path / "jwst"
    jwst_out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    env.update(sim.env)
    proc = subprocess.run([sys.executable, "-c", NO_NETWORK + textwrap.dedent(JWST),
                           str(sim.uncal), str(jwst_out)], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for key, value in sim.env.items():
        monkeypatch.setenv(key, value)
    ours = streamdet.process(sim.uncal, tmp_path / "streamdet", steps=LIKELY)
    stem = sim.uncal.name.replace("_uncal.fits", "")
    for kind in ("rate", "rateints"):
        report = assert_products_agree(ours[kind], jwst_out / f"{stem}_{kind}.fits")
        print(kind, *report, sep="\n  ")
