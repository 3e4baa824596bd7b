/* CPU kernels of the row-wise ops: softmax / log-softmax and its backward, logsumexp,
 * RMSNorm and LayerNorm with their backwards. Every tensor is contiguous [rows, d]
 * (core/ops_norm.c guarantees it); one thread handles a whole row, row sums accumulate
 * in double. Statistics and parameter grads have x's type T. */
#include <stdlib.h>
#include <string.h>

#include "core/cpu/cpu_common.h"
#include "core/cpu/fast_math.h"

/* f32: the vectorising exp of fast_math.h; f64 (the gradcheck reference): libm. */
#define norm_exp(v) cpu_exp(v)

/* Per-type softmax helpers, picked by _Generic on the row pointer. */
#define NORM_DEFINE_HELPERS(T, sfx)                                                          \
    /* Largest element; NaN when any element is NaN (so it propagates). */                  \
    static inline T row_max_##sfx(const T *p, int64_t d) {                                   \
        T m = p[0];                                                                          \
        int nan = 0;                                                                         \
        _Pragma("omp simd reduction(max:m) reduction(|:nan)")                                \
        for (int64_t c = 0; c < d; c++) {                                                    \
            m = p[c] > m ? p[c] : m;                                                         \
            nan |= p[c] != p[c];                                                             \
        }                                                                                    \
        return nan ? (T)NAN : m;                                                             \
    }                                                                                        \
    static inline double row_sumexp_##sfx(const T *p, int64_t d, T m) {                      \
        double s = 0;                                                                        \
        _Pragma("omp simd reduction(+:s)")                                                   \
        for (int64_t c = 0; c < d; c++) s += norm_exp(p[c] - m);                             \
        return s;                                                                            \
    }

NORM_DEFINE_HELPERS(float, f)
NORM_DEFINE_HELPERS(double, d)

#define row_max(p, d) _Generic((p), const float *: row_max_f, const double *: row_max_d)(p, d)
#define row_sumexp(p, d, m) _Generic((p), const float *: row_sumexp_f, const double *: row_sumexp_d)(p, d, m)

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
_Pragma("omp simd reduction(+:s)")
                for (int64_t c = 0; c < d; c++) {
                    T e = norm_exp(px[c] - m);
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
_Pragma("omp simd reduction(+:s)")
                for (int64_t c = 0; c < d; c++) s += pg[c];
                for (int64_t c = 0; c < d; c++) po[c] = pg[c] - norm_exp(py[c]) * (T)s;
            } else {
_Pragma("omp simd reduction(+:s)")
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
    int64_t rows = cpu_rows(x), d = cpu_cols(x), ld = moe_tensor_row_stride(x);
    CPU_FLOAT_DISPATCH(x->dtype, "rmsnorm",
        const T *pw = w ? (const T *)w->data : NULL;
        T *prs = (T *)a->out2->data;
_Pragma("omp parallel for schedule(static) if (rows * d > 16384)")
        for (int64_t r = 0; r < rows; r++) {
            const T *px = (const T *)x->data + r * ld;
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

/* s = x + r -> out2, y = s * rstd * w -> out, rstd as in RMSNORM: the same arithmetic as
 * an ADD kernel then RMSNORM. */
moe_status moe_cpu_add_rmsnorm(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0], *res = a->in[1], *w = a->in[2];
    double eps = ((const moe_norm_attrs *)a->attrs)->eps;
    int64_t rows = cpu_rows(x), d = cpu_cols(x);
    CPU_FLOAT_DISPATCH(x->dtype, "add_rmsnorm",
_Pragma("omp parallel for schedule(static) if (rows * d > 16384)")
        for (int64_t r = 0; r < rows; r++) {
            const T *px = (const T *)x->data + r * d, *pr = (const T *)res->data + r * d, *pw = (const T *)w->data;
            T *ps = (T *)a->out2->data + r * d, *po = (T *)a->out->data + r * d;
            double ss = 0;
            for (int64_t c = 0; c < d; c++) ps[c] = px[c] + pr[c];
_Pragma("omp simd reduction(+:ss)")
            for (int64_t c = 0; c < d; c++) ss += (double)ps[c] * ps[c];
            T rs = (T)(1.0 / sqrt(ss / (double)d + eps));
            for (int64_t c = 0; c < d; c++) po[c] = ps[c] * rs * pw[c];
        })
    return MOE_OK;
}

/* r [rows, d] = a (as [rows, K]) @ b into step memory, then ADD_RMSNORM on x and r. */
moe_status moe_cpu_matmul_add_rmsnorm(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0], *A = a->in[1];
    int64_t rows = cpu_rows(x), K = A->shape[A->ndim - 1];
    moe_tensor *r = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, x->dtype, 2, (int64_t[]){rows, cpu_cols(x)});
    if (!r) return moe_last_status();
    moe_tensor a2 = *A;
    a2.ndim = 2;
    a2.shape[0] = rows, a2.shape[1] = K;
    a2.strides[0] = K, a2.strides[1] = 1;
    MOE_TRY(moe_cpu_gemm(&a2, a->in[2], r, 1.0f, 0.0f));
    moe_kernel_args norm = {.out = a->out, .out2 = a->out2, .in = {x, r, a->in[3]}, .attrs = a->attrs};
    return moe_cpu_add_rmsnorm(&norm);
}

/* y = (x - mean) * rstd * w + b (w, b = in[1], in[2] may be NULL); out2[r] = (mean, rstd),
 * rstd = 1 / sqrt(var + eps) with the biased variance, computed in two passes. */
moe_status moe_cpu_layernorm(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0], *w = a->in[1], *b = a->in[2];
    double eps = ((const moe_norm_attrs *)a->attrs)->eps;
    int64_t rows = cpu_rows(x), d = cpu_cols(x), ld = moe_tensor_row_stride(x);
    CPU_FLOAT_DISPATCH(x->dtype, "layernorm",
        const T *pw = w ? (const T *)w->data : NULL, *pb = b ? (const T *)b->data : NULL;
        T *pst = (T *)a->out2->data;
_Pragma("omp parallel for schedule(static) if (rows * d > 16384)")
        for (int64_t r = 0; r < rows; r++) {
            const T *px = (const T *)x->data + r * ld;
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

/* Row 0 of part [nch, n] += rows 1 .. nch - 1, added in row order: per column the same
 * sums, in the same order, as a loop down the column, but read row by row (contiguous,
 * vectorised) with the columns split into blocks over the threads. */
#define NORM_SUM_COLS 64
static void norm_sum_rows(double *part, int64_t nch, int64_t n) {
#pragma omp parallel for schedule(static) if (nch * n > 16384)
    for (int64_t c0 = 0; c0 < n; c0 += NORM_SUM_COLS) {
        const int64_t c1 = c0 + NORM_SUM_COLS < n ? c0 + NORM_SUM_COLS : n;
        for (int64_t ch = 1; ch < nch; ch++)
#pragma omp simd
            for (int64_t c = c0; c < c1; c++) part[c] += part[ch * n + c];
    }
}

/* Backward of both norms; ns = 1: RMSNorm (stats row = rstd, mean 0), ns = 2: LayerNorm
 * (stats row = mean, rstd). in: g, x, w (NULL = 1), stats. With xh = (x - mean) * rstd and
 * gh = g * w:  gx = rstd * (gh - [ns = 2] mean(gh) - xh * mean(gh * xh)).
 * out2 (when given) += the row sums [sum g * xh; and for ns = 2, sum g]. They are formed
 * in the same pass: each chunk of rows (a size fixed by `rows` alone, so the result does
 * not depend on the thread count) sums into its own double partial, and the partials are
 * then added in chunk order (norm_sum_rows). */
static moe_status norm_bwd(const moe_kernel_args *a, int ns, const char *kname) {
    const moe_tensor *g = a->in[0], *x = a->in[1], *w = a->in[2], *st = a->in[3];
    int64_t rows = cpu_rows(x), d = cpu_cols(x);
    int64_t chunk = (rows + 255) / 256 > 8 ? (rows + 255) / 256 : 8, nch = (rows + chunk - 1) / chunk;
    double *part = NULL;
    CPU_FLOAT_DISPATCH(x->dtype, kname,
        if (a->out2 && !(part = malloc(sizeof(double) * (size_t)(nch * ns * d))))
            return moe_error(MOE_ERR_OOM, "%s: out of host memory for %lld x %lld partial sums", kname,
                             (long long)nch, (long long)(ns * d));
        const T *pw = w ? (const T *)w->data : NULL, *pst = (const T *)st->data;
_Pragma("omp parallel for schedule(static) if (rows * d > 16384)")
        for (int64_t ch = 0; ch < nch; ch++) {
            double *acc = part ? part + ch * ns * d : NULL;
            if (acc) memset(acc, 0, sizeof(double) * (size_t)(ns * d));
            int64_t r1 = (ch + 1) * chunk < rows ? (ch + 1) * chunk : rows;
            for (int64_t r = ch * chunk; r < r1; r++) {
                const T *pg = (const T *)g->data + r * d, *px = (const T *)x->data + r * d;
                T *po = (T *)a->out->data + r * d;
                T mu = ns == 2 ? pst[2 * r] : (T)0, rs = pst[ns * r + ns - 1];
                double sg = 0, sgx = 0;
_Pragma("omp simd reduction(+:sg, sgx)")
                for (int64_t c = 0; c < d; c++) {
                    T gh = pw ? pg[c] * pw[c] : pg[c];
                    sg += gh;
                    sgx += (double)gh * ((px[c] - mu) * rs);
                }
                T k0 = ns == 2 ? (T)(sg / (double)d) : (T)0, k1 = (T)(sgx / (double)d);
_Pragma("omp simd")
                for (int64_t c = 0; c < d; c++) {
                    T xh = (px[c] - mu) * rs;
                    po[c] = rs * ((pw ? pg[c] * pw[c] : pg[c]) - k0 - xh * k1);
                }
                if (acc) {
_Pragma("omp simd")
                    for (int64_t c = 0; c < d; c++) acc[c] += (double)pg[c] * ((px[c] - mu) * rs);
                    if (ns == 2)
_Pragma("omp simd")
                        for (int64_t c = 0; c < d; c++) acc[d + c] += pg[c];
                }
            }
        }
        if (part) {
            T *gp = (T *)a->out2->data;
            norm_sum_rows(part, nch, ns * d);
            for (int64_t c = 0; c < ns * d; c++) gp[c] += (T)part[c];
        })
    free(part);
    return MOE_OK;
}

moe_status moe_cpu_rmsnorm_bwd(const moe_kernel_args *a) { return norm_bwd(a, 1, "rmsnorm_bwd"); }
moe_status moe_cpu_layernorm_bwd(const moe_kernel_args *a) { return norm_bwd(a, 2, "layernorm_bwd"); }
