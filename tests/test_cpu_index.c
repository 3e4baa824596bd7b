/* Index ops beyond the generic cases: hand-computed values and grads, error messages for
 * bad shapes and out-of-range indices, duplicate indices, combine's row contract,
 * top-k ties and k = 1 / k = n,
 * argsort stability (counting-sort and merge-sort paths), empty bincount, cumsum, the
 * routing plan's values and errors. */
#include "tests/harness/testlib.h"

#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "core/ops.h"

static moe_tensor *make(moe_dtype dt, int ndim, const int64_t *shape, const double *v) {
    moe_tensor *h = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, ndim, shape, v);
    moe_tensor *t = h ? moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, dt, ndim, shape) : NULL;
    CU_ASSERT_FATAL(t && moe_tensor_copy_(t, h) == MOE_OK);
    return t;
}
#define F64(shape, ...) make(MOE_F64, sizeof((int64_t[])shape) / sizeof(int64_t), (int64_t[])shape, (double[]){__VA_ARGS__})
#define I32(shape, ...) make(MOE_I32, sizeof((int64_t[])shape) / sizeof(int64_t), (int64_t[])shape, (double[]){__VA_ARGS__})
#define SHAPE(...) {__VA_ARGS__}

/* Exact comparison of t (any dtype) with want[0..n). */
static void expect_values(const moe_tensor *t, const double *want, int64_t n) {
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    CU_ASSERT_EQUAL_FATAL(moe_tensor_numel(t), n);
    double *got = malloc(sizeof(double) * (size_t)(n + 1));
    CU_ASSERT_EQUAL_FATAL(moe_tensor_to_host_f64(t, got), MOE_OK);
    for (int64_t i = 0; i < n; i++) {
        if (got[i] != want[i]) fprintf(stderr, "    element %lld: got %g, want %g\n", (long long)i, got[i], want[i]);
        CU_ASSERT_EQUAL(got[i], want[i]);
    }
    free(got);
}
#define EXPECT(t, ...)                                                                     \
    expect_values((t), (double[]){__VA_ARGS__}, sizeof((double[]){__VA_ARGS__}) / sizeof(double))

/* r is NULL, the status is MOE_ERR_INVALID and the message contains every given part. */
static void expect_invalid(const moe_tensor *r, const char *const *parts) {
    CU_ASSERT_PTR_NULL(r);
    CU_ASSERT_EQUAL(moe_last_status(), MOE_ERR_INVALID);
    for (; *parts; parts++) {
        if (!strstr(moe_last_error(), *parts)) fprintf(stderr, "    '%s' not in: %s\n", *parts, moe_last_error());
        CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), *parts));
    }
}
#define EXPECT_INVALID(r, ...) expect_invalid((r), (const char *const[]){__VA_ARGS__, NULL})

static moe_tensor *leaf(moe_tensor *t) {
    t->requires_grad = true;
    return t;
}

/* ---- embedding ---- */
static void test_embedding_values_and_grad(void) {
    moe_step_reset();
    moe_tensor *table = leaf(F64(SHAPE(4, 2), 0, 1, 10, 11, 20, 21, 30, 31));
    moe_tensor *ids = I32(SHAPE(2, 2), 3, 0, 2, 3);
    moe_tensor *out = moe_embedding(table, ids);
    CU_ASSERT_PTR_NOT_NULL_FATAL(out);
    CU_ASSERT_EQUAL(out->ndim, 3);
    CU_ASSERT(out->shape[0] == 2 && out->shape[1] == 2 && out->shape[2] == 2);
    EXPECT(out, 30, 31, 0, 1, 20, 21, 30, 31);
    CU_ASSERT_EQUAL_FATAL(moe_backward(moe_sum_all(out)), MOE_OK);
    EXPECT(table->grad, 1, 1, 0, 0, 1, 1, 2, 2); /* row 3 picked twice, row 1 never */
}

static void test_embedding_bad_ids(void) {
    moe_step_reset();
    moe_tensor *table = F64(SHAPE(5, 3), 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14);
    EXPECT_INVALID(moe_embedding(table, I32(SHAPE(3), 0, 4, 5)), "embedding", "index 5", "[0, 5)", "[5, 3]");
    EXPECT_INVALID(moe_embedding(table, I32(SHAPE(2), -1, 2)), "embedding", "index -1", "[0, 5)");
    EXPECT_INVALID(moe_embedding(table, F64(SHAPE(2), 0, 1)), "embedding", "i32");
    EXPECT_INVALID(moe_embedding(F64(SHAPE(6), 0, 1, 2, 3, 4, 5), I32(SHAPE(1), 0)), "embedding", "[6]");
}

/* ---- index_select / index_add ---- */
static void test_index_select(void) {
    moe_step_reset();
    moe_tensor *x = leaf(F64(SHAPE(3, 2), 1, 2, 3, 4, 5, 6));
    moe_tensor *out = moe_index_select(x, I32(SHAPE(4), 2, 2, 0, 1));
    EXPECT(out, 5, 6, 5, 6, 1, 2, 3, 4);
    CU_ASSERT_EQUAL_FATAL(moe_backward(moe_sum_all(out)), MOE_OK);
    EXPECT(x->grad, 1, 1, 1, 1, 2, 2);
    EXPECT_INVALID(moe_index_select(x, I32(SHAPE(2, 2), 0, 1, 1, 0)), "index_select", "[3, 2]", "[2, 2]");
    EXPECT_INVALID(moe_index_select(x, I32(SHAPE(2), 0, 3)), "index_select", "index 3", "[0, 3)");
    EXPECT_INVALID(moe_index_select(x, I32(SHAPE(1), -2)), "index_select", "index -2");
}

static void test_index_add_duplicates(void) {
    moe_step_reset();
    moe_tensor *x = leaf(F64(SHAPE(3, 2), 1, 1, 1, 1, 1, 1));
    moe_tensor *src = leaf(F64(SHAPE(4, 2), 1, 2, 3, 4, 5, 6, 7, 8));
    moe_tensor *out = moe_index_add(x, I32(SHAPE(4), 2, 0, 2, 2), src);
    EXPECT(out, 4, 5, 1, 1, 14, 17);
    EXPECT(x, 1, 1, 1, 1, 1, 1); /* out of place */
    moe_tensor *w = F64(SHAPE(3, 2), 1, 2, 3, 4, 5, 6);
    CU_ASSERT_EQUAL_FATAL(moe_backward(moe_sum_all(moe_mul(out, w))), MOE_OK);
    EXPECT(x->grad, 1, 2, 3, 4, 5, 6);
    EXPECT(src->grad, 5, 6, 1, 2, 5, 6, 5, 6);
    EXPECT_INVALID(moe_index_add(x, I32(SHAPE(4), 0, 1, 2, 0), F64(SHAPE(4, 3), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
                   "index_add", "[3, 2]", "[4, 3]");
    EXPECT_INVALID(moe_index_add(x, I32(SHAPE(1), 3), F64(SHAPE(1, 2), 1, 1)), "index_add", "index 3", "[0, 3)");
}

/* Many duplicates into few rows, in f32: the result must equal the sequential sum in
 * source order bit for bit (the kernel splits columns, never the sources). */
static void test_index_add_deterministic(void) {
    moe_step_reset();
    enum { N = 7, M = 4000, R = 300 };
    float *src = malloc(sizeof(float) * M * R), *ref = calloc(N * R, sizeof(float));
    int32_t *idx = malloc(sizeof(int32_t) * M);
    for (int i = 0; i < M; i++) {
        idx[i] = (i * 7919 + 13) % N;
        for (int c = 0; c < R; c++) src[i * R + c] = (float)((i * 31 + c * 17) % 1000) * 1e-3f + 1e-7f * (float)i;
    }
    for (int i = 0; i < M; i++)
        for (int c = 0; c < R; c++) ref[idx[i] * R + c] += src[i * R + c];
    moe_tensor *x = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){N, R});
    moe_tensor *ti = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, (int64_t[]){M}, idx);
    moe_tensor *ts = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){M, R}, src);
    moe_tensor *out = moe_index_add(x, ti, ts);
    CU_ASSERT_PTR_NOT_NULL_FATAL(out);
    CU_ASSERT_EQUAL(memcmp(out->data, ref, sizeof(float) * N * R), 0);
    free(src);
    free(ref);
    free(idx);
}

/* ---- gather / scatter_add ---- */
static void test_gather_scatter_values(void) {
    moe_step_reset();
    moe_tensor *x = leaf(F64(SHAPE(2, 4), 10, 11, 12, 13, 20, 21, 22, 23));
    moe_tensor *idx = I32(SHAPE(2, 3), 3, 0, 3, 1, 1, 2);
    moe_tensor *g = moe_gather(x, idx);
    EXPECT(g, 13, 10, 13, 21, 21, 22);
    CU_ASSERT_EQUAL_FATAL(moe_backward(moe_sum_all(g)), MOE_OK);
    EXPECT(x->grad, 1, 0, 0, 2, 0, 2, 1, 0);

    moe_step_reset();
    moe_tensor *z = leaf(F64(SHAPE(2, 4), 0, 0, 0, 0, 0, 0, 0, 0));
    moe_tensor *src = leaf(F64(SHAPE(2, 3), 1, 2, 4, 8, 16, 32));
    idx = I32(SHAPE(2, 3), 3, 0, 3, 1, 1, 2);
    moe_tensor *s = moe_scatter_add(z, idx, src);
    EXPECT(s, 2, 0, 0, 5, 0, 24, 32, 0);
    moe_tensor *w = F64(SHAPE(2, 4), 1, 2, 3, 4, 5, 6, 7, 8);
    CU_ASSERT_EQUAL_FATAL(moe_backward(moe_sum_all(moe_mul(s, w))), MOE_OK);
    EXPECT(z->grad, 1, 2, 3, 4, 5, 6, 7, 8);
    EXPECT(src->grad, 4, 1, 4, 6, 6, 7);
}

static void test_gather_scatter_errors(void) {
    moe_step_reset();
    moe_tensor *x = F64(SHAPE(2, 4), 0, 1, 2, 3, 4, 5, 6, 7);
    EXPECT_INVALID(moe_gather(x, I32(SHAPE(2, 1), 1, 4)), "gather", "index 4", "[0, 4)");
    EXPECT_INVALID(moe_gather(x, I32(SHAPE(3, 1), 0, 1, 2)), "gather", "[2, 4]", "[3, 1]");
    EXPECT_INVALID(moe_scatter_add(x, I32(SHAPE(2, 1), -1, 0), F64(SHAPE(2, 1), 1, 1)), "scatter_add", "index -1");
    EXPECT(x, 0, 1, 2, 3, 4, 5, 6, 7);
    EXPECT_INVALID(moe_scatter_add(x, I32(SHAPE(2, 1), 0, 0), F64(SHAPE(2, 2), 1, 1, 1, 1)), "scatter_add", "[2, 1]",
                   "[2, 2]");
}

/* combine: hand-computed values and grads; a source row out of range, named twice or
 * never named is an error naming the row and the position. */
static void test_combine_values_and_errors(void) {
    moe_step_reset();
    /* y rows 0..2 (d = 2); token 0 takes rows 2 and 0, token 1 row 1 and a dropped slot */
    moe_tensor *y = leaf(F64(SHAPE(3, 2), 1, 2, 3, 4, 5, 6)), *w = leaf(F64(SHAPE(2, 2), 0.5, 2, 3, 7));
    moe_tensor *out = moe_combine(y, w, I32(SHAPE(2, 2), 2, 0, 1, -1));
    EXPECT(out, 0.5 * 5 + 2 * 1, 0.5 * 6 + 2 * 2, 3 * 3, 3 * 4);
    moe_tensor *g = F64(SHAPE(2, 2), 1, 10, 100, 1000);
    CU_ASSERT_EQUAL_FATAL(moe_backward(moe_sum_all(moe_mul(out, g))), MOE_OK);
    EXPECT(y->grad, 2 * 1, 2 * 10, 3 * 100, 3 * 1000, 0.5 * 1, 0.5 * 10);
    EXPECT(w->grad, 5 + 60, 1 + 20, 300 + 4000, 0);
    moe_step_reset();
    y = leaf(F64(SHAPE(3, 2), 1, 2, 3, 4, 5, 6));
    w = F64(SHAPE(2, 2), 1, 1, 1, 1);
    EXPECT_INVALID(moe_combine(y, w, I32(SHAPE(2, 2), 0, 3, 1, 2)), "combine", "source row 3", "position 1");
    moe_tensor *twice = moe_combine(y, w, I32(SHAPE(2, 2), 0, 1, 1, 2)); /* the forward allows it */
    CU_ASSERT_PTR_NOT_NULL_FATAL(twice);
    CU_ASSERT_EQUAL(moe_backward(moe_sum_all(twice)), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "named twice"));
    moe_step_reset();
    y = leaf(F64(SHAPE(3, 2), 1, 2, 3, 4, 5, 6));
    w = F64(SHAPE(2, 2), 1, 1, 1, 1);
    moe_tensor *missing = moe_combine(y, w, I32(SHAPE(2, 2), 0, -1, 1, -1));
    CU_ASSERT_PTR_NOT_NULL_FATAL(missing);
    CU_ASSERT_EQUAL(moe_backward(moe_sum_all(missing)), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "names 2 of y's 3 rows"));
    moe_step_reset();
}

/* max over an axis routes its grad through scatter_add. */
static void test_max_backward(void) {
    moe_step_reset();
    moe_tensor *x = leaf(F64(SHAPE(2, 3), 1, 5, 2, 7, 0, 3));
    moe_tensor *m = moe_max(x, 1, false);
    EXPECT(m, 5, 7);
    CU_ASSERT_EQUAL_FATAL(moe_backward(moe_sum_all(m)), MOE_OK);
    EXPECT(x->grad, 0, 1, 0, 1, 0, 0);
}

/* ---- topk ---- */
static void test_topk_ties_and_k(void) {
    moe_step_reset();
    moe_tensor *x = F64(SHAPE(6), 1, 3, 3, 2, 0.5, 3), *idx = NULL;
    EXPECT(moe_topk(x, 1, &idx), 3);
    EXPECT(idx, 1);
    EXPECT(moe_topk(x, 2, &idx), 3, 3);
    EXPECT(idx, 1, 2);
    EXPECT(moe_topk(x, 6, &idx), 3, 3, 3, 2, 1, 0.5);
    EXPECT(idx, 1, 2, 5, 3, 0, 4);
    CU_ASSERT_EQUAL(idx->dtype, MOE_I32);
    EXPECT_INVALID(moe_topk(x, 0, &idx), "topk", "k = 0");
    EXPECT_INVALID(moe_topk(x, 7, &idx), "topk", "k = 7", "[6]");
    EXPECT_INVALID(moe_topk(I32(SHAPE(2), 1, 2), 1, &idx), "topk");
}

static void test_topk_grad(void) {
    moe_step_reset();
    moe_tensor *x = leaf(F64(SHAPE(2, 4), 0.1, 0.4, 0.3, 0.2, 0.9, 0.05, 0.03, 0.02)), *idx = NULL;
    moe_tensor *v = moe_topk(x, 2, &idx);
    EXPECT(v, 0.4, 0.3, 0.9, 0.05);
    EXPECT(idx, 1, 2, 0, 1);
    moe_tensor *w = F64(SHAPE(2, 2), 1, 2, 3, 4);
    CU_ASSERT_EQUAL_FATAL(moe_backward(moe_sum_all(moe_mul(v, w))), MOE_OK);
    EXPECT(x->grad, 0, 1, 2, 0, 3, 4, 0, 0);
}

/* Reference top-k of one row: repeated first-maximum selection. */
static void ref_topk(const float *row, int n, int k, float *val, int32_t *ids) {
    char *used = calloc((size_t)n, 1);
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int i = 0; i < n; i++)
            if (!used[i] && (best < 0 || row[i] > row[best])) best = i;
        used[best] = 1;
        val[j] = row[best];
        ids[j] = best;
    }
    free(used);
}

/* Router-shaped (small k, one pass) and large-k (sort) paths against the reference, with
 * many ties (values on a coarse grid). */
static void test_topk_against_reference(void) {
    const int shapes[][3] = {{1000, 64, 8}, {7, 256, 8}, {5, 100, 40}, {3, 33, 33}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        moe_step_reset();
        int rows = shapes[s][0], n = shapes[s][1], k = shapes[s][2];
        float *x = malloc(sizeof(float) * (size_t)(rows * n)), *val = malloc(sizeof(float) * (size_t)k);
        int32_t *ids = malloc(sizeof(int32_t) * (size_t)k);
        for (int i = 0; i < rows * n; i++) x[i] = (float)((i * 2654435761u >> 7) % 50) / 50.0f;
        moe_tensor *t = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){rows, n}, x), *ti = NULL;
        moe_tensor *tv = moe_topk(t, k, &ti);
        CU_ASSERT_PTR_NOT_NULL_FATAL(tv);
        int bad = 0;
        for (int r = 0; r < rows; r++) {
            ref_topk(x + r * n, n, k, val, ids);
            bad += memcmp(val, (float *)tv->data + r * k, sizeof(float) * (size_t)k) != 0;
            bad += memcmp(ids, (int32_t *)ti->data + r * k, sizeof(int32_t) * (size_t)k) != 0;
        }
        if (bad) fprintf(stderr, "    topk [%d, %d] k=%d: %d mismatching rows\n", rows, n, k, bad);
        CU_ASSERT_EQUAL(bad, 0);
        free(x);
        free(val);
        free(ids);
    }
}

/* ---- argsort ---- */
static void test_argsort_stable(void) {
    moe_step_reset();
    EXPECT(moe_argsort(I32(SHAPE(6), 2, 1, 2, 0, 1, 2)), 3, 1, 4, 0, 2, 5);
    /* wide key range: the merge-sort path */
    EXPECT(moe_argsort(I32(SHAPE(6), 1000000, 5, 1000000, 5, -7000000, 5)), 4, 1, 3, 5, 0, 2);
    EXPECT(moe_argsort(F64(SHAPE(4), 0.5, -1, 0.5, -1)), 1, 3, 0, 2);
    EXPECT(moe_argsort(F64(SHAPE(2, 3), 3, 1, 2, 0, 0, -1)), 1, 2, 0, 2, 0, 1);
    EXPECT_INVALID(moe_argsort(moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 0, NULL)), "argsort");
}

/* 100k expert ids (counting sort) and 100k wide keys (merge sort): sorted and stable. */
static void test_argsort_large(void) {
    enum { N = 100000 };
    const int32_t ranges[] = {64, 2000000000};
    for (int v = 0; v < 2; v++) {
        moe_step_reset();
        int32_t *key = malloc(sizeof(int32_t) * N);
        for (int i = 0; i < N; i++) key[i] = (int32_t)((uint32_t)(i * 2654435761u) % (uint32_t)ranges[v]) - ranges[v] / 2;
        moe_tensor *t = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, (int64_t[]){N}, key);
        moe_tensor *o = moe_argsort(t);
        CU_ASSERT_PTR_NOT_NULL_FATAL(o);
        const int32_t *p = o->data;
        char *seen = calloc(N, 1);
        int bad = 0;
        for (int i = 0; i < N; i++) {
            bad += p[i] < 0 || p[i] >= N || seen[p[i]];
            if (p[i] >= 0 && p[i] < N) seen[p[i]] = 1;
            if (i > 0 && !bad) bad += key[p[i - 1]] > key[p[i]] || (key[p[i - 1]] == key[p[i]] && p[i - 1] > p[i]);
        }
        CU_ASSERT_EQUAL(bad, 0);
        free(seen);
        free(key);
    }
}

/* ---- bincount / cumsum ---- */
static void test_bincount(void) {
    moe_step_reset();
    moe_tensor *empty = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, (int64_t[]){0});
    moe_tensor *b = moe_bincount(empty, 4);
    CU_ASSERT(b && b->ndim == 1 && b->shape[0] == 4 && b->dtype == MOE_I32);
    EXPECT(b, 0, 0, 0, 0);
    EXPECT(moe_bincount(I32(SHAPE(5), 1, 3, 1, 0, 1), 4), 1, 3, 0, 1);
    EXPECT_INVALID(moe_bincount(I32(SHAPE(3), 1, 4, 0), 4), "bincount", "value 4", "[0, 4)");
    EXPECT_INVALID(moe_bincount(I32(SHAPE(2), -1, 0), 4), "bincount", "value -1");
    EXPECT_INVALID(moe_bincount(I32(SHAPE(2, 1), 0, 0), 4), "bincount", "[2, 1]");
}

static void test_cumsum(void) {
    moe_step_reset();
    moe_tensor *x = I32(SHAPE(5), 3, 1, 4, 1, 5);
    EXPECT(moe_cumsum(x, false), 3, 4, 8, 9, 14);
    EXPECT(moe_cumsum(x, true), 0, 3, 4, 8, 9);
    moe_tensor *empty = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, (int64_t[]){0});
    moe_tensor *c = moe_cumsum(empty, true);
    CU_ASSERT(c && c->ndim == 1 && c->shape[0] == 0);
    EXPECT_INVALID(moe_cumsum(F64(SHAPE(2), 1, 2), false), "cumsum", "f64");
}

/* Assignments (t, j) of 3 tokens to 2 of 4 experts: (0,0)->2 (0,1)->0 (1,0)->2 (1,1)->3
 * (2,0)->0 (2,1)->2. By expert: 0 takes assignments 1, 4 (tokens 0, 2); 1 none; 2 takes
 * 0, 2, 5 (tokens 0, 1, 2); 3 takes 3 (token 1). */
static void test_route_plan(void) {
    moe_step_reset();
    moe_tensor *src, *offsets, *tok = moe_route_plan(I32(SHAPE(3, 2), 2, 0, 2, 3, 0, 2), 4, &src, &offsets);
    EXPECT(tok, 0, 2, 0, 1, 2, 1);
    EXPECT(src, 2, 0, 3, 5, 1, 4);
    EXPECT(offsets, 0, 2, 2, 5, 6);
    CU_ASSERT(src->ndim == 2 && src->shape[0] == 3 && src->shape[1] == 2 && src->dtype == MOE_I32);
    moe_tensor *empty = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 2, (int64_t[]){0, 2});
    CU_ASSERT_EQUAL(moe_tensor_numel(moe_route_plan(empty, 3, &src, &offsets)), 0);
    EXPECT(offsets, 0, 0, 0, 0);
    EXPECT_INVALID(moe_route_plan(I32(SHAPE(2, 1), 1, 4), 4, &src, &offsets), "route_plan", "expert id 4",
                   "position 1", "[0, 4)");
    CU_ASSERT_PTR_NULL(src);
    EXPECT_INVALID(moe_route_plan(I32(SHAPE(2), 1, 0), 4, &src, &offsets), "route_plan", "[T, k]", "[2]");
    EXPECT_INVALID(moe_route_plan(I32(SHAPE(2, 1), 1, 0), 0, &src, &offsets), "route_plan", "0 experts");
}

static void register_suites(void) {
    moe_test_add_suite("select", (moe_test_entry[]){{"embedding values and grad", test_embedding_values_and_grad},
                                                    {"embedding bad ids", test_embedding_bad_ids},
                                                    {"index_select", test_index_select},
                                                    {"index_add duplicates", test_index_add_duplicates},
                                                    {"index_add deterministic", test_index_add_deterministic},
                                                    {"gather / scatter_add values", test_gather_scatter_values},
                                                    {"gather / scatter_add errors", test_gather_scatter_errors},
                                                    {"combine values, grads, errors", test_combine_values_and_errors},
                                                    {"max backward", test_max_backward},
                                                    {NULL, NULL}});
    moe_test_add_suite("topk", (moe_test_entry[]){{"ties, k = 1, k = n", test_topk_ties_and_k},
                                                  {"grad", test_topk_grad},
                                                  {"against reference", test_topk_against_reference},
                                                  {NULL, NULL}});
    moe_test_add_suite("routing", (moe_test_entry[]){{"argsort stable", test_argsort_stable},
                                                     {"argsort large", test_argsort_large},
                                                     {"bincount", test_bincount},
                                                     {"cumsum", test_cumsum},
                                                     {"route_plan", test_route_plan},
                                                     {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
