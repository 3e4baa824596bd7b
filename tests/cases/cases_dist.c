/* Op cases: the all-to-all exchange (on one process: the identity over the world group;
 * tests/test_mpi_train.c checks N ranks against one). */
#include "tests/harness/opcheck.h"

#include "core/dist.h"

static moe_tensor *run_a2a(moe_tensor **in) {
    int64_t rows[1] = {in[0]->shape[0]};
    return moe_mul(moe_all_to_all(moe_contiguous(in[0]), rows, rows, MOE_GROUP_WORLD), in[0]);
}

static const op_case cases[] = {
    {"all_to_all", "one rank", 1, {{2, {5, 3}, IN_NORMAL, 0, true, true}}, run_a2a},
};

const op_case_list cases_dist = {cases, sizeof cases / sizeof *cases};
