/* `moe bench`'s arguments (the cases themselves: moe/bench/bench.h). */
#ifndef MOE_CLI_BENCH_H
#define MOE_CLI_BENCH_H

#include "moe/bench/bench.h"

/* Parses `moe bench` arguments: CASE [--device cpu|cuda] [--dtype f32|bf16]
 * [--warmup W] [--reps R] [--threads N] [--scale S] [--json] (moe/cli/args.h). Starts
 * from moe_bench_options_default() with json off; MOE_ERR_CONFIG naming the bad argument.
 * --help prints the flags to o->out and sets o->help. */
moe_status moe_bench_parse_args(int argc, char **argv, const char **case_name, moe_bench_options *o);

#endif
