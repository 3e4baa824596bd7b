/* `moe bench prefill`: N prompts of lengths drawn uniformly in [min, max] (random ids, a
 * fixed generator shared with scripts/bench_prefill_reference.py) prefilled through the
 * decoder, either packed (prompts back to back in forwards of at most --max-tokens tokens,
 * each its own sequence: no padding; a prompt that does not fit continues in the next
 * forward) or padded (batches of B prompts, each left-padded with id 0 to the longest of its
 * batch, the pads computed like real tokens, as a padded batched forward does). Prints
 *   PREFILL mode=M prompts=N real_tokens=R computed_tokens=C ms=T tokens_per_s=R/T peak_bytes=P ...
 * with P the device's peak PERSIST plus peak STEP bytes (core/memory.h). */
#include "moe/cli/bench_prefill.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileio.h"
#include "core/memory.h"
#include "moe/cli/cli.h"
#include "moe/cli/source.h"
#include "moe/infer/decoder.h"

typedef enum prefill_mode { PREFILL_PACKED, PREFILL_PADDED } prefill_mode;

typedef struct prefill_flags {
    moe_source_flags src;
    const char *mode;
    int prompts, min_len, max_len, batch, max_tokens, warmup;
    int64_t seed;
} prefill_flags;

/* The prompts, back to back. */
typedef struct prompts {
    int n, longest;
    int32_t *len;  /* [n] */
    int64_t *off;  /* [n] start of prompt i in ids */
    int32_t *ids;  /* [real] */
    int64_t real;  /* sum of len */
    int64_t id_sum; /* sum of ids: both sides of a comparison drew the same prompts */
} prompts;

/* One forward's tokens (capacity cap) and its last-token logits [max_seqs, V]. */
typedef struct batch_buf {
    int32_t *tok, *pos, *seq;
    float *logits;
} batch_buf;

uint32_t moe_prefill_lcg_next(uint64_t *x) {
    *x = *x * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(*x >> 33);
}

static void prompts_free(prompts *p) {
    free(p->len);
    free(p->off);
    free(p->ids);
    memset(p, 0, sizeof *p);
}

static moe_status prompts_draw(int n, int lo, int hi, int vocab, uint64_t seed, prompts *p) {
    memset(p, 0, sizeof *p);
    p->n = n;
    p->len = malloc(sizeof(int32_t) * (size_t)n);
    p->off = malloc(sizeof(int64_t) * (size_t)n);
    if (!p->len || !p->off) return moe_error(MOE_ERR_OOM, "bench prefill: out of host memory");
    uint64_t x = seed;
    for (int i = 0; i < n; i++) {
        p->len[i] = lo + (int32_t)(moe_prefill_lcg_next(&x) % (uint32_t)(hi - lo + 1));
        p->off[i] = p->real;
        p->real += p->len[i];
        if (p->len[i] > p->longest) p->longest = p->len[i];
    }
    p->ids = malloc(sizeof(int32_t) * (size_t)p->real);
    if (!p->ids) return moe_error(MOE_ERR_OOM, "bench prefill: out of host memory");
    for (int64_t t = 0; t < p->real; t++) {
        p->ids[t] = 1 + (int32_t)(moe_prefill_lcg_next(&x) % (uint32_t)(vocab - 1));
        p->id_sum += p->ids[t];
    }
    return MOE_OK;
}

/* The most sequences and KV positions (whole blocks per sequence) one forward holds: a pass
 * without a decode state measures them, so the state holds just what the pass needs. */
typedef struct prefill_needs {
    int seqs;
    int64_t kv;
} prefill_needs;

static int64_t kv_blocks_of(int64_t len) { return (len + MOE_KV_BLOCK - 1) / MOE_KV_BLOCK * MOE_KV_BLOCK; }

/* st NULL: measure into *need only. Else run the forward and free the slots of the
 * sequences it finished. */
static moe_status forward_or_measure(moe_decoder *dec, moe_decode_state *st, const batch_buf *bb, int n, int seqs,
                                     int64_t kv, prefill_needs *need) {
    if (seqs > need->seqs) need->seqs = seqs;
    if (kv > need->kv) need->kv = kv;
    if (!st) return MOE_OK;
    moe_batch b = {.n_tokens = n, .tokens = bb->tok, .pos = bb->pos, .seq = bb->seq, .logits = MOE_LOGITS_LAST};
    moe_status s = moe_decoder_forward(dec, st, &b, bb->logits, NULL);
    moe_step_reset();
    return s;
}

/* Packed: prompts back to back, at most max_tokens per forward (a prompt that does not fit
 * continues in the next one); prompt i in slot i % S, S the most prompts a forward holds, so
 * the prompts of one forward never share a slot. */
static moe_status run_packed(moe_decoder *dec, moe_decode_state *st, const prompts *p, int max_tokens,
                             const batch_buf *bb, int64_t *computed, prefill_needs *need) {
    int S = st ? moe_decode_state_max_seqs(st) : p->n, i = 0, done = 0;
    moe_status s = MOE_OK;
    while (i < p->n && s == MOE_OK) {
        int n = 0, first = i;
        int64_t kv = 0;
        while (i < p->n && n < max_tokens) {
            int take = p->len[i] - done < max_tokens - n ? p->len[i] - done : max_tokens - n;
            for (int t = 0; t < take; t++, n++) {
                bb->tok[n] = p->ids[p->off[i] + done + t];
                bb->pos[n] = done + t;
                bb->seq[n] = i % S;
            }
            done += take;
            kv += kv_blocks_of(done);
            if (done < p->len[i]) break;
            i++, done = 0;
        }
        s = forward_or_measure(dec, st, bb, n, i - first + (done > 0), kv, need);
        for (int q = first; q < i && st && s == MOE_OK; q++) s = moe_decode_state_seq_free(st, q % S);
        *computed += n;
    }
    return s;
}

/* Padded: batches of B prompts in order, each left-padded with id 0 to the batch's longest. */
static moe_status run_padded(moe_decoder *dec, moe_decode_state *st, const prompts *p, int B, const batch_buf *bb,
                             int64_t *computed, prefill_needs *need) {
    moe_status s = MOE_OK;
    for (int i0 = 0; i0 < p->n && s == MOE_OK; i0 += B) {
        int nb = p->n - i0 < B ? p->n - i0 : B, L = 0, n = 0;
        for (int q = 0; q < nb; q++)
            if (p->len[i0 + q] > L) L = p->len[i0 + q];
        for (int q = 0; q < nb; q++) {
            int pad = L - p->len[i0 + q];
            for (int t = 0; t < L; t++, n++) {
                bb->tok[n] = t < pad ? 0 : p->ids[p->off[i0 + q] + t - pad];
                bb->pos[n] = t;
                bb->seq[n] = q;
            }
        }
        s = forward_or_measure(dec, st, bb, n, nb, nb * kv_blocks_of(L), need);
        for (int q = 0; q < nb && st && s == MOE_OK; q++) s = moe_decode_state_seq_free(st, q);
        *computed += n;
    }
    return s;
}

static moe_status run_pass(const prefill_flags *f, prefill_mode mode, moe_decoder *dec, moe_decode_state *st,
                           const prompts *p, const batch_buf *bb, int64_t *computed, prefill_needs *need) {
    *computed = 0;
    return mode == PREFILL_PACKED ? run_packed(dec, st, p, f->max_tokens, bb, computed, need)
                                  : run_padded(dec, st, p, f->batch, bb, computed, need);
}

static void print_line(const prefill_flags *f, prefill_mode mode, const moe_decoder *dec, const prompts *p,
                       int64_t computed, double ms) {
    const moe_model *v = moe_decoder_view(dec);
    moe_mem_stats m = moe_mem_get_stats(v->dev);
    printf("PREFILL mode=%s prompts=%d real_tokens=%lld computed_tokens=%lld ms=%.2f tokens_per_s=%.1f "
           "peak_bytes=%zu device=%s dtype=%s batch=%d max_tokens=%d min_len=%d max_len=%d seed=%lld id_sum=%lld\n",
           mode == PREFILL_PACKED ? "packed" : "padded", p->n, (long long)p->real, (long long)computed, ms,
           (double)p->real / (ms / 1e3), m.persist_peak + m.step_peak, moe_device_name(v->dev),
           moe_dtype_name(v->compute), f->batch, f->max_tokens, f->min_len, f->max_len, (long long)f->seed,
           (long long)p->id_sum);
    fflush(stdout);
}

/* A measuring pass, the decode state it asks for, the warm-up passes, the timed pass. */
static moe_status run_bench(const prefill_flags *f, prefill_mode mode, moe_decoder *dec, const prompts *p, int vocab) {
    int64_t cap = mode == PREFILL_PACKED ? f->max_tokens : (int64_t)f->batch * p->longest;
    batch_buf bb = {malloc(sizeof(int32_t) * (size_t)cap), malloc(sizeof(int32_t) * (size_t)cap),
                    malloc(sizeof(int32_t) * (size_t)cap), NULL};
    prefill_needs need = {0};
    int64_t computed = 0;
    moe_decode_state *st = NULL;
    moe_status s = bb.tok && bb.pos && bb.seq ? run_pass(f, mode, dec, NULL, p, &bb, &computed, &need)
                                              : moe_error(MOE_ERR_OOM, "bench prefill: out of host memory");
    if (s == MOE_OK && !(bb.logits = malloc(sizeof(float) * (size_t)need.seqs * (size_t)vocab)))
        s = moe_error(MOE_ERR_OOM, "bench prefill: out of host memory");
    if (s == MOE_OK) s = moe_decode_state_create(dec, need.seqs, need.kv, &st);
    for (int w = 0; w < f->warmup && s == MOE_OK; w++) s = run_pass(f, mode, dec, st, p, &bb, &computed, &need);
    double t0 = moe_clock_ms();
    if (s == MOE_OK) s = run_pass(f, mode, dec, st, p, &bb, &computed, &need);
    double ms = moe_clock_ms() - t0;
    if (s == MOE_OK) print_line(f, mode, dec, p, computed, ms);
    moe_decode_state_free(st);
    free(bb.tok);
    free(bb.pos);
    free(bb.seq);
    free(bb.logits);
    return s;
}

/* --max-len (and --min-len) down to the model's context, said on stdout; --max-tokens
 * defaults to batch x max-len (the padded forward's bound). */
static moe_status clamp_lengths(prefill_flags *f, int64_t ctx) {
    if (f->min_len > f->max_len)
        return moe_error(MOE_ERR_CONFIG, "bench prefill: --min-len %d is above --max-len %d", f->min_len, f->max_len);
    if (f->max_len > ctx) {
        printf("# --max-len %d clamped to the model's context of %lld tokens\n", f->max_len, (long long)ctx);
        f->max_len = (int)ctx;
    }
    if (f->min_len > f->max_len) {
        printf("# --min-len %d clamped to %d\n", f->min_len, f->max_len);
        f->min_len = f->max_len;
    }
    if ((int64_t)f->batch * f->max_len > 1 << 24)
        return moe_error(MOE_ERR_CONFIG, "bench prefill: --batch %d x --max-len %d is over 16M tokens per forward",
                         f->batch, f->max_len);
    if (f->max_tokens == 0) f->max_tokens = f->batch * f->max_len;
    return MOE_OK;
}

static moe_status bench_prefill(prefill_flags *f) {
    prefill_mode mode = strcmp(f->mode, "packed") ? PREFILL_PADDED : PREFILL_PACKED;
    const char *device = f->src.device, *dtype = f->src.dtype;
    moe_source_flags sf = f->src;
    if (sf.model_dir) sf.device = sf.dtype = NULL; /* a hub folder loads on the host; the view goes to --device */
    moe_source src;
    MOE_TRY(moe_source_open(&src, &sf, MOE_SOURCE_MODEL));
    moe_device dev = device ? (strcmp(device, "cpu") ? MOE_CUDA : MOE_CPU) : src.dev;
    moe_dtype dt = dtype ? (strcmp(dtype, "f32") ? MOE_BF16 : MOE_F32) : dev == MOE_CUDA ? MOE_BF16 : MOE_F32;
    int vocab = src.model.cfg.model.vocab_size;
    prompts p = {0};
    moe_decoder *dec = NULL;
    moe_status s = clamp_lengths(f, src.model.cfg.model.seq_len);
    if (s == MOE_OK) s = prompts_draw(f->prompts, f->min_len, f->max_len, vocab, (uint64_t)f->seed, &p);
    if (s == MOE_OK) s = moe_decoder_open_on(&src.model, dev, dt, &dec);
    if (s == MOE_OK) s = run_bench(f, mode, dec, &p, vocab);
    moe_decoder_close(dec);
    prompts_free(&p);
    moe_source_close(&src);
    return s;
}

int moe_cmd_bench_prefill(int argc, char **argv) {
    prefill_flags f = {.mode = "packed", .prompts = 64, .min_len = 16, .max_len = 2048, .batch = 8, .warmup = 2,
                       .seed = 1};
    const moe_flag_spec specs[] = {
        MOE_SOURCE_FLAG_SPECS(f.src),
        {"--mode", MOE_FLAG_STRING, "M", 0, 0, "packed|padded", "prompts back to back, or batches padded to their longest",
         &f.mode},
        {"--prompts", MOE_FLAG_INT, "N", 1, 1 << 20, NULL, "prompts", &f.prompts},
        {"--min-len", MOE_FLAG_INT, "L", 1, 1 << 20, NULL, "shortest prompt", &f.min_len},
        {"--max-len", MOE_FLAG_INT, "L", 1, 1 << 20, NULL, "longest prompt (at most the model's context)", &f.max_len},
        {"--seed", MOE_FLAG_I64, "S", 0, 1e15, NULL, "the lengths' and ids' generator", &f.seed},
        {"--batch", MOE_FLAG_INT, "B", 1, 4096, NULL, "padded: prompts per forward", &f.batch},
        {"--max-tokens", MOE_FLAG_INT, "T", 0, 1 << 24, NULL, "packed: tokens per forward, 0 = batch x max-len",
         &f.max_tokens},
        {"--warmup", MOE_FLAG_INT, "W", 0, 100, NULL, "untimed passes first (the early ones pay page faults and set-up)",
         &f.warmup},
        {0}};
    moe_args a;
    int rc = moe_cli_parse("bench prefill",
                           "moe bench prefill --model DIR | --checkpoint FILE [--mode packed|padded] [flags]", specs,
                           argc, argv, 0, 0, NULL, &a);
    if (rc < 0) {
        moe_args_free(&a);
        moe_status s = bench_prefill(&f);
        rc = s == MOE_OK ? 0 : moe_cli_fail(s);
    }
    moe_arg_list_free(&f.src.sets);
    return rc;
}
