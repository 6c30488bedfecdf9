/* The declarations and what the function does: linearity.h */
#include "linearity.h"

__attribute__((target_clones("avx2", "default")))
void streamdet_linearity(float *ramp, const uint8_t *dq, const float *coeffs,
                         int64_t ncoeffs, int64_t ngroups, int64_t plane, int64_t gstride,
                         int64_t cstride)
{
    const float *top = coeffs + (ncoeffs - 1) * cstride;
    for (int64_t g = 0; g < ngroups; g++) {
        float *r = ramp + g * gstride;
        const uint8_t *d = dq + g * gstride;
        for (int64_t p = 0; p < plane; p++) {
            float x = r[p], out = top[p] * x;
            for (int64_t k = ncoeffs - 2; k > 0; k--) {
                out = out + coeffs[k * cstride + p];
                out = out * x;
            }
            out = out + coeffs[p];
            if (!(d[p] & DQ_SATURATED))
                r[p] = out;
        }
    }
}
