/* The typed configuration of the `moe` program: model, router, data, training,
 * checkpoint and parallel settings, read from YAML (see the configs/ folder) with
 * `--set section.key=value` overrides. One schema table in config.c gives every key's
 * type, range, default and description; `moe train --help` prints it.
 *
 * Usual sequence: moe_config_load_file (defaults + file), moe_config_set for each
 * override, then moe_config_validate (the cross-field checks run last so that an
 * override can repair a combination, e.g. n_layers together with a per-layer mixer). */
#ifndef MOE_MOE_CONFIG_H
#define MOE_MOE_CONFIG_H

#include <stdbool.h>
#include <stdio.h>

#include "core/status.h"
#include "core/yaml_config.h"

/* Enum values are the index of their name in the schema (names in comments). */
typedef enum moe_cfg_mixer {
    MOE_CFG_MIXER_ATTENTION, /* attention */
    MOE_CFG_MIXER_MOM,       /* mom: mixture-of-memories linear attention */
    MOE_CFG_MIXER_GDN,       /* gdn: gated delta net (one memory) */
} moe_cfg_mixer;

typedef enum moe_cfg_mom_update {
    MOE_CFG_MOM_DELTA, /* delta: gated delta rule */
    MOE_CFG_MOM_GLA,   /* gla: gated linear attention */
} moe_cfg_mom_update;

typedef enum moe_cfg_qk_norm {
    MOE_CFG_QK_NORM_NONE, /* none */
    MOE_CFG_QK_NORM_FULL, /* full: RMSNorm over all heads of q (H hd) and of k (Hkv hd) */
    MOE_CFG_QK_NORM_HEAD, /* head: RMSNorm over each head (weight [hd]) */
} moe_cfg_qk_norm;

typedef enum moe_cfg_attention {
    MOE_CFG_ATTENTION_MHA, /* mha: multi-head / grouped-query attention */
    MOE_CFG_ATTENTION_MLA, /* mla: multi-head latent attention (low-rank q and kv, shared rope key) */
} moe_cfg_attention;

typedef enum moe_cfg_router_score {
    MOE_CFG_SCORE_SOFTMAX, /* softmax */
    MOE_CFG_SCORE_SIGMOID, /* sigmoid */
} moe_cfg_router_score;

typedef enum moe_cfg_router_type {
    MOE_CFG_ROUTER_TOPK, /* topk */
    MOE_CFG_ROUTER_RMOE, /* rmoe: layerwise recurrent router */
    MOE_CFG_ROUTER_OT,   /* ot: sparsity-constrained optimal transport */
} moe_cfg_router_type;

typedef enum moe_cfg_balance {
    MOE_CFG_BALANCE_SWITCH,   /* switch */
    MOE_CFG_BALANCE_LATENCY,  /* latency */
    MOE_CFG_BALANCE_AUX_FREE, /* aux_free */
    MOE_CFG_BALANCE_NONE,     /* none */
} moe_cfg_balance;

typedef enum moe_cfg_latency_source {
    MOE_CFG_LATENCY_STARTUP, /* startup */
    MOE_CFG_LATENCY_RUNNING, /* running */
} moe_cfg_latency_source;

typedef enum moe_cfg_tokenizer {
    MOE_CFG_TOKENIZER_BYTE, /* byte */
    MOE_CFG_TOKENIZER_BPE,  /* bpe */
    MOE_CFG_TOKENIZER_HF,   /* hf: data.tokenizer_path is a Hugging Face hub folder (tokenizer.json) */
} moe_cfg_tokenizer;

typedef enum moe_cfg_device {
    MOE_CFG_DEVICE_CPU,  /* cpu */
    MOE_CFG_DEVICE_CUDA, /* cuda */
} moe_cfg_device;

typedef enum moe_cfg_dtype {
    MOE_CFG_DTYPE_F32,  /* f32 */
    MOE_CFG_DTYPE_BF16, /* bf16 */
} moe_cfg_dtype;

typedef enum moe_cfg_optimizer {
    MOE_CFG_OPTIMIZER_ADAMW, /* adamw */
    MOE_CFG_OPTIMIZER_SGD,   /* sgd */
} moe_cfg_optimizer;

typedef enum moe_cfg_schedule {
    MOE_CFG_SCHEDULE_COSINE,   /* cosine */
    MOE_CFG_SCHEDULE_CONSTANT, /* constant */
} moe_cfg_schedule;

/* Entries of train.recompute: pieces whose activations the backward recomputes. */
typedef enum moe_cfg_recompute {
    MOE_CFG_RECOMPUTE_EXPERTS,   /* experts: each expert group's SwiGLU (grouped GEMMs) */
    MOE_CFG_RECOMPUTE_ATTENTION, /* attention: projections, rope, attention, output projection */
} moe_cfg_recompute;

typedef struct moe_cfg_model {
    int vocab_size;
    int d_model;
    int n_layers;
    int n_heads;
    int n_kv_heads;                /* 0 = n_heads; use moe_config_kv_heads() */
    int seq_len;
    int ffn_dim;                   /* expert hidden width f */
    int n_experts;
    int top_k;
    moe_yaml_list expert_ffn_dims; /* empty, or one width per expert */
    int n_shared_experts;
    int shared_ffn_dim;            /* 0 = ffn_dim; use moe_config_shared_ffn_dim() */
    int dense_layers;              /* the first k layers use a dense SwiGLU FFN */
    int dense_ffn_dim;             /* 0 = ffn_dim*top_k; use moe_config_dense_ffn_dim() */
    moe_yaml_list dense_layer_ids; /* further dense layers by index */
    int moe_layer_step;            /* layer i is MoE only when (i + 1) % step == 0 */
    bool shared_gate;              /* shared experts' output times sigmoid(x w) [d, 1] */
    int head_dim;                  /* 0 = d_model / n_heads; use moe_config_head_dim() */
    bool qkv_bias;                 /* biases on q, k and v */
    moe_cfg_qk_norm qk_norm;
    moe_cfg_attention attention;
    int q_lora_rank;               /* mla: 0 = full-rank q projection */
    int kv_lora_rank;              /* mla */
    int qk_nope_dim;               /* mla: per-head q/k width without rope */
    int qk_rope_dim;               /* mla: per-head rope width (the rope key is shared by all heads) */
    int v_head_dim;                /* mla */
    bool tie_embeddings;
    double rope_theta;
    double norm_eps;
    double init_std;
    double dropout;
    moe_yaml_list mixer;           /* moe_cfg_mixer values: 1 entry (all layers) or n_layers */
    int mom_memories;
    int mom_top_k;
    bool mom_shared;
    int mom_heads;
    moe_cfg_mom_update mom_update;
    int mom_chunk;
    double mom_aux_coef;
    char init_from[MOE_YAML_STRING_MAX]; /* a hub folder whose weights (and config.json) a fresh run starts from */
} moe_cfg_model;

typedef struct moe_cfg_router {
    moe_cfg_router_type type;
    moe_cfg_balance balance;
    double aux_coef;
    double z_coef;
    bool renormalize;
    double capacity_factor;        /* 0 = dropless */
    moe_cfg_router_score score;
    int n_groups;                  /* group-limited top-k: experts in n_groups groups ... */
    int topk_groups;               /* ... of which the best topk_groups are eligible */
    double scale;                  /* routed output multiplier */
    double aux_free_rate;
    int rmoe_dim;
    bool rmoe_detach;
    int ot_iters;
    double ot_gamma;
    bool ot_plan_gates;
    moe_cfg_latency_source latency_source;
    bool noisy_gating;
} moe_cfg_router;

typedef struct moe_cfg_data {
    char train_path[MOE_YAML_STRING_MAX];
    char val_path[MOE_YAML_STRING_MAX];
    moe_cfg_tokenizer tokenizer;
    char tokenizer_path[MOE_YAML_STRING_MAX];
    int batch_size;                /* sequences per optimizer step, over all ranks */
} moe_cfg_data;

typedef struct moe_cfg_train {
    moe_cfg_device device;
    moe_cfg_dtype dtype;
    int steps;
    int seed;
    moe_cfg_optimizer optimizer;
    double lr;
    double min_lr;
    int warmup;
    moe_cfg_schedule schedule;
    double beta1;
    double beta2;
    double eps;
    double weight_decay;
    double momentum;
    double grad_clip;              /* 0 = off */
    int grad_accum;
    int eval_every;                /* 0 = only at the end */
    int eval_batches;
    int log_every;
    int max_bad_steps;
    int threads;                   /* 0 = all cores */
    moe_yaml_list recompute;       /* moe_cfg_recompute entries */
} moe_cfg_train;

typedef struct moe_cfg_checkpoint {
    char dir[MOE_YAML_STRING_MAX];
    int every;                     /* 0 = only at the end */
    int keep;                      /* 0 = keep all */
} moe_cfg_checkpoint;

typedef struct moe_cfg_parallel {
    int expert_parallel;           /* must divide the MPI world size (checked by the trainer) */
} moe_cfg_parallel;

typedef struct moe_config {
    moe_cfg_model model;
    moe_cfg_router router;
    moe_cfg_data data;
    moe_cfg_train train;
    moe_cfg_checkpoint checkpoint;
    moe_cfg_parallel parallel;
} moe_config;

/* Zeroes the struct (padding too: two configs compare with memcmp) and sets every
 * default. Always MOE_OK. */
moe_status moe_config_defaults(moe_config *cfg);

/* Defaults, then the keys of the file / text. On error `cfg` holds the defaults.
 * load_text names `origin` in messages ("<checkpoint>" when NULL). Neither runs
 * moe_config_validate: call it after the overrides. */
moe_status moe_config_load_file(moe_config *cfg, const char *path);
moe_status moe_config_load_text(moe_config *cfg, const char *text, const char *origin);

/* One override "section.key=value" (lists as "[a,b]"); `cfg` is unchanged on error. */
moe_status moe_config_set(moe_config *cfg, const char *assignment);

/* Cross-field checks (divisibility, list lengths, top-k bounds); MOE_ERR_CONFIG with
 * the keys and values named. */
moe_status moe_config_validate(const moe_config *cfg);

/* The effective config as YAML (every key, by section); loads back to an identical
 * struct. to_yaml returns malloc'd text that the caller frees. */
moe_status moe_config_to_yaml(const moe_config *cfg, char **out_text);
moe_status moe_config_write(const moe_config *cfg, FILE *out);

/* Every key with type, range or allowed values, default and description. */
void moe_config_print_help(FILE *out);

/* The schema table (for generic tools) and the name of an enum value of a key,
 * e.g. moe_config_enum_name("train.device", cfg->train.device) == "cuda". */
const moe_yaml_schema *moe_config_schema(void);
const char *moe_config_enum_name(const char *key, int value);

/* Resolved per-layer / per-expert values (the "0 = ..." defaults applied). */
moe_cfg_mixer moe_config_layer_mixer(const moe_config *cfg, int layer);
/* layer < dense_layers, listed in dense_layer_ids, or (layer + 1) % moe_layer_step != 0 */
bool moe_config_layer_is_dense(const moe_config *cfg, int layer);
int moe_config_head_dim(const moe_config *cfg); /* mla: qk_nope_dim + qk_rope_dim */
int moe_config_expert_ffn_dim(const moe_config *cfg, int expert);
int moe_config_kv_heads(const moe_config *cfg);
int moe_config_shared_ffn_dim(const moe_config *cfg);
int moe_config_dense_ffn_dim(const moe_config *cfg);
/* train.recompute lists the piece. */
bool moe_config_recomputes(const moe_config *cfg, moe_cfg_recompute piece);

#endif
