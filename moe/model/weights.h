/* A checkpoint's model, read without the trainer: verification, the newest good
 * checkpoint of a run, the stored config and tokenizer, and the weights (parameters and
 * router biases). The file layout and the writer are in moe/train/checkpoint.h, which
 * adds the optimizer state and the training position; this reader needs no optim/, so
 * inference, serving and conversion load checkpoints through it.
 *
 * The second half is the piece naming both sides share: a parameter is stored whole, or,
 * for an expert stack [E_local, rows, cols], as one [rows, cols] dataset per *global*
 * expert ("layers.3.moe.experts.17.w13"), so any expert-parallel layout reads any file. */
#ifndef MOE_MODEL_WEIGHTS_H
#define MOE_MODEL_WEIGHTS_H

#include <stddef.h>
#include <stdint.h>

#include "core/h5file.h"
#include "moe/model/model.h"
#include "moe/model/tokenizer.h"

/* Checks every dataset's CRC-32 and that the training state is there: MOE_OK, or
 * MOE_ERR_FORMAT / MOE_ERR_IO with a message naming the file and the first fault. The one
 * verification behind every reader: load, resume's choice of checkpoint, inspect --verify. */
moe_status moe_checkpoint_verify(const char *path);
/* The newest checkpoint "ckpt-<step>.h5" of `dir` that passes moe_checkpoint_verify;
 * newer ones that fail are skipped with a warning naming them. */
moe_status moe_checkpoint_find_latest(const char *dir, char *path, size_t cap);
/* The config text stored in a checkpoint (malloc'd). */
moe_status moe_checkpoint_read_config(const char *path, char **text);
/* The tokenizer stored in a checkpoint, or *tok = NULL when it holds none (byte-level
 * runs, or a BPE file that could not be read at save time). */
moe_status moe_checkpoint_read_tokenizer(const char *path, moe_tokenizer **tok);
/* Verifies the whole file, then loads its parameters and router biases into an
 * initialised model. Shapes must match the model's config; a missing or mis-shaped
 * parameter is refused by name. */
moe_status moe_checkpoint_load_weights(const char *path, moe_model *m);

/* ---- the piece naming, shared with the writer (moe/train/checkpoint.c) ---- */

/* Receives one stored tensor (a whole parameter or one expert's slice) by its name. */
typedef moe_status (*moe_ckpt_piece_fn)(const char *name, moe_tensor *piece, void *ctx);
/* The dataset name base of an expert stack ("layers.3.moe.experts.w13"). */
const char *moe_ckpt_stack_base(const moe_param_ref *p);
/* The name of global expert e of stack `base` ("layers.3.moe.experts.<e>.w13"). */
void moe_ckpt_expert_piece_name(const char *base, int64_t e, char *name, size_t cap);
/* Slice j of parameter p's stack when it holds global expert e, else -1. */
int64_t moe_ckpt_local_slot(const moe_param_ref *p, int64_t e);
/* Calls fn for each stored tensor of parameter p held on this rank, with t its values (or
 * an optimizer state of the same shape): t whole, or one 2-D view per expert of a stack. */
moe_status moe_ckpt_for_each_piece(const moe_param_ref *p, moe_tensor *t, moe_ckpt_piece_fn fn, void *ctx);
/* Calls fn for each MoE layer's router bias ("layers.<i>.moe"; layers without one skipped). */
moe_status moe_ckpt_for_each_router_bias(const moe_model *m, moe_ckpt_piece_fn fn, void *ctx);
/* Fills t (parameter p's values or a state of its shape) from group/<piece name>. */
moe_status moe_ckpt_read_pieces(moe_h5 *f, const char *group, const moe_param_ref *p, moe_tensor *t);
/* Every parameter from /params and every router bias from /router_bias of an open file. */
moe_status moe_ckpt_read_model(moe_h5 *f, moe_model *m);

#endif
