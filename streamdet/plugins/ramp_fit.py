"""The ``ramp_fit`` step: jwst 3.0's ``RampFitStep`` (OLS_C, optimal weighting) over
bands of rows spanning every integration. The fit itself, and how it reproduces stcal:
``streamdet/algorithms/ramp_fit.py``; the optional results (``save_opt``):
``streamdet/algorithms/ramp_fit_opt.py`` and their store and writer ``core/fitopt.py``."""

from __future__ import annotations

import threading

import numpy as np

from streamdet.algorithms.ramp_fit import (
    GroupDiscard,
    RampFitParameters,
    UnusableExposureError,
    fit_ramps,
    ignored_groups,
    plan_from_survey,
    survey_group_flags,
)
from streamdet.core.errors import BadInputError
from streamdet.core.plugins import hookimpl
from streamdet.core.products import RateArrays
from streamdet.core.references import IMAGE
from streamdet.core.step import Granularity, Param, RateProducer, RateResult

from . import follows

#: jwst's ``ramp_fit.algorithm`` values (spelt, and case-sensitive, as jwst checks them)
#: and the implementation each selects
ALGORITHMS = {"OLS_C": "builtin", "OLS": "builtin", "LIKELY": "likely"}

_DEFAULTS = RampFitParameters()


class RampFitStep(RateProducer):
    """OLS ramp fitting with optimal weighting (jwst 3.0 ``ramp_fit``, OLS_C).

    Needs every integration of a pixel at once (the Poisson variance uses the median
    rate over integrations) and, from the first pass, which groups are unusable in every
    pixel of the exposure (MIRI's leading/final group discard)."""

    name = "ramp_fit"
    after = follows("ramp_fit")
    reftypes = ("readnoise", "gain")
    granularity = Granularity.EXPOSURE
    thread_safe = True
    survey_with_bands = True
    status_keyword = "S_RAMP"
    params_spec = {
        "suppress_one_group": Param(bool, _DEFAULTS.suppress_one_group,
                                    "give no rate from a ramp with only its first group usable"),
        "firstgroup": Param(int, _DEFAULTS.firstgroup, "ignore the groups before this one "
                            "(0-based; None: from the first)", optional=True),
        "lastgroup": Param(int, _DEFAULTS.lastgroup, "ignore the groups after this one "
                           "(0-based; None: to the last)", optional=True),
        "save_opt": Param(bool, False, "also write jwst's optional results product "
                          "(_fitopt.fits: per-segment slopes, variances, intercepts, weights, "
                          "the pedestal and jump magnitudes)"),
        "algorithm": Param(str, "OLS_C", "jwst's choice of fit: OLS_C (this implementation; "
                           "OLS, jwst's older name, means the same) or LIKELY (the 'likely' "
                           "implementation, package streamdet-likely)", choices=tuple(ALGORITHMS)),
    }
    implementation_parameter = ("algorithm", ALGORITHMS)
    implementation_sources = {"likely": "streamdet-likely (pip install "
                                        "./plugins_contrib/streamdet-likely from streamdet's "
                                        "repository)"}

    def prepare(self, meta, refs, pixeldq):
        self.meta = meta
        self.gain = refs.shared("gain", "SCI", layout=IMAGE)
        self.readnoise = refs.shared("readnoise", "SCI", layout=IMAGE)
        # bits set in every pixel of every integration, per group (from the survey)
        self.common = np.full(meta.ngroups, 0xFF, dtype=np.uint8)
        self.discard = None
        # the discards bands were fitted with (a fused pass surveys as the bands go)
        self.used_discards: set = set()
        self.survey_whole = False
        self.lock = threading.Lock()
        self.ignored = ignored_groups(meta.ngroups, self.params["firstgroup"],
                                      self.params["lastgroup"])
        self.fitopt = None
        if self.params.get("save_opt"):
            import shutil
            import tempfile
            import weakref
            from pathlib import Path

            from streamdet.core.fitopt import FitoptStore

            scratch = Path(tempfile.mkdtemp(prefix="streamdet-fitopt-"))
            # the scratch goes with the step, whatever way the run ends
            weakref.finalize(self, shutil.rmtree, scratch, True)
            self.fitopt = FitoptStore(meta.nints, meta.ngroups, meta.ny, meta.nx, scratch)
        return None

    def extra_products(self):
        if self.skip or self.fitopt is None:
            return {}

        def write(path, record, source):
            from streamdet.core.fitopt import write_fitopt

            write_fitopt(path, self.fitopt, source, record)

        return {"fitopt": write}

    def survey(self, chunk):
        piece = survey_group_flags(chunk.groupdq)
        if self.ignored is not None:  # as if already flagged (see process)
            piece = piece | self.ignored
        with self.lock:
            self.common &= piece

    def _plan(self, common=None) -> GroupDiscard:
        """The group discard from ``common`` (the survey's, by default)."""
        # jump's large-event searches may take DO_NOT_USE off a group (a snowball core
        # flagged SATURATED to the last group): the discard follows what jump left
        after_jump = self.meta.state.jump_dnu_everywhere
        try:
            return plan_from_survey(
                self.common if common is None else common,
                None if after_jump is None else np.asarray(after_jump).all(axis=0))
        except UnusableExposureError as exc:
            raise BadInputError(f"{self.meta.path}: no rate can be made: {exc}") from None

    def survey_complete(self):
        with self.lock:
            used, self.used_discards = self.used_discards, set()
            self.survey_whole = True
        # the plan from the whole survey (its error, if any, stands); planned here only
        # when bands were fitted: jump's searches may still change it before the fit
        return not used or used == {self._plan()}

    def _discard_now(self, chunk):
        """The group discard from the survey as far as it has got; None when that part
        leaves nothing to fit (the whole survey may not: see survey_complete). Noted for
        survey_complete: the discard of the band's own survey, which settles it as the
        data say, whatever the threads' timing (the survey used lies between the band's
        own and the whole one, and the discard only grows with the flags set everywhere:
        when the band's own agrees with the whole survey so does the one used)."""
        own = survey_group_flags(chunk.groupdq[:, :, chunk.core])
        if self.ignored is not None:
            own = own | self.ignored
        with self.lock:
            self.used_discards.add(self._try_plan(own))
            return self._try_plan(self.common)

    def _try_plan(self, common):
        try:
            return self._plan(common)
        except BadInputError:
            return None

    def process(self, chunk):
        if self.survey_whole:
            if self.discard is None:
                with self.lock:
                    if self.discard is None:
                        self.discard = self._plan()
            discard = self.discard
        else:
            discard = self._discard_now(chunk)
            if discard is None:  # a partial survey's verdict: the band is done again
                return self._placeholder(chunk)
        core = chunk.core
        if self.ignored is not None:
            # jwst flags the groups outside firstgroup..lastgroup DO_NOT_USE in the ramp
            # before fitting, so the MIRI discard and suppression see them too
            np.bitwise_or(chunk.groupdq, self.ignored[None, :, None, None], out=chunk.groupdq)
        rows = slice(chunk.rows.start + core.start, chunk.rows.start + core.stop)
        dark = self.meta.state.average_dark_current
        rate, rateints = fit_ramps(
            chunk.data[:, :, core], chunk.groupdq[:, :, core], chunk.pixeldq[core],
            readnoise=self.readnoise[rows], gain=self.gain[rows],
            frame_time=self.meta.frame_time, group_time=self.meta.group_time,
            nframes=self.meta.nframes, groupgap=self.meta.groupgap,
            dropframes1=self.meta.drop_frames1,
            average_dark_current=None if dark is None else dark[rows],
            suppress_one_group=self.params["suppress_one_group"], discard=discard,
            opt_sink=None if self.fitopt is None else
            lambda integ, first, arrays, nsegs, ncrs, base=rows.start * self.meta.nx:
            self.fitopt.put_pixels(integ, base + first, arrays, nsegs, ncrs))
        return RateResult(rate, rateints)

    def _placeholder(self, chunk):
        ncore = len(range(*chunk.core.indices(chunk.nrows)))
        return RateResult(RateArrays.allocate((ncore, self.meta.nx)),
                          RateArrays.allocate((chunk.data.shape[0], ncore, self.meta.nx)))


@hookimpl
def streamdet_steps():
    return [RampFitStep]
