/* Per-pixel loops of the ramp_fit step (streamdet/plugins/ramp_fit.py holds the
 * algorithm's description and prepares the buffers).
 *
 * Every expression below is evaluated in the dtype and order numpy used for the same
 * formula before it moved here, so results are bit-identical to it (and the build's
 * -ffp-contract=off keeps a*b+c from becoming one fused rounding).  Samples are float32,
 * everything derived from them is double.  Flag values come from the caller.
 *
 * Layout: a ramp is addressed as base[g * gs + p * ps] (group g, pixel p; strides in
 * elements), per-pixel arrays of the chunk are contiguous.
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* pixels worked on together, so that the group rows they read (and the pixel-major
 * rows they write) stay in L1 */
#define BLOCK 64

/* A ramp's groups are a whole band apart in memory: too many streams for the hardware
 * prefetcher (measured: the loops waited on these loads), so the loops over a block's
 * groups ask for the samples PREFETCH pixels ahead, and the loops over scattered ramps
 * for the ramp AHEAD places on in their list.  Tuned on the full-frame case. */
#define PREFETCH 128
#define AHEAD 4

/* rf_usable_flags; always inlined so that a constant pixel stride vectorises */
static inline __attribute__((always_inline)) void
usable_flags(const uint8_t *flags, int64_t gs, int64_t ps, int64_t ngroups_in,
             int64_t npix, int64_t first, int64_t stop, int64_t suppress, int64_t ignore,
             int64_t dnu, int64_t keep_first, uint8_t *out)
{
    const uint8_t not_ignored = (uint8_t)~ignore;
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
                extra[b] = clean[b] == 1 ? (uint8_t)dnu : 0;
        }
        for (int64_t g = 0; g < nout; g++) {
            const uint8_t *row = flags + (first + g) * gs + p0 * ps;
            uint8_t *dst = out + g * npix + p0;
            const uint8_t mask = g == 0 ? (uint8_t)keep_first : 0xFF;
            for (int64_t b = 0; b < nb; b++)
                dst[b] = (uint8_t)((row[b * ps] | extra[b]) & mask);
        }
    }
}

/* Group DQ of one integration as fitted: groups [first, stop) of ``flags`` into the
 * contiguous ``out`` [stop - first, npix].  With ``suppress``, a ramp with exactly one
 * group clean of everything but ``ignore`` (counted over all ``ngroups_in`` groups)
 * gains ``dnu`` everywhere; ``keep_first`` then masks the first output group. */
void rf_usable_flags(const uint8_t *flags, int64_t gs, int64_t ps, int64_t ngroups_in,
                     int64_t npix, int64_t first, int64_t stop, int64_t suppress,
                     int64_t ignore, int64_t dnu, int64_t keep_first, uint8_t *out)
{
    if (ps == 1)
        usable_flags(flags, gs, 1, ngroups_in, npix, first, stop, suppress, ignore, dnu,
                     keep_first, out);
    else
        usable_flags(flags, gs, ps, ngroups_in, npix, first, stop, suppress, ignore, dnu,
                     keep_first, out);
}

/* The flag template of an integration's ramps (contiguous gdq [ngroups, npix]): per
 * group the commonest value among pixels 0, step, 2 step, ... (the smallest on a tie),
 * and regular[p] = 1 where pixel p's flags equal it in every group. */
void rf_layout(const uint8_t *gdq, int64_t ngroups, int64_t npix, int64_t step,
               uint8_t *template, uint8_t *regular)
{
    for (int64_t g = 0; g < ngroups; g++) {
        int64_t counts[256] = {0};
        const uint8_t *row = gdq + g * npix;
        for (int64_t p = 0; p < npix; p += step)
            counts[row[p]]++;
        int best = 0;
        for (int v = 1; v < 256; v++)
            if (counts[v] > counts[best])
                best = v;
        template[g] = (uint8_t)best;
    }
    for (int64_t p = 0; p < npix; p++)
        regular[p] = 1;
    for (int64_t g = 0; g < ngroups; g++) {
        const uint8_t *row = gdq + g * npix;
        const uint8_t t = template[g];
        for (int64_t p = 0; p < npix; p++)
            regular[p] &= row[p] == t;
    }
}

/* Segments of ramps with any flags, and what their flags make of the pixel.
 *
 * For pixels pix[0..m) of gdq (group g of pixel p at gdq[g * fgs + p * fps]): a segment
 * is a run of groups clean of everything but ``ignore``, started one group early when
 * that group is ``jump`` and nothing else (but ``ignore``).  A pixel with a segment of
 * two groups or more keeps only those; otherwise only its first.  They are written in
 * pixel then time order to seg_pix (= pix[i]) / seg_start / seg_length, which hold at
 * least m * ((ngroups + 1) / 2) entries; returns their number.
 *
 * With ``seen``/``dq`` given, seen[pix[i]] gets the OR of the pixel's flags, and dq[pix[i]]
 * its ``keep`` bits plus: ``unusable`` if the first group is ``saturated``, ``dnu`` if
 * every group is ``unusable``, and ``saturated`` too if every group is saturated.  With
 * ``fittable_only`` the pixels in the first two cases get no segments. */
int64_t rf_segments(const uint8_t *gdq, int64_t fgs, int64_t fps, const int64_t *pix,
                    int64_t m, int64_t ngroups, int64_t ignore, int64_t jump,
                    int64_t saturated, int64_t unusable, int64_t dnu, int64_t keep,
                    int64_t fittable_only, uint8_t *seen, uint32_t *dq, int64_t *seg_pix,
                    int64_t *seg_start, int64_t *seg_length)
{
    const uint8_t not_ignored = (uint8_t)~ignore;
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
            n_unusable += (v & unusable) != 0;
            n_saturated += (v & saturated) != 0;
        }
        const int sat_first = (f[0] & saturated) != 0;
        const int all_bad = n_unusable == ngroups;
        if (dq != NULL) {
            uint32_t add = any & (uint32_t)keep;
            if (sat_first)
                add |= (uint32_t)unusable;
            if (all_bad)
                add |= (uint32_t)dnu;
            if (all_bad && n_saturated == ngroups)
                add |= (uint32_t)saturated;
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

/* rf_regular_diffs; always inlined so that a constant pixel stride vectorises */
static inline __attribute__((always_inline)) void
regular_diffs(const float *ramp, int64_t gs, int64_t ps, int64_t ngroups, int64_t npix,
              const int64_t *usable, int64_t nu, float *ordered, uint8_t *general)
{
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
            float *dst = ordered + p0 * nu + k;
            for (int64_t b = 0; b < nb; b++) {
                const float d = a[gs + b * ps] - a[b * ps];
                bad[b] |= isnan(d) != 0;
                dst[b * nu] = d;
            }
        }
        for (int64_t b = 0; b < nb; b++)
            general[p0 + b] |= bad[b] || !(low[b] > 0.0f && high[b] <= 2.0f * low[b]);
    }
}

/* Median-rate differences of ramps that share one flag template: for the ``nu`` usable
 * differences ``usable[k] -> usable[k] + 1`` writes the float32 differences pixel-major
 * into ``ordered`` [npix, nu].  Sets ``general[p]`` where those float32 differences are
 * not the exact ones (a NaN difference or sample, or samples that are not all positive
 * and within a factor two of each other: Sterbenz's lemma needs both). */
void rf_regular_diffs(const float *ramp, int64_t gs, int64_t ps, int64_t ngroups,
                      int64_t npix, const int64_t *usable, int64_t nu, float *ordered,
                      uint8_t *general)
{
    if (ps == 1)
        regular_diffs(ramp, gs, 1, ngroups, npix, usable, nu, ordered, general);
    else
        regular_diffs(ramp, gs, ps, ngroups, npix, usable, nu, ordered, general);
}

/* Median-rate differences of individual ramps, any flags: for pixels pix[0..m) the
 * ngroups - 1 differences in double (exact), NaN where either group is ``unusable`` or
 * the later one is a ``jump``, into diffs [m, ngroups - 1]; their count of non-NaN
 * values, and the first sample (NaN if unusable) as the fallback. */
void rf_general_diffs(const float *ramp, int64_t gs, int64_t ps, const uint8_t *gdq,
                      int64_t fgs, int64_t fps, const int64_t *pix, int64_t m,
                      int64_t ngroups, int64_t unusable, int64_t jump, double *diffs,
                      int64_t *n_valid, double *first)
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
            if (((before | after) & unusable) || (after & jump))
                d = NAN;
            valid += !isnan(d);
            dst[g] = d;
        }
        n_valid[i] = valid;
        first[i] = f[0] & unusable ? NAN : (double)y[0];
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

/* Fits segments and adds each into its pixel's sums (in the order given, so a pixel's
 * segments are summed in time order): 1/var_rnoise into inv_r, 1/var_poisson into
 * inv_p when positive, 1/(var_poisson + var_rnoise) into inv_e, slope/var_rnoise into
 * num; sets fitted.  Segment i is pixel pix[i] from group start[i * ss], length[i * ls]
 * groups (a stride of 0 gives every segment the same shape).
 *
 * ``table`` holds the optimal-weighting slope coefficients: those of a segment of n
 * groups with weighting exponent number c start at table[offset[n] + c * n].  ``edges``
 * are the nedges signal-to-noise thresholds choosing c.  ``only_first`` (optional)
 * marks pixels whose lone first group is timed by first_time. */
void rf_fit_segments(const float *ramp, int64_t gs, int64_t ps, int64_t nseg,
                     const int64_t *pix, const int64_t *start, int64_t ss,
                     const int64_t *length, int64_t ls, const double *rnoise,
                     const double *gain, const double *dark, const double *median_rate,
                     const uint8_t *only_first, double gtime, double first_time,
                     const double *table, const int64_t *offset, const double *edges,
                     int64_t nedges, uint8_t *fitted, double *inv_r, double *inv_p,
                     double *inv_e, double *num)
{
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

/* One integration's products from its sums (rf_fit_segments), and their contributions
 * to the exposure's.  ``dq`` is the integration's DQ (without partial saturation),
 * ``seen`` the OR of each ramp's group flags; ``unusable`` and ``saturated`` are the
 * DQ bits.  Writes sci/err/var_poisson (float32), var_rnoise (double: the CHARGELOSS
 * pass may still change it) and the integration's DQ with partial saturation; adds
 * into sum_inv_p/sum_inv_r/sum_num, ORs ``keep`` bits of dq into rate_dq and keeps the
 * per-pixel "every integration"/"any integration" flags. */
void rf_finish_integration(int64_t npix, const uint32_t *dq, const uint8_t *seen,
                           const uint8_t *fitted, const double *inv_r, const double *inv_p,
                           const double *inv_e, const double *num, int64_t unusable,
                           int64_t dnu, int64_t saturated, int64_t keep, double huge,
                           float *sci, float *err, float *var_poisson, double *var_rnoise,
                           uint32_t *dq_out, double *sum_inv_p, double *sum_inv_r,
                           double *sum_num, uint32_t *rate_dq, uint8_t *unusable_everywhere,
                           uint8_t *saturated_everywhere, uint8_t *saturated_somewhere)
{
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
        if (dq[p] & (uint32_t)unusable) {
            s = NAN;
            vp = vr = e = 0.0;
        }
        sci[p] = (float)s;
        err[p] = (float)e;
        var_poisson[p] = (float)vp;
        var_rnoise[p] = vr;
        const uint32_t any_saturated = seen[p] & (uint32_t)saturated;
        dq_out[p] = dq[p] | (any_saturated ? (uint32_t)saturated : 0u);
        rate_dq[p] |= dq[p] & (uint32_t)keep;
        unusable_everywhere[p] &= (dq[p] & (uint32_t)dnu) != 0;
        saturated_everywhere[p] &= (dq[p] & (uint32_t)saturated) != 0;
        saturated_somewhere[p] |= any_saturated != 0;
        sum_inv_p[p] += inv_p[p] > 0.0 ? inv_p[p] : 0.0;
        sum_inv_r[p] += inv_r[p];
        sum_num[p] += num[p];
    }
}

/* The exposure's products from the sums over integrations (rf_finish_integration).
 * var_rnoise is double for the CHARGELOSS pass; rate_dq is completed in place. */
void rf_finish_exposure(int64_t npix, const double *sum_inv_p, const double *sum_inv_r,
                        const double *sum_num, const uint8_t *unusable_everywhere,
                        const uint8_t *saturated_everywhere,
                        const uint8_t *saturated_somewhere, int64_t unusable, int64_t dnu,
                        int64_t saturated, double huge, uint32_t *rate_dq, float *sci,
                        float *err, float *var_poisson, double *var_rnoise)
{
    for (int64_t p = 0; p < npix; p++) {
        uint32_t dq = rate_dq[p];
        if (unusable_everywhere[p])
            dq |= (uint32_t)dnu;
        if (saturated_everywhere[p])
            dq |= (uint32_t)saturated;
        double vp = sum_inv_p[p] > 0.0 ? 1.0 / sum_inv_p[p] : 0.0;
        if (vp >= huge || vp < 0.0)
            vp = 0.0;
        /* a sum that is not positive (0 or NaN) is passed through as it is */
        double vr = sum_inv_r[p] > 0.0 ? 1.0 / sum_inv_r[p] : sum_inv_r[p];
        if (vr >= huge)
            vr = 0.0;
        double e = sqrt(vp + vr);
        double s = sum_num[p] * vr;
        if (dq & (uint32_t)unusable) {
            s = NAN;
            vp = vr = e = 0.0;
        }
        /* partial saturation is flagged only after the NaN decision above */
        if (saturated_somewhere[p])
            dq |= (uint32_t)saturated;
        rate_dq[p] = dq;
        sci[p] = (float)s;
        err[p] = (float)e;
        var_poisson[p] = (float)vp;
        var_rnoise[p] = vr;
    }
}
