/* Reductions over one axis: sum, mean, max (with argmax for the backward), sum of all. */
#include <string.h>

#include "core/op_internal.h"

typedef struct { int axis; bool keepdim; } reduce_node_attrs;

static void reduced_shape(const moe_tensor *x, int axis, bool keepdim, int *ndim, int64_t *s) {
    int k = 0;
    for (int d = 0; d < x->ndim; d++) {
        if (d != axis) s[k++] = x->shape[d];
        else if (keepdim) s[k++] = 1;
    }
    *ndim = k;
}

/* Runs REDUCE into a keepdim-shaped tensor; *arg receives argmax for max. */
static moe_tensor *reduce_raw(moe_tensor *x, int op, int axis, moe_tensor **arg) {
    moe_tensor *xc = op_contiguous_nograd(x);
    if (!xc) return NULL;
    int64_t s[MOE_MAX_DIMS];
    memcpy(s, x->shape, sizeof s);
    s[axis] = 1;
    moe_tensor *o = op_new(x, x->dtype, x->ndim, s);
    moe_tensor *ai = (o && arg) ? op_new(x, MOE_I32, x->ndim, s) : NULL;
    if (!o || (arg && !ai)) return NULL;
    moe_reduce_attrs at = {op, axis};
    OP_RUN(MOE_K_REDUCE, .out = o, .out2 = ai, .in = {xc}, .attrs = &at);
    if (arg) *arg = ai;
    return o;
}

static moe_tensor *reduce_op(moe_tensor *x, int axis, bool keepdim, int kop, int op_id, const char *name) {
    OP_NEED(x);
    if (axis < 0) axis += x->ndim;
    if (!moe_check(axis >= 0 && axis < x->ndim, name, "axis out of range for %s", D(x))) return NULL;
    if (!moe_check(moe_dtype_is_float(x->dtype), name, "needs a float tensor, got %s", D(x))) return NULL;
    moe_tensor *arg = NULL;
    moe_tensor *r = reduce_raw(x, kop, axis, kop ? &arg : NULL);
    if (!r) return NULL;
    int ndim;
    int64_t s[MOE_MAX_DIMS];
    reduced_shape(x, axis, keepdim, &ndim, s);
    moe_tensor *o = moe_tensor_view_raw(r, ndim, s, (int64_t[MOE_MAX_DIMS]){0}, 0);
    if (!o) return NULL;
    moe_strides_contiguous(ndim, s, o->strides);
    if (op_id == MOE_OP_MEAN) {
        moe_op_attrs_scalar sc = {.op = MOE_SC_MUL, .value = 1.0 / (double)x->shape[axis]};
        OP_RUN(MOE_K_SCALAR, .out = o, .in = {o}, .attrs = &sc);
    }
    reduce_node_attrs ra = {axis, keepdim};
    moe_node *node = moe_autograd_record(op_id, o, 1, &x, &ra, sizeof ra);
    if (node) node->saved[0] = arg;
    return o;
}

moe_tensor *moe_sum(moe_tensor *x, int axis, bool keepdim) { return reduce_op(x, axis, keepdim, 0, MOE_OP_SUM, "sum"); }
moe_tensor *moe_mean(moe_tensor *x, int axis, bool keepdim) { return reduce_op(x, axis, keepdim, 0, MOE_OP_MEAN, "mean"); }
moe_tensor *moe_max(moe_tensor *x, int axis, bool keepdim) { return reduce_op(x, axis, keepdim, 1, MOE_OP_MAX, "max"); }

moe_tensor *moe_sum_all(moe_tensor *x) {
    OP_NEED(x);
    moe_tensor *flat = moe_reshape(x, 1, (int64_t[]){moe_tensor_numel(x)});
    return moe_reshape(moe_sum(flat, 0, false), 0, NULL);
}

/* The grad of the keepdim-shaped reduction, broadcast back to x's shape. */
static moe_tensor *grad_keepdim(moe_node *n) {
    const reduce_node_attrs *ra = (const reduce_node_attrs *)n->attrs;
    moe_tensor *x = n->in[0];
    int64_t s[MOE_MAX_DIMS];
    memcpy(s, x->shape, sizeof s);
    s[ra->axis] = 1;
    return moe_reshape(n->out->grad, x->ndim, s);
}

/* Hands x the grad g (keepdim-shaped) times scale, copied out over x's shape: one pass,
 * no zeroed buffer to add it to. */
static void give_spread(moe_tensor *x, moe_tensor *g, double scale) {
    if (g && scale != 1.0) g = moe_mul_scalar(g, scale);
    moe_tensor *gx = g ? op_new(x, x->dtype, x->ndim, x->shape) : NULL;
    moe_tensor *v = gx ? op_broadcast_view(g, x->ndim, x->shape) : NULL;
    moe_kernel_args args = {.out = gx, .in = {v}};
    moe_grad_give(x, v && moe_kernel_run(MOE_K_COPY, &args) == MOE_OK ? gx : NULL);
}

void moe_backward_sum(moe_node *n) { give_spread(n->in[0], grad_keepdim(n), 1.0); }

void moe_backward_mean(moe_node *n) {
    int axis = ((const reduce_node_attrs *)n->attrs)->axis;
    give_spread(n->in[0], grad_keepdim(n), 1.0 / (double)n->in[0]->shape[axis]);
}

/* max: the grad goes to the argmax element along the axis (scatter into zeros). */
void moe_backward_max(moe_node *n) {
    moe_tensor *x = n->in[0], *g = grad_keepdim(n), *arg = n->saved[0];
    int axis = ((const reduce_node_attrs *)n->attrs)->axis;
    if (!g) {
        moe_grad_give(x, NULL);
        return;
    }
    /* Move the axis last, scatter with scatter_add, move it back. */
    int perm[MOE_MAX_DIMS];
    for (int d = 0, k = 0; d < x->ndim; d++)
        if (d != axis) perm[k++] = d;
    perm[x->ndim - 1] = axis;
    int inv[MOE_MAX_DIMS];
    for (int d = 0; d < x->ndim; d++) inv[perm[d]] = d;
    moe_tensor *xt = moe_contiguous(moe_permute(x, perm));
    moe_tensor *z = xt ? moe_tensor_zeros(MOE_LIFE_STEP, x->device, x->dtype, x->ndim, xt->shape) : NULL;
    moe_tensor *gt = moe_contiguous(moe_permute(g, perm)), *at = moe_contiguous(moe_permute(arg, perm));
    moe_tensor *st = z ? moe_scatter_add(z, at, gt) : NULL;
    moe_grad_give(x, st ? moe_contiguous(moe_permute(st, inv)) : NULL);
}
