/* model.init_from: `moe train` from a Hugging Face hub folder (see init_from.h). */
#include "moe/cli/init_from.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "moe/hf/hf_model.h"
#include "moe/train/checkpoint.h"

/* Keys the training config may set although the folder's config.json fixes the rest. */
static const char *const free_keys[] = {"model.seq_len", "model.dropout", "model.init_std", "model.init_from"};
/* Router keys that are part of the model (the folder's, like model.*). */
static const char *const router_keys[] = {"router.type", "router.score", "router.n_groups", "router.topk_groups",
                                          "router.scale", "router.renormalize"};

static bool in_list(const char *key, const char *const *list, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!strcmp(key, list[i])) return true;
    return false;
}

static bool fixed_by_folder(const char *key) {
    if (in_list(key, free_keys, sizeof free_keys / sizeof *free_keys)) return false;
    return !strncmp(key, "model.", 6) || in_list(key, router_keys, sizeof router_keys / sizeof *router_keys);
}

/* The next "section.key" and its value of a config's YAML dump (one "  key: value" line). */
static bool next_key(const char **p, char *section, size_t cap, char *key, size_t kcap, const char **value, int *vlen) {
    while (**p) {
        const char *line = *p, *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        *p = end ? end + 1 : line + len;
        if (line[0] != ' ' && len > 1 && line[len - 1] == ':') {
            snprintf(section, cap, "%.*s", (int)(len - 1), line);
            continue;
        }
        const char *colon = memchr(line, ':', len);
        if (line[0] != ' ' || !colon) continue;
        const char *k = line;
        while (*k == ' ') k++;
        snprintf(key, kcap, "%s.%.*s", section, (int)(colon - k), k);
        *value = colon + 2 <= line + len ? colon + 2 : line + len;
        *vlen = (int)(line + len - *value);
        return true;
    }
    return false;
}

/* Refuses a key the training config sets (not its default) to a value the folder's disagrees with. */
static moe_status check_agreement(const moe_config *cfg, const moe_config *hub, const char *dir) {
    moe_config def;
    MOE_TRY(moe_config_defaults(&def));
    char *texts[3] = {NULL, NULL, NULL};
    moe_status s = moe_config_to_yaml(cfg, &texts[0]);
    if (s == MOE_OK) s = moe_config_to_yaml(hub, &texts[1]);
    if (s == MOE_OK) s = moe_config_to_yaml(&def, &texts[2]);
    const char *p[3] = {texts[0], texts[1], texts[2]};
    char sec[3][64] = {"", "", ""}, key[3][160];
    const char *v[3];
    int n[3];
    while (s == MOE_OK && next_key(&p[0], sec[0], 64, key[0], 160, &v[0], &n[0]) &&
           next_key(&p[1], sec[1], 64, key[1], 160, &v[1], &n[1]) && next_key(&p[2], sec[2], 64, key[2], 160, &v[2], &n[2])) {
        MOE_ASSERT(!strcmp(key[0], key[1]) && !strcmp(key[0], key[2]), "config dumps differ in key order");
        bool set = n[0] != n[2] || memcmp(v[0], v[2], (size_t)n[0]);
        bool differs = n[0] != n[1] || memcmp(v[0], v[1], (size_t)n[0]);
        if (fixed_by_folder(key[0]) && set && differs)
            s = moe_error(MOE_ERR_CONFIG, "%s: %.*s here, but %s/config.json gives %.*s (model.init_from takes the "
                          "model from the folder: drop the key or make it agree)", key[0], n[0], v[0], dir, n[1], v[1]);
    }
    for (int i = 0; i < 3; i++) free(texts[i]);
    return s;
}

/* cfg with the folder's model and router features (the free keys kept where set). */
static void merge(moe_config *cfg, const moe_config *hub) {
    moe_config def;
    moe_config_defaults(&def);
    moe_cfg_model m = hub->model;
    if (cfg->model.seq_len != def.model.seq_len) m.seq_len = cfg->model.seq_len;
    m.dropout = cfg->model.dropout;
    m.init_std = cfg->model.init_std;
    memcpy(m.init_from, cfg->model.init_from, sizeof m.init_from);
    cfg->model = m;
    moe_cfg_router *r = &cfg->router;
    r->type = hub->router.type;
    r->score = hub->router.score;
    r->n_groups = hub->router.n_groups;
    r->topk_groups = hub->router.topk_groups;
    r->scale = hub->router.scale;
    r->renormalize = hub->router.renormalize;
    if (hub->router.balance == MOE_CFG_BALANCE_AUX_FREE) r->balance = MOE_CFG_BALANCE_AUX_FREE; /* its selection bias */
}

/* Text goes through the folder's tokenizer unless the config names another one. */
static moe_status take_tokenizer(moe_config *cfg, const char *dir) {
    char path[PATH_MAX + 32], abs[PATH_MAX];
    struct stat st;
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    if (cfg->data.tokenizer != MOE_CFG_TOKENIZER_BYTE || stat(path, &st) != 0) return MOE_OK;
    if (!realpath(dir, abs) || strlen(abs) >= sizeof cfg->data.tokenizer_path)
        return moe_error(MOE_ERR_IO, "model.init_from %s: cannot resolve the path", dir);
    cfg->data.tokenizer = MOE_CFG_TOKENIZER_HF;
    snprintf(cfg->data.tokenizer_path, sizeof cfg->data.tokenizer_path, "%s", abs);
    return MOE_OK;
}

/* The folder's weights as a checkpoint in a new temporary file. */
static moe_status weights_file(const char *dir, char *path, size_t cap) {
    const char *tmp = getenv("TMPDIR");
    snprintf(path, cap, "%s/moe-init-XXXXXX.h5", tmp && *tmp ? tmp : "/tmp");
    int fd = mkstemps(path, 3);
    if (fd < 0) return moe_error(MOE_ERR_IO, "cannot create %s: %s", path, strerror(errno));
    close(fd);
    moe_model m;
    moe_hf_info info;
    moe_status s = moe_hf_load(dir, &m, &info);
    moe_train_state ts;
    memset(&ts, 0, sizeof ts);
    if (s == MOE_OK) {
        s = moe_checkpoint_save(path, &m, NULL, &ts);
        moe_model_free(&m);
    }
    if (s != MOE_OK) {
        unlink(path);
        path[0] = '\0';
    }
    return s;
}

moe_status moe_cli_init_from(moe_config *cfg, bool fresh, char *weights, size_t cap) {
    weights[0] = '\0';
    const char *dir = cfg->model.init_from;
    moe_config hub;
    moe_hf_info info;
    MOE_TRY(moe_hf_config_read(dir, &hub, &info));
    MOE_TRY(check_agreement(cfg, &hub, dir));
    merge(cfg, &hub);
    MOE_TRY(take_tokenizer(cfg, dir));
    MOE_TRY(moe_config_validate(cfg));
    return fresh ? weights_file(dir, weights, cap) : MOE_OK;
}
