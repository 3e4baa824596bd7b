/* Process groups and collectives over MPI: run by ctest under `mpirun -np 4`. Every case
 * loops over the expert-parallel sizes that divide the world (1, 2, 4 with 4 ranks) and
 * checks exact values: which ranks a group sums over, every byte an all-to-all-v
 * delivers, and the failure that moe_dist_check_all hands to every rank. */
#include "core/dist.h"
#include "tests/harness/testlib.h"

#include <string.h>
#include <unistd.h>

static const int ep_choices[] = {1, 2, 4};
#define N_EP_CHOICES ((int)(sizeof ep_choices / sizeof ep_choices[0]))

/* Rebuilds the groups for ep_choices[i]; false when that size does not divide the world. */
static bool use_ep(int i) {
    int ep = ep_choices[i];
    if (moe_dist_world_size() % ep != 0) return false;
    CU_ASSERT_EQUAL_FATAL(moe_dist_set_expert_parallel(ep), MOE_OK);
    return true;
}

static void test_group_ranks(void) {
    int r = moe_dist_world_rank(), n = moe_dist_world_size();
    CU_ASSERT_EQUAL(moe_dist_is_root(), r == 0);
    for (int i = 0; i < N_EP_CHOICES; i++) {
        if (!use_ep(i)) continue;
        int ep = ep_choices[i];
        CU_ASSERT_EQUAL(moe_dist_ep_size(), ep);
        CU_ASSERT_EQUAL(moe_dist_ep_rank(), r % ep);
        CU_ASSERT_EQUAL(moe_dist_dp_size(), n / ep);
        CU_ASSERT_EQUAL(moe_dist_dp_rank(), r / ep);
        int64_t first, end;
        moe_dist_expert_range(8, &first, &end);
        CU_ASSERT_EQUAL(first, (r % ep) * 8 / ep);
        CU_ASSERT_EQUAL(end, (r % ep + 1) * 8 / ep);
    }
}

static void test_bad_expert_parallel(void) {
    CU_ASSERT_EQUAL_FATAL(moe_dist_set_expert_parallel(2), MOE_OK);
    int n = moe_dist_world_size();
    int bad[] = {0, n + 1, 3};
    for (int i = 0; i < 3; i++) {
        if (bad[i] > 0 && n % bad[i] == 0) continue;
        CU_ASSERT_EQUAL(moe_dist_set_expert_parallel(bad[i]), MOE_ERR_CONFIG);
        char want[64];
        snprintf(want, sizeof want, "expert_parallel = %d does not divide the world size %d",
                 bad[i], n);
        CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), want));
        CU_ASSERT_EQUAL(moe_dist_ep_size(), 2); /* the previous groups are kept */
    }
    /* Ranks that disagree are told so instead of hanging in the splits. */
    int mixed = moe_dist_world_rank() == 0 ? 1 : 2;
    CU_ASSERT_EQUAL(moe_dist_set_expert_parallel(mixed), MOE_ERR_DIST);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "ranks disagree on expert_parallel"));
    CU_ASSERT_EQUAL(moe_dist_ep_size(), 2);
}

/* Sum over all ranks r of (r * 100 + i), for each dtype. */
static void test_allreduce_tensor(void) {
    int r = moe_dist_world_rank(), n = moe_dist_world_size();
    moe_dtype dts[] = {MOE_F32, MOE_F64, MOE_I32, MOE_I64};
    int64_t shape[2] = {3, 5};
    for (int k = 0; k < 4; k++) {
        double host[15];
        for (int i = 0; i < 15; i++) host[i] = r * 100 + i;
        moe_tensor *t = moe_tensor_from_host(MOE_LIFE_PERSIST, MOE_CPU, MOE_F64, 2, shape, host);
        moe_tensor *u = moe_tensor_to(t, MOE_CPU, MOE_LIFE_PERSIST);
        moe_tensor_free(t);
        moe_tensor *c = moe_tensor_empty(MOE_LIFE_PERSIST, MOE_CPU, dts[k], 2, shape);
        CU_ASSERT_EQUAL_FATAL(moe_tensor_copy_(c, u), MOE_OK);
        moe_tensor_free(u);
        CU_ASSERT_EQUAL(moe_dist_allreduce_sum(MOE_GROUP_WORLD, c), MOE_OK);
        CU_ASSERT_EQUAL(moe_tensor_to_host_f64(c, host), MOE_OK);
        for (int i = 0; i < 15; i++) CU_ASSERT_EQUAL(host[i], 100.0 * n * (n - 1) / 2 + n * i);
        moe_tensor_free(c);
    }
}

static void test_allreduce_rejects(void) {
    int64_t shape[2] = {4, 6};
    moe_tensor *t = moe_tensor_zeros(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, 2, shape);
    int64_t vshape[2] = {6, 4}, vstrides[2] = {1, 6};
    moe_tensor *v = moe_tensor_view_raw(t, 2, vshape, vstrides, 0);
    CU_ASSERT_EQUAL(moe_dist_allreduce_sum(MOE_GROUP_WORLD, v), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "moe_dist_allreduce_sum"));
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "not contiguous"));
    moe_tensor *b = moe_tensor_zeros(MOE_LIFE_PERSIST, MOE_CPU, MOE_BF16, 2, shape);
    CU_ASSERT_EQUAL(moe_dist_allreduce_sum(MOE_GROUP_WORLD, b), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "bf16"));
    moe_tensor_free(b);
    moe_tensor_free(t);
}

/* Each rank contributes bit (1 << world rank): the sum names exactly the ranks summed. */
static void test_allreduce_groups(void) {
    int r = moe_dist_world_rank(), n = moe_dist_world_size();
    for (int i = 0; i < N_EP_CHOICES; i++) {
        if (!use_ep(i)) continue;
        int ep = ep_choices[i];
        int64_t ep_mask = 0, dp_mask = 0, world_mask = ((int64_t)1 << n) - 1;
        for (int q = 0; q < n; q++) {
            if (q / ep == r / ep) ep_mask |= (int64_t)1 << q;
            if (q % ep == r % ep) dp_mask |= (int64_t)1 << q;
        }
        int64_t v[3] = {(int64_t)1 << r, (int64_t)1 << r, (int64_t)1 << r};
        CU_ASSERT_EQUAL(moe_dist_allreduce_i64(MOE_GROUP_EP, &v[0], 1), MOE_OK);
        CU_ASSERT_EQUAL(moe_dist_allreduce_i64(MOE_GROUP_DP, &v[1], 1), MOE_OK);
        CU_ASSERT_EQUAL(moe_dist_allreduce_i64(MOE_GROUP_WORLD, &v[2], 1), MOE_OK);
        CU_ASSERT_EQUAL(v[0], ep_mask);
        CU_ASSERT_EQUAL(v[1], dp_mask);
        CU_ASSERT_EQUAL(v[2], world_mask);
        double d[2] = {0.5 * (1 << r), r};
        CU_ASSERT_EQUAL(moe_dist_allreduce_f64(MOE_GROUP_EP, d, 2), MOE_OK);
        CU_ASSERT_EQUAL(d[0], 0.5 * (double)ep_mask);
        int rank_sum = 0;
        for (int q = 0; q < n; q++) rank_sum += q / ep == r / ep ? q : 0;
        CU_ASSERT_EQUAL(d[1], rank_sum);
    }
}

static void test_broadcast(void) {
    int r = moe_dist_world_rank();
    for (int i = 0; i < N_EP_CHOICES; i++) {
        if (!use_ep(i)) continue;
        moe_dist_group groups[] = {MOE_GROUP_WORLD, MOE_GROUP_EP, MOE_GROUP_DP};
        for (int k = 0; k < 3; k++) {
            moe_dist_group g = groups[k];
            int root = moe_dist_size(g) - 1;
            unsigned char buf[1001];
            for (int j = 0; j < (int)sizeof buf; j++) buf[j] = (unsigned char)(r * 31 + j);
            CU_ASSERT_EQUAL(moe_dist_broadcast(g, root, buf, sizeof buf), MOE_OK);
            /* The root's world rank + 1, summed over the group (the others add 0). */
            int64_t root_world = moe_dist_rank(g) == root ? r + 1 : 0;
            CU_ASSERT_EQUAL(moe_dist_allreduce_i64(g, &root_world, 1), MOE_OK);
            int bad = 0;
            for (int j = 0; j < (int)sizeof buf; j++)
                bad += buf[j] != (unsigned char)((root_world - 1) * 31 + j);
            CU_ASSERT_EQUAL(bad, 0);
        }
    }
}

/* Row j (d = 5 floats) that world rank src sends to group rank dst. */
static float row_value(int src, int dst, int j, int k) {
    return (float)(src * 100000 + dst * 1000 + j * 10 + k);
}

/* Every rank sends counts(me, p) rows to each group peer p and checks every value it gets. */
static void exchange_and_check(moe_dist_group g, int64_t (*counts)(int from, int to)) {
    enum { D = 5 };
    int me = moe_dist_rank(g), size = moe_dist_size(g);
    int my_world = moe_dist_world_rank();
    int64_t send_counts[8], recv_counts[8], want_recv[8], total_send = 0, total_recv = 0;
    for (int p = 0; p < size; p++) {
        send_counts[p] = counts(me, p);
        want_recv[p] = counts(p, me);
        total_send += send_counts[p];
        total_recv += want_recv[p];
    }
    CU_ASSERT_EQUAL_FATAL(moe_dist_alltoall_counts(g, send_counts, recv_counts), MOE_OK);
    for (int p = 0; p < size; p++) CU_ASSERT_EQUAL(recv_counts[p], want_recv[p]);
    /* The world rank of each group peer, to predict the rows it sends. */
    int64_t peer_world[8] = {0};
    peer_world[me] = my_world;
    CU_ASSERT_EQUAL(moe_dist_allreduce_i64(g, peer_world, size), MOE_OK);

    float *send = malloc((size_t)(total_send + 1) * D * sizeof(float));
    float *recv = malloc((size_t)(total_recv + 1) * D * sizeof(float));
    float *s = send;
    for (int p = 0; p < size; p++)
        for (int j = 0; j < send_counts[p]; j++)
            for (int k = 0; k < D; k++) *s++ = row_value(my_world, p, j, k);
    for (int64_t i = 0; i < (total_recv + 1) * D; i++) recv[i] = -1.0f;
    CU_ASSERT_EQUAL(moe_dist_alltoallv(g, send, send_counts, recv, recv_counts,
                                       D * (int64_t)sizeof(float)), MOE_OK);
    int bad = 0;
    const float *q = recv;
    for (int p = 0; p < size; p++)
        for (int j = 0; j < recv_counts[p]; j++)
            for (int k = 0; k < D; k++) bad += *q++ != row_value((int)peer_world[p], me, j, k);
    for (int k = 0; k < D; k++) bad += *q++ != -1.0f; /* nothing past the last row */
    CU_ASSERT_EQUAL(bad, 0);
    free(send);
    free(recv);
}

static int64_t counts_uneven(int from, int to) { return (from + 2 * to) % 3; } /* has zeros */
static int64_t counts_to_first(int from, int to) { return to == 0 ? 7 * (from + 1) : 0; }
static int64_t counts_none(int from, int to) { return 0; }
static int64_t counts_self_only(int from, int to) { return from == to ? 4 : 0; }

static void test_alltoallv(void) {
    int64_t (*patterns[])(int, int) = {counts_uneven, counts_to_first, counts_none,
                                       counts_self_only};
    for (int i = 0; i < N_EP_CHOICES; i++) {
        if (!use_ep(i)) continue;
        moe_dist_group groups[] = {MOE_GROUP_EP, MOE_GROUP_DP, MOE_GROUP_WORLD};
        for (int k = 0; k < 3; k++)
            for (int p = 0; p < 4; p++) exchange_and_check(groups[k], patterns[p]);
    }
}

static void test_alltoallv_rejects(void) {
    CU_ASSERT_EQUAL_FATAL(moe_dist_set_expert_parallel(moe_dist_world_size()), MOE_OK);
    int64_t counts[8] = {0}, recv[8] = {0};
    float buf[4];
    counts[1] = -1;
    CU_ASSERT_EQUAL(moe_dist_alltoallv(MOE_GROUP_EP, buf, counts, buf + 2, recv, 4),
                    MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "negative row count for peer 1"));
    counts[1] = 0;
    CU_ASSERT_EQUAL(moe_dist_alltoallv(MOE_GROUP_EP, buf, counts, buf + 2, recv,
                                       (int64_t)1 << 31), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "exceed MPI's int counts"));
    counts[0] = (int64_t)1 << 40;
    CU_ASSERT_EQUAL(moe_dist_alltoallv(MOE_GROUP_EP, buf, counts, buf + 2, recv,
                                       (int64_t)1 << 30), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "overflow"));
}

static void test_check_all(void) {
    int r = moe_dist_world_rank(), last = moe_dist_world_size() - 1;
    moe_error_clear();
    CU_ASSERT_EQUAL(moe_dist_check_all(MOE_OK), MOE_OK);

    /* The last rank (3) hits a NaN; everyone learns it, with its message. */
    moe_status local = MOE_OK;
    if (r == last) local = moe_error(MOE_ERR_NUMERIC, "loss is NaN at step 7");
    CU_ASSERT_EQUAL(moe_dist_check_all(local), MOE_ERR_NUMERIC);
    char want[128];
    snprintf(want, sizeof want, "rank %d failed: loss is NaN at step 7", last);
    CU_ASSERT_STRING_EQUAL(moe_last_error(), want);

    /* Ranks 1 and 3 fail: the lowest one's status and message win, the other is named. */
    local = MOE_OK;
    if (r == 1) local = moe_error(MOE_ERR_IO, "cannot write run/ckpt.h5");
    if (r == last) local = moe_error(MOE_ERR_NUMERIC, "grad norm is Inf");
    CU_ASSERT_EQUAL(moe_dist_check_all(local), MOE_ERR_IO);
    snprintf(want, sizeof want, "rank 1 failed: cannot write run/ckpt.h5 (other failing "
             "ranks: %d)", last);
    CU_ASSERT_STRING_EQUAL(moe_last_error(), want);
}

/* A rank whose receive is shorter than what is sent gets MPI's error as a status; the
 * step-boundary check then tells every rank. */
static void test_mpi_error_is_status(void) {
    CU_ASSERT_EQUAL_FATAL(moe_dist_set_expert_parallel(2), MOE_OK);
    int me = moe_dist_ep_rank();
    int64_t send_counts[2] = {0, 0}, recv_counts[2] = {0, 0};
    float send[8] = {0}, recv[8];
    if (me == 0) send_counts[1] = 2; /* sends 2 rows to EP rank 1, which expects 1 */
    if (me == 1) recv_counts[0] = 1;
    moe_status s = moe_dist_alltoallv(MOE_GROUP_EP, send, send_counts, recv, recv_counts,
                                      2 * sizeof(float));
    if (me == 1) {
        CU_ASSERT_EQUAL(s, MOE_ERR_DIST);
        CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "moe_dist_alltoallv over the EP group "
                                                        "(rank 1 of 2) failed: "));
    }
    moe_status all = moe_dist_check_all(s);
    CU_ASSERT_EQUAL(all, MOE_ERR_DIST);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "rank 1 failed: moe_dist_alltoallv over "
                                                    "the EP group"));
}

static void test_log_file(void) {
    int r = moe_dist_world_rank(), n = moe_dist_world_size();
    char dir[512] = "";
    if (r == 0) snprintf(dir, sizeof dir, "%s/logs", moe_test_tmpdir("dist"));
    CU_ASSERT_EQUAL_FATAL(moe_dist_broadcast(MOE_GROUP_WORLD, 0, dir, sizeof dir), MOE_OK);
    FILE *f = moe_dist_log_file(dir);
    if (!f) fprintf(stderr, "%s\n", moe_last_error());
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    fprintf(f, "hello from %d\n", r);
    fclose(f);
    int64_t done = 1;
    CU_ASSERT_EQUAL(moe_dist_allreduce_i64(MOE_GROUP_WORLD, &done, 1), MOE_OK);
    CU_ASSERT_EQUAL(done, n);
    if (r != 0) return;
    for (int q = 0; q < n; q++) {
        char path[600], line[64] = "", want[64];
        snprintf(path, sizeof path, "%s/rank-%d.log", dir, q);
        FILE *in = fopen(path, "r");
        CU_ASSERT_PTR_NOT_NULL_FATAL(in);
        CU_ASSERT_PTR_NOT_NULL(fgets(line, sizeof line, in));
        fclose(in);
        snprintf(want, sizeof want, "hello from %d\n", q);
        CU_ASSERT_STRING_EQUAL(line, want);
    }
}

static void register_suites(void) {
    moe_test_add_suite("dist", (moe_test_entry[]){
        {"group_ranks", test_group_ranks},
        {"bad_expert_parallel", test_bad_expert_parallel},
        {"allreduce_tensor", test_allreduce_tensor},
        {"allreduce_rejects", test_allreduce_rejects},
        {"allreduce_groups", test_allreduce_groups},
        {"broadcast", test_broadcast},
        {"alltoallv", test_alltoallv},
        {"alltoallv_rejects", test_alltoallv_rejects},
        {"check_all", test_check_all},
        {"mpi_error_is_status", test_mpi_error_is_status},
        {"log_file", test_log_file},
        {NULL, NULL}});
}

int main(int argc, char **argv) {
    moe_status s = moe_dist_init(&argc, &argv, 1);
    if (s != MOE_OK) moe_dist_abort(s, moe_last_error());
    if (moe_dist_world_size() < 4 || moe_dist_world_size() % 2 != 0)
        moe_dist_abort(MOE_ERR_CONFIG, "test_mpi_dist needs an even number of ranks >= 4 "
                       "(mpirun -np 4)");
    /* A failure on any rank fails every rank, so mpirun's exit code is the verdict. */
    int64_t failed = moe_test_main(argc, argv, register_suites) != 0;
    if (moe_dist_allreduce_i64(MOE_GROUP_WORLD, &failed, 1) != MOE_OK) failed = 1;
    moe_dist_finalize();
    return failed ? 1 : 0;
}
