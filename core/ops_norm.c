/* Row-wise ops over the last axis: softmax, log-softmax, logsumexp, RMSNorm, LayerNorm.
 * Inputs of any leading shape [..., d] are made contiguous here, so the kernels see
 * row-major [rows, d]. The norms keep per-row statistics (F32, or F64 for F64 inputs)
 * for their backward kernels. */
#include <string.h>

#include "core/op_internal.h"

/* A float tensor with at least one dimension and a non-empty last axis. */
static bool check_rows(const char *op, const moe_tensor *x) {
    return moe_check(moe_dtype_is_float(x->dtype), op, "needs a float tensor, got %s", D(x)) &&
           moe_check(x->ndim >= 1 && x->shape[x->ndim - 1] > 0, op, "needs a non-empty last axis, got %s", D(x));
}

/* Dtype of the norm statistics and parameter grads (see MOE_KERNEL_LIST). */
static moe_dtype stats_dtype(moe_dtype dt) { return dt == MOE_F64 ? MOE_F64 : MOE_F32; }

/* ---- softmax / log-softmax ---- */
static moe_tensor *softmax_op(moe_tensor *x, bool log, int op_id, const char *name) {
    OP_NEED(x);
    if (!check_rows(name, x)) return NULL;
    moe_tensor *xc = op_contiguous_nograd(x);
    moe_tensor *o = xc ? op_new(x, x->dtype, x->ndim, x->shape) : NULL;
    if (!o) return NULL;
    moe_softmax_attrs at = {log};
    OP_RUN(MOE_K_SOFTMAX, .out = o, .in = {xc}, .attrs = &at);
    moe_autograd_record(op_id, o, 1, &x, &at, sizeof at);
    return o;
}

moe_tensor *moe_softmax(moe_tensor *x) { return softmax_op(x, false, MOE_OP_SOFTMAX, "softmax"); }
moe_tensor *moe_log_softmax(moe_tensor *x) { return softmax_op(x, true, MOE_OP_LOG_SOFTMAX, "log_softmax"); }

/* Both use SOFTMAX_BWD with the output y (contiguous) and the attrs saved at record time. */
static void softmax_backward(moe_node *n) {
    moe_tensor *x = n->in[0], *g = op_contiguous_nograd(n->out->grad);
    moe_tensor *gx = g ? op_new(x, x->dtype, x->ndim, x->shape) : NULL;
    if (!gx) {
        moe_grad_give(x, NULL);
        return;
    }
    BWD_RUN(MOE_K_SOFTMAX_BWD, .out = gx, .in = {g, n->out}, .attrs = n->attrs);
    moe_grad_give(x, gx);
}

void moe_backward_softmax(moe_node *n) { softmax_backward(n); }
void moe_backward_log_softmax(moe_node *n) { softmax_backward(n); }

/* ---- logsumexp: [..., d] -> [...] ---- */
moe_tensor *moe_logsumexp(moe_tensor *x) {
    OP_NEED(x);
    if (!check_rows("logsumexp", x)) return NULL;
    moe_tensor *xc = op_contiguous_nograd(x);
    moe_tensor *o = xc ? op_new(x, x->dtype, x->ndim - 1, x->shape) : NULL;
    if (!o) return NULL;
    OP_RUN(MOE_K_LOGSUMEXP, .out = o, .in = {xc});
    moe_autograd_record(MOE_OP_LOGSUMEXP, o, 1, &x, NULL, 0);
    return o;
}

/* d lse / dx = softmax(x), recomputed here (logsumexp is off the hot path); the SOFTMAX
 * kernel's zero rows for all -inf inputs give those rows a zero grad instead of NaN. */
void moe_backward_logsumexp(moe_node *n) {
    moe_tensor *x = n->in[0], *xc = op_contiguous_nograd(x);
    moe_tensor *p = xc ? op_new(x, x->dtype, x->ndim, x->shape) : NULL;
    if (!p) {
        moe_grad_give(x, NULL);
        return;
    }
    BWD_RUN(MOE_K_SOFTMAX, .out = p, .in = {xc}, .attrs = &(moe_softmax_attrs){false});
    int64_t s[MOE_MAX_DIMS];
    memcpy(s, x->shape, sizeof s);
    s[x->ndim - 1] = 1;
    moe_grad_give(x, moe_mul(p, moe_reshape(n->out->grad, x->ndim, s)));
}

/* ---- RMSNorm and LayerNorm ----
 * Both take n_par optional [d] parameters (RMSNorm: w; LayerNorm: w, b) and keep n_par
 * statistics per row (RMSNorm: rstd -> [rows]; LayerNorm: mean, rstd -> [rows, 2]).
 * Node layout: in = {x, params...} (NULL where absent), saved = {stats, x, w} with w
 * contiguous and x's rows contiguous (x itself when its rows are at a uniform stride, as
 * in a slice of columns; the kernels read row r at r * moe_tensor_row_stride(x)); attrs =
 * moe_norm_attrs. */
static moe_tensor *norm_forward(const char *name, int op_id, moe_kernel_id k, moe_tensor *x,
                                moe_tensor *const *par, int n_par, double eps) {
    OP_NEED(x);
    if (!check_rows(name, x)) return NULL;
    int64_t d = x->shape[x->ndim - 1], rows = moe_tensor_numel(x) / d;
    for (int i = 0; i < n_par; i++) {
        moe_tensor *xp[2] = {x, par[i]};
        if (par[i] && (!op_check_same(name, 2, xp, true) ||
                       !moe_check(par[i]->ndim == 1 && par[i]->shape[0] == d, name,
                                  "%s %s does not match the last axis of x %s", i ? "bias" : "weight",
                                  D(par[i]), D(x))))
            return NULL;
    }
    /* rows at a uniform stride (a slice of a wider row) are read in place */
    moe_tensor *xc = moe_tensor_row_stride(x) ? x : op_contiguous_nograd(x), *pc[2] = {NULL, NULL};
    if (!xc) return NULL;
    for (int i = 0; i < n_par; i++)
        if (par[i] && !(pc[i] = op_contiguous_nograd(par[i]))) return NULL;
    moe_tensor *o = op_new(x, x->dtype, x->ndim, x->shape);
    moe_tensor *stats = op_new(x, stats_dtype(x->dtype), n_par, (int64_t[]){rows, n_par});
    if (!o || !stats) return NULL;
    moe_norm_attrs at = {eps};
    OP_RUN(k, .out = o, .out2 = stats, .in = {xc, pc[0], pc[1]}, .attrs = &at);
    moe_tensor *ins[3] = {x, par[0], n_par > 1 ? par[1] : NULL};
    moe_node *node = moe_autograd_record(op_id, o, 1 + n_par, ins, &at, sizeof at);
    if (node) {
        node->saved[0] = stats;
        node->saved[1] = xc;
        node->saved[2] = pc[0];
    }
    return o;
}

/* One *_BWD kernel gives gx and, when a parameter wants a grad, the row sums of the
 * parameter grads into a zeroed [n_par, d] block (w's row, then b's). */
static void norm_backward(moe_node *n, moe_kernel_id k, int n_par) {
    moe_tensor *x = n->in[0], *stats = n->saved[0];
    bool want = false;
    for (int i = 1; i <= n_par; i++) want |= n->in[i] && n->in[i]->requires_grad;
    int64_t d = x->shape[x->ndim - 1];
    moe_tensor *g = op_contiguous_nograd(n->out->grad);
    moe_tensor *gx = g ? op_new(x, x->dtype, x->ndim, x->shape) : NULL;
    moe_tensor *gp = gx && want ? moe_tensor_zeros(MOE_LIFE_STEP, x->device, stats->dtype, 2, (int64_t[]){n_par, d})
                                : NULL;
    if (!gx || (want && !gp)) {
        moe_grad_give(x, NULL);
        return;
    }
    moe_tensor *xc = op_contiguous_nograd(n->saved[1]);
    if (!xc) {
        moe_grad_give(x, NULL);
        return;
    }
    BWD_RUN(k, .out = gx, .out2 = gp, .in = {g, xc, n->saved[2], stats}, .attrs = n->attrs);
    moe_grad_give(x, gx);
    for (int i = 0; i < n_par; i++) {
        moe_tensor *p = n->in[1 + i];
        if (p && p->requires_grad) moe_grad_give(p, moe_tensor_view_raw(gp, 1, &d, (int64_t[]){1}, i * d));
    }
}

moe_tensor *moe_rmsnorm(moe_tensor *x, moe_tensor *w, double eps) {
    return norm_forward("rmsnorm", MOE_OP_RMSNORM, MOE_K_RMSNORM, x, &w, 1, eps);
}

moe_tensor *moe_layernorm(moe_tensor *x, moe_tensor *w, moe_tensor *b, double eps) {
    return norm_forward("layernorm", MOE_OP_LAYERNORM, MOE_K_LAYERNORM, x, (moe_tensor *[]){w, b}, 2, eps);
}

moe_tensor *moe_add_rmsnorm(moe_tensor *x, moe_tensor *r, moe_tensor *w, double eps, moe_tensor **sum) {
    *sum = NULL;
    OP_NEED(x, r, w);
    const char *op = "add_rmsnorm";
    moe_tensor *all[3] = {x, r, w};
    if (!op_check_same(op, 3, all, true) || !check_rows(op, x)) return NULL;
    int64_t d = x->shape[x->ndim - 1];
    if (!moe_check(moe_tensor_same_shape(x, r) && w->ndim == 1 && w->shape[0] == d, op,
                   "expects x and r of one shape and w [d], got x %s, r %s, w %s", D(x), D(r), D(w)))
        return NULL;
    bool grads = moe_grad_enabled() && (x->requires_grad || r->requires_grad || w->requires_grad);
    if (!moe_check(!grads, op, "inference only: its inputs need grads")) return NULL;
    moe_tensor *xc = op_contiguous_nograd(x), *rc = op_contiguous_nograd(r), *wc = op_contiguous_nograd(w);
    moe_tensor *o = op_new(x, x->dtype, x->ndim, x->shape), *s = op_new(x, x->dtype, x->ndim, x->shape);
    if (!xc || !rc || !wc || !o || !s) return NULL;
    moe_norm_attrs at = {eps};
    OP_RUN(MOE_K_ADD_RMSNORM, .out = o, .out2 = s, .in = {xc, rc, wc}, .attrs = &at);
    *sum = s;
    return o;
}

moe_tensor *moe_matmul_add_rmsnorm(moe_tensor *x, moe_tensor *a, moe_tensor *b, moe_tensor *w, double eps,
                                   moe_tensor **sum) {
    *sum = NULL;
    OP_NEED(x, a, b, w);
    const char *op = "matmul_add_rmsnorm";
    moe_tensor *all[4] = {x, a, b, w};
    if (!op_check_same(op, 4, all, true) || !check_rows(op, x)) return NULL;
    int64_t d = x->shape[x->ndim - 1], K = a->shape[a->ndim - 1];
    bool lead = a->ndim == x->ndim;
    for (int i = 0; lead && i < x->ndim - 1; i++) lead = a->shape[i] == x->shape[i];
    if (!moe_check(lead && b->ndim == 2 && b->shape[0] == K && b->shape[1] == d && w->ndim == 1 && w->shape[0] == d, op,
                   "expects x [..., d], a [..., K] of x's leading shape, b [K, d] and w [d], got x %s, a %s, b %s, w %s",
                   D(x), D(a), D(b), D(w)))
        return NULL;
    bool grads = moe_grad_enabled() && (x->requires_grad || a->requires_grad || b->requires_grad || w->requires_grad);
    if (!moe_check(!grads, op, "inference only: its inputs need grads")) return NULL;
    moe_tensor *xc = op_contiguous_nograd(x), *ac = op_contiguous_nograd(a), *bc = op_contiguous_nograd(b),
               *wc = op_contiguous_nograd(w);
    moe_tensor *o = op_new(x, x->dtype, x->ndim, x->shape), *s = op_new(x, x->dtype, x->ndim, x->shape);
    if (!xc || !ac || !bc || !wc || !o || !s) return NULL;
    moe_norm_attrs at = {eps};
    OP_RUN(MOE_K_MATMUL_ADD_RMSNORM, .out = o, .out2 = s, .in = {xc, ac, bc, wc}, .attrs = &at);
    *sum = s;
    return o;
}

void moe_backward_rmsnorm(moe_node *n) { norm_backward(n, MOE_K_RMSNORM_BWD, 1); }
void moe_backward_layernorm(moe_node *n) { norm_backward(n, MOE_K_LAYERNORM_BWD, 2); }
