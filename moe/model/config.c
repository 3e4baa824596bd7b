/* The `moe` config schema (one table: types, ranges, defaults, help) and the
 * cross-field checks and resolved-value helpers built on it. */
#include "moe/model/config.h"

#include <limits.h>
#include <stddef.h>
#include <string.h>

/* Enum fields are written through int*: every config enum must be int-sized. */
_Static_assert(sizeof(moe_cfg_mixer) == sizeof(int) && sizeof(moe_cfg_mom_update) == sizeof(int) &&
                   sizeof(moe_cfg_router_type) == sizeof(int) && sizeof(moe_cfg_balance) == sizeof(int) &&
                   sizeof(moe_cfg_latency_source) == sizeof(int) &&
                   sizeof(moe_cfg_tokenizer) == sizeof(int) && sizeof(moe_cfg_device) == sizeof(int) &&
                   sizeof(moe_cfg_dtype) == sizeof(int) && sizeof(moe_cfg_optimizer) == sizeof(int) &&
                   sizeof(moe_cfg_schedule) == sizeof(int) && sizeof(moe_cfg_qk_norm) == sizeof(int) &&
                   sizeof(moe_cfg_attention) == sizeof(int) && sizeof(moe_cfg_router_score) == sizeof(int),
               "config enums must be int-sized");

static const char *const mixer_names[] = {
    [MOE_CFG_MIXER_ATTENTION] = "attention", [MOE_CFG_MIXER_MOM] = "mom",
    [MOE_CFG_MIXER_GDN] = "gdn", NULL};
static const char *const mom_update_names[] = {
    [MOE_CFG_MOM_DELTA] = "delta", [MOE_CFG_MOM_GLA] = "gla", NULL};
static const char *const qk_norm_names[] = {
    [MOE_CFG_QK_NORM_NONE] = "none", [MOE_CFG_QK_NORM_FULL] = "full", [MOE_CFG_QK_NORM_HEAD] = "head", NULL};
static const char *const attention_names[] = {
    [MOE_CFG_ATTENTION_MHA] = "mha", [MOE_CFG_ATTENTION_MLA] = "mla", NULL};
static const char *const score_names[] = {
    [MOE_CFG_SCORE_SOFTMAX] = "softmax", [MOE_CFG_SCORE_SIGMOID] = "sigmoid", NULL};
static const char *const router_names[] = {
    [MOE_CFG_ROUTER_TOPK] = "topk", [MOE_CFG_ROUTER_RMOE] = "rmoe", [MOE_CFG_ROUTER_OT] = "ot", NULL};
static const char *const balance_names[] = {
    [MOE_CFG_BALANCE_SWITCH] = "switch", [MOE_CFG_BALANCE_LATENCY] = "latency",
    [MOE_CFG_BALANCE_AUX_FREE] = "aux_free", [MOE_CFG_BALANCE_NONE] = "none", NULL};
static const char *const latency_source_names[] = {
    [MOE_CFG_LATENCY_STARTUP] = "startup", [MOE_CFG_LATENCY_RUNNING] = "running", NULL};
static const char *const tokenizer_names[] = {
    [MOE_CFG_TOKENIZER_BYTE] = "byte", [MOE_CFG_TOKENIZER_BPE] = "bpe", [MOE_CFG_TOKENIZER_HF] = "hf", NULL};
static const char *const device_names[] = {
    [MOE_CFG_DEVICE_CPU] = "cpu", [MOE_CFG_DEVICE_CUDA] = "cuda", NULL};
static const char *const dtype_names[] = {
    [MOE_CFG_DTYPE_F32] = "f32", [MOE_CFG_DTYPE_BF16] = "bf16", NULL};
static const char *const optimizer_names[] = {
    [MOE_CFG_OPTIMIZER_ADAMW] = "adamw", [MOE_CFG_OPTIMIZER_SGD] = "sgd", NULL};
static const char *const schedule_names[] = {
    [MOE_CFG_SCHEDULE_COSINE] = "cosine", [MOE_CFG_SCHEDULE_CONSTANT] = "constant", NULL};
static const char *const recompute_names[] = {
    [MOE_CFG_RECOMPUTE_EXPERTS] = "experts", [MOE_CFG_RECOMPUTE_ATTENTION] = "attention", NULL};

/* The path is the field's own designator ("model.d_model"); the _Generic makes a
 * field of the wrong C type a compile error. */
#define FIELD(f, T) (offsetof(moe_config, f) + 0 * sizeof(char[_Generic(((moe_config *)0)->f, T: 1)]))
#define INT(f, lo, hi, def, help) {#f, MOE_YAML_INT, FIELD(f, int), lo, hi, NULL, def, help}
#define FLT(f, lo, hi, def, help) {#f, MOE_YAML_FLOAT, FIELD(f, double), lo, hi, NULL, def, help}
#define BOOL(f, def, help) {#f, MOE_YAML_BOOL, FIELD(f, bool), 0, 0, NULL, def, help}
#define STR(f, def, help) {#f, MOE_YAML_STRING, FIELD(f, char *), 0, 0, NULL, def, help}
#define ENUM(f, names, def, help) {#f, MOE_YAML_ENUM, offsetof(moe_config, f), 0, 0, names, def, help}
#define LIST(f, type, lo, hi, names, def, help) \
    {#f, type, FIELD(f, moe_yaml_list), lo, hi, names, def, help}

#define BIG 1000000000 /* "practically unbounded" for counts of steps */
#define WIDTH_MAX 262144

static const moe_yaml_key config_keys[] = {
    /* model */
    INT(model.vocab_size, 1, 1 << 20, "256", "vocabulary size (256 for the byte tokenizer)"),
    INT(model.d_model, 1, 65536, "128", "model width d"),
    INT(model.n_layers, 1, MOE_YAML_LIST_MAX, "4", "number of transformer blocks L"),
    INT(model.n_heads, 1, 1024, "4", "attention heads (must divide d_model)"),
    INT(model.n_kv_heads, 0, 1024, "0", "key/value heads for grouped-query attention; 0 = n_heads"),
    INT(model.seq_len, 1, 1 << 20, "128", "training context length in tokens"),
    INT(model.ffn_dim, 1, WIDTH_MAX, "256", "expert hidden width f (SwiGLU)"),
    INT(model.n_experts, 1, 1024, "8", "routed experts per MoE layer E"),
    INT(model.top_k, 1, 64, "2", "experts per token k (<= n_experts)"),
    LIST(model.expert_ffn_dims, MOE_YAML_INT_LIST, 1, WIDTH_MAX, NULL, "[]",
         "per-expert hidden widths (heterogeneous experts); [] = all ffn_dim, else n_experts entries"),
    INT(model.n_shared_experts, 0, 64, "0", "always-on shared experts per MoE layer"),
    INT(model.shared_ffn_dim, 0, WIDTH_MAX, "0", "shared expert hidden width; 0 = ffn_dim"),
    INT(model.dense_layers, 0, MOE_YAML_LIST_MAX, "0",
        "the first k layers use a dense SwiGLU FFN instead of MoE"),
    INT(model.dense_ffn_dim, 0, 1 << 20, "0", "dense FFN hidden width; 0 = ffn_dim*top_k"),
    LIST(model.dense_layer_ids, MOE_YAML_INT_LIST, 0, MOE_YAML_LIST_MAX - 1, NULL, "[]",
         "further layers (by index) that use the dense FFN"),
    INT(model.moe_layer_step, 1, MOE_YAML_LIST_MAX, "1",
        "layer i is MoE only when (i + 1) % moe_layer_step == 0 (others dense)"),
    BOOL(model.shared_gate, "false", "scale the shared experts' output by sigmoid(x w), w [d, 1]"),
    INT(model.head_dim, 0, 4096, "0", "attention head width; 0 = d_model / n_heads"),
    BOOL(model.qkv_bias, "false", "biases on the q, k and v projections"),
    ENUM(model.qk_norm, qk_norm_names, "none",
         "RMSNorm of q and k before RoPE: over all heads (full) or per head (head)"),
    ENUM(model.attention, attention_names, "mha",
         "attention: multi-head/grouped-query, or multi-head latent attention (mla, the mla_* widths)"),
    INT(model.q_lora_rank, 0, 65536, "0", "mla: rank of the q projection; 0 = full rank"),
    INT(model.kv_lora_rank, 0, 65536, "0", "mla: rank of the joint k/v projection"),
    INT(model.qk_nope_dim, 0, 4096, "0", "mla: per-head q/k width without RoPE"),
    INT(model.qk_rope_dim, 0, 4096, "0", "mla: per-head RoPE width (one rope key shared by the heads)"),
    INT(model.v_head_dim, 0, 4096, "0", "mla: per-head value width"),
    BOOL(model.tie_embeddings, "true", "share the input embedding with the output projection"),
    FLT(model.rope_theta, 1.0, 1e9, "10000.0", "RoPE base frequency"),
    FLT(model.norm_eps, 1e-12, 1.0, "1e-5", "RMSNorm epsilon"),
    FLT(model.init_std, 1e-6, 1.0, "0.02", "standard deviation of the weight init"),
    FLT(model.dropout, 0.0, 0.9, "0.0", "dropout probability (0 = off)"),
    LIST(model.mixer, MOE_YAML_ENUM_OR_LIST, 0, 0, mixer_names, "attention",
         "token mixer: one for all layers, or a list of n_layers entries"),
    INT(model.mom_memories, 1, 64, "4", "MoM: number of memories M"),
    INT(model.mom_top_k, 1, 64, "2", "MoM: memories per token (<= mom_memories)"),
    BOOL(model.mom_shared, "true", "MoM: add the always-on shared memory"),
    INT(model.mom_heads, 1, 256, "4", "MoM: heads (must divide d_model)"),
    ENUM(model.mom_update, mom_update_names, "delta", "MoM: memory update rule"),
    INT(model.mom_chunk, 1, 4096, "64", "MoM: chunk length of the parallel training form"),
    FLT(model.mom_aux_coef, 0.0, 100.0, "1e-3", "MoM: memory-router balance loss coefficient"),
    STR(model.init_from, "", "a hub folder: a fresh `moe train` starts from its weights, its config.json gives "
                             "the model.* keys (those set here must agree)"),
    /* router */
    ENUM(router.type, router_names, "topk", "router: top-k softmax, recurrent (RMoE) or optimal transport"),
    ENUM(router.balance, balance_names, "switch", "load balancing method"),
    FLT(router.aux_coef, 0.0, 100.0, "0.01", "balance loss coefficient alpha"),
    FLT(router.z_coef, 0.0, 100.0, "1e-3", "router z-loss coefficient beta"),
    BOOL(router.renormalize, "true", "renormalise the top-k gates to sum 1"),
    FLT(router.capacity_factor, 0.0, 1024.0, "0.0", "expert capacity factor c; 0 = dropless"),
    ENUM(router.score, score_names, "softmax", "expert scores: softmax over experts, or per-expert sigmoid"),
    INT(router.n_groups, 1, 1024, "1", "group-limited top-k: experts split into n_groups equal groups"),
    INT(router.topk_groups, 1, 1024, "1",
        "group-limited top-k: only the experts of the best topk_groups groups (group score: sum of its top 2) "
        "are chosen"),
    FLT(router.scale, 0.0, 1e6, "1.0", "multiplier of the routed experts' gates"),
    FLT(router.aux_free_rate, 0.0, 1.0, "1e-3", "aux-loss-free bias update rate gamma"),
    INT(router.rmoe_dim, 1, 65536, "128", "RMoE: GRU width p"),
    BOOL(router.rmoe_detach, "false", "RMoE: detach the recurrent state between layers (ablation)"),
    INT(router.ot_iters, 1, 100000, "30", "OT: semi-dual solver iterations"),
    FLT(router.ot_gamma, 1e-6, 1e6, "1.0", "OT: quadratic regularisation gamma"),
    BOOL(router.ot_plan_gates, "false",
         "OT: gates take the transport plan's values (straight-through: the softmax's gradient)"),
    ENUM(router.latency_source, latency_source_names, "startup",
         "latency balance: measure expert latency once at startup or as a running average"),
    BOOL(router.noisy_gating, "false", "Shazeer noisy top-k gating in training (+ smooth load for latency balance)"),
    /* data */
    STR(data.train_path, "data/brown/train.bin", "training token file"),
    STR(data.val_path, "data/brown/val.bin", "validation token file"),
    ENUM(data.tokenizer, tokenizer_names, "byte", "tokenizer"),
    STR(data.tokenizer_path, "", "tokenizer file (bpe), or hub folder (hf)"),
    INT(data.batch_size, 1, 1 << 20, "8", "sequences per optimizer step, over all ranks"),
    /* train */
    ENUM(train.device, device_names, "cpu", "compute device"),
    ENUM(train.dtype, dtype_names, "f32", "compute dtype (master weights stay f32)"),
    INT(train.steps, 0, BIG, "200", "optimizer steps"),
    INT(train.seed, 0, INT_MAX, "1234", "random seed (init, data order, sampling)"),
    ENUM(train.optimizer, optimizer_names, "adamw", "optimizer"),
    FLT(train.lr, 0.0, 10.0, "3e-3", "peak learning rate"),
    FLT(train.min_lr, 0.0, 10.0, "3e-4", "final learning rate of the cosine schedule (<= lr)"),
    INT(train.warmup, 0, BIG, "20", "linear warmup steps"),
    ENUM(train.schedule, schedule_names, "cosine", "learning-rate schedule after warmup"),
    FLT(train.beta1, 0.0, 1.0, "0.9", "AdamW beta1"),
    FLT(train.beta2, 0.0, 1.0, "0.95", "AdamW beta2"),
    FLT(train.eps, 0.0, 1.0, "1e-8", "AdamW epsilon"),
    FLT(train.weight_decay, 0.0, 10.0, "0.1", "decoupled weight decay"),
    FLT(train.momentum, 0.0, 1.0, "0.9", "SGD momentum"),
    FLT(train.grad_clip, 0.0, 1e6, "1.0", "global gradient-norm clip; 0 = off"),
    INT(train.grad_accum, 1, 65536, "1", "micro-batches per optimizer step (must divide batch_size)"),
    INT(train.eval_every, 0, BIG, "50", "steps between validation runs; 0 = only at the end"),
    INT(train.eval_batches, 1, 1 << 20, "8", "validation batches per evaluation"),
    INT(train.log_every, 1, BIG, "10", "steps between log lines"),
    INT(train.max_bad_steps, 1, 1 << 20, "5", "consecutive NaN/Inf steps before training stops"),
    INT(train.threads, 0, 4096, "0", "CPU threads; 0 = all cores"),
    LIST(train.recompute, MOE_YAML_ENUM_LIST, 0, 0, recompute_names, "[]",
         "pieces whose activations the backward recomputes instead of keeping (less memory, one more "
         "forward of each): experts, attention"),
    /* checkpoint */
    STR(checkpoint.dir, "runs/tiny", "directory for checkpoints and logs"),
    INT(checkpoint.every, 0, BIG, "100", "steps between checkpoints; 0 = only at the end"),
    INT(checkpoint.keep, 0, 1000, "3", "most recent checkpoints kept; 0 = keep all"),
    /* parallel */
    INT(parallel.expert_parallel, 1, 4096, "1",
        "expert-parallel group size (must divide the MPI world size)"),
};

static const moe_yaml_schema config_schema = {
    config_keys, sizeof config_keys / sizeof config_keys[0], sizeof(moe_config)};

const moe_yaml_schema *moe_config_schema(void) { return &config_schema; }

moe_status moe_config_defaults(moe_config *cfg) {
    moe_yaml_defaults(&config_schema, cfg);
    return MOE_OK;
}

moe_status moe_config_load_file(moe_config *cfg, const char *path) {
    moe_config_defaults(cfg);
    return moe_yaml_load_file(&config_schema, cfg, path);
}

moe_status moe_config_load_text(moe_config *cfg, const char *text, const char *origin) {
    moe_config_defaults(cfg);
    return moe_yaml_load_text(&config_schema, cfg, text, origin ? origin : "<checkpoint>");
}

moe_status moe_config_set(moe_config *cfg, const char *assignment) {
    return moe_yaml_set(&config_schema, cfg, assignment);
}

moe_status moe_config_to_yaml(const moe_config *cfg, char **out_text) {
    return moe_yaml_to_text(&config_schema, cfg, out_text);
}

moe_status moe_config_write(const moe_config *cfg, FILE *out) {
    return moe_yaml_write(&config_schema, cfg, out);
}

void moe_config_print_help(FILE *out) { moe_yaml_print_help(&config_schema, out); }

const char *moe_config_enum_name(const char *key, int value) {
    const moe_yaml_key *k = moe_yaml_find_key(&config_schema, key);
    MOE_ASSERT(k, "no config key '%s'", key);
    return moe_yaml_enum_name(k, value);
}

/* Multi-head latent attention widths and group-limited routing. */
static moe_status validate_mla_and_groups(const moe_config *cfg) {
    const moe_cfg_model *m = &cfg->model;
    const moe_cfg_router *r = &cfg->router;
    if (m->attention == MOE_CFG_ATTENTION_MLA &&
        (m->kv_lora_rank < 1 || m->qk_rope_dim < 2 || m->v_head_dim < 1 || m->qk_nope_dim + m->qk_rope_dim < 1))
        return moe_error(MOE_ERR_CONFIG,
                         "config: model.attention=mla needs model.kv_lora_rank, model.qk_rope_dim and "
                         "model.v_head_dim > 0 (got %d, %d, %d)",
                         m->kv_lora_rank, m->qk_rope_dim, m->v_head_dim);
    if (m->attention == MOE_CFG_ATTENTION_MLA && (m->qk_norm != MOE_CFG_QK_NORM_NONE || m->qkv_bias))
        return moe_error(MOE_ERR_CONFIG, "config: model.attention=mla takes neither model.qk_norm nor model.qkv_bias");
    if (m->n_experts % r->n_groups != 0 || r->topk_groups > r->n_groups)
        return moe_error(MOE_ERR_CONFIG,
                         "config: router.n_groups=%d must divide model.n_experts=%d and be >= "
                         "router.topk_groups=%d",
                         r->n_groups, m->n_experts, r->topk_groups);
    if (m->top_k > r->topk_groups * (m->n_experts / r->n_groups))
        return moe_error(MOE_ERR_CONFIG,
                         "config: model.top_k=%d is more than the %d experts of router.topk_groups=%d groups",
                         m->top_k, r->topk_groups * (m->n_experts / r->n_groups), r->topk_groups);
    if (r->n_groups > 1 && m->n_experts / r->n_groups < 2)
        return moe_error(MOE_ERR_CONFIG, "config: router.n_groups=%d leaves fewer than 2 experts per group",
                         r->n_groups);
    return MOE_OK;
}

/* Attention head counts and widths: whole heads, even RoPE widths, kv heads dividing the heads. */
static moe_status validate_heads(const moe_cfg_model *m) {
    if (m->head_dim == 0 && m->attention == MOE_CFG_ATTENTION_MHA && m->d_model % m->n_heads != 0) {
        return moe_error(MOE_ERR_CONFIG,
                         "config: model.n_heads=%d does not divide model.d_model=%d; choose "
                         "n_heads so that d_model/n_heads is a whole number, or set model.head_dim",
                         m->n_heads, m->d_model);
    }
    if (m->attention == MOE_CFG_ATTENTION_MLA && m->qk_rope_dim % 2 != 0) {
        return moe_error(MOE_ERR_CONFIG, "config: model.qk_rope_dim=%d is odd; RoPE needs an even width",
                         m->qk_rope_dim);
    }
    if (m->attention == MOE_CFG_ATTENTION_MHA && m->head_dim % 2 != 0) {
        return moe_error(MOE_ERR_CONFIG, "config: model.head_dim=%d is odd; RoPE needs an even head width",
                         m->head_dim);
    }
    if (m->attention == MOE_CFG_ATTENTION_MHA && m->head_dim == 0 && (m->d_model / m->n_heads) % 2 != 0) {
        return moe_error(MOE_ERR_CONFIG,
                         "config: the head width model.d_model/model.n_heads = %d/%d = %d is odd; "
                         "RoPE needs an even head width",
                         m->d_model, m->n_heads, m->d_model / m->n_heads);
    }
    if (m->n_kv_heads != 0 && m->n_heads % m->n_kv_heads != 0) {
        return moe_error(MOE_ERR_CONFIG,
                         "config: model.n_kv_heads=%d does not divide model.n_heads=%d; use a "
                         "divisor of n_heads, or 0 for n_heads",
                         m->n_kv_heads, m->n_heads);
    }
    return MOE_OK;
}

/* Routed experts: top_k within them, one width per expert when widths are listed. */
static moe_status validate_experts(const moe_cfg_model *m) {
    if (m->top_k > m->n_experts) {
        return moe_error(MOE_ERR_CONFIG,
                         "config: model.top_k=%d is larger than model.n_experts=%d; lower top_k "
                         "or add experts",
                         m->top_k, m->n_experts);
    }
    if (m->expert_ffn_dims.count != 0 && m->expert_ffn_dims.count != m->n_experts) {
        return moe_error(MOE_ERR_CONFIG,
                         "config: model.expert_ffn_dims has %d entries but model.n_experts=%d; "
                         "give one width per expert, or [] for ffn_dim everywhere",
                         m->expert_ffn_dims.count, m->n_experts);
    }
    return MOE_OK;
}

/* The per-layer plan: mixer list length, dense layers, and the MoM mixer's memories and heads. */
static moe_status validate_layers(const moe_config *cfg) {
    const moe_cfg_model *m = &cfg->model;
    if (m->mixer.count != 1 && m->mixer.count != m->n_layers) {
        return moe_error(MOE_ERR_CONFIG,
                         "config: model.mixer has %d entries but model.n_layers=%d; give one "
                         "mixer for all layers or one per layer",
                         m->mixer.count, m->n_layers);
    }
    if (m->dense_layers > m->n_layers) {
        return moe_error(MOE_ERR_CONFIG,
                         "config: model.dense_layers=%d is larger than model.n_layers=%d",
                         m->dense_layers, m->n_layers);
    }
    if (m->mom_top_k > m->mom_memories) {
        return moe_error(MOE_ERR_CONFIG,
                         "config: model.mom_top_k=%d is larger than model.mom_memories=%d",
                         m->mom_top_k, m->mom_memories);
    }
    for (int layer = 0; layer < m->n_layers; layer++) {
        if (moe_config_layer_mixer(cfg, layer) == MOE_CFG_MIXER_MOM && m->d_model % m->mom_heads != 0) {
            return moe_error(MOE_ERR_CONFIG,
                             "config: model.mom_heads=%d does not divide model.d_model=%d "
                             "(layer %d uses the mom mixer)",
                             m->mom_heads, m->d_model, layer);
        }
    }
    return MOE_OK;
}

/* Training and data: dtype on device, learning rates, micro-batches, tokenizer files. */
static moe_status validate_training_and_data(const moe_config *cfg) {
    if (cfg->train.dtype == MOE_CFG_DTYPE_BF16 && cfg->train.device == MOE_CFG_DEVICE_CPU) {
        return moe_error(MOE_ERR_CONFIG,
                         "config: train.dtype=bf16 needs train.device=cuda (the CPU computes in "
                         "f32; a bf16 checkpoint's f32 master weights run there with --set "
                         "train.dtype=f32)");
    }
    if (cfg->train.min_lr > cfg->train.lr) {
        return moe_error(MOE_ERR_CONFIG, "config: train.min_lr=%g is larger than train.lr=%g",
                         cfg->train.min_lr, cfg->train.lr);
    }
    if (cfg->data.batch_size % cfg->train.grad_accum != 0) {
        return moe_error(MOE_ERR_CONFIG,
                         "config: train.grad_accum=%d does not divide data.batch_size=%d; the "
                         "batch is split into grad_accum equal micro-batches",
                         cfg->train.grad_accum, cfg->data.batch_size);
    }
    if (cfg->data.tokenizer == MOE_CFG_TOKENIZER_BPE && cfg->data.tokenizer_path[0] == '\0') {
        return moe_error(MOE_ERR_CONFIG,
                         "config: data.tokenizer=bpe needs data.tokenizer_path (the BPE "
                         "tokenizer file)");
    }
    if (cfg->data.tokenizer == MOE_CFG_TOKENIZER_HF && cfg->data.tokenizer_path[0] == '\0')
        return moe_error(MOE_ERR_CONFIG, "config: data.tokenizer=hf needs data.tokenizer_path (a hub folder with "
                                         "tokenizer.json)");
    return MOE_OK;
}

moe_status moe_config_validate(const moe_config *cfg) {
    MOE_ASSERT(cfg, "NULL config");
    MOE_TRY(validate_heads(&cfg->model));
    MOE_TRY(validate_experts(&cfg->model));
    MOE_TRY(validate_layers(cfg));
    MOE_TRY(validate_training_and_data(cfg));
    return validate_mla_and_groups(cfg);
}

moe_cfg_mixer moe_config_layer_mixer(const moe_config *cfg, int layer) {
    const moe_yaml_list *mixer = &cfg->model.mixer;
    MOE_ASSERT(layer >= 0 && layer < cfg->model.n_layers, "layer %d outside [0, %d)", layer,
               cfg->model.n_layers);
    MOE_ASSERT(mixer->count == 1 || mixer->count == cfg->model.n_layers,
               "model.mixer has %d entries for %d layers (validate the config first)",
               mixer->count, cfg->model.n_layers);
    return (moe_cfg_mixer)mixer->values[mixer->count == 1 ? 0 : layer];
}

bool moe_config_layer_is_dense(const moe_config *cfg, int layer) {
    MOE_ASSERT(layer >= 0 && layer < cfg->model.n_layers, "layer %d outside [0, %d)", layer,
               cfg->model.n_layers);
    const moe_cfg_model *m = &cfg->model;
    for (int i = 0; i < m->dense_layer_ids.count; i++)
        if (m->dense_layer_ids.values[i] == layer) return true;
    return layer < m->dense_layers || (layer + 1) % m->moe_layer_step != 0;
}

bool moe_config_recomputes(const moe_config *cfg, moe_cfg_recompute piece) {
    const moe_yaml_list *r = &cfg->train.recompute;
    for (int i = 0; i < r->count; i++)
        if (r->values[i] == (int)piece) return true;
    return false;
}

int moe_config_head_dim(const moe_config *cfg) {
    const moe_cfg_model *m = &cfg->model;
    if (m->attention == MOE_CFG_ATTENTION_MLA) return m->qk_nope_dim + m->qk_rope_dim;
    return m->head_dim ? m->head_dim : m->d_model / m->n_heads;
}

int moe_config_expert_ffn_dim(const moe_config *cfg, int expert) {
    MOE_ASSERT(expert >= 0 && expert < cfg->model.n_experts, "expert %d outside [0, %d)", expert,
               cfg->model.n_experts);
    const moe_yaml_list *dims = &cfg->model.expert_ffn_dims;
    if (dims->count == 0) return cfg->model.ffn_dim;
    MOE_ASSERT(dims->count == cfg->model.n_experts,
               "model.expert_ffn_dims has %d entries for %d experts (validate the config first)",
               dims->count, cfg->model.n_experts);
    return dims->values[expert];
}

int moe_config_kv_heads(const moe_config *cfg) {
    return cfg->model.n_kv_heads ? cfg->model.n_kv_heads : cfg->model.n_heads;
}

int moe_config_shared_ffn_dim(const moe_config *cfg) {
    return cfg->model.shared_ffn_dim ? cfg->model.shared_ffn_dim : cfg->model.ffn_dim;
}

int moe_config_dense_ffn_dim(const moe_config *cfg) {
    return cfg->model.dense_ffn_dim ? cfg->model.dense_ffn_dim
                                    : cfg->model.ffn_dim * cfg->model.top_k;
}
