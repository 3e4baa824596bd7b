/* CUDA reductions over one axis of a contiguous input: sum (accumulated in double, like
 * the CPU) and max with argmax (first index among ties; NaNs are skipped unless a whole
 * slice is NaN). Rows (inner == 1) take one block each; other axes put 32 neighbouring
 * columns in a block, with 8 lanes splitting the reduced axis. */
#include "core/cuda/cuda_common.cuh"

/* (value, index) max: larger value wins, ties go to the smaller index, NaN loses. */
__device__ __forceinline__ void argmax_merge(float &v, int &i, float v2, int i2) {
    bool take = (v2 > v) || (v2 == v && i2 < i) || (v != v && (v2 == v2 || i2 < i));
    if (take) {
        v = v2;
        i = i2;
    }
}

template <class T>
__global__ void reduce_rows_kernel(const T *x, T *out, int32_t *arg, int64_t rows, int64_t n, int op) {
    __shared__ double ssum[32];
    __shared__ float sval[32];
    __shared__ int sidx[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *p = x + r * n;
        if (op == 0) {
            double acc = 0;
            for (int64_t k = threadIdx.x; k < n; k += blockDim.x) acc += ldf(p + k);
            acc = cu_block_sum(acc, ssum);
            if (threadIdx.x == 0) stf(out + r, (float)acc);
        } else {
            float best = NAN;
            int bi = INT_MAX;
            for (int64_t k = threadIdx.x; k < n; k += blockDim.x) argmax_merge(best, bi, ldf(p + k), (int)k);
            for (int o = 16; o > 0; o >>= 1) {
                float v2 = __shfl_xor_sync(0xffffffffu, best, o);
                int i2 = __shfl_xor_sync(0xffffffffu, bi, o);
                argmax_merge(best, bi, v2, i2);
            }
            int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
            __syncthreads();
            if (lane == 0) {
                sval[warp] = best;
                sidx[warp] = bi;
            }
            __syncthreads();
            if (threadIdx.x == 0) {
                for (int w = 1; w < (int)(blockDim.x >> 5); w++) argmax_merge(best, bi, sval[w], sidx[w]);
                stf(out + r, best);
                if (arg) arg[r] = bi;
            }
        }
    }
}

#define COL_LANES 8
template <class T>
__global__ void reduce_cols_kernel(const T *x, T *out, int32_t *arg, int64_t outer, int64_t n, int64_t inner, int op) {
    __shared__ double ssum[COL_LANES][33];
    __shared__ float sval[COL_LANES][33];
    __shared__ int sidx[COL_LANES][33];
    int64_t chunks = (inner + 31) / 32;
    int tx = threadIdx.x, ty = threadIdx.y;
    for (int64_t b = blockIdx.x; b < outer * chunks; b += gridDim.x) {
        int64_t oi = b / chunks, col = (b % chunks) * 32 + tx;
        bool live = col < inner;
        const T *p = x + oi * n * inner + col;
        double acc = 0;
        float best = NAN;
        int bi = INT_MAX;
        if (live) {
            for (int64_t k = ty; k < n; k += COL_LANES) {
                if (op == 0) acc += ldf(p + k * inner);
                else argmax_merge(best, bi, ldf(p + k * inner), (int)k);
            }
        }
        ssum[ty][tx] = acc;
        sval[ty][tx] = best;
        sidx[ty][tx] = bi;
        __syncthreads();
        if (ty == 0 && live) {
            for (int l = 1; l < COL_LANES; l++) {
                acc += ssum[l][tx];
                argmax_merge(best, bi, sval[l][tx], sidx[l][tx]);
            }
            int64_t o = oi * inner + col;
            stf(out + o, op == 0 ? (float)acc : best);
            if (op != 0 && arg) arg[o] = bi;
        }
        __syncthreads();
    }
}

extern "C" moe_status moe_cuda_reduce(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    const moe_reduce_attrs *at = (const moe_reduce_attrs *)a->attrs;
    int64_t outer = 1, inner = 1, n = x->shape[at->axis];
    for (int d = 0; d < at->axis; d++) outer *= x->shape[d];
    for (int d = at->axis + 1; d < x->ndim; d++) inner *= x->shape[d];
    if (outer * inner == 0) return MOE_OK;
    if (n == 0) return moe_error(MOE_ERR_INVALID, "reduce: axis %d of the input has size 0", at->axis);
    if (n > INT32_MAX) return moe_error(MOE_ERR_INVALID, "reduce: axis of %lld elements is too long", (long long)n);
    int32_t *arg = a->out2 ? (int32_t *)a->out2->data : NULL;
    CU_FLOAT_DISPATCH(x->dtype, "reduce",
        const T *px = (const T *)x->data;
        T *po = (T *)a->out->data;
        if (inner == 1) {
            int threads = cu_row_threads(n) > 256 ? 256 : cu_row_threads(n);
            reduce_rows_kernel<T><<<cu_blocks(outer * threads, threads), threads, 0, moe_cu.stream>>>(px, po, arg, outer,
                                                                                                      n, at->op);
        } else {
            int64_t blocks = outer * ((inner + 31) / 32);
            reduce_cols_kernel<T><<<cu_blocks(blocks * 256), dim3(32, COL_LANES), 0, moe_cu.stream>>>(
                px, po, arg, outer, n, inner, at->op);
        })
    CU_LAUNCHED("reduce");
    return MOE_OK;
}
