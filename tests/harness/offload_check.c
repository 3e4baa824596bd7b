/* Offloaded generation against the resident decoder (see offload_check.h). */
#include "tests/harness/offload_check.h"

#include <CUnit/Basic.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/memory.h"
#include "moe/infer/decoder.h"

enum { PROMPT = 12, NEW = 10, MAXL = 8, MAXK = 8, STEPS = NEW };

/* One greedy generation: ids [PROMPT + NEW], the logits after each forward [STEPS][V],
 * the routes [PROMPT + NEW][MAXL][MAXK] (expert ids per position, block and choice). */
typedef struct run {
    int32_t ids[PROMPT + NEW];
    float *logits;
    int32_t routes[PROMPT + NEW][MAXL][MAXK];
} run;

static void prompt_ids(int32_t *ids, int V) {
    for (int i = 0; i < PROMPT; i++) ids[i] = (i * 7 + 3) % V;
}

/* Feeds ids[p0 .. p0 + n) at positions p0.. and records their routes. */
static void forward(moe_decoder *d, moe_decode_state *s, run *r, int p0, int n, float *logits) {
    const moe_model *m = moe_decoder_model(d);
    int L = m->cfg.model.n_layers, k = m->cfg.model.top_k;
    int32_t pos[PROMPT], seq[PROMPT], *route = malloc(sizeof(int32_t) * (size_t)(L * n * k));
    for (int t = 0; t < n; t++) pos[t] = p0 + t, seq[t] = 0;
    moe_batch b = {.n_tokens = n, .tokens = r->ids + p0, .pos = pos, .seq = seq, .logits = MOE_LOGITS_LAST};
    moe_decode_info info = {.route_ids = route};
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_decoder_forward(d, s, &b, logits, &info), MOE_OK);
    for (int l = 0; l < L; l++)
        for (int t = 0; t < n; t++)
            for (int j = 0; j < k; j++) r->routes[p0 + t][l][j] = route[((int64_t)l * n + t) * k + j];
    free(route);
}

static void generate(moe_decoder *d, run *r) {
    int V = moe_decoder_model(d)->cfg.model.vocab_size;
    moe_decode_state *s;
    CU_ASSERT_EQUAL_FATAL(moe_decode_state_create(d, 1, PROMPT + NEW, &s), MOE_OK);
    prompt_ids(r->ids, V);
    for (int i = 0; i < STEPS; i++) {
        float *lg = r->logits + (int64_t)i * V;
        if (i == 0) forward(d, s, r, 0, PROMPT, lg);
        else forward(d, s, r, PROMPT + i - 1, 1, lg);
        int best = 0;
        for (int v = 1; v < V; v++)
            if (lg[v] > lg[best]) best = v;
        r->ids[PROMPT + i] = best;
    }
    moe_decode_state_free(s);
}

/* Expert uses the routes imply: per forward and MoE layer, the distinct experts routed. */
static int64_t expected_uses(const moe_model *m, const run *r) {
    int L = m->cfg.model.n_layers, k = m->cfg.model.top_k, E = m->cfg.model.n_experts;
    int64_t uses = 0;
    for (int i = 0; i < STEPS; i++) {
        int p0 = i == 0 ? 0 : PROMPT + i - 1, n = i == 0 ? PROMPT : 1;
        for (int l = 0; l < L; l++) {
            if (m->blocks[l].dense) continue;
            char seen[256] = {0};
            for (int t = 0; t < n; t++)
                for (int j = 0; j < k; j++) {
                    int e = r->routes[p0 + t][l][j];
                    CU_ASSERT_FATAL(e >= 0 && e < E);
                    uses += !seen[e];
                    seen[e] = 1;
                }
        }
    }
    return uses;
}

/* ---- the oracle predictor: the routes of a recorded run, by position ---- */

typedef struct oracle {
    const moe_model *m;
    const run *r;
    int context; /* the options' predict_context */
} oracle;

/* Whether the list gives scored row `at` its sequence's min(context, position) previous
 * tokens, right before it, with the run's ids. */
static bool context_given(const oracle *o, const int32_t *tokens, const int32_t *pos, const int32_t *seq, int at) {
    int want = pos[at] < o->context ? pos[at] : o->context, have = 0;
    for (int i = at - 1; i >= 0 && seq[i] == seq[at] && pos[i] == pos[at] - (at - i); i--) {
        if (tokens[i] != o->r->ids[pos[i]]) return false;
        have++;
    }
    return have >= want;
}

static moe_status oracle_predict(void *ctx, const int32_t *tokens, const int32_t *pos, const int32_t *seq, int n,
                                 const int32_t *rows, int m, float *scores) {
    (void)n;
    const oracle *o = ctx;
    for (int t = 0; t < m; t++) CU_ASSERT(context_given(o, tokens, pos, seq, rows[t]));
    const moe_cfg_model *c = &o->m->cfg.model;
    int E = c->n_experts, lm = 0;
    for (int l = 0; l < c->n_layers; l++) {
        if (o->m->blocks[l].dense) continue;
        for (int t = 0; t < m; t++) {
            float *row = scores + ((int64_t)lm * m + t) * E;
            for (int e = 0; e < E; e++) row[e] = 0;
            for (int j = 0; j < c->top_k; j++) row[o->r->routes[pos[rows[t]]][l][j]] = 1;
        }
        lm++;
    }
    return MOE_OK;
}

/* ---- the checks ---- */

moe_offload_options offload_check_options(const moe_model *m, moe_offload_policy p) {
    return (moe_offload_options){.dtype = m->compute, .dev = m->dev, .policy = p, .max_seqs = 1, .kv_tokens = PROMPT + NEW,
                                 .max_batch_tokens = PROMPT, .predict_context = 8};
}

size_t offload_check_min_budget(const moe_model *m, const moe_offload_options *o) {
    moe_offload_split sp;
    size_t min = 0;
    CU_ASSERT_EQUAL_FATAL(moe_offload_plan(m, o, &sp, &min), MOE_OK);
    return min;
}

/* The resident run and the device bytes its decoder held; memory: checked (a device
 * decoder of host masters: the view alone takes device memory). */
typedef struct resident {
    const run *ref;
    size_t held;
    bool memory;
} resident;

/* On a device: the bytes the open took are the resident decoder's less the routed experts
 * plus the cache arena (1% slack: tensors the counters round). */
static void check_memory(const moe_offload *off, const moe_offload_options *o, const resident *res, size_t held) {
    if (!res->memory) return;
    const moe_offload_split *sp = moe_offload_get_split(off);
    double want = (double)res->held - (double)sp->store + (double)sp->slots * (double)sp->slot_bytes;
    fprintf(stderr, "  %s memory after open: %zu bytes (resident %zu, experts %zu, cache %d x %zu)\n",
            moe_device_name(o->dev), held, res->held, sp->store, sp->slots, sp->slot_bytes);
    CU_ASSERT(fabs((double)held - want) <= 0.01 * (double)res->held + 4096);
    if ((size_t)sp->slots < (size_t)sp->experts) CU_ASSERT(held < res->held);
}

/* Offloaded generation under o against the resident run: ids and logits equal, the
 * counters adding up, the device memory (check_memory). Returns the hit rate. */
static double check_policy(moe_model *m, moe_offload_options o, const resident *res, const char *what, double max_rel) {
    int V = m->cfg.model.vocab_size;
    const run *ref = res->ref;
    run *r = calloc(1, sizeof *r);
    r->logits = malloc(sizeof(float) * (size_t)(STEPS * V));
    moe_offload *off = NULL;
    size_t before = moe_mem_get_stats(o.dev).persist_bytes;
    moe_status s = moe_offload_open(m, &o, &off);
    if (s != MOE_OK) fprintf(stderr, "%s\n", moe_last_error());
    CU_ASSERT_EQUAL_FATAL(s, MOE_OK);
    check_memory(off, &o, res, moe_mem_get_stats(o.dev).persist_bytes - before);
    generate(moe_offload_decoder(off), r);
    CU_ASSERT_EQUAL(memcmp(r->ids, ref->ids, sizeof r->ids), 0);
    if (max_rel == 0) CU_ASSERT_EQUAL(memcmp(r->logits, ref->logits, sizeof(float) * (size_t)(STEPS * V)), 0);
    double diff = 0, scale = 0;
    for (int64_t i = 0; i < (int64_t)STEPS * V; i++) {
        diff = fmax(diff, fabs((double)r->logits[i] - ref->logits[i]));
        scale = fmax(scale, fabs((double)ref->logits[i]));
    }
    CU_ASSERT(diff <= max_rel * scale);
    moe_offload_counts c = moe_offload_get_counts(off, -1);
    CU_ASSERT_EQUAL(c.hits + c.misses, c.uses);
    CU_ASSERT_EQUAL(c.uses, expected_uses(m, ref));
    CU_ASSERT(c.late <= c.hits && c.host <= c.misses);
    int64_t per_layer = 0;
    for (int l = 0; l < m->cfg.model.n_layers; l++) per_layer += moe_offload_get_counts(off, l).uses;
    CU_ASSERT_EQUAL(per_layer, c.uses);
    const moe_offload_split *sp = moe_offload_get_split(off);
    fprintf(stderr, "  %-26s %-8s slots %3d/%3d  uses %3lld hits %3lld late %2lld misses %3lld host %3lld wasted %2lld\n",
            what, moe_offload_policy_name(o.policy), sp->slots, sp->experts, (long long)c.uses, (long long)c.hits,
            (long long)c.late, (long long)c.misses, (long long)c.host, (long long)c.wasted);
    if (o.policy == MOE_OFFLOAD_RESIDENT) CU_ASSERT_EQUAL(c.misses, 0);
    if (o.policy == MOE_OFFLOAD_LRU || o.policy == MOE_OFFLOAD_LFU) CU_ASSERT_EQUAL(c.host, 0);
    if (o.policy == MOE_OFFLOAD_CPU && c.misses > 0) CU_ASSERT(c.host > 0); /* misses of a row ran on the host */
    if (o.lookahead && !o.predict) CU_ASSERT(c.copies > c.misses - c.host); /* it prefetched */
    moe_offload_close(off);
    free(r->logits);
    free(r);
    return c.uses ? (double)c.hits / (double)c.uses : 0;
}

void offload_check_model(moe_model *m, const char *name, double max_rel) { offload_check_model_on(m, m->dev, name, max_rel); }

void offload_check_model_on(moe_model *m, moe_device dev, const char *name, double max_rel) {
    int V = m->cfg.model.vocab_size;
    CU_ASSERT_FATAL(m->cfg.model.n_layers <= MAXL && m->cfg.model.top_k <= MAXK && m->cfg.model.n_experts <= 256);
    run *ref = calloc(1, sizeof *ref);
    ref->logits = malloc(sizeof(float) * (size_t)(STEPS * V));
    moe_decoder *d;
    size_t before = moe_mem_get_stats(dev).persist_bytes;
    CU_ASSERT_EQUAL_FATAL(moe_decoder_open_on(m, dev, m->compute, &d), MOE_OK);
    resident res = {.ref = ref, .held = moe_mem_get_stats(dev).persist_bytes - before,
                    .memory = dev != MOE_CPU && m->dev == MOE_CPU};
    generate(d, ref);
    moe_decoder_close(d);
    oracle orc = {.m = m, .r = ref, .context = offload_check_options(m, MOE_OFFLOAD_PREDICT).predict_context};
    char what[64];
    for (int p = 0; p < MOE_OFFLOAD_POLICY_COUNT; p++) {
        moe_offload_options o = offload_check_options(m, (moe_offload_policy)p);
        o.dev = dev;
        if (p == MOE_OFFLOAD_PREDICT || p == MOE_OFFLOAD_AUTO) o.predict = oracle_predict, o.predict_ctx = &orc;
        o.budget = offload_check_min_budget(m, &o);
        snprintf(what, sizeof what, "%s, least budget", name);
        check_policy(m, o, &res, what, max_rel);
        if (p == MOE_OFFLOAD_RESIDENT) continue;
        moe_offload_split sp;
        size_t min;
        CU_ASSERT_EQUAL_FATAL(moe_offload_plan(m, &o, &sp, &min), MOE_OK);
        o.budget = min + (size_t)(3 * m->cfg.model.n_experts / 2) * sp.slot_bytes;
        snprintf(what, sizeof what, "%s, 1.5 layers more", name);
        check_policy(m, o, &res, what, max_rel);
        o.max_gather = p % 2 ? 1 : m->cfg.model.top_k; /* a prefill's layer in waves */
        o.budget = offload_check_min_budget(m, &o);
        snprintf(what, sizeof what, "%s, waves of %d", name, o.max_gather);
        check_policy(m, o, &res, what, max_rel);
        if (p != MOE_OFFLOAD_PREDICT && p != MOE_OFFLOAD_AUTO) continue;
        o.max_gather = 0; /* the next layer's router on this layer's rows, with the oracle and alone */
        o.lookahead = true;
        o.budget = min + (size_t)(3 * m->cfg.model.n_experts / 2) * sp.slot_bytes;
        snprintf(what, sizeof what, "%s, lookahead", name);
        check_policy(m, o, &res, what, max_rel);
        o.predict_width = m->cfg.model.top_k + 2; /* the predictor names more experts */
        snprintf(what, sizeof what, "%s, lookahead, width %d", name, o.predict_width);
        check_policy(m, o, &res, what, max_rel);
        o.predict_width = 0;
        o.predict = NULL;
        o.predict_ctx = NULL;
        snprintf(what, sizeof what, "%s, lookahead alone", name);
        check_policy(m, o, &res, what, max_rel);
    }
    /* the oracle's prefetch beats lru at the same budget */
    moe_offload_options o = offload_check_options(m, MOE_OFFLOAD_LRU);
    o.dev = dev;
    moe_offload_split sp;
    size_t min;
    CU_ASSERT_EQUAL_FATAL(moe_offload_plan(m, &o, &sp, &min), MOE_OK);
    o.budget = min + (size_t)(3 * m->cfg.model.n_experts / 2) * sp.slot_bytes;
    double lru = check_policy(m, o, &res, "lru vs oracle", max_rel);
    o.policy = MOE_OFFLOAD_PREDICT;
    o.predict = oracle_predict;
    o.predict_ctx = &orc;
    double pred = check_policy(m, o, &res, "oracle vs lru", max_rel);
    CU_ASSERT(pred > lru);
    free(ref->logits);
    free(ref);
}

