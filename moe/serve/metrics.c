/* Prometheus counters, gauges and histograms of the server (see metrics.h). */
#include "moe/serve/metrics.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const double latency_bounds[SERVE_HIST_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                          0.25,  0.5,    1,     2.5,  5,     10,   30};
static const double batch_bounds[SERVE_HIST_BUCKETS] = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256};

void serve_metrics_init(serve_metrics *m) {
    memset(m, 0, sizeof *m);
    pthread_mutex_init(&m->mu, NULL);
    m->ttft.bounds = latency_bounds;
    m->token_latency.bounds = latency_bounds;
    m->batch.bounds = batch_bounds;
    m->offloaded = -1;
}

void serve_metrics_free(serve_metrics *m) { pthread_mutex_destroy(&m->mu); }

static void hist_add(serve_hist *h, double v) {
    int i = 0;
    while (i < SERVE_HIST_BUCKETS && v > h->bounds[i]) i++;
    h->count[i]++;
    h->sum += v;
}

void serve_metrics_request(serve_metrics *m, int status) {
    if (status < 100 || status > 599) return;
    pthread_mutex_lock(&m->mu);
    m->by_status[status / 100][status % 100]++;
    pthread_mutex_unlock(&m->mu);
}

void serve_metrics_tokens(serve_metrics *m, int64_t prompt, int64_t generated) {
    pthread_mutex_lock(&m->mu);
    m->prompt_tokens += (uint64_t)prompt;
    m->generated_tokens += (uint64_t)generated;
    pthread_mutex_unlock(&m->mu);
}

void serve_metrics_cancelled(serve_metrics *m) {
    pthread_mutex_lock(&m->mu);
    m->cancelled++;
    pthread_mutex_unlock(&m->mu);
}

void serve_metrics_step(serve_metrics *m, int64_t queue_len, int64_t batch_size, int64_t kv_used, int64_t kv_total) {
    pthread_mutex_lock(&m->mu);
    m->queue_len = queue_len;
    m->batch_size = batch_size;
    m->kv_blocks_used = kv_used;
    m->kv_blocks_total = kv_total;
    if (batch_size > 0) hist_add(&m->batch, (double)batch_size);
    pthread_mutex_unlock(&m->mu);
}

void serve_metrics_expert_cache(serve_metrics *m, bool offloaded, int64_t hits, int64_t misses) {
    pthread_mutex_lock(&m->mu);
    m->offloaded = offloaded;
    m->expert_hits = hits;
    m->expert_misses = misses;
    pthread_mutex_unlock(&m->mu);
}

void serve_metrics_forwards(serve_metrics *m, const moe_token_sched_counts *c) {
    pthread_mutex_lock(&m->mu);
    m->forwards = *c;
    pthread_mutex_unlock(&m->mu);
}

void serve_metrics_ttft(serve_metrics *m, double s) {
    pthread_mutex_lock(&m->mu);
    hist_add(&m->ttft, s);
    pthread_mutex_unlock(&m->mu);
}

void serve_metrics_token_latency(serve_metrics *m, double s) {
    pthread_mutex_lock(&m->mu);
    hist_add(&m->token_latency, s);
    pthread_mutex_unlock(&m->mu);
}

typedef struct text_buf {
    char *p;
    size_t len, cap;
    int failed;
} text_buf;

static void put(text_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(text_buf *b, const char *fmt, ...) {
    if (b->failed) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) break;
        if (b->p && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap * 2 : 4096;
        while (cap < b->len + (size_t)n + 1) cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) break;
        b->p = q;
        b->cap = cap;
    }
    b->failed = 1;
}

static void put_hist(text_buf *b, const char *name, const char *help, const serve_hist *h) {
    put(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < SERVE_HIST_BUCKETS; i++) {
        cum += h->count[i];
        put(b, "%s_bucket{le=\"%g\"} %llu\n", name, h->bounds[i], (unsigned long long)cum);
    }
    cum += h->count[SERVE_HIST_BUCKETS];
    put(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name, (unsigned long long)cum, name, h->sum,
        name, (unsigned long long)cum);
}

/* The expert-cache lines (none before the first forward says whether experts are offloaded). */
static void put_expert_cache(text_buf *b, const serve_metrics *m) {
    if (m->offloaded < 0) return;
    put(b, "# HELP moe_expert_cache_offloaded 1 when routed experts live in host memory behind a device cache, 0 when "
           "all are resident.\n# TYPE moe_expert_cache_offloaded gauge\nmoe_expert_cache_offloaded %d\n", m->offloaded);
    int64_t uses = m->expert_hits + m->expert_misses;
    double rate = !m->offloaded ? 1.0 : uses > 0 ? (double)m->expert_hits / (double)uses : 0.0;
    if (m->offloaded)
        put(b, "# HELP moe_expert_cache_hits_total Routed-expert uses found in the device cache.\n"
               "# TYPE moe_expert_cache_hits_total counter\nmoe_expert_cache_hits_total %lld\n"
               "# HELP moe_expert_cache_misses_total Routed-expert uses not in the device cache.\n"
               "# TYPE moe_expert_cache_misses_total counter\nmoe_expert_cache_misses_total %lld\n",
            (long long)m->expert_hits, (long long)m->expert_misses);
    put(b, "# HELP moe_expert_cache_hit_rate Hits over uses of routed experts so far (1 when all are resident).\n"
           "# TYPE moe_expert_cache_hit_rate gauge\nmoe_expert_cache_hit_rate %.6f\n", rate);
}

/* Forwards and their distinct (MoE layer, routed expert) pairs, by kind. */
static void put_forwards(text_buf *b, const serve_metrics *m) {
    const moe_token_sched_counts *c = &m->forwards;
    put(b, "# HELP moe_forwards_total Model forwards: decode (one token per sequence; with --micro-batch one per "
           "micro-batch) or prefill (with prompt tokens).\n# TYPE moe_forwards_total counter\n"
           "moe_forwards_total{kind=\"decode\"} %lld\nmoe_forwards_total{kind=\"prefill\"} %lld\n",
        (long long)c->decode.forwards, (long long)c->prefill.forwards);
    put(b, "# HELP moe_forward_experts_total Distinct (MoE layer, routed expert) pairs per forward, summed: over "
           "moe_forwards_total, the experts a forward needs resident.\n# TYPE moe_forward_experts_total counter\n"
           "moe_forward_experts_total{kind=\"decode\"} %lld\nmoe_forward_experts_total{kind=\"prefill\"} %lld\n",
        (long long)c->decode.experts, (long long)c->prefill.experts);
}

char *serve_metrics_text(serve_metrics *m) {
    text_buf b = {0};
    pthread_mutex_lock(&m->mu);
    put(&b, "# HELP moe_requests_total HTTP requests answered, by status code.\n# TYPE moe_requests_total counter\n");
    for (int c = 1; c < 6; c++)
        for (int r = 0; r < 100; r++)
            if (m->by_status[c][r]) put(&b, "moe_requests_total{status=\"%d\"} %llu\n", c * 100 + r,
                                        (unsigned long long)m->by_status[c][r]);
    put(&b, "# HELP moe_prompt_tokens_total Prompt tokens of admitted requests.\n# TYPE moe_prompt_tokens_total counter\n"
            "moe_prompt_tokens_total %llu\n", (unsigned long long)m->prompt_tokens);
    put(&b, "# HELP moe_generated_tokens_total Tokens generated.\n# TYPE moe_generated_tokens_total counter\n"
            "moe_generated_tokens_total %llu\n", (unsigned long long)m->generated_tokens);
    put(&b, "# HELP moe_requests_cancelled_total Requests ended early: the client went away or the server stopped.\n"
            "# TYPE moe_requests_cancelled_total counter\nmoe_requests_cancelled_total %llu\n", (unsigned long long)m->cancelled);
    put(&b, "# HELP moe_queue_length Requests waiting for a sequence slot or KV blocks.\n# TYPE moe_queue_length gauge\n"
            "moe_queue_length %lld\n", (long long)m->queue_len);
    put(&b, "# HELP moe_batch_size Sequences in the last forward.\n# TYPE moe_batch_size gauge\nmoe_batch_size %lld\n",
        (long long)m->batch_size);
    put(&b, "# HELP moe_kv_blocks_used KV cache blocks in use.\n# TYPE moe_kv_blocks_used gauge\nmoe_kv_blocks_used %lld\n",
        (long long)m->kv_blocks_used);
    put(&b, "# HELP moe_kv_blocks_total KV cache blocks in the pool.\n# TYPE moe_kv_blocks_total gauge\n"
            "moe_kv_blocks_total %lld\n", (long long)m->kv_blocks_total);
    put_expert_cache(&b, m);
    put_forwards(&b, m);
    put_hist(&b, "moe_time_to_first_token_seconds", "Time from arrival to the first generated token.", &m->ttft);
    put_hist(&b, "moe_time_per_output_token_seconds", "Time between two generated tokens of a request.",
             &m->token_latency);
    put_hist(&b, "moe_batch_sequences", "Sequences per forward.", &m->batch);
    pthread_mutex_unlock(&m->mu);
    if (b.failed) {
        free(b.p);
        return NULL;
    }
    return b.p;
}
