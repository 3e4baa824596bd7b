/* Next-token sampling from logits: greedy, temperature, top-k and top-p (nucleus).
 *
 * With temperature T > 0 the candidates are the tokens sorted by probability
 * softmax(logits / T) (ties by id), cut to the k most probable (top_k > 0), then to the
 * shortest prefix whose mass reaches top_p of the whole (the nucleus; at least one
 * token); one token is drawn from what is left, renormalised, with the uniform number
 * Philox(seed, counter), and the counter advances. T = 0 is greedy (the first largest
 * logit) and draws nothing. */
#ifndef MOE_MOE_SAMPLE_H
#define MOE_MOE_SAMPLE_H

#include <stdint.h>

#include "core/status.h"

typedef struct moe_sampler {
    double temperature; /* >= 0, finite; 0 = greedy */
    int top_k;          /* >= 0; 0 = off */
    double top_p;       /* in [0, 1]; 1 = off, 0 keeps only the most probable token */
    uint64_t seed, counter;
} moe_sampler;

/* Picks a token from logits[V] into *out. The same (seed, counter) gives the same token.
 * MOE_ERR_INVALID for settings outside the ranges above or V < 1, MOE_ERR_NUMERIC for a
 * NaN or infinite logit (naming its index), MOE_ERR_OOM when the candidate list cannot be
 * allocated; *out is untouched on failure. */
moe_status moe_sample(moe_sampler *s, const float *logits, int V, int32_t *out);

/* Greedy ids of n rows of logits [n, V] into ids [n]: each row's first largest logit (what
 * moe_sample picks at temperature 0, without its checks). */
void moe_argmax_rows(const float *logits, int n, int V, int32_t *ids);

#endif
