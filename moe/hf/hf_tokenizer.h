/* Hugging Face tokenizer.json: text <-> token ids as the `tokenizers` library computes them.
 *
 * Supported parts of the format (anything else is refused by name, with the file path):
 *  - model: BPE (merges as "a b" strings or [a, b] pairs; byte_fallback, unk_token,
 *    fuse_unk, continuing_subword_prefix, end_of_word_suffix, ignore_merges);
 *  - normalizers: Sequence, Prepend, Replace (String or Regex), NFC, NFD, NFKC, NFKD,
 *    Lowercase, Strip, StripAccents;
 *  - pre_tokenizers: ByteLevel (add_prefix_space, use_regex, trim_offsets), Split (String or
 *    Regex pattern, behavior, invert), Metaspace (replacement, prepend_scheme, split),
 *    Digits, WhitespaceSplit, Whitespace, Punctuation, Sequence;
 *  - post_processors: TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence;
 *  - decoders: ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence;
 *  - added_tokens with special, lstrip, rstrip, normalized and single_word.
 *
 * Encoding: added tokens are split out first (leftmost, then longest match; tokens with
 * normalized=false on the raw text, the others on the normalised text), the rest is
 * normalised, pre-tokenised (regexes run by PCRE2 in UTF + UCP mode, JIT-compiled) and each
 * pre-token is merged by rank with a heap over a linked list of symbols; the ids of every
 * pre-token of up to 256 bytes are cached. Without a pre-tokenizer (SentencePiece style) the
 * text is one word, cut before each U+2581 when the vocabulary shows no merge can span that
 * cut. Invalid UTF-8 in the input is not refused: each maximal invalid sequence becomes U+FFFD
 * (as Python's errors="replace" decoding does) before encoding.
 *
 * A tokenizer is immutable after loading except for its pre-token cache, so encode calls on
 * one tokenizer must not run concurrently (load one per thread instead). */
#ifndef MOE_HF_HF_TOKENIZER_H
#define MOE_HF_HF_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/status.h"
#include "moe/model/tokenizer.h"

typedef struct moe_hf_tokenizer moe_hf_tokenizer;

/* Loads a tokenizer.json file. Errors (I/O, malformed JSON, unsupported component) name
 * the path and the offending key or type. */
moe_status moe_hf_tokenizer_load(moe_hf_tokenizer **out, const char *json_path);
/* Loads DIR/tokenizer.json plus, when present, DIR/tokenizer_config.json (bos/eos tokens,
 * clean_up_tokenization_spaces, the chat_template field) and DIR/chat_template.jinja. */
moe_status moe_hf_tokenizer_load_dir(moe_hf_tokenizer **out, const char *dir);
void moe_hf_tokenizer_free(moe_hf_tokenizer *tok);

/* Appends the ids of `text` (len bytes) to `out`. add_special: run the post-processor
 * (e.g. prepend <s>), as transformers' tokenizer(text) does. */
moe_status moe_hf_encode(moe_hf_tokenizer *tok, const char *text, size_t len, bool add_special,
                         moe_token_buf *out);

/* ids -> text (NUL-terminated, malloc'd into *text). skip_special drops added tokens marked
 * special. Ids outside the vocabulary are MOE_ERR_INVALID. */
moe_status moe_hf_decode(const moe_hf_tokenizer *tok, const int32_t *ids, size_t n, bool skip_special,
                         char **text);

/* Vocabulary size (the largest id + 1, added tokens included). */
size_t moe_hf_vocab_size(const moe_hf_tokenizer *tok);
/* The id of a token string (vocab or added), or -1. */
int32_t moe_hf_token_to_id(const moe_hf_tokenizer *tok, const char *token);
/* The token string of an id, or NULL. */
const char *moe_hf_id_to_token(const moe_hf_tokenizer *tok, int32_t id);
/* From tokenizer_config.json (NULL when absent): bos/eos token strings and the chat template
 * source (chat_template.jinja, else the config's chat_template field: a string, or the
 * entry named "default" of a list of {name, template}). */
const char *moe_hf_bos_token(const moe_hf_tokenizer *tok);
const char *moe_hf_eos_token(const moe_hf_tokenizer *tok);
const char *moe_hf_chat_template(const moe_hf_tokenizer *tok);
/* Where the chat template came from (a file path), for error messages. */
const char *moe_hf_chat_template_origin(const moe_hf_tokenizer *tok);

/* Renders the chat template (parsed when the directory was loaded, so an unsupported construct
 * fails the load) as transformers' apply_chat_template(messages, tokenize=False) does: the
 * variables are messages (messages_json: a JSON array), add_generation_prompt, tools and
 * documents (none), the special tokens of tokenizer_config.json (bos_token, eos_token, unk_token,
 * pad_token) and the members of extra_json (a JSON object, may be NULL: tools, enable_thinking,
 * ...). MOE_ERR_INVALID when the tokenizer has no chat template or the JSON is malformed. */
moe_status moe_hf_apply_chat_template(const moe_hf_tokenizer *tok, const char *messages_json,
                                      bool add_generation_prompt, const char *extra_json, char **text);

/* Streaming decode for a server: push ids one at a time; each push returns (malloc'd into
 * *piece, possibly "") only text made of complete UTF-8 characters that no later id can
 * change. finish returns what is left. Concatenating every piece equals decode(all ids). */
typedef struct moe_hf_stream {
    const moe_hf_tokenizer *tok;
    bool skip_special;
    int32_t *ids;
    size_t n, cap;
    size_t prefix, read; /* ids[prefix, read) were decoded already; ids[read..] not yet shown */
} moe_hf_stream;

void moe_hf_stream_init(moe_hf_stream *s, const moe_hf_tokenizer *tok, bool skip_special);
moe_status moe_hf_stream_push(moe_hf_stream *s, int32_t id, char **piece);
moe_status moe_hf_stream_finish(moe_hf_stream *s, char **piece);
void moe_hf_stream_free(moe_hf_stream *s);

/* Encoding speed on the calling thread. The first round starts from an empty pre-token cache
 * (cold); the later rounds find it filled (warm: the best of them is reported). by_line: one
 * encode call per line, as a server sees short requests. */
typedef struct moe_hf_bench {
    size_t tokens;
    double cold_tokens_per_s, cold_bytes_per_s;
    double warm_tokens_per_s, warm_bytes_per_s; /* 0 when rounds < 2 */
} moe_hf_bench;

moe_status moe_hf_bench_encode(moe_hf_tokenizer *tok, const char *text, size_t len, int rounds, bool by_line,
                               moe_hf_bench *out);

#endif
