/* serve_engine over the model. Until the paged decoder is linked in, each forward
 * recomputes every sequence of the batch from its first token (moe_model_logits, one
 * sequence at a time): exact, O(length^2), fine for small models and tests. */
#include "moe/serve/engine.h"

#include <stdlib.h>
#include <string.h>

#include "core/memory.h"

typedef struct recompute {
    moe_model *m;
    int64_t context;
    int32_t *hist; /* [max_seqs, context] the tokens of each slot */
    int64_t *len;  /* [max_seqs] */
    int max_seqs;
    int64_t kv_tokens;
    float *all;    /* [context, vocab] logits of every position of one sequence */
} recompute;

/* Appends b's tokens of the slot that starts at index i; returns the index after them. */
static moe_status append_seq(recompute *r, const moe_batch *b, int i, int *end) {
    int seq = b->seq[i];
    if (seq < 0 || seq >= r->max_seqs) return moe_error(MOE_ERR_INVALID, "sequence slot %d out of range", seq);
    int j = i;
    while (j < b->n_tokens && b->seq[j] == seq) {
        if (b->pos[j] != r->len[seq]) return moe_error(MOE_ERR_INVALID, "slot %d: position %d, expected %lld", seq, b->pos[j], (long long)r->len[seq]);
        if (r->len[seq] >= r->context) return moe_error(MOE_ERR_INVALID, "slot %d is full (%lld tokens)", seq, (long long)r->context);
        r->hist[(int64_t)seq * r->context + r->len[seq]++] = b->tokens[j++];
    }
    *end = j;
    return MOE_OK;
}

static moe_status recompute_forward(void *impl, const moe_batch *b, float *logits) {
    recompute *r = impl;
    const int V = r->m->cfg.model.vocab_size;
    int row = 0;
    for (int i = 0; i < b->n_tokens; row++) {
        int seq = b->seq[i], end = i;
        MOE_TRY(append_seq(r, b, i, &end));
        i = end;
        int T = (int)r->len[seq];
        moe_step_reset();
        MOE_TRY(moe_model_logits(r->m, r->hist + (int64_t)seq * r->context, 1, T, 0, r->all, NULL));
        memcpy(logits + (size_t)row * V, r->all + (size_t)(T - 1) * V, sizeof(float) * (size_t)V);
    }
    moe_step_reset();
    return MOE_OK;
}

static moe_status recompute_seq_free(void *impl, int seq) {
    recompute *r = impl;
    r->len[seq] = 0;
    return MOE_OK;
}

static int64_t recompute_free_tokens(const void *impl) {
    const recompute *r = impl;
    int64_t used = 0;
    for (int i = 0; i < r->max_seqs; i++) used += (r->len[i] + MOE_KV_BLOCK - 1) / MOE_KV_BLOCK * MOE_KV_BLOCK;
    return r->kv_tokens > used ? r->kv_tokens - used : 0;
}

static void recompute_close(void *impl) {
    recompute *r = impl;
    if (!r) return;
    free(r->hist);
    free(r->len);
    free(r->all);
    free(r);
}

moe_status serve_engine_open(moe_model *m, int max_seqs, int64_t kv_tokens, serve_engine *out) {
    MOE_ASSERT(m && max_seqs > 0 && kv_tokens > 0, "bad engine arguments");
    const int64_t ctx = m->cfg.model.seq_len, V = m->cfg.model.vocab_size;
    recompute *r = calloc(1, sizeof *r);
    if (r) {
        r->hist = malloc(sizeof *r->hist * (size_t)(max_seqs * ctx));
        r->len = calloc((size_t)max_seqs, sizeof *r->len);
        r->all = malloc(sizeof *r->all * (size_t)(ctx * V));
    }
    if (!r || !r->hist || !r->len || !r->all) {
        recompute_close(r);
        return moe_error(MOE_ERR_OOM, "out of memory for %d sequences of %lld tokens", max_seqs, (long long)ctx);
    }
    r->m = m;
    r->context = ctx;
    r->max_seqs = max_seqs;
    r->kv_tokens = (kv_tokens + MOE_KV_BLOCK - 1) / MOE_KV_BLOCK * MOE_KV_BLOCK;
    *out = (serve_engine){.impl = r, .vocab = (int)V, .max_seqs = max_seqs, .context = ctx, .kv_tokens = r->kv_tokens,
                          .forward = recompute_forward, .seq_free = recompute_seq_free,
                          .free_tokens = recompute_free_tokens, .close = recompute_close};
    return MOE_OK;
}

void serve_engine_close(serve_engine *e) {
    if (e && e->close) e->close(e->impl);
    if (e) memset(e, 0, sizeof *e);
}
