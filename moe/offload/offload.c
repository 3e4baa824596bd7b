/* Offloaded inference (see offload.h): the budget split, opening the decoder with this
 * file's expert provider, the prefetch of predicted experts and each step's expert groups
 * gathered from the cache slots and the host store. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/device.h"
#include "core/fileio.h"
#include "core/memory.h"
#include "core/ops.h"
#include "moe/offload/offload_internal.h"

static const char *const policy_names[MOE_OFFLOAD_POLICY_COUNT] = {"resident", "lru", "lfu", "predict", "cpu", "auto"};

const char *moe_offload_policy_name(moe_offload_policy p) { return policy_names[p]; }

moe_status moe_offload_policy_parse(const char *name, moe_offload_policy *out) {
    for (int p = 0; p < MOE_OFFLOAD_POLICY_COUNT; p++)
        if (!strcmp(name, policy_names[p])) {
            *out = (moe_offload_policy)p;
            return MOE_OK;
        }
    return moe_error(MOE_ERR_CONFIG, "--policy %s: not a policy (predict|lru|lfu|resident|cpu|auto)", name);
}

moe_status moe_parse_bytes(const char *text, size_t *out) {
    char *end = NULL;
    double v = strtod(text, &end);
    static const struct { const char *suffix; double scale; } units[] = {
        {"", 1}, {"B", 1}, {"K", 1e3}, {"KB", 1e3}, {"KiB", 1024.0}, {"M", 1e6}, {"MB", 1e6}, {"MiB", 1048576.0},
        {"G", 1e9}, {"GB", 1e9}, {"GiB", 1073741824.0}, {"T", 1e12}, {"TB", 1e12}, {"TiB", 1099511627776.0}};
    for (size_t i = 0; end != text && v >= 0 && i < sizeof units / sizeof units[0]; i++)
        if (!strcmp(end, units[i].suffix) && v * units[i].scale < 1.8e19) {
            *out = (size_t)(v * units[i].scale);
            return MOE_OK;
        }
    return moe_error(MOE_ERR_CONFIG, "'%s' is not a size (e.g. 6GiB, 512MiB, 1.5G or bytes)", text);
}

/* ---- the budget ---- */

static void fmt_bytes(size_t b, char *buf, size_t cap) {
    if (b >= (size_t)1 << 30) snprintf(buf, cap, "%.2f GiB", (double)b / (1 << 30));
    else if (b >= (size_t)1 << 20) snprintf(buf, cap, "%.1f MiB", (double)b / (1 << 20));
    else snprintf(buf, cap, "%.1f KiB", (double)b / 1024);
}

/* Elements of expert e of a layer's slot: w13 [d, 2 w] and w2 [w, d]. */
static int64_t expert_elems(const moe_model *m, int e) {
    return 3 * (int64_t)m->cfg.model.d_model * moe_config_expert_ffn_dim(&m->cfg, e);
}

/* KV blocks of every attention layer and the recurrent states of the others. */
static moe_status state_bytes(const moe_model *m, const moe_offload_options *o, size_t *out) {
    int64_t Hc, Dc, kv = (o->kv_tokens + MOE_KV_BLOCK - 1) / MOE_KV_BLOCK * MOE_KV_BLOCK;
    moe_model_kv_shape(m, &Hc, &Dc);
    size_t es = moe_dtype_size(o->dtype), total = 0;
    for (int i = 0; i < m->cfg.model.n_layers; i++) {
        const moe_block *b = &m->blocks[i];
        if (b->mixer == MOE_CFG_MIXER_ATTENTION) {
            total += 2 * (size_t)(kv * Hc * Dc) * es;
            continue;
        }
        moe_mem_mark mark = moe_mem_step_mark(MOE_CPU);
        moe_tensor *st = moe_mom_state_zeros(&b->mom, 1, o->dtype, MOE_CPU, MOE_LIFE_STEP); /* only its size */
        if (!st) return moe_last_status();
        total += (size_t)moe_tensor_numel(st) * es * (size_t)o->max_seqs;
        moe_mem_step_release(MOE_CPU, mark);
    }
    *out = total;
    return MOE_OK;
}

moe_status moe_offload_plan(const moe_model *m, const moe_offload_options *o, moe_offload_split *sp,
                            size_t *min_budget) {
    const moe_cfg_model *c = &m->cfg.model;
    memset(sp, 0, sizeof *sp);
    size_t es = moe_dtype_size(o->dtype);
    int64_t widest = 0, widest_ffn = 0, moe_layers = 0; /* an expert's elements, its hidden width */
    for (int e = 0; e < c->n_experts; e++) {
        if (expert_elems(m, e) > widest) widest = expert_elems(m, e);
        if (moe_config_expert_ffn_dim(&m->cfg, e) > widest_ffn) widest_ffn = moe_config_expert_ffn_dim(&m->cfg, e);
    }
    for (int i = 0; i < c->n_layers; i++) moe_layers += !m->blocks[i].dense;
    for (int p = 0; p < m->n_params; p++)
        if (!m->params[p].expert_stack) sp->dense += (size_t)moe_tensor_numel(m->params[p].t) * es;
        else sp->store += (size_t)moe_tensor_numel(m->params[p].t) * es;
    MOE_TRY(state_bytes(m, o, &sp->kv));
    int64_t gathered = (int64_t)o->max_batch_tokens * c->top_k < c->n_experts ? (int64_t)o->max_batch_tokens * c->top_k
                                                                               : c->n_experts;
    if (o->max_gather > 0 && o->max_gather < gathered) gathered = o->max_gather;
    /* a token's activations: the attention block's, its logits, and per routed slot its row,
     * the expert's gate and up products, the SwiGLU and the output row */
    int64_t per_token = 8 * (int64_t)c->d_model + c->vocab_size + c->top_k * (2 * (int64_t)c->d_model + 3 * widest_ffn);
    sp->scratch = (size_t)(gathered * widest + (int64_t)o->max_batch_tokens * per_token) * es;
    sp->slot_bytes = (size_t)widest * es;
    sp->experts = (int)(moe_layers * c->n_experts);
    sp->budget = o->budget;
    size_t fixed = sp->dense + sp->kv + sp->scratch;
    *min_budget = fixed + (size_t)c->top_k * sp->slot_bytes;
    if (o->policy == MOE_OFFLOAD_RESIDENT) *min_budget = fixed + (size_t)sp->experts * sp->slot_bytes;
    if (o->budget >= fixed) {
        sp->cache = o->budget - fixed;
        size_t slots = sp->cache / sp->slot_bytes;
        sp->slots = (int)(slots < (size_t)sp->experts ? slots : (size_t)sp->experts);
    }
    return MOE_OK;
}

void moe_offload_print_split(const moe_offload *o, FILE *f) {
    const moe_offload_split *s = &o->split;
    char b[6][32];
    fmt_bytes(s->budget, b[0], 32);
    fmt_bytes(s->dense, b[1], 32);
    fmt_bytes(s->kv, b[2], 32);
    fmt_bytes(s->scratch, b[3], 32);
    fmt_bytes(s->cache, b[4], 32);
    fmt_bytes(s->slot_bytes, b[5], 32);
    fprintf(f, "offload: budget %s = dense %s + KV cache %s + scratch %s + expert cache %s (%d slots of %s for %d "
            "experts, %.0f%%; policy %s)\n", b[0], b[1], b[2], b[3], b[4], s->slots, b[5], s->experts,
            100.0 * s->slots / s->experts, moe_offload_policy_name(o->opt.policy));
    fmt_bytes(s->store, b[0], 32);
    fmt_bytes(o->device_bytes, b[1], 32);
    fprintf(f, "offload: host store %s (the experts as the decoder holds them), host-to-device copy %.2f GB/s "
            "(measured at start-up); %s of %s memory held after open (dense weights and expert cache; KV cache and "
            "scratch come with the first batches)\n", b[0], o->rate0 / 1e9, b[1], moe_device_name(o->opt.dev));
}

/* ---- counters ---- */

moe_offload_counts moe_offload_get_counts(const moe_offload *o, int layer) {
    if (layer >= 0) return o->counts[layer];
    moe_offload_counts t = {0};
    for (int i = 0; i < o->n_layers; i++) {
        const moe_offload_counts *c = &o->counts[i];
        t.uses += c->uses, t.hits += c->hits, t.misses += c->misses, t.late += c->late;
        t.host += c->host, t.wasted += c->wasted, t.copies += c->copies, t.bytes += c->bytes;
        t.gather_ms += c->gather_ms, t.expert_ms += c->expert_ms, t.wait_ms += c->wait_ms;
    }
    return t;
}

void moe_offload_reset_counts(moe_offload *o) {
    memset(o->counts, 0, sizeof *o->counts * (size_t)o->n_layers);
    o->predict_ms = 0;
}

double moe_offload_copy_rate(const moe_offload *o) {
    size_t bytes;
    double ms;
    moe_xfer_stats(o->xfer, &bytes, &ms);
    return ms > 0 ? (double)bytes / (ms / 1e3) : 0;
}

static void print_count_line(FILE *f, const char *what, const moe_offload_counts *c) {
    fprintf(f, "offload: %s uses %lld hits %lld (late %lld) misses %lld (host %lld) wasted %lld copies %lld "
            "(%.1f MiB) hit_rate %.3f gather %.2f ms experts %.2f ms waited %.2f ms\n", what, (long long)c->uses,
            (long long)c->hits, (long long)c->late, (long long)c->misses, (long long)c->host, (long long)c->wasted,
            (long long)c->copies, (double)c->bytes / (1 << 20), c->uses ? (double)c->hits / (double)c->uses : 1.0,
            c->gather_ms, c->expert_ms, c->wait_ms);
}

void moe_offload_print_counts(const moe_offload *o, FILE *f) {
    char what[32];
    for (int i = 0; i < o->n_layers; i++) {
        if (o->moe_ord[i] < 0) continue;
        snprintf(what, sizeof what, "layer %d", i);
        print_count_line(f, what, &o->counts[i]);
    }
    moe_offload_counts t = moe_offload_get_counts(o, -1);
    print_count_line(f, "total", &t);
    fprintf(f, "offload: host-to-device %.2f GB/s achieved, prefetch depth %d, predictor %.2f ms\n",
            moe_offload_copy_rate(o) / 1e9, o->depth, o->predict_ms);
}

/* ---- prediction and prefetch ---- */

/* Marks the best predict_width (default top-k) experts of every token of scores [n_moe, n, E]
 * in every MoE layer as predicted. */
static void mark_predicted(moe_offload *o, const float *scores, int n) {
    int width = o->opt.predict_width > 0 ? o->opt.predict_width : o->top_k;
    for (int l = 0; l < o->n_moe; l++)
        for (int t = 0; t < n; t++) {
            const float *row = scores + ((int64_t)l * n + t) * o->E;
            float bar = INFINITY; /* the token's k best: k passes, each the best below the last */
            int last = -1;
            for (int j = 0; j < width; j++) {
                int best = -1;
                for (int e = 0; e < o->E; e++) {
                    bool below = row[e] < bar || (row[e] == bar && e > last);
                    if (below && (best < 0 || row[e] > row[best])) best = e;
                }
                if (best < 0) break;
                o->predicted[o->moe_block[l] * o->E + best] = o->step;
                bar = row[best];
                last = best;
            }
        }
}

/* Copies the predicted experts of block `layer` that are not cached; *room turns false
 * when the cache is full of what this step still needs. */
static moe_status prefetch_layer(moe_offload *o, int layer, bool *room) {
    *room = true;
    for (int e = 0; e < o->E && *room; e++) {
        if (o->predicted[layer * o->E + e] != o->step || o->where[layer * o->E + e] >= 0) continue;
        int s = cache_take_slot(o, layer, true);
        *room = s >= 0;
        if (*room) MOE_TRY(cache_load(o, s, layer, e, false, true));
    }
    return MOE_OK;
}

/* Copies the predicted experts of MoE layers (ordinals) up to `to` that are not cached. */
static moe_status prefetch_to(moe_offload *o, int to) {
    if (!cache_policy_predicts(o)) return MOE_OK;
    if (to >= o->n_moe) to = o->n_moe - 1;
    bool room = true;
    for (; room && o->prefetched_to < to; o->prefetched_to++)
        MOE_TRY(prefetch_layer(o, o->moe_block[o->prefetched_to + 1], &room));
    return MOE_OK;
}

/* Lookahead: the experts the next MoE layer's router picks from rows xs [N, d] of block
 * `layer` (the rows its experts get: normalised hidden states) are marked predicted and
 * copied while this layer computes. */
static moe_status lookahead(moe_offload *o, int layer, moe_tensor *xs) {
    int next = o->moe_ord[layer] + 1;
    if (!o->opt.lookahead || !cache_policy_predicts(o) || next >= o->n_moe || xs->shape[0] == 0) return MOE_OK;
    int nb = o->moe_block[next];
    moe_router *r = (moe_router *)&o->v->blocks[nb].moe.router; /* logits and select change nothing */
    bool was = moe_grad_set_enabled(false);
    moe_tensor *state = NULL, *logits = moe_router_logits(r, xs, NULL, &state);
    moe_routing pick;
    moe_status s = logits ? moe_router_select(r, logits, &pick) : moe_last_status();
    moe_grad_set_enabled(was);
    MOE_TRY(s);
    for (int64_t i = 0; i < pick.n_tokens * o->top_k; i++) {
        int e = pick.host_experts[i];
        if (e >= 0 && e < o->E) o->predicted[nb * o->E + e] = o->step;
    }
    bool room;
    return prefetch_layer(o, nb, &room);
}

/* Appends a token to the predictor's list. */
static void list_push(moe_offload *o, int at, int32_t tok, int32_t pos, int32_t seq) {
    o->ctx_tok[at] = tok;
    o->ctx_pos[at] = pos;
    o->ctx_seq[at] = seq;
}

/* Predicts the batch's tokens in one predictor call: the list holds each sequence run of the
 * batch after its sequence's newest tokens (opt.predict_context at most, when the run's
 * positions continue them), and only the runs' tokens are scored. Each run's newest tokens
 * become its sequence's context for the next call. */
static moe_status predict_batch(moe_offload *o, const int32_t *tokens, const int32_t *pos, const int32_t *seq, int n) {
    int len = 0, m = 0;
    for (int a = 0; a < n;) { /* the runs: consecutive tokens of one sequence */
        int b = a + 1;
        while (b < n && seq[b] == seq[a]) b++;
        seq_context *h = seq[a] < o->opt.max_seqs ? &o->context[seq[a]] : NULL;
        int c = h && h->n > 0 && h->next_pos == pos[a] ? h->n : 0;
        MOE_ASSERT(len + c + (b - a) <= o->list_cap, "offload: the predictor's list of %d tokens is full", o->list_cap);
        for (int i = 0; i < c; i++) list_push(o, len++, h->tok[i], pos[a] - c + i, seq[a]);
        for (int i = a; i < b; i++) {
            o->ctx_rows[m++] = len;
            list_push(o, len++, tokens[i], pos[i], seq[a]);
        }
        if (h) {
            int keep = c + (b - a) < o->opt.predict_context ? c + (b - a) : o->opt.predict_context;
            memcpy(h->tok, o->ctx_tok + len - keep, sizeof(int32_t) * (size_t)keep);
            h->n = keep;
            h->next_pos = pos[b - 1] + 1;
        }
        a = b;
    }
    double t0 = moe_clock_ms();
    MOE_TRY(o->opt.predict(o->opt.predict_ctx, o->ctx_tok, o->ctx_pos, o->ctx_seq, len, o->ctx_rows, m, o->scores));
    o->predict_ms += moe_clock_ms() - t0;
    mark_predicted(o, o->scores, m);
    return MOE_OK;
}

static moe_status provider_begin(void *ctx, const int32_t *tokens, const int32_t *pos, const int32_t *seq, int n) {
    moe_offload *o = ctx;
    o->step++;
    o->cur_ord = 0;
    o->prefetched_to = -1;
    o->last_t = moe_clock_ms();
    if (!cache_policy_predicts(o) || !o->opt.predict) return MOE_OK;
    MOE_ASSERT(n <= o->opt.max_batch_tokens, "offload: a batch of %d tokens beyond max_batch_tokens %d", n,
               o->opt.max_batch_tokens);
    MOE_TRY(predict_batch(o, tokens, pos, seq, n));
    return prefetch_to(o, o->depth - 1);
}

/* At the start of MoE layer `layer`: its time into the running mean, the depth adapted
 * (copy time of a layer's top-k over a layer's compute time), the layers ahead prefetched. */
static moe_status enter_layer(moe_offload *o, int layer) {
    double now = moe_clock_ms();
    int ord = o->moe_ord[layer];
    if (ord > o->cur_ord) o->layer_ms = o->layer_ms > 0 ? 0.8 * o->layer_ms + 0.2 * (now - o->last_t) : now - o->last_t;
    o->last_t = now;
    o->cur_ord = ord;
    if (o->opt.prefetch_depth > 0) o->depth = o->opt.prefetch_depth;
    else if (o->layer_ms > 0) {
        double rate = moe_offload_copy_rate(o) > 0 ? moe_offload_copy_rate(o) : o->rate0;
        double copy_ms = 1e3 * (double)(o->top_k * o->split.slot_bytes) / rate;
        int d = (int)ceil(copy_ms / o->layer_ms);
        o->depth = d < 1 ? 1 : d > o->n_moe ? o->n_moe : d;
    }
    return prefetch_to(o, ord + o->depth);
}

/* ---- one expert group of a step ---- */

/* Where a used expert's weights come from: its cache slot; the host, where it runs from
 * the store (cpu, auto); the store copied straight into scratch (every slot pinned); a
 * slot still to take (deferred until its wave). */
enum { SRC_SLOT, SRC_HOST, SRC_SCRATCH, SRC_DEFERRED };

/* Whether a missed expert with `rows` rows runs from the host copy instead of a copy. */
static bool compute_on_host(const moe_offload *o, int64_t rows) {
    if (o->opt.policy == MOE_OFFLOAD_CPU) return rows <= (o->opt.cpu_rows > 0 ? o->opt.cpu_rows : 4);
    if (o->opt.policy != MOE_OFFLOAD_AUTO) return false;
    double rate = moe_offload_copy_rate(o) > 0 ? moe_offload_copy_rate(o) : o->rate0;
    return (double)rows * o->host_row_ms < 1e3 * (double)o->split.slot_bytes / rate;
}

/* Classifies expert e (rows rows) of `layer`: a hit (pinned; a copy in flight jumps the
 * queue), a miss run from the host copy, or a miss to copy (slot taken now if one is free,
 * else deferred). *src its source, *slot the slot or -1. */
static moe_status classify(moe_offload *o, int layer, int e, int64_t rows, int *src, int *slot) {
    moe_offload_counts *c = &o->counts[layer];
    c->uses++;
    *slot = o->where[layer * o->E + e];
    if (*slot >= 0) {
        c->hits++;
        o->slots[*slot].pin = o->epoch;
        if (!cache_slot_ready(o, *slot)) {
            c->late++;
            cache_slot_expedite(o, *slot);
        }
        *src = SRC_SLOT;
        return MOE_OK;
    }
    c->misses++;
    *src = compute_on_host(o, rows) ? SRC_HOST : SRC_DEFERRED;
    if (*src == SRC_HOST) {
        c->host++;
        return MOE_OK;
    }
    *slot = cache_take_slot(o, layer, false);
    if (*slot < 0) return MOE_OK;
    *src = SRC_SLOT;
    o->slots[*slot].pin = o->epoch;
    return cache_load(o, *slot, layer, e, true, false);
}

/* Copies expert e's weights (slot or host store) into slice j of the scratch stacks. */
static moe_status gather(moe_offload *o, int layer, int e, int src, int slot, moe_tensor *w13, moe_tensor *w2, int j) {
    const store_entry *se = &o->store[layer * o->E + e];
    int64_t d = w13->shape[1], w = w2->shape[1];
    moe_tensor *d13 = moe_tensor_view_raw(w13, 2, (int64_t[]){d, 2 * w}, (int64_t[]){2 * w, 1}, j * se->n13);
    moe_tensor *d2 = moe_tensor_view_raw(w2, 2, (int64_t[]){w, d}, (int64_t[]){d, 1}, j * se->n2);
    moe_tensor *s13, *s2;
    if (src == SRC_SLOT) {
        MOE_TRY(cache_slot_wait(o, slot));
        cache_slot_views(o, slot, &s13, &s2);
        cache_slot *c = &o->slots[slot];
        c->used = true;
        c->last_use = ++o->clock;
        c->pin = 0;
    } else { /* SRC_SCRATCH: the host copy straight into scratch */
        s13 = moe_tensor_view_raw(se->stack13, 2, d13->shape, d13->strides, se->at13);
        s2 = moe_tensor_view_raw(se->stack2, 2, d2->shape, d2->strides, se->at2);
    }
    o->freq[layer * o->E + e]++;
    if (!d13 || !d2 || !s13 || !s2) return moe_last_status();
    double t0 = moe_clock_ms();
    MOE_TRY(moe_tensor_copy_(d13, s13));
    MOE_TRY(moe_tensor_copy_(d2, s2));
    o->counts[layer].gather_ms += moe_clock_ms() - t0;
    return MOE_OK;
}

/* Gathers the next n used experts of group G (from index *i of G's experts; off [G->n + 1]
 * their rows) into slices 0 .. n - 1 of the scratch stacks; a deferred miss takes a slot now. */
static moe_status gather_wave(moe_offload *o, int layer, const moe_expert_group *G, const int64_t *off, int *src,
                              int *slot, int *i, int n, moe_tensor *w13, moe_tensor *w2) {
    for (int j = 0; j < n; (*i)++) {
        if (off[*i + 1] == off[*i]) continue;
        if (src[*i] == SRC_DEFERRED) {
            slot[*i] = cache_take_slot(o, layer, false);
            if (slot[*i] >= 0) MOE_TRY(cache_load(o, slot[*i], layer, G->experts[*i], true, false));
            src[*i] = slot[*i] >= 0 ? SRC_SLOT : SRC_SCRATCH; /* every slot pinned */
        }
        MOE_TRY(gather(o, layer, G->experts[*i], src[*i], slot[*i], w13, w2, j++));
    }
    return MOE_OK;
}

/* The first n experts of a scratch stack [cap, a, b]. */
static moe_tensor *first_experts(moe_tensor *stack, int n) {
    if (n == stack->shape[0]) return stack;
    return moe_tensor_view_raw(stack, 3, (int64_t[]){n, stack->shape[1], stack->shape[2]}, stack->strides, 0);
}

/* Expert e of block `layer` run on the host from its store copy: rows x [n, d] (on the
 * model's device) go to the host, the expert's SwiGLU runs there on the host kernels in
 * the compute dtype, and its output [n, d] comes back to x's device. */
static moe_tensor *host_expert(moe_offload *o, int layer, int e, moe_tensor *x) {
    const store_entry *se = &o->store[layer * o->E + e];
    int64_t d = o->d, w = se->ffn_dim, n = x->shape[0];
    bool on_host = x->device == MOE_CPU;
    double t0 = moe_clock_ms();
    moe_tensor *xh = on_host ? x : moe_tensor_to(x, MOE_CPU, MOE_LIFE_STEP);
    moe_tensor *w13 = moe_tensor_view_raw(se->stack13, 3, (int64_t[]){1, d, 2 * w}, (int64_t[]){d * 2 * w, 2 * w, 1}, se->at13);
    moe_tensor *w2 = moe_tensor_view_raw(se->stack2, 3, (int64_t[]){1, w, d}, (int64_t[]){w * d, d, 1}, se->at2);
    const int64_t off[2] = {0, n};
    moe_tensor *yh = xh && w13 && w2 ? moe_grouped_swiglu(xh, w13, w2, off) : NULL;
    moe_tensor *y = on_host || !yh ? yh : moe_tensor_to(yh, x->device, MOE_LIFE_STEP);
    o->counts[layer].expert_ms += moe_clock_ms() - t0;
    return y;
}

/* The number of used experts of G from index i on (empty ones skipped) that run on the
 * device, consecutive and at most cap; *i moves to the first of them. */
static int next_wave(const moe_expert_group *G, const int64_t *off, const int *src, int *i, int cap) {
    while (*i < G->n && off[*i + 1] == off[*i]) (*i)++;
    int n = 0;
    for (int j = *i; j < G->n && n < cap; j++) {
        if (off[j + 1] == off[j]) continue;
        if (src[j] == SRC_HOST) break;
        n++;
    }
    return n;
}

/* Appends part y to parts (a concat first when they are as many as it takes). */
static void push_part(moe_tensor **parts, int *n_parts, moe_tensor *y) {
    if (*n_parts == MOE_NODE_MAX_INPUTS) {
        parts[0] = moe_concat(parts, *n_parts, 0);
        *n_parts = 1;
    }
    parts[(*n_parts)++] = y;
}

/* The nu used experts of G in row order: runs of device experts in waves of at most
 * o->wave, each gathered into the one scratch stack (a slot is free again once gathered)
 * and run as one grouped GEMM on its rows; an expert to run on the host alone
 * (host_expert). The outputs concatenated in row order. off [G->n + 1]: rows per expert
 * of G; coff [nu + 1]: rows per used expert. */
static moe_tensor *run_waves(moe_offload *o, int layer, const moe_expert_group *G, moe_tensor *xs, const int64_t *off,
                             int *src, int *slot, const int64_t *coff, int nu, moe_dtype compute) {
    int cap = nu == 0 ? 1 : nu < o->wave ? nu : o->wave;
    int64_t d = xs->shape[1], w = G->ffn_dim;
    moe_tensor *w13 = moe_tensor_empty(MOE_LIFE_STEP, xs->device, compute, 3, (int64_t[]){cap, d, 2 * w});
    moe_tensor *w2 = moe_tensor_empty(MOE_LIFE_STEP, xs->device, compute, 3, (int64_t[]){cap, w, d});
    int64_t *wo = moe_step_host_alloc(sizeof(int64_t) * (size_t)(cap + 1));
    if (!wo) moe_error(MOE_ERR_OOM, "offload: out of host memory");
    if (!w13 || !w2 || !wo) return NULL;
    moe_tensor *parts[MOE_NODE_MAX_INPUTS];
    int n_parts = 0, i = 0;
    for (int u = 0; u < nu || u == 0;) {
        int n = next_wave(G, off, src, &i, cap);
        moe_tensor *y;
        if (n == 0 && u < nu) { /* G->experts[i] runs on the host */
            o->freq[layer * o->E + G->experts[i]]++;
            y = host_expert(o, layer, G->experts[i++], nu == 1 ? xs : moe_slice(xs, 0, coff[u], coff[u + 1]));
            u++;
        } else {
            if (gather_wave(o, layer, G, off, src, slot, &i, n, w13, w2) != MOE_OK) return NULL;
            for (int q = 0; q <= n; q++) wo[q] = coff[u + q] - coff[u];
            if (n == 0) wo[1] = 0; /* no rows at all: one empty expert */
            moe_tensor *xw = n == nu ? xs : moe_slice(xs, 0, coff[u], coff[u + n]);
            double t0 = moe_clock_ms();
            y = moe_grouped_swiglu(xw, first_experts(w13, n ? n : 1), first_experts(w2, n ? n : 1), wo);
            o->counts[layer].expert_ms += moe_clock_ms() - t0;
            u += n ? n : 1;
        }
        if (!y) return NULL;
        push_part(parts, &n_parts, y);
    }
    return n_parts == 1 ? parts[0] : moe_concat(parts, n_parts, 0);
}

/* Whether group G runs on the slots in place: its experts are of the slots' width and every
 * used one has a slot (no host copy, none deferred). */
static bool in_place(const moe_offload *o, const moe_expert_group *G, const int64_t *off, const int *src) {
    bool any = false;
    for (int i = 0; i < G->n; i++) {
        if (off[i + 1] == off[i]) continue;
        if (src[i] != SRC_SLOT) return false;
        any = true;
    }
    return any && G->ffn_dim == o->slot_w;
}

/* An index tensor of n rows (host ids), or NULL for the identity. */
static moe_tensor *row_index(const int32_t *ids, int64_t n, moe_device dev, bool *identity) {
    *identity = true;
    for (int64_t j = 0; j < n && *identity; j++) *identity = ids[j] == j;
    return *identity ? NULL : moe_tensor_from_host(MOE_LIFE_STEP, dev, MOE_I32, 1, (int64_t[]){n}, ids);
}

/* Group G on the cache's stacks (cache_stacks) with its rows put in slot order: the expert
 * in slot s takes rows soff[s] .. soff[s + 1], empty slots none. No gather: the same
 * grouped GEMM over the same rows, in place. */
static moe_tensor *run_in_place(moe_offload *o, int layer, const moe_expert_group *G, moe_tensor *xs,
                                const int64_t *off, const int *slot) {
    int S = o->n_slots;
    int64_t N = xs->shape[0];
    int64_t *soff = moe_step_host_alloc(sizeof(int64_t) * (size_t)(S + 1));
    int *at = moe_step_host_alloc(sizeof(int) * (size_t)S);
    int32_t *perm = moe_step_host_alloc(sizeof(int32_t) * (size_t)(N + 1)), *inv = moe_step_host_alloc(sizeof(int32_t) * (size_t)(N + 1));
    if (!soff || !at || !perm || !inv) {
        moe_error(MOE_ERR_OOM, "offload: out of host memory");
        return NULL;
    }
    for (int s = 0; s < S; s++) at[s] = -1;
    for (int i = 0; i < G->n; i++) {
        if (off[i + 1] == off[i]) continue;
        at[slot[i]] = i;
        if (cache_slot_wait(o, slot[i]) != MOE_OK) return NULL;
        cache_slot *c = &o->slots[slot[i]];
        c->used = true;
        c->last_use = ++o->clock;
        c->pin = 0;
        o->freq[layer * o->E + G->experts[i]]++;
    }
    soff[0] = 0;
    for (int s = 0; s < S; s++) {
        int i = at[s];
        int64_t rows = i < 0 ? 0 : off[i + 1] - off[i];
        for (int64_t r = 0; r < rows; r++) perm[soff[s] + r] = (int32_t)(off[i] + r);
        soff[s + 1] = soff[s] + rows;
    }
    for (int64_t j = 0; j < N; j++) inv[perm[j]] = (int32_t)j;
    bool same;
    moe_tensor *p = row_index(perm, N, xs->device, &same), *w13, *w2;
    moe_tensor *xp = same ? xs : p ? moe_index_select(xs, p) : NULL; /* [N, d] in slot order */
    cache_stacks(o, &w13, &w2);
    double t0 = moe_clock_ms();
    moe_tensor *y = xp && w13 && w2 ? moe_grouped_swiglu(xp, w13, w2, soff) : NULL;
    o->counts[layer].expert_ms += moe_clock_ms() - t0;
    if (same || !y) return y;
    moe_tensor *back = row_index(inv, N, xs->device, &same);
    return back ? moe_index_select(y, back) : NULL;
}

static moe_tensor *provider_run(void *ctx, int layer, moe_moe_layer *L, int g, moe_tensor *xs, const int64_t *off,
                                moe_dtype compute) {
    moe_offload *o = ctx;
    MOE_ASSERT(compute == o->arena->dtype, "offload: compute dtype %s, the cache holds %s", moe_dtype_name(compute),
               moe_dtype_name(o->arena->dtype));
    if (g == 0 && enter_layer(o, layer) != MOE_OK) return NULL;
    const moe_expert_group *G = &L->groups[g];
    int *src = moe_step_host_alloc(sizeof(int) * (size_t)G->n), *slot = moe_step_host_alloc(sizeof(int) * (size_t)G->n);
    int64_t *coff = moe_step_host_alloc(sizeof(int64_t) * (size_t)(G->n + 1));
    if (!src || !slot || !coff) {
        moe_error(MOE_ERR_OOM, "offload: out of host memory");
        return NULL;
    }
    o->epoch++;
    int nu = 0;
    coff[0] = 0;
    for (int i = 0; i < G->n; i++) { /* hits and misses; misses start copying at once */
        int64_t rows = off[i + 1] - off[i];
        if (rows == 0) continue;
        if (classify(o, layer, G->experts[i], rows, &src[i], &slot[i]) != MOE_OK) return NULL;
        coff[nu + 1] = coff[nu] + rows;
        nu++;
    }
    if (g == 0 && lookahead(o, layer, xs) != MOE_OK) return NULL; /* this layer's experts are pinned now */
    if (in_place(o, G, off, src)) return run_in_place(o, layer, G, xs, off, slot);
    return run_waves(o, layer, G, xs, off, src, slot, coff, nu, compute);
}

/* ---- open and close ---- */

/* The store: every routed expert as pointers into its group's stacks, the view's own (in
 * host memory: on a device view the decoder put them in page-locked host memory). */
static moe_status fill_store(moe_offload *o) {
    for (int i = 0; i < o->n_layers; i++) {
        const moe_block *b = &o->v->blocks[i];
        if (b->dense) continue;
        for (int g = 0; g < b->moe.n_groups; g++) {
            const moe_expert_group *G = &b->moe.groups[g];
            moe_tensor *s13 = G->w13, *s2 = G->w2;
            MOE_ASSERT(s13->device == MOE_CPU && s2->device == MOE_CPU, "offload: the view's expert stacks are not on the host");
            int64_t n13 = G->w13->shape[1] * G->w13->shape[2], n2 = G->w2->shape[1] * G->w2->shape[2];
            size_t es = moe_dtype_size(s13->dtype);
            for (int j = 0; j < G->n; j++)
                o->store[i * o->E + G->experts[j]] = (store_entry){
                    .stack13 = s13, .stack2 = s2, .at13 = j * n13, .at2 = j * n2,
                    .w13 = (const char *)s13->data + (size_t)(j * n13) * es,
                    .w2 = (const char *)s2->data + (size_t)(j * n2) * es, .n13 = n13, .n2 = n2, .ffn_dim = G->ffn_dim};
        }
    }
    return MOE_OK;
}

static moe_status alloc_tables(moe_offload *o) {
    size_t le = (size_t)o->n_layers * (size_t)o->E;
    o->moe_ord = malloc(sizeof(int) * (size_t)o->n_layers);
    o->moe_block = malloc(sizeof(int) * (size_t)o->n_layers);
    o->store = calloc(le, sizeof *o->store);
    o->slots = calloc((size_t)o->n_slots, sizeof *o->slots);
    o->where = malloc(sizeof(int) * le);
    o->held = calloc((size_t)o->n_layers, sizeof(int));
    o->freq = calloc(le, sizeof(uint64_t));
    o->predicted = calloc(le, sizeof(uint64_t));
    o->counts = calloc((size_t)o->n_layers, sizeof *o->counts);
    const int B = o->opt.max_batch_tokens;
    const int C = o->opt.predict_context;
    o->list_cap = B + C * (o->opt.max_seqs < B ? o->opt.max_seqs : B);
    if (o->opt.predict) {
        o->scores = malloc(sizeof(float) * (size_t)o->n_layers * (size_t)B * (size_t)o->E);
        o->ctx_tok = malloc(sizeof(int32_t) * (size_t)o->list_cap);
        o->ctx_pos = malloc(sizeof(int32_t) * (size_t)o->list_cap);
        o->ctx_seq = malloc(sizeof(int32_t) * (size_t)o->list_cap);
        o->ctx_rows = malloc(sizeof(int32_t) * (size_t)B);
        o->context = calloc((size_t)o->opt.max_seqs, sizeof *o->context);
        o->ctx_store = malloc(sizeof(int32_t) * (size_t)o->opt.max_seqs * (size_t)(C > 0 ? C : 1));
        for (int i = 0; o->context && o->ctx_store && i < o->opt.max_seqs; i++) o->context[i].tok = o->ctx_store + (size_t)i * C;
    }
    if (!o->moe_ord || !o->moe_block || !o->store || !o->slots || !o->where || !o->held || !o->freq || !o->predicted ||
        !o->counts || (o->opt.predict && (!o->scores || !o->ctx_tok || !o->ctx_pos || !o->ctx_seq || !o->ctx_rows ||
                                          !o->context || !o->ctx_store)))
        return moe_error(MOE_ERR_OOM, "offload: out of host memory for the cache tables");
    for (size_t i = 0; i < le; i++) o->where[i] = -1;
    for (int s = 0; s < o->n_slots; s++) o->slots[s].layer = o->slots[s].expert = -1;
    for (int i = 0; i < o->n_layers; i++) {
        o->moe_ord[i] = o->v->blocks[i].dense ? -1 : o->n_moe;
        if (!o->v->blocks[i].dense) o->moe_block[o->n_moe++] = i;
    }
    return MOE_OK;
}

/* The copy rate (one expert copied into slot 0 and back out), measured once: the split
 * line prints it, the prefetch depth and auto read it. */
static moe_status measure_copy_rate(moe_offload *o) {
    int layer = o->moe_block[0];
    double best = 0;
    for (int r = 0; r < 3; r++) {
        double t0 = moe_clock_ms();
        MOE_TRY(cache_load(o, 0, layer, 0, true, false));
        MOE_TRY(cache_slot_wait(o, 0));
        MOE_TRY(moe_device_sync(o->v->dev)); /* the wait may only order compute after the copy */
        double ms = moe_clock_ms() - t0;
        cache_evict(o, 0);
        if (r == 0 || ms < best) best = ms;
    }
    o->rate0 = (double)o->split.slot_bytes / (best > 1e-6 ? best / 1e3 : 1e-9);
    memset(o->counts, 0, sizeof *o->counts * (size_t)o->n_layers);
    return MOE_OK;
}

/* auto: the time of one row through one expert on the host (host_expert: on a device, its
 * row's trips there and back included), measured once; the other policies never compare
 * it (host_row_ms stays infinite). */
static moe_status measure_host_row(moe_offload *o) {
    o->host_row_ms = INFINITY;
    if (o->opt.policy != MOE_OFFLOAD_AUTO) return MOE_OK;
    moe_mem_mark mark = moe_mem_step_mark(o->v->dev), host_mark = moe_mem_step_mark(MOE_CPU);
    moe_tensor *x = moe_tensor_zeros(MOE_LIFE_STEP, o->v->dev, o->opt.dtype, 2, (int64_t[]){1, o->d});
    bool ok = x != NULL, was = moe_grad_set_enabled(false);
    for (int r = 0; r < 3 && ok; r++) {
        double t0 = moe_clock_ms();
        ok = host_expert(o, o->moe_block[0], 0, x) != NULL && moe_device_sync(o->v->dev) == MOE_OK;
        double ms = moe_clock_ms() - t0;
        if (ms < o->host_row_ms) o->host_row_ms = ms;
    }
    moe_grad_set_enabled(was);
    moe_mem_step_release(MOE_CPU, host_mark);
    moe_mem_step_release(o->v->dev, mark);
    memset(o->counts, 0, sizeof *o->counts * (size_t)o->n_layers); /* host_expert counted its time */
    return ok ? MOE_OK : moe_last_status();
}

/* resident: every expert into its slot now. */
static moe_status load_all(moe_offload *o) {
    for (int l = 0, s = 0; l < o->n_moe; l++)
        for (int e = 0; e < o->E; e++) MOE_TRY(cache_load(o, s++, o->moe_block[l], e, false, false));
    for (int s = 0; s < o->n_slots; s++) MOE_TRY(cache_slot_wait(o, s));
    memset(o->counts, 0, sizeof *o->counts * (size_t)o->n_layers);
    return MOE_OK;
}

static moe_status check_options(const moe_model *m, const moe_offload_options *o, const moe_offload_split *sp,
                                size_t min_budget) {
    if (o->policy == MOE_OFFLOAD_PREDICT && !o->predict && !o->lookahead)
        return moe_error(MOE_ERR_CONFIG, "offload: policy predict needs a predictor (--predictor FILE) or --lookahead");
    if (o->predict_context < 0 || o->predict_context > 63)
        return moe_error(MOE_ERR_CONFIG, "offload: a predictor context of %d tokens (0 .. 63)", o->predict_context);
    if (o->predict_width < 0 || o->predict_width > m->cfg.model.n_experts)
        return moe_error(MOE_ERR_CONFIG, "offload: a prediction width of %d experts (0 .. %d)", o->predict_width,
                         m->cfg.model.n_experts);
    if (o->lookahead && o->policy != MOE_OFFLOAD_PREDICT && o->policy != MOE_OFFLOAD_AUTO)
        return moe_error(MOE_ERR_CONFIG, "offload: lookahead goes with policy predict or auto (got %s)",
                         moe_offload_policy_name(o->policy));
    if (m->ep_size != 1) return moe_error(MOE_ERR_UNSUPPORTED, "offload: expert parallelism is not offloaded");
    if (o->dev != m->dev && m->dev != MOE_CPU)
        return moe_error(MOE_ERR_UNSUPPORTED, "offload: a %s decoder of a %s model (masters on the host or on the "
                         "decoder's device)", moe_device_name(o->dev), moe_device_name(m->dev));
    if (o->budget < min_budget) {
        char need[32], have[32], dense[32];
        fmt_bytes(min_budget, need, sizeof need);
        fmt_bytes(o->budget, have, sizeof have);
        fmt_bytes(sp->dense + sp->kv + sp->scratch, dense, sizeof dense);
        return moe_error(MOE_ERR_OOM, "offload: a budget of %s (%zu bytes) is too small: it needs at least %s "
                         "(%zu bytes): dense weights, KV cache and scratch %s plus %s %d expert slots of %zu bytes",
                         have, o->budget, need, min_budget, dense,
                         o->policy == MOE_OFFLOAD_RESIDENT ? "every expert's" : "one layer's top-k:",
                         o->policy == MOE_OFFLOAD_RESIDENT ? sp->experts : m->cfg.model.top_k, sp->slot_bytes);
    }
    return MOE_OK;
}

static moe_status open_cache(moe_offload *o) {
    const moe_model *v = o->v;
    o->n_layers = v->cfg.model.n_layers;
    o->E = v->cfg.model.n_experts;
    o->top_k = v->cfg.model.top_k;
    o->n_slots = o->split.slots;
    o->slot_elems = (int64_t)(o->split.slot_bytes / moe_dtype_size(o->opt.dtype));
    o->d = v->cfg.model.d_model;
    o->slot_w = o->slot_elems / (3 * o->d);
    MOE_TRY(alloc_tables(o));
    o->floor = o->n_slots / o->n_moe < o->top_k ? o->n_slots / o->n_moe : o->top_k;
    o->depth = o->opt.prefetch_depth > 0 ? o->opt.prefetch_depth : 1;
    o->wave = o->opt.max_gather > 0 && o->opt.max_gather < o->E ? o->opt.max_gather : o->E;
    MOE_TRY(moe_xfer_create(v->dev, &o->xfer));
    MOE_TRY(fill_store(o));
    o->arena = moe_tensor_empty(MOE_LIFE_PERSIST, v->dev, o->opt.dtype, 1, (int64_t[]){o->n_slots * o->slot_elems});
    if (!o->arena) return moe_error_context(moe_last_status(), "offload: the expert cache arena: ");
    MOE_TRY(measure_copy_rate(o));
    MOE_TRY(measure_host_row(o));
    return o->opt.policy == MOE_OFFLOAD_RESIDENT ? load_all(o) : MOE_OK;
}

moe_status moe_offload_open(moe_model *m, const moe_offload_options *opt, moe_offload **out) {
    *out = NULL;
    MOE_ASSERT(opt->max_seqs > 0 && opt->max_batch_tokens > 0, "offload: max_seqs and max_batch_tokens must be > 0");
    moe_offload_split sp;
    size_t min_budget;
    MOE_TRY(moe_offload_plan(m, opt, &sp, &min_budget));
    MOE_TRY(check_options(m, opt, &sp, min_budget));
    moe_offload *o = calloc(1, sizeof *o);
    if (!o) return moe_error(MOE_ERR_OOM, "offload: out of host memory");
    o->opt = *opt;
    o->split = sp;
    o->m = m;
    o->provider = (moe_expert_provider){.ctx = o, .begin = provider_begin, .run = provider_run};
    moe_decoder_options dopt = {.dtype = opt->dtype, .dev = opt->dev, .experts = MOE_EXPERTS_PROVIDED, .provider = &o->provider};
    size_t before = moe_mem_get_stats(opt->dev).persist_bytes;
    moe_status s = moe_decoder_open_with(m, &dopt, &o->dec);
    if (s == MOE_OK) {
        o->v = moe_decoder_view(o->dec);
        s = open_cache(o);
    }
    o->device_bytes = moe_mem_get_stats(opt->dev).persist_bytes - before;
    if (s != MOE_OK) {
        moe_offload_close(o);
        return s;
    }
    *out = o;
    return MOE_OK;
}

void moe_offload_close(moe_offload *o) {
    if (!o) return;
    moe_xfer_free(o->xfer); /* first: no copy into the arena after this */
    for (int s = 0; o->slots && s < o->n_slots; s++) {
        moe_xfer_job_release(&o->slots[s].j13);
        moe_xfer_job_release(&o->slots[s].j2);
    }
    moe_tensor_free(o->arena);
    moe_decoder_close(o->dec);
    free(o->moe_ord);
    free(o->moe_block);
    free(o->store);
    free(o->slots);
    free(o->where);
    free(o->held);
    free(o->freq);
    free(o->predicted);
    free(o->counts);
    free(o->scores);
    free(o->ctx_tok);
    free(o->ctx_pos);
    free(o->ctx_seq);
    free(o->ctx_rows);
    free(o->context);
    free(o->ctx_store);
    free(o);
}

moe_decoder *moe_offload_decoder(moe_offload *o) { return o->dec; }

const moe_offload_split *moe_offload_get_split(const moe_offload *o) { return &o->split; }

moe_offload_policy moe_offload_get_policy(const moe_offload *o) { return o->opt.policy; }
