/* Per-pixel loops of the jump step; the functions called from Python, their layouts and
 * semantics are declared in jump.h.  The column axis is contiguous, which keeps the inner
 * loops vectorisable.  Pixels are walked in tiles of TILE columns, group plane by group plane: each plane's
 * read is then a contiguous run, which lets the compiler vectorise the arithmetic, while
 * the per-pixel state of one tile stays in L1.
 *
 * Arithmetic mirrors the numpy formulation it replaced, dtype for dtype: electrons and
 * differences are float (numpy float32), medians, sigmas and significances double.
 * Built with -ffp-contract=off so that no a*b+c is fused into one rounding.
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "jump.h"

#define TILE 128

/* the hot loops, in wider vectors where the CPU has them */
#define HOT __attribute__((target_clones("avx2", "default")))

#define UNUSABLE (DQ_SATURATED | DQ_DO_NOT_USE)

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* A tile reads a short run from each of nints*ngroups planes: too many streams for the
 * hardware prefetcher, so each run asks for the next tile's run of the same plane (a
 * prefetch past the end of a row is harmless: it never faults). */
static inline void prefetch_next_tile(const float *x, const uint8_t *q)
{
#if defined(__GNUC__)
    for (int j = 0; j < TILE; j += 64 / (int)sizeof(float))
        __builtin_prefetch(x + TILE + j);
    for (int j = 0; j < TILE; j += 64)
        __builtin_prefetch(q + TILE + j);
#else
    (void)x;
    (void)q;
#endif
}

/* A group's value in electrons; NaN when the group is not to be used, so that both
 * differences touching it are NaN (unusable) too.  The NaN is made by setting the
 * exponent and quiet bits: only NaN-ness matters downstream, and integer masking lets
 * the compiler vectorise the loops (a float select would be control flow to it). */
static inline float electrons(float data, uint8_t dq, float gain)
{
    float e = data * gain;
    uint32_t bits;
    memcpy(&bits, &e, sizeof bits);
    bits |= (uint32_t)0x7fc00000u & (uint32_t)(-(int32_t)((dq & UNUSABLE) != 0));
    memcpy(&e, &bits, sizeof e);
    return e;
}

/* The last word on a run of groups' JUMP_DET bits before the neighbour flagging: they
 * are counted (when count), then removed from groups that are unusable.  Returns the
 * count.  Such groups are rare: one branch-free pass counts and looks for them (it
 * vectorises), a second one clears them only where there are. */
static int64_t settle(uint8_t *restrict q, int64_t n, int count)
{
    const uint8_t jump = (uint8_t)DQ_JUMP_DET;
    int64_t jumps = 0;
    uint8_t stale = 0;
    for (int64_t c = 0; c < n; c++) {
        const uint8_t v = q[c];
        const uint8_t j = (uint8_t)((v & jump) != 0);
        jumps += j;
        stale |= (uint8_t)(j & ((v & UNUSABLE) != 0));
    }
    if (stale) {
        for (int64_t c = 0; c < n; c++) {
            const uint8_t v = q[c];
            if ((v & jump) && (v & UNUSABLE))
                q[c] = (uint8_t)(v & ~jump);
        }
    }
    return count ? jumps : 0;
}

#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

/* jump_pixel_major_diffs with the scratch buffer's row stride as a parameter, so that the
 * caller can hand the common case a constant (measured 15 % faster: the transpose's index
 * arithmetic folds away). */
static ALWAYS_INLINE void pixel_major_diffs(
    const float *restrict data, int64_t ds0, int64_t ds1, int64_t ds2,
    const uint8_t *restrict dq, int64_t qs0, int64_t qs1, int64_t qs2,
    const float *restrict gain, int64_t gs0,
    int64_t nints, int64_t ngroups, int64_t nrows, int64_t ncols,
    float *restrict out, float *restrict buf, const int64_t stride)
{
    const int64_t ndiffs = ngroups - 1, width = nints * ndiffs;
    float prev[TILE];
    for (int64_t r = 0; r < nrows; r++) {
        for (int64_t c0 = 0; c0 < ncols; c0 += TILE) {
            const int64_t n = min64(TILE, ncols - c0);
            const float *g = gain + r * gs0 + c0;
            for (int64_t i = 0; i < nints; i++) {
                const float *x = data + i * ds0 + r * ds2 + c0;
                const uint8_t *q = dq + i * qs0 + r * qs2 + c0;
                prefetch_next_tile(x, q);
                for (int64_t c = 0; c < n; c++)
                    prev[c] = electrons(x[c], q[c], g[c]);
                for (int64_t k = 1; k < ngroups; k++) {
                    x += ds1;
                    q += qs1;
                    prefetch_next_tile(x, q);
                    float *row = buf + (i * ndiffs + k - 1) * stride;
                    for (int64_t c = 0; c < n; c++) {
                        const float e = electrons(x[c], q[c], g[c]);
                        const float d = e - prev[c];
                        prev[c] = e;
                        row[c] = d;
                    }
                }
            }
            float *o = out + (r * ncols + c0) * width;
            for (int64_t c = 0; c < n; c++)
                for (int64_t j = 0; j < width; j++)
                    o[c * width + j] = buf[j * stride + c];
        }
    }
}

/* (jump.h) A tile's differences are made plane by plane into a scratch buffer and then
 * transposed, so that both the reads and the writes of the arrays run along memory. */
HOT int64_t jump_pixel_major_diffs(const jump_block *block, float *out)
{
    /* the scratch buffer's rows are padded by a cache line: the transpose reads down its
     * columns, which at a power-of-two row length would crowd a few cache sets (measured:
     * a fifth slower) */
    const float *data = block->data, *gain = block->gain;
    const uint8_t *dq = block->groupdq;
    const int64_t ds0 = block->data_strides[0], ds1 = block->data_strides[1],
                  ds2 = block->data_strides[2];
    const int64_t qs0 = block->dq_strides[0], qs1 = block->dq_strides[1],
                  qs2 = block->dq_strides[2];
    const int64_t gs0 = block->gain_stride;
    const int64_t nints = block->nints, ngroups = block->ngroups, nrows = block->nrows,
                  ncols = block->ncols;
    const int64_t pad = 64 / (int64_t)sizeof(float);
    const int64_t stride = min64(TILE, ncols) + pad;
    float *buf = malloc(sizeof(float) * (size_t)(stride * nints * (ngroups - 1)));
    if (!buf)
        return -1;
    if (ncols >= TILE)
        pixel_major_diffs(data, ds0, ds1, ds2, dq, qs0, qs1, qs2, gain, gs0,
                          nints, ngroups, nrows, ncols, out, buf, TILE + pad);
    else
        pixel_major_diffs(data, ds0, ds1, ds2, dq, qs0, qs1, qs2, gain, gs0,
                          nints, ngroups, nrows, ncols, out, buf, stride);
    free(buf);
    return 0;
}

/* (jump.h) */
HOT void jump_scan(const jump_block *block, const jump_scan_params *params,
               const double *restrict median, const double *restrict noise_floor,
               int64_t fs0, uint8_t *restrict after0, uint8_t *restrict after1,
               const uint8_t *restrict counted, int64_t *restrict sources, int64_t r0,
               int64_t c0_block, int64_t *restrict result)
{
    const float *restrict data = block->data, *restrict gain = block->gain;
    uint8_t *restrict dq = block->groupdq;
    const int64_t ds0 = block->data_strides[0], ds1 = block->data_strides[1],
                  ds2 = block->data_strides[2];
    const int64_t qs0 = block->dq_strides[0], qs1 = block->dq_strides[1],
                  qs2 = block->dq_strides[2];
    const int64_t gs0 = block->gain_stride;
    const int64_t nints = block->nints, ngroups = block->ngroups, nrows = block->nrows,
                  ncols = block->ncols;
    const float screen_factor = params->screen_factor;
    const double screen_limit = params->screen_limit, jump_limit = params->jump_limit;
    const int64_t flag_nb = params->flag_neighbours;
    const double nb_lo = params->neighbour_low, nb_hi = params->neighbour_high;
    const int64_t as0 = params->after_strides[0], as1 = params->after_strides[1],
                  as2 = params->after_strides[2];
    const double after_level0 = params->after_level0, after_level1 = params->after_level1;
    const int64_t settle_flags = params->settle_flags;
    const int64_t band_nrows = params->band_nrows, band_ncols = params->band_ncols;
    const int64_t ndiffs = ngroups - 1;
    const int screening = screen_limit < INFINITY;
    int64_t n_sources = 0, n_jumps = 0;
    float prev[TILE], diff[TILE], m32[TILE], bound[TILE];
    int32_t hit[TILE];
    double m64[TILE], sigma[TILE];
    for (int64_t r = 0; r < nrows; r++) {
        const int count_row = counted[r] != 0;
        for (int64_t c0 = 0; c0 < ncols; c0 += TILE) {
            const int64_t n = min64(TILE, ncols - c0);
            const float *g = gain + r * gs0 + c0;
            for (int64_t c = 0; c < n; c++) {
                const double m = median[r * ncols + c0 + c];
                double s = sqrt(fabs(m) + noise_floor[r * fs0 + c0 + c]);
                if (s == 0.0)
                    s = NAN; /* unknown noise: nothing is significant */
                m64[c] = m;
                sigma[c] = s;
                m32[c] = (float)m;
                bound[c] = screen_factor * (float)s;
            }
            for (int64_t i = 0; i < nints; i++) {
                const float *x = data + i * ds0 + r * ds2 + c0;
                uint8_t *q = dq + i * qs0 + r * qs2 + c0;
                prefetch_next_tile(x, q);
                for (int64_t c = 0; c < n; c++)
                    prev[c] = electrons(x[c], q[c], g[c]);
                if (settle_flags)
                    n_jumps += settle(q, n, count_row);
                for (int64_t k = 1; k < ngroups; k++) {
                    x += ds1;
                    q += qs1;
                    prefetch_next_tile(x, q);
                    int32_t any = 0;
                    uint8_t bits = 0; /* JUMP_DET bits are rare: settle only runs that have one */
                    for (int64_t c = 0; c < n; c++) {
                        const uint8_t v = q[c];
                        const float e = electrons(x[c], v, g[c]);
                        const float d = e - prev[c];
                        prev[c] = e;
                        diff[c] = d;
                        const int32_t h = fabsf(d - m32[c]) > bound[c];
                        hit[c] = h;
                        any |= h;
                        bits |= v;
                    }
                    if (after0) {
                        const int64_t at = i * as0 + (k - 1) * as1 + r * as2 + c0;
                        for (int64_t c = 0; c < n; c++) {
                            const double excess = (double)diff[c] - m64[c];
                            after0[at + c] = excess >= after_level0;
                            after1[at + c] = excess >= after_level1;
                        }
                    }
                    if (any && screening) {
                        for (int64_t c = 0; c < n; c++) {
                            if (!hit[c])
                                continue;
                            const double level = fabs((double)diff[c] - m64[c]) / sigma[c];
                            if (!(level > screen_limit))
                                continue;
                            if (flag_nb && level > nb_lo && level < nb_hi)
                                sources[n_sources++] =
                                    ((i * ndiffs + (k - 1)) * band_nrows + r0 + r) * band_ncols
                                    + c0_block + c0 + c;
                            if (level > jump_limit && isfinite(level)) {
                                q[c] |= DQ_JUMP_DET;
                                bits |= DQ_JUMP_DET;
                            }
                        }
                    }
                    if (settle_flags && (bits & DQ_JUMP_DET))
                        n_jumps += settle(q, n, count_row);
                }
            }
        }
    }
    result[0] = n_sources;
    result[1] = n_jumps;
}

/* (jump.h) */
int64_t jump_settle(const jump_block *block, const uint8_t *counted)
{
    uint8_t *dq = block->groupdq;
    const int64_t qs0 = block->dq_strides[0], qs1 = block->dq_strides[1],
                  qs2 = block->dq_strides[2];
    const int64_t nints = block->nints, ngroups = block->ngroups, nrows = block->nrows,
                  ncols = block->ncols;
    int64_t n = 0;
    for (int64_t i = 0; i < nints; i++)
        for (int64_t k = 0; k < ngroups; k++)
            for (int64_t r = 0; r < nrows; r++)
                n += settle(dq + i * qs0 + k * qs1 + r * qs2, ncols, counted && counted[r]);
    return n;
}

/* (jump.h) */
void jump_flag_neighbours(const jump_block *block, int64_t *sources, int64_t n_sources)
{
    uint8_t *dq = block->groupdq;
    const int64_t qs0 = block->dq_strides[0], qs1 = block->dq_strides[1],
                  qs2 = block->dq_strides[2];
    const int64_t ngroups = block->ngroups, nrows = block->nrows, ncols = block->ncols;
    const int64_t plane = nrows * ncols, ndiffs = ngroups - 1;
    int64_t kept = 0;
    for (int64_t s = 0; s < n_sources; s++) {
        const int64_t f = sources[s], p = f % plane, id = f / plane;
        const int64_t i = id / ndiffs, k = id % ndiffs + 1;
        if (dq[i * qs0 + k * qs1 + (p / ncols) * qs2 + p % ncols] & DQ_JUMP_DET)
            sources[kept++] = f;
    }
    static const int dr[4] = {-1, 1, 0, 0}, dc[4] = {0, 0, -1, 1};
    for (int64_t s = 0; s < kept; s++) {
        const int64_t f = sources[s], p = f % plane, id = f / plane;
        const int64_t i = id / ndiffs, k = id % ndiffs + 1, r = p / ncols, c = p % ncols;
        for (int j = 0; j < 4; j++) {
            const int64_t rr = r + dr[j], cc = c + dc[j];
            if (rr < 0 || rr >= nrows || cc < 0 || cc >= ncols)
                continue;
            uint8_t *q = dq + i * qs0 + k * qs1 + rr * qs2 + cc;
            if (!(*q & UNUSABLE))
                *q |= DQ_JUMP_DET;
        }
    }
}
