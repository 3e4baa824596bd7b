/* model.init_from: `moe train` from a Hugging Face hub folder. The model comes from the
 * folder's config.json (model.* and the router's model features: type, score, groups,
 * scale, renormalisation, an aux-free selection bias); a key the training config sets to
 * a value the folder disagrees with is refused by name (model.seq_len, dropout and
 * init_std stay the config's). Text goes through the folder's tokenizer (data.tokenizer:
 * hf) unless the config names another. A fresh run starts from the folder's weights,
 * written to a temporary checkpoint that the trainer loads. */
#ifndef MOE_CLI_INIT_FROM_H
#define MOE_CLI_INIT_FROM_H

#include <stdbool.h>
#include <stddef.h>

#include "core/status.h"
#include "moe/model/config.h"

/* cfg (loaded and validated, model.init_from set) becomes the merged config. With `fresh`
 * the folder's weights are written to a new temporary checkpoint whose path goes to
 * weights[cap] (the caller deletes it after training); else weights is "". */
moe_status moe_cli_init_from(moe_config *cfg, bool fresh, char *weights, size_t cap);

#endif
