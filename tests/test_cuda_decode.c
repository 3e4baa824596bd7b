/* The decoder on CUDA: the same model (weights drawn on the host from the same seed)
 * decoded with paged KV blocks and recurrent states on the GPU gives the CPU decoder's
 * logits in f32, and in bf16 (weights cast once) comes no further from them than the bf16
 * training forward; a packed prefill of three sequences, then one-token steps of all three.
 * A decode step on the gathered experts gives the grouped path's routes and logits. Decode
 * steps replayed from recorded graphs give the op-by-op steps' logits. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "core/ops.h"
#include "moe/infer/decoder.h"
#include "moe/model/model.h"
#include "tests/harness/testlib.h"

enum { V = 48, N_TOK = 22 };

static void config(moe_config *c, bool mla, moe_device dev) {
    moe_config_defaults(c);
    c->model.vocab_size = V;
    c->model.d_model = 32;
    c->model.n_layers = 3;
    c->model.n_heads = 4;
    c->model.seq_len = 64;
    c->model.ffn_dim = 16;
    c->model.n_experts = 4;
    c->model.top_k = 2;
    c->model.init_std = 0.2;
    c->model.mom_heads = 2;
    c->model.mixer = (moe_yaml_list){.count = 3, .values = {MOE_CFG_MIXER_ATTENTION, MOE_CFG_MIXER_GDN,
                                                            MOE_CFG_MIXER_ATTENTION}};
    if (mla) {
        c->model.attention = MOE_CFG_ATTENTION_MLA;
        c->model.kv_lora_rank = 8;
        c->model.q_lora_rank = 12;
        c->model.qk_nope_dim = 6;
        c->model.qk_rope_dim = 4;
        c->model.v_head_dim = 12;
    }
    c->train.device = dev == MOE_CUDA ? MOE_CFG_DEVICE_CUDA : MOE_CFG_DEVICE_CPU;
}

static const int lens[3] = {7, 3, 12};

/* Token t of sequence q: its prompt, then the tokens of the four steps. */
static int32_t token(int q, int t) {
    int at = q == 0 ? 0 : q == 1 ? lens[0] : lens[0] + lens[1];
    return t < lens[q] ? (int32_t)(((at + t) * 11 + 5) % V) : (int32_t)(((t - lens[q] + 1) * 7 + q * 3) % V);
}

/* The packed prefill of the three sequences (7, 3, 12 tokens), their last rows' logits
 * into out [3, V]. */
static void prefill_three(moe_decoder *d, moe_decode_state *s, float *out) {
    int32_t tok[N_TOK], pos[N_TOK], seq[N_TOK];
    int at = 0;
    for (int q = 0; q < 3; q++)
        for (int t = 0; t < lens[q]; t++, at++) tok[at] = token(q, t), pos[at] = t, seq[at] = q;
    moe_batch b = {.n_tokens = N_TOK, .tokens = tok, .pos = pos, .seq = seq, .logits = MOE_LOGITS_LAST};
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_decoder_forward(d, s, &b, out, NULL), MOE_OK);
}

/* Three sequences: a packed prefill (LAST rows) then four one-token steps of all three;
 * the logits of every call into out [(1 + 4) * 3, V]. */
static void run(moe_model *m, moe_dtype dt, float *out) {
    moe_decoder *d;
    moe_decode_state *s;
    CU_ASSERT_EQUAL_FATAL(moe_decoder_open(m, dt, &d), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_decode_state_create(d, 3, 96, &s), MOE_OK);
    prefill_three(d, s, out);
    for (int step = 1; step <= 4; step++) {
        int32_t t3[3], p3[3], s3[3] = {0, 1, 2};
        for (int q = 0; q < 3; q++) t3[q] = token(q, lens[q] + step - 1), p3[q] = lens[q] + step - 1;
        moe_batch bs = {.n_tokens = 3, .tokens = t3, .pos = p3, .seq = s3, .logits = MOE_LOGITS_LAST};
        moe_step_reset();
        CU_ASSERT_EQUAL_FATAL(moe_decoder_forward(d, s, &bs, out + (int64_t)step * 3 * V, NULL), MOE_OK);
    }
    moe_decode_state_free(s);
    moe_decoder_close(d);
    moe_step_reset();
}

/* The same rows from the training forward of each whole sequence, in m->compute. */
static void run_full(moe_model *m, float *out) {
    bool was = moe_grad_set_enabled(false);
    for (int q = 0; q < 3; q++) {
        int T = lens[q] + 4;
        int32_t tok[16];
        for (int t = 0; t < T; t++) tok[t] = token(q, t);
        moe_step_reset();
        moe_tensor *ids = moe_tensor_from_host(MOE_LIFE_STEP, m->dev, MOE_I32, 2, (int64_t[]){1, T}, tok);
        moe_forward f = {.mode = MOE_FORWARD_TRAIN, .B = 1, .T = T};
        moe_tensor *lg = moe_cast(moe_matmul(moe_model_forward(m, ids, &f), moe_transpose(moe_model_head(m), 0, 1)),
                                  MOE_F32);
        moe_tensor *h = lg ? moe_tensor_to(lg, MOE_CPU, MOE_LIFE_STEP) : NULL;
        CU_ASSERT_PTR_NOT_NULL_FATAL(h);
        for (int step = 0; step <= 4; step++) /* after the prompt, then after each step */
            memcpy(out + ((int64_t)step * 3 + q) * V, (float *)h->data + (int64_t)(lens[q] - 1 + step) * V,
                   sizeof(float) * V);
    }
    moe_grad_set_enabled(was);
    moe_step_reset();
}

static double rel_err(const float *a, const float *b, int64_t n) {
    double d = 0, s = 0;
    for (int64_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        s = fmax(s, fabs((double)b[i]));
    }
    return d / s;
}

static void check(bool mla) {
    moe_config cc, gc;
    config(&cc, mla, MOE_CPU);
    config(&gc, mla, MOE_CUDA);
    CU_ASSERT_EQUAL_FATAL(moe_config_validate(&cc), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_config_validate(&gc), MOE_OK);
    moe_model cpu, gpu;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&cpu, &cc, 0, 1), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&gpu, &gc, 0, 1), MOE_OK);
    float ref[15 * V], f32[15 * V], bf16[15 * V], full16[15 * V];
    run(&cpu, MOE_F32, ref);
    run(&gpu, MOE_F32, f32);
    run(&gpu, MOE_BF16, bf16);
    gpu.compute = MOE_BF16;
    run_full(&gpu, full16);
    /* bf16 differs from f32 by its rounding (and the routing flips it causes): decoding in
     * bf16 must be no further from the CPU's f32 than the training forward in bf16 is */
    double e32 = rel_err(f32, ref, 15 * V), e16 = rel_err(bf16, ref, 15 * V), t16 = rel_err(full16, ref, 15 * V);
    fprintf(stderr, "  %s: CUDA decode vs the CPU's, f32 %.3g; bf16 %.3g (the bf16 training forward: %.3g)\n",
            mla ? "mla" : "mha + gdn", e32, e16, t16);
    CU_ASSERT(e32 < 1e-3);
    CU_ASSERT(e16 < 2 * t16 + 1e-2);
    moe_model_free(&cpu);
    moe_model_free(&gpu);
}

/* The three sequences' prefill and one decode step after it, on CUDA in f32, the experts
 * run by `path`: the prefill's last rows' logits [3, V], the step's logits [3, V] and its
 * routes [n_layers, 3, top_k]. */
static void step_routes(moe_model *m, moe_expert_path path, float *prefill, float *logits, int32_t *routes) {
    moe_decoder *d;
    moe_decode_state *s;
    CU_ASSERT_EQUAL_FATAL(moe_decoder_open(m, MOE_F32, &d), MOE_OK);
    moe_decoder_set_expert_path(d, path);
    CU_ASSERT_EQUAL_FATAL(moe_decode_state_create(d, 3, 96, &s), MOE_OK);
    prefill_three(d, s, prefill);
    int32_t t3[3], p3[3], s3[3] = {0, 1, 2};
    for (int q = 0; q < 3; q++) t3[q] = token(q, lens[q]), p3[q] = lens[q];
    moe_batch bs = {.n_tokens = 3, .tokens = t3, .pos = p3, .seq = s3, .logits = MOE_LOGITS_LAST};
    moe_decode_info info = {.route_ids = routes};
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_decoder_forward(d, s, &bs, logits, &info), MOE_OK);
    moe_decode_state_free(s);
    moe_decoder_close(d);
    moe_step_reset();
}

/* The prefill (44 rows: auto sorts the routing on the device) and a decode step (auto
 * gathers; sorted forced) give the grouped path's logits within f32 rounding, and the
 * step's routes come back through the route sink equal to the grouped path's. */
static void test_device_paths(void) {
    moe_config c;
    config(&c, false, MOE_CUDA);
    CU_ASSERT_EQUAL_FATAL(moe_config_validate(&c), MOE_OK);
    moe_model m;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 0, 1), MOE_OK);
    enum { R = 3 * 3 * 2 }; /* layers x tokens x top-k */
    float pre_ref[3 * V], lg_ref[3 * V], pre[3 * V], lg[3 * V];
    int32_t r_ref[R], r[R];
    for (int i = 0; i < R; i++) r_ref[i] = -7;
    step_routes(&m, MOE_EXPERT_PATH_GROUPED, pre_ref, lg_ref, r_ref);
    const moe_expert_path paths[2] = {MOE_EXPERT_PATH_AUTO, MOE_EXPERT_PATH_SORTED};
    for (int p = 0; p < 2; p++) {
        for (int i = 0; i < R; i++) r[i] = -7;
        step_routes(&m, paths[p], pre, lg, r);
        double ep = rel_err(pre, pre_ref, 3 * V), es = rel_err(lg, lg_ref, 3 * V);
        fprintf(stderr, "  %s vs grouped on CUDA, f32: prefill logits %.3g, decode step %.3g\n",
                p == 0 ? "auto (sorted prefill, gathered step)" : "sorted", ep, es);
        CU_ASSERT(ep < 1e-5);
        CU_ASSERT(es < 1e-5);
        CU_ASSERT_EQUAL(memcmp(r, r_ref, sizeof r), 0);
    }
    CU_ASSERT(r_ref[0] >= 0 && r_ref[0] < c.model.n_experts);
    moe_model_free(&m);
}

/* Prefill lens {7, 3, 250}, then `steps` one-token steps (the second sequence stops after
 * 4: batches of 3, then 2; the third passes 256 keys, so the recorded steps' key bound
 * changes) on a fresh state of decoder d: all the steps' logits into out. Returns the rows
 * written. */
static int decode_long(moe_decoder *d, int steps, float *out) {
    moe_decode_state *s;
    CU_ASSERT_EQUAL_FATAL(moe_decode_state_create(d, 3, 400, &s), MOE_OK);
    const int plen[3] = {7, 3, 250};
    int32_t *tok = malloc(sizeof(int32_t) * 260), pos[260], seq[260];
    int n = 0, rows = 0;
    for (int q = 0; q < 3; q++)
        for (int t = 0; t < plen[q]; t++, n++) tok[n] = (int32_t)((n * 11 + 5) % V), pos[n] = t, seq[n] = q;
    moe_batch b = {.n_tokens = n, .tokens = tok, .pos = pos, .seq = seq, .logits = MOE_LOGITS_LAST};
    float last[3 * V];
    moe_step_reset();
    CU_ASSERT_EQUAL_FATAL(moe_decoder_forward(d, s, &b, last, NULL), MOE_OK);
    for (int step = 0; step < steps; step++) {
        int32_t t3[3], p3[3], s3[3];
        n = 0;
        for (int q = 0; q < 3; q++) {
            if (q == 1 && step >= 4) continue;
            t3[n] = (int32_t)((step * 7 + q * 3 + 1) % V), p3[n] = (int32_t)moe_decode_state_seq_len(s, q), s3[n++] = q;
        }
        b = (moe_batch){.n_tokens = n, .tokens = t3, .pos = p3, .seq = s3, .logits = MOE_LOGITS_LAST};
        moe_step_reset();
        CU_ASSERT_EQUAL_FATAL(moe_decoder_forward(d, s, &b, last, NULL), MOE_OK);
        memcpy(out + (int64_t)rows * V, last, sizeof(float) * (size_t)(n * V));
        rows += n;
    }
    free(tok);
    moe_decode_state_free(s);
    moe_step_reset();
    return rows;
}

/* Decode steps replayed from recorded graphs give the op-by-op steps' logits (f32: within
 * the attention splits' summation order; bf16: within a few bf16 roundings), MHA and MLA,
 * batches of 3 and 2, across a change of key bound. */
static void test_recorded_steps(void) {
    for (int mla = 0; mla < 2; mla++)
        for (int bf = 0; bf < 2; bf++) {
            moe_config c;
            config(&c, mla, MOE_CUDA);
            c.model.seq_len = 512;
            c.model.mixer = (moe_yaml_list){.count = 1, .values = {MOE_CFG_MIXER_ATTENTION}};
            CU_ASSERT_EQUAL_FATAL(moe_config_validate(&c), MOE_OK);
            moe_model m;
            CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 0, 1), MOE_OK);
            moe_dtype dt = bf ? MOE_BF16 : MOE_F32;
            moe_decoder *rec, *ops;
            CU_ASSERT_EQUAL_FATAL(moe_decoder_open(&m, dt, &rec), MOE_OK);
            CU_ASSERT_EQUAL_FATAL(moe_decoder_open(&m, dt, &ops), MOE_OK);
            moe_decoder_set_graphs(ops, false);
            enum { STEPS = 12, ROWS = 4 * 3 + 8 * 2 };
            float *a = malloc(sizeof(float) * ROWS * V), *b = malloc(sizeof(float) * ROWS * V);
            CU_ASSERT_EQUAL(decode_long(rec, STEPS, a), ROWS);
            CU_ASSERT_EQUAL(decode_long(ops, STEPS, b), ROWS);
            const char *off = moe_decoder_graphs_off(rec);
            if (off) fprintf(stderr, "  recording off: %s\n", off);
            CU_ASSERT_PTR_NULL(off);
            double e = rel_err(a, b, ROWS * V);
            fprintf(stderr, "  %s %s: recorded vs op-by-op decode steps %.3g\n", mla ? "mla" : "mha", bf ? "bf16" : "f32",
                    e);
            CU_ASSERT(e < (bf ? 3e-2 : 1e-5));
            free(a);
            free(b);
            moe_decoder_close(rec);
            moe_decoder_close(ops);
            moe_model_free(&m);
        }
}

static void test_mha_gdn(void) { check(false); }
static void test_mla(void) { check(true); }

static void register_suites(void) {
    moe_test_add_suite("cuda_decode", (moe_test_entry[]){{"decode on CUDA == CPU, mha + gdn", test_mha_gdn},
                                                          {"decode on CUDA == CPU, mla", test_mla},
                                                          {"gathered and sorted experts: logits, routes == grouped",
                                                           test_device_paths},
                                                          {"recorded decode steps == op by op", test_recorded_steps},
                                                          {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
