/* Op cases: recompute (activation checkpointing). The piece is a SwiGLU feed-forward with
 * dropout (fixed counters) on a residual, so a replay that drew other numbers, lost a
 * parameter's grad or the input's would fail the gradient check; the nested case runs a
 * recomputed piece inside another. */
#include "tests/harness/opcheck.h"

/* x [T, d] + dropout(swiglu(x w13) w2): in = {x, w13 [d, 2f], w2 [f, d]}. */
static moe_tensor *swiglu_residual(void *ctx, moe_tensor *const *in) {
    (void)ctx;
    moe_tensor *y = moe_matmul(moe_swiglu(moe_matmul(in[0], in[1])), in[2]);
    return moe_add(in[0], moe_dropout(y, 0.25, 99, 7));
}

/* The same piece twice, the inner one recomputed too, on halved weights (non-leaf inputs
 * inside the replay): at full scale the second piece's SwiGLU sees inputs of ~20, and the
 * bf16 rounding of two chained pieces alone puts the input grad past the bf16 parity bar. */
static moe_tensor *nested(void *ctx, moe_tensor *const *in) {
    moe_tensor *w13 = moe_mul_scalar(in[1], 0.5), *w2 = moe_mul_scalar(in[2], 0.5);
    moe_tensor *h = moe_recompute(swiglu_residual, ctx, 3, (moe_tensor *[]){in[0], w13, w2});
    return swiglu_residual(ctx, (moe_tensor *[]){h, w13, w2});
}

/* The first input through an op first: a non-leaf input, replayed from a fresh leaf. */
static moe_tensor *run_recompute(moe_tensor **in) {
    return moe_recompute(swiglu_residual, NULL, 3, (moe_tensor *[]){moe_mul_scalar(in[0], 1.5), in[1], in[2]});
}
static moe_tensor *run_recompute_nested(moe_tensor **in) {
    return moe_recompute(nested, NULL, 3, (moe_tensor *[]){moe_mul_scalar(in[0], 1.5), in[1], in[2]});
}

#define F(nd, ...) {nd, {__VA_ARGS__}, IN_NORMAL, 0, true, false}

static const op_case cases[] = {
    {"recompute", "swiglu ffn + dropout on a residual, [5, 4] f=3", 3, {F(2, 5, 4), F(2, 4, 6), F(2, 3, 4)},
     run_recompute},
    {"recompute", "nested: a recomputed piece inside one", 3, {F(2, 5, 4), F(2, 4, 6), F(2, 3, 4)},
     run_recompute_nested},
};

const op_case_list cases_recompute = {cases, sizeof cases / sizeof *cases};
