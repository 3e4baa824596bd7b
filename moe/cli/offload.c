/* The offload flags of `moe generate` and `moe bench offload` (see offload.h): a decoder
 * resident or offloaded with the routing-path predictor behind policy predict / auto, and
 * the benchmark's batch of greedy sequences (time to first token, tokens/s, hit rate and
 * host-to-device bytes per generated token). */
#include "moe/cli/offload.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileio.h"
#include "core/memory.h"
#include "moe/cli/cli.h"
#include "moe/cli/source.h"
#include "moe/infer/sample.h"
#include "moe/offload/token_sched.h"

static moe_status predictor_scores(void *ctx, const int32_t *tokens, const int32_t *pos, const int32_t *seq, int n,
                                   const int32_t *rows, int m, float *scores) {
    return moe_predictor_predict(ctx, tokens, pos, seq, n, rows, m, scores);
}

/* The options the flags ask for (policy default: predict with a predictor, else lru); the
 * caller sets the device and dtype. */
static moe_status offload_options(const moe_offload_flags *f, moe_offload_options *o) {
    if (!f->gpu_memory) return moe_error(MOE_ERR_CONFIG, "--offload needs --gpu-memory SIZE (e.g. 6GiB)");
    *o = (moe_offload_options){.policy = f->predictor || f->lookahead ? MOE_OFFLOAD_PREDICT : MOE_OFFLOAD_LRU,
                               .max_gather = f->max_gather, .lookahead = f->lookahead,
                               .predict_width = f->predict_width};
    MOE_TRY(moe_parse_bytes(f->gpu_memory, &o->budget));
    if (f->policy) MOE_TRY(moe_offload_policy_parse(f->policy, &o->policy));
    if (f->predict_width && !f->predictor)
        return moe_error(MOE_ERR_CONFIG, "--predict-width goes with --predictor");
    if ((f->predictor || f->lookahead) && o->policy != MOE_OFFLOAD_PREDICT && o->policy != MOE_OFFLOAD_AUTO)
        return moe_error(MOE_ERR_CONFIG, "%s goes with --policy predict or auto (got %s)",
                         f->predictor ? "--predictor" : "--lookahead", moe_offload_policy_name(o->policy));
    return MOE_OK;
}

moe_status moe_cli_offload_flags_check(const moe_offload_flags *f) {
    if (!f->offload) {
        if (f->gpu_memory || f->policy || f->predictor || f->verbose || f->max_gather || f->lookahead ||
            f->predict_width)
            return moe_error(MOE_ERR_CONFIG, "--gpu-memory, --policy, --predictor, --lookahead, --predict-width, "
                             "--max-gather and --verbose go with --offload");
        return MOE_OK;
    }
    moe_offload_options o;
    return offload_options(f, &o);
}

moe_status moe_cli_decoder_open(const moe_offload_flags *f, moe_model *m, moe_device dev, moe_dtype dtype, int max_seqs,
                                int64_t kv_tokens, int max_batch, moe_cli_decoder *out) {
    memset(out, 0, sizeof *out);
    if (!f->offload) {
        MOE_TRY(moe_cli_offload_flags_check(f)); /* no offload flags without --offload */
        return moe_decoder_open_on(m, dev, dtype, &out->dec);
    }
    moe_offload_options o;
    MOE_TRY(offload_options(f, &o));
    o.dev = dev;
    o.dtype = dtype;
    o.max_seqs = max_seqs;
    o.kv_tokens = kv_tokens;
    o.max_batch_tokens = max_batch;
    if (f->predictor) {
        MOE_TRY(moe_predictor_load(f->predictor, m, &out->pred));
        o.predict = predictor_scores;
        o.predict_ctx = out->pred;
        o.predict_context = moe_predictor_net(out->pred)->shape.context;
    }
    moe_status s = moe_offload_open(m, &o, &out->off);
    if (s != MOE_OK) {
        moe_cli_decoder_close(out);
        return s;
    }
    moe_offload_print_split(out->off, stderr);
    out->dec = moe_offload_decoder(out->off);
    out->verbose = f->verbose;
    return MOE_OK;
}

void moe_cli_decoder_close(moe_cli_decoder *d) {
    if (d->off && d->verbose) moe_offload_print_counts(d->off, stderr);
    if (d->off) moe_offload_close(d->off);
    else moe_decoder_close(d->dec);
    moe_predictor_free(d->pred);
    memset(d, 0, sizeof *d);
}

moe_status moe_cli_schedule_check(const char *cmd, const moe_schedule_flags *sf, const char *predictor) {
    if (sf->schedule && !sf->micro) return moe_error(MOE_ERR_CONFIG, "%s: --schedule goes with --micro-batch M", cmd);
    if (sf->schedule && !strcmp(sf->schedule, "paths") && !predictor)
        return moe_error(MOE_ERR_CONFIG, "%s: --schedule paths needs --predictor (the predicted paths)", cmd);
    return MOE_OK;
}

bool moe_cli_schedule_by_paths(const moe_schedule_flags *sf, const char *predictor) {
    return sf->micro > 0 && (sf->schedule ? !strcmp(sf->schedule, "paths") : predictor != NULL);
}

/* ---- moe bench offload ---- */

typedef struct bench_flags {
    moe_source_flags src;
    moe_offload_flags off;
    int batch, tokens, prompt;
    double budget_fraction; /* > 0: the budget is the rest plus this share of the expert bytes */
    moe_schedule_flags sched;
} bench_flags;

/* KV positions the run holds: each sequence's prompt and new tokens in whole blocks. */
static int64_t bench_kv_tokens(const bench_flags *f) {
    int64_t per = f->prompt + f->tokens;
    return (int64_t)f->batch * ((per + MOE_KV_BLOCK - 1) / MOE_KV_BLOCK * MOE_KV_BLOCK);
}

typedef struct bench_result {
    double ttft_ms, decode_ms;
    moe_offload_counts decode; /* the counters of the decode steps */
    int forwards;              /* decode forwards (micro-batches) */
    uint64_t ids_hash;         /* FNV-1a of the greedy ids, step by step in sequence order */
} bench_result;

/* batch prompts of `prompt` ids in one forward, then `tokens` greedy steps of one token
 * per sequence (the whole batch at once, or in micro-batches with --micro-batch: the token
 * scheduler, offload/token_sched.h). */
static moe_status bench_run(const bench_flags *f, moe_model *m, const moe_cli_decoder *d, bench_result *r) {
    int B = f->batch, P = f->prompt, V = m->cfg.model.vocab_size, n = B * P;
    moe_decoder *dec = d->dec;
    moe_decode_state *st = NULL;
    moe_token_sched *ts = NULL;
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)n), *pos = malloc(sizeof(int32_t) * (size_t)n),
            *seq = malloc(sizeof(int32_t) * (size_t)n), *next = malloc(sizeof(int32_t) * (size_t)B);
    float *logits = malloc(sizeof(float) * (size_t)B * (size_t)V);
    moe_status s = tok && pos && seq && next && logits ? moe_decode_state_create(dec, B, bench_kv_tokens(f), &st)
                                                       : moe_error(MOE_ERR_OOM, "bench offload: out of host memory");
    bool by_paths = moe_cli_schedule_by_paths(&f->sched, f->off.predictor);
    if (s == MOE_OK) s = moe_token_sched_create(dec, B, f->sched.micro, by_paths ? d->pred : NULL, &ts);
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < n && s == MOE_OK; i++) { /* fixed pseudo-random prompts */
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        tok[i] = (int32_t)((x >> 33) % (uint64_t)V);
        pos[i] = i % P;
        seq[i] = i / P;
    }
    moe_batch b = {.n_tokens = n, .tokens = tok, .pos = pos, .seq = seq, .logits = MOE_LOGITS_LAST};
    double t0 = moe_clock_ms();
    if (s == MOE_OK) s = moe_decoder_forward(dec, st, &b, logits, NULL);
    r->ttft_ms = moe_clock_ms() - t0;
    if (s == MOE_OK) moe_token_sched_observe(ts, &b); /* the histories start from the prompts' tails */
    moe_offload_reset_counts(d->off);
    t0 = moe_clock_ms();
    r->ids_hash = 0xcbf29ce484222325ull;
    for (int step = 0; step < f->tokens && s == MOE_OK; step++) {
        moe_argmax_rows(logits, B, V, next);
        for (int q = 0; q < B; q++) r->ids_hash = (r->ids_hash ^ (uint32_t)next[q]) * 0x100000001b3ull;
        for (int q = 0; q < B; q++) pos[q] = P + step, seq[q] = q;
        moe_batch db = {.n_tokens = B, .tokens = next, .pos = pos, .seq = seq, .logits = MOE_LOGITS_LAST};
        s = moe_token_sched_forward(ts, st, &db, logits);
    }
    r->decode_ms = moe_clock_ms() - t0;
    r->decode = moe_offload_get_counts(d->off, -1);
    if (ts) r->forwards = (int)moe_token_sched_get_counts(ts).decode.forwards;
    moe_step_reset();
    moe_token_sched_free(ts);
    moe_decode_state_free(st);
    free(tok);
    free(pos);
    free(seq);
    free(next);
    free(logits);
    return s;
}

/* --budget-fraction F: the dense part, KV cache and scratch of this run plus ceil(F x experts)
 * expert slots, as bytes in buf (said on stderr with the expert bytes it is a share of). */
static moe_status fraction_budget(const bench_flags *f, const moe_source *src, int64_t kv, char *buf, size_t cap) {
    moe_offload_options o = {.dtype = src->dtype, .dev = src->dev, .max_seqs = f->batch, .kv_tokens = kv,
                             .max_batch_tokens = f->batch * f->prompt, .max_gather = f->off.max_gather};
    moe_offload_split sp;
    size_t least;
    MOE_TRY(moe_offload_plan(&src->model, &o, &sp, &least));
    size_t slots = (size_t)ceil(f->budget_fraction * sp.experts - 1e-9), fixed = sp.dense + sp.kv + sp.scratch;
    snprintf(buf, cap, "%zu", fixed + slots * sp.slot_bytes);
    fprintf(stderr, "bench offload: --budget-fraction %g: %zu of %d expert slots of %zu bytes (expert bytes %zu) + "
            "dense, KV cache and scratch %zu bytes = budget %s bytes\n", f->budget_fraction, slots, sp.experts,
            sp.slot_bytes, (size_t)sp.experts * sp.slot_bytes, fixed, buf);
    return MOE_OK;
}

static int moe_layers(const moe_model *m) {
    int n = 0;
    for (int i = 0; i < m->cfg.model.n_layers; i++) n += !m->blocks[i].dense;
    return n > 0 ? n : 1;
}

static moe_status bench_offload(const bench_flags *f) {
    if ((f->budget_fraction > 0) == (f->off.gpu_memory != NULL))
        return moe_error(MOE_ERR_CONFIG, "bench offload: give --gpu-memory SIZE or --budget-fraction F (one of them)");
    MOE_TRY(moe_cli_schedule_check("bench offload", &f->sched, f->off.predictor));
    moe_source src;
    MOE_TRY(moe_source_open(&src, &f->src, MOE_SOURCE_MODEL));
    moe_offload_flags of = f->off;
    of.offload = true;
    moe_cli_decoder d = {0};
    int64_t kv = bench_kv_tokens(f);
    char budget[32];
    moe_status s = MOE_OK;
    if (f->budget_fraction > 0) {
        s = fraction_budget(f, &src, kv, budget, sizeof budget);
        of.gpu_memory = budget;
    }
    if (s == MOE_OK) s = moe_cli_decoder_open(&of, &src.model, src.dev, src.dtype, f->batch, kv, f->batch * f->prompt, &d);
    bench_result r = {0};
    if (s == MOE_OK) s = bench_run(f, &src.model, &d, &r);
    if (s == MOE_OK) {
        const moe_offload_counts *c = &r.decode;
        double made = (double)f->batch * f->tokens;
        /* lookahead without a predictor is named alone; with one, after the policy */
        const char *pol = moe_offload_policy_name(moe_offload_get_policy(d.off));
        bool alone = f->off.lookahead && !f->off.predictor;
        printf("OFFLOAD policy=%s%s budget=%zu batch=%d tokens_per_s=%.2f hit_rate=%.4f bytes_per_token=%.0f "
               "ttft_ms=%.2f\n", alone ? "lookahead" : pol, f->off.lookahead && !alone ? "+lookahead" : "",
               moe_offload_get_split(d.off)->budget, f->batch, made / (r.decode_ms / 1e3),
               c->uses ? (double)c->hits / (double)c->uses : 1.0, (double)c->bytes / made, r.ttft_ms);
        bool by_paths = moe_cli_schedule_by_paths(&f->sched, f->off.predictor);
        if (f->sched.micro > 0) /* distinct experts per MoE layer and forward: what a micro-batch needs resident */
            printf("OFFLOAD_SCHEDULE micro_batch=%d schedule=%s forwards=%d experts_per_layer=%.3f ids=%016llx\n",
                   f->sched.micro, by_paths ? "paths" : "arrival", r.forwards,
                   (double)c->uses / ((double)r.forwards * moe_layers(&src.model)), (unsigned long long)r.ids_hash);
        fflush(stdout);
    }
    moe_cli_decoder_close(&d);
    moe_source_close(&src);
    return s;
}

int moe_cmd_bench_offload(int argc, char **argv) {
    bench_flags f = {.batch = 1, .tokens = 32, .prompt = 32};
    const moe_flag_spec specs[] = {
        MOE_SOURCE_FLAG_SPECS(f.src),
        {"--gpu-memory", MOE_FLAG_STRING, "SIZE", 0, 0, NULL, "the device memory for everything, e.g. 6GiB",
         &f.off.gpu_memory},
        {"--budget-fraction", MOE_FLAG_DOUBLE, "F", 0, 1, NULL,
         "instead of --gpu-memory: what the run needs beside the experts plus this share of the expert bytes",
         &f.budget_fraction, .min_excluded = true, .default_text = "off"},
        {"--policy", MOE_FLAG_STRING, "P", 0, 0, "predict|lru|lfu|resident|cpu|auto",
         "expert cache policy (default: predict with --predictor or --lookahead, else lru)", &f.off.policy},
        {"--predictor", MOE_FLAG_STRING, "P.h5", 0, 0, NULL, "the routing-path predictor", &f.off.predictor},
        {"--lookahead", MOE_FLAG_BOOL, NULL, 0, 0, NULL,
         "also prefetch the next MoE layer's experts as its router picks them from this layer's rows (predict, auto)",
         &f.off.lookahead},
        {"--predict-width", MOE_FLAG_INT, "W", 0, 4096, NULL,
         "experts per token and layer the predictor names for prefetch, 0 = top-k", &f.off.predict_width},
        {"--batch", MOE_FLAG_INT, "N", 1, 4096, NULL, "sequences decoded together", &f.batch},
        MOE_SCHEDULE_FLAG_SPECS(f.sched),
        {"--tokens", MOE_FLAG_INT, "N", 1, 1 << 20, NULL, "new tokens per sequence", &f.tokens},
        {"--prompt", MOE_FLAG_INT, "N", 1, 1 << 20, NULL, "prompt tokens per sequence (fixed pseudo-random ids)",
         &f.prompt},
        {"--max-gather", MOE_FLAG_INT, "N", 0, 1 << 20, NULL, "experts gathered into scratch at once, 0 = a layer's",
         &f.off.max_gather},
        {"--verbose", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "per-layer counters of the decode steps", &f.off.verbose},
        {0}};
    moe_args a;
    int rc = moe_cli_parse("bench offload",
                           "moe bench offload --model DIR | --checkpoint FILE --gpu-memory SIZE | --budget-fraction F [--policy P] "
                           "[flags]",
                           specs, argc, argv, 0, 0, NULL, &a);
    if (rc < 0) {
        moe_args_free(&a);
        moe_status s = bench_offload(&f);
        rc = s == MOE_OK ? 0 : moe_cli_fail(s);
    }
    moe_arg_list_free(&f.src.sets);
    return rc;
}
