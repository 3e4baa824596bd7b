/* Every op case: finite-difference gradient check in f64 on the CPU (or its own reference
 * check for non-differentiable ops), with fresh random inputs for two seeds. */
#include <stdio.h>

#include "core/fileio.h"
#include "tests/harness/opcheck.h"
#include "tests/harness/testlib.h"

static void test_gradcheck_all(void) {
    int failed = 0, ran = 0;
    for (int l = 0; l < moe_op_case_list_count; l++) {
        for (int i = 0; i < moe_op_case_lists[l]->n; i++) {
            const op_case *c = &moe_op_case_lists[l]->cases[i];
            double t0 = moe_clock_ms();
            for (uint64_t seed = 1; seed <= 2; seed++) {
                char why[512] = "";
                ran++;
                if (!opcheck_gradcheck(c, seed, why, sizeof why)) {
                    fprintf(stderr, "  FAIL %s / %s (seed %llu): %s\n", c->op, c->name, (unsigned long long)seed, why);
                    failed++;
                }
            }
            double ms = moe_clock_ms() - t0;
            if (ms > 2000) fprintf(stderr, "  slow case: %s / %s took %.1f s for both seeds\n", c->op, c->name, ms / 1e3);
        }
    }
    fprintf(stderr, "  gradcheck: %d cases run, %d failed\n", ran, failed);
    CU_ASSERT(ran > 0);
    CU_ASSERT_EQUAL(failed, 0);
}

static void register_suites(void) {
    moe_test_add_suite("gradcheck", (moe_test_entry[]){{"every op case", test_gradcheck_all}, {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
