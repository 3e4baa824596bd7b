/* Offloaded inference on a GPU machine: the expert cache in device memory, filled from a
 * page-locked host store through the copy stream, gives the resident decoder's greedy ids
 * and logits (f32; the grouped GEMM as a loop of per-expert GEMMs, so each expert's product
 * is the same kernel whatever the others) under every policy but cpu (no host kernels
 * beside the device yet), at the least budget, a larger one and in waves. */
#include <stdlib.h>

#include "core/device.h"
#include "moe/model/model.h"
#include "tests/harness/offload_check.h"
#include "tests/harness/testlib.h"

static void test_offload_cuda(void) {
    if (!moe_device_available(MOE_CUDA)) {
        fprintf(stderr, "  no CUDA device: %s\n", moe_last_error());
        CU_FAIL("no CUDA device");
        return;
    }
    moe_config c;
    moe_config_defaults(&c);
    c.model.vocab_size = 40;
    c.model.d_model = 32;
    c.model.n_layers = 4;
    c.model.n_heads = 2;
    c.model.seq_len = 64;
    c.model.ffn_dim = 16;
    c.model.n_experts = 8;
    c.model.top_k = 2;
    c.model.dense_layers = 1;
    c.model.init_std = 0.3;
    c.train.device = MOE_CFG_DEVICE_CUDA;
    c.train.dtype = MOE_CFG_DTYPE_F32;
    moe_model m;
    CU_ASSERT_EQUAL_FATAL(moe_config_validate(&c), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 0, 1), MOE_OK);
    m.compute = MOE_F32;
    offload_check_model(&m, "ours on cuda", 1e-5);
    moe_model_free(&m);
}

static void register_suites(void) {
    static const moe_test_entry tests[] = {{"every policy == resident on the device", test_offload_cuda}, {NULL, NULL}};
    moe_test_add_suite("offload_cuda", tests);
}

int main(int argc, char **argv) {
    setenv("MOE_GROUPED_CUBLAS", "0", 1);
    return moe_test_main(argc, argv, register_suites);
}
