/* Prompts to ids, chat messages to prompts, ids to UTF-8 text (see text.h). */
#include "moe/serve/text.h"

#include <stdlib.h>
#include <string.h>

/* ---- UTF-8 ---- */

/* The length of the character at s[0..n): 1-4 when valid, 0 when invalid, -1 when the
 * bytes so far are a valid start that n cuts short. */
static int utf8_char(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    if (c == 0) return 0; /* NUL: not allowed in the C strings of the API */
    if (c < 0x80) return 1;
    int len = c >= 0xF0 && c <= 0xF4 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 && c <= 0xDF ? 2 : 0;
    if (len == 0 || (c >= 0xF5)) return 0;
    unsigned lo = 0x80, hi = 0xBF; /* the range of the second byte */
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;      /* no surrogates */
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;      /* nothing above U+10FFFF */
    for (int i = 1; i < len; i++) {
        if ((size_t)i >= n) return -1;
        unsigned b = s[i];
        if (i == 1 ? (b < lo || b > hi) : (b & 0xC0) != 0x80) return 0;
    }
    return len;
}

bool serve_utf8_valid(const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        int k = utf8_char((const unsigned char *)s + i, n - i);
        if (k <= 0) return false;
        i += (size_t)k;
    }
    return true;
}

size_t serve_utf8_complete(const char *s, size_t n, bool final) {
    size_t i = 0;
    while (i < n) {
        int k = utf8_char((const unsigned char *)s + i, n - i);
        if (k < 0 && !final) break;
        i += k > 0 ? (size_t)k : 1;
    }
    return i;
}

static moe_status grow(char **buf, size_t *cap, size_t need) {
    if (need + 1 <= *cap) return MOE_OK;
    size_t c = *cap ? *cap : 64;
    while (c < need + 1) c *= 2;
    char *p = realloc(*buf, c);
    if (!p) return moe_error(MOE_ERR_OOM, "out of memory for %zu bytes of text", need);
    *buf = p;
    *cap = c;
    return MOE_OK;
}

moe_status serve_utf8_append(char **buf, size_t *len, size_t *cap, const char *s, size_t n) {
    MOE_TRY(grow(buf, cap, *len + 3 * n)); /* each byte at most U+FFFD's 3 bytes */
    for (size_t i = 0; i < n;) {
        int k = utf8_char((const unsigned char *)s + i, n - i);
        if (k > 0) {
            memcpy(*buf + *len, s + i, (size_t)k);
            *len += (size_t)k;
            i += (size_t)k;
        } else {
            memcpy(*buf + *len, "\xEF\xBF\xBD", 3);
            *len += 3;
            i++;
        }
    }
    (*buf)[*len] = '\0';
    return MOE_OK;
}

/* ---- tokenizers and chat ---- */

moe_status serve_text_open_hf(serve_text *t, const char *dir, const int *eos, int n_eos) {
    memset(t, 0, sizeof *t);
    pthread_mutex_init(&t->encode_mu, NULL);
    MOE_TRY(moe_hf_tokenizer_load_dir(&t->hf, dir));
    t->vocab = (int)moe_hf_vocab_size(t->hf);
    for (int i = 0; i < n_eos && t->n_eos < SERVE_MAX_EOS; i++) t->eos[t->n_eos++] = eos[i];
    const char *eos_str = moe_hf_eos_token(t->hf);
    int32_t id = eos_str ? moe_hf_token_to_id(t->hf, eos_str) : -1;
    if (id >= 0 && !serve_text_is_eos(t, id) && t->n_eos < SERVE_MAX_EOS) t->eos[t->n_eos++] = id;
    const char *tpl = moe_hf_chat_template(t->hf);
    if (tpl) return moe_jinja_parse(&t->chat, tpl, moe_hf_chat_template_origin(t->hf));
    return MOE_OK;
}

moe_status serve_text_open_own(serve_text *t, moe_tokenizer *own, int32_t eos) {
    memset(t, 0, sizeof *t);
    pthread_mutex_init(&t->encode_mu, NULL);
    t->own = own;
    t->vocab = moe_tokenizer_vocab_size(own);
    if (eos >= 0) t->eos[t->n_eos++] = eos;
    return MOE_OK;
}

void serve_text_close(serve_text *t) {
    if (t->hf) moe_hf_tokenizer_free(t->hf);
    if (t->own) moe_tokenizer_free(t->own);
    if (t->chat) moe_jinja_free(t->chat);
    pthread_mutex_destroy(&t->encode_mu);
    memset(t, 0, sizeof *t);
}

moe_status serve_text_encode(serve_text *t, const char *text, size_t len, bool add_special, moe_token_buf *out) {
    if (t->own) return moe_tokenizer_encode(t->own, text, len, out);
    pthread_mutex_lock(&t->encode_mu);
    moe_status s = moe_hf_encode(t->hf, text, len, add_special, out);
    pthread_mutex_unlock(&t->encode_mu);
    return s;
}

/* "System: ...\nUser: ...\nAssistant:" (text.h). */
static moe_status fallback_chat(const cJSON *messages, char **prompt) {
    char *buf = NULL;
    size_t len = 0, cap = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, messages) {
        const char *role = cJSON_GetObjectItemCaseSensitive(m, "role")->valuestring;
        const char *content = cJSON_GetObjectItemCaseSensitive(m, "content")->valuestring;
        size_t rl = strlen(role), cl = strlen(content);
        moe_status s = grow(&buf, &cap, len + rl + cl + 4);
        if (s != MOE_OK) {
            free(buf);
            return s;
        }
        buf[len++] = (char)(role[0] >= 'a' && role[0] <= 'z' ? role[0] - 32 : role[0]);
        memcpy(buf + len, role + 1, rl - 1);
        len += rl - 1;
        memcpy(buf + len, ": ", 2);
        memcpy(buf + len + 2, content, cl);
        len += cl + 2;
        buf[len++] = '\n';
    }
    moe_status s = grow(&buf, &cap, len + 11);
    if (s != MOE_OK) {
        free(buf);
        return s;
    }
    memcpy(buf + len, "Assistant:", 11);
    *prompt = buf;
    return MOE_OK;
}

moe_status serve_text_chat_prompt(serve_text *t, const cJSON *messages, char **prompt) {
    if (!t->chat) return fallback_chat(messages, prompt);
    cJSON *vars = cJSON_CreateObject();
    if (!vars) return moe_error(MOE_ERR_OOM, "out of memory");
    cJSON_AddItemToObject(vars, "messages", cJSON_Duplicate(messages, true));
    cJSON_AddBoolToObject(vars, "add_generation_prompt", true);
    const char *bos = moe_hf_bos_token(t->hf), *eos = moe_hf_eos_token(t->hf);
    cJSON_AddStringToObject(vars, "bos_token", bos ? bos : "");
    cJSON_AddStringToObject(vars, "eos_token", eos ? eos : "");
    moe_status s = moe_jinja_render(t->chat, vars, prompt);
    cJSON_Delete(vars);
    return s;
}

bool serve_text_is_eos(const serve_text *t, int32_t id) {
    for (int i = 0; i < t->n_eos; i++)
        if (t->eos[i] == id) return true;
    return false;
}

moe_status serve_text_token(const serve_text *t, int32_t id, char **text) {
    char *raw = NULL;
    size_t n = 0;
    if (t->own) {
        const uint8_t *b = moe_tokenizer_token_bytes(t->own, id, &n);
        raw = (char *)b;
    } else {
        MOE_TRY(moe_hf_decode(t->hf, &id, 1, false, &raw));
        n = strlen(raw);
    }
    char *out = NULL;
    size_t len = 0, cap = 0;
    moe_status s = serve_utf8_append(&out, &len, &cap, raw ? raw : "", n);
    if (s == MOE_OK && !out) s = (out = strdup("")) ? MOE_OK : moe_error(MOE_ERR_OOM, "out of memory");
    if (!t->own) free(raw);
    *text = out;
    return s;
}

/* ---- incremental decoding ---- */

void serve_detok_init(serve_detok *d, const serve_text *t) {
    memset(d, 0, sizeof *d);
    d->t = t;
    if (t->hf) moe_hf_stream_init(&d->hf, t->hf, true);
}

moe_status serve_detok_push(serve_detok *d, int32_t id, char **buf, size_t *len, size_t *cap) {
    if (d->t->hf) {
        char *piece = NULL;
        MOE_TRY(moe_hf_stream_push(&d->hf, id, &piece));
        moe_status s = serve_utf8_append(buf, len, cap, piece, strlen(piece));
        free(piece);
        return s;
    }
    size_t n = 0;
    const uint8_t *b = moe_tokenizer_token_bytes(d->t->own, id, &n);
    char *p = realloc(d->pending, d->n_pending + n + 1);
    if (!p) return moe_error(MOE_ERR_OOM, "out of memory");
    d->pending = p;
    memcpy(p + d->n_pending, b, n);
    d->n_pending += n;
    size_t k = serve_utf8_complete(p, d->n_pending, false);
    MOE_TRY(serve_utf8_append(buf, len, cap, p, k));
    memmove(p, p + k, d->n_pending - k);
    d->n_pending -= k;
    return MOE_OK;
}

moe_status serve_detok_finish(serve_detok *d, char **buf, size_t *len, size_t *cap) {
    if (d->t->hf) {
        char *piece = NULL;
        MOE_TRY(moe_hf_stream_finish(&d->hf, &piece));
        moe_status s = serve_utf8_append(buf, len, cap, piece, strlen(piece));
        free(piece);
        return s;
    }
    moe_status s = serve_utf8_append(buf, len, cap, d->pending, d->n_pending);
    d->n_pending = 0;
    return s;
}

void serve_detok_free(serve_detok *d) {
    if (d->t && d->t->hf) moe_hf_stream_free(&d->hf);
    free(d->pending);
    memset(d, 0, sizeof *d);
}
