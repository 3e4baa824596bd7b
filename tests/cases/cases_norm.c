/* Op cases: softmax, log-softmax, logsumexp over the last axis; RMSNorm, LayerNorm, the fused
 * residual add + RMSNorm, alone and after the output projection. */
#include "tests/harness/opcheck.h"

static moe_tensor *run_softmax(moe_tensor **in) { return moe_softmax(in[0]); }
static moe_tensor *run_log_softmax(moe_tensor **in) { return moe_log_softmax(in[0]); }
static moe_tensor *run_logsumexp(moe_tensor **in) { return moe_logsumexp(in[0]); }
static moe_tensor *run_rmsnorm(moe_tensor **in) { return moe_rmsnorm(in[0], in[1], 1e-5); }
static moe_tensor *run_rmsnorm_now(moe_tensor **in) { return moe_rmsnorm(in[0], NULL, 1e-5); }
/* Columns 2 .. 9 of in[0] [..., 12]: rows at a stride of 12, normalised where they lie. */
static moe_tensor *run_rmsnorm_cols(moe_tensor **in) {
    return moe_rmsnorm(moe_slice(in[0], in[0]->ndim - 1, 2, 10), in[1], 1e-5);
}
static moe_tensor *run_layernorm_cols(moe_tensor **in) {
    return moe_layernorm(moe_slice(in[0], in[0]->ndim - 1, 2, 10), in[1], in[2], 1e-5);
}
static moe_tensor *run_layernorm(moe_tensor **in) { return moe_layernorm(in[0], in[1], in[2], 1e-5); }
/* add_rmsnorm (inference only): [y | s] against [rmsnorm(x + r) | x + r], bit for bit on the host. */
static moe_tensor *run_add_rmsnorm(moe_tensor **in) {
    moe_tensor *s = NULL, *y = moe_add_rmsnorm(in[0], in[1], in[2], 1e-5, &s);
    return y && s ? moe_concat((moe_tensor *[]){y, s}, 2, in[0]->ndim - 1) : NULL;
}
static bool check_add_rmsnorm(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {
    moe_tensor *s = moe_add(in[0], in[1]), *y = moe_rmsnorm(s, in[2], 1e-5);
    moe_tensor *ref = y ? moe_concat((moe_tensor *[]){y, s}, 2, in[0]->ndim - 1) : NULL;
    return opcheck_matches(out, ref, 0, "add then rmsnorm", why, cap);
}
/* matmul_add_rmsnorm (inference only): [y | s] against add_rmsnorm(x, a @ b), bit for bit on
 * the host. */
static moe_tensor *run_matmul_add_rmsnorm(moe_tensor **in) {
    moe_tensor *s = NULL, *y = moe_matmul_add_rmsnorm(in[0], in[1], in[2], in[3], 1e-5, &s);
    return y && s ? moe_concat((moe_tensor *[]){y, s}, 2, in[0]->ndim - 1) : NULL;
}
static bool check_matmul_add_rmsnorm(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {
    moe_tensor *s = NULL, *y = moe_add_rmsnorm(in[0], moe_matmul(in[1], in[2]), in[3], 1e-5, &s);
    moe_tensor *ref = y ? moe_concat((moe_tensor *[]){y, s}, 2, in[0]->ndim - 1) : NULL;
    return opcheck_matches(out, ref, 0, "matmul then add_rmsnorm", why, cap);
}
static moe_tensor *run_layernorm_noparams(moe_tensor **in) { return moe_layernorm(in[0], NULL, NULL, 1e-5); }
static moe_tensor *run_layernorm_bias_only(moe_tensor **in) { return moe_layernorm(in[0], NULL, in[1], 1e-5); }

#define X(nd, tr, ...) {nd, {__VA_ARGS__}, IN_NORMAL, 0, true, tr}
#define P(d) {1, {d}, IN_POSITIVE, 0, true, false}
#define V(d) {1, {d}, IN_NORMAL, 0, true, false}
#define N(nd, ...) {nd, {__VA_ARGS__}, IN_NORMAL, 0, false, false}
#define NP(d) {1, {d}, IN_POSITIVE, 0, false, false}

static const op_case cases[] = {
    {"softmax", "3x5", 1, {X(2, false, 3, 5)}, run_softmax},
    {"softmax", "2x3x4 transposed", 1, {X(3, true, 2, 3, 4)}, run_softmax},
    {"log_softmax", "3x5", 1, {X(2, false, 3, 5)}, run_log_softmax},
    {"log_softmax", "4x6 transposed", 1, {X(2, true, 4, 6)}, run_log_softmax},
    {"logsumexp", "4x5 transposed", 1, {X(2, true, 4, 5)}, run_logsumexp},
    {"logsumexp", "1-D to scalar", 1, {X(1, false, 7)}, run_logsumexp},
    {"rmsnorm", "3x8 with weight", 2, {X(2, false, 3, 8), P(8)}, run_rmsnorm},
    {"rmsnorm", "2x6x3 transposed", 2, {X(3, true, 2, 6, 3), V(3)}, run_rmsnorm},
    {"rmsnorm", "no weight", 1, {X(2, false, 4, 6)}, run_rmsnorm_now},
    {"rmsnorm", "2x3x8 columns of wider rows (read in place)", 2, {X(3, false, 2, 3, 12), P(8)}, run_rmsnorm_cols},
    {"rmsnorm", "520x2 (cuda: weight grad summed over row chunks)", 2, {X(2, false, 520, 2), P(2)}, run_rmsnorm},
    {"add_rmsnorm", "3x8 (cuda: element loads)", 3, {N(2, 3, 8), N(2, 3, 8), NP(8)}, run_add_rmsnorm,
     .check = check_add_rmsnorm},
    {"add_rmsnorm", "2x3x64 (cuda: 16-byte loads)", 3, {N(3, 2, 3, 64), N(3, 2, 3, 64), NP(64)}, run_add_rmsnorm,
     .check = check_add_rmsnorm},
    {"matmul_add_rmsnorm", "3 rows, K = 40, d = 24 (cuda: one block, the last adds and normalises)", 4,
     {N(2, 3, 24), N(2, 3, 40), N(2, 40, 24), NP(24)}, run_matmul_add_rmsnorm, .check = check_matmul_add_rmsnorm},
    {"matmul_add_rmsnorm", "1x2 rows of [.., 2, K = 300], d = 136 (cuda: three column tiles, two splits)", 4,
     {N(3, 1, 2, 136), N(3, 1, 2, 300), N(2, 300, 136), NP(136)}, run_matmul_add_rmsnorm,
     .check = check_matmul_add_rmsnorm},
    {"matmul_add_rmsnorm", "6 rows, d = 20 (cuda: the product, then add_rmsnorm)", 4,
     {N(2, 6, 20), N(2, 6, 32), N(2, 32, 20), NP(20)}, run_matmul_add_rmsnorm, .check = check_matmul_add_rmsnorm},
    {"matmul_add_rmsnorm", "2x3 rows of [.., K = 40], d = 16 (cuda: the product of the rows as one matrix)", 4,
     {N(3, 2, 3, 16), N(3, 2, 3, 40), N(2, 40, 16), NP(16)}, run_matmul_add_rmsnorm, .check = check_matmul_add_rmsnorm},
    {"matmul_add_rmsnorm", "1 row, K = d = 2048 (cuda: 32 column tiles of 9 splits)", 4,
     {N(2, 1, 2048), N(2, 1, 2048), N(2, 2048, 2048), NP(2048)}, run_matmul_add_rmsnorm,
     .check = check_matmul_add_rmsnorm},
    {"layernorm", "520x8 with weight and bias (row chunks; width 2 would make dx ~0, all rounding)", 3, {X(2, false, 520, 8), P(8), V(8)}, run_layernorm, .grad_samples = 300},
    {"layernorm", "3x8 with weight and bias", 3, {X(2, false, 3, 8), P(8), V(8)}, run_layernorm},
    {"layernorm", "2x4x5 transposed", 3, {X(3, true, 2, 4, 5), V(5), V(5)}, run_layernorm},
    {"layernorm", "no parameters", 1, {X(2, false, 4, 6)}, run_layernorm_noparams},
    {"layernorm", "5x8 columns of wider rows (read in place)", 3, {X(2, false, 5, 12), P(8), V(8)}, run_layernorm_cols},
    {"layernorm", "bias only", 2, {X(2, true, 5, 4), V(4)}, run_layernorm_bias_only},
};

const op_case_list cases_norm = {cases, sizeof cases / sizeof *cases};
