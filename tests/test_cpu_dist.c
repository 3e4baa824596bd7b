/* The distributed layer in one process (run without mpirun, in either build): a world of
 * one rank before and after moe_dist_init, identity collectives, the expert-parallel
 * check, the failure agreement and moe_dist_abort's message and exit code. The cases
 * run in order: the ones before "init" see an uninitialised layer. */
#include "core/dist.h"
#include "tests/harness/testlib.h"

#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void check_world_of_one(void) {
    CU_ASSERT_EQUAL(moe_dist_world_rank(), 0);
    CU_ASSERT_EQUAL(moe_dist_world_size(), 1);
    CU_ASSERT_EQUAL(moe_dist_ep_rank(), 0);
    CU_ASSERT_EQUAL(moe_dist_ep_size(), 1);
    CU_ASSERT_EQUAL(moe_dist_dp_rank(), 0);
    CU_ASSERT_EQUAL(moe_dist_dp_size(), 1);
    CU_ASSERT_TRUE(moe_dist_is_root());
    int64_t first, end;
    moe_dist_expert_range(6, &first, &end);
    CU_ASSERT_EQUAL(first, 0);
    CU_ASSERT_EQUAL(end, 6);
}

/* Every collective is an identity on a world of one rank. */
static void check_identity_collectives(void) {
    int64_t shape[2] = {2, 3};
    float vals[6] = {1, -2, 3.5f, 4, 5, 6};
    moe_tensor *t = moe_tensor_from_host(MOE_LIFE_PERSIST, MOE_CPU, MOE_F32, 2, shape, vals);
    moe_dist_group groups[] = {MOE_GROUP_WORLD, MOE_GROUP_EP, MOE_GROUP_DP};
    for (int k = 0; k < 3; k++) {
        moe_dist_group g = groups[k];
        CU_ASSERT_EQUAL(moe_dist_allreduce_sum(g, t), MOE_OK);
        CU_ASSERT_EQUAL(memcmp(t->data, vals, sizeof vals), 0);
        double d[2] = {0.25, -3};
        int64_t c[2] = {7, 1LL << 40};
        CU_ASSERT_EQUAL(moe_dist_allreduce_f64(g, d, 2), MOE_OK);
        CU_ASSERT_EQUAL(moe_dist_allreduce_i64(g, c, 2), MOE_OK);
        CU_ASSERT(d[0] == 0.25 && d[1] == -3 && c[0] == 7 && c[1] == 1LL << 40);
        char buf[6] = "hello";
        CU_ASSERT_EQUAL(moe_dist_broadcast(g, 0, buf, sizeof buf), MOE_OK);
        CU_ASSERT_STRING_EQUAL(buf, "hello");

        int64_t send_counts[1] = {3}, recv_counts[1] = {-1};
        CU_ASSERT_EQUAL(moe_dist_alltoall_counts(g, send_counts, recv_counts), MOE_OK);
        CU_ASSERT_EQUAL(recv_counts[0], 3);
        float send[6] = {1, 2, 3, 4, 5, 6}, recv[8] = {0, 0, 0, 0, 0, 0, -7, -7};
        CU_ASSERT_EQUAL(moe_dist_alltoallv(g, send, send_counts, recv, recv_counts,
                                           2 * sizeof(float)), MOE_OK);
        CU_ASSERT_EQUAL(memcmp(recv, send, sizeof send), 0);
        CU_ASSERT(recv[6] == -7 && recv[7] == -7);
        int64_t zero[1] = {0};
        CU_ASSERT_EQUAL(moe_dist_alltoallv(g, NULL, zero, NULL, zero, 4), MOE_OK);
        /* Asking for more rows than are sent is a caller bug reported as a status. */
        int64_t more[1] = {4};
        CU_ASSERT_EQUAL(moe_dist_alltoallv(g, send, send_counts, recv, more, 2 * sizeof(float)),
                        MOE_ERR_INVALID);
        CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "sends 3 rows to itself but expects 4"));
    }
    moe_tensor *b = moe_tensor_zeros(MOE_LIFE_PERSIST, MOE_CPU, MOE_BF16, 2, shape);
    CU_ASSERT_EQUAL(moe_dist_allreduce_sum(MOE_GROUP_WORLD, b), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "moe_dist_allreduce_sum: dtype bf16"));
    moe_tensor_free(b);
    moe_tensor_free(t);
}

static void check_failure_agreement(void) {
    moe_error_clear();
    CU_ASSERT_EQUAL(moe_dist_check_all(MOE_OK), MOE_OK);
    moe_status s = moe_error(MOE_ERR_NUMERIC, "loss is NaN at step 3");
    CU_ASSERT_EQUAL(moe_dist_check_all(s), MOE_ERR_NUMERIC);
    CU_ASSERT_STRING_EQUAL(moe_last_error(), "loss is NaN at step 3"); /* one process: no rank prefix */
}

static void test_before_init(void) {
    check_world_of_one();
    check_identity_collectives();
    check_failure_agreement();
}

/* moe_dist_abort prints "moe: rank 0: <message>" and exits with the status. */
static void test_abort(void) {
    int fds[2];
    CU_ASSERT_EQUAL_FATAL(pipe(fds), 0);
    fflush(NULL);
    pid_t pid = fork();
    CU_ASSERT_FATAL(pid >= 0);
    if (pid == 0) {
        dup2(fds[1], 2);
        moe_dist_abort(MOE_ERR_IO, "disk full writing run/ckpt.h5");
    }
    close(fds[1]);
    char text[256] = "";
    ssize_t got = read(fds[0], text, sizeof text - 1);
    close(fds[0]);
    CU_ASSERT(got > 0);
    int wstatus = 0;
    CU_ASSERT_EQUAL(waitpid(pid, &wstatus, 0), pid);
    CU_ASSERT_TRUE(WIFEXITED(wstatus));
    CU_ASSERT_EQUAL(WEXITSTATUS(wstatus), MOE_ERR_IO);
    CU_ASSERT_STRING_EQUAL(text, "moe: rank 0: disk full writing run/ckpt.h5\n");
}

static void test_init(void) {
    int argc = 1;
    char *args[] = {"test_cpu_dist", NULL}, **argv = args;
    CU_ASSERT_EQUAL(moe_dist_init(&argc, &argv, 2), MOE_ERR_CONFIG);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(),
                                  "expert_parallel = 2 does not divide the world size 1"));
    CU_ASSERT_EQUAL(moe_dist_init(&argc, &argv, 0), MOE_ERR_CONFIG);
    CU_ASSERT_EQUAL_FATAL(moe_dist_init(&argc, &argv, 1), MOE_OK);
    check_world_of_one();
    CU_ASSERT_EQUAL(moe_dist_set_expert_parallel(1), MOE_OK);
    CU_ASSERT_EQUAL(moe_dist_set_expert_parallel(3), MOE_ERR_CONFIG);
    check_world_of_one();
}

static void test_after_init(void) {
    check_identity_collectives();
    check_failure_agreement();
}

static void test_log_file(void) {
    const char *tmp = moe_test_tmpdir("dist");
    CU_ASSERT_PTR_NOT_NULL_FATAL(tmp);
    char dir[512], path[600], bad[700], line[32] = "";
    snprintf(dir, sizeof dir, "%s/logs", tmp);
    FILE *f = moe_dist_log_file(dir);
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    fputs("step 1\n", f);
    fclose(f);
    snprintf(path, sizeof path, "%s/rank-0.log", dir);
    FILE *in = fopen(path, "r");
    CU_ASSERT_PTR_NOT_NULL_FATAL(in);
    CU_ASSERT_PTR_NOT_NULL(fgets(line, sizeof line, in));
    fclose(in);
    CU_ASSERT_STRING_EQUAL(line, "step 1\n");
    /* A directory below a regular file cannot be made. */
    snprintf(bad, sizeof bad, "%s/sub", path);
    CU_ASSERT_PTR_NULL(moe_dist_log_file(bad));
    CU_ASSERT_EQUAL(moe_last_status(), MOE_ERR_IO);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "cannot create log directory"));
}

static void test_finalize(void) {
    moe_dist_finalize();
    check_world_of_one();
    check_identity_collectives();
}

static void register_suites(void) {
    moe_test_add_suite("dist", (moe_test_entry[]){
        {"before_init", test_before_init},
        {"abort", test_abort},
        {"init", test_init},
        {"after_init", test_after_init},
        {"log_file", test_log_file},
        {"finalize", test_finalize},
        {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
