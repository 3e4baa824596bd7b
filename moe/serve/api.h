/* The OpenAI API objects: request bodies of /v1/completions and /v1/chat/completions
 * checked and turned into a scheduler request, and the responses built back (whole, or as
 * server-sent-event chunks). Unknown fields are ignored; a field of the wrong type or out
 * of range is an error naming it. */
#ifndef MOE_SERVE_API_H
#define MOE_SERVE_API_H

#include <stdbool.h>
#include <stddef.h>

#include "moe/serve/sched.h"
#include "moe/serve/text.h"

typedef enum serve_api_kind { SERVE_API_COMPLETIONS, SERVE_API_CHAT } serve_api_kind;

/* An error answer: HTTP status and OpenAI's error object fields. */
typedef struct serve_api_error {
    int status;
    char message[512];
    const char *type;  /* "invalid_request_error", "server_error", ... */
    const char *param; /* the offending field, or NULL */
    const char *code;  /* e.g. "context_length_exceeded", or NULL */
} serve_api_error;

/* What the parser needs to know of the server. */
typedef struct serve_api_ctx {
    serve_text *text;
    const char *model_name;
    int64_t context;     /* positions one sequence may use: the model's context, or the KV pool if smaller */
    uint64_t seed_base;  /* seeds of requests without one: seed_base + a counter */
} serve_api_ctx;

/* One parsed call: the request for the scheduler and how to answer. */
typedef struct serve_call {
    serve_api_kind kind;
    bool stream, include_usage;
    serve_request *req;  /* owned by the call until submitted */
    char id[48];
    long long created;
} serve_call;

/* Parses body[0..len) into call (call->req allocated); false with *err filled on a bad
 * request (or out of memory: status 500). */
bool serve_api_parse(const serve_api_ctx *ctx, serve_api_kind kind, const char *body, size_t len, serve_call *call,
                     serve_api_error *err);

/* The error object's JSON text (malloc'd). */
char *serve_api_error_json(const serve_api_error *err);
void serve_api_set_error(serve_api_error *err, int status, const char *type, const char *param, const char *code,
                         const char *fmt, ...) __attribute__((format(printf, 6, 7)));

/* The whole response of a finished request from its pieces (malloc'd JSON). */
char *serve_api_response(const serve_api_ctx *ctx, const serve_call *call, const serve_piece *pieces, int n,
                         serve_finish finish, int n_generated);
/* One SSE event "data: {...}\n\n" for pieces[0..n) (the first event of a chat stream
 * carries the role too: first = true); finish != SERVE_RUNNING adds finish_reason. */
char *serve_api_chunk(const serve_api_ctx *ctx, const serve_call *call, const serve_piece *pieces, int n, bool first,
                      serve_finish finish);
/* The usage-only chunk of stream_options.include_usage. */
char *serve_api_usage_chunk(const serve_api_ctx *ctx, const serve_call *call, int n_generated);
/* GET /v1/models. */
char *serve_api_models(const serve_api_ctx *ctx);

#endif
