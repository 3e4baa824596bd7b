/* Data pipeline: text -> train/val token files, the token file reader, the
 * deterministic batch sampler and the evaluation iterator. See data.h. */
#include "moe/train/data.h"


#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/fileio.h"

#define TOKEN_MAGIC "MOETOK1"
#define TOKEN_VERSION 1u
#define MAX_VOCAB (1 << 24)

struct moe_token_file {
    char *path;
    const uint8_t *map; /* the whole file, memory-mapped read-only (or malloc'd: owned) */
    size_t map_len;
    bool owned;
    uint64_t count;
    int vocab, width;
    double bytes_per_token, unigram_bpb;
    uint32_t record_len;  /* 0: running text */
    const uint8_t *mask;  /* the loss mask bits in map, or NULL */
};

struct moe_loader {
    const moe_token_file *file;
    int batch_size, seq_len;
    moe_loader_state state;
};

/* ---- little-endian encoding ----------------------------------------------------------- */

static void put_le(uint8_t *p, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le(const uint8_t *p, int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static void put_f64(uint8_t *p, double d) {
    uint64_t v;
    memcpy(&v, &d, sizeof v);
    put_le(p, v, 8);
}

static double get_f64(const uint8_t *p) {
    uint64_t v = get_le(p, 8);
    double d;
    memcpy(&d, &v, sizeof d);
    return d;
}

/* ---- files ------------------------------------------------------------------------------- */

/* Maps `path` read-only; an empty file gives *data = NULL, *len = 0. */
static moe_status map_file(const char *path, const uint8_t **data, size_t *len) {
    *data = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return moe_error(MOE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int err = errno;
        close(fd);
        return moe_error(MOE_ERR_IO, "cannot stat %s: %s", path, strerror(err));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return moe_error(MOE_ERR_IO, "cannot read %s: not a regular file", path);
    }
    if (st.st_size > 0) {
        void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            int err = errno;
            close(fd);
            return moe_error(MOE_ERR_IO, "cannot map %s: %s", path, strerror(err));
        }
        *data = m;
        *len = (size_t)st.st_size;
    }
    close(fd);
    return MOE_OK;
}

static void unmap_file(const uint8_t *data, size_t len) {
    if (data) munmap((void *)data, len);
}

moe_status moe_data_make_dirs(const char *dir) {
    size_t n = strlen(dir);
    char *p = malloc(n + 1);
    if (!p) return moe_error(MOE_ERR_OOM, "out of memory creating directory %s", dir);
    memcpy(p, dir, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (p[i] != '/' && p[i] != '\0') continue;
        char c = p[i];
        p[i] = '\0';
        if (mkdir(p, 0755) != 0 && errno != EEXIST) {
            moe_status s =
                moe_error(MOE_ERR_IO, "cannot create directory %s: %s", p, strerror(errno));
            free(p);
            return s;
        }
        p[i] = c;
    }
    free(p);
    return MOE_OK;
}

static int token_width(int vocab) { return vocab <= 65536 ? 2 : 4; }

static uint64_t mask_bytes(uint64_t count) { return (count + 7) / 8; }

#define FLAG_MASK 1u /* header flags: a loss mask follows the tokens */

static void put_header(uint8_t *h, const moe_token_file_info *info) {
    memset(h, 0, MOE_TOKEN_FILE_HEADER_BYTES);
    memcpy(h, TOKEN_MAGIC, 8);
    put_le(h + 8, TOKEN_VERSION, 4);
    put_le(h + 12, (uint64_t)info->vocab, 4);
    put_le(h + 16, info->count, 8);
    put_le(h + 24, (uint64_t)token_width(info->vocab), 4);
    put_le(h + 28, info->record_len, 4);
    put_f64(h + 32, info->bytes_per_token);
    put_f64(h + 40, info->unigram_bpb);
    put_le(h + 48, info->src_bytes, 8);
    put_le(h + 56, info->has_mask ? FLAG_MASK : 0, 8);
}

/* ---- writer ------------------------------------------------------------------------------- */

enum { WRITE_CHUNK = 1 << 16 }; /* tokens encoded per fwrite */

struct moe_token_writer {
    moe_atomic_file af;
    moe_token_file_info info;
    uint64_t written;
    uint8_t *chunk; /* [WRITE_CHUNK * width] */
    uint8_t *mask;  /* [mask_bytes(count)] when info.has_mask, written at the end */
    bool ok;        /* every write so far succeeded */
};

moe_status moe_token_writer_open(const char *path, const moe_token_file_info *info, moe_token_writer **out) {
    *out = NULL;
    MOE_ASSERT(info->vocab >= 1 && info->vocab <= MAX_VOCAB, "token writer: vocab %d", info->vocab);
    moe_token_writer *w = calloc(1, sizeof *w);
    if (w) {
        w->info = *info;
        w->chunk = malloc((size_t)WRITE_CHUNK * 4);
        w->mask = info->has_mask ? calloc(mask_bytes(info->count) ? mask_bytes(info->count) : 1, 1) : NULL;
    }
    if (!w || !w->chunk || (info->has_mask && !w->mask)) {
        if (w) free(w->chunk), free(w->mask), free(w);
        return moe_error(MOE_ERR_OOM, "out of memory writing %s", path);
    }
    moe_status st = moe_atomic_open(&w->af, path, "token file");
    if (st != MOE_OK) {
        free(w->chunk), free(w->mask), free(w);
        return st;
    }
    uint8_t header[MOE_TOKEN_FILE_HEADER_BYTES];
    put_header(header, info);
    w->ok = fwrite(header, 1, sizeof header, w->af.f) == sizeof header;
    *out = w;
    return MOE_OK;
}

moe_status moe_token_writer_append(moe_token_writer *w, const int32_t *tokens, const uint8_t *scored, size_t n) {
    MOE_ASSERT(n <= w->info.count - w->written, "token writer: %zu more tokens than the %llu announced", n,
               (unsigned long long)w->info.count);
    MOE_ASSERT(!scored || w->mask, "token writer: mask bits for a file without a mask");
    const int width = token_width(w->info.vocab);
    for (size_t i = 0; w->ok && i < n; i += WRITE_CHUNK) {
        size_t m = n - i < WRITE_CHUNK ? n - i : WRITE_CHUNK;
        for (size_t j = 0; j < m; j++) {
            MOE_ASSERT(tokens[i + j] >= 0 && tokens[i + j] < w->info.vocab, "token writer: id %d", tokens[i + j]);
            put_le(w->chunk + j * width, (uint32_t)tokens[i + j], width);
        }
        w->ok = fwrite(w->chunk, (size_t)width, m, w->af.f) == m;
    }
    for (size_t i = 0; scored && i < n; i++) {
        uint64_t at = w->written + i;
        if (scored[i]) w->mask[at / 8] |= (uint8_t)(1u << (at % 8));
    }
    w->written += n;
    return w->ok ? MOE_OK : moe_error(MOE_ERR_IO, "cannot write token file %s: %s", w->af.path, strerror(errno));
}

moe_status moe_token_writer_close(moe_token_writer *w, bool ok) {
    /* A failure of the caller's keeps its own message; the temp file goes either way. */
    moe_status earlier = ok ? MOE_OK : moe_last_status();
    char msg[512] = "";
    if (!ok) snprintf(msg, sizeof msg, "%s", moe_last_error());
    bool complete = w->written == w->info.count;
    ok = ok && w->ok && complete;
    if (ok && w->mask) {
        size_t nb = (size_t)mask_bytes(w->info.count);
        ok = fwrite(w->mask, 1, nb, w->af.f) == nb;
    }
    moe_status st = moe_atomic_close(&w->af, ok, "token file");
    if (earlier == MOE_OK && w->ok && !complete)
        st = moe_error(MOE_ERR_INVALID, "token writer: %llu tokens written of the %llu announced",
                       (unsigned long long)w->written, (unsigned long long)w->info.count);
    free(w->chunk);
    free(w->mask);
    free(w);
    return earlier != MOE_OK ? moe_error(earlier, "%s", msg) : st;
}

/* Writes one token file of running text. */
static moe_status write_token_file(const char *path, int vocab, const int32_t *tokens, size_t count,
                                   double bytes_per_token, double unigram_bpb, uint64_t src_bytes) {
    moe_token_file_info info = {.vocab = vocab, .count = count, .bytes_per_token = bytes_per_token,
                                .unigram_bpb = unigram_bpb, .src_bytes = src_bytes};
    moe_token_writer *w;
    MOE_TRY(moe_token_writer_open(path, &info, &w));
    moe_status st = moe_token_writer_append(w, tokens, NULL, count);
    moe_status closed = moe_token_writer_close(w, st == MOE_OK);
    return st != MOE_OK ? st : closed;
}

/* ---- prepare ---------------------------------------------------------------------------- */

/* Reads and concatenates the inputs (see data.h) into a malloc'd buffer. */
static moe_status read_inputs(const char *const *paths, int n, uint8_t **text, size_t *len) {
    const uint8_t **maps = calloc((size_t)n, sizeof *maps);
    size_t *lens = calloc((size_t)n, sizeof *lens);
    moe_status st = maps && lens ? MOE_OK : moe_error(MOE_ERR_OOM, "out of memory reading inputs");
    size_t total = 0;
    for (int i = 0; i < n && st == MOE_OK; i++) {
        st = map_file(paths[i], &maps[i], &lens[i]);
        if (st != MOE_OK) st = moe_error_context(st, "data prepare: input %d", i + 1);
        total += lens[i] + 2;
    }
    uint8_t *buf = st == MOE_OK ? malloc(total + 1) : NULL;
    if (st == MOE_OK && !buf)
        st = moe_error(MOE_ERR_OOM, "out of memory: %zu bytes of text", total);
    size_t off = 0;
    for (int i = 0; i < n && st == MOE_OK; i++) {
        if (lens[i]) memcpy(buf + off, maps[i], lens[i]);
        off += lens[i];
        if (lens[i] && maps[i][lens[i] - 1] != '\n' && i + 1 < n) {
            buf[off++] = '\n';
            buf[off++] = '\n';
        }
    }
    for (int i = 0; maps && i < n; i++) unmap_file(maps[i], lens ? lens[i] : 0);
    free(maps);
    free(lens);
    if (st != MOE_OK) {
        free(buf);
        return st;
    }
    *text = buf;
    *len = off;
    return MOE_OK;
}

static bool is_paragraph_start(const uint8_t *s, size_t len, size_t p) {
    return p >= 2 && p < len && s[p - 1] == '\n' && s[p - 2] == '\n' && s[p] != '\n';
}

static bool is_line_start(const uint8_t *s, size_t len, size_t p) {
    return p >= 1 && p < len && s[p - 1] == '\n' && s[p] != '\n';
}

/* The start of the validation part: the paragraph start (else line start) nearest
 * `target` within `radius`, else `target` itself. */
static size_t find_split(const uint8_t *s, size_t len, size_t target, size_t radius) {
    bool (*const kinds[2])(const uint8_t *, size_t, size_t) = {is_paragraph_start, is_line_start};
    for (int k = 0; k < 2; k++)
        for (size_t d = 0; d <= radius; d++) {
            if (target >= d && target - d >= 1 && kinds[k](s, len, target - d)) return target - d;
            if (target + d < len && kinds[k](s, len, target + d)) return target + d;
        }
    return target;
}

/* Cross-entropy (bits per byte) of `val` under the add-one-smoothed unigram model of `train`. */
static double unigram_bits_per_byte(const moe_token_buf *train, const moe_token_buf *val, int vocab,
                                    uint64_t val_bytes, bool *oom) {
    uint64_t *counts = calloc((size_t)vocab * 2, sizeof *counts);
    if (!counts) {
        *oom = true;
        return 0;
    }
    uint64_t *val_counts = counts + vocab;
    for (size_t i = 0; i < train->len; i++) counts[train->data[i]]++;
    for (size_t i = 0; i < val->len; i++) val_counts[val->data[i]]++;
    double denom = (double)train->len + vocab, bits = 0;
    for (int t = 0; t < vocab; t++)
        if (val_counts[t]) bits -= (double)val_counts[t] * log2(((double)counts[t] + 1) / denom);
    free(counts);
    return bits / (double)val_bytes;
}

static moe_status encode_own(void *tok, const char *text, size_t len, moe_token_buf *out) {
    return moe_tokenizer_encode(tok, text, len, out);
}

moe_status moe_data_prepare(const char *const *input_paths, int n_inputs, const moe_tokenizer *tok,
                            double val_fraction, const char *out_dir, moe_data_summary *summary) {
    moe_text_encoder enc = {encode_own, (void *)tok, moe_tokenizer_vocab_size(tok)};
    return moe_data_prepare_with(input_paths, n_inputs, &enc, val_fraction, out_dir, summary);
}

moe_status moe_data_prepare_with(const char *const *input_paths, int n_inputs, const moe_text_encoder *enc,
                                 double val_fraction, const char *out_dir, moe_data_summary *summary) {
    if (n_inputs < 1) return moe_error(MOE_ERR_INVALID, "data prepare: no input text files given");
    if (!(val_fraction > 0 && val_fraction < 1))
        return moe_error(MOE_ERR_INVALID, "data prepare: validation fraction %g must be in (0, 1)",
                         val_fraction);
    uint8_t *text;
    size_t len;
    MOE_TRY(read_inputs(input_paths, n_inputs, &text, &len));
    if (len < 2) {
        free(text);
        return moe_error(MOE_ERR_INVALID, "data prepare: the inputs hold %zu bytes of text; need "
                         "at least 2 to make a train and a validation split", len);
    }
    size_t target = len - (size_t)llround(val_fraction * (double)len);
    if (target < 1) target = 1;
    if (target > len - 1) target = len - 1;
    size_t radius = (size_t)(val_fraction * (double)len / 2);
    size_t split = find_split(text, len, target, radius);

    int vocab = enc->vocab;
    moe_token_buf train = {0}, val = {0};
    moe_status st = enc->encode(enc->user, (const char *)text, split, &train);
    if (st == MOE_OK) st = enc->encode(enc->user, (const char *)text + split, len - split, &val);
    for (size_t i = 0; st == MOE_OK && i < train.len + val.len; i++) {
        int32_t id = i < train.len ? train.data[i] : val.data[i - train.len];
        if (id < 0 || id >= vocab)
            st = moe_error(MOE_ERR_INVALID, "data prepare: the tokenizer gave id %d, outside its vocabulary of %d", id, vocab);
    }
    free(text);
    moe_data_summary sum = {
        .vocab_size = vocab,
        .train_tokens = train.len,
        .val_tokens = val.len,
        .train_bytes = split,
        .val_bytes = len - split,
        .train_bytes_per_token = (double)split / (double)(train.len ? train.len : 1),
        .val_bytes_per_token = (double)(len - split) / (double)(val.len ? val.len : 1),
    };
    bool oom = false;
    if (st == MOE_OK)
        sum.unigram_bpb = unigram_bits_per_byte(&train, &val, vocab, sum.val_bytes, &oom);
    if (oom) st = moe_error(MOE_ERR_OOM, "out of memory counting token frequencies");
    if (st == MOE_OK) st = moe_data_make_dirs(out_dir);
    const char *names[2] = {"train.bin", "val.bin"};
    const moe_token_buf *bufs[2] = {&train, &val};
    double bpt[2] = {sum.train_bytes_per_token, sum.val_bytes_per_token};
    uint64_t src[2] = {sum.train_bytes, sum.val_bytes};
    for (int i = 0; i < 2 && st == MOE_OK; i++) {
        size_t n = strlen(out_dir) + strlen(names[i]) + 2;
        char *path = malloc(n);
        if (!path) {
            st = moe_error(MOE_ERR_OOM, "out of memory");
            break;
        }
        snprintf(path, n, "%s/%s", out_dir, names[i]);
        st = write_token_file(path, vocab, bufs[i]->data, bufs[i]->len, bpt[i], sum.unigram_bpb,
                              src[i]);
        free(path);
    }
    moe_token_buf_free(&train);
    moe_token_buf_free(&val);
    if (st == MOE_OK && summary) *summary = sum;
    return st;
}

/* ---- reader ------------------------------------------------------------------------------- */

void moe_data_close(moe_token_file *tf) {
    if (!tf) return;
    if (tf->owned) free((void *)tf->map);
    else unmap_file(tf->map, tf->map_len);
    free(tf->path);
    free(tf);
}

/* Checks the header and every token; MOE_ERR_FORMAT naming the fault. */
static moe_status validate_token_file(moe_token_file *tf) {
    const char *path = tf->path;
    const uint8_t *h = tf->map;
    size_t size = tf->map_len;
    const char *fix = "re-create it with `moe data prepare` (or `moe data mqar`)";
    if (size < MOE_TOKEN_FILE_HEADER_BYTES)
        return moe_error(MOE_ERR_FORMAT, "token file %s is truncated: %zu bytes, shorter than the "
                         "%d-byte header; %s", path, size, MOE_TOKEN_FILE_HEADER_BYTES, fix);
    if (memcmp(h, TOKEN_MAGIC, 8) != 0)
        return moe_error(MOE_ERR_FORMAT, "%s is not a moe token file (wrong magic); %s", path, fix);
    uint32_t version = (uint32_t)get_le(h + 8, 4);
    if (version != TOKEN_VERSION)
        return moe_error(MOE_ERR_FORMAT, "token file %s has version %u, this build reads %u; %s",
                         path, version, TOKEN_VERSION, fix);
    uint64_t vocab = get_le(h + 12, 4), count = get_le(h + 16, 8), width = get_le(h + 24, 4);
    if (vocab < 1 || vocab > MAX_VOCAB || width != (vocab <= 65536 ? 2u : 4u))
        return moe_error(MOE_ERR_FORMAT,
                         "token file %s is damaged: vocab %llu with token width "
                         "%llu; %s",
                         path, (unsigned long long)vocab, (unsigned long long)width, fix);
    uint64_t record = get_le(h + 28, 4), flags = get_le(h + 56, 8);
    if (flags & ~(uint64_t)FLAG_MASK)
        return moe_error(MOE_ERR_FORMAT, "token file %s is damaged: unknown header flags 0x%llx; %s", path,
                         (unsigned long long)flags, fix);
    uint64_t body = size - MOE_TOKEN_FILE_HEADER_BYTES, mask = flags & FLAG_MASK ? mask_bytes(count) : 0;
    if (count > body / width || body != count * width + mask)
        return moe_error(MOE_ERR_FORMAT, "token file %s size mismatch: the header says %llu tokens "
                         "of %llu bytes%s (%llu bytes after the header) but %llu bytes follow it "
                         "(truncated or appended to?); %s", path, (unsigned long long)count,
                         (unsigned long long)width, mask ? " and their loss mask" : "",
                         (unsigned long long)(count * width + mask), (unsigned long long)body, fix);
    if (record && count % record)
        return moe_error(MOE_ERR_FORMAT, "token file %s is damaged: %llu tokens are not whole records of "
                         "%llu; %s", path, (unsigned long long)count, (unsigned long long)record, fix);
    double bpt = get_f64(h + 32), ubpb = get_f64(h + 40);
    if (!isfinite(bpt) || bpt < 0 || !isfinite(ubpb) || ubpb < 0)
        return moe_error(MOE_ERR_FORMAT, "token file %s is damaged: bytes per token %g, unigram "
                         "bits per byte %g; %s", path, bpt, ubpb, fix);
    const uint8_t *p = h + MOE_TOKEN_FILE_HEADER_BYTES;
    for (uint64_t i = 0; i < count; i++)
        if (get_le(p + i * width, (int)width) >= vocab)
            return moe_error(MOE_ERR_FORMAT, "token file %s is damaged: token %llu is %llu, not "
                             "below the vocab size %llu; %s", path, (unsigned long long)i,
                             (unsigned long long)get_le(p + i * width, (int)width),
                             (unsigned long long)vocab, fix);
    tf->count = count;
    tf->vocab = (int)vocab;
    tf->width = (int)width;
    tf->bytes_per_token = bpt;
    tf->unigram_bpb = ubpb;
    tf->record_len = (uint32_t)record;
    tf->mask = mask ? p + count * width : NULL;
    return MOE_OK;
}

moe_status moe_data_open(const char *path, moe_token_file **out) {
    *out = NULL;
    moe_token_file *tf = calloc(1, sizeof *tf);
    if (!tf || !(tf->path = strdup(path))) {
        free(tf);
        return moe_error(MOE_ERR_OOM, "out of memory opening %s", path);
    }
    moe_status st = map_file(path, &tf->map, &tf->map_len);
    if (st == MOE_OK) st = validate_token_file(tf);
    if (st != MOE_OK) {
        moe_data_close(tf);
        return st;
    }
    *out = tf;
    return MOE_OK;
}

bool moe_data_is_token_file(const char *path) {
    FILE *f = fopen(path, "rb");
    char magic[8] = {0};
    bool yes = f && fread(magic, 1, 8, f) == 8 && !memcmp(magic, TOKEN_MAGIC, 8);
    if (f) fclose(f);
    return yes;
}

/* A token file image in memory: the header, then the tokens (bytes per token from the text). */
static moe_status token_image(const moe_token_buf *toks, int vocab, size_t text_len, uint8_t **img, size_t *size) {
    int width = token_width(vocab);
    *size = MOE_TOKEN_FILE_HEADER_BYTES + toks->len * (size_t)width;
    uint8_t *h = *img = calloc(1, *size);
    if (!h) return moe_error(MOE_ERR_OOM, "out of memory for %zu tokens", toks->len);
    put_header(h, &(moe_token_file_info){.vocab = vocab, .count = toks->len, .src_bytes = text_len,
                                         .bytes_per_token = (double)text_len / (double)(toks->len ? toks->len : 1)});
    for (size_t i = 0; i < toks->len; i++)
        put_le(h + MOE_TOKEN_FILE_HEADER_BYTES + i * (size_t)width, (uint32_t)toks->data[i], width);
    return MOE_OK;
}

moe_status moe_data_open_tokens(const char *name, const moe_token_buf *toks, int vocab, size_t text_bytes,
                                moe_token_file **out) {
    *out = NULL;
    moe_token_file *tf = calloc(1, sizeof *tf);
    moe_status st = tf && (tf->path = strdup(name)) ? MOE_OK : moe_error(MOE_ERR_OOM, "out of memory opening %s", name);
    uint8_t *img = NULL;
    if (st == MOE_OK) st = token_image(toks, vocab, text_bytes, &img, &tf->map_len);
    if (tf) tf->map = img, tf->owned = true;
    if (st == MOE_OK) st = validate_token_file(tf);
    if (st != MOE_OK) {
        moe_data_close(tf);
        return st;
    }
    *out = tf;
    return MOE_OK;
}

moe_status moe_data_open_text(const char *path, const moe_tokenizer *tok, moe_token_file **out) {
    *out = NULL;
    const uint8_t *text = NULL;
    size_t len = 0;
    MOE_TRY(map_file(path, &text, &len));
    moe_token_buf toks = {0};
    moe_status st = moe_tokenizer_encode(tok, (const char *)text, len, &toks);
    unmap_file(text, len);
    if (st == MOE_OK) st = moe_data_open_tokens(path, &toks, moe_tokenizer_vocab_size(tok), len, out);
    moe_token_buf_free(&toks);
    return st;
}

uint64_t moe_data_count(const moe_token_file *tf) { return tf->count; }
int moe_data_vocab(const moe_token_file *tf) { return tf->vocab; }
double moe_data_bytes_per_token(const moe_token_file *tf) { return tf->bytes_per_token; }
double moe_data_unigram_bpb(const moe_token_file *tf) { return tf->unigram_bpb; }
const char *moe_data_path(const moe_token_file *tf) { return tf->path; }
uint32_t moe_data_record_len(const moe_token_file *tf) { return tf->record_len; }
bool moe_data_has_mask(const moe_token_file *tf) { return tf->mask != NULL; }

void moe_data_read(const moe_token_file *tf, uint64_t start, size_t n, int32_t *dst) {
    MOE_ASSERT(start <= tf->count && n <= tf->count - start,
               "reading tokens [%llu, %llu) of %s, which holds %llu", (unsigned long long)start,
               (unsigned long long)(start + n), tf->path, (unsigned long long)tf->count);
    const uint8_t *p = tf->map + MOE_TOKEN_FILE_HEADER_BYTES + start * (uint64_t)tf->width;
    if (tf->width == 2)
        for (size_t i = 0; i < n; i++) dst[i] = (int32_t)(p[2 * i] | p[2 * i + 1] << 8);
    else
        for (size_t i = 0; i < n; i++) dst[i] = (int32_t)get_le(p + 4 * i, 4);
}

/* ---- batch sampler ------------------------------------------------------------------------ */

static uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* Checks sizes shared by the loader and the eval iterator. */
static moe_status check_window(const moe_token_file *tf, int batch_size, int seq_len, uint64_t need,
                               const char *what) {
    if (batch_size < 1 || seq_len < 1)
        return moe_error(MOE_ERR_INVALID,
                         "%s: batch size %d and sequence length %d must be positive", what,
                         batch_size, seq_len);
    if (tf->count < need)
        return moe_error(MOE_ERR_INVALID,
                         "%s: token file %s holds %llu tokens, fewer than the %llu "
                         "needed for batch size %d x sequence length %d (+1); use more text or a "
                         "shorter sequence",
                         what, tf->path, (unsigned long long)tf->count, (unsigned long long)need,
                         batch_size, seq_len);
    if (tf->record_len && (uint64_t)seq_len + 1 != tf->record_len)
        return moe_error(MOE_ERR_INVALID,
                         "%s: token file %s holds examples of %u tokens, read with sequence length "
                         "%u; the sequence length is %d (set model.seq_len=%u)",
                         what, tf->path, tf->record_len, tf->record_len - 1, seq_len, tf->record_len - 1);
    return MOE_OK;
}

moe_status moe_loader_create(const moe_token_file *tf, uint64_t seed, int batch_size, int seq_len,
                             moe_loader **out) {
    *out = NULL;
    MOE_TRY(check_window(tf, batch_size, seq_len, (uint64_t)(seq_len > 0 ? seq_len : 0) + 1,
                         "batch sampler"));
    moe_loader *l = malloc(sizeof *l);
    if (!l) return moe_error(MOE_ERR_OOM, "out of memory creating a batch sampler");
    *l = (moe_loader){tf, batch_size, seq_len, {seed, 0}};
    *out = l;
    return MOE_OK;
}

void moe_loader_free(moe_loader *l) { free(l); }

/* Rows [rank*B/dp, (rank+1)*B/dp) of windows starting at start_of(row). */
static void fill_rows(const moe_token_file *tf, int batch_size, int seq_len, int rank, int dp,
                      uint64_t (*start_of)(const void *ctx, uint64_t row), const void *ctx,
                      int32_t *inputs, int32_t *targets) {
    MOE_ASSERT(dp >= 1 && rank >= 0 && rank < dp, "rank %d outside data-parallel size %d", rank,
               dp);
    MOE_ASSERT(batch_size % dp == 0, "batch size %d not divisible by data-parallel size %d",
               batch_size, dp);
    int rows = batch_size / dp;
    for (int i = 0; i < rows; i++) {
        uint64_t start = start_of(ctx, (uint64_t)rank * rows + i);
        moe_data_read(tf, start, (size_t)seq_len, inputs + (size_t)i * seq_len);
        int32_t *tg = targets + (size_t)i * seq_len;
        moe_data_read(tf, start + 1, (size_t)seq_len, tg);
        for (int t = 0; tf->mask && t < seq_len; t++) {
            uint64_t at = start + 1 + (uint64_t)t;
            if (!(tf->mask[at / 8] >> (at % 8) & 1)) tg[t] = -1;
        }
    }
}

typedef struct sample_ctx {
    const moe_loader *loader;
    uint64_t step;
} sample_ctx;

static uint64_t sample_start(const void *ctx, uint64_t row) {
    const sample_ctx *c = ctx;
    const moe_token_file *tf = c->loader->file;
    uint64_t R = tf->record_len, n_starts = R ? tf->count / R : tf->count - (uint64_t)c->loader->seq_len;
    uint64_t h = splitmix64(splitmix64(splitmix64(c->loader->state.seed) ^ c->step) ^ row);
    uint64_t pick = (uint64_t)(((unsigned __int128)h * n_starts) >> 64);
    return R ? pick * R : pick;
}

void moe_loader_batch(const moe_loader *l, uint64_t step, int rank_in_dp, int dp_size,
                      int32_t *inputs, int32_t *targets) {
    sample_ctx ctx = {l, step};
    fill_rows(l->file, l->batch_size, l->seq_len, rank_in_dp, dp_size, sample_start, &ctx, inputs,
              targets);
}

void moe_loader_next(moe_loader *l, int rank_in_dp, int dp_size, int32_t *inputs,
                     int32_t *targets) {
    moe_loader_batch(l, l->state.step, rank_in_dp, dp_size, inputs, targets);
    l->state.step++;
}

moe_loader_state moe_loader_get_state(const moe_loader *l) { return l->state; }
void moe_loader_set_state(moe_loader *l, moe_loader_state state) { l->state = state; }

/* ---- evaluation iterator ------------------------------------------------------------------ */

moe_status moe_eval_iter_init(moe_eval_iter *it, const moe_token_file *tf, int batch_size,
                              int seq_len, uint64_t max_batches) {
    const uint64_t R = tf->record_len;
    uint64_t need = batch_size > 0 && seq_len > 0
                        ? (R ? (uint64_t)batch_size * R : (uint64_t)batch_size * (uint64_t)seq_len + 1)
                        : 0;
    MOE_TRY(check_window(tf, batch_size, seq_len, need, "evaluation"));
    uint64_t n = (R ? tf->count / R : (tf->count - 1) / (uint64_t)seq_len) / (uint64_t)batch_size;
    *it = (moe_eval_iter){tf, batch_size, seq_len, max_batches && max_batches < n ? max_batches : n,
                          0};
    return MOE_OK;
}

static uint64_t eval_start(const void *ctx, uint64_t row) {
    const moe_eval_iter *it = ctx;
    uint64_t stride = it->file->record_len ? it->file->record_len : (uint64_t)it->seq_len;
    return ((it->next * (uint64_t)it->batch_size) + row) * stride;
}

bool moe_eval_iter_next(moe_eval_iter *it, int rank_in_dp, int dp_size, int32_t *inputs,
                        int32_t *targets) {
    if (it->next >= it->n_batches) return false;
    fill_rows(it->file, it->batch_size, it->seq_len, rank_in_dp, dp_size, eval_start, it, inputs,
              targets);
    it->next++;
    return true;
}

void moe_eval_iter_reset(moe_eval_iter *it) { it->next = 0; }
