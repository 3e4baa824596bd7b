/* CPU grouped expert matmul: one oneDNN product per non-empty expert row range. */
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

moe_status moe_cpu_grouped_matmul(const moe_kernel_args *a) {
    const moe_grouped_attrs *at = a->attrs;
    for (int e = 0; e < at->n_groups; e++) {
        int64_t r0 = at->offsets[e], r1 = at->offsets[e + 1];
        if (r1 == r0) continue;
        moe_tensor xv = rows_view(a->in[0], r0, r1);
        if (at->mode == 2) {
            /* out[e] += x_g^T @ y_g */
            moe_tensor yv = rows_view(a->in[1], r0, r1), ov = expert_view(a->out, e, false);
            moe_tensor xt = xv;
            xt.shape[0] = xv.shape[1];
            xt.shape[1] = xv.shape[0];
            xt.strides[0] = 1;
            xt.strides[1] = xv.shape[1];
            MOE_TRY(moe_cpu_gemm_any_shape(&xt, &yv, &ov, 1.0f, 1.0f));
        } else {
            moe_tensor wv = expert_view(a->in[1], e, at->mode == 1), ov = rows_view(a->out, r0, r1);
            MOE_TRY(moe_cpu_gemm_any_shape(&xv, &wv, &ov, 1.0f, 0.0f));
        }
    }
    return MOE_OK;
}
