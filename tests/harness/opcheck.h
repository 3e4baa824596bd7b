/* Op test cases and the two generic checks every op gets:
 *  - gradcheck: f64 on the CPU, analytic grads of L = sum(out * R) against central
 *    differences, elements at kinks (where steps h and h/2 disagree) masked;
 *  - parity: the same case in f32 on CPU and CUDA (inputs identical, outputs poisoned),
 *    forward output and every input grad compared by normalised error.
 * Each op family has a file tests/cases/cases_<family>.c with an array of cases. */
#ifndef MOE_TESTS_OPCHECK_H
#define MOE_TESTS_OPCHECK_H

#include <stdbool.h>

#include "core/ops.h"

typedef enum {
    IN_NORMAL,    /* N(0, 1) */
    IN_POSITIVE,  /* uniform in [0.5, 2) */
    IN_UNIT,      /* uniform in (0.05, 0.95) */
    IN_INDEX,     /* integers in [0, index_hi) as I32 */
    IN_DISTINCT,  /* a random permutation-like spread, no ties (for max/topk/sort) */
} op_input_kind;

typedef struct op_input_spec {
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    op_input_kind kind;
    int64_t index_hi;
    bool grad;        /* differentiate with respect to it */
    bool transposed;  /* hand the op a non-contiguous view (last two dims stored swapped) */
} op_input_spec;

typedef struct op_case {
    const char *op;   /* op name as in the op table (coverage check) */
    const char *name; /* case name */
    int n_in;
    op_input_spec in[6];
    /* Builds the output from the inputs (any device / dtype). */
    moe_tensor *(*run)(moe_tensor **in);
    double grad_tol;   /* relative tolerance of the f64 gradcheck (0: 1e-6) */
    double parity_tol; /* normalised error allowed for CUDA f32 vs CPU f32 (0: 1e-5) */
    /* Non-differentiable ops: checks outputs against a reference, returns true when right.
     * When set, gradcheck is replaced by this check (on CPU). */
    bool (*check)(moe_tensor **in, moe_tensor *out, char *why, size_t cap);
    /* CUDA parity in f32 only: rounding the inputs to bf16 makes ties, and which of the
     * tied elements a sort or max picks then differs from the unrounded CPU reference. */
    bool f32_parity_only;
    /* > 0: the gradcheck tries only about this many elements per input, evenly spread (a
     * case sized for a CUDA kernel's tiling, too large to difference every element). */
    int grad_samples;
} op_case;

typedef struct op_case_list { const op_case *cases; int n; } op_case_list;

/* All case arrays (tests/cases/op_cases.c). */
extern const op_case_list *const moe_op_case_lists[];
extern const int moe_op_case_list_count;

/* Makes the inputs of a case on a device with a dtype for float inputs; seed varies draws. */
void opcheck_make_inputs(const op_case *c, moe_device dev, moe_dtype float_dt, uint64_t seed, moe_tensor **in);

/* Returns true on success; otherwise writes the reason into why. */
bool opcheck_gradcheck(const op_case *c, uint64_t seed, char *why, size_t cap);
bool opcheck_parity(const op_case *c, moe_device dev, moe_dtype dt, uint64_t seed, char *why, size_t cap);
/* For a case's check: out equal to ref elementwise within rel * (1 + |ref|) (rel 0: bit for
 * bit); `ref_name` says in the message what ref is. */
bool opcheck_matches(moe_tensor *out, moe_tensor *ref, double rel, const char *ref_name, char *why, size_t cap);

#endif
