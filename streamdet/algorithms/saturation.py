"""Saturation and A/D-floor flagging of raw MIRI ramps.

Reproduces jwst 3.0 ``saturation`` for non-IRS2 data, i.e. stcal's
``flag_saturated_pixels`` called with ``n_pix_grow_sat=1``, ``use_readpatt=True``, a read
pattern built from NFRAMES, no ZEROFRAME (MIRI has none) and no superbias (MIRI has none,
so the bias term of the group-2 test is 0).

Per integration, independently (nothing carries across integrations):

1. The reference threshold is made usable: pixels whose threshold is NaN or whose
   reference DQ has NO_SAT_CHECK get a threshold of 65536 (one above the 16-bit A/D
   limit) so they can never saturate.
2. Forward through the groups: a pixel is saturated in a group once any group so far
   reached ``data >= threshold`` (the flag is sticky).  The SATURATED plane of each group
   - including SATURATED bits the group already carried - is grown by ``n_pix_grow_sat``
   pixels in a square box (3x3 for 1), one group plane at a time; the growth never
   crosses groups or integrations, but because the source pixel stays saturated the
   grown neighbours reappear in every later group.  Independently, ``data <= 0`` marks
   that group only with AD_FLOOR | DO_NOT_USE (never grown).  NaN data compare false to
   both tests.
3. Backward "dilution" pass, only when a group averages several frames (NFRAMES > 1): a
   group that is not yet SATURATED/DO_NOT_USE, whose next group is SATURATED, and whose
   value reaches ``threshold * mean(frames)/last(frame)`` (factor 1 for unchecked
   pixels, float64 arithmetic) gets DO_NOT_USE, grown like the saturation flag.  With
   NFRAMES = 1 the factor is 1 and the pass is skipped, as in stcal.
4. Group-2 test (when the read pattern is used and ngroups > 2): group index 1 gets
   DO_NOT_USE where group index 2 is SATURATED but group 1 is not, group 0 extrapolated
   to the last frame of group 2 stays below threshold, and the group 1 - group 0 step
   exceeds ``(threshold - group0) / nframes``.  Not grown.  For NFRAMES = 1 it can never
   fire (the step condition implies group 1 itself reached threshold), but it is kept so
   grouped read patterns behave as jwst's do.

Steps 2 and 4 and the growing run in C (``streamdet/_ckernels/saturation.h``), one call
per integration of a band, outside the GIL; the dilution pass (NFRAMES > 1 only) stays
in numpy.

Pixeldq contribution: purely from the reference - the whole saturation DQ array, plus
NO_SAT_CHECK where the threshold is NaN - so it could be applied once per exposure
(:func:`saturation_reference_terms` computes it).  Groupdq flags come from the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from streamdet._ckernels import group_planes, pointer, strides
from streamdet._ckernels._saturation import ffi, lib
from streamdet.core.dqflags import DO_NOT_USE, NO_SAT_CHECK, SATURATED

ATOD_LIMIT = 65535.0
UNCHECKED_THRESHOLD = ATOD_LIMIT + 1.0


@dataclass(frozen=True)
class SaturationParams:
    """The step's parameters and their defaults (jwst 3.0's)."""

    #: grow saturation flags into this many neighbouring pixels (a square box)
    n_pix_grow_sat: int = 1
    #: use the read pattern (frames per group) for the dilution pass and group-2 test
    use_readpatt: bool = True


DEFAULTS = SaturationParams()


def saturation_reference_terms(threshold: np.ndarray, threshold_dq: np.ndarray):
    """Turn the SATURATION reference into what the flagging uses.

    Returns ``(effective_threshold, pixeldq_contribution, unchecked)``: the float32
    threshold with unchecked pixels raised to 65536, the uint32 flags to OR into
    ``pixeldq`` (reference DQ plus NO_SAT_CHECK for NaN thresholds), and the boolean mask
    of unchecked pixels.  The inputs are not modified.
    """
    effective = np.array(threshold, dtype=np.float32, copy=True)
    ref_dq = np.asarray(threshold_dq).astype(np.uint32, copy=False)
    undefined = np.isnan(effective)
    unchecked = ((ref_dq & NO_SAT_CHECK) != 0) | undefined
    effective[unchecked] = UNCHECKED_THRESHOLD
    contribution = ref_dq | np.where(undefined, np.uint32(NO_SAT_CHECK), np.uint32(0))
    return effective, contribution, unchecked


def grow_mask(mask: np.ndarray, n_pix: int) -> np.ndarray:
    """Dilate a boolean mask by a ``(2n+1) x (2n+1)`` square in its last two axes (each
    plane ``[..., rows, cols]`` on its own); outside counts as False."""
    if n_pix <= 0:
        return mask.copy()
    planes = np.ascontiguousarray(mask, dtype=bool).reshape(-1, *mask.shape[-2:])
    grown = np.empty_like(planes)
    nrows, ncols = planes.shape[1:]
    wide = np.empty((nrows, ncols), np.uint8)
    for src, dst in zip(planes, grown):
        lib.streamdet_grow_mask(pointer(ffi, src), pointer(ffi, wide), pointer(ffi, dst),
                                nrows, ncols, n_pix)
    return grown.reshape(mask.shape)


def frames_of_groups(ngroups: int, nframes: int) -> list[list[int]]:
    """1-based frame numbers averaged into each group, as jwst describes the read pattern.

    Like jwst, group gaps are ignored: group ``g`` holds frames ``g*nframes+1 ..
    (g+1)*nframes``.
    """
    return [[g * nframes + k + 1 for k in range(nframes)] for g in range(ngroups)]


def _or_flag(plane_dq: np.ndarray, where: np.ndarray, flag) -> None:
    np.bitwise_or(plane_dq, where.view(np.uint8) * np.uint8(flag), out=plane_dq)


def flag_saturation(
    data: np.ndarray,
    groupdq: np.ndarray,
    pixeldq: np.ndarray,
    threshold: np.ndarray,
    threshold_dq: np.ndarray,
    *,
    n_pix_grow_sat: int = DEFAULTS.n_pix_grow_sat,
    nframes: int = 1,
    use_read_pattern: bool = DEFAULTS.use_readpatt,
    bias: np.ndarray | float | None = None,
    reference_terms=None,
) -> None:
    """Flag saturation and A/D floor in place.

    ``data`` float32 ``[nints, ngroups, nrows, nx]`` (read only), ``groupdq`` uint8 same
    shape and ``pixeldq`` uint32 ``[nrows, nx]`` (both updated in place); ``threshold``
    and ``threshold_dq`` the SATURATION reference ``[nrows, nx]``.  ``reference_terms``
    may carry a cached result of :func:`saturation_reference_terms` for the same
    reference, which then replaces ``threshold`` / ``threshold_dq``.  ``bias`` is a
    superbias frame (only the group-2 test uses it; MIRI has none).

    Groupdq flags depend on the data; the ``pixeldq`` part depends on the reference
    only (idempotent, so ORing it for every integration is harmless).
    """
    if reference_terms is None:
        reference_terms = saturation_reference_terms(threshold, threshold_dq)
    limit, ref_pixeldq, unchecked = reference_terms

    nints, ngroups, nrows, ncols = data.shape
    frames = frames_of_groups(ngroups, nframes) if use_read_pattern else None
    # the group-2 test's terms: group 0's frames averaged, group 2's last frame, group 1's count
    mean0, last2, n1 = ((float(np.mean(frames[0])), float(frames[2][-1]), len(frames[1]))
                        if frames is not None and ngroups > 2 else (1.0, 1.0, 1))
    bias_frame, bias_f, bias_d = None, 0.0, 0.0
    if bias is not None and np.ndim(bias) == 0:
        bias_f, bias_d = float(np.float32(bias)), float(bias)
    elif bias is not None:
        bias_frame = np.ascontiguousarray(np.broadcast_to(bias, (nrows, ncols)), np.float32)
    limit = np.ascontiguousarray(limit, np.float32)
    work = np.empty(3 * nrows * ncols, np.uint8)
    # the per-pixel work of each integration is one C call (streamdet/_ckernels/saturation.h)
    params = ffi.new("saturation_params *", {
        "ngroups": ngroups, "nrows": nrows, "ncols": ncols, "n_grow": int(n_pix_grow_sat),
        "use_pattern": frames is not None, "mean0": mean0, "last2": last2, "n1": n1,
        "bias": ffi.NULL if bias_frame is None else pointer(ffi, bias_frame),
        "bias_f": bias_f, "bias_d": bias_d})

    diluted = _dilution_factors(ngroups, nframes) if frames is not None else ()
    for integ in range(nints):
        with group_planes(data[integ], groupdq[integ], modified=(1,)) as (ramp, ramp_dq):
            params.gstride = strides(ramp)[0]
            lib.streamdet_flag_saturation(pointer(ffi, ramp), pointer(ffi, ramp_dq),
                                          pointer(ffi, limit), pointer(ffi, work), params)
        if diluted:
            _flag_diluted_saturation(data[integ], groupdq[integ], limit, unchecked,
                                     diluted, n_pix_grow_sat)

    np.bitwise_or(pixeldq, ref_pixeldq, out=pixeldq)


@lru_cache(maxsize=32)
def _dilution_factors(ngroups: int, nframes: int) -> tuple[tuple[int, float], ...]:
    """``(group, factor)`` for the groups whose frames' mean differs from their last
    frame (none when each group is one frame), last group but one first. Cached: the
    engine calls the step once per integration and band."""
    frames = frames_of_groups(ngroups, nframes)
    out = []
    for grp in range(len(frames) - 2, -1, -1):
        frames_here = frames[grp]
        factor = np.mean(frames_here) / frames_here[-1]
        if factor != 1:
            out.append((grp, factor))
    return tuple(out)


def _flag_diluted_saturation(ramp, ramp_dq, limit, unchecked, diluted, n_pix_grow_sat):
    # a group averaging frames before and after the saturating one sits below threshold
    for grp, factor in diluted:
        scaled_limit = limit * np.where(unchecked, 1.0, factor)
        this_dq = ramp_dq[grp]
        candidate = (
            (ramp[grp] >= scaled_limit)
            & ((this_dq & (SATURATED | DO_NOT_USE)) == 0)
            & ((ramp_dq[grp + 1] & SATURATED) != 0)
        )
        if candidate.any():
            if n_pix_grow_sat > 0:
                candidate = grow_mask(candidate, n_pix_grow_sat)
            _or_flag(this_dq, candidate, DO_NOT_USE)
