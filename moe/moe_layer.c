/* The MoE layer pipeline (see moe_layer.h). Routing metadata (the permutation, per-expert
 * offsets) is computed on the host from the expert ids, read back once per layer. */
#include "moe/moe_layer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/device.h"
#include "core/dist.h"
#include "core/fileio.h"
#include "core/memory.h"
#include "core/ops.h"

uint64_t moe_param_seed(uint64_t base, const char *name) {
    uint64_t h = 1469598103934665603ull ^ (base * 0x9E3779B97F4A7C15ull);
    for (const char *c = name; *c; c++) h = (h ^ (uint8_t)*c) * 1099511628211ull;
    return h;
}

/* A [n, rows, cols] stack whose slice j is drawn as the named expert (expert_begin + j). */
static moe_tensor *expert_stack(const char *prefix, const char *what, int expert_begin, int n, int64_t rows,
                                int64_t cols, moe_device dev, uint64_t seed, double std) {
    moe_tensor *t = moe_tensor_empty(MOE_LIFE_PERSIST, dev, MOE_F32, 3, (int64_t[]){n, rows, cols});
    if (!t) return NULL;
    for (int j = 0; j < n; j++) {
        char name[160];
        snprintf(name, sizeof name, "%s.experts.%d.%s", prefix, expert_begin + j, what);
        moe_tensor *one = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){rows, cols},
                                           moe_param_seed(seed, name), 0, std);
        moe_tensor *dst = one ? moe_tensor_view_raw(t, 2, one->shape, t->strides + 1, (int64_t)j * rows * cols) : NULL;
        if (!dst || moe_tensor_copy_(dst, one) != MOE_OK) {
            moe_tensor_free(t);
            return NULL;
        }
    }
    return t;
}

static moe_tensor *named_randn(const char *name, int64_t rows, int64_t cols, moe_device dev, uint64_t seed, double std) {
    return moe_tensor_randn(MOE_LIFE_PERSIST, dev, MOE_F32, 2, (int64_t[]){rows, cols}, moe_param_seed(seed, name), 0, std);
}

moe_status moe_moe_layer_init(moe_moe_layer *L, const moe_moe_layer_settings *s, const char *prefix, moe_device dev,
                              uint64_t seed, double init_std, int expert_begin, int n_local) {
    memset(L, 0, sizeof *L);
    L->s = *s;
    L->expert_begin = expert_begin;
    L->n_local = n_local;
    char rname[96];
    snprintf(rname, sizeof rname, "%s.router", prefix);
    MOE_TRY(moe_router_init(&L->router, &s->router, dev, MOE_F32, rname, moe_param_seed(seed, rname), init_std));
    snprintf(L->name_w13, sizeof L->name_w13, "%s.experts.w13", prefix);
    snprintf(L->name_w2, sizeof L->name_w2, "%s.experts.w2", prefix);
    int64_t d = s->d_model, f = s->ffn_dim;
    L->w13 = expert_stack(prefix, "w13", expert_begin, n_local, d, 2 * f, dev, seed, init_std);
    L->w2 = expert_stack(prefix, "w2", expert_begin, n_local, f, d, dev, seed, init_std);
    if (!L->w13 || !L->w2) return moe_last_status();
    moe_param_init(L->w13, L->name_w13);
    moe_param_init(L->w2, L->name_w2);
    if (s->n_shared > 0) {
        int64_t fs = (int64_t)s->n_shared * s->shared_ffn_dim;
        snprintf(L->name_sw13, sizeof L->name_sw13, "%s.shared.w13", prefix);
        snprintf(L->name_sw2, sizeof L->name_sw2, "%s.shared.w2", prefix);
        L->shared_w13 = named_randn(L->name_sw13, d, 2 * fs, dev, seed, init_std);
        L->shared_w2 = named_randn(L->name_sw2, fs, d, dev, seed, init_std);
        if (!L->shared_w13 || !L->shared_w2) return moe_last_status();
        moe_param_init(L->shared_w13, L->name_sw13);
        moe_param_init(L->shared_w2, L->name_sw2);
    }
    return MOE_OK;
}

void moe_moe_layer_free(moe_moe_layer *L) {
    moe_router_free(&L->router);
    moe_tensor_free(L->w13);
    moe_tensor_free(L->w2);
    moe_tensor_free(L->shared_w13);
    moe_tensor_free(L->shared_w2);
    memset(L, 0, sizeof *L);
}

moe_tensor *moe_swiglu_ffn(moe_tensor *x, moe_tensor *w13, moe_tensor *w2) {
    if (!x || !w13 || !w2) return NULL;
    int64_t f = w2->shape[0];
    moe_tensor *h = moe_matmul(x, w13);
    return moe_matmul(moe_swiglu(moe_slice(h, 1, 0, f), moe_slice(h, 1, f, 2 * f)), w2);
}

/* Host routing plan: kept assignments sorted by expert (stable), their tokens, offsets. */
typedef struct {
    int32_t *perm;      /* [kept] assignment index t*k + j, grouped by expert */
    int32_t *token;     /* [kept] perm / k */
    int64_t *offsets;   /* [E + 1] */
    int64_t kept, dropped;
} route_plan;

static moe_status plan_routes(const moe_moe_layer *L, const moe_routing *r, moe_tensor *gates, route_plan *p) {
    int E = L->s.n_experts, k = L->s.top_k;
    int64_t n = r->n_tokens * k;
    p->perm = moe_step_host_alloc(sizeof(int32_t) * (size_t)(n + 1));
    p->token = moe_step_host_alloc(sizeof(int32_t) * (size_t)(n + 1));
    p->offsets = moe_step_host_alloc(sizeof(int64_t) * (size_t)(E + 1));
    if (!p->perm || !p->token || !p->offsets) return moe_error(MOE_ERR_OOM, "moe layer: out of host memory");
    int64_t cap = n;
    float *g = NULL;
    if (L->s.capacity_factor > 0) {
        cap = (int64_t)ceil(L->s.capacity_factor * (double)n / E);
        moe_tensor *gh = moe_tensor_to(moe_cast(gates, MOE_F32), MOE_CPU, MOE_LIFE_STEP);
        if (!gh) return moe_last_status();
        g = gh->data;
    }
    /* Counting sort by expert; within an expert, assignment order (token order). */
    int64_t *start = moe_step_host_alloc(sizeof(int64_t) * (size_t)(E + 1));
    if (!start) return moe_error(MOE_ERR_OOM, "moe layer: out of host memory");
    /* Assignments the router marked invalid (OT: a zero plan entry) count as dropped. */
    int64_t invalid = 0;
    for (int64_t i = 0; i < n; i++) {
        if (r->valid && !r->valid[i]) invalid++;
        else start[r->host_experts[i] + 1]++;
    }
    for (int e = 0; e < E; e++) start[e + 1] += start[e];
    int32_t *sorted = moe_step_host_alloc(sizeof(int32_t) * (size_t)(n + 1));
    int64_t *fill = moe_step_host_alloc(sizeof(int64_t) * (size_t)(E + 1));
    if (!sorted || !fill) return moe_error(MOE_ERR_OOM, "moe layer: out of host memory");
    memcpy(fill, start, sizeof(int64_t) * (size_t)(E + 1));
    for (int64_t i = 0; i < n; i++)
        if (!r->valid || r->valid[i]) sorted[fill[r->host_experts[i]]++] = (int32_t)i;
    p->kept = 0;
    p->dropped = invalid;
    for (int e = 0; e < E; e++) {
        int64_t b = start[e], m = start[e + 1] - b;
        p->offsets[e] = p->kept;
        if (m > cap) {
            /* Keep the cap assignments with the highest gates (ties: earlier token). */
            int32_t *grp = sorted + b;
            for (int64_t i = 1; i < m; i++) { /* insertion sort by gate, descending, stable */
                int32_t v = grp[i];
                int64_t j = i;
                while (j > 0 && g[grp[j - 1]] < g[v]) { grp[j] = grp[j - 1]; j--; }
                grp[j] = v;
            }
            /* restore token order among the kept ones */
            for (int64_t i = 1; i < cap; i++) {
                int32_t v = grp[i];
                int64_t j = i;
                while (j > 0 && grp[j - 1] > v) { grp[j] = grp[j - 1]; j--; }
                grp[j] = v;
            }
            p->dropped += m - cap;
            m = cap;
        }
        for (int64_t i = 0; i < m; i++) {
            p->perm[p->kept] = sorted[b + i];
            p->token[p->kept] = sorted[b + i] / k;
            p->kept++;
        }
    }
    p->offsets[E] = p->kept;
    return MOE_OK;
}

/* The local experts on rows grouped by expert: offsets[n_local + 1]. */
static moe_tensor *run_experts(moe_moe_layer *L, moe_tensor *xs, const int64_t *offsets, moe_dtype compute) {
    int64_t f = L->s.ffn_dim;
    moe_tensor *h = moe_grouped_matmul(xs, moe_cast(L->w13, compute), offsets);            /* [N, 2f] */
    moe_tensor *a = moe_swiglu(moe_slice(h, 1, 0, f), moe_slice(h, 1, f, 2 * f));
    return moe_grouped_matmul(a, moe_cast(L->w2, compute), offsets);                        /* [N, d] */
}

/* Expert parallelism: rows for experts held by other ranks of the EP group go there
 * (all-to-all-v), arrive ordered by source rank and then expert, are regrouped by local
 * expert, run, put back in arrival order and returned the same way. */
static moe_tensor *exchange_and_run(moe_moe_layer *L, moe_tensor *xs, const int64_t *offsets, moe_dtype compute) {
    if (!xs) return NULL;
    int P = moe_dist_ep_size(), El = L->n_local;
    if (P * El != L->s.n_experts) {
        moe_error(MOE_ERR_DIST, "moe layer: %d local experts x %d ranks in the expert-parallel group != %d experts",
                  El, P, L->s.n_experts);
        return NULL;
    }
    int64_t *cnt = moe_step_host_alloc(sizeof(int64_t) * (size_t)(P * El)),
            *rcnt = moe_step_host_alloc(sizeof(int64_t) * (size_t)(P * El)),
            *ones = moe_step_host_alloc(sizeof(int64_t) * (size_t)P),
            *send = moe_step_host_alloc(sizeof(int64_t) * (size_t)P),
            *recv = moe_step_host_alloc(sizeof(int64_t) * (size_t)P),
            *loff = moe_step_host_alloc(sizeof(int64_t) * (size_t)(El + 1));
    if (!cnt || !rcnt || !ones || !send || !recv || !loff) {
        moe_error(MOE_ERR_OOM, "moe layer: out of host memory");
        return NULL;
    }
    for (int e = 0; e < P * El; e++) cnt[e] = offsets[e + 1] - offsets[e];
    for (int r = 0; r < P; r++) ones[r] = 1;
    /* each peer learns how many rows of each of its experts come from us */
    if (moe_dist_alltoallv(MOE_GROUP_EP, cnt, ones, rcnt, ones, (int64_t)El * (int64_t)sizeof(int64_t)) != MOE_OK)
        return NULL;
    int64_t R = 0;
    for (int r = 0; r < P; r++) {
        send[r] = recv[r] = 0;
        for (int j = 0; j < El; j++) {
            send[r] += cnt[r * El + j];
            recv[r] += rcnt[r * El + j];
        }
        R += recv[r];
    }
    moe_tensor *xr = moe_all_to_all(xs, send, recv, MOE_GROUP_EP);             /* [R, d] by source, expert */
    /* regroup by local expert: local row i takes arrival row order[i] */
    int32_t *order = moe_step_host_alloc(sizeof(int32_t) * (size_t)(R + 1)), *back = moe_step_host_alloc(sizeof(int32_t) * (size_t)(R + 1));
    int64_t *src_at = moe_step_host_alloc(sizeof(int64_t) * (size_t)(P * El));
    if (!order || !back || !src_at) {
        moe_error(MOE_ERR_OOM, "moe layer: out of host memory");
        return NULL;
    }
    int64_t at = 0;
    for (int r = 0; r < P; r++)
        for (int j = 0; j < El; j++) {
            src_at[r * El + j] = at;
            at += rcnt[r * El + j];
        }
    int64_t i = 0;
    for (int j = 0; j < El; j++) {
        loff[j] = i;
        for (int r = 0; r < P; r++)
            for (int64_t q = 0; q < rcnt[r * El + j]; q++, i++) {
                order[i] = (int32_t)(src_at[r * El + j] + q);
                back[order[i]] = (int32_t)i;
            }
    }
    loff[El] = R;
    moe_tensor *ord = moe_tensor_from_host(MOE_LIFE_STEP, xs->device, MOE_I32, 1, (int64_t[]){R}, order);
    moe_tensor *bk = moe_tensor_from_host(MOE_LIFE_STEP, xs->device, MOE_I32, 1, (int64_t[]){R}, back);
    if (!ord || !bk) return NULL;
    moe_tensor *yl = run_experts(L, moe_index_select(xr, ord), loff, compute);
    return moe_all_to_all(moe_index_select(yl, bk), recv, send, MOE_GROUP_EP);
}

moe_tensor *moe_moe_layer_forward(moe_moe_layer *L, moe_tensor *x, moe_tensor *state_in, moe_dtype compute,
                                  moe_moe_layer_result *res) {
    if (!x) return NULL;
    memset(res, 0, sizeof *res);
    int64_t T = x->shape[0], d = x->shape[1];
    int k = L->s.top_k;
    if (moe_router_forward(&L->router, x, state_in, &res->routing) != MOE_OK) return NULL;
    route_plan plan;
    memset(&plan, 0, sizeof plan);
    if (plan_routes(L, &res->routing, res->routing.gates, &plan) != MOE_OK) return NULL;
    res->dropped = plan.dropped;
    res->assignments = T * k;

    moe_tensor *perm = moe_tensor_from_host(MOE_LIFE_STEP, x->device, MOE_I32, 1, (int64_t[]){plan.kept}, plan.perm);
    moe_tensor *tok = moe_tensor_from_host(MOE_LIFE_STEP, x->device, MOE_I32, 1, (int64_t[]){plan.kept}, plan.token);
    if (!perm || !tok) return NULL;
    /* permute -> exchange -> grouped experts -> exchange back -> combine */
    moe_tensor *xs = moe_index_select(x, tok);                                   /* [N, d], by expert */
    moe_tensor *y = L->n_local < L->s.n_experts ? exchange_and_run(L, xs, plan.offsets, compute)
                                                : run_experts(L, xs, plan.offsets, compute); /* [N, d] */
    moe_tensor *g = moe_index_select(moe_reshape(moe_cast(res->routing.gates, compute), 2, (int64_t[]){T * k, 1}), perm);
    moe_tensor *zeros = moe_tensor_zeros(MOE_LIFE_STEP, x->device, compute, 2, (int64_t[]){T, d});
    moe_tensor *out = moe_index_add(zeros, tok, moe_mul(y, g));
    if (L->shared_w13)
        out = moe_add(out, moe_swiglu_ffn(x, moe_cast(L->shared_w13, compute), moe_cast(L->shared_w2, compute)));
    return out;
}

moe_status moe_moe_layer_measure_latency(moe_moe_layer *L, int64_t tokens, moe_dtype compute, double *latency_ms) {
    int E = L->s.n_experts;
    for (int e = 0; e < E; e++) latency_ms[e] = 0;
    bool was = moe_grad_set_enabled(false);
    moe_status s = MOE_OK;
    for (int j = 0; j < L->n_local && s == MOE_OK; j++) {
        double t[5];
        for (int r = 0; r < 6 && s == MOE_OK; r++) { /* one warm-up, five timed */
            moe_step_reset();
            moe_tensor *x = moe_tensor_randn(MOE_LIFE_STEP, L->w13->device, compute, 2, (int64_t[]){tokens, L->s.d_model},
                                             17, (uint64_t)r << 32, 1.0);
            s = x ? moe_device_sync(x->device) : moe_last_status();
            double t0 = moe_clock_ms();
            moe_tensor *w13 = moe_reshape(moe_slice(moe_cast(L->w13, compute), 0, j, j + 1), 2,
                                          (int64_t[]){L->w13->shape[1], L->w13->shape[2]});
            moe_tensor *w2 = moe_reshape(moe_slice(moe_cast(L->w2, compute), 0, j, j + 1), 2,
                                         (int64_t[]){L->w2->shape[1], L->w2->shape[2]});
            moe_tensor *y = moe_swiglu_ffn(x, w13, w2);
            if (s == MOE_OK) s = y ? moe_device_sync(y->device) : moe_last_status();
            if (r > 0) t[r - 1] = moe_clock_ms() - t0;
        }
        latency_ms[L->expert_begin + j] = moe_median(t, 5);
    }
    moe_grad_set_enabled(was);
    moe_step_reset();
    MOE_TRY(s);
    if (L->n_local < E) MOE_TRY(moe_dist_allreduce_f64(MOE_GROUP_EP, latency_ms, E));
    return moe_router_set_latency(&L->router, latency_ms);
}
