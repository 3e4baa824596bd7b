/* Training data: text files -> token files (train.bin / val.bin), a reader for them,
 * a deterministic sharded batch sampler and a sequential evaluation iterator.
 *
 * Token file (little-endian), a 64-byte header then the tokens:
 *   0  char[8]  magic "MOETOK1\0"
 *   8  u32      version (1)
 *   12 u32      vocab size
 *   16 u64      token count
 *   24 u32      token byte width: 2 when vocab <= 65536, else 4
 *   28 u32      record length R: 0 for running text; else the tokens are count / R records
 *               (examples, e.g. moe/train/mqar.h) of R tokens and the sampler and the
 *               evaluation read whole records (model.seq_len = R - 1)
 *   32 f64      bytes per token of this split's source text (bits/byte = nats/token /
 *               ln 2 / bytes_per_token)
 *   40 f64      unigram baseline of the validation split, bits per byte (the same value
 *               in both files; see moe_data_summary)
 *   48 u64      source text bytes of this split
 *   56 u64      flags: bit 0 = a loss mask follows the tokens; the other bits are 0
 *   64 tokens, count * width bytes; then, when flagged, the loss mask: ceil(count / 8)
 *      bytes, bit i % 8 of byte i / 8 set when token i counts in the loss as a target
 *      (the sampler and the evaluation give the other targets as -1, which the
 *      cross-entropy ignores); nothing after. Files without a mask or records (every
 *      `moe data prepare` file) train exactly as before these fields existed. */
#ifndef MOE_MOE_DATA_H
#define MOE_MOE_DATA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/status.h"
#include "moe/model/tokenizer.h"

#define MOE_TOKEN_FILE_HEADER_BYTES 64

typedef struct moe_data_summary {
    int vocab_size;
    uint64_t train_tokens, val_tokens;
    uint64_t train_bytes, val_bytes; /* source text bytes of each split */
    double train_bytes_per_token, val_bytes_per_token;
    /* Cross-entropy of the val tokens under the train split's unigram token model with
     * add-one smoothing, p(t) = (count_t + 1) / (train_tokens + vocab), in bits, divided
     * by val_bytes: the bits per byte a model must beat to have learnt anything beyond
     * token frequencies. */
    double unigram_bpb;
} moe_data_summary;

/* Reads the text files (each one a document; concatenated in the given order, with a
 * blank line added after a file that does not end in a newline), splits the text so that
 * the last ~val_fraction of its bytes (0 < val_fraction < 1) is validation, cutting at
 * the paragraph boundary (a blank line) nearest that point (or the nearest line break,
 * or the exact point when there is neither), tokenizes both parts and writes
 * out_dir/train.bin and out_dir/val.bin (out_dir is created when missing; each file is
 * written to a temp file, then renamed). `summary` may be NULL. */
moe_status moe_data_prepare(const char *const *input_paths, int n_inputs, const moe_tokenizer *tok,
                            double val_fraction, const char *out_dir, moe_data_summary *summary);

/* Text -> ids for moe_data_prepare_with: our tokenizers (moe_data_prepare) or any other,
 * e.g. a hub folder's tokenizer.json; ids must be below `vocab`. */
typedef struct moe_text_encoder {
    moe_status (*encode)(void *user, const char *text, size_t len, moe_token_buf *out); /* appends to out */
    void *user;
    int vocab;
} moe_text_encoder;
moe_status moe_data_prepare_with(const char *const *input_paths, int n_inputs, const moe_text_encoder *enc,
                                 double val_fraction, const char *out_dir, moe_data_summary *summary);

/* What a token file's header says (see the layout above). */
typedef struct moe_token_file_info {
    int vocab;
    uint64_t count;       /* tokens */
    uint32_t record_len;  /* 0, or R: count is a multiple of R */
    bool has_mask;        /* a loss mask follows the tokens */
    double bytes_per_token, unigram_bpb;
    uint64_t src_bytes;
} moe_token_file_info;

/* ---- token file writer ----
 * Streams info->count tokens (and their mask bits) into `path` through path.tmp and a
 * rename: moe_token_writer_append as often as needed, then moe_token_writer_close, which
 * renames only when `ok` and exactly count tokens came (else it removes the temp file;
 * always frees the writer). `scored` is NULL without a mask, else n flags (nonzero:
 * scored). Ids below info->vocab are asserted. */
typedef struct moe_token_writer moe_token_writer;
moe_status moe_token_writer_open(const char *path, const moe_token_file_info *info, moe_token_writer **out);
moe_status moe_token_writer_append(moe_token_writer *w, const int32_t *tokens, const uint8_t *scored, size_t n);
moe_status moe_token_writer_close(moe_token_writer *w, bool ok);

/* mkdir -p */
moe_status moe_data_make_dirs(const char *dir);

/* ---- token file reader ---- */

typedef struct moe_token_file moe_token_file;

/* Opens and validates a token file (the file is memory-mapped; every token is checked to
 * be below the vocab size). Damage gives MOE_ERR_FORMAT with the path and the fault
 * (wrong magic, truncated, size mismatch, bad width, token out of range); a missing or
 * unreadable file MOE_ERR_IO. */
moe_status moe_data_open(const char *path, moe_token_file **out);
/* A text file tokenized with `tok`, held in memory with the same reader API (bytes per
 * token from the text; no unigram baseline: 0). MOE_ERR_IO when it cannot be read. */
moe_status moe_data_open_text(const char *path, const moe_tokenizer *tok, moe_token_file **out);
/* Tokens already in memory (e.g. from a hub folder's tokenizer) with the same reader API:
 * `name` for messages, ids below `vocab` (checked), text_bytes of source text (bytes per
 * token), no unigram baseline. */
moe_status moe_data_open_tokens(const char *name, const moe_token_buf *toks, int vocab, size_t text_bytes,
                                moe_token_file **out);
/* True when `path` starts with the token file magic (a file to moe_data_open). */
bool moe_data_is_token_file(const char *path);
void moe_data_close(moe_token_file *tf);

uint64_t moe_data_count(const moe_token_file *tf);
int moe_data_vocab(const moe_token_file *tf);
double moe_data_bytes_per_token(const moe_token_file *tf);
double moe_data_unigram_bpb(const moe_token_file *tf);
const char *moe_data_path(const moe_token_file *tf);
uint32_t moe_data_record_len(const moe_token_file *tf); /* 0: running text */
bool moe_data_has_mask(const moe_token_file *tf);

/* Copies tokens [start, start + n) as int32 into dst (range asserted). */
void moe_data_read(const moe_token_file *tf, uint64_t start, size_t n, int32_t *dst);

/* ---- deterministic batch sampler ---- */

/* The whole state: restoring it (moe_loader_set_state) resumes the exact batch sequence. */
typedef struct moe_loader_state {
    uint64_t seed;
    uint64_t step; /* the step that the next moe_loader_next call returns */
} moe_loader_state;

typedef struct moe_loader moe_loader;

/* A sampler of global batches of `batch_size` rows of seq_len + 1 tokens over `tf`
 * (which must outlive the loader). Row r of step s starts at a position drawn uniformly
 * from [0, count - seq_len - 1] by a counter-based hash (splitmix64) of (seed, s, r), so
 * a batch depends only on (seed, step) and not on the world size or on earlier calls.
 * A file of records starts rows only at records (one drawn uniformly the same way).
 * MOE_ERR_INVALID when the file holds fewer than seq_len + 1 tokens, or has records of
 * other than seq_len + 1 tokens. */
moe_status moe_loader_create(const moe_token_file *tf, uint64_t seed, int batch_size, int seq_len,
                             moe_loader **out);
void moe_loader_free(moe_loader *l);

/* Fills this rank's rows [rank*B/dp, (rank+1)*B/dp) of the current step's global batch:
 * inputs and targets are (B/dp) x seq_len, row-major; targets are inputs shifted by one
 * token (-1 where the file's loss mask leaves a target out). Then advances to the next step. B % dp == 0 and 0 <= rank < dp are asserted.
 * Every rank of a data-parallel group calls it once per step. */
void moe_loader_next(moe_loader *l, int rank_in_dp, int dp_size, int32_t *inputs, int32_t *targets);

/* Same rows for an explicit step, without touching the loader's state. */
void moe_loader_batch(const moe_loader *l, uint64_t step, int rank_in_dp, int dp_size,
                      int32_t *inputs, int32_t *targets);

moe_loader_state moe_loader_get_state(const moe_loader *l);
void moe_loader_set_state(moe_loader *l, moe_loader_state state);

/* ---- sequential evaluation iterator ---- */

/* Non-overlapping windows from the start of the file: window w holds tokens
 * [w*T, w*T + T] (inputs the first T, targets the last T; a file of records: record w),
 * batch b holds windows [b*B, (b+1)*B). Only full batches are used, at most max_batches
 * of them (0: all). Targets are masked as the sampler's. */
typedef struct moe_eval_iter {
    const moe_token_file *file;
    int batch_size, seq_len;
    uint64_t n_batches; /* batches this iterator yields */
    uint64_t next;      /* index of the next batch */
} moe_eval_iter;

/* MOE_ERR_INVALID when the file is too short for one batch (B*T + 1 tokens, or B
 * records) or has records of other than T + 1 tokens. */
moe_status moe_eval_iter_init(moe_eval_iter *it, const moe_token_file *tf, int batch_size,
                              int seq_len, uint64_t max_batches);

/* Fills this rank's rows (as moe_loader_next) of the next batch and returns true, or
 * returns false when all n_batches were given. */
bool moe_eval_iter_next(moe_eval_iter *it, int rank_in_dp, int dp_size, int32_t *inputs,
                        int32_t *targets);
void moe_eval_iter_reset(moe_eval_iter *it);

#endif
