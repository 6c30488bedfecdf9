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

from streamdet._ckernels import group_planes, pointer, strides
from streamdet._ckernels._linearity import ffi, lib
from streamdet.core.dqflags import NO_LIN_CORR


def prepare_linearity_reference(coeffs: np.ndarray, ref_dq: np.ndarray | None,
                                copy: bool = True):
    """Return ``(usable_coeffs, pixeldq_contribution)`` for a LINEARITY reference.

    ``coeffs`` ``[ncoeffs, nrows, nx]`` (float32 as stored, at least 2 terms) is copied,
    with identity coefficients put into pixels that cannot be corrected; the
    contribution is uint32 ``[nrows, nx]``.  The inputs are not modified, unless
    ``copy`` is false: then float32 ``coeffs`` are repaired where they are (for a caller
    that owns them; a full-frame reference is 17 MB).
    """
    usable = (np.array(coeffs, dtype=np.float32, copy=True) if copy
              else np.asarray(coeffs, dtype=np.float32))
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
                               usable_coeffs: np.ndarray) -> None:
    """Correct every non-SATURATED group of ``data`` in place with prepared coefficients.

    ``data`` float32 ``[nints, ngroups, nrows, ncols]``, ``groupdq`` uint8 the same shape,
    ``usable_coeffs`` ``[ncoeffs, nrows, ncols]``. Each sample is one pass of Horner's
    scheme in float32 (one C call per integration: the polynomial of every sample is
    evaluated where the sample is, with nothing to keep in memory between terms).
    """
    nints, ngroups, nrows, ncols = data.shape
    coeffs = np.asarray(usable_coeffs, dtype=np.float32)
    if strides(coeffs)[1:] != (ncols, 1):
        coeffs = np.ascontiguousarray(coeffs)
    for integ in range(nints):
        with group_planes(data[integ], groupdq[integ], modified=(0,)) as (ramp, ramp_dq):
            lib.streamdet_linearity(pointer(ffi, ramp), pointer(ffi, ramp_dq),
                                    pointer(ffi, coeffs), coeffs.shape[0], ngroups,
                                    nrows * ncols, strides(ramp)[0], strides(coeffs)[0])


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
