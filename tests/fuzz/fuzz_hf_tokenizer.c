/* Fuzz target: the Hugging Face tokenizer.json reader (moe_hf_tokenizer_load) and the encoder
 * and decoder it builds.
 *
 * Input: a tokenizer.json file. A loaded tokenizer encodes a fixed short text (ASCII, digits,
 * accents, the added tokens of the fixtures, U+2581, an invalid byte) with and without the
 * post-processor, decodes the ids with and without special tokens, and streams them.
 * Checks: a refused file gives a message and never MOE_ERR_OOM (a file this small never
 * needs much memory); encoding succeeds (or refuses normalizers that blow the text up,
 * never running out of memory); every id it gives is inside the vocabulary and names a token;
 * decoding those ids succeeds (so does streaming them); the token <-> id accessors agree on
 * every id. */
#include <string.h>

#include "moe/hf/hf_tokenizer.h"
#include "tests/fuzz/common.h"

static const char text[] = "Hello world! It's 2024: \xc3\xa9t\xc3\xa9, na\xc3\xafve  caf\xc3\xa9\t<|im_start|>user\n"
                           "don't\xe2\x96\x81x <s> 12345 \xff end";

int LLVMFuzzerInitialize(int *argc, char ***argv) { return 0; }

static void check_ids(const moe_hf_tokenizer *tok, const moe_token_buf *ids) {
    size_t vocab = moe_hf_vocab_size(tok);
    for (size_t i = 0; i < ids->len; i++)
        FUZZ_CHECK(ids->data[i] >= 0 && (size_t)ids->data[i] < vocab && moe_hf_id_to_token(tok, ids->data[i]),
                   "encoding gave id %d (vocabulary %zu)", ids->data[i], vocab);
}

static void check_decode(const moe_hf_tokenizer *tok, const moe_token_buf *ids) {
    for (int skip = 0; skip < 2; skip++) {
        char *out = NULL;
        FUZZ_CHECK(moe_hf_decode(tok, ids->data, ids->len, skip, &out) == MOE_OK && out, "decode: %s",
                   moe_last_error());
        free(out);
    }
    moe_hf_stream s;
    moe_hf_stream_init(&s, tok, true);
    for (size_t i = 0; i <= ids->len; i++) {
        char *piece = NULL;
        moe_status st = i < ids->len ? moe_hf_stream_push(&s, ids->data[i], &piece) : moe_hf_stream_finish(&s, &piece);
        FUZZ_CHECK(st == MOE_OK && piece, "stream: %s", moe_last_error());
        free(piece);
    }
    moe_hf_stream_free(&s);
}

/* Every id's token maps back to an id holding the same string. */
static void check_accessors(const moe_hf_tokenizer *tok) {
    size_t vocab = moe_hf_vocab_size(tok);
    for (size_t id = 0; id < vocab; id++) {
        const char *t = moe_hf_id_to_token(tok, (int32_t)id);
        if (!t) continue;
        int32_t back = moe_hf_token_to_id(tok, t);
        FUZZ_CHECK(back >= 0 && (size_t)back < vocab, "token %zu does not map back to an id", id);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_hf_tokenizer *tok = NULL;
    moe_status st = moe_hf_tokenizer_load(&tok, fuzz_write_file("hf_tokenizer", data, size));
    if (st != MOE_OK) {
        FUZZ_CHECK(st != MOE_ERR_OOM, "a %zu-byte file ran out of memory: %s", size, moe_last_error());
        FUZZ_CHECK(!tok && *moe_last_error(), "a refused file left a tokenizer or no message");
        return 0;
    }
    check_accessors(tok);
    for (int special = 0; special < 2; special++) {
        moe_token_buf ids = {0};
        moe_status st = moe_hf_encode(tok, text, sizeof text - 1, special, &ids);
        /* the one encode failure a loaded tokenizer may give: normalizers that blow the text up */
        FUZZ_CHECK(st == MOE_OK || (st == MOE_ERR_FORMAT && strstr(moe_last_error(), "normalizers")), "encode: %s",
                   moe_last_error());
        check_ids(tok, &ids);
        check_decode(tok, &ids);
        moe_token_buf_free(&ids);
    }
    moe_hf_tokenizer_free(tok);
    return 0;
}
