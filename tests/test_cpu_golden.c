/* Golden value: the whole model's forward loss at a tiny size equals the one computed by
 * the PyTorch reference (scripts/bench_reference.py's HF-Mixtral-style LM) loaded with
 * the same weights. The constant was produced with
 *   MOE_GOLDEN_DUMP=DIR build/tests/test_cpu_golden   (writes DIR/golden.h5 + tokens.txt)
 *   /usr/bin/python3 scripts/golden_reference.py DIR   (Debian's python3-torch, python3-h5py)
 * It pins the architecture: RoPE convention, RMSNorm, SwiGLU experts, renormalised top-k
 * gates, the Switch aux loss, the tied LM head and the cross-entropy. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "moe/train/checkpoint.h"
#include "moe/model/model.h"
#include "tests/harness/testlib.h"

/* PyTorch 1.13 (Debian), model in float64: loss = cross-entropy + Switch aux (mean over
 * layers). The reference computes its RMSNorm, router softmax and cross-entropy in
 * float32 (as HF does), so the two agree to float32 rounding (7e-8 relative here); a
 * convention difference (RoPE pairing, norm epsilon, gate renormalisation, aux formula)
 * moves the loss by 1e-5 or more. */
#define GOLDEN_LOSS 5.666043281555176

enum { B = 2, T = 8, V = 64 };

static void tiny(moe_config *c) {
    moe_config_defaults(c);
    c->model.vocab_size = V;
    c->model.d_model = 32;
    c->model.n_layers = 2;
    c->model.n_heads = 2;
    c->model.seq_len = T;
    c->model.ffn_dim = 16;
    c->model.n_experts = 4;
    c->model.top_k = 2;
    c->model.init_std = 0.2; /* large enough that routing and attention are far from uniform */
    c->router.z_coef = 0;    /* the reference has no z-loss */
    c->train.seed = 7;
    MOE_ASSERT(moe_config_validate(c) == MOE_OK, "%s", moe_last_error());
}

static void test_golden_loss(void) {
    moe_config c;
    tiny(&c);
    moe_model m;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 0, 1), MOE_OK);
    m.compute = MOE_F64;
    int32_t in[B * T], tg[B * T];
    for (int i = 0; i < B * T; i++) {
        in[i] = (i * 7 + 3) % V;
        tg[i] = (i * 11 + 5) % V;
    }
    moe_step_reset();
    bool was = moe_grad_set_enabled(false);
    moe_loss_parts parts;
    CU_ASSERT_EQUAL_FATAL(moe_model_loss(&m, in, tg, B, T, &parts), MOE_OK);
    double loss = moe_tensor_item(parts.loss);
    moe_grad_set_enabled(was);
    const char *dump = getenv("MOE_GOLDEN_DUMP");
    if (dump) {
        char path[512];
        snprintf(path, sizeof path, "%s/golden.h5", dump);
        moe_train_state ts = {0};
        CU_ASSERT_EQUAL(moe_checkpoint_save(path, &m, NULL, &ts), MOE_OK);
        snprintf(path, sizeof path, "%s/tokens.txt", dump);
        FILE *f = fopen(path, "w");
        fprintf(f, "%d %d\n", B, T);
        for (int i = 0; i < B * T; i++) fprintf(f, "%d %d\n", in[i], tg[i]);
        fclose(f);
        fprintf(stderr, "  ours: %.15f (dumped to %s)\n", loss, dump);
    }
    fprintf(stderr, "  loss %.15f, golden %.15f\n", loss, GOLDEN_LOSS);
    CU_ASSERT(fabs(loss - GOLDEN_LOSS) < 1e-6 * GOLDEN_LOSS);
    moe_model_free(&m);
    moe_step_reset();
}

static void register_suites(void) {
    moe_test_add_suite("golden", (moe_test_entry[]){{"forward loss equals PyTorch", test_golden_loss}, {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
