/* Text for the server: prompts to token ids (a Hugging Face tokenizer.json, or our own
 * tokenizer for checkpoints), chat messages to a prompt (the model's chat template, or the
 * plain fallback below), generated ids back to valid UTF-8 text piece by piece, and the
 * UTF-8 checks the API needs.
 *
 * Fallback chat format (models without a chat template), one line per message, then the
 * assistant's turn:
 *   "System: ...\nUser: ...\nAssistant: ...\nUser: ...\nAssistant:"
 *
 * Encoding and chat rendering may be called from any thread (encoding is serialised
 * inside); decoding only reads the tokenizer. */
#ifndef MOE_SERVE_TEXT_H
#define MOE_SERVE_TEXT_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "moe/hf/hf_tokenizer.h"
#include "moe/hf/jinja.h"
#include "moe/model/tokenizer.h"

#define SERVE_MAX_EOS 8

typedef struct serve_text {
    moe_hf_tokenizer *hf;      /* a hub folder's tokenizer, or NULL */
    moe_tokenizer *own;        /* our checkpoint's tokenizer, or NULL */
    moe_jinja *chat;           /* the chat template, or NULL (the fallback format) */
    pthread_mutex_t encode_mu; /* the HF tokenizer's encode cache is not thread-safe */
    int vocab;                 /* tokens the sampler may draw: the tokenizer's */
    int32_t eos[SERVE_MAX_EOS];
    int n_eos;
} serve_text;

/* A hub folder's tokenizer.json (+ chat template); eos ids from the model's info. */
moe_status serve_text_open_hf(serve_text *t, const char *dir, const int *eos, int n_eos);
/* Our tokenizer (taken over: freed by serve_text_close); eos = -1 for none. */
moe_status serve_text_open_own(serve_text *t, moe_tokenizer *own, int32_t eos);
void serve_text_close(serve_text *t);

/* Appends the ids of text to out; add_special: the tokenizer's post-processor (bos). */
moe_status serve_text_encode(serve_text *t, const char *text, size_t len, bool add_special, moe_token_buf *out);
/* The chat prompt of a validated messages array [{role, content: string}] (malloc'd). */
moe_status serve_text_chat_prompt(serve_text *t, const cJSON *messages, char **prompt);
bool serve_text_is_eos(const serve_text *t, int32_t id);
/* One token as valid UTF-8 text (malloc'd; bytes that are not UTF-8 become U+FFFD). */
moe_status serve_text_token(const serve_text *t, int32_t id, char **text);

/* Incremental decoding: push ids, get the text that no later id can change. */
typedef struct serve_detok {
    const serve_text *t;
    moe_hf_stream hf;
    char *pending;       /* own tokenizer: bytes of an unfinished UTF-8 character */
    size_t n_pending;
} serve_detok;

void serve_detok_init(serve_detok *d, const serve_text *t);
/* Appends the new text (valid UTF-8) to *buf (len, cap; realloc'd). finish: flush the rest. */
moe_status serve_detok_push(serve_detok *d, int32_t id, char **buf, size_t *len, size_t *cap);
moe_status serve_detok_finish(serve_detok *d, char **buf, size_t *len, size_t *cap);
void serve_detok_free(serve_detok *d);

/* Whether s[0..n) is valid UTF-8 (no overlongs, surrogates or code points above U+10FFFF). */
bool serve_utf8_valid(const char *s, size_t n);
/* Length of the longest prefix of s[0..n) that ends on a character boundary, treating an
 * incomplete character at the end as unfinished (final = false) or invalid (final = true). */
size_t serve_utf8_complete(const char *s, size_t n, bool final);
/* Appends s[0..n) to *buf with every invalid byte replaced by U+FFFD. */
moe_status serve_utf8_append(char **buf, size_t *len, size_t *cap, const char *s, size_t n);

#endif
