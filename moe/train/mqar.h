/* Multi-query associative recall (MQAR, the Zoology layout): a synthetic task that
 * measures how well a token mixer recalls what it has seen. One example is T + 1 tokens:
 *
 *   k1 v1 k2 v2 ... kP vP | filler ... k_i v_i ... filler ... k_j v_j ... filler
 *   \____ 2P: context ___/  \____________ T + 1 - 2P: queries __________________/
 *
 * Keys are P distinct tokens of [1, V/2), values P distinct tokens of [V/2, V). Every key
 * is queried once, in the query part at offset 2g (g distinct gaps in [0, (T - 2P) / 2),
 * drawn with Zoology's power law p(g) ~ (g + 1)^(a - 1), a = 0.01: most queries come
 * soon after the context), its value right after it; every other query-part token is
 * uniform in [0, V). The model reads tokens 0..T-1 and predicts 1..T; only the values
 * after query keys are scored (Zoology: a label only where the input is a query key).
 * Unlike Zoology, whose input after a query key is filler, the value itself follows, as
 * our token files give targets = inputs shifted by one; no later query can use it (each
 * key is queried once).
 *
 * moe_mqar_write stores N examples as a token file of records of T + 1 tokens with a loss
 * mask (moe/train/data.h): the loader then reads whole examples and scores only the
 * masked targets. Examples are drawn from a counter-based hash of (seed, split, index):
 * the same seed gives the same files, train and val draw from separate streams. */
#ifndef MOE_TRAIN_MQAR_H
#define MOE_TRAIN_MQAR_H

#include <stdint.h>

#include "core/status.h"
#include "core/tensor.h"

typedef struct moe_mqar_spec {
    int seq_len; /* T: the tokens a model reads per example (4P <= T) */
    int pairs;   /* P key-value pairs, each queried once */
    int vocab;   /* V: keys from [1, V/2), values from [V/2, V) (P < V/2) */
    uint64_t seed;
} moe_mqar_spec;

typedef enum moe_mqar_split { MOE_MQAR_TRAIN, MOE_MQAR_VAL } moe_mqar_split;

typedef struct moe_mqar moe_mqar;

/* Checks the spec (MOE_ERR_INVALID naming the broken bound) and tabulates the gap law. */
moe_status moe_mqar_create(const moe_mqar_spec *spec, moe_mqar **out);
void moe_mqar_free(moe_mqar *g);

/* Example `index` of `split` (g's scratch space is used: one thread per generator): tokens[T + 1] and scored[T + 1] (1 where token j is a
 * value after its query key: the target scored when predicting j from j - 1). */
void moe_mqar_example(moe_mqar *g, moe_mqar_split split, uint64_t index, int32_t *tokens, uint8_t *scored);

/* out_dir/train.bin and out_dir/val.bin (n_train, n_val >= 1 examples; the directory is
 * created when missing). Header: vocab V, records of T + 1 tokens, the loss mask, one
 * "byte" per token (val_bpb = bits per scored token) and as baseline log2(V - V/2), the
 * bits of a uniform guess among the values. */
moe_status moe_mqar_write(moe_mqar *g, const char *out_dir, uint64_t n_train, uint64_t n_val);

/* Recall from hidden states: counts the scored rows (targets[i] >= 0 of targets[N]; -1
 * is not scored) and those whose largest logit h[i] . w[v] is at the target (the first
 * largest on ties), adding them to *scored and *hits. h [N, d], w [V, d] on one device. */
moe_status moe_recall_count(moe_tensor *h, moe_tensor *w, const int32_t *targets, int64_t *hits,
                            int64_t *scored);

#endif
