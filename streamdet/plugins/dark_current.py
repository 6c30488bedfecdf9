"""The ``dark_current`` step: subtracts the integration-dependent MIRI dark as jwst 3.0
does (the algorithm, and jwst's corner cases: ``streamdet/algorithms/dark_current.py``),
reading one dark integration at a time."""

from __future__ import annotations

import numpy as np

from streamdet.algorithms.dark_current import (
    average_dark_current,
    combined_dark_dq,
    dark_int_for,
    dark_too_short,
    frames_averaged,
    jwst_skips,
    needs_raw_dark,
    subtract_dark,
)
from streamdet.core.plugins import hookimpl
from streamdet.core.step import Step

from . import follows


#: the axes of the dark's SCI (a 3-D dark is one integration) and DQ arrays
SCI_LAYOUT = ("nints?", "ngroups", "ny", "nx")
DQ_LAYOUT = ("nints?", "ngroups?", "ny", "nx")


class DarkCurrentStep(Step):
    """Subtracts the integration-dependent MIRI dark (jwst 3.0 ``dark_current``).

    Reads one dark integration at a time. Leaves ``average_dark_current`` (e-/s per
    pixel) in the exposure state for ramp_fit's Poisson variance."""

    name = "dark_current"
    after = follows("dark_current")
    reftypes = ("dark",)
    status_keyword = "S_DARK"
    thread_safe = True
    recomputable = True
    data_only = True

    def prepare(self, meta, refs, pixeldq):
        shape = refs.shape("dark", "SCI", SCI_LAYOUT)
        self.ndim = len(shape)
        self.dark_nints = shape[0] if self.ndim == 4 else 1
        self.dark_ngroups = shape[-3]
        self.dark_nframes = int(refs.number("dark", "NFRAMES", 1) or 1)
        self.dark_groupgap = int(refs.number("dark", "GROUPGAP", 0) or 0)
        frames = (meta.nframes, meta.groupgap, self.dark_nframes, self.dark_groupgap)
        if jwst_skips(*frames):
            return "the dark has larger NFRAMES or GROUPGAP than the exposure"
        if self.dark_ngroups < 2 and dark_too_short(
                meta.ngroups, meta.nframes, meta.groupgap, self.dark_ngroups,
                self.dark_nframes, self.dark_groupgap):
            # a dark shorter than the exposure is extended from its last two groups
            refs.shape("dark", "SCI", ("nints?", "ngroups>=2", "ny", "nx"),
                       why=f"the exposure's {meta.ngroups} groups span more frames than the "
                           "dark, which is then extrapolated from its last two groups")
        self.averaging = frames_averaged(*frames)
        self.meta, self.refs = meta, refs
        dq_index = (slice(None), 0) if len(refs.shape("dark", "DQ", DQ_LAYOUT)) == 4 else ()
        np.bitwise_or(pixeldq, combined_dark_dq(refs.dq("dark", index=dq_index)), out=pixeldq)
        scalar = refs.number("dark", "AVDRKCUR", None, float)
        meta.state.average_dark_current = average_dark_current(
            (meta.ny, meta.nx), ref_scalar=scalar)
        # the plain case reads only the groups it subtracts, with NaN already zeroed
        self.raw = needs_raw_dark(meta.ngroups, meta.nframes, meta.groupgap, self.dark_ngroups,
                                  self.dark_nframes, self.dark_groupgap)
        # dark integrations that several science integrations use stay converted
        chosen = [self._chosen(int(i)) for i in meta.int_index]
        self.reused = {k for k in chosen if k is not None and (chosen.count(k) > 1 or self.ndim == 3)}
        return None

    def _chosen(self, int_index: int) -> int | None:
        return dark_int_for(int_index, self.dark_nints, intstart=self.meta.intstart,
                            file_nints=self.meta.nints, frames_averaged=self.averaging)

    def _dark_for(self, int_index: int, rows: slice, columns=None):
        chosen = self._chosen(int_index)
        if chosen is None:
            return None
        groups = slice(None) if self.raw else slice(0, self.meta.ngroups)
        index = (chosen, groups) if self.ndim == 4 else (groups,)
        return self.refs.block("dark", "SCI", index=index, rows=rows, nan_to_zero=not self.raw,
                               cache=chosen in self.reused, transient=True, columns=columns)

    def process(self, chunk):
        for k, int_index in enumerate(chunk.int_index):
            dark = self._dark_for(int(int_index), chunk.rows, chunk.columns)
            subtract_dark(chunk.data[k:k + 1], chunk.pixeldq, dark, None,
                          nframes=self.meta.nframes, groupgap=self.meta.groupgap,
                          dark_nframes=self.dark_nframes, dark_groupgap=self.dark_groupgap,
                          dark_ngroups=self.dark_ngroups, nan_zeroed=not self.raw)


@hookimpl
def streamdet_steps():
    return [DarkCurrentStep]
