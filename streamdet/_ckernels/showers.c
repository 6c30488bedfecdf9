/* Per-pixel loops of the MIRI shower search (declared in showers.h). Built with
 * -ffp-contract=off (no fused multiply-add). */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "showers.h"

/* A group's value in electrons, NaN when showers.h's rule excludes it: its flags are one
 * of the values 1..5 (DO_NOT_USE, SATURATED and JUMP_DET being the bits 1, 2 and 4). */
#if DQ_DO_NOT_USE != 1 || DQ_SATURATED != 2 || DQ_JUMP_DET != 4
#error "shower_electrons relies on DO_NOT_USE, SATURATED and JUMP_DET being bits 1, 2, 4"
#endif
static inline float shower_electrons(float data, uint8_t dq, float gain)
{
    float e = data * gain;
    if ((uint8_t)(dq - 1u) < 5u)
        e = NAN;
    return e;
}

/* (showers.h) */
void showers_pixel_major_diffs(const showers_block *block, float *restrict out)
{
    const float *restrict data = block->data, *restrict gain = block->gain;
    const uint8_t *restrict dq = block->groupdq;
    const int64_t ds0 = block->data_strides[0], ds1 = block->data_strides[1],
                  ds2 = block->data_strides[2];
    const int64_t qs0 = block->dq_strides[0], qs1 = block->dq_strides[1],
                  qs2 = block->dq_strides[2];
    const int64_t gs0 = block->gain_stride;
    const int64_t nints = block->nints, ngroups = block->ngroups, nrows = block->nrows,
                  ncols = block->ncols;
    const int64_t ndiffs = ngroups - 1, width = nints * ndiffs;
    for (int64_t r = 0; r < nrows; r++) {
        const float *g = gain + r * gs0;
        for (int64_t c = 0; c < ncols; c++) {
            float *o = out + (r * ncols + c) * width;
            for (int64_t i = 0; i < nints; i++) {
                const float *x = data + i * ds0 + r * ds2 + c;
                const uint8_t *q = dq + i * qs0 + r * qs2 + c;
                float prev = shower_electrons(x[0], q[0], g[c]);
                for (int64_t k = 1; k < ngroups; k++) {
                    const float e = shower_electrons(x[k * ds1], q[k * qs1], g[c]);
                    const float d = e - prev;
                    prev = e;
                    o[i * ndiffs + k - 1] = d;
                }
            }
        }
    }
}

/* (showers.h) */
void showers_ratio_plane(const showers_difference *in, float *restrict out)
{
    const float *restrict prev = in->prev, *restrict cur = in->cur;
    const uint8_t *restrict qprev = in->dq_prev, *restrict qcur = in->dq_cur;
    const uint32_t *restrict pdq = in->pixeldq;
    const float *restrict gain = in->gain, *restrict median = in->median,
                *restrict sigma = in->sigma;
    const int64_t ds = in->data_stride, qs = in->dq_stride, ps = in->pixeldq_stride,
                  gs = in->gain_stride, ms = in->stats_stride;
    const int64_t nrows = in->nrows, ncols = in->ncols;
    for (int64_t r = 0; r < nrows; r++) {
        for (int64_t c = 0; c < ncols; c++) {
            const float gn = gain[r * gs + c];
            const float e0 = shower_electrons(prev[r * ds + c], qprev[r * qs + c], gn);
            const float e1 = shower_electrons(cur[r * ds + c], qcur[r * qs + c], gn);
            const float d = e1 - e0;
            float ratio = fabsf(d - median[r * ms + c]) / sigma[r * ms + c];
            const uint32_t p = pdq[r * ps + c];
            if (((qcur[r * qs + c] | p) & (DQ_DO_NOT_USE | DQ_SATURATED | DQ_JUMP_DET)) || p == DQ_REFERENCE_PIXEL)
                ratio = NAN;
            out[r * ncols + c] = ratio;
        }
    }
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define HOT __attribute__((target_clones("avx2", "default")))
#else
#define HOT
#endif

/* (showers.h) Each band row's values (0 where not finite) and finite counts (16-bit) are
 * summed over each column set once, then the core rows add up their tap rows: the same
 * sums, in another order than stcal's FFT convolution, whose own rounding is of the same
 * order (1e-16 relative).  Rows beyond the frame are a padding row of counted zeros. */
#define RING(NAME, T)                                                                    \
    HOT int64_t NAME(const T *restrict ratio, int64_t rs, int64_t nrows, int64_t ncols, \
                     int64_t row0, int64_t frame_ny, int64_t core0, int64_t core1,      \
                     const showers_ring_params *ring, uint8_t *restrict out)            \
    {                                                                                    \
        const int64_t *restrict row_dy = ring->row_dy, *restrict set_of = ring->set_of; \
        const int64_t *restrict first = ring->first, *restrict dx = ring->dx;           \
        const int64_t nrows_k = ring->n_tap_rows, nsets = ring->n_sets;                 \
        const double w = ring->weight, min_norm = ring->min_norm;                       \
        const double threshold = ring->threshold;                                       \
        int64_t pad = 0, halo = 0;                                                       \
        for (int64_t k = 0; k < first[nsets]; k++)                                       \
            pad = dx[k] > pad ? dx[k] : (-dx[k] > pad ? -dx[k] : pad);                   \
        for (int64_t t = 0; t < nrows_k; t++)                                            \
            halo = row_dy[t] > halo ? row_dy[t] : (-row_dy[t] > halo ? -row_dy[t] : halo); \
        const int64_t width = ncols + 2 * pad;                                           \
        /* the row sums of the 2*halo+1 band rows a core row reads, in a rolling buffer  \
         * (slot rr mod span), and one more slot for a row beyond the frame */           \
        const int64_t span = 2 * halo + 1, nr = span + 1;                                \
        double *val = malloc(sizeof(double) * (size_t)width);                            \
        uint16_t *cnt = malloc(sizeof(uint16_t) * (size_t)width);                        \
        double *hv = malloc(sizeof(double) * (size_t)(nsets * nr * ncols));              \
        uint16_t *hc = malloc(sizeof(uint16_t) * (size_t)(nsets * nr * ncols));         \
        double *sum = malloc(sizeof(double) * (size_t)ncols);                            \
        uint16_t *norm = malloc(sizeof(uint16_t) * (size_t)ncols);                       \
        if (!val || !cnt || !hv || !hc || !sum || !norm) {                               \
            free(val); free(cnt); free(hv); free(hc); free(sum); free(norm);             \
            return -1;                                                                   \
        }                                                                                \
        int64_t n = 0;                                                                   \
        /* rr == nrows stands for the padding row (computed first, into slot span) */    \
        for (int64_t rr = core0 - halo - 1; rr < core1 + halo; rr++) {                   \
            const int pad_row = rr == core0 - halo - 1;                                  \
            const int64_t fr = row0 + rr;                                                \
            const int inside = !pad_row && rr >= 0 && rr < nrows && fr >= 0 && fr < frame_ny; \
            const int64_t slot = pad_row ? span : ((rr % span) + span) % span;           \
            if (pad_row || inside) {                                                     \
                for (int64_t c = 0; c < width; c++) {                                    \
                    val[c] = 0.0;                                                        \
                    cnt[c] = 1;                                                          \
                }                                                                        \
                if (inside) {                                                            \
                    const T *x = ratio + rr * rs;                                        \
                    for (int64_t c = 0; c < ncols; c++) {                                \
                        const int fin = isfinite(x[c]);                                  \
                        val[pad + c] = fin ? (double)x[c] : 0.0;                         \
                        cnt[pad + c] = (uint16_t)fin;                                     \
                    }                                                                    \
                }                                                                        \
                for (int64_t t = 0; t < nsets; t++) {                                    \
                    double *restrict sv = hv + (t * nr + slot) * ncols;                  \
                    uint16_t *restrict sc = hc + (t * nr + slot) * ncols;                 \
                    for (int64_t c = 0; c < ncols; c++) {                                \
                        sv[c] = 0.0;                                                     \
                        sc[c] = 0;                                                       \
                    }                                                                    \
                    for (int64_t k = first[t]; k < first[t + 1]; k++) {                  \
                        const double *restrict v = val + pad + dx[k];                    \
                        for (int64_t c = 0; c < ncols; c++)                              \
                            sv[c] += v[c];                                               \
                        const uint16_t *restrict g = cnt + pad + dx[k];                   \
                        for (int64_t c = 0; c < ncols; c++)                              \
                            sc[c] = (uint16_t)(sc[c] + g[c]);                             \
                    }                                                                    \
                }                                                                        \
            }                                                                            \
            const int64_t r = rr - halo; /* the core row whose rows are all in now */    \
            if (pad_row || r < core0)                                                    \
                continue;                                                                \
            for (int64_t c = 0; c < ncols; c++) {                                        \
                sum[c] = 0.0;                                                            \
                norm[c] = 0;                                                             \
            }                                                                            \
            for (int64_t t = 0; t < nrows_k; t++) {                                      \
                const int64_t q = r + row_dy[t], fq = row0 + q;                          \
                const int64_t j = (fq < 0 || fq >= frame_ny || q < 0 || q >= nrows)      \
                                      ? span : ((q % span) + span) % span;               \
                const double *restrict sv = hv + (set_of[t] * nr + j) * ncols;           \
                const uint16_t *restrict sc = hc + (set_of[t] * nr + j) * ncols;          \
                for (int64_t c = 0; c < ncols; c++)                                      \
                    sum[c] += sv[c];                                                     \
                for (int64_t c = 0; c < ncols; c++)                                      \
                    norm[c] = (uint16_t)(norm[c] + sc[c]);                                \
            }                                                                            \
            const T *x = ratio + r * rs;                                                 \
            uint8_t *o = out + (r - core0) * ncols;                                      \
            for (int64_t c = 0; c < ncols; c++) {                                        \
                const double nw = (double)norm[c] * w;                                   \
                const int on = isfinite(x[c]) && nw > min_norm                           \
                               && (sum[c] * w) / nw > threshold;                         \
                o[c] = (uint8_t)on;                                                      \
                n += on;                                                                 \
            }                                                                            \
        }                                                                                \
        free(val); free(cnt); free(hv); free(hc); free(sum); free(norm);                 \
        return n;                                                                        \
    }
RING(showers_ring_f32, float)
RING(showers_ring_f64, double)
