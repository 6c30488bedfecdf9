/* Classical non-linearity polynomial of one integration (see
 * streamdet/plugins/linearity.py).
 *
 * ramp    float32 [ngroups][nrows][ncols] (in place), group stride `gstride` elements,
 *         each group plane contiguous
 * dq      uint8, the same layout and strides; groups with `saturated` set keep their value
 * coeffs  float32 [ncoeffs][nrows][ncols], coefficient stride `cstride`, planes contiguous
 *
 * Horner's scheme in float32 with every product and sum rounded on its own, which is
 * what the numpy formulation (and stcal) computes.
 */
#include <stdint.h>

__attribute__((target_clones("avx2", "default")))
void streamdet_linearity(float *ramp, const uint8_t *dq, const float *coeffs,
                         int64_t ncoeffs, int64_t ngroups, int64_t plane, int64_t gstride,
                         int64_t cstride, int64_t saturated)
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
            if (!(d[p] & saturated))
                r[p] = out;
        }
    }
}
