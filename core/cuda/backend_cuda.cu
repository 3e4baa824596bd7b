/* The CUDA backend: lazy initialisation (device, one non-default stream, a cuBLAS
 * handle on that stream with its own workspace), device memory, transfers, and the
 * table of CUDA kernels (moe_cuda_<kernel>, weak so that a missing one shows as NULL).
 * Environment: MOE_CUDA_TF32=1 lets f32 matmuls use TF32 tensor cores (default: exact f32). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/cuda/cuda_common.cuh"
#include "core/cuda_info.h"

#define BLAS_WORKSPACE_BYTES (32u << 20)

moe_cuda_ctx moe_cu;

static moe_status vfail(const char *lib, const char *call, const char *err, const char *fmt, va_list ap) {
    char what[512];
    vsnprintf(what, sizeof what, fmt, ap);
    return moe_error(MOE_ERR_DEVICE, "%s call %s failed while %s: %s", lib, call, what, err);
}

moe_status moe_cu_fail(cudaError_t e, const char *call, const char *fmt, ...) {
    char err[256];
    snprintf(err, sizeof err, "%s (%s)%s", cudaGetErrorName(e), cudaGetErrorString(e),
             e == cudaErrorIllegalAddress || e == cudaErrorLaunchFailure
                 ? "; the context is lost: an earlier kernel faulted, rerun with compute-sanitizer"
                 : "");
    va_list ap;
    va_start(ap, fmt);
    moe_status s = vfail("CUDA", call, err, fmt, ap);
    va_end(ap);
    return s;
}

moe_status moe_cublas_fail(cublasStatus_t st, const char *call, const char *fmt, ...) {
    char err[256];
    snprintf(err, sizeof err, "%s (%s)", cublasGetStatusName(st), cublasGetStatusString(st));
    va_list ap;
    va_start(ap, fmt);
    moe_status s = vfail("cuBLAS", call, err, fmt, ap);
    va_end(ap);
    return s;
}

/* ---- initialisation ---- */
static int init_state;            /* 0 not tried, 1 ready, -1 failed */
static char init_error[512];
static cudaDeviceProp props;
static void *blas_workspace;

static moe_status init_device(void) {
    int n = 0;
    CU_TRY(cudaGetDeviceCount(&n), "looking for CUDA devices (is the NVIDIA driver loaded?)");
    if (n == 0) return moe_error(MOE_ERR_UNSUPPORTED, "no CUDA device found (cudaGetDeviceCount returned 0)");
    int dev = 0;
    CU_TRY(cudaGetDevice(&dev), "querying the current CUDA device");
    CU_TRY(cudaGetDeviceProperties(&props, dev), "reading the properties of CUDA device %d", dev);
    moe_cu.sms = props.multiProcessorCount;
    moe_cu.smem_optin = props.sharedMemPerBlockOptin;
    CU_TRY(cudaStreamCreateWithFlags(&moe_cu.stream, cudaStreamNonBlocking), "creating the CUDA stream");
    CUBLAS_TRY(cublasCreate(&moe_cu.blas), "creating the cuBLAS handle");
    CUBLAS_TRY(cublasSetStream(moe_cu.blas, moe_cu.stream), "binding cuBLAS to the stream");
    CU_TRY(cudaMalloc(&blas_workspace, BLAS_WORKSPACE_BYTES), "allocating the %u MiB cuBLAS workspace",
           BLAS_WORKSPACE_BYTES >> 20);
    CUBLAS_TRY(cublasSetWorkspace(moe_cu.blas, blas_workspace, BLAS_WORKSPACE_BYTES), "setting the cuBLAS workspace");
    CU_TRY(cudaHostAlloc((void **)&moe_cu.index_fault, sizeof *moe_cu.index_fault, cudaHostAllocMapped),
           "allocating the index-fault word (host-mapped)");
    memset(moe_cu.index_fault, 0, sizeof *moe_cu.index_fault);
    CU_TRY(cudaMalloc((void **)&moe_cu.tickets, CU_TICKETS * sizeof *moe_cu.tickets), "allocating the block tickets");
    CU_TRY(cudaMemset(moe_cu.tickets, 0, CU_TICKETS * sizeof *moe_cu.tickets), "zeroing the block tickets");
    const char *tf = getenv("MOE_CUDA_TF32");
    moe_cu.tf32 = tf && strcmp(tf, "1") == 0;
    const char *early = getenv("MOE_CUDA_EARLY_LAUNCH");
    moe_cu.early_launch = !early || strcmp(early, "0") != 0;
    return MOE_OK;
}

/* ---- memory and transfers ---- */
static void *cuda_alloc(size_t bytes) {
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e == cudaSuccess) return p;
    (void)cudaGetLastError(); /* allocation failures are not sticky: clear the slot */
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    if (e == cudaErrorMemoryAllocation)
        moe_error(MOE_ERR_OOM, "out of memory on cuda: asked %.1f MiB, %.1f MiB free of %.1f MiB (smaller batch or sequence?)",
                  bytes / 1048576.0, free_b / 1048576.0, total_b / 1048576.0);
    else
        moe_cu_fail(e, "cudaMalloc", "allocating %.1f MiB (%.1f MiB free of %.1f MiB)", bytes / 1048576.0,
                    free_b / 1048576.0, total_b / 1048576.0);
    return NULL;
}

static void cuda_free(void *p) {
    if (!p) return;
    cudaError_t e = cudaFree(p);
    if (e != cudaSuccess) moe_cu_fail(e, "cudaFree", "freeing device memory at %p", p);
}

static const char *const index_kernel_names[] = {"index_select", "index_add", "gather",    "scatter_add",
                                                 "bincount",     "combine",   "index_copy",
                                                 "gathered_swiglu", "attention_paged", "rope_append",
                                                 "route_plan"};

moe_status cu_index_fault_check(void) {
    volatile cu_index_fault *f = moe_cu.index_fault;
    if (!f || !f->set) return MOE_OK;
    cu_index_fault c = {f->set, f->kernel, f->value, f->pos, f->hi};
    f->set = 0;
    return moe_error(MOE_ERR_INVALID, "%s: %s %d at position %lld is out of range [0, %lld) (checked on the device; the "
                     "element was skipped and the fault reported at the next synchronisation)",
                     index_kernel_names[c.kernel], c.kernel == CU_IDX_BINCOUNT || c.kernel == CU_IDX_ROUTE_PLAN ? "value" : "index", c.value, c.pos, c.hi);
}

/* Host-to-device copies go through a pinned staging ring so that they need not wait:
 * the host data is copied into the ring at once (the caller may reuse its buffer), the
 * device copy runs in stream order. When the ring wraps, the stream is synchronised
 * once (every earlier copy out of the ring is then done). Copies larger than half the
 * ring (parameter loads, not steady-state steps) wait for themselves instead. */
#define STAGE_BYTES ((size_t)32 << 20)
static char *stage_ring;
static size_t stage_used;

static moe_status cuda_memcpy_to(void *dst, const void *src, size_t bytes, moe_device src_dev) {
    if (!bytes) return MOE_OK;
    if (src_dev == MOE_CUDA) {
        CU_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, moe_cu.stream),
               "copying %zu bytes device to device", bytes);
        return MOE_OK;
    }
    if (!stage_ring && bytes <= STAGE_BYTES / 2)
        CU_TRY(cudaHostAlloc((void **)&stage_ring, STAGE_BYTES, cudaHostAllocDefault),
               "allocating the %zu MiB pinned staging buffer", STAGE_BYTES >> 20);
    if (bytes > STAGE_BYTES / 2) {
        CU_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, moe_cu.stream),
               "copying %zu bytes host to device", bytes);
        CU_TRY(cudaStreamSynchronize(moe_cu.stream), "waiting for a %zu-byte host-to-device copy", bytes);
        return MOE_OK;
    }
    size_t at = (stage_used + 255) & ~(size_t)255;
    if (at + bytes > STAGE_BYTES) {
        CU_TRY(cudaStreamSynchronize(moe_cu.stream), "waiting for the staged host-to-device copies");
        at = 0;
    }
    memcpy(stage_ring + at, src, bytes);
    stage_used = at + bytes;
    CU_TRY(cudaMemcpyAsync(dst, stage_ring + at, bytes, cudaMemcpyHostToDevice, moe_cu.stream),
           "copying %zu bytes host to device", bytes);
    return MOE_OK;
}

static moe_status cuda_memcpy_from(void *dst_host, const void *src, size_t bytes) {
    if (!bytes) return MOE_OK;
    CU_TRY(cudaMemcpyAsync(dst_host, src, bytes, cudaMemcpyDeviceToHost, moe_cu.stream), "copying %zu bytes device to host",
           bytes);
    CU_TRY(cudaStreamSynchronize(moe_cu.stream), "waiting for a %zu-byte device-to-host copy (or a kernel before it)",
           bytes);
    return cu_index_fault_check();
}

static moe_status cuda_memset(void *p, int byte, size_t bytes) {
    if (!bytes) return MOE_OK;
    CU_TRY(cudaMemsetAsync(p, byte, bytes, moe_cu.stream), "setting %zu bytes of device memory", bytes);
    return MOE_OK;
}

static moe_status cuda_sync(void) {
    CU_TRY(cudaStreamSynchronize(moe_cu.stream), "waiting for the CUDA stream (a kernel launched earlier failed)");
    return cu_index_fault_check();
}

/* ---- recording (CUDA graphs) ----
 * Relaxed capture: the step arena may still call cudaMalloc while a first recording runs
 * (the recording is then invalidated at the next step by the arena's generation). */
static moe_status cuda_capture_begin(void) {
    CU_TRY(cudaStreamBeginCapture(moe_cu.stream, cudaStreamCaptureModeRelaxed), "starting a graph capture");
    return MOE_OK;
}

static moe_status cuda_capture_end(bool keep, void **exec) {
    *exec = NULL;
    cudaGraph_t graph = NULL;
    cudaError_t e = cudaStreamEndCapture(moe_cu.stream, &graph);
    if (!keep || e != cudaSuccess) {
        if (graph) cudaGraphDestroy(graph);
        cudaGetLastError(); /* a failed capture leaves its error behind */
        if (!keep) return MOE_OK;
        CU_TRY(e, "ending a graph capture");
    }
    cudaGraphExec_t g = NULL;
    e = cudaGraphInstantiate(&g, graph, 0);
    cudaGraphDestroy(graph);
    CU_TRY(e, "instantiating a captured graph");
    *exec = g;
    return MOE_OK;
}

static moe_status cuda_graph_launch(void *exec) {
    CU_TRY(cudaGraphLaunch((cudaGraphExec_t)exec, moe_cu.stream), "launching a graph");
    return MOE_OK;
}

static void cuda_graph_free(void *exec) {
    if (exec) cudaGraphExecDestroy((cudaGraphExec_t)exec);
}

/* ---- device-side timing marks (MOE_PROFILE=3, 4) ---- */
static cudaEvent_t *marks;
static int n_marks, cap_marks;
#define MARKS_MAX (1 << 20)

static int cuda_mark(void) {
    if (n_marks == cap_marks) {
        int cap = cap_marks ? 2 * cap_marks : 4096;
        cudaEvent_t *m = cap <= MARKS_MAX ? (cudaEvent_t *)realloc(marks, sizeof *m * (size_t)cap) : NULL;
        if (!m) return -1;
        for (int i = cap_marks; i < cap; i++)
            if (cudaEventCreate(&m[i]) != cudaSuccess) {
                marks = m;
                cap_marks = i;
                return -1;
            }
        marks = m;
        cap_marks = cap;
    }
    return cudaEventRecord(marks[n_marks], moe_cu.stream) == cudaSuccess ? n_marks++ : -1;
}

static double cuda_mark_ms(int from, int to) {
    float ms = 0;
    return cudaEventElapsedTime(&ms, marks[from], marks[to]) == cudaSuccess ? ms : 0.0;
}

static void cuda_marks_reset(void) { n_marks = 0; }

/* ---- the kernel table ---- */
#define MOE_X_DECL_CUDA(ID, name) extern "C" moe_status moe_cuda_##name(const moe_kernel_args *a) __attribute__((weak));
MOE_KERNEL_LIST(MOE_X_DECL_CUDA)
#undef MOE_X_DECL_CUDA

static const moe_backend cuda_backend = {
    .name = "cuda",
    .device = MOE_CUDA,
    .alloc = cuda_alloc,
    .free = cuda_free,
    .memcpy_to = cuda_memcpy_to,
    .memcpy_from = cuda_memcpy_from,
    .memset = cuda_memset,
    .sync = cuda_sync,
    .mark = cuda_mark,
    .mark_ms = cuda_mark_ms,
    .marks_reset = cuda_marks_reset,
    .capture_begin = cuda_capture_begin,
    .capture_end = cuda_capture_end,
    .graph_launch = cuda_graph_launch,
    .graph_free = cuda_graph_free,
    .kernels = {
#define MOE_X_CUDA_ENTRY(ID, name) moe_cuda_##name,
        MOE_KERNEL_LIST(MOE_X_CUDA_ENTRY)
#undef MOE_X_CUDA_ENTRY
    },
};

extern "C" const moe_backend *moe_cuda_backend(void) {
    if (init_state == 0) {
        init_state = init_device() == MOE_OK ? 1 : -1;
        if (init_state < 0) snprintf(init_error, sizeof init_error, "%s", moe_last_error());
    }
    if (init_state < 0) {
        moe_error(MOE_ERR_UNSUPPORTED, "cuda backend unavailable: %s", init_error);
        return NULL;
    }
    return &cuda_backend;
}

extern "C" const char *moe_cuda_describe(void) {
    static char buf[256];
    if (!moe_cuda_backend()) return "cuda: no device";
    int rt = 0, drv = 0, bmaj = 0, bmin = 0, bpat = 0;
    cudaRuntimeGetVersion(&rt);
    cudaDriverGetVersion(&drv);
    cublasGetProperty(MAJOR_VERSION, &bmaj);
    cublasGetProperty(MINOR_VERSION, &bmin);
    cublasGetProperty(PATCH_LEVEL, &bpat);
    snprintf(buf, sizeof buf, "cuda runtime %d.%d, driver %d.%d, cuBLAS %d.%d.%d, device %s (sm_%d%d, %d SMs, %.0f GiB)",
             rt / 1000, rt % 1000 / 10, drv / 1000, drv % 1000 / 10, bmaj, bmin, bpat, props.name, props.major,
             props.minor, props.multiProcessorCount, props.totalGlobalMem / 1073741824.0);
    return buf;
}
