/* The hub fixtures' expected values against a decoder (see hf_fixture.h). */
#include "tests/harness/hf_fixture.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/memory.h"
#include "tests/harness/testlib.h"

const char *hf_fixture_dir(const char *name) {
    static char path[1024];
    const char *src = getenv("MOE_SOURCE_DIR");
    if (src) snprintf(path, sizeof path, "%s/tests/fixtures/hf/%s", src, name);
    else {
        snprintf(path, sizeof path, "%s", __FILE__); /* .../tests/harness/hf_fixture.c */
        for (int up = 0; up < 2; up++) {
            char *slash = strrchr(path, '/');
            if (slash) *slash = '\0';
        }
        size_t n = strlen(path);
        snprintf(path + n, sizeof path - n, "/fixtures/hf/%s", name);
    }
    return path;
}

void hf_expected_read(const char *dir, hf_expected *e) {
    char path[1200];
    snprintf(path, sizeof path, "%s/expected.safetensors", dir);
    CU_ASSERT_EQUAL_FATAL(moe_st_open(&e->f, path), MOE_OK);
    const moe_st_view *ids = moe_st_find(&e->f, "input_ids"), *mask = moe_st_find(&e->f, "attention_mask");
    const moe_st_view *lg = moe_st_find(&e->f, "logits");
    CU_ASSERT_FATAL(ids && mask && lg && moe_st_numel(ids) == 48);
    moe_st_read_i64(ids, e->ids);
    moe_st_read_i64(mask, e->mask);
    e->logits = malloc(lg->nbytes);
    CU_ASSERT_FATAL(e->logits != NULL);
    moe_st_read_f32(lg, e->logits);
}

void hf_fixture_open(const char *name, moe_model *m, moe_hf_info *info, hf_expected *e) {
    const char *dir = hf_fixture_dir(name);
    moe_status s = moe_hf_load(dir, m, info);
    if (s != MOE_OK) fprintf(stderr, "  %s: %s\n", name, moe_last_error());
    CU_ASSERT_EQUAL_FATAL(s, MOE_OK);
    hf_expected_read(dir, e);
}

void hf_expected_close(hf_expected *e) {
    free(e->logits);
    moe_st_close(&e->f);
}

double hf_rel_err(const float *a, const float *b, int64_t n) {
    double d = 0, s = 0;
    for (int64_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        s = fmax(s, fabs((double)b[i]));
    }
    return d / s;
}

double hf_row_err(moe_decoder *d, const hf_expected *e, int r, int64_t pos0, float *out, int32_t *route, int *pad) {
    const moe_model *m = moe_decoder_model(d);
    int V = m->cfg.model.vocab_size, p = 0;
    while (p < 24 && e->mask[r * 24 + p] == 0) p++;
    int32_t tok[24];
    for (int t = p; t < 24; t++) tok[t - p] = (int32_t)e->ids[r * 24 + t];
    moe_step_reset();
    CHECK_OK(moe_decoder_logits(d, tok, 1, 24 - p, pos0 < 0 ? p : pos0, out, route));
    *pad = p;
    return hf_rel_err(out, e->logits + ((int64_t)r * 24 + p) * V, (int64_t)(24 - p) * V);
}

/* Whether token `row` of the expected top-k (want [48, k]) differs from got [k] only by a
 * near-tie of router logits lg [48, E]. */
static bool near_tie(const int64_t *want, const float *lg, int64_t row, int k, int E) {
    const float *l = lg + row * E;
    float kth = l[want[row * k + k - 1]], next = -INFINITY;
    for (int x = 0; x < E; x++) {
        bool in = false;
        for (int b = 0; b < k; b++) in = in || want[row * k + b] == x;
        if (!in && l[x] > next) next = l[x];
    }
    return kth - next <= 1e-5;
}

int hf_route_mismatches(const moe_model *m, const hf_expected *e, int r, int pad, const int32_t *route) {
    int k = m->cfg.model.top_k, E = m->cfg.model.n_experts, T = 24 - pad, bad = 0, moe_i = 0, compared = 0;
    for (int L = 0; L < m->cfg.model.n_layers; L++) {
        if (m->blocks[L].dense) continue;
        char nt[64], nl[64];
        snprintf(nt, sizeof nt, "router_topk.%d", moe_i);
        snprintf(nl, sizeof nl, "router_logits.%d", moe_i++);
        const moe_st_view *vt = moe_st_find(&e->f, nt), *vl = moe_st_find(&e->f, nl);
        if (!vt) continue; /* DeepSeek-V3 reports no router logits */
        CU_ASSERT_FATAL(vl && moe_st_numel(vt) == 48 * k);
        compared++;
        int64_t *want = malloc(sizeof(int64_t) * (size_t)moe_st_numel(vt));
        float *lg = malloc(sizeof(float) * (size_t)moe_st_numel(vl));
        CU_ASSERT_FATAL(want && lg);
        moe_st_read_i64(vt, want);
        moe_st_read_f32(vl, lg);
        for (int t = 0; t < T; t++) {
            int64_t row = (int64_t)r * 24 + pad + t;
            const int32_t *got = route + ((int64_t)L * T + t) * k;
            int same = 0;
            for (int a = 0; a < k; a++)
                for (int b = 0; b < k; b++) same += got[a] == want[row * k + b];
            if (same != k && !near_tie(want, lg, row, k, E)) bad++;
        }
        free(want);
        free(lg);
    }
    /* every MoE layer's ids are there, unless the family reports none */
    CU_ASSERT(compared == moe_i || (compared == 0 && !moe_st_find(&e->f, "router_topk.0")));
    return bad;
}

int hf_greedy_first_mismatch(moe_decoder *d, const moe_hf_info *info, const hf_expected *e, int32_t **out, int *n) {
    const moe_st_view *vp = moe_st_find(&e->f, "gen_prompt"), *vg = moe_st_find(&e->f, "gen_ids");
    CU_ASSERT_FATAL(vp && vg);
    int P = (int)moe_st_numel(vp), G = (int)moe_st_numel(vg);
    int64_t *p64 = malloc(sizeof(int64_t) * (size_t)G), *g64 = malloc(sizeof(int64_t) * (size_t)G);
    int32_t *prompt = malloc(sizeof(int32_t) * (size_t)G);
    *out = malloc(sizeof(int32_t) * (size_t)G);
    CU_ASSERT_FATAL(p64 && g64 && prompt && *out);
    moe_st_read_i64(vp, p64);
    moe_st_read_i64(vg, g64);
    for (int i = 0; i < P; i++) prompt[i] = (int32_t)p64[i];
    CHECK_OK(moe_hf_generate_greedy(d, prompt, P, G - P, info->eos_ids, info->n_eos, *out));
    int first_bad = -1;
    for (int i = 0; i < G && first_bad < 0; i++)
        if ((*out)[i] != g64[i]) first_bad = i;
    if (first_bad >= 0)
        fprintf(stderr, "  greedy differs at %d: %d vs %lld\n", first_bad, (*out)[first_bad], (long long)g64[first_bad]);
    *n = G;
    free(p64), free(g64), free(prompt);
    return first_bad;
}
