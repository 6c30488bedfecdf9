"""Reference-pixel drift correction for MIRI full-frame ramps (jwst 3.0 ``refpix``).

A MIRI detector is read through four amplifiers that take turns along a row: column
``c`` belongs to amplifier ``c % 4``.  The four leftmost columns (0-3) and the four
rightmost (1028-1031 on the 1032-column frame) are reference pixels, not exposed to
light, one per amplifier on each side.  Their level follows the amplifier's bias drift
from group to group, and alternate rows drift differently.

For each integration jwst 3.0 does, in float32:

1. remember group 0 and subtract it from every group (group 0 becomes 0);
2. for each group after the first, for each amplifier, each row parity (rows 0, 2,
   4, ... and rows 1, 3, 5, ...) and each side, take the sigma-clipped mean of that
   amplifier's reference column over the rows of that parity, leaving out pixels with
   DO_NOT_USE in the pixel DQ.  The clip is ``scipy.stats.sigmaclip`` with
   ``siglimit`` (3) on both sides, run only when the sample's spread is not exactly
   zero; otherwise the plain float64 mean is used;
3. subtract the average of the left and right means from every fourth column of that
   amplifier (reference columns included) in rows of that parity;
4. add group 0 back.

All rows take part: MIRI has no reference rows.  With ``odd_even_rows=False`` a single
mean over all rows replaces the parity split.  No DQ flag is changed.

When some amplifier, side and parity has no usable reference pixel at all, jwst
warns and leaves the group loop: because the pixel DQ is the same for every group and
integration this happens at the first group, so no correction is made anywhere, yet
the subtraction and re-addition of group 0 still happen (they can round the last bit)
and the step status stays COMPLETE.  Reference values that are NaN make the rows they
correct NaN, as in jwst.

jwst skips the step (status SKIPPED) for MIRI frames smaller than full frame, judged by
the array shape, not the subarray name: see :func:`applies_to`.  Of the step's
parameters, only ``odd_even_rows`` and ``siglimit`` act on MIRI data;
``MIRI_IGNORED_PARAMETERS`` lists the ones jwst accepts and ignores for MIRI.

Arithmetic order follows jwst so the result is bit-identical: every step rounds to
float32 (jwst keeps group 0 in float64, but a float32 sum or difference computed in
float64 and rounded once is the same number).  A reference value that came from the
float64 fallback mean is applied in float64 and rounded once, as jwst does.  The
measurement is one C call per integration (``streamdet_refpix_measure``, refpix.h) that
reproduces numpy's arithmetic for jwst's clipped means bit for bit: float32 pairwise
sums, float32 clip bounds for a Python-number ``siglimit`` (float64 for a NumPy float64
one), the float64 fallback for samples of equal finite values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamdet._ckernels import group_planes, pointer, strides
from streamdet._ckernels._refpix import ffi, lib
from streamdet.core import dqflags

#: rows x columns of a MIRI full frame, reference columns included
MIRI_FULL_FRAME_SHAPE = (1024, 1032)
N_AMPLIFIERS = 4
#: reference columns on each side of the frame (one per amplifier)
N_SIDE_REFERENCE_COLUMNS = 4

#: refpix parameters jwst accepts but does not use for MIRI data
MIRI_IGNORED_PARAMETERS = (
    "odd_even_columns", "use_side_ref_pixels", "side_smoothing_length", "side_gain",
    "ovr_corr_mitigation_ftr", "preserve_irs2_refpix", "irs2_mean_subtraction",
    "refpix_algorithm", "sigreject", "gaussmooth", "halfwidth",
)

SUBARRAY_SKIP_MESSAGE = "Refpix correction skipped for MIRI subarrays"


@dataclass(frozen=True)
class RefpixParams:
    """The parameters that act on MIRI data, with jwst 3.0's defaults."""

    #: separate reference levels for even and odd rows
    odd_even_rows: bool = True
    #: the sigma-clip limit on both sides (fixed in jwst for MIRI)
    siglimit: float = 3.0


DEFAULTS = RefpixParams()

_DO_NOT_USE = np.uint32(dqflags.DO_NOT_USE)


@dataclass(frozen=True)
class RefpixApplicability:
    """Whether the step runs on a frame of this shape, and the status if it does not."""

    applies: bool
    status: str          # value for S_REFPIX when it does not apply
    message: str | None


def applies_to(nrows: int, ncols: int) -> RefpixApplicability:
    """jwst corrects MIRI frames of full-frame size only; anything smaller is skipped."""
    full_rows, full_cols = MIRI_FULL_FRAME_SHAPE
    if ncols < full_cols or nrows < full_rows:
        return RefpixApplicability(False, "SKIPPED", SUBARRAY_SKIP_MESSAGE)
    return RefpixApplicability(True, "COMPLETE", None)


@dataclass(frozen=True)
class RefpixOutcome:
    """What the kernel did.  ``corrected`` is False when the reference pixels were
    unusable (the step status is still COMPLETE in jwst); ``warnings`` are log lines."""

    corrected: bool
    warnings: tuple[str, ...] = ()


def _parity_rows(nrows: int, odd_even_rows: bool) -> list[slice]:
    return [slice(0, nrows, 2), slice(1, nrows, 2)] if odd_even_rows else [slice(0, nrows)]


def reference_columns(ncols: int) -> np.ndarray:
    """Indices of the 8 reference columns: left 0-3, then right ``ncols-4 .. ncols-1``."""
    return np.r_[0:N_SIDE_REFERENCE_COLUMNS, ncols - N_SIDE_REFERENCE_COLUMNS:ncols]


def _missing_reference_warnings(usable_counts: np.ndarray, odd_even_rows: bool) -> list[str]:
    """``usable_counts`` [row sets, 8]: usable pixels of each reference column per set."""
    notes = []
    for amp in range(N_AMPLIFIERS):
        name = "ABCD"[amp]
        for side in (amp, amp + N_SIDE_REFERENCE_COLUMNS):
            if odd_even_rows:
                if usable_counts[0, side] == 0:
                    notes.append(f"Odd rows for amplifier {name} have no good reference pixels")
                elif usable_counts[1, side] == 0:
                    notes.append(f"Even rows for amplifier {name} have no good reference pixels")
            elif usable_counts[0, side] == 0:
                notes.append(f"Amplifier {name} has no good reference pixels")
    return notes


def _clip_limit_in_float64(siglimit) -> bool:
    """Whether the clip bounds ``centre - spread * siglimit`` (float32 centre and spread)
    come out float64: a Python number is weak under NumPy 2's promotion (float32
    bounds), a NumPy float64 or integer scalar is not."""
    bound = np.result_type(np.float32, siglimit)
    if bound not in (np.float32, np.float64):
        raise TypeError(f"refpix: siglimit {siglimit!r} makes {bound} clip bounds; "
                        "a float32 or float64 limit is supported")
    return bound == np.float64


def measure_reference_drift(columns: np.ndarray, pixeldq: np.ndarray, ncols: int, *,
                            odd_even_rows: bool = DEFAULTS.odd_even_rows,
                            siglimit: float = DEFAULTS.siglimit
                            ) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """The corrections for one integration, from its reference columns alone.

    ``columns`` float32 [ngroups, nrows, 8]: the 8 reference columns
    (:func:`reference_columns`) of every row and group of the integration, as the step
    receives it; ``pixeldq`` [nrows, 8] their pixel DQ.  Returns ``(corrections,
    warnings)``: ``corrections`` [ngroups - 1, nsets, ncols] holds, for each group after
    the first and each row set (even rows, odd rows; or all rows), the row to subtract
    (float32, or float64 when a fallback mean came out float64: applying float32 values
    in float64 and rounding once gives the same numbers); None when there is nothing to
    correct (one group, or reference pixels missing: ``warnings`` says which).

    The clipped means are one C call (``streamdet_refpix_measure``, refpix.h), bit for
    bit numpy's arithmetic for jwst's formulation, without the GIL.
    """
    if columns.dtype != np.float32:
        raise TypeError(f"refpix: reference columns must be float32, got {columns.dtype}")
    ngroups, nrows, width = columns.shape
    if width < 2 * N_SIDE_REFERENCE_COLUMNS:
        raise ValueError(f"refpix: {width} reference columns, expected 8")
    row_sets = _parity_rows(nrows, odd_even_rows)
    usable = np.ascontiguousarray(
        (pixeldq[:, :2 * N_SIDE_REFERENCE_COLUMNS] & _DO_NOT_USE) == 0)
    counts = np.array([usable[rows].sum(axis=0) for rows in row_sets])
    warnings = _missing_reference_warnings(counts, odd_even_rows) if ngroups > 1 else []
    if warnings:
        warnings.append("Group 1 has no reference pixels")
    if warnings or ngroups < 2:
        return None, tuple(warnings)
    if columns.strides[2] != columns.itemsize:
        columns = np.ascontiguousarray(columns)
    corrections = np.empty((ngroups - 1, len(row_sets), ncols))
    group_stride, row_stride = strides(columns)[:2]
    wide = lib.streamdet_refpix_measure(
        pointer(ffi, columns), ngroups, nrows, group_stride, row_stride,
        pointer(ffi, usable), len(row_sets), float(siglimit),
        _clip_limit_in_float64(siglimit), ncols, pointer(ffi, corrections))
    if wide < 0:
        raise MemoryError("refpix: no scratch memory for the reference levels")
    if not wide:
        corrections = corrections.astype(np.float32)
    return corrections, tuple(warnings)


def apply_reference_drift(data: np.ndarray, corrections: np.ndarray | None, first_row: int = 0,
                          *, odd_even_rows: bool = DEFAULTS.odd_even_rows) -> None:
    """Apply :func:`measure_reference_drift`'s corrections to rows of one integration.

    ``data`` float32 [ngroups, nrows, ncols] (in place) holds the integration's rows
    ``first_row ..`` (any rows: the correction is pixel-local once measured).  Every
    group after the first becomes ``((x - g0) - correction) + g0`` in float32, group 0
    ``(g0 - g0) + g0``, exactly as jwst computes them; with ``corrections`` None only
    the subtraction and re-addition of group 0 happen.
    """
    ngroups, nrows, ncols = data.shape
    table = None
    if corrections is not None and ngroups > 1:
        sets = corrections if odd_even_rows else corrections[:, :1]
        table = np.ascontiguousarray(sets, dtype=np.float64)
    with group_planes(data) as (planes,):
        # one C call per integration of a band
        lib.streamdet_refpix_apply(pointer(ffi, planes), ngroups, nrows, ncols,
                                   strides(planes)[0], first_row,
                                   ffi.NULL if table is None else pointer(ffi, table),
                                   1 if table is None else table.shape[1])


def subtract_reference_drift(data: np.ndarray, pixeldq: np.ndarray, *,
                             odd_even_rows: bool = DEFAULTS.odd_even_rows,
                             siglimit: float = DEFAULTS.siglimit
                             ) -> RefpixOutcome:
    """Correct MIRI full-frame ramps in place for amplifier bias drift.

    ``data`` float32 [nints, ngroups, nrows, ncols] (all rows of each integration);
    ``pixeldq`` uint32 [nrows, ncols].  The reference columns are the first and last
    four columns.  Call only when :func:`applies_to` says the step applies.
    (:func:`measure_reference_drift` then :func:`apply_reference_drift`, per integration.)
    """
    if data.dtype != np.float32:
        raise TypeError(f"refpix: data must be float32, got {data.dtype}")
    nints, ngroups, nrows, ncols = data.shape
    if ncols % N_AMPLIFIERS or ncols < 2 * N_SIDE_REFERENCE_COLUMNS:
        raise ValueError(f"refpix: {ncols} columns do not hold 4 amplifiers and 8 reference "
                         "columns")
    if pixeldq.shape != (nrows, ncols):
        raise ValueError(f"refpix: pixeldq shape {pixeldq.shape} != frame {(nrows, ncols)}")
    cols = reference_columns(ncols)
    warnings: tuple[str, ...] = ()
    corrected = ngroups > 1
    for i in range(nints):
        corrections, warnings = measure_reference_drift(
            data[i][:, :, cols], pixeldq[:, cols], ncols, odd_even_rows=odd_even_rows,
            siglimit=siglimit)
        corrected = corrections is not None
        apply_reference_drift(data[i], corrections, 0, odd_even_rows=odd_even_rows)
    return RefpixOutcome(corrected, tuple(warnings))
