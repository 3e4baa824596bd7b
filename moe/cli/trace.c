/* `moe trace`: a model's routing on real text (token ids, positions, per MoE layer the
 * top-k experts) into a trace file for the routing-path predictor. */
#include "moe/cli/routing.h"

#include <stdio.h>
#include <stdlib.h>

#include "moe/cli/cli.h"
#include "moe/cli/source.h"
#include "moe/offload/trace.h"
#include "moe/train/data.h"

typedef struct trace_flags {
    moe_source_flags src;
    const char *data, *out;
    int64_t tokens;
    int context, batch;
} trace_flags;

/* The first `limit` tokens of a token file, or of a text file through the model's tokenizer. */
static moe_status read_tokens(moe_source *src, const char *path, int64_t limit, moe_token_buf *ids) {
    if (moe_data_is_token_file(path)) {
        moe_token_file *tf;
        MOE_TRY(moe_data_open(path, &tf));
        uint64_t n = moe_data_count(tf) < (uint64_t)limit ? moe_data_count(tf) : (uint64_t)limit;
        ids->data = malloc(sizeof *ids->data * (n ? n : 1));
        moe_status s = ids->data ? MOE_OK : moe_error(MOE_ERR_OOM, "out of memory reading %s", path);
        if (s == MOE_OK) moe_data_read(tf, 0, n, ids->data), ids->len = ids->cap = n;
        if (s == MOE_OK && moe_data_vocab(tf) > src->cfg.model.vocab_size)
            s = moe_error(MOE_ERR_CONFIG, "%s has a vocabulary of %d tokens, the model %d", path, moe_data_vocab(tf),
                          src->cfg.model.vocab_size);
        moe_data_close(tf);
        return s;
    }
    if (!src->has_text) return moe_error(MOE_ERR_CONFIG, "%s: a text file needs the model's tokenizer", path);
    char *text = NULL;
    size_t len = 0;
    MOE_TRY(moe_cli_read_text(path, &text, &len));
    moe_status s = serve_text_encode(&src->text, text, len, false, ids);
    free(text);
    if (s == MOE_OK && (int64_t)ids->len > limit) ids->len = (size_t)limit;
    return s;
}

static moe_status run_trace(const trace_flags *f) {
    moe_source src;
    MOE_TRY(moe_source_open(&src, &f->src, MOE_SOURCE_MODEL | MOE_SOURCE_TEXT_IF_ANY));
    int seq_len = src.cfg.model.seq_len, context = f->context ? f->context : (seq_len < 128 ? seq_len : 128);
    moe_token_buf ids = {0};
    moe_trace t = {0};
    moe_status s = context <= seq_len ? read_tokens(&src, f->data, f->tokens, &ids)
                                      : moe_error(MOE_ERR_CONFIG, "--context %d exceeds the model's context %d", context, seq_len);
    if (s == MOE_OK && ids.len == 0) s = moe_error(MOE_ERR_INVALID, "%s holds no tokens", f->data);
    moe_decoder *dec = NULL; /* on --device in --dtype: the decode step timed is the one offloading speeds up */
    if (s == MOE_OK) s = moe_source_decoder_open(&src, &dec);
    if (s == MOE_OK) s = moe_trace_record(dec, src.name, ids.data, (int64_t)ids.len, context, f->batch, &t);
    int prompt = seq_len / 2 < 16 ? seq_len / 2 : 16, reps = seq_len - prompt < 16 ? seq_len - prompt : 16;
    if (s == MOE_OK && prompt > 0 && reps > 0) s = moe_trace_time_decode(dec, prompt, reps, &t.decode_step_s);
    moe_decoder_close(dec);
    if (s == MOE_OK) s = moe_trace_save(&t, f->out);
    if (s == MOE_OK)
        printf("traced %lld tokens (%lld sequences of %lld) of %s: %d MoE layers, %d experts, top-%d; decode step %.3f ms; "
               "wrote %s\n",
               (long long)t.n, (long long)(t.n / t.context), (long long)t.context, src.name, t.fp.n_moe_layers,
               t.fp.n_experts, t.fp.top_k, t.decode_step_s * 1e3, f->out);
    moe_trace_free(&t);
    moe_token_buf_free(&ids);
    moe_source_close(&src);
    return s;
}

int moe_cmd_trace(int argc, char **argv) {
    trace_flags f = {.tokens = 32768, .batch = 8};
    const moe_flag_spec specs[] = {
        MOE_SOURCE_FLAG_SPECS(f.src),
        {"--data", MOE_FLAG_STRING, "FILE", 0, 0, NULL, "the text (or token file) to trace (required)", &f.data},
        {"--out", MOE_FLAG_STRING, "FILE", 0, 0, NULL, "the trace file to write (required)", &f.out},
        {"--tokens", MOE_FLAG_I64, "N", 1, 1e12, NULL, "trace at most N tokens of the text", &f.tokens},
        {"--context", MOE_FLAG_INT, "T", 0, 1 << 20, NULL, "tokens per traced sequence (0: the model's context, at most 128)",
         &f.context},
        {"--batch", MOE_FLAG_INT, "B", 1, 4096, NULL, "sequences per forward", &f.batch},
        {0}};
    const char *usage = "moe trace --model DIR | --checkpoint FILE --data FILE.txt --out traces.h5 [flags]";
    moe_args a;
    int rc = moe_cli_parse("trace", usage, specs, argc, argv, 0, 0, NULL, &a);
    if (rc < 0) {
        moe_args_free(&a);
        moe_status s = !f.data || !f.out ? moe_error(MOE_ERR_CONFIG, "trace: --data FILE and --out FILE are required (usage: %s)", usage)
                                         : run_trace(&f);
        rc = s == MOE_OK ? 0 : moe_cli_fail(s);
    }
    moe_arg_list_free(&f.src.sets);
    return rc;
}
