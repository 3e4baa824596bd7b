/* `moe tokenize` (--model DIR: a hub folder's tokenizer.json; --checkpoint FILE: our
 * byte/BPE tokenizer) with one of:
 *   --text T            prints "IDS 1 2 3" (special tokens added unless --no-special)
 *   --decode 5,17,42    prints the text (--skip-special drops special tokens)
 *   --chat JSON         (hub folders) renders the chat template over the messages (a JSON
 *                       array) and prints the text, then "IDS ..." of it (no special tokens
 *                       added: the template has them); --generation-prompt adds the
 *                       assistant prefix, --vars JSON more variables
 *   --bench FILE        (hub folders) encodes FILE (best of --rounds; --lines: one call per
 *                       line) and prints tokens/s and MB/s. */
#include "moe/cli/commands.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe/cli/cli.h"
#include "moe/cli/source.h"
#include "moe/hf/hf_tokenizer.h"

typedef struct tok_args {
    moe_source_flags src;
    const char *text, *decode, *chat, *vars, *bench;
    bool no_special, skip_special, generation_prompt, lines;
    int rounds;
} tok_args;

static void print_ids(const moe_token_buf *ids) {
    fputs("IDS", stdout);
    for (size_t i = 0; i < ids->len; i++) printf(" %d", ids->data[i]);
    fputc('\n', stdout);
}

static moe_status encode_print(serve_text *t, const char *text, bool add_special) {
    moe_token_buf ids = {0};
    moe_status s = serve_text_encode(t, text, strlen(text), add_special, &ids);
    if (s == MOE_OK) print_ids(&ids);
    moe_token_buf_free(&ids);
    return s;
}

static moe_status run_decode(serve_text *t, const tok_args *a) {
    moe_token_buf ids = {0};
    char *text = NULL;
    size_t len = 0;
    moe_status s = moe_cli_parse_ids("--decode", a->decode, t->vocab, MOE_IDS_EMPTY_ALLOWED, &ids);
    if (s == MOE_OK && t->hf) s = moe_hf_decode(t->hf, ids.data, ids.len, a->skip_special, &text);
    if (s == MOE_OK && t->own) s = moe_tokenizer_decode(t->own, ids.data, ids.len, &text, &len);
    if (s == MOE_OK) printf("%s\n", text);
    free(text);
    moe_token_buf_free(&ids);
    return s;
}

static moe_status run_chat(serve_text *t, const tok_args *a) {
    char *text = NULL;
    moe_status s = moe_hf_apply_chat_template(t->hf, a->chat, a->generation_prompt, a->vars, &text);
    if (s == MOE_OK) {
        printf("%s\n", text);
        s = encode_print(t, text, false);
    }
    free(text);
    return s;
}

static moe_status run_bench(moe_hf_tokenizer *tok, const tok_args *a) {
    char *text = NULL;
    size_t n = 0;
    MOE_TRY(moe_cli_read_text(a->bench, &text, &n));
    moe_hf_bench b;
    moe_status s = moe_hf_bench_encode(tok, text, n, a->rounds, a->lines, &b);
    if (s == MOE_OK)
        printf("BENCH %s%s: %zu bytes -> %zu tokens; cold cache %.0f tokens/s (%.2f MB/s), warm best of %d: %.0f "
               "tokens/s (%.2f MB/s), one thread\n", a->bench, a->lines ? " by line" : "", n, b.tokens,
               b.cold_tokens_per_s, b.cold_bytes_per_s / 1e6, a->rounds - 1, b.warm_tokens_per_s,
               b.warm_bytes_per_s / 1e6);
    free(text);
    return s;
}

static moe_status run_tokenize(const tok_args *a) {
    int modes = !!a->text + !!a->decode + !!a->chat + !!a->bench;
    if (modes != 1) return moe_error(MOE_ERR_CONFIG, "tokenize: give exactly one of --text, --decode, --chat, --bench");
    moe_source src;
    MOE_TRY(moe_source_open(&src, &a->src, MOE_SOURCE_TEXT));
    serve_text *t = &src.text;
    moe_status s = MOE_OK;
    if ((a->chat || a->bench) && !t->hf)
        s = moe_error(MOE_ERR_CONFIG, "tokenize: --chat and --bench need a hub folder's tokenizer (--model DIR)");
    else if (a->text) s = encode_print(t, a->text, !a->no_special);
    else if (a->decode) s = run_decode(t, a);
    else if (a->chat) s = run_chat(t, a);
    else s = run_bench(t->hf, a);
    moe_source_close(&src);
    return s;
}

int moe_cmd_tokenize(int argc, char **argv) {
    tok_args a = {.rounds = 4};
    const moe_flag_spec specs[] = {
        MOE_SOURCE_FLAG_SPECS(a.src),
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
    moe_args pa;
    int rc = moe_cli_parse("tokenize", "moe tokenize --model DIR | --checkpoint FILE (--text T | --decode IDS | --chat JSON "
                                       "| --bench FILE) [flags]", specs, argc, argv, 0, 0, NULL, &pa);
    if (rc < 0) {
        moe_args_free(&pa);
        moe_status s = run_tokenize(&a);
        rc = s == MOE_OK ? 0 : moe_cli_fail(s);
    }
    moe_arg_list_free(&a.src.sets);
    return rc;
}
