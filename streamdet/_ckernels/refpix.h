/* refpix (streamdet/algorithms/refpix.py): measuring the reference levels of one
 * integration (measure_reference_drift) and applying them to rows (apply_reference_drift).
 */
#include <stdint.h>

/* The reference-level corrections of one integration, bit for bit as numpy computes
 * jwst's formulation of them.
 *
 * columns  float32 [ngroups][nrows][>= 8]: the 8 reference columns (left 0-3, right
 *          0-3, one per amplifier) of every row and group, element strides s_group and
 *          s_row, the 8 columns contiguous
 * usable   uint8 [nrows][8]: nonzero where the pixel may be used (no DO_NOT_USE); every
 *          (row set, column) must have at least one usable pixel
 * nsets    2: even rows and odd rows measured apart; 1: all rows together
 * siglimit the sigma-clip limit on both sides, rounded to float32 and the bounds
 *          computed in float32, or (wide_limit nonzero) used and computed in float64
 * corr     float64 [ngroups - 1][nsets][ncols] out: for each group after the first and
 *          each row set, the row to subtract (column c from amplifier c % 4)
 *
 * For each group g >= 1, set and column, the sample is (columns[g] - columns[0]) over
 * the usable rows of the set, in row order; its level is the mean that
 * scipy.stats.sigmaclip(sample, siglimit, siglimit) keeps (float32 pairwise sums, as
 * numpy's mean and std), or, for a sample whose values are all equal and finite, the
 * float64 mean (that value).  A correction is 0.5 * (left + right) in float32, or in
 * float64 when either side is a float64 mean.
 *
 * Returns 1 when some correction was computed in float64, 0 when all are float32
 * values, -1 when no scratch memory was available (corr is then incomplete). */
int64_t streamdet_refpix_measure(const float *columns, int64_t ngroups, int64_t nrows,
                                 int64_t s_group, int64_t s_row, const uint8_t *usable,
                                 int64_t nsets, double siglimit, int64_t wide_limit,
                                 int64_t ncols, double *corr);

/* Applying measured corrections to rows of one integration.
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
void streamdet_refpix_apply(float *ramp, int64_t ngroups, int64_t nrows, int64_t ncols,
                            int64_t gstride, int64_t first_row, const double *corr,
                            int64_t nsets);
