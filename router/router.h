/* Routers: score tokens against experts, pick k experts per token, give the gates and
 * the balance losses. Knows only core/.
 *
 * Top-k softmax router (Switch / Mixtral, ../shared/design/ALGORITHMS.md §1):
 *   logits = x W_g, p = softmax(logits) in f32, top-k of p (+ per-expert bias for
 *   selection only under aux-loss-free balancing), gates = the chosen p renormalised
 *   (optional), Switch aux loss alpha * E * sum_e f_e P_e, z-loss beta * mean(lse^2). */
#ifndef MOE_ROUTER_ROUTER_H
#define MOE_ROUTER_ROUTER_H

#include <stdbool.h>

#include "core/tensor.h"

typedef enum { MOE_BALANCE_SWITCH, MOE_BALANCE_LATENCY, MOE_BALANCE_AUX_FREE, MOE_BALANCE_NONE } moe_balance_kind;

typedef struct moe_router_settings {
    int n_experts, top_k, d_model;
    moe_balance_kind balance;
    double aux_coef, z_coef;
    bool renormalize;
    double aux_free_rate;
} moe_router_settings;

typedef struct moe_router {
    moe_router_settings s;
    moe_tensor *w_gate;   /* [d, E] parameter */
    moe_tensor *bias;     /* [E] F32, aux-loss-free selection bias (not a parameter), or NULL */
    char name[96];
} moe_router;

/* What one routing of T tokens produced. Tensors are STEP tensors. */
typedef struct moe_routing {
    moe_tensor *gates;     /* [T, k] differentiable */
    moe_tensor *experts;   /* [T, k] I32 */
    moe_tensor *probs;     /* [T, E] softmax probabilities (f32) */
    moe_tensor *aux_loss;  /* scalar (already weighted by its coefficient) or NULL */
    moe_tensor *z_loss;    /* scalar (weighted) or NULL */
    int32_t *host_experts; /* [T * k] host copy of experts (the one device->host read) */
    int64_t *load;         /* [E] assignment counts */
    int64_t n_tokens;
} moe_routing;

moe_status moe_router_init(moe_router *r, const moe_router_settings *s, moe_device dev, moe_dtype dt,
                           const char *name, uint64_t seed, double init_std);
void moe_router_free(moe_router *r);

/* x [T, d]. */
moe_status moe_router_forward(moe_router *r, moe_tensor *x, moe_routing *out);

/* After the optimizer step: aux-loss-free bias update b_e += rate * sign(mean load - load_e). */
moe_status moe_router_update_bias(moe_router *r, const int64_t *load);

#endif
