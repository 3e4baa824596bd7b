/* The MoE feed-forward layer: route -> permute by expert -> exchange -> grouped SwiGLU
 * experts -> exchange back -> unpermute and combine by the gates (+ shared experts).
 *
 * One pipeline serves every case. The exchange is the identity on one process and an
 * all-to-all across the expert-parallel group under MPI. The experts of a layer are
 * stacked: w13 [E_local, d, 2f] (gate and up projections side by side) and
 * w2 [E_local, f, d]; expert e of the layer has global index expert_begin + local. */
#ifndef MOE_MOE_MOE_LAYER_H
#define MOE_MOE_MOE_LAYER_H

#include "core/tensor.h"
#include "router/router.h"

typedef struct moe_moe_layer_settings {
    int d_model, n_experts, top_k, ffn_dim;
    int n_shared, shared_ffn_dim;
    double capacity_factor; /* 0 = dropless */
    moe_router_settings router;
} moe_moe_layer_settings;

typedef struct moe_moe_layer {
    moe_moe_layer_settings s;
    moe_router router;
    moe_tensor *w13, *w2;               /* local experts, stacked */
    moe_tensor *shared_w13, *shared_w2; /* [d, 2 * n_shared * fs], [n_shared * fs, d] or NULL */
    int expert_begin, n_local;
    char name_w13[96], name_w2[96], name_sw13[96], name_sw2[96];
} moe_moe_layer;

typedef struct moe_moe_layer_result {
    moe_routing routing;
    int64_t dropped;     /* assignments dropped by the capacity limit */
    int64_t assignments; /* T * k */
} moe_moe_layer_result;

/* Initialises parameters with the counter-based RNG keyed by name (so any expert layout
 * gives the same values for the same global expert). */
moe_status moe_moe_layer_init(moe_moe_layer *L, const moe_moe_layer_settings *s, const char *prefix, moe_device dev,
                              uint64_t seed, double init_std, int expert_begin, int n_local);
void moe_moe_layer_free(moe_moe_layer *L);

/* x [T, d] (compute dtype) -> [T, d]; parameters are cast to `compute`. state_in: the
 * recurrent router state of the previous MoE layer (RMoE; NULL otherwise or for the
 * first layer); the new state is res->routing.state. */
moe_tensor *moe_moe_layer_forward(moe_moe_layer *L, moe_tensor *x, moe_tensor *state_in, moe_dtype compute,
                                  moe_moe_layer_result *res);

/* Times each local expert's forward on `tokens` random rows (median of a few runs, ms)
 * and gives the router those latencies (latency-aware balancing). */
moe_status moe_moe_layer_measure_latency(moe_moe_layer *L, int64_t tokens, moe_dtype compute, double *latency_ms);

/* The SwiGLU of one expert on dense rows, for the dense reference in tests:
 * x [N, d], w13 [d, 2f], w2 [f, d]. */
moe_tensor *moe_swiglu_ffn(moe_tensor *x, moe_tensor *w13, moe_tensor *w2);

/* A stable seed for a named parameter (FNV-1a of the name mixed with the base seed). */
uint64_t moe_param_seed(uint64_t base, const char *name);

#endif
