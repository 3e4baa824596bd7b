/* CPU optimizer kernels: fused AdamW and momentum-SGD updates in place, the sum of
 * squares for gradient norms and the non-finite check. All tensors arrive contiguous
 * with the parameter's shape and dtype (core/fused.c checks); formulas in core/kernels.h. */
#include <math.h>

#include "core/cpu/cpu_common.h"

/* out=param, out2=m, in[0]=grad, in[1]=v (m, v and param updated in place). */
moe_status moe_cpu_adamw(const moe_kernel_args *a) {
    const moe_adamw_attrs *at = a->attrs;
    int64_t n = moe_tensor_numel(a->out);
    CPU_FLOAT_DISPATCH(a->out->dtype, "adamw",
        T *p = (T *)a->out->data;
        T *m = (T *)a->out2->data;
        T *v = (T *)a->in[1]->data;
        const T *g = (const T *)a->in[0]->data;
        const T lr = at->lr, b1 = at->beta1, b2 = at->beta2, eps = at->eps;
        const T decay = (T)1 - lr * (T)at->weight_decay, scale = at->grad_scale;
        const T bias1 = at->bias1, bias2 = at->bias2;
_Pragma("omp parallel for schedule(static) if (n > 32768)")
        for (int64_t i = 0; i < n; i++) {
            T gi = g[i] * scale;
            T mi = b1 * m[i] + ((T)1 - b1) * gi;
            T vi = b2 * v[i] + ((T)1 - b2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            p[i] = p[i] * decay - lr * (mi / bias1) / (sqrt(vi / bias2) + eps);
        })
    return MOE_OK;
}

/* out=param, out2=momentum buffer (NULL: plain SGD), in[0]=grad. */
moe_status moe_cpu_sgd(const moe_kernel_args *a) {
    const moe_sgd_attrs *at = a->attrs;
    int64_t n = moe_tensor_numel(a->out);
    CPU_FLOAT_DISPATCH(a->out->dtype, "sgd",
        T *p = (T *)a->out->data;
        T *buf = a->out2 ? (T *)a->out2->data : NULL;
        const T *g = (const T *)a->in[0]->data;
        const T lr = at->lr, mu = at->momentum, wd = at->weight_decay, scale = at->grad_scale;
_Pragma("omp parallel for schedule(static) if (n > 32768)")
        for (int64_t i = 0; i < n; i++) {
            T gi = g[i] * scale + wd * p[i];
            if (buf) gi = buf[i] = mu * buf[i] + gi;
            p[i] -= lr * gi;
        })
    return MOE_OK;
}

/* out [1] F32 += sum(in[0]^2), summed in double (in vector lanes: a single running sum
 * waits on each add). */
moe_status moe_cpu_reduce_sq(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    int64_t n = moe_tensor_numel(x);
    double acc = 0;
    CPU_FLOAT_DISPATCH(x->dtype, "reduce_sq",
        const T *px = (const T *)x->data;
_Pragma("omp parallel for simd schedule(static) reduction(+ : acc) if (n > 32768)")
        for (int64_t i = 0; i < n; i++) acc += (double)px[i] * (double)px[i];)
    *(float *)a->out->data += (float)acc;
    return MOE_OK;
}

/* out [1] I32 <- 1 when in[0] holds a NaN or Inf; left unchanged otherwise. */
moe_status moe_cpu_nonfinite(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    int64_t n = moe_tensor_numel(x);
    int bad = 0;
    CPU_FLOAT_DISPATCH(x->dtype, "nonfinite",
        const T *px = (const T *)x->data;
_Pragma("omp parallel for schedule(static) reduction(| : bad) if (n > 32768)")
        for (int64_t i = 0; i < n; i++) bad |= !isfinite(px[i]);)
    if (bad) *(int32_t *)a->out->data = 1;
    return MOE_OK;
}
