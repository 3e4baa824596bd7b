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
 * library code and tests need no init. Collectives are CPU-only (host buffers); they
 * must be called by every rank of the group in the same order, from the thread that
 * called moe_dist_init (MPI_THREAD_FUNNELED). Failures return MOE_ERR_DIST with a
 * message naming the collective, the group and the MPI error string. */
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

/* Initialises MPI (MPI_Init_thread, FUNNELED) unless it already is (a program run
 * without mpirun is a world of 1), makes failures on our communicators return
 * statuses (MPI_ERRORS_RETURN) and builds the groups for `expert_parallel`.
 * MOE_ERR_CONFIG when expert_parallel < 1 or does not divide the world size. */
moe_status moe_dist_init(int *argc, char ***argv, int expert_parallel);
/* Rebuilds the EP and DP groups (collective over the world; every rank passes the same
 * ep, else MOE_ERR_DIST). On failure the previous groups are kept. */
moe_status moe_dist_set_expert_parallel(int expert_parallel);
/* Frees the groups and finalises MPI if moe_dist_init initialised it. */
void moe_dist_finalize(void);

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

/* In-place sum over group g of a contiguous CPU tensor (F32, F64, I32 or I64). */
moe_status moe_dist_allreduce_sum(moe_dist_group g, moe_tensor *t);
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
/* Checks that a collective's tensor is a contiguous CPU f32/f64/i32/i64 tensor. */
moe_status moe_dist_check_tensor_(const char *op, const moe_tensor *t);
/* A group of one rank: the all-to-all-v copies the rows sent to oneself. */
moe_status moe_dist_exchange_self_(const char *op, const void *send, const int64_t *send_counts,
                                   void *recv, const int64_t *recv_counts, int64_t row_bytes);
/* Sets the failure every rank returns from moe_dist_check_all: "rank R failed: <msg>"
 * followed by `others` (the other failing ranks, or ""); returns status. */
moe_status moe_dist_failure_(moe_status status, int rank, const char *msg, const char *others);

#endif
