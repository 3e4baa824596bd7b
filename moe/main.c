/* The `moe` program: train, eval, generate, data prepare, tokenizer train, bench, inspect, config. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/autograd.h"
#include "core/dist.h"
#include "core/fileio.h"
#include "core/h5file.h"
#include "core/memory.h"
#include "core/version.h"
#include "moe/cli/bench.h"
#include "moe/cli/offload.h"
#include "moe/train/checkpoint.h"
#include "moe/cli/args.h"
#include "moe/cli/cli.h"
#include "moe/cli/commands.h"
#include "moe/cli/init_from.h"
#include "moe/cli/data_mqar.h"
#include "moe/cli/routing.h"
#include "moe/model/config.h"
#include "moe/train/data.h"
#include "moe/infer/decoder.h"
#include "moe/model/model.h"
#include "moe/infer/sample.h"
#include "moe/serve/serve_cli.h"
#include "moe/train/signals.h"
#include "moe/model/tokenizer.h"
#include "moe/train/train.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: moe <command> [options]   (moe <command> --help lists a command's flags)\n"
            "  train CONFIG.yaml [--set section.key=value ...] [--resume RUN_DIR] [--overwrite] [--quiet]\n"
            "  (MODEL: --model DIR, a Hugging Face hub folder, or --checkpoint FILE, one of ours)\n"
            "  eval MODEL [--data FILE] [--device cpu|cuda] [--dtype f32|bf16] [--set ...]\n"
            "  generate MODEL [--prompt TEXT | --prompt-file F | --prompt-ids 5,17,42] [--chat] [--tokens N]\n"
            "           [--temperature T] [--top-k K] [--top-p P] [--seed S] [--eos ID] [--ignore-eos] [--print-ids]\n"
            "           [--device cpu|cuda] [--dtype f32|bf16] [--set ...]\n"
            "           [--offload --gpu-memory SIZE [--policy predict|lru|lfu|resident|cpu|auto] [--predictor P.h5]\n"
            "           [--verbose]]   routed experts in host memory, a device expert cache of the budget\n"
            "  tokenize MODEL --text TEXT | --decode 5,17,42 | --chat JSON   ids of a text, or the text of ids\n"
            "  logits MODEL --prompt-ids 5,17,42 [--out FILE.safetensors]   the logits of every position\n"
            "  convert DIR --out FILE.h5 | convert FILE.h5 --to-hf OUTDIR   hub folder <-> our checkpoint\n"
            "  data prepare --out DIR [--tokenizer byte|FILE.tok] [--val-fraction F] TEXT...\n"
            "  data mqar --out DIR --seq-len T --pairs P [--vocab V] [--train N] [--val M] [--seed S]   recall task\n"
            "  tokenizer train --vocab N --out FILE.tok TEXT...\n"
            "  bench CASE [--device cpu|cuda] [--dtype f32|bf16] [--warmup W] [--reps R] [--threads N]\n"
            "        [--scale S] [--json]   time a benchmark case (moe-layer-cpu, lm-step-cpu, moe-layer-gpu,\n"
            "        moe-layer-gpu-fine, lm-train-gpu, sgemm)\n"
            "  bench offload MODEL --gpu-memory SIZE [--policy P] [--predictor P.h5] [--batch N] [--tokens N]\n"
            "        [--prompt N] [--verbose]   one line OFFLOAD policy=... tokens_per_s=... hit_rate=...\n"
            "  inspect FILE.h5 [--verify] list a checkpoint's contents and config (--verify: every CRC)\n"
            "  serve --model DIR | --checkpoint FILE [--host H] [--port P] [--max-batch N] [--max-tokens-in-flight M]\n"
            "        [--prefill-tokens P]   an OpenAI-compatible HTTP server with continuous batching\n"
            "  trace MODEL --data FILE.txt --out traces.h5 [--tokens N] [--context T]   routing traces on text\n"
            "  predictor train traces.h5 --out predictor.h5 [--steps N] [--hidden H] [--holdout F]   routing-path predictor\n"
            "  predictor eval traces.h5 --predictor predictor.h5 [--micro-batch M]   its recall and token scheduling\n"
            "  config CONFIG.yaml [--set ...]   print the effective config\n"
            "  help-config                every config key with its type, default and meaning\n"
            "  --version\n");
}

static moe_status apply_set_list(moe_config *cfg, const moe_arg_list *sets) {
    for (int i = 0; i < sets->n; i++) MOE_TRY(moe_config_set(cfg, sets->items[i]));
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
    char init_weights[4096] = ""; /* model.init_from: the folder's weights for a fresh run */
    if (s == MOE_OK && cfg.model.init_from[0])
        s = moe_cli_init_from(&cfg, !o->resume_dir, init_weights, sizeof init_weights);
    o->init_weights = init_weights[0] ? init_weights : NULL;
    if (s == MOE_OK) s = moe_dist_init(NULL, NULL, cfg.parallel.expert_parallel);
    if (s != MOE_OK) {
        if (init_weights[0]) unlink(init_weights);
        if (moe_dist_world_size() > 1) moe_dist_abort(s, moe_last_error());
        return moe_cli_fail(s);
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
    if (init_weights[0]) unlink(init_weights);
    if (s != MOE_OK && s != MOE_ERR_INTERRUPTED && moe_dist_world_size() > 1) moe_dist_abort(s, moe_last_error());
    moe_dist_finalize();
    if (s == MOE_ERR_INTERRUPTED) {
        if (root) moe_cli_fail(s);
        return 128 + sum.stop_signal;
    }
    if (s != MOE_OK) return root ? moe_cli_fail(s) : 1;
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
    if (s != MOE_OK) return moe_cli_fail(s);
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
    int rc = moe_cli_parse("train", "moe train CONFIG.yaml [--set section.key=value ...] [--resume RUN_DIR] [--overwrite] [--quiet]",
                           specs, argc, argv, 1, 1, "CONFIG.yaml is", &a);
    if (rc < 0) {
        rc = run_train(a.positional[0], &sets, &o, signals);
        moe_args_free(&a);
    }
    moe_arg_list_free(&sets);
    moe_signal_watch_stop(signals);
    return rc;
}

/* ---- data prepare, tokenizer train ---- */

static int cmd_data(int argc, char **argv) {
    const char *usage_line = "moe data prepare --out DIR [flags] TEXT...";
    if (argc >= 1 && !strcmp(argv[0], "mqar")) return moe_cmd_data_mqar(argc - 1, argv + 1);
    if (argc < 1 || strcmp(argv[0], "prepare")) {
        bool help = argc > 0 && (!strcmp(argv[0], "--help") || !strcmp(argv[0], "-h"));
        fprintf(help ? stdout : stderr, "usage: %s\n       moe data mqar --out DIR --seq-len T --pairs P [flags]\n"
                "   (moe data prepare|mqar --help lists the flags)\n", usage_line);
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
    int rc = moe_cli_parse("data prepare", usage_line, specs, argc - 1, argv + 1, 1, INT32_MAX, "one or more TEXT files are", &a);
    if (rc >= 0) return rc;
    moe_tokenizer *tok = NULL;
    moe_status s = out ? MOE_OK : moe_error(MOE_ERR_CONFIG, "data prepare: --out DIR is required");
    if (s == MOE_OK) s = !strcmp(tk, "byte") ? ((tok = moe_tokenizer_byte()) ? MOE_OK : moe_last_status()) : moe_tokenizer_load(tk, &tok);
    moe_data_summary sum;
    if (s == MOE_OK) s = moe_data_prepare(a.positional, a.n_positional, tok, frac, out, &sum);
    moe_tokenizer_free(tok);
    moe_args_free(&a);
    if (s != MOE_OK) return moe_cli_fail(s);
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
        moe_status s = moe_cli_read_text(paths[i], &one, &one_len);
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
    int rc = moe_cli_parse("tokenizer train", usage_line, specs, argc - 1, argv + 1, 1, INT32_MAX, "one or more TEXT files are", &a);
    if (rc >= 0) return rc;
    moe_status s = vocab ? run_tokenizer_train(&a, vocab, out) : moe_error(MOE_ERR_CONFIG, "tokenizer train: --vocab N is required");
    moe_args_free(&a);
    return s == MOE_OK ? 0 : moe_cli_fail(s);
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
    int rc = moe_cli_parse("inspect", "moe inspect CHECKPOINT.h5 [--verify]", specs, argc, argv, 1, 1,
                           "CHECKPOINT.h5 is", &a);
    if (rc >= 0) return rc;
    const char *path = a.positional[0];
    moe_status s = inspect(path);
    if (s == MOE_OK && verify) s = moe_checkpoint_verify(path);
    if (s == MOE_OK && verify) printf("verified: every dataset matches its CRC-32\n");
    moe_args_free(&a);
    return s == MOE_OK ? 0 : moe_cli_fail(s);
}

static int cmd_bench(int argc, char **argv) {
    if (argc > 0 && !strcmp(argv[0], "offload")) return moe_cmd_bench_offload(argc - 1, argv + 1);
    const char *name = NULL;
    moe_bench_options o;
    moe_status s = moe_bench_parse_args(argc, argv, &name, &o);
    if (s == MOE_OK && o.help) return 0;
    if (s == MOE_OK) s = moe_bench_run(name, &o);
    return s == MOE_OK ? 0 : moe_cli_fail(s);
}

static int cmd_config(int argc, char **argv) {
    moe_arg_list sets = {0};
    const moe_flag_spec specs[] = {
        {"--set", MOE_FLAG_MULTI, "KEY=VALUE", 0, 0, NULL, "override a config key (section.key=value)", &sets}, {0}};
    moe_args a;
    int rc = moe_cli_parse("config", "moe config CONFIG.yaml [--set section.key=value ...]", specs, argc, argv, 1, 1,
                           "CONFIG.yaml is", &a);
    if (rc < 0) {
        moe_config cfg;
        moe_status s = moe_config_load_file(&cfg, a.positional[0]);
        if (s == MOE_OK) s = apply_set_list(&cfg, &sets);
        if (s == MOE_OK) s = moe_config_validate(&cfg);
        if (s == MOE_OK) moe_config_write(&cfg, stdout);
        rc = s == MOE_OK ? 0 : moe_cli_fail(s);
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
    if (!strcmp(cmd, "eval")) return moe_cmd_eval(argc - 2, argv + 2);
    if (!strcmp(cmd, "generate")) return moe_cmd_generate(argc - 2, argv + 2);
    if (!strcmp(cmd, "tokenize")) return moe_cmd_tokenize(argc - 2, argv + 2);
    if (!strcmp(cmd, "logits")) return moe_cmd_logits(argc - 2, argv + 2);
    if (!strcmp(cmd, "convert")) return moe_cmd_convert(argc - 2, argv + 2);
    if (!strcmp(cmd, "data")) return cmd_data(argc - 2, argv + 2);
    if (!strcmp(cmd, "tokenizer")) return cmd_tokenizer(argc - 2, argv + 2);
    if (!strcmp(cmd, "inspect")) return cmd_inspect(argc - 2, argv + 2);
    if (!strcmp(cmd, "config")) return cmd_config(argc - 2, argv + 2);
    if (!strcmp(cmd, "bench")) return cmd_bench(argc - 2, argv + 2);
    if (!strcmp(cmd, "serve")) return moe_cli_serve(argc - 2, argv + 2);
    if (!strcmp(cmd, "trace")) return moe_cmd_trace(argc - 2, argv + 2);
    if (!strcmp(cmd, "predictor")) return moe_cmd_predictor(argc - 2, argv + 2);
    fprintf(stderr, "moe: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
