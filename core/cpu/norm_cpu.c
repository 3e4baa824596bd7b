/* CPU kernels of the row-wise ops: softmax / log-softmax and its backward, logsumexp,
 * RMSNorm and LayerNorm with their backwards. Every tensor is contiguous [rows, d]
 * (core/ops_norm.c guarantees it); one thread handles a whole row, row sums accumulate
 * in double. Parameter grads are summed over rows in fixed column blocks, so they do
 * not depend on the thread count. Statistics and parameter grads have x's type T. */
#include "core/cpu/cpu_common.h"

#define NORM_COL_BLOCK 32

/* Per-type helpers, picked by _Generic on the row pointer. */
#define NORM_DEFINE_HELPERS(T, sfx)                                                          \
    /* Largest element; NaN when any element is NaN (so it propagates). */                  \
    static inline T row_max_##sfx(const T *p, int64_t d) {                                   \
        T m = p[0];                                                                          \
        for (int64_t c = 1; c < d; c++)                                                      \
            if (p[c] > m || p[c] != p[c]) m = m != m ? m : p[c];                             \
        return m;                                                                            \
    }                                                                                        \
    static inline double row_sumexp_##sfx(const T *p, int64_t d, T m) {                      \
        double s = 0;                                                                        \
        for (int64_t c = 0; c < d; c++) s += exp(p[c] - m);                                  \
        return s;                                                                            \
    }                                                                                        \
    /* gw[c] += sum_r g[r,c] * (x[r,c] - mean_r) * rstd_r, gb[c] += sum_r g[r,c]; stats    \
     * row r holds (rstd) when ns = 1 (mean 0) or (mean, rstd) when ns = 2; gb may be NULL. */ \
    static void param_grads_##sfx(const T *g, const T *x, const T *st, int ns, int64_t rows, \
                                  int64_t d, T *gw, T *gb) {                                 \
        int64_t nb = (d + NORM_COL_BLOCK - 1) / NORM_COL_BLOCK;                              \
        _Pragma("omp parallel for schedule(static) if (rows * d > 16384)")                   \
        for (int64_t b = 0; b < nb; b++) {                                                   \
            int64_t c0 = b * NORM_COL_BLOCK, w = d - c0 < NORM_COL_BLOCK ? d - c0 : NORM_COL_BLOCK; \
            double aw[NORM_COL_BLOCK] = {0}, ab[NORM_COL_BLOCK] = {0};                       \
            for (int64_t r = 0; r < rows; r++) {                                             \
                const T *pg = g + r * d + c0, *px = x + r * d + c0;                          \
                T mu = ns == 2 ? st[2 * r] : (T)0, rs = st[ns * r + ns - 1];                 \
                for (int64_t c = 0; c < w; c++) {                                            \
                    aw[c] += (double)pg[c] * (double)((px[c] - mu) * rs);                    \
                    ab[c] += pg[c];                                                          \
                }                                                                            \
            }                                                                                \
            for (int64_t c = 0; c < w; c++) {                                                \
                gw[c0 + c] += (T)aw[c];                                                      \
                if (gb) gb[c0 + c] += (T)ab[c];                                              \
            }                                                                                \
        }                                                                                    \
    }

NORM_DEFINE_HELPERS(float, f)
NORM_DEFINE_HELPERS(double, d)

#define row_max(p, d) _Generic((p), const float *: row_max_f, const double *: row_max_d)(p, d)
#define row_sumexp(p, d, m) _Generic((p), const float *: row_sumexp_f, const double *: row_sumexp_d)(p, d, m)
#define param_grads(g, x, st, ns, rows, d, gw, gb) \
    _Generic((g), const float *: param_grads_f, const double *: param_grads_d)(g, x, st, ns, rows, d, gw, gb)

/* Row max m is subtracted before exp. A row with m = -inf (every element -inf) gives
 * zeros (log-softmax: -inf) instead of NaN; a NaN anywhere in a row makes it all NaN. */
moe_status moe_cpu_softmax(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    moe_tensor *o = a->out;
    bool log_out = ((const moe_softmax_attrs *)a->attrs)->log;
    int64_t rows = cpu_rows(x), d = cpu_cols(x);
    CPU_FLOAT_DISPATCH(x->dtype, "softmax",
_Pragma("omp parallel for schedule(static) if (rows * d > 16384)")
        for (int64_t r = 0; r < rows; r++) {
            const T *px = (const T *)x->data + r * d;
            T *po = (T *)o->data + r * d;
            T m = row_max(px, d);
            if (m == -INFINITY) {
                for (int64_t c = 0; c < d; c++) po[c] = log_out ? -INFINITY : (T)0;
            } else if (log_out) {
                T ls = (T)log(row_sumexp(px, d, m)); /* (x - m) - ls keeps f32 precision at large m */
                for (int64_t c = 0; c < d; c++) po[c] = (px[c] - m) - ls;
            } else {
                double s = 0;
                for (int64_t c = 0; c < d; c++) {
                    T e = exp(px[c] - m);
                    po[c] = e;
                    s += e;
                }
                T inv = (T)(1.0 / s);
                for (int64_t c = 0; c < d; c++) po[c] *= inv;
            }
        })
    return MOE_OK;
}

/* in[0] = g, in[1] = y (the forward output). softmax: gx = y * (g - sum(g * y));
 * log-softmax: gx = g - exp(y) * sum(g). */
moe_status moe_cpu_softmax_bwd(const moe_kernel_args *a) {
    const moe_tensor *g = a->in[0], *y = a->in[1];
    moe_tensor *o = a->out;
    bool log_out = ((const moe_softmax_attrs *)a->attrs)->log;
    int64_t rows = cpu_rows(y), d = cpu_cols(y);
    CPU_FLOAT_DISPATCH(y->dtype, "softmax_bwd",
_Pragma("omp parallel for schedule(static) if (rows * d > 16384)")
        for (int64_t r = 0; r < rows; r++) {
            const T *pg = (const T *)g->data + r * d, *py = (const T *)y->data + r * d;
            T *po = (T *)o->data + r * d;
            double s = 0;
            if (log_out) {
                for (int64_t c = 0; c < d; c++) s += pg[c];
                for (int64_t c = 0; c < d; c++) po[c] = pg[c] - exp(py[c]) * (T)s;
            } else {
                for (int64_t c = 0; c < d; c++) s += (double)pg[c] * py[c];
                for (int64_t c = 0; c < d; c++) po[c] = py[c] * (pg[c] - (T)s);
            }
        })
    return MOE_OK;
}

/* out[r] = m + log(sum(exp(x - m))), m the row max; an all -inf row gives -inf. */
moe_status moe_cpu_logsumexp(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    int64_t rows = cpu_rows(x), d = cpu_cols(x);
    CPU_FLOAT_DISPATCH(x->dtype, "logsumexp",
        T *po = (T *)a->out->data;
_Pragma("omp parallel for schedule(static) if (rows * d > 16384)")
        for (int64_t r = 0; r < rows; r++) {
            const T *px = (const T *)x->data + r * d;
            T m = row_max(px, d);
            po[r] = m == -INFINITY ? m : m + (T)log(row_sumexp(px, d, m));
        })
    return MOE_OK;
}

/* y = x * rstd * w (w = in[1] may be NULL), rstd = 1 / sqrt(mean(x^2) + eps) -> out2[r]. */
moe_status moe_cpu_rmsnorm(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0], *w = a->in[1];
    double eps = ((const moe_norm_attrs *)a->attrs)->eps;
    int64_t rows = cpu_rows(x), d = cpu_cols(x);
    CPU_FLOAT_DISPATCH(x->dtype, "rmsnorm",
        const T *pw = w ? (const T *)w->data : NULL;
        T *prs = (T *)a->out2->data;
_Pragma("omp parallel for schedule(static) if (rows * d > 16384)")
        for (int64_t r = 0; r < rows; r++) {
            const T *px = (const T *)x->data + r * d;
            T *po = (T *)a->out->data + r * d;
            double ss = 0;
_Pragma("omp simd reduction(+:ss)")
            for (int64_t c = 0; c < d; c++) ss += (double)px[c] * px[c];
            T rs = (T)(1.0 / sqrt(ss / (double)d + eps));
            prs[r] = rs;
            if (pw)
                for (int64_t c = 0; c < d; c++) po[c] = px[c] * rs * pw[c];
            else
                for (int64_t c = 0; c < d; c++) po[c] = px[c] * rs;
        })
    return MOE_OK;
}

/* in: g, x, w (NULL = 1), rstd. With xh = x * rstd and gh = g * w:
 * gx = rstd * (gh - xh * mean(gh * xh)); out2 (when given) += sum over rows of g * xh. */
moe_status moe_cpu_rmsnorm_bwd(const moe_kernel_args *a) {
    const moe_tensor *g = a->in[0], *x = a->in[1], *w = a->in[2], *st = a->in[3];
    int64_t rows = cpu_rows(x), d = cpu_cols(x);
    CPU_FLOAT_DISPATCH(x->dtype, "rmsnorm_bwd",
        const T *pw = w ? (const T *)w->data : NULL, *prs = (const T *)st->data;
_Pragma("omp parallel for schedule(static) if (rows * d > 16384)")
        for (int64_t r = 0; r < rows; r++) {
            const T *pg = (const T *)g->data + r * d, *px = (const T *)x->data + r * d;
            T *po = (T *)a->out->data + r * d;
            T rs = prs[r];
            double dot = 0;
_Pragma("omp simd reduction(+:dot)")
            for (int64_t c = 0; c < d; c++) dot += (double)(pw ? pg[c] * pw[c] : pg[c]) * (px[c] * rs);
            T k = (T)(dot / (double)d);
            for (int64_t c = 0; c < d; c++) po[c] = rs * ((pw ? pg[c] * pw[c] : pg[c]) - px[c] * rs * k);
        }
        if (a->out2) param_grads((const T *)g->data, (const T *)x->data, prs, 1, rows, d, (T *)a->out2->data, NULL);)
    return MOE_OK;
}

/* y = (x - mean) * rstd * w + b (w, b = in[1], in[2] may be NULL); out2[r] = (mean, rstd),
 * rstd = 1 / sqrt(var + eps) with the biased variance, computed in two passes. */
moe_status moe_cpu_layernorm(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0], *w = a->in[1], *b = a->in[2];
    double eps = ((const moe_norm_attrs *)a->attrs)->eps;
    int64_t rows = cpu_rows(x), d = cpu_cols(x);
    CPU_FLOAT_DISPATCH(x->dtype, "layernorm",
        const T *pw = w ? (const T *)w->data : NULL, *pb = b ? (const T *)b->data : NULL;
        T *pst = (T *)a->out2->data;
_Pragma("omp parallel for schedule(static) if (rows * d > 16384)")
        for (int64_t r = 0; r < rows; r++) {
            const T *px = (const T *)x->data + r * d;
            T *po = (T *)a->out->data + r * d;
            double s = 0, v = 0;
_Pragma("omp simd reduction(+:s)")
            for (int64_t c = 0; c < d; c++) s += px[c];
            double mean = s / (double)d;
_Pragma("omp simd reduction(+:v)")
            for (int64_t c = 0; c < d; c++) v += ((double)px[c] - mean) * ((double)px[c] - mean);
            T mu = (T)mean, rs = (T)(1.0 / sqrt(v / (double)d + eps));
            pst[2 * r] = mu;
            pst[2 * r + 1] = rs;
            for (int64_t c = 0; c < d; c++) {
                T y = (px[c] - mu) * rs;
                if (pw) y *= pw[c];
                po[c] = pb ? y + pb[c] : y;
            }
        })
    return MOE_OK;
}

/* in: g, x, w (NULL = 1), stats (mean, rstd). With xh = (x - mean) * rstd, gh = g * w:
 * gx = rstd * (gh - mean(gh) - xh * mean(gh * xh)); out2 (when given) += [sum g * xh; sum g]. */
moe_status moe_cpu_layernorm_bwd(const moe_kernel_args *a) {
    const moe_tensor *g = a->in[0], *x = a->in[1], *w = a->in[2], *st = a->in[3];
    int64_t rows = cpu_rows(x), d = cpu_cols(x);
    CPU_FLOAT_DISPATCH(x->dtype, "layernorm_bwd",
        const T *pw = w ? (const T *)w->data : NULL, *pst = (const T *)st->data;
_Pragma("omp parallel for schedule(static) if (rows * d > 16384)")
        for (int64_t r = 0; r < rows; r++) {
            const T *pg = (const T *)g->data + r * d, *px = (const T *)x->data + r * d;
            T *po = (T *)a->out->data + r * d;
            T mu = pst[2 * r], rs = pst[2 * r + 1];
            double sg = 0, sgx = 0;
_Pragma("omp simd reduction(+:sg, sgx)")
            for (int64_t c = 0; c < d; c++) {
                T gh = pw ? pg[c] * pw[c] : pg[c];
                sg += gh;
                sgx += (double)gh * ((px[c] - mu) * rs);
            }
            T k0 = (T)(sg / (double)d), k1 = (T)(sgx / (double)d);
            for (int64_t c = 0; c < d; c++)
                po[c] = rs * ((pw ? pg[c] * pw[c] : pg[c]) - k0 - (px[c] - mu) * rs * k1);
        }
        if (a->out2) {
            T *gw = (T *)a->out2->data;
            param_grads((const T *)g->data, (const T *)x->data, pst, 2, rows, d, gw, gw + d);
        })
    return MOE_OK;
}
