/* Sampling (see sample.h). */
#include "moe/infer/sample.h"

#include <math.h>
#include <stdlib.h>

#include "core/philox.h"

typedef struct cand {
    double p;
    int32_t id;
} cand;

static int by_prob_desc(const void *a, const void *b) {
    const cand *x = a, *y = b;
    return x->p < y->p ? 1 : x->p > y->p ? -1 : (x->id - y->id);
}

static moe_status check(const moe_sampler *s, const float *logits, int V) {
    if (V < 1) return moe_error(MOE_ERR_INVALID, "sample: vocabulary of %d tokens", V);
    if (!(s->temperature >= 0 && isfinite(s->temperature)))
        return moe_error(MOE_ERR_INVALID, "sample: temperature %g must be a finite number >= 0", s->temperature);
    if (s->top_k < 0) return moe_error(MOE_ERR_INVALID, "sample: top_k %d must be >= 0 (0 = off)", s->top_k);
    if (!(s->top_p >= 0 && s->top_p <= 1))
        return moe_error(MOE_ERR_INVALID, "sample: top_p %g must be in [0, 1] (1 = off)", s->top_p);
    for (int i = 0; i < V; i++)
        if (!isfinite(logits[i])) return moe_error(MOE_ERR_NUMERIC, "sample: logit %d of %d is %g", i, V, logits[i]);
    return MOE_OK;
}

/* The draw over c[0..m) (sorted, unnormalised probabilities summing to `mass`). */
static int32_t draw(moe_sampler *s, const cand *c, int m, double mass) {
    double u = moe_philox_uniform(s->counter++, s->seed) * mass, acc = 0;
    for (int i = 0; i < m; i++) {
        acc += c[i].p;
        if (u < acc) return c[i].id;
    }
    return c[m - 1].id; /* u rounded up to the whole mass */
}

static int32_t argmax(const float *v, int V) {
    int32_t best = 0;
    for (int i = 1; i < V; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

void moe_argmax_rows(const float *logits, int n, int V, int32_t *ids) {
    for (int i = 0; i < n; i++) ids[i] = argmax(logits + (int64_t)i * V, V);
}

moe_status moe_sample(moe_sampler *s, const float *logits, int V, int32_t *out) {
    MOE_TRY(check(s, logits, V));
    int32_t best = argmax(logits, V);
    if (s->temperature == 0) {
        *out = best;
        return MOE_OK;
    }
    cand *c = malloc(sizeof *c * (size_t)V);
    if (!c) return moe_error(MOE_ERR_OOM, "sample: out of memory for %d candidates", V);
    double mx = logits[best], sum = 0;
    for (int i = 0; i < V; i++) {
        c[i].id = i;
        c[i].p = exp((logits[i] - mx) / s->temperature);
        sum += c[i].p;
    }
    qsort(c, (size_t)V, sizeof *c, by_prob_desc);
    int n = (s->top_k > 0 && s->top_k < V) ? s->top_k : V;
    double keep = 0, cut = s->top_p * sum;
    int m = 0;
    if (s->top_p < 1)
        while (m < n && (m == 0 || keep < cut)) keep += c[m++].p;
    else
        for (; m < n; m++) keep += c[m].p;
    *out = draw(s, c, m, keep);
    free(c);
    return MOE_OK;
}
