/* Per-pixel loops of ramp fitting, and the drivers that run them over every integration
 * of a chunk of pixels (streamdet/algorithms/ramp_fit.py holds the algorithm's
 * description and prepares the buffers).
 *
 * Layout: a ramp is addressed as base[g * gs + p * ps] (group g, pixel p; strides in
 * elements), per-pixel arrays of a chunk of pixels are contiguous.  Samples are float32,
 * everything derived from them double.  The DQ bits tested are the build's DQ_* macros
 * (streamdet/core/dqflags.py). */
#include <stdint.h>

/* What the fit of one chunk of pixels shares across its integrations (per pixel: the
 * chunk's contiguous arrays). */
typedef struct {
    const double *rnoise;       /* read noise per read, electrons */
    const double *gain;         /* e/DN */
    const double *dark;         /* average dark current, DN/s */
    const double *median_rate;  /* over all integrations, DN/s (Poisson variance) */
    double group_time;
    double first_time;          /* timing of a lone first group (only_first) */
    /* the optimal-weighting slope coefficients: those of a segment of n groups with
     * weighting exponent number c start at table[offset[n] + c * n]; the nedges
     * signal-to-noise thresholds ``edges`` choose c */
    const double *table;
    const int64_t *offset;
    const double *edges;
    int64_t nedges;
} rf_fit_setup;

/* Segments to fit: segment i is pixel pix[i] from group start[i * start_stride], of
 * length[i * length_stride] groups (a stride of 0 gives every segment one shape). */
typedef struct {
    int64_t count;
    const int64_t *pix;
    const int64_t *start;
    int64_t start_stride;
    const int64_t *length;
    int64_t length_stride;
} rf_segment_list;

/* One integration's sums over its fitted segments, per pixel (rf_fit_segments). */
typedef struct {
    uint8_t *fitted;  /* the pixel has a fitted segment */
    double *inv_r;    /* sum of 1/var_rnoise */
    double *inv_p;    /* sum of the positive 1/var_poisson */
    double *inv_e;    /* sum of 1/(var_poisson + var_rnoise) */
    double *num;      /* sum of slope/var_rnoise */
} rf_segment_sums;

/* The exposure's sums over integrations, per pixel (rf_finish_integration). */
typedef struct {
    double *inv_p;
    double *inv_r;
    double *num;
    uint32_t *dq;                  /* rate DQ: the pixel DQ and bits kept from every integration */
    uint8_t *unusable_everywhere;  /* start at 1 */
    uint8_t *saturated_everywhere; /* start at 1 */
    uint8_t *saturated_somewhere;  /* start at 0 */
} rf_exposure_sums;

/* Products of one integration or of the exposure, per pixel; var_rnoise stays double
 * for the CHARGELOSS pass, which may still change it. */
typedef struct {
    float *sci;
    float *err;
    uint32_t *dq;
    float *var_poisson;
    double *var_rnoise;
} rf_products;

/* Group DQ of one integration as fitted: groups [first, stop) of ``flags`` into the
 * contiguous ``out`` [stop - first, npix].  With ``suppress``, a ramp with exactly one
 * group clean of everything but PERSISTENCE (counted over all ``ngroups_in`` groups)
 * gains DO_NOT_USE everywhere; when leading groups are cut (first > 0), the new first
 * group loses JUMP_DET. */
void rf_usable_flags(const uint8_t *flags, int64_t gs, int64_t ps, int64_t ngroups_in,
                     int64_t npix, int64_t first, int64_t stop, int64_t suppress,
                     uint8_t *out);

/* The flag template of an integration's ramps (contiguous gdq [ngroups, npix]): per
 * group the commonest value among pixels 0, step, 2 step, ... (the smallest on a tie),
 * and regular[p] = 1 where pixel p's flags equal it in every group. */
void rf_layout(const uint8_t *gdq, int64_t ngroups, int64_t npix, int64_t step,
               uint8_t *template_flags, uint8_t *regular);

/* Segments of ramps with any flags, and what their flags make of the pixel.
 *
 * For pixels pix[0..m) of gdq (group g of pixel p at gdq[g * fgs + p * fps]): a segment
 * is a run of groups clean of everything but PERSISTENCE, started one group early when
 * that group is JUMP_DET and nothing else (but PERSISTENCE).  A pixel with a segment of
 * two groups or more keeps only those; otherwise only its first.  They are written in
 * pixel then time order to seg_pix (= pix[i]) / seg_start / seg_length, which hold at
 * least m * ((ngroups + 1) / 2) entries; returns their number.
 *
 * With ``seen``/``dq`` given (else NULL), seen[pix[i]] gets the OR of the pixel's flags,
 * and dq[pix[i]] its JUMP_DET and PERSISTENCE bits plus: DO_NOT_USE | SATURATED if the
 * first group is SATURATED, DO_NOT_USE if every group is DO_NOT_USE or SATURATED, and
 * SATURATED too if every group is SATURATED.  With ``fittable_only`` the pixels in the
 * first two cases get no segments. */
int64_t rf_segments(const uint8_t *gdq, int64_t fgs, int64_t fps, const int64_t *pix,
                    int64_t m, int64_t ngroups, int64_t fittable_only, uint8_t *seen,
                    uint32_t *dq, int64_t *seg_pix, int64_t *seg_start, int64_t *seg_length);

/* Median rates of ramps that share one flag template: median[p] is the median of pixel
 * p's ``nu`` float32 differences ``usable[k] -> usable[k] + 1`` (the mean, in double, of
 * the two middle ones) over ``group_time``, for every pixel.  Sets ``general[p]`` where
 * those float32 differences are not the exact ones (a NaN difference or sample, or
 * samples that are not all positive and within a factor two of each other: Sterbenz's
 * lemma needs both); the caller replaces those medians.  Returns 0, or -1 when scratch
 * memory is not available. */
int64_t rf_regular_medians(const float *ramp, int64_t gs, int64_t ps, int64_t ngroups,
                           int64_t npix, const int64_t *usable, int64_t nu, double group_time,
                           double *median, uint8_t *general);

/* Median-rate differences of individual ramps, any flags: for pixels pix[0..m) the
 * ngroups - 1 differences in double (exact), NaN where either group is DO_NOT_USE or
 * SATURATED or the later one is JUMP_DET, into diffs [m, ngroups - 1]; their count of
 * non-NaN values, and the first sample (NaN if unusable) as the fallback. */
void rf_general_diffs(const float *ramp, int64_t gs, int64_t ps, const uint8_t *gdq,
                      int64_t fgs, int64_t fps, const int64_t *pix, int64_t m,
                      int64_t ngroups, double *diffs, int64_t *n_valid, double *first);

/* Read-noise variances of ``count`` segments of length[i] groups (``timing``: the
 * segment's group time, the first read's time for a lone first group). */
void rf_rnoise_variance(int64_t count, const double *rn, const double *gain,
                        const int64_t *length, const double *timing, double *out);

/* Fits the ``segments`` of one integration's ramps (``ramp``, strides gs/ps) and adds
 * each into its pixel's ``sums`` in the order given, so a pixel's segments are summed in
 * time order.  ``only_first`` (NULL: none) marks pixels whose lone first group is timed
 * by setup->first_time. */
void rf_fit_segments(const rf_fit_setup *setup, const float *ramp, int64_t gs,
                     int64_t ps, const uint8_t *only_first,
                     const rf_segment_list *segments, const rf_segment_sums *sums);

/* One integration's products ``out`` from its sums (rf_fit_segments), and their
 * contributions to the ``exposure``'s.  ``dq`` is the integration's DQ (without partial
 * saturation), ``seen`` the OR of each ramp's group flags; variances from ``huge`` up
 * count as 0.  out->dq gets the integration's DQ with partial saturation; the exposure's
 * DQ keeps the JUMP_DET and PERSISTENCE bits. */
void rf_finish_integration(int64_t npix, const uint32_t *dq, const uint8_t *seen,
                           const rf_segment_sums *sums, double huge, const rf_products *out,
                           const rf_exposure_sums *exposure);

/* The exposure's products ``out`` from the sums over integrations
 * (rf_finish_integration); out->dq may be exposure->dq. */
void rf_finish_exposure(int64_t npix, const rf_exposure_sums *exposure, double huge,
                        const rf_products *out);

/* ---- drivers: every integration of a chunk of pixels in one call, so that a band
 * thread holds the GIL only to set the chunk up (a Python loop over integrations made
 * the band threads queue for it: ~30-50 short calls per integration). */

/* A chunk of pixels over every integration.  Sample (i, g, p) of the fitted groups is
 * values[i * vis + g * vgs + p * vps] (g from 0: the groups [first, stop) of the input),
 * its group DQ as read flags[i * fis + (first + g) * fgs + p * fps] (all ngroups_in
 * groups are there: suppression counts them).  ``template_path`` 0 sends every ramp
 * down the per-pixel path (for the tests: both paths must agree).  ``store``
 * (rf_chunk_store_bytes) keeps what rf_chunk_median_rate works out of each
 * integration's flags (its group DQ as fitted, template and layout) for rf_chunk_fit:
 * working it out again was a fifth of the step on SUB256 bands of 100 integrations. */
typedef struct {
    const float *values;
    int64_t vis, vgs, vps;
    const uint8_t *flags;
    int64_t fis, fgs, fps;
    int64_t nints, ngroups_in, first, stop, npix;
    int64_t suppress;
    int64_t template_path;
    uint8_t *store;
} rf_chunk;

/* Size of a chunk's ``store``: (ngroups + 2) * npix + ngroups bytes per integration. */
int64_t rf_chunk_store_bytes(const rf_chunk *chunk);

/* Where rf_chunk_fit writes integration i's products: sci/err/dq/var_poisson at
 * + i * stride, var_rnoise (double, see rf_products) at + i * npix. */
typedef struct {
    float *sci;
    float *err;
    uint32_t *dq;
    float *var_poisson;
    int64_t stride;
    double *var_rnoise;
} rf_integration_products;

/* What the optional results (ramp_fit_opt) take of the integration just fitted: its
 * group DQ as fitted [ngroups, npix] (rf_usable_flags), its DQ before partial saturation
 * and, unless the chunk suppresses, only_first (rf_only_first). */
typedef struct {
    uint8_t *gdq;
    uint32_t *dq;
    uint8_t *only_first;
} rf_inspect;

/* only_first[p]: the fitted group DQ (contiguous gdq [ngroups, npix]) has exactly one
 * group without any flag, and it is the first (its rate is then timed by the first
 * read; only looked at when one-group suppression is off). */
void rf_only_first(const uint8_t *gdq, int64_t ngroups, int64_t npix, uint8_t *only_first);

/* Fills the chunk's store, and gives the median rate of every pixel of the chunk
 * (stcal's, for the Poisson variance): per
 * integration the median of its usable differences over group_time (template ramps:
 * rf_regular_medians; the others: rf_general_diffs and their row medians; the first
 * sample over group_time where no difference is usable, over first_time for only_first
 * ramps; with one group the first sample over first_time, NaN if SATURATED), NaN
 * counted as 0 except with one group, summed over integrations in order, then divided
 * by nints.  Returns 0, or -1 when scratch memory is not available. */
int64_t rf_chunk_median_rate(const rf_chunk *chunk, double group_time, double first_time,
                             double *median_rate);

/* Fits integrations [int_lo, int_hi) of the chunk (its store filled by
 * rf_chunk_median_rate): per integration the segments
 * (template ramps from the template's, the others from their own flags), their fit
 * (rf_fit_segments, setup->median_rate from rf_chunk_median_rate) and the
 * integration's products (rf_finish_integration into ``out`` and ``exposure``).
 * lossy[i * npix + p] gets whether ramp p of integration i has a CHARGELOSS group.
 * ``inspect`` (NULL: none) gets the last integration's rf_inspect.  Returns the number
 * of ramps with CHARGELOSS, or -1 when scratch memory is not available. */
int64_t rf_chunk_fit(const rf_chunk *chunk, const rf_fit_setup *setup, const uint32_t *pdq,
                     double huge, int64_t int_lo, int64_t int_hi,
                     const rf_integration_products *out, const rf_exposure_sums *exposure,
                     uint8_t *lossy, const rf_inspect *inspect);
