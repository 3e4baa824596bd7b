/* The routing-path predictor end to end: a tiny model of ours (8 experts, top-2) trained a
 * few dozen steps on repetitive text, its routes traced, a predictor trained on the trace
 * whose held-out recall beats chance and matches the token-identity baseline; prediction
 * through the file equals the training net; a predictor of another model and bad trace
 * files are refused by name; token scheduling is a permutation that needs fewer experts
 * on clustered paths. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/memory.h"
#include "moe/infer/decoder.h"
#include "moe/model/model.h"
#include "moe/model/tokenizer.h"
#include "moe/offload/predictor.h"
#include "moe/offload/schedule.h"
#include "moe/offload/trace.h"
#include "moe/train/checkpoint.h"
#include "moe/train/data.h"
#include "moe/train/predictor_train.h"
#include "moe/train/train.h"
#include "tests/harness/testlib.h"

static char dir[200], text_path[300], ckpt[700];
static moe_config cfg;

static void write_text(const char *path, int lines, int variants) {
    FILE *f = fopen(path, "w");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    for (int i = 0; i < lines; i++)
        fprintf(f, "the quick brown fox %d jumps over the lazy dog. a stitch in time saves %d.\n", i % variants,
                (i * 7) % variants);
    fclose(f);
}

/* Trains the tiny model once (40 steps) into dir/run/ckpt-*.h5. */
static void tiny_model(void) {
    if (ckpt[0]) return;
    snprintf(dir, sizeof dir, "%s", moe_test_tmpdir("predictor"));
    snprintf(text_path, sizeof text_path, "%s/text.txt", dir);
    write_text(text_path, 300, 13);
    moe_tokenizer *tok = moe_tokenizer_byte();
    const char *inputs[1] = {text_path};
    moe_data_summary sum;
    CU_ASSERT_EQUAL_FATAL(moe_data_prepare(inputs, 1, tok, 0.1, dir, &sum), MOE_OK);
    moe_tokenizer_free(tok);
    moe_config_defaults(&cfg);
    cfg.model.d_model = 32, cfg.model.n_layers = 2, cfg.model.n_heads = 2, cfg.model.seq_len = 32;
    cfg.model.ffn_dim = 16, cfg.model.n_experts = 8, cfg.model.top_k = 2;
    cfg.data.batch_size = 8;
    cfg.train.steps = 40, cfg.train.warmup = 4, cfg.train.lr = 3e-3, cfg.train.eval_every = 0, cfg.train.eval_batches = 1;
    cfg.checkpoint.every = 0, cfg.checkpoint.keep = 0;
    snprintf(cfg.data.train_path, sizeof cfg.data.train_path, "%s/train.bin", dir);
    snprintf(cfg.data.val_path, sizeof cfg.data.val_path, "%s/val.bin", dir);
    snprintf(cfg.checkpoint.dir, sizeof cfg.checkpoint.dir, "%s/run", dir);
    CU_ASSERT_EQUAL_FATAL(moe_config_validate(&cfg), MOE_OK);
    moe_train_options opt = {.quiet = true};
    moe_train_summary ts;
    moe_status s = moe_train_run(&cfg, &opt, &ts);
    if (s != MOE_OK) printf("\n  training the tiny model: %s\n", moe_last_error());
    CU_ASSERT_EQUAL_FATAL(s, MOE_OK);
    snprintf(ckpt, sizeof ckpt, "%s", ts.last_checkpoint);
}

static void load_model(moe_model *m) {
    tiny_model();
    CU_ASSERT_EQUAL_FATAL(moe_model_init(m, &cfg, 0, 1), MOE_OK);
    moe_train_state ts;
    CU_ASSERT_EQUAL_FATAL(moe_checkpoint_load(ckpt, m, NULL, &ts), MOE_OK);
}

/* The routes of the model over `lines` lines of the text, saved to dir/name. */
static void trace_text(moe_model *m, int lines, int variants, const char *name, moe_trace *t) {
    char path[600];
    snprintf(path, sizeof path, "%s/%s.txt", dir, name);
    write_text(path, lines, variants);
    moe_tokenizer *tok = moe_tokenizer_byte();
    moe_token_buf buf = {0};
    FILE *f = fopen(path, "rb");
    static char text[1 << 20];
    size_t n = fread(text, 1, sizeof text, f);
    fclose(f);
    CU_ASSERT_EQUAL_FATAL(moe_tokenizer_encode(tok, text, n, &buf), MOE_OK);
    moe_decoder *d = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_decoder_open(m, m->compute, &d), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_trace_record(d, ckpt, buf.data, (int64_t)buf.len, 32, 16, t), MOE_OK);
    moe_decoder_close(d);
    moe_token_buf_free(&buf);
    moe_tokenizer_free(tok);
    snprintf(path, sizeof path, "%s/%s.h5", dir, name);
    CU_ASSERT_EQUAL_FATAL(moe_trace_save(t, path), MOE_OK);
}

static void test_trace_file(void) {
    moe_model m;
    load_model(&m);
    moe_trace t, back;
    trace_text(&m, 40, 13, "small", &t);
    moe_route_fingerprint fp;
    CU_ASSERT_EQUAL(moe_route_fingerprint_of(&m, &fp), MOE_OK);
    CU_ASSERT_EQUAL(memcmp(&fp, &t.fp, sizeof fp), 0);
    CU_ASSERT_EQUAL(t.fp.n_moe_layers, 2);
    CU_ASSERT_EQUAL(t.n % 32, 0);
    char path[600];
    snprintf(path, sizeof path, "%s/small.h5", dir);
    CU_ASSERT_EQUAL_FATAL(moe_trace_load(path, &back), MOE_OK);
    CU_ASSERT_EQUAL(back.n, t.n);
    CU_ASSERT_EQUAL(memcmp(back.ids, t.ids, sizeof(int32_t) * (size_t)(t.n * 2 * 2)), 0);
    CU_ASSERT_EQUAL(memcmp(back.tokens, t.tokens, sizeof(int32_t) * (size_t)t.n), 0);
    CU_ASSERT_STRING_EQUAL(back.model_name, ckpt);
    /* the routes are the decoder's: one sequence alone gives the same ids as in the batch */
    int32_t *route = malloc(sizeof(int32_t) * 2 * 32 * 2);
    float *logits = malloc(sizeof(float) * 32 * (size_t)cfg.model.vocab_size);
    CU_ASSERT_EQUAL(moe_model_logits(&m, t.tokens + 32, 1, 32, 0, logits, route), MOE_OK);
    for (int l = 0; l < 2; l++)
        CU_ASSERT_EQUAL(memcmp(route + l * 64, t.ids + ((int64_t)l * t.n + 32) * 2, sizeof(int32_t) * 64), 0);
    moe_step_reset();
    free(route);
    free(logits);
    moe_trace_free(&t);
    moe_trace_free(&back);
    moe_model_free(&m);
}

static void expect_refusal(moe_status s, moe_status code, const char *must_name) {
    CU_ASSERT_EQUAL(s, code);
    if (!strstr(moe_last_error(), must_name)) printf("\n  message '%s' lacks '%s'\n", moe_last_error(), must_name);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), must_name));
}

static void test_bad_trace_files(void) {
    tiny_model();
    moe_trace t;
    char path[600];
    snprintf(path, sizeof path, "%s/missing.h5", dir);
    expect_refusal(moe_trace_load(path, &t), MOE_ERR_IO, path);
    snprintf(path, sizeof path, "%s/garbage.h5", dir);
    FILE *f = fopen(path, "wb");
    for (int i = 0; i < 4096; i++) fputc((i * 131) & 0xff, f);
    fclose(f);
    expect_refusal(moe_trace_load(path, &t), MOE_ERR_FORMAT, path);
    CU_ASSERT_PTR_NULL(strstr(moe_last_error(), "checkpoint")); /* a trace, not a checkpoint, is damaged */
    /* a checkpoint is an HDF5 file of ours but not a trace */
    expect_refusal(moe_trace_load(ckpt, &t), MOE_ERR_FORMAT, ckpt);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "not a routing trace"));
    /* a trace whose bytes were damaged after writing */
    moe_model m;
    load_model(&m);
    trace_text(&m, 20, 13, "damaged", &t);
    moe_model_free(&m);
    /* intact files (every CRC right) whose contents a reader would index out of range */
    struct { const char *name, *why; int32_t *at, value; } bad[] = {
        {"bad-expert", "route_ids holds expert 8 of 8", &t.ids[5], 8},
        {"bad-token", "out of range or order", &t.tokens[3], 256},
        {"bad-position", "out of range or order", &t.pos[40], 7},
        {"bad-layer", "moe_layers names layer 5", &t.moe_layers[1], 5},
    };
    for (int i = 0; i < 4; i++) {
        int32_t keep = *bad[i].at;
        *bad[i].at = bad[i].value;
        moe_trace back;
        snprintf(path, sizeof path, "%s/%s.h5", dir, bad[i].name);
        CU_ASSERT_EQUAL(moe_trace_save(&t, path), MOE_OK);
        expect_refusal(moe_trace_load(path, &back), MOE_ERR_FORMAT, path);
        expect_refusal(MOE_ERR_FORMAT, MOE_ERR_FORMAT, bad[i].why);
        *bad[i].at = keep;
    }
    moe_trace_free(&t);
    snprintf(path, sizeof path, "%s/damaged.h5", dir);
    f = fopen(path, "r+b");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, size / 2, SEEK_SET);
    for (int i = 0; i < 64; i++) fputc(0x5a, f);
    fclose(f);
    expect_refusal(moe_trace_load(path, &t), MOE_ERR_FORMAT, path);
}

static void test_predictor(void) {
    moe_model m;
    load_model(&m);
    moe_trace t;
    trace_text(&m, 300, 13, "train", &t);
    moe_predictor_train_options o = moe_predictor_train_defaults();
    o.steps = 400, o.batch = 128, o.log = NULL;
    moe_route_net net;
    moe_predictor_report rep;
    CU_ASSERT_EQUAL_FATAL(moe_predictor_train(&t, &o, &net, &rep), MOE_OK);
    printf("\n  held-out recall %.3f (layers %.3f %.3f), token identity %.3f, chance %.3f, loss %.3f, %lld params\n",
           rep.mean_recall, rep.recall[0], rep.recall[1], rep.mean_token_recall, rep.chance, rep.final_loss,
           (long long)moe_route_net_param_count(&net));
    CU_ASSERT(rep.mean_recall > rep.chance + 0.3);
    CU_ASSERT(rep.mean_recall >= rep.mean_token_recall - 0.01);
    for (int l = 0; l < 2; l++) CU_ASSERT(rep.recall[l] > rep.chance + 0.2);

    /* through the file: the model's own predictor loads and predicts what the net scores */
    char path[600];
    snprintf(path, sizeof path, "%s/predictor.h5", dir);
    CU_ASSERT_EQUAL_FATAL(moe_route_net_save(&net, path, t.model_name, &t.fp), MOE_OK);
    moe_predictor *p = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_predictor_load(path, &m, &p), MOE_OK);
    int64_t first = t.n - 32; /* the last sequence, whole */
    float *a = malloc(sizeof(float) * 2 * 40 * 8), *b = malloc(sizeof(float) * 2 * 40 * 8);
    int32_t all[32];
    for (int i = 0; i < 32; i++) all[i] = i;
    CU_ASSERT_EQUAL(moe_predictor_predict(p, t.tokens + first, t.pos + first, NULL, 32, all, 32, a), MOE_OK);
    CU_ASSERT_EQUAL(moe_route_net_score_trace(&net, &t, first, 32, b), MOE_OK);
    double diff = 0;
    for (int i = 0; i < 2 * 32 * 8; i++) diff = fmax(diff, fabs(a[i] - b[i]));
    CU_ASSERT(diff < 1e-5);
    /* a list over two sequences (its seq numbers from the trace), two rows scored: the
     * previous sequence's last token and this one's; the other tokens are context only */
    CU_ASSERT_EQUAL_FATAL(t.seq[first - 1] != t.seq[first], true);
    CU_ASSERT_EQUAL(moe_predictor_predict(p, t.tokens + first - 8, t.pos + first - 8, t.seq + first - 8, 40,
                                          (const int32_t[]){7, 39}, 2, a), MOE_OK);
    CU_ASSERT_EQUAL(moe_route_net_score_trace(&net, &t, first - 8, 40, b), MOE_OK);
    diff = 0;
    for (int l = 0; l < 2; l++)
        for (int e = 0; e < 8; e++) {
            diff = fmax(diff, fabs(a[(l * 2 + 0) * 8 + e] - b[(l * 40 + 7) * 8 + e]));
            diff = fmax(diff, fabs(a[(l * 2 + 1) * 8 + e] - b[(l * 40 + 39) * 8 + e]));
        }
    CU_ASSERT(diff < 1e-5);
    moe_mem_stats before = moe_mem_get_stats(MOE_CPU);
    const int threads = omp_get_max_threads();
    omp_set_num_threads(3); /* the predictor runs on one thread and gives the caller its count back */
    CU_ASSERT_EQUAL(moe_predictor_predict(p, t.tokens + first, t.pos + first, NULL, 32, all, 32, a), MOE_OK);
    CU_ASSERT_EQUAL(omp_get_max_threads(), 3);
    omp_set_num_threads(threads);
    CU_ASSERT_EQUAL(moe_mem_get_stats(MOE_CPU).step_bytes, before.step_bytes); /* step memory given back */
    int32_t bad = 100000;
    CU_ASSERT_EQUAL(moe_predictor_predict(p, &bad, t.pos, NULL, 1, all, 1, a), MOE_ERR_INVALID);
    moe_predictor_free(p);
    free(a);
    free(b);

    /* another model of the same shape (other weights) is refused, by name */
    moe_model other;
    moe_config oc = cfg;
    oc.train.seed = cfg.train.seed + 1;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&other, &oc, 0, 1), MOE_OK);
    p = (moe_predictor *)1;
    expect_refusal(moe_predictor_load(path, &other, &p), MOE_ERR_INVALID, path);
    CU_ASSERT_PTR_NULL(p);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), ckpt));
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "router weights"));
    moe_model_free(&other);
    /* ... and so is one of another shape */
    oc.model.n_experts = 4;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&other, &oc, 0, 1), MOE_OK);
    expect_refusal(moe_predictor_load(path, &other, &p), MOE_ERR_INVALID, "experts 8");
    moe_model_free(&other);

    moe_predictor_report_free(&rep);
    moe_route_net_free(&net);
    moe_trace_free(&t);
    moe_model_free(&m);
}

/* 4 clusters of 8 paths over 4 layers x 16 experts (top-2): each path its cluster's
 * experts, one of them swapped at random in one layer; shuffled. */
static void clustered_paths(uint64_t *paths, int n, int *cluster_of) {
    enum { L = 4, E = 16, K = 2 };
    int32_t ids[L * 32 * K];
    int64_t rows[32];
    uint64_t r = 12345;
    for (int i = 0; i < n; i++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        int c = cluster_of[i];
        for (int l = 0; l < L; l++)
            for (int j = 0; j < K; j++) ids[(l * n + i) * K + j] = (c * 4 + j * 2 + l) % E;
        int l = (int)((r >> 33) % L);
        int swapped = (int)((r >> 40) % E);
        if (swapped != ids[(l * n + i) * K]) ids[(l * n + i) * K + 1] = swapped;
        rows[i] = i;
    }
    moe_paths_from_routes(ids, L, n, E, K, rows, n, paths);
}

static void test_schedule(void) {
    enum { N = 32, M = 8 };
    int cluster_of[N];
    for (int i = 0; i < N; i++) cluster_of[i] = (i * 11) % 4; /* interleaved: natural order mixes clusters */
    int words = moe_path_words(4, 16);
    CU_ASSERT_EQUAL(words, 1);
    uint64_t paths[N];
    clustered_paths(paths, N, cluster_of);
    int32_t order[N];
    CU_ASSERT_EQUAL_FATAL(moe_schedule_group(paths, N, words, M, order), MOE_OK);
    int seen[N] = {0};
    for (int i = 0; i < N; i++) {
        CU_ASSERT_FATAL(order[i] >= 0 && order[i] < N);
        seen[order[i]]++;
    }
    for (int i = 0; i < N; i++) CU_ASSERT_EQUAL(seen[i], 1);
    int64_t plain = moe_schedule_distinct(paths, NULL, N, words, M);
    int64_t grouped = moe_schedule_distinct(paths, order, N, words, M);
    /* each micro-batch of the grouping is one cluster */
    int same = 0;
    for (int b = 0; b < N; b += M)
        for (int j = b; j < b + M; j++) same += cluster_of[order[j]] == cluster_of[order[b]];
    printf("\n  distinct experts over 4 micro-batches: %lld in arrival order, %lld grouped\n", (long long)plain,
           (long long)grouped);
    CU_ASSERT_EQUAL(same, N);
    CU_ASSERT(grouped * 3 < plain * 2);
    /* the last micro-batch may be short; micro-batch 1 is the identity */
    int32_t order5[N];
    CU_ASSERT_EQUAL(moe_schedule_group(paths, N, words, 5, order5), MOE_OK);
    CU_ASSERT(moe_schedule_distinct(paths, order5, N, words, 5) <= moe_schedule_distinct(paths, NULL, N, words, 5));
    CU_ASSERT_EQUAL(moe_schedule_group(paths, N, words, 1, order5), MOE_OK);
    for (int i = 0; i < N; i++) CU_ASSERT_EQUAL(order5[i], i);
    /* paths from scores: the top-k of each layer */
    float scores[2 * 1 * 4] = {0.1f, 0.9f, 0.5f, 0.2f, 3, 2, 1, 0};
    int64_t row0 = 0;
    uint64_t p;
    moe_paths_from_scores(scores, 2, 1, 4, 2, &row0, 1, &p);
    CU_ASSERT_EQUAL(p, (1u << 1) | (1u << 2) | (1u << 4) | (1u << 5));
}

static void register_suites(void) {
    static const moe_test_entry tests[] = {
        {"schedule", test_schedule},
        {"trace_file", test_trace_file},
        {"bad_trace_files", test_bad_trace_files},
        {"predictor", test_predictor},
        {NULL, NULL},
    };
    moe_test_add_suite("predictor", tests);
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
