/* Heterogeneous experts and latency-aware balancing with latencies the framework measures
 * (issue acceptance test): an expert twice as wide measures slower, and training with the
 * latency balance loss settles the token shares at the inverse of the measured latencies.
 * Also: the running latency average, and a model with model.expert_ffn_dims (parameter
 * layout and count, expert-parallel refusal, checkpoint round trip with one dataset per
 * expert of shape [d, 2 w_E]). */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/h5file.h"
#include "core/memory.h"
#include "core/ops.h"
#include "moe/train/checkpoint.h"
#include "moe/model/model.h"
#include "tests/harness/testlib.h"

/* ---- acceptance: shares follow 1 / measured latency ---- */

enum { LD = 64, LF = 256, LT = 1024, STEPS = 150, TAIL = 50 };

static void latency_layer(moe_moe_layer *L, bool running) {
    moe_moe_layer_settings s = {
        .d_model = LD, .n_experts = 2, .top_k = 1, .ffn_dim = LF, .expert_ffn_dims = (const int[]){2 * LF, LF},
        .latency_running = running,
        .router = {.n_experts = 2, .top_k = 1, .d_model = LD, .balance = MOE_BALANCE_LATENCY, .aux_coef = 1.0,
                   .z_coef = 0, .renormalize = false}};
    CU_ASSERT_EQUAL_FATAL(moe_moe_layer_init(L, &s, "lat", MOE_CPU, 5, 0.05, 0, 2), MOE_OK);
}

/* One training step on fresh random rows: loss = latency balance + 1e-3 * mean (y - t)^2,
 * then w -= lr * grad for the router and the experts. Returns the step's loads. */
static void train_step(moe_moe_layer *L, int step, double lr, int64_t *load) {
    moe_tensor *params[5] = {L->router.w_gate};
    int np = 1;
    for (int g = 0; g < L->n_groups; g++) {
        params[np++] = L->groups[g].w13;
        params[np++] = L->groups[g].w2;
    }
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_zero_grad(params, np), MOE_OK);
    /* Inputs off zero mean: a bias-free linear router splits zero-mean symmetric inputs
     * 50/50 whatever its weights, so the shares could not move. */
    moe_tensor *x = moe_add_scalar(
        moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){LT, LD}, 21, (uint64_t)step << 32, 1.0), 0.3);
    moe_tensor *t = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){LT, LD}, 22, (uint64_t)step << 32, 1.0);
    moe_moe_layer_result res;
    moe_tensor *y = moe_moe_layer_forward(L, x, NULL, MOE_F32, &res);
    CU_ASSERT_PTR_NOT_NULL_FATAL(y);
    CU_ASSERT_PTR_NOT_NULL_FATAL(res.routing.aux_loss);
    moe_tensor *diff = moe_sub(y, t);
    moe_tensor *task = moe_mul_scalar(moe_sum_all(moe_mul(diff, diff)), 1e-3 / ((double)LT * LD));
    CU_ASSERT_EQUAL_FATAL(moe_backward(moe_add(res.routing.aux_loss, task)), MOE_OK);
    for (int i = 0; i < np; i++) {
        float *w = params[i]->data, *g = params[i]->grad->data;
        for (int64_t j = 0; j < moe_tensor_numel(params[i]); j++) w[j] -= (float)(lr * g[j]);
    }
    load[0] = res.routing.load[0];
    load[1] = res.routing.load[1];
}

static void test_latency_shares(void) {
    moe_moe_layer L;
    latency_layer(&L, false);
    double lat[2];
    /* 2 LT rows: enough work that per-op costs (large under the sanitizers) do not hide the
     * 2x in FLOPs */
    CU_ASSERT_EQUAL_FATAL(moe_moe_layer_measure_latency(&L, 2 * LT, MOE_F32, lat), MOE_OK);
    printf("\n    measured latency (%d rows): wide (f=%d) %.3f ms, narrow (f=%d) %.3f ms, ratio %.2f\n", 2 * LT,
           2 * LF, lat[0], LF, lat[1], lat[0] / lat[1]);
    CU_ASSERT_FATAL(lat[0] / lat[1] > 1.2);
    CU_ASSERT_DOUBLE_EQUAL(L.router.latency_alpha[0], 2 * lat[0] / (lat[0] + lat[1]), 1e-12);
    double tail[2] = {0, 0};
    for (int step = 0; step < STEPS; step++) {
        int64_t load[2];
        train_step(&L, step, 0.03, load);
        if (step % 30 == 0 || step == STEPS - 1)
            printf("    step %3d: shares wide %.3f narrow %.3f\n", step, (double)load[0] / LT, (double)load[1] / LT);
        if (step >= STEPS - TAIL)
            for (int e = 0; e < 2; e++) tail[e] += (double)load[e] / ((double)LT * TAIL);
    }
    double got = tail[1] / tail[0], want = lat[0] / lat[1];
    printf("    final shares (last %d steps): wide %.3f narrow %.3f; narrow/wide %.2f vs latency ratio %.2f\n", TAIL,
           tail[0], tail[1], got, want);
    CU_ASSERT(got >= 0.8 * want && got <= 1.2 * want);
    moe_moe_layer_free(&L);
    moe_step_reset();
}

/* ---- the running average ---- */

static void check_alpha(const moe_moe_layer *L) {
    double mean = (L->latency[0] + L->latency[1]) / 2;
    for (int e = 0; e < 2; e++) CU_ASSERT_DOUBLE_EQUAL(L->router.latency_alpha[e], L->latency[e] / mean, 1e-12);
}

static void test_running_latency(void) {
    moe_moe_layer L;
    latency_layer(&L, true);
    double lat[2];
    CU_ASSERT_EQUAL_FATAL(moe_moe_layer_measure_latency(&L, 256, MOE_F32, lat), MOE_OK);
    for (int e = 0; e < 2; e++) CU_ASSERT_DOUBLE_EQUAL(L.latency[e], lat[e] / 256, 1e-15); /* per row */
    double before[2] = {L.latency[0], L.latency[1]};
    int64_t load[2];
    train_step(&L, 0, 0.0, load);
    CU_ASSERT_FATAL(load[0] > 0 && load[1] > 0);
    for (int e = 0; e < 2; e++) {
        CU_ASSERT(L.latency[e] != before[e]);
        CU_ASSERT(L.latency[e] > MOE_LATENCY_RUNNING_DECAY * before[e]); /* 0.9 old + 0.1 * a positive sample */
    }
    check_alpha(&L);
    printf("\n    running average per row: wide %.2f us, narrow %.2f us\n", 1e3 * L.latency[0], 1e3 * L.latency[1]);
    /* evaluation (no gradients) leaves the average alone */
    double after[2] = {L.latency[0], L.latency[1]};
    bool was = moe_grad_set_enabled(false);
    moe_step_reset();
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){64, LD}, 3, 0, 1.0);
    moe_moe_layer_result res;
    CU_ASSERT_PTR_NOT_NULL(moe_moe_layer_forward(&L, x, NULL, MOE_F32, &res));
    moe_grad_set_enabled(was);
    for (int e = 0; e < 2; e++) CU_ASSERT_EQUAL(L.latency[e], after[e]);
    moe_moe_layer_free(&L);
    /* without a start-up measurement the first training forward seeds the average */
    latency_layer(&L, true);
    CU_ASSERT_PTR_NULL(L.router.latency_alpha);
    train_step(&L, 1, 0.0, load);
    CU_ASSERT(L.latency[0] > 0 && L.latency[1] > 0);
    check_alpha(&L);
    moe_moe_layer_free(&L);
    moe_step_reset();
}

/* ---- a model with heterogeneous experts ---- */

static const int widths[4] = {12, 6, 12, 4};

static void hetero_config(moe_config *c, int seed) {
    moe_config_defaults(c);
    c->model.vocab_size = 32;
    c->model.d_model = 16;
    c->model.n_layers = 2;
    c->model.n_heads = 2;
    c->model.seq_len = 8;
    c->model.ffn_dim = 12;
    c->model.n_experts = 4;
    c->model.top_k = 2;
    c->model.expert_ffn_dims.count = 4;
    memcpy(c->model.expert_ffn_dims.values, widths, sizeof widths);
    c->train.seed = seed;
    CU_ASSERT_EQUAL_FATAL(moe_config_validate(c), MOE_OK);
}

static const moe_param_ref *find_param(const moe_model *m, const char *name) {
    for (int i = 0; i < m->n_params; i++)
        if (!strcmp(m->params[i].name, name)) return &m->params[i];
    return NULL;
}

static void test_model_layout(void) {
    moe_config c;
    hetero_config(&c, 3);
    moe_model m;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 0, 1), MOE_OK);
    const moe_param_ref *p = find_param(&m, "layers.1.moe.experts.w13.g12");
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    CU_ASSERT(p->expert_stack);
    CU_ASSERT_EQUAL(p->t->shape[0], 2);
    CU_ASSERT_EQUAL(p->t->shape[2], 24);
    CU_ASSERT_EQUAL(p->expert_ids[0], 0);
    CU_ASSERT_EQUAL(p->expert_ids[1], 2);
    CU_ASSERT_STRING_EQUAL(p->expert_name, "layers.1.moe.experts.w13");
    CU_ASSERT_PTR_NOT_NULL(find_param(&m, "layers.0.moe.experts.w2.g4"));
    CU_ASSERT_PTR_NULL(find_param(&m, "layers.0.moe.experts.w13"));
    int64_t dense = 0;
    for (int i = 0; i < m.n_params; i++)
        if (!m.params[i].expert_stack) dense += moe_tensor_numel(m.params[i].t);
    int64_t experts = 2 /* layers */ * 3 * 16 * (12 + 6 + 12 + 4); /* d * 2w + w * d per expert */
    CU_ASSERT_EQUAL(moe_model_param_count(&m, false), dense + experts);
    CU_ASSERT_EQUAL(moe_model_param_count(&m, true), dense + experts * 2 / 4);
    moe_model_free(&m);
    /* expert parallelism: rank 1 of 2 holds experts 2 (width 12) and 3 (width 4), one
     * group each; the parameter count is still the whole model's */
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 1, 2), MOE_OK);
    p = find_param(&m, "layers.1.moe.experts.w13.g12");
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    CU_ASSERT_EQUAL(p->t->shape[0], 1);
    CU_ASSERT_EQUAL(p->expert_ids[0], 2);
    p = find_param(&m, "layers.1.moe.experts.w2.g4");
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    CU_ASSERT_EQUAL(p->expert_ids[0], 3);
    CU_ASSERT_PTR_NULL(find_param(&m, "layers.1.moe.experts.w13.g6"));
    CU_ASSERT_EQUAL(moe_model_param_count(&m, false), dense + experts);
    moe_model_free(&m);
    /* the slots: each rank's range in group-major order, the same on every rank */
    static const int widths6[6] = {12, 6, 12, 4, 6, 4};
    moe_moe_layer L;
    moe_moe_layer_settings ls = {.d_model = 8, .n_experts = 6, .top_k = 1, .ffn_dim = 6, .expert_ffn_dims = widths6,
                                 .router = {.n_experts = 6, .top_k = 1, .d_model = 8}};
    CU_ASSERT_EQUAL_FATAL(moe_moe_layer_init(&L, &ls, "t", MOE_CPU, 1, 0.1, 3, 3), MOE_OK);
    static const int want_slot[6] = {0, 2, 1, 3, 5, 4};
    for (int e = 0; e < 6; e++) CU_ASSERT_EQUAL(L.slot[e], want_slot[e]);
    CU_ASSERT_EQUAL(L.n_groups, 2);
    CU_ASSERT_EQUAL(L.groups[0].ffn_dim, 4);
    CU_ASSERT_EQUAL(L.groups[0].n, 2);
    CU_ASSERT_EQUAL(L.groups[0].experts[1], 5);
    CU_ASSERT_EQUAL(L.groups[1].experts[0], 4);
    moe_moe_layer_free(&L);
    moe_step_reset();
}

static void test_model_checkpoint(void) {
    moe_config c;
    hetero_config(&c, 3);
    moe_model a, b;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&a, &c, 0, 1), MOE_OK);
    char path[600];
    snprintf(path, sizeof path, "%s/hetero.h5", moe_test_tmpdir("latency-ckpt"));
    moe_train_state ts = {.step = 7};
    CU_ASSERT_EQUAL_FATAL(moe_checkpoint_save(path, &a, NULL, &ts), MOE_OK);
    moe_h5 *f = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_h5_open(path, &f), MOE_OK);
    for (int l = 0; l < 2; l++)
        for (int e = 0; e < 4; e++) {
            char name[128];
            int ndim = 0;
            int64_t shape[8];
            moe_h5_dtype dt;
            snprintf(name, sizeof name, "params/layers.%d.moe.experts.%d.w13", l, e);
            CU_ASSERT_EQUAL_FATAL(moe_h5_shape(f, name, &dt, &ndim, shape), MOE_OK);
            CU_ASSERT(ndim == 2 && shape[0] == 16 && shape[1] == 2 * widths[e]);
            snprintf(name, sizeof name, "params/layers.%d.moe.experts.%d.w2", l, e);
            CU_ASSERT_EQUAL_FATAL(moe_h5_shape(f, name, &dt, &ndim, shape), MOE_OK);
            CU_ASSERT(ndim == 2 && shape[0] == widths[e] && shape[1] == 16);
        }
    CU_ASSERT(!moe_h5_has(f, "params/layers.0.moe.experts.w13.g12.0"));
    moe_h5_close(f);
    hetero_config(&c, 99); /* other initial values, same shapes */
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&b, &c, 0, 1), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_checkpoint_load(path, &b, NULL, &ts), MOE_OK);
    CU_ASSERT_EQUAL(ts.step, 7);
    CU_ASSERT_EQUAL_FATAL(a.n_params, b.n_params);
    for (int i = 0; i < a.n_params; i++) {
        int64_t n = moe_tensor_numel(a.params[i].t);
        CU_ASSERT_EQUAL_FATAL(n, moe_tensor_numel(b.params[i].t));
        if (memcmp(a.params[i].t->data, b.params[i].t->data, sizeof(float) * (size_t)n))
            CU_FAIL("a parameter differs after the round trip");
    }
    /* and the per-expert values: expert 2 of layer 0 is slice 1 of the width-12 stack */
    float want[16 * 24];
    f = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_h5_open(path, &f), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_h5_get_array(f, "params/layers.0.moe.experts.2.w13", MOE_H5_F32, 2,
                                           (int64_t[]){16, 24}, want), MOE_OK);
    moe_h5_close(f);
    const moe_param_ref *p = find_param(&a, "layers.0.moe.experts.w13.g12");
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    CU_ASSERT(!memcmp((float *)p->t->data + 16 * 24, want, sizeof want));
    moe_model_free(&a);
    moe_model_free(&b);
    moe_step_reset();
}

static void register_suites(void) {
    /* One thread: on a shared, busy CPU, multi-threaded kernels wait for time slices and
     * every small op takes the same few ms whatever its size, hiding the experts' cost. */
    omp_set_num_threads(1);
    moe_test_add_suite("latency", (moe_test_entry[]){{"shares follow 1 / measured latency", test_latency_shares},
                                                      {"running latency average", test_running_latency},
                                                      {NULL, NULL}});
    moe_test_add_suite("hetero_model", (moe_test_entry[]){{"layout, parameter count, expert parallelism", test_model_layout},
                                                            {"checkpoint round trip", test_model_checkpoint},
                                                            {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
