"""The ``ramp_fit`` step, implementation ``likely``: jwst's ``algorithm = 'LIKELY'``.

Chosen with ``--set ramp_fit.algorithm=LIKELY`` (jwst's spelling, also in a ``--config``
file or ``steps={"ramp_fit": {"algorithm": "LIKELY"}}``) or ``--use ramp_fit=likely``.
Installing the package changes no product by itself: the built-in OLS_C fit stays the
default.

It extends the built-in step: like jwst, an exposure with fewer than 4 groups is fitted
with OLS_C (the built-in's code, which then also needs its first-pass survey).
"""

from __future__ import annotations

import numpy as np

from streamdet.core.errors import BadInputError
from streamdet.core.plugins import hookimpl
from streamdet.core.step import Granularity, Param, RateResult
from streamdet.plugins.ramp_fit import ALGORITHMS, RampFitStep

from .kernel import MIN_GROUPS, fit_likely

#: the built-in's parameters this implementation honours (any other one set to a value
#: of its own is refused, never ignored): ``suppress_one_group`` applies to the OLS_C fit
#: of short exposures only, as in jwst (LIKELY ignores it); ``maximum_cores``, should the
#: built-in declare it, is jwst's process count, which threads replace
_HONOURED = {"suppress_one_group", "algorithm", "maximum_cores"}


class LikelyRampFitStep(RampFitStep):
    """jwst 3.0's LIKELY ramp fit (Brandt 2024): likelihood jump search on each ramp,
    then the generalised least-squares fit with the full read + photon covariance.

    Works on bands of rows spanning every integration (granularity EXPOSURE), like the
    built-in fit."""

    name = "ramp_fit"
    implementation = "likely"
    granularity = Granularity.EXPOSURE
    thread_safe = True
    params_spec = {
        **RampFitStep.params_spec,
        "algorithm": Param(str, "LIKELY", "jwst's choice of fit; this implementation is "
                           "LIKELY (OLS_C and OLS choose the built-in)",
                           choices=tuple(ALGORITHMS)),
    }

    def prepare(self, meta, refs, pixeldq):
        where = meta.path
        for name, param in RampFitStep.params_spec.items():
            if name not in _HONOURED and self.params[name] != param.default:
                raise BadInputError(f"{where}: ramp_fit 'likely' does not implement "
                                    f"{name}={self.params[name]!r}")
        if self.params["algorithm"] != "LIKELY":
            raise BadInputError(f"{where}: ramp_fit 'likely' is algorithm LIKELY, not "
                                f"{self.params['algorithm']!r}")
        # jwst: "the ngroups needs to be a minimum of 4 ... changed to OLS_C"
        self.ols = meta.ngroups < MIN_GROUPS
        if not self.ols and meta.nframes != 1:
            raise BadInputError(
                f"{where}: ramp_fit 'likely' supports one read per group (NFRAMES=1, as "
                f"MIRI reads out); this exposure has NFRAMES={meta.nframes}")
        if not self.ols and not meta.group_time > 0:
            raise BadInputError(f"{where}: group time TGROUP={meta.group_time!r} is not positive")
        return super().prepare(meta, refs, pixeldq)

    def process(self, chunk):
        if self.ols:
            return super().process(chunk)
        core = chunk.core
        rows = slice(chunk.rows.start + core.start, chunk.rows.start + core.stop)
        dark = self.meta.state.average_dark_current
        rate, rateints = fit_likely(
            chunk.data[:, :, core], chunk.groupdq[:, :, core], chunk.pixeldq[core],
            readnoise=self.readnoise[rows], gain=self.gain[rows],
            group_time=self.meta.group_time,
            average_dark_current=None if dark is None else np.asarray(dark)[rows])
        return RateResult(rate, rateints)


@hookimpl
def streamdet_steps():
    return [LikelyRampFitStep]
