/* The offload flags of `moe generate` and `moe serve` (--offload, --gpu-memory, --policy,
 * --predictor, --lookahead, --predict-width, --max-gather, --verbose), opening a decoder
 * with them, the token-scheduling flags of `moe bench offload` and `moe serve` (--micro-batch,
 * --schedule), and `moe bench offload`. */
#ifndef MOE_CLI_OFFLOAD_H
#define MOE_CLI_OFFLOAD_H

#include <stdbool.h>
#include <stdint.h>

#include "moe/cli/args.h"
#include "moe/cli/source.h"
#include "moe/infer/decoder.h"
#include "moe/offload/offload.h"
#include "moe/offload/predictor.h"

typedef struct moe_offload_flags {
    bool offload, verbose, lookahead;
    const char *gpu_memory, *policy, *predictor;
    int max_gather, predict_width;
} moe_offload_flags;

/* The flag table entries of moe_offload_flags (inside a moe_flag_spec array). */
#define MOE_OFFLOAD_FLAG_SPECS(of)                                                                                   \
    {"--offload", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "routed experts in host memory, a device expert cache of the budget", \
     &(of).offload},                                                                                                 \
    {"--gpu-memory", MOE_FLAG_STRING, "SIZE", 0, 0, NULL,                                                            \
     "--offload: the device memory for everything, e.g. 6GiB (dense + KV cache + scratch + expert cache)",           \
     &(of).gpu_memory},                                                                                              \
    {"--policy", MOE_FLAG_STRING, "P", 0, 0, "predict|lru|lfu|resident|cpu|auto",                                    \
     "--offload: expert cache policy (default: predict with --predictor or --lookahead, else lru)", &(of).policy}, \
    {"--predictor", MOE_FLAG_STRING, "P.h5", 0, 0, NULL, "--offload: the routing-path predictor (moe predictor train)", \
     &(of).predictor},                                                                                               \
    {"--lookahead", MOE_FLAG_BOOL, NULL, 0, 0, NULL,                                                                 \
     "--offload: also prefetch the next MoE layer's experts as its router picks them from this layer's rows "      \
     "(predict, auto; no predictor needed)", &(of).lookahead},                                                      \
    {"--predict-width", MOE_FLAG_INT, "W", 0, 4096, NULL,                                                          \
     "--offload: experts per token and layer the predictor names for prefetch, 0 = top-k (more: hits and bytes)",  \
     &(of).predict_width},                                                                                           \
    {"--max-gather", MOE_FLAG_INT, "N", 0, 1 << 20, NULL,                                                          \
     "--offload: experts gathered into scratch at once (a prompt's layer runs in waves), 0 = a whole layer's",      \
     &(of).max_gather},                                                                                              \
    {"--verbose", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "--offload: per-layer hits, misses, late prefetches, wasted copies", \
     &(of).verbose}

/* A decoder over model m (f32 masters on the host) on dev in dtype: resident without
 * --offload, else offloaded per the flags (the routed experts on the host, a cache of them
 * on the device) for up to max_seqs sequences, kv_tokens KV positions and batches of
 * max_batch tokens (the split line goes to stderr). Flags of --offload without it are
 * refused. */
/* The flags alone, before anything loads: --offload's companions without it, a missing
 * or malformed --gpu-memory, an unknown --policy, flags that do not go together. */
moe_status moe_cli_offload_flags_check(const moe_offload_flags *f);

typedef struct moe_cli_decoder {
    moe_decoder *dec;
    moe_offload *off;    /* NULL: resident */
    moe_predictor *pred; /* NULL: none */
    bool verbose;
} moe_cli_decoder;
moe_status moe_cli_decoder_open(const moe_offload_flags *f, moe_model *m, moe_device dev, moe_dtype dtype, int max_seqs,
                                int64_t kv_tokens, int max_batch, moe_cli_decoder *out);
/* With --offload --verbose, the counters to stderr; then everything freed. */
void moe_cli_decoder_close(moe_cli_decoder *d);

/* Token scheduling (moe/offload/token_sched.h) of `moe bench offload` and `moe serve`:
 * --micro-batch M, --schedule paths|arrival. */
typedef struct moe_schedule_flags {
    int micro;            /* > 0: decode steps in micro-batches of this many sequences */
    const char *schedule; /* "paths" (the default with a predictor), "arrival" or NULL */
} moe_schedule_flags;

#define MOE_SCHEDULE_FLAG_SPECS(sf)                                                                                 \
    {"--micro-batch", MOE_FLAG_INT, "M", 0, 4096, NULL,                                                            \
     "decode steps in micro-batches of M sequences (token scheduling; serve: with --offload), 0 = all at once",    \
     &(sf).micro},                                                                                                 \
    {"--schedule", MOE_FLAG_STRING, "S", 0, 0, "paths|arrival",                                                    \
     "--micro-batch: group by predicted routing paths (needs --predictor; its default) or arrival order",          \
     &(sf).schedule}

/* Refuses --schedule without --micro-batch and paths without --predictor (the message
 * starts with cmd, e.g. "serve"). */
moe_status moe_cli_schedule_check(const char *cmd, const moe_schedule_flags *sf, const char *predictor);
/* Whether micro-batches group by predicted paths: --schedule paths, or by default with a
 * predictor. */
bool moe_cli_schedule_by_paths(const moe_schedule_flags *sf, const char *predictor);

/* `moe bench offload` (argv: the words after "offload"). Returns the exit code. */
int moe_cmd_bench_offload(int argc, char **argv);

#endif
