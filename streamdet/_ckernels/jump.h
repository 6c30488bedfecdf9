/* Per-pixel loops of the jump step's two-point search (streamdet/algorithms/jump.py holds
 * the algorithm's description and the numpy parts: the rarely-run iterative search).
 *
 * Layouts: every ramp-shaped array is [nints, ngroups, nrows, ncols], given as a pointer
 * to its first element and the element strides of its first three axes, so the engine's
 * band views need no copy; the column axis must be contiguous (as in any row slice).
 * Images ([nrows, ncols]) likewise take a row stride.  JUMP_DET, SATURATED and
 * DO_NOT_USE are the DQ_* bits of streamdet/core/dqflags.py.
 *
 * Arithmetic mirrors the numpy formulation it replaced, dtype for dtype: electrons and
 * differences are float (numpy float32), medians, sigmas and significances double. */
#include <stdint.h>

/* A block of ramps and its gain: data (float32 DN) and groupdq (uint8) [nints, ngroups,
 * nrows, ncols] with the element strides of their first three axes, gain (float32 e/DN)
 * [nrows, ncols] with its row stride. */
typedef struct {
    const float *data;
    int64_t data_strides[3];
    uint8_t *groupdq;
    int64_t dq_strides[3];
    const float *gain;
    int64_t gain_stride;
    int64_t nints, ngroups, nrows, ncols;
} jump_block;

/* What jump_scan looks for, the same for every block of a band.
 *
 * screen_factor: screen_limit less 0.1 %, rounded to float (see jump_scan); jump_limit:
 * the single-pass threshold (infinite outside the single-pass search); flag_neighbours,
 * neighbour_low, neighbour_high: neighbour sources are JUMP_DET candidates whose
 * significance lies strictly between the two; after0/after1 (see jump_scan) share the
 * element strides after_strides; after_level0/1: the after-jump thresholds in electrons;
 * settle_flags: settle every group (see jump_settle); band_nrows, band_ncols: the band's
 * shape, into which the sources are flat indices. */
typedef struct {
    float screen_factor;
    double screen_limit;
    double jump_limit;
    int64_t flag_neighbours;
    double neighbour_low, neighbour_high;
    int64_t after_strides[3];
    double after_level0, after_level1;
    int64_t settle_flags;
    int64_t band_nrows, band_ncols;
} jump_scan_params;

/* First differences in electrons of a block, pixel-major: out[p * nints*ndiffs +
 * i*ndiffs + d] for pixel p = row*ncols + col, NaN where either group is SATURATED or
 * DO_NOT_USE.  Returns 0, or -1 when its scratch buffer cannot be had. */
int64_t jump_pixel_major_diffs(const jump_block *block, float *out);

/* One pass over a block's differences, each pixel's median (double, pixel-major) and
 * noise floor (rn_e**2 / nframes, [nrows, ncols] with row stride noise_stride) known:
 *
 * - significance |diff - median| / sigma (double, as stcal computes it), sigma =
 *   sqrt(|median| + noise floor) (0 means unknown: nothing is significant), of the
 *   differences that pass a float screen, |diff - (float)median| > screen_factor *
 *   (float)sigma, and then exceed screen_limit.  The screen is a superset of the exact
 *   test (its rounding is orders of magnitude below the 0.1 % margin for any median a
 *   16-bit ramp can have) and spares the division for all but a few differences;
 * - of those, single-pass jumps (above jump_limit and finite) get JUMP_DET, and
 *   neighbour sources are appended to sources (one entry per difference of the block
 *   must fit) as flat indices into the band's [nints, ndiffs, band_nrows, band_ncols],
 *   the block starting at band row row0 and column col0;
 * - when after0 is not NULL, after-jump candidates: after{0,1}[i, d, r, c] = diff -
 *   median >= after_level{0,1};
 * - when settle_flags, every group of the block is settled (jump_settle), JUMP_DET being
 *   counted in the rows where counted[r] is nonzero.
 *
 * result[0] = number of sources written, result[1] = JUMP_DET count. */
void jump_scan(const jump_block *block, const jump_scan_params *params,
               const double *median, const double *noise_floor, int64_t noise_stride,
               uint8_t *after0, uint8_t *after1, const uint8_t *counted,
               int64_t *sources, int64_t row0, int64_t col0, int64_t *result);

/* Over every group of a ramp (only groupdq and the shape of block are used): JUMP_DET is
 * counted in the rows where counted[r] is nonzero (counted may be NULL: nothing counted),
 * then removed from groups that are SATURATED or DO_NOT_USE.  Returns the count. */
int64_t jump_settle(const jump_block *block, const uint8_t *counted);

/* 4-neighbour flagging from sources (flat indices into [nints, ngroups-1, nrows, ncols],
 * difference d being group d+1; only groupdq and the shape of block are used).  Only
 * sources that are JUMP_DET count, judged before any neighbour is flagged so that flags
 * do not chain; neighbours that are SATURATED or DO_NOT_USE in that group are left
 * alone.  sources is overwritten. */
void jump_flag_neighbours(const jump_block *block, int64_t *sources, int64_t n_sources);
