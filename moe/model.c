/* The MoE transformer: parameters, forward loss, cached generation step. */
#include "moe/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "core/ops.h"

static moe_status add_param(moe_model *m, moe_tensor *t, const char *name, bool stack, int begin) {
    if (!t) return moe_last_status();
    moe_param_init(t, name);
    m->params[m->n_params++] = (moe_param_ref){t, name, stack, begin};
    return MOE_OK;
}

/* Drawn on the host (STEP, handed back at once: init never holds a second copy of the
 * model in the arena), then moved to the device. */
static moe_tensor *randn_param(moe_model *m, const char *name, int ndim, const int64_t *shape, double std) {
    moe_mem_mark mark = moe_mem_step_mark(MOE_CPU);
    moe_tensor *h = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F32, ndim, shape,
                                     moe_param_seed((uint64_t)m->cfg.train.seed, name), 0, std);
    moe_tensor *t = h ? moe_tensor_to(h, m->dev, MOE_LIFE_PERSIST) : NULL;
    moe_mem_step_release(MOE_CPU, mark);
    return t;
}

static moe_tensor *ones_param(moe_model *m, int64_t n) {
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

static moe_status add_matrix(moe_model *m, moe_block *b, moe_tensor **t, moe_block_param which, int64_t rows,
                             int64_t cols, double std) {
    return add_param(m, *t = randn_param(m, b->names[which], 2, (int64_t[]){rows, cols}, std), b->names[which],
                     false, 0);
}

static moe_status add_vector(moe_model *m, moe_block *b, moe_tensor **t, moe_block_param which, int64_t n,
                             bool ones) {
    return add_param(m, *t = ones ? ones_param(m, n) : zeros_param(m, n), b->names[which], false, 0);
}

/* The attention parameters of block b: mha (+ biases, q/k norms) or mla. */
static moe_status init_attention(moe_model *m, moe_block *b) {
    const moe_cfg_model *c = &m->cfg.model;
    int64_t d = c->d_model, hd = m->head_dim, H = m->n_heads, Hkv = m->n_kv_heads;
    double std = c->init_std, out_std = c->init_std / sqrt(2.0 * c->n_layers);
    if (c->attention == MOE_CFG_ATTENTION_MLA) {
        int64_t rq = c->q_lora_rank, rkv = c->kv_lora_rank, rope = c->qk_rope_dim, nope = c->qk_nope_dim;
        int64_t vd = c->v_head_dim;
        if (rq) {
            MOE_TRY(add_matrix(m, b, &b->wq_a, MOE_BP_WQ_A, d, rq, std));
            MOE_TRY(add_vector(m, b, &b->q_a_norm, MOE_BP_Q_A_NORM, rq, true));
        }
        MOE_TRY(add_matrix(m, b, &b->wq_b, MOE_BP_WQ_B, rq ? rq : d, H * hd, std));
        MOE_TRY(add_matrix(m, b, &b->wkv_a, MOE_BP_WKV_A, d, rkv + rope, std));
        MOE_TRY(add_vector(m, b, &b->kv_a_norm, MOE_BP_KV_A_NORM, rkv, true));
        MOE_TRY(add_matrix(m, b, &b->wkv_b, MOE_BP_WKV_B, rkv, H * (nope + vd), std));
        return add_matrix(m, b, &b->wo, MOE_BP_WO, H * vd, d, out_std);
    }
    MOE_TRY(add_matrix(m, b, &b->wqkv, MOE_BP_WQKV, d, (H + 2 * Hkv) * hd, std));
    MOE_TRY(add_matrix(m, b, &b->wo, MOE_BP_WO, H * hd, d, out_std));
    if (c->qkv_bias) MOE_TRY(add_vector(m, b, &b->bqkv, MOE_BP_BQKV, (H + 2 * Hkv) * hd, false));
    if (c->qk_norm != MOE_CFG_QK_NORM_NONE) {
        bool full = c->qk_norm == MOE_CFG_QK_NORM_FULL;
        MOE_TRY(add_vector(m, b, &b->q_norm, MOE_BP_Q_NORM, full ? H * hd : hd, true));
        MOE_TRY(add_vector(m, b, &b->k_norm, MOE_BP_K_NORM, full ? Hkv * hd : hd, true));
    }
    return MOE_OK;
}

moe_status moe_model_init(moe_model *m, const moe_config *cfg, int ep_rank, int ep_size) {
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
    int64_t d = c->d_model, V = c->vocab_size;
    double std = c->init_std, out_std = c->init_std / sqrt(2.0 * c->n_layers);
    /* per layer at most: the block's own (MOE_BP_COUNT) or the MoM's, 3 router, 3 shared, 2 per expert width */
    m->params = calloc((size_t)((MOE_BP_COUNT + 6 + 2 * c->n_experts + MOE_MOM_MAX_PARAMS) * c->n_layers + 4 +
                                MOE_RMOE_GRU_NPARAMS),
                       sizeof *m->params);
    m->blocks = calloc((size_t)c->n_layers, sizeof *m->blocks);
    if (!m->params || !m->blocks) return moe_error(MOE_ERR_OOM, "model: out of host memory");
    MOE_TRY(add_param(m, m->embed = randn_param(m, "embed", 2, (int64_t[]){V, d}, std), "embed", false, 0));
    int n_local = c->n_experts / ep_size;
    if (cfg->router.type == MOE_CFG_ROUTER_RMOE) { /* RMoE: one GRU cell shared by every MoE layer */
        MOE_TRY(moe_rmoe_gru_init(&m->gru, cfg->router.rmoe_dim, m->dev, MOE_F32, "router.gru",
                                  moe_param_seed((uint64_t)cfg->train.seed, "router.gru"), std));
        m->has_gru = true;
        moe_tensor *gts[MOE_RMOE_GRU_NPARAMS];
        const char *gnames[MOE_RMOE_GRU_NPARAMS];
        int ng = moe_rmoe_gru_params(&m->gru, gts, gnames, MOE_RMOE_GRU_NPARAMS);
        for (int j = 0; j < ng; j++) m->params[m->n_params++] = (moe_param_ref){gts[j], gnames[j], false, 0};
    }
    for (int i = 0; i < c->n_layers; i++) {
        moe_block *b = &m->blocks[i];
        static const char *const what[MOE_BP_COUNT] = {
            [MOE_BP_ATTN_NORM] = "attn_norm", [MOE_BP_WQKV] = "attn.wqkv", [MOE_BP_WO] = "attn.wo",
            [MOE_BP_FFN_NORM] = "ffn_norm", [MOE_BP_FFN_W13] = "ffn.w13", [MOE_BP_FFN_W2] = "ffn.w2",
            [MOE_BP_BQKV] = "attn.bqkv", [MOE_BP_Q_NORM] = "attn.q_norm", [MOE_BP_K_NORM] = "attn.k_norm",
            [MOE_BP_WQ_A] = "attn.wq_a", [MOE_BP_Q_A_NORM] = "attn.q_a_norm", [MOE_BP_WQ_B] = "attn.wq_b",
            [MOE_BP_WKV_A] = "attn.wkv_a", [MOE_BP_KV_A_NORM] = "attn.kv_a_norm", [MOE_BP_WKV_B] = "attn.wkv_b"};
        char (*nm)[96] = b->names;
        for (int j = 0; j < MOE_BP_COUNT; j++) snprintf(nm[j], 96, "layers.%d.%s", i, what[j]);
        MOE_TRY(add_vector(m, b, &b->attn_norm, MOE_BP_ATTN_NORM, d, true));
        b->mixer = moe_config_layer_mixer(cfg, i);
        if (b->mixer == MOE_CFG_MIXER_ATTENTION) {
            MOE_TRY(init_attention(m, b));
        } else {
            char mp[64];
            snprintf(mp, sizeof mp, "layers.%d.mom", i);
            moe_mom_settings ms = moe_mom_settings_from_config(cfg, b->mixer == MOE_CFG_MIXER_GDN);
            MOE_TRY(moe_mom_layer_init(&b->mom, &ms, mp, m->dev, (uint64_t)cfg->train.seed, std));
            moe_tensor *ts[MOE_MOM_MAX_PARAMS];
            const char *pn[MOE_MOM_MAX_PARAMS];
            int np = moe_mom_layer_params(&b->mom, ts, pn, MOE_MOM_MAX_PARAMS);
            for (int j = 0; j < np; j++) m->params[m->n_params++] = (moe_param_ref){ts[j], pn[j], false, 0};
        }
        MOE_TRY(add_vector(m, b, &b->ffn_norm, MOE_BP_FFN_NORM, d, true));
        b->dense = moe_config_layer_is_dense(cfg, i);
        if (b->dense) {
            int64_t fd = moe_config_dense_ffn_dim(cfg);
            MOE_TRY(add_matrix(m, b, &b->dense_w13, MOE_BP_FFN_W13, d, 2 * fd, std));
            MOE_TRY(add_matrix(m, b, &b->dense_w2, MOE_BP_FFN_W2, fd, d, out_std));
            continue;
        }
        moe_moe_layer_settings s = {
            .d_model = c->d_model, .n_experts = c->n_experts, .top_k = c->top_k, .ffn_dim = c->ffn_dim,
            .expert_ffn_dims = c->expert_ffn_dims.count ? c->expert_ffn_dims.values : NULL,
            .n_shared = c->n_shared_experts, .shared_ffn_dim = moe_config_shared_ffn_dim(cfg),
            .shared_gate = c->shared_gate,
            .capacity_factor = cfg->router.capacity_factor,
            .latency_running = cfg->router.balance == MOE_CFG_BALANCE_LATENCY &&
                               cfg->router.latency_source == MOE_CFG_LATENCY_RUNNING,
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
        };
        char prefix[64];
        snprintf(prefix, sizeof prefix, "layers.%d.moe", i);
        MOE_TRY(moe_moe_layer_init(&b->moe, &s, prefix, m->dev, (uint64_t)cfg->train.seed, std, ep_rank * n_local, n_local));
        moe_moe_layer *L = &b->moe;
        moe_tensor *rts[4];
        const char *rnames[4];
        int nr = moe_router_params(&L->router, rts, rnames, 4);
        for (int j = 0; j < nr; j++) m->params[m->n_params++] = (moe_param_ref){rts[j], rnames[j], false, 0};
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
    }
    if (cfg->router.balance == MOE_CFG_BALANCE_LATENCY) MOE_TRY(moe_model_measure_latency(m));
    MOE_TRY(add_param(m, m->final_norm = ones_param(m, d), "final_norm", false, 0));
    if (!c->tie_embeddings)
        MOE_TRY(add_param(m, m->lm_head = randn_param(m, "lm_head", 2, (int64_t[]){V, d}, std), "lm_head", false, 0));
    return MOE_OK;
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
        moe_tensor *ts[] = {b->attn_norm, b->wqkv, b->wo, b->ffn_norm, b->dense_w13, b->dense_w2, b->k_cache,
                            b->v_cache, b->bqkv, b->q_norm, b->k_norm, b->wq_a, b->q_a_norm, b->wq_b, b->wkv_a,
                            b->kv_a_norm, b->wkv_b};
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

#define C(t) moe_cast((t), m->compute)

/* Residual-branch dropout while training; each call draws fresh Philox counters. */
static moe_tensor *dropout(moe_model *m, moe_tensor *x) {
    if (!x || m->cfg.model.dropout <= 0 || !moe_grad_enabled()) return x;
    uint64_t counter = m->dropout_counter;
    m->dropout_counter += (uint64_t)moe_tensor_numel(x);
    return moe_dropout(x, m->cfg.model.dropout, (uint64_t)m->cfg.train.seed ^ 0xd1b54a32d192ed03ull, counter);
}

/* q or k [B, T, n, hd] through its RMSNorm: over all n heads (qk_norm full) or per head. */
static moe_tensor *qk_norm(moe_model *m, moe_tensor *x, moe_tensor *w) {
    const moe_cfg_model *c = &m->cfg.model;
    if (!w || !x) return x;
    x = moe_contiguous(x);
    if (c->qk_norm == MOE_CFG_QK_NORM_HEAD) return moe_rmsnorm(x, C(w), c->norm_eps);
    int64_t shape[4] = {x->shape[0], x->shape[1], x->shape[2], x->shape[3]};
    moe_tensor *flat = moe_reshape(x, 3, (int64_t[]){shape[0], shape[1], shape[2] * shape[3]});
    return moe_reshape(moe_rmsnorm(flat, C(w), c->norm_eps), 4, shape);
}

/* q [B, T, H, hd] and *k, *v [B, T, Hkv, hd] of multi-head attention, rope applied. */
static moe_tensor *mha_qkv(moe_model *m, moe_block *b, moe_tensor *h, int B, int T, int64_t pos0, moe_tensor **k,
                           moe_tensor **v) {
    const moe_cfg_model *c = &m->cfg.model;
    int64_t H = m->n_heads, Hkv = m->n_kv_heads, hd = m->head_dim;
    moe_tensor *lin = moe_matmul(h, C(b->wqkv)); /* [B, T, (H + 2 Hkv) hd] */
    if (b->bqkv) lin = moe_add(lin, C(b->bqkv));
    moe_tensor *qkv = moe_reshape(lin, 4, (int64_t[]){B, T, H + 2 * Hkv, hd});
    moe_tensor *q = moe_rope(qk_norm(m, moe_slice(qkv, 2, 0, H), b->q_norm), pos0, c->rope_theta);
    *k = moe_rope(qk_norm(m, moe_slice(qkv, 2, H, H + Hkv), b->k_norm), pos0, c->rope_theta);
    *v = moe_slice(qkv, 2, H + Hkv, H + 2 * Hkv);
    return q;
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

/* Multi-head latent attention's q, *k, *v [B, T, H, D], D = max(nope + rope, v_head_dim):
 * v zero-padded to D (or q, k, with q rescaled so the softmax scale stays (nope + rope)^-1/2);
 * the rope key is computed once and shared by every head. */
static moe_tensor *mla_qkv(moe_model *m, moe_block *b, moe_tensor *h, int B, int T, int64_t pos0, moe_tensor **k,
                           moe_tensor **v) {
    const moe_cfg_model *c = &m->cfg.model;
    int64_t H = m->n_heads, nope = c->qk_nope_dim, rope = c->qk_rope_dim, vd = c->v_head_dim, rkv = c->kv_lora_rank;
    int64_t Dq = nope + rope, D = Dq > vd ? Dq : vd;
    moe_tensor *qin = b->wq_a ? moe_rmsnorm(moe_matmul(h, C(b->wq_a)), C(b->q_a_norm), c->norm_eps) : h;
    moe_tensor *q = moe_reshape(moe_matmul(qin, C(b->wq_b)), 4, (int64_t[]){B, T, H, Dq});
    moe_tensor *kva = moe_matmul(h, C(b->wkv_a)); /* [B, T, rkv + rope] */
    moe_tensor *lat = moe_rmsnorm(moe_contiguous(moe_slice(kva, 2, 0, rkv)), C(b->kv_a_norm), c->norm_eps);
    moe_tensor *kv = moe_reshape(moe_matmul(lat, C(b->wkv_b)), 4, (int64_t[]){B, T, H, nope + vd});
    moe_tensor *kpe = moe_reshape(moe_contiguous(moe_slice(kva, 2, rkv, rkv + rope)), 4, (int64_t[]){B, T, 1, rope});
    moe_tensor *heads = moe_tensor_zeros(MOE_LIFE_STEP, m->dev, m->compute, 4, (int64_t[]){1, 1, H, 1});
    kpe = moe_add(moe_rope(kpe, pos0, c->rope_theta), heads); /* [B, T, H, rope] */
    q = cat_last(moe_slice(q, 3, 0, nope), moe_rope(moe_slice(q, 3, nope, Dq), pos0, c->rope_theta));
    *k = pad_heads(m, cat_last(moe_slice(kv, 3, 0, nope), kpe), D);
    *v = pad_heads(m, moe_slice(kv, 3, nope, nope + vd), D);
    if (D > Dq) q = moe_mul_scalar(pad_heads(m, q, D), sqrt((double)D / (double)Dq));
    return q;
}

/* The attention sublayer on h [B, T, d] -> [B, T, d]; `cached`: append k, v to the KV cache
 * at pos0 and attend over everything cached so far. */
static moe_tensor *attention_forward(moe_model *m, moe_block *b, moe_tensor *h, int B, int T, int64_t pos0,
                                     bool cached) {
    const moe_cfg_model *c = &m->cfg.model;
    bool mla = c->attention == MOE_CFG_ATTENTION_MLA;
    moe_tensor *k = NULL, *v = NULL;
    moe_tensor *q = mla ? mla_qkv(m, b, h, B, T, pos0, &k, &v) : mha_qkv(m, b, h, B, T, pos0, &k, &v);
    if (!q || !k || !v) return NULL;
    if (cached) {
        moe_tensor *kd = moe_slice(moe_slice(b->k_cache, 1, pos0, pos0 + T), 0, 0, B);
        moe_tensor *vd = moe_slice(moe_slice(b->v_cache, 1, pos0, pos0 + T), 0, 0, B);
        if (!kd || !vd || moe_tensor_copy_(kd, k) != MOE_OK || moe_tensor_copy_(vd, v) != MOE_OK) return NULL;
        k = moe_slice(moe_slice(b->k_cache, 1, 0, pos0 + T), 0, 0, B);
        v = moe_slice(moe_slice(b->v_cache, 1, 0, pos0 + T), 0, 0, B);
    }
    moe_tensor *a = moe_attention(q, k, v, true); /* [B, T, H, D] */
    int64_t w = mla ? c->v_head_dim : m->head_dim;
    if (a && a->shape[3] != w) a = moe_contiguous(moe_slice(a, 3, 0, w));
    return moe_matmul(moe_reshape(a, 3, (int64_t[]){B, T, m->n_heads * w}), C(b->wo));
}

/* Runs the blocks on x [B, T, d] starting at position pos0; fills per-layer results.
 * cached: generation (KV cache, recurrent MoM state); route_ids: see moe_model_logits. */
static moe_tensor *run_blocks(moe_model *m, moe_tensor *x, int B, int T, int64_t pos0, bool cached,
                              moe_loss_parts *parts, moe_tensor **aux_sum, int32_t *route_ids) {
    const moe_cfg_model *c = &m->cfg.model;
    int64_t d = c->d_model, bt = (int64_t)B * T;
    moe_tensor *router_state = NULL; /* RMoE: carried from MoE layer to MoE layer, per token */
    for (int i = 0; i < c->n_layers && x; i++) {
        moe_block *b = &m->blocks[i];
        moe_tensor *h = moe_rmsnorm(x, C(b->attn_norm), c->norm_eps);
        moe_tensor *mixed;
        if (b->mixer != MOE_CFG_MIXER_ATTENTION) {
            moe_mom_result mr;
            mixed = moe_mom_layer_forward(&b->mom, h, m->compute, cached, &mr);
            if (mr.aux_loss && aux_sum) aux_sum[2] = aux_sum[2] ? moe_add(aux_sum[2], mr.aux_loss) : mr.aux_loss;
        } else {
            mixed = attention_forward(m, b, h, B, T, pos0, cached);
        }
        x = moe_add(x, dropout(m, mixed));
        moe_tensor *h2 = moe_reshape(moe_rmsnorm(x, C(b->ffn_norm), c->norm_eps), 2, (int64_t[]){bt, d});
        moe_tensor *ffn;
        int32_t *ids = route_ids ? route_ids + (int64_t)i * bt * c->top_k : NULL;
        if (b->dense) {
            ffn = moe_swiglu_ffn(h2, C(b->dense_w13), C(b->dense_w2));
            for (int64_t j = 0; ids && j < bt * c->top_k; j++) ids[j] = -1;
        } else {
            moe_moe_layer_result res;
            /* gating noise: a counter range per (step, call, layer), so resume replays it */
            b->moe.router.noise_counter = m->dropout_counter + ((uint64_t)i << 34);
            ffn = moe_moe_layer_forward(&b->moe, h2, router_state, m->compute, &res);
            router_state = ffn ? res.routing.state : NULL;
            if (ffn && ids) memcpy(ids, res.routing.host_experts, sizeof(int32_t) * (size_t)(bt * c->top_k));
            if (ffn && parts) {
                for (int e = 0; e < c->n_experts; e++) parts->load[i * c->n_experts + e] = res.routing.load[e];
                parts->dropped += res.dropped;
                parts->assignments += res.assignments;
                moe_tensor *extra[2] = {res.routing.aux_loss, res.routing.z_loss};
                for (int j = 0; j < 2; j++) {
                    if (!extra[j]) continue;
                    aux_sum[j] = aux_sum[j] ? moe_add(aux_sum[j], extra[j]) : extra[j];
                }
            }
        }
        x = moe_add(x, dropout(m, moe_reshape(ffn, 3, (int64_t[]){B, T, d})));
    }
    return x;
}

static moe_tensor *lm_head(moe_model *m) { return C(m->lm_head ? m->lm_head : m->embed); }

moe_status moe_model_loss(moe_model *m, const int32_t *inputs, const int32_t *targets, int B, int T,
                          moe_loss_parts *out) {
    const moe_cfg_model *c = &m->cfg.model;
    memset(out, 0, sizeof *out);
    out->load = moe_step_host_alloc(sizeof(int64_t) * (size_t)(c->n_layers * c->n_experts));
    if (!out->load) return moe_error(MOE_ERR_OOM, "model: out of host memory");
    int64_t bt = (int64_t)B * T;
    moe_tensor *ids = moe_tensor_from_host(MOE_LIFE_STEP, m->dev, MOE_I32, 2, (int64_t[]){B, T}, inputs);
    /* targets stay on the host: cross_entropy counts them there, then uploads them */
    moe_tensor *tg = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, (int64_t[]){bt}, targets);
    if (!ids || !tg) return moe_last_status();
    moe_tensor *aux[3] = {NULL, NULL, NULL}; /* MoE balance, router z, MoM memory balance */
    m->dropout_counter += (uint64_t)1 << 40; /* each forward (micro-batch) its own noise and dropout range */
    moe_tensor *x = run_blocks(m, moe_embedding(C(m->embed), ids), B, T, 0, false, out, aux, NULL);
    moe_tensor *hf = moe_reshape(moe_rmsnorm(x, C(m->final_norm), c->norm_eps), 2, (int64_t[]){bt, c->d_model});
    moe_tensor *ce = moe_cross_entropy(hf, lm_head(m), tg);
    if (!ce) return moe_last_status();
    moe_dtype ldt = m->compute == MOE_F64 ? MOE_F64 : MOE_F32; /* F64: the gradient-check reference */
    moe_tensor *loss = moe_cast(ce, ldt);
    int n_moe = 0, n_mom = 0;
    for (int i = 0; i < c->n_layers; i++) {
        n_moe += !m->blocks[i].dense;
        n_mom += m->blocks[i].mixer == MOE_CFG_MIXER_MOM;
    }
    int counts[3] = {n_moe, n_moe, n_mom};
    for (int j = 0; j < 3; j++) { /* each term averaged over the layers that have it */
        if (!aux[j]) continue;
        moe_tensor *avg = moe_mul_scalar(moe_cast(aux[j], ldt), 1.0 / (counts[j] > 0 ? counts[j] : 1));
        loss = moe_add(loss, avg);
        double v = avg ? moe_tensor_item(avg) : NAN;
        if (j == 1) out->z = v;
        else out->aux += v;
    }
    if (!loss) return moe_last_status();
    out->ce = moe_tensor_item(ce);
    out->loss = loss;
    return MOE_OK;
}

moe_status moe_model_cache_reset(moe_model *m, int batch, int capacity) {
    const moe_cfg_model *c = &m->cfg.model;
    for (int i = 0; i < c->n_layers; i++) {
        moe_block *b = &m->blocks[i];
        if (b->mixer != MOE_CFG_MIXER_ATTENTION) {
            MOE_TRY(moe_mom_cache_reset(&b->mom, batch));
            continue;
        }
        if (!b->k_cache || m->cache_batch < batch || m->cache_cap < capacity) {
            moe_tensor_free(b->k_cache);
            moe_tensor_free(b->v_cache);
            int64_t shape[4] = {batch, capacity, m->n_kv_heads, m->head_dim};
            if (c->attention == MOE_CFG_ATTENTION_MLA) { /* every head's k, v at the attention width */
                shape[2] = m->n_heads;
                shape[3] = m->head_dim > c->v_head_dim ? m->head_dim : c->v_head_dim;
            }
            b->k_cache = moe_tensor_empty(MOE_LIFE_PERSIST, m->dev, m->compute, 4, shape);
            b->v_cache = moe_tensor_empty(MOE_LIFE_PERSIST, m->dev, m->compute, 4, shape);
            if (!b->k_cache || !b->v_cache) return moe_last_status();
        }
    }
    if (m->cache_batch < batch || m->cache_cap < capacity) {
        m->cache_batch = batch;
        m->cache_cap = capacity;
    }
    m->cache_len = 0;
    return MOE_OK;
}

moe_status moe_model_step_logits(moe_model *m, const int32_t *tokens, int B, int T, float *logits) {
    const moe_cfg_model *c = &m->cfg.model;
    if (m->cache_cap == 0 || B > m->cache_batch || m->cache_len + T > m->cache_cap)
        return moe_error(MOE_ERR_INVALID, "generation: the KV cache holds %d x %d tokens; asked for %d more at %lld",
                         m->cache_batch, m->cache_cap, T, (long long)m->cache_len);
    bool was = moe_grad_set_enabled(false);
    moe_tensor *ids = moe_tensor_from_host(MOE_LIFE_STEP, m->dev, MOE_I32, 2, (int64_t[]){B, T}, tokens);
    moe_tensor *x = ids ? run_blocks(m, moe_embedding(C(m->embed), ids), B, T, m->cache_len, true, NULL, NULL, NULL) : NULL;
    moe_tensor *last = moe_reshape(moe_slice(x, 1, T - 1, T), 2, (int64_t[]){B, c->d_model});
    moe_tensor *hf = moe_rmsnorm(last, C(m->final_norm), c->norm_eps);
    moe_tensor *lg = moe_cast(moe_matmul(hf, moe_transpose(lm_head(m), 0, 1)), MOE_F32);
    moe_tensor *host = lg ? moe_tensor_to(lg, MOE_CPU, MOE_LIFE_STEP) : NULL;
    moe_grad_set_enabled(was);
    if (!host) return moe_last_status();
    memcpy(logits, host->data, sizeof(float) * (size_t)B * (size_t)c->vocab_size);
    m->cache_len += T;
    return MOE_OK;
}

moe_status moe_model_logits(moe_model *m, const int32_t *tokens, int B, int T, int64_t pos0, float *logits,
                            int32_t *route_ids) {
    const moe_cfg_model *c = &m->cfg.model;
    int64_t bt = (int64_t)B * T;
    bool was = moe_grad_set_enabled(false);
    moe_tensor *ids = moe_tensor_from_host(MOE_LIFE_STEP, m->dev, MOE_I32, 2, (int64_t[]){B, T}, tokens);
    moe_tensor *x = ids ? run_blocks(m, moe_embedding(C(m->embed), ids), B, T, pos0, false, NULL, NULL, route_ids)
                        : NULL;
    moe_tensor *hf = moe_rmsnorm(moe_reshape(x, 2, (int64_t[]){bt, c->d_model}), C(m->final_norm), c->norm_eps);
    moe_tensor *lg = moe_cast(moe_matmul(hf, moe_transpose(lm_head(m), 0, 1)), MOE_F32); /* [B T, V] */
    moe_tensor *host = lg ? moe_tensor_to(lg, MOE_CPU, MOE_LIFE_STEP) : NULL;
    moe_grad_set_enabled(was);
    if (!host) return moe_last_status();
    memcpy(logits, host->data, sizeof(float) * (size_t)bt * (size_t)c->vocab_size);
    return MOE_OK;
}

moe_status moe_model_update_router_bias(moe_model *m, const int64_t *load) {
    const moe_cfg_model *c = &m->cfg.model;
    for (int i = 0; i < c->n_layers; i++)
        if (!m->blocks[i].dense) MOE_TRY(moe_router_update_bias(&m->blocks[i].moe.router, load + i * c->n_experts));
    return MOE_OK;
}
