"""ramp_fit's compiled chunk drivers (rf_chunk_median_rate, rf_chunk_fit) against a
plain per-pixel Python reference written from the algorithm's description (the module
docstring of streamdet/algorithms/ramp_fit.py), bit for bit, on awkward inputs: jumps,
saturation, NaN and infinite samples, zero/NaN gain and read noise, one-group ramps and
segments, flags that differ from pixel to pixel, suppression on and off, every kind of
group discard, CHARGELOSS.

The reference evaluates each formula in double precision in the order the description
gives (the order the kernels keep), one pixel and one segment at a time; it shares
nothing with the module but the optimal-weighting coefficients (a table of numbers).
It is slow: the inputs are small."""

from __future__ import annotations

import numpy as np
import pytest

from streamdet.algorithms import ramp_fit as module
from streamdet.algorithms.ramp_fit import (
    GroupDiscard,
    fit_ramps,
    plan_group_discard,
    survey_dnu_groups,
)
from streamdet.core.dqflags import DO_NOT_USE, JUMP_DET, NO_GAIN_VALUE, PIXEL, SATURATED

from .test_kernel_ramp_fit import PRODUCTS, miri_exposure

PERSISTENCE = PIXEL["PERSISTENCE"]
CHARGELOSS = PIXEL["CHARGELOSS"]
UNUSABLE = DO_NOT_USE | SATURATED
#: a segment is made of groups with no flag but (possibly) PERSISTENCE
NOT_IGNORED = 0xFF & ~PERSISTENCE
HUGE = 1.0e6
EDGES = (5.0, 10.0, 20.0, 50.0, 100.0)
f64 = np.float64


def _rnoise_variance(rn, gain, n, timing):
    per_time = rn / timing
    if n <= 2:
        return f64(12.0) * per_time * per_time / (f64(6.0) * gain * gain)
    m = f64(n)
    var = f64(12.0) * per_time * per_time / ((m * m * m - m) * gain * gain)
    return var if gain > 0 else f64(0.0)


def _segments(flags, fittable_only=True):
    """(start, length) of the segments kept for fitting, the DQ the flags give and the
    OR of the flags."""
    flags = [int(v) for v in flags]
    ngroups = len(flags)
    any_flags = 0
    for v in flags:
        any_flags |= v
    n_unusable = sum(1 for v in flags if v & UNUSABLE)
    n_saturated = sum(1 for v in flags if v & SATURATED)
    dq = any_flags & (JUMP_DET | PERSISTENCE)
    saturated_first = bool(flags[0] & SATURATED)
    all_bad = n_unusable == ngroups
    if saturated_first:
        dq |= UNUSABLE
    if all_bad:
        dq |= DO_NOT_USE
        if n_saturated == ngroups:
            dq |= SATURATED
    if fittable_only and (saturated_first or all_bad):
        return [], dq, any_flags
    clean = [(v & NOT_IGNORED) == 0 for v in flags]
    found = []
    g = 0
    while g < ngroups:
        if not clean[g]:
            g += 1
            continue
        start = g - 1 if g > 0 and (flags[g - 1] & NOT_IGNORED) == JUMP_DET else g
        while g < ngroups and clean[g]:
            g += 1
        found.append((start, g - start))
    if any(n >= 2 for _, n in found):
        found = [s for s in found if s[1] >= 2]
    else:
        found = found[:1]
    return found, dq, any_flags


def reference_fit(data, groupdq, pixeldq, **kwargs):
    """(rate, rateints) as dicts of arrays by product name, and the median rates
    (float64, per pixel: they only reach the products rounded to float32)."""
    with np.errstate(all="ignore"):
        return _reference_fit(data, groupdq, pixeldq, **kwargs)


def _reference_fit(data, groupdq, pixeldq, *, readnoise, gain, frame_time, group_time,
                   nframes=1, average_dark_current=None, suppress_one_group=True,
                   discard=GroupDiscard(), **_):
    nints, ngroups_in, nrows, ncols = data.shape
    npix = nrows * ncols
    first, stop = discard[0], ngroups_in - int(discard[1])
    ngroups = stop - first
    suppress = suppress_one_group and ngroups_in > 1
    gtime = f64(np.float32(group_time))
    first_time = (f64(np.float32(nframes)) + 1.0) * f64(np.float32(frame_time)) / 2.0
    values = data.reshape(nints, ngroups_in, npix)
    raw_flags = groupdq.reshape(nints, ngroups_in, npix)
    g_all = np.asarray(gain, np.float32).reshape(npix).astype(f64)
    rn_cds = np.asarray(readnoise, np.float32).reshape(npix).astype(f64)
    rn_all = (rn_cds * (g_all / np.sqrt(2.0 * nframes))).astype(np.float32).astype(f64)
    dark_all = (np.zeros(npix) if average_dark_current is None else
                np.asarray(average_dark_current, np.float32).reshape(npix).astype(f64))
    table = module._coefficient_table(ngroups)

    def fitted_flags(i, p):
        flags = [int(v) for v in raw_flags[i, :, p]]
        extra = 0
        if suppress and sum(1 for v in flags if (v & NOT_IGNORED) == 0) == 1:
            extra = DO_NOT_USE
        out = [v | extra for v in flags[first:stop]]
        if first > 0:
            out[0] &= 0xFF & ~JUMP_DET
        return out

    def is_only_first(flags):
        return not suppress and sum(1 for v in flags if v == 0) == 1 and flags[0] == 0

    median_rates = np.empty(npix)
    rate = {name: np.empty(npix, np.uint32 if name == "dq" else np.float32)
            for name in PRODUCTS}
    ints = {name: np.empty((nints, npix), np.uint32 if name == "dq" else np.float32)
            for name in PRODUCTS}
    for p in range(npix):
        g, rn, dark = g_all[p], rn_all[p], dark_all[p]
        pdq = int(pixeldq.reshape(npix)[p]) | (0 if g > 0 else DO_NOT_USE | NO_GAIN_VALUE)
        flags = [fitted_flags(i, p) for i in range(nints)]
        ramps = [values[i, first:stop, p] for i in range(nints)]

        # median rate
        total = f64(0.0)
        for f, y in zip(flags, ramps):
            if ngroups == 1:
                total += (f64(np.nan) if f[0] & SATURATED else f64(y[0])) / first_time
                continue
            diffs = [f64(y[k + 1]) - f64(y[k]) for k in range(ngroups - 1)
                     if not ((f[k] | f[k + 1]) & UNUSABLE or f[k + 1] & JUMP_DET)]
            diffs = [d for d in diffs if not np.isnan(d)]
            if diffs:
                median = np.median(diffs) / gtime
            else:
                median = f64(np.nan) if f[0] & UNUSABLE else f64(y[0]) / gtime
            if is_only_first(f):
                median = f64(y[0]) / first_time
            total += f64(0.0) if np.isnan(median) else median
        median_rate = median_rates[p] = total / nints

        # integrations
        sum_inv_p = sum_inv_r = sum_num = f64(0.0)
        rate_dq = pdq
        unusable_everywhere = saturated_everywhere = True
        saturated_somewhere = False
        ints_vr = np.zeros(nints)
        lossy = np.zeros(nints, bool)
        for i, (f, y) in enumerate(zip(flags, ramps)):
            segments, add_dq, seen = _segments(f)
            dq = pdq | add_dq
            lossy[i] = bool(seen & CHARGELOSS)
            inv_r = inv_p = inv_e = num = f64(0.0)
            for start, n in segments:
                ys = y[start:start + n]
                if n == 1:
                    timing = first_time if is_only_first(f) else gtime
                    slope = f64(ys[0]) / timing
                    pden = timing * g
                    var_r = _rnoise_variance(rn, g, 1, timing)
                elif n == 2:
                    slope = (f64(ys[1]) - f64(ys[0])) / gtime
                    pden = gtime * g
                    var_r = _rnoise_variance(rn, g, 2, gtime)
                else:
                    rise = f64(ys[-1]) - f64(ys[0])
                    noise2 = rn * rn + rise * g
                    snr = (rise * g) / np.sqrt(noise2)
                    snr = f64(0.0) if (noise2 <= 0 or g == 0) else max(snr, f64(0.0)) \
                        if not np.isnan(snr) else snr
                    code = len(EDGES) if np.isnan(snr) else sum(snr >= e for e in EDGES)
                    coefficients = table.values[table.offset[n] + code * n:][:n]
                    total_cy = f64(0.0)
                    for c, v in zip(coefficients, ys):
                        total_cy += c * f64(v)
                    if np.isnan(total_cy):  # NaN samples count as zeros
                        total_cy = f64(0.0)
                        for c, v in zip(coefficients, ys):
                            total_cy += c * (f64(0.0) if np.isnan(v) else f64(v))
                    slope = total_cy / gtime
                    inv_rn2 = f64(1.0) / (rn * rn)
                    if not (np.isfinite(inv_rn2) and inv_rn2 != 0):
                        slope = f64(np.nan)
                    pden = gtime * g * (f64(n) - 1.0)
                    var_r = _rnoise_variance(rn, g, n, gtime)
                var_p = (median_rate + dark if median_rate > 0 else dark) / pden
                inv_r += 1.0 / var_r
                if var_p > 0:
                    inv_p += 1.0 / var_p
                inv_e += 1.0 / (var_p + var_r)
                num += slope / var_r
            fitted = bool(segments)
            vp = 1.0 / inv_p if inv_p > 0 else f64(0.0)
            vp = f64(0.0) if vp >= HUGE else vp
            vr = 1.0 / inv_r if fitted else f64(0.0)
            vr = f64(0.0) if vr >= HUGE else vr
            var_err = 1.0 / inv_e
            e = np.sqrt(var_err) if fitted and not var_err > HUGE else f64(0.0)
            s = num * vr if fitted else f64(0.0)
            if dq & UNUSABLE:
                s, vp, vr, e = f64(np.nan), f64(0.0), f64(0.0), f64(0.0)
            ints["sci"][i, p], ints["err"][i, p], ints["var_poisson"][i, p] = s, e, vp
            ints_vr[i] = vr
            ints["dq"][i, p] = dq | (SATURATED if seen & SATURATED else 0)
            rate_dq |= dq & (JUMP_DET | PERSISTENCE)
            unusable_everywhere &= bool(dq & DO_NOT_USE)
            saturated_everywhere &= bool(dq & SATURATED)
            saturated_somewhere |= bool(seen & SATURATED)
            sum_inv_p += inv_p if inv_p > 0 else f64(0.0)
            sum_inv_r += inv_r
            sum_num += num

        # exposure
        dq = rate_dq | (DO_NOT_USE if unusable_everywhere else 0) \
            | (SATURATED if saturated_everywhere else 0)
        vp = 1.0 / sum_inv_p if sum_inv_p > 0 else f64(0.0)
        vp = f64(0.0) if (vp >= HUGE or vp < 0) else vp
        vr = 1.0 / sum_inv_r if sum_inv_r > 0 else sum_inv_r
        vr = f64(0.0) if vr >= HUGE else vr
        e = np.sqrt(vp + vr)
        s = sum_num * vr
        if dq & UNUSABLE:
            s, vp, vr, e = f64(np.nan), f64(0.0), f64(0.0), f64(0.0)
        if saturated_somewhere:
            dq |= SATURATED
        rate["sci"][p], rate["err"][p], rate["var_poisson"][p], rate["dq"][p] = s, e, vp, dq

        # CHARGELOSS: read-noise variances as if those groups were usable
        if lossy.any():
            inv_total = f64(0.0)
            for i in range(nints):
                if not lossy[i]:
                    inv_total += 1.0 / ints_vr[i] if ints_vr[i] > 0 else f64(0.0)
                    continue
                raw = raw_flags[i, first:stop, p].copy()
                hit = (raw & CHARGELOSS) != 0
                raw[hit] ^= np.uint8(DO_NOT_USE | CHARGELOSS)
                inv = f64(0.0)
                for start, n in _segments(raw, fittable_only=False)[0]:
                    timing = first_time if n == 1 and is_only_first(flags[i]) else gtime
                    var = _rnoise_variance(rn, g, n, timing)
                    if var > 0:
                        inv += 1.0 / var
                ints_vr[i] = 1.0 / inv
                ints_vr[i] = 0.0 if ints_vr[i] >= HUGE else ints_vr[i]
                inv_total += inv
            vr = 1.0 / inv_total if inv_total > 0 else vr
            vr = f64(0.0) if vr >= HUGE else vr
        ints["var_rnoise"][:, p] = ints_vr
        rate["var_rnoise"][p] = vr
    return ({name: a.reshape(nrows, ncols) for name, a in rate.items()},
            {name: a.reshape(nints, nrows, ncols) for name, a in ints.items()}, median_rates)


def _awkward(seed, nints, ngroups, nrows, ncols, **options):
    """miri_exposure's ramps with scattered NaN/inf samples and flags that differ from
    pixel to pixel (so that both the template and the per-pixel paths are taken)."""
    data, gdq, pdq, kw = miri_exposure(seed, nints, ngroups, nrows, ncols, **options)
    rng = np.random.default_rng(seed + 100)
    data[rng.random(data.shape) < 0.01] = np.nan
    data[rng.random(data.shape) < 0.002] = np.inf
    gdq[rng.random(gdq.shape) < 0.01] |= JUMP_DET
    gdq[rng.random(gdq.shape) < 0.005] |= PERSISTENCE
    kw["readnoise"][rng.random(kw["readnoise"].shape) < 0.02] = 0.0
    kw["gain"][rng.random(kw["gain"].shape) < 0.02] = 0.0
    return data, gdq, pdq, kw


def _cancelling_segments(data, gdq, kw):
    """Ramps of three segments (two whole-group jumps: the template path) whose slopes
    (+S, -S, small) nearly cancel: the integration's sums over segments come out
    differently, down to float32, in any other order."""
    ngroups = data.shape[1]
    assert ngroups == 14
    gdq[...] = 0
    gdq[:, [0, -1]] = DO_NOT_USE
    gdq[:, [5, 9]] = JUMP_DET
    big = np.float32(1.0e10)
    delta = np.random.default_rng(1).uniform(1e-4, 1e-2, data.shape[2:]).astype(np.float32)
    for k in range(4):
        data[:, 1 + k] = k * big
        data[:, 5 + k] = (3 - k) * big
        data[:, 9 + k] = 1.0 + k * delta
    kw["readnoise"][...] = 12.0
    kw["gain"][...] = 4.0


SLOW_READS = dict(nframes=4, frame_time=0.5, group_time=3.0)
CASES = {
    # name: (seed, nints, ngroups, nrows, ncols, miri_exposure options, extra)
    "lead_and_last_discarded": (1, 3, 12, 8, 10, dict(lead_dnu=1, rscd_groups=2), {}),
    "no_discard": (2, 5, 9, 8, 8, dict(lead_dnu=0, rscd_groups=0, last_dnu=False),
                   {"timing": SLOW_READS}),
    "two_leading_discarded": (3, 3, 10, 8, 8, dict(lead_dnu=2, rscd_groups=0),
                              {"timing": SLOW_READS}),
    "five_groups": (4, 7, 5, 8, 8, dict(lead_dnu=1, rscd_groups=0), {}),
    "two_groups_left": (5, 3, 4, 6, 8, dict(lead_dnu=1, rscd_groups=0),
                        {"timing": SLOW_READS}),
    "one_group": (6, 3, 1, 6, 8, dict(lead_dnu=0, rscd_groups=0, last_dnu=False),
                  {"timing": SLOW_READS}),
    "no_dark": (7, 3, 8, 6, 8, dict(lead_dnu=1, rscd_groups=0, dark=False), {}),
    "chargeloss": (8, 3, 10, 8, 8, dict(lead_dnu=1, rscd_groups=0),
                   {"chargeloss": True, "timing": SLOW_READS}),
    "cancelling_segments": (9, 3, 14, 6, 8, dict(lead_dnu=1, rscd_groups=0),
                            {"change": _cancelling_segments}),
}


def _case(case):
    seed, nints, ngroups, nrows, ncols, options, extra = CASES[case]
    data, gdq, pdq, kw = _awkward(seed, nints, ngroups, nrows, ncols, **options)
    kw.update(extra.get("timing", {}))
    if extra.get("chargeloss"):
        lossy = np.random.default_rng(seed).random(gdq.shape) < 0.05
        gdq[lossy] |= CHARGELOSS | DO_NOT_USE
    if "change" in extra:
        extra["change"](data, gdq, kw)
    discard = plan_group_discard(np.logical_and.reduce(
        [survey_dnu_groups(gdq[i]) for i in range(nints)]))
    return data, gdq, pdq, dict(kw, discard=discard)


@pytest.mark.parametrize("suppress", [True, False], ids=["suppress", "no_suppress"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_drivers_match_the_reference_bit_for_bit(monkeypatch, case, suppress):
    data, gdq, pdq, kw = _case(case)
    expect_rate, expect_ints, expect_median = reference_fit(
        data, gdq, pdq, suppress_one_group=suppress, **kw)
    medians = []
    real_median = module._median_rate

    def recording(*args):
        medians.append(real_median(*args))
        return medians[-1]

    monkeypatch.setattr(module, "_median_rate", recording)
    # whole chunks, odd-sized chunks, and every ramp on the per-pixel path
    for chunk, template in ((65536, True), (29, True), (65536, False)):
        monkeypatch.setattr(module, "_CHUNK_PIXELS", chunk)
        monkeypatch.setattr(module, "_TEMPLATE_PATH", template)
        medians.clear()
        rate, ints = fit_ramps(data, gdq, pdq, suppress_one_group=suppress, **kw)
        where = f"(chunk {chunk}, template path {template})"
        np.testing.assert_array_equal(np.concatenate(medians), expect_median,
                                      err_msg=f"median rate {where}")
        for label, ours, theirs in (("rate", rate, expect_rate),
                                    ("rateints", ints, expect_ints)):
            for name in PRODUCTS:
                np.testing.assert_array_equal(getattr(ours, name), theirs[name],
                                              err_msg=f"{label}.{name} {where}")


def test_the_cases_reach_what_they_are_meant_to():
    """The inputs above do hold what the reference comparison is about."""
    data, gdq, pdq, kw = _case("lead_and_last_discarded")
    nrows, ncols = pdq.shape
    assert kw["discard"] == (1, True)
    assert np.isnan(data).any() and np.isinf(data).any()
    assert (kw["gain"] == 0).any() and (kw["readnoise"] == 0).any()
    rate, ints, _ = reference_fit(data, gdq, pdq, **kw)
    assert np.isnan(rate["sci"]).any() and np.isfinite(rate["sci"]).sum() > 40
    assert (rate["dq"] & JUMP_DET).any() and (rate["dq"] & SATURATED).any()
    # some pixels have segments of one group only, some several segments
    lengths = [[n for _, n in _segments(gdq[0, 1:-1, r, c])[0]]
               for r in range(nrows) for c in range(ncols)]
    assert any(ls == [1] for ls in lengths) and any(len(ls) > 1 for ls in lengths)
