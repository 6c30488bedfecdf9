/* Saturation and A/D-floor flagging of one integration (streamdet/algorithms/saturation.py
 * holds the rules and their jwst/stcal origin). The DQ bits are the build's DQ_SATURATED,
 * DQ_AD_FLOOR and DQ_DO_NOT_USE (from streamdet/core/dqflags.py).
 *
 * Layout of an integration, as flag_saturation passes it:
 * ramp   float32 [ngroups][nrows][ncols], group stride `gstride` elements, rows contiguous
 * dq     uint8, the same layout and strides (updated in place)
 * limit  float32 [nrows][ncols] contiguous: the effective threshold
 * work   uint8 scratch of 3 * nrows * ncols bytes (the caller's, reused between calls) */
#include <stdint.h>

/* What stays the same for every integration of a band (gstride may change if the
 * caller had to copy an integration). */
typedef struct {
    int64_t ngroups, nrows, ncols, gstride;
    int64_t n_grow;       /* saturation flags grow this many pixels (square box) */
    /* the group-2 test (use_pattern != 0): group 0's frames averaged (mean0), group 2's
     * last frame (last2), group 1's frame count (n1) */
    int64_t use_pattern;
    double mean0, last2;
    int64_t n1;
    /* superbias: a float32 [nrows][ncols] frame, or NULL for the scalar bias (bias_f
     * in the float32 subtraction, bias_d in the float64 addition, as numpy promotes a
     * Python float) */
    const float *bias;
    float bias_f;
    double bias_d;
} saturation_params;

/* out = in dilated by a (2n+1) x (2n+1) square; outside the plane counts as clear.
 * `out` may be `in`; `wide` is scratch of the plane's size. */
void streamdet_grow_mask(const uint8_t *in, uint8_t *wide, uint8_t *out, int64_t nrows,
                         int64_t ncols, int64_t n);

/* Threshold (sticky along the groups), grown by n_grow pixels, then the A/D floor
 * (AD_FLOOR | DO_NOT_USE, never grown). With use_pattern, also the group-2 test: group
 * index 1 gets DO_NOT_USE where group 2 is saturated and group 1 is not, group 0
 * extrapolated to the last frame of group 2 (float64: (first - bias) / mean0 * last2 +
 * bias) stays below threshold, and group1 - group0 exceeds (threshold - group0) / n1
 * (float32). */
void streamdet_flag_saturation(const float *ramp, uint8_t *dq, const float *limit,
                               uint8_t *work, const saturation_params *params);
