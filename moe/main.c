/* The `moe` program: train, eval, generate, data prepare, tokenizer train, bench, inspect, config. */
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
#include "moe/cli/bench.h"
#include "moe/train/checkpoint.h"
#include "moe/cli/args.h"
#include "moe/model/config.h"
#include "moe/train/data.h"
#include "moe/infer/decoder.h"
#include "moe/model/model.h"
#include "moe/infer/sample.h"
#include "moe/serve/serve_cli.h"
#include "moe/train/signals.h"
#include "moe/model/tokenizer.h"
#include "moe/train/train.h"

static int fail(moe_status s) {
    fprintf(stderr, "moe: error (%s): %s\n", moe_status_name(s), moe_last_error());
    return s == MOE_ERR_INTERRUPTED ? 130 : s == MOE_ERR_CONFIG ? 2 : 1;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: moe <command> [options]   (moe <command> --help lists a command's flags)\n"
            "  train CONFIG.yaml [--set section.key=value ...] [--resume RUN_DIR] [--overwrite] [--quiet]\n"
            "  eval --checkpoint FILE [--data FILE] [--device cpu|cuda] [--dtype f32|bf16] [--set ...]\n"
            "  generate --checkpoint FILE [--prompt TEXT | --prompt-file F] [--tokens N] [--temperature T]\n"
            "           [--top-k K] [--top-p P] [--seed S] [--eos ID] [--device cpu|cuda] [--dtype f32|bf16] [--set ...]\n"
            "  data prepare --out DIR [--tokenizer byte|FILE.tok] [--val-fraction F] TEXT...\n"
            "  tokenizer train --vocab N --out FILE.tok TEXT...\n"
            "  bench CASE [--device cpu|cuda] [--dtype f32|bf16] [--warmup W] [--reps R] [--threads N]\n"
            "        [--scale S] [--json]   time a benchmark case (moe-layer-cpu, lm-step-cpu, moe-layer-gpu,\n"
            "        moe-layer-gpu-fine, lm-train-gpu, sgemm)\n"
            "  inspect FILE.h5 [--verify] list a checkpoint's contents and config (--verify: every CRC)\n"
            "  serve --model DIR | --checkpoint FILE [--host H] [--port P] [--max-batch N] [--max-tokens-in-flight M]\n"
            "        [--prefill-tokens P]   an OpenAI-compatible HTTP server with continuous batching\n"
            "  config CONFIG.yaml [--set ...]   print the effective config\n"
            "  help-config                every config key with its type, default and meaning\n"
            "  --version\n");
}

/* ---- flags (moe/cli/args.h) ---- */

/* Parses a command's flags and checks that it got lo..hi positional arguments (`what`
 * names them). Returns -1 to go on (the caller then owns *a: moe_args_free), else the
 * exit code: 0 after --help, 2 after a usage error (both printed). */
static int parse_command(const char *cmd, const char *usage_line, const moe_flag_spec *specs, int argc, char **argv,
                         int lo, int hi, const char *what, moe_args *a) {
    moe_status s = moe_args_parse(cmd, specs, argc, argv, a);
    if (s == MOE_OK && a->help) {
        moe_args_print_help(stdout, usage_line, specs);
        moe_args_free(a);
        return 0;
    }
    if (s == MOE_OK && a->n_positional > hi)
        s = moe_error(MOE_ERR_CONFIG, "%s: unexpected argument '%s' (moe %s --help lists the flags)", cmd,
                      a->positional[hi], cmd);
    else if (s == MOE_OK && a->n_positional < lo)
        s = moe_error(MOE_ERR_CONFIG, "%s: %s required (usage: %s)", cmd, what, usage_line);
    if (s == MOE_OK) return -1;
    if (a->positional) moe_args_free(a);
    return fail(s);
}

static moe_status apply_set_list(moe_config *cfg, const moe_arg_list *sets) {
    for (int i = 0; i < sets->n; i++) MOE_TRY(moe_config_set(cfg, sets->items[i]));
    return MOE_OK;
}

/* Reads a whole file ("-": standard input) into a malloc'd NUL-terminated buffer. */
static moe_status read_text(const char *path, char **text, size_t *len) {
    bool std_in = !strcmp(path, "-");
    FILE *f = std_in ? stdin : fopen(path, "rb");
    if (!f) return moe_error(MOE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    char *buf = NULL;
    size_t n = 0, cap = 0;
    moe_status s = MOE_OK;
    for (;;) {
        if (n + 1 >= cap) {
            size_t want = cap ? 2 * cap : 1 << 16;
            char *grown = realloc(buf, want);
            if (!grown) {
                s = moe_error(MOE_ERR_OOM, "out of memory reading %s (%zu bytes so far)", path, n);
                break;
            }
            buf = grown, cap = want;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0) break;
    }
    if (s == MOE_OK && ferror(f)) s = moe_error(MOE_ERR_IO, "error reading %s: %s", path, strerror(errno));
    if (!std_in) fclose(f);
    if (s != MOE_OK) {
        free(buf);
        return s;
    }
    buf[n] = '\0';
    *text = buf;
    *len = n;
    return MOE_OK;
}

/* Under mpirun every rank runs this; rank 0 prints. A failure on any rank ends every
 * rank (moe_dist_abort) with the message naming the failing rank; no rank is left waiting.
 * A stop signal ends the run with a checkpoint and exit status 128 + signal. */
static int run_train(const char *path, const moe_arg_list *sets, moe_train_options *o, moe_signal_watch *signals) {
    moe_config cfg;
    moe_status s = moe_config_load_file(&cfg, path);
    if (s == MOE_OK) s = apply_set_list(&cfg, sets);
    if (s == MOE_OK) s = moe_config_validate(&cfg);
    if (s == MOE_OK && o->resume_dir && o->overwrite)
        s = moe_error(MOE_ERR_CONFIG, "--overwrite starts a fresh run and cannot go with --resume");
    if (s == MOE_OK) s = moe_dist_init(NULL, NULL, cfg.parallel.expert_parallel);
    if (s != MOE_OK) {
        if (moe_dist_world_size() > 1) moe_dist_abort(s, moe_last_error());
        return fail(s);
    }
    bool root = moe_dist_is_root();
    moe_signal_watch_set_verbose(signals, root);
    if (root) {
        fprintf(stderr, "effective config:\n");
        moe_config_write(&cfg, stderr);
    }
    o->signals = signals;
    moe_train_summary sum;
    s = moe_train_run(&cfg, o, &sum);
    if (s != MOE_OK && s != MOE_ERR_INTERRUPTED && moe_dist_world_size() > 1) moe_dist_abort(s, moe_last_error());
    moe_dist_finalize();
    if (s == MOE_ERR_INTERRUPTED) {
        if (root) fail(s);
        return 128 + sum.stop_signal;
    }
    if (s != MOE_OK) return root ? fail(s) : 1;
    if (root) {
        printf("trained %lld steps: loss %.4f, val_loss %.4f, val_bpb %.4f (unigram %.4f), %.0f tokens/s, %lld skipped steps\n",
               (long long)sum.steps_done, sum.final_loss, sum.val_loss, sum.val_bpb, sum.unigram_bpb, sum.tokens_per_s,
               (long long)sum.bad_steps);
        printf("checkpoint: %s\n", sum.last_checkpoint);
    }
    return 0;
}

static int cmd_train(int argc, char **argv) {
    moe_signal_watch *signals = NULL; /* first: the threads MPI and OpenMP start inherit its mask */
    moe_status s = moe_signal_watch_start(&signals);
    if (s != MOE_OK) return fail(s);
    moe_arg_list sets = {0};
    moe_train_options o = {0};
    const moe_flag_spec specs[] = {
        {"--set", MOE_FLAG_MULTI, "KEY=VALUE", 0, 0, NULL, "override a config key (section.key=value)", &sets},
        {"--resume", MOE_FLAG_STRING, "RUN_DIR", 0, 0, NULL, "continue the run in RUN_DIR from its newest good checkpoint",
         &o.resume_dir},
        {"--overwrite", MOE_FLAG_BOOL, NULL, 0, 0, NULL,
         "start over in a checkpoint.dir that holds a run (deletes its checkpoints and metrics.jsonl)", &o.overwrite},
        {"--quiet", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "no progress line", &o.quiet},
        {0}};
    moe_args a;
    int rc = parse_command("train", "moe train CONFIG.yaml [--set section.key=value ...] [--resume RUN_DIR] [--overwrite] [--quiet]",
                           specs, argc, argv, 1, 1, "CONFIG.yaml is", &a);
    if (rc < 0) {
        rc = run_train(a.positional[0], &sets, &o, signals);
        moe_args_free(&a);
    }
    moe_arg_list_free(&sets);
    moe_signal_watch_stop(signals);
    return rc;
}

/* ---- commands that load a checkpoint: eval, generate ---- */

/* The flags of the commands that load a checkpoint. */
typedef struct model_flags {
    const char *checkpoint, *device, *dtype;
    moe_arg_list sets;
} model_flags;

#define MODEL_FLAG_SPECS(mf)                                                                                        \
    {"--checkpoint", MOE_FLAG_STRING, "FILE", 0, 0, NULL, "the checkpoint to load (required)", &(mf).checkpoint},    \
    {"--device", MOE_FLAG_STRING, "DEV", 0, 0, "cpu|cuda", "where to run (default: the checkpoint's train.device)",  \
     &(mf).device},                                                                                                 \
    {"--dtype", MOE_FLAG_STRING, "T", 0, 0, "f32|bf16", "compute dtype (default: the checkpoint's; f32 on the cpu)", \
     &(mf).dtype},                                                                                                  \
    {"--set", MOE_FLAG_MULTI, "KEY=VALUE", 0, 0, NULL, "override a key of the checkpoint's config", &(mf).sets}

/* --device / --dtype as config overrides. Without --dtype a cpu run computes in f32 (the
 * checkpoint holds f32 master weights; the CPU has no bf16 compute). */
static moe_status apply_device(moe_config *cfg, const model_flags *mf) {
    char set[64];
    if (mf->device) {
        snprintf(set, sizeof set, "train.device=%s", mf->device);
        MOE_TRY(moe_config_set(cfg, set));
    }
    if (mf->dtype) {
        snprintf(set, sizeof set, "train.dtype=%s", mf->dtype);
        return moe_config_set(cfg, set);
    }
    if (cfg->train.device == MOE_CFG_DEVICE_CPU) cfg->train.dtype = MOE_CFG_DTYPE_F32;
    return MOE_OK;
}

/* Builds a model from a checkpoint's stored config (with the flags' overrides) and loads it. */
static moe_status load_model(const model_flags *mf, moe_model *m, moe_config *cfg) {
    if (!mf->checkpoint) return moe_error(MOE_ERR_CONFIG, "--checkpoint FILE is required");
    char *text = NULL;
    MOE_TRY(moe_checkpoint_read_config(mf->checkpoint, &text));
    moe_status s = moe_config_load_text(cfg, text, mf->checkpoint);
    free(text);
    MOE_TRY(s);
    MOE_TRY(apply_device(cfg, mf));
    MOE_TRY(apply_set_list(cfg, &mf->sets));
    MOE_TRY(moe_config_validate(cfg));
    MOE_TRY(moe_model_init(m, cfg, 0, 1));
    moe_train_state ts;
    s = moe_checkpoint_load(mf->checkpoint, m, NULL, &ts);
    if (s != MOE_OK) moe_model_free(m);
    return s;
}

/* The tokenizer stored in the checkpoint, else the config's (its BPE file, or bytes);
 * refused when it has more tokens than the model. */
static moe_status load_tokenizer(const char *checkpoint, const moe_config *cfg, moe_tokenizer **tok) {
    MOE_TRY(moe_checkpoint_read_tokenizer(checkpoint, tok));
    if (!*tok && cfg->data.tokenizer == MOE_CFG_TOKENIZER_BPE) MOE_TRY(moe_tokenizer_load(cfg->data.tokenizer_path, tok));
    if (!*tok && !(*tok = moe_tokenizer_byte())) return moe_error(MOE_ERR_OOM, "out of memory making the byte tokenizer");
    if (moe_tokenizer_vocab_size(*tok) > cfg->model.vocab_size) {
        moe_status s = moe_error(MOE_ERR_CONFIG, "the tokenizer has %d tokens, the model's vocabulary %d",
                                 moe_tokenizer_vocab_size(*tok), cfg->model.vocab_size);
        moe_tokenizer_free(*tok);
        *tok = NULL;
        return s;
    }
    return MOE_OK;
}

/* A token file, or a text file tokenized with the checkpoint's tokenizer. */
static moe_status open_eval_data(const char *path, const char *checkpoint, const moe_config *cfg,
                                 moe_token_file **tf) {
    if (moe_data_is_token_file(path)) return moe_data_open(path, tf);
    moe_tokenizer *tok = NULL;
    MOE_TRY(load_tokenizer(checkpoint, cfg, &tok));
    moe_status s = moe_data_open_text(path, tok, tf);
    moe_tokenizer_free(tok);
    return s;
}

static moe_status run_eval(const model_flags *mf, const char *data) {
    moe_model m;
    moe_config cfg;
    MOE_TRY(load_model(mf, &m, &cfg));
    const char *path = data ? data : cfg.data.val_path;
    moe_token_file *val = NULL;
    moe_status s = open_eval_data(path, mf->checkpoint, &cfg, &val);
    if (s == MOE_OK && moe_data_vocab(val) > cfg.model.vocab_size)
        s = moe_error(MOE_ERR_CONFIG, "%s has a vocabulary of %d tokens, the model %d", path, moe_data_vocab(val),
                      cfg.model.vocab_size);
    double loss = 0, bpb = 0;
    if (s == MOE_OK) s = moe_evaluate(&m, val, cfg.train.eval_batches, &loss, &bpb);
    if (s == MOE_OK) {
        printf("val_loss %.4f  val_bpb %.4f", loss, bpb);
        if (moe_data_unigram_bpb(val) > 0) printf("  unigram_bpb %.4f", moe_data_unigram_bpb(val));
        printf("  (%d batches of %dx%d from %s)\n", cfg.train.eval_batches, cfg.data.batch_size, cfg.model.seq_len,
               path);
    }
    moe_data_close(val);
    moe_model_free(&m);
    return s;
}

static int cmd_eval(int argc, char **argv) {
    model_flags mf = {0};
    const char *data = NULL;
    const moe_flag_spec specs[] = {
        MODEL_FLAG_SPECS(mf),
        {"--data", MOE_FLAG_STRING, "FILE", 0, 0, NULL,
         "a token file (moe data prepare) or a text file (default: the config's data.val_path)", &data},
        {0}};
    moe_args a;
    int rc = parse_command("eval", "moe eval --checkpoint FILE [flags]", specs, argc, argv, 0, 0, NULL, &a);
    if (rc < 0) {
        moe_args_free(&a);
        moe_status s = run_eval(&mf, data);
        rc = s == MOE_OK ? 0 : fail(s);
    }
    moe_arg_list_free(&mf.sets);
    return rc;
}

/* One generation: the context (prompt, then the new tokens) and the part of it the
 * model's cache holds. */
typedef struct gen_run {
    moe_model *m;
    moe_decoder *dec;    /* the model's weights in its compute dtype */
    moe_decode_state *st; /* one sequence's cache, window tokens */
    const moe_tokenizer *tok;
    moe_sampler *sampler;
    int V;         /* tokens the sampler draws from: the tokenizer's */
    int window;    /* the model's context, model.seq_len */
    int32_t eos;   /* stop token, -1 for none */
    int32_t *ctx;  /* [prompt + new tokens] */
    int len;       /* tokens in ctx */
    int in_cache;  /* the last in_cache tokens of ctx are in the model's cache */
    int slides;    /* times the window was moved */
    float *logits; /* [model vocab], the logits after the last fed token */
} gen_run;

/* Starts the cache over with the last `keep` tokens of the context. */
static moe_status refill(gen_run *g, int keep) {
    MOE_TRY(moe_decode_state_seq_free(g->st, 0));
    moe_step_reset();
    MOE_TRY(moe_decoder_feed(g->dec, g->st, 0, g->ctx + g->len - keep, keep, g->logits));
    g->in_cache = keep;
    return MOE_OK;
}

/* Feeds the newest token: one step, or when the window is full, a refill with the last
 * half of it (the sliding window), said once on stderr. */
static moe_status advance(gen_run *g) {
    if (g->in_cache < g->window) {
        moe_step_reset();
        MOE_TRY(moe_decoder_feed(g->dec, g->st, 0, &g->ctx[g->len - 1], 1, g->logits));
        g->in_cache++;
        return MOE_OK;
    }
    int keep = g->window > 1 ? g->window / 2 : 1;
    if (g->slides++ == 0)
        fprintf(stderr, "generate: the model's context of %d tokens is full: it goes on from the last %d tokens "
                "(the cache recomputed each time the window fills)\n", g->window, keep);
    return refill(g, keep);
}

/* Draws up to n_new tokens after the prompt, writing each token's bytes to `out` as it
 * comes; stops early at the stop token (not written). */
static moe_status generate(gen_run *g, int n_new, FILE *out, int *made, bool *at_eos) {
    *made = 0;
    *at_eos = false;
    for (int i = 0; i < n_new; i++) {
        int32_t next;
        MOE_TRY(moe_sample(g->sampler, g->logits, g->V, &next));
        if (next == g->eos) {
            *at_eos = true;
            break;
        }
        g->ctx[g->len++] = next;
        size_t len = 0;
        const uint8_t *bytes = moe_tokenizer_token_bytes(g->tok, next, &len);
        fwrite(bytes, 1, len, out);
        fflush(out);
        ++*made;
        if (i + 1 < n_new) MOE_TRY(advance(g));
    }
    return MOE_OK;
}

typedef struct gen_flags {
    model_flags model;
    const char *prompt, *prompt_file;
    int tokens, eos;
    int64_t seed;
    moe_sampler sampler;
} gen_flags;

/* The prompt's tokens into g->ctx, with room for n_new more. */
static moe_status encode_prompt(const gen_flags *gf, gen_run *g, char **text, size_t *text_len) {
    if (gf->prompt_file) {
        MOE_TRY(read_text(gf->prompt_file, text, text_len));
    } else {
        const char *p = gf->prompt ? gf->prompt : "The ";
        if (!(*text = strdup(p))) return moe_error(MOE_ERR_OOM, "out of memory");
        *text_len = strlen(p);
    }
    moe_token_buf buf = {0};
    moe_status s = moe_tokenizer_encode(g->tok, *text, *text_len, &buf);
    if (s == MOE_OK && !buf.len) s = moe_error(MOE_ERR_INVALID, "the prompt is empty");
    if (s == MOE_OK && !(g->ctx = malloc(sizeof *g->ctx * (buf.len + (size_t)gf->tokens))))
        s = moe_error(MOE_ERR_OOM, "out of memory for %zu tokens", buf.len + (size_t)gf->tokens);
    if (s == MOE_OK) memcpy(g->ctx, buf.data, sizeof *g->ctx * buf.len);
    g->len = (int)buf.len;
    moe_token_buf_free(&buf);
    return s;
}

/* Generation after the model and tokenizer are loaded: prompt, tokens, timing line. */
static moe_status run_generation(const gen_flags *gf, moe_model *m, const moe_config *cfg, const moe_tokenizer *tok) {
    moe_sampler sp = gf->sampler;
    sp.seed = (uint64_t)gf->seed;
    gen_run g = {.m = m, .tok = tok, .sampler = &sp, .V = moe_tokenizer_vocab_size(tok), .window = cfg->model.seq_len,
                 .eos = gf->eos};
    if (g.eos >= g.V) return moe_error(MOE_ERR_CONFIG, "generate: --eos %d is not a token (the vocabulary has %d)", g.eos, g.V);
    char *text = NULL;
    size_t text_len = 0;
    moe_status s = encode_prompt(gf, &g, &text, &text_len);
    if (s == MOE_OK && !(g.logits = malloc(sizeof *g.logits * (size_t)cfg->model.vocab_size)))
        s = moe_error(MOE_ERR_OOM, "out of memory for the logits");
    if (s == MOE_OK) s = moe_decoder_open(m, m->compute, &g.dec);
    if (s == MOE_OK) s = moe_decode_state_create(g.dec, 1, g.window, &g.st);
    if (s == MOE_OK && g.len > g.window)
        fprintf(stderr, "generate: the prompt has %d tokens, the model's context %d: it sees the last %d\n", g.len,
                g.window, g.window);
    const double t0 = moe_clock_ms();
    if (s == MOE_OK) s = refill(&g, g.len < g.window ? g.len : g.window);
    const double t_prompt = moe_clock_ms();
    int made = 0;
    bool at_eos = false;
    if (s == MOE_OK) {
        fwrite(text, 1, text_len, stdout);
        s = generate(&g, gf->tokens, stdout, &made, &at_eos);
        printf("\n");
        fflush(stdout);
    }
    const double t_end = moe_clock_ms();
    if (s == MOE_OK && at_eos) fprintf(stderr, "generate: stopped at the end-of-sequence token %d\n", g.eos);
    /* the prompt in one forward; then per new token a sample and a forward */
    if (s == MOE_OK)
        fprintf(stderr, "generate: prompt of %d tokens in %.1f ms, %d new tokens in %.1f ms (%.1f tokens/s) on %s %s\n",
                g.len - made, t_prompt - t0, made, t_end - t_prompt, made > 0 ? 1e3 * made / (t_end - t_prompt) : 0.0,
                moe_device_name(m->dev), moe_dtype_name(m->compute));
    moe_decode_state_free(g.st);
    moe_decoder_close(g.dec);
    free(text);
    free(g.ctx);
    free(g.logits);
    return s;
}

static moe_status run_generate(const gen_flags *gf) {
    if (gf->prompt && gf->prompt_file) return moe_error(MOE_ERR_CONFIG, "generate: give --prompt or --prompt-file, not both");
    moe_model m;
    moe_config cfg;
    MOE_TRY(load_model(&gf->model, &m, &cfg));
    moe_tokenizer *tok = NULL;
    moe_status s = load_tokenizer(gf->model.checkpoint, &cfg, &tok);
    if (s == MOE_OK) s = run_generation(gf, &m, &cfg, tok);
    moe_tokenizer_free(tok);
    moe_model_free(&m);
    return s;
}

static int cmd_generate(int argc, char **argv) {
    gen_flags gf = {.tokens = 200, .eos = -1, .seed = 1, .sampler = {.temperature = 0.8, .top_k = 0, .top_p = 0.95}};
    const moe_flag_spec specs[] = {
        MODEL_FLAG_SPECS(gf.model),
        {"--prompt", MOE_FLAG_STRING, "TEXT", 0, 0, NULL, "the text to continue (default \"The \")", &gf.prompt},
        {"--prompt-file", MOE_FLAG_STRING, "F", 0, 0, NULL, "read the prompt from a file (- = standard input)",
         &gf.prompt_file},
        {"--tokens", MOE_FLAG_INT, "N", 1, 10000000, NULL, "new tokens to generate", &gf.tokens},
        {"--temperature", MOE_FLAG_DOUBLE, "T", 0, 100, NULL, "softmax temperature, 0 = greedy",
         &gf.sampler.temperature},
        {"--top-k", MOE_FLAG_INT, "K", 0, 1 << 24, NULL, "draw from the K most probable tokens, 0 = all",
         &gf.sampler.top_k},
        {"--top-p", MOE_FLAG_DOUBLE, "P", 0, 1, NULL, "draw from the smallest set holding mass P, 1 = all",
         &gf.sampler.top_p},
        {"--seed", MOE_FLAG_I64, "S", 0, 9007199254740992.0, NULL, "random seed of the draws", &gf.seed},
        {"--eos", MOE_FLAG_INT, "ID", -1, 1 << 24, NULL, "stop when this token is drawn, -1 = never", &gf.eos},
        {0}};
    moe_args a;
    int rc = parse_command("generate", "moe generate --checkpoint FILE [flags]", specs, argc, argv, 0, 0, NULL, &a);
    if (rc < 0) {
        moe_args_free(&a);
        moe_status s = run_generate(&gf);
        rc = s == MOE_OK ? 0 : fail(s);
    }
    moe_arg_list_free(&gf.model.sets);
    return rc;
}

/* ---- data prepare, tokenizer train ---- */

static int cmd_data(int argc, char **argv) {
    const char *usage_line = "moe data prepare --out DIR [flags] TEXT...";
    if (argc < 1 || strcmp(argv[0], "prepare")) {
        bool help = argc > 0 && (!strcmp(argv[0], "--help") || !strcmp(argv[0], "-h"));
        fprintf(help ? stdout : stderr, "usage: %s   (moe data prepare --help lists the flags)\n", usage_line);
        return help ? 0 : 2;
    }
    const char *out = NULL, *tk = "byte";
    double frac = 0.05;
    const moe_flag_spec specs[] = {
        {"--out", MOE_FLAG_STRING, "DIR", 0, 0, NULL, "where train.bin and val.bin go (required)", &out},
        {"--tokenizer", MOE_FLAG_STRING, "T", 0, 0, NULL, "byte, or a BPE file from moe tokenizer train", &tk},
        {"--val-fraction", MOE_FLAG_DOUBLE, "F", 0, 1, NULL, "share of the text kept for validation", &frac, true, true},
        {0}};
    moe_args a;
    int rc = parse_command("data prepare", usage_line, specs, argc - 1, argv + 1, 1, INT32_MAX, "one or more TEXT files are", &a);
    if (rc >= 0) return rc;
    moe_tokenizer *tok = NULL;
    moe_status s = out ? MOE_OK : moe_error(MOE_ERR_CONFIG, "data prepare: --out DIR is required");
    if (s == MOE_OK) s = !strcmp(tk, "byte") ? ((tok = moe_tokenizer_byte()) ? MOE_OK : moe_last_status()) : moe_tokenizer_load(tk, &tok);
    moe_data_summary sum;
    if (s == MOE_OK) s = moe_data_prepare(a.positional, a.n_positional, tok, frac, out, &sum);
    moe_tokenizer_free(tok);
    moe_args_free(&a);
    if (s != MOE_OK) return fail(s);
    printf("prepared %s: vocab %d, %llu train tokens, %llu val tokens, %.3f bytes/token, unigram baseline %.4f bits/byte\n",
           out, sum.vocab_size, (unsigned long long)sum.train_tokens, (unsigned long long)sum.val_tokens,
           sum.val_bytes_per_token, sum.unigram_bpb);
    return 0;
}

/* The text files concatenated into one malloc'd buffer. */
static moe_status read_texts(const char *const *paths, int n, char **text, size_t *len) {
    char *all = NULL;
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        char *one = NULL;
        size_t one_len = 0;
        moe_status s = read_text(paths[i], &one, &one_len);
        char *grown = s == MOE_OK ? realloc(all, total + one_len + 1) : NULL;
        if (s == MOE_OK && !grown) s = moe_error(MOE_ERR_OOM, "out of memory reading %s", paths[i]);
        if (s != MOE_OK) {
            free(one);
            free(all);
            return s;
        }
        all = grown;
        memcpy(all + total, one, one_len);
        total += one_len;
        all[total] = '\0';
        free(one);
    }
    *text = all;
    *len = total;
    return MOE_OK;
}

static moe_status run_tokenizer_train(const moe_args *a, int vocab, const char *out) {
    if (!out) return moe_error(MOE_ERR_CONFIG, "tokenizer train: --out FILE.tok is required");
    char *text = NULL;
    size_t len = 0;
    MOE_TRY(read_texts(a->positional, a->n_positional, &text, &len));
    moe_tokenizer *tok = NULL;
    moe_status s = len ? moe_tokenizer_train_bpe(text, len, vocab, &tok) : moe_error(MOE_ERR_INVALID, "tokenizer train: the text files are empty");
    free(text);
    if (s == MOE_OK) s = moe_tokenizer_save(tok, out);
    if (s == MOE_OK) printf("trained a BPE tokenizer with %d tokens: %s\n", moe_tokenizer_vocab_size(tok), out);
    moe_tokenizer_free(tok);
    return s;
}

static int cmd_tokenizer(int argc, char **argv) {
    const char *usage_line = "moe tokenizer train --vocab N --out FILE.tok TEXT...";
    if (argc < 1 || strcmp(argv[0], "train")) {
        bool help = argc > 0 && (!strcmp(argv[0], "--help") || !strcmp(argv[0], "-h"));
        fprintf(help ? stdout : stderr, "usage: %s   (moe tokenizer train --help lists the flags)\n", usage_line);
        return help ? 0 : 2;
    }
    const char *out = NULL;
    int vocab = 0;
    const moe_flag_spec specs[] = {
        {"--vocab", MOE_FLAG_INT, "N", 257, 1 << 24, NULL, "tokens: the 256 bytes and N - 256 merges (required)", &vocab},
        {"--out", MOE_FLAG_STRING, "FILE", 0, 0, NULL, "the tokenizer file to write (required)", &out},
        {0}};
    moe_args a;
    int rc = parse_command("tokenizer train", usage_line, specs, argc - 1, argv + 1, 1, INT32_MAX, "one or more TEXT files are", &a);
    if (rc >= 0) return rc;
    moe_status s = vocab ? run_tokenizer_train(&a, vocab, out) : moe_error(MOE_ERR_CONFIG, "tokenizer train: --vocab N is required");
    moe_args_free(&a);
    return s == MOE_OK ? 0 : fail(s);
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

/* The header line, the datasets and the stored config; the step, version and config
 * are read with their CRC checked, so a damaged value is an error, never shown. */
static moe_status inspect(const char *path) {
    moe_h5 *f = NULL;
    MOE_TRY(moe_h5_open(path, &f));
    int64_t step = 0;
    char *ver = NULL, *cfg = NULL, *run = NULL;
    moe_status s = moe_h5_get_i64(f, "step", &step);
    if (s == MOE_OK) s = moe_h5_get_string(f, "version", &ver);
    if (s == MOE_OK && moe_h5_has(f, "run_id")) s = moe_h5_get_string(f, "run_id", &run);
    if (s == MOE_OK) s = moe_h5_get_string(f, "config", &cfg);
    if (s == MOE_OK) printf("%s: step %lld, written by moe %s, run %s\n", path, (long long)step, ver, run ? run : "-");
    if (s == MOE_OK) s = moe_h5_list(f, "", print_dataset, f);
    if (s == MOE_OK) printf("config:\n%s", cfg);
    free(ver);
    free(run);
    free(cfg);
    moe_h5_close(f);
    return s;
}

static int cmd_inspect(int argc, char **argv) {
    bool verify = false;
    const moe_flag_spec specs[] = {
        {"--verify", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "read every dataset and check its CRC-32; exit 1 on damage", &verify},
        {0}};
    moe_args a;
    int rc = parse_command("inspect", "moe inspect CHECKPOINT.h5 [--verify]", specs, argc, argv, 1, 1,
                           "CHECKPOINT.h5 is", &a);
    if (rc >= 0) return rc;
    const char *path = a.positional[0];
    moe_status s = inspect(path);
    if (s == MOE_OK && verify) s = moe_checkpoint_verify(path);
    if (s == MOE_OK && verify) printf("verified: every dataset matches its CRC-32\n");
    moe_args_free(&a);
    return s == MOE_OK ? 0 : fail(s);
}

static int cmd_bench(int argc, char **argv) {
    const char *name = NULL;
    moe_bench_options o;
    moe_status s = moe_bench_parse_args(argc, argv, &name, &o);
    if (s == MOE_OK && o.help) return 0;
    if (s == MOE_OK) s = moe_bench_run(name, &o);
    return s == MOE_OK ? 0 : fail(s);
}

static int cmd_config(int argc, char **argv) {
    moe_arg_list sets = {0};
    const moe_flag_spec specs[] = {
        {"--set", MOE_FLAG_MULTI, "KEY=VALUE", 0, 0, NULL, "override a config key (section.key=value)", &sets}, {0}};
    moe_args a;
    int rc = parse_command("config", "moe config CONFIG.yaml [--set section.key=value ...]", specs, argc, argv, 1, 1,
                           "CONFIG.yaml is", &a);
    if (rc < 0) {
        moe_config cfg;
        moe_status s = moe_config_load_file(&cfg, a.positional[0]);
        if (s == MOE_OK) s = apply_set_list(&cfg, &sets);
        if (s == MOE_OK) s = moe_config_validate(&cfg);
        if (s == MOE_OK) moe_config_write(&cfg, stdout);
        rc = s == MOE_OK ? 0 : fail(s);
        moe_args_free(&a);
    }
    moe_arg_list_free(&sets);
    return rc;
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
    if (!strcmp(cmd, "serve")) return moe_cli_serve(argc - 2, argv + 2);
    fprintf(stderr, "moe: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
