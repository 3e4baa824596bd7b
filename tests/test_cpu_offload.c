/* Offloaded inference (moe/offload/offload.h) in the CPU build, where the "device" is a
 * second host arena filled by a copy thread: for every policy (resident, lru, lfu, cpu,
 * auto, predict with an oracle that replays the recorded routes) greedy generation gives
 * the resident decoder's ids and the same logits bit for bit, on our model and on the
 * OLMoE fixture, also with lookahead (the next layer's router on this layer's rows, with
 * the oracle and alone); a budget of one layer's top-k works; a smaller one is refused
 * with the bytes it needs; the counters add up to the expert uses the routes imply; the
 * host kernels an expert runs on beside a GPU work in bf16. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "core/ops.h"
#include "core/philox.h"
#include "moe/hf/hf_model.h"
#include "moe/model/moe_layer.h"
#include "moe/model/model.h"
#include "moe/offload/offload.h"
#include "tests/harness/offload_check.h"
#include "tests/harness/testlib.h"

static void small_config(moe_config *c) {
    moe_config_defaults(c);
    c->model.vocab_size = 40;
    c->model.d_model = 16;
    c->model.n_layers = 4;
    c->model.n_heads = 2;
    c->model.seq_len = 64;
    c->model.ffn_dim = 8;
    c->model.n_experts = 8;
    c->model.top_k = 2;
    c->model.dense_layers = 1; /* block 0 dense: MoE layers are blocks 1..3 */
    c->model.n_shared_experts = 1;
    c->model.init_std = 0.3;
}

static void test_policies_ours(void) {
    moe_config c;
    small_config(&c);
    moe_model m;
    CU_ASSERT_EQUAL_FATAL(moe_config_validate(&c), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 0, 1), MOE_OK);
    m.compute = MOE_F32;
    offload_check_model(&m, "ours", 0);
    moe_model_free(&m);
}

/* Heterogeneous experts: two width groups per layer, slots of the widest expert. */
static void test_policies_widths(void) {
    moe_config c;
    small_config(&c);
    c.model.expert_ffn_dims = (moe_yaml_list){.count = 8, .values = {8, 4, 8, 4, 12, 4, 8, 12}};
    moe_model m;
    CU_ASSERT_EQUAL_FATAL(moe_config_validate(&c), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 0, 1), MOE_OK);
    m.compute = MOE_F32;
    offload_check_model(&m, "widths 4/8/12", 0);
    moe_model_free(&m);
}

static void test_policies_olmoe(void) {
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", __FILE__);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = '\0';
    size_t n = strlen(dir);
    snprintf(dir + n, sizeof dir - n, "/fixtures/hf/olmoe-tiny");
    moe_model m;
    moe_hf_info info;
    CU_ASSERT_EQUAL_FATAL(moe_hf_load(dir, &m, &info), MOE_OK);
    offload_check_model(&m, "olmoe-tiny", 0);
    moe_model_free(&m);
}

/* A byte short of the least budget is refused, the message naming the bytes it needs;
 * resident refuses a budget that cannot hold every expert; predict needs a predictor or
 * lookahead; lookahead needs a prefetching policy. */
static void test_budget_refused(void) {
    moe_config c;
    small_config(&c);
    moe_model m;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 0, 1), MOE_OK);
    m.compute = MOE_F32;
    moe_offload_options o = offload_check_options(&m, MOE_OFFLOAD_LRU);
    size_t min = offload_check_min_budget(&m, &o);
    o.budget = min - 1;
    moe_offload *off = NULL;
    CU_ASSERT_EQUAL(moe_offload_open(&m, &o, &off), MOE_ERR_OOM);
    CU_ASSERT_PTR_NULL(off);
    char need[64];
    snprintf(need, sizeof need, "%zu bytes", min);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), need));
    fprintf(stderr, "  %s\n", moe_last_error());
    o.budget = min;
    o.policy = MOE_OFFLOAD_RESIDENT;
    CU_ASSERT_EQUAL(moe_offload_open(&m, &o, &off), MOE_ERR_OOM);
    o.policy = MOE_OFFLOAD_PREDICT;
    CU_ASSERT_EQUAL(moe_offload_open(&m, &o, &off), MOE_ERR_CONFIG);
    CHECK_ERROR_HAS("--predictor FILE) or --lookahead");
    o.policy = MOE_OFFLOAD_LRU; /* lookahead prefetches: lru never does */
    o.lookahead = true;
    CU_ASSERT_EQUAL(moe_offload_open(&m, &o, &off), MOE_ERR_CONFIG);
    CHECK_ERROR_HAS("lookahead goes with policy predict or auto (got lru)");
    o.policy = MOE_OFFLOAD_PREDICT; /* with it, predict needs no predictor */
    CU_ASSERT_EQUAL_FATAL(moe_offload_open(&m, &o, &off), MOE_OK);
    moe_offload_close(off);
    off = NULL;
    o.predict_width = c.model.n_experts + 1;
    CU_ASSERT_EQUAL(moe_offload_open(&m, &o, &off), MOE_ERR_CONFIG);
    CHECK_ERROR_HAS("a prediction width of 9 experts (0 .. 8)");
    o.predict_width = 0;
    size_t b = 0;
    CU_ASSERT_EQUAL(moe_parse_bytes("6GiB", &b), MOE_OK);
    CU_ASSERT_EQUAL(b, (size_t)6 << 30);
    CU_ASSERT_EQUAL(moe_parse_bytes("1.5M", &b), MOE_OK);
    CU_ASSERT_EQUAL(b, (size_t)1500000);
    CU_ASSERT_EQUAL(moe_parse_bytes("6 GiB", &b), MOE_ERR_CONFIG);
    CU_ASSERT_EQUAL(moe_parse_bytes("lots", &b), MOE_ERR_CONFIG);
    moe_offload_policy p;
    CU_ASSERT_EQUAL(moe_offload_policy_parse("lfu", &p), MOE_OK);
    CU_ASSERT_EQUAL(p, MOE_OFFLOAD_LFU);
    CU_ASSERT_EQUAL(moe_offload_policy_parse("fifo", &p), MOE_ERR_CONFIG);
    moe_model_free(&m);
}

/* [n] values from a Philox stream as an f32 tensor rounded to bf16 and back (so that the
 * f32 and the bf16 runs read the same numbers), shape [a, b, c] or [b, c] (a 0). */
static moe_tensor *rounded(int64_t a, int64_t b, int64_t c, uint64_t key) {
    int64_t n = (a ? a : 1) * b * c;
    float *v = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++) v[i] = moe_bf16_to_f32(moe_f32_to_bf16((float)(0.5 * moe_philox_normal((uint64_t)i, key))));
    moe_tensor *t = a ? moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 3, (int64_t[]){a, b, c}, v)
                      : moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){b, c}, v);
    free(v);
    return t;
}

/* Beside a GPU, a missed expert runs on the host kernels from its bf16 host copy: the
 * host's grouped SwiGLU in bf16 (oneDNN's bf16 products, the SwiGLU through f32) gives the
 * f32 one within bf16 rounding. */
static void test_host_expert_bf16(void) {
    const int64_t n = 5, d = 48, w = 40, off[3] = {0, 2, 5};
    bool was = moe_grad_set_enabled(false);
    moe_tensor *x = rounded(0, n, d, 1), *w13 = rounded(2, d, 2 * w, 2), *w2 = rounded(2, w, d, 3);
    moe_tensor *ref = moe_grouped_swiglu(x, w13, w2, off);
    moe_tensor *out = moe_grouped_swiglu(moe_cast(x, MOE_BF16), moe_cast(w13, MOE_BF16), moe_cast(w2, MOE_BF16), off);
    CU_ASSERT_PTR_NOT_NULL_FATAL(ref);
    CU_ASSERT_PTR_NOT_NULL_FATAL(out);
    CU_ASSERT_EQUAL(out->dtype, MOE_BF16);
    double a[5 * 48], b[5 * 48], err = 0, scale = 0;
    CHECK_OK(moe_tensor_to_host_f64(ref, a));
    CHECK_OK(moe_tensor_to_host_f64(out, b));
    for (int i = 0; i < n * d; i++) err = fmax(err, fabs(a[i] - b[i])), scale = fmax(scale, fabs(a[i]));
    printf("\n  host expert bf16 vs f32: max difference %.3g of max |y| %.3g\n", err, scale);
    CU_ASSERT(scale > 0.1 && err <= 2e-2 * scale);
    moe_grad_set_enabled(was);
    moe_step_reset();
}

static void register_suites(void) {
    static const moe_test_entry tests[] = {{"every policy == resident, our model", test_policies_ours},
                                           {"every policy == resident, expert widths", test_policies_widths},
                                           {"every policy == resident, olmoe-tiny", test_policies_olmoe},
                                           {"budget checks", test_budget_refused},
                                           {"host expert in bf16", test_host_expert_bf16},
                                           {NULL, NULL}};
    moe_test_add_suite("offload", tests);
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
