/* Tests for optim/ and core/fused: AdamW and SGD against a double reference over several
 * steps (weight decay skipped for 1-D parameters, grad_scale applied, parameters without
 * grads untouched), checkpoint-style state and step round trip, gradient clipping
 * (scale, split API, NaN/Inf detection naming the parameter), the fused kernels' checks,
 * lr schedules at the boundary steps, and fitting y = 2x + 1 end to end. */
#include "tests/harness/testlib.h"

#include <math.h>
#include <string.h>

#include "core/autograd.h"
#include "core/fused.h"
#include "core/memory.h"
#include "core/ops.h"
#include "optim/optim.h"
#include "optim/schedule.h"

#define STEPS 5
#define NW 6 /* the [2, 3] weight */
#define NB 3 /* the [3] bias */

/* A named f32 parameter on the CPU with the given values and a zeroed grad. */
static moe_tensor *make_param(const char *name, int ndim, const int64_t *shape, const float *vals) {
    moe_tensor *p = moe_tensor_from_host(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, ndim, shape, vals);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    moe_param_init(p, name);
    p->grad = moe_tensor_zeros(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, ndim, shape);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p->grad);
    return p;
}

/* Deterministic, non-trivial grads that change with the step (both signs, several scales). */
static double grad_value(int step, int i) { return sin(1.3 * i + 0.7 * step) * (1.0 + 0.5 * i) + 0.05 * step; }

static void set_grads(moe_tensor *p, int step, int offset) {
    float *g = p->grad->data;
    for (int64_t i = 0; i < moe_tensor_numel(p); i++) g[i] = (float)grad_value(step, (int)i + offset);
}

static const float w0[NW] = {0.5f, -1.0f, 0.25f, 2.0f, -0.75f, 1.5f};
static const float b0[NB] = {0.1f, -0.2f, 0.3f};

typedef struct ref_state { double p[NW + NB], m[NW + NB], v[NW + NB]; } ref_state;

static void ref_init(ref_state *r) {
    memset(r, 0, sizeof *r);
    for (int i = 0; i < NW; i++) r->p[i] = w0[i];
    for (int i = 0; i < NB; i++) r->p[NW + i] = b0[i];
}

/* Elements 0..NW-1 belong to the weight, NW.. to the bias (no decay when wd_bias is 0). */
static void ref_adamw(ref_state *r, int t, double lr, double b1, double b2, double eps, double wd,
                      double wd_bias, double scale) {
    for (int i = 0; i < NW + NB; i++) {
        double g = (float)grad_value(t, i) * scale, decay = i < NW ? wd : wd_bias;
        r->m[i] = b1 * r->m[i] + (1 - b1) * g;
        r->v[i] = b2 * r->v[i] + (1 - b2) * g * g;
        r->p[i] -= lr * decay * r->p[i];
        r->p[i] -= lr * (r->m[i] / (1 - pow(b1, t + 1))) / (sqrt(r->v[i] / (1 - pow(b2, t + 1))) + eps);
    }
}

static void ref_sgd(ref_state *r, int t, double lr, double mu, double wd, double scale) {
    for (int i = 0; i < NW + NB; i++) {
        double g = (float)grad_value(t, i) * scale + (i < NW ? wd : 0.0) * r->p[i];
        r->m[i] = mu * r->m[i] + g;
        r->p[i] -= lr * r->m[i];
    }
}

static double max_err(const moe_tensor *t, const double *ref) {
    double got[16], e = 0;
    CU_ASSERT_EQUAL_FATAL(moe_tensor_to_host_f64(t, got), MOE_OK);
    for (int64_t i = 0; i < moe_tensor_numel(t); i++) e = fmax(e, fabs(got[i] - ref[i]));
    return e;
}

typedef struct pair { moe_tensor *params[2]; } pair;

static pair make_pair(void) {
    return (pair){{make_param("layer.w", 2, (int64_t[]){2, 3}, w0), make_param("layer.b", 1, (int64_t[]){3}, b0)}};
}

static void free_pair(pair *pp) {
    moe_tensor_free(pp->params[0]);
    moe_tensor_free(pp->params[1]);
}

/* Runs `steps` steps of opt, the grads of step t being set_grads(t). */
static void run_steps(moe_optimizer *opt, pair *pp, int from, int to, double lr, double scale) {
    for (int t = from; t < to; t++) {
        set_grads(pp->params[0], t, 0);
        set_grads(pp->params[1], t, NW);
        CHECK_OK(moe_optimizer_step(opt, lr, scale));
    }
}

static void test_adamw_reference(void) {
    pair pp = make_pair();
    moe_optim_config cfg = moe_optim_config_default(MOE_OPTIM_ADAMW);
    /* eps 1e-2 (not 1e-8): Adam is nearly scale-invariant otherwise, hiding grad_scale. */
    cfg.beta1 = 0.9, cfg.beta2 = 0.999, cfg.eps = 1e-2, cfg.weight_decay = 0.5;
    moe_optimizer *opt = moe_optimizer_create(pp.params, 2, &cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(opt);
    CU_ASSERT_TRUE(moe_optimizer_decays(opt, 0));
    CU_ASSERT_FALSE(moe_optimizer_decays(opt, 1));
    ref_state r, r_decayed_bias;
    ref_init(&r);
    ref_init(&r_decayed_bias);
    const double lr = 0.05, scale = 0.5;
    run_steps(opt, &pp, 0, STEPS, lr, scale);
    for (int t = 0; t < STEPS; t++) {
        ref_adamw(&r, t, lr, 0.9, 0.999, 1e-2, 0.5, 0.0, scale);
        ref_adamw(&r_decayed_bias, t, lr, 0.9, 0.999, 1e-2, 0.5, 0.5, scale);
    }
    CU_ASSERT_EQUAL(moe_optimizer_get_step(opt), STEPS);
    CU_ASSERT(max_err(pp.params[0], r.p) < 2e-6);
    CU_ASSERT(max_err(pp.params[1], r.p + NW) < 2e-6);
    /* The bias must differ from a decayed bias by far more than the tolerance. */
    CU_ASSERT(max_err(pp.params[1], r_decayed_bias.p + NW) > 1e-3);
    moe_tensor *m, *v;
    moe_optimizer_state(opt, 0, &m, &v);
    CU_ASSERT_PTR_NOT_NULL_FATAL(m);
    CU_ASSERT_PTR_NOT_NULL_FATAL(v);
    CU_ASSERT(max_err(m, r.m) < 1e-6);
    CU_ASSERT(max_err(v, r.v) < 1e-6);
    moe_optimizer_free(opt);
    free_pair(&pp);
}

/* grad_scale s with grads g gives the same update as scale 1 with grads s*g; a
 * parameter without a grad is left alone. */
static void test_adamw_grad_scale(void) {
    pair a = make_pair(), b = make_pair();
    moe_optim_config cfg = moe_optim_config_default(MOE_OPTIM_ADAMW);
    cfg.eps = 1e-3; /* large eps: the update is not scale-invariant, so the scale matters */
    moe_tensor *a_rev[] = {a.params[1], a.params[0]}; /* the grad-less bias comes first */
    moe_optimizer *oa = moe_optimizer_create(a_rev, 2, &cfg), *ob = moe_optimizer_create(b.params, 1, &cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(oa);
    CU_ASSERT_PTR_NOT_NULL_FATAL(ob);
    moe_tensor_free(a.params[1]->grad);
    a.params[1]->grad = NULL;
    set_grads(a.params[0], 0, 0);
    set_grads(b.params[0], 0, 0);
    float *gb = b.params[0]->grad->data;
    for (int i = 0; i < NW; i++) gb[i] *= 0.25f;
    CHECK_OK(moe_optimizer_step(oa, 0.1, 0.25));
    CHECK_OK(moe_optimizer_step(ob, 0.1, 1.0));
    const float *pa = a.params[0]->data, *pb = b.params[0]->data;
    for (int i = 0; i < NW; i++) {
        CU_ASSERT_DOUBLE_EQUAL(pa[i], pb[i], 1e-7);
        CU_ASSERT(fabs(pa[i] - w0[i]) > 1e-3); /* it did move */
    }
    CU_ASSERT_EQUAL(memcmp(a.params[1]->data, b0, sizeof b0), 0);
    moe_tensor *m, *v;
    moe_optimizer_state(oa, 0, &m, &v);
    double st[2 * NB];
    CHECK_OK(moe_tensor_to_host_f64(m, st));
    CHECK_OK(moe_tensor_to_host_f64(v, st + NB));
    for (int i = 0; i < 2 * NB; i++) CU_ASSERT_EQUAL(st[i], 0.0);
    moe_optimizer_free(oa);
    moe_optimizer_free(ob);
    free_pair(&a);
    free_pair(&b);
    moe_step_reset();
}

static void test_sgd_reference(void) {
    pair pp = make_pair();
    moe_optim_config cfg = moe_optim_config_default(MOE_OPTIM_SGD);
    cfg.momentum = 0.9, cfg.weight_decay = 0.1;
    moe_optimizer *opt = moe_optimizer_create(pp.params, 2, &cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(opt);
    ref_state r;
    ref_init(&r);
    run_steps(opt, &pp, 0, STEPS, 0.05, 2.0);
    for (int t = 0; t < STEPS; t++) ref_sgd(&r, t, 0.05, 0.9, 0.1, 2.0);
    CU_ASSERT(max_err(pp.params[0], r.p) < 2e-6);
    CU_ASSERT(max_err(pp.params[1], r.p + NW) < 2e-6);
    moe_tensor *m, *v;
    moe_optimizer_state(opt, 1, &m, &v);
    CU_ASSERT_PTR_NULL(v);
    CU_ASSERT_PTR_NOT_NULL_FATAL(m);
    CU_ASSERT(max_err(m, r.m + NW) < 1e-5); /* |buf| reaches ~15: f32 rounding */
    moe_optimizer_free(opt);
    free_pair(&pp);

    /* Plain SGD: no buffer, p -= lr * g. */
    pp = make_pair();
    cfg.momentum = 0, cfg.weight_decay = 0;
    opt = moe_optimizer_create(pp.params, 2, &cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(opt);
    moe_optimizer_state(opt, 0, &m, &v);
    CU_ASSERT_PTR_NULL(m);
    run_steps(opt, &pp, 0, 1, 0.5, 1.0);
    const float *p = pp.params[0]->data;
    for (int i = 0; i < NW; i++) CU_ASSERT_DOUBLE_EQUAL(p[i], w0[i] - 0.5 * (float)grad_value(0, i), 1e-6);
    moe_optimizer_free(opt);
    free_pair(&pp);
}

static bool no_decay_by_name(const moe_tensor *p, void *ctx) { return strcmp(p->name, (const char *)ctx) == 0; }

static void test_no_decay_predicate(void) {
    pair pp = make_pair();
    moe_optim_config cfg = moe_optim_config_default(MOE_OPTIM_ADAMW);
    cfg.no_decay = no_decay_by_name;
    cfg.no_decay_ctx = "layer.w";
    moe_optimizer *opt = moe_optimizer_create(pp.params, 2, &cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(opt);
    CU_ASSERT_FALSE(moe_optimizer_decays(opt, 0));
    CU_ASSERT_TRUE(moe_optimizer_decays(opt, 1));
    /* Zero grads, lr 1, wd 0.1: only the decayed bias shrinks, by exactly 10 %. */
    CHECK_OK(moe_optimizer_step(opt, 1.0, 1.0));
    CU_ASSERT_EQUAL(memcmp(pp.params[0]->data, w0, sizeof w0), 0);
    const float *b = pp.params[1]->data;
    for (int i = 0; i < NB; i++) CU_ASSERT_DOUBLE_EQUAL(b[i], 0.9 * b0[i], 1e-7);
    moe_optimizer_free(opt);
    free_pair(&pp);
}

/* Five steps in one go equal three steps, a save/load of m, v and the step into a fresh
 * optimizer, then two more steps. */
static void test_state_round_trip(void) {
    pair a = make_pair(), b = make_pair();
    moe_optim_config cfg = moe_optim_config_default(MOE_OPTIM_ADAMW);
    moe_optimizer *oa = moe_optimizer_create(a.params, 2, &cfg), *ob = moe_optimizer_create(b.params, 2, &cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(oa);
    CU_ASSERT_PTR_NOT_NULL_FATAL(ob);
    run_steps(oa, &a, 0, STEPS, 0.01, 1.0);
    run_steps(ob, &b, 0, 3, 0.01, 1.0);
    moe_optimizer *oc = moe_optimizer_create(b.params, 2, &cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(oc);
    CU_ASSERT_EQUAL(moe_optimizer_get_step(oc), 0);
    CU_ASSERT_PTR_EQUAL(moe_optimizer_params(oc)[1], b.params[1]);
    CU_ASSERT_EQUAL(moe_optimizer_count(oc), 2);
    for (int i = 0; i < 2; i++) {
        moe_tensor *ms, *vs, *md, *vd;
        moe_optimizer_state(ob, i, &ms, &vs);
        moe_optimizer_state(oc, i, &md, &vd);
        CHECK_OK(moe_tensor_copy_(md, ms));
        CHECK_OK(moe_tensor_copy_(vd, vs));
    }
    moe_optimizer_set_step(oc, moe_optimizer_get_step(ob));
    run_steps(oc, &b, 3, STEPS, 0.01, 1.0);
    CU_ASSERT_EQUAL(moe_optimizer_get_step(oc), STEPS);
    for (int i = 0; i < 2; i++)
        CU_ASSERT_EQUAL(memcmp(a.params[i]->data, b.params[i]->data, moe_tensor_numel(a.params[i]) * sizeof(float)), 0);
    moe_optimizer_free(oa);
    moe_optimizer_free(ob);
    moe_optimizer_free(oc);
    free_pair(&a);
    free_pair(&b);
}

static void test_config_errors(void) {
    pair pp = make_pair();
    moe_optim_config cfg = moe_optim_config_default(MOE_OPTIM_ADAMW);
    cfg.beta2 = 1.0;
    CU_ASSERT_PTR_NULL(moe_optimizer_create(pp.params, 2, &cfg));
    CU_ASSERT_EQUAL(moe_last_status(), MOE_ERR_CONFIG);
    CHECK_ERROR_HAS("betas");
    cfg = moe_optim_config_default(MOE_OPTIM_SGD);
    cfg.momentum = -0.5;
    CU_ASSERT_PTR_NULL(moe_optimizer_create(pp.params, 2, &cfg));
    CHECK_ERROR_HAS("momentum");
    moe_optim_type ty;
    CHECK_OK(moe_optim_type_parse("sgd", &ty));
    CU_ASSERT_EQUAL(ty, MOE_OPTIM_SGD);
    CU_ASSERT_STRING_EQUAL(moe_optim_type_name(MOE_OPTIM_ADAMW), "adamw");
    CU_ASSERT_EQUAL(moe_optim_type_parse("adam", &ty), MOE_ERR_CONFIG);
    CHECK_ERROR_HAS("'adam'");

    /* A bf16 parameter is refused by name. */
    moe_tensor *h = moe_tensor_zeros(MOE_LIFE_PERSIST, MOE_CPU, MOE_BF16, 1, (int64_t[]){4});
    moe_param_init(h, "half.w");
    cfg = moe_optim_config_default(MOE_OPTIM_ADAMW);
    CU_ASSERT_PTR_NULL(moe_optimizer_create(&h, 1, &cfg));
    CU_ASSERT_EQUAL(moe_last_status(), MOE_ERR_INVALID);
    CHECK_ERROR_HAS("half.w");
    moe_tensor_free(h);

    moe_optimizer *opt = moe_optimizer_create(pp.params, 2, &cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(opt);
    CU_ASSERT_EQUAL(moe_optimizer_step(opt, NAN, 1.0), MOE_ERR_INVALID);
    CU_ASSERT_EQUAL(moe_optimizer_get_step(opt), 0);
    moe_optimizer_free(opt);
    free_pair(&pp);
}

static void test_fused_checks(void) {
    pair pp = make_pair();
    moe_tensor *m = moe_tensor_zeros(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, 1, (int64_t[]){6});
    moe_tensor *v = moe_tensor_zeros(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, 2, (int64_t[]){2, 3});
    moe_adamw_params ap = {.lr = 0.1, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .grad_scale = 1, .step = 1};
    CU_ASSERT_EQUAL(moe_fused_adamw(pp.params[0], pp.params[0]->grad, m, v, &ap), MOE_ERR_INVALID);
    CHECK_ERROR_HAS("adamw");
    CHECK_ERROR_HAS("[6] f32");
    CHECK_ERROR_HAS("[2, 3] f32");
    moe_sgd_params sp = {.lr = 0.1, .grad_scale = 1};
    CU_ASSERT_EQUAL(moe_fused_sgd(pp.params[0], pp.params[1]->grad, NULL, &sp), MOE_ERR_INVALID);
    CHECK_ERROR_HAS("sgd");
    /* A transposed (non-contiguous) parameter is refused. */
    moe_tensor *tv = moe_tensor_view_raw(pp.params[0], 2, (int64_t[]){3, 2}, (int64_t[]){1, 3}, 0);
    moe_tensor *g = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){3, 2});
    CU_ASSERT_EQUAL(moe_fused_sgd(tv, g, NULL, &sp), MOE_ERR_INVALID);
    CHECK_ERROR_HAS("contiguous");

    /* sumsq accumulates over tensors and calls; the accumulator must be [1] f32. */
    float x[3] = {1, 2, 3}, y[2] = {-4, 0.5f};
    moe_tensor *tx = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 1, (int64_t[]){3}, x);
    moe_tensor *ty = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 1, (int64_t[]){2}, y);
    moe_tensor *acc = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 1, (int64_t[]){1});
    const moe_tensor *ts[] = {tx, ty};
    CHECK_OK(moe_fused_sumsq(ts, 2, acc));
    CU_ASSERT_EQUAL(moe_tensor_item(acc), 30.25);
    CHECK_OK(moe_fused_sumsq(ts, 1, acc));
    CU_ASSERT_EQUAL(moe_tensor_item(acc), 44.25);
    /* Large enough for the OpenMP path: 100000 * 0.5^2. */
    moe_tensor *big = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 1, (int64_t[]){100000});
    CHECK_OK(moe_tensor_fill(big, 0.5));
    CHECK_OK(moe_tensor_fill(acc, 0));
    CHECK_OK(moe_fused_sumsq((const moe_tensor *[]){big}, 1, acc));
    CU_ASSERT_EQUAL(moe_tensor_item(acc), 25000.0);
    moe_tensor *acc64 = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 1, (int64_t[]){1});
    CU_ASSERT_EQUAL(moe_fused_sumsq(ts, 1, acc64), MOE_ERR_INVALID);
    CHECK_ERROR_HAS("sumsq");

    /* nonfinite: set by NaN or Inf, never cleared by a finite tensor. */
    moe_tensor *flag = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, (int64_t[]){1});
    CHECK_OK(moe_fused_nonfinite(tx, flag));
    CU_ASSERT_EQUAL(moe_tensor_item(flag), 0);
    ((float *)ty->data)[1] = -INFINITY;
    CHECK_OK(moe_fused_nonfinite(ty, flag));
    CU_ASSERT_EQUAL(moe_tensor_item(flag), 1);
    CHECK_OK(moe_fused_nonfinite(tx, flag));
    CU_ASSERT_EQUAL(moe_tensor_item(flag), 1);
    CHECK_OK(moe_tensor_fill(flag, 0));
    ((float *)tx->data)[2] = NAN;
    CHECK_OK(moe_fused_nonfinite(tx, flag));
    CU_ASSERT_EQUAL(moe_tensor_item(flag), 1);

    moe_tensor_free(m);
    moe_tensor_free(v);
    free_pair(&pp);
    moe_step_reset();
}

/* Grads [3, 4] and [[12]]: global norm 13. */
static void test_clip(void) {
    moe_tensor *a = make_param("a", 1, (int64_t[]){2}, (float[]){0, 0});
    moe_tensor *b = make_param("blk.0.w", 2, (int64_t[]){1, 1}, (float[]){0});
    moe_tensor *c = make_param("no_grad", 1, (int64_t[]){1}, (float[]){0});
    moe_tensor_free(c->grad);
    c->grad = NULL;
    ((float *)a->grad->data)[0] = 3, ((float *)a->grad->data)[1] = 4;
    ((float *)b->grad->data)[0] = 12;
    moe_tensor *ps[] = {a, b, c};
    double norm, scale, s;
    CHECK_OK(moe_clip_grad_norm(ps, 3, 1.0, &norm, &scale));
    CU_ASSERT_DOUBLE_EQUAL(norm, 13.0, 1e-12);
    CU_ASSERT_DOUBLE_EQUAL(scale, 1.0 / (13.0 + 1e-6), 1e-15);
    CHECK_OK(moe_clip_grad_norm(ps, 3, 100.0, &norm, &scale));
    CU_ASSERT_EQUAL(scale, 1.0);
    CHECK_OK(moe_clip_grad_norm(ps, 3, 0.0, &norm, &scale));
    CU_ASSERT_EQUAL(scale, 1.0);
    /* The grads themselves are not rewritten. */
    CU_ASSERT_EQUAL(((float *)a->grad->data)[1], 4.0f);
    /* Split API: local sum of squares, then a "global" value from two ranks. */
    CHECK_OK(moe_grad_sumsq_local(ps, 3, &s));
    CU_ASSERT_EQUAL(s, 169.0);
    CHECK_OK(moe_clip_grad_finish(2 * s, 13.0, &norm, &scale));
    CU_ASSERT_DOUBLE_EQUAL(norm, 13.0 * sqrt(2.0), 1e-12);
    CU_ASSERT_DOUBLE_EQUAL(scale, 13.0 / (13.0 * sqrt(2.0) + 1e-6), 1e-15);
    CHECK_OK(moe_grad_sumsq_local(ps, 0, &s));
    CU_ASSERT_EQUAL(s, 0.0);

    /* A NaN in one grad: MOE_ERR_NUMERIC naming that parameter. */
    ((float *)b->grad->data)[0] = NAN;
    CU_ASSERT_EQUAL(moe_clip_grad_norm(ps, 3, 1.0, &norm, &scale), MOE_ERR_NUMERIC);
    CU_ASSERT_TRUE(isnan(norm));
    CU_ASSERT_EQUAL(scale, 0.0);
    CHECK_ERROR_HAS("blk.0.w");
    CHECK_ERROR_HAS("skip");
    ((float *)b->grad->data)[0] = INFINITY;
    CU_ASSERT_EQUAL(moe_clip_grad_norm(ps, 3, 1.0, &norm, &scale), MOE_ERR_NUMERIC);
    CU_ASSERT_TRUE(isinf(norm));
    CHECK_ERROR_HAS("blk.0.w");
    /* Finite grads whose squares overflow f32: still refused, with the reason. */
    ((float *)b->grad->data)[0] = 1e30f;
    CU_ASSERT_EQUAL(moe_clip_grad_norm(ps, 3, 1.0, &norm, &scale), MOE_ERR_NUMERIC);
    CHECK_ERROR_HAS("overflow");
    CU_ASSERT_EQUAL(moe_clip_grad_finish(NAN, 1.0, &norm, &scale), MOE_ERR_NUMERIC);
    moe_tensor_free(a);
    moe_tensor_free(b);
    moe_tensor_free(c);
    moe_step_reset();
}

static void test_schedule(void) {
    moe_lr_schedule cs = {.kind = MOE_LR_COSINE, .lr = 1e-3, .min_lr = 1e-4, .warmup = 10, .total = 100};
    CHECK_OK(moe_lr_schedule_check(&cs));
    CU_ASSERT_DOUBLE_EQUAL(moe_lr_at(&cs, 0), 1e-4, 1e-18);
    CU_ASSERT_DOUBLE_EQUAL(moe_lr_at(&cs, 4), 5e-4, 1e-18);
    CU_ASSERT_DOUBLE_EQUAL(moe_lr_at(&cs, 9), 1e-3, 1e-18);
    CU_ASSERT_DOUBLE_EQUAL(moe_lr_at(&cs, 10), 1e-3, 1e-18);
    CU_ASSERT_DOUBLE_EQUAL(moe_lr_at(&cs, 55), 5.5e-4, 1e-15); /* half-way: the mean */
    CU_ASSERT_DOUBLE_EQUAL(moe_lr_at(&cs, 99), 1e-4 + 9e-4 * 0.5 * (1 + cos(M_PI * 89.0 / 90.0)), 1e-18);
    CU_ASSERT(moe_lr_at(&cs, 99) > 1e-4 && moe_lr_at(&cs, 99) < 1.01e-4);
    CU_ASSERT_EQUAL(moe_lr_at(&cs, 100), 1e-4);
    CU_ASSERT_EQUAL(moe_lr_at(&cs, 100000), 1e-4);

    moe_lr_schedule k = {.kind = MOE_LR_CONSTANT, .lr = 2e-3, .warmup = 4};
    CHECK_OK(moe_lr_schedule_check(&k));
    CU_ASSERT_DOUBLE_EQUAL(moe_lr_at(&k, 0), 5e-4, 1e-18);
    CU_ASSERT_DOUBLE_EQUAL(moe_lr_at(&k, 3), 2e-3, 1e-18);
    CU_ASSERT_EQUAL(moe_lr_at(&k, 4), 2e-3);
    CU_ASSERT_EQUAL(moe_lr_at(&k, 1000000), 2e-3);
    k.warmup = 0;
    CU_ASSERT_EQUAL(moe_lr_at(&k, 0), 2e-3);
    /* Cosine without warm-up starts at the peak. */
    moe_lr_schedule c0 = {.kind = MOE_LR_COSINE, .lr = 1.0, .min_lr = 0.0, .warmup = 0, .total = 4};
    CU_ASSERT_EQUAL(moe_lr_at(&c0, 0), 1.0);
    CU_ASSERT_DOUBLE_EQUAL(moe_lr_at(&c0, 2), 0.5, 1e-15);
    CU_ASSERT_EQUAL(moe_lr_at(&c0, 4), 0.0);

    moe_lr_schedule bad = cs;
    bad.total = 5;
    CU_ASSERT_EQUAL(moe_lr_schedule_check(&bad), MOE_ERR_CONFIG);
    CHECK_ERROR_HAS("total 5");
    bad = cs;
    bad.min_lr = 2e-3;
    CU_ASSERT_EQUAL(moe_lr_schedule_check(&bad), MOE_ERR_CONFIG);
    CHECK_ERROR_HAS("min_lr");
    bad = cs;
    bad.lr = 0;
    CU_ASSERT_EQUAL(moe_lr_schedule_check(&bad), MOE_ERR_CONFIG);
    moe_lr_kind kind;
    CHECK_OK(moe_lr_kind_parse("cosine", &kind));
    CU_ASSERT_EQUAL(kind, MOE_LR_COSINE);
    CU_ASSERT_EQUAL(moe_lr_kind_parse("linear", &kind), MOE_ERR_CONFIG);
    CHECK_ERROR_HAS("'linear'");
}

/* Fits y = 2x + 1 with a [1, 1] weight and a [1] bias: mean squared error through the
 * autograd ops, global-norm clipping, AdamW and a warm-up + cosine schedule. */
static void test_fit_line(void) {
    enum { N = 8 };
    float xs[N], ys[N];
    for (int i = 0; i < N; i++) xs[i] = -1.0f + 2.0f * i / (N - 1), ys[i] = 2 * xs[i] + 1;
    moe_tensor *w = make_param("w", 2, (int64_t[]){1, 1}, (float[]){-0.5f});
    moe_tensor *b = make_param("b", 1, (int64_t[]){1}, (float[]){0.0f});
    moe_tensor *ps[] = {w, b};
    moe_optim_config cfg = moe_optim_config_default(MOE_OPTIM_ADAMW);
    cfg.weight_decay = 0; /* decay would pull w away from the exact fit */
    moe_optimizer *opt = moe_optimizer_create(ps, 2, &cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(opt);
    moe_lr_schedule sched = {.kind = MOE_LR_COSINE, .lr = 0.1, .min_lr = 1e-3, .warmup = 10, .total = 200};
    CHECK_OK(moe_lr_schedule_check(&sched));
    double loss = INFINITY, first = 0;
    for (int step = 0; step < 200; step++) {
        moe_step_reset();
        moe_tensor *x = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){N, 1}, xs);
        moe_tensor *y = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){N, 1}, ys);
        moe_tensor *d = moe_sub(moe_add(moe_matmul(x, w), b), y);
        moe_tensor *l = moe_mul_scalar(moe_sum_all(moe_mul(d, d)), 1.0 / N);
        CU_ASSERT_PTR_NOT_NULL_FATAL(l);
        loss = moe_tensor_item(l);
        if (step == 0) first = loss;
        CHECK_OK(moe_optimizer_zero_grad(opt));
        CHECK_OK(moe_backward(l));
        double norm, scale;
        CHECK_OK(moe_clip_grad_norm(ps, 2, 5.0, &norm, &scale));
        CHECK_OK(moe_optimizer_step(opt, moe_lr_at(&sched, step), scale));
    }
    moe_step_reset();
    CU_ASSERT(first > 1.0);
    if (!(loss < 1e-4)) fprintf(stderr, "fit_line: final loss %g (w %g, b %g)\n", loss,
                                ((float *)w->data)[0], ((float *)b->data)[0]);
    CU_ASSERT(loss < 1e-4);
    CU_ASSERT_DOUBLE_EQUAL(((float *)w->data)[0], 2.0, 1e-2);
    CU_ASSERT_DOUBLE_EQUAL(((float *)b->data)[0], 1.0, 1e-2);
    moe_optimizer_free(opt);
    moe_tensor_free(w);
    moe_tensor_free(b);
}

static void register_suites(void) {
    moe_test_add_suite("optim", (moe_test_entry[]){
        {"adamw_reference", test_adamw_reference},
        {"adamw_grad_scale", test_adamw_grad_scale},
        {"sgd_reference", test_sgd_reference},
        {"no_decay_predicate", test_no_decay_predicate},
        {"state_round_trip", test_state_round_trip},
        {"config_errors", test_config_errors},
        {"fused_checks", test_fused_checks},
        {"clip", test_clip},
        {"fit_line", test_fit_line},
        {NULL, NULL}});
    moe_test_add_suite("schedule", (moe_test_entry[]){{"boundaries", test_schedule}, {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
