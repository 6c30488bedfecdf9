"""MIRI reset-anomaly correction: subtract the RESET reference from the first groups.

Reproduces jwst 3.0 ``reset`` (``reset_sub.do_correction``):

* The RESET reference holds a correction per integration and group
  ``[reset_nints, reset_ngroups, nrows, nx]`` (NINTS / NGROUPS of the reference header
  give the counts jwst uses).  Science integration ``i`` (absolute, 0-based: for a
  segmented file the first integration is INTSTART-1) uses reference integration ``i``,
  or the last reference integration once ``i`` runs past it - see :func:`reset_int_for`.
* Only the first ``min(ngroups, reset_ngroups)`` groups are corrected; later groups are
  untouched.  Every one of those groups is corrected, whatever its DQ flags.
* NaN in the reference counts as 0 (the science value is left as it was).
* The subtraction is float32 minus float32, one group plane at a time, as in jwst.
* The reference's 2-D DQ is ORed into ``pixeldq``.  There is no subarray cut in jwst:
  the reference must already match the science frame.

Pixeldq contribution: purely from the reference (its DQ array) - could be applied once
per exposure.  The caller passes, for each science integration in the call, the
reference integration chosen by :func:`reset_int_for`.
"""

from __future__ import annotations

import numpy as np


def reset_int_for(science_int_index: int, reset_nints: int) -> int:
    """Index of the reference integration that corrects an absolute science integration."""
    return min(int(science_int_index), int(reset_nints) - 1)


def subtract_reset(
    data: np.ndarray,
    pixeldq: np.ndarray,
    reset_data: np.ndarray,
    reset_dq: np.ndarray | None,
    *,
    reset_ngroups: int | None = None,
    nan_zeroed: bool = False,
) -> None:
    """Subtract the reset correction in place.

    ``data`` float32 ``[nints, ngroups, nrows, nx]``; ``reset_data`` float32
    ``[nints, >= n_corrected, nrows, nx]`` - row ``k`` is the reference integration for
    science row ``k`` (a single row, or a 3-D ``[groups, nrows, nx]`` array, applies to
    every integration);
    ``reset_dq`` the reference's 2-D DQ, ORed into ``pixeldq``.  ``reset_ngroups``
    (default: the reference's group axis) limits how many leading groups are corrected.
    The ``pixeldq`` part is reference-only; pass ``reset_dq=None`` once it has been applied.
    ``nan_zeroed`` says the caller already replaced NaN in ``reset_data`` by 0 (which
    subtracts to the same result): the subtraction then needs no NaN test.
    """
    if reset_data.ndim == 3:
        reset_data = reset_data[np.newaxis]
    nints, ngroups = data.shape[:2]
    if reset_ngroups is None:
        reset_ngroups = reset_data.shape[1]
    n_corrected = min(ngroups, int(reset_ngroups))
    n_ref_rows = reset_data.shape[0]
    for integ in range(nints):
        ref_int = reset_data[integ if n_ref_rows > 1 else 0]
        if nan_zeroed:
            target = data[integ, :n_corrected]
            np.subtract(target, ref_int[:n_corrected], out=target)
            continue
        for grp in range(n_corrected):
            _subtract_finite(data[integ, grp], ref_int[grp])
    if reset_dq is not None:
        np.bitwise_or(pixeldq, np.asarray(reset_dq).astype(pixeldq.dtype, copy=False),
                      out=pixeldq)


def _subtract_finite(plane: np.ndarray, correction: np.ndarray) -> None:
    defined = ~np.isnan(correction)
    np.subtract(plane, correction, out=plane, where=defined)
