/* The chunked (WY) form of the DELTA_SCAN backward on CUDA, the reverse of
 * core/cuda/scan_chunked.cu (notation of its file comment; per chunk, S0 is the state before
 * it, the forward's checkpoint, and dS1 the grad of the state after it). With Z = V - Gamma K S0
 * and W^ = diag(beta) Z (so W = X W^; gla: W = V):
 *   dW  = M^T dO + Kr dS1,  dW^ = X^T dW,  dZ = diag(beta) dW^                (delta)
 *   dS0 = gamma_{C-1} dS1 + (Gamma Q)^T dO - (Gamma K)^T dZ                   (gla: no dZ)
 *   dQ  = Gamma dO S0^T + dQK K,   dQK = R o tril(dO W^T)
 *   dK  = dQK^T Q + diag(R[C-1][.]) W dS1^T + (dG + dG^T) K - Gamma dZ S0^T,
 *         dG = dL o diag(beta) R with dL = -tril(dW^ W^T, -1)
 *   dV  = dZ (gla: dW),  dbeta_r = dW^_r . Z_r + sum_s dL[r][s] R[r][s] (k_r . k_s)
 * and for alpha, from dR (the grads of the entries R[r][s], s < r, gathered from M, Kr and L)
 * and dgamma, division-free (R[r][s] = R[r][j] alpha_j R[j-1][s] for s < j <= r):
 *   dalpha_j = sum_{r >= j} R[r][j] (sum_{s < j} dR[r][s] R[j-1][s] + dgamma_r gamma_{j-1}).
 * Only the dS recurrence runs chunk by chunk (three GEMMs batched over the pairs per chunk);
 * everything else is batched over all chunks: GEMMs, one block per chunk for the triangular
 * solve (scan_bwd_prep_kernel) and one for the small per-chunk grads (scan_bwd_grad_kernel).
 * Checked against the CPU's step-by-step backward by the op cases (tests/cases/cases_scan.c). */
#include "core/cuda/scan_chunked.cuh"

/* Scratch, f32, chunk-major: [B, C, dk] q, k, Kgb = diag(beta gamma) K, Kr, dKr (then dK),
 * dOS = dO S0^T (first Gamma Q, then dQ), dZS = dW^ S0^T; [B, C, dv] Z (first V), W, dO, dW
 * (first K S0), dW^ (first W^, then dV); [B, C, C] Q K^T, M o Q K^T (then dQK), K K^T (then
 * dG + dG^T), X (then dL); gamma [B, C]; [B, dk, dv] A2 = (Gamma Q)^T dO (then dS0) and dS1. */
struct scan_bwd_bufs {
    float *q, *k, *kgb, *kr, *dkr, *dos, *dzs, *z, *w, *dO, *dw, *dwh, *qk, *mq, *kk, *x, *gam, *a2, *ds1;
};

static bool scan_bwd_bufs_alloc(scan_bwd_bufs *f, int64_t B, int64_t C, int64_t dk, int64_t dv) {
    const int64_t BK = B * C * dk, BV = B * C * dv, BM = B * C * C, BS = B * dk * dv;
    float *m = (float *)cu_scratch(sizeof(float) * (size_t)(7 * BK + 5 * BV + 4 * BM + B * C + 2 * BS));
    if (!m) return false;
    float **k_bufs[7] = {&f->q, &f->k, &f->kgb, &f->kr, &f->dkr, &f->dos, &f->dzs};
    float **v_bufs[5] = {&f->z, &f->w, &f->dO, &f->dw, &f->dwh};
    float **m_bufs[4] = {&f->qk, &f->mq, &f->kk, &f->x};
    for (int i = 0; i < 7; i++) *k_bufs[i] = m, m += BK;
    for (int i = 0; i < 5; i++) *v_bufs[i] = m, m += BV;
    for (int i = 0; i < 4; i++) *m_bufs[i] = m, m += BM;
    f->gam = m, m += B * C;
    f->a2 = m, f->ds1 = m + BS;
    return true;
}

/* Geometry of one call. */
struct scan_bwd_dims {
    int64_t Tn, H, C, nc, B, P, dk, dv;
    bool delta;
};

/* One block per chunk: M o Q K^T, Gamma Q, Kr = diag(R[C-1][.]) K, gamma; delta also
 * Z = V - Gamma (K S0) (ks = K S0), W^ = diag(beta) Z, Kgb and X = (I + L)^{-1}. Shared
 * memory: R and X [C][C + 1], alpha and beta. */
template <class T>
__global__ void scan_bwd_prep_kernel(const T *alpha, const T *beta, scan_bwd_bufs f, const float *ks,
                                     scan_bwd_dims d) {
    extern __shared__ float sm[];
    const int64_t C = d.C, ld = C + 1, b = blockIdx.x, CC = C * C, dk = d.dk, dv = d.dv;
    float *R = sm, *X = sm + C * ld, *av = X + C * ld, *bv = av + C, *gm = f.gam + b * C;
    scan_chunk_load_ab(alpha, beta, av, bv, b, C, d.nc, d.Tn, d.H);
    __syncthreads();
    scan_chunk_decays(av, R, ld, gm, C);
    __syncthreads();
    for (int64_t i = threadIdx.x; i < CC; i += blockDim.x) {
        const int64_t r = i / C, s = i % C;
        f.mq[b * CC + i] = s <= r ? R[r * ld + s] * f.qk[b * CC + i] : 0.0f;
    }
    for (int64_t i = threadIdx.x, o = b * C * dk; i < C * dk; i += blockDim.x) {
        const int64_t r = i / dk;
        f.dos[o + i] = gm[r] * f.q[o + i];
        f.kr[o + i] = R[(C - 1) * ld + r] * f.k[o + i];
        if (d.delta) f.kgb[o + i] = bv[r] * gm[r] * f.k[o + i];
    }
    if (!d.delta) return;
    for (int64_t i = threadIdx.x, o = b * C * dv; i < C * dv; i += blockDim.x) {
        const int64_t r = i / dv;
        const float z = f.z[o + i] - gm[r] * ks[o + i];
        f.z[o + i] = z;
        f.dwh[o + i] = bv[r] * z;
    }
    __syncthreads(); /* R's last row is read above before it turns into L */
    for (int64_t i = threadIdx.x; i < CC; i += blockDim.x) {
        const int64_t r = i / C, s = i % C;
        if (s < r) R[r * ld + s] *= bv[r] * f.kk[b * CC + i];
    }
    __syncthreads();
    scan_chunk_unit_lower_inverse(R, X, ld, C);
    __syncthreads();
    for (int64_t i = threadIdx.x; i < CC; i += blockDim.x) f.x[b * CC + i] = X[(i / C) * ld + i % C];
}

/* dst = gamma_{C-1} dS1 + A2 of chunk c of every pair (the state grad before the chunk);
 * dst's pairs lie dst_stride apart. */
static __global__ void scan_bwd_carry_kernel(const float *ds1, const float *a2, const float *gam, float *dst,
                                             int64_t dst_stride, int64_t SS, int64_t C, int64_t nc, int64_t c,
                                             int64_t n_all) {
    CU_GRID_LOOP(i, n_all) {
        const int64_t p = i / SS, e = i % SS, src = (p * nc + c) * SS + e;
        dst[p * dst_stride + e] = gam[(p * nc + c) * C + C - 1] * ds1[src] + a2[src];
    }
}

/* The chunks from the last: dW += Kr dS1; delta: dW^ = X^T dW, A2 -= Kgb^T dW^; then the
 * grad of the state before the chunk is dS1 of the chunk before (or dstate0). */
static moe_status scan_bwd_walk(const scan_bwd_bufs *f, const scan_bwd_dims *d, float *dstate0,
                                cublasComputeType_t ct) {
    const int64_t C = d->C, nc = d->nc, P = d->P, dk = d->dk, dv = d->dv, SS = dk * dv;
    const int64_t sK = nc * C * dk, sV = nc * C * dv, sM = nc * C * C, sS = nc * SS;
    CU_TRY(cudaMemset2DAsync(f->ds1 + (nc - 1) * SS, sizeof(float) * sS, 0, sizeof(float) * SS, P, moe_cu.stream),
           "delta_scan_bwd (chunked): the last chunk's state grad");
    for (int64_t c = nc - 1; c >= 0; c--) {
        float *dw = f->dw + c * C * dv, *dwh = f->dwh + c * C * dv, *ds1 = f->ds1 + c * SS, *a2 = f->a2 + c * SS;
        MOE_TRY(rm_gemm(false, false, C, dv, dk, 1.0f, f->kr + c * C * dk, dk, sK, ds1, dv, sS, 1.0f, dw, dv, sV, P,
                        ct));
        if (d->delta) {
            MOE_TRY(rm_gemm(true, false, C, dv, C, 1.0f, f->x + c * C * C, C, sM, dw, dv, sV, 0.0f, dwh, dv, sV, P, ct));
            MOE_TRY(rm_gemm(true, false, dk, dv, C, -1.0f, f->kgb + c * C * dk, dk, sK, dwh, dv, sV, 1.0f, a2, dv, sS,
                            P, ct));
        }
        float *dst = c > 0 ? f->ds1 + (c - 1) * SS : dstate0;
        if (!dst) continue;
        scan_bwd_carry_kernel<<<cu_blocks(P * SS), CU_THREADS, 0, moe_cu.stream>>>(
            f->ds1, f->a2, f->gam, dst, c > 0 ? sS : SS, SS, C, nc, c, P * SS);
        CU_LAUNCHED("delta_scan_bwd (chunked) carry");
    }
    return MOE_OK;
}

/* Per-row dot products of chunk b by warps: dgam_r = q_r . dOS_r - beta_r k_r . dZS_r,
 * kd_r = k_r . dKr_r, db_r = dW^_r . Z_r (delta); then dgam_{C-1} += <S0, dS1>. */
__device__ void scan_bwd_row_dots(const scan_bwd_bufs &f, const scan_bwd_dims &d, const float *S0, const float *ds1,
                                  const float *bv, float *dg, float *kd, float *db, float *red, int64_t b) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int64_t C = d.C, dk = d.dk, dv = d.dv;
    for (int64_t r = warp; r < C; r += nw) {
        const int64_t ok = (b * C + r) * dk, ov = (b * C + r) * dv;
        float g = 0, kk = 0, bb = 0;
        for (int64_t i = lane; i < dk; i += 32) {
            g += f.q[ok + i] * f.dos[ok + i] - (d.delta ? bv[r] * f.k[ok + i] * f.dzs[ok + i] : 0.0f);
            kk += f.k[ok + i] * f.dkr[ok + i];
        }
        if (d.delta)
            for (int64_t j = lane; j < dv; j += 32) bb += f.dwh[ov + j] * f.z[ov + j];
        g = cu_warp_sum(g), kk = cu_warp_sum(kk), bb = cu_warp_sum(bb);
        if (lane == 0) dg[r] = g, kd[r] = kk, db[r] = bb;
    }
    float s = 0;
    for (int64_t i = threadIdx.x; i < dk * dv; i += blockDim.x) s += S0[i] * ds1[i];
    s = cu_block_sum(s, red);
    if (threadIdx.x == 0) dg[C - 1] += s;
}

/* dR (strictly lower, shared memory), dQK = R o dMq in place of dMq, and the L part of db:
 * one warp per row. */
__device__ void scan_bwd_dr(const scan_bwd_bufs &f, const scan_bwd_dims &d, const float *R, float *dR,
                            const float *bv, const float *kd, float *db, int64_t b) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int64_t C = d.C, ld = C + 1, CC = C * C;
    for (int64_t r = warp; r < C; r += nw) {
        float bl = 0;
        for (int64_t s = lane; s < C; s += 32) {
            const int64_t i = b * CC + r * C + s;
            const float dm = f.mq[i], rr = R[r * ld + s];
            float g = 0;
            if (s < r) {
                g = f.qk[i] * dm + (r == C - 1 ? kd[s] : 0.0f);
                if (d.delta) {
                    g += f.x[i] * bv[r] * f.kk[i];
                    bl += f.x[i] * rr * f.kk[i];
                }
            }
            dR[r * ld + s] = g;
            f.mq[i] = s <= r ? rr * dm : 0.0f;
        }
        bl = cu_warp_sum(bl);
        if (lane == 0) db[r] += bl;
    }
}

/* One block per chunk: dbeta, dalpha (stored), dQK, dG + dG^T (in place of K K^T), and the
 * row-scaled parts of dQ (dOS), dK (dKr) and dV (dW^) that the GEMMs then complete. Shared
 * memory: R and dR [C][C + 1], alpha, beta, dgamma, kd, db, 32 for a reduction. */
template <class T>
__global__ void scan_bwd_grad_kernel(const T *alpha, const T *beta, T *dalpha, T *dbeta, scan_bwd_bufs f,
                                     const float *ckpt, scan_bwd_dims d) {
    extern __shared__ float sm[];
    const int64_t C = d.C, ld = C + 1, b = blockIdx.x, CC = C * C, dk = d.dk, dv = d.dv, SS = dk * dv;
    float *R = sm, *dR = R + C * ld, *av = dR + C * ld, *bv = av + C, *dg = bv + C, *kd = dg + C, *db = kd + C;
    float *red = db + C, *gm = f.gam + b * C;
    scan_chunk_load_ab(alpha, beta, av, bv, b, C, d.nc, d.Tn, d.H);
    __syncthreads();
    scan_chunk_decays(av, R, ld, gm, C); /* R again; gamma rewritten with the values the prep block left */
    __syncthreads();
    scan_bwd_row_dots(f, d, ckpt + b * SS, f.ds1 + b * SS, bv, dg, kd, db, red, b);
    __syncthreads();
    scan_bwd_dr(f, d, R, dR, bv, kd, db, b);
    __syncthreads();
    if (d.delta)
        for (int64_t i = threadIdx.x; i < CC; i += blockDim.x) { /* dG[r][s] + dG[s][r], dG = dL o beta_r R */
            const int64_t r = i / C, s = i % C, j = s * C + r;
            const float g = s < r ? f.x[b * CC + i] * bv[r] * R[r * ld + s]
                                  : (r < s ? f.x[b * CC + j] * bv[s] * R[s * ld + r] : 0.0f);
            f.kk[b * CC + i] = g;
        }
    const int64_t c = b % d.nc, p = b / d.nc;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
        const int64_t t = c * C + j;
        if (t >= d.Tn) continue;
        float da = 0;
        for (int64_t r = j; r < C; r++) {
            float e = dg[r] * (j > 0 ? gm[j - 1] : 1.0f);
            for (int64_t s = 0; s < j; s++) e += dR[r * ld + s] * R[(j - 1) * ld + s];
            da += R[r * ld + j] * e;
        }
        const int64_t o = ((p / d.H) * d.Tn + t) * d.H + p % d.H;
        stf(dalpha + o, da);
        stf(dbeta + o, d.delta ? db[j] : 0.0f);
    }
    for (int64_t i = threadIdx.x, o = b * C * dk; i < C * dk; i += blockDim.x) {
        const int64_t r = i / dk;
        f.dos[o + i] *= gm[r];
        f.dkr[o + i] = R[(C - 1) * ld + r] * f.dkr[o + i] - (d.delta ? gm[r] * bv[r] * f.dzs[o + i] : 0.0f);
    }
    if (d.delta)
        for (int64_t i = threadIdx.x, o = b * C * dv; i < C * dv; i += blockDim.x) f.dwh[o + i] *= bv[i / dv];
}

/* Before the walk: Q K^T, K K^T and K S0 (delta), the prep block, W = X W^ (delta), and the
 * walk's constant terms dW = M^T dO and A2 = (Gamma Q)^T dO. */
static moe_status scan_bwd_before_walk(const moe_kernel_args *a, const scan_bwd_bufs &f, const scan_bwd_dims &d,
                                       const float *ckpt, cublasComputeType_t ct) {
    const int64_t C = d.C, B = d.B, dk = d.dk, dv = d.dv, CC = C * C, SS = dk * dv;
    const size_t smem = sizeof(float) * (size_t)(2 * C * (C + 1) + 2 * C);
    MOE_TRY(rm_gemm(false, true, C, C, dk, 1.0f, f.q, dk, C * dk, f.k, dk, C * dk, 0.0f, f.qk, C, CC, B, ct));
    if (d.delta) {
        MOE_TRY(rm_gemm(false, true, C, C, dk, 1.0f, f.k, dk, C * dk, f.k, dk, C * dk, 0.0f, f.kk, C, CC, B, ct));
        MOE_TRY(rm_gemm(false, false, C, dv, dk, 1.0f, f.k, dk, C * dk, ckpt, dv, SS, 0.0f, f.dw, dv, C * dv, B, ct));
    }
    CU_FLOAT_DISPATCH(a->in[0]->dtype, "delta_scan_bwd", {
        MOE_TRY(cu_allow_smem(scan_bwd_prep_kernel<T>, smem, "delta_scan_bwd (chunked)"));
        scan_bwd_prep_kernel<T><<<(unsigned)B, CU_THREADS, smem, moe_cu.stream>>>(
            (const T *)a->in[4]->data, (const T *)a->in[3]->data, f, f.dw, d);
        CU_LAUNCHED("delta_scan_bwd (chunked) prep");
    });
    if (d.delta)
        MOE_TRY(rm_gemm(false, false, C, dv, C, 1.0f, f.x, C, CC, f.dwh, dv, C * dv, 0.0f, f.w, dv, C * dv, B, ct));
    MOE_TRY(rm_gemm(true, false, C, dv, C, 1.0f, f.mq, C, CC, f.dO, dv, C * dv, 0.0f, f.dw, dv, C * dv, B, ct));
    MOE_TRY(rm_gemm(true, false, dk, dv, C, 1.0f, f.dos, dk, C * dk, f.dO, dv, C * dv, 0.0f, f.a2, dv, SS, B, ct));
    return MOE_OK;
}

/* After the walk: the products of the per-chunk grads (dO W^T, W dS1^T, dO S0^T, dW^ S0^T,
 * -dW^ W^T), the grad block, then dQ += dQK K and dK += dQK^T Q (+ (dG + dG^T) K). */
static moe_status scan_bwd_after_walk(const moe_kernel_args *a, const scan_bwd_bufs &f, const scan_bwd_dims &d,
                                      const float *ckpt, cublasComputeType_t ct) {
    const moe_scan_attrs *at = (const moe_scan_attrs *)a->attrs;
    const int64_t C = d.C, B = d.B, dk = d.dk, dv = d.dv, CC = C * C, SS = dk * dv;
    MOE_TRY(rm_gemm(false, true, C, C, dv, 1.0f, f.dO, dv, C * dv, f.w, dv, C * dv, 0.0f, f.mq, C, CC, B, ct));
    MOE_TRY(rm_gemm(false, true, C, dk, dv, 1.0f, f.w, dv, C * dv, f.ds1, dv, SS, 0.0f, f.dkr, dk, C * dk, B, ct));
    MOE_TRY(rm_gemm(false, true, C, dk, dv, 1.0f, f.dO, dv, C * dv, ckpt, dv, SS, 0.0f, f.dos, dk, C * dk, B, ct));
    if (d.delta) {
        MOE_TRY(rm_gemm(false, true, C, dk, dv, 1.0f, f.dwh, dv, C * dv, ckpt, dv, SS, 0.0f, f.dzs, dk, C * dk, B, ct));
        MOE_TRY(rm_gemm(false, true, C, C, dv, -1.0f, f.dwh, dv, C * dv, f.w, dv, C * dv, 0.0f, f.x, C, CC, B, ct));
    }
    const size_t smem = sizeof(float) * (size_t)(2 * C * (C + 1) + 5 * C + 32);
    CU_FLOAT_DISPATCH(a->in[0]->dtype, "delta_scan_bwd", {
        MOE_TRY(cu_allow_smem(scan_bwd_grad_kernel<T>, smem, "delta_scan_bwd (chunked)"));
        scan_bwd_grad_kernel<T><<<(unsigned)B, CU_THREADS, smem, moe_cu.stream>>>(
            (const T *)a->in[4]->data, (const T *)a->in[3]->data, (T *)at->dalpha->data, (T *)at->dbeta->data, f,
            ckpt, d);
        CU_LAUNCHED("delta_scan_bwd (chunked) grads");
    });
    MOE_TRY(rm_gemm(false, false, C, dk, C, 1.0f, f.mq, C, CC, f.k, dk, C * dk, 1.0f, f.dos, dk, C * dk, B, ct));
    MOE_TRY(rm_gemm(true, false, C, dk, C, 1.0f, f.mq, C, CC, f.q, dk, C * dk, 1.0f, f.dkr, dk, C * dk, B, ct));
    if (d.delta)
        MOE_TRY(rm_gemm(false, false, C, dk, C, 1.0f, f.kk, C, CC, f.k, dk, C * dk, 1.0f, f.dkr, dk, C * dk, B, ct));
    return MOE_OK;
}

/* DELTA_SCAN_BWD in the chunked form (moe_cuda_scan_chunked_fits is true). */
moe_status moe_cuda_delta_scan_bwd_chunked(const moe_kernel_args *a) {
    const moe_scan_attrs *at = (const moe_scan_attrs *)a->attrs;
    const moe_tensor *q = a->in[0];
    scan_bwd_dims d;
    d.Tn = q->shape[1], d.H = q->shape[2], d.dk = q->shape[3], d.dv = a->in[2]->shape[3], d.C = at->chunk;
    d.P = q->shape[0] * d.H, d.nc = (d.Tn + d.C - 1) / d.C, d.B = d.P * d.nc, d.delta = at->delta;
    const int64_t BK = d.B * d.C * d.dk, BV = d.B * d.C * d.dv;
    const cublasComputeType_t ct =
        q->dtype == MOE_BF16 || moe_cu.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    const float *ckpt = (const float *)at->ckpt->data;
    scan_bwd_bufs f;
    if (!scan_bwd_bufs_alloc(&f, d.B, d.C, d.dk, d.dv)) return moe_last_status();
    CU_FLOAT_DISPATCH(q->dtype, "delta_scan_bwd", {
        const T *src[4] = {(const T *)q->data, (const T *)a->in[1]->data, (const T *)a->in[2]->data,
                           (const T *)a->in[5]->data};
        float *dst[4] = {f.q, f.k, d.delta ? f.z : f.w, f.dO}; /* gla: W = V */
        for (int i = 0; i < 4; i++) {
            const int64_t w = i < 2 ? d.dk : d.dv;
            scan_gather_kernel<T><<<cu_blocks(i < 2 ? BK : BV), CU_THREADS, 0, moe_cu.stream>>>(
                src[i], dst[i], d.Tn, d.H, w, d.C, d.nc, i < 2 ? BK : BV);
        }
        CU_LAUNCHED("delta_scan_bwd (chunked) gather");
    });
    MOE_TRY(scan_bwd_before_walk(a, f, d, ckpt, ct));
    MOE_TRY(scan_bwd_walk(&f, &d, at->dstate0 ? (float *)at->dstate0->data : NULL, ct));
    MOE_TRY(scan_bwd_after_walk(a, f, d, ckpt, ct));
    CU_FLOAT_DISPATCH(q->dtype, "delta_scan_bwd", {
        const float *src[3] = {f.dos, f.dkr, d.delta ? f.dwh : f.dw};
        T *dst[3] = {(T *)a->out->data, (T *)at->dk->data, (T *)at->dv->data};
        for (int i = 0; i < 3; i++) {
            const int64_t w = i < 2 ? d.dk : d.dv;
            scan_scatter_kernel<T><<<cu_blocks(i < 2 ? BK : BV), CU_THREADS, 0, moe_cu.stream>>>(
                src[i], dst[i], d.Tn, d.H, w, d.C, d.nc, i < 2 ? BK : BV);
        }
        CU_LAUNCHED("delta_scan_bwd (chunked) scatter");
    });
    return MOE_OK;
}
