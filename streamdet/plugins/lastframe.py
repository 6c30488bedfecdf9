"""The ``lastframe`` step: the last group of every integration is DO_NOT_USE (jwst 3.0
``lastframe``). The algorithm: :mod:`streamdet.algorithms.lastframe`."""

from __future__ import annotations

from streamdet.algorithms.lastframe import MIN_GROUPS_EXCLUSIVE, flag_last_group
from streamdet.core.plugins import hookimpl
from streamdet.core.step import Step

from . import follows


class LastFrameStep(Step):
    """Flags the last group DO_NOT_USE (jwst 3.0 ``lastframe``)."""

    name = "lastframe"
    after = follows("lastframe")
    status_keyword = "S_LASTFR"
    thread_safe = True
    recomputable = True
    reads_data = False  # flags from flags and references
    column_local = True

    def prepare(self, meta, refs, pixeldq):
        if meta.ngroups <= MIN_GROUPS_EXCLUSIVE:
            return f"needs more than {MIN_GROUPS_EXCLUSIVE} groups"
        return None

    def process(self, chunk):
        flag_last_group(chunk.groupdq)


@hookimpl
def streamdet_steps():
    return [LastFrameStep]
