/* Softmax family and norms on the CPU: exact values on hand examples, the -inf / large
 * value edge cases, NaN propagation, the fused backwards against the same function
 * built from elementwise ops on shapes large enough for the threaded paths, and the
 * error messages for bad shapes and dtypes. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "core/ops.h"
#include "tests/harness/testlib.h"

/* A STEP tensor of dtype dt (F32 or F64) holding the given values. */
static moe_tensor *make(moe_dtype dt, int ndim, const int64_t *shape, const double *v) {
    int64_t n = 1;
    for (int d = 0; d < ndim; d++) n *= shape[d];
    float f[256];
    CU_ASSERT_FATAL(n <= 256);
    for (int64_t i = 0; i < n; i++) f[i] = (float)v[i];
    return moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, dt, ndim, shape, dt == MOE_F32 ? (const void *)f : (const void *)v);
}

/* Every element of t equals want within tol (inf must match exactly, NaN must be NaN). */
static void expect_values(const moe_tensor *t, const double *want, int64_t n, double tol) {
    CU_ASSERT_FATAL(t != NULL);
    CU_ASSERT_EQUAL_FATAL(moe_tensor_numel(t), n);
    double got[256];
    CU_ASSERT_FATAL(n <= 256);
    CU_ASSERT_EQUAL_FATAL(moe_tensor_to_host_f64(t, got), MOE_OK);
    for (int64_t i = 0; i < n; i++) {
        bool ok = isnan(want[i])   ? isnan(got[i])
                  : isinf(want[i]) ? got[i] == want[i]
                                   : fabs(got[i] - want[i]) <= tol * fmax(1.0, fabs(want[i]));
        CU_ASSERT(ok);
        if (!ok) fprintf(stderr, "    element %lld: got %.17g, want %.17g\n", (long long)i, got[i], want[i]);
    }
}

static const moe_dtype float_types[2] = {MOE_F64, MOE_F32};
static double tol_of(moe_dtype dt) { return dt == MOE_F64 ? 1e-13 : 2e-6; }

static void test_softmax_large_values(void) {
    double e = exp(1.0), l1p = log1p(e);
    for (int k = 0; k < 2; k++) {
        moe_dtype dt = float_types[k];
        moe_tensor *x = make(dt, 2, (int64_t[]){2, 2}, (double[]){1000, 1001, -1000, -1001});
        expect_values(moe_softmax(x), (double[]){1 / (1 + e), e / (1 + e), e / (1 + e), 1 / (1 + e)}, 4, tol_of(dt));
        expect_values(moe_log_softmax(x), (double[]){-l1p, 1 - l1p, 1 - l1p, -l1p}, 4, tol_of(dt));
        expect_values(moe_logsumexp(x), (double[]){1001 + log1p(exp(-1.0)), -1000 + log1p(exp(-1.0))}, 2, tol_of(dt));
    }
    moe_step_reset();
}

static void test_softmax_single_finite(void) {
    double ninf = -INFINITY;
    for (int k = 0; k < 2; k++) {
        moe_dtype dt = float_types[k];
        moe_tensor *x = make(dt, 2, (int64_t[]){1, 3}, (double[]){ninf, 2, ninf});
        expect_values(moe_softmax(x), (double[]){0, 1, 0}, 3, tol_of(dt));
        expect_values(moe_log_softmax(x), (double[]){ninf, 0, ninf}, 3, tol_of(dt));
        expect_values(moe_logsumexp(x), (double[]){2}, 1, tol_of(dt));
    }
    moe_step_reset();
}

/* Documented: logsumexp of an all -inf row is -inf (not NaN), softmax gives 0 there,
 * log-softmax -inf, and the logsumexp grad of such a row is 0. */
static void test_all_neg_inf_row(void) {
    double ninf = -INFINITY;
    moe_tensor *x = moe_tensor_from_host(MOE_LIFE_PERSIST, MOE_CPU, MOE_F64, 2, (int64_t[]){2, 2},
                                         (double[]){ninf, ninf, 0, 1});
    x->requires_grad = true;
    moe_tensor *l = moe_logsumexp(x);
    expect_values(l, (double[]){ninf, log1p(exp(1.0))}, 2, 1e-14);
    expect_values(moe_softmax(x), (double[]){0, 0, 1 / (1 + exp(1.0)), exp(1.0) / (1 + exp(1.0))}, 4, 1e-14);
    expect_values(moe_log_softmax(x), (double[]){ninf, ninf, -log1p(exp(1.0)), 1 - log1p(exp(1.0))}, 4, 1e-14);
    /* d(sum of finite lse) / dx: pick the second row with a weight vector [0, 1] */
    moe_tensor *sel = make(MOE_F64, 1, (int64_t[]){2}, (double[]){0, 1});
    CU_ASSERT_EQUAL(moe_backward(moe_sum_all(moe_mul(l, sel))), MOE_OK);
    expect_values(x->grad, (double[]){0, 0, 1 / (1 + exp(1.0)), exp(1.0) / (1 + exp(1.0))}, 4, 1e-14);
    moe_step_reset();
    moe_tensor_free(x);
}

static void test_softmax_nan_propagates(void) {
    moe_tensor *x = make(MOE_F32, 1, (int64_t[]){3}, (double[]){1, NAN, 2});
    expect_values(moe_softmax(x), (double[]){NAN, NAN, NAN}, 3, 0);
    expect_values(moe_logsumexp(x), (double[]){NAN}, 1, 0);
    moe_step_reset();
}

/* The f32 kernels (vectorised exp) against the f64 ones on a threaded-size input with
 * a wide spread of values, one row fully -inf. */
static void test_softmax_f32_vs_f64(void) {
    const int64_t rows = 300, d = 96, n = rows * d;
    moe_tensor *x64 = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){rows, d}, 5, 0, 8.0);
    CU_ASSERT_FATAL(x64 != NULL);
    for (int64_t c = 0; c < d; c++) ((double *)x64->data)[7 * d + c] = -INFINITY;
    moe_tensor *x32 = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){rows, d});
    CU_ASSERT_FATAL(x32 && moe_tensor_copy_(x32, x64) == MOE_OK);
    moe_tensor *(*fns[3])(moe_tensor *) = {moe_softmax, moe_log_softmax, moe_logsumexp};
    double *a = malloc(sizeof(double) * (size_t)n), *b = malloc(sizeof(double) * (size_t)n);
    for (int f = 0; f < 3; f++) {
        moe_tensor *y64 = fns[f](x64), *y32 = fns[f](x32);
        CU_ASSERT_FATAL(y64 && y32);
        int64_t m = moe_tensor_numel(y64);
        moe_tensor_to_host_f64(y64, a);
        moe_tensor_to_host_f64(y32, b);
        double worst = 0;
        for (int64_t i = 0; i < m; i++) {
            if (isinf(a[i]) || isinf(b[i])) {
                CU_ASSERT(a[i] == b[i]);
                continue;
            }
            /* log outputs: absolute error relative to the row's scale; probabilities: absolute */
            worst = fmax(worst, fabs(a[i] - b[i]) / (f ? fmax(1.0, fabs(a[i])) : 1.0));
        }
        if (worst > 2e-6) fprintf(stderr, "    fn %d: worst error %.3g\n", f, worst);
        CU_ASSERT(worst <= 2e-6);
    }
    free(a);
    free(b);
    moe_step_reset();
}

static void test_rmsnorm_exact(void) {
    double r = 1 / sqrt(12.5);
    for (int k = 0; k < 2; k++) {
        moe_dtype dt = float_types[k];
        moe_tensor *x = make(dt, 2, (int64_t[]){2, 2}, (double[]){3, 4, 1, -1});
        moe_tensor *w = make(dt, 1, (int64_t[]){2}, (double[]){2, -1});
        expect_values(moe_rmsnorm(x, w, 0.0), (double[]){6 * r, -4 * r, 2, 1}, 4, tol_of(dt));
        expect_values(moe_rmsnorm(x, NULL, 0.0), (double[]){3 * r, 4 * r, 1, -1}, 4, tol_of(dt));
        /* eps: rows of zeros stay zero; eps = 3 on [1, -1] gives rstd 1/2 */
        moe_tensor *z = make(dt, 2, (int64_t[]){1, 3}, (double[]){0, 0, 0});
        expect_values(moe_rmsnorm(z, NULL, 1e-6), (double[]){0, 0, 0}, 3, 0);
        expect_values(moe_rmsnorm(x, NULL, 3.0), (double[]){3 / sqrt(15.5), 4 / sqrt(15.5), 0.5, -0.5}, 4, tol_of(dt));
    }
    moe_step_reset();
}

static void test_layernorm_exact(void) {
    /* x = [1, 2, 3, 4]: mean 2.5, biased var 1.25, rstd 1/sqrt(1.25) */
    for (int k = 0; k < 2; k++) {
        moe_dtype dt = float_types[k];
        moe_tensor *x = make(dt, 2, (int64_t[]){1, 4}, (double[]){1, 2, 3, 4});
        moe_tensor *w = make(dt, 1, (int64_t[]){4}, (double[]){1, 2, 1, 0.5});
        moe_tensor *b = make(dt, 1, (int64_t[]){4}, (double[]){0, 0, 1, -1});
        expect_values(moe_layernorm(x, w, b, 0.0),
                      (double[]){-1.3416407864998738, -0.8944271909999159, 1.4472135954999579, -0.3291796067500631}, 4,
                      tol_of(dt));
        expect_values(moe_layernorm(x, NULL, NULL, 0.0),
                      (double[]){-1.3416407864998738, -0.4472135954999579, 0.4472135954999579, 1.3416407864998738}, 4,
                      tol_of(dt));
        /* a constant row normalises to 0 (+ bias), finite thanks to eps */
        moe_tensor *c = make(dt, 2, (int64_t[]){1, 4}, (double[]){5, 5, 5, 5});
        expect_values(moe_layernorm(c, w, b, 1e-5), (double[]){0, 0, 1, -1}, 4, 0);
    }
    moe_step_reset();
}

/* ---- fused backward against the same function composed from elementwise ops ---- */
enum { LEAD0 = 3, LEAD1 = 100, DIM = 96 }; /* 28800 elements: threaded rows, 3 column blocks */

static moe_tensor *rms_ref(moe_tensor *x, moe_tensor *w, moe_tensor *b, double eps) {
    moe_tensor *r = moe_rsqrt(moe_add_scalar(moe_mean(moe_mul(x, x), -1, true), eps));
    return moe_mul(moe_mul(x, r), w);
}
static moe_tensor *rms_fused(moe_tensor *x, moe_tensor *w, moe_tensor *b, double eps) { return moe_rmsnorm(x, w, eps); }
static moe_tensor *ln_ref(moe_tensor *x, moe_tensor *w, moe_tensor *b, double eps) {
    moe_tensor *xc = moe_sub(x, moe_mean(x, -1, true));
    moe_tensor *r = moe_rsqrt(moe_add_scalar(moe_mean(moe_mul(xc, xc), -1, true), eps));
    return moe_add(moe_mul(moe_mul(xc, r), w), b);
}
static moe_tensor *ln_fused(moe_tensor *x, moe_tensor *w, moe_tensor *b, double eps) { return moe_layernorm(x, w, b, eps); }

typedef moe_tensor *(*norm_fn)(moe_tensor *, moe_tensor *, moe_tensor *, double);

/* Runs L = sum(f(x, w, b) * R) forward and backward; writes y and the grads of x, w, b. */
static void run_norm(norm_fn f, moe_tensor *const *leaves, moe_dtype dt, double *y, double **grads) {
    moe_step_reset();
    moe_tensor *v[3];
    for (int i = 0; i < 3; i++) { /* fresh leaves of dtype dt */
        v[i] = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, dt, leaves[i]->ndim, leaves[i]->shape);
        CU_ASSERT_FATAL(v[i] && moe_tensor_copy_(v[i], leaves[i]) == MOE_OK);
        v[i]->requires_grad = true;
    }
    /* x is handed over as a transposed-back view to exercise the non-contiguous path */
    moe_tensor *xt = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, dt, 3, (int64_t[]){LEAD0, DIM, LEAD1});
    CU_ASSERT_FATAL(xt && moe_tensor_copy_(xt, moe_transpose(v[0], 1, 2)) == MOE_OK);
    xt->requires_grad = true;
    moe_tensor *out = f(moe_transpose(xt, 1, 2), v[1], v[2], 1e-5);
    CU_ASSERT_FATAL(out != NULL);
    moe_tensor *r = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, dt, out->ndim, out->shape, 7, 0, 1.0);
    CU_ASSERT_EQUAL_FATAL(moe_backward(moe_sum_all(moe_mul(out, r))), MOE_OK);
    CU_ASSERT_EQUAL(moe_tensor_to_host_f64(out, y), MOE_OK);
    moe_tensor *gx = moe_contiguous(moe_transpose(xt->grad, 1, 2));
    CU_ASSERT_EQUAL(moe_tensor_to_host_f64(gx, grads[0]), MOE_OK);
    for (int i = 1; i < 3; i++) {
        if (!v[i]->grad) continue; /* rmsnorm has no bias */
        CU_ASSERT_EQUAL(moe_tensor_to_host_f64(v[i]->grad, grads[i]), MOE_OK);
    }
}

static double max_rel_err(const double *a, const double *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        num = fmax(num, fabs(a[i] - b[i]));
        den = fmax(den, fabs(b[i]));
    }
    return num / fmax(den, 1e-30);
}

static void compare_to_reference(norm_fn fused, norm_fn ref, int n_par) {
    const int64_t n = (int64_t)LEAD0 * LEAD1 * DIM, sizes[3] = {n, DIM, DIM};
    moe_tensor *leaves[3] = {
        moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F64, 3, (int64_t[]){LEAD0, LEAD1, DIM}, 1, 0, 2.0),
        moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F64, 1, (int64_t[]){DIM}, 2, 0, 1.0),
        moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F64, 1, (int64_t[]){DIM}, 3, 0, 1.0),
    };
    double *buf[3][4]; /* [fused f64, ref f64, fused f32][y, gx, gw, gb] */
    for (int k = 0; k < 3; k++) {
        buf[k][0] = calloc((size_t)n, sizeof(double));
        for (int i = 0; i < 3; i++) buf[k][1 + i] = calloc((size_t)sizes[i], sizeof(double));
    }
    run_norm(fused, leaves, MOE_F64, buf[0][0], &buf[0][1]);
    run_norm(ref, leaves, MOE_F64, buf[1][0], &buf[1][1]);
    run_norm(fused, leaves, MOE_F32, buf[2][0], &buf[2][1]);
    const int64_t all[4] = {n, n, DIM, DIM};
    for (int j = 0; j < 2 + n_par; j++) {
        double e64 = max_rel_err(buf[0][j], buf[1][j], all[j]), e32 = max_rel_err(buf[2][j], buf[0][j], all[j]);
        if (e64 > 1e-12 || e32 > 1e-5) fprintf(stderr, "    tensor %d: f64 vs ops %.3g, f32 vs f64 %.3g\n", j, e64, e32);
        CU_ASSERT(e64 <= 1e-12);
        CU_ASSERT(e32 <= 1e-5);
        double norm = 0;
        for (int64_t i = 0; i < all[j]; i++) norm += fabs(buf[0][j][i]);
        CU_ASSERT(norm > 0); /* the grads are not trivially zero */
    }
    for (int k = 0; k < 3; k++)
        for (int i = 0; i < 4; i++) free(buf[k][i]);
    for (int i = 0; i < 3; i++) moe_tensor_free(leaves[i]);
    moe_step_reset();
}

static void test_rmsnorm_backward_vs_ops(void) { compare_to_reference(rms_fused, rms_ref, 1); }
static void test_layernorm_backward_vs_ops(void) { compare_to_reference(ln_fused, ln_ref, 2); }

/* ---- errors ---- */
static void expect_error(moe_tensor *r, const char *const *parts) {
    CU_ASSERT(r == NULL);
    CU_ASSERT_EQUAL(moe_last_status(), MOE_ERR_INVALID);
    for (int i = 0; parts[i]; i++) {
        CU_ASSERT(strstr(moe_last_error(), parts[i]) != NULL);
        if (!strstr(moe_last_error(), parts[i])) fprintf(stderr, "    '%s' lacks '%s'\n", moe_last_error(), parts[i]);
    }
    moe_error_clear();
}

static void test_errors(void) {
    moe_tensor *x = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){4, 8});
    moe_tensor *w6 = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 1, (int64_t[]){6});
    moe_tensor *w8 = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 1, (int64_t[]){8});
    moe_tensor *w8d = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 1, (int64_t[]){8});
    moe_tensor *w2d = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){1, 8});
    moe_tensor *ids = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 2, (int64_t[]){4, 8});
    moe_tensor *scalar = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 0, NULL);
    moe_tensor *empty = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){4, 0});
    expect_error(moe_rmsnorm(x, w6, 1e-5), (const char *[]){"rmsnorm", "[4, 8]", "[6]", NULL});
    expect_error(moe_rmsnorm(x, w2d, 1e-5), (const char *[]){"rmsnorm", "[4, 8]", "[1, 8]", NULL});
    expect_error(moe_rmsnorm(x, w8d, 1e-5), (const char *[]){"rmsnorm", "dtype", "f64", NULL});
    expect_error(moe_layernorm(x, w8, w6, 1e-5), (const char *[]){"layernorm", "bias", "[4, 8]", "[6]", NULL});
    expect_error(moe_layernorm(x, w6, NULL, 1e-5), (const char *[]){"layernorm", "weight", "[6]", NULL});
    expect_error(moe_softmax(ids), (const char *[]){"softmax", "i32", NULL});
    expect_error(moe_log_softmax(scalar), (const char *[]){"log_softmax", "[]", NULL});
    expect_error(moe_logsumexp(empty), (const char *[]){"logsumexp", "[4, 0]", NULL});
    expect_error(moe_layernorm(empty, NULL, NULL, 1e-5), (const char *[]){"layernorm", "[4, 0]", NULL});
    /* NULL input (an upstream failure) gives NULL without touching the error */
    CU_ASSERT(moe_softmax(NULL) == NULL);
    CU_ASSERT(moe_rmsnorm(NULL, w8, 1e-5) == NULL);
    CU_ASSERT(moe_layernorm(NULL, NULL, NULL, 1e-5) == NULL);
    /* the valid call works */
    CU_ASSERT(moe_layernorm(x, w8, w8, 1e-5) != NULL);
    moe_step_reset();
}

static void register_suites(void) {
    moe_test_add_suite("softmax", (moe_test_entry[]){
        {"large values stay finite", test_softmax_large_values},
        {"one finite element among -inf", test_softmax_single_finite},
        {"all -inf row", test_all_neg_inf_row},
        {"NaN propagates", test_softmax_nan_propagates},
        {"f32 matches f64", test_softmax_f32_vs_f64},
        {NULL, NULL}});
    moe_test_add_suite("norm", (moe_test_entry[]){
        {"rmsnorm exact values", test_rmsnorm_exact},
        {"layernorm exact values", test_layernorm_exact},
        {"rmsnorm backward vs composed ops", test_rmsnorm_backward_vs_ops},
        {"layernorm backward vs composed ops", test_layernorm_backward_vs_ops},
        {NULL, NULL}});
    moe_test_add_suite("errors", (moe_test_entry[]){{"shapes and dtypes", test_errors}, {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
