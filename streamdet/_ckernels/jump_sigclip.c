/* Jump detection's sigma-clip search (declared in jump_sigclip.h).
 *
 * Arithmetic as numpy's formulation of it, bit for bit: values are the float32
 * differences widened to double; the centre is the mean (in double) of the two middle
 * values of the kept ones in sorted order; the mean and the variance are sums in numpy's
 * order - a masked numpy reduction adds, to a zero start, the pairwise sum of each run of
 * consecutive kept values (numpy's pairwise summation: 8 accumulators, blocks of 128) -
 * divided by the kept count. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "jump_sigclip.h"
#include "pairwise_sum.inc"

/* the loops over the differences of a pixel side by side, in wider vectors where the
 * CPU has them */
#define HOT __attribute__((target_clones("avx2", "default")))

/* numpy's pairwise summation of n contiguous doubles */
DEFINE_PAIRWISE_SUM(pairwise_sum, double)

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

static void swap(double *a, double *b)
{
    const double t = *a;
    *a = *b;
    *b = t;
}

/* Rearrange a[0..n) so that a[k] is the value sorted order puts there, smaller-or-equal
 * values before it and larger-or-equal after (no NaN in a).  The partition is
 * branch-free (Lomuto with unconditional swaps, then a pass gathering the pivot's ties):
 * on noise-like data a branching one spends most of its time in mispredicted
 * comparisons. */
static void select_nth(double *a, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n - 1;
    while (hi - lo > 16) {
        /* median of three as pivot, moved to hi */
        const int64_t mid = lo + (hi - lo) / 2;
        if (a[mid] < a[lo]) swap(&a[mid], &a[lo]);
        if (a[hi] < a[lo]) swap(&a[hi], &a[lo]);
        if (a[hi] < a[mid]) swap(&a[hi], &a[mid]);
        swap(&a[mid], &a[hi]);
        const double pivot = a[hi];
        int64_t store = lo;
        for (int64_t i = lo; i < hi; i++) {
            const double v = a[i];
            a[i] = a[store];
            a[store] = v;
            store += v < pivot;
        }
        /* then the values equal to the pivot, so that ties cannot make this quadratic */
        int64_t equal_end = store;
        for (int64_t i = store; i < hi; i++) {
            const double v = a[i];
            a[i] = a[equal_end];
            a[equal_end] = v;
            equal_end += v <= pivot;
        }
        swap(&a[equal_end], &a[hi]);
        if (k < store)
            hi = store - 1;
        else if (k > equal_end)
            lo = equal_end + 1;
        else
            return;
    }
    for (int64_t i = lo + 1; i <= hi; i++) {  /* insertion sort of the short rest */
        const double v = a[i];
        int64_t j = i - 1;
        while (j >= lo && a[j] > v) {
            a[j + 1] = a[j];
            j--;
        }
        a[j + 1] = v;
    }
}

/* median of n > 0 values (scrambles them): mean of the two middle ones, as
 * sorted_row_medians takes it */
static double median(double *a, int64_t n)
{
    const int64_t low = (n - 1) / 2, high = n / 2;
    select_nth(a, n, low);
    double upper = a[low];
    if (high != low) {
        /* the smallest value above position low */
        upper = a[high];
        for (int64_t i = high + 1; i < n; i++)
            if (a[i] < upper)
                upper = a[i];
    }
    return (a[low] + upper) * 0.5;
}

/* The kept values' mean and population standard deviation, as the clip takes them:
 * sums in numpy's order (every value kept, the usual first round: one run). */
static void moments(const double *values, const unsigned char *keep, int64_t n,
                    int64_t n_kept, double *sq, double *mean_out, double *std_out)
{
    const int all_kept = n_kept == n;
    const double mean = (all_kept ? 0. + pairwise_sum(values, n) : masked_sum(values, keep, n))
                        / (double)n_kept;
    for (int64_t i = 0; i < n; i++) {
        const double d = values[i] - mean;
        sq[i] = d * d;
    }
    *mean_out = mean;
    *std_out = sqrt((all_kept ? 0. + pairwise_sum(sq, n) : masked_sum(sq, keep, n))
                    / (double)n_kept);
}

/* Whether the first round keeps every kept value, proven without its median (which is
 * most of a round's cost, and most rows lose nothing).  With spread = n_sigma * std the
 * round keeps v when fl(centre - spread) <= v <= fl(centre + spread).  Take L and U with
 * fl(U - spread) <= min and fl(L + spread) >= max; if at most (m - 1) / 2 kept values lie
 * below L and at most m - 1 - m / 2 above U (m kept), both middle values of the sorted
 * kept values lie in [L, U], so does centre (their mean: rounding is monotonic), and
 * since fl(c -/+ spread) is monotonic in c, every value is inside the round's bounds.
 * When this answers 0 the round is simply run. */
static int bracket(double lo, double hi, double spread, double *lower_out, double *upper_out)
{
    double upper = lo + spread, lower = hi - spread;
    /* nudged past the rounding of the subtraction (a few steps at most); a spread
     * that is not finite fails these tests and the round runs */
    for (int k = 0; k < 4 && !(upper - spread <= lo); k++)
        upper = nextafter(upper, -INFINITY);
    for (int k = 0; k < 4 && !(lower + spread >= hi); k++)
        lower = nextafter(lower, INFINITY);
    *lower_out = lower;
    *upper_out = upper;
    return upper - spread <= lo && lower + spread >= hi && lower <= upper;
}

/* the counts' test, m values kept of which below lie under L and above over U */
static int middle_inside(int64_t m, int64_t below, int64_t above)
{
    return below <= (m - 1) / 2 && above <= m - 1 - m / 2;
}

static int keeps_all(const double *values, const unsigned char *keep, int64_t n,
                     int64_t n_kept, double spread)
{
    double lo = INFINITY, hi = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        if (keep[i]) {
            lo = values[i] < lo ? values[i] : lo;
            hi = values[i] > hi ? values[i] : hi;
        }
    }
    double lower, upper;
    if (!bracket(lo, hi, spread, &lower, &upper))
        return 0;
    int64_t below = 0, above = 0;
    for (int64_t i = 0; i < n; i++) {
        below += keep[i] & (values[i] < lower);
        above += keep[i] & (values[i] > upper);
    }
    return middle_inside(n_kept, below, above);
}

/* Many rows at once: lane l of x is x[i * nl + l], i < n.  out[l] = pairwise_sum of
 * lane l, with the very additions pairwise_sum makes (the lanes only run side by side).
 * r: 8 * nl doubles, stack: nl doubles per level of recursion (64 levels suffice). */
HOT static void pairwise_lanes(const double *x, int64_t n, int64_t nl, double *out, double *r,
                           double *stack)
{
    if (n < 8) {
        for (int64_t l = 0; l < nl; l++)
            out[l] = 0.;
        for (int64_t i = 0; i < n; i++)
            for (int64_t l = 0; l < nl; l++)
                out[l] += x[i * nl + l];
        return;
    }
    if (n <= 128) {
        for (int k = 0; k < 8; k++)
            for (int64_t l = 0; l < nl; l++)
                r[k * nl + l] = x[k * nl + l];
        int64_t i;
        for (i = 8; i < n - (n % 8); i += 8)
            for (int k = 0; k < 8; k++)
                for (int64_t l = 0; l < nl; l++)
                    r[k * nl + l] += x[(i + k) * nl + l];
        for (int64_t l = 0; l < nl; l++)
            out[l] = ((r[l] + r[nl + l]) + (r[2 * nl + l] + r[3 * nl + l]))
                     + ((r[4 * nl + l] + r[5 * nl + l]) + (r[6 * nl + l] + r[7 * nl + l]));
        for (; i < n; i++)
            for (int64_t l = 0; l < nl; l++)
                out[l] += x[i * nl + l];
        return;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    pairwise_lanes(x, n2, nl, out, r, stack);
    pairwise_lanes(x + n2 * nl, n - n2, nl, stack, r, stack + nl);
    for (int64_t l = 0; l < nl; l++)
        out[l] += stack[l];
}

/* The first-round shortcut (keeps_all) for all differences of one pixel at once, in
 * its pixel-major layout (integration-major, the differences side by side, so the
 * loops run over contiguous values): done[d] = 1 where difference d provably clips
 * nothing, every value being usable, or has no usable value at all; 0 where its row
 * must be clipped (clip_row).  Same arithmetic as clip_row's first round.  values, sq:
 * nints * ndiffs doubles; lane: (17 + 64) * ndiffs doubles. */
HOT static void pixel_shortcut(const float *restrict row, int64_t nints, int64_t ndiffs,
                               double n_sigma, double *restrict values, double *restrict sq,
                               double *restrict lane, unsigned char *restrict done)
{
    const int64_t size = nints * ndiffs;
    double *restrict mean = lane, *restrict std = lane + ndiffs,
           *restrict lo = lane + 2 * ndiffs, *restrict hi = lane + 3 * ndiffs,
           *restrict lower = lane + 4 * ndiffs, *restrict upper = lane + 5 * ndiffs,
           *restrict below = lane + 6 * ndiffs, *restrict above = lane + 7 * ndiffs,
           *restrict count = lane + 8 * ndiffs,
           *r = lane + 9 * ndiffs, *stack = lane + 17 * ndiffs;
    for (int64_t i = 0; i < size; i++)
        values[i] = (double)row[i];
    for (int64_t d = 0; d < ndiffs; d++) {
        count[d] = 0.;
        lo[d] = INFINITY;
        hi[d] = -INFINITY;
    }
    /* NaN and infinities are never the least or greatest: a lane holding one is not
     * all usable and is left to clip_row anyway */
    for (int64_t i = 0; i < nints; i++) {
        const double *restrict v = values + i * ndiffs;
        for (int64_t d = 0; d < ndiffs; d++) {
            count[d] += fabs(v[d]) <= DBL_MAX ? 1. : 0.;
            lo[d] = v[d] < lo[d] ? v[d] : lo[d];
            hi[d] = v[d] > hi[d] ? v[d] : hi[d];
        }
    }
    pairwise_lanes(values, nints, ndiffs, mean, r, stack);
    for (int64_t d = 0; d < ndiffs; d++)
        mean[d] = (0. + mean[d]) / (double)nints;
    for (int64_t i = 0; i < nints; i++)
        for (int64_t d = 0; d < ndiffs; d++) {
            const double dv = values[i * ndiffs + d] - mean[d];
            sq[i * ndiffs + d] = dv * dv;
        }
    pairwise_lanes(sq, nints, ndiffs, std, r, stack);
    int any = 0;
    for (int64_t d = 0; d < ndiffs; d++) {
        std[d] = sqrt((0. + std[d]) / (double)nints);
        done[d] = count[d] == (double)nints
                  && bracket(lo[d], hi[d], n_sigma * std[d], &lower[d], &upper[d]);
        any |= done[d];
        below[d] = above[d] = 0.;
    }
    if (any) {
        for (int64_t i = 0; i < nints; i++) {
            const double *restrict v = values + i * ndiffs;
            for (int64_t d = 0; d < ndiffs; d++) {
                below[d] += v[d] < lower[d] ? 1. : 0.;
                above[d] += v[d] > upper[d] ? 1. : 0.;
            }
        }
    }
    for (int64_t d = 0; d < ndiffs; d++)
        done[d] = count[d] == 0.
                  || (done[d] && middle_inside(nints, (int64_t)below[d], (int64_t)above[d]));
}

/* One row of n values: rejected[i] = 1 for finite values outside the bounds of the last
 * clipping round, 0 otherwise.  values, sq, work: n doubles each, keep, usable: n bytes
 * each (scratch).  bounds (for the tests): the last round's (low, high); without them a
 * first round that provably keeps everything is not run (keeps_all). */
static void clip_row(const float *src, int64_t src_stride, int64_t n, double n_sigma,
                     int64_t rounds, double *values, double *sq, double *work,
                     unsigned char *keep, unsigned char *usable, uint8_t *rejected,
                     double *bounds)
{
    int64_t n_kept = 0;
    for (int64_t i = 0; i < n; i++) {
        values[i] = (double)src[i * src_stride];
        usable[i] = keep[i] = isfinite(values[i]) != 0;
        n_kept += keep[i];
    }
    double low = NAN, high = NAN, mean, std;
    if (rounds > 0 && n_kept > 0) {
        moments(values, keep, n, n_kept, sq, &mean, &std);
        if (!bounds && keeps_all(values, keep, n, n_kept, n_sigma * std)) {
            for (int64_t i = 0; i < n; i++)
                rejected[i] = 0;
            return;
        }
    }
    for (int64_t round = 0; round < rounds && n_kept > 0; round++) {
        int64_t m = 0;
        for (int64_t i = 0; i < n; i++)
            if (keep[i])
                work[m++] = values[i];
        const double centre = median(work, m);
        if (round > 0)
            moments(values, keep, n, n_kept, sq, &mean, &std);
        low = centre - n_sigma * std;
        high = centre + n_sigma * std;
        int64_t n_now = 0;
        for (int64_t i = 0; i < n; i++) {
            keep[i] = keep[i] && values[i] >= low && values[i] <= high;
            n_now += keep[i];
        }
        if (n_now == n_kept)
            break;
        n_kept = n_now;
    }
    for (int64_t i = 0; i < n; i++)
        rejected[i] = usable[i] && (values[i] < low || values[i] > high);
    if (bounds) {
        bounds[0] = low;
        bounds[1] = high;
    }
}

/* (jump_sigclip.h) */
int64_t jump_sigma_clip(const float *diffs, int64_t nrows, int64_t ncols, int64_t nints,
                        int64_t ndiffs, int64_t only_use_ints, double n_sigma, int64_t rounds,
                        uint8_t *groupdq, int64_t s_int, int64_t s_group, int64_t s_row,
                        double *bounds)
{
    const int64_t npix = nrows * ncols;
    const int64_t width = nints * ndiffs;
    const int64_t n = only_use_ints ? nints : width;
    const uint8_t jump = (uint8_t)DQ_JUMP_DET, skip = (uint8_t)(DQ_SATURATED | DQ_DO_NOT_USE);
    /* the per-pixel shortcut of every difference at once (the step's call: no bounds) */
    const int shortcut = only_use_ints && !bounds && rounds > 0 && width > 0;
    const size_t lanes = shortcut ? (size_t)(2 * width + 81 * ndiffs) : 0;
    double *buffers = malloc(sizeof(double) * (3 * (size_t)(n > 0 ? n : 1) + lanes));
    unsigned char *flags = malloc(3 * (size_t)(n > 0 ? n : 1) + (size_t)ndiffs + 1);
    if (!buffers || !flags) {
        free(buffers);
        free(flags);
        return -1;
    }
    double *values = buffers, *sq = buffers + n, *work = buffers + 2 * n;
    double *px_values = buffers + 3 * n, *px_sq = px_values + width,
           *px_lane = px_sq + width;
    unsigned char *keep = flags, *usable = flags + n, *rejected = flags + 2 * n,
                  *done = flags + 3 * n;
    for (int64_t p = 0; p < npix; p++) {
        const float *row = diffs + p * width;
        uint8_t *pixel = groupdq + (p / ncols) * s_row + p % ncols + s_group;  /* group 1 */
        if (only_use_ints) {
            if (shortcut)
                pixel_shortcut(row, nints, ndiffs, n_sigma, px_values, px_sq, px_lane, done);
            for (int64_t d = 0; d < ndiffs; d++) {
                if (shortcut && done[d])
                    continue;
                clip_row(row + d, ndiffs, n, n_sigma, rounds, values, sq, work, keep, usable,
                         rejected, bounds ? bounds + 2 * (d * npix + p) : NULL);
                uint8_t *q = pixel + d * s_group;
                for (int64_t i = 0; i < n; i++)
                    if (rejected[i] && !(q[i * s_int] & skip))
                        q[i * s_int] |= jump;
            }
        } else {
            clip_row(row, 1, n, n_sigma, rounds, values, sq, work, keep, usable, rejected,
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
    return 0;
}

/* (jump_sigclip.h) */
void jump_flagged_everywhere(const uint8_t *groupdq, int64_t s_int, int64_t s_group,
                             int64_t s_row, int64_t nints, int64_t ngroups, int64_t nrows,
                             int64_t ncols, const uint8_t *rows_used, uint8_t *out)
{
    const uint8_t mask = (uint8_t)(DQ_JUMP_DET | DQ_DO_NOT_USE);
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
