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

The per-pixel loops (flags, differences, medians, segments, fits, products) are C in
``streamdet/_ckernels/ramp_fit.c``, one call each over a chunk, so that band threads do
not queue for the GIL; numpy's sort orders the differences for the medians.  This module
prepares the buffers and keeps the per-chunk bookkeeping.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from streamdet._ckernels import declare, ptr, sorted_row_medians, strides
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

_UNUSABLE = DO_NOT_USE | SATURATED
_EDGES = np.array(_SNR_EDGES, dtype=np.float64)

# the per-pixel loops, in streamdet/_ckernels/ramp_fit.c (arguments: see there)
_c_usable_flags = declare("ramp_fit", "rf_usable_flags", "piiiiiiiiiip")
_c_regular_diffs = declare("ramp_fit", "rf_regular_diffs", "piiiipipp")
_c_rnoise_variance = declare("ramp_fit", "rf_rnoise_variance", "ippppp")
_c_fit_segments = declare("ramp_fit", "rf_fit_segments", "piiippipipppppddpppippppp")
_c_general_diffs = declare("ramp_fit", "rf_general_diffs", "piipiipiiiippp")
_c_segments = declare("ramp_fit", "rf_segments", "piipiiiiiiiiippppp", "i")
_c_layout = declare("ramp_fit", "rf_layout", "piiipp")
_c_finish_integration = declare("ramp_fit", "rf_finish_integration",
                                "ipppppppiiiidpppppppppppp")
_c_finish_exposure = declare("ramp_fit", "rf_finish_exposure", "ippppppiiidppppp")


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
    weight = _ols_weights(length, power_code)
    sum_w = weight.sum()
    sum_x = (index * weight).sum()
    sum_xx = (index * index * weight).sum()
    return weight * (sum_w * index - sum_x) / (sum_w * sum_xx - sum_x * sum_x)


def _ols_weights(length: int, power_code: int) -> np.ndarray:
    """Optimal weights ``|(i - mid) / mid| ** P`` of a segment shape, as stcal rounds them."""
    index = np.arange(length, dtype=np.float64)
    mid = (length - 1) / 2.0
    # stcal takes powf of single-precision operands; a double power rounded to float32
    # reproduces glibc's powf (numpy's float32 power differs in the last bit ~10% of the time)
    base = np.abs((index - mid) * (1.0 / mid)).astype(np.float32).astype(np.float64)
    exponent = float(np.float32(_POWERS[power_code]))
    return np.power(base, exponent).astype(np.float32).astype(np.float64)


class _Coefficients(NamedTuple):
    """Slope coefficients of every segment shape, flat for the C kernel: those of a
    segment of n groups with weighting exponent number c are
    ``values[offset[n] + c * n:][:n]``."""

    values: np.ndarray  # float64
    offset: np.ndarray  # int64, indexed by segment length


@lru_cache(maxsize=8)
def _coefficient_table(ngroups: int) -> _Coefficients:
    offset = np.zeros(max(ngroups, 2) + 1, dtype=np.int64)
    columns = []
    position = 0
    for length in range(3, ngroups + 1):
        offset[length] = position
        for code in range(len(_POWERS)):
            columns.append(_ols_coefficients(length, code))
            position += length
    values = np.concatenate(columns) if columns else np.zeros(1)
    for array in (values, offset):
        array.setflags(write=False)
    return _Coefficients(values, offset)


# --------------------------------------------------------------------------------------
# segments
# --------------------------------------------------------------------------------------


class _Segments(NamedTuple):
    pixel: np.ndarray   # pixel index within the chunk
    start: np.ndarray   # first group
    length: np.ndarray  # number of groups


def _find_segments(gdq: np.ndarray, pix: np.ndarray, *, seen=None, dq=None,
                   fittable_only=False) -> _Segments:
    """Segments kept for fitting of the ramps ``pix`` of group-major ``gdq``
    ``[ngroups, npix]`` (any strides), ordered by pixel then time.

    With ``seen`` and ``dq`` (per pixel) given, also records the OR of each ramp's flags
    and the DQ its flags imply; ``fittable_only`` leaves out ramps saturated from the
    first group or unusable throughout (see rf_segments).
    """
    ngroups = gdq.shape[0]
    pix = np.ascontiguousarray(pix, dtype=np.int64)
    found = np.empty((3, pix.size * ((ngroups + 1) // 2)), dtype=np.int64)
    fgs, fps = strides(gdq)
    count = _c_segments(
        ptr(gdq), fgs, fps, ptr(pix), pix.size, ngroups, _PERSISTENCE, JUMP_DET, SATURATED,
        _UNUSABLE, DO_NOT_USE, JUMP_DET | _PERSISTENCE, int(fittable_only),
        None if seen is None else _out(seen), None if dq is None else _out(dq),
        ptr(found[0]), ptr(found[1]), ptr(found[2]))
    return _Segments(*found[:, :count])


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
    table: _Coefficients


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
    opt_sink=None,
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

    ``opt_sink``: also compute the optional results (``save_opt``, see ramp_fit_opt)
    and hand them over a chunk of pixels and one integration at a time, as
    ``opt_sink(integ, first, arrays, nsegs, ncrs)`` (``first``: the chunk's first pixel,
    flat in the band; arguments as :meth:`FitoptStore.put_pixels`), so that they take no
    memory in proportion to the number of integrations.
    """
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

    opt = None
    if opt_sink is not None:
        from streamdet.core.fitopt import jump_bound, segment_bound

        ped_factor = (((float(nframes) + 1.0) / 2.0 + float(dropframes1))
                      / (float(nframes) + float(groupgap)))
        opt = (opt_sink, segment_bound(ngroups), jump_bound(ngroups), ped_factor)

    with np.errstate(all="ignore"):
        for lo in range(0, npix, _CHUNK_PIXELS):
            part = slice(lo, min(lo + _CHUNK_PIXELS, npix))
            _fit_chunk(setup, values[:, :, part], flags[:, :, part], pdq[part],
                       rnoise[part], gain64[part], dark[part],
                       RateArrays(*(a[part] for a in _fields(rate))),
                       RateArrays(*(a[:, part] for a in _fields(rateints))),
                       None if opt is None else (*opt, lo))

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
    gdq = np.ascontiguousarray(gdq)
    template = np.empty(ngroups, dtype=np.uint8)
    regular = np.empty(npix, dtype=bool)
    _c_layout(ptr(gdq), ngroups, npix, max(1, npix // 4096), ptr(template), ptr(regular))
    only_first = None
    if not suppress:
        only_first = (np.count_nonzero(gdq == 0, axis=0) == 1) & (gdq[0] == 0)
    return _Layout(template, regular, np.flatnonzero(~regular), only_first)


def _usable_flags(flags: np.ndarray, setup: _Setup) -> np.ndarray:
    """Group DQ of one integration as stcal fits it: suppressed, trimmed, group-major.

    Suppression counts clean groups on the untrimmed ramp, before the discard clears
    JUMP_DET on the new first group.
    """
    ngroups_in, npix = flags.shape
    gdq = np.empty((setup.ngroups, npix), dtype=np.uint8)
    gs, ps = strides(flags)
    keep_first = (~JUMP_DET & 0xFF) if setup.n_leading > 0 else 0xFF
    _c_usable_flags(ptr(flags), gs, ps, ngroups_in, npix, setup.n_leading, setup.stop,
                    int(setup.suppress), _PERSISTENCE, DO_NOT_USE, keep_first, ptr(gdq))
    return gdq


def _fit_chunk(setup, values, flags, pdq, rnoise, gain, dark, rate, rateints, opt=None):
    """Fit one chunk of pixels (all integrations); writes into ``rate``/``rateints``
    (and, given ``opt`` = (sink, segment bound, jump bound, pedestal factor, first
    pixel), hands the optional results to the sink)."""
    nints = values.shape[0]
    npix = pdq.size
    ramps = [values[integ, setup.n_leading:setup.stop] for integ in range(nints)]
    gdqs = [_usable_flags(flags[integ], setup) for integ in range(nints)]
    layouts = [_layout(gdq, setup.suppress) for gdq in gdqs]
    median_rate = _median_rate(ramps, gdqs, layouts, setup)

    # exposure sums and flags, filled integration by integration
    rate_dq = rate.dq
    rate_dq[...] = pdq
    sum_inv_p = np.zeros(npix)
    sum_inv_r = np.zeros(npix)
    sum_num = np.zeros(npix)
    unusable_everywhere = np.ones(npix, dtype=bool)
    saturated_everywhere = np.ones(npix, dtype=bool)
    saturated_somewhere = np.zeros(npix, dtype=bool)
    lossy = []
    # read-noise variances stay double until the CHARGELOSS pass is done with them
    ints_vr = np.empty((nints, npix))
    # addresses that stay the same for every integration, taken once: with hundreds of
    # integrations per chunk, taking them (which holds the GIL) was a tenth of the step
    pixel_inputs = (ptr(rnoise), ptr(gain), ptr(dark), ptr(median_rate))
    exposure_sums = (ptr(sum_inv_p), ptr(sum_inv_r), ptr(sum_num), _out(rate_dq),
                     ptr(unusable_everywhere), ptr(saturated_everywhere),
                     ptr(saturated_somewhere))
    for integ in range(nints):
        dq, seen, fitted, inv_r, inv_p, inv_e, num = _fit_integration(
            setup, ramps[integ], gdqs[integ], layouts[integ], pdq, pixel_inputs)
        _c_finish_integration(
            npix, ptr(dq), ptr(seen), ptr(fitted), ptr(inv_r), ptr(inv_p), ptr(inv_e),
            ptr(num), _UNUSABLE, DO_NOT_USE, SATURATED, JUMP_DET | _PERSISTENCE,
            _HUGE_VARIANCE, _out(rateints.sci[integ]), _out(rateints.err[integ]),
            _out(rateints.var_poisson[integ]), ptr(ints_vr[integ]),
            _out(rateints.dq[integ]), *exposure_sums)
        lossy.append((seen & np.uint8(_CHARGELOSS)) != 0)
        if opt is not None:
            from . import ramp_fit_opt

            sink, seg_bound, cr_bound, ped_factor, first = opt
            arrays = ramp_fit_opt.empty_results(seg_bound, cr_bound, npix)
            nsegs, ncrs = ramp_fit_opt.integration_results(
                setup, ramps[integ], gdqs[integ], layouts[integ].only_first, rnoise, gain,
                dark, median_rate, dq, rateints.sci[integ], ped_factor, arrays)
            sink(integ, first, arrays, nsegs, ncrs)

    vr = np.empty(npix)
    _c_finish_exposure(
        npix, ptr(sum_inv_p), ptr(sum_inv_r), ptr(sum_num), ptr(unusable_everywhere),
        ptr(saturated_everywhere), ptr(saturated_somewhere), _UNUSABLE, DO_NOT_USE,
        SATURATED, _HUGE_VARIANCE, _out(rate_dq), _out(rate.sci), _out(rate.err),
        _out(rate.var_poisson), ptr(vr))

    lossy = np.array(lossy)
    if lossy.any():
        # the rate SCI/ERR keep the variance used before; only VAR_RNOISE is redone
        only_first = [layout.only_first for layout in layouts]
        _redo_chargeloss_rnoise(flags[:, setup.n_leading:setup.stop], lossy, only_first,
                                ints_vr, vr, rnoise, gain, setup)
    rateints.var_rnoise[...] = ints_vr
    rate.var_rnoise[...] = vr


def _out(array: np.ndarray) -> int:
    """Address of an output row the kernels write element by element."""
    if not array.flags.c_contiguous:
        raise ValueError("ramp_fit kernels write contiguous rows only")
    return ptr(array)


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
                # float32 differences, pixel-major for the sort; the kernel sends the
                # ramps where those are not the exact differences (and NaN ramps, whose
                # count of valid differences is their own) to the general path
                ordered = np.empty((npix, usable.size), dtype=np.float32)
                gs, ps = strides(ramp)
                _c_regular_diffs(ptr(ramp), gs, ps, ngroups, npix, ptr(usable), usable.size,
                                 ptr(ordered), ptr(general))
                ordered.sort(axis=1)
                median[:] = _middle(ordered, usable.size, None, setup.group_time)
            else:
                first = ramp[0].astype(np.float64) / setup.group_time
                if t[0] & _UNUSABLE:
                    first[:] = np.nan
                median[:] = first
        picked = np.flatnonzero(general)
        if picked.size:
            median[picked] = _median_general(ramp, gdq, picked, setup)
        if layout.only_first is not None and layout.only_first.any():
            median = np.where(layout.only_first,
                              ramp[0].astype(np.float64) / setup.first_read_time, median)
        total += np.where(np.isnan(median), 0.0, median)
    return total / len(ramps)


def _median_general(ramp, gdq, picked, setup):
    """Median rate of the ramps ``picked`` of ``ramp`` (``[ngroups, npix]``), any flags."""
    ngroups = ramp.shape[0]
    picked = np.ascontiguousarray(picked, dtype=np.int64)
    diffs = np.empty((picked.size, ngroups - 1))
    n_valid = np.empty(picked.size, dtype=np.int64)
    first = np.empty(picked.size)
    gs, ps = strides(ramp)
    fgs, fps = strides(gdq)
    _c_general_diffs(ptr(ramp), gs, ps, ptr(gdq), fgs, fps, ptr(picked), picked.size,
                     ngroups, _UNUSABLE, JUMP_DET, ptr(diffs), ptr(n_valid), ptr(first))
    diffs.sort(axis=1)  # NaNs last
    return _middle(diffs, n_valid, first, setup.group_time)


def _middle(ordered, n_valid, first, gtime):
    """Median of the first ``n_valid`` (per row, or one count for all) sorted
    differences of each row of ``ordered``, in DN/s.

    The differences are exact (float32 only where that is guaranteed), so both paths
    pick the same values; stcal divides by group_time before subtracting, a difference
    of rounding only.  With no usable difference stcal falls back on ``first`` (the
    first sample) over group_time.
    """
    median = sorted_row_medians(ordered, n_valid)
    median /= gtime
    if first is not None:
        np.divide(first, gtime, out=median, where=np.asarray(n_valid) == 0)
    return median


def _fit_integration(setup, ramp, gdq, layout, pdq, pixel_inputs):
    """One integration's DQ, the OR of each ramp's group flags, and the per-pixel sums
    over its fitted segments (see rf_fit_segments).  ``pixel_inputs``: the addresses
    of the chunk's read noise, gain, dark and median rate, as rf_fit_segments takes them."""
    npix = ramp.shape[1]
    dq = pdq.copy()
    seen = np.zeros(npix, dtype=np.uint8)
    pieces = []

    regular = np.flatnonzero(layout.regular)
    if regular.size:
        # the template stands for every regular ramp
        t_seen = np.zeros(1, dtype=np.uint8)
        t_dq = np.zeros(1, dtype=np.uint32)
        shapes = _find_segments(layout.template[:, None], np.zeros(1, np.int64),
                                seen=t_seen, dq=t_dq, fittable_only=True)
        seen[regular] = t_seen[0]
        dq[regular] |= t_dq[0]
        for start, length in zip(shapes.start, shapes.length):
            # one shape for all: the kernel reads start and length with stride 0
            pieces.append(_Segments(regular, np.array([start], np.int64),
                                    np.array([length], np.int64)))

    if layout.irregular.size:
        pieces.append(_find_segments(gdq, layout.irregular, seen=seen, dq=dq,
                                     fittable_only=True))

    fitted = np.zeros(npix, dtype=bool)
    inv_r = np.zeros(npix)
    inv_p = np.zeros(npix)
    inv_e = np.zeros(npix)
    num = np.zeros(npix)
    # per pixel the sums run over its segments in time order, as in stcal: the regular
    # pieces come in time order, the others are ordered by pixel then time
    gs, ps = strides(ramp)
    only_first = layout.only_first
    table = setup.table
    ramp_at = ptr(ramp)
    per_pixel = (*pixel_inputs, None if only_first is None else ptr(only_first),
                 setup.group_time, setup.first_read_time, ptr(table.values), ptr(table.offset),
                 ptr(_EDGES), _EDGES.size, ptr(fitted), ptr(inv_r), ptr(inv_p), ptr(inv_e),
                 ptr(num))
    for pix, start, length in pieces:
        if pix.size == 0:
            continue
        _c_fit_segments(
            ramp_at, gs, ps, pix.size, ptr(pix), ptr(start), int(start.size > 1),
            ptr(length), int(length.size > 1), *per_pixel)

    return dq, seen, fitted, inv_r, inv_p, inv_e, num


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
        gdq = flags[integ][:, sub]
        hit = (gdq & np.uint8(_CHARGELOSS)) != 0
        gdq[hit] ^= np.uint8(DO_NOT_USE | _CHARGELOSS)
        segs = _find_segments(gdq, np.arange(sub.size))
        g = gain[sub][segs.pixel]
        rn = rnoise[sub][segs.pixel]
        timing = np.full(segs.pixel.size, setup.group_time)
        if only_first[integ] is not None:
            one_first = only_first[integ][sub][segs.pixel] & (segs.length == 1)
            timing[one_first] = setup.first_read_time
        length = np.ascontiguousarray(segs.length, dtype=np.int64)
        var = np.empty(segs.pixel.size)
        _c_rnoise_variance(var.size, ptr(rn), ptr(g), ptr(length), ptr(timing), ptr(var))
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
from streamdet.core.step import Granularity, Param, RateProducer, RateResult  # noqa: E402

from . import follows  # noqa: E402


#: jwst's ``ramp_fit.algorithm`` values (spelt, and case-sensitive, as jwst checks them)
#: and the implementation each selects
ALGORITHMS = {"OLS_C": "builtin", "OLS": "builtin", "LIKELY": "likely"}


def ignored_groups(ngroups: int, firstgroup: int | None, lastgroup: int | None
                   ) -> np.ndarray | None:
    """Per group, DO_NOT_USE for the groups jwst's ``firstgroup``/``lastgroup`` leave
    out, or None when none is left out. As jwst 3.0: a negative firstgroup counts as 0,
    a lastgroup past the end as the last group, and firstgroup >= lastgroup makes both
    ignored."""
    if firstgroup is None and lastgroup is None:
        return None
    first = 0 if firstgroup is None else max(0, firstgroup)
    last = ngroups - 1 if lastgroup is None else lastgroup
    if first >= last:
        return None
    flags = np.zeros(ngroups, np.uint8)
    flags[:first] = DO_NOT_USE
    if last < ngroups - 1:
        flags[last + 1:] = DO_NOT_USE
    return flags if flags.any() else None


class RampFitStep(RateProducer):
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
    params_spec = {
        "suppress_one_group": Param(bool, True, "give no rate from a ramp with only its first group usable"),
        "firstgroup": Param(int, None, "ignore the groups before this one (0-based; None: from the first)", optional=True),
        "lastgroup": Param(int, None, "ignore the groups after this one (0-based; None: to the last)", optional=True),
        "save_opt": Param(bool, False, "also write jwst's optional results product "
                          "(_fitopt.fits: per-segment slopes, variances, intercepts, weights, "
                          "the pedestal and jump magnitudes)"),
        "algorithm": Param(str, "OLS_C", "jwst's choice of fit: OLS_C (this implementation; "
                           "OLS, jwst's older name, means the same) or LIKELY (the 'likely' "
                           "implementation, package streamdet-likely)", choices=tuple(ALGORITHMS)),
    }
    implementation_parameter = ("algorithm", ALGORITHMS)
    implementation_sources = {"likely": "streamdet-likely (pip install "
                                        "./plugins_contrib/streamdet-likely from streamdet's "
                                        "repository)"}

    def prepare(self, meta, refs, pixeldq):
        self.meta = meta
        self.gain = refs.shared("gain", "SCI", layout=IMAGE)
        self.readnoise = refs.shared("readnoise", "SCI", layout=IMAGE)
        # bits set in every pixel of every integration, per group (from the survey)
        self.common = np.full(meta.ngroups, 0xFF, dtype=np.uint8)
        self.discard = None
        self.lock = threading.Lock()
        self.ignored = ignored_groups(meta.ngroups, self.params["firstgroup"],
                                      self.params["lastgroup"])
        self.fitopt = None
        if self.params.get("save_opt"):
            import shutil
            import tempfile
            import weakref
            from pathlib import Path

            from streamdet.core.fitopt import FitoptStore

            scratch = Path(tempfile.mkdtemp(prefix="streamdet-fitopt-"))
            # the scratch goes with the step, whatever way the run ends
            weakref.finalize(self, shutil.rmtree, scratch, True)
            self.fitopt = FitoptStore(meta.nints, meta.ngroups, meta.ny, meta.nx, scratch)
        return None

    def extra_products(self):
        if self.skip or self.fitopt is None:
            return {}

        def write(path, record, source):
            from streamdet.core.fitopt import write_fitopt

            write_fitopt(path, self.fitopt, source, record)

        return {"fitopt": write}

    def survey(self, chunk):
        piece = np.bitwise_and.reduce(chunk.groupdq, axis=(0, 2, 3))
        if self.ignored is not None:  # as if already flagged (see process)
            piece = piece | self.ignored
        with self.lock:
            self.common &= piece

    def _plan(self) -> GroupDiscard:
        where = self.meta.path
        dnu = (self.common & np.uint8(DO_NOT_USE)) != 0
        # jump's large-event searches may take DO_NOT_USE off a group (a snowball core
        # flagged SATURATED to the last group): the discard follows what jump left
        after_jump = self.meta.state.jump_dnu_everywhere
        if after_jump is not None:
            dnu &= np.asarray(after_jump).all(axis=0)
        try:
            discard = plan_group_discard(dnu)
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
        if self.ignored is not None:
            # jwst flags the groups outside firstgroup..lastgroup DO_NOT_USE in the ramp
            # before fitting, so the MIRI discard and suppression see them too
            np.bitwise_or(chunk.groupdq, self.ignored[None, :, None, None], out=chunk.groupdq)
        rows = slice(chunk.rows.start + core.start, chunk.rows.start + core.stop)
        dark = self.meta.state.average_dark_current
        rate, rateints = fit_ramps(
            chunk.data[:, :, core], chunk.groupdq[:, :, core], chunk.pixeldq[core],
            readnoise=self.readnoise[rows], gain=self.gain[rows],
            frame_time=self.meta.frame_time, group_time=self.meta.group_time,
            nframes=self.meta.nframes, groupgap=self.meta.groupgap,
            dropframes1=self.meta.drop_frames1,
            average_dark_current=None if dark is None else dark[rows],
            suppress_one_group=self.params["suppress_one_group"], discard=self.discard,
            opt_sink=None if self.fitopt is None else
            lambda integ, first, arrays, nsegs, ncrs, base=rows.start * self.meta.nx:
            self.fitopt.put_pixels(integ, base + first, arrays, nsegs, ncrs))
        return RateResult(rate, rateints)


@hookimpl
def streamdet_steps():
    return [RampFitStep]
