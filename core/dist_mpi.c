/* Distributed layer over MPI (MOE_HAVE_MPI builds): the world, expert-parallel and
 * data-parallel communicators, collectives that return statuses (host memory through
 * MPI; CUDA tensors through NCCL, bootstrapped over MPI, or staged through the host),
 * overlapped all-reduces, the communication counters and the step-boundary failure
 * agreement. Groups of one rank (and a world of 1 before moe_dist_init) take the local
 * identity paths shared with core/dist_single.c. */
#include "core/dist.h"

#include <limits.h>
#include <stdlib.h>
#include <mpi.h>
#include <string.h>

#include "core/device.h"
#include "core/fileio.h"

/* Largest piece handed to one MPI call whose count is an int (elements or bytes). */
#define MOE_DIST_CHUNK ((int64_t)1 << 30)

static struct {
    bool active;   /* between moe_dist_init and moe_dist_finalize */
    bool owns_mpi; /* moe_dist_init called MPI_Init_thread */
    MPI_Comm comm[MOE_GROUP_COUNT];
    int rank[MOE_GROUP_COUNT], size[MOE_GROUP_COUNT];
#ifdef MOE_HAVE_NCCL
    moe_nccl_comm *nccl[MOE_GROUP_COUNT]; /* made on first use, freed with the group */
#endif
} dist = {.comm = {MPI_COMM_NULL, MPI_COMM_NULL, MPI_COMM_NULL}};

struct moe_dist_request {
    int n_mpi;          /* CPU: one MPI request per piece of at most MOE_DIST_CHUNK elements */
    MPI_Request *mpi;
#ifdef MOE_HAVE_NCCL
    moe_nccl_pending *nccl; /* CUDA: the all-reduce on the communication stream */
#endif
    moe_dist_group group;
};

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
#ifdef MOE_HAVE_NCCL
    if (dist.nccl[g]) moe_nccl_comm_free_(dist.nccl[g]);
    dist.nccl[g] = NULL;
#endif
    if (dist.comm[g] != MPI_COMM_NULL) MPI_Comm_free(&dist.comm[g]);
    dist.comm[g] = MPI_COMM_NULL;
}

/* Makes this rank's GPU current: local rank (its place among the ranks of its node)
 * modulo the node's GPUs. Runs at init, before anything starts the CUDA backend. */
static moe_status select_device(const char *op) {
#ifdef MOE_HAVE_CUDA
    MPI_Comm node;
    MPI_TRY(op, MOE_GROUP_WORLD, MPI_Comm_split_type(dist.comm[MOE_GROUP_WORLD], MPI_COMM_TYPE_SHARED,
                                                     dist.rank[MOE_GROUP_WORLD], MPI_INFO_NULL, &node));
    int local = 0, err = MPI_Comm_rank(node, &local);
    MPI_Comm_free(&node);
    if (err != MPI_SUCCESS) return mpi_fail(op, MOE_GROUP_WORLD, err);
    return moe_dist_cuda_select_(local);
#else
    return MOE_OK;
#endif
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

/* Whether an MPI launcher started this process (mpirun / mpiexec of Open MPI, MPICH or
 * Intel MPI, srun): the rank variables they set. A process started alone stays a world of
 * one without MPI_Init, so no singleton daemon is spawned: Open MPI's singletons race for
 * one session directory when several start at the same moment, and the loser aborts. */
static bool launched_by_mpi(void) {
    static const char *const vars[] = {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++)
        if (getenv(vars[i])) return true;
    return false;
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
    if (!initialised && !launched_by_mpi()) return moe_dist_check_ep_(expert_parallel, 1);
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
    moe_status s = select_device(op);
    if (s == MOE_OK) s = moe_dist_set_expert_parallel(expert_parallel);
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

/* ---- CUDA tensors: NCCL communicators, or staging through host memory ---- */

#ifdef MOE_HAVE_NCCL
/* NCCL carries CUDA tensors unless MOE_DIST_NCCL=0 asks for staging (for comparisons). */
static bool nccl_enabled(void) {
    static int on = -1;
    if (on < 0) {
        const char *v = getenv("MOE_DIST_NCCL");
        on = !(v && strcmp(v, "0") == 0);
    }
    return on;
}

/* The NCCL communicator of group g, made on first use: the group's rank 0 creates the
 * unique id and broadcasts it over the group's MPI communicator (with a flag, so that
 * the others learn of a failure instead of waiting), then every rank joins. */
static moe_status nccl_comm(moe_dist_group g, moe_nccl_comm **out) {
    static const char op[] = "creating the NCCL communicator";
    if (!dist.nccl[g]) {
        unsigned char msg[1 + MOE_NCCL_ID_BYTES] = {0};
        moe_status s = MOE_OK;
        if (dist.rank[g] == 0) {
            s = moe_nccl_unique_id_(msg + 1);
            msg[0] = s == MOE_OK;
        }
        MPI_TRY(op, g, MPI_Bcast(msg, sizeof msg, MPI_BYTE, 0, dist.comm[g]));
        if (s != MOE_OK) return s;
        if (!msg[0])
            return moe_error(MOE_ERR_DEVICE, "%s for the %s group: its rank 0 could not make an "
                             "NCCL id (its log says why)", op, moe_dist_group_name(g));
        MOE_TRY(moe_nccl_comm_init_(&dist.nccl[g], msg + 1, dist.rank[g], dist.size[g], g));
    }
    *out = dist.nccl[g];
    return MOE_OK;
}
#endif

moe_status moe_dist_prepare(moe_device dev) {
#ifdef MOE_HAVE_NCCL
    if (dev != MOE_CUDA || !dist.active || !nccl_enabled()) return MOE_OK;
    if (!moe_device_available(MOE_CUDA)) return moe_last_status();
    moe_nccl_comm *c;
    for (int g = 0; g < MOE_GROUP_COUNT; g++)
        if (!group_is_local((moe_dist_group)g)) MOE_TRY(nccl_comm((moe_dist_group)g, &c));
#endif
    return MOE_OK;
}

/* Wall-clock timing of a collective on `dev`: CUDA work is queued, so with
 * MOE_DIST_TIMING=1 the device is drained before (not counted) and after (counted). */
static moe_status timer_start(moe_device dev, double *t0) {
    if (dev != MOE_CPU && moe_dist_timing()) MOE_TRY(moe_device_sync(dev));
    *t0 = moe_clock_ms();
    return MOE_OK;
}

static moe_status timer_stop(moe_device dev, double t0, double *acc) {
    if (dev != MOE_CPU && moe_dist_timing()) MOE_TRY(moe_device_sync(dev));
    *acc += moe_clock_ms() - t0;
    return MOE_OK;
}

/* Counts an all-to-all-v that sent `bytes`, begun at t0 (timer_start). */
static moe_status exchange_done(moe_device dev, double t0, int64_t bytes) {
    moe_dist_stats_.alltoall_calls++;
    moe_dist_stats_.alltoall_bytes += bytes;
    return timer_stop(dev, t0, &moe_dist_stats_.alltoall_ms);
}

/* ---- all-reduce ---- */

static MPI_Datatype mpi_type(moe_dtype dt) {
    return dt == MOE_F32 ? MPI_FLOAT : dt == MOE_F64 ? MPI_DOUBLE : dt == MOE_I32 ? MPI_INT32_T : MPI_INT64_T;
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

static moe_status allreduce_host_tensor(const char *op, moe_dist_group g, moe_tensor *t) {
    return allreduce_sum(op, g, t->data, moe_tensor_numel(t), mpi_type(t->dtype), moe_dtype_size(t->dtype));
}

/* A device tensor summed on the host (bf16 as f32, rounded once on the way back). */
static moe_status allreduce_staged(const char *op, moe_dist_group g, moe_tensor *t) {
    moe_tensor *h = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, t->dtype == MOE_BF16 ? MOE_F32 : t->dtype, t->ndim,
                                     t->shape);
    if (!h) return moe_last_status();
    MOE_TRY(moe_tensor_copy_(h, t));
    MOE_TRY(allreduce_host_tensor(op, g, h));
    return moe_tensor_copy_(t, h);
}

/* The blocking sum of a device tensor: NCCL on the compute stream, else staged. */
static moe_status allreduce_device(const char *op, moe_dist_group g, moe_tensor *t) {
#ifdef MOE_HAVE_NCCL
    if (nccl_enabled()) {
        moe_nccl_comm *c;
        MOE_TRY(nccl_comm(g, &c));
        return moe_nccl_allreduce_(c, op, t->data, moe_tensor_numel(t), t->dtype, NULL);
    }
#endif
    return allreduce_staged(op, g, t);
}

moe_status moe_dist_allreduce_sum(moe_dist_group g, moe_tensor *t) {
    static const char op[] = "moe_dist_allreduce_sum";
    MOE_TRY(moe_dist_check_tensor_(op, t));
    if (group_is_local(g)) return MOE_OK;
    return t->device == MOE_CPU ? allreduce_host_tensor(op, g, t) : allreduce_device(op, g, t);
}

moe_status moe_dist_allreduce_sum_start(moe_dist_group g, moe_tensor *t, moe_dist_request **req) {
    static const char op[] = "moe_dist_allreduce_sum_start";
    *req = NULL;
    MOE_TRY(moe_dist_check_tensor_(op, t));
    if (group_is_local(g)) return MOE_OK;
    int64_t n = moe_tensor_numel(t);
    moe_dist_stats_.reduce_starts++;
    moe_dist_stats_.reduce_bytes += n * (int64_t)moe_dtype_size(t->dtype);
    if (t->device != MOE_CPU) {
#ifdef MOE_HAVE_NCCL
        if (nccl_enabled()) {
            moe_nccl_comm *c;
            MOE_TRY(nccl_comm(g, &c));
            moe_dist_request *r = calloc(1, sizeof *r);
            if (!r) return moe_error(MOE_ERR_OOM, "%s: out of host memory", op);
            r->group = g;
            moe_status s = moe_nccl_allreduce_(c, op, t->data, n, t->dtype, &r->nccl);
            if (s != MOE_OK) free(r);
            else *req = r;
            return s;
        }
#endif
        return allreduce_staged(op, g, t); /* done on return: nothing to wait for */
    }
    int pieces = (int)((n + MOE_DIST_CHUNK - 1) / MOE_DIST_CHUNK);
    moe_dist_request *r = calloc(1, sizeof *r);
    MPI_Request *mr = calloc((size_t)(pieces ? pieces : 1), sizeof *mr);
    if (!r || !mr) {
        free(r);
        free(mr);
        return moe_error(MOE_ERR_OOM, "%s: out of host memory", op);
    }
    size_t es = moe_dtype_size(t->dtype);
    int err = MPI_SUCCESS, started = 0;
    for (int64_t done = 0; done < n; done += MOE_DIST_CHUNK) {
        int count = (int)(n - done < MOE_DIST_CHUNK ? n - done : MOE_DIST_CHUNK);
        err = MPI_Iallreduce(MPI_IN_PLACE, (char *)t->data + done * (int64_t)es, count, mpi_type(t->dtype),
                             MPI_SUM, dist.comm[g], &mr[started]);
        if (err != MPI_SUCCESS) break;
        started++;
    }
    if (err != MPI_SUCCESS) {
        MPI_Waitall(started, mr, MPI_STATUSES_IGNORE);
        free(mr);
        free(r);
        return mpi_fail(op, g, err);
    }
    r->n_mpi = started;
    r->mpi = mr;
    r->group = g;
    *req = r;
    return MOE_OK;
}

moe_status moe_dist_wait(moe_dist_request *r) {
    static const char op[] = "moe_dist_wait";
    if (!r) return MOE_OK;
    moe_status s = MOE_OK;
    double t0;
#ifdef MOE_HAVE_NCCL
    if (r->nccl) {
        s = timer_start(MOE_CUDA, &t0); /* with timing: the backward's own kernels are not counted */
        moe_status w = moe_nccl_wait_(r->nccl, moe_dist_timing());
        if (s == MOE_OK) s = w;
        if (s == MOE_OK) moe_dist_stats_.reduce_wait_ms += moe_clock_ms() - t0;
        free(r);
        return s;
    }
#endif
    t0 = moe_clock_ms();
    int err = MPI_Waitall(r->n_mpi, r->mpi, MPI_STATUSES_IGNORE);
    moe_dist_stats_.reduce_wait_ms += moe_clock_ms() - t0;
    if (err != MPI_SUCCESS) s = mpi_fail(op, r->group, err);
    free(r->mpi);
    free(r);
    return s;
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

/* ---- all-to-all ---- */

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

/* MPI_Alltoallv of host rows over a group of more than one rank (counts checked). */
static moe_status alltoallv_host(const char *op, moe_dist_group g, const void *send, const int64_t *send_counts_rows,
                                 int64_t send_rows, void *recv, const int64_t *recv_counts_rows, int64_t recv_rows,
                                 int64_t row_bytes) {
    int size = moe_dist_size(g);
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

moe_status moe_dist_alltoallv(moe_dist_group g, const void *send, const int64_t *send_counts_rows,
                              void *recv, const int64_t *recv_counts_rows, int64_t row_bytes) {
    static const char op[] = "moe_dist_alltoallv";
    if (group_is_local(g))
        return moe_dist_exchange_self_(op, send, send_counts_rows, recv, recv_counts_rows,
                                       row_bytes);
    int64_t send_rows, recv_rows;
    MOE_TRY(moe_dist_check_exchange_(op, moe_dist_size(g), send_counts_rows, recv_counts_rows, row_bytes,
                                     &send_rows, &recv_rows));
    double t0;
    MOE_TRY(timer_start(MOE_CPU, &t0));
    MOE_TRY(alltoallv_host(op, g, send, send_counts_rows, send_rows, recv, recv_counts_rows, recv_rows, row_bytes));
    return exchange_done(MOE_CPU, t0, send_rows * row_bytes);
}

/* Device rows: NCCL on the compute stream, else through host buffers and MPI. */
static moe_status alltoallv_device(const char *op, moe_dist_group g, const moe_tensor *send,
                                   const int64_t *send_counts_rows, moe_tensor *recv,
                                   const int64_t *recv_counts_rows, int64_t row_bytes) {
#ifdef MOE_HAVE_NCCL
    if (nccl_enabled()) {
        moe_nccl_comm *c;
        MOE_TRY(nccl_comm(g, &c));
        return moe_nccl_alltoallv_(c, op, send->data, send_counts_rows, recv->data, recv_counts_rows, row_bytes);
    }
#endif
    moe_tensor *hs = moe_tensor_to(send, MOE_CPU, MOE_LIFE_STEP);
    moe_tensor *hr = hs ? moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, recv->dtype, recv->ndim, recv->shape) : NULL;
    if (!hr) return moe_last_status();
    MOE_TRY(alltoallv_host(op, g, hs->data, send_counts_rows, send->shape[0], hr->data, recv_counts_rows,
                           recv->shape[0], row_bytes));
    return moe_tensor_copy_(recv, hr);
}

moe_status moe_dist_alltoallv_tensor(moe_dist_group g, const moe_tensor *send,
                                     const int64_t *send_counts_rows, moe_tensor *recv,
                                     const int64_t *recv_counts_rows) {
    static const char op[] = "moe_dist_alltoallv_tensor";
    if (group_is_local(g))
        return moe_dist_exchange_self_tensor_(op, send, send_counts_rows, recv, recv_counts_rows);
    int64_t row_bytes;
    MOE_TRY(moe_dist_check_exchange_tensors_(op, moe_dist_size(g), send, send_counts_rows, recv, recv_counts_rows,
                                             &row_bytes));
    double t0;
    MOE_TRY(timer_start(send->device, &t0));
    if (send->device == MOE_CPU)
        MOE_TRY(alltoallv_host(op, g, send->data, send_counts_rows, send->shape[0], recv->data, recv_counts_rows,
                               recv->shape[0], row_bytes));
    else
        MOE_TRY(alltoallv_device(op, g, send, send_counts_rows, recv, recv_counts_rows, row_bytes));
    return exchange_done(send->device, t0, send->shape[0] * row_bytes);
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
