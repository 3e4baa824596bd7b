/* The server's scheduler (moe/serve/sched.h) against a fake engine whose next token is the
 * last one plus 1 (byte tokens): generation, stop strings held back until they are told
 * apart, max_tokens; prompts packed first-fit-decreasing beside the running decode tokens;
 * admission bounded by the KV budget; a cancelled request gives its slot back; the queue
 * bound; and the UTF-8 helpers (moe/serve/text.h). Against a real engine (a small model):
 * decode rows in micro-batches (arrival order, predicted paths, an offloaded decoder)
 * give the greedy tokens of one forward per step, in more forwards than steps. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "moe/offload/offload.h"
#include "moe/serve/sched.h"
#include "tests/harness/sched_fixture.h"
#include "tests/harness/testlib.h"

enum { V = 256, SLOTS = 4, MAX_CALLS = 256 };

/* A fake engine: logits one-hot at (last token of each sequence + 1) mod V. With `gated`
 * every forward waits until the test opens the gate. */
typedef struct fake {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool gated;
    int entered, n_calls;
    int tokens[MAX_CALLS], rows[MAX_CALLS];
    int64_t len[SLOTS];
    int freed[SLOTS];
    bool bad_position;
    int max_rows;
} fake;

static moe_status fake_forward(void *impl, const moe_batch *b, float *logits) {
    fake *f = impl;
    pthread_mutex_lock(&f->mu);
    f->entered++;
    pthread_cond_broadcast(&f->cv);
    while (f->gated) pthread_cond_wait(&f->cv, &f->mu);
    int rows = 0;
    for (int i = 0; i < b->n_tokens; i++) {
        int s = b->seq[i];
        if (b->pos[i] != f->len[s]) f->bad_position = true;
        f->len[s]++;
        if (i + 1 == b->n_tokens || b->seq[i + 1] != s) {
            float *row = logits + (size_t)rows++ * V;
            for (int v = 0; v < V; v++) row[v] = 0;
            row[(b->tokens[i] + 1) % V] = 10;
        }
    }
    if (f->n_calls < MAX_CALLS) {
        f->tokens[f->n_calls] = b->n_tokens;
        f->rows[f->n_calls] = rows;
    }
    f->n_calls++;
    f->max_rows = rows > f->max_rows ? rows : f->max_rows;
    pthread_mutex_unlock(&f->mu);
    return MOE_OK;
}

static moe_status fake_seq_free(void *impl, int seq) {
    fake *f = impl;
    pthread_mutex_lock(&f->mu);
    f->len[seq] = 0;
    f->freed[seq]++;
    pthread_mutex_unlock(&f->mu);
    return MOE_OK;
}

static int64_t fake_free_tokens(const void *impl) { return 1 << 20; }

static bool fake_expert_cache(const void *impl, int64_t *hits, int64_t *misses) { return false; }

/* Everything one test needs. */
typedef struct rig {
    fake f;
    serve_engine eng;
    serve_text text;
    serve_metrics metrics;
    serve_sched sched;
} rig;

static void rig_start(rig *r, int64_t kv_tokens, int prefill, int max_queue, bool gated) {
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->f.mu, NULL);
    pthread_cond_init(&r->f.cv, NULL);
    r->f.gated = gated;
    r->eng = (serve_engine){.impl = &r->f, .vocab = V, .max_seqs = SLOTS, .context = 128, .kv_tokens = kv_tokens,
                            .forward = fake_forward, .seq_free = fake_seq_free, .free_tokens = fake_free_tokens,
                            .expert_cache = fake_expert_cache};
    CU_ASSERT_EQUAL_FATAL(serve_text_open_own(&r->text, moe_tokenizer_byte(), -1), MOE_OK);
    serve_metrics_init(&r->metrics);
    serve_sched_opts o = {.max_queue = max_queue, .prefill_tokens = prefill};
    CU_ASSERT_EQUAL_FATAL(serve_sched_start(&r->sched, &r->eng, &r->text, &r->metrics, o), MOE_OK);
}

static void rig_stop(rig *r) {
    serve_sched_free(&r->sched);
    serve_engine_close(&r->eng);
    serve_metrics_free(&r->metrics);
    serve_text_close(&r->text);
}

static void open_gate(rig *r) {
    pthread_mutex_lock(&r->f.mu);
    r->f.gated = false;
    pthread_cond_broadcast(&r->f.cv);
    pthread_mutex_unlock(&r->f.mu);
}

/* Waits until `n` forwards have started. */
static void wait_entered(rig *r, int n) {
    pthread_mutex_lock(&r->f.mu);
    while (r->f.entered < n) pthread_cond_wait(&r->f.cv, &r->f.mu);
    pthread_mutex_unlock(&r->f.mu);
}

/* A greedy request for `prompt` (bytes), max_tokens, an optional stop string. */
static serve_request *request(const char *prompt, int max_tokens, const char *stop) {
    serve_request *q = serve_request_new();
    CU_ASSERT_PTR_NOT_NULL_FATAL(q);
    q->n_prompt = (int)strlen(prompt);
    q->prompt = malloc(sizeof *q->prompt * (size_t)q->n_prompt);
    for (int i = 0; i < q->n_prompt; i++) q->prompt[i] = (unsigned char)prompt[i];
    q->p.max_tokens = max_tokens;
    q->p.sampler = (moe_sampler){.temperature = 0, .top_p = 1};
    if (stop) q->p.stop[q->p.n_stop++] = strdup(stop);
    return q;
}

/* The same, submitted. */
static serve_request *submit(rig *r, const char *prompt, int max_tokens, const char *stop, serve_submit_result want) {
    serve_request *q = request(prompt, max_tokens, stop);
    CU_ASSERT_EQUAL(serve_sched_submit(&r->sched, q), want);
    return q;
}

static void wait_done(rig *r, serve_request *q) {
    pthread_mutex_lock(&r->sched.mu);
    while (q->finish == SERVE_RUNNING) pthread_cond_wait(&q->cv, &r->sched.mu);
    pthread_mutex_unlock(&r->sched.mu);
}

/* Waits for the end of q; returns its text (malloc'd) and finish reason, and releases it. */
static char *finish(rig *r, serve_request *q, serve_finish *why, bool *held_ok, const char *never) {
    wait_done(r, q);
    char *text = calloc(1, 4096);
    for (int i = 0; i < q->n_pieces; i++) {
        strcat(text, q->pieces[i].text);
        if (held_ok && never && strstr(q->pieces[i].text, never)) *held_ok = false;
    }
    *why = q->finish;
    serve_request_release(&r->sched, q);
    return text;
}

static void test_generate_stop_length(void) {
    rig r;
    rig_start(&r, 1024, 64, 8, false);
    serve_finish why;
    bool held = true;
    /* a -> b c d e f ...: the stop string "ef" cuts at "bcd"; "e" is never published alone */
    char *t = finish(&r, submit(&r, "a", 10, "ef", SERVE_SUBMIT_OK), &why, &held, "e");
    CU_ASSERT_STRING_EQUAL(t, "bcd");
    CU_ASSERT_EQUAL(why, SERVE_FINISH_STOP);
    CU_ASSERT(held);
    free(t);
    /* a stop string that begins like the text but differs: everything comes out */
    t = finish(&r, submit(&r, "a", 6, "dx", SERVE_SUBMIT_OK), &why, NULL, NULL);
    CU_ASSERT_STRING_EQUAL(t, "bcdefg");
    CU_ASSERT_EQUAL(why, SERVE_FINISH_LENGTH);
    free(t);
    t = finish(&r, submit(&r, "hello", 3, NULL, SERVE_SUBMIT_OK), &why, NULL, NULL);
    CU_ASSERT_STRING_EQUAL(t, "pqr"); /* after 'o' */
    free(t);
    CU_ASSERT(!r.f.bad_position);
    rig_stop(&r);
}

static void test_packing(void) {
    rig r;
    rig_start(&r, 1024, 12, 8, true);
    serve_request *a = submit(&r, "a", 20, NULL, SERVE_SUBMIT_OK);
    wait_entered(&r, 1); /* a's prefill is in the engine */
    /* arriving shortest first: first-fit in arrival order would take 4 + 6, FFD takes 8 + 4 */
    serve_request *d = submit(&r, "dddd", 4, NULL, SERVE_SUBMIT_OK), *c = submit(&r, "cccccc", 4, NULL, SERVE_SUBMIT_OK),
                  *b = submit(&r, "bbbbbbbb", 4, NULL, SERVE_SUBMIT_OK);
    open_gate(&r);
    serve_finish why;
    free(finish(&r, b, &why, NULL, NULL));
    free(finish(&r, c, &why, NULL, NULL));
    free(finish(&r, d, &why, NULL, NULL));
    free(finish(&r, a, &why, NULL, NULL));
    /* call 2: a's decode token + the prompts of 8 and 4 (first-fit-decreasing into 12);
     * call 3: a, b, d decoding + c's 6 */
    CU_ASSERT_EQUAL(r.f.tokens[0], 1);
    CU_ASSERT_EQUAL(r.f.tokens[1], 1 + 8 + 4);
    CU_ASSERT_EQUAL(r.f.rows[1], 3);
    CU_ASSERT_EQUAL(r.f.tokens[2], 3 + 6);
    CU_ASSERT_EQUAL(r.f.rows[2], 4);
    CU_ASSERT(!r.f.bad_position);
    rig_stop(&r);
}

static void test_kv_admission(void) {
    rig r;
    rig_start(&r, 2 * MOE_KV_BLOCK, 64, 8, false); /* room for two requests of one block */
    serve_request *q[5];
    for (int i = 0; i < 5; i++) q[i] = submit(&r, "a", MOE_KV_BLOCK - 1, NULL, SERVE_SUBMIT_OK);
    /* 1 + 32 tokens need three blocks: never admissible */
    serve_request_release(&r.sched, submit(&r, "a", 2 * MOE_KV_BLOCK, NULL, SERVE_SUBMIT_TOO_BIG));
    serve_finish why;
    for (int i = 0; i < 5; i++) {
        char *t = finish(&r, q[i], &why, NULL, NULL);
        CU_ASSERT_EQUAL(strlen(t), MOE_KV_BLOCK - 1);
        free(t);
    }
    CU_ASSERT_EQUAL(r.f.max_rows, 2);
    rig_stop(&r);
}

static void test_cancel_and_queue_bound(void) {
    rig r;
    rig_start(&r, 1024, 64, 2, true);
    serve_request *a = submit(&r, "a", 50, NULL, SERVE_SUBMIT_OK);
    wait_entered(&r, 1);
    serve_request *b = submit(&r, "b", 5, NULL, SERVE_SUBMIT_OK), *c = submit(&r, "c", 5, NULL, SERVE_SUBMIT_OK);
    serve_request *d = submit(&r, "d", 5, NULL, SERVE_SUBMIT_FULL); /* two queued: the bound */
    serve_request_release(&r.sched, d);
    serve_request_release(&r.sched, a); /* the client of a goes away mid-generation */
    open_gate(&r);
    serve_finish why;
    free(finish(&r, b, &why, NULL, NULL));
    free(finish(&r, c, &why, NULL, NULL));
    CU_ASSERT_EQUAL(serve_sched_active(&r.sched), 0);
    int freed = 0;
    for (int i = 0; i < SLOTS; i++) freed += r.f.freed[i];
    CU_ASSERT_EQUAL(freed, 3); /* a (cancelled), b, c */
    CU_ASSERT_EQUAL(r.metrics.cancelled, 1);
    CU_ASSERT(r.metrics.generated_tokens < 50 + 10);
    rig_stop(&r);
}

static void test_utf8(void) {
    CU_ASSERT(serve_utf8_valid("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", 14));
    CU_ASSERT(!serve_utf8_valid("\xc3", 1));           /* cut short */
    CU_ASSERT(!serve_utf8_valid("\xc0\xaf", 2));       /* overlong */
    CU_ASSERT(!serve_utf8_valid("\xed\xa0\x80", 3));   /* surrogate */
    CU_ASSERT(!serve_utf8_valid("\xf4\x90\x80\x80", 4)); /* above U+10FFFF */
    CU_ASSERT(!serve_utf8_valid("a\0b", 3));           /* NUL */
    CU_ASSERT_EQUAL(serve_utf8_complete("ab\xe2\x82", 4, false), 2);
    CU_ASSERT_EQUAL(serve_utf8_complete("ab\xe2\x82", 4, true), 4);
    char *buf = NULL;
    size_t len = 0, cap = 0;
    CU_ASSERT_EQUAL(serve_utf8_append(&buf, &len, &cap, "a\xff" "b", 3), MOE_OK);
    CU_ASSERT_STRING_EQUAL(buf, "a\xef\xbf\xbd" "b");
    free(buf);
}

/* ---- a real engine: micro-batched decode rows give the greedy tokens of one forward ---- */

enum { RSLOTS = 6, RNEW = 8, RPREFILL = 8 };
static const char *const real_prompts[RSLOTS] = {"a", "hello there", "xyz", "the quick brown fox jumps over",
                                                 "0123456", "mixture of experts"};

typedef struct real_run {
    int32_t ids[RSLOTS][RNEW]; /* each request's greedy tokens */
    int64_t forwards, steps;   /* the engine's forwards; the scheduler's steps */
    int64_t decode_experts;    /* distinct experts of the decode forwards, summed */
} real_run;

/* The prompts submitted at once to a scheduler over decoder d with engine options eo
 * (prompts longer than RPREFILL go in chunks beside the decoding rows). */
static void serve_real(moe_decoder *d, serve_engine_opts eo, real_run *out) {
    rig r;
    memset(&r, 0, sizeof r);
    serve_metrics_init(&r.metrics);
    eo.metrics = &r.metrics;
    CHECK_OK(serve_engine_open(d, (serve_expert_counts){0}, &eo, RSLOTS, RSLOTS * 64, &r.eng));
    CU_ASSERT_EQUAL_FATAL(serve_text_open_own(&r.text, moe_tokenizer_byte(), -1), MOE_OK);
    CHECK_OK(serve_sched_start(&r.sched, &r.eng, &r.text, &r.metrics,
                               (serve_sched_opts){.max_queue = RSLOTS, .prefill_tokens = RPREFILL}));
    serve_request *q[RSLOTS];
    for (int i = 0; i < RSLOTS; i++) {
        q[i] = request(real_prompts[i], RNEW, NULL);
        q[i]->p.logprobs = 0; /* every piece carries its token's id */
        CU_ASSERT_EQUAL(serve_sched_submit(&r.sched, q[i]), SERVE_SUBMIT_OK);
    }
    for (int i = 0; i < RSLOTS; i++) {
        wait_done(&r, q[i]);
        CU_ASSERT_EQUAL(q[i]->n_pieces, RNEW);
        for (int j = 0; j < RNEW && j < q[i]->n_pieces; j++) out->ids[i][j] = q[i]->pieces[j].lp.id;
        serve_request_release(&r.sched, q[i]);
    }
    serve_sched_stop(&r.sched);
    const moe_token_sched_counts *c = &r.metrics.forwards;
    out->forwards = c->decode.forwards + c->prefill.forwards;
    out->decode_experts = c->decode.experts;
    out->steps = 0;
    for (int b = 0; b <= SERVE_HIST_BUCKETS; b++) out->steps += (int64_t)r.metrics.batch.count[b];
    rig_stop(&r);
}

/* An offloaded decoder of m (lru) at the least budget for the engine of serve_real. */
static moe_offload *offloaded(moe_model *m) {
    moe_offload_options o = {.dtype = MOE_F32, .dev = MOE_CPU, .policy = MOE_OFFLOAD_LRU, .max_seqs = RSLOTS,
                             .kv_tokens = RSLOTS * 64, .max_batch_tokens = RSLOTS + RPREFILL};
    moe_offload_split split;
    CHECK_OK(moe_offload_plan(m, &o, &split, &o.budget));
    moe_offload *off = NULL;
    CHECK_OK(moe_offload_open(m, &o, &off));
    return off;
}

static void test_micro_batches(void) {
    sched_fixture fx;
    sched_fixture_open(&fx, V, 7);
    moe_decoder *d = fx.dec;
    moe_predictor *p = fx.pred;
    moe_offload *off = offloaded(&fx.m);
    real_run want = {0};
    serve_real(d, (serve_engine_opts){0}, &want);
    CU_ASSERT_EQUAL(want.forwards, want.steps);
    int distinct = 0; /* answers that differ from the first: a row put back in the wrong place would show */
    for (int i = 1; i < RSLOTS; i++) distinct += memcmp(want.ids[i], want.ids[0], sizeof want.ids[0]) != 0;
    CU_ASSERT(distinct > 0);
    struct { moe_decoder *d; serve_engine_opts o; const char *name; } runs[] = {
        {d, {.micro_batch = 2}, "arrival, micro-batches of 2"},
        {d, {.micro_batch = 2, .predictor = p}, "paths, micro-batches of 2"},
        {moe_offload_decoder(off), {.micro_batch = 3, .predictor = p}, "paths, micro-batches of 3, offloaded"}};
    printf("\n  one forward per step: %lld steps, %lld distinct experts in decode forwards\n", (long long)want.steps,
           (long long)want.decode_experts);
    for (size_t i = 0; i < sizeof runs / sizeof *runs; i++) {
        real_run got = {0};
        serve_real(runs[i].d, runs[i].o, &got);
        printf("  %s: %lld forwards in %lld steps, %lld distinct experts in decode forwards\n", runs[i].name,
               (long long)got.forwards, (long long)got.steps, (long long)got.decode_experts);
        CU_ASSERT_EQUAL(memcmp(got.ids, want.ids, sizeof want.ids), 0);
        CU_ASSERT(got.forwards > got.steps);
    }
    moe_offload_close(off);
    sched_fixture_close(&fx);
}

static void register_suites(void) {
    moe_test_add_suite("serve", (moe_test_entry[]){{"generate_stop_length", test_generate_stop_length},
                                                   {"packing", test_packing},
                                                   {"kv_admission", test_kv_admission},
                                                   {"cancel_and_queue_bound", test_cancel_and_queue_bound},
                                                   {"utf8", test_utf8},
                                                   {"micro_batches", test_micro_batches},
                                                   {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
