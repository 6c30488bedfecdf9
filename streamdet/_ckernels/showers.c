/* Per-pixel loops of the MIRI shower search (streamdet/plugins/jump_showers.py describes
 * the algorithm).  Arithmetic mirrors stcal 1.20's numpy formulation dtype for dtype:
 * electrons, differences and significances float (numpy float32), the ring average
 * double.  Built with -ffp-contract=off (no fused multiply-add).
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* groupdq / pixeldq bits (streamdet.core.dqflags) */
#define DO_NOT_USE 1u
#define SATURATED 2u
#define JUMP_DET 4u
#define REFERENCE_PIXEL 0x80000000u

/* stcal's shower search sets a group to NaN when its flags are exactly one of
 * DO_NOT_USE, SATURATED, JUMP_DET, JUMP_DET|DO_NOT_USE or SATURATED|DO_NOT_USE (other
 * combinations, e.g. with AD_FLOOR, keep their value): the values 1..5. */
static inline float shower_electrons(float data, uint8_t dq, float gain)
{
    float e = data * gain;
    if ((uint8_t)(dq - 1u) < 5u)
        e = NAN;
    return e;
}

/* First differences in electrons, pixel-major: out[p * nints*ndiffs + i*ndiffs + d] for
 * pixel p = row*ncols + col (NaN where a group is excluded, see above), and per pixel the
 * count of differences that are not NaN. */
void showers_pixel_major_diffs(
    const float *restrict data, int64_t ds0, int64_t ds1, int64_t ds2,
    const uint8_t *restrict dq, int64_t qs0, int64_t qs1, int64_t qs2,
    const float *restrict gain, int64_t gs0,
    int64_t nints, int64_t ngroups, int64_t nrows, int64_t ncols,
    float *restrict out, int64_t *restrict n_valid)
{
    const int64_t ndiffs = ngroups - 1, width = nints * ndiffs;
    for (int64_t r = 0; r < nrows; r++) {
        const float *g = gain + r * gs0;
        for (int64_t c = 0; c < ncols; c++) {
            float *o = out + (r * ncols + c) * width;
            int64_t nv = 0;
            for (int64_t i = 0; i < nints; i++) {
                const float *x = data + i * ds0 + r * ds2 + c;
                const uint8_t *q = dq + i * qs0 + r * qs2 + c;
                float prev = shower_electrons(x[0], q[0], g[c]);
                for (int64_t k = 1; k < ngroups; k++) {
                    const float e = shower_electrons(x[k * ds1], q[k * qs1], g[c]);
                    const float d = e - prev;
                    prev = e;
                    o[i * ndiffs + k - 1] = d;
                    nv += !isnan(d);
                }
            }
            n_valid[r * ncols + c] = nv;
        }
    }
}

/* The significance plane of the difference between groups g-1 (prev) and g (cur) of one
 * integration: |diff - median| / sigma (float), NaN where the difference is excluded or
 * where the shower search masks the pixel: group g or the pixel flagged DO_NOT_USE,
 * SATURATED or JUMP_DET, or a pixel whose only pixel flag is REFERENCE_PIXEL (stcal sets
 * those pixels' groups to DO_NOT_USE for the search).  out is [nrows, ncols]. */
void showers_ratio_plane(
    const float *restrict prev, const float *restrict cur, int64_t ds,
    const uint8_t *restrict qprev, const uint8_t *restrict qcur, int64_t qs,
    const uint32_t *restrict pdq, int64_t ps, const float *restrict gain, int64_t gs,
    const float *restrict median, const float *restrict sigma, int64_t ms,
    int64_t nrows, int64_t ncols, float *restrict out)
{
    for (int64_t r = 0; r < nrows; r++) {
        for (int64_t c = 0; c < ncols; c++) {
            const float gn = gain[r * gs + c];
            const float e0 = shower_electrons(prev[r * ds + c], qprev[r * qs + c], gn);
            const float e1 = shower_electrons(cur[r * ds + c], qcur[r * qs + c], gn);
            const float d = e1 - e0;
            float ratio = fabsf(d - median[r * ms + c]) / sigma[r * ms + c];
            const uint32_t p = pdq[r * ps + c];
            if (((qcur[r * qs + c] | p) & (DO_NOT_USE | SATURATED | JUMP_DET)) || p == REFERENCE_PIXEL)
                ratio = NAN;
            out[r * ncols + c] = ratio;
        }
    }
}

/* The ring average of a significance plane, thresholded: for each pixel of the core rows
 * [core0, core1) of a band of nrows rows (band row 0 is frame row row0 of a frame of
 * frame_ny rows), sum(w * v) / sum(w) over the kernel taps whose value v is finite,
 * positions outside the frame counting as finite zeros (astropy's convolution with a
 * zero fill, as stcal's convolve_fast pads); a pixel is emission when its own value is
 * finite, the weight sum exceeds min_norm and the average exceeds threshold.  out[r, c]
 * (core rows) is 1 or 0; returns the number of emission pixels. */
#define RING(NAME, T)                                                                    \
    int64_t NAME(const T *restrict ratio, int64_t rs, int64_t nrows, int64_t ncols,     \
                 int64_t row0, int64_t frame_ny, int64_t core0, int64_t core1,          \
                 const int64_t *restrict dy, const int64_t *restrict dx,                 \
                 const double *restrict w, int64_t ntaps, double min_norm,              \
                 double threshold, uint8_t *restrict out)                               \
    {                                                                                    \
        int64_t n = 0;                                                                   \
        for (int64_t r = core0; r < core1; r++) {                                        \
            uint8_t *o = out + (r - core0) * ncols;                                      \
            for (int64_t c = 0; c < ncols; c++) {                                        \
                const T self = ratio[r * rs + c];                                        \
                if (!isfinite(self)) {                                                   \
                    o[c] = 0;                                                            \
                    continue;                                                            \
                }                                                                        \
                double sum = 0.0, norm = 0.0;                                            \
                for (int64_t k = 0; k < ntaps; k++) {                                    \
                    const int64_t rr = r + dy[k], cc = c + dx[k];                        \
                    const int64_t fr = row0 + rr;                                        \
                    if (fr < 0 || fr >= frame_ny || cc < 0 || cc >= ncols) {             \
                        norm += w[k];                                                    \
                        continue;                                                        \
                    }                                                                    \
                    if (rr < 0 || rr >= nrows)                                           \
                        continue; /* not reached: the caller gives enough halo rows */  \
                    const T v = ratio[rr * rs + cc];                                     \
                    if (isfinite(v)) {                                                   \
                        sum += w[k] * (double)v;                                         \
                        norm += w[k];                                                    \
                    }                                                                    \
                }                                                                        \
                const int on = norm > min_norm && sum / norm > threshold;                \
                o[c] = (uint8_t)on;                                                      \
                n += on;                                                                 \
            }                                                                            \
        }                                                                                \
        return n;                                                                        \
    }
RING(showers_ring_f32, float)
RING(showers_ring_f64, double)
