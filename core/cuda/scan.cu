/* CUDA kernels of the gated delta-rule / gated linear-attention scan (DELTA_SCAN and
 * DELTA_SCAN_BWD; conventions in core/kernels.h at moe_scan_attrs, reference: the CPU
 * kernels in core/cpu/scan_cpu.c). Storage f32 or bf16, compute and states f32.
 *
 * With the `chunked` attribute and a chunk of 2..128 steps, forward and backward run the
 * chunked form (core/cuda/scan_chunked.cu, scan_chunked_bwd.cu); otherwise the recurrence
 * runs step by step here. The delta rule updates the columns of the
 * state S [dk, dv] independently of each other:
 *   u_j = sum_i k_i S_ij, w_j = beta (v_j - alpha u_j) (gla: v_j), S_ij = alpha S_ij + k_i w_j,
 *   o_j = sum_i q_i S_ij,
 * so one block takes one (n, h) and one slice of 32 columns (grid N H x ceil(dv / 32)):
 * lane = column, warp w = rows 32 w .. 32 w + 31, and each thread holds its 32 state
 * values in registers. Sums over rows (u, o) cross the warps through shared memory (one
 * barrier each); sums over columns (dq, dk of the backward) are warp transposes plus a
 * per-slice partial that a second kernel adds up in slice order (deterministic).
 *
 * Backward, per checkpoint chunk (the forward saved the state before every `chunk`
 * steps): pass A recomputes the chunk and keeps the state every L steps in a global
 * scratch (sub-checkpoints); then, sub-chunk by sub-chunk from the last, pass B1
 * recomputes its L states into shared memory (thread-private slots) and computes
 * dq_t = S_t g_t on the way, and pass B2 walks the L steps backwards:
 *   D = dS + q g^T, dv = beta k.D (gla: k.D), dk_i = sum_j (beta D_ij w~_j + S'_ij du_j)
 *   (gla: D_ij v_j), dalpha = sum D.S' - sum_j beta (k.D)_j u_j, dbeta = sum_j w~_j (k.D)_j,
 *   dS <- alpha D + k du^T, with S' the state before the step, w~ = v - alpha u and
 *   du = -alpha beta (k.D). */
#include "core/cuda/cuda_common.cuh"

/* core/cuda/scan_chunked.cu */
bool moe_cuda_scan_chunked_fits(const moe_scan_attrs *at);
moe_status moe_cuda_delta_scan_chunked(const moe_kernel_args *a);
/* core/cuda/scan_chunked_bwd.cu */
moe_status moe_cuda_delta_scan_bwd_chunked(const moe_kernel_args *a);

#define SCAN_FULL 0xffffffffu
/* Rows of the state per block: 8 warps of 32 (a thread holds up to 3 x 32 values in registers,
 * so a block stays at 256 threads). */
#define SCAN_MAX_DK 256

/* Opts a kernel into more than 48 KiB of dynamic shared memory when needed. */
template <class K> static moe_status scan_smem(K kernel, size_t bytes, const char *kname) {
    if (bytes > moe_cu.smem_optin)
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: %zu bytes of shared memory do not fit (%zu bytes); use smaller "
                         "heads (dk)", kname, bytes, moe_cu.smem_optin);
    if (bytes > 48 * 1024)
        CU_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes),
               "raising the shared memory of %s to %zu bytes", kname, bytes);
    return MOE_OK;
}

/* c ? a : b as one predicated select (a plain ?: on two array elements can become a
 * select of their addresses, which moves the array to local memory). */
__device__ __forceinline__ float scan_select(bool c, float a, float b) {
    float r;
    asm("{\n\t.reg .pred p;\n\tsetp.ne.u32 p, %3, 0;\n\tselp.f32 %0, %1, %2, p;\n\t}"
        : "=f"(r) : "f"(a), "f"(b), "r"((unsigned)c));
    return r;
}

/* One halving stage of the transpose below: lanes with bit OFF clear keep rows 0..OFF-1
 * of the current set, the others rows OFF..2 OFF-1 (moved down), each adding the
 * partner's copy of the rows it keeps. */
template <int OFF> __device__ __forceinline__ void scan_transpose_stage(float (&x)[32], bool up) {
#pragma unroll
    for (int j = 0; j < OFF; j++) {
        const float lo = x[j], hi = x[j + OFF];
        const float send = scan_select(up, lo, hi), keep = scan_select(up, hi, lo);
        x[j] = keep + __shfl_xor_sync(SCAN_FULL, send, OFF);
    }
}

/* x[r] summed over the warp's lanes for every r, returned in lane r (31 shuffles). */
__device__ __forceinline__ float scan_warp_transpose_sum(float (&x)[32], int lane) {
    scan_transpose_stage<16>(x, lane & 16);
    scan_transpose_stage<8>(x, lane & 8);
    scan_transpose_stage<4>(x, lane & 4);
    scan_transpose_stage<2>(x, lane & 2);
    scan_transpose_stage<1>(x, lane & 1);
    return x[0];
}

/* The per-step inputs of one thread: k and q of row 32 w + lane (0 past dk), v and g of
 * its column (0 past dv), alpha and beta. */
struct scan_step {
    float kr, qr, vc, gc, a, b;
};
template <class T>
__device__ __forceinline__ scan_step scan_load(const T *q, const T *k, const T *v, const T *beta, const T *alpha,
                                               const T *g, int64_t e, int64_t dk, int64_t dv, int64_t row, int64_t col) {
    scan_step s;
    s.kr = row < dk ? ldf(k + e * dk + row) : 0.0f;
    s.qr = row < dk ? ldf(q + e * dk + row) : 0.0f;
    s.vc = col < dv ? ldf(v + e * dv + col) : 0.0f;
    s.gc = g && col < dv ? ldf(g + e * dv + col) : 0.0f;
    s.a = ldf(alpha + e);
    s.b = ldf(beta + e);
    return s;
}

/* u_j = sum over all rows of k_i S_ij: the warp's partial, then the warps' partials added
 * through red (buffer buf of two: one barrier). */
__device__ __forceinline__ float scan_rows_sum(float part, float *red, int buf, int w, int lane, int RG) {
    red[(buf * RG + w) * 32 + lane] = part;
    __syncthreads();
    float s = 0;
    for (int r = 0; r < RG; r++) s += red[(buf * RG + r) * 32 + lane];
    return s;
}

template <class T>
__global__ void __launch_bounds__(256, 2) scan_fwd_kernel(const T *q, const T *k, const T *v, const T *beta,
                                                        const T *alpha, const float *s0, T *o, float *s_out,
                                                        float *ckpt, int64_t Tn, int64_t H, int64_t dk, int64_t dv,
                                                        int64_t chunk, bool delta) {
    extern __shared__ float red[]; /* [2][RG][32] */
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, RG = blockDim.x >> 5;
    const int64_t p = blockIdx.x, n = p / H, h = p % H, SS = dk * dv, nc = (Tn + chunk - 1) / chunk;
    const int64_t col = (int64_t)blockIdx.y * 32 + lane, row0 = 32 * (int64_t)w;
    const bool cv = col < dv;
    float s[32];
#pragma unroll
    for (int ii = 0; ii < 32; ii++)
        s[ii] = s0 && cv && row0 + ii < dk ? s0[p * SS + (row0 + ii) * dv + col] : 0.0f;
    /* each step's inputs are loaded one step ahead, so their latency hides behind a step */
    scan_step nx = scan_load(q, k, v, beta, alpha, (const T *)NULL, n * Tn * H + h, dk, dv, row0 + lane, col);
    for (int64_t t = 0; t < Tn; t++) {
        const int64_t e = (n * Tn + t) * H + h;
        const scan_step x = nx;
        if (t + 1 < Tn) nx = scan_load(q, k, v, beta, alpha, (const T *)NULL, e + H, dk, dv, row0 + lane, col);
        if (ckpt && t % chunk == 0 && cv) {
            float *c = ckpt + (p * nc + t / chunk) * SS;
#pragma unroll
            for (int ii = 0; ii < 32; ii++)
                if (row0 + ii < dk) c[(row0 + ii) * dv + col] = s[ii];
        }
        float wv = x.vc;
        if (delta) {
            float up = 0;
#pragma unroll
            for (int ii = 0; ii < 32; ii++) up += __shfl_sync(SCAN_FULL, x.kr, ii) * s[ii];
            wv = x.b * (x.vc - x.a * scan_rows_sum(up, red, 0, w, lane, RG));
        }
        float op = 0;
#pragma unroll
        for (int ii = 0; ii < 32; ii++) {
            s[ii] = x.a * s[ii] + __shfl_sync(SCAN_FULL, x.kr, ii) * wv;
            op += __shfl_sync(SCAN_FULL, x.qr, ii) * s[ii];
        }
        /* gla has no barrier before this one: alternate buffers so a warp still reading
         * step t's sums is not overwritten by step t + 1 */
        const float oc = scan_rows_sum(op, red, delta ? 1 : (int)(t & 1), w, lane, RG);
        if (w == 0 && cv) stf(o + e * dv + col, oc);
    }
    if (s_out && cv)
#pragma unroll
        for (int ii = 0; ii < 32; ii++)
            if (row0 + ii < dk) s_out[p * SS + (row0 + ii) * dv + col] = s[ii];
}

/* Warps for dk rows (32 rows each). */
static int scan_warps(int64_t dk) { return (int)((dk + 31) / 32); }

extern "C" moe_status moe_cuda_delta_scan(const moe_kernel_args *a) {
    const moe_scan_attrs *at = (const moe_scan_attrs *)a->attrs;
    const moe_tensor *q = a->in[0];
    const int64_t N = q->shape[0], Tn = q->shape[1], H = q->shape[2], dk = q->shape[3], dv = a->in[2]->shape[3];
    if (dk > SCAN_MAX_DK || (dv + 31) / 32 > 65535)
        return moe_error(MOE_ERR_UNSUPPORTED, "delta_scan: key width %lld (at most %d on cuda: use more heads) or value "
                         "width %lld too large", (long long)dk, SCAN_MAX_DK, (long long)dv);
    if (moe_cuda_scan_chunked_fits(at)) return moe_cuda_delta_scan_chunked(a);
    const int RG = scan_warps(dk);
    const size_t smem = sizeof(float) * 2 * 32 * (size_t)RG;
    const float *s0 = a->in[5] ? (const float *)a->in[5]->data : NULL;
    float *s_out = a->out2 ? (float *)a->out2->data : NULL, *ckpt = at->ckpt ? (float *)at->ckpt->data : NULL;
    const dim3 grid((unsigned)(N * H), (unsigned)((dv + 31) / 32));
    CU_FLOAT_DISPATCH(q->dtype, "delta_scan", {
        scan_fwd_kernel<T><<<grid, 32 * RG, smem, moe_cu.stream>>>(
            (const T *)q->data, (const T *)a->in[1]->data, (const T *)a->in[2]->data, (const T *)a->in[3]->data,
            (const T *)a->in[4]->data, s0, (T *)a->out->data, s_out, ckpt, Tn, H, dk, dv, at->chunk, at->delta);
        CU_LAUNCHED("delta_scan");
    });
    return MOE_OK;
}

/* Shared memory of the backward, in floats: L state slots [L][32][RG][32], u [L][RG][32],
 * the row-sum buffers [2][RG][32] and the per-warp dalpha partials [2][32]. */
static size_t scan_bwd_smem_floats(int L, int RG) {
    return (size_t)L * 32 * RG * 32 + (size_t)L * RG * 32 + 2 * (size_t)RG * 32 + 64;
}

template <class T>
__global__ void __launch_bounds__(256, 2) scan_bwd_kernel(const T *q, const T *k, const T *v, const T *beta,
                                                        const T *alpha, const T *g, const float *ckpt, float *subck,
                                                        T *dv_out, float *dqp, float *dkp, float *dap, float *dbp,
                                                        float *ds0, int64_t Tn, int64_t H, int64_t dk, int64_t dv,
                                                        int64_t chunk, int L, bool delta) {
    extern __shared__ float sm[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, RG = blockDim.x >> 5;
    const int64_t p = blockIdx.x, n = p / H, h = p % H, SS = dk * dv, nc = (Tn + chunk - 1) / chunk;
    const int64_t slice = blockIdx.y, col = slice * 32 + lane, row0 = 32 * (int64_t)w, row = row0 + lane;
    const int64_t NTH = (int64_t)gridDim.x * Tn, nsub = (chunk + L - 1) / L, slot = (int64_t)RG * 32 * 32;
    const bool cv = col < dv;
    float *sst = sm, *usm = sst + (size_t)L * 32 * RG * 32, *red = usm + (size_t)L * RG * 32, *redpa = red + 2 * RG * 32;
    float *mysub = subck + ((int64_t)blockIdx.x * gridDim.y + slice) * nsub * slot;
    float *dq_part = dqp + slice * NTH * dk, *dk_part = dkp + slice * NTH * dk;
    float dS[32], s[32];
#pragma unroll
    for (int ii = 0; ii < 32; ii++) dS[ii] = 0;
    for (int64_t c = nc - 1; c >= 0; c--) {
        const int64_t t0 = c * chunk, cn = Tn - t0 < chunk ? Tn - t0 : chunk;
        /* pass A: the chunk forward, keeping the state before every L-th step */
#pragma unroll
        for (int ii = 0; ii < 32; ii++)
            s[ii] = cv && row0 + ii < dk ? ckpt[(p * nc + c) * SS + (row0 + ii) * dv + col] : 0.0f;
        __syncthreads();
        const int64_t e0 = (n * Tn + t0) * H + h; /* step t0 + r is e0 + r H */
        scan_step nx = scan_load(q, k, v, beta, alpha, (const T *)NULL, e0, dk, dv, row, col);
        for (int64_t r = 0; r < cn; r++) {
            if (r % L == 0)
#pragma unroll
                for (int ii = 0; ii < 32; ii++) mysub[(r / L) * slot + (ii * RG + w) * 32 + lane] = s[ii];
            const scan_step x = nx;
            if (r + 1 < cn) nx = scan_load(q, k, v, beta, alpha, (const T *)NULL, e0 + (r + 1) * H, dk, dv, row, col);
            float wv = x.vc;
            if (delta) {
                float up = 0;
#pragma unroll
                for (int ii = 0; ii < 32; ii++) up += __shfl_sync(SCAN_FULL, x.kr, ii) * s[ii];
                wv = x.b * (x.vc - x.a * scan_rows_sum(up, red, (int)(r & 1), w, lane, RG));
            }
#pragma unroll
            for (int ii = 0; ii < 32; ii++) s[ii] = x.a * s[ii] + __shfl_sync(SCAN_FULL, x.kr, ii) * wv;
        }
        for (int64_t j = (cn - 1) / L; j >= 0; j--) {
            const int64_t r0 = j * L, rn = cn - r0 < L ? cn - r0 : L;
            /* pass B1: the sub-chunk's states into the slots, u kept, dq_t = S_t g_t */
#pragma unroll
            for (int ii = 0; ii < 32; ii++) s[ii] = mysub[j * slot + (ii * RG + w) * 32 + lane];
            __syncthreads();
            const int64_t es = e0 + r0 * H; /* sub-chunk step m is es + m H */
            nx = scan_load(q, k, v, beta, alpha, g, es, dk, dv, row, col);
            for (int64_t m = 0; m < rn; m++) {
                const int64_t e = es + m * H;
                const scan_step x = nx;
                if (m + 1 < rn) nx = scan_load(q, k, v, beta, alpha, g, e + H, dk, dv, row, col);
#pragma unroll
                for (int ii = 0; ii < 32; ii++) sst[m * slot + (ii * RG + w) * 32 + lane] = s[ii];
                float u = 0, wv = x.vc;
                if (delta) {
                    float up = 0;
#pragma unroll
                    for (int ii = 0; ii < 32; ii++) up += __shfl_sync(SCAN_FULL, x.kr, ii) * s[ii];
                    u = scan_rows_sum(up, red, (int)(m & 1), w, lane, RG);
                    wv = x.b * (x.vc - x.a * u);
                }
                usm[(m * RG + w) * 32 + lane] = u;
                float t[32];
#pragma unroll
                for (int ii = 0; ii < 32; ii++) {
                    s[ii] = x.a * s[ii] + __shfl_sync(SCAN_FULL, x.kr, ii) * wv;
                    t[ii] = s[ii] * x.gc;
                }
                const float dq = scan_warp_transpose_sum(t, lane);
                if (row < dk) dq_part[e * dk + row] = dq;
            }
            __syncthreads();
            /* pass B2: the sub-chunk's steps backwards */
            nx = scan_load(q, k, v, beta, alpha, g, es + (rn - 1) * H, dk, dv, row, col);
            for (int64_t m = rn - 1; m >= 0; m--) {
                const int64_t e = es + m * H;
                const scan_step x = nx;
                if (m > 0) nx = scan_load(q, k, v, beta, alpha, g, e - H, dk, dv, row, col);
                const float *Sp = sst + m * slot + w * 32 + lane;
                float kd = 0, pa = 0;
#pragma unroll
                for (int ii = 0; ii < 32; ii++) {
                    const float d = dS[ii] + __shfl_sync(SCAN_FULL, x.qr, ii) * x.gc;
                    dS[ii] = d;
                    kd += __shfl_sync(SCAN_FULL, x.kr, ii) * d;
                    pa += d * Sp[ii * RG * 32];
                }
                const int buf = (int)(m & 1);
                pa = cu_warp_sum(pa);
                if (lane == 0) redpa[buf * 32 + w] = pa;
                const float kD = scan_rows_sum(kd, red, buf, w, lane, RG); /* its barrier covers redpa */
                const float u = usm[(m * RG + w) * 32 + lane];
                float wt = x.vc, dw = kD, du = 0, pac = 0, pbc = 0;
                if (delta) {
                    wt = x.vc - x.a * u;
                    dw = x.b * kD;
                    du = -x.a * dw;
                    pac = -dw * u;
                    pbc = wt * kD;
                }
                if (w == 0) {
                    if (cv) stf(dv_out + e * dv + col, dw);
                    float sa = cu_warp_sum(pac), sb = cu_warp_sum(pbc);
                    if (lane == 0) {
                        for (int r = 0; r < RG; r++) sa += redpa[buf * 32 + r];
                        dap[slice * NTH + e] = sa;
                        dbp[slice * NTH + e] = sb;
                    }
                }
                float t[32];
#pragma unroll
                for (int ii = 0; ii < 32; ii++) {
                    const float kk = __shfl_sync(SCAN_FULL, x.kr, ii);
                    t[ii] = delta ? x.b * dS[ii] * wt + Sp[ii * RG * 32] * du : dS[ii] * x.vc;
                    dS[ii] = x.a * dS[ii] + kk * du;
                }
                const float dkr = scan_warp_transpose_sum(t, lane);
                if (row < dk) dk_part[e * dk + row] = dkr;
            }
            __syncthreads();
        }
    }
    if (ds0 && cv)
#pragma unroll
        for (int ii = 0; ii < 32; ii++)
            if (row0 + ii < dk) ds0[p * SS + (row0 + ii) * dv + col] = dS[ii];
}

/* The slices' partials added in slice order: dq, dk over [N T H dk], dalpha, dbeta over
 * [N T H] (dbeta's partials are 0 for gla). */
template <class T>
__global__ void scan_bwd_finish_kernel(const float *dqp, const float *dkp, const float *dap, const float *dbp,
                                       int64_t ns, int64_t nq, int64_t na, T *dq, T *dk, T *dalpha, T *dbeta) {
    CU_GRID_LOOP(i, nq) {
        float sq = 0, sk = 0;
        for (int64_t s = 0; s < ns; s++) {
            sq += dqp[s * nq + i];
            sk += dkp[s * nq + i];
        }
        stf(dq + i, sq);
        stf(dk + i, sk);
        if (i < na) {
            float sa = 0, sb = 0;
            for (int64_t s = 0; s < ns; s++) {
                sa += dap[s * na + i];
                sb += dbp[s * na + i];
            }
            stf(dalpha + i, sa);
            stf(dbeta + i, sb);
        }
    }
}

extern "C" moe_status moe_cuda_delta_scan_bwd(const moe_kernel_args *a) {
    const moe_scan_attrs *at = (const moe_scan_attrs *)a->attrs;
    const moe_tensor *q = a->in[0];
    const int64_t N = q->shape[0], Tn = q->shape[1], H = q->shape[2], dk = q->shape[3], dv = a->in[2]->shape[3];
    if (dk > SCAN_MAX_DK || (dv + 31) / 32 > 65535)
        return moe_error(MOE_ERR_UNSUPPORTED, "delta_scan_bwd: key width %lld (at most %d on cuda: use more heads) or "
                         "value width %lld too large", (long long)dk, SCAN_MAX_DK, (long long)dv);
    if (moe_cuda_scan_chunked_fits(at)) return moe_cuda_delta_scan_bwd_chunked(a);
    const int RG = scan_warps(dk);
    /* sub-chunk length: as many state slots as fit in 64 KiB (at least one) */
    int64_t L = (64 * 1024) / ((int64_t)RG * 32 * 32 * (int64_t)sizeof(float));
    if (L < 1) L = 1;
    if (L > at->chunk) L = at->chunk;
    const int64_t ns = (dv + 31) / 32, nsub = (at->chunk + L - 1) / L, NTH = N * Tn * H;
    const size_t smem = sizeof(float) * scan_bwd_smem_floats((int)L, RG);
    float *subck = (float *)cu_scratch(sizeof(float) * (size_t)(N * H * ns * nsub * RG * 32 * 32));
    float *part = (float *)cu_scratch(sizeof(float) * (size_t)(ns * NTH * (2 * dk + 2)));
    if (!subck || !part) return moe_last_status();
    float *dqp = part, *dkp = dqp + ns * NTH * dk, *dap = dkp + ns * NTH * dk, *dbp = dap + ns * NTH;
    float *ds0 = at->dstate0 ? (float *)at->dstate0->data : NULL;
    const dim3 grid((unsigned)(N * H), (unsigned)ns);
    CU_FLOAT_DISPATCH(q->dtype, "delta_scan_bwd", {
        MOE_TRY(scan_smem(scan_bwd_kernel<T>, smem, "delta_scan_bwd"));
        scan_bwd_kernel<T><<<grid, 32 * RG, smem, moe_cu.stream>>>(
            (const T *)q->data, (const T *)a->in[1]->data, (const T *)a->in[2]->data, (const T *)a->in[3]->data,
            (const T *)a->in[4]->data, (const T *)a->in[5]->data, (const float *)at->ckpt->data, subck,
            (T *)at->dv->data, dqp, dkp, dap, dbp, ds0, Tn, H, dk, dv, at->chunk, (int)L, at->delta);
        CU_LAUNCHED("delta_scan_bwd");
        scan_bwd_finish_kernel<T><<<cu_blocks(NTH * dk), CU_THREADS, 0, moe_cu.stream>>>(
            dqp, dkp, dap, dbp, ns, NTH * dk, NTH, (T *)a->out->data, (T *)at->dk->data, (T *)at->dalpha->data,
            (T *)at->dbeta->data);
        CU_LAUNCHED("delta_scan_bwd (slice sums)");
    });
    return MOE_OK;
}
