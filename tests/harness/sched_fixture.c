/* The small model and the random predictor of the token-scheduling tests (sched_fixture.h). */
#include "tests/harness/sched_fixture.h"

#include <stdio.h>

#include "tests/harness/testlib.h"

static void fixture_model(moe_model *m, int V) {
    moe_config c;
    moe_config_defaults(&c);
    c.model.vocab_size = V, c.model.d_model = 16, c.model.n_layers = 4, c.model.n_heads = 2, c.model.seq_len = 64;
    c.model.ffn_dim = 8, c.model.n_experts = 8, c.model.top_k = 2, c.model.dense_layers = 1, c.model.init_std = 0.3;
    CHECK_OK(moe_config_validate(&c));
    CHECK_OK(moe_model_init(m, &c, 0, 1));
    m->compute = MOE_F32;
}

static moe_predictor *fixture_predictor(const moe_model *m, uint64_t seed) {
    moe_route_fingerprint fp;
    CHECK_OK(moe_route_fingerprint_of(m, &fp));
    moe_route_net_shape sh = {.vocab = m->cfg.model.vocab_size, .context = 3, .embed = 8, .hidden = 16,
                              .n_moe_layers = fp.n_moe_layers, .n_experts = m->cfg.model.n_experts,
                              .top_k = m->cfg.model.top_k};
    moe_route_net net;
    CHECK_OK(moe_route_net_init(&net, &sh, seed));
    char path[600];
    snprintf(path, sizeof path, "%s/predictor-%llu.h5", moe_test_scratch_dir("sched"), (unsigned long long)seed);
    moe_status s = moe_route_net_save(&net, path, "the scheduling fixture", &fp);
    moe_route_net_free(&net);
    CHECK_OK(s);
    moe_predictor *p = NULL;
    CHECK_OK(moe_predictor_load(path, m, &p));
    return p;
}

void sched_fixture_open(sched_fixture *f, int V, uint64_t seed) {
    *f = (sched_fixture){0};
    fixture_model(&f->m, V);
    f->pred = fixture_predictor(&f->m, seed);
    CHECK_OK(moe_decoder_open(&f->m, MOE_F32, &f->dec));
}

void sched_fixture_close(sched_fixture *f) {
    moe_decoder_close(f->dec);
    moe_predictor_free(f->pred);
    moe_model_free(&f->m);
}
