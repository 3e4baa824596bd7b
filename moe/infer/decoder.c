/* The decoder and its decode state (see decoder.h): batch checks, paged KV blocks,
 * recurrent states per slot, the forward through the model's one forward with this file's
 * cache callbacks, and the logits rows a batch asks for. */
#include "moe/infer/decoder.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/fileio.h"
#include "core/graph.h"
#include "core/memory.h"
#include "core/ops.h"

struct moe_decoder {
    moe_model *m;   /* borrowed */
    moe_model view; /* m's weights in the compute dtype (moe_model_cast_view) */
    const moe_expert_provider *provider; /* installed on view's MoE layers, or NULL: all resident */
    moe_expert_path experts;             /* moe_forward.experts of every forward */
    bool graphs;                         /* decode steps may replay recorded graphs */
    char graphs_off[256];                /* why recording was given up ("" while it works) */
};

/* One sequence slot: its KV block table and where it stands. */
typedef struct seq_slot {
    int64_t len;   /* tokens in the cache */
    int64_t first; /* position of its first token */
    int32_t *blocks; /* [cap] pool blocks holding positions [j * MOE_KV_BLOCK, (j + 1) * MOE_KV_BLOCK) */
    int n_blocks, cap;
} seq_slot;

struct moe_decode_state {
    moe_decoder *d;
    int max_seqs, n_layers;
    bool has_kv;
    int n_blocks;              /* blocks in the pool */
    moe_tensor **k_pool, **v_pool; /* per layer: [n_blocks * MOE_KV_BLOCK, Hc, Dc] (attention) or NULL */
    moe_tensor **rec;          /* per layer: [max_seqs * n_mem, H, dk, dv] (mom / gdn) or NULL */
    int32_t *free_blocks;      /* [n_blocks] stack of free block ids */
    int n_free;
    seq_slot *seqs;            /* [max_seqs] */
    /* the forward in flight */
    const int32_t *span_seq;   /* [n_spans] the slot of each span */
    int n_spans;
    moe_tensor *kv_write;      /* I32 [T]: the pool row of each new token */
    moe_tensor *kv_read;       /* I32 [K]: the pool rows of every position of each span's sequence, span after span */
    moe_tensor *kv_seg;        /* I32 [2, n_spans + 1]: the spans' query offsets, then their offsets in kv_read */
    int64_t kv_max_k;          /* the longest span's keys, or a bound on them (recorded steps) */
    moe_tensor **staged;       /* [n_layers * n_spans] recurrent states after each span */
    /* recorded decode steps (one token per sequence): inputs at fixed addresses, rewritten
     * before each launch, and one graph per batch size */
    moe_tensor *in_ids, *in_pos, *in_write, *in_seg, *in_rows; /* I32 [max_seqs] x 3, [2 (max_seqs + 1)], [pool rows] */
    moe_tensor *out_logits;    /* F32 [max_seqs V] */
    moe_graph **graphs;        /* [max_seqs]: by batch size - 1, or NULL */
    int64_t *graph_bound;      /* [max_seqs]: the key bound each graph's attention grid was sized for */
};

moe_status moe_decoder_open(moe_model *m, moe_dtype dtype, moe_decoder **out) {
    return moe_decoder_open_on(m, m->dev, dtype, out);
}

moe_status moe_decoder_open_with(moe_model *m, const moe_decoder_options *o, moe_decoder **out) {
    *out = NULL;
    MOE_ASSERT((o->experts == MOE_EXPERTS_PROVIDED) == (o->provider != NULL),
               "decoder: a provider goes with MOE_EXPERTS_PROVIDED and only with it");
    moe_decoder *d = calloc(1, sizeof *d);
    if (!d) return moe_error(MOE_ERR_OOM, "decoder: out of host memory");
    d->m = m;
    moe_view_spec spec = {.dtype = o->dtype, .dev = o->dev, .experts_host = o->experts == MOE_EXPERTS_PROVIDED};
    moe_status s = moe_model_cast_view_to(m, &spec, &d->view);
    if (s != MOE_OK) {
        free(d);
        return s;
    }
    d->graphs = true;
    d->provider = o->provider;
    for (int i = 0; d->provider && i < d->view.cfg.model.n_layers; i++)
        if (!d->view.blocks[i].dense) moe_moe_layer_set_provider(&d->view.blocks[i].moe, d->provider, i);
    *out = d;
    return MOE_OK;
}

moe_status moe_decoder_open_on(moe_model *m, moe_device dev, moe_dtype dtype, moe_decoder **out) {
    moe_decoder_options o = {.dtype = dtype, .dev = dev, .experts = MOE_EXPERTS_RESIDENT};
    return moe_decoder_open_with(m, &o, out);
}

const moe_model *moe_decoder_view(const moe_decoder *d) { return &d->view; }

void moe_decoder_set_expert_path(moe_decoder *d, moe_expert_path path) { d->experts = path; }

void moe_decoder_set_graphs(moe_decoder *d, bool on) {
    d->graphs = on;
    d->graphs_off[0] = '\0';
}

const char *moe_decoder_graphs_off(const moe_decoder *d) {
    if (!d->graphs) return "turned off";
    return d->graphs_off[0] ? d->graphs_off : NULL;
}

void moe_decoder_close(moe_decoder *d) {
    if (!d) return;
    moe_model_cast_view_free(&d->view, d->m);
    free(d);
}

const moe_model *moe_decoder_model(const moe_decoder *d) { return d->m; }

/* ---- the decode state ---- */

static moe_status alloc_layer_caches(moe_decode_state *s, const moe_model *v) {
    int64_t Hc, Dc;
    moe_model_kv_shape(v, &Hc, &Dc);
    for (int i = 0; i < s->n_layers; i++) {
        const moe_block *b = &v->blocks[i];
        if (b->mixer != MOE_CFG_MIXER_ATTENTION) {
            s->rec[i] = moe_mom_state_zeros(&b->mom, s->max_seqs, v->compute, v->dev, MOE_LIFE_PERSIST);
            if (!s->rec[i]) return moe_last_status();
            continue;
        }
        if (s->n_blocks == 0) continue;
        int64_t shape[3] = {(int64_t)s->n_blocks * MOE_KV_BLOCK, Hc, Dc};
        s->k_pool[i] = moe_tensor_empty(MOE_LIFE_PERSIST, v->dev, v->compute, 3, shape);
        s->v_pool[i] = moe_tensor_empty(MOE_LIFE_PERSIST, v->dev, v->compute, 3, shape);
        if (!s->k_pool[i] || !s->v_pool[i]) return moe_last_status();
    }
    return MOE_OK;
}

moe_status moe_decode_state_create(moe_decoder *d, int max_seqs, int64_t kv_tokens, moe_decode_state **out) {
    *out = NULL;
    const moe_model *v = &d->view;
    if (max_seqs < 1 || kv_tokens < 0 || (kv_tokens + MOE_KV_BLOCK - 1) / MOE_KV_BLOCK > INT32_MAX)
        return moe_error(MOE_ERR_INVALID, "decode state: max_seqs %d must be >= 1 and kv_tokens %lld in [0, 2^31 blocks)",
                         max_seqs, (long long)kv_tokens);
    moe_decode_state *s = calloc(1, sizeof *s);
    if (!s) return moe_error(MOE_ERR_OOM, "decode state: out of host memory");
    s->d = d;
    s->max_seqs = max_seqs;
    s->n_layers = v->cfg.model.n_layers;
    for (int i = 0; i < s->n_layers; i++) s->has_kv = s->has_kv || v->blocks[i].mixer == MOE_CFG_MIXER_ATTENTION;
    s->n_blocks = s->has_kv ? (int)((kv_tokens + MOE_KV_BLOCK - 1) / MOE_KV_BLOCK) : 0;
    s->k_pool = calloc((size_t)s->n_layers, sizeof *s->k_pool);
    s->v_pool = calloc((size_t)s->n_layers, sizeof *s->v_pool);
    s->rec = calloc((size_t)s->n_layers, sizeof *s->rec);
    s->free_blocks = malloc(sizeof *s->free_blocks * (size_t)(s->n_blocks + 1));
    s->seqs = calloc((size_t)max_seqs, sizeof *s->seqs);
    moe_status st = s->k_pool && s->v_pool && s->rec && s->free_blocks && s->seqs
                        ? alloc_layer_caches(s, v)
                        : moe_error(MOE_ERR_OOM, "decode state: out of host memory");
    if (st != MOE_OK) {
        moe_decode_state_free(s);
        return st;
    }
    for (int j = 0; j < s->n_blocks; j++) s->free_blocks[j] = s->n_blocks - 1 - j; /* block 0 on top */
    s->n_free = s->n_blocks;
    *out = s;
    return MOE_OK;
}

void moe_decode_state_free(moe_decode_state *s) {
    if (!s) return;
    for (int i = 0; i < s->n_layers; i++) {
        if (s->k_pool) moe_tensor_free(s->k_pool[i]);
        if (s->v_pool) moe_tensor_free(s->v_pool[i]);
        if (s->rec) moe_tensor_free(s->rec[i]);
    }
    for (int q = 0; s->seqs && q < s->max_seqs; q++) free(s->seqs[q].blocks);
    for (int b = 0; s->graphs && b < s->max_seqs; b++) moe_graph_free(s->graphs[b]);
    moe_tensor *ins[] = {s->in_ids, s->in_pos, s->in_write, s->in_seg, s->in_rows, s->out_logits};
    for (size_t i = 0; i < sizeof ins / sizeof *ins; i++) moe_tensor_free(ins[i]);
    free(s->graphs);
    free(s->graph_bound);
    free(s->k_pool);
    free(s->v_pool);
    free(s->rec);
    free(s->free_blocks);
    free(s->seqs);
    free(s);
}

/* Gives back blocks [keep, n_blocks) of slot q. */
static void release_blocks(moe_decode_state *s, seq_slot *q, int keep) {
    while (q->n_blocks > keep) s->free_blocks[s->n_free++] = q->blocks[--q->n_blocks];
}

moe_status moe_decode_state_seq_free(moe_decode_state *s, int seq) {
    MOE_ASSERT(seq >= 0 && seq < s->max_seqs, "decode state: sequence slot %d of %d", seq, s->max_seqs);
    release_blocks(s, &s->seqs[seq], 0);
    s->seqs[seq].len = 0;
    s->seqs[seq].first = 0;
    return MOE_OK;
}

int64_t moe_decode_state_seq_len(const moe_decode_state *s, int seq) {
    MOE_ASSERT(seq >= 0 && seq < s->max_seqs, "decode state: sequence slot %d of %d", seq, s->max_seqs);
    return s->seqs[seq].len;
}

int64_t moe_decode_state_free_tokens(const moe_decode_state *s) {
    return s->has_kv ? (int64_t)s->n_free * MOE_KV_BLOCK : INT64_MAX;
}

int moe_decode_state_max_seqs(const moe_decode_state *s) { return s->max_seqs; }

/* Blocks so that slot q holds `tokens` positions; *taken counts the blocks added. */
static moe_status reserve_blocks(moe_decode_state *s, seq_slot *q, int64_t tokens) {
    int need = (int)((tokens + MOE_KV_BLOCK - 1) / MOE_KV_BLOCK);
    if (need > q->cap) {
        int cap = need > 2 * q->cap ? need : 2 * q->cap;
        int32_t *b = realloc(q->blocks, sizeof *b * (size_t)cap);
        if (!b) return moe_error(MOE_ERR_OOM, "decode state: out of host memory");
        q->blocks = b;
        q->cap = cap;
    }
    if (need - q->n_blocks > s->n_free)
        return moe_error(MOE_ERR_OOM, "decode state: the KV pool is full (%d free blocks of %d tokens, %d more needed)",
                         s->n_free, MOE_KV_BLOCK, need - q->n_blocks);
    while (q->n_blocks < need) q->blocks[q->n_blocks++] = s->free_blocks[--s->n_free];
    return MOE_OK;
}

/* ---- the batch ---- */

/* Splits b into spans (one per run of a slot), checking the batch rules; spans and
 * span_seq have room for n_tokens. */
static moe_status batch_spans(const moe_decode_state *s, const moe_batch *b, int vocab, moe_span *spans,
                              int32_t *span_seq, int *n_spans) {
    if (b->n_tokens < 1 || !b->tokens || !b->pos || !b->seq)
        return moe_error(MOE_ERR_INVALID, "decoder: a batch needs n_tokens >= 1 and tokens, pos, seq (got %d)",
                         b->n_tokens);
    int n = 0;
    for (int t = 0; t < b->n_tokens; t++) {
        int q = b->seq[t];
        if (q < 0 || q >= s->max_seqs || b->tokens[t] < 0 || b->tokens[t] >= vocab)
            return moe_error(MOE_ERR_INVALID, "decoder: token %d: sequence %d not in [0, %d) or id %d not in [0, %d)",
                             t, q, s->max_seqs, b->tokens[t], vocab);
        bool starts = t == 0 || q != b->seq[t - 1];
        if (starts) {
            for (int j = 0; j < n; j++)
                if (span_seq[j] == q)
                    return moe_error(MOE_ERR_INVALID, "decoder: sequence %d's tokens are not contiguous in the batch "
                                     "(again at token %d)", q, t);
            const seq_slot *sl = &s->seqs[q];
            int64_t want = sl->len ? sl->first + sl->len : b->pos[t];
            if (b->pos[t] != want || b->pos[t] < 0)
                return moe_error(MOE_ERR_INVALID, "decoder: token %d of sequence %d has position %d; the sequence "
                                 "continues at %lld", t, q, b->pos[t], (long long)want);
            spans[n] = (moe_span){.begin = t, .len = 0, .pos0 = b->pos[t]};
            span_seq[n++] = q;
        } else if (b->pos[t] != b->pos[t - 1] + 1) {
            return moe_error(MOE_ERR_INVALID, "decoder: token %d of sequence %d has position %d after %d (positions "
                             "must be consecutive)", t, q, b->pos[t], b->pos[t - 1]);
        }
        spans[n - 1].len++;
    }
    *n_spans = n;
    return MOE_OK;
}

/* ---- the cache callbacks of the model's forward ---- */

/* Pool row of position p of slot q. */
static int32_t pool_row(const seq_slot *q, int64_t p) {
    return q->blocks[p / MOE_KV_BLOCK] * MOE_KV_BLOCK + (int32_t)(p % MOE_KV_BLOCK);
}

/* The forward's KV tables on the host, once for all attention layers (the spans' blocks
 * are reserved): wr [T] the pool row of each new token, rd [K] the pool rows of every
 * position of each span's sequence, span after span, seg [2, n_spans + 1] the spans' query
 * offsets and then their offsets in rd; *max_k the longest span's keys. */
typedef struct kv_tables {
    int32_t *wr, *rd, *seg;
    int64_t K, max_k;
} kv_tables;

static moe_status plan_kv_tables(const moe_decode_state *s, const moe_span *spans, int64_t n_tokens, kv_tables *t) {
    int n = s->n_spans;
    t->seg = moe_step_host_alloc(sizeof *t->seg * 2 * (size_t)(n + 1));
    t->wr = moe_step_host_alloc(sizeof *t->wr * (size_t)n_tokens);
    if (!t->seg || !t->wr) return moe_error(MOE_ERR_OOM, "decoder: out of host memory");
    int32_t *q_off = t->seg, *k_off = t->seg + n + 1;
    t->K = t->max_k = 0;
    for (int j = 0; j < n; j++) {
        int64_t keys = s->seqs[s->span_seq[j]].len + spans[j].len;
        q_off[j] = (int32_t)spans[j].begin;
        k_off[j] = (int32_t)t->K;
        t->K += keys;
        t->max_k = keys > t->max_k ? keys : t->max_k;
    }
    q_off[n] = (int32_t)n_tokens;
    k_off[n] = (int32_t)t->K;
    t->rd = moe_step_host_alloc(sizeof *t->rd * (size_t)(t->K ? t->K : 1));
    if (!t->rd) return moe_error(MOE_ERR_OOM, "decoder: out of host memory");
    for (int j = 0; j < n; j++) {
        const seq_slot *q = &s->seqs[s->span_seq[j]];
        for (int64_t i = 0; i < spans[j].len; i++) t->wr[spans[j].begin + i] = pool_row(q, q->len + i);
        for (int64_t p = 0; p < k_off[j + 1] - k_off[j]; p++) t->rd[k_off[j] + p] = pool_row(q, p);
    }
    return MOE_OK;
}

/* The KV tables as STEP tensors of this forward. */
static moe_status upload_kv_tables(moe_decode_state *s, const kv_tables *t, int64_t n_tokens) {
    moe_device dev = s->d->view.dev;
    s->kv_write = moe_tensor_from_host(MOE_LIFE_STEP, dev, MOE_I32, 1, (int64_t[]){n_tokens}, t->wr);
    s->kv_read = moe_tensor_from_host(MOE_LIFE_STEP, dev, MOE_I32, 1, (int64_t[]){t->K}, t->rd);
    s->kv_seg = moe_tensor_from_host(MOE_LIFE_STEP, dev, MOE_I32, 2, (int64_t[]){2, s->n_spans + 1}, t->seg);
    s->kv_max_k = t->max_k;
    return s->kv_write && s->kv_read && s->kv_seg ? MOE_OK : moe_last_status();
}

static moe_status cache_kv(void *ctx, int layer, moe_kv_pages *out, moe_tensor **write_rows) {
    moe_decode_state *s = ctx;
    *out = (moe_kv_pages){.k_pool = s->k_pool[layer], .v_pool = s->v_pool[layer], .rows = s->kv_read, .seg = s->kv_seg,
                          .max_k = s->kv_max_k};
    *write_rows = s->kv_write;
    return MOE_OK;
}

static moe_tensor *cache_state(void *ctx, int layer, int span) {
    moe_decode_state *s = ctx;
    int q = s->span_seq[span];
    const moe_block *b = &s->d->view.blocks[layer];
    if (s->seqs[q].len == 0) /* a fresh sequence: zeros, whatever the slot held before */
        return moe_mom_state_zeros(&b->mom, 1, s->d->view.compute, s->d->view.dev, MOE_LIFE_STEP);
    int64_t P = b->mom.n_mem;
    return moe_slice(s->rec[layer], 0, q * P, (q + 1) * P);
}

static moe_status cache_set_state(void *ctx, int layer, int span, moe_tensor *state) {
    moe_decode_state *s = ctx;
    s->staged[layer * s->n_spans + span] = state;
    return MOE_OK;
}

/* After a successful forward: the lengths grow and the recurrent states are kept. */
static moe_status commit(moe_decode_state *s, const moe_span *spans) {
    for (int j = 0; j < s->n_spans; j++) {
        seq_slot *q = &s->seqs[s->span_seq[j]];
        for (int i = 0; i < s->n_layers; i++) {
            moe_tensor *st = s->staged[i * s->n_spans + j];
            if (!st) continue;
            int64_t P = s->d->view.blocks[i].mom.n_mem, at = s->span_seq[j] * P;
            MOE_TRY(moe_tensor_copy_(moe_slice(s->rec[i], 0, at, at + P), st));
        }
        if (q->len == 0) q->first = spans[j].pos0;
        q->len += spans[j].len;
    }
    return MOE_OK;
}

/* ---- the forward ---- */

/* Rows of hidden [N, d] to project: every token, or each span's last (every token again
 * when each span is one token). */
static moe_tensor *logit_rows(moe_tensor *hidden, const moe_batch *b, const moe_span *spans, int n_spans) {
    if (b->logits == MOE_LOGITS_ALL || n_spans == b->n_tokens) return hidden;
    int32_t *rows = moe_step_host_alloc(sizeof *rows * (size_t)n_spans);
    if (!rows) {
        moe_error(MOE_ERR_OOM, "decoder: out of host memory");
        return NULL;
    }
    for (int j = 0; j < n_spans; j++) rows[j] = (int32_t)(spans[j].begin + spans[j].len - 1);
    moe_tensor *idx = moe_tensor_from_host(MOE_LIFE_STEP, hidden->device, MOE_I32, 1, (int64_t[]){n_spans}, rows);
    return moe_index_select(hidden, idx);
}

/* The model's forward of batch b on ids [1, T] at positions pos [T] (device), against the
 * caches of s (the KV tables in place): the asked-for logits rows [rows, V] f32 on the
 * device, or (MOE_LOGITS_NONE) the hidden states. */
static moe_tensor *forward_logits(moe_decoder *d, moe_decode_state *s, const moe_batch *b, const moe_span *spans,
                                  moe_tensor *ids, moe_tensor *pos, moe_decode_info *info) {
    moe_model *v = &d->view;
    moe_cache_ops ops = {.ctx = s, .kv = cache_kv, .state = cache_state, .set_state = cache_set_state};
    moe_forward f = {.mode = MOE_FORWARD_INFER, .B = 1, .T = b->n_tokens, .spans = spans, .n_spans = s->n_spans,
                     .cache = &ops, .positions = pos, .route_ids = info ? info->route_ids : NULL,
                     .experts = d->experts};
    moe_tensor *hidden = moe_model_forward(v, ids, &f);
    if (!hidden || b->logits == MOE_LOGITS_NONE) return hidden;
    moe_tensor *h = logit_rows(hidden, b, spans, s->n_spans);
    return moe_cast(moe_matmul(h, moe_transpose(moe_model_head(v), 0, 1)), MOE_F32); /* [rows, V] */
}

/* Device logits lg into the host (none under MOE_LOGITS_NONE); info->issue_ms (since t0)
 * first, before the read waits for the device. */
static moe_status read_logits(moe_tensor *lg, const moe_batch *b, float *logits, double t0, moe_decode_info *info) {
    if (info) info->issue_ms = moe_clock_ms() - t0;
    if (b->logits == MOE_LOGITS_NONE) return MOE_OK;
    moe_tensor *host = moe_tensor_to(lg, MOE_CPU, MOE_LIFE_STEP);
    if (!host) return moe_last_status();
    memcpy(logits, host->data, sizeof(float) * (size_t)moe_tensor_numel(host));
    return MOE_OK;
}

/* Reserves the KV blocks of every span (all or none). */
static moe_status reserve_all(moe_decode_state *s, const moe_span *spans, int n_spans, int *held) {
    for (int j = 0; j < n_spans; j++) held[j] = s->seqs[s->span_seq[j]].n_blocks;
    moe_status st = MOE_OK;
    for (int j = 0; j < n_spans && st == MOE_OK && s->has_kv; j++) {
        seq_slot *q = &s->seqs[s->span_seq[j]];
        st = reserve_blocks(s, q, q->len + spans[j].len);
    }
    return st;
}

/* Any batch, op by op. */
static moe_status run_forward(moe_decoder *d, moe_decode_state *s, const moe_batch *b, const moe_span *spans,
                              float *logits, double t0, moe_decode_info *info) {
    moe_device dev = d->view.dev;
    moe_tensor *pos = moe_tensor_from_host(MOE_LIFE_STEP, dev, MOE_I32, 1, (int64_t[]){b->n_tokens}, b->pos);
    moe_tensor *ids = moe_tensor_from_host(MOE_LIFE_STEP, dev, MOE_I32, 2, (int64_t[]){1, b->n_tokens}, b->tokens);
    if (!pos || !ids) return moe_last_status();
    if (s->has_kv) {
        kv_tables t;
        MOE_TRY(plan_kv_tables(s, spans, b->n_tokens, &t));
        MOE_TRY(upload_kv_tables(s, &t, b->n_tokens));
    }
    if (d->provider && d->provider->begin)
        MOE_TRY(d->provider->begin(d->provider->ctx, b->tokens, b->pos, b->seq, b->n_tokens));
    moe_tensor *lg = forward_logits(d, s, b, spans, ids, pos, info);
    if (!lg) return moe_last_status();
    MOE_TRY(read_logits(lg, b, logits, t0, info));
    return commit(s, spans);
}

/* ---- recorded decode steps ---- */

/* Whether batch b (n_spans spans) is a step this decoder records: one token per sequence,
 * logits wanted, no routes asked for, every expert resident, a forward that issues no
 * host transfer, and nothing in the device's step arena yet (so that every such step finds
 * it where the recording did). */
static bool recordable_step(const moe_decoder *d, const moe_batch *b, int n_spans, const moe_decode_info *info) {
    moe_mem_mark at = moe_mem_step_mark(d->view.dev); /* a fresh step: a replay finds the arena as recorded */
    return d->graphs && !d->graphs_off[0] && !d->provider && n_spans == b->n_tokens && b->logits != MOE_LOGITS_NONE &&
           !(info && info->route_ids) && !at.top && at.total_used == 0 &&
           moe_model_decode_recordable(&d->view, b->n_tokens, d->experts);
}

/* The fixed-address inputs of recorded steps, once per state. */
static moe_status alloc_step_inputs(moe_decode_state *s) {
    if (s->graphs) return MOE_OK;
    const moe_model *v = &s->d->view;
    int64_t n = s->max_seqs, R = (int64_t)s->n_blocks * MOE_KV_BLOCK, V = v->cfg.model.vocab_size;
    moe_tensor **in[] = {&s->in_ids, &s->in_pos, &s->in_write, &s->in_seg, &s->in_rows, &s->out_logits};
    int64_t len[] = {n, n, n, 2 * (n + 1), R > 0 ? R : 1, n * V};
    for (int i = 0; i < 6; i++) {
        *in[i] = moe_tensor_empty(MOE_LIFE_PERSIST, v->dev, i < 5 ? MOE_I32 : MOE_F32, 1, &len[i]);
        if (*in[i]) continue;
        for (int j = 0; j < i; j++) {
            moe_tensor_free(*in[j]);
            *in[j] = NULL;
        }
        return moe_last_status();
    }
    s->graph_bound = calloc((size_t)n, sizeof *s->graph_bound);
    s->graphs = calloc((size_t)n, sizeof *s->graphs);
    return s->graphs && s->graph_bound ? MOE_OK : moe_error(MOE_ERR_OOM, "decoder: out of host memory");
}

/* The first n elements of flat t as `shape` (a view). */
static moe_tensor *head_view(moe_tensor *t, int64_t n, int ndim, const int64_t *shape) {
    return moe_reshape(moe_slice(t, 0, 0, n), ndim, shape);
}

/* Batch b and its KV tables t into the fixed inputs; the forward's views of them. */
static moe_status write_step_inputs(moe_decode_state *s, const moe_batch *b, const kv_tables *t, int64_t bound,
                                    moe_tensor **ids, moe_tensor **pos) {
    int64_t B = b->n_tokens, W = 2 * (B + 1);
    *ids = head_view(s->in_ids, B, 2, (int64_t[]){1, B});
    *pos = head_view(s->in_pos, B, 1, &B);
    s->kv_write = head_view(s->in_write, B, 1, &B);
    s->kv_seg = head_view(s->in_seg, W, 2, (int64_t[]){2, B + 1});
    s->kv_read = s->in_rows;
    s->kv_max_k = bound;
    if (!*ids || !*pos || !s->kv_write || !s->kv_seg) return moe_last_status();
    MOE_TRY(moe_tensor_write_host(*ids, b->tokens));
    MOE_TRY(moe_tensor_write_host(*pos, b->pos));
    MOE_TRY(moe_tensor_write_host(s->kv_write, t->wr));
    MOE_TRY(moe_tensor_write_host(s->kv_seg, t->seg));
    moe_tensor *rd = moe_slice(s->in_rows, 0, 0, t->K);
    return rd ? moe_tensor_write_host(rd, t->rd) : moe_last_status();
}

/* Records batch b's forward with its logits into out [B, V]: *g the graph to launch, or
 * NULL when the device ran it as it went (the CPU). */
static moe_status record_step(moe_decoder *d, moe_decode_state *s, const moe_batch *b, const moe_span *spans,
                              moe_tensor *ids, moe_tensor *pos, moe_tensor *out, moe_graph **g) {
    moe_device dev = d->view.dev;
    MOE_TRY(moe_graph_begin(dev));
    moe_tensor *lg = forward_logits(d, s, b, spans, ids, pos, NULL);
    moe_status st = lg ? moe_tensor_copy_(out, lg) : moe_last_status();
    moe_status end = moe_graph_end(dev, st == MOE_OK, g);
    return st != MOE_OK ? st : end;
}

/* A decode step from its recorded graph (recorded first where there is none for this batch
 * size and key bound, or the step arena moved): the inputs are rewritten, the graph
 * launched. The attention grid is sized for a key bound of a power of two >= 256. */
static moe_status run_recorded(moe_decoder *d, moe_decode_state *s, const moe_batch *b, const moe_span *spans,
                               float *logits, double t0, moe_decode_info *info) {
    int B = b->n_tokens;
    kv_tables t;
    moe_tensor *ids, *pos;
    MOE_TRY(alloc_step_inputs(s));
    MOE_TRY(plan_kv_tables(s, spans, B, &t));
    int64_t bound = 256;
    while (bound < t.max_k) bound *= 2;
    MOE_TRY(write_step_inputs(s, b, &t, bound, &ids, &pos));
    int64_t V = d->view.cfg.model.vocab_size;
    moe_tensor *out = head_view(s->out_logits, B * V, 2, (int64_t[]){B, V});
    moe_graph **g = &s->graphs[B - 1];
    if (*g && (s->graph_bound[B - 1] != bound || !moe_graph_replayable(*g))) {
        moe_graph_free(*g);
        *g = NULL;
    }
    if (*g) {
        MOE_TRY(moe_graph_launch(*g));
    } else {
        MOE_TRY(out ? record_step(d, s, b, spans, ids, pos, out, g) : moe_last_status());
        s->graph_bound[B - 1] = bound;
        if (*g) MOE_TRY(moe_graph_launch(*g));
    }
    MOE_TRY(read_logits(out, b, logits, t0, info));
    return commit(s, spans);
}

/* A decode step recorded where it can be, else (and for good once recording failed: the
 * reason stays in graphs_off) op by op. */
static moe_status run_step(moe_decoder *d, moe_decode_state *s, const moe_batch *b, const moe_span *spans,
                           float *logits, double t0, moe_decode_info *info) {
    if (info) info->recorded = false;
    if (!recordable_step(d, b, s->n_spans, info)) return run_forward(d, s, b, spans, logits, t0, info);
    moe_status st = run_recorded(d, s, b, spans, logits, t0, info);
    if (info) info->recorded = st == MOE_OK;
    if (st == MOE_OK) return MOE_OK;
    snprintf(d->graphs_off, sizeof d->graphs_off, "%s", moe_last_error());
    return run_forward(d, s, b, spans, logits, t0, info);
}

moe_status moe_decoder_forward(moe_decoder *d, moe_decode_state *s, const moe_batch *b, float *logits,
                               moe_decode_info *info) {
    MOE_ASSERT(s->d == d, "decoder: the decode state belongs to another decoder");
    MOE_ASSERT(logits || b->logits == MOE_LOGITS_NONE, "decoder: logits needed for mode %d", (int)b->logits);
    const double t0 = moe_clock_ms();
    size_t n = (size_t)(b->n_tokens > 0 ? b->n_tokens : 1);
    moe_span *spans = moe_step_host_alloc(sizeof *spans * n);
    int32_t *span_seq = moe_step_host_alloc(sizeof *span_seq * n);
    int *held = moe_step_host_alloc(sizeof *held * n);
    if (!spans || !span_seq || !held) return moe_error(MOE_ERR_OOM, "decoder: out of host memory");
    int n_spans = 0;
    MOE_TRY(batch_spans(s, b, d->view.cfg.model.vocab_size, spans, span_seq, &n_spans));
    s->span_seq = span_seq;
    s->n_spans = n_spans;
    s->staged = moe_step_host_alloc(sizeof *s->staged * (size_t)(s->n_layers * n_spans));
    if (!s->staged) return moe_error(MOE_ERR_OOM, "decoder: out of host memory");
    memset(s->staged, 0, sizeof *s->staged * (size_t)(s->n_layers * n_spans));
    bool was = moe_grad_set_enabled(false);
    moe_status st = reserve_all(s, spans, n_spans, held);
    if (st == MOE_OK) st = run_step(d, s, b, spans, logits, t0, info);
    moe_grad_set_enabled(was);
    if (st != MOE_OK) /* the new blocks go back; lengths and states were not touched */
        for (int j = 0; j < n_spans; j++) release_blocks(s, &s->seqs[span_seq[j]], held[j]);
    s->span_seq = NULL;
    s->staged = NULL;
    s->n_spans = 0;
    s->kv_write = s->kv_read = s->kv_seg = NULL;
    return st;
}

moe_status moe_decoder_feed(moe_decoder *d, moe_decode_state *s, int seq, const int32_t *tokens, int n,
                            float *logits) {
    MOE_ASSERT(seq >= 0 && seq < s->max_seqs && n > 0, "decoder: feed %d tokens to slot %d of %d", n, seq, s->max_seqs);
    int32_t *pos = moe_step_host_alloc(sizeof *pos * (size_t)n), *sq = moe_step_host_alloc(sizeof *sq * (size_t)n);
    if (!pos || !sq) return moe_error(MOE_ERR_OOM, "decoder: out of host memory");
    const seq_slot *q = &s->seqs[seq];
    for (int t = 0; t < n; t++) {
        pos[t] = (int32_t)(q->first + q->len + t);
        sq[t] = seq;
    }
    moe_batch b = {.n_tokens = n, .tokens = tokens, .pos = pos, .seq = sq, .logits = MOE_LOGITS_LAST};
    return moe_decoder_forward(d, s, &b, logits, NULL);
}

moe_status moe_model_logits(moe_model *m, const int32_t *tokens, int B, int T, int64_t pos0, float *logits,
                            int32_t *route_ids) {
    moe_decoder *d = NULL;
    moe_status st = moe_decoder_open(m, m->compute, &d);
    if (st == MOE_OK) st = moe_decoder_logits(d, tokens, B, T, pos0, logits, route_ids);
    moe_decoder_close(d);
    return st;
}

moe_status moe_decoder_logits(moe_decoder *d, const int32_t *tokens, int B, int T, int64_t pos0, float *logits,
                              int32_t *route_ids) {
    int64_t n = (int64_t)B * T;
    int32_t *pos = malloc(sizeof *pos * (size_t)n), *seq = malloc(sizeof *seq * (size_t)n);
    moe_decode_state *s = NULL;
    moe_status st = pos && seq ? MOE_OK : moe_error(MOE_ERR_OOM, "logits: out of host memory");
    int64_t per_seq = (T + MOE_KV_BLOCK - 1) / MOE_KV_BLOCK * MOE_KV_BLOCK; /* whole blocks each */
    if (st == MOE_OK) st = moe_decode_state_create(d, B, B * per_seq, &s);
    for (int64_t i = 0; st == MOE_OK && i < n; i++) {
        pos[i] = (int32_t)(pos0 + i % T);
        seq[i] = (int32_t)(i / T);
    }
    moe_batch b = {.n_tokens = (int)n, .tokens = tokens, .pos = pos, .seq = seq, .logits = MOE_LOGITS_ALL};
    moe_decode_info info = {.route_ids = route_ids};
    if (st == MOE_OK) st = moe_decoder_forward(d, s, &b, logits, &info);
    moe_decode_state_free(s);
    free(pos);
    free(seq);
    return st;
}
