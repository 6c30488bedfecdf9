/* The classical non-linearity polynomial of one integration (streamdet/algorithms/
 * linearity.py holds the rules).
 *
 * ramp    float32 [ngroups][plane] (in place), group stride `gstride` elements, each
 *         group plane (nrows * ncols = `plane` values) contiguous
 * dq      uint8, the same layout and strides; groups with DQ_SATURATED keep their value
 * coeffs  float32 [ncoeffs][plane], coefficient stride `cstride`, planes contiguous
 *
 * Horner's scheme in float32 with every product and sum rounded on its own, which is
 * what the numpy formulation (and stcal) computes. */
#include <stdint.h>

void streamdet_linearity(float *ramp, const uint8_t *dq, const float *coeffs,
                         int64_t ncoeffs, int64_t ngroups, int64_t plane, int64_t gstride,
                         int64_t cstride);
