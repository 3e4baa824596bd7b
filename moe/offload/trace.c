/* Routing traces: recording (the decoder's route ids over packed sequences), the trace
 * file, the model fingerprint, recall and the token-identity baseline (trace.h). */
#include "moe/offload/trace.h"

#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "core/h5file.h"
#include "core/fileio.h"
#include "core/memory.h"
#include "moe/infer/decoder.h"

#define TRACE_KIND "moe-routing-trace"

/* ---- fingerprint ---- */

static moe_status hash_tensor(const moe_tensor *t, uLong *crc) {
    int64_t n = moe_tensor_numel(t);
    double *d = malloc(sizeof *d * (size_t)n);
    float *f = malloc(sizeof *f * (size_t)n);
    moe_status s = d && f ? moe_tensor_to_host_f64(t, d) : moe_error(MOE_ERR_OOM, "fingerprint: out of host memory");
    for (int64_t i = 0; s == MOE_OK && i < n; i++) f[i] = (float)d[i];
    if (s == MOE_OK) *crc = crc32(*crc, (const Bytef *)f, (uInt)(sizeof *f * (size_t)n));
    free(d);
    free(f);
    return s;
}

moe_status moe_route_fingerprint_of(const moe_model *m, moe_route_fingerprint *fp) {
    const moe_cfg_model *c = &m->cfg.model;
    *fp = (moe_route_fingerprint){.n_layers = c->n_layers, .n_experts = c->n_experts, .top_k = c->top_k,
                                  .vocab = c->vocab_size};
    uLong crc = crc32(0L, Z_NULL, 0);
    for (int i = 0; i < c->n_layers; i++) {
        if (m->blocks[i].dense) continue;
        fp->n_moe_layers++;
        moe_tensor *ts[4];
        const char *names[4];
        int n = moe_router_params(&m->blocks[i].moe.router, ts, names, 4);
        for (int j = 0; j < n && j < 4; j++) MOE_TRY(hash_tensor(ts[j], &crc));
        if (m->blocks[i].moe.router.bias) MOE_TRY(hash_tensor(m->blocks[i].moe.router.bias, &crc));
    }
    fp->router_hash = (uint32_t)crc;
    return MOE_OK;
}

moe_status moe_route_fingerprint_check(const moe_route_fingerprint *want, const char *want_name,
                                       const moe_route_fingerprint *have, const char *have_name, const char *file) {
    static const char *fields[] = {"layers", "MoE layers", "experts", "top_k", "vocabulary"};
    const int32_t w[] = {want->n_layers, want->n_moe_layers, want->n_experts, want->top_k, want->vocab};
    const int32_t h[] = {have->n_layers, have->n_moe_layers, have->n_experts, have->top_k, have->vocab};
    for (int i = 0; i < 5; i++)
        if (w[i] != h[i])
            return moe_error(MOE_ERR_INVALID, "%s was made for model %s (%s %d), not for %s (%s %d)", file,
                             want_name, fields[i], w[i], have_name, fields[i], h[i]);
    if (want->router_hash != have->router_hash)
        return moe_error(MOE_ERR_INVALID,
                         "%s was made for model %s (router weights hash %08x), not for %s (router weights "
                         "hash %08x): same shape, other weights",
                         file, want_name, want->router_hash, have_name, have->router_hash);
    return MOE_OK;
}

/* ---- recording ---- */

static moe_status trace_alloc(moe_trace *t, int64_t n) {
    int lm = t->fp.n_moe_layers, k = t->fp.top_k;
    t->n = n;
    t->tokens = malloc(sizeof(int32_t) * (size_t)n);
    t->pos = malloc(sizeof(int32_t) * (size_t)n);
    t->seq = malloc(sizeof(int32_t) * (size_t)n);
    t->moe_layers = malloc(sizeof(int32_t) * (size_t)lm);
    t->ids = malloc(sizeof(int32_t) * (size_t)(lm * n * k));
    if (t->tokens && t->pos && t->seq && t->moe_layers && t->ids) return MOE_OK;
    return moe_error(MOE_ERR_OOM, "trace: out of host memory for %lld tokens", (long long)n);
}

/* One forward over sequences [s0, s0 + nb) of length T starting at token s0 * T; copies
 * the MoE layers' route ids [n_layers, nb T, k] into the trace. */
static moe_status trace_batch(moe_decoder *d, moe_decode_state *st, moe_trace *t, int64_t s0, int nb, int T,
                              int32_t *route, int32_t *pos, int32_t *seq) {
    int64_t n = (int64_t)nb * T, first = s0 * T;
    int k = t->fp.top_k;
    for (int64_t i = 0; i < n; i++) {
        pos[i] = (int32_t)(i % T);
        seq[i] = (int32_t)(i / T);
    }
    moe_batch b = {.n_tokens = (int)n, .tokens = t->tokens + first, .pos = pos, .seq = seq, .logits = MOE_LOGITS_NONE};
    moe_decode_info info = {.route_ids = route};
    moe_status s = moe_decoder_forward(d, st, &b, NULL, &info);
    for (int j = 0; j < nb; j++) moe_decode_state_seq_free(st, j);
    moe_step_reset();
    MOE_TRY(s);
    for (int l = 0; l < t->fp.n_moe_layers; l++)
        memcpy(t->ids + ((int64_t)l * t->n + first) * k, route + (int64_t)t->moe_layers[l] * n * k,
               sizeof(int32_t) * (size_t)(n * k));
    for (int64_t i = 0; i < n; i++) {
        t->pos[first + i] = pos[i];
        t->seq[first + i] = (int32_t)(s0 + seq[i]);
    }
    return MOE_OK;
}

static moe_status trace_run(moe_decoder *d, moe_trace *t, int T, int batch) {
    const moe_model *m = moe_decoder_model(d);
    int64_t n_seqs = t->n / T;
    int64_t kv = (int64_t)batch * ((T + MOE_KV_BLOCK - 1) / MOE_KV_BLOCK * MOE_KV_BLOCK);
    size_t per = (size_t)batch * (size_t)T;
    int32_t *route = malloc(sizeof(int32_t) * per * (size_t)(m->cfg.model.n_layers * t->fp.top_k));
    int32_t *pos = malloc(sizeof(int32_t) * per), *seq = malloc(sizeof(int32_t) * per);
    moe_decode_state *st = NULL;
    moe_status s = route && pos && seq ? moe_decode_state_create(d, batch, kv, &st)
                                       : moe_error(MOE_ERR_OOM, "trace: out of host memory");
    for (int64_t s0 = 0; s == MOE_OK && s0 < n_seqs; s0 += batch) {
        int nb = (int)(n_seqs - s0 < batch ? n_seqs - s0 : batch);
        s = trace_batch(d, st, t, s0, nb, T, route, pos, seq);
    }
    moe_decode_state_free(st);
    free(route);
    free(pos);
    free(seq);
    return s;
}

moe_status moe_trace_record(moe_decoder *d, const char *name, const int32_t *tokens, int64_t n_tokens, int context,
                            int batch, moe_trace *out) {
    MOE_ASSERT(context > 0 && batch > 0 && n_tokens >= 0, "trace: context %d, batch %d", context, batch);
    const moe_model *m = moe_decoder_model(d);
    *out = (moe_trace){0};
    MOE_TRY(moe_route_fingerprint_of(m, &out->fp));
    if (out->fp.n_moe_layers == 0) return moe_error(MOE_ERR_INVALID, "trace: model %s has no MoE layer", name);
    int T = n_tokens < context ? (int)n_tokens : context;
    if (T < 1) return moe_error(MOE_ERR_INVALID, "trace: no tokens to trace");
    out->context = T;
    out->active_params = moe_model_param_count(m, true);
    moe_status s = (out->model_name = strdup(name)) ? trace_alloc(out, n_tokens / T * T)
                                                    : moe_error(MOE_ERR_OOM, "trace: out of host memory");
    for (int i = 0, l = 0; s == MOE_OK && i < m->cfg.model.n_layers; i++)
        if (!m->blocks[i].dense) out->moe_layers[l++] = i;
    if (s == MOE_OK) memcpy(out->tokens, tokens, sizeof(int32_t) * (size_t)out->n);
    if (s == MOE_OK) s = trace_run(d, out, T, batch);
    if (s != MOE_OK) moe_trace_free(out);
    return s;
}

moe_status moe_trace_time_decode(moe_decoder *d, int prompt, int reps, double *seconds) {
    MOE_ASSERT(prompt > 0 && reps > 0, "trace: time %d steps after %d tokens", reps, prompt);
    const moe_model *m = moe_decoder_model(d);
    int64_t len = prompt + reps;
    if (len > m->cfg.model.seq_len) return moe_error(MOE_ERR_INVALID, "trace: %d + %d tokens exceed the context %d",
                                                     prompt, reps, m->cfg.model.seq_len);
    int32_t *ids = calloc((size_t)len, sizeof *ids);
    double *t = malloc(sizeof *t * (size_t)reps);
    float *logits = malloc(sizeof *logits * (size_t)m->cfg.model.vocab_size);
    moe_decode_state *st = NULL;
    moe_status s = ids && t && logits ? moe_decode_state_create(d, 1, len, &st)
                                      : moe_error(MOE_ERR_OOM, "trace: out of host memory");
    for (int64_t i = 0; i < len; i++) ids[i] = (int32_t)((i * 7919) % m->cfg.model.vocab_size);
    if (s == MOE_OK) s = moe_decoder_feed(d, st, 0, ids, prompt, logits);
    moe_step_reset();
    for (int r = 0; s == MOE_OK && r < reps; r++) {
        double t0 = moe_clock_ms();
        s = moe_decoder_feed(d, st, 0, ids + prompt + r, 1, logits);
        t[r] = (moe_clock_ms() - t0) * 1e-3;
        moe_step_reset();
    }
    if (s == MOE_OK) {
        *seconds = moe_median(t, reps);
    }
    moe_decode_state_free(st);
    free(ids);
    free(t);
    free(logits);
    return s;
}

/* ---- the file ---- */

static void fingerprint_pack(const moe_route_fingerprint *fp, int64_t *v) {
    v[0] = fp->n_layers, v[1] = fp->n_moe_layers, v[2] = fp->n_experts, v[3] = fp->top_k, v[4] = fp->vocab;
    v[5] = fp->router_hash;
}

static void fingerprint_unpack(const int64_t *v, moe_route_fingerprint *fp) {
    *fp = (moe_route_fingerprint){.n_layers = (int32_t)v[0], .n_moe_layers = (int32_t)v[1], .n_experts = (int32_t)v[2],
                                  .top_k = (int32_t)v[3], .vocab = (int32_t)v[4], .router_hash = (uint32_t)v[5]};
}

moe_status moe_route_fingerprint_put(moe_h5 *f, const char *name, const moe_route_fingerprint *fp) {
    int64_t v[6];
    fingerprint_pack(fp, v);
    return moe_h5_put_array(f, name, MOE_H5_I64, 1, (int64_t[]){6}, v);
}

moe_status moe_route_fingerprint_get(moe_h5 *f, const char *name, moe_route_fingerprint *fp) {
    int64_t v[6];
    MOE_TRY(moe_h5_get_array(f, name, MOE_H5_I64, 1, (int64_t[]){6}, v));
    bool ok = v[0] >= 1 && v[0] <= 1 << 16 && v[1] >= 1 && v[1] <= v[0] && v[2] >= 1 && v[2] <= 1 << 16 && v[3] >= 1 &&
              v[3] <= 64 && v[3] <= v[2] && v[4] >= 1 && v[4] <= 1 << 24 && v[5] >= 0 && v[5] <= UINT32_MAX;
    if (!ok)
        return moe_error(MOE_ERR_FORMAT, "%s is malformed: layers %lld, MoE layers %lld, experts %lld, top_k %lld, "
                         "vocabulary %lld", name, (long long)v[0], (long long)v[1], (long long)v[2], (long long)v[3],
                         (long long)v[4]);
    fingerprint_unpack(v, fp);
    return MOE_OK;
}

moe_status moe_trace_expect_shape(moe_h5 *f, const char *name, moe_h5_dtype dt, int ndim, const int64_t *shape) {
    moe_h5_dtype have_dt;
    int have_nd;
    int64_t have[MOE_H5_MAX_NDIM];
    MOE_TRY(moe_h5_shape(f, name, &have_dt, &have_nd, have));
    bool same = have_dt == dt && have_nd == ndim;
    for (int i = 0; same && i < ndim; i++) same = have[i] == shape[i];
    if (!same) return moe_error(MOE_ERR_FORMAT, "dataset %s is not %s of the expected shape", name, moe_h5_dtype_name(dt));
    return MOE_OK;
}

static moe_status trace_put(moe_h5 *f, const moe_trace *t) {
    int64_t n = t->n, lm = t->fp.n_moe_layers;
    MOE_TRY(moe_h5_put_string(f, "kind", TRACE_KIND));
    MOE_TRY(moe_h5_put_string(f, "model/name", t->model_name));
    MOE_TRY(moe_route_fingerprint_put(f, "model/fingerprint", &t->fp));
    MOE_TRY(moe_h5_put_i64(f, "model/active_params", t->active_params));
    MOE_TRY(moe_h5_put_f64(f, "model/decode_step_s", t->decode_step_s));
    MOE_TRY(moe_h5_put_i64(f, "context", t->context));
    MOE_TRY(moe_h5_put_array(f, "tokens", MOE_H5_I32, 1, &n, t->tokens));
    MOE_TRY(moe_h5_put_array(f, "pos", MOE_H5_I32, 1, &n, t->pos));
    MOE_TRY(moe_h5_put_array(f, "seq", MOE_H5_I32, 1, &n, t->seq));
    MOE_TRY(moe_h5_put_array(f, "moe_layers", MOE_H5_I32, 1, &lm, t->moe_layers));
    return moe_h5_put_array(f, "route_ids", MOE_H5_I32, 3, (int64_t[]){lm, n, t->fp.top_k}, t->ids);
}

moe_status moe_trace_save(const moe_trace *t, const char *path) {
    moe_h5 *f;
    MOE_TRY(moe_h5_create(path, &f));
    moe_status s = trace_put(f, t);
    if (s != MOE_OK) {
        moe_h5_abort(f);
        return moe_error_context(s, "writing trace %s", path);
    }
    return moe_h5_commit(f);
}

/* Ids, positions and sequences that a reader may index by: values in range, sequences of
 * `context` tokens numbered 0, 1, ... in order, each at positions 0, 1, 2, ... */
static moe_status trace_check(const moe_trace *t) {
    const moe_route_fingerprint *fp = &t->fp;
    for (int l = 0; l < fp->n_moe_layers; l++)
        if (t->moe_layers[l] < (l ? t->moe_layers[l - 1] + 1 : 0) || t->moe_layers[l] >= fp->n_layers)
            return moe_error(MOE_ERR_FORMAT, "moe_layers names layer %d of %d out of order", t->moe_layers[l], fp->n_layers);
    if (t->context < 1 || t->n % t->context)
        return moe_error(MOE_ERR_FORMAT, "%lld tokens do not make whole sequences of %lld", (long long)t->n,
                         (long long)t->context);
    for (int64_t i = 0; i < t->n; i++)
        if (t->tokens[i] < 0 || t->tokens[i] >= fp->vocab || t->pos[i] != i % t->context || t->seq[i] != i / t->context)
            return moe_error(MOE_ERR_FORMAT, "token %lld (id %d, sequence %d, position %d) is out of range or order",
                             (long long)i, t->tokens[i], t->seq[i], t->pos[i]);
    for (int64_t i = 0; i < fp->n_moe_layers * t->n * fp->top_k; i++)
        if (t->ids[i] < 0 || t->ids[i] >= fp->n_experts)
            return moe_error(MOE_ERR_FORMAT, "route_ids holds expert %d of %d", t->ids[i], fp->n_experts);
    return MOE_OK;
}

static moe_status trace_get(moe_h5 *f, moe_trace *t) {
    char *kind = NULL;
    moe_status s = moe_h5_get_string(f, "kind", &kind);
    bool ok = s == MOE_OK && !strcmp(kind, TRACE_KIND);
    free(kind);
    if (!ok) return moe_error(MOE_ERR_FORMAT, "not a routing trace (kind is not \"%s\")", TRACE_KIND);
    MOE_TRY(moe_h5_get_string(f, "model/name", &t->model_name));
    MOE_TRY(moe_route_fingerprint_get(f, "model/fingerprint", &t->fp));
    MOE_TRY(moe_h5_get_i64(f, "model/active_params", &t->active_params));
    MOE_TRY(moe_h5_get_f64(f, "model/decode_step_s", &t->decode_step_s));
    MOE_TRY(moe_h5_get_i64(f, "context", &t->context));
    moe_h5_dtype dt;
    int nd;
    int64_t shape[MOE_H5_MAX_NDIM];
    MOE_TRY(moe_h5_shape(f, "tokens", &dt, &nd, shape));
    const moe_route_fingerprint *fp = &t->fp;
    int64_t n = shape[0], lm = fp->n_moe_layers;
    if (nd != 1 || n < 1) return moe_error(MOE_ERR_FORMAT, "dataset tokens is not a list of tokens");
    MOE_TRY(moe_trace_expect_shape(f, "route_ids", MOE_H5_I32, 3, (int64_t[]){lm, n, fp->top_k}));
    MOE_TRY(trace_alloc(t, n));
    MOE_TRY(moe_h5_get_array(f, "tokens", MOE_H5_I32, 1, &n, t->tokens));
    MOE_TRY(moe_h5_get_array(f, "pos", MOE_H5_I32, 1, &n, t->pos));
    MOE_TRY(moe_h5_get_array(f, "seq", MOE_H5_I32, 1, &n, t->seq));
    MOE_TRY(moe_h5_get_array(f, "moe_layers", MOE_H5_I32, 1, &lm, t->moe_layers));
    MOE_TRY(moe_h5_get_array(f, "route_ids", MOE_H5_I32, 3, (int64_t[]){lm, n, fp->top_k}, t->ids));
    return trace_check(t);
}

moe_status moe_trace_load(const char *path, moe_trace *t) {
    *t = (moe_trace){0};
    moe_h5 *f;
    moe_status s = moe_h5_open(path, &f);
    if (s != MOE_OK) return moe_error_context(s, "reading trace %s", path);
    s = trace_get(f, t);
    moe_h5_close(f);
    if (s == MOE_OK) return MOE_OK;
    moe_trace_free(t);
    return moe_error_context(s, "reading trace %s", path);
}

void moe_trace_free(moe_trace *t) {
    free(t->model_name);
    free(t->tokens);
    free(t->pos);
    free(t->seq);
    free(t->moe_layers);
    free(t->ids);
    *t = (moe_trace){0};
}

/* ---- held-out split, recall, baseline ---- */

moe_status moe_trace_holdout_split(const moe_trace *t, double fraction, int64_t *split) {
    int n_seqs = t->n ? t->seq[t->n - 1] + 1 : 0;
    if (n_seqs < 2)
        return moe_error(MOE_ERR_INVALID, "the trace holds %d sequence(s): at least 2 are needed to hold some out "
                         "(trace more tokens or a shorter --context)", n_seqs);
    int held = (int)(fraction * n_seqs + 0.5);
    held = held < 1 ? 1 : held > n_seqs - 1 ? n_seqs - 1 : held;
    int64_t i = t->n;
    while (i > 0 && t->seq[i - 1] >= n_seqs - held) i--;
    *split = i;
    return MOE_OK;
}

/* The k largest of row [E] into top (indices, best first; ties to the lower index). */
static void top_k_of(const float *row, int E, int k, int *top) {
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            bool taken = false;
            for (int q = 0; q < j && !taken; q++) taken = top[q] == e;
            if (!taken && (best < 0 || row[e] > row[best])) best = e;
        }
        top[j] = best;
    }
}

void moe_trace_recall(const moe_trace *t, int64_t first, int64_t count, const float *scores, double *recall) {
    int lm = t->fp.n_moe_layers, E = t->fp.n_experts, k = t->fp.top_k;
    MOE_ASSERT(first >= 0 && count > 0 && first + count <= t->n && k <= 64, "recall: tokens [%lld, +%lld) of %lld",
               (long long)first, (long long)count, (long long)t->n);
    int top[64];
    for (int l = 0; l < lm; l++) {
        int64_t hits = 0;
        for (int64_t i = 0; i < count; i++) {
            top_k_of(scores + ((int64_t)l * count + i) * E, E, k, top);
            const int32_t *routed = t->ids + ((int64_t)l * t->n + first + i) * k;
            for (int a = 0; a < k; a++)
                for (int b = 0; b < k; b++) hits += top[a] == routed[b];
        }
        recall[l] = (double)hits / ((double)count * k);
    }
}

/* counts [Lm, E] of the experts that served each listed token id in [0, n_train). */
moe_status moe_trace_token_freq_scores(const moe_trace *t, int64_t n_train, int64_t first, int64_t count,
                                       float *scores) {
    int lm = t->fp.n_moe_layers, E = t->fp.n_experts, k = t->fp.top_k, V = t->fp.vocab;
    int32_t *row = malloc(sizeof *row * (size_t)V); /* token id -> its row of counts, -1: not asked */
    int64_t *overall = calloc((size_t)(lm * E), sizeof *overall);
    int64_t *counts = calloc((size_t)(count * lm * E), sizeof *counts);
    if (!row || !overall || !counts) {
        free(row), free(overall), free(counts);
        return moe_error(MOE_ERR_OOM, "token baseline: out of host memory");
    }
    for (int v = 0; v < V; v++) row[v] = -1;
    for (int64_t i = 0; i < count; i++)
        if (row[t->tokens[first + i]] < 0) row[t->tokens[first + i]] = (int32_t)i;
    for (int l = 0; l < lm; l++)
        for (int64_t i = 0; i < n_train; i++)
            for (int j = 0; j < k; j++) {
                int e = t->ids[((int64_t)l * t->n + i) * k + j];
                overall[l * E + e]++;
                int r = row[t->tokens[i]];
                if (r >= 0) counts[((int64_t)r * lm + l) * E + e]++;
            }
    for (int l = 0; l < lm; l++)
        for (int64_t i = 0; i < count; i++)
            for (int e = 0; e < E; e++) {
                int r = row[t->tokens[first + i]];
                scores[((int64_t)l * count + i) * E + e] =
                    (float)counts[((int64_t)r * lm + l) * E + e] + (float)overall[l * E + e] / (float)(n_train * k + 1);
            }
    free(row), free(overall), free(counts);
    return MOE_OK;
}
