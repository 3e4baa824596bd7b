/* config.json -> moe_config: the family's fields mapped onto model features. */
#include "moe/hf/hf_config.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "moe/hf/safetensors.h"

typedef struct json_ctx {
    const cJSON *root;
    const char *origin;
} json_ctx;

static const cJSON *item(const json_ctx *j, const char *key) { return cJSON_GetObjectItemCaseSensitive(j->root, key); }

static bool present(const json_ctx *j, const char *key) {
    const cJSON *v = item(j, key);
    return v && !cJSON_IsNull(v);
}

/* The first of `keys` (NULL-terminated aliases) that is present, as an integer >= min. */
static moe_status get_int(const json_ctx *j, const char *const *keys, int min, bool required, int dflt, int *out) {
    for (const char *const *k = keys; *k; k++) {
        const cJSON *v = item(j, *k);
        if (!v || cJSON_IsNull(v)) continue;
        if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < min ||
            v->valuedouble > 1e9)
            return moe_error(MOE_ERR_CONFIG, "%s: %s: expected an integer >= %d", j->origin, *k, min);
        *out = (int)v->valuedouble;
        return MOE_OK;
    }
    if (required) return moe_error(MOE_ERR_CONFIG, "%s: %s: missing (an integer >= %d is needed)", j->origin, keys[0], min);
    *out = dflt;
    return MOE_OK;
}

static moe_status get_num(const json_ctx *j, const char *key, double dflt, double *out) {
    const cJSON *v = item(j, key);
    if (!v || cJSON_IsNull(v)) {
        *out = dflt;
        return MOE_OK;
    }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) /* 1e999 parses as infinity */
        return moe_error(MOE_ERR_CONFIG, "%s: %s: expected a finite number", j->origin, key);
    *out = v->valuedouble;
    return MOE_OK;
}

static moe_status get_bool(const json_ctx *j, const char *key, bool dflt, bool *out) {
    const cJSON *v = item(j, key);
    if (!v || cJSON_IsNull(v)) {
        *out = dflt;
        return MOE_OK;
    }
    if (!cJSON_IsBool(v)) return moe_error(MOE_ERR_CONFIG, "%s: %s: expected true or false", j->origin, key);
    *out = cJSON_IsTrue(v);
    return MOE_OK;
}

#define KEYS(...) ((const char *const[]){__VA_ARGS__, NULL})

/* Refuses settings the model does not implement, naming each. */
static moe_status refuse_unsupported(const json_ctx *j) {
    const cJSON *act = item(j, "hidden_act");
    if (act && !(cJSON_IsString(act) && !strcmp(act->valuestring, "silu")))
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: hidden_act: only \"silu\" is supported", j->origin);
    bool on = false;
    MOE_TRY(get_bool(j, "use_sliding_window", false, &on));
    if (on) return moe_error(MOE_ERR_UNSUPPORTED, "%s: use_sliding_window=true is not supported", j->origin);
    const cJSON *sw = item(j, "sliding_window");
    if (sw && !cJSON_IsNull(sw) && !present(j, "use_sliding_window") && !(cJSON_IsNumber(sw) && sw->valuedouble == 0))
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: sliding_window: only null is supported", j->origin);
    if (present(j, "clip_qkv")) return moe_error(MOE_ERR_UNSUPPORTED, "%s: clip_qkv: only null is supported", j->origin);
    const cJSON *lt = item(j, "layer_types");
    for (const cJSON *e = lt ? lt->child : NULL; e; e = e->next)
        if (!cJSON_IsString(e) || strcmp(e->valuestring, "full_attention"))
            return moe_error(MOE_ERR_UNSUPPORTED, "%s: layer_types: only \"full_attention\" layers are supported",
                             j->origin);
    return MOE_OK;
}

/* rope_parameters {rope_theta, rope_type} (transformers 5) or rope_theta + rope_scaling. */
static moe_status read_rope(const json_ctx *j, moe_cfg_model *m) {
    const cJSON *rp = item(j, "rope_parameters");
    const cJSON *sc = cJSON_IsObject(rp) ? rp : item(j, "rope_scaling");
    const json_ctx sub = {cJSON_IsObject(rp) ? rp : j->root, j->origin};
    MOE_TRY(get_num(&sub, "rope_theta", 10000.0, &m->rope_theta));
    if (cJSON_IsObject(sc)) {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(sc, "rope_type");
        if (!t) t = cJSON_GetObjectItemCaseSensitive(sc, "type");
        if (t && !(cJSON_IsString(t) && !strcmp(t->valuestring, "default")))
            return moe_error(MOE_ERR_UNSUPPORTED, "%s: %s.rope_type \"%s\": only \"default\" RoPE is supported",
                             j->origin, sc == rp ? "rope_parameters" : "rope_scaling",
                             cJSON_IsString(t) ? t->valuestring : "?");
    }
    if (!(m->rope_theta > 0)) return moe_error(MOE_ERR_CONFIG, "%s: rope_theta: expected a positive number", j->origin);
    return MOE_OK;
}

/* Fields every family shares. */
static moe_status read_common(const json_ctx *j, moe_config *cfg) {
    moe_cfg_model *m = &cfg->model;
    MOE_TRY(get_int(j, KEYS("vocab_size"), 1, true, 0, &m->vocab_size));
    MOE_TRY(get_int(j, KEYS("hidden_size"), 1, true, 0, &m->d_model));
    MOE_TRY(get_int(j, KEYS("num_hidden_layers"), 1, true, 0, &m->n_layers));
    MOE_TRY(get_int(j, KEYS("num_attention_heads"), 1, true, 0, &m->n_heads));
    MOE_TRY(get_int(j, KEYS("num_key_value_heads"), 1, false, 0, &m->n_kv_heads));
    MOE_TRY(get_int(j, KEYS("head_dim"), 1, false, 0, &m->head_dim));
    MOE_TRY(get_int(j, KEYS("num_local_experts", "num_experts", "n_routed_experts"), 1, true, 0, &m->n_experts));
    MOE_TRY(get_int(j, KEYS("num_experts_per_tok"), 1, true, 0, &m->top_k));
    MOE_TRY(get_int(j, KEYS("max_position_embeddings"), 1, false, 4096, &m->seq_len));
    MOE_TRY(get_num(j, "rms_norm_eps", 1e-6, &m->norm_eps));
    MOE_TRY(get_num(j, "initializer_range", 0.02, &m->init_std));
    MOE_TRY(get_bool(j, "tie_word_embeddings", false, &m->tie_embeddings));
    MOE_TRY(get_bool(j, "norm_topk_prob", false, &cfg->router.renormalize));
    MOE_TRY(get_num(j, "router_aux_loss_coef", 0.0, &cfg->router.aux_coef));
    cfg->router.z_coef = 0;
    cfg->router.balance = cfg->router.aux_coef > 0 ? MOE_CFG_BALANCE_SWITCH : MOE_CFG_BALANCE_NONE;
    MOE_TRY(read_rope(j, m));
    return refuse_unsupported(j);
}

/* mlp_only_layers -> dense_layer_ids; decoder_sparse_step -> moe_layer_step (Qwen MoE). */
static moe_status read_qwen_layers(const json_ctx *j, moe_cfg_model *m) {
    MOE_TRY(get_int(j, KEYS("moe_intermediate_size"), 1, true, 0, &m->ffn_dim));
    MOE_TRY(get_int(j, KEYS("intermediate_size"), 1, true, 0, &m->dense_ffn_dim));
    MOE_TRY(get_int(j, KEYS("decoder_sparse_step"), 1, false, 1, &m->moe_layer_step));
    const cJSON *ol = item(j, "mlp_only_layers");
    m->dense_layer_ids.count = 0;
    for (const cJSON *e = ol ? ol->child : NULL; e; e = e->next) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= m->n_layers ||
            m->dense_layer_ids.count == MOE_YAML_LIST_MAX)
            return moe_error(MOE_ERR_CONFIG, "%s: mlp_only_layers: expected at most %d layer indices in [0, %d)",
                             j->origin, MOE_YAML_LIST_MAX, m->n_layers);
        m->dense_layer_ids.values[m->dense_layer_ids.count++] = (int)e->valuedouble;
    }
    return MOE_OK;
}

static moe_status refuse_attention_bias(const json_ctx *j) {
    bool bias = false;
    MOE_TRY(get_bool(j, "attention_bias", false, &bias));
    return bias ? moe_error(MOE_ERR_UNSUPPORTED, "%s: attention_bias=true (an o_proj bias) is not supported", j->origin)
                : MOE_OK;
}

static moe_status read_deepseek(const json_ctx *j, moe_config *cfg, moe_hf_info *info) {
    moe_cfg_model *m = &cfg->model;
    moe_cfg_router *r = &cfg->router;
    MOE_TRY(get_int(j, KEYS("moe_intermediate_size"), 1, true, 0, &m->ffn_dim));
    MOE_TRY(get_int(j, KEYS("intermediate_size"), 1, true, 0, &m->dense_ffn_dim));
    MOE_TRY(get_int(j, KEYS("first_k_dense_replace"), 0, false, 0, &m->dense_layers));
    MOE_TRY(get_int(j, KEYS("n_shared_experts"), 0, false, 0, &m->n_shared_experts));
    m->shared_ffn_dim = m->ffn_dim;
    int freq;
    MOE_TRY(get_int(j, KEYS("moe_layer_freq"), 1, false, 1, &freq));
    if (freq != 1) return moe_error(MOE_ERR_UNSUPPORTED, "%s: moe_layer_freq=%d: only 1 is supported", j->origin, freq);
    const cJSON *sf = item(j, "scoring_func"), *tm = item(j, "topk_method");
    if (sf && !(cJSON_IsString(sf) && !strcmp(sf->valuestring, "sigmoid")))
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: scoring_func: only \"sigmoid\" is supported", j->origin);
    if (tm && !(cJSON_IsString(tm) && !strcmp(tm->valuestring, "noaux_tc")))
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: topk_method: only \"noaux_tc\" is supported", j->origin);
    r->score = MOE_CFG_SCORE_SIGMOID;
    r->balance = MOE_CFG_BALANCE_AUX_FREE; /* e_score_correction_bias: the selection bias */
    MOE_TRY(get_int(j, KEYS("n_group"), 1, false, 1, &r->n_groups));
    MOE_TRY(get_int(j, KEYS("topk_group"), 1, false, 1, &r->topk_groups));
    MOE_TRY(get_num(j, "routed_scaling_factor", 1.0, &r->scale));
    m->attention = MOE_CFG_ATTENTION_MLA;
    MOE_TRY(get_int(j, KEYS("q_lora_rank"), 1, false, 0, &m->q_lora_rank));
    MOE_TRY(get_int(j, KEYS("kv_lora_rank"), 1, true, 0, &m->kv_lora_rank));
    MOE_TRY(get_int(j, KEYS("qk_nope_head_dim"), 0, true, 0, &m->qk_nope_dim));
    MOE_TRY(get_int(j, KEYS("qk_rope_head_dim"), 2, true, 0, &m->qk_rope_dim));
    MOE_TRY(get_int(j, KEYS("v_head_dim"), 1, true, 0, &m->v_head_dim));
    m->head_dim = 0;
    m->n_kv_heads = 0;
    MOE_TRY(get_bool(j, "rope_interleave", true, &info->rope_interleave));
    /* transformers' q_a_layernorm and kv_a_layernorm keep RMSNorm's default eps, 1e-6,
     * while our latent norms use model.norm_eps */
    if (m->norm_eps != 1e-6)
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: rms_norm_eps=%g: deepseek_v3 is supported with 1e-6 only (its "
                         "latent norms use 1e-6 whatever rms_norm_eps says)", j->origin, m->norm_eps);
    return refuse_attention_bias(j);
}

/* The family's own fields. */
static moe_status read_family(const json_ctx *j, moe_config *cfg, moe_hf_info *info) {
    moe_cfg_model *m = &cfg->model;
    const char *t = info->model_type;
    if (!strcmp(t, "mixtral")) {
        cfg->router.renormalize = true;
        return get_int(j, KEYS("intermediate_size"), 1, true, 0, &m->ffn_dim);
    }
    if (!strcmp(t, "olmoe")) {
        m->qk_norm = MOE_CFG_QK_NORM_FULL;
        MOE_TRY(refuse_attention_bias(j));
        return get_int(j, KEYS("intermediate_size"), 1, true, 0, &m->ffn_dim);
    }
    if (!strcmp(t, "qwen2_moe")) {
        MOE_TRY(read_qwen_layers(j, m));
        MOE_TRY(get_bool(j, "qkv_bias", true, &m->qkv_bias));
        MOE_TRY(get_int(j, KEYS("shared_expert_intermediate_size"), 0, false, 0, &m->shared_ffn_dim));
        m->n_shared_experts = m->shared_ffn_dim > 0;
        m->shared_gate = m->shared_ffn_dim > 0;
        return MOE_OK;
    }
    if (!strcmp(t, "qwen3_moe")) {
        m->qk_norm = MOE_CFG_QK_NORM_HEAD;
        MOE_TRY(read_qwen_layers(j, m));
        return refuse_attention_bias(j);
    }
    if (!strcmp(t, "deepseek_v3")) return read_deepseek(j, cfg, info);
    return moe_error(MOE_ERR_UNSUPPORTED,
                     "%s: model_type \"%s\" is not supported (mixtral, olmoe, qwen2_moe, qwen3_moe, deepseek_v3)",
                     j->origin, t);
}

/* eos_token_id: an integer or a list of them; bos_token_id: an integer. */
static void read_special_ids(const cJSON *root, moe_hf_info *info) {
    const cJSON *eos = cJSON_GetObjectItemCaseSensitive(root, "eos_token_id");
    const cJSON *bos = cJSON_GetObjectItemCaseSensitive(root, "bos_token_id");
    if (cJSON_IsNumber(bos)) info->bos_id = bos->valueint;
    if (cJSON_IsNumber(eos)) {
        info->n_eos = 1;
        info->eos_ids[0] = eos->valueint;
    } else if (cJSON_IsArray(eos)) {
        info->n_eos = 0;
        for (const cJSON *e = eos->child; e && info->n_eos < MOE_HF_MAX_EOS; e = e->next)
            if (cJSON_IsNumber(e)) info->eos_ids[info->n_eos++] = e->valueint;
    }
}

/* do_sample, temperature, top_k, top_p (absent or of the wrong type: the default). */
static void read_sampling(const cJSON *root, moe_hf_sampling *g) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "do_sample");
    if (cJSON_IsBool(v)) g->do_sample = cJSON_IsTrue(v);
    v = cJSON_GetObjectItemCaseSensitive(root, "temperature");
    if (cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble <= 100) g->temperature = v->valuedouble;
    v = cJSON_GetObjectItemCaseSensitive(root, "top_k");
    if (cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble <= 1 << 24) g->top_k = (int)v->valuedouble;
    v = cJSON_GetObjectItemCaseSensitive(root, "top_p");
    if (cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble <= 1) g->top_p = v->valuedouble;
}

moe_status moe_hf_config_parse(const char *text, const char *origin, moe_config *cfg, moe_hf_info *info) {
    moe_config_defaults(cfg);
    memset(info, 0, sizeof *info);
    info->bos_id = -1;
    info->sampling = (moe_hf_sampling){.temperature = 1, .top_k = 50, .top_p = 1};
    cJSON *root = cJSON_Parse(text);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return moe_error(MOE_ERR_FORMAT, "%s: not a JSON object", origin);
    }
    json_ctx j = {root, origin};
    const cJSON *mt = item(&j, "model_type");
    moe_status s = MOE_OK;
    if (!cJSON_IsString(mt) || strlen(mt->valuestring) >= sizeof info->model_type)
        s = moe_error(MOE_ERR_CONFIG, "%s: model_type: missing or not a short string", origin);
    if (s == MOE_OK) {
        snprintf(info->model_type, sizeof info->model_type, "%s", mt->valuestring);
        s = read_common(&j, cfg);
    }
    if (s == MOE_OK) s = read_family(&j, cfg, info);
    if (s == MOE_OK) read_special_ids(root, info);
    cJSON_Delete(root);
    if (s == MOE_OK && (s = moe_config_validate(cfg)) != MOE_OK) moe_error_context(s, "%s: ", origin);
    return s;
}

moe_status moe_hf_config_read(const char *dir, moe_config *cfg, moe_hf_info *info) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    errno = 0;
    char *text = moe_hf_read_text(path);
    if (!text)
        return moe_error(MOE_ERR_IO, "%s: cannot read (%s; a hub folder holds config.json beside its safetensors)",
                         path, errno ? strerror(errno) : "read error");
    moe_status s = moe_hf_config_parse(text, path, cfg, info);
    free(text);
    MOE_TRY(s);
    snprintf(path, sizeof path, "%s/generation_config.json", dir);
    text = moe_hf_read_text(path);
    cJSON *gen = text ? cJSON_Parse(text) : NULL;
    if (gen) read_special_ids(gen, info);
    if (gen) read_sampling(gen, &info->sampling);
    cJSON_Delete(gen);
    free(text);
    return MOE_OK;
}

/* ---- the other way: our config as a family's config.json ---- */

/* The family whose features cover cfg's, or NULL (named in *why). */
static const char *family_for(const moe_config *cfg, const char **why) {
    const moe_cfg_model *m = &cfg->model;
    const moe_cfg_router *r = &cfg->router;
    bool dense = m->dense_layers || m->dense_layer_ids.count || m->moe_layer_step > 1;
    *why = NULL;
    if (m->mixer.count != 1 || m->mixer.values[0] != MOE_CFG_MIXER_ATTENTION) *why = "model.mixer other than attention";
    else if (cfg->router.type != MOE_CFG_ROUTER_TOPK) *why = "router.type other than topk";
    else if (m->expert_ffn_dims.count) *why = "model.expert_ffn_dims (heterogeneous experts)";
    if (*why) return NULL;
    if (m->attention == MOE_CFG_ATTENTION_MLA) return "deepseek_v3";
    if (r->score != MOE_CFG_SCORE_SOFTMAX || r->n_groups > 1 || r->scale != 1.0) *why = "sigmoid or grouped or scaled routing without mla";
    else if (m->qk_norm == MOE_CFG_QK_NORM_FULL && !m->qkv_bias && !dense && !m->n_shared_experts) return "olmoe";
    else if (m->qkv_bias || m->shared_gate) {
        if (m->qk_norm == MOE_CFG_QK_NORM_NONE && (m->n_shared_experts == 0 || (m->n_shared_experts == 1 && m->shared_gate)) &&
            !m->dense_layers)
            return "qwen2_moe";
        *why = "qkv_bias or shared_gate beside features qwen2_moe lacks";
    } else if (!m->n_shared_experts && !m->dense_layers && m->qk_norm != MOE_CFG_QK_NORM_FULL) {
        if (m->qk_norm == MOE_CFG_QK_NORM_HEAD) return "qwen3_moe";
        /* without q/k norms: mixtral (which keeps head_dim) unless it needs dense layers or
         * unrenormalised gates, which qwen2_moe has (qwen3_moe would add q/k norms) */
        if (dense || !r->renormalize) return "qwen2_moe";
        return "mixtral";
    } else *why = "this combination of shared experts, dense layers and q/k norms";
    return NULL;
}

static void put_num(cJSON *o, const char *k, double v) { cJSON_AddNumberToObject(o, k, v); }

static void write_deepseek(cJSON *o, const moe_config *cfg) {
    const moe_cfg_model *m = &cfg->model;
    put_num(o, "moe_intermediate_size", m->ffn_dim);
    put_num(o, "intermediate_size", moe_config_dense_ffn_dim(cfg));
    put_num(o, "first_k_dense_replace", m->dense_layers);
    put_num(o, "n_shared_experts", m->n_shared_experts);
    put_num(o, "n_group", cfg->router.n_groups);
    put_num(o, "topk_group", cfg->router.topk_groups);
    put_num(o, "routed_scaling_factor", cfg->router.scale);
    if (m->q_lora_rank) put_num(o, "q_lora_rank", m->q_lora_rank);
    else cJSON_AddNullToObject(o, "q_lora_rank");
    put_num(o, "kv_lora_rank", m->kv_lora_rank);
    put_num(o, "qk_nope_head_dim", m->qk_nope_dim);
    put_num(o, "qk_rope_head_dim", m->qk_rope_dim);
    put_num(o, "v_head_dim", m->v_head_dim);
    cJSON_AddBoolToObject(o, "rope_interleave", false); /* exported weights are in rotate-half order */
    cJSON_AddStringToObject(o, "scoring_func", "sigmoid");
    cJSON_AddStringToObject(o, "topk_method", "noaux_tc");
}

static void write_family(cJSON *o, const moe_config *cfg, const char *fam) {
    const moe_cfg_model *m = &cfg->model;
    if (!strcmp(fam, "deepseek_v3")) return write_deepseek(o, cfg);
    if (!strcmp(fam, "mixtral") || !strcmp(fam, "olmoe")) {
        put_num(o, "intermediate_size", m->ffn_dim);
        return;
    }
    put_num(o, "moe_intermediate_size", m->ffn_dim); /* qwen2_moe, qwen3_moe */
    put_num(o, "intermediate_size", moe_config_dense_ffn_dim(cfg));
    put_num(o, "decoder_sparse_step", m->moe_layer_step);
    cJSON *ol = cJSON_AddArrayToObject(o, "mlp_only_layers");
    for (int i = 0; i < m->dense_layer_ids.count; i++) cJSON_AddItemToArray(ol, cJSON_CreateNumber(m->dense_layer_ids.values[i]));
    if (!strcmp(fam, "qwen2_moe")) {
        cJSON_AddBoolToObject(o, "qkv_bias", m->qkv_bias);
        put_num(o, "shared_expert_intermediate_size", m->n_shared_experts ? m->shared_ffn_dim : 0);
    }
    cJSON_AddBoolToObject(o, "use_sliding_window", false);
}

/* Our config -> the family's config.json text (malloc'd) and the family's model_type.
 * model_type NULL: the family is chosen from the features. */
moe_status moe_hf_config_format(const moe_config *cfg, const char *model_type, char **text, const char **family) {
    const char *why = NULL, *fam = family_for(cfg, &why);
    if (!fam) return moe_error(MOE_ERR_UNSUPPORTED, "export: no Hugging Face family has %s", why);
    if (model_type && strcmp(model_type, fam))
        return moe_error(MOE_ERR_UNSUPPORTED, "export: the model's features are those of %s, not %s", fam, model_type);
    const moe_cfg_model *m = &cfg->model;
    static const char *const arch[][2] = {{"mixtral", "MixtralForCausalLM"}, {"olmoe", "OlmoeForCausalLM"},
                                          {"qwen2_moe", "Qwen2MoeForCausalLM"}, {"qwen3_moe", "Qwen3MoeForCausalLM"},
                                          {"deepseek_v3", "DeepseekV3ForCausalLM"}};
    cJSON *o = cJSON_CreateObject(), *a = cJSON_AddArrayToObject(o, "architectures");
    for (size_t i = 0; i < sizeof arch / sizeof *arch; i++)
        if (!strcmp(arch[i][0], fam)) cJSON_AddItemToArray(a, cJSON_CreateString(arch[i][1]));
    cJSON_AddStringToObject(o, "model_type", fam);
    cJSON_AddStringToObject(o, "hidden_act", "silu");
    put_num(o, "vocab_size", m->vocab_size);
    put_num(o, "hidden_size", m->d_model);
    put_num(o, "num_hidden_layers", m->n_layers);
    put_num(o, "num_attention_heads", m->n_heads);
    put_num(o, "num_key_value_heads", moe_config_kv_heads(cfg));
    if (m->head_dim && m->attention == MOE_CFG_ATTENTION_MHA) put_num(o, "head_dim", m->head_dim);
    put_num(o, !strcmp(fam, "mixtral") ? "num_local_experts" : !strcmp(fam, "deepseek_v3") ? "n_routed_experts" : "num_experts",
            m->n_experts);
    put_num(o, "num_experts_per_tok", m->top_k);
    put_num(o, "max_position_embeddings", m->seq_len);
    put_num(o, "rms_norm_eps", m->norm_eps);
    put_num(o, "initializer_range", m->init_std);
    put_num(o, "router_aux_loss_coef", cfg->router.aux_coef);
    cJSON_AddBoolToObject(o, "tie_word_embeddings", m->tie_embeddings);
    cJSON_AddBoolToObject(o, "norm_topk_prob", cfg->router.renormalize);
    cJSON_AddBoolToObject(o, "attention_bias", false);
    cJSON *rp = cJSON_AddObjectToObject(o, "rope_parameters");
    put_num(rp, "rope_theta", m->rope_theta);
    cJSON_AddStringToObject(rp, "rope_type", "default");
    write_family(o, cfg, fam);
    *text = cJSON_Print(o);
    cJSON_Delete(o);
    *family = fam;
    return *text ? MOE_OK : moe_error(MOE_ERR_OOM, "export: out of host memory");
}
