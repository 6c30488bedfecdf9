/* The declarations and what the functions do: saturation.h */
#include <string.h>

#include "saturation.h"

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

__attribute__((target_clones("avx2", "default")))
void streamdet_flag_saturation(const float *ramp, uint8_t *dq, const float *limit,
                               uint8_t *work, const saturation_params *params)
{
    const int64_t ngroups = params->ngroups, nrows = params->nrows, ncols = params->ncols;
    const int64_t gstride = params->gstride, n_grow = params->n_grow;
    const uint8_t saturated = DQ_SATURATED, floor_bits = DQ_AD_FLOOR | DQ_DO_NOT_USE;
    const float *bias = params->bias;
    const float bias_f = params->bias_f;
    const double bias_d = params->bias_d, mean0 = params->mean0, last2 = params->last2;
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
    if (!params->use_pattern || ngroups <= 2)
        return;
    const float *g0 = ramp, *g1 = ramp + gstride;
    const uint8_t *d2 = dq + 2 * gstride;
    uint8_t *d1 = dq + gstride;
    const float divisor = (float)params->n1;
    for (int64_t p = 0; p < plane; p++) {
        float b = bias ? bias[p] : bias_f;
        double projected = ((double)(g0[p] - b) / mean0) * last2 + (bias ? (double)b : bias_d);
        int hit = projected < (double)limit[p]
                  && (g1[p] - g0[p]) > (limit[p] - g0[p]) / divisor
                  && (d2[p] & saturated) && !(d1[p] & saturated);
        if (hit)
            d1[p] |= (uint8_t)DQ_DO_NOT_USE;
    }
}
