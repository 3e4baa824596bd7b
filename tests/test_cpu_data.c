/* Tests of the tokenizers (byte, BPE: round trips, determinism, a naive reference
 * trainer, files) and the data pipeline (prepare, token files, batch sampler, eval). */
#include "tests/harness/testlib.h"
#include "tests/harness/files.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "moe/train/data.h"
#include "moe/model/tokenizer.h"

static const char SAMPLE[] =
    "The river rises in the hills above the town, where the snow lies late into the spring. "
    "In the early months it runs fast and cold, carrying stones and branches down to the "
    "valley, and the people of the town watch it from the old stone bridge.\n\n"
    "By the summer the river has grown quiet. Children swim in the pools below the mill, "
    "and the miller's dog sleeps in the shade of the willows. The water is clear enough to "
    "see the fish turning over the gravel, and the farmers draw it off into their fields "
    "through narrow ditches that their grandfathers dug.\n\n"
    "\"It was not always so,\" said the old woman who kept the shop by the bridge. \"When I "
    "was a girl the river flooded every third year. The water came up to the windows of "
    "the inn, and we kept the boats tied to the church door.\" She laughed, and wiped her "
    "hands on her apron. \"Nobody believes me now.\"\n\n"
    "In 1921 the town built a dam four miles upstream. It cost 40,000 dollars, a great "
    "sum in those days, and the engineers who designed it stayed at the inn for most of a "
    "year. They measured the flow of the river every morning and every evening, and wrote "
    "the numbers in a book that is still kept in the town hall: 312, 298, 305, 1,204 after "
    "the storm of the seventh of May.\n\n"
    "The dam changed the town. The floods stopped, the mill was given a new wheel, and the "
    "fields along the river were planted with corn and beans instead of being left to the "
    "geese. Some of the older people said that the river had lost its spirit; the younger "
    "ones said that spirit was a poor thing to set against a good harvest.\n\n"
    "Today the dam is itself old. Moss grows on its face, and in the autumn the spillway "
    "roars after the rains. The engineers' book lies open in a glass case, and visitors "
    "who come to see it often walk down afterwards to the bridge, where they lean on the "
    "warm stones and look at the water going by, as the people of the town have always "
    "done, and as they will probably go on doing for a long time yet.\n\n"
    "Every spring the school takes the children up to the dam. The teacher tells them how "
    "the water is held back, how much of it the town uses, and why the spillway must never "
    "be blocked. The children drop sticks into the channel above the gate and run down the "
    "path to see them shoot out below, turning over and over in the white water. Then they "
    "eat their lunch on the grass and walk home along the river, counting the herons.\n\n"
    "At night, when the town is asleep, the river is the only sound. It goes on under the "
    "bridge and past the mill and the inn and the church, out between the fields and away "
    "to the south, where it joins a larger river, and that one a larger still, until at "
    "last all of it comes to the sea. Nobody in the town has followed it so far. They say "
    "that one day someone will, and that it would make a fine story to tell at the inn.\n";

static uint64_t rng_state = 0x1234567;
static uint32_t rng_u32(void) {
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(rng_state >> 33);
}

static void random_bytes(char *dst, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = (char)(rng_u32() & 0xff);
}

static void join(char *out, size_t n, const char *dir, const char *name) {
    int k = snprintf(out, n, "%s/%s", dir, name);
    CU_ASSERT_FATAL(k > 0 && (size_t)k < n);
}

/* encode then decode; true when the bytes come back exactly. */
static bool round_trips(const moe_tokenizer *tok, const char *s, size_t n) {
    moe_token_buf buf = {0};
    CU_ASSERT_EQUAL_FATAL(moe_tokenizer_encode(tok, s, n, &buf), MOE_OK);
    char *back;
    size_t back_len;
    CU_ASSERT_EQUAL_FATAL(moe_tokenizer_decode(tok, buf.data, buf.len, &back, &back_len), MOE_OK);
    bool same = back_len == n && memcmp(back, s, n) == 0;
    free(back);
    moe_token_buf_free(&buf);
    return same;
}

static moe_token_buf encode(const moe_tokenizer *tok, const char *s, size_t n) {
    moe_token_buf buf = {0};
    CU_ASSERT_EQUAL_FATAL(moe_tokenizer_encode(tok, s, n, &buf), MOE_OK);
    return buf;
}

static bool same_tokens(const moe_token_buf *a, const moe_token_buf *b) {
    return a->len == b->len && memcmp(a->data, b->data, a->len * sizeof *a->data) == 0;
}

static moe_tokenizer *train_sample(int vocab) {
    moe_tokenizer *tok = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_tokenizer_train_bpe(SAMPLE, sizeof SAMPLE - 1, vocab, &tok), MOE_OK);
    return tok;
}

/* ---- tokenizer ---------------------------------------------------------------------------- */

static void test_byte_round_trip(void) {
    moe_tokenizer *tok = moe_tokenizer_byte();
    CU_ASSERT_FATAL(tok != NULL);
    CU_ASSERT_EQUAL(moe_tokenizer_vocab_size(tok), 256);
    CU_ASSERT_EQUAL(moe_tokenizer_get_kind(tok), MOE_TOKENIZER_BYTE);
    char all[256];
    for (int i = 0; i < 256; i++) all[i] = (char)i;
    moe_token_buf buf = encode(tok, all, 256);
    CU_ASSERT_EQUAL_FATAL(buf.len, 256);
    for (int i = 0; i < 256; i++) CU_ASSERT_EQUAL(buf.data[i], i);
    CU_ASSERT(round_trips(tok, all, 256));
    CU_ASSERT(round_trips(tok, "", 0));
    int32_t bad = 256;
    char *out;
    size_t out_len;
    CU_ASSERT_EQUAL(moe_tokenizer_decode(tok, &bad, 1, &out, &out_len), MOE_ERR_INVALID);
    moe_token_buf_free(&buf);
    moe_tokenizer_free(tok);
}

static void test_bpe_round_trip(void) {
    moe_tokenizer *tok = train_sample(512);
    CU_ASSERT_EQUAL(moe_tokenizer_get_kind(tok), MOE_TOKENIZER_BPE);
    CU_ASSERT(round_trips(tok, SAMPLE, sizeof SAMPLE - 1));
    CU_ASSERT(round_trips(tok, "", 0));
    const char odd[] =
        "\xff\xfe caf\xc3\xa9 \xc3 \x80\x80 a\0b \t\r\n  \n\n   x'y' 'z don't 12,345.6";
    CU_ASSERT(round_trips(tok, odd, sizeof odd - 1));
    char buf[5000];
    for (size_t n = 0; n < 300; n += 7) {
        random_bytes(buf, n);
        CU_ASSERT(round_trips(tok, buf, n));
    }
    random_bytes(buf, sizeof buf); /* long enough for the encode cache */
    CU_ASSERT(round_trips(tok, buf, sizeof buf));
    memset(buf, ' ', 1000); /* runs longer than MOE_TOKENIZER_MAX_PIECE */
    memset(buf + 1000, 'a', 1000);
    memset(buf + 2000, '\n', 1000);
    CU_ASSERT(round_trips(tok, buf, 3000));
    for (int i = 0; i < 3000; i++) buf[i] = " \tx"[rng_u32() % 3];
    CU_ASSERT(round_trips(tok, buf, 3000));
    /* empty encode appends nothing */
    moe_token_buf empty = encode(tok, "", 0);
    CU_ASSERT_EQUAL(empty.len, 0);
    moe_token_buf_free(&empty);
    moe_tokenizer_free(tok);
}

static void test_bpe_compresses(void) {
    moe_tokenizer *tok = train_sample(500);
    CU_ASSERT_EQUAL(moe_tokenizer_vocab_size(tok), 500);
    moe_token_buf t = encode(tok, SAMPLE, sizeof SAMPLE - 1);
    CU_ASSERT(t.len * 2 < sizeof SAMPLE - 1);
    /* the first merge is the most frequent pair in the sample: " t" (in " the") */
    size_t n;
    const uint8_t *b = moe_tokenizer_token_bytes(tok, 256, &n);
    CU_ASSERT(n == 2 && memcmp(b, " t", 2) == 0);
    moe_token_buf_free(&t);
    moe_tokenizer_free(tok);
}

/* Decodes each token of `s` separately and joins them with '|'. */
static void token_strings(const moe_tokenizer *tok, const char *s, char *out, size_t cap) {
    moe_token_buf t = encode(tok, s, strlen(s));
    size_t o = 0;
    for (size_t i = 0; i < t.len && o + 1 < cap; i++) {
        size_t n;
        const uint8_t *b = moe_tokenizer_token_bytes(tok, t.data[i], &n);
        if (i) out[o++] = '|';
        for (size_t k = 0; k < n && o + 1 < cap; k++) out[o++] = (char)b[k];
    }
    out[o] = '\0';
    moe_token_buf_free(&t);
}

static void test_bpe_pieces(void) {
    /* Trained on "ab ab ab ...": merges "ab" then " ab". */
    char text[600];
    size_t n = 0;
    for (int i = 0; i < 150; i++) n += (size_t)sprintf(text + n, "%sab", i ? " " : "");
    moe_tokenizer *tok = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_tokenizer_train_bpe(text, n, 300, &tok), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_tokenizer_vocab_size(tok), 258);
    char got[200];
    /* the last space of a run goes with the next word; other runs stay whole; merges
     * never cross a piece (a letter run, digits, punctuation, whitespace) */
    token_strings(tok, "ab  ab\n\nab ab. ab1ab \tab", got, sizeof got);
    CU_ASSERT_STRING_EQUAL(got, "ab| | ab|\n|\n|ab| ab|.| ab|1|ab| |\t|ab");
    token_strings(tok, "a\xc3\xa9" "ab b", got, sizeof got);
    CU_ASSERT_STRING_EQUAL(got, "a|\xc3|\xa9" "|ab| |b");
    moe_tokenizer_free(tok);
}

static void test_bpe_cache_matches_uncached(void) {
    /* Inputs >= 4096 bytes use a per-call cache; the result must equal piecewise encoding. */
    moe_tokenizer *tok = train_sample(512);
    size_t n = sizeof SAMPLE - 1;
    CU_ASSERT_FATAL(n > 2048 && n < 4096);
    char *big = malloc(2 * n + 2);
    memcpy(big, SAMPLE, n - 1); /* drop the final newline: the sample ends with '.' */
    memcpy(big + n - 1, "\n\n", 2);
    memcpy(big + n + 1, SAMPLE, n - 1);
    size_t big_len = 2 * n;
    moe_token_buf whole = encode(tok, big, big_len), parts = {0};
    CU_ASSERT_EQUAL(moe_tokenizer_encode(tok, SAMPLE, n - 1, &parts), MOE_OK);
    CU_ASSERT_EQUAL(moe_tokenizer_encode(tok, "\n\n", 2, &parts), MOE_OK);
    CU_ASSERT_EQUAL(moe_tokenizer_encode(tok, SAMPLE, n - 1, &parts), MOE_OK);
    CU_ASSERT(same_tokens(&whole, &parts));
    free(big);
    moe_token_buf_free(&whole);
    moe_token_buf_free(&parts);
    moe_tokenizer_free(tok);
}

static void test_bpe_deterministic(void) {
    moe_tokenizer *a = train_sample(600), *b = train_sample(600);
    CU_ASSERT_EQUAL_FATAL(moe_tokenizer_vocab_size(a), moe_tokenizer_vocab_size(b));
    CU_ASSERT(moe_tokenizer_vocab_size(a) < 600); /* the sample runs out of repeated pairs */
    for (int id = 256; id < moe_tokenizer_vocab_size(a); id++) {
        int32_t la, ra, lb, rb;
        CU_ASSERT_FATAL(moe_tokenizer_merge_pair(a, id, &la, &ra));
        CU_ASSERT_FATAL(moe_tokenizer_merge_pair(b, id, &lb, &rb));
        CU_ASSERT(la == lb && ra == rb);
    }
    moe_tokenizer_free(a);
    moe_tokenizer_free(b);
}

/* Naive BPE over words "w0 w1 w2 ..." (lowercase letters, single spaces, so every piece
 * is a word with its leading space): recount every pair before every merge. */
enum { REF_MAX_WORDS = 64, REF_MAX_LEN = 16 };
typedef struct ref_word {
    int32_t s[REF_MAX_LEN];
    int len;
    long count;
} ref_word;

static int ref_train(ref_word *w, int n_words, int vocab, int32_t (*merges)[2]) {
    int n_merges = 0;
    while (256 + n_merges < vocab) {
        long best = 0;
        int32_t ba = 0, bb = 0;
        /* count all pairs: a tiny vocabulary-sized table would do, but a scan is clearer */
        for (int i = 0; i < n_words; i++)
            for (int k = 0; k + 1 < w[i].len; k++) {
                int32_t a = w[i].s[k], b = w[i].s[k + 1];
                long c = 0;
                for (int j = 0; j < n_words; j++)
                    for (int m = 0; m + 1 < w[j].len; m++)
                        if (w[j].s[m] == a && w[j].s[m + 1] == b) c += w[j].count;
                if (c > best || (c == best && (a < ba || (a == ba && b < bb)))) {
                    best = c;
                    ba = a;
                    bb = b;
                }
            }
        if (best < 2) break;
        int32_t fresh = 256 + n_merges;
        merges[n_merges][0] = ba;
        merges[n_merges][1] = bb;
        n_merges++;
        for (int i = 0; i < n_words; i++) {
            int j = 0;
            for (int k = 0; k < w[i].len;) {
                if (k + 1 < w[i].len && w[i].s[k] == ba && w[i].s[k + 1] == bb) {
                    w[i].s[j++] = fresh;
                    k += 2;
                } else {
                    w[i].s[j++] = w[i].s[k++];
                }
            }
            w[i].len = j;
        }
    }
    return n_merges;
}

static void test_bpe_matches_naive_reference(void) {
    static const char *const lexicon[] = {
        "banana", "bandana", "ban", "nab", "abba", "anna", "nana", "cabana", "bob", "cobb",
        "acab", "baccarat", "tart", "rat", "tar", "art", "banter", "cantata", "rant", "trance"};
    const int n_lex = (int)(sizeof lexicon / sizeof *lexicon);
    char text[8000];
    size_t len = 0;
    ref_word words[REF_MAX_WORDS];
    int n_words = 0;
    for (int i = 0; i < 900; i++) {
        const char *lw = lexicon[(rng_u32() % n_lex + rng_u32() % n_lex) / 2];
        char piece[REF_MAX_LEN];
        int plen = snprintf(piece, sizeof piece, "%s%s", i ? " " : "", lw);
        memcpy(text + len, piece, (size_t)plen);
        len += (size_t)plen;
        int found = -1;
        for (int j = 0; j < n_words && found < 0; j++) {
            bool eq = words[j].len == plen;
            for (int k = 0; eq && k < plen; k++) eq = words[j].s[k] == (uint8_t)piece[k];
            if (eq) found = j;
        }
        if (found < 0) {
            CU_ASSERT_FATAL(n_words < REF_MAX_WORDS);
            found = n_words++;
            words[found].len = plen;
            words[found].count = 0;
            for (int k = 0; k < plen; k++) words[found].s[k] = (uint8_t)piece[k];
        }
        words[found].count++;
    }
    int32_t ref[400][2];
    int n_ref = ref_train(words, n_words, 256 + 400, ref);
    CU_ASSERT(n_ref > 40); /* stops when no pair repeats */
    moe_tokenizer *tok = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_tokenizer_train_bpe(text, len, 256 + 400, &tok), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_tokenizer_vocab_size(tok), 256 + n_ref);
    for (int i = 0; i < n_ref; i++) {
        int32_t l, r;
        CU_ASSERT_FATAL(moe_tokenizer_merge_pair(tok, 256 + i, &l, &r));
        CU_ASSERT(l == ref[i][0] && r == ref[i][1]);
    }
    /* and encoding each word gives the reference segmentation */
    for (int j = 0; j < n_words; j++) {
        char piece[REF_MAX_LEN];
        int plen = 0;
        for (int k = 0; k < words[j].len; k++) {
            size_t bl;
            const uint8_t *b = moe_tokenizer_token_bytes(tok, words[j].s[k], &bl);
            memcpy(piece + plen, b, bl);
            plen += (int)bl;
        }
        moe_token_buf t = encode(tok, piece, (size_t)plen);
        CU_ASSERT(t.len == (size_t)words[j].len &&
                  memcmp(t.data, words[j].s, t.len * sizeof *t.data) == 0);
        moe_token_buf_free(&t);
    }
    moe_tokenizer_free(tok);
}

static void test_bpe_bad_vocab(void) {
    moe_tokenizer *tok = (moe_tokenizer *)1;
    CU_ASSERT_EQUAL(moe_tokenizer_train_bpe(SAMPLE, 10, 100, &tok), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NULL(tok);
    CU_ASSERT_EQUAL(moe_tokenizer_train_bpe(SAMPLE, 10, 256, &tok), MOE_OK);
    CU_ASSERT_EQUAL(moe_tokenizer_vocab_size(tok), 256);
    CU_ASSERT(round_trips(tok, SAMPLE, 100));
    moe_tokenizer_free(tok);
}

static void test_tokenizer_save_load(void) {
    const char *dir = moe_test_tmpdir("tokfile");
    CU_ASSERT_FATAL(dir != NULL);
    char path[600];
    join(path, sizeof path, dir, "tok.bin");
    moe_tokenizer *tok = train_sample(700), *back = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_tokenizer_save(tok, path), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_tokenizer_load(path, &back), MOE_OK);
    CU_ASSERT_EQUAL(moe_tokenizer_vocab_size(back), moe_tokenizer_vocab_size(tok));
    CU_ASSERT_EQUAL(moe_tokenizer_get_kind(back), MOE_TOKENIZER_BPE);
    char rnd[3000];
    random_bytes(rnd, sizeof rnd);
    const char *texts[2] = {SAMPLE, rnd};
    size_t lens[2] = {sizeof SAMPLE - 1, sizeof rnd};
    for (int i = 0; i < 2; i++) {
        moe_token_buf a = encode(tok, texts[i], lens[i]), b = encode(back, texts[i], lens[i]);
        CU_ASSERT(same_tokens(&a, &b));
        moe_token_buf_free(&a);
        moe_token_buf_free(&b);
    }
    moe_tokenizer_free(back);

    moe_tokenizer *byte = moe_tokenizer_byte();
    CU_ASSERT_EQUAL(moe_tokenizer_save(byte, path), MOE_OK);
    CU_ASSERT_EQUAL(moe_tokenizer_load(path, &back), MOE_OK);
    CU_ASSERT_EQUAL(moe_tokenizer_get_kind(back), MOE_TOKENIZER_BYTE);
    CU_ASSERT_EQUAL(moe_tokenizer_vocab_size(back), 256);
    moe_tokenizer_free(back);
    moe_tokenizer_free(byte);
    moe_tokenizer_free(tok);
}

static void expect_tokenizer_refused(const char *path, moe_status want) {
    moe_tokenizer *tok = (moe_tokenizer *)1;
    CU_ASSERT_EQUAL(moe_tokenizer_load(path, &tok), want);
    CU_ASSERT_PTR_NULL(tok);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), path));
}

static void test_tokenizer_damaged(void) {
    const char *dir = moe_test_tmpdir("tokbad");
    CU_ASSERT_FATAL(dir != NULL);
    char good[600], bad[600];
    join(good, sizeof good, dir, "tok.bin");
    join(bad, sizeof bad, dir, "bad.bin");
    moe_tokenizer *tok = train_sample(400);
    CU_ASSERT_EQUAL_FATAL(moe_tokenizer_save(tok, good), MOE_OK);
    moe_tokenizer_free(tok);
    size_t len;
    uint8_t *img = moe_test_read_file(good, &len);
    CU_ASSERT_EQUAL_FATAL(len, 28 + 8 * 144 + 4);

    moe_test_write_file(bad, img, len - 1); /* truncated */
    expect_tokenizer_refused(bad, MOE_ERR_FORMAT);
    moe_test_write_file(bad, img, 5); /* shorter than the header */
    expect_tokenizer_refused(bad, MOE_ERR_FORMAT);
    moe_test_write_file(bad, "", 0);
    expect_tokenizer_refused(bad, MOE_ERR_FORMAT);
    img[100] ^= 0x10; /* a flipped bit in a merge */
    moe_test_write_file(bad, img, len);
    expect_tokenizer_refused(bad, MOE_ERR_FORMAT);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "checksum"));
    img[100] ^= 0x10;
    img[0] = 'X'; /* foreign file */
    moe_test_write_file(bad, img, len);
    expect_tokenizer_refused(bad, MOE_ERR_FORMAT);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "magic"));
    join(bad, sizeof bad, dir, "missing.bin");
    expect_tokenizer_refused(bad, MOE_ERR_IO);
    free(img);
}

/* ---- data prepare and token files ----------------------------------------------------------- */


static moe_token_file *open_ok(const char *dir, const char *name) {
    char path[600];
    join(path, sizeof path, dir, name);
    moe_token_file *tf = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_data_open(path, &tf), MOE_OK);
    return tf;
}

static int32_t *all_tokens(const moe_token_file *tf) {
    int32_t *t = malloc((moe_data_count(tf) + 1) * sizeof *t);
    moe_data_read(tf, 0, moe_data_count(tf), t);
    return t;
}

static void test_prepare_byte(void) {
    const char *dir = moe_test_tmpdir("prep");
    CU_ASSERT_FATAL(dir != NULL);
    char in1[600], in2[600], out[600];
    join(in1, sizeof in1, dir, "a.txt");
    join(in2, sizeof in2, dir, "b.txt");
    join(out, sizeof out, dir, "out/nested");
    /* doc 1 ends without a newline: prepare adds a blank line after it */
    moe_test_write_file(in1, "first doc", 9);
    char text[4000];
    size_t len = 0;
    for (int p = 0; p < 40; p++)
        len += (size_t)sprintf(text + len, "Paragraph %02d has some words.\n\n", p);
    CU_ASSERT_EQUAL_FATAL(len, 40 * 30);
    moe_test_write_file(in2, text, len);

    moe_tokenizer *tok = moe_tokenizer_byte();
    const char *inputs[2] = {in1, in2};
    moe_data_summary s;
    CU_ASSERT_EQUAL_FATAL(moe_data_prepare(inputs, 2, tok, 0.1, out, &s), MOE_OK);
    size_t total = 9 + 2 + len;
    CU_ASSERT_EQUAL(s.vocab_size, 256);
    CU_ASSERT_EQUAL(s.train_tokens + s.val_tokens, total);
    CU_ASSERT_EQUAL(s.train_bytes, s.train_tokens);
    CU_ASSERT_EQUAL(s.val_bytes, s.val_tokens);
    CU_ASSERT_DOUBLE_EQUAL(s.val_bytes_per_token, 1.0, 1e-12);
    /* the split is at a paragraph start near 90%: 1211 * 0.1 = 121 bytes, paragraphs of 30 */
    CU_ASSERT(fabs((double)s.val_bytes / total - 0.1) < 0.02);
    CU_ASSERT_EQUAL(s.val_bytes, 120);

    moe_token_file *tr = open_ok(out, "train.bin"), *va = open_ok(out, "val.bin");
    CU_ASSERT_EQUAL(moe_data_count(tr), s.train_tokens);
    CU_ASSERT_EQUAL(moe_data_count(va), s.val_tokens);
    CU_ASSERT_EQUAL(moe_data_vocab(va), 256);
    CU_ASSERT_DOUBLE_EQUAL(moe_data_bytes_per_token(va), 1.0, 1e-12);
    CU_ASSERT_DOUBLE_EQUAL(moe_data_unigram_bpb(va), s.unigram_bpb, 1e-12);
    CU_ASSERT_DOUBLE_EQUAL(moe_data_unigram_bpb(tr), s.unigram_bpb, 1e-12);
    CU_ASSERT(s.unigram_bpb > 2 && s.unigram_bpb < 6);
    /* the tokens are the bytes, in order */
    int32_t *t = all_tokens(tr), *v = all_tokens(va);
    const char *expect_head = "first doc\n\nParagraph 00";
    for (int i = 0; i < 23; i++) CU_ASSERT_EQUAL(t[i], (uint8_t)expect_head[i]);
    for (size_t i = 0; i < s.val_tokens; i++)
        CU_ASSERT_EQUAL(v[i], (uint8_t)text[len - s.val_tokens + i]);
    CU_ASSERT_EQUAL(v[0], 'P');
    /* width 2: 64-byte header + 2 bytes per token */
    char path[700];
    join(path, sizeof path, out, "val.bin");
    size_t flen;
    free(moe_test_read_file(path, &flen));
    CU_ASSERT_EQUAL(flen, 64 + 2 * s.val_tokens);
    free(t);
    free(v);
    moe_data_close(tr);
    moe_data_close(va);
    moe_tokenizer_free(tok);
}

static void test_prepare_bpe(void) {
    const char *dir = moe_test_tmpdir("prepbpe");
    CU_ASSERT_FATAL(dir != NULL);
    char in[600];
    join(in, sizeof in, dir, "s.txt");
    moe_test_write_file(in, SAMPLE, sizeof SAMPLE - 1);
    moe_tokenizer *tok = train_sample(500);
    const char *inputs[1] = {in};
    moe_data_summary s;
    CU_ASSERT_EQUAL_FATAL(moe_data_prepare(inputs, 1, tok, 0.2, dir, &s), MOE_OK);
    CU_ASSERT_EQUAL(s.train_bytes + s.val_bytes, sizeof SAMPLE - 1);
    CU_ASSERT(s.train_bytes_per_token > 2);
    moe_token_file *tr = open_ok(dir, "train.bin"), *va = open_ok(dir, "val.bin");
    CU_ASSERT_EQUAL(moe_data_vocab(tr), 500);
    CU_ASSERT_DOUBLE_EQUAL(moe_data_bytes_per_token(tr), s.train_bytes_per_token, 1e-12);
    /* decoding train then val gives the text back; val starts a paragraph */
    int32_t *t = all_tokens(tr), *v = all_tokens(va);
    char *dt, *dv;
    size_t lt, lv;
    CU_ASSERT_EQUAL_FATAL(moe_tokenizer_decode(tok, t, moe_data_count(tr), &dt, &lt), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_tokenizer_decode(tok, v, moe_data_count(va), &dv, &lv), MOE_OK);
    CU_ASSERT_EQUAL(lt, s.train_bytes);
    CU_ASSERT_EQUAL(lv, s.val_bytes);
    CU_ASSERT(memcmp(dt, SAMPLE, lt) == 0 && memcmp(dv, SAMPLE + lt, lv) == 0);
    CU_ASSERT(lt >= 2 && dt[lt - 1] == '\n' && dt[lt - 2] == '\n');
    free(dt);
    free(dv);
    free(t);
    free(v);
    moe_data_close(tr);
    moe_data_close(va);

    /* bad arguments */
    CU_ASSERT_EQUAL(moe_data_prepare(inputs, 1, tok, 0.0, dir, NULL), MOE_ERR_INVALID);
    CU_ASSERT_EQUAL(moe_data_prepare(inputs, 1, tok, 1.0, dir, NULL), MOE_ERR_INVALID);
    const char *missing[1] = {"no/such/file.txt"};
    CU_ASSERT_EQUAL(moe_data_prepare(missing, 1, tok, 0.1, dir, NULL), MOE_ERR_IO);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "no/such/file.txt"));
    moe_tokenizer_free(tok);
}

static double prepare_unigram(const char *name, const char *text, size_t len) {
    const char *dir = moe_test_tmpdir(name);
    CU_ASSERT_FATAL(dir != NULL);
    char in[600];
    join(in, sizeof in, dir, "in.txt");
    moe_test_write_file(in, text, len);
    moe_tokenizer *tok = moe_tokenizer_byte();
    const char *inputs[1] = {in};
    moe_data_summary s;
    CU_ASSERT_EQUAL_FATAL(moe_data_prepare(inputs, 1, tok, 0.1, dir, &s), MOE_OK);
    moe_tokenizer_free(tok);
    return s.unigram_bpb;
}

static void test_unigram_baseline(void) {
    enum { N = 200000 };
    char *text = malloc(N);
    memset(text, 'a', N);
    double same = prepare_unigram("uni-same", text, N);
    /* -log2((180000 + 1) / (180000 + 256)) = 0.00204 bits per byte */
    CU_ASSERT_DOUBLE_EQUAL(same, -log2((180000.0 + 1) / (180000.0 + 256)), 1e-4);
    random_bytes(text, N);
    double uniform = prepare_unigram("uni-rand", text, N);
    CU_ASSERT_DOUBLE_EQUAL(uniform, 8.0, 0.02);
    CU_ASSERT(uniform > 8.0); /* cross-entropy of a fitted model on fresh data exceeds entropy */
    free(text);
}

static void expect_data_refused(const char *path, const void *data, size_t len, moe_status want,
                                const char *why) {
    moe_test_write_file(path, data, len);
    moe_token_file *tf = (moe_token_file *)1;
    CU_ASSERT_EQUAL(moe_data_open(path, &tf), want);
    CU_ASSERT_PTR_NULL(tf);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), path));
    if (why) CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), why));
}

static void test_token_file_damaged(void) {
    const char *dir = moe_test_tmpdir("tokdamage");
    CU_ASSERT_FATAL(dir != NULL);
    char in[600], good[600], bad[600];
    join(in, sizeof in, dir, "in.txt");
    join(good, sizeof good, dir, "train.bin");
    join(bad, sizeof bad, dir, "bad.bin");
    moe_test_write_file(in, SAMPLE, sizeof SAMPLE - 1);
    moe_tokenizer *tok = moe_tokenizer_byte();
    const char *inputs[1] = {in};
    CU_ASSERT_EQUAL_FATAL(moe_data_prepare(inputs, 1, tok, 0.1, dir, NULL), MOE_OK);
    moe_tokenizer_free(tok);
    size_t len;
    uint8_t *img = moe_test_read_file(good, &len);
    expect_data_refused(bad, img, 10, MOE_ERR_FORMAT, "truncated");
    expect_data_refused(bad, img, 0, MOE_ERR_FORMAT, "truncated");
    expect_data_refused(bad, img, len - 1, MOE_ERR_FORMAT, "size mismatch");
    uint8_t *longer = malloc(len + 2);
    memcpy(longer, img, len);
    longer[len] = longer[len + 1] = 0;
    expect_data_refused(bad, longer, len + 2, MOE_ERR_FORMAT, "size mismatch");
    free(longer);
    char garbage[300];
    random_bytes(garbage, sizeof garbage);
    expect_data_refused(bad, garbage, sizeof garbage, MOE_ERR_FORMAT, "magic");
    img[64] = 0x2c; /* token 0 becomes 0x012c = 300 >= vocab 256 */
    img[65] = 0x01;
    expect_data_refused(bad, img, len, MOE_ERR_FORMAT, "vocab");
    img[24] = 4; /* width 4 with vocab 256 */
    expect_data_refused(bad, img, len, MOE_ERR_FORMAT, "width");
    moe_token_file *tf = (moe_token_file *)1;
    join(bad, sizeof bad, dir, "missing.bin");
    CU_ASSERT_EQUAL(moe_data_open(bad, &tf), MOE_ERR_IO);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), bad));
    free(img);
}

static void test_token_file_wide(void) {
    /* vocab > 65536: 4-byte little-endian tokens; a hand-made file */
    const char *dir = moe_test_tmpdir("tokwide");
    CU_ASSERT_FATAL(dir != NULL);
    char path[600];
    join(path, sizeof path, dir, "w.bin");
    uint8_t img[64 + 12] = {'M', 'O', 'E', 'T', 'O', 'K', '1', 0, 1};
    const uint32_t vocab = 70000, toks[3] = {1, 69999, 65536};
    const double bpt = 3.5, bpb = 1.25;
    for (int i = 0; i < 4; i++) img[12 + i] = (uint8_t)(vocab >> (8 * i));
    img[16] = 3;
    img[24] = 4;
    memcpy(img + 32, &bpt, 8); /* the build machines are little-endian */
    memcpy(img + 40, &bpb, 8);
    for (int t = 0; t < 3; t++)
        for (int i = 0; i < 4; i++) img[64 + 4 * t + i] = (uint8_t)(toks[t] >> (8 * i));
    moe_test_write_file(path, img, sizeof img);
    moe_token_file *tf = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_data_open(path, &tf), MOE_OK);
    CU_ASSERT_EQUAL(moe_data_vocab(tf), 70000);
    CU_ASSERT_EQUAL(moe_data_count(tf), 3);
    CU_ASSERT_DOUBLE_EQUAL(moe_data_bytes_per_token(tf), 3.5, 0);
    CU_ASSERT_DOUBLE_EQUAL(moe_data_unigram_bpb(tf), 1.25, 0);
    int32_t got[2];
    moe_data_read(tf, 1, 2, got);
    CU_ASSERT(got[0] == 69999 && got[1] == 65536);
    moe_data_close(tf);
    img[24] = 2; /* a 2-byte width cannot hold this vocab */
    moe_test_write_file(path, img, sizeof img);
    CU_ASSERT_EQUAL(moe_data_open(path, &tf), MOE_ERR_FORMAT);
}

/* ---- batch sampler and eval ---------------------------------------------------------------- */

/* A byte-token file of `n` pseudo-random letters in `dir`/train.bin; returns it opened. */
static moe_token_file *letters_file(const char *name, size_t n) {
    const char *dir = moe_test_tmpdir(name);
    CU_ASSERT_FATAL(dir != NULL);
    char in[600];
    join(in, sizeof in, dir, "in.txt");
    char *text = malloc(n + 1);
    for (size_t i = 0; i < n; i++) text[i] = (char)('a' + rng_u32() % 26);
    moe_test_write_file(in, text, n);
    free(text);
    moe_tokenizer *tok = moe_tokenizer_byte();
    const char *inputs[1] = {in};
    CU_ASSERT_EQUAL_FATAL(moe_data_prepare(inputs, 1, tok, 0.5, dir, NULL), MOE_OK);
    moe_tokenizer_free(tok);
    return open_ok(dir, "train.bin");
}

enum { B = 8, T = 16 };

static void test_loader_deterministic(void) {
    moe_token_file *tf = letters_file("loader", 2000);
    CU_ASSERT_EQUAL_FATAL(moe_data_count(tf), 1000);
    int32_t *all = all_tokens(tf);
    moe_loader *a, *b, *c;
    CU_ASSERT_EQUAL_FATAL(moe_loader_create(tf, 7, B, T, &a), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_loader_create(tf, 7, B, T, &b), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_loader_create(tf, 8, B, T, &c), MOE_OK);
    int32_t ia[B * T], ta[B * T], ib[B * T], tb[B * T], ic[B * T], tc[B * T];
    int differs_from_other_seed = 0, differs_between_steps = 0;
    int32_t prev[B * T];
    size_t starts[6 * B], n_starts = 0;
    for (int step = 0; step < 6; step++) {
        moe_loader_next(a, 0, 1, ia, ta);
        moe_loader_next(b, 0, 1, ib, tb);
        moe_loader_next(c, 0, 1, ic, tc);
        CU_ASSERT(memcmp(ia, ib, sizeof ia) == 0 && memcmp(ta, tb, sizeof ta) == 0);
        differs_from_other_seed += memcmp(ia, ic, sizeof ia) != 0;
        if (step) differs_between_steps += memcmp(ia, prev, sizeof ia) != 0;
        memcpy(prev, ia, sizeof ia);
        for (int r = 0; r < B; r++) {
            const int32_t *in = ia + r * T, *tg = ta + r * T;
            for (int t = 0; t + 1 < T; t++) CU_ASSERT_EQUAL(tg[t], in[t + 1]);
            /* the row is a real window of the file: find where it starts */
            int found = 0;
            for (size_t p = 0; p + T < 1000 && !found; p++)
                if (memcmp(all + p, in, T * sizeof *in) == 0 && all[p + T] == tg[T - 1]) {
                    found = 1;
                    starts[n_starts++] = p;
                }
            CU_ASSERT(found);
        }
    }
    /* 48 draws from 984 starts: about one repeat is expected; many mean correlated rows */
    int distinct = 0;
    for (size_t i = 0; i < n_starts; i++) {
        bool repeat = false;
        for (size_t j = 0; j < i; j++) repeat = repeat || starts[j] == starts[i];
        distinct += !repeat;
    }
    CU_ASSERT(n_starts == 6 * B && distinct >= 44);
    CU_ASSERT_EQUAL(differs_from_other_seed, 6);
    CU_ASSERT_EQUAL(differs_between_steps, 5);
    CU_ASSERT_EQUAL(moe_loader_get_state(a).step, 6);
    CU_ASSERT_EQUAL(moe_loader_get_state(a).seed, 7);
    free(all);
    moe_loader_free(a);
    moe_loader_free(b);
    moe_loader_free(c);
    moe_data_close(tf);
}

static void test_loader_covers_range(void) {
    /* 19 tokens, T = 16: starts 0, 1, 2 are the only valid ones; all must appear. */
    moe_token_file *tf = letters_file("range", 38);
    CU_ASSERT_EQUAL_FATAL(moe_data_count(tf), 19);
    int32_t *all = all_tokens(tf);
    moe_loader *l;
    CU_ASSERT_EQUAL_FATAL(moe_loader_create(tf, 1, 2, T, &l), MOE_OK);
    int seen[3] = {0};
    int32_t in[2 * T], tg[2 * T];
    for (int s = 0; s < 50; s++) {
        moe_loader_next(l, 0, 1, in, tg);
        for (int r = 0; r < 2; r++)
            for (int p = 0; p < 3; p++)
                if (memcmp(all + p, in + r * T, sizeof(int32_t) * T) == 0 &&
                    memcmp(all + p + 1, tg + r * T, sizeof(int32_t) * T) == 0)
                    seen[p]++;
    }
    CU_ASSERT(seen[0] > 10 && seen[1] > 10 && seen[2] > 10);
    CU_ASSERT_EQUAL(seen[0] + seen[1] + seen[2], 100);
    moe_loader_free(l);
    CU_ASSERT_EQUAL(moe_loader_create(tf, 1, 2, 19, &l), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), moe_data_path(tf)));
    CU_ASSERT_EQUAL(moe_loader_create(tf, 1, 2, 18, &l), MOE_OK); /* exactly T + 1 tokens */
    moe_loader_free(l);
    free(all);
    moe_data_close(tf);
}

static void test_loader_sharding(void) {
    moe_token_file *tf = letters_file("shard", 2000);
    moe_loader *l;
    CU_ASSERT_EQUAL_FATAL(moe_loader_create(tf, 42, B, T, &l), MOE_OK);
    int32_t in1[B * T], tg1[B * T], in[B * T], tg[B * T];
    for (uint64_t step = 0; step < 4; step++) {
        moe_loader_batch(l, step, 0, 1, in1, tg1);
        for (int dp = 2; dp <= 4; dp *= 2) {
            int rows = B / dp;
            for (int r = 0; r < dp; r++)
                moe_loader_batch(l, step, r, dp, in + r * rows * T, tg + r * rows * T);
            CU_ASSERT(memcmp(in, in1, sizeof in) == 0 && memcmp(tg, tg1, sizeof tg) == 0);
        }
    }
    moe_loader_free(l);
    moe_data_close(tf);
}

static void test_loader_resume(void) {
    moe_token_file *tf = letters_file("resume", 2000);
    moe_loader *a, *b;
    CU_ASSERT_EQUAL_FATAL(moe_loader_create(tf, 5, B, T, &a), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_loader_create(tf, 99, B, T, &b), MOE_OK);
    int32_t in[B * T], tg[B * T], in2[B * T], tg2[B * T];
    for (int i = 0; i < 5; i++) moe_loader_next(a, 1, 2, in, tg);
    moe_loader_state st = moe_loader_get_state(a);
    CU_ASSERT_EQUAL(st.step, 5);
    moe_loader_set_state(b, st);
    for (int i = 0; i < 3; i++) {
        moe_loader_next(a, 1, 2, in, tg);
        moe_loader_next(b, 1, 2, in2, tg2);
        CU_ASSERT(memcmp(in, in2, sizeof in / 2) == 0 && memcmp(tg, tg2, sizeof tg / 2) == 0);
        moe_loader_batch(a, st.step + (uint64_t)i, 1, 2, in2, tg2);
        CU_ASSERT(memcmp(in, in2, sizeof in / 2) == 0);
    }
    moe_loader_free(a);
    moe_loader_free(b);
    moe_data_close(tf);
}

static void test_eval_iter(void) {
    moe_token_file *tf = letters_file("eval", 2000); /* 1000 tokens: 62 windows of 16, 7 batches */
    int32_t *all = all_tokens(tf);
    moe_eval_iter it;
    CU_ASSERT_EQUAL_FATAL(moe_eval_iter_init(&it, tf, B, T, 0), MOE_OK);
    CU_ASSERT_EQUAL(it.n_batches, 999 / T / B);
    int32_t in[B * T], tg[B * T], half_in[B * T], half_tg[B * T];
    uint64_t n = 0;
    while (moe_eval_iter_next(&it, 0, 1, in, tg)) {
        for (int r = 0; r < B; r++) {
            size_t start = (size_t)((n * B + (uint64_t)r) * T);
            CU_ASSERT(memcmp(in + r * T, all + start, sizeof(int32_t) * T) == 0);
            CU_ASSERT(memcmp(tg + r * T, all + start + 1, sizeof(int32_t) * T) == 0);
        }
        n++;
    }
    CU_ASSERT_EQUAL(n, it.n_batches);
    CU_ASSERT_FALSE(moe_eval_iter_next(&it, 0, 1, in, tg));
    /* reset: same first batch; shards of dp = 2 are its halves */
    moe_eval_iter_reset(&it);
    CU_ASSERT(moe_eval_iter_next(&it, 0, 1, in, tg));
    moe_eval_iter it2;
    CU_ASSERT_EQUAL_FATAL(moe_eval_iter_init(&it2, tf, B, T, 2), MOE_OK);
    CU_ASSERT_EQUAL(it2.n_batches, 2);
    CU_ASSERT(moe_eval_iter_next(&it2, 1, 2, half_in, half_tg));
    CU_ASSERT(memcmp(half_in, in + B / 2 * T, sizeof in / 2) == 0);
    CU_ASSERT(memcmp(half_tg, tg + B / 2 * T, sizeof tg / 2) == 0);
    CU_ASSERT_EQUAL(moe_eval_iter_init(&it2, tf, 100, T, 0), MOE_ERR_INVALID);
    free(all);
    moe_data_close(tf);
}

static void register_suites(void) {
    moe_test_add_suite("tokenizer", (moe_test_entry[]){
        {"byte_round_trip", test_byte_round_trip},
        {"bpe_round_trip", test_bpe_round_trip},
        {"bpe_compresses", test_bpe_compresses},
        {"bpe_pieces", test_bpe_pieces},
        {"bpe_cache_matches_uncached", test_bpe_cache_matches_uncached},
        {"bpe_deterministic", test_bpe_deterministic},
        {"bpe_matches_naive_reference", test_bpe_matches_naive_reference},
        {"bpe_bad_vocab", test_bpe_bad_vocab},
        {"save_load", test_tokenizer_save_load},
        {"damaged_file", test_tokenizer_damaged},
        {NULL, NULL}});
    moe_test_add_suite("data", (moe_test_entry[]){
        {"prepare_byte", test_prepare_byte},
        {"prepare_bpe", test_prepare_bpe},
        {"unigram_baseline", test_unigram_baseline},
        {"token_file_damaged", test_token_file_damaged},
        {"token_file_wide", test_token_file_wide},
        {NULL, NULL}});
    moe_test_add_suite("loader", (moe_test_entry[]){
        {"deterministic", test_loader_deterministic},
        {"covers_range", test_loader_covers_range},
        {"sharding", test_loader_sharding},
        {"resume", test_loader_resume},
        {"eval_iter", test_eval_iter},
        {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
