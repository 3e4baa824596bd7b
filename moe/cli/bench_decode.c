/* `moe bench decode`: prefill and greedy decode of a model (a hub folder or a checkpoint,
 * opened as `moe generate` opens it) for several batch sizes, beside the memory-bandwidth
 * bound of each decode step; scripts/bench_hub_reference.py is the transformers side and
 * scripts/bench-hub.sh runs both.
 *
 * Per batch size B: B prompts of P pseudo-random ids (the generator that
 * bench_hub_reference.py repeats) in one packed forward (PREFILL), then N - 1 greedy steps
 * of one token per sequence, so that N new tokens come out as from a generate of N tokens
 * (DECODE). One untimed run first (warm-up) also records the experts each step routes
 * to; the timed runs pass no route buffer. Every figure is the median over --reps runs.
 *
 * The bound: a decode step reads at least the dense weights (all but the routed experts;
 * of the embedding only B rows) and once each distinct expert the step's tokens routed
 * to, in the compute dtype. Divided by the device's copy rate (bytes read + written per
 * second of a large device-to-device copy, a memcpy on the CPU, timed in the same run)
 * that is the shortest step the memory allows; bound_fraction = that / the measured step.
 * peak_bytes: the device's PERSIST peak + STEP arena peak so far in the process (batch
 * sizes run in the order given; in increasing order each figure is its batch's own).
 * issue_ms_per_step: the host's time per step until the step's last kernel was queued
 * (moe_decode_info.issue_ms): close to ms_per_step, the host holds the step up; well
 * below it, the device does. graphs: on when every timed step ran from a recorded graph
 * (--graphs on, and a step the decoder can record: moe_decoder_set_graphs). */
#include "moe/cli/bench_decode.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/device.h"
#include "core/fileio.h"
#include "core/memory.h"
#include "moe/cli/cli.h"
#include "moe/cli/source.h"
#include "moe/infer/decoder.h"
#include "moe/infer/sample.h"

#define MAX_BATCHES 16
#define MAX_REPS 100

typedef struct decode_flags {
    moe_source_flags src; /* --model / --checkpoint, --device / --dtype, --set */
    const char *batches;
    int prompt, tokens, reps;
    bool json;
    const char *experts;
    const char *graphs; /* on|off: decode steps replayed from recorded graphs */
} decode_flags;

typedef struct decode_plan {
    moe_device dev;
    moe_dtype dtype;
    int batch[MAX_BATCHES], n_batch;
    double copy_bytes_per_s; /* read + written */
} decode_plan;

/* The figures of one batch size (medians over the timed runs). */
typedef struct decode_result {
    double prefill_ms, step_ms;
    double issue_ms; /* host ms per decode step until its last kernel was queued (moe_decode_info) */
    double step_bytes; /* weight bytes read per decode step, mean over the warm-up's steps */
    size_t peak_bytes;
    bool graphs; /* every timed step ran from a recorded graph */
} decode_result;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Prompt ids: a 64-bit LCG from a fixed state, id = (x >> 33) mod V, sequence after
 * sequence (scripts/bench_hub_reference.py makes the same ids). */
static void prompt_ids(int32_t *tok, int32_t *pos, int32_t *seq, int B, int P, int V) {
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < B * P; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        tok[i] = (int32_t)((x >> 33) % (uint64_t)V);
        pos[i] = i % P;
        seq[i] = i / P;
    }
}

/* Copy rate of `dev` in bytes read + written per second: the best of 5 copies of 256 MiB
 * (cuda: one device tensor into another; cpu: memcpy). Run before the decoder opens, so
 * its buffers never add to the peak. */
static moe_status copy_rate(moe_device dev, double *rate) {
    const int64_t n = (int64_t)128 << 20; /* bf16 elements: 256 MiB */
    const size_t bytes = (size_t)n * 2;
    double best = 1e30;
    if (dev == MOE_CPU) {
        char *a = malloc(bytes), *b = malloc(bytes);
        if (!a || !b) { free(a); free(b); return moe_error(MOE_ERR_OOM, "bench decode: no host memory for the copy"); }
        memset(a, 1, bytes);
        memset(b, 2, bytes);
        for (int r = 0; r < 5; r++) {
            double t0 = moe_clock_ms();
            memcpy(b, a, bytes);
            double t = moe_clock_ms() - t0;
            if (t < best) best = t;
        }
        free(a);
        free(b);
    } else {
        moe_tensor *a = moe_tensor_zeros(MOE_LIFE_PERSIST, dev, MOE_BF16, 1, &n);
        moe_tensor *b = moe_tensor_zeros(MOE_LIFE_PERSIST, dev, MOE_BF16, 1, &n);
        moe_status s = a && b ? moe_device_sync(dev) : moe_error(MOE_ERR_OOM, "bench decode: no device memory for the copy");
        for (int r = 0; r < 5 && s == MOE_OK; r++) {
            double t0 = moe_clock_ms();
            s = moe_tensor_copy_(b, a);
            if (s == MOE_OK) s = moe_device_sync(dev);
            double t = moe_clock_ms() - t0;
            if (t < best) best = t;
        }
        moe_tensor_free(a);
        moe_tensor_free(b);
        MOE_TRY(s);
    }
    *rate = 2.0 * (double)bytes / (best * 1e-3);
    return MOE_OK;
}

/* Weight bytes one decode step of B tokens reads besides the routed experts, from the
 * decoder's view v (each tensor in its own dtype): every dense parameter but the embedding
 * table (unless it is also the head), and B embedding rows. */
static double dense_step_bytes(const moe_model *v, int B) {
    double bytes = 0;
    for (int i = 0; i < v->n_params; i++) {
        const moe_tensor *t = v->params[i].t;
        if (!v->params[i].expert_stack && (t != v->embed || !v->lm_head))
            bytes += (double)moe_tensor_numel(t) * (double)moe_dtype_size(t->dtype);
    }
    return bytes + (double)B * v->cfg.model.d_model * (double)moe_dtype_size(v->embed->dtype);
}

/* Bytes of the distinct experts in route ids [n_layers, B, top_k] (-1: dense layer), in
 * the view's compute dtype. */
static double routed_bytes(const moe_model *v, const int32_t *route, int B, unsigned char *seen) {
    const moe_cfg_model *c = &v->cfg.model;
    const double elt = (double)moe_dtype_size(v->compute);
    double bytes = 0;
    for (int l = 0; l < c->n_layers; l++) {
        memset(seen, 0, (size_t)c->n_experts);
        for (int i = 0; i < B * c->top_k; i++) {
            int e = route[(int64_t)l * B * c->top_k + i];
            if (e < 0 || e >= c->n_experts || seen[e]) continue;
            seen[e] = 1;
            bytes += 3.0 * c->d_model * moe_config_expert_ffn_dim(&v->cfg, e) * elt;
        }
    }
    return bytes;
}

/* Host buffers of one batch size. */
typedef struct decode_bufs {
    int32_t *tok, *pos, *seq, *route; /* [B P] x 3, route [n_layers, B, top_k] */
    float *logits;                    /* [B, V] */
    unsigned char *seen;              /* [n_experts] */
} decode_bufs;

static void bufs_free(decode_bufs *b) {
    free(b->tok);
    free(b->pos);
    free(b->seq);
    free(b->route);
    free(b->logits);
    free(b->seen);
}

static moe_status bufs_alloc(decode_bufs *b, const moe_model *m, int B, int P) {
    const moe_cfg_model *c = &m->cfg.model;
    size_t n = (size_t)B * (size_t)P;
    *b = (decode_bufs){malloc(sizeof(int32_t) * n), malloc(sizeof(int32_t) * n), malloc(sizeof(int32_t) * n),
                       malloc(sizeof(int32_t) * (size_t)c->n_layers * (size_t)B * (size_t)c->top_k),
                       malloc(sizeof(float) * (size_t)B * (size_t)c->vocab_size), calloc((size_t)c->n_experts + 1, 1)};
    if (b->tok && b->pos && b->seq && b->route && b->logits && b->seen) return MOE_OK;
    bufs_free(b);
    return moe_error(MOE_ERR_OOM, "bench decode: out of host memory for a batch of %d x %d tokens", B, P);
}

/* Per-run times in ms: the prefill, a decode step, the host's issue time of a step; and
 * whether every step ran from a recorded graph. */
typedef struct run_times {
    double prefill, step, issue;
    bool recorded;
} run_times;

/* One run: the prefill of B prompts, then N - 1 greedy steps. With `bytes` (the warm-up)
 * the steps report their routes and *bytes gets the mean weight bytes read per step. */
static moe_status decode_run(const decode_flags *f, moe_decoder *dec, int B, decode_bufs *bf, run_times *rt,
                             double *bytes) {
    const moe_model *v = moe_decoder_view(dec);
    const int P = f->prompt, V = v->cfg.model.vocab_size;
    moe_decode_state *st = NULL;
    int64_t per_seq = ((int64_t)P + f->tokens + MOE_KV_BLOCK - 1) / MOE_KV_BLOCK * MOE_KV_BLOCK; /* whole blocks */
    MOE_TRY(moe_decode_state_create(dec, B, B * per_seq, &st));
    prompt_ids(bf->tok, bf->pos, bf->seq, B, P, V);
    moe_batch b = {.n_tokens = B * P, .tokens = bf->tok, .pos = bf->pos, .seq = bf->seq, .logits = MOE_LOGITS_LAST};
    moe_step_reset();
    double t0 = moe_clock_ms();
    moe_status s = moe_decoder_forward(dec, st, &b, bf->logits, NULL);
    rt->prefill = moe_clock_ms() - t0;
    char title[64];
    snprintf(title, sizeof title, "batch %d prefill", B);
    moe_profile_report(title); /* MOE_PROFILE: the prefill's window apart from the steps' */
    moe_decode_info info = {.route_ids = bytes ? bf->route : NULL};
    double routed = 0, issue = 0;
    rt->recorded = true;
    t0 = moe_clock_ms();
    for (int step = 0; step + 1 < f->tokens && s == MOE_OK; step++) {
        moe_argmax_rows(bf->logits, B, V, bf->tok);
        for (int q = 0; q < B; q++) bf->pos[q] = P + step, bf->seq[q] = q;
        b.n_tokens = B;
        moe_step_reset();
        s = moe_decoder_forward(dec, st, &b, bf->logits, &info);
        issue += info.issue_ms;
        rt->recorded = rt->recorded && info.recorded;
        if (s == MOE_OK && bytes) routed += routed_bytes(v, bf->route, B, bf->seen);
    }
    int steps = f->tokens - 1;
    rt->step = steps > 0 ? (moe_clock_ms() - t0) / steps : 0;
    rt->issue = steps > 0 ? issue / steps : 0;
    snprintf(title, sizeof title, "batch %d, %d decode steps", B, steps);
    moe_profile_report(title);
    if (bytes) *bytes = dense_step_bytes(v, B) + (steps > 0 ? routed / steps : 0);
    moe_step_reset();
    moe_decode_state_free(st);
    return s;
}

/* The warm-up run, then f->reps timed runs of batch size B. */
static moe_status bench_batch(const decode_flags *f, const decode_plan *p, moe_decoder *dec, int B, decode_result *r) {
    decode_bufs bf;
    MOE_TRY(bufs_alloc(&bf, moe_decoder_model(dec), B, f->prompt));
    double pre[MAX_REPS], step[MAX_REPS], issue[MAX_REPS];
    run_times rt;
    moe_status s = decode_run(f, dec, B, &bf, &rt, &r->step_bytes);
    for (int i = 0; i < f->reps && s == MOE_OK; i++) {
        s = decode_run(f, dec, B, &bf, &rt, NULL);
        pre[i] = rt.prefill, step[i] = rt.step, issue[i] = rt.issue;
        r->graphs = rt.recorded;
    }
    if (s == MOE_OK) {
        r->prefill_ms = median(pre, f->reps);
        r->step_ms = median(step, f->reps);
        r->issue_ms = median(issue, f->reps);
        moe_mem_stats ms = moe_mem_get_stats(p->dev);
        r->peak_bytes = ms.persist_peak + ms.step_peak;
    }
    bufs_free(&bf);
    return s;
}

static void print_result(const decode_flags *f, const decode_plan *p, int B, const decode_result *r) {
    double tps = r->step_ms > 0 ? 1e3 * B / r->step_ms : 0;
    double bound = r->step_ms > 0 ? r->step_bytes / p->copy_bytes_per_s * 1e3 / r->step_ms : 0;
    int T = B * f->prompt;
    double ptps = r->prefill_ms > 0 ? 1e3 * T / r->prefill_ms : 0;
    static const char *const impls[] = {[MOE_EXPERT_PATH_AUTO] = "moe", [MOE_EXPERT_PATH_GROUPED] = "moe-grouped",
                                        [MOE_EXPERT_PATH_GATHERED] = "moe-gathered",
                                        [MOE_EXPERT_PATH_SORTED] = "moe-sorted"};
    const char *impl = impls[moe_cli_expert_path(f->experts)];
    if (f->json) {
        printf("{\"kind\":\"PREFILL\",\"impl\":\"%s\",\"batch\":%d,\"tokens\":%d,\"ms\":%.3f,\"tokens_per_s\":%.2f,"
               "\"peak_bytes\":%zu,\"device\":\"%s\",\"dtype\":\"%s\"}\n", impl, B, T, r->prefill_ms, ptps, r->peak_bytes,
               moe_device_name(p->dev), moe_dtype_name(p->dtype));
        printf("{\"kind\":\"DECODE\",\"impl\":\"%s\",\"batch\":%d,\"tokens_per_s\":%.2f,\"ms_per_step\":%.4f,"
               "\"bound_fraction\":%.4f,\"peak_bytes\":%zu,\"step_bytes\":%.0f,\"copy_bytes_per_s\":%.0f,"
               "\"issue_ms_per_step\":%.4f,\"graphs\":%s,\"device\":\"%s\",\"dtype\":\"%s\"}\n", impl, B, tps,
               r->step_ms, bound, r->peak_bytes, r->step_bytes, p->copy_bytes_per_s, r->issue_ms,
               r->graphs ? "true" : "false", moe_device_name(p->dev), moe_dtype_name(p->dtype));
    } else {
        printf("PREFILL impl=%s batch=%d tokens=%d ms=%.3f tokens_per_s=%.2f peak_bytes=%zu\n", impl, B, T, r->prefill_ms,
               ptps, r->peak_bytes);
        printf("DECODE impl=%s batch=%d tokens_per_s=%.2f ms_per_step=%.4f bound_fraction=%.4f peak_bytes=%zu "
               "step_bytes=%.0f copy_gb_per_s=%.2f issue_ms_per_step=%.4f graphs=%s\n", impl, B, tps, r->step_ms, bound,
               r->peak_bytes, r->step_bytes, p->copy_bytes_per_s / 1e9, r->issue_ms, r->graphs ? "on" : "off");
    }
    fflush(stdout);
}

/* --batch into the plan: sizes in 1..4096, at most MAX_BATCHES. */
static moe_status parse_batches(const char *list, decode_plan *p) {
    moe_token_buf ids = {0};
    MOE_TRY(moe_cli_parse_ids("--batch", list, 4097, MOE_IDS_EMPTY_REFUSED, &ids));
    moe_status s = ids.len > MAX_BATCHES ? moe_error(MOE_ERR_CONFIG, "--batch: at most %d sizes", MAX_BATCHES) : MOE_OK;
    p->n_batch = (int)ids.len;
    for (int i = 0; s == MOE_OK && i < p->n_batch; i++) {
        p->batch[i] = ids.data[i];
        if (p->batch[i] < 1) s = moe_error(MOE_ERR_CONFIG, "--batch: sizes are 1..4096 (got %d)", p->batch[i]);
    }
    moe_token_buf_free(&ids);
    return s;
}

/* The source opened as `moe generate` opens it (masters on the host, the decoder's view on
 * --device in --dtype), the copy rate, then each batch size. */
static moe_status bench_decode(const decode_flags *f) {
    decode_plan p = {0};
    MOE_TRY(parse_batches(f->batches, &p));
    moe_source src;
    MOE_TRY(moe_source_open(&src, &f->src, MOE_SOURCE_MODEL));
    p.dev = src.dev;
    p.dtype = src.dtype;
    moe_decoder *dec = NULL;
    moe_status s = p.dev == MOE_CPU || moe_device_available(p.dev) ? MOE_OK
                   : moe_error_context(MOE_ERR_UNSUPPORTED, "bench decode");
    if (s == MOE_OK) s = copy_rate(p.dev, &p.copy_bytes_per_s);
    double t0 = moe_clock_ms();
    if (s == MOE_OK) s = moe_source_decoder_open(&src, &dec);
    if (s == MOE_OK) moe_decoder_set_expert_path(dec, moe_cli_expert_path(f->experts));
    if (s == MOE_OK) moe_decoder_set_graphs(dec, !f->graphs || strcmp(f->graphs, "off") != 0);
    if (s == MOE_OK)
        fprintf(stderr, "bench decode: %s on %s %s (view made in %.0f ms), prompt %d, %d new tokens, %d timed runs, "
                "copy rate %.1f GB/s\n", src.name, moe_device_name(p.dev), moe_dtype_name(p.dtype), moe_clock_ms() - t0,
                f->prompt, f->tokens, f->reps, p.copy_bytes_per_s / 1e9);
    for (int i = 0; i < p.n_batch && s == MOE_OK; i++) {
        decode_result r = {0};
        s = bench_batch(f, &p, dec, p.batch[i], &r);
        if (s == MOE_OK) print_result(f, &p, p.batch[i], &r);
    }
    const char *off = dec ? moe_decoder_graphs_off(dec) : NULL;
    if (s == MOE_OK && off && strcmp(off, "turned off") != 0)
        fprintf(stderr, "bench decode: decode steps ran kernel by kernel after a recording failed: %s\n", off);
    moe_decoder_close(dec);
    moe_source_close(&src);
    return s;
}

int moe_cmd_bench_decode(int argc, char **argv) {
    decode_flags f = {.batches = "1,16", .prompt = 128, .tokens = 128, .reps = 3};
    const moe_flag_spec specs[] = {
        MOE_SOURCE_FLAG_SPECS(f.src),
        {"--batch", MOE_FLAG_STRING, "B,B", 0, 0, NULL, "batch sizes, in increasing order", &f.batches},
        {"--prompt-len", MOE_FLAG_INT, "P", 1, 1 << 20, NULL, "prompt tokens per sequence", &f.prompt},
        {"--tokens", MOE_FLAG_INT, "N", 2, 1 << 20, NULL, "new tokens per sequence (N - 1 decode steps)",
         &f.tokens},
        {"--reps", MOE_FLAG_INT, "R", 1, MAX_REPS, NULL, "timed runs per batch size, after one warm-up",
         &f.reps},
        {"--json", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "JSON lines instead of PREFILL / DECODE lines", &f.json},
        {"--experts", MOE_FLAG_STRING, "PATH", 0, 0, MOE_CLI_EXPERTS_CHOICES, MOE_CLI_EXPERTS_HELP, &f.experts},
        {"--graphs", MOE_FLAG_STRING, "on|off", 0, 0, "on|off",
         "decode steps of one token per sequence replayed from recorded graphs where the forward allows it (on)",
         &f.graphs},
        {0}};
    moe_args a;
    int rc = moe_cli_parse("bench decode", "moe bench decode --model DIR | --checkpoint FILE [flags]", specs, argc, argv,
                           0, 0, NULL, &a);
    if (rc < 0) {
        moe_args_free(&a);
        moe_status s = bench_decode(&f);
        rc = s == MOE_OK ? 0 : moe_cli_fail(s);
    }
    moe_arg_list_free(&f.src.sets);
    return rc;
}
