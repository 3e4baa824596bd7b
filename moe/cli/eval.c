/* `moe eval`: validation loss and bits per byte of a model (hub folder or checkpoint) over
 * a token file, or over a text file tokenized with the model's tokenizer; on a file with a
 * loss mask (moe data mqar) also the recall. */
#include "moe/cli/commands.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "moe/cli/cli.h"
#include "moe/cli/source.h"
#include "moe/train/data.h"
#include "moe/train/train.h"

/* A token file, or a text file through the source's tokenizer (no special tokens added). */
static moe_status open_data(moe_source *src, const char *path, moe_token_file **tf) {
    if (moe_data_is_token_file(path)) return moe_data_open(path, tf);
    if (!src->has_text) return moe_error(MOE_ERR_CONFIG, "%s: a text file needs the model's tokenizer", path);
    char *text = NULL;
    size_t len = 0;
    MOE_TRY(moe_cli_read_text(path, &text, &len));
    moe_token_buf ids = {0};
    moe_status s = serve_text_encode(&src->text, text, len, false, &ids);
    free(text);
    if (s == MOE_OK) s = moe_data_open_tokens(path, &ids, src->text.vocab, len, tf);
    moe_token_buf_free(&ids);
    return s;
}

static moe_status run_eval(const moe_source_flags *f, const char *data) {
    moe_source src;
    MOE_TRY(moe_source_open(&src, f, MOE_SOURCE_MODEL | MOE_SOURCE_TEXT_IF_ANY));
    const moe_config *cfg = &src.cfg;
    const char *path = data ? data : cfg->data.val_path;
    moe_token_file *val = NULL;
    moe_status s = open_data(&src, path, &val);
    if (s == MOE_OK && moe_data_vocab(val) > cfg->model.vocab_size)
        s = moe_error(MOE_ERR_CONFIG, "%s has a vocabulary of %d tokens, the model %d", path, moe_data_vocab(val),
                      cfg->model.vocab_size);
    moe_eval_result r;
    moe_decoder *dec = NULL; /* the loss through the decoder's view: the weights on --device in --dtype */
    if (s == MOE_OK) s = moe_source_decoder_open(&src, &dec);
    if (s == MOE_OK) s = moe_evaluate_full((moe_model *)moe_decoder_view(dec), val, cfg->train.eval_batches, &r);
    moe_decoder_close(dec);
    if (s == MOE_OK) {
        printf("val_loss %.4f  val_bpb %.4f  perplexity %.3f", r.loss, r.bpb, exp(r.loss));
        if (moe_data_unigram_bpb(val) > 0) printf("  unigram_bpb %.4f", moe_data_unigram_bpb(val));
        if (!isnan(r.recall)) printf("  recall %.4f of %lld queries", r.recall, (long long)r.scored);
        printf("  (%d batches of %dx%d from %s)\n", cfg->train.eval_batches, cfg->data.batch_size, cfg->model.seq_len,
               path);
    }
    moe_data_close(val);
    moe_source_close(&src);
    return s;
}

int moe_cmd_eval(int argc, char **argv) {
    moe_source_flags f = {0};
    const char *data = NULL;
    const moe_flag_spec specs[] = {
        MOE_SOURCE_FLAG_SPECS(f),
        {"--data", MOE_FLAG_STRING, "FILE", 0, 0, NULL,
         "a token file (moe data prepare) or a text file (default: the config's data.val_path)", &data},
        {0}};
    moe_args a;
    int rc = moe_cli_parse("eval", "moe eval --model DIR | --checkpoint FILE [flags]", specs, argc, argv, 0, 0, NULL, &a);
    if (rc < 0) {
        moe_args_free(&a);
        moe_status s = run_eval(&f, data);
        rc = s == MOE_OK ? 0 : moe_cli_fail(s);
    }
    moe_arg_list_free(&f.sets);
    return rc;
}
