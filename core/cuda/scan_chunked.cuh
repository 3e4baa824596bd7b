/* Pieces shared by the chunked forward and backward of DELTA_SCAN on CUDA
 * (core/cuda/scan_chunked.cu, core/cuda/scan_chunked_bwd.cu): row-major batched GEMMs on
 * f32 buffers, the chunk-major gather and scatter, and the per-chunk decay products and
 * unit-lower-triangular inverse done inside one block. */
#ifndef MOE_CORE_CUDA_SCAN_CHUNKED_CUH
#define MOE_CORE_CUDA_SCAN_CHUNKED_CUH

#include "core/cuda/cuda_common.cuh"

/* Longest chunk of the chunked form: a block holds two [C, C + 1] f32 matrices. */
#define SCAN_CHUNKED_MAX_C 128

/* Row-major batched GEMM on f32 buffers: C_b = alpha op(A_b) op(B_b) + beta C_b for b < batch,
 * C_b [M, N]; op(A) = A^T when ta (A stored [K, M]), likewise B. */
static moe_status rm_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                          int64_t sA, const float *B, int64_t ldb, int64_t sB, float beta, float *C, int64_t ldc,
                          int64_t sC, int64_t batch, cublasComputeType_t ct) {
    /* column-major view: C^T [N, M] = op(B)^T op(A)^T */
    const cublasOperation_t opA = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opB = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_TRY(cublasGemmStridedBatchedEx_64(moe_cu.blas, opB, opA, N, M, K, &alpha, B, CUDA_R_32F, ldb, sB, A,
                                             CUDA_R_32F, lda, sA, &beta, C, CUDA_R_32F, ldc, sC, batch, ct,
                                             CUBLAS_GEMM_DEFAULT),
               "delta_scan (chunked): [%lld x %lld] @ [%lld x %lld] x %lld", (long long)M, (long long)K, (long long)K,
               (long long)N, (long long)batch);
    return MOE_OK;
}

/* Element i of a chunk-major buffer [N H, nc, C, d]: its offset in [N, T, H, d], or -1 for a
 * padding row past T. */
__device__ inline int64_t scan_chunk_source(int64_t i, int64_t Tn, int64_t H, int64_t d, int64_t C, int64_t nc) {
    const int64_t col = i % d, row = i / d, b = row / C, p = b / nc, t = (b % nc) * C + row % C;
    return t < Tn ? (((p / H) * Tn + t) * H + p % H) * d + col : -1;
}

/* x [N, T, H, d] (storage T) -> xc [N H, nc, C, d] f32, zero rows past T. */
template <class T>
__global__ void scan_gather_kernel(const T *x, float *xc, int64_t Tn, int64_t H, int64_t d, int64_t C, int64_t nc,
                                   int64_t n_all) {
    CU_GRID_LOOP(i, n_all) {
        const int64_t e = scan_chunk_source(i, Tn, H, d, C, nc);
        xc[i] = e >= 0 ? ldf(x + e) : 0.0f;
    }
}

/* oc [N H, nc, C, d] f32 -> o [N, T, H, d] (storage T), rows t < T. */
template <class T>
__global__ void scan_scatter_kernel(const float *oc, T *o, int64_t Tn, int64_t H, int64_t d, int64_t C, int64_t nc,
                                    int64_t n_all) {
    CU_GRID_LOOP(i, n_all) {
        const int64_t e = scan_chunk_source(i, Tn, H, d, C, nc);
        if (e >= 0) stf(o + e, oc[i]);
    }
}

/* rows of xc [B, C, d] times v [B, C]. */
static __global__ void scan_scale_rows_kernel(float *xc, const float *v, int64_t d, int64_t n_all) {
    CU_GRID_LOOP(i, n_all) xc[i] *= v[i / d];
}

/* Alpha and beta of the C steps of chunk b = p nc + c (pair p = n H + h) into av, bv;
 * padding steps past T get alpha 1, beta 0. */
template <class T>
__device__ void scan_chunk_load_ab(const T *alpha, const T *beta, float *av, float *bv, int64_t b, int64_t C,
                                   int64_t nc, int64_t Tn, int64_t H) {
    const int64_t c = b % nc, p = b / nc;
    for (int64_t r = threadIdx.x; r < C; r += blockDim.x) {
        const int64_t t = c * C + r, e = ((p / H) * Tn + t) * H + p % H;
        av[r] = t < Tn ? ldf(alpha + e) : 1.0f;
        bv[r] = t < Tn ? ldf(beta + e) : 0.0f;
    }
}

/* R[r][s] = prod_{j=s+1..r} alpha_j (s <= r; row stride ld) and gam[r] = prod_{j<=r} alpha_j,
 * by products (an alpha of 0 is exact). */
__device__ inline void scan_chunk_decays(const float *av, float *R, int64_t ld, float *gam, int64_t C) {
    for (int64_t r = threadIdx.x; r < C; r += blockDim.x) {
        float prod = 1.0f;
        R[r * ld + r] = 1.0f;
        for (int64_t s = r; s > 0; s--) R[r * ld + s - 1] = prod *= av[s];
        gam[r] = prod * av[0];
    }
}

/* X = (I + L)^{-1} for L strictly lower triangular (L's entries s < r are read), X unit lower
 * triangular: each thread solves its columns row by row (no exchange between threads). */
__device__ inline void scan_chunk_unit_lower_inverse(const float *L, float *X, int64_t ld, int64_t C) {
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
        for (int64_t r = 0; r < C; r++) {
            float acc = 0.0f;
            for (int64_t s = j; s < r; s++) acc += L[r * ld + s] * X[s * ld + j];
            X[r * ld + j] = r < j ? 0.0f : (r == j ? 1.0f : -acc);
        }
    }
}

#endif
