/* Training end to end on a tiny generated corpus: exact resume (N steps + save + resume
 * + N steps == 2N steps), loss decreases, damaged checkpoints are refused, a bad config
 * is refused, the whole model's gradients pass a finite-difference check, router
 * biases come back from a checkpoint, and recomputation changes memory, not the run. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/autograd.h"
#include "core/h5file.h"
#include "core/memory.h"
#include "core/ops.h"
#include "moe/train/checkpoint.h"
#include "moe/train/data.h"
#include "moe/model/model.h"
#include "moe/model/tokenizer.h"
#include "moe/train/train.h"
#include "tests/harness/files.h"
#include "tests/harness/testlib.h"

static char data_dir[200];

static void make_corpus(void) {
    const char *dir = moe_test_tmpdir("train-data");
    snprintf(data_dir, sizeof data_dir, "%s", dir);
    char path[600];
    snprintf(path, sizeof path, "%s/text.txt", data_dir);
    FILE *f = fopen(path, "w");
    for (int i = 0; i < 400; i++)
        fprintf(f, "the quick brown fox %d jumps over the lazy dog. a stitch in time saves nine.\n\n", i % 17);
    fclose(f);
    moe_tokenizer *tok = moe_tokenizer_byte();
    const char *inputs[1] = {path};
    moe_data_summary sum;
    CU_ASSERT_EQUAL_FATAL(moe_data_prepare(inputs, 1, tok, 0.1, data_dir, &sum), MOE_OK);
    moe_tokenizer_free(tok);
}

static void tiny_config(moe_config *c, const char *run_dir) {
    moe_config_defaults(c);
    c->model.d_model = 32;
    c->model.n_layers = 2;
    c->model.n_heads = 2;
    c->model.seq_len = 16;
    c->model.ffn_dim = 24;
    c->model.n_experts = 4;
    c->model.top_k = 2;
    c->data.batch_size = 4;
    c->train.steps = 8;
    c->train.warmup = 2;
    c->train.eval_every = 4;
    c->train.eval_batches = 2;
    c->train.log_every = 1;
    c->checkpoint.every = 0;
    c->checkpoint.keep = 0;
    snprintf(c->data.train_path, sizeof c->data.train_path, "%s/train.bin", data_dir);
    snprintf(c->data.val_path, sizeof c->data.val_path, "%s/val.bin", data_dir);
    snprintf(c->checkpoint.dir, sizeof c->checkpoint.dir, "%s", run_dir);
    CU_ASSERT_EQUAL_FATAL(moe_config_validate(c), MOE_OK);
}

/* Reads the "loss" of each step line of metrics.jsonl. */
static int read_losses(const char *dir, double *loss, int cap) {
    char path[700];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    return moe_test_jsonl_values(path, "loss", loss, cap);
}

static void params_of(const char *ckpt, moe_config *c, double **out, int64_t *n) {
    moe_model m;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, c, 0, 1), MOE_OK);
    moe_train_state ts;
    CU_ASSERT_EQUAL_FATAL(moe_checkpoint_load(ckpt, &m, NULL, &ts), MOE_OK);
    *n = 0;
    for (int i = 0; i < m.n_params; i++) *n += moe_tensor_numel(m.params[i].t);
    *out = malloc(sizeof(double) * (size_t)*n);
    int64_t at = 0;
    for (int i = 0; i < m.n_params; i++) {
        moe_tensor_to_host_f64(m.params[i].t, *out + at);
        at += moe_tensor_numel(m.params[i].t);
    }
    moe_model_free(&m);
    /* the model-level reader (no optimizer) gives the same weights */
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, c, 0, 1), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_checkpoint_load_weights(ckpt, &m), MOE_OK);
    double *w = malloc(sizeof(double) * (size_t)*n);
    at = 0;
    for (int i = 0; i < m.n_params; i++) {
        moe_tensor_to_host_f64(m.params[i].t, w + at);
        at += moe_tensor_numel(m.params[i].t);
    }
    CU_ASSERT_EQUAL(at, *n);
    CU_ASSERT_EQUAL(memcmp(w, *out, sizeof(double) * (size_t)*n), 0);
    free(w);
    moe_model_free(&m);
}

static void test_exact_resume(void) {
    make_corpus();
    char run_a[600], run_b[600];
    snprintf(run_a, sizeof run_a, "%s/run-a", data_dir);
    snprintf(run_b, sizeof run_b, "%s/run-b", data_dir);
    moe_config ca, cb;
    tiny_config(&ca, run_a);
    tiny_config(&cb, run_b);
    moe_train_summary sa, sb;
    moe_train_options plain = {.quiet = true}, stop = {.quiet = true, .stop_after = 4}, resume = {.quiet = true, .resume_dir = run_b};
    CU_ASSERT_EQUAL_FATAL(moe_train_run(&ca, &plain, &sa), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_train_run(&cb, &stop, &sb), MOE_OK);
    CU_ASSERT_EQUAL(sb.steps_done, 4);
    CU_ASSERT_EQUAL_FATAL(moe_train_run(&cb, &resume, &sb), MOE_OK);
    CU_ASSERT_EQUAL(sb.steps_done, 8);
    double la[32], lb[32];
    int na = read_losses(run_a, la, 32), nb = read_losses(run_b, lb, 32);
    CU_ASSERT_EQUAL(na, 8);
    CU_ASSERT_EQUAL(nb, 8);
    for (int i = 0; i < na && i < nb; i++) CU_ASSERT_EQUAL(la[i], lb[i]);
    CU_ASSERT(la[7] < la[0]); /* it learns */
    double *pa, *pb;
    int64_t n1, n2;
    params_of(sa.last_checkpoint, &ca, &pa, &n1);
    params_of(sb.last_checkpoint, &cb, &pb, &n2);
    CU_ASSERT_EQUAL_FATAL(n1, n2);
    CU_ASSERT(memcmp(pa, pb, sizeof(double) * (size_t)n1) == 0);
    free(pa);
    free(pb);
}

static void test_damaged_checkpoint(void) {
    char run[600], bad[700];
    snprintf(run, sizeof run, "%s/run-a", data_dir);
    moe_config c;
    tiny_config(&c, run);
    char ck[700];
    snprintf(ck, sizeof ck, "%s/ckpt-000008.h5", run);
    /* truncated copy */
    snprintf(bad, sizeof bad, "%s/ckpt-000009.h5", run);
    FILE *in = fopen(ck, "rb"), *out = fopen(bad, "wb");
    CU_ASSERT_PTR_NOT_NULL_FATAL(in);
    char buf[4096];
    size_t got, total = 0;
    while ((got = fread(buf, 1, sizeof buf, in)) > 0 && total < 20000) {
        fwrite(buf, 1, got, out);
        total += got;
    }
    fclose(in);
    fclose(out);
    moe_model m;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 0, 1), MOE_OK);
    moe_train_state ts;
    CU_ASSERT_EQUAL(moe_checkpoint_load(bad, &m, NULL, &ts), MOE_ERR_FORMAT);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "ckpt-000009.h5"));
    /* resume skips the damaged newest file and takes the good one */
    char latest[700];
    CU_ASSERT_EQUAL(moe_h5_find_latest(run, "ckpt-", ".h5", latest, sizeof latest), MOE_OK);
    CU_ASSERT_PTR_NOT_NULL(strstr(latest, "ckpt-000008.h5"));
    remove(bad);
    moe_model_free(&m);
    /* a checkpoint of another shape is refused by name */
    moe_config c2 = c;
    c2.model.d_model = 48;
    c2.model.n_heads = 2;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c2, 0, 1), MOE_OK);
    CU_ASSERT_EQUAL(moe_checkpoint_load(ck, &m, NULL, &ts), MOE_ERR_FORMAT);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "embed"));
    moe_model_free(&m);
}

static void test_missing_data(void) {
    moe_config c;
    tiny_config(&c, "tests/tmp/never");
    snprintf(c.data.train_path, sizeof c.data.train_path, "/nonexistent/train.bin");
    moe_train_summary s;
    moe_train_options o = {.quiet = true};
    CU_ASSERT_EQUAL(moe_train_run(&c, &o, &s), MOE_ERR_IO);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "/nonexistent/train.bin"));
}

/* Finite differences on the whole model (f64 compute) for a sample of every parameter. */
static void test_model_gradcheck(void) {
    moe_config c;
    tiny_config(&c, "tests/tmp/never");
    c.model.d_model = 16;
    c.model.ffn_dim = 8;
    c.model.seq_len = 6;
    c.model.n_shared_experts = 1;
    c.model.shared_ffn_dim = 4;
    c.model.dense_layers = 1;
    c.model.dense_ffn_dim = 8;
    c.model.vocab_size = 32;
    moe_model m;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 0, 1), MOE_OK);
    m.compute = MOE_F64;
    int B = 2, T = 6;
    int32_t in[12], tg[12];
    for (int i = 0; i < 12; i++) {
        in[i] = (i * 7 + 3) % 32;
        tg[i] = (i * 5 + 1) % 32;
    }
    moe_step_reset();
    moe_loss_parts parts;
    CU_ASSERT_EQUAL_FATAL(moe_model_loss(&m, in, tg, B, T, &parts), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_backward(parts.loss), MOE_OK);
    int checked = 0, bad = 0;
    bool was = moe_grad_set_enabled(false);
    for (int i = 0; i < m.n_params; i++) {
        moe_tensor *p = m.params[i].t;
        int64_t n = moe_tensor_numel(p);
        double *g = malloc(sizeof(double) * (size_t)n);
        moe_tensor_to_host_f64(p->grad, g);
        float *x = p->data;
        for (int s = 0; s < 4; s++) {
            int64_t j = (s * 7919 + i * 31) % n;
            float x0 = x[j];
            double h = 1e-3, d[2];
            for (int r = 0; r < 2; r++) {
                double hr = r ? h / 2 : h;
                x[j] = (float)(x0 + hr);
                double hp = (double)x[j] - x0;
                moe_step_reset();
                moe_model_loss(&m, in, tg, B, T, &parts);
                double lp = moe_tensor_item(parts.loss);
                x[j] = (float)(x0 - hr);
                double hm = x0 - (double)x[j];
                moe_step_reset();
                moe_model_loss(&m, in, tg, B, T, &parts);
                double lm = moe_tensor_item(parts.loss);
                d[r] = (lp - lm) / (hp + hm);
            }
            x[j] = x0;
            if (fabs(d[0] - d[1]) > 1e-3 * fmax(1e-3, fabs(d[1]))) continue; /* a routing change: kink */
            checked++;
            if (fabs(g[j] - d[1]) > 2e-3 * fmax(fabs(d[1]), 1e-2)) {
                fprintf(stderr, "  %s[%lld]: analytic %.8g numeric %.8g\n", m.params[i].name, (long long)j, g[j], d[1]);
                bad++;
            }
        }
        free(g);
    }
    moe_grad_set_enabled(was);
    CU_ASSERT(checked > 3 * m.n_params);
    CU_ASSERT_EQUAL(bad, 0);
    moe_model_free(&m);
    moe_step_reset();
}

/* Fills each MoE layer's router bias [E] with values of its own and returns how many
 * layers hold one. */
static int set_router_biases(moe_model *m) {
    int n = 0;
    for (int i = 0; i < m->cfg.model.n_layers; i++) {
        moe_tensor *b = m->blocks[i].moe.router.bias;
        if (!b) continue;
        double v[64];
        CU_ASSERT_FATAL(moe_tensor_numel(b) <= 64);
        for (int64_t j = 0; j < moe_tensor_numel(b); j++) v[j] = 0.5 * (i + 1) - 0.125 * (double)j;
        moe_tensor *h = moe_tensor_from_host(MOE_LIFE_PERSIST, MOE_CPU, MOE_F64, b->ndim, b->shape, v);
        CU_ASSERT_EQUAL_FATAL(moe_tensor_copy_(b, h), MOE_OK);
        moe_tensor_free(h);
        n++;
    }
    return n;
}

/* The aux-loss-free router biases go into a checkpoint and come back through the training
 * reader and the model-level reader. */
static void test_router_bias_round_trip(void) {
    const char *dir = moe_test_tmpdir("train-bias");
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char path[600];
    snprintf(path, sizeof path, "%s/ckpt-000001.h5", dir);
    moe_config c;
    tiny_config(&c, dir);
    c.router.balance = MOE_CFG_BALANCE_AUX_FREE;
    CU_ASSERT_EQUAL_FATAL(moe_config_validate(&c), MOE_OK);
    moe_model m, back;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 0, 1), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(set_router_biases(&m), c.model.n_layers);
    moe_train_state ts = {.step = 1};
    CU_ASSERT_EQUAL_FATAL(moe_checkpoint_save(path, &m, NULL, &ts), MOE_OK);
    for (int reader = 0; reader < 2; reader++) {
        CU_ASSERT_EQUAL_FATAL(moe_model_init(&back, &c, 0, 1), MOE_OK);
        moe_status s = reader ? moe_checkpoint_load_weights(path, &back) : moe_checkpoint_load(path, &back, NULL, &ts);
        CU_ASSERT_EQUAL_FATAL(s, MOE_OK);
        for (int i = 0; i < c.model.n_layers; i++) {
            const moe_tensor *want = m.blocks[i].moe.router.bias, *got = back.blocks[i].moe.router.bias;
            CU_ASSERT_PTR_NOT_NULL_FATAL(got);
            double w[64], g[64];
            moe_tensor_to_host_f64(want, w);
            moe_tensor_to_host_f64(got, g);
            CU_ASSERT_EQUAL(memcmp(w, g, sizeof(double) * (size_t)moe_tensor_numel(want)), 0);
            CU_ASSERT_EQUAL(g[1], 0.5 * (i + 1) - 0.125);
        }
        moe_model_free(&back);
    }
    moe_model_free(&m);
}

/* A 4-step run of the tiny model with the given --set assignments (NULL-terminated):
 * its losses, final weights (*w, *nw) and step-arena peak. */
static size_t recompute_run(const char *name, const char *const *sets, double *loss, double **w, int64_t *nw) {
    char run[600];
    snprintf(run, sizeof run, "%s/run-recompute-%s", data_dir, name);
    moe_config c;
    tiny_config(&c, run);
    c.model.seq_len = 64;
    c.model.ffn_dim = 64;
    c.train.steps = 4;
    for (int i = 0; sets[i]; i++) CHECK_OK(moe_config_set(&c, sets[i]));
    CHECK_OK(moe_config_validate(&c));
    moe_train_summary sum;
    CHECK_OK(moe_train_run(&c, &(moe_train_options){.quiet = true}, &sum));
    CU_ASSERT_EQUAL(read_losses(run, loss, 4), 4);
    params_of(sum.last_checkpoint, &c, w, nw);
    return sum.step_mem_peak;
}

static void check_same_run(const double *la, const double *wa, int64_t na, const double *lb, const double *wb,
                           int64_t nb) {
    CU_ASSERT_EQUAL(memcmp(la, lb, sizeof(double) * 4), 0);
    CU_ASSERT_EQUAL_FATAL(na, nb);
    CU_ASSERT_EQUAL(memcmp(wa, wb, sizeof(double) * (size_t)na), 0);
}

/* train.recompute: the same losses and weights, bit for bit, as keeping every activation,
 * in a lower step-arena peak (experts alone, then experts and attention no higher); MLA
 * attention (eight inputs to the recomputed piece) likewise. */
static void test_recompute(void) {
    const char *none[] = {"train.recompute=[]", NULL}, *experts[] = {"train.recompute=[experts]", NULL},
               *both[] = {"train.recompute=[experts, attention]", NULL};
    const char *mla[] = {"model.attention=mla", "model.q_lora_rank=8", "model.kv_lora_rank=8", "model.qk_nope_dim=8",
                         "model.qk_rope_dim=4", "model.v_head_dim=8", NULL, NULL};
    double loss[5][4], *w[5];
    int64_t nw[5];
    size_t peak[5];
    peak[0] = recompute_run("none", none, loss[0], &w[0], &nw[0]);
    peak[1] = recompute_run("experts", experts, loss[1], &w[1], &nw[1]);
    peak[2] = recompute_run("both", both, loss[2], &w[2], &nw[2]);
    peak[3] = recompute_run("mla", mla, loss[3], &w[3], &nw[3]);
    mla[6] = "train.recompute=[attention]";
    peak[4] = recompute_run("mla-attention", mla, loss[4], &w[4], &nw[4]);
    printf("\n    step arena peak: %zu bytes keeping everything, %zu recomputing experts, %zu experts and attention;"
           " mla %zu, recomputing attention %zu\n", peak[0], peak[1], peak[2], peak[3], peak[4]);
    /* with the freeing backward the step can peak where the recomputed pieces do not decide
     * it: attention on top of the experts lowers it or leaves it */
    CU_ASSERT(peak[1] < peak[0] && peak[2] <= peak[1] && peak[4] < peak[3]);
    for (int r = 1; r < 3; r++) check_same_run(loss[0], w[0], nw[0], loss[r], w[r], nw[r]);
    check_same_run(loss[3], w[3], nw[3], loss[4], w[4], nw[4]);
    for (int r = 0; r < 5; r++) free(w[r]);
}

/* The loss and every parameter's grad of one step (host f64, concatenated) and the
 * step-arena peak, with new step memory poisoned; free_forward: moe_backward_freeing. */
static size_t model_grads(moe_model *m, bool free_forward, double *loss, double **g, int64_t *ng) {
    enum { B = 4, T = 64 };
    int32_t in[B * T], tg[B * T];
    for (int i = 0; i < B * T; i++) {
        in[i] = (i * 7 + 3) % m->cfg.model.vocab_size;
        tg[i] = (i * 5 + 1) % m->cfg.model.vocab_size;
    }
    moe_tensor **ps = malloc(sizeof *ps * (size_t)m->n_params);
    *ng = 0;
    for (int i = 0; i < m->n_params; i++) *ng += moe_tensor_numel(ps[i] = m->params[i].t);
    CHECK_OK(moe_zero_grad(ps, m->n_params));
    m->dropout_counter = 0; /* the same dropout masks in every call */
    moe_step_reset();
    moe_mem_reset_peaks(MOE_CPU);
    moe_mem_set_poison(true);
    moe_loss_parts parts;
    CHECK_OK(moe_model_loss(m, in, tg, B, T, &parts));
    *loss = parts.ce + parts.aux + parts.z;
    CHECK_OK(free_forward ? moe_backward_freeing(parts.loss) : moe_backward(parts.loss));
    moe_mem_set_poison(false);
    size_t peak = moe_mem_get_stats(MOE_CPU).step_peak;
    *g = calloc((size_t)*ng, sizeof(double));
    int64_t at = 0;
    for (int i = 0; i < m->n_params; i++) {
        if (ps[i]->grad) CHECK_OK(moe_tensor_to_host_f64(ps[i]->grad, *g + at));
        at += moe_tensor_numel(ps[i]);
    }
    free(ps);
    moe_step_reset();
    return peak;
}

/* moe_backward_freeing hands each activation back once the sweep has passed it: the same
 * loss and grads, bit for bit, as keeping everything, in a lower step-arena peak, for
 * attention, MLA, MoM, the gated delta net, the RMoE and OT routers, recomputed experts and
 * attention, shared experts with a dense layer, dropout and untied embeddings, and experts
 * of different widths with capacity dropping. The freeing
 * step runs in an arena sized to its peak, with new memory poisoned, so that rewound
 * memory is reused within the sweep and a buffer still read after its reuse shows. */
static void test_freeing_backward(void) {
    const char *variants[][6] = {
        {NULL},
        {"model.attention=mla", "model.q_lora_rank=8", "model.kv_lora_rank=8", "model.qk_nope_dim=8",
         "model.qk_rope_dim=4", "model.v_head_dim=8"},
        {"model.mixer=mom", "model.mom_memories=4", "model.mom_top_k=2", "model.mom_heads=2", NULL},
        {"router.type=rmoe", "router.rmoe_dim=8", NULL},
        {"train.recompute=[experts, attention]", NULL},
        {"model.mixer=gdn", NULL},
        {"model.n_shared_experts=1", "model.shared_ffn_dim=16", "model.dense_layers=1", "model.dense_ffn_dim=24",
         "model.dropout=0.1", "model.tie_embeddings=false"},
        {"model.n_experts=6", "model.expert_ffn_dims=[24,12,24,8,12,8]", "router.capacity_factor=1.0", NULL},
        {"router.type=ot", NULL},
    };
    for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
        moe_config c;
        tiny_config(&c, "tests/tmp/never");
        c.model.seq_len = 64;
        c.model.n_layers = 3;
        for (int i = 0; i < 6 && variants[v][i]; i++) CHECK_OK(moe_config_set(&c, variants[v][i]));
        CHECK_OK(moe_config_validate(&c));
        moe_model m;
        CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 0, 1), MOE_OK);
        double loss[2], *g[2];
        int64_t ng[2];
        size_t peak[2];
        peak[0] = model_grads(&m, false, &loss[0], &g[0], &ng[0]);
        moe_mem_set_snug(true); /* the first freeing step sizes the arena to its peak */
        model_grads(&m, true, &loss[1], &g[1], &ng[1]);
        free(g[1]);
        peak[1] = model_grads(&m, true, &loss[1], &g[1], &ng[1]); /* in that snug arena */
        moe_mem_set_snug(false);
        printf("\n    %s: step arena peak %zu bytes keeping, %zu freeing", variants[v][0] ? variants[v][0] : "attention",
               peak[0], peak[1]);
        if (loss[0] != loss[1] || memcmp(g[0], g[1], sizeof(double) * (size_t)ng[0]) != 0)
            CU_FAIL("the freeing backward changed the loss or a grad (variant printed above)");
        CU_ASSERT(peak[1] < peak[0]);
        free(g[0]);
        free(g[1]);
        moe_model_free(&m);
    }
    printf("\n");
}

static void register_suites(void) {
    moe_test_add_suite("train", (moe_test_entry[]){{"exact resume", test_exact_resume},
                                                    {"damaged and mismatched checkpoints", test_damaged_checkpoint},
                                                    {"missing data file", test_missing_data},
                                                    {"whole-model gradcheck", test_model_gradcheck},
                                                    {"router biases round trip", test_router_bias_round_trip},
                                                    {"recompute: same run, less memory", test_recompute},
                                                    {"freeing backward: same grads, less memory", test_freeing_backward},
                                                    {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
