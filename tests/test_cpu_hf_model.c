/* Hugging Face hub folders: the five tiny MoE fixtures (Mixtral, OLMoE, Qwen2-MoE,
 * Qwen3-MoE, DeepSeek-V3) load and compute transformers' logits (within 1e-4 of the
 * largest logit, both rows, the left-padded one on its real tokens), the router's top-k
 * experts per MoE layer and the greedy continuation; malformed safetensors files, indexes
 * and configs are refused with the file and the tensor or key named; the new model
 * features pass an f64 finite-difference gradient check. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "moe/train/checkpoint.h"
#include "moe/cli/commands.h"
#include "moe/hf/hf_model.h"
#include "moe/hf/safetensors.h"
#include "tests/harness/hf_fixture.h"
#include "tests/harness/model_gradcheck.h"
#include "tests/harness/testlib.h"

static void check_fixture(const char *name) {
    moe_model m;
    moe_hf_info info;
    hf_expected e;
    hf_fixture_open(name, &m, &info, &e);
    int V = m.cfg.model.vocab_size, k = m.cfg.model.top_k, pad0, pad1, padx;
    float *out = malloc(sizeof(float) * 24 * (size_t)V);
    int32_t *route = malloc(sizeof(int32_t) * 24 * (size_t)(k * m.cfg.model.n_layers));
    moe_decoder *d = NULL;
    CHECK_OK(moe_decoder_open(&m, m.compute, &d));
    double e0 = hf_row_err(d, &e, 0, 0, out, route, &pad0);
    int bad0 = hf_route_mismatches(&m, &e, 0, pad0, route);
    double e1 = hf_row_err(d, &e, 1, -1, out, route, &pad1); /* the real tokens keep positions pad.. */
    int bad1 = hf_route_mismatches(&m, &e, 1, pad1, route);
    double e1_restart = hf_row_err(d, &e, 1, 0, out, route, &padx);
    fprintf(stderr, "  %s: logits rel err row0 %.2e row1 %.2e (positions restarted at 0: %.2e), route mismatches "
            "%d %d\n", name, e0, e1, e1_restart, bad0, bad1);
    CU_ASSERT(e0 < 1e-4);
    CU_ASSERT(e1 < 1e-4);
    CU_ASSERT_EQUAL(bad0 + bad1, 0);
    int32_t *ids = NULL;
    int n_ids = 0;
    CU_ASSERT_EQUAL(hf_greedy_first_mismatch(d, &info, &e, &ids, &n_ids), -1);
    free(ids), free(out), free(route);
    hf_expected_close(&e);
    moe_decoder_close(d);
    moe_model_free(&m);
    moe_step_reset();
}

static long status_kb(const char *key) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, key, strlen(key))) v = atol(line + strlen(key) + 1);
    if (f) fclose(f);
    return v;
}

/* Peak host memory of loading the largest fixture (run first, so the process's earlier
 * peak is small): the rise of VmHWM against the bytes on disk. The f32 model itself is
 * about the file's size; the mapping is dropped tensor by tensor and the random init's
 * host draws are handed back one parameter at a time. */
static void test_load_peak_memory(void) {
    const char *dir = hf_fixture_dir("olmoe-tiny");
    char path[1200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    struct stat st;
    CU_ASSERT_FATAL(stat(path, &st) == 0);
    moe_model m;
    moe_hf_info info;
    long before = status_kb("VmHWM:"), rss = status_kb("VmRSS:");
    CU_ASSERT_EQUAL_FATAL(moe_hf_load(dir, &m, &info), MOE_OK);
    long after = status_kb("VmHWM:");
    long rise = after - (before > rss ? before : rss);
    fprintf(stderr, "  load of %s: %lld bytes on disk, VmHWM %ld -> %ld kB (rise %ld kB over VmRSS %ld kB)\n", path,
            (long long)st.st_size, before, after, after - rss, rss);
#ifndef __SANITIZE_ADDRESS__ /* the sanitizer's shadow memory and redzones dwarf a 1.6 MB model */
    CU_ASSERT((after - rss) * 1024 < 3 * (long)st.st_size + (4L << 20));
#endif
    (void)rise;
    moe_model_free(&m);
}

static void test_mixtral(void) { check_fixture("mixtral-tiny"); }
static void test_olmoe(void) { check_fixture("olmoe-tiny"); }
static void test_qwen2_moe(void) { check_fixture("qwen2-moe-tiny"); }
static void test_qwen3_moe(void) { check_fixture("qwen3-moe-tiny"); }
static void test_deepseek_v3(void) { check_fixture("deepseek-v3-tiny"); }

/* ---- malformed inputs ---- */

static const char *tmp;

static void write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    CU_ASSERT_FATAL(f != NULL);
    fwrite(data, 1, n, f);
    fclose(f);
}

/* A safetensors file with the given header and `data` zero bytes after it. */
static void write_st(const char *path, const char *header, size_t data) {
    uint64_t n = strlen(header);
    size_t total = 8 + n + data;
    char *buf = calloc(1, total);
    memcpy(buf, &n, 8);
    memcpy(buf + 8, header, n);
    write_file(path, buf, total);
    free(buf);
}

/* Opening `path` fails with a message holding `a` and `b`. */
static void expect_refused(const char *path, const char *a, const char *b) {
    moe_st_file f;
    moe_status s = moe_st_open(&f, path);
    CU_ASSERT_NOT_EQUAL(s, MOE_OK);
    const char *msg = moe_last_error();
    if (!strstr(msg, a) || !strstr(msg, b)) fprintf(stderr, "  message lacks '%s' / '%s': %s\n", a, b, msg);
    CU_ASSERT_PTR_NOT_NULL(strstr(msg, a));
    CU_ASSERT_PTR_NOT_NULL(strstr(msg, b));
}

static void test_bad_files(void) {
    tmp = moe_test_tmpdir("hf-bad");
    char p[600];
    snprintf(p, sizeof p, "%s/short.safetensors", tmp);
    write_file(p, "\x10\0\0", 3);
    expect_refused(p, "short.safetensors", "8-byte header length");
    snprintf(p, sizeof p, "%s/long.safetensors", tmp);
    write_st(p, "{}", 0);
    FILE *f = fopen(p, "r+b");
    uint64_t big = 1000;
    fwrite(&big, 8, 1, f);
    fclose(f);
    expect_refused(p, "long.safetensors", "header length 1000");
    snprintf(p, sizeof p, "%s/outside.safetensors", tmp);
    write_st(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[100],\"data_offsets\":[0,400]}}", 16);
    expect_refused(p, "outside.safetensors", "'w'");
    snprintf(p, sizeof p, "%s/overlap.safetensors", tmp);
    write_st(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}", 24);
    expect_refused(p, "overlap.safetensors", "'a' and 'b' overlap");
    snprintf(p, sizeof p, "%s/dtype.safetensors", tmp);
    write_st(p, "{\"x\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[0,16]}}", 16);
    expect_refused(p, "dtype.safetensors", "'x': dtype F64");
    snprintf(p, sizeof p, "%s/size.safetensors", tmp);
    write_st(p, "{\"y\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8);
    expect_refused(p, "size.safetensors", "'y'");
    /* bf16 and f16 widen exactly: 1, -2 (bf16); 1, the smallest subnormal, -inf (f16) */
    snprintf(p, sizeof p, "%s/half.safetensors", tmp);
    const char *hh = "{\"b\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[0,4]},"
                     "\"h\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[4,10]}}";
    uint64_t hn = strlen(hh);
    unsigned char img[256];
    memcpy(img, &hn, 8);
    memcpy(img + 8, hh, hn);
    const uint16_t vals[5] = {0x3f80, 0xc000, 0x3c00, 0x0001, 0xfc00};
    memcpy(img + 8 + hn, vals, sizeof vals);
    write_file(p, img, 8 + hn + sizeof vals);
    moe_st_file hf;
    CU_ASSERT_EQUAL_FATAL(moe_st_open(&hf, p), MOE_OK);
    float w[3];
    CU_ASSERT_EQUAL(moe_st_read_f32(moe_st_find(&hf, "b"), w), MOE_OK);
    CU_ASSERT(w[0] == 1.0f && w[1] == -2.0f);
    CU_ASSERT_EQUAL(moe_st_read_f32(moe_st_find(&hf, "h"), w), MOE_OK);
    CU_ASSERT(w[0] == 1.0f && w[1] == ldexpf(1.0f, -24) && isinf(w[2]) && w[2] < 0);
    moe_st_close(&hf);
    snprintf(p, sizeof p, "%s/json.safetensors", tmp);
    write_st(p, "{\"y\": [1, 2", 0);
    expect_refused(p, "json.safetensors", "JSON");
    /* found by fuzzing: these opened */
    snprintf(p, sizeof p, "%s/twice.safetensors", tmp);
    write_st(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8);
    expect_refused(p, "twice.safetensors", "'a' appears twice");
    snprintf(p, sizeof p, "%s/offsets.safetensors", tmp);
    write_st(p, "{\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[\"0\",\"0\"]}}", 0);
    expect_refused(p, "offsets.safetensors", "'e': data_offsets");
    snprintf(p, sizeof p, "%s/numel.safetensors", tmp); /* 2^64 x 0 elements: the count overflows int64 */
    write_st(p, "{\"z\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,0],\"data_offsets\":[0,0]}}", 0);
    expect_refused(p, "numel.safetensors", "'z'");
}

/* A copy of a fixture's folder with config.json replaced (NULL: kept). */
static const char *copy_fixture(const char *name, const char *as, const char *config) {
    static char dst[700];
    snprintf(dst, sizeof dst, "%s/%s", tmp, as);
    mkdir(dst, 0755);
    const char *files[] = {"config.json", "model.safetensors", "generation_config.json"};
    for (int i = 0; i < 3; i++) {
        char a[1200], b[1200];
        snprintf(a, sizeof a, "%s/%s", hf_fixture_dir(name), files[i]);
        snprintf(b, sizeof b, "%s/%s", dst, files[i]);
        FILE *in = fopen(a, "rb");
        CU_ASSERT_FATAL(in != NULL);
        fseek(in, 0, SEEK_END);
        long n = ftell(in);
        fseek(in, 0, SEEK_SET);
        char *buf = malloc((size_t)n);
        CU_ASSERT_FATAL(fread(buf, 1, (size_t)n, in) == (size_t)n);
        fclose(in);
        if (i == 0 && config) write_file(b, config, strlen(config));
        else write_file(b, buf, (size_t)n);
        free(buf);
    }
    return dst;
}

/* fixture config.json text with `from` replaced by `to`. */
static char *edited_config(const char *name, const char *from, const char *to) {
    char path[1200];
    snprintf(path, sizeof path, "%s/config.json", hf_fixture_dir(name));
    char *t = moe_hf_read_text(path), *at = t ? strstr(t, from) : NULL;
    CU_ASSERT_FATAL(at != NULL);
    char *out = malloc(strlen(t) + strlen(to) + 1);
    sprintf(out, "%.*s%s%s", (int)(at - t), t, to, at + strlen(from));
    free(t);
    return out;
}

static void expect_load_refused(const char *dir, const char *a, const char *b) {
    moe_model m;
    moe_hf_info info;
    CU_ASSERT_NOT_EQUAL(moe_hf_load(dir, &m, &info), MOE_OK);
    const char *msg = moe_last_error();
    if (!strstr(msg, a) || !strstr(msg, b)) fprintf(stderr, "  message lacks '%s' / '%s': %s\n", a, b, msg);
    CU_ASSERT_PTR_NOT_NULL(strstr(msg, a));
    CU_ASSERT_PTR_NOT_NULL(strstr(msg, b));
}

static void test_bad_folders(void) {
    tmp = moe_test_tmpdir("hf-bad-dirs");
    char *c = edited_config("mixtral-tiny", "\"intermediate_size\": 96", "\"intermediate_size\": 80");
    expect_load_refused(copy_fixture("mixtral-tiny", "shape", c), "shape/model.safetensors",
                        "'model.layers.0.block_sparse_moe.experts.0.w1.weight' has shape [96, 64]");
    free(c);
    c = edited_config("mixtral-tiny", "\"model_type\": \"mixtral\"", "\"model_type\": \"llama4\"");
    expect_load_refused(copy_fixture("mixtral-tiny", "type", c), "type/config.json", "model_type \"llama4\"");
    free(c);
    c = edited_config("mixtral-tiny", "\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\"");
    expect_load_refused(copy_fixture("mixtral-tiny", "act", c), "act/config.json", "hidden_act");
    free(c);
    c = edited_config("olmoe-tiny", "\"clip_qkv\": null", "\"clip_qkv\": 8.0");
    expect_load_refused(copy_fixture("olmoe-tiny", "clip", c), "clip/config.json", "clip_qkv");
    free(c);
    c = edited_config("mixtral-tiny", "\"rope_theta\": 10000.0", "\"rope_theta\": 1e999");
    expect_load_refused(copy_fixture("mixtral-tiny", "inf", c), "inf/config.json", "rope_theta: expected a finite number");
    free(c);
    c = edited_config("mixtral-tiny", "\"rope_type\": \"default\"", "\"rope_type\": \"yarn\"");
    expect_load_refused(copy_fixture("mixtral-tiny", "yarn", c), "yarn/config.json", "\"yarn\"");
    free(c);
    /* qwen2-moe config on mixtral tensors: the router is found, its shared expert is not */
    const char *dir = copy_fixture("mixtral-tiny", "index", NULL);
    char path[900];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    const char *index = "{\"weight_map\": {\"model.embed_tokens.weight\": \"model.safetensors\", "
                        "\"lm_head.weight\": \"model-00002-of-00002.safetensors\"}}";
    write_file(path, index, strlen(index));
    expect_load_refused(dir, "model-00002-of-00002.safetensors", "'lm_head.weight'");
    unlink(path);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    write_st(path, "{\"model.embed_tokens.weight\":{\"dtype\":\"F32\",\"shape\":[600,64],\"data_offsets\":[0,153600]}}",
             153600);
    expect_load_refused(dir, "index", "'model.norm.weight' is missing");
}

/* ---- the new model features train: f64 gradient checks ---- */

static void small_config(moe_config *c) {
    moe_config_defaults(c);
    c->model.vocab_size = 32;
    c->model.d_model = 16;
    c->model.n_layers = 3;
    c->model.n_heads = 2;
    c->model.seq_len = 6;
    c->model.ffn_dim = 8;
    c->model.n_experts = 4;
    c->model.top_k = 2;
    c->model.tie_embeddings = false;
    c->model.init_std = 0.3;
}

static void expect_gradcheck(const moe_config *c) {
    CU_ASSERT_EQUAL_FATAL(moe_config_validate(c), MOE_OK);
    moe_gradcheck_result r = moe_test_model_gradcheck(c, 2, 6, 4);
    CU_ASSERT(r.checked > 60);
    CU_ASSERT_EQUAL(r.bad, 0);
}

/* head_dim != d/H, q/k/v biases, q/k norm over all heads, a gated shared expert, dense
 * layers by index and by step, sigmoid scores with the selection bias, groups and a scale. */
static void test_gradcheck_mha_features(void) {
    moe_config c;
    small_config(&c);
    c.model.head_dim = 6;
    c.model.n_kv_heads = 1;
    c.model.qkv_bias = true;
    c.model.qk_norm = MOE_CFG_QK_NORM_FULL;
    c.model.n_shared_experts = 1;
    c.model.shared_ffn_dim = 4;
    c.model.shared_gate = true;
    c.model.n_layers = 4;
    c.model.dense_layer_ids = (moe_yaml_list){.count = 1, .values = {0}};
    c.model.moe_layer_step = 2; /* layers 1 and 3 MoE, 0 and 2 dense */
    c.model.dense_ffn_dim = 12;
    c.router.score = MOE_CFG_SCORE_SIGMOID;
    c.router.balance = MOE_CFG_BALANCE_AUX_FREE;
    c.router.n_groups = 2;
    c.router.topk_groups = 1;
    c.router.scale = 2.5;
    expect_gradcheck(&c);
    c.model.qk_norm = MOE_CFG_QK_NORM_HEAD;
    c.router.n_groups = 1;
    c.router.score = MOE_CFG_SCORE_SOFTMAX;
    c.router.renormalize = false;
    expect_gradcheck(&c);
}

/* Multi-head latent attention: low-rank q (and full-rank q), v wider than q/k (zero padding
 * with the rescaled q) and narrower (v padded). */
static void test_gradcheck_mla(void) {
    moe_config c;
    small_config(&c);
    c.model.attention = MOE_CFG_ATTENTION_MLA;
    c.model.q_lora_rank = 6;
    c.model.kv_lora_rank = 5;
    c.model.qk_nope_dim = 4;
    c.model.qk_rope_dim = 2;
    c.model.v_head_dim = 8;
    c.model.dense_layers = 1;
    expect_gradcheck(&c);
    c.model.q_lora_rank = 0;
    c.model.v_head_dim = 3;
    expect_gradcheck(&c);
}

/* The KV-cache path equals the full forward with every new feature on: step logits after a
 * prompt and one more token against moe_model_logits of the whole sequence. */
static void test_cached_equals_full(void) {
    moe_config c;
    small_config(&c);
    for (int variant = 0; variant < 2; variant++) {
        if (variant == 1) {
            c.model.attention = MOE_CFG_ATTENTION_MLA;
            c.model.qkv_bias = false;
            c.model.qk_norm = MOE_CFG_QK_NORM_NONE;
            c.model.q_lora_rank = 6;
            c.model.kv_lora_rank = 5;
            c.model.qk_nope_dim = 4;
            c.model.qk_rope_dim = 2;
            c.model.v_head_dim = 8;
        } else {
            c.model.head_dim = 6;
            c.model.qkv_bias = true;
            c.model.qk_norm = MOE_CFG_QK_NORM_HEAD;
            c.model.n_shared_experts = 1;
            c.model.shared_gate = true;
        }
        CU_ASSERT_EQUAL_FATAL(moe_config_validate(&c), MOE_OK);
        moe_model m;
        CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 0, 1), MOE_OK);
        int32_t tok[6] = {3, 9, 27, 1, 17, 30};
        float full[6 * 32], step[32];
        moe_step_reset();
        CU_ASSERT_EQUAL_FATAL(moe_model_logits(&m, tok, 1, 6, 0, full, NULL), MOE_OK);
        moe_decoder *d;
        moe_decode_state *ds;
        CU_ASSERT_EQUAL_FATAL(moe_decoder_open(&m, m.compute, &d), MOE_OK);
        CU_ASSERT_EQUAL_FATAL(moe_decode_state_create(d, 1, 8, &ds), MOE_OK);
        moe_step_reset();
        CU_ASSERT_EQUAL_FATAL(moe_decoder_feed(d, ds, 0, tok, 5, step), MOE_OK);
        CU_ASSERT(hf_rel_err(step, full + 4 * 32, 32) < 1e-5);
        moe_step_reset();
        CU_ASSERT_EQUAL_FATAL(moe_decoder_feed(d, ds, 0, tok + 5, 1, step), MOE_OK);
        double err = hf_rel_err(step, full + 5 * 32, 32);
        CU_ASSERT(err < 1e-5);
        moe_decode_state_free(ds);
        moe_decoder_close(d);
        moe_model_free(&m);
        moe_step_reset();
    }
}

/* moe convert writes our checkpoint; its config (with the new keys) reloads and the model
 * loaded from it gives the imported model's logits bit for bit. moe logits runs. */
static void test_convert_round_trip(void) {
    tmp = moe_test_tmpdir("hf-convert");
    for (int f = 0; f < 2; f++) {
        const char *name = f ? "deepseek-v3-tiny" : "qwen2-moe-tiny";
        char out[700], dir[1100];
        snprintf(out, sizeof out, "%s/%s.h5", tmp, name);
        snprintf(dir, sizeof dir, "%s", hf_fixture_dir(name));
        CU_ASSERT_EQUAL_FATAL(moe_cmd_convert(3, (char *[]){dir, "--out", out, NULL}), 0);
        CU_ASSERT_EQUAL(moe_cmd_logits(4, (char *[]){"--model", dir, "--prompt-ids", "5,6,7", NULL}), 0);
        char *text = NULL;
        moe_config cfg;
        CU_ASSERT_EQUAL_FATAL(moe_checkpoint_read_config(out, &text), MOE_OK);
        CU_ASSERT_EQUAL_FATAL(moe_config_load_text(&cfg, text, out), MOE_OK);
        free(text);
        moe_model a, b;
        moe_hf_info info;
        moe_train_state ts;
        CU_ASSERT_EQUAL_FATAL(moe_hf_load(dir, &a, &info), MOE_OK);
        CU_ASSERT_EQUAL(memcmp(&a.cfg.model, &cfg.model, sizeof cfg.model), 0);
        CU_ASSERT_EQUAL(memcmp(&a.cfg.router, &cfg.router, sizeof cfg.router), 0);
        CU_ASSERT_EQUAL_FATAL(moe_model_init(&b, &cfg, 0, 1), MOE_OK);
        CU_ASSERT_EQUAL_FATAL(moe_checkpoint_load(out, &b, NULL, &ts), MOE_OK);
        int32_t tok[8] = {5, 9, 100, 3, 44, 17, 250, 8};
        int V = cfg.model.vocab_size;
        float *la = malloc(sizeof(float) * 8 * (size_t)V), *lb = malloc(sizeof(float) * 8 * (size_t)V);
        moe_step_reset();
        CU_ASSERT_EQUAL(moe_model_logits(&a, tok, 1, 8, 0, la, NULL), MOE_OK);
        moe_step_reset();
        CU_ASSERT_EQUAL(moe_model_logits(&b, tok, 1, 8, 0, lb, NULL), MOE_OK);
        CU_ASSERT_EQUAL(memcmp(la, lb, sizeof(float) * 8 * (size_t)V), 0);
        free(la), free(lb);
        moe_model_free(&a);
        moe_model_free(&b);
        moe_step_reset();
    }
}

/* import -> export -> import: every parameter (and selection bias) bit for bit, the same
 * config, for each family; the exported DeepSeek-V3 is in rotate-half rope order. */
static void test_export_round_trip(void) {
    tmp = moe_test_tmpdir("hf-export");
    const char *names[] = {"mixtral-tiny", "olmoe-tiny", "qwen2-moe-tiny", "qwen3-moe-tiny", "deepseek-v3-tiny"};
    for (int f = 0; f < 5; f++) {
        char out[700];
        snprintf(out, sizeof out, "%s/%s", tmp, names[f]);
        mkdir(out, 0755);
        moe_model a, b;
        moe_hf_info ia, ib;
        CU_ASSERT_EQUAL_FATAL(moe_hf_load(hf_fixture_dir(names[f]), &a, &ia), MOE_OK);
        moe_status s = moe_hf_export(&a, ia.model_type, out);
        if (s != MOE_OK) fprintf(stderr, "  %s\n", moe_last_error());
        CU_ASSERT_EQUAL_FATAL(s, MOE_OK);
        s = moe_hf_load(out, &b, &ib);
        if (s != MOE_OK) fprintf(stderr, "  %s\n", moe_last_error());
        CU_ASSERT_EQUAL_FATAL(s, MOE_OK);
        CU_ASSERT_STRING_EQUAL(ia.model_type, ib.model_type);
        CU_ASSERT_EQUAL(memcmp(&a.cfg.model, &b.cfg.model, sizeof a.cfg.model), 0);
        CU_ASSERT_EQUAL(memcmp(&a.cfg.router, &b.cfg.router, sizeof a.cfg.router), 0);
        CU_ASSERT_EQUAL_FATAL(a.n_params, b.n_params);
        int differ = 0;
        for (int i = 0; i < a.n_params; i++) {
            int64_t n = moe_tensor_numel(a.params[i].t);
            differ += n != moe_tensor_numel(b.params[i].t) ||
                      memcmp(a.params[i].t->data, b.params[i].t->data, sizeof(float) * (size_t)n) != 0;
        }
        for (int L = 0; L < a.cfg.model.n_layers; L++)
            if (!a.blocks[L].dense && a.blocks[L].moe.router.bias)
                differ += memcmp(a.blocks[L].moe.router.bias->data, b.blocks[L].moe.router.bias->data,
                                 sizeof(float) * (size_t)a.cfg.model.n_experts) != 0;
        CU_ASSERT_EQUAL(differ, 0);
        moe_model_free(&a);
        moe_model_free(&b);
    }
    /* a model no family can express is refused by name */
    moe_config c;
    small_config(&c);
    c.model.expert_ffn_dims = (moe_yaml_list){.count = 4, .values = {8, 8, 4, 4}};
    moe_model m;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 0, 1), MOE_OK);
    CU_ASSERT_EQUAL(moe_hf_export(&m, NULL, tmp), MOE_ERR_UNSUPPORTED);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "expert_ffn_dims"));
    moe_model_free(&m);
    moe_step_reset();
}

/* The comparison can fail: a fixture whose config.json misstates one feature (the rope
 * order of MLA, gate renormalisation) gives logits far outside the bar. */
static void test_misread_feature_caught(void) {
    tmp = moe_test_tmpdir("hf-misread");
    const char *cases[][4] = {{"deepseek-v3-tiny", "\"rope_interleave\": true", "\"rope_interleave\": false", "rope"},
                              {"qwen2-moe-tiny", "\"norm_topk_prob\": false", "\"norm_topk_prob\": true", "renorm"},
                              {"olmoe-tiny", "\"norm_topk_prob\": false", "\"norm_topk_prob\": true", "renorm2"}};
    for (int c = 0; c < 3; c++) {
        char *cfg = edited_config(cases[c][0], cases[c][1], cases[c][2]);
        const char *dir = copy_fixture(cases[c][0], cases[c][3], cfg);
        free(cfg);
        moe_model m;
        moe_hf_info info;
        CU_ASSERT_EQUAL_FATAL(moe_hf_load(dir, &m, &info), MOE_OK);
        hf_expected e;
        hf_expected_read(hf_fixture_dir(cases[c][0]), &e);
        int V = m.cfg.model.vocab_size, pad;
        float *out = malloc(sizeof(float) * 24 * (size_t)V);
        int32_t *route = malloc(sizeof(int32_t) * 24 * (size_t)(m.cfg.model.top_k * m.cfg.model.n_layers));
        moe_decoder *d = NULL;
        CHECK_OK(moe_decoder_open(&m, m.compute, &d));
        double err = hf_row_err(d, &e, 0, 0, out, route, &pad);
        CU_ASSERT(err > 1e-3);
        free(out), free(route);
        hf_expected_close(&e);
        moe_decoder_close(d);
        moe_model_free(&m);
        moe_step_reset();
    }
}

static void register_suites(void) {
    moe_test_add_suite("hf_model", (moe_test_entry[]){{"peak host memory of a load", test_load_peak_memory},
                                                       {"mixtral", test_mixtral},
                                                       {"olmoe", test_olmoe},
                                                       {"qwen2-moe", test_qwen2_moe},
                                                       {"qwen3-moe", test_qwen3_moe},
                                                       {"deepseek-v3", test_deepseek_v3},
                                                       {"a misread feature is caught", test_misread_feature_caught},
                                                       {"malformed safetensors files", test_bad_files},
                                                       {"malformed hub folders", test_bad_folders},
                                                       {"gradcheck: mha features", test_gradcheck_mha_features},
                                                       {"gradcheck: mla", test_gradcheck_mla},
                                                       {"kv cache = full forward", test_cached_equals_full},
                                                       {"hf-convert round trip, hf-logits", test_convert_round_trip},
                                                       {"export round trip", test_export_round_trip},
                                                       {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
