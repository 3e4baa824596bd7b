/* The MoE layer pipeline (see moe_layer.h). Routing metadata (the permutation, per-expert
 * offsets in group-major slot order) is computed on the host from the expert ids, read
 * back once per layer. */
#include "moe/model/moe_layer.h"

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
#include "router/latency.h"

uint64_t moe_param_seed(uint64_t base, const char *name) {
    uint64_t h = 1469598103934665603ull ^ (base * 0x9E3779B97F4A7C15ull);
    for (const char *c = name; *c; c++) h = (h ^ (uint8_t)*c) * 1099511628211ull;
    return h;
}

/* A [n, rows, cols] stack whose slice j is drawn as the named expert ids[j] (all zeros
 * under MOE_INIT_ZEROS). */
static moe_tensor *expert_stack(const char *prefix, const char *what, const int *ids, int n, int64_t rows,
                                int64_t cols, moe_device dev, uint64_t seed, double std, moe_init_mode mode) {
    if (mode == MOE_INIT_ZEROS) return moe_tensor_zeros(MOE_LIFE_PERSIST, dev, MOE_F32, 3, (int64_t[]){n, rows, cols});
    moe_tensor *t = moe_tensor_empty(MOE_LIFE_PERSIST, dev, MOE_F32, 3, (int64_t[]){n, rows, cols});
    if (!t) return NULL;
    for (int j = 0; j < n; j++) { /* each expert drawn on the host, its STEP memory handed back at once */
        char name[160];
        snprintf(name, sizeof name, "%s.experts.%d.%s", prefix, ids[j], what);
        moe_mem_mark mark = moe_mem_step_mark(MOE_CPU);
        moe_tensor *one = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){rows, cols},
                                           moe_param_seed(seed, name), 0, std);
        moe_tensor *dst = one ? moe_tensor_view_raw(t, 2, one->shape, t->strides + 1, (int64_t)j * rows * cols) : NULL;
        bool ok = dst && moe_tensor_copy_(dst, one) == MOE_OK;
        moe_mem_step_release(MOE_CPU, mark);
        if (!ok) {
            moe_tensor_free(t);
            return NULL;
        }
    }
    return t;
}

static moe_tensor *named_randn(const char *name, int64_t rows, int64_t cols, moe_device dev, uint64_t seed, double std,
                               moe_init_mode mode) {
    return moe_tensor_init_normal(mode, MOE_LIFE_PERSIST, dev, MOE_F32, 2, (int64_t[]){rows, cols},
                                  moe_param_seed(seed, name), 0, std);
}

/* Groups the local experts by width (order of first appearance) and numbers the slots:
 * within each rank's range of n_local experts (the whole layer without expert
 * parallelism), the experts in group-major order. Every rank numbers every range the
 * same way, so the rows it sends another rank arrive in that rank's slot order. */
static moe_status make_groups(moe_moe_layer *L, const int *widths) {
    int E = L->s.n_experts, El = L->n_local;
    MOE_ASSERT(El > 0 && E % El == 0 && L->expert_begin % El == 0 && L->expert_begin < E,
               "moe layer: experts [%d, %d) of %d are not one rank's range of an even split", L->expert_begin,
               L->expert_begin + El, E);
    L->groups = calloc((size_t)El, sizeof *L->groups);
    L->slot = malloc(sizeof(int) * (size_t)E);
    L->latency = calloc((size_t)E, sizeof(double));
    int *seen = malloc(sizeof(int) * (size_t)El);
    if (!L->groups || !L->slot || !L->latency || !seen) {
        free(seen);
        return moe_error(MOE_ERR_OOM, "moe layer: out of host memory");
    }
    for (int begin = 0; begin < E; begin += El) {
        /* the range's widths in order of first appearance, then its experts by width */
        int n_w = 0, at = begin;
        for (int e = begin; e < begin + El; e++) {
            int w = widths ? widths[e] : L->s.ffn_dim, g = 0;
            while (g < n_w && seen[g] != w) g++;
            if (g == n_w) seen[n_w++] = w;
        }
        for (int g = 0; g < n_w; g++)
            for (int e = begin; e < begin + El; e++)
                if ((widths ? widths[e] : L->s.ffn_dim) == seen[g]) L->slot[e] = at++;
        if (begin != L->expert_begin) continue;
        for (int g = 0; g < n_w; g++) { /* this rank's groups, in the same order */
            moe_expert_group *G = &L->groups[L->n_groups++];
            G->ffn_dim = seen[g];
            G->experts = malloc(sizeof(int) * (size_t)El);
            if (!G->experts) {
                free(seen);
                return moe_error(MOE_ERR_OOM, "moe layer: out of host memory");
            }
            for (int e = begin; e < begin + El; e++)
                if ((widths ? widths[e] : L->s.ffn_dim) == seen[g]) G->experts[G->n++] = e;
        }
    }
    free(seen);
    return MOE_OK;
}

moe_status moe_moe_layer_init(moe_moe_layer *L, const moe_moe_layer_settings *s, const char *prefix, moe_device dev,
                              uint64_t seed, double init_std, int expert_begin, int n_local) {
    memset(L, 0, sizeof *L);
    L->s = *s;
    L->s.expert_ffn_dims = NULL; /* the widths live in the groups */
    L->expert_begin = expert_begin;
    L->n_local = n_local;
    char rname[96];
    snprintf(rname, sizeof rname, "%s.router", prefix);
    moe_router_settings rs = s->router;
    rs.init = s->init; /* the layer's mode governs its router too */
    MOE_TRY(moe_router_init(&L->router, &rs, dev, MOE_F32, rname, moe_param_seed(seed, rname), init_std));
    snprintf(L->name_w13, sizeof L->name_w13, "%s.experts.w13", prefix);
    snprintf(L->name_w2, sizeof L->name_w2, "%s.experts.w2", prefix);
    MOE_TRY(make_groups(L, s->expert_ffn_dims));
    int64_t d = s->d_model;
    for (int g = 0; g < L->n_groups; g++) {
        moe_expert_group *G = &L->groups[g];
        if (L->n_groups == 1) {
            snprintf(G->name_w13, sizeof G->name_w13, "%s", L->name_w13);
            snprintf(G->name_w2, sizeof G->name_w2, "%s", L->name_w2);
        } else {
            snprintf(G->name_w13, sizeof G->name_w13, "%s.g%d", L->name_w13, G->ffn_dim);
            snprintf(G->name_w2, sizeof G->name_w2, "%s.g%d", L->name_w2, G->ffn_dim);
        }
        G->w13 = expert_stack(prefix, "w13", G->experts, G->n, d, 2 * (int64_t)G->ffn_dim, dev, seed, init_std,
                              s->init);
        G->w2 = expert_stack(prefix, "w2", G->experts, G->n, G->ffn_dim, d, dev, seed, init_std, s->init);
        if (!G->w13 || !G->w2) return moe_last_status();
        moe_param_init(G->w13, G->name_w13);
        moe_param_init(G->w2, G->name_w2);
    }
    if (L->n_groups == 1) {
        L->w13 = L->groups[0].w13;
        L->w2 = L->groups[0].w2;
    }
    if (s->n_shared > 0) {
        int64_t fs = (int64_t)s->n_shared * s->shared_ffn_dim;
        snprintf(L->name_sw13, sizeof L->name_sw13, "%s.shared.w13", prefix);
        snprintf(L->name_sw2, sizeof L->name_sw2, "%s.shared.w2", prefix);
        L->shared_w13 = named_randn(L->name_sw13, d, 2 * fs, dev, seed, init_std, s->init);
        L->shared_w2 = named_randn(L->name_sw2, fs, d, dev, seed, init_std, s->init);
        if (!L->shared_w13 || !L->shared_w2) return moe_last_status();
        moe_param_init(L->shared_w13, L->name_sw13);
        moe_param_init(L->shared_w2, L->name_sw2);
    }
    if (s->n_shared > 0 && s->shared_gate) {
        snprintf(L->name_sgate, sizeof L->name_sgate, "%s.shared.gate", prefix);
        L->shared_gate = named_randn(L->name_sgate, d, 1, dev, seed, init_std, s->init);
        if (!L->shared_gate) return moe_last_status();
        moe_param_init(L->shared_gate, L->name_sgate);
    }
    return MOE_OK;
}

void moe_moe_layer_free(moe_moe_layer *L) {
    moe_router_free(&L->router);
    for (int g = 0; g < L->n_groups; g++) {
        moe_tensor_free(L->groups[g].w13);
        moe_tensor_free(L->groups[g].w2);
        free(L->groups[g].experts);
    }
    free(L->groups);
    free(L->slot);
    free(L->latency);
    moe_tensor_free(L->shared_w13);
    moe_tensor_free(L->shared_w2);
    moe_tensor_free(L->shared_gate);
    memset(L, 0, sizeof *L);
}

void moe_moe_layer_expert_weights(moe_moe_layer *L, int expert, moe_tensor **w13, moe_tensor **w2) {
    for (int g = 0; g < L->n_groups; g++) {
        const moe_expert_group *G = &L->groups[g];
        for (int i = 0; i < G->n; i++) {
            if (G->experts[i] != expert) continue;
            *w13 = moe_reshape(moe_slice(G->w13, 0, i, i + 1), 2, (int64_t[]){G->w13->shape[1], G->w13->shape[2]});
            *w2 = moe_reshape(moe_slice(G->w2, 0, i, i + 1), 2, (int64_t[]){G->w2->shape[1], G->w2->shape[2]});
            return;
        }
    }
    MOE_ASSERT(false, "moe layer: expert %d is not local (this rank holds %d experts from %d)", expert, L->n_local,
               L->expert_begin);
}

moe_tensor *moe_swiglu_ffn(moe_tensor *x, moe_tensor *w13, moe_tensor *w2) {
    if (!x || !w13 || !w2) return NULL;
    return moe_matmul(moe_swiglu(moe_matmul(x, w13)), w2); /* [T, 2f] -> [T, f] -> [T, d] */
}

/* Host routing plan: kept assignments sorted by expert slot (group-major, stable), their
 * tokens, offsets. */
typedef struct {
    int32_t *perm;      /* [kept] assignment index t*k + j, grouped by expert slot */
    int32_t *token;     /* [kept] perm / k */
    int64_t *offsets;   /* [E + 1] by slot */
    int64_t kept, dropped;
} route_plan;

/* Counting sort of the valid assignments by expert slot, assignment (token) order within
 * a slot: sorted [n] and start [E + 1], where slot e's run begins; *invalid: assignments
 * the router marked invalid (OT: a zero plan entry). */
static moe_status sort_by_slot(const moe_moe_layer *L, const moe_routing *r, int64_t n, int32_t **sorted,
                               int64_t **start, int64_t *invalid) {
    int E = L->s.n_experts;
    *start = moe_step_host_alloc(sizeof(int64_t) * (size_t)(E + 1));
    *sorted = moe_step_host_alloc(sizeof(int32_t) * (size_t)(n + 1));
    int64_t *fill = moe_step_host_alloc(sizeof(int64_t) * (size_t)(E + 1));
    if (!*start || !*sorted || !fill) return moe_error(MOE_ERR_OOM, "moe layer: out of host memory");
    *invalid = 0;
    for (int64_t i = 0; i < n; i++) {
        if (r->valid && !r->valid[i]) (*invalid)++;
        else (*start)[L->slot[r->host_experts[i]] + 1]++;
    }
    for (int e = 0; e < E; e++) (*start)[e + 1] += (*start)[e];
    memcpy(fill, *start, sizeof(int64_t) * (size_t)(E + 1));
    for (int64_t i = 0; i < n; i++)
        if (!r->valid || r->valid[i]) (*sorted)[fill[L->slot[r->host_experts[i]]]++] = (int32_t)i;
    return MOE_OK;
}

/* Puts the cap assignments of grp [m] with the highest gates g first (ties: the earlier
 * token), in token order. */
static void keep_highest_gates(int32_t *grp, int64_t m, int64_t cap, const float *g) {
    for (int64_t i = 1; i < m; i++) { /* insertion sort by gate, descending, stable */
        int32_t v = grp[i];
        int64_t j = i;
        while (j > 0 && g[grp[j - 1]] < g[v]) { grp[j] = grp[j - 1]; j--; }
        grp[j] = v;
    }
    for (int64_t i = 1; i < cap; i++) { /* token order among the kept ones */
        int32_t v = grp[i];
        int64_t j = i;
        while (j > 0 && grp[j - 1] > v) { grp[j] = grp[j - 1]; j--; }
        grp[j] = v;
    }
}

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
    int32_t *sorted;
    int64_t *start;
    MOE_TRY(sort_by_slot(L, r, n, &sorted, &start, &p->dropped));
    p->kept = 0;
    for (int e = 0; e < E; e++) {
        int64_t b = start[e], m = start[e + 1] - b;
        p->offsets[e] = p->kept;
        if (m > cap) {
            keep_highest_gates(sorted + b, m, cap, g);
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

moe_status moe_moe_layer_expert_stacks(moe_moe_layer *L, int group, moe_dtype compute, moe_tensor **w13,
                                       moe_tensor **w2) {
    MOE_ASSERT(group >= 0 && group < L->n_groups, "moe layer: group %d of %d", group, L->n_groups);
    *w13 = moe_cast(L->groups[group].w13, compute);
    *w2 = moe_cast(L->groups[group].w2, compute);
    return *w13 && *w2 ? MOE_OK : moe_last_status();
}

void moe_moe_layer_set_provider(moe_moe_layer *L, const moe_expert_provider *p, int layer) {
    L->provider = p;
    L->provider_layer = layer;
}

moe_tensor *moe_grouped_swiglu(moe_tensor *xs, moe_tensor *w13, moe_tensor *w2, const int64_t *offsets) {
    moe_tensor *h = moe_grouped_matmul(xs, w13, offsets);   /* [N, 2f] */
    return moe_grouped_matmul(moe_swiglu(h), w2, offsets);  /* [N, d] */
}

/* A group's SwiGLU as a recomputed piece: in = {xs [N, d], w13 stack, w2 stack} (the
 * parameters themselves, cast inside, so the casts are recomputed too). */
typedef struct group_piece {
    const int64_t *offsets; /* step host memory: lives until the backward */
    moe_dtype compute;
} group_piece;

static moe_tensor *group_swiglu(void *ctx, moe_tensor *const *in) {
    const group_piece *p = ctx;
    return moe_grouped_swiglu(in[0], moe_cast(in[1], p->compute), moe_cast(in[2], p->compute), p->offsets);
}

/* Group g's SwiGLU on its rows; offsets[n + 1] from 0 (step host memory). The one place
 * where experts that are not all resident (an installed provider) take over. */
static moe_tensor *run_group(moe_moe_layer *L, int g, moe_tensor *xs, const int64_t *offsets, moe_dtype compute) {
    if (L->provider) return L->provider->run(L->provider->ctx, L->provider_layer, L, g, xs, offsets, compute);
    if (L->s.recompute_experts) {
        group_piece *p = moe_step_host_alloc(sizeof *p);
        if (!p) return NULL;
        *p = (group_piece){offsets, compute};
        return moe_recompute(group_swiglu, p, 3, (moe_tensor *[]){xs, L->groups[g].w13, L->groups[g].w2});
    }
    moe_tensor *w13, *w2;
    if (moe_moe_layer_expert_stacks(L, g, compute, &w13, &w2) != MOE_OK) return NULL;
    return moe_grouped_swiglu(xs, w13, w2, offsets);
}

/* The local experts on rows grouped by slot (offsets[n_local + 1]): each group on its row
 * range, the results concatenated back in row order. sample (running latency, or NULL)
 * [n_experts] receives each group's time per row (ms) for its experts, 0 = no rows. */
static moe_tensor *run_experts(moe_moe_layer *L, moe_tensor *xs, const int64_t *offsets, moe_dtype compute,
                               double *sample) {
    moe_tensor *parts[MOE_NODE_MAX_INPUTS];
    int n_parts = 0, first = 0;
    for (int g = 0; g < L->n_groups && xs; g++) {
        const moe_expert_group *G = &L->groups[g];
        int64_t r0 = offsets[first], rows = offsets[first + G->n] - r0;
        int64_t *rel = moe_step_host_alloc(sizeof(int64_t) * (size_t)(G->n + 1));
        if (!rel) {
            moe_error(MOE_ERR_OOM, "moe layer: out of host memory");
            return NULL;
        }
        for (int i = 0; i <= G->n; i++) rel[i] = offsets[first + i] - r0;
        first += G->n;
        if (sample && moe_device_sync(xs->device) != MOE_OK) return NULL;
        double t0 = moe_clock_ms();
        moe_tensor *y = run_group(L, g, L->n_groups == 1 ? xs : moe_slice(xs, 0, r0, r0 + rows), rel, compute);
        if (!y) return NULL;
        if (sample && moe_device_sync(y->device) != MOE_OK) return NULL;
        double per_row = rows > 0 ? (moe_clock_ms() - t0) / (double)rows : 0;
        for (int i = 0; sample && i < G->n; i++) sample[G->experts[i]] = per_row;
        if (n_parts == MOE_NODE_MAX_INPUTS) { /* concat takes a bounded number of inputs */
            parts[0] = moe_concat(parts, n_parts, 0);
            n_parts = 1;
        }
        parts[n_parts++] = y;
    }
    return n_parts == 1 ? parts[0] : moe_concat(parts, n_parts, 0);
}

/* Expert parallelism: rows for experts held by other ranks of the EP group go there
 * (all-to-all-v), arrive ordered by source rank and then expert, are regrouped by local
 * expert, run, put back in arrival order and returned the same way. */
static moe_tensor *exchange_and_run(moe_moe_layer *L, moe_tensor *xs, const int64_t *offsets, moe_dtype compute,
                                    double *sample) {
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
    moe_tensor *yl = run_experts(L, moe_index_select(xr, ord), loff, compute, sample);
    return moe_all_to_all(moe_index_select(yl, bk), recv, send, MOE_GROUP_EP);
}

/* out + the shared expert of x (sigmoid-gated where the layer has a gate). */
static moe_tensor *add_shared(moe_moe_layer *L, moe_tensor *x, moe_tensor *out, moe_dtype compute) {
    if (!L->shared_w13 || !out) return out;
    moe_tensor *sh = moe_swiglu_ffn(x, moe_cast(L->shared_w13, compute), moe_cast(L->shared_w2, compute));
    if (L->shared_gate) sh = moe_mul(sh, moe_sigmoid(moe_matmul(x, moe_cast(L->shared_gate, compute)))); /* [T, 1] */
    return moe_add(out, sh);
}

/* Running latency: folds this forward's per-row times into the average, hands it on. */
static moe_status update_running_latency(moe_moe_layer *L, double *sample) {
    int E = L->s.n_experts;
    if (L->n_local < E) MOE_TRY(moe_dist_allreduce_f64(MOE_GROUP_EP, sample, E));
    bool known = true;
    for (int e = 0; e < E; e++)
        if (!(sample[e] > 0)) sample[e] = L->latency[e]; /* no rows this time: keep the average */
    moe_latency_ema_update(L->latency, sample, E, MOE_LATENCY_RUNNING_DECAY);
    for (int e = 0; e < E; e++) known = known && L->latency[e] > 0;
    return known ? moe_router_set_latency(&L->router, L->latency) : MOE_OK;
}

moe_tensor *moe_moe_layer_forward(moe_moe_layer *L, moe_tensor *x, moe_tensor *state_in, moe_dtype compute,
                                  moe_moe_layer_result *res) {
    if (!x) return NULL;
    moe_routing r;
    if (moe_router_forward(&L->router, x, state_in, &r) != MOE_OK) return NULL;
    return moe_moe_layer_apply(L, x, &r, compute, res);
}

moe_tensor *moe_moe_layer_apply(moe_moe_layer *L, moe_tensor *x, const moe_routing *routing, moe_dtype compute,
                                moe_moe_layer_result *res) {
    memset(res, 0, sizeof *res);
    if (!x) return NULL;
    res->routing = *routing;
    int64_t T = x->shape[0];
    int k = L->s.top_k;
    route_plan plan;
    memset(&plan, 0, sizeof plan);
    if (plan_routes(L, &res->routing, res->routing.gates, &plan) != MOE_OK) return NULL;
    res->dropped = plan.dropped;
    res->assignments = T * k;

    /* tok [N]: the token of each kept assignment (by expert slot); src [T, k]: the row of
     * the expert output holding assignment (t, j), -1 when it was dropped */
    int32_t *src_h = moe_step_host_alloc(sizeof(int32_t) * (size_t)(T * k > 0 ? T * k : 1));
    if (!src_h) {
        moe_error(MOE_ERR_OOM, "moe layer: out of host memory for the combine map");
        return NULL;
    }
    for (int64_t i = 0; i < T * k; i++) src_h[i] = -1;
    for (int64_t i = 0; i < plan.kept; i++) src_h[plan.perm[i]] = (int32_t)i;
    moe_tensor *tok = moe_tensor_from_host(MOE_LIFE_STEP, x->device, MOE_I32, 1, (int64_t[]){plan.kept}, plan.token);
    moe_tensor *src = moe_tensor_from_host(MOE_LIFE_STEP, x->device, MOE_I32, 2, (int64_t[]){T, k}, src_h);
    if (!tok || !src) return NULL;
    /* permute -> exchange -> grouped experts -> exchange back -> combine */
    double *sample = NULL;
    if (L->s.latency_running && moe_grad_enabled()) {
        sample = moe_step_host_alloc(sizeof(double) * (size_t)L->s.n_experts);
        if (!sample) {
            moe_error(MOE_ERR_OOM, "moe layer: out of host memory");
            return NULL;
        }
        memset(sample, 0, sizeof(double) * (size_t)L->s.n_experts);
    }
    moe_tensor *xs = moe_dispatch(x, tok, src);                                  /* [N, d], by expert slot */
    moe_tensor *y = L->n_local < L->s.n_experts ? exchange_and_run(L, xs, plan.offsets, compute, sample)
                                                : run_experts(L, xs, plan.offsets, compute, sample); /* [N, d] */
    if (y && sample && update_running_latency(L, sample) != MOE_OK) return NULL;
    moe_tensor *out = moe_combine(y, moe_cast(res->routing.gates, compute), src); /* [T, d] */
    return add_shared(L, x, out, compute);
}

/* Every expert here, in one group in id order (slot = id), none behind a provider. */
static bool resident_in_order(const moe_moe_layer *L) {
    int E = L->s.n_experts;
    bool resident = !L->provider && L->n_local == E && L->n_groups == 1 && L->groups[0].n == E;
    for (int i = 0; resident && i < E; i++) resident = L->groups[0].experts[i] == i;
    return resident && moe_router_selects_on_device(&L->router);
}

bool moe_moe_layer_gathers(const moe_moe_layer *L, int64_t T) {
    return resident_in_order(L) && T * L->s.top_k <= MOE_GATHER_MAX_ROWS && (L->s.capacity_factor <= 0 || T == 1);
}

bool moe_moe_layer_sorts(const moe_moe_layer *L) { return resident_in_order(L) && L->s.capacity_factor <= 0; }

moe_tensor *moe_moe_layer_apply_sorted(moe_moe_layer *L, moe_tensor *x, moe_tensor *gates, moe_tensor *experts,
                                       moe_dtype compute) {
    MOE_ASSERT(moe_moe_layer_sorts(L), "moe layer: this layer does not sort its routing on the device");
    if (!x || !gates || !experts) return NULL;
    int E = L->s.n_experts;
    moe_tensor *src, *offsets, *tok = moe_route_plan(experts, E, &src, &offsets);
    /* the dispatch is queued before the offsets are read, so that it runs meanwhile */
    moe_tensor *xs = tok ? moe_dispatch(x, tok, src) : NULL; /* [T k, d], by expert */
    moe_tensor *off_host = xs ? moe_tensor_to(offsets, MOE_CPU, MOE_LIFE_STEP) : NULL;
    if (!off_host) return NULL;
    int64_t *off = moe_step_host_alloc(sizeof(int64_t) * (size_t)(E + 1));
    if (!off) {
        moe_error(MOE_ERR_OOM, "moe layer: out of host memory for %d expert offsets", E);
        return NULL;
    }
    for (int e = 0; e <= E; e++) off[e] = ((const int32_t *)off_host->data)[e];
    moe_tensor *y = run_experts(L, xs, off, compute, NULL);        /* [T k, d] */
    moe_tensor *out = moe_combine(y, moe_cast(gates, compute), src); /* [T, d] */
    return add_shared(L, x, out, compute);
}

moe_tensor *moe_moe_layer_apply_gathered(moe_moe_layer *L, moe_tensor *x, moe_tensor *gates, moe_tensor *experts,
                                         moe_dtype compute) {
    MOE_ASSERT(!x || moe_moe_layer_gathers(L, x->shape[0]), "moe layer: %lld tokens do not take the gathered path",
               x ? (long long)x->shape[0] : 0LL);
    if (!x || !gates || !experts) return NULL;
    moe_tensor *w13, *w2;
    if (moe_moe_layer_expert_stacks(L, 0, compute, &w13, &w2) != MOE_OK) return NULL;
    return add_shared(L, x, moe_gathered_swiglu(x, experts, moe_cast(gates, compute), w13, w2), compute); /* [T, d] */
}

moe_status moe_moe_layer_measure_latency(moe_moe_layer *L, int64_t tokens, moe_dtype compute, double *latency_ms) {
    int E = L->s.n_experts;
    for (int e = 0; e < E; e++) latency_ms[e] = 0;
    bool was = moe_grad_set_enabled(false);
    moe_status s = MOE_OK;
    /* one warm-up round, then the best of LATENCY_REPS timed rounds; each round times every
     * local expert once, so a passing load on a shared machine slows all of them alike */
    enum { LATENCY_REPS = 8 };
    for (int r = 0; r <= LATENCY_REPS && s == MOE_OK; r++)
        for (int g = 0; g < L->n_groups; g++)
            for (int i = 0; i < L->groups[g].n && s == MOE_OK; i++) {
                int e = L->groups[g].experts[i];
                moe_step_reset();
                moe_tensor *x = moe_tensor_randn(MOE_LIFE_STEP, L->groups[g].w13->device, compute, 2,
                                                 (int64_t[]){tokens, L->s.d_model}, 17, (uint64_t)r << 32, 1.0);
                s = x ? moe_device_sync(x->device) : moe_last_status();
                double t0 = moe_clock_ms();
                moe_tensor *w13, *w2;
                moe_moe_layer_expert_weights(L, e, &w13, &w2);
                moe_tensor *y = moe_swiglu_ffn(x, moe_cast(w13, compute), moe_cast(w2, compute));
                if (s == MOE_OK) s = y ? moe_device_sync(y->device) : moe_last_status();
                double ms = moe_clock_ms() - t0;
                if (r == 1 || (r > 1 && ms < latency_ms[e])) latency_ms[e] = ms;
            }
    moe_grad_set_enabled(was);
    moe_step_reset();
    MOE_TRY(s);
    if (L->n_local < E) MOE_TRY(moe_dist_allreduce_f64(MOE_GROUP_EP, latency_ms, E));
    for (int e = 0; e < E; e++) L->latency[e] = latency_ms[e] / (double)tokens;
    return moe_router_set_latency(&L->router, latency_ms);
}
