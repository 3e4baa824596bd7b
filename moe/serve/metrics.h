/* The server's counters for GET /metrics (Prometheus text format 0.0.4): requests by HTTP
 * status, prompt and generated tokens, queue length, running batch size, KV blocks used,
 * the expert cache's hits, misses and hit rate (offloaded experts; resident: rate 1), the
 * model forwards and the distinct experts each routed to (decode and prefill), and
 * histograms of time to first token, time per generated token and batch size. Every
 * function may be called from any thread. */
#ifndef MOE_SERVE_METRICS_H
#define MOE_SERVE_METRICS_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "moe/offload/token_sched.h"

#define SERVE_HIST_BUCKETS 14

typedef struct serve_hist {
    const double *bounds; /* [SERVE_HIST_BUCKETS] upper bounds */
    uint64_t count[SERVE_HIST_BUCKETS + 1]; /* the last: +Inf */
    double sum;
} serve_hist;

typedef struct serve_metrics {
    pthread_mutex_t mu;
    uint64_t by_status[6][100]; /* [status / 100][status % 100] */
    uint64_t prompt_tokens, generated_tokens, cancelled;
    int64_t queue_len, batch_size, kv_blocks_used, kv_blocks_total;
    int offloaded;                      /* -1: not known yet, 0: experts resident, 1: offloaded */
    int64_t expert_hits, expert_misses; /* offloaded: routed-expert uses found / not found in the cache */
    moe_token_sched_counts forwards;    /* the engine's forwards and their distinct experts so far */
    serve_hist ttft, token_latency, batch;
} serve_metrics;

void serve_metrics_init(serve_metrics *m);
void serve_metrics_free(serve_metrics *m);
void serve_metrics_request(serve_metrics *m, int http_status);
void serve_metrics_tokens(serve_metrics *m, int64_t prompt, int64_t generated);
/* A request ended because its client went away (or the server stopped). */
void serve_metrics_cancelled(serve_metrics *m);
/* The scheduler's gauges after each step, and the step's batch size (sequences). */
void serve_metrics_step(serve_metrics *m, int64_t queue_len, int64_t batch_size, int64_t kv_blocks_used,
                        int64_t kv_blocks_total);
/* The expert cache's counters so far (offloaded), or that every expert is resident. */
void serve_metrics_expert_cache(serve_metrics *m, bool offloaded, int64_t hits, int64_t misses);
/* The engine's forward counters so far. */
void serve_metrics_forwards(serve_metrics *m, const moe_token_sched_counts *c);
void serve_metrics_ttft(serve_metrics *m, double seconds);
void serve_metrics_token_latency(serve_metrics *m, double seconds);
/* The text of GET /metrics (malloc'd), or NULL when out of memory. */
char *serve_metrics_text(serve_metrics *m);

#endif
