/* Neural-network ops: dropout (Philox mask), rotary embedding, flash-style attention
 * with grouped-query heads, and blockwise "cut" cross-entropy over a large vocabulary
 * (core/README.md §2). Kernels: core/cpu/nn_cpu.c. */
#include <math.h>

#include "core/op_internal.h"

/* Runs kernel k (with attrs, and saved[0] as its second input: rope's positions) on the
 * output grad into a fresh x-shaped grad and hands it to the single input: the backward
 * of the elementwise-linear ops dropout and rope. */
static void give_kernel_of_grad(moe_node *n, moe_kernel_id k, const void *attrs) {
    moe_tensor *x = n->in[0];
    moe_tensor *gx = op_new(x, x->dtype, x->ndim, x->shape);
    if (!gx) {
        moe_grad_give(x, NULL);
        return;
    }
    BWD_RUN(k, .out = gx, .in = {n->out->grad, n->saved[0]}, .attrs = attrs);
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

/* The shared body of moe_rope and moe_rope_at: pos NULL means positions pos0 + t. */
static moe_tensor *rope_record(moe_tensor *x, moe_tensor *pos, int64_t pos0, double theta, const char *op) {
    if (!need_float(x, op)) return NULL;
    if (!moe_check(x->ndim == 4 && x->shape[3] >= 2 && x->shape[3] % 2 == 0, op,
                   "expects x [B, T, H, hd] with an even head dim, got %s", D(x)))
        return NULL;
    if (!moe_check(theta > 0, op, "theta = %g must be positive", theta)) return NULL;
    if (pos && !moe_check(pos->dtype == MOE_I32 && pos->ndim == 1 && pos->shape[0] == x->shape[1] &&
                              pos->device == x->device,
                          op, "positions must be [%lld] i32 on the device of x %s, got %s", (long long)x->shape[1],
                          D(x), D(pos)))
        return NULL;
    moe_tensor *pc = pos ? op_contiguous_nograd(pos) : NULL;
    moe_tensor *o = !pos || pc ? op_new(x, x->dtype, 4, x->shape) : NULL;
    if (!o) return NULL;
    moe_rope_attrs at = {.pos0 = pos0, .theta = theta, .inverse = false};
    OP_RUN(MOE_K_ROPE, .out = o, .in = {x, pc}, .attrs = &at);
    moe_node *node = moe_autograd_record(MOE_OP_ROPE, o, 1, &x, &at, sizeof at);
    if (node) node->saved[0] = pc;
    return o;
}

moe_tensor *moe_rope(moe_tensor *x, int64_t pos0, double theta) {
    OP_NEED(x);
    return rope_record(x, NULL, pos0, theta, "rope");
}

moe_tensor *moe_rope_at(moe_tensor *x, moe_tensor *pos, double theta) {
    OP_NEED(x, pos);
    return rope_record(x, pos, 0, theta, "rope_at");
}

/* x itself when each token's heads lie side by side (unit last stride, heads at stride hd),
 * else a contiguous copy. */
static moe_tensor *heads_side_by_side(moe_tensor *x) {
    bool ok = x->strides[3] == 1 && (x->shape[2] == 1 || x->strides[2] == x->shape[3]);
    return ok ? x : op_contiguous_nograd(x);
}

/* The norm weight of q or k with n heads under `norm` (NULL when there is none), checked. */
static bool rope_append_weight(const char *op, const moe_rope_append_spec *s, moe_tensor *w, moe_tensor *x,
                               const char *name) {
    if (s->norm == MOE_QK_NORM_NONE) return true;
    int64_t wd = s->norm == MOE_QK_NORM_PER_HEAD ? x->shape[3] : x->shape[2] * x->shape[3];
    return moe_check(w && w->ndim == 1 && w->shape[0] == wd && w->dtype == x->dtype && w->device == x->device, op,
                     "%s's norm weight must be [%lld] %s on %s's device, got %s", name, (long long)wd,
                     moe_dtype_name(x->dtype), name, w ? D(w) : "none");
}

moe_tensor *moe_rope_append(moe_tensor *q, moe_tensor *k, moe_tensor *v, const moe_rope_append_spec *spec,
                            moe_tensor *k_pool, moe_tensor *v_pool, moe_tensor *rows) {
    OP_NEED(q, k, v, k_pool, v_pool, rows);
    const char *op = "rope_append";
    MOE_ASSERT(spec && spec->norm >= MOE_QK_NORM_NONE && spec->norm <= MOE_QK_NORM_ALL, "rope_append: a bad spec");
    moe_tensor *all[5] = {q, k, v, k_pool, v_pool};
    if (!need_float(q, op) || !op_check_same(op, 5, all, true)) return NULL;
    const int64_t T = q->shape[1], hd = q->shape[3];
    bool shapes = q->ndim == 4 && k->ndim == 4 && v->ndim == 4 && q->shape[0] == 1 && hd >= 2 && hd % 2 == 0 &&
                  moe_tensor_same_shape(k, v) && k->shape[0] == 1 && k->shape[1] == T && k->shape[3] == hd &&
                  k_pool->ndim == 3 && moe_tensor_same_shape(k_pool, v_pool) && k_pool->shape[1] == k->shape[2] &&
                  k_pool->shape[2] == hd && moe_tensor_is_contiguous(k_pool) && moe_tensor_is_contiguous(v_pool);
    if (!moe_check(shapes, op, "expects q [1, T, H, hd] (hd even), k, v [1, T, Hkv, hd], pools [R, Hkv, hd] contiguous; "
                   "got %s, %s, %s, %s, %s", D(q), D(k), D(v), D(k_pool), D(v_pool)))
        return NULL;
    if (!rope_append_weight(op, spec, spec->q_w, q, "q") || !rope_append_weight(op, spec, spec->k_w, k, "k")) return NULL;
    if (!moe_check(spec->theta > 0 && spec->eps >= 0, op, "theta = %g must be positive and eps = %g not negative",
                   spec->theta, spec->eps))
        return NULL;
    moe_tensor *pos = spec->pos;
    for (int i = 0; i < 2; i++) {
        moe_tensor *ix = i ? rows : pos;
        if (!moe_check(ix && ix->dtype == MOE_I32 && ix->ndim == 1 && ix->shape[0] == T && ix->device == q->device, op,
                       "%s must be [%lld] i32 on q's device %s, got %s", i ? "rows" : "positions", (long long)T, D(q),
                       ix ? D(ix) : "none"))
            return NULL;
    }
    bool grads = moe_grad_enabled() && (q->requires_grad || k->requires_grad || v->requires_grad);
    if (!moe_check(!grads, op, "inference only: its inputs need grads")) return NULL;
    bool norm = spec->norm != MOE_QK_NORM_NONE;
    moe_tensor *qc = heads_side_by_side(q), *kc = heads_side_by_side(k), *vc = heads_side_by_side(v),
               *pc = op_contiguous_nograd(pos), *rc = op_contiguous_nograd(rows);
    moe_tensor *qw = norm ? op_contiguous_nograd(spec->q_w) : NULL, *kw = norm ? op_contiguous_nograd(spec->k_w) : NULL;
    moe_tensor *o = qc && kc && vc && pc && rc && (!norm || (qw && kw)) ? op_new(q, q->dtype, 4, q->shape) : NULL;
    if (!o) return NULL;
    moe_rope_append_attrs at = {.eps = spec->eps, .theta = spec->theta, .norm = spec->norm, .k_pool = k_pool,
                                .v_pool = v_pool};
    OP_RUN(MOE_K_ROPE_APPEND, .out = o, .in = {qc, kc, vc, qw, kw, pc, rc}, .attrs = &at);
    return o;
}

/* The inverse rotation at the same positions (saved[0], or pos0 + t). */
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

/* q, k, v same device and float dtype, [B, Tq, H, hd] and [B, Tk, Hkv, hd], H % Hkv == 0. */
static bool attention_shapes_ok(moe_tensor *q, moe_tensor *k, moe_tensor *v, const char *op) {
    moe_tensor *qkv[3] = {q, k, v};
    if (!op_check_same(op, 3, qkv, true) || !need_float(q, op)) return false;
    return moe_check(q->ndim == 4 && k->ndim == 4 && moe_tensor_same_shape(k, v) && k->shape[0] == q->shape[0] &&
                         k->shape[3] == q->shape[3] && q->shape[3] > 0 && k->shape[2] > 0 &&
                         q->shape[2] % k->shape[2] == 0,
                     op, "expects q [B, Tq, H, hd] and k, v [B, Tk, Hkv, hd] with H %% Hkv == 0, got q %s, k %s, v %s",
                     D(q), D(k), D(v));
}

/* The shared body of moe_attention and moe_attention_varlen, shapes checked; at carries
 * causal, the segments (seg NULL: the B batches) and their longest lengths. */
static moe_tensor *attention_record(moe_tensor *q, moe_tensor *k, moe_tensor *v, moe_tensor *seg,
                                    moe_attention_attrs at) {
    moe_tensor *qkv[3] = {q, k, v};
    moe_tensor *qc = unit_last_stride(q), *kc = unit_last_stride(k), *vc = unit_last_stride(v);
    if (!qc || !kc || !vc) return NULL;
    moe_tensor *o = op_new(q, q->dtype, 4, q->shape);
    moe_tensor *lse = op_new(q, q->dtype == MOE_F64 ? MOE_F64 : MOE_F32, 3,
                             (int64_t[]){q->shape[0], q->shape[2], q->shape[1]});
    if (!o || !lse) return NULL;
    at.scale = (float)(1.0 / sqrt((double)q->shape[3]));
    at.seg = seg;
    OP_RUN(MOE_K_ATTENTION, .out = o, .out2 = lse, .in = {qc, kc, vc}, .attrs = &at);
    moe_node *node = moe_autograd_record(MOE_OP_ATTENTION, o, 3, qkv, &at, sizeof at);
    if (node) {
        node->saved[0] = lse;
        node->saved[1] = qc;
        node->saved[2] = kc;
        node->saved[3] = vc;
        node->saved[4] = seg;
    }
    return o;
}

moe_tensor *moe_attention(moe_tensor *q, moe_tensor *k, moe_tensor *v, bool causal) {
    OP_NEED(q, k, v);
    if (!attention_shapes_ok(q, k, v, "attention")) return NULL;
    const int64_t Tq = q->shape[1], Tk = k->shape[1];
    if (!moe_check(Tk > 0 && (!causal || Tq <= Tk), "attention",
                   "needs at least one key and, when causal, Tq <= Tk; got q %s, k %s", D(q), D(k)))
        return NULL;
    moe_attention_attrs at = {.causal = causal, .n_seg = q->shape[0], .max_q = Tq, .max_k = Tk};
    return attention_record(q, k, v, NULL, at);
}

/* Checks the offsets of moe_attention_varlen (recording the first fault) and finds the
 * longest query and key segments. */
static bool varlen_offsets_ok(const int64_t *q_off, const int64_t *k_off, int n_seg, int64_t Tq, int64_t Tk,
                              bool causal, int64_t *max_q, int64_t *max_k) {
    const char *op = "attention_varlen";
    if (!moe_check(n_seg > 0 && q_off && k_off && q_off[0] == 0 && k_off[0] == 0 && q_off[n_seg] == Tq &&
                       k_off[n_seg] == Tk && Tq < INT32_MAX && Tk < INT32_MAX,
                   op, "offsets of %d segments must run from 0 to Tq = %lld and Tk = %lld", n_seg, (long long)Tq,
                   (long long)Tk))
        return false;
    *max_q = *max_k = 0;
    for (int s = 0; s < n_seg; s++) {
        const int64_t nq = q_off[s + 1] - q_off[s], nk = k_off[s + 1] - k_off[s];
        if (!moe_check(nq >= 0 && nk >= 0, op, "offsets must ascend: segment %d has %lld queries and %lld keys", s,
                       (long long)nq, (long long)nk) ||
            !moe_check(nq == 0 || nk > 0, op, "segment %d has %lld queries and no keys", s, (long long)nq) ||
            !moe_check(!causal || nq <= nk, op, "causal segment %d has more queries (%lld) than keys (%lld)", s,
                       (long long)nq, (long long)nk))
            return false;
        *max_q = nq > *max_q ? nq : *max_q;
        *max_k = nk > *max_k ? nk : *max_k;
    }
    return true;
}

/* The segment table of moe_attention_attrs for host offsets (checked), on q's device. */
static moe_tensor *segment_table(const moe_tensor *q, const int64_t *q_off, const int64_t *k_off, int n_seg) {
    int32_t *table = moe_step_host_alloc(sizeof(int32_t) * 2 * (size_t)(n_seg + 1));
    if (!table) return NULL;
    for (int s = 0; s <= n_seg; s++) {
        table[s] = (int32_t)q_off[s];
        table[n_seg + 1 + s] = (int32_t)k_off[s];
    }
    return moe_tensor_from_host(MOE_LIFE_STEP, q->device, MOE_I32, 2, (int64_t[]){2, n_seg + 1}, table);
}

moe_tensor *moe_attention_varlen(moe_tensor *q, moe_tensor *k, moe_tensor *v, const int64_t *q_off,
                                 const int64_t *k_off, int n_seg, bool causal) {
    OP_NEED(q, k, v);
    if (!attention_shapes_ok(q, k, v, "attention_varlen")) return NULL;
    if (!moe_check(q->shape[0] == 1, "attention_varlen", "expects packed q [1, Tq, H, hd], got %s", D(q))) return NULL;
    moe_attention_attrs at = {.causal = causal, .n_seg = n_seg};
    if (!varlen_offsets_ok(q_off, k_off, n_seg, q->shape[1], k->shape[1], causal, &at.max_q, &at.max_k)) return NULL;
    moe_tensor *seg = segment_table(q, q_off, k_off, n_seg);
    return seg ? attention_record(q, k, v, seg, at) : NULL;
}

/* q [1, Tq, H, hd], pools [R, Hkv, hd] contiguous, rows [Tk] I32, inputs without grads. */
static bool paged_inputs_ok(moe_tensor *q, moe_tensor *kp, moe_tensor *vp, moe_tensor *rows) {
    const char *op = "attention_paged";
    moe_tensor *qkv[3] = {q, kp, vp}, *all[4] = {q, kp, vp, rows};
    if (!op_check_same(op, 3, qkv, true) || !op_check_same(op, 4, all, false) || !need_float(q, op)) return false;
    bool shapes = q->ndim == 4 && q->shape[0] == 1 && kp->ndim == 3 && moe_tensor_same_shape(kp, vp) &&
                  kp->shape[2] == q->shape[3] && q->shape[3] > 0 && kp->shape[1] > 0 && q->shape[2] % kp->shape[1] == 0 &&
                  rows->ndim == 1 && rows->dtype == MOE_I32;
    if (!moe_check(shapes, op, "expects q [1, Tq, H, hd], pools [R, Hkv, hd] with H %% Hkv == 0 and rows [Tk] i32, "
                   "got q %s, k %s, v %s, rows %s", D(q), D(kp), D(vp), D(rows)))
        return false;
    if (!moe_check(moe_tensor_is_contiguous(kp) && moe_tensor_is_contiguous(vp), op, "the pools must be contiguous (%s, %s)",
                   D(kp), D(vp)))
        return false;
    bool grads = moe_grad_enabled() && (q->requires_grad || kp->requires_grad || vp->requires_grad);
    return moe_check(!grads, op, "inference only: its inputs need grads");
}

moe_tensor *moe_attention_paged(moe_tensor *q, moe_tensor *k_pool, moe_tensor *v_pool, moe_tensor *rows,
                                const int64_t *q_off, const int64_t *k_off, int n_seg, bool causal) {
    OP_NEED(q, k_pool, v_pool, rows);
    if (!paged_inputs_ok(q, k_pool, v_pool, rows)) return NULL;
    int64_t max_q, max_k;
    if (!varlen_offsets_ok(q_off, k_off, n_seg, q->shape[1], rows->shape[0], causal, &max_q, &max_k)) return NULL;
    moe_tensor *seg = segment_table(q, q_off, k_off, n_seg);
    return seg ? moe_attention_paged_table(q, k_pool, v_pool, rows, seg, max_q, max_k, causal) : NULL;
}

moe_tensor *moe_attention_paged_table(moe_tensor *q, moe_tensor *k_pool, moe_tensor *v_pool, moe_tensor *rows,
                                      moe_tensor *seg, int64_t max_q, int64_t max_k, bool causal) {
    OP_NEED(q, k_pool, v_pool, rows, seg);
    if (!paged_inputs_ok(q, k_pool, v_pool, rows)) return NULL;
    bool table = seg->ndim == 2 && seg->shape[0] == 2 && seg->shape[1] >= 2 && seg->dtype == MOE_I32 &&
                 seg->device == q->device && moe_tensor_is_contiguous(seg);
    if (!moe_check(table && max_q >= 1 && max_k >= max_q, "attention_paged", "expects a contiguous i32 segment table "
                   "[2, n_seg + 1] on q's device and bounds 1 <= max_q <= max_k, got %s, %lld, %lld", D(seg),
                   (long long)max_q, (long long)max_k))
        return NULL;
    moe_attention_attrs at = {.causal = causal, .n_seg = seg->shape[1] - 1, .max_q = max_q, .max_k = max_k, .seg = seg};
    if (max_q > MOE_ATTENTION_PAGED_MAX_Q) { /* prefill: gathered keys, the tensor-core kernels */
        int64_t shape[4] = {1, rows->shape[0], k_pool->shape[1], k_pool->shape[2]};
        moe_tensor *k = moe_reshape(moe_index_select(k_pool, rows), 4, shape);
        moe_tensor *v = moe_reshape(moe_index_select(v_pool, rows), 4, shape);
        return k && v && attention_shapes_ok(q, k, v, "attention_paged") ? attention_record(q, k, v, seg, at) : NULL;
    }
    moe_tensor *qc = unit_last_stride(q), *rc = moe_tensor_is_contiguous(rows) ? rows : moe_contiguous(rows);
    moe_tensor *o = op_new(q, q->dtype, 4, q->shape);
    if (!qc || !rc || !o) return NULL;
    at.scale = (float)(1.0 / sqrt((double)q->shape[3]));
    OP_RUN(MOE_K_ATTENTION_PAGED, .out = o, .in = {qc, k_pool, v_pool, rc}, .attrs = &at);
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
    at.seg = n->saved[4];
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
