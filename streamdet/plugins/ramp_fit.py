"""Ramp fitting: turn each pixel's up-the-ramp samples into a count rate (DN/s).

Reproduces jwst 3.0 ``RampFitStep`` with its defaults (stcal 1.20 ``OLS_C``, optimal
weighting, ``suppress_one_group=True``, no firstgroup/lastgroup) for MIRI exposures,
giving the rateints products ``[nints, nrows, nx]`` and the rate products ``[nrows, nx]``:
SCI, ERR, DQ, VAR_POISSON, VAR_RNOISE.

The algorithm, as stcal runs it, in our words:

1. *Exposure-wide group discard (MIRI only, ngroups > 1).*  Leading groups that carry
   DO_NOT_USE in every pixel of every integration are cut away one by one, and each time
   the group that becomes first loses its JUMP_DET flag; then a final group that is
   DO_NOT_USE everywhere is cut too.  Fewer than two remaining groups means no product.
   A band of rows cannot see this, so the engine surveys it first
   (:func:`survey_dnu_groups`, :func:`plan_group_discard`) and hands the plan to
   :func:`fit_ramps`.
2. *One-good-group suppression* (before the discard, on the full group axis): a ramp
   with exactly one group whose DQ is clean apart from PERSISTENCE is made DO_NOT_USE
   in every group.
3. *Per pixel*: a zero/NaN gain marks the pixel DO_NOT_USE | NO_GAIN_VALUE.  The CDS
   read noise becomes a per-read noise in electrons, ``rn * gain / sqrt(2 nframes)``
   (rounded to float32 as stcal stores it).
4. *Median rate*, used only for the Poisson variance: per integration the median of the
   first differences of ``data / group_time`` (DO_NOT_USE and SATURATED samples are
   NaN, a difference ending on a JUMP_DET group is dropped; if no difference survives
   the first sample itself is used), NaN counted as 0, averaged over all integrations.
5. *Segments*: runs of clean groups; a run preceded by a group flagged JUMP_DET and
   nothing else starts on that group.  If any segment has two or more groups the
   one-group segments are dropped, otherwise only the first one-group segment is kept.
6. *Segment fit*: one group -> ``value / group_time``; two groups -> difference over
   ``group_time``; longer -> weighted least squares with weights
   ``|(i - mid) / mid| ** P`` (computed in single precision as stcal does), P chosen
   from the segment's signal-to-noise ratio (0, 0.4, 1, 3, 6, 10 at 5/10/20/50/100).
   Variances: Poisson ``(median_rate + dark) / (group_time * gain * (n - 1))``
   (dark alone when the median rate is not positive), read noise
   ``12 rn^2 / (group_time^2 gain^2 (n^3 - n))`` (``n = 2`` for the short cases).
7. *Integration*: slope weighted by inverse read-noise variance only (stcal's JP-4318),
   VAR_POISSON / VAR_RNOISE the inverse of summed inverse variances, ERR from the summed
   inverse *total* segment variances.  Whole-ramp saturation or unusability gives NaN
   with DO_NOT_USE (| SATURATED), variances and error 0.
8. *Exposure*: the same read-noise-only weighting across integrations; ERR is
   ``sqrt(VAR_POISSON + VAR_RNOISE)``; DO_NOT_USE only when every integration is
   unusable; SATURATED when any fitted group saturated; JUMP_DET / PERSISTENCE when any
   group had them.
9. *CHARGELOSS* (not produced for MIRI, kept for completeness): read-noise variances of
   affected ramps are recomputed as if the CHARGELOSS groups were usable.

stcal's 1e6 "large variance" cut-offs are applied at the same places, and its quirks
are kept (a lone one-group segment gives ``value / group_time``, pedestal included; a
ramp of only JUMP_DET groups gives 0; zero read noise gives NaN SCI with a finite ERR).
ZEROFRAME is not handled (MIRI has none).

Exposure-wide inputs: the discard plan above, and all integrations of a pixel at once
(the median rate averages over them).  One more whole-exposure rule of stcal is left
to the engine: if the first fitted group is SATURATED in every pixel of every
integration, stcal returns no product at all (:func:`survey_saturated_first_group`).

Implementation: pixels are processed in chunks.  Within a chunk most ramps carry
exactly the same group flags (those of the whole-group flaggers upstream); their
segments and usable differences are derived once from that template and the slopes
come from one pass over the samples, while the other pixels take a general per-pixel
path.  Every per-pixel result is computed with the same operations in the same order
whatever path, chunk or band it falls in, so bands stitch bit-identically into the whole
frame.  Arithmetic is double precision; results are rounded to float32 like stcal's.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from streamdet.core.products import RateArrays
from streamdet.core.dqflags import (
    DO_NOT_USE,
    JUMP_DET,
    NO_GAIN_VALUE,
    PIXEL,
    SATURATED,
)

_CHARGELOSS = PIXEL["CHARGELOSS"]
_PERSISTENCE = PIXEL["PERSISTENCE"]

# stcal's cut-off above which a variance is treated as meaningless and zeroed
_HUGE_VARIANCE = 1.0e6

# weighting exponent ladder of the optimal weighting, by segment signal-to-noise ratio
_SNR_EDGES = (5.0, 10.0, 20.0, 50.0, 100.0)
_POWERS = (0.0, 0.4, 1.0, 3.0, 6.0, 10.0)

_NOT_PERSISTENCE = np.uint8(~_PERSISTENCE & 0xFF)
_UNUSABLE = DO_NOT_USE | SATURATED


class UnusableExposureError(ValueError):
    """The exposure leaves nothing to fit (jwst's ramp_fit then returns no product)."""


class GroupDiscard(NamedTuple):
    """Groups removed from every ramp before fitting (MIRI)."""

    n_leading: int = 0
    drop_last: bool = False




# --------------------------------------------------------------------------------------
# exposure-wide group discard
# --------------------------------------------------------------------------------------


def survey_dnu_groups(groupdq: np.ndarray) -> np.ndarray:
    """Which groups are DO_NOT_USE in every pixel of this piece of the exposure.

    ``groupdq`` is ``[nints, ngroups, nrows, nx]`` or one integration
    ``[ngroups, nrows, nx]``.  The engine ANDs the vectors of all pieces and passes the
    result to :func:`plan_group_discard`.
    """
    groupdq = np.asarray(groupdq)
    group_axis = groupdq.ndim - 3
    other_axes = tuple(ax for ax in range(groupdq.ndim) if ax != group_axis)
    common = np.bitwise_and.reduce(groupdq, axis=other_axes)
    return (common & np.uint8(DO_NOT_USE)) != 0


def plan_group_discard(dnu_everywhere: np.ndarray) -> GroupDiscard:
    """Turn the exposure-wide DO_NOT_USE survey into stcal's MIRI group discard.

    Raises :class:`UnusableExposureError` where stcal gives up on the exposure: every
    group DO_NOT_USE everywhere, or fewer than two groups left.
    """
    dnu_everywhere = np.asarray(dnu_everywhere, dtype=bool)
    ngroups = dnu_everywhere.size
    if ngroups <= 1:
        # stcal only discards for ramps of more than one group
        return GroupDiscard(0, False)
    n_leading = 0
    while n_leading < ngroups and dnu_everywhere[n_leading]:
        n_leading += 1
    if n_leading == ngroups:
        raise UnusableExposureError(
            "every group is DO_NOT_USE in every pixel: nothing to fit")
    drop_last = bool(dnu_everywhere[-1])
    remaining = ngroups - n_leading - int(drop_last)
    if remaining < 2:
        raise UnusableExposureError(
            f"MIRI ramp fitting needs at least 2 groups per integration; {remaining} left "
            f"after discarding {n_leading} leading and {int(drop_last)} final "
            "all-DO_NOT_USE group(s)")
    return GroupDiscard(n_leading, drop_last)


def survey_saturated_first_group(groupdq: np.ndarray, discard=GroupDiscard()) -> bool:
    """True if the first fitted group is SATURATED in every pixel of this piece.

    When that holds for the whole exposure, stcal returns no product at all (rather
    than all-NaN images); the engine ANDs this over pieces to decide.
    """
    groupdq = np.asarray(groupdq)
    first = GroupDiscard(*discard).n_leading
    group_axis = groupdq.ndim - 3
    plane = np.take(groupdq, first, axis=group_axis)
    return bool(np.all((plane & np.uint8(SATURATED)) != 0))


# --------------------------------------------------------------------------------------
# optimal weighting
# --------------------------------------------------------------------------------------


def _ols_coefficients(length: int, power_code: int) -> np.ndarray:
    """Linear-functional form of the weighted LSQ slope (per group) of one segment shape.

    The slope is ``sum(c * y)`` with ``c_j = w_j (S_w j - S_x) / (S_w S_xx - S_x^2)``;
    stcal's per-pixel 1/rn^2 factor cancels and is dealt with by the caller.
    """
    index = np.arange(length, dtype=np.float64)
    mid = (length - 1) / 2.0
    # stcal takes powf of single-precision operands; a double power rounded to float32
    # reproduces glibc's powf (numpy's float32 power differs in the last bit ~10% of the time)
    base = np.abs((index - mid) * (1.0 / mid)).astype(np.float32).astype(np.float64)
    exponent = float(np.float32(_POWERS[power_code]))
    weight = np.power(base, exponent).astype(np.float32).astype(np.float64)
    sum_w = weight.sum()
    sum_x = (index * weight).sum()
    sum_xx = (index * index * weight).sum()
    return weight * (sum_w * index - sum_x) / (sum_w * sum_xx - sum_x * sum_x)


@lru_cache(maxsize=8)
def _coefficient_table(ngroups: int) -> tuple[np.ndarray, ...]:
    """Indexed by segment length: the ``[length, power_code]`` slope coefficients."""
    table = [np.zeros((0, len(_POWERS)))] * 3
    for length in range(3, ngroups + 1):
        coeff = np.stack([_ols_coefficients(length, code) for code in range(len(_POWERS))],
                         axis=1)
        coeff.setflags(write=False)
        table.append(coeff)
    return tuple(table)


def _power_code(snr: np.ndarray) -> np.ndarray:
    code = np.zeros(snr.shape, dtype=np.intp)
    for edge in _SNR_EDGES:
        code += snr >= edge
    # every comparison with NaN fails in stcal, which then picks the largest exponent
    code[np.isnan(snr)] = len(_POWERS) - 1
    return code


def _weighted_sums(coeff: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Column sums of ``coeff * window``, both ``[length, m]`` (window float32).

    einsum adds the groups in order for every column, so a pixel's result does not
    depend on which or how many other pixels are computed alongside it: bands of any
    height give bit-identical numbers.  (A BLAS product would not: its kernels change
    with the matrix shape.)  A single column would make einsum switch to a different
    summation, hence the padding.
    """
    if window.shape[1] == 1:
        return np.einsum("jk,jk->k", np.repeat(coeff, 2, axis=1),
                         np.repeat(window, 2, axis=1))[:1]
    return np.einsum("jk,jk->k", coeff, window)


def _weighted_sums_one(coeff: np.ndarray, window: np.ndarray) -> np.ndarray:
    """:func:`_weighted_sums` with one coefficient column ``[length]`` for every column of
    ``window``: the same sums (einsum adds the groups in order either way; checked
    bit-identical), without building the ``[length, m]`` coefficient array."""
    if window.shape[1] == 1:
        return np.einsum("j,jk->k", coeff, np.repeat(window, 2, axis=1))[:1]
    return np.einsum("j,jk->k", coeff, window)


# --------------------------------------------------------------------------------------
# segments
# --------------------------------------------------------------------------------------


class _Segments(NamedTuple):
    pixel: np.ndarray   # pixel index within the chunk
    start: np.ndarray   # first group
    length: np.ndarray  # number of groups

    def subset(self, mask) -> "_Segments":
        return _Segments(self.pixel[mask], self.start[mask], self.length[mask])


def _find_segments(core_dq: np.ndarray) -> _Segments:
    """Segments kept for fitting, ordered by pixel then time.

    ``core_dq`` is pixel-major ``[npix, ngroups]`` group DQ without the PERSISTENCE bit.
    """
    npix = core_dq.shape[0]
    clean = core_dq == 0
    opens = clean.copy()
    opens[:, 1:] &= ~clean[:, :-1]
    closes = clean.copy()
    closes[:, :-1] &= ~clean[:, 1:]
    pix, first = np.nonzero(opens)
    last = np.nonzero(closes)[1]
    # a run right after a JUMP_DET-only group starts on that group
    jump_only = (first > 0) & (core_dq[pix, np.maximum(first - 1, 0)] == JUMP_DET)
    start = first - jump_only
    length = last + 1 - start

    long_enough = length >= 2
    has_long = np.zeros(npix, dtype=bool)
    has_long[pix[long_enough]] = True
    first_of_pixel = np.ones(pix.size, dtype=bool)
    first_of_pixel[1:] = pix[1:] != pix[:-1]
    keep = long_enough | (first_of_pixel & ~has_long[pix])
    return _Segments(pix[keep], start[keep], length[keep])


def _ols_slopes(ramp: np.ndarray, segs: _Segments, code: np.ndarray, table) -> np.ndarray:
    """Weighted LSQ slope (DN per group) of segments of three groups or more.

    ``ramp`` is group-major ``[ngroups, npix]`` float32.  Segments are taken in groups
    of equal length; a group with one start covering most of the chunk is computed on
    the whole slab, others on gathered windows.
    """
    npix = ramp.shape[1]
    slopes = np.empty(segs.pixel.size, dtype=np.float64)
    for chosen in _by_length(segs.length):
        length = int(segs.length[chosen[0]])
        pix, start = segs.pixel[chosen], segs.start[chosen]
        s0 = int(start[0])
        if pix.size * 2 >= npix and np.all(start == s0):
            # one start for most of the chunk: per weighting exponent, a common
            # coefficient column over the slab (or over the few pixels gathered)
            slab = ramp[s0:s0 + length]
            codes = code[chosen]
            present = np.flatnonzero(np.bincount(codes, minlength=len(_POWERS)))
            for c in present:
                picked = slice(None) if present.size == 1 else np.flatnonzero(codes == c)
                where = pix[picked]
                if where.size * 4 >= npix:
                    sums = _weighted_sums_one(table[length][:, c], slab)[where]
                else:
                    sums = _weighted_sums_one(table[length][:, c], slab[:, where])
                slopes[chosen[picked]] = sums
        else:
            window = _window(ramp, pix, start, length)
            coeff = np.take(table[length], code[chosen], axis=1)
            slopes[chosen] = _weighted_sums(coeff, window)
    broken = np.flatnonzero(np.isnan(slopes))
    for chosen in _by_length(segs.length[broken]):
        # stcal fits NaN samples as zeros
        chosen = broken[chosen]
        length = int(segs.length[chosen[0]])
        window = _window(ramp, segs.pixel[chosen], segs.start[chosen], length)
        window[np.isnan(window)] = 0
        coeff = np.take(table[length], code[chosen], axis=1)
        slopes[chosen] = _weighted_sums(coeff, window)
    return slopes


def _by_length(lengths: np.ndarray) -> list[np.ndarray]:
    """Indices of equal segment lengths, grouped."""
    if lengths.size == 0:
        return []
    if np.all(lengths == lengths[0]):
        return [np.arange(lengths.size)]
    order = np.argsort(lengths, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(lengths[order])) + 1)


def _window(ramp, pix, start, length):
    """``[length, m]`` samples of the segments starting at ``start`` (gathered copy)."""
    rows = start[None, :] + np.arange(length)[:, None]
    return ramp[rows, pix[None, :]]


# --------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------

# pixels handled together: large enough to amortise the Python overhead, small enough
# for the temporaries to stay in cache
_CHUNK_PIXELS = 65536


class _Setup(NamedTuple):
    ngroups: int
    n_leading: int
    stop: int
    suppress: bool
    group_time: float
    first_read_time: float
    table: tuple


def fit_ramps(
    data: np.ndarray,
    groupdq: np.ndarray,
    pixeldq: np.ndarray,
    *,
    readnoise: np.ndarray,
    gain: np.ndarray,
    frame_time: float,
    group_time: float,
    nframes: int = 1,
    groupgap: int = 0,
    dropframes1: int = 0,
    average_dark_current: np.ndarray | None = None,
    suppress_one_group: bool = True,
    discard: GroupDiscard | tuple[int, bool] = GroupDiscard(),
) -> tuple[RateArrays, RateArrays]:
    """Fit all ramps of a band of rows; returns ``(rate, rateints)``.

    ``data`` float32 and ``groupdq`` uint8 are ``[nints, ngroups, nrows, nx]`` spanning
    every integration; ``pixeldq`` uint32, ``readnoise`` (CDS, DN), ``gain`` (e/DN) and
    ``average_dark_current`` (DN/s, None = 0) are ``[nrows, nx]``.  ``discard`` is the
    exposure-wide plan from :func:`plan_group_discard`.  ``groupgap`` and
    ``dropframes1`` only enter stcal's optional pedestal product, so they do not change
    these outputs.  Inputs are not modified.

    ``rate`` arrays are ``[nrows, nx]``, ``rateints`` arrays ``[nints, nrows, nx]``;
    SCI/ERR/VAR_* float32, DQ uint32.
    """
    del groupgap, dropframes1
    data = np.asarray(data, dtype=np.float32)
    groupdq = np.asarray(groupdq, dtype=np.uint8)
    nints, ngroups_in, nrows, ncols = data.shape
    npix = nrows * ncols
    n_leading, drop_last = GroupDiscard(*discard)
    stop = ngroups_in - int(bool(drop_last))
    ngroups = stop - n_leading
    if n_leading < 0 or ngroups < 1 or (ngroups_in > 1 and ngroups < 2):
        raise UnusableExposureError(
            f"discard plan {tuple(discard)} leaves {ngroups} of {ngroups_in} groups")
    # stcal reads the times as float32
    ftime = float(np.float32(frame_time))
    setup = _Setup(
        ngroups=ngroups, n_leading=n_leading, stop=stop,
        suppress=bool(suppress_one_group) and ngroups_in > 1,
        group_time=float(np.float32(group_time)),
        first_read_time=(float(np.float32(nframes)) + 1.0) * ftime / 2.0,
        table=_coefficient_table(ngroups),
    )

    values = data.reshape(nints, ngroups_in, npix)
    flags = groupdq.reshape(nints, ngroups_in, npix)
    gain64 = np.asarray(gain, dtype=np.float32).reshape(npix).astype(np.float64)
    rn_cds = np.asarray(readnoise, dtype=np.float32).reshape(npix).astype(np.float64)
    # stcal keeps the per-read noise in electrons as float32
    rnoise = (rn_cds * (gain64 / np.sqrt(2.0 * nframes))).astype(np.float32).astype(np.float64)
    if average_dark_current is None:
        dark = np.zeros(npix, dtype=np.float64)
    else:
        dark = np.asarray(average_dark_current, dtype=np.float32).reshape(npix).astype(np.float64)
    pdq = np.asarray(pixeldq).reshape(npix).astype(np.uint32)
    pdq |= np.where(gain64 > 0, np.uint32(0), np.uint32(DO_NOT_USE | NO_GAIN_VALUE))

    rate = RateArrays(*(np.empty(npix, np.float32) for _ in range(2)),
                      np.empty(npix, np.uint32),
                      *(np.empty(npix, np.float32) for _ in range(2)))
    rateints = RateArrays(*(np.empty((nints, npix), np.float32) for _ in range(2)),
                          np.empty((nints, npix), np.uint32),
                          *(np.empty((nints, npix), np.float32) for _ in range(2)))

    with np.errstate(all="ignore"):
        for lo in range(0, npix, _CHUNK_PIXELS):
            part = slice(lo, min(lo + _CHUNK_PIXELS, npix))
            _fit_chunk(setup, values[:, :, part], flags[:, :, part], pdq[part],
                       rnoise[part], gain64[part], dark[part],
                       RateArrays(*(a[part] for a in _fields(rate))),
                       RateArrays(*(a[:, part] for a in _fields(rateints))))

    rate = RateArrays(*(a.reshape(nrows, ncols) for a in _fields(rate)))
    rateints = RateArrays(*(a.reshape(nints, nrows, ncols) for a in _fields(rateints)))
    return rate, rateints


def _fields(arrays: RateArrays):
    return (arrays.sci, arrays.err, arrays.dq, arrays.var_poisson, arrays.var_rnoise)


class _Layout(NamedTuple):
    """How the ramps of one integration in a chunk are flagged.

    Most pixels carry exactly the same group flags (those of the upstream steps that
    flag whole groups); for them segments, counts and usable differences are worked
    out once from that ``template``.  ``regular`` marks them; everything else takes
    the general per-pixel path.  Both paths do identical arithmetic per pixel.
    """

    template: np.ndarray     # [ngroups] uint8
    regular: np.ndarray      # [npix] bool
    irregular: np.ndarray    # indices of the other pixels
    only_first: np.ndarray | None  # [npix] bool, single clean group is the first


def _layout(gdq: np.ndarray, suppress: bool) -> _Layout:
    ngroups, npix = gdq.shape
    # the commonest flag value of each group, from a sample: it only picks the fast
    # path for the pixels that match it, so an unlucky sample costs time, not accuracy
    sample = gdq[:, :: max(1, npix // 4096)]
    # one bincount for all groups: group g's values are counted at g*256 + value
    keyed = sample + (np.arange(ngroups, dtype=np.intp) * 256)[:, None]
    counts = np.bincount(keyed.ravel(), minlength=ngroups * 256).reshape(ngroups, 256)
    template = counts.argmax(axis=1).astype(np.uint8)
    regular = np.logical_and.reduce(gdq == template[:, None], axis=0)
    only_first = None
    if not suppress:
        only_first = (np.count_nonzero(gdq == 0, axis=0) == 1) & (gdq[0] == 0)
    return _Layout(template, regular, np.flatnonzero(~regular), only_first)


def _usable_flags(flags: np.ndarray, setup: _Setup) -> np.ndarray:
    """Group DQ of one integration as stcal fits it: suppressed, trimmed, group-major."""
    gdq = flags[setup.n_leading:setup.stop].copy()
    if setup.suppress:
        # suppression counts clean groups on the untrimmed ramp, before the discard
        # clears JUMP_DET on the new first group
        clean = (flags & _NOT_PERSISTENCE) == 0
        n_clean = np.add.reduce(clean.view(np.uint8), axis=0, dtype=np.uint32)
        gdq |= np.where(n_clean == 1, np.uint8(DO_NOT_USE), np.uint8(0))
    if setup.n_leading > 0:
        gdq[0] &= np.uint8(~JUMP_DET & 0xFF)
    return gdq


def _fit_chunk(setup, values, flags, pdq, rnoise, gain, dark, rate, rateints):
    """Fit one chunk of pixels (all integrations); writes into ``rate``/``rateints``."""
    nints = values.shape[0]
    npix = pdq.size
    ramps = [values[integ, setup.n_leading:setup.stop] for integ in range(nints)]
    gdqs = [_usable_flags(flags[integ], setup) for integ in range(nints)]
    layouts = [_layout(gdq, setup.suppress) for gdq in gdqs]
    median_rate = _median_rate(ramps, gdqs, layouts, setup)

    rate_dq = pdq.copy()
    sum_inv_p = np.zeros(npix)
    sum_inv_r = np.zeros(npix)
    sum_num = np.zeros(npix)
    unusable_everywhere = np.ones(npix, dtype=bool)
    saturated_everywhere = np.ones(npix, dtype=bool)
    saturated_somewhere = np.zeros(npix, dtype=bool)
    lossy = []
    ints_vr = np.empty((nints, npix))
    for integ in range(nints):
        fit = _fit_integration(setup, ramps[integ], gdqs[integ], layouts[integ], pdq,
                               rnoise, gain, dark, median_rate)
        rateints.sci[integ] = fit.sci
        rateints.err[integ] = fit.err
        rateints.var_poisson[integ] = fit.var_poisson
        ints_vr[integ] = fit.var_rnoise
        rateints.dq[integ] = fit.dq | np.where(fit.any_saturated, np.uint32(SATURATED), 0)
        rate_dq |= fit.dq & np.uint32(JUMP_DET | _PERSISTENCE)
        unusable_everywhere &= (fit.dq & np.uint32(DO_NOT_USE)) != 0
        saturated_everywhere &= (fit.dq & np.uint32(SATURATED)) != 0
        saturated_somewhere |= fit.any_saturated
        sum_inv_p += fit.inv_p
        sum_inv_r += fit.inv_r
        sum_num += fit.num
        lossy.append(fit.chargeloss)

    rate_dq[unusable_everywhere] |= np.uint32(DO_NOT_USE)
    rate_dq[saturated_everywhere] |= np.uint32(SATURATED)
    vp = np.where(sum_inv_p > 0, 1.0 / sum_inv_p, 0.0)
    vp[(vp >= _HUGE_VARIANCE) | (vp < 0)] = 0.0
    # a sum that is not positive (0 or NaN) is passed through as it is
    vr = np.where(sum_inv_r > 0, 1.0 / sum_inv_r, sum_inv_r)
    vr[vr >= _HUGE_VARIANCE] = 0.0
    err = np.sqrt(vp + vr)
    sci = sum_num * vr
    invalid = (rate_dq & np.uint32(_UNUSABLE)) != 0
    sci[invalid] = np.nan
    vp[invalid] = 0.0
    vr[invalid] = 0.0
    err[invalid] = 0.0
    # partial saturation is flagged only after the NaN decisions above
    rate_dq[saturated_somewhere] |= np.uint32(SATURATED)

    lossy = np.array(lossy)
    if lossy.any():
        # the rate SCI/ERR keep the variance used before; only VAR_RNOISE is redone
        only_first = [layout.only_first for layout in layouts]
        _redo_chargeloss_rnoise(flags[:, setup.n_leading:setup.stop], lossy, only_first,
                                ints_vr, vr, rnoise, gain, setup)
    rateints.var_rnoise[...] = ints_vr

    rate.sci[...] = sci
    rate.err[...] = err
    rate.dq[...] = rate_dq
    rate.var_poisson[...] = vp
    rate.var_rnoise[...] = vr


def _median_rate(ramps, gdqs, layouts, setup):
    """Pixel rate estimate for the Poisson variance (stcal's median rate)."""
    ngroups, npix = ramps[0].shape
    total = np.zeros(npix, dtype=np.float64)
    for ramp, gdq, layout in zip(ramps, gdqs, layouts):
        if ngroups == 1:
            # stcal's single-group branch: SATURATED read as NaN, nothing screened
            first = np.where((gdq[0] & np.uint8(SATURATED)) != 0, np.nan,
                             ramp[0].astype(np.float64))
            total += first / setup.first_read_time
            continue
        median = np.empty(npix, dtype=np.float64)
        general = ~layout.regular
        regular = np.flatnonzero(layout.regular)
        if regular.size:
            t = layout.template
            unusable = ((t[1:] | t[:-1]) & np.uint8(_UNUSABLE)) | (t[1:] & np.uint8(JUMP_DET))
            usable = np.flatnonzero(unusable == 0)
            if usable.size:
                if usable[-1] - usable[0] + 1 == usable.size:
                    a, b = int(usable[0]), int(usable[-1]) + 1
                    diffs = ramp[a + 1:b + 1] - ramp[a:b]
                else:
                    diffs = ramp[usable + 1] - ramp[usable]
                ordered = np.ascontiguousarray(diffs.T)
                ordered.sort(axis=1)
                n_valid = np.full(npix, usable.size)
                median[:] = _middle(ordered, n_valid, None, setup.group_time)
                # NaN samples make the count per pixel: leave those to the general path
                general |= np.isnan(ordered[:, -1])
                # float32 differences are exact (Sterbenz) when all samples are positive
                # and within a factor two; other ramps get double-precision differences
                low = np.minimum.reduce(ramp, axis=0)
                high = np.maximum.reduce(ramp, axis=0)
                general |= ~((low > 0) & (high <= 2 * low))
            else:
                first = ramp[0].astype(np.float64) / setup.group_time
                if t[0] & _UNUSABLE:
                    first[:] = np.nan
                median[:] = first
        picked = np.flatnonzero(general)
        if picked.size:
            median[picked] = _median_general(ramp[:, picked], gdq[:, picked], setup)
        if layout.only_first is not None and layout.only_first.any():
            median = np.where(layout.only_first,
                              ramp[0].astype(np.float64) / setup.first_read_time, median)
        total += np.where(np.isnan(median), 0.0, median)
    return total / len(ramps)


def _median_general(ramp, gdq, setup):
    """Median rate of individual ramps (``[ngroups, m]``), any flags."""
    ngroups = ramp.shape[0]
    samples = np.ascontiguousarray(ramp.T)
    flags = np.ascontiguousarray(gdq.T)
    diffs = np.subtract(samples[:, 1:], samples[:, :-1], dtype=np.float64)
    unusable = (((flags[:, 1:] | flags[:, :-1]) & np.uint8(_UNUSABLE))
                | (flags[:, 1:] & np.uint8(JUMP_DET)))
    np.copyto(diffs, np.nan, where=unusable != 0)
    diffs.sort(axis=1)  # NaNs last
    n_valid = (ngroups - 1) - np.count_nonzero(np.isnan(diffs), axis=1)
    first = np.where((flags[:, 0] & np.uint8(_UNUSABLE)) != 0, np.nan,
                     samples[:, 0].astype(np.float64))
    return _middle(diffs, n_valid, first, setup.group_time)


def _middle(ordered, n_valid, first, gtime):
    """Median of the first ``n_valid`` sorted differences, per row, in DN/s.

    The differences are exact (float32 only where that is guaranteed), so both paths
    pick the same values; stcal divides by group_time before subtracting, a difference
    of rounding only.  With no usable difference stcal falls back on ``first`` (the
    first sample) over group_time.
    """
    if first is None and n_valid.size and np.all(n_valid == n_valid[0]):
        # one count for every row: plain columns (the same values as the general path)
        n = int(n_valid[0])
        low = ordered[:, max((n - 1) // 2, 0)].astype(np.float64)
        high = ordered[:, min(n // 2, ordered.shape[1] - 1)].astype(np.float64)
        return (low + high) / 2.0 / gtime
    rows = np.arange(ordered.shape[0])
    low = ordered[rows, np.maximum((n_valid - 1) // 2, 0)].astype(np.float64)
    high = ordered[rows, np.minimum(n_valid // 2, ordered.shape[1] - 1)].astype(np.float64)
    # low and high coincide for an odd count, and (a + a) / 2 == a exactly
    median = (low + high) / 2.0 / gtime
    if first is not None:
        median = np.where(n_valid == 0, first / gtime, median)
    return median


class _IntegrationFit(NamedTuple):
    sci: np.ndarray
    err: np.ndarray
    dq: np.ndarray             # without the partial-saturation flag
    var_poisson: np.ndarray
    var_rnoise: np.ndarray
    any_saturated: np.ndarray
    inv_p: np.ndarray          # contributions to the exposure sums
    inv_r: np.ndarray
    num: np.ndarray
    chargeloss: np.ndarray


def _fit_integration(setup, ramp, gdq, layout, pdq, rnoise, gain, dark, median_rate):
    ngroups, npix = ramp.shape
    dq = pdq.copy()
    seen = np.zeros(npix, dtype=np.uint8)
    sat_first = np.zeros(npix, dtype=bool)
    all_sat = np.zeros(npix, dtype=bool)
    all_bad = np.zeros(npix, dtype=bool)
    pieces = []

    regular = np.flatnonzero(layout.regular)
    if regular.size:
        t = layout.template
        seen[regular] = np.bitwise_or.reduce(t)
        sat_first[regular] = bool(t[0] & SATURATED)
        all_bad[regular] = np.count_nonzero(t & np.uint8(_UNUSABLE)) == ngroups
        all_sat[regular] = np.count_nonzero(t & np.uint8(SATURATED)) == ngroups
        if not (sat_first[regular[0]] or all_bad[regular[0]]):
            shapes = _find_segments((t & _NOT_PERSISTENCE)[None, :])
            for start, length in zip(shapes.start, shapes.length):
                pieces.append((_Segments(regular, np.full(regular.size, start),
                                         np.full(regular.size, length)), True))

    others = layout.irregular
    if others.size:
        flags = np.ascontiguousarray(gdq[:, others].T)
        seen[others] = np.bitwise_or.reduce(flags, axis=1)
        sat_first[others] = (flags[:, 0] & np.uint8(SATURATED)) != 0
        all_bad[others] = np.count_nonzero(flags & np.uint8(_UNUSABLE), axis=1) == ngroups
        all_sat[others] = np.count_nonzero(flags & np.uint8(SATURATED), axis=1) == ngroups
        segs = _find_segments(flags & _NOT_PERSISTENCE)
        segs = _Segments(others[segs.pixel], segs.start, segs.length)
        fittable = ~(sat_first | all_bad)
        pieces.append((segs.subset(fittable[segs.pixel]), False))

    dq |= seen & np.uint8(JUMP_DET | _PERSISTENCE)
    dq[sat_first] |= np.uint32(_UNUSABLE)
    dq[all_bad] |= np.uint32(DO_NOT_USE)
    dq[all_bad & all_sat] |= np.uint32(SATURATED)

    fitted = np.zeros(npix, dtype=bool)
    inv_r = np.zeros(npix)
    inv_p = np.zeros(npix)
    inv_e = np.zeros(npix)
    num = np.zeros(npix)
    for segs, one_per_pixel in pieces:
        if segs.pixel.size == 0:
            continue
        slope, var_p, var_r = _fit_segments(ramp, segs, rnoise, gain, dark, median_rate,
                                            layout.only_first, setup)
        # per pixel the sums run over its segments in time order, as in stcal
        positive = var_p > 0
        if one_per_pixel:
            pix = segs.pixel
            fitted[pix] = True
            inv_r[pix] += 1.0 / var_r
            inv_p[pix[positive]] += 1.0 / var_p[positive]
            inv_e[pix] += 1.0 / (var_p + var_r)
            num[pix] += slope / var_r
        else:
            pix = segs.pixel
            fitted[pix] = True
            inv_r += np.bincount(pix, 1.0 / var_r, minlength=npix)
            inv_p += np.bincount(pix[positive], 1.0 / var_p[positive], minlength=npix)
            inv_e += np.bincount(pix, 1.0 / (var_p + var_r), minlength=npix)
            num += np.bincount(pix, slope / var_r, minlength=npix)

    vp = np.where(inv_p > 0, 1.0 / inv_p, 0.0)
    vp[vp >= _HUGE_VARIANCE] = 0.0
    vr = np.where(fitted, 1.0 / inv_r, 0.0)
    vr[vr >= _HUGE_VARIANCE] = 0.0
    var_err = 1.0 / inv_e
    err = np.where(fitted & ~(var_err > _HUGE_VARIANCE), np.sqrt(var_err), 0.0)
    sci = np.where(fitted, num * vr, 0.0)
    invalid = (dq & np.uint32(_UNUSABLE)) != 0
    sci[invalid] = np.nan
    vp[invalid] = 0.0
    vr[invalid] = 0.0
    err[invalid] = 0.0

    return _IntegrationFit(
        sci, err, dq, vp, vr,
        any_saturated=(seen & np.uint8(SATURATED)) != 0,
        inv_p=np.where(inv_p > 0, inv_p, 0.0), inv_r=inv_r, num=num,
        chargeloss=(seen & np.uint8(_CHARGELOSS)) != 0)


def _fit_segments(ramp, segs, rnoise, gain, dark, median_rate, only_first, setup):
    """Slope (DN/s), Poisson and read-noise variance of each segment.

    ``ramp`` is group-major ``[ngroups, npix]`` float32.
    """
    gtime = setup.group_time
    pix, start, length = segs
    g = gain[pix]
    rn = rnoise[pix]
    if np.all(start == start[0]) and np.all(length == length[0]):
        first = ramp[start[0]][pix].astype(np.float64)
        last = ramp[start[0] + length[0] - 1][pix].astype(np.float64)
    else:
        first = ramp[start, pix].astype(np.float64)
        last = ramp[start + length - 1, pix].astype(np.float64)

    slope = np.empty(pix.size, dtype=np.float64)
    pden = np.empty(pix.size, dtype=np.float64)
    var_r = np.empty(pix.size, dtype=np.float64)

    one = length == 1
    if one.any():
        if only_first is None:
            timing = np.full(np.count_nonzero(one), gtime)
        else:
            timing = np.where(only_first[pix[one]], setup.first_read_time, gtime)
        slope[one] = first[one] / timing
        pden[one] = timing * g[one]
        var_r[one] = _rnoise_short(rn[one], g[one], timing)
    two = length == 2
    if two.any():
        slope[two] = (last[two] - first[two]) / gtime
        pden[two] = gtime * g[two]
        var_r[two] = _rnoise_short(rn[two], g[two], gtime)
    many = np.flatnonzero(length >= 3)
    if many.size:
        # a view when every segment is long (the usual case) saves the copies
        sel = slice(None) if many.size == pix.size else many
        gm, rnm, n = g[sel], rn[sel], length[sel].astype(np.float64)
        rise = last[sel] - first[sel]
        noise2 = rnm * rnm + rise * gm
        snr = (rise * gm) / np.sqrt(noise2)
        snr = np.where((noise2 <= 0) | (gm == 0), 0.0, np.where(snr < 0, 0.0, snr))
        sub = segs if many.size == pix.size else segs.subset(many)
        fit = _ols_slopes(ramp, sub, _power_code(snr), setup.table) / gtime
        # stcal's weights carry 1/rn^2: without a finite nonzero noise there is no slope
        inv_rn2 = 1.0 / (rnm * rnm)
        fit[~(np.isfinite(inv_rn2) & (inv_rn2 != 0))] = np.nan
        slope[sel] = fit
        pden[sel] = gtime * gm * (n - 1.0)
        var_r[sel] = _rnoise_long(rnm, gm, n, gtime)

    rate = median_rate[pix]
    var_p = np.where(rate > 0, rate + dark[pix], dark[pix]) / pden
    return slope, var_p, var_r


def _rnoise_short(rn, gain, timing):
    """Read-noise variance of a one- or two-group segment."""
    per_time = rn / timing
    return 12.0 * per_time * per_time / (6.0 * gain * gain)


def _rnoise_long(rn, gain, n, gtime):
    """Read-noise variance of a segment of n >= 3 groups (0 for an unusable gain)."""
    per_time = rn / gtime
    var = 12.0 * per_time * per_time / ((n * n * n - n) * gain * gain)
    return np.where(gain > 0, var, 0.0)


def _redo_chargeloss_rnoise(flags, lossy, only_first, ints_vr, rate_vr, rnoise, gain, setup):
    """stcal's CHARGELOSS pass: read-noise variances as if those groups were usable.

    Works on the group DQ as given (before suppression and JUMP_DET clearing); changes
    VAR_RNOISE of the affected integrations and of the rate, nothing else.
    """
    nints = flags.shape[0]
    pixels = np.flatnonzero(lossy.any(axis=0))
    inv_total = np.zeros(pixels.size)
    for integ in range(nints):
        affected = lossy[integ, pixels]
        current = ints_vr[integ, pixels]
        inv_total += np.where(~affected & (current > 0), 1.0 / current, 0.0)
        if not affected.any():
            continue
        sub = pixels[affected]
        gdq = np.ascontiguousarray(flags[integ][:, sub].T)
        hit = (gdq & np.uint8(_CHARGELOSS)) != 0
        gdq[hit] ^= np.uint8(DO_NOT_USE | _CHARGELOSS)
        segs = _find_segments(gdq & _NOT_PERSISTENCE)
        g = gain[sub][segs.pixel]
        rn = rnoise[sub][segs.pixel]
        timing = np.full(segs.pixel.size, setup.group_time)
        if only_first[integ] is not None:
            one_first = only_first[integ][sub][segs.pixel] & (segs.length == 1)
            timing[one_first] = setup.first_read_time
        var = np.where(segs.length <= 2, _rnoise_short(rn, g, timing),
                       _rnoise_long(rn, g, segs.length.astype(np.float64), setup.group_time))
        use = var > 0
        inv = np.bincount(segs.pixel[use], 1.0 / var[use], minlength=sub.size)
        vr = 1.0 / inv
        vr[vr >= _HUGE_VARIANCE] = 0.0
        ints_vr[integ, sub] = vr
        inv_total[affected] += inv
    redone = np.where(inv_total > 0, 1.0 / inv_total, rate_vr[pixels])
    redone[redone >= _HUGE_VARIANCE] = 0.0
    rate_vr[pixels] = redone


# --- step plugin (added by the engine work) ---

from streamdet.core.errors import BadInputError  # noqa: E402
from streamdet.core.plugins import hookimpl  # noqa: E402
from streamdet.core.references import IMAGE  # noqa: E402
from streamdet.core.step import Granularity, Param, Step  # noqa: E402

from . import follows  # noqa: E402


class RampFitStep(Step):
    """OLS ramp fitting with optimal weighting (jwst 3.0 ``ramp_fit``, OLS_C).

    Needs every integration of a pixel at once (the Poisson variance uses the median
    rate over integrations) and, from the first pass, which groups are unusable in every
    pixel of the exposure (MIRI's leading/final group discard)."""

    name = "ramp_fit"
    after = follows("ramp_fit")
    reftypes = ("readnoise", "gain")
    granularity = Granularity.EXPOSURE
    thread_safe = True
    status_keyword = "S_RAMP"
    produces_rate = True
    params_spec = {
        "suppress_one_group": Param(bool, True, "give no rate from a ramp with only its first group usable"),
    }

    def prepare(self, meta, refs, pixeldq):
        self.meta = meta
        self.gain = refs.shared("gain", "SCI", layout=IMAGE)
        self.readnoise = refs.shared("readnoise", "SCI", layout=IMAGE)
        # bits set in every pixel of every integration, per group (from the survey)
        self.common = np.full(meta.ngroups, 0xFF, dtype=np.uint8)
        self.discard = None
        self.lock = threading.Lock()
        return None

    def survey(self, chunk):
        piece = np.bitwise_and.reduce(chunk.groupdq, axis=(0, 2, 3))
        with self.lock:
            self.common &= piece

    def _plan(self) -> GroupDiscard:
        where = self.meta.path
        try:
            discard = plan_group_discard((self.common & np.uint8(DO_NOT_USE)) != 0)
        except UnusableExposureError as exc:
            raise BadInputError(f"{where}: no rate can be made: {exc}") from None
        if self.common[discard.n_leading] & np.uint8(SATURATED):
            raise BadInputError(f"{where}: no rate can be made: every pixel is saturated in "
                                "the first usable group")
        return discard

    def process(self, chunk):
        if self.discard is None:
            with self.lock:
                if self.discard is None:
                    self.discard = self._plan()
        core = chunk.core
        rows = slice(chunk.rows.start + core.start, chunk.rows.start + core.stop)
        dark = self.meta.state.get("average_dark_current")
        return fit_ramps(
            chunk.data[:, :, core], chunk.groupdq[:, :, core], chunk.pixeldq[core],
            readnoise=self.readnoise[rows], gain=self.gain[rows],
            frame_time=self.meta.frame_time, group_time=self.meta.group_time,
            nframes=self.meta.nframes, groupgap=self.meta.groupgap,
            dropframes1=self.meta.drop_frames1,
            average_dark_current=None if dark is None else dark[rows],
            suppress_one_group=self.params["suppress_one_group"], discard=self.discard)


@hookimpl
def streamdet_steps():
    return [RampFitStep]
