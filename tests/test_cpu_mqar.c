/* The multi-query associative recall task (moe/train/mqar.h): the generator's files are
 * well formed (pairs, queries, loss mask) and deterministic, the loader scores only the
 * query targets, recall counting gives 1 for an oracle and about chance for a constant
 * guess, and a tiny attention model learns to recall (well above the 1/P a model reaches
 * by knowing only which values are in the context). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/memory.h"
#include "core/ops.h"
#include "moe/model/config.h"
#include "moe/model/tokenizer.h"
#include "moe/train/data.h"
#include "moe/train/mqar.h"
#include "moe/train/train.h"
#include "tests/harness/testlib.h"
#include "tests/harness/files.h"

enum { T = 32, P = 4, V = 64, R = T + 1 };

/* dir/train.bin and dir/val.bin of the spec above. */
static void make_task(const char *dir, uint64_t seed, uint64_t n_train, uint64_t n_val) {
    moe_mqar *g = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_mqar_create(&(moe_mqar_spec){.seq_len = T, .pairs = P, .vocab = V, .seed = seed}, &g),
                          MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_mqar_write(g, dir, n_train, n_val), MOE_OK);
    moe_mqar_free(g);
}

static void path_in(char *out, size_t n, const char *dir, const char *name) { snprintf(out, n, "%s/%s", dir, name); }

/* One record (T + 1 tokens) against the layout: P distinct keys of [1, V/2) then their
 * values of [V/2, V), every key queried once after the context with its value right
 * after, and the targets the loader scores (tg[t] != -1, t = 0..T-1) exactly at those
 * values. */
static void check_record(const int32_t *x, const int32_t *tg) {
    int queried[P] = {0}, scored = 0;
    for (int i = 0; i < P; i++) {
        CU_ASSERT(x[2 * i] >= 1 && x[2 * i] < V / 2);
        CU_ASSERT(x[2 * i + 1] >= V / 2 && x[2 * i + 1] < V);
        for (int j = 0; j < i; j++) {
            CU_ASSERT(x[2 * j] != x[2 * i]);
            CU_ASSERT(x[2 * j + 1] != x[2 * i + 1]);
        }
    }
    for (int t = 0; t < T; t++) {
        if (tg[t] < 0) continue;
        scored++;
        CU_ASSERT(tg[t] == x[t + 1]);
        CU_ASSERT(t >= 2 * P && (t - 2 * P) % 2 == 0); /* the query key sits at 2P + 2g */
        int key = -1;
        for (int i = 0; i < P; i++)
            if (x[2 * i] == x[t]) key = i;
        CU_ASSERT_FATAL(key >= 0);
        CU_ASSERT_EQUAL(x[t + 1], x[2 * key + 1]);
        queried[key]++;
    }
    CU_ASSERT_EQUAL(scored, P);
    for (int i = 0; i < P; i++) CU_ASSERT_EQUAL(queried[i], 1);
}

static void test_files_well_formed(void) {
    const char *dir = moe_test_tmpdir("mqar-files");
    make_task(dir, 7, 300, 40);
    char path[600];
    path_in(path, sizeof path, dir, "train.bin");
    moe_token_file *tf = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_data_open(path, &tf), MOE_OK);
    CU_ASSERT_EQUAL(moe_data_vocab(tf), V);
    CU_ASSERT_EQUAL(moe_data_count(tf), 300 * R);
    CU_ASSERT_EQUAL(moe_data_record_len(tf), R);
    CU_ASSERT(moe_data_has_mask(tf));
    CU_ASSERT_DOUBLE_EQUAL(moe_data_unigram_bpb(tf), log2(V / 2), 1e-12);
    /* Every record through the evaluation iterator, and sampled ones through the loader. */
    moe_eval_iter it;
    CU_ASSERT_EQUAL_FATAL(moe_eval_iter_init(&it, tf, 10, T, 0), MOE_OK);
    CU_ASSERT_EQUAL(it.n_batches, 30);
    int32_t in[10 * T], tg[10 * T];
    int rows = 0;
    while (moe_eval_iter_next(&it, 0, 1, in, tg))
        for (int r = 0; r < 10; r++, rows++) {
            int32_t x[R]; /* record `rows` as stored: the inputs must be its first T tokens */
            moe_data_read(tf, (uint64_t)rows * R, R, x);
            CU_ASSERT(memcmp(x, in + r * T, sizeof(int32_t) * T) == 0);
            check_record(x, tg + r * T);
        }
    CU_ASSERT_EQUAL(rows, 300);
    moe_loader *l = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_loader_create(tf, 5, 10, T, &l), MOE_OK);
    for (int step = 0; step < 3; step++) {
        moe_loader_next(l, 0, 1, in, tg);
        for (int r = 0; r < 10; r++) {
            int32_t x[R];
            memcpy(x, in + r * T, sizeof(int32_t) * T);
            x[T] = tg[r * T + T - 1] >= 0 ? tg[r * T + T - 1] : 0; /* only read when scored */
            check_record(x, tg + r * T);
        }
    }
    moe_loader_free(l);
    /* Records are read whole: another sequence length is refused, naming the right one. */
    CU_ASSERT_EQUAL(moe_loader_create(tf, 5, 10, T - 1, &l), MOE_ERR_INVALID);
    CU_ASSERT(strstr(moe_last_error(), "model.seq_len=32") != NULL);
    CU_ASSERT_EQUAL(moe_eval_iter_init(&it, tf, 10, T + 1, 0), MOE_ERR_INVALID);
    moe_data_close(tf);
}

static void test_spec_checked(void) {
    moe_mqar *g = NULL;
    CU_ASSERT_EQUAL(moe_mqar_create(&(moe_mqar_spec){.seq_len = 15, .pairs = 4, .vocab = 64}, &g), MOE_ERR_INVALID);
    CU_ASSERT(strstr(moe_last_error(), "at least 4 x pairs") != NULL);
    CU_ASSERT_EQUAL(moe_mqar_create(&(moe_mqar_spec){.seq_len = 64, .pairs = 8, .vocab = 16}, &g), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NULL(g);
    CU_ASSERT_EQUAL(moe_mqar_create(&(moe_mqar_spec){.seq_len = 16, .pairs = 4, .vocab = 16}, &g), MOE_OK);
    moe_mqar_free(g);
}

static bool same_file(const char *a, const char *b) {
    size_t la, lb;
    uint8_t *pa = moe_test_read_file(a, &la), *pb = moe_test_read_file(b, &lb);
    bool same = la == lb && memcmp(pa, pb, la) == 0;
    free(pa);
    free(pb);
    return same;
}

static void test_deterministic(void) {
    char a[600], b[600], c[600], fa[700], fb[700], fc[700];
    snprintf(a, sizeof a, "%s", moe_test_tmpdir("mqar-seed-a"));
    snprintf(b, sizeof b, "%s", moe_test_tmpdir("mqar-seed-b"));
    snprintf(c, sizeof c, "%s", moe_test_tmpdir("mqar-seed-c"));
    make_task(a, 11, 50, 20);
    make_task(b, 11, 50, 20);
    make_task(c, 12, 50, 20);
    const char *names[2] = {"train.bin", "val.bin"};
    for (int i = 0; i < 2; i++) {
        path_in(fa, sizeof fa, a, names[i]);
        path_in(fb, sizeof fb, b, names[i]);
        path_in(fc, sizeof fc, c, names[i]);
        CU_ASSERT(same_file(fa, fb));
        CU_ASSERT(!same_file(fa, fc));
    }
    /* train and val draw from separate streams: the first examples differ */
    path_in(fa, sizeof fa, a, "train.bin");
    path_in(fb, sizeof fb, a, "val.bin");
    moe_token_file *ta = NULL, *tb = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_data_open(fa, &ta), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_data_open(fb, &tb), MOE_OK);
    int32_t xa[R], xb[R];
    moe_data_read(ta, 0, R, xa);
    moe_data_read(tb, 0, R, xb);
    CU_ASSERT(memcmp(xa, xb, sizeof xa) != 0);
    moe_data_close(ta);
    moe_data_close(tb);
}

/* A damaged mask is refused like damaged tokens. */
static void test_damaged_mask(void) {
    const char *dir = moe_test_tmpdir("mqar-damaged");
    make_task(dir, 3, 8, 8);
    char path[600], bad[700];
    path_in(path, sizeof path, dir, "val.bin");
    size_t len;
    uint8_t *img = moe_test_read_file(path, &len);
    path_in(bad, sizeof bad, dir, "bad.bin");
    FILE *f = fopen(bad, "wb");
    CU_ASSERT_FATAL(f && fwrite(img, 1, len - 1, f) == len - 1); /* the mask's last byte cut */
    fclose(f);
    moe_token_file *tf = NULL;
    CU_ASSERT_EQUAL(moe_data_open(bad, &tf), MOE_ERR_FORMAT);
    CU_ASSERT(strstr(moe_last_error(), "loss mask") != NULL);
    img[56] |= 2; /* an unknown flag */
    f = fopen(bad, "wb");
    CU_ASSERT_FATAL(f && fwrite(img, 1, len, f) == len);
    fclose(f);
    CU_ASSERT_EQUAL(moe_data_open(bad, &tf), MOE_ERR_FORMAT);
    CU_ASSERT(strstr(moe_last_error(), "flags") != NULL);
    free(img);
}

static uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* Files of running text are what they were before records and masks: both header fields
 * 0, nothing after the tokens, rows drawn at any position by the same hash, every target
 * the next token (none -1). */
static void test_text_files_unchanged(void) {
    const char *dir = moe_test_tmpdir("mqar-text");
    char text[600], path[600];
    path_in(text, sizeof text, dir, "text.txt");
    FILE *f = fopen(text, "w");
    CU_ASSERT_FATAL(f != NULL);
    for (int i = 0; i < 200; i++) fprintf(f, "line %d of some running text, to be cut anywhere.\n", i * 7919 % 1000);
    fclose(f);
    moe_tokenizer *tok = moe_tokenizer_byte();
    const char *inputs[1] = {text};
    CU_ASSERT_EQUAL_FATAL(moe_data_prepare(inputs, 1, tok, 0.1, dir, NULL), MOE_OK);
    moe_tokenizer_free(tok);
    path_in(path, sizeof path, dir, "train.bin");
    size_t len;
    uint8_t *img = moe_test_read_file(path, &len);
    moe_token_file *tf = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_data_open(path, &tf), MOE_OK);
    const uint64_t n = moe_data_count(tf);
    CU_ASSERT_EQUAL(len, MOE_TOKEN_FILE_HEADER_BYTES + 2 * n);
    for (int b = 28; b < 32; b++) CU_ASSERT_EQUAL(img[b], 0);
    for (int b = 56; b < 64; b++) CU_ASSERT_EQUAL(img[b], 0);
    free(img);
    CU_ASSERT_EQUAL(moe_data_record_len(tf), 0);
    CU_ASSERT(!moe_data_has_mask(tf));
    enum { B = 4, L = 16 };
    const uint64_t seed = 9;
    moe_loader *l = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_loader_create(tf, seed, B, L, &l), MOE_OK);
    int32_t in[B * L], tg[B * L], want[L + 1];
    for (uint64_t step = 0; step < 5; step++) {
        moe_loader_next(l, 0, 1, in, tg);
        for (uint64_t r = 0; r < B; r++) {
            uint64_t h = splitmix64(splitmix64(splitmix64(seed) ^ step) ^ r);
            uint64_t start = (uint64_t)(((unsigned __int128)h * (n - L)) >> 64);
            moe_data_read(tf, start, L + 1, want);
            CU_ASSERT(memcmp(in + r * L, want, sizeof(int32_t) * L) == 0);
            CU_ASSERT(memcmp(tg + r * L, want + 1, sizeof(int32_t) * L) == 0);
        }
    }
    moe_loader_free(l);
    moe_data_close(tf);
}

/* The validation targets of dir/val.bin (n examples), -1 where not scored. */
static int32_t *val_targets(const char *dir, int n) {
    char path[600];
    path_in(path, sizeof path, dir, "val.bin");
    moe_token_file *tf = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_data_open(path, &tf), MOE_OK);
    moe_eval_iter it;
    CU_ASSERT_EQUAL_FATAL(moe_eval_iter_init(&it, tf, n, T, 1), MOE_OK);
    int32_t *in = malloc(sizeof(int32_t) * (size_t)n * T), *tg = malloc(sizeof(int32_t) * (size_t)n * T);
    CU_ASSERT_FATAL(moe_eval_iter_next(&it, 0, 1, in, tg));
    free(in);
    moe_data_close(tf);
    return tg;
}

/* Hidden states one-hot at the token `pick(i)` and the identity as the output layer:
 * the argmax of row i is pick(i). */
static double recall_of(const int32_t *tg, int N, int constant) {
    float *h = calloc((size_t)N * V, sizeof *h), *w = calloc((size_t)V * V, sizeof *w);
    for (int v = 0; v < V; v++) w[v * V + v] = 1;
    for (int i = 0; i < N; i++) h[(size_t)i * V + (constant >= 0 ? constant : tg[i] >= 0 ? tg[i] : 0)] = 1;
    moe_tensor *ht = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){N, V}, h);
    moe_tensor *wt = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){V, V}, w);
    int64_t hits = 0, scored = 0;
    CU_ASSERT_EQUAL_FATAL(moe_recall_count(ht, wt, tg, &hits, &scored), MOE_OK);
    moe_step_reset();
    free(h);
    free(w);
    CU_ASSERT_EQUAL(scored, (int64_t)N / T * P);
    return (double)hits / (double)scored;
}

static void test_recall_oracle_and_constant(void) {
    const int n = 600, N = n * T;
    const char *dir = moe_test_tmpdir("mqar-recall");
    make_task(dir, 5, 10, n);
    int32_t *tg = val_targets(dir, n);
    CU_ASSERT_DOUBLE_EQUAL(recall_of(tg, N, -1), 1.0, 0);
    /* A constant guess hits 1 / (V/2) of the time on average: 2400 scored targets,
     * binomial std 0.0036 about the chance 1/32 = 0.031. */
    double chance = 1.0 / (V / 2), mean = 0;
    for (int v = V / 2; v < V; v++) {
        double r = recall_of(tg, N, v);
        CU_ASSERT(r < chance + 0.03);
        mean += r / (V / 2);
    }
    CU_ASSERT_DOUBLE_EQUAL(mean, chance, 1e-12); /* each scored target is one of the values */
    CU_ASSERT_DOUBLE_EQUAL(recall_of(tg, N, 0), 0.0, 0); /* a key is never the answer */
    free(tg);
}

/* 2 attention layers of width 64, an MoE FFN of 4 experts, 400 steps of 64 examples at a
 * constant lr of 1e-3. Measured: recall 0.82, 0.91, 0.92 for seeds 2, 3, 4 (1/P = 0.25). */
static void test_attention_learns_recall(void) {
    char data[200];
    snprintf(data, sizeof data, "%s", moe_test_tmpdir("mqar-train"));
    make_task(data, 3, 20000, 256);
    moe_config c;
    moe_config_defaults(&c);
    c.model.vocab_size = V;
    c.model.d_model = 64;
    c.model.n_layers = 2;
    c.model.n_heads = 2;
    c.model.seq_len = T;
    c.model.ffn_dim = 64;
    c.model.n_experts = 4;
    c.model.top_k = 2;
    c.data.batch_size = 64;
    c.train.steps = 400;
    c.train.seed = 3;
    c.train.lr = 1e-3;
    c.train.schedule = MOE_CFG_SCHEDULE_CONSTANT;
    c.train.warmup = 50;
    c.train.eval_every = 0;
    c.train.eval_batches = 4;
    c.train.log_every = 100;
    c.train.threads = 1; /* a tiny model: more threads only wait on each other */
    c.checkpoint.every = 0;
    c.checkpoint.keep = 1;
    snprintf(c.data.train_path, sizeof c.data.train_path, "%s/train.bin", data);
    snprintf(c.data.val_path, sizeof c.data.val_path, "%s/val.bin", data);
    snprintf(c.checkpoint.dir, sizeof c.checkpoint.dir, "%s/run", data);
    CU_ASSERT_EQUAL_FATAL(moe_config_validate(&c), MOE_OK);
    moe_train_summary sum;
    moe_train_options o = {.quiet = true};
    CU_ASSERT_EQUAL_FATAL(moe_train_run(&c, &o, &sum), MOE_OK);
    printf("\n    recall after %d steps: %.4f (val_loss %.4f nats per scored token)\n", c.train.steps, sum.val_recall,
           sum.val_loss);
    CU_ASSERT(sum.val_recall > 0.5);
    CU_ASSERT(sum.val_loss < log(P)); /* below the loss of a uniform guess among the P context values */
    /* metrics.jsonl carries the recall of the evaluation */
    char path[700];
    snprintf(path, sizeof path, "%s/run/metrics.jsonl", data);
    double logged[64];
    int n = moe_test_jsonl_values(path, "val_recall", logged, 64);
    CU_ASSERT_FATAL(n >= 1 && n < 64);
    CU_ASSERT_DOUBLE_EQUAL(logged[n - 1], sum.val_recall, 1e-6);
}

static void register_suites(void) {
    moe_test_add_suite("mqar", (moe_test_entry[]){{"files well formed", test_files_well_formed},
                                                   {"spec checked", test_spec_checked},
                                                   {"deterministic seed", test_deterministic},
                                                   {"damaged mask refused", test_damaged_mask},
                                                   {"text files unchanged", test_text_files_unchanged},
                                                   {"recall: oracle 1, constant at chance", test_recall_oracle_and_constant},
                                                   {"attention learns recall", test_attention_learns_recall},
                                                   {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
