/* Token scheduling in a decoder's forwards: per-slot token histories, the order of a
 * batch's decode rows by predicted paths, and the batch run in micro-batches with its
 * logits rows put back in place (token_sched.h). */
#include "moe/offload/token_sched.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "core/memory.h"
#include "moe/offload/schedule.h"

struct moe_token_sched {
    moe_decoder *d;      /* borrowed */
    moe_predictor *pred; /* borrowed; NULL: arrival order */
    int max_seqs, micro, V;
    int n_layers, E, k;           /* the model's: route ids [n_layers, tokens, k] of E experts */
    int ctx, n_moe, pE, pk, words; /* the predictor's window, MoE layers, experts, top-k; path words */
    int32_t *hist;                /* [max_seqs, ctx] each slot's last tokens, oldest first, -1: none */
    int32_t *next_pos;            /* [max_seqs] the position after each slot's history, -1: empty */
    uint64_t *paths;              /* [max_seqs, words] the decode rows' predicted paths */
    float *scores;                /* [n_moe, max_seqs, pE] the decode rows' prediction */
    int32_t *ptok, *ppos, *pseq;  /* [max_seqs (ctx + 1)] the predictor's list: each row after its history */
    int32_t *prow;                /* [max_seqs] where the decode rows are in that list */
    int64_t *pidx;                /* [max_seqs] 0, 1, ... (set once): the scored rows, for the paths */
    float *rows;                  /* [max_seqs, V] one forward's logits */
    bool *slot_seen;              /* [max_seqs] */
    bool *expert_seen;            /* [n_layers, E] */
    int n_spans;                  /* the batch's runs of one sequence (one logits row each): */
    int32_t *span_at, *span_len;  /* [max_seqs] first token and length of each */
    int32_t *dec, *part, *order;  /* [max_seqs] decode spans; the spans of one forward; the rows' order */
    int32_t *dtok, *dpos, *dseq;  /* [max_seqs] the decode rows' token, position and slot */
    int cap;                      /* tokens the arrays below hold */
    int32_t *tok, *pos, *seq;     /* [cap] one forward's batch */
    int32_t *route;               /* [n_layers, cap, k] its experts */
    moe_token_sched_counts counts;
};

void moe_token_sched_free(moe_token_sched *t) {
    if (!t) return;
    void *bufs[] = {t->hist, t->next_pos, t->paths, t->scores, t->ptok, t->ppos, t->pseq, t->prow,
                    t->pidx, t->rows, t->slot_seen, t->expert_seen, t->span_at, t->span_len, t->dec,
                    t->part, t->order, t->dtok, t->dpos, t->dseq, t->tok, t->pos, t->seq, t->route};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) free(bufs[i]);
    free(t);
}

/* count x size bytes (at least one element), *ok cleared on failure. */
static void *alloc_n(size_t count, size_t size, bool *ok) {
    void *p = malloc((count > 0 ? count : 1) * size);
    *ok = *ok && p;
    return p;
}

/* The buffers of fixed size (those that grow with the batch start empty). */
static bool alloc_fixed(moe_token_sched *t) {
    size_t S = (size_t)t->max_seqs, C = (size_t)t->ctx;
    bool ok = true;
    t->hist = alloc_n(S * C, sizeof *t->hist, &ok);
    t->next_pos = alloc_n(S, sizeof *t->next_pos, &ok);
    t->paths = alloc_n(S * (size_t)t->words, sizeof *t->paths, &ok);
    t->scores = alloc_n((size_t)t->n_moe * S * (size_t)t->pE, sizeof *t->scores, &ok);
    t->ptok = alloc_n(S * (C + 1), sizeof *t->ptok, &ok);
    t->ppos = alloc_n(S * (C + 1), sizeof *t->ppos, &ok);
    t->pseq = alloc_n(S * (C + 1), sizeof *t->pseq, &ok);
    t->prow = alloc_n(S, sizeof *t->prow, &ok);
    t->pidx = alloc_n(S, sizeof *t->pidx, &ok);
    t->rows = alloc_n(S * (size_t)t->V, sizeof *t->rows, &ok);
    t->slot_seen = alloc_n(S, sizeof *t->slot_seen, &ok);
    t->expert_seen = alloc_n((size_t)t->n_layers * (size_t)t->E, sizeof *t->expert_seen, &ok);
    int32_t **per_slot[] = {&t->span_at, &t->span_len, &t->dec, &t->part, &t->order, &t->dtok, &t->dpos, &t->dseq};
    for (size_t i = 0; i < sizeof per_slot / sizeof *per_slot; i++) *per_slot[i] = alloc_n(S, sizeof(int32_t), &ok);
    for (size_t i = 0; ok && i < S; i++) t->pidx[i] = (int64_t)i;
    return ok;
}

moe_status moe_token_sched_create(moe_decoder *d, int max_seqs, int micro, moe_predictor *pred,
                                  moe_token_sched **out) {
    MOE_ASSERT(d && max_seqs > 0 && micro >= 0, "token scheduler: %d slots, micro-batch %d", max_seqs, micro);
    *out = NULL;
    moe_token_sched *t = calloc(1, sizeof *t);
    if (!t) return moe_error(MOE_ERR_OOM, "token scheduler: out of host memory");
    const moe_cfg_model *c = &moe_decoder_view(d)->cfg.model;
    *t = (moe_token_sched){.d = d, .pred = pred, .max_seqs = max_seqs, .micro = micro, .V = c->vocab_size,
                           .n_layers = c->n_layers, .E = c->n_experts, .k = c->top_k};
    if (pred) {
        const moe_route_net_shape *sh = &moe_predictor_net(pred)->shape;
        t->ctx = sh->context, t->n_moe = sh->n_moe_layers, t->pE = sh->n_experts, t->pk = sh->top_k;
        t->words = moe_path_words(t->n_moe, t->pE);
    }
    if (!alloc_fixed(t)) {
        moe_token_sched_free(t);
        return moe_error(MOE_ERR_OOM, "token scheduler: out of host memory for %d slots", max_seqs);
    }
    for (int q = 0; q < max_seqs; q++) moe_token_sched_seq_free(t, q);
    *out = t;
    return MOE_OK;
}

/* ---- histories ---- */

void moe_token_sched_seq_free(moe_token_sched *t, int seq) {
    if (seq < 0 || seq >= t->max_seqs) return;
    for (int j = 0; j < t->ctx; j++) t->hist[(size_t)seq * t->ctx + j] = -1;
    t->next_pos[seq] = -1;
}

/* Token tok at position pos joins slot q's history (which restarts unless pos continues it). */
static void push(moe_token_sched *t, int q, int32_t tok, int32_t pos) {
    if (q < 0 || q >= t->max_seqs) return;
    if (pos != t->next_pos[q]) moe_token_sched_seq_free(t, q);
    int32_t *h = t->hist + (size_t)q * t->ctx;
    if (t->ctx > 0) {
        memmove(h, h + 1, sizeof *h * (size_t)(t->ctx - 1));
        h[t->ctx - 1] = tok;
    }
    t->next_pos[q] = pos + 1;
}

void moe_token_sched_observe(moe_token_sched *t, const moe_batch *b) {
    for (int i = 0; i < b->n_tokens && t->ctx > 0; i++) push(t, b->seq[i], b->tokens[i], b->pos[i]);
}

const int32_t *moe_token_sched_history(const moe_token_sched *t, int seq, int *context) {
    *context = t->ctx;
    return t->hist + (size_t)seq * t->ctx;
}

moe_token_sched_counts moe_token_sched_get_counts(const moe_token_sched *t) { return t->counts; }

/* ---- the order of decode rows ---- */

/* The predicted paths [n, words] of decode rows (tok, pos) of slots seq [n], in one
 * predictor call: each row follows its slot's history in the list when pos continues it. */
static moe_status predict_paths(moe_token_sched *t, const int32_t *tokens, const int32_t *pos, const int32_t *seq,
                                int n) {
    int len = 0;
    for (int i = 0; i < n; i++) {
        const int32_t *h = t->hist + (size_t)seq[i] * t->ctx;
        bool continues = t->next_pos[seq[i]] == pos[i];
        for (int j = 0; j < t->ctx && continues; j++) {
            if (h[j] < 0) continue;
            t->ptok[len] = h[j], t->ppos[len] = pos[i] - t->ctx + j, t->pseq[len++] = seq[i];
        }
        t->prow[i] = len;
        t->ptok[len] = tokens[i], t->ppos[len] = pos[i], t->pseq[len++] = seq[i];
    }
    MOE_TRY(moe_predictor_predict(t->pred, t->ptok, t->ppos, t->pseq, len, t->prow, n, t->scores));
    moe_paths_from_scores(t->scores, t->n_moe, n, t->pE, t->pk, t->pidx, n, t->paths);
    return MOE_OK;
}

moe_status moe_token_sched_order(moe_token_sched *t, const int32_t *tokens, const int32_t *pos, const int32_t *seq,
                                 int n, int32_t *order) {
    MOE_ASSERT(n >= 0 && n <= t->max_seqs, "token scheduler: %d rows for %d slots", n, t->max_seqs);
    for (int i = 0; i < n; i++) {
        if (seq[i] < 0 || seq[i] >= t->max_seqs)
            return moe_error(MOE_ERR_INVALID, "token scheduler: slot %d of %d", seq[i], t->max_seqs);
        order[i] = i;
    }
    if (!t->pred || t->micro <= 0 || n == 0) return MOE_OK;
    MOE_TRY(predict_paths(t, tokens, pos, seq, n));
    return moe_schedule_group(t->paths, n, t->words, t->micro, order);
}

/* ---- forwards ---- */

/* The runs of one slot in b (span_at, span_len, n_spans); each slot in range and in one run. */
static moe_status find_spans(moe_token_sched *t, const moe_batch *b) {
    memset(t->slot_seen, 0, sizeof *t->slot_seen * (size_t)t->max_seqs);
    t->n_spans = 0;
    for (int i = 0; i < b->n_tokens; i++) {
        int q = b->seq[i];
        if (i > 0 && q == b->seq[i - 1]) {
            t->span_len[t->n_spans - 1]++;
            continue;
        }
        if (q < 0 || q >= t->max_seqs || t->slot_seen[q])
            return moe_error(MOE_ERR_INVALID, "token scheduler: slot %d %s", q,
                             q < 0 || q >= t->max_seqs ? "out of range" : "in two runs of the batch");
        t->slot_seen[q] = true;
        t->span_at[t->n_spans] = i;
        t->span_len[t->n_spans++] = 1;
    }
    return MOE_OK;
}

/* Room for one forward of n tokens. */
static moe_status reserve(moe_token_sched *t, int n) {
    if (n <= t->cap) return MOE_OK;
    int32_t **bufs[] = {&t->tok, &t->pos, &t->seq};
    for (int i = 0; i < 3; i++) {
        int32_t *p = realloc(*bufs[i], sizeof *p * (size_t)n);
        if (!p) return moe_error(MOE_ERR_OOM, "token scheduler: out of host memory for %d tokens", n);
        *bufs[i] = p;
    }
    int32_t *r = realloc(t->route, sizeof *r * (size_t)t->n_layers * (size_t)n * (size_t)(t->k > 0 ? t->k : 1));
    if (!r) return moe_error(MOE_ERR_OOM, "token scheduler: out of host memory for %d tokens' routes", n);
    t->route = r;
    t->cap = n;
    return MOE_OK;
}

/* Distinct (layer, expert) pairs of the route ids of a forward of n tokens. */
static int64_t distinct_experts(moe_token_sched *t, int n) {
    memset(t->expert_seen, 0, sizeof *t->expert_seen * (size_t)t->n_layers * (size_t)t->E);
    int64_t count = 0, per_layer = (int64_t)n * t->k;
    for (int l = 0; l < t->n_layers; l++)
        for (int64_t i = 0; i < per_layer; i++) {
            int e = t->route[l * per_layer + i];
            if (e < 0 || e >= t->E || t->expert_seen[l * t->E + e]) continue;
            t->expert_seen[l * t->E + e] = true;
            count++;
        }
    return count;
}

/* One forward of b into out, counted as decode or prefill; its tokens join the histories. */
static moe_status forward_one(moe_token_sched *t, moe_decode_state *s, const moe_batch *b, float *out, bool decode) {
    moe_decode_info info = {.route_ids = t->route};
    moe_step_reset();
    MOE_TRY(moe_decoder_forward(t->d, s, b, out, &info));
    moe_forward_tally *tally = decode ? &t->counts.decode : &t->counts.prefill;
    tally->forwards++;
    tally->experts += distinct_experts(t, b->n_tokens);
    moe_token_sched_observe(t, b);
    return MOE_OK;
}

/* One forward of spans part [n] of b, in that order; their logits rows go to the rows of
 * logits a forward of b would give them. */
static moe_status forward_part(moe_token_sched *t, moe_decode_state *s, const moe_batch *b, const int32_t *part,
                               int n, float *logits, bool decode) {
    int nt = 0;
    for (int i = 0; i < n; i++) {
        int at = t->span_at[part[i]], len = t->span_len[part[i]];
        memcpy(t->tok + nt, b->tokens + at, sizeof *t->tok * (size_t)len);
        memcpy(t->pos + nt, b->pos + at, sizeof *t->pos * (size_t)len);
        memcpy(t->seq + nt, b->seq + at, sizeof *t->seq * (size_t)len);
        nt += len;
    }
    moe_batch sub = {.n_tokens = nt, .tokens = t->tok, .pos = t->pos, .seq = t->seq, .logits = MOE_LOGITS_LAST};
    MOE_TRY(forward_one(t, s, &sub, t->rows, decode));
    for (int i = 0; i < n; i++)
        memcpy(logits + (size_t)part[i] * t->V, t->rows + (size_t)i * t->V, sizeof *logits * (size_t)t->V);
    return MOE_OK;
}

/* The spans of one token (dec, their rows in dtok, dpos, dseq); returns their count. */
static int decode_spans(moe_token_sched *t, const moe_batch *b) {
    int n = 0;
    for (int j = 0; j < t->n_spans; j++) {
        if (t->span_len[j] != 1) continue;
        int at = t->span_at[j];
        t->dtok[n] = b->tokens[at], t->dpos[n] = b->pos[at], t->dseq[n] = b->seq[at];
        t->dec[n++] = j;
    }
    return n;
}

moe_status moe_token_sched_forward(moe_token_sched *t, moe_decode_state *s, const moe_batch *b, float *logits) {
    MOE_ASSERT(b && b->n_tokens > 0, "token scheduler: an empty batch");
    MOE_TRY(find_spans(t, b));
    MOE_TRY(reserve(t, b->n_tokens));
    int n_dec = decode_spans(t, b);
    if (b->logits != MOE_LOGITS_LAST || t->micro <= 0 || n_dec <= t->micro)
        return forward_one(t, s, b, logits, n_dec == t->n_spans);
    MOE_TRY(moe_token_sched_order(t, t->dtok, t->dpos, t->dseq, n_dec, t->order));
    for (int b0 = 0; b0 < n_dec; b0 += t->micro) {
        int n = n_dec - b0 < t->micro ? n_dec - b0 : t->micro;
        for (int i = 0; i < n; i++) t->part[i] = t->dec[t->order[b0 + i]];
        MOE_TRY(forward_part(t, s, b, t->part, n, logits, true));
    }
    int n_rest = 0;
    for (int j = 0; j < t->n_spans; j++)
        if (t->span_len[j] != 1) t->part[n_rest++] = j;
    return n_rest > 0 ? forward_part(t, s, b, t->part, n_rest, logits, false) : MOE_OK;
}
