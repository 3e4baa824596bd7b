/* `moe bench`: its argument parser and the command (the cases run in moe/bench/bench.c;
 * `moe bench offload` is offload.c, `moe bench prefill` bench_prefill.c, `moe bench decode` and
 * `tokenize` bench_decode.c and bench_tokenize.c). */
#include "moe/cli/bench.h"

#include <stdio.h>
#include <string.h>

#include "core/tensor.h"
#include "moe/cli/args.h"
#include "moe/cli/bench_decode.h"
#include "moe/cli/bench_prefill.h"
#include "moe/cli/cli.h"
#include "moe/cli/commands.h"
#include "moe/cli/offload.h"

moe_status moe_bench_parse_args(int argc, char **argv, const char **case_name, moe_bench_options *o) {
    *o = moe_bench_options_default();
    o->json = false;
    *case_name = NULL;
    const char *device = NULL, *dtype = NULL;
    const moe_flag_spec specs[] = {
        {"--device", MOE_FLAG_STRING, "DEV", 0, 0, "cpu|cuda", "run on this device (default: the case's)", &device},
        {"--dtype", MOE_FLAG_STRING, "T", 0, 0, "f32|bf16", "compute dtype (default: the case's)", &dtype},
        {"--warmup", MOE_FLAG_INT, "W", 0, MOE_BENCH_MAX_REPS, NULL, "untimed runs first", &o->warmup},
        {"--reps", MOE_FLAG_INT, "R", 1, MOE_BENCH_MAX_REPS, NULL, "timed runs", &o->reps},
        {"--threads", MOE_FLAG_INT, "N", 0, 4096, NULL, "OpenMP threads, 0 = as set", &o->threads},
        {"--scale", MOE_FLAG_INT, "S", 1, 1 << 20, NULL, "divide the case's sizes by S (smoke tests)", &o->scale},
        {"--recompute", MOE_FLAG_STRING, "LIST", 0, 0, NULL,
         "LM cases: recompute these pieces in the backward (experts,attention; default none)", &o->recompute},
        {"--json", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "JSON lines instead of readable lines", &o->json},
        {0}};
    moe_args a;
    MOE_TRY(moe_args_parse("bench", specs, argc, argv, &a));
    moe_status s = MOE_OK;
    char cases[256], usage[320];
    moe_bench_case_list(cases, sizeof cases);
    if (a.help) {
        snprintf(usage, sizeof usage, "moe bench CASE [flags]   (cases: %s)", cases);
        moe_args_print_help(o->out, usage, specs);
        o->help = true;
    } else if (a.n_positional != 1) {
        s = a.n_positional ? moe_error(MOE_ERR_CONFIG, "bench: one case at a time (got '%s' and '%s')", a.positional[0],
                                       a.positional[1])
                           : moe_error(MOE_ERR_CONFIG, "bench: name a case (%s)", cases);
    } else {
        *case_name = a.positional[0];
        if (device) o->device = strcmp(device, "cpu") ? MOE_CUDA : MOE_CPU;
        if (dtype) o->dtype = strcmp(dtype, "f32") ? MOE_BF16 : MOE_F32;
    }
    moe_args_free(&a);
    return s;
}

int moe_cmd_bench(int argc, char **argv) {
    if (argc > 0 && !strcmp(argv[0], "offload")) return moe_cmd_bench_offload(argc - 1, argv + 1);
    if (argc > 0 && !strcmp(argv[0], "prefill")) return moe_cmd_bench_prefill(argc - 1, argv + 1);
    if (argc > 0 && !strcmp(argv[0], "decode")) return moe_cmd_bench_decode(argc - 1, argv + 1);
    if (argc > 0 && !strcmp(argv[0], "tokenize")) return moe_cmd_bench_tokenize(argc - 1, argv + 1);
    const char *name = NULL;
    moe_bench_options o;
    moe_status s = moe_bench_parse_args(argc, argv, &name, &o);
    if (s == MOE_OK && o.help) return 0;
    if (s == MOE_OK) s = moe_bench_run(name, &o);
    return s == MOE_OK ? 0 : moe_cli_fail(s);
}
