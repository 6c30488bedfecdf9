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

/* First differences in electrons, pixel-major: out[p * nints*ndiffs + i*ndiffs + d] for
 * pixel p = row*ncols + col (NaN where a group is excluded), and per pixel the count of
 * differences that are not NaN.  data (float32) and dq (uint8) are [nints, ngroups,
 * nrows, ncols] with the element strides of their first three axes, gain [nrows, ncols]
 * with its row stride. */
void showers_pixel_major_diffs(
    const float *data, int64_t ds0, int64_t ds1, int64_t ds2,
    const uint8_t *dq, int64_t qs0, int64_t qs1, int64_t qs2,
    const float *gain, int64_t gs0,
    int64_t nints, int64_t ngroups, int64_t nrows, int64_t ncols,
    float *out, int64_t *n_valid);

/* The significance plane of the difference between groups g-1 (prev) and g (cur) of one
 * integration: |diff - median| / sigma (float), NaN where the difference is excluded or
 * where the shower search masks the pixel: group g or the pixel flagged DO_NOT_USE,
 * SATURATED or JUMP_DET, or a pixel whose only pixel flag is REFERENCE_PIXEL (stcal sets
 * those pixels' groups to DO_NOT_USE for the search).  Every input is [nrows, ncols]
 * with its row stride (median and sigma share ms); out is [nrows, ncols], contiguous. */
void showers_ratio_plane(
    const float *prev, const float *cur, int64_t ds,
    const uint8_t *qprev, const uint8_t *qcur, int64_t qs,
    const uint32_t *pdq, int64_t ps, const float *gain, int64_t gs,
    const float *median, const float *sigma, int64_t ms,
    int64_t nrows, int64_t ncols, float *out);

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
