/* The residual add + RMSNorm of one row by one block (core/cpu/norm_cpu.c's ADD_RMSNORM is
 * the specification), shared by the add_rmsnorm kernel and the fused output projection's
 * last block (matmul_add_rmsnorm): s = x + r rounded to T into sum, then y = s * rstd * w
 * with the row's sum of squares a block reduction in f32; the second pass adds again
 * instead of reading s back. Thread i takes the V-wide chunks i, i + blockDim.x, ...;
 * RL2: r is read through L2 (other blocks of the running kernel wrote it). */
#ifndef MOE_CUDA_NORM_CUH
#define MOE_CUDA_NORM_CUH

#include "core/cuda/cuda_common.cuh"

template <class T, int V, bool RL2>
__device__ void add_norm_row(const T *px, const T *pr, const T *w, T *o, T *sum, int64_t d, float eps, float *sh) {
    const int64_t c0 = (int64_t)threadIdx.x * V, cstep = (int64_t)blockDim.x * V;
    float var = 0, v[V], u[V];
    for (int64_t c = c0; c < d; c += cstep) {
        cu_ldv<T, V>(px + c, v);
        if (RL2) cu_ldvcg<T, V>(pr + c, u);
        else cu_ldv<T, V>(pr + c, u);
#pragma unroll
        for (int k = 0; k < V; k++) {
            v[k] = cu_round<T>(v[k] + u[k]);
            var += v[k] * v[k];
        }
        cu_stv<T, V>(sum + c, v);
    }
    float rs = 1.0f / sqrtf(cu_block_sum(var, sh) / (float)d + eps);
    for (int64_t c = c0; c < d; c += cstep) {
        float wv[V], y[V];
        cu_ldv<T, V>(px + c, v);
        if (RL2) cu_ldvcg<T, V>(pr + c, u);
        else cu_ldv<T, V>(pr + c, u);
        cu_ldv<T, V>(w + c, wv);
#pragma unroll
        for (int k = 0; k < V; k++) y[k] = cu_round<T>(v[k] + u[k]) * rs * wv[k];
        cu_stv<T, V>(o + c, y);
    }
}

#endif
