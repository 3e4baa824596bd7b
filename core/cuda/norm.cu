/* CUDA row-wise kernels: softmax / log-softmax and the backward, logsumexp, RMSNorm and
 * LayerNorm with their backwards, the fused residual add + RMSNorm of inference (core/cpu/norm_cpu.c is the specification). Every tensor
 * is contiguous [rows, d]; one block handles a row (grid-stride over rows), row sums are
 * block reductions in f32. Statistics and parameter grads are F32 (x is F32 or BF16).
 * Parameter grads are summed over rows by a column kernel in a fixed order, so they are
 * deterministic. */
#include "core/cuda/cuda_common.cuh"
#include "core/cuda/norm.cuh"

static inline int row_threads(int64_t d) { return cu_row_threads(d) > 512 ? 512 : cu_row_threads(d); }
#define ROW_LOOP(r, rows) for (int64_t r = blockIdx.x; r < (rows); r += gridDim.x)
#define COL_LOOP(c, d) for (int64_t c = threadIdx.x; c < (d); c += blockDim.x)

/* Row max (NaN-free part; a NaN still reaches every output through exp). */
template <class T> __device__ float row_max(const T *p, int64_t d, float *sh) {
    float m = -INFINITY;
    COL_LOOP(c, d) m = fmaxf(m, ldf(p + c));
    return cu_block_max(m, sh);
}

template <class T> __device__ float row_sumexp(const T *p, int64_t d, float m, float *sh) {
    float s = 0;
    COL_LOOP(c, d) s += expf(ldf(p + c) - m);
    return cu_block_sum(s, sh);
}

template <class T> __global__ void softmax_kernel(const T *x, T *o, int64_t rows, int64_t d, bool log_out) {
    __shared__ float sh[32];
    ROW_LOOP(r, rows) {
        const T *p = x + r * d;
        T *q = o + r * d;
        float m = row_max(p, d, sh);
        if (m == -INFINITY) { /* every element -inf */
            COL_LOOP(c, d) stf(q + c, log_out ? -INFINITY : 0.0f);
            continue;
        }
        float s = row_sumexp(p, d, m, sh);
        if (log_out) {
            float ls = logf(s);
            COL_LOOP(c, d) stf(q + c, (ldf(p + c) - m) - ls);
        } else {
            float inv = 1.0f / s;
            COL_LOOP(c, d) stf(q + c, expf(ldf(p + c) - m) * inv);
        }
    }
}

extern "C" moe_status moe_cuda_softmax(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    bool log_out = ((const moe_softmax_attrs *)a->attrs)->log;
    int64_t rows = cu_rows(x), d = cu_cols(x);
    if (rows * d == 0) return MOE_OK;
    int th = row_threads(d);
    CU_FLOAT_DISPATCH(x->dtype, "softmax",
        softmax_kernel<T><<<cu_blocks(rows * th, th), th, 0, moe_cu.stream>>>((const T *)x->data, (T *)a->out->data,
                                                                             rows, d, log_out);)
    CU_LAUNCHED("softmax");
    return MOE_OK;
}

/* softmax: gx = y * (g - sum(g * y)); log-softmax: gx = g - exp(y) * sum(g). */
template <class T> __global__ void softmax_bwd_kernel(const T *g, const T *y, T *o, int64_t rows, int64_t d, bool log_out) {
    __shared__ float sh[32];
    ROW_LOOP(r, rows) {
        const T *pg = g + r * d, *py = y + r * d;
        T *q = o + r * d;
        float s = 0;
        COL_LOOP(c, d) s += log_out ? ldf(pg + c) : ldf(pg + c) * ldf(py + c);
        s = cu_block_sum(s, sh);
        if (log_out) COL_LOOP(c, d) stf(q + c, ldf(pg + c) - expf(ldf(py + c)) * s);
        else COL_LOOP(c, d) stf(q + c, ldf(py + c) * (ldf(pg + c) - s));
    }
}

extern "C" moe_status moe_cuda_softmax_bwd(const moe_kernel_args *a) {
    const moe_tensor *g = a->in[0], *y = a->in[1];
    bool log_out = ((const moe_softmax_attrs *)a->attrs)->log;
    int64_t rows = cu_rows(y), d = cu_cols(y);
    if (rows * d == 0) return MOE_OK;
    int th = row_threads(d);
    CU_FLOAT_DISPATCH(y->dtype, "softmax_bwd",
        softmax_bwd_kernel<T><<<cu_blocks(rows * th, th), th, 0, moe_cu.stream>>>(
            (const T *)g->data, (const T *)y->data, (T *)a->out->data, rows, d, log_out);)
    CU_LAUNCHED("softmax_bwd");
    return MOE_OK;
}

template <class T> __global__ void logsumexp_kernel(const T *x, T *o, int64_t rows, int64_t d) {
    __shared__ float sh[32];
    ROW_LOOP(r, rows) {
        const T *p = x + r * d;
        float m = row_max(p, d, sh);
        float v = m == -INFINITY ? m : m + logf(row_sumexp(p, d, m, sh));
        if (threadIdx.x == 0) stf(o + r, v);
    }
}

extern "C" moe_status moe_cuda_logsumexp(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    int64_t rows = cu_rows(x), d = cu_cols(x);
    if (rows * d == 0) return MOE_OK;
    int th = row_threads(d);
    CU_FLOAT_DISPATCH(x->dtype, "logsumexp",
        logsumexp_kernel<T><<<cu_blocks(rows * th, th), th, 0, moe_cu.stream>>>((const T *)x->data,
                                                                               (T *)a->out->data, rows, d);)
    CU_LAUNCHED("logsumexp");
    return MOE_OK;
}

/* ---- RMSNorm / LayerNorm forward: ns = 1 (rstd) or 2 (mean, rstd) statistics per row; x's
 * row r at r * ld (a slice of wider rows is read in place); V = 8: each thread moves 8
 * consecutive values per access (16 bytes in bf16), V = 1 where rows are not aligned so ---- */
template <class T, int V>
__global__ void norm_kernel(const T *x, int64_t ld, const T *w, const T *b, T *o, float *st, int64_t rows, int64_t d,
                            float eps, int ns) {
    __shared__ float sh[32];
    const int64_t c0 = (int64_t)threadIdx.x * V, cstep = (int64_t)blockDim.x * V;
    ROW_LOOP(r, rows) {
        const T *p = x + r * ld;
        T *q = o + r * d;
        float mu = 0, v[V];
        if (ns == 2) {
            float s = 0;
            for (int64_t c = c0; c < d; c += cstep) {
                cu_ldv<T, V>(p + c, v);
#pragma unroll
                for (int k = 0; k < V; k++) s += v[k];
            }
            mu = cu_block_sum(s, sh) / (float)d;
        }
        float var = 0;
        for (int64_t c = c0; c < d; c += cstep) {
            cu_ldv<T, V>(p + c, v);
#pragma unroll
            for (int k = 0; k < V; k++) var += (v[k] - mu) * (v[k] - mu);
        }
        float rs = 1.0f / sqrtf(cu_block_sum(var, sh) / (float)d + eps);
        if (threadIdx.x == 0) {
            if (ns == 2) st[2 * r] = mu;
            st[ns * r + ns - 1] = rs;
        }
        for (int64_t c = c0; c < d; c += cstep) {
            float wv[V], bv[V], y[V];
            cu_ldv<T, V>(p + c, v);
            if (w) cu_ldv<T, V>(w + c, wv);
            if (b) cu_ldv<T, V>(b + c, bv);
#pragma unroll
            for (int k = 0; k < V; k++) y[k] = (v[k] - mu) * rs * (w ? wv[k] : 1.0f) + (b ? bv[k] : 0.0f);
            cu_stv<T, V>(q + c, y);
        }
    }
}

static moe_status norm_forward(const moe_kernel_args *a, int ns, const char *kname) {
    const moe_tensor *x = a->in[0], *w = a->in[1], *b = ns == 2 ? a->in[2] : NULL;
    float eps = (float)((const moe_norm_attrs *)a->attrs)->eps;
    int64_t rows = cu_rows(x), d = cu_cols(x), ld = moe_tensor_row_stride(x);
    if (rows * d == 0) return MOE_OK;
    if (a->out2->dtype != MOE_F32)
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: statistics must be f32 on cuda, got %s", kname,
                         moe_dtype_name(a->out2->dtype));
    const bool vec = ld % 8 == 0 && cu_vec8_ok(d, {x->data, a->out->data, w ? w->data : NULL, b ? b->data : NULL});
    int th = row_threads(vec ? d / 8 : d);
    CU_FLOAT_DISPATCH(x->dtype, kname,
        auto kernel = vec ? norm_kernel<T, 8> : norm_kernel<T, 1>;
        kernel<<<cu_blocks(rows * th, th), th, 0, moe_cu.stream>>>(
            (const T *)x->data, ld, w ? (const T *)w->data : NULL, b ? (const T *)b->data : NULL,
            (T *)a->out->data, (float *)a->out2->data, rows, d, eps, ns);)
    CU_LAUNCHED(kname);
    return MOE_OK;
}

extern "C" moe_status moe_cuda_rmsnorm(const moe_kernel_args *a) { return norm_forward(a, 1, "rmsnorm"); }

/* ---- ADD_RMSNORM: s = x + r rounded to T (the ADD kernel's value) -> sum, then norm_kernel's
 * RMSNorm arithmetic on s (add_norm_row) ---- */
template <class T, int V>
__global__ void add_norm_kernel(const T *x, const T *res, const T *w, T *o, T *sum, int64_t rows, int64_t d, float eps) {
    __shared__ float sh[32];
    cu_prior_done();
    ROW_LOOP(r, rows) add_norm_row<T, V, false>(x + r * d, res + r * d, w, o + r * d, sum + r * d, d, eps, sh);
}

extern "C" moe_status moe_cuda_add_rmsnorm(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0], *r = a->in[1], *w = a->in[2];
    float eps = (float)((const moe_norm_attrs *)a->attrs)->eps;
    int64_t rows = cu_rows(x), d = cu_cols(x);
    if (rows * d == 0) return MOE_OK;
    const bool vec = cu_vec8_ok(d, {x->data, r->data, w->data, a->out->data, a->out2->data});
    int th = row_threads(vec ? d / 8 : d);
    CU_FLOAT_DISPATCH(x->dtype, "add_rmsnorm",
        auto kernel = vec ? add_norm_kernel<T, 8> : add_norm_kernel<T, 1>;
        cu_launch(kernel, cu_blocks(rows * th, th), th, 0, (const T *)x->data, (const T *)r->data, (const T *)w->data,
                  (T *)a->out->data, (T *)a->out2->data, rows, d, eps);)
    CU_LAUNCHED("add_rmsnorm");
    return MOE_OK;
}
extern "C" moe_status moe_cuda_layernorm(const moe_kernel_args *a) { return norm_forward(a, 2, "layernorm"); }

/* ---- backward: gx per row; gw (and gb) summed over rows by a column kernel ----
 * With xh = (x - mean) * rstd (mean 0 for RMSNorm) and gh = g * w:
 * gx = rstd * (gh - mean(gh) - xh * mean(gh * xh)), the mean(gh) term for LayerNorm only. */
template <class T>
__global__ void norm_bwd_kernel(const T *g, const T *x, const T *w, const float *st, T *o, int64_t rows, int64_t d,
                                int ns) {
    __shared__ float sh[32];
    ROW_LOOP(r, rows) {
        const T *pg = g + r * d, *px = x + r * d;
        T *q = o + r * d;
        float mu = ns == 2 ? st[2 * r] : 0.0f, rs = st[ns * r + ns - 1];
        float sg = 0, sgx = 0;
        COL_LOOP(c, d) {
            float gh = w ? ldf(pg + c) * ldf(w + c) : ldf(pg + c);
            sg += gh;
            sgx += gh * ((ldf(px + c) - mu) * rs);
        }
        float k0 = ns == 2 ? cu_block_sum(sg, sh) / (float)d : 0.0f;
        float k1 = cu_block_sum(sgx, sh) / (float)d;
        COL_LOOP(c, d) {
            float gh = w ? ldf(pg + c) * ldf(w + c) : ldf(pg + c);
            stf(q + c, rs * (gh - k0 - (ldf(px + c) - mu) * rs * k1));
        }
    }
}

#define PG_LANES 16
/* Partial parameter grads of the rows of one chunk: pw[chunk, c] = sum_r g[r,c] * xh[r,c],
 * pb[chunk, c] = sum_r g[r,c] (pb NULL: skipped). Grid: (column groups of 32, chunks). */
template <class T>
__global__ void param_grads_kernel(const T *g, const T *x, const float *st, int ns, int64_t rows, int64_t d,
                                   int64_t rows_per_chunk, float *pw, float *pb) {
    __shared__ float sw[PG_LANES][33], sb[PG_LANES][33];
    int tx = threadIdx.x, ty = threadIdx.y;
    const int64_t chunk = blockIdx.y, r0 = chunk * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    for (int64_t c0 = (int64_t)blockIdx.x * 32; c0 < d; c0 += (int64_t)gridDim.x * 32) {
        int64_t c = c0 + tx;
        float aw = 0, ab = 0;
        if (c < d) {
            for (int64_t r = r0 + ty; r < r1; r += PG_LANES) {
                float mu = ns == 2 ? st[2 * r] : 0.0f, rs = st[ns * r + ns - 1];
                float gv = ldf(g + r * d + c);
                aw += gv * ((ldf(x + r * d + c) - mu) * rs);
                ab += gv;
            }
        }
        sw[ty][tx] = aw;
        sb[ty][tx] = ab;
        __syncthreads();
        if (ty == 0 && c < d) {
            for (int l = 1; l < PG_LANES; l++) {
                aw += sw[l][tx];
                ab += sb[l][tx];
            }
            pw[chunk * d + c] = aw;
            if (pb) pb[chunk * d + c] = ab;
        }
        __syncthreads();
    }
}

/* gw[c] += sum of the chunks' partials in chunk order (deterministic); gb likewise. */
__global__ void param_grads_finish_kernel(const float *pw, const float *pb, int64_t chunks, int64_t d, float *gw,
                                          float *gb) {
    CU_GRID_LOOP(c, d) {
        float aw = 0, ab = 0;
        for (int64_t k = 0; k < chunks; k++) {
            aw += pw[k * d + c];
            if (pb) ab += pb[k * d + c];
        }
        gw[c] += aw;
        if (gb) gb[c] += ab;
    }
}

static moe_status norm_backward(const moe_kernel_args *a, int ns, const char *kname) {
    const moe_tensor *g = a->in[0], *x = a->in[1], *w = a->in[2], *st = a->in[3];
    int64_t rows = cu_rows(x), d = cu_cols(x);
    if (rows * d == 0) return MOE_OK;
    if (st->dtype != MOE_F32 || (a->out2 && a->out2->dtype != MOE_F32))
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: statistics and parameter grads must be f32 on cuda", kname);
    int th = row_threads(d);
    const float *pst = (const float *)st->data;
    CU_FLOAT_DISPATCH(x->dtype, kname,
        norm_bwd_kernel<T><<<cu_blocks(rows * th, th), th, 0, moe_cu.stream>>>(
            (const T *)g->data, (const T *)x->data, w ? (const T *)w->data : NULL, pst, (T *)a->out->data, rows, d,
            ns);
        CU_LAUNCHED(kname);
        if (a->out2) {
            /* rows cut into chunks so that about 4 blocks per SM work on the column groups */
            float *gw = (float *)a->out2->data;
            const int64_t groups = (d + 31) / 32, want = 4 * (int64_t)moe_cu.sms;
            int64_t chunks = groups >= want ? 1 : (want + groups - 1) / groups;
            if (chunks > (rows + 255) / 256) chunks = (rows + 255) / 256; /* at least 256 rows each */
            if (chunks > 65535) chunks = 65535;
            const int64_t per = (rows + chunks - 1) / chunks;
            float *pw = (float *)cu_scratch(sizeof(float) * (size_t)(chunks * d * (ns == 2 ? 2 : 1)));
            if (!pw) return moe_last_status();
            float *pb = ns == 2 ? pw + chunks * d : NULL;
            dim3 grid((unsigned)(groups < 65535 ? groups : 65535), (unsigned)chunks);
            param_grads_kernel<T><<<grid, dim3(32, PG_LANES), 0, moe_cu.stream>>>(
                (const T *)g->data, (const T *)x->data, pst, ns, rows, d, per, pw, pb);
            CU_LAUNCHED(kname);
            param_grads_finish_kernel<<<cu_blocks(d), CU_THREADS, 0, moe_cu.stream>>>(pw, pb, chunks, d, gw,
                                                                                    ns == 2 ? gw + d : NULL);
            CU_LAUNCHED(kname);
        })
    return MOE_OK;
}

extern "C" moe_status moe_cuda_rmsnorm_bwd(const moe_kernel_args *a) { return norm_backward(a, 1, "rmsnorm_bwd"); }
extern "C" moe_status moe_cuda_layernorm_bwd(const moe_kernel_args *a) { return norm_backward(a, 2, "layernorm_bwd"); }
