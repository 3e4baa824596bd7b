/* Tensors the op tests make and read back: N(0, 1) inputs and parameters on the CPU, and
 * host f64 copies of results that fail the running test when they cannot be made. */
#ifndef MOE_TESTS_TENSORS_H
#define MOE_TESTS_TENSORS_H

#include <stdint.h>

#include "core/tensor.h"

/* A host f64 copy of t (malloc'd, numel(t) values; caller frees). Fails the test (fatal)
 * when t is NULL or cannot be copied. */
double *test_host_f64(const moe_tensor *t);

/* A STEP tensor on the CPU of the given dtype and shape, holding N(0, 1) draws from `seed`. */
moe_tensor *test_randn(moe_dtype dt, int ndim, const int64_t *shape, uint64_t seed);

/* A PERSIST parameter on the CPU that requires grad (its grad persists across steps),
 * holding N(0, 1) draws from `seed`. Fails the test (fatal) when it cannot be made. */
moe_tensor *test_leaf(moe_dtype dt, int ndim, const int64_t *shape, uint64_t seed);

#endif
