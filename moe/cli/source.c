/* Opening a hub folder or a checkpoint for a command (see source.h). */
#include "moe/cli/source.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <time.h>

#include "moe/cli/cli.h"
#include "moe/hf/hf_model.h"
#include "moe/model/weights.h"

/* --device / --dtype (either may be NULL) as config overrides, then where decoders run.
 * Without --dtype a cpu run computes in f32 (the CPU has no bf16 compute), a cuda one in
 * bf16; the config's validation refuses bf16 on the cpu. */
static moe_status apply_device(moe_config *cfg, const char *device, const char *dtype, moe_device *dev, moe_dtype *dt) {
    char set[64];
    if (device) {
        snprintf(set, sizeof set, "train.device=%s", device);
        MOE_TRY(moe_config_set(cfg, set));
    }
    if (dtype) {
        snprintf(set, sizeof set, "train.dtype=%s", dtype);
        MOE_TRY(moe_config_set(cfg, set));
    } else {
        cfg->train.dtype = cfg->train.device == MOE_CFG_DEVICE_CPU ? MOE_CFG_DTYPE_F32 : MOE_CFG_DTYPE_BF16;
    }
    *dev = cfg->train.device == MOE_CFG_DEVICE_CUDA ? MOE_CUDA : MOE_CPU;
    *dt = cfg->train.dtype == MOE_CFG_DTYPE_BF16 ? MOE_BF16 : MOE_F32;
    return MOE_OK;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The *.safetensors files of dir (0 when it cannot be read). */
static int count_shards(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) {
        size_t len = strlen(e->d_name), ext = strlen(".safetensors");
        n += len > ext && strcmp(e->d_name + len - ext, ".safetensors") == 0;
    }
    closedir(d);
    return n;
}

double moe_source_load_begin(const char *path, bool hub) {
    if (hub) {
        int shards = count_shards(path);
        fprintf(stderr, "moe: loading %s (hub folder, %d shard%s) ...\n", path, shards, shards == 1 ? "" : "s");
    } else {
        fprintf(stderr, "moe: loading %s (checkpoint) ...\n", path);
    }
    return now_s();
}

void moe_source_load_end(const moe_model *m, double started) {
    int64_t n = moe_model_param_count(m, false);
    double secs = now_s() - started;
    if (n >= 1000000000) fprintf(stderr, "moe: loaded %.2f B parameters in %.1f s\n", (double)n / 1e9, secs);
    else if (n >= 1000000) fprintf(stderr, "moe: loaded %.2f M parameters in %.1f s\n", (double)n / 1e6, secs);
    else fprintf(stderr, "moe: loaded %lld parameters in %.1f s\n", (long long)n, secs);
}

/* cfg as the master weights' config: on the host in f32. */
static moe_config host_config(const moe_config *cfg) {
    moe_config h = *cfg;
    h.train.device = MOE_CFG_DEVICE_CPU;
    h.train.dtype = MOE_CFG_DTYPE_F32;
    return h;
}

/* ---- our checkpoints ---- */

static moe_status checkpoint_config(moe_source *src, const moe_source_flags *f) {
    char *text = NULL;
    MOE_TRY(moe_checkpoint_read_config(f->checkpoint, &text));
    moe_status s = moe_config_load_text(&src->cfg, text, f->checkpoint);
    free(text);
    MOE_TRY(s);
    MOE_TRY(apply_device(&src->cfg, f->device, f->dtype, &src->dev, &src->dtype));
    MOE_TRY(moe_cli_apply_sets(&src->cfg, &f->sets));
    return moe_config_validate(&src->cfg);
}

static void hub_sampling(moe_source *src, const moe_hf_info *info);

/* data.tokenizer: hf: the hub folder's tokenizer, end ids and sampling (a checkpoint made
 * by moe convert or by training from model.init_from). */
static moe_status checkpoint_hub_text(moe_source *src) {
    const char *dir = src->cfg.data.tokenizer_path;
    moe_config hub_cfg;
    moe_hf_info info;
    if (moe_hf_config_read(dir, &hub_cfg, &info) == MOE_OK) {
        for (int i = 0; i < info.n_eos && src->n_eos < SERVE_MAX_EOS; i++) src->eos[src->n_eos++] = info.eos_ids[i];
        hub_sampling(src, &info);
    }
    src->has_text = true;
    MOE_TRY(serve_text_open_hf(&src->text, dir, src->eos, src->n_eos));
    if (src->text.vocab > src->cfg.model.vocab_size)
        return moe_error(MOE_ERR_CONFIG, "%s: the tokenizer has %d tokens, the model's vocabulary %d", dir,
                         src->text.vocab, src->cfg.model.vocab_size);
    return MOE_OK;
}

/* The tokenizer stored in the checkpoint, else the config's BPE file or hub folder, else
 * bytes; refused when it has more tokens than the model. */
static moe_status checkpoint_text(moe_source *src, unsigned parts) {
    if (src->cfg.data.tokenizer == MOE_CFG_TOKENIZER_HF) return checkpoint_hub_text(src);
    moe_tokenizer *tok = NULL;
    MOE_TRY(moe_checkpoint_read_tokenizer(src->name, &tok));
    if (!tok && src->cfg.data.tokenizer == MOE_CFG_TOKENIZER_BPE) MOE_TRY(moe_tokenizer_load(src->cfg.data.tokenizer_path, &tok));
    if (!tok && !(tok = moe_tokenizer_byte())) return moe_error(MOE_ERR_OOM, "out of memory making the byte tokenizer");
    if (moe_tokenizer_vocab_size(tok) > src->cfg.model.vocab_size && !(parts & MOE_SOURCE_TEXT)) {
        moe_tokenizer_free(tok); /* TEXT_IF_ANY: a model of fewer ids than bytes (e.g. moe data mqar's) has no text */
        return MOE_OK;
    }
    if (moe_tokenizer_vocab_size(tok) > src->cfg.model.vocab_size) {
        moe_status s = moe_error(MOE_ERR_CONFIG, "%s: the tokenizer has %d tokens, the model's vocabulary %d", src->name,
                                 moe_tokenizer_vocab_size(tok), src->cfg.model.vocab_size);
        moe_tokenizer_free(tok);
        return s;
    }
    src->has_text = true;
    return serve_text_open_own(&src->text, tok, -1);
}

static moe_status open_checkpoint(moe_source *src, const moe_source_flags *f, unsigned parts) {
    src->sampling = (moe_sampler){.temperature = 0.8, .top_p = 0.95};
    MOE_TRY(checkpoint_config(src, f));
    if (parts & MOE_SOURCE_MODEL) {
        moe_config host = host_config(&src->cfg);
        double t0 = moe_source_load_begin(f->checkpoint, false);
        MOE_TRY(moe_model_init_for_load(&src->model, &host, 0, 1)); /* the weights below fill every parameter */
        src->has_model = true;
        MOE_TRY(moe_checkpoint_load_weights(f->checkpoint, &src->model));
        moe_source_load_end(&src->model, t0);
    }
    if (parts & (MOE_SOURCE_TEXT | MOE_SOURCE_TEXT_IF_ANY)) MOE_TRY(checkpoint_text(src, parts));
    return MOE_OK;
}

/* ---- hub folders ---- */

/* --set on a hub model: anything but the model.* keys config.json fixes (seq_len apart). */
static moe_status hub_sets(moe_source *src, const moe_source_flags *f) {
    moe_cfg_model before = src->cfg.model;
    MOE_TRY(moe_cli_apply_sets(&src->cfg, &f->sets));
    moe_cfg_model after = src->cfg.model;
    after.seq_len = before.seq_len;
    if (memcmp(&before, &after, sizeof before))
        return moe_error(MOE_ERR_CONFIG, "--set: the model.* keys of %s come from its config.json (only model.seq_len "
                                         "may be set)", src->name);
    return moe_config_validate(&src->cfg);
}

static void hub_sampling(moe_source *src, const moe_hf_info *info) {
    const moe_hf_sampling *g = &info->sampling;
    src->sampling = (moe_sampler){.temperature = g->do_sample ? g->temperature : 0, .top_k = g->top_k, .top_p = g->top_p};
}

static bool has_file(const char *dir, const char *name) {
    char path[4096];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return stat(path, &st) == 0;
}

static moe_status hub_text(moe_source *src, unsigned parts) {
    if (!(parts & MOE_SOURCE_TEXT) && !has_file(src->name, "tokenizer.json")) return MOE_OK;
    src->has_text = true;
    MOE_TRY(serve_text_open_hf(&src->text, src->name, src->eos, src->n_eos));
    if (src->has_model && src->text.vocab > src->cfg.model.vocab_size)
        return moe_error(MOE_ERR_CONFIG, "%s: the tokenizer has %d tokens, the model's vocabulary %d", src->name,
                         src->text.vocab, src->cfg.model.vocab_size);
    return MOE_OK;
}

static moe_status open_hub(moe_source *src, const moe_source_flags *f, unsigned parts) {
    moe_hf_info info;
    if (parts & MOE_SOURCE_MODEL) {
        double t0 = moe_source_load_begin(src->name, true);
        MOE_TRY(moe_hf_load(src->name, &src->model, &info));
        src->has_model = true;
        moe_source_load_end(&src->model, t0);
        src->cfg = src->model.cfg;
    } else if (has_file(src->name, "config.json")) {
        MOE_TRY(moe_hf_config_read(src->name, &src->cfg, &info));
    } else { /* the tokenizer alone */
        moe_config_defaults(&src->cfg);
        info = (moe_hf_info){.bos_id = -1};
    }
    for (int i = 0; i < info.n_eos && src->n_eos < SERVE_MAX_EOS; i++) src->eos[src->n_eos++] = info.eos_ids[i];
    hub_sampling(src, &info);
    src->cfg.train.device = MOE_CFG_DEVICE_CPU; /* the flags' default */
    MOE_TRY(apply_device(&src->cfg, f->device, f->dtype, &src->dev, &src->dtype));
    MOE_TRY(hub_sets(src, f));
    if (src->has_model) src->model.cfg = host_config(&src->cfg);
    if (parts & (MOE_SOURCE_TEXT | MOE_SOURCE_TEXT_IF_ANY)) MOE_TRY(hub_text(src, parts));
    return MOE_OK;
}

moe_status moe_source_open(moe_source *src, const moe_source_flags *f, unsigned parts) {
    memset(src, 0, sizeof *src);
    if (!f->model_dir == !f->checkpoint) return moe_error(MOE_ERR_CONFIG, "give --model DIR or --checkpoint FILE (one of them)");
    src->hub = f->model_dir != NULL;
    src->name = src->hub ? f->model_dir : f->checkpoint;
    struct stat st;
    moe_status s = MOE_OK;
    if (stat(src->name, &st) != 0)
        s = moe_error(MOE_ERR_IO, "%s: no such %s", src->name, src->hub ? "folder" : "file");
    else if (src->hub && !S_ISDIR(st.st_mode))
        s = moe_error(MOE_ERR_CONFIG, "--model %s: not a folder (a checkpoint file goes with --checkpoint)", src->name);
    else if (!src->hub && S_ISDIR(st.st_mode))
        s = moe_error(MOE_ERR_CONFIG, "--checkpoint %s: a folder (a hub folder goes with --model)", src->name);
    if (s == MOE_OK) s = src->hub ? open_hub(src, f, parts) : open_checkpoint(src, f, parts);
    if (s != MOE_OK) moe_source_close(src);
    return s;
}

void moe_source_close(moe_source *src) {
    if (src->has_text) serve_text_close(&src->text);
    if (src->has_model) moe_model_free(&src->model);
    src->has_text = src->has_model = false;
}

moe_status moe_source_placement(const char *device, const char *dtype, moe_device *dev, moe_dtype *dt) {
    moe_config c;
    MOE_TRY(moe_config_defaults(&c));
    c.train.device = MOE_CFG_DEVICE_CPU;
    MOE_TRY(apply_device(&c, device, dtype, dev, dt));
    return moe_config_validate(&c);
}

moe_expert_path moe_cli_expert_path(const char *name) {
    if (name && !strcmp(name, "grouped")) return MOE_EXPERT_PATH_GROUPED;
    if (name && !strcmp(name, "gathered")) return MOE_EXPERT_PATH_GATHERED;
    if (name && !strcmp(name, "sorted")) return MOE_EXPERT_PATH_SORTED;
    return MOE_EXPERT_PATH_AUTO;
}

moe_status moe_source_decoder_open(moe_source *src, moe_decoder **out) {
    return moe_decoder_open_on(&src->model, src->dev, src->dtype, out);
}

int moe_source_vocab(const moe_source *src) { return src->has_text ? src->text.vocab : src->cfg.model.vocab_size; }
