/* `moe bench tokenize`: one thread encoding a text file line by line with a model's
 * tokenizer (a hub folder's tokenizer.json or a checkpoint's), the moe side of the
 * tokenizer figure of scripts/bench-hub.sh (bench_hub_reference.py --tokenize is the
 * `tokenizers` side, over the same lines).
 *
 * Lines: the file split at '\n', empty lines left out, each encoded without its newline
 * and without special tokens. One untimed pass first (it counts the tokens), then --reps
 * timed passes; prints
 *   TOKENIZE impl=moe mb_per_s=X tokens=N bytes=B lines=L ms=T tokens_per_s=Y
 * with X = B / 1e6 / (the median pass's seconds), B the bytes of the encoded lines. */
#include "moe/cli/bench_decode.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileio.h"
#include "moe/cli/cli.h"
#include "moe/cli/source.h"

#define MAX_REPS 100

typedef struct tokenize_flags {
    moe_source_flags src;
    const char *data;
    int reps;
} tokenize_flags;

/* What one pass over the lines of text [len] encoded. */
typedef struct tokenize_count {
    size_t bytes, lines, tokens;
} tokenize_count;

static moe_status encode_lines(serve_text *t, const char *text, size_t len, moe_token_buf *buf, tokenize_count *c) {
    *c = (tokenize_count){0};
    for (size_t at = 0; at < len;) {
        const char *nl = memchr(text + at, '\n', len - at);
        size_t n = nl ? (size_t)(nl - (text + at)) : len - at;
        if (n) {
            buf->len = 0;
            MOE_TRY(serve_text_encode(t, text + at, n, false, buf));
            c->bytes += n;
            c->lines++;
            c->tokens += buf->len;
        }
        at += n + 1;
    }
    return MOE_OK;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static moe_status bench_tokenize(const tokenize_flags *f) {
    if (!f->data) return moe_error(MOE_ERR_CONFIG, "bench tokenize: --data FILE names the text to encode");
    char *text = NULL;
    size_t len = 0;
    MOE_TRY(moe_cli_read_text(f->data, &text, &len));
    moe_source src;
    moe_status s = moe_source_open(&src, &f->src, MOE_SOURCE_TEXT);
    moe_token_buf buf = {0};
    tokenize_count c = {0};
    double ms[MAX_REPS];
    if (s == MOE_OK) s = encode_lines(&src.text, text, len, &buf, &c);
    if (s == MOE_OK && !c.bytes) s = moe_error(MOE_ERR_CONFIG, "bench tokenize: %s has no text", f->data);
    for (int r = 0; r < f->reps && s == MOE_OK; r++) {
        tokenize_count again;
        double t0 = moe_clock_ms();
        s = encode_lines(&src.text, text, len, &buf, &again);
        ms[r] = moe_clock_ms() - t0;
    }
    if (s == MOE_OK) {
        qsort(ms, (size_t)f->reps, sizeof *ms, cmp_double);
        double med = f->reps % 2 ? ms[f->reps / 2] : 0.5 * (ms[f->reps / 2 - 1] + ms[f->reps / 2]);
        printf("TOKENIZE impl=moe mb_per_s=%.3f tokens=%zu bytes=%zu lines=%zu ms=%.2f tokens_per_s=%.0f\n",
               med > 0 ? (double)c.bytes / 1e3 / med : 0.0, c.tokens, c.bytes, c.lines, med,
               med > 0 ? (double)c.tokens * 1e3 / med : 0.0);
        fflush(stdout);
    }
    moe_token_buf_free(&buf);
    moe_source_close(&src);
    free(text);
    return s;
}

int moe_cmd_bench_tokenize(int argc, char **argv) {
    tokenize_flags f = {.reps = 3};
    const moe_flag_spec specs[] = {
        {"--model", MOE_FLAG_STRING, "DIR", 0, 0, NULL, "a Hugging Face hub folder (its tokenizer.json)", &f.src.model_dir},
        {"--checkpoint", MOE_FLAG_STRING, "FILE", 0, 0, NULL, "one of our checkpoints (its tokenizer)", &f.src.checkpoint},
        {"--data", MOE_FLAG_STRING, "FILE", 0, 0, NULL, "the text, encoded line by line", &f.data},
        {"--reps", MOE_FLAG_INT, "R", 1, MAX_REPS, NULL, "timed passes after one untimed", &f.reps},
        {0}};
    moe_args a;
    int rc = moe_cli_parse("bench tokenize", "moe bench tokenize --model DIR | --checkpoint FILE --data FILE [--reps R]",
                           specs, argc, argv, 0, 0, NULL, &a);
    if (rc < 0) {
        moe_args_free(&a);
        moe_status s = bench_tokenize(&f);
        rc = s == MOE_OK ? 0 : moe_cli_fail(s);
    }
    return rc;
}
