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

#: with this many groups or fewer the step changes nothing (jwst: SKIPPED)
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
