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
per exposure.  The engine passes, for each science integration in the call, the
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


# --- step plugin (added by the engine work) ---

from streamdet.core.plugins import hookimpl  # noqa: E402
from streamdet.core.references import IMAGE  # noqa: E402
from streamdet.core.step import Step  # noqa: E402

from . import follows  # noqa: E402


class ResetStep(Step):
    """Subtracts the MIRI RESET reference per integration and group (jwst 3.0 ``reset``).

    Runs when a RESET reference resolves; skipped when CRDS says N/A."""

    name = "reset"
    after = follows("reset")
    reftypes = ("reset",)
    status_keyword = "S_RESET"
    thread_safe = True

    def prepare(self, meta, refs, pixeldq):
        shape = refs.shape("reset", "SCI", ("nints?", "ngroups", "ny", "nx"))
        self.ndim = len(shape)
        if self.ndim == 3:
            shape = (1, *shape)
        self.ref_nints = refs.number("reset", "NINTS", shape[0])
        self.ref_ngroups = refs.number("reset", "NGROUPS", shape[1])
        self.refs = refs
        self.n_corrected = min(meta.ngroups, self.ref_ngroups, shape[1])
        np.bitwise_or(pixeldq, refs.dq("reset", layout=IMAGE), out=pixeldq)
        # reference integrations that correct several science integrations stay converted
        chosen = [reset_int_for(int(i), self.ref_nints) for i in meta.int_index]
        self.reused = {k for k in chosen if chosen.count(k) > 1 or self.ndim == 3}
        return None

    def _planes(self, int_index: int, rows: slice) -> np.ndarray:
        k = reset_int_for(int_index, self.ref_nints)
        index = (k, slice(0, self.n_corrected))
        return self.refs.block("reset", "SCI", index=index if self.ndim == 4 else index[1:],
                               rows=rows, nan_to_zero=True, cache=k in self.reused,
                               transient=True)

    def process(self, chunk):
        for k, i in enumerate(chunk.int_index):
            subtract_reset(chunk.data[k:k + 1], chunk.pixeldq, self._planes(int(i), chunk.rows),
                           None, reset_ngroups=self.n_corrected, nan_zeroed=True)


@hookimpl
def streamdet_steps():
    return [ResetStep]
