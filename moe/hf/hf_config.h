/* A Hugging Face hub folder's config.json (and generation_config.json) as our moe_config.
 * The supported families (model_type mixtral, olmoe, qwen2_moe, qwen3_moe, deepseek_v3)
 * map onto model features (head_dim, qk_norm, qkv_bias, shared_gate, dense layers, router
 * score / groups / scale, mla, ...), so the model code has no family switches. A field the
 * model cannot honour (another activation, a sliding window, clip_qkv, rope scaling, an
 * unknown model_type) is refused with the file and key named. */
#ifndef MOE_HF_HF_CONFIG_H
#define MOE_HF_HF_CONFIG_H

#include <stdbool.h>

#include "core/status.h"
#include "moe/model/config.h"

#define MOE_HF_MAX_EOS 8

/* generation_config.json's sampling (transformers' defaults where a field is absent). */
typedef struct moe_hf_sampling {
    bool do_sample;     /* false: greedy decoding */
    double temperature; /* 1 */
    int top_k;          /* 50; 0 = off */
    double top_p;       /* 1 = off */
} moe_hf_sampling;

typedef struct moe_hf_info {
    char model_type[64];
    bool rope_interleave; /* mla: the checkpoint's rope dims are interleaved (DeepSeek-V3): the
                           * columns that produce q_pe and k_pe are permuted at load */
    int bos_id;           /* -1: none */
    int eos_ids[MOE_HF_MAX_EOS];
    int n_eos;
    moe_hf_sampling sampling;
} moe_hf_info;

/* dir/config.json -> cfg (defaults for everything else, validated) and info; reads
 * dir/generation_config.json for the eos/bos ids and the sampling when present. */
moe_status moe_hf_config_read(const char *dir, moe_config *cfg, moe_hf_info *info);

/* The same from config.json text (`origin` names it in messages). */
moe_status moe_hf_config_parse(const char *text, const char *origin, moe_config *cfg, moe_hf_info *info);

/* The other way: cfg as a family's config.json (malloc'd *text) and that family's
 * model_type in *family. model_type NULL: the family whose features cover cfg's; a config
 * no family can express (another mixer or router, heterogeneous experts, ...) is refused
 * by name. Exported MLA weights are in rotate-half order (rope_interleave false). */
moe_status moe_hf_config_format(const moe_config *cfg, const char *model_type, char **text, const char **family);

#endif
