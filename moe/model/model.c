/* The MoE transformer: parameters, the one forward (training rows or a packed inference
 * batch against caches the caller keeps), the loss, a view with weights cast once. */
#include "moe/model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "core/ops.h"
#include "core/xfer.h"

static moe_status add_param(moe_model *m, moe_tensor *t, const char *name, bool stack, int begin) {
    if (!t) return moe_last_status();
    moe_param_init(t, name);
    m->params[m->n_params++] = (moe_param_ref){t, name, stack, begin};
    return MOE_OK;
}

/* Drawn on the host, in place for a CPU model; for a device, in STEP memory handed back at
 * once (init never holds a second copy of the model), then moved. Zeros in place under
 * MOE_INIT_ZEROS. */
static moe_tensor *randn_param(moe_model *m, moe_init_mode mode, const char *name, int ndim, const int64_t *shape,
                               double std) {
    if (mode == MOE_INIT_ZEROS) return moe_tensor_zeros(MOE_LIFE_PERSIST, m->dev, MOE_F32, ndim, shape);
    uint64_t seed = moe_param_seed((uint64_t)m->cfg.train.seed, name);
    if (m->dev == MOE_CPU) return moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, ndim, shape, seed, 0, std);
    moe_mem_mark mark = moe_mem_step_mark(MOE_CPU);
    moe_tensor *h = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F32, ndim, shape, seed, 0, std);
    moe_tensor *t = h ? moe_tensor_to(h, m->dev, MOE_LIFE_PERSIST) : NULL;
    moe_mem_step_release(MOE_CPU, mark);
    return t;
}

/* Ones (zeros under MOE_INIT_ZEROS). */
static moe_tensor *ones_param(moe_model *m, moe_init_mode mode, int64_t n) {
    if (mode == MOE_INIT_ZEROS) return moe_tensor_zeros(MOE_LIFE_PERSIST, m->dev, MOE_F32, 1, (int64_t[]){n});
    moe_tensor *t = moe_tensor_empty(MOE_LIFE_PERSIST, m->dev, MOE_F32, 1, (int64_t[]){n});
    if (t && moe_tensor_fill(t, 1.0) != MOE_OK) {
        moe_tensor_free(t);
        return NULL;
    }
    return t;
}

static moe_tensor *zeros_param(moe_model *m, int64_t n) {
    return moe_tensor_zeros(MOE_LIFE_PERSIST, m->dev, MOE_F32, 1, (int64_t[]){n});
}

static moe_status add_matrix(moe_model *m, moe_init_mode mode, moe_block *b, moe_tensor **t, moe_block_param which,
                             int64_t rows, int64_t cols, double std) {
    return add_param(m, *t = randn_param(m, mode, b->names[which], 2, (int64_t[]){rows, cols}, std), b->names[which],
                     false, 0);
}

static moe_status add_vector(moe_model *m, moe_init_mode mode, moe_block *b, moe_tensor **t, moe_block_param which,
                             int64_t n, bool ones) {
    return add_param(m, *t = ones ? ones_param(m, mode, n) : zeros_param(m, n), b->names[which], false, 0);
}

/* The init std of a projection back into the residual stream (attention out, dense w2): scaled
 * down with depth. */
static double residual_init_std(const moe_cfg_model *c) { return c->init_std / sqrt(2.0 * c->n_layers); }

/* The attention parameters of block b: mha (+ biases, q/k norms) or mla. */
static moe_status init_attention(moe_model *m, moe_init_mode mode, moe_block *b) {
    const moe_cfg_model *c = &m->cfg.model;
    int64_t d = c->d_model, hd = m->head_dim, H = m->n_heads, Hkv = m->n_kv_heads;
    double std = c->init_std, out_std = residual_init_std(c);
    if (c->attention == MOE_CFG_ATTENTION_MLA) {
        int64_t rq = c->q_lora_rank, rkv = c->kv_lora_rank, rope = c->qk_rope_dim, nope = c->qk_nope_dim;
        int64_t vd = c->v_head_dim;
        if (rq) {
            MOE_TRY(add_matrix(m, mode, b, &b->wq_a, MOE_BP_WQ_A, d, rq, std));
            MOE_TRY(add_vector(m, mode, b, &b->q_a_norm, MOE_BP_Q_A_NORM, rq, true));
        }
        MOE_TRY(add_matrix(m, mode, b, &b->wq_b, MOE_BP_WQ_B, rq ? rq : d, H * hd, std));
        MOE_TRY(add_matrix(m, mode, b, &b->wkv_a, MOE_BP_WKV_A, d, rkv + rope, std));
        MOE_TRY(add_vector(m, mode, b, &b->kv_a_norm, MOE_BP_KV_A_NORM, rkv, true));
        MOE_TRY(add_matrix(m, mode, b, &b->wkv_b, MOE_BP_WKV_B, rkv, H * (nope + vd), std));
        return add_matrix(m, mode, b, &b->wo, MOE_BP_WO, H * vd, d, out_std);
    }
    MOE_TRY(add_matrix(m, mode, b, &b->wqkv, MOE_BP_WQKV, d, (H + 2 * Hkv) * hd, std));
    MOE_TRY(add_matrix(m, mode, b, &b->wo, MOE_BP_WO, H * hd, d, out_std));
    if (c->qkv_bias) MOE_TRY(add_vector(m, mode, b, &b->bqkv, MOE_BP_BQKV, (H + 2 * Hkv) * hd, false));
    if (c->qk_norm != MOE_CFG_QK_NORM_NONE) {
        bool full = c->qk_norm == MOE_CFG_QK_NORM_FULL;
        MOE_TRY(add_vector(m, mode, b, &b->q_norm, MOE_BP_Q_NORM, full ? H * hd : hd, true));
        MOE_TRY(add_vector(m, mode, b, &b->k_norm, MOE_BP_K_NORM, full ? Hkv * hd : hd, true));
    }
    return MOE_OK;
}

/* Appends the n parameters a sub-module (the GRU, a MoM mixer, a router) has named itself. */
static void add_owned_params(moe_model *m, moe_tensor *const *ts, const char *const *names, int n) {
    for (int j = 0; j < n; j++) m->params[m->n_params++] = (moe_param_ref){ts[j], names[j], false, 0};
}

/* A [vocab_size, d_model] matrix: the embedding, or the output head when not tied to it. */
static moe_status add_vocab_matrix(moe_model *m, moe_init_mode mode, moe_tensor **t, const char *name) {
    const moe_cfg_model *c = &m->cfg.model;
    *t = randn_param(m, mode, name, 2, (int64_t[]){c->vocab_size, c->d_model}, c->init_std);
    return add_param(m, *t, name, false, 0);
}

/* m's settings from cfg and its place in the expert-parallel group, whose size must divide the experts. */
static moe_status init_model_fields(moe_model *m, const moe_config *cfg, int ep_rank, int ep_size) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    const moe_cfg_model *c = &cfg->model;
    m->dev = cfg->train.device == MOE_CFG_DEVICE_CUDA ? MOE_CUDA : MOE_CPU;
    m->compute = (cfg->train.dtype == MOE_CFG_DTYPE_BF16) ? MOE_BF16 : MOE_F32;
    m->n_heads = c->n_heads;
    m->n_kv_heads = moe_config_kv_heads(cfg);
    m->head_dim = moe_config_head_dim(cfg);
    m->ep_rank = ep_rank;
    m->ep_size = ep_size;
    if (c->n_experts % ep_size)
        return moe_error(MOE_ERR_CONFIG, "model.n_experts=%d is not divisible by the expert-parallel size %d",
                         c->n_experts, ep_size);
    return MOE_OK;
}

/* The parameter table, sized for the most the layers can add, and the blocks. */
static moe_status alloc_model_tables(moe_model *m) {
    const moe_cfg_model *c = &m->cfg.model;
    /* per layer at most: the block's own (MOE_BP_COUNT) or the MoM's, 3 router, 3 shared, 2 per expert width */
    m->params = calloc((size_t)((MOE_BP_COUNT + 6 + 2 * c->n_experts + MOE_MOM_MAX_PARAMS) * c->n_layers + 4 +
                                MOE_RMOE_GRU_NPARAMS),
                       sizeof *m->params);
    m->blocks = calloc((size_t)c->n_layers, sizeof *m->blocks);
    if (!m->params || !m->blocks) return moe_error(MOE_ERR_OOM, "model: out of host memory");
    return MOE_OK;
}

/* RMoE: one GRU cell shared by every MoE layer. */
static moe_status init_rmoe_gru(moe_model *m, moe_init_mode mode) {
    const moe_config *cfg = &m->cfg;
    MOE_TRY(moe_rmoe_gru_init(&m->gru, cfg->router.rmoe_dim, m->dev, MOE_F32, "router.gru",
                              moe_param_seed((uint64_t)cfg->train.seed, "router.gru"), cfg->model.init_std, mode));
    m->has_gru = true;
    moe_tensor *ts[MOE_RMOE_GRU_NPARAMS];
    const char *names[MOE_RMOE_GRU_NPARAMS];
    int n = moe_rmoe_gru_params(&m->gru, ts, names, MOE_RMOE_GRU_NPARAMS);
    add_owned_params(m, ts, names, n);
    return MOE_OK;
}

/* Names block i's own parameters "layers.<i>.<what>". */
static void name_block_params(moe_block *b, int i) {
    static const char *const what[MOE_BP_COUNT] = {
        [MOE_BP_ATTN_NORM] = "attn_norm", [MOE_BP_WQKV] = "attn.wqkv", [MOE_BP_WO] = "attn.wo",
        [MOE_BP_FFN_NORM] = "ffn_norm", [MOE_BP_FFN_W13] = "ffn.w13", [MOE_BP_FFN_W2] = "ffn.w2",
        [MOE_BP_BQKV] = "attn.bqkv", [MOE_BP_Q_NORM] = "attn.q_norm", [MOE_BP_K_NORM] = "attn.k_norm",
        [MOE_BP_WQ_A] = "attn.wq_a", [MOE_BP_Q_A_NORM] = "attn.q_a_norm", [MOE_BP_WQ_B] = "attn.wq_b",
        [MOE_BP_WKV_A] = "attn.wkv_a", [MOE_BP_KV_A_NORM] = "attn.kv_a_norm", [MOE_BP_WKV_B] = "attn.wkv_b"};
    for (int j = 0; j < MOE_BP_COUNT; j++) snprintf(b->names[j], sizeof b->names[j], "layers.%d.%s", i, what[j]);
}

/* The mom or gdn mixer that replaces attention in block i ("layers.<i>.mom.*"). */
static moe_status init_mom_mixer(moe_model *m, moe_init_mode mode, moe_block *b, int i) {
    char prefix[64];
    snprintf(prefix, sizeof prefix, "layers.%d.mom", i);
    moe_mom_settings ms = moe_mom_settings_from_config(&m->cfg, b->mixer == MOE_CFG_MIXER_GDN);
    ms.init = mode;
    MOE_TRY(moe_mom_layer_init(&b->mom, &ms, prefix, m->dev, (uint64_t)m->cfg.train.seed, m->cfg.model.init_std));
    moe_tensor *ts[MOE_MOM_MAX_PARAMS];
    const char *names[MOE_MOM_MAX_PARAMS];
    int n = moe_mom_layer_params(&b->mom, ts, names, MOE_MOM_MAX_PARAMS);
    add_owned_params(m, ts, names, n);
    return MOE_OK;
}

/* The dense SwiGLU feed-forward of a block that has no MoE layer. */
static moe_status init_dense_ffn(moe_model *m, moe_init_mode mode, moe_block *b) {
    const moe_cfg_model *c = &m->cfg.model;
    int64_t d = c->d_model, fd = moe_config_dense_ffn_dim(&m->cfg);
    MOE_TRY(add_matrix(m, mode, b, &b->dense_w13, MOE_BP_FFN_W13, d, 2 * fd, c->init_std));
    return add_matrix(m, mode, b, &b->dense_w2, MOE_BP_FFN_W2, fd, d, residual_init_std(c));
}

/* The MoE layer's settings from the config; an RMoE router reads the model's shared GRU. */
static moe_moe_layer_settings moe_ffn_settings(moe_model *m, moe_init_mode mode) {
    const moe_config *cfg = &m->cfg;
    const moe_cfg_model *c = &cfg->model;
    return (moe_moe_layer_settings){
        .d_model = c->d_model, .n_experts = c->n_experts, .top_k = c->top_k, .ffn_dim = c->ffn_dim,
        .expert_ffn_dims = c->expert_ffn_dims.count ? c->expert_ffn_dims.values : NULL,
        .n_shared = c->n_shared_experts, .shared_ffn_dim = moe_config_shared_ffn_dim(cfg),
        .shared_gate = c->shared_gate,
        .capacity_factor = cfg->router.capacity_factor,
        .latency_running = cfg->router.balance == MOE_CFG_BALANCE_LATENCY &&
                           cfg->router.latency_source == MOE_CFG_LATENCY_RUNNING,
        .recompute_experts = moe_config_recomputes(cfg, MOE_CFG_RECOMPUTE_EXPERTS),
        .router = {.n_experts = c->n_experts, .top_k = c->top_k, .d_model = c->d_model,
                   .balance = (moe_balance_kind)cfg->router.balance, .aux_coef = cfg->router.aux_coef,
                   .z_coef = cfg->router.z_coef, .renormalize = cfg->router.renormalize,
                   .aux_free_rate = cfg->router.aux_free_rate, .type = (moe_router_type)cfg->router.type,
                   .rmoe_dim = cfg->router.rmoe_dim, .rmoe_detach = cfg->router.rmoe_detach,
                   .gru = m->has_gru ? &m->gru : NULL, .ot_iters = cfg->router.ot_iters,
                   .ot_gamma = cfg->router.ot_gamma,
                   .ot_plan_gates = cfg->router.ot_plan_gates, .noisy_gating = cfg->router.noisy_gating,
                   .sigmoid_scores = cfg->router.score == MOE_CFG_SCORE_SIGMOID,
                   .n_groups = cfg->router.n_groups, .topk_groups = cfg->router.topk_groups,
                   .scale = cfg->router.scale},
        .init = mode,
    };
}

/* Block i's MoE layer holding this rank's experts; its parameters: router, one expert stack per
 * width group, shared experts and their gate. */
static moe_status init_moe_ffn(moe_model *m, moe_init_mode mode, moe_block *b, int i) {
    moe_moe_layer_settings s = moe_ffn_settings(m, mode);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "layers.%d.moe", i);
    int n_local = m->cfg.model.n_experts / m->ep_size;
    MOE_TRY(moe_moe_layer_init(&b->moe, &s, prefix, m->dev, (uint64_t)m->cfg.train.seed, m->cfg.model.init_std,
                               m->ep_rank * n_local, n_local));
    moe_moe_layer *L = &b->moe;
    moe_tensor *rts[4];
    const char *rnames[4];
    int nr = moe_router_params(&L->router, rts, rnames, 4);
    add_owned_params(m, rts, rnames, nr);
    for (int g = 0; g < L->n_groups; g++) {
        const moe_expert_group *G = &L->groups[g];
        const int *ids = L->n_groups > 1 ? G->experts : NULL; /* one group: contiguous */
        m->params[m->n_params++] = (moe_param_ref){G->w13, G->name_w13, true, L->expert_begin, ids, L->name_w13};
        m->params[m->n_params++] = (moe_param_ref){G->w2, G->name_w2, true, L->expert_begin, ids, L->name_w2};
    }
    if (L->shared_w13) {
        m->params[m->n_params++] = (moe_param_ref){L->shared_w13, L->name_sw13, false, 0};
        m->params[m->n_params++] = (moe_param_ref){L->shared_w2, L->name_sw2, false, 0};
    }
    if (L->shared_gate) m->params[m->n_params++] = (moe_param_ref){L->shared_gate, L->name_sgate, false, 0};
    return MOE_OK;
}

/* Block i: attention norm, token mixer, FFN norm, then a dense or an MoE feed-forward. */
static moe_status init_block(moe_model *m, moe_init_mode mode, int i) {
    moe_block *b = &m->blocks[i];
    int64_t d = m->cfg.model.d_model;
    name_block_params(b, i);
    MOE_TRY(add_vector(m, mode, b, &b->attn_norm, MOE_BP_ATTN_NORM, d, true));
    b->mixer = moe_config_layer_mixer(&m->cfg, i);
    MOE_TRY(b->mixer == MOE_CFG_MIXER_ATTENTION ? init_attention(m, mode, b) : init_mom_mixer(m, mode, b, i));
    MOE_TRY(add_vector(m, mode, b, &b->ffn_norm, MOE_BP_FFN_NORM, d, true));
    b->dense = moe_config_layer_is_dense(&m->cfg, i);
    return b->dense ? init_dense_ffn(m, mode, b) : init_moe_ffn(m, mode, b, i);
}

/* The parameters, drawn (MOE_INIT_RANDOM) or zeros for a loader to fill (MOE_INIT_ZEROS). */
static moe_status model_init(moe_model *m, const moe_config *cfg, int ep_rank, int ep_size, moe_init_mode mode) {
    MOE_TRY(init_model_fields(m, cfg, ep_rank, ep_size));
    MOE_TRY(alloc_model_tables(m));
    MOE_TRY(add_vocab_matrix(m, mode, &m->embed, "embed"));
    if (cfg->router.type == MOE_CFG_ROUTER_RMOE) MOE_TRY(init_rmoe_gru(m, mode));
    for (int i = 0; i < cfg->model.n_layers; i++) MOE_TRY(init_block(m, mode, i));
    MOE_TRY(add_param(m, m->final_norm = ones_param(m, mode, cfg->model.d_model), "final_norm", false, 0));
    if (!cfg->model.tie_embeddings) MOE_TRY(add_vocab_matrix(m, mode, &m->lm_head, "lm_head"));
    return MOE_OK;
}

moe_status moe_model_init(moe_model *m, const moe_config *cfg, int ep_rank, int ep_size) {
    return model_init(m, cfg, ep_rank, ep_size, MOE_INIT_RANDOM);
}

moe_status moe_model_init_for_load(moe_model *m, const moe_config *cfg, int ep_rank, int ep_size) {
    return model_init(m, cfg, ep_rank, ep_size, MOE_INIT_ZEROS);
}

moe_status moe_model_measure_latency(moe_model *m) {
    const moe_cfg_model *c = &m->cfg.model;
    double *lat = malloc(sizeof(double) * (size_t)c->n_experts);
    if (!lat) return moe_error(MOE_ERR_OOM, "model: out of host memory");
    int64_t tokens = (int64_t)m->cfg.data.batch_size * c->seq_len * c->top_k / c->n_experts; /* a typical expert batch */
    moe_status s = MOE_OK;
    for (int i = 0; i < c->n_layers && s == MOE_OK; i++)
        if (!m->blocks[i].dense) s = moe_moe_layer_measure_latency(&m->blocks[i].moe, tokens > 0 ? tokens : 1, m->compute, lat);
    free(lat);
    return s;
}

void moe_model_free(moe_model *m) {
    for (int i = 0; m->blocks && i < m->cfg.model.n_layers; i++) {
        moe_block *b = &m->blocks[i];
        moe_tensor *ts[] = {b->attn_norm, b->wqkv, b->wo, b->ffn_norm, b->dense_w13, b->dense_w2, b->bqkv,
                            b->q_norm, b->k_norm, b->wq_a, b->q_a_norm, b->wq_b, b->wkv_a, b->kv_a_norm, b->wkv_b};
        for (size_t j = 0; j < sizeof ts / sizeof *ts; j++) moe_tensor_free(ts[j]);
        if (b->mixer != MOE_CFG_MIXER_ATTENTION) moe_mom_layer_free(&b->mom);
        if (!b->dense) moe_moe_layer_free(&b->moe);
    }
    if (m->has_gru) moe_rmoe_gru_free(&m->gru);
    moe_tensor_free(m->embed);
    moe_tensor_free(m->final_norm);
    moe_tensor_free(m->lm_head);
    free(m->blocks);
    free(m->params);
    memset(m, 0, sizeof *m);
}

int64_t moe_model_param_count(const moe_model *m, bool active_only) {
    const moe_cfg_model *c = &m->cfg.model;
    int64_t dense = 0, per_layer = 0, moe_layers = 0; /* experts: every expert, over all ranks */
    for (int i = 0; i < m->n_params; i++)
        if (!m->params[i].expert_stack) dense += moe_tensor_numel(m->params[i].t);
    for (int e = 0; e < c->n_experts; e++) /* SwiGLU expert: w13 [d, 2w] and w2 [w, d] */
        per_layer += 3 * (int64_t)c->d_model * moe_config_expert_ffn_dim(&m->cfg, e);
    for (int i = 0; i < c->n_layers; i++) moe_layers += !m->blocks[i].dense;
    int64_t experts = per_layer * moe_layers;
    return dense + (active_only ? experts * c->top_k / c->n_experts : experts);
}

moe_tensor **moe_model_param_tensors(const moe_model *m, int *n) {
    moe_tensor **ts = malloc(sizeof *ts * (size_t)m->n_params);
    if (ts)
        for (int i = 0; i < m->n_params; i++) ts[i] = m->params[i].t;
    *n = m->n_params;
    return ts;
}

/* ---- a view with the weights cast once (inference) ---- */

static void push_field(moe_tensor ***out, int *n, int cap, moe_tensor **f) {
    if (*n < cap) out[(*n)++] = f;
}

/* The fields of v that may point at a parameter (aliases such as moe.w13 included) go to
 * out (at most cap); returns the count. */
static int tensor_fields(moe_model *v, moe_tensor ***out, int cap) {
    int n = 0;
    moe_tensor **top[] = {&v->embed, &v->final_norm, &v->lm_head};
    for (size_t j = 0; j < sizeof top / sizeof *top; j++) push_field(out, &n, cap, top[j]);
    for (int j = 0; j < 6 && v->has_gru; j++) {
        push_field(out, &n, cap, &v->gru.w[j]);
        push_field(out, &n, cap, &v->gru.b[j]);
    }
    for (int i = 0; i < v->cfg.model.n_layers; i++) {
        moe_block *b = &v->blocks[i];
        moe_moe_layer *L = &b->moe;
        moe_tensor **own[] = {&b->attn_norm, &b->wqkv, &b->wo, &b->bqkv, &b->q_norm, &b->k_norm, &b->wq_a,
                              &b->q_a_norm, &b->wq_b, &b->wkv_a, &b->kv_a_norm, &b->wkv_b, &b->ffn_norm,
                              &b->dense_w13, &b->dense_w2, &b->mom.w_q, &b->mom.w_k, &b->mom.w_v, &b->mom.w_b,
                              &b->mom.w_a, &b->mom.a_log, &b->mom.dt_bias, &b->mom.norm, &b->mom.w_gate,
                              &b->mom.w_o, &b->mom.router.w_gate, &b->mom.router.w_noise, &L->router.w_gate,
                              &L->router.proj, &L->router.head, &L->router.w_noise, &L->w13, &L->w2,
                              &L->shared_w13, &L->shared_w2, &L->shared_gate};
        for (size_t j = 0; j < sizeof own / sizeof *own; j++) push_field(out, &n, cap, own[j]);
        for (int g = 0; !b->dense && g < L->n_groups; g++) {
            push_field(out, &n, cap, &L->groups[g].w13);
            push_field(out, &n, cap, &L->groups[g].w2);
        }
    }
    return n;
}

/* The dtype parameter t takes in a view of compute dtype dt: the router dtype (f32, f64
 * for f64) for what the routers use after their first projection (the RMoE GRU and heads). */
static moe_dtype view_dtype(const moe_model *m, const moe_tensor *t, moe_dtype dt) {
    bool router_dt = false;
    for (int j = 0; j < 6 && m->has_gru; j++) router_dt = router_dt || t == m->gru.w[j] || t == m->gru.b[j];
    for (int i = 0; i < m->cfg.model.n_layers; i++) router_dt = router_dt || (!m->blocks[i].dense && t == m->blocks[i].moe.router.head);
    return router_dt ? (dt == MOE_F64 ? MOE_F64 : MOE_F32) : dt;
}

/* The view's copies of m's arrays (blocks, params, expert groups), pointing at m's tensors. */
static moe_status view_arrays(const moe_model *m, moe_model *v) {
    int nl = m->cfg.model.n_layers;
    v->blocks = malloc(sizeof *v->blocks * (size_t)nl);
    v->params = malloc(sizeof *v->params * (size_t)m->n_params);
    if (!v->blocks || !v->params) return moe_error(MOE_ERR_OOM, "model view: out of host memory");
    memcpy(v->blocks, m->blocks, sizeof *v->blocks * (size_t)nl);
    memcpy(v->params, m->params, sizeof *v->params * (size_t)m->n_params);
    for (int i = 0; i < nl; i++) v->blocks[i].moe.groups = NULL;
    for (int i = 0; i < nl; i++) {
        moe_moe_layer *L = &v->blocks[i].moe;
        if (v->blocks[i].dense) continue;
        L->groups = malloc(sizeof *L->groups * (size_t)L->n_groups);
        if (!L->groups) return moe_error(MOE_ERR_OOM, "model view: out of host memory");
        memcpy(L->groups, m->blocks[i].moe.groups, sizeof *L->groups * (size_t)L->n_groups);
        if (L->router.s.gru) L->router.s.gru = &v->gru;
    }
    return MOE_OK;
}

/* t on the host as `want` (t itself when it already is; else a PERSIST cast to free). */
static moe_tensor *host_cast(const moe_tensor *t, moe_dtype want) {
    if (t->dtype == want) return (moe_tensor *)t;
    moe_tensor *h = moe_tensor_empty(MOE_LIFE_PERSIST, MOE_CPU, want, t->ndim, t->shape);
    if (h && moe_tensor_copy_(h, t) != MOE_OK) {
        moe_tensor_free(h);
        return NULL;
    }
    return h;
}

/* Parameter t of m as the view wants it: `want` on device `dev` (t itself when nothing
 * changes); pinned: in page-locked host memory for copies to `dev` (an expert stack kept
 * on the host). Host masters for a device view are cast on the host, then copied once. */
static moe_tensor *view_tensor(const moe_tensor *t, moe_dtype want, moe_device dev, bool pinned) {
    if (pinned) {
        moe_tensor *c = moe_xfer_pinned_empty(dev, want, t->ndim, t->shape);
        if (c && moe_tensor_copy_(c, t) != MOE_OK) moe_xfer_pinned_free(dev, c), c = NULL;
        return c;
    }
    if (t->device == dev) {
        if (t->dtype == want) return (moe_tensor *)t;
        moe_tensor *c = moe_tensor_empty(MOE_LIFE_PERSIST, dev, want, t->ndim, t->shape);
        if (c && moe_tensor_copy_(c, t) != MOE_OK) moe_tensor_free(c), c = NULL;
        return c;
    }
    MOE_ASSERT(t->device == MOE_CPU && moe_tensor_is_contiguous(t), "model view: parameter not contiguous on the host");
    moe_tensor *h = host_cast(t, want);
    moe_tensor *c = h ? moe_tensor_from_host(MOE_LIFE_PERSIST, dev, want, t->ndim, t->shape, h->data) : NULL;
    if (h != t) moe_tensor_free(h);
    return c;
}

/* Frees a view's own tensor t (pinned host memory on a device view: an expert stack). */
static void view_tensor_free(const moe_model *v, moe_tensor *t) {
    if (t && t->device == MOE_CPU && v->dev != MOE_CPU) moe_xfer_pinned_free(v->dev, t);
    else moe_tensor_free(t);
}

/* The routers' selection biases (not parameters) on a view of another device. */
static moe_status view_router_biases(const moe_model *m, moe_model *v) {
    for (int i = 0; v->dev != m->dev && i < m->cfg.model.n_layers; i++) {
        moe_tensor **b[2] = {&v->blocks[i].moe.router.bias, &v->blocks[i].mom.router.bias};
        for (int j = 0; j < 2; j++) {
            if (!*b[j] || (j == 0 && v->blocks[i].dense)) continue;
            *b[j] = view_tensor(*b[j], (*b[j])->dtype, v->dev, false);
            if (!*b[j]) return moe_last_status();
        }
    }
    return MOE_OK;
}

/* Points every field of v holding a parameter of m at the view's tensor for it. */
static moe_status view_fields(const moe_model *m, moe_model *v) {
    int cap = m->n_params + 64 + m->cfg.model.n_layers * (40 + 2 * m->cfg.model.n_experts);
    moe_tensor ***fields = malloc(sizeof *fields * (size_t)cap);
    if (!fields) return moe_error(MOE_ERR_OOM, "model view: out of host memory");
    int nf = tensor_fields(v, fields, cap);
    for (int f = 0; f < nf; f++)
        for (int i = 0; *fields[f] && i < m->n_params; i++)
            if (*fields[f] == m->params[i].t) {
                *fields[f] = v->params[i].t;
                break;
            }
    free(fields);
    return MOE_OK;
}

moe_status moe_model_cast_view_to(const moe_model *m, const moe_view_spec *spec, moe_model *v) {
    *v = *m;
    v->blocks = NULL;
    v->params = NULL;
    v->compute = spec->dtype;
    v->dev = spec->dev;
    if (spec->dev != m->dev && m->dev != MOE_CPU)
        return moe_error(MOE_ERR_UNSUPPORTED, "model view: a %s view of a %s model (masters on the host or on the "
                         "view's device)", moe_device_name(spec->dev), moe_device_name(m->dev));
    moe_status s = view_arrays(m, v);
    for (int i = 0; i < m->n_params && s == MOE_OK; i++) {
        const moe_tensor *t = m->params[i].t;
        bool pinned = spec->experts_host && spec->dev != MOE_CPU && m->params[i].expert_stack;
        v->params[i].t = view_tensor(t, view_dtype(m, t, spec->dtype), spec->dev, pinned);
        if (!v->params[i].t) {
            s = moe_last_status();
            v->params[i].t = m->params[i].t;
        }
    }
    if (s == MOE_OK) s = view_fields(m, v);
    if (s == MOE_OK) s = view_router_biases(m, v);
    if (s != MOE_OK) moe_model_cast_view_free(v, m);
    return s;
}

moe_status moe_model_cast_view(const moe_model *m, moe_dtype dt, moe_model *v) {
    moe_view_spec spec = {.dtype = dt, .dev = m->dev};
    return moe_model_cast_view_to(m, &spec, v);
}

void moe_model_cast_view_free(moe_model *v, const moe_model *m) {
    for (int i = 0; v->params && i < m->n_params; i++)
        if (v->params[i].t != m->params[i].t) view_tensor_free(v, v->params[i].t);
    for (int i = 0; v->blocks && i < m->cfg.model.n_layers; i++) {
        if (v->blocks[i].moe.router.bias != m->blocks[i].moe.router.bias) moe_tensor_free(v->blocks[i].moe.router.bias);
        if (v->blocks[i].mom.router.bias != m->blocks[i].mom.router.bias) moe_tensor_free(v->blocks[i].mom.router.bias);
        free(v->blocks[i].moe.groups);
    }
    free(v->blocks);
    free(v->params);
    memset(v, 0, sizeof *v);
}

#define C(t) moe_cast((t), m->compute)

/* The training balance terms, each summed over the layers that have one. */
enum { MOE_AUX_BALANCE, MOE_AUX_Z, MOE_AUX_MEMORY, MOE_AUX_COUNT };

/* Residual-branch dropout while training; each call draws fresh Philox counters. */
static moe_tensor *dropout(moe_model *m, const moe_forward *f, moe_tensor *x) {
    if (!x || m->cfg.model.dropout <= 0 || f->mode != MOE_FORWARD_TRAIN || !moe_grad_enabled()) return x;
    uint64_t counter = m->dropout_counter;
    m->dropout_counter += (uint64_t)moe_tensor_numel(x);
    return moe_dropout(x, m->cfg.model.dropout, (uint64_t)m->cfg.train.seed ^ 0xd1b54a32d192ed03ull, counter);
}

/* q or k [B, T, n, hd] through its RMSNorm: over all n heads (qk_norm full) or per head. */
static moe_tensor *qk_norm(moe_model *m, moe_tensor *x, moe_tensor *w) {
    const moe_cfg_model *c = &m->cfg.model;
    if (!w || !x) return x;
    if (c->qk_norm == MOE_CFG_QK_NORM_HEAD) return moe_rmsnorm(x, C(w), c->norm_eps);
    int64_t shape[4] = {x->shape[0], x->shape[1], x->shape[2], x->shape[3]};
    moe_tensor *flat = moe_reshape(x, 3, (int64_t[]){shape[0], shape[1], shape[2] * shape[3]});
    return moe_reshape(moe_rmsnorm(flat, C(w), c->norm_eps), 4, shape);
}

/* An attention layer's projections of some tokens: mha q [B, T, H, hd], k, v [B, T, Hkv,
 * hd] (q/k norms applied in training; in inference the norms' weights come along, for the
 * one kernel that normalises, rotates and stores: store_mha); mla q [B, T, H, nope + rope],
 * k = [k_nope | v] [B, T, H, nope + v_head_dim] (v NULL) and kpe [B, T, 1, rope], the rope
 * key shared by every head. Rotary embedding (the only part that depends on positions)
 * comes later. */
typedef struct attn_proj {
    moe_tensor *q, *k, *v, *kpe;
    moe_tensor *q_norm, *k_norm; /* mha inference: the norms still to apply, or NULL */
} attn_proj;

/* x [B, T, n, w] rotated at the forward's positions: each token's own (inference) or
 * 0 .. T - 1 (training). */
static moe_tensor *rope(moe_model *m, moe_tensor *x, const moe_forward *f) {
    double th = m->cfg.model.rope_theta;
    return f->mode == MOE_FORWARD_TRAIN ? moe_rope(x, 0, th) : moe_rope_at(x, f->positions, th);
}

static attn_proj mha_project(moe_model *m, moe_block *b, moe_tensor *h, const moe_forward *f) {
    int64_t B = h->shape[0], T = h->shape[1], H = m->n_heads, Hkv = m->n_kv_heads, hd = m->head_dim;
    moe_tensor *lin = moe_matmul(h, C(b->wqkv)); /* [B, T, (H + 2 Hkv) hd] */
    if (b->bqkv) lin = moe_add(lin, C(b->bqkv));
    moe_tensor *qkv = moe_reshape(lin, 4, (int64_t[]){B, T, H + 2 * Hkv, hd});
    moe_tensor *q = moe_slice(qkv, 2, 0, H), *k = moe_slice(qkv, 2, H, H + Hkv), *v = moe_slice(qkv, 2, H + Hkv, H + 2 * Hkv);
    if (f->mode == MOE_FORWARD_TRAIN) return (attn_proj){.q = qk_norm(m, q, b->q_norm), .k = qk_norm(m, k, b->k_norm), .v = v};
    return (attn_proj){.q = q, .k = k, .v = v, .q_norm = b->q_norm, .k_norm = b->k_norm};
}

static attn_proj mla_project(moe_model *m, moe_block *b, moe_tensor *h) {
    const moe_cfg_model *c = &m->cfg.model;
    int64_t B = h->shape[0], T = h->shape[1], H = m->n_heads, rkv = c->kv_lora_rank, rope = c->qk_rope_dim;
    moe_tensor *qin = b->wq_a ? moe_rmsnorm(moe_matmul(h, C(b->wq_a)), C(b->q_a_norm), c->norm_eps) : h;
    moe_tensor *kva = moe_matmul(h, C(b->wkv_a)); /* [B, T, rkv + rope] */
    moe_tensor *lat = moe_rmsnorm(moe_contiguous(moe_slice(kva, 2, 0, rkv)), C(b->kv_a_norm), c->norm_eps);
    return (attn_proj){
        .q = moe_reshape(moe_matmul(qin, C(b->wq_b)), 4, (int64_t[]){B, T, H, c->qk_nope_dim + rope}),
        .k = moe_reshape(moe_matmul(lat, C(b->wkv_b)), 4, (int64_t[]){B, T, H, c->qk_nope_dim + c->v_head_dim}),
        .kpe = moe_reshape(moe_contiguous(moe_slice(kva, 2, rkv, rkv + rope)), 4, (int64_t[]){B, T, 1, rope})};
}

/* x [B, T, n, w] padded with zeros to width D (x itself when w == D). */
static moe_tensor *pad_heads(moe_model *m, moe_tensor *x, int64_t D) {
    if (!x || x->shape[3] == D) return x;
    moe_tensor *z = moe_tensor_zeros(MOE_LIFE_STEP, m->dev, x->dtype, 4,
                                     (int64_t[]){x->shape[0], x->shape[1], x->shape[2], D - x->shape[3]});
    return moe_concat((moe_tensor *[]){x, z}, 2, 3);
}

/* [a | b] along the last axis; a may have width 0. */
static moe_tensor *cat_last(moe_tensor *a, moe_tensor *b) {
    if (!a || !b) return NULL;
    return a->shape[a->ndim - 1] == 0 ? b : moe_concat((moe_tensor *[]){a, b}, 2, a->ndim - 1);
}

/* The q, k, v of projections p at the forward's positions, rope applied; under mla all
 * [B, T, H, D], D = max(nope + rope, v_head_dim): v zero-padded to D (or q, k, with q
 * rescaled so that the softmax scale stays (nope + rope)^-1/2), the rope key shared by
 * every head. */
static attn_proj positioned(moe_model *m, attn_proj p, const moe_forward *f) {
    const moe_cfg_model *c = &m->cfg.model;
    if (c->attention != MOE_CFG_ATTENTION_MLA) return (attn_proj){.q = rope(m, p.q, f), .k = rope(m, p.k, f), .v = p.v};
    int64_t H = m->n_heads, nope = c->qk_nope_dim, Dq = nope + c->qk_rope_dim, vd = c->v_head_dim;
    int64_t D = Dq > vd ? Dq : vd;
    moe_tensor *heads = moe_tensor_zeros(MOE_LIFE_STEP, m->dev, m->compute, 4, (int64_t[]){1, 1, H, 1});
    moe_tensor *kpe = moe_add(rope(m, p.kpe, f), heads); /* [B, T, H, rope] */
    moe_tensor *q = cat_last(moe_slice(p.q, 3, 0, nope), rope(m, moe_slice(p.q, 3, nope, Dq), f));
    if (D > Dq) q = moe_mul_scalar(pad_heads(m, q, D), sqrt((double)D / (double)Dq));
    return (attn_proj){.q = q, .k = pad_heads(m, cat_last(moe_slice(p.k, 3, 0, nope), kpe), D),
                       .v = pad_heads(m, moe_slice(p.k, 3, nope, nope + vd), D)};
}

/* The longest span's tokens. */
static int64_t longest_span(const moe_forward *f) {
    int64_t n = 0;
    for (int j = 0; j < f->n_spans; j++) n = f->spans[j].len > n ? f->spans[j].len : n;
    return n;
}

/* x [1, T, Hc, Dc] into pool [R, Hc, Dc]'s rows; both as matrices of Hc Dc columns, so
 * that x's tokens are read in place when they are a slice of wider rows. */
static moe_status store_rows(moe_tensor *pool, moe_tensor *rows, moe_tensor *x) {
    const int64_t w = x->shape[2] * x->shape[3];
    moe_tensor *src = moe_reshape(x, 2, (int64_t[]){x->shape[1], w});
    moe_tensor *dst = moe_reshape(pool, 2, (int64_t[]){pool->shape[0], w});
    return src && dst ? moe_index_copy_(dst, rows, src) : moe_last_status();
}

/* mha's projections p normalised (when the block has q/k norms) and rotated, k and v stored
 * at the cache's rows: one kernel (moe_rope_append). Returns q [1, T, H, hd]. */
static moe_tensor *store_mha(moe_model *m, attn_proj p, const moe_forward *f, const moe_kv_pages *kv,
                             moe_tensor *rows) {
    const moe_cfg_model *c = &m->cfg.model;
    moe_qk_norm_mode norm = !p.q_norm                          ? MOE_QK_NORM_NONE
                            : c->qk_norm == MOE_CFG_QK_NORM_HEAD ? MOE_QK_NORM_PER_HEAD
                                                                 : MOE_QK_NORM_ALL;
    moe_rope_append_spec spec = {.norm = norm, .q_w = p.q_norm ? C(p.q_norm) : NULL, .k_w = p.k_norm ? C(p.k_norm) : NULL,
                                 .eps = c->norm_eps, .theta = c->rope_theta, .pos = f->positions};
    return moe_rope_append(p.q, p.k, p.v, &spec, kv->k_pool, kv->v_pool, rows);
}

/* Inference: the new tokens' keys and values into the cache; the queries ready, [1, T, H, D]. */
static moe_tensor *store_new_keys(moe_model *m, int layer, attn_proj p, const moe_forward *f, moe_kv_pages *kv) {
    moe_tensor *rows;
    if (f->cache->kv(f->cache->ctx, layer, kv, &rows) != MOE_OK) return NULL;
    if (m->cfg.model.attention != MOE_CFG_ATTENTION_MLA) return store_mha(m, p, f, kv, rows);
    attn_proj x = positioned(m, p, f);
    if (!x.q || !x.k || !x.v) return NULL;
    if (store_rows(kv->k_pool, rows, x.k) != MOE_OK || store_rows(kv->v_pool, rows, x.v) != MOE_OK) return NULL;
    return x.q;
}

/* Attention of projections p [B, T] -> [B, T, H w] (before wo): training, causal over each
 * row; inference, every span's keys and values into the caches and one variable-length
 * attention in which span j's queries see its sequence's cached keys and its own, read
 * where the cache keeps them (moe_attention_paged). */
static moe_tensor *attend(moe_model *m, int layer, attn_proj p, const moe_forward *f) {
    const moe_cfg_model *c = &m->cfg.model;
    moe_tensor *a, *q; /* a [B, T, H, D] */
    if (f->mode == MOE_FORWARD_TRAIN) {
        attn_proj x = positioned(m, p, f);
        if (!(q = x.q) || !x.k || !x.v) return NULL;
        a = moe_attention(x.q, x.k, x.v, true);
    } else {
        moe_kv_pages kv;
        if (!(q = store_new_keys(m, layer, p, f, &kv))) return NULL;
        a = moe_attention_paged_table(q, kv.k_pool, kv.v_pool, kv.rows, kv.seg, longest_span(f), kv.max_k, true);
    }
    int64_t w = c->attention == MOE_CFG_ATTENTION_MLA ? c->v_head_dim : m->head_dim;
    if (a && a->shape[3] != w) a = moe_contiguous(moe_slice(a, 3, 0, w));
    return moe_reshape(a, 3, (int64_t[]){q->shape[0], q->shape[1], m->n_heads * w});
}

/* The MoM / GDN mixer of one piece h [B, T, d]: the training form, or (cache) the piece's
 * sequence continued from its recurrent state. */
static moe_tensor *mom_mix(moe_model *m, moe_block *b, int layer, int span, moe_tensor *h, const moe_cache_ops *cache,
                           moe_tensor **aux) {
    moe_mom_result mr;
    if (!cache) {
        moe_tensor *y = moe_mom_layer_forward(&b->mom, h, m->compute, NULL, NULL, &mr);
        if (mr.aux_loss) aux[MOE_AUX_MEMORY] = aux[MOE_AUX_MEMORY] ? moe_add(aux[MOE_AUX_MEMORY], mr.aux_loss) : mr.aux_loss;
        return y;
    }
    moe_tensor *s0 = cache->state(cache->ctx, layer, span), *s1 = NULL;
    moe_tensor *y = s0 ? moe_mom_layer_forward(&b->mom, h, m->compute, s0, &s1, &mr) : NULL;
    return y && cache->set_state(cache->ctx, layer, span, s1) == MOE_OK ? y : NULL;
}

/* [x_0 | x_1 | ...] along `axis`, n >= 1 pieces (concat takes a bounded number at once);
 * overwrites xs. */
static moe_tensor *concat_pieces(moe_tensor **xs, int n, int axis) {
    while (n > 1) {
        int out = 0;
        for (int i = 0; i < n; i += MOE_NODE_MAX_INPUTS) {
            int cnt = n - i < MOE_NODE_MAX_INPUTS ? n - i : MOE_NODE_MAX_INPUTS;
            xs[out++] = cnt == 1 ? xs[i] : moe_concat(xs + i, cnt, axis);
        }
        n = out;
    }
    return xs[0];
}

/* Inference with every span equally long (a decode step: 1 token each): the spans as the
 * rows of one [n_spans, len, d] MoM forward from their stacked states. */
static moe_tensor *mom_rows(moe_model *m, moe_block *b, int layer, moe_tensor *h, const moe_forward *f) {
    const moe_cache_ops *cache = f->cache;
    int n = f->n_spans;
    int64_t len = f->spans[0].len, P = b->mom.n_mem;
    moe_tensor **st = moe_step_host_alloc(sizeof *st * (size_t)n);
    if (!st) {
        moe_error(MOE_ERR_OOM, "model: out of host memory");
        return NULL;
    }
    for (int j = 0; j < n; j++)
        if (!(st[j] = cache->state(cache->ctx, layer, j))) return NULL;
    moe_tensor *s1 = NULL;
    moe_mom_result mr;
    moe_tensor *x = moe_reshape(h, 3, (int64_t[]){n, len, h->shape[2]});
    moe_tensor *y = moe_mom_layer_forward(&b->mom, x, m->compute, concat_pieces(st, n, 0), &s1, &mr);
    for (int j = 0; y && j < n; j++)
        if (cache->set_state(cache->ctx, layer, j, moe_slice(s1, 0, j * P, (j + 1) * P)) != MOE_OK) return NULL;
    return moe_reshape(y, 3, (int64_t[]){1, n * len, h->shape[2]});
}

static bool spans_equal(const moe_forward *f) {
    for (int j = 1; j < f->n_spans; j++)
        if (f->spans[j].len != f->spans[0].len) return false;
    return true;
}

/* The attention of block b on h [B, T, d] before its output projection: [B, T, heads * v width]. */
static moe_tensor *attention_context(moe_model *m, moe_block *b, int i, moe_tensor *h, const moe_forward *f) {
    attn_proj p = m->cfg.model.attention == MOE_CFG_ATTENTION_MLA ? mla_project(m, b, h) : mha_project(m, b, h, f);
    return attend(m, i, p, f);
}

/* The attention sublayer of block b on h [B, T, d] -> [B, T, d] (before the residual). */
static moe_tensor *attention_sublayer(moe_model *m, moe_block *b, int i, moe_tensor *h, const moe_forward *f) {
    return moe_matmul(attention_context(m, b, i, h, f), C(b->wo));
}

enum { ATTENTION_PARAMS_MAX = 11 };

/* The attention parameters a block has (NULL fields left out) into ps; returns how many. */
static int attention_params(moe_block *b, moe_tensor **ps[ATTENTION_PARAMS_MAX]) {
    moe_tensor **all[] = {&b->wqkv, &b->bqkv, &b->q_norm, &b->k_norm, &b->wq_a, &b->q_a_norm,
                          &b->wq_b, &b->wkv_a, &b->kv_a_norm, &b->wkv_b, &b->wo};
    int n = 0;
    for (size_t j = 0; j < sizeof all / sizeof *all; j++)
        if (*all[j]) ps[n++] = all[j];
    return n;
}

/* The training attention sublayer as a recomputed piece: in = {h, the block's attention
 * parameters in attention_params' order}; it runs on a copy of the block holding them. */
typedef struct attention_piece {
    moe_model *m;
    int layer;
} attention_piece;

static moe_tensor *attention_replay(void *ctx, moe_tensor *const *in) {
    const attention_piece *a = ctx;
    moe_block b = a->m->blocks[a->layer];
    moe_tensor **ps[ATTENTION_PARAMS_MAX];
    int n = attention_params(&b, ps);
    for (int j = 0; j < n; j++) *ps[j] = in[1 + j];
    const moe_forward train = {.mode = MOE_FORWARD_TRAIN};
    return attention_sublayer(a->m, &b, a->layer, in[0], &train);
}

static moe_tensor *attention_recomputed(moe_model *m, int i, moe_tensor *h) {
    moe_tensor **ps[ATTENTION_PARAMS_MAX], *in[MOE_NODE_MAX_INPUTS] = {h};
    int n = attention_params(&m->blocks[i], ps);
    MOE_ASSERT(n + 1 <= MOE_NODE_MAX_INPUTS, "model: %d attention parameters for one recomputed piece", n);
    for (int j = 0; j < n; j++) in[1 + j] = *ps[j];
    attention_piece *a = moe_step_host_alloc(sizeof *a);
    if (!a) return NULL;
    *a = (attention_piece){m, i};
    return moe_recompute(attention_replay, a, n + 1, in);
}

/* Block i's token mixer on h [B, T, d] -> [B, T, d]: attention over the whole batch (its
 * caches and spans handled inside attend; recomputed in the backward when training asks),
 * a MoM layer over the batch (training), as rows of one forward (inference, spans of one
 * length: a decode step) or span by span. */
static moe_tensor *mix(moe_model *m, int i, moe_tensor *h, const moe_forward *f, moe_tensor **aux) {
    moe_block *b = &m->blocks[i];
    if (!h) return NULL;
    if (b->mixer == MOE_CFG_MIXER_ATTENTION) {
        if (f->mode == MOE_FORWARD_TRAIN && moe_config_recomputes(&m->cfg, MOE_CFG_RECOMPUTE_ATTENTION))
            return attention_recomputed(m, i, h);
        return attention_sublayer(m, b, i, h, f);
    }
    if (f->mode == MOE_FORWARD_TRAIN) return mom_mix(m, b, i, 0, h, NULL, aux);
    if (spans_equal(f)) return mom_rows(m, b, i, h, f);
    moe_tensor **parts = moe_step_host_alloc(sizeof *parts * (size_t)f->n_spans);
    if (!parts) {
        moe_error(MOE_ERR_OOM, "model: out of host memory");
        return NULL;
    }
    for (int j = 0; j < f->n_spans; j++) {
        const moe_span *sp = &f->spans[j];
        parts[j] = mom_mix(m, b, i, j, moe_slice(h, 1, sp->begin, sp->begin + sp->len), f->cache, aux);
        if (!parts[j]) return NULL;
    }
    return concat_pieces(parts, f->n_spans, 1);
}

/* Where a forward's routes go when its MoE layers select on the device: every layer's
 * experts into one device tensor t [n_layers, B T, top_k], read back once after the
 * blocks (sunk[i]: layer i wrote its rows there). */
typedef struct route_sink {
    moe_tensor *t;
    bool *sunk;
} route_sink;

/* Whether block b's MoE layer runs an inference forward on the gathered experts: where the
 * layer allows it, by f->experts; AUTO only on a device (on the host, reading the routing
 * back costs nothing and the grouped GEMMs read each expert once); never when the load is
 * counted. */
static bool path_gathers(moe_expert_path path, moe_device dev) {
    return path == MOE_EXPERT_PATH_GATHERED || (path == MOE_EXPERT_PATH_AUTO && dev != MOE_CPU);
}

static bool gather_experts(const moe_block *b, const moe_tensor *h2, const moe_forward *f, const moe_loss_parts *parts) {
    return h2 && !parts && path_gathers(f->experts, h2->device) && moe_moe_layer_gathers(&b->moe, h2->shape[0]);
}

/* Whether block b's MoE layer sorts an inference forward's routing where it was made: where
 * the layer allows it, by f->experts; AUTO only on a device (there the routing would
 * otherwise be read back whole and planned on the host while the device waits); never when
 * the load is counted. */
static bool path_sorts(moe_expert_path path, moe_device dev) {
    return path == MOE_EXPERT_PATH_SORTED || (path == MOE_EXPERT_PATH_AUTO && dev != MOE_CPU);
}

static bool sort_on_device(const moe_block *b, const moe_tensor *h2, const moe_forward *f, const moe_loss_parts *parts) {
    return h2 && !parts && path_sorts(f->experts, h2->device) && moe_moe_layer_sorts(&b->moe);
}

/* Block i's experts on h2 [B T, d] with the selection made on the device, gathered or
 * sorted there; the routes, when asked for, into the sink. */
static moe_tensor *device_feed_forward(moe_model *m, int i, moe_tensor *h2, bool gathered, moe_tensor **router_state,
                                       route_sink *sink) {
    moe_block *b = &m->blocks[i];
    moe_tensor *state = NULL, *gates, *experts;
    moe_status st = moe_router_select_device(&b->moe.router, h2, *router_state, &state, &gates, &experts);
    *router_state = state;
    if (st != MOE_OK) return NULL;
    if (sink && sink->t) {
        moe_tensor *rows = moe_reshape(moe_slice(sink->t, 0, i, i + 1), 2, experts->shape);
        if (!rows || moe_tensor_copy_(rows, experts) != MOE_OK) return NULL;
        sink->sunk[i] = true;
    }
    return gathered ? moe_moe_layer_apply_gathered(&b->moe, h2, gates, experts, m->compute)
                    : moe_moe_layer_apply_sorted(&b->moe, h2, gates, experts, m->compute);
}

bool moe_model_decode_recordable(const moe_model *m, int T, moe_expert_path path) {
    if (!path_gathers(path, m->dev)) return false;
    for (int i = 0; i < m->cfg.model.n_layers; i++) {
        const moe_block *b = &m->blocks[i];
        if (b->mixer != MOE_CFG_MIXER_ATTENTION || (!b->dense && !moe_moe_layer_gathers(&b->moe, T))) return false;
    }
    return true;
}

/* Block i's feed-forward on h2 [B T, d] -> [B T, d]: dense, or the MoE layer routed with
 * its balance terms (training) or by selection alone (inference). *router_state: RMoE's
 * state carried from MoE layer to MoE layer. */
static moe_tensor *feed_forward(moe_model *m, int i, moe_tensor *h2, const moe_forward *f, moe_tensor **router_state,
                                moe_loss_parts *parts, moe_tensor **aux, route_sink *sink) {
    const moe_cfg_model *c = &m->cfg.model;
    moe_block *b = &m->blocks[i];
    int64_t bt = h2 ? h2->shape[0] : 0;
    int32_t *ids = f->route_ids ? f->route_ids + (int64_t)i * bt * c->top_k : NULL;
    if (b->dense) {
        for (int64_t j = 0; ids && j < bt * c->top_k; j++) ids[j] = -1;
        return moe_swiglu_ffn(h2, C(b->dense_w13), C(b->dense_w2));
    }
    moe_moe_layer_result res;
    moe_tensor *ffn;
    if (f->mode == MOE_FORWARD_TRAIN) {
        /* gating noise: a counter range per (step, call, layer), so resume replays it */
        b->moe.router.noise_counter = m->dropout_counter + ((uint64_t)i << 34);
        ffn = moe_moe_layer_forward(&b->moe, h2, *router_state, m->compute, &res);
    } else if (gather_experts(b, h2, f, parts)) { /* a decode step: nothing read back */
        return device_feed_forward(m, i, h2, true, router_state, ids ? sink : NULL);
    } else if (sort_on_device(b, h2, f, parts)) { /* a prefill: the expert offsets read back */
        return device_feed_forward(m, i, h2, false, router_state, ids ? sink : NULL);
    } else {
        moe_routing r;
        moe_tensor *state = NULL, *logits = moe_router_logits(&b->moe.router, h2, *router_state, &state);
        ffn = logits && moe_router_select(&b->moe.router, logits, &r) == MOE_OK
                  ? (r.state = state, moe_moe_layer_apply(&b->moe, h2, &r, m->compute, &res))
                  : NULL;
    }
    if (!ffn) return NULL;
    *router_state = res.routing.state;
    if (ids) memcpy(ids, res.routing.host_experts, sizeof(int32_t) * (size_t)(bt * c->top_k));
    if (!parts) return ffn;
    for (int e = 0; e < c->n_experts; e++) parts->load[i * c->n_experts + e] = res.routing.load[e];
    parts->dropped += res.dropped;
    parts->assignments += res.assignments;
    if (res.routing.aux_loss)
        aux[MOE_AUX_BALANCE] = aux[MOE_AUX_BALANCE] ? moe_add(aux[MOE_AUX_BALANCE], res.routing.aux_loss) : res.routing.aux_loss;
    if (res.routing.z_loss) aux[MOE_AUX_Z] = aux[MOE_AUX_Z] ? moe_add(aux[MOE_AUX_Z], res.routing.z_loss) : res.routing.z_loss;
    return ffn;
}

/* Checks a forward's layout against its mode (misuse: asserts). */
static void check_forward(const moe_forward *f) {
    bool train = f->mode == MOE_FORWARD_TRAIN;
    MOE_ASSERT(train ? !f->spans && !f->cache && !f->positions
                     : f->B == 1 && f->spans && f->n_spans > 0 && f->cache && f->positions &&
                           f->positions->dtype == MOE_I32 && moe_tensor_numel(f->positions) == f->T,
               "model forward: TRAIN takes [B, T] rows without spans, cache or positions; INFER one packed row of "
               "spans with a cache and the tokens' positions");
    for (int j = 0; !train && j < f->n_spans; j++)
        MOE_ASSERT(f->spans[j].len > 0 && f->spans[j].begin == (j ? f->spans[j - 1].begin + f->spans[j - 1].len : 0) &&
                       f->spans[j].begin + f->spans[j].len <= f->T,
                   "model forward: spans must tile the %d tokens in order", f->T);
}

/* Inference keeps each block's and sublayer's result alone (moe_keep_result): the
 * attention's and the experts' intermediates go back to the step arena when the sublayer
 * ends and the block's residual stream when the block ends, so a forward's step memory is
 * one sublayer's, not every layer's. Not for recurrent mixers (their staged states live
 * until the forward commits them) nor for RMoE (its router state passes from layer to
 * layer), and only for forwards of INFER_SCOPED_TOKENS tokens or more: a decode step's
 * intermediates are small, and the result copies would add kernel launches to every step. */
#define INFER_SCOPED_TOKENS 128

typedef struct infer_piece {
    moe_model *m;
    int i;
    const moe_forward *f;
} infer_piece;

static moe_tensor *infer_mix(void *ctx, moe_tensor *const *in) {
    infer_piece *p = ctx;
    return mix(p->m, p->i, in[0], p->f, NULL);
}

static moe_tensor *infer_feed_forward(void *ctx, moe_tensor *const *in) {
    infer_piece *p = ctx;
    moe_tensor *router_state = NULL;
    return feed_forward(p->m, p->i, in[0], p->f, &router_state, NULL, NULL, NULL);
}

static bool infer_scoped_mix(const moe_model *m, int i, const moe_forward *f) {
    return f->mode == MOE_FORWARD_INFER && f->T >= INFER_SCOPED_TOKENS &&
           m->blocks[i].mixer == MOE_CFG_MIXER_ATTENTION;
}

static bool infer_scoped_ffn(const moe_model *m, const moe_forward *f) {
    return f->mode == MOE_FORWARD_INFER && f->T >= INFER_SCOPED_TOKENS &&
           m->cfg.router.type != MOE_CFG_ROUTER_RMOE;
}

/* Block i's mixer and feed-forward sublayers on x [B, T, d]. */
static moe_tensor *block_forward(moe_model *m, int i, moe_tensor *x, const moe_forward *f, moe_tensor **router_state,
                                 moe_loss_parts *parts, moe_tensor **aux, route_sink *sink) {
    const moe_cfg_model *c = &m->cfg.model;
    moe_block *b = &m->blocks[i];
    int64_t d = c->d_model, bt = (int64_t)f->B * f->T;
    infer_piece piece = {m, i, f};
    moe_tensor *hn = moe_rmsnorm(x, C(b->attn_norm), c->norm_eps);
    moe_tensor *mixed = hn && infer_scoped_mix(m, i, f) ? moe_keep_result(infer_mix, &piece, 1, &hn) : mix(m, i, hn, f, aux);
    x = moe_add(x, dropout(m, f, mixed));
    moe_tensor *h2 = moe_reshape(moe_rmsnorm(x, C(b->ffn_norm), c->norm_eps), 2, (int64_t[]){bt, d});
    moe_tensor *ffn = h2 && infer_scoped_ffn(m, f) ? moe_keep_result(infer_feed_forward, &piece, 1, &h2)
                                                   : feed_forward(m, i, h2, f, router_state, parts, aux, sink);
    return moe_add(x, dropout(m, f, moe_reshape(ffn, 3, (int64_t[]){f->B, f->T, d})));
}

/* Whether an inference forward runs its blocks on the fused residual stream below: every
 * forward too short for the scoped pieces (decode steps, short prompts). */
static bool infer_fused(const moe_forward *f) { return f->mode == MOE_FORWARD_INFER && f->T < INFER_SCOPED_TOKENS; }

/* Block i of an inference forward on the residual stream x [B, T, d] with *pending, the
 * previous block's feed-forward output not yet added into x (NULL for the first block):
 * each residual add runs fused with the norm that reads its sum (moe_add_rmsnorm; after an
 * attention mixer also with its output projection: moe_matmul_add_rmsnorm), and this
 * block's own feed-forward output is left in *pending for the next block's (or the final)
 * norm. Returns the new x. The same values as block_forward, bit for bit on the host. */
static moe_tensor *infer_block_fused(moe_model *m, int i, moe_tensor *x, moe_tensor **pending, const moe_forward *f,
                                     moe_tensor **router_state, route_sink *sink) {
    const moe_cfg_model *c = &m->cfg.model;
    moe_block *b = &m->blocks[i];
    int64_t d = c->d_model, bt = (int64_t)f->B * f->T;
    moe_tensor *hn = *pending ? moe_add_rmsnorm(x, *pending, C(b->attn_norm), c->norm_eps, &x)
                              : moe_rmsnorm(x, C(b->attn_norm), c->norm_eps);
    moe_tensor *h2;
    if (b->mixer == MOE_CFG_MIXER_ATTENTION) { /* the output projection runs with the add and the norm */
        moe_tensor *ctx = hn ? attention_context(m, b, i, hn, f) : NULL;
        h2 = ctx ? moe_matmul_add_rmsnorm(x, ctx, C(b->wo), C(b->ffn_norm), c->norm_eps, &x) : NULL;
    } else {
        moe_tensor *mixed = hn ? mix(m, i, hn, f, NULL) : NULL;
        h2 = mixed ? moe_add_rmsnorm(x, mixed, C(b->ffn_norm), c->norm_eps, &x) : NULL;
    }
    moe_tensor *ffn = feed_forward(m, i, moe_reshape(h2, 2, (int64_t[]){bt, d}), f, router_state, NULL, NULL, sink);
    *pending = moe_reshape(ffn, 3, (int64_t[]){f->B, f->T, d});
    return *pending ? x : NULL;
}

static moe_tensor *infer_block(void *ctx, moe_tensor *const *in) {
    infer_piece *p = ctx;
    moe_tensor *router_state = NULL;
    return block_forward(p->m, p->i, in[0], p->f, &router_state, NULL, NULL, NULL);
}

/* A route sink for an inference forward that asks for its routes and whose layers may select
 * on the device, gathered or sorted (else none: the host plan writes the routes directly). */
static moe_status open_route_sink(const moe_model *m, const moe_forward *f, route_sink *sink) {
    const moe_cfg_model *c = &m->cfg.model;
    int64_t bt = (int64_t)f->B * f->T;
    if (f->mode != MOE_FORWARD_INFER || !f->route_ids ||
        !(path_gathers(f->experts, m->dev) || path_sorts(f->experts, m->dev)))
        return MOE_OK;
    sink->t = moe_tensor_empty(MOE_LIFE_STEP, m->dev, MOE_I32, 3, (int64_t[]){c->n_layers, bt, c->top_k});
    sink->sunk = moe_step_host_alloc(sizeof(bool) * (size_t)c->n_layers);
    if (!sink->t || !sink->sunk) return sink->t ? moe_error(MOE_ERR_OOM, "model: out of host memory") : moe_last_status();
    memset(sink->sunk, 0, sizeof(bool) * (size_t)c->n_layers);
    return MOE_OK;
}

/* The sunk layers' routes into f->route_ids: one read back for the whole forward. */
static moe_status close_route_sink(const moe_model *m, const moe_forward *f, const route_sink *sink) {
    const moe_cfg_model *c = &m->cfg.model;
    bool any = false;
    for (int i = 0; sink->t && i < c->n_layers; i++) any = any || sink->sunk[i];
    if (!any) return MOE_OK;
    moe_tensor *host = moe_tensor_to(sink->t, MOE_CPU, MOE_LIFE_STEP);
    if (!host) return moe_last_status();
    size_t per_layer = (size_t)f->B * (size_t)f->T * (size_t)c->top_k;
    for (int i = 0; i < c->n_layers; i++)
        if (sink->sunk[i])
            memcpy(f->route_ids + i * per_layer, (const int32_t *)host->data + i * per_layer, sizeof(int32_t) * per_layer);
    return MOE_OK;
}

/* Embedding, blocks and final norm: ids [B, T] -> [B T, d]; fills parts and aux (TRAIN). */
static moe_tensor *forward_hidden(moe_model *m, moe_tensor *ids, const moe_forward *f, moe_loss_parts *parts,
                                  moe_tensor **aux) {
    const moe_cfg_model *c = &m->cfg.model;
    check_forward(f);
    int64_t d = c->d_model, bt = (int64_t)f->B * f->T;
    route_sink sink = {NULL, NULL};
    if (open_route_sink(m, f, &sink) != MOE_OK) return NULL;
    moe_tensor *x = moe_embedding(C(m->embed), ids), *router_state = NULL, *pending = NULL;
    for (int i = 0; i < c->n_layers && x; i++) {
        infer_piece piece = {m, i, f};
        if (infer_fused(f)) x = infer_block_fused(m, i, x, &pending, f, &router_state, &sink);
        else if (infer_scoped_mix(m, i, f) && infer_scoped_ffn(m, f)) x = moe_keep_result(infer_block, &piece, 1, &x);
        else x = block_forward(m, i, x, f, &router_state, parts, aux, &sink);
    }
    if (x && close_route_sink(m, f, &sink) != MOE_OK) return NULL;
    moe_tensor *rows = moe_reshape(x, 2, (int64_t[]){bt, d});
    if (!pending) return moe_rmsnorm(rows, C(m->final_norm), c->norm_eps);
    moe_tensor *sum = NULL;
    return moe_add_rmsnorm(rows, moe_reshape(pending, 2, (int64_t[]){bt, d}), C(m->final_norm), c->norm_eps, &sum);
}

moe_tensor *moe_model_forward(moe_model *m, moe_tensor *ids, const moe_forward *f) {
    moe_tensor *aux[MOE_AUX_COUNT] = {NULL};
    return forward_hidden(m, ids, f, NULL, aux);
}

moe_tensor *moe_model_head(moe_model *m) { return C(m->lm_head ? m->lm_head : m->embed); }

void moe_model_kv_shape(const moe_model *m, int64_t *heads, int64_t *width) {
    const moe_cfg_model *c = &m->cfg.model;
    *heads = m->n_kv_heads;
    *width = m->head_dim;
    if (c->attention == MOE_CFG_ATTENTION_MLA) { /* every head's k, v at the attention width */
        *heads = m->n_heads;
        *width = m->head_dim > c->v_head_dim ? m->head_dim : c->v_head_dim;
    }
}

moe_status moe_model_loss(moe_model *m, const int32_t *inputs, const int32_t *targets, int B, int T,
                          moe_loss_parts *out) {
    const moe_cfg_model *c = &m->cfg.model;
    memset(out, 0, sizeof *out);
    out->load = moe_step_host_alloc(sizeof(int64_t) * (size_t)(c->n_layers * c->n_experts));
    if (!out->load) return moe_error(MOE_ERR_OOM, "model: out of host memory");
    memset(out->load, 0, sizeof(int64_t) * (size_t)(c->n_layers * c->n_experts));
    int64_t bt = (int64_t)B * T;
    moe_tensor *ids = moe_tensor_from_host(MOE_LIFE_STEP, m->dev, MOE_I32, 2, (int64_t[]){B, T}, inputs);
    /* targets stay on the host: cross_entropy counts them there, then uploads them */
    moe_tensor *tg = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, (int64_t[]){bt}, targets);
    if (!ids || !tg) return moe_last_status();
    moe_tensor *aux[MOE_AUX_COUNT] = {NULL};
    m->dropout_counter += (uint64_t)1 << 40; /* each forward (micro-batch) its own noise and dropout range */
    moe_forward f = {.mode = MOE_FORWARD_TRAIN, .B = B, .T = T};
    moe_tensor *ce = moe_cross_entropy(forward_hidden(m, ids, &f, out, aux), moe_model_head(m), tg);
    if (!ce) return moe_last_status();
    moe_dtype ldt = m->compute == MOE_F64 ? MOE_F64 : MOE_F32; /* F64: the gradient-check reference */
    moe_tensor *loss = moe_cast(ce, ldt);
    int n_moe = 0, n_mom = 0;
    for (int i = 0; i < c->n_layers; i++) {
        n_moe += !m->blocks[i].dense;
        n_mom += m->blocks[i].mixer == MOE_CFG_MIXER_MOM;
    }
    const int counts[MOE_AUX_COUNT] = {[MOE_AUX_BALANCE] = n_moe, [MOE_AUX_Z] = n_moe, [MOE_AUX_MEMORY] = n_mom};
    for (int j = 0; j < MOE_AUX_COUNT; j++) { /* each term averaged over the layers that have it */
        if (!aux[j]) continue;
        moe_tensor *avg = moe_mul_scalar(moe_cast(aux[j], ldt), 1.0 / (counts[j] > 0 ? counts[j] : 1));
        loss = moe_add(loss, avg);
        double v = avg ? moe_tensor_item(avg) : NAN;
        if (j == MOE_AUX_Z) out->z = v;
        else out->aux += v;
    }
    if (!loss) return moe_last_status();
    out->ce = moe_tensor_item(ce);
    out->loss = loss;
    return MOE_OK;
}

moe_status moe_model_update_router_bias(moe_model *m, const int64_t *load) {
    const moe_cfg_model *c = &m->cfg.model;
    for (int i = 0; i < c->n_layers; i++)
        if (!m->blocks[i].dense) MOE_TRY(moe_router_update_bias(&m->blocks[i].moe.router, load + i * c->n_experts));
    return MOE_OK;
}
