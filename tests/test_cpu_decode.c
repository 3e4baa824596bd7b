/* The decoder (moe/infer/decoder.h): cached prefill and token-by-token decode against the
 * training forward for every mixer, packed batches against sequences alone, paged KV
 * blocks freed and reused, batch checks, router selection, weights cast once, and
 * training after generation. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/device.h"
#include "core/graph.h"
#include "core/memory.h"
#include "core/ops.h"
#include "moe/hf/hf_model.h"
#include "moe/infer/decoder.h"
#include "moe/model/model.h"
#include "tests/harness/testlib.h"

enum { V = 32 };

static void small_config(moe_config *c, moe_cfg_mixer mixer) {
    moe_config_defaults(c);
    c->model.vocab_size = V;
    c->model.d_model = 16;
    c->model.n_layers = 3;
    c->model.n_heads = 2;
    c->model.seq_len = 40;
    c->model.ffn_dim = 8;
    c->model.n_experts = 4;
    c->model.top_k = 2;
    c->model.tie_embeddings = false;
    c->model.init_std = 0.3;
    c->model.mom_heads = 2;
    c->model.mom_chunk = 4;
    /* the first layer keeps attention so that every model has a KV cache to page */
    c->model.mixer = (moe_yaml_list){.count = 3, .values = {MOE_CFG_MIXER_ATTENTION, mixer, mixer}};
}

/* Multi-head latent attention at the small config's sizes: low-rank q and kv, v wider
 * than q/k. */
static void small_mla(moe_config *c) {
    c->model.attention = MOE_CFG_ATTENTION_MLA;
    c->model.q_lora_rank = 6;
    c->model.kv_lora_rank = 5;
    c->model.qk_nope_dim = 4;
    c->model.qk_rope_dim = 2;
    c->model.v_head_dim = 8;
}

static void open_model(moe_model *m, const moe_config *c, moe_dtype compute) {
    CU_ASSERT_EQUAL_FATAL(moe_config_validate(c), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_model_init(m, c, 0, 1), MOE_OK);
    m->compute = compute;
}

/* Token i of the test sequence `seed`. */
static int32_t tok_at(int i, int seed) { return (i * 7 + seed * 13 + 3) % V; }

static void fill_tokens(int32_t *t, int n, int seed) {
    for (int i = 0; i < n; i++) t[i] = tok_at(i, seed);
}

/* Logits of every position from the training forward (no cache): tokens [B, T] -> out
 * [B T, V] (f64). */
static void full_logits(moe_model *m, const int32_t *tokens, int B, int T, double *out) {
    bool was = moe_grad_set_enabled(false);
    moe_tensor *ids = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 2, (int64_t[]){B, T}, tokens);
    moe_forward f = {.mode = MOE_FORWARD_TRAIN, .B = B, .T = T};
    moe_tensor *h = moe_model_forward(m, ids, &f);
    moe_tensor *lg = moe_matmul(h, moe_transpose(moe_model_head(m), 0, 1));
    CU_ASSERT_FATAL(lg != NULL);
    CU_ASSERT_EQUAL_FATAL(moe_tensor_to_host_f64(lg, out), MOE_OK);
    moe_grad_set_enabled(was);
}

/* max |a - b| / max |b| over n values. */
static double rel_err(const float *a, const double *b, int64_t n) {
    double d = 0, s = 0;
    for (int64_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        s = fmax(s, fabs(b[i]));
    }
    return d / s;
}

static double rel_err_f(const float *a, const float *b, int64_t n) {
    double d = 0, s = 0;
    for (int64_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        s = fmax(s, fabs((double)b[i]));
    }
    return d / s;
}

/* Prefill `prefill` tokens, then one token at a time up to T, the experts run by `path`:
 * each step's logits against the training forward's row; returns the worst relative error. */
static double decode_vs_full_by(moe_model *m, moe_dtype dt, int T, int prefill, moe_expert_path path) {
    const int64_t Vm = m->cfg.model.vocab_size;
    int32_t tok[64];
    double *full = malloc(sizeof(double) * (size_t)(T * Vm));
    float *step = malloc(sizeof(float) * (size_t)Vm);
    fill_tokens(tok, T, 1);
    moe_step_reset();
    full_logits(m, tok, 1, T, full);
    moe_decoder *d;
    moe_decode_state *s;
    CU_ASSERT_EQUAL_FATAL(moe_decoder_open(m, dt, &d), MOE_OK);
    moe_decoder_set_expert_path(d, path);
    CU_ASSERT_EQUAL_FATAL(moe_decode_state_create(d, 2, 64, &s), MOE_OK);
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_decoder_feed(d, s, 1, tok, prefill, step), MOE_OK);
    double worst = rel_err(step, full + (prefill - 1) * Vm, Vm);
    for (int t = prefill; t < T; t++) {
        moe_step_reset();
        CU_ASSERT_EQUAL_FATAL(moe_decoder_feed(d, s, 1, tok + t, 1, step), MOE_OK);
        worst = fmax(worst, rel_err(step, full + (int64_t)t * Vm, Vm));
    }
    CU_ASSERT_EQUAL(moe_decode_state_seq_len(s, 1), T);
    CU_ASSERT_EQUAL(moe_decode_state_seq_len(s, 0), 0);
    if (path == MOE_EXPERT_PATH_GATHERED && m->cfg.model.mixer.values[1] == MOE_CFG_MIXER_ATTENTION)
        CU_ASSERT_PTR_NULL(moe_decoder_graphs_off(d)); /* its steps ran the recordable way */
    moe_decode_state_free(s);
    moe_decoder_close(d);
    free(full);
    free(step);
    moe_step_reset();
    return worst;
}

static double decode_vs_full(moe_model *m, moe_dtype dt, int T, int prefill) {
    return decode_vs_full_by(m, dt, T, prefill, MOE_EXPERT_PATH_AUTO);
}

/* The routes of a prefill of 3 sequences x 4 tokens and of one decode step of the 3, their
 * experts run by `path`: routes [2][n_layers, 12, top_k] (the decode step's in the first
 * 3 x top_k entries of each layer's block of the second). */
static void routes_by(moe_model *m, moe_expert_path path, int32_t *routes) {
    const int L = m->cfg.model.n_layers, k = m->cfg.model.top_k;
    moe_decoder *d;
    moe_decode_state *s;
    CU_ASSERT_EQUAL_FATAL(moe_decoder_open(m, MOE_F64, &d), MOE_OK);
    moe_decoder_set_expert_path(d, path);
    CU_ASSERT_EQUAL_FATAL(moe_decode_state_create(d, 3, 48, &s), MOE_OK);
    int32_t tok[12], pos[12], seq[12];
    for (int i = 0; i < 12; i++) tok[i] = tok_at(i, 2), pos[i] = i % 4, seq[i] = i / 4;
    float logits[3 * V];
    for (int pass = 0; pass < 2; pass++) {
        int n = pass == 0 ? 12 : 3;
        if (pass == 1)
            for (int q = 0; q < 3; q++) tok[q] = tok_at(q, 5), pos[q] = 4, seq[q] = q;
        moe_batch b = {.n_tokens = n, .tokens = tok, .pos = pos, .seq = seq, .logits = MOE_LOGITS_LAST};
        int32_t *r = routes + (int64_t)pass * L * 12 * k;
        for (int i = 0; i < L * 12 * k; i++) r[i] = -7;
        moe_decode_info info = {.route_ids = r};
        moe_step_reset();
        CU_ASSERT_EQUAL_FATAL(moe_decoder_forward(d, s, &b, logits, &info), MOE_OK);
    }
    moe_decode_state_free(s);
    moe_decoder_close(d);
    moe_step_reset();
}

/* The gathered experts and the routing sorted where it was made (both forced on the host)
 * decode as the full forward does, and report the grouped path's routes through their
 * route sink. */
static void test_decode_device_paths(void) {
    moe_config c;
    small_config(&c, MOE_CFG_MIXER_ATTENTION);
    c.model.dense_layers = 1; /* a dense layer's routes are -1 either way */
    moe_model m;
    open_model(&m, &c, MOE_F64);
    const int n = 2 * c.model.n_layers * 12 * c.model.top_k;
    int32_t *grouped = malloc(sizeof(int32_t) * n), *routes = malloc(sizeof(int32_t) * n);
    routes_by(&m, MOE_EXPERT_PATH_GROUPED, grouped);
    const moe_expert_path paths[2] = {MOE_EXPERT_PATH_GATHERED, MOE_EXPERT_PATH_SORTED};
    for (int p = 0; p < 2; p++) {
        double e = decode_vs_full_by(&m, MOE_F64, 21, 5, paths[p]);
        fprintf(stderr, "  %s decode vs full forward, f64 %.3g\n", p == 0 ? "gathered" : "sorted", e);
        CU_ASSERT(e < 1e-6);
        routes_by(&m, paths[p], routes);
        CU_ASSERT_EQUAL(memcmp(grouped, routes, sizeof(int32_t) * n), 0);
        int sunk = 0;
        for (int i = 0; i < n; i++) sunk += routes[i] >= 0 && routes[i] < c.model.n_experts;
        CU_ASSERT(sunk > 0);
    }
    free(grouped);
    free(routes);
    moe_model_free(&m);
}

/* Three sequences prefilled together (5, 2 and 11 tokens), then `steps` one-token steps
 * of the sequences still running (the second stops after 3 steps: batches of 3, then 2),
 * on decoder d: every step's logits, one after the other, into out. Returns the rows. */
static int decode_three(moe_decoder *d, int steps, float *out) {
    moe_decode_state *s;
    CU_ASSERT_EQUAL_FATAL(moe_decode_state_create(d, 3, 96, &s), MOE_OK);
    const int lens[3] = {5, 2, 11};
    int32_t tok[18], pos[18], seq[18];
    int n = 0, rows = 0;
    for (int q = 0; q < 3; q++)
        for (int t = 0; t < lens[q]; t++, n++) tok[n] = tok_at(n, q), pos[n] = t, seq[n] = q;
    moe_batch b = {.n_tokens = n, .tokens = tok, .pos = pos, .seq = seq, .logits = MOE_LOGITS_LAST};
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_decoder_forward(d, s, &b, out, NULL), MOE_OK);
    rows += 3;
    for (int step = 0; step < steps; step++) {
        n = 0;
        for (int q = 0; q < 3; q++) {
            if (q == 1 && step >= 3) continue;
            tok[n] = tok_at(step, q + 5), pos[n] = (int32_t)moe_decode_state_seq_len(s, q), seq[n++] = q;
        }
        b = (moe_batch){.n_tokens = n, .tokens = tok, .pos = pos, .seq = seq, .logits = MOE_LOGITS_LAST};
        moe_step_reset();
        CU_ASSERT_EQUAL_FATAL(moe_decoder_forward(d, s, &b, out + (int64_t)rows * V, NULL), MOE_OK);
        rows += n;
    }
    moe_decode_state_free(s);
    moe_step_reset();
    return rows;
}

/* Recordable decode steps (attention, gathered experts) on the host run through the fixed
 * inputs under the recording rule (no host data in or out): the same logits, bit for bit,
 * as op by op, for batches of 3 and then 2 sequences. */
static void test_recorded_steps(void) {
    for (int mla = 0; mla < 2; mla++) {
        moe_config c;
        small_config(&c, MOE_CFG_MIXER_ATTENTION);
        if (mla) small_mla(&c);
        moe_model m;
        open_model(&m, &c, MOE_F64);
        moe_decoder *rec, *ops;
        CU_ASSERT_EQUAL_FATAL(moe_decoder_open(&m, MOE_F64, &rec), MOE_OK);
        CU_ASSERT_EQUAL_FATAL(moe_decoder_open(&m, MOE_F64, &ops), MOE_OK);
        moe_decoder_set_expert_path(rec, MOE_EXPERT_PATH_GATHERED);
        moe_decoder_set_expert_path(ops, MOE_EXPERT_PATH_GATHERED);
        moe_decoder_set_graphs(ops, false);
        enum { STEPS = 6, ROWS = 3 + 3 * 3 + 3 * 2 };
        float *a = malloc(sizeof(float) * ROWS * V), *b = malloc(sizeof(float) * ROWS * V);
        CU_ASSERT_EQUAL(decode_three(rec, STEPS, a), ROWS);
        CU_ASSERT_EQUAL(decode_three(ops, STEPS, b), ROWS);
        CU_ASSERT_EQUAL(memcmp(a, b, sizeof(float) * ROWS * V), 0);
        if (moe_decoder_graphs_off(rec)) fprintf(stderr, "  recording off: %s\n", moe_decoder_graphs_off(rec));
        CU_ASSERT_PTR_NULL(moe_decoder_graphs_off(rec));
        CU_ASSERT_STRING_EQUAL(moe_decoder_graphs_off(ops), "turned off");
        free(a);
        free(b);
        moe_decoder_close(rec);
        moe_decoder_close(ops);
        moe_model_free(&m);
    }
}

/* While a device records (core/graph.h), host data neither enters nor leaves it and the
 * host does not wait for it; device ops still run (the CPU runs them at once); a second
 * recording is refused; after the end every transfer works again. */
static void test_recording_rule(void) {
    int32_t host[4] = {1, 2, 3, 4};
    moe_tensor *t = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, (int64_t[]){4}, host);
    moe_tensor *x = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 1, (int64_t[]){4});
    CU_ASSERT_EQUAL_FATAL(moe_graph_begin(MOE_CPU), MOE_OK);
    CU_ASSERT_TRUE(moe_graph_recording(MOE_CPU));
    CU_ASSERT_EQUAL(moe_graph_begin(MOE_CPU), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NULL(moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, (int64_t[]){4}, host));
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "while recording"));
    CU_ASSERT_EQUAL(moe_tensor_write_host(t, host), MOE_ERR_INVALID);
    CU_ASSERT_EQUAL(moe_device_sync(MOE_CPU), MOE_ERR_INVALID);
    CU_ASSERT_EQUAL(moe_tensor_fill(x, 2.0), MOE_OK);
    moe_graph *g = (moe_graph *)&g;
    CU_ASSERT_EQUAL(moe_graph_end(MOE_CPU, true, &g), MOE_OK);
    CU_ASSERT_PTR_NULL(g); /* the CPU ran the work as it went */
    CU_ASSERT_FALSE(moe_graph_recording(MOE_CPU));
    CU_ASSERT_EQUAL(((float *)x->data)[3], 2.0f);
    CU_ASSERT_EQUAL(moe_tensor_write_host(t, host), MOE_OK);
    CU_ASSERT_EQUAL(moe_device_sync(MOE_CPU), MOE_OK);
    moe_step_reset();
}

static void check_decode(moe_cfg_mixer mixer, const char *name) {
    moe_config c;
    small_config(&c, mixer);
    moe_model m;
    open_model(&m, &c, MOE_F64);
    double e64 = decode_vs_full(&m, MOE_F64, 21, 5); /* 21 tokens: two KV blocks */
    m.compute = MOE_F32;
    double e32 = decode_vs_full(&m, MOE_F32, 21, 5);
    fprintf(stderr, "  %s: decode vs full forward, f64 %.3g, f32 %.3g\n", name, e64, e32);
    CU_ASSERT(e64 < 1e-6); /* the logits come back as f32 */
    CU_ASSERT(e32 < 1e-4);
    moe_model_free(&m);
}

static void test_decode_attention(void) { check_decode(MOE_CFG_MIXER_ATTENTION, "attention"); }
static void test_decode_mom(void) { check_decode(MOE_CFG_MIXER_MOM, "mom"); }
static void test_decode_gdn(void) { check_decode(MOE_CFG_MIXER_GDN, "gdn"); }

/* Multi-head latent attention and the other model features through the cache. */
static void test_decode_features(void) {
    moe_config c;
    small_config(&c, MOE_CFG_MIXER_ATTENTION);
    small_mla(&c);
    c.router.score = MOE_CFG_SCORE_SIGMOID;
    c.router.n_groups = 2;
    c.router.topk_groups = 1;
    c.model.n_shared_experts = 1;
    moe_model m;
    open_model(&m, &c, MOE_F64);
    double e = decode_vs_full(&m, MOE_F64, 19, 3);
    fprintf(stderr, "  mla, sigmoid grouped routing, shared expert: %.3g\n", e);
    CU_ASSERT(e < 1e-6);
    moe_model_free(&m);
    small_config(&c, MOE_CFG_MIXER_ATTENTION);
    c.router.type = MOE_CFG_ROUTER_RMOE;
    c.model.head_dim = 6;
    c.model.n_kv_heads = 1;
    c.model.qkv_bias = true;
    c.model.qk_norm = MOE_CFG_QK_NORM_HEAD;
    open_model(&m, &c, MOE_F64);
    e = decode_vs_full(&m, MOE_F64, 18, 17);
    fprintf(stderr, "  rmoe router, gqa, biases, q/k norm: %.3g\n", e);
    CU_ASSERT(e < 1e-6);
    moe_model_free(&m);
}

/* The tiny Hugging Face fixtures (tests/fixtures/hf) through the cache, on the host's path
 * and with the routing sorted as on a device. */
static void test_decode_hf_fixtures(void) {
    static const char *const names[] = {"mixtral-tiny", "olmoe-tiny", "qwen2-moe-tiny", "qwen3-moe-tiny",
                                        "deepseek-v3-tiny"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char dir[1024];
        snprintf(dir, sizeof dir, "%s", __FILE__);
        char *slash = strrchr(dir, '/');
        if (slash) *slash = '\0';
        size_t n = strlen(dir);
        snprintf(dir + n, sizeof dir - n, "/fixtures/hf/%s", names[i]);
        moe_model m;
        moe_hf_info info;
        CU_ASSERT_EQUAL_FATAL(moe_hf_load(dir, &m, &info), MOE_OK);
        double e = decode_vs_full(&m, MOE_F32, 20, 6), es = decode_vs_full_by(&m, MOE_F32, 20, 6, MOE_EXPERT_PATH_SORTED);
        fprintf(stderr, "  %s: decode vs full forward %.3g (routing sorted as on a device: %.3g)\n", names[i], e, es);
        CU_ASSERT(e < 1e-4);
        CU_ASSERT(es < 1e-4);
        moe_model_free(&m);
    }
}

/* Runs lens[i] tokens of sequence i (seed i) through one decoder, one sequence per call,
 * into out (every position's logits, sequence after sequence). */
static void alone(moe_decoder *d, const int *lens, int n, float *out) {
    for (int i = 0; i < n; i++) {
        moe_decode_state *s;
        CU_ASSERT_EQUAL_FATAL(moe_decode_state_create(d, 1, lens[i], &s), MOE_OK);
        int32_t tok[64], pos[64], seq[64];
        fill_tokens(tok, lens[i], i);
        for (int t = 0; t < lens[i]; t++) pos[t] = t, seq[t] = 0;
        moe_batch b = {.n_tokens = lens[i], .tokens = tok, .pos = pos, .seq = seq, .logits = MOE_LOGITS_ALL};
        moe_step_reset();
        CU_ASSERT_EQUAL_FATAL(moe_decoder_forward(d, s, &b, out, NULL), MOE_OK);
        out += (int64_t)lens[i] * V;
        moe_decode_state_free(s);
    }
}

/* Sequences of different lengths packed in one forward equal each sequence alone; then a
 * mixed batch (a decode step of one, the prefill of another) continues them. */
static void check_packed(moe_cfg_mixer mixer) {
    moe_config c;
    small_config(&c, mixer);
    moe_model m;
    open_model(&m, &c, MOE_F32);
    moe_decoder *d;
    CU_ASSERT_EQUAL_FATAL(moe_decoder_open(&m, MOE_F32, &d), MOE_OK);
    const int lens[3] = {5, 2, 19}, total = 26;
    float ref[26 * V], got[26 * V];
    alone(d, lens, 3, ref);
    moe_decode_state *s;
    CU_ASSERT_EQUAL_FATAL(moe_decode_state_create(d, 4, 64, &s), MOE_OK);
    int32_t tok[26], pos[26], seq[26], at = 0;
    const int slot[3] = {2, 0, 3}; /* any slots, in any order */
    for (int i = 0; i < 3; i++) {
        fill_tokens(tok + at, lens[i], i);
        for (int t = 0; t < lens[i]; t++) pos[at + t] = t, seq[at + t] = slot[i];
        at += lens[i];
    }
    moe_batch b = {.n_tokens = total, .tokens = tok, .pos = pos, .seq = seq, .logits = MOE_LOGITS_ALL};
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_decoder_forward(d, s, &b, got, NULL), MOE_OK);
    double e = rel_err_f(got, ref, (int64_t)total * V);
    CU_ASSERT(e < 1e-5);
    /* the last-token rows of the same packed batch, fresh state */
    moe_decode_state *s2;
    CU_ASSERT_EQUAL_FATAL(moe_decode_state_create(d, 4, 64, &s2), MOE_OK);
    b.logits = MOE_LOGITS_LAST;
    float last[3 * V];
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_decoder_forward(d, s2, &b, last, NULL), MOE_OK);
    CU_ASSERT(rel_err_f(last, ref + 4 * V, V) < 1e-5);
    CU_ASSERT(rel_err_f(last + V, ref + 6 * V, V) < 1e-5);
    CU_ASSERT(rel_err_f(last + 2 * V, ref + 25 * V, V) < 1e-5);
    moe_decode_state_free(s2);
    /* continuing: sequence 0 (slot 2) one more token and sequence 1 (slot 0) three more, in
     * one batch, equal sequences of 6 and 5 tokens alone */
    int32_t q0[6], q1[5];
    fill_tokens(q0, 6, 0);
    fill_tokens(q1, 5, 1);
    int32_t t2[4] = {q0[5], q1[2], q1[3], q1[4]}, p2[4] = {5, 2, 3, 4}, s2q[4] = {2, 0, 0, 0};
    const int lens2[2] = {6, 5};
    float ref2[11 * V], got2[2 * V];
    alone(d, lens2, 2, ref2);
    moe_batch b2 = {.n_tokens = 4, .tokens = t2, .pos = p2, .seq = s2q, .logits = MOE_LOGITS_LAST};
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_decoder_forward(d, s, &b2, got2, NULL), MOE_OK);
    double e2 = fmax(rel_err_f(got2, ref2 + 5 * V, V), rel_err_f(got2 + V, ref2 + 10 * V, V));
    fprintf(stderr, "  mixer %d: packed vs alone %.3g, continued %.3g\n", (int)mixer, e, e2);
    CU_ASSERT(e2 < 1e-5);
    CU_ASSERT_EQUAL(moe_decode_state_seq_len(s, 0), 5);
    CU_ASSERT_EQUAL(moe_decode_state_seq_len(s, 2), 6);
    CU_ASSERT_EQUAL(moe_decode_state_seq_len(s, 3), 19);
    /* a decode step of all three (one token each: MoM runs them as rows of one forward) */
    int32_t t3[3], p3[3] = {5, 6, 19}, s3[3] = {0, 2, 3};
    t3[0] = tok_at(5, 1), t3[1] = tok_at(6, 0), t3[2] = tok_at(19, 2); /* sequences 1, 0, 2 go on */
    const int lens3[3] = {7, 6, 20};
    float *ref3 = malloc(sizeof(float) * 33 * V), got3[3 * V];
    alone(d, lens3, 3, ref3);
    moe_batch b3 = {.n_tokens = 3, .tokens = t3, .pos = p3, .seq = s3, .logits = MOE_LOGITS_LAST};
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_decoder_forward(d, s, &b3, got3, NULL), MOE_OK);
    double e3 = fmax(fmax(rel_err_f(got3, ref3 + 12 * V, V), rel_err_f(got3 + V, ref3 + 6 * V, V)),
                     rel_err_f(got3 + 2 * V, ref3 + 32 * V, V));
    fprintf(stderr, "  mixer %d: one-token step of three sequences %.3g\n", (int)mixer, e3);
    CU_ASSERT(e3 < 1e-5);
    free(ref3);
    moe_decode_state_free(s);
    moe_decoder_close(d);
    moe_model_free(&m);
    moe_step_reset();
}

static void test_packed_attention(void) { check_packed(MOE_CFG_MIXER_ATTENTION); }
static void test_packed_mom(void) { check_packed(MOE_CFG_MIXER_MOM); }

/* A pool of 3 blocks: two 20-token sequences do not fit together (the refused one leaves
 * everything as it was); freeing the first lets the second in on the same blocks, with the
 * results of a fresh state. */
static void test_paged_reuse(void) {
    moe_config c;
    small_config(&c, MOE_CFG_MIXER_MOM);
    moe_model m;
    open_model(&m, &c, MOE_F32);
    moe_decoder *d;
    moe_decode_state *s;
    CU_ASSERT_EQUAL_FATAL(moe_decoder_open(&m, MOE_F32, &d), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_decode_state_create(d, 2, 3 * MOE_KV_BLOCK - 5, &s), MOE_OK); /* rounded up */
    CU_ASSERT_EQUAL(moe_decode_state_free_tokens(s), 3 * MOE_KV_BLOCK);
    int32_t a[20], b[20];
    fill_tokens(a, 20, 4);
    fill_tokens(b, 20, 5);
    float la[V], lb[V], lb2[V], ref[V];
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_decoder_feed(d, s, 0, a, 20, la), MOE_OK);
    CU_ASSERT_EQUAL(moe_decode_state_free_tokens(s), MOE_KV_BLOCK);
    moe_step_reset();
    CU_ASSERT_EQUAL(moe_decoder_feed(d, s, 1, b, 20, lb), MOE_ERR_OOM);
    CU_ASSERT(strstr(moe_last_error(), "KV pool is full") != NULL);
    CU_ASSERT_EQUAL(moe_decode_state_free_tokens(s), MOE_KV_BLOCK);
    CU_ASSERT_EQUAL(moe_decode_state_seq_len(s, 1), 0);
    CU_ASSERT_EQUAL(moe_decode_state_seq_free(s, 0), MOE_OK);
    CU_ASSERT_EQUAL(moe_decode_state_free_tokens(s), 3 * MOE_KV_BLOCK);
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_decoder_feed(d, s, 1, b, 20, lb), MOE_OK);
    /* slot 0 reused at once for b as well: same blocks handed round, same logits */
    CU_ASSERT_EQUAL(moe_decode_state_seq_free(s, 1), MOE_OK);
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_decoder_feed(d, s, 0, b, 20, lb2), MOE_OK);
    moe_decode_state *fresh;
    CU_ASSERT_EQUAL_FATAL(moe_decode_state_create(d, 1, 20, &fresh), MOE_OK);
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_decoder_feed(d, fresh, 0, b, 20, ref), MOE_OK);
    CU_ASSERT(memcmp(lb, ref, sizeof ref) == 0);
    CU_ASSERT(memcmp(lb2, ref, sizeof ref) == 0);
    CU_ASSERT(memcmp(la, ref, sizeof ref) != 0);
    moe_decode_state_free(fresh);
    moe_decode_state_free(s);
    moe_decoder_close(d);
    moe_model_free(&m);
    moe_step_reset();
}

/* Batches that break the rules are refused with a message and change nothing. */
static void test_batch_checks(void) {
    moe_config c;
    small_config(&c, MOE_CFG_MIXER_ATTENTION);
    moe_model m;
    open_model(&m, &c, MOE_F32);
    moe_decoder *d;
    moe_decode_state *s;
    CU_ASSERT_EQUAL_FATAL(moe_decoder_open(&m, MOE_F32, &d), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_decode_state_create(d, 2, 64, &s), MOE_OK);
    float lg[2 * V];
    int32_t tok[3] = {1, 2, 3};
    struct {
        int32_t pos[3], seq[3];
        const char *msg;
    } bad[] = {
        {{0, 0, 1}, {0, 1, 0}, "not contiguous"},
        {{0, 2, 3}, {0, 0, 0}, "consecutive"},
        {{0, 1, 2}, {0, 0, 2}, "not in [0, 2)"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        moe_batch b = {.n_tokens = 3, .tokens = tok, .pos = bad[i].pos, .seq = bad[i].seq, .logits = MOE_LOGITS_LAST};
        moe_step_reset();
        CU_ASSERT_EQUAL(moe_decoder_forward(d, s, &b, lg, NULL), MOE_ERR_INVALID);
        CU_ASSERT(strstr(moe_last_error(), bad[i].msg) != NULL);
    }
    int32_t big[1] = {V}, p0[1] = {0}, q0[1] = {0};
    moe_batch b = {.n_tokens = 1, .tokens = big, .pos = p0, .seq = q0, .logits = MOE_LOGITS_LAST};
    CU_ASSERT_EQUAL(moe_decoder_forward(d, s, &b, lg, NULL), MOE_ERR_INVALID);
    CU_ASSERT_EQUAL(moe_decode_state_free_tokens(s), 4 * MOE_KV_BLOCK);
    /* a fresh sequence may start anywhere; then it must continue from there */
    moe_step_reset();
    CU_ASSERT_EQUAL(moe_decoder_feed(d, s, 1, tok, 2, lg), MOE_OK);
    int32_t p3[1] = {3}, q1[1] = {1};
    b = (moe_batch){.n_tokens = 1, .tokens = tok, .pos = p3, .seq = q1, .logits = MOE_LOGITS_LAST};
    CU_ASSERT_EQUAL(moe_decoder_forward(d, s, &b, lg, NULL), MOE_ERR_INVALID);
    CU_ASSERT(strstr(moe_last_error(), "continues at 2") != NULL);
    CU_ASSERT_EQUAL(moe_decode_state_seq_len(s, 0), 0);
    CU_ASSERT_EQUAL(moe_decode_state_seq_len(s, 1), 2);
    moe_decode_state_free(s);
    moe_decoder_close(d);
    moe_model_free(&m);
    moe_step_reset();
}

/* moe_model_logits equals the training forward's rows, also started at another position
 * (rotary embeddings see only relative positions), and reports the routes. */
static void test_model_logits(void) {
    moe_config c;
    small_config(&c, MOE_CFG_MIXER_GDN);
    moe_model m;
    open_model(&m, &c, MOE_F32);
    int32_t tok[2 * 7];
    fill_tokens(tok, 14, 2);
    float lg[14 * V];
    double full[14 * V];
    int32_t routes[3 * 14 * 2];
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_model_logits(&m, tok, 2, 7, 0, lg, routes), MOE_OK);
    full_logits(&m, tok, 2, 7, full);
    CU_ASSERT(rel_err(lg, full, 14 * V) < 1e-5);
    for (int i = 0; i < 14 * 2; i++) CU_ASSERT(routes[14 * 2 + i] >= 0 && routes[14 * 2 + i] < 4);
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_model_logits(&m, tok, 1, 7, 9, lg, NULL), MOE_OK);
    CU_ASSERT(rel_err(lg, full, 7 * V) < 1e-5); /* rope is relative: a shifted start changes nothing */
    moe_model_free(&m);
    moe_step_reset();
}

/* The selection alone equals the training router's choice (top-k, sigmoid with groups,
 * the bias), and OT selects by plain top-k at inference. */
/* Step memory of one prefill forward of T tokens through a model of n_layers attention
 * blocks (d 64, 8 experts of 64, top-2). */
static size_t prefill_step_peak(int n_layers, int T) {
    moe_config c;
    small_config(&c, MOE_CFG_MIXER_ATTENTION);
    c.model.n_layers = n_layers;
    c.model.mixer = (moe_yaml_list){.count = 1, .values = {MOE_CFG_MIXER_ATTENTION}};
    c.model.d_model = 64;
    c.model.ffn_dim = 64;
    c.model.n_experts = 8;
    c.model.seq_len = T;
    moe_model m;
    open_model(&m, &c, MOE_F32);
    moe_decoder *d = NULL;
    moe_decode_state *s = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_decoder_open(&m, MOE_F32, &d), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_decode_state_create(d, 1, T, &s), MOE_OK);
    int32_t *tokens = malloc(sizeof(int32_t) * (size_t)T);
    float logits[V];
    fill_tokens(tokens, T, 1);
    moe_step_reset();
    moe_mem_reset_peaks(MOE_CPU);
    CU_ASSERT_EQUAL(moe_decoder_feed(d, s, 0, tokens, T, logits), MOE_OK);
    size_t peak = moe_mem_get_stats(MOE_CPU).step_peak;
    moe_step_reset();
    free(tokens);
    moe_decode_state_free(s);
    moe_decoder_close(d);
    moe_model_free(&m);
    return peak;
}

/* Inference hands each sublayer's intermediates back when the sublayer ends: a long
 * forward's step memory hardly grows with depth (keeping them all it grows with every
 * layer). */
static void test_infer_step_memory(void) {
    size_t one = prefill_step_peak(1, 256), eight = prefill_step_peak(8, 256);
    CU_ASSERT(one > 0);
    CU_ASSERT(eight < one + one / 2);
    if (!(eight < one + one / 2)) fprintf(stderr, "step peak: 1 layer %zu bytes, 8 layers %zu\n", one, eight);
    /* short forwards (decode steps) keep theirs: no result copies on the step's hot path */
    size_t one_short = prefill_step_peak(1, 32), eight_short = prefill_step_peak(8, 32);
    CU_ASSERT(eight_short > 3 * one_short);
}

static void test_router_select(void) {
    const moe_router_settings base = {.n_experts = 8, .top_k = 2, .d_model = 6, .renormalize = true, .aux_coef = 0.01};
    moe_router_settings variants[3] = {base, base, base};
    variants[1].sigmoid_scores = true, variants[1].n_groups = 4, variants[1].topk_groups = 2, variants[1].scale = 2.5;
    variants[2].type = MOE_ROUTER_OT;
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F64, 2, (int64_t[]){5, 6}, 3, 0, 1.0);
    for (int v = 0; v < 3; v++) {
        moe_router r;
        CU_ASSERT_EQUAL_FATAL(moe_router_init(&r, &variants[v], MOE_CPU, MOE_F32, "t.router", 11, 0.5), MOE_OK);
        moe_step_reset();
        moe_routing a, b;
        CU_ASSERT_EQUAL_FATAL(moe_router_forward(&r, x, NULL, &a), MOE_OK);
        CU_ASSERT_EQUAL_FATAL(moe_router_select(&r, moe_router_logits(&r, x, NULL, NULL), &b), MOE_OK);
        CU_ASSERT_PTR_NULL(b.aux_loss);
        CU_ASSERT_PTR_NULL(b.z_loss);
        CU_ASSERT_PTR_NOT_NULL(a.aux_loss);
        double ga[10], gb[10], p[40];
        CU_ASSERT_EQUAL(moe_tensor_to_host_f64(a.gates, ga), MOE_OK);
        CU_ASSERT_EQUAL(moe_tensor_to_host_f64(b.gates, gb), MOE_OK);
        CU_ASSERT_EQUAL(moe_tensor_to_host_f64(b.probs, p), MOE_OK);
        int64_t load = 0;
        for (int e = 0; e < 8; e++) load += b.load[e];
        CU_ASSERT_EQUAL(load, 10);
        for (int t = 0; t < 5; t++) {
            int32_t e0 = b.host_experts[2 * t], e1 = b.host_experts[2 * t + 1];
            if (v == 0) /* plain top-k: the two largest p, the larger first */
                for (int e = 0; e < 8; e++)
                    CU_ASSERT(e == e0 || e == e1 || (p[t * 8 + e] <= p[t * 8 + e1] && p[t * 8 + e1] <= p[t * 8 + e0]));
            if (v == 2) /* ot at inference: the same plain top-k */
                for (int e = 0; e < 8; e++) CU_ASSERT(e == e0 || e == e1 || p[t * 8 + e] <= p[t * 8 + e1]);
            if (v == 2) continue;
            CU_ASSERT_EQUAL(a.host_experts[2 * t], e0);
            CU_ASSERT_EQUAL(a.host_experts[2 * t + 1], e1);
            CU_ASSERT(fabs(ga[2 * t] - gb[2 * t]) < 1e-12 && fabs(ga[2 * t + 1] - gb[2 * t + 1]) < 1e-12);
        }
        if (v == 1) CU_ASSERT(fabs(gb[0] + gb[1] - 2.5) < 1e-9); /* renormalised, then scaled */
        moe_router_free(&r);
    }
    moe_tensor_free(x);
    moe_step_reset();
}

/* A view cast to f64 holds f64 copies (the GRU stays in the router dtype: f64 here too) and
 * leaves the model alone; an f32 view shares the model's tensors. */
static void test_cast_view(void) {
    moe_config c;
    small_config(&c, MOE_CFG_MIXER_ATTENTION);
    c.router.type = MOE_CFG_ROUTER_RMOE;
    moe_model m, v;
    open_model(&m, &c, MOE_F32);
    CU_ASSERT_EQUAL_FATAL(moe_model_cast_view(&m, MOE_F32, &v), MOE_OK);
    for (int i = 0; i < m.n_params; i++) CU_ASSERT(v.params[i].t == m.params[i].t);
    CU_ASSERT(v.blocks[1].moe.router.s.gru == &v.gru);
    moe_model_cast_view_free(&v, &m);
    CU_ASSERT_EQUAL_FATAL(moe_model_cast_view(&m, MOE_F64, &v), MOE_OK);
    for (int i = 0; i < m.n_params; i++) {
        CU_ASSERT(v.params[i].t != m.params[i].t);
        CU_ASSERT_EQUAL(v.params[i].t->dtype, MOE_F64);
        CU_ASSERT_EQUAL(m.params[i].t->dtype, MOE_F32);
    }
    CU_ASSERT(v.blocks[0].wqkv != m.blocks[0].wqkv && v.blocks[0].wqkv->dtype == MOE_F64);
    CU_ASSERT(v.blocks[1].moe.w13 == v.blocks[1].moe.groups[0].w13 && v.blocks[1].moe.w13->dtype == MOE_F64);
    CU_ASSERT(m.blocks[1].moe.groups[0].w13->dtype == MOE_F32);
    CU_ASSERT(v.gru.w[0]->dtype == MOE_F64 && v.blocks[2].moe.router.head->dtype == MOE_F64);
    moe_model_cast_view_free(&v, &m);
    moe_model_free(&m);
    moe_step_reset();
}

/* Every parameter's gradient of one loss (host f64, concatenated). */
static double *loss_grads(moe_model *m, int64_t *n) {
    int32_t in[2 * 8], tg[2 * 8];
    fill_tokens(in, 16, 6);
    fill_tokens(tg, 16, 7);
    moe_loss_parts parts;
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_model_loss(m, in, tg, 2, 8, &parts), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_backward(parts.loss), MOE_OK);
    *n = 0;
    for (int i = 0; i < m->n_params; i++) *n += moe_tensor_numel(m->params[i].t);
    double *g = calloc((size_t)*n, sizeof *g);
    int64_t at = 0;
    for (int i = 0; i < m->n_params; i++) {
        moe_tensor *p = m->params[i].t;
        if (p->grad) CU_ASSERT_EQUAL(moe_tensor_to_host_f64(p->grad, g + at), MOE_OK);
        at += moe_tensor_numel(p);
    }
    moe_step_reset();
    return g;
}

/* Training after generation: the gradients equal a fresh model's (the caches live in the
 * decode state, so no K/V copy can reach the training forward). */
static void check_train_after_generate(moe_cfg_mixer mixer) {
    moe_config c;
    small_config(&c, mixer);
    moe_model fresh, used;
    open_model(&fresh, &c, MOE_F32);
    open_model(&used, &c, MOE_F32);
    moe_decoder *d;
    moe_decode_state *s;
    CU_ASSERT_EQUAL_FATAL(moe_decoder_open(&used, MOE_F32, &d), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_decode_state_create(d, 1, 32, &s), MOE_OK);
    int32_t tok[12];
    float lg[V];
    fill_tokens(tok, 12, 8);
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_decoder_feed(d, s, 0, tok, 8, lg), MOE_OK);
    for (int t = 8; t < 12; t++) {
        moe_step_reset();
        CU_ASSERT_EQUAL_FATAL(moe_decoder_feed(d, s, 0, tok + t, 1, lg), MOE_OK);
    }
    int64_t n1, n2;
    double *g1 = loss_grads(&fresh, &n1), *g2 = loss_grads(&used, &n2);
    CU_ASSERT_EQUAL_FATAL(n1, n2);
    double norm = 0;
    int64_t differ = 0;
    for (int64_t i = 0; i < n1; i++) {
        norm += g1[i] * g1[i];
        differ += g1[i] != g2[i];
    }
    CU_ASSERT(norm > 0);
    CU_ASSERT_EQUAL(differ, 0);
    free(g1);
    free(g2);
    moe_decode_state_free(s);
    moe_decoder_close(d);
    moe_model_free(&fresh);
    moe_model_free(&used);
}

static void test_train_after_generate(void) {
    check_train_after_generate(MOE_CFG_MIXER_ATTENTION);
    check_train_after_generate(MOE_CFG_MIXER_MOM);
}

/* Loading a model (for generation too) does not time the experts, even under latency
 * balancing: the trainer asks for that (moe_model_measure_latency). */
static void test_init_does_not_time(void) {
    moe_config c;
    small_config(&c, MOE_CFG_MIXER_ATTENTION);
    c.router.balance = MOE_CFG_BALANCE_LATENCY;
    moe_model m;
    open_model(&m, &c, MOE_F32);
    for (int e = 0; e < 4; e++) CU_ASSERT_EQUAL(m.blocks[0].moe.latency[e], 0.0);
    CU_ASSERT_PTR_NULL(m.blocks[0].moe.router.latency_alpha);
    CU_ASSERT_EQUAL_FATAL(moe_model_measure_latency(&m), MOE_OK);
    for (int e = 0; e < 4; e++) CU_ASSERT(m.blocks[0].moe.latency[e] > 0.0);
    CU_ASSERT_PTR_NOT_NULL(m.blocks[0].moe.router.latency_alpha);
    moe_model_free(&m);
    moe_step_reset();
}

/* Zeros in every parameter of the load-mode init, the same names, shapes and devices as
 * the drawn init, and the drawn weights not all zero. */
static void check_init_for_load(const moe_config *c) {
    CU_ASSERT_EQUAL_FATAL(moe_config_validate(c), MOE_OK);
    moe_model r, z;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&r, c, 0, 1), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_model_init_for_load(&z, c, 0, 1), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(z.n_params, r.n_params);
    int drawn = 0;
    for (int i = 0; i < r.n_params; i++) {
        const moe_tensor *a = r.params[i].t, *b = z.params[i].t;
        CU_ASSERT_STRING_EQUAL(z.params[i].name, r.params[i].name);
        CU_ASSERT_EQUAL(b->ndim, a->ndim);
        for (int k = 0; k < a->ndim && k < b->ndim; k++) CU_ASSERT_EQUAL(b->shape[k], a->shape[k]);
        CU_ASSERT_EQUAL(b->device, a->device);
        CU_ASSERT_EQUAL(b->dtype, a->dtype);
        CU_ASSERT_EQUAL(z.params[i].expert_stack, r.params[i].expert_stack);
        int64_t n = moe_tensor_numel(a);
        double *va = malloc(sizeof(double) * (size_t)n), *vb = malloc(sizeof(double) * (size_t)n);
        CU_ASSERT_FATAL(va && vb);
        CU_ASSERT_EQUAL_FATAL(moe_tensor_to_host_f64(a, va), MOE_OK);
        CU_ASSERT_EQUAL_FATAL(moe_tensor_to_host_f64(b, vb), MOE_OK);
        int64_t nonzero_b = 0, nonzero_a = 0;
        for (int64_t j = 0; j < n; j++) {
            nonzero_b += vb[j] != 0.0;
            nonzero_a += va[j] != 0.0;
        }
        CU_ASSERT_EQUAL(nonzero_b, 0);
        drawn += nonzero_a > 0;
        free(va);
        free(vb);
    }
    CU_ASSERT(drawn > r.n_params / 2);
    moe_model_free(&r);
    moe_model_free(&z);
    moe_step_reset();
}

static void test_init_for_load(void) {
    moe_config c;
    small_config(&c, MOE_CFG_MIXER_MOM);
    c.model.n_shared_experts = 1;
    c.model.shared_gate = true;
    check_init_for_load(&c);
    small_config(&c, MOE_CFG_MIXER_GDN);
    c.router.type = MOE_CFG_ROUTER_RMOE;
    c.model.qkv_bias = true;
    c.model.qk_norm = MOE_CFG_QK_NORM_HEAD;
    check_init_for_load(&c);
    small_config(&c, MOE_CFG_MIXER_ATTENTION);
    small_mla(&c);
    check_init_for_load(&c);
}

static void register_suites(void) {
    moe_test_add_suite("decode", (moe_test_entry[]){{"cached decode == full forward, attention", test_decode_attention},
                                                     {"cached decode == full forward, mom", test_decode_mom},
                                                     {"cached decode == full forward, gdn", test_decode_gdn},
                                                     {"cached decode == full forward, model features", test_decode_features},
                                                     {"cached decode == full forward, HF fixtures", test_decode_hf_fixtures},
                                                     {"gathered and sorted experts: decode and routes", test_decode_device_paths},
                                                     {"recordable steps == op by op", test_recorded_steps},
                                                     {"packed batch == sequences alone, attention", test_packed_attention},
                                                     {"packed batch == sequences alone, mom", test_packed_mom},
                                                     {"paged KV blocks freed and reused", test_paged_reuse},
                                                     {"batch checks", test_batch_checks},
                                                     {"moe_model_logits", test_model_logits},
                                                     {"inference step memory of one sublayer", test_infer_step_memory},
                                                     {NULL, NULL}});
    moe_test_add_suite("seams", (moe_test_entry[]){{"router selection alone", test_router_select},
                                                    {"recording: no host data in or out", test_recording_rule},
                                                    {"weights cast once", test_cast_view},
                                                    {"model init does not time the experts", test_init_does_not_time},
                                                    {"init for load: zeros, same parameters", test_init_for_load},
                                                    {"train after generate: gradients equal a fresh model's",
                                                     test_train_after_generate},
                                                    {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
