/* Per-pixel loops of the MIRI shower search (streamdet/algorithms/showers.py describes
 * the algorithm).  Arithmetic mirrors stcal 1.20's numpy formulation dtype for dtype:
 * electrons, differences and significances float (numpy float32), the ring average
 * double.  DO_NOT_USE, SATURATED, JUMP_DET and REFERENCE_PIXEL are the DQ_* bits of
 * streamdet/core/dqflags.py.
 *
 * stcal's shower search excludes a group (NaN) when its flags are exactly one of
 * DO_NOT_USE, SATURATED, JUMP_DET, JUMP_DET|DO_NOT_USE or SATURATED|DO_NOT_USE (other
 * combinations, e.g. with AD_FLOOR, keep their value). */
#include <stdint.h>

/* A band of ramps and its gain: data (float32 DN) and groupdq (uint8) [nints, ngroups,
 * nrows, ncols] with the element strides of their first three axes, gain (float32 e/DN)
 * [nrows, ncols] with its row stride. */
typedef struct {
    const float *data;
    int64_t data_strides[3];
    const uint8_t *groupdq;
    int64_t dq_strides[3];
    const float *gain;
    int64_t gain_stride;
    int64_t nints, ngroups, nrows, ncols;
} showers_block;

/* First differences in electrons of a band, pixel-major: out[p * nints*ndiffs + i*ndiffs
 * + d] for pixel p = row*ncols + col (NaN where a group is excluded). */
void showers_pixel_major_diffs(const showers_block *block, float *out);

/* One integration's groups g-1 (prev) and g (cur) over a band's rows, with the pixel
 * flags, the gain and the per-pixel median and sigma of the differences: every plane is
 * [nrows, ncols] with a row stride (prev and cur share data_stride, their flags
 * dq_stride, median and sigma stats_stride). */
typedef struct {
    const float *prev, *cur;
    int64_t data_stride;
    const uint8_t *dq_prev, *dq_cur;
    int64_t dq_stride;
    const uint32_t *pixeldq;
    int64_t pixeldq_stride;
    const float *gain;
    int64_t gain_stride;
    const float *median, *sigma;
    int64_t stats_stride;
    int64_t nrows, ncols;
} showers_difference;

/* The significance plane of a difference: |diff - median| / sigma (float), NaN where the
 * difference is excluded or where the shower search masks the pixel: group g or the
 * pixel flagged DO_NOT_USE, SATURATED or JUMP_DET, or a pixel whose only pixel flag is
 * REFERENCE_PIXEL (stcal sets those pixels' groups to DO_NOT_USE for the search).  out
 * is [nrows, ncols], contiguous. */
void showers_ratio_plane(const showers_difference *difference, float *out);

/* The ring kernel and the emission threshold.  The kernel's weights are all equal
 * (astropy's ring kernels are), weight.  Its taps come as rows: tap row t (of
 * n_tap_rows) has row offset row_dy[t] and the column offsets dx[first[s] ..
 * first[s+1]-1] of the set s = set_of[t], shared by the rows with the same offsets (the
 * ring is symmetric); there are n_sets sets, first has n_sets + 1 entries.  An average
 * whose weight sum is at most min_norm is undefined; emission needs an average above
 * threshold. */
typedef struct {
    const int64_t *row_dy;
    const int64_t *set_of;
    int64_t n_tap_rows;
    const int64_t *first;
    const int64_t *dx;
    int64_t n_sets;
    double weight;
    double min_norm;
    double threshold;
} showers_ring_params;

/* The ring average of a significance plane, thresholded: for each pixel of the core rows
 * [core0, core1) of a band of nrows rows (ratio, row stride rs; band row 0 is frame row
 * row0 of a frame of frame_ny rows), sum(w * v) / sum(w) over the kernel taps whose
 * value v is finite, positions outside the frame counting as finite zeros (astropy's
 * convolution with a zero fill, as stcal's convolve_fast pads); a pixel is emission
 * when its own value is finite, the weight sum exceeds min_norm and the average exceeds
 * threshold.  out[r, c] (core rows, contiguous) is 1 or 0; returns the number of
 * emission pixels, or -1 when out of memory.  At most 65535 taps (16-bit counts). */
int64_t showers_ring_f32(const float *ratio, int64_t rs, int64_t nrows, int64_t ncols,
                         int64_t row0, int64_t frame_ny, int64_t core0, int64_t core1,
                         const showers_ring_params *ring, uint8_t *out);
int64_t showers_ring_f64(const double *ratio, int64_t rs, int64_t nrows, int64_t ncols,
                         int64_t row0, int64_t frame_ny, int64_t core0, int64_t core1,
                         const showers_ring_params *ring, uint8_t *out);
