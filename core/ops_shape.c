/* Shape ops: reshape, transpose, permute, slice (views), contiguous, concat, split, cast. */
#include <string.h>

#include "core/op_internal.h"

bool op_check_same(const char *op, int n, moe_tensor *const *ts, bool same_dtype) {
    for (int i = 1; i < n; i++) {
        if (ts[i]->device != ts[0]->device)
            return moe_check(false, op, "inputs on different devices: %s and %s", D(ts[0]), D(ts[i]));
        if (same_dtype && ts[i]->dtype != ts[0]->dtype)
            return moe_check(false, op, "dtype mismatch: %s and %s", D(ts[0]), D(ts[i]));
    }
    return true;
}

moe_tensor *op_contiguous_nograd(const moe_tensor *x) {
    if (moe_tensor_is_contiguous(x)) return (moe_tensor *)x;
    moe_tensor *o = op_new(x, x->dtype, x->ndim, x->shape);
    if (!o) return NULL;
    OP_RUN(MOE_K_COPY, .out = o, .in = {x});
    return o;
}

/* Views record a node whose backward maps the grad back through the inverse view. */
static moe_tensor *view_of(moe_tensor *x, int op, int ndim, const int64_t *shape, const int64_t *strides,
                           int64_t offset, const void *attrs, size_t attr_size) {
    moe_tensor *v = moe_tensor_view_raw(x, ndim, shape, strides, offset);
    if (!v) return NULL;
    moe_autograd_record(op, v, 1, &x, attrs, attr_size);
    return v;
}

/* ---- reshape ---- */
moe_tensor *moe_reshape(moe_tensor *x, int ndim, const int64_t *shape) {
    OP_NEED(x);
    int64_t s[MOE_MAX_DIMS], known = 1, n = moe_tensor_numel(x);
    int infer = -1;
    if (!moe_check(ndim >= 0 && ndim <= MOE_MAX_DIMS, "reshape", "ndim %d out of range", ndim)) return NULL;
    for (int i = 0; i < ndim; i++) {
        s[i] = shape[i];
        if (shape[i] == -1) {
            if (!moe_check(infer < 0, "reshape", "more than one -1 in the new shape")) return NULL;
            infer = i;
        } else {
            known *= shape[i];
        }
    }
    if (infer >= 0) s[infer] = known ? n / known : 0;
    int64_t total = 1;
    for (int i = 0; i < ndim; i++) total *= s[i];
    if (!moe_check(total == n, "reshape", "cannot reshape %s into %d dims with %lld elements", D(x), ndim,
                   (long long)total))
        return NULL;
    int64_t st[MOE_MAX_DIMS];
    if (moe_view_strides(x, ndim, s, st)) return view_of(x, MOE_OP_RESHAPE, ndim, s, st, 0, NULL, 0);
    moe_tensor *src = moe_contiguous(x);
    if (!src) return NULL;
    moe_strides_contiguous(ndim, s, st);
    return view_of(src, MOE_OP_RESHAPE, ndim, s, st, 0, NULL, 0);
}

void moe_backward_reshape(moe_node *n) {
    moe_tensor *x = n->in[0], *g = n->out->grad;
    moe_grad_give(x, moe_reshape(g, x->ndim, x->shape));
}

/* ---- permute / transpose ---- */
typedef struct { int perm[MOE_MAX_DIMS]; } perm_attrs;

moe_tensor *moe_permute(moe_tensor *x, const int *perm) {
    OP_NEED(x);
    int seen = 0;
    for (int i = 0; i < x->ndim; i++) {
        if (!moe_check(perm[i] >= 0 && perm[i] < x->ndim && !(seen & (1 << perm[i])), "permute",
                       "bad permutation of %s", D(x)))
            return NULL;
        seen |= 1 << perm[i];
    }
    int64_t s[MOE_MAX_DIMS], st[MOE_MAX_DIMS];
    perm_attrs at = {{0}};
    for (int i = 0; i < x->ndim; i++) {
        s[i] = x->shape[perm[i]];
        st[i] = x->strides[perm[i]];
        at.perm[i] = perm[i];
    }
    return view_of(x, MOE_OP_PERMUTE, x->ndim, s, st, 0, &at, sizeof at);
}

void moe_backward_permute(moe_node *n) {
    const perm_attrs *at = (const perm_attrs *)n->attrs;
    int inv[MOE_MAX_DIMS];
    for (int i = 0; i < n->in[0]->ndim; i++) inv[at->perm[i]] = i;
    moe_grad_give(n->in[0], moe_permute(n->out->grad, inv));
}

moe_tensor *moe_transpose(moe_tensor *x, int d0, int d1) {
    OP_NEED(x);
    if (d0 < 0) d0 += x->ndim;
    if (d1 < 0) d1 += x->ndim;
    if (!moe_check(d0 >= 0 && d0 < x->ndim && d1 >= 0 && d1 < x->ndim, "transpose", "dims %d, %d out of range for %s",
                   d0, d1, D(x)))
        return NULL;
    int64_t s[MOE_MAX_DIMS], st[MOE_MAX_DIMS];
    memcpy(s, x->shape, sizeof s);
    memcpy(st, x->strides, sizeof st);
    s[d0] = x->shape[d1];
    s[d1] = x->shape[d0];
    st[d0] = x->strides[d1];
    st[d1] = x->strides[d0];
    int at[2] = {d0, d1};
    return view_of(x, MOE_OP_TRANSPOSE, x->ndim, s, st, 0, at, sizeof at);
}

void moe_backward_transpose(moe_node *n) {
    const int *at = (const int *)n->attrs;
    moe_grad_give(n->in[0], moe_transpose(n->out->grad, at[0], at[1]));
}

/* ---- slice ---- */
typedef struct { int axis; int64_t start; } slice_attrs;

moe_tensor *moe_slice(moe_tensor *x, int axis, int64_t start, int64_t end) {
    OP_NEED(x);
    if (axis < 0) axis += x->ndim;
    if (!moe_check(axis >= 0 && axis < x->ndim && start >= 0 && start <= end && end <= x->shape[axis], "slice",
                   "range [%lld, %lld) on axis %d out of bounds for %s", (long long)start, (long long)end, axis, D(x)))
        return NULL;
    int64_t s[MOE_MAX_DIMS];
    memcpy(s, x->shape, sizeof s);
    s[axis] = end - start;
    slice_attrs at = {axis, start};
    return view_of(x, MOE_OP_SLICE, x->ndim, s, x->strides, start * x->strides[axis], &at, sizeof at);
}

void moe_backward_slice(moe_node *n) {
    const slice_attrs *at = (const slice_attrs *)n->attrs;
    moe_tensor *x = n->in[0], *g = n->out->grad;
    if (!x->requires_grad) return;
    /* Add straight into the matching part of x's grad: the pieces of a split (q, k, v of a
     * fused projection) then cost one zeroed buffer, not one each. */
    moe_tensor *buf = moe_grad_buffer(x);
    moe_tensor *part = buf ? moe_tensor_view_raw(buf, g->ndim, g->shape, buf->strides, at->start * buf->strides[at->axis]) : NULL;
    if (part && g->dtype != buf->dtype) {
        moe_tensor *gc = op_new(g, buf->dtype, g->ndim, g->shape);
        g = (gc && moe_tensor_copy_(gc, g) == MOE_OK) ? gc : NULL;
    }
    moe_op_attrs_scalar add = {.op = MOE_BIN_ADD};
    moe_kernel_args args = {.out = part, .in = {part, g}, .attrs = &add};
    if (!part || !g || moe_kernel_run(MOE_K_BINARY, &args) != MOE_OK) moe_grad_give(x, NULL);
}

moe_status moe_split(moe_tensor *x, int axis, int n, const int64_t *sizes, moe_tensor **out) {
    if (!x) return moe_last_status();
    if (axis < 0) axis += x->ndim;
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += sizes[i];
    if (!moe_check(axis >= 0 && axis < x->ndim && total == x->shape[axis], "split",
                   "sizes add up to %lld, axis %d of %s", (long long)total, axis, D(x)))
        return MOE_ERR_INVALID;
    int64_t at = 0;
    for (int i = 0; i < n; i++) {
        out[i] = moe_slice(x, axis, at, at + sizes[i]);
        if (!out[i]) return moe_last_status();
        at += sizes[i];
    }
    return MOE_OK;
}

/* ---- contiguous ---- */
moe_tensor *moe_contiguous(moe_tensor *x) {
    OP_NEED(x);
    if (moe_tensor_is_contiguous(x)) return x;
    moe_tensor *o = op_new(x, x->dtype, x->ndim, x->shape);
    if (!o) return NULL;
    OP_RUN(MOE_K_COPY, .out = o, .in = {x});
    moe_autograd_record(MOE_OP_CONTIGUOUS, o, 1, &x, NULL, 0);
    return o;
}

void moe_backward_contiguous(moe_node *n) { moe_grad_give(n->in[0], n->out->grad); }

/* ---- cast ---- */
moe_tensor *moe_cast(moe_tensor *x, moe_dtype dt) {
    OP_NEED(x);
    if (x->dtype == dt) return x;
    moe_tensor *o = op_new(x, dt, x->ndim, x->shape);
    if (!o) return NULL;
    OP_RUN(MOE_K_COPY, .out = o, .in = {x});
    if (moe_dtype_is_float(dt) && moe_dtype_is_float(x->dtype)) moe_autograd_record(MOE_OP_CAST, o, 1, &x, NULL, 0);
    return o;
}

void moe_backward_cast(moe_node *n) {
    moe_tensor *x = n->in[0], *g = n->out->grad;
    moe_tensor *gx = op_new(x, x->dtype, x->ndim, x->shape);
    if (gx && moe_tensor_copy_(gx, g) != MOE_OK) gx = NULL;
    moe_grad_give(x, gx);
}

/* ---- concat ---- */
typedef struct { int axis; } concat_attrs;

moe_tensor *moe_concat(moe_tensor *const *xs, int n, int axis) {
    if (!moe_check(n >= 1 && n <= MOE_NODE_MAX_INPUTS, "concat", "%d inputs (1..%d allowed)", n, MOE_NODE_MAX_INPUTS))
        return NULL;
    for (int i = 0; i < n; i++)
        if (!xs[i]) return NULL;
    if (!op_check_same("concat", n, xs, true)) return NULL;
    if (axis < 0) axis += xs[0]->ndim;
    int64_t s[MOE_MAX_DIMS];
    memcpy(s, xs[0]->shape, sizeof s);
    s[axis] = 0;
    for (int i = 0; i < n; i++) {
        bool ok = xs[i]->ndim == xs[0]->ndim;
        for (int d = 0; ok && d < xs[0]->ndim; d++) ok = d == axis || xs[i]->shape[d] == xs[0]->shape[d];
        if (!moe_check(ok, "concat", "input %d %s does not match input 0 %s outside axis %d", i, D(xs[i]), D(xs[0]), axis))
            return NULL;
        s[axis] += xs[i]->shape[axis];
    }
    moe_tensor *o = op_new(xs[0], xs[0]->dtype, xs[0]->ndim, s);
    if (!o) return NULL;
    int64_t at = 0;
    for (int i = 0; i < n; i++) {
        moe_tensor *part = moe_tensor_view_raw(o, o->ndim, xs[i]->shape, o->strides, at * o->strides[axis]);
        if (!part || moe_tensor_copy_(part, xs[i]) != MOE_OK) return NULL;
        at += xs[i]->shape[axis];
    }
    concat_attrs ca = {axis};
    moe_autograd_record(MOE_OP_CONCAT, o, n, xs, &ca, sizeof ca);
    return o;
}

void moe_backward_concat(moe_node *n) {
    int axis = ((const concat_attrs *)n->attrs)->axis;
    int64_t at = 0;
    for (int i = 0; i < n->n_in; i++) {
        int64_t len = n->in[i]->shape[axis];
        moe_grad_give(n->in[i], moe_slice(n->out->grad, axis, at, at + len)); /* disjoint pieces */
        at += len;
    }
}
