/* Command-line entry points for Hugging Face hub folders:
 *   moe hf-logits DIR --ids 1,2,3 [--pos0 N] [--top K] [--generate N] [--routes]
 *       prints, per position, the K most likely next ids with their logits (and with
 *       --routes the experts each MoE layer chose); --generate appends N greedy tokens
 *       (through the KV cache) and prints the ids.
 *   moe hf-convert DIR --out FILE.h5
 *       writes the imported model as our checkpoint (step 0, no optimizer state). */
#include "moe/hf/hf_cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/memory.h"
#include "moe/train/checkpoint.h"
#include "moe/hf/hf_model.h"

static int cli_fail(moe_status s) {
    fprintf(stderr, "moe: error (%s): %s\n", moe_status_name(s), moe_last_error());
    return s == MOE_ERR_CONFIG ? 2 : 1;
}

static int usage_error(const char *msg) {
    fprintf(stderr, "moe: %s\n", msg);
    return 2;
}

/* "1,2,3" -> ids (malloc'd), count in *n. */
static int32_t *parse_ids(const char *text, int *n) {
    int cap = 1;
    for (const char *c = text; *c; c++) cap += *c == ',';
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)cap);
    *n = 0;
    for (const char *c = text; ids && *c;) {
        char *end;
        long v = strtol(c, &end, 10);
        if (end == c || v < 0 || v > 0x7fffffff || (*end && *end != ',')) {
            free(ids);
            return NULL;
        }
        ids[(*n)++] = (int32_t)v;
        c = *end ? end + 1 : end;
    }
    return ids;
}

static void print_position(const float *lg, int V, int top, int t, int32_t id) {
    printf("%d id=%d:", t, id);
    bool *used = calloc((size_t)V, sizeof *used);
    for (int j = 0; used && j < top && j < V; j++) {
        int best = -1;
        for (int v = 0; v < V; v++)
            if (!used[v] && (best < 0 || lg[v] > lg[best])) best = v;
        used[best] = true;
        printf(" %d:%.6g", best, lg[best]);
    }
    free(used);
    printf("\n");
}

static void print_routes(const moe_model *m, const int32_t *routes, int T) {
    int k = m->cfg.model.top_k;
    for (int L = 0; L < m->cfg.model.n_layers; L++) {
        if (m->blocks[L].dense) continue;
        printf("layer %d experts:", L);
        for (int t = 0; t < T; t++)
            for (int j = 0; j < k; j++) printf("%s%d", j ? "," : " ", routes[((int64_t)L * T + t) * k + j]);
        printf("\n");
    }
}

typedef struct logits_args {
    const char *dir, *ids;
    long pos0, top, generate;
    bool routes;
} logits_args;

static int parse_logits_args(int argc, char **argv, logits_args *a) {
    *a = (logits_args){.top = 5};
    for (int i = 1; i < argc; i++) {
        bool more = i + 1 < argc;
        if (!strcmp(argv[i], "--ids") && more) a->ids = argv[++i];
        else if (!strcmp(argv[i], "--pos0") && more) a->pos0 = strtol(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--top") && more) a->top = strtol(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--generate") && more) a->generate = strtol(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--routes")) a->routes = true;
        else if (argv[i][0] != '-' && !a->dir) a->dir = argv[i];
        else return usage_error("hf-logits: unknown or incomplete argument (DIR --ids 1,2,3 [--pos0 N] [--top K] "
                                "[--generate N] [--routes])");
    }
    if (!a->dir || !a->ids) return usage_error("hf-logits: needs DIR and --ids");
    if (a->pos0 < 0 || a->top < 1 || a->generate < 0) return usage_error("hf-logits: --pos0, --generate >= 0, --top >= 1");
    return 0;
}

int moe_cli_logits(int argc, char **argv) {
    logits_args a;
    int rc = parse_logits_args(argc, argv, &a);
    if (rc) return rc;
    int T;
    int32_t *ids = parse_ids(a.ids, &T);
    if (!ids || T == 0) {
        free(ids);
        return usage_error("hf-logits: --ids wants comma-separated token ids");
    }
    moe_model m;
    moe_hf_info info;
    moe_status s = moe_hf_load(a.dir, &m, &info);
    if (s != MOE_OK) {
        free(ids);
        return cli_fail(s);
    }
    int V = m.cfg.model.vocab_size, k = m.cfg.model.top_k;
    float *lg = malloc(sizeof(float) * (size_t)T * (size_t)V);
    int32_t *routes = malloc(sizeof(int32_t) * (size_t)T * (size_t)(k * m.cfg.model.n_layers));
    int32_t *gen = malloc(sizeof(int32_t) * (size_t)(T + a.generate));
    s = lg && routes && gen ? MOE_OK : moe_error(MOE_ERR_OOM, "hf-logits: out of host memory");
    for (int t = 0; t < T && s == MOE_OK; t++)
        if (ids[t] >= V) s = moe_error(MOE_ERR_INVALID, "hf-logits: id %d is outside the vocabulary of %d", ids[t], V);
    if (s == MOE_OK) s = moe_model_logits(&m, ids, 1, T, a.pos0, lg, routes);
    for (int t = 0; t < T && s == MOE_OK; t++) print_position(lg + (int64_t)t * V, V, (int)a.top, t, ids[t]);
    if (s == MOE_OK && a.routes) print_routes(&m, routes, T);
    if (s == MOE_OK && a.generate)
        s = moe_hf_generate_greedy(&m, ids, T, (int)a.generate, NULL, 0, gen);
    for (int t = 0; s == MOE_OK && a.generate && t < T + a.generate; t++)
        printf("%s%d%s", t ? "," : "generated: ", gen[t], t + 1 == T + a.generate ? "\n" : "");
    free(lg), free(routes), free(gen), free(ids);
    moe_model_free(&m);
    moe_step_reset();
    return s == MOE_OK ? 0 : cli_fail(s);
}

int moe_cli_convert(int argc, char **argv) {
    const char *dir = NULL, *out = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
        else if (argv[i][0] != '-' && !dir) dir = argv[i];
        else return usage_error("hf-convert: unknown argument (DIR --out FILE.h5)");
    }
    if (!dir || !out) return usage_error("hf-convert: needs DIR and --out FILE.h5");
    moe_model m;
    moe_hf_info info;
    moe_status s = moe_hf_load(dir, &m, &info);
    if (s != MOE_OK) return cli_fail(s);
    moe_train_state ts;
    memset(&ts, 0, sizeof ts);
    s = moe_checkpoint_save(out, &m, NULL, &ts);
    if (s == MOE_OK) printf("%s: %s model, %lld parameters\n", out, info.model_type, (long long)moe_model_param_count(&m, false));
    moe_model_free(&m);
    return s == MOE_OK ? 0 : cli_fail(s);
}
