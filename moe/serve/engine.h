/* The model as the server's scheduler sees it: explicit batches (moe/infer/decoder.h's
 * moe_batch: tokens with positions and sequence slots) in, one logits row per sequence of
 * the batch out, and sequence slots freed when a request ends. A small table of functions
 * so the scheduler can be tested against any engine; serve_engine_open binds a decoder
 * (resident or offloaded) with a paged KV cache, optionally running each batch's decode
 * rows in micro-batches (token scheduling). Only the scheduler thread calls an engine. */
#ifndef MOE_SERVE_ENGINE_H
#define MOE_SERVE_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include "moe/infer/decoder.h"
#include "moe/offload/predictor.h"
#include "moe/serve/metrics.h"

typedef struct serve_engine {
    void *impl;
    int vocab;           /* width of a logits row (the model's vocabulary) */
    int max_seqs;        /* sequence slots: [0, max_seqs) */
    int64_t context;     /* positions per sequence (the model's context) */
    int64_t kv_tokens;   /* KV positions in the pool (every sequence's tokens together) */
    /* Runs b (b->logits is MOE_LOGITS_LAST) into logits [sequences in b, vocab]. */
    moe_status (*forward)(void *impl, const moe_batch *b, float *logits);
    /* Ends a sequence: its slot and cache come back. */
    moe_status (*seq_free)(void *impl, int seq);
    /* KV positions still free (for the metrics). */
    int64_t (*free_tokens)(const void *impl);
    /* Expert-cache counters of routed experts so far (for the metrics): true with *hits and
     * *misses when the experts are offloaded, false when all are resident. */
    bool (*expert_cache)(const void *impl, int64_t *hits, int64_t *misses);
    void (*close)(void *impl);
} serve_engine;

/* Where an engine's expert-cache counters come from: an offloaded decoder's (counts(ctx,
 * hits, misses)) or none, every expert resident. */
typedef struct serve_expert_counts {
    bool offloaded;
    void (*counts)(void *ctx, int64_t *hits, int64_t *misses);
    void *ctx;
} serve_expert_counts;

/* How an engine over a decoder runs a batch (all zero: one forward per batch). */
typedef struct serve_engine_opts {
    int micro_batch;          /* > 0: the decode rows (sequences bringing one token) in forwards of
                               * this many, the prompt chunks in one forward after them
                               * (moe/offload/token_sched.h): the logits of one forward up
                               * to their last bits, the same greedy outputs but for near ties */
    moe_predictor *predictor; /* with micro_batch: micro-batches grouped by the predicted routing
                               * paths of their tokens; NULL: arrival order (borrowed) */
    serve_metrics *metrics;   /* NULL, or where every forward and its distinct experts are counted */
} serve_engine_opts;

/* Binds decoder d (borrowed: it outlives the engine) with max_seqs slots and a pool of
 * kv_tokens positions; opts may be NULL. */
moe_status serve_engine_open(moe_decoder *d, serve_expert_counts counts, const serve_engine_opts *opts, int max_seqs,
                             int64_t kv_tokens, serve_engine *out);
void serve_engine_close(serve_engine *e);

#endif
