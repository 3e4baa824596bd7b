/* Op cases: views, contiguous, concat, split, cast. */
#include "tests/harness/opcheck.h"

static moe_tensor *run_reshape(moe_tensor **in) { return moe_reshape(in[0], 3, (int64_t[]){2, -1, 3}); }
/* Reshapes that stay views of a slice: heads 1..4 of [B, T, H, hd] merged into one row per
 * token, and a slice of columns split into two axes. */
static moe_tensor *run_reshape_heads(moe_tensor **in) {
    moe_tensor *x = moe_slice(in[0], 2, 1, 5);
    return moe_reshape(x, 3, (int64_t[]){x->shape[0], x->shape[1], 4 * x->shape[3]});
}
static moe_tensor *run_reshape_split(moe_tensor **in) {
    return moe_reshape(moe_slice(in[0], 1, 1, 7), 3, (int64_t[]){in[0]->shape[0], 2, 3});
}
static moe_tensor *run_transpose(moe_tensor **in) { return moe_contiguous(moe_transpose(in[0], 0, 2)); }
static moe_tensor *run_permute(moe_tensor **in) { return moe_permute(in[0], (int[]){2, 0, 1}); }
static moe_tensor *run_slice(moe_tensor **in) { return moe_slice(in[0], 1, 1, 4); }
static moe_tensor *run_contiguous(moe_tensor **in) { return moe_contiguous(in[0]); }
static moe_tensor *run_concat(moe_tensor **in) { return moe_concat(in, 3, 1); }
static moe_tensor *run_split(moe_tensor **in) {
    moe_tensor *parts[3];
    if (moe_split(in[0], 1, 3, (int64_t[]){1, 3, 2}, parts) != MOE_OK) return NULL;
    return moe_mul(parts[1], parts[1]); /* a non-linear use of one piece */
}
static moe_tensor *run_cast(moe_tensor **in) { return moe_cast(moe_cast(in[0], MOE_F32), in[0]->dtype); }

static const op_case cases[] = {
    {"reshape", "transposed input", 1, {{3, {2, 3, 4}, IN_NORMAL, 0, true, true}}, run_reshape},
    {"reshape", "heads of a slice merged (a view)", 1, {{4, {2, 3, 6, 2}, IN_NORMAL, 0, true, false}}, run_reshape_heads},
    {"reshape", "a slice of columns split (a view)", 1, {{2, {3, 8}, IN_NORMAL, 0, true, false}}, run_reshape_split},
    {"transpose", "3-d", 1, {{3, {2, 3, 4}, IN_NORMAL, 0, true, false}}, run_transpose},
    {"permute", "3-d", 1, {{3, {2, 3, 4}, IN_NORMAL, 0, true, true}}, run_permute},
    {"slice", "middle", 1, {{2, {3, 5}, IN_NORMAL, 0, true, false}}, run_slice},
    {"contiguous", "of a transpose", 1, {{2, {3, 5}, IN_NORMAL, 0, true, true}}, run_contiguous},
    {"concat", "three along axis 1", 3,
     {{2, {2, 3}, IN_NORMAL, 0, true, false}, {2, {2, 1}, IN_NORMAL, 0, true, true}, {2, {2, 2}, IN_NORMAL, 0, true, false}},
     run_concat},
    {"slice", "split into three", 1, {{2, {3, 6}, IN_NORMAL, 0, true, false}}, run_split},
    {"cast", "round trip through f32", 1, {{2, {3, 4}, IN_NORMAL, 0, true, false}}, run_cast, 3e-2},
};

const op_case_list cases_shape = {cases, sizeof cases / sizeof *cases};
