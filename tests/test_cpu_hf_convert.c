/* `moe convert DIR --out FILE.h5` writes the checkpoint block by block; for every hub fixture
 * (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 with its dense first layer) the file
 * holds the same datasets as moe_checkpoint_save of the whole loaded model, and
 * moe_checkpoint_load of each gives the same parameters and selection biases bit for bit,
 * equal to the hub load's. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/h5file.h"
#include "core/memory.h"
#include "moe/cli/commands.h"
#include "moe/hf/hf_model.h"
#include "moe/train/checkpoint.h"
#include "tests/harness/hf_fixture.h"
#include "tests/harness/testlib.h"

/* Every dataset name of a checkpoint, one per line (malloc'd). */
typedef struct { char *text; size_t len, cap; } name_list;

static moe_status add_name(const char *name, void *user) {
    name_list *l = user;
    size_t n = strlen(name) + 1;
    if (l->len + n + 1 > l->cap) {
        l->cap = 2 * (l->len + n + 1);
        l->text = realloc(l->text, l->cap);
        if (!l->text) return MOE_ERR_OOM;
    }
    memcpy(l->text + l->len, name, n - 1);
    l->len += n;
    l->text[l->len - 1] = '\n';
    l->text[l->len] = '\0';
    return MOE_OK;
}

static char *dataset_names(const char *path) {
    moe_h5 *f = NULL;
    name_list l = {0};
    CU_ASSERT_EQUAL_FATAL(moe_h5_open(path, &f), MOE_OK);
    CU_ASSERT_EQUAL(moe_h5_list(f, "", add_name, &l), MOE_OK);
    moe_h5_close(f);
    return l.text;
}

/* Parameters and selection biases of a and b (same config) that differ in any bit. */
static int count_differing(const moe_model *a, const moe_model *b) {
    int differ = 0;
    for (int i = 0; i < a->n_params; i++) {
        int64_t n = moe_tensor_numel(a->params[i].t);
        differ += n != moe_tensor_numel(b->params[i].t) ||
                  memcmp(a->params[i].t->data, b->params[i].t->data, sizeof(float) * (size_t)n) != 0;
    }
    for (int L = 0; L < a->cfg.model.n_layers; L++)
        if (!a->blocks[L].dense && a->blocks[L].moe.router.bias)
            differ += memcmp(a->blocks[L].moe.router.bias->data, b->blocks[L].moe.router.bias->data,
                             sizeof(float) * (size_t)a->cfg.model.n_experts) != 0;
    return differ;
}

static void load_checkpoint(const char *path, const moe_config *cfg, moe_model *m) {
    moe_train_state ts;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(m, cfg, 0, 1), MOE_OK);
    moe_status s = moe_checkpoint_load(path, m, NULL, &ts);
    if (s != MOE_OK) fprintf(stderr, "  %s\n", moe_last_error());
    CU_ASSERT_EQUAL_FATAL(s, MOE_OK);
    CU_ASSERT_EQUAL(ts.step, 0);
}

static void check_fixture(const char *tmp, const char *name) {
    char dir[1100], old_path[700], new_path[700];
    snprintf(dir, sizeof dir, "%s", hf_fixture_dir(name));
    snprintf(old_path, sizeof old_path, "%s/%s-whole.h5", tmp, name);
    snprintf(new_path, sizeof new_path, "%s/%s-streamed.h5", tmp, name);
    moe_model hub, a, b;
    moe_hf_info info;
    moe_train_state ts;
    memset(&ts, 0, sizeof ts);
    CU_ASSERT_EQUAL_FATAL(moe_hf_load(dir, &hub, &info), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_checkpoint_save(old_path, &hub, NULL, &ts), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_cmd_convert(3, (char *[]){dir, "--out", new_path, NULL}), 0);
    char *old_names = dataset_names(old_path), *new_names = dataset_names(new_path);
    CU_ASSERT_PTR_NOT_NULL_FATAL(old_names);
    CU_ASSERT_PTR_NOT_NULL_FATAL(new_names);
    CU_ASSERT_STRING_EQUAL(old_names, new_names);
    CU_ASSERT_PTR_NOT_NULL(strstr(new_names, "params/embed\n"));
    free(old_names), free(new_names);
    load_checkpoint(old_path, &hub.cfg, &a);
    load_checkpoint(new_path, &hub.cfg, &b);
    int differ = count_differing(&a, &b), from_hub = count_differing(&hub, &b);
    if (differ || from_hub) fprintf(stderr, "  %s: %d parameters differ (%d from the hub load)\n", name, differ, from_hub);
    CU_ASSERT_EQUAL(differ, 0);
    CU_ASSERT_EQUAL(from_hub, 0);
    /* the comparison sees one flipped bit */
    int last = b.n_params - 1;
    ((uint32_t *)b.params[last].t->data)[0] ^= 1u;
    CU_ASSERT_EQUAL(count_differing(&a, &b), 1);
    moe_model_free(&hub);
    moe_model_free(&a);
    moe_model_free(&b);
    moe_step_reset();
}

static void test_streamed_equals_whole(void) {
    const char *tmp = moe_test_tmpdir("hf-stream-convert");
    const char *names[] = {"mixtral-tiny", "olmoe-tiny", "qwen2-moe-tiny", "qwen3-moe-tiny", "deepseek-v3-tiny"};
    for (size_t f = 0; f < sizeof names / sizeof *names; f++) check_fixture(tmp, names[f]);
}

static void register_suites(void) {
    moe_test_add_suite("hf_convert", (moe_test_entry[]){{"streamed checkpoint = whole-model save, five families",
                                                         test_streamed_equals_whole},
                                                        {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
