/* The top-k softmax router with Switch / z-loss / aux-loss-free balancing. */
#include "router/router.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "core/ops.h"

moe_status moe_router_init(moe_router *r, const moe_router_settings *s, moe_device dev, moe_dtype dt,
                           const char *name, uint64_t seed, double init_std) {
    memset(r, 0, sizeof *r);
    r->s = *s;
    snprintf(r->name, sizeof r->name, "%s.w_gate", name);
    r->w_gate = moe_tensor_randn(MOE_LIFE_PERSIST, dev, dt, 2, (int64_t[]){s->d_model, s->n_experts}, seed, 0, init_std);
    if (!r->w_gate) return moe_last_status();
    moe_param_init(r->w_gate, r->name);
    if (s->balance == MOE_BALANCE_AUX_FREE) {
        r->bias = moe_tensor_zeros(MOE_LIFE_PERSIST, dev, MOE_F32, 1, (int64_t[]){s->n_experts});
        if (!r->bias) return moe_last_status();
    }
    return MOE_OK;
}

void moe_router_free(moe_router *r) {
    moe_tensor_free(r->w_gate);
    moe_tensor_free(r->bias);
    memset(r, 0, sizeof *r);
}

moe_status moe_router_forward(moe_router *r, moe_tensor *x, moe_routing *out) {
    const moe_router_settings *s = &r->s;
    memset(out, 0, sizeof *out);
    int64_t T = x->shape[0];
    int E = s->n_experts, k = s->top_k;
    moe_tensor *logits = moe_cast(moe_matmul(x, r->w_gate), x->dtype == MOE_F64 ? MOE_F64 : MOE_F32);
    moe_tensor *p = moe_softmax(logits);
    if (!p) return moe_last_status();
    moe_tensor *idx = NULL, *vals;
    if (r->bias) {
        /* Selection on p + b, gates from p. */
        bool was = moe_grad_set_enabled(false);
        moe_tensor *biased = moe_add(p, moe_cast(r->bias, p->dtype));
        moe_topk(biased, k, &idx);
        moe_grad_set_enabled(was);
        vals = idx ? moe_gather(p, idx) : NULL;
    } else {
        vals = moe_topk(p, k, &idx);
    }
    if (!vals) return moe_last_status();
    moe_tensor *gates = vals;
    if (s->renormalize && k > 1) gates = moe_div(vals, moe_sum(vals, 1, true));
    if (!gates) return moe_last_status();

    /* The one device -> host read of the layer: expert ids, for counts and permutation. */
    int64_t n = T * k;
    out->host_experts = moe_step_host_alloc(sizeof(int32_t) * (size_t)(n ? n : 1));
    out->load = moe_step_host_alloc(sizeof(int64_t) * (size_t)E);
    if (!out->host_experts || !out->load) return moe_error(MOE_ERR_OOM, "router: out of host memory");
    moe_tensor *ids_host = moe_tensor_to(idx, MOE_CPU, MOE_LIFE_STEP);
    if (!ids_host) return moe_last_status();
    memcpy(out->host_experts, ids_host->data, sizeof(int32_t) * (size_t)n);
    for (int64_t i = 0; i < n; i++) out->load[out->host_experts[i]]++;

    if (s->balance == MOE_BALANCE_SWITCH && s->aux_coef > 0) {
        /* aux = alpha * E * sum_e f_e P_e; f from the hard counts (no grad), P = mean_t p. */
        double *f = malloc(sizeof(double) * (size_t)E);
        for (int e = 0; e < E; e++) f[e] = n ? (double)out->load[e] / (double)n : 0.0;
        moe_tensor *f64 = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 1, (int64_t[]){E}, f);
        free(f);
        moe_tensor *ft = f64 ? moe_tensor_to(moe_cast(f64, p->dtype), p->device, MOE_LIFE_STEP) : NULL;
        moe_tensor *P = moe_mean(p, 0, false);
        out->aux_loss = moe_mul_scalar(moe_sum_all(moe_mul(P, ft)), s->aux_coef * E);
        if (!out->aux_loss) return moe_last_status();
    }
    if (s->z_coef > 0) {
        moe_tensor *lse = moe_logsumexp(logits);
        out->z_loss = moe_mul_scalar(moe_mean(moe_mul(lse, lse), 0, false), s->z_coef);
        if (!out->z_loss) return moe_last_status();
    }
    out->gates = gates;
    out->experts = idx;
    out->probs = p;
    out->n_tokens = T;
    return MOE_OK;
}

moe_status moe_router_update_bias(moe_router *r, const int64_t *load) {
    if (!r->bias) return MOE_OK;
    int E = r->s.n_experts;
    double mean = 0;
    for (int e = 0; e < E; e++) mean += (double)load[e] / E;
    float *b = malloc(sizeof(float) * (size_t)E);
    moe_tensor *h = moe_tensor_to(r->bias, MOE_CPU, MOE_LIFE_STEP);
    if (!b || !h) {
        free(b);
        return moe_last_status();
    }
    memcpy(b, h->data, sizeof(float) * (size_t)E);
    for (int e = 0; e < E; e++) {
        double d = mean - (double)load[e];
        b[e] += (float)(r->s.aux_free_rate * (d > 0 ? 1.0 : d < 0 ? -1.0 : 0.0));
    }
    moe_tensor *nb = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 1, (int64_t[]){E}, b);
    free(b);
    return nb ? moe_tensor_copy_(r->bias, nb) : moe_last_status();
}
