/* The routing-path predictor: its network's forward (engine ops), its file, and
 * prediction for a model's tokens (predictor.h). */
#include "moe/offload/predictor.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/fileio.h"
#include "core/memory.h"
#include "core/ops.h"

#define PREDICTOR_KIND "moe-route-predictor"
#define NET_PARAMS 5

static const char *const param_names[NET_PARAMS] = {"embed", "w1", "b1", "w2", "b2"};

/* The shapes of the five parameters. */
static void param_shapes(const moe_route_net_shape *s, int *ndim, int64_t shape[NET_PARAMS][2]) {
    int64_t in = (int64_t)(s->context + 1) * s->embed, out = (int64_t)s->n_moe_layers * s->n_experts;
    const int64_t sh[NET_PARAMS][2] = {{s->vocab + 1, s->embed}, {in, s->hidden}, {s->hidden, 1}, {s->hidden, out}, {out, 1}};
    for (int i = 0; i < NET_PARAMS; i++) {
        ndim[i] = sh[i][1] == 1 && (i == 2 || i == 4) ? 1 : 2;
        shape[i][0] = sh[i][0], shape[i][1] = sh[i][1];
    }
}

moe_status moe_route_net_init(moe_route_net *net, const moe_route_net_shape *shape, uint64_t seed) {
    MOE_ASSERT(shape->vocab > 0 && shape->context >= 0 && shape->embed > 0 && shape->hidden > 0 &&
                   shape->n_moe_layers > 0 && shape->n_experts > 0 && shape->top_k > 0,
               "route net: bad shape");
    *net = (moe_route_net){.shape = *shape};
    int ndim[NET_PARAMS];
    int64_t sh[NET_PARAMS][2];
    param_shapes(shape, ndim, sh);
    moe_tensor *p[NET_PARAMS];
    uint64_t offset = 0;
    for (int i = 0; i < NET_PARAMS; i++) {
        double std = i == 0 ? 1.0 : i == 2 || i == 4 ? 0.0 : 1.0 / sqrt((double)sh[i][0]);
        p[i] = std > 0 ? moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, ndim[i], sh[i], seed, offset, std)
                       : moe_tensor_zeros(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, ndim[i], sh[i]);
        offset += (uint64_t)(sh[i][0] * sh[i][1]);
        if (p[i]) moe_param_init(p[i], param_names[i]);
    }
    net->embed = p[0], net->w1 = p[1], net->b1 = p[2], net->w2 = p[3], net->b2 = p[4];
    for (int i = 0; i < NET_PARAMS; i++)
        if (!p[i]) {
            moe_route_net_free(net);
            return moe_error(MOE_ERR_OOM, "route net: out of memory for its parameters");
        }
    return MOE_OK;
}

void moe_route_net_free(moe_route_net *net) {
    moe_tensor *p[NET_PARAMS];
    moe_route_net_params(net, p);
    for (int i = 0; i < NET_PARAMS; i++)
        if (p[i]) moe_tensor_free(p[i]);
    *net = (moe_route_net){0};
}

void moe_route_net_params(moe_route_net *net, moe_tensor **params) {
    params[0] = net->embed, params[1] = net->w1, params[2] = net->b1, params[3] = net->w2, params[4] = net->b2;
}

int64_t moe_route_net_param_count(const moe_route_net *net) {
    moe_tensor *p[NET_PARAMS];
    moe_route_net_params((moe_route_net *)net, p);
    int64_t n = 0;
    for (int i = 0; i < NET_PARAMS; i++) n += moe_tensor_numel(p[i]);
    return n;
}

void moe_route_net_slots(int context, const int32_t *tokens, const int32_t *pos, const int32_t *seq, int64_t first,
                         int64_t count, int32_t *slots) {
    int64_t S = context + 1;
    for (int64_t i = 0; i < count; i++) {
        int64_t at = first + i;
        slots[i * S] = tokens[at];
        for (int64_t j = 1; j < S; j++) {
            int64_t b = at - j;
            bool ok = b >= 0 && pos[b] == pos[at] - j && (!seq || seq[b] == seq[at]);
            slots[i * S + j] = ok ? tokens[b] : -1;
        }
    }
}

moe_tensor *moe_route_net_forward(const moe_route_net *net, const int32_t *slots, int64_t n) {
    const moe_route_net_shape *s = &net->shape;
    int64_t S = s->context + 1;
    int32_t *ids = moe_step_host_alloc(sizeof *ids * (size_t)(n * S));
    if (!ids) {
        moe_error(MOE_ERR_OOM, "route net: out of host memory");
        return NULL;
    }
    for (int64_t i = 0; i < n * S; i++) {
        MOE_ASSERT(slots[i] < s->vocab, "route net: token %d of a vocabulary of %d", slots[i], s->vocab);
        ids[i] = slots[i] < 0 ? s->vocab : slots[i]; /* row V: "no token here" */
    }
    moe_tensor *idt = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, (int64_t[]){n * S}, ids);
    moe_tensor *x = moe_reshape(moe_embedding(net->embed, idt), 2, (int64_t[]){n, S * s->embed}); /* [n, S r] */
    moe_tensor *h = moe_gelu(moe_add(moe_matmul(x, net->w1), net->b1));                            /* [n, H] */
    return moe_add(moe_matmul(h, net->w2), net->b2);                                                /* [n, Lm E] */
}

/* ---- the file ---- */

static void shape_pack(const moe_route_net_shape *s, int64_t *v) {
    v[0] = s->vocab, v[1] = s->context, v[2] = s->embed, v[3] = s->hidden, v[4] = s->n_moe_layers;
    v[5] = s->n_experts, v[6] = s->top_k;
}

static moe_status net_put(moe_h5 *f, const moe_route_net *net, const char *model_name, const moe_route_fingerprint *fp) {
    int64_t v[7];
    shape_pack(&net->shape, v);
    MOE_TRY(moe_h5_put_string(f, "kind", PREDICTOR_KIND));
    MOE_TRY(moe_h5_put_string(f, "model/name", model_name));
    MOE_TRY(moe_route_fingerprint_put(f, "model/fingerprint", fp));
    MOE_TRY(moe_h5_put_array(f, "shape", MOE_H5_I64, 1, (int64_t[]){7}, v));
    moe_tensor *p[NET_PARAMS];
    moe_route_net_params((moe_route_net *)net, p);
    for (int i = 0; i < NET_PARAMS; i++) {
        char name[64];
        snprintf(name, sizeof name, "params/%s", param_names[i]);
        MOE_TRY(moe_h5_put_array(f, name, MOE_H5_F32, p[i]->ndim, p[i]->shape, p[i]->data));
    }
    return MOE_OK;
}

moe_status moe_route_net_save(const moe_route_net *net, const char *path, const char *model_name,
                              const moe_route_fingerprint *fp) {
    moe_h5 *f;
    MOE_TRY(moe_h5_create(path, &f));
    moe_status s = net_put(f, net, model_name, fp);
    if (s != MOE_OK) {
        moe_h5_abort(f);
        return moe_error_context(s, "writing predictor %s", path);
    }
    return moe_h5_commit(f);
}

struct moe_predictor {
    moe_route_net net;
    char *model_name;
    moe_route_fingerprint fp;
};

/* The stored shape, checked against the fingerprint it was made for. */
static moe_status shape_get(moe_h5 *f, const moe_route_fingerprint *fp, moe_route_net_shape *s) {
    int64_t v[7];
    MOE_TRY(moe_h5_get_array(f, "shape", MOE_H5_I64, 1, (int64_t[]){7}, v));
    *s = (moe_route_net_shape){.vocab = (int)v[0], .context = (int)v[1], .embed = (int)v[2], .hidden = (int)v[3],
                               .n_moe_layers = (int)v[4], .n_experts = (int)v[5], .top_k = (int)v[6]};
    bool sizes = v[1] >= 0 && v[1] <= 64 && v[2] > 0 && v[2] <= 4096 && v[3] > 0 && v[3] <= 65536;
    if (!sizes || v[0] != fp->vocab || v[4] != fp->n_moe_layers || v[5] != fp->n_experts || v[6] != fp->top_k)
        return moe_error(MOE_ERR_FORMAT, "its shape (vocab %lld, context %lld, embed %lld, hidden %lld, %lld x %lld "
                         "experts, top %lld) does not fit its fingerprint", (long long)v[0], (long long)v[1],
                         (long long)v[2], (long long)v[3], (long long)v[4], (long long)v[5], (long long)v[6]);
    return MOE_OK;
}

static moe_status predictor_get(moe_h5 *f, const char *path, const moe_route_fingerprint *fp, const char *model_name,
                                moe_predictor *p) {
    char *kind = NULL;
    moe_status s = moe_h5_get_string(f, "kind", &kind);
    bool ok = s == MOE_OK && !strcmp(kind, PREDICTOR_KIND);
    free(kind);
    if (!ok) return moe_error(MOE_ERR_FORMAT, "not a routing predictor (kind is not \"%s\")", PREDICTOR_KIND);
    MOE_TRY(moe_h5_get_string(f, "model/name", &p->model_name));
    MOE_TRY(moe_route_fingerprint_get(f, "model/fingerprint", &p->fp));
    MOE_TRY(moe_route_fingerprint_check(&p->fp, p->model_name, fp, model_name, path));
    moe_route_net_shape shape;
    MOE_TRY(shape_get(f, fp, &shape));
    int ndim[NET_PARAMS];
    int64_t sh[NET_PARAMS][2];
    param_shapes(&shape, ndim, sh);
    char name[NET_PARAMS][64];
    for (int i = 0; i < NET_PARAMS; i++) { /* before allocating by the shape */
        snprintf(name[i], sizeof name[i], "params/%s", param_names[i]);
        MOE_TRY(moe_trace_expect_shape(f, name[i], MOE_H5_F32, ndim[i], sh[i]));
    }
    MOE_TRY(moe_route_net_init(&p->net, &shape, 0));
    moe_tensor *t[NET_PARAMS];
    moe_route_net_params(&p->net, t);
    for (int i = 0; i < NET_PARAMS; i++) MOE_TRY(moe_h5_get_array(f, name[i], MOE_H5_F32, ndim[i], sh[i], t[i]->data));
    return MOE_OK;
}

moe_status moe_predictor_load_for(const char *path, const moe_route_fingerprint *fp, const char *model_name,
                                  moe_predictor **out) {
    *out = NULL;
    moe_predictor *p = calloc(1, sizeof *p);
    if (!p) return moe_error(MOE_ERR_OOM, "predictor: out of host memory");
    moe_h5 *f;
    moe_status s = moe_h5_open(path, &f);
    if (s == MOE_OK) {
        s = predictor_get(f, path, fp, model_name, p);
        moe_h5_close(f);
    }
    if (s != MOE_OK) {
        moe_predictor_free(p);
        /* a refusal already names the file; other faults get it in front */
        return s == MOE_ERR_INVALID ? s : moe_error_context(s, "reading predictor %s", path);
    }
    *out = p;
    return MOE_OK;
}

moe_status moe_predictor_load(const char *path, const moe_model *m, moe_predictor **out) {
    moe_route_fingerprint fp;
    MOE_TRY(moe_route_fingerprint_of(m, &fp));
    return moe_predictor_load_for(path, &fp, "this model", out);
}

void moe_predictor_free(moe_predictor *p) {
    if (!p) return;
    if (p->net.embed || p->net.w1) moe_route_net_free(&p->net);
    free(p->model_name);
    free(p);
}

const moe_route_net *moe_predictor_net(const moe_predictor *p) { return &p->net; }

/* Logits of slots [n, C+1] into scores [Lm, n, E] (no gradient, step memory given back). */
static moe_status score_slots(const moe_route_net *net, const int32_t *slots, int64_t n, float *scores) {
    const moe_route_net_shape *s = &net->shape;
    int64_t lm = s->n_moe_layers, E = s->n_experts;
    moe_mem_mark mark = moe_mem_step_mark(MOE_CPU);
    bool grad = moe_grad_set_enabled(false);
    moe_tensor *z = moe_route_net_forward(net, slots, n);
    moe_status st = z ? MOE_OK : moe_last_status();
    if (z) {
        MOE_ASSERT(z->dtype == MOE_F32 && moe_tensor_is_contiguous(z), "route net: logits must be contiguous f32");
        const float *zd = z->data;
        for (int64_t i = 0; i < n; i++)
            for (int64_t l = 0; l < lm; l++) memcpy(scores + (l * n + i) * E, zd + (i * lm + l) * E, sizeof(float) * (size_t)E);
    }
    moe_grad_set_enabled(grad);
    moe_mem_step_release(MOE_CPU, mark);
    return st;
}

/* score_slots for a decode step's few rows, on the calling thread alone: the predictor took
 * 1.76 ms of a batch-8 offloaded decode step on a 16-core GPU machine against 0.02 ms at
 * batch 1, most likely in waking the OpenMP team (idle while the GPU step runs) for each
 * of its small ops. Trace scoring (thousands of rows) keeps the team. */
static moe_status score_step(const moe_route_net *net, const int32_t *slots, int64_t n, float *scores) {
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    moe_status st = score_slots(net, slots, n, scores);
    omp_set_num_threads(threads);
    return st;
}

moe_status moe_predictor_predict(moe_predictor *p, const int32_t *tokens, const int32_t *pos, const int32_t *seq, int n,
                                 const int32_t *rows, int m, float *scores) {
    MOE_ASSERT(n > 0 && m > 0, "predictor: %d rows of a list of %d tokens", m, n);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= p->net.shape.vocab)
            return moe_error(MOE_ERR_INVALID, "predictor: token %d is outside the vocabulary of %d", tokens[i],
                             p->net.shape.vocab);
    const int64_t S = p->net.shape.context + 1;
    int32_t *slots = malloc(sizeof *slots * (size_t)m * (size_t)S);
    if (!slots) return moe_error(MOE_ERR_OOM, "predictor: out of host memory");
    for (int i = 0; i < m; i++) {
        MOE_ASSERT(rows[i] >= 0 && rows[i] < n, "predictor: row %d of a list of %d tokens", rows[i], n);
        moe_route_net_slots(p->net.shape.context, tokens, pos, seq, rows[i], 1, slots + i * S);
    }
    moe_status s = score_step(&p->net, slots, m, scores);
    free(slots);
    return s;
}

moe_status moe_route_net_score_trace(const moe_route_net *net, const moe_trace *t, int64_t first, int64_t count,
                                     float *scores) {
    const int64_t chunk = 4096, S = net->shape.context + 1, lm = net->shape.n_moe_layers, E = net->shape.n_experts;
    MOE_ASSERT(first >= 0 && count >= 0 && first + count <= t->n, "route net: tokens [%lld, +%lld) of %lld",
               (long long)first, (long long)count, (long long)t->n);
    int32_t *slots = malloc(sizeof *slots * (size_t)(chunk * S));
    float *part = malloc(sizeof *part * (size_t)(chunk * lm * E));
    moe_status s = slots && part ? MOE_OK : moe_error(MOE_ERR_OOM, "route net: out of host memory");
    for (int64_t c0 = 0; s == MOE_OK && c0 < count; c0 += chunk) {
        int64_t nc = count - c0 < chunk ? count - c0 : chunk;
        moe_route_net_slots(net->shape.context, t->tokens, t->pos, t->seq, first + c0, nc, slots);
        s = score_slots(net, slots, nc, part);
        for (int64_t l = 0; s == MOE_OK && l < lm; l++)
            memcpy(scores + (l * count + c0) * E, part + l * nc * E, sizeof(float) * (size_t)(nc * E));
    }
    free(slots);
    free(part);
    return s;
}

moe_status moe_route_net_time_token(const moe_route_net *net, int reps, double *seconds) {
    MOE_ASSERT(reps > 0 && net->shape.context < 64, "route net: %d timing reps", reps);
    int32_t slots[65];
    for (int j = 0; j <= net->shape.context; j++) slots[j] = (j * 7919) % net->shape.vocab;
    float *scores = malloc(sizeof *scores * (size_t)net->shape.n_moe_layers * (size_t)net->shape.n_experts);
    double *t = malloc(sizeof *t * (size_t)reps);
    moe_status s = scores && t ? score_step(net, slots, 1, scores) : moe_error(MOE_ERR_OOM, "route net: out of host memory");
    for (int r = 0; s == MOE_OK && r < reps; r++) {
        double t0 = moe_clock_ms();
        s = score_step(net, slots, 1, scores);
        t[r] = (moe_clock_ms() - t0) * 1e-3;
    }
    if (s == MOE_OK) {
        *seconds = moe_median(t, reps);
    }
    free(scores);
    free(t);
    return s;
}
