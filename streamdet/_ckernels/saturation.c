/* Saturation and A/D-floor flagging of one integration (see streamdet/plugins/saturation.py
 * for the rules and their jwst/stcal origin).
 *
 * ramp   float32 [ngroups][nrows][ncols], group stride `gstride` elements, rows contiguous
 * dq     uint8, the same layout and strides (updated in place)
 * limit  float32 [nrows][ncols] contiguous: the effective threshold
 * work   uint8 scratch of 3 * nrows * ncols bytes (the caller's, reused between calls)
 * The DQ bits come from the caller (streamdet.core.dqflags is their one definition):
 * `saturated`, `floor_bits` (AD_FLOOR | DO_NOT_USE) and `do_not_use`.
 */
#include <stdint.h>
#include <string.h>

/* out = in dilated by a (2n+1) x (2n+1) square; outside the plane counts as clear.
 * `out` may be `in`; `wide` is scratch of the plane's size. */
__attribute__((target_clones("avx2", "default")))
void streamdet_grow_mask(const uint8_t *in, uint8_t *wide, uint8_t *out, int64_t nrows,
                         int64_t ncols, int64_t n)
{
    /* separable, as shifted ORs that the compiler vectorizes: along x, then along y */
    for (int64_t y = 0; y < nrows; y++) {
        const uint8_t *m = in + y * ncols;
        uint8_t *w = wide + y * ncols;
        memcpy(w, m, (size_t)ncols);
        for (int64_t k = 1; k <= n && k < ncols; k++) {
            for (int64_t x = k; x < ncols; x++)
                w[x] |= m[x - k];
            for (int64_t x = 0; x < ncols - k; x++)
                w[x] |= m[x + k];
        }
    }
    for (int64_t y = 0; y < nrows; y++) {
        int64_t y0 = y - n < 0 ? 0 : y - n, y1 = y + n >= nrows ? nrows - 1 : y + n;
        uint8_t *o = out + y * ncols;
        memcpy(o, wide + y0 * ncols, (size_t)ncols);
        for (int64_t k = y0 + 1; k <= y1; k++) {
            const uint8_t *w = wide + k * ncols;
            for (int64_t x = 0; x < ncols; x++)
                o[x] |= w[x];
        }
    }
}

/* Threshold (sticky along the groups), grown by n_grow pixels, then the A/D floor.
 * With use_pattern, also the group-2 test: group index 1 gets DO_NOT_USE where group 2
 * is saturated and group 1 is not, group 0 extrapolated to the last frame of group 2
 * (float64: (first - bias) / mean0 * last2 + bias) stays below threshold, and
 * group1 - group0 exceeds (threshold - group0) / n1 (float32).  `bias` is a float32
 * [nrows][ncols] frame, or NULL for the scalar bias (bias_f in the float32 subtraction,
 * bias_d in the float64 addition, as numpy promotes a Python float). */
__attribute__((target_clones("avx2", "default")))
void streamdet_flag_saturation(const float *ramp, uint8_t *dq, const float *limit,
                               int64_t ngroups, int64_t nrows, int64_t ncols, int64_t gstride,
                               int64_t n_grow, int64_t saturated, int64_t floor_bits,
                               int64_t do_not_use, int64_t use_pattern, double mean0,
                               double last2, int64_t n1, const float *bias, float bias_f,
                               double bias_d, uint8_t *work)
{
    const int64_t plane = nrows * ncols;
    uint8_t *sticky = work, *mask = work + plane, *wide = work + 2 * plane;
    memset(sticky, 0, (size_t)plane);
    for (int64_t g = 0; g < ngroups; g++) {
        const float *r = ramp + g * gstride;
        uint8_t *d = dq + g * gstride;
        /* separate simple loops: each vectorizes, a fused one does not */
        for (int64_t p = 0; p < plane; p++)
            sticky[p] |= (uint8_t)(r[p] >= limit[p]);
        /* flags the group already had take part in the growing, but do not stick */
        uint8_t any = 0;
        for (int64_t p = 0; p < plane; p++) {
            mask[p] = sticky[p] | (uint8_t)((d[p] & saturated) != 0);
            any |= mask[p];
        }
        if (any) {
            if (n_grow > 0)
                streamdet_grow_mask(mask, wide, mask, nrows, ncols, n_grow);
            for (int64_t p = 0; p < plane; p++)
                d[p] |= (uint8_t)(mask[p] ? saturated : 0);
        }
        /* the A/D floor marks this group only: never grown */
        for (int64_t p = 0; p < plane; p++)
            d[p] |= (uint8_t)(r[p] <= 0.0f ? floor_bits : 0);
    }
    if (!use_pattern || ngroups <= 2)
        return;
    const float *g0 = ramp, *g1 = ramp + gstride;
    const uint8_t *d2 = dq + 2 * gstride;
    uint8_t *d1 = dq + gstride;
    const float divisor = (float)n1;
    for (int64_t p = 0; p < plane; p++) {
        float b = bias ? bias[p] : bias_f;
        double projected = ((double)(g0[p] - b) / mean0) * last2 + (bias ? (double)b : bias_d);
        int hit = projected < (double)limit[p]
                  && (g1[p] - g0[p]) > (limit[p] - g0[p]) / divisor
                  && (d2[p] & saturated) && !(d1[p] & saturated);
        if (hit)
            d1[p] |= (uint8_t)do_not_use;
    }
}
