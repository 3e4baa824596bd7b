/* `moe tokenize --model DIR` with one of:
 *   --text T            prints "IDS 1 2 3" (special tokens added unless --no-special)
 *   --decode 5,17,42    prints the text (--skip-special drops special tokens)
 *   --chat JSON         renders the chat template over the messages (a JSON array) and prints the
 *                       text, then "IDS ..." of it (no special tokens added: the template has them);
 *                       --generation-prompt adds the assistant prefix, --vars JSON more variables
 *   --bench FILE        encodes FILE (best of --rounds; --lines: one call per line) and prints
 *                       tokens/s and MB/s. */
#include "moe/hf/tok_cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe/cli/args.h"
#include "moe/hf/hf_tokenizer.h"

typedef struct tok_args {
    const char *model, *text, *decode, *chat, *vars, *bench;
    bool no_special, skip_special, generation_prompt, lines;
    int rounds;
} tok_args;

static int fail(moe_status s) {
    fprintf(stderr, "moe: error (%s): %s\n", moe_status_name(s), moe_last_error());
    return s == MOE_ERR_CONFIG ? 2 : 1;
}

static void print_ids(const moe_token_buf *ids) {
    fputs("IDS", stdout);
    for (size_t i = 0; i < ids->len; i++) printf(" %d", ids->data[i]);
    fputc('\n', stdout);
}

static moe_status encode_print(moe_hf_tokenizer *tok, const char *text, bool add_special) {
    moe_token_buf ids = {0};
    moe_status s = moe_hf_encode(tok, text, strlen(text), add_special, &ids);
    if (s == MOE_OK) print_ids(&ids);
    moe_token_buf_free(&ids);
    return s;
}

/* "5,17,42" (spaces allowed) -> ids. */
static moe_status parse_ids(const char *list, moe_token_buf *ids) {
    const char *p = list;
    while (*p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > INT32_MAX)
            return moe_error(MOE_ERR_CONFIG, "tokenize: --decode wants ids like 5,17,42, not '%s'", list);
        if (ids->len == ids->cap) {
            size_t cap = ids->cap ? 2 * ids->cap : 64;
            int32_t *d = realloc(ids->data, cap * sizeof *d);
            if (!d) return moe_error(MOE_ERR_OOM, "out of memory");
            ids->data = d;
            ids->cap = cap;
        }
        ids->data[ids->len++] = (int32_t)v;
        p = end;
        while (*p == ',' || *p == ' ') p++;
    }
    return MOE_OK;
}

static moe_status run_decode(moe_hf_tokenizer *tok, const tok_args *a) {
    moe_token_buf ids = {0};
    char *text = NULL;
    moe_status s = parse_ids(a->decode, &ids);
    if (s == MOE_OK) s = moe_hf_decode(tok, ids.data, ids.len, a->skip_special, &text);
    if (s == MOE_OK) printf("%s\n", text);
    free(text);
    moe_token_buf_free(&ids);
    return s;
}

static moe_status run_chat(moe_hf_tokenizer *tok, const tok_args *a) {
    char *text = NULL;
    moe_status s = moe_hf_apply_chat_template(tok, a->chat, a->generation_prompt, a->vars, &text);
    if (s == MOE_OK) {
        printf("%s\n", text);
        s = encode_print(tok, text, false);
    }
    free(text);
    return s;
}

static moe_status run_bench(moe_hf_tokenizer *tok, const tok_args *a) {
    FILE *f = fopen(a->bench, "rb");
    if (!f) return moe_error(MOE_ERR_IO, "tokenize: cannot open %s", a->bench);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = n >= 0 ? malloc((size_t)n + 1) : NULL;
    bool ok = text && fread(text, 1, (size_t)n, f) == (size_t)n;
    fclose(f);
    if (!ok) {
        free(text);
        return moe_error(MOE_ERR_IO, "tokenize: cannot read %s", a->bench);
    }
    moe_hf_bench b;
    moe_status s = moe_hf_bench_encode(tok, text, (size_t)n, a->rounds, a->lines, &b);
    if (s == MOE_OK)
        printf("BENCH %s%s: %ld bytes -> %zu tokens; cold cache %.0f tokens/s (%.2f MB/s), warm best of %d: %.0f "
               "tokens/s (%.2f MB/s), one thread\n", a->bench, a->lines ? " by line" : "", n, b.tokens,
               b.cold_tokens_per_s, b.cold_bytes_per_s / 1e6, a->rounds - 1, b.warm_tokens_per_s,
               b.warm_bytes_per_s / 1e6);
    free(text);
    return s;
}

int moe_cli_tokenize(int argc, char **argv) {
    tok_args a = {.rounds = 4};
    const moe_flag_spec specs[] = {
        {"--model", MOE_FLAG_STRING, "DIR", 0, 0, NULL, "a Hugging Face model folder (tokenizer.json)", &a.model},
        {"--text", MOE_FLAG_STRING, "TEXT", 0, 0, NULL, "encode TEXT: prints IDS ...", &a.text},
        {"--decode", MOE_FLAG_STRING, "IDS", 0, 0, NULL, "decode comma-separated ids: prints the text", &a.decode},
        {"--chat", MOE_FLAG_STRING, "JSON", 0, 0, NULL, "render the chat template over a JSON array of messages",
         &a.chat},
        {"--vars", MOE_FLAG_STRING, "JSON", 0, 0, NULL, "more chat template variables (a JSON object)", &a.vars},
        {"--bench", MOE_FLAG_STRING, "FILE", 0, 0, NULL, "encode FILE and print the speed", &a.bench},
        {"--lines", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "--bench: one encode call per line", &a.lines},
        {"--rounds", MOE_FLAG_INT, "N", 2, 100, NULL, "--bench: rounds (the first cold, the best warm one reported)",
         &a.rounds},
        {"--no-special", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "--text: do not add special tokens (BOS)", &a.no_special},
        {"--skip-special", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "--decode: drop special tokens", &a.skip_special},
        {"--generation-prompt", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "--chat: end with the assistant's prefix",
         &a.generation_prompt},
        {0}};
    const char *usage = "moe tokenize --model DIR (--text T | --decode IDS | --chat JSON | --bench FILE) [flags]";
    moe_args pa;
    moe_status s = moe_args_parse("tokenize", specs, argc, argv, &pa);
    if (s != MOE_OK) return fail(s);
    bool help = pa.help;
    int extra = pa.n_positional;
    moe_args_free(&pa);
    if (help) {
        moe_args_print_help(stdout, usage, specs);
        return 0;
    }
    int modes = !!a.text + !!a.decode + !!a.chat + !!a.bench;
    if (!a.model || modes != 1 || extra)
        return fail(moe_error(MOE_ERR_CONFIG, "tokenize: give --model and exactly one of --text, --decode, --chat, "
                                              "--bench (usage: %s)", usage));
    moe_hf_tokenizer *tok = NULL;
    s = moe_hf_tokenizer_load_dir(&tok, a.model);
    if (s == MOE_OK) {
        if (a.text) s = encode_print(tok, a.text, !a.no_special);
        else if (a.decode) s = run_decode(tok, &a);
        else if (a.chat) s = run_chat(tok, &a);
        else s = run_bench(tok, &a);
    }
    moe_hf_tokenizer_free(tok);
    return s == MOE_OK ? 0 : fail(s);
}
