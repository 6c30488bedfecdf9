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
float64 fallback mean is applied in float64 and rounded once, as jwst does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

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

_DO_NOT_USE = np.uint32(dqflags.DO_NOT_USE)
_ROW_BAND = 64  # rows per in-cache pass; even, so band starts keep the row parity


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


def _clipped_mean(sample_source: np.ndarray, good: np.ndarray, limit: float):
    """jwst's reference-level estimator; None when there is no usable pixel."""
    if good.size == 0:
        return None
    sample = sample_source[good]
    if np.std(sample, dtype=np.float64) != 0.0:
        kept = stats.sigmaclip(sample, limit, limit)[0]
        return kept.mean()
    # a constant sample would stall scipy's clip; its float64 mean keeps that dtype
    return sample.mean(dtype=np.float64)


def _parity_rows(nrows: int, odd_even_rows: bool) -> list[slice]:
    return [slice(0, nrows, 2), slice(1, nrows, 2)] if odd_even_rows else [slice(0, nrows)]


def _usable_positions(pixeldq: np.ndarray, row_sets: list[slice]) -> list[list[np.ndarray]]:
    """For each row set and each of the 8 reference columns (left 0-3, right 0-3),
    the positions (within the row set) of pixels without DO_NOT_USE."""
    ncols = pixeldq.shape[1]
    columns = list(range(N_SIDE_REFERENCE_COLUMNS)) + list(
        range(ncols - N_SIDE_REFERENCE_COLUMNS, ncols))
    out = []
    for rows in row_sets:
        out.append([np.flatnonzero((pixeldq[rows, c] & _DO_NOT_USE) == 0) for c in columns])
    return out


def _missing_reference_warnings(usable: list[list[np.ndarray]], odd_even_rows: bool
                                ) -> list[str]:
    notes = []
    for amp in range(N_AMPLIFIERS):
        name = "ABCD"[amp]
        for side in (amp, amp + N_SIDE_REFERENCE_COLUMNS):
            if odd_even_rows:
                if usable[0][side].size == 0:
                    notes.append(f"Odd rows for amplifier {name} have no good reference pixels")
                elif usable[1][side].size == 0:
                    notes.append(f"Even rows for amplifier {name} have no good reference pixels")
            elif usable[0][side].size == 0:
                notes.append(f"Amplifier {name} has no good reference pixels")
    return notes


def _row_corrections(reference: np.ndarray, usable: list[list[np.ndarray]],
                     row_sets: list[slice], limit: float, ncols: int) -> np.ndarray:
    """One correction row (length ``ncols``) per row set, from the reference columns
    (``reference``: [nrows, 8] with group 0 already subtracted)."""
    signals = []
    for k, rows in enumerate(row_sets):
        per_amp = []
        for amp in range(N_AMPLIFIERS):
            left = _clipped_mean(reference[rows, amp], usable[k][amp], limit)
            right = _clipped_mean(reference[rows, amp + N_SIDE_REFERENCE_COLUMNS],
                                  usable[k][amp + N_SIDE_REFERENCE_COLUMNS], limit)
            # numpy scalar promotion decides float32 vs float64, exactly as in jwst
            per_amp.append(0.5 * (left + right))
        signals.append(per_amp)
    # float32 signals subtracted in float64 and rounded once give the float32 result,
    # so one float64 row serves whenever any signal came from the float64 fallback
    wide = any(np.asarray(s).dtype != np.float32 for per_amp in signals for s in per_amp)
    dtype = np.float64 if wide else np.float32
    rows_out = np.empty((len(row_sets), ncols), dtype=dtype)
    for k, per_amp in enumerate(signals):
        for amp in range(N_AMPLIFIERS):
            rows_out[k, amp::N_AMPLIFIERS] = per_amp[amp]
    return rows_out


def subtract_reference_drift(data: np.ndarray, pixeldq: np.ndarray, *,
                             odd_even_rows: bool = True, siglimit: float = 3.0
                             ) -> RefpixOutcome:
    """Correct MIRI full-frame ramps in place for amplifier bias drift.

    ``data`` float32 [nints, ngroups, nrows, ncols] (all rows of each integration);
    ``pixeldq`` uint32 [nrows, ncols].  The reference columns are the first and last
    four columns.  Call only when :func:`applies_to` says the step applies.
    """
    if data.dtype != np.float32:
        raise TypeError(f"refpix: data must be float32, got {data.dtype}")
    nints, ngroups, nrows, ncols = data.shape
    if ncols % N_AMPLIFIERS or ncols < 2 * N_SIDE_REFERENCE_COLUMNS:
        raise ValueError(f"refpix: {ncols} columns do not hold 4 amplifiers and 8 reference "
                         "columns")
    if pixeldq.shape != (nrows, ncols):
        raise ValueError(f"refpix: pixeldq shape {pixeldq.shape} != frame {(nrows, ncols)}")

    row_sets = _parity_rows(nrows, odd_even_rows)
    usable = _usable_positions(pixeldq, row_sets)
    warnings = _missing_reference_warnings(usable, odd_even_rows) if ngroups > 1 else []
    corrected = not warnings and ngroups > 1
    if warnings:
        warnings.append("Group 1 has no reference pixels")
    nref = N_SIDE_REFERENCE_COLUMNS

    for i in range(nints):
        first = data[i, 0].copy()
        # group 0 minus itself, plus itself: 0 + g0 (NaN where g0 is not finite)
        g0 = data[i, 0]
        g0 -= first
        g0 += first
        for g in range(1, ngroups):
            frame = data[i, g]
            if not warnings:
                reference = np.concatenate(
                    (frame[:, :nref] - first[:, :nref], frame[:, -nref:] - first[:, -nref:]),
                    axis=1)
                correction = _row_corrections(reference, usable, row_sets, siglimit, ncols)
            for r0 in range(0, nrows, _ROW_BAND):
                band = frame[r0:r0 + _ROW_BAND]
                base = first[r0:r0 + _ROW_BAND]
                band -= base
                if not warnings:
                    if odd_even_rows:
                        band[0::2] -= correction[0]
                        band[1::2] -= correction[1]
                    else:
                        band -= correction[0]
                band += base
    return RefpixOutcome(corrected, tuple(warnings))


# --- step plugin (added by the engine work) ---

from streamdet.core.plugins import hookimpl  # noqa: E402
from streamdet.core.step import Granularity, Param, Step  # noqa: E402

from . import follows  # noqa: E402


class RefpixStep(Step):
    """Removes amplifier bias drift using the MIRI reference columns (jwst 3.0 ``refpix``).

    It needs every row of an integration at once: the reference levels are statistics
    over the whole frame. MIRI subarrays have too few reference columns and are skipped,
    as jwst does."""

    name = "refpix"
    after = follows("refpix")
    granularity = Granularity.INTEGRATION
    status_keyword = "S_REFPIX"
    params_spec = {
        "odd_even_rows": Param(bool, True, "separate reference levels for odd and even rows"),
    }

    def prepare(self, meta, refs, pixeldq):
        verdict = applies_to(meta.ny, meta.nx)
        return None if verdict.applies else verdict.message

    def process(self, chunk):
        outcome = subtract_reference_drift(chunk.data, chunk.pixeldq,
                                           odd_even_rows=self.params["odd_even_rows"])
        self.warnings = outcome.warnings


@hookimpl
def streamdet_steps():
    return [RefpixStep]
