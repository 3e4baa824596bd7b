/* Tokenizers: text bytes <-> int32 token ids.
 *
 * Two kinds:
 *  - BYTE: vocab 256, token = byte value.
 *  - BPE: byte-level BPE. Ids 0..255 are the bytes; id 256+i is merge i, the
 *    concatenation of two earlier tokens. Text is first cut into pieces (see
 *    below) and merges never cross a piece boundary.
 *
 * Pre-tokenization (GPT-2-like, simplified, byte based): a piece is
 *   - an optional single leading ' ' plus a run of one class: letters (A-Z, a-z, any
 *     byte >= 0x80 so UTF-8 sequences stay whole, and an apostrophe between letters,
 *     as in "don't"), digits, or other non-space bytes;
 *   - or a run of whitespace (' ', \t, \n, \r, \v, \f); when such a run of two or more
 *     bytes ends in ' ' before a non-space byte, that last ' ' starts the next piece.
 * Pieces longer than MOE_TOKENIZER_MAX_PIECE bytes are cut into chunks of that size,
 * which bounds the per-piece merge cost on pathological input.
 *
 * Any byte string round-trips exactly: decode(encode(s)) == s, including NUL bytes,
 * invalid UTF-8 and the empty string.
 *
 * A tokenizer is immutable after creation, so one may be shared by threads. */
#ifndef MOE_MOE_TOKENIZER_H
#define MOE_MOE_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

#define MOE_TOKENIZER_MAX_PIECE 256

typedef enum moe_tokenizer_kind {
    MOE_TOKENIZER_BYTE = 0,
    MOE_TOKENIZER_BPE = 1,
} moe_tokenizer_kind;

typedef struct moe_tokenizer moe_tokenizer;

/* A growable token array. Zero-initialise it ({0}); encode appends to it;
 * moe_token_buf_free releases it. */
typedef struct moe_token_buf {
    int32_t *data;
    size_t len, cap;
} moe_token_buf;

void moe_token_buf_free(moe_token_buf *buf);

/* The byte tokenizer; NULL only when out of memory. */
moe_tokenizer *moe_tokenizer_byte(void);

/* Trains a BPE tokenizer on `text` with at most `vocab_size` tokens (256 <= vocab_size
 * <= 1<<24; 256 gives no merges). Training stops earlier when no adjacent pair occurs
 * at least twice; moe_tokenizer_vocab_size() then tells the real size.
 * Ties between equally frequent pairs go to the smallest (left id, right id).
 * The result depends only on (text, vocab_size).
 *
 * Cost: O(len) to cut the text and count the U unique pieces (hash map), then for
 * every merge only the unique pieces that contain the merged pair are rewritten and
 * their pair counts updated incrementally (a per-pair list of pieces, a lazy max-heap
 * of pair counts). Every rewrite shortens a piece, so the total rewrite work is
 * O(sum over unique pieces of length^2) plus O(H log H) heap work for H count updates;
 * memory O(len). On the 6 MB Brown text (~60k unique pieces), 32768 tokens take a
 * second or two on one core. */
moe_status moe_tokenizer_train_bpe(const char *text, size_t len, int vocab_size,
                                   moe_tokenizer **out);

/* Appends the tokens of text[0..len) to `out`. Fails only on allocation failure.
 * Long inputs use a per-call cache of piece encodings; cost is O(len) plus
 * O(piece_length^2) hash look-ups per distinct piece. */
moe_status moe_tokenizer_encode(const moe_tokenizer *tok, const char *text, size_t len,
                                moe_token_buf *out);

/* Decodes tokens into a malloc'd byte string (NUL-terminated for convenience; *out_len
 * excludes the NUL). An id outside [0, vocab) gives MOE_ERR_INVALID. */
moe_status moe_tokenizer_decode(const moe_tokenizer *tok, const int32_t *tokens, size_t n,
                                char **out, size_t *out_len);

/* The bytes of one token (not NUL-terminated), e.g. for streaming generation output.
 * `id` must be in [0, vocab) (asserted). */
const uint8_t *moe_tokenizer_token_bytes(const moe_tokenizer *tok, int32_t id, size_t *len);

/* The two tokens that token `id` merges (BPE ids >= 256); false for a byte token.
 * `id` must be in [0, vocab) (asserted). */
bool moe_tokenizer_merge_pair(const moe_tokenizer *tok, int32_t id, int32_t *left, int32_t *right);

int moe_tokenizer_vocab_size(const moe_tokenizer *tok);
moe_tokenizer_kind moe_tokenizer_get_kind(const moe_tokenizer *tok);

/* Binary file (little-endian): "MOETKZ1\0", u32 version (1), u32 kind, u32 vocab,
 * u32 merge count, u32 max piece length, then per merge u32 left, u32 right, then a
 * u32 FNV-1a checksum of everything before it. Written to a temp file and renamed.
 * Load refuses a damaged or foreign file with MOE_ERR_FORMAT naming the path and
 * the fault; an unreadable one with MOE_ERR_IO. */
moe_status moe_tokenizer_save(const moe_tokenizer *tok, const char *path);
moe_status moe_tokenizer_load(const char *path, moe_tokenizer **out);

/* The same image in memory (e.g. to store a tokenizer inside a checkpoint): to_bytes
 * gives a malloc'd copy of what save writes; from_bytes reads one, with load's checks
 * and messages, which name the image by `source` ("tokenizer file X", "checkpoint X"). */
moe_status moe_tokenizer_to_bytes(const moe_tokenizer *tok, uint8_t **out, size_t *size);
moe_status moe_tokenizer_from_bytes(const uint8_t *img, size_t size, const char *source,
                                    moe_tokenizer **out);

void moe_tokenizer_free(moe_tokenizer *tok);

#endif
