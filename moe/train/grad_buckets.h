/* Gradient all-reduce, overlapped with the backward (the trainer, train.c, drives it).
 * Each rank sums its grads with the ranks that hold the same parameters: dense ones over
 * the world, experts over the data-parallel group (1/world of the mean goes into the
 * optimizer's grad_scale, so it costs no extra pass). The grads of the parameters to sum
 * live in buckets: flat PERSIST buffers of up to 32 MiB on CUDA, 64 MiB on the CPU
 * (MOE_GRAD_BUCKET_KB overrides), filled in reverse registration order, roughly the order
 * in which the backward finishes them; each grad is a view into its bucket, so nothing
 * is packed or unpacked. During the backward of the last micro-step the autograd
 * readiness hook counts each bucket's final grads, and a complete bucket's all-reduce
 * starts at once (MPI_Iallreduce on the CPU; on CUDA an NCCL sum on a communication
 * stream, after the kernels that made the grads) while the backward goes on. Buckets
 * start strictly in index order, so every rank starts the same collectives in the same
 * order whatever order its backward finishes them in. After the backward every rank
 * starts the buckets not yet started (parameters the tape did not use, or a failed
 * backward), and the clip and the optimizer come after moe_dist_wait on all of them.
 * MOE_GRAD_OVERLAP=0 starts every bucket after the backward instead. */
#ifndef MOE_TRAIN_GRAD_BUCKETS_H
#define MOE_TRAIN_GRAD_BUCKETS_H

#include <stdbool.h>
#include <stdint.h>

#include "core/dist.h"
#include "moe/model/model.h"

typedef struct moe_grad_bucket {
    moe_dist_group group;
    moe_dtype dtype;
    int64_t elems;
    moe_tensor *flat;      /* the grads of its parameters are views into it */
    int n_params, n_ready; /* its parameters, and those whose grad is final in this backward */
    moe_dist_request *req; /* started, not yet waited for */
} moe_grad_bucket;

typedef struct moe_grad_buckets {
    moe_grad_bucket *b;
    int n, started;    /* buckets [0, started) have been started this step */
    moe_status status; /* the first failure to start one, with its message */
    char msg[512];
} moe_grad_buckets;

/* Plans the buckets, allocates them zeroed and makes the grad of every parameter to sum a
 * view into its bucket (a grad already there is copied in). No buckets on one rank. */
moe_status moe_grad_buckets_init(moe_grad_buckets *gs, moe_model *m);
/* The buckets' storage (free the model's grads, views into it, with the model). */
void moe_grad_buckets_free(moe_grad_buckets *gs);
/* A new step: no bucket started, no grad final yet. */
void moe_grad_buckets_begin(moe_grad_buckets *gs);
/* Starts, in index order, the next buckets whose grads are all final (all: every bucket
 * left). A failure is kept for moe_grad_buckets_finish; the starts go on, to keep the
 * ranks' collectives matched. */
void moe_grad_buckets_start(moe_grad_buckets *gs, bool all);
/* The autograd readiness hook (moe_set_grad_ready_hook, user = the buckets): p's grad is
 * final; it counts for the bucket holding it. */
void moe_grad_buckets_ready(moe_tensor *p, void *user);
/* Waits for every started bucket; returns the first failure to start or finish one. */
moe_status moe_grad_buckets_finish(moe_grad_buckets *gs);
/* False under MOE_GRAD_OVERLAP=0: no bucket starts before the backward has finished. */
bool moe_grad_buckets_overlap(void);

#endif
