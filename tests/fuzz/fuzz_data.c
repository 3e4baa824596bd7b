/* Fuzz target: the token-file reader (moe_data_open, moe_data_read, the batch sampler and
 * the evaluation iterator on top of it).
 *
 * Input: a token file (moe/train/data.h). Checks: a refused file gives a message; an accepted
 * one has a header consistent with its size, every token read back is below the vocab
 * size, and batches (of the file's record length, for a file of records) have targets =
 * inputs shifted by one. */
#include <string.h>

#include "moe/train/data.h"
#include "tests/fuzz/common.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) { return 0; }

static void check_tokens(const moe_token_file *tf, size_t file_size) {
    uint64_t count = moe_data_count(tf);
    int vocab = moe_data_vocab(tf);
    int width = vocab <= 65536 ? 2 : 4;
    FUZZ_CHECK(vocab >= 1 && MOE_TOKEN_FILE_HEADER_BYTES + count * width == file_size,
               "vocab %d, %llu tokens in a %zu-byte file", vocab, (unsigned long long)count, file_size);
    int32_t chunk[97];
    for (uint64_t at = 0; at < count; at += 97) {
        size_t n = count - at < 97 ? (size_t)(count - at) : 97;
        moe_data_read(tf, at, n, chunk);
        for (size_t i = 0; i < n; i++)
            FUZZ_CHECK(chunk[i] >= 0 && chunk[i] < vocab, "token %llu is %d, vocab %d",
                       (unsigned long long)(at + i), chunk[i], vocab);
    }
}

static void check_batches(const moe_token_file *tf) {
    uint64_t count = moe_data_count(tf);
    uint32_t rec = moe_data_record_len(tf); /* a file of records is read at its own length */
    int seq_len = rec ? (int)rec - 1 : count > 9 ? 8 : (int)count - 1, batch = 2;
    if (seq_len < 1 || seq_len > 8 || count < (uint64_t)seq_len + 1) return; /* too short: the loader refuses it */
    int32_t in[16], tg[16];
    moe_loader *l = NULL;
    FUZZ_CHECK(moe_loader_create(tf, 7, batch, seq_len, &l) == MOE_OK, "loader: %s", moe_last_error());
    for (int step = 0; step < 3; step++) {
        moe_loader_next(l, 0, 1, in, tg);
        for (int r = 0; r < batch; r++)
            FUZZ_CHECK(memcmp(in + r * seq_len + 1, tg + r * seq_len, sizeof(int32_t) * (seq_len - 1)) == 0,
                       "targets are not the inputs shifted by one");
    }
    moe_loader_free(l);
    moe_eval_iter it;
    if (moe_eval_iter_init(&it, tf, batch, seq_len, 4) == MOE_OK) {
        while (moe_eval_iter_next(&it, 1, 2, in, tg)) {
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_token_file *tf = NULL;
    moe_status st = moe_data_open(fuzz_write_file("data", data, size), &tf);
    if (st != MOE_OK) {
        FUZZ_CHECK(!tf && *moe_last_error(), "a refused file left a handle or no message");
        return 0;
    }
    check_tokens(tf, size);
    check_batches(tf);
    moe_data_close(tf);
    return 0;
}
