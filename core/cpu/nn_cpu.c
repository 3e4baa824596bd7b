/* CPU kernels of the neural-network ops: dropout, rotary embedding, flash-style
 * attention (forward and backward, never a [Tq, Tk] score matrix) and blockwise "cut"
 * cross-entropy (forward and backward, never a [T, V] logit matrix).
 *
 * These kernels are the specification the CUDA port follows; each comment states the
 * argument convention and the layout the front-end (core/ops_nn.c) guarantees. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "core/cpu/cpu_common.h"
#include "core/cpu/fast_math.h"
#include "core/ops.h"
#include "core/philox.h"

/* ---- contiguous vector helpers, one per float type, picked by the element type ---- */

#define nn_exp_f32 cpu_expf
#define nn_exp_f64 cpu_expd

#define NN_VEC_DEFS(TT, SUF)                                                                   \
    static inline TT nn_dot_##SUF(const TT *x, const TT *y, int64_t n) {                       \
        TT acc = 0;                                                                            \
        _Pragma("omp simd reduction(+ : acc)") for (int64_t i = 0; i < n; i++) acc += x[i] * y[i]; \
        return acc;                                                                            \
    }                                                                                          \
    static inline void nn_scale_##SUF(TT *y, TT alpha, int64_t n) {                            \
        _Pragma("omp simd") for (int64_t i = 0; i < n; i++) y[i] *= alpha;                     \
    }                                                                                          \
    static inline TT nn_max_##SUF(const TT *x, TT init, int64_t n) {                           \
        TT mx = init;                                                                          \
        _Pragma("omp simd reduction(max : mx)") for (int64_t i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx; \
        return mx;                                                                             \
    }                                                                                          \
    /* s[j] = exp(s[j] - shift) for j < n; returns the sum. */                                 \
    static inline TT nn_exp_shift_##SUF(TT *s, TT shift, int64_t n) {                          \
        TT sum = 0;                                                                            \
        _Pragma("omp simd reduction(+ : sum)") for (int64_t j = 0; j < n; j++) {               \
            s[j] = nn_exp_##SUF(s[j] - shift);                                                 \
            sum += s[j];                                                                       \
        }                                                                                      \
        return sum;                                                                            \
    }
NN_VEC_DEFS(float, f32)
NN_VEC_DEFS(double, f64)
#define NN_PICK(p, f) _Generic((p)[0] + 0, float: f##_f32, double: f##_f64)
#define nn_dot(x, y, n) NN_PICK(x, nn_dot)(x, y, n)
#define nn_scale(y, alpha, n) NN_PICK(y, nn_scale)(y, alpha, n)
#define nn_max(x, init, n) NN_PICK(x, nn_max)(x, init, n)
#define nn_exp_shift(s, shift, n) NN_PICK(s, nn_exp_shift)(s, shift, n)

static inline int64_t nn_min(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---- dropout ----
 * DROPOUT: in[0] = x, out = y, both contiguous with the same shape; attrs
 * moe_dropout_attrs {p, seed, counter}, 0 <= p < 1. Element i (row-major index) is kept
 * iff moe_philox_uniform(counter + i, seed) >= p; y[i] = kept ? x[i] * (T)(1 / (1 - p)) : 0.
 * The backward runs this same kernel on the output grad (same attrs, same mask). */
moe_status moe_cpu_dropout(const moe_kernel_args *a) {
    const moe_dropout_attrs *at = a->attrs;
    int64_t n = moe_tensor_numel(a->out);
    CPU_FLOAT_DISPATCH(a->out->dtype, "dropout",
        const T *x = (const T *)a->in[0]->data;
        T *y = (T *)a->out->data;
        const T scale = (T)(1.0 / (1.0 - at->p));
_Pragma("omp parallel for schedule(static) if (n > 16384)")
        for (int64_t i = 0; i < n; i++)
            y[i] = moe_philox_uniform(at->counter + (uint64_t)i, at->seed) >= at->p ? x[i] * scale : (T)0;
    )
    return MOE_OK;
}

/* ---- rotary embedding ---- */

/* cos and sin of angle(pos, i) = pos * theta^(-2i/hd) in double for positions [0, n_pos)
 * and pairs i < hd/2 (row pos at pos * hd/2), kept from call to call: every layer's q and
 * k, forward and backward, use the same angles, and recomputing pow, cos and sin per call
 * cost more than the rotation itself. Grown on demand (at least doubling); rebuilt for
 * another theta or hd. */
static struct {
    double theta;
    int64_t hd, n_pos;
    double *cos, *sin;
} rope_table;

static moe_status rope_table_cover(double theta, int64_t hd, int64_t n_pos) {
    const bool same = rope_table.cos && rope_table.theta == theta && rope_table.hd == hd;
    if (same && rope_table.n_pos >= n_pos) return MOE_OK;
    if (same && n_pos < 2 * rope_table.n_pos) n_pos = 2 * rope_table.n_pos; /* decoding: one position per call */
    const int64_t half = hd / 2;
    double *c = malloc(sizeof(double) * (size_t)(n_pos * half)), *sn = malloc(sizeof(double) * (size_t)(n_pos * half));
    if (!c || !sn) {
        free(c);
        free(sn);
        return moe_error(MOE_ERR_OOM, "rope: out of host memory for a %lld-position angle table",
                         (long long)n_pos);
    }
    double inv[half];
    for (int64_t i = 0; i < half; i++) inv[i] = pow(theta, -2.0 * (double)i / (double)hd);
#pragma omp parallel for schedule(static) if (n_pos * half > 16384)
    for (int64_t t = 0; t < n_pos; t++) {
        for (int64_t i = 0; i < half; i++) {
            double ang = (double)t * inv[i];
            c[t * half + i] = cos(ang);
            sn[t * half + i] = sin(ang);
        }
    }
    free(rope_table.cos);
    free(rope_table.sin);
    rope_table.theta = theta;
    rope_table.hd = hd;
    rope_table.n_pos = n_pos;
    rope_table.cos = c;
    rope_table.sin = sn;
    return MOE_OK;
}

/* ROPE: in[0] = x [B, T, H, hd] (any strides, hd even), in[1] = positions [T] I32
 * contiguous or NULL, out = y [B, T, H, hd] contiguous; attrs moe_rope_attrs {pos0, theta,
 * inverse}. Token t sits at p = in[1][t] (>= 0), or pos0 + t without positions. HF-Llama
 * rotate-half form: for pair i < hd/2, angle = p * theta^(-2i/hd) computed in double,
 * a = inverse ? -angle : angle,
 *   y[i]        = x[i] cos a - x[i + hd/2] sin a
 *   y[i + hd/2] = x[i + hd/2] cos a + x[i] sin a
 * The rotation is orthogonal, so the backward is this kernel with inverse = true. */
/* One head row of ROPE at element stride xs (a literal 1 gives the unit-stride loop, which
 * vectorises without gathers). */
#define ROPE_ROW(xs)                                                                              \
    _Pragma("omp simd")                                                                          \
    for (int64_t i = 0; i < half; i++) {                                                         \
        T x1 = xr[i * (xs)], x2 = xr[(i + half) * (xs)];                                         \
        yr[i] = x1 * cs[i] - x2 * sn[i];                                                         \
        yr[i + half] = x2 * cs[i] + x1 * sn[i];                                                  \
    }

/* The angle table over the positions pos[0 .. Tn) (or pos0 + t without pos); a negative
 * position is refused. */
static moe_status rope_table_for(const char *kname, double theta, int64_t hd, const int32_t *pos, int64_t pos0,
                                 int64_t Tn) {
    int64_t n_pos = pos0 + Tn;
    if (pos) {
        int64_t lo = 0, hi = -1;
        for (int64_t t = 0; t < Tn; t++) {
            lo = pos[t] < lo ? pos[t] : lo;
            hi = pos[t] > hi ? pos[t] : hi;
        }
        if (lo < 0) return moe_error(MOE_ERR_INVALID, "%s: position %lld is negative", kname, (long long)lo);
        n_pos = hi + 1;
    }
    return rope_table_cover(theta, hd, n_pos);
}

moe_status moe_cpu_rope(const moe_kernel_args *a) {
    const moe_rope_attrs *at = a->attrs;
    const moe_tensor *x = a->in[0];
    const int64_t B = x->shape[0], Tn = x->shape[1], H = x->shape[2], hd = x->shape[3], half = hd / 2;
    const int64_t *xs = x->strides;
    const int32_t *pos = a->in[1] ? (const int32_t *)a->in[1]->data : NULL;
    MOE_TRY(rope_table_for("rope", at->theta, hd, pos, at->pos0, Tn));
    CPU_FLOAT_DISPATCH(x->dtype, "rope",
        const T *px = (const T *)x->data;
        T *py = (T *)a->out->data;
_Pragma("omp parallel for schedule(static) if (B * Tn * H * hd > 16384)")
        for (int64_t t = 0; t < Tn; t++) {
            T cs[half], sn[half];
            const int64_t p = pos ? pos[t] : at->pos0 + t;
            const double *tc = rope_table.cos + p * half, *ts = rope_table.sin + p * half;
            for (int64_t i = 0; i < half; i++) {
                cs[i] = (T)tc[i];
                sn[i] = (T)(at->inverse ? -ts[i] : ts[i]);
            }
            for (int64_t b = 0; b < B; b++) {
                for (int64_t h = 0; h < H; h++) {
                    const T *xr = px + b * xs[0] + t * xs[1] + h * xs[2];
                    T *yr = py + ((b * Tn + t) * H + h) * hd;
                    if (xs[3] == 1) {
                        ROPE_ROW(1)
                    } else {
                        ROPE_ROW(xs[3])
                    }
                }
            }
        }
    )
    return MOE_OK;
}

/* Each token's n heads of x [B, T, n, hd] (unit last stride, heads at stride hd)
 * normalised per head or together, as moe_cpu_rmsnorm computes (y = x * rstd * w in the
 * dtype), into out, then rotated there in place as moe_cpu_rope rotates. */
static moe_status rmsnorm_rope(const moe_tensor *x, const moe_tensor *w, const moe_tensor *positions, double eps,
                               bool per_head, double theta, moe_tensor *out) {
    const int64_t B = x->shape[0], Tn = x->shape[1], n = x->shape[2], hd = x->shape[3], half = hd / 2, W = n * hd;
    const int64_t group = per_head ? hd : W, *xs = x->strides;
    const int32_t *pos = (const int32_t *)positions->data;
    MOE_TRY(rope_table_for("rope_append", theta, hd, pos, 0, Tn));
    CPU_FLOAT_DISPATCH(x->dtype, "rope_append",
        const T *pw = (const T *)w->data;
_Pragma("omp parallel for schedule(static) if (B * Tn * W > 16384)")
        for (int64_t r = 0; r < B * Tn; r++) {
            const int64_t t = r % Tn;
            const T *px = (const T *)x->data + (r / Tn) * xs[0] + t * xs[1];
            T *py = (T *)out->data + r * W, cs[half], sn[half];
            for (int64_t g0 = 0; g0 < W; g0 += group) {
                double ss = 0;
_Pragma("omp simd reduction(+:ss)")
                for (int64_t c = 0; c < group; c++) ss += (double)px[g0 + c] * px[g0 + c];
                T rs = (T)(1.0 / sqrt(ss / (double)group + eps));
                for (int64_t c = 0; c < group; c++) py[g0 + c] = px[g0 + c] * rs * pw[per_head ? c : g0 + c];
            }
            const double *tc = rope_table.cos + pos[t] * half, *ts = rope_table.sin + pos[t] * half;
            for (int64_t i = 0; i < half; i++) cs[i] = (T)tc[i], sn[i] = (T)ts[i];
            for (int64_t h = 0; h < n; h++) {
                T *yr = py + h * hd;
                const T *xr = yr;
                ROPE_ROW(1)
            }
        })
    return MOE_OK;
}

/* x [1, T, n, hd] normalised as at->norm says and rotated into out. */
static moe_status rope_append_prepare(const moe_rope_append_attrs *at, const moe_tensor *x, const moe_tensor *w,
                                      const moe_tensor *pos, moe_tensor *out) {
    if (at->norm == MOE_QK_NORM_NONE) {
        moe_rope_attrs ra = {.pos0 = 0, .theta = at->theta, .inverse = false};
        return moe_cpu_rope(&(moe_kernel_args){.out = out, .in = {x, pos}, .attrs = &ra});
    }
    return rmsnorm_rope(x, w, pos, at->eps, at->norm == MOE_QK_NORM_PER_HEAD, at->theta, out);
}

/* Token t's n hd values of x (heads side by side at token stride s1) into pool row rows[t]. */
static void rope_append_store(moe_tensor *pool, const moe_tensor *x, int64_t s1, const int32_t *rows) {
    const size_t es = moe_dtype_size(x->dtype), W = (size_t)(x->shape[2] * x->shape[3]);
    for (int64_t t = 0; t < x->shape[1]; t++)
        memcpy((char *)pool->data + (size_t)rows[t] * W * es, (const char *)x->data + (size_t)(t * s1) * es, W * es);
}

/* ROPE_APPEND: q into out and k into a scratch through rope_append_prepare, then k's and
 * v's rows into the pools (INDEX_COPY's placement). */
moe_status moe_cpu_rope_append(const moe_kernel_args *a) {
    const moe_rope_append_attrs *at = a->attrs;
    const moe_tensor *q = a->in[0], *k = a->in[1], *v = a->in[2], *pos = a->in[5];
    const int32_t *rows = (const int32_t *)a->in[6]->data;
    const int64_t R = at->k_pool->shape[0];
    for (int64_t t = 0; t < k->shape[1]; t++)
        if (rows[t] < 0 || rows[t] >= R)
            return moe_error(MOE_ERR_INVALID, "rope_append: row %d at position %lld is out of range [0, %lld)",
                             (int)rows[t], (long long)t, (long long)R);
    moe_tensor *kr = moe_tensor_empty_like(k);
    if (!kr) return moe_last_status();
    MOE_TRY(rope_append_prepare(at, q, a->in[3], pos, a->out));
    MOE_TRY(rope_append_prepare(at, k, a->in[4], pos, kr));
    rope_append_store(at->k_pool, kr, kr->strides[1], rows);
    rope_append_store(at->v_pool, v, v->strides[1], rows);
    return MOE_OK;
}

/* ---- attention ---- */
#define ATTN_BQ 64 /* query rows per block */
#define ATTN_BK 128 /* keys per block (the running max / sum advance block by block) */

/* Element offset of (b, t, h, 0) in a [B, T, H, hd] view whose last stride is 1. */
static inline int64_t attn_row(const moe_tensor *x, int64_t b, int64_t t, int64_t h) {
    return b * x->strides[0] + t * x->strides[1] + h * x->strides[2];
}

/* Per-thread scratch of `per_thread` elements of `elem` bytes; NULL + error on OOM. */
static void *attn_scratch(size_t per_thread, size_t elem, const char *kname) {
    void *p = malloc(per_thread * elem * (size_t)omp_get_max_threads());
    if (!p)
        moe_error(MOE_ERR_OOM, "%s: out of host memory for %d per-thread scratch blocks", kname,
                  omp_get_max_threads());
    return p;
}

/* Keys of the block at k0 that query row i of the block at q0 sees: all nk, or with causal
 * those up to key shift + q0 + i (none when <= 0). */
static inline int64_t attn_visible(bool causal, int64_t shift, int64_t q0, int64_t i, int64_t k0, int64_t nk) {
    return causal ? nn_min(nk, shift + q0 + i + 1 - k0) : nk;
}

/* The segments of an attention call (moe_attention_attrs): their count, the longest query
 * run, and the table's data (NULL: segment b is batch b). */
typedef struct {
    const int32_t *seg;
    int64_t n, max_q;
} attn_segs;
static attn_segs attn_segs_of(const moe_attention_attrs *at, const moe_tensor *q) {
    if (!at->seg) return (attn_segs){NULL, q->shape[0], q->shape[1]};
    return (attn_segs){(const int32_t *)at->seg->data, at->n_seg, at->max_q};
}

/* Where an attention call's keys and values live: [B, Tk, Hkv, hd] views (in[1], in[2]),
 * or (paged) pools [R, Hkv, hd] of which packed key j is row rows[j]. */
typedef struct {
    bool paged;
    const int32_t *rows;
} attn_keys;

/* ATTENTION: in[0] = q [B, Tq, H, hd], in[1] = k, in[2] = v [B, Tk, Hkv, hd] (any strides
 * with last stride 1; H % Hkv == 0), out = o [B, Tq, H, hd], out2 = lse [B, H, Tq]
 * contiguous in the dtype of q; attrs moe_attention_attrs {causal, scale, segments} (dk, dv
 * unused). Each segment (moe_att_seg_at: a batch, or a block of a packed row) is attended
 * alone: with nq queries and nk keys, head h reads kv head h / (H / Hkv),
 * s_ij = scale * q_i . k_j, and with causal query i sees keys j <= nk - nq + i (the
 * front-end guarantees nq <= nk, so every row sees key 0; a segment with queries has keys).
 * o_i = sum_j softmax_j(s_ij) v_j and lse_i = logsumexp_j s_ij, both by an online softmax
 * over key blocks of ATTN_BK (running max m, running sum l, accumulator rescaled by
 * exp(m_old - m_new)), accumulated in T. Tasks = (segment, h, query block of ATTN_BQ),
 * blocks past a segment's queries idle; per key block the scores S = scale Q K^T and the
 * update acc += P V are two block products (cpu_gemm), the softmax in between runs row by
 * row over the visible keys. Paged keys (ATTENTION_PAGED, no out2): each key block's rows
 * are first copied out of the pools into per-thread scratch. */
static moe_status attention_forward(const moe_kernel_args *a, attn_keys keys, const char *kname) {
    const moe_attention_attrs *at = a->attrs;
    const moe_tensor *q = a->in[0], *k = a->in[1], *v = a->in[2], *o = a->out;
    const int64_t Tq = q->shape[1], H = q->shape[2], hd = q->shape[3];
    const int64_t Hkv = keys.paged ? k->shape[1] : k->shape[2], Tk = keys.paged ? a->in[3]->shape[0] : k->shape[1];
    const int64_t group = H / Hkv;
    const attn_segs sgs = attn_segs_of(at, q);
    const int64_t nqb = (sgs.max_q + ATTN_BQ - 1) / ATTN_BQ;
    const size_t per_thread = (size_t)(ATTN_BQ * hd + ATTN_BQ * ATTN_BK + 2 * ATTN_BQ + 2 * ATTN_BK * hd * keys.paged);
    bool ok = true;
    CPU_FLOAT_DISPATCH(q->dtype, kname,
        T *scratch = attn_scratch(per_thread, sizeof(T), kname);
        if (!scratch) return moe_last_status();
        const T *pq = (const T *)q->data, *pk = (const T *)k->data, *pv = (const T *)v->data;
        T *po = (T *)o->data, *plse = a->out2 ? (T *)a->out2->data : NULL;
        const T scale = (T)at->scale;
_Pragma("omp parallel for collapse(3) schedule(dynamic) reduction(&& : ok)")
        for (int64_t sid = 0; sid < sgs.n; sid++) {
            for (int64_t h = 0; h < H; h++) {
                for (int64_t qb = 0; qb < nqb; qb++) {
                    const moe_att_seg sg = moe_att_seg_at(sgs.seg, sgs.n, sid, Tq, Tk);
                    const int64_t q0 = qb * ATTN_BQ, b = sg.b;
                    if (q0 >= sg.nq) continue;
                    T *acc = scratch + per_thread * (size_t)omp_get_thread_num();
                    T *S = acc + ATTN_BQ * hd, *m = S + ATTN_BQ * ATTN_BK, *l = m + ATTN_BQ;
                    T *Kb = l + ATTN_BQ, *Vb = Kb + ATTN_BK * hd; /* paged key blocks */
                    const int64_t nq = nn_min(ATTN_BQ, sg.nq - q0), kvh = h / group, shift = sg.nk - sg.nq;
                    const int64_t kend = at->causal ? nn_min(sg.nk, shift + q0 + nq) : sg.nk;
                    for (int64_t i = 0; i < nq; i++) {
                        m[i] = -INFINITY;
                        l[i] = 0;
                    }
                    for (int64_t k0 = 0; k0 < kend; k0 += ATTN_BK) {
                        const int64_t nk = nn_min(ATTN_BK, kend - k0);
                        const T *kb = Kb, *vb = Vb;
                        int64_t ldk = hd, ldv = hd;
                        if (keys.paged) {
                            for (int64_t j = 0; j < nk; j++) {
                                const int64_t r = (int64_t)keys.rows[sg.k0 + k0 + j] * Hkv + kvh;
                                memcpy(Kb + j * hd, pk + r * hd, sizeof(T) * (size_t)hd);
                                memcpy(Vb + j * hd, pv + r * hd, sizeof(T) * (size_t)hd);
                            }
                        } else {
                            kb = pk + attn_row(k, b, sg.k0 + k0, kvh), ldk = k->strides[1];
                            vb = pv + attn_row(v, b, sg.k0 + k0, kvh), ldv = v->strides[1];
                        }
                        ok = ok && cpu_gemm(false, true, nq, nk, hd, scale, pq + attn_row(q, b, sg.q0 + q0, h),
                                            q->strides[1], kb, ldk, (T)0, S, ATTN_BK);
                        for (int64_t i = 0; i < nq; i++) {
                            const int64_t cnt = attn_visible(at->causal, shift, q0, i, k0, nk);
                            T *si = S + i * ATTN_BK;
                            for (int64_t j = cnt > 0 ? cnt : 0; j < nk; j++) si[j] = 0;
                            if (cnt <= 0) continue;
                            const T mx = nn_max(si, m[i], cnt), corr = exp(m[i] - mx);
                            l[i] = l[i] * corr + nn_exp_shift(si, mx, cnt);
                            m[i] = mx;
                            if (k0 > 0 && corr != 1) nn_scale(acc + i * hd, corr, hd);
                        }
                        /* the first block overwrites acc (every row sees key 0) */
                        ok = ok && cpu_gemm(false, false, nq, hd, nk, (T)1, S, ATTN_BK, vb, ldv, (T)(k0 > 0), acc, hd);
                    }
                    for (int64_t i = 0; i < nq; i++) {
                        T *oi = po + attn_row(o, b, sg.q0 + q0 + i, h);
                        const T inv = 1 / l[i];
                        for (int64_t e = 0; e < hd; e++) oi[e] = acc[i * hd + e] * inv;
                        if (plse) plse[(b * H + h) * Tq + sg.q0 + q0 + i] = m[i] + log(l[i]);
                    }
                }
            }
        }
        free(scratch);
    )
    return ok ? MOE_OK : moe_error(MOE_ERR_DEVICE, "%s: oneDNN sgemm rejected a block product (hd %lld)", kname,
                                   (long long)hd);
}

moe_status moe_cpu_attention(const moe_kernel_args *a) {
    return attention_forward(a, (attn_keys){.paged = false}, "attention");
}

/* ATTENTION_PAGED: in[0] = q [1, Tq, H, hd] (last stride 1), in[1], in[2] = pools
 * [R, Hkv, hd] contiguous, in[3] = rows [Tk] I32; out = o [1, Tq, H, hd]; attrs as in
 * ATTENTION with the segment table. The same arithmetic as ATTENTION on the gathered keys. */
moe_status moe_cpu_attention_paged(const moe_kernel_args *a) {
    const moe_attention_attrs *at = a->attrs;
    const int32_t *r = a->in[3]->data, *k_off = (const int32_t *)at->seg->data + at->n_seg + 1;
    const int64_t R = a->in[1]->shape[0];
    for (int64_t j = 0; j < k_off[at->n_seg]; j++) /* the rows the segments use (rows may be longer) */
        if (r[j] < 0 || r[j] >= R)
            return moe_error(MOE_ERR_INVALID, "attention_paged: row %d at position %lld is out of range [0, %lld)", r[j],
                             (long long)j, (long long)R);
    return attention_forward(a, (attn_keys){.paged = true, .rows = r}, "attention_paged");
}

/* ATTENTION_BWD: in[0] = q, in[1] = k, in[2] = v (as in ATTENTION), in[3] = o, in[4] = g
 * (grad of o) [B, Tq, H, hd], in[5] = lse [B, H, Tq] contiguous; out = dq [B, Tq, H, hd];
 * attrs.dk, attrs.dv = [B, Tk, Hkv, hd], attrs' segments as in ATTENTION. All [.., hd]
 * operands: last stride 1. The kernel writes dq, dk and dv fully (no pre-zeroing needed;
 * the segments cover every query and key). Per segment, probabilities are recomputed block
 * by block, p_ij = exp(scale * q_i . k_j - lse_i) (0 where masked), with D_i = g_i . o_i:
 *   dv_j += p_ij g_i,   ds_ij = scale * p_ij (g_i . v_j - D_i),
 *   dq_i += ds_ij k_j,  dk_j += ds_ij q_i.
 * Per (query block, key block): S = Q K^T and dP = G V^T, then P and dS row by row, then
 * dV += P^T G, dK += dS^T Q, dQ += dS K, all five products block GEMMs (cpu_gemm).
 * One task per (segment, kv head) walks its query heads, query blocks and key blocks in a
 * fixed order, so no two tasks write the same element and the result is deterministic. */
moe_status moe_cpu_attention_bwd(const moe_kernel_args *a) {
    const moe_attention_attrs *at = a->attrs;
    const moe_tensor *q = a->in[0], *k = a->in[1], *v = a->in[2], *o = a->in[3], *g = a->in[4];
    const moe_tensor *dq = a->out, *dk = at->dk, *dv = at->dv;
    const int64_t Tq = q->shape[1], H = q->shape[2], hd = q->shape[3];
    const int64_t Tk = k->shape[1], Hkv = k->shape[2], group = H / Hkv;
    const int64_t qs = q->strides[1], ks = k->strides[1], vs = v->strides[1], gs = g->strides[1];
    const attn_segs sgs = attn_segs_of(at, q);
    const size_t per_thread = (size_t)(2 * ATTN_BQ * ATTN_BK + ATTN_BQ);
    bool ok = true;
    CPU_FLOAT_DISPATCH(q->dtype, "attention_bwd",
        T *scratch = attn_scratch(per_thread, sizeof(T), "attention_bwd");
        if (!scratch) return moe_last_status();
        const T *pq = (const T *)q->data, *pk = (const T *)k->data, *pv = (const T *)v->data;
        const T *po = (const T *)o->data, *pg = (const T *)g->data, *plse = (const T *)a->in[5]->data;
        T *pdq = (T *)dq->data, *pdk = (T *)dk->data, *pdv = (T *)dv->data;
        const T scale = (T)at->scale;
_Pragma("omp parallel for collapse(2) schedule(dynamic) reduction(&& : ok)")
        for (int64_t sid = 0; sid < sgs.n; sid++) {
            for (int64_t kvh = 0; kvh < Hkv; kvh++) {
                const moe_att_seg sg = moe_att_seg_at(sgs.seg, sgs.n, sid, Tq, Tk);
                const int64_t b = sg.b, shift = sg.nk - sg.nq;
                /* P, DS: [ATTN_BQ, ATTN_BK] blocks of p_ij and ds_ij (S and dP before them) */
                T *P = scratch + per_thread * (size_t)omp_get_thread_num(), *DS = P + ATTN_BQ * ATTN_BK;
                T *D = DS + ATTN_BQ * ATTN_BK;
                for (int64_t j = sg.k0; j < sg.k0 + sg.nk; j++) {
                    memset(pdk + attn_row(dk, b, j, kvh), 0, sizeof(T) * (size_t)hd);
                    memset(pdv + attn_row(dv, b, j, kvh), 0, sizeof(T) * (size_t)hd);
                }
                for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
                    for (int64_t q0 = 0; q0 < sg.nq; q0 += ATTN_BQ) {
                        const int64_t nq = nn_min(ATTN_BQ, sg.nq - q0), qr = sg.q0 + q0;
                        const int64_t kend = at->causal ? nn_min(sg.nk, shift + q0 + nq) : sg.nk;
                        const T *qb = pq + attn_row(q, b, qr, h), *gb = pg + attn_row(g, b, qr, h);
                        const T *lse = plse + (b * H + h) * Tq + qr;
                        T *dqb = pdq + attn_row(dq, b, qr, h);
                        for (int64_t i = 0; i < nq; i++) D[i] = nn_dot(gb + i * gs, po + attn_row(o, b, qr + i, h), hd);
                        for (int64_t k0 = 0; k0 < kend; k0 += ATTN_BK) {
                            const int64_t nk = nn_min(ATTN_BK, kend - k0), kr = sg.k0 + k0;
                            const T *kb = pk + attn_row(k, b, kr, kvh);
                            ok = ok && cpu_gemm(false, true, nq, nk, hd, scale, qb, qs, kb, ks, (T)0, P, ATTN_BK) &&
                                 cpu_gemm(false, true, nq, nk, hd, (T)1, gb, gs, pv + attn_row(v, b, kr, kvh), vs, (T)0,
                                          DS, ATTN_BK);
                            for (int64_t i = 0; i < nq; i++) {
                                const int64_t cnt = attn_visible(at->causal, shift, q0, i, k0, nk);
                                T *p = P + i * ATTN_BK, *ds = DS + i * ATTN_BK;
                                for (int64_t j = cnt > 0 ? cnt : 0; j < nk; j++) p[j] = ds[j] = 0;
                                if (cnt > 0) nn_exp_shift(p, lse[i], cnt);
                                for (int64_t j = 0; j < cnt; j++) ds[j] = scale * p[j] * (ds[j] - D[i]);
                            }
                            /* the first key block overwrites dq (every query row sees key 0) */
                            ok = ok &&
                                 cpu_gemm(true, false, nk, hd, nq, (T)1, P, ATTN_BK, gb, gs, (T)1,
                                          pdv + attn_row(dv, b, kr, kvh), dv->strides[1]) &&
                                 cpu_gemm(true, false, nk, hd, nq, (T)1, DS, ATTN_BK, qb, qs, (T)1,
                                          pdk + attn_row(dk, b, kr, kvh), dk->strides[1]) &&
                                 cpu_gemm(false, false, nq, hd, nk, (T)1, DS, ATTN_BK, kb, ks, (T)(k0 > 0), dqb,
                                          dq->strides[1]);
                        }
                    }
                }
            }
        }
        free(scratch);
    )
    return ok ? MOE_OK : moe_error(MOE_ERR_DEVICE, "attention_bwd: oneDNN sgemm rejected a block product (hd %lld)",
                                   (long long)hd);
}

/* ---- cut cross-entropy ---- */

/* A 2-D [rows, cols] view with the given strides, starting `off` elements into t. */
static moe_tensor nn_view2(const moe_tensor *t, int64_t off, int64_t rows, int64_t cols, int64_t rs, int64_t cs) {
    moe_tensor v = *t;
    v.ndim = 2;
    v.shape[0] = rows;
    v.shape[1] = cols;
    v.strides[0] = rs;
    v.strides[1] = cs;
    v.data = (char *)t->data + off * (int64_t)moe_dtype_size(t->dtype);
    return v;
}

/* Logits of vocabulary rows [v0, v0 + nb) into the packed [T, nb] scratch: h @ w[v0:]^T. */
static moe_status ce_block_logits(const moe_tensor *h, const moe_tensor *w, moe_tensor *scratch, int64_t v0,
                                  int64_t nb, moe_tensor *S) {
    *S = nn_view2(scratch, 0, h->shape[0], nb, nb, 1);
    moe_tensor wt = nn_view2(w, v0 * w->strides[0], w->shape[1], nb, w->strides[1], w->strides[0]);
    return moe_cpu_gemm(h, &wt, S, 1.0f, 0.0f);
}

/* One [T, block] scratch of logits on the step arena. */
static moe_tensor *ce_scratch(const moe_tensor *h, int64_t block) {
    return moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, h->dtype, 2, (int64_t[]){h->shape[0], block});
}

/* CROSS_ENTROPY: in[0] = h [T, d], in[1] = w [V, d] (any strides, same float dtype),
 * in[2] = targets [T] I32 contiguous, each -1 (ignored) or in [0, V) (validated by the
 * front-end; a target outside never matches a vocabulary row and reads nothing);
 * out = per-row loss [T], out2 = lse [T], contiguous, F32 (F64 for F64 inputs);
 * attrs moe_ce_attrs {block} (inv_count unused here). For each vocabulary block of
 * `block` rows: logits = h @ w_blk^T (one GEMM into a [T, block] step-arena scratch), then
 * per row the target's logit when it falls in the block, and a running max m and sum s
 * (s = s * exp(m_old - m_new) + sum exp(logit - m_new), accumulated in T). lse = m + log s;
 * loss = lse - logit[target], or exactly 0 for an ignored row. */
moe_status moe_cpu_cross_entropy(const moe_kernel_args *a) {
    const moe_ce_attrs *at = a->attrs;
    const moe_tensor *h = a->in[0], *w = a->in[1];
    const int32_t *tg = (const int32_t *)a->in[2]->data;
    const int64_t Tn = h->shape[0], V = w->shape[0], blk = nn_min(at->block, V);
    moe_tensor *scratch = ce_scratch(h, blk);
    moe_tensor *tlogit = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, a->out->dtype, 1, (int64_t[]){Tn});
    if (!scratch || !tlogit) return moe_last_status();
    CPU_FLOAT_DISPATCH(h->dtype, "cross_entropy",
        T *loss = (T *)a->out->data, *lse = (T *)a->out2->data, *tl = (T *)tlogit->data;
        T *m = lse, *s = loss; /* running max and sum live in the outputs until the end */
        for (int64_t t = 0; t < Tn; t++) {
            m[t] = -INFINITY;
            s[t] = 0;
            tl[t] = 0;
        }
        for (int64_t v0 = 0; v0 < V; v0 += blk) {
            const int64_t nb = nn_min(blk, V - v0);
            moe_tensor S;
            MOE_TRY(ce_block_logits(h, w, scratch, v0, nb, &S));
            T *ps = (T *)S.data;
_Pragma("omp parallel for schedule(static) if (Tn * nb > 16384)")
            for (int64_t t = 0; t < Tn; t++) {
                T *row = ps + t * nb;
                if (tg[t] >= v0 && tg[t] < v0 + nb) tl[t] = row[tg[t] - v0];
                const T mx = nn_max(row, m[t], nb);
                s[t] = s[t] * exp(m[t] - mx) + nn_exp_shift(row, mx, nb);
                m[t] = mx;
            }
        }
        for (int64_t t = 0; t < Tn; t++) {
            lse[t] = m[t] + log(s[t]);
            loss[t] = tg[t] == -1 ? (T)0 : lse[t] - tl[t];
        }
    )
    return MOE_OK;
}

/* CROSS_ENTROPY_BWD: in[0] = h, in[1] = w, in[2] = targets (as in CROSS_ENTROPY),
 * in[3] = lse [T] from the forward, in[4] = the upstream grad of the mean loss, a 0-d
 * tensor in the dtype of lse; attrs moe_ce_attrs {block, inv_count}. out = dh [T, d],
 * out2 = dw [V, d], both contiguous in the dtype of h and written fully; either may be
 * NULL (not wanted). With c = g * inv_count, for each vocabulary block (exact mode, no
 * block is skipped): logits recomputed by a GEMM, G = c * (softmax - onehot(target)) with
 * rows of ignored targets zero, then dh (+)= G @ w_blk (first block overwrites) and
 * dw[blk] = G^T @ h, both GEMMs. */
moe_status moe_cpu_cross_entropy_bwd(const moe_kernel_args *a) {
    const moe_ce_attrs *at = a->attrs;
    const moe_tensor *h = a->in[0], *w = a->in[1];
    const int32_t *tg = (const int32_t *)a->in[2]->data;
    moe_tensor *dh = a->out, *dw = a->out2;
    const int64_t Tn = h->shape[0], V = w->shape[0], d = h->shape[1], blk = nn_min(at->block, V);
    moe_tensor *scratch = ce_scratch(h, blk);
    if (!scratch) return moe_last_status();
    CPU_FLOAT_DISPATCH(h->dtype, "cross_entropy_bwd",
        const T *lse = (const T *)a->in[3]->data;
        const T c = *(const T *)a->in[4]->data * (T)at->inv_count;
        for (int64_t v0 = 0; v0 < V; v0 += blk) {
            const int64_t nb = nn_min(blk, V - v0);
            moe_tensor S;
            MOE_TRY(ce_block_logits(h, w, scratch, v0, nb, &S));
            T *ps = (T *)S.data;
_Pragma("omp parallel for schedule(static) if (Tn * nb > 16384)")
            for (int64_t t = 0; t < Tn; t++) {
                T *row = ps + t * nb;
                if (tg[t] == -1) {
                    memset(row, 0, sizeof(T) * (size_t)nb);
                    continue;
                }
                nn_exp_shift(row, lse[t], nb);
                nn_scale(row, c, nb);
                if (tg[t] >= v0 && tg[t] < v0 + nb) row[tg[t] - v0] -= c;
            }
            if (dh) {
                moe_tensor wb = nn_view2(w, v0 * w->strides[0], nb, d, w->strides[0], w->strides[1]);
                MOE_TRY(moe_cpu_gemm(&S, &wb, dh, 1.0f, v0 ? 1.0f : 0.0f));
            }
            if (dw) {
                moe_tensor st = nn_view2(&S, 0, nb, Tn, 1, nb), dwb = nn_view2(dw, v0 * d, nb, d, d, 1);
                MOE_TRY(moe_cpu_gemm(&st, h, &dwb, 1.0f, 0.0f));
            }
        }
    )
    return MOE_OK;
}
