"""Likelihood ramp fitting as jwst 3.0 runs it (``ramp_fit.algorithm = 'LIKELY'``, stcal
1.20's ``likely_fit``), after Brandt (2024, PASP 136, 045004 and 045005), for ramps with
one read per group (MIRI).

What is computed, per pixel and integration (our formulation of the same estimator)
-----------------------------------------------------------------------------------
Reads ``y_0 .. y_{n}`` are ``dt`` (the group time) apart; the fit works on the rates of
the differences ``d_k = (y_{k+1} - y_k) / dt`` (the subtraction in single precision, as
the ramp is stored).  Their covariance is tridiagonal: with ``R`` the READNOISE reference
(the noise of a difference of two reads), a gain ``g`` and a rate ``c`` for the photon
noise,

    C_kk = c / (g dt) + R^2 / dt^2,    C_k,k+1 = -R^2 / (2 dt^2).

A difference is used when both its groups have a group DQ of exactly 0 (any flag,
JUMP_DET included, removes both differences touching the group).  Dropping differences
removes their rows and columns from ``C``; the generalised least-squares rate of the used
ones is ``a = (1' P d) / (1' P 1)`` with ``P = C^-1``, its variance ``1 / (1' P 1)``.
``P d``, ``P 1`` and the diagonal of ``P`` come from one forward elimination and one
backward sweep over the differences (the diagonal from the forward and backward pivots:
``P_kk = 1 / (f_k + b_k - C_kk)``), so a ramp costs time linear in its length and no
determinant is formed (stcal evaluates Brandt's closed-form recursions instead; the
numbers agree to rounding).  The per-ramp loops are C (``_likely.c``, called through
ctypes, which releases the GIL for the band threads); this module prepares the buffers
and does the DQ and the combination of integrations with numpy.

1. *Covariance for jump detection*: ``c`` is the median of all the integration's
   differences (unused ones included, as stcal does), clipped at 0.
2. *Jump detection* (Brandt's paper II, stcal's defaults): leaving difference ``k`` out
   lowers the chi-square by ``(p_k - a q_k)^2 / (P_kk - q_k^2 / S)`` (``p = P d``,
   ``q = P 1``, ``S = 1' q``); the difference with the largest improvement is dropped
   if that improvement exceeds 20.25 (4.5 sigma), its end group gets JUMP_DET, and the
   ramp is searched again while it keeps at least 4 used differences.  A ramp with one
   used difference is not searched.  With two, leaving out either improves the
   chi-square equally: stcal's choice then follows its rounding (either one, now and
   then both); ours is the larger difference.  Pairs of differences are never dropped
   together (one read per group: stcal allows that only for multi-read groups), but
   stcal's search stops when its formula for omitting a pair gives NaN: besides
   a ramp of two adjacent differences (sometimes, by rounding, see above), that happens
   by rounding on a 0/0 of that formula, for a zero-rate covariance on a single run of
   4 or 6 used differences (before or after a drop; a zero rate is common for pixels
   that saturate early, whose flat saturated differences set the median); we search
   those ramps as any other.
3. *Rate for the covariance of the fit*: the rate of step 2's last fit (the one without
   the dropped differences), clipped at 0, plus the average dark current; NaN when
   nothing is usable.
4. *Fit* with that covariance: SCI ``a``, ERR ``sqrt(1 / S)``, with normalised weights
   ``w = q / S``: VAR_POISSON ``sum w_k^2 c / (g dt)``, VAR_RNOISE
   ``(sum w_k^2 - sum w_k w_{k+1}) R^2 / dt^2``.  An integration with no used difference
   is NaN in all four.
5. *DQ per integration*: pixel DQ, DO_NOT_USE when every group is SATURATED or
   DO_NOT_USE, SATURATED when any group is, JUMP_DET when any group has it (the jump
   step's flags and step 2's).
6. *Exposure* (more than one integration): starting from the NaN-ignoring median of the
   integrations' rates, twice: each integration's VAR_POISSON is rescaled to that rate
   (scale ``rate / rate_i``, 0 when negative or undefined), weights
   ``1 / (VAR_POISSON' + VAR_RNOISE)`` normalised over the finite ones, rate = weighted
   mean; VAR_* the weighted sums with squared weights, ERR their root; DQ the OR of the
   integrations' without DO_NOT_USE, which is set when every integration has it.  In
   single precision, as stcal keeps the per-integration products.  With one integration
   the rate is the integration's.

Each pixel's numbers come from the same operations in the same order whatever band or
chunk of pixels it falls in, so bands stitch bit-identically.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from pathlib import Path

import numpy as np

from streamdet.core.dqflags import DO_NOT_USE, JUMP_DET, SATURATED
from streamdet.core.products import RateArrays

#: chi-square improvement above which a difference is a jump (stcal's default, 4.5^2)
JUMP_CHISQ_THRESHOLD = 20.25
#: a ramp is searched again after a drop only while it keeps this many used differences
MIN_DIFFS_TO_SEARCH = 4
#: jwst runs LIKELY only from this many groups on (fewer: its OLS_C fit)
MIN_GROUPS = 4

#: samples (integrations x groups x pixels) per call of the C loops: bounds the
#: temporaries of the DQ reductions around it
DEFAULT_CHUNK_ELEMENTS = 1 << 19


class KernelsNotBuilt(ImportError):
    """The compiled loops are missing (the package was installed without building them)."""


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_likely{suffix}"
        if path.exists():
            lib = ctypes.CDLL(str(path))
            p, i, d = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
            lib.lk_find_jumps.argtypes = [i, i, p, p, p, p, d, i, p, p]
            lib.lk_fit.argtypes = [i, i, i, p, i, i, p, i, i, d, p, p, p, d, i, p, p, p, p, p]
            lib.lk_gls.argtypes = [i, i, p, p, p, p, p, p, p, p]
            for fn in (lib.lk_find_jumps, lib.lk_fit, lib.lk_gls):
                fn.restype = i
            return lib
    raise KernelsNotBuilt(f"streamdet-likely's compiled loops are not built in {here}: "
                          "reinstall streamdet-likely with a C compiler available")


def _call(name, *args):
    if getattr(_library(), name)(*args) != 0:
        raise MemoryError(f"streamdet-likely: {name} could not allocate its scratch")


def _f64(a):
    return np.ascontiguousarray(a, dtype=np.float64)


def find_jumps(d: np.ndarray, use: np.ndarray, diag: np.ndarray, off: np.ndarray,
               threshold: float = JUMP_CHISQ_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Brandt's iterative likelihood jump search (step 2 of the module notes) on given
    covariances: ``d`` float64 ``[n, m]`` (DN/s), ``use`` bool ``[n, m]`` (updated in
    place: dropped differences become False), ``diag``/``off`` ``[m]``.  Returns
    ``(rate, jumps)``: the rate of the last fit without the dropped differences (NaN when
    none is used), and bool ``[n, m]``, True where a difference was dropped."""
    n, m = use.shape
    d = _f64(d)
    flags = np.ascontiguousarray(use, dtype=np.uint8)
    diag, off = _f64(diag), _f64(off)
    rate = np.empty(m)
    jumps = np.zeros((n, m), np.uint8)
    _call("lk_find_jumps", n, m, _ptr(d), _ptr(flags), _ptr(diag), _ptr(off),
          float(threshold), MIN_DIFFS_TO_SEARCH, _ptr(rate), _ptr(jumps))
    use[...] = flags.astype(bool)
    return rate, jumps.astype(bool)


def gls_sums(d: np.ndarray, use: np.ndarray, diag: np.ndarray, off: np.ndarray):
    """One generalised least-squares solve per column on the used differences:
    ``(S, N, Q2, Q11)`` with ``q = C^-1 1``: ``S = sum q``, ``N = sum q d``,
    ``Q2 = sum q^2``, ``Q11 = sum q_k q_{k+1}`` (rate ``N / S``, variance ``1 / S``)."""
    n, m = use.shape
    d = _f64(d)
    flags = np.ascontiguousarray(use, dtype=np.uint8)
    diag, off = _f64(diag), _f64(off)
    out = [np.empty(m) for _ in range(4)]
    _call("lk_gls", n, m, _ptr(d), _ptr(flags), _ptr(diag), _ptr(off), *map(_ptr, out))
    return tuple(out)


def _ptr(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def fit_likely(
    data: np.ndarray,
    groupdq: np.ndarray,
    pixeldq: np.ndarray,
    *,
    readnoise: np.ndarray,
    gain: np.ndarray,
    group_time: float,
    average_dark_current: np.ndarray | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[RateArrays, RateArrays]:
    """Fit every ramp of a band of rows as jwst's LIKELY does; returns ``(rate, rateints)``.

    ``data`` float32 and ``groupdq`` uint8 ``[nints, ngroups, nrows, nx]`` span every
    integration; ``pixeldq`` uint32, ``readnoise`` (CDS, DN), ``gain`` (e/DN) and
    ``average_dark_current`` (DN/s, None = 0) are ``[nrows, nx]``.  One read per group
    ``group_time`` seconds apart.
    """
    data = np.asarray(data)
    groupdq = np.asarray(groupdq, dtype=np.uint8)
    if data.ndim != 4 or groupdq.shape != data.shape:
        raise ValueError(f"data and groupdq must be [nints, ngroups, nrows, nx]; got "
                         f"{data.shape} and {groupdq.shape}")
    nints, ngroups, nrows, ncols = data.shape
    if ngroups < 2:
        raise ValueError(f"likelihood ramp fitting needs at least 2 groups, got {ngroups}")
    if not group_time > 0:
        raise ValueError(f"group_time must be positive, got {group_time!r}")
    npix = nrows * ncols
    values = data.reshape(nints, ngroups, npix)
    flags = groupdq.reshape(nints, ngroups, npix)
    gain64 = np.asarray(gain, dtype=np.float64).reshape(npix)
    rn64 = np.asarray(readnoise, dtype=np.float64).reshape(npix)
    dark = (np.zeros(npix) if average_dark_current is None else
            np.asarray(average_dark_current, dtype=np.float64).reshape(npix))
    pdq = np.asarray(pixeldq, dtype=np.uint32).reshape(npix)

    rateints = RateArrays(*(np.empty((nints, npix), t) for t in
                            (np.float32, np.float32, np.uint32, np.float32, np.float32)))
    step = max(64, int(chunk_elements) // max(1, nints * (ngroups - 1)))
    for lo in range(0, npix, step):
        part = slice(lo, min(npix, lo + step))
        _fit_chunk(values[:, :, part], flags[:, :, part], pdq[part], rn64[part],
                   gain64[part], dark[part], float(group_time), rateints, part)
    rate = combine_integrations(rateints)
    return (RateArrays(*(a.reshape(nrows, ncols) for a in rate.arrays())),
            RateArrays(*(a.reshape(nints, nrows, ncols) for a in rateints.arrays())))


def _fit_chunk(values, flags, pdq, rn, gain, dark, dt, rateints, part):
    """All integrations of ``m`` pixels at once; the per-ramp loops are C
    (``_likely.c``), which reads the samples and flags where they are."""
    nints, ngroups, m = values.shape
    if values.strides[2] != values.itemsize or values.dtype != np.float32:
        values = np.ascontiguousarray(values, dtype=np.float32)
    if flags.strides[2] != 1:
        flags = np.ascontiguousarray(flags)
    read_var = rn * rn / (dt * dt)  # a difference's read noise, (DN/s)^2
    with np.errstate(divide="ignore", invalid="ignore"):
        photon_per_rate = 1.0 / (gain * dt)
    sci, err, vp, vr = (np.empty(nints * m) for _ in range(4))
    jumped = np.zeros(nints * m, np.uint8)
    vs, fs = values.strides, flags.strides
    _call("lk_fit", nints, ngroups, m, _ptr(values), vs[0] // 4, vs[1] // 4, _ptr(flags),
          fs[0], fs[1], dt, _ptr(_f64(read_var)), _ptr(_f64(photon_per_rate)),
          _ptr(_f64(dark)), JUMP_CHISQ_THRESHOLD, MIN_DIFFS_TO_SEARCH, _ptr(sci),
          _ptr(err), _ptr(vp), _ptr(vr), _ptr(jumped))

    seen_any = np.bitwise_or.reduce(flags, axis=1).astype(np.uint32)
    unusable_all = np.bitwise_and.reduce((flags & np.uint8(SATURATED | DO_NOT_USE)) != 0,
                                         axis=1)
    dq = np.broadcast_to(pdq, (nints, m)) | (seen_any & np.uint32(SATURATED | JUMP_DET))
    dq[jumped.reshape(nints, m) != 0] |= np.uint32(JUMP_DET)
    dq[unusable_all] |= np.uint32(DO_NOT_USE)

    for mine, arr in ((rateints.sci, sci), (rateints.err, err), (rateints.dq, dq),
                      (rateints.var_poisson, vp), (rateints.var_rnoise, vr)):
        mine[:, part] = arr.reshape(nints, m)


def combine_integrations(ints: RateArrays) -> RateArrays:
    """The exposure's rate from the integrations' (step 6 of the module notes); each
    argument ``[nints, npix]``, the result ``[npix]``."""
    nints = ints.sci.shape[0]
    if nints == 1:
        return RateArrays(*(a[0].copy() for a in ints.arrays()))
    data = ints.sci
    vp_i, vr_i = ints.var_poisson, ints.var_rnoise
    finite = ~np.isnan(data)
    any_finite = finite.any(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = _nan_median(data, finite)
        for _ in range(2):
            ratio = slope[None, :] / data
            ratio[~np.isfinite(ratio) | (ratio < 0)] = 0
            vp_scaled = vp_i * ratio
            weight = np.float32(1.0) / (vp_scaled + vr_i)
            weight /= _nan_sum(weight)[None, :]
            slope = _nan_sum(data * weight)
            slope[~any_finite] = np.nan
        vp = _nan_sum(vp_scaled * weight * weight)
        vr = _nan_sum(vr_i * weight * weight)
        vp[~any_finite] = np.nan
        vr[~any_finite] = np.nan
        err = np.sqrt(vp + vr)
    dq = np.bitwise_or.reduce(ints.dq, axis=0) & np.uint32(~DO_NOT_USE & 0xFFFFFFFF)
    dq[np.bitwise_and.reduce((ints.dq & np.uint32(DO_NOT_USE)) != 0, axis=0)] |= np.uint32(DO_NOT_USE)
    return RateArrays(slope.astype(np.float32), err.astype(np.float32), dq,
                      vp.astype(np.float32), vr.astype(np.float32))


def _nan_sum(values: np.ndarray) -> np.ndarray:
    """Sum over integrations (axis 0) in their order, NaN counted as 0."""
    total = np.where(np.isnan(values[0]), np.float32(0), values[0])
    for row in values[1:]:
        total = total + np.where(np.isnan(row), np.float32(0), row)
    return total


def _nan_median(values: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """Median over integrations ignoring NaN (NaN where all are)."""
    if finite.all():
        return np.median(values, axis=0)
    # nanmedian warns on all-NaN pixels (and warning filters are not thread-safe)
    none = ~finite.any(axis=0)
    median = np.nanmedian(np.where(none[None, :], np.float32(0), values), axis=0)
    median[none] = np.nan
    return median
