/* Tests of the Hugging Face tokenizer.json reader: every case of every fixture (encode ids and
 * decoded text as transformers gives them), the streaming decoder, invalid UTF-8 input, other
 * components of the format built from a fixture's vocabulary, and the load errors. */
#include "tests/harness/testlib.h"
#include "tests/harness/files.h"

#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "moe/hf/hf_tokenizer.h"

static const char *FIXTURES[] = {"mixtral-tiny", "olmoe-tiny", "qwen2-moe-tiny", "qwen3-moe-tiny",
                                 "deepseek-v3-tiny"};
#define N_FIXTURES (sizeof FIXTURES / sizeof FIXTURES[0])

/* ---------- helpers ---------- */

static moe_hf_tokenizer *load_fixture(const char *name) {
    char rel[256];
    snprintf(rel, sizeof rel, "tests/fixtures/hf/%s", name);
    moe_hf_tokenizer *tok = NULL;
    moe_status st = moe_hf_tokenizer_load_dir(&tok, moe_test_source_path(rel));
    if (st != MOE_OK) fprintf(stderr, "\n  %s\n", moe_last_error());
    CU_ASSERT_EQUAL_FATAL(st, MOE_OK);
    return tok;
}

static bool ids_equal(const moe_token_buf *got, const cJSON *want, const char *what) {
    bool ok = got->len == (size_t)cJSON_GetArraySize(want);
    size_t i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, want) {
        if (!ok) break;
        ok = got->data[i++] == (int32_t)e->valuedouble;
    }
    if (!ok) {
        fprintf(stderr, "\n  %s\n  got :", what);
        for (size_t k = 0; k < got->len; k++) fprintf(stderr, " %d", got->data[k]);
        fprintf(stderr, "\n  want:");
        cJSON_ArrayForEach(e, want) fprintf(stderr, " %d", (int)e->valuedouble);
        fprintf(stderr, "\n");
    }
    return ok;
}

static int32_t *json_ids(const cJSON *arr, size_t *n) {
    *n = (size_t)cJSON_GetArraySize(arr);
    int32_t *ids = malloc((*n + 1) * sizeof *ids);
    size_t i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, arr) ids[i++] = (int32_t)e->valuedouble;
    return ids;
}

/* Writes text to a fresh file in the scratch directory; returns its path. */
static const char *write_file(const char *name, const char *text) {
    static char path[700];
    snprintf(path, sizeof path, "%s/%s", moe_test_scratch_dir("hf_tokenizer"), name);
    moe_test_write_file(path, text, strlen(text));
    return path;
}

/* ---------- fixture cases ---------- */

static void test_fixture_cases(void) {
    for (size_t f = 0; f < N_FIXTURES; f++) {
        moe_hf_tokenizer *tok = load_fixture(FIXTURES[f]);
        char rel[256];
        snprintf(rel, sizeof rel, "tests/fixtures/hf/%s/tokenizer_cases.json", FIXTURES[f]);
        cJSON *cases = moe_test_load_json(rel);
        CU_ASSERT_TRUE(cJSON_GetArraySize(cases) >= 8);
        const cJSON *c;
        cJSON_ArrayForEach(c, cases) {
            const char *text = cJSON_GetObjectItem(c, "text")->valuestring;
            const cJSON *want = cJSON_GetObjectItem(c, "ids");
            char what[400];
            snprintf(what, sizeof what, "%s encode \"%.300s\"", FIXTURES[f], text);
            moe_token_buf ids = {0};
            CU_ASSERT_EQUAL(moe_hf_encode(tok, text, strlen(text), true, &ids), MOE_OK);
            CU_ASSERT_TRUE(ids_equal(&ids, want, what));
            moe_token_buf_free(&ids);
            size_t n;
            int32_t *wid = json_ids(want, &n);
            char *dec = NULL;
            CU_ASSERT_EQUAL(moe_hf_decode(tok, wid, n, true, &dec), MOE_OK);
            const char *want_dec = cJSON_GetObjectItem(c, "decoded")->valuestring;
            CU_ASSERT_STRING_EQUAL(dec, want_dec);
            if (strcmp(dec, want_dec)) fprintf(stderr, "\n  %s decode: \"%s\" != \"%s\"\n", FIXTURES[f], dec, want_dec);
            free(dec);
            free(wid);
        }
        cJSON_Delete(cases);
        moe_hf_tokenizer_free(tok);
    }
}

/* A second encode of the same text (now from the word cache) gives the same ids. */
static void test_cache_consistent(void) {
    moe_hf_tokenizer *tok = load_fixture("olmoe-tiny");
    const char *text = "the the the cat, the cat's hat; the THE tHe 12 12 12";
    moe_token_buf a = {0}, b = {0};
    CU_ASSERT_EQUAL(moe_hf_encode(tok, text, strlen(text), false, &a), MOE_OK);
    CU_ASSERT_EQUAL(moe_hf_encode(tok, text, strlen(text), false, &b), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(a.len, b.len);
    CU_ASSERT_EQUAL(memcmp(a.data, b.data, a.len * sizeof *a.data), 0);
    CU_ASSERT_TRUE(a.len > 10);
    moe_token_buf_free(&a);
    moe_token_buf_free(&b);
    moe_hf_tokenizer_free(tok);
}

/* ---------- streaming decode ---------- */

static void stream_check(moe_hf_tokenizer *tok, const char *text, bool skip) {
    moe_token_buf ids = {0};
    CU_ASSERT_EQUAL_FATAL(moe_hf_encode(tok, text, strlen(text), true, &ids), MOE_OK);
    char *full = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_hf_decode(tok, ids.data, ids.len, skip, &full), MOE_OK);
    moe_hf_stream s;
    moe_hf_stream_init(&s, tok, skip);
    size_t cap = strlen(full) + 64, used = 0;
    char *joined = calloc(cap, 1);
    for (size_t i = 0; i <= ids.len; i++) {
        char *piece = NULL;
        moe_status st = i < ids.len ? moe_hf_stream_push(&s, ids.data[i], &piece) : moe_hf_stream_finish(&s, &piece);
        CU_ASSERT_EQUAL_FATAL(st, MOE_OK);
        CU_ASSERT_PTR_NULL(strstr(piece, "\xEF\xBF\xBD")); /* never half a character */
        size_t k = strlen(piece);
        CU_ASSERT_TRUE_FATAL(used + k < cap);
        memcpy(joined + used, piece, k);
        used += k;
        free(piece);
    }
    CU_ASSERT_STRING_EQUAL(joined, full);
    free(joined);
    free(full);
    moe_hf_stream_free(&s);
    moe_token_buf_free(&ids);
}

static void test_stream_decode(void) {
    const char *text = "Unicode: café naïve Ærøskøbing — “quotes” … 東京 🙂🚀 and <s> more </s>";
    for (size_t f = 0; f < 2; f++) {
        moe_hf_tokenizer *tok = load_fixture(FIXTURES[f]);
        stream_check(tok, text, false);
        stream_check(tok, "plain words, spaces   and\nnewlines", true);
        moe_hf_tokenizer_free(tok);
    }
    /* The pieces of a 4-byte character held back until its last byte token arrives. */
    moe_hf_tokenizer *tok = load_fixture("mixtral-tiny");
    int32_t bytes[] = {3 + 0xF0, 3 + 0x9F, 3 + 0x99, 3 + 0x82}; /* <0xF0><0x9F><0x99><0x82> = U+1F642 */
    moe_hf_stream s;
    moe_hf_stream_init(&s, tok, false);
    for (int i = 0; i < 4; i++) {
        char *piece = NULL;
        CU_ASSERT_EQUAL(moe_hf_stream_push(&s, bytes[i], &piece), MOE_OK);
        CU_ASSERT_STRING_EQUAL(piece, i < 3 ? "" : "\xF0\x9F\x99\x82");
        free(piece);
    }
    moe_hf_stream_free(&s);
    moe_hf_tokenizer_free(tok);
}

/* ---------- invalid input ---------- */

static void test_invalid_utf8(void) {
    for (size_t f = 0; f < 2; f++) {
        moe_hf_tokenizer *tok = load_fixture(FIXTURES[f]);
        const char bad[] = "ab\xff" "cd\xe6\x9d" " ef\xc0\x80";
        const char fixed[] = "ab\xEF\xBF\xBD" "cd\xEF\xBF\xBD" " ef\xEF\xBF\xBD\xEF\xBF\xBD";
        moe_token_buf a = {0}, b = {0};
        CU_ASSERT_EQUAL(moe_hf_encode(tok, bad, sizeof bad - 1, false, &a), MOE_OK);
        CU_ASSERT_EQUAL(moe_hf_encode(tok, fixed, sizeof fixed - 1, false, &b), MOE_OK);
        CU_ASSERT_EQUAL_FATAL(a.len, b.len);
        CU_ASSERT_TRUE(a.len > 0);
        CU_ASSERT_EQUAL(memcmp(a.data, b.data, a.len * sizeof *a.data), 0);
        moe_token_buf_free(&a);
        moe_token_buf_free(&b);
        int32_t out_of_range = (int32_t)moe_hf_vocab_size(tok);
        char *text = NULL;
        CU_ASSERT_EQUAL(moe_hf_decode(tok, &out_of_range, 1, false, &text), MOE_ERR_INVALID);
        CU_ASSERT_PTR_NULL(text);
        moe_hf_tokenizer_free(tok);
    }
}

/* Random text: arbitrary bytes encode and decode without error; valid UTF-8 without markup
 * round-trips exactly through both fixture kinds (byte-level and byte-fallback are lossless). */
static void test_random_text(void) {
    static const char *pieces[] = {"a", "Z", " ", "  ", "\t", "\n", "\r\n", "7", "42", "'s", "'", ".", ",", "-",
                                   "\xC3\xA9", "\xE6\x9D\xB1", "\xF0\x9F\x99\x82", "\xE2\x80\x94", "\x01",
                                   "\x7F", "\xC2\xA0", "\xE3\x80\x80", "the", " of", "<", ">", "|", "<s", "</s>",
                                   "<|im_start|>", "\xFF", "\xC3", "\xE6\x9D", "\x80"};
    const size_t np = sizeof pieces / sizeof pieces[0];
    const size_t markup = 24; /* pieces[markup..] are markup or invalid UTF-8 */
    uint64_t state = 7;
    for (size_t f = 0; f < 2; f++) {
        moe_hf_tokenizer *tok = load_fixture(FIXTURES[f]);
        int roundtrips = 0;
        for (int iter = 0; iter < 400; iter++) {
            char text[600];
            size_t n = 0;
            bool clean = iter % 2 == 0;
            int k = 1 + iter % 60;
            for (int i = 0; i < k; i++) {
                state = state * 6364136223846793005ULL + 1442695040888963407ULL;
                const char *p = pieces[(state >> 33) % (clean ? markup : np)];
                if (n + strlen(p) >= sizeof text) break;
                memcpy(text + n, p, strlen(p));
                n += strlen(p);
            }
            text[n] = '\0';
            moe_token_buf ids = {0};
            CU_ASSERT_EQUAL_FATAL(moe_hf_encode(tok, text, n, !clean, &ids), MOE_OK);
            char *back = NULL;
            CU_ASSERT_EQUAL_FATAL(moe_hf_decode(tok, ids.data, ids.len, false, &back), MOE_OK);
            if (clean) {
                bool ok = !strcmp(back, text);
                if (!ok) fprintf(stderr, "\n  %s: [%s] came back as [%s]\n", FIXTURES[f], text, back);
                CU_ASSERT_TRUE(ok);
                roundtrips += ok;
            }
            free(back);
            moe_token_buf_free(&ids);
        }
        CU_ASSERT_EQUAL(roundtrips, 200);
        moe_hf_tokenizer_free(tok);
    }
}

/* ---------- other components, built from a fixture's vocabulary ---------- */

/* The tokenizer of the tokenizer.json document `j`, written to `file` in the scratch directory. */
static moe_hf_tokenizer *load_document(const cJSON *j, const char *file) {
    char *text = cJSON_PrintUnformatted(j);
    const char *path = write_file(file, text);
    free(text);
    moe_hf_tokenizer *tok = NULL;
    moe_status st = moe_hf_tokenizer_load(&tok, path);
    if (st != MOE_OK) fprintf(stderr, "\n  %s\n", moe_last_error());
    CU_ASSERT_EQUAL_FATAL(st, MOE_OK);
    return tok;
}

/* olmoe-tiny's tokenizer.json with its component `key` replaced by `json`. */
static moe_hf_tokenizer *olmoe_with(const char *file, const char *key, const char *json) {
    cJSON *j = moe_test_load_json("tests/fixtures/hf/olmoe-tiny/tokenizer.json");
    cJSON_ReplaceItemInObject(j, key, cJSON_Parse(json));
    moe_hf_tokenizer *tok = load_document(j, file);
    cJSON_Delete(j);
    return tok;
}

/* mixtral-tiny with its normalizer moved into a Metaspace pre-tokenizer (prepend first,
 * splitting at the replacement character or not). */
static moe_hf_tokenizer *mixtral_metaspace(const char *file, bool split) {
    cJSON *j = moe_test_load_json("tests/fixtures/hf/mixtral-tiny/tokenizer.json");
    cJSON_ReplaceItemInObject(j, "normalizer", cJSON_CreateNull());
    char pre[160];
    snprintf(pre, sizeof pre, "{\"type\":\"Metaspace\",\"replacement\":\"\\u2581\",\"prepend_scheme\":\"first\","
             "\"split\":%s}", split ? "true" : "false");
    cJSON_ReplaceItemInObject(j, "pre_tokenizer", cJSON_Parse(pre));
    moe_hf_tokenizer *tok = load_document(j, file);
    cJSON_Delete(j);
    return tok;
}

static bool same_ids(moe_hf_tokenizer *a, moe_hf_tokenizer *b, const char *text) {
    moe_token_buf x = {0}, y = {0};
    bool ok = moe_hf_encode(a, text, strlen(text), false, &x) == MOE_OK &&
              moe_hf_encode(b, text, strlen(text), false, &y) == MOE_OK && x.len == y.len && x.len > 0 &&
              memcmp(x.data, y.data, x.len * sizeof *x.data) == 0;
    if (!ok) fprintf(stderr, "\n  differ on \"%s\" (%zu vs %zu ids)\n", text, x.len, y.len);
    moe_token_buf_free(&x);
    moe_token_buf_free(&y);
    return ok;
}

/* Qwen2's pre-tokenizer (Split with its regex, then ByteLevel without a regex) cuts plain words
 * as GPT-2's does, so the ids match; on digits it cuts one per piece. */
static void test_split_regex_pretokenizer(void) {
    moe_hf_tokenizer *base = load_fixture("olmoe-tiny");
    moe_hf_tokenizer *qwen = olmoe_with(
        "qwen.json", "pre_tokenizer",
        "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":"
        "\"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}| ?[^\\\\s\\\\p{L}\\\\p{N}]+"
        "[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+\"},\"behavior\":\"Isolated\",\"invert\":false},"
        "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"trim_offsets\":false,\"use_regex\":false}]}");
    CU_ASSERT_TRUE(same_ids(base, qwen, "The jury said it did find that the city's election was conducted."));
    moe_token_buf ids = {0};
    CU_ASSERT_EQUAL(moe_hf_encode(qwen, "2026", 4, false, &ids), MOE_OK);
    CU_ASSERT_EQUAL(ids.len, 4); /* one piece per digit: no merge can join them */
    moe_token_buf_free(&ids);
    moe_hf_tokenizer_free(qwen);
    moe_hf_tokenizer_free(base);
}

/* A \uXXXX escape in a Split regex (DeepSeek-V3 writes its CJK ranges so) is understood. */
static void test_split_unicode_escape(void) {
    moe_hf_tokenizer *tok = olmoe_with(
        "cjk.json", "pre_tokenizer",
        "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":"
        "\"[\\\\u4e00-\\\\u9fa5]+\"},\"behavior\":\"Isolated\",\"invert\":false},"
        "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"trim_offsets\":false,\"use_regex\":true}]}");
    moe_hf_tokenizer *base = load_fixture("olmoe-tiny");
    CU_ASSERT_TRUE(same_ids(base, tok, "plain text without any CJK at all"));
    moe_hf_tokenizer_free(base);
    moe_hf_tokenizer_free(tok);
}

/* Literal patterns (a Split {"String": ...}, Metaspace's split) compile: a Split at " " that
 * keeps the space with the next word cuts plain words as the GPT-2 regex does (same ids), and
 * mixtral-tiny with a splitting Metaspace pre-tokenizer decodes back to its text. */
static void test_literal_patterns(void) {
    moe_hf_tokenizer *base = load_fixture("olmoe-tiny");
    moe_hf_tokenizer *spaces = olmoe_with(
        "split-string.json", "pre_tokenizer",
        "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"String\":\" \"},"
        "\"behavior\":\"MergedWithNext\",\"invert\":false},"
        "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"trim_offsets\":false,\"use_regex\":false}]}");
    CU_ASSERT_TRUE(same_ids(base, spaces, "The jury said it did find that the city election was conducted"));
    moe_hf_tokenizer_free(spaces);
    moe_hf_tokenizer_free(base);

    moe_hf_tokenizer *meta = mixtral_metaspace("meta-split.json", true);
    const char *say = "The jury said it did find that";
    moe_token_buf ids = {0};
    char *back = NULL;
    CU_ASSERT_EQUAL(moe_hf_encode(meta, say, strlen(say), false, &ids), MOE_OK);
    CU_ASSERT_EQUAL(moe_hf_decode(meta, ids.data, ids.len, false, &back), MOE_OK);
    CU_ASSERT_STRING_EQUAL(back ? back : "", say);
    free(back);
    moe_token_buf_free(&ids);
    moe_hf_tokenizer_free(meta);
}

/* mixtral-tiny with its normalizer moved into a Metaspace pre-tokenizer (prepend first, no
 * split) gives the same pieces, so the same ids. */
static void test_metaspace_pretokenizer(void) {
    moe_hf_tokenizer *meta = mixtral_metaspace("meta.json", false), *base = load_fixture("mixtral-tiny");
    CU_ASSERT_TRUE(same_ids(base, meta, "The jury said it did find that the city's election was conducted."));
    CU_ASSERT_TRUE(same_ids(base, meta, "  leading spaces, trailing spaces   "));
    moe_hf_tokenizer_free(meta);
    moe_hf_tokenizer_free(base);
}

static bool leading_meta_only(const char *tok) {
    while (!strncmp(tok, "\xE2\x96\x81", 3)) tok += 3;
    return strstr(tok, "\xE2\x96\x81") == NULL;
}

/* mixtral-tiny's vocabulary without the tokens that hold "\xE2\x96\x81" after another
 * character (as SentencePiece vocabularies are), and the merges that need them. Its text is
 * then cut into words before encoding; the ids must equal those of the same tokenizer made to
 * merge the text whole (a Split that never matches keeps it one piece). */
static void test_sentencepiece_word_cut(void) {
    cJSON *j = moe_test_load_json("tests/fixtures/hf/mixtral-tiny/tokenizer.json");
    cJSON *model = cJSON_GetObjectItem(j, "model"), *vocab = cJSON_GetObjectItem(model, "vocab");
    cJSON *merges = cJSON_GetObjectItem(model, "merges");
    int removed = 0;
    for (cJSON *e = vocab->child, *nx; e; e = nx) {
        nx = e->next;
        if (!leading_meta_only(e->string)) cJSON_DeleteItemFromObject(vocab, e->string), removed++;
    }
    for (cJSON *m = merges->child, *nx; m; m = nx) {
        nx = m->next;
        char joined[256];
        const char *a = m->child->valuestring, *b = m->child->next->valuestring;
        snprintf(joined, sizeof joined, "%s%s", a, b);
        if (!leading_meta_only(a) || !leading_meta_only(b) || !leading_meta_only(joined))
            cJSON_DetachItemViaPointer(merges, m), cJSON_Delete(m);
    }
    CU_ASSERT_TRUE(removed > 10);
    moe_hf_tokenizer *cut = load_document(j, "cut.json");
    cJSON_ReplaceItemInObject(j, "pre_tokenizer", cJSON_Parse("{\"type\":\"Split\",\"pattern\":{\"Regex\":"
                                                             "\"\\\\x{10FFFF}\"},\"behavior\":\"Isolated\"}"));
    moe_hf_tokenizer *whole = load_document(j, "whole.json");
    cJSON_Delete(j);
    cJSON *cases = moe_test_load_json("tests/fixtures/hf/mixtral-tiny/tokenizer_cases.json");
    const cJSON *c;
    cJSON_ArrayForEach(c, cases) {
        const char *t = cJSON_GetObjectItem(c, "text")->valuestring;
        if (*t) CU_ASSERT_TRUE(same_ids(cut, whole, t));
    }
    CU_ASSERT_TRUE(same_ids(cut, whole, "  many   spaces\u2581and a \xE2\x96\x81\xE2\x96\x81 literal"));
    cJSON_Delete(cases);
    moe_hf_tokenizer_free(cut);
    moe_hf_tokenizer_free(whole);
}

/* NFKC folds the ligature "ﬁ" to "fi" and Lowercase folds case before the model sees them. */
static void test_normalizers(void) {
    moe_hf_tokenizer *base = load_fixture("olmoe-tiny");
    moe_hf_tokenizer *nrm = olmoe_with("nfkc.json", "normalizer",
                                       "{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"NFKC\"},"
                                       "{\"type\":\"Lowercase\"},{\"type\":\"Strip\",\"strip_left\":true,"
                                       "\"strip_right\":true}]}");
    moe_token_buf a = {0}, b = {0};
    const char *in = "  \xEF\xAC\x81nd THE Jury  ", *want = "find the jury";
    CU_ASSERT_EQUAL(moe_hf_encode(nrm, in, strlen(in), false, &a), MOE_OK);
    CU_ASSERT_EQUAL(moe_hf_encode(base, want, strlen(want), false, &b), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(a.len, b.len);
    CU_ASSERT_EQUAL(memcmp(a.data, b.data, a.len * sizeof *a.data), 0);
    moe_token_buf_free(&a);
    moe_token_buf_free(&b);
    moe_hf_tokenizer_free(nrm);
    /* Replace with a regex: runs of spaces become one */
    nrm = olmoe_with("replace.json", "normalizer",
                     "{\"type\":\"Replace\",\"pattern\":{\"Regex\":\" {2,}\"},\"content\":\" \"}");
    CU_ASSERT_TRUE(same_ids(nrm, base, "the jury said it did"));
    moe_token_buf x = {0}, y = {0};
    CU_ASSERT_EQUAL(moe_hf_encode(nrm, "the   jury  said", 16, false, &x), MOE_OK);
    CU_ASSERT_EQUAL(moe_hf_encode(base, "the jury said", 13, false, &y), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(x.len, y.len);
    CU_ASSERT_EQUAL(memcmp(x.data, y.data, x.len * sizeof *x.data), 0);
    moe_token_buf_free(&x);
    moe_token_buf_free(&y);
    moe_hf_tokenizer_free(nrm);
    moe_hf_tokenizer_free(base);
}

/* Added tokens: longest match first, lstrip/rstrip eat the spaces around, single_word only
 * matches a whole word, and skip_special drops only special ones. */
static void test_added_token_options(void) {
    moe_hf_tokenizer *tok = olmoe_with(
        "added.json", "added_tokens",
        "[{\"id\":0,\"content\":\"<|endoftext|>\",\"special\":true,\"normalized\":false},"
        "{\"id\":600,\"content\":\"<|a|>\",\"special\":true,\"lstrip\":true,\"rstrip\":true,\"normalized\":false},"
        "{\"id\":601,\"content\":\"<|a|>b\",\"special\":false,\"normalized\":false},"
        "{\"id\":602,\"content\":\"cat\",\"special\":false,\"single_word\":true,\"normalized\":true}]");
    moe_hf_tokenizer *base = load_fixture("olmoe-tiny");
    moe_token_buf a = {0}, b = {0};
    const char *text = "x  <|a|>  y<|a|>b concat cat";
    CU_ASSERT_EQUAL(moe_hf_encode(tok, text, strlen(text), false, &a), MOE_OK);
    CU_ASSERT_EQUAL(moe_hf_encode(base, "x", 1, false, &b), MOE_OK);
    CU_ASSERT_EQUAL(moe_hf_encode(base, "y", 1, false, &b), MOE_OK);
    CU_ASSERT_EQUAL(moe_hf_encode(base, " concat ", 8, false, &b), MOE_OK);
    /* want: x <|a|> y <|a|>b [ concat ] cat */
    CU_ASSERT_TRUE_FATAL(a.len >= 6);
    CU_ASSERT_EQUAL(a.data[0], b.data[0]);
    CU_ASSERT_EQUAL(a.data[1], 600);
    CU_ASSERT_EQUAL(a.data[2], b.data[1]);
    CU_ASSERT_EQUAL(a.data[3], 601);
    CU_ASSERT_EQUAL(a.data[a.len - 1], 602);
    CU_ASSERT_EQUAL(a.len, 4 + (b.len - 2) + 1);
    char *dec = NULL;
    CU_ASSERT_EQUAL(moe_hf_decode(tok, a.data, a.len, true, &dec), MOE_OK);
    CU_ASSERT_STRING_EQUAL(dec, "xy<|a|>b concat cat");
    free(dec);
    moe_token_buf_free(&a);
    moe_token_buf_free(&b);
    moe_hf_tokenizer_free(tok);
    moe_hf_tokenizer_free(base);
}

/* ---------- load errors ---------- */

static void expect_load_error(const char *file, const char *text, moe_status code, const char *part) {
    const char *path = write_file(file, text);
    moe_hf_tokenizer *tok = (moe_hf_tokenizer *)1;
    CU_ASSERT_EQUAL(moe_hf_tokenizer_load(&tok, path), code);
    CU_ASSERT_PTR_NULL(tok);
    const char *msg = moe_last_error();
    bool ok = strstr(msg, path) && strstr(msg, part);
    if (!ok) fprintf(stderr, "\n  message: %s\n  lacks %s or %s\n", msg, path, part);
    CU_ASSERT_TRUE(ok);
}

static void test_load_errors(void) {
    expect_load_error("malformed.json", "{\"model\": {\"type\": \"BPE\",\n \"vocab\": {\"a\": 0,, }}}",
                      MOE_ERR_FORMAT, ":2:");
    expect_load_error("wordpiece.json", "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}", MOE_ERR_UNSUPPORTED,
                      "model type \"WordPiece\"");
    expect_load_error("precompiled.json",
                      "{\"normalizer\": {\"type\": \"Precompiled\"}, \"model\": {\"type\": \"BPE\", \"vocab\": "
                      "{\"a\": 0}, \"merges\": []}}",
                      MOE_ERR_UNSUPPORTED, "normalizer type \"Precompiled\"");
    expect_load_error("badmerge.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a b\"]}}",
                      MOE_ERR_FORMAT, "merge 0");
    expect_load_error("badregex.json",
                      "{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(a\"}}, \"model\": "
                      "{\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}",
                      MOE_ERR_FORMAT, "does not compile");
    /* found by fuzzing: each of these loaded, then failed later (an endless decode, ids outside
     * the vocabulary, a pattern run on invalid UTF-8, 2 GB of id table for a 60-byte file, an
     * undefined float-to-int conversion) */
    expect_load_error("empty-metaspace.json",
                      "{\"decoder\": {\"type\": \"Metaspace\", \"replacement\": \"\"}, \"model\": "
                      "{\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}",
                      MOE_ERR_FORMAT, "replacement");
    expect_load_error("empty-strip.json",
                      "{\"decoder\": {\"type\": \"Strip\", \"content\": \"\", \"start\": 2000000000}, \"model\": "
                      "{\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}",
                      MOE_ERR_FORMAT, "Strip decoder");
    expect_load_error("post-id.json",
                      "{\"post_processor\": {\"type\": \"BertProcessing\", \"cls\": [\"x\", 7], \"sep\": [\"a\", 0]}, "
                      "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}",
                      MOE_ERR_FORMAT, "id 7");
    expect_load_error("utf8.json",
                      "{\"normalizer\": {\"type\": \"Prepend\", \"prepend\": \"\xff\"}, \"model\": "
                      "{\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}",
                      MOE_ERR_FORMAT, "UTF-8");
    expect_load_error("sparse-id.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 200000000}, \"merges\": []}}",
                      MOE_ERR_FORMAT, "beyond the 1 entries");
    expect_load_error("huge-id.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 1e300}, \"merges\": []}}",
                      MOE_ERR_FORMAT, "not a token id");
    /* 14 chained Replace steps, each making a space four: encoding refuses the 4^14-fold text
     * by name instead of running out of memory; other texts still encode */
    {
        cJSON *j = moe_test_load_json("tests/fixtures/hf/olmoe-tiny/tokenizer.json"), *seq = cJSON_CreateArray();
        for (int i = 0; i < 14; i++)
            cJSON_AddItemToArray(seq, cJSON_Parse("{\"type\":\"Replace\",\"pattern\":{\"String\":\" \"},"
                                                  "\"content\":\"    \"}"));
        cJSON *norm = cJSON_CreateObject();
        cJSON_AddStringToObject(norm, "type", "Sequence");
        cJSON_AddItemToObject(norm, "normalizers", seq);
        cJSON_ReplaceItemInObject(j, "normalizer", norm);
        char *text = cJSON_PrintUnformatted(j);
        cJSON_Delete(j);
        moe_hf_tokenizer *grow = NULL;
        CU_ASSERT_EQUAL_FATAL(moe_hf_tokenizer_load(&grow, write_file("grow.json", text)), MOE_OK);
        free(text);
        moe_token_buf ids = {0};
        CU_ASSERT_EQUAL(moe_hf_encode(grow, "a few words", 11, false, &ids), MOE_ERR_FORMAT);
        CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "normalizers"));
        CU_ASSERT_EQUAL(moe_hf_encode(grow, "one", 3, false, &ids), MOE_OK);
        CU_ASSERT_TRUE(ids.len > 0);
        moe_token_buf_free(&ids);
        moe_hf_tokenizer_free(grow);
    }
    moe_hf_tokenizer *tok = NULL;
    CU_ASSERT_EQUAL(moe_hf_tokenizer_load(&tok, "/nonexistent/tokenizer.json"), MOE_ERR_IO);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "/nonexistent/tokenizer.json"));
}

/* ---------- speed ---------- */

/* Encoding speed on about 1 MB of the fixture texts (repeated with a counter so the word cache
 * does not see only a handful of words); printed, and must be positive. */
static void test_bench(void) {
    cJSON *cases = moe_test_load_json("tests/fixtures/hf/olmoe-tiny/tokenizer_cases.json");
    size_t cap = 1100000, n = 0;
    char *text = malloc(cap);
    for (int r = 0; n < 1000000; r++) {
        const cJSON *c;
        cJSON_ArrayForEach(c, cases) {
            n += (size_t)snprintf(text + n, cap - n, "%s %d\n", cJSON_GetObjectItem(c, "text")->valuestring, r);
        }
    }
    cJSON_Delete(cases);
    for (size_t f = 0; f < 2; f++) {
        moe_hf_tokenizer *tok = load_fixture(FIXTURES[f]);
        moe_hf_bench b;
        CU_ASSERT_EQUAL(moe_hf_bench_encode(tok, text, n, 3, false, &b), MOE_OK);
        CU_ASSERT_TRUE(b.cold_tokens_per_s > 0 && b.warm_tokens_per_s > 0 && b.tokens > n / 8);
        fprintf(stderr, "\n  %s: %.2f MB, cold %.0f tokens/s (%.1f MB/s), warm %.0f tokens/s (%.1f MB/s)", FIXTURES[f],
                n / 1e6, b.cold_tokens_per_s, b.cold_bytes_per_s / 1e6, b.warm_tokens_per_s, b.warm_bytes_per_s / 1e6);
        moe_hf_tokenizer_free(tok);
    }
    free(text);
}

static void register_suites(void) {
    static const moe_test_entry tests[] = {
        {"fixture cases", test_fixture_cases},
        {"cache consistent", test_cache_consistent},
        {"stream decode", test_stream_decode},
        {"invalid utf8", test_invalid_utf8},
        {"random text", test_random_text},
        {"split regex pre-tokenizer", test_split_regex_pretokenizer},
        {"split unicode escape", test_split_unicode_escape},
        {"metaspace pre-tokenizer", test_metaspace_pretokenizer},
        {"literal patterns", test_literal_patterns},
        {"normalizers", test_normalizers},
        {"sentencepiece word cut", test_sentencepiece_word_cut},
        {"added token options", test_added_token_options},
        {"load errors", test_load_errors},
        {"bench", test_bench},
        {NULL, NULL},
    };
    moe_test_add_suite("hf_tokenizer", tests);
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
