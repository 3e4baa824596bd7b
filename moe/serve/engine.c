/* serve_engine over a decoder (moe/infer/decoder.h, resident or offloaded): a decode state
 * with paged KV blocks for max_seqs slots. */
#include "moe/serve/engine.h"

#include <stdlib.h>
#include <string.h>

#include "core/memory.h"

typedef struct decoder_engine {
    moe_decoder *d; /* borrowed */
    moe_decode_state *s;
    serve_expert_counts counts;
} decoder_engine;

static moe_status dec_forward(void *impl, const moe_batch *b, float *logits) {
    decoder_engine *e = impl;
    moe_step_reset();
    moe_status st = moe_decoder_forward(e->d, e->s, b, logits, NULL);
    moe_step_reset();
    return st;
}

static moe_status dec_seq_free(void *impl, int seq) { return moe_decode_state_seq_free(((decoder_engine *)impl)->s, seq); }

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
    free(e);
}

moe_status serve_engine_open(moe_decoder *d, serve_expert_counts counts, int max_seqs, int64_t kv_tokens,
                             serve_engine *out) {
    MOE_ASSERT(d && max_seqs > 0 && kv_tokens > 0 && (!counts.offloaded || counts.counts), "bad engine arguments");
    decoder_engine *e = calloc(1, sizeof *e);
    if (!e) return moe_error(MOE_ERR_OOM, "out of memory");
    e->d = d;
    e->counts = counts;
    moe_status st = moe_decode_state_create(d, max_seqs, kv_tokens, &e->s);
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
