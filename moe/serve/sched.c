/* The scheduler thread: admission, packed prefill, continuous decode batches (sched.h). */
#include "moe/serve/sched.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileio.h"

static int64_t round_block(int64_t n) { return (n + MOE_KV_BLOCK - 1) / MOE_KV_BLOCK * MOE_KV_BLOCK; }
static int64_t kv_need(const serve_request *r) { return round_block((int64_t)r->n_prompt + r->p.max_tokens); }

serve_request *serve_request_new(void) {
    serve_request *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    pthread_cond_init(&r->cv, NULL);
    r->refs = 1;
    r->slot = -1;
    r->p.logprobs = -1;
    return r;
}

static void request_free(serve_request *r) {
    for (int i = 0; i < r->n_pieces; i++) free(r->pieces[i].text);
    free(r->pieces);
    for (int i = 0; i < r->p.n_stop; i++) free(r->p.stop[i]);
    free(r->prompt);
    free(r->text);
    serve_detok_free(&r->detok);
    pthread_cond_destroy(&r->cv);
    free(r);
}

/* Drops one reference (caller holds s->mu). */
static void unref(serve_request *r) {
    if (--r->refs == 0) request_free(r);
}

serve_submit_result serve_sched_submit(serve_sched *s, serve_request *r) {
    serve_submit_result res = SERVE_SUBMIT_OK;
    pthread_mutex_lock(&s->mu);
    if (s->stop || s->closed) res = SERVE_SUBMIT_STOPPING;
    else if (kv_need(r) > s->eng->kv_tokens) res = SERVE_SUBMIT_TOO_BIG;
    else if (s->n_queued >= s->opts.max_queue) res = SERVE_SUBMIT_FULL;
    if (res == SERVE_SUBMIT_OK) {
        r->refs++;
        r->t_arrive = moe_clock_ms();
        if (s->tail) s->tail->next = r;
        else s->head = r;
        s->tail = r;
        s->n_queued++;
        s->n_active++;
        pthread_cond_signal(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    return res;
}

void serve_request_release(serve_sched *s, serve_request *r) {
    pthread_mutex_lock(&s->mu);
    if (r->finish == SERVE_RUNNING && r->refs > 1) {
        r->cancel = true;
        pthread_cond_signal(&s->cv);
    }
    unref(r);
    pthread_mutex_unlock(&s->mu);
}

void serve_sched_close(serve_sched *s) {
    pthread_mutex_lock(&s->mu);
    s->closed = true;
    pthread_mutex_unlock(&s->mu);
}

bool serve_sched_is_open(serve_sched *s) {
    pthread_mutex_lock(&s->mu);
    bool open = !s->closed && !s->stop;
    pthread_mutex_unlock(&s->mu);
    return open;
}

int serve_sched_active(serve_sched *s) {
    pthread_mutex_lock(&s->mu);
    int n = s->n_active;
    pthread_mutex_unlock(&s->mu);
    return n;
}

/* ---- publishing (scheduler thread) ---- */

static void leave(serve_sched *s, serve_request *r);

/* Stores a piece (caller holds s->mu); false when out of memory. */
static bool store_piece(serve_request *r, char *text, const serve_logprob *lp) {
    if (!text) return false;
    if (r->n_pieces == r->cap_pieces) {
        int cap = r->cap_pieces ? 2 * r->cap_pieces : 16;
        serve_piece *p = realloc(r->pieces, sizeof *p * (size_t)cap);
        if (!p) {
            free(text);
            return false;
        }
        r->pieces = p;
        r->cap_pieces = cap;
    }
    r->pieces[r->n_pieces++] = (serve_piece){.text = text, .lp = lp ? *lp : (serve_logprob){0}};
    return true;
}

/* Publishes r->text[sent, to) (+ lp) as a piece and, when `finish`, ends r; wakes the
 * HTTP side. Out of memory ends r with an error. Returns whether r runs on (if not, r may
 * be gone). */
static bool publish(serve_sched *s, serve_request *r, size_t to, const serve_logprob *lp, serve_finish finish) {
    bool want = to > r->sent || lp;
    char *text = NULL;
    if (want && (text = malloc(to - r->sent + 1))) {
        if (to > r->sent) memcpy(text, r->text + r->sent, to - r->sent);
        text[to - r->sent] = '\0';
    }
    r->sent = to;
    pthread_mutex_lock(&s->mu);
    if (want && !store_piece(r, text, lp)) {
        finish = SERVE_FINISH_ERROR;
        snprintf(r->error, sizeof r->error, "out of memory for the generated text");
        leave(s, r);
    }
    if (finish != SERVE_RUNNING) {
        r->finish = finish;
        s->n_active--;
    }
    pthread_cond_broadcast(&r->cv);
    if (finish != SERVE_RUNNING) unref(r);
    pthread_mutex_unlock(&s->mu);
    return finish == SERVE_RUNNING;
}

/* Gives r's slot back (scheduler thread). */
static void leave(serve_sched *s, serve_request *r) {
    if (r->slot < 0) return;
    s->eng->seq_free(s->eng->impl, r->slot);
    s->running[r->slot] = NULL;
    s->n_running--;
    s->reserved -= r->reserved;
    r->slot = -1;
}

static void end_request(serve_sched *s, serve_request *r, serve_finish why, const char *error) {
    leave(s, r);
    if (why == SERVE_FINISH_CANCELLED) serve_metrics_cancelled(s->metrics);
    if (error) snprintf(r->error, sizeof r->error, "%s", error);
    publish(s, r, r->sent, NULL, why);
}

/* ---- one generated token ---- */

/* Where the text may be published up to: before the first stop string (then *stopped),
 * else before a tail that could begin one (everything when final). */
static size_t safe_end(const serve_request *r, bool final, bool *stopped) {
    *stopped = false;
    size_t best = r->len;
    for (int i = 0; i < r->p.n_stop; i++) {
        const char *hit = strstr(r->text + r->sent, r->p.stop[i]);
        if (hit && (size_t)(hit - r->text) < best) {
            best = (size_t)(hit - r->text);
            *stopped = true;
        }
    }
    if (*stopped || final) return best;
    for (int i = 0; i < r->p.n_stop; i++) {
        size_t n = strlen(r->p.stop[i]);
        for (size_t k = n - 1; k > 0; k--) /* longest proper prefix of the stop string ending the text */
            if (k <= r->len - r->sent && !memcmp(r->text + r->len - k, r->p.stop[i], k)) {
                if (r->len - k < best) best = r->len - k;
                break;
            }
    }
    return best;
}

/* log-softmax of logits[V] into lp (the chosen id's and the top n). */
static void logprobs(const float *logits, int V, int32_t id, int n_top, serve_logprob *lp) {
    double mx = -INFINITY, sum = 0;
    for (int i = 0; i < V; i++) mx = logits[i] > mx ? logits[i] : mx;
    for (int i = 0; i < V; i++) sum += exp((double)logits[i] - mx);
    double lse = mx + log(sum);
    lp->id = id;
    lp->logprob = (float)(logits[id] - lse);
    lp->n_top = 0;
    for (int k = 0; k < n_top && k < V; k++) { /* n_top <= 5: selection by passes */
        int best = -1;
        for (int i = 0; i < V; i++) {
            bool taken = false;
            for (int j = 0; j < k; j++) taken |= lp->top_id[j] == i;
            if (!taken && (best < 0 || logits[i] > logits[best])) best = i;
        }
        lp->top_id[k] = best;
        lp->top_logprob[k] = (float)(logits[best] - lse);
        lp->n_top++;
    }
}

/* Samples r's next token from its logits row and publishes what it adds. */
static void next_token(serve_sched *s, serve_request *r, const float *row) {
    int32_t tok;
    moe_status st = moe_sample(&r->p.sampler, row, s->text->vocab, &tok);
    if (st != MOE_OK) return end_request(s, r, SERVE_FINISH_ERROR, moe_last_error());
    double now = moe_clock_ms();
    if (r->n_generated == 0 && r->t_last == 0) serve_metrics_ttft(s->metrics, (now - r->t_arrive) / 1e3);
    else serve_metrics_token_latency(s->metrics, (now - r->t_last) / 1e3);
    r->t_last = now;
    serve_logprob lp, *lpp = NULL;
    if (r->p.logprobs >= 0) logprobs(row, s->text->vocab, tok, r->p.logprobs, lpp = &lp);
    bool eos = serve_text_is_eos(s->text, tok);
    if (!eos) {
        r->n_generated++;
        serve_metrics_tokens(s->metrics, 0, 1);
        st = serve_detok_push(&r->detok, tok, &r->text, &r->len, &r->cap);
    }
    bool length = !eos && (r->n_generated >= r->p.max_tokens || r->n_prompt + r->n_generated >= s->eng->context);
    if (st == MOE_OK && (eos || length)) st = serve_detok_finish(&r->detok, &r->text, &r->len, &r->cap);
    if (st != MOE_OK) return end_request(s, r, SERVE_FINISH_ERROR, moe_last_error());
    bool stopped;
    size_t end = safe_end(r, eos || length, &stopped);
    serve_finish fin = stopped || eos ? SERVE_FINISH_STOP : length ? SERVE_FINISH_LENGTH : SERVE_RUNNING;
    if (fin != SERVE_RUNNING) leave(s, r);
    if (publish(s, r, end, eos ? NULL : lpp, fin)) r->last = tok;
}

/* ---- admission and batches ---- */

/* Ends cancelled requests and admits queued ones (caller holds s->mu; returns with it). */
static void admit(serve_sched *s) {
    for (int i = 0; i < s->eng->max_seqs; i++) {
        serve_request *r = s->running[i];
        if (r && r->cancel) {
            pthread_mutex_unlock(&s->mu);
            end_request(s, r, SERVE_FINISH_CANCELLED, NULL);
            pthread_mutex_lock(&s->mu);
        }
    }
    for (serve_request **pp = &s->head; *pp;) { /* cancelled while queued */
        serve_request *r = *pp;
        if (!r->cancel) {
            pp = &r->next;
            continue;
        }
        *pp = r->next;
        s->n_queued--;
        serve_metrics_cancelled(s->metrics);
        r->finish = SERVE_FINISH_CANCELLED;
        s->n_active--;
        unref(r);
    }
    s->tail = NULL;
    for (serve_request *r = s->head; r; r = r->next) s->tail = r;
    while (s->head && s->n_running < s->eng->max_seqs && s->reserved + kv_need(s->head) <= s->eng->kv_tokens) {
        serve_request *r = s->head;
        s->head = r->next;
        if (!s->head) s->tail = NULL;
        s->n_queued--;
        int slot = 0;
        while (s->running[slot]) slot++;
        r->slot = slot;
        r->reserved = kv_need(r);
        s->reserved += r->reserved;
        s->running[slot] = r;
        s->n_running++;
        serve_detok_init(&r->detok, s->text);
        serve_metrics_tokens(s->metrics, r->n_prompt, 0);
    }
}

static int by_chunk_desc(const void *a, const void *b) {
    const serve_request *x = *(serve_request *const *)a, *y = *(serve_request *const *)b;
    if (x->chunk != y->chunk) return x->chunk < y->chunk ? 1 : -1;
    return x->slot - y->slot;
}

/* Adds n tokens of r starting at its position pos; returns the new token count. */
static int add_tokens(serve_sched *s, int nt, serve_request *r, const int32_t *tokens, int n, int pos) {
    for (int i = 0; i < n; i++) {
        s->b_tokens[nt + i] = tokens[i];
        s->b_pos[nt + i] = pos + i;
        s->b_seq[nt + i] = r->slot;
    }
    return nt + n;
}

/* The step's batch: one token per decoding sequence, then prompt chunks packed
 * first-fit-decreasing into prefill_tokens. Fills b_rows; returns the row count. */
static int build_batch(serve_sched *s, int *n_tokens) {
    int rows = 0, nt = 0, n_pre = 0;
    serve_request **pre = s->b_rows + s->eng->max_seqs; /* scratch half of b_rows */
    for (int i = 0; i < s->eng->max_seqs; i++) {
        serve_request *r = s->running[i];
        if (!r) continue;
        if (r->n_fed < r->n_prompt) {
            int left = r->n_prompt - r->n_fed;
            r->chunk = left < s->opts.prefill_tokens ? left : s->opts.prefill_tokens;
            pre[n_pre++] = r;
            continue;
        }
        r->chunk = 0;
        nt = add_tokens(s, nt, r, &r->last, 1, r->n_prompt + r->n_generated - 1);
        s->b_rows[rows++] = r;
    }
    qsort(pre, (size_t)n_pre, sizeof *pre, by_chunk_desc);
    int budget = s->opts.prefill_tokens;
    for (int i = 0; i < n_pre; i++) {
        serve_request *r = pre[i];
        if (r->chunk > budget) {
            r->chunk = 0;
            continue;
        }
        budget -= r->chunk;
        nt = add_tokens(s, nt, r, r->prompt + r->n_fed, r->chunk, r->n_fed);
        s->b_rows[rows++] = r;
    }
    *n_tokens = nt;
    return rows;
}

/* KV blocks the engine's pool has handed out. */
static int64_t blocks_used(serve_sched *s) {
    int64_t free_tok = s->eng->free_tokens(s->eng->impl);
    return free_tok >= s->eng->kv_tokens ? 0 : (s->eng->kv_tokens - free_tok) / MOE_KV_BLOCK;
}

/* The engine's expert-cache counters into the metrics. */
static void note_expert_cache(serve_sched *s) {
    int64_t hits = 0, misses = 0;
    bool offloaded = s->eng->expert_cache(s->eng->impl, &hits, &misses);
    serve_metrics_expert_cache(s->metrics, offloaded, hits, misses);
}

/* One forward of the running requests and what follows from it. */
static void step(serve_sched *s) {
    int nt = 0, rows = build_batch(s, &nt);
    if (rows == 0) return;
    moe_batch b = {.n_tokens = nt, .tokens = s->b_tokens, .pos = s->b_pos, .seq = s->b_seq, .logits = MOE_LOGITS_LAST};
    moe_status st = s->eng->forward(s->eng->impl, &b, s->logits);
    note_expert_cache(s);
    pthread_mutex_lock(&s->mu);
    serve_metrics_step(s->metrics, s->n_queued, rows, blocks_used(s), s->eng->kv_tokens / MOE_KV_BLOCK);
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < rows; i++) {
        serve_request *r = s->b_rows[i];
        if (st != MOE_OK) {
            end_request(s, r, SERVE_FINISH_ERROR, moe_last_error());
            continue;
        }
        r->n_fed += r->chunk;
        if (r->n_fed < r->n_prompt) continue; /* more of the prompt next step */
        next_token(s, r, s->logits + (size_t)i * s->eng->vocab);
    }
}

static void *sched_main(void *arg) {
    serve_sched *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        if (s->n_running == 0 && !s->head) /* idle: the gauges say so */
            serve_metrics_step(s->metrics, 0, 0, blocks_used(s), s->eng->kv_tokens / MOE_KV_BLOCK);
        while (!s->stop && s->n_running == 0 && !s->head) pthread_cond_wait(&s->cv, &s->mu);
        if (s->stop) break;
        admit(s);
        pthread_mutex_unlock(&s->mu);
        step(s);
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < s->eng->max_seqs; i++)
        if (s->running[i]) end_request(s, s->running[i], SERVE_FINISH_CANCELLED, "the server is stopping");
    pthread_mutex_lock(&s->mu);
    while (s->head) {
        serve_request *r = s->head;
        s->head = r->next;
        r->finish = SERVE_FINISH_CANCELLED;
        snprintf(r->error, sizeof r->error, "the server is stopping");
        s->n_active--;
        pthread_cond_broadcast(&r->cv);
        unref(r);
    }
    s->tail = NULL;
    s->n_queued = 0;
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

moe_status serve_sched_start(serve_sched *s, serve_engine *eng, serve_text *text, serve_metrics *metrics,
                             serve_sched_opts opts) {
    MOE_ASSERT(opts.max_queue > 0 && opts.prefill_tokens > 0, "bad scheduler options");
    memset(s, 0, sizeof *s);
    s->eng = eng;
    s->text = text;
    s->metrics = metrics;
    s->opts = opts;
    const size_t n = (size_t)eng->max_seqs, bt = n + (size_t)opts.prefill_tokens;
    s->running = calloc(n, sizeof *s->running);
    s->b_rows = calloc(2 * n, sizeof *s->b_rows);
    s->logits = malloc(sizeof *s->logits * n * (size_t)eng->vocab);
    s->b_tokens = malloc(sizeof(int32_t) * bt);
    s->b_pos = malloc(sizeof(int32_t) * bt);
    s->b_seq = malloc(sizeof(int32_t) * bt);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    if (!s->running || !s->b_rows || !s->logits || !s->b_tokens || !s->b_pos || !s->b_seq) {
        serve_sched_free(s);
        return moe_error(MOE_ERR_OOM, "out of memory for the scheduler's batch buffers");
    }
    note_expert_cache(s); /* before the thread: /metrics says resident or offloaded from the start */
    if (pthread_create(&s->thread, NULL, sched_main, s) != 0) {
        serve_sched_free(s);
        return moe_error(MOE_ERR_OOM, "cannot start the scheduler thread");
    }
    s->started = true;
    return MOE_OK;
}

void serve_sched_stop(serve_sched *s) {
    if (s->started) {
        pthread_mutex_lock(&s->mu);
        s->stop = true;
        pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->thread, NULL);
        s->started = false;
    }
}

void serve_sched_free(serve_sched *s) {
    serve_sched_stop(s);
    free(s->running);
    free(s->b_rows);
    free(s->logits);
    free(s->b_tokens);
    free(s->b_pos);
    free(s->b_seq);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    memset(s, 0, sizeof *s);
}
