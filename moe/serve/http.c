/* libmicrohttpd front of the server (see http.h). */
#define _GNU_SOURCE /* POLLRDHUP */
#include "moe/serve/http.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/fileio.h"

#define WAIT_SLICE_MS 50 /* how often a waiting connection looks at its socket */

typedef enum route { R_NONE, R_PAGE, R_HEALTH, R_METRICS, R_MODELS, R_COMPLETIONS, R_CHAT } route;

/* Per connection-request state (MHD's con_cls). */
typedef struct conn_state {
    route r;
    char *body;
    size_t len, cap;
    bool too_big;
} conn_state;

/* A streamed answer (the response's reader state). */
typedef struct stream_state {
    serve_http *h;
    struct MHD_Connection *conn;
    serve_call call;
    int taken;              /* pieces already sent */
    bool first, done;
    char *out;              /* formatted events not yet handed to MHD */
    size_t out_len, out_pos;
} stream_state;

/* ---- answers ---- */

static enum MHD_Result reply(serve_http *h, struct MHD_Connection *c, int status, const char *type, char *body,
                             enum MHD_ResponseMemoryMode mode) {
    if (!body) {
        status = 500;
        body = "{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,\"code\":null}}";
        mode = MHD_RESPMEM_PERSISTENT;
        type = "application/json";
    }
    struct MHD_Response *resp = MHD_create_response_from_buffer(strlen(body), body, mode);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    if (status == 429) MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, "1");
    enum MHD_Result ok = MHD_queue_response(c, (unsigned)status, resp);
    MHD_destroy_response(resp);
    serve_metrics_request(h->metrics, status);
    return ok;
}

static enum MHD_Result reply_error(serve_http *h, struct MHD_Connection *c, const serve_api_error *err) {
    return reply(h, c, err->status, "application/json", serve_api_error_json(err), MHD_RESPMEM_MUST_FREE);
}

static enum MHD_Result reply_simple_error(serve_http *h, struct MHD_Connection *c, int status, const char *type,
                                          const char *code, const char *message) {
    serve_api_error err;
    serve_api_set_error(&err, status, type, NULL, code, "%s", message);
    return reply_error(h, c, &err);
}

/* ---- waiting on a request ---- */

/* Whether the client hung up (its socket reads as closed). */
static bool client_gone(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return true;
    struct pollfd p = {.fd = ci->connect_fd, .events = POLLIN | POLLRDHUP};
    if (poll(&p, 1, 0) <= 0) return false;
    return (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

/* Waits (s->mu held) until r has pieces beyond `taken` or has finished; false when the
 * client went away first. */
static bool wait_progress(serve_sched *s, serve_request *r, int taken, struct MHD_Connection *c) {
    while (r->n_pieces == taken && r->finish == SERVE_RUNNING) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += WAIT_SLICE_MS * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&r->cv, &s->mu, &ts);
        if (r->n_pieces == taken && r->finish == SERVE_RUNNING && client_gone(c)) return false;
    }
    return true;
}

/* The finished request's error answer, or 0 when it ended normally. */
static int failure_status(const serve_request *r, serve_api_error *err) {
    if (r->finish == SERVE_FINISH_ERROR) {
        serve_api_set_error(err, 500, "server_error", NULL, NULL, "generation failed: %s", r->error);
        return 500;
    }
    if (r->finish == SERVE_FINISH_CANCELLED) {
        serve_api_set_error(err, 503, "server_error", NULL, NULL, "the request was cancelled: %s",
                            r->error[0] ? r->error : "the server is stopping");
        return 503;
    }
    return 0;
}

static enum MHD_Result answer_whole(serve_http *h, struct MHD_Connection *c, serve_call *call) {
    serve_request *r = call->req;
    serve_sched *s = h->sched;
    pthread_mutex_lock(&s->mu);
    while (r->finish == SERVE_RUNNING)
        if (!wait_progress(s, r, r->n_pieces, c)) {
            pthread_mutex_unlock(&s->mu);
            serve_request_release(s, r);
            serve_metrics_request(h->metrics, 499);
            return MHD_NO; /* closes the connection */
        }
    pthread_mutex_unlock(&s->mu); /* finished: the pieces no longer change */
    serve_api_error err;
    enum MHD_Result res;
    if (failure_status(r, &err)) res = reply_error(h, c, &err);
    else res = reply(h, c, 200, "application/json",
                     serve_api_response(h->api, call, r->pieces, r->n_pieces, r->finish, r->n_generated),
                     MHD_RESPMEM_MUST_FREE);
    serve_request_release(s, r);
    return res;
}

/* ---- streaming ---- */

static bool out_append(stream_state *st, char *event) {
    if (!event) return false;
    size_t n = strlen(event);
    char *p = realloc(st->out, st->out_len + n);
    if (!p) {
        free(event);
        return false;
    }
    memcpy(p + st->out_len, event, n);
    st->out = p;
    st->out_len += n;
    free(event);
    return true;
}

/* Formats the pieces after st->taken (and the end of the stream) into st->out. */
static bool format_events(stream_state *st, const serve_piece *pieces, int n, serve_finish finish, int n_generated) {
    const serve_api_ctx *api = st->h->api;
    const serve_call *call = &st->call;
    bool ok = true;
    if (st->first && call->kind == SERVE_API_CHAT) ok = out_append(st, serve_api_chunk(api, call, NULL, 0, true, SERVE_RUNNING));
    st->first = false;
    for (int i = 0; ok && i < n; i++)
        if (pieces[i].text[0] || call->req->p.logprobs >= 0)
            ok = out_append(st, serve_api_chunk(api, call, pieces + i, 1, false, SERVE_RUNNING));
    if (!ok || finish == SERVE_RUNNING) return ok;
    serve_api_error err;
    if (failure_status(call->req, &err)) {
        ok = out_append(st, strdup("data: ")) && out_append(st, serve_api_error_json(&err)) &&
             out_append(st, strdup("\n\n"));
    } else {
        ok = out_append(st, serve_api_chunk(api, call, NULL, 0, false, finish));
        if (ok && call->include_usage) ok = out_append(st, serve_api_usage_chunk(api, call, n_generated));
    }
    st->done = true;
    return ok && out_append(st, strdup("data: [DONE]\n\n"));
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    stream_state *st = cls;
    serve_sched *s = st->h->sched;
    serve_request *r = st->call.req;
    while (st->out_pos == st->out_len) {
        st->out_pos = st->out_len = 0;
        if (st->done) return MHD_CONTENT_READER_END_OF_STREAM;
        pthread_mutex_lock(&s->mu);
        if (!wait_progress(s, r, st->taken, st->conn)) {
            pthread_mutex_unlock(&s->mu);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
        int n = r->n_pieces - st->taken;
        serve_piece *copy = n ? malloc(sizeof *copy * (size_t)n) : NULL;
        if (copy) memcpy(copy, r->pieces + st->taken, sizeof *copy * (size_t)n);
        serve_finish finish = copy || n == 0 ? r->finish : SERVE_RUNNING;
        int n_generated = r->n_generated;
        pthread_mutex_unlock(&s->mu);
        if (n && !copy) return MHD_CONTENT_READER_END_WITH_ERROR;
        st->taken += n;
        bool ok = format_events(st, copy, n, finish, n_generated);
        free(copy);
        if (!ok) return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    size_t k = st->out_len - st->out_pos < max ? st->out_len - st->out_pos : max;
    memcpy(buf, st->out + st->out_pos, k);
    st->out_pos += k;
    return (ssize_t)k;
}

static void stream_free(void *cls) {
    stream_state *st = cls;
    serve_request_release(st->h->sched, st->call.req);
    free(st->out);
    free(st);
}

static enum MHD_Result answer_stream(serve_http *h, struct MHD_Connection *c, serve_call *call) {
    stream_state *st = calloc(1, sizeof *st);
    struct MHD_Response *resp =
        st ? MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_read, st, stream_free) : NULL;
    if (!resp) {
        free(st);
        serve_request_release(h->sched, call->req);
        return reply_simple_error(h, c, 500, "server_error", NULL, "out of memory");
    }
    *st = (stream_state){.h = h, .conn = c, .call = *call, .first = true};
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    enum MHD_Result ok = MHD_queue_response(c, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    serve_metrics_request(h->metrics, 200);
    return ok;
}

/* ---- the endpoints ---- */

static enum MHD_Result generate(serve_http *h, struct MHD_Connection *c, conn_state *cs) {
    serve_call call;
    serve_api_error err;
    if (!serve_api_parse(h->api, cs->r == R_CHAT ? SERVE_API_CHAT : SERVE_API_COMPLETIONS, cs->body ? cs->body : "",
                         cs->len, &call, &err)) {
        if (call.req) serve_request_release(h->sched, call.req);
        return reply_error(h, c, &err);
    }
    switch (serve_sched_submit(h->sched, call.req)) {
    case SERVE_SUBMIT_OK: break;
    case SERVE_SUBMIT_FULL:
        serve_request_release(h->sched, call.req);
        return reply_simple_error(h, c, 429, "rate_limit_error", "queue_full",
                                  "the server's queue is full, retry later");
    case SERVE_SUBMIT_STOPPING:
        serve_request_release(h->sched, call.req);
        return reply_simple_error(h, c, 503, "server_error", NULL, "the server is shutting down");
    case SERVE_SUBMIT_TOO_BIG:
        serve_request_release(h->sched, call.req);
        return reply_simple_error(h, c, 400, "invalid_request_error", "context_length_exceeded",
                                  "the prompt plus max_tokens exceed the KV cache of the server (--max-tokens-in-flight)");
    }
    return call.stream ? answer_stream(h, c, &call) : answer_whole(h, c, &call);
}

static enum MHD_Result dispatch(serve_http *h, struct MHD_Connection *c, conn_state *cs) {
    switch (cs->r) {
    case R_PAGE: return reply(h, c, 200, "text/html; charset=utf-8", (char *)serve_chat_page, MHD_RESPMEM_PERSISTENT);
    case R_HEALTH: {
        bool open = serve_sched_is_open(h->sched);
        return reply(h, c, open ? 200 : 503, "application/json",
                     open ? "{\"status\":\"ok\"}" : "{\"status\":\"stopping\"}", MHD_RESPMEM_PERSISTENT);
    }
    case R_METRICS: return reply(h, c, 200, "text/plain; version=0.0.4", serve_metrics_text(h->metrics), MHD_RESPMEM_MUST_FREE);
    case R_MODELS: return reply(h, c, 200, "application/json", serve_api_models(h->api), MHD_RESPMEM_MUST_FREE);
    case R_COMPLETIONS:
    case R_CHAT: return generate(h, c, cs);
    case R_NONE: break;
    }
    return MHD_NO;
}

/* The route of (method, url), or an error answer already queued (*answered). */
static route find_route(serve_http *h, struct MHD_Connection *c, const char *method, const char *url, enum MHD_Result *answered) {
    static const struct { const char *url; bool post; route r; } routes[] = {
        {"/", false, R_PAGE}, {"/health", false, R_HEALTH}, {"/metrics", false, R_METRICS},
        {"/v1/models", false, R_MODELS}, {"/v1/completions", true, R_COMPLETIONS}, {"/v1/chat/completions", true, R_CHAT}};
    for (size_t i = 0; i < sizeof routes / sizeof *routes; i++) {
        if (strcmp(url, routes[i].url)) continue;
        if (!strcmp(method, routes[i].post ? "POST" : "GET")) return routes[i].r;
        *answered = reply_simple_error(h, c, 405, "invalid_request_error", "method_not_allowed",
                                       routes[i].post ? "use POST" : "use GET");
        return R_NONE;
    }
    *answered = reply_simple_error(h, c, 404, "invalid_request_error", "not_found", "no such endpoint");
    return R_NONE;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    serve_http *h = cls;
    conn_state *cs = *con_cls;
    if (!cs) { /* headers only: route, and refuse an announced oversized body at once */
        if (!(cs = calloc(1, sizeof *cs))) return MHD_NO;
        *con_cls = cs;
        enum MHD_Result answered = MHD_NO;
        cs->r = find_route(h, c, method, url, &answered);
        if (cs->r == R_NONE) return answered;
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > h->opts.max_body) {
            cs->r = R_NONE;
            return reply_simple_error(h, c, 413, "invalid_request_error", "request_too_large", "the request body is too large");
        }
        return MHD_YES;
    }
    if (cs->r == R_NONE) { /* answered already: drop the rest of the body */
        *upload_size = 0;
        return MHD_YES;
    }
    if (*upload_size) {
        size_t n = *upload_size;
        *upload_size = 0;
        if (cs->too_big || cs->len + n > h->opts.max_body) {
            cs->too_big = true;
            return MHD_YES;
        }
        if (cs->len + n + 1 > cs->cap) {
            size_t cap = cs->cap ? cs->cap : 4096;
            while (cap < cs->len + n + 1) cap *= 2;
            char *p = realloc(cs->body, cap);
            if (!p) return MHD_NO;
            cs->body = p;
            cs->cap = cap;
        }
        memcpy(cs->body + cs->len, upload, n);
        cs->len += n;
        cs->body[cs->len] = '\0';
        return MHD_YES;
    }
    if (cs->too_big) return reply_simple_error(h, c, 413, "invalid_request_error", "request_too_large", "the request body is too large");
    return dispatch(h, c, cs);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    conn_state *cs = *con_cls;
    if (!cs) return;
    free(cs->body);
    free(cs);
    *con_cls = NULL;
}

moe_status serve_http_start(serve_http *h, const serve_http_opts *opts, serve_sched *sched, serve_metrics *metrics,
                            const serve_api_ctx *api) {
    memset(h, 0, sizeof *h);
    h->sched = sched;
    h->metrics = metrics;
    h->api = api;
    h->opts = *opts;
    struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opts->port)};
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)opts->port)};
    const char *host = strcmp(opts->host, "localhost") ? opts->host : "127.0.0.1";
    bool v6 = strchr(host, ':') != NULL;
    if (v6 ? inet_pton(AF_INET6, host, &a6.sin6_addr) != 1 : inet_pton(AF_INET, host, &a4.sin_addr) != 1)
        return moe_error(MOE_ERR_CONFIG, "--host %s is not an IP address (or localhost)", opts->host);
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL | MHD_USE_ITC |
                     (v6 ? MHD_USE_IPv6 : 0);
    h->daemon = MHD_start_daemon(flags, (uint16_t)opts->port, NULL, NULL, on_request, h,
                                 MHD_OPTION_SOCK_ADDR, v6 ? (struct sockaddr *)&a6 : (struct sockaddr *)&a4,
                                 MHD_OPTION_CONNECTION_TIMEOUT, opts->timeout_s,
                                 MHD_OPTION_CONNECTION_LIMIT, opts->max_conns,
                                 MHD_OPTION_NOTIFY_COMPLETED, on_completed, h,
                                 MHD_OPTION_END);
    if (!h->daemon) return moe_error(MOE_ERR_IO, "cannot listen on %s port %d (in use, or not an address of this machine)",
                                     opts->host, opts->port);
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(h->daemon, MHD_DAEMON_INFO_BIND_PORT);
    h->port = di ? di->port : opts->port;
    return MOE_OK;
}

void serve_http_quiesce(serve_http *h) {
    if (h->daemon) MHD_quiesce_daemon(h->daemon);
}

void serve_http_stop(serve_http *h) {
    if (h->daemon) MHD_stop_daemon(h->daemon);
    h->daemon = NULL;
}
