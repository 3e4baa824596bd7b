/* The MoE layer equals a dense reference (every expert on every token, weighted by the
 * sparse gates) in outputs and all gradients, for k = 1, 2, 4, with shared experts, with
 * capacity dropping, and with experts of different widths (several stacks, more of them
 * than one concat takes); the router's balance losses equal their formulas. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "core/ops.h"
#include "moe/model/moe_layer.h"
#include "tests/harness/testlib.h"

enum { T = 12, D = 8, F = 6, E_MAX = 10 };

/* Dense reference with the layer's routing: G [T, E] holds the kept gates. */
static moe_tensor *dense_reference(moe_moe_layer *L, moe_tensor *x, moe_routing *r, const bool *kept) {
    int k = L->s.top_k, E = L->s.n_experts;
    moe_tensor *mask = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){T, k});
    double *mk = mask->data;
    for (int i = 0; i < T * k; i++) mk[i] = kept[i] ? 1.0 : 0.0;
    moe_tensor *zeros = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){T, E});
    moe_tensor *G = moe_scatter_add(zeros, r->experts, moe_mul(moe_cast(r->gates, MOE_F64), mask));
    moe_tensor *out = NULL;
    for (int e = 0; e < E; e++) {
        moe_tensor *w13, *w2;
        moe_moe_layer_expert_weights(L, e, &w13, &w2);
        moe_tensor *y = moe_swiglu_ffn(x, moe_cast(w13, MOE_F64), moe_cast(w2, MOE_F64));
        moe_tensor *term = moe_mul(y, moe_slice(G, 1, e, e + 1));
        out = out ? moe_add(out, term) : term;
    }
    if (L->shared_w13) out = moe_add(out, moe_swiglu_ffn(x, moe_cast(L->shared_w13, MOE_F64), moe_cast(L->shared_w2, MOE_F64)));
    return out;
}

/* Which assignments survive the capacity limit (highest gates per expert, ties: earlier). */
static void kept_mask(const moe_moe_layer *L, const moe_routing *r, bool *kept) {
    int k = L->s.top_k, n = T * k, E = L->s.n_experts;
    int64_t cap = L->s.capacity_factor > 0 ? (int64_t)ceil(L->s.capacity_factor * n / E) : n;
    double g[T * E_MAX];
    moe_tensor_to_host_f64(r->gates, g);
    for (int i = 0; i < n; i++) {
        int e = r->host_experts[i], better = 0;
        for (int j = 0; j < n; j++)
            if (r->host_experts[j] == e && (g[j] > g[i] || (g[j] == g[i] && j < i))) better++;
        kept[i] = better < cap;
    }
}

static double rel_err(const moe_tensor *a, const moe_tensor *b) {
    int64_t n = moe_tensor_numel(a);
    double *x = malloc(sizeof(double) * n), *y = malloc(sizeof(double) * n), num = 0, den = 0;
    moe_tensor_to_host_f64(a, x);
    moe_tensor_to_host_f64(b, y);
    for (int64_t i = 0; i < n; i++) {
        num += (x[i] - y[i]) * (x[i] - y[i]);
        den += y[i] * y[i];
    }
    free(x);
    free(y);
    return sqrt(num) / fmax(sqrt(den), 1e-300);
}

/* widths: n_experts hidden widths, or NULL (n_experts = 4 of width F). */
static void check_layer_widths(int k, int n_shared, double capacity, int n_experts, const int *widths,
                               int64_t *dropped_out) {
    int E = n_experts;
    moe_moe_layer_settings s = {.d_model = D, .n_experts = E, .top_k = k, .ffn_dim = F, .expert_ffn_dims = widths,
                                .n_shared = n_shared, .shared_ffn_dim = 5, .capacity_factor = capacity,
                                .router = {.n_experts = E, .top_k = k, .d_model = D, .balance = MOE_BALANCE_SWITCH,
                                           .aux_coef = 0.01, .z_coef = 1e-3, .renormalize = true}};
    moe_moe_layer L;
    CU_ASSERT_EQUAL_FATAL(moe_moe_layer_init(&L, &s, "t", MOE_CPU, 7, 0.5, 0, E), MOE_OK);
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F64, 2, (int64_t[]){T, D}, 11, 0, 1.0);
    x->requires_grad = x->is_param = true;
    moe_tensor *R = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F64, 2, (int64_t[]){T, D}, 12, 0, 1.0);
    moe_tensor *params[4 + 2 * E_MAX] = {x, L.router.w_gate, L.shared_w13, L.shared_w2};
    int np = n_shared ? 4 : 2;
    for (int g = 0; g < L.n_groups; g++) {
        params[np++] = L.groups[g].w13;
        params[np++] = L.groups[g].w2;
    }
    moe_tensor *grads[2][4 + 2 * E_MAX];
    double out_err = 0;
    for (int pass = 0; pass < 2; pass++) {
        moe_step_reset();
        moe_zero_grad(params, np);
        moe_moe_layer_result res;
        moe_tensor *y = moe_moe_layer_forward(&L, x, NULL, MOE_F64, &res);
        CU_ASSERT_PTR_NOT_NULL_FATAL(y);
        bool kept[T * E_MAX];
        kept_mask(&L, &res.routing, kept);
        int64_t nd = 0;
        for (int i = 0; i < T * k; i++) nd += !kept[i];
        CU_ASSERT_EQUAL(nd, res.dropped);
        if (dropped_out) *dropped_out = res.dropped;
        moe_tensor *ref = dense_reference(&L, x, &res.routing, kept);
        CU_ASSERT_PTR_NOT_NULL_FATAL(ref);
        if (pass == 0) out_err = rel_err(y, ref);
        moe_tensor *use = pass == 0 ? y : ref;
        CU_ASSERT_EQUAL_FATAL(moe_backward(moe_sum_all(moe_mul(use, R))), MOE_OK);
        for (int i = 0; i < np; i++) {
            CU_ASSERT_PTR_NOT_NULL_FATAL(params[i]->grad);
            grads[pass][i] = moe_tensor_to(params[i]->grad, MOE_CPU, MOE_LIFE_PERSIST);
        }
    }
    CU_ASSERT(out_err < 1e-12);
    for (int i = 0; i < np; i++) {
        double e = rel_err(grads[0][i], grads[1][i]);
        if (!(e < 1e-6)) fprintf(stderr, "k=%d shared=%d cap=%g: grad of param %d differs by %.3g\n", k, n_shared, capacity, i, e);
        CU_ASSERT(e < 1e-6);
        moe_tensor_free(grads[0][i]);
        moe_tensor_free(grads[1][i]);
    }
    moe_tensor_free(x);
    moe_tensor_free(R);
    moe_moe_layer_free(&L);
    moe_step_reset();
}

static void check_layer(int k, int n_shared, double capacity, int64_t *dropped_out) {
    check_layer_widths(k, n_shared, capacity, 4, NULL, dropped_out);
}

static void test_dense_k1(void) { check_layer(1, 0, 0, NULL); }
static void test_dense_k2(void) { check_layer(2, 0, 0, NULL); }
static void test_dense_k4(void) { check_layer(4, 0, 0, NULL); }
static void test_dense_shared(void) { check_layer(2, 1, 0, NULL); }
static void test_dense_capacity(void) {
    int64_t dropped = 0;
    check_layer(2, 0, 0.5, &dropped);
    CU_ASSERT(dropped > 0); /* the case must really drop something */
}

/* Three widths (group-major order 0 2 | 1 | 3 differs from the index order). */
static void test_hetero_k2(void) {
    moe_moe_layer L;
    moe_moe_layer_settings s = {.d_model = D, .n_experts = 4, .top_k = 1, .ffn_dim = F,
                                .expert_ffn_dims = (const int[]){6, 3, 6, 9},
                                .router = {.n_experts = 4, .top_k = 1, .d_model = D}};
    CU_ASSERT_EQUAL_FATAL(moe_moe_layer_init(&L, &s, "h", MOE_CPU, 7, 0.5, 0, 4), MOE_OK);
    CU_ASSERT_EQUAL(L.n_groups, 3);
    CU_ASSERT_PTR_NULL(L.w13);
    CU_ASSERT_STRING_EQUAL(L.groups[0].name_w13, "h.experts.w13.g6");
    CU_ASSERT_STRING_EQUAL(L.groups[2].name_w2, "h.experts.w2.g9");
    CU_ASSERT_EQUAL(L.groups[0].n, 2);
    CU_ASSERT_EQUAL(L.groups[0].experts[1], 2);
    CU_ASSERT_EQUAL(L.groups[1].w13->shape[2], 6);
    CU_ASSERT_EQUAL(L.groups[2].w2->shape[1], 9);
    int slots[4] = {0, 2, 1, 3};
    for (int e = 0; e < 4; e++) CU_ASSERT_EQUAL(L.slot[e], slots[e]);
    moe_moe_layer_free(&L);
    check_layer_widths(2, 0, 0, 4, (const int[]){6, 3, 6, 9}, NULL);
}
static void test_hetero_capacity_shared(void) {
    int64_t dropped = 0;
    check_layer_widths(1, 1, 0.5, 4, (const int[]){6, 3, 6, 9}, &dropped);
    CU_ASSERT(dropped > 0);
}
/* Ten widths: more groups than one concat takes (MOE_NODE_MAX_INPUTS). */
static void test_hetero_many_groups(void) {
    _Static_assert(MOE_NODE_MAX_INPUTS < 10, "more groups than one concat takes");
    check_layer_widths(2, 0, 0, 10, (const int[]){2, 3, 4, 5, 6, 7, 8, 9, 10, 11}, NULL);
}

/* An expert's initial weights depend on its index only, not on the grouping. */
static void test_hetero_init_by_name(void) {
    moe_moe_layer A, B;
    moe_moe_layer_settings s = {.d_model = D, .n_experts = 4, .top_k = 1, .ffn_dim = F,
                                .router = {.n_experts = 4, .top_k = 1, .d_model = D}};
    CU_ASSERT_EQUAL_FATAL(moe_moe_layer_init(&A, &s, "t", MOE_CPU, 7, 0.5, 0, 4), MOE_OK);
    s.expert_ffn_dims = (const int[]){3, F, 9, F};
    CU_ASSERT_EQUAL_FATAL(moe_moe_layer_init(&B, &s, "t", MOE_CPU, 7, 0.5, 0, 4), MOE_OK);
    for (int e = 1; e < 4; e += 2) {
        moe_tensor *a13, *a2, *b13, *b2;
        moe_moe_layer_expert_weights(&A, e, &a13, &a2);
        moe_moe_layer_expert_weights(&B, e, &b13, &b2);
        CU_ASSERT_EQUAL(rel_err(a13, b13), 0.0);
        CU_ASSERT_EQUAL(rel_err(a2, b2), 0.0);
    }
    moe_moe_layer_free(&A);
    moe_moe_layer_free(&B);
    moe_step_reset();
}

/* A decode step's layer on the gathered path (routing left on the device) equals the
 * grouped path on the read-back routing: top-k 2 of 4, a gated shared expert, f64; the op
 * refuses gates in another dtype than x; and the path is refused where it cannot hold
 * (capacity drops over several tokens, several expert widths). */
static void test_gathered_equals_grouped(void) {
    moe_moe_layer_settings s = {.d_model = D, .n_experts = 4, .top_k = 2, .ffn_dim = F, .n_shared = 1,
                                .shared_ffn_dim = 5, .shared_gate = true,
                                .router = {.n_experts = 4, .top_k = 2, .d_model = D, .renormalize = true}};
    moe_moe_layer L;
    CU_ASSERT_EQUAL_FATAL(moe_moe_layer_init(&L, &s, "g", MOE_CPU, 7, 0.5, 0, 4), MOE_OK);
    CU_ASSERT_TRUE(moe_moe_layer_gathers(&L, 3));
    CU_ASSERT_FALSE(moe_moe_layer_gathers(&L, MOE_GATHER_MAX_ROWS / 2 + 1));
    bool was = moe_grad_set_enabled(false);
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){3, D}, 21, 0, 1.0);
    moe_tensor *state = NULL, *logits = moe_router_logits(&L.router, x, NULL, &state), *gates, *experts;
    moe_routing r;
    CU_ASSERT_EQUAL_FATAL(moe_router_select(&L.router, logits, &r), MOE_OK);
    moe_tensor *no_state;
    CU_ASSERT_EQUAL_FATAL(moe_router_select_device(&L.router, x, NULL, &no_state, &gates, &experts), MOE_OK);
    CU_ASSERT(rel_err(gates, r.gates) < 1e-15 && rel_err(experts, r.experts) == 0);
    moe_moe_layer_result res;
    moe_tensor *grouped = moe_moe_layer_apply(&L, x, &r, MOE_F64, &res),
               *gathered = moe_moe_layer_apply_gathered(&L, x, gates, experts, MOE_F64);
    CU_ASSERT_PTR_NOT_NULL_FATAL(grouped);
    CU_ASSERT_PTR_NOT_NULL_FATAL(gathered);
    CU_ASSERT(rel_err(gathered, grouped) < 1e-12);
    moe_tensor *w13, *w2; /* gates in another dtype than x: refused, by name */
    CU_ASSERT_EQUAL_FATAL(moe_moe_layer_expert_stacks(&L, 0, MOE_F64, &w13, &w2), MOE_OK);
    CU_ASSERT_PTR_NULL(moe_gathered_swiglu(x, experts, moe_cast(gates, MOE_F32), w13, w2));
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "gates must be [T, k]"));
    moe_error_clear();
    moe_grad_set_enabled(was);
    moe_moe_layer_free(&L);
    s.capacity_factor = 1.0; /* one token never drops; three may */
    CU_ASSERT_EQUAL_FATAL(moe_moe_layer_init(&L, &s, "g", MOE_CPU, 7, 0.5, 0, 4), MOE_OK);
    CU_ASSERT_TRUE(moe_moe_layer_gathers(&L, 1));
    CU_ASSERT_FALSE(moe_moe_layer_gathers(&L, 3));
    moe_moe_layer_free(&L);
    s.capacity_factor = 0;
    s.expert_ffn_dims = (int[]){6, 4, 6, 4};
    CU_ASSERT_EQUAL_FATAL(moe_moe_layer_init(&L, &s, "g", MOE_CPU, 7, 0.5, 0, 4), MOE_OK);
    CU_ASSERT_FALSE(moe_moe_layer_gathers(&L, 1)); /* two stacks */
    moe_moe_layer_free(&L);
    moe_step_reset();
}

/* The Switch aux loss and z-loss equal their formulas on the routing's own numbers. */
static void test_router_losses(void) {
    enum { E = 4 };
    moe_router_settings s = {.n_experts = E, .top_k = 2, .d_model = D, .balance = MOE_BALANCE_SWITCH,
                             .aux_coef = 0.01, .z_coef = 1e-3, .renormalize = true};
    moe_router r;
    CU_ASSERT_EQUAL_FATAL(moe_router_init(&r, &s, MOE_CPU, MOE_F32, "r", 3, 1.0), MOE_OK);
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){T, D}, 5, 0, 1.0);
    moe_routing out;
    CU_ASSERT_EQUAL_FATAL(moe_router_forward(&r, x, NULL, &out), MOE_OK);
    double p[T * E], g[T * 2], xs[T * D], w[D * E];
    moe_tensor_to_host_f64(out.probs, p);
    moe_tensor_to_host_f64(out.gates, g);
    moe_tensor_to_host_f64(x, xs);
    moe_tensor_to_host_f64(r.w_gate, w);
    double P[E] = {0}, aux = 0, z = 0;
    for (int t = 0; t < T; t++) {
        CU_ASSERT_DOUBLE_EQUAL(g[t * 2] + g[t * 2 + 1], 1.0, 1e-6);
        double lg[E], mx = -1e30, se = 0;
        for (int e = 0; e < E; e++) {
            lg[e] = 0;
            for (int i = 0; i < D; i++) lg[e] += xs[t * D + i] * w[i * E + e];
            mx = fmax(mx, lg[e]);
            P[e] += p[t * E + e] / T;
        }
        for (int e = 0; e < E; e++) se += exp(lg[e] - mx);
        z += pow(mx + log(se), 2) / T;
    }
    for (int e = 0; e < E; e++) aux += (double)out.load[e] / (T * 2) * P[e];
    CU_ASSERT_DOUBLE_EQUAL(moe_tensor_item(out.aux_loss), 0.01 * E * aux, 1e-6);
    CU_ASSERT_DOUBLE_EQUAL(moe_tensor_item(out.z_loss), 1e-3 * z, 1e-6);
    moe_router_free(&r);
    moe_step_reset();
}

static void register_suites(void) {
    moe_test_add_suite("moe_layer", (moe_test_entry[]){{"dense reference k=1", test_dense_k1},
                                                        {"dense reference k=2", test_dense_k2},
                                                        {"dense reference k=4 (all experts)", test_dense_k4},
                                                        {"dense reference with a shared expert", test_dense_shared},
                                                        {"dense reference with capacity dropping", test_dense_capacity},
                                                        {"heterogeneous widths: groups and dense reference k=2", test_hetero_k2},
                                                        {"heterogeneous widths: capacity and shared", test_hetero_capacity_shared},
                                                        {"heterogeneous widths: 8 groups", test_hetero_many_groups},
                                                        {"heterogeneous widths: init keyed by expert", test_hetero_init_by_name},
                                                        {"gathered experts equal the grouped path", test_gathered_equals_grouped},
                                                        {"router aux and z losses", test_router_losses},
                                                        {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
