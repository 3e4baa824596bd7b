/* Offloaded inference on a GPU machine: the expert cache in device memory, filled from a
 * page-locked host store (the decoder view's own expert stacks) through the copy stream,
 * gives the resident decoder's greedy ids and logits (f32; the grouped GEMM as a loop of
 * per-expert GEMMs, so each expert's product is the same kernel whatever the others) under
 * every policy (cpu and auto run missed experts of few rows on the host kernels from the
 * store, so their products are the host's: f32 within 1e-5), at the least budget, a
 * larger one and in waves; with the master weights on the host, the device memory an open
 * takes is the resident decoder's less every routed expert plus the cache (no device copy
 * of an expert outside the cache slots); with them on the device, the same equalities. */
#include <stdlib.h>

#include "core/device.h"
#include "moe/model/model.h"
#include "tests/harness/offload_check.h"
#include "tests/harness/testlib.h"

static bool have_cuda(void) {
    if (moe_device_available(MOE_CUDA)) return true;
    fprintf(stderr, "  no CUDA device: %s\n", moe_last_error());
    CU_FAIL("no CUDA device");
    return false;
}

static void small_config(moe_config *c, moe_cfg_device dev) {
    moe_config_defaults(c);
    c->model.vocab_size = 40;
    c->model.d_model = 32;
    c->model.n_layers = 4;
    c->model.n_heads = 2;
    c->model.seq_len = 64;
    c->model.ffn_dim = 16;
    c->model.n_experts = 8;
    c->model.top_k = 2;
    c->model.dense_layers = 1;
    c->model.init_std = 0.3;
    c->train.device = dev;
    c->train.dtype = MOE_CFG_DTYPE_F32;
}

static void check_masters_on(moe_cfg_device where, const char *name) {
    if (!have_cuda()) return;
    moe_config c;
    small_config(&c, where);
    moe_model m;
    CU_ASSERT_EQUAL_FATAL(moe_config_validate(&c), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 0, 1), MOE_OK);
    m.compute = MOE_F32;
    offload_check_model_on(&m, MOE_CUDA, name, 1e-5);
    moe_model_free(&m);
}

static void test_offload_host_masters(void) { check_masters_on(MOE_CFG_DEVICE_CPU, "ours, masters on the host"); }
static void test_offload_device_masters(void) { check_masters_on(MOE_CFG_DEVICE_CUDA, "ours, masters on cuda"); }

static void register_suites(void) {
    static const moe_test_entry tests[] = {{"every policy == resident, masters on the host", test_offload_host_masters},
                                           {"every policy == resident, masters on the device", test_offload_device_masters},
                                           {NULL, NULL}};
    moe_test_add_suite("offload_cuda", tests);
}

int main(int argc, char **argv) {
    setenv("MOE_GROUPED_CUBLAS", "0", 1);
    return moe_test_main(argc, argv, register_suites);
}
