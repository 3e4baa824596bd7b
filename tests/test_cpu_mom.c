/* The delta-rule scan op and the MoM / gated-delta-net layer: recurrent and chunked forms
 * agree (op and layer), hand-computed values, error messages, a whole-layer gradient
 * check, constant generation memory, and the configuration variants. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "core/ops.h"
#include "moe/model/mom.h"
#include "tests/harness/testlib.h"

static moe_tensor *randn(moe_dtype dt, int ndim, const int64_t *shape, uint64_t seed, double std) {
    return moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, dt, ndim, shape, seed, 0, std);
}

/* Uniform-ish values in (lo, hi): lo + (hi - lo) * sigmoid(normal). */
static moe_tensor *unit(moe_dtype dt, int ndim, const int64_t *shape, uint64_t seed, double lo, double hi) {
    return moe_add_scalar(moe_mul_scalar(moe_sigmoid(randn(dt, ndim, shape, seed, 1.5)), hi - lo), lo);
}

static double *host(const moe_tensor *t) {
    double *h = malloc(sizeof(double) * (size_t)moe_tensor_numel(t));
    CU_ASSERT_FATAL(h && moe_tensor_to_host_f64(t, h) == MOE_OK);
    return h;
}

/* ||a - b|| / ||b|| */
static double rel_err(const moe_tensor *a, const moe_tensor *b) {
    CU_ASSERT_FATAL(a && b && moe_tensor_numel(a) == moe_tensor_numel(b));
    double *x = host(a), *y = host(b), num = 0, den = 0;
    for (int64_t i = 0; i < moe_tensor_numel(a); i++) {
        num += (x[i] - y[i]) * (x[i] - y[i]);
        den += y[i] * y[i];
    }
    free(x);
    free(y);
    return sqrt(num) / fmax(sqrt(den), 1e-300);
}

/* ---- the op ---- */
typedef struct {
    moe_tensor *q, *k, *v, *b, *a, *s0;
} scan_inputs;

/* Realistic inputs: q, k unit-norm rows (as the layer gives), beta, alpha in (0.05, 0.95)
 * except alpha in (0.9, 1) when slow (long memories). */
static scan_inputs make_inputs(moe_dtype dt, int64_t N, int64_t T, int64_t H, int64_t dk, int64_t dv, uint64_t seed,
                               bool slow) {
    int64_t qs[4] = {N, T, H, dk}, vs[4] = {N, T, H, dv}, bs[3] = {N, T, H}, ss[4] = {N, H, dk, dv};
    scan_inputs in;
    in.q = moe_mul_scalar(moe_rmsnorm(randn(dt, 4, qs, seed, 1), NULL, 1e-9), 1 / sqrt((double)dk));
    in.k = moe_mul_scalar(moe_rmsnorm(randn(dt, 4, qs, seed + 1, 1), NULL, 1e-9), 1 / sqrt((double)dk));
    in.v = randn(dt, 4, vs, seed + 2, 1);
    in.b = unit(dt, 3, bs, seed + 3, 0.05, 0.95);
    in.a = slow ? unit(dt, 3, bs, seed + 4, 0.9, 1.0) : unit(dt, 3, bs, seed + 4, 0.05, 0.95);
    in.s0 = randn(dt == MOE_F64 ? MOE_F64 : MOE_F32, 4, ss, seed + 5, 0.5);
    CU_ASSERT_FATAL(in.q && in.k && in.v && in.b && in.a && in.s0);
    return in;
}

/* Recurrent vs chunked outputs and final states for several T not divisible by C. */
static void forms_agree(moe_dtype dt, double tol) {
    const int64_t Ts[] = {1, 5, 7, 13, 37, 100}, Cs[] = {2, 3, 4, 8, 16, 64};
    double worst = 0;
    for (int delta = 0; delta < 2; delta++)
        for (size_t i = 0; i < sizeof Ts / sizeof *Ts; i++)
            for (int with_s0 = 0; with_s0 < 2; with_s0++) {
                moe_step_reset();
                scan_inputs in = make_inputs(dt, 2, Ts[i], 3, 8, 4, 100 + i, i % 2);
                moe_tensor *s0 = with_s0 ? in.s0 : NULL, *sr = NULL, *sc = NULL;
                moe_tensor *orec = moe_delta_scan(in.q, in.k, in.v, in.b, in.a, s0, delta, &sr);
                moe_tensor *och = moe_delta_scan_chunked(in.q, in.k, in.v, in.b, in.a, s0, delta, Cs[i], &sc);
                CU_ASSERT_FATAL(orec && och && sr && sc);
                double e = fmax(rel_err(och, orec), rel_err(sc, sr));
                if (dt == MOE_F32) { /* and against the f64 recurrence of the same (f32) values */
                    moe_tensor *c[5] = {in.q, in.k, in.v, in.b, in.a};
                    for (int j = 0; j < 5; j++) c[j] = moe_cast(c[j], MOE_F64);
                    moe_tensor *ref = moe_delta_scan(c[0], c[1], c[2], c[3], c[4], s0 ? moe_cast(s0, MOE_F64) : NULL,
                                                     delta, NULL);
                    e = fmax(e, rel_err(och, ref));
                }
                worst = fmax(worst, e);
                if (!(e <= tol))
                    fprintf(stderr, "  %s %s T=%lld C=%lld s0=%d: rel err %.3g > %.1g\n", moe_dtype_name(dt),
                            delta ? "delta" : "gla", (long long)Ts[i], (long long)Cs[i], with_s0, e, tol);
                CU_ASSERT(e <= tol);
            }
    fprintf(stderr, "  %s: worst recurrent-vs-chunked relative error %.3g (tol %.1g)\n", moe_dtype_name(dt), worst, tol);
}

static void test_forms_agree_f64(void) { forms_agree(MOE_F64, 1e-10); }
static void test_forms_agree_f32(void) { forms_agree(MOE_F32, 1e-4); }

/* The backward of both forms gives the same grads (it is one algorithm fed with the
 * checkpoints of either forward). */
static void test_grads_agree(void) {
    double *g[2][6];
    for (int form = 0; form < 2; form++) {
        moe_step_reset();
        scan_inputs in = make_inputs(MOE_F64, 2, 11, 2, 4, 3, 7, false);
        moe_tensor *p[6] = {in.q, in.k, in.v, in.b, in.a, in.s0};
        moe_tensor *leaf[6];
        for (int j = 0; j < 6; j++) {
            leaf[j] = moe_tensor_to(p[j], MOE_CPU, MOE_LIFE_PERSIST);
            leaf[j]->requires_grad = leaf[j]->is_param = true;
        }
        moe_tensor *o = form ? moe_delta_scan_chunked(leaf[0], leaf[1], leaf[2], leaf[3], leaf[4], leaf[5], true, 4, NULL)
                             : moe_delta_scan(leaf[0], leaf[1], leaf[2], leaf[3], leaf[4], leaf[5], true, NULL);
        moe_tensor *r = randn(MOE_F64, 4, o->shape, 3, 1);
        CU_ASSERT_FATAL(moe_backward(moe_sum_all(moe_mul(o, r))) == MOE_OK);
        for (int j = 0; j < 6; j++) {
            CU_ASSERT_FATAL(leaf[j]->grad != NULL);
            g[form][j] = host(leaf[j]->grad);
        }
        for (int j = 0; j < 6; j++) {
            int64_t n = moe_tensor_numel(leaf[j]);
            if (form)
                for (int64_t i = 0; i < n; i++) CU_ASSERT(fabs(g[0][j][i] - g[1][j][i]) <= 1e-10 * (1 + fabs(g[0][j][i])));
            moe_tensor_free(leaf[j]);
        }
    }
    for (int f = 0; f < 2; f++)
        for (int j = 0; j < 6; j++) free(g[f][j]);
}

/* N = T = 2, H = 1, dk = 2, dv = 1, computed by hand:
 * step 0: k = (1, 0), v = 2, beta = 0.5, alpha = 0.5, q = (1, 1)
 *   delta: w = 0.5 (2 - 0) = 1, S = (1, 0)^T, o = 1;            gla: S = (2, 0)^T, o = 2
 * step 1: k = (0.6, 0.8), v = 1, beta = 1, alpha = 0.5, q = (1, 0)
 *   delta: u = 0.6, w = 1 - 0.5 * 0.6 = 0.7, S = (0.5 + 0.42, 0.56)^T, o = 0.92
 *   gla:   S = (1 + 0.6, 0.8)^T, o = 1.6 */
static void test_hand_example(void) {
    moe_step_reset();
    double q[] = {1, 1, 1, 0}, k[] = {1, 0, 0.6, 0.8}, v[] = {2, 1}, b[] = {0.5, 1}, a[] = {0.5, 0.5};
    moe_tensor *tq = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 4, (int64_t[]){1, 2, 1, 2}, q);
    moe_tensor *tk = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 4, (int64_t[]){1, 2, 1, 2}, k);
    moe_tensor *tv = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 4, (int64_t[]){1, 2, 1, 1}, v);
    moe_tensor *tb = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 3, (int64_t[]){1, 2, 1}, b);
    moe_tensor *ta = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 3, (int64_t[]){1, 2, 1}, a);
    const double want_o[2][2] = {{2, 1.6}, {1, 0.92}}, want_s[2][2] = {{1.6, 0.8}, {0.92, 0.56}};
    for (int delta = 0; delta < 2; delta++)
        for (int chunked = 0; chunked < 2; chunked++) {
            moe_tensor *s = NULL;
            moe_tensor *o = chunked ? moe_delta_scan_chunked(tq, tk, tv, tb, ta, NULL, delta, 2, &s)
                                    : moe_delta_scan(tq, tk, tv, tb, ta, NULL, delta, &s);
            CU_ASSERT_FATAL(o && s);
            const double *od = o->data, *sd = s->data;
            CU_ASSERT_DOUBLE_EQUAL(od[0], want_o[delta][0], 1e-14);
            CU_ASSERT_DOUBLE_EQUAL(od[1], want_o[delta][1], 1e-14);
            CU_ASSERT_DOUBLE_EQUAL(sd[0], want_s[delta][0], 1e-14);
            CU_ASSERT_DOUBLE_EQUAL(sd[1], want_s[delta][1], 1e-14);
        }
}

static void test_errors(void) {
    moe_step_reset();
    scan_inputs in = make_inputs(MOE_F32, 2, 5, 2, 4, 3, 1, false);
    moe_tensor *bad_v = randn(MOE_F32, 4, (int64_t[]){2, 6, 2, 3}, 9, 1);
    CU_ASSERT_PTR_NULL(moe_delta_scan(in.q, in.k, bad_v, in.b, in.a, NULL, true, NULL));
    const char *e = moe_last_error();
    CU_ASSERT(strstr(e, "delta_scan") && strstr(e, "[2, 6, 2, 3]") && strstr(e, "[2, 5, 2, 4]"));
    moe_tensor *bad_s = randn(MOE_F32, 4, (int64_t[]){2, 2, 3, 4}, 9, 1);
    CU_ASSERT_PTR_NULL(moe_delta_scan(in.q, in.k, in.v, in.b, in.a, bad_s, true, NULL));
    CU_ASSERT(strstr(moe_last_error(), "state0") && strstr(moe_last_error(), "[2, 2, 4, 3]"));
    CU_ASSERT_PTR_NULL(moe_delta_scan_chunked(in.q, in.k, in.v, in.b, in.a, NULL, true, 0, NULL));
    CU_ASSERT(strstr(moe_last_error(), "chunk") != NULL);
    CU_ASSERT_PTR_NULL(moe_delta_scan(in.q, in.k, in.v, moe_cast(in.b, MOE_F64), in.a, NULL, true, NULL));
    CU_ASSERT(strstr(moe_last_error(), "delta_scan") != NULL);
}

/* ---- the layer ---- */
static moe_mom_settings settings(int M, int k, bool shared, bool delta) {
    return (moe_mom_settings){.d_model = 8, .n_memories = M, .top_k = k, .shared = shared, .n_heads = 2,
                              .delta = delta, .chunk = 3, .aux_coef = 1e-3, .norm_eps = 1e-6};
}

/* Training forward on x [B, T, d] vs T single-token generation calls. */
static double train_vs_generate(moe_mom_layer *L, int64_t B, int64_t T, uint64_t seed) {
    moe_step_reset();
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F64, 3, (int64_t[]){B, T, 8}, seed, 0, 1.0);
    moe_mom_result res;
    moe_tensor *y = moe_mom_layer_forward(L, x, MOE_F64, NULL, NULL, &res);
    CU_ASSERT_FATAL(y != NULL);
    double *yt = host(y), num = 0, den = 0;
    moe_tensor *state = moe_mom_state_zeros(L, B, MOE_F64, MOE_CPU, MOE_LIFE_PERSIST);
    CU_ASSERT_FATAL(state != NULL);
    for (int64_t t = 0; t < T; t++) {
        moe_step_reset();
        moe_tensor *next = NULL;
        moe_tensor *yg = moe_mom_layer_forward(L, moe_slice(x, 1, t, t + 1), MOE_F64, state, &next, &res);
        CU_ASSERT_FATAL(yg != NULL && next != NULL);
        CU_ASSERT_FATAL(moe_tensor_copy_(state, next) == MOE_OK);
        double *g = host(yg);
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < 8; j++) {
                double ref = yt[(b * T + t) * 8 + j];
                num += (g[b * 8 + j] - ref) * (g[b * 8 + j] - ref);
                den += ref * ref;
            }
        free(g);
    }
    free(yt);
    moe_tensor_free(state);
    moe_tensor_free(x);
    return sqrt(num / den);
}

/* The training form (routed tokens gathered into padded buckets) against the generation
 * form (every memory steps on every token) on B sequences of T tokens. */
static void check_train_vs_generate(int M, int k, bool shared, bool delta, int64_t B, int64_t T) {
    moe_mom_layer L;
    moe_mom_settings s = settings(M, k, shared, delta);
    CU_ASSERT_FATAL(moe_mom_layer_init(&L, &s, "t.mom", MOE_CPU, 5, 0.5) == MOE_OK);
    double e = train_vs_generate(&L, B, T, 77);
    fprintf(stderr, "  M=%d k=%d shared=%d %s, %lld x %lld tokens: training vs generation relative error %.3g\n", M, k,
            shared, delta ? "delta" : "gla", (long long)B, (long long)T, e);
    CU_ASSERT(e < 1e-10);
    moe_mom_layer_free(&L);
}

static void test_layer_train_equals_generate(void) {
    check_train_vs_generate(8, 1, true, true, 1, 4); /* 4 tokens, 8 memories: empty buckets */
    check_train_vs_generate(3, 2, true, true, 2, 10);
    check_train_vs_generate(3, 2, true, false, 2, 10);
    check_train_vs_generate(4, 1, false, true, 2, 10); /* mom_shared = false */
    check_train_vs_generate(0, 0, true, true, 2, 10);  /* gdn */
}

/* The inference state is one fixed-size tensor whatever the number of tokens; the layer
 * leaves the state it is given unchanged and refuses one of the wrong shape. */
static void test_generation_memory_constant(void) {
    moe_mom_layer L;
    moe_mom_settings s = settings(3, 2, true, true);
    CU_ASSERT_FATAL(moe_mom_layer_init(&L, &s, "t.mom", MOE_CPU, 5, 0.5) == MOE_OK);
    moe_tensor *state = moe_mom_state_zeros(&L, 2, MOE_F32, MOE_CPU, MOE_LIFE_PERSIST);
    CU_ASSERT_FATAL(state != NULL);
    CU_ASSERT_EQUAL(moe_tensor_numel(state), 2 * 4 * 2 * 4 * 4); /* B (M+1) H dk dv */
    for (int t = 0; t < 40; t++) {
        moe_step_reset();
        moe_tensor *x = randn(MOE_F32, 3, (int64_t[]){2, 1, 8}, 100 + t, 1), *next = NULL;
        moe_mom_result res;
        CU_ASSERT_FATAL(moe_mom_layer_forward(&L, x, MOE_F32, state, &next, &res) != NULL);
        CU_ASSERT_FATAL(next != NULL);
        CU_ASSERT(moe_tensor_same_shape(next, state));
        if (t == 0) { /* the given state is read, not written */
            double *h0 = host(state), z = 0;
            for (int64_t i = 0; i < moe_tensor_numel(state); i++) z += fabs(h0[i]);
            free(h0);
            CU_ASSERT_EQUAL(z, 0.0);
        }
        CU_ASSERT_FATAL(moe_tensor_copy_(state, next) == MOE_OK);
    }
    double *h = host(state), norm = 0;
    for (int64_t i = 0; i < moe_tensor_numel(state); i++) norm += h[i] * h[i];
    free(h);
    CU_ASSERT(norm > 0);
    moe_step_reset();
    moe_tensor *x = randn(MOE_F32, 3, (int64_t[]){1, 1, 8}, 5, 1), *next = NULL;
    moe_mom_result res;
    CU_ASSERT_PTR_NULL(moe_mom_layer_forward(&L, x, MOE_F32, state, &next, &res)); /* 1 sequence, 2 states */
    CU_ASSERT(strstr(moe_last_error(), "recurrent state") != NULL);
    moe_tensor_free(state);
    moe_mom_layer_free(&L);
    moe_step_reset();
}

/* Same parameters, the two update rules: different outputs. Routing results are sane. */
static void test_variants(void) {
    moe_tensor *out[2];
    for (int delta = 0; delta < 2; delta++) {
        moe_mom_layer L;
        moe_mom_settings s = settings(3, 2, true, delta);
        CU_ASSERT_FATAL(moe_mom_layer_init(&L, &s, "t.mom", MOE_CPU, 5, 0.5) == MOE_OK);
        moe_tensor *x = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, 3, (int64_t[]){2, 6, 8}, 3, 0, 1.0);
        moe_mom_result res;
        out[delta] = moe_mom_layer_forward(&L, x, MOE_F32, NULL, NULL, &res);
        CU_ASSERT_FATAL(out[delta] && res.aux_loss && res.load);
        CU_ASSERT_EQUAL(res.load[0] + res.load[1] + res.load[2], 2 * 6 * 2);
        CU_ASSERT(moe_tensor_item(res.aux_loss) > 0);
        moe_tensor *ts[MOE_MOM_MAX_PARAMS];
        const char *names[MOE_MOM_MAX_PARAMS];
        CU_ASSERT_EQUAL(moe_mom_layer_params(&L, ts, names, MOE_MOM_MAX_PARAMS), 11);
        CU_ASSERT_STRING_EQUAL(names[0], "t.mom.w_q");
        CU_ASSERT_STRING_EQUAL(names[10], "t.mom.router.w_gate");
        moe_tensor_free(x);
        moe_mom_layer_free(&L);
    }
    CU_ASSERT(rel_err(out[0], out[1]) > 1e-3);
    moe_mom_layer L;
    moe_mom_settings s = settings(0, 0, true, true);
    CU_ASSERT_FATAL(moe_mom_layer_init(&L, &s, "t.gdn", MOE_CPU, 5, 0.5) == MOE_OK);
    moe_tensor *ts[MOE_MOM_MAX_PARAMS];
    const char *names[MOE_MOM_MAX_PARAMS];
    CU_ASSERT_EQUAL(moe_mom_layer_params(&L, ts, names, MOE_MOM_MAX_PARAMS), 10); /* no router */
    moe_mom_layer_free(&L);
    s = settings(0, 0, false, true);
    CU_ASSERT_EQUAL(moe_mom_layer_init(&L, &s, "t.none", MOE_CPU, 5, 0.5), MOE_ERR_CONFIG);
    moe_mom_layer_free(&L);
}

/* L = sum(y * R) + aux for the layer in f64 compute. */
static double layer_loss(moe_mom_layer *L, moe_tensor *x, bool backward) {
    moe_step_reset();
    moe_mom_result res;
    moe_tensor *y = moe_mom_layer_forward(L, x, MOE_F64, NULL, NULL, &res);
    moe_tensor *r = randn(MOE_F64, 3, y->shape, 991, 1);
    moe_tensor *loss = moe_add(moe_sum_all(moe_mul(y, r)), moe_cast(res.aux_loss, MOE_F64));
    CU_ASSERT_FATAL(loss != NULL);
    if (backward) CU_ASSERT_FATAL(moe_backward(loss) == MOE_OK);
    return moe_tensor_item(loss);
}

/* Finite differences of the whole layer: every element of x (f64, h = 1e-6) and a spread
 * of elements of every parameter (f32 masters: the difference quotient uses the values
 * actually stored). Routing does not change under these small steps (checked). */
static void test_layer_gradcheck(void) {
    moe_mom_layer L;
    moe_mom_settings s = settings(3, 2, true, true);
    s.chunk = 2;
    CU_ASSERT_FATAL(moe_mom_layer_init(&L, &s, "t.mom", MOE_CPU, 11, 0.5) == MOE_OK);
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F64, 3, (int64_t[]){2, 5, 8}, 4, 0, 1.0);
    x->requires_grad = x->is_param = true;
    moe_tensor *ps[MOE_MOM_MAX_PARAMS];
    const char *names[MOE_MOM_MAX_PARAMS];
    int np = moe_mom_layer_params(&L, ps, names, MOE_MOM_MAX_PARAMS);
    layer_loss(&L, x, true);
    int checked = 0, bad = 0;
    bool was = moe_grad_set_enabled(false);
    for (int p = -1; p < np; p++) {
        moe_tensor *t = p < 0 ? x : ps[p];
        CU_ASSERT_FATAL(t->grad != NULL);
        double *g = host(t->grad), gmax = 0;
        int64_t n = moe_tensor_numel(t), step = p < 0 ? 1 : (n > 24 ? n / 24 : 1);
        for (int64_t i = 0; i < n; i++) gmax = fmax(gmax, fabs(g[i]));
        for (int64_t i = 0; i < n; i += step) {
            double num;
            if (p < 0) {
                double *xd = x->data, x0 = xd[i], h = 1e-6;
                xd[i] = x0 + h;
                double lp = layer_loss(&L, x, false);
                xd[i] = x0 - h;
                double lm = layer_loss(&L, x, false);
                xd[i] = x0;
                num = (lp - lm) / (2 * h);
            } else {
                float *fd = t->data, f0 = fd[i];
                float fp = f0 + 1e-3f * fmaxf(1.0f, fabsf(f0)), fm = f0 - 1e-3f * fmaxf(1.0f, fabsf(f0));
                fd[i] = fp;
                double lp = layer_loss(&L, x, false);
                fd[i] = fm;
                double lm = layer_loss(&L, x, false);
                fd[i] = f0;
                num = (lp - lm) / ((double)fp - (double)fm);
            }
            double tol = (p < 0 ? 1e-6 : 2e-4) * fmax(gmax, 1e-2);
            checked++;
            if (!(fabs(num - g[i]) <= tol)) {
                bad++;
                fprintf(stderr, "  gradcheck %s[%lld]: analytic %.10g numeric %.10g\n", p < 0 ? "x" : names[p],
                        (long long)i, g[i], num);
            }
        }
        free(g);
    }
    moe_grad_set_enabled(was);
    fprintf(stderr, "  layer gradcheck: %d elements, %d off\n", checked, bad);
    CU_ASSERT(checked > 100);
    CU_ASSERT_EQUAL(bad, 0);
    moe_tensor_free(x);
    moe_mom_layer_free(&L);
}

static void register_suites(void) {
    moe_test_add_suite("delta_scan", (moe_test_entry[]){{"recurrent == chunked, f64", test_forms_agree_f64},
                                                         {"recurrent == chunked, f32", test_forms_agree_f32},
                                                         {"both forms give the same grads", test_grads_agree},
                                                         {"hand-computed example", test_hand_example},
                                                         {"error messages", test_errors},
                                                         {NULL, NULL}});
    moe_test_add_suite("mom_layer", (moe_test_entry[]){{"training form == generation form", test_layer_train_equals_generate},
                                                        {"generation memory is constant", test_generation_memory_constant},
                                                        {"variants", test_variants},
                                                        {"whole-layer gradcheck", test_layer_gradcheck},
                                                        {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
