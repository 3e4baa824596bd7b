/* Next-token sampling from logits: greedy, temperature, top-k and top-p (nucleus). */
#ifndef MOE_MOE_SAMPLE_H
#define MOE_MOE_SAMPLE_H

#include <stdint.h>

typedef struct moe_sampler {
    double temperature; /* 0 = greedy */
    int top_k;          /* 0 = off */
    double top_p;       /* 1 = off */
    uint64_t seed, counter;
} moe_sampler;

/* Picks a token from logits[V] (modified in place). Deterministic for (seed, counter). */
int32_t moe_sample(moe_sampler *s, float *logits, int V);

#endif
