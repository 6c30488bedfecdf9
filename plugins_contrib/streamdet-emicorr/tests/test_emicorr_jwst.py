"""streamdet-emicorr against jwst 3.0's own EmiCorrStep on the same input.

jwst runs in a fresh process with the simulation's CRDS environment (crds configures
itself at import and caches per process) and ``override_emicorr`` pointing at a reference
file in jwst's ASDF format that this package writes: the built-in table with SUB256 set
to correct the 218.52055 Hz line the simulation carries. streamdet reads the same file
through ``--set emicorr.reference=FILE``.

Compared: the ramp right after emicorr (jwst: DQInitStep then EmiCorrStep; streamdet:
captured by an observer plugin after its emicorr step) for the default joint fit and for
``fit_ints_separately``, to within 1 float32 ulp (measured: bit-identical); and the
rate of the whole Detector1 chain with emicorr on, within the test kit's parity
tolerances (measured: identical SCI).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from astropy.io import fits

from streamdet import hookimpl
from streamdet.simulate import SimParams, simulate
from streamdet.testing import assert_products_agree
from streamdet_emicorr import builtin_table, write_reference

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(importlib.util.find_spec("jwst") is None, reason="jwst is not installed"),
]

NO_NETWORK = """
import sys
def _no_network(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.sendto", "socket.bind"):
        raise RuntimeError(f"network access attempted: {event} {args!r}")
sys.addaudithook(_no_network)
"""

JWST = """
import sys
import numpy as np
from jwst.dq_init import DQInitStep
from jwst.emicorr import EmiCorrStep
from jwst.pipeline import Detector1Pipeline

uncal, ref, out = sys.argv[1:4]
ramp = DQInitStep.call(uncal)
joint = EmiCorrStep.call(ramp, skip=False, override_emicorr=ref)
assert joint.meta.cal_step.emicorr == "COMPLETE"
np.save(out + "/joint.npy", joint.data)
separate = EmiCorrStep.call(ramp, skip=False, override_emicorr=ref, fit_ints_separately=True)
np.save(out + "/separate.npy", separate.data)
Detector1Pipeline.call(uncal, output_dir=out, save_results=True,
                       steps={"emicorr": {"skip": False, "override_emicorr": ref}})
"""


class RampCapture:
    """Observer plugin: keeps the ramp as the emicorr step leaves it."""

    def __init__(self):
        self.planes = {}

    @hookimpl
    def streamdet_step_finished(self, exposure, step, chunk, seconds):
        if step.name == "emicorr":
            for k, i in enumerate(chunk.int_index):
                self.planes[int(i)] = chunk.data[k].copy()

    def ramp(self):
        return np.stack([self.planes[i] for i in sorted(self.planes)])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    sim = simulate(tmp_path_factory.mktemp("emi-jwst"), subarray="SUB256", ngroups=10, nints=2,
                   seed=5, params=SimParams(emi_frequencies_hz=(218.52055,),
                                            emi_amplitudes_dn=(8.0,), emi_phases_rad=(0.6,)))
    table = builtin_table()
    table.subarray_cases["SUB256"]["freqs"]["FAST"] = ["Hz218a"]
    ref = write_reference(table, sim.outdir / "emicorr_sub256_218hz.asdf")
    out = tmp_path_factory.mktemp("emi-jwst-out")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    env.update(sim.env)
    proc = subprocess.run([sys.executable, "-c", NO_NETWORK + textwrap.dedent(JWST),
                           str(sim.uncal), str(ref), str(out)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return sim, ref, out


@pytest.mark.parametrize("separate", [False, True])
def test_corrected_ramp_matches_jwst(case, streamdet_run, separate):
    sim, ref, out = case
    capture = RampCapture()
    streamdet_run(sim, plugins=[capture],
                  steps={"emicorr": {"skip": False, "reference": str(ref),
                                     "fit_ints_separately": separate}})
    ours = capture.ramp()
    theirs = np.load(out / ("separate.npy" if separate else "joint.npy"))
    raw = fits.getdata(sim.uncal, "SCI").astype(np.float32)
    assert np.abs(theirs - raw).max() > 4.0  # jwst did subtract the line
    diff = np.abs(ours.astype(np.float64) - theirs)
    print(f"separate={separate}: max |streamdet - jwst| = {diff.max():.3g} DN, "
          f"{np.count_nonzero(diff)} of {diff.size} reads differ")
    np.testing.assert_array_max_ulp(ours, theirs, maxulp=1)


def test_rate_matches_jwst(case, streamdet_run):
    sim, ref, out = case
    ours = streamdet_run(sim, steps={"emicorr": {"skip": False, "reference": str(ref)}})
    theirs = out / sim.uncal.name.replace("_uncal.fits", "_rate.fits")
    for agreement in assert_products_agree(ours.products["rate"], theirs):
        print(agreement)
    assert fits.getval(theirs, "S_MIREMI") == "COMPLETE"
    assert fits.getval(ours.products["rate"], "S_MIREMI") == "COMPLETE"
