"""Likelihood-based ("optimal") ramp fitting, after Brandt (2024, PASP 136, 045004).

The model
---------
A ramp read out up-the-ramp with one read per group (MIRI, NFRAMES = 1) is a series of
reads ``y_0 .. y_{n-1}`` taken ``dt`` (the group time) apart.  Work with the
differences ``d_k = y_{k+1} - y_k`` (DN): each has expectation ``a * dt`` for a count
rate ``a`` (DN/s), whatever the pedestal.  Two noise sources:

* read noise: every read carries independent noise of variance ``s2`` (DN^2); the
  READNOISE reference holds the noise of a difference of two reads (CDS), so
  ``s2 = readnoise^2 / 2``.  A difference gets ``2 s2``; two neighbouring differences
  share one read and so covary by ``-s2``;
* photon (Poisson) noise: the charge collected between two reads is independent of
  all other intervals, variance ``a dt / gain`` (DN^2) on the diagonal only.

The covariance matrix of the differences is therefore tridiagonal,
``C = (2 s2 + p) I - s2 (sub- and super-diagonal)`` with ``p = a dt / gain``, and the
best linear unbiased estimate of the rate is the generalised least-squares one::

    z = C^-1 u,   a_hat = (z . d) / (z . u) / dt,   Var(a_hat) = 1 / (z . u) / dt^2

(``u`` is the vector of ones over the differences used).  Brandt writes the inverse of
such a tridiagonal matrix in closed form with recursions whose cost is linear in the
number of groups; here the same linear cost comes from solving ``C z = u`` by
forward elimination and back substitution (the Thomas algorithm; ``C`` is symmetric
positive definite, so it needs no pivoting, and no determinant is ever formed, so long
ramps need no rescaling).  The solve is vectorised over pixels and integrations; the
loop runs over the differences.

Flags.  A group is usable when its DQ carries nothing but JUMP_DET (and PERSISTENCE,
which the built-in fit also ignores); DO_NOT_USE, SATURATED and any other bit make it
unusable, and a difference is used only when both its groups are usable.  A jump
flagged on group ``g`` lies in ``y_g - y_{g-1}``, so that difference is always dropped
and the ramp is split there.  By default (``jump_mask="read"``, the convention of
stcal's likelihood fit) the difference ``y_{g+1} - y_g`` is dropped too, i.e. the read
of the flagged group is left out: the jump step also flags single-read noise
excursions, and such a read pulls the next difference the other way, so keeping that
difference would bias the fit of every falsely flagged ramp; the price on a real jump
is one difference.  ``jump_mask="difference"`` keeps it (the built-in fit's segments
also start on the flagged group).  Dropping differences removes their rows and columns
from ``C``; the remaining blocks (the segments) are uncorrelated, so one solve fits all
segments of a ramp jointly with one common rate and a free offset per segment - the
likelihood-optimal way to combine segments, rather than a fit per segment followed by
a weighted average.

The covariance depends on the rate being measured.  The rate used in ``C`` starts from
the plain mean of the used differences of every integration of the pixel, and each
further iteration uses the previous joint estimate (negative rates clipped to 0, the
average dark current added, as stcal does).  Brandt shows that estimating ``C`` from
the data biases the fit, to first order by ``c^T C dw/da`` where ``c`` are the weights
of the estimate that fed ``C`` and ``w(a)`` the optimal weights.  When ``c`` is itself
the optimal estimate this vanishes (``C w`` is proportional to ``u`` and the weights
always sum to one, so ``u . dw/da = 0``); hence the default of two iterations: the
second one's covariance comes from an optimal estimate, which removes the first-order
bias without an explicit correction term.

Integrations.  Every integration of a pixel uses the same exposure-level rate in its
covariance, so the inverse variances ``S_i = z_i . u_i`` used to combine integrations
do not correlate with each integration's own fluctuations (the debiasing stcal's
likelihood fit does by rescaling Poisson variances to a common rate).  The exposure
rate is ``sum_i z_i . d_i / sum_i S_i`` - the joint fit of all integrations.

Variances.  With normalised weights ``w = z / S``: ``VAR_RNOISE = s2 (2 sum w_k^2 -
2 sum w_k w_{k+1}) / dt^2`` and ``VAR_POISSON = p sum w_k^2 / dt^2``; they add up to
``1 / S / dt^2``, and ERR is the root of their sum.  Across integrations the variances
combine with the weights ``S_i / sum S``.

Every per-pixel number is computed by the same operations in the same order whatever
band or chunk of pixels it falls in (sums run explicitly over the differences), so
bands stitch bit-identically.
"""

from __future__ import annotations

import numpy as np

from streamdet.core.dqflags import DO_NOT_USE, JUMP_DET, NO_GAIN_VALUE, PIXEL, SATURATED
from streamdet.core.products import RateArrays

_PERSISTENCE = PIXEL["PERSISTENCE"]
#: group DQ bits that leave a group usable (JUMP_DET cuts the ramp: see used_differences)
_HARMLESS = JUMP_DET | _PERSISTENCE
_BAD_GROUP = np.uint8(~_HARMLESS & 0xFF)
_UNUSABLE = DO_NOT_USE | SATURATED

#: float64 elements of (integrations x groups x pixels) handled at once
DEFAULT_CHUNK_ELEMENTS = 1 << 19


#: how a JUMP_DET group cuts the ramp: drop its read (both differences touching it) or
#: only the difference ending on it
JUMP_MASKS = ("read", "difference")


def used_differences(groupdq: np.ndarray, jump_mask: str = "read") -> np.ndarray:
    """Which group differences enter the fit.

    ``groupdq`` is ``[..., ngroups, npix]``; returns bool ``[..., ngroups - 1, npix]``.
    A difference is used when both its groups are usable (nothing but JUMP_DET or
    PERSISTENCE set) and, for a group flagged JUMP_DET, not if it ends on that group;
    with ``jump_mask="read"`` (the default) not if it starts on it either, so the read
    of the flagged group is left out altogether.
    """
    if jump_mask not in JUMP_MASKS:
        raise ValueError(f"jump_mask must be one of {JUMP_MASKS}, got {jump_mask!r}")
    groupdq = np.asarray(groupdq, dtype=np.uint8)
    good = (groupdq & _BAD_GROUP) == 0
    use = good[..., 1:, :] & good[..., :-1, :]
    jump = (groupdq & np.uint8(JUMP_DET)) != 0
    use &= ~jump[..., 1:, :]
    if jump_mask == "read":
        use &= ~jump[..., :-1, :]
    return use


class _Sums:
    """Per-pixel sums of one integration's solve: ``S = sum z``, ``N = sum z d``,
    ``Q2 = sum z^2`` and ``Q11 = sum z_k z_{k+1}``."""

    __slots__ = ("S", "N", "Q2", "Q11")

    def __init__(self, S, N, Q2, Q11):  # noqa: N803
        self.S, self.N, self.Q2, self.Q11 = S, N, Q2, Q11


def solve_weights(diffs: np.ndarray, use: np.ndarray, read_var: np.ndarray,
                  poisson_var: np.ndarray, want_moments: bool = True) -> _Sums:
    """Solve ``C z = u`` for every pixel and return the sums the fit needs.

    ``diffs`` float64 ``[n, m]`` (DN, anything where unused), ``use`` bool ``[n, m]``,
    ``read_var`` (variance of one read) and ``poisson_var`` (Poisson variance of one
    difference), both DN^2 ``[m]``.  A pixel whose noise is zero altogether gets
    uniform weights.  ``Q2`` and ``Q11`` are only computed with ``want_moments``.
    """
    n, m = use.shape
    base = 2.0 * read_var + poisson_var
    base = np.where(base > 0, base, 1.0)
    # couplings between neighbouring used differences (0 where either is dropped)
    off = np.zeros((max(n - 1, 0), m))
    if n > 1:
        np.copyto(off, -read_var, where=use[:-1] & use[1:])
    # diagonal: the noise of a used difference; 1 for a dropped one (decoupled, rhs 0)
    pivot = np.where(use, base, 1.0)
    y = use.astype(np.float64)  # right-hand side, eliminated in place
    factor = np.empty(m)
    tmp = np.empty(m)
    for k in range(1, n):
        b = off[k - 1]
        np.divide(b, pivot[k - 1], out=factor)
        np.multiply(factor, b, out=tmp)
        pivot[k] -= tmp
        np.multiply(factor, y[k - 1], out=tmp)
        y[k] -= tmp
    S = np.zeros(m)
    N = np.zeros(m)
    Q2 = np.zeros(m) if want_moments else None
    Q11 = np.zeros(m) if want_moments else None
    z = np.empty(m)
    z_next = np.empty(m)
    for k in range(n - 1, -1, -1):
        if k == n - 1:
            np.divide(y[k], pivot[k], out=z)
        else:
            np.multiply(off[k], z_next, out=z)
            np.subtract(y[k], z, out=z)
            z /= pivot[k]
        S += z
        np.multiply(z, diffs[k], out=tmp)
        # a dropped difference has z = 0 exactly; keep a NaN or inf there out of the sum
        np.copyto(tmp, 0.0, where=~use[k])
        N += tmp
        if want_moments:
            np.multiply(z, z, out=tmp)
            Q2 += tmp
            if k < n - 1:
                np.multiply(z, z_next, out=tmp)
                Q11 += tmp
        z, z_next = z_next, z
    return _Sums(S, N, Q2, Q11)


def fit_joint(
    data: np.ndarray,
    groupdq: np.ndarray,
    pixeldq: np.ndarray,
    *,
    readnoise: np.ndarray,
    gain: np.ndarray,
    group_time: float,
    average_dark_current: np.ndarray | None = None,
    iterations: int = 2,
    jump_mask: str = "read",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[RateArrays, RateArrays]:
    """Fit every ramp of a band of rows; returns ``(rate, rateints)``.

    ``data`` float32 and ``groupdq`` uint8 ``[nints, ngroups, nrows, nx]`` span every
    integration; ``pixeldq`` uint32, ``readnoise`` (CDS, DN), ``gain`` (e/DN) and
    ``average_dark_current`` (DN/s, None = 0) are ``[nrows, nx]``.  One read per group
    (NFRAMES = 1) ``group_time`` seconds apart.  ``iterations`` (>= 1) is the number of
    solves; each after the first takes its covariance from the previous joint rate.
    ``jump_mask`` says what a JUMP_DET group removes (see :func:`used_differences`).

    DQ follows the built-in fit: the pixel DQ, JUMP_DET / PERSISTENCE where any group
    had them, SATURATED where any group saturated, DO_NOT_USE (SCI NaN, variances and
    ERR 0) for an integration with no usable difference and for the rate where no
    integration is usable; a pixel whose DQ already says DO_NOT_USE or SATURATED, or
    whose gain is not positive (then also NO_GAIN_VALUE), is NaN everywhere.
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
    if jump_mask not in JUMP_MASKS:
        raise ValueError(f"jump_mask must be one of {JUMP_MASKS}, got {jump_mask!r}")
    iterations = int(iterations)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    npix = nrows * ncols
    dt = float(group_time)

    values = data.reshape(nints, ngroups, npix)
    flags = groupdq.reshape(nints, ngroups, npix)
    gain64 = np.asarray(gain, dtype=np.float64).reshape(npix)
    rn = np.asarray(readnoise, dtype=np.float64).reshape(npix)
    rn = np.where(np.isfinite(rn), np.abs(rn), 0.0)
    read_var = rn * rn / 2.0  # one read: the reference is the noise of a CDS pair
    if average_dark_current is None:
        dark = np.zeros(npix)
    else:
        dark = np.asarray(average_dark_current, dtype=np.float64).reshape(npix)
        dark = np.where(np.isfinite(dark), dark, 0.0)
    pdq = np.array(np.asarray(pixeldq).reshape(npix), dtype=np.uint32)
    good_gain = np.isfinite(gain64) & (gain64 > 0)
    pdq[~good_gain] |= np.uint32(DO_NOT_USE | NO_GAIN_VALUE)
    # Poisson variance of one difference per DN/s of rate
    p_per_rate = np.where(good_gain, dt / np.where(good_gain, gain64, 1.0), 0.0)

    rate = RateArrays(np.empty(npix, np.float32), np.empty(npix, np.float32),
                      np.empty(npix, np.uint32), np.empty(npix, np.float32),
                      np.empty(npix, np.float32))
    rateints = RateArrays(*(np.empty((nints, npix), dt_) for dt_ in
                            (np.float32, np.float32, np.uint32, np.float32, np.float32)))

    step = max(64, int(chunk_elements) // max(1, nints * ngroups))
    with np.errstate(all="ignore"):
        for lo in range(0, npix, step):
            part = slice(lo, min(npix, lo + step))
            _fit_chunk(values[:, :, part], flags[:, :, part], pdq[part], read_var[part],
                       p_per_rate[part], dark[part], dt, iterations, jump_mask,
                       rate, rateints, part)

    return (RateArrays(*(a.reshape(nrows, ncols) for a in rate.arrays())),
            RateArrays(*(a.reshape(nints, nrows, ncols) for a in rateints.arrays())))


def _fit_chunk(values, flags, pdq, read_var, p_per_rate, dark, dt, iterations, jump_mask,
               rate, rateints, part):
    """Fit ``m`` pixels, all integrations at once: the solve runs over
    ``[ndiffs, nints * m]`` columns (integration-major), so the Python loops depend on
    the number of groups only."""
    nints, ngroups, m = values.shape
    n = ngroups - 1
    d = np.subtract(values[:, 1:], values[:, :-1], dtype=np.float64)
    d = np.ascontiguousarray(d.transpose(1, 0, 2)).reshape(n, nints * m)
    use = used_differences(
        np.ascontiguousarray(flags.transpose(1, 0, 2)).reshape(ngroups, nints * m), jump_mask)
    use &= np.isfinite(d)
    read_var_cols = np.tile(read_var, nints)

    def per_pixel_total(cols):
        """Sum of a ``[nints * m]`` vector over integrations, always in the same order."""
        cols = cols.reshape(nints, m)
        total = cols[0].copy()
        for i in range(1, nints):
            total += cols[i]
        return total

    # starting rate: the plain mean of the used differences of all integrations
    total = np.zeros(nints * m)
    count = np.zeros(nints * m)
    for k in range(n):  # explicit order: the same sums in any chunk
        total += np.where(use[k], d[k], 0.0)
        count += use[k]
    total, count = per_pixel_total(total), per_pixel_total(count)
    guess = np.where(count > 0, total / np.where(count > 0, count, 1.0) / dt, 0.0)

    for it in range(iterations):
        current = np.maximum(guess, 0.0) + dark
        current = np.where(np.isfinite(current), current, dark)
        poisson_var = current * p_per_rate
        sums = solve_weights(d, use, read_var_cols, np.tile(poisson_var, nints),
                             want_moments=it == iterations - 1)
        S_tot = per_pixel_total(sums.S)
        N_tot = per_pixel_total(sums.N)
        fitted = S_tot > 0
        guess = np.where(fitted, N_tot / np.where(fitted, S_tot, 1.0) / dt, 0.0)

    # -- per integration: [nints, m] ----------------------------------------------------
    S = sums.S.reshape(nints, m)
    usable = use.reshape(n, nints, m).any(axis=0) & (S > 0)
    seen = np.bitwise_or.reduce(flags, axis=1)
    sat = (seen & np.uint8(SATURATED)) != 0
    dq = pdq[None, :] | (seen & np.uint8(JUMP_DET | _PERSISTENCE)).astype(np.uint32)
    dq[~usable] |= np.uint32(DO_NOT_USE)
    invalid_pixel = (pdq & np.uint32(_UNUSABLE)) != 0
    invalid = invalid_pixel[None, :] | ~usable
    S = np.where(usable, S, 1.0)
    scale = 1.0 / (S * S * (dt * dt))
    vr = read_var[None, :] * (2.0 * sums.Q2.reshape(nints, m)
                              - 2.0 * sums.Q11.reshape(nints, m)) * scale
    vp = poisson_var[None, :] * sums.Q2.reshape(nints, m) * scale
    sci = sums.N.reshape(nints, m) / S / dt
    err = np.sqrt(vp + vr)
    sci[invalid] = np.nan
    for arr in (vp, vr, err):
        arr[invalid] = 0.0
    rateints.sci[:, part] = sci
    rateints.err[:, part] = err
    rateints.var_poisson[:, part] = vp
    rateints.var_rnoise[:, part] = vr
    rateints.dq[:, part] = dq | np.where(sat, np.uint32(SATURATED), np.uint32(0))

    # -- exposure: integrations weighted by S_i / sum S (one covariance rate for all) ---
    w = np.where(usable, S, 0.0) / np.where(S_tot > 0, S_tot, 1.0)[None, :]
    vp_tot = per_pixel_total(w * w * vp)
    vr_tot = per_pixel_total(w * w * vr)
    rate_dq = pdq | np.bitwise_or.reduce(dq & np.uint32(JUMP_DET | _PERSISTENCE), axis=0)
    usable_anywhere = usable.any(axis=0)
    rate_dq[~usable_anywhere] |= np.uint32(DO_NOT_USE)
    invalid = invalid_pixel | ~usable_anywhere
    sci = np.where(usable_anywhere, guess, np.nan)
    err = np.sqrt(vp_tot + vr_tot)
    sci[invalid] = np.nan
    for arr in (vp_tot, vr_tot, err):
        arr[invalid] = 0.0
    rate_dq[sat.any(axis=0)] |= np.uint32(SATURATED)
    rate.sci[part] = sci
    rate.err[part] = err
    rate.dq[part] = rate_dq
    rate.var_poisson[part] = vp_tot
    rate.var_rnoise[part] = vr_tot
