/* The op table and the tests stay in step: every op has a name, a backward when it is
 * differentiable, and at least one test case (gradcheck or reference check, which the
 * CUDA parity test also runs); every kernel has a CPU implementation. */
#include <string.h>

#include "core/kernels.h"
#include "tests/harness/opcheck.h"
#include "tests/harness/testlib.h"

static bool has_case(const char *name) {
    for (int l = 0; l < moe_op_case_list_count; l++)
        for (int i = 0; i < moe_op_case_lists[l]->n; i++)
            if (!strcmp(moe_op_case_lists[l]->cases[i].op, name)) return true;
    return false;
}

static void test_every_op_complete(void) {
    for (int op = 0; op < MOE_OP_COUNT; op++) {
        const moe_op_info *info = &moe_op_table[op];
        CU_ASSERT_PTR_NOT_NULL_FATAL(info->name);
        if (info->differentiable && !info->backward) {
            fprintf(stderr, "  op %s has no backward (moe_backward_%s)\n", info->name, info->name);
            CU_FAIL("op without backward");
        }
        if (!has_case(info->name)) {
            fprintf(stderr, "  op %s has no test case in tests/cases/\n", info->name);
            CU_FAIL("op without a test case");
        }
    }
}

static void test_every_case_names_an_op(void) {
    for (int l = 0; l < moe_op_case_list_count; l++)
        for (int i = 0; i < moe_op_case_lists[l]->n; i++) {
            const char *name = moe_op_case_lists[l]->cases[i].op;
            bool found = false;
            for (int op = 0; op < MOE_OP_COUNT; op++) found |= !strcmp(moe_op_table[op].name, name);
            if (!found) fprintf(stderr, "  case names unknown op %s\n", name);
            CU_ASSERT(found);
        }
}

static void test_every_kernel_on_cpu(void) {
    const moe_backend *cpu = moe_backend_get(MOE_CPU);
    for (int k = 0; k < MOE_KERNEL_COUNT; k++) {
        if (!cpu->kernels[k]) fprintf(stderr, "  kernel %s has no CPU implementation\n", moe_kernel_names[k]);
        CU_ASSERT_PTR_NOT_NULL(cpu->kernels[k]);
    }
}

static void register_suites(void) {
    moe_test_add_suite("optable", (moe_test_entry[]){{"every op has a backward and a test case", test_every_op_complete},
                                                      {"every case names a real op", test_every_case_names_an_op},
                                                      {"every kernel has a CPU implementation", test_every_kernel_on_cpu},
                                                      {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
