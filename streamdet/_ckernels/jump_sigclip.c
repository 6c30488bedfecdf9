/* Jump detection's sigma-clip search (streamdet/plugins/jump.py, _sigma_clip_flag):
 * the iterated median / population-std clip that stcal runs through astropy's sigma_clip
 * when an exposure has many integrations.
 *
 * Arithmetic as numpy's formulation of it, bit for bit: values are the float32
 * differences widened to double; the centre is the mean (in double) of the two middle
 * values of the kept ones in sorted order; the mean and the variance are sums in numpy's
 * order - a masked numpy reduction adds, to a zero start, the pairwise sum of each run of
 * consecutive kept values (numpy's pairwise summation: 8 accumulators, blocks of 128) -
 * divided by the kept count. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* numpy's pairwise summation of n contiguous doubles */
static double pairwise_sum(const double *a, int64_t n)
{
    if (n < 8) {
        double res = 0.;
        for (int64_t i = 0; i < n; i++)
            res += a[i];
        return res;
    }
    if (n <= 128) {
        double r[8];
        for (int k = 0; k < 8; k++)
            r[k] = a[k];
        int64_t i;
        for (i = 8; i < n - (n % 8); i += 8)
            for (int k = 0; k < 8; k++)
                r[k] += a[i + k];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++)
            res += a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

/* np.sum(x, where=keep) over one row: the pairwise sums of the kept runs, in order */
static double masked_sum(const double *x, const unsigned char *keep, int64_t n)
{
    double total = 0.;
    int64_t i = 0;
    while (i < n) {
        while (i < n && !keep[i])
            i++;
        const int64_t start = i;
        while (i < n && keep[i])
            i++;
        if (i > start)
            total += pairwise_sum(x + start, i - start);
    }
    return total;
}

/* float32 bits mapped to unsigned keys in the order of the values (no NaN) */
static uint32_t sort_key(float v)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    return bits & 0x80000000u ? ~bits : bits | 0x80000000u;
}

static float key_value(uint32_t key)
{
    const uint32_t bits = key & 0x80000000u ? key & 0x7fffffffu : ~key;
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* Sort n keys ascending (LSD radix, 8 bits a pass; a pass whose digit is the same for
 * all keys is skipped): no comparisons, hence no mispredicted branches, which dominate
 * a comparison sort or selection on noise-like data.  other: n keys of scratch; returns
 * the array that holds the result (keys or other). */
static uint32_t *radix_sort(uint32_t *keys, uint32_t *other, int64_t n)
{
    int32_t count[4][256] = {{0}};  /* n < 2^31: a row is one pixel's differences */
    for (int64_t i = 0; i < n; i++)
        for (int b = 0; b < 4; b++)
            count[b][(keys[i] >> (8 * b)) & 0xffu]++;
    for (int b = 0; b < 4; b++) {
        if (n == 0 || count[b][(keys[0] >> (8 * b)) & 0xffu] == n)
            continue;
        int32_t start = 0;
        for (int d = 0; d < 256; d++) {
            const int32_t c = count[b][d];
            count[b][d] = start;
            start += c;
        }
        for (int64_t i = 0; i < n; i++)
            other[count[b][(keys[i] >> (8 * b)) & 0xffu]++] = keys[i];
        uint32_t *t = keys;
        keys = other;
        other = t;
    }
    return keys;
}

/* One row of n values: rejected[i] = 1 for finite values outside the bounds of the last
 * clipping round, 0 otherwise.  values, sq, sorted: n doubles each; keys: 2n uint32;
 * keep, usable: n bytes each (scratch).
 *
 * The usable values are sorted once: a round keeps the values within its bounds, so the
 * kept ones are always a contiguous stretch [a, b) of the sorted values and hold the
 * values from sorted[a] to sorted[b - 1], whatever their order in the row. */
static void clip_row(const float *src, int64_t src_stride, int64_t n, double n_sigma,
                     int64_t rounds, double *values, double *sq, double *sorted,
                     uint32_t *keys, unsigned char *keep, unsigned char *usable,
                     uint8_t *rejected, double *bounds)
{
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        const float v = src[i * src_stride];
        values[i] = (double)v;
        usable[i] = isfinite(v) != 0;
        if (usable[i])
            keys[m++] = sort_key(v);
    }
    const uint32_t *ordered = radix_sort(keys, keys + n, m);
    for (int64_t j = 0; j < m; j++)
        sorted[j] = (double)key_value(ordered[j]);
    int64_t a = 0, b = m;
    double low = NAN, high = NAN;
    for (int64_t round = 0; round < rounds && b > a; round++) {
        const int64_t n_kept = b - a;
        /* the mean of the two middle kept values, as sorted_row_medians takes it */
        const double centre = (sorted[a + (n_kept - 1) / 2] + sorted[a + n_kept / 2]) * 0.5;
        const double first = sorted[a], last = sorted[b - 1];
        for (int64_t i = 0; i < n; i++)
            keep[i] = values[i] >= first && values[i] <= last;
        const double mean = masked_sum(values, keep, n) / (double)n_kept;
        for (int64_t i = 0; i < n; i++) {
            const double d = values[i] - mean;
            sq[i] = d * d;
        }
        const double std = sqrt(masked_sum(sq, keep, n) / (double)n_kept);
        low = centre - n_sigma * std;
        high = centre + n_sigma * std;
        while (a < b && !(sorted[a] >= low))
            a++;
        while (b > a && !(sorted[b - 1] <= high))
            b--;
        if (b - a == n_kept)
            break;
    }
    for (int64_t i = 0; i < n; i++)
        rejected[i] = usable[i] && (values[i] < low || values[i] > high);
    if (bounds) {
        bounds[0] = low;
        bounds[1] = high;
    }
}

/* diffs: pixel-major float32 differences [npix, nints * ndiffs] of a block of nrows x
 * ncols pixels (as jump's _pixel_major_differences lays them out, NaN where unusable).
 * Clipped per (pixel, difference) across the integrations when only_use_ints, else per
 * pixel across all its differences; the bit jump_flag is set in groupdq (uint8 [nints,
 * ngroups, nrows, ncols], element strides for the first three axes, contiguous columns)
 * on group d + 1 of every clipped difference d unless that group has one of the bits
 * unusable.  bounds (may be NULL; for the tests): float64 [rows, 2], each clipped row's
 * last (low, high), rows ordered difference-major ([ndiffs, npix]) when only_use_ints.
 * Returns 0, or -1 when scratch memory is not available. */
int64_t jump_sigma_clip(const float *diffs, int64_t nrows, int64_t ncols, int64_t nints,
                        int64_t ndiffs, int64_t only_use_ints, double n_sigma, int64_t rounds,
                        uint8_t *groupdq, int64_t s_int, int64_t s_group, int64_t s_row,
                        int64_t jump_flag, int64_t unusable, double *bounds)
{
    const int64_t npix = nrows * ncols;
    const int64_t width = nints * ndiffs;
    const int64_t n = only_use_ints ? nints : width;
    const uint8_t jump = (uint8_t)jump_flag, skip = (uint8_t)unusable;
    double *buffers = malloc(sizeof(double) * 3 * (size_t)(n > 0 ? n : 1));
    unsigned char *flags = malloc(3 * (size_t)(n > 0 ? n : 1));
    uint32_t *keys = malloc(sizeof(uint32_t) * 2 * (size_t)(n > 0 ? n : 1));
    if (!buffers || !flags || !keys) {
        free(buffers);
        free(flags);
        free(keys);
        return -1;
    }
    double *values = buffers, *sq = buffers + n, *sorted = buffers + 2 * n;
    unsigned char *keep = flags, *usable = flags + n, *rejected = flags + 2 * n;
    for (int64_t p = 0; p < npix; p++) {
        const float *row = diffs + p * width;
        uint8_t *pixel = groupdq + (p / ncols) * s_row + p % ncols + s_group;  /* group 1 */
        if (only_use_ints) {
            for (int64_t d = 0; d < ndiffs; d++) {
                clip_row(row + d, ndiffs, n, n_sigma, rounds, values, sq, sorted, keys, keep, usable,
                         rejected, bounds ? bounds + 2 * (d * npix + p) : NULL);
                uint8_t *q = pixel + d * s_group;
                for (int64_t i = 0; i < n; i++)
                    if (rejected[i] && !(q[i * s_int] & skip))
                        q[i * s_int] |= jump;
            }
        } else {
            clip_row(row, 1, n, n_sigma, rounds, values, sq, sorted, keys, keep, usable, rejected,
                     bounds ? bounds + 2 * p : NULL);
            for (int64_t k = 0; k < n; k++) {
                uint8_t *q = pixel + (k / ndiffs) * s_int + (k % ndiffs) * s_group;
                if (rejected[k] && !(*q & skip))
                    *q |= jump;
            }
        }
    }
    free(buffers);
    free(flags);
    free(keys);
    return 0;
}

/* Sigma-clip mode's group reset asks, per (integration, group), whether every pixel of
 * the rows selected by rows_used (uint8 per row; NULL: all rows) has one of the bits of
 * flags set.  groupdq: uint8 [nints, ngroups, nrows, ncols] with element strides for the
 * first three axes and contiguous columns.  out: uint8 [nints, ngroups]. */
void jump_flagged_everywhere(const uint8_t *groupdq, int64_t s_int, int64_t s_group,
                             int64_t s_row, int64_t nints, int64_t ngroups, int64_t nrows,
                             int64_t ncols, const uint8_t *rows_used, int64_t flags,
                             uint8_t *out)
{
    const uint8_t mask = (uint8_t)flags;
    for (int64_t i = 0; i < nints; i++) {
        for (int64_t g = 0; g < ngroups; g++) {
            const uint8_t *plane = groupdq + i * s_int + g * s_group;
            uint8_t all = 1;
            for (int64_t r = 0; r < nrows && all; r++) {
                if (rows_used && !rows_used[r])
                    continue;
                const uint8_t *row = plane + r * s_row;
                for (int64_t c = 0; c < ncols; c++) {
                    if (!(row[c] & mask)) {
                        all = 0;
                        break;
                    }
                }
            }
            out[i * ngroups + g] = all;
        }
    }
}
