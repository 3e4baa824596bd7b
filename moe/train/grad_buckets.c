/* Gradient buckets: planning, the readiness hook and the overlapped all-reduce (see
 * grad_buckets.h). */
#include "moe/train/grad_buckets.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/memory.h"

static int64_t grad_bucket_bytes(moe_device dev) {
    const char *kb = getenv("MOE_GRAD_BUCKET_KB");
    if (kb && atoll(kb) > 0) return atoll(kb) << 10;
    return (int64_t)(dev == MOE_CUDA ? 32 : 64) << 20;
}

/* A bucket in planning. The buckets run by decreasing key, the smallest registration
 * index among their parameters: the backward finishes late-registered parameters first,
 * so a bucket is complete about when its earliest-registered parameter is. */
typedef struct { int64_t key; int id; } bucket_order;

static int bucket_order_cmp(const void *a, const void *b) {
    int64_t ka = ((const bucket_order *)a)->key, kb = ((const bucket_order *)b)->key;
    return (ka < kb) - (ka > kb);
}

/* A PERSIST view of `flat` at element `at` with p's shape, to be p's grad: freed with p,
 * leaving flat's storage alone (a view owns none). */
static moe_tensor *grad_view(const moe_tensor *flat, const moe_tensor *p, int64_t at) {
    int64_t st[MOE_MAX_DIMS];
    moe_strides_contiguous(p->ndim, p->shape, st);
    moe_tensor *v = moe_tensor_view_raw(flat, p->ndim, p->shape, st, at);
    if (!v) return NULL;
    moe_tensor *keep = malloc(sizeof *keep);
    if (!keep) {
        moe_error(MOE_ERR_OOM, "gradient buckets: out of host memory");
        return NULL;
    }
    *keep = *v;
    keep->life = MOE_LIFE_PERSIST;
    return keep;
}

/* Plans the buckets, allocates them zeroed and makes the grad of every parameter to sum a
 * view into its bucket (a grad already there is copied in). No buckets on one rank. */
moe_status moe_grad_buckets_init(moe_grad_buckets *gs, moe_model *m) {
    memset(gs, 0, sizeof *gs);
    int n = m->n_params, nb = 0;
    int *bucket_of = malloc(sizeof(int) * (size_t)n);
    int64_t *at = malloc(sizeof(int64_t) * (size_t)n);
    bucket_order *order = malloc(sizeof *order * (size_t)n);
    moe_grad_bucket *plan = calloc((size_t)n, sizeof *plan); /* at most one bucket per parameter */
    gs->b = calloc((size_t)n, sizeof *gs->b);
    moe_status s = MOE_OK;
    if (!bucket_of || !at || !order || !plan || !gs->b)
        s = moe_error(MOE_ERR_OOM, "gradient buckets: out of host memory");
    int64_t cap = grad_bucket_bytes(m->dev);
    int open[MOE_GROUP_COUNT] = {-1, -1, -1};
    for (int i = n - 1; i >= 0 && s == MOE_OK; i--) {
        moe_tensor *p = m->params[i].t;
        moe_dist_group g = m->params[i].expert_stack ? MOE_GROUP_DP : MOE_GROUP_WORLD;
        bucket_of[i] = -1;
        if (moe_dist_size(g) == 1) continue;
        moe_dtype dt = p->dtype == MOE_BF16 ? MOE_F32 : p->dtype; /* the grad's dtype (autograd.c) */
        int64_t numel = moe_tensor_numel(p), es = (int64_t)moe_dtype_size(dt);
        int o = open[g];
        if (o < 0 || plan[o].dtype != dt || (plan[o].elems > 0 && (plan[o].elems + numel) * es > cap)) {
            o = open[g] = nb++;
            plan[o] = (moe_grad_bucket){.group = g, .dtype = dt};
        }
        bucket_of[i] = o;
        at[i] = plan[o].elems;
        plan[o].elems += numel;
        plan[o].n_params++;
        order[o] = (bucket_order){.key = i, .id = o};
    }
    if (s == MOE_OK) qsort(order, (size_t)nb, sizeof *order, bucket_order_cmp);
    for (int k = 0; k < nb && s == MOE_OK; k++) { /* bucket k of the run is planned bucket order[k].id */
        moe_grad_bucket *b = &gs->b[k];
        *b = plan[order[k].id];
        b->flat = moe_tensor_zeros(MOE_LIFE_PERSIST, m->dev, b->dtype, 1, (int64_t[]){b->elems});
        if (!b->flat) s = moe_last_status();
        else gs->n = k + 1;
        for (int i = 0; i < n && s == MOE_OK; i++) {
            if (bucket_of[i] != order[k].id) continue;
            moe_tensor *p = m->params[i].t, *v = grad_view(b->flat, p, at[i]);
            if (!v) s = moe_last_status();
            else if (p->grad && (s = moe_tensor_copy_(v, p->grad)) != MOE_OK) moe_tensor_free(v);
            else {
                moe_tensor_free(p->grad);
                p->grad = v;
            }
        }
    }
    free(bucket_of);
    free(at);
    free(order);
    free(plan);
    return s;
}

void moe_grad_buckets_free(moe_grad_buckets *gs) {
    for (int k = 0; k < gs->n; k++) moe_tensor_free(gs->b[k].flat);
    free(gs->b);
    gs->b = NULL;
    gs->n = 0;
}

/* A new step: no bucket started, no grad final yet. */
void moe_grad_buckets_begin(moe_grad_buckets *gs) {
    gs->started = 0;
    gs->status = MOE_OK;
    for (int k = 0; k < gs->n; k++) gs->b[k].n_ready = 0;
}

/* Starts, in index order, the next buckets whose grads are all final (all: every bucket
 * left). A failure is kept for moe_grad_buckets_finish; the starts go on, to keep the ranks'
 * collectives matched. */
void moe_grad_buckets_start(moe_grad_buckets *gs, bool all) {
    while (gs->started < gs->n) {
        moe_grad_bucket *b = &gs->b[gs->started];
        if (!all && b->n_ready < b->n_params) break;
        gs->started++;
        moe_status s = moe_dist_allreduce_sum_start(b->group, b->flat, &b->req);
        if (s != MOE_OK && gs->status == MOE_OK) {
            gs->status = s;
            snprintf(gs->msg, sizeof gs->msg, "%s", moe_last_error());
        }
    }
}

/* The autograd readiness hook: p's grad is final; it counts for the bucket holding it. */
void moe_grad_buckets_ready(moe_tensor *p, void *user) {
    moe_grad_buckets *gs = user;
    const char *g = p->grad ? (const char *)p->grad->data : NULL;
    for (int k = 0; k < gs->n && g; k++) {
        const char *lo = gs->b[k].flat->data;
        if (g >= lo && g < lo + gs->b[k].elems * (int64_t)moe_dtype_size(gs->b[k].dtype)) {
            gs->b[k].n_ready++;
            moe_grad_buckets_start(gs, false);
            return;
        }
    }
}

/* Waits for every started bucket; returns the first failure to start or finish one. */
moe_status moe_grad_buckets_finish(moe_grad_buckets *gs) {
    for (int k = 0; k < gs->started; k++) {
        moe_status w = moe_dist_wait(gs->b[k].req);
        gs->b[k].req = NULL;
        if (w != MOE_OK && gs->status == MOE_OK) {
            gs->status = w;
            snprintf(gs->msg, sizeof gs->msg, "%s", moe_last_error());
        }
    }
    return gs->status == MOE_OK ? MOE_OK : moe_error(gs->status, "%s", gs->msg);
}

/* MOE_GRAD_OVERLAP=0: no bucket starts before the backward has finished. */
bool moe_grad_buckets_overlap(void) {
    const char *v = getenv("MOE_GRAD_OVERLAP");
    return !(v && strcmp(v, "0") == 0);
}
