/* The declarations and what the functions do: refpix.h
 *
 * Measuring follows numpy's arithmetic for jwst's formulation (np.mean and np.std of
 * float32 samples, scipy.stats.sigmaclip's loop), so the levels are bit-identical:
 * - a float32 sum is numpy's add.reduce: 0.0f plus the pairwise sum of all the values
 *   (8 accumulators over blocks of at most 128, halves split at a multiple of 8);
 * - a mean is that sum divided by the count, a variance the sum of the float32 squares
 *   of (value - mean) divided by the count, both rounded to float32 (numpy divides in
 *   float64; for float32 operands that is the float32 quotient), std its sqrtf;
 * - clip bounds centre -/+ spread * limit in float32 (a Python-float limit is weak under
 *   NumPy 2's promotion), or in float64 for a float64 limit.
 * Input NaNs never reach a level (a NaN fails both bounds), so every NaN made here is
 * the processor's default NaN, as numpy's are. */
#include <math.h>
#include <stdlib.h>

#include "refpix.h"
#include "pairwise_sum.inc"

#define HOT __attribute__((target_clones("avx2", "default")))
#define N_REFERENCE_COLUMNS 8
#define N_AMPLIFIERS 4

/* numpy's pairwise summation of n contiguous floats, float32 accumulators */
DEFINE_PAIRWISE_SUM(pairwise_sum, float)

/* np.mean of n float32 values (NaN for none) */
static float mean_f32(const float *a, int64_t n)
{
    const float sum = 0.0f + pairwise_sum(a, n);
    return (float)((double)sum / (double)n);
}

/* np.std of n float32 values about their np.mean `centre`; sq: scratch for n floats */
HOT static float std_f32(const float *a, int64_t n, float centre, float *sq)
{
    for (int64_t i = 0; i < n; i++) {
        const float d = a[i] - centre;
        sq[i] = d * d;
    }
    const float sum = 0.0f + pairwise_sum(sq, n);
    return sqrtf((float)((double)sum / (double)n));
}

/* keeps (in order, in place) the values within [lo, hi]; returns how many */
HOT static int64_t keep_within_f32(float *a, int64_t n, float lo, float hi)
{
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        const float v = a[i];
        a[m] = v;
        m += (v >= lo) & (v <= hi);
    }
    return m;
}

HOT static int64_t keep_within_f64(float *a, int64_t n, double lo, double hi)
{
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        const float v = a[i];
        a[m] = v;
        m += ((double)v >= lo) & ((double)v <= hi);
    }
    return m;
}

/* jwst's level of one sample a[0..n) (destroyed): the float64 mean of a sample
 * of equal finite values (*wide set), else the float32 mean of what the sigma clip keeps */
static double reference_level(float *a, int64_t n, double siglimit, int wide_limit,
                              float *sq, int *wide)
{
    int constant = n > 0 && isfinite(a[0]);   /* (no sample: NaN, never asked) */
    for (int64_t i = 1; i < n; i++)
        constant &= a[i] == a[0];
    if (constant) {
        *wide = 1;
        /* numpy's float64 sum of n equal floats is exact and starts from +0.0 */
        return 0.0 + (double)a[0];
    }
    *wide = 0;
    const float limit32 = (float)siglimit;
    for (;;) {
        const float centre = mean_f32(a, n);
        const float spread = std_f32(a, n, centre, sq);
        int64_t kept;
        if (wide_limit) {
            const double reach = (double)spread * siglimit;
            kept = keep_within_f64(a, n, (double)centre - reach, (double)centre + reach);
        } else {
            const float reach = spread * limit32;
            kept = keep_within_f32(a, n, centre - reach, centre + reach);
        }
        if (kept == n)   /* the mean of what is kept is this centre */
            return centre;
        n = kept;
    }
}

int64_t streamdet_refpix_measure(const float *columns, int64_t ngroups, int64_t nrows,
                                 int64_t s_group, int64_t s_row, const uint8_t *usable,
                                 int64_t nsets, double siglimit, int64_t wide_limit,
                                 int64_t ncols, double *corr)
{
    const int64_t capacity = (nrows + nsets - 1) / nsets;
    /* one sample per reference column, and the squares of one */
    float *samples = malloc(sizeof(float) * (size_t)(N_REFERENCE_COLUMNS + 1) *
                            (size_t)(capacity > 0 ? capacity : 1));
    if (!samples)
        return -1;
    float *sq = samples + N_REFERENCE_COLUMNS * capacity;
    int64_t any_wide = 0;
    for (int64_t g = 1; g < ngroups; g++) {
        for (int64_t set = 0; set < nsets; set++) {
            int64_t size[N_REFERENCE_COLUMNS] = {0};
            for (int64_t y = set; y < nrows; y += nsets) {
                const float *now = columns + g * s_group + y * s_row;
                const float *first = columns + y * s_row;
                for (int c = 0; c < N_REFERENCE_COLUMNS; c++)
                    if (usable[y * N_REFERENCE_COLUMNS + c])
                        samples[c * capacity + size[c]++] = now[c] - first[c];
            }
            double level[N_REFERENCE_COLUMNS];
            int wide[N_REFERENCE_COLUMNS];
            for (int c = 0; c < N_REFERENCE_COLUMNS; c++)
                level[c] = reference_level(samples + c * capacity, size[c], siglimit,
                                           (int)wide_limit, sq, &wide[c]);
            double *row = corr + ((g - 1) * nsets + set) * ncols;
            for (int amp = 0; amp < N_AMPLIFIERS; amp++) {
                const int right = amp + N_AMPLIFIERS;
                double value;
                if (wide[amp] || wide[right]) {
                    value = 0.5 * (level[amp] + level[right]);
                    any_wide = 1;
                } else {
                    const float left32 = (float)level[amp], right32 = (float)level[right];
                    value = (float)(0.5f * (left32 + right32));
                }
                for (int64_t x = amp; x < ncols; x += N_AMPLIFIERS)
                    row[x] = value;
            }
        }
    }
    free(samples);
    return any_wide;
}

__attribute__((target_clones("avx2", "default")))
void streamdet_refpix_apply(float *ramp, int64_t ngroups, int64_t nrows, int64_t ncols,
                            int64_t gstride, int64_t first_row, const double *corr,
                            int64_t nsets)
{
    const float *g0 = ramp;
    /* the later groups first: they need group 0 as it was */
    for (int64_t g = 1; g < ngroups; g++) {
        for (int64_t y = 0; y < nrows; y++) {
            float *r = ramp + g * gstride + y * ncols;
            const float *f = g0 + y * ncols;
            if (corr) {
                const double *c = corr + ((g - 1) * nsets + (nsets == 2 ? (first_row + y) % 2 : 0)) * ncols;
                for (int64_t x = 0; x < ncols; x++) {
                    float v = r[x] - f[x];
                    v = (float)((double)v - c[x]);
                    r[x] = v + f[x];
                }
            } else {
                for (int64_t x = 0; x < ncols; x++) {
                    float v = r[x] - f[x];
                    r[x] = v + f[x];
                }
            }
        }
    }
    float *first = ramp;
    for (int64_t y = 0; y < nrows; y++)
        for (int64_t x = 0; x < ncols; x++) {
            float f = first[y * ncols + x];
            first[y * ncols + x] = (f - f) + f;
        }
}
