/* CUDA parity: every op case runs on the CPU (f32) and on CUDA (f32, and bf16 when all
 * its inputs are float), forward output and input grads compared by normalised error.
 * A kernel missing on CUDA makes its cases fail with the dispatcher's message. Plus the
 * out-of-memory path of the CUDA allocator. MOE_TEST_OPS=op1,op2 runs only those ops'
 * cases (scripts/gpu-check.sh --racecheck). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/cuda_info.h"
#include "core/kernels.h"
#include "core/memory.h"
#include "tests/harness/opcheck.h"
#include "tests/harness/testlib.h"

static bool all_float_inputs(const op_case *c) {
    for (int j = 0; j < c->n_in; j++)
        if (c->in[j].kind == IN_INDEX) return false;
    return true;
}

/* MOE_TEST_OPS=a,b: only the cases of these ops (e.g. for a compute-sanitizer run). */
static bool op_selected(const char *op) {
    const char *list = getenv("MOE_TEST_OPS");
    if (!list || !*list) return true;
    size_t n = strlen(op);
    for (const char *p = list; (p = strstr(p, op)); p += n)
        if ((p == list || p[-1] == ',') && (p[n] == ',' || p[n] == '\0')) return true;
    return false;
}

static void test_parity_all(void) {
    if (!moe_backend_get(MOE_CUDA)) {
        fprintf(stderr, "  no CUDA device: %s\n", moe_last_error());
        CU_FAIL("no CUDA device");
        return;
    }
    fprintf(stderr, "  %s\n", moe_cuda_describe());
    int ran = 0, failed = 0;
    for (int l = 0; l < moe_op_case_list_count; l++) {
        for (int i = 0; i < moe_op_case_lists[l]->n; i++) {
            const op_case *c = &moe_op_case_lists[l]->cases[i];
            if (!op_selected(c->op)) continue;
            moe_dtype dts[2] = {MOE_F32, MOE_BF16};
            int ndt = all_float_inputs(c) && !c->f32_parity_only ? 2 : 1;
            for (int k = 0; k < ndt; k++) {
                for (uint64_t seed = 1; seed <= 2; seed++) {
                    char why[512] = "";
                    ran++;
                    if (!opcheck_parity(c, MOE_CUDA, dts[k], seed, why, sizeof why)) {
                        fprintf(stderr, "  FAIL %s / %s (%s, seed %llu): %s\n", c->op, c->name,
                                moe_dtype_name(dts[k]), (unsigned long long)seed, why);
                        failed++;
                    }
                }
            }
        }
    }
    moe_step_reset();
    fprintf(stderr, "  parity: %d cases, %d failed\n", ran, failed);
    CU_ASSERT(ran > 0);
    CU_ASSERT_EQUAL(failed, 0);
}

static void test_oom_message(void) {
    const moe_backend *be = moe_backend_get(MOE_CUDA);
    CU_ASSERT_PTR_NOT_NULL_FATAL(be);
    moe_error_clear();
    void *p = be->alloc((size_t)1 << 50); /* 1 PiB */
    CU_ASSERT_PTR_NULL(p);
    CU_ASSERT_EQUAL(moe_last_status(), MOE_ERR_OOM);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "free"));
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "cuda"));
    fprintf(stderr, "  1 PiB: %s\n", moe_last_error());
    /* the device still works afterwards */
    int64_t s[1] = {4};
    moe_tensor *t = moe_tensor_zeros(MOE_LIFE_PERSIST, MOE_CUDA, MOE_F32, 1, s);
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    CU_ASSERT_EQUAL(moe_tensor_fill(t, 2.5), MOE_OK);
    double h[4] = {0};
    CU_ASSERT_EQUAL(moe_tensor_to_host_f64(t, h), MOE_OK);
    CU_ASSERT_DOUBLE_EQUAL(h[3], 2.5, 0);
    moe_tensor_free(t);
    moe_step_reset();
}

/* index_copy_'s source: a transposed view (copied first) or a slice of columns of a wider
 * matrix (read in place through its row stride). Rows of 8 are 16-byte units (in f32 and
 * bf16, the slice aligned too), rows of 5 are not. */
static moe_tensor *index_copy_source(moe_device where, moe_dtype dt, int64_t N, int64_t R, bool column_slice) {
    if (column_slice) {
        const int64_t wide = R == 8 ? 16 : R + 3, start = R == 8 ? 8 : 2;
        return moe_slice(moe_tensor_randn(MOE_LIFE_STEP, where, dt, 2, (int64_t[]){N, wide}, 63, 0, 1.0), 1, start,
                         start + R);
    }
    return moe_transpose(moe_tensor_randn(MOE_LIFE_STEP, where, dt, 2, (int64_t[]){R, N}, 62, 0, 1.0), 0, 1);
}

/* moe_index_copy_ on CUDA equals the CPU (f32 and bf16 rows, device and host indices, a
 * transposed source and a slice of columns); a device index out of range is reported at
 * the next synchronisation and a host one at once, dst untouched. */
static void test_index_copy(void) {
    const int64_t M = 9, N = 4;
    const int32_t rows[4] = {7, 0, 3, 8};
    const moe_dtype dts[2] = {MOE_F32, MOE_BF16};
    for (int d = 0; d < 2; d++) {
        for (int variant = 0; variant < 8; variant++) {
            const bool on_dev = variant & 1, column_slice = variant & 2;
            const int64_t R = variant & 4 ? 8 : 5;
            double want[72], got[72];
            for (int dev = 0; dev < 2; dev++) {
                moe_device where = dev ? MOE_CUDA : MOE_CPU;
                moe_dtype dt = dev ? dts[d] : MOE_F32;
                moe_tensor *dst = moe_tensor_randn(MOE_LIFE_STEP, where, dt, 2, (int64_t[]){M, R}, 61, 0, 1.0);
                moe_tensor *src = index_copy_source(where, dt, N, R, column_slice);
                moe_tensor *idx = moe_tensor_from_host(MOE_LIFE_STEP, dev && on_dev ? MOE_CUDA : MOE_CPU, MOE_I32, 1,
                                                       (int64_t[]){N}, rows);
                CU_ASSERT_EQUAL_FATAL(moe_index_copy_(dst, idx, src), MOE_OK);
                CU_ASSERT_EQUAL_FATAL(moe_tensor_to_host_f64(dst, dev ? got : want), MOE_OK);
            }
            /* the same draws rounded to bf16 on CUDA: compare after rounding the CPU side */
            double e = 0;
            for (int i = 0; i < M * R; i++) e = fmax(e, fabs(got[i] - want[i]) / fmax(1.0, fabs(want[i])));
            CU_ASSERT(e <= (dts[d] == MOE_BF16 ? 1e-2 : 0));
        }
    }
    const int64_t R = 5;
    moe_tensor *dst = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CUDA, MOE_F32, 2, (int64_t[]){M, R});
    moe_tensor *src = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CUDA, MOE_F32, 2, (int64_t[]){2, R});
    const int32_t bad[2] = {1, 9};
    moe_tensor *bad_dev = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CUDA, MOE_I32, 1, (int64_t[]){2}, bad);
    moe_tensor *bad_host = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, (int64_t[]){2}, bad);
    CU_ASSERT_EQUAL(moe_index_copy_(dst, bad_host, src), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "index_copy_"));
    moe_status st = moe_index_copy_(dst, bad_dev, src);
    double h[45];
    if (st == MOE_OK) st = moe_tensor_to_host_f64(dst, h); /* the synchronisation reports it */
    CU_ASSERT_EQUAL(st, MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "index_copy"));
    moe_step_reset();
}

static void register_suites(void) {
    moe_test_add_suite("cuda_ops", (moe_test_entry[]){{"parity of every op case", test_parity_all},
                                                       {"out of memory", test_oom_message},
                                                       {"index_copy_ against the CPU", test_index_copy},
                                                       {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
