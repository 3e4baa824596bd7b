/* CPU grouped expert matmul (one oneDNN product per non-empty expert row range) and the
 * gathered SwiGLU experts with their combine. */
#include <omp.h>
#include <stdlib.h>

#include "core/cpu/cpu_common.h"
#include "core/cpu/fast_math.h"

/* A 2-D view of rows [r0, r1) of a contiguous [N, C] tensor. */
static moe_tensor rows_view(const moe_tensor *t, int64_t r0, int64_t r1) {
    moe_tensor v = *t;
    v.ndim = 2;
    v.shape[0] = r1 - r0;
    v.shape[1] = t->shape[1];
    v.strides[0] = t->shape[1];
    v.strides[1] = 1;
    v.data = (char *)t->data + r0 * t->shape[1] * (int64_t)moe_dtype_size(t->dtype);
    return v;
}

/* Expert e's [K, M] matrix of a [E, K, M] tensor, optionally transposed. */
static moe_tensor expert_view(const moe_tensor *w, int64_t e, bool transpose) {
    moe_tensor v = *w;
    int64_t K = w->shape[1], M = w->shape[2];
    v.ndim = 2;
    v.shape[0] = transpose ? M : K;
    v.shape[1] = transpose ? K : M;
    v.strides[0] = transpose ? 1 : M;
    v.strides[1] = transpose ? M : 1;
    v.data = (char *)w->data + e * K * M * (int64_t)moe_dtype_size(w->dtype);
    return v;
}

/* Expert e's product on its rows [r0, r1): mode 0 out_g = x_g @ w[e], mode 1 out_g =
 * x_g @ w[e]^T, mode 2 out[e] += x_g^T @ y_g (in[1] = y). */
static moe_status group_product(const moe_kernel_args *a, int e) {
    const moe_grouped_attrs *at = a->attrs;
    int64_t r0 = at->offsets[e], r1 = at->offsets[e + 1];
    moe_tensor xv = rows_view(a->in[0], r0, r1);
    if (at->mode == 2) {
        moe_tensor yv = rows_view(a->in[1], r0, r1), ov = expert_view(a->out, e, false);
        moe_tensor xt = xv;
        xt.shape[0] = xv.shape[1];
        xt.shape[1] = xv.shape[0];
        xt.strides[0] = 1;
        xt.strides[1] = xv.shape[1];
        return moe_cpu_gemm(&xt, &yv, &ov, 1.0f, 1.0f);
    }
    moe_tensor wv = expert_view(a->in[1], e, at->mode == 1), ov = rows_view(a->out, r0, r1);
    return moe_cpu_gemm(&xv, &wv, &ov, 1.0f, 0.0f);
}

/* Work is proportional to an expert's rows. Experts holding more than a thread's share of
 * all rows run one after another on all threads; in f32 the others are spread over the
 * threads, largest first, one single-threaded sgemm each: with the skewed row counts of
 * training (2 to 1300 rows out of 4096) that is ~10% faster than splitting every small
 * product over the threads. Other dtypes run their primitives (whose cache is not thread
 * safe) one after another. */
moe_status moe_cpu_grouped_matmul(const moe_kernel_args *a) {
    const moe_grouped_attrs *at = a->attrs;
    const int64_t *off = at->offsets;
    if (at->n_groups < 1) return MOE_OK;
    int order[at->n_groups], n = 0;
    for (int e = 0; e < at->n_groups; e++) {
        if (off[e + 1] == off[e]) continue;
        int i = n++;
        for (; i > 0 && off[order[i - 1] + 1] - off[order[i - 1]] < off[e + 1] - off[e]; i--) order[i] = order[i - 1];
        order[i] = e;
    }
    const int64_t total = off[at->n_groups] - off[0], threads = omp_get_max_threads();
    int i = 0;
    for (; i < n && ((off[order[i] + 1] - off[order[i]]) * threads > total || a->in[0]->dtype != MOE_F32); i++)
        MOE_TRY(group_product(a, order[i]));
    bool ok = true;
#pragma omp parallel for schedule(dynamic, 1) reduction(&& : ok)
    for (int j = i; j < n; j++) ok = ok && group_product(a, order[j]) == MOE_OK;
    return ok ? MOE_OK : moe_error(MOE_ERR_DEVICE, "grouped_matmul: oneDNN sgemm failed on an expert's rows");
}

/* Gathered SwiGLU experts (see moe_gathered_swiglu): every (token, slot) pair streams its
 * expert's rows straight from the stacks, an axpy per row, in column blocks spread over
 * the threads: h [P, 2f] = x[t] @ w13[e], out2 [P, f] = swiglu(h), rows [P, d] = out2 @
 * w2[e]; then out [T, d] = the combine of the rows with the gates (the map t k + j). */
#define GATHER_BLOCK 256

moe_status moe_cpu_gathered_swiglu(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0], *ids = a->in[1], *gates = a->in[2], *w13 = a->in[3], *w2 = a->in[4];
    const int64_t k = ids->shape[1], P = x->shape[0] * k, d = x->shape[1], f = w2->shape[1], E = w13->shape[0];
    const int32_t *id = ids->data;
    for (int64_t p = 0; p < P; p++)
        if (id[p] < 0 || id[p] >= E)
            return moe_error(MOE_ERR_INVALID, "gathered_swiglu: expert id %d at position %lld is out of range [0, %lld)",
                             (int)id[p], (long long)p, (long long)E);
    const int64_t nb13 = (2 * f + GATHER_BLOCK - 1) / GATHER_BLOCK, nb2 = (d + GATHER_BLOCK - 1) / GATHER_BLOCK;
    moe_status st = MOE_OK;
    CPU_FLOAT_DISPATCH(x->dtype, "gathered_swiglu",
        T *h = malloc(sizeof(T) * (size_t)(P * (2 * f + d))), *rows = h + P * 2 * f; /* h [P, 2f], rows [P, d] */
        if (!h) return moe_error(MOE_ERR_OOM, "gathered_swiglu: out of host memory for %lld rows", (long long)P);
        const T *xs = x->data, *W13 = w13->data, *W2 = w2->data;
        T *act = a->out2->data;
_Pragma("omp parallel for schedule(static) collapse(2)")
        for (int64_t p = 0; p < P; p++)
            for (int64_t b = 0; b < nb13; b++) {
                int64_t c0 = b * GATHER_BLOCK, c1 = c0 + GATHER_BLOCK < 2 * f ? c0 + GATHER_BLOCK : 2 * f;
                T *hp = h + p * 2 * f;
                const T *xt = xs + (p / k) * d, *we = W13 + (int64_t)id[p] * d * 2 * f;
                for (int64_t c = c0; c < c1; c++) hp[c] = 0;
                for (int64_t i = 0; i < d; i++) {
                    const T xi = xt[i], *row = we + i * 2 * f;
_Pragma("omp simd")
                    for (int64_t c = c0; c < c1; c++) hp[c] += xi * row[c];
                }
            }
_Pragma("omp parallel for schedule(static)")
        for (int64_t p = 0; p < P; p++) {
            const T *hp = h + p * 2 * f;
            T *ap = act + p * f;
_Pragma("omp simd")
            for (int64_t c = 0; c < f; c++) ap[c] = hp[c] / ((T)1 + cpu_exp(-hp[c])) * hp[f + c];
        }
_Pragma("omp parallel for schedule(static) collapse(2)")
        for (int64_t p = 0; p < P; p++)
            for (int64_t b = 0; b < nb2; b++) {
                int64_t c0 = b * GATHER_BLOCK, c1 = c0 + GATHER_BLOCK < d ? c0 + GATHER_BLOCK : d;
                T *yp = rows + p * d;
                const T *ap = act + p * f, *we = W2 + (int64_t)id[p] * f * d;
                for (int64_t c = c0; c < c1; c++) yp[c] = 0;
                for (int64_t i = 0; i < f; i++) {
                    const T ai = ap[i], *row = we + i * d;
_Pragma("omp simd")
                    for (int64_t c = c0; c < c1; c++) yp[c] += ai * row[c];
                }
            }
        st = cpu_combine_rows(x->dtype, rows, gates->data, NULL, x->shape[0], k, d, a->out->data);
        free(h);
    )
    return st;
}
