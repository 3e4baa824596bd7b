/* `moe logits`: the logits of every position of a prompt (hub folder or checkpoint), in one
 * forward without cache. --out FILE.safetensors writes them as the f32 tensor "logits" [T, V]
 * (with the prompt's ids as "input_ids" [T], f32); without it each position's --top K ids
 * and logits are printed ("t id=ID: id:logit ..."). */
#include "moe/cli/commands.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/memory.h"
#include "moe/cli/cli.h"
#include "moe/cli/source.h"
#include "moe/hf/safetensors.h"
#include "moe/infer/decoder.h"

typedef struct logits_flags {
    moe_source_flags src;
    const char *prompt, *prompt_ids, *out;
    int top;
} logits_flags;

static void print_position(const float *lg, int V, int top, int t, int32_t id) {
    printf("%d id=%d:", t, id);
    bool *used = calloc((size_t)V, sizeof *used);
    for (int j = 0; used && j < top && j < V; j++) {
        int best = -1;
        for (int v = 0; v < V; v++)
            if (!used[v] && (best < 0 || lg[v] > lg[best])) best = v;
        used[best] = true;
        printf(" %d:%.6g", best, lg[best]);
    }
    free(used);
    printf("\n");
}

typedef struct logits_file {
    const float *logits; /* [T, V] */
    const int32_t *ids;  /* [T] */
    size_t T, V;
} logits_file;

/* Tensor 0: the logits; tensor 1: the ids. */
static void fill_tensor(void *user, int i, float *values) {
    const logits_file *lf = user;
    if (i == 0) memcpy(values, lf->logits, sizeof(float) * lf->T * lf->V);
    for (size_t t = 0; i == 1 && t < lf->T; t++) values[t] = (float)lf->ids[t];
}

static moe_status write_logits(const char *path, const float *lg, const moe_token_buf *ids, int V) {
    const moe_st_out t[2] = {{.name = "logits", .ndim = 2, .shape = {(int64_t)ids->len, V}},
                             {.name = "input_ids", .ndim = 1, .shape = {(int64_t)ids->len}}};
    logits_file lf = {lg, ids->data, ids->len, (size_t)V};
    MOE_TRY(moe_st_write_f32(path, t, 2, fill_tensor, &lf));
    printf("%s: logits [%zu, %d]\n", path, ids->len, V);
    return MOE_OK;
}

static moe_status prompt_ids(const logits_flags *f, moe_source *src, moe_token_buf *ids) {
    if (!f->prompt == !f->prompt_ids) return moe_error(MOE_ERR_CONFIG, "logits: give --prompt-ids IDS or --prompt TEXT");
    if (f->prompt_ids) return moe_cli_parse_ids("--prompt-ids", f->prompt_ids, src->cfg.model.vocab_size, MOE_IDS_EMPTY_REFUSED, ids);
    MOE_TRY(serve_text_encode(&src->text, f->prompt, strlen(f->prompt), true, ids));
    return ids->len ? MOE_OK : moe_error(MOE_ERR_INVALID, "logits: the prompt is empty");
}

static moe_status run_logits(const logits_flags *f) {
    moe_source src;
    MOE_TRY(moe_source_open(&src, &f->src, MOE_SOURCE_MODEL | (f->prompt ? MOE_SOURCE_TEXT : 0)));
    moe_token_buf ids = {0};
    int V = src.cfg.model.vocab_size;
    float *lg = NULL;
    moe_status s = prompt_ids(f, &src, &ids);
    if (s == MOE_OK && (int64_t)ids.len > src.cfg.model.seq_len)
        s = moe_error(MOE_ERR_CONFIG, "logits: %zu tokens, the model's context is %d", ids.len, src.cfg.model.seq_len);
    if (s == MOE_OK && !(lg = malloc(sizeof(float) * ids.len * (size_t)V)))
        s = moe_error(MOE_ERR_OOM, "logits: out of host memory for %zu x %d logits", ids.len, V);
    moe_decoder *dec = NULL;
    if (s == MOE_OK) s = moe_source_decoder_open(&src, &dec);
    if (s == MOE_OK) s = moe_decoder_logits(dec, ids.data, 1, (int)ids.len, 0, lg, NULL);
    moe_decoder_close(dec);
    if (s == MOE_OK && f->out) s = write_logits(f->out, lg, &ids, V);
    for (size_t t = 0; s == MOE_OK && !f->out && t < ids.len; t++)
        print_position(lg + t * (size_t)V, V, f->top, (int)t, ids.data[t]);
    free(lg);
    moe_token_buf_free(&ids);
    moe_step_reset();
    moe_source_close(&src);
    return s;
}

int moe_cmd_logits(int argc, char **argv) {
    logits_flags f = {.top = 5};
    const moe_flag_spec specs[] = {
        MOE_SOURCE_FLAG_SPECS(f.src),
        {"--prompt-ids", MOE_FLAG_STRING, "IDS", 0, 0, NULL, "the tokens, e.g. 5,17,42", &f.prompt_ids},
        {"--prompt", MOE_FLAG_STRING, "TEXT", 0, 0, NULL, "the tokens of a text (the model's tokenizer)", &f.prompt},
        {"--out", MOE_FLAG_STRING, "FILE", 0, 0, NULL, "write the logits [T, V] as f32 tensor \"logits\" of a safetensors file",
         &f.out},
        {"--top", MOE_FLAG_INT, "K", 1, 1 << 24, NULL, "without --out: print the K largest logits per position", &f.top},
        {0}};
    moe_args a;
    int rc = moe_cli_parse("logits", "moe logits --model DIR | --checkpoint FILE --prompt-ids IDS [--out FILE.safetensors]",
                           specs, argc, argv, 0, 0, NULL, &a);
    if (rc < 0) {
        moe_args_free(&a);
        moe_status s = run_logits(&f);
        rc = s == MOE_OK ? 0 : moe_cli_fail(s);
    }
    moe_arg_list_free(&f.src.sets);
    return rc;
}
