"""The ``firstframe`` step: the first group of every integration is DO_NOT_USE (jwst 3.0
``firstframe``, deprecated there and off by default). The algorithm:
:mod:`streamdet.algorithms.firstframe`."""

from __future__ import annotations

from streamdet.algorithms.firstframe import (MIN_GROUPS_EXCLUSIVE, FirstFrameParams,
                                             flag_first_group)
from streamdet.core.plugins import hookimpl
from streamdet.core.step import Param, Step

from . import follows


class FirstFrameStep(Step):
    """Flags the first group DO_NOT_USE (jwst 3.0 ``firstframe``: deprecated, off by default)."""

    name = "firstframe"
    after = follows("firstframe")
    default_skip = True
    status_keyword = "S_FRSTFR"
    thread_safe = True
    recomputable = True
    reads_data = False  # flags from flags and references
    column_local = True
    params_spec = {
        "bright_use_group1": Param(bool, FirstFrameParams.bright_use_group1,
                                   "keep group 1 for pixels saturated by group 3"),
    }

    def prepare(self, meta, refs, pixeldq):
        if meta.ngroups <= MIN_GROUPS_EXCLUSIVE:
            return f"needs more than {MIN_GROUPS_EXCLUSIVE} groups"
        return None

    def process(self, chunk):
        flag_first_group(chunk.groupdq, chunk.pixeldq,
                         bright_use_group1=self.params["bright_use_group1"])


@hookimpl
def streamdet_steps():
    return [FirstFrameStep]
