/* CUDA reductions over one axis of a contiguous input viewed as [outer, n, inner]: sum
 * (accumulated in double, like the CPU) and max with argmax (first index among ties; NaNs
 * are skipped unless a whole slice is NaN). Rows (inner == 1) take one block each; other
 * axes put 32 neighbouring columns in a block, with 8 lanes splitting the reduced axis.
 * When that leaves the GPU mostly idle (few long slices, e.g. a sum over all elements),
 * the reduced axis is cut into `split` chunks whose partial results (double sums, or
 * value and index) go to scratch, and a second kernel combines them in chunk order, so
 * the result stays deterministic. */
#include "core/cuda/cuda_common.cuh"

/* (value, index) max: larger value wins, ties go to the smaller index, NaN loses. */
__device__ __forceinline__ void argmax_merge(float &v, int &i, float v2, int i2) {
    bool take = (v2 > v) || (v2 == v && i2 < i) || (v != v && (v2 == v2 || i2 < i));
    if (take) {
        v = v2;
        i = i2;
    }
}

/* Where one (slice, chunk) result goes: the output (and argmax) when the axis is not
 * split, else the partial buffers at index o * split + chunk. */
struct reduce_sink {
    int64_t split;
    double *psum;
    float *pval;
    int *pidx;
};

template <class T>
__device__ __forceinline__ void reduce_put(T *out, int32_t *arg, reduce_sink sk, int64_t o, int64_t chunk, int op,
                                           double acc, float best, int bi) {
    if (sk.split == 1) {
        stf(out + o, op == 0 ? (float)acc : best);
        if (op != 0 && arg) arg[o] = bi;
    } else if (op == 0) {
        sk.psum[o * sk.split + chunk] = acc;
    } else {
        sk.pval[o * sk.split + chunk] = best;
        sk.pidx[o * sk.split + chunk] = bi;
    }
}

/* Grid-stride over (row, chunk) pairs; a row r holds n contiguous values. */
template <class T>
__global__ void reduce_rows_kernel(const T *x, T *out, int32_t *arg, int64_t rows, int64_t n, int op, reduce_sink sk) {
    __shared__ double ssum[32];
    __shared__ float sval[32];
    __shared__ int sidx[32];
    const int64_t len = (n + sk.split - 1) / sk.split;
    for (int64_t b = blockIdx.x; b < rows * sk.split; b += gridDim.x) {
        const int64_t r = b / sk.split, chunk = b % sk.split;
        const int64_t k0 = chunk * len, k1 = min(n, k0 + len);
        const T *p = x + r * n;
        if (op == 0) {
            double acc = 0;
            for (int64_t k = k0 + threadIdx.x; k < k1; k += blockDim.x) acc += ldf(p + k);
            acc = cu_block_sum(acc, ssum);
            if (threadIdx.x == 0) reduce_put(out, arg, sk, r, chunk, op, acc, 0.0f, 0);
        } else {
            float best = NAN;
            int bi = INT_MAX;
            for (int64_t k = k0 + threadIdx.x; k < k1; k += blockDim.x) argmax_merge(best, bi, ldf(p + k), (int)k);
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
                reduce_put(out, arg, sk, r, chunk, op, 0.0, best, bi);
            }
            __syncthreads(); /* sval/sidx are rewritten by the next pair */
        }
    }
}

#define COL_LANES 8
/* Grid-stride over (outer index, 32-column group, chunk) triples. */
template <class T>
__global__ void reduce_cols_kernel(const T *x, T *out, int32_t *arg, int64_t outer, int64_t n, int64_t inner, int op,
                                   reduce_sink sk) {
    __shared__ double ssum[COL_LANES][33];
    __shared__ float sval[COL_LANES][33];
    __shared__ int sidx[COL_LANES][33];
    const int64_t groups = (inner + 31) / 32, len = (n + sk.split - 1) / sk.split;
    int tx = threadIdx.x, ty = threadIdx.y;
    for (int64_t b = blockIdx.x; b < outer * groups * sk.split; b += gridDim.x) {
        const int64_t chunk = b % sk.split, g = b / sk.split;
        const int64_t oi = g / groups, col = (g % groups) * 32 + tx;
        const int64_t k0 = chunk * len, k1 = min(n, k0 + len);
        bool live = col < inner;
        const T *p = x + oi * n * inner + col;
        double acc = 0;
        float best = NAN;
        int bi = INT_MAX;
        if (live) {
            for (int64_t k = k0 + ty; k < k1; k += COL_LANES) {
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
            reduce_put(out, arg, sk, oi * inner + col, chunk, op, acc, best, bi);
        }
        __syncthreads();
    }
}

/* Combines the `split` partials of each output in chunk order. */
template <class T>
__global__ void reduce_finish_kernel(T *out, int32_t *arg, int64_t outputs, int op, reduce_sink sk) {
    for (int64_t o = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; o < outputs; o += (int64_t)gridDim.x * blockDim.x) {
        double acc = 0;
        float best = NAN;
        int bi = INT_MAX;
        for (int64_t c = 0; c < sk.split; c++) {
            if (op == 0) acc += sk.psum[o * sk.split + c];
            else argmax_merge(best, bi, sk.pval[o * sk.split + c], sk.pidx[o * sk.split + c]);
        }
        stf(out + o, op == 0 ? (float)acc : best);
        if (op != 0 && arg) arg[o] = bi;
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
    /* Blocks of independent work without a split; cut the axis until the GPU is busy,
     * keeping chunks of at least 2048 values (rows) or 256 steps (column groups). */
    const int64_t groups = inner == 1 ? outer : outer * ((inner + 31) / 32);
    const int64_t want = 4 * (int64_t)moe_cu.sms, min_len = inner == 1 ? 2048 : 256;
    reduce_sink sk = {1, NULL, NULL, NULL};
    if (groups < want && n >= 2 * min_len) {
        sk.split = min((want + groups - 1) / groups, n / min_len);
        const int64_t outputs = outer * inner, parts = outputs * sk.split;
        if (at->op == 0) {
            sk.psum = (double *)cu_scratch(sizeof(double) * (size_t)parts);
            if (!sk.psum) return moe_last_status();
        } else {
            sk.pval = (float *)cu_scratch(sizeof(float) * (size_t)parts);
            sk.pidx = (int *)cu_scratch(sizeof(int) * (size_t)parts);
            if (!sk.pval || !sk.pidx) return moe_last_status();
        }
    }
    CU_FLOAT_DISPATCH(x->dtype, "reduce",
        const T *px = (const T *)x->data;
        T *po = (T *)a->out->data;
        if (inner == 1) {
            int threads = cu_row_threads(n) > 256 ? 256 : cu_row_threads(n);
            reduce_rows_kernel<T><<<cu_blocks(groups * sk.split * threads, threads), threads, 0, moe_cu.stream>>>(
                px, po, arg, outer, n, at->op, sk);
        } else {
            reduce_cols_kernel<T><<<cu_blocks(groups * sk.split * 256), dim3(32, COL_LANES), 0, moe_cu.stream>>>(
                px, po, arg, outer, n, inner, at->op, sk);
        }
        if (sk.split > 1)
            reduce_finish_kernel<T><<<cu_blocks(outer * inner), CU_THREADS, 0, moe_cu.stream>>>(po, arg, outer * inner,
                                                                                               at->op, sk);)
    CU_LAUNCHED("reduce");
    return MOE_OK;
}
