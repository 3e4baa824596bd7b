/* `moe bench prefill`: packed against padded prefill of prompts of random lengths (see
 * bench_prefill.c). */
#ifndef MOE_CLI_BENCH_PREFILL_H
#define MOE_CLI_BENCH_PREFILL_H

#include <stdint.h>

/* The lengths' and token ids' generator, the same in scripts/bench_prefill_reference.py so
 * that both sides draw the same prompts: x <- x * 6364136223846793005 + 1442695040888963407
 * (mod 2^64), starting from x = seed; each draw is x >> 33 after the step. A prompt's length
 * is min + draw % (max - min + 1) (all N lengths first), then its ids 1 + draw % (V - 1)
 * prompt after prompt (never 0, the pad id). */
uint32_t moe_prefill_lcg_next(uint64_t *x);

int moe_cmd_bench_prefill(int argc, char **argv);

#endif
