/* Byte and byte-level BPE tokenizers: pre-tokenization, BPE training with incremental
 * pair counts, encoding, decoding and the tokenizer file. See tokenizer.h. */
#include "moe/model/tokenizer.h"


#include <errno.h>
#include <string.h>

#include "core/fileio.h"

#define MAX_VOCAB (1 << 24)
#define FILE_MAGIC "MOETKZ1"
#define FILE_VERSION 1u
#define FILE_HEADER_BYTES 28u
/* encode() caches piece encodings only for inputs at least this long. */
#define ENCODE_CACHE_MIN_LEN 4096

struct moe_tokenizer {
    moe_tokenizer_kind kind;
    int vocab;
    int32_t (*merges)[2]; /* merges[i] = (left, right) of token 256 + i */
    uint8_t *bytes;       /* every token's bytes, back to back */
    size_t *tok_off;      /* token i's bytes: bytes + tok_off[i], tok_len[i] long */
    uint32_t *tok_len;
    struct u64map *merge_map; /* pair_key(left, right) -> merged id; BPE only */
};

/* ---- hashing and two open-addressing hash maps ------------------------------------ */

static uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t hash_bytes(const uint8_t *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
    return mix64(h);
}

static uint64_t pair_key(int32_t a, int32_t b) {
    return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
}

/* u64 key -> u32 value; the key UINT64_MAX marks an empty slot (pair keys never reach it). */
typedef struct u64map {
    uint64_t *keys;
    uint32_t *vals;
    size_t cap, count; /* cap is a power of two */
} u64map;

static bool u64map_init(u64map *m, size_t expected) {
    size_t cap = 64;
    while (cap < expected * 2) cap *= 2;
    m->keys = malloc(cap * sizeof *m->keys);
    m->vals = malloc(cap * sizeof *m->vals);
    m->cap = cap;
    m->count = 0;
    if (!m->keys || !m->vals) return false;
    memset(m->keys, 0xff, cap * sizeof *m->keys);
    return true;
}

static void u64map_free(u64map *m) {
    free(m->keys);
    free(m->vals);
}

static size_t u64map_slot(const u64map *m, uint64_t key) {
    size_t i = mix64(key) & (m->cap - 1);
    while (m->keys[i] != UINT64_MAX && m->keys[i] != key) i = (i + 1) & (m->cap - 1);
    return i;
}

static bool u64map_get(const u64map *m, uint64_t key, uint32_t *val) {
    size_t i = u64map_slot(m, key);
    if (m->keys[i] == UINT64_MAX) return false;
    *val = m->vals[i];
    return true;
}

/* Inserts or overwrites; false when out of memory. */
static bool u64map_put(u64map *m, uint64_t key, uint32_t val) {
    if ((m->count + 1) * 2 > m->cap) {
        u64map bigger;
        if (!u64map_init(&bigger, m->cap)) {
            u64map_free(&bigger);
            return false;
        }
        for (size_t i = 0; i < m->cap; i++)
            if (m->keys[i] != UINT64_MAX) {
                size_t j = u64map_slot(&bigger, m->keys[i]);
                bigger.keys[j] = m->keys[i];
                bigger.vals[j] = m->vals[i];
            }
        bigger.count = m->count;
        u64map_free(m);
        *m = bigger;
    }
    size_t i = u64map_slot(m, key);
    if (m->keys[i] == UINT64_MAX) m->count++;
    m->keys[i] = key;
    m->vals[i] = val;
    return true;
}

/* Byte-string key -> u32 value. Keys are not copied: they point into caller memory
 * that outlives the map (the text being trained on or encoded). */
typedef struct bmap_entry {
    const uint8_t *key; /* NULL: empty slot */
    uint64_t hash;
    uint32_t len, val;
} bmap_entry;

typedef struct bmap {
    bmap_entry *e;
    size_t cap, count;
} bmap;

static bool bmap_init(bmap *m, size_t cap) {
    m->e = calloc(cap, sizeof *m->e);
    m->cap = cap;
    m->count = 0;
    return m->e != NULL;
}

static size_t bmap_slot(const bmap *m, const uint8_t *key, uint32_t len, uint64_t hash) {
    size_t i = hash & (m->cap - 1);
    for (;; i = (i + 1) & (m->cap - 1)) {
        const bmap_entry *e = &m->e[i];
        if (!e->key || (e->hash == hash && e->len == len && memcmp(e->key, key, len) == 0))
            return i;
    }
}

/* Finds `key`; when absent inserts it with value `new_val`. Sets *val and *added.
 * False when out of memory. */
static bool bmap_find_or_add(bmap *m, const uint8_t *key, uint32_t len, uint32_t new_val,
                             uint32_t *val, bool *added) {
    uint64_t hash = hash_bytes(key, len);
    size_t i = bmap_slot(m, key, len, hash);
    if (m->e[i].key) {
        *val = m->e[i].val;
        *added = false;
        return true;
    }
    if ((m->count + 1) * 2 > m->cap) {
        bmap bigger;
        if (!bmap_init(&bigger, m->cap * 2)) return false;
        for (size_t j = 0; j < m->cap; j++)
            if (m->e[j].key)
                bigger.e[bmap_slot(&bigger, m->e[j].key, m->e[j].len, m->e[j].hash)] = m->e[j];
        bigger.count = m->count;
        free(m->e);
        *m = bigger;
        i = bmap_slot(m, key, len, hash);
    }
    m->e[i] = (bmap_entry){key, hash, len, new_val};
    m->count++;
    *val = new_val;
    *added = true;
    return true;
}

/* ---- pre-tokenization --------------------------------------------------------------- */

enum { CLS_SPACE, CLS_LETTER, CLS_DIGIT, CLS_OTHER };

static int byte_class(uint8_t c) {
    if (c == ' ' || (c >= '\t' && c <= '\r')) return CLS_SPACE;
    if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') return CLS_LETTER;
    if (c >= 0x80) return CLS_LETTER;
    if (c >= '0' && c <= '9') return CLS_DIGIT;
    return CLS_OTHER;
}

/* End of the piece that starts at s[pos] (pos < n); the rules are in tokenizer.h. */
static size_t piece_end(const uint8_t *s, size_t n, size_t pos) {
    size_t i = pos;
    int cls = byte_class(s[i]);
    if (cls == CLS_SPACE && s[i] == ' ' && i + 1 < n && byte_class(s[i + 1]) != CLS_SPACE)
        cls = byte_class(s[++i]);
    if (cls == CLS_SPACE) {
        while (i < n && byte_class(s[i]) == CLS_SPACE) i++;
        if (i < n && i - pos >= 2 && s[i - 1] == ' ') i--;
    } else {
        i++;
        while (i < n) {
            int c = byte_class(s[i]);
            bool inner_apostrophe = cls == CLS_LETTER && s[i] == '\'' && i + 1 < n &&
                                    byte_class(s[i + 1]) == CLS_LETTER;
            if (c != cls && !inner_apostrophe) break;
            i++;
        }
    }
    return i - pos > MOE_TOKENIZER_MAX_PIECE ? pos + MOE_TOKENIZER_MAX_PIECE : i;
}

/* ---- construction --------------------------------------------------------------------- */

void moe_tokenizer_free(moe_tokenizer *tok) {
    if (!tok) return;
    if (tok->merge_map) u64map_free(tok->merge_map);
    free(tok->merge_map);
    free(tok->merges);
    free(tok->bytes);
    free(tok->tok_off);
    free(tok->tok_len);
    free(tok);
}

/* Builds a tokenizer from validated merges (each merge's ids are below its own id);
 * takes ownership of `merges`. NULL when out of memory. */
static moe_tokenizer *tokenizer_build(moe_tokenizer_kind kind, int32_t (*merges)[2], int n_merges) {
    moe_tokenizer *tok = calloc(1, sizeof *tok);
    if (!tok) {
        free(merges);
        return NULL;
    }
    tok->kind = kind;
    tok->vocab = 256 + n_merges;
    tok->merges = merges;
    tok->tok_off = malloc((size_t)tok->vocab * sizeof *tok->tok_off);
    tok->tok_len = malloc((size_t)tok->vocab * sizeof *tok->tok_len);
    if (!tok->tok_off || !tok->tok_len) goto oom;
    size_t total = 256;
    for (int i = 0; i < 256; i++) tok->tok_len[i] = 1;
    for (int i = 0; i < n_merges; i++) {
        tok->tok_len[256 + i] = tok->tok_len[merges[i][0]] + tok->tok_len[merges[i][1]];
        total += tok->tok_len[256 + i];
    }
    tok->bytes = malloc(total);
    if (!tok->bytes) goto oom;
    for (int i = 0; i < 256; i++) {
        tok->bytes[i] = (uint8_t)i;
        tok->tok_off[i] = (size_t)i;
    }
    size_t off = 256;
    for (int i = 0; i < n_merges; i++) {
        int32_t l = merges[i][0], r = merges[i][1];
        tok->tok_off[256 + i] = off;
        memcpy(tok->bytes + off, tok->bytes + tok->tok_off[l], tok->tok_len[l]);
        memcpy(tok->bytes + off + tok->tok_len[l], tok->bytes + tok->tok_off[r], tok->tok_len[r]);
        off += tok->tok_len[256 + i];
    }
    if (kind == MOE_TOKENIZER_BPE) {
        tok->merge_map = calloc(1, sizeof *tok->merge_map);
        if (!tok->merge_map || !u64map_init(tok->merge_map, (size_t)n_merges)) goto oom;
        for (int i = 0; i < n_merges; i++)
            if (!u64map_put(tok->merge_map, pair_key(merges[i][0], merges[i][1]),
                            (uint32_t)(256 + i)))
                goto oom;
    }
    return tok;
oom:
    moe_tokenizer_free(tok);
    return NULL;
}

moe_tokenizer *moe_tokenizer_byte(void) { return tokenizer_build(MOE_TOKENIZER_BYTE, NULL, 0); }

int moe_tokenizer_vocab_size(const moe_tokenizer *tok) { return tok->vocab; }
moe_tokenizer_kind moe_tokenizer_get_kind(const moe_tokenizer *tok) { return tok->kind; }

const uint8_t *moe_tokenizer_token_bytes(const moe_tokenizer *tok, int32_t id, size_t *len) {
    MOE_ASSERT(id >= 0 && id < tok->vocab, "token id %d outside vocab %d", (int)id, tok->vocab);
    *len = tok->tok_len[id];
    return tok->bytes + tok->tok_off[id];
}

bool moe_tokenizer_merge_pair(const moe_tokenizer *tok, int32_t id, int32_t *left, int32_t *right) {
    MOE_ASSERT(id >= 0 && id < tok->vocab, "token id %d outside vocab %d", (int)id, tok->vocab);
    if (id < 256) return false;
    *left = tok->merges[id - 256][0];
    *right = tok->merges[id - 256][1];
    return true;
}

/* ---- BPE training ------------------------------------------------------------------- */

typedef struct bt_word {
    size_t off;     /* symbols at syms + off */
    uint32_t len;   /* current symbol count */
    int64_t count;  /* occurrences in the text */
} bt_word;

typedef struct bt_pair {
    int32_t a, b;
    int64_t count;        /* occurrences over all words (weighted by word count) */
    int64_t count_before; /* count at the start of the current merge step */
    uint32_t *words;      /* words that contain or once contained this pair, no repeats */
    uint32_t n_words, cap_words;
    uint32_t last_word;   /* 1 + the word last appended to `words`, 0 if none */
    uint32_t dirty_step;  /* 1 + merge step that last changed `count` */
} bt_pair;

typedef struct bt_heap_entry {
    int64_t count;
    int32_t a, b;
} bt_heap_entry;

typedef struct bpe_trainer {
    bt_word *words;
    uint32_t n_words;
    int32_t *syms;
    bt_pair *pairs;
    uint32_t n_pairs;
    size_t cap_pairs;
    u64map pair_index;
    bt_heap_entry *heap;
    size_t heap_len, heap_cap;
    uint32_t *dirty;
    size_t n_dirty, cap_dirty;
    uint32_t step; /* 1 + current merge number */
    bool oom;
} bpe_trainer;

static bool grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return true;
    size_t c = *cap ? *cap : 16;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q) return false;
    *p = q;
    *cap = c;
    return true;
}

/* Heap order: larger count first, then smaller (a, b): the tie-break rule. */
static bool heap_before(const bt_heap_entry *x, const bt_heap_entry *y) {
    if (x->count != y->count) return x->count > y->count;
    if (x->a != y->a) return x->a < y->a;
    return x->b < y->b;
}

static void heap_push(bpe_trainer *t, bt_heap_entry e) {
    if (!grow((void **)&t->heap, &t->heap_cap, t->heap_len + 1, sizeof *t->heap)) {
        t->oom = true;
        return;
    }
    size_t i = t->heap_len++;
    while (i > 0 && heap_before(&e, &t->heap[(i - 1) / 2])) {
        t->heap[i] = t->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    t->heap[i] = e;
}

static bt_heap_entry heap_pop(bpe_trainer *t) {
    bt_heap_entry top = t->heap[0], last = t->heap[--t->heap_len];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= t->heap_len) break;
        if (c + 1 < t->heap_len && heap_before(&t->heap[c + 1], &t->heap[c])) c++;
        if (!heap_before(&t->heap[c], &last)) break;
        t->heap[i] = t->heap[c];
        i = c;
    }
    if (t->heap_len) t->heap[i] = last;
    return top;
}

/* Adds `delta` to the count of pair (a, b), creating it when new, and records it as
 * changed in this merge step. Returns its index (UINT32_MAX when out of memory). */
static uint32_t pair_add(bpe_trainer *t, int32_t a, int32_t b, int64_t delta) {
    uint32_t idx;
    if (!u64map_get(&t->pair_index, pair_key(a, b), &idx)) {
        if (t->n_pairs == UINT32_MAX - 1 ||
            !grow((void **)&t->pairs, &t->cap_pairs, (size_t)t->n_pairs + 1, sizeof *t->pairs) ||
            !u64map_put(&t->pair_index, pair_key(a, b), t->n_pairs)) {
            t->oom = true;
            return UINT32_MAX;
        }
        idx = t->n_pairs++;
        t->pairs[idx] = (bt_pair){.a = a, .b = b};
    }
    bt_pair *p = &t->pairs[idx];
    if (p->dirty_step != t->step) {
        if (!grow((void **)&t->dirty, &t->cap_dirty, t->n_dirty + 1, sizeof *t->dirty)) {
            t->oom = true;
            return UINT32_MAX;
        }
        p->dirty_step = t->step;
        p->count_before = p->count;
        t->dirty[t->n_dirty++] = idx;
    }
    p->count += delta;
    return idx;
}

static void pair_note_word(bpe_trainer *t, uint32_t idx, uint32_t w) {
    bt_pair *p = &t->pairs[idx];
    if (p->last_word == w + 1) return;
    size_t cap = p->cap_words;
    if (!grow((void **)&p->words, &cap, (size_t)p->n_words + 1, sizeof *p->words)) {
        t->oom = true;
        return;
    }
    p->cap_words = (uint32_t)cap;
    p->words[p->n_words++] = w;
    p->last_word = w + 1;
}

/* Adds (sign +1) or removes (sign -1) all adjacent pairs of word w; when adding, the
 * word joins the lists of the pairs that contain `fresh` (the token just created). */
static void word_count_pairs(bpe_trainer *t, uint32_t w, int sign, int32_t fresh) {
    const bt_word *wd = &t->words[w];
    const int32_t *s = t->syms + wd->off;
    for (uint32_t i = 0; i + 1 < wd->len && !t->oom; i++) {
        uint32_t idx = pair_add(t, s[i], s[i + 1], sign * wd->count);
        if (sign > 0 && !t->oom && (fresh < 0 || s[i] == fresh || s[i + 1] == fresh))
            pair_note_word(t, idx, w);
    }
}

/* Pushes the pairs whose count changed in this step onto the heap. */
static void flush_dirty(bpe_trainer *t) {
    for (size_t i = 0; i < t->n_dirty && !t->oom; i++) {
        const bt_pair *p = &t->pairs[t->dirty[i]];
        if (p->count != p->count_before && p->count > 0)
            heap_push(t, (bt_heap_entry){p->count, p->a, p->b});
    }
    t->n_dirty = 0;
}

/* Replaces every (a, b) in the words that contain it by `fresh`, updating pair counts. */
static void apply_merge(bpe_trainer *t, uint32_t pair_idx, int32_t fresh) {
    int32_t a = t->pairs[pair_idx].a, b = t->pairs[pair_idx].b;
    uint32_t *list = t->pairs[pair_idx].words, n_list = t->pairs[pair_idx].n_words;
    for (uint32_t k = 0; k < n_list && !t->oom; k++) {
        uint32_t w = list[k];
        bt_word *wd = &t->words[w];
        int32_t *s = t->syms + wd->off;
        bool found = false;
        for (uint32_t i = 0; i + 1 < wd->len && !found; i++) found = s[i] == a && s[i + 1] == b;
        if (!found) continue;
        word_count_pairs(t, w, -1, fresh);
        uint32_t j = 0;
        for (uint32_t i = 0; i < wd->len;) {
            if (i + 1 < wd->len && s[i] == a && s[i + 1] == b) {
                s[j++] = fresh;
                i += 2;
            } else {
                s[j++] = s[i++];
            }
        }
        wd->len = j;
        word_count_pairs(t, w, +1, fresh);
    }
    bt_pair *p = &t->pairs[pair_idx];
    MOE_ASSERT(t->oom || p->count == 0, "pair (%d,%d) kept count %lld after its merge", (int)a,
               (int)b, (long long)p->count);
    free(p->words);
    p->words = NULL;
    p->n_words = p->cap_words = 0;
    p->last_word = 0;
}

static void trainer_free(bpe_trainer *t) {
    for (uint32_t i = 0; i < t->n_pairs; i++) free(t->pairs[i].words);
    free(t->pairs);
    free(t->words);
    free(t->syms);
    free(t->heap);
    free(t->dirty);
    u64map_free(&t->pair_index);
}

/* Cuts the text into pieces and fills t->words / t->syms with the unique ones. */
static bool trainer_count_words(bpe_trainer *t, const uint8_t *s, size_t len) {
    bmap seen;
    size_t cap_words = 0, total_syms = 0;
    if (!bmap_init(&seen, 1 << 16)) return false;
    bool ok = true;
    for (size_t pos = 0; pos < len && ok;) {
        size_t end = piece_end(s, len, pos);
        uint32_t w;
        bool added;
        ok = t->n_words < UINT32_MAX &&
             bmap_find_or_add(&seen, s + pos, (uint32_t)(end - pos), t->n_words, &w, &added);
        if (ok && added) {
            ok = grow((void **)&t->words, &cap_words, (size_t)t->n_words + 1, sizeof *t->words);
            if (ok) {
                t->words[t->n_words++] = (bt_word){.off = pos, .len = (uint32_t)(end - pos)};
                total_syms += end - pos;
            }
        }
        if (ok) t->words[w].count++;
        pos = end;
    }
    free(seen.e);
    if (!ok) return false;
    t->syms = malloc((total_syms ? total_syms : 1) * sizeof *t->syms);
    if (!t->syms) return false;
    size_t off = 0;
    for (uint32_t w = 0; w < t->n_words; w++) {
        const uint8_t *src = s + t->words[w].off;
        for (uint32_t i = 0; i < t->words[w].len; i++) t->syms[off + i] = src[i];
        t->words[w].off = off;
        off += t->words[w].len;
    }
    return true;
}

moe_status moe_tokenizer_train_bpe(const char *text, size_t len, int vocab_size,
                                   moe_tokenizer **out) {
    *out = NULL;
    if (vocab_size < 256 || vocab_size > MAX_VOCAB)
        return moe_error(MOE_ERR_INVALID,
                         "BPE vocab size %d out of range: use 256 .. %d (tokenizer.vocab_size)",
                         vocab_size, MAX_VOCAB);
    bpe_trainer t = {0};
    int32_t (*merges)[2] = malloc((size_t)(vocab_size - 256 + 1) * sizeof *merges);
    bool ok = merges && u64map_init(&t.pair_index, 1 << 16) &&
              trainer_count_words(&t, (const uint8_t *)text, len);
    int n_merges = 0;
    if (ok) {
        t.step = 1;
        for (uint32_t w = 0; w < t.n_words && !t.oom; w++) word_count_pairs(&t, w, +1, -1);
        flush_dirty(&t);
        while (!t.oom && 256 + n_merges < vocab_size && t.heap_len > 0) {
            bt_heap_entry top = heap_pop(&t);
            uint32_t idx;
            if (!u64map_get(&t.pair_index, pair_key(top.a, top.b), &idx) ||
                t.pairs[idx].count != top.count)
                continue; /* stale heap entry */
            if (top.count < 2) break;
            int32_t fresh = 256 + n_merges;
            merges[n_merges][0] = top.a;
            merges[n_merges][1] = top.b;
            n_merges++;
            t.step++;
            apply_merge(&t, idx, fresh);
            flush_dirty(&t);
        }
        ok = !t.oom;
    }
    trainer_free(&t);
    if (ok) *out = tokenizer_build(MOE_TOKENIZER_BPE, merges, n_merges);
    else free(merges);
    if (!*out)
        return moe_error(MOE_ERR_OOM, "out of memory training a BPE tokenizer on %zu bytes of text",
                         len);
    return MOE_OK;
}

/* ---- encoding and decoding --------------------------------------------------------- */

void moe_token_buf_free(moe_token_buf *buf) {
    free(buf->data);
    *buf = (moe_token_buf){0};
}

static bool buf_reserve(moe_token_buf *buf, size_t extra) {
    return grow((void **)&buf->data, &buf->cap, buf->len + extra, sizeof *buf->data);
}

/* BPE of one piece (n <= MOE_TOKENIZER_MAX_PIECE) into syms; returns the symbol count.
 * Repeatedly merges every occurrence of the adjacent pair with the lowest merge id,
 * which replays training's merge order: O(n^2) map look-ups at worst. */
static size_t bpe_piece(const moe_tokenizer *tok, const uint8_t *p, size_t n, int32_t *syms) {
    for (size_t i = 0; i < n; i++) syms[i] = p[i];
    for (;;) {
        uint32_t best = UINT32_MAX, id;
        for (size_t i = 0; i + 1 < n; i++)
            if (u64map_get(tok->merge_map, pair_key(syms[i], syms[i + 1]), &id) && id < best)
                best = id;
        if (best == UINT32_MAX) return n;
        int32_t a = tok->merges[best - 256][0], b = tok->merges[best - 256][1];
        size_t j = 0;
        for (size_t i = 0; i < n;) {
            if (i + 1 < n && syms[i] == a && syms[i + 1] == b) {
                syms[j++] = (int32_t)best;
                i += 2;
            } else {
                syms[j++] = syms[i++];
            }
        }
        n = j;
    }
}

moe_status moe_tokenizer_encode(const moe_tokenizer *tok, const char *text, size_t len,
                                moe_token_buf *out) {
    const uint8_t *s = (const uint8_t *)text;
    if (tok->kind == MOE_TOKENIZER_BYTE) {
        if (!buf_reserve(out, len)) goto oom;
        for (size_t i = 0; i < len; i++) out->data[out->len++] = s[i];
        return MOE_OK;
    }
    /* The cache maps a piece to the position of its first encoding in `out`. */
    bmap cache = {0};
    bool use_cache = len >= ENCODE_CACHE_MIN_LEN;
    if (use_cache && !bmap_init(&cache, 1 << 12)) goto oom;
    int32_t syms[MOE_TOKENIZER_MAX_PIECE];
    for (size_t pos = 0; pos < len;) {
        size_t end = piece_end(s, len, pos), n = end - pos;
        if (!buf_reserve(out, n)) goto oom_cache;
        if (n == 1) {
            out->data[out->len++] = s[pos];
        } else if (use_cache && out->len <= UINT32_MAX - n) {
            /* value: start of the earlier copy in out; its length is re-derived below. */
            uint32_t at;
            bool added;
            if (!bmap_find_or_add(&cache, s + pos, (uint32_t)n, (uint32_t)out->len, &at, &added))
                goto oom_cache;
            if (added) {
                size_t k = bpe_piece(tok, s + pos, n, syms);
                memcpy(out->data + out->len, syms, k * sizeof *syms);
                out->len += k;
            } else {
                /* Copy tokens until their bytes cover the piece. */
                for (size_t covered = 0; covered < n; at++) {
                    covered += tok->tok_len[out->data[at]];
                    out->data[out->len++] = out->data[at];
                }
            }
        } else {
            size_t k = bpe_piece(tok, s + pos, n, syms);
            memcpy(out->data + out->len, syms, k * sizeof *syms);
            out->len += k;
        }
        pos = end;
    }
    free(cache.e);
    return MOE_OK;
oom_cache:
    free(cache.e);
oom:
    return moe_error(MOE_ERR_OOM, "out of memory encoding %zu bytes of text", len);
}

moe_status moe_tokenizer_decode(const moe_tokenizer *tok, const int32_t *tokens, size_t n,
                                char **out, size_t *out_len) {
    *out = NULL;
    *out_len = 0;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= tok->vocab)
            return moe_error(MOE_ERR_INVALID,
                             "decoding: token %zu is %d, outside the vocab [0, %d)", i,
                             (int)tokens[i], tok->vocab);
        total += tok->tok_len[tokens[i]];
    }
    char *text = malloc(total + 1);
    if (!text) return moe_error(MOE_ERR_OOM, "out of memory decoding %zu tokens", n);
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        memcpy(text + off, tok->bytes + tok->tok_off[tokens[i]], tok->tok_len[tokens[i]]);
        off += tok->tok_len[tokens[i]];
    }
    text[total] = '\0';
    *out = text;
    *out_len = total;
    return MOE_OK;
}

/* ---- file ---------------------------------------------------------------------------- */

static uint32_t fnv1a32(const uint8_t *p, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

static void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

moe_status moe_tokenizer_to_bytes(const moe_tokenizer *tok, uint8_t **out, size_t *size) {
    uint32_t n_merges = (uint32_t)(tok->vocab - 256);
    size_t n = FILE_HEADER_BYTES + 8 * (size_t)n_merges + 4;
    uint8_t *img = calloc(1, n);
    if (!img) return moe_error(MOE_ERR_OOM, "out of memory serialising a tokenizer of %d tokens", tok->vocab);
    memcpy(img, FILE_MAGIC, 8);
    put_u32(img + 8, FILE_VERSION);
    put_u32(img + 12, (uint32_t)tok->kind);
    put_u32(img + 16, (uint32_t)tok->vocab);
    put_u32(img + 20, n_merges);
    put_u32(img + 24, MOE_TOKENIZER_MAX_PIECE);
    for (uint32_t i = 0; i < n_merges; i++) {
        put_u32(img + FILE_HEADER_BYTES + 8 * i, (uint32_t)tok->merges[i][0]);
        put_u32(img + FILE_HEADER_BYTES + 8 * i + 4, (uint32_t)tok->merges[i][1]);
    }
    put_u32(img + n - 4, fnv1a32(img, n - 4));
    *out = img;
    *size = n;
    return MOE_OK;
}

moe_status moe_tokenizer_save(const moe_tokenizer *tok, const char *path) {
    uint8_t *img = NULL;
    size_t size = 0;
    MOE_TRY(moe_tokenizer_to_bytes(tok, &img, &size));
    moe_atomic_file af;
    moe_status st = moe_atomic_open(&af, path, "tokenizer file");
    if (st == MOE_OK) st = moe_atomic_close(&af, fwrite(img, 1, size, af.f) == size, "tokenizer file");
    free(img);
    return st;
}

/* The header's faults, MOE_ERR_FORMAT naming `src`; on MOE_OK *n_merges and *kind. */
static moe_status check_header(const uint8_t *img, size_t size, const char *src, uint32_t *n_merges,
                               uint32_t *kind) {
    if (size < FILE_HEADER_BYTES + 4)
        return moe_error(MOE_ERR_FORMAT, "%s is truncated: %zu bytes, shorter than the %u-byte header "
                         "and checksum", src, size, FILE_HEADER_BYTES + 4);
    if (memcmp(img, FILE_MAGIC, 8) != 0)
        return moe_error(MOE_ERR_FORMAT, "%s is not a moe tokenizer (wrong magic); give the file saved "
                         "by `moe_tokenizer_save`, or train a new tokenizer", src);
    if (get_u32(img + 8) != FILE_VERSION)
        return moe_error(MOE_ERR_FORMAT, "%s has version %u, this build reads %u", src, get_u32(img + 8),
                         FILE_VERSION);
    uint32_t vocab = get_u32(img + 16);
    *kind = get_u32(img + 12);
    *n_merges = get_u32(img + 20);
    size_t want = FILE_HEADER_BYTES + 8 * (size_t)*n_merges + 4;
    if (size != want)
        return moe_error(MOE_ERR_FORMAT, "%s is damaged: %zu bytes, its header (%u merges) implies %zu "
                         "(truncated or overwritten?)", src, size, *n_merges, want);
    if (get_u32(img + size - 4) != fnv1a32(img, size - 4))
        return moe_error(MOE_ERR_FORMAT, "%s is damaged: checksum mismatch", src);
    if (*kind > MOE_TOKENIZER_BPE || vocab != 256 + *n_merges || vocab > MAX_VOCAB ||
        (*kind == MOE_TOKENIZER_BYTE && *n_merges != 0))
        return moe_error(MOE_ERR_FORMAT, "%s is inconsistent: kind %u, vocab %u, %u merges", src, *kind,
                         vocab, *n_merges);
    if (get_u32(img + 24) != MOE_TOKENIZER_MAX_PIECE)
        return moe_error(MOE_ERR_FORMAT, "%s was made with max piece length %u, this build uses %d: "
                         "retrain it", src, get_u32(img + 24), MOE_TOKENIZER_MAX_PIECE);
    return MOE_OK;
}

moe_status moe_tokenizer_from_bytes(const uint8_t *img, size_t size, const char *src, moe_tokenizer **out) {
    *out = NULL;
    uint32_t n_merges = 0, kind = 0;
    MOE_TRY(check_header(img, size, src, &n_merges, &kind));
    int32_t (*merges)[2] = malloc((n_merges ? n_merges : 1) * sizeof *merges);
    uint16_t *lens = malloc((256 + (size_t)n_merges) * sizeof *lens); /* token byte lengths */
    moe_status st = merges && lens ? MOE_OK : moe_error(MOE_ERR_OOM, "out of memory loading %s", src);
    for (uint32_t i = 0; st == MOE_OK && i < 256; i++) lens[i] = 1;
    for (uint32_t i = 0; st == MOE_OK && i < n_merges; i++) {
        uint32_t l = get_u32(img + FILE_HEADER_BYTES + 8 * i);
        uint32_t r = get_u32(img + FILE_HEADER_BYTES + 8 * i + 4);
        if (l >= 256 + i || r >= 256 + i)
            st = moe_error(MOE_ERR_FORMAT, "%s is damaged: merge %u refers to token %u or %u, not yet "
                           "defined", src, i, l, r);
        else if (lens[l] + lens[r] > MOE_TOKENIZER_MAX_PIECE) /* merges stay inside a piece */
            st = moe_error(MOE_ERR_FORMAT, "%s is damaged: merge %u makes a token of %d bytes, longer "
                           "than a %d-byte piece", src, i, lens[l] + lens[r], MOE_TOKENIZER_MAX_PIECE);
        else
            lens[256 + i] = (uint16_t)(lens[l] + lens[r]);
        merges[i][0] = (int32_t)l;
        merges[i][1] = (int32_t)r;
    }
    free(lens);
    if (st != MOE_OK) {
        free(merges);
        return st;
    }
    *out = tokenizer_build((moe_tokenizer_kind)kind, merges, (int)n_merges);
    return *out ? MOE_OK : moe_error(MOE_ERR_OOM, "out of memory loading %s", src);
}

moe_status moe_tokenizer_load(const char *path, moe_tokenizer **out) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return moe_error(MOE_ERR_IO, "cannot open tokenizer file %s: %s", path, strerror(errno));
    uint8_t *img = NULL;
    size_t size = 0, cap = 0;
    for (;;) {
        if (!grow((void **)&img, &cap, size + 65536, 1)) {
            fclose(f);
            free(img);
            return moe_error(MOE_ERR_OOM, "out of memory reading tokenizer file %s", path);
        }
        size_t got = fread(img + size, 1, cap - size, f);
        size += got;
        if (got == 0) break;
    }
    bool read_err = ferror(f);
    fclose(f);
    moe_status st;
    if (read_err) {
        st = moe_error(MOE_ERR_IO, "error reading tokenizer file %s", path);
    } else {
        size_t n = strlen(path) + 32;
        char *src = malloc(n);
        if (src) snprintf(src, n, "tokenizer file %s", path);
        st = src ? moe_tokenizer_from_bytes(img, size, src, out) : moe_error(MOE_ERR_OOM, "out of memory");
        free(src);
    }
    free(img);
    return st;
}
