/* The MoE transformer language model: token embedding, N pre-norm blocks of causal
 * multi-head attention with RoPE (grouped-query optional; q/k/v biases, q/k RMSNorm over
 * all heads or per head, head width != d/H; or multi-head latent attention) and an MoE
 * (or dense) SwiGLU feed-forward layer, a final RMSNorm and the LM head (tied or not).
 * Parameters are f32 master weights; the training forward casts them to the compute dtype
 * (bf16 on CUDA), so the grads land on the f32 masters. One forward (moe_forward below)
 * serves training and evaluation ([B, T] rows from position 0) and inference (a packed
 * batch of sequence pieces whose caches the caller keeps: moe/infer/decoder.h). The model
 * holds no cache. */
#ifndef MOE_MOE_MODEL_H
#define MOE_MOE_MODEL_H

#include "moe/model/config.h"
#include "moe/model/moe_layer.h"
#include "moe/model/mom.h"
#include "router/rmoe.h"

/* A block's own parameters (the index of each one's name in moe_block.names). */
typedef enum moe_block_param {
    MOE_BP_ATTN_NORM, MOE_BP_WQKV, MOE_BP_WO, MOE_BP_FFN_NORM, MOE_BP_FFN_W13, MOE_BP_FFN_W2,
    MOE_BP_BQKV, MOE_BP_Q_NORM, MOE_BP_K_NORM,
    MOE_BP_WQ_A, MOE_BP_Q_A_NORM, MOE_BP_WQ_B, MOE_BP_WKV_A, MOE_BP_KV_A_NORM, MOE_BP_WKV_B,
    MOE_BP_COUNT
} moe_block_param;

typedef struct moe_block {
    moe_cfg_mixer mixer;               /* attention, or mom / gdn (then `mom` replaces wqkv, wo) */
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
/* The same parameters (names, shapes, order, devices) all zeros, nothing drawn: for a
 * loader that then writes every one (a hub folder, a checkpoint's weights). */
moe_status moe_model_init_for_load(moe_model *m, const moe_config *cfg, int ep_rank, int ep_size);
void moe_model_free(moe_model *m);
/* All parameters, or the active ones per token: the dense parameters plus top_k experts of
 * the mean expert size of each MoE layer (exact for equal widths). */
int64_t moe_model_param_count(const moe_model *m, bool active_only);
/* The trainable tensors (for the optimizer). Caller frees the array. */
moe_tensor **moe_model_param_tensors(const moe_model *m, int *n);

/* Training / evaluation loss on inputs, targets [B, T] (host int32). */
moe_status moe_model_loss(moe_model *m, const int32_t *inputs, const int32_t *targets, int B, int T,
                          moe_loss_parts *out);

/* ---- the forward ----
 * TRAIN: x [B, T, d] holds B sequences at positions 0 .. T-1; routers add their balance
 * losses (and noise, dropout while gradients are on); MoM layers run the chunked form.
 * INFER: B == 1 and the T tokens are n_spans pieces of sequences packed one after another;
 * routers select only (moe_router_select); an attention layer runs once over all spans
 * (rope at each token's position, one variable-length attention in which a span sees only
 * its own sequence's keys: the block-diagonal mask of prepacked prefill, and batched
 * decode), a MoM layer span by span (spans of one length as the rows of one forward),
 * both against the caches through `cache`. */
typedef enum moe_forward_mode { MOE_FORWARD_TRAIN, MOE_FORWARD_INFER } moe_forward_mode;

/* A piece of one sequence in a packed batch: tokens [begin, begin + len) of the batch at
 * positions pos0 .. pos0 + len - 1 of their sequence. */
typedef struct moe_span {
    int64_t begin, len, pos0;
} moe_span;

/* An attention layer's keys and values where the cache keeps them: pools [R, Hc, Dc] and
 * the rows of every position so far of each span's sequence, packed span after span
 * (a paged cache's block tables, flattened): span j's keys are packed rows
 * [k_off[j], k_off[j + 1]), as the segment table says (moe_attention_paged_table). */
typedef struct moe_kv_pages {
    moe_tensor *k_pool, *v_pool; /* [R, Hc, Dc] */
    moe_tensor *rows;            /* I32 [K] on the pools' device */
    moe_tensor *seg;             /* I32 [2, n_spans + 1] on the pools' device: the spans' query
                                  * offsets in the forward, then their k_off */
    int64_t max_k;               /* keys of the longest span's sequence, or (decode steps) a bound */
} moe_kv_pages;

/* Where inference keeps what a sequence carries from forward to forward (implemented by
 * moe/infer; the model stores nothing). `span` indexes the forward's spans. */
typedef struct moe_cache_ops {
    void *ctx;
    /* Attention layer `layer`: where the keys and values of each span's sequence are, the
     * forward's new ones included (out), and the pool rows that the forward's T new tokens
     * take (*write_rows, I32 [T] on the pools' device, distinct; token i of the forward is
     * span j's token i - spans[j].begin): the model stores the new keys and values there
     * (pools [R, Hc, Dc]; Hc, Dc: moe_model_kv_shape) before it reads the pages. */
    moe_status (*kv)(void *ctx, int layer, moe_kv_pages *out, moe_tensor **write_rows);
    /* MoM / GDN layer `layer`: the span's sequence's recurrent state before the span,
     * [n_mem, H, dk, dv] (moe_mom_state_zeros' dtype), or NULL with an error set. */
    moe_tensor *(*state)(void *ctx, int layer, int span);
    /* ... and after it (a STEP tensor, to keep once the whole forward succeeded). */
    moe_status (*set_state)(void *ctx, int layer, int span, moe_tensor *state);
} moe_cache_ops;

/* How an inference forward runs its MoE layers' routed experts. */
typedef enum moe_expert_path {
    MOE_EXPERT_PATH_AUTO,     /* on a device: gathered where it pays (few tokens), else sorted;
                               * on the host: grouped */
    MOE_EXPERT_PATH_GROUPED,  /* the routing read back and planned on the host, grouped GEMMs:
                               * the reference */
    MOE_EXPERT_PATH_GATHERED, /* gathered wherever the layer allows it, on the host too (tests) */
    MOE_EXPERT_PATH_SORTED,   /* the routing sorted by expert where it was made, only the expert
                               * offsets read back, grouped GEMMs; wherever the layer allows it,
                               * on the host too (tests) */
} moe_expert_path;

typedef struct moe_forward {
    moe_forward_mode mode;
    int B, T;                   /* ids [B, T] */
    const moe_span *spans;      /* INFER: [n_spans] tiling [0, T) in order; TRAIN: NULL */
    int n_spans;
    const moe_cache_ops *cache; /* INFER: required; TRAIN: NULL */
    moe_tensor *positions;      /* INFER: I32 [T] on the model's device, each token's position in its
                                 * sequence (rope); TRAIN: NULL (positions 0 .. T - 1 of every row) */
    int32_t *route_ids;         /* NULL or [n_layers, B T, top_k]: the experts chosen per layer and
                                 * token (the router's order; -1 in dense layers) */
    moe_expert_path experts;    /* INFER: how the MoE layers run their experts (see moe_expert_path);
                                 * route_ids come back on every path */
} moe_forward;

/* Whether an INFER forward of T spans of one token each issues no host transfer, so that
 * it can be recorded as a graph (core/graph.h): every mixer attention, every MoE layer on
 * the gathered experts under `path` on the model's device, no routes asked for. */
bool moe_model_decode_recordable(const moe_model *m, int T, moe_expert_path path);

/* The blocks and the final RMSNorm on ids [B, T] (I32 on the model's device) -> hidden
 * states [B T, d] in m->compute. TRAIN balance terms are left out here (moe_model_loss
 * adds them). */
moe_tensor *moe_model_forward(moe_model *m, moe_tensor *ids, const moe_forward *f);
/* The output projection [V, d] in m->compute (the embedding when tied). */
moe_tensor *moe_model_head(moe_model *m);
/* Heads and width of one position's cached keys (= values) in an attention layer:
 * [Hkv, head_dim], or under MLA [H, max(nope + rope, v_head_dim)]. */
void moe_model_kv_shape(const moe_model *m, int64_t *heads, int64_t *width);

/* Where a view's weights go. */
typedef struct moe_view_spec {
    moe_dtype dtype;   /* compute dtype of the view */
    moe_device dev;    /* the view's device: m->dev, or MOE_CUDA for masters on the host */
    bool experts_host; /* on a device view: the routed expert stacks in page-locked host memory
                        * (an expert offload store), not on the device */
} moe_view_spec;

/* A view of m whose parameters are in spec->dtype on spec->dev, cast once (F32 on f32
 * masters on the same device: the same tensors; the router-dtype ones, the RMoE GRU and
 * heads, stay f32 or become f64 for F64). Masters on the host and a CUDA view: each
 * parameter is cast on the host and copied once to the device (nothing else of the masters
 * goes there), as is the routers' selection bias. It shares m's host metadata and must not
 * outlive m; free it with moe_model_cast_view_free, never moe_model_free. */
moe_status moe_model_cast_view_to(const moe_model *m, const moe_view_spec *spec, moe_model *view);
/* The view on m's own device, every expert there. */
moe_status moe_model_cast_view(const moe_model *m, moe_dtype dt, moe_model *view);
void moe_model_cast_view_free(moe_model *view, const moe_model *m);

/* Latency-aware balancing: times every expert's forward and hands the latencies to the
 * routers (the trainer calls it at start-up when router.balance = latency). */
moe_status moe_model_measure_latency(moe_model *m);

/* Applies the aux-loss-free bias update of every MoE layer from the last loads. */
moe_status moe_model_update_router_bias(moe_model *m, const int64_t *load);

#endif
