/* The CUDA side of the distributed layer, driven by core/dist_mpi.c (see core/dist.h):
 * picks this rank's GPU and, with NCCL (MOE_HAVE_NCCL), wraps the communicators and the
 * collectives on device memory. Exchanges and plain all-reduces run on the backend's
 * compute stream, in order with the kernels around them. Overlapped all-reduces
 * (gradient buckets) run on a high-priority communication stream, fenced by events: it
 * waits for the compute stream's queued work before the sum, and the compute stream
 * waits for the sum when the caller asks (moe_nccl_wait_). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/cuda/cuda_common.cuh"
extern "C" {
#include "core/dist.h"
}
#ifdef MOE_HAVE_NCCL
#include <nccl.h>
#endif

extern "C" moe_status moe_dist_cuda_select_(int local_rank) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        (void)cudaGetLastError(); /* no GPU (or no driver): this rank computes on the CPU */
        return MOE_OK;
    }
    int want = local_rank % n;
    if (moe_cu.stream) { /* the backend has started, on the GPU that was current then */
        int cur = -1;
        CU_TRY(cudaGetDevice(&cur), "querying the current CUDA device");
        if (cur == want) return MOE_OK;
        return moe_error(MOE_ERR_DEVICE, "local rank %d should use GPU %d, but the CUDA backend already runs on "
                         "GPU %d; initialise the distributed layer (moe_dist_init) before any CUDA work",
                         local_rank, want, cur);
    }
    CU_TRY(cudaSetDevice(want), "selecting GPU %d of %d for local rank %d", want, n, local_rank);
    return MOE_OK;
}

#ifdef MOE_HAVE_NCCL
static_assert(sizeof(ncclUniqueId) == MOE_NCCL_ID_BYTES, "MOE_NCCL_ID_BYTES must be sizeof(ncclUniqueId)");

struct moe_nccl_comm {
    ncclComm_t comm;
    moe_dist_group group;
    int rank, size;
};

struct moe_nccl_pending {
    cudaEvent_t done; /* recorded on the communication stream after the sum */
    moe_nccl_comm *comm;
};

static cudaStream_t comm_stream; /* made on the first overlapped all-reduce */

/* c may be NULL (no communicator yet). */
static moe_status nccl_fail(ncclResult_t r, const char *op, const moe_nccl_comm *c) {
    const char *detail = ncclGetLastError(c ? c->comm : NULL);
    char where[96] = "";
    if (c)
        snprintf(where, sizeof where, " over the %s group (rank %d of %d)", moe_dist_group_name(c->group), c->rank,
                 c->size);
    return moe_error(MOE_ERR_DEVICE, "%s%s failed: NCCL %s%s%s; if another rank failed first, its log says why "
                     "(NCCL_DEBUG=WARN tells more)", op, where, ncclGetErrorString(r), detail && *detail ? ": " : "",
                     detail ? detail : "");
}

#define NCCL_TRY(call, op, c)                                        \
    do {                                                             \
        ncclResult_t nccl_r_ = (call);                               \
        if (nccl_r_ != ncclSuccess) return nccl_fail(nccl_r_, op, c); \
    } while (0)

/* NVLink multicast (NVLS) can leave a shared host's GPUs unusable for a long time: it is
 * off unless the environment asks for it (NCCL_NVLS_ENABLE=1). Read by NCCL at its first use. */
static void nccl_defaults(void) { setenv("NCCL_NVLS_ENABLE", "0", 0); }

extern "C" moe_status moe_nccl_unique_id_(unsigned char id[MOE_NCCL_ID_BYTES]) {
    nccl_defaults();
    ncclUniqueId u;
    NCCL_TRY(ncclGetUniqueId(&u), "ncclGetUniqueId", NULL);
    memcpy(id, &u, sizeof u);
    return MOE_OK;
}

extern "C" moe_status moe_nccl_comm_init_(moe_nccl_comm **out, const unsigned char id[MOE_NCCL_ID_BYTES], int rank,
                                          int size, moe_dist_group group) {
    nccl_defaults();
    moe_nccl_comm *c = (moe_nccl_comm *)calloc(1, sizeof *c);
    if (!c) return moe_error(MOE_ERR_OOM, "ncclCommInitRank: out of host memory");
    c->group = group;
    c->rank = rank;
    c->size = size;
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    ncclResult_t r = ncclCommInitRank(&c->comm, size, u, rank);
    if (r != ncclSuccess) {
        c->comm = NULL;
        moe_status s = nccl_fail(r, "ncclCommInitRank", c);
        free(c);
        return s;
    }
    *out = c;
    return MOE_OK;
}

extern "C" void moe_nccl_comm_free_(moe_nccl_comm *c) {
    if (!c) return;
    ncclCommDestroy(c->comm);
    free(c);
}

static ncclDataType_t nccl_type(moe_dtype dt) {
    switch (dt) {
    case MOE_F32: return ncclFloat32;
    case MOE_BF16: return ncclBfloat16;
    case MOE_F64: return ncclFloat64;
    case MOE_I32: return ncclInt32;
    default: return ncclInt64;
    }
}

static moe_status comm_stream_get(void) {
    if (comm_stream) return MOE_OK;
    int least = 0, greatest = 0;
    CU_TRY(cudaDeviceGetStreamPriorityRange(&least, &greatest), "querying the stream priorities");
    CU_TRY(cudaStreamCreateWithPriority(&comm_stream, cudaStreamNonBlocking, greatest),
           "creating the communication stream");
    return MOE_OK;
}

/* The communication stream waits for the work queued so far on the compute stream. */
static moe_status comm_stream_follow_compute(void) {
    cudaEvent_t ready;
    CU_TRY(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), "creating an event");
    cudaError_t e = cudaEventRecord(ready, moe_cu.stream);
    if (e == cudaSuccess) e = cudaStreamWaitEvent(comm_stream, ready, 0);
    cudaEventDestroy(ready); /* released once the wait is satisfied */
    if (e != cudaSuccess)
        return moe_cu_fail(e, "cudaEventRecord/cudaStreamWaitEvent", "fencing the communication stream");
    return MOE_OK;
}

extern "C" moe_status moe_nccl_allreduce_(moe_nccl_comm *c, const char *op, void *buf, int64_t n, moe_dtype dt,
                                          moe_nccl_pending **overlap) {
    if (!overlap) {
        NCCL_TRY(ncclAllReduce(buf, buf, (size_t)n, nccl_type(dt), ncclSum, c->comm, moe_cu.stream), op, c);
        return MOE_OK;
    }
    *overlap = NULL;
    MOE_TRY(comm_stream_get());
    MOE_TRY(comm_stream_follow_compute());
    NCCL_TRY(ncclAllReduce(buf, buf, (size_t)n, nccl_type(dt), ncclSum, c->comm, comm_stream), op, c);
    moe_nccl_pending *p = (moe_nccl_pending *)calloc(1, sizeof *p);
    if (!p) return moe_error(MOE_ERR_OOM, "%s: out of host memory", op);
    p->comm = c;
    cudaError_t e = cudaEventCreateWithFlags(&p->done, cudaEventDisableTiming);
    if (e == cudaSuccess) {
        e = cudaEventRecord(p->done, comm_stream);
        if (e != cudaSuccess) cudaEventDestroy(p->done);
    }
    if (e != cudaSuccess) {
        free(p);
        return moe_cu_fail(e, "cudaEventRecord", "marking the end of %s", op);
    }
    *overlap = p;
    return MOE_OK;
}

extern "C" moe_status moe_nccl_wait_(moe_nccl_pending *p, bool block) {
    cudaError_t e = cudaStreamWaitEvent(moe_cu.stream, p->done, 0);
    if (e == cudaSuccess && block) e = cudaEventSynchronize(p->done);
    cudaEventDestroy(p->done);
    moe_nccl_comm *c = p->comm;
    free(p);
    if (e != cudaSuccess) return moe_cu_fail(e, "cudaStreamWaitEvent", "waiting for an overlapped all-reduce");
    ncclResult_t async = ncclSuccess; /* a failure inside NCCL after the call returned */
    NCCL_TRY(ncclCommGetAsyncError(c->comm, &async), "ncclCommGetAsyncError", c);
    if (async != ncclSuccess && async != ncclInProgress) return nccl_fail(async, "an overlapped all-reduce", c);
    return MOE_OK;
}

extern "C" moe_status moe_nccl_alltoallv_(moe_nccl_comm *c, const char *op, const void *send, const int64_t *send_rows,
                                          void *recv, const int64_t *recv_rows, int64_t row_bytes) {
    const char *s = (const char *)send;
    char *r = (char *)recv;
    int me = c->rank;
    if (send_rows[me] != recv_rows[me])
        return moe_error(MOE_ERR_INVALID, "%s over the %s group: rank %d sends %lld rows to itself but expects %lld",
                         op, moe_dist_group_name(c->group), me, (long long)send_rows[me], (long long)recv_rows[me]);
    int64_t send_at = 0, recv_at = 0;
    for (int p = 0; p < me; p++) {
        send_at += send_rows[p];
        recv_at += recv_rows[p];
    }
    if (send_rows[me])
        CU_TRY(cudaMemcpyAsync(r + recv_at * row_bytes, s + send_at * row_bytes, (size_t)(send_rows[me] * row_bytes),
                               cudaMemcpyDeviceToDevice, moe_cu.stream),
               "copying the %lld rows rank %d keeps in %s", (long long)send_rows[me], me, op);
    /* Counts are known on both sides (this rank's send count to p is p's receive count
     * from it), so zero-row peers are skipped symmetrically. */
    NCCL_TRY(ncclGroupStart(), op, c);
    ncclResult_t first = ncclSuccess;
    send_at = recv_at = 0;
    for (int p = 0; p < c->size; p++) {
        ncclResult_t rs = ncclSuccess, rr = ncclSuccess;
        if (p != me && send_rows[p])
            rs = ncclSend(s + send_at * row_bytes, (size_t)(send_rows[p] * row_bytes), ncclUint8, p, c->comm,
                          moe_cu.stream);
        if (p != me && recv_rows[p])
            rr = ncclRecv(r + recv_at * row_bytes, (size_t)(recv_rows[p] * row_bytes), ncclUint8, p, c->comm,
                          moe_cu.stream);
        if (first == ncclSuccess) first = rs != ncclSuccess ? rs : rr;
        send_at += send_rows[p];
        recv_at += recv_rows[p];
    }
    ncclResult_t end = ncclGroupEnd(); /* always closes the group, even after a failed call */
    if (first != ncclSuccess) return nccl_fail(first, op, c);
    if (end != ncclSuccess) return nccl_fail(end, op, c);
    return MOE_OK;
}
#endif
