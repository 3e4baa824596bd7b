/* CUDA index kernels (core/cpu/index_cpu.c is the specification): row select / row add / row copy,
 * last-axis gather / scatter-add, top-k, stable argsort, bincount, cumsum, the routing plan. Operands are
 * contiguous (core/ops_index.c). Indices are checked inside the kernels without a host
 * synchronisation: an out-of-range one is skipped (its output row is zero) and recorded,
 * and the next synchronisation reports MOE_ERR_INVALID with the kernel, the value, its
 * position and the range (cu_index_ok, cu_index_fault_check).
 * INDEX_ADD sorts its indices and sums each target row's sources in order (deterministic,
 * no atomics); SCATTER_ADD accumulates with atomics and differs from the CPU by rounding
 * order only. INDEX_ADD, ARGSORT and CUMSUM use CUB (stable radix sort, device scan). */
#include <cub/cub.cuh>

#include "core/cuda/cuda_common.cuh"
#include "core/cuda/route.cuh"

#define BITS_DISPATCH(es, kname, ...)                                                          \
    switch (es) {                                                                              \
    case 2: { typedef uint16_t U; __VA_ARGS__ } break;                                         \
    case 4: { typedef uint32_t U; __VA_ARGS__ } break;                                         \
    case 8: { typedef uint64_t U; __VA_ARGS__ } break;                                         \
    default: return moe_error(MOE_ERR_UNSUPPORTED, "%s: elements of %zu bytes are not supported", kname, (size_t)(es)); \
    }

static int64_t row_width(const moe_tensor *t) {
    int64_t r = 1;
    for (int d = 1; d < t->ndim; d++) r *= t->shape[d];
    return r;
}

/* Row copies move 16-byte units when every row (and row stride) is a whole number of
 * them and the pointers are aligned: es-byte elements otherwise. */
static bool rows_in_units(size_t es, int64_t r, std::initializer_list<int64_t> strides,
                          std::initializer_list<const void *> ptrs) {
    if (((size_t)r * es) % 16) return false;
    for (int64_t st : strides)
        if (((size_t)st * es) % 16) return false;
    for (const void *p : ptrs)
        if ((uintptr_t)p % 16) return false;
    return true;
}

/* ---- INDEX_SELECT: out row i = x row idx[i]; any dtype ---- */
template <class U>
__global__ void index_select_kernel(const U *x, const int32_t *idx, U *o, int64_t n, int64_t m, int64_t r,
                                    cu_index_fault *f) {
    CU_GRID_LOOP(i, m * r) {
        int64_t row = i / r;
        int32_t v = idx[row];
        o[i] = cu_index_ok(f, CU_IDX_INDEX_SELECT, v, row, n) ? x[(int64_t)v * r + (i - row * r)] : U{};
    }
}

extern "C" moe_status moe_cuda_index_select(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0], *idx = a->in[1];
    int64_t n = x->ndim ? x->shape[0] : 1, r = row_width(x), m = moe_tensor_numel(idx);
    const int32_t *pi = (const int32_t *)idx->data;
    if (m * r == 0) return MOE_OK;
    const size_t es = moe_dtype_size(x->dtype);
    if (rows_in_units(es, r, {}, {x->data, a->out->data})) {
        const int64_t ru = r * (int64_t)es / 16;
        index_select_kernel<uint4><<<cu_blocks(m * ru), CU_THREADS, 0, moe_cu.stream>>>(
            (const uint4 *)x->data, pi, (uint4 *)a->out->data, n, m, ru, moe_cu.index_fault);
    } else {
        BITS_DISPATCH(es, "index_select",
            index_select_kernel<U><<<cu_blocks(m * r), CU_THREADS, 0, moe_cu.stream>>>(
                (const U *)x->data, pi, (U *)a->out->data, n, m, r, moe_cu.index_fault);)
    }
    CU_LAUNCHED("index_select");
    return MOE_OK;
}

__device__ __forceinline__ void atomic_addf(float *p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void atomic_addf(bf16 *p, float v) { atomicAdd(p, __float2bfloat16_rn(v)); }

/* ---- INDEX_ADD: out row idx[i] += src row i, deterministic ----
 * The (index, position) pairs are radix-sorted (stable: equal indices keep ascending
 * positions), so the src rows of one out row form a run of the sorted order. The sorted
 * order is cut into chunks of IA_CHUNK positions; one block per (chunk, column tile) sums
 * the pieces of runs in its chunk in f32, in sorted order. A run inside one chunk is added
 * to out at once; a run crossing chunks leaves a partial sum per chunk (slot 1 of the chunk
 * where it starts, slot 0 of each later one), and index_add_spans_kernel adds those in
 * chunk order. No atomics: the same bits every run, and each out element is rounded to its
 * dtype once. An out-of-range index is recorded and its row sorted under key 0 with
 * position -1, which the sums skip. */
#define IA_CHUNK 32

__global__ void index_add_keys_kernel(const int32_t *idx, uint32_t *key, int32_t *pos, int64_t m, int64_t n,
                                      cu_index_fault *f) {
    CU_GRID_LOOP(i, m) {
        int32_t v = idx[i];
        bool ok = cu_index_ok(f, CU_IDX_INDEX_ADD, v, i, n);
        key[i] = ok ? (uint32_t)v : 0u;
        pos[i] = ok ? (int32_t)i : -1;
    }
}

/* The sum of one run piece, ending at sorted position e (last of its run or of chunk c
 * [c0, c1)): a run that began before the chunk goes to slot 0, one that goes on past it to
 * slot 1 (part: [chunks, 2, r] f32), a run wholly inside the chunk straight to out. */
template <class T>
__device__ __forceinline__ void index_add_flush(T *o, float *part, const uint32_t *key, int64_t m, int64_t r,
                                                int64_t col, int64_t c, int64_t c0, int64_t c1, int64_t begin,
                                                uint32_t k, float acc) {
    if (begin == c0 && c0 > 0 && key[c0 - 1] == k) part[(2 * c) * r + col] = acc;
    else if (c1 < m && key[c1] == k) part[(2 * c + 1) * r + col] = acc;
    else stf(o + (int64_t)k * r + col, ldf(o + (int64_t)k * r + col) + acc);
}

/* grid (chunks, column tiles); blockDim.x >= IA_CHUNK. key, pos [m] sorted; src [m, r]. */
template <class T>
__global__ void index_add_chunks_kernel(T *o, const T *src, const uint32_t *key, const int32_t *pos, int64_t m,
                                        int64_t r, float *part) {
    __shared__ uint32_t sk[IA_CHUNK];
    __shared__ int32_t sp[IA_CHUNK];
    const int64_t c = blockIdx.x, c0 = c * IA_CHUNK, c1 = c0 + IA_CHUNK < m ? c0 + IA_CHUNK : m;
    const int64_t col = (int64_t)blockIdx.y * blockDim.x + threadIdx.x;
    if (threadIdx.x < c1 - c0) {
        sk[threadIdx.x] = key[c0 + threadIdx.x];
        sp[threadIdx.x] = pos[c0 + threadIdx.x];
    }
    __syncthreads();
    if (col >= r) return;
    float v[IA_CHUNK]; /* all loads first, independent of each other */
#pragma unroll
    for (int j = 0; j < IA_CHUNK; j++) v[j] = c0 + j < c1 && sp[j] >= 0 ? ldf(src + (int64_t)sp[j] * r + col) : 0.0f;
    float acc = 0;
    int64_t begin = c0;
#pragma unroll
    for (int j = 0; j < IA_CHUNK; j++) {
        if (c0 + j >= c1) break;
        acc += v[j];
        if (j + 1 < IA_CHUNK && c0 + j + 1 < c1 && sk[j + 1] == sk[j]) continue;
        index_add_flush(o, part, key, m, r, col, c, c0, c1, begin, sk[j], acc);
        acc = 0;
        begin = c0 + j + 1;
    }
}

/* The runs that cross chunks, each by the block of the chunk where it starts: slot 1 there,
 * then slot 0 of each following chunk it covers, added to out once. */
template <class T>
__global__ void index_add_spans_kernel(T *o, const uint32_t *key, int64_t m, int64_t r, const float *part) {
    const int64_t c = blockIdx.x, c0 = c * IA_CHUNK, c1 = c0 + IA_CHUNK;
    const int64_t col = (int64_t)blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= r || c1 >= m) return;
    const uint32_t k = key[c1 - 1];
    if (key[c1] != k || (c0 > 0 && key[c0 - 1] == k)) return;
    float acc = part[(2 * c + 1) * r + col];
    for (int64_t d = c + 1;; d++) {
        acc += part[(2 * d) * r + col];
        int64_t e = (d + 1) * IA_CHUNK;
        if (e >= m || key[e] != k) break;
    }
    stf(o + (int64_t)k * r + col, ldf(o + (int64_t)k * r + col) + acc);
}

/* Sorts the indices of idx [m] (in [0, n) once checked) with their positions. */
static moe_status index_add_sort(const int32_t *idx, int64_t m, int64_t n, uint32_t **key, int32_t **pos) {
    uint32_t *k0 = (uint32_t *)cu_scratch(sizeof(uint32_t) * (size_t)m);
    int32_t *p0 = (int32_t *)cu_scratch(sizeof(int32_t) * (size_t)m);
    *key = (uint32_t *)cu_scratch(sizeof(uint32_t) * (size_t)m);
    *pos = (int32_t *)cu_scratch(sizeof(int32_t) * (size_t)m);
    if (!k0 || !p0 || !*key || !*pos) return moe_last_status();
    index_add_keys_kernel<<<cu_blocks(m), CU_THREADS, 0, moe_cu.stream>>>(idx, k0, p0, m, n, moe_cu.index_fault);
    CU_LAUNCHED("index_add (keys)");
    int bits = 1;
    while (bits < 32 && ((int64_t)1 << bits) < n) bits++;
    size_t bytes = 0;
    void *tmp = NULL;
    for (int pass = 0; pass < 2; pass++) { /* pass 0 sizes the temporary storage */
        if (pass == 1 && !(tmp = cu_scratch(bytes ? bytes : 1))) return moe_last_status();
        CU_TRY(cub::DeviceRadixSort::SortPairs(tmp, bytes, k0, *key, p0, *pos, (int)m, 0, bits, moe_cu.stream),
               "index_add: sorting %lld indices (cub::DeviceRadixSort)", (long long)m);
    }
    CU_LAUNCHED("index_add (sort)");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_index_add(const moe_kernel_args *a) {
    moe_tensor *o = a->out;
    const moe_tensor *src = a->in[0], *idx = a->in[1];
    int64_t n = o->ndim ? o->shape[0] : 1, r = row_width(o), m = moe_tensor_numel(idx);
    if (m * r == 0) return MOE_OK;
    const int th = cu_row_threads(r) > 256 ? 256 : cu_row_threads(r);
    const int64_t chunks = (m + IA_CHUNK - 1) / IA_CHUNK, tiles = (r + th - 1) / th;
    if (m > INT32_MAX || tiles > 65535)
        return moe_error(MOE_ERR_UNSUPPORTED, "index_add: %lld rows of %lld elements are more than cuda handles",
                         (long long)m, (long long)r);
    uint32_t *key = NULL;
    int32_t *pos = NULL;
    MOE_TRY(index_add_sort((const int32_t *)idx->data, m, n, &key, &pos));
    float *part = (float *)cu_scratch(sizeof(float) * (size_t)(2 * chunks * r));
    if (!part) return moe_last_status();
    dim3 grid((unsigned)chunks, (unsigned)tiles);
    CU_FLOAT_DISPATCH(o->dtype, "index_add",
        index_add_chunks_kernel<T><<<grid, th, 0, moe_cu.stream>>>((T *)o->data, (const T *)src->data, key, pos, m,
                                                                 r, part);
        CU_LAUNCHED("index_add (chunks)");
        index_add_spans_kernel<T><<<grid, th, 0, moe_cu.stream>>>((T *)o->data, key, m, r, part);)
    CU_LAUNCHED("index_add (spans)");
    return MOE_OK;
}

/* ---- INDEX_COPY: out row idx[i] = src row i (distinct rows, the caller's contract; src row i at
 * i * ls); any dtype ---- */
template <class U>
__global__ void index_copy_kernel(U *o, const U *src, int64_t ls, const int32_t *idx, int64_t n, int64_t m, int64_t r,
                                  cu_index_fault *f) {
    CU_GRID_LOOP(i, m * r) {
        int64_t row = i / r, c = i - row * r;
        int32_t v = idx[row];
        if (cu_index_ok(f, CU_IDX_INDEX_COPY, v, row, n)) o[(int64_t)v * r + c] = src[row * ls + c];
    }
}

extern "C" moe_status moe_cuda_index_copy(const moe_kernel_args *a) {
    moe_tensor *o = a->out;
    const moe_tensor *src = a->in[0], *idx = a->in[1];
    int64_t n = o->ndim ? o->shape[0] : 1, r = row_width(o), m = moe_tensor_numel(idx);
    if (m * r == 0) return MOE_OK;
    const int64_t ls = src->ndim == 2 ? moe_tensor_row_stride(src) : r;
    const size_t es = moe_dtype_size(o->dtype);
    if (rows_in_units(es, r, {ls}, {o->data, src->data})) {
        const int64_t k = 16 / (int64_t)es;
        index_copy_kernel<uint4><<<cu_blocks(m * r / k), CU_THREADS, 0, moe_cu.stream>>>(
            (uint4 *)o->data, (const uint4 *)src->data, ls / k, (const int32_t *)idx->data, n, m, r / k,
            moe_cu.index_fault);
    } else {
        BITS_DISPATCH(es, "index_copy",
            index_copy_kernel<U><<<cu_blocks(m * r), CU_THREADS, 0, moe_cu.stream>>>(
                (U *)o->data, (const U *)src->data, ls, (const int32_t *)idx->data, n, m, r, moe_cu.index_fault);)
    }
    CU_LAUNCHED("index_copy");
    return MOE_OK;
}

/* ---- COMBINE: out[t] = sum_j w[t, j] * y[src[t, j]] (src -1: none; w NULL: 1). Grid
 * (column tiles, tokens): one thread per 8 output columns (16-byte loads; one column when
 * d is not a multiple of 8 or a row is unaligned), so a few tokens (decode) still spread
 * over blocks; COMBINE_SLOTS slots at a time, their ids and weights read first and then all
 * their rows' loads issued together (a decode step's one token would otherwise wait for
 * each slot's id, then its row, k times over); f32 accumulation in j order
 * (deterministic, no atomics) ---- */
#define COMBINE_SLOTS 8
template <class T, int V>
__global__ void combine_kernel(const T *y, const T *w, const int32_t *src, T *o, int64_t N, int64_t d, int64_t Tn,
                                 int64_t k, cu_index_fault *f) {
    const int64_t c = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * V; /* V columns c .. c + V - 1 */
    if (c >= d) return;
    for (int64_t t = blockIdx.y; t < Tn; t += gridDim.y) {
        float acc[V] = {};
        for (int64_t j0 = 0; j0 < k; j0 += COMBINE_SLOTS) {
            int32_t r[COMBINE_SLOTS];
            float wj[COMBINE_SLOTS], v[COMBINE_SLOTS][V];
#pragma unroll
            for (int u = 0; u < COMBINE_SLOTS; u++) {
                const int64_t j = j0 + u;
                r[u] = j < k ? src[t * k + j] : -1;
                if (r[u] != -1 && !cu_index_ok(f, CU_IDX_COMBINE, r[u], t * k + j, N)) r[u] = -1;
                wj[u] = r[u] != -1 && w ? ldf(w + t * k + j) : 1.0f;
            }
#pragma unroll
            for (int u = 0; u < COMBINE_SLOTS; u++)
                if (r[u] != -1) cu_ldv<T, V>(y + (int64_t)r[u] * d + c, v[u]);
#pragma unroll
            for (int u = 0; u < COMBINE_SLOTS; u++)
                if (r[u] != -1)
#pragma unroll
                    for (int q = 0; q < V; q++) acc[q] += wj[u] * v[u][q];
        }
        cu_stv<T, V>(o + t * d + c, acc);
    }
}

extern "C" moe_status moe_cuda_combine(const moe_kernel_args *a) {
    const moe_tensor *y = a->in[0], *w = a->in[1], *src = a->in[2]; /* w NULL: weights 1 */
    const int64_t N = y->shape[0], d = y->shape[1], Tn = src->shape[0], k = src->shape[1];
    if (Tn * d == 0) return MOE_OK;
    const int V = cu_vec8_ok(d, {y->data, a->out->data}) ? 8 : 1;
    const int th = cu_row_threads(d / V) > 256 ? 256 : cu_row_threads(d / V);
    dim3 grid((unsigned)((d / V + th - 1) / th), (unsigned)(Tn < 65535 ? Tn : 65535));
    CU_FLOAT_DISPATCH(y->dtype, "combine",
        auto kernel = V == 8 ? combine_kernel<T, 8> : combine_kernel<T, 1>;
        kernel<<<grid, th, 0, moe_cu.stream>>>(
            (const T *)y->data, w ? (const T *)w->data : NULL, (const int32_t *)src->data, (T *)a->out->data, N, d,
            Tn, k, moe_cu.index_fault);)
    CU_LAUNCHED("combine");
    return MOE_OK;
}

/* Backward, one block per token: gw[t, j] = g[t] . y[src[t, j]] and gy[src[t, j]] =
 * w[t, j] g[t]; src names every row of y once (the caller's contract), so gy is written
 * fully without a fill. */
template <class T>
__global__ void combine_bwd_kernel(const T *g, const T *y, const T *w, const int32_t *src, T *gy, T *gw, int64_t N,
                                     int64_t d, int64_t Tn, int64_t k, cu_index_fault *f) {
    __shared__ float sh[32];
    for (int64_t t = blockIdx.x; t < Tn; t += gridDim.x)
        for (int64_t j = 0; j < k; j++) {
            int32_t r = src[t * k + j];
            bool ok = r != -1 && cu_index_ok(f, CU_IDX_COMBINE, r, t * k + j, N);
            float wv = ok ? ldf(w + t * k + j) : 0.0f, dot = 0;
            for (int64_t c = threadIdx.x; ok && c < d; c += blockDim.x) {
                float gv = ldf(g + t * d + c);
                dot += gv * ldf(y + (int64_t)r * d + c);
                stf(gy + (int64_t)r * d + c, wv * gv);
            }
            dot = cu_block_sum(dot, sh);
            if (threadIdx.x == 0) stf(gw + t * k + j, dot);
        }
}

extern "C" moe_status moe_cuda_combine_bwd(const moe_kernel_args *a) {
    const moe_tensor *g = a->in[0], *y = a->in[1], *w = a->in[2], *src = a->in[3];
    const int64_t N = y->shape[0], d = y->shape[1], Tn = w->shape[0], k = w->shape[1];
    if (Tn * k == 0) return MOE_OK;
    const int th = cu_row_threads(d) > 256 ? 256 : cu_row_threads(d);
    CU_FLOAT_DISPATCH(y->dtype, "combine_bwd",
        combine_bwd_kernel<T><<<cu_blocks(Tn * th, th), th, 0, moe_cu.stream>>>(
            (const T *)g->data, (const T *)y->data, (const T *)w->data, (const int32_t *)src->data, (T *)a->out->data,
            (T *)a->out2->data, N, d, Tn, k, moe_cu.index_fault);)
    CU_LAUNCHED("combine_bwd");
    return MOE_OK;
}

/* ---- GATHER / SCATTER_ADD along the last axis: idx [rows, k] into [rows, n] ---- */
template <class U>
__global__ void gather_kernel(const U *x, const int32_t *idx, U *o, int64_t rows, int64_t n, int64_t k,
                              cu_index_fault *f) {
    CU_GRID_LOOP(i, rows * k) {
        int32_t v = idx[i];
        o[i] = cu_index_ok(f, CU_IDX_GATHER, v, i, n) ? x[(i / k) * n + v] : (U)0;
    }
}

extern "C" moe_status moe_cuda_gather(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0], *idx = a->in[1];
    int64_t rows = cu_rows(idx), n = cu_cols(x), k = cu_cols(idx);
    const int32_t *pi = (const int32_t *)idx->data;
    if (rows * k == 0) return MOE_OK;
    BITS_DISPATCH(moe_dtype_size(x->dtype), "gather",
        gather_kernel<U><<<cu_blocks(rows * k), CU_THREADS, 0, moe_cu.stream>>>(
            (const U *)x->data, pi, (U *)a->out->data, rows, n, k, moe_cu.index_fault);)
    CU_LAUNCHED("gather");
    return MOE_OK;
}

template <class T>
__global__ void scatter_add_kernel(T *o, const T *src, const int32_t *idx, int64_t rows, int64_t n, int64_t k,
                                   cu_index_fault *f) {
    CU_GRID_LOOP(i, rows * k) {
        int32_t v = idx[i];
        if (cu_index_ok(f, CU_IDX_SCATTER_ADD, v, i, n)) atomic_addf(o + (i / k) * n + v, ldf(src + i));
    }
}

extern "C" moe_status moe_cuda_scatter_add(const moe_kernel_args *a) {
    moe_tensor *o = a->out;
    const moe_tensor *src = a->in[0], *idx = a->in[1];
    int64_t rows = cu_rows(idx), n = cu_cols(o), k = cu_cols(idx);
    const int32_t *pi = (const int32_t *)idx->data;
    if (rows * k == 0) return MOE_OK;
    CU_FLOAT_DISPATCH(o->dtype, "scatter_add",
        scatter_add_kernel<T><<<cu_blocks(rows * k), CU_THREADS, 0, moe_cu.stream>>>(
            (T *)o->data, (const T *)src->data, pi, rows, n, k, moe_cu.index_fault);)
    CU_LAUNCHED("scatter_add");
    return MOE_OK;
}

/* ---- TOPK: k rounds per row, each the best element ordered after the previous pick
 * (descending value, ascending index among equals): no scratch, any row length. NaNs are
 * never picked; a row with fewer than k non-NaN values gets (NaN, index 0) fillers. ---- */
template <class T> __global__ void topk_kernel(const T *x, T *vals, int32_t *ids, int64_t rows, int64_t n, int k) {
    __shared__ float sv[32];
    __shared__ int si[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *p = x + r * n;
        float pv = INFINITY;
        int pi = -1;
        for (int t = 0; t < k; t++) {
            float bv = NAN;
            int bi = INT_MAX;
            for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
                float v = ldf(p + c);
                if (v < pv || (v == pv && (int)c > pi)) topk_merge(bv, bi, v, (int)c);
            }
            topk_warp_merge(bv, bi);
            __syncthreads();
            if (lane == 0) {
                sv[warp] = bv;
                si[warp] = bi;
            }
            __syncthreads();
            bv = sv[0];
            bi = si[0];
            for (int w = 1; w < nw; w++) topk_merge(bv, bi, sv[w], si[w]);
            if (threadIdx.x == 0) {
                stf(vals + r * k + t, bv);
                ids[r * k + t] = bi == INT_MAX ? 0 : bi;
            }
            pv = bv;
            pi = bi;
        }
    }
}

extern "C" moe_status moe_cuda_topk(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    int64_t rows = cu_rows(x), n = cu_cols(x);
    int k = ((const moe_topk_attrs *)a->attrs)->k;
    if (rows == 0 || k == 0) return MOE_OK;
    if (n > INT32_MAX) return moe_error(MOE_ERR_INVALID, "topk: rows of %lld elements are too long", (long long)n);
    int th = cu_row_threads(n) > 256 ? 256 : cu_row_threads(n);
    CU_FLOAT_DISPATCH(x->dtype, "topk",
        topk_kernel<T><<<cu_blocks(rows * th, th), th, 0, moe_cu.stream>>>(
            (const T *)x->data, (T *)a->out->data, (int32_t *)a->out2->data, rows, n, k);)
    CU_LAUNCHED("topk");
    return MOE_OK;
}

/* ---- ARGSORT: stable ascending positions per row (CUB radix sort of (key, position)) ---- */
__global__ void iota_rows_kernel(int32_t *pos, int64_t rows, int64_t n, int *offsets) {
    CU_GRID_LOOP(i, rows * n) pos[i] = (int32_t)(i % n);
    CU_GRID_LOOP(r, rows + 1) offsets[r] = (int)(r * n);
}

template <class K> static moe_status argsort_typed(const K *keys, int32_t *out, int64_t rows, int64_t n) {
    int64_t total = rows * n;
    K *keys_out = (K *)cu_scratch(sizeof(K) * (size_t)total);
    int32_t *pos = (int32_t *)cu_scratch(sizeof(int32_t) * (size_t)total);
    int *offsets = (int *)cu_scratch(sizeof(int) * (size_t)(rows + 1));
    if (!keys_out || !pos || !offsets) return moe_last_status();
    iota_rows_kernel<<<cu_blocks(total), CU_THREADS, 0, moe_cu.stream>>>(pos, rows, n, offsets);
    CU_LAUNCHED("argsort (positions)");
    size_t bytes = 0;
    void *tmp = NULL;
    for (int pass = 0; pass < 2; pass++) { /* pass 0 sizes the temporary storage */
        if (pass == 1 && !(tmp = cu_scratch(bytes ? bytes : 1))) return moe_last_status();
        if (rows == 1)
            CU_TRY(cub::DeviceRadixSort::SortPairs(tmp, bytes, keys, keys_out, pos, out, (int)n, 0, (int)(sizeof(K) * 8),
                                                   moe_cu.stream),
                   "argsort of %lld keys (cub::DeviceRadixSort)", (long long)n);
        else
            CU_TRY(cub::DeviceSegmentedRadixSort::SortPairs(tmp, bytes, keys, keys_out, pos, out, (int)total, (int)rows,
                                                            offsets, offsets + 1, 0, (int)(sizeof(K) * 8),
                                                            moe_cu.stream),
                   "argsort of %lld rows of %lld keys (cub::DeviceSegmentedRadixSort)", (long long)rows, (long long)n);
    }
    CU_LAUNCHED("argsort");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_argsort(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    int64_t rows = cu_rows(x), n = cu_cols(x);
    if (rows * n == 0) return MOE_OK;
    if (rows * n > INT32_MAX)
        return moe_error(MOE_ERR_INVALID, "argsort: %lld keys are more than one sort handles", (long long)(rows * n));
    int32_t *out = (int32_t *)a->out->data;
    switch (x->dtype) {
    case MOE_I32: return argsort_typed((const int32_t *)x->data, out, rows, n);
    case MOE_F32: return argsort_typed((const float *)x->data, out, rows, n);
    case MOE_BF16: return argsort_typed((const bf16 *)x->data, out, rows, n);
    default:
        return moe_error(MOE_ERR_UNSUPPORTED, "argsort: dtype %s is not supported on cuda (i32, f32, bf16)",
                         moe_dtype_name(x->dtype));
    }
}

/* ---- BINCOUNT and CUMSUM (1-D I32) ---- */
__global__ void bincount_kernel(const int32_t *x, int64_t n, int64_t nbins, int32_t *out, cu_index_fault *f) {
    CU_GRID_LOOP(i, n) {
        int32_t v = x[i];
        if (cu_index_ok(f, CU_IDX_BINCOUNT, v, i, nbins)) atomicAdd(out + v, 1);
    }
}

extern "C" moe_status moe_cuda_bincount(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    int64_t n = moe_tensor_numel(x), nbins = ((const moe_int_attrs *)a->attrs)->nbins;
    const int32_t *px = (const int32_t *)x->data;
    if (nbins > 0)
        CU_TRY(cudaMemsetAsync(a->out->data, 0, sizeof(int32_t) * (size_t)nbins, moe_cu.stream), "bincount: zeroing %lld bins",
               (long long)nbins);
    if (n == 0) return MOE_OK;
    bincount_kernel<<<cu_blocks(n), CU_THREADS, 0, moe_cu.stream>>>(px, n, nbins, (int32_t *)a->out->data,
                                                                    moe_cu.index_fault);
    CU_LAUNCHED("bincount");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_cumsum(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    int64_t n = moe_tensor_numel(x);
    bool exclusive = ((const moe_int_attrs *)a->attrs)->exclusive;
    if (n == 0) return MOE_OK;
    if (n > INT32_MAX) return moe_error(MOE_ERR_INVALID, "cumsum: %lld elements are too many", (long long)n);
    /* unsigned sums wrap like the CPU's int32 arithmetic */
    const uint32_t *in = (const uint32_t *)x->data;
    uint32_t *out = (uint32_t *)a->out->data;
    size_t bytes = 0;
    void *tmp = NULL;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1 && !(tmp = cu_scratch(bytes ? bytes : 1))) return moe_last_status();
        if (exclusive)
            CU_TRY(cub::DeviceScan::ExclusiveSum(tmp, bytes, in, out, (int)n, moe_cu.stream), "cumsum of %lld values",
                   (long long)n);
        else
            CU_TRY(cub::DeviceScan::InclusiveSum(tmp, bytes, in, out, (int)n, moe_cu.stream), "cumsum of %lld values",
                   (long long)n);
    }
    CU_LAUNCHED("cumsum");
    return MOE_OK;
}

/* ---- ROUTE_PLAN: block e places expert e's assignments ----
 * Two passes over the ids (read through L2 by every block): the count of assignments to
 * experts below e (where e's run starts), then e's own in order, ranked within each chunk
 * of the block's width by a warp ballot and the warps' counts before it. Deterministic and
 * stable; block 0 records an id outside [0, E) (its src is -1, its expert's run lacks it). */
#define RP_THREADS 1024
__global__ void __launch_bounds__(RP_THREADS) route_plan_kernel(const int32_t *ids, int64_t n, int k, int E,
                                                                int32_t *tok, int32_t *offsets, int32_t *src,
                                                                cu_index_fault *f) {
    cu_prior_done();
    __shared__ int warp_count[RP_THREADS / 32];
    const int e = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int at = 0;
    for (int64_t i0 = 0; i0 < n; i0 += blockDim.x) {
        int64_t i = i0 + threadIdx.x;
        int v = i < n ? ids[i] : -1;
        at += __syncthreads_count(v >= 0 && v < e);
    }
    if (threadIdx.x == 0) offsets[e] = at;
    for (int64_t i0 = 0; i0 < n; i0 += blockDim.x) {
        int64_t i = i0 + threadIdx.x;
        int v = i < n ? ids[i] : -1;
        if (e == 0 && i < n && !cu_index_ok(f, CU_IDX_ROUTE_PLAN, v, i, E)) src[i] = -1;
        unsigned mine = __ballot_sync(0xffffffffu, v == e);
        if (lane == 0) warp_count[warp] = __popc(mine);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < warps; w++) {
            int c = warp_count[w];
            before += w < warp ? c : 0;
            total += c;
        }
        if (v == e) {
            int pos = at + before + __popc(mine & ((1u << lane) - 1u));
            tok[pos] = (int32_t)(i / k);
            src[i] = pos;
        }
        at += total;
        __syncthreads(); /* warp_count is written again */
    }
    if (e == E - 1 && threadIdx.x == 0) offsets[E] = at;
}

extern "C" moe_status moe_cuda_route_plan(const moe_kernel_args *a) {
    const moe_tensor *ids = a->in[0];
    const int64_t n = moe_tensor_numel(ids), E = ((const moe_int_attrs *)a->attrs)->nbins;
    int32_t *tok = (int32_t *)a->out->data;
    cu_launch(route_plan_kernel, dim3((unsigned)E), dim3(RP_THREADS), 0, (const int32_t *)ids->data, n,
              (int)ids->shape[1], (int)E, tok, tok + n, (int32_t *)a->out2->data, moe_cu.index_fault);
    CU_LAUNCHED("route_plan");
    return MOE_OK;
}

/* ---- ROUTE_TOPK: one warp per row of logits (f32 or bf16, read as f32): route_row ---- */
template <class T>
__global__ void route_topk_kernel(const T *lg, const float *bias, T *gates, int32_t *ids, int64_t rows, int E,
                                  moe_route_spec sp) {
    cu_prior_done();
    const int lane = threadIdx.x & 31;
    for (int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < rows;
         r += ((int64_t)gridDim.x * blockDim.x) >> 5)
        route_row<T>(lg + r * E, bias, gates + r * sp.k, ids + r * sp.k, E, sp, lane);
}

extern "C" moe_status moe_cuda_route_topk(const moe_kernel_args *a) {
    const moe_tensor *lg = a->in[0], *bias = a->in[1];
    const int64_t rows = lg->shape[0], E = lg->shape[1];
    if (bias && bias->dtype != MOE_F32)
        return moe_error(MOE_ERR_UNSUPPORTED, "route_topk: the bias must be f32 on cuda, got %s",
                         moe_dtype_name(bias->dtype));
    if (rows == 0) return MOE_OK;
    if (E > INT32_MAX) return moe_error(MOE_ERR_INVALID, "route_topk: %lld experts are too many", (long long)E);
    const int warps = 4;
    CU_FLOAT_DISPATCH(lg->dtype, "route_topk",
        cu_launch(route_topk_kernel<T>, cu_blocks(rows * 32, warps * 32), warps * 32, 0, (const T *)lg->data,
                  bias ? (const float *)bias->data : NULL, (T *)a->out->data, (int32_t *)a->out2->data, rows, (int)E,
                  *(const moe_route_spec *)a->attrs);)
    CU_LAUNCHED("route_topk");
    return MOE_OK;
}
