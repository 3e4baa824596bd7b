/* The scheduler: one thread owns the engine (the model) and runs continuous batching.
 *
 * HTTP threads submit requests (token ids and sampling settings) into a bounded queue and
 * wait on the request's condition variable for generated pieces; they never touch tensors.
 * Each step the scheduler
 *   1. drops cancelled requests (their slots and KV blocks come back),
 *   2. admits queued requests in arrival order while a sequence slot is free and the KV
 *      pool can hold the prompt plus max_tokens of every admitted request (else they wait),
 *   3. builds one batch: a token for each running sequence, then the prompts still to
 *      prefill packed first-fit-decreasing up to prefill_tokens tokens (a longer prompt is
 *      fed in chunks over several steps),
 *   4. runs the forward and, for every sequence whose prompt is complete, computes the
 *      log-probabilities asked for, samples, decodes, checks stop strings, and publishes
 *      a piece; finished requests leave the batch at once.
 * Requests join at the next step after they arrive. */
#ifndef MOE_SERVE_SCHED_H
#define MOE_SERVE_SCHED_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "moe/infer/sample.h"
#include "moe/serve/engine.h"
#include "moe/serve/metrics.h"
#include "moe/serve/text.h"

#define SERVE_MAX_TOP 5  /* top log-probabilities per token */
#define SERVE_MAX_STOP 4 /* stop strings per request */

typedef enum serve_finish {
    SERVE_RUNNING = 0,
    SERVE_FINISH_STOP,      /* an end-of-sequence token or a stop string */
    SERVE_FINISH_LENGTH,    /* max_tokens or the model's context */
    SERVE_FINISH_ERROR,     /* the engine failed: request->error says why */
    SERVE_FINISH_CANCELLED  /* the client went away or the server stopped */
} serve_finish;

typedef struct serve_logprob {
    int32_t id;
    float logprob;
    int n_top;
    int32_t top_id[SERVE_MAX_TOP];
    float top_logprob[SERVE_MAX_TOP];
} serve_logprob;

/* What one generated token added: its text (possibly "", held back while it may be part of
 * a stop string or an unfinished character) and its log-probabilities. */
typedef struct serve_piece {
    char *text;
    serve_logprob lp;
} serve_piece;

typedef struct serve_params {
    int max_tokens;         /* > 0 */
    moe_sampler sampler;
    char *stop[SERVE_MAX_STOP];
    int n_stop;
    int logprobs;           /* -1: none; else the number of top alternatives (0..SERVE_MAX_TOP) */
} serve_params;

typedef struct serve_request {
    /* set before submit, then read-only */
    int32_t *prompt;
    int n_prompt;
    serve_params p;
    double t_arrive;        /* moe_clock_ms */
    pthread_cond_t cv;      /* signalled (under the scheduler's mutex) for every new piece and at the end */

    /* under the scheduler's mutex */
    serve_piece *pieces;
    int n_pieces, cap_pieces;
    serve_finish finish;
    char error[256];
    int n_generated;        /* tokens generated (an end-of-sequence token not counted) */
    bool cancel;            /* asked by the HTTP side */
    int refs;               /* 2 while both sides hold it */

    /* the scheduler thread's own */
    int slot, n_fed;        /* sequence slot; prompt tokens in the cache */
    int chunk;              /* prompt tokens in the batch being run */
    int32_t last;           /* the token to feed next */
    int64_t reserved;       /* KV positions reserved at admission */
    double t_last;
    serve_detok detok;
    char *text;             /* everything decoded so far; text[0..sent) is published */
    size_t len, cap, sent;
    struct serve_request *next; /* the queue */
} serve_request;

typedef struct serve_sched_opts {
    int max_queue;          /* queued requests beyond which submit answers 429 */
    int prefill_tokens;     /* prompt tokens per forward */
} serve_sched_opts;

typedef struct serve_sched {
    pthread_mutex_t mu;
    pthread_cond_t cv;      /* wakes the scheduler */
    pthread_t thread;
    bool started, stop;
    bool closed;            /* no new requests (draining) */
    serve_request *head, *tail;
    int n_queued;
    int n_active;           /* requests submitted and not yet finished */
    serve_engine *eng;
    serve_text *text;
    serve_metrics *metrics;
    serve_sched_opts opts;
    serve_request **running; /* [eng->max_seqs] by slot */
    int n_running;
    int64_t reserved;       /* KV positions reserved by running requests */
    float *logits;          /* [max_seqs, vocab] */
    int32_t *b_tokens, *b_pos, *b_seq; /* [max batch tokens] */
    serve_request **b_rows; /* [max_seqs] the request of each logits row */
    double *scratch;        /* [vocab] */
} serve_sched;

typedef enum serve_submit_result {
    SERVE_SUBMIT_OK,
    SERVE_SUBMIT_FULL,      /* the queue is at its bound (429) */
    SERVE_SUBMIT_STOPPING,  /* the server is shutting down (503) */
    SERVE_SUBMIT_TOO_BIG    /* prompt + max_tokens can never fit the KV pool (400) */
} serve_submit_result;

moe_status serve_sched_start(serve_sched *s, serve_engine *eng, serve_text *text, serve_metrics *metrics,
                             serve_sched_opts opts);
/* Ends every request still queued or running as cancelled and joins the thread; the
 * HTTP side may still release its requests until serve_sched_free. */
void serve_sched_stop(serve_sched *s);
void serve_sched_free(serve_sched *s);

/* A request with prompt and params filled in (prompt malloc'd, stop strings malloc'd: the
 * request owns them); NULL when out of memory. */
serve_request *serve_request_new(void);
/* Queues r (the scheduler takes a reference). */
serve_submit_result serve_sched_submit(serve_sched *s, serve_request *r);
/* The HTTP side's end: cancels r if it is still running and drops the reference. */
void serve_request_release(serve_sched *s, serve_request *r);
/* Refuses new requests from now on (SERVE_SUBMIT_STOPPING); running ones go on. */
void serve_sched_close(serve_sched *s);
/* False once closed or stopping. */
bool serve_sched_is_open(serve_sched *s);
/* Requests submitted and not finished (for a drain). */
int serve_sched_active(serve_sched *s);

#endif
