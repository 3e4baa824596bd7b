/* A one-line description of the CUDA runtime, driver, cuBLAS and device, for logs and
 * `moe inspect`. Implemented in core/cuda/backend_cuda.cu: only call it when the build
 * has CUDA (MOE_HAVE_CUDA). */
#ifndef MOE_CORE_CUDA_INFO_H
#define MOE_CORE_CUDA_INFO_H

#ifdef __cplusplus
extern "C" {
#endif

/* "cuda runtime 13.0, driver 13.0, cuBLAS 13.1.0, device NVIDIA H200 (sm_90, 132 SMs, 140 GiB)",
 * or "cuda: no device" (moe_last_error() then says why). */
const char *moe_cuda_describe(void);

#ifdef __cplusplus
}
#endif

#endif
