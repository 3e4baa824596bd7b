/* CUDA kernels of the gated delta-rule / gated linear-attention scan (DELTA_SCAN and
 * DELTA_SCAN_BWD; conventions in core/kernels.h at moe_scan_attrs, reference: the CPU
 * kernels in core/cpu/scan_cpu.c). Storage f32 or bf16, compute and states f32.
 *
 * One thread block per (n, h) runs the recurrence step by step (the `chunked` attribute
 * is ignored here: the forward is always the step-by-step form, which gives the same
 * result). The state S (dk x dv) sits in shared memory; thread j owns column j, which
 * the delta rule updates independently of the other columns:
 *   u_j = sum_i k_i S_ij, w_j = beta (v_j - alpha u_j) (gla: v_j), S_ij = alpha S_ij + k_i w_j,
 *   o_j = sum_i q_i S_ij.
 * The backward recomputes the states of one chunk at a time from the checkpoints into a
 * global scratch buffer [N H, chunk + 1, dk, dv], then walks the chunk backwards: column
 * phases (thread j) for dS += q g^T, dv, u, w and the dalpha / dbeta partial sums, a row
 * phase (thread i) for dq and dk, and a column phase for dS <- alpha dS + k du^T. */
#include "core/cuda/cuda_common.cuh"

/* Threads per block: enough for max(dk, dv), a multiple of 32. */
static int scan_threads(int64_t dk, int64_t dv) {
    int64_t m = dk > dv ? dk : dv;
    return (int)((m + 31) / 32 * 32);
}

/* Opts a kernel into more than 48 KiB of dynamic shared memory when needed. */
template <class K> static moe_status scan_smem(K kernel, size_t bytes, const char *kname) {
    if (bytes > moe_cu.smem_optin)
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: a %zu-byte state does not fit in shared memory (%zu bytes); use "
                         "smaller heads (dk * dv)", kname, bytes, moe_cu.smem_optin);
    if (bytes > 48 * 1024)
        CU_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes),
               "raising the shared memory of %s to %zu bytes", kname, bytes);
    return MOE_OK;
}

template <class T>
__global__ void scan_fwd_kernel(const T *q, const T *k, const T *v, const T *beta, const T *alpha, const float *s0,
                                T *o, float *s_out, float *ckpt, int64_t Tn, int64_t H, int64_t dk, int64_t dv,
                                int64_t chunk, bool delta) {
    extern __shared__ float sm[];
    float *S = sm, *qs = S + dk * dv, *ks = qs + dk;
    const int64_t p = blockIdx.x, n = p / H, h = p % H, SS = dk * dv, nc = (Tn + chunk - 1) / chunk;
    const int j = threadIdx.x;
    for (int64_t i = j; i < SS; i += blockDim.x) S[i] = s0 ? s0[p * SS + i] : 0.0f;
    __syncthreads();
    for (int64_t t = 0; t < Tn; t++) {
        const int64_t e = (n * Tn + t) * H + h;
        if (ckpt && t % chunk == 0)
            for (int64_t i = j; i < SS; i += blockDim.x) ckpt[(p * nc + t / chunk) * SS + i] = S[i];
        if (j < dk) {
            qs[j] = ldf(q + e * dk + j);
            ks[j] = ldf(k + e * dk + j);
        }
        __syncthreads();
        if (j < dv) {
            const float a = ldf(alpha + e), b = ldf(beta + e), vj = ldf(v + e * dv + j);
            float w = vj;
            if (delta) {
                float u = 0;
                for (int64_t i = 0; i < dk; i++) u += ks[i] * S[i * dv + j];
                w = b * (vj - a * u);
            }
            float oj = 0;
            for (int64_t i = 0; i < dk; i++) {
                float s = a * S[i * dv + j] + ks[i] * w;
                S[i * dv + j] = s;
                oj += qs[i] * s;
            }
            stf(o + e * dv + j, oj);
        }
        __syncthreads();
    }
    if (s_out)
        for (int64_t i = j; i < SS; i += blockDim.x) s_out[p * SS + i] = S[i];
}

extern "C" moe_status moe_cuda_delta_scan(const moe_kernel_args *a) {
    const moe_scan_attrs *at = (const moe_scan_attrs *)a->attrs;
    const moe_tensor *q = a->in[0];
    const int64_t N = q->shape[0], Tn = q->shape[1], H = q->shape[2], dk = q->shape[3], dv = a->in[2]->shape[3];
    const size_t smem = sizeof(float) * (size_t)(dk * dv + 2 * dk);
    const float *s0 = a->in[5] ? (const float *)a->in[5]->data : NULL;
    float *s_out = a->out2 ? (float *)a->out2->data : NULL, *ckpt = at->ckpt ? (float *)at->ckpt->data : NULL;
    CU_FLOAT_DISPATCH(q->dtype, "delta_scan", {
        MOE_TRY(scan_smem(scan_fwd_kernel<T>, smem, "delta_scan"));
        scan_fwd_kernel<T><<<(unsigned)(N * H), scan_threads(dk, dv), smem, moe_cu.stream>>>(
            (const T *)q->data, (const T *)a->in[1]->data, (const T *)a->in[2]->data, (const T *)a->in[3]->data,
            (const T *)a->in[4]->data, s0, (T *)a->out->data, s_out, ckpt, Tn, H, dk, dv, at->chunk, at->delta);
        CU_LAUNCHED("delta_scan");
    });
    return MOE_OK;
}

template <class T>
__global__ void scan_bwd_kernel(const T *q, const T *k, const T *v, const T *beta, const T *alpha, const T *g,
                                const float *ckpt, float *scratch, T *dq, T *dk_out, T *dv_out, T *dbeta, T *dalpha,
                                float *ds0, int64_t Tn, int64_t H, int64_t dk, int64_t dv, int64_t chunk, bool delta) {
    extern __shared__ float sm[];
    float *dS = sm, *qs = dS + dk * dv, *ks = qs + dk, *vs = ks + dk, *gs = vs + dv, *ws = gs + dv, *dus = ws + dv,
          *red = dus + dv;
    const int64_t p = blockIdx.x, n = p / H, h = p % H, SS = dk * dv, nc = (Tn + chunk - 1) / chunk;
    const int j = threadIdx.x;
    float *Sb = scratch + p * (chunk + 1) * SS;
    for (int64_t i = j; i < SS; i += blockDim.x) dS[i] = 0;
    for (int64_t c = nc - 1; c >= 0; c--) {
        const int64_t t0 = c * chunk, cn = Tn - t0 < chunk ? Tn - t0 : chunk;
        /* states of this chunk: Sb[r] = state before step t0 + r */
        for (int64_t i = j; i < SS; i += blockDim.x) Sb[i] = ckpt[(p * nc + c) * SS + i];
        for (int64_t r = 0; r < cn; r++) {
            const int64_t e = (n * Tn + t0 + r) * H + h;
            __syncthreads();
            if (j < dk) ks[j] = ldf(k + e * dk + j);
            __syncthreads();
            if (j < dv) {
                const float a = ldf(alpha + e), b = ldf(beta + e), vj = ldf(v + e * dv + j);
                const float *Sp = Sb + r * SS;
                float *St = Sb + (r + 1) * SS;
                float w = vj;
                if (delta) {
                    float u = 0;
                    for (int64_t i = 0; i < dk; i++) u += ks[i] * Sp[i * dv + j];
                    w = b * (vj - a * u);
                }
                for (int64_t i = 0; i < dk; i++) St[i * dv + j] = a * Sp[i * dv + j] + ks[i] * w;
            }
        }
        for (int64_t r = cn - 1; r >= 0; r--) {
            const int64_t e = (n * Tn + t0 + r) * H + h;
            const float a = ldf(alpha + e), b = ldf(beta + e);
            const float *Sp = Sb + r * SS, *St = Sb + (r + 1) * SS;
            __syncthreads();
            if (j < dk) {
                qs[j] = ldf(q + e * dk + j);
                ks[j] = ldf(k + e * dk + j);
            }
            if (j < dv) {
                vs[j] = ldf(v + e * dv + j);
                gs[j] = ldf(g + e * dv + j);
            }
            __syncthreads();
            /* column phase: dS += q g^T, dv, w, du and the partial sums of dalpha, dbeta */
            float pa = 0, pb = 0;
            if (j < dv) {
                float dkS = 0, u = 0;
                for (int64_t i = 0; i < dk; i++) {
                    float d = dS[i * dv + j] + qs[i] * gs[j];
                    dS[i * dv + j] = d;
                    dkS += ks[i] * d;
                    u += ks[i] * Sp[i * dv + j];
                    pa += d * Sp[i * dv + j];
                }
                if (delta) {
                    float w = vs[j] - a * u, dw = b * dkS;
                    ws[j] = w;
                    dus[j] = -a * dw;
                    pa -= dw * u;
                    pb = w * dkS;
                    stf(dv_out + e * dv + j, dw);
                } else {
                    stf(dv_out + e * dv + j, dkS);
                }
            }
            pa = cu_block_sum(pa, red);
            pb = cu_block_sum(pb, red);
            if (j == 0) {
                stf(dalpha + e, pa);
                stf(dbeta + e, delta ? pb : 0.0f);
            }
            __syncthreads();
            /* row phase: dq and dk */
            if (j < dk) {
                float sq = 0, sk = 0;
                for (int64_t l = 0; l < dv; l++) {
                    sq += St[j * dv + l] * gs[l];
                    sk += delta ? b * dS[j * dv + l] * ws[l] + Sp[j * dv + l] * dus[l] : dS[j * dv + l] * vs[l];
                }
                stf(dq + e * dk + j, sq);
                stf(dk_out + e * dk + j, sk);
            }
            __syncthreads();
            /* column phase: dS <- alpha dS + k du^T */
            if (j < dv)
                for (int64_t i = 0; i < dk; i++)
                    dS[i * dv + j] = a * dS[i * dv + j] + (delta ? ks[i] * dus[j] : 0.0f);
        }
    }
    __syncthreads();
    if (ds0)
        for (int64_t i = j; i < SS; i += blockDim.x) ds0[p * SS + i] = dS[i];
}

extern "C" moe_status moe_cuda_delta_scan_bwd(const moe_kernel_args *a) {
    const moe_scan_attrs *at = (const moe_scan_attrs *)a->attrs;
    const moe_tensor *q = a->in[0];
    const int64_t N = q->shape[0], Tn = q->shape[1], H = q->shape[2], dk = q->shape[3], dv = a->in[2]->shape[3];
    const size_t smem = sizeof(float) * (size_t)(dk * dv + 2 * dk + 4 * dv + 32);
    const size_t scratch_bytes = sizeof(float) * (size_t)(N * H * (at->chunk + 1) * dk * dv);
    float *scratch = (float *)cu_scratch(scratch_bytes);
    if (!scratch) return moe_last_status();
    float *ds0 = at->dstate0 ? (float *)at->dstate0->data : NULL;
    CU_FLOAT_DISPATCH(q->dtype, "delta_scan_bwd", {
        MOE_TRY(scan_smem(scan_bwd_kernel<T>, smem, "delta_scan_bwd"));
        scan_bwd_kernel<T><<<(unsigned)(N * H), scan_threads(dk, dv), smem, moe_cu.stream>>>(
            (const T *)q->data, (const T *)a->in[1]->data, (const T *)a->in[2]->data, (const T *)a->in[3]->data,
            (const T *)a->in[4]->data, (const T *)a->in[5]->data, (const float *)at->ckpt->data, scratch,
            (T *)a->out->data, (T *)at->dk->data, (T *)at->dv->data, (T *)at->dbeta->data, (T *)at->dalpha->data, ds0,
            Tn, H, dk, dv, at->chunk, at->delta);
        CU_LAUNCHED("delta_scan_bwd");
    });
    return MOE_OK;
}
