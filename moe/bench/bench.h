/* `moe bench`: the side-by-side benchmark cases of results/README.md, timed
 * on our stack (scripts/bench_reference.py is the PyTorch side, scripts/bench.sh runs
 * both and compares).
 *
 * Cases: moe-layer-cpu, lm-step-cpu (cpu, f32); moe-layer-gpu, moe-layer-gpu-fine,
 * lm-train-gpu (cuda, bf16); sgemm, the machine's matmul ceiling through moe_matmul
 * (cpu: f32 n=2048; cuda: bf16 n=8192); index-add-gpu (cuda, bf16), the embedding
 * backward alone: INDEX_ADD of 16384 rows of width 768 into a 256-row table; scan-gpu (cuda,
 * bf16), the gated delta-rule scan of a MoM layer (160 sequences of 512 steps, 4 heads of
 * 128) in the step-by-step form and the chunked form (chunks of 64). Layer cases
 * time "fwd" (grad mode off) and "fwd_bwd" (loss = sum(out * R), backward, input and
 * parameter grads); LM cases time "step" (one whole AdamW step: loss, backward, clip,
 * update, zero grads); sgemm times "gemm", index-add-gpu "index_add", scan-gpu "step_fwd",
 * "step_fwd_bwd", "chunk_fwd", "chunk_fwd_bwd" (loss = sum(out)). Each figure is the
 * median of `reps` runs after `warmup` runs.
 *
 * Output: one line per figure on `out`. JSON (`json`): the fields of
 * bench_reference.py where they apply:
 *   {"case","phase","ms","ms_all":[..],"flops","gflops_per_s","peak_bytes",
 *    "peak_kind":"step_arena+persist","step_peak_bytes" (ours only: live step-arena bytes),
 *    "step_capacity_bytes" (ours only: the arena held),"device","dtype","threads","warmup",
 *    "reps","scale","impl":"moe","version"}, plus "tokens","active_matmul_params",
 *   "tokens_per_s" for LM cases, "mfu" (vs 790 TFLOP/s) for LM cases on cuda, "n" for
 * sgemm, "bytes" and "gb_per_s" (the traffic of an ideal kernel) for index-add-gpu, and "gpu"
 * on cuda. FLOPs are counted exactly as bench_reference.py counts them.
 * peak_bytes = the device's PERSIST peak + STEP arena peak, both process-wide so far
 * (an upper bound of the true peak; later figures include earlier phases). Otherwise
 * one human-readable line per figure. moe_bench_run also logs one line describing the run
 * (case, device, dtype, threads) to stderr. */
#ifndef MOE_MOE_BENCH_H
#define MOE_MOE_BENCH_H

#include <stdbool.h>
#include <stdio.h>

#include "core/status.h"

#define MOE_BENCH_MAX_REPS 100000 /* the most timed (and warm-up) runs */

typedef struct moe_bench_options {
    int device;  /* -1: the case's device; else a moe_device */
    int dtype;   /* -1: the case's dtype; else MOE_F32 or MOE_BF16 */
    int warmup;  /* runs before timing, >= 0 */
    int reps;    /* timed runs, >= 1 */
    int threads; /* OpenMP threads for the CPU (omp_set_num_threads); 0: leave as is */
    int scale;   /* >= 1: divides T (layer cases, index-add rows), the batch (LM cases) and n (sgemm),
                    each kept >= 1, for smoke tests */
    const char *recompute; /* LM cases: train.recompute as a comma list ("experts,attention"), or NULL / "none" */
    bool json;   /* JSON lines instead of readable lines */
    bool help;   /* the flags were printed (--help, moe/cli/bench.h): nothing to run */
    FILE *out;   /* where the lines go (the `moe` program passes stdout) */
} moe_bench_options;

/* warmup 3, reps 10, threads 0, scale 1, case defaults, JSON on stdout. */
moe_bench_options moe_bench_options_default(void);

/* The case names into buf as "a, b, c" (cut to cap). */
void moe_bench_case_list(char *buf, size_t cap);

/* Runs one case and writes its figures. MOE_ERR_CONFIG for an unknown case or a bad
 * option, MOE_ERR_UNSUPPORTED ("no cuda device ...") when the device is missing,
 * otherwise what the model code reports. */
moe_status moe_bench_run(const char *case_name, const moe_bench_options *o);

#endif
