/* Checks and launches for core/fused.h: the optimizer kernels (ADAMW, SGD) and the
 * gradient statistics (REDUCE_SQ, NONFINITE). Semantics are documented in core/kernels.h. */
#include <math.h>

#include "core/fused.h"
#include "core/op_internal.h"

/* A parameter the update kernels accept: contiguous and float, not bf16. */
static bool fused_param_ok(const char *fn, const moe_tensor *p) {
    return moe_check(moe_dtype_is_float(p->dtype) && p->dtype != MOE_BF16, fn,
                     "parameter %s must be f32 (keep f32 master weights for bf16 models)", D(p)) &&
           moe_check(moe_tensor_is_contiguous(p), fn, "parameter %s must be contiguous", D(p));
}

/* x (grad or optimizer state) must have the device, dtype and shape of the parameter. */
static bool fused_match(const char *fn, const char *what, const moe_tensor *param, const moe_tensor *x) {
    return moe_check(x->device == param->device && x->dtype == param->dtype &&
                         moe_tensor_same_shape(x, param) && moe_tensor_is_contiguous(x),
                     fn, "%s %s does not match parameter %s (same device, dtype, shape; contiguous)",
                     what, D(x), D(param));
}

/* A [1] accumulator of dtype dt on x's device. */
static bool fused_scalar_ok(const char *fn, const moe_tensor *acc, moe_dtype dt, const moe_tensor *x) {
    return moe_check(moe_tensor_numel(acc) == 1 && acc->dtype == dt && acc->device == x->device, fn,
                     "accumulator %s must be one %s element on the device of %s", D(acc),
                     moe_dtype_name(dt), D(x));
}

moe_status moe_fused_adamw(moe_tensor *param, const moe_tensor *grad, moe_tensor *m,
                           moe_tensor *v, const moe_adamw_params *p) {
    MOE_ASSERT(param && grad && m && v && p, "adamw: NULL argument");
    MOE_ASSERT(p->step >= 1, "adamw: step %lld must be >= 1", (long long)p->step);
    if (!fused_param_ok("adamw", param) || !fused_match("adamw", "grad", param, grad) ||
        !fused_match("adamw", "m", param, m) || !fused_match("adamw", "v", param, v))
        return moe_last_status();
    moe_adamw_attrs at = {
        .lr = (float)p->lr, .beta1 = (float)p->beta1, .beta2 = (float)p->beta2, .eps = (float)p->eps,
        .weight_decay = (float)p->weight_decay, .grad_scale = (float)p->grad_scale,
        .bias1 = (float)(1.0 - pow(p->beta1, (double)p->step)),
        .bias2 = (float)(1.0 - pow(p->beta2, (double)p->step)),
    };
    moe_kernel_args args = {.out = param, .out2 = m, .in = {grad, v}, .attrs = &at};
    return moe_kernel_run(MOE_K_ADAMW, &args);
}

moe_status moe_fused_sgd(moe_tensor *param, const moe_tensor *grad, moe_tensor *buf,
                         const moe_sgd_params *p) {
    MOE_ASSERT(param && grad && p, "sgd: NULL argument");
    MOE_ASSERT(buf || p->momentum == 0.0, "sgd: momentum %g needs a buffer", p->momentum);
    if (!fused_param_ok("sgd", param) || !fused_match("sgd", "grad", param, grad) ||
        (buf && !fused_match("sgd", "momentum buffer", param, buf)))
        return moe_last_status();
    moe_sgd_attrs at = {.lr = (float)p->lr, .momentum = (float)p->momentum,
                        .weight_decay = (float)p->weight_decay, .grad_scale = (float)p->grad_scale};
    moe_kernel_args args = {.out = param, .out2 = buf, .in = {grad}, .attrs = &at};
    return moe_kernel_run(MOE_K_SGD, &args);
}

moe_status moe_fused_sumsq(const moe_tensor *const *ts, int n, moe_tensor *acc) {
    MOE_ASSERT(acc && (ts || n == 0), "sumsq: NULL argument");
    for (int i = 0; i < n; i++) {
        const moe_tensor *t = ts[i];
        MOE_ASSERT(t, "sumsq: tensor %d is NULL", i);
        if (!fused_scalar_ok("sumsq", acc, MOE_F32, t) ||
            !moe_check(moe_dtype_is_float(t->dtype) && moe_tensor_is_contiguous(t), "sumsq",
                       "tensor %d %s must be float and contiguous", i, D(t)))
            return moe_last_status();
        if (moe_tensor_numel(t) == 0) continue;
        moe_kernel_args args = {.out = acc, .in = {t}};
        MOE_TRY(moe_kernel_run(MOE_K_REDUCE_SQ, &args));
    }
    return MOE_OK;
}

moe_status moe_fused_nonfinite(const moe_tensor *t, moe_tensor *flag) {
    MOE_ASSERT(t && flag, "nonfinite: NULL argument");
    if (!fused_scalar_ok("nonfinite", flag, MOE_I32, t) ||
        !moe_check(moe_dtype_is_float(t->dtype) && moe_tensor_is_contiguous(t), "nonfinite",
                   "tensor %s must be float and contiguous", D(t)))
        return moe_last_status();
    if (moe_tensor_numel(t) == 0) return MOE_OK;
    moe_kernel_args args = {.out = flag, .in = {t}};
    return moe_kernel_run(MOE_K_NONFINITE, &args);
}
