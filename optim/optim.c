/* AdamW / SGD over a parameter list with fused in-place updates (core/fused.h), and
 * global-norm gradient clipping that returns a scale instead of rewriting the grads. */
#include "optim/optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/fused.h"

typedef struct optim_slot {
    moe_tensor *param;
    moe_tensor *m, *v; /* AdamW moments; SGD: m = momentum buffer or NULL, v = NULL */
    bool decay;
} optim_slot;

struct moe_optimizer {
    moe_optim_config cfg;
    int n;
    int64_t step;
    moe_tensor **params; /* n, for moe_optimizer_params and zero_grad */
    optim_slot *slots;
};

moe_optim_config moe_optim_config_default(moe_optim_type type) {
    if (type == MOE_OPTIM_SGD) return (moe_optim_config){.type = type, .momentum = 0.9};
    return (moe_optim_config){.type = type, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};
}

static const char *const optim_names[] = {[MOE_OPTIM_ADAMW] = "adamw", [MOE_OPTIM_SGD] = "sgd"};

const char *moe_optim_type_name(moe_optim_type type) {
    MOE_ASSERT((unsigned)type < sizeof optim_names / sizeof *optim_names, "bad optimizer type %d", (int)type);
    return optim_names[type];
}

moe_status moe_optim_type_parse(const char *name, moe_optim_type *out) {
    for (size_t i = 0; i < sizeof optim_names / sizeof *optim_names; i++)
        if (strcmp(name, optim_names[i]) == 0) {
            *out = (moe_optim_type)i;
            return MOE_OK;
        }
    return moe_error(MOE_ERR_CONFIG, "unknown optimizer '%s': use adamw or sgd", name);
}

static moe_status optim_check_config(const moe_optim_config *c) {
    if (c->type == MOE_OPTIM_ADAMW) {
        if (!(c->beta1 >= 0 && c->beta1 < 1) || !(c->beta2 >= 0 && c->beta2 < 1))
            return moe_error(MOE_ERR_CONFIG, "adamw: betas (%g, %g) must lie in [0, 1)", c->beta1, c->beta2);
        if (!(c->eps > 0)) return moe_error(MOE_ERR_CONFIG, "adamw: eps %g must be > 0", c->eps);
    } else if (c->type == MOE_OPTIM_SGD) {
        if (!(c->momentum >= 0 && c->momentum < 1))
            return moe_error(MOE_ERR_CONFIG, "sgd: momentum %g must lie in [0, 1)", c->momentum);
    } else {
        return moe_error(MOE_ERR_CONFIG, "unknown optimizer type %d: use adamw or sgd", (int)c->type);
    }
    if (!(c->weight_decay >= 0 && isfinite(c->weight_decay)))
        return moe_error(MOE_ERR_CONFIG, "%s: weight_decay %g must be finite and >= 0",
                         moe_optim_type_name(c->type), c->weight_decay);
    return MOE_OK;
}

static moe_tensor *optim_state_new(const moe_tensor *p) {
    return moe_tensor_zeros(MOE_LIFE_PERSIST, p->device, p->dtype, p->ndim, p->shape);
}

moe_optimizer *moe_optimizer_create(moe_tensor *const *params, int n, const moe_optim_config *cfg) {
    MOE_ASSERT(cfg && n >= 0 && (params || n == 0), "optimizer: bad arguments");
    if (optim_check_config(cfg) != MOE_OK) return NULL;
    for (int i = 0; i < n; i++) {
        const moe_tensor *p = params[i];
        MOE_ASSERT(p && p->is_param, "optimizer: parameter %d is not a parameter (moe_param_init)", i);
        if (!moe_dtype_is_float(p->dtype) || p->dtype == MOE_BF16 || !moe_tensor_is_contiguous(p)) {
            char b[96];
            moe_error(MOE_ERR_INVALID, "optimizer: parameter '%s' %s must be contiguous f32 (f32 master weights)",
                      p->name ? p->name : "?", moe_tensor_describe(p, b, sizeof b));
            return NULL;
        }
    }
    moe_optimizer *opt = calloc(1, sizeof *opt);
    if (opt) {
        opt->params = calloc((size_t)n + 1, sizeof *opt->params);
        opt->slots = calloc((size_t)n + 1, sizeof *opt->slots);
    }
    if (!opt || !opt->params || !opt->slots) {
        moe_optimizer_free(opt);
        moe_error(MOE_ERR_OOM, "optimizer: out of host memory for %d parameters", n);
        return NULL;
    }
    opt->cfg = *cfg;
    opt->n = n;
    bool need_m = cfg->type == MOE_OPTIM_ADAMW || cfg->momentum > 0, need_v = cfg->type == MOE_OPTIM_ADAMW;
    for (int i = 0; i < n; i++) {
        optim_slot *s = &opt->slots[i];
        opt->params[i] = s->param = params[i];
        s->decay = !(cfg->no_decay ? cfg->no_decay(params[i], cfg->no_decay_ctx) : params[i]->ndim < 2);
        if ((need_m && !(s->m = optim_state_new(params[i]))) || (need_v && !(s->v = optim_state_new(params[i])))) {
            moe_error_context(moe_last_status(), "optimizer state for '%s': ", params[i]->name ? params[i]->name : "?");
            moe_optimizer_free(opt);
            return NULL;
        }
    }
    return opt;
}

void moe_optimizer_free(moe_optimizer *opt) {
    if (!opt) return;
    for (int i = 0; opt->slots && i < opt->n; i++) {
        if (opt->slots[i].m) moe_tensor_free(opt->slots[i].m);
        if (opt->slots[i].v) moe_tensor_free(opt->slots[i].v);
    }
    free(opt->slots);
    free(opt->params);
    free(opt);
}

moe_status moe_optimizer_step(moe_optimizer *opt, double lr, double grad_scale) {
    MOE_ASSERT(opt, "optimizer: NULL");
    if (!isfinite(lr) || lr < 0 || !isfinite(grad_scale) || grad_scale < 0)
        return moe_error(MOE_ERR_INVALID, "optimizer step: lr %g and grad_scale %g must be finite and >= 0",
                         lr, grad_scale);
    const moe_optim_config *c = &opt->cfg;
    int64_t t = ++opt->step;
    for (int i = 0; i < opt->n; i++) {
        optim_slot *s = &opt->slots[i];
        if (!s->param->grad) continue;
        double wd = s->decay ? c->weight_decay : 0.0;
        moe_status st;
        if (c->type == MOE_OPTIM_ADAMW) {
            moe_adamw_params ap = {.lr = lr, .beta1 = c->beta1, .beta2 = c->beta2, .eps = c->eps,
                                   .weight_decay = wd, .grad_scale = grad_scale, .step = t};
            st = moe_fused_adamw(s->param, s->param->grad, s->m, s->v, &ap);
        } else {
            moe_sgd_params sp = {.lr = lr, .momentum = c->momentum, .weight_decay = wd, .grad_scale = grad_scale};
            st = moe_fused_sgd(s->param, s->param->grad, s->m, &sp);
        }
        if (st != MOE_OK)
            return moe_error_context(st, "optimizer step %lld, parameter '%s': ", (long long)t,
                                     s->param->name ? s->param->name : "?");
    }
    return MOE_OK;
}

moe_status moe_optimizer_zero_grad(moe_optimizer *opt) { return moe_zero_grad(opt->params, opt->n); }

int moe_optimizer_count(const moe_optimizer *opt) { return opt->n; }
moe_tensor *const *moe_optimizer_params(const moe_optimizer *opt) { return opt->params; }
const moe_optim_config *moe_optimizer_config(const moe_optimizer *opt) { return &opt->cfg; }
int64_t moe_optimizer_get_step(const moe_optimizer *opt) { return opt->step; }

bool moe_optimizer_decays(const moe_optimizer *opt, int i) {
    MOE_ASSERT(i >= 0 && i < opt->n, "optimizer: parameter index %d out of [0, %d)", i, opt->n);
    return opt->slots[i].decay;
}

void moe_optimizer_state(const moe_optimizer *opt, int i, moe_tensor **m, moe_tensor **v) {
    MOE_ASSERT(i >= 0 && i < opt->n, "optimizer: parameter index %d out of [0, %d)", i, opt->n);
    if (m) *m = opt->slots[i].m;
    if (v) *v = opt->slots[i].v;
}

void moe_optimizer_set_step(moe_optimizer *opt, int64_t step) {
    MOE_ASSERT(step >= 0, "optimizer: step %lld must be >= 0", (long long)step);
    opt->step = step;
}

/* ---- clipping ---- */

/* The device of the first grad (CPU when none); all grads must share it. */
static moe_status clip_grads_device(moe_tensor *const *params, int n, moe_device *dev) {
    const moe_tensor *first = NULL;
    for (int i = 0; i < n; i++) {
        const moe_tensor *g = params[i]->grad;
        if (!g) continue;
        if (!first) first = g;
        else if (g->device != first->device)
            return moe_error(MOE_ERR_INVALID, "clip_grad_norm: grads on %s and %s ('%s'): keep all parameters on one device",
                             moe_device_name(first->device), moe_device_name(g->device),
                             params[i]->name ? params[i]->name : "?");
    }
    *dev = first ? first->device : MOE_CPU;
    return MOE_OK;
}

moe_status moe_grad_sumsq_local(moe_tensor *const *params, int n, double *sumsq_out) {
    moe_device dev;
    MOE_TRY(clip_grads_device(params, n, &dev));
    moe_tensor *acc = moe_tensor_zeros(MOE_LIFE_STEP, dev, MOE_F32, 1, (int64_t[]){1});
    if (!acc) return moe_error_context(moe_last_status(), "clip_grad_norm: ");
    for (int i = 0; i < n; i++) {
        const moe_tensor *g = params[i]->grad;
        if (g) MOE_TRY(moe_fused_sumsq(&g, 1, acc));
    }
    return moe_tensor_to_host_f64(acc, sumsq_out);
}

moe_status moe_clip_grad_finish(double sumsq, double max_norm, double *norm_out, double *scale_out) {
    double norm = sqrt(sumsq);
    *norm_out = norm;
    if (!isfinite(norm)) {
        *scale_out = 0.0;
        return moe_error(MOE_ERR_NUMERIC, "gradient norm is %g: skip this step (lower the lr or check the data)", norm);
    }
    *scale_out = max_norm > 0 ? fmin(1.0, max_norm / (norm + 1e-6)) : 1.0;
    return MOE_OK;
}

/* Index of the first parameter whose grad holds a NaN/Inf, -1 when none. */
static moe_status clip_find_nonfinite(moe_tensor *const *params, int n, moe_device dev, int *bad) {
    *bad = -1;
    moe_tensor *flag = moe_tensor_zeros(MOE_LIFE_STEP, dev, MOE_I32, 1, (int64_t[]){1});
    if (!flag) return moe_last_status();
    for (int i = 0; i < n && *bad < 0; i++) {
        if (!params[i]->grad) continue;
        double f;
        MOE_TRY(moe_fused_nonfinite(params[i]->grad, flag));
        MOE_TRY(moe_tensor_to_host_f64(flag, &f));
        if (f != 0) *bad = i;
    }
    return MOE_OK;
}

moe_status moe_clip_grad_norm(moe_tensor *const *params, int n, double max_norm, double *norm_out,
                              double *scale_out) {
    double sumsq;
    MOE_TRY(moe_grad_sumsq_local(params, n, &sumsq));
    moe_status st = moe_clip_grad_finish(sumsq, max_norm, norm_out, scale_out);
    if (st != MOE_ERR_NUMERIC) return st;
    /* Slow path, only on failure: one host read per parameter to name the culprit. */
    moe_device dev;
    int bad = -1;
    if (clip_grads_device(params, n, &dev) != MOE_OK || clip_find_nonfinite(params, n, dev, &bad) != MOE_OK)
        return moe_error(MOE_ERR_NUMERIC, "gradient norm is %g: skip this step", *norm_out);
    if (bad < 0)
        return moe_error(MOE_ERR_NUMERIC, "gradient norm is %g although every grad is finite (overflow of the "
                         "sum of squares): skip this step and lower the lr", *norm_out);
    return moe_error(MOE_ERR_NUMERIC, "gradient norm is %g: the grad of parameter '%s' holds NaN/Inf; "
                     "skip this step (lower the lr or check the data)", *norm_out,
                     params[bad]->name ? params[bad]->name : "?");
}
