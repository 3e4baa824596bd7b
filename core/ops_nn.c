/* Neural-network ops: dropout (Philox mask), rotary embedding, flash-style attention
 * with grouped-query heads, and blockwise "cut" cross-entropy over a large vocabulary
 * (core/README.md §2). Kernels: core/cpu/nn_cpu.c. */
#include <math.h>

#include "core/op_internal.h"

/* Runs kernel k (with attrs) on the output grad into a fresh x-shaped grad and hands it
 * to the single input: the backward of the elementwise-linear ops dropout and rope. */
static void give_kernel_of_grad(moe_node *n, moe_kernel_id k, const void *attrs) {
    moe_tensor *x = n->in[0];
    moe_tensor *gx = op_new(x, x->dtype, x->ndim, x->shape);
    if (!gx) {
        moe_grad_give(x, NULL);
        return;
    }
    BWD_RUN(k, .out = gx, .in = {n->out->grad}, .attrs = attrs);
    moe_grad_give(x, gx);
}

static bool need_float(moe_tensor *x, const char *op) {
    return moe_check(moe_dtype_is_float(x->dtype), op, "needs a float tensor, got %s", D(x));
}

/* ---- dropout ---- */
moe_tensor *moe_dropout(moe_tensor *x, double p, uint64_t seed, uint64_t counter) {
    OP_NEED(x);
    if (!need_float(x, "dropout")) return NULL;
    if (!moe_check(p >= 0 && p < 1, "dropout", "p = %g is outside [0, 1) for %s", p, D(x))) return NULL;
    if (p == 0) return x;
    moe_tensor *xc = op_contiguous_nograd(x);
    moe_tensor *o = xc ? op_new(x, x->dtype, x->ndim, x->shape) : NULL;
    if (!o) return NULL;
    moe_dropout_attrs at = {.p = p, .seed = seed, .counter = counter};
    OP_RUN(MOE_K_DROPOUT, .out = o, .in = {xc}, .attrs = &at);
    moe_autograd_record(MOE_OP_DROPOUT, o, 1, &x, &at, sizeof at);
    return o;
}

void moe_backward_dropout(moe_node *n) { give_kernel_of_grad(n, MOE_K_DROPOUT, n->attrs); }

/* ---- rotary embedding ---- */
moe_tensor *moe_rope(moe_tensor *x, int64_t pos0, double theta) {
    OP_NEED(x);
    if (!need_float(x, "rope")) return NULL;
    if (!moe_check(x->ndim == 4 && x->shape[3] >= 2 && x->shape[3] % 2 == 0, "rope",
                   "expects x [B, T, H, hd] with an even head dim, got %s", D(x)))
        return NULL;
    if (!moe_check(theta > 0, "rope", "theta = %g must be positive", theta)) return NULL;
    moe_tensor *o = op_new(x, x->dtype, 4, x->shape);
    if (!o) return NULL;
    moe_rope_attrs at = {.pos0 = pos0, .theta = theta, .inverse = false};
    OP_RUN(MOE_K_ROPE, .out = o, .in = {x}, .attrs = &at);
    moe_autograd_record(MOE_OP_ROPE, o, 1, &x, &at, sizeof at);
    return o;
}

void moe_backward_rope(moe_node *n) {
    moe_rope_attrs at = *(const moe_rope_attrs *)n->attrs;
    at.inverse = true;
    give_kernel_of_grad(n, MOE_K_ROPE, &at);
}

/* ---- attention ---- */

/* x itself when its last dim has unit stride (what the attention kernels read), else a
 * contiguous copy. */
static moe_tensor *unit_last_stride(moe_tensor *x) {
    if (x->strides[3] == 1 || x->shape[3] == 1) return x;
    return op_contiguous_nograd(x);
}

moe_tensor *moe_attention(moe_tensor *q, moe_tensor *k, moe_tensor *v, bool causal) {
    OP_NEED(q, k, v);
    moe_tensor *qkv[3] = {q, k, v};
    if (!op_check_same("attention", 3, qkv, true) || !need_float(q, "attention")) return NULL;
    if (!moe_check(q->ndim == 4 && k->ndim == 4 && moe_tensor_same_shape(k, v) && k->shape[0] == q->shape[0] &&
                       k->shape[3] == q->shape[3] && q->shape[3] > 0 && k->shape[2] > 0 &&
                       q->shape[2] % k->shape[2] == 0,
                   "attention",
                   "expects q [B, Tq, H, hd] and k, v [B, Tk, Hkv, hd] with H %% Hkv == 0, got q %s, k %s, v %s",
                   D(q), D(k), D(v)))
        return NULL;
    const int64_t Tq = q->shape[1], Tk = k->shape[1];
    if (!moe_check(Tk > 0 && (!causal || Tq <= Tk), "attention",
                   "needs at least one key and, when causal, Tq <= Tk; got q %s, k %s", D(q), D(k)))
        return NULL;
    moe_tensor *qc = unit_last_stride(q), *kc = unit_last_stride(k), *vc = unit_last_stride(v);
    if (!qc || !kc || !vc) return NULL;
    moe_tensor *o = op_new(q, q->dtype, 4, q->shape);
    moe_tensor *lse = op_new(q, q->dtype == MOE_F64 ? MOE_F64 : MOE_F32, 3,
                             (int64_t[]){q->shape[0], q->shape[2], Tq});
    if (!o || !lse) return NULL;
    moe_attention_attrs at = {.causal = causal, .scale = (float)(1.0 / sqrt((double)q->shape[3]))};
    OP_RUN(MOE_K_ATTENTION, .out = o, .out2 = lse, .in = {qc, kc, vc}, .attrs = &at);
    moe_node *node = moe_autograd_record(MOE_OP_ATTENTION, o, 3, qkv, &at, sizeof at);
    if (node) {
        node->saved[0] = lse;
        node->saved[1] = qc;
        node->saved[2] = kc;
        node->saved[3] = vc;
    }
    return o;
}

void moe_backward_attention(moe_node *n) {
    moe_tensor *q = n->in[0], *k = n->in[1], *v = n->in[2];
    moe_tensor *dq = op_new(q, q->dtype, 4, q->shape), *dk = op_new(k, k->dtype, 4, k->shape),
               *dv = op_new(v, v->dtype, 4, v->shape);
    if (!dq || !dk || !dv) {
        moe_grad_give(q, NULL);
        return;
    }
    moe_attention_attrs at = *(const moe_attention_attrs *)n->attrs;
    at.dk = dk;
    at.dv = dv;
    BWD_RUN(MOE_K_ATTENTION_BWD, .out = dq,
            .in = {n->saved[1], n->saved[2], n->saved[3], n->out, n->out->grad, n->saved[0]}, .attrs = &at);
    moe_grad_give(q, dq);
    moe_grad_give(k, dk);
    moe_grad_give(v, dv);
}

/* ---- cut cross-entropy ---- */
#define CE_DEFAULT_BLOCK 2048
static int64_t ce_block = CE_DEFAULT_BLOCK;

void moe_cross_entropy_set_block(int64_t block) { ce_block = block > 0 ? block : CE_DEFAULT_BLOCK; }

moe_tensor *moe_cross_entropy(moe_tensor *h, moe_tensor *w, moe_tensor *targets) {
    OP_NEED(h, w, targets);
    moe_tensor *hw[2] = {h, w};
    if (!op_check_same("cross_entropy", 2, hw, true) || !need_float(h, "cross_entropy")) return NULL;
    if (!moe_check(h->ndim == 2 && w->ndim == 2 && h->shape[1] == w->shape[1] && h->shape[0] > 0 &&
                       w->shape[0] > 0,
                   "cross_entropy", "expects h [T, d] and w [V, d] with T, V > 0, got h %s, w %s", D(h), D(w)))
        return NULL;
    const int64_t Tn = h->shape[0], V = w->shape[0];
    if (!moe_check(targets->dtype == MOE_I32 && targets->ndim == 1 && targets->shape[0] == Tn &&
                       (targets->device == h->device || targets->device == MOE_CPU),
                   "cross_entropy", "targets must be [%lld] i32 on the CPU or the device of h %s, got %s",
                   (long long)Tn, D(h), D(targets)))
        return NULL;
    /* The targets are checked and counted on the host: host targets need no device read
     * (no synchronisation); they go to h's device after that. */
    moe_tensor *tc = op_contiguous_nograd(targets);
    double *ht = tc ? moe_step_host_alloc(sizeof(double) * (size_t)Tn) : NULL;
    if (!ht) return NULL;
    if (moe_tensor_to_host_f64(tc, ht) != MOE_OK) return NULL;
    if (tc->device != h->device && !(tc = moe_tensor_to(tc, h->device, MOE_LIFE_STEP))) return NULL;
    int64_t count = 0;
    for (int64_t t = 0; t < Tn; t++) {
        if (ht[t] == -1) continue;
        if (!(ht[t] >= 0 && ht[t] < (double)V)) {
            moe_error(MOE_ERR_INVALID,
                      "cross_entropy: target %.0f at row %lld is out of range [0, %lld) (-1 marks an ignored row)",
                      ht[t], (long long)t, (long long)V);
            return NULL;
        }
        count++;
    }
    moe_dtype ldt = h->dtype == MOE_F64 ? MOE_F64 : MOE_F32;
    moe_tensor *rows = op_new(h, ldt, 1, &Tn), *lse = op_new(h, ldt, 1, &Tn);
    if (!rows || !lse) return NULL;
    moe_ce_attrs at = {.block = ce_block, .inv_count = count ? 1.0f / (float)count : 0.0f};
    OP_RUN(MOE_K_CROSS_ENTROPY, .out = rows, .out2 = lse, .in = {h, w, tc}, .attrs = &at);
    /* rows does not require grad, so the sum and the scaling record nothing. */
    moe_tensor *loss = moe_mul_scalar(moe_sum_all(rows), (double)at.inv_count);
    if (!loss) return NULL;
    moe_tensor *ins[3] = {h, w, targets};
    moe_node *node = moe_autograd_record(MOE_OP_CROSS_ENTROPY, loss, 3, ins, &at, sizeof at);
    if (node) {
        node->saved[0] = lse;
        node->saved[1] = tc;
    }
    return loss;
}

void moe_backward_cross_entropy(moe_node *n) {
    moe_tensor *h = n->in[0], *w = n->in[1];
    moe_tensor *dh = h->requires_grad ? op_new(h, h->dtype, 2, h->shape) : NULL;
    moe_tensor *dw = w->requires_grad ? op_new(w, w->dtype, 2, w->shape) : NULL;
    if ((h->requires_grad && !dh) || (w->requires_grad && !dw)) {
        moe_grad_give(h, NULL);
        return;
    }
    BWD_RUN(MOE_K_CROSS_ENTROPY_BWD, .out = dh, .out2 = dw,
            .in = {h, w, n->saved[1], n->saved[0], n->out->grad}, .attrs = n->attrs);
    if (dh) moe_grad_give(h, dh);
    if (dw) moe_grad_give(w, dw);
}
