/* Per-pixel loops of the jump step (streamdet/plugins/jump.py holds the algorithm's
 * description and the numpy parts: the sort, the rarely-run searches).
 *
 * Every ramp-shaped argument is [nints, ngroups, nrows, ncols] given as a pointer to its
 * first element and the element strides of its first three axes, so the engine's band
 * views need no copy; the column axis must be contiguous (as in any row slice), which
 * keeps the inner loops vectorisable.  Images ([nrows, ncols]) likewise take a row stride.
 * Pixels are walked in tiles of TILE columns, group plane by group plane: each plane's
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

#define TILE 128

/* groupdq bits (streamdet.core.dqflags) */
#define DO_NOT_USE 1u
#define SATURATED 2u
#define JUMP_DET 4u
#define UNUSABLE (SATURATED | DO_NOT_USE)

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

/* 1 when x is a number (also infinite), 0 when NaN; on the bits, for vectorisation. */
static inline int32_t is_number(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (bits & 0x7fffffffu) <= 0x7f800000u;
}

/* The last word on a run of groups' JUMP_DET bits before the neighbour flagging: they
 * are counted (when count), then removed from groups that are unusable.  Returns the
 * count. */
static int64_t settle(uint8_t *restrict q, int64_t n, int count)
{
    int64_t jumps = 0;
    for (int64_t c = 0; c < n; c++) {
        const uint8_t v = q[c];
        if (v & JUMP_DET) {
            jumps++;
            if (v & UNUSABLE)
                q[c] = (uint8_t)(v & ~JUMP_DET);
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
    float *restrict out, int64_t *restrict n_valid, float *restrict buf, const int64_t stride)
{
    const int64_t ndiffs = ngroups - 1, width = nints * ndiffs;
    float prev[TILE];
    int32_t nv[TILE];
    for (int64_t r = 0; r < nrows; r++) {
        for (int64_t c0 = 0; c0 < ncols; c0 += TILE) {
            const int64_t n = min64(TILE, ncols - c0);
            const float *g = gain + r * gs0 + c0;
            for (int64_t c = 0; c < n; c++)
                nv[c] = 0;
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
                        nv[c] += is_number(d);
                    }
                }
            }
            float *o = out + (r * ncols + c0) * width;
            for (int64_t c = 0; c < n; c++)
                for (int64_t j = 0; j < width; j++)
                    o[c * width + j] = buf[j * stride + c];
            for (int64_t c = 0; c < n; c++)
                n_valid[r * ncols + c0 + c] = nv[c];
        }
    }
}

/* First differences in electrons, pixel-major: out[p * nints*ndiffs + i*ndiffs + d]
 * for pixel p = row*ncols + col, with NaN for unusable ones, and per pixel the count of
 * non-NaN differences.  A tile's differences are made plane by plane into a scratch
 * buffer and then transposed, so that both the reads and the writes of the arrays run
 * along memory.  Returns 0, or -1 when the scratch buffer cannot be had. */
int64_t jump_pixel_major_diffs(
    const float *restrict data, int64_t ds0, int64_t ds1, int64_t ds2,
    const uint8_t *restrict dq, int64_t qs0, int64_t qs1, int64_t qs2,
    const float *restrict gain, int64_t gs0,
    int64_t nints, int64_t ngroups, int64_t nrows, int64_t ncols,
    float *restrict out, int64_t *restrict n_valid)
{
    /* the scratch buffer's rows are padded by a cache line: the transpose reads down its
     * columns, which at a power-of-two row length would crowd a few cache sets (measured:
     * a fifth slower) */
    const int64_t pad = 64 / (int64_t)sizeof(float);
    const int64_t stride = min64(TILE, ncols) + pad;
    float *buf = malloc(sizeof(float) * (size_t)(stride * nints * (ngroups - 1)));
    if (!buf)
        return -1;
    if (ncols >= TILE)
        pixel_major_diffs(data, ds0, ds1, ds2, dq, qs0, qs1, qs2, gain, gs0,
                          nints, ngroups, nrows, ncols, out, n_valid, buf, TILE + pad);
    else
        pixel_major_diffs(data, ds0, ds1, ds2, dq, qs0, qs1, qs2, gain, gs0,
                          nints, ngroups, nrows, ncols, out, n_valid, buf, stride);
    free(buf);
    return 0;
}

/* One pass over a block's differences with each pixel's median known:
 *
 * - significance |diff - median| / sigma (double, as stcal computes it) of the
 *   differences that pass a float screen, |diff - (float)median| > screen_factor *
 *   (float)sigma with screen_factor = screen_limit less 0.1 % (rounded to float), and
 *   then exceed screen_limit.  The screen is a superset of the exact test: its rounding
 *   is orders of magnitude below the margin for any median a 16-bit ramp can have; it
 *   spares the division for all but a few differences;
 * - of those, single-pass jumps (above jump_limit and finite: an infinite significance
 *   means an infinite difference, which stcal does not count as usable; jump_limit is
 *   infinite outside the single-pass search) get JUMP_DET, and neighbour sources (strictly
 *   between nb_lo and nb_hi, when flag_nb) are appended to ``sources`` as flat indices
 *   into the band's [nints, ndiffs, band_nrows, band_ncols] (the block starting at row
 *   r0, column c0_block);
 * - when after0 is given, after-jump candidates: after{0,1}[i,d,r,c] = diff - median >=
 *   after_level{0,1} (both arrays share the strides as0..as2);
 * - when settle_flags, every group of the block is settled (see settle()), counting
 *   JUMP_DET in the rows where counted[r] is nonzero.
 *
 * result[0] = number of sources written, result[1] = JUMP_DET count.
 * ``sources`` must hold one entry per difference of the block. */
void jump_scan(
    const double *restrict median, const double *restrict noise_floor, int64_t fs0,
    const float *restrict data, int64_t ds0, int64_t ds1, int64_t ds2,
    uint8_t *restrict dq, int64_t qs0, int64_t qs1, int64_t qs2,
    const float *restrict gain, int64_t gs0,
    int64_t nints, int64_t ngroups, int64_t nrows, int64_t ncols,
    float screen_factor, double screen_limit, double jump_limit,
    int64_t flag_nb, double nb_lo, double nb_hi,
    uint8_t *restrict after0, uint8_t *restrict after1, int64_t as0, int64_t as1, int64_t as2,
    double after_level0, double after_level1,
    int64_t settle_flags, const uint8_t *restrict counted,
    int64_t *restrict sources, int64_t r0, int64_t c0_block, int64_t band_nrows,
    int64_t band_ncols, int64_t *restrict result)
{
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
                                q[c] |= JUMP_DET;
                                bits |= JUMP_DET;
                            }
                        }
                    }
                    if (settle_flags && (bits & JUMP_DET))
                        n_jumps += settle(q, n, count_row);
                }
            }
        }
    }
    result[0] = n_sources;
    result[1] = n_jumps;
}

/* settle() over every group of a ramp; counted may be NULL (nothing counted). */
int64_t jump_settle(uint8_t *dq, int64_t qs0, int64_t qs1, int64_t qs2,
                    int64_t nints, int64_t ngroups, int64_t nrows, int64_t ncols,
                    const uint8_t *counted)
{
    int64_t n = 0;
    for (int64_t i = 0; i < nints; i++)
        for (int64_t k = 0; k < ngroups; k++)
            for (int64_t r = 0; r < nrows; r++)
                n += settle(dq + i * qs0 + k * qs1 + r * qs2, ncols, counted && counted[r]);
    return n;
}

/* 4-neighbour flagging from sources (flat indices into [nints, ngroups-1, nrows, ncols],
 * difference d being group d+1).  Only sources that are JUMP_DET count, judged before
 * any neighbour is flagged so that flags do not chain; neighbours that are unusable in
 * that group are left alone.  ``sources`` is overwritten. */
void jump_flag_neighbours(uint8_t *dq, int64_t qs0, int64_t qs1, int64_t qs2,
                          int64_t nints, int64_t ngroups, int64_t nrows, int64_t ncols,
                          int64_t *sources, int64_t n_sources)
{
    (void)nints;
    const int64_t plane = nrows * ncols, ndiffs = ngroups - 1;
    int64_t kept = 0;
    for (int64_t s = 0; s < n_sources; s++) {
        const int64_t f = sources[s], p = f % plane, id = f / plane;
        const int64_t i = id / ndiffs, k = id % ndiffs + 1;
        if (dq[i * qs0 + k * qs1 + (p / ncols) * qs2 + p % ncols] & JUMP_DET)
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
                *q |= JUMP_DET;
        }
    }
}
