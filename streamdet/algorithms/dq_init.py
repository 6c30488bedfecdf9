"""Data-quality initialisation: seed the ramp's DQ arrays from the MASK reference.

Reproduces jwst 3.0 ``dq_init`` for MIRI ramps (``do_dqinit``, non-FGS, non-superstripe
branch):

* every bit of the mask's DQ (already decoded from DQ_DEF to JWST values and cut to the
  science subarray) is ORed into ``pixeldq``;
* only the DO_NOT_USE bit of the mask is ORed into ``groupdq``, in every group of every
  integration, so that the ramp fitter never uses a pixel the mask calls unusable.

Nothing is cleared: flags the input already carries are kept.  jwst starts from the
input's own PIXELDQ / GROUPDQ extensions when the file has them with the right shapes
(a Level 1B file normally has neither) and from zero-filled arrays otherwise; the caller
is expected to do the same before calling :func:`apply_mask`.  jwst's optional
``user_supplied_dq`` array is simply ORed into the mask first, so a caller wanting it
passes ``mask_dq | user_dq``.

Pixeldq contribution: purely from the reference (the mask); it could be applied once per
exposure.  The groupdq contribution is the same mask bit broadcast over groups.
"""

from __future__ import annotations

import numpy as np

from streamdet.core.dqflags import DO_NOT_USE


def apply_mask(groupdq: np.ndarray, pixeldq: np.ndarray, mask_dq: np.ndarray) -> None:
    """OR the mask DQ into ``pixeldq`` and its DO_NOT_USE bit into every group.

    ``groupdq`` is uint8 ``[nints, ngroups, nrows, nx]`` and ``pixeldq`` uint32
    ``[nrows, nx]``; both are updated in place.  ``mask_dq`` is ``[nrows, nx]``.
    Everything this adds comes from the reference; applying it again changes nothing.
    """
    mask_dq = np.asarray(mask_dq)
    np.bitwise_or(pixeldq, mask_dq.astype(pixeldq.dtype, copy=False), out=pixeldq)
    unusable = (mask_dq & DO_NOT_USE).astype(groupdq.dtype)
    if unusable.any():
        # broadcasting a 2-D plane over [nints, ngroups] keeps this a single pass
        np.bitwise_or(groupdq, unusable, out=groupdq)
