/* Sampling (see sample.h). */
#include "moe/sample.h"

#include <math.h>
#include <stdlib.h>

#include "core/philox.h"

typedef struct { float p; int32_t id; } cand;

static int by_prob_desc(const void *a, const void *b) {
    const cand *x = a, *y = b;
    return x->p < y->p ? 1 : x->p > y->p ? -1 : (x->id - y->id);
}

int32_t moe_sample(moe_sampler *s, float *logits, int V) {
    int32_t best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    if (s->temperature <= 0) return best;
    cand *c = malloc(sizeof *c * (size_t)V);
    if (!c) return best;
    double mx = logits[best], sum = 0;
    for (int i = 0; i < V; i++) {
        c[i].id = i;
        c[i].p = (float)exp((logits[i] - mx) / s->temperature);
        sum += c[i].p;
    }
    qsort(c, (size_t)V, sizeof *c, by_prob_desc);
    int n = (s->top_k > 0 && s->top_k < V) ? s->top_k : V;
    double keep = 0, cut = (s->top_p > 0 && s->top_p < 1) ? s->top_p * sum : sum;
    int m = 0;
    while (m < n && (m == 0 || keep < cut)) keep += c[m++].p;
    double u = moe_philox_uniform(s->counter++, s->seed) * keep, acc = 0;
    int32_t pick = c[m - 1].id;
    for (int i = 0; i < m; i++) {
        acc += c[i].p;
        if (u < acc) {
            pick = c[i].id;
            break;
        }
    }
    free(c);
    return pick;
}
