/* Tests of the YAML config: defaults, the shipped configs, every error message
 * (status + file:line:col + key), --set overrides and the emit/reload round trip. */
#include "tests/harness/testlib.h"
#include "tests/harness/files.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "moe/model/config.h"

/* ---------- helpers ---------- */

static bool contains(const char *text, const char *part) {
    bool ok = strstr(text, part) != NULL;
    if (!ok) fprintf(stderr, "\n  message: %s\n  lacks:   %s\n", text, part);
    return ok;
}

/* Writes `text` to a fresh file and returns its path. */
static const char *write_fixture(const char *text) {
    static char path[600];
    static int serial;
    snprintf(path, sizeof path, "%s/case%d.yaml", moe_test_scratch_dir("config"), serial++);
    moe_test_write_file(path, text, strlen(text));
    return path;
}

/* Loads `yaml` from a file; expects `code` and a message holding "<file>:<where>" and
 * each of the NULL-terminated `parts`. */
static void expect_file_error(const char *yaml, moe_status code, const char *where, ...) {
    const char *path = write_fixture(yaml);
    moe_config cfg;
    moe_status st = moe_config_load_file(&cfg, path);
    CU_ASSERT_EQUAL(st, code);
    char located[700];
    snprintf(located, sizeof located, "%s:%s: ", path, where);
    CU_ASSERT_TRUE(contains(moe_last_error(), located));
    va_list ap;
    va_start(ap, where);
    for (const char *part = va_arg(ap, const char *); part; part = va_arg(ap, const char *))
        CU_ASSERT_TRUE(contains(moe_last_error(), part));
    va_end(ap);
}

static void expect_set_error(const char *assignment, const char *part) {
    moe_config cfg, before;
    moe_config_defaults(&cfg);
    before = cfg;
    CU_ASSERT_EQUAL(moe_config_set(&cfg, assignment), MOE_ERR_CONFIG);
    char label[300];
    snprintf(label, sizeof label, "--set %s: ", assignment);
    CU_ASSERT_TRUE(contains(moe_last_error(), label));
    CU_ASSERT_TRUE(contains(moe_last_error(), part));
    CU_ASSERT_EQUAL(memcmp(&cfg, &before, sizeof cfg), 0); /* unchanged on error */
}

static void expect_invalid(const char *yaml, const char *part1, const char *part2) {
    moe_config cfg;
    CU_ASSERT_EQUAL_FATAL(moe_config_load_text(&cfg, yaml, "inline"), MOE_OK);
    CU_ASSERT_EQUAL(moe_config_validate(&cfg), MOE_ERR_CONFIG);
    CU_ASSERT_TRUE(contains(moe_last_error(), part1));
    CU_ASSERT_TRUE(contains(moe_last_error(), part2));
}

/* to_yaml then load_text must give the very same bytes. */
static void check_round_trip(const moe_config *cfg) {
    char *text = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_config_to_yaml(cfg, &text), MOE_OK);
    CU_ASSERT_PTR_NOT_NULL_FATAL(text);
    moe_config back;
    moe_status st = moe_config_load_text(&back, text, NULL);
    if (st != MOE_OK) fprintf(stderr, "\n%s\n%s\n", moe_last_error(), text);
    CU_ASSERT_EQUAL(st, MOE_OK);
    CU_ASSERT_EQUAL(memcmp(cfg, &back, sizeof back), 0);
    free(text);
}

/* ---------- defaults and shipped configs ---------- */

static void test_defaults(void) {
    moe_config cfg;
    memset(&cfg, 0x5a, sizeof cfg);
    CU_ASSERT_EQUAL(moe_config_defaults(&cfg), MOE_OK);
    CU_ASSERT_EQUAL(moe_config_validate(&cfg), MOE_OK);
    CU_ASSERT_EQUAL(cfg.model.vocab_size, 256);
    CU_ASSERT_EQUAL(cfg.model.d_model, 128);
    CU_ASSERT_EQUAL(cfg.model.n_layers, 4);
    CU_ASSERT_EQUAL(cfg.model.top_k, 2);
    CU_ASSERT_EQUAL(cfg.model.expert_ffn_dims.count, 0);
    CU_ASSERT_EQUAL(cfg.model.mixer.count, 1);
    CU_ASSERT_EQUAL(cfg.model.mixer.values[0], MOE_CFG_MIXER_ATTENTION);
    CU_ASSERT_TRUE(cfg.model.tie_embeddings);
    CU_ASSERT_TRUE(cfg.model.mom_shared);
    CU_ASSERT_EQUAL(cfg.model.mom_update, MOE_CFG_MOM_DELTA);
    CU_ASSERT_DOUBLE_EQUAL(cfg.model.rope_theta, 10000.0, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(cfg.model.norm_eps, 1e-5, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(cfg.model.mom_aux_coef, 1e-3, 0.0);
    CU_ASSERT_EQUAL(cfg.router.type, MOE_CFG_ROUTER_TOPK);
    CU_ASSERT_EQUAL(cfg.router.balance, MOE_CFG_BALANCE_SWITCH);
    CU_ASSERT_DOUBLE_EQUAL(cfg.router.aux_coef, 0.01, 0.0);
    CU_ASSERT_FALSE(cfg.router.rmoe_detach);
    CU_ASSERT_EQUAL(cfg.router.ot_iters, 30);
    CU_ASSERT_STRING_EQUAL(cfg.data.train_path, "data/brown/train.bin");
    CU_ASSERT_STRING_EQUAL(cfg.data.tokenizer_path, "");
    CU_ASSERT_EQUAL(cfg.data.batch_size, 8);
    CU_ASSERT_EQUAL(cfg.train.device, MOE_CFG_DEVICE_CPU);
    CU_ASSERT_EQUAL(cfg.train.steps, 200);
    CU_ASSERT_EQUAL(cfg.train.seed, 1234);
    CU_ASSERT_DOUBLE_EQUAL(cfg.train.lr, 3e-3, 0.0);
    CU_ASSERT_DOUBLE_EQUAL(cfg.train.eps, 1e-8, 0.0);
    CU_ASSERT_EQUAL(cfg.train.max_bad_steps, 5);
    CU_ASSERT_STRING_EQUAL(cfg.checkpoint.dir, "runs/tiny");
    CU_ASSERT_EQUAL(cfg.checkpoint.every, 100);
    CU_ASSERT_EQUAL(cfg.parallel.expert_parallel, 1);
    /* resolved values */
    CU_ASSERT_EQUAL(moe_config_kv_heads(&cfg), 4);
    CU_ASSERT_EQUAL(moe_config_shared_ffn_dim(&cfg), 256);
    CU_ASSERT_EQUAL(moe_config_dense_ffn_dim(&cfg), 512);
    CU_ASSERT_EQUAL(moe_config_expert_ffn_dim(&cfg, 7), 256);
    CU_ASSERT_EQUAL(moe_config_layer_mixer(&cfg, 3), MOE_CFG_MIXER_ATTENTION);
    CU_ASSERT_FALSE(moe_config_layer_is_dense(&cfg, 0));
    CU_ASSERT_STRING_EQUAL(moe_config_enum_name("train.device", MOE_CFG_DEVICE_CUDA), "cuda");
    CU_ASSERT_STRING_EQUAL(moe_config_enum_name("router.balance", MOE_CFG_BALANCE_AUX_FREE), "aux_free");
    CU_ASSERT_STRING_EQUAL(moe_config_enum_name("model.mixer", MOE_CFG_MIXER_GDN), "gdn");
}

static void test_tiny_cpu(void) {
    moe_config cfg;
    moe_status st = moe_config_load_file(&cfg, moe_test_source_path("configs/tiny-cpu.yaml"));
    if (st != MOE_OK) fprintf(stderr, "\n%s\n", moe_last_error());
    CU_ASSERT_EQUAL_FATAL(st, MOE_OK);
    CU_ASSERT_EQUAL(moe_config_validate(&cfg), MOE_OK);
    CU_ASSERT_EQUAL(cfg.model.d_model, 128);
    CU_ASSERT_EQUAL(cfg.model.n_layers, 4);
    CU_ASSERT_EQUAL(cfg.model.n_experts, 8);
    CU_ASSERT_EQUAL(cfg.data.batch_size, 16);
    CU_ASSERT_EQUAL(cfg.data.tokenizer, MOE_CFG_TOKENIZER_BYTE);
    CU_ASSERT_EQUAL(cfg.train.device, MOE_CFG_DEVICE_CPU);
    CU_ASSERT_EQUAL(cfg.train.steps, 500);
    CU_ASSERT_EQUAL(cfg.train.eval_every, 100);
    CU_ASSERT_DOUBLE_EQUAL(cfg.train.lr, 3e-3, 0.0);
    CU_ASSERT_STRING_EQUAL(cfg.checkpoint.dir, "runs/tiny");
    check_round_trip(&cfg);
}

static void test_small_gpu(void) {
    moe_config cfg;
    moe_status st = moe_config_load_file(&cfg, moe_test_source_path("configs/small-gpu.yaml"));
    if (st != MOE_OK) fprintf(stderr, "\n%s\n", moe_last_error());
    CU_ASSERT_EQUAL_FATAL(st, MOE_OK);
    CU_ASSERT_EQUAL(moe_config_validate(&cfg), MOE_OK);
    CU_ASSERT_EQUAL(cfg.model.vocab_size, 32768);
    CU_ASSERT_EQUAL(cfg.model.d_model, 1024);
    CU_ASSERT_EQUAL(cfg.model.n_layers, 8);
    CU_ASSERT_EQUAL(cfg.model.n_heads, 16);
    CU_ASSERT_EQUAL(cfg.model.ffn_dim, 2816);
    CU_ASSERT_EQUAL(cfg.model.seq_len, 1024);
    CU_ASSERT_EQUAL(cfg.data.tokenizer, MOE_CFG_TOKENIZER_BPE);
    CU_ASSERT_STRING_EQUAL(cfg.data.tokenizer_path, "data/brown/bpe.tok");
    CU_ASSERT_EQUAL(cfg.train.device, MOE_CFG_DEVICE_CUDA);
    CU_ASSERT_EQUAL(cfg.train.dtype, MOE_CFG_DTYPE_BF16);
    check_round_trip(&cfg);
}

static void test_empty_file_is_defaults(void) {
    moe_config cfg, def;
    moe_config_defaults(&def);
    CU_ASSERT_EQUAL(moe_config_load_file(&cfg, write_fixture("# nothing but a comment\n")), MOE_OK);
    CU_ASSERT_EQUAL(memcmp(&cfg, &def, sizeof cfg), 0);
}

/* ---------- load errors ---------- */

static void test_error_unknown_key(void) {
    expect_file_error("model:\n  d_model: 64\n  qqqqqqqqqqqqqq: 3\n", MOE_ERR_CONFIG, "3:3",
                      "unknown key 'model.qqqqqqqqqqqqqq'", "--help", NULL);
}

static void test_error_misspelt_key(void) {
    expect_file_error("model:\n  d_model: 64\n  d_modle: 3\n", MOE_ERR_CONFIG, "3:3",
                      "unknown key 'model.d_modle' (did you mean 'model.d_model'?)", NULL);
    expect_file_error("modle:\n  d_model: 64\n", MOE_ERR_CONFIG, "1:1",
                      "unknown key 'modle' (did you mean 'model'?)", NULL);
    /* the right key in the wrong section */
    expect_file_error("train:\n  batch_size: 4\n", MOE_ERR_CONFIG, "2:3",
                      "unknown key 'train.batch_size' (did you mean 'data.batch_size'?)", NULL);
}

static void test_error_wrong_type(void) {
    expect_file_error("model:\n  d_model: abc\n", MOE_ERR_CONFIG, "2:12",
                      "model.d_model: expected an integer, got 'abc'", NULL);
    expect_file_error("model:\n  d_model: 1.5\n", MOE_ERR_CONFIG, "2:12",
                      "model.d_model: expected an integer", NULL);
    expect_file_error("model:\n  d_model: \"64\"\n", MOE_ERR_CONFIG, "2:12",
                      "model.d_model: expected an integer, got the quoted string '64'", NULL);
    expect_file_error("train:\n  lr: fast\n", MOE_ERR_CONFIG, "2:7",
                      "train.lr: expected a finite number, got 'fast'", NULL);
    expect_file_error("model:\n  tie_embeddings: yes\n", MOE_ERR_CONFIG, "2:19",
                      "model.tie_embeddings: expected true or false, got 'yes'", NULL);
    expect_file_error("model:\n  d_model: [1, 2]\n", MOE_ERR_CONFIG, "2:12",
                      "model.d_model: expected an integer, got a list", NULL);
    expect_file_error("model:\n  expert_ffn_dims: 256\n", MOE_ERR_CONFIG, "2:20",
                      "model.expert_ffn_dims: expected a list of integers", NULL);
    expect_file_error("model:\n  expert_ffn_dims: [256, x]\n", MOE_ERR_CONFIG, "2:26",
                      "model.expert_ffn_dims[1]: expected an integer, got 'x'", NULL);
    expect_file_error("model: 3\n", MOE_ERR_CONFIG, "1:8",
                      "'model' is a section: expected a mapping", NULL);
    expect_file_error("- model\n", MOE_ERR_CONFIG, "1:1", "expected a mapping of sections", NULL);
}

static void test_error_out_of_range(void) {
    expect_file_error("model:\n  vocab_size: 0\n", MOE_ERR_CONFIG, "2:15",
                      "model.vocab_size: 0 is out of range [1, 1048576]", NULL);
    expect_file_error("model:\n  dropout: 1.5\n", MOE_ERR_CONFIG, "2:12",
                      "model.dropout: 1.5 is out of range [0, 0.9]", NULL);
    expect_file_error("train:\n  steps: 99999999999999999999\n", MOE_ERR_CONFIG, "2:10",
                      "train.steps: 99999999999999999999 is out of range", NULL);
    expect_file_error("model:\n  expert_ffn_dims: [256, 0]\n", MOE_ERR_CONFIG, "2:26",
                      "model.expert_ffn_dims[1]: 0 is out of range [1, 262144]", NULL);
}

static void test_error_bad_enum(void) {
    expect_file_error("train:\n  device: tpu\n", MOE_ERR_CONFIG, "2:11",
                      "train.device: 'tpu' is not allowed; expected one of: cpu, cuda", NULL);
    expect_file_error("model:\n  mixer: [attention, rnn]\n", MOE_ERR_CONFIG, "2:22",
                      "model.mixer[1]: 'rnn' is not allowed; expected one of: attention, mom, gdn",
                      NULL);
    expect_file_error("model:\n  mixer: transformer\n", MOE_ERR_CONFIG, "2:10",
                      "model.mixer: 'transformer' is not allowed", "attention, mom, gdn", NULL);
}

static void test_error_bad_list_length(void) {
    char yaml[1024] = "model:\n  expert_ffn_dims: [";
    for (int i = 0; i < 65; i++) strcat(yaml, i ? ", 8" : "8");
    strcat(yaml, "]\n");
    expect_file_error(yaml, MOE_ERR_CONFIG, "2:20",
                      "model.expert_ffn_dims: the list has 65 entries; at most 64 allowed", NULL);
    /* lengths that only the cross-field check can judge */
    expect_invalid("model:\n  n_layers: 4\n  mixer: [attention, mom]\n",
                   "model.mixer has 2 entries", "model.n_layers=4");
    expect_invalid("model:\n  n_experts: 8\n  expert_ffn_dims: [256, 128]\n",
                   "model.expert_ffn_dims has 2 entries", "model.n_experts=8");
}

static void test_error_syntax(void) {
    expect_file_error("model:\n  d_model: [1, 2\n", MOE_ERR_CONFIG, "3:1", "YAML syntax error", NULL);
    expect_file_error("model:\n  d_model: 64\n   n_layers: 2\n", MOE_ERR_CONFIG, "3:12",
                      "YAML syntax error", NULL);
    expect_file_error("model:\n  d_model: 64\n---\nmodel:\n  d_model: 32\n", MOE_ERR_CONFIG, "4:1",
                      "a second YAML document", NULL);
}

static void test_error_duplicate_key(void) {
    expect_file_error("model:\n  d_model: 64\n  d_model: 32\n", MOE_ERR_CONFIG, "3:3",
                      "duplicate key 'model.d_model' (first given at line 2)", NULL);
}

static void test_error_missing_file(void) {
    moe_config cfg;
    CU_ASSERT_EQUAL(moe_config_load_file(&cfg, "no/such/dir/cfg.yaml"), MOE_ERR_IO);
    CU_ASSERT_TRUE(contains(moe_last_error(), "'no/such/dir/cfg.yaml'"));
    CU_ASSERT_TRUE(contains(moe_last_error(), "No such file"));
}

static void test_checkpoint_origin(void) {
    moe_config cfg;
    CU_ASSERT_EQUAL(moe_config_load_text(&cfg, "model:\n  d_model: abc\n", NULL), MOE_ERR_CONFIG);
    CU_ASSERT_TRUE(contains(moe_last_error(), "<checkpoint>:2:12: model.d_model"));
}

/* A failed overlay leaves the struct as it was (no half-applied file). */
static void test_failed_load_is_atomic(void) {
    moe_config cfg, before;
    moe_config_defaults(&cfg);
    CU_ASSERT_EQUAL(moe_config_set(&cfg, "model.d_model=96"), MOE_OK);
    before = cfg;
    const char *path = write_fixture("model:\n  n_layers: 2\n  n_heads: 0\n");
    CU_ASSERT_EQUAL(moe_yaml_load_file(moe_config_schema(), &cfg, path), MOE_ERR_CONFIG);
    CU_ASSERT_EQUAL(memcmp(&cfg, &before, sizeof cfg), 0);
    /* and a good overlay keeps what the file does not mention */
    CU_ASSERT_EQUAL(moe_yaml_load_file(moe_config_schema(), &cfg, write_fixture("model:\n  n_layers: 2\n")),
                    MOE_OK);
    CU_ASSERT_EQUAL(cfg.model.n_layers, 2);
    CU_ASSERT_EQUAL(cfg.model.d_model, 96);
}

/* ---------- cross-field validation ---------- */

static void test_validate(void) {
    expect_invalid("model:\n  d_model: 128\n  n_heads: 5\n", "model.n_heads=5", "model.d_model=128");
    expect_invalid("model:\n  d_model: 96\n  n_heads: 32\n", "model.d_model/model.n_heads", "odd");
    expect_invalid("model:\n  n_heads: 4\n  n_kv_heads: 3\n", "model.n_kv_heads=3", "model.n_heads=4");
    expect_invalid("model:\n  n_experts: 4\n  top_k: 5\n", "model.top_k=5", "model.n_experts=4");
    expect_invalid("model:\n  n_layers: 2\n  dense_layers: 3\n", "model.dense_layers=3", "model.n_layers=2");
    expect_invalid("model:\n  mom_memories: 2\n  mom_top_k: 3\n", "model.mom_top_k=3",
                   "model.mom_memories=2");
    expect_invalid("model:\n  mixer: mom\n  mom_heads: 3\n", "model.mom_heads=3", "model.d_model=128");
    expect_invalid("train:\n  lr: 1e-4\n  min_lr: 1e-3\n", "train.min_lr", "train.lr");
    expect_invalid("data:\n  batch_size: 10\ntrain:\n  grad_accum: 3\n", "train.grad_accum=3",
                   "data.batch_size=10");
    expect_invalid("data:\n  tokenizer: bpe\n", "data.tokenizer=bpe", "data.tokenizer_path");
    /* the same mixer list passes once n_layers matches, and mom_heads is only checked for mom */
    moe_config cfg;
    CU_ASSERT_EQUAL(moe_config_load_text(&cfg, "model:\n  n_layers: 2\n  mixer: [gdn, attention]\n"
                                               "  mom_heads: 3\n", "inline"), MOE_OK);
    CU_ASSERT_EQUAL(moe_config_validate(&cfg), MOE_OK);
    CU_ASSERT_EQUAL(moe_config_layer_mixer(&cfg, 0), MOE_CFG_MIXER_GDN);
    CU_ASSERT_EQUAL(moe_config_layer_mixer(&cfg, 1), MOE_CFG_MIXER_ATTENTION);
}

/* ---------- --set ---------- */

static void test_set_values(void) {
    moe_config cfg;
    moe_config_defaults(&cfg);
    CU_ASSERT_EQUAL(moe_config_set(&cfg, "model.d_model=256"), MOE_OK);
    CU_ASSERT_EQUAL(cfg.model.d_model, 256);
    CU_ASSERT_EQUAL(moe_config_set(&cfg, "train.lr=1.5e-4"), MOE_OK);
    CU_ASSERT_DOUBLE_EQUAL(cfg.train.lr, 1.5e-4, 0.0);
    CU_ASSERT_EQUAL(moe_config_set(&cfg, "train.min_lr=0"), MOE_OK);
    CU_ASSERT_DOUBLE_EQUAL(cfg.train.min_lr, 0.0, 0.0);
    CU_ASSERT_EQUAL(moe_config_set(&cfg, "model.tie_embeddings=false"), MOE_OK);
    CU_ASSERT_FALSE(cfg.model.tie_embeddings);
    CU_ASSERT_EQUAL(moe_config_set(&cfg, "router.noisy_gating=true"), MOE_OK);
    CU_ASSERT_TRUE(cfg.router.noisy_gating);
    CU_ASSERT_EQUAL(moe_config_set(&cfg, "train.device=cuda"), MOE_OK);
    CU_ASSERT_EQUAL(cfg.train.device, MOE_CFG_DEVICE_CUDA);
    CU_ASSERT_EQUAL(moe_config_set(&cfg, "router.balance=aux_free"), MOE_OK);
    CU_ASSERT_EQUAL(cfg.router.balance, MOE_CFG_BALANCE_AUX_FREE);
    CU_ASSERT_EQUAL(moe_config_set(&cfg, "checkpoint.dir=runs/my run: #2"), MOE_OK);
    CU_ASSERT_STRING_EQUAL(cfg.checkpoint.dir, "runs/my run: #2"); /* strings verbatim */
    CU_ASSERT_EQUAL(moe_config_set(&cfg, "data.tokenizer_path="), MOE_OK);
    CU_ASSERT_STRING_EQUAL(cfg.data.tokenizer_path, "");

    CU_ASSERT_EQUAL(moe_config_set(&cfg, "model.mixer=[attention,mom,attention,mom]"), MOE_OK);
    CU_ASSERT_EQUAL(cfg.model.mixer.count, 4);
    CU_ASSERT_EQUAL(moe_config_layer_mixer(&cfg, 0), MOE_CFG_MIXER_ATTENTION);
    CU_ASSERT_EQUAL(moe_config_layer_mixer(&cfg, 1), MOE_CFG_MIXER_MOM);
    CU_ASSERT_EQUAL(moe_config_layer_mixer(&cfg, 3), MOE_CFG_MIXER_MOM);

    CU_ASSERT_EQUAL(moe_config_set(&cfg, "model.expert_ffn_dims=[256,128]"), MOE_OK);
    CU_ASSERT_EQUAL(cfg.model.expert_ffn_dims.count, 2);
    CU_ASSERT_EQUAL(moe_config_validate(&cfg), MOE_ERR_CONFIG); /* 2 widths, 8 experts */
    CU_ASSERT_EQUAL(moe_config_set(&cfg, "model.n_experts=2"), MOE_OK);
    CU_ASSERT_EQUAL(moe_config_validate(&cfg), MOE_OK);
    CU_ASSERT_EQUAL(moe_config_expert_ffn_dim(&cfg, 0), 256);
    CU_ASSERT_EQUAL(moe_config_expert_ffn_dim(&cfg, 1), 128);
    check_round_trip(&cfg);

    CU_ASSERT_EQUAL(moe_config_set(&cfg, "model.expert_ffn_dims=[]"), MOE_OK);
    CU_ASSERT_EQUAL(cfg.model.expert_ffn_dims.count, 0);
    CU_ASSERT_EQUAL(moe_config_expert_ffn_dim(&cfg, 1), cfg.model.ffn_dim);
    CU_ASSERT_EQUAL(moe_config_set(&cfg, "model.mixer=gdn"), MOE_OK);
    CU_ASSERT_EQUAL(cfg.model.mixer.count, 1);
    CU_ASSERT_EQUAL(moe_config_layer_mixer(&cfg, 2), MOE_CFG_MIXER_GDN);
}

static void test_set_errors(void) {
    expect_set_error("model.d_modle=3", "unknown key 'model.d_modle' (did you mean 'model.d_model'?)");
    expect_set_error("model.d_model=abc", "model.d_model: expected an integer, got 'abc'");
    expect_set_error("model.d_model=0", "model.d_model: 0 is out of range [1, 65536]");
    expect_set_error("model.d_model", "expected section.key=value");
    expect_set_error("=3", "expected section.key=value");
    expect_set_error("model=3", "'model' is a section");
    expect_set_error("train.device=tpu", "'tpu' is not allowed; expected one of: cpu, cuda");
    expect_set_error("model.mixer=[attention,", "not a valid YAML value");
    expect_set_error("model.mixer=[attention,rnn]", "model.mixer[1]: 'rnn' is not allowed");
    expect_set_error("model.tie_embeddings=1", "expected true or false");
    expect_set_error("model.d_model=", "expected an integer, got nothing");
}

/* ---------- output ---------- */

static void test_round_trip(void) {
    moe_config cfg;
    moe_config_defaults(&cfg);
    check_round_trip(&cfg);
    /* awkward values: inexact floats, tiny/huge magnitudes, escapes, UTF-8, lists */
    const char *sets[] = {
        "train.lr=0.1",        "train.min_lr=0.03333333333333333",
        "train.eps=1e-300",    "model.rope_theta=500000",
        "router.ot_gamma=123456.789", "model.norm_eps=1e-12",
        "data.train_path=a \"quoted\" \\ path\twith tab",
        "data.val_path=données/val.bin", "model.n_layers=3",
        "model.mixer=[mom, gdn, attention]", "model.n_experts=3",
        "model.expert_ffn_dims=[1, 262144, 77]", "train.seed=2147483647",
        "router.type=ot",      "model.mom_update=gla",
        "checkpoint.keep=0",
    };
    for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++) {
        moe_status st = moe_config_set(&cfg, sets[i]);
        if (st != MOE_OK) fprintf(stderr, "\n%s\n", moe_last_error());
        CU_ASSERT_EQUAL(st, MOE_OK);
    }
    CU_ASSERT_STRING_EQUAL(cfg.data.train_path, "a \"quoted\" \\ path\twith tab");
    check_round_trip(&cfg);

    /* through a file written with moe_config_write */
    const char *dir = moe_test_tmpdir("config-write");
    char path[600];
    snprintf(path, sizeof path, "%s/effective.yaml", dir);
    FILE *f = fopen(path, "w");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    CU_ASSERT_EQUAL(moe_config_write(&cfg, f), MOE_OK);
    fclose(f);
    moe_config back;
    CU_ASSERT_EQUAL(moe_config_load_file(&back, path), MOE_OK);
    CU_ASSERT_EQUAL(memcmp(&cfg, &back, sizeof back), 0);
}

static void test_emit_layout(void) {
    moe_config cfg;
    moe_config_defaults(&cfg);
    CU_ASSERT_EQUAL(moe_config_set(&cfg, "model.mixer=[attention,mom,attention,mom]"), MOE_OK);
    char *text = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_config_to_yaml(&cfg, &text), MOE_OK);
    CU_ASSERT_TRUE(contains(text, "model:\n  vocab_size: 256\n  d_model: 128\n"));
    CU_ASSERT_TRUE(contains(text, "  mixer: [attention, mom, attention, mom]\n"));
    CU_ASSERT_TRUE(contains(text, "  rope_theta: 10000.0\n"));
    CU_ASSERT_TRUE(contains(text, "  expert_ffn_dims: []\n"));
    CU_ASSERT_TRUE(contains(text, "data:\n  train_path: \"data/brown/train.bin\"\n"));
    CU_ASSERT_TRUE(contains(text, "parallel:\n  expert_parallel: 1\n"));
    /* every key once, sections in schema order */
    const moe_yaml_schema *schema = moe_config_schema();
    const char *last = text;
    for (size_t i = 0; i < schema->n_keys; i++) {
        char line[300];
        snprintf(line, sizeof line, "\n  %s: ", strchr(schema->keys[i].path, '.') + 1);
        const char *at = strstr(last, line);
        CU_ASSERT_PTR_NOT_NULL(at);
        if (at) last = at;
    }
    free(text);
}

static void test_help(void) {
    char *text = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&text, &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(mem);
    moe_config_print_help(mem);
    fclose(mem);
    const moe_yaml_schema *schema = moe_config_schema();
    for (size_t i = 0; i < schema->n_keys; i++) {
        CU_ASSERT_TRUE(contains(text, schema->keys[i].path));
        CU_ASSERT_TRUE(contains(text, schema->keys[i].help));
    }
    CU_ASSERT_TRUE(contains(text, "model.d_model"));
    CU_ASSERT_TRUE(contains(text, "int 1..65536"));
    CU_ASSERT_TRUE(contains(text, "default 128"));
    CU_ASSERT_TRUE(contains(text, "switch|latency|aux_free|none"));
    free(text);
}

static void register_suites(void) {
    moe_test_add_suite("config", (moe_test_entry[]){
        {"defaults", test_defaults},
        {"tiny_cpu_yaml", test_tiny_cpu},
        {"small_gpu_yaml", test_small_gpu},
        {"empty_file_is_defaults", test_empty_file_is_defaults},
        {"error_unknown_key", test_error_unknown_key},
        {"error_misspelt_key", test_error_misspelt_key},
        {"error_wrong_type", test_error_wrong_type},
        {"error_out_of_range", test_error_out_of_range},
        {"error_bad_enum", test_error_bad_enum},
        {"error_bad_list_length", test_error_bad_list_length},
        {"error_syntax", test_error_syntax},
        {"error_duplicate_key", test_error_duplicate_key},
        {"error_missing_file", test_error_missing_file},
        {"checkpoint_origin", test_checkpoint_origin},
        {"failed_load_is_atomic", test_failed_load_is_atomic},
        {"validate", test_validate},
        {"set_values", test_set_values},
        {"set_errors", test_set_errors},
        {"round_trip", test_round_trip},
        {"emit_layout", test_emit_layout},
        {"help", test_help},
        {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
