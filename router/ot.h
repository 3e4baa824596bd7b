/* Sparsity-constrained optimal-transport routing (router/README.md §4), on the host in double.
 *
 * Problem: min <P, C> + (gamma/2) ||P||^2 over plans P [T, E] >= 0 with uniform row sums
 * (tokens), uniform column sums (experts) and at most `capacity` nonzeros per column,
 * C = -logits. Solved by plain gradient ascent on the semi-dual over alpha in R^T:
 * column j is y_j = the capacity-sparse simplex projection of (alpha - c_j) / (gamma b_j),
 * the gradient is a - sum_j b_j y_j.
 *
 * Units: the solver works in token units (a_t = 1, b_j = T / E), so gamma is on the scale
 * of the logits whatever T is (gamma = 1: a column spreads its mass over the tokens whose
 * alpha_t - c_tj lies within about one logit unit of its best); this equals the spec's
 * normalisation (a = 1/T, b = 1/E) with gamma_spec = gamma / T. The returned plan is in
 * the spec's normalisation: row sums -> 1/T, column sums exactly 1/E.
 *
 * Step size gamma / E: every column's map alpha -> b_j y_j is (1/gamma)-Lipschitz (a
 * projection is 1-Lipschitz and b_j cancels), so the gradient of the (non-sparse) semi-dual
 * is (E / gamma)-Lipschitz and 1/L = gamma / E is the classical safe ascent step.
 * Warm start alpha_t = -max_j logit_tj makes every token's best expert sit at 0, so the
 * columns start by taking the tokens that want them most. */
#ifndef MOE_ROUTER_OT_H
#define MOE_ROUTER_OT_H

#include <stdbool.h>
#include <stdint.h>

#include "core/status.h"

/* ceil(T k / E): the most tokens one expert may take. */
int64_t moe_ot_capacity(int64_t n_tokens, int top_k, int n_experts);

/* logits [T * E] row-major -> plan [T * E] row-major (spec normalisation, see above).
 * iters gradient steps, then the plan of the final alpha. MOE_ERR_OOM on allocation failure. */
moe_status moe_ot_plan(const double *logits, int64_t n_tokens, int n_experts, int64_t capacity, int iters,
                       double gamma, double *plan);

/* Each token's k largest plan entries, descending (ties: larger logit, then lower expert):
 * experts [T * k]; valid[i] = the plan entry is positive (an expert with zero plan value
 * is listed only to fill the k slots and must not receive the token). */
void moe_ot_select(const double *plan, const double *logits, int64_t n_tokens, int n_experts, int top_k,
                   int32_t *experts, bool *valid);

#endif
