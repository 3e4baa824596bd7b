/* Checkpoints in HDF5 (core/h5file.h): parameters by name with experts by *global*
 * index (so any expert-parallel layout can load them), AdamW/SGD state under the same
 * names, the step, the data-loader position, the aux-free router biases, the config
 * text and the library version. Layout:
 *   /config, /version, /run_id        strings (run_id: the run that wrote it, see train.h)
 *   /step, /optim_step, /loader_seed, /loader_step, /bad_steps      i64
 *   /params/<name>                    e.g. params/layers.0.attn.wqkv [d, 3d] f32
 *   /params/layers.3.moe.experts.17.w13   one dataset per global expert
 *   /optim/m/<name>, /optim/v/<name>  optimizer moments, same names and shapes
 *   /router_bias/layers.3.moe         [E] f32 (aux-loss-free balancing only)
 *   /tokenizer                        u8 [n]: the BPE tokenizer's file image (BPE runs only)
 * Written to a temporary file and renamed: a crash never damages the last checkpoint.
 * Reading the model alone (verify, find the newest, config, tokenizer, weights) needs no
 * optimizer: moe/model/weights.h, included here. */
#ifndef MOE_MOE_CHECKPOINT_H
#define MOE_MOE_CHECKPOINT_H

#include "moe/model/model.h"
#include "moe/model/weights.h"
#include "optim/optim.h"

typedef struct moe_train_state {
    int64_t step;         /* optimizer steps done */
    uint64_t loader_seed, loader_step;
    int64_t bad_steps;    /* non-finite steps skipped so far */
    char run_id[40];      /* the run that writes it; "" in checkpoints written before run ids */
} moe_train_state;

/* Collective under MPI: every rank calls it; the expert stacks are gathered over the EP
 * group and world rank 0 writes the file. */
moe_status moe_checkpoint_save(const char *path, const moe_model *m, const moe_optimizer *opt,
                               const moe_train_state *ts);
/* The same file written piece by piece into f (moe_h5_create .. moe_h5_commit), one
 * process: the header (config text, version, run id, tokenizer, training position, the
 * optimizer step when opt is given), then the parameters and router biases of models
 * that each hold some of the layers: m's layer j is stored as layer first_layer + j, and
 * the parameters outside the layers (embed, final_norm, lm_head, the RMoE GRU) only with
 * `top`. No optimizer state. moe convert streams a hub folder's blocks through it. */
moe_status moe_checkpoint_put_header(moe_h5 *f, const moe_config *cfg, const moe_optimizer *opt,
                                     const moe_train_state *ts);
moe_status moe_checkpoint_put_block(moe_h5 *f, const moe_model *m, int first_layer, bool top);
/* Verifies the whole file (moe_checkpoint_verify), then loads into an initialised model
 * (and optimizer, when given). Shapes must match the model's config; a missing, extra or
 * mis-shaped parameter is refused by name. */
moe_status moe_checkpoint_load(const char *path, moe_model *m, moe_optimizer *opt, moe_train_state *ts);

#endif
