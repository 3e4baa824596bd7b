/* Op cases: norm family (filled in with the ops). */
#include "tests/harness/opcheck.h"

static const op_case cases[] = {
    {0},
};

const op_case_list cases_norm = {cases, 0};
