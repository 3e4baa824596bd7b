/* Fuzz target: the BPE tokenizer file reader (moe_tokenizer_load).
 *
 * Input: a tokenizer file. The harness first rewrites its trailing FNV-1a checksum to
 * match the bytes before it (when the input is at least header + checksum long), so the
 * fuzzer reaches the checks behind the checksum; the checksum test itself is unit-tested.
 * Checks: a refused file gives a message and never MOE_ERR_OOM (a file this small never
 * needs much memory); a loaded tokenizer has a consistent vocabulary (merge pairs and
 * token bytes) and round-trips a text made of fixed words and the input's own bytes. */
#include <string.h>

#include "moe/model/tokenizer.h"
#include "tests/fuzz/common.h"

#define HEADER_BYTES 28 /* moe/model/tokenizer.h: magic, version, kind, vocab, merges, max piece */

int LLVMFuzzerInitialize(int *argc, char ***argv) { return 0; }

static uint32_t fnv1a32(const uint8_t *p, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

/* Every token's bytes are its merge pair's bytes, concatenated. */
static void check_vocab(const moe_tokenizer *tok) {
    int vocab = moe_tokenizer_vocab_size(tok);
    FUZZ_CHECK(vocab >= 256, "vocab %d", vocab);
    for (int32_t id = 0; id < vocab; id++) {
        size_t len, ll, rl;
        const uint8_t *b = moe_tokenizer_token_bytes(tok, id, &len);
        int32_t l, r;
        if (!moe_tokenizer_merge_pair(tok, id, &l, &r)) {
            FUZZ_CHECK(id < 256 && len == 1 && b[0] == id, "byte token %d", id);
            continue;
        }
        FUZZ_CHECK(l >= 0 && l < id && r >= 0 && r < id, "token %d merges %d and %d", id, l, r);
        const uint8_t *lb = moe_tokenizer_token_bytes(tok, l, &ll), *rb = moe_tokenizer_token_bytes(tok, r, &rl);
        FUZZ_CHECK(len == ll + rl && memcmp(b, lb, ll) == 0 && memcmp(b + ll, rb, rl) == 0,
                   "token %d is not its merge pair's bytes", id);
        FUZZ_CHECK(len <= MOE_TOKENIZER_MAX_PIECE, "token %d is %zu bytes long", id, len);
    }
}

static void check_round_trip(const moe_tokenizer *tok, const uint8_t *data, size_t size) {
    static const char words[] = "the cat's  hat\n\n  don't 1234 ..!? \xc3\xa9t\xc3\xa9 ";
    size_t n = size < 512 ? size : 512, len = sizeof words - 1 + n;
    char *text = malloc(len);
    FUZZ_CHECK(text, "out of memory");
    memcpy(text, words, sizeof words - 1);
    memcpy(text + sizeof words - 1, data, n);
    moe_token_buf ids = {0};
    FUZZ_CHECK(moe_tokenizer_encode(tok, text, len, &ids) == MOE_OK, "encode: %s", moe_last_error());
    char *back = NULL;
    size_t back_len = 0;
    FUZZ_CHECK(moe_tokenizer_decode(tok, ids.data, ids.len, &back, &back_len) == MOE_OK,
               "decode: %s", moe_last_error());
    FUZZ_CHECK(back_len == len && memcmp(back, text, len) == 0, "decode(encode(text)) != text");
    free(back);
    moe_token_buf_free(&ids);
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *img = malloc(size ? size : 1);
    FUZZ_CHECK(img, "out of memory");
    memcpy(img, data, size);
    if (size >= HEADER_BYTES + 4) {
        uint32_t h = fnv1a32(img, size - 4);
        for (int i = 0; i < 4; i++) img[size - 4 + i] = (uint8_t)(h >> (8 * i));
    }
    moe_tokenizer *tok = NULL;
    moe_status st = moe_tokenizer_load(fuzz_write_file("tokenizer", img, size), &tok);
    if (st == MOE_OK) {
        check_vocab(tok);
        check_round_trip(tok, data, size);
        moe_tokenizer_free(tok);
    } else {
        FUZZ_CHECK(st != MOE_ERR_OOM, "a %zu-byte file ran out of memory: %s", size, moe_last_error());
        FUZZ_CHECK(!tok && *moe_last_error(), "a refused file left a tokenizer or no message");
    }
    free(img);
    return 0;
}
