/* `moe data prepare`: text files into token files (moe/train/data.h) through our byte or
 * BPE tokenizer or a hub folder's tokenizer.json; `moe data mqar` is data_mqar.c. */
#include "moe/cli/commands.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "moe/cli/cli.h"
#include "moe/cli/data_mqar.h"
#include "moe/cli/source.h"
#include "moe/train/data.h"

static moe_status hub_encode(void *text, const char *s, size_t len, moe_token_buf *out) {
    return serve_text_encode(text, s, len, false, out);
}

/* The text files through --tokenizer: byte, a BPE file, or a hub folder's tokenizer. */
static moe_status prepare(const moe_args *a, const char *tk, double frac, const char *out, moe_data_summary *sum) {
    struct stat st;
    if (strcmp(tk, "byte") && stat(tk, &st) == 0 && S_ISDIR(st.st_mode)) {
        moe_source src;
        MOE_TRY(moe_source_open(&src, &(moe_source_flags){.model_dir = tk}, MOE_SOURCE_TEXT));
        moe_text_encoder enc = {hub_encode, &src.text, src.text.vocab};
        moe_status s = moe_data_prepare_with(a->positional, a->n_positional, &enc, frac, out, sum);
        moe_source_close(&src);
        return s;
    }
    moe_tokenizer *tok = NULL;
    MOE_TRY(!strcmp(tk, "byte") ? ((tok = moe_tokenizer_byte()) ? MOE_OK : moe_last_status()) : moe_tokenizer_load(tk, &tok));
    moe_status s = moe_data_prepare(a->positional, a->n_positional, tok, frac, out, sum);
    moe_tokenizer_free(tok);
    return s;
}

int moe_cmd_data(int argc, char **argv) {
    const char *usage_line = "moe data prepare --out DIR [flags] TEXT...";
    if (argc >= 1 && !strcmp(argv[0], "mqar")) return moe_cmd_data_mqar(argc - 1, argv + 1);
    if (argc < 1 || strcmp(argv[0], "prepare")) {
        bool help = argc > 0 && (!strcmp(argv[0], "--help") || !strcmp(argv[0], "-h"));
        fprintf(help ? stdout : stderr, "usage: %s\n       moe data mqar --out DIR --seq-len T --pairs P [flags]\n"
                "   (moe data prepare|mqar --help lists the flags)\n", usage_line);
        return help ? 0 : 2;
    }
    const char *out = NULL, *tk = "byte";
    double frac = 0.05;
    const moe_flag_spec specs[] = {
        {"--out", MOE_FLAG_STRING, "DIR", 0, 0, NULL, "where train.bin and val.bin go (required)", &out},
        {"--tokenizer", MOE_FLAG_STRING, "T", 0, 0, NULL,
         "byte, a BPE file from moe tokenizer train, or a hub folder (its tokenizer.json)", &tk},
        {"--val-fraction", MOE_FLAG_DOUBLE, "F", 0, 1, NULL, "share of the text kept for validation", &frac, true, true},
        {0}};
    moe_args a;
    int rc = moe_cli_parse("data prepare", usage_line, specs, argc - 1, argv + 1, 1, INT32_MAX, "one or more TEXT files are", &a);
    if (rc >= 0) return rc;
    moe_data_summary sum;
    moe_status s = out ? prepare(&a, tk, frac, out, &sum) : moe_error(MOE_ERR_CONFIG, "data prepare: --out DIR is required");
    moe_args_free(&a);
    if (s != MOE_OK) return moe_cli_fail(s);
    printf("prepared %s: vocab %d, %llu train tokens, %llu val tokens, %.3f bytes/token, unigram baseline %.4f bits/byte\n",
           out, sum.vocab_size, (unsigned long long)sum.train_tokens, (unsigned long long)sum.val_tokens,
           sum.val_bytes_per_token, sum.unigram_bpb);
    return 0;
}
