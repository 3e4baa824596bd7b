/* Op cases: binary ops with broadcasting, scalar ops, unary functions, SwiGLU. */
#include "tests/harness/opcheck.h"

static moe_tensor *run_add(moe_tensor **in) { return moe_add(in[0], in[1]); }
static moe_tensor *run_sub(moe_tensor **in) { return moe_sub(in[0], in[1]); }
static moe_tensor *run_mul(moe_tensor **in) { return moe_mul(in[0], in[1]); }
static moe_tensor *run_div(moe_tensor **in) { return moe_div(in[0], in[1]); }
static moe_tensor *run_add_scalar(moe_tensor **in) { return moe_add_scalar(in[0], 0.7); }
static moe_tensor *run_mul_scalar(moe_tensor **in) { return moe_mul_scalar(in[0], -1.3); }
static moe_tensor *run_pow_scalar(moe_tensor **in) { return moe_pow_scalar(in[0], 1.7); }
#define RUN1(f) static moe_tensor *run_##f(moe_tensor **in) { return moe_##f(in[0]); }
RUN1(neg) RUN1(exp) RUN1(log) RUN1(sqrt) RUN1(rsqrt) RUN1(sigmoid) RUN1(tanh) RUN1(relu) RUN1(silu) RUN1(gelu)
RUN1(softplus)
static moe_tensor *run_swiglu(moe_tensor **in) { return moe_swiglu(in[0]); }
static moe_tensor *run_swiglu_slice(moe_tensor **in) { return moe_swiglu(moe_slice(in[0], 1, 1, 7)); }

#define A34 {2, {3, 4}, IN_NORMAL, 0, true, false}
#define A34T {2, {3, 4}, IN_NORMAL, 0, true, true}
#define P34 {2, {3, 4}, IN_POSITIVE, 0, true, false}
#define UNARY(name, spec) {#name, "3x4", 1, {spec}, run_##name}

static const op_case cases[] = {
    {"add", "same shape", 2, {A34, A34T}, run_add},
    {"add", "broadcast row and column", 2, {{3, {2, 1, 4}, IN_NORMAL, 0, true, false}, {2, {3, 1}, IN_NORMAL, 0, true, false}}, run_add},
    {"sub", "broadcast", 2, {{2, {3, 4}, IN_NORMAL, 0, true, false}, {1, {4}, IN_NORMAL, 0, true, false}}, run_sub},
    {"mul", "broadcast", 2, {{3, {2, 3, 4}, IN_NORMAL, 0, true, false}, {2, {3, 4}, IN_NORMAL, 0, true, true}}, run_mul},
    /* one value per row against a full operand: CUDA's 8-wide row path, both orders */
    {"mul", "[2, 3, 16] * [2, 3, 1]", 2, {{3, {2, 3, 16}, IN_NORMAL, 0, true, false}, {3, {2, 3, 1}, IN_NORMAL, 0, true, false}}, run_mul},
    {"sub", "[5, 1] - [5, 16]", 2, {{2, {5, 1}, IN_NORMAL, 0, true, false}, {2, {5, 16}, IN_NORMAL, 0, true, false}}, run_sub},
    {"div", "positive divisor", 2, {A34, {2, {1, 4}, IN_POSITIVE, 0, true, false}}, run_div},
    {"add_scalar", "3x4", 1, {A34T}, run_add_scalar},
    {"mul_scalar", "3x4", 1, {A34}, run_mul_scalar},
    {"pow_scalar", "positive base", 1, {P34}, run_pow_scalar},
    UNARY(neg, A34T), UNARY(exp, A34), UNARY(log, P34), UNARY(sqrt, P34), UNARY(rsqrt, P34),
    UNARY(sigmoid, A34), UNARY(relu, A34), UNARY(silu, A34), UNARY(gelu, A34),
    {"tanh", "3x4", 1, {A34T}, run_tanh, 0, 5e-5}, /* CUDA's fast-math tanh: ~1e-5 relative */
    UNARY(softplus, A34),
    {"swiglu", "packed 3x(2x2)", 1, {A34}, run_swiglu},
    {"swiglu", "packed, transposed", 1, {A34T}, run_swiglu},
    {"swiglu", "packed 2x(2x16), vector path on cuda", 1, {{3, {2, 2, 32}, IN_NORMAL, 0, true, false}}, run_swiglu},
    {"swiglu", "packed column slice [3, 6] of [3, 8]", 1, {{2, {3, 8}, IN_NORMAL, 0, true, false}}, run_swiglu_slice},
};

const op_case_list cases_elementwise = {cases, sizeof cases / sizeof *cases};
