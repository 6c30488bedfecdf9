"""Cosmic-ray jump detection on MIRI ramps (two-point differences).

Reproduces what jwst 3.0's ``JumpStep`` gets from stcal 1.20
(``stcal.jump.jump.detect_jumps_data`` and ``twopoint_difference.find_crs``) with one
process (``maximum_cores='1'``), for JWST read patterns (equal group spacing, NFRAMES
frames per group).  Only the JUMP_DET bit of ``groupdq`` and, for pixels without a usable
gain, NO_GAIN_VALUE | DO_NOT_USE in ``pixeldq`` are changed; the ramp itself is left alone.

How a band of rows is searched
------------------------------
1. Everything is done in electrons: ramp and CDS read noise are multiplied by the gain
   (float32, as stcal does), a group flagged SATURATED or DO_NOT_USE becomes NaN, and the
   first differences of consecutive groups are taken (float32).  A difference touching a
   NaN is unusable.
2. Per pixel, the median of all usable differences of *all integrations* is the expected
   step, and ``sigma = sqrt(|median| + rn_e**2 / nframes)`` its noise (rn is CDS noise,
   hence the missing factor 2).  A zero sigma counts as unknown.  ``|diff - median| /
   sigma`` is the significance of a difference.
3. One of three searches, chosen once for the whole exposure from the groups that are
   DO_NOT_USE in every pixel (a frame-wide statistic, see ``all_dnu_groups``):

   * sigma clipping, when the integrations are many (``nints >= minimum_sigclip_groups``
     with ``only_use_ints``; otherwise the count of usable groups is compared): each
     difference is clipped against the same difference of the other integrations (or all
     differences of the pixel when ``only_use_ints`` is False) with an iterated median /
     population-std clip at ``rejection_threshold`` (5 rounds at most, as
     ``astropy.stats.sigma_clip``'s compiled path does); clipped usable differences are
     jumps.  Then, in any integration-group whose every pixel is JUMP_DET or DO_NOT_USE,
     pixels whose only flag is JUMP_DET are reset to 0 - stcal's quirk, kept.
   * single pass, when even the integration with the most all-DO_NOT_USE groups keeps
     ``min_diffs_single_pass`` differences between its other groups: every usable
     difference above ``rejection_threshold`` sigma is a jump, however few usable
     differences the pixel itself has (the 3- and 4-group thresholds play no part here).
   * iterative search otherwise: on the *absolute* differences, the median is taken
     after dropping the largest value(s) when 4+ remain (plain median for 3, the smaller
     value for 2); the threshold depends on the usable count of the pixel over all
     integrations (4+: ``rejection_threshold``, 3: ``four_group_rejection_threshold``,
     2: ``three_group_rejection_threshold``).  In every integration that has a
     difference over its threshold, the difference(s) equal to the pixel's largest ratio
     over all integrations are flagged and removed, and the pixel is searched again -
     with the median now rounded to float32 (stcal stores it in a float32 array after
     the first round) - until nothing is found.

   If neither clipping is possible nor ``minimum_groups`` groups remain usable, stcal
   skips the search altogether and reports -99 primary cosmic rays.
4. The JUMP_DET bits present at this point, in the rows of ``count_rows``, are the
   primary cosmic-ray count (stcal counts flagged group-pixels, not events).
5. Neighbours: a JUMP_DET pixel whose single-pass significance (step 2's median and
   sigma, whatever search found it) lies strictly between ``min_jump_to_flag_neighbors``
   and ``max_jump_to_flag_neighbors`` also flags its 4 edge neighbours in the same
   group, unless a neighbour is SATURATED or DO_NOT_USE in that group.  Flags raised this
   way do not spread further.
6. After-jump flagging (off by default): a JUMP_DET group (neighbour flags included)
   whose ``diff - median`` is at least ``after_jump_flag_dn1 * median(gain)`` electrons
   also flags the next ``int(after_jump_flag_time1 // group_time)`` groups, except
   SATURATED / DO_NOT_USE ones; likewise for the ``*2`` pair.
7. JUMP_DET is removed again wherever the group is SATURATED or DO_NOT_USE (this also
   drops such bits that arrived with the input).

Arithmetic follows stcal's dtypes: differences are float32 values, medians, sigmas and
significances float64, the iterative search's deviations rounded to float32.

The per-pixel loops of the common path are C (``streamdet/_ckernels/jump.c``), so that a
band's thread holds the GIL only between a few calls per block of rows: the differences
(step 1, laid out pixel by pixel for the median), the median (step 2, by selection:
``streamdet/_ckernels/row_medians.c``) and the significance scan, the single-pass flags
(3), the count (4), the neighbour sources and flags (5), the after-jump candidates (6)
and step 7.  The rarely run iterative search and the after-jump spreading stay numpy;
the sigma-clip search is C too (``streamdet/_ckernels/jump_sigclip.c``).

Banding
-------
Every computation is per pixel except steps 3 (mode choice, sigma-clip group reset),
5 (one-pixel neighbourhood) and 6 (the median gain).  A caller may therefore pass a band
of rows with one halo row on each interior side and keep only the core rows, provided it
supplies the frame-wide ``all_dnu_groups`` (:func:`unusable_groups`, AND-ed over bands)
and ``median_gain`` (:func:`exposure_median_gain`).  The sigma-clip group reset is
judged on the rows passed unless ``all_flagged_groups`` is given; each call reports the
verdict for its ``count_rows`` in :attr:`JumpCounts.all_flagged_groups` so that an engine
can AND them and repeat the rare band where the local verdict was wrong.

MIRI shower flagging (``find_showers``) and snowball flagging (``expand_large_events``)
are not part of this search: they need whole planes (algorithms in
:mod:`streamdet.algorithms.showers`; the step runs them across the engine's passes,
:mod:`streamdet.plugins.jump_showers`), and :func:`detect_jumps` refuses them.  jwst
skips the whole step (no PRIMECRS) when ngroups <= 2, which is the caller's business;
this search refuses such ramps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from streamdet._ckernels import pointer, row_medians, strides
from streamdet._ckernels._jump import ffi, lib
from streamdet._ckernels._jump_sigclip import ffi as sigclip_ffi
from streamdet._ckernels._jump_sigclip import lib as sigclip_lib
from streamdet.core.dqflags import DO_NOT_USE, JUMP_DET, PIXEL, SATURATED

NO_GAIN_VALUE = PIXEL["NO_GAIN_VALUE"]

_JUMP = np.uint8(JUMP_DET)
_UNUSABLE = np.uint8(SATURATED | DO_NOT_USE)
_BAD_GAIN_FLAGS = np.uint32(NO_GAIN_VALUE | DO_NOT_USE)

# stcal's value for the count of primary cosmic rays when it gives up on an exposure
SKIPPED_CR_COUNT = -99

# astropy.stats.sigma_clip default, which stcal does not override
_SIGCLIP_ROUNDS = 5

# Samples (nints * ngroups * rows * ncols) handled together: large enough for numpy's
# per-call overhead to vanish, small enough that the float64 temporaries stay modest.
_SAMPLES_PER_CHUNK = 1 << 19

# ...but never fewer columns than this: a block reads a run of its columns from each of
# the nints * ngroups group planes, and runs of a cache line or two starve the loops
# (measured: 500 integrations x 60 groups on SUB256 made 17-column blocks, and the
# step took 42.8 s of CPU; 32.0 s with 64 columns, for 7.5 MB more scratch per block)
_MIN_BLOCK_COLUMNS = 64


@dataclass
class JumpCounts:
    """What a :func:`detect_jumps` call found in its ``count_rows``.

    ``primary_crs`` is stcal's count: JUMP_DET group-pixels before neighbour and
    after-jump flagging.  ``skipped`` is True when stcal's too-few-usable-groups rule
    applied (jwst then records -99 cosmic rays).  ``all_flagged_groups`` is only set in
    sigma-clip mode: per (integration, group), whether every counted pixel was JUMP_DET
    or DO_NOT_USE before the reset of step 3.  Counts from several bands add up with
    ``+``.
    """

    primary_crs: int = 0
    extended_events: int = 0
    skipped: bool = False
    all_flagged_groups: np.ndarray | None = None

    def __add__(self, other: JumpCounts) -> JumpCounts:
        if self.all_flagged_groups is None:
            flagged = other.all_flagged_groups
        elif other.all_flagged_groups is None:
            flagged = self.all_flagged_groups
        else:
            flagged = self.all_flagged_groups & other.all_flagged_groups
        return JumpCounts(self.primary_crs + other.primary_crs,
                          self.extended_events + other.extended_events,
                          self.skipped or other.skipped, flagged)


@dataclass(frozen=True)
class JumpParameters:
    """The search's parameters, with jwst 3.0's ``JumpStep`` defaults (the step's own
    ``params_spec`` takes its defaults from here).  See the module docstring for what
    each does; ``expand_large_events`` and ``find_showers`` are whole-frame searches that
    :func:`detect_jumps` refuses (see :mod:`streamdet.algorithms.showers`)."""

    rejection_threshold: float = 4.0
    three_group_rejection_threshold: float = 6.0
    four_group_rejection_threshold: float = 5.0
    flag_4_neighbors: bool = True
    max_jump_to_flag_neighbors: float = 1000.0
    min_jump_to_flag_neighbors: float = 10.0
    after_jump_flag_dn1: float = 0.0
    after_jump_flag_time1: float = 0.0
    after_jump_flag_dn2: float = 0.0
    after_jump_flag_time2: float = 0.0
    min_diffs_single_pass: int = 10
    minimum_groups: int = 3
    minimum_sigclip_groups: int = 100
    only_use_ints: bool = True
    expand_large_events: bool = False
    find_showers: bool = False


def unusable_groups(groupdq: np.ndarray) -> np.ndarray:
    """Bool [nints, ngroups]: groups that are DO_NOT_USE in every pixel given.

    For a banded exposure, AND the results of all bands' core rows to get the
    frame-wide answer that jump detection and the PRIMECRS/EXTNCRS keywords need.
    """
    nints, ngroups = groupdq.shape[:2]
    if groupdq[0, 0].size == 0:
        return np.ones((nints, ngroups), dtype=bool)
    common = np.bitwise_and.reduce(groupdq.reshape(nints, ngroups, -1), axis=2)
    return (common & np.uint8(DO_NOT_USE)) != 0


def exposure_median_gain(gain: np.ndarray) -> np.float32:
    """The frame-wide median gain that scales the after-jump DN thresholds."""
    return np.float32(np.nanmedian(np.asarray(gain, dtype=np.float32)))


def cosmic_ray_keywords(counts: JumpCounts, all_dnu_groups: np.ndarray, group_time: float,
                        nrows: int, ncols: int) -> tuple[float | None, float | None]:
    """PRIMECRS and EXTNCRS as jwst's JumpStep writes them.

    PRIMECRS is primary cosmic rays per thousand pixels per second, EXTNCRS extended
    events per million pixels per second.  The time is ``group_time`` times the number
    of groups that are not DO_NOT_USE everywhere, less one group per integration (the
    groups that bound differences); the pixel count is the whole array, reference
    pixels included.  Returns ``(None, None)`` when that group count is below 1, where
    jwst leaves both keywords unset.
    """
    nints, ngroups = all_dnu_groups.shape
    counted_groups = nints * ngroups - int(np.count_nonzero(all_dnu_groups)) - nints
    if counted_groups < 1:
        return None, None
    n_crs = SKIPPED_CR_COUNT if counts.skipped else counts.primary_crs
    pixel_seconds = (group_time * counted_groups) * (nrows * ncols)
    return 1000 * n_crs / pixel_seconds, 1e6 * counts.extended_events / pixel_seconds


def detect_jumps(
    data: np.ndarray,
    groupdq: np.ndarray,
    pixeldq: np.ndarray,
    *,
    gain: np.ndarray,
    readnoise: np.ndarray,
    nframes: int,
    group_time: float,
    parameters: JumpParameters = JumpParameters(),
    all_dnu_groups: np.ndarray | None = None,
    median_gain: float | None = None,
    all_flagged_groups: np.ndarray | None = None,
    count_rows: slice = slice(None),
    **overrides,
) -> JumpCounts:
    """Flag cosmic-ray jumps in ``groupdq`` (in place); see the module docstring.

    ``data`` float32 [nints, ngroups, nrows, ncols] (not modified), ``groupdq`` uint8 of
    the same shape, ``pixeldq`` uint32 [nrows, ncols] (NO_GAIN_VALUE | DO_NOT_USE added
    where the gain is NaN or <= 0, as stcal does), ``gain`` (e/DN) and ``readnoise`` (CDS,
    DN) float32 [nrows, ncols].  ``group_time`` only converts the after-jump times to
    group counts.  ``parameters`` (:class:`JumpParameters`) are the search's, any of
    which a keyword of the same name overrides.

    ``minimum_groups`` is what stcal actually uses: its single-process path forces 3
    whatever the step parameter says, so jwst-parity callers pass 3.

    Frame-wide inputs for banded calls (computed from the arrays given when None):
    ``all_dnu_groups`` (:func:`unusable_groups` of the whole frame), ``median_gain``
    (:func:`exposure_median_gain` of the whole frame) and, in sigma-clip mode only,
    ``all_flagged_groups``.  ``count_rows`` selects the rows whose flags are counted.
    """
    p = replace(parameters, **overrides) if overrides else parameters
    if p.expand_large_events:
        raise NotImplementedError("expand_large_events (snowball flagging) is not implemented yet")
    if p.find_showers:
        raise NotImplementedError("find_showers needs whole planes: see showers.flag_showers "
                                  "(the step runs it across the engine's passes)")
    nints, ngroups, nrows, ncols = data.shape
    if ngroups < 3:
        raise ValueError("jump detection needs at least 3 groups (jwst skips the step)")
    if groupdq.shape != data.shape or pixeldq.shape != (nrows, ncols):
        raise ValueError("groupdq/pixeldq shapes do not match the ramp")
    if groupdq.dtype != np.uint8 or not _columns_contiguous(groupdq):
        raise ValueError("groupdq must be uint8 with contiguous rows (it is flagged in place)")

    data, gain, readnoise = (
        array if array.dtype == np.float32 and _columns_contiguous(array)
        else np.ascontiguousarray(array, dtype=np.float32)
        for array in (np.asarray(data), np.asarray(gain), np.asarray(readnoise)))
    pixeldq[~(gain > 0)] |= _BAD_GAIN_FLAGS

    if all_dnu_groups is None:
        all_dnu_groups = unusable_groups(groupdq)
    mode = _search_mode(np.asarray(all_dnu_groups, dtype=bool), nints, ngroups,
                        p.min_diffs_single_pass, p.minimum_groups, p.minimum_sigclip_groups,
                        p.only_use_ints)
    if mode == "skip":
        _settle_flags(groupdq, None)
        return JumpCounts(skipped=True)

    rn_electrons = readnoise * gain
    noise_floor = (rn_electrons * rn_electrons).astype(np.float64) / float(nframes)

    after_groups = (int(p.after_jump_flag_time1 // group_time), int(p.after_jump_flag_time2 // group_time))
    after_on = after_groups[0] > 0 or after_groups[1] > 0
    if after_on:
        if median_gain is None:
            median_gain = exposure_median_gain(gain)
        after_levels = (np.float32(p.after_jump_flag_dn1) * np.float32(median_gain),
                        np.float32(p.after_jump_flag_dn2) * np.float32(median_gain))

    diff_shape = (nints, ngroups - 1, nrows, ncols)
    after_big = [np.zeros(diff_shape, dtype=bool) for _ in range(2)] if after_on else None
    counted = np.zeros(nrows, dtype=bool)
    counted[count_rows] = True
    counts = JumpCounts()

    thresholds = _Thresholds(float(p.rejection_threshold), float(p.four_group_rejection_threshold),
                             float(p.three_group_rejection_threshold))
    # Neighbour sources and single-pass jumps are both rare: one scan for everything
    # above the lower of the two limits, then the few survivors are split up.
    screen_limit = thresholds.normal if mode == "single" else np.inf
    if p.flag_4_neighbors:
        screen_limit = min(screen_limit, float(p.min_jump_to_flag_neighbors))
    scan_params = _scan_params(
        (nrows, ncols), _row_strides(after_big[0]) if after_on else None,
        screen_limit=screen_limit,
        jump_limit=thresholds.normal if mode == "single" else np.inf,
        neighbours=(float(p.min_jump_to_flag_neighbors), float(p.max_jump_to_flag_neighbors))
        if p.flag_4_neighbors else None,
        after_levels=after_levels if after_on else None,
        # JUMP_DET bits still on unusable groups came with the input; they are counted
        # (stcal counts before dropping them) and, outside sigma-clip mode, nothing
        # later looks at them.  Sigma-clip mode settles the flags after its group reset.
        settle=mode != "sigclip")
    # blocks of rows (and, when one row of all integrations is already too much, of
    # columns), so the temporaries stay bounded however many integrations there are
    per_row = nints * ngroups * ncols
    step = max(1, _SAMPLES_PER_CHUNK // per_row)
    col_step = ncols if per_row <= _SAMPLES_PER_CHUNK else max(
        _MIN_BLOCK_COLUMNS, _SAMPLES_PER_CHUNK // (nints * ngroups))
    blocks = [(r0, c0) for r0 in range(0, nrows, step) for c0 in range(0, ncols, col_step)]
    block_size = nints * (ngroups - 1) * min(step, nrows) * min(col_step, ncols)
    sources = np.empty(block_size, np.int64)
    # one buffer for every block's differences: fresh pages for each would cost more
    # (page faults) than the step's arithmetic on them
    scratch = np.empty(block_size, np.float32)
    neighbour_sources = []
    for start, c0 in blocks:
        rows = slice(start, min(nrows, start + step))
        cols = slice(c0, min(ncols, c0 + col_step))
        block = (data[:, :, rows, cols], groupdq[:, :, rows, cols], gain[rows, cols])
        diffs = _pixel_major_differences(*block, scratch)
        if mode != "single":
            if mode == "iterative":
                hits = _iterative_search(diffs, block[0].shape, noise_floor[rows, cols], thresholds)
                later_dq = block[1][:, 1:]
                np.bitwise_or(later_dq, _JUMP, out=later_dq, where=hits)
                del hits
            else:
                _sigma_clip_flag(diffs, block[1], float(p.rejection_threshold), p.only_use_ints)
        median = row_medians(diffs)
        del diffs
        after = [big[:, :, rows, cols] for big in after_big] if after_on else None
        n_sources, n_jumps = _scan(*block, median, noise_floor[rows, cols], counted[rows],
                                   after, sources, (start, c0), scan_params)
        counts.primary_crs += n_jumps
        if n_sources:
            neighbour_sources.append(sources[:n_sources].copy())

    if mode == "sigclip":
        everywhere = _flagged_everywhere(groupdq)
        counts.all_flagged_groups = _flagged_everywhere(groupdq, counted)
        reset = everywhere if all_flagged_groups is None else np.asarray(all_flagged_groups, bool)
        for i, g in zip(*np.nonzero(reset)):
            plane = groupdq[i, g]
            plane[plane == _JUMP] = 0
        counts.primary_crs = _settle_flags(groupdq, counted)

    if neighbour_sources:
        _flag_neighbours(groupdq, np.concatenate(neighbour_sources))
    if after_on:
        _flag_after_jumps(groupdq, after_big, after_groups)
    return counts


@dataclass(frozen=True)
class _Thresholds:
    normal: float
    three_diffs: float
    two_diffs: float


def search_mode(all_dnu_groups: np.ndarray, parameters: JumpParameters = JumpParameters()) -> str:
    """How :func:`detect_jumps` searches, given the groups DO_NOT_USE in every pixel of
    the frame (bool ``[nints, ngroups]``): "sigclip", "single", "iterative" or "skip".
    The only use the search makes of that frame-wide survey."""
    all_dnu_groups = np.asarray(all_dnu_groups, dtype=bool)
    p = parameters
    return _search_mode(all_dnu_groups, *all_dnu_groups.shape, p.min_diffs_single_pass,
                        p.minimum_groups, p.minimum_sigclip_groups, p.only_use_ints)


def _search_mode(all_dnu_groups, nints, ngroups, min_diffs_single_pass, minimum_groups,
                 minimum_sigclip_groups, only_use_ints) -> str:
    dead_per_int = all_dnu_groups.sum(axis=1)
    fewest_usable_groups = ngroups - int(dead_per_int.max())
    usable_groups_total = nints * ngroups - int(dead_per_int.sum())
    if only_use_ints:
        clipping = nints >= minimum_sigclip_groups
    else:
        clipping = usable_groups_total >= minimum_sigclip_groups
    if clipping:
        return "sigclip"
    if fewest_usable_groups < minimum_groups:
        return "skip"
    if fewest_usable_groups - 1 >= min_diffs_single_pass:
        return "single"
    return "iterative"


def _columns_contiguous(array):
    return array.shape[-1] <= 1 or array.strides[-1] == array.itemsize


def _row_strides(array):
    """Element strides of all axes but the columns, which the C loops need contiguous."""
    if not _columns_contiguous(array):
        raise ValueError("jump detection needs arrays whose last axis is contiguous")
    return strides(array)[:-1]


def _pixel_major_differences(data, groupdq, gain, scratch=None):
    """First differences in electrons of a block, pixel-major: float32 [rows*cols,
    nints*ndiffs], NaN where unusable.  They are written to the start of ``scratch``
    (flat float32) when it is given."""
    nints, ngroups, nrows, ncols = data.shape
    shape = (nrows * ncols, nints * (ngroups - 1))
    if scratch is None:
        out = np.empty(shape, np.float32)
    else:
        out = scratch[:shape[0] * shape[1]].reshape(shape)
    if lib.jump_pixel_major_diffs(_block(data, groupdq, gain), pointer(ffi, out)):
        raise MemoryError("no scratch memory for the jump step's differences")
    return out


def _block(data, groupdq, gain=None):
    """The ``jump_block`` (jump.h) of a block of ramps; only ``groupdq`` may be None
    when the C function reads nothing else."""
    nints, ngroups, nrows, ncols = groupdq.shape
    fields = {"groupdq": pointer(ffi, groupdq), "dq_strides": _row_strides(groupdq),
              "nints": nints, "ngroups": ngroups, "nrows": nrows, "ncols": ncols}
    if data is not None:
        fields.update(data=pointer(ffi, data), data_strides=_row_strides(data),
                      gain=pointer(ffi, gain), gain_stride=_row_strides(gain)[0])
    return ffi.new("jump_block *", fields)


def _scan_params(band_shape, after_strides, *, screen_limit, jump_limit, neighbours,
                 after_levels, settle):
    """The ``jump_scan_params`` (jump.h) of a band: what its blocks' scans look for."""
    nb_lo, nb_hi = neighbours if neighbours is not None else (np.inf, np.inf)
    after_levels = after_levels if after_levels is not None else (0.0, 0.0)
    return ffi.new("jump_scan_params *", {
        "screen_factor": float(np.float32(screen_limit * (1 - 1e-3))),
        "screen_limit": float(screen_limit), "jump_limit": float(jump_limit),
        "flag_neighbours": neighbours is not None,
        "neighbour_low": float(nb_lo), "neighbour_high": float(nb_hi),
        "after_strides": after_strides if after_strides is not None else (0, 0, 0),
        "after_level0": float(after_levels[0]), "after_level1": float(after_levels[1]),
        "settle_flags": bool(settle),
        "band_nrows": band_shape[0], "band_ncols": band_shape[1]})


def _scan(data, groupdq, gain, median, noise_floor, counted, after, sources, corner, params):
    """One pass of jump_scan (see jump.h) over a block; returns (sources written, JUMP_DET
    count).  ``corner`` is the block's (first row, first column) in the band."""
    result = np.zeros(2, np.int64)
    lib.jump_scan(_block(data, groupdq, gain), params, pointer(ffi, median),
                  pointer(ffi, noise_floor), _row_strides(noise_floor)[0],
                  pointer(ffi, after[0]) if after is not None else ffi.NULL,
                  pointer(ffi, after[1]) if after is not None else ffi.NULL,
                  pointer(ffi, counted), pointer(ffi, sources), *corner, pointer(ffi, result))
    return int(result[0]), int(result[1])


def _settle_flags(groupdq, counted):
    """Count JUMP_DET in the ``counted`` rows (None: none), then remove it from groups
    that are SATURATED or DO_NOT_USE."""
    return int(lib.jump_settle(_block(None, groupdq),
                               ffi.NULL if counted is None else pointer(ffi, counted)))


def _trimmed_abs_median(work):
    """stcal's median for the iterative search, over rows of absolute differences.

    With 4+ usable values every value equal to the largest is left out first; 3 give the
    plain median and 2 the smaller one; fewer give NaN.
    """
    n_valid = work.shape[1] - np.count_nonzero(np.isnan(work), axis=1)
    largest = np.fmax.reduce(work, axis=1)
    trimmed = np.where((n_valid >= 4)[:, None] & (work == largest[:, None]), np.nan, work)
    median = row_medians(trimmed)
    pairs = n_valid == 2
    median[pairs] = np.fmin.reduce(work[pairs], axis=1)
    median[n_valid < 2] = np.nan
    return median


def _iterative_search(diffs, shape, noise_floor, thresholds):
    """JUMP_DET mask [nints, ndiffs, rows, cols] of a block of ramps of ``shape`` from
    its pixel-major differences (:func:`_pixel_major_differences`)."""
    nints, ngroups, nrows, ncols = shape
    ndiffs = ngroups - 1
    work = np.abs(diffs)
    floor = noise_floor.reshape(-1)
    found = np.zeros(work.shape, dtype=bool)
    pixels = np.arange(work.shape[0])
    first_round = True
    with np.errstate(invalid="ignore"):
        while pixels.size:
            median = _trimmed_abs_median(work)
            if not first_round:
                median = median.astype(np.float32).astype(np.float64)
            sigma = np.sqrt(np.abs(median) + floor[pixels])
            sigma[sigma == 0.0] = np.nan
            excess = (work - median[:, None]).astype(np.float32)
            ratio = np.abs(excess).astype(np.float64)
            ratio /= sigma[:, None]

            n_usable = work.shape[1] - np.count_nonzero(np.isnan(work), axis=1)
            limit = np.full(n_usable.shape, np.inf)
            limit[n_usable >= 4] = thresholds.normal
            limit[n_usable == 3] = thresholds.three_diffs
            limit[n_usable == 2] = thresholds.two_diffs
            per_int = ratio.reshape(-1, nints, ndiffs)
            best_per_int = per_int[:, :, 0].copy()
            for k in range(1, ndiffs):  # (fmax.reduce over the short last axis is slower)
                np.fmax(best_per_int, per_int[:, :, k], out=best_per_int)
            int_has_jump = best_per_int > limit[:, None]
            best = np.fmax.reduce(best_per_int, axis=1)
            new = ratio == best[:, None]
            new &= np.repeat(int_has_jump, ndiffs, axis=1)

            again = new.any(axis=1)
            found[pixels[again]] |= new[again]
            work = work[again]
            work[new[again]] = np.nan
            pixels = pixels[again]
            first_round = False
    return np.ascontiguousarray(found.T).reshape(nints, ndiffs, nrows, ncols)


def _sigma_clip_flag(diffs, groupdq, n_sigma, only_use_ints, bounds=None):
    """Flag JUMP_DET in a block's ``groupdq`` [nints, ngroups, rows, cols] where an
    iterated median/std clip rejects a usable difference (not on SATURATED or DO_NOT_USE
    groups), from the block's pixel-major differences.  C: jump_sigclip.c, which also
    explains ``bounds`` (for the tests)."""
    nints, ngroups, nrows, ncols = groupdq.shape
    diffs = np.ascontiguousarray(diffs, dtype=np.float32)
    if sigclip_lib.jump_sigma_clip(
            pointer(sigclip_ffi, diffs), nrows, ncols, nints, ngroups - 1, bool(only_use_ints),
            float(n_sigma), _SIGCLIP_ROUNDS, pointer(sigclip_ffi, groupdq),
            *_row_strides(groupdq),
            sigclip_ffi.NULL if bounds is None else pointer(sigclip_ffi, bounds)):
        raise MemoryError("no scratch memory for the jump step's sigma clip")


def _flagged_everywhere(groupdq, rows_used=None):
    """Bool [nints, ngroups]: whether every pixel (of the rows where ``rows_used``, bool
    per row, is True) is JUMP_DET or DO_NOT_USE (C: it stops at the first one that is
    not, which is almost always the first pixel)."""
    nints, ngroups, nrows, ncols = groupdq.shape
    out = np.empty((nints, ngroups), dtype=bool)
    if rows_used is not None:
        rows_used = np.ascontiguousarray(rows_used, dtype=bool)
    sigclip_lib.jump_flagged_everywhere(
        pointer(sigclip_ffi, groupdq), *_row_strides(groupdq), nints, ngroups, nrows, ncols,
        sigclip_ffi.NULL if rows_used is None else pointer(sigclip_ffi, rows_used),
        pointer(sigclip_ffi, out))
    return out


def _flag_neighbours(groupdq, sources):
    """4-neighbour flagging from sources (flat indices into the differences' shape)."""
    sources = np.ascontiguousarray(sources, dtype=np.int64)
    lib.jump_flag_neighbours(_block(None, groupdq), pointer(ffi, sources), sources.size)


def _flag_after_jumps(groupdq, after_big, after_groups):
    later_dq = groupdq[:, 1:]
    jumped = (later_dq & _JUMP) != 0
    extra = np.zeros(jumped.shape, dtype=bool)
    for big, n_after in zip(after_big, after_groups):
        big &= jumped
        extra |= _extend_forward(big, n_after)
    extra &= (later_dq & _UNUSABLE) == 0
    np.bitwise_or(later_dq, _JUMP, out=later_dq, where=extra)


def _extend_forward(marks, n_after):
    """Along axis 1, also mark the ``n_after`` entries that follow each mark."""
    if n_after <= 0:
        return marks
    spread = marks.copy()
    last = marks.shape[1]
    for shift in range(1, min(n_after, last - 1) + 1):
        spread[:, shift:] |= marks[:, :-shift]
    return spread
