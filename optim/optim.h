/* Optimizers (AdamW, momentum SGD) over a list of parameters, and global-norm gradient
 * clipping.
 *
 * Usage per training step: backward; moe_clip_grad_norm(...) -> scale (skip the step on
 * MOE_ERR_NUMERIC); moe_optimizer_step(opt, moe_lr_at(&sched, step), scale * avg), where
 * avg = 1/accumulation steps; moe_optimizer_zero_grad(opt). Clipping never rewrites the
 * grads: its scale is folded into the update kernel through grad_scale.
 *
 * Weight decay: by default parameters with ndim < 2 (norm weights, biases, scalars) get
 * none and every matrix / tensor (linear and expert weights, embeddings, routers) gets
 * cfg.weight_decay; a caller-supplied predicate can override the rule.
 *
 * State (AdamW m and v; SGD momentum buffer when momentum > 0) is allocated zeroed at
 * creation as PERSIST tensors on each parameter's device, in the parameter's dtype.
 * The learning rate is not part of the config: each step takes it (from a schedule,
 * optim/schedule.h). */
#ifndef MOE_OPTIM_OPTIM_H
#define MOE_OPTIM_OPTIM_H

#include "core/tensor.h"

typedef enum moe_optim_type { MOE_OPTIM_ADAMW, MOE_OPTIM_SGD } moe_optim_type;

/* Returns true when `param` must not be weight-decayed. */
typedef bool (*moe_no_decay_fn)(const moe_tensor *param, void *ctx);

typedef struct moe_optim_config {
    moe_optim_type type;
    double beta1, beta2, eps; /* AdamW */
    double momentum;          /* SGD, in [0, 1); 0 = plain SGD, no buffer */
    double weight_decay;      /* AdamW: decoupled; SGD: L2 added to the grad */
    moe_no_decay_fn no_decay; /* NULL: the ndim < 2 rule */
    void *no_decay_ctx;
} moe_optim_config;

/* AdamW: betas (0.9, 0.95), eps 1e-8, weight_decay 0.1; SGD: momentum 0.9, no decay. */
moe_optim_config moe_optim_config_default(moe_optim_type type);
/* "adamw" / "sgd" -> type; MOE_ERR_CONFIG naming the accepted values otherwise. */
moe_status moe_optim_type_parse(const char *name, moe_optim_type *out);
const char *moe_optim_type_name(moe_optim_type type);

typedef struct moe_optimizer moe_optimizer;

/* Keeps the parameter pointers (not the array), which must outlive the optimizer.
 * Parameters must be contiguous float PERSIST tensors marked with moe_param_init (f32;
 * f64 also works on the CPU). NULL with moe_last_error() set: MOE_ERR_CONFIG for a bad
 * setting, MOE_ERR_INVALID for a bad parameter, MOE_ERR_OOM. */
moe_optimizer *moe_optimizer_create(moe_tensor *const *params, int n, const moe_optim_config *cfg);
void moe_optimizer_free(moe_optimizer *opt);

/* One update of every parameter that has a grad (parameters without one are skipped and
 * their state is untouched), with learning rate `lr` and the grads multiplied by
 * grad_scale. Increments the step counter first, so the first step is t = 1. */
moe_status moe_optimizer_step(moe_optimizer *opt, double lr, double grad_scale);
/* Zeroes the grads of all parameters. */
moe_status moe_optimizer_zero_grad(moe_optimizer *opt);

/* Checkpoint access. The step counter is the number of steps taken (0 after creation).
 * State of parameter i: AdamW m, v; SGD *m = momentum buffer (NULL without momentum),
 * *v = NULL. The tensors may be read or overwritten in place (e.g. with
 * moe_tensor_copy_ when loading). */
int moe_optimizer_count(const moe_optimizer *opt);
moe_tensor *const *moe_optimizer_params(const moe_optimizer *opt); /* count entries */
bool moe_optimizer_decays(const moe_optimizer *opt, int i); /* does param i get weight decay */
void moe_optimizer_state(const moe_optimizer *opt, int i, moe_tensor **m, moe_tensor **v);
int64_t moe_optimizer_get_step(const moe_optimizer *opt);
void moe_optimizer_set_step(moe_optimizer *opt, int64_t step);
const moe_optim_config *moe_optimizer_config(const moe_optimizer *opt);

/* ---- gradient clipping by the global L2 norm ----
 * Parameters without a grad count as zero. Split for data parallelism:
 *   moe_grad_sumsq_local(params, n, &s); all-reduce s (sum) over ranks;
 *   moe_clip_grad_finish(s, max_norm, &norm, &scale).
 * moe_clip_grad_norm does both on one process. The sum of squares runs on the grads'
 * device with one host read at the end. */
moe_status moe_grad_sumsq_local(moe_tensor *const *params, int n, double *sumsq_out);
/* norm = sqrt(sumsq); scale = min(1, max_norm / (norm + 1e-6)), or 1 when max_norm <= 0
 * (clipping off; the norm is still checked). A NaN/Inf norm gives MOE_ERR_NUMERIC
 * (*norm_out = that norm, *scale_out = 0): the caller must skip the step. */
moe_status moe_clip_grad_finish(double sumsq, double max_norm, double *norm_out, double *scale_out);
/* Both steps; on MOE_ERR_NUMERIC the message also names the first parameter whose grad
 * holds a NaN/Inf (when the norm overflowed without one, it says so). */
moe_status moe_clip_grad_norm(moe_tensor *const *params, int n, double max_norm, double *norm_out,
                              double *scale_out);

#endif
