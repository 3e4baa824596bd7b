/* Tensor-core flash attention for bf16 with head dim 64 or 128, in the FlashAttention-2
 * form: warp-level mma.sync.m16n8k16 (bf16 operands, f32 accumulators) with the online
 * softmax kept in registers, tiles staged in shared memory by cp.async (rows padded by 8
 * elements, so ldmatrix is free of bank conflicts). moe_cuda_attention and
 * moe_cuda_attention_bwd (core/cuda/nn.cu, whose f32 kernels are the reference) come here
 * when att_tc_fits; the semantics are theirs: q [B, Tq, H, hd], k, v [B, Tk, Hkv, hd] with
 * any 16-byte aligned row strides, causal query i sees keys j <= i + Tk - Tq, query head h
 * reads kv head h / (H / Hkv), lse [B, H, Tq] f32 = logsumexp of the scaled scores, o and
 * the grads contiguous. As in FlashAttention-2, P (and dS) are rounded to bf16 before they
 * meet V, dO, Q or K; every other step is f32.
 *
 * Forward, grid (query tiles of TC_ROWS, H, B): each warp owns 16 query rows and walks the
 * key tiles of TC_TILE keys (double-buffered), stopping at the last one the causal mask
 * lets its block see. Backward, deterministic (no atomics), after D = rowsum(dO * O):
 *  - dQ, grid (query tiles, H, B): each warp owns 16 query rows and walks the key tiles,
 *    recomputing P = exp(S - lse) and dS = P (dP - D): dQ += dS K;
 *  - dK and dV, grid (key tiles of TC_ROWS, Hkv, B): each warp owns 16 key rows and walks
 *    the query tiles of every query head of its group: dV += P^T dO, dK += dS^T Q.
 * The softmax scale is folded into the exp2 argument (log2 e) and into the dQ, dK stores.
 *
 * mma.m16n8k16 fragments (PTX ISA), lane = 4 g + t: an A fragment holds rows g and g + 8,
 * columns 2t, 2t + 1 and 2t + 8, 2t + 9 of a 16 x 16 block; a B fragment columns g, rows
 * 2t, 2t + 1 (b0) and 2t + 8, 2t + 9 (b1) of a 16 x 8 block; a C fragment c0 c1 row g,
 * columns 2t, 2t + 1, and c2 c3 the same of row g + 8. */
#include <string.h>

#include "core/cuda/cuda_common.cuh"

#define TC_WARPS 4
#define TC_THREADS (TC_WARPS * 32)
#define TC_ROWS (TC_WARPS * 16) /* query rows (forward, dQ) or key rows (dK, dV) per block */
#define TC_TILE 64              /* keys per tile of the forward and dQ loops */

namespace {

constexpr float TC_LOG2E = 1.4426950408889634f;
constexpr float TC_LN2 = 0.6931471805599453f;

/* Element strides of a [B, T, heads, hd] operand (unit last stride). */
struct tc_view {
    int64_t sb, st, sh;
};

/* Sequence lengths, query and kv heads, causal offset shift = Tk - Tq, softmax scale, and
 * the segments (moe_attention_attrs: seg the table on the device or NULL, n_seg the grid's
 * z). The kernels take the call's geometry (Tq, Tk per batch) and work in their segment's
 * (tc_seg: Tq, Tk, shift of the segment, rows numbered within it). */
struct tc_geom {
    int64_t Tq, Tk, H, Hkv, shift;
    bool causal;
    float scale;
    const int32_t *seg;
    int64_t n_seg;
};

/* This block's segment (blockIdx.z); *local = g with the segment's Tq, Tk and shift. */
__device__ __forceinline__ moe_att_seg tc_seg(const tc_geom &g, tc_geom *local) {
    const moe_att_seg s = moe_att_seg_at(g.seg, g.n_seg, blockIdx.z, g.Tq, g.Tk);
    *local = g;
    local->Tq = s.nq;
    local->Tk = s.nk;
    local->shift = s.nk - s.nq;
    return s;
}

/* Query tiles of the dK, dV loop: 32 rows for hd 128 keep its four accumulator sets
 * (dK, dV, S^T, dP^T) in registers. */
__host__ __device__ constexpr int tc_dkv_rows(int hd) { return hd == 128 ? 32 : 64; }

/* ---- warp-level primitives ---- */

__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async4(void *dst, const void *src, bool valid) {
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const bf16 *p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const bf16 *p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

/* c += a b for one 16 x 8 output block. */
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

/* A fragment of the 16 x 16 block at (row0, col0) of a row-major shared tile. */
template <int LD> __device__ __forceinline__ void frag_a(uint32_t (&a)[4], const bf16 *s, int row0, int col0) {
    const int lane = threadIdx.x & 31;
    ldsm_x4(a, s + (row0 + (lane & 15)) * LD + col0 + (lane >> 4) * 8);
}

/* B fragments {b0, b1 of columns n0..n0+7, b0, b1 of n0+8..n0+15} at rows k0..k0+15 of
 * B = s^T, s stored [n][k] (row n of s is column n of B). */
template <int LD> __device__ __forceinline__ void frag_b_nk(uint32_t (&b)[4], const bf16 *s, int n0, int k0) {
    const int lane = threadIdx.x & 31;
    ldsm_x4(b, s + (n0 + (lane & 7) + ((lane >> 4) << 3)) * LD + k0 + ((lane >> 3) & 1) * 8);
}

/* The same for B = s, s stored [k][n]. */
template <int LD> __device__ __forceinline__ void frag_b_kn(uint32_t (&b)[4], const bf16 *s, int k0, int n0) {
    const int lane = threadIdx.x & 31;
    ldsm_x4_trans(b, s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + n0 + (lane >> 4) * 8);
}

/* The A fragment of k-step ks of a 16 x N matrix held as C fragments c[N / 8], in bf16. */
template <int NT> __device__ __forceinline__ void frag_a_of_c(uint32_t (&a)[4], const float (&c)[NT][4], int ks) {
    a[0] = pack_bf16(c[2 * ks][0], c[2 * ks][1]);
    a[1] = pack_bf16(c[2 * ks][2], c[2 * ks][3]);
    a[2] = pack_bf16(c[2 * ks + 1][0], c[2 * ks + 1][1]);
    a[3] = pack_bf16(c[2 * ks + 1][2], c[2 * ks + 1][3]);
}

/* acc[16 x N] += A B: A a 16-row block of a row-major shared tile sa (rows row0..row0+15,
 * K columns), B = sb^T with sb stored [N][K]. */
template <int LD, int K, int N>
__device__ __forceinline__ void warp_gemm_nk(float (&acc)[N / 8][4], const bf16 *sa, int row0, const bf16 *sb) {
#pragma unroll
    for (int ks = 0; ks < K / 16; ks++) {
        uint32_t a[4];
        frag_a<LD>(a, sa, row0, ks * 16);
#pragma unroll
        for (int np = 0; np < N / 16; np++) {
            uint32_t b[4];
            frag_b_nk<LD>(b, sb, np * 16, ks * 16);
            mma_bf16(acc[2 * np], a, b[0], b[1]);
            mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

/* acc[16 x N] += P B: P [16 x K] held as C fragments (rounded to bf16), B = sb stored [K][N]. */
template <int LD, int K, int N>
__device__ __forceinline__ void warp_gemm_pkn(float (&acc)[N / 8][4], const float (&p)[K / 8][4], const bf16 *sb) {
#pragma unroll
    for (int ks = 0; ks < K / 16; ks++) {
        uint32_t a[4];
        frag_a_of_c(a, p, ks);
#pragma unroll
        for (int np = 0; np < N / 16; np++) {
            uint32_t b[4];
            frag_b_kn<LD>(b, sb, ks * 16, np * 16);
            mma_bf16(acc[2 * np], a, b[0], b[1]);
            mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

/* ---- tiles between global and shared memory ---- */

/* Rows [r0, r0 + ROWS) of one head (base = its row 0, rows st elements apart) into
 * s[ROWS][HD + 8] by cp.async; rows at or past `rows` are zero-filled. Every thread of
 * the block takes part; the caller commits. */
template <int HD, int ROWS>
__device__ __forceinline__ void tc_load_tile(bf16 *s, const bf16 *base, int64_t st, int64_t r0, int64_t rows) {
    constexpr int CH = HD / 8, LD = HD + 8;
    static_assert(ROWS * CH % TC_THREADS == 0, "tile chunks must split evenly over the block");
#pragma unroll
    for (int it = 0; it < ROWS * CH / TC_THREADS; it++) {
        const int c = it * TC_THREADS + threadIdx.x, r = c / CH, ch = c % CH;
        const bool ok = r0 + r < rows;
        cp_async16(s + r * LD + ch * 8, ok ? base + (r0 + r) * st + ch * 8 : base, ok);
    }
}

/* A warp's 16 x HD accumulators (C fragments; rows g times mul0, rows g + 8 times mul1)
 * as bf16 to rows [r0, r0 + 16) below `rows` of a contiguous output (base = its row 0,
 * rows st elements apart), staged through the warp's own 16 rows `stage` of a shared
 * tile so that the global stores are 16 bytes wide. */
template <int HD>
__device__ __forceinline__ void tc_store_rows(const float (&acc)[HD / 8][4], float mul0, float mul1, bf16 *stage,
                                              bf16 *base, int64_t st, int64_t r0, int64_t rows) {
    constexpr int CH = HD / 8, LD = HD + 8;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    __syncwarp(); /* every lane is done reading the staging rows */
#pragma unroll
    for (int nt = 0; nt < HD / 8; nt++) {
        *reinterpret_cast<uint32_t *>(stage + g * LD + nt * 8 + 2 * t) = pack_bf16(acc[nt][0] * mul0, acc[nt][1] * mul0);
        *reinterpret_cast<uint32_t *>(stage + (g + 8) * LD + nt * 8 + 2 * t) =
            pack_bf16(acc[nt][2] * mul1, acc[nt][3] * mul1);
    }
    __syncwarp();
#pragma unroll
    for (int it = 0; it < 16 * CH / 32; it++) {
        const int c = it * 32 + lane, r = c / CH, ch = c % CH;
        if (r0 + r < rows)
            *reinterpret_cast<uint4 *>(base + (r0 + r) * st + ch * 8) =
                *reinterpret_cast<const uint4 *>(stage + r * LD + ch * 8);
    }
}

/* Scores of a warp's query rows row0 (C rows g) and row0 + 8 (rows g + 8) against keys
 * k0 + column of an N-key tile: s = s * mul - off[row], -inf where the key is past Tk or,
 * causal, after the query's position. */
template <int N>
__device__ __forceinline__ void tc_scale_mask(float (&s)[N / 8][4], float mul, const float (&off)[2], int64_t row0,
                                              int64_t k0, const tc_geom &g) {
    const int t = threadIdx.x & 3;
    const int64_t lim0 = (g.causal ? min(row0 + g.shift, g.Tk - 1) : g.Tk - 1) - k0; /* last visible column */
    const int64_t lim1 = (g.causal ? min(row0 + 8 + g.shift, g.Tk - 1) : g.Tk - 1) - k0;
    const bool whole = lim0 >= N - 1; /* lim1 >= lim0 */
#pragma unroll
    for (int nt = 0; nt < N / 8; nt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float x = fmaf(s[nt][e], mul, -off[e >> 1]);
            if (!whole && nt * 8 + 2 * t + (e & 1) > (e >> 1 ? lim1 : lim0)) x = -INFINITY;
            s[nt][e] = x;
        }
    }
}

/* One step of the K/V double buffer over key tiles (TC_TILE rows of HD + 8 in sK, sV,
 * two buffers each): waits for tile kt, whose cp.async group was committed one step
 * earlier (or before the loop), then starts loading tile kt + 1 into the other buffer and
 * hands back tile kt's buffers. The barrier between them is what makes the reuse safe:
 * every warp has finished with tile kt - 1 (the other buffer) before it is overwritten. */
template <int HD>
__device__ __forceinline__ void tc_next_kv(int kt, int nkt, bf16 *sK, bf16 *sV, const bf16 *kh, const bf16 *vh,
                                           int64_t kst, int64_t vst, int64_t Tk, const bf16 **cK, const bf16 **cV) {
    constexpr int LD = HD + 8, BC = TC_TILE;
    cp_async_wait_all();
    __syncthreads();
    if (kt + 1 < nkt) {
        const int nb = (kt + 1) & 1;
        tc_load_tile<HD, BC>(sK + nb * BC * LD, kh, kst, (int64_t)(kt + 1) * BC, Tk);
        tc_load_tile<HD, BC>(sV + nb * BC * LD, vh, vst, (int64_t)(kt + 1) * BC, Tk);
        cp_async_commit();
    }
    *cK = sK + (kt & 1) * BC * LD;
    *cV = sV + (kt & 1) * BC * LD;
}

/* Keys a query tile [q0, q0 + TC_ROWS) needs: all, or causal up to its last row's position. */
__device__ __forceinline__ int64_t tc_key_end(int64_t q0, const tc_geom &g) {
    return g.causal ? g.shift + min(q0 + TC_ROWS, g.Tq) : g.Tk;
}

/* ---- forward ---- */

/* o [B, Tq, H, HD] contiguous, lse [B, H, Tq]. Shared: Q [TC_ROWS], K and V [2][TC_TILE]
 * rows of HD + 8. Blocks run the longest causal rows first; those past their segment's
 * queries exit. */
template <int HD>
__global__ void __launch_bounds__(TC_THREADS)
    att_tc_fwd_kernel(const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                      bf16 *__restrict__ o, float *__restrict__ lse, tc_view vq, tc_view vk, tc_view vv,
                      tc_geom gcall) {
    constexpr int LD = HD + 8, BC = TC_TILE;
    extern __shared__ __align__(16) unsigned char tc_smem[];
    tc_geom g;
    const moe_att_seg sg = tc_seg(gcall, &g);
    const int64_t q0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * TC_ROWS;
    if (q0 >= g.Tq) return;
    bf16 *sQ = reinterpret_cast<bf16 *>(tc_smem), *sK = sQ + TC_ROWS * LD, *sV = sK + 2 * BC * LD;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, t = lane & 3;
    const int64_t b = sg.b, h = blockIdx.y, kvh = h / (g.H / g.Hkv), row0 = q0 + w * 16 + (lane >> 2);
    const bf16 *kh = k + b * vk.sb + sg.k0 * vk.st + kvh * vk.sh, *vh = v + b * vv.sb + sg.k0 * vv.st + kvh * vv.sh;
    const int nkt = (int)((tc_key_end(q0, g) + BC - 1) / BC);

    tc_load_tile<HD, TC_ROWS>(sQ, q + b * vq.sb + sg.q0 * vq.st + h * vq.sh, vq.st, q0, g.Tq);
    tc_load_tile<HD, BC>(sK, kh, vk.st, 0, g.Tk);
    tc_load_tile<HD, BC>(sV, vh, vv.st, 0, g.Tk);
    cp_async_commit();

    const float sl2 = g.scale * TC_LOG2E, zero[2] = {0, 0};
    uint32_t qf[HD / 16][4];
    float acc[HD / 8][4] = {}, m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
    for (int kt = 0; kt < nkt; kt++) {
        const bf16 *cK, *cV;
        tc_next_kv<HD>(kt, nkt, sK, sV, kh, vh, vk.st, vv.st, g.Tk, &cK, &cV);
        if (kt == 0) {
#pragma unroll
            for (int ks = 0; ks < HD / 16; ks++) frag_a<LD>(qf[ks], sQ, w * 16, ks * 16);
        }

        /* S = Q K^T in log2 units of the scaled scores */
        float s[BC / 8][4] = {};
#pragma unroll
        for (int ks = 0; ks < HD / 16; ks++) {
#pragma unroll
            for (int np = 0; np < BC / 16; np++) {
                uint32_t bb[4];
                frag_b_nk<LD>(bb, cK, np * 16, ks * 16);
                mma_bf16(s[2 * np], qf[ks], bb[0], bb[1]);
                mma_bf16(s[2 * np + 1], qf[ks], bb[2], bb[3]);
            }
        }
        tc_scale_mask<BC>(s, sl2, zero, row0, (int64_t)kt * BC, g);

        /* online softmax: rows are spread over the 4 lanes of a quad. Tile 0 holds key 0,
         * which every row sees, so m is finite from then on. */
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int nt = 0; nt < BC / 8; nt++) {
            mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
            mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float corr = exp2f(m[r] - mx[r]);
            m[r] = mx[r];
            l[r] *= corr;
#pragma unroll
            for (int nt = 0; nt < HD / 8; nt++) {
                acc[nt][2 * r] *= corr;
                acc[nt][2 * r + 1] *= corr;
            }
        }
#pragma unroll
        for (int nt = 0; nt < BC / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[nt][e] = exp2f(s[nt][e] - m[e >> 1]);
                l[e >> 1] += s[nt][e];
            }
        }
        warp_gemm_pkn<LD, BC, HD>(acc, s, cV); /* O += P V */
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    tc_store_rows<HD>(acc, 1.0f / l[0], 1.0f / l[1], sQ + w * 16 * LD, o + ((b * gcall.Tq + sg.q0) * g.H + h) * HD,
                      g.H * HD, q0 + w * 16, g.Tq);
    if (t == 0) {
        float *lse_h = lse + (b * g.H + h) * gcall.Tq + sg.q0;
#pragma unroll
        for (int r = 0; r < 2; r++)
            if (row0 + 8 * r < g.Tq) lse_h[row0 + 8 * r] = m[r] * TC_LN2 + logf(l[r]);
    }
}

/* ---- backward ---- */

/* dq [B, Tq, H, HD] contiguous. Shared: Q and dO [TC_ROWS], K and V [2][TC_TILE] rows. */
template <int HD>
__global__ void __launch_bounds__(TC_THREADS)
    att_tc_dq_kernel(const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                     const bf16 *__restrict__ gr, const float *__restrict__ lse, const float *__restrict__ D,
                     bf16 *__restrict__ dq, tc_view vq, tc_view vk, tc_view vv, tc_view vg, tc_geom gcall) {
    constexpr int LD = HD + 8, BC = TC_TILE;
    extern __shared__ __align__(16) unsigned char tc_smem[];
    tc_geom g;
    const moe_att_seg sg = tc_seg(gcall, &g);
    const int64_t q0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * TC_ROWS;
    if (q0 >= g.Tq) return;
    bf16 *sQ = reinterpret_cast<bf16 *>(tc_smem), *sG = sQ + TC_ROWS * LD, *sK = sG + TC_ROWS * LD,
         *sV = sK + 2 * BC * LD;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int64_t b = sg.b, h = blockIdx.y, kvh = h / (g.H / g.Hkv), row0 = q0 + w * 16 + (lane >> 2);
    const bf16 *kh = k + b * vk.sb + sg.k0 * vk.st + kvh * vk.sh, *vh = v + b * vv.sb + sg.k0 * vv.st + kvh * vv.sh;
    const int nkt = (int)((tc_key_end(q0, g) + BC - 1) / BC);
    const int64_t lrow = (b * g.H + h) * gcall.Tq + sg.q0; /* row 0 of the segment's head h in lse and D */

    tc_load_tile<HD, TC_ROWS>(sQ, q + b * vq.sb + sg.q0 * vq.st + h * vq.sh, vq.st, q0, g.Tq);
    tc_load_tile<HD, TC_ROWS>(sG, gr + b * vg.sb + sg.q0 * vg.st + h * vg.sh, vg.st, q0, g.Tq);
    tc_load_tile<HD, BC>(sK, kh, vk.st, 0, g.Tk);
    tc_load_tile<HD, BC>(sV, vh, vv.st, 0, g.Tk);
    cp_async_commit();

    const float sl2 = g.scale * TC_LOG2E;
    float lse2[2], Dr[2]; /* lse in log2 units and D of this thread's two rows */
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int64_t i = row0 + 8 * r;
        lse2[r] = i < g.Tq ? lse[lrow + i] * TC_LOG2E : 0.0f;
        Dr[r] = i < g.Tq ? D[lrow + i] : 0.0f;
    }
    float acc[HD / 8][4] = {};
    for (int kt = 0; kt < nkt; kt++) {
        const bf16 *cK, *cV;
        tc_next_kv<HD>(kt, nkt, sK, sV, kh, vh, vk.st, vv.st, g.Tk, &cK, &cV);

        float s[BC / 8][4] = {}, dp[BC / 8][4] = {};
        warp_gemm_nk<LD, HD, BC>(s, sQ, w * 16, cK); /* S = Q K^T */
        tc_scale_mask<BC>(s, sl2, lse2, row0, (int64_t)kt * BC, g);
        warp_gemm_nk<LD, HD, BC>(dp, sG, w * 16, cV); /* dP = dO V^T */
#pragma unroll
        for (int nt = 0; nt < BC / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) s[nt][e] = exp2f(s[nt][e]) * (dp[nt][e] - Dr[e >> 1]); /* dS / scale */
        }
        warp_gemm_pkn<LD, BC, HD>(acc, s, cK); /* dQ += dS K */
    }
    tc_store_rows<HD>(acc, g.scale, g.scale, sQ + w * 16 * LD, dq + ((b * gcall.Tq + sg.q0) * g.H + h) * HD, g.H * HD,
                      q0 + w * 16, g.Tq);
}

/* dk, dv [B, Tk, Hkv, HD] contiguous. Shared: K and V [TC_ROWS], Q and dO [2][BQ] rows,
 * then lse and D [2][BQ] f32. Query rows past Tq are zero-filled (q, dO, lse and D), so
 * their P = 1 meets zero dO and Q rows and their dS = P (0 - 0) = 0: they add nothing. */
template <int HD>
__global__ void __launch_bounds__(TC_THREADS)
    att_tc_dkv_kernel(const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                      const bf16 *__restrict__ gr, const float *__restrict__ lse, const float *__restrict__ D,
                      bf16 *__restrict__ dk, bf16 *__restrict__ dv, tc_view vq, tc_view vk, tc_view vv, tc_view vg,
                      tc_geom gcall) {
    constexpr int LD = HD + 8, BQ = tc_dkv_rows(HD);
    extern __shared__ __align__(16) unsigned char tc_smem[];
    tc_geom g;
    const moe_att_seg sg = tc_seg(gcall, &g);
    const int64_t j0 = (int64_t)blockIdx.x * TC_ROWS;
    if (j0 >= g.Tk) return;
    bf16 *sK = reinterpret_cast<bf16 *>(tc_smem), *sV = sK + TC_ROWS * LD, *sQ = sV + TC_ROWS * LD,
         *sG = sQ + 2 * BQ * LD;
    float *sL = reinterpret_cast<float *>(sG + 2 * BQ * LD), *sD = sL + 2 * BQ;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, t = lane & 3;
    const int64_t b = sg.b, kvh = blockIdx.y, group = g.H / g.Hkv, key0 = j0 + w * 16 + (lane >> 2);
    /* causal: query i sees key j iff i >= j - shift, so tiles below j0 - shift are skipped */
    const int64_t qt0 = g.causal ? max((int64_t)0, j0 - g.shift) / BQ : 0, nqt = (g.Tq + BQ - 1) / BQ - qt0;
    const int64_t nit = group * nqt; /* (query head, query tile) pairs */

    /* Query tile `it` (head kvh * group + it / nqt, rows from (qt0 + it % nqt) BQ) into buffer nb. */
    auto load_q = [&](int64_t it, int nb) {
        const int64_t h = kvh * group + it / nqt, i0 = (qt0 + it % nqt) * BQ;
        tc_load_tile<HD, BQ>(sQ + nb * BQ * LD, q + b * vq.sb + sg.q0 * vq.st + h * vq.sh, vq.st, i0, g.Tq);
        tc_load_tile<HD, BQ>(sG + nb * BQ * LD, gr + b * vg.sb + sg.q0 * vg.st + h * vg.sh, vg.st, i0, g.Tq);
        static_assert(2 * BQ <= TC_THREADS, "one thread per lse and D element");
        const int i = threadIdx.x % BQ;
        const bool ok = i0 + i < g.Tq;
        const float *src = (threadIdx.x < BQ ? lse : D) + (b * g.H + h) * gcall.Tq + sg.q0;
        if (threadIdx.x < 2 * BQ) cp_async4((threadIdx.x < BQ ? sL : sD) + nb * BQ + i, ok ? src + i0 + i : src, ok);
    };
    tc_load_tile<HD, TC_ROWS>(sK, k + b * vk.sb + sg.k0 * vk.st + kvh * vk.sh, vk.st, j0, g.Tk);
    tc_load_tile<HD, TC_ROWS>(sV, v + b * vv.sb + sg.k0 * vv.st + kvh * vv.sh, vv.st, j0, g.Tk);
    if (nit > 0) load_q(0, 0);
    cp_async_commit();

    const float sl2 = g.scale * TC_LOG2E;
    float adk[HD / 8][4] = {}, adv[HD / 8][4] = {};
    for (int64_t it = 0; it < nit; it++) {
        cp_async_wait_all();
        __syncthreads(); /* tile it landed (lse, D too); every warp is done with tile it - 1 */
        if (it + 1 < nit) {
            load_q(it + 1, (int)((it + 1) & 1));
            cp_async_commit();
        }
        const int cb = (int)(it & 1);
        const bf16 *cQ = sQ + cb * BQ * LD, *cG = sG + cb * BQ * LD;
        const float *cL = sL + cb * BQ, *cD = sD + cb * BQ;
        const int64_t i0 = (qt0 + it % nqt) * BQ;

        /* P^T = exp(S^T - lse): rows are this warp's keys, columns the tile's queries */
        float st[BQ / 8][4] = {}, dpt[BQ / 8][4] = {};
        warp_gemm_nk<LD, HD, BQ>(st, sK, w * 16, cQ);
        const bool diag = g.causal && j0 + w * 16 + 15 > i0 + g.shift; /* some key follows some query */
#pragma unroll
        for (int nt = 0; nt < BQ / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int c = nt * 8 + 2 * t + (e & 1);
                float x = fmaf(st[nt][e], sl2, -cL[c] * TC_LOG2E);
                if (diag && key0 + 8 * (e >> 1) > i0 + c + g.shift) x = -INFINITY;
                st[nt][e] = exp2f(x);
            }
        }
        warp_gemm_pkn<LD, BQ, HD>(adv, st, cG); /* dV += P^T dO */
        warp_gemm_nk<LD, HD, BQ>(dpt, sV, w * 16, cG); /* dP^T = V dO^T */
#pragma unroll
        for (int nt = 0; nt < BQ / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) st[nt][e] *= dpt[nt][e] - cD[nt * 8 + 2 * t + (e & 1)]; /* dS^T / scale */
        }
        warp_gemm_pkn<LD, BQ, HD>(adk, st, cQ); /* dK += dS^T Q */
    }
    if (nit == 0) { /* a segment without queries: its keys get zero grads once K and V landed */
        cp_async_wait_all();
        __syncthreads();
    }
    const int64_t st_rows = g.Hkv * HD, off = (b * gcall.Tk + sg.k0) * g.Hkv * HD + kvh * HD;
    tc_store_rows<HD>(adk, g.scale, g.scale, sK + w * 16 * LD, dk + off, st_rows, j0 + w * 16, g.Tk);
    tc_store_rows<HD>(adv, 1.0f, 1.0f, sV + w * 16 * LD, dv + off, st_rows, j0 + w * 16, g.Tk);
}

/* ---- host side ---- */

tc_view tc_view_of(const moe_tensor *t) { return {t->strides[0], t->strides[1], t->strides[2]}; }

tc_geom tc_geom_of(const moe_kernel_args *a) {
    const moe_attention_attrs *at = (const moe_attention_attrs *)a->attrs;
    const moe_tensor *q = a->in[0], *k = a->in[1];
    return {q->shape[1],
            k->shape[1],
            q->shape[2],
            k->shape[2],
            k->shape[1] - q->shape[1],
            at->causal,
            at->scale,
            at->seg ? (const int32_t *)at->seg->data : NULL,
            at->seg ? at->n_seg : q->shape[0]};
}

/* Grid extents: the longest segment's queries and keys, and the segment count. */
struct tc_grid {
    int64_t max_q, max_k;
    unsigned n_seg;
};
tc_grid tc_grid_of(const moe_kernel_args *a) {
    const moe_attention_attrs *at = (const moe_attention_attrs *)a->attrs;
    if (at->seg) return {at->max_q, at->max_k, (unsigned)at->n_seg};
    return {a->in[0]->shape[1], a->in[1]->shape[1], (unsigned)a->in[0]->shape[0]};
}

template <int HD> moe_status tc_forward(const moe_kernel_args *a) {
    const moe_tensor *q = a->in[0], *k = a->in[1], *v = a->in[2];
    const tc_geom g = tc_geom_of(a);
    const size_t smem = sizeof(bf16) * (TC_ROWS + 4 * TC_TILE) * (HD + 8);
    MOE_TRY(cu_allow_smem(att_tc_fwd_kernel<HD>, smem, "attention"));
    const tc_grid gr = tc_grid_of(a);
    dim3 grid((unsigned)((gr.max_q + TC_ROWS - 1) / TC_ROWS), (unsigned)g.H, gr.n_seg);
    att_tc_fwd_kernel<HD><<<grid, TC_THREADS, smem, moe_cu.stream>>>(
        (const bf16 *)q->data, (const bf16 *)k->data, (const bf16 *)v->data, (bf16 *)a->out->data,
        (float *)a->out2->data, tc_view_of(q), tc_view_of(k), tc_view_of(v), g);
    CU_LAUNCHED("attention (tensor cores)");
    return MOE_OK;
}

template <int HD> moe_status tc_backward(const moe_kernel_args *a, const float *D) {
    const moe_attention_attrs *at = (const moe_attention_attrs *)a->attrs;
    const moe_tensor *q = a->in[0], *k = a->in[1], *v = a->in[2], *gr = a->in[4];
    const bf16 *pq = (const bf16 *)q->data, *pk = (const bf16 *)k->data, *pv = (const bf16 *)v->data,
               *pg = (const bf16 *)gr->data;
    const float *pl = (const float *)a->in[5]->data;
    const tc_view vq = tc_view_of(q), vk = tc_view_of(k), vv = tc_view_of(v), vg = tc_view_of(gr);
    const tc_geom g = tc_geom_of(a);
    const tc_grid grd = tc_grid_of(a);

    const size_t smem_q = sizeof(bf16) * (2 * TC_ROWS + 4 * TC_TILE) * (HD + 8);
    MOE_TRY(cu_allow_smem(att_tc_dq_kernel<HD>, smem_q, "attention_bwd"));
    dim3 gq((unsigned)((grd.max_q + TC_ROWS - 1) / TC_ROWS), (unsigned)g.H, grd.n_seg);
    att_tc_dq_kernel<HD><<<gq, TC_THREADS, smem_q, moe_cu.stream>>>(pq, pk, pv, pg, pl, D, (bf16 *)a->out->data, vq,
                                                                    vk, vv, vg, g);
    CU_LAUNCHED("attention_bwd (tensor cores, dq)");

    constexpr int BQ = tc_dkv_rows(HD);
    const size_t smem_kv = sizeof(bf16) * (2 * TC_ROWS + 4 * BQ) * (HD + 8) + sizeof(float) * 4 * BQ;
    MOE_TRY(cu_allow_smem(att_tc_dkv_kernel<HD>, smem_kv, "attention_bwd"));
    dim3 gk((unsigned)((grd.max_k + TC_ROWS - 1) / TC_ROWS), (unsigned)g.Hkv, grd.n_seg);
    att_tc_dkv_kernel<HD><<<gk, TC_THREADS, smem_kv, moe_cu.stream>>>(pq, pk, pv, pg, pl, D, (bf16 *)at->dk->data,
                                                                      (bf16 *)at->dv->data, vq, vk, vv, vg, g);
    CU_LAUNCHED("attention_bwd (tensor cores, dk, dv)");
    return MOE_OK;
}

/* bf16 with 16-byte aligned rows: cp.async and the 16-byte stores move whole rows. */
bool tc_rows_aligned(const moe_tensor *t) {
    if (t->dtype != MOE_BF16 || t->ndim != 4 || t->strides[3] != 1 || ((uintptr_t)t->data & 15) != 0) return false;
    for (int d = 0; d < 3; d++)
        if (t->shape[d] != 1 && t->strides[d] % 8 != 0) return false;
    return true;
}

} // namespace

/* Whether the tensor-core kernels take an attention call whose q is t[0] and whose other
 * bf16 operands (read or written) are t[1..n): head dim 64 or 128, at least one query,
 * every operand bf16 with 16-byte aligned rows. */
bool att_tc_fits(const moe_tensor *const *t, int n) {
    const moe_tensor *q = t[0];
    if (q->ndim != 4 || (q->shape[3] != 64 && q->shape[3] != 128) || q->shape[1] == 0) return false;
    for (int i = 0; i < n; i++)
        if (!tc_rows_aligned(t[i])) return false;
    return true;
}

/* Forward of moe_cuda_attention (out = o, out2 = lse) on the tensor cores. */
moe_status att_tc_forward(const moe_kernel_args *a) {
    return a->in[0]->shape[3] == 64 ? tc_forward<64>(a) : tc_forward<128>(a);
}

/* Backward of moe_cuda_attention_bwd (dq = out, dk, dv in the attrs) given D = rowsum(dO * O)
 * [B, H, Tq] f32. */
moe_status att_tc_backward(const moe_kernel_args *a, const float *D) {
    return a->in[0]->shape[3] == 64 ? tc_backward<64>(a, D) : tc_backward<128>(a, D);
}
