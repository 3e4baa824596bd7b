/* Process groups for expert parallelism (EP) and data parallelism (DP) over MPI.
 *
 * The world of N ranks is cut into N/ep expert-parallel groups of consecutive ranks
 * (ranks [g*ep, (g+1)*ep) form EP group g) and ep data-parallel groups of the ranks with
 * the same position in their EP group (dp size = N/ep). Every rank holds a full replica
 * of the dense parameters, so dense gradients are summed over MOE_GROUP_WORLD; experts
 * are sharded inside each EP group (moe_dist_expert_range), so expert gradients are
 * summed over MOE_GROUP_DP (the ranks that hold the same experts).
 *
 * Two builds share this API: core/dist_mpi.c (MOE_HAVE_MPI) and core/dist_single.c (a
 * world of 1). Before moe_dist_init (and after moe_dist_finalize) either build is a
 * world of 1: the accessors say rank 0 of 1, and every collective on a group of one
 * rank is an identity (all-reduce: no-op; all-to-all-v: a copy), so single-process
 * library code and tests need no init. Collectives must be called by every rank of the
 * group in the same order, from the thread that called moe_dist_init
 * (MPI_THREAD_FUNNELED). Failures return MOE_ERR_DIST (MPI) or MOE_ERR_DEVICE (NCCL)
 * with a message naming the collective, the group and the library's error string.
 *
 * Host buffers and CPU tensors go through MPI. CUDA tensors go through NCCL when the
 * build has it (MOE_HAVE_NCCL): one communicator per group, made on the first CUDA
 * collective of that group (or by moe_dist_prepare) from a unique id that the group's
 * rank 0 broadcasts over MPI (CUDA-aware MPI is not assumed). Without NCCL, or with
 * MOE_DIST_NCCL=0 in the environment, CUDA tensors are staged through host memory and
 * MPI. Collectives on CUDA tensors are queued on the backend's compute stream, in order
 * with the kernels around them; they return before the data has moved, like a kernel.
 * moe_dist_init makes GPU (local rank % GPUs on the node) current for this process, so
 * it must run before anything touches CUDA. */
#ifndef MOE_CORE_DIST_H
#define MOE_CORE_DIST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "core/status.h"
#include "core/tensor.h"

typedef enum moe_dist_group {
    MOE_GROUP_WORLD, /* every rank: dense-parameter gradients, loss, check_all */
    MOE_GROUP_EP,    /* the ranks sharing one copy of all experts: token exchange */
    MOE_GROUP_DP,    /* the ranks holding the same experts: expert gradients */
    MOE_GROUP_COUNT
} moe_dist_group;

/* Initialises MPI (MPI_Init_thread, FUNNELED) unless it already is or no MPI launcher
 * started the process (no mpirun / mpiexec / srun rank variable: a world of 1 without
 * MPI), makes failures on our communicators return
 * statuses (MPI_ERRORS_RETURN), picks this rank's GPU in CUDA builds (local rank modulo
 * the node's GPUs; none: nothing to do) and builds the groups for `expert_parallel`.
 * MOE_ERR_CONFIG when expert_parallel < 1 or does not divide the world size. */
moe_status moe_dist_init(int *argc, char ***argv, int expert_parallel);
/* Rebuilds the EP and DP groups (collective over the world; every rank passes the same
 * ep, else MOE_ERR_DIST), dropping their NCCL communicators. On failure the previous
 * groups are kept. */
moe_status moe_dist_set_expert_parallel(int expert_parallel);
/* Frees the groups (and their NCCL communicators) and finalises MPI if moe_dist_init
 * initialised it. */
void moe_dist_finalize(void);
/* Makes collectives on tensors of `dev` ready now instead of at their first use: on CUDA
 * with NCCL, creates the communicators of every group of more than one rank. Collective
 * over the world; a no-op elsewhere. */
moe_status moe_dist_prepare(moe_device dev);

/* Ends every rank now: prints "moe: rank R: <message>" on stderr and calls
 * MPI_Abort(MPI_COMM_WORLD, status) (exit(status) in a world of 1; MOE_OK becomes 1).
 * Only the CLI layer calls it (library code returns statuses and never exits); it is
 * how one failing rank brings the whole job down in bounded time instead of hanging. */
void moe_dist_abort(moe_status status, const char *message) __attribute__((noreturn));

int moe_dist_rank(moe_dist_group g); /* this rank's position in group g */
int moe_dist_size(moe_dist_group g); /* number of ranks in group g */
static inline int moe_dist_world_rank(void) { return moe_dist_rank(MOE_GROUP_WORLD); }
static inline int moe_dist_world_size(void) { return moe_dist_size(MOE_GROUP_WORLD); }
static inline int moe_dist_ep_rank(void) { return moe_dist_rank(MOE_GROUP_EP); }
static inline int moe_dist_ep_size(void) { return moe_dist_size(MOE_GROUP_EP); }
static inline int moe_dist_dp_rank(void) { return moe_dist_rank(MOE_GROUP_DP); }
static inline int moe_dist_dp_size(void) { return moe_dist_size(MOE_GROUP_DP); }
static inline bool moe_dist_is_root(void) { return moe_dist_world_rank() == 0; }
const char *moe_dist_group_name(moe_dist_group g); /* "world", "EP", "DP" */

/* The global experts [*first, *end) this rank holds out of n_experts:
 * [ep_rank*E/ep, (ep_rank+1)*E/ep). */
void moe_dist_expert_range(int64_t n_experts, int64_t *first, int64_t *end);

/* Opens (appends to) dir/rank-<R>.log, line-buffered, creating dir if missing.
 * NULL with MOE_ERR_IO in moe_last_error() on failure. The caller fcloses it. */
FILE *moe_dist_log_file(const char *dir);

/* In-place sum over group g of a contiguous tensor: on the CPU F32, F64, I32 or I64; on
 * CUDA also BF16 (staged without NCCL: summed in f32 on the host, rounded once). */
moe_status moe_dist_allreduce_sum(moe_dist_group g, moe_tensor *t);

/* An all-reduce started by moe_dist_allreduce_sum_start, finished by moe_dist_wait. */
typedef struct moe_dist_request moe_dist_request;
/* Starts the in-place sum of t over g (same tensors as moe_dist_allreduce_sum) and
 * returns before it has finished; t must not be read or written until moe_dist_wait(*req).
 * CPU tensors: MPI_Iallreduce. CUDA tensors with NCCL: the sum runs on a communication
 * stream as soon as the work queued so far on the compute stream has finished, so it
 * overlaps the kernels queued after it. Otherwise (a group of one rank, staging) the sum
 * is done on return. *req is NULL when nothing is left to wait for. Starts must be made
 * in the same order on every rank of g, like any collective. */
moe_status moe_dist_allreduce_sum_start(moe_dist_group g, moe_tensor *t, moe_dist_request **req);
/* Finishes and frees req (NULL: nothing to do). CPU: waits for the sum. CUDA: makes the
 * compute stream wait for it (the host does not block unless MOE_DIST_TIMING=1). */
moe_status moe_dist_wait(moe_dist_request *req);
/* In-place sums of n host scalars (loss, sums of squares, load counts). */
moe_status moe_dist_allreduce_f64(moe_dist_group g, double *v, int n);
moe_status moe_dist_allreduce_i64(moe_dist_group g, int64_t *v, int n);
/* Copies `bytes` bytes of buf on the group rank `root` to buf on every rank of g. */
moe_status moe_dist_broadcast(moe_dist_group g, int root, void *buf, size_t bytes);

/* MoE token exchange. send_counts[p] is the number of rows this rank sends to group
 * rank p; afterwards recv_counts[p] is the number of rows p sends to this rank.
 * Both arrays have moe_dist_size(g) entries. */
moe_status moe_dist_alltoall_counts(moe_dist_group g, const int64_t *send_counts,
                                    int64_t *recv_counts);
/* Sends rows send_counts_rows[p] (packed by destination: rows for peer 0 first) and
 * receives recv_counts_rows[p] rows from each peer p, packed by source into recv. One
 * row is row_bytes bytes (d * sizeof(float)). Counts are in rows, so totals beyond
 * 2^31 bytes are fine; each per-rank total must stay below 2^31 rows. send and recv
 * must not overlap. */
moe_status moe_dist_alltoallv(moe_dist_group g, const void *send, const int64_t *send_counts_rows,
                              void *recv, const int64_t *recv_counts_rows, int64_t row_bytes);
/* The same exchange for the rows (first dimension) of contiguous tensors of one device
 * and dtype: send has sum(send_counts_rows) rows, recv sum(recv_counts_rows) rows of the
 * same row shape. CUDA tensors go through NCCL (or staging, see above). */
moe_status moe_dist_alltoallv_tensor(moe_dist_group g, const moe_tensor *send,
                                     const int64_t *send_counts_rows, moe_tensor *recv,
                                     const int64_t *recv_counts_rows);

/* Communication counters of this rank since the start or moe_dist_reset_stats, for the
 * share of step time spent exchanging tokens. Times are wall-clock milliseconds of the
 * calls; for CUDA tensors, whose collectives are queued and return at once, they are
 * only measured with MOE_DIST_TIMING=1 in the environment, which synchronises the device
 * before and after each of them (the before-wait is not counted). */
typedef struct moe_dist_stats {
    int64_t alltoall_calls, alltoall_bytes; /* all-to-all-v exchanges (counts included), bytes sent */
    double alltoall_ms;
    int64_t reduce_starts, reduce_bytes;    /* moe_dist_allreduce_sum_start calls, bytes */
    double reduce_wait_ms;                  /* time moe_dist_wait held the host: the part of the
                                             * overlapped all-reduces not hidden behind other work */
} moe_dist_stats;
moe_dist_stats moe_dist_get_stats(void);
void moe_dist_reset_stats(void);
/* True when MOE_DIST_TIMING=1: CUDA collectives are timed (see moe_dist_stats). */
bool moe_dist_timing(void);

/* Agrees on failure across the world at a step boundary. Every rank passes its local
 * status (for a failure: the status just returned, with its message still in
 * moe_last_error()). Returns MOE_OK when every rank passed MOE_OK; otherwise every rank
 * returns the status of the lowest failing rank R with the message
 * "rank R failed: <R's message>" (plus the other failing ranks, if any), so all ranks
 * can stop cleanly together. MOE_ERR_DIST if the exchange itself fails. A world of one
 * returns `local` with its message unchanged. */
moe_status moe_dist_check_all(moe_status local);

/* ---- Internal: defined in core/dist_single.c (the part built in both builds) for
 * core/dist_mpi.c and the world-of-1 build; not for callers. ---- */

/* MOE_ERR_CONFIG unless 1 <= expert_parallel and it divides world_size. */
moe_status moe_dist_check_ep_(int expert_parallel, int world_size);
/* Checks an all-to-all-v's arguments; the rows sent / received in *send_rows, *recv_rows. */
moe_status moe_dist_check_exchange_(const char *op, int size, const int64_t *send_counts,
                                    const int64_t *recv_counts, int64_t row_bytes,
                                    int64_t *send_rows, int64_t *recv_rows);
/* Checks that a collective's tensor is contiguous and of a dtype that the sum supports on
 * its device (see moe_dist_allreduce_sum). */
moe_status moe_dist_check_tensor_(const char *op, const moe_tensor *t);
/* Checks an all-to-all-v's tensors (contiguous, one device and dtype, row shapes, row
 * counts) and gives the bytes of one row. */
moe_status moe_dist_check_exchange_tensors_(const char *op, int size, const moe_tensor *send,
                                            const int64_t *send_counts, const moe_tensor *recv,
                                            const int64_t *recv_counts, int64_t *row_bytes);
/* A group of one rank: recv <- send (counts checked as for moe_dist_exchange_self_). */
moe_status moe_dist_exchange_self_tensor_(const char *op, const moe_tensor *send,
                                          const int64_t *send_counts, moe_tensor *recv,
                                          const int64_t *recv_counts);
/* The counters behind moe_dist_get_stats, updated by both builds. */
extern moe_dist_stats moe_dist_stats_;
/* A group of one rank: the all-to-all-v copies the rows sent to oneself. */
moe_status moe_dist_exchange_self_(const char *op, const void *send, const int64_t *send_counts,
                                   void *recv, const int64_t *recv_counts, int64_t row_bytes);
/* Sets the failure every rank returns from moe_dist_check_all: "rank R failed: <msg>"
 * followed by `others` (the other failing ranks, or ""); returns status. */
moe_status moe_dist_failure_(moe_status status, int rank, const char *msg, const char *others);

#ifdef MOE_HAVE_CUDA
/* ---- Internal: the CUDA side, core/cuda/dist_nccl.cu, for core/dist_mpi.c. ---- */

/* Makes GPU local_rank % (GPUs visible) current, before the CUDA backend starts. A no-op
 * without a GPU. MOE_ERR_DEVICE when the backend already runs on another GPU. */
moe_status moe_dist_cuda_select_(int local_rank);

#ifdef MOE_HAVE_NCCL
#define MOE_NCCL_ID_BYTES 128 /* sizeof(ncclUniqueId) */
typedef struct moe_nccl_comm moe_nccl_comm;
typedef struct moe_nccl_pending moe_nccl_pending; /* an overlapped all-reduce in flight */
moe_status moe_nccl_unique_id_(unsigned char id[MOE_NCCL_ID_BYTES]);
/* The communicator of this rank (rank of size) in group `group` (named in errors). */
moe_status moe_nccl_comm_init_(moe_nccl_comm **comm, const unsigned char id[MOE_NCCL_ID_BYTES],
                               int rank, int size, moe_dist_group group);
void moe_nccl_comm_free_(moe_nccl_comm *comm);
/* In-place sum of n elements of dtype dt at device address buf. overlap NULL: on the
 * compute stream. Otherwise on the communication stream after the compute stream's
 * queued work; *overlap is then handed to moe_nccl_wait_. */
moe_status moe_nccl_allreduce_(moe_nccl_comm *comm, const char *op, void *buf, int64_t n,
                               moe_dtype dt, moe_nccl_pending **overlap);
/* The compute stream waits for the all-reduce (and, when `block`, the host too); frees p. */
moe_status moe_nccl_wait_(moe_nccl_pending *p, bool block);
/* All-to-all-v of device rows on the compute stream (counts in rows, as for
 * moe_dist_alltoallv; the rows to oneself are a device copy). */
moe_status moe_nccl_alltoallv_(moe_nccl_comm *comm, const char *op, const void *send,
                               const int64_t *send_rows, void *recv, const int64_t *recv_rows,
                               int64_t row_bytes);
#endif
#endif

#endif
