/* Host-to-device transfers off the compute path: a copy queue per device, served by a copy
 * thread (on CUDA it issues each copy on a copy stream of its own, two ahead of their
 * landing so that the next starts as the last lands, each after a fence of the
 * compute stream recorded when the job was submitted, so device memory is never overwritten
 * before the kernels queued to read it have run; on the CPU it moves the bytes from the host
 * store into a second host arena standing in for device memory).
 *
 * The caller owns each job (a struct it embeds, e.g. in an expert cache slot) and keeps it
 * alive until it is done or cancelled. Jobs run in queue order; an urgent job goes ahead
 * of every queued non-urgent one (after earlier urgent ones), and moe_xfer_expedite moves
 * a queued job there. Compute waits on one job (moe_xfer_wait), never on the whole queue;
 * on CUDA the compute stream waits for the copy's event, so the host goes on queueing
 * kernels while the copy lands. */
#ifndef MOE_CORE_XFER_H
#define MOE_CORE_XFER_H

#include <stdbool.h>
#include <stddef.h>

#include "core/status.h"
#include "core/tensor.h"

typedef enum moe_xfer_state { MOE_XFER_IDLE, MOE_XFER_QUEUED, MOE_XFER_COPYING, MOE_XFER_DONE } moe_xfer_state;

typedef struct moe_xfer_job {
    void *dst;       /* device memory */
    const void *src; /* host memory */
    size_t bytes;
    bool urgent;
    moe_xfer_state state; /* read it through moe_xfer_done (the queue's lock guards it) */
    moe_status status;    /* of the copy, once DONE */
    void *fence;          /* CUDA: the compute stream's point the copy waits for */
    void *landed;         /* CUDA: an event on the copy stream after the copy */
    bool issued;          /* CUDA: the copy and its event are on the copy stream */
    struct moe_xfer_job *prev, *next;
} moe_xfer_job;

typedef struct moe_xfer moe_xfer;

/* A copy queue for device `dev` (its thread or stream starts here). */
moe_status moe_xfer_create(moe_device dev, moe_xfer **out);
/* Waits for the job in progress, drops the queued ones (their state goes back to IDLE). */
void moe_xfer_free(moe_xfer *x);

/* Queues job j (state IDLE or DONE) copying j->bytes from j->src to j->dst. */
moe_status moe_xfer_submit(moe_xfer *x, moe_xfer_job *j, bool urgent);
/* What a job holds besides its fields (its events); the job may be submitted again. */
void moe_xfer_job_release(moe_xfer_job *j);
/* A queued job jumps ahead of the non-urgent ones; no-op once it is copying or done. */
void moe_xfer_expedite(moe_xfer *x, moe_xfer_job *j);
bool moe_xfer_done(moe_xfer *x, moe_xfer_job *j);
/* The compute path's wait on one transfer: a job still queued is issued here, on the
 * caller's thread (behind the copies landing, ahead of the rest of the queue). On the CPU,
 * blocks until job j is done; on CUDA, blocks only until the copy is on the copy stream,
 * then makes the compute stream wait for it to land. The copy's status (a CUDA copy that
 * fails after its issue surfaces at the next synchronisation). */
moe_status moe_xfer_wait(moe_xfer *x, moe_xfer_job *j);
/* Takes a queued job off the queue (back to IDLE), or waits for it when it is copying.
 * Returns whether it had been copied (DONE). */
bool moe_xfer_cancel(moe_xfer *x, moe_xfer_job *j);

/* Page-locks host memory the copies read (CUDA; a no-op on the CPU), and unlocks it. */
moe_status moe_xfer_pin(moe_device dev, void *p, size_t bytes);
void moe_xfer_unpin(moe_device dev, void *p);
/* A PERSIST host tensor page-locked for copies to `dev` (plain host memory when dev is the
 * CPU); free it with moe_xfer_pinned_free for the same dev. */
moe_tensor *moe_xfer_pinned_empty(moe_device dev, moe_dtype dt, int ndim, const int64_t *shape);
void moe_xfer_pinned_free(moe_device dev, moe_tensor *t);

/* Bytes copied and the copy engine's busy time so far (the achieved rate is their ratio). */
void moe_xfer_stats(moe_xfer *x, size_t *bytes, double *busy_ms);

#endif
