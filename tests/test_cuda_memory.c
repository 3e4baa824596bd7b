/* CUDA memory: after the first steps a training-like step (matmul, add, sum, forward and
 * backward, moe_step_reset between steps) never calls the device allocator again; the
 * freeing backward gives the keeping backward's grads bit for bit in a snug, poisoned
 * arena at a lower peak, and its steady-state steps do not allocate either; a
 * round trip host -> device -> host keeps every value; host-to-device copies staged
 * through the pinned ring (which wraps) land intact although the host buffer is reused
 * at once; an out-of-range index found on the device is reported at the next sync. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/device.h"
#include "core/autograd.h"
#include "core/kernels.h"
#include "core/memory.h"
#include "core/ops.h"
#include "tests/harness/testlib.h"

/* One step: loss = sum((x @ w + b) * x2) with grads of w and b. */
static bool step(moe_tensor *w, moe_tensor *b, uint64_t seed) {
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_STEP, MOE_CUDA, MOE_F32, 3, (int64_t[]){4, 16, 32}, seed, 0, 1.0);
    moe_tensor *x2 = moe_tensor_randn(MOE_LIFE_STEP, MOE_CUDA, MOE_F32, 3, (int64_t[]){4, 16, 24}, seed, 7, 1.0);
    moe_tensor *h = moe_add(moe_matmul(x, w), b);
    moe_tensor *loss = moe_sum_all(moe_mul(h, x2));
    bool ok = loss && moe_backward(loss) == MOE_OK && w->grad && b->grad;
    if (!ok) fprintf(stderr, "  step failed: %s\n", moe_last_error());
    return ok;
}

static void test_steady_state_no_alloc(void) {
    if (!moe_backend_get(MOE_CUDA)) {
        CU_FAIL("no CUDA device");
        return;
    }
    moe_tensor *w = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CUDA, MOE_F32, 2, (int64_t[]){32, 24}, 1, 0, 0.1);
    moe_tensor *b = moe_tensor_zeros(MOE_LIFE_PERSIST, MOE_CUDA, MOE_F32, 1, (int64_t[]){24});
    CU_ASSERT_PTR_NOT_NULL_FATAL(w);
    CU_ASSERT_PTR_NOT_NULL_FATAL(b);
    moe_param_init(w, "w");
    moe_param_init(b, "b");
    size_t allocs_at_3 = 0;
    for (int s = 1; s <= 10; s++) {
        moe_tensor *ps[2] = {w, b};
        CU_ASSERT_EQUAL(moe_zero_grad(ps, 2), MOE_OK);
        CU_ASSERT_FATAL(step(w, b, (uint64_t)s));
        CU_ASSERT_EQUAL(moe_backend_get(MOE_CUDA)->sync(), MOE_OK);
        moe_step_reset();
        moe_mem_stats st = moe_mem_get_stats(MOE_CUDA);
        if (s == 3) allocs_at_3 = st.backend_allocs;
        if (s > 3) CU_ASSERT_EQUAL(st.backend_allocs, allocs_at_3);
        if (s == 10)
            fprintf(stderr, "  backend allocs %zu, step peak %zu bytes, arena %zu bytes\n", st.backend_allocs,
                    st.step_peak, st.step_capacity);
    }
    moe_tensor_free(w);
    moe_tensor_free(b);
}

static void test_round_trip(void) {
    if (!moe_backend_get(MOE_CUDA)) {
        CU_FAIL("no CUDA device");
        return;
    }
    double src[6] = {1.5, -2.25, 3.0, 1e-3, -7.0, 42.0}, back[6] = {0};
    moe_tensor *h = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){2, 3}, src);
    moe_tensor *d = moe_tensor_to(h, MOE_CUDA, MOE_LIFE_STEP);
    CU_ASSERT_PTR_NOT_NULL_FATAL(d);
    moe_tensor *f = moe_tensor_empty(MOE_LIFE_STEP, MOE_CUDA, MOE_F32, 2, (int64_t[]){2, 3});
    CU_ASSERT_EQUAL_FATAL(moe_tensor_copy_(f, d), MOE_OK); /* f64 -> f32 cast on the device */
    CU_ASSERT_EQUAL_FATAL(moe_tensor_to_host_f64(f, back), MOE_OK);
    for (int i = 0; i < 6; i++) CU_ASSERT_DOUBLE_EQUAL(back[i], (double)(float)src[i], 0);
    moe_step_reset();
}

static void test_staged_copies(void) {
    enum { COPIES = 40, N = 1 << 18 }; /* 40 MiB of f32 in all: more than the 32 MiB ring */
    static float host[N];
    moe_tensor *d[COPIES];
    for (int c = 0; c < COPIES; c++) {
        for (int i = 0; i < N; i++) host[i] = (float)(c * 1000 + i % 997);
        /* host[] is overwritten right after the call returns */
        d[c] = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CUDA, MOE_F32, 1, (int64_t[]){N}, host);
        CU_ASSERT_PTR_NOT_NULL_FATAL(d[c]);
    }
    static double back[N];
    int bad = 0;
    for (int c = 0; c < COPIES; c++) {
        CU_ASSERT_EQUAL_FATAL(moe_tensor_to_host_f64(d[c], back), MOE_OK);
        for (int i = 0; i < N; i++) bad += back[i] != (double)(c * 1000 + i % 997);
    }
    CU_ASSERT_EQUAL(bad, 0);
    moe_step_reset();
}

static void test_index_fault_reported(void) {
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_STEP, MOE_CUDA, MOE_F32, 2, (int64_t[]){4, 3}, 1, 0, 1.0);
    int32_t ids[3] = {1, 9, 2};
    moe_tensor *idx = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CUDA, MOE_I32, 1, (int64_t[]){3}, ids);
    CU_ASSERT_PTR_NOT_NULL_FATAL(idx);
    moe_tensor *y = moe_index_select(x, idx); /* launches without a host wait */
    CU_ASSERT_PTR_NOT_NULL(y);
    CU_ASSERT_EQUAL(moe_device_sync(MOE_CUDA), MOE_ERR_INVALID);
    const char *msg = moe_last_error();
    fprintf(stderr, "  reported: %s\n", msg);
    CU_ASSERT(strstr(msg, "index_select") && strstr(msg, "index 9 at position 1") && strstr(msg, "[0, 4)"));
    CU_ASSERT_EQUAL(moe_device_sync(MOE_CUDA), MOE_OK); /* reported once */
    moe_step_reset();
}

enum { FL = 6, FT = 128, FD = 64, FF = 192 };

/* One step of x <- x + swiglu(x w13[l]) w2[l] over FL layers, loss sum(x * r); the grads
 * of every w13 and w2 (host f64, [FL][3 FD FF]); returns the step's live peak. */
static size_t stack_step(moe_tensor **w, bool free_forward, double *g) {
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_STEP, MOE_CUDA, MOE_F32, 2, (int64_t[]){FT, FD}, 11, 0, 1.0);
    moe_tensor *r = moe_tensor_randn(MOE_LIFE_STEP, MOE_CUDA, MOE_F32, 2, (int64_t[]){FT, FD}, 12, 0, 1.0);
    for (int l = 0; l < FL; l++) x = moe_add(x, moe_matmul(moe_swiglu(moe_matmul(x, w[2 * l])), w[2 * l + 1]));
    moe_tensor *loss = moe_sum_all(moe_mul(x, r));
    CU_ASSERT_EQUAL_FATAL(free_forward ? moe_backward_freeing(loss) : moe_backward(loss), MOE_OK);
    CU_ASSERT_EQUAL(moe_device_sync(MOE_CUDA), MOE_OK);
    size_t peak = moe_mem_get_stats(MOE_CUDA).step_peak;
    for (int i = 0; i < 2 * FL; i++) {
        CU_ASSERT_EQUAL(moe_tensor_to_host_f64(w[i]->grad, g), MOE_OK);
        g += moe_tensor_numel(w[i]);
    }
    return peak;
}

static void test_freeing_backward(void) {
    if (!moe_backend_get(MOE_CUDA)) {
        CU_FAIL("no CUDA device");
        return;
    }
    moe_tensor *w[2 * FL];
    for (int l = 0; l < FL; l++) {
        w[2 * l] = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CUDA, MOE_F32, 2, (int64_t[]){FD, 2 * FF}, 20 + (uint64_t)l, 0, 0.1);
        w[2 * l + 1] = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CUDA, MOE_F32, 2, (int64_t[]){FF, FD}, 40 + (uint64_t)l, 0, 0.1);
        moe_param_init(w[2 * l], "w13");
        moe_param_init(w[2 * l + 1], "w2");
    }
    const size_t n = (size_t)FL * 3 * FD * FF;
    double *g[2] = {calloc(n, sizeof(double)), calloc(n, sizeof(double))};
    size_t peak[2], allocs = 0;
    moe_step_reset();
    moe_mem_set_poison(true);
    for (int step = 0; step < 4; step++) { /* keeping, then freeing three times: sizing, snug, steady */
        bool fr = step > 0;
        if (step == 1) moe_mem_set_snug(true); /* the first freeing step sizes the arena to its peak */
        CU_ASSERT_EQUAL(moe_zero_grad(w, 2 * FL), MOE_OK);
        moe_mem_reset_peaks(MOE_CUDA);
        peak[fr] = stack_step(w, fr, g[fr]);
        moe_step_reset();
        if (step == 2) allocs = moe_mem_get_stats(MOE_CUDA).backend_allocs;
    }
    CU_ASSERT_EQUAL(moe_mem_get_stats(MOE_CUDA).backend_allocs, allocs); /* the last step fit */
    moe_mem_set_poison(false);
    moe_mem_set_snug(false);
    CU_ASSERT_EQUAL(memcmp(g[0], g[1], sizeof(double) * n), 0);
    fprintf(stderr, "  step peak: keeping %zu bytes, freeing %zu bytes\n", peak[0], peak[1]);
    CU_ASSERT(peak[1] * 4 < peak[0] * 3);
    free(g[0]);
    free(g[1]);
    for (int i = 0; i < 2 * FL; i++) moe_tensor_free(w[i]);
}

static void register_suites(void) {
    moe_test_add_suite("cuda_memory", (moe_test_entry[]){{"steady-state steps never allocate", test_steady_state_no_alloc},
                                                          {"host/device round trip", test_round_trip},
                                                          {"staged host-to-device copies", test_staged_copies},
                                                          {"out-of-range index reported at sync", test_index_fault_reported},
                                                          {"freeing backward", test_freeing_backward},
                                                          {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
