/* Sparsity-constrained OT routing: semi-dual gradient ascent and the per-token selection. */
#include "router/ot.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

int64_t moe_ot_capacity(int64_t n_tokens, int top_k, int n_experts) {
    return (n_tokens * top_k + n_experts - 1) / n_experts;
}

/* The m-th largest of w[0..n) (1 <= m <= n); reorders w. Three-way partition, so runs of
 * equal values cost O(n). */
static double mth_largest(double *w, int64_t n, int64_t m) {
    int64_t lo = 0, hi = n;
    for (;;) {
        double pivot = w[lo + (hi - lo) / 2];
        int64_t gt = lo, i = lo, lt = hi; /* [lo, gt) > pivot, [gt, lt) == pivot, [lt, hi) < pivot */
        while (i < lt) {
            double x = w[i];
            if (x > pivot) {
                w[i++] = w[gt];
                w[gt++] = x;
            } else if (x < pivot) {
                w[i] = w[--lt];
                w[lt] = x;
            } else {
                i++;
            }
        }
        if (m <= gt) hi = gt;
        else if (m > lt) lo = lt;
        else return pivot;
    }
}

/* The m-th largest of v[0..n) (1 <= m <= n) near a guess: the entries in (guess - *radius,
 * guess + *radius] are counted in one branch-free pass; when the m-th largest lies among them,
 * only they are copied to w and searched. The window widens eightfold on a miss, and after a
 * few misses (or with no finite guess) the whole of v is searched. On return *radius is
 * twice the distance from the guess to the answer, the window for the next ascent step,
 * whose answer moves by about as much. The answer is exact whichever path finds it. */
static double mth_largest_near(const double *v, int64_t n, int64_t m, double guess, double *radius, double *w) {
    double r = *radius, cut = NAN;
    for (int tries = 0; isfinite(guess) && r > 0 && tries < 6 && isnan(cut); tries++, r *= 8) {
        double lo = guess - r, hi = guess + r;
        int64_t above_lo = 0, above_hi = 0;
        for (int64_t t = 0; t < n; t++) {
            above_lo += v[t] > lo;
            above_hi += v[t] > hi;
        }
        if (above_hi >= m || above_lo < m) continue;
        int64_t k = 0;
        for (int64_t t = 0; t < n; t++) {
            w[k] = v[t];
            k += (v[t] > lo) & (v[t] <= hi);
        }
        cut = mth_largest(w, k, m - above_hi);
    }
    if (isnan(cut)) {
        memcpy(w, v, sizeof(double) * (size_t)n);
        cut = mth_largest(w, n, m);
    }
    double moved = 2 * fabs(cut - guess), least = 1e-12 * fmax(1.0, fabs(cut));
    *radius = isfinite(moved) && moved > least ? moved : least;
    return cut;
}

/* One column: y = argmin ||y - v|| over the simplex with at most cap nonzeros, which is the
 * simplex projection of the cap largest entries (Kyrillidis et al., ICML'13); the plain
 * projection by Michelot's fixed point. The cap-th largest entry is searched near *cut, the
 * last step's, and stored there with its window in *radius. w: scratch [n]. Writes the
 * support to sup and the values to val (at most cap each; ties at the cut go to the lower
 * index), returns their number. */
static int64_t sparse_simplex_project(const double *v, int64_t n, int64_t cap, double *cut, double *radius,
                                      double *w, int64_t *sup, double *val) {
    int64_t m = cap < n ? cap : n;
    double c = *cut = mth_largest_near(v, n, m, *cut, radius, w);
    int64_t above = 0;
    for (int64_t t = 0; t < n; t++) above += v[t] > c;
    int64_t ties = m - above, s = 0;
    for (int64_t t = 0; t < n && s < m; t++) { /* branch-free: a quarter of the tokens is taken, at random */
        bool tie = (v[t] == c) & (ties > 0);
        ties -= tie;
        sup[s] = t;
        s += (v[t] > c) | tie;
    }
    double sum = 0;
    for (int64_t i = 0; i < m; i++) sum += v[sup[i]];
    double tau = (sum - 1.0) / (double)m;
    for (;;) { /* keep > 0 always: the largest entry exceeds the mean-based tau */
        int64_t keep = 0;
        sum = 0;
        for (int64_t i = 0; i < m; i++)
            if (v[sup[i]] > tau) {
                sup[keep++] = sup[i];
                sum += v[sup[i]];
            }
        bool done = keep == m;
        m = keep;
        tau = (sum - 1.0) / (double)m;
        if (done) break;
    }
    for (int64_t i = 0; i < m; i++) val[i] = v[sup[i]] - tau;
    return m;
}

/* Projects every column for the current alpha (cols: the logits transposed, [E][T]): column j's support and values go to
 * sup/val + j * cap, its size to nnz[j], and the column itself, zero off the support, to dense + j * T; cut/radius [E]
 * carry each column's cut between steps (NAN: none yet). v: scratch [E][T]. */
static void project_columns(const double *cols, const double *alpha, int64_t T, int E, int64_t cap, double gamma,
                            double *cut, double *radius, double *v, double *dense, int64_t *sup, double *val,
                            int64_t *nnz) {
    double scale = 1.0 / (gamma * ((double)T / E)); /* 1 / (gamma b_j), token units */
#pragma omp parallel for schedule(static) if (T * E >= 65536)
    for (int j = 0; j < E; j++) {
        const double *lj = cols + j * T;
        double *vj = v + j * T, *dj = dense + j * T; /* dj: the search's scratch, then the column */
        int64_t *sj = sup + j * cap;
        double *valj = val + j * cap;
        for (int64_t t = 0; t < T; t++) vj[t] = (alpha[t] + lj[t]) * scale;
        nnz[j] = sparse_simplex_project(vj, T, cap, cut + j, radius + j, dj, sj, valj);
        memset(dj, 0, sizeof(double) * (size_t)T);
        for (int64_t i = 0; i < nnz[j]; i++) dj[sj[i]] = valj[i];
    }
}

moe_status moe_ot_plan(const double *logits, int64_t T, int E, int64_t cap, int iters, double gamma, double *plan) {
    MOE_ASSERT(E > 0 && cap > 0 && gamma > 0 && iters >= 0, "ot router: bad problem (E=%d, capacity=%lld, gamma=%g)",
               E, (long long)cap, gamma);
    if (T == 0) return MOE_OK;
    cap = cap < T ? cap : T;
    double *alpha = malloc(sizeof(double) * (size_t)T), *val = malloc(sizeof(double) * (size_t)(E * cap));
    double *cols = malloc(sizeof(double) * (size_t)(3 * T * E)), *cut = malloc(sizeof(double) * (size_t)(2 * E));
    int64_t *sup = malloc(sizeof(int64_t) * (size_t)(E * cap)), *nnz = malloc(sizeof(int64_t) * (size_t)E);
    if (!alpha || !val || !cols || !cut || !sup || !nnz) {
        free(alpha), free(val), free(cols), free(cut), free(sup), free(nnz);
        return moe_error(MOE_ERR_OOM, "ot router: out of host memory for T=%lld, E=%d", (long long)T, E);
    }
    double *v = cols + T * E, *dense = v + T * E, *radius = cut + E; /* [E][T] each; [E] */
    double b = (double)T / E, step = gamma / E;
    const bool parallel = T * E >= 65536;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t t = 0; t < T; t++) {
        double mx = -INFINITY;
        for (int j = 0; j < E; j++) {
            cols[j * T + t] = logits[t * E + j];
            mx = fmax(mx, logits[t * E + j]);
        }
        alpha[t] = -mx;
    }
    for (int j = 0; j < E; j++) cut[j] = radius[j] = NAN;
    for (int it = 0;; it++) {
        project_columns(cols, alpha, T, E, cap, gamma, cut, radius, v, dense, sup, val, nnz);
        if (it == iters) break;
#pragma omp parallel for schedule(static) if (parallel)
        for (int64_t t = 0; t < T; t++) {
            /* the token's mass in column order (the zeros off the supports add nothing), by written-out
             * fused multiply-adds, so that no compiler contraction changes the bits */
            double mass = 0;
            for (int j = 0; j < E; j++) mass = fma(b, dense[j * T + t], mass);
            alpha[t] = fma(step, 1.0 - mass, alpha[t]);
        }
    }
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t t = 0; t < T; t++)
        for (int j = 0; j < E; j++) plan[t * E + j] = dense[j * T + t] / E;
    free(alpha), free(val), free(cols), free(cut), free(sup), free(nnz);
    return MOE_OK;
}

void moe_ot_select(const double *plan, const double *logits, int64_t T, int E, int k, int32_t *experts, bool *valid) {
    for (int64_t t = 0; t < T; t++) {
        const double *pr = plan + t * E, *lg = logits + t * E;
        int32_t *ex = experts + t * k;
        /* Insertion of each expert into the row's sorted top-k list. */
        int n = 0;
        for (int j = 0; j < E; j++) {
            int pos = n < k ? n : k;
            while (pos > 0) {
                int q = ex[pos - 1];
                if (pr[j] > pr[q] || (pr[j] == pr[q] && lg[j] > lg[q])) pos--;
                else break;
            }
            if (pos >= k) continue;
            for (int s = (n < k ? n : k - 1); s > pos; s--) ex[s] = ex[s - 1];
            ex[pos] = j;
            if (n < k) n++;
        }
        for (int s = 0; s < k; s++) valid[t * k + s] = pr[ex[s]] > 0;
    }
}
