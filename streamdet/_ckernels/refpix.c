/* The declarations and what the function does: refpix.h */
#include "refpix.h"

__attribute__((target_clones("avx2", "default")))
void streamdet_refpix_apply(float *ramp, int64_t ngroups, int64_t nrows, int64_t ncols,
                            int64_t gstride, int64_t first_row, const double *corr,
                            int64_t nsets)
{
    const float *g0 = ramp;
    /* the later groups first: they need group 0 as it was */
    for (int64_t g = 1; g < ngroups; g++) {
        for (int64_t y = 0; y < nrows; y++) {
            float *r = ramp + g * gstride + y * ncols;
            const float *f = g0 + y * ncols;
            if (corr) {
                const double *c = corr + ((g - 1) * nsets + (nsets == 2 ? (first_row + y) % 2 : 0)) * ncols;
                for (int64_t x = 0; x < ncols; x++) {
                    float v = r[x] - f[x];
                    v = (float)((double)v - c[x]);
                    r[x] = v + f[x];
                }
            } else {
                for (int64_t x = 0; x < ncols; x++) {
                    float v = r[x] - f[x];
                    r[x] = v + f[x];
                }
            }
        }
    }
    float *first = ramp;
    for (int64_t y = 0; y < nrows; y++)
        for (int64_t x = 0; x < ncols; x++) {
            float f = first[y * ncols + x];
            first[y * ncols + x] = (f - f) + f;
        }
}
