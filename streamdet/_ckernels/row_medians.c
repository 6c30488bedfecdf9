/* The declarations and what the functions do: row_medians.h
 *
 * Why selection: the jump step wants the median of ~3000 differences per pixel on time
 * series; sorting them (numpy's AVX-512 sort) was the step's largest cost after the
 * sigma clip, and a median needs only the one or two middle values.  With AVX-512 a
 * float row is searched in three moves, each branch-free over 16 values at a time:
 *   1. two pivots from a small sample (32 or 64 values), just below and above its
 *      middle, and one pass that keeps the values between them (a quarter to a half
 *      of the row; the few rows whose middle is not between them are searched whole);
 *   2. a three-way quickselect on what was kept, partitioning with the compress
 *      instruction, down to 32 values;
 *   3. the middle of those by ranks (each value against all, independent compares);
 *      rows of up to 32 values go there directly, of 33 to 64 into a bitonic sorting
 *      network in four vectors.
 * Double rows (ramp_fit's, a few dozen values) take the quickselect and the ranks.
 * Without AVX-512 a plain C quickselect does it all.  Measured against numpy's sort
 * (float rows of normal noise, per row): 3-4x quicker at 3000 values, 2-5x at up to
 * 32, but ~1.6x slower from 33 to ~250 (its networks are better tuned).
 *
 * Exactness: the two middle values are order statistics, the same whichever way they
 * are found, so the median equals the sorted one bit for bit (-0.0 and 0.0 compare
 * equal, in numpy's sort as here, so a median of zero may carry either sign, as it may
 * there).  The comparisons are ordered ones, for which NaN is neither below nor above a
 * pivot: NaNs are counted out, or turned into +inf where a row is sorted whole. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "row_medians.h"

/* ranges this short are finished by ranking every value against the others (plain C) */
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
        const int64_t s = m >> 3; /* (a shift: a division would cost more) */          \
        return median3_##T(median3_##T(x[0], x[s], x[2 * s]),                           \
                           median3_##T(x[3 * s], x[4 * s], x[5 * s]),                   \
                           median3_##T(x[6 * s], x[7 * s], x[m - 1]));                  \
    }
MEDIAN3(float)
MEDIAN3(double)

/* The plain C building blocks, for any element type:
 * compact: the numbers of row[0:width] into dst, returns their count;
 * partition: src[0:m] into lo (< p, *nl of them) and hi (> p, *ng of them);
 * smallest: the smallest of x[0:m] (m > 0);
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
                              T *restrict hi, int64_t *nl, int64_t *ng)                 \
    {                                                                                   \
        int64_t l = 0, g = 0;                                                           \
        for (int64_t i = 0; i < m; i++) {                                               \
            const T x = src[i];                                                         \
            lo[l] = x;                                                                  \
            hi[g] = x;                                                                  \
            l += x < p;                                                                 \
            g += x > p;                                                                 \
        }                                                                               \
        *nl = l;                                                                        \
        *ng = g;                                                                        \
    }                                                                                   \
    static T smallest_##T(const T *x, int64_t m)                                        \
    {                                                                                   \
        T least = x[0];                                                                 \
        for (int64_t i = 1; i < m; i++)                                                 \
            least = x[i] < least ? x[i] : least;                                        \
        return least;                                                                   \
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
 * (leaving out the part above a pivot p leaves out p itself, the smallest of it); NaN
 * when the caller has not worked it out, and *b is then NaN if it was needed. */
#define SELECT(NAME, T, PARTITION, SMALL_SELECT, SMALL_SIZE, ATTR)                      \
    ATTR static void NAME(T *src, T *lo, T *hi, int64_t m, int64_t k, T upper, T *a,    \
                          T *b)                                                         \
    {                                                                                   \
        T *spare;                                                                       \
        while (m > SMALL_SIZE) {                                                        \
            const T p = pivot_##T(src, m);                                              \
            int64_t nl, ng;                                                             \
            PARTITION(src, m, p, lo, hi, &nl, &ng);                                     \
            const int64_t le = m - ng;                                                  \
            if (k < nl) {                                                               \
                upper = p;                                                              \
                spare = src, src = lo, lo = spare, m = nl;                              \
            } else if (k < le) {                                                        \
                *a = p;                                                                 \
                *b = k + 1 < le ? p : (ng ? smallest_##T(hi, ng) : upper);              \
                return;                                                                 \
            } else {                                                                    \
                k -= le;                                                                \
                spare = src, src = hi, hi = spare, m = ng;                              \
            }                                                                           \
        }                                                                               \
        SMALL_SELECT(src, m, k, upper, a, b);                                           \
    }
SELECT(select_float, float, partition_float, small_select_float, SMALL, )
SELECT(select_double, double, partition_double, small_select_double, SMALL, )

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
                                          int64_t *nl, int64_t *ng)
{
    const __m512 pivot = _mm512_set1_ps(p);
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
    }
    *nl = l;
    *ng = g;
}

/* Ranges of up to 64 values are sorted outright, in up to four vectors, by bitonic
 * networks (min/max of each lane and a permuted partner: no branch on the data), the
 * vectors past the range padded with +infinity. */
#define SORTED_MAX 64
/* (the sizes below were the quickest of the powers of two tried, on rows of normal
 * noise 9 to 2900 wide) */
/* rows this short are sorted outright */
#define DIRECT_MAX 64
/* the quickselect sorts ranges this short */
#define PICK_MAX 32
/* rows this long take their pivots from a sample of 64 values, shorter ones from 32 */
#define SAMPLE_64 1024

/* One compare-exchange step within a vector: lane i meets lane i ^ j and keeps the
 * larger value where `larger` has its bit. */
AVX512 static inline __m512 exchange(__m512 x, __m512i partner_lanes, __mmask16 larger)
{
    const __m512 partner = _mm512_permutexvar_ps(partner_lanes, x);
    /* min and max side by side, then a blend: a shorter chain than max merged into min */
    return _mm512_mask_blend_ps(larger, _mm512_min_ps(x, partner),
                                _mm512_max_ps(x, partner));
}

/* partner lanes i ^ j, and the lanes with bit j set (the upper lane of each pair) */
#define XOR1 _mm512_set_epi32(14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1)
#define XOR2 _mm512_set_epi32(13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2)
#define XOR4 _mm512_set_epi32(11, 10, 9, 8, 15, 14, 13, 12, 3, 2, 1, 0, 7, 6, 5, 4)
#define XOR8 _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8)
#define BIT1 ((__mmask16)0xAAAA)
#define BIT2 ((__mmask16)0xCCCC)
#define BIT4 ((__mmask16)0xF0F0)
#define BIT8 ((__mmask16)0xFF00)

/* ascending; a pair lies in a descending block of size k where lane bit k is set */
AVX512 static inline __m512 sort16(__m512 x)
{
    x = exchange(x, XOR1, BIT1 ^ BIT2);                                   /* k = 2 */
    x = exchange(x, XOR2, BIT2 ^ BIT4);                                   /* k = 4 */
    x = exchange(x, XOR1, BIT1 ^ BIT4);
    x = exchange(x, XOR4, BIT4 ^ BIT8);                                   /* k = 8 */
    x = exchange(x, XOR2, BIT2 ^ BIT8);
    x = exchange(x, XOR1, BIT1 ^ BIT8);
    x = exchange(x, XOR8, BIT8);                                          /* k = 16 */
    x = exchange(x, XOR4, BIT4);
    x = exchange(x, XOR2, BIT2);
    return exchange(x, XOR1, BIT1);
}

/* a bitonic vector into ascending order */
AVX512 static inline __m512 clean16(__m512 x)
{
    x = exchange(x, XOR8, BIT8);
    x = exchange(x, XOR4, BIT4);
    x = exchange(x, XOR2, BIT2);
    return exchange(x, XOR1, BIT1);
}

AVX512 static inline __m512 reverse16(__m512 x)
{
    return _mm512_permutexvar_ps(
        _mm512_set_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), x);
}

AVX512 static inline void order(__m512 *lo, __m512 *hi)
{
    const __m512 a = *lo;
    *lo = _mm512_min_ps(a, *hi);
    *hi = _mm512_max_ps(a, *hi);
}

/* v[0:n] (n = 1, 2 or 4 vectors: a constant where it is inlined, so that the loops
 * unroll) into one ascending run: each vector sorted, then runs merged pairwise, the
 * second of each pair reversed so that the two form a bitonic sequence, which the
 * half-cleaners at every distance put in order. */
AVX512 static inline __attribute__((always_inline)) void sort_vectors(__m512 *v, int n)
{
    for (int r = 0; r < n; r++)
        v[r] = sort16(v[r]);
    for (int len = 2; len <= n; len *= 2) {
        const int half = len / 2;
        for (int base = 0; base < n; base += len) {
            __m512 *run = v + base;
            for (int i = 0; i < half / 2; i++) {
                const __m512 t = run[half + i];
                run[half + i] = run[len - 1 - i];
                run[len - 1 - i] = t;
            }
            for (int i = 0; i < half; i++) {
                run[half + i] = reverse16(run[half + i]);
                order(&run[i], &run[half + i]);
            }
            for (int d = half / 2; d >= 1; d /= 2)
                for (int i = 0; i < len; i++)
                    if ((i & d) == 0)
                        order(&run[i], &run[i + d]);
            for (int i = 0; i < len; i++)
                run[i] = clean16(run[i]);
        }
    }
}

/* Order statistics of the m values at x (one or two vectors' worth; NaN counts as
 * +inf) by ranks rather than sorting: rank_values loads them into v and counts, in
 * lt, the values below each lane's; it returns how many are numbers.  The value of
 * rank k is then the largest with lt <= k (value_at_rank).  The counting is
 * independent compares, where a network on so few vectors is one long chain of
 * dependent steps. */
AVX512 static inline __attribute__((always_inline)) int64_t rank_values(
    const float *x, int nvec, int64_t m, __m512 *v, __m512i *lt)
{
    const __m512 inf = _mm512_set1_ps(INFINITY);
    const __m512i one = _mm512_set1_epi32(1);
    int64_t numbers = 0;
    for (int r = 0; r < nvec; r++) {
        const __mmask16 in = first_lanes(m > 16 * r ? m - 16 * r : 0);
        const __m512 y = _mm512_maskz_loadu_ps(in, x + 16 * r);
        const __mmask16 number = _mm512_mask_cmp_ps_mask(in, y, y, _CMP_ORD_Q);
        v[r] = _mm512_mask_mov_ps(inf, number, y);
        lt[r] = _mm512_setzero_si512();
        numbers += __builtin_popcount(number);
    }
    for (int64_t j = 0; j < m; j++) {
        const __m512 value = _mm512_set1_ps(x[j]);
        for (int r = 0; r < nvec; r++)
            lt[r] = _mm512_mask_add_epi32(lt[r], _mm512_cmp_ps_mask(value, v[r], _CMP_LT_OQ),
                                          lt[r], one);
    }
    return numbers;
}

AVX512 static inline __attribute__((always_inline)) float value_at_rank(
    const __m512 *v, const __m512i *lt, int nvec, int64_t rank)
{
    const __m512i at = _mm512_set1_epi32((int32_t)rank);
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (int r = 0; r < nvec; r++)
        best = _mm512_mask_max_ps(best, _mm512_cmple_epi32_mask(lt[r], at), best, v[r]);
    return _mm512_reduce_max_ps(best);
}

/* the k-th and (k+1)-th values of the numbers in v[0:n] (NaN-free, padded with +inf),
 * `upper` for the (k+1)-th when k is the last of m */
AVX512 static inline __attribute__((always_inline)) void pick_sorted(
    __m512 *v, int n, int64_t m, int64_t k, float upper, float *a, float *b)
{
    float sorted[SORTED_MAX];
    sort_vectors(v, n);
    for (int r = 0; r < n; r++)
        _mm512_storeu_ps(sorted + 16 * r, v[r]);
    *a = sorted[k];
    *b = k + 1 < m ? sorted[k + 1] : upper;
}

AVX512 static void small_select_float_avx512(const float *src, int64_t m, int64_t k,
                                             float upper, float *a, float *b)
{
    __m512 v[2];
    __m512i lt[2];
    if (m <= 16) {
        rank_values(src, 1, m, v, lt);
        *a = value_at_rank(v, lt, 1, k);
        *b = k + 1 < m ? value_at_rank(v, lt, 1, k + 1) : upper;
    } else {
        rank_values(src, 2, m, v, lt);
        *a = value_at_rank(v, lt, 2, k);
        *b = k + 1 < m ? value_at_rank(v, lt, 2, k + 1) : upper;
    }
}

SELECT(select_float_avx512, float, partition_float_avx512, small_select_float_avx512,
       PICK_MAX, AVX512)

/* Two pivots, just below and just above the middle of a sample of 16 * nvec values
 * (nvec 2 or 4) spread over the row (NaN counted as +inf and left out of the ranks),
 * for a first pass that keeps only the values between them: the row's middle values
 * lie there but for 5-10 % of rows, and there are a quarter to a third as many.
 * Returns 0 when the sample is mostly NaN (no pivots taken). */
AVX512 static int sample_pivots(const float *row, int64_t width, int nvec, float *low,
                                float *high)
{
    const int size = 16 * nvec, shift = nvec == 2 ? 5 : 6; /* size = 1 << shift */
    float sample[64];
    for (int j = 0; j < size; j++)
        sample[j] = row[((int64_t)j * width) >> shift];
    __m512 v[4];
    __m512i lt[2];
    int numbers;
    if (nvec == 2) {
        numbers = (int)rank_values(sample, 2, size, v, lt);
    } else {
        const __m512 inf = _mm512_set1_ps(INFINITY);
        numbers = 0;
        for (int r = 0; r < 4; r++) {
            const __m512 x = _mm512_loadu_ps(sample + 16 * r);
            const __mmask16 number = _mm512_cmp_ps_mask(x, x, _CMP_ORD_Q);
            v[r] = _mm512_mask_mov_ps(inf, number, x);
            numbers += __builtin_popcount(number);
        }
    }
    if (2 * numbers < size)
        return 0;
    /* about one standard deviation of the sample rank of the row's median each way
     * (less for the short rows: then the kept values mostly fit the final ranking) */
    const int spread = (int)((nvec == 2 ? 0.75f : 1.0f) * sqrtf((float)numbers));
    int lo = (numbers - 1) / 2 - spread, hi = numbers / 2 + spread;
    lo = lo < 0 ? 0 : lo;
    hi = hi > numbers - 1 ? numbers - 1 : hi;
    if (nvec == 2) {
        *low = value_at_rank(v, lt, 2, lo);
        *high = value_at_rank(v, lt, 2, hi);
        return 1;
    }
    sort_vectors(v, 4);
    for (int r = 0; r < 4; r++)
        _mm512_storeu_ps(sample + 16 * r, v[r]);
    *low = sample[lo];
    *high = sample[hi];
    return 1;
}

/* The numbers of row[0:width] between low and high (inclusive) into mid; returns their
 * count, with the count of all numbers (*numbers) and of those below low (*below). */
AVX512 static int64_t keep_between(const float *restrict row, int64_t width, float low,
                                   float high, float *restrict mid, int64_t *numbers,
                                   int64_t *below)
{
    const __m512 lo = _mm512_set1_ps(low), hi = _mm512_set1_ps(high);
    int64_t n = 0, under_count = 0, kept = 0;
    for (int64_t i = 0; i < width; i += 16) {
        const __mmask16 in = first_lanes(width - i);
        const __m512 x = _mm512_maskz_loadu_ps(in, row + i);
        const __mmask16 number = _mm512_mask_cmp_ps_mask(in, x, x, _CMP_ORD_Q);
        const __mmask16 under = _mm512_mask_cmp_ps_mask(in, x, lo, _CMP_LT_OQ);
        const __mmask16 over = _mm512_mask_cmp_ps_mask(in, x, hi, _CMP_GT_OQ);
        const __mmask16 between = number & (__mmask16)~(under | over);
        _mm512_storeu_ps(mid + kept, _mm512_maskz_compress_ps(between, x));
        kept += __builtin_popcount(between);
        n += __builtin_popcount(number);
        under_count += __builtin_popcount(under);
    }
    *numbers = n;
    *below = under_count;
    return kept;
}

/* the smallest number of row[0:width] above high (+inf for none) */
AVX512 static float smallest_above(const float *row, int64_t width, float high)
{
    const __m512 hi = _mm512_set1_ps(high);
    __m512 least = _mm512_set1_ps(INFINITY);
    for (int64_t i = 0; i < width; i += 16) {
        const __mmask16 in = first_lanes(width - i);
        const __m512 x = _mm512_maskz_loadu_ps(in, row + i);
        least = _mm512_mask_min_ps(least, _mm512_mask_cmp_ps_mask(in, x, hi, _CMP_GT_OQ),
                                   least, x);
    }
    return _mm512_reduce_min_ps(least);
}

AVX512 static double row_median_float_avx512(const float *row, int64_t width, float *s0,
                                             float *s1, float *s2)
{
    float a = 0, b = 0, low, high;
    if (width <= 32) {
        __m512 v[2];
        __m512i lt[2];
        const int64_t n = width <= 16 ? rank_values(row, 1, width, v, lt)
                                      : rank_values(row, 2, width, v, lt);
        if (n == 0)
            return NAN;
        const int nvec = width <= 16 ? 1 : 2;
        a = value_at_rank(v, lt, nvec, (n - 1) / 2);
        b = n % 2 ? a : value_at_rank(v, lt, nvec, n / 2);
        return ((double)a + (double)b) * 0.5;
    }
    if (width <= DIRECT_MAX) {
        /* 33 to 64 values go straight into four vectors, NaN as +inf: they sort last */
        const __m512 inf = _mm512_set1_ps(INFINITY);
        __m512 v[SORTED_MAX / 16];
        int64_t n = 0;
        for (int r = 0; r < SORTED_MAX / 16; r++) {
            const __mmask16 in = first_lanes(width > 16 * r ? width - 16 * r : 0);
            const __m512 x = _mm512_maskz_loadu_ps(in, row + 16 * r);
            const __mmask16 number = _mm512_mask_cmp_ps_mask(in, x, x, _CMP_ORD_Q);
            v[r] = _mm512_mask_mov_ps(inf, number, x);
            n += __builtin_popcount(number);
        }
        if (n == 0)
            return NAN;
        pick_sorted(v, 4, width, (n - 1) / 2, INFINITY, &a, &b);
        return ((double)a + (double)(n % 2 ? a : b)) * 0.5;
    }
    const int sample_vectors = width >= SAMPLE_64 ? 4 : 2;
    if (sample_pivots(row, width, sample_vectors, &low, &high)) {
        int64_t n, below;
        const int64_t kept = keep_between(row, width, low, high, s1, &n, &below);
        const int64_t k = (n - 1) / 2;
        if (below <= k && k < below + kept) {
            /* when n is even the (k+1)-th is kept too, or else it is the smallest number
             * above: NaN stands for it until it is needed (rarely) */
            select_float_avx512(s1, s0, s2, kept, k - below, NAN, &a, &b);
            if (n % 2 == 0 && b != b)
                b = smallest_above(row, width, high);
            return ((double)a + (double)(n % 2 ? a : b)) * 0.5;
        }
    }
    /* the pivots missed (or most of the sample was NaN): select among all the numbers */
    const int64_t n = compact_float_avx512(row, width, s0);
    if (n == 0)
        return NAN;
    select_float_avx512(s0, s1, s2, n, (n - 1) / 2, INFINITY, &a, &b);
    return ((double)a + (double)(n % 2 ? a : b)) * 0.5;
}

/* The double blocks in AVX-512, 8 values a step (ramp_fit's rows: a few dozen values,
 * so no sampled first pass and no networks: quickselect down to 32, then ranks). */
AVX512 static inline __mmask8 first_lanes8(int64_t count)
{
    return count >= 8 ? (__mmask8)0xff : (__mmask8)((1u << count) - 1u);
}

AVX512 static int64_t compact_double_avx512(const double *restrict row, int64_t width,
                                            double *restrict dst)
{
    int64_t n = 0;
    for (int64_t i = 0; i < width; i += 8) {
        const __mmask8 in = first_lanes8(width - i);
        const __m512d x = _mm512_maskz_loadu_pd(in, row + i);
        const __mmask8 number = _mm512_mask_cmp_pd_mask(in, x, x, _CMP_ORD_Q);
        _mm512_storeu_pd(dst + n, _mm512_maskz_compress_pd(number, x));
        n += __builtin_popcount(number);
    }
    return n;
}

AVX512 static void partition_double_avx512(const double *restrict src, int64_t m, double p,
                                           double *restrict lo, double *restrict hi,
                                           int64_t *nl, int64_t *ng)
{
    const __m512d pivot = _mm512_set1_pd(p);
    int64_t l = 0, g = 0;
    for (int64_t i = 0; i < m; i += 8) {
        const __mmask8 in = first_lanes8(m - i);
        const __m512d x = _mm512_maskz_loadu_pd(in, src + i);
        const __mmask8 below = _mm512_mask_cmp_pd_mask(in, x, pivot, _CMP_LT_OQ);
        const __mmask8 above = _mm512_mask_cmp_pd_mask(in, x, pivot, _CMP_GT_OQ);
        _mm512_storeu_pd(lo + l, _mm512_maskz_compress_pd(below, x));
        _mm512_storeu_pd(hi + g, _mm512_maskz_compress_pd(above, x));
        l += __builtin_popcount(below);
        g += __builtin_popcount(above);
    }
    *nl = l;
    *ng = g;
}

/* rank_values and value_at_rank (above) for up to 32 doubles in nvec vectors */
AVX512 static inline __attribute__((always_inline)) int64_t rank_doubles(
    const double *x, int nvec, int64_t m, __m512d *v, __m512i *lt)
{
    const __m512d inf = _mm512_set1_pd(INFINITY);
    const __m512i one = _mm512_set1_epi64(1);
    int64_t numbers = 0;
    for (int r = 0; r < nvec; r++) {
        const __mmask8 in = first_lanes8(m > 8 * r ? m - 8 * r : 0);
        const __m512d y = _mm512_maskz_loadu_pd(in, x + 8 * r);
        const __mmask8 number = _mm512_mask_cmp_pd_mask(in, y, y, _CMP_ORD_Q);
        v[r] = _mm512_mask_mov_pd(inf, number, y);
        lt[r] = _mm512_setzero_si512();
        numbers += __builtin_popcount(number);
    }
    for (int64_t j = 0; j < m; j++) {
        const __m512d value = _mm512_set1_pd(x[j]);
        for (int r = 0; r < nvec; r++)
            lt[r] = _mm512_mask_add_epi64(lt[r], _mm512_cmp_pd_mask(value, v[r], _CMP_LT_OQ),
                                          lt[r], one);
    }
    return numbers;
}

AVX512 static inline __attribute__((always_inline)) double double_at_rank(
    const __m512d *v, const __m512i *lt, int nvec, int64_t rank)
{
    const __m512i at = _mm512_set1_epi64(rank);
    __m512d best = _mm512_set1_pd(-INFINITY);
    for (int r = 0; r < nvec; r++)
        best = _mm512_mask_max_pd(best, _mm512_cmple_epi64_mask(lt[r], at), best, v[r]);
    return _mm512_reduce_max_pd(best);
}

AVX512 static void small_select_double_avx512(const double *src, int64_t m, int64_t k,
                                              double upper, double *a, double *b)
{
    __m512d v[4];
    __m512i lt[4];
    if (m <= 16) {
        rank_doubles(src, 2, m, v, lt);
        *a = double_at_rank(v, lt, 2, k);
        *b = k + 1 < m ? double_at_rank(v, lt, 2, k + 1) : upper;
    } else {
        rank_doubles(src, 4, m, v, lt);
        *a = double_at_rank(v, lt, 4, k);
        *b = k + 1 < m ? double_at_rank(v, lt, 4, k + 1) : upper;
    }
}

SELECT(select_double_avx512, double, partition_double_avx512, small_select_double_avx512,
       32, AVX512)

AVX512 static double row_median_double_avx512(const double *row, int64_t width,
                                              double *s0, double *s1, double *s2)
{
    double a = 0, b = 0;
    if (width <= 32) {
        __m512d v[4];
        __m512i lt[4];
        int64_t n;
        if (width <= 16) {
            n = rank_doubles(row, 2, width, v, lt);
            a = double_at_rank(v, lt, 2, n ? (n - 1) / 2 : 0);
            b = double_at_rank(v, lt, 2, n / 2);
        } else {
            n = rank_doubles(row, 4, width, v, lt);
            a = double_at_rank(v, lt, 4, n ? (n - 1) / 2 : 0);
            b = double_at_rank(v, lt, 4, n / 2);
        }
        if (n == 0)
            return NAN;
        return (a + (n % 2 ? a : b)) * 0.5;
    }
    const int64_t n = compact_double_avx512(row, width, s0);
    if (n == 0)
        return NAN;
    select_double_avx512(s0, s1, s2, n, (n - 1) / 2, INFINITY, &a, &b);
    return (a + (n % 2 ? a : b)) * 0.5;
}

/* STREAMDET_KERNELS_NO_AVX512 (set, to anything) takes the plain C path: for the tests */
static int has_avx512(void)
{
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f") && !getenv("STREAMDET_KERNELS_NO_AVX512");
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
#if HAVE_AVX512
    if (has_avx512()) {
        for (int64_t p = 0; p < nrows; p++)
            out[p] = row_median_double_avx512(rows + p * row_stride, width, s0, s1, s2);
        free(scratch);
        return 0;
    }
#endif
    for (int64_t p = 0; p < nrows; p++)
        out[p] = row_median_double(rows + p * row_stride, width, s0, s1, s2);
    free(scratch);
    return 0;
}
