/* CUDA parity: every op case runs on the CPU (f32) and on CUDA (f32, and bf16 when all
 * its inputs are float), forward output and input grads compared by normalised error.
 * A kernel missing on CUDA makes its cases fail with the dispatcher's message. Plus the
 * out-of-memory path of the CUDA allocator. MOE_TEST_OPS=op1,op2 runs only those ops'
 * cases (scripts/gpu-check.sh --racecheck). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/cuda_info.h"
#include "core/kernels.h"
#include "core/memory.h"
#include "tests/harness/opcheck.h"
#include "tests/harness/testlib.h"

static bool all_float_inputs(const op_case *c) {
    for (int j = 0; j < c->n_in; j++)
        if (c->in[j].kind == IN_INDEX) return false;
    return true;
}

/* MOE_TEST_OPS=a,b: only the cases of these ops (e.g. for a compute-sanitizer run). */
static bool op_selected(const char *op) {
    const char *list = getenv("MOE_TEST_OPS");
    if (!list || !*list) return true;
    size_t n = strlen(op);
    for (const char *p = list; (p = strstr(p, op)); p += n)
        if ((p == list || p[-1] == ',') && (p[n] == ',' || p[n] == '\0')) return true;
    return false;
}

static void test_parity_all(void) {
    if (!moe_backend_get(MOE_CUDA)) {
        fprintf(stderr, "  no CUDA device: %s\n", moe_last_error());
        CU_FAIL("no CUDA device");
        return;
    }
    fprintf(stderr, "  %s\n", moe_cuda_describe());
    int ran = 0, failed = 0;
    for (int l = 0; l < moe_op_case_list_count; l++) {
        for (int i = 0; i < moe_op_case_lists[l]->n; i++) {
            const op_case *c = &moe_op_case_lists[l]->cases[i];
            if (!op_selected(c->op)) continue;
            moe_dtype dts[2] = {MOE_F32, MOE_BF16};
            int ndt = all_float_inputs(c) && !c->f32_parity_only ? 2 : 1;
            for (int k = 0; k < ndt; k++) {
                for (uint64_t seed = 1; seed <= 2; seed++) {
                    char why[512] = "";
                    ran++;
                    if (!opcheck_parity(c, MOE_CUDA, dts[k], seed, why, sizeof why)) {
                        fprintf(stderr, "  FAIL %s / %s (%s, seed %llu): %s\n", c->op, c->name,
                                moe_dtype_name(dts[k]), (unsigned long long)seed, why);
                        failed++;
                    }
                }
            }
        }
    }
    moe_step_reset();
    fprintf(stderr, "  parity: %d cases, %d failed\n", ran, failed);
    CU_ASSERT(ran > 0);
    CU_ASSERT_EQUAL(failed, 0);
}

static void test_oom_message(void) {
    const moe_backend *be = moe_backend_get(MOE_CUDA);
    CU_ASSERT_PTR_NOT_NULL_FATAL(be);
    moe_error_clear();
    void *p = be->alloc((size_t)1 << 50); /* 1 PiB */
    CU_ASSERT_PTR_NULL(p);
    CU_ASSERT_EQUAL(moe_last_status(), MOE_ERR_OOM);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "free"));
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "cuda"));
    fprintf(stderr, "  1 PiB: %s\n", moe_last_error());
    /* the device still works afterwards */
    int64_t s[1] = {4};
    moe_tensor *t = moe_tensor_zeros(MOE_LIFE_PERSIST, MOE_CUDA, MOE_F32, 1, s);
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    CU_ASSERT_EQUAL(moe_tensor_fill(t, 2.5), MOE_OK);
    double h[4] = {0};
    CU_ASSERT_EQUAL(moe_tensor_to_host_f64(t, h), MOE_OK);
    CU_ASSERT_DOUBLE_EQUAL(h[3], 2.5, 0);
    moe_tensor_free(t);
    moe_step_reset();
}

static void register_suites(void) {
    moe_test_add_suite("cuda_ops", (moe_test_entry[]){{"parity of every op case", test_parity_all},
                                                       {"out of memory", test_oom_message},
                                                       {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
