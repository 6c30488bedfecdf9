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
    *found = 0;
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
        uint8_t found;
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

/* The whole fit of m columns (kernel.py, steps 1-4): read_var and photon_per_rate,
 * dark per column; writes sci, err, var_poisson, var_rnoise (NaN where nothing is
 * used) and jumped (1 where the search dropped a difference). */
int64_t lk_fit(int64_t n, int64_t m, const double *d, const uint8_t *use,
               const double *read_var, const double *photon_per_rate, const double *dark,
               double threshold, int64_t min_diffs, double *sci, double *err, double *vp,
               double *vr, uint8_t *jumped)
{
    Work w;
    if (setup(&w, n))
        return -1;
    double *tmp = malloc((size_t)n * sizeof(double));
    if (!tmp) {
        free(w.d);
        free(w.use);
        return -1;
    }
    for (int64_t j = 0; j < m; j++) {
        load(&w, n, m, j, d, use);
        const double rv = read_var[j], off = -0.5 * rv;
        double med = median(n, w.d, tmp);
        med = med > 0 ? med : 0.0 * med;
        const double rate = search(n, &w, med * photon_per_rate[j] + rv, off, threshold,
                                   (int)min_diffs, &jumped[j], NULL, 0);
        const double current = (rate > 0 ? rate : 0.0 * rate) + dark[j];
        const double photon = current * photon_per_rate[j];
        Sums s = solve(n, &w, photon + rv, off, 0, 1);
        int any = 0;
        for (int64_t k = 0; k < n; k++)
            any |= w.use[k];
        const double scale = 1.0 / (s.S * s.S);
        sci[j] = s.N / s.S;
        err[j] = sqrt(1.0 / s.S);
        vp[j] = photon * s.Q2 * scale;
        vr[j] = rv * (s.Q2 - s.Q11) * scale;
        if (!any || !isfinite(sci[j]) || !isfinite(err[j]))
            sci[j] = err[j] = vp[j] = vr[j] = NAN;
    }
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
