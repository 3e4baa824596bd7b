/* `moe tokenizer train`: a byte-level BPE tokenizer from text files (moe/model/tokenizer.h). */
#include "moe/cli/commands.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe/cli/cli.h"
#include "moe/model/tokenizer.h"

static moe_status run_tokenizer_train(const moe_args *a, int vocab, const char *out) {
    if (!out) return moe_error(MOE_ERR_CONFIG, "tokenizer train: --out FILE.tok is required");
    char *text = NULL;
    size_t len = 0;
    MOE_TRY(moe_cli_read_texts(a->positional, a->n_positional, &text, &len));
    moe_tokenizer *tok = NULL;
    moe_status s = len ? moe_tokenizer_train_bpe(text, len, vocab, &tok) : moe_error(MOE_ERR_INVALID, "tokenizer train: the text files are empty");
    free(text);
    if (s == MOE_OK) s = moe_tokenizer_save(tok, out);
    if (s == MOE_OK) printf("trained a BPE tokenizer with %d tokens: %s\n", moe_tokenizer_vocab_size(tok), out);
    moe_tokenizer_free(tok);
    return s;
}

int moe_cmd_tokenizer(int argc, char **argv) {
    const char *usage_line = "moe tokenizer train --vocab N --out FILE.tok TEXT...";
    if (argc < 1 || strcmp(argv[0], "train")) {
        bool help = argc > 0 && (!strcmp(argv[0], "--help") || !strcmp(argv[0], "-h"));
        fprintf(help ? stdout : stderr, "usage: %s   (moe tokenizer train --help lists the flags)\n", usage_line);
        return help ? 0 : 2;
    }
    const char *out = NULL;
    int vocab = 0;
    const moe_flag_spec specs[] = {
        {"--vocab", MOE_FLAG_INT, "N", 257, 1 << 24, NULL, "tokens: the 256 bytes and N - 256 merges (required)", &vocab},
        {"--out", MOE_FLAG_STRING, "FILE", 0, 0, NULL, "the tokenizer file to write (required)", &out},
        {0}};
    moe_args a;
    int rc = moe_cli_parse("tokenizer train", usage_line, specs, argc - 1, argv + 1, 1, INT32_MAX, "one or more TEXT files are", &a);
    if (rc >= 0) return rc;
    moe_status s = vocab ? run_tokenizer_train(&a, vocab, out) : moe_error(MOE_ERR_CONFIG, "tokenizer train: --vocab N is required");
    moe_args_free(&a);
    return s == MOE_OK ? 0 : moe_cli_fail(s);
}
