/* The declarations and what the functions do: row_medians.h
 *
 * Why selection: the jump step wants the median of ~3000 differences per pixel on time
 * series; sorting them (numpy's AVX-512 sort) was the step's largest cost after the
 * sigma clip, and a median needs only the one or two middle values.  A three-way
 * quickselect visits about 2n values where a sort does n log n work, and with AVX-512's
 * compress instruction each partition pass is branch-free, 16 values at a time.
 *
 * Exactness: the two middle values are order statistics, the same whichever way they
 * are found, so the median equals the sorted one bit for bit (-0.0 and 0.0 compare
 * equal, in numpy's sort as here, so a median of zero may carry either sign, as it may
 * there).  The partitions compare with < and >, which NaN would defeat: NaNs are left
 * out first, while the numbers are copied into scratch memory. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "row_medians.h"

/* ranges this short are finished by ranking every value against the others */
#define SMALL 16
/* scratch slack: the vector loops store whole vectors of 16 floats past a range's end */
#define SLACK 16

/* The pivot: the median of three medians of three values spread over the range (a
 * ninther), so that a range that happens to be ordered still splits near its middle. */
#define MEDIAN3(T)                                                                      \
    static inline T median3_##T(T a, T b, T c)                                          \
    {                                                                                   \
        T lo = a < b ? a : b, hi = a < b ? b : a;                                       \
        return c < lo ? lo : (c > hi ? hi : c);                                         \
    }                                                                                   \
    static inline T pivot_##T(const T *x, int64_t m)                                    \
    {                                                                                   \
        const int64_t s = m / 9;                                                        \
        return median3_##T(median3_##T(x[0], x[s], x[2 * s]),                           \
                           median3_##T(x[3 * s], x[4 * s], x[5 * s]),                   \
                           median3_##T(x[6 * s], x[7 * s], x[m - 1]));                  \
    }
MEDIAN3(float)
MEDIAN3(double)

/* The plain C building blocks, for any element type:
 * compact: the numbers of row[0:width] into dst, returns their count;
 * partition: src[0:m] into lo (< p, *nl of them) and hi (> p, *ng, their smallest *gmin);
 * small_select: the k-th and (k+1)-th smallest of src[0:m] (m <= SMALL) into *a, *b,
 *   upper standing for the (k+1)-th when k is the last. */
#define SCALAR_BLOCKS(T)                                                                \
    static int64_t compact_##T(const T *restrict row, int64_t width, T *restrict dst)   \
    {                                                                                   \
        int64_t n = 0;                                                                  \
        for (int64_t i = 0; i < width; i++) {                                           \
            const T x = row[i];                                                         \
            dst[n] = x;                                                                 \
            n += x == x;                                                                \
        }                                                                               \
        return n;                                                                       \
    }                                                                                   \
    static void partition_##T(const T *restrict src, int64_t m, T p, T *restrict lo,    \
                              T *restrict hi, int64_t *nl, int64_t *ng, T *gmin)        \
    {                                                                                   \
        int64_t l = 0, g = 0;                                                           \
        T smallest = (T)INFINITY;                                                       \
        for (int64_t i = 0; i < m; i++) {                                               \
            const T x = src[i];                                                         \
            lo[l] = x;                                                                  \
            hi[g] = x;                                                                  \
            l += x < p;                                                                 \
            g += x > p;                                                                 \
            smallest = (x > p && x < smallest) ? x : smallest;                          \
        }                                                                               \
        *nl = l;                                                                        \
        *ng = g;                                                                        \
        *gmin = smallest;                                                               \
    }                                                                                   \
    static void small_select_##T(const T *src, int64_t m, int64_t k, T upper, T *a,     \
                                 T *b)                                                  \
    {                                                                                   \
        *b = upper;                                                                     \
        for (int64_t j = 0; j < m; j++) {                                               \
            const T x = src[j];                                                         \
            int64_t lt = 0, le = 0;                                                     \
            for (int64_t i = 0; i < m; i++) {                                           \
                lt += src[i] < x;                                                       \
                le += src[i] <= x;                                                      \
            }                                                                           \
            if (lt <= k && k < le)                                                      \
                *a = x;                                                                 \
            if (lt <= k + 1 && k + 1 < le)                                              \
                *b = x;                                                                 \
        }                                                                               \
    }
SCALAR_BLOCKS(float)
SCALAR_BLOCKS(double)

/* The k-th and (k+1)-th smallest of the m numbers at src into *a and *b, src, lo and hi
 * being scratch of m + SLACK values each (all three are overwritten).  The range being
 * searched moves between the three buffers: it is partitioned into the other two and
 * continues in the part that holds the k-th smallest.  `upper` is the smallest value
 * left out above the range, which is the (k+1)-th when the k-th is the range's largest
 * (leaving out the part above a pivot p leaves out p itself, the smallest of it). */
#define SELECT(NAME, T, PARTITION, SMALL_SELECT, ATTR)                                  \
    ATTR static void NAME(T *src, T *lo, T *hi, int64_t m, int64_t k, T upper, T *a,    \
                          T *b)                                                         \
    {                                                                                   \
        T *spare;                                                                       \
        while (m > SMALL) {                                                             \
            const T p = pivot_##T(src, m);                                              \
            int64_t nl, ng;                                                             \
            T gmin;                                                                     \
            PARTITION(src, m, p, lo, hi, &nl, &ng, &gmin);                              \
            const int64_t le = m - ng;                                                  \
            if (k < nl) {                                                               \
                upper = p;                                                              \
                spare = src, src = lo, lo = spare, m = nl;                              \
            } else if (k < le) {                                                        \
                *a = p;                                                                 \
                *b = k + 1 < le ? p : (ng ? gmin : upper);                              \
                return;                                                                 \
            } else {                                                                    \
                k -= le;                                                                \
                spare = src, src = hi, hi = spare, m = ng;                              \
            }                                                                           \
        }                                                                               \
        SMALL_SELECT(src, m, k, upper, a, b);                                           \
    }
SELECT(select_float, float, partition_float, small_select_float, )
SELECT(select_double, double, partition_double, small_select_double, )

/* One row's median (row_medians.h), s0..s2 being scratch of width + SLACK values each. */
#define ROW_MEDIAN(T)                                                                   \
    static double row_median_##T(const T *row, int64_t width, T *s0, T *s1, T *s2)      \
    {                                                                                   \
        const int64_t n = compact_##T(row, width, s0);                                  \
        if (n == 0)                                                                     \
            return NAN;                                                                 \
        T a = 0, b = 0;                                                                 \
        select_##T(s0, s1, s2, n, (n - 1) / 2, (T)INFINITY, &a, &b);                    \
        return ((double)a + (double)(n % 2 ? a : b)) * 0.5;                             \
    }
ROW_MEDIAN(float)
ROW_MEDIAN(double)

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HAVE_AVX512 1
#define AVX512 __attribute__((target("avx512f,popcnt")))

/* The float blocks in AVX-512, 16 values a step: masked loads at the ends of a range,
 * whole-vector stores into the scratch slack. */
AVX512 static inline __mmask16 first_lanes(int64_t count)
{
    return count >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1u);
}

AVX512 static int64_t compact_float_avx512(const float *restrict row, int64_t width,
                                           float *restrict dst)
{
    int64_t n = 0;
    for (int64_t i = 0; i < width; i += 16) {
        const __mmask16 in = first_lanes(width - i);
        const __m512 x = _mm512_maskz_loadu_ps(in, row + i);
        const __mmask16 number = _mm512_mask_cmp_ps_mask(in, x, x, _CMP_ORD_Q);
        _mm512_storeu_ps(dst + n, _mm512_maskz_compress_ps(number, x));
        n += __builtin_popcount(number);
    }
    return n;
}

AVX512 static void partition_float_avx512(const float *restrict src, int64_t m, float p,
                                          float *restrict lo, float *restrict hi,
                                          int64_t *nl, int64_t *ng, float *gmin)
{
    const __m512 pivot = _mm512_set1_ps(p);
    __m512 smallest = _mm512_set1_ps(INFINITY);
    int64_t l = 0, g = 0;
    for (int64_t i = 0; i < m; i += 16) {
        const __mmask16 in = first_lanes(m - i);
        const __m512 x = _mm512_maskz_loadu_ps(in, src + i);
        const __mmask16 below = _mm512_mask_cmp_ps_mask(in, x, pivot, _CMP_LT_OQ);
        const __mmask16 above = _mm512_mask_cmp_ps_mask(in, x, pivot, _CMP_GT_OQ);
        _mm512_storeu_ps(lo + l, _mm512_maskz_compress_ps(below, x));
        _mm512_storeu_ps(hi + g, _mm512_maskz_compress_ps(above, x));
        l += __builtin_popcount(below);
        g += __builtin_popcount(above);
        smallest = _mm512_mask_min_ps(smallest, above, smallest, x);
    }
    *nl = l;
    *ng = g;
    *gmin = _mm512_reduce_min_ps(smallest);
}

AVX512 static void small_select_float_avx512(const float *src, int64_t m, int64_t k,
                                             float upper, float *a, float *b)
{
    const __mmask16 in = first_lanes(m);
    const __m512 x = _mm512_maskz_loadu_ps(in, src);
    *b = upper;
    for (int64_t j = 0; j < m; j++) {
        const __m512 v = _mm512_set1_ps(src[j]);
        const int64_t lt = __builtin_popcount(_mm512_mask_cmp_ps_mask(in, x, v, _CMP_LT_OQ));
        const int64_t le = __builtin_popcount(_mm512_mask_cmp_ps_mask(in, x, v, _CMP_LE_OQ));
        if (lt <= k && k < le)
            *a = src[j];
        if (lt <= k + 1 && k + 1 < le)
            *b = src[j];
    }
}

SELECT(select_float_avx512, float, partition_float_avx512, small_select_float_avx512,
       AVX512)

/* A first pass that keeps only the values between two pivots taken from a sample, just
 * below and just above the sample's median: the middle value of the row then lies
 * between them but for a few percent of rows, and the quickselect starts on about a
 * quarter of the values instead of all of them.  Returns the count kept in `mid`, with
 * the counts below (*nbelow) and the smallest value above (*above_min, INFINITY for
 * none). */
#define SAMPLE 64
#define SAMPLE_SPREAD 8

AVX512 static int64_t keep_middle_avx512(const float *restrict src, int64_t m,
                                         float *restrict mid, int64_t *nbelow,
                                         float *above_min)
{
    float sample[SAMPLE + SLACK], work[2][SAMPLE + SLACK], low, high, unused;
    for (int64_t j = 0; j < SAMPLE; j++)
        sample[j] = src[(j * m) / SAMPLE];
    memcpy(work[0], sample, sizeof(float) * SAMPLE);
    select_float_avx512(work[0], work[1], mid, SAMPLE, SAMPLE / 2 - SAMPLE_SPREAD,
                        INFINITY, &low, &unused);
    memcpy(work[0], sample, sizeof(float) * SAMPLE);
    select_float_avx512(work[0], work[1], mid, SAMPLE, SAMPLE / 2 + SAMPLE_SPREAD,
                        INFINITY, &high, &unused);
    const __m512 lo = _mm512_set1_ps(low), hi = _mm512_set1_ps(high);
    __m512 smallest = _mm512_set1_ps(INFINITY);
    int64_t below = 0, kept = 0;
    for (int64_t i = 0; i < m; i += 16) {
        const __mmask16 in = first_lanes(m - i);
        const __m512 x = _mm512_maskz_loadu_ps(in, src + i);
        const __mmask16 under = _mm512_mask_cmp_ps_mask(in, x, lo, _CMP_LT_OQ);
        const __mmask16 over = _mm512_mask_cmp_ps_mask(in, x, hi, _CMP_GT_OQ);
        const __mmask16 between = in & (__mmask16)~(under | over);
        _mm512_storeu_ps(mid + kept, _mm512_maskz_compress_ps(between, x));
        kept += __builtin_popcount(between);
        below += __builtin_popcount(under);
        smallest = _mm512_mask_min_ps(smallest, over, smallest, x);
    }
    *nbelow = below;
    *above_min = _mm512_reduce_min_ps(smallest);
    return kept;
}

AVX512 static double row_median_float_avx512(const float *row, int64_t width, float *s0,
                                             float *s1, float *s2)
{
    const int64_t n = compact_float_avx512(row, width, s0);
    if (n == 0)
        return NAN;
    const int64_t k = (n - 1) / 2;
    float a = 0, b = 0;
    if (n >= 16 * SAMPLE) {
        int64_t below;
        float upper;
        const int64_t kept = keep_middle_avx512(s0, n, s1, &below, &upper);
        if (below <= k && k < below + kept) {
            /* k + 1 < n here: the (k+1)-th is kept, or the smallest above */
            select_float_avx512(s1, s0, s2, kept, k - below, upper, &a, &b);
            return ((double)a + (double)(n % 2 ? a : b)) * 0.5;
        }
    }
    select_float_avx512(s0, s1, s2, n, k, INFINITY, &a, &b);
    return ((double)a + (double)(n % 2 ? a : b)) * 0.5;
}

static int has_avx512(void)
{
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f") ? 1 : 0;
    }
    return known;
}
#else
#define HAVE_AVX512 0
#endif

/* (row_medians.h) */
int64_t streamdet_row_medians_f32(const float *rows, int64_t row_stride, int64_t width,
                                  int64_t nrows, double *out)
{
    float *scratch = malloc(sizeof(float) * 3 * (size_t)(width + SLACK));
    if (!scratch)
        return -1;
    float *s0 = scratch, *s1 = s0 + width + SLACK, *s2 = s1 + width + SLACK;
#if HAVE_AVX512
    if (has_avx512()) {
        for (int64_t p = 0; p < nrows; p++)
            out[p] = row_median_float_avx512(rows + p * row_stride, width, s0, s1, s2);
        free(scratch);
        return 0;
    }
#endif
    for (int64_t p = 0; p < nrows; p++)
        out[p] = row_median_float(rows + p * row_stride, width, s0, s1, s2);
    free(scratch);
    return 0;
}

/* (row_medians.h) */
int64_t streamdet_row_medians_f64(const double *rows, int64_t row_stride, int64_t width,
                                  int64_t nrows, double *out)
{
    double *scratch = malloc(sizeof(double) * 3 * (size_t)(width + SLACK));
    if (!scratch)
        return -1;
    double *s0 = scratch, *s1 = s0 + width + SLACK, *s2 = s1 + width + SLACK;
    for (int64_t p = 0; p < nrows; p++)
        out[p] = row_median_double(rows + p * row_stride, width, s0, s1, s2);
    free(scratch);
    return 0;
}
