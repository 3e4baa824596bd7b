/* The tiny hub fixtures of tests/fixtures/hf and what transformers computed on them
 * (expected.safetensors: two rows of 24 tokens, the second left-padded, their logits, the
 * router's top-k ids and logits per MoE layer, a greedy continuation), compared with a
 * decoder's (test_cpu_hf_model on the host, test_cuda_hf on the device). */
#ifndef MOE_TESTS_HF_FIXTURE_H
#define MOE_TESTS_HF_FIXTURE_H

#include <stdint.h>

#include "moe/hf/hf_model.h"
#include "moe/hf/safetensors.h"
#include "moe/infer/decoder.h"

/* The folder of fixture `name` (a static buffer: copy it before the next call). */
const char *hf_fixture_dir(const char *name);

typedef struct hf_expected {
    moe_st_file f;
    int64_t ids[48], mask[48]; /* [2, 24]: row 1 left-padded (mask 0) */
    float *logits;             /* [2, 24, V] */
} hf_expected;

void hf_expected_read(const char *dir, hf_expected *e);
/* Fixture `name` loaded (*m, *info; a failure prints the loader's message and ends the
 * test) with its expected values (*e). */
void hf_fixture_open(const char *name, moe_model *m, moe_hf_info *info, hf_expected *e);
void hf_expected_close(hf_expected *e);

/* max |a - b| / max |b| over n values. */
double hf_rel_err(const float *a, const float *b, int64_t n);

/* Row r's real tokens (after the left padding; *pad of them) through decoder d at
 * positions pos0.. (pos0 < 0: pad..): out [24 - pad, V] and route [n_layers, 24 - pad, k];
 * returns their logits' hf_rel_err against transformers'. */
double hf_row_err(moe_decoder *d, const hf_expected *e, int r, int64_t pos0, float *out, int32_t *route, int *pad);

/* Tokens of row r whose top-k sets per MoE layer differ from router_topk.<i> (i counts the
 * MoE layers) outside near-ties (k-th and (k+1)-th router logits within 1e-5). */
int hf_route_mismatches(const moe_model *m, const hf_expected *e, int r, int pad, const int32_t *route);

/* The greedy continuation of gen_prompt through d (eos banned, as transformers generated
 * with min_new_tokens): gen_ids' length into *n (caller frees *out); returns the first
 * index where out differs from gen_ids, -1 when none. */
int hf_greedy_first_mismatch(moe_decoder *d, const moe_hf_info *info, const hf_expected *e, int32_t **out, int *n);

#endif
