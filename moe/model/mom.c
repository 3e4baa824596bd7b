/* The Mixture-of-Memories layer and the gated delta net, built from ops (see mom.h). */
#include "moe/model/mom.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "core/ops.h"
#include "moe/model/moe_layer.h"

enum { P_WQ, P_WK, P_WV, P_WB, P_WA, P_ALOG, P_DTB, P_NORM, P_WGATE, P_WO };

moe_mom_settings moe_mom_settings_from_config(const moe_config *cfg, bool gdn) {
    const moe_cfg_model *c = &cfg->model;
    return (moe_mom_settings){
        .d_model = c->d_model,
        .n_memories = gdn ? 0 : c->mom_memories,
        .top_k = gdn ? 0 : c->mom_top_k,
        .shared = gdn || c->mom_shared,
        .n_heads = c->mom_heads,
        .delta = c->mom_update == MOE_CFG_MOM_DELTA,
        .chunk = c->mom_chunk,
        .aux_coef = c->mom_aux_coef,
        .norm_eps = c->norm_eps,
    };
}

/* Names slot i "<prefix>.<what>" and returns the name. */
static const char *slot(moe_mom_layer *L, int i, const char *prefix, const char *what) {
    snprintf(L->names[i], sizeof L->names[i], "%s.%s", prefix, what);
    return L->names[i];
}

/* Marks t (NULL passes through) as the parameter of slot i. */
static moe_tensor *param(moe_mom_layer *L, int i, moe_tensor *t) {
    if (t) moe_param_init(t, L->names[i]);
    return t;
}

static moe_tensor *randn2(moe_mom_layer *L, int i, const char *prefix, const char *what, int64_t rows, int64_t cols,
                          moe_device dev, uint64_t seed, double std) {
    const char *name = slot(L, i, prefix, what);
    return param(L, i, moe_tensor_init_normal(L->s.init, MOE_LIFE_PERSIST, dev, MOE_F32, 2, (int64_t[]){rows, cols},
                                              moe_param_seed(seed, name), 0, std));
}

/* A PERSIST [n] F32 parameter from host values (zeros under MOE_INIT_ZEROS). */
static moe_tensor *vec_param(moe_mom_layer *L, int i, const char *prefix, const char *what, const float *vals,
                             int64_t n, moe_device dev) {
    slot(L, i, prefix, what);
    if (L->s.init == MOE_INIT_ZEROS) return param(L, i, moe_tensor_zeros(MOE_LIFE_PERSIST, dev, MOE_F32, 1, &n));
    return param(L, i, moe_tensor_from_host(MOE_LIFE_PERSIST, dev, MOE_F32, 1, &n, vals));
}

moe_status moe_mom_layer_init(moe_mom_layer *L, const moe_mom_settings *s, const char *prefix, moe_device dev,
                              uint64_t seed, double init_std) {
    memset(L, 0, sizeof *L);
    L->s = *s;
    if (s->n_heads < 1 || s->d_model % s->n_heads || s->n_memories < 0 || (s->n_memories == 0 && !s->shared) ||
        (s->n_memories > 0 && (s->top_k < 1 || s->top_k > s->n_memories)) || s->chunk < 1)
        return moe_error(MOE_ERR_CONFIG,
                         "%s: bad MoM settings (d_model=%d heads=%d memories=%d top_k=%d shared=%d chunk=%d): heads "
                         "must divide d_model, 1 <= top_k <= memories, and some memory must exist",
                         prefix, s->d_model, s->n_heads, s->n_memories, s->top_k, (int)s->shared, s->chunk);
    L->n_mem = s->n_memories + (s->shared ? 1 : 0);
    const int64_t d = s->d_model, H = s->n_heads, hd = d / H, P = L->n_mem;
    L->w_q = randn2(L, P_WQ, prefix, "w_q", d, H * hd, dev, seed, init_std);
    L->w_k = randn2(L, P_WK, prefix, "w_k", d, P * H * hd, dev, seed, init_std);
    L->w_v = randn2(L, P_WV, prefix, "w_v", d, P * H * hd, dev, seed, init_std);
    L->w_b = randn2(L, P_WB, prefix, "w_b", d, P * H, dev, seed, init_std);
    L->w_a = randn2(L, P_WA, prefix, "w_a", d, P * H, dev, seed, init_std);
    L->w_gate = randn2(L, P_WGATE, prefix, "w_gate", d, H * hd, dev, seed, init_std);
    L->w_o = randn2(L, P_WO, prefix, "w_o", H * hd, d, dev, seed, init_std);
    /* Decay per head spread as in the Mamba-2 / gated delta net initialisation, but
     * deterministic: A = 1..16 and dt = 1e-3..1e-1 log-spaced, dt_bias = softplus^-1(dt). */
    float alog[256], dtb[256], ones[1024];
    if (H > 256 || hd > 1024) return moe_error(MOE_ERR_CONFIG, "%s: at most 256 heads of width <= 1024", prefix);
    for (int64_t h = 0; h < H; h++) {
        double f = ((double)h + 0.5) / (double)H, dt = exp(log(1e-3) + f * (log(1e-1) - log(1e-3)));
        alog[h] = (float)log(1.0 + 15.0 * f);
        dtb[h] = (float)(dt + log(-expm1(-dt)));
    }
    for (int64_t j = 0; j < hd; j++) ones[j] = 1.0f;
    L->a_log = vec_param(L, P_ALOG, prefix, "A_log", alog, H, dev);
    L->dt_bias = vec_param(L, P_DTB, prefix, "dt_bias", dtb, H, dev);
    L->norm = vec_param(L, P_NORM, prefix, "norm", ones, hd, dev);
    moe_tensor *all[] = {L->w_q, L->w_k, L->w_v, L->w_b, L->w_a, L->a_log, L->dt_bias, L->norm, L->w_gate, L->w_o};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        if (!all[i]) return moe_last_status();
    if (s->n_memories > 0) {
        char rname[112];
        snprintf(rname, sizeof rname, "%s.router", prefix);
        moe_router_settings rs = {.n_experts = s->n_memories, .top_k = s->top_k, .d_model = s->d_model,
                                  .balance = MOE_BALANCE_SWITCH, .aux_coef = s->aux_coef, .renormalize = true,
                                  .init = s->init};
        MOE_TRY(moe_router_init(&L->router, &rs, dev, MOE_F32, rname, moe_param_seed(seed, rname), init_std));
    }
    return MOE_OK;
}

void moe_mom_layer_free(moe_mom_layer *L) {
    moe_tensor *ts[] = {L->w_q, L->w_k, L->w_v, L->w_b, L->w_a, L->a_log, L->dt_bias, L->norm, L->w_gate, L->w_o};
    for (size_t i = 0; i < sizeof ts / sizeof *ts; i++) moe_tensor_free(ts[i]);
    if (L->s.n_memories > 0) moe_router_free(&L->router);
    memset(L, 0, sizeof *L);
}

int moe_mom_layer_params(const moe_mom_layer *L, moe_tensor **ts, const char **names, int cap) {
    moe_tensor *all[] = {L->w_q, L->w_k, L->w_v, L->w_b, L->w_a, L->a_log, L->dt_bias, L->norm, L->w_gate, L->w_o};
    int n = 0;
    for (int i = 0; i < (int)(sizeof all / sizeof *all) && n < cap; i++, n++) {
        ts[n] = all[i];
        names[n] = L->names[i];
    }
    if (L->s.n_memories > 0 && n < cap) n += moe_router_params(&L->router, ts + n, names + n, cap - n);
    return n;
}

moe_tensor *moe_mom_state_zeros(const moe_mom_layer *L, int64_t batch, moe_dtype compute, moe_device dev,
                                moe_lifetime life) {
    int64_t hd = L->s.d_model / L->s.n_heads;
    return moe_tensor_zeros(life, dev, compute == MOE_F64 ? MOE_F64 : MOE_F32, 4,
                            (int64_t[]){batch * L->n_mem, L->s.n_heads, hd, hd});
}

/* A STEP tensor of ones. */
static moe_tensor *ones(moe_device dev, moe_dtype dt, int ndim, const int64_t *shape) {
    moe_tensor *t = moe_tensor_empty(MOE_LIFE_STEP, dev, dt, ndim, shape);
    return t && moe_tensor_fill(t, 1.0) == MOE_OK ? t : NULL;
}

/* x / sqrt(sum(x^2) + hd eps) over the last axis: RMSNorm with a constant weight
 * 1/sqrt(hd) (one op and one activation, no separate scaling pass). */
static moe_tensor *l2norm(moe_tensor *x, int64_t hd) {
    if (!x) return NULL;
    moe_tensor *w = moe_tensor_empty(MOE_LIFE_STEP, x->device, x->dtype, 1, &hd);
    if (!w || moe_tensor_fill(w, 1.0 / sqrt((double)hd)) != MOE_OK) return NULL;
    return moe_rmsnorm(x, w, 1e-6);
}

/* [B, T, P, ...rest] -> [B * P, T, ...rest] (memory-major buckets per sequence). */
static moe_tensor *to_buckets(moe_tensor *x, int64_t B, int64_t T, int64_t P) {
    if (!x) return NULL;
    int perm[MOE_MAX_DIMS] = {0, 2, 1, 3, 4, 5};
    int64_t shape[MOE_MAX_DIMS] = {B * P, T};
    for (int i = 3; i < x->ndim; i++) shape[i - 1] = x->shape[i];
    return moe_reshape(moe_permute(x, perm), x->ndim - 1, shape);
}

/* Runs the router over the M routed memories (no-op without them: r zeroed); the
 * inference form selects alone (no balance loss). */
static moe_status route(moe_mom_layer *L, moe_tensor *x2, bool infer, moe_mom_result *res, moe_routing *r) {
    memset(r, 0, sizeof *r);
    if (L->s.n_memories == 0) return MOE_OK;
    MOE_TRY(infer ? moe_router_select(&L->router, moe_router_logits(&L->router, x2, NULL, NULL), r)
                  : moe_router_forward(&L->router, x2, NULL, r));
    res->aux_loss = r->aux_loss;
    res->load = r->load;
    return MOE_OK;
}

/* Router gates and the routed mask of the inference form as dense [B T, P] tensors (the
 * shared memory's column is 1 in both). */
static moe_status dense_gates(const moe_mom_layer *L, const moe_routing *r, int64_t BT, moe_dtype compute,
                              moe_device dev, moe_tensor **gate, moe_tensor **mask) {
    const int M = L->s.n_memories, k = L->s.top_k;
    moe_tensor *z1 = moe_tensor_zeros(MOE_LIFE_STEP, dev, compute, 2, (int64_t[]){BT, M});
    moe_tensor *z2 = moe_tensor_zeros(MOE_LIFE_STEP, dev, compute, 2, (int64_t[]){BT, M});
    moe_tensor *g = moe_scatter_add(z1, r->experts, moe_cast(r->gates, compute));
    bool was = moe_grad_set_enabled(false);
    moe_tensor *m = moe_scatter_add(z2, r->experts, ones(dev, compute, 2, (int64_t[]){BT, k}));
    moe_grad_set_enabled(was);
    if (L->s.shared) {
        moe_tensor *one = ones(dev, compute, 2, (int64_t[]){BT, 1});
        g = moe_concat((moe_tensor *[]){g, one}, 2, 1);
        m = moe_concat((moe_tensor *[]){m, one}, 2, 1);
    }
    *gate = g;
    *mask = m;
    return g && m ? MOE_OK : moe_last_status();
}

/* The projections of one layer call, [B, T, ...] in the compute dtype: q [B, T, H, hd]
 * (shared by the memories), per memory k, v [B, T, P, H, hd], beta, alpha [B, T, P, H];
 * the routing over the M routed memories (zeroed without them). */
typedef struct {
    int64_t B, T;
    moe_tensor *q, *k, *v, *beta, *alpha;
    moe_routing r;
} mom_inputs;

/* Inference form: every (sequence, memory) bucket steps from its state; tokens not routed to
 * a memory leave its state unchanged (delta rule: beta = 0; gated linear attention: k = 0;
 * both alpha = 1). Returns sum_m g_m o^m, [B, T, H, hd]. */
static moe_tensor *dense_memories(moe_mom_layer *L, const mom_inputs *in, moe_dtype compute, moe_tensor *state,
                                  moe_tensor **state_out) {
    const int64_t B = in->B, T = in->T, H = L->s.n_heads, hd = L->s.d_model / H, P = L->n_mem;
    moe_dtype sdt = compute == MOE_F64 ? MOE_F64 : MOE_F32;
    if (state->ndim != 4 || state->shape[0] != B * P || state->dtype != sdt) {
        char got[160];
        moe_error(MOE_ERR_INVALID, "mom layer: the recurrent state must be [%lld, %lld, %lld, %lld] %s, got %s",
                  (long long)(B * P), (long long)H, (long long)hd, (long long)hd, moe_dtype_name(sdt),
                  moe_tensor_describe(state, got, sizeof got));
        return NULL;
    }
    moe_tensor *k = in->k, *beta = in->beta, *alpha = in->alpha, *gate = NULL, *mask;
    if (L->s.n_memories > 0) {
        if (dense_gates(L, &in->r, B * T, compute, in->q->device, &gate, &mask) != MOE_OK) return NULL;
        if (L->s.delta) beta = moe_mul(beta, moe_reshape(mask, 4, (int64_t[]){B, T, P, 1}));
        else k = moe_mul(k, moe_reshape(mask, 5, (int64_t[]){B, T, P, 1, 1}));
        alpha = moe_add_scalar(moe_mul(moe_add_scalar(alpha, -1.0), moe_reshape(mask, 4, (int64_t[]){B, T, P, 1})),
                               1.0);
    }
    moe_tensor *qn = in->q;
    if (P > 1)
        qn = moe_reshape(moe_mul(moe_reshape(in->q, 5, (int64_t[]){B, 1, T, H, hd}),
                                 ones(in->q->device, compute, 5, (int64_t[]){1, P, 1, 1, 1})),
                         4, (int64_t[]){B * P, T, H, hd});
    moe_tensor *o = moe_delta_scan(qn, to_buckets(k, B, T, P), to_buckets(in->v, B, T, P), to_buckets(beta, B, T, P),
                                   to_buckets(alpha, B, T, P), state, L->s.delta, state_out);
    moe_tensor *o5 = moe_reshape(o, 5, (int64_t[]){B, P, T, H, hd});
    if (gate)
        o5 = moe_mul(o5, moe_reshape(moe_permute(moe_reshape(gate, 3, (int64_t[]){B, T, P}), (int[]){0, 2, 1}), 5,
                                     (int64_t[]){B, P, T, 1, 1}));
    return P > 1 ? moe_sum(o5, 1, false) : moe_reshape(o5, 4, (int64_t[]){B, T, H, hd});
}

/* Where the training form gathers the routed memories' inputs: for routed memory m and
 * sequence b, the tokens routed to m in time order, padded to the longest such run T_r
 * (padding repeats the sequence's first token with pad 0). tok [M B T_r] I32: the token's
 * row b T + t; mem [M B T_r] I32: its row (b T + t) P + m in the [B T P, ...] views of the
 * per-memory projections; slot [M B T_r] I32: its routing slot (row k + j, the row of the
 * gates seen as [B T k, 1]); pad [M B T_r, 1] (compute dtype): 1 or 0. */
typedef struct {
    int64_t T_r;
    moe_tensor *tok, *mem, *slot, *pad;
} mom_plan;

static moe_status mom_plan_make(const moe_mom_layer *L, const moe_routing *r, int64_t B, int64_t T, moe_dtype compute,
                                moe_device dev, mom_plan *pl) {
    const int64_t M = L->s.n_memories, k = L->s.top_k, P = L->n_mem;
    int64_t *count = moe_step_host_alloc(sizeof(int64_t) * (size_t)(M * B)), T_r = 1;
    if (!count) return moe_error(MOE_ERR_OOM, "mom layer: out of host memory for the routing plan");
    memset(count, 0, sizeof(int64_t) * (size_t)(M * B));
    for (int64_t i = 0; i < B * T * k; i++)
        if (!r->valid || r->valid[i]) count[r->host_experts[i] * B + i / k / T]++;
    for (int64_t j = 0; j < M * B; j++) T_r = count[j] > T_r ? count[j] : T_r;
    const int64_t n = M * B * T_r;
    int32_t *tok = moe_step_host_alloc(sizeof(int32_t) * (size_t)(3 * n));
    float *pad = moe_step_host_alloc(sizeof(float) * (size_t)n);
    if (!tok || !pad) return moe_error(MOE_ERR_OOM, "mom layer: out of host memory for the routing plan");
    int32_t *mem = tok + n, *slot = mem + n;
    for (int64_t j = 0; j < n; j++) { /* padding first: row b T of each bucket */
        const int64_t m = j / (B * T_r), b = j / T_r % B;
        tok[j] = (int32_t)(b * T), mem[j] = (int32_t)(b * T * P + m), slot[j] = (int32_t)(b * T * k), pad[j] = 0.0f;
    }
    memset(count, 0, sizeof(int64_t) * (size_t)(M * B));
    for (int64_t i = 0; i < B * T * k; i++) { /* tokens in time order within each sequence */
        if (r->valid && !r->valid[i]) continue;
        const int64_t row = i / k, m = r->host_experts[i], b = row / T, j = (m * B + b) * T_r + count[m * B + b]++;
        tok[j] = (int32_t)row, mem[j] = (int32_t)(row * P + m), slot[j] = (int32_t)i, pad[j] = 1.0f;
    }
    pl->T_r = T_r;
    pl->tok = moe_tensor_from_host(MOE_LIFE_STEP, dev, MOE_I32, 1, &n, tok);
    pl->mem = moe_tensor_from_host(MOE_LIFE_STEP, dev, MOE_I32, 1, &n, mem);
    pl->slot = moe_tensor_from_host(MOE_LIFE_STEP, dev, MOE_I32, 1, &n, slot);
    pl->pad = moe_cast(moe_tensor_from_host(MOE_LIFE_STEP, dev, MOE_F32, 2, (int64_t[]){n, 1}, pad), compute);
    return pl->tok && pl->mem && pl->slot && pl->pad ? MOE_OK : moe_last_status();
}

/* Rows idx of x seen as [rows, cols], shaped `shape`. */
static moe_tensor *pick(moe_tensor *x, int64_t rows, int64_t cols, moe_tensor *idx, int ndim, const int64_t *shape) {
    return moe_reshape(moe_index_select(moe_reshape(x, 2, (int64_t[]){rows, cols}), idx), ndim, shape);
}

/* Training form, routed memories: each (memory, sequence) bucket holds only the tokens
 * routed to it (mom_plan), scanned from a zero state by the chunked form; the padding steps
 * change nothing (delta rule: beta = 0; gated linear attention: k = 0; both alpha = 1) and
 * their outputs are weighted 0. Returns sum_{m in topk} g_m o^m, [B T, H hd]. */
static moe_tensor *routed_memories(moe_mom_layer *L, const mom_inputs *in, const mom_plan *pl, moe_dtype compute) {
    const int64_t H = L->s.n_heads, hd = L->s.d_model / H, P = L->n_mem, BT = in->B * in->T;
    const int64_t N = L->s.n_memories * in->B, Tr = pl->T_r;
    const int64_t s4[] = {N, Tr, H, hd}, s3[] = {N, Tr, H};
    moe_tensor *k = pick(in->k, BT * P, H * hd, pl->mem, 4, s4), *beta = pick(in->beta, BT * P, H, pl->mem, 3, s3);
    moe_tensor *alpha = pick(in->alpha, BT * P, H, pl->mem, 3, s3);
    moe_tensor *pad3 = moe_reshape(pl->pad, 3, (int64_t[]){N, Tr, 1});
    if (L->s.delta) beta = moe_mul(beta, pad3);
    else k = moe_mul(k, moe_reshape(pl->pad, 4, (int64_t[]){N, Tr, 1, 1}));
    alpha = moe_add_scalar(moe_mul(moe_add_scalar(alpha, -1.0), pad3), 1.0);
    moe_tensor *o = moe_delta_scan_chunked(pick(in->q, BT, H * hd, pl->tok, 4, s4), k,
                                           pick(in->v, BT * P, H * hd, pl->mem, 4, s4), beta, alpha, NULL, L->s.delta,
                                           L->s.chunk, NULL);
    moe_tensor *gates = moe_reshape(moe_cast(in->r.gates, compute), 2, (int64_t[]){BT * L->s.top_k, 1});
    moe_tensor *g = moe_mul(moe_index_select(gates, pl->slot), pl->pad);
    moe_tensor *acc = moe_tensor_zeros(MOE_LIFE_STEP, in->q->device, compute, 2, (int64_t[]){BT, H * hd});
    return moe_index_add(acc, pl->tok, moe_mul(moe_reshape(o, 2, (int64_t[]){N * Tr, H * hd}), g));
}

/* Memory m's slice of a [B, T, P, ...] projection as a contiguous [B, T, ...rest] tensor. */
static moe_tensor *memory_slice(moe_tensor *x, int64_t m, int ndim, const int64_t *shape) {
    if (!x) return NULL;
    return moe_reshape(x->shape[2] == 1 ? x : moe_contiguous(moe_slice(x, 2, m, m + 1)), ndim, shape);
}

/* Training form, the shared memory (index n_memories): every token, from a zero state. */
static moe_tensor *shared_memory(moe_mom_layer *L, const mom_inputs *in) {
    const int64_t B = in->B, T = in->T, H = L->s.n_heads, hd = L->s.d_model / H, m = L->s.n_memories;
    const int64_t s4[] = {B, T, H, hd}, s3[] = {B, T, H};
    return moe_delta_scan_chunked(in->q, memory_slice(in->k, m, 4, s4), memory_slice(in->v, m, 4, s4),
                                  memory_slice(in->beta, m, 3, s3), memory_slice(in->alpha, m, 3, s3), NULL,
                                  L->s.delta, L->s.chunk, NULL);
}

/* Training form: sum_{m in topk} g_m o^m (+ the shared memory's o), [B, T, H, hd]. */
static moe_tensor *trained_memories(moe_mom_layer *L, const mom_inputs *in, moe_dtype compute) {
    const int64_t B = in->B, T = in->T, H = L->s.n_heads, hd = L->s.d_model / H;
    moe_tensor *routed = NULL, *shared = L->s.shared ? shared_memory(L, in) : NULL;
    if (L->s.n_memories > 0) {
        mom_plan pl = {0};
        if (mom_plan_make(L, &in->r, B, T, compute, in->q->device, &pl) != MOE_OK) return NULL;
        routed = moe_reshape(routed_memories(L, in, &pl, compute), 4, (int64_t[]){B, T, H, hd});
        if (!routed) return NULL;
    }
    return routed && L->s.shared ? moe_add(routed, shared) : routed ? routed : shared;
}

moe_tensor *moe_mom_layer_forward(moe_mom_layer *L, moe_tensor *x, moe_dtype compute, moe_tensor *state,
                                  moe_tensor **state_out, moe_mom_result *res) {
    memset(res, 0, sizeof *res);
    if (!x) return NULL;
    MOE_ASSERT(x->ndim == 3 && x->shape[2] == L->s.d_model, "mom layer: x must be [B, T, %d]", L->s.d_model);
    const int64_t B = x->shape[0], T = x->shape[1], d = L->s.d_model, H = L->s.n_heads, hd = d / H, P = L->n_mem;
#define CP(t) moe_cast((t), compute)
    moe_tensor *x2 = moe_reshape(x, 2, (int64_t[]){B * T, d});
    mom_inputs in = {.B = B, .T = T};
    if (!x2 || route(L, x2, state != NULL, res, &in.r) != MOE_OK) return NULL;
    in.q = l2norm(moe_reshape(moe_matmul(x2, CP(L->w_q)), 4, (int64_t[]){B, T, H, hd}), hd);
    in.k = l2norm(moe_reshape(moe_matmul(x2, CP(L->w_k)), 5, (int64_t[]){B, T, P, H, hd}), hd);
    in.v = moe_reshape(moe_matmul(x2, CP(L->w_v)), 5, (int64_t[]){B, T, P, H, hd});
    in.beta = moe_sigmoid(moe_reshape(moe_matmul(x2, CP(L->w_b)), 4, (int64_t[]){B, T, P, H}));
    moe_tensor *dt = moe_softplus(moe_add(moe_reshape(moe_matmul(x2, CP(L->w_a)), 4, (int64_t[]){B, T, P, H}),
                                          CP(L->dt_bias)));
    in.alpha = moe_exp(moe_neg(moe_mul(dt, moe_exp(CP(L->a_log)))));
    if (!in.q || !in.k || !in.v || !in.beta || !in.alpha) return NULL;
    moe_tensor *os = state ? dense_memories(L, &in, compute, state, state_out) : trained_memories(L, &in, compute);
    moe_tensor *gt = moe_silu(moe_reshape(moe_matmul(x2, CP(L->w_gate)), 4, (int64_t[]){B, T, H, hd}));
    moe_tensor *y = moe_mul(moe_rmsnorm(os, CP(L->norm), L->s.norm_eps), gt);
    return moe_reshape(moe_matmul(moe_reshape(y, 2, (int64_t[]){B * T, d}), CP(L->w_o)), 3, (int64_t[]){B, T, d});
#undef CP
}
