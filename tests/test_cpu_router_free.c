/* moe_router_free hands back every tensor moe_router_init made: the live PERSIST bytes
 * return to where they were, for each router type and with noisy gating (whose noise
 * weights were once left behind). */
#include "core/memory.h"
#include "router/router.h"
#include "tests/harness/testlib.h"

static void init_and_free(moe_router_settings s, const char *what) {
    size_t before = moe_mem_get_stats(MOE_CPU).persist_bytes;
    moe_router r;
    CU_ASSERT_EQUAL_FATAL(moe_router_init(&r, &s, MOE_CPU, MOE_F32, "r", 1, 0.1), MOE_OK);
    CU_ASSERT(moe_mem_get_stats(MOE_CPU).persist_bytes > before);
    moe_router_free(&r);
    size_t after = moe_mem_get_stats(MOE_CPU).persist_bytes;
    if (after != before) printf("\n%s: %zu PERSIST bytes left after moe_router_free\n", what, after - before);
    CU_ASSERT_EQUAL(after, before);
}

static void test_free_all(void) {
    moe_router_settings s = {.n_experts = 4, .top_k = 2, .d_model = 8, .balance = MOE_BALANCE_SWITCH,
                             .aux_coef = 0.01, .renormalize = true};
    init_and_free(s, "top-k");
    s.noisy_gating = true;
    init_and_free(s, "top-k, noisy gating");
    s.balance = MOE_BALANCE_AUX_FREE;
    init_and_free(s, "aux-free bias, noisy gating");
}

static void register_suites(void) {
    moe_test_add_suite("router_free", (moe_test_entry[]){{"free_all", test_free_all}, {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
