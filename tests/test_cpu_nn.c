/* NN ops on the CPU: dropout mask statistics and reproducibility, RoPE identities
 * (position 0, inverse, relative position), attention against an explicit softmax over
 * the full score matrix (causal, non-causal, grouped-query, decode, several blocks,
 * strided inputs, deterministic backward), cut cross-entropy and its grads against the
 * naive log-softmax loss (ignored rows, vocabularies not divisible by the block, all rows
 * ignored), and the error messages of each op. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/kernels.h"
#include "core/memory.h"
#include "core/ops.h"
#include "core/philox.h"
#include "tests/harness/tensors.h"
#include "tests/harness/testlib.h"

/* max |a - b| / max(1, |b|) over n elements. */
static double max_rel_err(const double *a, const double *b, int64_t n) {
    double e = 0;
    for (int64_t i = 0; i < n; i++) e = fmax(e, fabs(a[i] - b[i]) / fmax(1.0, fabs(b[i])));
    return e;
}

/* ---------------- dropout ---------------- */

static void test_dropout_mask(void) {
    const int64_t n = 200000;
    const double p = 0.25;
    moe_tensor *ones = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 1, &n);
    CU_ASSERT_EQUAL_FATAL(moe_tensor_fill(ones, 1.0), MOE_OK);
    double *y = test_host_f64(moe_dropout(ones, p, 77, 1000));
    double *y2 = test_host_f64(moe_dropout(ones, p, 77, 1000));
    double *y3 = test_host_f64(moe_dropout(ones, p, 78, 1000));
    double *y4 = test_host_f64(moe_dropout(ones, p, 77, 1001));
    int64_t kept = 0, same_other_seed = 0;
    bool values_ok = true, repeat_ok = true, formula_ok = true, shift_ok = true;
    for (int64_t i = 0; i < n; i++) {
        bool keep = y[i] != 0;
        kept += keep;
        values_ok &= !keep || y[i] == (double)(float)(1.0 / (1.0 - p));
        repeat_ok &= y[i] == y2[i];
        formula_ok &= keep == (moe_philox_uniform(1000 + (uint64_t)i, 77) >= p);
        same_other_seed += (y3[i] != 0) == keep;
        if (i + 1 < n) shift_ok &= y4[i] == y[i + 1]; /* counter + 1 shifts the mask by one */
    }
    double frac = (double)kept / (double)n;
    CU_ASSERT(fabs(frac - (1 - p)) < 0.01);
    CU_ASSERT(values_ok);
    CU_ASSERT(repeat_ok);
    CU_ASSERT(formula_ok);
    CU_ASSERT(shift_ok);
    /* another seed gives another mask: agreement ~ p^2 + (1-p)^2 = 0.625, far from 1 */
    CU_ASSERT(fabs((double)same_other_seed / (double)n - 0.625) < 0.01);
    free(y);
    free(y2);
    free(y3);
    free(y4);
    moe_step_reset();
}

static void test_dropout_grad_and_edges(void) {
    int64_t s[2] = {3, 50};
    moe_tensor *x = test_leaf(MOE_F64, 2, s, 5);
    CU_ASSERT_PTR_EQUAL(moe_dropout(x, 0.0, 1, 0), x); /* p = 0: x itself, no node */
    moe_tensor *y = moe_dropout(x, 0.5, 9, 3);
    CU_ASSERT_EQUAL_FATAL(moe_backward(moe_sum_all(y)), MOE_OK);
    double *g = test_host_f64(x->grad), *yv = test_host_f64(y), *xv = test_host_f64(x);
    bool ok = true;
    for (int i = 0; i < 150; i++) ok &= g[i] == (yv[i] != 0 ? 2.0 : 0.0) && yv[i] == g[i] * xv[i];
    CU_ASSERT(ok);
    free(g);
    free(yv);
    free(xv);
    CU_ASSERT_PTR_NULL(moe_dropout(x, 1.0, 1, 0));
    CU_ASSERT_EQUAL(moe_last_status(), MOE_ERR_INVALID);
    CHECK_ERROR_HAS("dropout: p = 1 is outside [0, 1)");
    CU_ASSERT_PTR_NULL(moe_dropout(x, -0.1, 1, 0));
    moe_tensor_free(x);
    moe_step_reset();
}

/* ---------------- rope ---------------- */

static void test_rope_values(void) {
    /* hd = 2: one pair at frequency 1, so position p rotates (x0, x1) by p radians. */
    moe_tensor *x = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 4, (int64_t[]){1, 3, 1, 2},
                                         (double[]){1, 0, 1, 0, 0.5, 2});
    double *y = test_host_f64(moe_rope(x, 0, 10000.0));
    double want[6] = {1, 0, cos(1.0), sin(1.0), 0.5 * cos(2.0) - 2 * sin(2.0), 2 * cos(2.0) + 0.5 * sin(2.0)};
    CU_ASSERT(max_rel_err(y, want, 6) < 1e-15);
    free(y);
    /* hd = 4, theta = 100: pair 1 turns at 100^(-1/2) = 0.1 rad per position. */
    moe_tensor *x4 = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 4, (int64_t[]){1, 1, 1, 4},
                                          (double[]){1, 2, 3, 4});
    double *y4 = test_host_f64(moe_rope(x4, 5, 100.0));
    double want4[4] = {1 * cos(5.0) - 3 * sin(5.0), 2 * cos(0.5) - 4 * sin(0.5), 3 * cos(5.0) + 1 * sin(5.0),
                       4 * cos(0.5) + 2 * sin(0.5)};
    CU_ASSERT(max_rel_err(y4, want4, 4) < 1e-14);
    free(y4);
    moe_step_reset();
}

static void test_rope_identity_inverse_relative(void) {
    const int64_t s[4] = {2, 5, 3, 8};
    const int64_t n = 2 * 5 * 3 * 8;
    /* position 0 is the identity: token t = 0 with pos0 = 0 */
    moe_tensor *x = test_leaf(MOE_F64, 4, s, 11);
    double *xv = test_host_f64(x), *y0 = test_host_f64(moe_rope(x, 0, 10000.0));
    bool ident = true;
    for (int64_t b = 0; b < 2; b++)
        for (int64_t i = 0; i < 24; i++) ident &= y0[b * 120 + i] == xv[b * 120 + i];
    CU_ASSERT(ident);
    /* inverse undoes forward: the grad of sum(rope(x) * r) is rope^-1(r), and rope of it is r */
    moe_tensor *r = test_randn(MOE_F64, 4, s, 12);
    CU_ASSERT_EQUAL_FATAL(moe_backward(moe_sum_all(moe_mul(moe_rope(x, 7, 500.0), r))), MOE_OK);
    double *back = test_host_f64(moe_rope(x->grad, 7, 500.0)), *rv = test_host_f64(r);
    CU_ASSERT(max_rel_err(back, rv, n) < 1e-13);
    free(back);
    free(rv);
    free(xv);
    free(y0);
    moe_tensor_free(x);
    /* relative position: rope(q, m) . rope(k, n) depends on m - n only */
    const int64_t one[4] = {1, 1, 1, 16};
    moe_tensor *q = test_randn(MOE_F64, 4, one, 21), *k = test_randn(MOE_F64, 4, one, 22);
    double dots[3];
    const int64_t ms[3] = {3, 10, 1003}, ns[3] = {1, 8, 1001};
    for (int c = 0; c < 3; c++) {
        double *qa = test_host_f64(moe_rope(q, ms[c], 10000.0));
        double *ka = test_host_f64(moe_rope(k, ns[c], 10000.0));
        dots[c] = 0;
        for (int i = 0; i < 16; i++) dots[c] += qa[i] * ka[i];
        free(qa);
        free(ka);
    }
    CU_ASSERT(fabs(dots[0] - dots[1]) < 1e-12);
    CU_ASSERT(fabs(dots[0] - dots[2]) < 1e-10);
    /* and it does depend on the offset */
    double *qa = test_host_f64(moe_rope(q, 4, 10000.0));
    double *ka = test_host_f64(moe_rope(k, 1, 10000.0));
    double other = 0;
    for (int i = 0; i < 16; i++) other += qa[i] * ka[i];
    CU_ASSERT(fabs(other - dots[0]) > 1e-3);
    free(qa);
    free(ka);
    moe_step_reset();
}

static void test_rope_errors(void) {
    moe_tensor *x = test_randn(MOE_F32, 4, (int64_t[]){1, 2, 2, 5}, 1);
    CU_ASSERT_PTR_NULL(moe_rope(x, 0, 10000.0));
    CU_ASSERT_EQUAL(moe_last_status(), MOE_ERR_INVALID);
    CHECK_ERROR_HAS("rope");
    CHECK_ERROR_HAS("[1, 2, 2, 5] f32 cpu");
    CU_ASSERT_PTR_NULL(moe_rope(test_randn(MOE_F32, 3, (int64_t[]){2, 2, 4}, 1), 0, 10000.0));
    CHECK_ERROR_HAS("[2, 2, 4]");
    moe_step_reset();
}

/* ---------------- attention ---------------- */

/* Explicit attention over the full score matrix of one (b, h), from host arrays of
 * contiguous [B, T, H, hd] tensors. */
static void naive_attention(const double *q, const double *k, const double *v, double *o, int64_t B, int64_t Tq,
                            int64_t Tk, int64_t H, int64_t Hkv, int64_t hd, bool causal) {
    double scale = (double)(float)(1.0 / sqrt((double)hd));
    double *s = malloc(sizeof(double) * (size_t)(Tq * Tk));
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            int64_t kh = h / (H / Hkv);
            for (int64_t i = 0; i < Tq; i++) {
                double mx = -INFINITY;
                for (int64_t j = 0; j < Tk; j++) {
                    double d = 0;
                    for (int64_t e = 0; e < hd; e++)
                        d += q[((b * Tq + i) * H + h) * hd + e] * k[((b * Tk + j) * Hkv + kh) * hd + e];
                    bool masked = causal && j > Tk - Tq + i;
                    s[i * Tk + j] = masked ? -INFINITY : d * scale;
                    mx = fmax(mx, s[i * Tk + j]);
                }
                double sum = 0;
                for (int64_t j = 0; j < Tk; j++) sum += (s[i * Tk + j] = exp(s[i * Tk + j] - mx));
                for (int64_t e = 0; e < hd; e++) {
                    double acc = 0;
                    for (int64_t j = 0; j < Tk; j++) acc += s[i * Tk + j] / sum * v[((b * Tk + j) * Hkv + kh) * hd + e];
                    o[((b * Tq + i) * H + h) * hd + e] = acc;
                }
            }
        }
    }
    free(s);
}

/* moe_attention against the naive reference in f64 (and f32 within 1e-5). */
static void check_attention(int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t Hkv, int64_t hd, bool causal) {
    const int64_t sq[4] = {B, Tq, H, hd}, sk[4] = {B, Tk, Hkv, hd};
    moe_tensor *q = test_randn(MOE_F64, 4, sq, 31);
    moe_tensor *k = test_randn(MOE_F64, 4, sk, 32);
    moe_tensor *v = test_randn(MOE_F64, 4, sk, 33);
    double *qv = test_host_f64(q), *kv = test_host_f64(k), *vv = test_host_f64(v);
    int64_t no = B * Tq * H * hd;
    double *want = malloc(sizeof(double) * (size_t)no);
    naive_attention(qv, kv, vv, want, B, Tq, Tk, H, Hkv, hd, causal);
    double *got = test_host_f64(moe_attention(q, k, v, causal));
    double e64 = max_rel_err(got, want, no);
    CU_ASSERT(e64 < 1e-12);
    moe_tensor *q32 = moe_cast(q, MOE_F32);
    moe_tensor *k32 = moe_cast(k, MOE_F32);
    moe_tensor *v32 = moe_cast(v, MOE_F32);
    double *got32 = test_host_f64(moe_attention(q32, k32, v32, causal));
    double e32 = max_rel_err(got32, want, no);
    CU_ASSERT(e32 < 1e-5);
    if (!(e64 < 1e-12) || !(e32 < 1e-5))
        fprintf(stderr, "    attention B=%lld Tq=%lld Tk=%lld H=%lld Hkv=%lld hd=%lld causal=%d: err %.3g / %.3g\n",
                (long long)B, (long long)Tq, (long long)Tk, (long long)H, (long long)Hkv, (long long)hd, causal, e64,
                e32);
    free(qv);
    free(kv);
    free(vv);
    free(want);
    free(got);
    free(got32);
    moe_step_reset();
}

static void test_attention_naive(void) {
    check_attention(2, 5, 5, 2, 2, 4, true);
    check_attention(2, 5, 5, 2, 2, 4, false);
    check_attention(1, 70, 70, 4, 2, 8, true);    /* GQA, several query and key blocks */
    check_attention(2, 40, 100, 4, 2, 8, false);  /* non-causal, Tq != Tk */
    check_attention(1, 37, 130, 2, 1, 16, true);  /* causal with a cached prefix */
    check_attention(1, 50, 300, 2, 2, 8, false);  /* three key blocks: the running max moves */
    check_attention(1, 260, 260, 2, 1, 8, true);  /* causal, three query and key blocks */
    check_attention(1, 1, 7, 4, 2, 8, true);      /* decode: sees all 7 keys */
}

/* Decode: one causal query over 7 cached keys equals the non-causal result. */
static void test_attention_decode(void) {
    const int64_t sq[4] = {2, 1, 4, 8}, sk[4] = {2, 7, 2, 8};
    moe_tensor *q = test_randn(MOE_F64, 4, sq, 41);
    moe_tensor *k = test_randn(MOE_F64, 4, sk, 42);
    moe_tensor *v = test_randn(MOE_F64, 4, sk, 43);
    double *a = test_host_f64(moe_attention(q, k, v, true));
    double *b = test_host_f64(moe_attention(q, k, v, false));
    CU_ASSERT(max_rel_err(a, b, 64) == 0);
    /* and differs from attending to the first key only */
    double *first =
        test_host_f64(moe_attention(q, moe_slice(k, 1, 0, 1), moe_slice(v, 1, 0, 1), true));
    CU_ASSERT(max_rel_err(a, first, 64) > 1e-3);
    free(a);
    free(b);
    free(first);
    moe_step_reset();
}

/* Strided inputs: q, k, v as slices of one fused projection and as transposed layouts
 * give the same output and grads as contiguous copies; the f32 backward is bitwise
 * deterministic across runs. */
static void test_attention_strided_and_deterministic(void) {
    const int64_t B = 2, T = 48, H = 4, Hkv = 2, hd = 8;
    moe_tensor *fused = test_leaf(MOE_F32, 3, (int64_t[]){B * T, H + 2 * Hkv, hd}, 51);
    double *g1 = NULL, *g2 = NULL, *o1 = NULL;
    int64_t nf = moe_tensor_numel(fused);
    for (int run = 0; run < 3; run++) {
        moe_tensor *q, *k, *v, *r = test_randn(MOE_F32, 4, (int64_t[]){B, T, H, hd}, 52);
        if (run < 2) { /* slices of the fused [B*T, H + 2 Hkv, hd] rows: unit last stride */
            moe_tensor *f4 = moe_reshape(fused, 4, (int64_t[]){B, T, H + 2 * Hkv, hd});
            q = moe_slice(f4, 2, 0, H);
            k = moe_slice(f4, 2, H, H + Hkv);
            v = moe_slice(f4, 2, H + Hkv, H + 2 * Hkv);
        } else { /* contiguous copies */
            moe_tensor *f4 = moe_reshape(fused, 4, (int64_t[]){B, T, H + 2 * Hkv, hd});
            q = moe_contiguous(moe_slice(f4, 2, 0, H));
            k = moe_contiguous(moe_slice(f4, 2, H, H + Hkv));
            v = moe_contiguous(moe_slice(f4, 2, H + Hkv, H + 2 * Hkv));
        }
        moe_tensor *o = moe_attention(q, k, v, true);
        moe_status st = moe_backward(moe_sum_all(moe_mul(o, r)));
        if (st != MOE_OK) fprintf(stderr, "    backward: %s\n", moe_last_error());
        CU_ASSERT_EQUAL_FATAL(st, MOE_OK);
        double *g = test_host_f64(fused->grad), *ov = test_host_f64(o);
        if (run == 0) {
            g1 = g;
            o1 = ov;
        } else {
            CU_ASSERT(memcmp(o1, ov, sizeof(double) * (size_t)(B * T * H * hd)) == 0);
            if (run == 1) {
                CU_ASSERT(memcmp(g1, g, sizeof(double) * (size_t)nf) == 0); /* deterministic */
            } else {
                double e = 0;
                for (int64_t i = 0; i < nf; i++) e = fmax(e, fabs(g[i] - g1[i]));
                CU_ASSERT(e < 1e-6);
            }
            free(ov);
            if (run == 1) g2 = g;
            else free(g);
        }
        moe_zero_grad(&fused, 1);
        moe_step_reset();
    }
    free(g1);
    free(g2);
    free(o1);
    moe_tensor_free(fused);
}

static void test_attention_errors(void) {
    moe_tensor *q = test_randn(MOE_F32, 4, (int64_t[]){1, 5, 3, 4}, 1);
    moe_tensor *k = test_randn(MOE_F32, 4, (int64_t[]){1, 5, 2, 4}, 2);
    CU_ASSERT_PTR_NULL(moe_attention(q, k, k, true));
    CU_ASSERT_EQUAL(moe_last_status(), MOE_ERR_INVALID);
    CHECK_ERROR_HAS("attention");
    CHECK_ERROR_HAS("[1, 5, 3, 4] f32 cpu");
    CHECK_ERROR_HAS("[1, 5, 2, 4] f32 cpu");
    moe_tensor *q2 = test_randn(MOE_F32, 4, (int64_t[]){1, 6, 2, 4}, 3);
    CU_ASSERT_PTR_NULL(moe_attention(q2, k, k, true)); /* causal with Tq > Tk */
    CHECK_ERROR_HAS("Tq <= Tk");
    CU_ASSERT_PTR_NOT_NULL(moe_attention(q2, k, k, false));
    moe_tensor *k64 = test_randn(MOE_F64, 4, (int64_t[]){1, 5, 2, 4}, 2);
    CU_ASSERT_PTR_NULL(moe_attention(q2, k64, k64, false));
    CHECK_ERROR_HAS("dtype mismatch");
    moe_step_reset();
}

/* ---------------- cross-entropy ---------------- */

/* Naive mean loss and grads over the full [T, V] logits. */
static double naive_ce(const double *h, const double *w, const int32_t *tg, int64_t T, int64_t V, int64_t d,
                       double *dh, double *dw) {
    double *lg = malloc(sizeof(double) * (size_t)V);
    double loss = 0;
    int64_t count = 0;
    for (int64_t t = 0; t < T; t++) count += tg[t] != -1;
    memset(dh, 0, sizeof(double) * (size_t)(T * d));
    memset(dw, 0, sizeof(double) * (size_t)(V * d));
    for (int64_t t = 0; t < T; t++) {
        if (tg[t] == -1) continue;
        double mx = -INFINITY, sum = 0;
        for (int64_t c = 0; c < V; c++) {
            lg[c] = 0;
            for (int64_t e = 0; e < d; e++) lg[c] += h[t * d + e] * w[c * d + e];
            mx = fmax(mx, lg[c]);
        }
        for (int64_t c = 0; c < V; c++) sum += exp(lg[c] - mx);
        double lse = mx + log(sum);
        loss += lse - lg[tg[t]];
        for (int64_t c = 0; c < V; c++) {
            double G = (exp(lg[c] - lse) - (c == tg[t])) / (double)count;
            for (int64_t e = 0; e < d; e++) {
                dh[t * d + e] += G * w[c * d + e];
                dw[c * d + e] += G * h[t * d + e];
            }
        }
    }
    free(lg);
    return count ? loss / (double)count : 0;
}

/* moe_cross_entropy (f64) loss and grads against the naive ones for a block size. */
static void check_ce(int64_t T, int64_t V, int64_t d, int64_t block, const int32_t *tg, double tol) {
    moe_tensor *h = test_leaf(MOE_F64, 2, (int64_t[]){T, d}, 61);
    moe_tensor *w = test_leaf(MOE_F64, 2, (int64_t[]){V, d}, 62);
    moe_tensor *tt = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, &T, tg);
    double *hv = test_host_f64(h), *wv = test_host_f64(w);
    double *dh = malloc(sizeof(double) * (size_t)(T * d));
    double *dw = malloc(sizeof(double) * (size_t)(V * d));
    double want = naive_ce(hv, wv, tg, T, V, d, dh, dw);
    moe_cross_entropy_set_block(block);
    moe_tensor *loss = moe_cross_entropy(h, w, tt);
    moe_cross_entropy_set_block(0);
    CU_ASSERT_PTR_NOT_NULL_FATAL(loss);
    CU_ASSERT_EQUAL(loss->ndim, 0);
    double got = moe_tensor_item(loss);
    CU_ASSERT(fabs(got - want) <= tol * fmax(1.0, fabs(want)));
    CU_ASSERT_EQUAL_FATAL(moe_backward(loss), MOE_OK);
    double *gh = test_host_f64(h->grad), *gw = test_host_f64(w->grad);
    double eh = max_rel_err(gh, dh, T * d), ew = max_rel_err(gw, dw, V * d);
    CU_ASSERT(eh <= tol && ew <= tol);
    if (!(fabs(got - want) <= tol * fmax(1.0, fabs(want))) || !(eh <= tol && ew <= tol))
        fprintf(stderr, "    ce T=%lld V=%lld block=%lld: loss %.17g vs %.17g, dh err %.3g, dw err %.3g\n",
                (long long)T, (long long)V, (long long)block, got, want, eh, ew);
    free(hv);
    free(wv);
    free(dh);
    free(dw);
    free(gh);
    free(gw);
    moe_tensor_free(h);
    moe_tensor_free(w);
    moe_step_reset();
}

static void test_ce_naive(void) {
    const int32_t tg[9] = {3, -1, 36, 0, 8, 9, -1, 17, 36};
    check_ce(9, 37, 5, 8, tg, 1e-6);     /* 5 blocks, the last of 5 rows; inv_count is a float */
    check_ce(9, 37, 5, 37, tg, 1e-6);    /* one block */
    check_ce(9, 37, 5, 0, tg, 1e-6);     /* default block > V */
    const int32_t tg2[6] = {2099, 2048, 2047, -1, 0, 1000};
    check_ce(6, 2100, 4, 0, tg2, 1e-6);  /* default block 2048: a full and a partial block */
}

/* f32 matches f64 for blocks of 8 and the default. */
static void test_ce_f32(void) {
    const int64_t T = 16, V = 301, d = 24;
    int32_t tg[16];
    for (int i = 0; i < 16; i++) tg[i] = i == 5 ? -1 : (i * 37) % 301;
    moe_tensor *tt = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, &T, tg);
    moe_tensor *h = test_randn(MOE_F64, 2, (int64_t[]){T, d}, 71);
    moe_tensor *w = test_randn(MOE_F64, 2, (int64_t[]){V, d}, 72);
    double ref = moe_tensor_item(moe_cross_entropy(h, w, tt));
    moe_cross_entropy_set_block(8);
    double b8 = moe_tensor_item(moe_cross_entropy(moe_cast(h, MOE_F32), moe_cast(w, MOE_F32), tt));
    moe_cross_entropy_set_block(0);
    double bd = moe_tensor_item(moe_cross_entropy(moe_cast(h, MOE_F32), moe_cast(w, MOE_F32), tt));
    CU_ASSERT(fabs(b8 - ref) < 1e-5 * fabs(ref));
    CU_ASSERT(fabs(bd - ref) < 1e-5 * fabs(ref));
    moe_step_reset();
}

static void test_ce_all_ignored(void) {
    const int64_t T = 4;
    const int32_t tg[4] = {-1, -1, -1, -1};
    moe_tensor *h = test_leaf(MOE_F32, 2, (int64_t[]){T, 3}, 81);
    moe_tensor *w = test_leaf(MOE_F32, 2, (int64_t[]){10, 3}, 82);
    moe_tensor *tt = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, &T, tg);
    moe_tensor *loss = moe_cross_entropy(h, w, tt);
    CU_ASSERT_PTR_NOT_NULL_FATAL(loss);
    CU_ASSERT_EQUAL(moe_tensor_item(loss), 0.0);
    CU_ASSERT_EQUAL_FATAL(moe_backward(loss), MOE_OK);
    double *gh = test_host_f64(h->grad), *gw = test_host_f64(w->grad);
    bool zero = true;
    for (int i = 0; i < 12; i++) zero &= gh[i] == 0;
    for (int i = 0; i < 30; i++) zero &= gw[i] == 0;
    CU_ASSERT(zero);
    free(gh);
    free(gw);
    moe_tensor_free(h);
    moe_tensor_free(w);
    moe_step_reset();
}

static void test_ce_errors(void) {
    const int64_t T = 5;
    moe_tensor *h = test_randn(MOE_F32, 2, (int64_t[]){T, 3}, 1);
    moe_tensor *w = test_randn(MOE_F32, 2, (int64_t[]){37, 3}, 2);
    const int32_t bad_hi[5] = {0, 1, -1, 37, 2}, bad_lo[5] = {0, -2, 1, 1, 1};
    CU_ASSERT_PTR_NULL(moe_cross_entropy(h, w, moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, &T, bad_hi)));
    CU_ASSERT_EQUAL(moe_last_status(), MOE_ERR_INVALID);
    CHECK_ERROR_HAS("cross_entropy: target 37 at row 3 is out of range [0, 37)");
    CU_ASSERT_PTR_NULL(moe_cross_entropy(h, w, moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, &T, bad_lo)));
    CHECK_ERROR_HAS("target -2 at row 1");
    /* shape mismatch: d differs */
    moe_tensor *w4 = test_randn(MOE_F32, 2, (int64_t[]){37, 4}, 3);
    moe_tensor *ok_t = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, &T, (int32_t[]){0, 1, 2, 3, 4});
    CU_ASSERT_PTR_NULL(moe_cross_entropy(h, w4, ok_t));
    CU_ASSERT_EQUAL(moe_last_status(), MOE_ERR_INVALID);
    CHECK_ERROR_HAS("cross_entropy");
    CHECK_ERROR_HAS("[5, 3] f32 cpu");
    CHECK_ERROR_HAS("[37, 4] f32 cpu");
    /* targets of the wrong length */
    int64_t four = 4;
    CU_ASSERT_PTR_NULL(moe_cross_entropy(h, w, moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, &four,
                                                                     (int32_t[]){0, 1, 2, 3})));
    CHECK_ERROR_HAS("targets must be [5] i32");
    moe_step_reset();
}

/* A kernel's own step-arena scratch (the cross-entropy kernel takes a [T, block] logits
 * block and a [T] buffer) goes back when moe_kernel_run returns; mark / release rewind. */
static void test_kernel_scratch_released(void) {
    moe_step_reset();
    moe_tensor *h = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){64, 16}, 3, 0, 1.0);
    moe_tensor *w = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){300, 16}, 4, 0, 1.0);
    moe_tensor *tg = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, (int64_t[]){64});
    moe_tensor *rows = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 1, (int64_t[]){64});
    moe_tensor *lse = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 1, (int64_t[]){64});
    CU_ASSERT_FATAL(h && w && tg && rows && lse);
    moe_ce_attrs at = {.block = 128, .inv_count = 1.0f / 64};
    const size_t before = moe_mem_get_stats(MOE_CPU).step_bytes;
    CU_ASSERT_EQUAL(moe_kernel_run(MOE_K_CROSS_ENTROPY, &(moe_kernel_args){.out = rows, .out2 = lse,
                                                                             .in = {h, w, tg}, .attrs = &at}),
                    MOE_OK);
    CU_ASSERT_EQUAL(moe_mem_get_stats(MOE_CPU).step_bytes, before);
    CU_ASSERT(isfinite(((float *)lse->data)[0]));
    moe_mem_mark m = moe_mem_step_mark(MOE_CPU);
    void *p1 = moe_mem_alloc(MOE_CPU, MOE_LIFE_STEP, 1 << 20);
    CU_ASSERT(moe_mem_get_stats(MOE_CPU).step_bytes >= before + (1 << 20));
    moe_mem_step_release(MOE_CPU, m);
    CU_ASSERT_EQUAL(moe_mem_get_stats(MOE_CPU).step_bytes, before);
    CU_ASSERT_PTR_EQUAL(moe_mem_alloc(MOE_CPU, MOE_LIFE_STEP, 1 << 20), p1);
    moe_step_reset();
}

/* The step arena's top end (a freeing backward's memory): it grows downwards; a block
 * given back is reused, best fit, from its upper end; a top mark gives back every block
 * taken since; blocks given back at the front return to it, so the next block is at the
 * very top again. */
static void test_top_end_blocks(void) {
    moe_step_reset();
    moe_mem_step_from_top(true);
    const size_t base = moe_mem_get_stats(MOE_CPU).step_bytes;
    char *a = moe_mem_alloc(MOE_CPU, MOE_LIFE_STEP, 1000), *b = moe_mem_alloc(MOE_CPU, MOE_LIFE_STEP, 4096),
         *c = moe_mem_alloc(MOE_CPU, MOE_LIFE_STEP, 1000);
    CU_ASSERT_FATAL(a && b && c);
    CU_ASSERT(b + 4096 == a && c + 1024 == b);
    CU_ASSERT(moe_mem_step_give_back(MOE_CPU, b, 4096));
    CU_ASSERT(!moe_mem_step_give_back(MOE_CPU, b, 4096)); /* not live any more */
    CU_ASSERT(!moe_mem_step_give_back(MOE_CPU, a, 500));  /* not its size */
    CU_ASSERT(!moe_mem_step_give_back(MOE_CPU, a, 1024)); /* its aligned size, not the size asked */
    CU_ASSERT(!moe_mem_step_give_back(MOE_CPU, a, 0));    /* an empty view at its start */
    CU_ASSERT(!moe_mem_step_give_back(MOE_CPU, a + 256, 512)); /* not a block's start */
    CU_ASSERT_EQUAL(moe_mem_get_stats(MOE_CPU).step_bytes, base + 2048);
    moe_mem_mark m = moe_mem_step_mark(MOE_CPU);
    char *d = moe_mem_alloc(MOE_CPU, MOE_LIFE_STEP, 2048), *e = moe_mem_alloc(MOE_CPU, MOE_LIFE_STEP, 256);
    CU_ASSERT_PTR_EQUAL(d, b + 2048);
    CU_ASSERT_PTR_EQUAL(e, b + 2048 - 256);
    moe_mem_step_release(MOE_CPU, m); /* d and e back: b's hole is whole again */
    char *f = moe_mem_alloc(MOE_CPU, MOE_LIFE_STEP, 4096);
    CU_ASSERT_PTR_EQUAL(f, b);
    CU_ASSERT(moe_mem_step_give_back(MOE_CPU, c, 1000));
    CU_ASSERT(moe_mem_step_give_back(MOE_CPU, a, 1000)); /* a hole between two live blocks' ends */
    CU_ASSERT(moe_mem_step_give_back(MOE_CPU, f, 4096)); /* reaches the front: all three return */
    CU_ASSERT_EQUAL(moe_mem_get_stats(MOE_CPU).step_bytes, base);
    CU_ASSERT_PTR_EQUAL(moe_mem_alloc(MOE_CPU, MOE_LIFE_STEP, 1000), a);
    moe_mem_step_from_top(false);
    moe_step_reset();
}

static void register_suites(void) {
    moe_test_add_suite("dropout", (moe_test_entry[]){{"mask statistics and reproducibility", test_dropout_mask},
                                                     {"grad, p = 0 and bad p", test_dropout_grad_and_edges},
                                                     {NULL, NULL}});
    moe_test_add_suite("rope", (moe_test_entry[]){{"hand-computed values", test_rope_values},
                                                  {"identity, inverse, relative position",
                                                   test_rope_identity_inverse_relative},
                                                  {"errors", test_rope_errors},
                                                  {NULL, NULL}});
    moe_test_add_suite("attention", (moe_test_entry[]){{"equals the naive softmax", test_attention_naive},
                                                       {"decode sees every cached key", test_attention_decode},
                                                       {"strided inputs, deterministic backward",
                                                        test_attention_strided_and_deterministic},
                                                       {"errors", test_attention_errors},
                                                       {NULL, NULL}});
    moe_test_add_suite("cross_entropy", (moe_test_entry[]){{"equals the naive loss and grads", test_ce_naive},
                                                           {"f32 against f64", test_ce_f32},
                                                           {"all targets ignored", test_ce_all_ignored},
                                                           {"errors", test_ce_errors},
                                                           {"kernel scratch goes back", test_kernel_scratch_released},
                                                           {"the top end's blocks", test_top_end_blocks},
                                                           {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
