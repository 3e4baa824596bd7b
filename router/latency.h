/* Latency-aware load balancing (ShiftAddViT, router/README.md §3).
 *
 *   L_LL = coef * (CV^2(alpha * Importance) + CV^2(alpha * Load))
 *   Importance_e = sum_t gate_{t,e} (differentiable), Load_e = the smooth Shazeer estimate
 *   sum_t P(e in top-k_t) under noisy gating (differentiable), else the hard assignment
 *   counts (no gradient: the Load term then only shifts the loss value, and an expert
 *   that no token picks gets no signal — use router.noisy_gating), alpha_e = latency_e / mean.
 * At the optimum alpha_e Importance_e is equal, so an expert's token share goes as
 * 1 / latency. CV^2(x) = var(x) / (mean(x)^2 + 1e-10) with the unbiased (n - 1) variance
 * of the reference code (torch's .var()); a single element gives 0. */
#ifndef MOE_ROUTER_LATENCY_H
#define MOE_ROUTER_LATENCY_H

#include <stdint.h>

#include "core/tensor.h"

/* x [n] float -> scalar CV^2(x), differentiable. */
moe_tensor *moe_cv_squared(moe_tensor *x);

/* alpha[e] = latency[e] / mean(latency). MOE_ERR_INVALID when a latency is not a positive
 * finite number (a failed measurement). */
moe_status moe_latency_alpha(const double *latency, int n_experts, double *alpha);

/* gates [T, k] float, experts [T, k] I32 (same device), load [E] host counts or
 * smooth_load [E] (differentiable, used when not NULL), alpha [E] host (NULL: all 1)
 * -> scalar L_LL in gates' dtype. */
moe_tensor *moe_latency_loss(moe_tensor *gates, moe_tensor *experts, const int64_t *load, moe_tensor *smooth_load,
                             const double *alpha, int n_experts, double coef);

/* Running average of measured latencies: avg[e] = decay * avg[e] + (1 - decay) * sample[e];
 * an entry not yet measured (avg[e] <= 0) takes the sample as it is. */
void moe_latency_ema_update(double *avg, const double *sample, int n_experts, double decay);

#endif
