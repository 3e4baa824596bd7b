/* Helpers shared by the CUDA kernels: the backend context (stream, cuBLAS handle),
 * error checks that turn CUDA / cuBLAS failures into moe_error messages, dtype dispatch
 * (F32 and BF16 storage, f32 compute), a strided element iterator for elementwise
 * kernels and block-level reductions. Every kernel runs on the backend's one stream. */
#ifndef MOE_CORE_CUDA_COMMON_CUH
#define MOE_CORE_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

/* The core headers are C11; autograd.h uses _Alignas. */
#ifndef _Alignas
#define _Alignas(x) alignas(x)
#endif
extern "C" {
#include "core/kernels.h"
#include "core/memory.h"
}

#include <initializer_list>

typedef __nv_bfloat16 bf16;

/* ---- backend context (core/cuda/backend_cuda.cu) ---- */
/* The first out-of-range index a kernel met (host-mapped memory the kernels write and the
 * host reads after a synchronisation; see cu_index_fault_check). */
struct cu_index_fault {
    int set;         /* 0 until a kernel records a fault */
    int kernel;      /* an index into cu_index_kernel_names */
    int value;       /* the bad index */
    long long pos;   /* its position in the index tensor */
    long long hi;    /* the valid range is [0, hi) */
};
enum {
    CU_IDX_INDEX_SELECT, CU_IDX_INDEX_ADD, CU_IDX_GATHER, CU_IDX_SCATTER_ADD, CU_IDX_BINCOUNT, CU_IDX_COMBINE,
    CU_IDX_INDEX_COPY, CU_IDX_GATHERED_SWIGLU, CU_IDX_ATTENTION_PAGED, CU_IDX_ROPE_APPEND, CU_IDX_ROUTE_PLAN
};

#define CU_TICKETS 1024
/* Loads a thread issues together before it uses them, where a loop would otherwise wait for
 * each (L2 round trips in a reduction over another block's partial results). */
#define CU_LOADS_AHEAD 8
struct moe_cuda_ctx {
    cudaStream_t stream;
    cu_index_fault *index_fault; /* host-mapped, also a valid device pointer (UVA) */
    unsigned *tickets;   /* CU_TICKETS zeroed counters of blocks done, for kernels whose last block
                            finishes the work (each kernel leaves the ones it used at zero) */
    cublasHandle_t blas;
    int sms;             /* multiprocessors */
    size_t smem_optin;   /* max dynamic shared memory per block after opt-in */
    bool tf32;           /* MOE_CUDA_TF32=1: f32 matmuls may use TF32 tensor cores */
    bool early_launch;   /* cu_launch's kernels may start before the one ahead ends (MOE_CUDA_EARLY_LAUNCH=0: off) */
};
extern moe_cuda_ctx moe_cu;

/* ---- error checks: return a moe_status from the calling function ---- */
#define CU_TRY(call, ...)                                                                      \
    do {                                                                                       \
        cudaError_t cu_e_ = (call);                                                            \
        if (cu_e_ != cudaSuccess) return moe_cu_fail(cu_e_, #call, __VA_ARGS__);               \
    } while (0)

#define CUBLAS_TRY(call, ...)                                                                  \
    do {                                                                                       \
        cublasStatus_t cb_s_ = (call);                                                         \
        if (cb_s_ != CUBLAS_STATUS_SUCCESS) return moe_cublas_fail(cb_s_, #call, __VA_ARGS__); \
    } while (0)

/* After a launch: configuration errors and earlier asynchronous faults. */
#define CU_LAUNCHED(kname) CU_TRY(cudaGetLastError(), "launching the %s kernel", kname)

/* ---- early launch (programmatic dependent launch, sm_90). A chain of small kernels (a decode
 * step's) spends a few microseconds between each kernel's end and the next one's start.
 * cu_launch lets the GPU launch a kernel while the one ahead of it in the stream still runs;
 * such a kernel calls cu_prior_done() before it reads or writes global memory: that waits
 * until the kernels ahead have finished and their writes are visible, then lets the kernel
 * behind start launching in turn. Called in a kernel launched the ordinary way, it returns
 * at once. Graph capture records the early starts as programmatic edges. ---- */
__device__ __forceinline__ void cu_prior_done() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* kernel<<<grid, block, smem, moe_cu.stream>>>(args...), early when moe_cu.early_launch; the
 * kernel must begin with cu_prior_done(). Errors surface through CU_LAUNCHED. */
template <typename... P, typename... A>
static inline void cu_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A... args) {
    cudaLaunchAttribute early;
    early.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    early.val.programmaticStreamSerializationAllowed = moe_cu.early_launch ? 1 : 0;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = moe_cu.stream;
    cfg.attrs = &early;
    cfg.numAttrs = 1;
    (void)cudaLaunchKernelEx(&cfg, kernel, ((P)args)...);
}

moe_status moe_cu_fail(cudaError_t e, const char *call, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* After a stream synchronisation: MOE_ERR_INVALID naming the kernel, value, position and
 * range when a kernel met an out-of-range index since the last check (then cleared). */
moe_status cu_index_fault_check(void);
moe_status moe_cublas_fail(cublasStatus_t s, const char *call, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- dtype dispatch: T = float or bf16 (storage); compute is f32 ---- */
#define CU_FLOAT_DISPATCH(dt, kname, ...)                                                      \
    switch (dt) {                                                                              \
    case MOE_F32: { typedef float T; __VA_ARGS__ } break;                                      \
    case MOE_BF16: { typedef bf16 T; __VA_ARGS__ } break;                                      \
    default:                                                                                   \
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: dtype %s is not supported on cuda (f32, bf16)", \
                         kname, moe_dtype_name(dt));                                           \
    }

__device__ __forceinline__ float ldf(const float *p) { return *p; }
__device__ __forceinline__ float ldf(const bf16 *p) { return __bfloat162float(*p); }
__device__ __forceinline__ void stf(float *p, float v) { *p = v; }
__device__ __forceinline__ void stf(bf16 *p, float v) { *p = __float2bfloat16_rn(v); }
/* ldf through L2 only (__ldcg): for what other blocks of the launch wrote before a ticket. */
__device__ __forceinline__ float ldcgf(const float *p) { return __ldcg(p); }
__device__ __forceinline__ float ldcgf(const bf16 *p) { return __bfloat162float(__ldcg(p)); }

/* Records (once) that index `v` at position `pos` is outside [0, hi); the kernel then
 * skips that element, so memory stays safe and the host reports the fault at the next
 * synchronisation (cu_index_fault_check). */
__device__ __forceinline__ bool cu_index_ok(cu_index_fault *f, int kernel, int32_t v, int64_t pos, int64_t hi) {
    if (v >= 0 && v < hi) return true;
    if (atomicCAS(&f->set, 0, 1) == 0) {
        f->kernel = kernel;
        f->value = v;
        f->pos = pos;
        f->hi = hi;
        __threadfence_system();
    }
    return false;
}

/* ---- launch geometry ---- */
#define CU_THREADS 256
static inline unsigned cu_blocks(int64_t n, int threads = CU_THREADS) {
    int64_t b = (n + threads - 1) / threads, cap = (int64_t)moe_cu.sms * 16;
    if (b > cap) b = cap;
    return (unsigned)(b < 1 ? 1 : b);
}
#define CU_GRID_LOOP(i, n) \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

/* ---- strided iteration over out's shape for N tensors (tensor 0 = out) ----
 * Dims of size 1 are dropped and neighbouring dims that are contiguous in every
 * tensor are merged, so contiguous tensors become one dim of stride 1. */
template <int N> struct cu_iter {
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    int64_t st[N][MOE_MAX_DIMS];
};

template <int N> static cu_iter<N> cu_make_iter(const moe_tensor *const (&t)[N]) {
    cu_iter<N> it = {};
    const moe_tensor *o = t[0];
    for (int d = 0; d < o->ndim; d++) {
        if (o->shape[d] == 1) continue;
        int k = it.ndim;
        bool merge = k > 0;
        for (int j = 0; j < N && merge; j++) merge = it.st[j][k - 1] == t[j]->strides[d] * o->shape[d];
        if (merge) {
            it.shape[k - 1] *= o->shape[d];
            for (int j = 0; j < N; j++) it.st[j][k - 1] = t[j]->strides[d];
        } else {
            it.shape[k] = o->shape[d];
            for (int j = 0; j < N; j++) it.st[j][k] = t[j]->strides[d];
            it.ndim++;
        }
    }
    if (it.ndim == 0) { /* a single element */
        it.ndim = 1;
        it.shape[0] = 1;
        for (int j = 0; j < N; j++) it.st[j][0] = 1;
    }
    return it;
}

template <int N> __device__ __forceinline__ void cu_offsets(const cu_iter<N> &it, int64_t i, int64_t *off) {
    for (int j = 0; j < N; j++) off[j] = 0;
    for (int d = it.ndim - 1; d >= 0; d--) {
        int64_t q = i / it.shape[d], r = i - q * it.shape[d];
        i = q;
        for (int j = 0; j < N; j++) off[j] += r * it.st[j][d];
    }
}

/* f(off) for every element; off[j] = element offset into tensor j. */
template <int N, class F> __global__ void cu_ew_kernel(cu_iter<N> it, int64_t n, F f) {
    int64_t off[N];
    if (it.ndim == 1) {
        CU_GRID_LOOP(i, n) {
            for (int j = 0; j < N; j++) off[j] = i * it.st[j][0];
            f(off);
        }
    } else {
        CU_GRID_LOOP(i, n) {
            cu_offsets(it, i, off);
            f(off);
        }
    }
}

template <int N, class F>
static moe_status cu_elementwise(const char *kname, const moe_tensor *const (&t)[N], F f) {
    int64_t n = moe_tensor_numel(t[0]);
    if (n == 0) return MOE_OK;
    cu_iter<N> it = cu_make_iter(t);
    cu_ew_kernel<N, F><<<cu_blocks(n), CU_THREADS, 0, moe_cu.stream>>>(it, n, f);
    CU_LAUNCHED(kname);
    return MOE_OK;
}

/* ---- 8-wide fast path for contiguous operands ----
 * Loads and stores of 8 consecutive values as 16-byte (bf16) or 2 x 16-byte (f32)
 * accesses: the generic path moves 2-4 bytes per thread and access, far too few in
 * flight for HBM. A functor f(i) handles elements [i, i + 8). */
__device__ __forceinline__ void cu_f32x8(float4 a, float4 b, float *v) {
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void cu_bf16x8(uint4 r, float *v) {
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&r);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(h[i]);
        v[2 * i] = f.x, v[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void cu_ld8(const float *p, float *v) {
    cu_f32x8(reinterpret_cast<const float4 *>(p)[0], reinterpret_cast<const float4 *>(p)[1], v);
}
__device__ __forceinline__ void cu_ld8(const bf16 *p, float *v) { cu_bf16x8(*reinterpret_cast<const uint4 *>(p), v); }
/* cu_ld8 through L2 (__ldcg): values that other blocks of the running kernel wrote. */
__device__ __forceinline__ void cu_ld8cg(const float *p, float *v) {
    cu_f32x8(__ldcg(reinterpret_cast<const float4 *>(p)), __ldcg(reinterpret_cast<const float4 *>(p) + 1), v);
}
__device__ __forceinline__ void cu_ld8cg(const bf16 *p, float *v) { cu_bf16x8(__ldcg(reinterpret_cast<const uint4 *>(p)), v); }
__device__ __forceinline__ void cu_st8(float *p, const float *v) {
    reinterpret_cast<float4 *>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4 *>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void cu_st8(bf16 *p, const float *v) {
    uint4 r;
    __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&r);
#pragma unroll
    for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4 *>(p) = r;
}

/* 8 consecutive values as loaded (16 bytes of bf16, 32 of f32), widened only when used
 * (cu_ld8 on r), so that a lane can have several rows' loads in flight while it sums
 * earlier ones. */
template <class T> struct cu_raw8 {
    uint4 r[sizeof(T) / 2];
};
template <class T> __device__ __forceinline__ void cu_raw8_load(const T *p, cu_raw8<T> &v) {
#pragma unroll
    for (int k = 0; k < (int)(sizeof(T) / 2); k++) v.r[k] = reinterpret_cast<const uint4 *>(p)[k];
}

/* V (8 or 1) consecutive values at p widened: one 16-byte load, or one element. */
template <class T, int V> __device__ __forceinline__ void cu_ldv(const T *p, float *v) {
    if (V == 8) cu_ld8(p, v);
    else v[0] = ldf(p);
}
/* cu_ldv through L2 (__ldcg). */
template <class T, int V> __device__ __forceinline__ void cu_ldvcg(const T *p, float *v) {
    if (V == 8) cu_ld8cg(p, v);
    else v[0] = ldcgf(p);
}
/* Stores V (8 or 1) values at p in T: one 16-byte store, or one element. */
template <class T, int V> __device__ __forceinline__ void cu_stv(T *p, const float *v) {
    if (V == 8) cu_st8(p, v);
    else stf(p, v[0]);
}

/* v rounded to T's precision (what storing it as T and reading it back gives). */
template <class T> __device__ __forceinline__ float cu_round(float v) { return v; }
template <> __device__ __forceinline__ float cu_round<bf16>(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

/* True when n is a multiple of 8 and every pointer is 16-byte aligned. */
static inline bool cu_vec8_ok(int64_t n, std::initializer_list<const void *> ptrs) {
    if (n % 8) return false;
    for (const void *p : ptrs)
        if ((uintptr_t)p % 16) return false;
    return true;
}

template <class F> __global__ void cu_vec8_kernel(int64_t n8, F f) { CU_GRID_LOOP(i, n8) f(i * 8); }

/* f(i) for i = 0, 8, ..., n - 8 (n a multiple of 8). */
template <class F> static moe_status cu_vec8(const char *kname, int64_t n, F f) {
    if (n == 0) return MOE_OK;
    cu_vec8_kernel<F><<<cu_blocks(n / 8), CU_THREADS, 0, moe_cu.stream>>>(n / 8, f);
    CU_LAUNCHED(kname);
    return MOE_OK;
}

/* Raises the dynamic shared-memory limit of `fn` when `bytes` needs it. */
template <class F> static moe_status cu_allow_smem(F fn, size_t bytes, const char *kname) {
    if (bytes > moe_cu.smem_optin)
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: %zu bytes of shared memory exceed the device's %zu", kname, bytes,
                         moe_cu.smem_optin);
    if (bytes > 48 * 1024)
        CU_TRY(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes),
               "%s: allowing %zu bytes of shared memory", kname, bytes);
    return MOE_OK;
}

/* ---- reductions inside a block (blockDim.x a multiple of 32, <= 1024) ---- */
__device__ __forceinline__ float cu_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double cu_warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float cu_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over the block, returned to every thread. `scratch` holds >= 32 values. */
template <class A> __device__ __forceinline__ A cu_block_sum(A v, A *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = cu_warp_sum(v);
    __syncthreads(); /* scratch may still be read from a previous call */
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : (A)0;
    return cu_warp_sum(v);
}

/* Whether this block is the last of n to count on ticket (a zeroed counter, which the last
 * zeroes again for the next launch). Every thread of the block calls it after its writes;
 * those are visible to the last block, whose reads after the call see every counted
 * block's writes (read them through L2: __ldcg). n = 1: the block alone, no count. */
__device__ __forceinline__ bool cu_last_block(unsigned *ticket, unsigned n) {
    __shared__ bool last;
    if (n == 1) { /* the only block: its threads' writes are visible to one another after the barrier */
        __syncthreads();
        return true;
    }
    __threadfence(); /* this block's writes, visible before its count */
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(ticket, 1u) == n - 1;
        if (last) *ticket = 0;
    }
    __syncthreads();
    const bool is_last = last;
    if (is_last) __threadfence();
    return is_last;
}

__device__ __forceinline__ float cu_block_max(float v, float *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = cu_warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : -INFINITY;
    return cu_warp_max(v);
}

/* Threads per block for a row of `cols` elements handled by one block. */
static inline int cu_row_threads(int64_t cols) {
    int t = 32;
    while (t < 1024 && t < cols) t <<= 1;
    return t;
}

/* Rows = all dims but the last (a 0-d tensor is one row of one element). */
static inline int64_t cu_rows(const moe_tensor *t) {
    int64_t r = 1;
    for (int d = 0; d < t->ndim - 1; d++) r *= t->shape[d];
    return r;
}
static inline int64_t cu_cols(const moe_tensor *t) { return t->ndim ? t->shape[t->ndim - 1] : 1; }

/* C = alpha * op(A) @ op(B) + beta * C on strided views (core/cuda/matmul.cu): A, B f32 or
 * bf16, C of their dtype or f32; batch dims as for MATMUL (B may be 2-D and shared). */
moe_status moe_cuda_gemm(const moe_tensor *A, const moe_tensor *B, moe_tensor *C, bool trans_a, bool trans_b,
                         float alpha, float beta);

/* A STEP scratch buffer on the device (freed at the next moe_step_reset). */
static inline void *cu_scratch(size_t bytes) { return moe_mem_alloc(MOE_CUDA, MOE_LIFE_STEP, bytes); }

#endif
