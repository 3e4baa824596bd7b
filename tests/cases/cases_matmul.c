/* Op cases: matmul (2-D, batched, shared right operand, transposed views), grouped matmul,
 * gathered SwiGLU experts with their combine (inference only: checked against a host
 * reference). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "tests/harness/opcheck.h"

static moe_tensor *run_mm(moe_tensor **in) { return moe_matmul(in[0], in[1]); }
static moe_tensor *run_grouped(moe_tensor **in) {
    /* 7 rows over 3 experts: 3, 0 (empty expert), 4 */
    return moe_grouped_matmul(in[0], in[1], (int64_t[]){0, 3, 3, 7});
}

static moe_tensor *run_gathered(moe_tensor **in) { return moe_gathered_swiglu(in[0], in[1], in[2], in[3], in[4]); }

/* Row t of the output against sum over j of gates[t, j] * swiglu(x[t] @ w13[e]) @ w2[e],
 * e = ids[t, j], in f64. */
static bool check_gathered(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {
    int64_t T = in[0]->shape[0], d = in[0]->shape[1], k = in[1]->shape[1], E = in[3]->shape[0], f = in[4]->shape[1];
    double *x = malloc(sizeof(double) * (size_t)(T * d)), *id = malloc(sizeof(double) * (size_t)(T * k)),
           *g = malloc(sizeof(double) * (size_t)(T * k)), *w13 = malloc(sizeof(double) * (size_t)(E * d * 2 * f)),
           *w2 = malloc(sizeof(double) * (size_t)(E * f * d)), *o = malloc(sizeof(double) * (size_t)(T * d)),
           *y = calloc((size_t)d, sizeof(double)), *h = malloc(sizeof(double) * (size_t)(2 * f));
    bool ok = out->ndim == 2 && out->shape[0] == T && out->shape[1] == d && moe_tensor_to_host_f64(in[0], x) == MOE_OK &&
              moe_tensor_to_host_f64(in[1], id) == MOE_OK && moe_tensor_to_host_f64(in[2], g) == MOE_OK &&
              moe_tensor_to_host_f64(in[3], w13) == MOE_OK && moe_tensor_to_host_f64(in[4], w2) == MOE_OK &&
              moe_tensor_to_host_f64(out, o) == MOE_OK;
    if (!ok) snprintf(why, cap, "output has the wrong shape, or a tensor could not be read");
    for (int64_t t = 0; ok && t < T; t++) {
        for (int64_t c = 0; c < d; c++) y[c] = 0;
        for (int64_t p = t * k; p < (t + 1) * k; p++) {
            const double *we13 = w13 + (int64_t)id[p] * d * 2 * f, *we2 = w2 + (int64_t)id[p] * f * d, *xt = x + t * d;
            for (int64_t c = 0; c < 2 * f; c++) {
                h[c] = 0;
                for (int64_t i = 0; i < d; i++) h[c] += xt[i] * we13[i * 2 * f + c];
            }
            for (int64_t c = 0; c < f; c++) h[c] = h[c] / (1 + exp(-h[c])) * h[f + c];
            for (int64_t j = 0; j < d; j++) {
                double r = 0;
                for (int64_t c = 0; c < f; c++) r += h[c] * we2[c * d + j];
                y[j] += g[p] * r;
            }
        }
        for (int64_t j = 0; ok && j < d; j++)
            if (fabs(y[j] - o[t * d + j]) > 1e-10 * (1 + fabs(y[j]))) {
                snprintf(why, cap, "row %lld column %lld: got %.12g, want %.12g", (long long)t, (long long)j,
                         o[t * d + j], y[j]);
                ok = false;
            }
    }
    free(x), free(id), free(g), free(w13), free(w2), free(o), free(y), free(h);
    return ok;
}

#define N(nd, ...) {nd, {__VA_ARGS__}, IN_NORMAL, 0, false, false}
#define IDX(hi, nd, ...) {nd, {__VA_ARGS__}, IN_INDEX, hi, false, false}

static const op_case cases[] = {
    {"matmul", "2-d", 2, {{2, {3, 4}, IN_NORMAL, 0, true, false}, {2, {4, 5}, IN_NORMAL, 0, true, false}}, run_mm},
    {"matmul", "transposed operands", 2, {{2, {3, 4}, IN_NORMAL, 0, true, true}, {2, {4, 5}, IN_NORMAL, 0, true, true}}, run_mm},
    {"matmul", "batched", 2, {{3, {2, 3, 4}, IN_NORMAL, 0, true, false}, {3, {2, 4, 2}, IN_NORMAL, 0, true, true}}, run_mm},
    {"matmul", "batched @ shared 2-d", 2, {{3, {2, 3, 4}, IN_NORMAL, 0, true, false}, {2, {4, 3}, IN_NORMAL, 0, true, false}}, run_mm},
    {"matmul", "a decode row [1, 384] @ [384, 136] (cuda: skinny, 3 splits of the rows)", 2,
     {{2, {1, 384}, IN_NORMAL, 0, true, false}, {2, {384, 136}, IN_NORMAL, 0, true, false}}, run_mm, .grad_samples = 200},
    {"matmul", "[3, 40] @ [40, 64] (cuda: skinny, one split)", 2,
     {{2, {3, 40}, IN_NORMAL, 0, true, false}, {2, {40, 64}, IN_NORMAL, 0, true, false}}, run_mm, .grad_samples = 200},
    {"matmul", "[2, 2, 256] @ shared [256, 16] (cuda: skinny over both batches, 2 splits)", 2,
     {{3, {2, 2, 256}, IN_NORMAL, 0, true, false}, {2, {256, 16}, IN_NORMAL, 0, true, false}}, run_mm, .grad_samples = 200},
    {"grouped_matmul", "3 experts, one empty", 2, {{2, {7, 4}, IN_NORMAL, 0, true, false}, {3, {3, 4, 5}, IN_NORMAL, 0, true, false}}, run_grouped},
    {"gathered_swiglu", "3 tokens x 2 of 4 experts, d 5, f 3 (unaligned)", 5,
     {N(2, 3, 5), IDX(4, 2, 3, 2), N(2, 3, 2), N(3, 4, 5, 6), N(3, 4, 3, 5)}, run_gathered, .check = check_gathered},
    {"gathered_swiglu", "2 tokens x 3 of 5 experts, d 136, f 72 (16-byte rows, a partial tile)", 5,
     {N(2, 2, 136), IDX(5, 2, 2, 3), N(2, 2, 3), N(3, 5, 136, 144), N(3, 5, 72, 136)}, run_gathered, .check = check_gathered},
    {"gathered_swiglu", "16 tokens x 2 of 4 experts, d 576, f 576 (cuda: 288 blocks a pass)", 5,
     {N(2, 16, 576), IDX(4, 2, 16, 2), N(2, 16, 2), N(3, 4, 576, 1152), N(3, 4, 576, 576)}, run_gathered,
     .check = check_gathered},
    {"gathered_swiglu", "40 tokens x 2 of 4 experts, d 2056, f 16 (cuda: 40 x 33 tiles, more than the backend's tickets)", 5,
     {N(2, 40, 2056), IDX(4, 2, 40, 2), N(2, 40, 2), N(3, 4, 2056, 32), N(3, 4, 16, 2056)}, run_gathered,
     .check = check_gathered},
};

const op_case_list cases_matmul = {cases, sizeof cases / sizeof *cases};
