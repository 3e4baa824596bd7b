/* Distributed layer over MPI (MOE_HAVE_MPI builds): the world, expert-parallel and
 * data-parallel communicators, CPU collectives that return statuses, and the
 * step-boundary failure agreement. Groups of one rank (and a world of 1 before
 * moe_dist_init) take the local identity paths shared with core/dist_single.c. */
#include "core/dist.h"

#include <limits.h>
#include <mpi.h>
#include <string.h>

/* Largest piece handed to one MPI call whose count is an int (elements or bytes). */
#define MOE_DIST_CHUNK ((int64_t)1 << 30)

static struct {
    bool active;   /* between moe_dist_init and moe_dist_finalize */
    bool owns_mpi; /* moe_dist_init called MPI_Init_thread */
    MPI_Comm comm[MOE_GROUP_COUNT];
    int rank[MOE_GROUP_COUNT], size[MOE_GROUP_COUNT];
} dist = {.comm = {MPI_COMM_NULL, MPI_COMM_NULL, MPI_COMM_NULL}};

int moe_dist_rank(moe_dist_group g) {
    MOE_ASSERT(g >= 0 && g < MOE_GROUP_COUNT, "bad group %d", (int)g);
    return dist.active ? dist.rank[g] : 0;
}

int moe_dist_size(moe_dist_group g) {
    MOE_ASSERT(g >= 0 && g < MOE_GROUP_COUNT, "bad group %d", (int)g);
    return dist.active ? dist.size[g] : 1;
}

/* A group of one rank: the collective is an identity and needs no MPI call. */
static bool group_is_local(moe_dist_group g) { return moe_dist_size(g) == 1; }

static moe_status mpi_fail(const char *op, moe_dist_group g, int err) {
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(err, text, &len) != MPI_SUCCESS)
        snprintf(text, sizeof text, "MPI error code %d", err);
    return moe_error(MOE_ERR_DIST, "%s over the %s group (rank %d of %d) failed: %s; if another "
                     "rank failed first, its log says why", op, moe_dist_group_name(g),
                     moe_dist_rank(g), moe_dist_size(g), text);
}

#define MPI_TRY(op, g, call)                                  \
    do {                                                      \
        int mpi_try_e_ = (call);                              \
        if (mpi_try_e_ != MPI_SUCCESS) return mpi_fail(op, g, mpi_try_e_); \
    } while (0)

/* Makes MPI errors on `c` come back as codes and caches this rank's place in group g. */
static moe_status adopt_comm(const char *op, moe_dist_group g, MPI_Comm c) {
    MPI_TRY(op, MOE_GROUP_WORLD, MPI_Comm_set_errhandler(c, MPI_ERRORS_RETURN));
    MPI_TRY(op, MOE_GROUP_WORLD, MPI_Comm_rank(c, &dist.rank[g]));
    MPI_TRY(op, MOE_GROUP_WORLD, MPI_Comm_size(c, &dist.size[g]));
    dist.comm[g] = c;
    return MOE_OK;
}

static void free_comm(moe_dist_group g) {
    if (dist.comm[g] != MPI_COMM_NULL) MPI_Comm_free(&dist.comm[g]);
    dist.comm[g] = MPI_COMM_NULL;
}

moe_status moe_dist_set_expert_parallel(int expert_parallel) {
    static const char op[] = "moe_dist_set_expert_parallel";
    if (!dist.active) return moe_dist_check_ep_(expert_parallel, 1);
    /* Every rank must pass the same value: agree first, so that no rank returns early
     * while the others wait in the splits. */
    int range[2] = {expert_parallel, -expert_parallel};
    MPI_TRY(op, MOE_GROUP_WORLD, MPI_Allreduce(MPI_IN_PLACE, range, 2, MPI_INT, MPI_MIN,
                                               dist.comm[MOE_GROUP_WORLD]));
    if (range[0] != -range[1])
        return moe_error(MOE_ERR_DIST, "%s: ranks disagree on expert_parallel (from %d to %d); "
                         "every rank must use the same config", op, range[0], -range[1]);
    MOE_TRY(moe_dist_check_ep_(expert_parallel, dist.size[MOE_GROUP_WORLD]));
    int rank = dist.rank[MOE_GROUP_WORLD];
    MPI_Comm ep = MPI_COMM_NULL, dp = MPI_COMM_NULL;
    MPI_TRY(op, MOE_GROUP_WORLD, MPI_Comm_split(dist.comm[MOE_GROUP_WORLD],
                                                rank / expert_parallel, rank, &ep));
    int err = MPI_Comm_split(dist.comm[MOE_GROUP_WORLD], rank % expert_parallel, rank, &dp);
    if (err != MPI_SUCCESS) {
        MPI_Comm_free(&ep);
        return mpi_fail(op, MOE_GROUP_WORLD, err);
    }
    free_comm(MOE_GROUP_EP);
    free_comm(MOE_GROUP_DP);
    MOE_TRY(adopt_comm(op, MOE_GROUP_EP, ep));
    return adopt_comm(op, MOE_GROUP_DP, dp);
}

moe_status moe_dist_init(int *argc, char ***argv, int expert_parallel) {
    static const char op[] = "moe_dist_init";
    if (dist.active) return moe_dist_set_expert_parallel(expert_parallel);
    int initialised = 0, finalised = 0;
    MPI_Initialized(&initialised);
    MPI_Finalized(&finalised);
    if (finalised)
        return moe_error(MOE_ERR_DIST, "%s: MPI was already finalised; initialise the "
                         "distributed layer once, before moe_dist_finalize", op);
    if (!initialised) {
        int provided = 0;
        int err = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
        if (err != MPI_SUCCESS)
            return moe_error(MOE_ERR_DIST, "%s: MPI_Init_thread failed (code %d); check the "
                             "MPI installation and the mpirun command line", op, err);
        dist.owns_mpi = true;
        if (provided < MPI_THREAD_FUNNELED)
            return moe_error(MOE_ERR_DIST, "%s: MPI provides thread level %d, need "
                             "MPI_THREAD_FUNNELED (%d)", op, provided, MPI_THREAD_FUNNELED);
    }
    MPI_TRY(op, MOE_GROUP_WORLD, MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    MPI_Comm world;
    MPI_TRY(op, MOE_GROUP_WORLD, MPI_Comm_dup(MPI_COMM_WORLD, &world));
    MOE_TRY(adopt_comm(op, MOE_GROUP_WORLD, world));
    dist.active = true;
    moe_status s = moe_dist_set_expert_parallel(expert_parallel);
    if (s != MOE_OK) {
        free_comm(MOE_GROUP_WORLD);
        dist.active = false;
    }
    return s;
}

void moe_dist_finalize(void) {
    int finalised = 0;
    MPI_Finalized(&finalised);
    for (int g = 0; g < MOE_GROUP_COUNT; g++) {
        if (!finalised) free_comm((moe_dist_group)g);
        dist.comm[g] = MPI_COMM_NULL;
    }
    dist.active = false;
    if (dist.owns_mpi && !finalised) MPI_Finalize();
    dist.owns_mpi = false;
}

void moe_dist_abort(moe_status status, const char *message) {
    int code = status == MOE_OK ? 1 : (int)status;
    fprintf(stderr, "moe: rank %d: %s\n", moe_dist_world_rank(), message);
    fflush(stderr);
    int initialised = 0, finalised = 0;
    MPI_Initialized(&initialised);
    MPI_Finalized(&finalised);
    if (initialised && !finalised) MPI_Abort(MPI_COMM_WORLD, code);
    exit(code);
}

/* In-place MPI_SUM of n elements, in pieces whose counts fit an int. */
static moe_status allreduce_sum(const char *op, moe_dist_group g, void *buf, int64_t n,
                                MPI_Datatype type, size_t elem_size) {
    if (group_is_local(g)) return MOE_OK;
    for (int64_t done = 0; done < n;) {
        int count = (int)(n - done < MOE_DIST_CHUNK ? n - done : MOE_DIST_CHUNK);
        MPI_TRY(op, g, MPI_Allreduce(MPI_IN_PLACE, (char *)buf + done * (int64_t)elem_size,
                                     count, type, MPI_SUM, dist.comm[g]));
        done += count;
    }
    return MOE_OK;
}

moe_status moe_dist_allreduce_sum(moe_dist_group g, moe_tensor *t) {
    static const char op[] = "moe_dist_allreduce_sum";
    MOE_TRY(moe_dist_check_tensor_(op, t));
    MPI_Datatype type = t->dtype == MOE_F32   ? MPI_FLOAT
                        : t->dtype == MOE_F64 ? MPI_DOUBLE
                        : t->dtype == MOE_I32 ? MPI_INT32_T
                                              : MPI_INT64_T;
    return allreduce_sum(op, g, t->data, moe_tensor_numel(t), type, moe_dtype_size(t->dtype));
}

moe_status moe_dist_allreduce_f64(moe_dist_group g, double *v, int n) {
    MOE_ASSERT(n >= 0, "n = %d", n);
    return allreduce_sum("moe_dist_allreduce_f64", g, v, n, MPI_DOUBLE, sizeof *v);
}

moe_status moe_dist_allreduce_i64(moe_dist_group g, int64_t *v, int n) {
    MOE_ASSERT(n >= 0, "n = %d", n);
    return allreduce_sum("moe_dist_allreduce_i64", g, v, n, MPI_INT64_T, sizeof *v);
}

moe_status moe_dist_broadcast(moe_dist_group g, int root, void *buf, size_t bytes) {
    MOE_ASSERT(root >= 0 && root < moe_dist_size(g), "broadcast root %d in a %s group of %d",
               root, moe_dist_group_name(g), moe_dist_size(g));
    if (group_is_local(g)) return MOE_OK;
    for (size_t done = 0; done < bytes;) {
        int count = (int)(bytes - done < (size_t)MOE_DIST_CHUNK ? bytes - done
                                                                : (size_t)MOE_DIST_CHUNK);
        MPI_TRY("moe_dist_broadcast", g,
                MPI_Bcast((char *)buf + done, count, MPI_BYTE, root, dist.comm[g]));
        done += (size_t)count;
    }
    return MOE_OK;
}

moe_status moe_dist_alltoall_counts(moe_dist_group g, const int64_t *send_counts,
                                    int64_t *recv_counts) {
    if (group_is_local(g)) {
        recv_counts[0] = send_counts[0];
        return MOE_OK;
    }
    MPI_TRY("moe_dist_alltoall_counts", g,
            MPI_Alltoall(send_counts, 1, MPI_INT64_T, recv_counts, 1, MPI_INT64_T, dist.comm[g]));
    return MOE_OK;
}

/* Counts and displacements in rows, as ints (checked by the caller to fit). */
static void fill_counts(int size, const int64_t *rows, int *counts, int *displs) {
    int64_t at = 0;
    for (int p = 0; p < size; p++) {
        counts[p] = (int)rows[p];
        displs[p] = (int)at;
        at += rows[p];
    }
}

moe_status moe_dist_alltoallv(moe_dist_group g, const void *send, const int64_t *send_counts_rows,
                              void *recv, const int64_t *recv_counts_rows, int64_t row_bytes) {
    static const char op[] = "moe_dist_alltoallv";
    if (group_is_local(g))
        return moe_dist_exchange_self_(op, send, send_counts_rows, recv, recv_counts_rows,
                                       row_bytes);
    int size = moe_dist_size(g);
    int64_t send_rows, recv_rows;
    MOE_TRY(moe_dist_check_exchange_(op, size, send_counts_rows, recv_counts_rows, row_bytes,
                                     &send_rows, &recv_rows));
    /* MPI counts and displacements are ints: one row is one element of a contiguous
     * datatype, so only the rows per rank (not the bytes) must fit. */
    if (row_bytes > INT_MAX || send_rows > INT_MAX || recv_rows > INT_MAX)
        return moe_error(MOE_ERR_INVALID, "%s over the %s group: %lld rows out, %lld rows in, "
                         "%lld bytes a row exceed MPI's int counts (2^31 - 1); exchange in "
                         "smaller pieces", op, moe_dist_group_name(g), (long long)send_rows,
                         (long long)recv_rows, (long long)row_bytes);
    int *counts = malloc(4 * (size_t)size * sizeof *counts);
    if (!counts) return moe_error(MOE_ERR_OOM, "%s: no memory for %d counts", op, 4 * size);
    fill_counts(size, send_counts_rows, counts, counts + size);
    fill_counts(size, recv_counts_rows, counts + 2 * size, counts + 3 * size);
    MPI_Datatype row;
    int err = MPI_Type_contiguous((int)row_bytes, MPI_BYTE, &row);
    if (err == MPI_SUCCESS) {
        err = MPI_Type_commit(&row);
        if (err == MPI_SUCCESS)
            err = MPI_Alltoallv(send, counts, counts + size, row, recv, counts + 2 * size,
                                counts + 3 * size, row, dist.comm[g]);
        MPI_Type_free(&row);
    }
    free(counts);
    return err == MPI_SUCCESS ? MOE_OK : mpi_fail(op, g, err);
}

moe_status moe_dist_check_all(moe_status local) {
    static const char op[] = "moe_dist_check_all";
    if (group_is_local(MOE_GROUP_WORLD)) return local; /* one process: the message stays as it is */
    int size = dist.size[MOE_GROUP_WORLD], mine = (int)local;
    int *all = malloc((size_t)size * sizeof *all);
    if (!all) return moe_error(MOE_ERR_OOM, "%s: no memory for %d statuses", op, size);
    int err = MPI_Allgather(&mine, 1, MPI_INT, all, 1, MPI_INT, dist.comm[MOE_GROUP_WORLD]);
    if (err != MPI_SUCCESS) {
        free(all);
        return mpi_fail(op, MOE_GROUP_WORLD, err);
    }
    int first = -1;
    moe_status status = MOE_OK;
    char others[256] = "";
    size_t used = 0;
    for (int p = 0; p < size; p++) {
        if (all[p] == MOE_OK) continue;
        if (first < 0) {
            first = p;
            status = all[p] > 0 && all[p] < MOE_STATUS_COUNT ? (moe_status)all[p] : MOE_ERR_DIST;
        } else if (used < sizeof others) {
            used += (size_t)snprintf(others + used, sizeof others - used, "%s%d",
                                     used ? ", " : " (other failing ranks: ", p);
        }
    }
    free(all);
    if (first < 0) return MOE_OK;
    if (used && used < sizeof others - 1) strcat(others, ")");
    char msg[2048] = "";
    if (dist.rank[MOE_GROUP_WORLD] == first) snprintf(msg, sizeof msg, "%s", moe_last_error());
    MPI_TRY(op, MOE_GROUP_WORLD,
            MPI_Bcast(msg, sizeof msg, MPI_CHAR, first, dist.comm[MOE_GROUP_WORLD]));
    return moe_dist_failure_(status, first, msg, others);
}
