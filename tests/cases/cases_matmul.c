/* Op cases: matmul (2-D, batched, shared right operand, transposed views), grouped matmul. */
#include "tests/harness/opcheck.h"

static moe_tensor *run_mm(moe_tensor **in) { return moe_matmul(in[0], in[1]); }
static moe_tensor *run_grouped(moe_tensor **in) {
    /* 7 rows over 3 experts: 3, 0 (empty expert), 4 */
    return moe_grouped_matmul(in[0], in[1], (int64_t[]){0, 3, 3, 7});
}

static const op_case cases[] = {
    {"matmul", "2-d", 2, {{2, {3, 4}, IN_NORMAL, 0, true, false}, {2, {4, 5}, IN_NORMAL, 0, true, false}}, run_mm},
    {"matmul", "transposed operands", 2, {{2, {3, 4}, IN_NORMAL, 0, true, true}, {2, {4, 5}, IN_NORMAL, 0, true, true}}, run_mm},
    {"matmul", "batched", 2, {{3, {2, 3, 4}, IN_NORMAL, 0, true, false}, {3, {2, 4, 2}, IN_NORMAL, 0, true, true}}, run_mm},
    {"matmul", "batched @ shared 2-d", 2, {{3, {2, 3, 4}, IN_NORMAL, 0, true, false}, {2, {4, 3}, IN_NORMAL, 0, true, false}}, run_mm},
    {"grouped_matmul", "3 experts, one empty", 2, {{2, {7, 4}, IN_NORMAL, 0, true, false}, {3, {3, 4, 5}, IN_NORMAL, 0, true, false}}, run_grouped},
};

const op_case_list cases_matmul = {cases, sizeof cases / sizeof *cases};
