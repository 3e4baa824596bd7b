/* Offloaded inference: a decoder whose routed experts live in host memory (the expert
 * store: the decoder view's own stacks, page-locked on a device, no second copy and none
 * on the device) while a device expert cache of a byte budget holds the ones in use. Dense parts (embeddings, attention, norms, routers,
 * shared experts) and the KV cache stay on the device.
 *
 * The budget (--gpu-memory) is the whole device memory the run may use:
 *   dense weights + KV cache (+ recurrent states) + scratch + expert cache.
 * Scratch is the gather stack (max_gather experts, or as many as a layer can use at once)
 * plus the activations of the largest batch; the expert cache is what remains, cut into equal slots (one expert's w13
 * and w2 in the compute dtype, the widest expert's size). A budget that cannot hold the
 * dense part, the KV cache, the scratch and one layer's top-k experts is refused with the
 * bytes it needs.
 *
 * Each expert group of a step runs as one grouped GEMM over a scratch stack gathered from
 * the slots (and, for experts computed from the host copy, from the store): the same
 * kernel and row order as the resident model, so the logits are the same bits. Gathering
 * costs one device-local read and write of the used experts (a device copy is about 20
 * times faster than a host-to-device one) and keeps the op table's grouped GEMM, its
 * backward and its CUDA kernels as they are; per-expert pointers would need a second
 * grouped GEMM.
 *
 * Slots are shared by all layers (the count per layer follows demand) with a floor per
 * layer; a new expert takes an empty slot, else the policy's victim:
 *   resident  every expert has a slot, loaded at open (the reference)
 *   lru, lfu  least recently / least often used (baselines; no prefetch)
 *   predict   the predictor's experts of layers l .. l + depth are copied before layer l
 *             runs (depth adapts to copy rate over layer time); victims are experts not
 *             predicted ahead, then least recently used
 *             (with lookahead: also, once MoE layer l's experts are known, the experts the
 *             next MoE layer's router picks from layer l's rows, copied while layer l and
 *             the next mixer compute; a predictor is then optional)
 *   cpu       lru, and a missed expert with at most cpu_rows rows is computed from the host
 *             copy instead of being copied
 *   auto      per expert per step, host compute when rows x measured host time per row is
 *             below the measured copy time; prefetch as predict when a predictor is given
 * A miss is copied urgently (ahead of prefetches); a prefetch still in flight when its
 * expert is needed jumps the queue and counts as late. */
#ifndef MOE_OFFLOAD_OFFLOAD_H
#define MOE_OFFLOAD_OFFLOAD_H

#include <stdio.h>

#include "moe/infer/decoder.h"

typedef enum moe_offload_policy {
    MOE_OFFLOAD_RESIDENT, MOE_OFFLOAD_LRU, MOE_OFFLOAD_LFU, MOE_OFFLOAD_PREDICT, MOE_OFFLOAD_CPU, MOE_OFFLOAD_AUTO,
    MOE_OFFLOAD_POLICY_COUNT
} moe_offload_policy;

const char *moe_offload_policy_name(moe_offload_policy p);
/* "lru" -> MOE_OFFLOAD_LRU; MOE_ERR_CONFIG naming the choices otherwise. */
moe_status moe_offload_policy_parse(const char *name, moe_offload_policy *out);

/* Routing-path prediction: scores [n_moe_layers, m, n_experts] (higher: more likely
 * routed) of the tokens rows[0..m) of a token list: tokens [n] at positions pos [n] of
 * sequences seq [n], where the tokens before a row of the same sequence at the positions
 * just before its own are its context (see moe_predictor_predict). One call per step: the
 * list holds every sequence run of the batch after its sequence's newest tokens. */
typedef moe_status (*moe_offload_predict_fn)(void *ctx, const int32_t *tokens, const int32_t *pos, const int32_t *seq,
                                             int n, const int32_t *rows, int m, float *scores);

typedef struct moe_offload_options {
    moe_dtype dtype;           /* compute dtype of the decoder */
    moe_device dev;            /* its device: the model's, or MOE_CUDA for a model on the host */
    moe_offload_policy policy;
    size_t budget;             /* bytes of device memory for everything (see above) */
    int max_seqs;              /* the decode state the budget holds: sequence slots */
    int64_t kv_tokens;         /*   and KV positions */
    int max_batch_tokens;      /* the largest batch a forward gets (scratch) */
    moe_offload_predict_fn predict; /* predict (required), auto (optional); NULL otherwise */
    void *predict_ctx;
    int predict_context;       /* tokens before a new one that the predictor reads (its own context
                                * length, at most 63): each sequence keeps this many between steps */
    int prefetch_depth;        /* layers ahead to prefetch, 0 = adapt to the copy rate */
    int predict_width;         /* experts per token and MoE layer the predictor names for prefetch (its best
                                * scores), 0 = the model's top-k; more raises hits and bytes copied */
    bool lookahead;            /* predict, auto: also prefetch the next MoE layer's router's choice on this
                                * layer's rows (its input is this layer's plus what the layer and the next
                                * mixer add: an approximation that needs no training) */
    int cpu_rows;              /* cpu: misses with at most this many rows run from the host copy (0 = 4) */
    int max_gather;            /* experts gathered into scratch at once (a prefill's layer runs in waves
                                * of this many grouped GEMMs), 0 = a whole layer's */
} moe_offload_options;

/* How the budget is split (bytes). */
typedef struct moe_offload_split {
    size_t budget, dense, kv, scratch, cache, slot_bytes, store;
    int slots, experts; /* cache slots; routed experts in the store */
} moe_offload_split;

/* Per MoE layer (or summed): hits + misses = uses; late counts hits that waited on a copy
 * in flight; host counts misses computed from the host copy; wasted counts prefetched
 * experts evicted or cancelled before any use. */
typedef struct moe_offload_counts {
    int64_t uses, hits, misses, late, host, wasted, copies;
    size_t bytes; /* host-to-device bytes of expert copies */
    double gather_ms, expert_ms; /* copying the used experts into the scratch stacks; their
                                  * grouped GEMMs (host clock: exact on the CPU) */
    double wait_ms;              /* the host blocked on this layer's copies: a slot's copy still
                                  * running when its expert is needed, or when it is evicted */
} moe_offload_counts;

typedef struct moe_offload moe_offload;

/* The split o asks for on m, and the least budget that works (one layer's top-k slots). */
moe_status moe_offload_plan(const moe_model *m, const moe_offload_options *o, moe_offload_split *split,
                            size_t *min_budget);

/* A decoder over m with its routed experts offloaded per o (m borrowed, as in
 * moe_decoder_open). Refuses a budget below the least (MOE_ERR_OOM, the bytes named) and
 * predict without a predictor (MOE_ERR_CONFIG). */
moe_status moe_offload_open(moe_model *m, const moe_offload_options *o, moe_offload **out);
void moe_offload_close(moe_offload *o);
moe_decoder *moe_offload_decoder(moe_offload *o);
const moe_offload_split *moe_offload_get_split(const moe_offload *o);
moe_offload_policy moe_offload_get_policy(const moe_offload *o);

/* Counters of block `layer` (an MoE layer), or of all layers with layer = -1. */
moe_offload_counts moe_offload_get_counts(const moe_offload *o, int layer);
void moe_offload_reset_counts(moe_offload *o);
/* Achieved host-to-device rate so far, bytes per second (0 before any copy). */
double moe_offload_copy_rate(const moe_offload *o);

/* "offload: budget ... = dense ... + KV cache ... + scratch ... + expert cache ..." */
void moe_offload_print_split(const moe_offload *o, FILE *f);
/* One line per MoE layer and a total line with the copy rate. */
void moe_offload_print_counts(const moe_offload *o, FILE *f);

/* "6GiB", "512MiB", "1.5G", "800000000" -> bytes; MOE_ERR_CONFIG when malformed. */
moe_status moe_parse_bytes(const char *text, size_t *out);

#endif
