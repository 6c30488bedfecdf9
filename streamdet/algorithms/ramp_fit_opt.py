"""ramp_fit's optional results (``save_opt``): per integration the fitted segments'
slopes, uncertainties, variances, intercepts and weights, the pedestal and the jump
magnitudes, as stcal 1.20's OLS_C fitter reports them (see streamdet/core/fitopt.py for
what each holds, and for their store and writer). Only runs when ``save_opt`` is on: the
default path does none of this.

The segments are those the fit uses (ramp_fit._find_segments, ordered by pixel then
time); their values are recomputed here in double precision with the fit's own weights,
vectorised over the segments of one length and weighting exponent.
"""

from __future__ import annotations

import numpy as np

from streamdet.core.dqflags import JUMP_DET, SATURATED

from . import ramp_fit as rf
from .ramp_fit import segment_bound

#: the per-segment arrays, in RampFitOutputModel's order
SEGMENT_ARRAYS = ("slope", "sigslope", "var_poisson", "var_rnoise", "yint", "sigyint",
                  "weights")

__all__ = ["SEGMENT_ARRAYS", "empty_results", "integration_results", "jump_bound",
           "segment_bound"]


def jump_bound(ngroups: int) -> int:
    """Most JUMP_DET groups after the first a ramp of ``ngroups`` groups can have."""
    return max(0, ngroups - 1)

#: stcal's constant for the two-group uncertainties
_SQRT2 = 1.41421356


def _slots(pixel: np.ndarray) -> np.ndarray:
    """Rank of each segment among its pixel's (segments ordered by pixel then time)."""
    index = np.arange(pixel.size)
    if pixel.size == 0:
        return index
    first = np.r_[True, pixel[1:] != pixel[:-1]]
    starts = np.maximum.accumulate(np.where(first, index, 0))
    return index - starts


def empty_results(seg_bound: int, cr_bound: int, npix: int) -> dict[str, np.ndarray]:
    """Zeroed arrays for one integration of ``npix`` pixels."""
    out = {name: np.zeros((seg_bound, npix), np.float32) for name in SEGMENT_ARRAYS}
    out["crmag"] = np.zeros((cr_bound, npix), np.float32)
    out["pedestal"] = np.zeros(npix, np.float32)
    return out


def integration_results(setup, ramp, gdq, only_first, rnoise, gain, dark, median_rate,
                        dq, slope_int, ped_factor, out):
    """Fill ``out`` (:func:`empty_results`) for one integration of a chunk of pixels;
    returns the most segments and the most jumps of a ramp."""
    ngroups, npix = ramp.shape
    gtime, first_time = setup.group_time, setup.first_read_time
    segs = rf._find_segments(gdq, np.arange(npix), fittable_only=True)
    pix, start, n = segs.pixel, segs.start, segs.length
    slot = _slots(pix)
    g, rn = gain[pix], rnoise[pix]
    y0 = ramp[start, pix].astype(np.float64)
    slope = np.zeros(pix.size)
    sigslope = np.zeros(pix.size)
    yint = np.zeros(pix.size)
    sigyint = np.zeros(pix.size)
    pden = np.zeros(pix.size)
    var_r = np.zeros(pix.size)
    with np.errstate(all="ignore"):
        one = n == 1
        if one.any():
            timing = np.full(pix.size, gtime)
            if only_first is not None:
                timing = np.where(only_first[pix], first_time, gtime)
            slope[one] = y0[one] / timing[one]
            pden[one] = timing[one] * g[one]
            var_r[one] = 12.0 * (rn[one] / timing[one]) ** 2 / (6.0 * g[one] ** 2)
        two = n == 2
        if two.any():
            y1 = ramp[start[two] + 1, pix[two]].astype(np.float64)
            slope[two] = (y1 - y0[two]) / gtime
            pden[two] = gtime * g[two]
            var_r[two] = 12.0 * (rn[two] / gtime) ** 2 / (6.0 * g[two] ** 2)
            sigslope[two] = _SQRT2 * rn[two]
            second = start[two] + 1.0
            yint[two] = y1 * (1.0 - second) + y0[two] * second
            sigyint[two] = sigslope[two]
        long_ = np.flatnonzero(n >= 3)
        if long_.size:
            last = ramp[start[long_] + n[long_] - 1, pix[long_]].astype(np.float64)
            rise = last - y0[long_]
            gl, rl = g[long_], rn[long_]
            noise2 = rl * rl + rise * gl
            snr = (rise * gl) / np.sqrt(noise2)
            snr = np.where((noise2 <= 0.0) | (gl == 0.0), 0.0, np.where(snr < 0.0, 0.0, snr))
            code = np.where(np.isnan(snr), len(rf._SNR_EDGES),
                            (snr[:, None] >= rf._EDGES[None, :]).sum(axis=1))
            m = n[long_].astype(np.float64)
            pden[long_] = gtime * gl * (m - 1.0)
            var_r[long_] = np.where(
                gl > 0.0, 12.0 * (rl / gtime) ** 2 / ((m ** 3 - m) * gl * gl), 0.0)
            for length in np.unique(n[long_]):
                for c in np.unique(code[n[long_] == length]):
                    pick = long_[(n[long_] == length) & (code == c)]
                    weight = _weights(int(length), int(c))
                    inv_rn2 = 1.0 / (rn[pick] * rn[pick])
                    sw = sx = sxx = sy = sxy = 0.0
                    for k in range(int(length)):
                        w = weight[k] * inv_rn2
                        x = start[pick] + float(k)
                        v = ramp[start[pick] + k, pix[pick]].astype(np.float64)
                        v = np.where(np.isnan(v), 0.0, v)
                        xw = x * w
                        sw = sw + w
                        sx = sx + xw
                        sxx = sxx + x * xw
                        sy = sy + v * w
                        sxy = sxy + v * xw
                    den = sw * sxx - sx * sx
                    inv = 1.0 / den
                    slope[pick] = (sw * sxy - sx * sy) * inv / gtime
                    sigslope[pick] = np.sqrt(sw * inv)
                    yint[pick] = (sxx * sy - sx * sxy) * inv
                    sigyint[pick] = np.sqrt(sxx * inv)
        rate = median_rate[pix]
        var_p = np.where(rate > 0.0, rate + dark[pix], dark[pix]) / pden
        weights = 1.0 / var_r
        for name, values in (("slope", slope), ("sigslope", sigslope), ("var_poisson", var_p),
                             ("var_rnoise", var_r), ("yint", yint), ("sigyint", sigyint),
                             ("weights", weights)):
            out[name][slot, pix] = values
        # jump magnitudes: every group after the first flagged JUMP_DET, in order
        jumped = (gdq[1:] & np.uint8(JUMP_DET)) != 0
        ncrs = 0
        if jumped.any():
            rank = np.cumsum(jumped, axis=0) - 1
            gg, pp = np.nonzero(jumped)
            mags = ramp[gg + 1, pp].astype(np.float64) - ramp[gg, pp].astype(np.float64)
            out["crmag"][rank[gg, pp], pp] = mags
            ncrs = int(rank[gg, pp].max()) + 1
        pedestal = ramp[0].astype(np.float64) - slope_int.astype(np.float64) * ped_factor
        pedestal[(dq & np.uint32(SATURATED)) != 0] = 0.0
        pedestal[np.isnan(pedestal)] = 0.0
        out["pedestal"][:] = pedestal
    nsegs = int(slot.max()) + 1 if slot.size else 0
    return nsegs, ncrs


def _weights(length: int, code: int) -> np.ndarray:
    """The fit's optimal weights of a segment shape (without the 1/rn**2 factor)."""
    return rf._ols_weights(length, code)
