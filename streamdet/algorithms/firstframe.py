"""First-group rejection for MIRI ramps.

Reproduces jwst 3.0 ``firstframe`` (deprecated there and skipped by default, but still
runnable) with its step default ``bright_use_group1=True``:

* with more than 3 groups, group 0 of every integration gets DO_NOT_USE, because the
  first frame after a MIRI reset is unreliable;
* except, with ``bright_use_group1``, in pixels whose group index 2 is already SATURATED
  in that integration: they would otherwise be left with too few groups, so group 0 is
  kept and the pixel gets FLUX_ESTIMATED in ``pixeldq`` (set if that happens in any
  integration - ORing integration by integration gives the same result as jwst's
  all-integration test);
* with 3 groups or fewer nothing changes and jwst records the step as SKIPPED.

Pixeldq contribution: data-dependent only (FLUX_ESTIMATED from the saturation flags);
nothing comes from a reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamdet.core.dqflags import DO_NOT_USE, FLUX_ESTIMATED, SATURATED

#: with this many groups or fewer the step changes nothing (jwst: SKIPPED)
MIN_GROUPS_EXCLUSIVE = 3


@dataclass(frozen=True)
class FirstFrameParams:
    """The step's parameters and their defaults (jwst 3.0's)."""

    #: keep group 0 of pixels already saturated in group index 2
    bright_use_group1: bool = True


def flag_first_group(groupdq: np.ndarray, pixeldq: np.ndarray, *,
                     bright_use_group1: bool = FirstFrameParams.bright_use_group1) -> bool:
    """Mark group 0 DO_NOT_USE in place; return False when there are too few groups.

    ``groupdq`` uint8 ``[nints, ngroups, nrows, nx]``, ``pixeldq`` uint32 ``[nrows, nx]``.
    The FLUX_ESTIMATED it may add to ``pixeldq`` depends on the data, not on a reference.
    """
    if groupdq.shape[1] <= MIN_GROUPS_EXCLUSIVE:
        return False
    first = groupdq[:, 0]
    if not bright_use_group1:
        np.bitwise_or(first, np.uint8(DO_NOT_USE), out=first)
        return True
    kept = (groupdq[:, 2] & SATURATED) != 0
    np.bitwise_or(first, (~kept).view(np.uint8) * np.uint8(DO_NOT_USE), out=first)
    kept_any = kept.any(axis=0)
    np.bitwise_or(pixeldq, kept_any.view(np.uint8) * np.uint32(FLUX_ESTIMATED), out=pixeldq)
    return True
