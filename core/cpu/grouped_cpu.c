/* CPU grouped expert matmul: one oneDNN product per non-empty expert row range. */
#include <omp.h>

#include "core/cpu/cpu_common.h"

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
