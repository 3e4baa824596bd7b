/* Index ops: embedding lookup, row select / row add / in-place row copy, last-axis gather / scatter-add,
 * top-k, and the integer routing helpers argsort, bincount, cumsum and the routing plan
 * (route_plan: the routing sorted by expert where it was made).
 *
 * Index tensors are I32. Kernels take contiguous operands (core/cpu/index_cpu.c), so the
 * front-ends copy strided inputs first; the accumulating ops are out of place (a copy of
 * x receives the in-place INDEX_ADD / SCATTER_ADD kernel). */
#include <string.h>

#include "core/op_internal.h"

static bool check_index_dtype(const char *op, const char *what, const moe_tensor *idx) {
    return moe_check(idx->dtype == MOE_I32, op, "%s must be i32, got %s", what, D(idx));
}

/* True when a and b have the same dims except the last (same ndim). */
static bool same_leading(const moe_tensor *a, const moe_tensor *b) {
    if (a->ndim != b->ndim) return false;
    for (int d = 0; d < a->ndim - 1; d++)
        if (a->shape[d] != b->shape[d]) return false;
    return true;
}

/* Runs an in-place accumulating kernel (INDEX_ADD or SCATTER_ADD) on acc with src and idx
 * made contiguous. */
static moe_status accumulate_raw(moe_kernel_id k, moe_tensor *acc, const moe_tensor *idx, const moe_tensor *src) {
    const moe_tensor *ic = op_contiguous_nograd(idx), *sc = ic ? op_contiguous_nograd(src) : NULL;
    if (!sc) return moe_last_status();
    moe_kernel_args args = {.out = acc, .in = {sc, ic}};
    return moe_kernel_run(k, &args);
}

/* A zero tensor shaped like x that then receives src through kernel k (the backward of the
 * selecting ops); NULL on failure. */
static moe_tensor *zeros_accumulate(moe_kernel_id k, const moe_tensor *x, const moe_tensor *idx, const moe_tensor *src) {
    moe_tensor *z = moe_tensor_zeros(MOE_LIFE_STEP, x->device, x->dtype, x->ndim, x->shape);
    return z && accumulate_raw(k, z, idx, src) == MOE_OK ? z : NULL;
}

/* A contiguous copy of x (not recorded) that receives src through kernel k. */
static moe_tensor *copy_accumulate(moe_kernel_id k, moe_tensor *x, const moe_tensor *idx, const moe_tensor *src) {
    moe_tensor *o = op_new(x, x->dtype, x->ndim, x->shape);
    if (!o) return NULL;
    OP_RUN(MOE_K_COPY, .out = o, .in = {x});
    return accumulate_raw(k, o, idx, src) == MOE_OK ? o : NULL;
}

/* ---- embedding: table [V, d], ids [...] -> [..., d] ---- */
moe_tensor *moe_embedding(moe_tensor *table, moe_tensor *ids) {
    OP_NEED(table, ids);
    moe_tensor *ti[2] = {table, ids};
    if (!op_check_same("embedding", 2, ti, false)) return NULL;
    if (!moe_check(table->ndim == 2, "embedding", "table must be [V, d], got %s", D(table))) return NULL;
    if (!check_index_dtype("embedding", "ids", ids)) return NULL;
    if (!moe_check(ids->ndim < MOE_MAX_DIMS, "embedding", "ids %s have too many dims", D(ids))) return NULL;
    int64_t s[MOE_MAX_DIMS];
    memcpy(s, ids->shape, sizeof(int64_t) * (size_t)ids->ndim);
    s[ids->ndim] = table->shape[1];
    moe_tensor *o = op_new(table, table->dtype, ids->ndim + 1, s);
    const moe_tensor *tc = o ? op_contiguous_nograd(table) : NULL, *ic = tc ? op_contiguous_nograd(ids) : NULL;
    if (!ic) return NULL;
    moe_kernel_args args = {.out = o, .in = {tc, ic}};
    if (moe_kernel_run(MOE_K_INDEX_SELECT, &args) != MOE_OK) {
        moe_error_context(moe_last_status(), "embedding (table %s, ids %s)", D(table), D(ids));
        return NULL;
    }
    moe_autograd_record(MOE_OP_EMBEDDING, o, 2, ti, NULL, 0);
    return o;
}

void moe_backward_embedding(moe_node *n) {
    moe_tensor *table = n->in[0];
    if (table->requires_grad) moe_grad_give(table, zeros_accumulate(MOE_K_INDEX_ADD, table, n->in[1], n->out->grad));
}

/* ---- index_select: rows of x [N, ...] at idx [M] -> [M, ...] ---- */
moe_tensor *moe_index_select(moe_tensor *x, moe_tensor *idx) {
    OP_NEED(x, idx);
    moe_tensor *xi[2] = {x, idx};
    if (!op_check_same("index_select", 2, xi, false)) return NULL;
    if (!check_index_dtype("index_select", "idx", idx)) return NULL;
    if (!moe_check(x->ndim >= 1 && idx->ndim == 1, "index_select", "expects x [N, ...] and idx [M], got %s and %s",
                   D(x), D(idx)))
        return NULL;
    int64_t s[MOE_MAX_DIMS];
    memcpy(s, x->shape, sizeof s);
    s[0] = idx->shape[0];
    moe_tensor *o = op_new(x, x->dtype, x->ndim, s);
    const moe_tensor *xc = o ? op_contiguous_nograd(x) : NULL, *ic = xc ? op_contiguous_nograd(idx) : NULL;
    if (!ic) return NULL;
    OP_RUN(MOE_K_INDEX_SELECT, .out = o, .in = {xc, ic});
    moe_autograd_record(MOE_OP_INDEX_SELECT, o, 2, xi, NULL, 0);
    return o;
}

void moe_backward_index_select(moe_node *n) {
    moe_tensor *x = n->in[0];
    if (x->requires_grad) moe_grad_give(x, zeros_accumulate(MOE_K_INDEX_ADD, x, n->in[1], n->out->grad));
}

/* ---- index_add: x [N, ...] + rows of src [M, ...] added at idx [M] ---- */
moe_tensor *moe_index_add(moe_tensor *x, moe_tensor *idx, moe_tensor *src) {
    OP_NEED(x, idx, src);
    moe_tensor *xs[2] = {x, src}, *in[3] = {x, idx, src};
    if (!op_check_same("index_add", 2, xs, true) || !op_check_same("index_add", 3, in, false)) return NULL;
    if (!moe_check(moe_dtype_is_float(x->dtype), "index_add", "needs float tensors, got %s", D(x))) return NULL;
    if (!check_index_dtype("index_add", "idx", idx)) return NULL;
    bool ok = x->ndim >= 1 && idx->ndim == 1 && src->ndim == x->ndim && src->shape[0] == idx->shape[0];
    for (int d = 1; ok && d < x->ndim; d++) ok = src->shape[d] == x->shape[d];
    if (!moe_check(ok, "index_add", "expects x [N, ...], idx [M], src [M, ...] with x's row shape, got %s, %s, %s",
                   D(x), D(idx), D(src)))
        return NULL;
    moe_tensor *o = copy_accumulate(MOE_K_INDEX_ADD, x, idx, src);
    if (!o) return NULL;
    moe_autograd_record(MOE_OP_INDEX_ADD, o, 3, in, NULL, 0);
    return o;
}

void moe_backward_index_add(moe_node *n) {
    moe_tensor *g = n->out->grad;
    if (n->in[2]->requires_grad) moe_grad_give(n->in[2], moe_index_select(g, n->in[1]));
    moe_grad_give(n->in[0], g); /* g itself: its one other use was just above */
}

/* ---- index_copy_: dst[idx[i]] = src[i], in place, not recorded ---- */

/* A host idx [N] names distinct rows of [0, m): MOE_ERR_INVALID naming the first fault. */
static moe_status index_copy_check_host(const moe_tensor *idx, int64_t m) {
    const int32_t *pi = (const int32_t *)idx->data;
    unsigned char *seen = moe_step_host_alloc((size_t)m + 1);
    if (!seen) return moe_last_status();
    for (int64_t i = 0; i < idx->shape[0]; i++) {
        if (pi[i] < 0 || pi[i] >= m)
            return moe_error(MOE_ERR_INVALID, "index_copy_: index %d at position %lld is out of range [0, %lld)",
                             (int)pi[i], (long long)i, (long long)m);
        if (seen[pi[i]]++)
            return moe_error(MOE_ERR_INVALID, "index_copy_: row %d is named twice (again at position %lld)",
                             (int)pi[i], (long long)i);
    }
    return MOE_OK;
}

moe_status moe_index_copy_(moe_tensor *dst, moe_tensor *idx, moe_tensor *src) {
    if (!dst || !idx || !src) return moe_last_status() != MOE_OK ? moe_last_status()
                                                                 : moe_error(MOE_ERR_INVALID, "index_copy_: a NULL operand");
    bool ok = dst->ndim >= 1 && idx->ndim == 1 && idx->dtype == MOE_I32 && src->ndim == dst->ndim &&
              src->shape[0] == idx->shape[0] && src->dtype == dst->dtype && src->device == dst->device &&
              (idx->device == dst->device || idx->device == MOE_CPU) && moe_tensor_is_contiguous(dst);
    for (int d = 1; ok && d < dst->ndim; d++) ok = src->shape[d] == dst->shape[d];
    if (!moe_check(ok, "index_copy_",
                   "expects dst [M, ...] contiguous, idx [N] i32 (on the CPU or dst's device), src [N, ...] with "
                   "dst's row shape, dtype and device; got %s, %s, %s",
                   D(dst), D(idx), D(src)))
        return MOE_ERR_INVALID;
    const moe_tensor *ic = op_contiguous_nograd(idx);
    if (!ic) return moe_last_status();
    if (ic->device == MOE_CPU) {
        MOE_TRY(index_copy_check_host(ic, dst->shape[0]));
        if (dst->device != MOE_CPU && !(ic = moe_tensor_to(ic, dst->device, MOE_LIFE_STEP))) return moe_last_status();
    }
    /* a matrix whose rows are at a uniform stride (a slice of columns) is read in place */
    const moe_tensor *sc = src->ndim == 2 && moe_tensor_row_stride(src) ? src : op_contiguous_nograd(src);
    if (!sc) return moe_last_status();
    moe_kernel_args args = {.out = dst, .in = {sc, ic}};
    return moe_kernel_run(MOE_K_INDEX_COPY, &args);
}

/* ---- dispatch: the rows of x by assignment; the backward sums them back through src ---- */
moe_tensor *moe_dispatch(moe_tensor *x, moe_tensor *tok, moe_tensor *src) {
    OP_NEED(x, tok, src);
    moe_tensor *in[3] = {x, tok, src};
    if (!op_check_same("dispatch", 3, in, false)) return NULL;
    if (!check_index_dtype("dispatch", "tok", tok) || !check_index_dtype("dispatch", "src", src)) return NULL;
    if (!moe_check(x->ndim == 2 && tok->ndim == 1 && src->ndim == 2 && src->shape[0] == x->shape[0], "dispatch",
                   "expects x [T, d], tok [N], src [T, k], got %s, %s, %s", D(x), D(tok), D(src)))
        return NULL;
    moe_tensor *o = op_new(x, x->dtype, 2, (int64_t[]){tok->shape[0], x->shape[1]});
    const moe_tensor *xc = o ? op_contiguous_nograd(x) : NULL, *ic = xc ? op_contiguous_nograd(tok) : NULL;
    if (!ic) return NULL;
    OP_RUN(MOE_K_INDEX_SELECT, .out = o, .in = {xc, ic});
    moe_autograd_record(MOE_OP_DISPATCH, o, 3, in, NULL, 0);
    return o;
}

void moe_backward_dispatch(moe_node *n) {
    moe_tensor *x = n->in[0], *src = n->in[2];
    if (!x->requires_grad) return;
    moe_tensor *gx = op_new(x, x->dtype, 2, x->shape);
    const moe_tensor *g = gx ? op_contiguous_nograd(n->out->grad) : NULL;
    const moe_tensor *sc = g ? op_contiguous_nograd(src) : NULL;
    if (sc) BWD_RUN(MOE_K_COMBINE, .out = gx, .in = {g, NULL, sc});
    moe_grad_give(x, sc ? gx : NULL);
}

/* ---- combine: the weighted sum of each token's expert rows ---- */
moe_tensor *moe_combine(moe_tensor *y, moe_tensor *w, moe_tensor *src) {
    OP_NEED(y, w, src);
    moe_tensor *yw[2] = {y, w}, *in[3] = {y, w, src};
    if (!op_check_same("combine", 2, yw, true) || !op_check_same("combine", 3, in, false)) return NULL;
    if (!moe_check(moe_dtype_is_float(y->dtype), "combine", "needs float tensors, got %s", D(y))) return NULL;
    if (!check_index_dtype("combine", "src", src)) return NULL;
    if (!moe_check(y->ndim == 2 && w->ndim == 2 && moe_tensor_same_shape(w, src), "combine",
                   "expects y [N, d], w [T, k], src [T, k], got %s, %s, %s", D(y), D(w), D(src)))
        return NULL;
    moe_tensor *o = op_new(y, y->dtype, 2, (int64_t[]){w->shape[0], y->shape[1]});
    const moe_tensor *yc = o ? op_contiguous_nograd(y) : NULL, *wc = yc ? op_contiguous_nograd(w) : NULL;
    const moe_tensor *sc = wc ? op_contiguous_nograd(src) : NULL;
    if (!sc) return NULL;
    OP_RUN(MOE_K_COMBINE, .out = o, .in = {yc, wc, sc});
    moe_autograd_record(MOE_OP_COMBINE, o, 3, in, NULL, 0);
    return o;
}

void moe_backward_combine(moe_node *n) {
    moe_tensor *y = n->in[0], *w = n->in[1], *src = n->in[2];
    moe_tensor *gy = op_new(y, y->dtype, 2, y->shape), *gw = op_new(w, w->dtype, 2, w->shape);
    const moe_tensor *g = gy && gw ? op_contiguous_nograd(n->out->grad) : NULL;
    const moe_tensor *yc = g ? op_contiguous_nograd(y) : NULL, *wc = yc ? op_contiguous_nograd(w) : NULL;
    const moe_tensor *sc = wc ? op_contiguous_nograd(src) : NULL;
    if (sc) BWD_RUN(MOE_K_COMBINE_BWD, .out = gy, .out2 = gw, .in = {g, yc, wc, sc});
    if (y->requires_grad) moe_grad_give(y, sc ? gy : NULL);
    if (w->requires_grad) moe_grad_give(w, sc ? gw : NULL);
}

/* ---- gather along the last axis: x [..., n], idx [..., k] -> [..., k] ---- */
moe_tensor *moe_gather(moe_tensor *x, moe_tensor *idx) {
    OP_NEED(x, idx);
    moe_tensor *xi[2] = {x, idx};
    if (!op_check_same("gather", 2, xi, false)) return NULL;
    if (!check_index_dtype("gather", "idx", idx)) return NULL;
    if (!moe_check(x->ndim >= 1 && same_leading(x, idx), "gather",
                   "x [..., n] and idx [..., k] must share the leading dims, got %s and %s", D(x), D(idx)))
        return NULL;
    moe_tensor *o = op_new(x, x->dtype, idx->ndim, idx->shape);
    const moe_tensor *xc = o ? op_contiguous_nograd(x) : NULL, *ic = xc ? op_contiguous_nograd(idx) : NULL;
    if (!ic) return NULL;
    OP_RUN(MOE_K_GATHER, .out = o, .in = {xc, ic});
    moe_autograd_record(MOE_OP_GATHER, o, 2, xi, NULL, 0);
    return o;
}

void moe_backward_gather(moe_node *n) {
    moe_tensor *x = n->in[0];
    if (x->requires_grad) moe_grad_give(x, zeros_accumulate(MOE_K_SCATTER_ADD, x, n->in[1], n->out->grad));
}

/* ---- scatter_add along the last axis: x [..., n] + src [..., k] added at idx [..., k] ---- */
moe_tensor *moe_scatter_add(moe_tensor *x, moe_tensor *idx, moe_tensor *src) {
    OP_NEED(x, idx, src);
    moe_tensor *xs[2] = {x, src}, *in[3] = {x, idx, src};
    if (!op_check_same("scatter_add", 2, xs, true) || !op_check_same("scatter_add", 3, in, false)) return NULL;
    if (!moe_check(moe_dtype_is_float(x->dtype), "scatter_add", "needs float tensors, got %s", D(x))) return NULL;
    if (!check_index_dtype("scatter_add", "idx", idx)) return NULL;
    if (!moe_check(x->ndim >= 1 && same_leading(x, idx) && moe_tensor_same_shape(idx, src), "scatter_add",
                   "expects x [..., n], idx [..., k], src [..., k], got %s, %s, %s", D(x), D(idx), D(src)))
        return NULL;
    moe_tensor *o = copy_accumulate(MOE_K_SCATTER_ADD, x, idx, src);
    if (!o) return NULL;
    moe_autograd_record(MOE_OP_SCATTER_ADD, o, 3, in, NULL, 0);
    return o;
}

void moe_backward_scatter_add(moe_node *n) {
    moe_tensor *g = n->out->grad;
    if (n->in[2]->requires_grad) moe_grad_give(n->in[2], moe_gather(g, n->in[1]));
    moe_grad_give(n->in[0], g);
}

/* ---- top-k along the last axis ---- */
moe_tensor *moe_topk(moe_tensor *x, int k, moe_tensor **indices) {
    OP_NEED(x);
    if (!moe_check(moe_dtype_is_float(x->dtype) && x->ndim >= 1, "topk", "needs a float tensor [..., n], got %s", D(x)))
        return NULL;
    int64_t n = x->shape[x->ndim - 1];
    if (!moe_check(k >= 1 && k <= n && n <= INT32_MAX, "topk", "k = %d out of range [1, %lld] for %s", k,
                   (long long)n, D(x)))
        return NULL;
    int64_t s[MOE_MAX_DIMS];
    memcpy(s, x->shape, sizeof s);
    s[x->ndim - 1] = k;
    moe_tensor *v = op_new(x, x->dtype, x->ndim, s), *ids = v ? op_new(x, MOE_I32, x->ndim, s) : NULL;
    const moe_tensor *xc = ids ? op_contiguous_nograd(x) : NULL;
    if (!xc) return NULL;
    moe_topk_attrs at = {k};
    OP_RUN(MOE_K_TOPK, .out = v, .out2 = ids, .in = {xc}, .attrs = &at);
    moe_node *node = moe_autograd_record(MOE_OP_TOPK, v, 1, &x, &at, sizeof at);
    if (node) node->saved[0] = ids;
    if (indices) *indices = ids;
    return v;
}

/* route_topk's and route_select's checks on a selection among E experts for `what` (the
 * logits or x, whose dtype the gates take), then the gates and ids made; the bias as f32
 * (f64 for f64) and contiguous into *bc. */
static bool route_prepare(const char *fn, const moe_tensor *what, int64_t E, moe_tensor *bias,
                          const moe_route_spec *spec, moe_tensor **bc, moe_tensor **gates, moe_tensor **idx) {
    if (!moe_check(spec->k >= 1 && spec->k <= E, fn, "k = %d out of range [1, %lld]", spec->k, (long long)E))
        return false;
    if (bias) {
        moe_tensor *lb[2] = {(moe_tensor *)what, bias};
        if (!op_check_same(fn, 2, lb, false)) return false;
        if (!moe_check(bias->ndim == 1 && bias->shape[0] == E, fn, "bias must be [%lld], got %s", (long long)E, D(bias)))
            return false;
    }
    if (!moe_check(!(moe_grad_enabled() && what->requires_grad), fn,
                   "inference only: the input needs grads (training selects with topk)"))
        return false;
    *bc = bias ? moe_contiguous(moe_cast(bias, what->dtype == MOE_F64 ? MOE_F64 : MOE_F32)) : NULL;
    *gates = op_new(what, what->dtype, 2, (int64_t[]){what->shape[0], spec->k});
    *idx = op_new(what, MOE_I32, 2, (int64_t[]){what->shape[0], spec->k});
    return (!bias || *bc) && *gates && *idx;
}

moe_tensor *moe_route_topk(moe_tensor *logits, moe_tensor *bias, const moe_route_spec *spec, moe_tensor **ids) {
    *ids = NULL;
    OP_NEED(logits);
    if (!moe_check(moe_dtype_is_float(logits->dtype) && logits->ndim == 2, "route_topk",
                   "needs float logits [T, E], got %s", D(logits)))
        return NULL;
    moe_tensor *bc, *gates, *idx;
    if (!route_prepare("route_topk", logits, logits->shape[1], bias, spec, &bc, &gates, &idx)) return NULL;
    const moe_tensor *lc = op_contiguous_nograd(logits);
    if (!lc) return NULL;
    OP_RUN(MOE_K_ROUTE_TOPK, .out = gates, .out2 = idx, .in = {lc, bc}, .attrs = spec);
    *ids = idx;
    return gates;
}

moe_tensor *moe_route_select(moe_tensor *x, moe_tensor *w, moe_tensor *bias, const moe_route_spec *spec,
                             moe_tensor **ids) {
    *ids = NULL;
    OP_NEED(x);
    OP_NEED(w);
    if (!moe_check(moe_dtype_is_float(x->dtype) && x->ndim == 2 && w->ndim == 2 && w->shape[0] == x->shape[1],
                   "route_select", "needs x [T, d] and w [d, E], got %s and %s", D(x), D(w)))
        return NULL;
    moe_tensor *xw[2] = {x, w}, *bc, *gates, *idx;
    if (!op_check_same("route_select", 2, xw, true) ||
        !moe_check(!(moe_grad_enabled() && w->requires_grad), "route_select",
                   "inference only: the projection needs grads (training selects with topk)") ||
        !route_prepare("route_select", x, w->shape[1], bias, spec, &bc, &gates, &idx))
        return NULL;
    const moe_tensor *xc = op_contiguous_nograd(x), *wc = op_contiguous_nograd(w);
    if (!xc || !wc) return NULL;
    OP_RUN(MOE_K_ROUTE_SELECT, .out = gates, .out2 = idx, .in = {xc, wc, bc}, .attrs = spec);
    *ids = idx;
    return gates;
}

moe_tensor *moe_route_plan(moe_tensor *ids, int64_t n_experts, moe_tensor **src, moe_tensor **offsets) {
    *src = *offsets = NULL;
    OP_NEED(ids);
    if (!moe_check(ids->ndim == 2 && ids->dtype == MOE_I32, "route_plan", "needs ids [T, k] i32, got %s", D(ids)))
        return NULL;
    int64_t n = moe_tensor_numel(ids), len = n + n_experts + 1;
    if (!moe_check(n_experts >= 1 && len <= INT32_MAX, "route_plan",
                   "%lld experts for ids %s: out of range (at least 1, and T k + E + 1 positions within int32)",
                   (long long)n_experts, D(ids)))
        return NULL;
    moe_tensor *plan = op_new(ids, MOE_I32, 1, &len), *s = plan ? op_new(ids, MOE_I32, 2, ids->shape) : NULL;
    const moe_tensor *ic = s ? op_contiguous_nograd(ids) : NULL;
    if (!ic) return NULL;
    moe_int_attrs at = {.nbins = n_experts};
    OP_RUN(MOE_K_ROUTE_PLAN, .out = plan, .out2 = s, .in = {ic}, .attrs = &at);
    moe_tensor *tok = moe_slice(plan, 0, 0, n);
    *offsets = tok ? moe_slice(plan, 0, n, len) : NULL;
    if (!*offsets) return NULL;
    *src = s;
    return tok;
}

/* The grad of the values goes to the selected positions (scatter into zeros). */
void moe_backward_topk(moe_node *n) {
    moe_grad_give(n->in[0], zeros_accumulate(MOE_K_SCATTER_ADD, n->in[0], n->saved[0], n->out->grad));
}

/* ---- integer routing helpers (not differentiable, not recorded) ---- */
moe_tensor *moe_argsort(moe_tensor *x) {
    OP_NEED(x);
    if (!moe_check(x->ndim >= 1 && (x->dtype == MOE_I32 || moe_dtype_is_float(x->dtype)), "argsort",
                   "needs an i32 or float tensor [..., n], got %s", D(x)))
        return NULL;
    if (!moe_check(x->shape[x->ndim - 1] <= INT32_MAX, "argsort", "last axis of %s too long for i32 positions", D(x)))
        return NULL;
    moe_tensor *o = op_new(x, MOE_I32, x->ndim, x->shape);
    const moe_tensor *xc = o ? op_contiguous_nograd(x) : NULL;
    if (!xc) return NULL;
    OP_RUN(MOE_K_ARGSORT, .out = o, .in = {xc});
    return o;
}

moe_tensor *moe_bincount(moe_tensor *x, int64_t nbins) {
    OP_NEED(x);
    if (!moe_check(x->ndim == 1 && x->dtype == MOE_I32, "bincount", "needs a 1-D i32 tensor, got %s", D(x)))
        return NULL;
    if (!moe_check(nbins >= 0 && nbins <= INT32_MAX, "bincount", "nbins = %lld out of range", (long long)nbins))
        return NULL;
    moe_tensor *o = op_new(x, MOE_I32, 1, &nbins);
    const moe_tensor *xc = o ? op_contiguous_nograd(x) : NULL;
    if (!xc) return NULL;
    moe_int_attrs at = {.nbins = nbins};
    OP_RUN(MOE_K_BINCOUNT, .out = o, .in = {xc}, .attrs = &at);
    return o;
}

moe_tensor *moe_cumsum(moe_tensor *x, bool exclusive) {
    OP_NEED(x);
    if (!moe_check(x->ndim == 1 && x->dtype == MOE_I32, "cumsum", "needs a 1-D i32 tensor, got %s", D(x)))
        return NULL;
    moe_tensor *o = op_new(x, MOE_I32, 1, x->shape);
    const moe_tensor *xc = o ? op_contiguous_nograd(x) : NULL;
    if (!xc) return NULL;
    moe_int_attrs at = {.exclusive = exclusive};
    OP_RUN(MOE_K_CUMSUM, .out = o, .in = {xc}, .attrs = &at);
    return o;
}
