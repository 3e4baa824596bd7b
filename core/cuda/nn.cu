/* CUDA neural-network kernels (core/cpu/nn_cpu.c is the specification): dropout (the same
 * Philox mask as the CPU), rotary embedding, flash attention forward and backward (online
 * softmax over key tiles held in shared memory, never a [Tq, Tk] matrix; causal with the
 * query offset Tk - Tq; grouped-query heads) and blockwise cross-entropy over the
 * vocabulary (cuBLAS for the block products, never a [T, V] logit matrix).
 *
 * Attention layout: a block holds ATT_ROWS warps, one query (forward, dq) or one key
 * (dk, dv) row per warp. Tiles of 32 rows of the other side are staged in shared memory
 * as f32; lane j scores row j of the tile, then every lane accumulates its own head dims
 * (d = lane + 32 e) over the 32 tile rows. Head dims up to ATT_MAX_HD. All of it in f32.
 * bf16 with head dim 64 or 128 and 16-byte aligned rows goes to the tensor-core kernels of
 * core/cuda/attention_tc.cu instead. */
#include "core/cuda/cuda_common.cuh"
#include "core/philox.h"

extern "C" moe_status moe_cuda_copy(const moe_kernel_args *a);

/* Tensor-core attention (core/cuda/attention_tc.cu): whether it takes a call with q = t[0]
 * and the other bf16 operands t[1..n), and its forward and backward (D = rowsum(dO * O)). */
bool att_tc_fits(const moe_tensor *const *t, int n);
moe_status att_tc_forward(const moe_kernel_args *a);
moe_status att_tc_backward(const moe_kernel_args *a, const float *D);

/* ---- dropout ---- */
template <class T> __global__ void dropout_kernel(const T *x, T *y, int64_t n, moe_dropout_attrs at, float scale) {
    CU_GRID_LOOP(i, n) {
        bool keep = moe_philox_uniform(at.counter + (uint64_t)i, at.seed) >= at.p;
        stf(y + i, keep ? ldf(x + i) * scale : 0.0f);
    }
}

extern "C" moe_status moe_cuda_dropout(const moe_kernel_args *a) {
    const moe_dropout_attrs at = *(const moe_dropout_attrs *)a->attrs;
    int64_t n = moe_tensor_numel(a->out);
    if (n == 0) return MOE_OK;
    float scale = (float)(1.0 / (1.0 - at.p));
    CU_FLOAT_DISPATCH(a->out->dtype, "dropout",
        dropout_kernel<T><<<cu_blocks(n), CU_THREADS, 0, moe_cu.stream>>>((const T *)a->in[0]->data,
                                                                        (T *)a->out->data, n, at, scale);)
    CU_LAUNCHED("dropout");
    return MOE_OK;
}

/* ---- rotary embedding. Grid (pairs of all positions, groups of ROPE_HEADS (batch row,
 * head)s): a thread computes the angle of its (position t, pair p) once (in double, at
 * position in[1][t] or pos0 + t; theta^(-2p/hd) as exp2(p * lg), lg = -2 log2(theta) / hd
 * from the host; reduced modulo 2 pi in double, then sin and cos in one single-precision
 * sincosf) and rotates that pair in its group's heads; one kernel per call, the
 * trigonometry once per (t, p, group) ---- */
#define ROPE_HEADS 8

struct rope_geom {
    int64_t B, Tn, H, half, s[4];
    double lg; /* log2 of the pair-to-pair frequency ratio */
};

/* cos and sin of the angle p theta^(-2i/hd) = p exp2(i lg): the angle in double, reduced to
 * [-pi, pi] in double (2 pi split in two parts), sine and cosine in single precision. */
__device__ __forceinline__ void rope_cos_sin(int64_t p, int64_t i, double lg, float *c, float *s) {
    const double ang = (double)p * exp2((double)i * lg);
    const double turns = rint(ang * 0.15915494309189535);
    sincosf((float)fma(-turns, 2.4492935982947064e-16, fma(-turns, 6.283185307179586, ang)), s, c);
}

template <class T>
__global__ void rope_kernel(const T *x, T *y, const int32_t *pos, moe_rope_attrs at, rope_geom g) {
    const int64_t BH = g.B * g.H;
    CU_GRID_LOOP(i, g.Tn * g.half) {
        const int64_t t = i / g.half, p = i % g.half;
        float sf, c;
        rope_cos_sin(pos ? pos[t] : at.pos0 + t, p, g.lg, &c, &sf);
        const float s = at.inverse ? -sf : sf;
        for (int64_t bh0 = (int64_t)blockIdx.y * ROPE_HEADS; bh0 < BH; bh0 += (int64_t)gridDim.y * ROPE_HEADS) {
            float x1[ROPE_HEADS], x2[ROPE_HEADS]; /* all loads first, then the stores */
#pragma unroll
            for (int u = 0; u < ROPE_HEADS; u++) {
                const int64_t b = (bh0 + u) / g.H, h = (bh0 + u) % g.H;
                const T *xr = x + b * g.s[0] + t * g.s[1] + h * g.s[2];
                x1[u] = bh0 + u < BH ? ldf(xr + p * g.s[3]) : 0.0f;
                x2[u] = bh0 + u < BH ? ldf(xr + (p + g.half) * g.s[3]) : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < ROPE_HEADS; u++) {
                if (bh0 + u >= BH) break;
                const int64_t b = (bh0 + u) / g.H, h = (bh0 + u) % g.H;
                T *yr = y + ((b * g.Tn + t) * g.H + h) * 2 * g.half; /* y [B, Tn, H, hd] */
                stf(yr + p, x1[u] * c - x2[u] * s);
                stf(yr + p + g.half, x2[u] * c + x1[u] * s);
            }
        }
    }
}

extern "C" moe_status moe_cuda_rope(const moe_kernel_args *a) {
    const moe_rope_attrs at = *(const moe_rope_attrs *)a->attrs;
    const moe_tensor *x = a->in[0];
    rope_geom g = {x->shape[0], x->shape[1], x->shape[2], x->shape[3] / 2,
                   {x->strides[0], x->strides[1], x->strides[2], x->strides[3]}, -2.0 * log2(at.theta) / (double)x->shape[3]};
    const int64_t groups = (g.B * g.H + ROPE_HEADS - 1) / ROPE_HEADS;
    if (g.Tn * g.half * groups == 0) return MOE_OK;
    const int32_t *pos = a->in[1] ? (const int32_t *)a->in[1]->data : NULL;
    dim3 grid(cu_blocks(g.Tn * g.half), (unsigned)(groups < 65535 ? groups : 65535));
    CU_FLOAT_DISPATCH(x->dtype, "rope",
        rope_kernel<T><<<grid, CU_THREADS, 0, moe_cu.stream>>>((const T *)x->data, (T *)a->out->data, pos, at, g);)
    CU_LAUNCHED("rope");
    return MOE_OK;
}

/* ---- ROPE_APPEND (inference): one block per (token, job). A job is a
 * stream of rows: q, k or v of an attention layer. The block's n hd values and their weights
 * (V at a time, all loads issued in one pass) go to shared memory with the values' squares
 * summed per V-chunk; with a norm, the chunk sums are added per head or over the token (a
 * block sum), in a fixed order, and the values normalised and weighted there and rounded to
 * T, as RMSNorm writes them; then, when the job rotates, every pair is rotated with the
 * token's angles (rope_cos_sin, once per pair index) as rope does; the row is stored at its
 * own place or at a cache pool's row. ---- */
enum { NR_NONE, NR_PER_HEAD, NR_ALL }; /* = moe_qk_norm_mode */

template <class T>
struct nr_job {
    const T *x;          /* token r at x + r s1, its n heads side by side */
    int64_t s1, n;
    const T *w;          /* [hd] (NR_PER_HEAD) or [n hd] (NR_ALL) */
    int norm;
    bool rotate;
    T *y;                /* rows of n hd: row r, or pool row rows[r] of R */
    const int32_t *rows;
    int64_t R;
};
template <class T>
struct nr_jobs {
    nr_job<T> j[3];
};

template <class T, int V>
__global__ void norm_rope_kernel(nr_jobs<T> jobs, const int32_t *pos, int64_t hd, float eps, double lg,
                                 cu_index_fault *fault) {
    extern __shared__ float sm[]; /* values [n hd], weights [n hd], cos [hd/2], sin [hd/2], chunk sums [n hd / V],
                                     rstd [n] */
    __shared__ float red[32];
    cu_prior_done();
    const nr_job<T> &J = jobs.j[blockIdx.y];
    const int64_t r = blockIdx.x, n = J.n, W = n * hd, half = hd / 2, chunks = W / V;
    int64_t dst = r;
    if (J.rows) {
        dst = J.rows[r];
        if (!cu_index_ok(fault, CU_IDX_ROPE_APPEND, (int32_t)dst, r, J.R)) return; /* the whole block leaves */
    }
    float *yn = sm, *wn = yn + W, *cs = wn + W, *sn = cs + half, *part = sn + half, *rs = part + chunks;
    const T *px = J.x + r * J.s1;
    if (J.rotate)
        for (int64_t i = threadIdx.x; i < half; i += blockDim.x) rope_cos_sin(pos[r], i, lg, &cs[i], &sn[i]);
    for (int64_t q = threadIdx.x; q < chunks; q += blockDim.x) {
        float v[V], wv[V] = {}, s = 0;
        cu_ldv<T, V>(px + q * V, v);
        if (J.norm != NR_NONE) cu_ldv<T, V>(J.w + (J.norm == NR_PER_HEAD ? q * V % hd : q * V), wv);
#pragma unroll
        for (int k = 0; k < V; k++) yn[q * V + k] = v[k], wn[q * V + k] = wv[k], s += v[k] * v[k];
        part[q] = s;
    }
    __syncthreads();
    if (J.norm == NR_PER_HEAD) {
        for (int64_t h = threadIdx.x; h < n; h += blockDim.x) {
            float s = 0;
            for (int64_t q = h * hd / V; q < (h + 1) * hd / V; q++) s += part[q];
            rs[h] = 1.0f / sqrtf(s / (float)hd + eps);
        }
    } else if (J.norm == NR_ALL) {
        float s = 0;
        for (int64_t q = threadIdx.x; q < chunks; q += blockDim.x) s += part[q];
        s = cu_block_sum(s, red);
        if (threadIdx.x == 0) rs[0] = 1.0f / sqrtf(s / (float)W + eps);
    }
    __syncthreads();
    if (J.norm != NR_NONE) {
        for (int64_t c = threadIdx.x; c < W; c += blockDim.x)
            yn[c] = cu_round<T>(yn[c] * rs[J.norm == NR_PER_HEAD ? c / hd : 0] * wn[c]);
        __syncthreads();
    }
    T *py = J.y + dst * W;
    if (!J.rotate) {
        for (int64_t c = threadIdx.x; c < W; c += blockDim.x) stf(py + c, yn[c]);
        return;
    }
    for (int64_t j = threadIdx.x; j < n * half; j += blockDim.x) {
        const int64_t h = j / half, i = j % half;
        const float a1 = yn[h * hd + i], a2 = yn[h * hd + i + half];
        stf(py + h * hd + i, a1 * cs[i] - a2 * sn[i]);
        stf(py + h * hd + i + half, a2 * cs[i] + a1 * sn[i]);
    }
}

/* Whether x's rows load 8 at a time: hd, its strides and its address aligned. */
static bool nr_vec_ok(const moe_tensor *x) {
    return x->shape[3] % 8 == 0 && x->strides[0] % 8 == 0 && x->strides[1] % 8 == 0 && (uintptr_t)x->data % 16 == 0;
}

/* The job of x [1, T, n, hd] (heads side by side) into y. */
template <class T>
static nr_job<T> nr_job_of(const moe_tensor *x, const moe_tensor *w, int norm, bool rotate, void *y,
                           const moe_tensor *rows, int64_t R) {
    return nr_job<T>{(const T *)x->data, x->strides[1], x->shape[2], w ? (const T *)w->data : NULL,
                     norm, rotate, (T *)y, rows ? (const int32_t *)rows->data : NULL, R};
}

/* One launch of n_jobs jobs over Tn tokens, the widest job's n heads sizing the block. */
template <class T>
static moe_status nr_launch(const nr_jobs<T> &jobs, int n_jobs, bool vec, int64_t Tn, int64_t hd,
                            const int32_t *pos, double eps, double theta, const char *kname) {
    int64_t n = 0;
    for (int i = 0; i < n_jobs; i++) n = jobs.j[i].n > n ? jobs.j[i].n : n;
    const int64_t W = n * hd;
    if (Tn * W == 0) return MOE_OK;
    if (Tn > INT32_MAX) return moe_error(MOE_ERR_UNSUPPORTED, "%s: %lld tokens", kname, (long long)Tn);
    const int V = vec ? 8 : 1;
    const size_t smem = sizeof(float) * (size_t)(2 * W + hd + W / V + n);
    int th = cu_row_threads(W / V);
    th = th < 64 ? 64 : th > 512 ? 512 : th;
    auto kernel = vec ? norm_rope_kernel<T, 8> : norm_rope_kernel<T, 1>;
    MOE_TRY(cu_allow_smem(kernel, smem, kname));
    cu_launch(kernel, dim3((unsigned)Tn, (unsigned)n_jobs), th, smem, jobs, pos, hd, (float)eps,
              -2.0 * log2(theta) / (double)hd, moe_cu.index_fault);
    CU_LAUNCHED(kname);
    return MOE_OK;
}

/* q into out; k and v into the pools' rows, one launch (grid y: q, k, v). */
extern "C" moe_status moe_cuda_rope_append(const moe_kernel_args *a) {
    const moe_rope_append_attrs at = *(const moe_rope_append_attrs *)a->attrs;
    const moe_tensor *q = a->in[0], *k = a->in[1], *v = a->in[2], *qw = a->in[3], *kw = a->in[4], *rows = a->in[6];
    const int64_t R = at.k_pool->shape[0];
    bool vec = nr_vec_ok(q) && nr_vec_ok(k) && nr_vec_ok(v) && (uintptr_t)at.k_pool->data % 16 == 0 &&
               (uintptr_t)at.v_pool->data % 16 == 0;
    if (at.norm != NR_NONE) vec = vec && (uintptr_t)qw->data % 16 == 0 && (uintptr_t)kw->data % 16 == 0;
    CU_FLOAT_DISPATCH(q->dtype, "rope_append",
        nr_jobs<T> jobs = {{nr_job_of<T>(q, qw, at.norm, true, a->out->data, NULL, 0),
                            nr_job_of<T>(k, kw, at.norm, true, at.k_pool->data, rows, R),
                            nr_job_of<T>(v, NULL, NR_NONE, false, at.v_pool->data, rows, R)}};
        return nr_launch<T>(jobs, 3, vec, q->shape[1], q->shape[3], (const int32_t *)a->in[5]->data, at.eps, at.theta,
                            "rope_append");)
    return MOE_OK;
}

/* ---- attention ---- */
#define ATT_ROWS 8     /* warps (rows) per block */
#define ATT_TILE 32    /* rows of the other side per shared-memory tile */
#define ATT_MAX_HD 256
#define ATT_E (ATT_MAX_HD / 32)

/* Strides of a [B, T, H, hd] operand with unit last stride. */
struct att_view {
    int64_t sb, st, sh;
};
static att_view att_view_of(const moe_tensor *t) { return {t->strides[0], t->strides[1], t->strides[2]}; }

/* Tq, Tk: queries and keys per batch; segments as in moe_attention_attrs (seg: the table
 * on the device or NULL, n_seg: their count, the grid's z). */
struct att_geom {
    int64_t B, Tq, Tk, H, Hkv, hd;
    bool causal;
    float scale;
    const int32_t *seg;
    int64_t n_seg, max_q, max_k;
};

/* The segment of this block (blockIdx.z). */
__device__ __forceinline__ moe_att_seg att_seg(const att_geom &g) {
    return moe_att_seg_at(g.seg, g.n_seg, blockIdx.z, g.Tq, g.Tk);
}

/* Row r0 of a segment's head h: row r0 of batch b, offset by the segment's first row. */
template <class T> __device__ __forceinline__ const T *att_at(const T *x, att_view v, int64_t b, int64_t r0, int64_t h) {
    return x + b * v.sb + r0 * v.st + h * v.sh;
}

/* Rows [r0, r0 + ATT_TILE) of one head (base = its row 0) into tile[ATT_TILE][hd + 1] (f32,
 * zeros past `rows`). Every thread of the block takes part. */
template <class T>
__device__ void att_load_tile(float *tile, const T *base, att_view v, int64_t r0, int64_t rows, int64_t hd) {
    for (int64_t i = threadIdx.x; i < ATT_TILE * hd; i += blockDim.x) {
        int64_t r = i / hd, d = i - r * hd;
        tile[r * (hd + 1) + d] = r0 + r < rows ? ldf(base + (r0 + r) * v.st + d) : 0.0f;
    }
}

/* One row (hd values) into a per-warp f32 buffer; lanes split the dims. */
template <class T> __device__ void att_load_row(float *dst, const T *src, int64_t hd) {
    for (int64_t d = threadIdx.x & 31; d < hd; d += 32) dst[d] = ldf(src + d);
}

__device__ __forceinline__ float att_dot(const float *a, const float *b, int64_t hd) {
    float s = 0;
    for (int64_t d = 0; d < hd; d++) s += a[d] * b[d];
    return s;
}

/* One key tile of a row's online softmax: s = this lane's score of key lane (-inf: not
 * visible), Vt the tile's values in shared memory [ATT_TILE][hd + 1]; updates the warp's
 * running max m, sum l and accumulator acc (lanes split the head dims). A tile with no
 * visible key leaves them as they are. */
__device__ __forceinline__ void att_tile_update(float s, const float *Vt, int64_t ld, int64_t hd, int lane, float &m,
                                                float &l, float (&acc)[ATT_E]) {
    float mx = fmaxf(m, cu_warp_max(s));
    if (mx == -INFINITY) return;
    float corr = expf(m - mx), p = expf(s - mx);
    l = l * corr + cu_warp_sum(p);
    m = mx;
#pragma unroll
    for (int e = 0; e < ATT_E; e++) acc[e] *= corr;
    for (int jj = 0; jj < ATT_TILE; jj++) {
        float pj = __shfl_sync(0xffffffffu, p, jj);
        const float *vr = Vt + jj * ld;
#pragma unroll
        for (int e = 0; e < ATT_E; e++)
            if (lane + 32 * e < hd) acc[e] += pj * vr[lane + 32 * e];
    }
}

/* Forward: grid (query tiles of ATT_ROWS, H, segments); blocks past their segment's
 * queries exit. Rows and keys below are numbered within the segment. */
template <class T>
__global__ void attention_fwd_kernel(const T *q, const T *k, const T *v, T *o, float *lse, att_view vq, att_view vk,
                                     att_view vv, att_geom g) {
    extern __shared__ float smem[];
    const moe_att_seg sg = att_seg(g);
    const int64_t Tq = sg.nq, Tk = sg.nk, shift = Tk - Tq;
    const int64_t q0 = (int64_t)blockIdx.x * ATT_ROWS;
    if (q0 >= Tq) return;
    const int64_t hd = g.hd, ld = hd + 1;
    float *Kt = smem, *Vt = Kt + ATT_TILE * ld, *Qr = Vt + ATT_TILE * ld;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t b = sg.b, h = blockIdx.y, kvh = h / (g.H / g.Hkv), qi = q0 + warp;
    const T *kh = att_at(k, vk, b, sg.k0, kvh), *vh = att_at(v, vv, b, sg.k0, kvh);
    const bool live = qi < Tq;
    float *qrow = Qr + warp * hd;
    if (live) att_load_row(qrow, att_at(q, vq, b, sg.q0 + qi, h), hd);
    const int64_t qlast = min(q0 + ATT_ROWS, Tq) - 1;
    const int64_t kend = g.causal ? min(Tk, shift + qlast + 1) : Tk;
    const int64_t klim = g.causal ? shift + qi + 1 : Tk; /* keys this row sees */
    float m = -INFINITY, l = 0, acc[ATT_E];
#pragma unroll
    for (int e = 0; e < ATT_E; e++) acc[e] = 0;
    for (int64_t k0 = 0; k0 < kend; k0 += ATT_TILE) {
        __syncthreads(); /* the previous tile is consumed; the q rows are written */
        att_load_tile(Kt, kh, vk, k0, Tk, hd);
        att_load_tile(Vt, vh, vv, k0, Tk, hd);
        __syncthreads();
        if (!live) continue;
        const int64_t j = k0 + lane;
        float s = (j < Tk && j < klim) ? g.scale * att_dot(qrow, Kt + lane * ld, hd) : -INFINITY;
        att_tile_update(s, Vt, ld, hd, lane, m, l, acc); /* key 0 is always seen */
    }
    if (!live) return;
    float inv = 1.0f / l;
    T *orow = o + ((b * g.Tq + sg.q0 + qi) * g.H + h) * hd;
#pragma unroll
    for (int e = 0; e < ATT_E; e++)
        if (lane + 32 * e < hd) stf(orow + lane + 32 * e, acc[e] * inv);
    if (lane == 0) lse[(b * g.H + h) * g.Tq + sg.q0 + qi] = m + logf(l);
}

static moe_status att_check(const moe_tensor *q, const moe_tensor *k, const moe_tensor *v,
                            const moe_attention_attrs *at, const char *kname) {
    const moe_tensor *t[3] = {q, k, v};
    for (int i = 0; i < 3; i++)
        if (t[i]->strides[3] != 1 && t[i]->shape[3] != 1)
            return moe_error(MOE_ERR_INVALID, "%s: operand %d needs a unit last stride", kname, i);
    if (q->shape[3] > ATT_MAX_HD)
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: head dim %lld is larger than %d on cuda", kname,
                         (long long)q->shape[3], ATT_MAX_HD);
    if (q->shape[0] > 65535 || q->shape[2] > 65535 || (at->seg && at->n_seg > 65535))
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: more than 65535 batches, segments or heads do not fit the cuda grid",
                         kname);
    return MOE_OK;
}

static att_geom att_geom_of(const moe_tensor *q, const moe_tensor *k, const moe_attention_attrs *at) {
    att_geom g = {q->shape[0], q->shape[1], k->shape[1], q->shape[2], k->shape[2], q->shape[3], at->causal, at->scale,
                  NULL, q->shape[0], q->shape[1], k->shape[1]};
    if (at->seg) {
        g.seg = (const int32_t *)at->seg->data;
        g.n_seg = at->n_seg;
        g.max_q = at->max_q;
        g.max_k = at->max_k;
    }
    return g;
}

extern "C" moe_status moe_cuda_attention(const moe_kernel_args *a) {
    const moe_attention_attrs *at = (const moe_attention_attrs *)a->attrs;
    const moe_tensor *q = a->in[0], *k = a->in[1], *v = a->in[2];
    MOE_TRY(att_check(q, k, v, at, "attention"));
    if (a->out2->dtype != MOE_F32) return moe_error(MOE_ERR_UNSUPPORTED, "attention: lse must be f32 on cuda");
    att_geom g = att_geom_of(q, k, at);
    if (g.B * g.Tq * g.H == 0) return MOE_OK;
    const moe_tensor *tc[4] = {q, k, v, a->out};
    if (att_tc_fits(tc, 4)) return att_tc_forward(a);
    size_t smem = sizeof(float) * (size_t)(2 * ATT_TILE * (g.hd + 1) + ATT_ROWS * g.hd);
    dim3 grid((unsigned)((g.max_q + ATT_ROWS - 1) / ATT_ROWS), (unsigned)g.H, (unsigned)g.n_seg);
    CU_FLOAT_DISPATCH(q->dtype, "attention",
        MOE_TRY(cu_allow_smem(attention_fwd_kernel<T>, smem, "attention"));
        attention_fwd_kernel<T><<<grid, ATT_ROWS * 32, smem, moe_cu.stream>>>(
            (const T *)q->data, (const T *)k->data, (const T *)v->data, (T *)a->out->data, (float *)a->out2->data,
            att_view_of(q), att_view_of(k), att_view_of(v), g);)
    CU_LAUNCHED("attention");
    return MOE_OK;
}

/* ---- paged attention (decode) ----
 * ATTENTION_PAGED for segments of few queries: the keys are read out of the pools
 * [R, Hkv, hd] through rows. Grid (query-head rows, Hkv, n_seg * n_split): one block per
 * (query, head) row r = query * group + head-in-group of its kv head and per split of the
 * segment's key run (the flash-decoding split: at batch 1 there are only H rows, too few
 * blocks to stream a long cache at the device's rate). The split count comes from max_k
 * (a bound: a recorded graph replays one grid for many lengths), the split length from
 * each segment's own keys, read on the device (splits past them return at once). The
 * block's PAGED_WARPS warps share
 * out the split's keys PAGED_KEYS at a time, each with its own online softmax (lane l
 * holds head dims l E .. l E + E - 1, E = hd / 32 rounded up, a template parameter so that
 * the registers fit the head: a key row is one coalesced vector load per lane when hd is
 * 32 E (VEC), element loads otherwise), and merge their
 * states through shared memory. A warp loads the row indices of its next keys while the
 * current keys' scores are summed, and its first keys from earlier steps before the wait
 * for the kernel ahead. With one split that has keys the row is written normalised; else
 * each split writes its normalised part and (max, sum), and the last of the row's splits to
 * finish (a ticket per row) combines them: o = sum_c w_c o_c / sum_c w_c,
 * w_c = l_c exp(m_c - max_c m_c), in split order. */
#define PAGED_WARPS 8
#define PAGED_KEYS 8 /* keys (rows of K and V) a warp has in flight */

struct paged_geom {
    int64_t Tq, H, Hkv, hd, R;
    bool causal;
    float scale;
    const int32_t *seg, *rows;
    int64_t n_seg, n_split; /* a segment's keys are split in n_split runs of whole warp steps */
    unsigned *tickets;      /* with n_split > 1: a zeroed counter per (row, kv head, segment) */
};

/* A warp's running softmax state: max m, sum l, accumulator acc (dims lane E + e). */
template <int E> struct paged_state {
    float m, l, acc[E];
};

/* Pool row of key j0 + lane for lanes < PAGED_KEYS (-1: past jend); a row outside the
 * pools is reported and read as -1. */
__device__ __forceinline__ int32_t paged_row(const int32_t *rows, int64_t j0, int64_t jend, const paged_geom &g,
                                             cu_index_fault *fault) {
    const int lane = threadIdx.x & 31;
    const int64_t j = j0 + lane;
    if (lane >= PAGED_KEYS || j >= jend) return -1;
    const int32_t row = rows[j];
    if (row >= 0 && row < g.R) return row;
    cu_index_ok(fault, CU_IDX_ATTENTION_PAGED, row, j, g.R);
    return -1;
}

/* The E values of a lane's dims lane E .. lane E + E - 1 as loaded (one vector load under
 * VEC), widened only when used. */
template <class T, int E> struct paged_raw {
    T v[E];
};
template <class T, int E, bool VEC>
__device__ __forceinline__ void paged_load(const T *row, bool ok, int64_t hd, paged_raw<T, E> &out) {
    const int lane = threadIdx.x & 31;
    constexpr int BYTES = E * (int)sizeof(T);
    if (VEC) {
        static_assert(!VEC || BYTES == 4 || BYTES == 8 || BYTES % 16 == 0, "vector width");
        const T *p = row + lane * E;
        if (BYTES == 4) *reinterpret_cast<uint32_t *>(out.v) = ok ? *reinterpret_cast<const uint32_t *>(p) : 0u;
        else if (BYTES == 8) *reinterpret_cast<uint2 *>(out.v) = ok ? *reinterpret_cast<const uint2 *>(p) : make_uint2(0, 0);
        else
#pragma unroll
            for (int k = 0; k < BYTES / 16; k++)
                reinterpret_cast<uint4 *>(out.v)[k] = ok ? reinterpret_cast<const uint4 *>(p)[k] : make_uint4(0, 0, 0, 0);
    } else {
#pragma unroll
        for (int e = 0; e < E; e++) {
            const bool in = ok && lane * E + e < hd;
            out.v[e] = in ? row[lane * E + e] : T(0.0f);
        }
    }
}

/* A warp's PAGED_KEYS keys in flight: this lane's dims of each key and value row, and
 * whether the key exists. */
template <class T, int E> struct paged_keyset {
    paged_raw<T, E> k[PAGED_KEYS], v[PAGED_KEYS];
    bool ok[PAGED_KEYS];
};

/* Which of a warp's keys paged_fetch loads: those earlier steps wrote (positions before
 * `fresh`), this step's (appended by the kernel ahead), or all. */
enum paged_part { PAGED_EARLIER = 1, PAGED_THIS_STEP = 2, PAGED_ALL = 3 };

/* The loads of key j0 + u, whose pool row lane u < PAGED_KEYS holds in `row` (-1: none),
 * for the keys of `part`: every such key's and value's dims of this lane in flight at once. */
template <class T, int E, bool VEC>
__device__ __forceinline__ void paged_fetch(paged_keyset<T, E> &ks, const T *kp, const T *vp, int32_t row, int64_t j0,
                                            int64_t fresh, int part, int64_t kvh, const paged_geom &g) {
#pragma unroll
    for (int u = 0; u < PAGED_KEYS; u++) {
        const int32_t r = __shfl_sync(0xffffffffu, row, u);
        if (!(part & (j0 + u < fresh ? PAGED_EARLIER : PAGED_THIS_STEP))) continue; /* uniform over the warp */
        ks.ok[u] = r >= 0;
        const int64_t off = ((int64_t)(r < 0 ? 0 : r) * g.Hkv + kvh) * g.hd;
        paged_load<T, E, VEC>(kp + off, ks.ok[u], g.hd, ks.k[u]);
        paged_load<T, E, VEC>(vp + off, ks.ok[u], g.hd, ks.v[u]);
    }
}

/* The fetched keys into a warp's state: the scores q . k (q: this lane's dims) and one
 * online-softmax update. */
template <class T, int E>
__device__ __forceinline__ void paged_scores(paged_state<E> &st, const float (&q)[E], const paged_keyset<T, E> &ks,
                                             const paged_geom &g) {
    float kv[PAGED_KEYS][E], vv[PAGED_KEYS][E], s[PAGED_KEYS];
#pragma unroll
    for (int u = 0; u < PAGED_KEYS; u++)
#pragma unroll
        for (int e = 0; e < E; e++) kv[u][e] = ldf(&ks.k[u].v[e]), vv[u][e] = ldf(&ks.v[u].v[e]);
    float mx = st.m;
#pragma unroll
    for (int u = 0; u < PAGED_KEYS; u++) {
        float dot = 0;
#pragma unroll
        for (int e = 0; e < E; e++) dot += q[e] * kv[u][e];
        dot = cu_warp_sum(dot);
        s[u] = ks.ok[u] ? dot * g.scale : -INFINITY;
        mx = fmaxf(mx, s[u]);
    }
    if (mx == -INFINITY) return;
    const float corr = expf(st.m - mx);
    st.l *= corr;
#pragma unroll
    for (int e = 0; e < E; e++) st.acc[e] *= corr;
#pragma unroll
    for (int u = 0; u < PAGED_KEYS; u++) {
        const float p = expf(s[u] - mx); /* 0 for a missing key */
        st.l += p;
#pragma unroll
        for (int e = 0; e < E; e++) st.acc[e] += p * vv[u][e];
    }
    st.m = mx;
}

/* Row `row` of o [Tq, H, hd] from its first n splits' parts (the block's threads over the
 * dims), one pass: CU_LOADS_AHEAD splits' (max, sum) and values loaded at once, the running
 * sums rescaled to each batch's max (for n <= CU_LOADS_AHEAD, w_c = l_c exp(m_c - max m)). */
template <class T>
__device__ void paged_merge_row(const float *part, const float *ml, T *o, const paged_geom &g, int64_t row, int64_t n) {
    constexpr int AHEAD = CU_LOADS_AHEAD;
    const int64_t rows = g.Tq * g.H;
    for (int64_t d = threadIdx.x; d < g.hd; d += blockDim.x) {
        float mx = -INFINITY, wsum = 0, acc = 0;
        for (int64_t c0 = 0; c0 < n; c0 += AHEAD) {
            float m[AHEAD], l[AHEAD], pv[AHEAD];
#pragma unroll
            for (int u = 0; u < AHEAD; u++) {
                const int64_t c = c0 + u < n ? c0 + u : c0;
                m[u] = __ldcg(ml + (c * rows + row) * 2);
                l[u] = c0 + u < n ? __ldcg(ml + (c * rows + row) * 2 + 1) : 0.0f;
                pv[u] = __ldcg(part + (c * rows + row) * g.hd + d);
            }
            float bmax = mx;
#pragma unroll
            for (int u = 0; u < AHEAD; u++)
                if (l[u] > 0) bmax = fmaxf(bmax, m[u]); /* l 0: a split past the row's keys */
            if (bmax == -INFINITY) continue;
            const float corr = expf(mx - bmax);
            wsum *= corr, acc *= corr;
#pragma unroll
            for (int u = 0; u < AHEAD; u++) {
                if (l[u] <= 0) continue;
                const float w = l[u] * expf(m[u] - bmax);
                wsum += w;
                acc += w * pv[u];
            }
            mx = bmax;
        }
        stf(o + row * g.hd + d, wsum > 0 ? acc / wsum : 0.0f);
    }
}

/* Before the wait for the kernel ahead (rope_append, which appends this step's keys: each
 * segment's last nq) a block reads only what was complete before the step: the segment
 * table, the row table and the keys of earlier steps. The segment's keys are cut in
 * chunks of whole warp passes, at most g.n_split of them; a block past the last chunk
 * has nothing to do, and the row's splits that have keys merge among themselves. */
template <class T, int E, bool VEC>
__global__ void __launch_bounds__(PAGED_WARPS * 32)
    paged_attention_kernel(const T *q, const T *kp, const T *vp, T *o, float *part, float *ml, att_view vq,
                           paged_geom g, cu_index_fault *fault) {
    __shared__ float wm[PAGED_WARPS], wl[PAGED_WARPS], wacc[PAGED_WARPS][32 * E];
    const int64_t sid = blockIdx.z / g.n_split, split = blockIdx.z % g.n_split;
    const moe_att_seg sg = moe_att_seg_at(g.seg, g.n_seg, sid, g.Tq, 0);
    const int64_t group = g.H / g.Hkv, kvh = blockIdx.y, r = blockIdx.x;
    const int64_t stride = PAGED_WARPS * PAGED_KEYS;
    const int64_t chunk = ((sg.nk + g.n_split - 1) / g.n_split + stride - 1) / stride * stride; /* this segment's */
    const int64_t n_used = chunk > 0 ? (sg.nk + chunk - 1) / chunk : 1;                           /* splits with keys */
    if (r >= sg.nq * group || split >= n_used) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t qi = r / group, h = kvh * group + r % group, hd = g.hd;
    const int64_t klim = g.causal ? min(sg.nk, sg.nk - sg.nq + qi + 1) : sg.nk; /* keys this row sees */
    const int64_t kbeg = split * chunk, kstop = min(klim, kbeg + chunk), fresh = sg.nk - sg.nq;
    const int32_t *rows = g.rows + sg.k0;
    int64_t j0 = kbeg + warp * PAGED_KEYS;
    int32_t row = paged_row(rows, j0, kstop, g, fault);
    paged_keyset<T, E> ks;
    paged_fetch<T, E, VEC>(ks, kp, vp, row, j0, fresh, PAGED_EARLIER, kvh, g);
    cu_prior_done();
    paged_fetch<T, E, VEC>(ks, kp, vp, row, j0, fresh, PAGED_THIS_STEP, kvh, g);
    const T *qrow = q + (sg.q0 + qi) * vq.st + h * vq.sh;
    float qv[E];
#pragma unroll
    for (int e = 0; e < E; e++) qv[e] = lane * E + e < hd ? ldf(qrow + lane * E + e) : 0.0f;
    paged_state<E> st = {-INFINITY, 0, {}};
    for (;;) { /* the next keys' rows load while these keys are scored */
        const int32_t next = paged_row(rows, j0 + stride, kstop, g, fault);
        paged_scores<T, E>(st, qv, ks, g);
        if ((j0 += stride) >= kstop) break;
        paged_fetch<T, E, VEC>(ks, kp, vp, next, j0, fresh, PAGED_ALL, kvh, g);
    }
    if (lane == 0) wm[warp] = st.m, wl[warp] = st.l;
#pragma unroll
    for (int e = 0; e < E; e++) wacc[warp][lane * E + e] = st.acc[e];
    __syncthreads();
    float mx = -INFINITY, lsum = 0;
    for (int w = 0; w < PAGED_WARPS; w++) mx = fmaxf(mx, wm[w]);
    for (int w = 0; w < PAGED_WARPS; w++) lsum += wm[w] == -INFINITY ? 0.0f : wl[w] * expf(wm[w] - mx);
    const float inv = lsum > 0 ? 1.0f / lsum : 0.0f;
    const int64_t orow = (sg.q0 + qi) * g.H + h; /* of o [Tq, H, hd] */
    for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0;
        for (int w = 0; w < PAGED_WARPS; w++)
            if (wm[w] != -INFINITY) acc += wacc[w][d] * expf(wm[w] - mx);
        if (n_used == 1)
            stf(o + orow * hd + d, acc * inv);
        else
            part[(split * g.Tq * g.H + orow) * hd + d] = acc * inv;
    }
    if (n_used == 1) return;
    if (threadIdx.x == 0) {
        ml[(split * g.Tq * g.H + orow) * 2] = mx;
        ml[(split * g.Tq * g.H + orow) * 2 + 1] = lsum;
    }
    if (cu_last_block(g.tickets + (sid * gridDim.y + kvh) * gridDim.x + r, (unsigned)n_used))
        paged_merge_row(part, ml, o, g, orow, n_used); /* the last of the row's splits merges them */
}

/* Splits per segment: enough blocks for two waves over the SMs, at least PAGED_SPLIT_KEYS
 * keys each (one pass of a block's warps: a block's passes over the keys run one after
 * another, so a decode step's few rows over a short cache gain from splitting even
 * that); one split where the rows alone fill the waves or outnumber the tickets. */
#define PAGED_SPLIT_KEYS (PAGED_WARPS * PAGED_KEYS)
static int64_t paged_splits(int64_t blocks, int64_t max_k) {
    int64_t by_keys = (max_k + PAGED_SPLIT_KEYS - 1) / PAGED_SPLIT_KEYS, by_sms = (2 * (int64_t)moe_cu.sms + blocks - 1) / blocks;
    int64_t n = by_keys < by_sms ? by_keys : by_sms;
    return n < 1 || blocks > CU_TICKETS ? 1 : n;
}

/* VEC when the lanes cover the head exactly with naturally aligned pieces (hd = 32 E, a
 * power-of-two piece of at least 4 bytes, 16-byte aligned pools). */
template <class T, int E>
static void paged_launch(const moe_kernel_args *a, dim3 grid, float *part, float *ml, const paged_geom &g) {
    constexpr int BYTES = E * (int)sizeof(T);
    constexpr bool can_vec = BYTES == 4 || BYTES == 8 || BYTES % 16 == 0;
    const bool vec = can_vec && g.hd == 32 * E && (uintptr_t)a->in[1]->data % 16 == 0 &&
                     (uintptr_t)a->in[2]->data % 16 == 0;
    auto kernel = vec ? paged_attention_kernel<T, E, can_vec> : paged_attention_kernel<T, E, false>;
    cu_launch(kernel, grid, PAGED_WARPS * 32, 0, (const T *)a->in[0]->data, (const T *)a->in[1]->data,
              (const T *)a->in[2]->data, (T *)a->out->data, part, ml, att_view_of(a->in[0]), g, moe_cu.index_fault);
}

extern "C" moe_status moe_cuda_attention_paged(const moe_kernel_args *a) {
    const moe_attention_attrs *at = (const moe_attention_attrs *)a->attrs;
    const moe_tensor *q = a->in[0], *kp = a->in[1];
    if (q->strides[3] != 1 && q->shape[3] != 1)
        return moe_error(MOE_ERR_INVALID, "attention_paged: q needs a unit last stride");
    if (q->shape[3] > ATT_MAX_HD)
        return moe_error(MOE_ERR_UNSUPPORTED, "attention_paged: head dim %lld is larger than %d on cuda",
                         (long long)q->shape[3], ATT_MAX_HD);
    paged_geom g = {q->shape[1], q->shape[2], kp->shape[1], q->shape[3], kp->shape[0], at->causal, at->scale,
                    (const int32_t *)at->seg->data, (const int32_t *)a->in[3]->data, at->n_seg, 1, moe_cu.tickets};
    if (g.Tq == 0) return MOE_OK;
    const int64_t rows = at->max_q * (g.H / g.Hkv);
    g.n_split = paged_splits(rows * g.Hkv * g.n_seg, at->max_k);
    if (g.n_seg * g.n_split > 65535) g.n_split = 65535 / g.n_seg;
    if (g.n_split < 1 || g.Hkv > 65535 || rows > INT32_MAX)
        return moe_error(MOE_ERR_UNSUPPORTED, "attention_paged: %lld segments or %lld kv heads do not fit the cuda grid",
                         (long long)g.n_seg, (long long)g.Hkv);
    float *part = NULL, *ml = NULL;
    if (g.n_split > 1) {
        part = (float *)cu_scratch(sizeof(float) * (size_t)(g.n_split * g.Tq * g.H * g.hd));
        ml = (float *)cu_scratch(sizeof(float) * 2 * (size_t)(g.n_split * g.Tq * g.H));
        if (!part || !ml) return moe_last_status();
    }
    dim3 grid((unsigned)rows, (unsigned)g.Hkv, (unsigned)(g.n_seg * g.n_split));
    CU_FLOAT_DISPATCH(q->dtype, "attention_paged",
        if (g.hd <= 32) paged_launch<T, 1>(a, grid, part, ml, g);
        else if (g.hd <= 64) paged_launch<T, 2>(a, grid, part, ml, g);
        else if (g.hd <= 128) paged_launch<T, 4>(a, grid, part, ml, g);
        else paged_launch<T, 8>(a, grid, part, ml, g);
        CU_LAUNCHED("attention_paged");)
    return MOE_OK;
}

/* D[b, h, i] = g_i . o_i (f32), one warp per row. */
template <class T>
__global__ void att_rowdot_kernel(const T *gr, const T *o, float *D, att_view vg, att_view vo, att_geom g) {
    int64_t rows = g.B * g.H * g.Tq;
    int lane = threadIdx.x & 31;
    for (int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < rows;
         r += ((int64_t)gridDim.x * blockDim.x) >> 5) {
        int64_t i = r % g.Tq, h = (r / g.Tq) % g.H, b = r / (g.Tq * g.H);
        const T *pg = gr + b * vg.sb + i * vg.st + h * vg.sh, *po = o + b * vo.sb + i * vo.st + h * vo.sh;
        float s = 0;
        for (int64_t d = lane; d < g.hd; d += 32) s += ldf(pg + d) * ldf(po + d);
        s = cu_warp_sum(s);
        if (lane == 0) D[r] = s;
    }
}

/* dq: grid (query tiles, H, segments); per query row i, over its visible keys j:
 * p = exp(scale q.k - lse), ds = scale p (g.v - D), dq += ds k. */
template <class T>
__global__ void attention_dq_kernel(const T *q, const T *k, const T *v, const T *gr, const float *lse, const float *D,
                                    T *dq, att_view vq, att_view vk, att_view vv, att_view vg, att_geom g) {
    extern __shared__ float smem[];
    const moe_att_seg sg = att_seg(g);
    const int64_t Tq = sg.nq, Tk = sg.nk, shift = Tk - Tq;
    const int64_t q0 = (int64_t)blockIdx.x * ATT_ROWS;
    if (q0 >= Tq) return;
    const int64_t hd = g.hd, ld = hd + 1;
    float *Kt = smem, *Vt = Kt + ATT_TILE * ld, *Qr = Vt + ATT_TILE * ld, *Gr = Qr + ATT_ROWS * hd;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t b = sg.b, h = blockIdx.y, kvh = h / (g.H / g.Hkv), qi = q0 + warp;
    const T *kh = att_at(k, vk, b, sg.k0, kvh), *vh = att_at(v, vv, b, sg.k0, kvh);
    const int64_t r = (b * g.H + h) * g.Tq + sg.q0 + qi; /* the row of lse and D */
    const bool live = qi < Tq;
    float *qrow = Qr + warp * hd, *grow = Gr + warp * hd;
    float lse_i = 0, D_i = 0;
    if (live) {
        att_load_row(qrow, att_at(q, vq, b, sg.q0 + qi, h), hd);
        att_load_row(grow, att_at(gr, vg, b, sg.q0 + qi, h), hd);
        lse_i = lse[r];
        D_i = D[r];
    }
    const int64_t qlast = min(q0 + ATT_ROWS, Tq) - 1;
    const int64_t kend = g.causal ? min(Tk, shift + qlast + 1) : Tk;
    const int64_t klim = g.causal ? shift + qi + 1 : Tk;
    float acc[ATT_E];
#pragma unroll
    for (int e = 0; e < ATT_E; e++) acc[e] = 0;
    for (int64_t k0 = 0; k0 < kend; k0 += ATT_TILE) {
        __syncthreads();
        att_load_tile(Kt, kh, vk, k0, Tk, hd);
        att_load_tile(Vt, vh, vv, k0, Tk, hd);
        __syncthreads();
        if (!live) continue;
        const int64_t j = k0 + lane;
        float ds = 0;
        if (j < Tk && j < klim) {
            float p = expf(g.scale * att_dot(qrow, Kt + lane * ld, hd) - lse_i);
            ds = g.scale * p * (att_dot(grow, Vt + lane * ld, hd) - D_i);
        }
        for (int jj = 0; jj < ATT_TILE; jj++) {
            float dj = __shfl_sync(0xffffffffu, ds, jj);
            const float *kr = Kt + jj * ld;
#pragma unroll
            for (int e = 0; e < ATT_E; e++)
                if (lane + 32 * e < hd) acc[e] += dj * kr[lane + 32 * e];
        }
    }
    if (!live) return;
    T *out = dq + ((b * g.Tq + sg.q0 + qi) * g.H + h) * hd;
#pragma unroll
    for (int e = 0; e < ATT_E; e++)
        if (lane + 32 * e < hd) stf(out + lane + 32 * e, acc[e]);
}

/* dk, dv: grid (key tiles, Hkv, segments); per key row j, over the query heads of its
 * group and the queries that see it: dv += p g_i, dk += ds q_i. */
template <class T>
__global__ void attention_dkv_kernel(const T *q, const T *k, const T *v, const T *gr, const float *lse, const float *D,
                                     T *dk, T *dv, att_view vq, att_view vk, att_view vv, att_view vg, att_geom g) {
    extern __shared__ float smem[];
    const moe_att_seg sg = att_seg(g);
    const int64_t Tq = sg.nq, Tk = sg.nk, shift = Tk - Tq;
    const int64_t j0 = (int64_t)blockIdx.x * ATT_ROWS;
    if (j0 >= Tk) return;
    const int64_t hd = g.hd, ld = hd + 1;
    float *Qt = smem, *Gt = Qt + ATT_TILE * ld, *Kr = Gt + ATT_TILE * ld, *Vr = Kr + ATT_ROWS * hd;
    __shared__ float s_lse[ATT_TILE], s_D[ATT_TILE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t b = sg.b, kvh = blockIdx.y, group = g.H / g.Hkv, kj = j0 + warp;
    const bool live = kj < Tk;
    float *krow = Kr + warp * hd, *vrow = Vr + warp * hd;
    if (live) {
        att_load_row(krow, att_at(k, vk, b, sg.k0 + kj, kvh), hd);
        att_load_row(vrow, att_at(v, vv, b, sg.k0 + kj, kvh), hd);
    }
    /* causal: query i sees key j iff j <= shift + i, i.e. i >= j - shift */
    const int64_t qstart = g.causal ? max((int64_t)0, j0 - shift) : 0;
    const int64_t qfirst = g.causal ? kj - shift : 0; /* first query this key row meets */
    float adk[ATT_E], adv[ATT_E];
#pragma unroll
    for (int e = 0; e < ATT_E; e++) adk[e] = adv[e] = 0;
    for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
        const float *lse_h = lse + (b * g.H + h) * g.Tq + sg.q0, *D_h = D + (b * g.H + h) * g.Tq + sg.q0;
        for (int64_t i0 = qstart - qstart % ATT_TILE; i0 < Tq; i0 += ATT_TILE) {
            __syncthreads();
            att_load_tile(Qt, att_at(q, vq, b, sg.q0, h), vq, i0, Tq, hd);
            att_load_tile(Gt, att_at(gr, vg, b, sg.q0, h), vg, i0, Tq, hd);
            if (threadIdx.x < ATT_TILE) {
                int64_t i = i0 + threadIdx.x;
                s_lse[threadIdx.x] = i < Tq ? lse_h[i] : 0.0f;
                s_D[threadIdx.x] = i < Tq ? D_h[i] : 0.0f;
            }
            __syncthreads();
            if (!live) continue;
            const int64_t i = i0 + lane;
            float p = 0, ds = 0;
            if (i < Tq && i >= qfirst) {
                p = expf(g.scale * att_dot(Qt + lane * ld, krow, hd) - s_lse[lane]);
                ds = g.scale * p * (att_dot(Gt + lane * ld, vrow, hd) - s_D[lane]);
            }
            for (int ii = 0; ii < ATT_TILE; ii++) {
                float pi = __shfl_sync(0xffffffffu, p, ii), di = __shfl_sync(0xffffffffu, ds, ii);
                const float *qr = Qt + ii * ld, *gg = Gt + ii * ld;
#pragma unroll
                for (int e = 0; e < ATT_E; e++) {
                    if (lane + 32 * e < hd) {
                        adv[e] += pi * gg[lane + 32 * e];
                        adk[e] += di * qr[lane + 32 * e];
                    }
                }
            }
        }
    }
    if (!live) return;
    T *pk = dk + ((b * g.Tk + sg.k0 + kj) * g.Hkv + kvh) * hd, *pv = dv + ((b * g.Tk + sg.k0 + kj) * g.Hkv + kvh) * hd;
#pragma unroll
    for (int e = 0; e < ATT_E; e++) {
        if (lane + 32 * e < hd) {
            stf(pk + lane + 32 * e, adk[e]);
            stf(pv + lane + 32 * e, adv[e]);
        }
    }
}

extern "C" moe_status moe_cuda_attention_bwd(const moe_kernel_args *a) {
    const moe_attention_attrs *at = (const moe_attention_attrs *)a->attrs;
    const moe_tensor *q = a->in[0], *k = a->in[1], *v = a->in[2], *o = a->in[3], *gr = a->in[4], *lse = a->in[5];
    moe_tensor *dq = a->out, *dk = at->dk, *dv = at->dv;
    MOE_TRY(att_check(q, k, v, at, "attention_bwd"));
    const moe_tensor *og[2] = {o, gr};
    for (int i = 0; i < 2; i++)
        if (og[i]->strides[3] != 1 && og[i]->shape[3] != 1)
            return moe_error(MOE_ERR_INVALID, "attention_bwd: %s needs a unit last stride", i ? "grad" : "output");
    if (lse->dtype != MOE_F32) return moe_error(MOE_ERR_UNSUPPORTED, "attention_bwd: lse must be f32 on cuda");
    if (!moe_tensor_is_contiguous(dq) || !moe_tensor_is_contiguous(dk) || !moe_tensor_is_contiguous(dv))
        return moe_error(MOE_ERR_INVALID, "attention_bwd: dq, dk and dv must be contiguous");
    att_geom g = att_geom_of(q, k, at);
    if (g.B * g.H * g.hd == 0) return MOE_OK;
    float *D = (float *)cu_scratch(sizeof(float) * (size_t)(g.B * g.H * (g.Tq ? g.Tq : 1)));
    if (!D) return moe_last_status();
    size_t smem = sizeof(float) * (size_t)(2 * ATT_TILE * (g.hd + 1) + 2 * ATT_ROWS * g.hd);
    dim3 gq((unsigned)((g.max_q + ATT_ROWS - 1) / ATT_ROWS), (unsigned)g.H, (unsigned)g.n_seg);
    dim3 gk((unsigned)((g.max_k + ATT_ROWS - 1) / ATT_ROWS), (unsigned)g.Hkv, (unsigned)g.n_seg);
    att_view vq = att_view_of(q), vk = att_view_of(k), vv = att_view_of(v), vo = att_view_of(o), vg = att_view_of(gr);
    const moe_tensor *tcs[7] = {q, k, v, gr, dq, dk, dv};
    const bool tc = att_tc_fits(tcs, 7);
    CU_FLOAT_DISPATCH(q->dtype, "attention_bwd",
        const T *pq = (const T *)q->data, *pk = (const T *)k->data, *pv = (const T *)v->data;
        const T *pg = (const T *)gr->data;
        const float *pl = (const float *)lse->data;
        if (g.Tq > 0) {
            att_rowdot_kernel<T><<<cu_blocks(g.B * g.H * g.Tq * 32), CU_THREADS, 0, moe_cu.stream>>>(
                pg, (const T *)o->data, D, vg, vo, g);
            CU_LAUNCHED("attention_bwd (row dots)");
        }
        if (tc) return att_tc_backward(a, D);
        if (g.Tq > 0) {
            MOE_TRY(cu_allow_smem(attention_dq_kernel<T>, smem, "attention_bwd"));
            attention_dq_kernel<T><<<gq, ATT_ROWS * 32, smem, moe_cu.stream>>>(pq, pk, pv, pg, pl, D, (T *)dq->data, vq,
                                                                             vk, vv, vg, g);
            CU_LAUNCHED("attention_bwd (dq)");
        }
        if (g.Tk > 0) {
            MOE_TRY(cu_allow_smem(attention_dkv_kernel<T>, smem, "attention_bwd"));
            attention_dkv_kernel<T><<<gk, ATT_ROWS * 32, smem, moe_cu.stream>>>(
                pq, pk, pv, pg, pl, D, (T *)dk->data, (T *)dv->data, vq, vk, vv, vg, g);
            CU_LAUNCHED("attention_bwd (dk, dv)");
        })
    return MOE_OK;
}

/* ---- cut cross-entropy ---- */

/* Logits of vocabulary rows [v0, v0 + nb): S [T, nb] f32 = h @ w[v0:v0+nb]^T. */
static moe_status ce_block_logits(const moe_tensor *h, const moe_tensor *w, float *scratch, int64_t v0, int64_t nb,
                                  moe_tensor *S) {
    *S = *h;
    S->dtype = MOE_F32;
    S->shape[1] = nb;
    S->strides[0] = nb;
    S->strides[1] = 1;
    S->data = scratch;
    moe_tensor wt = *w; /* [d, nb] view of the block's rows, transposed */
    wt.shape[0] = w->shape[1];
    wt.shape[1] = nb;
    wt.strides[0] = w->strides[1];
    wt.strides[1] = w->strides[0];
    wt.data = (char *)w->data + v0 * w->strides[0] * (int64_t)moe_dtype_size(w->dtype);
    return moe_cuda_gemm(h, &wt, S, false, false, 1.0f, 0.0f);
}

/* Running max m and sum s per row (kept in the outputs), and the target's logit. */
__global__ void ce_update_kernel(const float *S, const int32_t *tg, float *m, float *s, float *tl, int64_t Tn,
                                 int64_t nb, int64_t v0) {
    __shared__ float sh[32];
    for (int64_t t = blockIdx.x; t < Tn; t += gridDim.x) {
        const float *row = S + t * nb;
        float mx = -INFINITY;
        for (int64_t j = threadIdx.x; j < nb; j += blockDim.x) mx = fmaxf(mx, row[j]);
        mx = fmaxf(cu_block_max(mx, sh), m[t]);
        float sum = 0;
        for (int64_t j = threadIdx.x; j < nb; j += blockDim.x) sum += expf(row[j] - mx);
        sum = cu_block_sum(sum, sh);
        if (threadIdx.x == 0) {
            s[t] = s[t] * expf(m[t] - mx) + sum;
            m[t] = mx;
            int64_t y = tg[t];
            if (y >= v0 && y < v0 + nb) tl[t] = row[y - v0];
        }
    }
}

__global__ void ce_init_kernel(float *m, float *s, float *tl, int64_t Tn) {
    CU_GRID_LOOP(t, Tn) {
        m[t] = -INFINITY;
        s[t] = 0;
        tl[t] = 0;
    }
}

__global__ void ce_final_kernel(float *loss, float *lse, const float *tl, const int32_t *tg, int64_t Tn) {
    CU_GRID_LOOP(t, Tn) {
        float l = lse[t] + logf(loss[t]); /* lse holds m, loss holds s until here */
        lse[t] = l;
        loss[t] = tg[t] == -1 ? 0.0f : l - tl[t];
    }
}

static int64_t ce_block(const moe_ce_attrs *at, int64_t V) { return at->block < V ? at->block : V; }

extern "C" moe_status moe_cuda_cross_entropy(const moe_kernel_args *a) {
    const moe_ce_attrs *at = (const moe_ce_attrs *)a->attrs;
    const moe_tensor *h = a->in[0], *w = a->in[1];
    const int32_t *tg = (const int32_t *)a->in[2]->data;
    const int64_t Tn = h->shape[0], V = w->shape[0], blk = ce_block(at, V);
    if (a->out->dtype != MOE_F32 || a->out2->dtype != MOE_F32)
        return moe_error(MOE_ERR_UNSUPPORTED, "cross_entropy: loss and lse must be f32 on cuda");
    if (Tn == 0) return MOE_OK;
    float *scratch = (float *)cu_scratch(sizeof(float) * (size_t)(Tn * blk + Tn));
    if (!scratch) return moe_last_status();
    float *tl = scratch + Tn * blk, *loss = (float *)a->out->data, *lse = (float *)a->out2->data;
    ce_init_kernel<<<cu_blocks(Tn), CU_THREADS, 0, moe_cu.stream>>>(lse, loss, tl, Tn);
    CU_LAUNCHED("cross_entropy (init)");
    int th = cu_row_threads(blk) > 256 ? 256 : cu_row_threads(blk);
    for (int64_t v0 = 0; v0 < V; v0 += blk) {
        const int64_t nb = V - v0 < blk ? V - v0 : blk;
        moe_tensor S;
        MOE_TRY(ce_block_logits(h, w, scratch, v0, nb, &S));
        ce_update_kernel<<<cu_blocks(Tn * th, th), th, 0, moe_cu.stream>>>(scratch, tg, lse, loss, tl, Tn, nb, v0);
        CU_LAUNCHED("cross_entropy (block update)");
    }
    ce_final_kernel<<<cu_blocks(Tn), CU_THREADS, 0, moe_cu.stream>>>(loss, lse, tl, tg, Tn);
    CU_LAUNCHED("cross_entropy (final)");
    return MOE_OK;
}

/* G = c * (softmax - onehot(target)), zero rows for ignored targets; c = g * inv_count
 * read on the device (no sync). G is written in the dtype T of the backward GEMMs. */
template <class T>
__global__ void ce_grad_kernel(const float *S, T *G, const int32_t *tg, const float *lse, const float *gscal,
                               float inv_count, int64_t Tn, int64_t nb, int64_t v0) {
    const float c = gscal[0] * inv_count;
    CU_GRID_LOOP(i, Tn * nb) {
        int64_t t = i / nb, j = i - t * nb;
        int32_t y = tg[t];
        float val = y == -1 ? 0.0f : c * expf(S[i] - lse[t]) - (y == v0 + j ? c : 0.0f);
        stf(G + i, val);
    }
}

extern "C" moe_status moe_cuda_cross_entropy_bwd(const moe_kernel_args *a) {
    const moe_ce_attrs *at = (const moe_ce_attrs *)a->attrs;
    const moe_tensor *h = a->in[0], *w = a->in[1], *lse = a->in[3], *gl = a->in[4];
    const int32_t *tg = (const int32_t *)a->in[2]->data;
    moe_tensor *dh = a->out, *dw = a->out2;
    const int64_t Tn = h->shape[0], V = w->shape[0], d = h->shape[1], blk = ce_block(at, V);
    if (lse->dtype != MOE_F32 || gl->dtype != MOE_F32)
        return moe_error(MOE_ERR_UNSUPPORTED, "cross_entropy_bwd: lse and the loss grad must be f32 on cuda");
    if ((dh && !moe_tensor_is_contiguous(dh)) || (dw && !moe_tensor_is_contiguous(dw)))
        return moe_error(MOE_ERR_INVALID, "cross_entropy_bwd: dh and dw must be contiguous");
    if (!dh && !dw) return MOE_OK;
    moe_dtype dt = h->dtype;
    if (dt != MOE_F32 && dt != MOE_BF16)
        return moe_error(MOE_ERR_UNSUPPORTED, "cross_entropy_bwd: dtype %s is not supported on cuda (f32, bf16)",
                         moe_dtype_name(dt));
    if (Tn == 0) { /* no rows: dw is zero, dh empty */
        if (dw) CU_TRY(cudaMemsetAsync(dw->data, 0, (size_t)(V * d) * moe_dtype_size(dt), moe_cu.stream),
                       "cross_entropy_bwd: zeroing dw");
        return MOE_OK;
    }
    size_t es = moe_dtype_size(dt);
    float *S = (float *)cu_scratch(sizeof(float) * (size_t)(Tn * blk));
    /* G in the GEMM dtype (a separate buffer for bf16); dh accumulates in f32 for bf16 */
    void *G = dt == MOE_F32 ? (void *)S : cu_scratch(es * (size_t)(Tn * blk));
    moe_tensor *dh_acc = dh && dt != MOE_F32 ? moe_tensor_empty(MOE_LIFE_STEP, MOE_CUDA, MOE_F32, 2, dh->shape) : dh;
    if (!S || !G || (dh && !dh_acc)) return moe_last_status();
    for (int64_t v0 = 0; v0 < V; v0 += blk) {
        const int64_t nb = V - v0 < blk ? V - v0 : blk;
        moe_tensor Sv;
        MOE_TRY(ce_block_logits(h, w, S, v0, nb, &Sv));
        CU_FLOAT_DISPATCH(dt, "cross_entropy_bwd",
            ce_grad_kernel<T><<<cu_blocks(Tn * nb), CU_THREADS, 0, moe_cu.stream>>>(
                S, (T *)G, tg, (const float *)lse->data, (const float *)gl->data, at->inv_count, Tn, nb, v0);)
        CU_LAUNCHED("cross_entropy_bwd (softmax grad)");
        moe_tensor Gv = *h; /* [T, nb] in dt */
        Gv.shape[1] = nb;
        Gv.strides[0] = nb;
        Gv.strides[1] = 1;
        Gv.data = G;
        if (dh) { /* dh (+)= G @ w[v0:v0+nb] */
            moe_tensor wb = *w;
            wb.shape[0] = nb;
            wb.data = (char *)w->data + v0 * w->strides[0] * (int64_t)es;
            MOE_TRY(moe_cuda_gemm(&Gv, &wb, dh_acc, false, false, 1.0f, v0 ? 1.0f : 0.0f));
        }
        if (dw) { /* dw[v0:v0+nb] = G^T @ h */
            moe_tensor dwb = *dw;
            dwb.shape[0] = nb;
            dwb.data = (char *)dw->data + v0 * d * (int64_t)es;
            MOE_TRY(moe_cuda_gemm(&Gv, h, &dwb, true, false, 1.0f, 0.0f));
        }
    }
    if (dh && dh_acc != dh) {
        moe_kernel_args args = {};
        args.out = dh;
        args.in[0] = dh_acc;
        MOE_TRY(moe_cuda_copy(&args));
    }
    return MOE_OK;
}
