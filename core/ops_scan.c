/* Linear-attention scans: the gated delta rule and gated linear attention over N
 * independent sequences (the memories of MoM and the gated delta net, moe/README.md §2).
 * One op, two forward forms selected by the attrs (step by step, or chunked WY form);
 * one backward: the reverse-time recurrence with the states recomputed chunk by chunk
 * from the checkpoints the forward leaves. Kernels: core/cpu/scan_cpu.c, core/cuda/scan.cu. */
#include "core/op_internal.h"

/* Checkpoint interval of the step-by-step form (only the backward's memory depends on it). */
#define SCAN_RECURRENT_CKPT 64

static moe_dtype state_dtype(moe_dtype dt) { return dt == MOE_F64 ? MOE_F64 : MOE_F32; }

static moe_tensor *scan_op(moe_tensor *q, moe_tensor *k, moe_tensor *v, moe_tensor *beta, moe_tensor *alpha,
                           moe_tensor *state0, bool delta, bool chunked, int64_t chunk, moe_tensor **state_out) {
    const char *op = "delta_scan";
    if (state_out) *state_out = NULL;
    OP_NEED(q, k, v, beta, alpha);
    moe_tensor *all[5] = {q, k, v, beta, alpha};
    if (!op_check_same(op, 5, all, true) ||
        !moe_check(moe_dtype_is_float(q->dtype), op, "needs float tensors, got q %s", D(q)))
        return NULL;
    if (!moe_check(q->ndim == 4 && moe_tensor_same_shape(q, k) && v->ndim == 4 && beta->ndim == 3 &&
                       moe_tensor_same_shape(beta, alpha) && q->shape[1] > 0 && q->shape[3] > 0 && v->shape[3] > 0,
                   op, "expects q, k [N, T, H, dk] and v [N, T, H, dv] with T, dk, dv > 0, got q %s, k %s, v %s", D(q),
                   D(k), D(v)))
        return NULL;
    const int64_t N = q->shape[0], T = q->shape[1], H = q->shape[2], dk = q->shape[3], dv = v->shape[3];
    if (!moe_check(v->shape[0] == N && v->shape[1] == T && v->shape[2] == H && beta->shape[0] == N &&
                       beta->shape[1] == T && beta->shape[2] == H,
                   op, "v %s, beta %s and alpha %s must match q %s in N, T, H", D(v), D(beta), D(alpha), D(q)))
        return NULL;
    moe_dtype sdt = state_dtype(q->dtype);
    if (state0 &&
        !moe_check(state0->ndim == 4 && state0->shape[0] == N && state0->shape[1] == H && state0->shape[2] == dk &&
                       state0->shape[3] == dv && state0->dtype == sdt && state0->device == q->device,
                   op, "state0 must be [%lld, %lld, %lld, %lld] %s on the device of q %s, got %s", (long long)N,
                   (long long)H, (long long)dk, (long long)dv, moe_dtype_name(sdt), D(q), D(state0)))
        return NULL;
    if (!moe_check(chunk >= 1, op, "chunk length %lld must be >= 1", (long long)chunk)) return NULL;

    moe_tensor *c[6] = {NULL};
    for (int i = 0; i < 5; i++)
        if (!(c[i] = op_contiguous_nograd(all[i]))) return NULL;
    if (state0 && !(c[5] = op_contiguous_nograd(state0))) return NULL;
    moe_tensor *o = op_new(q, q->dtype, 4, (int64_t[]){N, T, H, dv});
    int64_t sshape[4] = {N, H, dk, dv};
    moe_tensor *st = state_out ? op_new(q, sdt, 4, sshape) : NULL;
    if (!o || (state_out && !st)) return NULL;
    bool record = moe_grad_enabled();
    if (record) {
        bool any = state0 && state0->requires_grad;
        for (int i = 0; i < 5; i++) any |= all[i]->requires_grad;
        record = any;
    }
    moe_scan_attrs at = {.delta = delta, .chunked = chunked, .chunk = chunk};
    if (record && !(at.ckpt = op_new(q, sdt, 5, (int64_t[]){N, H, (T + chunk - 1) / chunk, dk, dv}))) return NULL;
    OP_RUN(MOE_K_DELTA_SCAN, .out = o, .out2 = st, .in = {c[0], c[1], c[2], c[3], c[4], c[5]}, .attrs = &at);
    moe_tensor *ins[6] = {q, k, v, beta, alpha, state0};
    moe_node *node = moe_autograd_record(MOE_OP_DELTA_SCAN, o, 6, ins, &at, sizeof at);
    if (node) node->saved[0] = at.ckpt;
    if (state_out) *state_out = st;
    return o;
}

moe_tensor *moe_delta_scan(moe_tensor *q, moe_tensor *k, moe_tensor *v, moe_tensor *beta, moe_tensor *alpha,
                           moe_tensor *state0, bool delta, moe_tensor **state_out) {
    return scan_op(q, k, v, beta, alpha, state0, delta, false, SCAN_RECURRENT_CKPT, state_out);
}

moe_tensor *moe_delta_scan_chunked(moe_tensor *q, moe_tensor *k, moe_tensor *v, moe_tensor *beta,
                                   moe_tensor *alpha, moe_tensor *state0, bool delta, int64_t chunk,
                                   moe_tensor **state_out) {
    return scan_op(q, k, v, beta, alpha, state0, delta, true, chunk, state_out);
}

/* One DELTA_SCAN_BWD over contiguous copies of the inputs and the output grad gives every
 * input grad at once (dstate0 only when there is a state0 that wants one). */
void moe_backward_delta_scan(moe_node *n) {
    moe_scan_attrs at = *(const moe_scan_attrs *)n->attrs;
    moe_tensor *c[5], *gr[5];
    for (int i = 0; i < 5; i++) {
        moe_tensor *x = n->in[i];
        c[i] = op_contiguous_nograd(x);
        gr[i] = c[i] ? op_new(x, x->dtype, x->ndim, x->shape) : NULL;
        if (!gr[i]) {
            moe_grad_give(n->in[0], NULL);
            return;
        }
    }
    moe_tensor *s0 = n->in[5], *g = op_contiguous_nograd(n->out->grad);
    moe_tensor *ds0 = s0 && s0->requires_grad ? op_new(s0, s0->dtype, 4, s0->shape) : NULL;
    if (!g || (s0 && s0->requires_grad && !ds0)) {
        moe_grad_give(n->in[0], NULL);
        return;
    }
    at.ckpt = n->saved[0];
    at.dk = gr[1];
    at.dv = gr[2];
    at.dbeta = gr[3];
    at.dalpha = gr[4];
    at.dstate0 = ds0;
    BWD_RUN(MOE_K_DELTA_SCAN_BWD, .out = gr[0], .in = {c[0], c[1], c[2], c[3], c[4], g}, .attrs = &at);
    for (int i = 0; i < 5; i++) moe_grad_give(n->in[i], gr[i]);
    if (ds0) moe_grad_give(s0, ds0);
}
