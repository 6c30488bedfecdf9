"""Classic (group-by-group) non-linearity correction of MIRI ramps.

Reproduces jwst 3.0 ``linearity`` through stcal's ``linearity_correction`` on its simple
path (the one jwst takes whenever NFRAMES = 1, i.e. for all MIRI readout patterns in use):

* Each group value is replaced by the polynomial ``c0 + c1*x + ... + cn*x^n`` of the raw
  value ``x`` (pedestal included, MIRI has no superbias), evaluated by Horner's rule in
  float32 in exactly stcal's order: ``r = cn*x; r += c(n-1); r *= x; ...; r += c1;
  r *= x; r += c0``.  Bit-identical results depend on keeping that order and dtype.
* Groups flagged SATURATED keep their raw value.  No other flag exempts a group, and
  NaN data stay NaN.
* A pixel gets identity coefficients (``c1 = 1``, all others 0) when its reference DQ has
  NO_LIN_CORR, when any of its coefficients is NaN, or when its linear coefficient is 0;
  the last two also add NO_LIN_CORR to ``pixeldq``.
* The whole reference DQ (e.g. NONLINEAR, NO_LIN_CORR) is ORed into ``pixeldq``.

Not reproduced: the read-level path that stcal takes when jwst hands it INV_COEFFS (only
when NFRAMES > 1 and the exposure has no read times), and ZEROFRAME correction (MIRI
files carry no zero frame).

Pixeldq contribution: purely from the reference (its DQ plus NO_LIN_CORR for NaN/zero
coefficients); :func:`prepare_linearity_reference` computes it once per exposure.
"""

from __future__ import annotations

import numpy as np

from streamdet.core.dqflags import NO_LIN_CORR, SATURATED

#: samples in one block of the polynomial evaluation (all groups of a few rows)
BLOCK_SAMPLES = 1 << 18


def prepare_linearity_reference(coeffs: np.ndarray, ref_dq: np.ndarray | None):
    """Return ``(usable_coeffs, pixeldq_contribution)`` for a LINEARITY reference.

    ``coeffs`` ``[ncoeffs, nrows, nx]`` (float32 as stored, at least 2 terms) is copied,
    with identity coefficients put into pixels that cannot be corrected; the
    contribution is uint32 ``[nrows, nx]``.  The inputs are not modified.
    """
    usable = np.array(coeffs, dtype=np.float32, copy=True)
    if usable.ndim != 3 or usable.shape[0] < 2:
        raise ValueError(f"linearity coefficients must be [ncoeffs>=2, ny, nx], got {usable.shape}")
    frame_shape = usable.shape[1:]
    if ref_dq is None:
        ref_dq = np.zeros(frame_shape, dtype=np.uint32)
    ref_dq = np.asarray(ref_dq).astype(np.uint32, copy=False)

    flagged_in_ref = (ref_dq & NO_LIN_CORR) != 0
    undefined = np.isnan(usable).any(axis=0)
    # the zero test sees the coefficients after the other two repairs, as in stcal
    no_slope = (usable[1] == 0) & ~(flagged_in_ref | undefined)
    identity = flagged_in_ref | undefined | no_slope

    usable[:, identity] = 0.0
    usable[1, identity] = 1.0
    contribution = ref_dq | np.where(undefined | no_slope, np.uint32(NO_LIN_CORR), np.uint32(0))
    return usable, contribution


def apply_linearity_polynomial(data: np.ndarray, groupdq: np.ndarray,
                               usable_coeffs: np.ndarray, *, band_rows: int | None = None) -> None:
    """Correct every non-SATURATED group of ``data`` in place with prepared coefficients.

    Works on blocks of rows (all groups at once) so the Horner temporaries stay in
    cache; ``band_rows`` (default: about :data:`BLOCK_SAMPLES` samples a block) sets
    their height. Each sample sees the same float32 operations in the same order
    whatever the blocks.
    """
    nints, ngroups, nrows, ncols = data.shape
    ncoeffs = usable_coeffs.shape[0]
    if band_rows is None:
        band_rows = max(1, BLOCK_SAMPLES // max(1, ngroups * ncols))
    result = np.empty((ngroups, min(band_rows, nrows), ncols), dtype=np.float32)
    for r0 in range(0, nrows, band_rows):
        r1 = min(r0 + band_rows, nrows)
        coeffs = usable_coeffs[:, r0:r1]
        out = result[:, : r1 - r0]
        for integ in range(nints):
            raw = data[integ, :, r0:r1]
            np.multiply(coeffs[ncoeffs - 1], raw, out=out)
            for k in range(ncoeffs - 2, 0, -1):
                np.add(out, coeffs[k], out=out)
                np.multiply(out, raw, out=out)
            np.add(out, coeffs[0], out=out)
            unsaturated = (groupdq[integ, :, r0:r1] & SATURATED) == 0
            np.copyto(raw, out, where=unsaturated)


def correct_linearity(
    data: np.ndarray,
    groupdq: np.ndarray,
    pixeldq: np.ndarray,
    coeffs: np.ndarray,
    ref_dq: np.ndarray | None,
    *,
    prepared=None,
) -> None:
    """Apply the linearity correction in place and OR the reference flags into ``pixeldq``.

    ``data`` float32 ``[nints, ngroups, nrows, nx]``, ``groupdq`` uint8 same shape (read
    only), ``pixeldq`` uint32 ``[nrows, nx]``; ``coeffs`` ``[ncoeffs, nrows, nx]`` and
    ``ref_dq`` ``[nrows, nx]`` from the LINEARITY reference.  ``prepared`` may carry a
    cached :func:`prepare_linearity_reference` result for the same reference.
    The ``pixeldq`` part is reference-only (idempotent across integrations).
    """
    if prepared is None:
        prepared = prepare_linearity_reference(coeffs, ref_dq)
    usable, contribution = prepared
    apply_linearity_polynomial(data, groupdq, usable)
    np.bitwise_or(pixeldq, contribution, out=pixeldq)


# --- step plugin (added by the engine work) ---

from streamdet.core.plugins import hookimpl  # noqa: E402
from streamdet.core.references import IMAGE  # noqa: E402
from streamdet.core.step import Step  # noqa: E402

from . import follows  # noqa: E402


class LinearityStep(Step):
    """Corrects the classical non-linearity on raw DN (jwst 3.0 ``linearity``)."""

    name = "linearity"
    after = follows("linearity")
    reftypes = ("linearity",)
    status_keyword = "S_LINEAR"
    thread_safe = True

    def prepare(self, meta, refs, pixeldq):
        if meta.nframes > 1:
            return "NFRAMES > 1 needs the read-level (INV_COEFFS) correction, not implemented"
        coeffs = refs.array("linearity", "COEFFS", layout=("ncoeffs>=2", "ny", "nx"))
        ref_dq = refs.dq("linearity", layout=IMAGE) if refs.has("linearity", "DQ") else None
        self.usable, contribution = prepare_linearity_reference(coeffs, ref_dq)
        np.bitwise_or(pixeldq, contribution, out=pixeldq)
        return None

    def process(self, chunk):
        apply_linearity_polynomial(chunk.data, chunk.groupdq, self.usable[:, chunk.rows])


@hookimpl
def streamdet_steps():
    return [LinearityStep]
