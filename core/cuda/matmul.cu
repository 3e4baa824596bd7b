/* CUDA matmul through cuBLAS (f32 accumulate; exact f32 unless MOE_CUDA_TF32=1; products
 * of at most 4 rows with a narrow right operand through our skinny kernels below) and the
 * grouped expert matmul: one cublasGemmEx per non-empty expert, one
 * cublasGemmGroupedBatchedEx for all of them, or the rows all experts have as one batched
 * GEMM and the rest grouped, whichever measures fastest: none wins everywhere (H200, cuBLAS
 * 13.1, bf16: the loop took moe-layer-gpu fwd+bwd to 8.4 ms from 10.3, the grouped call took
 * the LM training step to 96 ms from 133). The first nine calls of each (mode, dtype, shape,
 * expert count) take the three ways in turn under CUDA events; the fastest median is kept
 * from then on (gg_tune). MOE_GROUPED_CUBLAS=0, 1 or 2 forces one.
 *
 * Row-major operands map onto column-major cuBLAS by computing C^T = B^T A^T: a row-major
 * [r, c] matrix with leading stride ld is a column-major [c, r] one with the same ld, and
 * a column-major view (a transposed tensor) just flips the op flag. Views that are
 * neither, or whose batch dims do not collapse to one stride, are copied to contiguous
 * STEP scratch first. */
#include <stdlib.h>
#include <string.h>

#include "core/cuda/cuda_common.cuh"
#include "core/cuda/norm.cuh"
#include "core/cuda/route.cuh"

extern "C" moe_status moe_cuda_copy(const moe_kernel_args *a);
extern "C" moe_status moe_cuda_fill(const moe_kernel_args *a);
extern "C" moe_status moe_cuda_scalar(const moe_kernel_args *a);

static cudaDataType cu_type(moe_dtype dt) { return dt == MOE_BF16 ? CUDA_R_16BF : CUDA_R_32F; }
static cublasComputeType_t cu_compute(moe_dtype dt) {
    return dt == MOE_F32 && moe_cu.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
}

/* Layout of the last two dims [r, c] with strides (sr, sc). */
typedef struct {
    bool ok, row_major;
    int64_t ld;
} mat_layout;

static mat_layout layout_of(int64_t r, int64_t c, int64_t sr, int64_t sc) {
    mat_layout L = {false, false, 0};
    int64_t ldr = r == 1 ? (c > 1 ? c : 1) : sr; /* size-1 dims may carry any stride */
    int64_t ldc = c == 1 ? (r > 1 ? r : 1) : sc;
    if ((c == 1 || sc == 1) && ldr >= (c > 1 ? c : 1)) {
        L.ok = L.row_major = true;
        L.ld = ldr;
    } else if ((r == 1 || sr == 1) && ldc >= (r > 1 ? r : 1)) {
        L.ok = true;
        L.ld = ldc;
    }
    return L;
}

/* The batch dims [0, nb) collapse to one stride (0 when there is one batch). */
static bool batch_stride(const moe_tensor *t, int nb, int64_t *stride) {
    int64_t s = 0, span = 0;
    bool first = true;
    for (int d = nb - 1; d >= 0; d--) {
        if (t->shape[d] == 1) continue;
        if (first) {
            s = t->strides[d];
            first = false;
        } else if (t->strides[d] != span) {
            return false;
        }
        span = t->strides[d] * t->shape[d];
    }
    *stride = s;
    return true;
}

/* A contiguous STEP copy of t (same dtype, on the device). */
static moe_tensor *contiguous_copy(const moe_tensor *t, moe_status *st) {
    moe_tensor *c = moe_tensor_empty(MOE_LIFE_STEP, MOE_CUDA, t->dtype, t->ndim, t->shape);
    if (!c) {
        *st = moe_last_status();
        return NULL;
    }
    moe_kernel_args args = {};
    args.out = c;
    args.in[0] = t;
    *st = moe_cuda_copy(&args);
    return *st == MOE_OK ? c : NULL;
}

static void swap_last2(moe_tensor *t) {
    int n = t->ndim;
    int64_t s = t->shape[n - 1], st = t->strides[n - 1];
    t->shape[n - 1] = t->shape[n - 2];
    t->strides[n - 1] = t->strides[n - 2];
    t->shape[n - 2] = s;
    t->strides[n - 2] = st;
}

/* An operand ready for cuBLAS: a usable layout and one batch stride, else a copy. */
static moe_status prepare(moe_tensor *t, int nb, mat_layout *L, int64_t *bstride) {
    int n = t->ndim;
    *L = layout_of(t->shape[n - 2], t->shape[n - 1], t->strides[n - 2], t->strides[n - 1]);
    bool nb_ok = batch_stride(t, nb, bstride);
    if (L->ok && nb_ok) return MOE_OK;
    moe_status st;
    moe_tensor *c = contiguous_copy(t, &st);
    if (!c) return st;
    *t = *c;
    *L = layout_of(t->shape[n - 2], t->shape[n - 1], t->strides[n - 2], t->strides[n - 1]);
    batch_stride(t, nb, bstride);
    return MOE_OK;
}

/* C = alpha * A @ B + beta * C on prepared operands; C's layout decides the mapping. */
static moe_status gemm_batched(const moe_tensor *A, mat_layout LA, int64_t sA, const moe_tensor *B, mat_layout LB,
                               int64_t sB, moe_tensor *C, mat_layout LC, int64_t sC, int64_t batch, float alpha,
                               float beta) {
    int nd = C->ndim;
    int64_t M = C->shape[nd - 2], N = C->shape[nd - 1], K = A->shape[A->ndim - 1];
    /* Row-major C: compute C^T[N, M] = B^T A^T. Column-major C: C[M, N] = A B. */
    const moe_tensor *X = LC.row_major ? B : A, *Y = LC.row_major ? A : B;
    mat_layout LX = LC.row_major ? LB : LA, LY = LC.row_major ? LA : LB;
    int64_t sX = LC.row_major ? sB : sA, sY = LC.row_major ? sA : sB;
    int64_t m = LC.row_major ? N : M, n = LC.row_major ? M : N;
    /* For row-major C the operands are wanted transposed: a row-major one is that already. */
    cublasOperation_t opX = (LX.row_major == LC.row_major) ? CUBLAS_OP_N : CUBLAS_OP_T;
    cublasOperation_t opY = (LY.row_major == LC.row_major) ? CUBLAS_OP_N : CUBLAS_OP_T;
    CUBLAS_TRY(cublasGemmStridedBatchedEx_64(moe_cu.blas, opX, opY, m, n, K, &alpha, X->data, cu_type(X->dtype), LX.ld,
                                             sX, Y->data, cu_type(Y->dtype), LY.ld, sY, &beta, C->data,
                                             cu_type(C->dtype), LC.ld, sC, batch, cu_compute(A->dtype),
                                             CUBLAS_GEMM_DEFAULT),
               "matmul of [%lld x %lld] @ [%lld x %lld], batch %lld, %s -> %s", (long long)M, (long long)K,
               (long long)K, (long long)N, (long long)batch, moe_dtype_name(A->dtype), moe_dtype_name(C->dtype));
    return MOE_OK;
}

/* ---- skinny GEMM: C [M, N] = A [M, K] @ B [K, N] for at most SK_MAX_ROWS rows of A and a
 * row-major B of at most SK_MAX_COLS columns (a decode step's output and router
 * projections). cuBLAS gives such a product one block per column tile, a few dozen
 * blocks, well under the memory rate. Here B's rows are also split over blocks: grid
 * (column tiles of SK_TILE, splits of K), each lane summing 8 columns (16-byte loads of B)
 * for every row of A in registers; a block's warps are reduced in shared memory in a fixed
 * order; with several splits each block leaves its sums in f32 and the last of a column
 * tile's blocks to finish (a ticket per tile) adds the tile's sums in split order and
 * writes C, so one launch does it all. Deterministic; f32 accumulation as cuBLAS's. ---- */
#define SK_MAX_ROWS 4
#define SK_MAX_COLS 4096
#define SK_TILE 64
#define SK_THREADS 256
#define SK_ROWS_PER_SPLIT 128 /* at least this many rows of B per split */
static_assert(SK_MAX_COLS / SK_TILE < CU_TICKETS, "a ticket per column tile, and the last one for the epilogues");

/* The last of tile c0's splits: every split's sums of the tile, added in split order, a
 * thread's loads of SK_SPLITS_AHEAD splits in flight at once (one round for a decode step's
 * products: K = 2048 makes at most 16 splits). */
#define SK_SPLITS_AHEAD 16
template <class T, int MR>
__device__ void skinny_finish(const float *part, int64_t splits, int64_t c0, int64_t N, T *C, int64_t ldc) {
    for (int j = threadIdx.x; j < MR * SK_TILE; j += blockDim.x) {
        const int m = j / SK_TILE, c = j % SK_TILE;
        if (c0 + c >= N) continue;
        const float *p = part + m * N + c0 + c; /* split k's sum at p + k MR N */
        float sum = 0;
        for (int64_t k0 = 0; k0 < splits; k0 += SK_SPLITS_AHEAD) {
            float v[SK_SPLITS_AHEAD];
#pragma unroll
            for (int u = 0; u < SK_SPLITS_AHEAD; u++) v[u] = k0 + u < splits ? __ldcg(p + (k0 + u) * MR * N) : 0.0f;
#pragma unroll
            for (int u = 0; u < SK_SPLITS_AHEAD; u++)
                if (k0 + u < splits) sum += v[u];
        }
        stf(C + m * ldc + c0 + c, sum);
    }
}

/* What the last block of a skinny product does with C [MR, N] once every column tile is
 * written: nothing (SK_PLAIN); select on C's rows of logits (SK_ROUTE, route_select: gates
 * and ids); or add C to the residual rows x and normalise them (SK_ADD_NORM,
 * matmul_add_rmsnorm: y and sum, rows of N, 16-byte aligned). ticket (skinny_launch sets
 * it): a zeroed counter of the blocks that finished a column tile. */
enum sk_epilogue_kind { SK_PLAIN, SK_ROUTE, SK_ADD_NORM };
template <class T> struct sk_epilogue {
    unsigned *ticket;
    const float *bias; /* SK_ROUTE: [N] or NULL */
    T *gates;          /* SK_ROUTE: [MR, sp.k] */
    int32_t *ids;      /* SK_ROUTE: [MR, sp.k] */
    moe_route_spec sp;
    const T *x, *w; /* SK_ADD_NORM: residual [MR, N], norm weight [N] */
    T *y, *sum;     /* SK_ADD_NORM: [MR, N] */
    float eps;
};

/* After a block wrote a column tile of C whole: the last such block of the grid runs the
 * epilogue (a warp a row selects: route_row; the block adds and normalises row after row:
 * add_norm_row, C read through L2). */
template <class T, int MR, int EPI>
__device__ void skinny_epilogue(const T *C, int64_t ldc, int64_t N, const sk_epilogue<T> &ep) {
    static_assert(MR <= SK_THREADS / 32, "a warp a row");
    __shared__ float sh[32];
    if (!cu_last_block(ep.ticket, gridDim.x)) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if constexpr (EPI == SK_ROUTE) {
        if (warp < MR)
            route_row<T>(C + warp * ldc, ep.bias, ep.gates + warp * ep.sp.k, ep.ids + warp * ep.sp.k, (int)N, ep.sp, lane);
    } else {
#pragma unroll 1
        for (int m = 0; m < MR; m++)
            add_norm_row<T, 8, true>(ep.x + m * N, C + m * ldc, ep.w, ep.y + m * N, ep.sum + m * N, N, ep.eps, sh);
    }
}

/* The rows of B a lane loads at once before summing, and before the wait for the kernel ahead
 * when B is not its output (b_early: weights, which that kernel's tail then hides). */
#define SK_AHEAD 8
template <class T>
__device__ __forceinline__ void skinny_load_ahead(const T *B, int64_t ldb, int64_t col, int64_t i0, int64_t stride,
                                                  int64_t r1, cu_raw8<T> (&ahead)[SK_AHEAD]) {
#pragma unroll
    for (int u = 0; u < SK_AHEAD; u++)
        if (i0 + u * stride < r1) cu_raw8_load(B + (i0 + u * stride) * ldb + col, ahead[u]);
}

/* acc[m][0..8) += A[m, i] * v for the MR rows of A. */
template <class T, int MR>
__device__ __forceinline__ void skinny_fma(const T *A, int64_t lda, int64_t i, const float (&v)[8],
                                           float (&acc)[MR][8]) {
#pragma unroll
    for (int m = 0; m < MR; m++) {
        const float a = ldf(A + m * lda + i);
#pragma unroll
        for (int q = 0; q < 8; q++) acc[m][q] = fmaf(a, v[q], acc[m][q]);
    }
}

template <class T, int MR, int EPI>
__global__ void __launch_bounds__(SK_THREADS)
    skinny_kernel(const T *A, int64_t lda, const T *B, int64_t ldb, int64_t K, int64_t N, int64_t rows_per_split,
                  float *part, unsigned *tickets, T *C, int64_t ldc, bool b_early, sk_epilogue<T> ep) {
    constexpr int LANES = SK_TILE / 8, STEP = 32 / LANES, WARPS = SK_THREADS / 32;
    __shared__ float red[WARPS * STEP][MR][SK_TILE];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, sub = lane / LANES, l = lane % LANES;
    const int64_t c0 = (int64_t)blockIdx.x * SK_TILE, col = c0 + l * 8;
    const int64_t r0 = (int64_t)blockIdx.y * rows_per_split, r1 = min(K, r0 + rows_per_split);
    const int64_t i0 = r0 + warp * STEP + sub, stride = WARPS * STEP, ahead_end = min(r1, i0 + SK_AHEAD * stride);
    cu_raw8<T> ahead[SK_AHEAD]; /* the lane's first rows of B, loaded before the wait when b_early */
    if (b_early && col < N) skinny_load_ahead(B, ldb, col, i0, stride, r1, ahead);
    cu_prior_done();
    if (!b_early && col < N) skinny_load_ahead(B, ldb, col, i0, stride, r1, ahead);
    float acc[MR][8] = {};
    if (col < N) { /* N is a multiple of 8 */
#pragma unroll
        for (int u = 0; u < SK_AHEAD; u++)
            if (i0 + u * stride < r1) {
                float v[8];
                cu_ld8(reinterpret_cast<const T *>(ahead[u].r), v);
                skinny_fma<T, MR>(A, lda, i0 + u * stride, v, acc);
            }
#pragma unroll 4
        for (int64_t i = ahead_end; i < r1; i += stride) {
            float v[8];
            cu_ld8(B + i * ldb + col, v);
            skinny_fma<T, MR>(A, lda, i, v, acc);
        }
    }
#pragma unroll
    for (int m = 0; m < MR; m++)
#pragma unroll
        for (int q = 0; q < 8; q++) red[warp * STEP + sub][m][l * 8 + q] = acc[m][q];
    __syncthreads();
    for (int j = threadIdx.x; j < MR * SK_TILE; j += blockDim.x) {
        const int m = j / SK_TILE, c = j % SK_TILE;
        if (c0 + c >= N) continue;
        float sum = 0;
        for (int q = 0; q < WARPS * STEP; q++) sum += red[q][m][c];
        if (part) part[((int64_t)blockIdx.y * MR + m) * N + c0 + c] = sum;
        else stf(C + m * ldc + c0 + c, sum);
    }
    if (part) { /* the last of the tile's splits adds their sums */
        if (!cu_last_block(&tickets[blockIdx.x], gridDim.y)) return;
        skinny_finish<T, MR>(part, gridDim.y, c0, N, C, ldc);
    }
    if constexpr (EPI != SK_PLAIN) skinny_epilogue<T, MR, EPI>(C, ldc, N, ep);
}

template <class T, int MR, int EPI>
static moe_status skinny_launch(const T *A, int64_t lda, const T *B, int64_t ldb, int64_t K, int64_t N, T *C,
                                int64_t ldc, bool b_early, const sk_epilogue<T> &ep) {
    const int64_t tiles = (N + SK_TILE - 1) / SK_TILE, max_splits = K / SK_ROWS_PER_SPLIT > 1 ? K / SK_ROWS_PER_SPLIT : 1;
    int64_t splits = (2 * (int64_t)moe_cu.sms + tiles - 1) / tiles;
    splits = splits < max_splits ? splits : max_splits;
    const int64_t rows_per_split = (K + splits - 1) / splits;
    splits = (K + rows_per_split - 1) / rows_per_split;
    float *part = NULL;
    if (splits > 1 && !(part = (float *)cu_scratch(sizeof(float) * (size_t)(splits * MR * N)))) return moe_last_status();
    sk_epilogue<T> e = ep;
    e.ticket = moe_cu.tickets + CU_TICKETS - 1; /* the epilogue's: past the column tiles' */
    cu_launch(skinny_kernel<T, MR, EPI>, dim3((unsigned)tiles, (unsigned)splits), SK_THREADS, 0, A, lda, B, ldb, K, N,
              rows_per_split, part, moe_cu.tickets, C, ldc, b_early, e);
    CU_LAUNCHED(EPI == SK_ROUTE ? "route_select (skinny)" : EPI == SK_ADD_NORM ? "matmul_add_rmsnorm (skinny)"
                                                                            : "matmul (skinny)");
    return MOE_OK;
}

/* C [rows, N] = A [rows, K] @ B [K, N], all row-major with leading strides lda, ldb, ldc;
 * then the epilogue EPI (ep) on C's rows. b_persist: B is a persistent tensor (weights),
 * which no kernel of the chain ahead writes (those that start their dependents early are
 * a forward's, whose outputs are step tensors and the KV pools), so its first rows are
 * loaded before the wait for that chain. */
template <class T, int EPI>
static moe_status skinny_gemm(const T *A, int64_t lda, const T *B, int64_t ldb, int64_t K, int64_t N, T *C,
                              int64_t ldc, int64_t rows, bool b_persist, const sk_epilogue<T> &ep) {
    switch (rows) {
    case 1: return skinny_launch<T, 1, EPI>(A, lda, B, ldb, K, N, C, ldc, b_persist, ep);
    case 2: return skinny_launch<T, 2, EPI>(A, lda, B, ldb, K, N, C, ldc, b_persist, ep);
    case 3: return skinny_launch<T, 3, EPI>(A, lda, B, ldb, K, N, C, ldc, b_persist, ep);
    default: return skinny_launch<T, 4, EPI>(A, lda, B, ldb, K, N, C, ldc, b_persist, ep);
    }
}

/* Whether C [rows, N] = A @ B takes the skinny kernels: few rows, a narrow row-major B with
 * 16-byte rows, row-major A and C of B's dtype, a plain product (alpha 1, beta 0). */
static bool skinny_fits(int64_t rows, int64_t N, const moe_tensor *A, mat_layout LA, const moe_tensor *B,
                        mat_layout LB, const moe_tensor *C, mat_layout LC, float alpha, float beta) {
    return rows >= 1 && rows <= SK_MAX_ROWS && N <= SK_MAX_COLS && N % 8 == 0 && LA.row_major && LB.row_major &&
           LC.row_major && LB.ld % 8 == 0 && (uintptr_t)B->data % 16 == 0 && C->dtype == A->dtype && alpha == 1.0f &&
           beta == 0.0f;
}

moe_status moe_cuda_gemm(const moe_tensor *a_in, const moe_tensor *b_in, moe_tensor *c_out, bool trans_a, bool trans_b,
                         float alpha, float beta) {
    moe_tensor A = *a_in, B = *b_in, C = *c_out;
    bool types_ok = (A.dtype == MOE_F32 || A.dtype == MOE_BF16) && B.dtype == A.dtype &&
                    (C.dtype == A.dtype || C.dtype == MOE_F32);
    if (!types_ok)
        return moe_error(MOE_ERR_UNSUPPORTED, "matmul: %s @ %s -> %s is not supported on cuda (f32 or bf16 operands, same or f32 output)",
                         moe_dtype_name(A.dtype), moe_dtype_name(B.dtype), moe_dtype_name(C.dtype));
    if (trans_a) swap_last2(&A);
    if (trans_b) swap_last2(&B);
    int nd = C.ndim, nb = nd - 2;
    int64_t M = C.shape[nd - 2], N = C.shape[nd - 1], batch = 1;
    for (int d = 0; d < nb; d++) batch *= C.shape[d];
    if (M == 0 || N == 0 || batch == 0) return MOE_OK;
    if (A.shape[A.ndim - 1] == 0) { /* empty inner dim: out = beta * out */
        moe_op_attrs_scalar sc = {MOE_SC_MUL, beta};
        moe_kernel_args args = {};
        args.out = c_out;
        args.in[0] = c_out;
        args.attrs = &sc;
        return beta == 0.0f ? moe_cuda_fill(&args) : moe_cuda_scalar(&args);
    }
    /* b shared by all batches: a strided 2-D operand, batch stride 0. */
    bool shared_b = B.ndim == 2 && nb > 0;
    mat_layout LA, LB, LC;
    int64_t sA, sB = 0, sC;
    MOE_TRY(prepare(&A, nb, &LA, &sA));
    MOE_TRY(prepare(&B, shared_b ? 0 : nb, &LB, &sB));
    moe_tensor *Cw = &C;
    moe_tensor Ccopy;
    LC = layout_of(M, N, C.strides[nd - 2], C.strides[nd - 1]);
    bool c_direct = LC.ok && batch_stride(&C, nb, &sC);
    if (!c_direct) { /* an odd output view: work in a contiguous copy, then scatter back */
        moe_status st;
        moe_tensor *cc = contiguous_copy(&C, &st);
        if (!cc) return st;
        Ccopy = *cc;
        Cw = &Ccopy;
        LC = layout_of(M, N, Cw->strides[nd - 2], Cw->strides[nd - 1]);
        batch_stride(Cw, nb, &sC);
    }
    /* A few rows in all (a decode step's projection): the skinny kernels. */
    const int64_t K = A.shape[A.ndim - 1];
    const bool one_matrix = batch == 1 || (shared_b && sA == M * LA.ld && sC == M * LC.ld);
    if (c_direct && (nb == 0 || shared_b || batch == 1) && one_matrix &&
        skinny_fits(M * batch, N, &A, LA, &B, LB, Cw, LC, alpha, beta)) {
        CU_FLOAT_DISPATCH(A.dtype, "matmul",
            return skinny_gemm<T, SK_PLAIN>((const T *)A.data, LA.ld, (const T *)B.data, LB.ld, K, N,
                                            (T *)Cw->data, LC.ld, M * batch, b_in->life == MOE_LIFE_PERSIST,
                                            sk_epilogue<T>{});)
    }
    /* b shared and a, C row-major with rows evenly spaced across batches: one big GEMM. */
    if (shared_b && batch > 1 && LA.row_major && LC.row_major && sA == M * LA.ld && sC == M * LC.ld) {
        moe_tensor A2 = A, C2 = *Cw;
        A2.ndim = C2.ndim = 2;
        A2.shape[0] = C2.shape[0] = M * batch;
        A2.shape[1] = A.shape[A.ndim - 1];
        A2.strides[0] = LA.ld;
        A2.strides[1] = 1;
        C2.shape[1] = N;
        C2.strides[0] = LC.ld;
        C2.strides[1] = 1;
        MOE_TRY(gemm_batched(&A2, LA, 0, &B, LB, 0, &C2, LC, 0, 1, alpha, beta));
    } else {
        MOE_TRY(gemm_batched(&A, LA, sA, &B, LB, sB, Cw, LC, sC, batch, alpha, beta));
    }
    if (!c_direct) {
        moe_kernel_args args = {};
        args.out = c_out;
        args.in[0] = Cw;
        return moe_cuda_copy(&args);
    }
    return MOE_OK;
}

extern "C" moe_status moe_cuda_matmul(const moe_kernel_args *a) {
    const moe_matmul_attrs *at = (const moe_matmul_attrs *)a->attrs;
    return moe_cuda_gemm(a->in[0], a->in[1], a->out, false, false, at->alpha, at->beta); /* transposes arrive as views */
}

extern "C" moe_status moe_cuda_route_topk(const moe_kernel_args *a);

/* ROUTE_SELECT: the logits x [n, d] @ w [d, E] into step scratch; up to SK_MAX_ROWS tokens
 * one skinny kernel whose last block selects, else the product then route_topk. */
extern "C" moe_status moe_cuda_route_select(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0], *w = a->in[1], *bias = a->in[2];
    const int64_t n = x->shape[0], d = x->shape[1], E = w->shape[1];
    if (bias && bias->dtype != MOE_F32)
        return moe_error(MOE_ERR_UNSUPPORTED, "route_select: the bias must be f32 on cuda, got %s",
                         moe_dtype_name(bias->dtype));
    if (E > INT32_MAX) return moe_error(MOE_ERR_INVALID, "route_select: %lld experts are too many", (long long)E);
    if (n == 0) return MOE_OK;
    moe_tensor logits = *x;
    logits.shape[1] = E;
    logits.strides[0] = E;
    logits.base = NULL;
    logits.data = cu_scratch(moe_dtype_size(x->dtype) * (size_t)(n * E));
    if (!logits.data) return moe_last_status();
    const moe_route_spec *sp = (const moe_route_spec *)a->attrs;
    const bool fused = (x->dtype == MOE_F32 || x->dtype == MOE_BF16) && n <= SK_MAX_ROWS && E <= SK_MAX_COLS &&
                       E % 8 == 0 && d > 0 && (uintptr_t)w->data % 16 == 0;
    if (fused) {
        CU_FLOAT_DISPATCH(x->dtype, "route_select",
            sk_epilogue<T> ep = {};
            ep.bias = bias ? (const float *)bias->data : NULL;
            ep.gates = (T *)a->out->data;
            ep.ids = (int32_t *)a->out2->data;
            ep.sp = *sp;
            return skinny_gemm<T, SK_ROUTE>((const T *)x->data, d, (const T *)w->data, E, d, E, (T *)logits.data, E, n,
                                            w->life == MOE_LIFE_PERSIST, ep);)
    }
    MOE_TRY(moe_cuda_gemm(x, w, &logits, false, false, 1.0f, 0.0f));
    moe_kernel_args topk = {};
    topk.out = a->out;
    topk.out2 = a->out2;
    topk.in[0] = &logits;
    topk.in[1] = bias;
    topk.attrs = sp;
    return moe_cuda_route_topk(&topk);
}

extern "C" moe_status moe_cuda_add_rmsnorm(const moe_kernel_args *a);

/* MATMUL_ADD_RMSNORM: r = a [n, K] @ b [K, d] into step scratch; up to SK_MAX_ROWS rows one
 * skinny kernel whose last block adds r to x and normalises, else the product then
 * add_rmsnorm. */
extern "C" moe_status moe_cuda_matmul_add_rmsnorm(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0], *A = a->in[1], *B = a->in[2], *w = a->in[3];
    const int64_t n = cu_rows(x), d = cu_cols(x), K = A->shape[A->ndim - 1];
    if (n * d == 0) return MOE_OK;
    moe_tensor r = *x, A2 = *A; /* r [n, d] and a as [n, K] */
    r.base = NULL;
    if (!(r.data = cu_scratch(moe_dtype_size(x->dtype) * (size_t)(n * d)))) return moe_last_status();
    A2.ndim = r.ndim = 2;
    A2.shape[0] = r.shape[0] = n, A2.shape[1] = K, r.shape[1] = d;
    A2.strides[0] = K, r.strides[0] = d, A2.strides[1] = r.strides[1] = 1;
    const bool fused = (x->dtype == MOE_F32 || x->dtype == MOE_BF16) && n <= SK_MAX_ROWS && d <= SK_MAX_COLS &&
                       d % 8 == 0 && K > 0 && cu_vec8_ok(d, {B->data, x->data, w->data, a->out->data, a->out2->data});
    if (fused) {
        CU_FLOAT_DISPATCH(x->dtype, "matmul_add_rmsnorm",
            sk_epilogue<T> ep = {};
            ep.x = (const T *)x->data;
            ep.w = (const T *)w->data;
            ep.y = (T *)a->out->data;
            ep.sum = (T *)a->out2->data;
            ep.eps = (float)((const moe_norm_attrs *)a->attrs)->eps;
            return skinny_gemm<T, SK_ADD_NORM>((const T *)A->data, K, (const T *)B->data, d, K, d, (T *)r.data, d, n,
                                               B->life == MOE_LIFE_PERSIST, ep);)
    }
    MOE_TRY(moe_cuda_gemm(&A2, B, &r, false, false, 1.0f, 0.0f));
    moe_kernel_args norm = {};
    norm.out = a->out;
    norm.out2 = a->out2;
    norm.in[0] = x;
    norm.in[1] = &r;
    norm.in[2] = w;
    norm.attrs = a->attrs;
    return moe_cuda_add_rmsnorm(&norm);
}

/* ---- grouped matmul ---- */
/* Device pointer arrays written by a kernel whose argument carries the host values, so
 * no host buffer has to outlive the call (cuBLAS wants the arrays in device memory). */
#define PTR_CHUNK 256
struct ptr_chunk {
    void *p[PTR_CHUNK];
    int n;
};
__global__ void store_ptrs_kernel(void **dst, ptr_chunk c) {
    int i = threadIdx.x;
    if (i < c.n) dst[i] = c.p[i];
}

static moe_status upload_ptrs(void **dst, void *const *src, int n) {
    for (int i0 = 0; i0 < n; i0 += PTR_CHUNK) {
        ptr_chunk c;
        c.n = n - i0 < PTR_CHUNK ? n - i0 : PTR_CHUNK;
        memcpy(c.p, src + i0, sizeof(void *) * (size_t)c.n);
        store_ptrs_kernel<<<1, PTR_CHUNK, 0, moe_cu.stream>>>(dst + i0, c);
        CU_LAUNCHED("grouped_matmul pointer upload");
    }
    return MOE_OK;
}

/* One expert's product in column-major terms (see the modes in core/kernels.h). */
typedef struct {
    cublasOperation_t ta, tb;
    int64_t m, n, k, lda, ldb, ldc;
    const void *A, *B;
    void *C;
} group_gemm;

/* ---- choosing the way by measurement ----
 * 0 loop: one cublasGemmEx per expert; 1 grouped: one cublasGemmGroupedBatchedEx; 2 split:
 * the rows every expert has (rounded down to whole 64-row tiles) as one pointer-array
 * batched GEMM of equal problems, the rest of each expert's rows as a grouped call (the
 * batched kernel tiles all experts at once at full size; per-expert problems of a few
 * hundred rows leave the tensor cores idle between tiles). */
#define GG_WAYS 3
#define GG_TRIES (3 * GG_WAYS) /* the ways in turn, three times each */
#define GG_SPLIT_MIN 64        /* the least common rows worth a batched call (auto mode) */
typedef struct {
    int mode, ng;
    moe_dtype dt;
    int64_t K, M;
    int tries, pending_way; /* pending_way: the way timed by ev (-1: none) */
    float ms[GG_WAYS][GG_TRIES / GG_WAYS];
    cudaEvent_t ev[2];
    int way; /* -1 while measuring, else the way kept */
} gg_tune;
static gg_tune gg_tunes[128];
static int gg_tune_count;

static int gg_forced(void) { /* -1: measure, else the way MOE_GROUPED_CUBLAS names (0, 1, 2) */
    static int v = -2;
    if (v == -2) {
        const char *e = getenv("MOE_GROUPED_CUBLAS");
        v = e && (!strcmp(e, "0") || !strcmp(e, "1") || !strcmp(e, "2")) ? e[0] - '0' : -1;
    }
    return v;
}

static float gg_median3(const float *x) {
    float a = x[0], b = x[1], c = x[2];
    return fmaxf(fminf(a, b), fminf(fmaxf(a, b), c));
}

static gg_tune *gg_tune_slot(int mode, moe_dtype dt, int64_t K, int64_t M, int ng) {
    for (int i = 0; i < gg_tune_count; i++)
        if (gg_tunes[i].mode == mode && gg_tunes[i].dt == dt && gg_tunes[i].K == K && gg_tunes[i].M == M &&
            gg_tunes[i].ng == ng)
            return &gg_tunes[i];
    if (gg_tune_count == (int)(sizeof gg_tunes / sizeof *gg_tunes)) return NULL; /* table full */
    gg_tune *t = &gg_tunes[gg_tune_count];
    *t = (gg_tune){mode, ng, dt, K, M, 0, -1, {{0}}, {NULL, NULL}, -1};
    if (cudaEventCreate(&t->ev[0]) != cudaSuccess || cudaEventCreate(&t->ev[1]) != cudaSuccess) {
        (void)cudaGetLastError();
        return NULL;
    }
    gg_tune_count++;
    return t;
}

/* The way to run this call and, while measuring, its tune slot (*timed != NULL: record
 * ev[0] before and ev[1] after the call). can_split: way 2 applies to this call. */
static int gg_choose(int mode, moe_dtype dt, int64_t K, int64_t M, int ng, bool can_split, gg_tune **timed) {
    *timed = NULL;
    int forced = gg_forced();
    if (ng <= 1) return 0;
    if (forced >= 0) return forced == 2 && !can_split ? 1 : forced;
    gg_tune *t = gg_tune_slot(mode, dt, K, M, ng);
    if (!t) return 0;
    if (t->way >= 0) return t->way == 2 && !can_split ? 1 : t->way;
    if (t->pending_way >= 0) { /* the previous timed call has long finished: no real wait */
        float ms = 0;
        if (cudaEventSynchronize(t->ev[1]) == cudaSuccess && cudaEventElapsedTime(&ms, t->ev[0], t->ev[1]) == cudaSuccess)
            t->ms[t->pending_way][t->tries / GG_WAYS] = ms;
        else
            (void)cudaGetLastError();
        t->pending_way = -1;
        t->tries++;
    }
    while (t->tries < GG_TRIES && t->tries % GG_WAYS == 2 && !can_split) /* no common rows here: way 2 loses this try */
        t->ms[2][t->tries++ / GG_WAYS] = INFINITY;
    if (t->tries == GG_TRIES) {
        int best = 0;
        for (int w = 1; w < GG_WAYS; w++)
            if (gg_median3(t->ms[w]) < gg_median3(t->ms[best])) best = w;
        t->way = best;
        return t->way == 2 && !can_split ? 1 : t->way;
    }
    t->pending_way = t->tries % GG_WAYS;
    *timed = t;
    return t->pending_way;
}

/* The per-expert problems, one cublasGemmEx each. */
static moe_status gg_run_loop(const group_gemm *gg, int ng, int mode, moe_dtype dt, const float *beta) {
    const float alpha = 1.0f;
    for (int i = 0; i < ng; i++) {
        const group_gemm *g = &gg[i];
        cublasStatus_t s = cublasGemmEx_64(moe_cu.blas, g->ta, g->tb, g->m, g->n, g->k, &alpha, g->A, cu_type(dt), g->lda,
                                           g->B, cu_type(dt), g->ldb, beta, g->C, cu_type(dt), g->ldc, cu_compute(dt),
                                           CUBLAS_GEMM_DEFAULT);
        if (s != CUBLAS_STATUS_SUCCESS)
            return moe_cublas_fail(s, "cublasGemmEx_64", "grouped_matmul mode %d, problem %d of %d (%lld x %lld x %lld), %s",
                                   mode, i, ng, (long long)g->m, (long long)g->n, (long long)g->k, moe_dtype_name(dt));
    }
    return MOE_OK;
}

/* The per-expert problems as one grouped call (one group of one problem each); *done false
 * when cuBLAS does not support it for these types (then nothing ran). */
static moe_status gg_run_grouped(const group_gemm *gg, int ng, int mode, moe_dtype dt, float beta, bool *done) {
    *done = false;
    size_t n = (size_t)ng;
    cublasOperation_t *ta = (cublasOperation_t *)malloc(2 * n * sizeof *ta);
    int64_t *dims = (int64_t *)malloc(7 * n * sizeof *dims);
    float *ab = (float *)malloc(2 * n * sizeof *ab);
    void **hp = (void **)malloc(3 * n * sizeof *hp);
    void **dp = (void **)cu_scratch(3 * n * sizeof *dp);
    moe_status st = !ta || !dims || !ab || !hp ? moe_error(MOE_ERR_OOM, "grouped_matmul: out of host memory")
                    : !dp                       ? moe_last_status()
                                                : MOE_OK;
    for (size_t i = 0; st == MOE_OK && i < n; i++) {
        ta[i] = gg[i].ta;
        ta[n + i] = gg[i].tb;
        int64_t v[7] = {gg[i].m, gg[i].n, gg[i].k, gg[i].lda, gg[i].ldb, gg[i].ldc, 1};
        for (int j = 0; j < 7; j++) dims[j * n + i] = v[j];
        ab[i] = 1.0f;
        ab[n + i] = beta;
        hp[i] = (void *)gg[i].A;
        hp[n + i] = (void *)gg[i].B;
        hp[2 * n + i] = gg[i].C;
    }
    if (st == MOE_OK) st = upload_ptrs(dp, hp, (int)(3 * n));
    if (st == MOE_OK) {
        cudaDataType ty = cu_type(dt);
        cublasStatus_t s = cublasGemmGroupedBatchedEx_64(
            moe_cu.blas, ta, ta + n, dims, dims + n, dims + 2 * n, ab, (const void *const *)dp, ty, dims + 3 * n,
            (const void *const *)(dp + n), ty, dims + 4 * n, ab + n, dp + 2 * n, ty, dims + 5 * n, (int64_t)ng, dims + 6 * n,
            cu_compute(dt));
        *done = s == CUBLAS_STATUS_SUCCESS;
        if (s != CUBLAS_STATUS_SUCCESS && s != CUBLAS_STATUS_NOT_SUPPORTED)
            st = moe_cublas_fail(s, "cublasGemmGroupedBatchedEx_64", "grouped_matmul mode %d over %d experts, %s", mode, ng,
                                 moe_dtype_name(dt));
    }
    free(ta);
    free(dims);
    free(ab);
    free(hp);
    return st;
}

/* Loop or grouped call, whichever `grouped` asks (the loop where cuBLAS has no grouped form). */
static moe_status gg_run(const group_gemm *gg, int ng, int mode, moe_dtype dt, float beta, bool grouped) {
    bool done = false;
    if (grouped && ng > 1) MOE_TRY(gg_run_grouped(gg, ng, mode, dt, beta, &done));
    return done ? MOE_OK : gg_run_loop(gg, ng, mode, dt, &beta);
}

/* The rows (n in modes 0 and 1, k in mode 2, column-major) that every problem has. */
static int64_t gg_common_rows(const group_gemm *gg, int ng, int mode) {
    int64_t c = INT64_MAX;
    for (int i = 0; i < ng; i++) c = min(c, mode == 2 ? gg[i].k : gg[i].n);
    return ng ? c : 0;
}

/* Way 2: the first c rows of every problem as one batched GEMM (equal shapes, pointer
 * arrays), then the rest of each as a grouped call; in mode 2 both accumulate (beta 1). */
static moe_status gg_run_split(const group_gemm *gg, int ng, int mode, moe_dtype dt, float beta, int64_t c) {
    size_t es = moe_dtype_size(dt);
    void **hp = (void **)malloc(3 * (size_t)ng * sizeof *hp);
    void **dp = (void **)cu_scratch(3 * (size_t)ng * sizeof *dp);
    group_gemm *rest = (group_gemm *)malloc(sizeof *rest * (size_t)ng);
    moe_status st = !hp || !rest ? moe_error(MOE_ERR_OOM, "grouped_matmul: out of host memory")
                    : !dp        ? moe_last_status()
                                 : MOE_OK;
    int nr = 0;
    for (int i = 0; st == MOE_OK && i < ng; i++) {
        group_gemm g = gg[i];
        hp[i] = (void *)g.A, hp[ng + i] = (void *)g.B, hp[2 * ng + i] = g.C;
        if (mode == 2) { /* rows run along k: A's and B's columns c.. */
            if (g.k == c) continue;
            g.A = (const char *)g.A + c * g.lda * es, g.B = (const char *)g.B + c * g.ldb * es, g.k -= c;
        } else { /* rows run along n: B's and C's columns c.. */
            if (g.n == c) continue;
            g.B = (const char *)g.B + c * g.ldb * es, g.C = (char *)g.C + c * g.ldc * es, g.n -= c;
        }
        rest[nr++] = g;
    }
    if (st == MOE_OK) st = upload_ptrs(dp, hp, 3 * ng);
    if (st == MOE_OK) {
        const group_gemm *g = &gg[0];
        const float alpha = 1.0f;
        cudaDataType ty = cu_type(dt);
        cublasStatus_t s = cublasGemmBatchedEx_64(moe_cu.blas, g->ta, g->tb, g->m, mode == 2 ? g->n : c,
                                                  mode == 2 ? c : g->k, &alpha, (const void *const *)dp, ty, g->lda,
                                                  (const void *const *)(dp + ng), ty, g->ldb, &beta, dp + 2 * ng, ty,
                                                  g->ldc, (int64_t)ng, cu_compute(dt), CUBLAS_GEMM_DEFAULT);
        if (s != CUBLAS_STATUS_SUCCESS)
            st = moe_cublas_fail(s, "cublasGemmBatchedEx_64", "grouped_matmul mode %d, %d experts x %lld common rows, %s",
                                 mode, ng, (long long)c, moe_dtype_name(dt));
    }
    if (st == MOE_OK && nr) st = gg_run(rest, nr, mode, dt, mode == 2 ? 1.0f : beta, true);
    free(hp);
    free(rest);
    return st;
}

/* Each non-empty expert's product in column-major terms (see the modes in core/kernels.h);
 * returns how many. */
static int gg_problems(const moe_grouped_attrs *at, const moe_tensor *const *in, moe_tensor *out, group_gemm *gg) {
    size_t es = moe_dtype_size(out->dtype);
    const char *x = (const char *)in[0]->data, *w = (const char *)in[1]->data;
    char *y = (char *)out->data;
    int ng = 0;
    for (int e = 0; e < at->n_groups; e++) {
        int64_t r0 = at->offsets[e], rows = at->offsets[e + 1] - r0;
        if (rows <= 0) continue;
        group_gemm g;
        if (at->mode == 0) { /* y_g [rows, M] = x_g [rows, K] @ w[e] [K, M] */
            int64_t K = in[1]->shape[1], M = in[1]->shape[2];
            g = {CUBLAS_OP_N, CUBLAS_OP_N, M, rows, K, M, K, M, w + e * K * M * es, x + r0 * K * es, y + r0 * M * es};
        } else if (at->mode == 1) { /* y_g [rows, K] = x_g [rows, M] @ w[e]^T */
            int64_t K = in[1]->shape[1], M = in[1]->shape[2];
            g = {CUBLAS_OP_T, CUBLAS_OP_N, K, rows, M, M, M, K, w + e * K * M * es, x + r0 * M * es, y + r0 * K * es};
        } else { /* out[e] [K, M] += x_g^T [K, rows] @ y_g [rows, M]; in[1] is y */
            int64_t K = in[0]->shape[1], M = in[1]->shape[1];
            const char *yy = (const char *)in[1]->data;
            g = {CUBLAS_OP_N, CUBLAS_OP_T, M, K, rows, M, K, M, yy + r0 * M * es, x + r0 * K * es, y + e * K * M * es};
        }
        gg[ng++] = g;
    }
    return ng;
}

extern "C" moe_status moe_cuda_grouped_matmul(const moe_kernel_args *a) {
    const moe_grouped_attrs *at = (const moe_grouped_attrs *)a->attrs;
    moe_dtype dt = a->out->dtype;
    if (dt != MOE_F32 && dt != MOE_BF16)
        return moe_error(MOE_ERR_UNSUPPORTED, "grouped_matmul: dtype %s is not supported on cuda (f32, bf16)",
                         moe_dtype_name(dt));
    /* The operands are contiguous (front-end); a strided one is copied. */
    const moe_tensor *in[2] = {a->in[0], a->in[1]};
    moe_tensor *out = a->out;
    for (int j = 0; j < 2; j++) {
        if (moe_tensor_is_contiguous(in[j])) continue;
        moe_status st;
        if (!(in[j] = contiguous_copy(in[j], &st))) return st;
    }
    if (!moe_tensor_is_contiguous(out))
        return moe_error(MOE_ERR_INVALID, "grouped_matmul: the output must be contiguous");
    int G = at->n_groups;
    group_gemm *gg = (group_gemm *)malloc(sizeof(group_gemm) * (size_t)(G ? G : 1));
    if (!gg) return moe_error(MOE_ERR_OOM, "grouped_matmul: out of host memory for %d groups", G);
    int ng = gg_problems(at, in, out, gg);
    float beta = at->mode == 2 ? 1.0f : 0.0f;
    int64_t c = gg_common_rows(gg, ng, at->mode);
    if (gg_forced() != 2) c = c / GG_SPLIT_MIN * GG_SPLIT_MIN; /* whole tiles (forced: any, for the tests) */
    gg_tune *timed = NULL;
    int way = gg_choose(at->mode, dt, in[0]->shape[in[0]->ndim - 1], out->shape[out->ndim - 1], ng, c > 0, &timed);
    if (timed) cudaEventRecord(timed->ev[0], moe_cu.stream);
    moe_status st = way == 2 ? gg_run_split(gg, ng, at->mode, dt, beta, c) : gg_run(gg, ng, at->mode, dt, beta, way == 1);
    if (timed) cudaEventRecord(timed->ev[1], moe_cu.stream);
    free(gg);
    return st;
}

/* ---- gathered SwiGLU experts (few tokens, no routing read back) ----
 * One block per (pair, column tile): pair p = (token p / k, slot p % k) reads its expert id
 * on the device and streams that expert's rows, 16 warps splitting the rows, each lane
 * holding 8 consecutive columns (one 16-byte load per row in bf16; the next GS_BATCH
 * rows' loads in flight while it sums the current ones), partial sums reduced
 * across the warps in shared memory in a fixed order. The up pass reads the gate and up
 * halves of w13 [E, d, 2f] side by side and applies SwiGLU on the rounded sums (as the
 * grouped path rounds its products); the down pass reads w2 [E, f, d] and also does the
 * combine: each block leaves its pair's rounded tile in a scratch [P, d], and the last of
 * a token's k blocks of a tile to finish (a ticket per token and tile) sums the token's k
 * tiles weighted by its gates in slot order, f32 as the combine kernel, into y [T, d]. */
#define GS_TILE 64
#define GS_THREADS 512


/* 8 consecutive values at p, those at or past n (columns left) as 0 in the unaligned form. */
template <class T, bool VEC> __device__ __forceinline__ void gs_load8(const T *p, int64_t n, float *v) {
    if (VEC)
        cu_ld8(p, v);
    else
#pragma unroll
        for (int q = 0; q < 8; q++) v[q] = q < n ? ldf(p + q) : 0.0f;
}

/* bf16 rows a lane loads ahead while it sums the previous ones (aligned form): GS_BATCH
 * where two blocks share an SM, GS_BATCH_DEEP where a pass has at most one block per SM and
 * its registers can hold twice the loads in flight. */
#define GS_BATCH 4
#define GS_BATCH_DEEP 8

/* f32 rows are twice a bf16 row's registers: rows of w a lane has in flight for BATCH. */
template <class T, int BATCH> __host__ __device__ constexpr int gs_batch_rows() { return BATCH * 2 / (int)sizeof(T); }

/* The first batch of rows i0, i0 + stride, ... of w (8 columns at w) into cur. */
template <class T, int BATCH>
__device__ __forceinline__ void gs_rows_first(const T *w, int64_t ld, int64_t i0, int64_t stride, int64_t rows,
                                              cu_raw8<T> (&cur)[gs_batch_rows<T, BATCH>()]) {
#pragma unroll
    for (int u = 0; u < gs_batch_rows<T, BATCH>(); u++) {
        const int64_t i = i0 + u * stride;
        cur[u] = cu_raw8<T>{};
        if (i < rows) cu_raw8_load(w + i * ld, cur[u]);
    }
}

/* acc[0..8) += sum over rows i = i0, i0 + stride, ... < rows of x[i] * w[i * ld .. + 8), in
 * that order, from cur, the first batch (gs_rows_first); batch b + 1's loads are issued
 * before batch b is summed. */
template <class T, int BATCH>
__device__ __forceinline__ void gs_rows_pipelined(const T *x, const T *w, int64_t ld, int64_t i0, int64_t stride,
                                                  int64_t rows, cu_raw8<T> (&cur)[gs_batch_rows<T, BATCH>()],
                                                  float *acc) {
    constexpr int NB = gs_batch_rows<T, BATCH>();
    cu_raw8<T> nxt[NB];
    float xc[NB], xn[NB];
#pragma unroll
    for (int u = 0; u < NB; u++) xc[u] = i0 + u * stride < rows ? ldf(x + i0 + u * stride) : 0.0f;
    for (int64_t i = i0; i < rows; i += NB * stride) {
#pragma unroll
        for (int u = 0; u < NB; u++) {
            const int64_t j = i + (NB + u) * stride;
            nxt[u] = cu_raw8<T>{};
            if (j < rows) cu_raw8_load(w + j * ld, nxt[u]);
            xn[u] = j < rows ? ldf(x + j) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < NB; u++) {
            float v[8];
            cu_ld8(reinterpret_cast<const T *>(cur[u].r), v);
#pragma unroll
            for (int q = 0; q < 8; q++) acc[q] = fmaf(xc[u], v[q], acc[q]);
            cur[u] = nxt[u];
            xc[u] = xn[u];
        }
    }
}

/* The down pass's combine: y [T, d] row t = sum over j < k of gates[t, j] * row t k + j of
 * the pass's out [P, d]; tickets: T x (column tiles) zeroed counters. */
template <class T> struct gs_combine {
    const T *gates; /* [T, k] */
    unsigned *tickets;
    T *y;
    int64_t k;
};

/* After pair p's tile [c0, c0 + GS_TILE) of pairs [P, cols] is stored: the last of its
 * token's k blocks of the tile to land re-zeroes their ticket and writes the token's tile
 * of y (slots in order, f32 accumulation as combine_kernel). Every thread of the block
 * calls it. */
template <class T>
__device__ void gs_combine_tile(const T *pairs, const gs_combine<T> &cb, int64_t p, int64_t c0, int64_t cols) {
    const int64_t t = p / cb.k;
    if (!cu_last_block(cb.tickets + t * gridDim.x + blockIdx.x, (unsigned)cb.k)) return;
    const T *g = cb.gates + t * cb.k, *tiles = pairs + t * cb.k * cols + c0; /* the token's k tiles */
    for (int j = threadIdx.x; j < GS_TILE && c0 + j < cols; j += blockDim.x) {
        float acc = 0.0f;
        for (int64_t s0 = 0; s0 < cb.k; s0 += CU_LOADS_AHEAD) { /* the loads of CU_LOADS_AHEAD slots at once */
            float gv[CU_LOADS_AHEAD], tv[CU_LOADS_AHEAD];
#pragma unroll
            for (int u = 0; u < CU_LOADS_AHEAD; u++) {
                const bool in = s0 + u < cb.k;
                gv[u] = in ? ldf(g + s0 + u) : 0.0f;
                tv[u] = in ? ldcgf(tiles + (s0 + u) * cols + j) : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < CU_LOADS_AHEAD; u++)
                if (s0 + u < cb.k) acc += gv[u] * tv[u];
        }
        stf(cb.y + t * cols + c0 + j, acc);
    }
}

/* out [P, cols] <- act(in row @ w[e]) for the block's pair and tile; in row p / in_div of
 * in [., rows]; w [E, rows, NSEG cols] (SWIGLU: NSEG 2, gate then up). The down pass
 * (!SWIGLU) then combines out into cb.y; the up pass takes no combine (cb unused). */
template <class T, bool SWIGLU, bool VEC, int BATCH, int MIN_BLOCKS>
__global__ void __launch_bounds__(GS_THREADS, MIN_BLOCKS) gathered_rows_kernel(const T *in, int64_t in_div, const int32_t *ids,
                                                                   int64_t E, const T *w, int64_t rows, int64_t cols,
                                                                   T *out, gs_combine<T> cb, cu_index_fault *fault) {
    constexpr int NSEG = SWIGLU ? 2 : 1, SEG_LANES = GS_TILE / 8, LANES = NSEG * SEG_LANES, STEP = 32 / LANES;
    extern __shared__ float red[]; /* [warps * STEP][NSEG * GS_TILE] */
    const int64_t p = blockIdx.y, c0 = (int64_t)blockIdx.x * GS_TILE, ld = NSEG * cols;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const int sub = lane / LANES, l = lane % LANES, seg = l / SEG_LANES;
    const int64_t col = c0 + (int64_t)(l % SEG_LANES) * 8, i0 = warp * STEP + sub, stride = (int64_t)nw * STEP;
    /* The up pass's ids come from the kernel just ahead: it reads them after the wait. The
     * down pass's were written two kernels back, complete once this kernel runs (the up
     * pass's blocks started it after their own wait), so it loads its first rows of w2
     * before the wait, while the up pass finishes. */
    int32_t e = 0;
    bool ok = false;
    const T *wr = NULL;
    cu_raw8<T> first[gs_batch_rows<T, BATCH>()];
    auto locate = [&]() {
        e = __ldcg(ids + p);
        ok = e >= 0 && e < E;
        wr = w + (int64_t)(ok ? e : 0) * rows * ld + seg * cols + col;
        if (VEC && ok && col < cols) gs_rows_first<T, BATCH>(wr, ld, i0, stride, rows, first);
    };
    if (!SWIGLU) locate();
    cu_prior_done();
    if (SWIGLU) locate();
    if (threadIdx.x == 0 && blockIdx.x == 0 && !ok) cu_index_ok(fault, CU_IDX_GATHERED_SWIGLU, e, p, E);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (ok && col < cols) {
        const T *x = in + (p / in_div) * rows;
        if (VEC)
            gs_rows_pipelined<T, BATCH>(x, wr, ld, i0, stride, rows, first, acc);
        else
            for (int64_t i = i0; i < rows; i += stride) {
                float v[8];
                gs_load8<T, VEC>(wr + i * ld, cols - col, v);
                const float a = ldf(x + i);
#pragma unroll
                for (int q = 0; q < 8; q++) acc[q] = fmaf(a, v[q], acc[q]);
            }
    }
    float *r = red + (warp * STEP + sub) * (NSEG * GS_TILE) + l * 8;
#pragma unroll
    for (int q = 0; q < 8; q++) r[q] = acc[q];
    __syncthreads();
    for (int j = threadIdx.x; j < GS_TILE && c0 + j < cols; j += blockDim.x) {
        float s[NSEG];
#pragma unroll
        for (int g = 0; g < NSEG; g++) s[g] = 0.0f;
        for (int q = 0; q < nw * STEP; q++)
#pragma unroll
            for (int g = 0; g < NSEG; g++) s[g] += red[q * NSEG * GS_TILE + g * GS_TILE + j];
        float v = s[0];
        if (SWIGLU) {
            const float gate = cu_round<T>(s[0]), up = cu_round<T>(s[NSEG - 1]);
            v = gate / (1.0f + expf(-gate)) * up;
        }
        stf(out + p * cols + c0 + j, ok ? v : 0.0f);
    }
    if constexpr (!SWIGLU) gs_combine_tile<T>(out, cb, p, c0, cols);
}

/* n zeroed tickets: the backend's when they are enough, else step scratch zeroed in stream
 * order (no host synchronisation, so that a recorded graph replays it). */
static moe_status gs_tickets(int64_t n, unsigned **tickets) {
    *tickets = moe_cu.tickets;
    if (n <= CU_TICKETS) return MOE_OK;
    if (!(*tickets = (unsigned *)cu_scratch(sizeof(unsigned) * (size_t)n))) return moe_last_status();
    CU_TRY(cudaMemsetAsync(*tickets, 0, sizeof(unsigned) * (size_t)n, moe_cu.stream),
           "gathered_swiglu: zeroing %lld tickets", (long long)n);
    return MOE_OK;
}

template <class T, bool VEC>
static moe_status gathered_launch(const moe_kernel_args *a, int64_t P, int64_t k, int64_t d, int64_t f, int64_t E) {
    const int warps = GS_THREADS / 32;
    const size_t shared_up = sizeof(float) * warps * (32 / (GS_TILE / 4)) * 2 * GS_TILE,
                 shared_down = sizeof(float) * warps * (32 / (GS_TILE / 8)) * GS_TILE;
    const int32_t *ids = (const int32_t *)a->in[1]->data;
    T *act = (T *)a->out2->data, *pairs = (T *)cu_scratch(sizeof(T) * (size_t)(P * d)); /* act [P, f], pairs [P, d] */
    if (!pairs) return moe_last_status();
    const dim3 up((unsigned)((f + GS_TILE - 1) / GS_TILE), (unsigned)P), down((unsigned)((d + GS_TILE - 1) / GS_TILE), (unsigned)P);
    gs_combine<T> cb = {(const T *)a->in[2]->data, NULL, (T *)a->out->data, k};
    MOE_TRY(gs_tickets(P / k * down.x, &cb.tickets));
    auto up_kernel = (int64_t)up.x * up.y <= moe_cu.sms ? gathered_rows_kernel<T, true, VEC, GS_BATCH_DEEP, 1>
                                                        : gathered_rows_kernel<T, true, VEC, GS_BATCH, 2>;
    auto down_kernel = (int64_t)down.x * down.y <= moe_cu.sms ? gathered_rows_kernel<T, false, VEC, GS_BATCH_DEEP, 1>
                                                              : gathered_rows_kernel<T, false, VEC, GS_BATCH, 2>;
    cu_launch(up_kernel, up, GS_THREADS, shared_up, (const T *)a->in[0]->data, k, ids, E, (const T *)a->in[3]->data, d, f,
              act, gs_combine<T>{}, moe_cu.index_fault);
    CU_LAUNCHED("gathered_swiglu (up)");
    cu_launch(down_kernel, down, GS_THREADS, shared_down, (const T *)act, (int64_t)1, ids, E, (const T *)a->in[4]->data, f,
              d, pairs, cb, moe_cu.index_fault);
    CU_LAUNCHED("gathered_swiglu (down and combine)");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_gathered_swiglu(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0], *ids = a->in[1], *w13 = a->in[3], *w2 = a->in[4];
    const int64_t k = ids->shape[1], P = x->shape[0] * k, d = x->shape[1], f = w2->shape[1], E = w13->shape[0];
    if (P == 0) { /* no pairs: every token's sum is empty */
        CU_TRY(cudaMemsetAsync(a->out->data, 0, (size_t)moe_tensor_numel(a->out) * moe_dtype_size(x->dtype), moe_cu.stream),
               "gathered_swiglu: zeroing the output");
        return MOE_OK;
    }
    if (P > 65535)
        return moe_error(MOE_ERR_UNSUPPORTED, "gathered_swiglu: %lld (token, slot) pairs on cuda (at most 65535)",
                         (long long)P);
    const bool vec = f % 8 == 0 && d % 8 == 0 && (uintptr_t)w13->data % 16 == 0 && (uintptr_t)w2->data % 16 == 0;
    CU_FLOAT_DISPATCH(x->dtype, "gathered_swiglu",
        return vec ? gathered_launch<T, true>(a, P, k, d, f, E) : gathered_launch<T, false>(a, P, k, d, f, E);)
    return MOE_OK;
}
