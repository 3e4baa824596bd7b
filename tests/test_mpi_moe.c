/* Expert parallelism equals one process at the layer level (run under mpirun -np 4): an
 * MoE layer with its experts sharded over the EP group gives the same outputs and input
 * grads as the whole layer on each rank's tokens, and its expert grads equal the sum of
 * the whole layer's grads over the EP group; also when every token picks one expert, and
 * when the sharded layer recomputes its experts in the backward. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/dist.h"
#include "core/memory.h"
#include "core/ops.h"
#include "moe/model/moe_layer.h"
#include "tests/harness/testlib.h"

enum { T = 16, D = 8, F = 12, E = 8 };

static double max_rel(const double *a, const double *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        num = fmax(num, fabs(a[i] - b[i]));
        den = fmax(den, fabs(b[i]));
    }
    return num / fmax(den, 1e-30);
}

/* recompute: the sharded layer recomputes its experts in the backward (train.recompute). */
static void check(int ep, int k, bool skew, bool recompute) {
    CU_ASSERT_EQUAL_FATAL(moe_dist_set_expert_parallel(ep), MOE_OK);
    int El = E / ep, begin = moe_dist_ep_rank() * El;
    moe_moe_layer_settings s = {.d_model = D, .n_experts = E, .top_k = k, .ffn_dim = F,
                                .router = {.n_experts = E, .top_k = k, .d_model = D, .balance = MOE_BALANCE_SWITCH,
                                           .aux_coef = 0.01, .renormalize = true}};
    moe_moe_layer full, part;
    CU_ASSERT_EQUAL_FATAL(moe_moe_layer_init(&full, &s, "l", MOE_CPU, 5, 0.3, 0, E), MOE_OK);
    s.recompute_experts = recompute;
    CU_ASSERT_EQUAL_FATAL(moe_moe_layer_init(&part, &s, "l", MOE_CPU, 5, 0.3, begin, El), MOE_OK);
    if (skew) { /* every token's first choice is expert 3 */
        float *w = full.router.w_gate->data, *w2 = part.router.w_gate->data;
        for (int i = 0; i < D; i++) w[i * E + 3] = w2[i * E + 3] = 50.0f;
    }
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, 2, (int64_t[]){T, D}, 100 + moe_dist_world_rank(), 0, 1.0);
    if (skew) {
        float *xv = x->data;
        for (int i = 0; i < T * D; i++) xv[i] = fabsf(xv[i]) + 0.1f;
    }
    x->requires_grad = x->is_param = true;
    moe_tensor *R = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, 2, (int64_t[]){T, D}, 7, 0, 1.0);
    double y[2][T * D], gx[2][T * D];
    moe_moe_layer *layers[2] = {&full, &part};
    for (int v = 0; v < 2; v++) {
        moe_step_reset();
        moe_tensor *ps[] = {x};
        moe_zero_grad(ps, 1);
        moe_moe_layer_result res;
        moe_tensor *out = moe_moe_layer_forward(layers[v], x, NULL, MOE_F32, &res);
        CU_ASSERT_PTR_NOT_NULL_FATAL(out);
        if (skew) CU_ASSERT(res.routing.load[3] == T);
        moe_tensor_to_host_f64(out, y[v]);
        CU_ASSERT_EQUAL_FATAL(moe_backward(moe_sum_all(moe_mul(out, R))), MOE_OK);
        moe_tensor_to_host_f64(x->grad, gx[v]);
    }
    CU_ASSERT(max_rel(y[1], y[0], T * D) < 1e-5);
    CU_ASSERT(max_rel(gx[1], gx[0], T * D) < 1e-5);
    /* expert grads: the whole layer's grads summed over the EP group, sliced to this rank */
    moe_tensor *gs[2] = {full.w13->grad, full.w2->grad}, *gp[2] = {part.w13->grad, part.w2->grad};
    for (int j = 0; j < 2; j++) {
        CU_ASSERT_PTR_NOT_NULL_FATAL(gs[j]);
        CU_ASSERT_EQUAL_FATAL(moe_dist_allreduce_sum(MOE_GROUP_EP, gs[j]), MOE_OK);
        int64_t per = gs[j]->shape[1] * gs[j]->shape[2], n = per * El;
        double *a = malloc(sizeof(double) * (size_t)(per * E)), *b = malloc(sizeof(double) * (size_t)n);
        moe_tensor_to_host_f64(gs[j], a);
        if (gp[j]) moe_tensor_to_host_f64(gp[j], b);
        else memset(b, 0, sizeof(double) * (size_t)n);
        double e = max_rel(b, a + begin * per, n);
        if (!(e < 1e-5)) fprintf(stderr, "rank %d ep %d k %d skew %d: expert grad %d differs by %.3g\n",
                                 moe_dist_world_rank(), ep, k, skew, j, e);
        CU_ASSERT(e < 1e-5);
        free(a);
        free(b);
    }
    moe_tensor_free(x);
    moe_tensor_free(R);
    moe_moe_layer_free(&full);
    moe_moe_layer_free(&part);
    moe_step_reset();
}

static void test_ep2_k2(void) { check(2, 2, false, false); }
static void test_ep4_k2(void) { check(4, 2, false, false); }
static void test_ep4_k1(void) { check(4, 1, false, false); }
static void test_ep4_one_expert(void) { check(4, 2, true, false); }
static void test_ep2_one_expert(void) { check(2, 1, true, false); }
static void test_ep4_recompute(void) { check(4, 2, false, true); }

static void register_suites(void) {
    moe_test_add_suite("expert_parallel", (moe_test_entry[]){{"EP=2, k=2 equals one process", test_ep2_k2},
                                                             {"EP=4, k=2 equals one process", test_ep4_k2},
                                                             {"EP=4, k=1 equals one process", test_ep4_k1},
                                                             {"EP=4, all tokens to one expert", test_ep4_one_expert},
                                                             {"EP=2, k=1, all tokens to one expert", test_ep2_one_expert},
                                                             {"EP=4, k=2, experts recomputed", test_ep4_recompute},
                                                             {NULL, NULL}});
}

int main(int argc, char **argv) {
    if (moe_dist_init(&argc, &argv, 1) != MOE_OK) {
        fprintf(stderr, "%s\n", moe_last_error());
        return 2;
    }
    int rc = moe_test_main(argc, argv, register_suites);
    int64_t any = rc != 0;
    moe_dist_allreduce_i64(MOE_GROUP_WORLD, &any, 1);
    moe_dist_finalize();
    return any ? 1 : 0;
}
