/* Token scheduling in a decoder's forwards (moe/offload/token_sched.h): the histories
 * follow the batches and empty when a slot is freed; the order of decode rows is a
 * permutation, 0..n-1 in arrival order and the greedy grouping of the paths the
 * predictor gives for each row with its history; a batch of decode rows and prompt
 * chunks run in micro-batches writes the logits rows of one forward (to the last bits) and
 * the same greedy tokens, step after step (arrival and paths), with the forwards and their
 * distinct experts counted; a slot in two runs or out of range is refused. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/memory.h"
#include "moe/offload/schedule.h"
#include "moe/offload/token_sched.h"
#include "tests/harness/sched_fixture.h"
#include "tests/harness/testlib.h"

enum { V = 40, SLOTS = 6, CTX = 3, MOE_LAYERS = 3, TOP_K = 2 };

static void test_histories(void) {
    sched_fixture fx;
    sched_fixture_open(&fx, V, 1);
    moe_token_sched *t = NULL;
    CHECK_OK(moe_token_sched_create(fx.dec, SLOTS, 2, fx.pred, &t));
    /* slot 0: a prompt of 4, slot 1: one token */
    int32_t tok[] = {5, 6, 7, 8, 9}, pos[] = {0, 1, 2, 3, 0}, seq[] = {0, 0, 0, 0, 1};
    moe_token_sched_observe(t, &(moe_batch){.n_tokens = 5, .tokens = tok, .pos = pos, .seq = seq});
    int ctx = 0;
    const int32_t *h0 = moe_token_sched_history(t, 0, &ctx), *h1 = moe_token_sched_history(t, 1, &ctx);
    CU_ASSERT_EQUAL_FATAL(ctx, CTX);
    CU_ASSERT(h0[0] == 6 && h0[1] == 7 && h0[2] == 8);
    CU_ASSERT(h1[0] == -1 && h1[1] == -1 && h1[2] == 9);
    /* slot 0 goes on at position 4; slot 1 is freed and a new sequence starts there */
    int32_t tok2[] = {10, 11}, pos2[] = {4, 0}, seq2[] = {0, 1};
    moe_token_sched_seq_free(t, 1);
    CU_ASSERT(h1[0] == -1 && h1[1] == -1 && h1[2] == -1);
    moe_token_sched_observe(t, &(moe_batch){.n_tokens = 2, .tokens = tok2, .pos = pos2, .seq = seq2});
    CU_ASSERT(h0[0] == 7 && h0[1] == 8 && h0[2] == 10);
    CU_ASSERT(h1[0] == -1 && h1[1] == -1 && h1[2] == 11);
    /* a token that does not continue the history restarts it */
    int32_t tok3 = 12, pos3 = 9, seq3 = 0;
    moe_token_sched_observe(t, &(moe_batch){.n_tokens = 1, .tokens = &tok3, .pos = &pos3, .seq = &seq3});
    CU_ASSERT(h0[0] == -1 && h0[1] == -1 && h0[2] == 12);
    moe_token_sched_free(t);
    sched_fixture_close(&fx);
}

/* The path of token tok at position pos read after the history h [CTX] (as the scheduler
 * should predict it). */
static uint64_t expected_path(moe_predictor *p, const int32_t *h, int32_t tok, int32_t pos) {
    int32_t toks[CTX + 1], ps[CTX + 1];
    int n = 0;
    for (int j = 0; j < CTX; j++)
        if (h[j] >= 0) toks[n] = h[j], ps[n++] = pos - CTX + j;
    toks[n] = tok, ps[n++] = pos;
    float scores[MOE_LAYERS * 8];
    CHECK_OK(moe_predictor_predict(p, toks, ps, NULL, n, (const int32_t[]){n - 1}, 1, scores));
    uint64_t path;
    moe_paths_from_scores(scores, MOE_LAYERS, 1, 8, TOP_K, (const int64_t[]){0}, 1, &path);
    return path;
}

static void test_order(void) {
    sched_fixture fx;
    sched_fixture_open(&fx, V, 2);
    moe_token_sched *by_paths = NULL, *arrival = NULL;
    CHECK_OK(moe_token_sched_create(fx.dec, SLOTS, 2, fx.pred, &by_paths));
    CHECK_OK(moe_token_sched_create(fx.dec, SLOTS, 2, NULL, &arrival));
    /* slot q holds a prompt of q + 1 tokens; the rows are their next tokens */
    int32_t ptok[32], ppos[32], pseq[32], tok[SLOTS], pos[SLOTS], seq[SLOTS];
    int n = 0;
    for (int q = 0; q < SLOTS; q++) {
        for (int i = 0; i <= q; i++) ptok[n] = (q * 13 + i * 7) % V, ppos[n] = i, pseq[n++] = q;
        /* row q: slot SLOTS - 1 - q (not in slot order), continuing it */
        tok[q] = (q * 11 + 3) % V, seq[q] = SLOTS - 1 - q, pos[q] = SLOTS - q;
    }
    moe_token_sched_observe(by_paths, &(moe_batch){.n_tokens = n, .tokens = ptok, .pos = ppos, .seq = pseq});
    int32_t order[SLOTS], seen[SLOTS] = {0};
    CHECK_OK(moe_token_sched_order(arrival, tok, pos, seq, SLOTS, order));
    for (int i = 0; i < SLOTS; i++) CU_ASSERT_EQUAL(order[i], i);
    CHECK_OK(moe_token_sched_order(by_paths, tok, pos, seq, SLOTS, order));
    for (int i = 0; i < SLOTS; i++) {
        CU_ASSERT_FATAL(order[i] >= 0 && order[i] < SLOTS);
        seen[order[i]]++;
    }
    for (int i = 0; i < SLOTS; i++) CU_ASSERT_EQUAL(seen[i], 1);
    /* the same order as grouping the paths predicted with each slot's history */
    uint64_t paths[SLOTS];
    int ctx;
    for (int i = 0; i < SLOTS; i++)
        paths[i] = expected_path(fx.pred, moe_token_sched_history(by_paths, seq[i], &ctx), tok[i], pos[i]);
    int32_t want[SLOTS];
    CHECK_OK(moe_schedule_group(paths, SLOTS, 1, 2, want));
    CU_ASSERT_EQUAL(memcmp(order, want, sizeof order), 0);
    int32_t bad = SLOTS;
    CU_ASSERT_EQUAL(moe_token_sched_order(by_paths, tok, pos, &bad, 1, order), MOE_ERR_INVALID);
    moe_token_sched_free(by_paths);
    moe_token_sched_free(arrival);
    sched_fixture_close(&fx);
}

/* A decode state of d fed with one forward per batch, and one fed through scheduler t. */
typedef struct pair {
    moe_decode_state *one, *sched;
    float *want, *got; /* [SLOTS, V] */
} pair;

static int argmax(const float *row) {
    int best = 0;
    for (int v = 1; v < V; v++) best = row[v] > row[best] ? v : best;
    return best;
}

/* Runs b both ways: the same logits rows (up to the last bits: oneDNN runs a product of
 * one row with another kernel than one of several) and the same greedy tokens. */
static void run_both(moe_decoder *d, moe_token_sched *t, pair *pr, const moe_batch *b, int rows) {
    moe_step_reset();
    CHECK_OK(moe_decoder_forward(d, pr->one, b, pr->want, NULL));
    CHECK_OK(moe_token_sched_forward(t, pr->sched, b, pr->got));
    for (int r = 0; r < rows; r++) {
        const float *w = pr->want + (size_t)r * V, *g = pr->got + (size_t)r * V;
        double diff = 0, top = 0;
        for (int v = 0; v < V; v++) {
            diff = fmax(diff, fabs((double)w[v] - g[v]));
            top = fmax(top, fabs((double)w[v]));
        }
        CU_ASSERT(diff <= 1e-5 * top);
        CU_ASSERT_EQUAL(argmax(w), argmax(g));
    }
}

/* Prompts of lengths 3, 1, 4, 2, 1 in slots 0..4 (two of them one token: decode rows that
 * fit one micro-batch), then 4 greedy steps of the five with slot 5's prompt of 3 beside
 * the first, through t (micro-batches of 2). Returns t's counts. */
static moe_token_sched_counts greedy_steps(moe_decoder *d, moe_token_sched *t) {
    pair pr = {.want = malloc(sizeof(float) * SLOTS * V), .got = malloc(sizeof(float) * SLOTS * V)};
    CHECK_OK(moe_decode_state_create(d, SLOTS, SLOTS * 64, &pr.one));
    CHECK_OK(moe_decode_state_create(d, SLOTS, SLOTS * 64, &pr.sched));
    const int len[SLOTS - 1] = {3, 1, 4, 2, 1};
    int32_t tok[16], pos[16], seq[16], n = 0;
    for (int q = 0; q < SLOTS - 1; q++)
        for (int i = 0; i < len[q]; i++) tok[n] = (q * 17 + i * 5 + 1) % V, pos[n] = i, seq[n++] = q;
    run_both(d, t, &pr, &(moe_batch){.n_tokens = n, .tokens = tok, .pos = pos, .seq = seq, .logits = MOE_LOGITS_LAST},
             SLOTS - 1);
    for (int step = 0; step < 4; step++) {
        n = 0;
        for (int q = 0; q < SLOTS - 1; q++) {
            tok[n] = argmax(pr.want + q * V), pos[n] = len[q] + step, seq[n++] = q;
        }
        for (int i = 0; step == 0 && i < 3; i++) tok[n] = 7 + i, pos[n] = i, seq[n++] = SLOTS - 1;
        run_both(d, t, &pr, &(moe_batch){.n_tokens = n, .tokens = tok, .pos = pos, .seq = seq,
                                         .logits = MOE_LOGITS_LAST}, step == 0 ? SLOTS : SLOTS - 1);
    }
    moe_step_reset();
    moe_decode_state_free(pr.one);
    moe_decode_state_free(pr.sched);
    free(pr.want);
    free(pr.got);
    return moe_token_sched_get_counts(t);
}

static void test_forward(void) {
    sched_fixture fx;
    sched_fixture_open(&fx, V, 3);
    moe_decoder *d = fx.dec;
    for (int by_paths = 0; by_paths < 2; by_paths++) {
        moe_token_sched *t = NULL;
        CHECK_OK(moe_token_sched_create(d, SLOTS, 2, by_paths ? fx.pred : NULL, &t));
        moe_token_sched_counts c = greedy_steps(d, t);
        /* the prompts: one forward; step 0: 3 micro-batches of 5 rows + slot 5's prompt; steps 1-3: 3 each */
        CU_ASSERT_EQUAL(c.prefill.forwards, 2);
        CU_ASSERT_EQUAL(c.decode.forwards, 4 * 3);
        /* a forward of r rows routes to at most r x top-k experts per MoE layer, at least top-k */
        CU_ASSERT(c.decode.experts >= 12 * MOE_LAYERS * TOP_K && c.decode.experts <= 4 * 5 * MOE_LAYERS * TOP_K);
        moe_token_sched_free(t);
    }
    /* micro-batches of one row: top-k experts in every MoE layer per forward */
    moe_token_sched *t = NULL;
    CHECK_OK(moe_token_sched_create(d, SLOTS, 1, fx.pred, &t));
    moe_token_sched_counts c = greedy_steps(d, t);
    CU_ASSERT_EQUAL(c.decode.forwards, 2 + 4 * 5); /* the prompts of one token too */
    CU_ASSERT_EQUAL(c.decode.experts, (2 + 4 * 5) * MOE_LAYERS * TOP_K);
    moe_token_sched_free(t);
    sched_fixture_close(&fx);
}

/* A slot in two runs of a batch or out of range: refused before anything runs. */
static void test_bad_batch(void) {
    sched_fixture fx;
    sched_fixture_open(&fx, V, 4);
    moe_decode_state *s = NULL;
    moe_token_sched *t = NULL;
    CHECK_OK(moe_decode_state_create(fx.dec, SLOTS, SLOTS * 64, &s));
    CHECK_OK(moe_token_sched_create(fx.dec, SLOTS, 2, NULL, &t));
    float *logits = malloc(sizeof(float) * SLOTS * V);
    int32_t tok[] = {1, 2, 3}, pos[] = {0, 0, 1}, twice[] = {0, 1, 0}, out[] = {0, 1, SLOTS};
    CU_ASSERT_EQUAL(moe_token_sched_forward(t, s, &(moe_batch){3, tok, pos, twice, MOE_LOGITS_LAST}, logits),
                    MOE_ERR_INVALID);
    CHECK_ERROR_HAS("slot 0 in two runs");
    CU_ASSERT_EQUAL(moe_token_sched_forward(t, s, &(moe_batch){3, tok, pos, out, MOE_LOGITS_LAST}, logits),
                    MOE_ERR_INVALID);
    CHECK_ERROR_HAS("out of range");
    CU_ASSERT_EQUAL(moe_decode_state_seq_len(s, 0), 0);
    CU_ASSERT_EQUAL(moe_token_sched_get_counts(t).decode.forwards + moe_token_sched_get_counts(t).prefill.forwards, 0);
    free(logits);
    moe_token_sched_free(t);
    moe_decode_state_free(s);
    sched_fixture_close(&fx);
}

static void register_suites(void) {
    static const moe_test_entry tests[] = {{"histories", test_histories},
                                           {"order", test_order},
                                           {"forward in micro-batches == one forward", test_forward},
                                           {"bad batch", test_bad_batch},
                                           {NULL, NULL}};
    moe_test_add_suite("offload_sched", tests);
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
