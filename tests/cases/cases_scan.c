/* Op cases: linear-attention scans (gated delta rule and gated linear attention), in the
 * step-by-step and the chunked form, with and without an initial state; T = 5 is not a
 * multiple of the chunk lengths 2 and 3. Inputs: q, k [N, T, H, dk], v [N, T, H, dv],
 * beta, alpha [N, T, H] in (0.05, 0.95), state0 [N, H, dk, dv]. */
#include <math.h>

#include "tests/harness/opcheck.h"

static moe_tensor *run_delta(moe_tensor **in) { return moe_delta_scan(in[0], in[1], in[2], in[3], in[4], NULL, true, NULL); }
static moe_tensor *run_gla(moe_tensor **in) { return moe_delta_scan(in[0], in[1], in[2], in[3], in[4], NULL, false, NULL); }
/* state0 in the state dtype (F32 for f32 / bf16 inputs: the CUDA parity runs bf16 too). */
static moe_tensor *s0(moe_tensor **in) { return moe_cast(in[5], in[0]->dtype == MOE_F64 ? MOE_F64 : MOE_F32); }

static moe_tensor *run_delta_c2_state(moe_tensor **in) {
    return moe_delta_scan_chunked(in[0], in[1], in[2], in[3], in[4], s0(in), true, 2, NULL);
}
static moe_tensor *run_gla_c3_state(moe_tensor **in) {
    return moe_delta_scan_chunked(in[0], in[1], in[2], in[3], in[4], s0(in), false, 3, NULL);
}
static moe_tensor *run_delta_state(moe_tensor **in) {
    return moe_delta_scan(in[0], in[1], in[2], in[3], in[4], s0(in), true, NULL);
}

#define F(nd, ...) {nd, {__VA_ARGS__}, IN_NORMAL, 0, true, false}
#define FT(nd, ...) {nd, {__VA_ARGS__}, IN_NORMAL, 0, true, true}
#define U(nd, ...) {nd, {__VA_ARGS__}, IN_UNIT, 0, true, false}
#define SCAN_IN(qspec) qspec, F(4, 2, 5, 2, 3), F(4, 2, 5, 2, 2), U(3, 2, 5, 2), U(3, 2, 5, 2)

/* q, k scaled by 1/sqrt(dk) (|k|^2 ~ 1, as the layers' normalised keys: the delta rule
 * stays contractive and the values moderate). */
static moe_tensor *scaled(moe_tensor *x) { return moe_mul_scalar(x, 1.0 / sqrt((double)x->shape[3])); }
static moe_tensor *run_big_delta_state(moe_tensor **in) {
    return moe_delta_scan(scaled(in[0]), scaled(in[1]), in[2], in[3], in[4], s0(in), true, NULL);
}
static moe_tensor *run_big_gla_c20_state(moe_tensor **in) {
    return moe_delta_scan_chunked(scaled(in[0]), scaled(in[1]), in[2], in[3], in[4], s0(in), false, 20, NULL);
}

/* The CUDA chunked form at a layer's chunk length: T = 150 leaves a partial third chunk. */
static moe_tensor *run_c64_delta_state(moe_tensor **in) {
    return moe_delta_scan_chunked(scaled(in[0]), scaled(in[1]), in[2], in[3], in[4], s0(in), true, 64, NULL);
}
static moe_tensor *run_c64_gla(moe_tensor **in) {
    return moe_delta_scan_chunked(scaled(in[0]), scaled(in[1]), in[2], in[3], in[4], NULL, false, 64, NULL);
}
#define C64_IN(qspec) qspec, F(4, 2, 150, 2, 64), F(4, 2, 150, 2, 48), U(3, 2, 150, 2), U(3, 2, 150, 2)

/* Sized for the CUDA kernels' tiling: dk = 40 spans two warps of rows (the second partly
 * used), dv = 37 two slices of 32 columns; T = 70 crosses the step-by-step form's
 * checkpoint interval (64) and the backward's sub-chunks. Gradcheck on a sample. */
#define BIG_IN(qspec) qspec, F(4, 1, 70, 2, 40), F(4, 1, 70, 2, 37), U(3, 1, 70, 2), U(3, 1, 70, 2)

static const op_case cases[] = {
    {"delta_scan", "delta, step by step, transposed q", 5, {SCAN_IN(FT(4, 2, 5, 2, 3))}, run_delta},
    {"delta_scan", "gla, step by step", 5, {SCAN_IN(F(4, 2, 5, 2, 3))}, run_gla},
    {"delta_scan", "delta, chunked C=2, state0, transposed q", 6, {SCAN_IN(FT(4, 2, 5, 2, 3)), F(4, 2, 2, 3, 2)},
     run_delta_c2_state},
    {"delta_scan", "gla, chunked C=3, state0", 6, {SCAN_IN(F(4, 2, 5, 2, 3)), F(4, 2, 2, 3, 2)}, run_gla_c3_state},
    {"delta_scan", "delta, step by step, state0", 6, {SCAN_IN(F(4, 2, 5, 2, 3)), F(4, 2, 2, 3, 2)}, run_delta_state},
    {"delta_scan", "delta, step by step, state0, dk 40, dv 37, T 70", 6,
     {BIG_IN(F(4, 1, 70, 2, 40)), F(4, 1, 2, 40, 37)}, run_big_delta_state, .grad_samples = 40},
    {"delta_scan", "gla, chunked C=20, state0, dk 40, dv 37, T 70", 6,
     {BIG_IN(F(4, 1, 70, 2, 40)), F(4, 1, 2, 40, 37)}, run_big_gla_c20_state, .grad_samples = 40},
    {"delta_scan", "delta, chunked C=64, state0, dk 64, dv 48, T 150", 6,
     {C64_IN(F(4, 2, 150, 2, 64)), F(4, 2, 2, 64, 48)}, run_c64_delta_state, .grad_samples = 30,
     .grad_tol = 1e-5},
    {"delta_scan", "gla, chunked C=64, dk 64, dv 48, T 150", 5, {C64_IN(F(4, 2, 150, 2, 64))}, run_c64_gla,
     .grad_samples = 30, .grad_tol = 1e-5},
};

const op_case_list cases_scan = {cases, sizeof cases / sizeof *cases};
