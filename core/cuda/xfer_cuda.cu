/* The copy stream of the expert copy queue (see xfer_cuda.h). */
extern "C" {
#include "core/cuda/xfer_cuda.h"
}

#include "core/cuda/cuda_common.cuh"

extern "C" moe_status moe_cuda_copy_stream_create(void **stream, int *device) {
    cudaStream_t s;
    CU_TRY(cudaGetDevice(device), "querying the current CUDA device for the copy stream");
    CU_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "creating the expert copy stream");
    *stream = (void *)s;
    return MOE_OK;
}

extern "C" void moe_cuda_copy_stream_free(void *stream) {
    if (stream) cudaStreamDestroy((cudaStream_t)stream);
}

extern "C" moe_status moe_cuda_fence_record(void **fence) {
    if (!*fence) {
        cudaEvent_t e;
        CU_TRY(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "creating a copy fence");
        *fence = (void *)e;
    }
    CU_TRY(cudaEventRecord((cudaEvent_t)*fence, moe_cu.stream), "recording a copy fence on the compute stream");
    return MOE_OK;
}

extern "C" void moe_cuda_event_free(void *event) {
    if (event) cudaEventDestroy((cudaEvent_t)event);
}

extern "C" moe_status moe_cuda_copy_issue(void *stream, int device, void *fence, void **landed, void *dst,
                                          const void *src, size_t bytes) {
    cudaStream_t s = (cudaStream_t)stream;
    CU_TRY(cudaSetDevice(device), "selecting CUDA device %d on the copy thread", device);
    if (!*landed) {
        cudaEvent_t e;
        CU_TRY(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "creating a copy's landing event");
        *landed = (void *)e;
    }
    if (fence) CU_TRY(cudaStreamWaitEvent(s, (cudaEvent_t)fence, 0), "ordering a copy after the compute stream");
    CU_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s), "copying %zu bytes of an expert to the device",
           bytes);
    CU_TRY(cudaEventRecord((cudaEvent_t)*landed, s), "recording an expert copy's landing event");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_copy_settle(void *landed) {
    CU_TRY(cudaEventSynchronize((cudaEvent_t)landed), "waiting for an expert copy");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_compute_wait(void *landed) {
    CU_TRY(cudaStreamWaitEvent(moe_cu.stream, (cudaEvent_t)landed, 0), "ordering compute after an expert copy");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_host_register(void *p, size_t bytes) {
    CU_TRY(cudaHostRegister(p, bytes, cudaHostRegisterDefault), "page-locking %zu bytes of the expert store", bytes);
    return MOE_OK;
}

extern "C" void moe_cuda_host_unregister(void *p) {
    if (p) cudaHostUnregister(p);
}
