/* OpenAI request parsing and response objects (see api.h). */
#include "moe/serve/api.h"

#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static atomic_ullong call_counter;

void serve_api_set_error(serve_api_error *err, int status, const char *type, const char *param, const char *code,
                         const char *fmt, ...) {
    err->status = status;
    err->type = type;
    err->param = param;
    err->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
}

#define BAD(err, param, ...) (serve_api_set_error((err), 400, "invalid_request_error", (param), NULL, __VA_ARGS__), false)

char *serve_api_error_json(const serve_api_error *err) {
    cJSON *root = cJSON_CreateObject(), *e = cJSON_AddObjectToObject(root, "error");
    cJSON_AddStringToObject(e, "message", err->message);
    cJSON_AddStringToObject(e, "type", err->type ? err->type : "invalid_request_error");
    if (err->param) cJSON_AddStringToObject(e, "param", err->param);
    else cJSON_AddNullToObject(e, "param");
    if (err->code) cJSON_AddStringToObject(e, "code", err->code);
    else cJSON_AddNullToObject(e, "code");
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
}

/* ---- typed fields: absent or null leaves *out as it is ---- */

static bool get_number(const cJSON *o, const char *name, double lo, double hi, double *out, serve_api_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!v || cJSON_IsNull(v)) return true;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) return BAD(err, name, "'%s' must be a number", name);
    if (v->valuedouble < lo || v->valuedouble > hi)
        return BAD(err, name, "'%s' is %g, it must be between %g and %g", name, v->valuedouble, lo, hi);
    *out = v->valuedouble;
    return true;
}

static bool get_int(const cJSON *o, const char *name, double lo, double hi, int64_t *out, serve_api_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!v || cJSON_IsNull(v)) return true;
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || !isfinite(v->valuedouble))
        return BAD(err, name, "'%s' must be an integer", name);
    if (v->valuedouble < lo || v->valuedouble > hi)
        return BAD(err, name, "'%s' is %.0f, it must be between %.0f and %.0f", name, v->valuedouble, lo, hi);
    *out = (int64_t)v->valuedouble;
    return true;
}

static bool get_bool(const cJSON *o, const char *name, bool *out, serve_api_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!v || cJSON_IsNull(v)) return true;
    if (!cJSON_IsBool(v)) return BAD(err, name, "'%s' must be true or false", name);
    *out = cJSON_IsTrue(v);
    return true;
}

static bool get_stop(const cJSON *o, serve_params *p, serve_api_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "stop");
    if (!v || cJSON_IsNull(v)) return true;
    if (cJSON_IsString(v)) {
        if (!v->valuestring[0]) return BAD(err, "stop", "'stop' must not be empty");
        p->stop[p->n_stop++] = strdup(v->valuestring);
        return true;
    }
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) > SERVE_MAX_STOP)
        return BAD(err, "stop", "'stop' must be a string or an array of up to %d strings", SERVE_MAX_STOP);
    const cJSON *e;
    cJSON_ArrayForEach(e, v) {
        if (!cJSON_IsString(e) || !e->valuestring[0]) return BAD(err, "stop", "'stop' must hold non-empty strings");
        p->stop[p->n_stop++] = strdup(e->valuestring);
    }
    return true;
}

/* ---- prompts ---- */

static bool encode(const serve_api_ctx *ctx, const char *text, bool add_special, moe_token_buf *buf,
                   serve_api_error *err) {
    if (serve_text_encode(ctx->text, text, strlen(text), add_special, buf) != MOE_OK) {
        serve_api_set_error(err, 500, "server_error", NULL, NULL, "cannot tokenize the prompt: %s", moe_last_error());
        return false;
    }
    return true;
}

/* "prompt": a string, an array of one string, or an array of token ids. */
static bool completion_prompt(const serve_api_ctx *ctx, const cJSON *root, moe_token_buf *buf, serve_api_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "prompt");
    if (!v) return BAD(err, "prompt", "'prompt' is required");
    if (cJSON_IsArray(v) && cJSON_GetArraySize(v) == 1 && cJSON_IsString(cJSON_GetArrayItem(v, 0)))
        v = cJSON_GetArrayItem(v, 0);
    if (cJSON_IsString(v)) return encode(ctx, v->valuestring, true, buf, err);
    if (!cJSON_IsArray(v)) return BAD(err, "prompt", "'prompt' must be a string or an array of token ids");
    const cJSON *e;
    cJSON_ArrayForEach(e, v) {
        if (!cJSON_IsNumber(e) || e->valuedouble != floor(e->valuedouble) || e->valuedouble < 0 ||
            e->valuedouble >= ctx->text->vocab)
            return BAD(err, "prompt", "'prompt' must be a string or an array of token ids in [0, %d)", ctx->text->vocab);
        int32_t id = (int32_t)e->valuedouble;
        if (buf->len == buf->cap) {
            size_t cap = buf->cap ? 2 * buf->cap : 64;
            int32_t *p = realloc(buf->data, sizeof *p * cap);
            if (!p) return serve_api_set_error(err, 500, "server_error", NULL, NULL, "out of memory"), false;
            buf->data = p;
            buf->cap = cap;
        }
        buf->data[buf->len++] = id;
    }
    return true;
}

/* A message's content: a string or an array of {"type": "text", "text": ...} parts (joined). */
static bool message_content(const cJSON *m, cJSON *out, serve_api_error *err) {
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content");
    if (cJSON_IsString(c)) return cJSON_AddStringToObject(out, "content", c->valuestring) != NULL;
    if (!c || cJSON_IsNull(c)) return cJSON_AddStringToObject(out, "content", "") != NULL;
    if (!cJSON_IsArray(c)) return BAD(err, "messages", "a message's 'content' must be a string or an array of text parts");
    size_t len = 0;
    const cJSON *p;
    cJSON_ArrayForEach(p, c) {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(p, "text");
        if (!cJSON_IsString(t)) return BAD(err, "messages", "only text content parts are supported");
        len += strlen(t->valuestring);
    }
    char *s = malloc(len + 1), *q = s;
    if (!s) return serve_api_set_error(err, 500, "server_error", NULL, NULL, "out of memory"), false;
    cJSON_ArrayForEach(p, c) {
        const char *t = cJSON_GetObjectItemCaseSensitive(p, "text")->valuestring;
        memcpy(q, t, strlen(t));
        q += strlen(t);
    }
    *q = '\0';
    bool ok = cJSON_AddStringToObject(out, "content", s) != NULL;
    free(s);
    return ok;
}

/* "messages" -> [{role, content: string}] -> the chat prompt -> ids. */
static bool chat_prompt(const serve_api_ctx *ctx, const cJSON *root, moe_token_buf *buf, serve_api_error *err) {
    static const char *roles[] = {"system", "user", "assistant", "developer", "tool"};
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "messages");
    if (!v) return BAD(err, "messages", "'messages' is required");
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) == 0) return BAD(err, "messages", "'messages' must be a non-empty array");
    cJSON *msgs = cJSON_CreateArray();
    const cJSON *m;
    bool ok = msgs != NULL;
    cJSON_ArrayForEach(m, v) {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        bool known = false;
        for (size_t i = 0; cJSON_IsString(role) && i < sizeof roles / sizeof *roles; i++) known |= !strcmp(role->valuestring, roles[i]);
        if (!cJSON_IsObject(m) || !known) {
            ok = BAD(err, "messages", "each message needs a 'role' (system, user, assistant, developer or tool)");
            break;
        }
        cJSON *o = cJSON_CreateObject();
        cJSON_AddItemToArray(msgs, o);
        cJSON_AddStringToObject(o, "role", role->valuestring);
        if (!(ok = message_content(m, o, err))) break;
    }
    char *prompt = NULL;
    if (ok && serve_text_chat_prompt(ctx->text, msgs, &prompt) != MOE_OK) {
        serve_api_set_error(err, 400, "invalid_request_error", "messages", NULL, "the chat template failed: %s",
                            moe_last_error());
        ok = false;
    }
    cJSON_Delete(msgs);
    if (ok) ok = encode(ctx, prompt, false, buf, err);
    free(prompt);
    return ok;
}

/* ---- the request ---- */

static bool sampling(const serve_api_ctx *ctx, const cJSON *root, serve_call *call, serve_api_error *err) {
    serve_params *p = &call->req->p;
    p->sampler = (moe_sampler){.temperature = 1, .top_k = 0, .top_p = 1};
    int64_t top_k = 0, n = 1, seed = -1, max_tokens = -1, lp = -1, top_lp = 0;
    bool want_lp = false;
    if (!get_number(root, "temperature", 0, 2, &p->sampler.temperature, err) ||
        !get_number(root, "top_p", 0, 1, &p->sampler.top_p, err) || !get_int(root, "top_k", 0, 1 << 24, &top_k, err) ||
        !get_int(root, "n", 1, 1, &n, err) || !get_int(root, "seed", -9.2e18, 9.2e18, &seed, err) ||
        !get_int(root, "max_tokens", 1, 1e15, &max_tokens, err) || !get_stop(root, p, err))
        return false;
    if (call->kind == SERVE_API_CHAT) {
        if (!get_int(root, "max_completion_tokens", 1, 1e15, &max_tokens, err) ||
            !get_bool(root, "logprobs", &want_lp, err) || !get_int(root, "top_logprobs", 0, SERVE_MAX_TOP, &top_lp, err))
            return false;
        lp = want_lp ? top_lp : -1;
    } else if (!get_int(root, "logprobs", 0, SERVE_MAX_TOP, &lp, err)) {
        return false;
    }
    p->sampler.top_k = (int)top_k;
    p->sampler.seed = seed >= 0 ? (uint64_t)seed : ctx->seed_base + atomic_fetch_add(&call_counter, 1);
    p->logprobs = (int)lp;
    p->max_tokens = max_tokens > 0 ? (int)(max_tokens < INT32_MAX ? max_tokens : INT32_MAX) : -1;
    return true;
}

static bool stream_flags(const cJSON *root, serve_call *call, serve_api_error *err) {
    if (!get_bool(root, "stream", &call->stream, err)) return false;
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(root, "stream_options");
    if (so && !cJSON_IsNull(so)) {
        if (!cJSON_IsObject(so)) return BAD(err, "stream_options", "'stream_options' must be an object");
        if (!get_bool(so, "include_usage", &call->include_usage, err)) return false;
    }
    return true;
}

/* The prompt fits the context and max_tokens fits after it. */
static bool check_lengths(const serve_api_ctx *ctx, serve_request *r, serve_api_error *err) {
    if (r->n_prompt == 0) return BAD(err, "prompt", "the prompt is empty");
    if (r->n_prompt >= ctx->context) {
        serve_api_set_error(err, 400, "invalid_request_error", "messages", "context_length_exceeded",
                            "the prompt has %d tokens, the model's context is %lld tokens", r->n_prompt,
                            (long long)ctx->context);
        return false;
    }
    int64_t room = ctx->context - r->n_prompt;
    if (r->p.max_tokens < 0) r->p.max_tokens = (int)room;
    if (r->p.max_tokens > room) {
        serve_api_set_error(err, 400, "invalid_request_error", "max_tokens", "context_length_exceeded",
                            "max_tokens is %d but the prompt's %d tokens leave room for %lld of the model's context "
                            "of %lld tokens", r->p.max_tokens, r->n_prompt, (long long)room, (long long)ctx->context);
        return false;
    }
    return true;
}

static bool parse_root(const serve_api_ctx *ctx, const cJSON *root, serve_call *call, serve_api_error *err) {
    if (!cJSON_IsObject(root)) return BAD(err, NULL, "the request body must be a JSON object");
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (model && !cJSON_IsString(model) && !cJSON_IsNull(model)) return BAD(err, "model", "'model' must be a string");
    if (!stream_flags(root, call, err) || !sampling(ctx, root, call, err)) return false;
    moe_token_buf buf = {0};
    bool ok = call->kind == SERVE_API_CHAT ? chat_prompt(ctx, root, &buf, err) : completion_prompt(ctx, root, &buf, err);
    call->req->prompt = buf.data;
    call->req->n_prompt = (int)buf.len;
    return ok && check_lengths(ctx, call->req, err);
}

bool serve_api_parse(const serve_api_ctx *ctx, serve_api_kind kind, const char *body, size_t len, serve_call *call,
                     serve_api_error *err) {
    memset(call, 0, sizeof *call);
    call->kind = kind;
    call->created = (long long)time(NULL);
    snprintf(call->id, sizeof call->id, "%s-%llx", kind == SERVE_API_CHAT ? "chatcmpl" : "cmpl",
             (unsigned long long)atomic_fetch_add(&call_counter, 1) ^ (ctx->seed_base << 20));
    if (!serve_utf8_valid(body, len)) return BAD(err, NULL, "the request body is not valid UTF-8");
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(body, len, &end, false);
    if (!root) return BAD(err, NULL, "malformed JSON near byte %zu of the request body", end ? (size_t)(end - body) : 0);
    while (end < body + len && (*end == ' ' || *end == '\t' || *end == '\n' || *end == '\r')) end++;
    if (end < body + len) {
        cJSON_Delete(root);
        return BAD(err, NULL, "malformed JSON: text after the value at byte %zu of the request body", (size_t)(end - body));
    }
    if (!(call->req = serve_request_new())) {
        cJSON_Delete(root);
        serve_api_set_error(err, 500, "server_error", NULL, NULL, "out of memory");
        return false;
    }
    bool ok = parse_root(ctx, root, call, err);
    cJSON_Delete(root);
    return ok;
}

/* ---- responses ---- */

static cJSON *envelope(const serve_api_ctx *ctx, const serve_call *call, bool chunk) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "id", call->id);
    cJSON_AddStringToObject(root, "object", call->kind == SERVE_API_CHAT
                                                ? (chunk ? "chat.completion.chunk" : "chat.completion")
                                                : "text_completion");
    cJSON_AddNumberToObject(root, "created", (double)call->created);
    cJSON_AddStringToObject(root, "model", ctx->model_name);
    return root;
}

static const char *finish_name(serve_finish f) {
    return f == SERVE_FINISH_STOP ? "stop" : f == SERVE_FINISH_LENGTH ? "length" : f == SERVE_RUNNING ? NULL : "error";
}

static void add_finish(cJSON *choice, serve_finish f) {
    const char *name = finish_name(f);
    if (name) cJSON_AddStringToObject(choice, "finish_reason", name);
    else cJSON_AddNullToObject(choice, "finish_reason");
}

static cJSON *token_bytes(const char *s) {
    cJSON *a = cJSON_CreateArray();
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) cJSON_AddItemToArray(a, cJSON_CreateNumber(*p));
    return a;
}

static char *token_text(const serve_api_ctx *ctx, int32_t id) {
    char *t = NULL;
    if (serve_text_token(ctx->text, id, &t) != MOE_OK) t = strdup("");
    return t;
}

/* Chat: {"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": null}. */
static cJSON *chat_logprobs(const serve_api_ctx *ctx, const serve_piece *pieces, int n) {
    cJSON *lp = cJSON_CreateObject(), *content = cJSON_AddArrayToObject(lp, "content");
    for (int i = 0; i < n; i++) {
        const serve_logprob *l = &pieces[i].lp;
        cJSON *e = cJSON_CreateObject();
        char *t = token_text(ctx, l->id);
        cJSON_AddStringToObject(e, "token", t ? t : "");
        cJSON_AddNumberToObject(e, "logprob", l->logprob);
        cJSON_AddItemToObject(e, "bytes", token_bytes(t ? t : ""));
        free(t);
        cJSON *top = cJSON_AddArrayToObject(e, "top_logprobs");
        for (int k = 0; k < l->n_top; k++) {
            cJSON *o = cJSON_CreateObject();
            char *tt = token_text(ctx, l->top_id[k]);
            cJSON_AddStringToObject(o, "token", tt ? tt : "");
            cJSON_AddNumberToObject(o, "logprob", l->top_logprob[k]);
            cJSON_AddItemToObject(o, "bytes", token_bytes(tt ? tt : ""));
            free(tt);
            cJSON_AddItemToArray(top, o);
        }
        cJSON_AddItemToArray(content, e);
    }
    cJSON_AddNullToObject(lp, "refusal");
    return lp;
}

/* Completions: {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}. */
static cJSON *completion_logprobs(const serve_api_ctx *ctx, const serve_piece *pieces, int n, size_t offset0) {
    cJSON *lp = cJSON_CreateObject(), *tokens = cJSON_AddArrayToObject(lp, "tokens"),
          *tlp = cJSON_AddArrayToObject(lp, "token_logprobs"), *top = cJSON_AddArrayToObject(lp, "top_logprobs"),
          *off = cJSON_AddArrayToObject(lp, "text_offset");
    size_t offset = offset0;
    for (int i = 0; i < n; i++) {
        const serve_logprob *l = &pieces[i].lp;
        char *t = token_text(ctx, l->id);
        cJSON_AddItemToArray(tokens, cJSON_CreateString(t ? t : ""));
        cJSON_AddItemToArray(tlp, cJSON_CreateNumber(l->logprob));
        cJSON_AddItemToArray(off, cJSON_CreateNumber((double)offset));
        offset += t ? strlen(t) : 0;
        free(t);
        cJSON *o = cJSON_CreateObject();
        for (int k = 0; k < l->n_top; k++) {
            char *tt = token_text(ctx, l->top_id[k]);
            if (!cJSON_GetObjectItemCaseSensitive(o, tt ? tt : "")) cJSON_AddNumberToObject(o, tt ? tt : "", l->top_logprob[k]);
            free(tt);
        }
        cJSON_AddItemToArray(top, o);
    }
    return lp;
}

static char *join_text(const serve_piece *pieces, int n) {
    size_t len = 0;
    for (int i = 0; i < n; i++) len += strlen(pieces[i].text);
    char *s = malloc(len + 1), *q = s;
    if (!s) return NULL;
    for (int i = 0; i < n; i++) {
        size_t k = strlen(pieces[i].text);
        memcpy(q, pieces[i].text, k);
        q += k;
    }
    *q = '\0';
    return s;
}

static void add_usage(cJSON *root, const serve_call *call, int n_generated) {
    cJSON *u = cJSON_AddObjectToObject(root, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", call->req->n_prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", n_generated);
    cJSON_AddNumberToObject(u, "total_tokens", call->req->n_prompt + n_generated);
}

/* One choice with the text of pieces[0..n); delta: a chunk's. */
static cJSON *choice(const serve_api_ctx *ctx, const serve_call *call, const serve_piece *pieces, int n, bool delta,
                     bool first, serve_finish finish) {
    cJSON *c = cJSON_CreateObject();
    cJSON_AddNumberToObject(c, "index", 0);
    char *text = join_text(pieces, n);
    bool lp = call->req->p.logprobs >= 0;
    if (call->kind == SERVE_API_CHAT) {
        cJSON *m = cJSON_AddObjectToObject(c, delta ? "delta" : "message");
        if (!delta || first) cJSON_AddStringToObject(m, "role", "assistant");
        if (!delta || n > 0 || first) cJSON_AddStringToObject(m, "content", text ? text : "");
        if (lp && (n > 0 || !delta)) cJSON_AddItemToObject(c, "logprobs", chat_logprobs(ctx, pieces, n));
        else cJSON_AddNullToObject(c, "logprobs");
    } else {
        cJSON_AddStringToObject(c, "text", text ? text : "");
        if (lp) cJSON_AddItemToObject(c, "logprobs", completion_logprobs(ctx, pieces, n, 0));
        else cJSON_AddNullToObject(c, "logprobs");
    }
    add_finish(c, finish);
    free(text);
    return c;
}

static char *print_free(cJSON *root) {
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
}

char *serve_api_response(const serve_api_ctx *ctx, const serve_call *call, const serve_piece *pieces, int n,
                         serve_finish finish, int n_generated) {
    cJSON *root = envelope(ctx, call, false), *choices = cJSON_AddArrayToObject(root, "choices");
    cJSON_AddItemToArray(choices, choice(ctx, call, pieces, n, false, false, finish));
    add_usage(root, call, n_generated);
    return print_free(root);
}

static char *sse(char *json) {
    if (!json) return NULL;
    size_t n = strlen(json);
    char *s = malloc(n + 9);
    if (s) {
        memcpy(s, "data: ", 6);
        memcpy(s + 6, json, n);
        memcpy(s + 6 + n, "\n\n", 3);
    }
    free(json);
    return s;
}

char *serve_api_chunk(const serve_api_ctx *ctx, const serve_call *call, const serve_piece *pieces, int n, bool first,
                      serve_finish finish) {
    cJSON *root = envelope(ctx, call, true), *choices = cJSON_AddArrayToObject(root, "choices");
    cJSON_AddItemToArray(choices, choice(ctx, call, pieces, n, true, first, finish));
    return sse(print_free(root));
}

char *serve_api_usage_chunk(const serve_api_ctx *ctx, const serve_call *call, int n_generated) {
    cJSON *root = envelope(ctx, call, true);
    cJSON_AddArrayToObject(root, "choices");
    add_usage(root, call, n_generated);
    return sse(print_free(root));
}

char *serve_api_models(const serve_api_ctx *ctx) {
    cJSON *root = cJSON_CreateObject(), *data = cJSON_AddArrayToObject(root, "data"), *m = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "object", "list");
    cJSON_AddStringToObject(m, "id", ctx->model_name);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", 0);
    cJSON_AddStringToObject(m, "owned_by", "moe");
    cJSON_AddNumberToObject(m, "context_length", (double)ctx->context);
    cJSON_AddItemToArray(data, m);
    return print_free(root);
}
