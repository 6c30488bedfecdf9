/* The median of sorted rows, shared by jump and ramp_fit (sorted_row_medians in
 * streamdet/_ckernels/__init__.py): numpy sorts, this picks.
 *
 * Row p (at ordered + p * row_stride) holds its counts[p * count_stride] valid values
 * first, sorted (NaN sorts last); its median is the mean of the two middle values in
 * double, NaN when it has none. */
#include <stdint.h>

void streamdet_sorted_row_medians_f32(const float *ordered, int64_t row_stride,
                                      int64_t width, const int64_t *counts,
                                      int64_t count_stride, int64_t nrows, double *out);
void streamdet_sorted_row_medians_f64(const double *ordered, int64_t row_stride,
                                      int64_t width, const int64_t *counts,
                                      int64_t count_stride, int64_t nrows, double *out);
