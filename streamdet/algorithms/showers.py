"""MIRI shower flagging (jwst's ``find_showers``), as stcal 1.20's ``find_faint_extended``
does it after the two-point search, in pieces an engine can stream.

A cosmic-ray shower leaves faint charge over tens of pixels: too faint per pixel for the
two-point search, but visible as a patch of slightly significant differences.  Given the
ramp in electrons (data and CDS read noise times the gain) and the group flags left by
the two-point search:

1. **Significance** (per pixel, so any band of rows will do).  Groups whose flags are
   exactly DO_NOT_USE, SATURATED, JUMP_DET, JUMP_DET|DO_NOT_USE or
   SATURATED|DO_NOT_USE are excluded (stcal's rule: other combinations keep their
   value).  With fewer than ``minimum_sigclip_groups`` integrations, each pixel's
   median difference over *all integrations and groups* and ``sigma = sqrt(|median| +
   rn**2 / nframes)`` (float32) give ``|diff - median| / sigma``; with more, astropy's
   ``sigma_clipped_stats`` (5 sigma) over the integrations gives a median and standard
   deviation per group and pixel instead.
2. **Emission** (per difference plane, needs ``halo`` rows around a band): the
   significance of difference ``g-1 -> g`` is masked where group ``g`` or the pixel is
   DO_NOT_USE / SATURATED / JUMP_DET or the pixel's only flag is REFERENCE_PIXEL, then
   averaged over a ring (astropy's ``Ring2DKernel(extend_inner_radius,
   extend_outer_radius)``; masked pixels drop out of the average, pixels beyond the
   frame count as zeros); pixels whose own value is valid and whose average exceeds
   ``extend_snr_threshold`` are emission.
3. **Showers** (a whole plane at a time): the 8-connected patches of emission whose
   filled area reaches ``extend_min_area`` become ellipses (centroid, axis lengths less
   one, orientation: scikit-image's region moments), searched from the integration's
   first group that is not DO_NOT_USE everywhere plus one.  No search at all when the
   exposure has fewer than 10 differences (stcal's ``min_diffs_for_shower``) counting
   all-DO_NOT_USE groups out.
4. **Flags** (per band, from the list of ellipses): each ellipse, its axes widened by
   ``extend_ellipse_expand_ratio`` (both by the same number of pixels, capped at
   ``max_extended_width``) and rounded as stcal rounds them, is drawn (scikit-image's
   ``draw.ellipse``) and ORed as JUMP_DET into its group and the next
   ``groups_masked`` groups, except where the pixel is SATURATED in that group or an
   earlier one of them.  Flagging is deferred until every plane is searched.
5. **Amplitude check** (per pixel and integration): the mean difference of the usable
   groups (none of DO_NOT_USE, SATURATED, JUMP_DET) before and after the shower flags
   are compared; where it changed by more than ``max_amplitude`` electrons per group,
   or is not finite after (e.g. reference pixels), the integration's flags go back to
   what the two-point search left.

The functions are plain numpy/C on arrays; :func:`flag_showers` runs the whole thing
on a whole exposure (what the tests compare with stcal).  The significances and ring
averages are C (``_ckernels/showers.c``), the patches and ellipses scikit-image's, as
stcal's are.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from streamdet._ckernels import pointer, row_medians, strides
from streamdet._ckernels._showers import ffi, lib
from streamdet.core.dqflags import DO_NOT_USE, JUMP_DET, REFERENCE_PIXEL, SATURATED

from .jump import JumpParameters

_RING_AVERAGE = {np.dtype(np.float32): lib.showers_ring_f32,
                 np.dtype(np.float64): lib.showers_ring_f64}

#: stcal's ``min_diffs_for_shower``: fewer differences than this, no shower search
MIN_DIFFS_FOR_SHOWER = 10
#: stcal's sigma_clipped_stats threshold in the many-integration case
SIGCLIP_SIGMA = 5.0
_FLAGS_MASKED = DO_NOT_USE | SATURATED | JUMP_DET
_SAMPLES_PER_BLOCK = 1 << 19
_WARNINGS_LOCK = threading.Lock()


@dataclass(frozen=True)
class Ring:
    """The ring kernel as rows of taps, for the C ring average: tap row t has row offset
    ``row_dy[t]`` and the column offsets of set ``set_of[t]`` (``dx[first[s]:first[s+1]]``
    for set s; rows with equal offsets share a set); every weight is ``weight``.
    ``halo`` is the largest row offset, ``min_norm`` the weight sum below which stcal
    calls the average undefined (1e-3 times the kernel's mean)."""

    row_dy: np.ndarray
    set_of: np.ndarray
    first: np.ndarray
    dx: np.ndarray
    weight: float
    halo: int
    min_norm: float


def ring_kernel(radius_in: float, width: float) -> np.ndarray:
    """astropy's ``Ring2DKernel(radius_in, width).array`` (what stcal convolves with,
    passing its inner and outer radius as these two), the same float64 numbers computed
    the same way: the flat ring ``radius_in <= r <= radius_in + width`` sampled at pixel
    centres on the smallest odd square holding its diameter, divided by its sum. Built
    here because importing astropy.convolution (astropy.modeling) costs ~0.3 s."""
    radius_out = radius_in + width
    size = math.ceil(2 * radius_out)
    size += 1 - size % 2
    offsets = np.arange(-(size - 1) // 2, (size - 1) // 2 + 1)
    x, y = np.meshgrid(offsets, offsets)
    rr = (x - 0.0) ** 2 + (y - 0.0) ** 2
    inside = np.logical_and(rr >= radius_in ** 2, rr <= radius_out ** 2)
    kernel = np.select([inside], [1.0 / (np.pi * (radius_out ** 2 - radius_in ** 2))])
    total = kernel.sum()
    if total != 0:  # a ring between pixel centres stays zeros, as astropy leaves it
        np.divide(kernel, total, kernel)
    return kernel


@lru_cache(maxsize=8)
def ring(inner_radius: float, outer_radius: float) -> Ring:
    kernel = ring_kernel(inner_radius, outer_radius)
    weights = np.unique(kernel[kernel != 0])
    if weights.size != 1:  # astropy's ring kernels are flat; the C average relies on it
        raise ValueError("the ring kernel's weights are not all equal")
    if np.count_nonzero(kernel) > 65535:  # the C average counts taps in 16 bits
        raise ValueError(f"ring radii {inner_radius}, {outer_radius}: kernel too large")
    cy, cx = kernel.shape[0] // 2, kernel.shape[1] // 2
    sets: list[tuple[int, ...]] = []
    row_dy, set_of = [], []
    for y in range(kernel.shape[0]):
        offsets = tuple(int(x) - cx for x in np.flatnonzero(kernel[y]))
        if not offsets:
            continue
        if offsets not in sets:
            sets.append(offsets)
        row_dy.append(y - cy)
        set_of.append(sets.index(offsets))
    first = np.cumsum([0] + [len(s) for s in sets])
    as_int = lambda values: np.ascontiguousarray(values, np.int64)  # noqa: E731
    return Ring(as_int(row_dy), as_int(set_of), as_int(first),
                as_int([x for s in sets for x in s]), float(weights[0]),
                max(abs(d) for d in row_dy) if row_dy else 0, 1e-3 * float(np.mean(kernel)))


def groups_masked_after_shower(time_masked_after_shower: float, group_time: float) -> int:
    return int(time_masked_after_shower // group_time)


def max_amplitude_electrons(group_time: float) -> float:
    """The amplitude check's limit, electrons per group, as jwst 3.0 sets it: stcal's
    JumpData default of 6 times the group time (jwst's JumpStep scales that default, not
    its own ``max_shower_amplitude`` parameter)."""
    return 6.0 * group_time


def shower_search_possible(all_dnu_groups: np.ndarray) -> bool:
    nints, ngroups = all_dnu_groups.shape
    return nints * (ngroups - 1) - int(np.count_nonzero(all_dnu_groups)) >= MIN_DIFFS_FOR_SHOWER


def first_searched_groups(dnu_or_refpix_groups: np.ndarray) -> list[int]:
    """Per integration, the first group searched: one after the first group that is not
    DO_NOT_USE in every pixel (reference pixels counting as DO_NOT_USE)."""
    out = []
    for row in np.asarray(dnu_or_refpix_groups, bool):
        usable = np.flatnonzero(~row)
        out.append(int(usable[0]) + 1 if usable.size else 1)
    return out


def dnu_or_refpix_groups(groupdq: np.ndarray, pixeldq: np.ndarray) -> np.ndarray:
    """Bool [nints, ngroups]: groups DO_NOT_USE in every pixel given, counting pixels
    whose only flag is REFERENCE_PIXEL as DO_NOT_USE (AND over bands for the frame)."""
    nints, ngroups = groupdq.shape[:2]
    if groupdq[0, 0].size == 0:
        return np.ones((nints, ngroups), bool)
    planes = groupdq.reshape(nints, ngroups, -1)
    refpix = (np.asarray(pixeldq) == REFERENCE_PIXEL).reshape(-1)
    if refpix.any():
        planes = planes[:, :, ~refpix]
        if planes.shape[2] == 0:
            return np.ones((nints, ngroups), bool)
    return (np.bitwise_and.reduce(planes, axis=2) & np.uint8(DO_NOT_USE)) != 0


# --- 1. significance -----------------------------------------------------------------

def _electrons(data, groupdq, gain):
    e = np.multiply(data, gain, dtype=np.float32)
    excluded = (groupdq >= 1) & (groupdq <= 5)
    e[excluded] = np.nan
    return e


def median_and_sigma(data, groupdq, gain, readnoise, nframes):
    """Per pixel of a band: the median difference over all integrations and groups and
    ``sigma`` (both float32 [rows, cols])."""
    nints, ngroups, nrows, ncols = data.shape
    median = np.empty((nrows, ncols), np.float32)
    per_row = nints * (ngroups - 1) * ncols
    step = max(1, _SAMPLES_PER_BLOCK // max(1, per_row))
    for r0 in range(0, nrows, step):
        rows = slice(r0, min(nrows, r0 + step))
        block_d, block_q, block_g = data[:, :, rows], groupdq[:, :, rows], gain[rows]
        n = block_d.shape[2] * ncols
        diffs = np.empty((n, nints * (ngroups - 1)), np.float32)
        block = ffi.new("showers_block *", {
            "data": pointer(ffi, block_d), "data_strides": _row_strides(block_d),
            "groupdq": pointer(ffi, block_q), "dq_strides": _row_strides(block_q),
            "gain": pointer(ffi, block_g), "gain_stride": strides(block_g)[0],
            "nints": nints, "ngroups": ngroups, "nrows": block_d.shape[2], "ncols": ncols})
        lib.showers_pixel_major_diffs(block, pointer(ffi, diffs))
        # the mean of the two middle values rounds the same in double then float as in
        # numpy's float32 median
        median[rows] = row_medians(diffs).reshape(-1, ncols)
    rn = np.multiply(readnoise, gain, dtype=np.float32)
    sigma = np.sqrt(np.abs(median) + (rn * rn) / np.float32(nframes))
    return median, sigma.astype(np.float32, copy=False)


def sigma_clipped_median_std(data, groupdq, gain):
    """Many-integration case: per group difference and pixel, astropy's
    ``sigma_clipped_stats(sigma=5)`` median and standard deviation over the
    integrations ([ndiffs, rows, cols] each)."""
    from astropy.stats import sigma_clipped_stats

    nints, ngroups, nrows, ncols = data.shape
    median = std = None
    per_row = nints * (ngroups - 1) * ncols
    step = max(1, _SAMPLES_PER_BLOCK // max(1, per_row))
    for r0 in range(0, nrows, step):
        rows = slice(r0, min(nrows, r0 + step))
        e = _electrons(data[:, :, rows], groupdq[:, :, rows], gain[rows])
        diffs = np.diff(e, axis=1)
        # all-NaN pixels give NaN statistics, as in stcal; the warnings filter is
        # process-wide, so band threads take turns
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, med, sd = sigma_clipped_stats(diffs, sigma=SIGCLIP_SIGMA, axis=0)
        if median is None:
            median = np.empty((ngroups - 1, nrows, ncols), med.dtype)
            std = np.empty((ngroups - 1, nrows, ncols), sd.dtype)
        median[:, rows], std[:, rows] = med, sd
    return median, std


def ratio_plane(data, groupdq, pixeldq, gain, i, g, stats, out=None):
    """Significance of integration ``i``'s difference ``g-1 -> g`` over a band's rows,
    NaN where excluded or masked (see the module docstring).  ``stats`` is
    :func:`median_and_sigma`'s result, or :func:`sigma_clipped_median_std`'s."""
    nrows, ncols = data.shape[2:]
    centre, spread = stats
    if centre.ndim == 2:  # per pixel: one C pass
        if out is None:
            out = np.empty((nrows, ncols), np.float32)
        prev, cur = data[i, g - 1], data[i, g]
        qprev, qcur = groupdq[i, g - 1], groupdq[i, g]
        difference = ffi.new("showers_difference *", {
            "prev": pointer(ffi, prev), "cur": pointer(ffi, cur), "data_stride": strides(prev)[0],
            "dq_prev": pointer(ffi, qprev), "dq_cur": pointer(ffi, qcur),
            "dq_stride": strides(qprev)[0],
            "pixeldq": pointer(ffi, pixeldq), "pixeldq_stride": strides(pixeldq)[0],
            "gain": pointer(ffi, gain), "gain_stride": strides(gain)[0],
            "median": pointer(ffi, centre), "sigma": pointer(ffi, spread),
            "stats_stride": strides(centre)[0], "nrows": nrows, "ncols": ncols})
        lib.showers_ratio_plane(difference, pointer(ffi, out))
        return out
    e = _electrons(data[i, g - 1:g + 1], groupdq[i, g - 1:g + 1], gain)
    diff = e[1] - e[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(diff - centre[g - 1]) / spread[g - 1]
    ratio[_masked(groupdq[i, g], pixeldq)] = np.nan
    return ratio


def _masked(group_flags, pixeldq):
    return (((group_flags | pixeldq) & _FLAGS_MASKED) != 0) | (pixeldq == REFERENCE_PIXEL)


# --- 2. emission ---------------------------------------------------------------------

def emission(ratio, kernel: Ring, threshold, *, row0=0, frame_ny=None, core=slice(None)):
    """Uint8 emission mask of the rows ``core`` of a significance plane ``ratio`` (band
    rows; band row 0 is frame row ``row0``), and its pixel count.  The band must hold
    ``kernel.halo`` rows beyond the core wherever the frame does."""
    nrows, ncols = ratio.shape
    frame_ny = nrows if frame_ny is None else frame_ny
    c0, c1, _ = core.indices(nrows)
    if ratio.strides[1] != ratio.itemsize:
        ratio = np.ascontiguousarray(ratio)
    out = np.empty((c1 - c0, ncols), np.uint8)
    ring_params = ffi.new("showers_ring_params *", {
        "row_dy": pointer(ffi, kernel.row_dy), "set_of": pointer(ffi, kernel.set_of),
        "n_tap_rows": kernel.row_dy.size, "first": pointer(ffi, kernel.first),
        "dx": pointer(ffi, kernel.dx), "n_sets": kernel.first.size - 1,
        "weight": kernel.weight, "min_norm": kernel.min_norm, "threshold": float(threshold)})
    n = _RING_AVERAGE[ratio.dtype](pointer(ffi, ratio), strides(ratio)[0], nrows, ncols, row0,
                                   frame_ny, c0, c1, ring_params, pointer(ffi, out))
    if n < 0:
        raise MemoryError("no memory for the shower search's ring average")
    return out, int(n)


# --- 3. showers ----------------------------------------------------------------------

Ellipse = tuple  # ((centre column, centre row), (minor, major) lengths, angle degrees)


def could_hold_shower(n_pixels: int, min_area: float) -> bool:
    """False when ``n_pixels`` emission pixels cannot make a patch whose filled area
    reaches ``min_area``: a patch of n pixels spans at most n+1 rows plus columns, so
    fills at most ((n+1)/2)**2."""
    return ((n_pixels + 1) / 2.0) ** 2 >= min_area


def find_ellipses(plane: np.ndarray, min_area: float) -> list[Ellipse]:
    """Ellipses of the 8-connected patches of ``plane`` (0/1) whose filled area (holes
    included) is at least ``min_area``, in the order of their first pixel in the frame.

    Only patches whose bounding box could hold ``min_area`` are measured, by
    scikit-image's ``regionprops`` on the patch alone, placed with ``offset``: the same
    numbers as measuring it in the whole labelled frame (coordinates are integers until
    averaged; the moments are the patch's own), without a region object per noise
    pixel. A search plane is mostly a hundred or so scattered noise pixels."""
    from scipy import ndimage
    from skimage.measure import regionprops

    found = []
    labels, _ = ndimage.label(plane, _EIGHT_CONNECTED)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        rows, cols = box
        # the filled area lies inside the bounding box
        if (rows.stop - rows.start) * (cols.stop - cols.start) < min_area:
            continue
        (region,) = regionprops((labels[box] == k).view(np.uint8),
                                offset=(rows.start, cols.start))
        if region.area_filled < min_area:
            continue
        found.append(((float(region.centroid[1]), float(region.centroid[0])),
                      (region.axis_minor_length - 1, region.axis_major_length - 1),
                      np.degrees(region.orientation)))
    return found


#: the neighbourhood of scikit-image's default 2-D labelling (connectivity 2)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --- 4. flags ------------------------------------------------------------------------

@dataclass(frozen=True)
class Region:
    """A drawn (expanded) shower: integration, group, the frame rows and columns of
    its box and the pixels of the box it covers."""

    integration: int
    group: int
    rows: slice
    cols: slice
    mask: np.ndarray


def expanded_half_axes(ellipse: Ellipse, ratio: float, max_width: float) -> tuple[int, int]:
    """The ellipse's half axes after expansion: both full axes grow by ``ratio - 1``
    times the minor one (so long thin patches do not become huge), are capped at
    ``max_width`` and halved with Python's rounding (half to even), as stcal does."""
    first, second = ellipse[1]
    if second < first:
        a1, a2 = first + (ratio - 1.0) * second, second * ratio
    else:
        a1, a2 = first * ratio, second + (ratio - 1.0) * first
    return round(min(a1, max_width) / 2), round(min(a2, max_width) / 2)


def ellipse_box(centre_col: float, centre_row: float, axis_col: float, axis_row: float,
                angle: float, frame_shape: tuple[int, int]):
    """The pixels of an ellipse (full axes ``axis_col``/``axis_row`` before rotation by
    ``angle`` degrees) as stcal draws it: centre rounded, half axes rounded (half to
    even), scikit-image's ``draw.ellipse`` in a box reaching two pixels beyond the
    longer half axis, clipped to the frame.  Returns (rows, cols, mask) or None."""
    from skimage.draw import ellipse as draw_ellipse

    r_col, r_row = round(axis_col / 2), round(axis_row / 2)
    col_c, row_c = round(centre_col), round(centre_row)
    reach = max(r_col, r_row) + 2
    ny, nx = frame_shape
    y0, y1 = max(row_c - reach, 0), min(row_c + reach + 1, ny)
    x0, x1 = max(col_c - reach, 0), min(col_c + reach + 1, nx)
    if r_col == 0 or r_row == 0 or y1 <= y0 or x1 <= x0:
        return None
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    rr, cc = draw_ellipse(row_c - y0, col_c - x0, r_row, r_col, mask.shape, np.radians(angle))
    mask[rr, cc] = True
    if not mask.any():
        return None
    return slice(y0, y1), slice(x0, x1), mask


def draw_region(ellipse: Ellipse, integration: int, group: int, ratio: float, max_width: float,
                frame_shape: tuple[int, int]) -> Region | None:
    """The pixels an expanded ellipse flags, in a box around its rounded centre clipped
    to the frame."""
    half1, half2 = expanded_half_axes(ellipse, ratio, max_width)
    box = ellipse_box(ellipse[0][0], ellipse[0][1], 2 * half1, 2 * half2, ellipse[2], frame_shape)
    return None if box is None else Region(integration, group, *box)


def apply_regions(groupdq: np.ndarray, pixeldq: np.ndarray, regions, groups_masked: int,
                  row0: int = 0, core: slice = slice(None)) -> None:
    """OR JUMP_DET into ``groupdq`` (band [nints, ngroups, rows, cols], band row 0 =
    frame row ``row0``) for every region, in its group and the next ``groups_masked``
    ones, except in pixels SATURATED in that group or an earlier one of them.  Pixels
    whose only flag is REFERENCE_PIXEL are left alone (stcal flags them and its amplitude
    check always puts them back).  Only the band rows ``core`` are changed."""
    nints, ngroups, nrows, _ = groupdq.shape
    c0, c1, _ = core.indices(nrows)
    lo, hi = row0 + c0, row0 + c1
    for reg in regions:
        a, b = max(reg.rows.start, lo), min(reg.rows.stop, hi)
        if a >= b:
            continue
        keep = reg.mask[a - reg.rows.start:b - reg.rows.start].copy()
        keep &= pixeldq[a - row0:b - row0, reg.cols] != REFERENCE_PIXEL
        for g in range(reg.group, min(reg.group + groups_masked + 1, ngroups)):
            plane = groupdq[reg.integration, g, a - row0:b - row0, reg.cols]
            keep &= (plane & np.uint8(SATURATED)) == 0
            plane[keep] |= np.uint8(JUMP_DET)


# --- 5. amplitude check ----------------------------------------------------------------

def revert_large_changes(data, gain, before, after, max_amplitude, core=slice(None)) -> int:
    """Put back ``before``'s flags (all groups of an integration's pixel) where the
    shower flags in ``after`` change the mean usable difference by more than
    ``max_amplitude`` electrons or leave it undefined.  Only pixels of the rows
    ``core`` whose flags changed are looked at.  Returns the pixels reverted."""
    nints = data.shape[0]
    reverted = 0
    for i in range(nints):
        changed = np.any(before[i, :, core] != after[i, :, core], axis=0)
        if not changed.any():
            continue
        ys, xs = np.nonzero(changed)
        ys = ys + core.indices(data.shape[2])[0]
        values = np.multiply(data[i][:, ys, xs], gain[ys, xs], dtype=np.float32)
        old = _mean_usable_difference(values, before[i][:, ys, xs])
        new = _mean_usable_difference(values, after[i][:, ys, xs])
        with np.errstate(invalid="ignore"):
            change = np.abs(old - new)
            bad = ~np.isfinite(change) | (change > np.float32(max_amplitude))
        for y, x in zip(ys[bad], xs[bad]):
            after[i, :, y, x] = before[i, :, y, x]
        reverted += int(bad.sum())
    return reverted


def _mean_usable_difference(values, flags):
    """numpy's float32 nanmean of the differences (groups with DO_NOT_USE, SATURATED or
    JUMP_DET as NaN): a float32 running sum, divided in double by the count."""
    v = values.copy()
    v[(flags & np.uint8(_FLAGS_MASKED)) != 0] = np.nan
    d = np.diff(v, axis=0)
    good = ~np.isnan(d)
    total = np.zeros(d.shape[1], np.float32)
    for k in range(d.shape[0]):
        total += np.where(good[k], d[k], np.float32(0))
    count = good.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total.astype(np.float64) / count).astype(np.float32)


# --- the whole exposure at once -------------------------------------------------------

@dataclass
class ShowerOptions:
    """The shower search's settings.  The first three are in the algorithm's units, which
    the step derives from its parameters (seconds, a radius) and the group time; the
    others default to jwst 3.0's ``JumpStep`` values (the step's defaults come from
    here)."""

    groups_masked: int  #: groups flagged after a shower's (``time_masked_after_shower``)
    max_width: float  #: widest expanded ellipse (jwst: twice ``max_extended_radius``)
    max_amplitude: float  #: electrons per group (:func:`max_amplitude_electrons`)
    snr_threshold: float = 1.2
    min_area: float = 90
    inner_radius: float = 1.0
    outer_radius: float = 2.6
    expand_ratio: float = 1.1
    minimum_sigclip_groups: int = JumpParameters.minimum_sigclip_groups


def search_planes(emission_of, nints: int, ngroups: int, first_groups: list[int], min_area: float):
    """Ellipses of every (integration, group) searched; ``emission_of(i, g)`` gives the
    emission plane of difference g-1 -> g (or None when it cannot hold a shower)."""
    found = []
    for i in range(nints):
        for g in range(first_groups[i], ngroups):
            plane = emission_of(i, g)
            if plane is None:
                continue
            ellipses = find_ellipses(plane, min_area)
            if ellipses:
                found.append((i, g, ellipses))
    return found


def flag_showers(data, groupdq, pixeldq, gain, readnoise, nframes, options: ShowerOptions):
    """The whole search on a whole exposure (data in DN, groupdq as the two-point search
    left it): returns the new groupdq and the number of showers."""
    nints, ngroups, ny, nx = data.shape
    data = np.asarray(data, np.float32)
    gain = np.ascontiguousarray(gain, np.float32)
    readnoise = np.ascontiguousarray(readnoise, np.float32)
    all_dnu = (np.bitwise_and.reduce(groupdq.reshape(nints, ngroups, -1), axis=2) & DO_NOT_USE) != 0
    if not shower_search_possible(all_dnu):
        return groupdq.copy(), 0
    if nints >= options.minimum_sigclip_groups:
        stats = sigma_clipped_median_std(data, groupdq, gain)
    else:
        stats = median_and_sigma(data, groupdq, gain, readnoise, nframes)
    kernel = ring(options.inner_radius, options.outer_radius)
    first = first_searched_groups(dnu_or_refpix_groups(groupdq, pixeldq))

    def emission_of(i, g):
        plane, n = emission(ratio_plane(data, groupdq, pixeldq, gain, i, g, stats), kernel,
                            options.snr_threshold)
        return plane if could_hold_shower(n, options.min_area) else None

    found = search_planes(emission_of, nints, ngroups, first, options.min_area)
    regions = [r for i, g, ellipses in found for e in ellipses
               if (r := draw_region(e, i, g, options.expand_ratio, options.max_width, (ny, nx)))]
    after = groupdq.copy()
    apply_regions(after, pixeldq, regions, options.groups_masked)
    revert_large_changes(data, gain, groupdq, after, options.max_amplitude)
    return after, sum(len(e) for _, _, e in found)


def _row_strides(array):
    if array.shape[-1] > 1 and array.strides[-1] != array.itemsize:
        raise ValueError("the shower search needs arrays whose last axis is contiguous")
    return strides(array)[:-1]


# --- snowballs (expand_large_events) ---------------------------------------------------
#
# stcal's flag_large_events, learned from its source: for each integration, group by group
# from the second, the 8-connected patches of JUMP_DET (least area ``min_jump_area``) are
# snowballs when a patch of newly SATURATED pixels (this group's or the next one's, least
# area ``min_sat_area``) has its centre inside the patch's ellipse, or when the patch lies
# within ``edge_size`` of the frame's edge (stcal measures both coordinates against the
# row count).  Newly saturated patches whose minor axis exceeds ``min_sat_radius_extend``
# have their ellipse, axes grown by ``sat_expand``, set to exactly SATURATED (other flags
# dropped) from this group on; the unexpanded ellipse is remembered for the next
# integration.  Each snowball's ellipse, expanded by ``expand_factor`` (as the showers'),
# gets JUMP_DET in this group where not SATURATED.  Finally, the remembered cores get
# JUMP_DET in groups 1 .. ``persist_groups``-1 of the next integration.  The search reads
# only the JUMP_DET and SATURATED bits of each group as the two-point search left them,
# updated by the saturation it sets itself.


@dataclass
class SnowballOptions:
    """The snowball search's settings.  The first three are in the algorithm's units,
    which the step derives from its parameters and the group time; the others default to
    jwst 3.0's ``JumpStep`` values (the step's defaults come from here)."""

    sat_expand: float  #: pixels added to a core's axes (jwst: twice ``sat_expand``)
    max_width: float  #: widest expanded ellipse (jwst: twice ``max_extended_radius``)
    persist_groups: int  #: groups of the next integration flagged (from seconds)
    min_jump_area: float = 5.0
    min_sat_area: float = 1.0
    expand_factor: float = 2.0
    sat_required: bool = True
    min_sat_radius_extend: float = 2.5
    edge_size: int = 25
    persist_next_int: bool = True


@dataclass(frozen=True)
class Snowballs:
    """What the snowball search found: per integration, the ordered operations
    ``("saturate", Region)`` (exactly SATURATED from the region's group on) and
    ``("jump", Region)`` (JUMP_DET in its group where not SATURATED); then the
    ``persist`` regions (JUMP_DET in groups ``persist_groups`` of their integration);
    and the number of snowballs."""

    operations: list
    persist: list
    persist_groups: slice
    count: int


def _inside(point, ellipse) -> bool:
    """Whether ``point`` (column, row) lies in ``ellipse`` (stcal's test: the ellipse
    turned by 180 degrees less its angle, semi-axes half the lengths)."""
    angle = np.radians(180 - ellipse[2])
    cos, sin = np.cos(angle), np.sin(angle)
    xc = point[0] - ellipse[0][0]
    yc = point[1] - ellipse[0][1]
    xr = xc * cos - yc * sin
    yr = xc * sin + yc * cos
    if ellipse[1][1] >= ellipse[1][0]:
        major, minor = ellipse[1][1] * 0.5, ellipse[1][0] * 0.5
    else:
        major, minor = ellipse[1][0] * 0.5, ellipse[1][1] * 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        return bool((xr**2 / major**2) + (yr**2 / minor**2) <= 1)


def _near_edge(ellipse, low, high) -> bool:
    (x, y) = ellipse[0]
    return x < low or y < low or x > high or y > high


def search_integration_snowballs(i: int, jump_of, sat_of, ngroups: int, frame_shape, options):
    """One integration's snowball operations, in stcal's order; ``jump_of(g)`` and
    ``sat_of(g)`` give the group's JUMP_DET / SATURATED planes (bool) as the two-point
    search left them.  Returns (operations, persist regions, count)."""
    ny, nx = frame_shape
    saturated_since = np.zeros(frame_shape, bool)  # what this search saturated so far
    operations, persist, count = [], [], 0
    low, high = options.edge_size, max(0, ny - options.edge_size)
    sat_now = sat_of(0)
    next_new = None
    for g in range(1, ngroups):
        sat_prev = sat_now | saturated_since
        sat_now = sat_of(g)
        current = sat_now | saturated_since
        new_sat = current & ~sat_prev
        if g < ngroups - 1:
            next_new = (sat_of(g + 1) | saturated_since) & ~current
        next_ellipses = find_ellipses(next_new.astype(np.uint8), options.min_sat_area)
        sat_ellipses = find_ellipses(new_sat.astype(np.uint8), options.min_sat_area)
        jump_ellipses = find_ellipses((jump_of(g) & ~saturated_since).astype(np.uint8),
                                      options.min_jump_area)
        if options.sat_required:
            balls = []
            for jump in jump_ellipses:
                if _near_edge(jump, low, high):
                    balls.append(jump)
                    continue
                for sat in sat_ellipses:
                    if _inside(sat[0], jump) and jump not in balls:
                        balls.append(jump)
                if g < ngroups - 1:
                    for sat in next_ellipses:
                        if _inside(sat[0], jump) and jump not in balls:
                            balls.append(jump)
            for sat in sat_ellipses:
                if min(sat[1][1], sat[1][0]) <= options.min_sat_radius_extend:
                    continue
                box = ellipse_box(sat[0][0], sat[0][1], min(sat[1][0] + options.sat_expand, options.max_width),
                                  min(sat[1][1] + options.sat_expand, options.max_width), sat[2], frame_shape)
                if box is not None:
                    operations.append(("saturate", Region(i, g, *box)))
                    saturated_since[box[0], box[1]] |= box[2]
                core = ellipse_box(sat[0][0], sat[0][1], sat[1][0], sat[1][1], sat[2], frame_shape)
                if core is not None:
                    persist.append(Region(i + 1, 1, *core))
        else:
            balls = jump_ellipses
        count += len(balls)
        for ball in balls:
            region = draw_region(ball, i, g, options.expand_factor, options.max_width, frame_shape)
            if region is not None:
                operations.append(("jump", region))
    return operations, persist, count


def apply_snowballs(groupdq: np.ndarray, found: Snowballs, row0: int = 0) -> None:
    """Replay the snowball operations on a band ([nints, ngroups, rows, cols], band row 0
    = frame row ``row0``; every row of the band)."""
    nints, ngroups, nrows, _ = groupdq.shape
    lo, hi = row0, row0 + nrows
    sat, jump = np.uint8(SATURATED), np.uint8(JUMP_DET)

    def overlap(reg):
        a, b = max(reg.rows.start, lo), min(reg.rows.stop, hi)
        return (a, b, reg.mask[a - reg.rows.start:b - reg.rows.start]) if a < b else None

    for kind, reg in found.operations:
        part = overlap(reg)
        if part is None:
            continue
        a, b, mask = part
        if kind == "saturate":
            for g in range(reg.group, ngroups):
                groupdq[reg.integration, g, a - row0:b - row0, reg.cols][mask] = sat
        else:
            plane = groupdq[reg.integration, reg.group, a - row0:b - row0, reg.cols]
            plane[mask & ((plane & sat) == 0)] |= jump
    for reg in found.persist:
        part = overlap(reg)
        if part is None or reg.integration >= nints:
            continue
        a, b, mask = part
        block = groupdq[reg.integration, found.persist_groups, a - row0:b - row0, reg.cols]
        block[:, mask] |= jump


def flag_snowballs(groupdq: np.ndarray, options: SnowballOptions):
    """The whole snowball search on a whole exposure's flags: returns the new groupdq
    and the number of snowballs."""
    nints, ngroups, ny, nx = groupdq.shape
    operations, persist, count = [], [], 0
    for i in range(nints):
        ops, pers, n = search_integration_snowballs(
            i, lambda g: (groupdq[i, g] & JUMP_DET) != 0, lambda g: (groupdq[i, g] & SATURATED) != 0,
            ngroups, (ny, nx), options)
        operations += ops
        persist += pers
        count += n
    found = Snowballs(operations, persist if options.persist_next_int and options.persist_groups >= 1 else [],
                      slice(1, min(options.persist_groups, ngroups)), count)
    out = groupdq.copy()
    apply_snowballs(out, found)
    return out, count
