/* The benchmark cases of `moe bench` (see bench.h): build the case, time its phases,
 * write one line per figure. */
#include "moe/bench/bench.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/device.h"
#include "core/fileio.h"
#include "core/memory.h"
#include "core/ops.h"
#include "moe/model/model.h"
#include "moe/model/moe_layer.h"
#include "optim/optim.h"
#ifdef MOE_HAVE_CUDA
#include "core/cuda_info.h"
#endif

#define H200_BF16_PEAK 790e12 /* measured cuBLAS bf16 GEMM rate: the MFU denominator (results/README.md) */
#define AUX_ALPHA 0.01        /* Switch balance loss weight, as bench_reference.py */
#define INIT_STD 0.02

typedef enum bench_kind { KIND_LAYER, KIND_LM, KIND_GEMM, KIND_INDEX_ADD, KIND_SCAN } bench_kind;

/* Shapes exactly as results/README.md's table (and bench_reference.py's CASES). */
typedef struct bench_case {
    const char *name;
    bench_kind kind;
    moe_device dev;
    int V, d, L, H, E, k, f, B, S; /* LM: all; layer: d, E, k, f and T in S; index_add: V, d, rows in S;
                                    * scan: B sequences of S steps, H heads of width d */
} bench_case;

static const bench_case CASES[] = {
    {"moe-layer-cpu", KIND_LAYER, MOE_CPU, .d = 256, .f = 704, .E = 8, .k = 2, .S = 4096},
    {"lm-step-cpu", KIND_LM, MOE_CPU, .V = 256, .d = 256, .L = 4, .H = 4, .E = 8, .k = 2, .f = 704, .B = 8, .S = 256},
    {"moe-layer-gpu", KIND_LAYER, MOE_CUDA, .d = 1024, .f = 2816, .E = 8, .k = 2, .S = 16384},
    {"moe-layer-gpu-fine", KIND_LAYER, MOE_CUDA, .d = 2048, .f = 1408, .E = 64, .k = 6, .S = 16384},
    {"lm-train-gpu", KIND_LM, MOE_CUDA, .V = 32768, .d = 1024, .L = 8, .H = 16, .E = 8, .k = 2, .f = 2816, .B = 16,
     .S = 1024},
    {"sgemm", KIND_GEMM, MOE_CPU}, /* n = 2048 f32 on the CPU, 8192 bf16 on cuda */
    {"index-add-gpu", KIND_INDEX_ADD, MOE_CUDA, .V = 256, .d = 768, .S = 16384}, /* the byte-vocab embedding backward */
    /* the gated delta scan of a MoM layer of configs/ablate-gpu.yaml: 32 sequences x (4 memories + shared) */
    {"scan-gpu", KIND_SCAN, MOE_CUDA, .d = 128, .H = 4, .B = 160, .S = 512},
};
#define N_CASES ((int)(sizeof CASES / sizeof *CASES))

void moe_bench_case_list(char *buf, size_t cap) {
    MOE_ASSERT(cap > 0, "moe_bench_case_list needs room");
    size_t n = 0;
    buf[0] = '\0';
    for (int i = 0; i < N_CASES && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%s", i ? ", " : "", CASES[i].name);
}

moe_bench_options moe_bench_options_default(void) {
    return (moe_bench_options){.device = -1, .dtype = -1, .warmup = 3, .reps = 10, .threads = 0, .scale = 1,
                               .json = true, .out = stdout};
}

/* LM cases: the train.recompute list asked for, or NULL for none. */
static const char *recompute_list(const moe_bench_options *o) {
    return o->recompute && strcmp(o->recompute, "none") ? o->recompute : NULL;
}

/* ---- timing and output ---- */

typedef struct bench_run {
    const bench_case *c;
    const moe_bench_options *o;
    moe_device dev;
    moe_dtype dt;
    int64_t T; /* layer tokens, after scale */
    int B;     /* LM batch, after scale */
    int n;     /* sgemm size, after scale */
} bench_run;

/* One phase: `prepare` runs untimed before each rep, `body` is timed up to the device sync. */
typedef struct bench_phase {
    const char *name;
    moe_status (*prepare)(void *ctx);
    moe_status (*body)(void *ctx);
    void *ctx;
    int64_t flops;
    int64_t tokens, active_params; /* LM only (0 otherwise) */
    int64_t bytes;                 /* memory an ideal kernel moves: GB/s printed when > 0 */
} bench_phase;

/* Median without disturbing the samples (they are printed in order). */
static double median(const double *v, int n) {
    double *s = malloc(sizeof *s * (size_t)n);
    MOE_ASSERT(s, "out of host memory sorting %d timings", n);
    memcpy(s, v, sizeof *s * (size_t)n);
    double m = moe_median(s, n);
    free(s);
    return m;
}

static moe_status run_once(const bench_run *r, const bench_phase *p, double *ms) {
    if (p->prepare) MOE_TRY(p->prepare(p->ctx));
    MOE_TRY(moe_device_sync(r->dev));
    double t0 = moe_clock_ms();
    MOE_TRY(p->body(p->ctx));
    MOE_TRY(moe_device_sync(r->dev));
    *ms = moe_clock_ms() - t0;
    return MOE_OK;
}

static void write_figure(const bench_run *r, const bench_phase *p, const double *ms_all) {
    const moe_bench_options *o = r->o;
    FILE *f = o->out;
    double ms = median(ms_all, o->reps), rate = (double)p->flops / (ms * 1e-3);
    moe_mem_stats st = moe_mem_get_stats(r->dev);
    size_t peak = st.persist_peak + st.step_peak;
    if (!o->json) {
        fprintf(f, "%-20s %-8s %10.3f ms  %9.2f GFLOP/s  peak %8.1f MiB  %s %s, %d threads", r->c->name, p->name, ms,
                rate / 1e9, peak / 1048576.0, moe_device_name(r->dev), moe_dtype_name(r->dt), omp_get_max_threads());
        if (p->tokens) fprintf(f, "  %.1f tokens/s", (double)p->tokens / (ms * 1e-3));
        if (p->tokens && recompute_list(o)) fprintf(f, "  recompute %s", recompute_list(o));
        if (p->tokens && r->dev == MOE_CUDA) fprintf(f, "  MFU %.4f", rate / H200_BF16_PEAK);
        if (p->bytes) fprintf(f, "  %.1f GB/s", (double)p->bytes / (ms * 1e-3) / 1e9);
        fputc('\n', f);
        fflush(f);
        return;
    }
    fprintf(f, "{\"case\":\"%s\",\"phase\":\"%s\",\"ms\":%.4f,\"ms_all\":[", r->c->name, p->name, ms);
    for (int i = 0; i < o->reps; i++) fprintf(f, "%s%.4f", i ? "," : "", ms_all[i]);
    fprintf(f, "],\"flops\":%lld,\"gflops_per_s\":%.2f,\"peak_bytes\":%zu,\"peak_kind\":\"step_arena+persist\","
               "\"step_peak_bytes\":%zu,\"step_capacity_bytes\":%zu,"
               "\"device\":\"%s\",\"dtype\":\"%s\",\"threads\":%d,\"warmup\":%d,\"reps\":%d,\"scale\":%d,"
               "\"impl\":\"moe\",\"version\":\"%s\"",
            (long long)p->flops, rate / 1e9, peak, st.step_peak, st.step_capacity, moe_device_name(r->dev), moe_dtype_name(r->dt),
            omp_get_max_threads(), o->warmup, o->reps, o->scale, MOE_VERSION);
    if (r->c->kind == KIND_GEMM) fprintf(f, ",\"n\":%d", r->n);
    if (p->bytes) fprintf(f, ",\"bytes\":%lld,\"gb_per_s\":%.2f", (long long)p->bytes, (double)p->bytes / (ms * 1e-3) / 1e9);
    if (p->tokens) {
        fprintf(f, ",\"tokens\":%lld,\"active_matmul_params\":%lld,\"tokens_per_s\":%.1f", (long long)p->tokens,
                (long long)p->active_params, (double)p->tokens / (ms * 1e-3));
        fprintf(f, ",\"recompute\":\"%s\"", recompute_list(o) ? recompute_list(o) : "none");
        if (r->dev == MOE_CUDA) fprintf(f, ",\"mfu\":%.4f", rate / H200_BF16_PEAK);
    }
#ifdef MOE_HAVE_CUDA
    if (r->dev == MOE_CUDA) {
        /* The description is plain text from the driver; drop any character JSON would need escaped. */
        fputs(",\"gpu\":\"", f);
        for (const char *s = moe_cuda_describe(); *s; s++)
            if (*s != '"' && *s != '\\' && (unsigned char)*s >= 0x20) fputc(*s, f);
        fputc('"', f);
    }
#endif
    fputs("}\n", f);
    fflush(f);
}

static moe_status run_phases(const bench_run *r, const bench_phase *phases, int n) {
    double *ms_all = malloc(sizeof *ms_all * (size_t)r->o->reps);
    if (!ms_all) return moe_error(MOE_ERR_OOM, "moe bench: out of host memory for %d timings", r->o->reps);
    moe_status s = MOE_OK;
    for (int i = 0; i < n && s == MOE_OK; i++) {
        double ms = 0;
        for (int w = 0; w < r->o->warmup && s == MOE_OK; w++) s = run_once(r, &phases[i], &ms);
        char title[96];
        snprintf(title, sizeof title, "warm-up of %s %s", r->c->name, phases[i].name);
        moe_profile_report(title);
        for (int k = 0; k < r->o->reps && s == MOE_OK; k++) s = run_once(r, &phases[i], &ms_all[k]);
        snprintf(title, sizeof title, "%s %s, %d reps", r->c->name, phases[i].name, r->o->reps);
        moe_profile_report(title);
        if (s == MOE_OK) write_figure(r, &phases[i], ms_all);
        else moe_error_context(s, "moe bench %s, phase %s", r->c->name, phases[i].name);
    }
    free(ms_all);
    moe_step_reset();
    return s;
}

static moe_status step_reset_prepare(void *p) {
    (void)p;
    moe_step_reset();
    return MOE_OK;
}

/* ---- the MoE layer alone ---- */

typedef struct layer_ctx {
    moe_moe_layer layer;
    moe_tensor *x, *r; /* [T, d] inputs (x requires grad) and the fixed loss weights */
    moe_tensor *params[4];
    moe_dtype dt;
} layer_ctx;

static moe_status layer_prepare(void *p) {
    layer_ctx *c = p;
    moe_step_reset();
    return moe_zero_grad(c->params, 4);
}

static moe_status layer_forward(void *p) {
    layer_ctx *c = p;
    bool was = moe_grad_set_enabled(false);
    moe_moe_layer_result res;
    moe_tensor *y = moe_moe_layer_forward(&c->layer, c->x, NULL, c->dt, &res);
    moe_grad_set_enabled(was);
    return y ? MOE_OK : moe_last_status();
}

static moe_status layer_forward_backward(void *p) {
    layer_ctx *c = p;
    moe_moe_layer_result res;
    moe_tensor *y = moe_moe_layer_forward(&c->layer, c->x, NULL, c->dt, &res);
    moe_tensor *loss = moe_sum_all(moe_mul(y, c->r));
    return loss ? moe_backward_freeing(loss) : moe_last_status();
}

/* The expert weights as `dt` parameters, as the reference holds them (moe.to(dtype)):
 * no per-step casts of f32 masters in a layer benchmark. */
static moe_status layer_experts_to(moe_moe_layer *L, moe_dtype dt) {
    for (int g = 0; g < L->n_groups; g++) {
        moe_expert_group *G = &L->groups[g];
        moe_tensor **w[2] = {&G->w13, &G->w2};
        const char *names[2] = {G->name_w13, G->name_w2};
        for (int i = 0; i < 2; i++) {
            if ((*w[i])->dtype == dt) continue;
            moe_tensor *c = moe_tensor_empty(MOE_LIFE_PERSIST, (*w[i])->device, dt, (*w[i])->ndim, (*w[i])->shape);
            if (!c) return moe_last_status();
            MOE_TRY(moe_tensor_copy_(c, *w[i]));
            moe_param_init(c, names[i]);
            moe_tensor_free(*w[i]);
            *w[i] = c;
        }
    }
    L->w13 = L->groups[0].w13;
    L->w2 = L->groups[0].w2;
    return MOE_OK;
}

static moe_status bench_layer(const bench_run *r) {
    const bench_case *k = r->c;
    moe_moe_layer_settings s = {
        .d_model = k->d, .n_experts = k->E, .top_k = k->k, .ffn_dim = k->f, .capacity_factor = 0,
        .router = {.n_experts = k->E, .top_k = k->k, .d_model = k->d, .balance = MOE_BALANCE_SWITCH,
                   .aux_coef = AUX_ALPHA, .renormalize = true},
    };
    layer_ctx c = {.dt = r->dt};
    moe_status st = moe_moe_layer_init(&c.layer, &s, "bench", r->dev, 0, INIT_STD, 0, k->E);
    if (st == MOE_OK) st = layer_experts_to(&c.layer, r->dt);
    if (st != MOE_OK) return st;
    int64_t shape[2] = {r->T, k->d};
    c.x = moe_tensor_randn(MOE_LIFE_PERSIST, r->dev, r->dt, 2, shape, 1, 0, 1.0);
    c.r = moe_tensor_randn(MOE_LIFE_PERSIST, r->dev, r->dt, 2, shape, 2, 0, 1.0);
    if (c.x && c.r) {
        c.x->requires_grad = c.x->is_param = true; /* dX is computed, as in a real stack */
        c.params[0] = c.x;
        c.params[1] = c.layer.w13;
        c.params[2] = c.layer.w2;
        c.params[3] = c.layer.router.w_gate;
        int64_t flops = 2 * r->T * k->k * 3 * (int64_t)k->d * k->f; /* SwiGLU experts only; router excluded */
        bench_phase phases[] = {
            {"fwd", layer_prepare, layer_forward, &c, flops, 0, 0},
            {"fwd_bwd", layer_prepare, layer_forward_backward, &c, 3 * flops, 0, 0},
        };
        st = run_phases(r, phases, 2);
    } else {
        st = moe_last_status();
    }
    moe_tensor_free(c.x);
    moe_tensor_free(c.r);
    moe_moe_layer_free(&c.layer);
    return st;
}

/* ---- one whole training step of the language model ---- */

typedef struct lm_ctx {
    moe_model model;
    moe_optimizer *opt;
    moe_tensor **params;
    int n_params;
    int32_t *inputs, *targets; /* [B, S] host */
    int B, S;
} lm_ctx;


static moe_status lm_step(void *p) {
    lm_ctx *c = p;
    moe_loss_parts parts;
    MOE_TRY(moe_model_loss(&c->model, c->inputs, c->targets, c->B, c->S, &parts));
    MOE_TRY(moe_backward_freeing(parts.loss));
    double norm = 0, scale = 1;
    MOE_TRY(moe_clip_grad_norm(c->params, c->n_params, 1.0, &norm, &scale));
    MOE_TRY(moe_optimizer_step(c->opt, 1e-3, scale));
    return moe_optimizer_zero_grad(c->opt);
}

/* FLOPs of one step as bench_reference.py's lm_flops: 6 * active matmul params * tokens
 * + 6 * L * B * S^2 * d (causal attention, forward + backward). */
static int64_t lm_flops(const bench_case *k, int B, int64_t *active) {
    int64_t d = k->d, per_layer = 4 * d * d + d * k->E + (int64_t)k->k * 3 * d * k->f;
    *active = k->L * per_layer + (int64_t)k->V * d;
    int64_t tokens = (int64_t)B * k->S;
    return 6 * *active * tokens + 6 * (int64_t)k->L * B * k->S * k->S * d;
}

static moe_status lm_config(const bench_run *r, moe_config *cfg) {
    const bench_case *k = r->c;
    MOE_TRY(moe_config_defaults(cfg));
    moe_cfg_model *m = &cfg->model;
    m->vocab_size = k->V;
    m->d_model = k->d;
    m->n_layers = k->L;
    m->n_heads = k->H;
    m->n_kv_heads = 0;
    m->seq_len = k->S;
    m->ffn_dim = k->f;
    m->n_experts = k->E;
    m->top_k = k->k;
    m->n_shared_experts = 0;
    m->dense_layers = 0;
    m->tie_embeddings = true; /* the reference ties the LM head to the embedding */
    m->init_std = INIT_STD;
    m->dropout = 0;
    cfg->router.type = MOE_CFG_ROUTER_TOPK;
    cfg->router.balance = MOE_CFG_BALANCE_SWITCH;
    cfg->router.aux_coef = AUX_ALPHA;
    cfg->router.z_coef = 0;
    cfg->router.renormalize = true;
    cfg->router.capacity_factor = 0;
    cfg->data.batch_size = r->B;
    cfg->train.device = r->dev == MOE_CUDA ? MOE_CFG_DEVICE_CUDA : MOE_CFG_DEVICE_CPU;
    cfg->train.dtype = r->dt == MOE_BF16 ? MOE_CFG_DTYPE_BF16 : MOE_CFG_DTYPE_F32;
    cfg->train.seed = 0;
    cfg->train.grad_accum = 1;
    const char *rc = recompute_list(r->o);
    if (rc) {
        char set[256];
        snprintf(set, sizeof set, "train.recompute=[%s]", rc);
        if (moe_config_set(cfg, set) != MOE_OK)
            return moe_error_context(MOE_ERR_CONFIG, "bench --recompute %s", rc);
    }
    return moe_config_validate(cfg);
}

static moe_status lm_setup(const bench_run *r, lm_ctx *c) {
    moe_config cfg;
    MOE_TRY(lm_config(r, &cfg));
    MOE_TRY(moe_model_init(&c->model, &cfg, 0, 1));
    c->params = moe_model_param_tensors(&c->model, &c->n_params);
    if (!c->params) return moe_error(MOE_ERR_OOM, "moe bench: out of host memory");
    moe_optim_config oc = moe_optim_config_default(MOE_OPTIM_ADAMW); /* betas (0.9, 0.95), wd 0.1 */
    c->opt = moe_optimizer_create(c->params, c->n_params, &oc);
    if (!c->opt) return moe_last_status();
    c->B = r->B;
    c->S = r->c->S;
    size_t n = (size_t)c->B * (size_t)c->S;
    c->inputs = malloc(sizeof(int32_t) * n);
    c->targets = malloc(sizeof(int32_t) * n);
    moe_tensor *data = moe_tensor_randint(MOE_LIFE_PERSIST, MOE_CPU, MOE_I32, 2, (int64_t[]){c->B, c->S + 1}, 1, 0,
                                          r->c->V);
    if (!c->inputs || !c->targets || !data) {
        moe_tensor_free(data);
        return moe_error(MOE_ERR_OOM, "moe bench: out of host memory for a %dx%d token batch", c->B, c->S);
    }
    const int32_t *tok = data->data;
    for (int b = 0; b < c->B; b++) {
        memcpy(c->inputs + (size_t)b * c->S, tok + (size_t)b * (c->S + 1), sizeof(int32_t) * (size_t)c->S);
        memcpy(c->targets + (size_t)b * c->S, tok + (size_t)b * (c->S + 1) + 1, sizeof(int32_t) * (size_t)c->S);
    }
    moe_tensor_free(data);
    return MOE_OK;
}

static moe_status bench_lm(const bench_run *r) {
    lm_ctx c = {0};
    moe_status st = lm_setup(r, &c);
    if (st == MOE_OK) {
        int64_t active = 0, flops = lm_flops(r->c, c.B, &active);
        bench_phase phase = {"step", step_reset_prepare, lm_step, &c, flops, (int64_t)c.B * c.S, active};
        st = run_phases(r, &phase, 1);
    }
    moe_optimizer_free(c.opt);
    free(c.params);
    free(c.inputs);
    free(c.targets);
    moe_model_free(&c.model);
    return st;
}

/* ---- the matmul ceiling ---- */

typedef struct gemm_ctx {
    moe_tensor *a, *b;
} gemm_ctx;

static moe_status gemm_body(void *p) {
    gemm_ctx *c = p;
    bool was = moe_grad_set_enabled(false);
    moe_tensor *y = moe_matmul(c->a, c->b);
    moe_grad_set_enabled(was);
    return y ? MOE_OK : moe_last_status();
}

static moe_status bench_gemm(const bench_run *r) {
    int64_t shape[2] = {r->n, r->n};
    gemm_ctx c = {moe_tensor_randn(MOE_LIFE_PERSIST, r->dev, r->dt, 2, shape, 1, 0, 1.0),
                  moe_tensor_randn(MOE_LIFE_PERSIST, r->dev, r->dt, 2, shape, 2, 0, 1.0)};
    moe_status st;
    if (c.a && c.b) {
        bench_phase phase = {"gemm", step_reset_prepare, gemm_body, &c, 2 * (int64_t)r->n * r->n * r->n, 0, 0};
        st = run_phases(r, &phase, 1);
    } else {
        st = moe_last_status();
    }
    moe_tensor_free(c.a);
    moe_tensor_free(c.b);
    return st;
}

/* ---- the embedding backward alone: T rows of width d added into a V-row table ---- */

typedef struct index_add_ctx {
    moe_tensor *table, *ids, *src; /* [V, d], [T] uniform in [0, V), [T, d] */
} index_add_ctx;

static moe_status index_add_body(void *p) {
    index_add_ctx *c = p;
    bool was = moe_grad_set_enabled(false);
    moe_tensor *y = moe_index_add(c->table, c->ids, c->src);
    moe_grad_set_enabled(was);
    return y ? MOE_OK : moe_last_status();
}

static moe_status bench_index_add(const bench_run *r) {
    const bench_case *k = r->c;
    int64_t V = k->V, d = k->d, T = r->T, es = (int64_t)moe_dtype_size(r->dt);
    index_add_ctx c = {moe_tensor_zeros(MOE_LIFE_PERSIST, r->dev, r->dt, 2, (int64_t[]){V, d}),
                       moe_tensor_randint(MOE_LIFE_PERSIST, r->dev, MOE_I32, 1, (int64_t[]){T}, 3, 0, V),
                       moe_tensor_randn(MOE_LIFE_PERSIST, r->dev, r->dt, 2, (int64_t[]){T, d}, 4, 0, 1.0)};
    moe_status st;
    if (c.table && c.ids && c.src) { /* traffic: src and ids read, the table read and written */
        bench_phase phase = {"index_add", step_reset_prepare, index_add_body, &c, T * d, 0, 0,
                             .bytes = T * d * es + 4 * T + 2 * V * d * es};
        st = run_phases(r, &phase, 1);
    } else {
        st = moe_last_status();
    }
    moe_tensor_free(c.table);
    moe_tensor_free(c.ids);
    moe_tensor_free(c.src);
    return st;
}

/* ---- the gated delta-rule scan: step by step against the chunked form (chunks of 64) ---- */

typedef struct scan_ctx {
    moe_tensor *leaf[5]; /* q, k [B, T, H, d], v [B, T, H, d], beta and alpha logits [B, T, H] */
    bool chunked;
} scan_ctx;

static moe_tensor *scan_run(scan_ctx *c) {
    const double s = 1.0 / sqrt((double)c->leaf[0]->shape[3]);
    moe_tensor *q = moe_mul_scalar(c->leaf[0], s), *k = moe_mul_scalar(c->leaf[1], s);
    moe_tensor *beta = moe_sigmoid(c->leaf[3]), *alpha = moe_sigmoid(c->leaf[4]);
    return c->chunked ? moe_delta_scan_chunked(q, k, c->leaf[2], beta, alpha, NULL, true, 64, NULL)
                      : moe_delta_scan(q, k, c->leaf[2], beta, alpha, NULL, true, NULL);
}

static moe_status scan_prepare(void *p) {
    moe_step_reset();
    return moe_zero_grad(((scan_ctx *)p)->leaf, 5);
}

static moe_status scan_forward(void *p) {
    bool was = moe_grad_set_enabled(false);
    moe_tensor *o = scan_run(p);
    moe_grad_set_enabled(was);
    return o ? MOE_OK : moe_last_status();
}

static moe_status scan_forward_backward(void *p) {
    moe_tensor *loss = moe_sum_all(scan_run(p));
    return loss ? moe_backward_freeing(loss) : moe_last_status();
}

static moe_status bench_scan(const bench_run *r) {
    const bench_case *k = r->c;
    const int64_t B = r->B, T = r->T, H = k->H, d = k->d;
    scan_ctx step = {{NULL}, false};
    const char *names[5] = {"q", "k", "v", "beta", "alpha"};
    moe_status st = MOE_OK;
    for (int i = 0; i < 5 && st == MOE_OK; i++) {
        int64_t shape[4] = {B, T, H, d};
        step.leaf[i] = moe_tensor_randn(MOE_LIFE_PERSIST, r->dev, r->dt, i < 3 ? 4 : 3, shape, 11 + (uint64_t)i, 0,
                                        1.0);
        if (step.leaf[i]) moe_param_init(step.leaf[i], names[i]);
        else st = moe_last_status();
    }
    scan_ctx chunked = step;
    chunked.chunked = true;
    const int64_t flops = 6 * B * T * H * d * d; /* the recurrence's multiply-adds, forward */
    if (st == MOE_OK) {
        bench_phase phases[4] = {{"step_fwd", scan_prepare, scan_forward, &step, flops, 0, 0},
                                 {"step_fwd_bwd", scan_prepare, scan_forward_backward, &step, 3 * flops, 0, 0},
                                 {"chunk_fwd", scan_prepare, scan_forward, &chunked, flops, 0, 0},
                                 {"chunk_fwd_bwd", scan_prepare, scan_forward_backward, &chunked, 3 * flops, 0, 0}};
        st = run_phases(r, phases, 4);
    }
    for (int i = 0; i < 5; i++) moe_tensor_free(step.leaf[i]);
    return st;
}

moe_status moe_bench_run(const char *case_name, const moe_bench_options *o) {
    MOE_ASSERT(case_name && o && o->out, "moe_bench_run needs a case name, options and an output stream");
    const bench_case *c = NULL;
    for (int i = 0; i < N_CASES; i++)
        if (!strcmp(CASES[i].name, case_name)) c = &CASES[i];
    if (!c) {
        char list[256];
        moe_bench_case_list(list, sizeof list);
        return moe_error(MOE_ERR_CONFIG, "moe bench: unknown case '%s' (%s)", case_name, list);
    }
    if (o->reps < 1 || o->reps > MOE_BENCH_MAX_REPS || o->warmup < 0 || o->warmup > MOE_BENCH_MAX_REPS || o->threads < 0 || o->scale < 1)
        return moe_error(MOE_ERR_CONFIG, "moe bench: need 1 <= reps <= %d, 0 <= warmup <= %d, threads >= 0, scale >= 1 "
                         "(got reps %d, warmup %d, threads %d, scale %d)", MOE_BENCH_MAX_REPS, MOE_BENCH_MAX_REPS, o->reps, o->warmup,
                         o->threads, o->scale);
    bench_run r = {.c = c, .o = o, .dev = o->device >= 0 ? (moe_device)o->device : c->dev};
    r.dt = o->dtype >= 0 ? (moe_dtype)o->dtype : r.dev == MOE_CUDA ? MOE_BF16 : MOE_F32;
    if (r.dt != MOE_F32 && r.dt != MOE_BF16)
        return moe_error(MOE_ERR_CONFIG, "moe bench: dtype %s is not benchmarked (f32 or bf16)", moe_dtype_name(r.dt));
    if (!moe_device_available(r.dev)) return moe_error_context(MOE_ERR_UNSUPPORTED, "moe bench %s", c->name);
    if (o->threads > 0) omp_set_num_threads(o->threads);
    r.T = c->S / o->scale > 0 ? c->S / o->scale : 1;
    r.B = c->B / o->scale > 0 ? c->B / o->scale : 1;
    int n = r.dev == MOE_CUDA ? 8192 : 2048;
    r.n = n / o->scale > 0 ? n / o->scale : 1;
    fprintf(stderr, "moe bench: %s on %s %s, %d threads, warmup %d, reps %d, scale %d\n", c->name,
            moe_device_name(r.dev), moe_dtype_name(r.dt), omp_get_max_threads(), o->warmup, o->reps, o->scale);
    switch (c->kind) {
    case KIND_LAYER: return bench_layer(&r);
    case KIND_LM: return bench_lm(&r);
    case KIND_GEMM: return bench_gemm(&r);
    case KIND_INDEX_ADD: return bench_index_add(&r);
    case KIND_SCAN: return bench_scan(&r);
    }
    MOE_ASSERT(0, "bad case kind %d", (int)c->kind);
    return MOE_ERR_INVALID;
}
