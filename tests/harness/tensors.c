/* Tensors the op tests make and read back (see tensors.h). */
#include "tests/harness/tensors.h"

#include <stdlib.h>

#include "tests/harness/testlib.h"

double *test_host_f64(const moe_tensor *t) {
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    double *h = malloc(sizeof(double) * (size_t)moe_tensor_numel(t));
    CU_ASSERT_PTR_NOT_NULL_FATAL(h);
    CU_ASSERT_EQUAL_FATAL(moe_tensor_to_host_f64(t, h), MOE_OK);
    return h;
}

moe_tensor *test_randn(moe_dtype dt, int ndim, const int64_t *shape, uint64_t seed) {
    return moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, dt, ndim, shape, seed, 0, 1.0);
}

moe_tensor *test_leaf(moe_dtype dt, int ndim, const int64_t *shape, uint64_t seed) {
    moe_tensor *t = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, dt, ndim, shape, seed, 0, 1.0);
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    t->requires_grad = true;
    t->is_param = true;
    return t;
}
