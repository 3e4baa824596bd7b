/* `moe data mqar`: writes the MQAR task's train.bin and val.bin (see moe/train/mqar.h). */
#include "moe/cli/data_mqar.h"

#include <math.h>
#include <stdio.h>

#include "moe/cli/cli.h"
#include "moe/train/mqar.h"

int moe_cmd_data_mqar(int argc, char **argv) {
    const char *usage_line = "moe data mqar --out DIR --seq-len T --pairs P [flags]";
    const char *out = NULL;
    moe_mqar_spec spec = {.seq_len = 0, .pairs = 0, .vocab = 8192};
    int64_t n_train = 100000, n_val = 1000, seed = 1;
    const moe_flag_spec specs[] = {
        {"--out", MOE_FLAG_STRING, "DIR", 0, 0, NULL, "where train.bin and val.bin go (required)", &out},
        {"--seq-len", MOE_FLAG_INT, "T", 4, 1 << 20, NULL, "tokens the model reads per example: model.seq_len (required)",
         &spec.seq_len},
        {"--pairs", MOE_FLAG_INT, "P", 1, 1 << 18, NULL, "key-value pairs per example, each queried once; 4P <= T (required)",
         &spec.pairs},
        {"--vocab", MOE_FLAG_INT, "V", 4, 1 << 24, NULL, "vocabulary: keys from [1, V/2), values from [V/2, V)", &spec.vocab},
        {"--train", MOE_FLAG_I64, "N", 1, 1e12, NULL, "training examples", &n_train},
        {"--val", MOE_FLAG_I64, "M", 1, 1e12, NULL, "validation examples", &n_val},
        {"--seed", MOE_FLAG_I64, "S", 0, 9007199254740992.0, NULL, "the same seed gives the same files", &seed},
        {0}};
    moe_args a;
    int rc = moe_cli_parse("data mqar", usage_line, specs, argc, argv, 0, 0, NULL, &a);
    if (rc >= 0) return rc;
    moe_args_free(&a);
    moe_status s = MOE_OK;
    if (!out || !spec.seq_len || !spec.pairs)
        s = moe_error(MOE_ERR_CONFIG, "data mqar: --out, --seq-len and --pairs are required (usage: %s)", usage_line);
    spec.seed = (uint64_t)seed;
    moe_mqar *g = NULL;
    if (s == MOE_OK && (s = moe_mqar_create(&spec, &g)) == MOE_ERR_INVALID) { /* a bad flag: a usage error */
        char msg[512];
        snprintf(msg, sizeof msg, "%s", moe_last_error());
        s = moe_error(MOE_ERR_CONFIG, "%s", msg);
    }
    if (s == MOE_OK) s = moe_mqar_write(g, out, (uint64_t)n_train, (uint64_t)n_val);
    moe_mqar_free(g);
    if (s != MOE_OK) return moe_cli_fail(s);
    int half = spec.vocab - spec.vocab / 2;
    printf("prepared %s: mqar, seq_len %d, %d pairs, vocab %d, %lld train and %lld val examples of %d tokens "
           "(%d scored each); chance recall %.5f (a uniform guess among the values), %.4f bits per scored token\n",
           out, spec.seq_len, spec.pairs, spec.vocab, (long long)n_train, (long long)n_val, spec.seq_len + 1, spec.pairs,
           1.0 / half, log2((double)half));
    return 0;
}
