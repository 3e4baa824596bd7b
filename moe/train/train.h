/* The training loop behind `moe train`: data, model, optimizer, schedule, clipping,
 * gradient accumulation, NaN/Inf step skipping, periodic evaluation, metrics (JSON lines
 * in the run directory and a progress line on stderr), checkpoints and exact resume. */
#ifndef MOE_MOE_TRAIN_H
#define MOE_MOE_TRAIN_H

#include "moe/model/config.h"
#include "moe/train/signals.h"

/* The run directory (checkpoint.dir, or the --resume one) holds metrics.jsonl and the
 * checkpoints ckpt-<step>.h5. Each fresh run draws a run id, stored in its checkpoints
 * and kept on resume; checkpoint.keep deletes only older checkpoints carrying this id,
 * never the one just written. A fresh run refuses a directory that holds a run unless
 * `overwrite`; --resume never creates one. */
typedef struct moe_train_options {
    const char *resume_dir;    /* continue from the newest good checkpoint there, or NULL */
    const char *init_weights;  /* a fresh run starts from this checkpoint's parameters (not its step
                                * or optimizer state), or NULL */
    bool quiet;                /* no progress line */
    bool overwrite;            /* a fresh run may replace the run in checkpoint.dir (deletes its files) */
    int64_t stop_after;        /* > 0: save a checkpoint and stop after this many steps (as if interrupted) */
    int64_t fail_at_step;      /* > 0 (tests): step N's backward fails, as a device fault would */
    moe_signal_watch *signals; /* stop / checkpoint requests (signals.h), or NULL */
} moe_train_options;

typedef struct moe_train_summary {
    int64_t steps_done;
    double final_loss, val_loss, val_bpb, unigram_bpb;
    double val_recall; /* a validation file with a loss mask (MQAR): the recall at the last evaluation, else NAN */
    double tokens_per_s;
    size_t step_mem_peak; /* bytes: the step arena's peak during the run (activations, grads of activations, scratch) */
    int64_t bad_steps;
    int stop_signal; /* with MOE_ERR_INTERRUPTED: the signal that stopped the run */
    char last_checkpoint[640];
} moe_train_summary;

moe_status moe_train_run(const moe_config *cfg, const moe_train_options *opt, moe_train_summary *sum);

/* Validation loss (nats per token) and bits per byte over cfg->train.eval_batches batches. */
typedef struct moe_model moe_model;
typedef struct moe_token_file moe_token_file;
moe_status moe_evaluate(moe_model *m, const moe_token_file *val, int batches, double *loss, double *bpb);

/* The same, and on a file with a loss mask (moe/train/mqar.h) the recall: the share of
 * the scored targets whose largest logit is the target (loss and bpb then count the
 * scored targets only: bpb is bits per scored token when the file says one byte per token). */
typedef struct moe_eval_result {
    double loss, bpb;
    double recall;  /* NAN without a loss mask */
    int64_t scored; /* scored targets counted (0 without a mask) */
} moe_eval_result;
moe_status moe_evaluate_full(moe_model *m, const moe_token_file *val, int batches, moe_eval_result *r);

#endif
