/* `moe convert`: a Hugging Face hub folder into our checkpoint, or back.
 *   moe convert DIR --out FILE.h5            the imported model as a checkpoint (step 0, no
 *                                            optimizer state) for eval, generate and
 *                                            logits --checkpoint, written block by block
 *                                            (one block's f32 masters on the host at a
 *                                            time); ends with the peak resident memory
 *   moe convert FILE.h5 --to-hf OUTDIR       config.json + model.safetensors (f32) of the
 *                                            nearest family (--family to choose); features
 *                                            no family can express are refused by name; a
 *                                            hub tokenizer (data.tokenizer: hf) comes along */
#include "moe/cli/commands.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/fileio.h"
#include "core/h5file.h"
#include "moe/cli/cli.h"
#include "moe/hf/safetensors.h"
#include "moe/cli/source.h"
#include "moe/hf/hf_model.h"
#include "moe/train/checkpoint.h"

typedef struct convert_flags {
    const char *out, *to_hf, *family;
} convert_flags;

/* The checkpoint's tokenizer: the folder's tokenizer.json (by absolute path), when it has one. */
static moe_status set_hub_tokenizer(moe_config *cfg, const char *dir) {
    char path[4096], abs[PATH_MAX];
    struct stat st;
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    if (stat(path, &st) != 0) return MOE_OK;
    if (!realpath(dir, abs)) return moe_error(MOE_ERR_IO, "%s: %s", dir, strerror(errno));
    if (strlen(abs) >= sizeof cfg->data.tokenizer_path)
        return moe_error(MOE_ERR_CONFIG, "%s: the path is too long for data.tokenizer_path", abs);
    cfg->data.tokenizer = MOE_CFG_TOKENIZER_HF;
    snprintf(cfg->data.tokenizer_path, sizeof cfg->data.tokenizer_path, "%s", abs);
    return MOE_OK;
}

/* The config of a model whose one block is layer `layer` of cfg's (dense or MoE, its
 * mixer); without `vocab` its embedding and head shrink to one row, as they are not
 * loaded there. */
static moe_config layer_window(const moe_config *cfg, int layer, bool vocab) {
    moe_config w = *cfg;
    moe_cfg_model *m = &w.model;
    m->mixer.values[0] = moe_config_layer_mixer(cfg, layer);
    m->mixer.count = 1;
    m->dense_layers = moe_config_layer_is_dense(cfg, layer);
    m->dense_layer_ids.count = 0;
    m->moe_layer_step = 1;
    m->n_layers = 1;
    if (!vocab) m->vocab_size = 1;
    return w;
}

/* Parameters of m's block 0 (and, with top, of the rest: embedding, final norm, head). */
static int64_t window_params(const moe_model *m, bool top) {
    int64_t n = moe_model_param_count(m, false);
    if (top) return n;
    moe_tensor *outer[] = {m->embed, m->final_norm, m->lm_head};
    for (size_t i = 0; i < sizeof outer / sizeof *outer; i++) n -= outer[i] ? moe_tensor_numel(outer[i]) : 0;
    return n;
}

/* One block at a time: a model holding only layer i (and, for i = 0, the embedding, final
 * norm and head) is initialised, filled from the mapped files, written and freed, so the
 * host holds one block's f32 masters at most. */
static moe_status stream_blocks(moe_hf_reader *r, moe_h5 *f, int64_t *n_params) {
    const moe_config *cfg = moe_hf_reader_config(r);
    *n_params = 0;
    for (int i = 0; i < cfg->model.n_layers; i++) {
        bool top = i == 0;
        moe_config w = layer_window(cfg, i, top);
        moe_model m;
        moe_status s = moe_model_init_for_load(&m, &w, 0, 1);
        if (s == MOE_OK && top) s = moe_hf_reader_load_top(r, &m);
        if (s == MOE_OK) s = moe_hf_reader_load_block(r, &m, 0, i);
        if (s == MOE_OK) s = moe_checkpoint_put_block(f, &m, i, top);
        if (s == MOE_OK) *n_params += window_params(&m, top);
        moe_model_free(&m);
        MOE_TRY(s);
    }
    return moe_hf_reader_finish(r);
}

/* "peak host memory X GiB = Y x the model's Z GiB": this process's peak resident set. */
static void print_peak_memory(int64_t model_bytes) {
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0 || model_bytes <= 0) return;
    double peak = (double)ru.ru_maxrss * 1024.0, gib = 1024.0 * 1024.0 * 1024.0;
    printf("peak host memory %.3g GiB = %.3g x the model's %.3g GiB\n", peak / gib, peak / (double)model_bytes,
           (double)model_bytes / gib);
}

/* The folder as a checkpoint at step 0 without optimizer state, block by block. */
static moe_status hub_to_checkpoint(const char *dir, const char *out) {
    moe_hf_reader *r = NULL;
    MOE_TRY(moe_hf_reader_open(dir, &r));
    moe_config cfg = *moe_hf_reader_config(r);
    moe_train_state ts;
    memset(&ts, 0, sizeof ts);
    moe_h5 *f = NULL;
    int64_t n_params = 0;
    moe_status s = set_hub_tokenizer(&cfg, dir);
    if (s == MOE_OK) s = moe_h5_create(out, &f);
    if (s == MOE_OK) s = moe_checkpoint_put_header(f, &cfg, NULL, &ts);
    if (s == MOE_OK) s = stream_blocks(r, f, &n_params);
    if (f) {
        if (s == MOE_OK) s = moe_h5_commit(f);
        else moe_h5_abort(f);
        if (s != MOE_OK) s = moe_error_context(s, "saving checkpoint %s", out);
    }
    if (s == MOE_OK) {
        printf("%s: %lld parameters from %s\n", out, (long long)n_params, dir);
        print_peak_memory(moe_hf_reader_bytes(r));
    }
    moe_hf_reader_close(r);
    return s;
}

/* A checkpoint with a hub tokenizer (data.tokenizer: hf) takes its files along. */
static moe_status copy_tokenizer(const moe_config *cfg, const char *dir) {
    static const char *const files[] = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                        "generation_config.json"};
    if (cfg->data.tokenizer != MOE_CFG_TOKENIZER_HF) return MOE_OK;
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        char from[4096], to[4096];
        snprintf(from, sizeof from, "%s/%s", cfg->data.tokenizer_path, files[i]);
        snprintf(to, sizeof to, "%s/%s", dir, files[i]);
        char *text = NULL;
        size_t len = 0;
        if (access(from, R_OK) != 0) continue;
        MOE_TRY(moe_cli_read_text(from, &text, &len));
        moe_atomic_file af;
        moe_status s = moe_atomic_open(&af, to, files[i]);
        if (s == MOE_OK) s = moe_atomic_close(&af, fwrite(text, 1, len, af.f) == len, files[i]);
        free(text);
        MOE_TRY(s);
    }
    return MOE_OK;
}

/* The source folder's bos/eos/pad ids into the exported config.json (transformers reads
 * them there; without them it takes the family's defaults, which may lie outside the
 * vocabulary). */
static moe_status copy_special_ids(const char *from_dir, const char *dir) {
    char from[4096], to[4096];
    snprintf(from, sizeof from, "%s/config.json", from_dir);
    snprintf(to, sizeof to, "%s/config.json", dir);
    char *a = moe_hf_read_text(from), *b = moe_hf_read_text(to);
    cJSON *src = a ? cJSON_Parse(a) : NULL, *dst = b ? cJSON_Parse(b) : NULL;
    free(a);
    free(b);
    static const char *const keys[] = {"bos_token_id", "eos_token_id", "pad_token_id"};
    for (size_t i = 0; src && dst && i < sizeof keys / sizeof *keys; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(src, keys[i]);
        if (v && !cJSON_IsNull(v)) cJSON_AddItemToObject(dst, keys[i], cJSON_Duplicate(v, true));
    }
    char *text = src && dst ? cJSON_Print(dst) : NULL;
    cJSON_Delete(src);
    cJSON_Delete(dst);
    if (!text) return MOE_OK; /* no source config.json: the export stands as written */
    moe_atomic_file af;
    moe_status s = moe_atomic_open(&af, to, "config.json");
    if (s == MOE_OK) s = moe_atomic_close(&af, fputs(text, af.f) >= 0, "config.json");
    free(text);
    return s;
}

static moe_status checkpoint_to_hub(const char *ckpt, const char *dir, const char *family) {
    if (mkdir(dir, 0777) != 0 && errno != EEXIST) return moe_error(MOE_ERR_IO, "cannot create %s: %s", dir, strerror(errno));
    moe_source src;
    MOE_TRY(moe_source_open(&src, &(moe_source_flags){.checkpoint = ckpt, .device = "cpu", .dtype = "f32"}, MOE_SOURCE_MODEL));
    moe_status s = moe_hf_export(&src.model, family, dir);
    if (s == MOE_OK) s = copy_tokenizer(&src.cfg, dir);
    if (s == MOE_OK && src.cfg.data.tokenizer == MOE_CFG_TOKENIZER_HF) s = copy_special_ids(src.cfg.data.tokenizer_path, dir);
    if (s == MOE_OK) printf("%s: config.json and model.safetensors from %s%s\n", dir, ckpt,
                            src.cfg.data.tokenizer == MOE_CFG_TOKENIZER_HF ? " (and the tokenizer)" : "");
    moe_source_close(&src);
    return s;
}

static moe_status run_convert(const char *in, const convert_flags *f) {
    struct stat st;
    if (stat(in, &st) != 0) return moe_error(MOE_ERR_IO, "convert: %s: %s", in, strerror(errno));
    if (S_ISDIR(st.st_mode)) {
        if (!f->out || f->to_hf)
            return moe_error(MOE_ERR_CONFIG, "convert: a hub folder (%s) converts with --out FILE.h5", in);
        return hub_to_checkpoint(in, f->out);
    }
    if (!f->to_hf || f->out)
        return moe_error(MOE_ERR_CONFIG, "convert: a checkpoint (%s) converts with --to-hf OUTDIR", in);
    return checkpoint_to_hub(in, f->to_hf, f->family);
}

int moe_cmd_convert(int argc, char **argv) {
    convert_flags f = {0};
    const moe_flag_spec specs[] = {
        {"--out", MOE_FLAG_STRING, "FILE", 0, 0, NULL, "hub folder -> this checkpoint (.h5)", &f.out},
        {"--to-hf", MOE_FLAG_STRING, "OUTDIR", 0, 0, NULL, "checkpoint -> a hub folder here (created when missing)",
         &f.to_hf},
        {"--family", MOE_FLAG_STRING, "T", 0, 0, "mixtral|olmoe|qwen2_moe|qwen3_moe|deepseek_v3",
         "--to-hf: the model_type to write", &f.family, .default_text = "the nearest family"},
        {0}};
    moe_args a;
    const char *usage = "moe convert DIR --out FILE.h5 | moe convert FILE.h5 --to-hf OUTDIR [--family T]";
    int rc = moe_cli_parse("convert", usage, specs, argc, argv, 1, 1, "the folder or checkpoint to convert is", &a);
    if (rc < 0) {
        moe_status s = run_convert(a.positional[0], &f);
        moe_args_free(&a);
        rc = s == MOE_OK ? 0 : moe_cli_fail(s);
    }
    return rc;
}
