/* The `moe` program: the usage text and the dispatch to one function per command
 * (commands.h, routing.h). */
#include <stdio.h>
#include <string.h>

#include "core/version.h"
#include "moe/cli/commands.h"
#include "moe/cli/routing.h"
#include "moe/model/config.h"

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
            "  data prepare --out DIR [--tokenizer byte|FILE.tok|DIR] [--val-fraction F] TEXT...\n"
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
    if (!strcmp(cmd, "train")) return moe_cmd_train(argc - 2, argv + 2);
    if (!strcmp(cmd, "eval")) return moe_cmd_eval(argc - 2, argv + 2);
    if (!strcmp(cmd, "generate")) return moe_cmd_generate(argc - 2, argv + 2);
    if (!strcmp(cmd, "tokenize")) return moe_cmd_tokenize(argc - 2, argv + 2);
    if (!strcmp(cmd, "logits")) return moe_cmd_logits(argc - 2, argv + 2);
    if (!strcmp(cmd, "convert")) return moe_cmd_convert(argc - 2, argv + 2);
    if (!strcmp(cmd, "data")) return moe_cmd_data(argc - 2, argv + 2);
    if (!strcmp(cmd, "tokenizer")) return moe_cmd_tokenizer(argc - 2, argv + 2);
    if (!strcmp(cmd, "inspect")) return moe_cmd_inspect(argc - 2, argv + 2);
    if (!strcmp(cmd, "config")) return moe_cmd_config(argc - 2, argv + 2);
    if (!strcmp(cmd, "bench")) return moe_cmd_bench(argc - 2, argv + 2);
    if (!strcmp(cmd, "serve")) return moe_cmd_serve(argc - 2, argv + 2);
    if (!strcmp(cmd, "trace")) return moe_cmd_trace(argc - 2, argv + 2);
    if (!strcmp(cmd, "predictor")) return moe_cmd_predictor(argc - 2, argv + 2);
    fprintf(stderr, "moe: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
