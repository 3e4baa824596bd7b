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

/* ---- rotary embedding: a [T, hd/2] cos/sin table (angles in double, at positions in[1][t]
 * or pos0 + t), then the rotation ---- */
__global__ void rope_table_kernel(float *cs, float *sn, int64_t Tn, int64_t half, int64_t hd, moe_rope_attrs at,
                                  const int32_t *pos) {
    CU_GRID_LOOP(i, Tn * half) {
        int64_t t = i / half, p = i % half;
        double ang = (double)(pos ? pos[t] : at.pos0 + t) * pow(at.theta, -2.0 * (double)p / (double)hd);
        cs[i] = (float)cos(ang);
        sn[i] = (float)(at.inverse ? -sin(ang) : sin(ang));
    }
}

struct rope_geom {
    int64_t B, Tn, H, half, s[4];
};

template <class T> __global__ void rope_kernel(const T *x, T *y, const float *cs, const float *sn, rope_geom g) {
    CU_GRID_LOOP(i, g.B * g.Tn * g.H * g.half) {
        int64_t p = i % g.half, r = i / g.half, h = r % g.H, t = (r / g.H) % g.Tn, b = r / (g.H * g.Tn);
        const T *xr = x + b * g.s[0] + t * g.s[1] + h * g.s[2];
        T *yr = y + r * 2 * g.half;
        float c = cs[t * g.half + p], s = sn[t * g.half + p];
        float x1 = ldf(xr + p * g.s[3]), x2 = ldf(xr + (p + g.half) * g.s[3]);
        stf(yr + p, x1 * c - x2 * s);
        stf(yr + p + g.half, x2 * c + x1 * s);
    }
}

extern "C" moe_status moe_cuda_rope(const moe_kernel_args *a) {
    const moe_rope_attrs at = *(const moe_rope_attrs *)a->attrs;
    const moe_tensor *x = a->in[0];
    rope_geom g = {x->shape[0], x->shape[1], x->shape[2], x->shape[3] / 2,
                   {x->strides[0], x->strides[1], x->strides[2], x->strides[3]}};
    int64_t n = g.B * g.Tn * g.H * g.half;
    if (n == 0) return MOE_OK;
    float *cs = (float *)cu_scratch(sizeof(float) * 2 * (size_t)(g.Tn * g.half));
    if (!cs) return moe_last_status();
    float *sn = cs + g.Tn * g.half;
    rope_table_kernel<<<cu_blocks(g.Tn * g.half), CU_THREADS, 0, moe_cu.stream>>>(cs, sn, g.Tn, g.half, x->shape[3], at,
                                                                              a->in[1] ? (const int32_t *)a->in[1]->data
                                                                                       : NULL);
    CU_LAUNCHED("rope (table)");
    CU_FLOAT_DISPATCH(x->dtype, "rope",
        rope_kernel<T><<<cu_blocks(n), CU_THREADS, 0, moe_cu.stream>>>((const T *)x->data, (T *)a->out->data, cs, sn,
                                                                     g);)
    CU_LAUNCHED("rope");
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
 * [R, Hkv, hd] through rows, and a segment's key run is split over n_split blocks (the
 * flash-decoding split: at batch 1 there are only Hkv (segment, kv head) pairs, too few
 * blocks to stream a long cache at the device's rate). Grid (row tiles of ATT_ROWS, Hkv,
 * n_seg * n_split): a block's warps own rows r = query * group + head-in-group of its kv
 * head and walk the split's keys in tiles of ATT_TILE with an online softmax. With one
 * split the rows are written normalised; else each split writes its normalised part and
 * (max, sum) and paged_merge_kernel combines them: o = sum_c w_c o_c / sum_c w_c,
 * w_c = l_c exp(m_c - max_c m_c). */
struct paged_geom {
    int64_t Tq, H, Hkv, hd, R;
    bool causal;
    float scale;
    const int32_t *seg, *rows;
    int64_t n_seg, n_split, chunk; /* keys per split (a multiple of ATT_TILE) */
    bool vec;                      /* rows load 8 values at a time (cu_ld8) */
};

/* Keys [j0, j0 + ATT_TILE) of a segment (rows from its first key) for kv head kvh into
 * tile[ATT_TILE][hd + 1] f32, zeros past `end`; a row outside the pools is reported (and
 * read as zeros). Each thread moves 8 values of a row at a time (cu_ld8: hd a multiple of
 * 8, the pools 16-byte aligned), else single elements. */
template <class T>
__device__ void paged_load_tile(float *tile, const T *pool, const int32_t *rows, int64_t j0, int64_t end,
                                int64_t kvh, const paged_geom &g, cu_index_fault *fault) {
    const int hd = (int)g.hd, ld = hd + 1, step = g.vec ? 8 : 1, per_row = hd / step;
    for (int i = threadIdx.x; i < ATT_TILE * per_row; i += blockDim.x) {
        const int r = i / per_row, d = (i - r * per_row) * step;
        float *dst = tile + r * ld + d;
        int32_t row = j0 + r < end ? rows[j0 + r] : -1;
        bool ok = row >= 0 && row < g.R;
        if (j0 + r < end && !ok && d == 0) cu_index_ok(fault, CU_IDX_ATTENTION_PAGED, row, j0 + r, g.R);
        const T *src = pool + ((int64_t)row * g.Hkv + kvh) * hd + d;
        if (!g.vec) {
            *dst = ok ? ldf(src) : 0.0f;
        } else if (ok) {
            cu_ld8(src, dst);
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++) dst[e] = 0.0f;
        }
    }
}

template <class T>
__global__ void paged_attention_kernel(const T *q, const T *kp, const T *vp, T *o, float *part, float *ml, att_view vq,
                                       paged_geom g, cu_index_fault *fault) {
    extern __shared__ float smem[];
    const int64_t sid = blockIdx.z / g.n_split, split = blockIdx.z % g.n_split;
    const moe_att_seg sg = moe_att_seg_at(g.seg, g.n_seg, sid, g.Tq, 0);
    const int64_t group = g.H / g.Hkv, kvh = blockIdx.y, r0 = (int64_t)blockIdx.x * ATT_ROWS;
    if (r0 >= sg.nq * group) return;
    const int64_t hd = g.hd, ld = hd + 1, shift = sg.nk - sg.nq;
    float *Kt = smem, *Vt = Kt + ATT_TILE * ld, *Qr = Vt + ATT_TILE * ld;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t r = r0 + warp, qi = r / group, h = kvh * group + r % group;
    const bool live = r < sg.nq * group;
    float *qrow = Qr + warp * hd;
    if (live) att_load_row(qrow, q + (sg.q0 + qi) * vq.st + h * vq.sh, hd);
    const int64_t rlast = min(r0 + ATT_ROWS, sg.nq * group) - 1;
    const int64_t kend = g.causal ? min(sg.nk, shift + rlast / group + 1) : sg.nk; /* keys the block needs */
    const int64_t klim = g.causal ? shift + qi + 1 : sg.nk;                      /* keys this row sees */
    const int64_t kbeg = split * g.chunk, kstop = min(kend, kbeg + g.chunk);
    const int32_t *rows = g.rows + sg.k0;
    float m = -INFINITY, l = 0, acc[ATT_E];
#pragma unroll
    for (int e = 0; e < ATT_E; e++) acc[e] = 0;
    for (int64_t k0 = kbeg; k0 < kstop; k0 += ATT_TILE) {
        __syncthreads(); /* the previous tile is consumed; the q rows are written */
        paged_load_tile(Kt, kp, rows, k0, kstop, kvh, g, fault);
        paged_load_tile(Vt, vp, rows, k0, kstop, kvh, g, fault);
        __syncthreads();
        if (!live) continue;
        const int64_t j = k0 + lane;
        float s = (j < kstop && j < klim) ? g.scale * att_dot(qrow, Kt + lane * ld, hd) : -INFINITY;
        att_tile_update(s, Vt, ld, hd, lane, m, l, acc);
    }
    if (!live) return;
    const int64_t row = (sg.q0 + qi) * g.H + h; /* of o [Tq, H, hd] */
    const float inv = l > 0 ? 1.0f / l : 0.0f;
    if (g.n_split == 1) {
#pragma unroll
        for (int e = 0; e < ATT_E; e++)
            if (lane + 32 * e < hd) stf(o + row * hd + lane + 32 * e, acc[e] * inv);
        return;
    }
    float *pr = part + (split * g.Tq * g.H + row) * hd;
#pragma unroll
    for (int e = 0; e < ATT_E; e++)
        if (lane + 32 * e < hd) pr[lane + 32 * e] = acc[e] * inv;
    if (lane == 0) {
        ml[(split * g.Tq * g.H + row) * 2] = m;
        ml[(split * g.Tq * g.H + row) * 2 + 1] = l;
    }
}

/* One warp per (query, head) row of o [Tq, H, hd]: the splits' parts combined. */
template <class T> __global__ void paged_merge_kernel(const float *part, const float *ml, T *o, paged_geom g) {
    const int64_t rows = g.Tq * g.H;
    const int lane = threadIdx.x & 31;
    const int64_t row = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= rows) return;
    float mx = -INFINITY;
    for (int64_t c = 0; c < g.n_split; c++)
        if (ml[(c * rows + row) * 2 + 1] > 0) mx = fmaxf(mx, ml[(c * rows + row) * 2]);
    float wsum = 0, acc[ATT_E];
#pragma unroll
    for (int e = 0; e < ATT_E; e++) acc[e] = 0;
    for (int64_t c = 0; c < g.n_split; c++) {
        const float lc = ml[(c * rows + row) * 2 + 1];
        if (lc <= 0) continue; /* a split past the row's keys */
        const float w = lc * expf(ml[(c * rows + row) * 2] - mx);
        wsum += w;
        const float *pr = part + (c * rows + row) * g.hd;
#pragma unroll
        for (int e = 0; e < ATT_E; e++)
            if (lane + 32 * e < g.hd) acc[e] += w * pr[lane + 32 * e];
    }
#pragma unroll
    for (int e = 0; e < ATT_E; e++)
        if (lane + 32 * e < g.hd) stf(o + row * g.hd + lane + 32 * e, acc[e] / wsum);
}

/* Splits per segment: enough blocks for two waves over the SMs, at least 256 keys each
 * (shorter runs are cheaper in one block than with the merge's launch). */
static int64_t paged_splits(int64_t blocks, int64_t max_k) {
    int64_t by_keys = (max_k + 255) / 256, by_sms = (2 * (int64_t)moe_cu.sms + blocks - 1) / blocks;
    int64_t n = by_keys < by_sms ? by_keys : by_sms;
    return n < 1 ? 1 : n;
}

extern "C" moe_status moe_cuda_attention_paged(const moe_kernel_args *a) {
    const moe_attention_attrs *at = (const moe_attention_attrs *)a->attrs;
    const moe_tensor *q = a->in[0], *kp = a->in[1], *vp = a->in[2];
    if (q->strides[3] != 1 && q->shape[3] != 1)
        return moe_error(MOE_ERR_INVALID, "attention_paged: q needs a unit last stride");
    if (q->shape[3] > ATT_MAX_HD)
        return moe_error(MOE_ERR_UNSUPPORTED, "attention_paged: head dim %lld is larger than %d on cuda",
                         (long long)q->shape[3], ATT_MAX_HD);
    paged_geom g = {q->shape[1], q->shape[2], kp->shape[1], q->shape[3], kp->shape[0], at->causal, at->scale,
                    (const int32_t *)at->seg->data, (const int32_t *)a->in[3]->data, at->n_seg, 1, 0, false};
    g.vec = g.hd % 8 == 0 && (uintptr_t)kp->data % 16 == 0 && (uintptr_t)vp->data % 16 == 0;
    if (g.Tq == 0) return MOE_OK;
    const int64_t tiles = (at->max_q * (g.H / g.Hkv) + ATT_ROWS - 1) / ATT_ROWS;
    g.n_split = paged_splits(tiles * g.Hkv * g.n_seg, at->max_k);
    if (g.n_seg * g.n_split > 65535) g.n_split = 65535 / g.n_seg;
    if (g.n_split < 1 || g.Hkv > 65535 || tiles > INT32_MAX)
        return moe_error(MOE_ERR_UNSUPPORTED, "attention_paged: %lld segments or %lld kv heads do not fit the cuda grid",
                         (long long)g.n_seg, (long long)g.Hkv);
    g.chunk = ((at->max_k + g.n_split - 1) / g.n_split + ATT_TILE - 1) / ATT_TILE * ATT_TILE;
    float *part = NULL, *ml = NULL;
    if (g.n_split > 1) {
        part = (float *)cu_scratch(sizeof(float) * (size_t)(g.n_split * g.Tq * g.H * g.hd));
        ml = (float *)cu_scratch(sizeof(float) * 2 * (size_t)(g.n_split * g.Tq * g.H));
        if (!part || !ml) return moe_last_status();
    }
    size_t smem = sizeof(float) * (size_t)(2 * ATT_TILE * (g.hd + 1) + ATT_ROWS * g.hd);
    dim3 grid((unsigned)tiles, (unsigned)g.Hkv, (unsigned)(g.n_seg * g.n_split));
    CU_FLOAT_DISPATCH(q->dtype, "attention_paged",
        MOE_TRY(cu_allow_smem(paged_attention_kernel<T>, smem, "attention_paged"));
        paged_attention_kernel<T><<<grid, ATT_ROWS * 32, smem, moe_cu.stream>>>(
            (const T *)q->data, (const T *)kp->data, (const T *)vp->data, (T *)a->out->data, part, ml, att_view_of(q), g,
            moe_cu.index_fault);
        CU_LAUNCHED("attention_paged");
        if (g.n_split > 1) {
            paged_merge_kernel<T><<<cu_blocks(g.Tq * g.H * 32), CU_THREADS, 0, moe_cu.stream>>>(part, ml, (T *)a->out->data,
                                                                                              g);
            CU_LAUNCHED("attention_paged (merge)");
        })
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
