/* The HTTP front (libmicrohttpd, one thread per connection): routes, request bodies, the
 * OpenAI endpoints answered whole or streamed as server-sent events, /health, /metrics,
 * /v1/models and the chat page. Connection threads only parse, submit and wait on their
 * request; a client that goes away (its socket hung up) cancels its request. */
#ifndef MOE_SERVE_HTTP_H
#define MOE_SERVE_HTTP_H

#include <stdbool.h>
#include <stddef.h>

#include "moe/serve/api.h"
#include "moe/serve/metrics.h"
#include "moe/serve/sched.h"

typedef struct serve_http_opts {
    const char *host;       /* an IPv4 or IPv6 address, or localhost */
    int port;               /* 0: any free port */
    unsigned timeout_s;     /* idle / slow client connection timeout */
    unsigned max_conns;     /* simultaneous connections */
    size_t max_body;        /* bytes; a larger body is answered 413 */
} serve_http_opts;

typedef struct serve_http {
    struct MHD_Daemon *daemon;
    serve_sched *sched;
    serve_metrics *metrics;
    const serve_api_ctx *api;
    serve_http_opts opts;
    int port;               /* the bound port */
} serve_http;

moe_status serve_http_start(serve_http *h, const serve_http_opts *opts, serve_sched *sched, serve_metrics *metrics,
                            const serve_api_ctx *api);
/* Stops accepting connections (the ones open go on). */
void serve_http_quiesce(serve_http *h);
/* Closes every connection and joins their threads (requests must have finished). */
void serve_http_stop(serve_http *h);

/* The chat page served at GET / (page.c). */
extern const char serve_chat_page[];

#endif
