/* The routers (top-k, RMoE, OT) with Switch / latency / aux-loss-free balancing and the
 * z-loss. */
#include "router/router.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/dist.h"
#include "core/memory.h"
#include "core/ops.h"
#include "router/latency.h"
#include "router/ot.h"
#include "router/rmoe.h"

static moe_tensor *named_param(moe_init_mode mode, moe_device dev, moe_dtype dt, int64_t rows, int64_t cols,
                               uint64_t seed, uint64_t offset, double std, const char *name) {
    moe_tensor *t = moe_tensor_init_normal(mode, MOE_LIFE_PERSIST, dev, dt, 2, (int64_t[]){rows, cols}, seed, offset, std);
    if (t) moe_param_init(t, name);
    return t;
}

moe_status moe_router_init(moe_router *r, const moe_router_settings *s, moe_device dev, moe_dtype dt,
                           const char *name, uint64_t seed, double init_std) {
    memset(r, 0, sizeof *r);
    r->s = *s;
    int64_t d = s->d_model, E = s->n_experts;
    if (s->type == MOE_ROUTER_RMOE) {
        MOE_ASSERT(s->gru && s->gru->dim == s->rmoe_dim, "rmoe router %s: settings.gru must be the model's GRU of "
                   "width rmoe_dim=%d", name, s->rmoe_dim);
        int64_t p = s->rmoe_dim;
        snprintf(r->name_proj, sizeof r->name_proj, "%s.proj", name);
        snprintf(r->name_head, sizeof r->name_head, "%s.head", name);
        r->proj = named_param(s->init, dev, dt, d, p, seed, 0, init_std, r->name_proj);
        r->head = r->proj ? named_param(s->init, dev, dt, p, E, seed, (uint64_t)(d * p), init_std, r->name_head) : NULL;
        if (!r->head) return moe_last_status();
    } else {
        snprintf(r->name, sizeof r->name, "%s.w_gate", name);
        r->w_gate = named_param(s->init, dev, dt, d, E, seed, 0, init_std, r->name);
        if (!r->w_gate) return moe_last_status();
    }
    if (s->noisy_gating) { /* zero init: noise std softplus(0) = 0.69 at the start, as in Shazeer et al. */
        snprintf(r->name_noise, sizeof r->name_noise, "%s.w_noise", name);
        r->w_noise = moe_tensor_zeros(MOE_LIFE_PERSIST, dev, dt, 2, (int64_t[]){d, E});
        if (!r->w_noise) return moe_last_status();
        moe_param_init(r->w_noise, r->name_noise);
    }
    if (s->balance == MOE_BALANCE_AUX_FREE && s->type != MOE_ROUTER_OT) {
        r->bias = moe_tensor_zeros(MOE_LIFE_PERSIST, dev, MOE_F32, 1, (int64_t[]){E});
        if (!r->bias) return moe_last_status();
    }
    return MOE_OK;
}

void moe_router_free(moe_router *r) {
    moe_tensor_free(r->w_gate);
    moe_tensor_free(r->proj);
    moe_tensor_free(r->head);
    moe_tensor_free(r->w_noise);
    moe_tensor_free(r->bias);
    free(r->latency_alpha);
    memset(r, 0, sizeof *r);
}

int moe_router_params(const moe_router *r, moe_tensor **ts, const char **names, int cap) {
    moe_tensor *t[3] = {r->w_gate, NULL, NULL};
    const char *n[3] = {r->name, NULL, NULL};
    int count = 1;
    if (r->s.type == MOE_ROUTER_RMOE) {
        t[0] = r->proj, t[1] = r->head, n[0] = r->name_proj, n[1] = r->name_head;
        count = 2;
    }
    if (r->w_noise) {
        t[count] = r->w_noise;
        n[count++] = r->name_noise;
    }
    for (int i = 0; i < count && i < cap; i++) {
        ts[i] = t[i];
        names[i] = n[i];
    }
    return count;
}

/* topk's and ot's logits x W_g in x's dtype. */
static moe_tensor *gate_projection(const moe_router *r, moe_tensor *x) {
    return moe_matmul(x, moe_cast(r->w_gate, x->dtype));
}

moe_tensor *moe_router_logits(moe_router *r, moe_tensor *x, moe_tensor *state_in, moe_tensor **state_out) {
    if (!x) return NULL;
    moe_dtype rdt = x->dtype == MOE_F64 ? MOE_F64 : MOE_F32; /* the projection runs in x's dtype */
    if (r->s.type != MOE_ROUTER_RMOE) return moe_cast(gate_projection(r, x), rdt);
    moe_tensor *xp = moe_cast(moe_matmul(x, moe_cast(r->proj, x->dtype)), rdt);
    moe_tensor *h = state_in;
    if (h && r->s.rmoe_detach) /* the same values, no tape history: no gradient into earlier layers */
        h = moe_tensor_view_raw(state_in, state_in->ndim, state_in->shape, state_in->strides, 0);
    *state_out = moe_rmoe_gru_step(r->s.gru, xp, h);
    return moe_matmul(*state_out, moe_cast(r->head, rdt));
}

/* Phi(z), the standard normal CDF, in its tanh form (as GELU uses), built from ops. */
static moe_tensor *normal_cdf(moe_tensor *z) {
    moe_tensor *cube = moe_mul(moe_mul(z, z), z);
    moe_tensor *u = moe_mul_scalar(moe_add(z, moe_mul_scalar(cube, 0.044715)), 0.7978845608028654);
    return moe_mul_scalar(moe_add_scalar(moe_tanh(u), 1.0), 0.5);
}

/* Noisy top-k gating (Shazeer et al. 2017): H = logits + eps * softplus(x W_noise), eps
 * ~ N(0, 1) from the Philox counter. Also the smooth load estimate sum_t P(e in top-k):
 * with threshold_te the k-th largest noisy logit of token t among the other experts,
 * P = Phi((clean_te - threshold_te) / std_te) — differentiable in the clean logits and the
 * noise, so the balance loss reaches experts that were not chosen. */
static moe_tensor *add_noise(moe_router *r, moe_tensor *x, moe_tensor *clean, moe_routing *out) {
    int64_t T = clean->shape[0];
    int E = r->s.n_experts, k = r->s.top_k;
    MOE_ASSERT(k <= 64, "noisy gating: top_k %d > 64", k);
    moe_dtype rdt = clean->dtype;
    moe_tensor *std = moe_add_scalar(moe_softplus(moe_cast(moe_matmul(x, moe_cast(r->w_noise, x->dtype)), rdt)), 1e-2);
    /* rank r's rows are rows r*T.. of the global batch: the same draws as on one process */
    uint64_t base = r->noise_counter + (uint64_t)moe_dist_world_rank() * (uint64_t)(T * E);
    moe_tensor *eps = moe_tensor_randn(MOE_LIFE_STEP, clean->device, rdt, 2, (int64_t[]){T, E}, 0x6e6f697365ull, base, 1.0);
    r->noise_counter += (uint64_t)(T * E);
    moe_tensor *noisy = moe_add(clean, moe_mul(eps, std));
    if (!noisy || k >= E) return noisy; /* every expert chosen: no load to smooth */
    /* thresholds on the host (no gradient through them, as a constant of the estimate) */
    moe_tensor *nh = moe_tensor_to(noisy, MOE_CPU, MOE_LIFE_STEP);
    moe_tensor *th = nh ? moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){T, E}) : NULL;
    double *v = th ? moe_step_host_alloc(sizeof(double) * (size_t)(T * E)) : NULL;
    if (!v || moe_tensor_to_host_f64(nh, v) != MOE_OK) return NULL;
    double *thr = th->data;
    for (int64_t t = 0; t < T; t++) {
        const double *row = v + t * E;
        double top[65]; /* the k + 1 largest, descending (k < E <= 1024, k <= 64) */
        int m = 0;
        for (int e = 0; e < E; e++) {
            int j = m < k + 1 ? m++ : k + 1;
            if (j == k + 1 && row[e] <= top[k]) continue;
            if (j == k + 1) j = k;
            while (j > 0 && top[j - 1] < row[e]) {
                top[j] = top[j - 1];
                j--;
            }
            top[j] = row[e];
        }
        for (int e = 0; e < E; e++) thr[t * E + e] = row[e] >= top[k - 1] ? top[k] : top[k - 1];
    }
    moe_tensor *thd = moe_tensor_to(moe_cast(th, rdt), clean->device, MOE_LIFE_STEP);
    out->smooth_load = moe_sum(normal_cdf(moe_div(moe_sub(clean, thd), std)), 0, false);
    return out->smooth_load ? noisy : NULL;
}

/* The k largest of v[0..n) (ties: lower index first) into out, descending. */
static void host_topk(const double *v, int n, int k, int32_t *out) {
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < n; e++) {
            bool taken = false;
            for (int q = 0; q < j && !taken; q++) taken = out[q] == e;
            if (!taken && (best < 0 || v[e] > v[best])) best = e;
        }
        out[j] = best;
    }
}

/* Group-limited selection on the host: per token, selection score c = p (+ bias); group
 * score = sum of the group's top-2 c; experts outside the best topk_groups groups get c = 0;
 * then the top k of c. Gates are p at the chosen experts. */
static moe_tensor *select_grouped(const moe_router *r, moe_tensor *p, moe_tensor **idx) {
    int64_t T = p->shape[0];
    int E = r->s.n_experts, k = r->s.top_k, G = r->s.n_groups, per = E / G, tg = r->s.topk_groups;
    double *c = moe_step_host_alloc(sizeof(double) * (size_t)(T * E + E + G));
    int32_t *ids = moe_step_host_alloc(sizeof(int32_t) * (size_t)(T * k + G + 2));
    if (!c || !ids) {
        moe_error(MOE_ERR_OOM, "router: out of host memory");
        return NULL;
    }
    double *b = c + T * E, *gs = b + E;
    int32_t *gsel = ids + T * k, two[2];
    if (moe_tensor_to_host_f64(p, c) != MOE_OK) return NULL;
    for (int e = 0; e < E; e++) b[e] = 0;
    if (r->bias && moe_tensor_to_host_f64(r->bias, b) != MOE_OK) return NULL;
    for (int64_t t = 0; t < T; t++) {
        double *ct = c + t * E;
        for (int e = 0; e < E; e++) ct[e] += b[e];
        for (int g = 0; g < G; g++) {
            host_topk(ct + g * per, per, 2, two);
            gs[g] = ct[g * per + two[0]] + ct[g * per + two[1]];
        }
        host_topk(gs, G, tg, gsel);
        for (int g = 0; g < G; g++) {
            bool keep = false;
            for (int q = 0; q < tg; q++) keep = keep || gsel[q] == g;
            for (int e = 0; e < per && !keep; e++) ct[g * per + e] = 0.0;
        }
        host_topk(ct, E, k, ids + t * k);
    }
    *idx = moe_tensor_from_host(MOE_LIFE_STEP, p->device, MOE_I32, 2, (int64_t[]){T, k}, ids);
    return *idx ? moe_gather(p, *idx) : NULL;
}

/* Top-k of p (selection on p + bias under aux-loss-free balancing); gates from p. */
static moe_tensor *select_topk(const moe_router *r, moe_tensor *p, moe_tensor **idx) {
    int k = r->s.top_k;
    if (r->s.n_groups > 1) return select_grouped(r, p, idx);
    if (!r->bias) return moe_topk(p, k, idx);
    bool was = moe_grad_set_enabled(false);
    moe_topk(moe_add(p, moe_cast(r->bias, p->dtype)), k, idx);
    moe_grad_set_enabled(was);
    return *idx ? moe_gather(p, *idx) : NULL;
}

/* The OT plan of this rank's T tokens, solved over the whole global batch: the logits of
 * every rank (in world-rank order, which is the one-process batch order) are gathered
 * through a sum of zero-padded copies, the capacity is that of all tokens, and this
 * rank's rows of the plan are returned in plan[T, E]. With one process: the plain plan. */
static moe_status plan_global(const moe_router *r, const double *lg, int64_t T, double *plan) {
    const int E = r->s.n_experts, k = r->s.top_k, iters = r->s.ot_iters > 0 ? r->s.ot_iters : 30;
    const double gamma = r->s.ot_gamma > 0 ? r->s.ot_gamma : 1.0;
    const int W = moe_dist_world_size(), me = moe_dist_world_rank();
    if (W == 1) return moe_ot_plan(lg, T, E, moe_ot_capacity(T, k, E), iters, gamma, plan);
    int64_t *rows = calloc((size_t)W, sizeof *rows);
    if (!rows) return moe_error(MOE_ERR_OOM, "ot router: out of host memory");
    rows[me] = T;
    moe_status st = moe_dist_allreduce_i64(MOE_GROUP_WORLD, rows, W);
    int64_t total = 0, first = 0;
    for (int i = 0; i < W; i++) {
        if (i == me) first = total;
        total += rows[i];
    }
    free(rows);
    if (st == MOE_OK && total * E > (int64_t)0x7fffffff)
        st = moe_error(MOE_ERR_UNSUPPORTED, "ot router: %lld tokens x %d experts in the global batch are too many to "
                       "gather", (long long)total, E);
    double *all = st == MOE_OK ? calloc((size_t)(total * E), sizeof *all) : NULL,
           *pall = st == MOE_OK ? malloc(sizeof *pall * (size_t)(total * E)) : NULL;
    if (st == MOE_OK && (!all || !pall)) st = moe_error(MOE_ERR_OOM, "ot router: out of host memory");
    if (st == MOE_OK) {
        memcpy(all + first * E, lg, sizeof *all * (size_t)(T * E));
        st = moe_dist_allreduce_f64(MOE_GROUP_WORLD, all, (int)(total * E));
    }
    if (st == MOE_OK) st = moe_ot_plan(all, total, E, moe_ot_capacity(total, k, E), iters, gamma, pall);
    if (st == MOE_OK) memcpy(plan, pall + first * E, sizeof *plan * (size_t)(T * E));
    free(all);
    free(pall);
    return st;
}

/* OT selection on the host: the plan's k largest entries per token, into out->host_experts
 * and out->valid; returns the p of the chosen experts with invalid slots zeroed, or with
 * ot_plan_gates the plan's values there (router/README.md §4; scaled by T so that a token's
 * row sums to 1 like p) carried by p's gradient: p_sel + (plan_sel - p_sel) with the
 * difference taken outside autograd. */
static moe_tensor *select_ot(moe_router *r, moe_tensor *logits, moe_tensor *p, moe_tensor **idx, moe_routing *out) {
    int64_t T = logits->shape[0];
    int E = r->s.n_experts, k = r->s.top_k;
    double *lg = malloc(sizeof(double) * (size_t)(T * E)), *plan = malloc(sizeof(double) * (size_t)(T * E));
    double *mask = malloc(sizeof(double) * (size_t)(T * k));
    out->valid = moe_step_host_alloc(sizeof(bool) * (size_t)(T > 0 ? T * k : 1));
    moe_status st = lg && plan && mask && out->valid ? MOE_OK : moe_error(MOE_ERR_OOM, "ot router: out of host memory");
    if (st == MOE_OK) st = moe_tensor_to_host_f64(logits, lg);
    if (st == MOE_OK) st = plan_global(r, lg, T, plan);
    moe_tensor *m = NULL, *pv = NULL;
    if (st == MOE_OK) {
        moe_ot_select(plan, lg, T, E, k, out->host_experts, out->valid);
        for (int64_t i = 0; i < T * k; i++) mask[i] = out->valid[i] ? 1.0 : 0.0;
        m = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){T, k}, mask);
        if (r->s.ot_plan_gates) { /* each valid slot's plan value x T (a token's row sums to 1) */
            for (int64_t i = 0; i < T * k; i++)
                mask[i] = out->valid[i] ? (double)T * plan[(i / k) * E + out->host_experts[i]] : 0;
            pv = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){T, k}, mask);
        }
        *idx = moe_tensor_from_host(MOE_LIFE_STEP, p->device, MOE_I32, 2, (int64_t[]){T, k}, out->host_experts);
    }
    free(lg), free(plan), free(mask);
    m = m ? moe_tensor_to(moe_cast(m, p->dtype), p->device, MOE_LIFE_STEP) : NULL;
    moe_tensor *sel = m && *idx ? moe_mul(moe_gather(p, *idx), m) : NULL;
    if (!sel || !r->s.ot_plan_gates) return sel;
    pv = pv ? moe_tensor_to(moe_cast(pv, p->dtype), p->device, MOE_LIFE_STEP) : NULL;
    bool was = moe_grad_set_enabled(false);
    moe_tensor *shift = pv ? moe_sub(pv, sel) : NULL;
    moe_grad_set_enabled(was);
    return shift ? moe_add(sel, shift) : NULL;
}

/* Gates renormalised over each token's slots; a token with no valid slot keeps zeros. */
static moe_tensor *renormalize(moe_tensor *vals, const bool *valid) {
    moe_tensor *den = moe_sum(vals, 1, true);
    if (!valid || !den) return moe_div(vals, den);
    int64_t T = vals->shape[0], k = vals->shape[1];
    double *empty = malloc(sizeof(double) * (size_t)(T ? T : 1));
    if (!empty) {
        moe_error(MOE_ERR_OOM, "router: out of host memory");
        return NULL;
    }
    for (int64_t t = 0; t < T; t++) {
        empty[t] = 1.0;
        for (int64_t s = 0; s < k; s++)
            if (valid[t * k + s]) empty[t] = 0.0;
    }
    moe_tensor *e = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){T, 1}, empty);
    free(empty);
    e = e ? moe_tensor_to(moe_cast(e, vals->dtype), vals->device, MOE_LIFE_STEP) : NULL;
    return moe_div(vals, moe_add(den, e));
}

/* Switch aux = alpha * E * sum_e f_e P_e: f from the hard counts (no grad), P = mean_t p.
 * Under data parallelism f counts the tokens of every rank (the global batch), so the
 * mean of the ranks' losses is the one-process loss, gradients included. */
static moe_tensor *switch_aux(const moe_router *r, moe_tensor *p, const int64_t *local_load) {
    int E = r->s.n_experts;
    int64_t n = 0, *load = moe_step_host_alloc(sizeof(int64_t) * (size_t)E);
    double *f = malloc(sizeof(double) * (size_t)E);
    if (!f || !load) {
        free(f);
        moe_error(MOE_ERR_OOM, "router: out of host memory");
        return NULL;
    }
    memcpy(load, local_load, sizeof(int64_t) * (size_t)E);
    if (moe_dist_world_size() > 1 && moe_dist_allreduce_i64(MOE_GROUP_WORLD, load, E) != MOE_OK) {
        free(f);
        return NULL;
    }
    for (int e = 0; e < E; e++) n += load[e];
    for (int e = 0; e < E; e++) f[e] = n ? (double)load[e] / (double)n : 0.0;
    moe_tensor *f64 = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 1, (int64_t[]){E}, f);
    free(f);
    moe_tensor *ft = f64 ? moe_tensor_to(moe_cast(f64, p->dtype), p->device, MOE_LIFE_STEP) : NULL;
    return moe_mul_scalar(moe_sum_all(moe_mul(moe_mean(p, 0, false), ft)), r->s.aux_coef * E);
}

/* p = softmax or sigmoid of the logits, per the settings. */
static moe_tensor *scores(const moe_router *r, moe_tensor *logits) {
    return r->s.sigmoid_scores ? moe_sigmoid(logits) : moe_softmax(logits);
}

/* Host buffers of a routing of T tokens: host_experts [T k], load [E]. */
static moe_status alloc_host(const moe_router *r, int64_t T, moe_routing *out) {
    int64_t n = T * r->s.top_k;
    out->host_experts = moe_step_host_alloc(sizeof(int32_t) * (size_t)(n ? n : 1));
    out->load = moe_step_host_alloc(sizeof(int64_t) * (size_t)r->s.n_experts);
    return out->host_experts && out->load ? MOE_OK : moe_error(MOE_ERR_OOM, "router: out of host memory");
}

/* The selection the settings ask for: k, the scores, whether the gates are renormalised
 * (one gate of a softmax top-1 is left as it is) and their scale (0: none). */
static moe_route_spec route_spec(const moe_router *r) {
    const moe_router_settings *s = &r->s;
    return (moe_route_spec){.k = s->top_k, .sigmoid = s->sigmoid_scores,
                            .renormalize = s->renormalize && (s->top_k > 1 || s->sigmoid_scores),
                            .scale = s->scale > 0 && s->scale != 1.0 ? s->scale : 0};
}

/* The gates of the chosen p (vals [T, k]): renormalised and scaled per the settings. */
static moe_tensor *gates_of(const moe_router *r, moe_tensor *vals, const bool *valid) {
    moe_route_spec spec = route_spec(r);
    moe_tensor *gates = spec.renormalize ? renormalize(vals, valid) : vals;
    return spec.scale > 0 ? moe_mul_scalar(gates, spec.scale) : gates;
}

/* From the chosen p (vals [T, k]) and ids: gates (renormalised, scaled), the counts and
 * the rest of out. */
static moe_status finish(const moe_router *r, moe_tensor *p, moe_tensor *vals, moe_tensor *idx, moe_routing *out) {
    const moe_router_settings *s = &r->s;
    int64_t T = p->shape[0], n = T * s->top_k;
    moe_tensor *gates = gates_of(r, vals, out->valid);
    if (!gates) return moe_last_status();
    for (int64_t i = 0; i < n; i++)
        if (!out->valid || out->valid[i]) out->load[out->host_experts[i]]++;
    out->gates = gates;
    out->experts = idx;
    out->probs = p;
    out->n_tokens = T;
    return MOE_OK;
}

moe_status moe_router_select(const moe_router *r, moe_tensor *logits, moe_routing *out) {
    memset(out, 0, sizeof *out);
    moe_tensor *p = scores(r, logits);
    if (!p) return moe_last_status();
    MOE_TRY(alloc_host(r, p->shape[0], out));
    moe_tensor *idx = NULL, *vals = select_topk(r, p, &idx);
    /* The one device -> host read of the layer: expert ids, for counts and permutation. */
    moe_tensor *ids_host = vals ? moe_tensor_to(idx, MOE_CPU, MOE_LIFE_STEP) : NULL;
    if (!ids_host) return moe_last_status();
    memcpy(out->host_experts, ids_host->data, sizeof(int32_t) * (size_t)(p->shape[0] * r->s.top_k));
    return finish(r, p, vals, idx, out);
}

bool moe_router_selects_on_device(const moe_router *r) { return r->s.n_groups <= 1; }

moe_status moe_router_select_device(moe_router *r, moe_tensor *x, moe_tensor *state_in, moe_tensor **state_out,
                                    moe_tensor **gates, moe_tensor **experts) {
    MOE_ASSERT(moe_router_selects_on_device(r), "router: group-limited selection runs on the host");
    moe_route_spec spec = route_spec(r);
    *state_out = NULL;
    if (!x) return moe_last_status();
    if (r->s.type == MOE_ROUTER_RMOE)
        *gates = moe_route_topk(moe_router_logits(r, x, state_in, state_out), r->bias, &spec, experts);
    else
        *gates = moe_route_select(x, moe_cast(r->w_gate, x->dtype), r->bias, &spec, experts);
    return *gates ? MOE_OK : moe_last_status();
}

/* The balance losses of a routing (Switch or latency, and the z-loss) into out. */
static moe_status add_losses(const moe_router *r, moe_tensor *logits, moe_routing *out) {
    const moe_router_settings *s = &r->s;
    if (s->balance == MOE_BALANCE_SWITCH && s->aux_coef > 0) out->aux_loss = switch_aux(r, out->probs, out->load);
    if (s->balance == MOE_BALANCE_LATENCY && s->aux_coef > 0)
        out->aux_loss = moe_latency_loss(out->gates, out->experts, out->load, out->smooth_load, r->latency_alpha,
                                         s->n_experts, s->aux_coef);
    if ((s->balance == MOE_BALANCE_SWITCH || s->balance == MOE_BALANCE_LATENCY) && s->aux_coef > 0 && !out->aux_loss)
        return moe_last_status();
    if (s->z_coef > 0) {
        moe_tensor *lse = moe_logsumexp(logits);
        out->z_loss = moe_mul_scalar(moe_mean(moe_mul(lse, lse), 0, false), s->z_coef);
        if (!out->z_loss) return moe_last_status();
    }
    return MOE_OK;
}

moe_status moe_router_forward(moe_router *r, moe_tensor *x, moe_tensor *state_in, moe_routing *out) {
    memset(out, 0, sizeof *out);
    if (!x) return moe_last_status();
    moe_tensor *state = NULL, *smooth = NULL;
    moe_tensor *logits = moe_router_logits(r, x, state_in, &state);
    if (r->s.noisy_gating && moe_grad_enabled() && logits) {
        logits = add_noise(r, x, logits, out);
        if (!logits) return moe_last_status();
        smooth = out->smooth_load;
    }
    if (!logits) return moe_last_status();
    if (r->s.type == MOE_ROUTER_OT) {
        moe_tensor *p = scores(r, logits), *idx = NULL;
        if (!p) return moe_last_status();
        MOE_TRY(alloc_host(r, p->shape[0], out));
        moe_tensor *vals = select_ot(r, logits, p, &idx, out);
        if (!vals) return moe_last_status();
        MOE_TRY(finish(r, p, vals, idx, out));
    } else {
        MOE_TRY(moe_router_select(r, logits, out));
    }
    out->state = state;
    out->smooth_load = smooth;
    return add_losses(r, logits, out);
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
        return b ? moe_last_status() : moe_error(MOE_ERR_OOM, "router: out of host memory");
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

moe_status moe_router_set_latency(moe_router *r, const double *latency_ms) {
    int E = r->s.n_experts;
    double *alpha = malloc(sizeof(double) * (size_t)E);
    if (!alpha) return moe_error(MOE_ERR_OOM, "router: out of host memory");
    moe_status st = moe_latency_alpha(latency_ms, E, alpha);
    if (st != MOE_OK) {
        free(alpha);
        return st;
    }
    free(r->latency_alpha);
    r->latency_alpha = alpha;
    return MOE_OK;
}
