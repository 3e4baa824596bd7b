/* Elementwise ops: broadcasting binary ops, scalar ops, unary functions, fused SwiGLU. */
#include <string.h>

#include "core/op_internal.h"

moe_tensor *op_broadcast_view(moe_tensor *x, int ndim, const int64_t *shape) {
    int64_t st[MOE_MAX_DIMS];
    int lead = ndim - x->ndim;
    for (int d = 0; d < ndim; d++) {
        int xd = d - lead;
        st[d] = (xd < 0 || x->shape[xd] == 1) ? 0 : x->strides[xd];
    }
    return moe_tensor_view_raw(x, ndim, shape, st, 0);
}

static const char *const binary_names[] = {"add", "sub", "mul", "div"};
static const int binary_ops[] = {MOE_OP_ADD, MOE_OP_SUB, MOE_OP_MUL, MOE_OP_DIV};

static moe_tensor *binary(moe_tensor *a, moe_tensor *b, int bop) {
    OP_NEED(a, b);
    const char *name = binary_names[bop];
    moe_tensor *ab[2] = {a, b};
    if (!op_check_same(name, 2, ab, true)) return NULL;
    int ndim = a->ndim > b->ndim ? a->ndim : b->ndim;
    int64_t s[MOE_MAX_DIMS];
    for (int d = 0; d < ndim; d++) {
        int da = d - (ndim - a->ndim), db = d - (ndim - b->ndim);
        int64_t sa = da >= 0 ? a->shape[da] : 1, sb = db >= 0 ? b->shape[db] : 1;
        if (!moe_check(sa == sb || sa == 1 || sb == 1, name, "shapes %s and %s do not broadcast", D(a), D(b)))
            return NULL;
        s[d] = sa == 1 ? sb : sa;
    }
    moe_tensor *o = op_new(a, a->dtype, ndim, s);
    moe_tensor *va = o ? op_broadcast_view(a, ndim, s) : NULL, *vb = o ? op_broadcast_view(b, ndim, s) : NULL;
    if (!va || !vb) return NULL;
    moe_op_attrs_scalar at = {.op = bop};
    OP_RUN(MOE_K_BINARY, .out = o, .in = {va, vb}, .attrs = &at);
    moe_autograd_record(binary_ops[bop], o, 2, ab, NULL, 0);
    return o;
}

moe_tensor *moe_add(moe_tensor *a, moe_tensor *b) { return binary(a, b, MOE_BIN_ADD); }
moe_tensor *moe_sub(moe_tensor *a, moe_tensor *b) { return binary(a, b, MOE_BIN_SUB); }
moe_tensor *moe_mul(moe_tensor *a, moe_tensor *b) { return binary(a, b, MOE_BIN_MUL); }
moe_tensor *moe_div(moe_tensor *a, moe_tensor *b) { return binary(a, b, MOE_BIN_DIV); }

moe_tensor *op_reduce_to_shape(moe_tensor *g, int ndim, const int64_t *shape) {
    if (!g) return NULL;
    moe_tensor *r = g;
    int lead = g->ndim - ndim;
    for (int d = 0; d < g->ndim; d++) {
        int td = d - lead;
        if (td < 0 || (shape[td] == 1 && g->shape[d] != 1)) r = moe_sum(r, d, true);
        if (!r) return NULL;
    }
    return lead ? moe_reshape(r, ndim, shape) : r;
}

/* Hands grad `g` (out-shaped) to input x, summing over broadcast dims first. */
static void give_broadcast(moe_tensor *x, moe_tensor *g, bool fresh) {
    if (!x->requires_grad) return;
    if (moe_tensor_same_shape(x, g)) {
        if (fresh) moe_grad_give(x, g);
        else moe_grad_accumulate(x, g);
        return;
    }
    moe_grad_give(x, op_reduce_to_shape(g, x->ndim, x->shape));
}

/* The upstream grad can be handed over to one input (nobody reads it after this
 * backward), so the first input takes it and the second a copy. */
void moe_backward_add(moe_node *n) {
    give_broadcast(n->in[1], n->out->grad, false);
    give_broadcast(n->in[0], n->out->grad, true);
}

void moe_backward_sub(moe_node *n) {
    if (n->in[1]->requires_grad) give_broadcast(n->in[1], moe_neg(n->out->grad), true);
    give_broadcast(n->in[0], n->out->grad, true);
}

void moe_backward_mul(moe_node *n) {
    moe_tensor *g = n->out->grad, *a = n->in[0], *b = n->in[1];
    if (a->requires_grad) give_broadcast(a, moe_mul(g, b), true);
    if (b->requires_grad) give_broadcast(b, moe_mul(g, a), true);
}

void moe_backward_div(moe_node *n) {
    moe_tensor *g = n->out->grad, *a = n->in[0], *b = n->in[1];
    if (a->requires_grad) give_broadcast(a, moe_div(g, b), true);
    if (b->requires_grad) give_broadcast(b, moe_neg(moe_div(moe_mul(g, n->out), b)), true);
}

/* ---- scalar ops ---- */
static moe_tensor *scalar_op(moe_tensor *x, int sop, double s, int op_id, const char *name) {
    OP_NEED(x);
    if (!moe_check(moe_dtype_is_float(x->dtype), name, "needs a float tensor, got %s", D(x))) return NULL;
    moe_tensor *o = op_new(x, x->dtype, x->ndim, x->shape);
    if (!o) return NULL;
    moe_op_attrs_scalar at = {.op = sop, .value = s};
    OP_RUN(MOE_K_SCALAR, .out = o, .in = {x}, .attrs = &at);
    moe_autograd_record(op_id, o, 1, &x, &at, sizeof at);
    return o;
}

moe_tensor *moe_add_scalar(moe_tensor *x, double s) { return scalar_op(x, MOE_SC_ADD, s, MOE_OP_ADD_SCALAR, "add_scalar"); }
moe_tensor *moe_mul_scalar(moe_tensor *x, double s) { return scalar_op(x, MOE_SC_MUL, s, MOE_OP_MUL_SCALAR, "mul_scalar"); }
moe_tensor *moe_pow_scalar(moe_tensor *x, double s) { return scalar_op(x, MOE_SC_POW, s, MOE_OP_POW_SCALAR, "pow_scalar"); }

void moe_backward_add_scalar(moe_node *n) { moe_grad_give(n->in[0], n->out->grad); }

void moe_backward_mul_scalar(moe_node *n) {
    moe_grad_give(n->in[0], moe_mul_scalar(n->out->grad, ((const moe_op_attrs_scalar *)n->attrs)->value));
}

void moe_backward_pow_scalar(moe_node *n) {
    double p = ((const moe_op_attrs_scalar *)n->attrs)->value;
    moe_tensor *d = moe_mul_scalar(moe_pow_scalar(n->in[0], p - 1), p);
    moe_grad_give(n->in[0], moe_mul(n->out->grad, d));
}

/* ---- unary functions ---- */
static moe_tensor *unary(moe_tensor *x, int uop, int op_id, const char *name) {
    OP_NEED(x);
    if (!moe_check(moe_dtype_is_float(x->dtype), name, "needs a float tensor, got %s", D(x))) return NULL;
    moe_tensor *o = op_new(x, x->dtype, x->ndim, x->shape);
    if (!o) return NULL;
    moe_op_attrs_scalar at = {.op = uop};
    OP_RUN(MOE_K_UNARY, .out = o, .in = {x}, .attrs = &at);
    moe_autograd_record(op_id, o, 1, &x, &at, sizeof at);
    return o;
}

static void unary_backward(moe_node *n) {
    moe_tensor *x = n->in[0], *g = n->out->grad;
    moe_tensor *gx = op_new(x, x->dtype, x->ndim, x->shape);
    if (!gx) {
        moe_grad_give(x, NULL);
        return;
    }
    BWD_RUN(MOE_K_UNARY_BWD, .out = gx, .in = {g, x, n->out}, .attrs = n->attrs);
    moe_grad_give(x, gx);
}

#define UNARY_OP(fname, UOP, OPID)                                                      \
    moe_tensor *moe_##fname(moe_tensor *x) { return unary(x, UOP, OPID, #fname); }     \
    void moe_backward_##fname(moe_node *n) { unary_backward(n); }

UNARY_OP(neg, MOE_UN_NEG, MOE_OP_NEG)
UNARY_OP(exp, MOE_UN_EXP, MOE_OP_EXP)
UNARY_OP(log, MOE_UN_LOG, MOE_OP_LOG)
UNARY_OP(sqrt, MOE_UN_SQRT, MOE_OP_SQRT)
UNARY_OP(rsqrt, MOE_UN_RSQRT, MOE_OP_RSQRT)
UNARY_OP(sigmoid, MOE_UN_SIGMOID, MOE_OP_SIGMOID)
UNARY_OP(tanh, MOE_UN_TANH, MOE_OP_TANH)
UNARY_OP(relu, MOE_UN_RELU, MOE_OP_RELU)
UNARY_OP(silu, MOE_UN_SILU, MOE_OP_SILU)
UNARY_OP(gelu, MOE_UN_GELU, MOE_OP_GELU)
UNARY_OP(softplus, MOE_UN_SOFTPLUS, MOE_OP_SOFTPLUS)

/* ---- fused SwiGLU on the packed projection: h [..., 2f] -> silu(h[..., :f]) * h[..., f:] ---- */
moe_tensor *moe_swiglu(moe_tensor *h) {
    OP_NEED(h);
    if (!moe_check(moe_dtype_is_float(h->dtype) && h->ndim >= 1 && h->shape[h->ndim - 1] % 2 == 0, "swiglu",
                   "expects a packed float [..., 2f] input (gate then up), got %s", D(h)))
        return NULL;
    int64_t shape[MOE_MAX_DIMS];
    memcpy(shape, h->shape, sizeof(int64_t) * (size_t)h->ndim);
    shape[h->ndim - 1] /= 2;
    moe_tensor *o = op_new(h, h->dtype, h->ndim, shape);
    if (!o) return NULL;
    OP_RUN(MOE_K_SWIGLU, .out = o, .in = {h});
    moe_autograd_record(MOE_OP_SWIGLU, o, 1, &h, NULL, 0);
    return o;
}

void moe_backward_swiglu(moe_node *n) {
    moe_tensor *h = n->in[0];
    moe_tensor *gh = op_new(h, h->dtype, h->ndim, h->shape); /* [..., 2f], both halves written */
    if (gh) BWD_RUN(MOE_K_SWIGLU_BWD, .out = gh, .in = {n->out->grad, h});
    moe_grad_give(h, gh);
}
