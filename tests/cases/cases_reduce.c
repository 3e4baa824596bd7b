/* Op cases: sum, mean, max over an axis. (softmax, norms: cases_norm.c) */
#include "tests/harness/opcheck.h"

static moe_tensor *run_sum0(moe_tensor **in) { return moe_sum(in[0], 0, false); }
static moe_tensor *run_sum1(moe_tensor **in) { return moe_sum(in[0], 1, true); }
static moe_tensor *run_mean(moe_tensor **in) { return moe_mean(in[0], -1, false); }
static moe_tensor *run_max(moe_tensor **in) { return moe_max(in[0], 1, false); }
static moe_tensor *run_sum_all(moe_tensor **in) { return moe_sum_all(in[0]); }

static const op_case cases[] = {
    {"sum", "axis 0", 1, {{3, {3, 4, 2}, IN_NORMAL, 0, true, false}}, run_sum0},
    {"sum", "axis 1 keepdim, transposed", 1, {{3, {3, 4, 2}, IN_NORMAL, 0, true, true}}, run_sum1},
    {"sum", "all", 1, {{2, {3, 4}, IN_NORMAL, 0, true, false}}, run_sum_all},
    {"mean", "last axis", 1, {{2, {3, 5}, IN_NORMAL, 0, true, false}}, run_mean},
    {"max", "axis 1", 1, {{3, {2, 5, 3}, IN_DISTINCT, 0, true, false}}, run_max},
    /* Long slices with few outputs: the CUDA kernels split the axis into chunks. */
    {"sum", "all, 9000 values", 1, {{2, {3, 3000}, IN_NORMAL, 0, true, false}}, run_sum_all},
    /* More than 4 * 16384 values: the CPU kernel sums fixed blocks in parallel. */
    {"sum", "all, 70000 values", 1, {{2, {2, 35000}, IN_NORMAL, 0, true, false}}, run_sum_all, .grad_samples = 20},
    {"sum", "axis 0 of [700, 3]", 1, {{2, {700, 3}, IN_NORMAL, 0, true, false}}, run_sum0},
    {"max", "axis 1 of [2, 4200]", 1, {{2, {2, 4200}, IN_DISTINCT, 0, true, false}}, run_max, .f32_parity_only = true},
    {"max", "axis 1 of [1, 600, 3]", 1, {{3, {1, 600, 3}, IN_DISTINCT, 0, true, false}}, run_max,
     .f32_parity_only = true},
};

const op_case_list cases_reduce = {cases, sizeof cases / sizeof *cases};
