/* The ops of packed inference on the CPU: moe_attention_varlen against moe_attention run
 * segment by segment (outputs and grads, f32 and f64, several layouts), its refusals;
 * moe_rope_at against moe_rope (positions pos0 + t, restarting positions, grads) and its
 * refusals; moe_index_copy_ (values, strided sources, bad and repeated rows); the views a
 * decode step reads in place (reshape of a slice, rows at a stride). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "core/ops.h"
#include "tests/harness/tensors.h"
#include "tests/harness/testlib.h"

static double max_abs_diff(const double *a, const double *b, int64_t n) {
    double e = 0;
    for (int64_t i = 0; i < n; i++) e = fmax(e, fabs(a[i] - b[i]));
    return e;
}

/* ---------------- attention_varlen ---------------- */

typedef struct {
    const char *name;
    int n, H, Hkv;
    int64_t q[6], k[6];
} layout;

static const layout LAYOUTS[] = {
    {"uneven", 3, 2, 2, {0, 3, 10, 12}, {0, 3, 10, 12}},
    {"decode-like qlen 1 < klen", 4, 4, 2, {0, 1, 2, 3, 4}, {0, 5, 6, 13, 20}},
    {"mixed prefill and decode, GQA", 4, 4, 2, {0, 70, 71, 75, 205}, {0, 70, 90, 96, 226}},
    {"keys without queries", 3, 2, 1, {0, 2, 2, 6}, {0, 3, 5, 9}},
};

/* Output, dq, dk, dv (host copies, in that order) of L = sum(o * r) with o from the packed
 * call (segmented) or from moe_attention per segment, concatenated. */
static void varlen_run(const layout *L, moe_dtype dt, bool causal, bool segmented, double *out[4]) {
    const int64_t hd = 8, Tq = L->q[L->n], Tk = L->k[L->n];
    moe_tensor *q = test_leaf(dt, 4, (int64_t[]){1, Tq, L->H, hd}, 11);
    moe_tensor *k = test_leaf(dt, 4, (int64_t[]){1, Tk, L->Hkv, hd}, 12);
    moe_tensor *v = test_leaf(dt, 4, (int64_t[]){1, Tk, L->Hkv, hd}, 13);
    moe_tensor *o;
    if (segmented) {
        o = moe_attention_varlen(q, k, v, L->q, L->k, L->n, causal);
    } else {
        moe_tensor *parts[6];
        int np = 0;
        for (int s = 0; s < L->n; s++) {
            if (L->q[s + 1] == L->q[s]) continue;
            parts[np++] = moe_attention(moe_slice(q, 1, L->q[s], L->q[s + 1]), moe_slice(k, 1, L->k[s], L->k[s + 1]),
                                        moe_slice(v, 1, L->k[s], L->k[s + 1]), causal);
        }
        o = moe_concat(parts, np, 1);
    }
    if (!o) fprintf(stderr, "    %s: %s\n", L->name, moe_last_error());
    CU_ASSERT_PTR_NOT_NULL_FATAL(o);
    moe_tensor *r = test_randn(dt, 4, o->shape, 14);
    CU_ASSERT_EQUAL_FATAL(moe_backward(moe_sum_all(moe_mul(o, r))), MOE_OK);
    out[0] = test_host_f64(o);
    out[1] = test_host_f64(q->grad);
    out[2] = test_host_f64(k->grad);
    out[3] = test_host_f64(v->grad);
    moe_tensor_free(q);
    moe_tensor_free(k);
    moe_tensor_free(v);
    moe_step_reset();
}

static void check_varlen_layout(const layout *L, moe_dtype dt, bool causal) {
    const int64_t hd = 8, Tq = L->q[L->n], Tk = L->k[L->n];
    const int64_t n[4] = {Tq * L->H * hd, Tq * L->H * hd, Tk * L->Hkv * hd, Tk * L->Hkv * hd};
    double *got[4], *want[4];
    varlen_run(L, dt, causal, true, got);
    varlen_run(L, dt, causal, false, want);
    const double tol = dt == MOE_F64 ? 1e-12 : 1e-6;
    for (int i = 0; i < 4; i++) {
        double e = max_abs_diff(got[i], want[i], n[i]);
        if (!(e <= tol))
            fprintf(stderr, "    %s %s %s: %s differs by %g\n", L->name, moe_dtype_name(dt),
                    causal ? "causal" : "full", (const char *[]){"o", "dq", "dk", "dv"}[i], e);
        CU_ASSERT(e <= tol);
        free(got[i]);
        free(want[i]);
    }
}

static void test_varlen_equals_per_segment(void) {
    for (size_t l = 0; l < sizeof LAYOUTS / sizeof *LAYOUTS; l++)
        for (int c = 0; c < 2; c++) {
            check_varlen_layout(&LAYOUTS[l], MOE_F64, c);
            check_varlen_layout(&LAYOUTS[l], MOE_F32, c);
        }
}

/* Attention stays inside the segments: changing the keys of one segment moves only that
 * segment's outputs. */
static void test_varlen_isolated(void) {
    const int64_t qo[3] = {0, 4, 9}, ko[3] = {0, 6, 11};
    moe_tensor *q = test_randn(MOE_F64, 4, (int64_t[]){1, 9, 2, 4}, 21);
    moe_tensor *k = test_randn(MOE_F64, 4, (int64_t[]){1, 11, 2, 4}, 22);
    moe_tensor *v = test_randn(MOE_F64, 4, (int64_t[]){1, 11, 2, 4}, 23);
    double *a = test_host_f64(moe_attention_varlen(q, k, v, qo, ko, 2, true));
    double *kh = test_host_f64(k);
    for (int64_t i = 8 * 8; i < 9 * 8; i++) kh[i] += 1.0; /* key 8, in the second segment */
    moe_tensor *k3 = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 4, k->shape, kh);
    double *b = test_host_f64(moe_attention_varlen(q, k3, v, qo, ko, 2, true));
    CU_ASSERT(max_abs_diff(a, b, 4 * 8) == 0);        /* segment 0: untouched */
    CU_ASSERT(max_abs_diff(a + 32, b + 32, 5 * 8) > 1e-6); /* segment 1: moved */
    free(a);
    free(b);
    free(kh);
    moe_step_reset();
}

static void test_varlen_errors(void) {
    moe_tensor *q = test_randn(MOE_F32, 4, (int64_t[]){1, 5, 2, 4}, 1);
    moe_tensor *k = test_randn(MOE_F32, 4, (int64_t[]){1, 6, 2, 4}, 2);
    struct {
        int n;
        int64_t q[4], k[4];
        bool causal;
        const char *msg;
    } bad[] = {
        {2, {1, 3, 5}, {0, 3, 6}, false, "from 0"},          /* does not start at 0 */
        {2, {0, 3, 4}, {0, 3, 6}, false, "from 0"},          /* does not end at Tq */
        {2, {0, 3, 5}, {0, 3, 7}, false, "from 0"},          /* does not end at Tk */
        {3, {0, 4, 3, 5}, {0, 2, 4, 6}, false, "ascend"},    /* descending */
        {2, {0, 4, 5}, {0, 3, 6}, true, "more queries"},     /* causal qlen 4 > klen 3 */
        {2, {0, 2, 5}, {0, 0, 6}, false, "no keys"},         /* queries without keys */
        {0, {0}, {0}, false, "from 0"},                      /* no segments */
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        moe_error_clear();
        CU_ASSERT_PTR_NULL(moe_attention_varlen(q, k, k, bad[i].q, bad[i].k, bad[i].n, bad[i].causal));
        CU_ASSERT_EQUAL(moe_last_status(), MOE_ERR_INVALID);
        CHECK_ERROR_HAS("attention_varlen");
        CHECK_ERROR_HAS(bad[i].msg);
    }
    /* packed rows only: B = 2 is refused */
    moe_tensor *q2 = test_randn(MOE_F32, 4, (int64_t[]){2, 5, 2, 4}, 3);
    moe_tensor *k2 = test_randn(MOE_F32, 4, (int64_t[]){2, 6, 2, 4}, 4);
    CU_ASSERT_PTR_NULL(moe_attention_varlen(q2, k2, k2, (int64_t[]){0, 5}, (int64_t[]){0, 6}, 1, true));
    CHECK_ERROR_HAS("packed");
    /* a good call after the refusals works */
    CU_ASSERT_PTR_NOT_NULL(moe_attention_varlen(q, k, k, (int64_t[]){0, 2, 5}, (int64_t[]){0, 3, 6}, 2, true));
    moe_step_reset();
}

/* ---------------- rope_at ---------------- */

static moe_tensor *positions(int64_t n, const int32_t *p) {
    return moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, &n, p);
}

/* rope_at at pos0 + t is moe_rope(x, pos0), values and grads, f32 and f64. */
static void test_rope_at_equals_rope(void) {
    const moe_dtype dts[2] = {MOE_F32, MOE_F64};
    for (int d = 0; d < 2; d++) {
        const int64_t shape[4] = {2, 6, 3, 8}, n = 2 * 6 * 3 * 8;
        const int32_t pos[6] = {37, 38, 39, 40, 41, 42};
        double *y[2], *g[2];
        for (int at = 0; at < 2; at++) {
            moe_tensor *x = test_leaf(dts[d], 4, shape, 31);
            moe_tensor *o = at ? moe_rope_at(x, positions(6, pos), 10000.0) : moe_rope(x, 37, 10000.0);
            moe_tensor *r = test_randn(dts[d], 4, shape, 32);
            CU_ASSERT_EQUAL_FATAL(moe_backward(moe_sum_all(moe_mul(o, r))), MOE_OK);
            y[at] = test_host_f64(o);
            g[at] = test_host_f64(x->grad);
            moe_tensor_free(x);
            moe_step_reset();
        }
        CU_ASSERT(max_abs_diff(y[0], y[1], n) == 0);
        CU_ASSERT(max_abs_diff(g[0], g[1], n) == 0);
        for (int i = 0; i < 2; i++) {
            free(y[i]);
            free(g[i]);
        }
    }
}

/* Two packed prompts with positions restarting at 0 equal each prompt roped alone. */
static void test_rope_at_restarting(void) {
    moe_tensor *x = test_randn(MOE_F64, 4, (int64_t[]){1, 7, 2, 4}, 33);
    const int32_t pos[7] = {0, 1, 2, 0, 1, 2, 3};
    double *packed = test_host_f64(moe_rope_at(x, positions(7, pos), 500.0));
    double *a = test_host_f64(moe_rope(moe_slice(x, 1, 0, 3), 0, 500.0));
    double *b = test_host_f64(moe_rope(moe_slice(x, 1, 3, 7), 0, 500.0));
    CU_ASSERT(max_abs_diff(packed, a, 3 * 8) == 0);
    CU_ASSERT(max_abs_diff(packed + 3 * 8, b, 4 * 8) == 0);
    /* and differs from positions 0..6 */
    double *plain = test_host_f64(moe_rope(x, 0, 500.0));
    CU_ASSERT(max_abs_diff(packed + 3 * 8, plain + 3 * 8, 4 * 8) > 1e-3);
    free(packed);
    free(a);
    free(b);
    free(plain);
    moe_step_reset();
}

static void test_rope_at_errors(void) {
    moe_tensor *x = test_randn(MOE_F32, 4, (int64_t[]){1, 3, 2, 4}, 34);
    const int32_t p3[3] = {0, 1, 2}, neg[3] = {0, -1, 2};
    CU_ASSERT_PTR_NULL(moe_rope_at(x, positions(2, p3), 100.0)); /* wrong length */
    CHECK_ERROR_HAS("rope_at");
    moe_tensor *pf = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 1, (int64_t[]){3});
    CU_ASSERT_PTR_NULL(moe_rope_at(x, pf, 100.0)); /* not i32 */
    CHECK_ERROR_HAS("i32");
    CU_ASSERT_PTR_NULL(moe_rope_at(x, positions(3, neg), 100.0));
    CU_ASSERT_EQUAL(moe_last_status(), MOE_ERR_INVALID);
    CHECK_ERROR_HAS("negative");
    CU_ASSERT_PTR_NULL(moe_rope_at(x, NULL, 100.0));
    moe_step_reset();
}

/* ---------------- index_copy_ ---------------- */

static moe_tensor *host_i32(int64_t n, const int32_t *v) {
    return moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, &n, v);
}

static void test_index_copy_values(void) {
    /* dst [5, 2, 3] f32 = 0..29, src [3, 2, 3] = 100 + .., rows 4, 0, 2 */
    moe_tensor *dst = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 3, (int64_t[]){5, 2, 3});
    float *pd = dst->data;
    for (int i = 0; i < 30; i++) pd[i] = (float)i;
    moe_tensor *src = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 3, (int64_t[]){3, 2, 3});
    float *ps = src->data;
    for (int i = 0; i < 18; i++) ps[i] = 100.0f + (float)i;
    const int32_t rows[3] = {4, 0, 2};
    CU_ASSERT_EQUAL_FATAL(moe_index_copy_(dst, host_i32(3, rows), src), MOE_OK);
    for (int r = 0; r < 5; r++)
        for (int c = 0; c < 6; c++) {
            int from = r == 4 ? 0 : r == 0 ? 1 : r == 2 ? 2 : -1;
            float want = from < 0 ? (float)(r * 6 + c) : 100.0f + (float)(from * 6 + c);
            CU_ASSERT_EQUAL(pd[r * 6 + c], want);
        }
    /* a strided source (a transposed view) is read through its strides; i32 rows too */
    moe_tensor *d2 = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 2, (int64_t[]){4, 3});
    const int32_t sv[6] = {1, 2, 3, 4, 5, 6}; /* [2, 3] -> transposed view [3, 2]... */
    moe_tensor *s23 = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 2, (int64_t[]){3, 2}, sv);
    moe_tensor *st = moe_transpose(s23, 0, 1); /* [2, 3]: rows {1, 3, 5}, {2, 4, 6} */
    const int32_t rows2[2] = {3, 1};
    CU_ASSERT_EQUAL_FATAL(moe_index_copy_(d2, host_i32(2, rows2), st), MOE_OK);
    const int32_t want2[12] = {0, 0, 0, 2, 4, 6, 0, 0, 0, 1, 3, 5};
    CU_ASSERT(memcmp(d2->data, want2, sizeof want2) == 0);
    /* a slice of columns of a wider matrix (rows at a stride of 5) is read in place */
    const int32_t wide[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    moe_tensor *w25 = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 2, (int64_t[]){2, 5}, wide);
    moe_tensor *cols = moe_slice(w25, 1, 1, 4); /* rows {2, 3, 4}, {7, 8, 9} */
    CU_ASSERT_EQUAL(moe_tensor_row_stride(cols), 5);
    CU_ASSERT_EQUAL_FATAL(moe_index_copy_(d2, host_i32(2, rows2), cols), MOE_OK);
    const int32_t want3[12] = {0, 0, 0, 7, 8, 9, 0, 0, 0, 2, 3, 4};
    CU_ASSERT(memcmp(d2->data, want3, sizeof want3) == 0);
    memcpy(d2->data, want2, sizeof want2);
    /* no rows: nothing happens */
    moe_tensor *s0 = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 2, (int64_t[]){0, 3});
    CU_ASSERT_EQUAL(moe_index_copy_(d2, host_i32(0, rows2), s0), MOE_OK);
    CU_ASSERT(memcmp(d2->data, want2, sizeof want2) == 0);
    moe_step_reset();
}

static void test_index_copy_errors(void) {
    moe_tensor *dst = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){4, 2});
    moe_tensor *src = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){2, 2});
    CU_ASSERT_EQUAL(moe_tensor_fill(src, 7.0), MOE_OK);
    const int32_t out_of_range[2] = {1, 4}, negative[2] = {-1, 0}, twice[2] = {2, 2};
    const int32_t *bad[3] = {out_of_range, negative, twice};
    const char *msg[3] = {"out of range", "out of range", "twice"};
    for (int i = 0; i < 3; i++) {
        CU_ASSERT_EQUAL(moe_index_copy_(dst, host_i32(2, bad[i]), src), MOE_ERR_INVALID);
        CHECK_ERROR_HAS("index_copy_");
        CHECK_ERROR_HAS(msg[i]);
        const float *pd = dst->data;
        for (int j = 0; j < 8; j++) CU_ASSERT_EQUAL(pd[j], 0.0f); /* untouched */
    }
    /* shape, dtype and contiguity refusals */
    const int32_t ok[2] = {0, 1};
    moe_tensor *wide = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){2, 3});
    CU_ASSERT_EQUAL(moe_index_copy_(dst, host_i32(2, ok), wide), MOE_ERR_INVALID);
    moe_tensor *f64 = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){2, 2});
    CU_ASSERT_EQUAL(moe_index_copy_(dst, host_i32(2, ok), f64), MOE_ERR_INVALID);
    moe_tensor *dst_t = moe_transpose(moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){2, 4}), 0, 1);
    CU_ASSERT_EQUAL(moe_index_copy_(dst_t, host_i32(2, ok), src), MOE_ERR_INVALID);
    CHECK_ERROR_HAS("contiguous");
    moe_step_reset();
}

/* ---------------- views read in place ---------------- */

static void test_reshape_views(void) {
    /* heads 1..4 of q [2, 3, 6, 2] merged per token: a view at a row stride of 12 */
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 4, (int64_t[]){2, 3, 6, 2}, 5, 0, 1.0);
    moe_tensor *s = moe_slice(x, 2, 1, 5), *r = moe_reshape(s, 3, (int64_t[]){2, 3, 8});
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    CU_ASSERT_PTR_EQUAL(r->data, s->data);
    CU_ASSERT(r->strides[0] == 36 && r->strides[1] == 12 && r->strides[2] == 1);
    CU_ASSERT_EQUAL(moe_tensor_row_stride(r), 12);
    double got[48], want[48];
    CU_ASSERT_EQUAL_FATAL(moe_tensor_to_host_f64(r, got), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_tensor_to_host_f64(moe_contiguous(s), want), MOE_OK);
    CU_ASSERT(memcmp(got, want, sizeof got) == 0);
    /* a transpose cannot be merged in place: reshape copies */
    moe_tensor *t = moe_transpose(moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){3, 4}, 6, 0, 1.0), 0, 1);
    moe_tensor *flat = moe_reshape(t, 1, (int64_t[]){12});
    CU_ASSERT_PTR_NOT_NULL_FATAL(flat);
    CU_ASSERT(flat->data != t->data && moe_tensor_is_contiguous(flat));
    CU_ASSERT_EQUAL(moe_tensor_row_stride(t), 0);
    /* rows at one stride: contiguous matrices, row slices, size-1 axes; not the per-head rows of s */
    CU_ASSERT_EQUAL(moe_tensor_row_stride(x), 2);
    CU_ASSERT_EQUAL(moe_tensor_row_stride(moe_slice(x, 0, 1, 2)), 2);
    CU_ASSERT_EQUAL(moe_tensor_row_stride(moe_slice(moe_slice(x, 0, 0, 1), 1, 0, 1)), 2);
    CU_ASSERT_EQUAL(moe_tensor_row_stride(s), 0);
    /* batch rows and tokens merged (one stride between tokens): a view ... */
    moe_tensor *rows = moe_reshape(s, 2, (int64_t[]){6, 8});
    CU_ASSERT_PTR_NOT_NULL_FATAL(rows);
    CU_ASSERT(rows->data == s->data && rows->strides[0] == 12 && rows->strides[1] == 1);
    /* ... tokens and heads merged across the slice's gap: a copy */
    moe_tensor *across = moe_reshape(s, 2, (int64_t[]){2, 24});
    CU_ASSERT_PTR_NOT_NULL_FATAL(across);
    CU_ASSERT(across->data != s->data && moe_tensor_is_contiguous(across));
    /* a head split into halves and size-1 axes added: a view, with the slice's strides kept */
    moe_tensor *split = moe_reshape(s, 6, (int64_t[]){2, 3, 1, 4, 2, 1});
    CU_ASSERT_PTR_NOT_NULL_FATAL(split);
    CU_ASSERT_PTR_EQUAL(split->data, s->data);
    CU_ASSERT(split->strides[0] == 36 && split->strides[1] == 12 && split->strides[3] == 2 && split->strides[4] == 1);
    double got6[48];
    CU_ASSERT_EQUAL_FATAL(moe_tensor_to_host_f64(split, got6), MOE_OK);
    CU_ASSERT(memcmp(got6, want, sizeof got6) == 0);
    moe_step_reset();
}

static void register_suites(void) {
    moe_test_add_suite("attention_varlen",
                       (moe_test_entry[]){{"equals moe_attention per segment (o, dq, dk, dv)", test_varlen_equals_per_segment},
                                          {"segments are isolated", test_varlen_isolated},
                                          {"errors", test_varlen_errors},
                                          {NULL, NULL}});
    moe_test_add_suite("rope_at", (moe_test_entry[]){{"pos0 + t equals rope", test_rope_at_equals_rope},
                                                     {"restarting positions", test_rope_at_restarting},
                                                     {"errors", test_rope_at_errors},
                                                     {NULL, NULL}});
    moe_test_add_suite("index_copy_", (moe_test_entry[]){{"values", test_index_copy_values},
                                                         {"errors leave dst untouched", test_index_copy_errors},
                                                         {NULL, NULL}});
    moe_test_add_suite("views", (moe_test_entry[]){{"reshape of a slice, rows at a stride", test_reshape_views},
                                                   {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
