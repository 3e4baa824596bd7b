/* The chunked (WY / UT-transform) form of the DELTA_SCAN forward on CUDA: the products run
 * as batched cuBLAS GEMMs (TF32 tensor cores for bf16 storage, or f32 storage with
 * MOE_CUDA_TF32=1; plain f32 otherwise), so the work per chunk is a few matrix products
 * instead of C dependent rank-1 steps. Same arithmetic as the CPU chunked form
 * (core/cpu/scan_cpu.c, whose file comment derives it), in f32:
 *
 * For pair p = (n, h) and chunk c of C steps (r, s = 0..C-1; the last chunk is padded with
 * steps of alpha 1, beta 0 and zero vectors, which change nothing), from the state S0 before it:
 *   R[r][s] = prod_{j=s+1..r} alpha_j (s <= r), gamma_r = prod_{j=0..r} alpha_j,
 *   delta: X = (I + L)^{-1}, L[r][s] = beta_r R[r][s] (k_r . k_s) (s < r),
 *          Tm = X diag(beta), U = Tm V, Wk = Tm diag(gamma) K, W = U - Wk S0,
 *   gla:   W = V,
 *   O = diag(gamma) Q S0 + (M o Q K^T) W with M[r][s] = R[r][s] (s <= r, else 0),
 *   S_next = gamma_{C-1} S0 + (diag(R[C-1][.]) K)^T W.
 * Steps: gather q, k, v into chunk-major f32 buffers [P, nc, C, d]; two batched GEMMs give
 * K K^T and Q K^T of every chunk; one block per chunk (scan_chunk_prep_kernel) forms R, M,
 * gamma and solves X by forward substitution (one thread per column); two more batched
 * GEMMs give U and Wk; then the chunks run in order, each step four GEMMs batched over the
 * pairs and one scaling of the state; the outputs go back to [N, T, H, dv]. The state before
 * each chunk is the backward's checkpoint (core/cuda/scan_chunked_bwd.cu reads it). */
#include "core/cuda/scan_chunked.cuh"

/* One block per chunk b = p nc + c. In: qk = Q K^T, kk = K K^T (delta) [B, C, C]. Out: qk
 * becomes M o Q K^T; tm = X diag(beta), tg = X diag(beta gamma) (delta); gam [B, C] = gamma;
 * rl [B, C] = R[C-1][.]; q's rows scaled by gamma. Shared memory: R and X, [C][C + 1] each. */
template <class T>
__global__ void scan_chunk_prep_kernel(const T *alpha, const T *beta, float *qk, const float *kk, float *tm, float *tg,
                                       float *gam, float *rl, float *qc, int64_t Tn, int64_t H, int64_t C, int64_t nc,
                                       int64_t dk, bool delta) {
    extern __shared__ float sm[];
    const int64_t ld = C + 1, b = blockIdx.x, CC = C * C;
    float *R = sm, *X = sm + C * ld, *av = X + C * ld, *bv = av + C;
    scan_chunk_load_ab(alpha, beta, av, bv, b, C, nc, Tn, H);
    __syncthreads();
    scan_chunk_decays(av, R, ld, gam + b * C, C);
    __syncthreads();
    float *qkb = qk + b * CC, *tmb = tm + b * CC, *tgb = tg + b * CC;
    for (int64_t i = threadIdx.x; i < CC; i += blockDim.x) {
        const int64_t r = i / C, s = i % C;
        qkb[i] = s <= r ? R[r * ld + s] * qkb[i] : 0.0f;
        if (r == C - 1) rl[b * C + s] = R[r * ld + s];
    }
    for (int64_t i = threadIdx.x; i < C * dk; i += blockDim.x) qc[b * C * dk + i] *= gam[b * C + i / dk];
    if (!delta) return;
    __syncthreads(); /* R's last row is read above before it turns into L */
    for (int64_t i = threadIdx.x; i < CC; i += blockDim.x) {
        const int64_t r = i / C, s = i % C;
        if (s < r) R[r * ld + s] *= bv[r] * kk[b * CC + i];
    }
    __syncthreads();
    scan_chunk_unit_lower_inverse(R, X, ld, C);
    __syncthreads();
    for (int64_t i = threadIdx.x; i < CC; i += blockDim.x) {
        const int64_t r = i / C, s = i % C;
        const float x = s <= r ? X[r * ld + s] * bv[s] : 0.0f;
        tmb[i] = x;
        tgb[i] = x * gam[b * C + s];
    }
}

/* S [P, SS] times gamma_{C-1} of chunk c of each pair. */
static __global__ void scan_decay_state_kernel(float *S, const float *gam, int64_t SS, int64_t C, int64_t nc,
                                               int64_t c, int64_t n_all) {
    CU_GRID_LOOP(i, n_all) S[i] *= gam[((i / SS) * nc + c) * C + C - 1];
}

/* Scratch of the chunked form, f32: chunk-major q, k, v (then U), Wk and o [B, C, d]; Q K^T,
 * K K^T, Tm, Tg [B, C, C]; gamma, R's last row [B, C]; the state [P, dk, dv]. */
struct scan_chunk_bufs {
    float *q, *k, *u, *wk, *o, *qk, *kk, *tm, *tg, *gam, *rl, *S;
};

static bool scan_chunk_bufs_alloc(scan_chunk_bufs *f, int64_t P, int64_t B, int64_t C, int64_t dk, int64_t dv) {
    const int64_t BC = B * C, CC = BC * C;
    const size_t n = (size_t)(BC * (3 * dk + 2 * dv) + 4 * CC + 2 * BC + P * dk * dv);
    float *m = (float *)cu_scratch(sizeof(float) * n);
    if (!m) return false;
    f->q = m, f->k = f->q + BC * dk, f->wk = f->k + BC * dk, f->u = f->wk + BC * dk, f->o = f->u + BC * dv;
    f->qk = f->o + BC * dv, f->kk = f->qk + CC, f->tm = f->kk + CC, f->tg = f->tm + CC;
    f->gam = f->tg + CC, f->rl = f->gam + BC, f->S = f->rl + BC;
    return true;
}

/* True when the chunked form runs this call (else the step-by-step kernel does). */
bool moe_cuda_scan_chunked_fits(const moe_scan_attrs *at) {
    return at->chunked && at->chunk >= 2 && at->chunk <= SCAN_CHUNKED_MAX_C;
}

/* The chunks in order: checkpoint, W, O, the state's decay and update (see the file comment). */
static moe_status scan_chunk_walk(const scan_chunk_bufs *f, const moe_scan_attrs *at, int64_t P, int64_t C, int64_t nc,
                                  int64_t dk, int64_t dv, cublasComputeType_t ct) {
    const int64_t SS = dk * dv, sK = nc * C * dk, sV = nc * C * dv, sM = nc * C * C;
    float *ckpt = at->ckpt ? (float *)at->ckpt->data : NULL;
    for (int64_t c = 0; c < nc; c++) {
        float *u = f->u + c * C * dv, *o = f->o + c * C * dv;
        if (ckpt)
            CU_TRY(cudaMemcpy2DAsync(ckpt + c * SS, sizeof(float) * nc * SS, f->S, sizeof(float) * SS,
                                     sizeof(float) * SS, P, cudaMemcpyDeviceToDevice, moe_cu.stream),
                   "delta_scan (chunked): checkpoint %lld", (long long)c);
        if (at->delta)
            MOE_TRY(rm_gemm(false, false, C, dv, dk, -1.0f, f->wk + c * C * dk, dk, sK, f->S, dv, SS, 1.0f, u, dv, sV,
                            P, ct));
        MOE_TRY(
            rm_gemm(false, false, C, dv, dk, 1.0f, f->q + c * C * dk, dk, sK, f->S, dv, SS, 0.0f, o, dv, sV, P, ct));
        MOE_TRY(rm_gemm(false, false, C, dv, C, 1.0f, f->qk + c * C * C, C, sM, u, dv, sV, 1.0f, o, dv, sV, P, ct));
        scan_decay_state_kernel<<<cu_blocks(P * SS), CU_THREADS, 0, moe_cu.stream>>>(f->S, f->gam, SS, C, nc, c,
                                                                                   P * SS);
        CU_LAUNCHED("delta_scan (chunked) decay");
        MOE_TRY(rm_gemm(true, false, dk, dv, C, 1.0f, f->k + c * C * dk, dk, sK, u, dv, sV, 1.0f, f->S, dv, SS, P, ct));
    }
    return MOE_OK;
}

/* DELTA_SCAN in the chunked form (moe_cuda_scan_chunked_fits is true). */
moe_status moe_cuda_delta_scan_chunked(const moe_kernel_args *a) {
    const moe_scan_attrs *at = (const moe_scan_attrs *)a->attrs;
    const moe_tensor *q = a->in[0];
    const int64_t N = q->shape[0], Tn = q->shape[1], H = q->shape[2], dk = q->shape[3], dv = a->in[2]->shape[3];
    const int64_t P = N * H, C = at->chunk, nc = (Tn + C - 1) / C, B = P * nc, SS = dk * dv;
    const cublasComputeType_t ct =
        q->dtype == MOE_BF16 || moe_cu.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    scan_chunk_bufs f;
    if (!scan_chunk_bufs_alloc(&f, P, B, C, dk, dv)) return moe_last_status();
    const size_t smem = sizeof(float) * (size_t)(2 * C * (C + 1) + 2 * C);
    CU_FLOAT_DISPATCH(q->dtype, "delta_scan", {
        MOE_TRY(cu_allow_smem(scan_chunk_prep_kernel<T>, smem, "delta_scan (chunked)"));
        scan_gather_kernel<T><<<cu_blocks(B * C * dk), CU_THREADS, 0, moe_cu.stream>>>(
            (const T *)q->data, f.q, Tn, H, dk, C, nc, B * C * dk);
        scan_gather_kernel<T><<<cu_blocks(B * C * dk), CU_THREADS, 0, moe_cu.stream>>>(
            (const T *)a->in[1]->data, f.k, Tn, H, dk, C, nc, B * C * dk);
        /* v: into u (gla: W = V), or into o until U = Tm V is formed (delta) */
        scan_gather_kernel<T><<<cu_blocks(B * C * dv), CU_THREADS, 0, moe_cu.stream>>>(
            (const T *)a->in[2]->data, at->delta ? f.o : f.u, Tn, H, dv, C, nc, B * C * dv);
        CU_LAUNCHED("delta_scan (chunked) gather");
        MOE_TRY(rm_gemm(false, true, C, C, dk, 1.0f, f.q, dk, C * dk, f.k, dk, C * dk, 0.0f, f.qk, C, C * C, B, ct));
        if (at->delta)
            MOE_TRY(
                rm_gemm(false, true, C, C, dk, 1.0f, f.k, dk, C * dk, f.k, dk, C * dk, 0.0f, f.kk, C, C * C, B, ct));
        scan_chunk_prep_kernel<T><<<(unsigned)B, CU_THREADS, smem, moe_cu.stream>>>(
            (const T *)a->in[4]->data, (const T *)a->in[3]->data, f.qk, f.kk, f.tm, f.tg, f.gam, f.rl, f.q, Tn, H, C,
            nc, dk, at->delta);
        CU_LAUNCHED("delta_scan (chunked) prep");
    });
    if (at->delta) {
        MOE_TRY(rm_gemm(false, false, C, dk, C, 1.0f, f.tg, C, C * C, f.k, dk, C * dk, 0.0f, f.wk, dk, C * dk, B, ct));
        MOE_TRY(rm_gemm(false, false, C, dv, C, 1.0f, f.tm, C, C * C, f.o, dv, C * dv, 0.0f, f.u, dv, C * dv, B, ct));
    }
    scan_scale_rows_kernel<<<cu_blocks(B * C * dk), CU_THREADS, 0, moe_cu.stream>>>(f.k, f.rl, dk, B * C * dk);
    CU_LAUNCHED("delta_scan (chunked) scale");
    if (a->in[5])
        CU_TRY(cudaMemcpyAsync(f.S, a->in[5]->data, sizeof(float) * (size_t)(P * SS), cudaMemcpyDeviceToDevice,
                               moe_cu.stream),
               "delta_scan (chunked): state0");
    else
        CU_TRY(cudaMemsetAsync(f.S, 0, sizeof(float) * (size_t)(P * SS), moe_cu.stream), "delta_scan (chunked): state");
    MOE_TRY(scan_chunk_walk(&f, at, P, C, nc, dk, dv, ct));
    CU_FLOAT_DISPATCH(q->dtype, "delta_scan", {
        scan_scatter_kernel<T><<<cu_blocks(B * C * dv), CU_THREADS, 0, moe_cu.stream>>>(f.o, (T *)a->out->data, Tn, H,
                                                                                         dv, C, nc, B * C * dv);
        CU_LAUNCHED("delta_scan (chunked) scatter");
    });
    if (a->out2)
        CU_TRY(cudaMemcpyAsync(a->out2->data, f.S, sizeof(float) * (size_t)(P * SS), cudaMemcpyDeviceToDevice,
                               moe_cu.stream),
               "delta_scan (chunked): final state");
    return MOE_OK;
}
