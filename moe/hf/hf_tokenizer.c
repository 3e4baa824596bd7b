/* Hugging Face tokenizer.json: the loader, the encoder (added tokens, normalizers,
 * pre-tokenizers, BPE, post-processor) and the decoder. hf_tokenizer.h lists what is
 * supported; the order of the steps and the corner cases follow the `tokenizers` library. */
#define _GNU_SOURCE /* memmem */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "moe/hf/hf_tokenizer.h"

#include <cjson/cJSON.h>
#include <pcre2.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <utf8proc.h>

#include "core/fileio.h"
#include "moe/hf/jinja.h"

#define MAX_CACHED_WORD 256     /* pre-tokens longer than this are not cached */
#define MAX_CACHE_ENTRIES 65536 /* the cache is emptied when it holds this many words */
#define REPLACEMENT_CHAR "\xEF\xBF\xBD"
#define NORM_GROWTH 32 /* normalizers may make a text at most this many times longer (+ 4 KiB) */

/* ---------- growable byte string with a sticky out-of-memory flag ---------- */

typedef struct sbuf {
    char *p;
    size_t n, cap;
    bool oom;
    bool over; /* normalize: the text grew past its cap (oom is set too, to stop appends) */
} sbuf;

static bool sb_reserve(sbuf *b, size_t extra) {
    if (b->oom) return false;
    if (b->n + extra + 1 <= b->cap) return true;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->n + extra + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return !(b->oom = true);
    b->p = p;
    b->cap = cap;
    return true;
}

static void sb_add(sbuf *b, const void *s, size_t n) {
    if (!sb_reserve(b, n)) return;
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void sb_adds(sbuf *b, const char *s) { sb_add(b, s, strlen(s)); }

static void sb_add_cp(sbuf *b, int32_t cp) {
    uint8_t tmp[4];
    utf8proc_ssize_t k = utf8proc_encode_char(cp, tmp);
    sb_add(b, tmp, (size_t)k);
}

static void sb_free(sbuf *b) {
    free(b->p);
    *b = (sbuf){0};
}

/* A growable int32 array with the same sticky flag. */
typedef struct ivec {
    int32_t *v;
    size_t n, cap;
    bool oom;
} ivec;

static void iv_push(ivec *a, int32_t x) {
    if (a->oom) return;
    if (a->n == a->cap) {
        size_t cap = a->cap ? 2 * a->cap : 64;
        int32_t *v = realloc(a->v, cap * sizeof *v);
        if (!v) {
            a->oom = true;
            return;
        }
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
}

/* Grows *p (an array of `size`-byte items with capacity *cap) to hold `need` items. */
static bool grow(void **p, size_t *cap, size_t need, size_t size) {
    if (need <= *cap) return true;
    size_t c = *cap ? *cap : 16;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * size);
    if (!q) return false;
    *p = q;
    *cap = c;
    return true;
}

/* ---------- UTF-8 ---------- */

/* Length of the valid UTF-8 character at s (n bytes left), or minus the length of the
 * maximal invalid prefix to replace by one U+FFFD (Rust's from_utf8_lossy rule). */
static int utf8_char(const uint8_t *s, size_t n) {
    uint8_t c = s[0];
    if (c < 0x80) return 1;
    int len;
    uint8_t lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else return -1;
    for (int i = 1; i < len; i++) {
        if ((size_t)i >= n) return -i;
        uint8_t lim_lo = i == 1 ? lo : 0x80, lim_hi = i == 1 ? hi : 0xBF;
        if (s[i] < lim_lo || s[i] > lim_hi) return -i;
    }
    return len;
}

static size_t utf8_len_at(const char *s, size_t n) {
    int k = utf8_char((const uint8_t *)s, n);
    return (size_t)(k < 0 ? -k : k);
}

/* Appends s with every invalid sequence replaced by U+FFFD. */
static void utf8_lossy(sbuf *out, const char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        size_t start = i;
        while (i < n && (uint8_t)s[i] < 0x80) i++;
        int k = 0;
        while (i < n && (k = utf8_char((const uint8_t *)s + i, n - i)) > 0) i += (size_t)k;
        sb_add(out, s + start, i - start);
        if (i < n && k < 0) {
            sb_adds(out, REPLACEMENT_CHAR);
            i += (size_t)-k;
        }
    }
}

static bool utf8_valid(const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        if ((uint8_t)s[i] < 0x80) {
            i++;
            continue;
        }
        int k = utf8_char((const uint8_t *)s + i, n - i);
        if (k < 0) return false;
        i += (size_t)k;
    }
    return true;
}

static int32_t utf8_decode(const char *s, size_t n, size_t *len) {
    utf8proc_int32_t cp = 0;
    utf8proc_ssize_t k = utf8proc_iterate((const uint8_t *)s, (utf8proc_ssize_t)n, &cp);
    *len = k > 0 ? (size_t)k : 1;
    return k > 0 ? cp : 0xFFFD;
}

/* Rust's char::is_whitespace (the Unicode White_Space property). */
static bool is_space_cp(int32_t c) {
    if (c == ' ' || (c >= 0x09 && c <= 0x0D) || c == 0x85 || c == 0xA0) return true;
    if (c < 0x1680) return false;
    return c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

static bool is_alnum_cp(int32_t c) {
    utf8proc_category_t k = utf8proc_category(c);
    return (k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_LO) ||
           (k >= UTF8PROC_CATEGORY_ND && k <= UTF8PROC_CATEGORY_NO);
}

/* ---------- hashing: string -> int32 and (int32, int32) -> (rank, id) ---------- */

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ n;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, s, 8);
        h = (h ^ v) * 0xff51afd7ed558ccdull;
        h ^= h >> 32;
        s += 8;
        n -= 8;
    }
    uint64_t v = 0;
    memcpy(&v, s, n);
    h = (h ^ v) * 0xc4ceb9fe1a85ec53ull;
    return h ^ (h >> 29);
}

/* Open addressing; keys are copied into the map's pool, slots are 16 bytes. */
typedef struct smap_slot {
    uint32_t hash; /* high half of the hash with the low bit set; 0: empty */
    uint32_t len, off;
    int32_t val;
} smap_slot;

typedef struct smap {
    smap_slot *slots;
    size_t cap, n;
    sbuf pool;
} smap;

static smap_slot *smap_slot_for(const smap *m, const char *key, size_t len, uint64_t h) {
    size_t mask = m->cap - 1;
    uint32_t h32 = (uint32_t)(h >> 32) | 1u;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        smap_slot *s = &m->slots[i];
        if (!s->hash) return s;
        if (s->hash == h32 && s->len == len && memcmp(m->pool.p + s->off, key, len) == 0) return s;
    }
}

static const int32_t *smap_get(const smap *m, const char *key, size_t len) {
    if (!m->cap) return NULL;
    smap_slot *s = smap_slot_for(m, key, len, hash_bytes(key, len));
    return s->hash ? &s->val : NULL;
}

static bool smap_grow(smap *m) {
    size_t cap = m->cap ? 2 * m->cap : 256;
    smap_slot *slots = calloc(cap, sizeof *slots);
    if (!slots) return false;
    for (size_t i = 0; i < m->cap; i++) {
        smap_slot *o = &m->slots[i];
        if (!o->hash) continue;
        uint64_t h = hash_bytes(m->pool.p + o->off, o->len);
        for (size_t k = h & (cap - 1);; k = (k + 1) & (cap - 1))
            if (!slots[k].hash) {
                slots[k] = *o;
                break;
            }
    }
    free(m->slots);
    m->slots = slots;
    m->cap = cap;
    return true;
}

/* Inserts or overwrites (the key is copied). */
static bool smap_put(smap *m, const char *key, size_t len, int32_t val) {
    if (2 * (m->n + 1) > m->cap && !smap_grow(m)) return false;
    uint64_t h = hash_bytes(key, len);
    smap_slot *s = smap_slot_for(m, key, len, h);
    if (s->hash) {
        s->val = val;
        return true;
    }
    size_t off = m->pool.n;
    sb_add(&m->pool, key, len);
    if (m->pool.oom || off > UINT32_MAX) return false;
    *s = (smap_slot){(uint32_t)(h >> 32) | 1u, (uint32_t)len, (uint32_t)off, val};
    m->n++;
    return true;
}

static void smap_clear(smap *m) {
    if (m->cap) memset(m->slots, 0, m->cap * sizeof *m->slots);
    m->n = 0;
    m->pool.n = 0;
}

static void smap_free(smap *m) {
    free(m->slots);
    sb_free(&m->pool);
    *m = (smap){0};
}

typedef struct pair_slot {
    uint64_t key; /* (left << 32) | right; UINT64_MAX: empty */
    int32_t rank, id;
} pair_slot;

typedef struct pair_map {
    pair_slot *slots;
    size_t cap;
} pair_map;

static uint64_t pair_key(int32_t a, int32_t b) { return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b; }

static pair_slot *pair_slot_for(const pair_map *m, uint64_t key) {
    size_t mask = m->cap - 1;
    uint64_t h = key * 0x9E3779B97F4A7C15ull;
    for (size_t i = (h >> 17) & mask;; i = (i + 1) & mask)
        if (m->slots[i].key == key || m->slots[i].key == UINT64_MAX) return &m->slots[i];
}

static const pair_slot *pair_get(const pair_map *m, int32_t a, int32_t b) {
    if (!m->cap) return NULL;
    const pair_slot *s = pair_slot_for(m, pair_key(a, b));
    return s->key == UINT64_MAX ? NULL : s;
}

/* ---------- regexes (PCRE2, UTF + UCP, JIT) ---------- */

typedef struct regex {
    pcre2_code *code;
    pcre2_match_data *md;
} regex;

static void regex_free(regex *re) {
    if (!re) return;
    pcre2_match_data_free(re->md);
    pcre2_code_free(re->code);
    free(re);
}

/* The regex dialects of tokenizer.json (Oniguruma, Rust) write \uXXXX; PCRE2 wants \x{XXXX}. */
static void translate_pattern(sbuf *out, const char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\\' && i + 5 < n && p[i + 1] == 'u' && strspn(p + i + 2, "0123456789abcdefABCDEF") >= 4) {
            sb_adds(out, "\\x{");
            sb_add(out, p + i + 2, 4);
            sb_adds(out, "}");
            i += 5;
        } else if (p[i] == '\\' && i + 1 < n) {
            sb_add(out, p + i, 2);
            i++;
        } else {
            sb_add(out, p + i, 1);
        }
    }
}

static moe_status regex_compile(regex **out, const char *pattern, bool literal, const char *path) {
    sbuf pat = {0};
    if (literal) sb_adds(&pat, pattern);
    else translate_pattern(&pat, pattern, strlen(pattern));
    if (pat.oom) return moe_error(MOE_ERR_OOM, "tokenizer %s: out of memory", path);
    int err = 0;
    PCRE2_SIZE off = 0;
    uint32_t opts = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP); /* PCRE2 refuses UCP with LITERAL */
    pcre2_code *code = pcre2_compile((PCRE2_SPTR)(pat.p ? pat.p : ""), pat.n, opts, &err, &off, NULL);
    sb_free(&pat);
    if (!code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return moe_error(MOE_ERR_FORMAT, "tokenizer %s: regex \"%s\" does not compile at offset %zu: %s", path,
                         pattern, (size_t)off, (const char *)msg);
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE); /* pcre2_match uses the JIT code when present */
    regex *re = calloc(1, sizeof *re);
    if (re) re->md = pcre2_match_data_create_from_pattern(code, NULL);
    if (!re || !re->md) {
        free(re);
        pcre2_code_free(code);
        return moe_error(MOE_ERR_OOM, "tokenizer %s: out of memory", path);
    }
    re->code = code;
    *out = re;
    return MOE_OK;
}

/* The first match at or after `from`; false when there is none. Input is valid UTF-8. */
static bool regex_next(const regex *re, const char *s, size_t n, size_t from, size_t *ms, size_t *me) {
    int rc = pcre2_match(re->code, (PCRE2_SPTR)s, n, from, PCRE2_NO_UTF_CHECK, re->md, NULL);
    if (rc < 0) return false;
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(re->md);
    *ms = ov[0];
    *me = ov[1];
    return true;
}

/* ---------- splitting a string by regex matches (the tokenizers split behaviours) ---------- */

typedef enum split_behavior {
    SPLIT_REMOVED,
    SPLIT_ISOLATED,
    SPLIT_MERGED_PREVIOUS,
    SPLIT_MERGED_NEXT,
    SPLIT_CONTIGUOUS
} split_behavior;

typedef struct span {
    size_t s, e;
    bool match;
} span;

typedef struct spans {
    span *v;
    size_t n, cap;
    bool oom;
} spans;

static void spans_push(spans *a, size_t s, size_t e, bool match) {
    if (a->oom || !grow((void **)&a->v, &a->cap, a->n + 1, sizeof *a->v)) {
        a->oom = true;
        return;
    }
    a->v[a->n++] = (span){s, e, match};
}

/* Cuts s into alternating non-match / match spans (empty matches are skipped). */
static void find_matches(const regex *re, const char *s, size_t n, spans *out) {
    out->n = 0;
    size_t prev = 0, at = 0, ms, me;
    while (at <= n && regex_next(re, s, n, at, &ms, &me)) {
        if (me == ms) {
            if (ms >= n) break;
            at = ms + utf8_len_at(s + ms, n - ms);
            continue;
        }
        if (ms > prev) spans_push(out, prev, ms, false);
        spans_push(out, ms, me, true);
        prev = at = me;
    }
    if (prev < n) spans_push(out, prev, n, false);
}

/* Applies a split behaviour in place: the spans left are the pieces to keep, in order. */
static void apply_behavior(spans *sp, split_behavior beh, bool invert) {
    size_t w = 0;
    bool prev_match = false;
    if (invert)
        for (size_t i = 0; i < sp->n; i++) sp->v[i].match = !sp->v[i].match;
    if (beh == SPLIT_MERGED_NEXT) { /* walk backwards: a match joins the piece after it */
        size_t k = sp->n;
        for (size_t i = sp->n; i-- > 0;) {
            span x = sp->v[i];
            if (x.match && !prev_match && k < sp->n) sp->v[k].s = x.s;
            else sp->v[--k] = (span){x.s, x.e, false};
            prev_match = x.match;
        }
        memmove(sp->v, sp->v + k, (sp->n - k) * sizeof *sp->v);
        sp->n -= k;
        return;
    }
    for (size_t i = 0; i < sp->n; i++) {
        span x = sp->v[i];
        if (beh == SPLIT_REMOVED) {
            if (!x.match) sp->v[w++] = x;
            continue;
        }
        bool join = (beh == SPLIT_CONTIGUOUS && x.match == prev_match && w > 0) ||
                    (beh == SPLIT_MERGED_PREVIOUS && x.match && !prev_match && w > 0);
        if (join) sp->v[w - 1].e = x.e;
        else sp->v[w++] = (span){x.s, x.e, false};
        prev_match = x.match;
    }
    sp->n = w;
}

/* ---------- the pieces a pre-tokenizer works on ---------- */

typedef struct piece {
    size_t off, len;
    bool at_start; /* starts at byte 0 of the original input (Metaspace "first") */
} piece;

typedef struct pieces {
    sbuf text;
    piece *v;
    size_t n, cap;
    bool oom;
} pieces;

static void pieces_clear(pieces *p) {
    p->text.n = 0;
    p->n = 0;
}

/* Appends a new piece whose text is s. */
static void pieces_add(pieces *p, const char *s, size_t n, bool at_start) {
    if (!grow((void **)&p->v, &p->cap, p->n + 1, sizeof *p->v)) {
        p->oom = true;
        return;
    }
    p->v[p->n++] = (piece){p->text.n, n, at_start};
    sb_add(&p->text, s, n);
}

static void pieces_free(pieces *p) {
    sb_free(&p->text);
    free(p->v);
    *p = (pieces){0};
}

/* ---------- components ---------- */

typedef enum norm_kind {
    NORM_SEQUENCE, NORM_PREPEND, NORM_REPLACE, NORM_NFC, NORM_NFD, NORM_NFKC, NORM_NFKD,
    NORM_LOWERCASE, NORM_STRIP, NORM_STRIP_ACCENTS
} norm_kind;

typedef struct normalizer {
    norm_kind kind;
    char *text, *content; /* Prepend text; Replace literal pattern (NULL for a regex) and content */
    regex *re;
    bool left, right;     /* Strip */
    struct normalizer *sub;
    size_t n_sub;
} normalizer;

typedef enum pre_kind {
    PRE_SEQUENCE, PRE_BYTE_LEVEL, PRE_SPLIT, PRE_METASPACE
} pre_kind;

typedef enum prepend_scheme { PREPEND_ALWAYS, PREPEND_FIRST, PREPEND_NEVER } prepend_scheme;

typedef struct pretok {
    pre_kind kind;
    regex *re;            /* Split (and Digits, Whitespace...), ByteLevel with use_regex */
    split_behavior behavior;
    bool invert;
    bool add_prefix_space; /* ByteLevel */
    char replacement[8];   /* Metaspace */
    prepend_scheme scheme;
    bool split;
    struct pretok *sub;
    size_t n_sub;
} pretok;

typedef enum post_kind { POST_TEMPLATE, POST_NOOP } post_kind;

typedef struct post_item {
    bool is_sequence;     /* $A; otherwise the ids of a special token */
    int32_t *ids;
    size_t n_ids;
} post_item;

typedef struct postproc {
    post_kind kind;
    post_item *items;
    size_t n_items;
} postproc;

typedef enum dec_kind {
    DEC_BYTE_LEVEL, DEC_METASPACE, DEC_REPLACE, DEC_BYTE_FALLBACK, DEC_FUSE, DEC_STRIP, DEC_BPE_SUFFIX
} dec_kind;

typedef struct decoder {
    dec_kind kind;
    char *pattern, *content; /* Replace; Strip content; BPEDecoder suffix in pattern */
    char replacement[8];     /* Metaspace */
    prepend_scheme scheme;
    int start, stop;         /* Strip */
} decoder;

typedef struct added_token {
    char *content; /* as matched (normalised when `normalized`) */
    size_t len;
    int32_t id;
    bool special, lstrip, rstrip, normalized, single_word;
} added_token;

/* Finds added tokens in text: candidates by first byte, longest first. */
typedef struct added_matcher {
    int32_t *by_first[256]; /* indices into tok->added, longest first, -1 terminated */
} added_matcher;

struct moe_hf_tokenizer {
    char *path;
    /* model */
    char **tokens;      /* id -> string (NULL for holes) */
    size_t max_id;      /* ids past it are refused: the file's entries + MAX_ID_GAP */
    uint32_t *token_len;
    size_t n_tokens;
    smap vocab;         /* model vocab and added tokens */
    pair_map merges;
    int32_t unk_id;
    bool byte_fallback, fuse_unk, ignore_merges;
    bool cut_words;        /* see bpe_words */
    char *subword_prefix, *word_suffix;
    int32_t byte_ids[256]; /* <0xXX> tokens, -1 when absent */
    /* pipeline */
    normalizer *norm;
    pretok *pre;
    postproc *post;
    size_t n_post;
    decoder *dec;
    size_t n_dec;
    bool has_decoder;
    added_token *added;
    size_t n_added;
    added_matcher raw_match, norm_match;
    bool *is_special; /* by id */
    /* tokenizer_config.json */
    char *bos, *eos, *unk, *pad, *chat_template, *chat_origin;
    moe_jinja *chat;
    bool cleanup_spaces;
    /* scratch (why encode is not thread-safe) */
    smap cache;
    ivec cache_ids;
    sbuf norm_a, norm_b;
    bool norm_over; /* the last encode failed because the normalizers grew the text past its cap */
    pieces pa, pb;
    spans sp;
    struct bpe_sym *syms;
    size_t syms_cap;
    struct bpe_merge *heap;
    size_t heap_cap;
};

/* GPT-2's byte <-> printable character map of ByteLevel. */
static int32_t byte_to_cp(uint8_t b) {
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174) return b;
    int k = 0; /* rank of b among the remapped bytes */
    for (int x = 0; x < b; x++)
        if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174)) k++;
    return 256 + k;
}

static struct {
    char utf8[256][3];
    uint8_t len[256];
    int16_t cp_to_byte[324]; /* -1: not in the map */
} BL;
static bool bl_ready;

static void byte_level_init(void) {
    if (bl_ready) return;
    for (int i = 0; i < 324; i++) BL.cp_to_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        int32_t cp = byte_to_cp((uint8_t)b);
        BL.len[b] = (uint8_t)utf8proc_encode_char(cp, (uint8_t *)BL.utf8[b]);
        BL.cp_to_byte[cp] = (int16_t)b;
    }
    bl_ready = true;
}

/* ---------- normalizers ---------- */

static void replace_all(sbuf *out, const char *s, size_t n, const char *pat, size_t pn, const char *with) {
    size_t i = 0;
    while (i < n) {
        const char *hit = pn ? memmem(s + i, n - i, pat, pn) : NULL;
        if (!hit) break;
        sb_add(out, s + i, (size_t)(hit - (s + i)));
        sb_adds(out, with);
        i = (size_t)(hit - s) + pn;
    }
    sb_add(out, s + i, n - i);
}

static bool all_ascii(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if ((uint8_t)s[i] >= 0x80) return false;
    return true;
}

static void normalize_unicode(sbuf *out, const char *s, size_t n, utf8proc_option_t opts) {
    if (all_ascii(s, n)) {
        sb_add(out, s, n);
        return;
    }
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t k = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &dst,
                                      opts | UTF8PROC_STABLE);
    if (k < 0) sb_add(out, s, n); /* cannot happen on valid UTF-8 */
    else sb_add(out, dst, (size_t)k);
    free(dst);
}

static void normalize(const normalizer *nz, const char *s, size_t n, sbuf *out, sbuf *tmp, size_t cap);

/* A Sequence normalizer: each step reads the previous step's text; stops once the text passes `cap`. */
static void normalize_sequence(const normalizer *nz, const char *s, size_t n, sbuf *out, sbuf *tmp, size_t cap) {
    sb_add(out, s, n);
    for (size_t i = 0; i < nz->n_sub && !out->oom; i++) {
        sbuf swap = *tmp;
        *tmp = *out;
        *out = swap;
        sbuf scratch = {0};
        normalize(&nz->sub[i], tmp->p ? tmp->p : "", tmp->n, out, &scratch, cap);
        sb_free(&scratch);
        if (out->n > cap) out->over = out->oom = true;
    }
}

/* Appends s with every match of `re` replaced by `content`. */
static void replace_matches(sbuf *out, const char *s, size_t n, const regex *re, const char *content) {
    for (size_t at = 0, ms, me; at < n;) {
        if (!regex_next(re, s, n, at, &ms, &me)) {
            sb_add(out, s + at, n - at);
            break;
        }
        sb_add(out, s + at, ms - at);
        if (ms >= n) break; /* no match is looked for at the very end */
        sb_adds(out, content);
        at = me;
        if (me == ms) { /* an empty match: keep the next character and search after it */
            size_t k = utf8_len_at(s + ms, n - ms);
            sb_add(out, s + ms, k);
            at += k;
        }
    }
}

/* Appends s without its leading (`left`) and trailing (`right`) white space. */
static void strip_spaces(sbuf *out, const char *s, size_t n, bool left, bool right) {
    size_t a = 0, b = n, k;
    while (left && a < b && is_space_cp(utf8_decode(s + a, b - a, &k))) a += k;
    while (right && b > a) {
        size_t c = b - 1;
        while (c > a && ((uint8_t)s[c] & 0xC0) == 0x80) c--;
        if (!is_space_cp(utf8_decode(s + c, b - c, &k))) break;
        b = c;
    }
    sb_add(out, s + a, b - a);
}

/* Writes normalize(s) to out (cleared first); tmp is scratch for sequences. A sequence whose
 * steps make the text longer than `cap` bytes stops there with out->over (and out->oom) set:
 * chained Replace steps could otherwise grow it exponentially. */
static void normalize(const normalizer *nz, const char *s, size_t n, sbuf *out, sbuf *tmp, size_t cap) {
    out->n = 0;
    switch (nz->kind) {
    case NORM_SEQUENCE: normalize_sequence(nz, s, n, out, tmp, cap); return;
    case NORM_PREPEND:
        if (n) sb_adds(out, nz->text);
        sb_add(out, s, n);
        return;
    case NORM_REPLACE:
        if (nz->re) replace_matches(out, s, n, nz->re, nz->content);
        else replace_all(out, s, n, nz->text, strlen(nz->text), nz->content);
        return;
    case NORM_NFC: normalize_unicode(out, s, n, UTF8PROC_COMPOSE); return;
    case NORM_NFD: normalize_unicode(out, s, n, UTF8PROC_DECOMPOSE); return;
    case NORM_NFKC: normalize_unicode(out, s, n, UTF8PROC_COMPOSE | UTF8PROC_COMPAT); return;
    case NORM_NFKD: normalize_unicode(out, s, n, UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT); return;
    case NORM_LOWERCASE:
    case NORM_STRIP_ACCENTS:
        for (size_t i = 0, k; i < n; i += k) {
            int32_t cp = utf8_decode(s + i, n - i, &k);
            if (nz->kind == NORM_LOWERCASE) sb_add_cp(out, utf8proc_tolower(cp));
            else if (utf8proc_category(cp) != UTF8PROC_CATEGORY_MN) sb_add(out, s + i, k);
        }
        return;
    case NORM_STRIP: strip_spaces(out, s, n, nz->left, nz->right); return;
    }
}

/* ---------- pre-tokenizers ---------- */

static void split_into(const regex *re, split_behavior beh, bool invert, const char *s, size_t n,
                       bool at_start, spans *sp, pieces *out) {
    find_matches(re, s, n, sp);
    apply_behavior(sp, beh, invert);
    for (size_t i = 0; i < sp->n; i++)
        if (sp->v[i].e > sp->v[i].s)
            pieces_add(out, s + sp->v[i].s, sp->v[i].e - sp->v[i].s, at_start && sp->v[i].s == 0);
    if (sp->oom) out->oom = true;
}

/* Appends s mapped to the ByteLevel alphabet to out as one piece. */
static void add_byte_level(pieces *out, const char *s, size_t n, bool at_start) {
    if (!grow((void **)&out->v, &out->cap, out->n + 1, sizeof *out->v)) {
        out->oom = true;
        return;
    }
    size_t off = out->text.n;
    if (!sb_reserve(&out->text, 2 * n)) return;
    char *w = out->text.p + off;
    for (size_t i = 0; i < n; i++) {
        uint8_t b = (uint8_t)s[i];
        memcpy(w, BL.utf8[b], 2);
        w += BL.len[b];
    }
    out->text.n = (size_t)(w - out->text.p);
    out->text.p[out->text.n] = '\0';
    out->v[out->n++] = (piece){off, out->text.n - off, at_start};
}

static void pretokenize_piece(moe_hf_tokenizer *t, const pretok *pt, const char *s, size_t n, bool at_start,
                              pieces *out);

static void pretokenize(moe_hf_tokenizer *t, const pretok *pt, pieces *in, pieces *out) {
    pieces_clear(out);
    for (size_t i = 0; i < in->n; i++)
        pretokenize_piece(t, pt, in->text.p + in->v[i].off, in->v[i].len, in->v[i].at_start, out);
}

static void pretokenize_piece(moe_hf_tokenizer *t, const pretok *pt, const char *s, size_t n, bool at_start,
                              pieces *out) {
    switch (pt->kind) {
    case PRE_SPLIT:
        split_into(pt->re, pt->behavior, pt->invert, s, n, at_start, &t->sp, out);
        return;
    case PRE_BYTE_LEVEL: {
        sbuf pre = {0};
        if (pt->add_prefix_space && (n == 0 || s[0] != ' ')) {
            sb_adds(&pre, " ");
            sb_add(&pre, s, n);
            s = pre.p;
            n = pre.n;
        }
        if (!pt->re) {
            if (n) add_byte_level(out, s, n, at_start);
        } else {
            find_matches(pt->re, s, n, &t->sp);
            apply_behavior(&t->sp, SPLIT_ISOLATED, false);
            for (size_t i = 0; i < t->sp.n; i++)
                if (t->sp.v[i].e > t->sp.v[i].s)
                    add_byte_level(out, s + t->sp.v[i].s, t->sp.v[i].e - t->sp.v[i].s,
                                   at_start && t->sp.v[i].s == 0);
        }
        if (pre.oom || t->sp.oom) out->oom = true;
        sb_free(&pre);
        return;
    }
    case PRE_METASPACE: {
        sbuf m = {0};
        bool prepend = pt->scheme == PREPEND_ALWAYS || (pt->scheme == PREPEND_FIRST && at_start);
        if (prepend && !(n >= strlen(pt->replacement) && memcmp(s, pt->replacement, strlen(pt->replacement)) == 0))
            sb_adds(&m, pt->replacement);
        replace_all(&m, s, n, " ", 1, pt->replacement);
        if (!pt->split) {
            if (m.n) pieces_add(out, m.p, m.n, at_start);
        } else {
            split_into(pt->re, SPLIT_MERGED_NEXT, false, m.p ? m.p : "", m.n, at_start, &t->sp, out);
        }
        if (m.oom) out->oom = true;
        sb_free(&m);
        return;
    }
    case PRE_SEQUENCE: {
        pieces a = {0}, b = {0};
        pieces_add(&a, s, n, at_start);
        for (size_t i = 0; i < pt->n_sub; i++) {
            pretokenize(t, &pt->sub[i], &a, &b);
            pieces swap = a;
            a = b;
            b = swap;
        }
        for (size_t i = 0; i < a.n; i++) pieces_add(out, a.text.p + a.v[i].off, a.v[i].len, a.v[i].at_start);
        if (a.oom || a.text.oom) out->oom = true;
        pieces_free(&a);
        pieces_free(&b);
        return;
    }
    }
}

/* ---------- BPE ---------- */

typedef struct bpe_sym {
    int32_t id, prev, next;
    bool gone;
} bpe_sym;

typedef struct bpe_merge {
    int32_t rank, pos, id;
} bpe_merge;

static bool merge_before(bpe_merge a, bpe_merge b) { return a.rank != b.rank ? a.rank < b.rank : a.pos < b.pos; }

static void heap_push(bpe_merge *h, size_t *n, bpe_merge m) {
    size_t i = (*n)++;
    while (i > 0 && merge_before(m, h[(i - 1) / 2])) {
        h[i] = h[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h[i] = m;
}

static bpe_merge heap_pop(bpe_merge *h, size_t *n) {
    bpe_merge top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && merge_before(h[c + 1], h[c])) c++;
        if (!merge_before(h[c], last)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n) h[i] = last;
    return top;
}

/* The initial symbols of a word: one per character (vocab lookup with the subword prefix /
 * word suffix), else its <0xXX> bytes, else unk (fused). Returns the count. */
static size_t bpe_symbols(moe_hf_tokenizer *t, const char *s, size_t n, bpe_sym *sym) {
    size_t m = 0;
    char key[64];
    for (size_t i = 0, k; i < n; i += k) {
        k = utf8_len_at(s + i, n - i);
        const char *ks = s + i;
        size_t kn = k;
        if ((i > 0 && t->subword_prefix) || (i + k == n && t->word_suffix)) {
            const char *pre = i > 0 && t->subword_prefix ? t->subword_prefix : "";
            const char *suf = i + k == n && t->word_suffix ? t->word_suffix : "";
            snprintf(key, sizeof key, "%s%.*s%s", pre, (int)k, s + i, suf);
            ks = key;
            kn = strlen(key);
        }
        const int32_t *id = smap_get(&t->vocab, ks, kn);
        if (id) {
            sym[m++] = (bpe_sym){*id, 0, 0, false};
            continue;
        }
        bool bytes_ok = t->byte_fallback;
        for (size_t j = 0; bytes_ok && j < k; j++) bytes_ok = t->byte_ids[(uint8_t)s[i + j]] >= 0;
        if (bytes_ok) {
            for (size_t j = 0; j < k; j++) sym[m++] = (bpe_sym){t->byte_ids[(uint8_t)s[i + j]], 0, 0, false};
        } else if (t->unk_id >= 0 && !(t->fuse_unk && m > 0 && sym[m - 1].id == t->unk_id)) {
            sym[m++] = (bpe_sym){t->unk_id, 0, 0, false};
        }
    }
    for (size_t i = 0; i < m; i++) {
        sym[i].prev = (int32_t)i - 1;
        sym[i].next = i + 1 < m ? (int32_t)i + 1 : -1;
    }
    return m;
}

static void bpe_push_pair(moe_hf_tokenizer *t, size_t *hn, int32_t pos) {
    bpe_sym *sym = t->syms;
    if (pos < 0 || sym[pos].next < 0) return;
    const pair_slot *p = pair_get(&t->merges, sym[pos].id, sym[sym[pos].next].id);
    if (p) heap_push(t->heap, hn, (bpe_merge){p->rank, pos, p->id});
}

/* Appends the ids of one pre-token to out. */
static void bpe_word(moe_hf_tokenizer *t, const char *s, size_t n, ivec *out) {
    if (t->ignore_merges) {
        const int32_t *id = smap_get(&t->vocab, s, n);
        if (id) {
            iv_push(out, *id);
            return;
        }
    }
    /* at most one symbol per byte; the heap gets m - 1 pairs, then at most 2 per merge */
    if (!grow((void **)&t->syms, &t->syms_cap, n + 1, sizeof *t->syms) ||
        !grow((void **)&t->heap, &t->heap_cap, 3 * n + 1, sizeof *t->heap)) {
        out->oom = true;
        return;
    }
    bpe_sym *sym = t->syms;
    size_t m = bpe_symbols(t, s, n, sym), hn = 0;
    for (size_t i = 0; i + 1 < m; i++) bpe_push_pair(t, &hn, (int32_t)i);
    while (hn) {
        bpe_merge top = heap_pop(t->heap, &hn);
        bpe_sym *a = &sym[top.pos];
        if (a->gone || a->next < 0) continue;
        const pair_slot *p = pair_get(&t->merges, a->id, sym[a->next].id);
        if (!p || p->id != top.id) continue;
        bpe_sym *b = &sym[a->next];
        a->id = top.id;
        b->gone = true;
        a->next = b->next;
        if (b->next >= 0) sym[b->next].prev = top.pos;
        bpe_push_pair(t, &hn, a->prev);
        bpe_push_pair(t, &hn, top.pos);
    }
    for (int32_t i = m ? 0 : -1; i >= 0; i = sym[i].next) iv_push(out, sym[i].id);
}

static void cache_clear(moe_hf_tokenizer *t) {
    smap_clear(&t->cache);
    t->cache_ids.n = 0;
}

/* bpe_word through the per-word cache. */
static void bpe_cached(moe_hf_tokenizer *t, const char *s, size_t n, ivec *out) {
    if (n > MAX_CACHED_WORD) {
        bpe_word(t, s, n, out);
        return;
    }
    const int32_t *at = smap_get(&t->cache, s, n);
    if (at) {
        const int32_t *v = t->cache_ids.v + *at;
        for (int32_t i = 1; i <= v[0]; i++) iv_push(out, v[i]);
        return;
    }
    size_t before = out->n;
    bpe_word(t, s, n, out);
    if (out->oom) return;
    if (t->cache.n >= MAX_CACHE_ENTRIES) cache_clear(t);
    int32_t off = (int32_t)t->cache_ids.n;
    iv_push(&t->cache_ids, (int32_t)(out->n - before));
    for (size_t i = before; i < out->n; i++) iv_push(&t->cache_ids, out->v[i]);
    if (t->cache_ids.oom || !smap_put(&t->cache, s, n, off)) cache_clear(t); /* a cache failure only slows */
}

/* ---------- added tokens ---------- */

static bool is_word_cp(int32_t c) { return c == '_' || is_alnum_cp(c); }

static bool ends_with_word(const char *s, size_t n) {
    if (!n) return false;
    size_t c = n - 1, k;
    while (c > 0 && ((uint8_t)s[c] & 0xC0) == 0x80) c--;
    return is_word_cp(utf8_decode(s + c, n - c, &k));
}

static bool starts_with_word(const char *s, size_t n) {
    size_t k;
    return n && is_word_cp(utf8_decode(s, n, &k));
}

/* The next added token in s[from..n): its span after lstrip/rstrip and index, or false. `floor`
 * is the end of the previous match (lstrip never reaches before it). */
static bool added_next(const moe_hf_tokenizer *t, const added_matcher *am, const char *s, size_t n, size_t from,
                       size_t *ms, size_t *me, size_t *which) {
    size_t floor = from;
    for (size_t i = from; i < n; i++) {
        const int32_t *cand = am->by_first[(uint8_t)s[i]];
        if (!cand) continue;
        for (; *cand >= 0; cand++) {
            const added_token *a = &t->added[*cand];
            if (a->len > n - i || memcmp(s + i, a->content, a->len) != 0) continue;
            size_t start = i, stop = i + a->len, k;
            if (a->single_word && (ends_with_word(s, start) || starts_with_word(s + stop, n - stop))) {
                i = stop - 1; /* the match is consumed but not used (floor stays) */
                break;
            }
            if (a->lstrip)
                while (start > floor) {
                    size_t c = start - 1;
                    while (c > floor && ((uint8_t)s[c] & 0xC0) == 0x80) c--;
                    if (!is_space_cp(utf8_decode(s + c, start - c, &k))) break;
                    start = c;
                }
            if (a->rstrip)
                while (stop < n && is_space_cp(utf8_decode(s + stop, n - stop, &k))) stop += k;
            *ms = start;
            *me = stop;
            *which = (size_t)*cand;
            return true;
        }
    }
    return false;
}

static moe_status matcher_build(moe_hf_tokenizer *t, added_matcher *am, bool normalized) {
    size_t count[256] = {0};
    for (size_t i = 0; i < t->n_added; i++)
        if (t->added[i].normalized == normalized && t->added[i].len) count[(uint8_t)t->added[i].content[0]]++;
    for (int b = 0; b < 256; b++) {
        if (!count[b]) continue;
        int32_t *v = malloc((count[b] + 1) * sizeof *v);
        if (!v) return moe_error(MOE_ERR_OOM, "tokenizer %s: out of memory", t->path);
        size_t k = 0;
        for (size_t i = 0; i < t->n_added; i++)
            if (t->added[i].normalized == normalized && t->added[i].len && (uint8_t)t->added[i].content[0] == b)
                v[k++] = (int32_t)i;
        for (size_t i = 1; i < k; i++) /* longest first (insertion sort: few per byte) */
            for (size_t j = i; j > 0 && t->added[v[j]].len > t->added[v[j - 1]].len; j--) {
                int32_t x = v[j];
                v[j] = v[j - 1];
                v[j - 1] = x;
            }
        v[k] = -1;
        am->by_first[b] = v;
    }
    return MOE_OK;
}

/* ---------- encode ---------- */

/* Normalised text (no added tokens left in it): pre-tokenize and run the model. */
/* Without a pre-tokenizer (SentencePiece style) the whole text is one BPE word. When no token
 * holds a "\xE2\x96\x81" after another character (t->cut_words), no merge can span the gap
 * before a "\xE2\x96\x81" that follows another character, so the text is cut there into
 * words that merge alone (and hit the cache): the same ids, far less work. */
#define META "\xE2\x96\x81"

static void bpe_words(moe_hf_tokenizer *t, const char *s, size_t n, ivec *out) {
    size_t start = 0;
    for (size_t i = 1; i + 3 <= n; i++)
        if (!memcmp(s + i, META, 3) && !(i >= 3 && !memcmp(s + i - 3, META, 3))) {
            bpe_cached(t, s + start, i - start, out);
            start = i;
        }
    bpe_cached(t, s + start, n - start, out);
}

/* Whether every vocab token holding "\xE2\x96\x81" has it only in a leading run. */
static bool words_cuttable(const moe_hf_tokenizer *t) {
    if (!smap_get(&t->vocab, META, 3)) return false;
    for (size_t id = 0; id < t->n_tokens; id++) {
        const char *tok = t->tokens[id];
        if (!tok) continue;
        size_t n = t->token_len[id], i = 0;
        while (i + 3 <= n && !memcmp(tok + i, META, 3)) i += 3;
        if (memmem(tok + i, n - i, META, 3)) return false;
    }
    return true;
}

static void encode_normalized(moe_hf_tokenizer *t, const char *s, size_t n, bool at_start, ivec *out) {
    if (!t->pre && t->cut_words) {
        bpe_words(t, s, n, out);
        return;
    }
    pieces_clear(&t->pa);
    pieces_add(&t->pa, s, n, at_start);
    pieces *fin = &t->pa;
    if (t->pre) {
        pretokenize(t, t->pre, &t->pa, &t->pb);
        fin = &t->pb;
    }
    for (size_t i = 0; i < fin->n; i++)
        if (fin->v[i].len) bpe_cached(t, fin->text.p + fin->v[i].off, fin->v[i].len, out);
    if (fin->oom || fin->text.oom || t->pa.oom || t->pa.text.oom) out->oom = true;
}

/* Raw text between added tokens: normalise, split out normalised added tokens, encode. */
static void encode_segment(moe_hf_tokenizer *t, const char *s, size_t n, bool at_start, ivec *out) {
    const char *ns = s;
    size_t nn = n;
    if (t->norm) {
        t->norm_a.oom = t->norm_a.over = t->norm_b.oom = t->norm_b.over = false;
        normalize(t->norm, s, n, &t->norm_a, &t->norm_b, NORM_GROWTH * n + 4096);
        if (t->norm_a.oom) {
            t->norm_over = t->norm_a.over;
            out->oom = true;
            return;
        }
        ns = t->norm_a.p ? t->norm_a.p : "";
        nn = t->norm_a.n;
    }
    /* encode_normalized reuses norm_a's neighbours only, so ns stays valid */
    size_t at = 0, ms, me, which;
    while (at < nn && added_next(t, &t->norm_match, ns, nn, at, &ms, &me, &which)) {
        if (ms > at) encode_normalized(t, ns + at, ms - at, at_start && at == 0, out);
        iv_push(out, t->added[which].id);
        at = me;
    }
    if (at < nn) encode_normalized(t, ns + at, nn - at, at_start && at == 0, out);
}

static void post_process(const moe_hf_tokenizer *t, ivec *ids, size_t from) {
    for (size_t p = 0; p < t->n_post; p++) {
        if (t->post[p].kind != POST_TEMPLATE) continue;
        size_t n = ids->n - from;
        int32_t *seq = malloc((n + 1) * sizeof *seq);
        if (!seq) {
            ids->oom = true;
            return;
        }
        if (n) memcpy(seq, ids->v + from, n * sizeof *seq);
        ids->n = from;
        for (size_t i = 0; i < t->post[p].n_items; i++) {
            const post_item *it = &t->post[p].items[i];
            if (it->is_sequence)
                for (size_t j = 0; j < n; j++) iv_push(ids, seq[j]);
            else
                for (size_t j = 0; j < it->n_ids; j++) iv_push(ids, it->ids[j]);
        }
        free(seq);
    }
}

moe_status moe_hf_encode(moe_hf_tokenizer *t, const char *text, size_t len, bool add_special,
                         moe_token_buf *out) {
    MOE_ASSERT(t && (text || !len) && out, "moe_hf_encode: NULL argument");
    sbuf clean = {0};
    if (!utf8_valid(text, len)) {
        utf8_lossy(&clean, text, len);
        if (clean.oom) return moe_error(MOE_ERR_OOM, "tokenizer %s: out of memory", t->path);
        text = clean.p;
        len = clean.n;
    }
    ivec ids = {out->data, out->len, out->cap, false}; /* appends to out's array in place */
    t->norm_over = false;
    size_t first = out->len, at = 0, ms, me, which;
    while (at < len && added_next(t, &t->raw_match, text, len, at, &ms, &me, &which)) {
        if (ms > at) encode_segment(t, text + at, ms - at, at == 0, &ids);
        iv_push(&ids, t->added[which].id);
        at = me;
    }
    if (at < len) encode_segment(t, text + at, len - at, at == 0, &ids);
    if (add_special) post_process(t, &ids, first);
    sb_free(&clean);
    out->data = ids.v;
    out->cap = ids.cap;
    out->len = ids.oom ? first : ids.n;
    if (ids.oom && t->norm_over)
        return moe_error(MOE_ERR_FORMAT, "tokenizer %s: its normalizers make the text over %dx longer", t->path,
                         NORM_GROWTH);
    return ids.oom ? moe_error(MOE_ERR_OOM, "tokenizer %s: out of memory while encoding", t->path) : MOE_OK;
}

/* ---------- decode ---------- */

typedef struct toks {
    sbuf text;
    size_t *off; /* token i is text[off[i], off[i+1]) */
    size_t n, cap;
    bool oom;
} toks;

static void toks_end(toks *k) { /* closes the token being written at text.n */
    if (!grow((void **)&k->off, &k->cap, k->n + 2, sizeof *k->off)) {
        k->oom = true;
        return;
    }
    if (k->n == 0) k->off[0] = 0;
    k->off[++k->n] = k->text.n;
}

static void toks_push(toks *k, const char *s, size_t n) {
    if (k->n == 0 && !grow((void **)&k->off, &k->cap, 2, sizeof *k->off)) k->oom = true;
    if (k->oom) return;
    if (k->n == 0) k->off[0] = k->text.n;
    sb_add(&k->text, s, n);
    toks_end(k);
}

static void toks_free(toks *k) {
    sb_free(&k->text);
    free(k->off);
    *k = (toks){0};
}

static bool byte_token(const char *s, size_t n, uint8_t *b) {
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return false;
    unsigned v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        if (c >= '0' && c <= '9') v = v * 16 + (unsigned)(c - '0');
        else if (c >= 'A' && c <= 'F') v = v * 16 + (unsigned)(c - 'A' + 10);
        else if (c >= 'a' && c <= 'f') v = v * 16 + (unsigned)(c - 'a' + 10);
        else return false;
    }
    *b = (uint8_t)v;
    return true;
}

static void flush_bytes(toks *out, sbuf *bytes) {
    if (!bytes->n) return;
    if (utf8_valid(bytes->p, bytes->n)) toks_push(out, bytes->p, bytes->n);
    else
        for (size_t i = 0; i < bytes->n; i++) toks_push(out, REPLACEMENT_CHAR, 3);
    bytes->n = 0;
}

/* Strip: at most `start` leading and `stop` trailing copies of the character `c`. */
static void strip_token(toks *out, const char *s, size_t n, const char *c, int start, int stop) {
    size_t cl = strlen(c), a = 0, b = n;
    for (int i = 0; i < start && b - a >= cl && memcmp(s + a, c, cl) == 0; i++) a += cl;
    for (int i = 0; i < stop && b - a >= cl && memcmp(s + b - cl, c, cl) == 0; i++) b -= cl;
    toks_push(out, s + a, b - a);
}

/* Pushes the token s with every `pat` in it replaced by `with`; tmp is scratch. */
static void push_replaced(toks *out, sbuf *tmp, const char *s, size_t n, const char *pat, const char *with) {
    tmp->n = 0;
    replace_all(tmp, s, n, pat, strlen(pat), with);
    toks_push(out, tmp->p ? tmp->p : "", tmp->n);
}

/* ByteLevel: appends the bytes the token's characters stand for, or the token itself when one of
 * them is outside the byte map. */
static void byte_level_decode(sbuf *bytes, const char *s, size_t n) {
    size_t start = bytes->n, k;
    for (size_t j = 0; j < n; j += k) {
        int32_t cp = utf8_decode(s + j, n - j, &k);
        int b = cp < 324 ? BL.cp_to_byte[cp] : -1;
        if (b < 0) {
            bytes->n = start;
            sb_add(bytes, s, n);
            return;
        }
        uint8_t byte = (uint8_t)b;
        sb_add(bytes, &byte, 1);
    }
}

/* Pushes the bytes as one token, invalid UTF-8 replaced by U+FFFD. */
static void push_lossy(toks *out, const sbuf *bytes) {
    sbuf lossy = {0};
    utf8_lossy(&lossy, bytes->p ? bytes->p : "", bytes->n);
    toks_push(out, lossy.p ? lossy.p : "", lossy.n);
    if (lossy.oom) out->oom = true;
    sb_free(&lossy);
}

static void decode_step(const decoder *d, const toks *in, toks *out) {
    sbuf tmp = {0};
    for (size_t i = 0; i < in->n; i++) {
        const char *s = in->text.p + in->off[i];
        size_t n = in->off[i + 1] - in->off[i];
        uint8_t b;
        switch (d->kind) {
        case DEC_REPLACE:
            push_replaced(out, &tmp, s, n, d->pattern, d->content);
            break;
        case DEC_BPE_SUFFIX:
            push_replaced(out, &tmp, s, n, d->pattern, i + 1 == in->n ? "" : " ");
            break;
        case DEC_METASPACE:
            push_replaced(out, &tmp, s, n, d->replacement, i == 0 && d->scheme != PREPEND_NEVER ? "" : " ");
            break;
        case DEC_BYTE_FALLBACK:
            if (byte_token(s, n, &b)) sb_add(&tmp, &b, 1);
            else {
                flush_bytes(out, &tmp);
                toks_push(out, s, n);
            }
            break;
        case DEC_FUSE:
            sb_add(&tmp, s, n);
            break;
        case DEC_STRIP:
            strip_token(out, s, n, d->content, d->start, d->stop);
            break;
        case DEC_BYTE_LEVEL:
            byte_level_decode(&tmp, s, n);
            break;
        }
    }
    if (d->kind == DEC_BYTE_FALLBACK) flush_bytes(out, &tmp);
    if (d->kind == DEC_FUSE) toks_push(out, tmp.p ? tmp.p : "", tmp.n);
    if (d->kind == DEC_BYTE_LEVEL) push_lossy(out, &tmp);
    if (tmp.oom) out->oom = true;
    sb_free(&tmp);
}

/* clean_up_tokenization_spaces as transformers does it. */
static void cleanup_spaces(sbuf *s) {
    static const char *from[] = {" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"};
    static const char *to[] = {".", "?", "!", ",", "'", "n't", "'m", "'s", "'ve", "'re"};
    for (size_t r = 0; r < sizeof from / sizeof from[0]; r++) {
        sbuf o = {0};
        replace_all(&o, s->p ? s->p : "", s->n, from[r], strlen(from[r]), to[r]);
        sb_free(s);
        *s = o;
    }
}

moe_status moe_hf_decode(const moe_hf_tokenizer *t, const int32_t *ids, size_t n, bool skip_special,
                         char **text) {
    MOE_ASSERT(t && (ids || !n) && text, "moe_hf_decode: NULL argument");
    *text = NULL;
    toks a = {0}, b = {0};
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || (size_t)ids[i] >= t->n_tokens || !t->tokens[ids[i]]) {
            toks_free(&a);
            return moe_error(MOE_ERR_INVALID, "tokenizer %s: id %d is not in the vocabulary (size %zu)", t->path,
                             ids[i], t->n_tokens);
        }
        if (skip_special && t->is_special[ids[i]]) continue;
        toks_push(&a, t->tokens[ids[i]], t->token_len[ids[i]]);
    }
    for (size_t d = 0; d < t->n_dec; d++) {
        toks_free(&b);
        decode_step(&t->dec[d], &a, &b);
        toks swap = a;
        a = b;
        b = swap;
    }
    sbuf out = {0};
    for (size_t i = 0; i < a.n; i++) {
        if (i && !t->has_decoder) sb_adds(&out, " ");
        sb_add(&out, a.text.p + a.off[i], a.off[i + 1] - a.off[i]);
    }
    if (t->cleanup_spaces) cleanup_spaces(&out);
    bool oom = a.oom || a.text.oom || b.oom || out.oom;
    toks_free(&a);
    toks_free(&b);
    if (oom) {
        sb_free(&out);
        return moe_error(MOE_ERR_OOM, "tokenizer %s: out of memory while decoding", t->path);
    }
    *text = out.p ? out.p : calloc(1, 1);
    return *text ? MOE_OK : moe_error(MOE_ERR_OOM, "out of memory");
}

/* ---------- streaming decode ---------- */

void moe_hf_stream_init(moe_hf_stream *s, const moe_hf_tokenizer *tok, bool skip_special) {
    *s = (moe_hf_stream){.tok = tok, .skip_special = skip_special};
}

void moe_hf_stream_free(moe_hf_stream *s) {
    free(s->ids);
    *s = (moe_hf_stream){0};
}

/* The text ids[prefix..] adds to ids[prefix, read); `final` also emits an incomplete tail. */
static moe_status stream_step(moe_hf_stream *s, bool final, char **piece) {
    char *before = NULL, *after = NULL;
    *piece = NULL;
    const int32_t *from = s->ids ? s->ids + s->prefix : NULL; /* finish before any push: no ids yet */
    moe_status st = moe_hf_decode(s->tok, from, s->read - s->prefix, s->skip_special, &before);
    if (st == MOE_OK) st = moe_hf_decode(s->tok, from, s->n - s->prefix, s->skip_special, &after);
    if (st != MOE_OK) {
        free(before);
        return st;
    }
    size_t lb = strlen(before), la = strlen(after);
    bool partial = la >= 3 && memcmp(after + la - 3, REPLACEMENT_CHAR, 3) == 0;
    if (la > lb && (final || !partial)) {
        memmove(after, after + lb, la - lb + 1);
        *piece = after;
        s->prefix = s->read;
        s->read = s->n;
    } else {
        free(after);
        *piece = calloc(1, 1);
    }
    free(before);
    return *piece ? MOE_OK : moe_error(MOE_ERR_OOM, "out of memory");
}

moe_status moe_hf_stream_push(moe_hf_stream *s, int32_t id, char **piece) {
    if (!grow((void **)&s->ids, &s->cap, s->n + 1, sizeof *s->ids)) return moe_error(MOE_ERR_OOM, "out of memory");
    s->ids[s->n++] = id;
    return stream_step(s, false, piece);
}

moe_status moe_hf_stream_finish(moe_hf_stream *s, char **piece) { return stream_step(s, true, piece); }

/* ---------- accessors ---------- */

size_t moe_hf_vocab_size(const moe_hf_tokenizer *t) { return t->n_tokens; }

int32_t moe_hf_token_to_id(const moe_hf_tokenizer *t, const char *token) {
    const int32_t *id = smap_get(&t->vocab, token, strlen(token));
    return id ? *id : -1;
}

const char *moe_hf_id_to_token(const moe_hf_tokenizer *t, int32_t id) {
    return id >= 0 && (size_t)id < t->n_tokens ? t->tokens[id] : NULL;
}

const char *moe_hf_bos_token(const moe_hf_tokenizer *t) { return t->bos; }
const char *moe_hf_eos_token(const moe_hf_tokenizer *t) { return t->eos; }
const char *moe_hf_chat_template(const moe_hf_tokenizer *t) { return t->chat_template; }
const char *moe_hf_chat_template_origin(const moe_hf_tokenizer *t) { return t->chat_origin; }

/* Encodes text whole, or line by line (each '\n'-terminated line a separate call). */
static moe_status encode_all(moe_hf_tokenizer *t, const char *text, size_t len, bool by_line, moe_token_buf *ids) {
    if (!by_line) return moe_hf_encode(t, text, len, false, ids);
    for (size_t at = 0; at < len;) {
        const char *nl = memchr(text + at, '\n', len - at);
        size_t end = nl ? (size_t)(nl - text) + 1 : len;
        MOE_TRY(moe_hf_encode(t, text + at, end - at, false, ids));
        at = end;
    }
    return MOE_OK;
}

moe_status moe_hf_bench_encode(moe_hf_tokenizer *t, const char *text, size_t len, int rounds, bool by_line,
                               moe_hf_bench *out) {
    *out = (moe_hf_bench){0};
    cache_clear(t);
    for (int r = 0; r < rounds; r++) {
        moe_token_buf ids = {0};
        double t0 = moe_clock_ms();
        moe_status st = encode_all(t, text, len, by_line, &ids);
        double s = (moe_clock_ms() - t0) / 1000.0;
        out->tokens = ids.len;
        moe_token_buf_free(&ids);
        if (st != MOE_OK) return st;
        if (s <= 0) s = 1e-9;
        if (r == 0) out->cold_tokens_per_s = (double)out->tokens / s, out->cold_bytes_per_s = (double)len / s;
        if (r > 0 && (double)out->tokens / s > out->warm_tokens_per_s)
            out->warm_tokens_per_s = (double)out->tokens / s, out->warm_bytes_per_s = (double)len / s;
    }
    return MOE_OK;
}

/* ---------- loading tokenizer.json ---------- */


static moe_status bad(moe_status code, const char *path, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static moe_status bad(moe_status code, const char *path, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return moe_error(code, "tokenizer %s: %s", path, msg);
}

static moe_status read_text(const char *path, char **out, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return moe_error(MOE_ERR_IO, "cannot open %s", path);
    sbuf b = {0};
    char chunk[65536];
    size_t k;
    while ((k = fread(chunk, 1, sizeof chunk, f)) > 0) sb_add(&b, chunk, k);
    bool err = ferror(f);
    fclose(f);
    if (err || b.oom) {
        sb_free(&b);
        return moe_error(err ? MOE_ERR_IO : MOE_ERR_OOM, "cannot read %s", path);
    }
    *out = b.p ? b.p : calloc(1, 1);
    *len = b.n;
    return *out ? MOE_OK : moe_error(MOE_ERR_OOM, "out of memory reading %s", path);
}

/* Parses a JSON file; a syntax error names the file, line and column. */
static moe_status parse_json_file(const char *path, cJSON **out) {
    char *text;
    size_t len;
    MOE_TRY(read_text(path, &text, &len));
    if (!utf8_valid(text, len)) { /* as serde_json, which tokenizers reads it with */
        free(text);
        return moe_error(MOE_ERR_FORMAT, "%s: not valid UTF-8", path);
    }
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithLengthOpts(text, len, &end, false);
    if (!j) {
        size_t at = end ? (size_t)(end - text) : 0, line = 1, col = 1;
        for (size_t i = 0; i < at && i < len; i++) line += text[i] == '\n', col = text[i] == '\n' ? 1 : col + 1;
        free(text);
        return moe_error(MOE_ERR_FORMAT, "%s:%zu:%zu: malformed JSON", path, line, col);
    }
    free(text);
    *out = j;
    return MOE_OK;
}

static const char *jstr(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static bool jbool(const cJSON *o, const char *key, bool dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : dflt;
}

static bool jnull(const cJSON *v) { return !v || cJSON_IsNull(v); }

static char *dupstr(const char *s) { return s ? strdup(s) : NULL; }

#define MAX_TOKEN_ID (1 << 28)
#define MAX_ID_GAP 65536 /* ids may leave holes, but not more than this beyond the entries */

/* A token id: a JSON number with an integral value in [0, MAX_TOKEN_ID]. */
static bool json_id(const cJSON *v, int32_t *id) {
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0 && v->valuedouble <= MAX_TOKEN_ID) ||
        v->valuedouble != (double)(int32_t)v->valuedouble)
        return false;
    *id = (int32_t)v->valuedouble;
    return true;
}

/* A {"String": s} or {"Regex": r} pattern: a literal (into *literal) or a compiled regex. */
static moe_status load_pattern(const cJSON *o, const char *path, const char *what, char **literal, regex **re) {
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(o, "pattern");
    const char *s = jstr(p, "String"), *r = jstr(p, "Regex");
    if (s) {
        *literal = strdup(s);
        return *literal ? MOE_OK : moe_error(MOE_ERR_OOM, "out of memory");
    }
    if (r) return regex_compile(re, r, false, path);
    return bad(MOE_ERR_FORMAT, path, "%s needs a pattern {\"String\": ...} or {\"Regex\": ...}", what);
}

static moe_status load_normalizer(const cJSON *o, const char *path, normalizer *nz) {
    const char *type = jstr(o, "type");
    if (!type) return bad(MOE_ERR_FORMAT, path, "normalizer without a \"type\"");
    static const struct { const char *name; norm_kind kind; } simple[] = {
        {"NFC", NORM_NFC}, {"NFD", NORM_NFD}, {"NFKC", NORM_NFKC}, {"NFKD", NORM_NFKD},
        {"Lowercase", NORM_LOWERCASE}, {"StripAccents", NORM_STRIP_ACCENTS}};
    for (size_t i = 0; i < sizeof simple / sizeof simple[0]; i++)
        if (!strcmp(type, simple[i].name)) {
            nz->kind = simple[i].kind;
            return MOE_OK;
        }
    if (!strcmp(type, "Sequence")) {
        const cJSON *arr = cJSON_GetObjectItemCaseSensitive(o, "normalizers");
        nz->kind = NORM_SEQUENCE;
        nz->n_sub = (size_t)cJSON_GetArraySize(arr);
        nz->sub = calloc(nz->n_sub + 1, sizeof *nz->sub);
        if (!nz->sub) return moe_error(MOE_ERR_OOM, "out of memory");
        size_t i = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, arr) MOE_TRY(load_normalizer(e, path, &nz->sub[i++]));
        return MOE_OK;
    }
    if (!strcmp(type, "Prepend")) {
        nz->kind = NORM_PREPEND;
        nz->text = dupstr(jstr(o, "prepend"));
        return nz->text ? MOE_OK : bad(MOE_ERR_FORMAT, path, "Prepend normalizer without \"prepend\"");
    }
    if (!strcmp(type, "Replace")) {
        nz->kind = NORM_REPLACE;
        nz->content = dupstr(jstr(o, "content"));
        if (!nz->content) return bad(MOE_ERR_FORMAT, path, "Replace normalizer without \"content\"");
        return load_pattern(o, path, "Replace normalizer", &nz->text, &nz->re);
    }
    if (!strcmp(type, "Strip")) {
        nz->kind = NORM_STRIP;
        nz->left = jbool(o, "strip_left", true);
        nz->right = jbool(o, "strip_right", true);
        return MOE_OK;
    }
    return bad(MOE_ERR_UNSUPPORTED, path,
               "normalizer type \"%s\" is not supported (supported: Sequence, Prepend, Replace, NFC, NFD, NFKC, "
               "NFKD, Lowercase, Strip, StripAccents)", type);
}

static const char GPT2_SPLIT[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static moe_status load_behavior(const cJSON *o, const char *path, split_behavior dflt, split_behavior *out) {
    const char *b = jstr(o, "behavior");
    static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
    *out = dflt;
    if (!b) return MOE_OK;
    for (int i = 0; i < 5; i++)
        if (!strcmp(b, names[i])) {
            *out = (split_behavior)i;
            return MOE_OK;
        }
    return bad(MOE_ERR_UNSUPPORTED, path, "split behavior \"%s\" is not supported", b);
}

static moe_status load_prepend_scheme(const cJSON *o, const char *path, prepend_scheme *out) {
    const char *s = jstr(o, "prepend_scheme");
    *out = jbool(o, "add_prefix_space", true) ? PREPEND_ALWAYS : PREPEND_NEVER;
    if (!s) return MOE_OK;
    if (!strcmp(s, "always")) *out = PREPEND_ALWAYS;
    else if (!strcmp(s, "first")) *out = PREPEND_FIRST;
    else if (!strcmp(s, "never")) *out = PREPEND_NEVER;
    else return bad(MOE_ERR_UNSUPPORTED, path, "Metaspace prepend_scheme \"%s\" is not supported", s);
    return MOE_OK;
}

static moe_status load_replacement(const cJSON *o, const char *path, char out[8]) {
    const char *r = jstr(o, "replacement");
    if (!r) r = "\xE2\x96\x81"; /* U+2581 */
    if (!*r || strlen(r) >= 8) return bad(MOE_ERR_FORMAT, path, "Metaspace replacement \"%s\" is empty or too long", r);
    strcpy(out, r);
    return MOE_OK;
}

/* The pre-tokenizers that split on one fixed regex (Digits, WhitespaceSplit, Whitespace,
 * Punctuation); any other type is refused. */
static moe_status load_fixed_split(const cJSON *o, const char *path, const char *type, pretok *pt) {
    if (!strcmp(type, "Digits"))
        return regex_compile(&pt->re, jbool(o, "individual_digits", false) ? "\\p{N}" : "\\p{N}+", false, path);
    if (!strcmp(type, "WhitespaceSplit")) {
        pt->behavior = SPLIT_REMOVED;
        return regex_compile(&pt->re, "\\s+", false, path);
    }
    if (!strcmp(type, "Whitespace")) {
        pt->behavior = SPLIT_REMOVED;
        pt->invert = true;
        return regex_compile(&pt->re, "\\w+|[^\\w\\s]+", false, path);
    }
    if (!strcmp(type, "Punctuation")) {
        MOE_TRY(load_behavior(o, path, SPLIT_ISOLATED, &pt->behavior));
        return regex_compile(&pt->re, "[\\p{P}$+<=>^`|~]", false, path);
    }
    return bad(MOE_ERR_UNSUPPORTED, path,
               "pre_tokenizer type \"%s\" is not supported (supported: ByteLevel, Split, Metaspace, Digits, "
               "WhitespaceSplit, Whitespace, Punctuation, Sequence)", type);
}

static moe_status load_pretok(const cJSON *o, const char *path, pretok *pt) {
    const char *type = jstr(o, "type");
    if (!type) return bad(MOE_ERR_FORMAT, path, "pre_tokenizer without a \"type\"");
    pt->kind = PRE_SPLIT;
    pt->behavior = SPLIT_ISOLATED;
    if (!strcmp(type, "Sequence")) {
        const cJSON *arr = cJSON_GetObjectItemCaseSensitive(o, "pretokenizers");
        pt->kind = PRE_SEQUENCE;
        pt->n_sub = (size_t)cJSON_GetArraySize(arr);
        pt->sub = calloc(pt->n_sub + 1, sizeof *pt->sub);
        if (!pt->sub) return moe_error(MOE_ERR_OOM, "out of memory");
        size_t i = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, arr) MOE_TRY(load_pretok(e, path, &pt->sub[i++]));
        return MOE_OK;
    }
    if (!strcmp(type, "ByteLevel")) {
        pt->kind = PRE_BYTE_LEVEL;
        pt->add_prefix_space = jbool(o, "add_prefix_space", true);
        return jbool(o, "use_regex", true) ? regex_compile(&pt->re, GPT2_SPLIT, false, path) : MOE_OK;
    }
    if (!strcmp(type, "Split")) {
        char *literal = NULL;
        MOE_TRY(load_behavior(o, path, SPLIT_ISOLATED, &pt->behavior));
        pt->invert = jbool(o, "invert", false);
        MOE_TRY(load_pattern(o, path, "Split pre_tokenizer", &literal, &pt->re));
        moe_status st = literal ? regex_compile(&pt->re, literal, true, path) : MOE_OK;
        free(literal);
        return st;
    }
    if (!strcmp(type, "Metaspace")) {
        pt->kind = PRE_METASPACE;
        MOE_TRY(load_replacement(o, path, pt->replacement));
        MOE_TRY(load_prepend_scheme(o, path, &pt->scheme));
        pt->split = jbool(o, "split", true);
        return pt->split ? regex_compile(&pt->re, pt->replacement, true, path) : MOE_OK;
    }
    return load_fixed_split(o, path, type, pt);
}

/* The ids of a special token named in a TemplateProcessing item. */
static moe_status template_ids(const cJSON *specials, const char *name, const char *path, post_item *it) {
    const cJSON *sp = cJSON_GetObjectItemCaseSensitive(specials, name);
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(sp, "ids");
    if (!cJSON_IsArray(ids))
        return bad(MOE_ERR_FORMAT, path, "TemplateProcessing names special token \"%s\" without ids", name);
    it->n_ids = (size_t)cJSON_GetArraySize(ids);
    it->ids = calloc(it->n_ids + 1, sizeof *it->ids);
    if (!it->ids) return moe_error(MOE_ERR_OOM, "out of memory");
    size_t i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, ids) {
        if (!json_id(e, &it->ids[i++]))
            return bad(MOE_ERR_FORMAT, path, "TemplateProcessing special token \"%s\": ids[%zu] is not a token id",
                       name, i - 1);
    }
    return MOE_OK;
}

static moe_status set_items(postproc *pp, size_t n) {
    pp->kind = POST_TEMPLATE;
    pp->n_items = n;
    pp->items = calloc(n + 1, sizeof *pp->items);
    return pp->items ? MOE_OK : moe_error(MOE_ERR_OOM, "out of memory");
}

/* [token, id] pairs of RobertaProcessing / BertProcessing. */
static moe_status pair_item(const cJSON *o, const char *key, const char *path, post_item *it) {
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(o, key);
    if (cJSON_GetArraySize(p) != 2) return bad(MOE_ERR_FORMAT, path, "post_processor \"%s\" is not [token, id]", key);
    it->ids = calloc(1, sizeof *it->ids);
    if (!it->ids) return moe_error(MOE_ERR_OOM, "out of memory");
    it->n_ids = 1;
    if (!json_id(cJSON_GetArrayItem(p, 1), &it->ids[0]))
        return bad(MOE_ERR_FORMAT, path, "post_processor \"%s\": the id is not a token id", key);
    return MOE_OK;
}

static moe_status load_post(moe_hf_tokenizer *t, const cJSON *o, const char *path) {
    const char *type = jstr(o, "type");
    if (!type) return bad(MOE_ERR_FORMAT, path, "post_processor without a \"type\"");
    if (!strcmp(type, "Sequence")) {
        const cJSON *e;
        cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(o, "processors")) MOE_TRY(load_post(t, e, path));
        return MOE_OK;
    }
    postproc *grown = realloc(t->post, (t->n_post + 1) * sizeof *t->post);
    if (!grown) return moe_error(MOE_ERR_OOM, "out of memory");
    t->post = grown;
    postproc *pp = &t->post[t->n_post++];
    *pp = (postproc){POST_NOOP, NULL, 0};
    if (!strcmp(type, "ByteLevel")) return MOE_OK;
    if (!strcmp(type, "TemplateProcessing")) {
        const cJSON *single = cJSON_GetObjectItemCaseSensitive(o, "single");
        const cJSON *specials = cJSON_GetObjectItemCaseSensitive(o, "special_tokens");
        MOE_TRY(set_items(pp, (size_t)cJSON_GetArraySize(single)));
        size_t i = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, single) {
            const cJSON *sp = cJSON_GetObjectItemCaseSensitive(e, "SpecialToken");
            if (sp) MOE_TRY(template_ids(specials, jstr(sp, "id") ? jstr(sp, "id") : "", path, &pp->items[i]));
            else if (cJSON_GetObjectItemCaseSensitive(e, "Sequence")) pp->items[i].is_sequence = true;
            else
                return bad(MOE_ERR_FORMAT, path, "TemplateProcessing item %zu is neither SpecialToken nor Sequence", i);
            i++;
        }
        return MOE_OK;
    }
    if (!strcmp(type, "RobertaProcessing") || !strcmp(type, "BertProcessing")) {
        MOE_TRY(set_items(pp, 3));
        MOE_TRY(pair_item(o, "cls", path, &pp->items[0]));
        pp->items[1].is_sequence = true;
        return pair_item(o, "sep", path, &pp->items[2]);
    }
    return bad(MOE_ERR_UNSUPPORTED, path,
               "post_processor type \"%s\" is not supported (supported: TemplateProcessing, ByteLevel, "
               "RobertaProcessing, BertProcessing, Sequence)", type);
}

static moe_status load_decoder(moe_hf_tokenizer *t, const cJSON *o, const char *path) {
    const char *type = jstr(o, "type");
    if (!type) return bad(MOE_ERR_FORMAT, path, "decoder without a \"type\"");
    if (!strcmp(type, "Sequence")) {
        const cJSON *e;
        cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(o, "decoders")) MOE_TRY(load_decoder(t, e, path));
        return MOE_OK;
    }
    decoder *grown = realloc(t->dec, (t->n_dec + 1) * sizeof *t->dec);
    if (!grown) return moe_error(MOE_ERR_OOM, "out of memory");
    t->dec = grown;
    decoder *d = &t->dec[t->n_dec++];
    *d = (decoder){0};
    if (!strcmp(type, "ByteLevel")) d->kind = DEC_BYTE_LEVEL;
    else if (!strcmp(type, "ByteFallback")) d->kind = DEC_BYTE_FALLBACK;
    else if (!strcmp(type, "Fuse")) d->kind = DEC_FUSE;
    else if (!strcmp(type, "Metaspace")) {
        d->kind = DEC_METASPACE;
        MOE_TRY(load_replacement(o, path, d->replacement));
        MOE_TRY(load_prepend_scheme(o, path, &d->scheme));
    } else if (!strcmp(type, "Replace")) {
        regex *re = NULL;
        d->kind = DEC_REPLACE;
        d->content = dupstr(jstr(o, "content"));
        if (!d->content) return bad(MOE_ERR_FORMAT, path, "Replace decoder without \"content\"");
        MOE_TRY(load_pattern(o, path, "Replace decoder", &d->pattern, &re));
        if (re) {
            regex_free(re);
            return bad(MOE_ERR_UNSUPPORTED, path, "Replace decoder with a Regex pattern is not supported");
        }
    } else if (!strcmp(type, "Strip")) {
        d->kind = DEC_STRIP;
        d->content = dupstr(jstr(o, "content") ? jstr(o, "content") : " ");
        if (!d->content) return moe_error(MOE_ERR_OOM, "out of memory");
        if (!*d->content) return bad(MOE_ERR_FORMAT, path, "Strip decoder with an empty \"content\"");
        const cJSON *a = cJSON_GetObjectItemCaseSensitive(o, "start"), *b = cJSON_GetObjectItemCaseSensitive(o, "stop");
        d->start = cJSON_IsNumber(a) ? a->valueint : 0;
        d->stop = cJSON_IsNumber(b) ? b->valueint : 0;
    } else if (!strcmp(type, "BPEDecoder")) {
        d->kind = DEC_BPE_SUFFIX;
        d->pattern = dupstr(jstr(o, "suffix") ? jstr(o, "suffix") : "</w>");
    } else {
        return bad(MOE_ERR_UNSUPPORTED, path,
                   "decoder type \"%s\" is not supported (supported: ByteLevel, Metaspace, Replace, ByteFallback, "
                   "Fuse, Strip, BPEDecoder, Sequence)", type);
    }
    return MOE_OK;
}

/* Puts token `s` at id (growing the id table). An id given a second, different string keeps
 * both strings mapped to it; the last one is what decoding shows. */
static moe_status set_token(moe_hf_tokenizer *t, int32_t id, const char *s, const char *path) {
    if (id < 0 || id > MAX_TOKEN_ID || (size_t)id > t->max_id)
        return bad(MOE_ERR_FORMAT, path, "token \"%s\" has id %d, beyond the %zu entries of the file by over %d", s,
                   id, t->max_id - MAX_ID_GAP, MAX_ID_GAP);
    if ((size_t)id >= t->n_tokens) {
        size_t n = (size_t)id + 1;
        char **tk = realloc(t->tokens, n * sizeof *tk);
        uint32_t *tl = tk ? realloc(t->token_len, n * sizeof *tl) : NULL;
        if (tk) t->tokens = tk;
        if (!tl) return moe_error(MOE_ERR_OOM, "out of memory");
        t->token_len = tl;
        for (size_t i = t->n_tokens; i < n; i++) t->tokens[i] = NULL, t->token_len[i] = 0;
        t->n_tokens = n;
    }
    if (t->tokens[id] && !strcmp(t->tokens[id], s)) return MOE_OK;
    char *copy = strdup(s);
    if (!copy) return moe_error(MOE_ERR_OOM, "out of memory");
    free(t->tokens[id]); /* the map keeps its own copy of the old string, still mapped to id */
    t->tokens[id] = copy;
    t->token_len[id] = (uint32_t)strlen(s);
    return smap_put(&t->vocab, copy, t->token_len[id], id) ? MOE_OK : moe_error(MOE_ERR_OOM, "out of memory");
}

static moe_status load_merges(moe_hf_tokenizer *t, const cJSON *merges, const char *path) {
    size_t n = (size_t)cJSON_GetArraySize(merges), cap = 16;
    while (cap < 2 * n + 2) cap *= 2;
    t->merges.slots = malloc(cap * sizeof *t->merges.slots);
    if (!t->merges.slots) return moe_error(MOE_ERR_OOM, "out of memory");
    t->merges.cap = cap;
    for (size_t i = 0; i < cap; i++) t->merges.slots[i] = (pair_slot){UINT64_MAX, 0, 0};
    sbuf key = {0};
    int32_t rank = 0;
    const cJSON *m;
    moe_status st = MOE_OK;
    cJSON_ArrayForEach(m, merges) {
        const char *a, *b;
        size_t la;
        if (cJSON_IsString(m)) {
            const char *sp = strchr(m->valuestring + 1, ' ');
            if (!m->valuestring[0] || !sp) {
                st = bad(MOE_ERR_FORMAT, path, "merge %d \"%s\" is not \"left right\"", rank, m->valuestring);
                break;
            }
            a = m->valuestring, la = (size_t)(sp - a), b = sp + 1;
        } else if (cJSON_GetArraySize(m) == 2 && cJSON_IsString(m->child) && cJSON_IsString(m->child->next)) {
            a = m->child->valuestring, la = strlen(a), b = m->child->next->valuestring;
        } else {
            st = bad(MOE_ERR_FORMAT, path, "merge %d is neither \"a b\" nor [a, b]", rank);
            break;
        }
        const int32_t *ia = smap_get(&t->vocab, a, la), *ib = smap_get(&t->vocab, b, strlen(b));
        key.n = 0;
        sb_add(&key, a, la);
        sb_adds(&key, b);
        const int32_t *im = key.p ? smap_get(&t->vocab, key.p, key.n) : NULL;
        if (!ia || !ib || !im) {
            st = bad(MOE_ERR_FORMAT, path, "merge %d (\"%.*s\" \"%s\") uses a token not in the vocabulary", rank,
                     (int)la, a, b);
            break;
        }
        pair_slot *s = pair_slot_for(&t->merges, pair_key(*ia, *ib));
        if (s->key == UINT64_MAX) *s = (pair_slot){pair_key(*ia, *ib), rank, *im};
        rank++;
    }
    sb_free(&key);
    return st;
}

static moe_status load_model(moe_hf_tokenizer *t, const cJSON *model, const char *path) {
    const char *type = jstr(model, "type");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (!type && cJSON_IsArray(merges)) type = "BPE";
    if (!type) return bad(MOE_ERR_FORMAT, path, "\"model\" has no \"type\"");
    if (strcmp(type, "BPE") != 0)
        return bad(MOE_ERR_UNSUPPORTED, path, "model type \"%s\" is not supported (supported: BPE)", type);
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges))
        return bad(MOE_ERR_FORMAT, path, "BPE model needs a \"vocab\" object and a \"merges\" array");
    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    if (cJSON_IsNumber(dropout) && dropout->valuedouble > 0)
        return bad(MOE_ERR_UNSUPPORTED, path, "BPE dropout (%g) is not supported", dropout->valuedouble);
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab) {
        int32_t id;
        if (!json_id(e, &id))
            return bad(MOE_ERR_FORMAT, path, "vocab entry \"%s\" is not a token id (an integer in [0, %d])", e->string,
                       MAX_TOKEN_ID);
        MOE_TRY(set_token(t, id, e->string, path));
    }
    t->byte_fallback = jbool(model, "byte_fallback", false);
    t->fuse_unk = jbool(model, "fuse_unk", false);
    t->ignore_merges = jbool(model, "ignore_merges", false);
    t->subword_prefix = dupstr(jstr(model, "continuing_subword_prefix"));
    t->word_suffix = dupstr(jstr(model, "end_of_word_suffix"));
    const char *unk = jstr(model, "unk_token");
    const int32_t *uid = unk ? smap_get(&t->vocab, unk, strlen(unk)) : NULL;
    t->unk_id = uid ? *uid : -1;
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        const int32_t *id = smap_get(&t->vocab, name, strlen(name));
        t->byte_ids[b] = id ? *id : -1;
    }
    return load_merges(t, merges, path);
}

static moe_status load_added(moe_hf_tokenizer *t, const cJSON *arr, const char *path) {
    t->n_added = (size_t)cJSON_GetArraySize(arr);
    t->added = calloc(t->n_added + 1, sizeof *t->added);
    if (!t->added) return moe_error(MOE_ERR_OOM, "out of memory");
    size_t i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, arr) {
        added_token *a = &t->added[i++];
        const char *content = jstr(e, "content");
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        if (!content || !json_id(id, &a->id))
            return bad(MOE_ERR_FORMAT, path, "added_tokens[%zu] needs content and an id (an integer in [0, %d])",
                       i - 1, MAX_TOKEN_ID);
        a->special = jbool(e, "special", false);
        a->lstrip = jbool(e, "lstrip", false);
        a->rstrip = jbool(e, "rstrip", false);
        a->single_word = jbool(e, "single_word", false);
        a->normalized = jbool(e, "normalized", !a->special);
        MOE_TRY(set_token(t, a->id, content, path));
        if (a->normalized && t->norm) { /* matched against normalised text */
            sbuf o = {0}, tmp = {0};
            normalize(t->norm, content, strlen(content), &o, &tmp, NORM_GROWTH * strlen(content) + 4096);
            sb_free(&tmp);
            if (o.oom) {
                bool over = o.over;
                sb_free(&o);
                return over ? bad(MOE_ERR_FORMAT, path, "the normalizers make added token \"%s\" over %dx longer",
                                    content, NORM_GROWTH)
                              : moe_error(MOE_ERR_OOM, "out of memory");
            }
            a->content = o.p ? o.p : strdup("");
            a->len = o.n;
        } else {
            a->content = strdup(content);
            a->len = strlen(content);
        }
        if (!a->content) return moe_error(MOE_ERR_OOM, "out of memory");
    }
    t->is_special = calloc(t->n_tokens + 1, sizeof *t->is_special);
    if (!t->is_special) return moe_error(MOE_ERR_OOM, "out of memory");
    for (size_t k = 0; k < t->n_added; k++) t->is_special[t->added[k].id] = t->added[k].special;
    MOE_TRY(matcher_build(t, &t->raw_match, false));
    return matcher_build(t, &t->norm_match, true);
}

/* The ids a post-processor adds name tokens (encode never gives an id outside the vocabulary). */
static moe_status check_post_ids(const moe_hf_tokenizer *t, const char *path) {
    for (size_t p = 0; p < t->n_post; p++)
        for (size_t i = 0; i < t->post[p].n_items; i++)
            for (size_t k = 0; k < t->post[p].items[i].n_ids; k++) {
                int32_t id = t->post[p].items[i].ids[k];
                if ((size_t)id >= t->n_tokens || !t->tokens[id])
                    return bad(MOE_ERR_FORMAT, path, "post_processor adds id %d, which is not in the vocabulary", id);
            }
    return MOE_OK;
}

static moe_status load_json(moe_hf_tokenizer *t, const cJSON *j, const char *path) {
    if (!cJSON_IsObject(j)) return bad(MOE_ERR_FORMAT, path, "the top level is not a JSON object");
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(j, "model");
    if (!cJSON_IsObject(model)) return bad(MOE_ERR_FORMAT, path, "no \"model\" object");
    t->max_id = (size_t)cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(model, "vocab")) +
                (size_t)cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(j, "added_tokens")) + MAX_ID_GAP;
    MOE_TRY(load_model(t, model, path));
    const cJSON *o = cJSON_GetObjectItemCaseSensitive(j, "normalizer");
    if (!jnull(o)) {
        t->norm = calloc(1, sizeof *t->norm);
        if (!t->norm) return moe_error(MOE_ERR_OOM, "out of memory");
        MOE_TRY(load_normalizer(o, path, t->norm));
    }
    o = cJSON_GetObjectItemCaseSensitive(j, "pre_tokenizer");
    if (!jnull(o)) {
        t->pre = calloc(1, sizeof *t->pre);
        if (!t->pre) return moe_error(MOE_ERR_OOM, "out of memory");
        MOE_TRY(load_pretok(o, path, t->pre));
    }
    o = cJSON_GetObjectItemCaseSensitive(j, "post_processor");
    if (!jnull(o)) MOE_TRY(load_post(t, o, path));
    o = cJSON_GetObjectItemCaseSensitive(j, "decoder");
    t->has_decoder = !jnull(o);
    if (t->has_decoder) MOE_TRY(load_decoder(t, o, path));
    MOE_TRY(load_added(t, cJSON_GetObjectItemCaseSensitive(j, "added_tokens"), path));
    MOE_TRY(check_post_ids(t, path));
    t->cut_words = !t->ignore_merges && !t->subword_prefix && !t->word_suffix && words_cuttable(t);
    return MOE_OK;
}

moe_status moe_hf_tokenizer_load(moe_hf_tokenizer **out, const char *path) {
    MOE_ASSERT(out && path, "moe_hf_tokenizer_load: NULL argument");
    *out = NULL;
    byte_level_init();
    cJSON *j;
    MOE_TRY(parse_json_file(path, &j));
    moe_hf_tokenizer *t = calloc(1, sizeof *t);
    if (!t || !(t->path = strdup(path))) {
        free(t);
        cJSON_Delete(j);
        return moe_error(MOE_ERR_OOM, "out of memory");
    }
    moe_status st = load_json(t, j, path);
    cJSON_Delete(j);
    if (st != MOE_OK) {
        moe_hf_tokenizer_free(t);
        return st;
    }
    *out = t;
    return MOE_OK;
}

/* A special token of tokenizer_config.json: a string or {"content": ...}. */
static char *config_token(const cJSON *cfg, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (cJSON_IsString(v)) return strdup(v->valuestring);
    return dupstr(jstr(v, "content"));
}

/* The chat_template field: a string, or a list of {name, template} (the "default" one). */
static const char *config_template(const cJSON *cfg) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template"), *e;
    if (cJSON_IsString(v)) return v->valuestring;
    if (!cJSON_IsArray(v)) return NULL;
    cJSON_ArrayForEach(e, v) {
        const char *name = jstr(e, "name");
        if (name && !strcmp(name, "default")) return jstr(e, "template");
    }
    return NULL;
}

static moe_status load_config(moe_hf_tokenizer *t, const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    if (access(path, R_OK) == 0) {
        cJSON *cfg;
        MOE_TRY(parse_json_file(path, &cfg));
        t->bos = config_token(cfg, "bos_token");
        t->eos = config_token(cfg, "eos_token");
        t->unk = config_token(cfg, "unk_token");
        t->pad = config_token(cfg, "pad_token");
        t->cleanup_spaces = jbool(cfg, "clean_up_tokenization_spaces", false);
        const char *tmpl = config_template(cfg);
        if (tmpl) {
            t->chat_template = strdup(tmpl);
            t->chat_origin = strdup(path);
        }
        cJSON_Delete(cfg);
    }
    snprintf(path, sizeof path, "%s/chat_template.jinja", dir);
    if (access(path, R_OK) == 0) {
        size_t len;
        free(t->chat_template);
        free(t->chat_origin);
        t->chat_template = NULL;
        t->chat_origin = strdup(path);
        MOE_TRY(read_text(path, &t->chat_template, &len));
    }
    if (!t->chat_template) return MOE_OK;
    if (!t->chat_origin) return moe_error(MOE_ERR_OOM, "out of memory");
    return moe_jinja_parse(&t->chat, t->chat_template, t->chat_origin);
}

moe_status moe_hf_tokenizer_load_dir(moe_hf_tokenizer **out, const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    MOE_TRY(moe_hf_tokenizer_load(out, path));
    moe_status st = load_config(*out, dir);
    if (st != MOE_OK) {
        moe_hf_tokenizer_free(*out);
        *out = NULL;
    }
    return st;
}

/* ---------- freeing ---------- */

static void normalizer_free(normalizer *nz) {
    for (size_t i = 0; i < nz->n_sub; i++) normalizer_free(&nz->sub[i]);
    free(nz->sub);
    free(nz->text);
    free(nz->content);
    regex_free(nz->re);
}

static void pretok_free(pretok *pt) {
    for (size_t i = 0; i < pt->n_sub; i++) pretok_free(&pt->sub[i]);
    free(pt->sub);
    regex_free(pt->re);
}

void moe_hf_tokenizer_free(moe_hf_tokenizer *t) {
    if (!t) return;
    for (size_t i = 0; i < t->n_tokens; i++) free(t->tokens[i]);
    free(t->tokens);
    free(t->token_len);
    smap_free(&t->vocab);
    free(t->merges.slots);
    free(t->subword_prefix);
    free(t->word_suffix);
    if (t->norm) normalizer_free(t->norm);
    free(t->norm);
    if (t->pre) pretok_free(t->pre);
    free(t->pre);
    for (size_t i = 0; i < t->n_post; i++) {
        for (size_t k = 0; k < t->post[i].n_items; k++) free(t->post[i].items[k].ids);
        free(t->post[i].items);
    }
    free(t->post);
    for (size_t i = 0; i < t->n_dec; i++) {
        free(t->dec[i].pattern);
        free(t->dec[i].content);
    }
    free(t->dec);
    for (size_t i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->added);
    for (int b = 0; b < 256; b++) {
        free(t->raw_match.by_first[b]);
        free(t->norm_match.by_first[b]);
    }
    free(t->is_special);
    free(t->bos);
    free(t->eos);
    free(t->unk);
    free(t->pad);
    moe_jinja_free(t->chat);
    free(t->chat_template);
    free(t->chat_origin);
    smap_free(&t->cache);
    free(t->cache_ids.v);
    sb_free(&t->norm_a);
    sb_free(&t->norm_b);
    pieces_free(&t->pa);
    pieces_free(&t->pb);
    free(t->sp.v);
    free(t->syms);
    free(t->heap);
    free(t->path);
    free(t);
}

/* ---------- chat template ---------- */

static void add_token_var(cJSON *vars, const char *name, const char *value) {
    if (value && !cJSON_GetObjectItemCaseSensitive(vars, name)) cJSON_AddStringToObject(vars, name, value);
}

moe_status moe_hf_apply_chat_template(const moe_hf_tokenizer *t, const char *messages_json,
                                      bool add_generation_prompt, const char *extra_json, char **text) {
    MOE_ASSERT(t && messages_json && text, "moe_hf_apply_chat_template: NULL argument");
    *text = NULL;
    if (!t->chat) return moe_error(MOE_ERR_INVALID, "tokenizer %s: no chat template (neither chat_template.jinja "
                                   "nor a chat_template field in tokenizer_config.json)", t->path);
    cJSON *vars = extra_json ? cJSON_Parse(extra_json) : cJSON_CreateObject();
    cJSON *messages = cJSON_Parse(messages_json);
    moe_status st = MOE_OK;
    if (!cJSON_IsObject(vars)) st = moe_error(MOE_ERR_INVALID, "chat template variables are not a JSON object");
    else if (!cJSON_IsArray(messages)) st = moe_error(MOE_ERR_INVALID, "chat messages are not a JSON array");
    if (st == MOE_OK) {
        cJSON_AddItemToObject(vars, "messages", messages);
        messages = NULL;
        if (!cJSON_GetObjectItemCaseSensitive(vars, "add_generation_prompt"))
            cJSON_AddBoolToObject(vars, "add_generation_prompt", add_generation_prompt);
        if (!cJSON_GetObjectItemCaseSensitive(vars, "tools")) cJSON_AddNullToObject(vars, "tools");
        if (!cJSON_GetObjectItemCaseSensitive(vars, "documents")) cJSON_AddNullToObject(vars, "documents");
        add_token_var(vars, "bos_token", t->bos);
        add_token_var(vars, "eos_token", t->eos);
        add_token_var(vars, "unk_token", t->unk);
        add_token_var(vars, "pad_token", t->pad);
        st = moe_jinja_render(t->chat, vars, text);
    }
    cJSON_Delete(messages);
    cJSON_Delete(vars);
    return st;
}
