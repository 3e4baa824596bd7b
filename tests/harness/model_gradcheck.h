/* Finite-difference check of a whole model's gradients (f64 compute) on a fixed batch. */
#ifndef MOE_TESTS_MODEL_GRADCHECK_H
#define MOE_TESTS_MODEL_GRADCHECK_H

#include "moe/model/model.h"

typedef struct moe_gradcheck_result {
    int checked; /* sampled elements compared (those at a routing kink are skipped) */
    int bad;     /* of them, analytic and numeric gradient disagreeing beyond 2e-3 relative */
} moe_gradcheck_result;

/* Builds the model of cfg, computes the loss on B x T tokens in f64 and compares the
 * gradient of `samples` elements of every parameter with central differences (steps h and
 * h/2 must agree, else the element sits at a kink and is skipped). Prints each mismatch. */
moe_gradcheck_result moe_test_model_gradcheck(const moe_config *cfg, int B, int T, int samples);

#endif
