/* The routers beyond plain top-k: the RMoE recurrent router (GRU equations against a
 * hand-written reference, finite-difference gradients through three layers, the detach
 * ablation), the sparsity-constrained OT router (capacity, marginals, spreading skewed
 * logits) and latency-aware balancing (CV^2, the weights, the loss formula, and training
 * a router on the loss alone reaches token shares in inverse proportion to latency). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "core/ops.h"
#include "router/latency.h"
#include "router/ot.h"
#include "router/rmoe.h"
#include "router/router.h"
#include "tests/harness/testlib.h"

enum { T = 6, D = 5, P = 3, E = 4, K = 2, NL = 3 };

static double sigm(double v) { return 1.0 / (1.0 + exp(-v)); }

/* ---- RMoE ---- */

/* h' from the GRU equations, in plain double: xp, h [T, P] row-major. */
static void gru_reference(const moe_rmoe_gru *g, const double *xp, const double *h, double *out) {
    double w[6][P * P], b[6][P];
    for (int j = 0; j < 6; j++) {
        moe_tensor_to_host_f64(g->w[j], w[j]);
        moe_tensor_to_host_f64(g->b[j], b[j]);
    }
    for (int t = 0; t < T; t++)
        for (int o = 0; o < P; o++) {
            double a[6];
            for (int j = 0; j < 6; j++) {
                a[j] = b[j][o];
                for (int i = 0; i < P; i++) a[j] += (j < 3 ? xp : h)[t * P + i] * w[j][i * P + o];
            }
            double r = sigm(a[0] + a[3]), z = sigm(a[1] + a[4]), n = tanh(a[2] + r * a[5]);
            out[t * P + o] = (1 - z) * n + z * h[t * P + o];
        }
}

static void test_gru_reference(void) {
    moe_rmoe_gru g;
    CU_ASSERT_EQUAL_FATAL(moe_rmoe_gru_init(&g, P, MOE_CPU, MOE_F64, "router.gru", 9, 0.7, MOE_INIT_RANDOM), MOE_OK);
    for (int j = 0; j < 6; j++) /* non-zero biases, so every term is exercised */
        moe_tensor_copy_(g.b[j], moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 1, (int64_t[]){P}, 20 + j, 0, 0.5));
    moe_tensor *xp = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){T, P}, 1, 0, 1.0);
    moe_tensor *h = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){T, P}, 2, 0, 1.0);
    moe_tensor *zeros = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){T, P});
    double ref[T * P], got[T * P], zero[T * P] = {0};
    for (int pass = 0; pass < 2; pass++) {
        moe_tensor *hin = pass ? NULL : h;
        gru_reference(&g, xp->data, pass ? zero : h->data, ref);
        CU_ASSERT_EQUAL_FATAL(moe_tensor_to_host_f64(moe_rmoe_gru_step(&g, xp, hin), got), MOE_OK);
        for (int i = 0; i < T * P; i++) CU_ASSERT_DOUBLE_EQUAL(got[i], ref[i], 1e-14);
    }
    /* NULL state is exactly a zero state. */
    double zs[T * P];
    moe_tensor_to_host_f64(moe_rmoe_gru_step(&g, xp, zeros), zs);
    for (int i = 0; i < T * P; i++) CU_ASSERT_DOUBLE_EQUAL(zs[i], got[i], 1e-15);
    moe_tensor *ts[12];
    const char *names[12];
    CU_ASSERT_EQUAL(moe_rmoe_gru_params(&g, ts, names, 12), 12);
    CU_ASSERT_STRING_EQUAL(names[0], "router.gru.w_ir");
    CU_ASSERT_STRING_EQUAL(names[5], "router.gru.w_hn");
    CU_ASSERT_STRING_EQUAL(names[11], "router.gru.b_hn");
    CU_ASSERT(ts[0] == g.w[0] && ts[11] == g.b[5] && ts[3]->is_param);
    moe_rmoe_gru_free(&g);
    moe_step_reset();
}

typedef struct rmoe_stack {
    moe_rmoe_gru gru;
    moe_router r[NL];
    moe_tensor *x[NL], *R[NL];
} rmoe_stack;

static void stack_init(rmoe_stack *st, bool detach) {
    CU_ASSERT_EQUAL_FATAL(moe_rmoe_gru_init(&st->gru, P, MOE_CPU, MOE_F64, "router.gru", 3, 0.8, MOE_INIT_RANDOM), MOE_OK);
    for (int j = 0; j < 6; j++)
        moe_tensor_copy_(st->gru.b[j], moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 1, (int64_t[]){P}, 40 + j, 0, 0.3));
    moe_router_settings s = {.n_experts = E, .top_k = K, .d_model = D, .balance = MOE_BALANCE_SWITCH, .aux_coef = 0.3,
                             .z_coef = 0.05, .renormalize = true, .type = MOE_ROUTER_RMOE, .rmoe_dim = P,
                             .rmoe_detach = detach, .gru = &st->gru};
    for (int i = 0; i < NL; i++) {
        char name[32];
        snprintf(name, sizeof name, "layers.%d.moe.router", i);
        CU_ASSERT_EQUAL_FATAL(moe_router_init(&st->r[i], &s, MOE_CPU, MOE_F64, name, 100 + i, 0.8), MOE_OK);
        st->x[i] = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F64, 2, (int64_t[]){T, D}, 200 + i, 0, 1.0);
        st->x[i]->requires_grad = st->x[i]->is_param = true;
        st->R[i] = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F64, 2, (int64_t[]){T, K}, 300 + i, 0, 1.0);
    }
}

static void stack_free(rmoe_stack *st) {
    for (int i = 0; i < NL; i++) {
        moe_router_free(&st->r[i]);
        moe_tensor_free(st->x[i]);
        moe_tensor_free(st->R[i]);
    }
    moe_rmoe_gru_free(&st->gru);
}

/* sum_i sum(gates_i * R_i) + aux_i + z_i over the layers in [first, NL); experts of every
 * layer into ids when given. */
static moe_tensor *stack_loss(rmoe_stack *st, int first, int32_t *ids) {
    moe_tensor *state = NULL, *loss = NULL;
    for (int i = 0; i < NL; i++) {
        moe_routing out;
        if (moe_router_forward(&st->r[i], st->x[i], state, &out) != MOE_OK) return NULL;
        CU_ASSERT_PTR_NOT_NULL(out.state);
        state = out.state;
        if (ids) memcpy(ids + i * T * K, out.host_experts, sizeof(int32_t) * T * K);
        if (i < first) continue;
        moe_tensor *l = moe_add(moe_add(moe_sum_all(moe_mul(out.gates, st->R[i])), out.aux_loss), out.z_loss);
        loss = loss ? moe_add(loss, l) : l;
    }
    return loss;
}

/* The parameters of the stack, for gradcheck and zeroing. */
static int stack_params(rmoe_stack *st, moe_tensor **ps) {
    int n = 0;
    const char *names[12];
    for (int i = 0; i < NL; i++) {
        ps[n++] = st->x[i];
        n += moe_router_params(&st->r[i], ps + n, names, 2);
    }
    return n + moe_rmoe_gru_params(&st->gru, ps + n, names, 12);
}

static void test_rmoe_gradcheck(void) {
    rmoe_stack st;
    stack_init(&st, false);
    moe_tensor *ps[3 * NL + 12];
    int np = stack_params(&st, ps);
    CU_ASSERT_EQUAL_FATAL(np, 3 * NL + 12);
    moe_zero_grad(ps, np);
    int32_t ids0[NL * T * K], ids[NL * T * K];
    CU_ASSERT_EQUAL_FATAL(moe_backward(stack_loss(&st, 0, ids0)), MOE_OK);
    double worst = 0;
    for (int q = 0; q < np; q++) {
        CU_ASSERT_PTR_NOT_NULL_FATAL(ps[q]->grad);
        int64_t n = moe_tensor_numel(ps[q]);
        double *an = malloc(sizeof(double) * n), *v = ps[q]->data, num2 = 0, den2 = 0;
        moe_tensor_to_host_f64(ps[q]->grad, an);
        bool was = moe_grad_set_enabled(false);
        for (int64_t i = 0; i < n; i++) {
            const double eps = 1e-6, keep = v[i];
            v[i] = keep + eps;
            double lp = moe_tensor_item(stack_loss(&st, 0, ids));
            CU_ASSERT_EQUAL(memcmp(ids, ids0, sizeof ids), 0); /* the selection must not move */
            v[i] = keep - eps;
            double lm = moe_tensor_item(stack_loss(&st, 0, ids));
            v[i] = keep;
            double fd = (lp - lm) / (2 * eps);
            num2 += (fd - an[i]) * (fd - an[i]);
            den2 += fd * fd;
        }
        moe_grad_set_enabled(was);
        double rel = sqrt(num2) / fmax(sqrt(den2), 1e-12);
        if (!(rel < 1e-6)) fprintf(stderr, "rmoe gradcheck: parameter %d (%s) rel err %.3g\n", q, ps[q]->name ? ps[q]->name : "x", rel);
        CU_ASSERT(den2 > 0); /* every parameter really influences the loss */
        worst = fmax(worst, rel);
        free(an);
    }
    fprintf(stderr, "\n    rmoe gradcheck over %d parameter tensors: worst relative error %.2g\n", np, worst);
    CU_ASSERT(worst < 1e-6);
    stack_free(&st);
    moe_step_reset();
}

/* With detach, layer 3's loss sends no gradient to layer 1's projection; without, it does.
 * The forward values are the same either way. */
static void test_rmoe_detach(void) {
    double norm[2], loss[2];
    for (int detach = 0; detach < 2; detach++) {
        rmoe_stack st;
        stack_init(&st, detach);
        moe_tensor *ps[3 * NL + 12];
        int np = stack_params(&st, ps);
        moe_zero_grad(ps, np);
        moe_tensor *l = stack_loss(&st, NL - 1, NULL);
        CU_ASSERT_PTR_NOT_NULL_FATAL(l);
        loss[detach] = moe_tensor_item(l);
        CU_ASSERT_EQUAL_FATAL(moe_backward(l), MOE_OK);
        double g[D * P] = {0};
        if (st.r[0].proj->grad) moe_tensor_to_host_f64(st.r[0].proj->grad, g);
        norm[detach] = 0;
        for (int i = 0; i < D * P; i++) norm[detach] += g[i] * g[i];
        double g3[D * P] = {0}, n3 = 0; /* the last layer's own projection always gets a gradient */
        moe_tensor_to_host_f64(st.r[NL - 1].proj->grad, g3);
        for (int i = 0; i < D * P; i++) n3 += g3[i] * g3[i];
        CU_ASSERT(n3 > 1e-12);
        stack_free(&st);
        moe_step_reset();
    }
    CU_ASSERT(norm[0] > 1e-12);
    CU_ASSERT_EQUAL(norm[1], 0.0);
    CU_ASSERT_DOUBLE_EQUAL(loss[0], loss[1], 1e-15);
}

static void test_router_params(void) {
    moe_rmoe_gru g;
    CU_ASSERT_EQUAL_FATAL(moe_rmoe_gru_init(&g, P, MOE_CPU, MOE_F32, "router.gru", 1, 0.02, MOE_INIT_RANDOM), MOE_OK);
    moe_router_settings s = {.n_experts = E, .top_k = K, .d_model = D, .balance = MOE_BALANCE_SWITCH,
                             .type = MOE_ROUTER_RMOE, .rmoe_dim = P, .gru = &g};
    moe_router r, t;
    CU_ASSERT_EQUAL_FATAL(moe_router_init(&r, &s, MOE_CPU, MOE_F32, "layers.1.moe.router", 5, 0.02), MOE_OK);
    s.type = MOE_ROUTER_TOPK;
    CU_ASSERT_EQUAL_FATAL(moe_router_init(&t, &s, MOE_CPU, MOE_F32, "layers.1.moe.router", 5, 0.02), MOE_OK);
    moe_tensor *ts[2];
    const char *names[2];
    CU_ASSERT_EQUAL(moe_router_params(&r, ts, names, 2), 2);
    CU_ASSERT_STRING_EQUAL(names[0], "layers.1.moe.router.proj");
    CU_ASSERT_STRING_EQUAL(names[1], "layers.1.moe.router.head");
    CU_ASSERT(ts[0] == r.proj && ts[0]->shape[0] == D && ts[0]->shape[1] == P && ts[1]->shape[0] == P && ts[1]->shape[1] == E);
    CU_ASSERT_EQUAL(moe_router_params(&t, ts, names, 2), 1);
    CU_ASSERT_STRING_EQUAL(names[0], "layers.1.moe.router.w_gate");
    /* top-k ignores a state and produces none */
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){T, D}, 5, 0, 1.0);
    moe_routing a, b;
    CU_ASSERT_EQUAL_FATAL(moe_router_forward(&t, x, NULL, &a), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_router_forward(&t, x, x, &b), MOE_OK);
    CU_ASSERT_PTR_NULL(a.state);
    CU_ASSERT_PTR_NULL(a.valid);
    CU_ASSERT_EQUAL(memcmp(a.host_experts, b.host_experts, sizeof(int32_t) * T * K), 0);
    moe_router_free(&r);
    moe_router_free(&t);
    moe_rmoe_gru_free(&g);
    moe_step_reset();
}

/* ---- OT ---- */

static void test_ot_plan(void) {
    enum { TT = 512, EE = 8, KK = 2 };
    double *lg = malloc(sizeof(double) * TT * EE), *plan = malloc(sizeof(double) * TT * EE);
    moe_tensor *l = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){TT, EE}, 77, 0, 1.0);
    moe_tensor_to_host_f64(l, lg);
    int64_t cap = moe_ot_capacity(TT, KK, EE);
    CU_ASSERT_EQUAL(cap, 128);
    CU_ASSERT_EQUAL(moe_ot_capacity(10, 2, 8), 3);
    CU_ASSERT_EQUAL_FATAL(moe_ot_plan(lg, TT, EE, cap, 30, 1.0, plan), MOE_OK);
    for (int j = 0; j < EE; j++) {
        int64_t nz = 0;
        double col = 0;
        for (int t = 0; t < TT; t++) {
            CU_ASSERT(plan[t * EE + j] >= 0);
            nz += plan[t * EE + j] > 0;
            col += plan[t * EE + j];
        }
        CU_ASSERT(nz <= cap);
        CU_ASSERT_DOUBLE_EQUAL(col, 1.0 / EE, 1e-12);
    }
    double mean_err = 0, max_err = 0;
    for (int t = 0; t < TT; t++) {
        double row = 0;
        for (int j = 0; j < EE; j++) row += plan[t * EE + j];
        mean_err += fabs(row * TT - 1) / TT;
        max_err = fmax(max_err, fabs(row * TT - 1));
    }
    fprintf(stderr, "\n    ot plan T=%d E=%d k=%d, 30 steps: row sums * T - 1: mean |.| %.4f, max %.3f\n", TT, EE, KK,
            mean_err, max_err);
    CU_ASSERT(mean_err < 0.02);
    CU_ASSERT(max_err < 0.5);
    /* fewer steps give a worse fit: the ascent does the work */
    CU_ASSERT_EQUAL_FATAL(moe_ot_plan(lg, TT, EE, cap, 0, 1.0, plan), MOE_OK);
    double err0 = 0;
    for (int t = 0; t < TT; t++) {
        double row = 0;
        for (int j = 0; j < EE; j++) row += plan[t * EE + j];
        err0 += fabs(row * TT - 1) / TT;
    }
    CU_ASSERT(err0 > 5 * mean_err);
    free(lg);
    free(plan);
    moe_step_reset();
}

/* The solver written the slow, obvious way: each column's cap largest entries found by a
 * full sort (ties: lower index first), then the same Michelot projection and ascent step in
 * the same order of sums, by a scatter over the supports (fused multiply-adds written out, as
 * the solver does, so that no compiler contraction tells them apart). moe_ot_plan finds the
 * cut by a warm-started window search and sums dense columns, which must give the very same
 * plan, bit for bit. */
typedef struct {
    double v;
    int64_t t;
} ot_entry;

static int ot_entry_desc(const void *a, const void *b) {
    const ot_entry *x = a, *y = b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return (x->t > y->t) - (x->t < y->t);
}

static void reference_ot_plan(const double *lg, int64_t T, int E, int64_t cap, int iters, double *plan) {
    double b = (double)T / E, step = 1.0 / E, scale = 1.0 / b; /* gamma = 1 */
    double *alpha = malloc(sizeof(double) * T), *mass = malloc(sizeof(double) * T), *v = malloc(sizeof(double) * T);
    double *val = malloc(sizeof(double) * E * cap);
    int64_t *sup = malloc(sizeof(int64_t) * E * cap), *nnz = malloc(sizeof(int64_t) * E);
    ot_entry *order = malloc(sizeof(ot_entry) * T);
    bool *taken = malloc(sizeof(bool) * T);
    for (int64_t t = 0; t < T; t++) {
        alpha[t] = -INFINITY;
        for (int j = 0; j < E; j++) alpha[t] = fmax(alpha[t], lg[t * E + j]);
        alpha[t] = -alpha[t];
    }
    for (int it = 0;; it++) {
        for (int j = 0; j < E; j++) {
            int64_t *s = sup + j * cap, m = 0;
            for (int64_t t = 0; t < T; t++) v[t] = (alpha[t] + lg[t * E + j]) * scale;
            for (int64_t t = 0; t < T; t++) order[t] = (ot_entry){v[t], t};
            qsort(order, (size_t)T, sizeof *order, ot_entry_desc);
            for (int64_t t = 0; t < T; t++) taken[t] = false;
            for (int64_t i = 0; i < cap; i++) taken[order[i].t] = true;
            for (int64_t t = 0; t < T; t++)
                if (taken[t]) s[m++] = t;
            double sum = 0;
            for (int64_t i = 0; i < m; i++) sum += v[s[i]];
            double tau = (sum - 1.0) / (double)m;
            for (bool done = false; !done;) {
                int64_t keep = 0;
                sum = 0;
                for (int64_t i = 0; i < m; i++)
                    if (v[s[i]] > tau) s[keep++] = s[i], sum += v[s[i]];
                done = keep == m;
                m = keep;
                tau = (sum - 1.0) / (double)m;
            }
            for (int64_t i = 0; i < m; i++) val[j * cap + i] = v[s[i]] - tau;
            nnz[j] = m;
        }
        if (it == iters) break;
        for (int64_t t = 0; t < T; t++) mass[t] = 0;
        for (int j = 0; j < E; j++)
            for (int64_t i = 0; i < nnz[j]; i++) {
                int64_t t = sup[j * cap + i];
                mass[t] = fma(b, val[j * cap + i], mass[t]);
            }
        for (int64_t t = 0; t < T; t++) alpha[t] = fma(step, 1.0 - mass[t], alpha[t]);
    }
    memset(plan, 0, sizeof(double) * T * E);
    for (int j = 0; j < E; j++)
        for (int64_t i = 0; i < nnz[j]; i++) plan[sup[j * cap + i] * E + j] = val[j * cap + i] / E;
    free(alpha), free(mass), free(v), free(val), free(sup), free(nnz), free(order), free(taken);
}

/* Random logits, logits rounded to quarters (many exact ties at the cut) and all-equal logits,
 * at a few sizes: the plan equals the sort-based reference exactly. */
static void test_ot_plan_reference(void) {
    const int64_t sizes[][2] = {{7, 3}, {300, 8}, {4096, 8}, {1000, 64}};
    for (int z = 0; z < 4; z++)
        for (int kind = 0; kind < 3; kind++) {
            int64_t T = sizes[z][0];
            int E = (int)sizes[z][1];
            double *lg = malloc(sizeof(double) * T * E), *a = malloc(sizeof(double) * T * E),
                   *b = malloc(sizeof(double) * T * E);
            moe_tensor *l = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){T, E}, 5 + z, 0, 2.0);
            moe_tensor_to_host_f64(l, lg);
            for (int64_t i = 0; i < T * E; i++) lg[i] = kind == 0 ? lg[i] : kind == 1 ? round(lg[i] * 4) / 4 : 0.5;
            int64_t cap = moe_ot_capacity(T, 2, E);
            CU_ASSERT_EQUAL_FATAL(moe_ot_plan(lg, T, E, cap, 30, 1.0, a), MOE_OK);
            reference_ot_plan(lg, T, E, cap < T ? cap : T, 30, b);
            int64_t differ = 0;
            for (int64_t i = 0; i < T * E; i++) differ += a[i] != b[i];
            if (differ) fprintf(stderr, "\n    T=%lld E=%d logits %d: %lld entries differ\n", (long long)T, E, kind,
                                (long long)differ);
            CU_ASSERT_EQUAL(differ, 0);
            free(lg), free(a), free(b);
        }
    moe_step_reset();
}

static void test_ot_select(void) {
    /* 2 tokens, 3 experts, k = 2: token 0 has one positive entry (second slot invalid and
     * chosen among the zeros by logit), token 1 two. */
    double plan[] = {0.0, 0.3, 0.0, 0.2, 0.0, 0.1};
    double lg[] = {1.0, 0.0, 2.0, 0.0, 5.0, 0.0};
    int32_t ex[4];
    bool valid[4];
    moe_ot_select(plan, lg, 2, 3, 2, ex, valid);
    CU_ASSERT(ex[0] == 1 && valid[0] && ex[1] == 2 && !valid[1]);
    CU_ASSERT(ex[2] == 0 && valid[2] && ex[3] == 2 && valid[3]);
}

/* Skewed logits (every token prefers expert 0 by a wide margin): top-k sends everything
 * to expert 0, OT keeps every expert within capacity and uses them all; gates are the
 * softmax of the chosen experts renormalised over the valid slots. */
static void test_ot_spreads(void) {
    enum { TT = 64 };
    moe_router_settings s = {.n_experts = E, .top_k = K, .d_model = D, .balance = MOE_BALANCE_SWITCH, .aux_coef = 0.01,
                             .z_coef = 1e-3, .renormalize = true, .ot_iters = 30, .ot_gamma = 1.0};
    moe_router topk, ot;
    CU_ASSERT_EQUAL_FATAL(moe_router_init(&topk, &s, MOE_CPU, MOE_F32, "r", 3, 1.0), MOE_OK);
    s.type = MOE_ROUTER_OT;
    CU_ASSERT_EQUAL_FATAL(moe_router_init(&ot, &s, MOE_CPU, MOE_F32, "r", 3, 1.0), MOE_OK);
    /* feature 0 is a constant 1 whose weight favours expert 0 by 8 */
    float *w = topk.w_gate->data, *w2 = ot.w_gate->data;
    for (int e = 0; e < E; e++) w[e] = w2[e] = e == 0 ? 8.0f : 0.0f;
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){TT, D}, 5, 0, 0.5);
    for (int t = 0; t < TT; t++) ((float *)x->data)[t * D] = 1.0f;
    moe_routing a, b;
    CU_ASSERT_EQUAL_FATAL(moe_router_forward(&topk, x, NULL, &a), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_router_forward(&ot, x, NULL, &b), MOE_OK);
    CU_ASSERT_EQUAL(a.load[0], TT);
    int64_t cap = moe_ot_capacity(TT, K, E), total = 0;
    CU_ASSERT_PTR_NOT_NULL_FATAL(b.valid);
    for (int e = 0; e < E; e++) {
        CU_ASSERT(b.load[e] <= cap);
        CU_ASSERT(b.load[e] > 0);
        total += b.load[e];
    }
    CU_ASSERT(total >= TT); /* every token has at least one expert */
    double g[TT * K], p[TT * E];
    moe_tensor_to_host_f64(b.gates, g);
    moe_tensor_to_host_f64(b.probs, p);
    for (int t = 0; t < TT; t++) {
        double sum = 0, pv = 0;
        for (int s2 = 0; s2 < K; s2++) {
            int i = t * K + s2;
            if (!b.valid[i]) CU_ASSERT_EQUAL(g[i], 0.0);
            if (b.valid[i]) pv += p[t * E + b.host_experts[i]];
            sum += g[i];
        }
        CU_ASSERT_DOUBLE_EQUAL(sum, 1.0, 1e-5);
        for (int s2 = 0; s2 < K; s2++)
            if (b.valid[t * K + s2]) CU_ASSERT_DOUBLE_EQUAL(g[t * K + s2], p[t * E + b.host_experts[t * K + s2]] / pv, 1e-5);
    }
    moe_router_free(&topk);
    moe_router_free(&ot);
    moe_step_reset();
}

/* ot_plan_gates: the gates are T x the plan's values at the chosen slots (router/README.md
 * §4), and their gradient is the softmax's (straight-through): without renormalisation the
 * router weight's grad equals that of the softmax-gated OT router exactly. */
static void test_ot_plan_gates(void) {
    enum { TT = 16 };
    moe_router_settings s = {.type = MOE_ROUTER_OT, .n_experts = E, .top_k = K, .d_model = D,
                             .balance = MOE_BALANCE_NONE, .renormalize = false, .ot_iters = 30, .ot_gamma = 1.0};
    moe_router soft, plan;
    CU_ASSERT_EQUAL_FATAL(moe_router_init(&soft, &s, MOE_CPU, MOE_F64, "r", 3, 1.0), MOE_OK);
    s.ot_plan_gates = true;
    CU_ASSERT_EQUAL_FATAL(moe_router_init(&plan, &s, MOE_CPU, MOE_F64, "r", 3, 1.0), MOE_OK);
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){TT, D}, 8, 0, 1.0);
    moe_tensor *R = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){TT, K}, 9, 0, 1.0);
    double lg[TT * E], pl[TT * E], w[D * E], g[TT * K], gw[2][D * E];
    moe_tensor_to_host_f64(soft.w_gate, w);
    for (int t = 0; t < TT; t++)
        for (int e = 0; e < E; e++) {
            lg[t * E + e] = 0;
            for (int c = 0; c < D; c++) lg[t * E + e] += ((double *)x->data)[t * D + c] * w[c * E + e];
        }
    CU_ASSERT_EQUAL_FATAL(moe_ot_plan(lg, TT, E, moe_ot_capacity(TT, K, E), 30, 1.0, pl), MOE_OK);
    moe_router *rs[2] = {&soft, &plan};
    int32_t ids[2][TT * K];
    for (int v = 0; v < 2; v++) {
        moe_routing r;
        CU_ASSERT_EQUAL_FATAL(moe_router_forward(rs[v], x, NULL, &r), MOE_OK);
        memcpy(ids[v], r.host_experts, sizeof ids[v]);
        if (v == 1) {
            moe_tensor_to_host_f64(r.gates, g);
            for (int i = 0; i < TT * K; i++)
                CU_ASSERT_DOUBLE_EQUAL(g[i], r.valid[i] ? TT * pl[(i / K) * E + r.host_experts[i]] : 0.0, 1e-12);
        }
        CU_ASSERT_EQUAL_FATAL(moe_backward(moe_sum_all(moe_mul(r.gates, R))), MOE_OK);
        CU_ASSERT_PTR_NOT_NULL_FATAL(rs[v]->w_gate->grad);
        moe_tensor_to_host_f64(rs[v]->w_gate->grad, gw[v]);
    }
    CU_ASSERT_EQUAL(memcmp(ids[0], ids[1], sizeof ids[0]), 0);
    double gmax = 0;
    for (int i = 0; i < D * E; i++) gmax = fmax(gmax, fabs(gw[0][i]));
    CU_ASSERT(gmax > 0);
    for (int i = 0; i < D * E; i++) CU_ASSERT_DOUBLE_EQUAL(gw[1][i], gw[0][i], 1e-12);
    moe_router_free(&soft);
    moe_router_free(&plan);
    moe_step_reset();
}

/* ---- latency-aware balance ---- */

static void test_cv_and_alpha(void) {
    moe_tensor *x = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 1, (int64_t[]){4}, (double[]){1, 2, 3, 4});
    /* mean 2.5, unbiased variance 5/3 */
    CU_ASSERT_DOUBLE_EQUAL(moe_tensor_item(moe_cv_squared(x)), (5.0 / 3.0) / (6.25 + 1e-10), 1e-14);
    moe_tensor *one = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 1, (int64_t[]){1}, (double[]){3});
    CU_ASSERT_EQUAL(moe_tensor_item(moe_cv_squared(one)), 0.0);
    moe_tensor *zero = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 1, (int64_t[]){3});
    CU_ASSERT_EQUAL(moe_tensor_item(moe_cv_squared(zero)), 0.0);
    double alpha[3];
    CU_ASSERT_EQUAL(moe_latency_alpha((double[]){2, 1}, 2, alpha), MOE_OK);
    CU_ASSERT_DOUBLE_EQUAL(alpha[0], 4.0 / 3.0, 1e-15);
    CU_ASSERT_DOUBLE_EQUAL(alpha[1], 2.0 / 3.0, 1e-15);
    CU_ASSERT_EQUAL(moe_latency_alpha((double[]){6, 4, 2}, 3, alpha), MOE_OK);
    CU_ASSERT_DOUBLE_EQUAL(alpha[0] + alpha[1] + alpha[2], 3.0, 1e-14);
    CU_ASSERT_DOUBLE_EQUAL(alpha[0], 1.5, 1e-15);
    CU_ASSERT_EQUAL(moe_latency_alpha((double[]){1, 0}, 2, alpha), MOE_ERR_INVALID);
    CU_ASSERT_EQUAL(moe_latency_alpha((double[]){1, NAN}, 2, alpha), MOE_ERR_INVALID);
    double avg[2] = {0, 2};
    moe_latency_ema_update(avg, (double[]){1, 4}, 2, 0.5);
    CU_ASSERT_DOUBLE_EQUAL(avg[0], 1.0, 0);
    CU_ASSERT_DOUBLE_EQUAL(avg[1], 3.0, 1e-15);
    moe_step_reset();
}

/* balance = latency replaces the Switch loss with coef * (CV^2(a I) + CV^2(a Load)). */
static void test_latency_loss_formula(void) {
    moe_router_settings s = {.n_experts = E, .top_k = K, .d_model = D, .balance = MOE_BALANCE_LATENCY, .aux_coef = 0.5,
                             .renormalize = true};
    moe_router r;
    CU_ASSERT_EQUAL_FATAL(moe_router_init(&r, &s, MOE_CPU, MOE_F64, "r", 3, 1.0), MOE_OK);
    const double lat[E] = {4, 1, 2, 1};
    CU_ASSERT_EQUAL_FATAL(moe_router_set_latency(&r, lat), MOE_OK);
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){T, D}, 5, 0, 1.0);
    moe_routing out;
    CU_ASSERT_EQUAL_FATAL(moe_router_forward(&r, x, NULL, &out), MOE_OK);
    double g[T * K], imp[E] = {0}, ld[E], alpha[E];
    moe_tensor_to_host_f64(out.gates, g);
    for (int i = 0; i < T * K; i++) imp[out.host_experts[i]] += g[i];
    for (int e = 0; e < E; e++) {
        alpha[e] = lat[e] / 2.0;
        imp[e] *= alpha[e];
        ld[e] = alpha[e] * (double)out.load[e];
    }
    double cv[2];
    for (int q = 0; q < 2; q++) {
        const double *v = q ? ld : imp;
        double m = 0, var = 0;
        for (int e = 0; e < E; e++) m += v[e] / E;
        for (int e = 0; e < E; e++) var += (v[e] - m) * (v[e] - m) / (E - 1);
        cv[q] = var / (m * m + 1e-10);
    }
    CU_ASSERT_PTR_NOT_NULL_FATAL(out.aux_loss);
    CU_ASSERT_DOUBLE_EQUAL(moe_tensor_item(out.aux_loss), 0.5 * (cv[0] + cv[1]), 1e-12);
    moe_router_free(&r);
    moe_step_reset();
}

/* Two experts, expert 0 twice as slow: gradient descent on the latency loss alone moves
 * the token shares to about 1 : 2. */
static void test_latency_training(void) {
    enum { TT = 1024, DD = 8, STEPS = 400 };
    moe_router_settings s = {.n_experts = 2, .top_k = 1, .d_model = DD, .balance = MOE_BALANCE_LATENCY,
                             .aux_coef = 1.0, .renormalize = true};
    moe_router r;
    CU_ASSERT_EQUAL_FATAL(moe_router_init(&r, &s, MOE_CPU, MOE_F32, "r", 3, 0.1), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_router_set_latency(&r, (double[]){2.0, 1.0}), MOE_OK);
    /* tokens: standard normal with a constant feature (a router without bias needs one to
     * move the split away from half and half) */
    float *xs = malloc(sizeof(float) * TT * DD);
    moe_tensor *xr = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, 2, (int64_t[]){TT, DD}, 8, 0, 1.0);
    memcpy(xs, xr->data, sizeof(float) * TT * DD);
    for (int t = 0; t < TT; t++) xs[t * DD] = 1.0f;
    moe_tensor *x = moe_tensor_from_host(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, 2, (int64_t[]){TT, DD}, xs);
    int64_t load[2] = {0, 0}, load0[2] = {0, 0};
    for (int step = 0; step <= STEPS; step++) {
        moe_routing out;
        moe_zero_grad(&r.w_gate, 1);
        CU_ASSERT_EQUAL_FATAL(moe_router_forward(&r, x, NULL, &out), MOE_OK);
        memcpy(load, out.load, sizeof load);
        if (step == 0) memcpy(load0, load, sizeof load);
        if (step == STEPS) break;
        CU_ASSERT_EQUAL_FATAL(moe_backward(out.aux_loss), MOE_OK);
        float *w = r.w_gate->data, *gw = r.w_gate->grad->data;
        for (int i = 0; i < DD * 2; i++) w[i] -= 0.5f * gw[i]; /* lr 2 can overshoot into all-on-one */
        moe_step_reset();
    }
    double ratio = (double)load[1] / (double)(load[0] ? load[0] : 1);
    fprintf(stderr, "\n    latency [2, 1]: token shares %lld : %lld at start, %lld : %lld after %d steps (ratio %.3f)\n",
            (long long)load0[0], (long long)load0[1], (long long)load[0], (long long)load[1], STEPS, ratio);
    CU_ASSERT(ratio >= 1.6 && ratio <= 2.4);
    free(xs);
    moe_tensor_free(x);
    moe_tensor_free(xr);
    moe_router_free(&r);
    moe_step_reset();
}

/* Noisy top-k gating: no noise outside training, a smooth load near T*k, and balance
 * gradients that reach experts no token picked (which the hard counts cannot). */
static void test_noisy_gating(void) {
    enum { TT = 256, DD = 8, EE = 4 };
    moe_router_settings s = {.n_experts = EE, .top_k = 1, .d_model = DD, .balance = MOE_BALANCE_LATENCY,
                             .aux_coef = 1.0, .renormalize = true, .noisy_gating = true};
    moe_router r, clean;
    moe_router_settings sc = s;
    sc.noisy_gating = false;
    CU_ASSERT_EQUAL_FATAL(moe_router_init(&r, &s, MOE_CPU, MOE_F32, "r", 3, 0.1), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_router_init(&clean, &sc, MOE_CPU, MOE_F32, "r", 3, 0.1), MOE_OK);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r.w_noise);
    moe_tensor *ts[4];
    const char *names[4];
    CU_ASSERT_EQUAL(moe_router_params(&r, ts, names, 4), 2);
    CU_ASSERT_STRING_EQUAL(names[1], "r.w_noise");
    float *w = r.w_gate->data, *wc = clean.w_gate->data;
    for (int i = 0; i < DD; i++) w[i * EE + 2] = wc[i * EE + 2] = 3.0f; /* expert 2 takes (almost) every token */
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, 2, (int64_t[]){TT, DD}, 8, 0, 1.0);
    float *xv = x->data;
    for (int i = 0; i < TT * DD; i++) xv[i] = fabsf(xv[i]);
    /* no grad mode: exactly the clean routing */
    bool was = moe_grad_set_enabled(false);
    moe_routing a, b;
    CU_ASSERT_EQUAL_FATAL(moe_router_forward(&r, x, NULL, &a), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_router_forward(&clean, x, NULL, &b), MOE_OK);
    CU_ASSERT(memcmp(a.host_experts, b.host_experts, sizeof(int32_t) * TT) == 0);
    CU_ASSERT_PTR_NULL(a.smooth_load);
    moe_grad_set_enabled(was);
    /* training: a smooth load near T * k and gradients into every expert's gate column */
    moe_tensor *ps[2] = {r.w_gate, r.w_noise}, *pc[1] = {clean.w_gate};
    moe_zero_grad(ps, 2);
    CU_ASSERT_EQUAL_FATAL(moe_router_forward(&r, x, NULL, &a), MOE_OK);
    CU_ASSERT_PTR_NOT_NULL_FATAL(a.smooth_load);
    double sl[EE], sum = 0;
    moe_tensor_to_host_f64(a.smooth_load, sl);
    for (int e = 0; e < EE; e++) sum += sl[e];
    fprintf(stderr, "\n    smooth load %.1f %.1f %.1f %.1f (sum %.1f, T*k %d)\n", sl[0], sl[1], sl[2], sl[3], sum, TT);
    CU_ASSERT(sum > 0.7 * TT && sum < 1.3 * TT);
    CU_ASSERT_EQUAL_FATAL(moe_backward(a.aux_loss), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_router_forward(&clean, x, NULL, &b), MOE_OK);
    moe_zero_grad(pc, 1);
    CU_ASSERT_EQUAL_FATAL(moe_backward(b.aux_loss), MOE_OK);
    double g[DD * EE], gc[DD * EE];
    moe_tensor_to_host_f64(r.w_gate->grad, g);
    moe_tensor_to_host_f64(clean.w_gate->grad, gc);
    int reached = 0, reached_clean = 0;
    for (int e = 0; e < EE; e++) {
        double n1 = 0, n2 = 0;
        for (int i = 0; i < DD; i++) {
            n1 += fabs(g[i * EE + e]);
            n2 += fabs(gc[i * EE + e]);
        }
        fprintf(stderr, "    column %d: |grad| noisy %.3g, hard counts %.3g\n", e, n1, n2);
        reached += n1 > 1e-6;
        reached_clean += n2 > 1e-6;
    }
    fprintf(stderr, "    gate columns with a balance gradient: %d of %d (hard counts: %d)\n", reached, EE, reached_clean);
    CU_ASSERT_EQUAL(reached, EE);
    moe_tensor_free(x);
    moe_router_free(&r);
    moe_router_free(&clean);
    moe_step_reset();
}

static void register_suites(void) {
    moe_test_add_suite("rmoe", (moe_test_entry[]){{"GRU step equals the double reference", test_gru_reference},
                                                   {"gradcheck through 3 layers", test_rmoe_gradcheck},
                                                   {"detach cuts the recurrent gradient", test_rmoe_detach},
                                                   {"parameter names and top-k ignores state", test_router_params},
                                                   {NULL, NULL}});
    moe_test_add_suite("ot", (moe_test_entry[]){{"plan: capacity and marginals", test_ot_plan},
                                                 {"plan equals a sort-based reference", test_ot_plan_reference},
                                                 {"selection and validity", test_ot_select},
                                                 {"skewed logits are spread", test_ot_spreads},
                                                 {"plan gates, straight-through gradient", test_ot_plan_gates},
                                                 {NULL, NULL}});
    moe_test_add_suite("latency", (moe_test_entry[]){{"CV^2, alpha, running average", test_cv_and_alpha},
                                                      {"loss formula", test_latency_loss_formula},
                                                      {"training reaches inverse-latency shares", test_latency_training},
                                                      {"noisy gating and the smooth load", test_noisy_gating},
                                                      {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
