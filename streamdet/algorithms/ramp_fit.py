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
   (:func:`survey_group_flags`, :func:`plan_from_survey`) and hands the plan to
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
integration, stcal returns no product at all (:func:`plan_from_survey` says so).

Implementation: pixels are processed in chunks.  Within a chunk most ramps carry
exactly the same group flags (those of the whole-group flaggers upstream); their
segments and usable differences are derived once from that template and the slopes
come from one pass over the samples, while the other pixels take a general per-pixel
path.  Every per-pixel result is computed with the same operations in the same order
whatever path, chunk or band it falls in, so bands stitch bit-identically into the whole
frame.  Arithmetic is double precision; results are rounded to float32 like stcal's.

The per-pixel loops (flags, differences, medians, segments, fits, products) are C in
``streamdet/_ckernels/ramp_fit.c`` (declared in ``ramp_fit.h``), and so are the loops
over a chunk's integrations: two drivers, ``rf_chunk_median_rate`` (every integration's
median rates, keeping each integration's fitted flags and template for the fit) and
``rf_chunk_fit`` (every integration's segments, fits and products), call those kernels,
so that a band thread holds the GIL only to set a chunk up (a Python loop over
integrations made the band threads queue for it).  The template ramps' median rates
come from a median network run over a block of pixels at once (vector loops: a
row-by-row sort of a few dozen differences was a third of the step on time series);
the few general ramps' medians are selected row by row (``row_medians.c``, compiled
into the same module).  This module prepares the buffers and finishes the exposure;
the CHARGELOSS redo (rare) stays in Python, from the driver's per-ramp CHARGELOSS mask.
The optional results (``save_opt``) are :mod:`.ramp_fit_opt`'s: with them the fit
driver runs one integration at a time and hands back what it fitted from.  The step
that reads the references and calls :func:`fit_ramps` is ``streamdet/plugins/ramp_fit.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from typing import NamedTuple

import numpy as np

from streamdet._ckernels import pointer, strides
from streamdet._ckernels._ramp_fit import ffi, lib
from streamdet.core.dqflags import (
    DO_NOT_USE,
    NO_GAIN_VALUE,
    PIXEL,
    SATURATED,
)
from streamdet.core.products import RateArrays

_CHARGELOSS = PIXEL["CHARGELOSS"]

# stcal's cut-off above which a variance is treated as meaningless and zeroed
_HUGE_VARIANCE = 1.0e6

# weighting exponent ladder of the optimal weighting, by segment signal-to-noise ratio
_SNR_EDGES = (5.0, 10.0, 20.0, 50.0, 100.0)
_POWERS = (0.0, 0.4, 1.0, 3.0, 6.0, 10.0)

_EDGES = np.array(_SNR_EDGES, dtype=np.float64)


@dataclass(frozen=True)
class RampFitParameters:
    """jwst 3.0's ``ramp_fit`` parameters that change the fit, with their defaults (the
    one place they are written: the step's parameters take them from here)."""

    #: no rate from a ramp whose only usable group is its first
    suppress_one_group: bool = True
    #: groups before this one (0-based) are left out (:func:`ignored_groups`)
    firstgroup: int | None = None
    #: groups after this one are left out
    lastgroup: int | None = None


class UnusableExposureError(ValueError):
    """The exposure leaves nothing to fit (jwst's ramp_fit then returns no product)."""


class GroupDiscard(NamedTuple):
    """Groups removed from every ramp before fitting (MIRI)."""

    n_leading: int = 0
    drop_last: bool = False


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


def segment_bound(ngroups: int) -> int:
    """Most fitted segments a ramp of ``ngroups`` groups can have (runs of usable groups
    need a group between them)."""
    return max(1, (ngroups + 1) // 2)


# --------------------------------------------------------------------------------------
# exposure-wide group discard
# --------------------------------------------------------------------------------------


def survey_group_flags(groupdq: np.ndarray) -> np.ndarray:
    """The DQ bits set in every pixel of this piece of the exposure, per group (uint8).

    ``groupdq`` is ``[nints, ngroups, nrows, nx]`` or one integration
    ``[ngroups, nrows, nx]``.  The engine ANDs the vectors of all pieces and passes the
    result to :func:`plan_from_survey`.
    """
    groupdq = np.asarray(groupdq)
    group_axis = groupdq.ndim - 3
    other_axes = tuple(ax for ax in range(groupdq.ndim) if ax != group_axis)
    return np.bitwise_and.reduce(groupdq, axis=other_axes)


def survey_dnu_groups(groupdq: np.ndarray) -> np.ndarray:
    """Which groups are DO_NOT_USE in every pixel of this piece of the exposure (the
    input of :func:`plan_group_discard`, ANDed over the pieces)."""
    return (survey_group_flags(groupdq) & np.uint8(DO_NOT_USE)) != 0


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


def plan_from_survey(common_flags: np.ndarray, still_dnu: np.ndarray | None = None
                     ) -> GroupDiscard:
    """The group discard of the whole exposure from its survey (:func:`survey_group_flags`
    ANDed over every piece).  ``still_dnu``: per group, False where a step that ran after
    the survey took DO_NOT_USE off the group in some pixel (None: none did).

    Raises :class:`UnusableExposureError` where stcal makes no product: nothing left to
    fit (:func:`plan_group_discard`), or the first fitted group SATURATED in every pixel.
    """
    common_flags = np.asarray(common_flags, dtype=np.uint8)
    dnu = (common_flags & np.uint8(DO_NOT_USE)) != 0
    if still_dnu is not None:
        dnu &= np.asarray(still_dnu, dtype=bool)
    discard = plan_group_discard(dnu)
    if common_flags[discard.n_leading] & np.uint8(SATURATED):
        raise UnusableExposureError("every pixel is saturated in the first usable group")
    return discard


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
    found = np.empty((3, pix.size * segment_bound(ngroups)), dtype=np.int64)
    fgs, fps = strides(gdq)
    count = lib.rf_segments(
        pointer(ffi, gdq), fgs, fps, pointer(ffi, pix), pix.size, ngroups,
        int(fittable_only), ffi.NULL if seen is None else _out(seen),
        ffi.NULL if dq is None else _out(dq),
        pointer(ffi, found[0]), pointer(ffi, found[1]), pointer(ffi, found[2]))
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
    suppress_one_group: bool = RampFitParameters.suppress_one_group,
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
        from .ramp_fit_opt import jump_bound

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


# False sends every ramp down the per-pixel path (the tests check both paths agree)
_TEMPLATE_PATH = True


def _usable_flags(flags: np.ndarray, setup: _Setup) -> np.ndarray:
    """Group DQ of one integration as stcal fits it: suppressed, trimmed, group-major.

    Suppression counts clean groups on the untrimmed ramp, before the discard clears
    JUMP_DET on the new first group.
    """
    ngroups_in, npix = flags.shape
    gdq = np.empty((setup.ngroups, npix), dtype=np.uint8)
    gs, ps = strides(flags)
    lib.rf_usable_flags(pointer(ffi, flags), gs, ps, ngroups_in, npix, setup.n_leading,
                        setup.stop, int(setup.suppress), pointer(ffi, gdq))
    return gdq


def _only_first(gdq: np.ndarray) -> np.ndarray:
    """Per ramp of ``gdq`` (as fitted, ``[ngroups, npix]``): its one clean group is the
    first (timed by the first read when suppression is off)."""
    gdq = np.ascontiguousarray(gdq)
    only_first = np.empty(gdq.shape[1], dtype=bool)
    lib.rf_only_first(pointer(ffi, gdq), *gdq.shape, pointer(ffi, only_first))
    return only_first


def _chunk(setup: _Setup, values: np.ndarray, flags: np.ndarray):
    """The drivers' view (rf_chunk) of a chunk's samples and group flags, every
    integration, with its store; returns (the struct, the store that must outlive
    it)."""
    ramps = values[:, setup.n_leading:setup.stop]
    chunk = ffi.new("rf_chunk *", {
        "values": pointer(ffi, ramps), **dict(zip(("vis", "vgs", "vps"), strides(ramps))),
        "flags": pointer(ffi, flags), **dict(zip(("fis", "fgs", "fps"), strides(flags))),
        "nints": values.shape[0], "ngroups_in": flags.shape[1], "first": setup.n_leading,
        "stop": setup.stop, "npix": values.shape[2], "suppress": int(setup.suppress),
        "template_path": int(_TEMPLATE_PATH)})
    store = np.empty(lib.rf_chunk_store_bytes(chunk), dtype=np.uint8)
    chunk.store = pointer(ffi, store)
    return chunk, store


def _fit_chunk(setup, values, flags, pdq, rnoise, gain, dark, rate, rateints, opt=None):
    """Fit one chunk of pixels (all integrations); writes into ``rate``/``rateints``
    (and, given ``opt`` = (sink, segment bound, jump bound, pedestal factor, first
    pixel), hands the optional results to the sink)."""
    nints = values.shape[0]
    npix = pdq.size
    chunk, store = _chunk(setup, values, flags)  # (the store lives as long as the struct)
    median_rate = _median_rate(chunk, setup)

    # exposure sums and flags, filled integration by integration
    rate_dq = rate.dq
    rate_dq[...] = pdq
    sum_inv_p = np.zeros(npix)
    sum_inv_r = np.zeros(npix)
    sum_num = np.zeros(npix)
    unusable_everywhere = np.ones(npix, dtype=bool)
    saturated_everywhere = np.ones(npix, dtype=bool)
    saturated_somewhere = np.zeros(npix, dtype=bool)
    lossy = np.empty((nints, npix), dtype=bool)
    # read-noise variances stay double until the CHARGELOSS pass is done with them
    ints_vr = np.empty((nints, npix))
    table = setup.table
    fit_setup = ffi.new("rf_fit_setup *", {
        "rnoise": pointer(ffi, rnoise), "gain": pointer(ffi, gain),
        "dark": pointer(ffi, dark), "median_rate": pointer(ffi, median_rate),
        "group_time": setup.group_time, "first_time": setup.first_read_time,
        "table": pointer(ffi, table.values), "offset": pointer(ffi, table.offset),
        "edges": pointer(ffi, _EDGES), "nedges": _EDGES.size})
    exposure_sums = ffi.new("rf_exposure_sums *", {
        "inv_p": pointer(ffi, sum_inv_p), "inv_r": pointer(ffi, sum_inv_r),
        "num": pointer(ffi, sum_num), "dq": _out(rate_dq),
        "unusable_everywhere": pointer(ffi, unusable_everywhere),
        "saturated_everywhere": pointer(ffi, saturated_everywhere),
        "saturated_somewhere": pointer(ffi, saturated_somewhere)})
    if len({a.strides for a in _fields(rateints)[:4]}) != 1 or rateints.sci.strides[1] != 4:
        # the driver addresses the four float32/uint32 products with one stride
        raise ValueError("ramp_fit writes rateints rows of one layout")
    products = ffi.new("rf_integration_products *", {
        "sci": pointer(ffi, rateints.sci), "err": pointer(ffi, rateints.err),
        "dq": pointer(ffi, rateints.dq), "var_poisson": pointer(ffi, rateints.var_poisson),
        "stride": strides(rateints.sci)[0], "var_rnoise": pointer(ffi, ints_vr)})
    fit = partial(lib.rf_chunk_fit, chunk, fit_setup, pointer(ffi, pdq), _HUGE_VARIANCE)
    if opt is None:
        nlossy = _checked(fit(0, nints, products, exposure_sums, pointer(ffi, lossy), ffi.NULL))
    else:
        nlossy = _fit_with_opt(setup, values, fit, products, exposure_sums, lossy, rnoise,
                               gain, dark, median_rate, rateints, opt)

    vr = np.empty(npix)
    lib.rf_finish_exposure(npix, exposure_sums, _HUGE_VARIANCE, _products(rate, None, vr))

    if nlossy:
        # the rate SCI/ERR keep the variance used before; only VAR_RNOISE is redone
        _redo_chargeloss_rnoise(flags, lossy, ints_vr, vr, rnoise, gain, setup)
    rateints.var_rnoise[...] = ints_vr
    rate.var_rnoise[...] = vr


def _checked(status: int) -> int:
    if status < 0:
        raise MemoryError("no scratch memory for ramp_fit")
    return status


def _fit_with_opt(setup, values, fit, products, exposure_sums, lossy, rnoise, gain, dark,
                  median_rate, rateints, opt):
    """The driver one integration at a time, handing each integration's optional results
    to the sink as it goes (so that they take no memory in proportion to nints)."""
    from . import ramp_fit_opt  # only with save_opt (it imports this module)

    sink, seg_bound, cr_bound, ped_factor, first = opt
    nints, _, npix = values.shape
    gdq = np.empty((setup.ngroups, npix), dtype=np.uint8)
    dq = np.empty(npix, dtype=np.uint32)
    only_first = np.empty(npix, dtype=bool)
    inspect = ffi.new("rf_inspect *", {"gdq": pointer(ffi, gdq), "dq": pointer(ffi, dq),
                                       "only_first": pointer(ffi, only_first)})
    nlossy = 0
    for integ in range(nints):
        nlossy += _checked(fit(integ, integ + 1, products, exposure_sums,
                               pointer(ffi, lossy), inspect))
        arrays = ramp_fit_opt.empty_results(seg_bound, cr_bound, npix)
        nsegs, ncrs = ramp_fit_opt.integration_results(
            setup, values[integ, setup.n_leading:setup.stop], gdq,
            None if setup.suppress else only_first, rnoise, gain, dark, median_rate, dq,
            rateints.sci[integ], ped_factor, arrays)
        sink(integ, first, arrays, nsegs, ncrs)
    return nlossy


def _out(array: np.ndarray):
    """Pointer to an output row the kernels write element by element."""
    if not array.flags.c_contiguous:
        raise ValueError("ramp_fit kernels write contiguous rows only")
    return pointer(ffi, array)


def _products(arrays: RateArrays, integ: int | None, var_rnoise: np.ndarray):
    """The kernels' view of ``arrays`` (of integration ``integ``, or the exposure's with
    None), with the double-precision ``var_rnoise`` in place of its own."""
    if integ is not None:
        arrays = RateArrays(*(a[integ] for a in _fields(arrays)))
    return ffi.new("rf_products *", {
        "sci": _out(arrays.sci), "err": _out(arrays.err), "dq": _out(arrays.dq),
        "var_poisson": _out(arrays.var_poisson), "var_rnoise": _out(var_rnoise)})


def _median_rate(chunk, setup: _Setup) -> np.ndarray:
    """Pixel rate estimate for the Poisson variance (stcal's median rate) of a chunk
    (rf_chunk), over all its integrations."""
    median_rate = np.empty(chunk.npix)
    _checked(lib.rf_chunk_median_rate(chunk, setup.group_time, setup.first_read_time,
                                      pointer(ffi, median_rate)))
    return median_rate


def _redo_chargeloss_rnoise(flags, lossy, ints_vr, rate_vr, rnoise, gain, setup):
    """stcal's CHARGELOSS pass: read-noise variances as if those groups were usable.

    Works on the group DQ as given (``flags``: the chunk's, all groups; used trimmed,
    before suppression and JUMP_DET clearing); changes VAR_RNOISE of the affected
    integrations and of the rate, nothing else.  Rare (not produced for MIRI), so the
    little it needs of the fit is worked out again here.
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
        gdq = flags[integ, setup.n_leading:setup.stop][:, sub]
        hit = (gdq & np.uint8(_CHARGELOSS)) != 0
        gdq[hit] ^= np.uint8(DO_NOT_USE | _CHARGELOSS)
        segs = _find_segments(gdq, np.arange(sub.size))
        g = gain[sub][segs.pixel]
        rn = rnoise[sub][segs.pixel]
        timing = np.full(segs.pixel.size, setup.group_time)
        if not setup.suppress:
            only_first = _only_first(_usable_flags(flags[integ], setup))
            one_first = only_first[sub][segs.pixel] & (segs.length == 1)
            timing[one_first] = setup.first_read_time
        length = np.ascontiguousarray(segs.length, dtype=np.int64)
        var = np.empty(segs.pixel.size)
        lib.rf_rnoise_variance(var.size, pointer(ffi, rn), pointer(ffi, g),
                               pointer(ffi, length), pointer(ffi, timing), pointer(ffi, var))
        use = var > 0
        inv = np.bincount(segs.pixel[use], 1.0 / var[use], minlength=sub.size)
        vr = 1.0 / inv
        vr[vr >= _HUGE_VARIANCE] = 0.0
        ints_vr[integ, sub] = vr
        inv_total[affected] += inv
    redone = np.where(inv_total > 0, 1.0 / inv_total, rate_vr[pixels])
    redone[redone >= _HUGE_VARIANCE] = 0.0
    rate_vr[pixels] = redone
