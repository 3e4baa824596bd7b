/* The model a command runs on: a Hugging Face hub folder (--model DIR: config.json,
 * safetensors, tokenizer.json, generation_config.json) or one of our checkpoints
 * (--checkpoint FILE: the stored config, weights and byte/BPE tokenizer), opened the same
 * way for generate, eval, logits and tokenize.
 *
 * The master weights load on the host in f32 (hub folders and checkpoints alike); --device
 * and --dtype say where and in what a decoder over them runs (moe_source_decoder_open: on
 * cuda only the cast view takes device memory; default dtype bf16 on cuda, f32 on the cpu).
 * `--set` on a hub folder may change anything but its model.* keys (they come from
 * config.json), except model.seq_len (the context). A checkpoint is built from its stored
 * config with the --set overrides. */
#ifndef MOE_CLI_SOURCE_H
#define MOE_CLI_SOURCE_H

#include <stdbool.h>
#include <stdint.h>

#include "core/status.h"
#include "moe/cli/args.h"
#include "moe/infer/decoder.h"
#include "moe/infer/sample.h"
#include "moe/model/model.h"
#include "moe/serve/text.h"

typedef struct moe_source_flags {
    const char *model_dir, *checkpoint, *device, *dtype;
    moe_arg_list sets;
} moe_source_flags;

/* The flag table entries of moe_source_flags (inside a moe_flag_spec array). */
#define MOE_SOURCE_FLAG_SPECS(sf)                                                                                    \
    {"--model", MOE_FLAG_STRING, "DIR", 0, 0, NULL, "a Hugging Face hub folder (config.json, safetensors, tokenizer.json)", \
     &(sf).model_dir},                                                                                              \
    {"--checkpoint", MOE_FLAG_STRING, "FILE", 0, 0, NULL, "one of our checkpoints (.h5)", &(sf).checkpoint},          \
    {"--device", MOE_FLAG_STRING, "DEV", 0, 0, "cpu|cuda", "where to run (default: a checkpoint's train.device, cpu " \
     "for a hub folder)", &(sf).device},                                                                            \
    {"--dtype", MOE_FLAG_STRING, "T", 0, 0, "f32|bf16", "compute dtype (default: bf16 on cuda, f32 on the cpu)",     \
     &(sf).dtype},                                                                                                  \
    {"--set", MOE_FLAG_MULTI, "KEY=VALUE", 0, 0, NULL, "override a config key", &(sf).sets}

/* What to open. */
typedef enum moe_source_parts {
    MOE_SOURCE_MODEL = 1,         /* the weights */
    MOE_SOURCE_TEXT = 2,          /* the tokenizer; its absence is an error naming the file */
    MOE_SOURCE_TEXT_IF_ANY = 4,   /* the tokenizer when the hub folder has tokenizer.json */
} moe_source_parts;

typedef struct moe_source {
    const char *name;        /* the folder or file, for messages */
    bool hub;                /* a hub folder */
    moe_config cfg;          /* the effective config (train.device / dtype: where decoders run) */
    moe_model model;         /* the master weights, on the host in f32 */
    moe_device dev;          /* where decoders over the model run (--device) */
    moe_dtype dtype;         /* and their compute dtype (--dtype) */
    bool has_model;
    serve_text text;         /* tokenizer, chat template, end-of-sequence ids */
    bool has_text;
    int32_t eos[SERVE_MAX_EOS]; /* the model's end-of-sequence ids (hub: generation_config.json) */
    int n_eos;
    moe_sampler sampling;    /* default sampling: generation_config.json (do_sample false: greedy),
                              * for checkpoints temperature 0.8, top-p 0.95 */
} moe_source;

/* Opens `parts` of the source the flags name (exactly one of --model, --checkpoint). */
moe_status moe_source_open(moe_source *src, const moe_source_flags *f, unsigned parts);
/* Progress of loading a model's weights, on stderr (stdout is left to the command): a line
 * as it starts (the path; a hub folder's shard count) and one when it is done with the
 * parameter count and the seconds taken. begin returns the start time for end. */
double moe_source_load_begin(const char *path, bool hub);
void moe_source_load_end(const moe_model *m, double started);
void moe_source_close(moe_source *src);
/* Where a decoder runs for --device / --dtype (either may be NULL) without a source: the
 * defaults and checks of moe_source_open with the cpu as the default device. */
moe_status moe_source_placement(const char *device, const char *dtype, moe_device *dev, moe_dtype *dt);
/* --experts auto|grouped|gathered|sorted (the flag's choices) as a path; NULL: auto. */
moe_expert_path moe_cli_expert_path(const char *name);
#define MOE_CLI_EXPERTS_CHOICES "auto|grouped|gathered|sorted"
#define MOE_CLI_EXPERTS_HELP                                                                                      \
    "how MoE layers run their experts: auto (on a device gathered for few tokens, else sorted), grouped "       \
    "(routing read back and planned on the host: the reference), gathered (wherever a layer allows it), sorted " \
    "(routing sorted by expert on the device, only the expert offsets read back)"
/* A decoder over the source's model on src->dev in src->dtype. */
moe_status moe_source_decoder_open(moe_source *src, moe_decoder **out);

/* Tokens the tokenizer knows, else the model's vocabulary. */
int moe_source_vocab(const moe_source *src);

#endif
