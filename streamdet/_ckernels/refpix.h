/* Applying measured reference-pixel drift corrections to rows of one integration
 * (streamdet/algorithms/refpix.py, apply_reference_drift).
 *
 * ramp   float32 [ngroups][nrows][ncols] (in place), group stride `gstride` elements,
 *        each group plane contiguous; its row 0 is row `first_row` of the frame
 * corr   float64 [ngroups - 1][nsets][ncols]: the row to subtract from each group after
 *        the first, for even and odd frame rows (nsets 2) or all rows (nsets 1); NULL
 *        when nothing is corrected (group 0 is still subtracted and added back)
 *
 * Every group after the first becomes ((x - g0) - c) + g0 with float32 roundings (c
 * applied in float64 and rounded once, which is the float32 result for a float32 c);
 * group 0 becomes (g0 - g0) + g0: NaN where g0 is infinite, as in jwst. */
#include <stdint.h>

void streamdet_refpix_apply(float *ramp, int64_t ngroups, int64_t nrows, int64_t ncols,
                            int64_t gstride, int64_t first_row, const double *corr,
                            int64_t nsets);
