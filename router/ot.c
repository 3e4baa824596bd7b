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

/* One column: y = argmin ||y - v|| over the simplex with at most cap nonzeros, which is the
 * simplex projection of the cap largest entries (Kyrillidis et al., ICML'13); the plain
 * projection by Michelot's fixed point. w: scratch [n]. Writes the support to sup and the
 * values to val (at most cap each; ties at the cut go to the lower index), returns their
 * number. */
static int64_t sparse_simplex_project(const double *v, int64_t n, int64_t cap, double *w, int64_t *sup,
                                      double *val) {
    int64_t m = cap < n ? cap : n;
    memcpy(w, v, sizeof(double) * (size_t)n);
    double cut = mth_largest(w, n, m);
    int64_t above = 0;
    for (int64_t t = 0; t < n; t++) above += v[t] > cut;
    int64_t ties = m - above, s = 0;
    for (int64_t t = 0; t < n && s < m; t++)
        if (v[t] > cut || (v[t] == cut && ties-- > 0)) sup[s++] = t;
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
 * sup/val + j * cap, its size to nnz[j]. False when scratch memory ran out. */
static bool project_columns(const double *cols, const double *alpha, int64_t T, int E, int64_t cap, double gamma,
                            int64_t *sup, double *val, int64_t *nnz) {
    double scale = 1.0 / (gamma * ((double)T / E)); /* 1 / (gamma b_j), token units */
    bool ok = true;
#pragma omp parallel if (T * E >= 65536)
    {
        double *v = malloc(sizeof(double) * (size_t)T), *w = malloc(sizeof(double) * (size_t)T);
        if (!v || !w) {
#pragma omp atomic write
            ok = false;
        }
#pragma omp for schedule(static)
        for (int j = 0; j < E; j++) {
            if (!v || !w) continue;
            const double *lj = cols + j * T;
            for (int64_t t = 0; t < T; t++) v[t] = (alpha[t] + lj[t]) * scale;
            nnz[j] = sparse_simplex_project(v, T, cap, w, sup + j * cap, val + j * cap);
        }
        free(v);
        free(w);
    }
    return ok;
}

moe_status moe_ot_plan(const double *logits, int64_t T, int E, int64_t cap, int iters, double gamma, double *plan) {
    MOE_ASSERT(E > 0 && cap > 0 && gamma > 0 && iters >= 0, "ot router: bad problem (E=%d, capacity=%lld, gamma=%g)",
               E, (long long)cap, gamma);
    if (T == 0) return MOE_OK;
    cap = cap < T ? cap : T;
    double *alpha = malloc(sizeof(double) * (size_t)T), *mass = malloc(sizeof(double) * (size_t)T);
    double *val = malloc(sizeof(double) * (size_t)(E * cap)), *cols = malloc(sizeof(double) * (size_t)(T * E));
    int64_t *sup = malloc(sizeof(int64_t) * (size_t)(E * cap)), *nnz = malloc(sizeof(int64_t) * (size_t)E);
    bool ok = alpha && mass && val && cols && sup && nnz;
    if (ok) {
        double b = (double)T / E, step = gamma / E;
        for (int64_t t = 0; t < T; t++) {
            double mx = -INFINITY;
            for (int j = 0; j < E; j++) {
                cols[j * T + t] = logits[t * E + j];
                mx = fmax(mx, logits[t * E + j]);
            }
            alpha[t] = -mx;
        }
        for (int it = 0; ok; it++) {
            ok = project_columns(cols, alpha, T, E, cap, gamma, sup, val, nnz);
            if (it == iters) break;
            for (int64_t t = 0; t < T; t++) mass[t] = 0;
            for (int j = 0; j < E; j++)
                for (int64_t i = 0; i < nnz[j]; i++) mass[sup[j * cap + i]] += b * val[j * cap + i];
            for (int64_t t = 0; t < T; t++) alpha[t] += step * (1.0 - mass[t]);
        }
    }
    if (ok) {
        memset(plan, 0, sizeof(double) * (size_t)(T * E));
        for (int j = 0; j < E; j++)
            for (int64_t i = 0; i < nnz[j]; i++) plan[sup[j * cap + i] * E + j] = val[j * cap + i] / E;
    }
    free(alpha), free(mass), free(val), free(cols), free(sup), free(nnz);
    return ok ? MOE_OK : moe_error(MOE_ERR_OOM, "ot router: out of host memory for T=%lld, E=%d", (long long)T, E);
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
