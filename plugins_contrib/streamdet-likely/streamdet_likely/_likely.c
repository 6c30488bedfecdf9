/* The per-ramp loops of jwst's LIKELY fit (streamdet_likely/kernel.py holds the
 * algorithm's description and prepares the buffers; called through ctypes, which
 * releases the GIL, so band threads run in parallel).
 *
 * Layout: m columns (one integration of one pixel each), n differences per column,
 * difference k of column j at [k * m + j]; per-column arrays are contiguous.
 * Differences are rates (DN/s); diag / off are the covariance of a used difference and
 * of two used neighbours.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* scratch for one column's solve */
typedef struct {
    double *d, *piv, *q, *p, *coupling;
    /* 1 / diagonal of C^-1, from the forward and backward pivots (detect only) */
    double *inv_pdiag;
    uint8_t *use;
} Work;

typedef struct {
    double S, N, Q2, Q11;
} Sums;

/* Solve C x = 1 (and C x = d with `detect`, plus the diagonal of C^-1 as its
 * reciprocal f_k + b_k - C_kk from the forward and backward pivots) on the used
 * differences; C_kk = diag, C_k,k+1 = off between used neighbours.  An unused
 * difference is a decoupled row with right-hand sides 0.  Divisions are what this
 * costs, so pivots are kept as reciprocals where they are multiplied. */
static Sums solve(int64_t n, Work *w, double diag, double off, int detect, int moments)
{
    const double *d = w->d;
    const uint8_t *use = w->use;
    double *piv = w->piv, *q = w->q, *p = w->p, *c = w->coupling;
    for (int64_t k = 0; k + 1 < n; k++)
        c[k] = (use[k] && use[k + 1]) ? off : 0.0;
    piv[0] = use[0] ? diag : 1.0;
    if (detect)
        w->inv_pdiag[0] = piv[0];
    q[0] = use[0] ? 1.0 : 0.0;
    if (detect)
        p[0] = use[0] ? d[0] : 0.0;
    for (int64_t k = 1; k < n; k++) {  /* forward elimination */
        piv[k - 1] = 1.0 / piv[k - 1];  /* kept as its reciprocal from here on */
        const double f = c[k - 1] * piv[k - 1];
        piv[k] = (use[k] ? diag : 1.0) - f * c[k - 1];
        if (detect)
            w->inv_pdiag[k] = piv[k];  /* the forward pivot, completed below */
        q[k] = (use[k] ? 1.0 : 0.0) - f * q[k - 1];
        if (detect)
            p[k] = (use[k] ? d[k] : 0.0) - f * p[k - 1];
    }
    piv[n - 1] = 1.0 / piv[n - 1];
    Sums s = {0.0, 0.0, 0.0, 0.0};
    double back = 0.0;  /* pivot of the backward elimination */
    for (int64_t k = n - 1; k >= 0; k--) {  /* back substitution */
        if (k < n - 1)
            q[k] -= c[k] * q[k + 1];
        q[k] *= piv[k];
        s.S += q[k];
        if (use[k])
            s.N += q[k] * d[k];
        if (moments) {
            s.Q2 += q[k] * q[k];
            if (k < n - 1)
                s.Q11 += q[k] * q[k + 1];
        }
        if (detect) {
            if (k < n - 1)
                p[k] -= c[k] * p[k + 1];
            p[k] *= piv[k];
            const double own = use[k] ? diag : 1.0;
            back = (k == n - 1) ? own : own - c[k] * c[k] / back;
            w->inv_pdiag[k] += back - own;
        }
    }
    return s;
}

/* Brandt's iterative jump search on one column (kernel.py, step 2).  Updates w->use;
 * returns the rate of the last fit without the dropped differences and sets *found
 * when a difference was dropped (jumps, when given, marks which). */
static double search(int64_t n, Work *w, double diag, double off, double threshold,
                     int min_diffs, uint8_t *found, uint8_t *jumps, int64_t stride)
{
    double rate = NAN;
    int first = 1;
    for (;;) {
        Sums s = solve(n, w, diag, off, 1, 0);
        const double a = s.N / s.S;
        if (first) {
            rate = a;
            first = 0;
        }
        /* chi-square improvement of leaving k out: resid^2 / (P_kk - q_k^2 / S)
         * = resid^2 D S / (S - q_k^2 D) with D = 1 / P_kk; compared without dividing */
        int64_t count = 0, best = -1;
        double best_gain = 0.0;
        for (int64_t k = 0; k < n; k++) {
            if (!w->use[k])
                continue;
            count++;
            const double resid = w->p[k] - a * w->q[k], D = w->inv_pdiag[k];
            const double num = resid * resid * D * s.S, den = s.S - w->q[k] * w->q[k] * D;
            if (den > 0 ? num > best_gain * den : num / den > best_gain) {
                best_gain = num / den;
                best = k;
            }
        }
        if (isnan(a) || count < 2 || !(best_gain > threshold))
            break;
        if (count == 2) {  /* a tie: the larger difference (kernel.py, step 2) */
            best = -1;
            for (int64_t k = 0; k < n; k++)
                if (w->use[k] && (best < 0 || w->d[k] > w->d[best]))
                    best = k;
        }
        const double D = w->inv_pdiag[best], qk = w->q[best], pk = w->p[best];
        rate = (s.N - qk * pk * D) / (s.S - qk * qk * D);
        w->use[best] = 0;
        *found = 1;
        if (jumps)
            jumps[best * stride] = 1;
        if (count - 1 < min_diffs)
            break;
    }
    return rate;
}

static int setup(Work *w, int64_t n)
{
    w->d = malloc(6 * (size_t)n * sizeof(double));
    w->use = malloc((size_t)n);
    if (!w->d || !w->use) {
        free(w->d);
        free(w->use);
        return -1;
    }
    w->piv = w->d + n;
    w->q = w->d + 2 * n;
    w->p = w->d + 3 * n;
    w->inv_pdiag = w->d + 4 * n;
    w->coupling = w->d + 5 * n;
    return 0;
}

static void load(Work *w, int64_t n, int64_t m, int64_t j, const double *d, const uint8_t *use)
{
    for (int64_t k = 0; k < n; k++) {
        w->d[k] = d[k * m + j];
        w->use[k] = use[k * m + j];
    }
}

/* the k-th smallest of v[0..n) moved to v[k], smaller ones before it (quickselect) */
static void select_kth(double *v, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const double pivot = v[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] < pivot)
                i++;
            while (v[j] > pivot)
                j--;
            if (i <= j) {
                const double t = v[i];
                v[i++] = v[j];
                v[j--] = t;
            }
        }
        if (k <= j)
            hi = j;
        else if (k >= i)
            lo = i;
        else
            return;
    }
}

/* numpy's median: NaN if any value is; the mean of the middle two for even counts */
static double median(int64_t n, const double *values, double *tmp)
{
    for (int64_t k = 0; k < n; k++) {
        if (isnan(values[k]))
            return NAN;
        tmp[k] = values[k];
    }
    const int64_t half = n / 2;
    select_kth(tmp, n, half);
    if (n % 2)
        return tmp[half];
    double below = tmp[0];  /* the largest of the lower half */
    for (int64_t k = 1; k < half; k++)
        below = tmp[k] > below ? tmp[k] : below;
    return (below + tmp[half]) / 2.0;
}

/* The jump search alone, on given covariances (for the tests against stcal). */
int64_t lk_find_jumps(int64_t n, int64_t m, const double *d, uint8_t *use,
                      const double *diag, const double *off, double threshold,
                      int64_t min_diffs, double *rate, uint8_t *jumps)
{
    Work w;
    if (setup(&w, n))
        return -1;
    for (int64_t j = 0; j < m; j++) {
        uint8_t found = 0;
        load(&w, n, m, j, d, use);
        rate[j] = search(n, &w, diag[j], off[j], threshold, (int)min_diffs, &found,
                         jumps + j, m);
        for (int64_t k = 0; k < n; k++)
            use[k * m + j] = w.use[k];
    }
    free(w.d);
    free(w.use);
    return 0;
}

/* Columns fitted in lockstep: each ramp's elimination is a chain of dependent
 * divisions, so interleaving BLOCK ramps keeps the floating-point units busy (and the
 * inner loops vectorise). */
#define BLOCK 8

typedef struct {
    double d[BLOCK], piv[BLOCK], q[BLOCK], p[BLOCK], c[BLOCK], ipd[BLOCK];
    uint8_t use[BLOCK];
} Row;

/* solve() for BLOCK columns at once (rows of Row); per-column diag/off; sums out */
static void solve_block(int64_t n, Row *r, const double *diag, const double *off, int detect,
                        int moments, Sums *out)
{
    for (int64_t k = 0; k + 1 < n; k++)
        for (int b = 0; b < BLOCK; b++)
            r[k].c[b] = (r[k].use[b] && r[k + 1].use[b]) ? off[b] : 0.0;
    for (int b = 0; b < BLOCK; b++) {
        r[0].piv[b] = r[0].use[b] ? diag[b] : 1.0;
        r[0].ipd[b] = r[0].piv[b];
        r[0].q[b] = r[0].use[b] ? 1.0 : 0.0;
        r[0].p[b] = r[0].use[b] ? r[0].d[b] : 0.0;
    }
    for (int64_t k = 1; k < n; k++) {
        Row *prev = &r[k - 1], *cur = &r[k];
        for (int b = 0; b < BLOCK; b++) {
            prev->piv[b] = 1.0 / prev->piv[b];
            const double f = prev->c[b] * prev->piv[b];
            cur->piv[b] = (cur->use[b] ? diag[b] : 1.0) - f * prev->c[b];
            cur->ipd[b] = cur->piv[b];
            cur->q[b] = (cur->use[b] ? 1.0 : 0.0) - f * prev->q[b];
            cur->p[b] = (cur->use[b] ? cur->d[b] : 0.0) - f * prev->p[b];
        }
    }
    double back[BLOCK];
    for (int b = 0; b < BLOCK; b++) {
        r[n - 1].piv[b] = 1.0 / r[n - 1].piv[b];
        out[b].S = out[b].N = out[b].Q2 = out[b].Q11 = 0.0;
        back[b] = 0.0;
    }
    for (int64_t k = n - 1; k >= 0; k--) {
        Row *cur = &r[k];
        const Row *next = k < n - 1 ? &r[k + 1] : NULL;
        for (int b = 0; b < BLOCK; b++) {
            double q = cur->q[b];
            if (next)
                q -= cur->c[b] * next->q[b];
            q *= cur->piv[b];
            cur->q[b] = q;
            out[b].S += q;
            out[b].N += cur->use[b] ? q * cur->d[b] : 0.0;
            if (moments) {
                out[b].Q2 += q * q;
                if (next)
                    out[b].Q11 += q * next->q[b];
            }
            if (detect) {
                double p = cur->p[b];
                if (next)
                    p -= cur->c[b] * next->p[b];
                cur->p[b] = p * cur->piv[b];
                const double own = cur->use[b] ? diag[b] : 1.0;
                back[b] = next ? own - cur->c[b] * cur->c[b] / back[b] : own;
                cur->ipd[b] += back[b] - own;
            }
        }
    }
}

/* The whole fit (kernel.py, steps 1-4) of npix pixels of nints integrations: data
 * float32 and gdq at [i * is + g * gs + pixel]; read_var, photon_per_rate and dark per
 * pixel.  Writes, per column j = i * npix + pixel: sci, err, var_poisson, var_rnoise
 * (NaN where nothing is used) and jumped (1 where the search dropped a difference;
 * zero on entry). */
int64_t lk_fit(int64_t nints, int64_t ngroups, int64_t npix, const float *data,
               int64_t data_is, int64_t data_gs, const uint8_t *gdq, int64_t gdq_is,
               int64_t gdq_gs, double dt, const double *read_var,
               const double *photon_per_rate, const double *dark, double threshold,
               int64_t min_diffs, double *sci, double *err, double *vp, double *vr,
               uint8_t *jumped)
{
    const int64_t n = ngroups - 1, m = nints * npix;
    Work w;
    if (setup(&w, n))
        return -1;
    double *tmp = malloc((size_t)n * sizeof(double));
    Row *rows = malloc((size_t)n * sizeof(Row));
    if (!tmp || !rows) {
        free(tmp);
        free(rows);
        free(w.d);
        free(w.use);
        return -1;
    }
    for (int64_t j0 = 0; j0 < m; j0 += BLOCK) {
        const int nb = m - j0 < BLOCK ? (int)(m - j0) : BLOCK;
        double diag[BLOCK], off[BLOCK], rate[BLOCK], photon[BLOCK];
        Sums sums[BLOCK];
        int64_t pix[BLOCK];
        for (int b = 0; b < BLOCK; b++) {
            const int64_t j = b < nb ? j0 + b : j0;
            const int64_t i = j / npix;
            pix[b] = j - i * npix;
            const float *y = data + i * data_is + pix[b];
            const uint8_t *f = gdq + i * gdq_is + pix[b];
            for (int64_t k = 0; k < n; k++) {
                /* the difference in single precision, as the ramp is stored */
                const float diff = y[(k + 1) * data_gs] - y[k * data_gs];
                rows[k].d[b] = b < nb ? (double)diff / dt : 0.0;
                rows[k].use[b] = b < nb && f[k * gdq_gs] == 0 && f[(k + 1) * gdq_gs] == 0;
            }
        }
        for (int b = 0; b < BLOCK; b++) {
            const double rv = b < nb ? read_var[pix[b]] : 1.0;
            off[b] = -0.5 * rv;
            double med = 0.0;
            if (b < nb) {
                for (int64_t k = 0; k < n; k++)
                    w.d[k] = rows[k].d[b];
                med = median(n, w.d, tmp);
                med = med > 0 ? med : 0.0 * med;
            }
            diag[b] = b < nb ? med * photon_per_rate[pix[b]] + rv : rv;
        }
        /* the jump search's first pass in lockstep, further passes one ramp at a time */
        solve_block(n, rows, diag, off, 1, 0, sums);
        for (int b = 0; b < nb; b++) {
            const Sums s = sums[b];
            const double a = s.N / s.S;
            rate[b] = a;
            int64_t count = 0, best = -1;
            double best_gain = 0.0;
            for (int64_t k = 0; k < n; k++) {
                if (!rows[k].use[b])
                    continue;
                count++;
                const double resid = rows[k].p[b] - a * rows[k].q[b], D = rows[k].ipd[b];
                const double num = resid * resid * D * s.S, den = s.S - rows[k].q[b] * rows[k].q[b] * D;
                if (den > 0 ? num > best_gain * den : num / den > best_gain) {
                    best_gain = num / den;
                    best = k;
                }
            }
            if (isnan(a) || count < 2 || !(best_gain > threshold))
                continue;
            if (count == 2) {  /* a tie: the larger difference (kernel.py, step 2) */
                best = -1;
                for (int64_t k = 0; k < n; k++)
                    if (rows[k].use[b] && (best < 0 || rows[k].d[b] > rows[best].d[b]))
                        best = k;
            }
            const double D = rows[best].ipd[b], qk = rows[best].q[b], pk = rows[best].p[b];
            rate[b] = (s.N - qk * pk * D) / (s.S - qk * qk * D);
            rows[best].use[b] = 0;
            jumped[j0 + b] = 1;
            if (count - 1 < min_diffs)
                continue;
            for (int64_t k = 0; k < n; k++) {
                w.d[k] = rows[k].d[b];
                w.use[k] = rows[k].use[b];
            }
            rate[b] = search(n, &w, diag[b], off[b], threshold, (int)min_diffs,
                             &jumped[j0 + b], NULL, 0);
            for (int64_t k = 0; k < n; k++)
                rows[k].use[b] = w.use[k];
        }
        /* the fit, with the covariance of the search's rate */
        for (int b = 0; b < BLOCK; b++) {
            const double rv = b < nb ? read_var[pix[b]] : 1.0;
            const double current =
                b < nb ? (rate[b] > 0 ? rate[b] : 0.0 * rate[b]) + dark[pix[b]] : 0.0;
            photon[b] = b < nb ? current * photon_per_rate[pix[b]] : 0.0;
            diag[b] = photon[b] + rv;
        }
        solve_block(n, rows, diag, off, 0, 1, sums);
        for (int b = 0; b < nb; b++) {
            const int64_t j = j0 + b;
            const Sums s = sums[b];
            int any = 0;
            for (int64_t k = 0; k < n; k++)
                any |= rows[k].use[b];
            const double scale = 1.0 / (s.S * s.S), rv = read_var[pix[b]];
            sci[j] = s.N / s.S;
            err[j] = sqrt(1.0 / s.S);
            vp[j] = photon[b] * s.Q2 * scale;
            vr[j] = rv * (s.Q2 - s.Q11) * scale;
            if (!any || !isfinite(sci[j]) || !isfinite(err[j]))
                sci[j] = err[j] = vp[j] = vr[j] = NAN;
        }
    }
    free(rows);
    free(tmp);
    free(w.d);
    free(w.use);
    return 0;
}

/* One generalised least-squares solve per column (for the tests): S = 1'P1, N = d'P1,
 * Q2 = sum q_k^2, Q11 = sum q_k q_k+1 with q = P1. */
int64_t lk_gls(int64_t n, int64_t m, const double *d, const uint8_t *use, const double *diag,
               const double *off, double *S, double *N, double *Q2, double *Q11)
{
    Work w;
    if (setup(&w, n))
        return -1;
    for (int64_t j = 0; j < m; j++) {
        load(&w, n, m, j, d, use);
        Sums s = solve(n, &w, diag[j], off[j], 0, 1);
        S[j] = s.S;
        N[j] = s.N;
        Q2[j] = s.Q2;
        Q11[j] = s.Q11;
    }
    free(w.d);
    free(w.use);
    return 0;
}
