/* Distributed layer, part built in every build: argument checks, helpers and the
 * communication counters shared with core/dist_mpi.c, then (only without MOE_HAVE_MPI)
 * the whole API for a world of one rank, where every collective is an identity. */
#include "core/dist.h"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>

moe_dist_stats moe_dist_stats_;

moe_dist_stats moe_dist_get_stats(void) { return moe_dist_stats_; }

void moe_dist_reset_stats(void) { memset(&moe_dist_stats_, 0, sizeof moe_dist_stats_); }

bool moe_dist_timing(void) {
    static int on = -1;
    if (on < 0) {
        const char *v = getenv("MOE_DIST_TIMING");
        on = v && strcmp(v, "1") == 0;
    }
    return on;
}

const char *moe_dist_group_name(moe_dist_group g) {
    MOE_ASSERT(g >= 0 && g < MOE_GROUP_COUNT, "bad group %d", (int)g);
    static const char *names[MOE_GROUP_COUNT] = {"world", "EP", "DP"};
    return names[g];
}

void moe_dist_expert_range(int64_t n_experts, int64_t *first, int64_t *end) {
    int64_t ep = moe_dist_ep_size(), r = moe_dist_ep_rank();
    *first = r * n_experts / ep;
    *end = (r + 1) * n_experts / ep;
}

FILE *moe_dist_log_file(const char *dir) {
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        moe_error(MOE_ERR_IO, "cannot create log directory %s: %s", dir, strerror(errno));
        return NULL;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/rank-%d.log", dir, moe_dist_world_rank());
    FILE *f = fopen(path, "a");
    if (!f) {
        moe_error(MOE_ERR_IO, "cannot open rank log %s: %s; check that the directory is "
                  "writable", path, strerror(errno));
        return NULL;
    }
    setvbuf(f, NULL, _IOLBF, 0);
    return f;
}

moe_status moe_dist_check_ep_(int expert_parallel, int world_size) {
    if (expert_parallel < 1 || world_size % expert_parallel != 0)
        return moe_error(MOE_ERR_CONFIG, "expert_parallel = %d does not divide the world size "
                         "%d; choose an expert-parallel size that divides the number of ranks",
                         expert_parallel, world_size);
    return MOE_OK;
}

moe_status moe_dist_check_exchange_(const char *op, int size, const int64_t *send_counts,
                                    const int64_t *recv_counts, int64_t row_bytes,
                                    int64_t *send_rows, int64_t *recv_rows) {
    if (row_bytes <= 0)
        return moe_error(MOE_ERR_INVALID, "%s: row_bytes is %lld, must be > 0", op,
                         (long long)row_bytes);
    *send_rows = *recv_rows = 0;
    for (int p = 0; p < size; p++) {
        if (send_counts[p] < 0 || recv_counts[p] < 0)
            return moe_error(MOE_ERR_INVALID,
                             "%s: negative row count for peer %d (send %lld, recv %lld)", op, p,
                             (long long)send_counts[p], (long long)recv_counts[p]);
        if (send_counts[p] > INT64_MAX / row_bytes - *send_rows ||
            recv_counts[p] > INT64_MAX / row_bytes - *recv_rows)
            return moe_error(MOE_ERR_INVALID, "%s: row counts of %lld bytes overflow at peer %d",
                             op, (long long)row_bytes, p);
        *send_rows += send_counts[p];
        *recv_rows += recv_counts[p];
    }
    return MOE_OK;
}

moe_status moe_dist_check_tensor_(const char *op, const moe_tensor *t) {
    char desc[96];
    if (!moe_tensor_is_contiguous(t))
        return moe_error(MOE_ERR_INVALID, "%s: tensor %s is not contiguous", op,
                         moe_tensor_describe(t, desc, sizeof desc));
    if (t->device == MOE_CPU && t->dtype == MOE_BF16) /* MPI has no bf16 sum */
        return moe_error(MOE_ERR_INVALID, "%s: dtype bf16 is not supported on the CPU (f32, f64, "
                         "i32, i64)", op);
    return MOE_OK;
}

moe_status moe_dist_check_exchange_tensors_(const char *op, int size, const moe_tensor *send,
                                            const int64_t *send_counts, const moe_tensor *recv,
                                            const int64_t *recv_counts, int64_t *row_bytes) {
    char b1[96], b2[96];
    bool rows_match = send->ndim >= 1 && send->ndim == recv->ndim;
    for (int d = 1; rows_match && d < send->ndim; d++) rows_match = send->shape[d] == recv->shape[d];
    if (!rows_match || send->device != recv->device || send->dtype != recv->dtype ||
        !moe_tensor_is_contiguous(send) || !moe_tensor_is_contiguous(recv))
        return moe_error(MOE_ERR_INVALID, "%s: send %s and recv %s must be contiguous, on one "
                         "device, of one dtype and row shape", op,
                         moe_tensor_describe(send, b1, sizeof b1), moe_tensor_describe(recv, b2, sizeof b2));
    int64_t row_elems = 1, send_rows, recv_rows;
    for (int d = 1; d < send->ndim; d++) row_elems *= send->shape[d];
    *row_bytes = row_elems * (int64_t)moe_dtype_size(send->dtype);
    MOE_TRY(moe_dist_check_exchange_(op, size, send_counts, recv_counts, *row_bytes, &send_rows,
                                     &recv_rows));
    if (send_rows != send->shape[0] || recv_rows != recv->shape[0])
        return moe_error(MOE_ERR_INVALID, "%s: the counts send %lld rows and receive %lld, but "
                         "send is %s and recv %s", op, (long long)send_rows, (long long)recv_rows,
                         moe_tensor_describe(send, b1, sizeof b1), moe_tensor_describe(recv, b2, sizeof b2));
    return MOE_OK;
}

moe_status moe_dist_exchange_self_(const char *op, const void *send, const int64_t *send_counts,
                                   void *recv, const int64_t *recv_counts, int64_t row_bytes) {
    int64_t send_rows, recv_rows;
    MOE_TRY(moe_dist_check_exchange_(op, 1, send_counts, recv_counts, row_bytes, &send_rows,
                                     &recv_rows));
    if (send_rows != recv_rows)
        return moe_error(MOE_ERR_INVALID, "%s: a group of one rank sends %lld rows to itself "
                         "but expects %lld", op, (long long)send_rows, (long long)recv_rows);
    if (send_rows) memcpy(recv, send, (size_t)(send_rows * row_bytes));
    return MOE_OK;
}

moe_status moe_dist_exchange_self_tensor_(const char *op, const moe_tensor *send,
                                          const int64_t *send_counts, moe_tensor *recv,
                                          const int64_t *recv_counts) {
    int64_t row_bytes;
    MOE_TRY(moe_dist_check_exchange_tensors_(op, 1, send, send_counts, recv, recv_counts, &row_bytes));
    if (send_counts[0] != recv_counts[0])
        return moe_error(MOE_ERR_INVALID, "%s: a group of one rank sends %lld rows to itself "
                         "but expects %lld", op, (long long)send_counts[0], (long long)recv_counts[0]);
    return send_counts[0] ? moe_tensor_copy_(recv, send) : MOE_OK;
}

moe_status moe_dist_failure_(moe_status status, int rank, const char *msg, const char *others) {
    char copy[2048];
    snprintf(copy, sizeof copy, "%s", msg); /* msg may be moe_last_error() itself */
    return moe_error(status, "rank %d failed: %s%s", rank, copy, others);
}

#ifndef MOE_HAVE_MPI

moe_status moe_dist_init(int *argc, char ***argv, int expert_parallel) {
    return moe_dist_check_ep_(expert_parallel, 1);
}

moe_status moe_dist_set_expert_parallel(int expert_parallel) {
    return moe_dist_check_ep_(expert_parallel, 1);
}

void moe_dist_finalize(void) {}

moe_status moe_dist_prepare(moe_device dev) { return MOE_OK; }

void moe_dist_abort(moe_status status, const char *message) {
    fprintf(stderr, "moe: rank 0: %s\n", message);
    exit(status == MOE_OK ? 1 : (int)status);
}

int moe_dist_rank(moe_dist_group g) {
    MOE_ASSERT(g >= 0 && g < MOE_GROUP_COUNT, "bad group %d", (int)g);
    return 0;
}

int moe_dist_size(moe_dist_group g) {
    MOE_ASSERT(g >= 0 && g < MOE_GROUP_COUNT, "bad group %d", (int)g);
    return 1;
}

moe_status moe_dist_allreduce_sum(moe_dist_group g, moe_tensor *t) {
    return moe_dist_check_tensor_("moe_dist_allreduce_sum", t);
}

moe_status moe_dist_allreduce_sum_start(moe_dist_group g, moe_tensor *t, moe_dist_request **req) {
    *req = NULL;
    return moe_dist_check_tensor_("moe_dist_allreduce_sum_start", t);
}

moe_status moe_dist_wait(moe_dist_request *req) {
    MOE_ASSERT(!req, "a world of one rank has no requests to wait for");
    return MOE_OK;
}

moe_status moe_dist_allreduce_f64(moe_dist_group g, double *v, int n) {
    MOE_ASSERT(n >= 0, "n = %d", n);
    return MOE_OK;
}

moe_status moe_dist_allreduce_i64(moe_dist_group g, int64_t *v, int n) {
    MOE_ASSERT(n >= 0, "n = %d", n);
    return MOE_OK;
}

moe_status moe_dist_broadcast(moe_dist_group g, int root, void *buf, size_t bytes) {
    MOE_ASSERT(root == 0, "broadcast root %d in a group of 1", root);
    return MOE_OK;
}

moe_status moe_dist_alltoall_counts(moe_dist_group g, const int64_t *send_counts,
                                    int64_t *recv_counts) {
    recv_counts[0] = send_counts[0];
    return MOE_OK;
}

moe_status moe_dist_alltoallv(moe_dist_group g, const void *send, const int64_t *send_counts_rows,
                              void *recv, const int64_t *recv_counts_rows, int64_t row_bytes) {
    return moe_dist_exchange_self_("moe_dist_alltoallv", send, send_counts_rows, recv,
                                   recv_counts_rows, row_bytes);
}

moe_status moe_dist_alltoallv_tensor(moe_dist_group g, const moe_tensor *send,
                                     const int64_t *send_counts_rows, moe_tensor *recv,
                                     const int64_t *recv_counts_rows) {
    return moe_dist_exchange_self_tensor_("moe_dist_alltoallv_tensor", send, send_counts_rows,
                                          recv, recv_counts_rows);
}

/* One process: nothing to agree on; the message stays as it is. */
moe_status moe_dist_check_all(moe_status local) { return local; }

#endif
