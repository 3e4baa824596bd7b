/* `moe generate`: continues a prompt with a model from a hub folder (--model DIR: its
 * tokenizer, chat template, end-of-sequence ids and sampling defaults) or from one of our
 * checkpoints (--checkpoint FILE). Writes the prompt, the new text and a newline to stdout
 * (with --print-ids a last line "IDS <prompt ids> <new ids>"), then a timing line to stderr.
 * When prompt and new tokens outgrow the model's context the window slides: the model goes
 * on from the last half of the context, its cache recomputed. */
#include "moe/cli/commands.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileio.h"
#include "core/memory.h"
#include "moe/cli/cli.h"
#include "moe/cli/offload.h"
#include "moe/cli/source.h"
#include "moe/infer/decoder.h"
#include "moe/infer/sample.h"

typedef struct gen_flags {
    moe_source_flags src;
    moe_offload_flags offload;
    const char *prompt, *prompt_file, *prompt_ids;
    int tokens, eos, top_k;
    int64_t seed;
    double temperature, top_p;
    bool chat, print_ids, ignore_eos;
} gen_flags;

/* Flag values that mean "not given: the model's default". */
#define EOS_MODEL (-2)
#define TOP_K_MODEL (-1)

/* Text out as tokens come: our tokenizers' bytes as they are, a hub tokenizer's through its
 * streaming decoder (valid UTF-8, pieces that later ids cannot change). */
typedef struct gen_out {
    const serve_text *text; /* NULL: ids only */
    serve_detok detok;
    char *buf;
    size_t len, cap;
} gen_out;

static moe_status emit(gen_out *o, int32_t id) {
    if (!o->text) return MOE_OK;
    if (o->text->own) {
        size_t n = 0;
        const uint8_t *bytes = moe_tokenizer_token_bytes(o->text->own, id, &n);
        fwrite(bytes, 1, n, stdout);
    } else {
        MOE_TRY(serve_detok_push(&o->detok, id, &o->buf, &o->len, &o->cap));
        fwrite(o->buf, 1, o->len, stdout);
        o->len = 0;
    }
    fflush(stdout);
    return MOE_OK;
}

static moe_status emit_finish(gen_out *o) {
    if (!o->text || o->text->own) return MOE_OK;
    MOE_TRY(serve_detok_finish(&o->detok, &o->buf, &o->len, &o->cap));
    fwrite(o->buf, 1, o->len, stdout);
    o->len = 0;
    return MOE_OK;
}

/* One generation: the context (prompt, then the new tokens) and the part of it the
 * model's cache holds. */
typedef struct gen_run {
    moe_decoder *dec;     /* the model's weights in its compute dtype */
    moe_decode_state *st; /* one sequence's cache, window tokens */
    moe_sampler sampler;
    int V;                /* ids the sampler draws from: the tokenizer's (else the model's) */
    int window;           /* the model's context, model.seq_len */
    const int32_t *stop;  /* end-of-sequence ids [n_stop] */
    int n_stop;
    bool ban_stop;        /* the end ids are never drawn (all n tokens are generated) */
    int32_t *ctx;         /* [prompt + new tokens] */
    int len;              /* tokens in ctx */
    int in_cache;         /* the last in_cache tokens of ctx are in the model's cache */
    int slides;           /* times the window was moved */
    float *logits;        /* [model vocab], the logits after the last fed token */
} gen_run;

/* Starts the cache over with the last `keep` tokens of the context. */
static moe_status refill(gen_run *g, int keep) {
    MOE_TRY(moe_decode_state_seq_free(g->st, 0));
    moe_step_reset();
    MOE_TRY(moe_decoder_feed(g->dec, g->st, 0, g->ctx + g->len - keep, keep, g->logits));
    g->in_cache = keep;
    return MOE_OK;
}

/* Feeds the newest token: one step, or when the window is full, a refill with the last
 * half of it (the sliding window), said once on stderr. */
static moe_status advance(gen_run *g) {
    if (g->in_cache < g->window) {
        moe_step_reset();
        MOE_TRY(moe_decoder_feed(g->dec, g->st, 0, &g->ctx[g->len - 1], 1, g->logits));
        g->in_cache++;
        return MOE_OK;
    }
    int keep = g->window > 1 ? g->window / 2 : 1;
    if (g->slides++ == 0)
        fprintf(stderr, "generate: the model's context of %d tokens is full: it goes on from the last %d tokens "
                "(the cache recomputed each time the window fills)\n", g->window, keep);
    return refill(g, keep);
}

static bool is_stop(const gen_run *g, int32_t id) {
    for (int i = 0; i < g->n_stop; i++)
        if (g->stop[i] == id) return true;
    return false;
}

/* Draws up to n_new tokens after the prompt, emitting each as it comes; stops early at an
 * end-of-sequence id (not emitted) unless they are banned. */
static moe_status generate(gen_run *g, int n_new, gen_out *out, int *made, int32_t *stopped_at) {
    *made = 0;
    *stopped_at = -1;
    for (int i = 0; i < n_new; i++) {
        for (int e = 0; g->ban_stop && e < g->n_stop; e++)
            if (g->stop[e] >= 0 && g->stop[e] < g->V) g->logits[g->stop[e]] = -FLT_MAX;
        int32_t next;
        MOE_TRY(moe_sample(&g->sampler, g->logits, g->V, &next));
        if (!g->ban_stop && is_stop(g, next)) {
            *stopped_at = next;
            break;
        }
        g->ctx[g->len++] = next;
        MOE_TRY(emit(out, next));
        ++*made;
        if (i + 1 < n_new) MOE_TRY(advance(g));
    }
    return MOE_OK;
}

/* The prompt's text: --prompt, --prompt-file or "The ", rendered by the chat template as a
 * user message with --chat. */
static moe_status prompt_text(const gen_flags *gf, moe_source *src, char **text, size_t *len) {
    if (gf->prompt_file) {
        MOE_TRY(moe_cli_read_text(gf->prompt_file, text, len));
    } else {
        const char *p = gf->prompt ? gf->prompt : "The ";
        if (!(*text = strdup(p))) return moe_error(MOE_ERR_OOM, "out of memory");
        *len = strlen(p);
    }
    if (!gf->chat) return MOE_OK;
    cJSON *msgs = cJSON_CreateArray(), *m = cJSON_CreateObject();
    cJSON_AddItemToArray(msgs, m);
    cJSON_AddStringToObject(m, "role", "user");
    cJSON_AddStringToObject(m, "content", *text);
    char *rendered = NULL;
    moe_status s = serve_text_chat_prompt(&src->text, msgs, &rendered);
    cJSON_Delete(msgs);
    free(*text);
    *text = rendered;
    *len = rendered ? strlen(rendered) : 0;
    return s;
}

/* The prompt's tokens into g->ctx (with room for n_new more); its text to stdout. */
static moe_status encode_prompt(const gen_flags *gf, moe_source *src, gen_run *g, gen_out *out) {
    moe_token_buf buf = {0};
    char *text = NULL;
    size_t len = 0;
    moe_status s;
    if (gf->prompt_ids) {
        s = moe_cli_parse_ids("--prompt-ids", gf->prompt_ids, src->cfg.model.vocab_size, MOE_IDS_EMPTY_REFUSED, &buf);
    } else {
        s = prompt_text(gf, src, &text, &len);
        if (s == MOE_OK) s = serve_text_encode(&src->text, text, len, !gf->chat, &buf);
        if (s == MOE_OK && !buf.len) s = moe_error(MOE_ERR_INVALID, "the prompt is empty");
    }
    if (s == MOE_OK && !(g->ctx = malloc(sizeof *g->ctx * (buf.len + (size_t)gf->tokens))))
        s = moe_error(MOE_ERR_OOM, "out of memory for %zu tokens", buf.len + (size_t)gf->tokens);
    if (s == MOE_OK) {
        memcpy(g->ctx, buf.data, sizeof *g->ctx * buf.len);
        g->len = (int)buf.len;
    }
    if (s == MOE_OK && text) fwrite(text, 1, len, stdout);
    for (size_t i = 0; s == MOE_OK && !text && i < buf.len; i++) s = emit(out, buf.data[i]);
    free(text);
    moe_token_buf_free(&buf);
    return s;
}

static void print_ids(const gen_run *g) {
    fputs("IDS", stdout);
    for (int i = 0; i < g->len; i++) printf(" %d", g->ctx[i]);
    fputc('\n', stdout);
}

/* The sampler and the end ids: the flags where given, else the model's defaults. */
static moe_status setup_run(const gen_flags *gf, moe_source *src, gen_run *g, int32_t *eos_flag) {
    moe_sampler sp = src->sampling;
    if (!isnan(gf->temperature)) sp.temperature = gf->temperature;
    if (gf->top_k != TOP_K_MODEL) sp.top_k = gf->top_k;
    if (!isnan(gf->top_p)) sp.top_p = gf->top_p;
    sp.seed = (uint64_t)gf->seed;
    sp.counter = 0;
    *g = (gen_run){.sampler = sp, .V = moe_source_vocab(src), .window = src->cfg.model.seq_len,
                   .stop = src->has_text ? src->text.eos : src->eos,
                   .n_stop = src->has_text ? src->text.n_eos : src->n_eos, .ban_stop = gf->ignore_eos};
    if (gf->eos != EOS_MODEL) {
        *eos_flag = gf->eos;
        g->stop = eos_flag;
        g->n_stop = gf->eos >= 0;
    }
    if (gf->eos >= g->V)
        return moe_error(MOE_ERR_CONFIG, "generate: --eos %d is not a token (the vocabulary has %d)", gf->eos, g->V);
    return MOE_OK;
}

/* Generation after the model and tokenizer are loaded: prompt, tokens, timing line. */
static moe_status run_generation(const gen_flags *gf, moe_source *src) {
    gen_run g;
    int32_t eos_flag;
    MOE_TRY(setup_run(gf, src, &g, &eos_flag));
    gen_out out = {.text = src->has_text ? &src->text : NULL};
    if (out.text) serve_detok_init(&out.detok, out.text);
    /* the decoder first: a budget it refuses stops the run before the prompt is echoed */
    moe_cli_decoder cd = {0};
    moe_status s = moe_cli_decoder_open(&gf->offload, &src->model, src->dev, src->dtype, 1, g.window, g.window, &cd);
    g.dec = cd.dec;
    if (s == MOE_OK) s = encode_prompt(gf, src, &g, &out);
    if (s == MOE_OK && !(g.logits = malloc(sizeof *g.logits * (size_t)src->cfg.model.vocab_size)))
        s = moe_error(MOE_ERR_OOM, "out of memory for the logits");
    /* the cache never holds more than the window, nor more than the whole context */
    int64_t kv = (int64_t)g.len + gf->tokens < g.window ? (int64_t)g.len + gf->tokens : g.window;
    if (s == MOE_OK) s = moe_decode_state_create(g.dec, 1, kv, &g.st);
    if (s == MOE_OK && g.len > g.window)
        fprintf(stderr, "generate: the prompt has %d tokens, the model's context %d: it sees the last %d\n", g.len,
                g.window, g.window);
    const double t0 = moe_clock_ms();
    if (s == MOE_OK) s = refill(&g, g.len < g.window ? g.len : g.window);
    const double t_prompt = moe_clock_ms();
    int made = 0;
    int32_t stopped_at = -1;
    if (s == MOE_OK) s = generate(&g, gf->tokens, &out, &made, &stopped_at);
    if (s == MOE_OK) s = emit_finish(&out);
    if (s == MOE_OK) {
        printf("\n");
        if (gf->print_ids) print_ids(&g);
        fflush(stdout);
    }
    const double t_end = moe_clock_ms();
    if (s == MOE_OK && stopped_at >= 0) fprintf(stderr, "generate: stopped at the end-of-sequence token %d\n", stopped_at);
    /* the prompt in one forward; then per new token a sample and a forward */
    if (s == MOE_OK)
        fprintf(stderr, "generate: prompt of %d tokens in %.1f ms, %d new tokens in %.1f ms (%.1f tokens/s) on %s %s\n",
                g.len - made, t_prompt - t0, made, t_end - t_prompt, made > 0 ? 1e3 * made / (t_end - t_prompt) : 0.0,
                moe_device_name(src->dev), moe_dtype_name(src->dtype));
    if (out.text) serve_detok_free(&out.detok);
    free(out.buf);
    moe_decode_state_free(g.st);
    moe_cli_decoder_close(&cd);
    free(g.ctx);
    free(g.logits);
    return s;
}

static moe_status run_generate(const gen_flags *gf) {
    int prompts = !!gf->prompt + !!gf->prompt_file + !!gf->prompt_ids;
    if (prompts > 1) return moe_error(MOE_ERR_CONFIG, "generate: give --prompt, --prompt-file or --prompt-ids, not both");
    if (gf->chat && gf->prompt_ids) return moe_error(MOE_ERR_CONFIG, "generate: --chat renders a text prompt, not --prompt-ids");
    MOE_TRY(moe_cli_offload_flags_check(&gf->offload));
    moe_source src;
    unsigned parts = MOE_SOURCE_MODEL | (gf->prompt_ids ? MOE_SOURCE_TEXT_IF_ANY : MOE_SOURCE_TEXT);
    MOE_TRY(moe_source_open(&src, &gf->src, parts));
    moe_status s = run_generation(gf, &src);
    moe_source_close(&src);
    return s;
}

int moe_cmd_generate(int argc, char **argv) {
    gen_flags gf = {.tokens = 200, .eos = EOS_MODEL, .top_k = TOP_K_MODEL, .seed = 1, .temperature = NAN, .top_p = NAN};
    const moe_flag_spec specs[] = {
        MOE_SOURCE_FLAG_SPECS(gf.src),
        MOE_OFFLOAD_FLAG_SPECS(gf.offload),
        {"--prompt", MOE_FLAG_STRING, "TEXT", 0, 0, NULL, "the text to continue (default \"The \")", &gf.prompt},
        {"--prompt-file", MOE_FLAG_STRING, "F", 0, 0, NULL, "read the prompt from a file (- = standard input)",
         &gf.prompt_file},
        {"--prompt-ids", MOE_FLAG_STRING, "IDS", 0, 0, NULL, "the prompt as token ids, e.g. 5,17,42", &gf.prompt_ids},
        {"--chat", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "send the prompt as a user message through the model's chat template",
         &gf.chat},
        {"--tokens", MOE_FLAG_INT, "N", 1, 10000000, NULL, "new tokens to generate", &gf.tokens},
        {"--temperature", MOE_FLAG_DOUBLE, "T", 0, 100, NULL, "softmax temperature, 0 = greedy", &gf.temperature,
         .default_text = "generation_config.json's (greedy unless do_sample), checkpoints 0.8"},
        {"--top-k", MOE_FLAG_INT, "K", 0, 1 << 24, NULL, "draw from the K most probable tokens, 0 = all", &gf.top_k,
         .default_text = "generation_config.json's (50), checkpoints 0"},
        {"--top-p", MOE_FLAG_DOUBLE, "P", 0, 1, NULL, "draw from the smallest set holding mass P, 1 = all", &gf.top_p,
         .default_text = "generation_config.json's (1), checkpoints 0.95"},
        {"--seed", MOE_FLAG_I64, "S", 0, 9007199254740992.0, NULL, "random seed of the draws", &gf.seed},
        {"--eos", MOE_FLAG_INT, "ID", -1, 1 << 24, NULL, "stop when this token is drawn, -1 = never", &gf.eos,
         .default_text = "the model's end-of-sequence ids, checkpoints -1"},
        {"--ignore-eos", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "never draw an end-of-sequence id: all N tokens are generated",
         &gf.ignore_eos},
        {"--print-ids", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "end with a line IDS <prompt ids> <new ids>", &gf.print_ids},
        {0}};
    moe_args a;
    int rc = moe_cli_parse("generate", "moe generate --model DIR | --checkpoint FILE [flags]", specs, argc, argv, 0, 0,
                           NULL, &a);
    if (rc < 0) {
        moe_args_free(&a);
        moe_status s = run_generate(&gf);
        rc = s == MOE_OK ? 0 : moe_cli_fail(s);
    }
    moe_arg_list_free(&gf.src.sets);
    return rc;
}
