/* `moe serve`: loads a Hugging Face hub folder or one of our checkpoints, starts the
 * scheduler thread and the HTTP server, prints "listening on http://HOST:PORT", and on
 * SIGINT / SIGTERM stops taking requests, lets the running ones finish (at most
 * --drain-seconds; a second signal cuts it short) and exits 0. Signals are taken by this
 * thread with sigtimedwait (blocked before any thread exists), never by a handler. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/fileio.h"
#include "moe/cli/args.h"
#include "moe/cli/cli.h"
#include "moe/cli/commands.h"
#include "moe/cli/offload.h"
#include "moe/cli/source.h"
#include "moe/hf/hf_model.h"
#include "moe/model/weights.h"
#include "moe/serve/http.h"

typedef struct serve_flags {
    const char *model_dir, *checkpoint, *host, *name, *device, *dtype, *experts;
    int port, max_batch, prefill_tokens, max_queue, timeout_s, max_conns, drain_s, eos;
    int64_t kv_tokens, max_body;
    moe_offload_flags offload;
    moe_schedule_flags sched; /* --micro-batch, --schedule: with --offload */
} serve_flags;

/* Everything the server holds. */
typedef struct server {
    moe_model model;
    bool model_loaded;
    moe_cli_decoder decoder; /* resident or offloaded */
    bool decoder_open;
    serve_text text;
    bool text_loaded;
    serve_engine engine;
    serve_metrics metrics;
    bool metrics_init;
    serve_sched sched;
    bool sched_started;
    serve_api_ctx api;
    serve_http http;
    char name[256];
} server;

/* Our checkpoint's master weights on the host in f32 and its tokenizer (stored, the config's BPE
 * file or hub folder, or bytes). */
static moe_status load_checkpoint(server *sv, const serve_flags *f) {
    char *text = NULL;
    moe_config cfg;
    MOE_TRY(moe_checkpoint_read_config(f->checkpoint, &text));
    moe_status s = moe_config_load_text(&cfg, text, f->checkpoint);
    free(text);
    MOE_TRY(s);
    cfg.train.device = MOE_CFG_DEVICE_CPU;
    cfg.train.dtype = MOE_CFG_DTYPE_F32;
    MOE_TRY(moe_config_validate(&cfg));
    double t0 = moe_source_load_begin(f->checkpoint, false);
    MOE_TRY(moe_model_init_for_load(&sv->model, &cfg, 0, 1)); /* the weights below fill every parameter */
    sv->model_loaded = true;
    MOE_TRY(moe_checkpoint_load_weights(f->checkpoint, &sv->model));
    moe_source_load_end(&sv->model, t0);
    if (cfg.data.tokenizer == MOE_CFG_TOKENIZER_HF) { /* a converted or fine-tuned hub model: the folder's tokenizer */
        sv->text_loaded = true;
        return serve_text_open_hf(&sv->text, cfg.data.tokenizer_path, &f->eos, f->eos >= 0);
    }
    moe_tokenizer *tok = NULL;
    MOE_TRY(moe_checkpoint_read_tokenizer(f->checkpoint, &tok));
    if (!tok && cfg.data.tokenizer == MOE_CFG_TOKENIZER_BPE) MOE_TRY(moe_tokenizer_load(cfg.data.tokenizer_path, &tok));
    if (!tok && !(tok = moe_tokenizer_byte())) return moe_error(MOE_ERR_OOM, "out of memory");
    if (moe_tokenizer_vocab_size(tok) > cfg.model.vocab_size) {
        int n = moe_tokenizer_vocab_size(tok);
        moe_tokenizer_free(tok);
        return moe_error(MOE_ERR_CONFIG, "the tokenizer has %d tokens, the model's vocabulary %d", n, cfg.model.vocab_size);
    }
    if (f->eos >= moe_tokenizer_vocab_size(tok)) {
        moe_tokenizer_free(tok);
        return moe_error(MOE_ERR_CONFIG, "--eos %d is not a token", f->eos);
    }
    sv->text_loaded = true;
    return serve_text_open_own(&sv->text, tok, f->eos);
}

static moe_status load_hub(server *sv, const serve_flags *f) {
    moe_hf_info info;
    double t0 = moe_source_load_begin(f->model_dir, true);
    MOE_TRY(moe_hf_load(f->model_dir, &sv->model, &info));
    sv->model_loaded = true;
    moe_source_load_end(&sv->model, t0);
    sv->text_loaded = true;
    MOE_TRY(serve_text_open_hf(&sv->text, f->model_dir, info.eos_ids, info.n_eos));
    if (sv->text.vocab > sv->model.cfg.model.vocab_size)
        return moe_error(MOE_ERR_CONFIG, "%s: the tokenizer has %d tokens, the model's vocabulary %d", f->model_dir,
                         sv->text.vocab, sv->model.cfg.model.vocab_size);
    return MOE_OK;
}

static void model_name(server *sv, const serve_flags *f) {
    const char *src = f->name ? f->name : f->model_dir ? f->model_dir : f->checkpoint;
    size_t n = strlen(src);
    while (!f->name && n > 1 && src[n - 1] == '/') n--;
    const char *base = src;
    for (size_t i = 0; !f->name && i + 1 < n; i++)
        if (src[i] == '/') base = src + i + 1;
    snprintf(sv->name, sizeof sv->name, "%.*s", (int)(n - (size_t)(base - src)), base);
}

static void expert_counts(void *ctx, int64_t *hits, int64_t *misses) {
    moe_offload_counts c = moe_offload_get_counts(ctx, -1);
    *hits = c.hits;
    *misses = c.misses;
}

static moe_status start(server *sv, const serve_flags *f) {
    if (!f->model_dir == !f->checkpoint) return moe_error(MOE_ERR_CONFIG, "serve: give --model DIR or --checkpoint FILE");
    MOE_TRY(moe_cli_offload_flags_check(&f->offload));
    MOE_TRY(moe_cli_schedule_check("serve", &f->sched, f->offload.predictor));
    if (f->sched.micro && !f->offload.offload)
        return moe_error(MOE_ERR_CONFIG, "serve: --micro-batch goes with --offload (it groups the experts a forward "
                         "needs in the cache)");
    MOE_TRY(f->model_dir ? load_hub(sv, f) : load_checkpoint(sv, f));
    model_name(sv, f);
    int64_t ctx = sv->model.cfg.model.seq_len;
    int64_t kv = f->kv_tokens > 0 ? f->kv_tokens : (int64_t)f->max_batch * ctx;
    moe_device dev;
    moe_dtype dt;
    MOE_TRY(moe_source_placement(f->device, f->dtype, &dev, &dt));
    MOE_TRY(moe_cli_decoder_open(&f->offload, &sv->model, dev, dt, f->max_batch, kv, f->max_batch + f->prefill_tokens,
                                 &sv->decoder));
    sv->decoder_open = true;
    moe_decoder_set_expert_path(sv->decoder.dec, moe_cli_expert_path(f->experts));
    serve_metrics_init(&sv->metrics);
    sv->metrics_init = true;
    serve_expert_counts counts = {.offloaded = sv->decoder.off != NULL, .counts = expert_counts, .ctx = sv->decoder.off};
    bool by_paths = moe_cli_schedule_by_paths(&f->sched, f->offload.predictor);
    serve_engine_opts eo = {.micro_batch = f->sched.micro, .predictor = by_paths ? sv->decoder.pred : NULL,
                            .metrics = &sv->metrics};
    MOE_TRY(serve_engine_open(sv->decoder.dec, counts, &eo, f->max_batch, kv, &sv->engine));
    serve_sched_opts so = {.max_queue = f->max_queue, .prefill_tokens = f->prefill_tokens};
    MOE_TRY(serve_sched_start(&sv->sched, &sv->engine, &sv->text, &sv->metrics, so));
    sv->sched_started = true;
    /* one sequence can use the whole context, unless the KV pool is smaller */
    int64_t seq_max = ctx < sv->engine.kv_tokens ? ctx : sv->engine.kv_tokens;
    sv->api = (serve_api_ctx){.text = &sv->text, .model_name = sv->name, .context = seq_max,
                              .seed_base = (uint64_t)time(NULL) * 1000003u};
    serve_http_opts ho = {.host = f->host, .port = f->port, .timeout_s = (unsigned)f->timeout_s,
                          .max_conns = (unsigned)f->max_conns, .max_body = (size_t)f->max_body};
    MOE_TRY(serve_http_start(&sv->http, &ho, &sv->sched, &sv->metrics, &sv->api));
    printf("listening on http://%s%s%s:%d\n", strchr(f->host, ':') ? "[" : "", f->host, strchr(f->host, ':') ? "]" : "",
           sv->http.port);
    fprintf(stderr, "serve: %s on %s %s, context %lld tokens, %d sequences, KV pool %lld tokens, prefill %d tokens per "
            "step\n", sv->name, moe_device_name(dev), moe_dtype_name(dt), (long long)ctx, f->max_batch,
            (long long)sv->engine.kv_tokens, f->prefill_tokens);
    if (f->sched.micro)
        fprintf(stderr, "serve: decode rows in micro-batches of %d sequences, %s\n", f->sched.micro,
                by_paths ? "grouped by predicted routing paths" : "in arrival order");
    fflush(stdout);
    return MOE_OK;
}

/* The next SIGINT / SIGTERM within ms milliseconds, or 0. */
static int wait_signal(const sigset_t *set, int ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    int sig = sigtimedwait(set, NULL, &ts);
    return sig > 0 ? sig : 0;
}

/* Stops taking requests and waits for the running ones (bounded). */
static void drain(server *sv, const sigset_t *set, int seconds) {
    serve_sched_close(&sv->sched);
    serve_http_quiesce(&sv->http);
    int left = serve_sched_active(&sv->sched);
    fprintf(stderr, "serve: stopping: %d request%s in flight (waiting at most %d s)\n", left, left == 1 ? "" : "s", seconds);
    double until = moe_clock_ms() + 1e3 * seconds;
    while (serve_sched_active(&sv->sched) > 0 && moe_clock_ms() < until)
        if (wait_signal(set, 50)) {
            fprintf(stderr, "serve: second signal: cancelling what is left\n");
            break;
        }
}

static void shutdown_all(server *sv) {
    if (sv->sched_started) serve_sched_stop(&sv->sched);
    serve_http_stop(&sv->http);
    if (sv->sched_started) serve_sched_free(&sv->sched);
    serve_engine_close(&sv->engine);
    if (sv->metrics_init) serve_metrics_free(&sv->metrics);
    if (sv->decoder_open) moe_cli_decoder_close(&sv->decoder);
    if (sv->text_loaded) serve_text_close(&sv->text);
    if (sv->model_loaded) moe_model_free(&sv->model);
}

static int run(const serve_flags *f) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL); /* before any thread: they all inherit it */
    signal(SIGPIPE, SIG_IGN);
    server *sv = calloc(1, sizeof *sv);
    if (!sv) return moe_cli_fail(moe_error(MOE_ERR_OOM, "out of memory"));
    moe_status s = start(sv, f);
    int sig = 0;
    while (s == MOE_OK && !(sig = wait_signal(&set, 1000))) {}
    if (s == MOE_OK) {
        fprintf(stderr, "serve: %s\n", strsignal(sig));
        drain(sv, &set, f->drain_s);
    }
    shutdown_all(sv);
    free(sv);
    if (s != MOE_OK) return moe_cli_fail(s);
    fprintf(stderr, "serve: stopped\n");
    return 0;
}

int moe_cmd_serve(int argc, char **argv) {
    serve_flags f = {.host = "127.0.0.1", .port = 8080, .max_batch = 8, .prefill_tokens = 512, .max_queue = 64,
                     .timeout_s = 30, .max_conns = 512, .drain_s = 30, .eos = -1, .kv_tokens = 0,
                     .max_body = 4 << 20};
    const char *usage = "moe serve --model DIR | --checkpoint FILE [flags]";
    const moe_flag_spec specs[] = {
        {"--model", MOE_FLAG_STRING, "DIR", 0, 0, NULL, "a Hugging Face hub folder (config.json, safetensors, tokenizer.json)", &f.model_dir},
        {"--checkpoint", MOE_FLAG_STRING, "FILE", 0, 0, NULL, "one of our checkpoints (.h5)", &f.checkpoint},
        {"--device", MOE_FLAG_STRING, "DEV", 0, 0, "cpu|cuda", "where to run (the weights load on the host; on cuda only "
         "the cast copy takes device memory)", &f.device},
        {"--dtype", MOE_FLAG_STRING, "T", 0, 0, "f32|bf16", "compute dtype (default: bf16 on cuda, f32 on the cpu)", &f.dtype},
        {"--host", MOE_FLAG_STRING, "ADDR", 0, 0, NULL, "address to listen on", &f.host},
        {"--port", MOE_FLAG_INT, "PORT", 0, 65535, NULL, "port to listen on, 0 = any free one (printed)", &f.port},
        {"--max-batch", MOE_FLAG_INT, "N", 1, 1024, NULL, "sequences decoded together", &f.max_batch},
        {"--max-tokens-in-flight", MOE_FLAG_I64, "M", 0, 1e12, NULL,
         "KV cache positions of all sequences together, 0 = max-batch x context", &f.kv_tokens},
        {"--prefill-tokens", MOE_FLAG_INT, "P", 1, 1 << 20, NULL, "prompt tokens packed into one forward", &f.prefill_tokens},
        {"--experts", MOE_FLAG_STRING, "PATH", 0, 0, MOE_CLI_EXPERTS_CHOICES, MOE_CLI_EXPERTS_HELP, &f.experts},
        {"--max-queue", MOE_FLAG_INT, "Q", 1, 1 << 20, NULL, "waiting requests before answering 429", &f.max_queue},
        {"--timeout", MOE_FLAG_INT, "S", 1, 3600, NULL, "seconds before an idle or slow connection is closed", &f.timeout_s},
        {"--max-connections", MOE_FLAG_INT, "N", 1, 100000, NULL, "simultaneous connections", &f.max_conns},
        {"--max-body", MOE_FLAG_I64, "BYTES", 1024, 1e9, NULL, "largest request body (else 413)", &f.max_body},
        {"--drain-seconds", MOE_FLAG_INT, "S", 0, 3600, NULL, "on SIGINT/SIGTERM, how long running requests may finish", &f.drain_s},
        {"--eos", MOE_FLAG_INT, "ID", -1, 1 << 24, NULL, "checkpoints: the end-of-sequence token, -1 = none", &f.eos},
        {"--name", MOE_FLAG_STRING, "NAME", 0, 0, NULL, "the model's name in the API (default: the folder or file name)", &f.name},
        MOE_OFFLOAD_FLAG_SPECS(f.offload),
        MOE_SCHEDULE_FLAG_SPECS(f.sched),
        {0}};
    moe_args a;
    moe_status s = moe_args_parse("serve", specs, argc, argv, &a);
    if (s != MOE_OK) return moe_cli_fail(s);
    int rc = -1;
    if (a.help) {
        moe_args_print_help(stdout, usage, specs);
        rc = 0;
    } else if (a.n_positional > 0) {
        rc = moe_cli_fail(moe_error(MOE_ERR_CONFIG, "serve: unexpected argument '%s' (moe serve --help lists the flags)", a.positional[0]));
    }
    moe_args_free(&a);
    return rc >= 0 ? rc : run(&f);
}
