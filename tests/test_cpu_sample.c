/* The sampler (moe/infer/sample.h): greedy is the argmax; with a temperature the empirical
 * frequencies match softmax(logits / T); top-k and top-p never leave their candidate
 * sets and reach every member; (seed, counter) fixes the draw; bad settings and
 * non-finite logits are refused with a status. */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/philox.h"
#include "moe/infer/sample.h"
#include "tests/harness/testlib.h"

enum { DRAWS = 20000 };

/* Deterministic logits in [-3, 3) from a Philox stream. */
static void random_logits(float *l, int V, uint64_t key) {
    for (int i = 0; i < V; i++) l[i] = (float)(6 * moe_philox_uniform((uint64_t)i, key) - 3);
}

static void softmax(const float *l, int V, double T, double *p) {
    double mx = l[0], sum = 0;
    for (int i = 1; i < V; i++) mx = l[i] > mx ? l[i] : mx;
    for (int i = 0; i < V; i++) sum += p[i] = exp((l[i] - mx) / T);
    for (int i = 0; i < V; i++) p[i] /= sum;
}

/* Draws n tokens with counters 0..n-1 and counts them per id. */
static void histogram(moe_sampler s, const float *l, int V, int n, int *count) {
    memset(count, 0, sizeof *count * (size_t)V);
    for (int i = 0; i < n; i++) {
        int32_t t = -1;
        CU_ASSERT_EQUAL_FATAL(moe_sample(&s, l, V, &t), MOE_OK);
        CU_ASSERT_FATAL(t >= 0 && t < V);
        count[t]++;
    }
}

static void test_greedy(void) {
    for (int V = 1; V <= 300; V += 37) {
        float l[300];
        random_logits(l, V, (uint64_t)V);
        int want = 0;
        for (int i = 1; i < V; i++) want = l[i] > l[want] ? i : want;
        moe_sampler s = {.temperature = 0, .top_p = 1, .seed = 3};
        int32_t t = -1;
        CU_ASSERT_EQUAL(moe_sample(&s, l, V, &t), MOE_OK);
        CU_ASSERT_EQUAL(t, want);
        CU_ASSERT_EQUAL(s.counter, 0); /* greedy draws nothing */
    }
    /* top_p = 0 keeps only the most probable token, whatever the temperature */
    float l[4] = {0.5f, 2.0f, 1.9f, -1.0f};
    moe_sampler s = {.temperature = 5, .top_p = 0, .seed = 9};
    for (int i = 0; i < 200; i++) {
        int32_t t = -1;
        CU_ASSERT_EQUAL(moe_sample(&s, l, 4, &t), MOE_OK);
        CU_ASSERT_EQUAL(t, 1);
    }
}

/* Frequencies within 4.5 standard errors of softmax(l / T), for two temperatures whose
 * distributions differ by far more than that (so ignoring T fails). */
static void test_temperature(void) {
    const float l[6] = {2.0f, 1.0f, 0.5f, 0.0f, -1.0f, 1.5f};
    const double temps[2] = {0.5, 2.0};
    for (int k = 0; k < 2; k++) {
        double p[6];
        int count[6];
        softmax(l, 6, temps[k], p);
        histogram((moe_sampler){.temperature = temps[k], .top_p = 1, .seed = 11 + (uint64_t)k}, l, 6, DRAWS, count);
        for (int i = 0; i < 6; i++) {
            double f = (double)count[i] / DRAWS, se = sqrt(p[i] * (1 - p[i]) / DRAWS);
            if (fabs(f - p[i]) > 4.5 * se + 1e-4)
                printf("\nT=%g token %d: frequency %.4f, softmax %.4f\n", temps[k], i, f, p[i]);
            CU_ASSERT(fabs(f - p[i]) <= 4.5 * se + 1e-4);
        }
    }
    /* many seeds at one counter: the same law */
    double p[6];
    int count[6] = {0};
    softmax(l, 6, 0.5, p);
    for (uint64_t seed = 0; seed < DRAWS; seed++) {
        moe_sampler s = {.temperature = 0.5, .top_p = 1, .seed = seed};
        int32_t t = -1;
        CU_ASSERT_EQUAL_FATAL(moe_sample(&s, l, 6, &t), MOE_OK);
        count[t]++;
    }
    for (int i = 0; i < 6; i++) CU_ASSERT(fabs((double)count[i] / DRAWS - p[i]) <= 4.5 * sqrt(p[i] * (1 - p[i]) / DRAWS) + 1e-4);
}

/* Ids sorted by logit, largest first. */
static void ranked(const float *l, int V, int *order) {
    for (int i = 0; i < V; i++) order[i] = i;
    for (int i = 1; i < V; i++)
        for (int j = i; j > 0 && l[order[j]] > l[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
}

static void test_top_k(void) {
    enum { V = 50, K = 5 };
    float l[V];
    int order[V], count[V];
    random_logits(l, V, 77);
    ranked(l, V, order);
    /* a high temperature makes the tail likely, so leaving the top k would show */
    histogram((moe_sampler){.temperature = 3, .top_k = K, .top_p = 1, .seed = 5}, l, V, 5000, count);
    for (int r = 0; r < V; r++) {
        if (r < K) {
            CU_ASSERT(count[order[r]] > 0);
        } else {
            CU_ASSERT_EQUAL(count[order[r]], 0);
        }
    }
}

static void test_top_p(void) {
    enum { V = 20 };
    const double P = 0.6, T = 1.0;
    float l[V];
    double p[V];
    int order[V], count[V];
    random_logits(l, V, 123);
    softmax(l, V, T, p);
    ranked(l, V, order);
    int nucleus = 0; /* the shortest prefix whose mass reaches P */
    for (double mass = 0; mass < P; nucleus++) mass += p[order[nucleus]];
    CU_ASSERT_FATAL(nucleus >= 2 && nucleus < V); /* the logits make a non-trivial nucleus */
    histogram((moe_sampler){.temperature = T, .top_p = P, .seed = 8}, l, V, 5000, count);
    for (int r = 0; r < V; r++) {
        if (r < nucleus) {
            CU_ASSERT(count[order[r]] > 0);
        } else {
            CU_ASSERT_EQUAL(count[order[r]], 0);
        }
    }
}

static void sequence(uint64_t seed, uint64_t counter, int n, const float *l, int V, int32_t *out) {
    moe_sampler s = {.temperature = 1, .top_p = 1, .seed = seed, .counter = counter};
    for (int i = 0; i < n; i++) CU_ASSERT_EQUAL_FATAL(moe_sample(&s, l, V, &out[i]), MOE_OK);
    CU_ASSERT_EQUAL(s.counter, counter + (uint64_t)n);
}

static void test_determinism(void) {
    enum { V = 32, N = 64 };
    float l[V];
    random_logits(l, V, 1); /* flat enough that many tokens are likely */
    int32_t a[N], b[N], c[N], d[N];
    sequence(42, 0, N, l, V, a);
    sequence(42, 0, N, l, V, b);
    sequence(42, 1000, N, l, V, c);
    sequence(43, 0, N, l, V, d);
    CU_ASSERT_EQUAL(memcmp(a, b, sizeof a), 0);
    CU_ASSERT_NOT_EQUAL(memcmp(a, c, sizeof a), 0);
    CU_ASSERT_NOT_EQUAL(memcmp(a, d, sizeof a), 0);
    /* a draw depends on its counter only: resuming at counter 10 repeats a[10..] */
    sequence(42, 10, N - 10, l, V, c);
    CU_ASSERT_EQUAL(memcmp(a + 10, c, sizeof *a * (N - 10)), 0);
}

static void expect_refused(moe_sampler s, const float *l, int V, moe_status want, const char *text) {
    int32_t t = -7;
    CU_ASSERT_EQUAL(moe_sample(&s, l, V, &t), want);
    CU_ASSERT_EQUAL(t, -7);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), text));
}

static void test_refusals(void) {
    float l[4] = {0, 1, 2, 3};
    moe_sampler ok = {.temperature = 1, .top_p = 1};
    moe_sampler s = ok;
    s.temperature = NAN;
    expect_refused(s, l, 4, MOE_ERR_INVALID, "temperature");
    s = ok;
    s.temperature = -1;
    expect_refused(s, l, 4, MOE_ERR_INVALID, "temperature");
    s = ok;
    s.top_p = 2;
    expect_refused(s, l, 4, MOE_ERR_INVALID, "top_p");
    s = ok;
    s.top_k = -5;
    expect_refused(s, l, 4, MOE_ERR_INVALID, "top_k");
    expect_refused(ok, l, 0, MOE_ERR_INVALID, "vocabulary");
    l[2] = NAN;
    expect_refused(ok, l, 4, MOE_ERR_NUMERIC, "logit 2");
    ok.temperature = 0; /* greedy too: a NaN logit is a fault, not a candidate to skip */
    expect_refused(ok, l, 4, MOE_ERR_NUMERIC, "logit 2");
    l[2] = INFINITY;
    expect_refused(ok, l, 4, MOE_ERR_NUMERIC, "logit 2");
}

static void register_suites(void) {
    moe_test_add_suite("sample", (moe_test_entry[]){{"greedy", test_greedy},
                                                    {"temperature", test_temperature},
                                                    {"top_k", test_top_k},
                                                    {"top_p", test_top_p},
                                                    {"determinism", test_determinism},
                                                    {"refusals", test_refusals},
                                                    {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
