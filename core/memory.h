/* Memory by lifetime. STEP memory is a bump arena per device that moe_step_reset()
 * rewinds; once a step has run, the arena holds one chunk large enough for it, so a
 * steady-state step never calls malloc / cudaMalloc. PERSIST memory goes straight to
 * the backend's allocator and is freed with the tensor. */
#ifndef MOE_CORE_MEMORY_H
#define MOE_CORE_MEMORY_H

#include <stddef.h>
#include <stdint.h>

#include "core/tensor.h"

/* NULL with moe_last_error() set ("out of memory on cuda: asked 1.2 GiB, 0.3 GiB free"). */
void *moe_mem_alloc(moe_device dev, moe_lifetime life, size_t bytes);
/* bytes: the size that was allocated (for the statistics). */
void moe_mem_free(moe_device dev, moe_lifetime life, void *p, size_t bytes);
/* Host memory for tensor structs and tape nodes of the current step. */
void *moe_step_host_alloc(size_t bytes);

/* A point in a device's STEP arena. Memory taken after it goes back with
 * moe_mem_step_release once nothing allocated since is used any more: moe_kernel_run
 * releases what a kernel took for its own scratch when the kernel returns (outputs are
 * allocated before the call; device work is ordered on the one compute stream, so later
 * kernels that reuse the bytes run after the ones that used them). */
typedef struct moe_mem_mark {
    bool top;          /* a point of the top end (taken while moe_mem_step_from_top is on) */
    int cur;           /* forward end: its chunk; top end: how many blocks it had handed out */
    size_t used;       /* forward end: bytes used in that chunk */
    size_t total_used; /* bytes the end held */
} moe_mem_mark;
/* The end that new memory comes from now; release rewinds that end. */
moe_mem_mark moe_mem_step_mark(moe_device dev);
void moe_mem_step_release(moe_device dev, moe_mem_mark mark);

/* A freeing backward (moe_backward_freeing): while on, every device's new STEP memory
 * comes from the top end, below the forward's activations, so that the sweep can rewind
 * the forward end behind it with moe_mem_step_rewind_forward. What the top end holds
 * stays until moe_step_reset (or a release of a top mark). */
void moe_mem_step_from_top(bool on);
/* Rewinds dev's forward end to mark (a forward-end mark) when mark lies below its fill. */
void moe_mem_step_rewind_forward(moe_device dev, moe_mem_mark mark);
/* Where p lies in dev's forward end, as a mark to compare with moe_mem_mark_before;
 * false when p is not memory the forward end holds. */
bool moe_mem_step_position(moe_device dev, const void *p, moe_mem_mark *at);
/* Gives back the top-end block that starts at p, when it is live and was asked for with
 * exactly `bytes` (> 0): the next top allocations may reuse it. false (nothing done)
 * otherwise, e.g. for a view of part of a block. For a freeing backward handing back
 * grads nothing will read any more. */
bool moe_mem_step_give_back(moe_device dev, const void *p, size_t bytes);
/* Changes whenever dev's step arena hands chunks back to the allocator (so that memory
 * at a mark may now lie elsewhere); equal generations and marks mean equal addresses. */
uint64_t moe_mem_step_generation(moe_device dev);
/* a lies before b in the forward end's fill order. */
bool moe_mem_mark_before(moe_mem_mark a, moe_mem_mark b);

/* Ends a step: forgets the tape and every STEP tensor, rewinds the arenas. */
void moe_step_reset(void);

/* Tests: fill every new STEP allocation with 0xff bytes (NaN for floats), so an
 * element a kernel forgot to write shows up. */
void moe_mem_set_poison(bool on);
/* Tests: snug step arenas. Chunks start at 4 KiB instead of 64 MiB, and a step that
 * needed several leaves one of exactly its peak, so that the next such step fills it
 * and reuses rewound memory at once, as a large step does. Between steps only: hands the
 * arenas' chunks back. */
void moe_mem_set_snug(bool on);

typedef struct moe_mem_stats {
    size_t persist_bytes, persist_peak;   /* live PERSIST bytes */
    size_t step_bytes, step_peak;         /* STEP bytes in use, peak over all steps */
    size_t step_capacity;                 /* arena capacity held */
    size_t backend_allocs;                /* calls into the backend allocator */
} moe_mem_stats;
moe_mem_stats moe_mem_get_stats(moe_device dev);
/* Starts the peaks afresh from the bytes in use now (a run's own peak). */
void moe_mem_reset_peaks(moe_device dev);

#endif
