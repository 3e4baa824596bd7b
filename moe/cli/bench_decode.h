/* `moe bench decode` (bench_decode.c) and `moe bench tokenize` (bench_tokenize.c): a hub
 * model's prefill, decode and tokenizer speed, the moe side of scripts/bench-hub.sh. */
#ifndef MOE_CLI_BENCH_DECODE_H
#define MOE_CLI_BENCH_DECODE_H

/* argv: the words after "decode" / "tokenize". Each returns the exit code. */
int moe_cmd_bench_decode(int argc, char **argv);
int moe_cmd_bench_tokenize(int argc, char **argv);

#endif
