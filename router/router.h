/* Routers: score tokens against experts, pick k experts per token, give the gates and
 * the balance losses. Knows only core/. Notes: router/README.md (the § below).
 *
 * Three router types share one settings struct, one moe_router and one forward:
 * - topk (§1): logits = x W_g, p = softmax(logits) in f32, top-k of p (+ per-expert bias
 *   for selection only under aux-loss-free balancing), gates = the chosen p renormalised
 *   (optional, k > 1), Switch aux loss alpha * E * sum_e f_e P_e, z-loss beta * mean(lse^2).
 * - rmoe (§2): logits = G_i h_i with h_i = GRU(P_i x, h_{i-1}) (router/rmoe.h); the GRU
 *   cell is one object shared by every MoE layer of the model; then exactly as topk.
 * - ot (§4): logits = x W_g; selection from a sparsity-constrained transport plan with at
 *   most ceil(T k / E) tokens per expert (router/ot.h); gates from p (see forward).
 * Balance: switch (§1), latency (§3, router/latency.h), aux_free (§1), none.
 * DeepSeek-V3 routing is topk with sigmoid scores, the aux_free bias (selection only),
 * group-limited selection and a gate scale; with groups, experts outside the chosen
 * groups compete with a selection score of 0 (as DeepSeek-V3's reference does). */
#ifndef MOE_ROUTER_ROUTER_H
#define MOE_ROUTER_ROUTER_H

#include <stdbool.h>

#include "core/tensor.h"

/* Same order as moe_cfg_router_type / moe_cfg_balance, so the config values cast. */
typedef enum { MOE_ROUTER_TOPK, MOE_ROUTER_RMOE, MOE_ROUTER_OT } moe_router_type;
typedef enum { MOE_BALANCE_SWITCH, MOE_BALANCE_LATENCY, MOE_BALANCE_AUX_FREE, MOE_BALANCE_NONE } moe_balance_kind;

struct moe_rmoe_gru;

typedef struct moe_router_settings {
    int n_experts, top_k, d_model;
    moe_balance_kind balance;
    double aux_coef, z_coef;  /* aux_coef also weighs the latency loss (§3: default 0.01) */
    bool renormalize;
    double aux_free_rate;
    moe_router_type type;     /* zero value: topk */
    int rmoe_dim;             /* rmoe: GRU width p */
    bool rmoe_detach;         /* rmoe: use h_{i-1} without its gradient (ablation) */
    struct moe_rmoe_gru *gru; /* rmoe: the model's shared GRU cell (not owned, outlives the router) */
    int ot_iters;             /* ot: semi-dual gradient steps (<= 0: 30) */
    double ot_gamma;          /* ot: quadratic regularisation (<= 0: 1.0) */
    bool ot_plan_gates;       /* ot: gate values from the plan, gradient from the softmax */
    bool noisy_gating;        /* Shazeer noisy top-k gating while training (grad mode on) */
    bool sigmoid_scores;      /* p = sigmoid(logits) per expert instead of the softmax (topk, rmoe) */
    int n_groups, topk_groups; /* group-limited top-k (> 1 groups): only the experts of the topk_groups
                                * groups with the largest sum of their top-2 selection scores are chosen */
    double scale;             /* gates multiplied by it after renormalisation (0 taken as 1) */
    moe_init_mode init;       /* parameters drawn (zero value) or zeros for a loader to fill */
} moe_router_settings;

typedef struct moe_router {
    moe_router_settings s;
    moe_tensor *w_gate;   /* topk, ot: [d, E] parameter; rmoe: NULL */
    moe_tensor *proj;     /* rmoe: P_i [d, p] parameter, no bias */
    moe_tensor *head;     /* rmoe: G_i [p, E] parameter */
    moe_tensor *bias;     /* [E] F32, aux-loss-free selection bias (not a parameter), or NULL */
    double *latency_alpha; /* [E] host, latency weights normalised to mean 1, or NULL (all 1) */
    moe_tensor *w_noise;  /* noisy gating: [d, E] parameter (zero init), noise std = softplus(x W_noise) */
    uint64_t noise_counter; /* Philox counter of the next noise draw (the model sets it every step) */
    char name[96];        /* name of w_gate (topk, ot) */
    char name_proj[96], name_head[96], name_noise[96];
} moe_router;

/* What one routing of T tokens produced. Tensors are STEP tensors. */
typedef struct moe_routing {
    moe_tensor *gates;     /* [T, k] differentiable */
    moe_tensor *experts;   /* [T, k] I32 */
    moe_tensor *probs;     /* [T, E] softmax probabilities (f32, f64 for f64 input) */
    moe_tensor *aux_loss;  /* scalar (already weighted by its coefficient) or NULL */
    moe_tensor *z_loss;    /* scalar (weighted) or NULL */
    moe_tensor *state;     /* rmoe: h_i [T, p] (differentiable) to pass to the next layer; else NULL */
    int32_t *host_experts; /* [T * k] host copy of experts (the one device->host read) */
    bool *valid;           /* [T * k] host; false = no assignment (treat like a capacity drop);
                            * NULL = all valid. Only the ot router sets it. */
    int64_t *load;         /* [E] counts of the valid assignments */
    moe_tensor *smooth_load; /* noisy gating: [E] sum_t P(e in top-k of token t), differentiable; else NULL */
    int64_t n_tokens;
} moe_routing;

/* `name` prefixes the parameter names: "<name>.w_gate" (topk, ot), "<name>.proj" and
 * "<name>.head" (rmoe). Weights are normal(init_std) from `seed` (one seed per router;
 * the parameters take disjoint counter ranges), created in `dt`. rmoe needs s->gru set,
 * with s->gru->dim == s->rmoe_dim. */
moe_status moe_router_init(moe_router *r, const moe_router_settings *s, moe_device dev, moe_dtype dt,
                           const char *name, uint64_t seed, double init_std);
void moe_router_free(moe_router *r);

/* The router's own trainable parameters (not the shared GRU's: see moe_rmoe_gru_params)
 * with their stable checkpoint names. Writes min(count, cap) entries and returns count
 * (topk / ot: 1, rmoe: 2). */
int moe_router_params(const moe_router *r, moe_tensor **ts, const char **names, int cap);

/* x [T, d] in the compute dtype (the router casts its parameters to it). The projection
 * from d runs in x's dtype, everything after it in f32 (f64 when x is f64).
 * state_in: rmoe only, the previous MoE layer's out->state ([T, p]), NULL for the first
 * MoE layer (h_0 = 0); topk and ot ignore it (pass NULL). */
moe_status moe_router_forward(moe_router *r, moe_tensor *x, moe_tensor *state_in, moe_routing *out);

/* The router's scores: logits [T, E] in f32 (f64 for f64 x) of x [T, d]; rmoe also
 * writes the new state h_i [T, p] to *state_out (state_in as moe_router_forward). No noise. */
moe_tensor *moe_router_logits(moe_router *r, moe_tensor *x, moe_tensor *state_in, moe_tensor **state_out);

/* Selection alone, for inference, offload prediction and tracing: logits [T, E] -> the
 * experts and gates into out (gates, experts, probs, host_experts, load, n_tokens; no
 * losses, no noise, no collectives: one process's tokens decide alone). topk and rmoe
 * select exactly as moe_router_forward; ot selects by plain top-k of p (README §4 says
 * why). out's tensors are STEP tensors. */
moe_status moe_router_select(const moe_router *r, moe_tensor *logits, moe_routing *out);

/* The same selection left on the device, from the layer's input x [T, d]: gates [T, k] (x's
 * dtype) and experts [T, k] I32 as moe_router_select computes them up to rounding, without
 * the read back (nothing on the host waits). topk's and ot's projection and selection are
 * one op (moe_route_select: the logits in x's dtype, read exactly and selected on in f32);
 * rmoe's logits come from moe_router_logits with its state carried from state_in into
 * *state_out (NULL for the others), then moe_route_topk selects.
 * Only where moe_router_selects_on_device: group-limited selection runs on the host. */
bool moe_router_selects_on_device(const moe_router *r);
moe_status moe_router_select_device(moe_router *r, moe_tensor *x, moe_tensor *state_in, moe_tensor **state_out,
                                    moe_tensor **gates, moe_tensor **experts);

/* After the optimizer step: aux-loss-free bias update b_e += rate * sign(mean load - load_e). */
moe_status moe_router_update_bias(moe_router *r, const int64_t *load);

/* Latency-aware balance (§3): per-expert forward latencies (any positive unit, [E]) from
 * which alpha_e = latency_e / mean(latency) is derived. Call again whenever the
 * measurement changes (e.g. after moe_latency_ema_update). */
moe_status moe_router_set_latency(moe_router *r, const double *latency_ms);

#endif
