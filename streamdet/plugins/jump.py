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
(step 1, laid out pixel by pixel for the median), the median of the sorted differences
and the significance scan (step 2), the single-pass flags (3), the count (4), the
neighbour sources and flags (5), the after-jump candidates (6) and step 7.  The sort
itself stays numpy's (its SIMD sort beats a C selection), as do the rarely run iterative
search and the after-jump spreading; the sigma-clip search is C too
(``streamdet/_ckernels/jump_sigclip.c``).

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

MIRI shower flagging (``find_showers``) is not part of this kernel: it needs whole
difference planes, so the step runs it across the engine's passes (:class:`ShowerSearch`,
algorithm in :mod:`streamdet.plugins.jump_showers`).  NIR snowballs
(``expand_large_events``) are not implemented; the step refuses them.  jwst skips the
whole step (no PRIMECRS) when ngroups <= 2, which is the caller's business; this kernel
refuses such ramps.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass

import numpy as np

from streamdet._ckernels import declare, ptr, sorted_row_medians, strides
from streamdet.core.dqflags import DO_NOT_USE, JUMP_DET, PIXEL, SATURATED

NO_GAIN_VALUE = PIXEL["NO_GAIN_VALUE"]

_JUMP = np.uint8(JUMP_DET)
_UNUSABLE = np.uint8(SATURATED | DO_NOT_USE)
_JUMP_OR_DNU = np.uint8(JUMP_DET | DO_NOT_USE)
_BAD_GAIN_FLAGS = np.uint32(NO_GAIN_VALUE | DO_NOT_USE)

# the per-pixel loops, in streamdet/_ckernels/jump.c (layouts and semantics described there)
_c_pixel_major_diffs = declare("jump", "jump_pixel_major_diffs", "piiipiiipiiiiipp", "i")
_c_scan = declare("jump", "jump_scan", "ppi" "piii" "piii" "pi" "iiii" "fdd" "idd"
                  "ppiii" "dd" "ip" "piiii" "p")
_c_settle = declare("jump", "jump_settle", "piiiiiiip", "i")
_c_flag_neighbours = declare("jump", "jump_flag_neighbours", "piiiiiiipi")
_c_sigma_clip = declare("jump_sigclip", "jump_sigma_clip", "piiiiidipiiiiip", "i")
_c_flagged_everywhere = declare("jump_sigclip", "jump_flagged_everywhere", "piiiiiiipip")

# stcal's value for the count of primary cosmic rays when it gives up on an exposure
SKIPPED_CR_COUNT = -99

# astropy.stats.sigma_clip default, which stcal does not override
_SIGCLIP_ROUNDS = 5

# Samples (nints * ngroups * rows * ncols) handled together: large enough for numpy's
# per-call overhead to vanish, small enough that the float64 temporaries stay modest.
_SAMPLES_PER_CHUNK = 1 << 19


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
    rejection_threshold: float = 4.0,
    three_group_rejection_threshold: float = 6.0,
    four_group_rejection_threshold: float = 5.0,
    flag_4_neighbors: bool = True,
    max_jump_to_flag_neighbors: float = 1000.0,
    min_jump_to_flag_neighbors: float = 10.0,
    after_jump_flag_dn1: float = 0.0,
    after_jump_flag_time1: float = 0.0,
    after_jump_flag_dn2: float = 0.0,
    after_jump_flag_time2: float = 0.0,
    min_diffs_single_pass: int = 10,
    minimum_groups: int = 3,
    minimum_sigclip_groups: int = 100,
    only_use_ints: bool = True,
    expand_large_events: bool = False,
    find_showers: bool = False,
    all_dnu_groups: np.ndarray | None = None,
    median_gain: float | None = None,
    all_flagged_groups: np.ndarray | None = None,
    count_rows: slice = slice(None),
) -> JumpCounts:
    """Flag cosmic-ray jumps in ``groupdq`` (in place); see the module docstring.

    ``data`` float32 [nints, ngroups, nrows, ncols] (not modified), ``groupdq`` uint8 of
    the same shape, ``pixeldq`` uint32 [nrows, ncols] (NO_GAIN_VALUE | DO_NOT_USE added
    where the gain is NaN or <= 0, as stcal does), ``gain`` (e/DN) and ``readnoise`` (CDS,
    DN) float32 [nrows, ncols].  ``group_time`` only converts the after-jump times to
    group counts.

    ``minimum_groups`` is what stcal actually uses: its single-process path forces 3
    whatever the step parameter says, so jwst-parity callers pass 3.

    Frame-wide inputs for banded calls (computed from the arrays given when None):
    ``all_dnu_groups`` (:func:`unusable_groups` of the whole frame), ``median_gain``
    (:func:`exposure_median_gain` of the whole frame) and, in sigma-clip mode only,
    ``all_flagged_groups``.  ``count_rows`` selects the rows whose flags are counted.
    """
    if expand_large_events:
        raise NotImplementedError("expand_large_events (snowball flagging) is not implemented yet")
    if find_showers:
        raise NotImplementedError("find_showers needs whole planes: see jump_showers.flag_showers "
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
                        min_diffs_single_pass, minimum_groups, minimum_sigclip_groups,
                        only_use_ints)
    if mode == "skip":
        _settle_flags(groupdq, None)
        return JumpCounts(skipped=True)

    rn_electrons = readnoise * gain
    noise_floor = (rn_electrons * rn_electrons).astype(np.float64) / float(nframes)

    after_groups = (int(after_jump_flag_time1 // group_time), int(after_jump_flag_time2 // group_time))
    after_on = after_groups[0] > 0 or after_groups[1] > 0
    if after_on:
        if median_gain is None:
            median_gain = exposure_median_gain(gain)
        after_levels = (np.float32(after_jump_flag_dn1) * np.float32(median_gain),
                        np.float32(after_jump_flag_dn2) * np.float32(median_gain))

    diff_shape = (nints, ngroups - 1, nrows, ncols)
    after_big = [np.zeros(diff_shape, dtype=bool) for _ in range(2)] if after_on else None
    counted = np.zeros(nrows, dtype=bool)
    counted[count_rows] = True
    counts = JumpCounts()

    thresholds = _Thresholds(float(rejection_threshold), float(four_group_rejection_threshold),
                             float(three_group_rejection_threshold))
    # Neighbour sources and single-pass jumps are both rare: one scan for everything
    # above the lower of the two limits, then the few survivors are split up.
    screen_limit = thresholds.normal if mode == "single" else np.inf
    if flag_4_neighbors:
        screen_limit = min(screen_limit, float(min_jump_to_flag_neighbors))
    scan_options = dict(
        screen_limit=screen_limit,
        jump_limit=thresholds.normal if mode == "single" else np.inf,
        neighbours=(float(min_jump_to_flag_neighbors), float(max_jump_to_flag_neighbors))
        if flag_4_neighbors else None,
        after_levels=after_levels if after_on else None,
        # JUMP_DET bits still on unusable groups came with the input; they are counted
        # (stcal counts before dropping them) and, outside sigma-clip mode, nothing
        # later looks at them.  Sigma-clip mode settles the flags after its group reset.
        settle=mode != "sigclip")
    # blocks of rows (and, when one row of all integrations is already too much, of
    # columns), so the temporaries stay bounded however many integrations there are
    per_row = nints * ngroups * ncols
    step = max(1, _SAMPLES_PER_CHUNK // per_row)
    col_step = ncols if per_row <= _SAMPLES_PER_CHUNK else max(1, _SAMPLES_PER_CHUNK // (nints * ngroups))
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
        diffs, n_valid = _pixel_major_differences(*block, scratch)
        if mode != "single":
            if mode == "iterative":
                hits = _iterative_search(diffs, block[0].shape, noise_floor[rows, cols], thresholds)
                later_dq = block[1][:, 1:]
                np.bitwise_or(later_dq, _JUMP, out=later_dq, where=hits)
                del hits
            else:
                _sigma_clip_flag(diffs, block[1], float(rejection_threshold), only_use_ints)
        diffs.sort(axis=1)
        median = sorted_row_medians(diffs, n_valid)
        del diffs
        after = [big[:, :, rows, cols] for big in after_big] if after_on else None
        n_sources, n_jumps = _scan(*block, median, noise_floor[rows, cols], counted[rows],
                                   after, sources, (start, c0, nrows, ncols), **scan_options)
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
    nints*ndiffs] (NaN where unusable; the caller sorts it in place) and the count of
    usable ones per pixel (int64).  The differences are written to the start of
    ``scratch`` (flat float32) when it is given."""
    nints, ngroups, nrows, ncols = data.shape
    shape = (nrows * ncols, nints * (ngroups - 1))
    if scratch is None:
        out = np.empty(shape, np.float32)
    else:
        out = scratch[:shape[0] * shape[1]].reshape(shape)
    n_valid = np.empty(nrows * ncols, np.int64)
    if _c_pixel_major_diffs(ptr(data), *_row_strides(data), ptr(groupdq), *_row_strides(groupdq),
                            ptr(gain), *_row_strides(gain), nints, ngroups, nrows, ncols,
                            ptr(out), ptr(n_valid)):
        raise MemoryError("no scratch memory for the jump step's differences")
    return out, n_valid


def _scan(data, groupdq, gain, median, noise_floor, counted, after, sources, place, *,
          screen_limit, jump_limit, neighbours, after_levels, settle):
    """One pass of jump_scan (see jump.c) over a block; returns (sources written, JUMP_DET
    count).  ``place`` is (first row, first column, band rows, band columns)."""
    nb_lo, nb_hi = neighbours if neighbours is not None else (np.inf, np.inf)
    if after is not None:
        after_args = (ptr(after[0]), ptr(after[1]), *_row_strides(after[0]),
                      float(after_levels[0]), float(after_levels[1]))
    else:
        after_args = (None, None, 0, 0, 0, 0.0, 0.0)
    screen_factor = float(np.float32(screen_limit * (1 - 1e-3)))
    result = np.zeros(2, np.int64)
    _c_scan(ptr(median), ptr(noise_floor), *_row_strides(noise_floor),
            ptr(data), *_row_strides(data), ptr(groupdq), *_row_strides(groupdq),
            ptr(gain), *_row_strides(gain),
            *data.shape, screen_factor, float(screen_limit), float(jump_limit),
            neighbours is not None, float(nb_lo), float(nb_hi), *after_args,
            bool(settle), ptr(counted), ptr(sources), *place, ptr(result))
    return int(result[0]), int(result[1])


def _settle_flags(groupdq, counted):
    """Count JUMP_DET in the ``counted`` rows (None: none), then remove it from groups
    that are SATURATED or DO_NOT_USE."""
    nints, ngroups, nrows, ncols = groupdq.shape
    return int(_c_settle(ptr(groupdq), *_row_strides(groupdq), nints, ngroups, nrows, ncols,
                         None if counted is None else ptr(counted)))


def _trimmed_abs_median(work):
    """stcal's median for the iterative search, over rows of absolute differences.

    With 4+ usable values every value equal to the largest is left out first; 3 give the
    plain median and 2 the smaller one; fewer give NaN.
    """
    ordered = np.sort(work, axis=1)
    n_valid = ordered.shape[1] - np.count_nonzero(np.isnan(ordered), axis=1)
    rows = np.arange(ordered.shape[0])
    largest = ordered[rows, np.maximum(n_valid - 1, 0)]
    ties = np.count_nonzero(ordered == largest[:, None], axis=1)
    n_kept = np.where(n_valid >= 4, n_valid - ties, n_valid)
    median = sorted_row_medians(ordered, n_kept)
    pairs = n_valid == 2
    median[pairs] = ordered[pairs, 0]
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
    if _c_sigma_clip(ptr(diffs), nrows, ncols, nints, ngroups - 1, bool(only_use_ints),
                     float(n_sigma), _SIGCLIP_ROUNDS, ptr(groupdq), *_row_strides(groupdq),
                     int(_JUMP), int(_UNUSABLE), None if bounds is None else ptr(bounds)):
        raise MemoryError("no scratch memory for the jump step's sigma clip")


def _flagged_everywhere(groupdq, rows_used=None):
    """Bool [nints, ngroups]: whether every pixel (of the rows where ``rows_used``, bool
    per row, is True) is JUMP_DET or DO_NOT_USE (C: it stops at the first one that is
    not, which is almost always the first pixel)."""
    nints, ngroups, nrows, ncols = groupdq.shape
    out = np.empty((nints, ngroups), dtype=bool)
    if rows_used is not None:
        rows_used = np.ascontiguousarray(rows_used, dtype=bool)
    _c_flagged_everywhere(ptr(groupdq), *_row_strides(groupdq), nints, ngroups, nrows, ncols,
                          None if rows_used is None else ptr(rows_used), int(_JUMP_OR_DNU),
                          ptr(out))
    return out


def _flag_neighbours(groupdq, sources):
    """4-neighbour flagging from sources (flat indices into the differences' shape)."""
    nints, ngroups, nrows, ncols = groupdq.shape
    sources = np.ascontiguousarray(sources, dtype=np.int64)
    _c_flag_neighbours(ptr(groupdq), *_row_strides(groupdq), nints, ngroups, nrows, ncols,
                       ptr(sources), sources.size)


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


# --- step plugin (added by the engine work) ---

from streamdet.core.plugins import hookimpl  # noqa: E402
from streamdet.core.references import IMAGE  # noqa: E402
from streamdet.core.step import Granularity, Param, Step  # noqa: E402

from . import follows, jump_showers  # noqa: E402


def stcal_processes(maximum_cores: str, nrows: int) -> int:
    """How many processes jwst's jump would run for ``maximum_cores`` on this machine
    (stcal's compute_num_cores); streamdet itself always uses ``--threads``, but stcal
    honours ``minimum_groups`` only with more than one process."""
    value = str(maximum_cores)
    available = os.cpu_count() or 1
    if value.isnumeric():
        wanted = int(value)
    else:  # as stcal spells them: other values (e.g. 'none') mean one process
        wanted = {"quarter": available // 4 or 1, "half": available // 2 or 1,
                  "all": available}.get(value, 1)
    return max(1, min(nrows, wanted, available))


def _core_rows(chunk) -> tuple[int, int]:
    return chunk.rows.start + chunk.core.start, chunk.rows.start + chunk.core.stop


class JumpStep(Step):
    """Two-point-difference cosmic-ray detection (jwst 3.0 ``jump`` defaults).

    Needs every integration of a pixel at once (the median difference is taken over all
    of them) and one row of neighbours on each side (neighbour flagging)."""

    name = "jump"
    after = follows("jump")
    reftypes = ("gain", "readnoise")
    granularity = Granularity.EXPOSURE
    halo = 1
    thread_safe = True
    status_keyword = "S_JUMP"
    params_spec = {
        "rejection_threshold": Param(float, 4.0, "sigma threshold with 4+ usable differences", min=0),
        "three_group_rejection_threshold": Param(float, 6.0, "sigma threshold with 2 differences", min=0),
        "four_group_rejection_threshold": Param(float, 5.0, "sigma threshold with 3 differences", min=0),
        "maximum_cores": Param(str, "1", "jwst's process count ('1', 'half', 'all', ...); streamdet "
                               "uses --threads, and like stcal honours minimum_groups only when "
                               "this means more than one process"),
        "flag_4_neighbors": Param(bool, True, "flag the 4 neighbours of mid-sized jumps"),
        "max_jump_to_flag_neighbors": Param(float, 1000.0, "largest jump (sigma) whose neighbours are flagged", min=0),
        "min_jump_to_flag_neighbors": Param(float, 10.0, "smallest jump (sigma) whose neighbours are flagged", min=0),
        "after_jump_flag_dn1": Param(float, 0.0, "jumps above this (DN) also flag the following groups", min=0),
        "after_jump_flag_time1": Param(float, 0.0, "... for this many seconds", min=0),
        "after_jump_flag_dn2": Param(float, 0.0, "second after-jump threshold (DN)", min=0),
        "after_jump_flag_time2": Param(float, 0.0, "... and its time (s)", min=0),
        "expand_large_events": Param(bool, False, "snowball flagging (near-IR detectors)"),
        "min_sat_area": Param(float, 1.0, "snowballs: least area of the saturated core"),
        "min_jump_area": Param(float, 5.0, "snowballs: least area of a jump patch"),
        "expand_factor": Param(float, 2.0, "snowballs: expansion of the enclosing ellipse"),
        "use_ellipses": Param(bool, False, "deprecated in jwst; no effect"),
        "sat_required_snowball": Param(bool, True, "snowballs: require a saturated core"),
        "min_sat_radius_extend": Param(float, 2.5, "snowballs: least core radius to extend the core"),
        "sat_expand": Param(int, 2, "snowballs: pixels added to the core's radius"),
        "edge_size": Param(int, 25, "snowballs: distance from the edge where no core is required"),
        "mask_snowball_core_next_int": Param(bool, True, "snowballs: flag saturated cores in the next integration"),
        "snowball_time_masked_next_int": Param(int, 4000, "snowballs: seconds of the next integration flagged"),
        "find_showers": Param(bool, False, "MIRI shower flagging"),
        "max_shower_amplitude": Param(float, 4.0, "showers: largest rate change (DN/s); jwst 3.0 ignores "
                                      "it and uses 6, so does streamdet"),
        "extend_snr_threshold": Param(float, 1.2, "showers: least ring-averaged significance"),
        "extend_min_area": Param(int, 90, "showers: least area of the emission patch"),
        "extend_inner_radius": Param(float, 1.0, "showers: inner radius of the ring kernel", min=0),
        "extend_outer_radius": Param(float, 2.6, "showers: outer radius of the ring kernel", min=0),
        "extend_ellipse_expand_ratio": Param(float, 1.1, "showers: expansion of the fitted ellipse"),
        "time_masked_after_shower": Param(float, 15.0, "showers: seconds flagged after a shower", min=0),
        "min_diffs_single_pass": Param(int, 10, "below this many usable differences, search iteratively", min=1),
        "max_extended_radius": Param(int, 200, "largest radius of a flagged shower or snowball", min=0),
        "minimum_groups": Param(int, 3, "fewest groups for jump detection", min=2),
        "minimum_sigclip_groups": Param(int, 100, "integrations needed to sigma-clip across integrations", min=1),
        "only_use_ints": Param(bool, True, "sigma-clip each group across integrations only"),
    }

    #: parameters of the two-point search (detect_jumps)
    _TWO_POINT = ("rejection_threshold", "three_group_rejection_threshold",
                  "four_group_rejection_threshold", "flag_4_neighbors", "max_jump_to_flag_neighbors",
                  "min_jump_to_flag_neighbors", "after_jump_flag_dn1", "after_jump_flag_time1",
                  "after_jump_flag_dn2", "after_jump_flag_time2", "min_diffs_single_pass",
                  "minimum_groups", "minimum_sigclip_groups", "only_use_ints")

    def prepare(self, meta, refs, pixeldq):
        if meta.ngroups <= 2:
            return "needs at least 3 groups"
        self.meta = meta
        self.gain = refs.shared("gain", "SCI", layout=IMAGE)
        self.readnoise = refs.shared("readnoise", "SCI", layout=IMAGE)
        self.median_gain = exposure_median_gain(self.gain)
        # groups DO_NOT_USE in every pixel seen so far, ANDed over the surveyed pieces
        self.all_dnu = np.ones((meta.nints, meta.ngroups), dtype=bool)
        self.counts: dict[tuple[int, int], JumpCounts] = {}
        self.global_flagged = None
        self.lock = threading.Lock()
        # the frame-wide searches after the two-point one, in stcal's order; each needs
        # an extra band pass (see the engine's frame_passes)
        self.snowballs = SnowballSearch(self.params, meta) if self.params["expand_large_events"] else None
        self.showers = ShowerSearch(self.params, meta) if self.params["find_showers"] else None
        self.searches = [s for s in (self.snowballs, self.showers) if s is not None]
        return None

    def frame_passes(self):
        return len(self.searches)

    def gather_halo(self, stage):
        return self.searches[stage].gather_halo

    def gather(self, chunk, stage, context):
        self.searches[stage].gather(chunk, self.dnu_after_searches(), self.gain[chunk.rows],
                                    self.readnoise[chunk.rows], context)

    def between_passes(self, stage, context):
        self.searches[stage].search(self.dnu_after_searches(), context)
        # for the steps after jump (ramp_fit's MIRI discard of groups DO_NOT_USE
        # everywhere is jwst's decision on the flags jump leaves): snowball cores set to
        # exactly SATURATED take DO_NOT_USE away from later groups
        self.meta.state.jump_dnu_everywhere = self.dnu_after_searches()

    def dnu_after_searches(self):
        """Groups DO_NOT_USE everywhere once the snowball search has run: its saturated
        cores are set to exactly SATURATED from their group on, which takes DO_NOT_USE
        away there (e.g. from the last group)."""
        if self.snowballs is None or self.snowballs.result is None:
            return self.all_dnu
        out = self.all_dnu.copy()
        for kind, region in self.snowballs.result.operations:
            if kind == "saturate":
                out[region.integration, region.group:] = False
        return out

    def survey(self, chunk):
        local = chunk.int_index - self.meta.int_index[0]
        piece = unusable_groups(chunk.groupdq)
        with self.lock:
            self.all_dnu[local] &= piece

    def process(self, chunk):
        rows = chunk.rows
        options = {k: self.params[k] for k in self._TWO_POINT}
        if stcal_processes(self.params["maximum_cores"], self.meta.ny) == 1:
            # stcal's one-process path searches with 3 whatever minimum_groups says
            options["minimum_groups"] = 3
        self.counts[_core_rows(chunk)] = detect_jumps(
            chunk.data, chunk.groupdq, chunk.pixeldq,
            gain=self.gain[rows], readnoise=self.readnoise[rows],
            nframes=self.meta.nframes, group_time=self.meta.group_time,
            all_dnu_groups=self.all_dnu, median_gain=self.median_gain,
            all_flagged_groups=self.global_flagged, count_rows=chunk.core, **options)
        for search in self.searches:
            if search.found is not None:  # known from an earlier pass
                search.apply(chunk, self.gain[rows])

    def rerun_rows(self):
        """Sigma-clip mode clears lone flags in integration-groups flagged in every pixel
        of the frame; a band that judged that on its own rows alone is redone."""
        verdicts = {key: c.all_flagged_groups for key, c in self.counts.items()
                    if c.all_flagged_groups is not None}
        if not verdicts or self.global_flagged is not None:
            # known from an earlier pass (the shower search's): every band since used it
            return []
        self.global_flagged = np.logical_and.reduce(list(verdicts.values()))
        return [slice(*key) for key, v in verdicts.items() if not np.array_equal(v, self.global_flagged)]

    def finish(self):
        total = sum(self.counts.values(), start=JumpCounts(0, 0, False, None)) \
            if self.counts else None
        if total is None:
            return {}
        for search in self.searches:  # the last one's count, as stcal reports it
            total.extended_events = search.found or 0
        primecrs, extncrs = cosmic_ray_keywords(total, self.dnu_after_searches(), self.meta.group_time,
                                                self.meta.ny, self.meta.nx)
        out = {}
        if primecrs is not None:
            out["PRIMECRS"] = primecrs
        if extncrs is not None:
            out["EXTNCRS"] = extncrs
        return out


class ShowerSearch:
    """The jump step's MIRI shower search across the engine's passes (algorithm:
    :mod:`streamdet.plugins.jump_showers`).

    Extra band pass: each band (with ``kernel.halo`` + 1 rows of context, after the
    two-point search) yields the emission masks of its rows for every difference plane,
    kept bit-packed ([integration, difference, row, column/8], in memory or in a scratch
    file). Between the passes: one plane at a time, the patches become shower regions.
    Band pass proper: each band ORs the regions' flags into its rows and checks their
    amplitude before ramp_fit sees them."""

    #: bit-packed emission planes larger than this go to a scratch file
    IN_MEMORY_BYTES = 32 * 1024**2

    def __init__(self, params, meta):
        self.meta = meta
        self.kernel = jump_showers.ring(params["extend_inner_radius"], params["extend_outer_radius"])
        self.threshold = params["extend_snr_threshold"]
        self.min_area = params["extend_min_area"]
        self.expand_ratio = params["extend_ellipse_expand_ratio"]
        # jwst's JumpStep passes twice the radius as stcal's largest full width
        self.max_width = 2 * params["max_extended_radius"]
        self.groups_masked = jump_showers.groups_masked_after_shower(
            params["time_masked_after_shower"], meta.group_time)
        self.max_amplitude = jump_showers.max_amplitude_electrons(meta.group_time)
        self.sigma_clip = meta.nints >= params["minimum_sigclip_groups"]
        self.dnu_or_refpix = np.ones((meta.nints, meta.ngroups), bool)
        self.pixels = np.zeros((meta.nints, meta.ngroups), np.int64)  # emission pixels per plane
        self.row_bytes = (meta.nx + 7) // 8
        self.store = None
        self.regions = None
        self.found = None  # showers, once searched
        self.lock = threading.Lock()

    @property
    def gather_halo(self):
        # the ring average of a core row reads kernel.halo rows around it, whose flags
        # need their own neighbours (the two-point search's halo)
        return self.kernel.halo

    # -- extra pass ----------------------------------------------------------------------
    def _open_store(self, context):
        shape = (self.meta.nints, self.meta.ngroups, self.meta.ny, self.row_bytes)
        with self.lock:
            if self.store is None:
                self.store = _PlaneStore(shape, context.scratch_dir, self.IN_MEMORY_BYTES)
        return self.store

    def gather(self, chunk, all_dnu, gain, readnoise, context):
        meta = self.meta
        core = chunk.core
        c0, c1, _ = core.indices(chunk.nrows)
        dnu_ref = jump_showers.dnu_or_refpix_groups(chunk.groupdq[:, :, core], chunk.pixeldq[core])
        with self.lock:
            self.dnu_or_refpix &= dnu_ref
        if not jump_showers.shower_search_possible(all_dnu):
            return
        store = self._open_store(context)
        gain = np.ascontiguousarray(gain, np.float32)
        if self.sigma_clip:
            stats = jump_showers.sigma_clipped_median_std(chunk.data, chunk.groupdq, gain)
        else:
            stats = jump_showers.median_and_sigma(chunk.data, chunk.groupdq, gain,
                                                  np.ascontiguousarray(readnoise, np.float32),
                                                  meta.nframes)
        frame_row = chunk.rows.start + c0
        counts = np.zeros((meta.nints, meta.ngroups), np.int64)
        buffer = np.empty((chunk.nrows, meta.nx), np.float32) if not self.sigma_clip else None
        for i in range(meta.nints):
            for g in range(1, meta.ngroups):
                if all_dnu[i, g]:  # masked everywhere: no emission
                    continue
                ratio = jump_showers.ratio_plane(chunk.data, chunk.groupdq, chunk.pixeldq, gain,
                                                 i, g, stats, out=buffer)
                plane, n = jump_showers.emission(ratio, self.kernel, self.threshold,
                                                 row0=chunk.rows.start, frame_ny=meta.ny, core=core)
                counts[i, g] = n
                # written even when empty: a band run again (rerun_rows) replaces its rows
                store.write(i, g, frame_row, np.packbits(plane, axis=1))
        with self.lock:
            self.pixels += counts

    # -- between the passes ----------------------------------------------------------------
    def search(self, all_dnu, context):
        meta = self.meta
        self.regions = []
        self.found = 0
        try:
            if not jump_showers.shower_search_possible(all_dnu):
                return
            first = jump_showers.first_searched_groups(self.dnu_or_refpix)
            planes = [(i, g) for i in range(meta.nints) for g in range(first[i], meta.ngroups)
                      if jump_showers.could_hold_shower(int(self.pixels[i, g]), self.min_area)]

            def search_plane(plane):
                i, g = plane
                bits = np.unpackbits(self.store.read(i, g), axis=1, count=meta.nx)
                return i, g, jump_showers.find_ellipses(bits, self.min_area)

            for i, g, ellipses in context.map(search_plane, planes):
                self.found += len(ellipses)
                for ellipse in ellipses:
                    region = jump_showers.draw_region(ellipse, i, g, self.expand_ratio, self.max_width,
                                                      (meta.ny, meta.nx))
                    if region is not None:
                        self.regions.append(region)
        finally:
            if self.store is not None:
                self.store.close()
                self.store = None

    # -- band pass proper --------------------------------------------------------------------
    def apply(self, chunk, gain):
        lo = chunk.rows.start + chunk.core.indices(chunk.nrows)[0]
        hi = chunk.rows.start + chunk.core.indices(chunk.nrows)[1]
        regions = [r for r in self.regions if r.rows.start < hi and r.rows.stop > lo]
        if not regions:
            return
        core = chunk.core
        after = chunk.groupdq[:, :, core]
        before = after.copy()
        jump_showers.apply_regions(after, chunk.pixeldq[core], regions, self.groups_masked, row0=lo)
        jump_showers.revert_large_changes(chunk.data[:, :, core], gain[core], before, after,
                                          self.max_amplitude)


class SnowballSearch:
    """The jump step's snowball search (``expand_large_events``) across the engine's
    passes (algorithm: :mod:`streamdet.plugins.jump_showers`): the extra band pass keeps
    each band's JUMP_DET and SATURATED bits bit-packed; between the passes each
    integration is searched group by group (whole planes); every later pass replays the
    operations found on its bands, halo rows included."""

    gather_halo = 0

    def __init__(self, params, meta):
        self.meta = meta
        self.options = jump_showers.SnowballOptions(
            min_jump_area=params["min_jump_area"], min_sat_area=params["min_sat_area"],
            expand_factor=params["expand_factor"], sat_required=params["sat_required_snowball"],
            min_sat_radius_extend=params["min_sat_radius_extend"],
            sat_expand=params["sat_expand"] * 2,  # as jwst's JumpStep passes it
            edge_size=params["edge_size"], max_width=2 * params["max_extended_radius"],
            persist_next_int=params["mask_snowball_core_next_int"],
            persist_groups=int(params["snowball_time_masked_next_int"] // meta.group_time))
        self.stores = None
        self.result = None
        self.found = None
        self.lock = threading.Lock()

    def gather(self, chunk, all_dnu, gain, readnoise, context):
        meta = self.meta
        with self.lock:
            if self.stores is None:
                shape = (meta.nints, meta.ngroups, meta.ny, (meta.nx + 7) // 8)
                self.stores = {bit: _PlaneStore(shape, context.scratch_dir, ShowerSearch.IN_MEMORY_BYTES)
                               for bit in (JUMP_DET, SATURATED)}
        core = chunk.groupdq[:, :, chunk.core]
        row = chunk.rows.start + chunk.core.indices(chunk.nrows)[0]
        for bit, store in self.stores.items():
            for i in range(meta.nints):
                for g in range(meta.ngroups):
                    store.write(i, g, row, np.packbits((core[i, g] & np.uint8(bit)) != 0, axis=1))

    def search(self, all_dnu, context):
        meta = self.meta
        try:
            def one(i):
                def plane(bit, g):
                    return np.unpackbits(self.stores[bit].read(i, g), axis=1, count=meta.nx).astype(bool)
                return jump_showers.search_integration_snowballs(
                    i, lambda g: plane(JUMP_DET, g), lambda g: plane(SATURATED, g), meta.ngroups,
                    (meta.ny, meta.nx), self.options)

            operations, persist, count = [], [], 0
            for ops, pers, n in context.map(one, range(meta.nints)):
                operations += ops
                persist += pers
                count += n
            opts = self.options
            keep = opts.persist_next_int and opts.persist_groups >= 1
            self.result = jump_showers.Snowballs(operations, persist if keep else [],
                                                 slice(1, min(opts.persist_groups, meta.ngroups)), count)
            self.found = count
        finally:
            if self.stores is not None:
                for store in self.stores.values():
                    store.close()
                self.stores = None

    def apply(self, chunk, gain):
        jump_showers.apply_snowballs(chunk.groupdq, self.result, row0=chunk.rows.start)


class _PlaneStore:
    """Bit-packed emission planes [nints, ngroups, ny, row_bytes]: a numpy array when
    small, else a scratch file moved with positioned reads and writes (its own directory,
    removed on close)."""

    def __init__(self, shape, directory, in_memory_bytes):
        self.shape = shape
        self.plane_bytes = shape[2] * shape[3]
        self.dir = None
        if int(np.prod(shape)) <= in_memory_bytes:
            self.array = np.zeros(shape, np.uint8)
            return
        self.dir = tempfile.mkdtemp(prefix="streamdet-showers-", dir=directory)
        self.fd = os.open(os.path.join(self.dir, "emission.raw"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, int(np.prod(shape)))

    def _offset(self, i, g, row):
        return ((i * self.shape[1] + g) * self.shape[2] + row) * self.shape[3]

    def write(self, i, g, row, packed):
        if self.dir is None:
            self.array[i, g, row:row + packed.shape[0]] = packed
            return
        data = np.ascontiguousarray(packed).tobytes()
        if os.pwrite(self.fd, data, self._offset(i, g, row)) != len(data):
            raise OSError(f"short write to the shower scratch file in {self.dir}")

    def read(self, i, g):
        if self.dir is None:
            return self.array[i, g]
        data = os.pread(self.fd, self.plane_bytes, self._offset(i, g, 0))
        if len(data) != self.plane_bytes:
            raise OSError(f"short read from the shower scratch file in {self.dir}")
        return np.frombuffer(data, np.uint8).reshape(self.shape[2], self.shape[3])

    def close(self):
        if self.dir is not None:
            os.close(self.fd)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self.array = None


@hookimpl
def streamdet_steps():
    return [JumpStep]
