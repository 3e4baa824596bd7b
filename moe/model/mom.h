/* Mixture-of-Memories token mixer (moe/README.md §2) and, as its one-memory
 * configuration, the gated delta net (`gdn`: no routed memories, the shared one only).
 *
 * Per layer with M routed memories (+1 shared when `shared`), H heads, dk = dv = d / H:
 *   router  g = renorm(TopK(softmax(x W_g))) over the M memories (Switch aux loss, coef aux_coef)
 *   q = l2norm(x W_q) shared; per memory m: k^m = l2norm(x W_k^m), v^m = x W_v^m,
 *   beta^m = sigmoid(x W_b^m), alpha^m = exp(-exp(A_log) * softplus(x W_a^m + dt_bias))
 *   (A_log, dt_bias [H] shared by all memories); each memory runs the gated delta rule
 *   (or gated linear attention) over the tokens routed to it, the shared memory over all;
 *   o = sum_{m in topk} g_m q S^m + q S^shared, per-head RMSNorm(o) * silu(x W_gate), then W_o.
 *
 * Training form: each (sequence, routed memory) bucket holds the tokens routed to it in
 * time order, padded to the longest bucket with steps that change nothing (beta = 0 and
 * alpha = 1; gla: k = 0); one chunked scan runs over the B * M buckets, one over the B
 * sequences for the shared memory, and the routed outputs are added back onto their tokens
 * weighted by the gates (one host read of the routing per layer). Inference form (a state
 * given): the step-by-step scan continuing from per-(sequence, memory) states
 * [B * (M + shared), H, dk, dv] that the caller keeps (moe/infer: the decode state), the
 * same size however many tokens pass; the layer itself holds no state. */
#ifndef MOE_MOE_MOM_H
#define MOE_MOE_MOM_H

#include "core/tensor.h"
#include "moe/model/config.h"
#include "router/router.h"

typedef struct moe_mom_settings {
    int d_model;
    int n_memories; /* routed memories M (0: gated delta net, shared memory only) */
    int top_k;      /* memories per token (<= n_memories) */
    bool shared;    /* the always-on shared memory */
    int n_heads;    /* dk = dv = d_model / n_heads */
    bool delta;     /* gated delta rule; false: gated linear attention */
    int chunk;      /* chunk length of the training form */
    double aux_coef;
    double norm_eps;
    moe_init_mode init; /* projections (router's too) drawn (zero value) or zeros for a loader */
} moe_mom_settings;

#define MOE_MOM_MAX_PARAMS 11

typedef struct moe_mom_layer {
    moe_mom_settings s;
    int n_mem;      /* M + shared: the memories a token's projections cover */
    moe_router router;                  /* over the M routed memories (unused when M = 0) */
    moe_tensor *w_q, *w_k, *w_v;        /* [d, H dk], [d, n_mem H dk], [d, n_mem H dv] */
    moe_tensor *w_b, *w_a;              /* [d, n_mem H] */
    moe_tensor *a_log, *dt_bias;        /* [H] */
    moe_tensor *norm, *w_gate, *w_o;    /* [dv], [d, H dv], [H dv, d] */
    char names[MOE_MOM_MAX_PARAMS][112];
} moe_mom_layer;

typedef struct moe_mom_result {
    moe_tensor *aux_loss; /* scalar, weighted by aux_coef, or NULL (no routed memories / coef 0) */
    int64_t *load;        /* [n_memories] tokens routed to each memory (host, step arena), or NULL */
} moe_mom_result;

/* Parameters are named <prefix>.<what> and drawn from moe_param_seed(seed, name). */
moe_status moe_mom_layer_init(moe_mom_layer *L, const moe_mom_settings *s, const char *prefix, moe_device dev,
                              uint64_t seed, double init_std);
void moe_mom_layer_free(moe_mom_layer *L);

/* x [B, T, d] in the compute dtype -> [B, T, d].
 * state NULL: the training form (chunked scan from zero states, routing with its balance
 * loss). state [B * n_mem, H, dk, dv] (F32; F64 for compute F64): the inference form,
 * continuing the B sequences from these states (routing by selection alone, no loss); the
 * final states go to *state_out (a new STEP tensor, no gradient; state is not changed). */
moe_tensor *moe_mom_layer_forward(moe_mom_layer *L, moe_tensor *x, moe_dtype compute, moe_tensor *state,
                                  moe_tensor **state_out, moe_mom_result *res);

/* Zero recurrent states of `batch` sequences, [batch * n_mem, H, dk, dv] in the state
 * dtype for `compute` (F64 for F64, else F32). */
moe_tensor *moe_mom_state_zeros(const moe_mom_layer *L, int64_t batch, moe_dtype compute, moe_device dev,
                                moe_lifetime life);

/* The trainable tensors and their names (at most MOE_MOM_MAX_PARAMS); returns the count. */
int moe_mom_layer_params(const moe_mom_layer *L, moe_tensor **ts, const char **names, int cap);

/* Settings from the model config keys model.mom_* (gdn: mixer gdn -> 0 routed memories). */
moe_mom_settings moe_mom_settings_from_config(const moe_config *cfg, bool gdn);

#endif
