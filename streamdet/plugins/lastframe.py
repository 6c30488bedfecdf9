"""Last-group rejection for MIRI ramps.

Reproduces jwst 3.0 ``lastframe``: with more than 2 groups, the final group of every
integration gets DO_NOT_USE (the last MIRI frame before a reset is corrupted); with 2
groups or fewer nothing changes and jwst records the step as SKIPPED.  Saturation or any
other flag does not exempt a pixel.

Pixeldq contribution: none.
"""

from __future__ import annotations

import numpy as np

from streamdet.core.dqflags import DO_NOT_USE

MIN_GROUPS_EXCLUSIVE = 2


def flag_last_group(groupdq: np.ndarray) -> bool:
    """Mark the last group DO_NOT_USE in place; return False when there are too few groups.

    ``groupdq`` uint8 ``[nints, ngroups, nrows, nx]``.
    """
    if groupdq.shape[1] <= MIN_GROUPS_EXCLUSIVE:
        return False
    last = groupdq[:, -1]
    np.bitwise_or(last, np.uint8(DO_NOT_USE), out=last)
    return True


# --- step plugin (added by the engine work) ---

from streamdet.core.plugins import hookimpl  # noqa: E402
from streamdet.core.step import Step  # noqa: E402

from . import follows  # noqa: E402


class LastFrameStep(Step):
    """Flags the last group DO_NOT_USE (jwst 3.0 ``lastframe``)."""

    name = "lastframe"
    after = follows("lastframe")
    status_keyword = "S_LASTFR"
    thread_safe = True

    def prepare(self, meta, refs, pixeldq):
        if meta.ngroups <= MIN_GROUPS_EXCLUSIVE:
            return f"needs more than {MIN_GROUPS_EXCLUSIVE} groups"
        return None

    def process(self, chunk):
        flag_last_group(chunk.groupdq)


@hookimpl
def streamdet_steps():
    return [LastFrameStep]
