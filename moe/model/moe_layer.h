/* The MoE feed-forward layer: route -> permute by expert -> exchange -> grouped SwiGLU
 * experts -> exchange back -> combine by the gates (+ shared experts).
 *
 * One pipeline serves every case. The exchange is the identity on one process and an
 * all-to-all across the expert-parallel group under MPI.
 *
 * Experts are stacked per hidden width ("group"): group g holds the n_g experts of width
 * w_g in increasing global index as w13 [n_g, d, 2 w_g] (gate and up projections side by
 * side) and w2 [n_g, w_g, d]. Routing sorts the token-expert pairs group-major (the
 * experts of a group contiguous, each group's experts in index order) and each group runs
 * one grouped matmul per projection over its row range; there is no per-expert loop.
 * - Homogeneous layers (every expert ffn_dim wide) have one group over the local experts
 *   expert_begin .. expert_begin + n_local - 1, named "<prefix>.experts.w13" / ".w2".
 * - Heterogeneous layers (settings.expert_ffn_dims) have one group per distinct width, in
 *   order of first appearance, named "<prefix>.experts.w13.g<width>" / ".w2.g<width>".
 *   They hold every expert (no expert parallelism: init refuses n_local < n_experts).
 * Each expert's initial weights are keyed by its own name "<prefix>.experts.<E>.w13", so
 * they do not depend on the grouping or the expert-parallel layout.
 *
 * Latency-aware balancing (router balance = latency) needs each expert's latency:
 * moe_moe_layer_measure_latency times every expert at start-up; with
 * settings.latency_running every forward with gradients enabled (training) also times each
 * group's grouped matmuls, synchronising the device before and after each group (so
 * opt-in: it costs the overlap between groups and, under expert parallelism, one small
 * all-reduce of E doubles per layer per forward), and keeps a running average per expert
 * of the time per row (decay MOE_LATENCY_RUNNING_DECAY) that it hands to the router. A
 * group that got no rows in a step keeps its previous average. */
#ifndef MOE_MOE_MOE_LAYER_H
#define MOE_MOE_MOE_LAYER_H

#include "core/tensor.h"
#include "router/router.h"

/* Weight of the previous average in the running latency average (latency_running). */
#define MOE_LATENCY_RUNNING_DECAY 0.9

typedef struct moe_moe_layer_settings {
    int d_model, n_experts, top_k, ffn_dim;
    const int *expert_ffn_dims; /* [n_experts] hidden width of each expert, or NULL: all ffn_dim.
                                 * Read by init only (the layer keeps its own copy). */
    int n_shared, shared_ffn_dim;
    bool shared_gate;       /* the shared experts' output times sigmoid(x w_sg), w_sg [d, 1] */
    double capacity_factor; /* 0 = dropless */
    bool latency_running;   /* router.latency_source = running: time every training forward */
    bool recompute_experts; /* training: each group's SwiGLU recomputed in the backward (moe_recompute) */
    moe_router_settings router;
    moe_init_mode init;     /* every weight (router's too) drawn (zero value) or zeros for a loader */
} moe_moe_layer_settings;

/* The local experts of one hidden width, stacked. */
typedef struct moe_expert_group {
    int ffn_dim;          /* w_g */
    int n;                /* experts in the group */
    int *experts;         /* [n] their global indices, increasing */
    moe_tensor *w13, *w2; /* [n, d, 2 w_g], [n, w_g, d] */
    char name_w13[112], name_w2[112];
} moe_expert_group;

struct moe_moe_layer;

/* Where a layer's routed experts come from at inference when they are not all resident
 * (an expert offload cache implements it; the model room never sees how). The decoder
 * installs one on the MoE layers of its view of the model; training never has one. */
typedef struct moe_expert_provider {
    void *ctx;
    /* Before each forward, the batch's tokens [n] with their positions and sequence slots
     * (to predict the experts the forward will route to); NULL when not needed. */
    moe_status (*begin)(void *ctx, const int32_t *tokens, const int32_t *pos, const int32_t *seq, int n);
    /* Group `group` of MoE layer L (block `layer`) on xs [N, d] (compute dtype, rows grouped
     * by the group's experts: offsets [n + 1] from 0) -> [N, d] in `compute`, each expert's
     * rows through moe_grouped_swiglu with that expert's weights. NULL with an error set. */
    moe_tensor *(*run)(void *ctx, int layer, struct moe_moe_layer *L, int group, moe_tensor *xs,
                       const int64_t *offsets, moe_dtype compute);
} moe_expert_provider;

typedef struct moe_moe_layer {
    moe_moe_layer_settings s;
    moe_router router;
    moe_expert_group *groups;
    int n_groups;
    int *slot;                          /* [n_experts] position of expert e in the group-major order */
    moe_tensor *w13, *w2;               /* homogeneous layers: groups[0]'s stacks (not owned); else NULL */
    moe_tensor *shared_w13, *shared_w2; /* [d, 2 * n_shared * fs], [n_shared * fs, d] or NULL */
    moe_tensor *shared_gate;            /* [d, 1] or NULL */
    int expert_begin, n_local;
    double *latency;                    /* [n_experts] ms per row (start-up, then running average); 0 = unknown */
    char name_w13[96], name_w2[96];     /* "<prefix>.experts.w13" / ".w2": the per-expert checkpoint names */
    char name_sw13[96], name_sw2[96], name_sgate[96];
    const moe_expert_provider *provider; /* NULL: every local expert resident in its stacks */
    int provider_layer;                  /* the block index handed to provider->run */
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

/* Whether a forward of T tokens at inference can run the experts where their weights lie,
 * with nothing read back to the host (moe_gathered_swiglu): T k rows at most, one process,
 * every expert resident in one group, no capacity drops, selection on the device. (The
 * model takes this path on a GPU only; see model.c.) Each (token, slot) pair reads its
 * expert whole, so beyond a few tokens the grouped path, which reads each used expert once,
 * wins: on an H100 with the OLMoE-1B-7B shape the gathered path decoded 1.15x faster at 8
 * pairs (batch 1) and 0.71x at 128 (batch 16); 32 lies between, not measured. */
#define MOE_GATHER_MAX_ROWS 32
bool moe_moe_layer_gathers(const moe_moe_layer *L, int64_t T);
/* x [T, d] -> [T, d] with gates [T, k] and experts [T, k] I32 from moe_router_select_device
 * (only where moe_moe_layer_gathers): equal to moe_moe_layer_apply up to rounding. The
 * experts and the gated combine run in one op (moe_gathered_swiglu), nothing comes from
 * the host. */
moe_tensor *moe_moe_layer_apply_gathered(moe_moe_layer *L, moe_tensor *x, moe_tensor *gates, moe_tensor *experts,
                                         moe_dtype compute);

/* Whether an inference forward can sort its routing by expert on x's device
 * (moe_moe_layer_apply_sorted): one process, every expert resident in one group in id
 * order, no capacity drops, selection on the device; any number of tokens. */
bool moe_moe_layer_sorts(const moe_moe_layer *L);
/* x [T, d] -> [T, d] with gates [T, k] and experts [T, k] I32 from moe_router_select_device
 * (only where moe_moe_layer_sorts): moe_moe_layer_apply's grouped experts, the routing
 * sorted by expert on the device (moe_route_plan) and the tokens dispatched there; only
 * the E + 1 expert offsets come back to the host, for the grouped products' shapes. */
moe_tensor *moe_moe_layer_apply_sorted(moe_moe_layer *L, moe_tensor *x, moe_tensor *gates, moe_tensor *experts,
                                       moe_dtype compute);

/* The pipeline after routing: x [T, d] -> [T, d] with the experts and gates of `routing`
 * (moe_router_forward's, or moe_router_select's at inference); res->routing is a copy. */
moe_tensor *moe_moe_layer_apply(moe_moe_layer *L, moe_tensor *x, const moe_routing *routing, moe_dtype compute,
                                moe_moe_layer_result *res);

/* The expert weights of group `group` for a forward when every local expert is resident:
 * the group's stacks in the compute dtype, w13 [n, d, 2 w_g], w2 [n, w_g, d] (STEP casts,
 * or the stacks themselves when already in `compute`). With a provider installed
 * (moe_moe_layer_set_provider) the group runs through provider->run instead. */
moe_status moe_moe_layer_expert_stacks(moe_moe_layer *L, int group, moe_dtype compute, moe_tensor **w13,
                                       moe_tensor **w2);

/* Installs p (NULL: none) on L as block `layer`; p must outlive its use. */
void moe_moe_layer_set_provider(moe_moe_layer *L, const moe_expert_provider *p, int layer);

/* The grouped SwiGLU of a group's experts: xs [N, d] grouped by expert (offsets [n + 1]
 * from 0) with w13 [n, d, 2 w], w2 [n, w, d] -> [N, d]. */
moe_tensor *moe_grouped_swiglu(moe_tensor *xs, moe_tensor *w13, moe_tensor *w2, const int64_t *offsets);

/* Times each local expert's forward on `tokens` random rows (the fastest of five runs after a
 * warm-up, the one least disturbed by other work on the machine; ms, into
 * latency_ms [n_experts], summed over the expert-parallel group), seeds the running average
 * with latency_ms / tokens and gives the router those latencies (latency-aware balancing). */
moe_status moe_moe_layer_measure_latency(moe_moe_layer *L, int64_t tokens, moe_dtype compute, double *latency_ms);

/* Local expert `expert` (global index) as 2-D views of its stacks: w13 [d, 2 w_e],
 * w2 [w_e, d] (f32 master weights, differentiable step views). */
void moe_moe_layer_expert_weights(moe_moe_layer *L, int expert, moe_tensor **w13, moe_tensor **w2);

/* The SwiGLU of one expert on dense rows, for the dense reference in tests:
 * x [N, d], w13 [d, 2f], w2 [f, d]. */
moe_tensor *moe_swiglu_ffn(moe_tensor *x, moe_tensor *w13, moe_tensor *w2);

/* A stable seed for a named parameter (FNV-1a of the name mixed with the base seed). */
uint64_t moe_param_seed(uint64_t base, const char *name);

#endif
