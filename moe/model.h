/* The MoE transformer language model: token embedding, N pre-norm blocks of causal
 * multi-head attention with RoPE (grouped-query optional; q/k/v biases, q/k RMSNorm over
 * all heads or per head, head width != d/H; or multi-head latent attention) and an MoE
 * (or dense) SwiGLU feed-forward layer, a final RMSNorm and the LM head (tied or not).
 * Parameters are f32 master weights; the forward casts them to the compute dtype (bf16
 * on CUDA), so the grads land on the f32 masters. The same forward serves training,
 * evaluation and generation (with a KV cache). */
#ifndef MOE_MOE_MODEL_H
#define MOE_MOE_MODEL_H

#include "moe/config.h"
#include "moe/moe_layer.h"
#include "moe/mom.h"
#include "router/rmoe.h"

/* A block's own parameters (the index of each one's name in moe_block.names). */
typedef enum moe_block_param {
    MOE_BP_ATTN_NORM, MOE_BP_WQKV, MOE_BP_WO, MOE_BP_FFN_NORM, MOE_BP_FFN_W13, MOE_BP_FFN_W2,
    MOE_BP_BQKV, MOE_BP_Q_NORM, MOE_BP_K_NORM,
    MOE_BP_WQ_A, MOE_BP_Q_A_NORM, MOE_BP_WQ_B, MOE_BP_WKV_A, MOE_BP_KV_A_NORM, MOE_BP_WKV_B,
    MOE_BP_COUNT
} moe_block_param;

typedef struct moe_block {
    moe_cfg_mixer mixer;               /* attention, or mom / gdn (then `mom` replaces wqkv, wo, the KV cache) */
    moe_mom_layer mom;
    moe_tensor *attn_norm, *wqkv, *wo; /* [d], [d, (H + 2 Hkv) hd], [H hd, d] (mla: [H v_head_dim, d]) */
    moe_tensor *bqkv;                  /* [(H + 2 Hkv) hd] (model.qkv_bias) or NULL */
    moe_tensor *q_norm, *k_norm;       /* qk_norm full: [H hd], [Hkv hd]; head: [hd], [hd]; or NULL */
    /* model.attention = mla (wqkv, bqkv NULL): q = (rmsnorm(h wq_a, q_a_norm)) wq_b, or h wq_b
     * without q_lora_rank; [k_lat | k_rope] = h wkv_a; [k_nope | v] = rmsnorm(k_lat, kv_a_norm) wkv_b */
    moe_tensor *wq_a, *q_a_norm, *wq_b;    /* [d, rq], [rq], [rq or d, H (nope + rope)] */
    moe_tensor *wkv_a, *kv_a_norm, *wkv_b; /* [d, rkv + rope], [rkv], [rkv, H (nope + v)] */
    moe_tensor *ffn_norm;              /* [d] */
    bool dense;
    moe_tensor *dense_w13, *dense_w2;  /* dense SwiGLU FFN when `dense` */
    moe_moe_layer moe;
    moe_tensor *k_cache, *v_cache;     /* [B, Tmax, Hkv, hd] for generation (mla: [B, Tmax, H, the
                                        * attention width]), or NULL */
    char names[MOE_BP_COUNT][96];
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
    int n_heads, n_kv_heads, head_dim; /* mla: head_dim = qk_nope_dim + qk_rope_dim */
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

/* Logits of every position, no gradient, no KV cache: tokens [B, T] (host) at positions
 * pos0 .. pos0 + T - 1 into logits [B, T, V] (host f32). route_ids, when not NULL, receives
 * the experts chosen per layer: [n_layers, B * T, top_k] (the router's order; -1 in dense
 * layers). */
moe_status moe_model_logits(moe_model *m, const int32_t *tokens, int B, int T, int64_t pos0, float *logits,
                            int32_t *route_ids);

/* Latency-aware balancing: times every expert's forward and hands the latencies to the
 * routers (done at init when router.balance = latency). */
moe_status moe_model_measure_latency(moe_model *m);

/* Applies the aux-loss-free bias update of every MoE layer from the last loads. */
moe_status moe_model_update_router_bias(moe_model *m, const int64_t *load);

#endif
