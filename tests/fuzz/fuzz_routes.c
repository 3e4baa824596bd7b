/* Fuzz target: the routing trace and predictor readers (moe/offload/trace.h, predictor.h),
 * both HDF5 files of our checkpoint format whose contents index arrays: token ids, expert
 * ids, positions, sequence numbers, the predictor's shape.
 *
 * Input: a trace or a predictor file; each input goes through both readers. Seeds are the
 * harness's own: MOE_FUZZ_SAVE_SEED=DIR writes DIR/trace.h5 and DIR/predictor.h5 of the
 * tiny model below at start-up. Each start-up also saves and reloads both, so the harness
 * fails when a valid file is refused. Checks: a refused file gives a message and never
 * MOE_ERR_OOM; a loaded trace is used as the trainer and evaluator use it (held-out split,
 * recall, the token-identity baseline, scheduling paths); a loaded predictor predicts; no
 * HDF5 object is left open. libhdf5 is a black box here as in fuzz_checkpoint.c. */
#include <string.h>
#include <unistd.h>

#include "core/h5file.h"
#include "core/memory.h"
#include "moe/offload/predictor.h"
#include "moe/offload/schedule.h"
#include "tests/fuzz/common.h"

static const char model_yaml[] =
    "model:\n  vocab_size: 16\n  d_model: 8\n  n_heads: 2\n  n_layers: 3\n  seq_len: 8\n"
    "  ffn_dim: 4\n  n_experts: 4\n  top_k: 2\n  dense_layers: 1\n";

static moe_model model;
static moe_route_fingerprint fp;

static void save_seeds(const char *dir) {
    int32_t tokens[24];
    for (int i = 0; i < 24; i++) tokens[i] = (i * 5 + 3) % 16;
    moe_trace t;
    char path[600];
    moe_decoder *d = NULL;
    FUZZ_CHECK(moe_decoder_open(&model, model.compute, &d) == MOE_OK, "decoder: %s", moe_last_error());
    FUZZ_CHECK(moe_trace_record(d, "fuzz", tokens, 24, 8, 2, &t) == MOE_OK, "trace: %s", moe_last_error());
    moe_decoder_close(d);
    snprintf(path, sizeof path, "%s/trace.h5", dir);
    FUZZ_CHECK(moe_trace_save(&t, path) == MOE_OK, "save trace: %s", moe_last_error());
    moe_route_net net;
    moe_route_net_shape shape = {.vocab = 16, .context = 2, .embed = 4, .hidden = 8, .n_moe_layers = t.fp.n_moe_layers,
                                 .n_experts = 4, .top_k = 2};
    FUZZ_CHECK(moe_route_net_init(&net, &shape, 7) == MOE_OK, "net: %s", moe_last_error());
    snprintf(path, sizeof path, "%s/predictor.h5", dir);
    FUZZ_CHECK(moe_route_net_save(&net, path, "fuzz", &t.fp) == MOE_OK, "save predictor: %s", moe_last_error());
    moe_route_net_free(&net);
    moe_trace_free(&t);
}

/* Returns whether the file at path loaded as a trace (and used it as the tools do). */
static bool try_trace(const char *path, size_t size) {
    moe_trace t;
    moe_status st = moe_trace_load(path, &t);
    FUZZ_CHECK(st == MOE_OK || *moe_last_error(), "trace refused without a message");
    FUZZ_CHECK(st != MOE_ERR_OOM, "a %zu-byte trace ran out of memory: %s", size, moe_last_error());
    if (st != MOE_OK) return false;
    int lm = t.fp.n_moe_layers, E = t.fp.n_experts;
    float *scores = calloc((size_t)(lm * t.n * E), sizeof *scores);
    double *recall = calloc((size_t)lm, sizeof *recall);
    FUZZ_CHECK(scores && recall, "out of memory for the scores of a loaded trace");
    int64_t split = 0;
    if (moe_trace_holdout_split(&t, 0.5, &split) == MOE_OK) {
        FUZZ_CHECK(split > 0 && split < t.n, "split %lld of %lld tokens", (long long)split, (long long)t.n);
        FUZZ_CHECK(moe_trace_token_freq_scores(&t, split, split, t.n - split, scores) == MOE_OK, "baseline: %s",
                   moe_last_error());
        moe_trace_recall(&t, split, t.n - split, scores, recall);
    }
    int64_t rows[2] = {0, t.n - 1};
    uint64_t *paths = calloc((size_t)(2 * moe_path_words(lm, E)), sizeof *paths);
    FUZZ_CHECK(paths, "out of memory for two paths");
    moe_paths_from_routes(t.ids, lm, t.n, E, t.fp.top_k, rows, 2, paths);
    free(paths);
    free(scores);
    free(recall);
    moe_trace_free(&t);
    return true;
}

/* Returns whether the file at path loaded as the model's predictor (and predicted with it). */
static bool try_predictor(const char *path, size_t size) {
    moe_predictor *p = NULL;
    moe_status st = moe_predictor_load_for(path, &fp, "the fuzz model", &p);
    FUZZ_CHECK(st == MOE_OK || *moe_last_error(), "predictor refused without a message");
    FUZZ_CHECK(st != MOE_ERR_OOM, "a %zu-byte predictor ran out of memory: %s", size, moe_last_error());
    if (st != MOE_OK) return false;
    int32_t tokens[3] = {1, 15, 0}, pos[3] = {0, 1, 2};
    float scores[3 * 2 * 4];
    FUZZ_CHECK(moe_predictor_predict(p, tokens, pos, NULL, 3, (const int32_t[]){0, 1, 2}, 3, scores) == MOE_OK,
               "predict: %s", moe_last_error());
    moe_predictor_free(p);
    moe_step_reset();
    return true;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    moe_config cfg;
    FUZZ_CHECK(moe_config_load_text(&cfg, model_yaml, "<fuzz model>") == MOE_OK && moe_config_validate(&cfg) == MOE_OK,
               "model config: %s", moe_last_error());
    FUZZ_CHECK(moe_model_init(&model, &cfg, 0, 1) == MOE_OK, "model: %s", moe_last_error());
    FUZZ_CHECK(moe_route_fingerprint_of(&model, &fp) == MOE_OK, "fingerprint: %s", moe_last_error());
    const char *seed = getenv("MOE_FUZZ_SAVE_SEED");
    if (seed) save_seeds(seed);
    /* the round trip the harness relies on: valid files load */
    const char *dir = fuzz_scratch_dir("routes-valid");
    save_seeds(dir);
    char path[600];
    snprintf(path, sizeof path, "%s/trace.h5", dir);
    FUZZ_CHECK(try_trace(path, 0), "a valid trace does not load: %s", moe_last_error());
    snprintf(path, sizeof path, "%s/predictor.h5", dir);
    FUZZ_CHECK(try_predictor(path, 0), "a valid predictor does not load: %s", moe_last_error());
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_write_file("routes", data, size);
    try_trace(path, size);
    try_predictor(path, size);
    FUZZ_CHECK(moe_h5_open_object_count() == 0, "%lld HDF5 objects left open", (long long)moe_h5_open_object_count());
    return 0;
}
