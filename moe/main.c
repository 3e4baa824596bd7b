/* The `moe` program: train, eval, generate, data prepare, tokenizer train, inspect. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/dist.h"
#include "core/fileio.h"
#include "core/h5file.h"
#include "core/memory.h"
#include "core/version.h"
#include "moe/bench.h"
#include "moe/checkpoint.h"
#include "moe/config.h"
#include "moe/data.h"
#include "moe/model.h"
#include "moe/sample.h"
#include "moe/tokenizer.h"
#include "moe/train.h"

static int fail(moe_status s) {
    fprintf(stderr, "moe: error (%s): %s\n", moe_status_name(s), moe_last_error());
    return s == MOE_ERR_INTERRUPTED ? 130 : s == MOE_ERR_CONFIG ? 2 : 1;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: moe <command> [options]\n"
            "  train CONFIG.yaml [--set section.key=value ...] [--resume RUN_DIR] [--quiet]\n"
            "  eval --checkpoint FILE [--set ...]\n"
            "  generate --checkpoint FILE [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K]\n"
            "           [--top-p P] [--seed S] [--set ...]\n"
            "  data prepare --out DIR [--tokenizer byte|FILE.tok] [--val-fraction F] TEXT...\n"
            "  tokenizer train --vocab N --out FILE.tok TEXT...\n"
            "  bench CASE [--device cpu|cuda] [--dtype f32|bf16] [--warmup W] [--reps R] [--threads N]\n"
            "        [--scale S] [--json]   time a benchmark case (moe-layer-cpu, lm-step-cpu, moe-layer-gpu,\n"
            "        moe-layer-gpu-fine, lm-train-gpu, sgemm)\n"
            "  inspect FILE.h5            list a checkpoint's contents\n"
            "  config CONFIG.yaml [--set ...]   print the effective config\n"
            "  help-config                every config key with its type, default and meaning\n"
            "  --version\n");
}

/* Applies --set overrides (argv[i] == "--set" followed by the assignment). */
static moe_status apply_sets(moe_config *cfg, int argc, char **argv) {
    for (int i = 0; i < argc; i++)
        if (!strcmp(argv[i], "--set")) {
            if (i + 1 >= argc) return moe_error(MOE_ERR_CONFIG, "--set needs section.key=value");
            MOE_TRY(moe_config_set(cfg, argv[++i]));
        }
    return MOE_OK;
}

/* A config file with the command line's --set overrides, validated. */
static moe_status load_config(const char *path, int argc, char **argv, moe_config *cfg) {
    MOE_TRY(moe_config_load_file(cfg, path));
    MOE_TRY(apply_sets(cfg, argc, argv));
    return moe_config_validate(cfg);
}

static const char *opt_value(int argc, char **argv, const char *name, const char *dflt) {
    for (int i = 0; i + 1 < argc; i++)
        if (!strcmp(argv[i], name)) return argv[i + 1];
    return dflt;
}

static bool has_flag(int argc, char **argv, const char *name) {
    for (int i = 0; i < argc; i++)
        if (!strcmp(argv[i], name)) return true;
    return false;
}

/* Under mpirun every rank runs this; rank 0 prints. A failure on any rank ends every
 * rank (moe_dist_abort) with the message naming the failing rank; no rank is left waiting. */
static int cmd_train(int argc, char **argv) {
    if (argc < 1 || argv[0][0] == '-') {
        usage(stderr);
        return 2;
    }
    moe_config cfg;
    moe_status s = load_config(argv[0], argc, argv, &cfg);
    if (s == MOE_OK) s = moe_dist_init(NULL, NULL, cfg.parallel.expert_parallel);
    if (s != MOE_OK) {
        if (moe_dist_world_size() > 1) moe_dist_abort(s, moe_last_error());
        return fail(s);
    }
    bool root = moe_dist_is_root();
    if (root) {
        fprintf(stderr, "effective config:\n");
        moe_config_write(&cfg, stderr);
    }
    moe_train_options o = {.resume_dir = opt_value(argc, argv, "--resume", NULL), .quiet = has_flag(argc, argv, "--quiet")};
    moe_train_summary sum;
    s = moe_train_run(&cfg, &o, &sum);
    if (s != MOE_OK && s != MOE_ERR_INTERRUPTED && moe_dist_world_size() > 1) moe_dist_abort(s, moe_last_error());
    moe_dist_finalize();
    if (s != MOE_OK) return root ? fail(s) : 1;
    if (root) {
        printf("trained %lld steps: loss %.4f, val_loss %.4f, val_bpb %.4f (unigram %.4f), %.0f tokens/s, %lld skipped steps\n",
               (long long)sum.steps_done, sum.final_loss, sum.val_loss, sum.val_bpb, sum.unigram_bpb, sum.tokens_per_s,
               (long long)sum.bad_steps);
        printf("checkpoint: %s\n", sum.last_checkpoint);
    }
    return 0;
}

/* Builds a model from a checkpoint's stored config (with --set overrides) and loads it. */
static moe_status load_model(int argc, char **argv, moe_model *m, moe_config *cfg) {
    const char *ck = opt_value(argc, argv, "--checkpoint", NULL);
    if (!ck) return moe_error(MOE_ERR_CONFIG, "--checkpoint FILE is required");
    char *text = NULL;
    MOE_TRY(moe_checkpoint_read_config(ck, &text));
    moe_status s = moe_config_load_text(cfg, text, ck);
    free(text);
    MOE_TRY(s);
    MOE_TRY(apply_sets(cfg, argc, argv));
    MOE_TRY(moe_config_validate(cfg));
    MOE_TRY(moe_model_init(m, cfg, 0, 1));
    moe_train_state ts;
    return moe_checkpoint_load(ck, m, NULL, &ts);
}

static int cmd_eval(int argc, char **argv) {
    moe_model m;
    moe_config cfg;
    moe_status s = load_model(argc, argv, &m, &cfg);
    moe_token_file *val = NULL;
    if (s == MOE_OK) s = moe_data_open(cfg.data.val_path, &val);
    double loss = 0, bpb = 0;
    if (s == MOE_OK) s = moe_evaluate(&m, val, cfg.train.eval_batches, &loss, &bpb);
    if (s != MOE_OK) return fail(s);
    printf("val_loss %.4f  val_bpb %.4f  unigram_bpb %.4f  (%d batches of %dx%d from %s)\n", loss, bpb,
           moe_data_unigram_bpb(val), cfg.train.eval_batches, cfg.data.batch_size, cfg.model.seq_len, cfg.data.val_path);
    moe_data_close(val);
    moe_model_free(&m);
    return 0;
}

static moe_status make_tokenizer(const moe_config *cfg, moe_tokenizer **tok) {
    if (cfg->data.tokenizer == MOE_CFG_TOKENIZER_BPE) return moe_tokenizer_load(cfg->data.tokenizer_path, tok);
    *tok = moe_tokenizer_byte();
    return *tok ? MOE_OK : moe_last_status();
}

static int cmd_generate(int argc, char **argv) {
    moe_model m;
    moe_config cfg;
    moe_tokenizer *tok = NULL;
    moe_status s = load_model(argc, argv, &m, &cfg);
    if (s == MOE_OK) s = make_tokenizer(&cfg, &tok);
    if (s != MOE_OK) return fail(s);
    const char *prompt = opt_value(argc, argv, "--prompt", "The ");
    int n_new = atoi(opt_value(argc, argv, "--tokens", "200"));
    moe_sampler sp = {.temperature = atof(opt_value(argc, argv, "--temperature", "0.8")),
                      .top_k = atoi(opt_value(argc, argv, "--top-k", "0")),
                      .top_p = atof(opt_value(argc, argv, "--top-p", "0.95")),
                      .seed = strtoull(opt_value(argc, argv, "--seed", "1"), NULL, 10)};
    moe_token_buf buf = {0};
    s = moe_tokenizer_encode(tok, prompt, strlen(prompt), &buf);
    if (s == MOE_OK && buf.len == 0) s = moe_error(MOE_ERR_INVALID, "the prompt is empty");
    int cap = cfg.model.seq_len;
    if (s == MOE_OK && (int)buf.len >= cap) s = moe_error(MOE_ERR_INVALID, "the prompt has %zu tokens; the model's context is %d", buf.len, cap);
    if (s == MOE_OK && (int)buf.len + n_new > cap) n_new = cap - (int)buf.len;
    if (s == MOE_OK) s = moe_model_cache_reset(&m, 1, cap);
    int V = cfg.model.vocab_size;
    float *logits = malloc(sizeof(float) * (size_t)V);
    double t0 = moe_clock_ms();
    if (s == MOE_OK) {
        moe_step_reset();
        s = moe_model_step_logits(&m, buf.data, 1, (int)buf.len, logits);
    }
    if (s != MOE_OK) return fail(s);
    const double t_prompt = moe_clock_ms();
    fwrite(prompt, 1, strlen(prompt), stdout);
    int made = 0;
    for (int i = 0; i < n_new && s == MOE_OK; i++, made++) {
        int32_t next = moe_sample(&sp, logits, V);
        size_t len = 0;
        const uint8_t *bytes = moe_tokenizer_token_bytes(tok, next, &len);
        if (bytes) fwrite(bytes, 1, len, stdout);
        fflush(stdout);
        moe_step_reset();
        if (i + 1 < n_new) s = moe_model_step_logits(&m, &next, 1, 1, logits);
    }
    printf("\n");
    const double t_end = moe_clock_ms();
    /* the prompt in one forward; then per new token a sample and a forward */
    fprintf(stderr, "generate: prompt of %zu tokens in %.1f ms, %d new tokens in %.1f ms (%.1f tokens/s) on %s %s\n",
            buf.len, t_prompt - t0, made, t_end - t_prompt, made > 0 ? 1e3 * made / (t_end - t_prompt) : 0.0,
            moe_device_name(m.dev), moe_dtype_name(m.compute));
    free(logits);
    moe_token_buf_free(&buf);
    moe_tokenizer_free(tok);
    moe_model_free(&m);
    return s == MOE_OK ? 0 : fail(s);
}

static int cmd_data(int argc, char **argv) {
    if (argc < 1 || strcmp(argv[0], "prepare")) {
        usage(stderr);
        return 2;
    }
    const char *out = opt_value(argc, argv, "--out", NULL), *tk = opt_value(argc, argv, "--tokenizer", "byte");
    double frac = atof(opt_value(argc, argv, "--val-fraction", "0.05"));
    const char *inputs[64];
    int n = 0;
    for (int i = 1; i < argc && n < 64; i++) {
        if (argv[i][0] == '-' && argv[i][1] == '-') {
            i++;
            continue;
        }
        inputs[n++] = argv[i];
    }
    if (!out || n == 0) {
        usage(stderr);
        return 2;
    }
    moe_tokenizer *tok = NULL;
    moe_status s = !strcmp(tk, "byte") ? ((tok = moe_tokenizer_byte()) ? MOE_OK : moe_last_status()) : moe_tokenizer_load(tk, &tok);
    moe_data_summary sum;
    if (s == MOE_OK) s = moe_data_prepare(inputs, n, tok, frac, out, &sum);
    moe_tokenizer_free(tok);
    if (s != MOE_OK) return fail(s);
    printf("prepared %s: vocab %d, %llu train tokens, %llu val tokens, %.3f bytes/token, unigram baseline %.4f bits/byte\n",
           out, sum.vocab_size, (unsigned long long)sum.train_tokens, (unsigned long long)sum.val_tokens,
           sum.val_bytes_per_token, sum.unigram_bpb);
    return 0;
}

static int cmd_tokenizer(int argc, char **argv) {
    const char *out = opt_value(argc, argv, "--out", NULL);
    int vocab = atoi(opt_value(argc, argv, "--vocab", "0"));
    if (argc < 1 || strcmp(argv[0], "train") || !out || vocab <= 256) {
        usage(stderr);
        return 2;
    }
    /* Concatenate the text files. */
    char *text = NULL;
    size_t len = 0;
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] == '-' && argv[i][1] == '-') {
            i++;
            continue;
        }
        FILE *f = fopen(argv[i], "rb");
        if (!f) return fail(moe_error(MOE_ERR_IO, "cannot open %s: %s", argv[i], strerror(errno)));
        fseek(f, 0, SEEK_END);
        long sz = ftell(f);
        fseek(f, 0, SEEK_SET);
        text = realloc(text, len + (size_t)sz + 1);
        size_t got = fread(text + len, 1, (size_t)sz, f);
        fclose(f);
        len += got;
    }
    if (!len) return fail(moe_error(MOE_ERR_INVALID, "tokenizer train: no text given"));
    moe_tokenizer *tok = NULL;
    moe_status s = moe_tokenizer_train_bpe(text, len, vocab, &tok);
    free(text);
    if (s == MOE_OK) s = moe_tokenizer_save(tok, out);
    if (s != MOE_OK) return fail(s);
    printf("trained a BPE tokenizer with %d tokens: %s\n", moe_tokenizer_vocab_size(tok), out);
    moe_tokenizer_free(tok);
    return 0;
}

static moe_status print_dataset(const char *name, void *user) {
    moe_h5 *f = user;
    moe_h5_dtype dt;
    int nd = 0;
    int64_t shape[MOE_H5_MAX_NDIM];
    if (moe_h5_shape(f, name, &dt, &nd, shape) != MOE_OK) { /* not an array: a text dataset */
        char *text = NULL;
        MOE_TRY(moe_h5_get_string(f, name, &text));
        printf("  %-48s text (%zu bytes)\n", name, strlen(text));
        free(text);
        return MOE_OK;
    }
    printf("  %-48s %s [", name, moe_h5_dtype_name(dt));
    for (int i = 0; i < nd; i++) printf(i ? ", %lld" : "%lld", (long long)shape[i]);
    printf("]\n");
    return MOE_OK;
}

static int cmd_inspect(int argc, char **argv) {
    if (argc < 1) {
        usage(stderr);
        return 2;
    }
    moe_h5 *f = NULL;
    moe_status s = moe_h5_open(argv[0], &f);
    if (s != MOE_OK) return fail(s);
    int64_t step = 0;
    char *ver = NULL;
    moe_h5_get_i64(f, "step", &step);
    moe_h5_get_string(f, "version", &ver);
    printf("%s: step %lld, written by moe %s\n", argv[0], (long long)step, ver ? ver : "?");
    free(ver);
    s = moe_h5_list(f, "", print_dataset, f);
    moe_h5_close(f);
    return s == MOE_OK ? 0 : fail(s);
}

static int cmd_bench(int argc, char **argv) {
    const char *name = NULL;
    moe_bench_options o;
    moe_status s = moe_bench_parse_args(argc, argv, &name, &o);
    if (s == MOE_OK) s = moe_bench_run(name, &o);
    return s == MOE_OK ? 0 : fail(s);
}

static int cmd_config(int argc, char **argv) {
    if (argc < 1) {
        usage(stderr);
        return 2;
    }
    moe_config cfg;
    moe_status s = load_config(argv[0], argc, argv, &cfg);
    if (s != MOE_OK) return fail(s);
    moe_config_write(&cfg, stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--version") || !strcmp(cmd, "version")) {
        moe_version_print(stdout);
        return 0;
    }
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(cmd, "help-config")) {
        moe_config_print_help(stdout);
        return 0;
    }
    if (!strcmp(cmd, "train")) return cmd_train(argc - 2, argv + 2);
    if (!strcmp(cmd, "eval")) return cmd_eval(argc - 2, argv + 2);
    if (!strcmp(cmd, "generate")) return cmd_generate(argc - 2, argv + 2);
    if (!strcmp(cmd, "data")) return cmd_data(argc - 2, argv + 2);
    if (!strcmp(cmd, "tokenizer")) return cmd_tokenizer(argc - 2, argv + 2);
    if (!strcmp(cmd, "inspect")) return cmd_inspect(argc - 2, argv + 2);
    if (!strcmp(cmd, "config")) return cmd_config(argc - 2, argv + 2);
    if (!strcmp(cmd, "bench")) return cmd_bench(argc - 2, argv + 2);
    fprintf(stderr, "moe: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
