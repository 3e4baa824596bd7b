/* Hugging Face hub folders (config.json + safetensors, one file or shards with an index)
 * loaded into our model, tensor by tensor from the memory-mapped files: nn.Linear weights
 * [out, in] transposed into our [in, out] matrices, q/k/v concatenated into wqkv, each
 * expert's gate/up projections side by side in its w13 slice, bf16/f16 widened to the f32
 * masters. Every tensor of the files must be used and have the shape config.json implies;
 * errors name the file, the tensor and what was expected. CPU models only. */
#ifndef MOE_HF_HF_MODEL_H
#define MOE_HF_HF_MODEL_H

#include "moe/hf/hf_config.h"
#include "moe/infer/decoder.h"
#include "moe/model/model.h"

/* dir -> a freshly initialised *m (free with moe_model_free) and info (eos ids etc.).
 * On error *m is freed. */
moe_status moe_hf_load(const char *dir, moe_model *m, moe_hf_info *info);

/* The same load block by block, for a caller that keeps one block at a time (moe convert
 * streams a folder into a checkpoint so): the folder's config and mapped files; the
 * parameters outside the blocks into any model of the same widths and vocabulary; the
 * folder's layer `layer` into m->blocks[block], a block of the same structure (dense or
 * MoE, its experts, its attention); then the check that every tensor found a place. Each
 * tensor's mapped pages are dropped once copied. moe_hf_load is these steps on one model. */
typedef struct moe_hf_reader moe_hf_reader;
moe_status moe_hf_reader_open(const char *dir, moe_hf_reader **out);
const moe_config *moe_hf_reader_config(const moe_hf_reader *r);
/* The bytes of its safetensors files (the model's size on disk). */
int64_t moe_hf_reader_bytes(const moe_hf_reader *r);
moe_status moe_hf_reader_load_top(moe_hf_reader *r, moe_model *m);
moe_status moe_hf_reader_load_block(moe_hf_reader *r, moe_model *m, int block, int layer);
moe_status moe_hf_reader_finish(moe_hf_reader *r);
void moe_hf_reader_close(moe_hf_reader *r);

/* Writes m as dir/config.json + dir/model.safetensors (f32) in the layout of model_type
 * (NULL: the family whose features cover the model's, see moe_hf_config_format); dir must
 * exist. moe_hf_load of the result gives back the same parameters bit for bit. */
moe_status moe_hf_export(const moe_model *m, const char *model_type, const char *dir);

/* Greedy decoding through decoder d (a decode state of its own): prompt [n_prompt] then
 * n_new tokens into out [n_prompt + n_new] (prompt included). Ids in `banned` (e.g. the eos
 * ids while a minimum length is asked for) are never chosen; n_banned may be 0. */
moe_status moe_hf_generate_greedy(moe_decoder *d, const int32_t *prompt, int n_prompt, int n_new, const int *banned,
                                  int n_banned, int32_t *out);

#endif
