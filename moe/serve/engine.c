/* serve_engine over a decoder (moe/infer/decoder.h, resident or offloaded): a decode state
 * with paged KV blocks for max_seqs slots, each batch run through the token scheduler (one
 * forward, or the decode rows in micro-batches) that also counts the forwards. */
#include "moe/serve/engine.h"

#include <stdlib.h>
#include <string.h>

#include "core/memory.h"
#include "moe/offload/token_sched.h"

typedef struct decoder_engine {
    moe_decoder *d; /* borrowed */
    moe_decode_state *s;
    moe_token_sched *ts;
    serve_expert_counts counts;
    serve_metrics *metrics; /* borrowed; NULL: none */
} decoder_engine;

static moe_status dec_forward(void *impl, const moe_batch *b, float *logits) {
    decoder_engine *e = impl;
    moe_status st = moe_token_sched_forward(e->ts, e->s, b, logits);
    moe_step_reset();
    if (e->metrics) {
        moe_token_sched_counts c = moe_token_sched_get_counts(e->ts);
        serve_metrics_forwards(e->metrics, &c);
    }
    return st;
}

static moe_status dec_seq_free(void *impl, int seq) {
    decoder_engine *e = impl;
    moe_token_sched_seq_free(e->ts, seq);
    return moe_decode_state_seq_free(e->s, seq);
}

static int64_t dec_free_tokens(const void *impl) { return moe_decode_state_free_tokens(((const decoder_engine *)impl)->s); }

static bool dec_expert_cache(const void *impl, int64_t *hits, int64_t *misses) {
    const decoder_engine *e = impl;
    if (!e->counts.offloaded) return false;
    e->counts.counts(e->counts.ctx, hits, misses);
    return true;
}

static void dec_close(void *impl) {
    decoder_engine *e = impl;
    if (!e) return;
    if (e->s) moe_decode_state_free(e->s);
    moe_token_sched_free(e->ts);
    free(e);
}

moe_status serve_engine_open(moe_decoder *d, serve_expert_counts counts, const serve_engine_opts *opts, int max_seqs,
                             int64_t kv_tokens, serve_engine *out) {
    MOE_ASSERT(d && max_seqs > 0 && kv_tokens > 0 && (!counts.offloaded || counts.counts), "bad engine arguments");
    serve_engine_opts o = opts ? *opts : (serve_engine_opts){0};
    MOE_ASSERT(o.micro_batch >= 0, "engine: micro-batch %d", o.micro_batch);
    decoder_engine *e = calloc(1, sizeof *e);
    if (!e) return moe_error(MOE_ERR_OOM, "out of memory");
    e->d = d;
    e->counts = counts;
    e->metrics = o.metrics;
    moe_status st = moe_decode_state_create(d, max_seqs, kv_tokens, &e->s);
    moe_predictor *pred = o.micro_batch ? o.predictor : NULL;
    if (st == MOE_OK) st = moe_token_sched_create(d, max_seqs, o.micro_batch, pred, &e->ts);
    if (st != MOE_OK) {
        dec_close(e);
        return st;
    }
    const moe_model *m = moe_decoder_view(d);
    *out = (serve_engine){.impl = e, .vocab = m->cfg.model.vocab_size, .max_seqs = max_seqs,
                          .context = m->cfg.model.seq_len,
                          .kv_tokens = (kv_tokens + MOE_KV_BLOCK - 1) / MOE_KV_BLOCK * MOE_KV_BLOCK,
                          .forward = dec_forward, .seq_free = dec_seq_free, .free_tokens = dec_free_tokens,
                          .expert_cache = dec_expert_cache, .close = dec_close};
    return MOE_OK;
}

void serve_engine_close(serve_engine *e) {
    if (e && e->close) e->close(e->impl);
    if (e) memset(e, 0, sizeof *e);
}
