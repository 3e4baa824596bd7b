/* Recomputation (activation checkpointing) as an op: the forward keeps only the piece's
 * inputs and result and hands the step memory the piece took back to the arena; the
 * backward records the piece again on a tape of its own, sweeps it and frees it again.
 * No kernels of its own: the piece's ops run on whatever backend holds the tensors. */
#include "core/op_internal.h"

typedef struct recompute_attrs {
    moe_recompute_fn fn;
    void *ctx;
} recompute_attrs;

static void check_result(const moe_tensor *y, const moe_tensor *x) {
    char b1[96], b2[96];
    MOE_ASSERT(y->dtype == x->dtype && y->device == x->device && moe_tensor_same_shape(y, x),
               "recompute: the piece returned %s where its first input is %s", moe_tensor_describe(y, b1, sizeof b1),
               moe_tensor_describe(x, b2, sizeof b2));
}

moe_tensor *moe_keep_result(moe_recompute_fn fn, void *ctx, int n_in, moe_tensor *const *in) {
    MOE_ASSERT(fn && n_in >= 1 && in[0], "keep_result: a piece and its first input");
    for (int i = 0; moe_grad_enabled() && i < n_in; i++)
        MOE_ASSERT(!in[i] || !in[i]->requires_grad, "keep_result: a piece on the tape (use moe_recompute)");
    moe_tensor *x = in[0];
    moe_tensor *out = op_new(x, x->dtype, x->ndim, x->shape); /* [like in[0]], before the mark: it stays */
    if (!out) return NULL;
    moe_mem_mark mark = moe_mem_step_mark(x->device);
    moe_tensor *y = fn(ctx, in);
    if (y) check_result(y, x);
    moe_status s = y ? moe_tensor_copy_(out, y) : moe_last_status();
    moe_mem_step_release(x->device, mark); /* later kernels reusing it run after the copy */
    return s == MOE_OK ? out : NULL;
}

moe_tensor *moe_recompute(moe_recompute_fn fn, void *ctx, int n_in, moe_tensor *const *in) {
    MOE_ASSERT(fn && n_in >= 1 && n_in <= MOE_NODE_MAX_INPUTS, "recompute: a piece and 1 to %d inputs",
               MOE_NODE_MAX_INPUTS);
    bool any = false;
    for (int i = 0; i < n_in; i++) {
        if (!in[i]) return NULL;
        any |= in[i]->requires_grad;
    }
    if (!moe_grad_enabled() || !any) return fn(ctx, in);
    moe_grad_set_enabled(false);
    moe_tensor *out = moe_keep_result(fn, ctx, n_in, in);
    moe_grad_set_enabled(true);
    if (!out) return NULL;
    recompute_attrs at = {fn, ctx};
    moe_autograd_record(MOE_OP_RECOMPUTE, out, n_in, in, &at, sizeof at);
    return out;
}

/* t as a fresh leaf over the same elements: the recorded piece starts from it. */
static moe_tensor *fresh_leaf(const moe_tensor *t) {
    moe_tensor *leaf = moe_step_host_alloc(sizeof *leaf);
    if (!leaf) return NULL;
    *leaf = *t;
    leaf->base = NULL;
    leaf->grad = NULL;
    leaf->node = NULL;
    leaf->is_param = false;
    leaf->name = NULL;
    return leaf;
}

/* Records the piece again from leaves, sweeps it from g and copies the leaves' grads into
 * gin (allocated by the caller before the arena mark); flowed[i]: a grad reached leaf i. */
static moe_status replay(const moe_node *n, moe_tensor **gin, bool *flowed) {
    const recompute_attrs *at = (const recompute_attrs *)n->attrs;
    moe_tensor *leaf[MOE_NODE_MAX_INPUTS];
    for (int i = 0; i < n->n_in; i++) {
        leaf[i] = gin[i] ? fresh_leaf(n->in[i]) : n->in[i];
        if (!leaf[i]) return moe_last_status();
    }
    moe_tape outer = moe_tape_swap((moe_tape){0});
    bool was = moe_grad_set_enabled(true);
    moe_tensor *y = at->fn(at->ctx, leaf);
    moe_grad_set_enabled(was);
    if (y) check_result(y, n->out);
    moe_status s = y ? moe_backward_from(y, n->out->grad) : moe_last_status();
    moe_tape_swap(outer);
    for (int i = 0; i < n->n_in && s == MOE_OK; i++) {
        flowed[i] = gin[i] && leaf[i]->grad;
        if (flowed[i]) s = moe_tensor_copy_(gin[i], leaf[i]->grad);
    }
    return s;
}

void moe_backward_recompute(moe_node *n) {
    moe_tensor *gin[MOE_NODE_MAX_INPUTS] = {0};
    bool flowed[MOE_NODE_MAX_INPUTS] = {0};
    for (int i = 0; i < n->n_in; i++) { /* grads of non-parameter inputs: allocated before the mark, they stay */
        moe_tensor *t = n->in[i];
        if (!t->requires_grad || t->is_param) continue;
        if (!(gin[i] = op_new(t, t->dtype, t->ndim, t->shape))) {
            moe_grad_give(t, NULL);
            return;
        }
    }
    moe_device dev = n->out->device;
    moe_mem_mark mark = moe_mem_step_mark(dev);
    moe_status s = replay(n, gin, flowed);
    moe_mem_step_release(dev, mark);
    if (s != MOE_OK) {
        moe_grad_give(n->in[0], NULL);
        return;
    }
    for (int i = 0; i < n->n_in; i++)
        if (flowed[i]) moe_grad_give(n->in[i], gin[i]);
}
