"""The ``ramp_fit`` step, implementation ``likely`` (chosen with ``--use ramp_fit=likely``).

It is a replacement: the built-in OLS fit stays the default, so installing this package
changes no product unless the implementation is asked for.
"""

from __future__ import annotations

import numpy as np

from streamdet.core.errors import BadInputError
from streamdet.core.plugins import hookimpl
from streamdet.core.step import Granularity, Param, Step

from .kernel import JUMP_MASKS, fit_likely


class LikelyRampFitStep(Step):
    """Likelihood-based optimal ramp fitting (Brandt 2024), jump-aware.

    Uses the group DQ left by ``jump`` (a JUMP_DET group splits the ramp and, by
    default, its read is left out; DO_NOT_USE and SATURATED groups are left out), the
    READNOISE and GAIN references and the average dark current of the ``dark_current``
    step.  Needs all integrations of a pixel at once: every integration's covariance
    uses the exposure-level rate."""

    name = "ramp_fit"
    implementation = "likely"
    reftypes = ("readnoise", "gain")
    granularity = Granularity.EXPOSURE
    status_keyword = "S_RAMP"
    produces_rate = True
    params_spec = {
        "iterations": Param(int, 2, "solves per pixel; each after the first takes the "
                            "covariance from the previous rate (2 removes the first-order "
                            "bias of a data-estimated covariance)", min=1, max=10),
        "jump_mask": Param(str, "read", "what a JUMP_DET group removes: its read (both "
                           "differences touching it, robust to falsely flagged read-noise "
                           "excursions) or only the difference ending on it",
                           choices=JUMP_MASKS),
    }

    def prepare(self, meta, refs, pixeldq):
        where = meta.path
        if meta.nframes != 1:
            raise BadInputError(
                f"{where}: ramp_fit 'likely' supports one read per group (NFRAMES=1, as "
                f"MIRI reads out); this exposure has NFRAMES={meta.nframes}")
        if meta.ngroups < 2:
            raise BadInputError(
                f"{where}: ramp_fit 'likely' needs at least 2 groups per integration; "
                f"this exposure has {meta.ngroups}")
        if not meta.group_time > 0:
            raise BadInputError(f"{where}: group time TGROUP={meta.group_time!r} is not positive")
        self.meta = meta
        self.gain = refs.array("gain", "SCI")
        self.readnoise = refs.array("readnoise", "SCI")
        return None

    def process(self, chunk):
        core = chunk.core
        rows = slice(chunk.rows.start + core.start, chunk.rows.start + core.stop)
        dark = self.meta.state.get("average_dark_current")
        return fit_likely(
            chunk.data[:, :, core], chunk.groupdq[:, :, core], chunk.pixeldq[core],
            readnoise=self.readnoise[rows], gain=self.gain[rows],
            group_time=self.meta.group_time,
            average_dark_current=None if dark is None else np.asarray(dark)[rows],
            iterations=self.params["iterations"], jump_mask=self.params["jump_mask"])


@hookimpl
def streamdet_steps():
    return [LikelyRampFitStep]
