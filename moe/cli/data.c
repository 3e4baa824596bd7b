/* `moe data prepare`: text files into token files (moe/train/data.h); `moe data mqar` is
 * data_mqar.c. */
#include "moe/cli/commands.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "moe/cli/cli.h"
#include "moe/cli/data_mqar.h"
#include "moe/train/data.h"

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
        {"--tokenizer", MOE_FLAG_STRING, "T", 0, 0, NULL, "byte, or a BPE file from moe tokenizer train", &tk},
        {"--val-fraction", MOE_FLAG_DOUBLE, "F", 0, 1, NULL, "share of the text kept for validation", &frac, true, true},
        {0}};
    moe_args a;
    int rc = moe_cli_parse("data prepare", usage_line, specs, argc - 1, argv + 1, 1, INT32_MAX, "one or more TEXT files are", &a);
    if (rc >= 0) return rc;
    moe_tokenizer *tok = NULL;
    moe_status s = out ? MOE_OK : moe_error(MOE_ERR_CONFIG, "data prepare: --out DIR is required");
    if (s == MOE_OK) s = !strcmp(tk, "byte") ? ((tok = moe_tokenizer_byte()) ? MOE_OK : moe_last_status()) : moe_tokenizer_load(tk, &tok);
    moe_data_summary sum;
    if (s == MOE_OK) s = moe_data_prepare(a.positional, a.n_positional, tok, frac, out, &sum);
    moe_tokenizer_free(tok);
    moe_args_free(&a);
    if (s != MOE_OK) return moe_cli_fail(s);
    printf("prepared %s: vocab %d, %llu train tokens, %llu val tokens, %.3f bytes/token, unigram baseline %.4f bits/byte\n",
           out, sum.vocab_size, (unsigned long long)sum.train_tokens, (unsigned long long)sum.val_tokens,
           sum.val_bytes_per_token, sum.unigram_bpb);
    return 0;
}
