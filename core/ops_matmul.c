/* Matmul (batched, strided, broadcasting a 2-D right operand), the grouped expert matmul
 * over per-expert row ranges and the gathered SwiGLU experts with their combine. */
#include <string.h>

#include "core/op_internal.h"

static bool float_mm_dtype(moe_dtype dt) { return dt == MOE_F32 || dt == MOE_BF16 || dt == MOE_F64; }

/* out = alpha * a @ b + beta * out, no autograd. */
static moe_status gemm_raw(const moe_tensor *a, const moe_tensor *b, moe_tensor *out, float alpha, float beta) {
    moe_matmul_attrs at = {.alpha = alpha, .beta = beta};
    moe_kernel_args args = {.out = out, .in = {a, b}, .attrs = &at};
    return moe_kernel_run(MOE_K_MATMUL, &args);
}

moe_tensor *moe_matmul(moe_tensor *a, moe_tensor *b) {
    OP_NEED(a, b);
    moe_tensor *ab[2] = {a, b};
    if (!op_check_same("matmul", 2, ab, true)) return NULL;
    if (!moe_check(float_mm_dtype(a->dtype), "matmul", "dtype %s not supported", moe_dtype_name(a->dtype))) return NULL;
    if (!moe_check(a->ndim >= 2 && b->ndim >= 2 && a->shape[a->ndim - 1] == b->shape[b->ndim - 2], "matmul",
                   "inner dims differ: %s @ %s", D(a), D(b)))
        return NULL;
    if (b->ndim > 2) {
        bool ok = b->ndim == a->ndim;
        for (int d = 0; ok && d < a->ndim - 2; d++) ok = a->shape[d] == b->shape[d];
        if (!moe_check(ok, "matmul", "batch dims differ: %s @ %s", D(a), D(b))) return NULL;
    }
    int64_t s[MOE_MAX_DIMS];
    memcpy(s, a->shape, sizeof s);
    s[a->ndim - 1] = b->shape[b->ndim - 1];
    moe_tensor *o = op_new(a, a->dtype, a->ndim, s);
    if (!o || gemm_raw(a, b, o, 1.0f, 0.0f) != MOE_OK) return NULL;
    moe_autograd_record(MOE_OP_MATMUL, o, 2, ab, NULL, 0);
    return o;
}

void moe_backward_matmul(moe_node *n) {
    moe_tensor *a = n->in[0], *b = n->in[1], *g = n->out->grad;
    if (a->requires_grad) moe_grad_give(a, moe_matmul(g, moe_transpose(b, -1, -2)));
    if (b->requires_grad) {
        if (b->ndim == 2 && a->ndim > 2) {
            /* b shared by all batches: fold the batch into the rows. */
            int64_t k = a->shape[a->ndim - 1], m = g->shape[g->ndim - 1];
            moe_tensor *a2 = moe_reshape(a, 2, (int64_t[]){-1, k}), *g2 = moe_reshape(g, 2, (int64_t[]){-1, m});
            moe_grad_give(b, moe_matmul(moe_transpose(a2, 0, 1), g2));
        } else {
            moe_grad_give(b, moe_matmul(moe_transpose(a, -1, -2), g));
        }
    }
}

/* ---- grouped matmul ---- */
typedef struct { int64_t *offsets; int n_groups; } grouped_node_attrs;

static moe_status grouped_raw(int mode, const moe_tensor *x, const moe_tensor *w, moe_tensor *out,
                              const int64_t *offsets, int n_groups) {
    moe_grouped_attrs at = {.offsets = offsets, .n_groups = n_groups, .mode = mode};
    moe_kernel_args args = {.out = out, .in = {x, w}, .attrs = &at};
    return moe_kernel_run(MOE_K_GROUPED_MATMUL, &args);
}

moe_tensor *moe_grouped_matmul(moe_tensor *x, moe_tensor *w, const int64_t *offsets) {
    OP_NEED(x, w);
    moe_tensor *xw[2] = {x, w};
    if (!op_check_same("grouped_matmul", 2, xw, true)) return NULL;
    if (!moe_check(x->ndim == 2 && w->ndim == 3 && x->shape[1] == w->shape[1], "grouped_matmul",
                   "expects x [N, K] and w [E, K, M], got %s and %s", D(x), D(w)))
        return NULL;
    int E = (int)w->shape[0];
    bool ok = offsets[0] == 0 && offsets[E] == x->shape[0];
    for (int e = 0; ok && e < E; e++) ok = offsets[e] <= offsets[e + 1];
    if (!moe_check(ok, "grouped_matmul", "offsets must rise from 0 to %lld over %d groups", (long long)x->shape[0], E))
        return NULL;
    x = op_contiguous_nograd(x) == x ? x : moe_contiguous(x);
    if (!x) return NULL;
    moe_tensor *o = op_new(x, x->dtype, 2, (int64_t[]){x->shape[0], w->shape[2]});
    if (!o || grouped_raw(0, x, w, o, offsets, E) != MOE_OK) return NULL;
    moe_tensor *in2[2] = {x, w};
    moe_node *node = moe_autograd_record(MOE_OP_GROUPED_MATMUL, o, 2, in2, NULL, 0);
    if (node) {
        grouped_node_attrs *ga = (grouped_node_attrs *)node->attrs;
        ga->offsets = moe_step_host_alloc(sizeof(int64_t) * (size_t)(E + 1));
        if (!ga->offsets) return NULL;
        memcpy(ga->offsets, offsets, sizeof(int64_t) * (size_t)(E + 1));
        ga->n_groups = E;
    }
    return o;
}

moe_tensor *moe_gathered_swiglu(moe_tensor *x, moe_tensor *ids, moe_tensor *gates, moe_tensor *w13, moe_tensor *w2) {
    OP_NEED(x, ids, gates, w13, w2);
    moe_tensor *xw[3] = {x, w13, w2}, *all[5] = {x, ids, gates, w13, w2};
    if (!op_check_same("gathered_swiglu", 3, xw, true) || !op_check_same("gathered_swiglu", 5, all, false)) return NULL;
    if (!moe_check(ids->dtype == MOE_I32, "gathered_swiglu", "ids must be i32, got %s", D(ids))) return NULL;
    bool shapes = x->ndim == 2 && ids->ndim == 2 && w13->ndim == 3 && w2->ndim == 3 && ids->shape[0] == x->shape[0] &&
                  w13->shape[1] == x->shape[1] && w13->shape[2] == 2 * w2->shape[1] && w2->shape[0] == w13->shape[0] &&
                  w2->shape[2] == x->shape[1];
    if (!moe_check(shapes, "gathered_swiglu", "expects x [T, d], ids [T, k], w13 [E, d, 2f], w2 [E, f, d], got %s, %s, %s, %s",
                   D(x), D(ids), D(w13), D(w2)))
        return NULL;
    if (!moe_check(gates->dtype == x->dtype && gates->ndim == 2 && gates->shape[0] == ids->shape[0] &&
                       gates->shape[1] == ids->shape[1],
                   "gathered_swiglu", "gates must be [T, k] like ids %s in x's dtype (x %s), got %s", D(ids), D(x), D(gates)))
        return NULL;
    if (!moe_check(moe_tensor_is_contiguous(w13) && moe_tensor_is_contiguous(w2), "gathered_swiglu",
                   "the expert stacks must be contiguous (%s, %s)", D(w13), D(w2)))
        return NULL;
    bool grads = moe_grad_enabled() &&
                 (x->requires_grad || gates->requires_grad || w13->requires_grad || w2->requires_grad);
    if (!moe_check(!grads, "gathered_swiglu", "inference only: its inputs need grads (training takes the grouped path)"))
        return NULL;
    x = moe_tensor_is_contiguous(x) ? x : moe_contiguous(x);
    ids = moe_tensor_is_contiguous(ids) ? ids : moe_contiguous(ids);
    gates = moe_tensor_is_contiguous(gates) ? gates : moe_contiguous(gates);
    if (!x || !ids || !gates) return NULL;
    int64_t P = x->shape[0] * ids->shape[1];
    moe_tensor *o = op_new(x, x->dtype, 2, x->shape),
               *act = op_new(x, x->dtype, 2, (int64_t[]){P, w2->shape[1]}); /* [P, f] scratch */
    if (!o || !act) return NULL;
    OP_RUN(MOE_K_GATHERED_SWIGLU, .out = o, .out2 = act, .in = {x, ids, gates, w13, w2});
    return o;
}

void moe_backward_grouped_matmul(moe_node *n) {
    const grouped_node_attrs *ga = (const grouped_node_attrs *)n->attrs;
    moe_tensor *x = n->in[0], *w = n->in[1], *g = op_contiguous_nograd(n->out->grad);
    if (!g) {
        moe_grad_give(x, NULL);
        return;
    }
    if (x->requires_grad) {
        moe_tensor *gx = op_new(x, x->dtype, 2, x->shape);
        if (gx && grouped_raw(1, g, w, gx, ga->offsets, ga->n_groups) != MOE_OK) gx = NULL;
        moe_grad_give(x, gx);
    }
    if (w->requires_grad) {
        /* The kernel accumulates (w[e] += x_g^T g_g): straight into w's grad when the dtypes
         * agree (f32 training: w is the master weight), else into a zeroed buffer. */
        bool direct = !w->grad || w->grad->dtype == w->dtype;
        moe_tensor *gw = direct ? moe_grad_buffer(w) : moe_tensor_zeros(MOE_LIFE_STEP, w->device, w->dtype, 3, w->shape);
        if (direct && gw && gw->dtype != w->dtype) { /* a bf16 parameter's f32 grad */
            direct = false;
            gw = moe_tensor_zeros(MOE_LIFE_STEP, w->device, w->dtype, 3, w->shape);
        }
        moe_kernel_args args = {.out = gw, .in = {x, g},
                                .attrs = &(moe_grouped_attrs){.offsets = ga->offsets, .n_groups = ga->n_groups, .mode = 2}};
        if (!gw || moe_kernel_run(MOE_K_GROUPED_MATMUL, &args) != MOE_OK) moe_grad_give(w, NULL);
        else if (!direct) moe_grad_give(w, gw);
    }
}
