"""The ``rscd`` step: flags the RSCD-affected leading groups of each integration (jwst
3.0 ``rscd``). The algorithm and the header keywords it accumulates:
:mod:`streamdet.algorithms.rscd`."""

from __future__ import annotations

import threading

from streamdet.algorithms.rscd import TABLE_EXTENSION, RscdTally, flag_rscd_groups, plan_rscd
from streamdet.core.errors import ReferenceError_
from streamdet.core.plugins import hookimpl
from streamdet.core.step import Granularity, Step

from . import follows


class RscdStep(Step):
    """Flags the RSCD-affected leading groups of each integration (jwst 3.0 ``rscd``)."""

    name = "rscd"
    after = follows("rscd")
    reftypes = ("rscd",)
    granularity = Granularity.GROUP
    thread_safe = True
    recomputable = True
    reads_data = False  # flags from flags and references
    column_local = True
    status_keyword = "S_RSCD"

    def prepare(self, meta, refs, pixeldq):
        table = refs.raw("rscd", TABLE_EXTENSION)
        try:
            plan = plan_rscd(table, meta.subarray, meta.readpatt, meta.ngroups)
        except (TypeError, ValueError) as exc:  # not a table, or not jwst's columns
            raise ReferenceError_(f"{refs.path('rscd')}: RSCD {TABLE_EXTENSION} is not a "
                                  f"usable group-skip table: {exc}") from None
        self.messages = plan.messages
        if not plan.applies:
            return "; ".join(plan.messages) or "no RSCD group-skip entry for this exposure"
        self.tally = RscdTally(plan.skip_first_int, plan.skip_later_ints)
        self.meta = meta
        self.lock = threading.Lock()
        return None

    def process(self, chunk):
        # a band's tally, added to the frame-wide one: only the chunk's core rows count
        band = flag_rscd_groups(chunk.groupdq, chunk.pixeldq, chunk.int_index,
                                self.tally.skip_first_int, self.tally.skip_later_ints)
        if chunk.columns is not None:  # a pass for surveys alone: the band pass tallies
            return
        core = chunk.core
        rows = slice(chunk.rows.start + (core.start or 0),
                     chunk.rows.start + (chunk.nrows if core.stop is None else core.stop))
        frame = (self.meta.ny, self.meta.nx)
        for part in (band.first, band.later):
            if part.backed_off is not None:
                part.backed_off = part.backed_off[core]
                part.first_group_kept = part.first_group_kept[core]
        with self.lock:
            self.tally.first.merge(band.first, rows, frame)
            self.tally.later.merge(band.later, rows, frame)

    def finish(self):
        return self.tally.header_keywords(self.meta.nints_total,
                                          holds_first_int=self.meta.intstart == 1)


@hookimpl
def streamdet_steps():
    return [RscdStep]
