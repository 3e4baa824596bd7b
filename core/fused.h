/* Fused in-place optimizer updates and gradient statistics (no autograd, no allocation).
 *
 * The public door to the ADAMW, SGD, REDUCE_SQ and NONFINITE kernels for optim/: each
 * call checks its tensors, then runs one kernel per tensor on the tensors' device, so a
 * CUDA training step never copies parameters, grads or state to the host. Tensors must
 * be contiguous, on one device, and share dtype and shape; parameters are F32 (master
 * weights; F64 also works on the CPU). Errors: MOE_ERR_INVALID naming the function and
 * the shapes, or the backend's error. */
#ifndef MOE_CORE_FUSED_H
#define MOE_CORE_FUSED_H

#include "core/tensor.h"

typedef struct moe_adamw_params {
    double lr, beta1, beta2, eps;
    double weight_decay; /* decoupled: p -= lr * weight_decay * p (0 for no-decay params) */
    double grad_scale;   /* the grad is multiplied by this first (clipping, averaging) */
    int64_t step;        /* t >= 1 of this update, for the bias corrections 1 - beta^t */
} moe_adamw_params;

typedef struct moe_sgd_params {
    double lr, momentum;
    double weight_decay; /* L2 as in torch.optim.SGD: g += weight_decay * p after scaling */
    double grad_scale;
} moe_sgd_params;

/* AdamW (Loshchilov & Hutter) on one parameter; m and v are updated in place:
 *   g = grad*grad_scale; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
 *   p -= lr*wd*p; p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps). */
moe_status moe_fused_adamw(moe_tensor *param, const moe_tensor *grad, moe_tensor *m,
                           moe_tensor *v, const moe_adamw_params *p);

/* Momentum SGD on one parameter: g = grad*grad_scale + wd*p; buf = momentum*buf + g;
 * p -= lr*buf. `buf` may be NULL only when momentum is 0 (then p -= lr*g). */
moe_status moe_fused_sgd(moe_tensor *param, const moe_tensor *grad, moe_tensor *buf,
                         const moe_sgd_params *p);

/* acc[0] += sum over the n tensors of sum(x^2). acc is a [1] F32 tensor on the tensors'
 * device; nothing is read back to the host. */
moe_status moe_fused_sumsq(const moe_tensor *const *ts, int n, moe_tensor *acc);

/* flag[0] = 1 when t holds a NaN or an Inf; otherwise flag is left as it was, so one
 * zeroed [1] I32 flag on t's device can collect several tensors. */
moe_status moe_fused_nonfinite(const moe_tensor *t, moe_tensor *flag);

#endif
