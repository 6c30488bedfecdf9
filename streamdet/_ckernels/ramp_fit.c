/* Per-pixel loops of ramp fitting; the declarations, the layout and what each function
 * does: ramp_fit.h.
 *
 * Every expression below is evaluated in the dtype and order numpy used for the same
 * formula before it moved here, so results are bit-identical to it (and the build's
 * -ffp-contract=off keeps a*b+c from becoming one fused rounding). */

#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "ramp_fit.h"
#include "row_medians.h"

/* a segment is made of groups clean of everything but PERSISTENCE */
#define IGNORED ((uint8_t)DQ_PERSISTENCE)
/* a group the median rate and the segments leave out */
#define UNUSABLE ((uint8_t)(DQ_DO_NOT_USE | DQ_SATURATED))

/* pixels worked on together, so that the group rows they read (and the pixel-major
 * rows they write) stay in L1 */
#define BLOCK 64

/* A ramp's groups are a whole band apart in memory: too many streams for the hardware
 * prefetcher (measured: the loops waited on these loads), so the loops over a block's
 * groups ask for the samples PREFETCH pixels ahead, and the loops over scattered ramps
 * for the ramp AHEAD places on in their list.  Tuned on the full-frame case. */
#define PREFETCH 128
#define AHEAD 4

/* the loops over many pixels, in wider vectors where the CPU has them */
#define HOT __attribute__((target_clones("avx2", "default")))

/* rf_usable_flags; always inlined so that a constant pixel stride vectorises */
static inline __attribute__((always_inline)) void
usable_flags(const uint8_t *flags, int64_t gs, int64_t ps, int64_t ngroups_in,
             int64_t npix, int64_t first, int64_t stop, int64_t suppress, uint8_t *out)
{
    const uint8_t not_ignored = (uint8_t)~IGNORED;
    /* the discard clears JUMP_DET on the group that becomes first */
    const uint8_t keep_first = first > 0 ? (uint8_t)~DQ_JUMP_DET : 0xFF;
    const int64_t nout = stop - first;
    for (int64_t p0 = 0; p0 < npix; p0 += BLOCK) {
        const int64_t nb = npix - p0 < BLOCK ? npix - p0 : BLOCK;
        uint8_t extra[BLOCK];
        for (int64_t b = 0; b < nb; b++)
            extra[b] = 0;
        if (suppress) {
            uint8_t clean[BLOCK];
            for (int64_t b = 0; b < nb; b++)
                clean[b] = 0;
            /* counts stop at 2 (only "exactly one" matters): bytes keep the loop
             * narrow and cannot wrap */
            for (int64_t g = 0; g < ngroups_in; g++) {
                const uint8_t *row = flags + g * gs + p0 * ps;
                __builtin_prefetch(row + 4 * BLOCK * ps);
                for (int64_t b = 0; b < nb; b++) {
                    const uint8_t c = (row[b * ps] & not_ignored) == 0;
                    clean[b] = (uint8_t)(clean[b] + (c & (clean[b] < 2)));
                }
            }
            for (int64_t b = 0; b < nb; b++)
                extra[b] = clean[b] == 1 ? (uint8_t)DQ_DO_NOT_USE : 0;
        }
        for (int64_t g = 0; g < nout; g++) {
            const uint8_t *row = flags + (first + g) * gs + p0 * ps;
            uint8_t *dst = out + g * npix + p0;
            const uint8_t mask = g == 0 ? keep_first : 0xFF;
            for (int64_t b = 0; b < nb; b++)
                dst[b] = (uint8_t)((row[b * ps] | extra[b]) & mask);
        }
    }
}

HOT void rf_usable_flags(const uint8_t *flags, int64_t gs, int64_t ps, int64_t ngroups_in,
                     int64_t npix, int64_t first, int64_t stop, int64_t suppress,
                     uint8_t *out)
{
    if (ps == 1)
        usable_flags(flags, gs, 1, ngroups_in, npix, first, stop, suppress, out);
    else
        usable_flags(flags, gs, ps, ngroups_in, npix, first, stop, suppress, out);
}

HOT void rf_layout(const uint8_t *gdq, int64_t ngroups, int64_t npix, int64_t step,
               uint8_t *template_flags, uint8_t *regular)
{
    for (int64_t g = 0; g < ngroups; g++) {
        int64_t counts[256] = {0};
        const uint8_t *row = gdq + g * npix;
        /* counted in runs: nearly every sample has the same value, and incrementing
         * one counter in memory sample after sample waits on the previous store each
         * time (it was a sixth of the step with 50 groups) */
        uint8_t current = row[0];
        int64_t run = 0;
        for (int64_t p = 0; p < npix; p += step) {
            const uint8_t v = row[p];
            if (v == current) {
                run++;
            } else {
                counts[current] += run;
                current = v;
                run = 1;
            }
        }
        counts[current] += run;
        int best = 0;
        for (int v = 1; v < 256; v++)
            if (counts[v] > counts[best])
                best = v;
        template_flags[g] = (uint8_t)best;
    }
    for (int64_t p = 0; p < npix; p++)
        regular[p] = 1;
    for (int64_t g = 0; g < ngroups; g++) {
        const uint8_t *row = gdq + g * npix;
        const uint8_t t = template_flags[g];
        for (int64_t p = 0; p < npix; p++)
            regular[p] &= row[p] == t;
    }
}

int64_t rf_segments(const uint8_t *gdq, int64_t fgs, int64_t fps, const int64_t *pix,
                    int64_t m, int64_t ngroups, int64_t fittable_only, uint8_t *seen,
                    uint32_t *dq, int64_t *seg_pix, int64_t *seg_start, int64_t *seg_length)
{
    const uint8_t not_ignored = (uint8_t)~IGNORED;
    const uint8_t jump = (uint8_t)DQ_JUMP_DET;
    int64_t count = 0;
    for (int64_t i = 0; i < m; i++) {
        const int64_t p = pix[i];
        const uint8_t *f = gdq + p * fps;
        if (i + AHEAD < m) {
            const uint8_t *next = gdq + pix[i + AHEAD] * fps;
            for (int64_t g = 0; g < ngroups; g++)
                __builtin_prefetch(next + g * fgs);
        }
        uint8_t any = 0;
        int64_t n_unusable = 0, n_saturated = 0;
        for (int64_t g = 0; g < ngroups; g++) {
            const uint8_t v = f[g * fgs];
            any |= v;
            n_unusable += (v & UNUSABLE) != 0;
            n_saturated += (v & DQ_SATURATED) != 0;
        }
        const int sat_first = (f[0] & DQ_SATURATED) != 0;
        const int all_bad = n_unusable == ngroups;
        if (dq != NULL) {
            uint32_t add = any & (uint32_t)(DQ_JUMP_DET | DQ_PERSISTENCE);
            if (sat_first)
                add |= (uint32_t)UNUSABLE;
            if (all_bad)
                add |= (uint32_t)DQ_DO_NOT_USE;
            if (all_bad && n_saturated == ngroups)
                add |= (uint32_t)DQ_SATURATED;
            dq[p] |= add;
        }
        if (seen != NULL)
            seen[p] = any;
        if (fittable_only && (sat_first || all_bad))
            continue;
        const int64_t first_seg = count;
        int has_long = 0;
        for (int64_t g = 0; g < ngroups;) {
            if (f[g * fgs] & not_ignored) {
                g++;
                continue;
            }
            int64_t start = g;
            if (g > 0 && (f[(g - 1) * fgs] & not_ignored) == jump)
                start = g - 1;
            while (g < ngroups && !(f[g * fgs] & not_ignored))
                g++;
            seg_pix[count] = p;
            seg_start[count] = start;
            seg_length[count] = g - start;
            has_long |= g - start >= 2;
            count++;
        }
        if (has_long) {
            int64_t kept = first_seg;
            for (int64_t k = first_seg; k < count; k++)
                if (seg_length[k] >= 2) {
                    seg_start[kept] = seg_start[k];
                    seg_length[kept] = seg_length[k];
                    kept++;
                }
            count = kept;
        } else if (count > first_seg) {
            count = first_seg + 1;
        }
    }
    return count;
}

/* The comparators of Batcher's odd-even merge sort of n values (the form that works for
 * any n), pruned to those that the middle positions (n - 1) / 2 and n / 2 depend on, as
 * index pairs; returns their count.  pairs: room for n * (1 + L (L + 1) / 2) pairs,
 * L = ceil(log2 n). */
static int64_t median_network(int64_t n, int32_t *pairs, uint8_t *needed)
{
    int64_t count = 0;
    for (int64_t p = 1; p < n; p += p)
        for (int64_t k = p; k >= 1; k /= 2)
            for (int64_t j = k % p; j <= n - 1 - k; j += 2 * k)
                for (int64_t i = 0; i <= k - 1 && i <= n - j - k - 1; i++)
                    if ((i + j) / (p * 2) == (i + j + k) / (p * 2)) {
                        pairs[2 * count] = (int32_t)(i + j);
                        pairs[2 * count + 1] = (int32_t)(i + j + k);
                        count++;
                    }
    /* backwards: a comparator matters if it writes a position that matters */
    for (int64_t i = 0; i < n; i++)
        needed[i] = i == (n - 1) / 2 || i == n / 2;
    int64_t kept = count;
    for (int64_t c = count - 1; c >= 0; c--) {
        const int32_t u = pairs[2 * c], v = pairs[2 * c + 1];
        if (needed[u] || needed[v]) {
            needed[u] = needed[v] = 1;
            kept--;
            pairs[2 * kept] = u;
            pairs[2 * kept + 1] = v;
        }
    }
    for (int64_t c = 0; c < count - kept; c++) {
        pairs[2 * c] = pairs[2 * (kept + c)];
        pairs[2 * c + 1] = pairs[2 * (kept + c) + 1];
    }
    return count - kept;
}

static inline __attribute__((always_inline)) void
compare_exchange(float *restrict u, float *restrict v)
{
    for (int64_t b = 0; b < BLOCK; b++) {
        const float x = u[b], y = v[b];
        u[b] = y < x ? y : x;
        v[b] = y < x ? x : y;
    }
}

/* rf_regular_medians; always inlined so that a constant pixel stride vectorises.  The
 * differences of a block of pixels sit difference-major in x [nu, BLOCK], so each
 * comparator of the median network is one vector loop over the pixels. */
static inline __attribute__((always_inline)) void
regular_medians(const float *ramp, int64_t gs, int64_t ps, int64_t ngroups, int64_t npix,
                const int64_t *usable, int64_t nu, double group_time, const int32_t *pairs,
                int64_t npairs, float *x, double *median, uint8_t *general)
{
    const float *mid_low = x + ((nu - 1) / 2) * BLOCK, *mid_high = x + (nu / 2) * BLOCK;
    for (int64_t p0 = 0; p0 < npix; p0 += BLOCK) {
        const int64_t nb = npix - p0 < BLOCK ? npix - p0 : BLOCK;
        const float *base = ramp + p0 * ps;
        float low[BLOCK], high[BLOCK];
        uint8_t bad[BLOCK];
        for (int64_t b = 0; b < nb; b++) {
            const float v = base[b * ps];
            low[b] = high[b] = v;
            bad[b] = isnan(v) != 0;
        }
        for (int64_t g = 0; g < ngroups; g++)
            for (int64_t b = 0; b < BLOCK; b += 16)
                __builtin_prefetch(base + g * gs + (PREFETCH + b) * ps);
        for (int64_t g = 1; g < ngroups; g++) {
            const float *row = base + g * gs;
            for (int64_t b = 0; b < nb; b++) {
                const float v = row[b * ps];
                bad[b] |= isnan(v) != 0;
                low[b] = v < low[b] ? v : low[b];
                high[b] = v > high[b] ? v : high[b];
            }
        }
        for (int64_t k = 0; k < nu; k++) {
            const float *a = base + usable[k] * gs;
            float *dst = x + k * BLOCK;
            for (int64_t b = 0; b < nb; b++) {
                const float d = a[gs + b * ps] - a[b * ps];
                bad[b] |= isnan(d) != 0;
                dst[b] = d;
            }
            for (int64_t b = nb; b < BLOCK; b++)
                dst[b] = 0.0f;
        }
        for (int64_t c = 0; c < npairs; c++)
            compare_exchange(x + pairs[2 * c] * BLOCK, x + pairs[2 * c + 1] * BLOCK);
        for (int64_t b = 0; b < nb; b++) {
            double m = ((double)mid_low[b] + (double)mid_high[b]) * 0.5;
            median[p0 + b] = m / group_time;
            general[p0 + b] |= bad[b] || !(low[b] > 0.0f && high[b] <= 2.0f * low[b]);
        }
    }
}

HOT int64_t rf_regular_medians(const float *ramp, int64_t gs, int64_t ps, int64_t ngroups,
                           int64_t npix, const int64_t *usable, int64_t nu, double group_time,
                           double *median, uint8_t *general)
{
    int64_t levels = 0;
    while (((int64_t)1 << levels) < nu)
        levels++;
    int32_t *pairs = malloc(sizeof(int32_t) * 2 * (size_t)(nu * (1 + levels * (levels + 1) / 2)));
    uint8_t *needed = malloc((size_t)nu);
    float *x = malloc(sizeof(float) * (size_t)(nu * BLOCK));
    if (!pairs || !needed || !x) {
        free(pairs);
        free(needed);
        free(x);
        return -1;
    }
    const int64_t npairs = median_network(nu, pairs, needed);
    if (ps == 1)
        regular_medians(ramp, gs, 1, ngroups, npix, usable, nu, group_time, pairs, npairs, x,
                        median, general);
    else
        regular_medians(ramp, gs, ps, ngroups, npix, usable, nu, group_time, pairs, npairs, x,
                        median, general);
    free(pairs);
    free(needed);
    free(x);
    return 0;
}

void rf_general_diffs(const float *ramp, int64_t gs, int64_t ps, const uint8_t *gdq,
                      int64_t fgs, int64_t fps, const int64_t *pix, int64_t m,
                      int64_t ngroups, double *diffs, int64_t *n_valid, double *first)
{
    const int64_t nd = ngroups - 1;
    for (int64_t i = 0; i < m; i++) {
        const float *y = ramp + pix[i] * ps;
        const uint8_t *f = gdq + pix[i] * fps;
        double *dst = diffs + i * nd;
        if (i + AHEAD < m) {
            const float *next = ramp + pix[i + AHEAD] * ps;
            const uint8_t *next_f = gdq + pix[i + AHEAD] * fps;
            for (int64_t g = 0; g < ngroups; g++) {
                __builtin_prefetch(next + g * gs);
                __builtin_prefetch(next_f + g * fgs);
            }
        }
        int64_t valid = 0;
        for (int64_t g = 0; g < nd; g++) {
            const uint8_t before = f[g * fgs], after = f[(g + 1) * fgs];
            double d = (double)y[(g + 1) * gs] - (double)y[g * gs];
            if (((before | after) & UNUSABLE) || (after & DQ_JUMP_DET))
                d = NAN;
            valid += !isnan(d);
            dst[g] = d;
        }
        n_valid[i] = valid;
        first[i] = f[0] & UNUSABLE ? NAN : (double)y[0];
    }
}

/* Read-noise variance of a segment of ``n`` groups (``timing``: its group time, the
 * first read's time for a lone first group). */
static inline double rnoise_variance(double rn, double gain, int64_t n, double timing)
{
    const double per_time = rn / timing;
    if (n <= 2)
        return 12.0 * per_time * per_time / (6.0 * gain * gain);
    const double m = (double)n;
    const double var = 12.0 * per_time * per_time / ((m * m * m - m) * gain * gain);
    return gain > 0.0 ? var : 0.0;
}

void rf_rnoise_variance(int64_t count, const double *rn, const double *gain,
                        const int64_t *length, const double *timing, double *out)
{
    for (int64_t i = 0; i < count; i++)
        out[i] = rnoise_variance(rn[i], gain[i], length[i], timing[i]);
}

HOT void rf_fit_segments(const rf_fit_setup *setup, const float *ramp, int64_t gs,
                     int64_t ps, const uint8_t *only_first,
                     const rf_segment_list *segments, const rf_segment_sums *sums)
{
    /* the structs' fields as locals: the sums written below are doubles, which the
     * compiler would otherwise have to assume may overwrite the setup's */
    const int64_t nseg = segments->count;
    const int64_t *pix = segments->pix;
    const int64_t *start = segments->start, ss = segments->start_stride;
    const int64_t *length = segments->length, ls = segments->length_stride;
    const double *rnoise = setup->rnoise, *gain = setup->gain, *dark = setup->dark;
    const double *median_rate = setup->median_rate;
    const double gtime = setup->group_time, first_time = setup->first_time;
    const double *table = setup->table, *edges = setup->edges;
    const int64_t *offset = setup->offset;
    const int64_t nedges = setup->nedges;
    uint8_t *fitted = sums->fitted;
    double *inv_r = sums->inv_r, *inv_p = sums->inv_p, *inv_e = sums->inv_e;
    double *num = sums->num;
    /* segments are taken SEGS at a time: when they share one length (the template's
     * segments of consecutive pixels) their weighted sums run side by side, one group
     * row at a time, with the samples further on prefetched */
    enum { SEGS = 16 };
    for (int64_t i0 = 0; i0 < nseg; i0 += SEGS) {
        const int64_t nb = nseg - i0 < SEGS ? nseg - i0 : SEGS;
        const float *y[SEGS];
        const double *c[SEGS];
        int64_t nsum[SEGS];
        double sum[SEGS], slope[SEGS], pden[SEGS], var_r[SEGS];
        int64_t most = 0;
        for (int64_t b = 0; b < nb; b++) {
            const int64_t i = i0 + b;
            const int64_t p = pix[i];
            const int64_t n = length[i * ls];
            const double g = gain[p];
            const double rn = rnoise[p];
            y[b] = ramp + start[i * ss] * gs + p * ps;
            const double first = (double)y[b][0];
            nsum[b] = 0;
            sum[b] = 0.0;
            if (n == 1) {
                const double timing =
                    only_first != NULL && only_first[p] ? first_time : gtime;
                slope[b] = first / timing;
                pden[b] = timing * g;
                var_r[b] = rnoise_variance(rn, g, 1, timing);
            } else if (n == 2) {
                slope[b] = ((double)y[b][gs] - first) / gtime;
                pden[b] = gtime * g;
                var_r[b] = rnoise_variance(rn, g, 2, gtime);
            } else {
                const double rise = (double)y[b][(n - 1) * gs] - first;
                const double noise2 = rn * rn + rise * g;
                double snr = (rise * g) / sqrt(noise2);
                /* NaN survives both tests and, as in stcal, picks the largest exponent */
                snr = (noise2 <= 0.0 || g == 0.0) ? 0.0 : (snr < 0.0 ? 0.0 : snr);
                int64_t code = 0;
                if (isnan(snr))
                    code = nedges;
                else
                    for (int64_t e = 0; e < nedges; e++)
                        code += snr >= edges[e];
                c[b] = table + offset[n] + code * n;
                nsum[b] = n;
                most = n > most ? n : most;
                pden[b] = gtime * g * ((double)n - 1.0);
                var_r[b] = rnoise_variance(rn, g, n, gtime);
            }
        }
        /* each sum runs over its groups in order from 0.0, in double */
        if (ls == 0 && nb == SEGS && most) {
            for (int64_t j = 0; j < most; j++) {
                __builtin_prefetch(y[0] + j * gs + PREFETCH * ps);
                for (int64_t b = 0; b < SEGS; b++)
                    sum[b] += c[b][j] * (double)y[b][j * gs];
            }
        } else {
            for (int64_t b = 0; b < nb; b++)
                for (int64_t j = 0; j < nsum[b]; j++)
                    sum[b] += c[b][j] * (double)y[b][j * gs];
        }
        for (int64_t b = 0; b < nb; b++) {
            const int64_t p = pix[i0 + b];
            if (nsum[b]) {
                if (isnan(sum[b])) {
                    /* stcal fits NaN samples as zeros */
                    sum[b] = 0.0;
                    for (int64_t j = 0; j < nsum[b]; j++) {
                        const float v = y[b][j * gs];
                        sum[b] += c[b][j] * (double)(isnan(v) ? 0.0f : v);
                    }
                }
                slope[b] = sum[b] / gtime;
                /* stcal's weights carry 1/rn^2: without a finite nonzero one, no slope */
                const double rn = rnoise[p];
                const double inv_rn2 = 1.0 / (rn * rn);
                if (!(isfinite(inv_rn2) && inv_rn2 != 0.0))
                    slope[b] = NAN;
            }
            const double rate = median_rate[p];
            const double var_p = (rate > 0.0 ? rate + dark[p] : dark[p]) / pden[b];
            fitted[p] = 1;
            inv_r[p] += 1.0 / var_r[b];
            if (var_p > 0.0)
                inv_p[p] += 1.0 / var_p;
            inv_e[p] += 1.0 / (var_p + var_r[b]);
            num[p] += slope[b] / var_r[b];
        }
    }
}

HOT void rf_finish_integration(int64_t npix, const uint32_t *dq, const uint8_t *seen,
                           const rf_segment_sums *sums, double huge, const rf_products *out,
                           const rf_exposure_sums *exposure)
{
    const uint32_t unusable = UNUSABLE, dnu = DQ_DO_NOT_USE, saturated = DQ_SATURATED;
    const uint32_t keep = DQ_JUMP_DET | DQ_PERSISTENCE;
    const uint8_t *fitted = sums->fitted;
    const double *inv_r = sums->inv_r, *inv_p = sums->inv_p, *inv_e = sums->inv_e;
    const double *num = sums->num;
    float *sci = out->sci, *err = out->err, *var_poisson = out->var_poisson;
    double *var_rnoise = out->var_rnoise;
    uint32_t *dq_out = out->dq;
    double *sum_inv_p = exposure->inv_p, *sum_inv_r = exposure->inv_r;
    double *sum_num = exposure->num;
    uint32_t *rate_dq = exposure->dq;
    uint8_t *unusable_everywhere = exposure->unusable_everywhere;
    uint8_t *saturated_everywhere = exposure->saturated_everywhere;
    uint8_t *saturated_somewhere = exposure->saturated_somewhere;
    for (int64_t p = 0; p < npix; p++) {
        double vp = inv_p[p] > 0.0 ? 1.0 / inv_p[p] : 0.0;
        if (vp >= huge)
            vp = 0.0;
        double vr = fitted[p] ? 1.0 / inv_r[p] : 0.0;
        if (vr >= huge)
            vr = 0.0;
        const double var_err = 1.0 / inv_e[p];
        double e = fitted[p] && !(var_err > huge) ? sqrt(var_err) : 0.0;
        double s = fitted[p] ? num[p] * vr : 0.0;
        if (dq[p] & unusable) {
            s = NAN;
            vp = vr = e = 0.0;
        }
        sci[p] = (float)s;
        err[p] = (float)e;
        var_poisson[p] = (float)vp;
        var_rnoise[p] = vr;
        const uint32_t any_saturated = seen[p] & saturated;
        dq_out[p] = dq[p] | (any_saturated ? saturated : 0u);
        rate_dq[p] |= dq[p] & keep;
        unusable_everywhere[p] &= (dq[p] & dnu) != 0;
        saturated_everywhere[p] &= (dq[p] & saturated) != 0;
        saturated_somewhere[p] |= any_saturated != 0;
        sum_inv_p[p] += inv_p[p] > 0.0 ? inv_p[p] : 0.0;
        sum_inv_r[p] += inv_r[p];
        sum_num[p] += num[p];
    }
}

void rf_finish_exposure(int64_t npix, const rf_exposure_sums *exposure, double huge,
                        const rf_products *out)
{
    const uint32_t unusable = UNUSABLE, dnu = DQ_DO_NOT_USE, saturated = DQ_SATURATED;
    const double *sum_inv_p = exposure->inv_p, *sum_inv_r = exposure->inv_r;
    const double *sum_num = exposure->num;
    const uint32_t *rate_dq = exposure->dq;
    const uint8_t *unusable_everywhere = exposure->unusable_everywhere;
    const uint8_t *saturated_everywhere = exposure->saturated_everywhere;
    const uint8_t *saturated_somewhere = exposure->saturated_somewhere;
    float *sci = out->sci, *err = out->err, *var_poisson = out->var_poisson;
    double *var_rnoise = out->var_rnoise;
    uint32_t *dq_out = out->dq;
    for (int64_t p = 0; p < npix; p++) {
        uint32_t dq = rate_dq[p];
        if (unusable_everywhere[p])
            dq |= dnu;
        if (saturated_everywhere[p])
            dq |= saturated;
        double vp = sum_inv_p[p] > 0.0 ? 1.0 / sum_inv_p[p] : 0.0;
        if (vp >= huge || vp < 0.0)
            vp = 0.0;
        /* a sum that is not positive (0 or NaN) is passed through as it is */
        double vr = sum_inv_r[p] > 0.0 ? 1.0 / sum_inv_r[p] : sum_inv_r[p];
        if (vr >= huge)
            vr = 0.0;
        double e = sqrt(vp + vr);
        double s = sum_num[p] * vr;
        if (dq & unusable) {
            s = NAN;
            vp = vr = e = 0.0;
        }
        /* partial saturation is flagged only after the NaN decision above */
        if (saturated_somewhere[p])
            dq |= saturated;
        dq_out[p] = dq;
        sci[p] = (float)s;
        err[p] = (float)e;
        var_poisson[p] = (float)vp;
        var_rnoise[p] = vr;
    }
}

void rf_only_first(const uint8_t *gdq, int64_t ngroups, int64_t npix, uint8_t *only_first)
{
    for (int64_t p = 0; p < npix; p++) {
        int64_t clean = 0;
        for (int64_t g = 0; g < ngroups; g++)
            clean += gdq[g * npix + p] == 0;
        only_first[p] = clean == 1 && gdq[p] == 0;
    }
}

/* ramps taken together on the per-pixel paths of the drivers: their scratch (differences,
 * segments) is sized by this, not by the chunk */
#define GENERAL_BLOCK 256

/* One integration's record in chunk->store: its group DQ as fitted [ngroups, npix]
 * (rf_usable_flags), which ramps follow the template (regular), which are only_first,
 * and the template itself. */
typedef struct {
    uint8_t *gdq, *regular, *only_first, *template_flags;
} layout_record;

static int64_t record_bytes(int64_t ngroups, int64_t npix)
{
    return (ngroups + 2) * npix + ngroups;
}

static layout_record record_of(const rf_chunk *c, int64_t i)
{
    const int64_t ngroups = c->stop - c->first, npix = c->npix;
    uint8_t *at = c->store + i * record_bytes(ngroups, npix);
    const layout_record r = {at, at + ngroups * npix, at + (ngroups + 1) * npix,
                             at + (ngroups + 2) * npix};
    return r;
}

int64_t rf_chunk_store_bytes(const rf_chunk *c)
{
    return c->nints * record_bytes(c->stop - c->first, c->npix);
}

/* Fills integration i's record (rf_chunk_median_rate does, rf_chunk_fit reads it). */
static layout_record integration_layout(const rf_chunk *c, int64_t i)
{
    const int64_t ngroups = c->stop - c->first, npix = c->npix;
    const layout_record r = record_of(c, i);
    rf_usable_flags(c->flags + i * c->fis, c->fgs, c->fps, c->ngroups_in, npix, c->first,
                    c->stop, c->suppress, r.gdq);
    /* the sample that picks the template: as rf_layout's Python callers chose it */
    rf_layout(r.gdq, ngroups, npix, npix / 4096 > 1 ? npix / 4096 : 1, r.template_flags,
              r.regular);
    if (!c->template_path)
        for (int64_t p = 0; p < npix; p++)
            r.regular[p] = 0;
    if (!c->suppress)
        rf_only_first(r.gdq, ngroups, npix, r.only_first);
    return r;
}

int64_t rf_chunk_median_rate(const rf_chunk *c, double group_time, double first_time,
                             double *median_rate)
{
    const int64_t ngroups = c->stop - c->first, npix = c->npix, nd = ngroups - 1;
    const int64_t wide = nd > 0 ? nd : 1;
    uint8_t *general = malloc((size_t)npix + 1);
    int64_t *usable = malloc(sizeof(int64_t) * (size_t)wide);
    int64_t *picked = malloc(sizeof(int64_t) * (size_t)(npix + 1));
    double *median = malloc(sizeof(double) * (size_t)(npix + 1));
    double *diffs = malloc(sizeof(double) * (size_t)(GENERAL_BLOCK * wide));
    int64_t *n_valid = malloc(sizeof(int64_t) * GENERAL_BLOCK);
    double *first = malloc(sizeof(double) * GENERAL_BLOCK);
    double *middle = malloc(sizeof(double) * GENERAL_BLOCK);
    int64_t status = 0;
    if (!general || !usable || !picked || !median || !diffs || !n_valid || !first || !middle) {
        status = -1;
        goto done;
    }
    double *total = median_rate;
    for (int64_t p = 0; p < npix; p++)
        total[p] = 0.0;
    for (int64_t i = 0; i < c->nints; i++) {
        const float *ramp = c->values + i * c->vis;
        const int64_t gs = c->vgs, ps = c->vps;
        const layout_record r = integration_layout(c, i);
        const uint8_t *gdq = r.gdq, *regular = r.regular, *only_first = r.only_first;
        if (ngroups == 1) {
            /* stcal's single-group branch: SATURATED read as NaN, nothing screened, NaN
             * kept */
            for (int64_t p = 0; p < npix; p++) {
                const double v = gdq[p] & DQ_SATURATED ? NAN : (double)ramp[p * ps];
                total[p] += v / first_time;
            }
            continue;
        }
        int64_t nregular = 0;
        for (int64_t p = 0; p < npix; p++) {
            general[p] = !regular[p];
            nregular += regular[p];
        }
        if (nregular) {
            const uint8_t *t = r.template_flags;
            int64_t nu = 0;
            for (int64_t k = 0; k < nd; k++)
                if (!(((t[k + 1] | t[k]) & UNUSABLE) | (t[k + 1] & DQ_JUMP_DET)))
                    usable[nu++] = k;
            if (nu) {
                /* the ramps whose float32 differences are not exact (see
                 * rf_regular_medians) join the general ones */
                if (rf_regular_medians(ramp, gs, ps, ngroups, npix, usable, nu, group_time,
                                       median, general)) {
                    status = -1;
                    goto done;
                }
            } else {
                const int unusable_first = (t[0] & UNUSABLE) != 0;
                for (int64_t p = 0; p < npix; p++)
                    median[p] = unusable_first ? NAN : (double)ramp[p * ps] / group_time;
            }
        }
        int64_t m = 0;
        for (int64_t p = 0; p < npix; p++)
            if (general[p])
                picked[m++] = p;
        for (int64_t j0 = 0; j0 < m; j0 += GENERAL_BLOCK) {
            const int64_t nb = m - j0 < GENERAL_BLOCK ? m - j0 : GENERAL_BLOCK;
            rf_general_diffs(ramp, gs, ps, gdq, npix, 1, picked + j0, nb, ngroups, diffs,
                             n_valid, first);
            if (streamdet_row_medians_f64(diffs, nd, nd, nb, middle)) {
                status = -1;
                goto done;
            }
            /* with no usable difference stcal falls back on the first sample */
            for (int64_t j = 0; j < nb; j++)
                median[picked[j0 + j]] =
                    n_valid[j] == 0 ? first[j] / group_time : middle[j] / group_time;
        }
        if (!c->suppress)
            for (int64_t p = 0; p < npix; p++)
                if (only_first[p])
                    median[p] = (double)ramp[p * ps] / first_time;
        for (int64_t p = 0; p < npix; p++)
            total[p] += isnan(median[p]) ? 0.0 : median[p];
    }
    for (int64_t p = 0; p < npix; p++)
        median_rate[p] = total[p] / (double)c->nints;
done:
    free(general);
    free(usable);
    free(picked);
    free(median);
    free(diffs);
    free(n_valid);
    free(first);
    free(middle);
    return status;
}

int64_t rf_chunk_fit(const rf_chunk *c, const rf_fit_setup *setup, const uint32_t *pdq,
                     double huge, int64_t int_lo, int64_t int_hi,
                     const rf_integration_products *out, const rf_exposure_sums *exposure,
                     uint8_t *lossy, const rf_inspect *inspect)
{
    const int64_t ngroups = c->stop - c->first, npix = c->npix;
    const int64_t bound = (ngroups + 1) / 2 > 1 ? (ngroups + 1) / 2 : 1;
    const uint8_t chargeloss = (uint8_t)DQ_CHARGELOSS;
    uint32_t *dq = malloc(sizeof(uint32_t) * (size_t)(npix + 1));
    uint8_t *seen = malloc((size_t)npix + 1);
    int64_t *regular_pix = malloc(sizeof(int64_t) * (size_t)(npix + 1));
    int64_t *irregular_pix = malloc(sizeof(int64_t) * (size_t)(npix + 1));
    uint8_t *fitted = malloc((size_t)npix + 1);
    double *sums_at = malloc(sizeof(double) * 4 * (size_t)(npix + 1));
    /* the template's segments, then a block of general ramps' */
    int64_t *shapes = malloc(sizeof(int64_t) * 3 * (size_t)bound);
    int64_t *segs = malloc(sizeof(int64_t) * 3 * (size_t)(GENERAL_BLOCK * bound));
    int64_t status = 0;
    if (!dq || !seen || !regular_pix ||
        !irregular_pix || !fitted || !sums_at || !shapes || !segs) {
        status = -1;
        goto done;
    }
    const rf_segment_sums sums = {fitted, sums_at, sums_at + npix, sums_at + 2 * npix,
                                  sums_at + 3 * npix};
    int64_t nlossy = 0;
    for (int64_t i = int_lo; i < int_hi; i++) {
        const float *ramp = c->values + i * c->vis;
        const int64_t gs = c->vgs, ps = c->vps;
        const layout_record r = record_of(c, i);
        const uint8_t *timed_first = c->suppress ? NULL : r.only_first;
        int64_t nregular = 0, nirregular = 0;
        for (int64_t p = 0; p < npix; p++) {
            dq[p] = pdq[p];
            seen[p] = 0;
            fitted[p] = 0;
            if (r.regular[p])
                regular_pix[nregular++] = p;
            else
                irregular_pix[nirregular++] = p;
        }
        for (int64_t k = 0; k < 4 * npix; k++)
            sums_at[k] = 0.0;
        /* per pixel the sums run over its segments in time order, as in stcal: the
         * template's segments come in time order, each for all the template ramps */
        if (nregular) {
            const int64_t zero = 0;
            uint8_t t_seen = 0;
            uint32_t t_dq = 0;
            const int64_t nshapes =
                rf_segments(r.template_flags, 1, 1, &zero, 1, ngroups, 1, &t_seen, &t_dq,
                            shapes, shapes + bound, shapes + 2 * bound);
            for (int64_t k = 0; k < nregular; k++) {
                seen[regular_pix[k]] = t_seen;
                dq[regular_pix[k]] |= t_dq;
            }
            for (int64_t s = 0; s < nshapes; s++) {
                /* one shape for all: start and length read with stride 0 */
                const rf_segment_list list = {nregular, regular_pix, shapes + bound + s, 0,
                                              shapes + 2 * bound + s, 0};
                rf_fit_segments(setup, ramp, gs, ps, timed_first, &list, &sums);
            }
        }
        for (int64_t j0 = 0; j0 < nirregular; j0 += GENERAL_BLOCK) {
            const int64_t nb = nirregular - j0 < GENERAL_BLOCK ? nirregular - j0 : GENERAL_BLOCK;
            int64_t *seg_pix = segs, *seg_start = segs + GENERAL_BLOCK * bound;
            int64_t *seg_length = segs + 2 * GENERAL_BLOCK * bound;
            const int64_t count = rf_segments(r.gdq, npix, 1, irregular_pix + j0, nb, ngroups, 1,
                                              seen, dq, seg_pix, seg_start, seg_length);
            const rf_segment_list list = {count, seg_pix, seg_start, 1, seg_length, 1};
            rf_fit_segments(setup, ramp, gs, ps, timed_first, &list, &sums);
        }
        const rf_products products = {out->sci + i * out->stride, out->err + i * out->stride,
                                      out->dq + i * out->stride,
                                      out->var_poisson + i * out->stride,
                                      out->var_rnoise + i * npix};
        rf_finish_integration(npix, dq, seen, &sums, huge, &products, exposure);
        uint8_t *lossy_row = lossy + i * npix;
        for (int64_t p = 0; p < npix; p++) {
            lossy_row[p] = (seen[p] & chargeloss) != 0;
            nlossy += lossy_row[p];
        }
    }
    if (inspect != NULL && int_hi > int_lo) {
        const layout_record r = record_of(c, int_hi - 1);
        for (int64_t k = 0; k < ngroups * npix; k++)
            inspect->gdq[k] = r.gdq[k];
        for (int64_t p = 0; p < npix; p++)
            inspect->dq[p] = dq[p];
        if (!c->suppress)
            for (int64_t p = 0; p < npix; p++)
                inspect->only_first[p] = r.only_first[p];
    }
    status = nlossy;
done:
    free(dq);
    free(seen);
    free(regular_pix);
    free(irregular_pix);
    free(fitted);
    free(sums_at);
    free(shapes);
    free(segs);
    return status;
}
