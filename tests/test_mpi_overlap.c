/* Gradient communication overlapped with the backward (run by ctest under mpirun -np 4):
 * the autograd readiness hook reports each parameter once, as soon as its grad is final;
 * all-reduces started with moe_dist_allreduce_sum_start (several outstanding, on every
 * group, across blocking collectives and the all-to-all of a backward) give the sums of
 * the blocking ones on CPU copies; the tensor all-to-all delivers every row; the
 * communication counters count it. The collective cases also run on CUDA tensors (NCCL)
 * with MOE_TEST_CUDA=1, one rank per GPU, e.g. on a GPU machine:
 *   MOE_TEST_CUDA=1 mpirun -np 2 build-gpu/tests/test_mpi_overlap */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/device.h"
#include "core/dist.h"
#include "core/memory.h"
#include "core/ops.h"
#include "tests/harness/testlib.h"

static const int ep_choices[] = {1, 2, 4};
#define N_EP_CHOICES ((int)(sizeof ep_choices / sizeof ep_choices[0]))

/* Largest |a - b| relative to the largest |b| of two tensors on any devices (sums in
 * another order differ in the last bits). */
static double max_rel(const moe_tensor *a, const moe_tensor *b) {
    int64_t n = moe_tensor_numel(b);
    double *x = malloc(sizeof(double) * (size_t)n), *y = malloc(sizeof(double) * (size_t)n), num = 0, den = 0;
    CU_ASSERT_FATAL(x && y && moe_tensor_numel(a) == n);
    CU_ASSERT_EQUAL(moe_tensor_to_host_f64(a, x), MOE_OK);
    CU_ASSERT_EQUAL(moe_tensor_to_host_f64(b, y), MOE_OK);
    for (int64_t i = 0; i < n; i++) {
        num = fmax(num, fabs(x[i] - y[i]));
        den = fmax(den, fabs(y[i]));
    }
    free(x);
    free(y);
    return num / fmax(den, 1e-30);
}

static moe_tensor *param(moe_device dev, int rows, int cols, uint64_t seed, const char *name) {
    moe_tensor *t = moe_tensor_randn(MOE_LIFE_PERSIST, dev, MOE_F32, 2, (int64_t[]){rows, cols}, seed, 0, 0.5);
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    moe_param_init(t, name);
    return t;
}

/* What the hook saw: the order of the reports and each grad's value when reported. */
enum { MAX_SEEN = 8 };
typedef struct {
    int n;
    moe_tensor *who[MAX_SEEN];
    double first_value[MAX_SEEN];
} seen_log;

static void log_ready(moe_tensor *p, void *user) {
    seen_log *s = user;
    CU_ASSERT_FATAL(s->n < MAX_SEEN);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p->grad);
    s->who[s->n] = p;
    s->first_value[s->n++] = ((const float *)p->grad->data)[0];
}

static int seen_at(const seen_log *s, const moe_tensor *p) {
    for (int i = 0; i < s->n; i++)
        if (s->who[i] == p) return i;
    return -1;
}

/* loss = sum((relu(x a) a + x b) * (c * c)): a feeds two nodes far apart, b one, c twice
 * one node, d none. Reports: b and c before a (a's first use is the earliest node), each
 * once, with its final grad; d never. */
static void test_ready_hook(void) {
    moe_step_reset();
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, 2, (int64_t[]){3, 4}, 1, 0, 1.0);
    moe_tensor *a = param(MOE_CPU, 4, 4, 2, "a"), *b = param(MOE_CPU, 4, 4, 3, "b"), *c = param(MOE_CPU, 3, 4, 4, "c"),
               *d = param(MOE_CPU, 2, 2, 5, "d");
    moe_tensor *h = moe_matmul(moe_relu(moe_matmul(x, a)), a); /* one statement per step: recording order */
    h = moe_add(h, moe_matmul(x, b));
    moe_tensor *cc = moe_mul(c, c);
    moe_tensor *loss = moe_sum_all(moe_mul(h, cc));
    seen_log log = {0};
    moe_set_grad_ready_hook(log_ready, &log);
    CU_ASSERT_EQUAL(moe_backward(loss), MOE_OK);
    moe_set_grad_ready_hook(NULL, NULL);
    CU_ASSERT_EQUAL(log.n, 3);
    int ia = seen_at(&log, a), ib = seen_at(&log, b), ic = seen_at(&log, c);
    CU_ASSERT(ia >= 0 && ib >= 0 && ic >= 0);
    CU_ASSERT(ic < ib && ib < ia); /* c's node runs first in the sweep, a's first use last */
    CU_ASSERT_EQUAL(seen_at(&log, d), -1);
    moe_tensor *ps[] = {a, b, c};
    for (int i = 0; i < 3; i++) /* the value at the report is the final one */
        CU_ASSERT_EQUAL(log.first_value[seen_at(&log, ps[i])], ((const float *)ps[i]->grad->data)[0]);
    moe_tensor *all[] = {x, a, b, c, d};
    for (int i = 0; i < 5; i++) moe_tensor_free(all[i]);
    moe_step_reset();
}

/* Several sums in flight at once on every group, with blocking collectives between the
 * starts and the waits; each equals the blocking sum of CPU copies (f32 on the CPU; f32
 * and bf16 on CUDA, where the sums run on the communication stream). */
static void check_overlapped_sums(moe_device dev, moe_dtype dt) {
    int r = moe_dist_world_rank();
    moe_dist_group groups[] = {MOE_GROUP_WORLD, MOE_GROUP_DP, MOE_GROUP_EP, MOE_GROUP_WORLD};
    enum { NG = 4, N = 1000 };
    for (int i = 0; i < N_EP_CHOICES; i++) {
        if (moe_dist_world_size() % ep_choices[i]) continue;
        CU_ASSERT_EQUAL_FATAL(moe_dist_set_expert_parallel(ep_choices[i]), MOE_OK);
        moe_tensor *t[NG], *ref[NG];
        moe_dist_request *req[NG];
        for (int k = 0; k < NG; k++) {
            t[k] = moe_tensor_randn(MOE_LIFE_PERSIST, dev, dt, 1, (int64_t[]){N}, 10 + k, (uint64_t)r << 20, 1.0);
            CU_ASSERT_PTR_NOT_NULL_FATAL(t[k]);
            ref[k] = moe_tensor_empty(MOE_LIFE_PERSIST, MOE_CPU, MOE_F64, 1, (int64_t[]){N});
            CU_ASSERT_EQUAL(moe_tensor_copy_(ref[k], t[k]), MOE_OK);
            CU_ASSERT_EQUAL(moe_dist_allreduce_sum(groups[k], ref[k]), MOE_OK);
        }
        for (int k = 0; k < NG; k++) {
            CU_ASSERT_EQUAL(moe_dist_allreduce_sum_start(groups[k], t[k], &req[k]), MOE_OK);
            if (dev == MOE_CPU) CU_ASSERT_EQUAL(req[k] == NULL, moe_dist_size(groups[k]) == 1);
            int64_t one = 1; /* a blocking collective while sums are in flight */
            CU_ASSERT_EQUAL(moe_dist_allreduce_i64(MOE_GROUP_WORLD, &one, 1), MOE_OK);
            CU_ASSERT_EQUAL(one, moe_dist_world_size());
        }
        for (int k = NG - 1; k >= 0; k--) CU_ASSERT_EQUAL(moe_dist_wait(req[k]), MOE_OK);
        for (int k = 0; k < NG; k++) {
            double e = max_rel(t[k], ref[k]);
            if (!(e < (dt == MOE_BF16 ? 2e-2 : 1e-6)))
                fprintf(stderr, "rank %d: %s %s sum %d over %s differs by %.3g\n", r, moe_device_name(dev),
                        moe_dtype_name(dt), k, moe_dist_group_name(groups[k]), e);
            CU_ASSERT(e < (dt == MOE_BF16 ? 2e-2 : 1e-6));
            moe_tensor_free(t[k]);
            moe_tensor_free(ref[k]);
        }
    }
}

static void test_overlapped_sums(void) {
    check_overlapped_sums(MOE_CPU, MOE_F32);
    moe_tensor *b = moe_tensor_zeros(MOE_LIFE_PERSIST, MOE_CPU, MOE_BF16, 1, (int64_t[]){4});
    moe_dist_request *req = NULL;
    CU_ASSERT_EQUAL(moe_dist_allreduce_sum_start(MOE_GROUP_WORLD, b, &req), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NULL(req);
    moe_tensor_free(b);
}

/* x a -> all-to-all over EP -> b -> loss. b's grad is final before the all-to-all's
 * backward, a's after it: the hook starts b's world sum before the backward exchanges
 * tokens, a's after. The grads equal those of a plain backward and blocking sums. */
static moe_dist_request *pending[2];
static int n_pending;

static void start_sum(moe_tensor *p, void *user) {
    CU_ASSERT_FATAL(n_pending < 2);
    CU_ASSERT_EQUAL(moe_dist_allreduce_sum_start(MOE_GROUP_WORLD, p->grad, &pending[n_pending++]), MOE_OK);
}

static void check_sum_during_backward(moe_device dev) {
    int ep = moe_dist_world_size();
    CU_ASSERT_EQUAL_FATAL(moe_dist_set_expert_parallel(ep), MOE_OK);
    int me = moe_dist_ep_rank();
    int64_t send[8], recv[8], rows = 0, rrows = 0;
    for (int p = 0; p < ep; p++) { /* rank me sends (me + p) % 3 + 1 rows to p */
        send[p] = (me + p) % 3 + 1;
        recv[p] = (p + me) % 3 + 1;
        rows += send[p];
        rrows += recv[p];
    }
    moe_tensor *x = moe_tensor_randn(MOE_LIFE_PERSIST, dev, MOE_F32, 2, (int64_t[]){rows, 4}, 20 + me, 0, 1.0);
    moe_tensor *a = param(dev, 4, 5, 21, "a"), *b = param(dev, 5, 3, 22, "b");
    moe_tensor *got[2][2]; /* [blocking, started by the hook][a, b] */
    for (int v = 0; v < 2; v++) {
        moe_step_reset();
        moe_tensor *ps[] = {a, b};
        moe_zero_grad(ps, 2);
        moe_tensor *y = moe_all_to_all(moe_tanh(moe_matmul(x, a)), send, recv, MOE_GROUP_EP);
        CU_ASSERT_PTR_NOT_NULL_FATAL(y);
        CU_ASSERT_EQUAL(y->shape[0], rrows);
        moe_tensor *loss = moe_sum_all(moe_tanh(moe_matmul(y, b)));
        n_pending = 0;
        if (v) moe_set_grad_ready_hook(start_sum, NULL);
        CU_ASSERT_EQUAL(moe_backward(loss), MOE_OK);
        moe_set_grad_ready_hook(NULL, NULL);
        if (v) {
            CU_ASSERT_EQUAL(n_pending, 2);
            for (int k = 0; k < n_pending; k++) CU_ASSERT_EQUAL(moe_dist_wait(pending[k]), MOE_OK);
        } else {
            CU_ASSERT_EQUAL(moe_dist_allreduce_sum(MOE_GROUP_WORLD, b->grad), MOE_OK);
            CU_ASSERT_EQUAL(moe_dist_allreduce_sum(MOE_GROUP_WORLD, a->grad), MOE_OK);
        }
        for (int j = 0; j < 2; j++) got[v][j] = moe_tensor_to(ps[j]->grad, MOE_CPU, MOE_LIFE_PERSIST);
    }
    for (int j = 0; j < 2; j++) {
        CU_ASSERT(max_rel(got[1][j], got[0][j]) < 1e-6);
        moe_tensor_free(got[0][j]);
        moe_tensor_free(got[1][j]);
    }
    moe_tensor_free(x);
    moe_tensor_free(a);
    moe_tensor_free(b);
    moe_step_reset();
}

static void test_sum_during_backward(void) { check_sum_during_backward(MOE_CPU); }

/* Rows of the tensor all-to-all land where the counts say, and the counters count them. */
static void check_alltoallv_tensor(moe_device dev) {
    enum { D = 3 };
    for (int i = 0; i < N_EP_CHOICES; i++) {
        int ep = ep_choices[i];
        if (moe_dist_world_size() % ep) continue;
        CU_ASSERT_EQUAL_FATAL(moe_dist_set_expert_parallel(ep), MOE_OK);
        int me = moe_dist_ep_rank();
        int64_t send[8], recv[8], rows = 0, rrows = 0;
        for (int p = 0; p < ep; p++) {
            send[p] = (2 * me + p) % 3; /* zeros included */
            recv[p] = (2 * p + me) % 3;
            rows += send[p];
            rrows += recv[p];
        }
        float sv[64], want[64];
        int64_t at = 0;
        for (int p = 0; p < ep; p++)
            for (int j = 0; j < send[p]; j++, at++)
                for (int k = 0; k < D; k++) sv[at * D + k] = (float)(me * 1000 + p * 100 + j * 10 + k);
        at = 0;
        for (int p = 0; p < ep; p++)
            for (int j = 0; j < recv[p]; j++, at++)
                for (int k = 0; k < D; k++) want[at * D + k] = (float)(p * 1000 + me * 100 + j * 10 + k);
        moe_tensor *s = moe_tensor_from_host(MOE_LIFE_PERSIST, dev, MOE_F32, 2, (int64_t[]){rows, D}, sv);
        moe_tensor *o = moe_tensor_zeros(MOE_LIFE_PERSIST, dev, MOE_F32, 2, (int64_t[]){rrows, D});
        moe_tensor *w = moe_tensor_from_host(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, 2, (int64_t[]){rrows, D}, want);
        CU_ASSERT_FATAL(s && o && w);
        moe_dist_reset_stats();
        CU_ASSERT_EQUAL(moe_dist_alltoallv_tensor(MOE_GROUP_EP, s, send, o, recv), MOE_OK);
        CU_ASSERT_EQUAL(max_rel(o, w), 0);
        moe_dist_stats st = moe_dist_get_stats();
        CU_ASSERT_EQUAL(st.alltoall_calls, ep > 1);
        CU_ASSERT_EQUAL(st.alltoall_bytes, ep > 1 ? rows * D * (int64_t)sizeof(float) : 0);
        /* a receive tensor that does not hold the rows the counts announce */
        moe_tensor *short_o = moe_tensor_zeros(MOE_LIFE_PERSIST, dev, MOE_F32, 2, (int64_t[]){rrows + 1, D});
        CU_ASSERT_EQUAL(moe_dist_alltoallv_tensor(MOE_GROUP_EP, s, send, short_o, recv), MOE_ERR_INVALID);
        CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "moe_dist_alltoallv_tensor"));
        moe_tensor *all[] = {short_o, s, o, w};
        for (int k = 0; k < 4; k++) moe_tensor_free(all[k]);
    }
}

static void test_alltoallv_tensor(void) { check_alltoallv_tensor(MOE_CPU); }

static void test_cuda_sums(void) {
    CU_ASSERT_EQUAL_FATAL(moe_dist_prepare(MOE_CUDA), MOE_OK);
    check_overlapped_sums(MOE_CUDA, MOE_F32);
    check_overlapped_sums(MOE_CUDA, MOE_BF16);
}
static void test_cuda_sum_during_backward(void) { check_sum_during_backward(MOE_CUDA); }
static void test_cuda_alltoallv_tensor(void) { check_alltoallv_tensor(MOE_CUDA); }

static void register_suites(void) {
    moe_test_add_suite("overlap", (moe_test_entry[]){
        {"readiness hook", test_ready_hook},
        {"overlapped sums", test_overlapped_sums},
        {"sums during a backward with an all-to-all", test_sum_during_backward},
        {"tensor all-to-all", test_alltoallv_tensor},
        {NULL, NULL}});
    const char *cuda = getenv("MOE_TEST_CUDA");
    if (cuda && strcmp(cuda, "1") == 0 && moe_device_available(MOE_CUDA))
        moe_test_add_suite("overlap_cuda", (moe_test_entry[]){
            {"overlapped sums (NCCL)", test_cuda_sums},
            {"sums during a backward with an all-to-all (NCCL)", test_cuda_sum_during_backward},
            {"tensor all-to-all (NCCL)", test_cuda_alltoallv_tensor},
            {NULL, NULL}});
}

int main(int argc, char **argv) {
    moe_status s = moe_dist_init(&argc, &argv, 1);
    if (s != MOE_OK) moe_dist_abort(s, moe_last_error());
    if (moe_dist_world_size() > 8)
        moe_dist_abort(MOE_ERR_CONFIG, "test_mpi_overlap runs on at most 8 ranks (mpirun -np 4)");
    /* A failure on any rank fails every rank, so mpirun's exit code is the verdict. */
    int64_t failed = moe_test_main(argc, argv, register_suites) != 0;
    if (moe_dist_allreduce_i64(MOE_GROUP_WORLD, &failed, 1) != MOE_OK) failed = 1;
    moe_dist_finalize();
    return failed ? 1 : 0;
}
