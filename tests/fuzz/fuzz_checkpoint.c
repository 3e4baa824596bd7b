/* Fuzz target: the HDF5 checkpoint reader (moe_checkpoint_read_config, moe_checkpoint_load,
 * whose verification pass reads every dataset through the generic reader of
 * core/h5file.h, as `moe inspect` does).
 *
 * Input: a checkpoint file. Seeds are checkpoints of the harness's tiny model (below);
 * MOE_FUZZ_SAVE_SEED=PATH makes the harness write a fresh one there at start-up. Each
 * start-up also saves and reloads one, so the harness fails when a valid checkpoint is
 * refused. Checks: a refused file gives a message and never MOE_ERR_OOM (replay.c caps the
 * address space, libFuzzer the allocation size); a loaded one has no negative step
 * counter; no HDF5 object is left open.
 *
 * Only our code is instrumented: libhdf5 itself (Debian's build) is a black box that
 * the fuzzer drives through our calls. On some damaged files libhdf5 asks malloc for
 * petabytes and handles the NULL it gets; tests/fuzz/checkpoint/env lets ASan return that
 * NULL (as the plain build does) instead of aborting. A crash inside libhdf5 that no
 * check before the call can avoid is listed in tests/fuzz/checkpoint/KNOWN.md and its
 * input is not kept as a regression input. */
#include <string.h>
#include <unistd.h>

#include "core/h5file.h"
#include "moe/train/checkpoint.h"
#include "tests/fuzz/common.h"

static const char model_yaml[] =
    "model:\n  vocab_size: 16\n  d_model: 8\n  n_heads: 2\n  n_layers: 2\n  seq_len: 8\n"
    "  ffn_dim: 4\n  n_experts: 2\n  top_k: 1\n  n_shared_experts: 1\n  dense_layers: 1\n"
    "router:\n  balance: aux_free\n";

static moe_model model;
static moe_optimizer *opt;

static void save_valid(const char *path) {
    moe_train_state ts = {.step = 3, .loader_seed = 5, .loader_step = 3};
    FUZZ_CHECK(moe_checkpoint_save(path, &model, opt, &ts) == MOE_OK, "save: %s", moe_last_error());
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    moe_config cfg;
    FUZZ_CHECK(moe_config_load_text(&cfg, model_yaml, "<fuzz model>") == MOE_OK &&
                   moe_config_validate(&cfg) == MOE_OK,
               "model config: %s", moe_last_error());
    FUZZ_CHECK(moe_model_init(&model, &cfg, 0, 1) == MOE_OK, "model: %s", moe_last_error());
    int n = 0;
    moe_tensor **params = moe_model_param_tensors(&model, &n);
    moe_optim_config oc = moe_optim_config_default(MOE_OPTIM_ADAMW);
    opt = moe_optimizer_create(params, n, &oc);
    FUZZ_CHECK(opt, "optimizer: %s", moe_last_error());
    free(params);
    const char *seed = getenv("MOE_FUZZ_SAVE_SEED");
    if (seed) save_valid(seed);
    /* the round trip the harness relies on: a valid checkpoint loads */
    char path[512];
    const char *dir = getenv("TMPDIR");
    snprintf(path, sizeof path, "%s/moe-fuzz-valid-%ld.h5", dir && *dir ? dir : "/tmp", (long)getpid());
    save_valid(path);
    moe_train_state ts;
    moe_status st = moe_checkpoint_load(path, &model, opt, &ts);
    remove(path);
    FUZZ_CHECK(st == MOE_OK && ts.step == 3, "a valid checkpoint does not load: %s", moe_last_error());
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_write_file("checkpoint", data, size);
    char *text = NULL;
    moe_status st = moe_checkpoint_read_config(path, &text);
    FUZZ_CHECK(st == MOE_OK || (!text && *moe_last_error()), "read_config failed without a message");
    FUZZ_CHECK(st != MOE_ERR_OOM, "a %zu-byte file ran out of memory: %s", size, moe_last_error());
    if (st == MOE_OK) {
        moe_config cfg;
        if (moe_config_load_text(&cfg, text, NULL) == MOE_OK) moe_config_validate(&cfg);
        free(text);
    }
    moe_train_state ts;
    st = moe_checkpoint_load(path, &model, opt, &ts);
    FUZZ_CHECK(st == MOE_OK || *moe_last_error(), "load failed without a message");
    FUZZ_CHECK(st != MOE_ERR_OOM, "a %zu-byte file ran out of memory: %s", size, moe_last_error());
    FUZZ_CHECK(st != MOE_OK || (ts.step >= 0 && ts.bad_steps >= 0), "loaded step %lld, bad_steps %lld",
               (long long)ts.step, (long long)ts.bad_steps);
    FUZZ_CHECK(moe_h5_open_object_count() == 0, "%lld HDF5 objects left open",
               (long long)moe_h5_open_object_count());
    return 0;
}
