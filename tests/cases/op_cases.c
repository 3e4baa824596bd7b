/* The list of all op case arrays, one per op family. */
#include "tests/harness/opcheck.h"

extern const op_case_list cases_shape, cases_elementwise, cases_reduce, cases_matmul, cases_index, cases_norm,
    cases_nn, cases_dist, cases_scan, cases_recompute;

const op_case_list *const moe_op_case_lists[] = {
    &cases_shape, &cases_elementwise, &cases_reduce, &cases_matmul, &cases_index, &cases_norm, &cases_nn, &cases_dist, &cases_scan,
    &cases_recompute,
};
const int moe_op_case_list_count = sizeof moe_op_case_lists / sizeof *moe_op_case_lists;
