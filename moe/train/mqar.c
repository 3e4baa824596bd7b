/* The MQAR generator and recall counting (see mqar.h). */
#include "moe/train/mqar.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/ops.h"
#include "moe/train/data.h"

#define MQAR_POWER_A 0.01 /* Zoology's gap law exponent: p(g) ~ (g + 1)^(a - 1) */

struct moe_mqar {
    moe_mqar_spec s;
    int space;   /* gaps [0, space): query pairs start at 2P + 2g */
    double *cdf; /* [space] cumulative gap law, cdf[space - 1] = 1 */
    int32_t *scratch; /* [3P]: one example's keys, values and gaps */
};

/* ---- counter-based random numbers --------------------------------------------------- */

static uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* One example's stream: a splitmix64 sequence started from (seed, split, index). */
typedef struct rng {
    uint64_t state;
} rng;

static uint64_t rng_next(rng *r) {
    r->state += 0x9e3779b97f4a7c15ULL;
    return splitmix64(r->state);
}

/* Uniform in [lo, hi), hi > lo. */
static int32_t rng_int(rng *r, int32_t lo, int32_t hi) {
    uint64_t span = (uint64_t)(hi - lo);
    return lo + (int32_t)(((unsigned __int128)rng_next(r) * span) >> 64);
}

static double rng_unit(rng *r) { return (double)(rng_next(r) >> 11) * 0x1.0p-53; }

/* ---- the generator ---------------------------------------------------------------------- */

moe_status moe_mqar_create(const moe_mqar_spec *spec, moe_mqar **out) {
    *out = NULL;
    const moe_mqar_spec *s = spec;
    if (s->pairs < 1 || s->seq_len < 4 * s->pairs)
        return moe_error(MOE_ERR_INVALID, "mqar: %d pairs need a sequence of at least 4 x pairs = %d tokens "
                         "(the context and room to query every key), got %d", s->pairs, 4 * s->pairs, s->seq_len);
    if (s->vocab < 4 || s->vocab > (1 << 24) || s->pairs >= s->vocab / 2)
        return moe_error(MOE_ERR_INVALID, "mqar: vocabulary %d must be in [4, 2^24] and at least 2 x (pairs + 1) = %d "
                         "(%d distinct keys from [1, V/2))", s->vocab, 2 * (s->pairs + 1), s->pairs);
    moe_mqar *g = calloc(1, sizeof *g);
    int space = (s->seq_len - 2 * s->pairs) / 2;
    double *cdf = g ? malloc(sizeof *cdf * (size_t)space) : NULL;
    int32_t *scratch = g ? malloc(sizeof *scratch * 3 * (size_t)s->pairs) : NULL;
    if (!cdf || !scratch) {
        free(g);
        free(cdf);
        free(scratch);
        return moe_error(MOE_ERR_OOM, "mqar: out of memory");
    }
    double total = 0;
    for (int i = 0; i < space; i++) cdf[i] = total += pow(i + 1.0, MQAR_POWER_A - 1.0);
    for (int i = 0; i < space; i++) cdf[i] /= total;
    cdf[space - 1] = 1.0;
    *g = (moe_mqar){*s, space, cdf, scratch};
    *out = g;
    return MOE_OK;
}

void moe_mqar_free(moe_mqar *g) {
    if (!g) return;
    free(g->cdf);
    free(g->scratch);
    free(g);
}

/* A gap drawn from the law: the first g with cdf[g] > u. */
static int draw_gap(const moe_mqar *g, rng *r) {
    double u = rng_unit(r);
    int lo = 0, hi = g->space - 1;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (g->cdf[mid] > u) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

static bool contains(const int32_t *xs, int n, int32_t x) {
    for (int i = 0; i < n; i++)
        if (xs[i] == x) return true;
    return false;
}

/* n distinct tokens of [lo, hi) (hi - lo > n), by rejection. */
static void draw_distinct(rng *r, int32_t lo, int32_t hi, int n, int32_t *out) {
    for (int i = 0; i < n; i++) {
        int32_t x;
        do x = rng_int(r, lo, hi);
        while (contains(out, i, x));
        out[i] = x;
    }
}

void moe_mqar_example(moe_mqar *g, moe_mqar_split split, uint64_t index, int32_t *tokens, uint8_t *scored) {
    const int T = g->s.seq_len, P = g->s.pairs, V = g->s.vocab;
    int32_t *keys = g->scratch, *vals = keys + P, *gaps = vals + P;
    rng r = {splitmix64(splitmix64(splitmix64(g->s.seed) ^ (uint64_t)split) ^ index)};
    draw_distinct(&r, 1, V / 2, P, keys);
    draw_distinct(&r, V / 2, V, P, vals);
    /* Zoology's choice without replacement under the law: draw from the whole law and
     * redraw a gap already taken (the same distribution). */
    for (int i = 0; i < P; i++) {
        int32_t gap;
        do gap = draw_gap(g, &r);
        while (contains(gaps, i, gap));
        gaps[i] = gap;
    }
    memset(scored, 0, (size_t)T + 1);
    for (int j = 2 * P; j <= T; j++) tokens[j] = rng_int(&r, 0, V);
    for (int i = 0; i < P; i++) {
        int at = 2 * P + 2 * gaps[i];
        tokens[2 * i] = tokens[at] = keys[i];
        tokens[2 * i + 1] = tokens[at + 1] = vals[i];
        scored[at + 1] = 1;
    }
}

/* One split's file: n examples of T + 1 tokens and their masks. */
static moe_status write_split(moe_mqar *g, moe_mqar_split split, const char *path, uint64_t n) {
    const int R = g->s.seq_len + 1, V = g->s.vocab;
    moe_token_file_info info = {.vocab = V, .count = n * (uint64_t)R, .record_len = (uint32_t)R,
                                .has_mask = true, .bytes_per_token = 1.0,
                                .unigram_bpb = log2((double)(V - V / 2)), .src_bytes = n * (uint64_t)R};
    int32_t *tokens = malloc(sizeof *tokens * (size_t)R);
    uint8_t *scored = malloc((size_t)R);
    moe_token_writer *w = NULL;
    moe_status s = tokens && scored ? moe_token_writer_open(path, &info, &w)
                                    : moe_error(MOE_ERR_OOM, "mqar: out of memory");
    for (uint64_t i = 0; i < n && s == MOE_OK; i++) {
        moe_mqar_example(g, split, i, tokens, scored);
        s = moe_token_writer_append(w, tokens, scored, (size_t)R);
    }
    if (w) {
        moe_status c = moe_token_writer_close(w, s == MOE_OK);
        if (s == MOE_OK) s = c;
    }
    free(tokens);
    free(scored);
    return s;
}

moe_status moe_mqar_write(moe_mqar *g, const char *out_dir, uint64_t n_train, uint64_t n_val) {
    if (n_train < 1 || n_val < 1)
        return moe_error(MOE_ERR_INVALID, "mqar: need at least one train and one val example (got %llu, %llu)",
                         (unsigned long long)n_train, (unsigned long long)n_val);
    MOE_TRY(moe_data_make_dirs(out_dir));
    size_t len = strlen(out_dir) + sizeof "/train.bin";
    char *path = malloc(len);
    if (!path) return moe_error(MOE_ERR_OOM, "mqar: out of memory");
    snprintf(path, len, "%s/train.bin", out_dir);
    moe_status s = write_split(g, MOE_MQAR_TRAIN, path, n_train);
    snprintf(path, len, "%s/val.bin", out_dir);
    if (s == MOE_OK) s = write_split(g, MOE_MQAR_VAL, path, n_val);
    free(path);
    return s;
}

/* ---- recall --------------------------------------------------------------------------- */

#define RECALL_ROWS 2048 /* scored rows per logits block: [RECALL_ROWS, V] f32 at a time */

moe_status moe_recall_count(moe_tensor *h, moe_tensor *w, const int32_t *targets, int64_t *hits,
                            int64_t *scored) {
    MOE_ASSERT(h && w && h->ndim == 2 && w->ndim == 2 && h->shape[1] == w->shape[1],
               "recall: h [N, d] and w [V, d] expected");
    const int64_t N = h->shape[0];
    int32_t *rows = malloc(sizeof *rows * (size_t)(N > 0 ? N : 1));
    double *best = malloc(sizeof *best * RECALL_ROWS);
    if (!rows || !best) {
        free(rows);
        free(best);
        return moe_error(MOE_ERR_OOM, "recall: out of host memory");
    }
    int64_t M = 0;
    for (int64_t i = 0; i < N; i++)
        if (targets[i] >= 0) rows[M++] = (int32_t)i;
    moe_tensor *wt = moe_transpose(moe_cast(w, MOE_F32), 0, 1); /* [d, V] */
    moe_status s = MOE_OK;
    for (int64_t at = 0; at < M && s == MOE_OK; at += RECALL_ROWS) {
        int64_t m = M - at < RECALL_ROWS ? M - at : RECALL_ROWS;
        moe_tensor *idx = moe_tensor_from_host(MOE_LIFE_STEP, h->device, MOE_I32, 1, (int64_t[]){m}, rows + at);
        moe_tensor *logits = moe_matmul(moe_cast(moe_index_select(h, idx), MOE_F32), wt); /* [m, V] */
        moe_tensor *arg = NULL;
        moe_tensor *top = moe_topk(logits, 1, &arg);
        if (!top || !arg || (s = moe_tensor_to_host_f64(arg, best)) != MOE_OK) {
            if (s == MOE_OK) s = moe_last_status();
            break;
        }
        for (int64_t j = 0; j < m; j++) *hits += (int32_t)best[j] == targets[rows[at + j]];
    }
    if (s == MOE_OK) *scored += M;
    free(rows);
    free(best);
    return s;
}
