/* Op cases: nn family (dropout, rope and rope_at, rope_append, attention, attention_varlen and
 * attention_paged, cut cross-entropy). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "tests/harness/opcheck.h"

static moe_tensor *run_dropout(moe_tensor **in) { return moe_dropout(in[0], 0.3, 1234, 5); }
static moe_tensor *run_rope(moe_tensor **in) { return moe_rope(in[0], 3, 100.0); }
static moe_tensor *run_attention_causal(moe_tensor **in) { return moe_attention(in[0], in[1], in[2], true); }
static moe_tensor *run_attention_full(moe_tensor **in) { return moe_attention(in[0], in[1], in[2], false); }

/* rope_at over T = 5 tokens at restarting, unordered positions (two packed prompts). */
static moe_tensor *run_rope_at(moe_tensor **in) {
    const int32_t pos[5] = {4, 0, 1, 2, 9};
    return moe_rope_at(in[0], moe_tensor_from_host(MOE_LIFE_STEP, in[0]->device, MOE_I32, 1, (int64_t[]){5}, pos),
                       100.0);
}

/* rope_at at far positions (the angles reach 1.3e5 radians: the CUDA kernel's range
 * reduction before its single-precision sine and cosine). */
static moe_tensor *run_rope_far(moe_tensor **in) {
    const int32_t pos[5] = {131071, 70000, 4095, 99999, 1};
    return moe_rope_at(in[0], moe_tensor_from_host(MOE_LIFE_STEP, in[0]->device, MOE_I32, 1, (int64_t[]){5}, pos),
                       10000.0);
}

/* Segment layouts of attention_varlen (query offsets, key offsets). */
typedef struct {
    int n;
    int64_t q[5], k[5];
} seg_layout;
/* q 9 rows, k 12: qlen/klen 3/3, 1/4 (a decode step over a cache), 5/5 */
static const seg_layout SEG_UNEVEN = {3, {0, 3, 4, 9}, {0, 3, 7, 12}};
/* q 6 rows, k 9: 2/3, a segment of keys without queries 0/2, 4/4 */
static const seg_layout SEG_EMPTY_Q = {3, {0, 2, 2, 6}, {0, 3, 5, 9}};
/* q 100 rows, k 130: 70/70 (two tiles), 1/30, 29/30: the tensor-core tiles on CUDA */
static const seg_layout SEG_TILES = {3, {0, 70, 71, 100}, {0, 70, 100, 130}};

static moe_tensor *varlen(moe_tensor **in, const seg_layout *s, bool causal) {
    return moe_attention_varlen(in[0], in[1], in[2], s->q, s->k, s->n, causal);
}
static moe_tensor *run_varlen_uneven_causal(moe_tensor **in) { return varlen(in, &SEG_UNEVEN, true); }
static moe_tensor *run_varlen_uneven_full(moe_tensor **in) { return varlen(in, &SEG_UNEVEN, false); }
static moe_tensor *run_varlen_empty_q_causal(moe_tensor **in) { return varlen(in, &SEG_EMPTY_Q, true); }
static moe_tensor *run_varlen_tiles_full(moe_tensor **in) { return varlen(in, &SEG_TILES, false); }

/* q, k, v as unit-stride slices of one fused [B, T, H, 3 * hd] projection (hd = 4). */
static moe_tensor *run_attention_fused(moe_tensor **in) {
    return moe_attention(moe_slice(in[0], 3, 0, 4), moe_slice(in[0], 3, 4, 8), moe_slice(in[0], 3, 8, 12), true);
}

/* Head dims 64 and 128 (what the CUDA tensor-core kernels take in bf16) at a gradcheck
 * cost the f64 element-by-element differences can afford: q, k, v = x W with inputs x
 * [B, T, heads, 2] and fixed maps W [2, hd] (one per operand, N(0, 0.5^2)), so the
 * gradcheck and the parity test compare the grads through the rank-2 lift. The small W
 * keeps the scores soft: with N(0, 1) maps the bf16 rounding of the inputs alone moves
 * some of these grads by more than the 2e-2 bf16 parity tolerance. Gradcheck tolerance
 * 1e-5: the central differences of these larger losses carry about 1e-9 of rounding,
 * more than the default allows on their smallest grads. */
static moe_tensor *attention_lifted(moe_tensor **in, int64_t hd, bool causal, const seg_layout *segs) {
    moe_tensor *qkv[3];
    for (int i = 0; i < 3; i++) {
        moe_tensor *w = moe_tensor_randn(MOE_LIFE_STEP, in[i]->device, in[i]->dtype, 2, (int64_t[]){2, hd},
                                         101 + (uint64_t)i, 0, 0.5);
        qkv[i] = moe_matmul(in[i], w);
    }
    return segs ? varlen(qkv, segs, causal) : moe_attention(qkv[0], qkv[1], qkv[2], causal);
}
static moe_tensor *run_attention_hd64_causal(moe_tensor **in) { return attention_lifted(in, 64, true, NULL); }
static moe_tensor *run_attention_hd64_full(moe_tensor **in) { return attention_lifted(in, 64, false, NULL); }
static moe_tensor *run_attention_hd128_causal(moe_tensor **in) { return attention_lifted(in, 128, true, NULL); }
static moe_tensor *run_varlen_hd64_causal(moe_tensor **in) { return attention_lifted(in, 64, true, &SEG_TILES); }
static moe_tensor *run_varlen_hd128_causal(moe_tensor **in) { return attention_lifted(in, 128, true, &SEG_TILES); }
static moe_tensor *run_varlen_hd64_empty_q(moe_tensor **in) { return attention_lifted(in, 64, true, &SEG_EMPTY_Q); }

/* attention_paged (inference only): q [1, Tq, H, hd], pools [R, Hkv, hd], rows [Tk], checked
 * against attention_varlen on the keys gathered out of the pools. Layouts: decode steps
 * 1/5 1/9 1/2 (hd 6: rows too short for the CUDA kernel's 8-value loads); 3/40, an empty
 * segment and 1/68 (hd 128, 96 and 256); 1/600 and 2/600 (key runs the CUDA kernel splits over blocks); 20/24
 * and 1/6 (more queries than MOE_ATTENTION_PAGED_MAX_Q: the gathered route); two of them
 * again with the table on the device and a key bound far above their keys. */
static const seg_layout PAGED_DECODE = {3, {0, 1, 2, 3}, {0, 5, 14, 16}};
static const seg_layout PAGED_MIXED = {3, {0, 3, 3, 4}, {0, 40, 42, 110}};
static const seg_layout PAGED_LONG = {2, {0, 1, 3}, {0, 600, 1200}};
static const seg_layout PAGED_PREFILL = {2, {0, 20, 21}, {0, 24, 30}};

static moe_tensor *paged(moe_tensor **in, const seg_layout *s, bool causal) {
    return moe_attention_paged(in[0], in[1], in[2], in[3], s->q, s->k, s->n, causal);
}

static bool matches_reference(moe_tensor *out, moe_tensor *ref, const char *ref_name, char *why, size_t cap) {
    return opcheck_matches(out, ref, 1e-12, ref_name, why, cap);
}

/* out against attention_varlen(q, k_pool[rows], v_pool[rows]). */
static bool paged_check(moe_tensor **in, moe_tensor *out, const seg_layout *s, bool causal, char *why, size_t cap) {
    int64_t shape[4] = {1, in[3]->shape[0], in[1]->shape[1], in[1]->shape[2]};
    moe_tensor *k = moe_reshape(moe_index_select(in[1], in[3]), 4, shape);
    moe_tensor *v = moe_reshape(moe_index_select(in[2], in[3]), 4, shape);
    moe_tensor *ref = k && v ? moe_attention_varlen(in[0], k, v, s->q, s->k, s->n, causal) : NULL;
    return matches_reference(out, ref, "gathered keys", why, cap);
}

/* The reference of rope_append's q and k: moe_rope_at(moe_rmsnorm(x)) in f64, the norm over
 * all n heads of x [B, T, n, hd] (w [n hd]) or per head (w [hd]). */
static const int32_t NORM_ROPE_POS[5] = {7, 0, 3, 1000, 2};

static moe_tensor *norm_rope_pos(moe_tensor *x) {
    return moe_tensor_from_host(MOE_LIFE_STEP, x->device, MOE_I32, 1, (int64_t[]){x->shape[1]}, NORM_ROPE_POS);
}
static moe_tensor *norm_rope_ref(moe_tensor *x, moe_tensor *w, bool per_head) {
    int64_t shape[4] = {x->shape[0], x->shape[1], x->shape[2], x->shape[3]};
    moe_tensor *n = per_head ? moe_rmsnorm(x, w, 1e-5)
                             : moe_reshape(moe_rmsnorm(moe_reshape(x, 3, (int64_t[]){shape[0], shape[1], shape[2] * shape[3]}),
                                                       w, 1e-5), 4, shape);
    return moe_rope_at(n, norm_rope_pos(x), 10000.0);
}

/* rope_append (inference only) against rmsnorm then rope_at (rope_at alone without a norm)
 * and index_copy_: q, k, v are heads [0, 4), [4, 6), [6, 8) of in[0] [1, 5, 8, hd] (a fused
 * projection with 4 query and 2 key-value heads), k and v written into pools of 7 rows at
 * rows APPEND_ROWS; the result is q's output, then both pools, flattened. */
static const int32_t APPEND_ROWS[5] = {5, 0, 3, 6, 2};

static moe_tensor *flat(moe_tensor *x) { return x ? moe_reshape(moe_contiguous(x), 1, (int64_t[]){moe_tensor_numel(x)}) : NULL; }

/* x [1, 5, n, hd] written at APPEND_ROWS into pool [7, n, hd]. */
static moe_status append_rows(moe_tensor *pool, moe_tensor *x) {
    int64_t w = x->shape[2] * x->shape[3];
    moe_tensor *rows = moe_tensor_from_host(MOE_LIFE_STEP, x->device, MOE_I32, 1, (int64_t[]){5}, APPEND_ROWS);
    return moe_index_copy_(moe_reshape(pool, 2, (int64_t[]){7, w}), rows,
                           moe_reshape(moe_contiguous(x), 2, (int64_t[]){5, w}));
}

static moe_tensor *rope_append_case(moe_tensor **in, moe_qk_norm_mode norm, bool reference) {
    moe_tensor *x = in[0], *q = moe_slice(x, 2, 0, 4), *k = moe_slice(x, 2, 4, 6), *v = moe_slice(x, 2, 6, 8);
    int64_t pool_shape[3] = {7, 2, x->shape[3]};
    moe_tensor *kp = moe_tensor_zeros(MOE_LIFE_STEP, x->device, x->dtype, 3, pool_shape),
               *vp = moe_tensor_zeros(MOE_LIFE_STEP, x->device, x->dtype, 3, pool_shape), *qo;
    if (!kp || !vp) return NULL;
    if (reference) {
        moe_tensor *pos = norm_rope_pos(x), *ko;
        bool per_head = norm == MOE_QK_NORM_PER_HEAD;
        qo = norm == MOE_QK_NORM_NONE ? moe_rope_at(q, pos, 10000.0) : norm_rope_ref(q, in[1], per_head);
        ko = norm == MOE_QK_NORM_NONE ? moe_rope_at(k, pos, 10000.0) : norm_rope_ref(k, in[2], per_head);
        if (!ko || append_rows(kp, ko) != MOE_OK || append_rows(vp, v) != MOE_OK) return NULL;
    } else {
        moe_tensor *rows = moe_tensor_from_host(MOE_LIFE_STEP, x->device, MOE_I32, 1, (int64_t[]){5}, APPEND_ROWS);
        moe_rope_append_spec spec = {.norm = norm, .q_w = norm ? in[1] : NULL, .k_w = norm ? in[2] : NULL,
                                     .eps = 1e-5, .theta = 10000.0, .pos = norm_rope_pos(x)};
        qo = moe_rope_append(q, k, v, &spec, kp, vp, rows);
    }
    return moe_concat((moe_tensor *[]){flat(qo), flat(kp), flat(vp)}, 3, 0);
}
#define ROPE_APPEND_CASE(fn, norm)                                                                               \
    static moe_tensor *run_##fn(moe_tensor **in) { return rope_append_case(in, norm, false); }                  \
    static bool check_##fn(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {                           \
        return matches_reference(out, rope_append_case(in, norm, true), "rmsnorm, rope_at and index_copy_", why,  \
                                 cap);                                                                          \
    }
ROPE_APPEND_CASE(rope_append_heads, MOE_QK_NORM_PER_HEAD)
ROPE_APPEND_CASE(rope_append_all, MOE_QK_NORM_ALL)
ROPE_APPEND_CASE(rope_append_plain, MOE_QK_NORM_NONE)

#define PAGED_CASE(fn, layout, causal)                                                                          \
    static moe_tensor *run_##fn(moe_tensor **in) { return paged(in, &layout, causal); }                        \
    static bool check_##fn(moe_tensor **in, moe_tensor *out, char *why, size_t cap) {                           \
        return paged_check(in, out, &layout, causal, why, cap);                                                 \
    }
PAGED_CASE(paged_decode, PAGED_DECODE, true)
PAGED_CASE(paged_mixed, PAGED_MIXED, true)
PAGED_CASE(paged_long_causal, PAGED_LONG, true)
PAGED_CASE(paged_long_full, PAGED_LONG, false)
PAGED_CASE(paged_prefill, PAGED_PREFILL, true)

/* The same through moe_attention_paged_table with the segment table on the device and a
 * key bound far above the longest segment (a recorded decode step's grid: more splits
 * than keys need, each segment's split length from its own keys). */
static moe_tensor *paged_bound(moe_tensor **in, const seg_layout *s, bool causal, int64_t bound) {
    int32_t t[10];
    int64_t max_q = 0;
    for (int i = 0; i <= s->n; i++) t[i] = (int32_t)s->q[i], t[s->n + 1 + i] = (int32_t)s->k[i];
    for (int i = 0; i < s->n; i++) max_q = s->q[i + 1] - s->q[i] > max_q ? s->q[i + 1] - s->q[i] : max_q;
    moe_tensor *seg = moe_tensor_from_host(MOE_LIFE_STEP, in[0]->device, MOE_I32, 2, (int64_t[]){2, s->n + 1}, t);
    return seg ? moe_attention_paged_table(in[0], in[1], in[2], in[3], seg, max_q, bound, causal) : NULL;
}
static moe_tensor *run_paged_bound_long(moe_tensor **in) { return paged_bound(in, &PAGED_LONG, true, 1 << 16); }
static moe_tensor *run_paged_bound_decode(moe_tensor **in) { return paged_bound(in, &PAGED_DECODE, true, 4096); }

/* Targets of in[2] with row 2 set to -1 (ignored), vocabulary blocks of 8 rows so that
 * V = 37 spans five blocks, the last one partial. */
static moe_tensor *run_cross_entropy_block8(moe_tensor **in) {
    int32_t t[6];
    double tf[6];
    if (moe_tensor_to_host_f64(in[2], tf) != MOE_OK) return NULL;
    for (int i = 0; i < 6; i++) t[i] = i == 2 ? -1 : (int32_t)tf[i];
    moe_tensor *tg = moe_tensor_from_host(MOE_LIFE_STEP, in[2]->device, MOE_I32, 1, (int64_t[]){6}, t);
    moe_cross_entropy_set_block(8);
    moe_tensor *loss = moe_cross_entropy(in[0], in[1], tg);
    moe_cross_entropy_set_block(0);
    return loss;
}

static moe_tensor *run_cross_entropy(moe_tensor **in) { return moe_cross_entropy(in[0], in[1], in[2]); }

#define F(nd, ...) {nd, {__VA_ARGS__}, IN_NORMAL, 0, true, false}
#define FT(nd, ...) {nd, {__VA_ARGS__}, IN_NORMAL, 0, true, true}
#define N(nd, ...) {nd, {__VA_ARGS__}, IN_NORMAL, 0, false, false}
#define ROWS(hi, n) {1, {n}, IN_INDEX, hi, false, false}
#define NP(d) {1, {d}, IN_POSITIVE, 0, false, false}
/* The inputs of PAGED_DECODE (GQA 4 over 2 heads of 6, a 24-row pool) and PAGED_LONG (hd 64,
 * a 256-row pool). */
#define PAGED_DECODE_IN {N(4, 1, 3, 4, 6), N(3, 24, 2, 6), N(3, 24, 2, 6), ROWS(24, 16)}
#define PAGED_LONG_IN {N(4, 1, 3, 2, 64), N(3, 256, 2, 64), N(3, 256, 2, 64), ROWS(256, 1200)}
/* PAGED_MIXED at head dim hd: 2 query heads over 1 kv head, a 64-row pool. */
#define PAGED_MIXED_ROW(hd, what)                                                                                    \
    {"attention_paged", "hd=" #hd " causal 3/40, an empty segment, 1/68" what, 4,                                   \
     {N(4, 1, 4, 2, hd), N(3, 64, 1, hd), N(3, 64, 1, hd), ROWS(64, 110)}, run_paged_mixed, .check = check_paged_mixed}

static const op_case cases[] = {
    {"dropout", "p=0.3 4x6", 1, {F(2, 4, 6)}, run_dropout},
    {"dropout", "p=0.3 transposed 5x4", 1, {FT(2, 5, 4)}, run_dropout},
    {"rope", "[2,3,2,4] pos0=3", 1, {F(4, 2, 3, 2, 4)}, run_rope},
    {"rope", "[1,4,2,6] strided", 1, {FT(4, 1, 4, 2, 6)}, run_rope},
    {"rope", "[2,3,5,4]: 10 (batch row, head)s, two head groups on cuda", 1, {F(4, 2, 3, 5, 4)}, run_rope},
    {"rope", "rope_at [2,5,2,4] positions 4 0 1 2 9", 1, {F(4, 2, 5, 2, 4)}, run_rope_at},
    {"rope", "rope_at [1,5,3,6] strided", 1, {FT(4, 1, 5, 3, 6)}, run_rope_at},
    {"rope", "rope_at [1,5,2,8] positions up to 131071", 1, {F(4, 1, 5, 2, 8)}, run_rope_far},
    {"rope_append", "q, k, v of [1,5,8,64], per-head norms, into 7-row pools (cuda: 16-byte loads)", 3,
     {N(4, 1, 5, 8, 64), NP(64), NP(64)}, run_rope_append_heads, .check = check_rope_append_heads},
    {"rope_append", "q, k, v of [1,5,8,6], norms over all heads (cuda: element loads)", 3,
     {N(4, 1, 5, 8, 6), NP(24), NP(12)}, run_rope_append_all, .check = check_rope_append_all},
    {"rope_append", "q, k, v of [1,5,8,64], norms over all heads (cuda: 16-byte loads)", 3,
     {N(4, 1, 5, 8, 64), NP(256), NP(128)}, run_rope_append_all, .check = check_rope_append_all},
    {"rope_append", "q, k, v of [1,5,8,16] without norms", 1, {N(4, 1, 5, 8, 16)}, run_rope_append_plain,
     .check = check_rope_append_plain},
    {"attention", "causal GQA H=4 Hkv=2, Tq=5 < Tk=6, transposed q", 3,
     {FT(4, 1, 5, 4, 4), F(4, 1, 6, 2, 4), F(4, 1, 6, 2, 4)}, run_attention_causal},
    {"attention", "non-causal B=2 Tq=3 Tk=5", 3, {F(4, 2, 3, 2, 4), F(4, 2, 5, 2, 4), F(4, 2, 5, 2, 4)},
     run_attention_full},
    {"attention", "causal, q k v slices of a fused projection", 1, {F(4, 1, 5, 2, 12)}, run_attention_fused},
    {"attention", "causal, several query and key blocks (Tq=70, Tk=150)", 3,
     {F(4, 1, 70, 1, 2), F(4, 1, 150, 1, 2), F(4, 1, 150, 1, 2)}, run_attention_causal},
    {"attention", "hd=64 causal Tq=Tk=66 (two query and key tiles)", 3,
     {F(4, 1, 66, 1, 2), F(4, 1, 66, 1, 2), F(4, 1, 66, 1, 2)}, run_attention_hd64_causal, 1e-5},
    {"attention", "hd=64 causal GQA H=2 Hkv=1, Tq=20 < Tk=70", 3,
     {F(4, 1, 20, 2, 2), F(4, 1, 70, 1, 2), F(4, 1, 70, 1, 2)}, run_attention_hd64_causal, 1e-5},
    {"attention", "hd=64 non-causal B=2, Tq=70 > Tk=20", 3,
     {F(4, 2, 70, 1, 2), F(4, 2, 20, 1, 2), F(4, 2, 20, 1, 2)}, run_attention_hd64_full, 1e-5},
    {"attention", "hd=128 causal Tq=20 < Tk=66", 3, {F(4, 1, 20, 1, 2), F(4, 1, 66, 1, 2), F(4, 1, 66, 1, 2)},
     run_attention_hd128_causal, 1e-5},
    {"attention", "varlen causal GQA H=4 Hkv=2, segments 3/3 1/4 5/5", 3,
     {F(4, 1, 9, 4, 4), F(4, 1, 12, 2, 4), F(4, 1, 12, 2, 4)}, run_varlen_uneven_causal},
    {"attention", "varlen non-causal GQA, segments 3/3 1/4 5/5, transposed k", 3,
     {F(4, 1, 9, 4, 4), FT(4, 1, 12, 2, 4), F(4, 1, 12, 2, 4)}, run_varlen_uneven_full},
    {"attention", "varlen causal, a segment of keys without queries", 3,
     {F(4, 1, 6, 2, 4), F(4, 1, 9, 1, 4), F(4, 1, 9, 1, 4)}, run_varlen_empty_q_causal},
    {"attention", "varlen non-causal, segments 70/70 1/30 29/30", 3,
     {F(4, 1, 100, 2, 2), F(4, 1, 130, 1, 2), F(4, 1, 130, 1, 2)}, run_varlen_tiles_full, 0, 0, NULL, false, 40},
    {"attention", "varlen hd=64 causal GQA H=2 Hkv=1, segments 70/70 1/30 29/30", 3,
     {F(4, 1, 100, 2, 2), F(4, 1, 130, 1, 2), F(4, 1, 130, 1, 2)}, run_varlen_hd64_causal, 1e-5, 0, NULL, false,
     40},
    {"attention", "varlen hd=128 causal, segments 70/70 1/30 29/30", 3,
     {F(4, 1, 100, 1, 2), F(4, 1, 130, 1, 2), F(4, 1, 130, 1, 2)}, run_varlen_hd128_causal, 1e-5, 0, NULL, false,
     40},
    {"attention", "varlen hd=64 causal, a segment of keys without queries", 3,
     {F(4, 1, 6, 2, 2), F(4, 1, 9, 1, 2), F(4, 1, 9, 1, 2)}, run_varlen_hd64_empty_q, 1e-5},
    {"attention_paged", "decode steps 1/5 1/9 1/2, GQA H=4 Hkv=2, hd 6, rows of a 24-row pool", 4, PAGED_DECODE_IN,
     run_paged_decode, .check = check_paged_decode},
    PAGED_MIXED_ROW(128, ""),
    PAGED_MIXED_ROW(96, " (cuda: element loads, lanes past the head)"),
    PAGED_MIXED_ROW(256, " (cuda: 8 dims per lane)"),
    {"attention_paged", "hd=64 causal 1/600 2/600 (key runs split over blocks)", 4, PAGED_LONG_IN,
     run_paged_long_causal, .check = check_paged_long_causal},
    {"attention_paged", "hd=64 non-causal 1/600 2/600", 4, PAGED_LONG_IN, run_paged_long_full,
     .check = check_paged_long_full},
    {"attention_paged", "table on the device, key bound 65536: hd=64 causal 1/600 2/600", 4, PAGED_LONG_IN,
     run_paged_bound_long, .check = check_paged_long_causal},
    {"attention_paged", "table on the device, key bound 4096: decode steps 1/5 1/9 1/2", 4, PAGED_DECODE_IN,
     run_paged_bound_decode, .check = check_paged_decode},
    {"attention_paged", "20 queries over 24 keys and 1/6: the gathered route", 4,
     {N(4, 1, 21, 2, 8), N(3, 40, 1, 8), N(3, 40, 1, 8), ROWS(40, 30)}, run_paged_prefill,
     .check = check_paged_prefill},
    {"cross_entropy", "V=37 block 8, an ignored row, transposed h", 3,
     {FT(2, 6, 5), F(2, 37, 5), {1, {6}, IN_INDEX, 37, false, false}}, run_cross_entropy_block8},
    {"cross_entropy", "V=11 one block, transposed w", 3,
     {F(2, 4, 3), FT(2, 11, 3), {1, {4}, IN_INDEX, 11, false, false}}, run_cross_entropy},
};

const op_case_list cases_nn = {cases, sizeof cases / sizeof *cases};
