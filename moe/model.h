/* The MoE transformer language model: token embedding, N pre-norm blocks of causal
 * multi-head attention with RoPE (grouped-query optional) and an MoE (or dense) SwiGLU
 * feed-forward layer, a final RMSNorm and the LM head (tied to the embedding or not).
 * Parameters are f32 master weights; the forward casts them to the compute dtype (bf16
 * on CUDA), so the grads land on the f32 masters. The same forward serves training,
 * evaluation and generation (with a KV cache). */
#ifndef MOE_MOE_MODEL_H
#define MOE_MOE_MODEL_H

#include "moe/config.h"
#include "moe/moe_layer.h"
#include "moe/mom.h"
#include "router/rmoe.h"

typedef struct moe_block {
    moe_cfg_mixer mixer;               /* attention, or mom / gdn (then `mom` replaces wqkv, wo, the KV cache) */
    moe_mom_layer mom;
    moe_tensor *attn_norm, *wqkv, *wo; /* [d], [d, (H + 2 Hkv) hd], [H hd, d] */
    moe_tensor *ffn_norm;              /* [d] */
    bool dense;
    moe_tensor *dense_w13, *dense_w2;  /* dense SwiGLU FFN when `dense` */
    moe_moe_layer moe;
    moe_tensor *k_cache, *v_cache;     /* [B, Tmax, Hkv, hd] for generation, or NULL */
    char names[6][96];
} moe_block;

/* A parameter and where it lives; experts are stacked per layer and width (moe_layer.h).
 * A stack's slice j is global expert expert_ids[j] (expert_ids NULL: expert_begin + j);
 * the checkpoint stores one dataset per expert named from expert_name ("<a>.<b>" ->
 * "<a>.<E>.<b>"; NULL: from name), e.g. "layers.0.moe.experts.3.w13", whatever the stack. */
typedef struct moe_param_ref {
    moe_tensor *t;
    const char *name;
    bool expert_stack;
    int expert_begin;
    const int *expert_ids;   /* [t->shape[0]] or NULL (contiguous from expert_begin) */
    const char *expert_name; /* per-expert dataset name base, or NULL (name) */
} moe_param_ref;

typedef struct moe_model {
    moe_config cfg;
    moe_device dev;
    moe_dtype compute;
    int n_heads, n_kv_heads, head_dim;
    moe_tensor *embed, *final_norm, *lm_head;
    moe_block *blocks;
    moe_rmoe_gru gru;     /* router.type rmoe: the GRU cell shared by all MoE layers */
    bool has_gru;
    moe_param_ref *params;
    int n_params;
    int ep_rank, ep_size; /* expert-parallel position: this rank holds experts [ep_rank * E/ep_size, ...) */
    int64_t cache_len;    /* tokens in the KV cache */
    int cache_batch, cache_cap;
    uint64_t dropout_counter; /* Philox counter of the next dropout mask (set from the step when training) */
} moe_model;

typedef struct moe_loss_parts {
    moe_tensor *loss;     /* ce + aux + z, the scalar to differentiate */
    double ce, aux, z;    /* host values after the forward */
    int64_t *load;        /* [n_layers * n_experts] assignment counts (host) */
    int64_t dropped, assignments;
} moe_loss_parts;

/* model.expert_ffn_dims (heterogeneous experts) needs ep_size 1 (MOE_ERR_UNSUPPORTED
 * otherwise): the expert-parallel exchange and checkpoint gather assume equal widths. */
moe_status moe_model_init(moe_model *m, const moe_config *cfg, int ep_rank, int ep_size);
void moe_model_free(moe_model *m);
/* All parameters, or the active ones per token: the dense parameters plus top_k experts of
 * the mean expert size of each MoE layer (exact for equal widths). */
int64_t moe_model_param_count(const moe_model *m, bool active_only);
/* The trainable tensors (for the optimizer). Caller frees the array. */
moe_tensor **moe_model_param_tensors(const moe_model *m, int *n);

/* Training / evaluation loss on inputs, targets [B, T] (host int32). */
moe_status moe_model_loss(moe_model *m, const int32_t *inputs, const int32_t *targets, int B, int T,
                          moe_loss_parts *out);

/* Generation: feeds tokens [B, T] at the cache position and returns the logits of the
 * last position per row into logits [B, V] (host f32). moe_model_cache_reset starts over. */
moe_status moe_model_cache_reset(moe_model *m, int batch, int capacity);
moe_status moe_model_step_logits(moe_model *m, const int32_t *tokens, int B, int T, float *logits);

/* Latency-aware balancing: times every expert's forward and hands the latencies to the
 * routers (done at init when router.balance = latency). */
moe_status moe_model_measure_latency(moe_model *m);

/* Applies the aux-loss-free bias update of every MoE layer from the last loads. */
moe_status moe_model_update_router_bias(moe_model *m, const int64_t *load);

#endif
