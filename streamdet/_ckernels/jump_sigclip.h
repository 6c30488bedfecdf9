/* Jump detection's sigma-clip search (streamdet/algorithms/jump.py, _sigma_clip_flag):
 * the iterated median / population-std clip that stcal runs through astropy's sigma_clip
 * when an exposure has many integrations, and the group reset that follows it.
 * groupdq arrays are uint8 [nints, ngroups, nrows, ncols] with the element strides of
 * their first three axes (s_int, s_group, s_row) and contiguous columns. */
#include <stdint.h>

/* diffs: pixel-major float32 differences [npix, nints * ndiffs] of a block of nrows x
 * ncols pixels (as jump_pixel_major_diffs lays them out, NaN where unusable).  Clipped
 * per (pixel, difference) across the integrations when only_use_ints, else per pixel
 * across all its differences, at n_sigma for at most rounds rounds; JUMP_DET is set in
 * groupdq on group d + 1 of every clipped difference d unless that group is SATURATED or
 * DO_NOT_USE.  bounds (may be NULL; for the tests): float64 [rows, 2], each clipped
 * row's last (low, high), rows ordered difference-major ([ndiffs, npix]) when
 * only_use_ints; without them (the step's call) a row whose first round provably keeps
 * everything is not clipped at all, which sets the same flags.  Returns 0, or -1 when
 * scratch memory is not available. */
int64_t jump_sigma_clip(const float *diffs, int64_t nrows, int64_t ncols, int64_t nints,
                        int64_t ndiffs, int64_t only_use_ints, double n_sigma, int64_t rounds,
                        uint8_t *groupdq, int64_t s_int, int64_t s_group, int64_t s_row,
                        double *bounds);

/* Sigma-clip mode's group reset asks, per (integration, group), whether every pixel of
 * the rows selected by rows_used (uint8 per row; NULL: all rows) is JUMP_DET or
 * DO_NOT_USE.  out: uint8 [nints, ngroups]. */
void jump_flagged_everywhere(const uint8_t *groupdq, int64_t s_int, int64_t s_group,
                             int64_t s_row, int64_t nints, int64_t ngroups, int64_t nrows,
                             int64_t ncols, const uint8_t *rows_used, uint8_t *out);
