/* moe_recompute beyond the gradient check: a stack of recomputed pieces gives the same
 * loss and grads, bit for bit, as the plain graph while its step arena peaks lower; the
 * readiness hook reports each parameter once, after the piece that uses it; a piece that
 * fails in its replay fails the backward with its message. The freeing backward
 * (moe_backward_freeing), plain and recomputed: the same grads bit for bit with freshly
 * taken step memory poisoned, in a lower peak, and the second step fits the first's arena. */
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "core/ops.h"
#include "tests/harness/tensors.h"
#include "tests/harness/testlib.h"

enum { LAYERS = 4, T = 64, D = 32, F = 96 };

typedef struct stack {
    moe_tensor *w13[LAYERS], *w2[LAYERS]; /* [D, 2F], [F, D] */
    int calls;                            /* pieces run (forward and replays) */
    int fail_at;                          /* 0, or the call that fails */
} stack;

/* x + swiglu(x w13) w2 on x [T, D]: in = {x, w13, w2}. */
static moe_tensor *piece(void *ctx, moe_tensor *const *in) {
    stack *s = ctx;
    if (++s->calls == s->fail_at) {
        moe_error(MOE_ERR_OOM, "piece %d: no memory left (test)", s->calls);
        return NULL;
    }
    return moe_add(in[0], moe_matmul(moe_swiglu(moe_matmul(in[0], in[1])), in[2]));
}

static void stack_init(stack *s) {
    memset(s, 0, sizeof *s);
    for (int l = 0; l < LAYERS; l++) {
        s->w13[l] = test_leaf(MOE_F32, 2, (int64_t[]){D, 2 * F}, 100 + (uint64_t)l);
        s->w2[l] = test_leaf(MOE_F32, 2, (int64_t[]){F, D}, 200 + (uint64_t)l);
    }
}

static void stack_free(stack *s) {
    for (int l = 0; l < LAYERS; l++) {
        moe_tensor_free(s->w13[l]);
        moe_tensor_free(s->w2[l]);
    }
}

/* loss = sum(stack(x) * r) with x = 0.5 * x0; returns the backward's status. */
static moe_status stack_loss_as(stack *s, bool recompute, bool free_forward, double *loss) {
    moe_tensor *x0 = test_leaf(MOE_F32, 2, (int64_t[]){T, D}, 7), *r = test_randn(MOE_F32, 2, (int64_t[]){T, D}, 8);
    moe_tensor *x = moe_mul_scalar(x0, 0.5);
    for (int l = 0; l < LAYERS; l++) {
        moe_tensor *in[3] = {x, s->w13[l], s->w2[l]};
        x = recompute ? moe_recompute(piece, s, 3, in) : piece(s, in);
    }
    moe_tensor *L = moe_sum_all(moe_mul(x, r));
    *loss = L ? moe_tensor_item(L) : 0;
    moe_status st = free_forward ? moe_backward_freeing(L) : moe_backward(L);
    moe_tensor_free(x0);
    return st;
}

static moe_status stack_loss(stack *s, bool recompute, double *loss) { return stack_loss_as(s, recompute, false, loss); }

/* Every parameter's grad, concatenated (host f64): per layer w13's 2DF, then w2's DF. */
static double *grads(const stack *s) {
    double *g = malloc(sizeof(double) * LAYERS * 3 * D * F);
    for (int l = 0; l < LAYERS; l++) {
        double *a = test_host_f64(s->w13[l]->grad), *b = test_host_f64(s->w2[l]->grad);
        memcpy(g + (size_t)l * 3 * D * F, a, sizeof(double) * 2 * D * F);
        memcpy(g + (size_t)l * 3 * D * F + 2 * D * F, b, sizeof(double) * D * F);
        free(a);
        free(b);
    }
    return g;
}

static void test_equal_and_smaller(void) {
    double loss[2];
    double *g[2];
    size_t peak[2];
    int calls[2];
    for (int rc = 1; rc >= 0; rc--) { /* recomputed first: the peak statistic only grows */
        stack s;
        stack_init(&s);
        moe_step_reset();
        CHECK_OK(stack_loss(&s, rc, &loss[rc]));
        peak[rc] = moe_mem_get_stats(MOE_CPU).step_peak;
        g[rc] = grads(&s);
        calls[rc] = s.calls;
        stack_free(&s);
        moe_step_reset();
    }
    CU_ASSERT_EQUAL(loss[0], loss[1]);
    CU_ASSERT_EQUAL(memcmp(g[0], g[1], sizeof(double) * LAYERS * 3 * D * F), 0);
    CU_ASSERT_EQUAL(calls[0], LAYERS);
    CU_ASSERT_EQUAL(calls[1], 2 * LAYERS); /* each piece once more in the backward */
    /* the plain graph keeps h [T, 2F], a [T, F] and more per layer; the recomputed one one
     * layer's worth at a time */
    printf("\n    step arena peak: plain %zu bytes, recomputed %zu bytes\n", peak[0], peak[1]);
    CU_ASSERT(peak[1] * 3 < peak[0] * 2);
    free(g[0]);
    free(g[1]);
}

typedef struct {
    const moe_tensor *seen[2 * LAYERS];
    int n;
    const stack *s;
    int calls_at_report[2 * LAYERS];
} reports;

static void on_ready(moe_tensor *p, void *user) {
    reports *r = user;
    bool ours = false; /* the input x0 is a parameter too: not counted */
    for (int l = 0; l < LAYERS; l++) ours |= p == r->s->w13[l] || p == r->s->w2[l];
    if (!ours) return;
    if (r->n < 2 * LAYERS) r->calls_at_report[r->n] = r->s->calls;
    r->seen[r->n < 2 * LAYERS ? r->n : 2 * LAYERS - 1] = p;
    r->n++;
}

static void test_ready_hook(void) {
    stack s;
    stack_init(&s);
    reports r = {.s = &s};
    moe_set_grad_ready_hook(on_ready, &r);
    double loss;
    CHECK_OK(stack_loss(&s, true, &loss));
    moe_set_grad_ready_hook(NULL, NULL);
    CU_ASSERT_EQUAL_FATAL(r.n, 2 * LAYERS);
    for (int l = LAYERS - 1, k = 0; l >= 0; l--, k += 2) { /* last layer first, each after its replay */
        CU_ASSERT(r.seen[k] == s.w13[l] && r.seen[k + 1] == s.w2[l]);
        CU_ASSERT_EQUAL(r.calls_at_report[k], LAYERS + (LAYERS - l));
    }
    stack_free(&s);
    moe_step_reset();
}

static void test_replay_failure(void) {
    for (int fr = 0; fr < 2; fr++) { /* keeping and freeing backward */
        stack s;
        stack_init(&s);
        s.fail_at = LAYERS + 2; /* the second replay */
        double loss;
        CU_ASSERT_EQUAL(stack_loss_as(&s, true, fr, &loss), MOE_ERR_OOM);
        CHECK_ERROR_HAS("no memory left");
        stack_free(&s);
        moe_step_reset();
        stack_init(&s); /* the next step runs as usual */
        CHECK_OK(stack_loss_as(&s, true, fr, &loss));
        stack_free(&s);
        moe_step_reset();
    }
}

/* Keeping and freeing backward of the same stack: loss and grads equal bit for bit (new
 * step memory is poisoned and the second step runs in an arena sized to the first's
 * peak, so a rewound buffer that were still read shows); the freeing peak is lower; the
 * second step fits the arena the first left. */
static void check_freeing(bool recompute) {
    double loss[2];
    double *g[2];
    size_t peak[2], capacity = 0;
    moe_mem_set_poison(true);
    for (int fr = 0; fr < 2; fr++) {
        stack s;
        stack_init(&s);
        moe_step_reset();
        moe_mem_set_snug(true); /* small chunks: the second step runs in a snug arena */
        for (int step = 0; step < 2; step++) {
            moe_step_reset();
            if (step == 1) capacity = moe_mem_get_stats(MOE_CPU).step_capacity; /* sized by the first */
            moe_mem_reset_peaks(MOE_CPU);
            moe_tensor *ps[2 * LAYERS];
            for (int l = 0; l < LAYERS; l++) ps[2 * l] = s.w13[l], ps[2 * l + 1] = s.w2[l];
            CHECK_OK(moe_zero_grad(ps, 2 * LAYERS));
            CHECK_OK(stack_loss_as(&s, recompute, fr, &loss[fr]));
        }
        peak[fr] = moe_mem_get_stats(MOE_CPU).step_peak;
        moe_step_reset();
        CU_ASSERT_EQUAL(moe_mem_get_stats(MOE_CPU).step_capacity, capacity); /* the second step fit */
        g[fr] = grads(&s);
        stack_free(&s);
        moe_step_reset();
    }
    moe_mem_set_poison(false);
    moe_mem_set_snug(false);
    CU_ASSERT_EQUAL(loss[0], loss[1]);
    CU_ASSERT_EQUAL(memcmp(g[0], g[1], sizeof(double) * LAYERS * 3 * D * F), 0);
    printf("\n    step arena peak%s: keeping %zu bytes, freeing %zu bytes\n", recompute ? " (recomputed)" : "", peak[0],
           peak[1]);
    /* plain: the forward's activations go back as the grads grow; recomputed, each
     * replay's own memory already goes back, and the pieces' results are what is left */
    CU_ASSERT(recompute ? peak[1] < peak[0] : peak[1] * 4 < peak[0] * 3);
    free(g[0]);
    free(g[1]);
}

static void test_freeing_plain(void) { check_freeing(false); }
static void test_freeing_recomputed(void) { check_freeing(true); }

static void register_suites(void) {
    moe_test_add_suite("recompute", (moe_test_entry[]){
                                        {"same loss and grads, bit for bit, in less step memory", test_equal_and_smaller},
                                        {"readiness hook: each parameter once, after its replay", test_ready_hook},
                                        {"a replay that fails fails the backward (keeping and freeing)", test_replay_failure},
                                        {"freeing backward: same grads, lower peak", test_freeing_plain},
                                        {"freeing backward through recomputed pieces", test_freeing_recomputed},
                                        {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
