/* Op cases: index family (embedding, row select / add, gather / scatter-add, top-k) and
 * the integer routing ops (argsort, bincount, cumsum, route_plan) and the fused router selection
 * (route_topk, route_select) checked against references. */
#include <assert.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "tests/harness/opcheck.h"

static moe_tensor *run_embedding(moe_tensor **in) { return moe_embedding(in[0], in[1]); }
static moe_tensor *run_index_select(moe_tensor **in) { return moe_index_select(in[0], in[1]); }
static moe_tensor *run_index_add(moe_tensor **in) { return moe_index_add(in[0], in[1], in[2]); }
/* y [6, d] rows, w [4, 2]: tokens 1 and 3 lost their second assignment; every row of y
 * is named once, in a shuffled order. */
static const int32_t combine_src[8] = {0, 3, 5, -1, 1, 2, 4, -1};
static moe_tensor *run_combine(moe_tensor **in) {
    moe_tensor *s = moe_tensor_from_host(MOE_LIFE_STEP, in[0]->device, MOE_I32, 2, (int64_t[]){4, 2}, combine_src);
    return moe_combine(in[0], in[1], s);
}
/* The dispatch of the same assignment: x [4, d] -> 6 rows, tok[i] = the token of row i. */
static moe_tensor *run_dispatch(moe_tensor **in) {
    static const int32_t tok[6] = {0, 2, 2, 0, 3, 1};
    moe_tensor *t = moe_tensor_from_host(MOE_LIFE_STEP, in[0]->device, MOE_I32, 1, (int64_t[]){6}, tok);
    moe_tensor *s = moe_tensor_from_host(MOE_LIFE_STEP, in[0]->device, MOE_I32, 2, (int64_t[]){4, 2}, combine_src);
    return moe_dispatch(in[0], t, s);
}
static moe_tensor *run_gather(moe_tensor **in) { return moe_gather(in[0], in[1]); }
static moe_tensor *run_scatter_add(moe_tensor **in) { return moe_scatter_add(in[0], in[1], in[2]); }
static moe_tensor *run_topk3(moe_tensor **in) { return moe_topk(in[0], 3, NULL); }
static moe_tensor *run_topk_all(moe_tensor **in) { return moe_topk(in[0], 6, NULL); }
static moe_tensor *run_topk_large(moe_tensor **in) { return moe_topk(in[0], 20, NULL); }
static moe_tensor *run_argsort(moe_tensor **in) { return moe_argsort(in[0]); }
static moe_tensor *run_bincount(moe_tensor **in) { return moe_bincount(in[0], 9); }
static moe_tensor *run_cumsum_incl(moe_tensor **in) { return moe_cumsum(in[0], false); }
static moe_tensor *run_cumsum_excl(moe_tensor **in) { return moe_cumsum(in[0], true); }
/* route_plan's three outputs as one [tok (n) | src (n) | offsets (E + 1)] */
static moe_tensor *run_route_plan(moe_tensor **in, int64_t E) {
    moe_tensor *src, *offsets, *tok = moe_route_plan(in[0], E, &src, &offsets);
    if (!tok) return NULL;
    moe_tensor *parts[3] = {tok, moe_reshape(src, 1, (int64_t[]){moe_tensor_numel(src)}), offsets};
    return moe_concat(parts, 3, 0);
}
static moe_tensor *run_route_plan12(moe_tensor **in) { return run_route_plan(in, 12); }
static moe_tensor *run_route_plan64(moe_tensor **in) { return run_route_plan(in, 64); }

/* Host copies of an input and the output; the caller frees both. */
static bool host_pair(moe_tensor *x, moe_tensor *out, double **hx, double **ho) {
    *hx = malloc(sizeof(double) * (size_t)(moe_tensor_numel(x) + 1));
    *ho = malloc(sizeof(double) * (size_t)(moe_tensor_numel(out) + 1));
    return moe_tensor_to_host_f64(x, *hx) == MOE_OK && moe_tensor_to_host_f64(out, *ho) == MOE_OK;
}

/* Reference: stable ascending positions of each row by insertion sort. */
static bool check_argsort(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {
    double *x, *o;
    bool ok = host_pair(in[0], out, &x, &o) && moe_tensor_same_shape(in[0], out) && out->dtype == MOE_I32;
    int64_t n = in[0]->shape[in[0]->ndim - 1], rows = n ? moe_tensor_numel(in[0]) / n : 0;
    int *ref = malloc(sizeof(int) * (size_t)(n + 1));
    for (int64_t r = 0; ok && r < rows; r++) {
        const double *key = x + r * n;
        for (int64_t i = 0; i < n; i++) {
            int64_t j = i;
            while (j > 0 && key[ref[j - 1]] > key[i]) {
                ref[j] = ref[j - 1];
                j--;
            }
            ref[j] = (int)i;
        }
        for (int64_t i = 0; ok && i < n; i++) {
            if (o[r * n + i] != ref[i]) {
                snprintf(why, cap, "row %lld position %lld: got %g, want %d", (long long)r, (long long)i, o[r * n + i], ref[i]);
                ok = false;
            }
        }
    }
    if (!ok && !why[0]) snprintf(why, cap, "output has the wrong shape or dtype");
    free(ref);
    free(x);
    free(o);
    return ok;
}

static bool check_bincount(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {
    double *x, *o;
    bool ok = host_pair(in[0], out, &x, &o) && out->ndim == 1 && out->shape[0] == 9 && out->dtype == MOE_I32;
    int ref[9] = {0};
    for (int64_t i = 0; i < moe_tensor_numel(in[0]); i++) ref[(int)x[i]]++;
    for (int b = 0; ok && b < 9; b++) {
        if (o[b] != ref[b]) {
            snprintf(why, cap, "bin %d: got %g, want %d", b, o[b], ref[b]);
            ok = false;
        }
    }
    if (!ok && !why[0]) snprintf(why, cap, "output has the wrong shape or dtype");
    free(x);
    free(o);
    return ok;
}

static bool check_cumsum(moe_tensor **in, moe_tensor *out, bool exclusive, char *why, size_t cap) {
    double *x, *o;
    bool ok = host_pair(in[0], out, &x, &o) && moe_tensor_same_shape(in[0], out) && out->dtype == MOE_I32;
    double acc = 0;
    for (int64_t i = 0; ok && i < moe_tensor_numel(in[0]); i++) {
        double want = exclusive ? acc : acc + x[i];
        acc += x[i];
        if (o[i] != want) {
            snprintf(why, cap, "position %lld: got %g, want %g", (long long)i, o[i], want);
            ok = false;
        }
    }
    if (!ok && !why[0]) snprintf(why, cap, "output has the wrong shape or dtype");
    free(x);
    free(o);
    return ok;
}
static bool check_cumsum_incl(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {
    return check_cumsum(in, out, false, why, cap);
}
static bool check_cumsum_excl(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {
    return check_cumsum(in, out, true, why, cap);
}

/* Reference: each expert's assignments in order, tok the token (i / k), src the position. */
static bool check_route_plan(moe_tensor **in, moe_tensor *out, int64_t E, char *why, size_t cap) {
    double *x, *o;
    int64_t n = moe_tensor_numel(in[0]), k = in[0]->shape[1];
    bool ok = host_pair(in[0], out, &x, &o) && out->ndim == 1 && out->shape[0] == 2 * n + E + 1 && out->dtype == MOE_I32;
    int64_t at = 0;
    for (int64_t e = 0; ok && e < E; e++) {
        if (o[2 * n + e] != at) snprintf(why, cap, "offset of expert %lld: got %g, want %lld", (long long)e, o[2 * n + e], (long long)at);
        for (int64_t i = 0; ok && !why[0] && i < n; i++) {
            if (x[i] != e) continue;
            if (o[at] != i / k || o[n + i] != at)
                snprintf(why, cap, "assignment %lld (expert %lld): tok %g, src %g; want %lld, %lld", (long long)i,
                         (long long)e, o[at], o[n + i], (long long)(i / k), (long long)at);
            at++;
        }
        ok = !why[0];
    }
    if (ok && o[2 * n + E] != n) snprintf(why, cap, "last offset %g, want %lld", o[2 * n + E], (long long)n);
    ok = ok && !why[0];
    if (!ok && !why[0]) snprintf(why, cap, "output has the wrong shape or dtype");
    free(x);
    free(o);
    return ok;
}
static bool check_route_plan12(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {
    return check_route_plan(in, out, 12, why, cap);
}
static bool check_route_plan64(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {
    return check_route_plan(in, out, 64, why, cap);
}

#define F(nd, ...) {nd, {__VA_ARGS__}, IN_NORMAL, 0, true, false}
#define FT(nd, ...) {nd, {__VA_ARGS__}, IN_NORMAL, 0, true, true}
#define IDX(hi, nd, ...) {nd, {__VA_ARGS__}, IN_INDEX, hi, false, false}
#define NOGRAD(nd, ...) {nd, {__VA_ARGS__}, IN_NORMAL, 0, false, false}
#define IDXT(hi, nd, ...) {nd, {__VA_ARGS__}, IN_INDEX, hi, false, true}
#define DIST(nd, ...) {nd, {__VA_ARGS__}, IN_DISTINCT, 0, true, false}
#define DISTT(nd, ...) {nd, {__VA_ARGS__}, IN_DISTINCT, 0, true, true}

/* route_topk's gates and ids side by side ([T, 2k]: the ids as floats) for the checks. */
static moe_tensor *route_pair(moe_tensor *logits, moe_tensor *bias, moe_route_spec sp) {
    moe_tensor *ids, *g = moe_route_topk(logits, bias, &sp, &ids);
    return g ? moe_concat((moe_tensor *[]){g, moe_cast(ids, g->dtype)}, 2, 1) : NULL;
}
static moe_tensor *run_route_softmax(moe_tensor **in) {
    return route_pair(in[0], NULL, (moe_route_spec){.k = 2, .renormalize = true});
}
static moe_tensor *run_route_sigmoid(moe_tensor **in) {
    return route_pair(in[0], in[1], (moe_route_spec){.k = 3, .sigmoid = true, .renormalize = true, .scale = 2.5});
}
static moe_tensor *run_route_plain(moe_tensor **in) { return route_pair(in[0], NULL, (moe_route_spec){.k = 1}); }
static moe_tensor *run_route_wide(moe_tensor **in) {
    return route_pair(in[0], NULL, (moe_route_spec){.k = 36, .renormalize = true});
}

/* The host reference of route_pair's [T, 2k] for a spec (see moe_route_topk). */
#define ROUTE_MAX_K 64
static bool check_route(moe_tensor **in, moe_tensor *out, moe_route_spec sp, bool with_bias, char *why, size_t cap) {
    assert(sp.k <= ROUTE_MAX_K);
    int64_t T = in[0]->shape[0], E = in[0]->shape[1], k = sp.k;
    double *lg = malloc(sizeof(double) * (size_t)(T * E)), *b = malloc(sizeof(double) * (size_t)E),
           *o = malloc(sizeof(double) * (size_t)(T * 2 * k)), *p = malloc(sizeof(double) * (size_t)E);
    bool ok = out->ndim == 2 && out->shape[0] == T && out->shape[1] == 2 * k &&
              moe_tensor_to_host_f64(in[0], lg) == MOE_OK && moe_tensor_to_host_f64(out, o) == MOE_OK &&
              (!with_bias || moe_tensor_to_host_f64(in[1], b) == MOE_OK);
    if (!ok) snprintf(why, cap, "output has the wrong shape, or a tensor could not be read");
    for (int64_t t = 0; ok && t < T; t++) {
        double mx = -INFINITY, sum = 0, total = 0, g[ROUTE_MAX_K];
        int id[ROUTE_MAX_K];
        for (int64_t e = 0; e < E; e++) mx = fmax(mx, lg[t * E + e]);
        for (int64_t e = 0; e < E; e++) sum += exp(lg[t * E + e] - mx);
        for (int64_t e = 0; e < E; e++)
            p[e] = sp.sigmoid ? 1 / (1 + exp(-lg[t * E + e])) : exp(lg[t * E + e] - mx) / sum;
        for (int j = 0; j < k; j++) { /* the best not taken yet, ties to the lower index */
            id[j] = -1;
            for (int e = 0; e < E; e++) {
                bool taken = false;
                for (int q = 0; q < j; q++) taken = taken || id[q] == e;
                double v = p[e] + (with_bias ? b[e] : 0);
                if (!taken && (id[j] < 0 || v > p[id[j]] + (with_bias ? b[id[j]] : 0))) id[j] = e;
            }
            g[j] = p[id[j]];
            total += g[j];
        }
        for (int j = 0; ok && j < k; j++) {
            double want = (sp.renormalize ? g[j] / total : g[j]) * (sp.scale > 0 ? sp.scale : 1);
            if (o[t * 2 * k + k + j] != id[j] || fabs(o[t * 2 * k + j] - want) > 1e-12) {
                snprintf(why, cap, "token %lld pick %d: got expert %g gate %.15g, want %d and %.15g", (long long)t, j,
                         o[t * 2 * k + k + j], o[t * 2 * k + j], id[j], want);
                ok = false;
            }
        }
    }
    free(lg), free(b), free(o), free(p);
    return ok;
}
static bool check_route_softmax(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {
    return check_route(in, out, (moe_route_spec){.k = 2, .renormalize = true}, false, why, cap);
}
static bool check_route_sigmoid(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {
    return check_route(in, out, (moe_route_spec){.k = 3, .sigmoid = true, .renormalize = true, .scale = 2.5}, true, why,
                       cap);
}
static bool check_route_plain(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {
    return check_route(in, out, (moe_route_spec){.k = 1}, false, why, cap);
}
static bool check_route_wide(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {
    return check_route(in, out, (moe_route_spec){.k = 36, .renormalize = true}, false, why, cap);
}

/* route_select's pair against the host reference of route_topk on x @ w computed in f64. */
static moe_tensor *route_select_pair(moe_tensor **in, moe_tensor *bias, moe_route_spec sp) {
    moe_tensor *ids, *g = moe_route_select(in[0], in[1], bias, &sp, &ids);
    return g ? moe_concat((moe_tensor *[]){g, moe_cast(ids, g->dtype)}, 2, 1) : NULL;
}
static moe_tensor *run_select_softmax(moe_tensor **in) {
    return route_select_pair(in, NULL, (moe_route_spec){.k = 2, .renormalize = true});
}
static moe_tensor *run_select_sigmoid(moe_tensor **in) {
    return route_select_pair(in, in[2], (moe_route_spec){.k = 3, .sigmoid = true, .renormalize = true, .scale = 2.5});
}
static moe_tensor *run_select_olmoe(moe_tensor **in) {
    return route_select_pair(in, NULL, (moe_route_spec){.k = 8});
}
static bool check_select(moe_tensor **in, moe_tensor *out, moe_route_spec sp, bool with_bias, char *why, size_t cap) {
    moe_tensor *logits = moe_matmul(in[0], in[1]);
    if (!logits) {
        snprintf(why, cap, "reference logits failed: %s", moe_last_error());
        return false;
    }
    return check_route((moe_tensor *[]){logits, with_bias ? in[2] : NULL}, out, sp, with_bias, why, cap);
}
static bool check_select_softmax(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {
    return check_select(in, out, (moe_route_spec){.k = 2, .renormalize = true}, false, why, cap);
}
static bool check_select_sigmoid(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {
    return check_select(in, out, (moe_route_spec){.k = 3, .sigmoid = true, .renormalize = true, .scale = 2.5}, true,
                        why, cap);
}
static bool check_select_olmoe(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {
    return check_select(in, out, (moe_route_spec){.k = 8}, false, why, cap);
}

static const op_case cases[] = {
    {"embedding", "table 7x4, ids 2x5", 2, {F(2, 7, 4), IDX(7, 2, 2, 5)}, run_embedding},
    {"embedding", "transposed table, transposed ids", 2, {FT(2, 6, 3), IDXT(6, 2, 3, 4)}, run_embedding},
    {"index_select", "3-D rows with repeats", 2, {F(3, 5, 2, 3), IDX(5, 1, 9)}, run_index_select},
    {"index_select", "transposed x", 2, {FT(2, 6, 4), IDX(6, 1, 7)}, run_index_select},
    {"index_select", "rows of 16 (cuda: 16-byte units in f32 and bf16)", 2, {F(2, 6, 16), IDX(6, 1, 9)}, run_index_select},
    {"dispatch", "4 tokens of d=5 to 6 rows, two slots dropped", 1, {F(2, 4, 5)}, run_dispatch},
    {"dispatch", "d=24, transposed x", 1, {FT(2, 4, 24)}, run_dispatch},
    {"combine", "6 rows of d=5 to 4 tokens, two dropped", 2, {F(2, 6, 5), F(2, 4, 2)}, run_combine},
    {"combine", "d=24, transposed y", 2, {FT(2, 6, 24), F(2, 4, 2)}, run_combine},
    {"combine", "d=300: two column tiles on cuda", 2, {F(2, 6, 300), F(2, 4, 2)}, run_combine},
    {"combine", "d=2056: 8 columns a thread over two column tiles on cuda", 2, {F(2, 6, 2056), F(2, 4, 2)}, run_combine,
     .grad_samples = 300},
    {"index_add", "duplicate targets", 3, {F(2, 4, 3), IDX(4, 1, 10), F(2, 10, 3)}, run_index_add},
    {"index_add", "transposed x and src", 3, {FT(2, 5, 4), IDX(5, 1, 6), FT(2, 6, 4)}, run_index_add},
    {"gather", "3-D, repeated picks", 2, {F(3, 2, 3, 5), IDX(5, 3, 2, 3, 7)}, run_gather},
    {"gather", "transposed x and idx", 2, {FT(2, 4, 6), IDXT(6, 2, 4, 5)}, run_gather},
    {"scatter_add", "duplicate targets", 3, {F(2, 3, 5), IDX(5, 2, 3, 8), F(2, 3, 8)}, run_scatter_add},
    {"scatter_add", "transposed x and src", 3, {FT(2, 4, 6), IDX(6, 2, 4, 5), FT(2, 4, 5)}, run_scatter_add},
    {"topk", "router 5x8, k = 3", 1, {DIST(2, 5, 8)}, run_topk3},
    {"topk", "transposed 3-D, k = n", 1, {DISTT(3, 2, 4, 6)}, run_topk_all},
    {"topk", "sort path 3x40, k = 20", 1, {DIST(2, 3, 40)}, run_topk_large},
    {"route_topk", "softmax, 5 tokens of 8 experts, k = 2, renormalised", 1, {NOGRAD(2, 5, 8)}, run_route_softmax,
     .check = check_route_softmax, .f32_parity_only = true},
    {"route_topk", "sigmoid + bias, 4 tokens of 40 experts, k = 3, renormalised, scale 2.5", 2,
     {NOGRAD(2, 4, 40), NOGRAD(1, 40)}, run_route_sigmoid, .check = check_route_sigmoid, .f32_parity_only = true},
    {"route_topk", "softmax, 3 tokens of 6 experts, k = 1, plain", 1, {NOGRAD(2, 3, 6)}, run_route_plain,
     .check = check_route_plain, .f32_parity_only = true},
    {"route_topk", "softmax, 3 tokens of 100 experts, k = 2 (cuda: 4 logits a lane in registers)", 1,
     {NOGRAD(2, 3, 100)}, run_route_softmax, .check = check_route_softmax, .f32_parity_only = true},
    {"route_topk", "softmax, 2 tokens of 64 experts, k = 36 (cuda: more picks than lanes, gates from memory)", 1,
     {NOGRAD(2, 2, 64)}, run_route_wide, .check = check_route_wide, .f32_parity_only = true},
    {"route_topk", "softmax, 3 tokens of 160 experts, k = 2 (cuda: the row read from memory each round)", 1,
     {NOGRAD(2, 3, 160)}, run_route_softmax, .check = check_route_softmax, .f32_parity_only = true},
    {"route_topk", "softmax, 8 tokens of 8 experts on a grid of 1/32 (exact in bf16: also runs in bf16 on cuda)", 1,
     {{2, {8, 8}, IN_DISTINCT, 0, false, false}}, run_route_softmax, .check = check_route_softmax},
    {"route_select", "3 tokens, d = 40, 8 experts, k = 2 (cuda: one block projects and selects)", 2,
     {NOGRAD(2, 3, 40), NOGRAD(2, 40, 8)}, run_select_softmax, .check = check_select_softmax, .f32_parity_only = true},
    {"route_select", "sigmoid + bias, 4 tokens, d = 300, 72 experts (cuda: two column tiles, two splits)", 3,
     {NOGRAD(2, 4, 300), NOGRAD(2, 300, 72), NOGRAD(1, 72)}, run_select_sigmoid, .check = check_select_sigmoid,
     .f32_parity_only = true},
    {"route_select", "6 tokens, d = 64, 16 experts (cuda: the product, then route_topk)", 2,
     {NOGRAD(2, 6, 64), NOGRAD(2, 64, 16)}, run_select_softmax, .check = check_select_softmax, .f32_parity_only = true},
    {"route_select", "1 token, d = 2048, 64 experts, k = 8 (cuda: 16 splits, the last selects)", 2,
     {NOGRAD(2, 1, 2048), NOGRAD(2, 2048, 64)}, run_select_olmoe, .check = check_select_olmoe, .f32_parity_only = true},
    {"argsort", "i32 keys with ties (counting sort)", 1, {IDX(4, 2, 4, 25)}, run_argsort, .check = check_argsort},
    {"argsort", "i32 keys, wide range (merge sort)", 1, {IDX(1000000, 1, 120)}, run_argsort, .check = check_argsort},
    {"argsort", "float keys", 1, {{2, {3, 50}, IN_NORMAL, 0, false, false}}, run_argsort, .check = check_argsort,
     .f32_parity_only = true},
    {"bincount", "60 values in 9 bins", 1, {IDX(9, 1, 60)}, run_bincount, .check = check_bincount},
    {"cumsum", "inclusive", 1, {IDX(10, 1, 30)}, run_cumsum_incl, .check = check_cumsum_incl},
    {"cumsum", "exclusive", 1, {IDX(10, 1, 30)}, run_cumsum_excl, .check = check_cumsum_excl},
    {"route_plan", "8 tokens x 3 of 12 experts, ids below 9 (empty experts)", 1, {IDX(9, 2, 8, 3)}, run_route_plan12,
     .check = check_route_plan12},
    {"route_plan", "700 tokens x 8 of 64 experts (cuda: several chunks a block)", 1, {IDX(64, 2, 700, 8)},
     run_route_plan64, .check = check_route_plan64},
};

const op_case_list cases_index = {cases, sizeof cases / sizeof *cases};
