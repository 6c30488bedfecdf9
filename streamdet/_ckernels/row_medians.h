/* The median of each row's numbers, shared by jump, showers and ramp_fit (row_medians
 * in streamdet/_ckernels/__init__.py).
 *
 * Row p starts at rows + p * row_stride and holds width values; its NaNs are left out.
 * out[p] is ((double)a + (double)b) * 0.5 where a and b are the ((n-1)/2)-th and
 * (n/2)-th smallest of its n numbers (0-based: the two middle ones, the same one when n
 * is odd), NaN when n is 0: exactly what picking the middle of the row sorted by numpy
 * gives (and numpy's median of a float64 row).  The values are found by selection (see
 * row_medians.c; vectorised where the CPU has AVX-512) in scratch memory; the rows
 * themselves are only read.  Returns 0, or -1 when that scratch memory
 * cannot be had. */
#include <stdint.h>

int64_t streamdet_row_medians_f32(const float *rows, int64_t row_stride, int64_t width,
                                  int64_t nrows, double *out);
int64_t streamdet_row_medians_f64(const double *rows, int64_t row_stride, int64_t width,
                                  int64_t nrows, double *out);
