/* CUDA optimizer kernels (core/cpu/optim_cpu.c is the specification): fused AdamW and
 * momentum-SGD updates in place on contiguous tensors, the sum of squares for gradient
 * norms (fixed per-block partials, then one block adds them to out[0]: deterministic) and
 * the non-finite flag (only ever writes 1). */
#include "core/cuda/cuda_common.cuh"

template <class T>
__global__ void adamw_kernel(T *p, T *m, T *v, const T *g, int64_t n, moe_adamw_attrs at) {
    float decay = 1.0f - at.lr * at.weight_decay;
    CU_GRID_LOOP(i, n) {
        float gi = ldf(g + i) * at.grad_scale;
        float mi = at.beta1 * ldf(m + i) + (1.0f - at.beta1) * gi;
        float vi = at.beta2 * ldf(v + i) + (1.0f - at.beta2) * gi * gi;
        stf(m + i, mi);
        stf(v + i, vi);
        stf(p + i, ldf(p + i) * decay - at.lr * (mi / at.bias1) / (sqrtf(vi / at.bias2) + at.eps));
    }
}

extern "C" moe_status moe_cuda_adamw(const moe_kernel_args *a) {
    int64_t n = moe_tensor_numel(a->out);
    if (n == 0) return MOE_OK;
    const moe_adamw_attrs at = *(const moe_adamw_attrs *)a->attrs;
    CU_FLOAT_DISPATCH(a->out->dtype, "adamw",
        adamw_kernel<T><<<cu_blocks(n), CU_THREADS, 0, moe_cu.stream>>>(
            (T *)a->out->data, (T *)a->out2->data, (T *)a->in[1]->data, (const T *)a->in[0]->data, n, at);)
    CU_LAUNCHED("adamw");
    return MOE_OK;
}

template <class T> __global__ void sgd_kernel(T *p, T *buf, const T *g, int64_t n, moe_sgd_attrs at) {
    CU_GRID_LOOP(i, n) {
        float pi = ldf(p + i), gi = ldf(g + i) * at.grad_scale + at.weight_decay * pi;
        if (buf) {
            gi = at.momentum * ldf(buf + i) + gi;
            stf(buf + i, gi);
        }
        stf(p + i, pi - at.lr * gi);
    }
}

extern "C" moe_status moe_cuda_sgd(const moe_kernel_args *a) {
    int64_t n = moe_tensor_numel(a->out);
    if (n == 0) return MOE_OK;
    const moe_sgd_attrs at = *(const moe_sgd_attrs *)a->attrs;
    CU_FLOAT_DISPATCH(a->out->dtype, "sgd",
        sgd_kernel<T><<<cu_blocks(n), CU_THREADS, 0, moe_cu.stream>>>(
            (T *)a->out->data, a->out2 ? (T *)a->out2->data : NULL, (const T *)a->in[0]->data, n, at);)
    CU_LAUNCHED("sgd");
    return MOE_OK;
}

/* ---- sum of squares: per-block partials, then one block adds their sum to out[0] ---- */
template <class T> __global__ void sumsq_partial_kernel(const T *x, int64_t n, float *part) {
    __shared__ float sh[32];
    float s = 0;
    CU_GRID_LOOP(i, n) {
        float v = ldf(x + i);
        s += v * v;
    }
    s = cu_block_sum(s, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

__global__ void sumsq_final_kernel(const float *part, int np, float *out) {
    __shared__ float sh[32];
    float s = 0;
    for (int i = threadIdx.x; i < np; i += blockDim.x) s += part[i];
    s = cu_block_sum(s, sh);
    if (threadIdx.x == 0) out[0] += s;
}

extern "C" moe_status moe_cuda_reduce_sq(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    int64_t n = moe_tensor_numel(x);
    if (n == 0) return MOE_OK;
    unsigned nb = cu_blocks(n);
    float *part = (float *)cu_scratch(sizeof(float) * nb);
    if (!part) return moe_last_status();
    CU_FLOAT_DISPATCH(x->dtype, "reduce_sq",
        sumsq_partial_kernel<T><<<nb, CU_THREADS, 0, moe_cu.stream>>>((const T *)x->data, n, part);)
    CU_LAUNCHED("reduce_sq");
    sumsq_final_kernel<<<1, 1024, 0, moe_cu.stream>>>(part, (int)nb, (float *)a->out->data);
    CU_LAUNCHED("reduce_sq (final)");
    return MOE_OK;
}

template <class T> __global__ void nonfinite_kernel(const T *x, int64_t n, int32_t *flag) {
    bool bad = false;
    /* exponent bits all ones: Inf or NaN (a bit test survives fast-math) */
    CU_GRID_LOOP(i, n) bad |= (__float_as_uint(ldf(x + i)) & 0x7f800000u) == 0x7f800000u;
    if (__syncthreads_or(bad) && threadIdx.x == 0) *flag = 1;
}

extern "C" moe_status moe_cuda_nonfinite(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    int64_t n = moe_tensor_numel(x);
    if (n == 0) return MOE_OK;
    CU_FLOAT_DISPATCH(x->dtype, "nonfinite",
        nonfinite_kernel<T><<<cu_blocks(n), CU_THREADS, 0, moe_cu.stream>>>((const T *)x->data, n,
                                                                          (int32_t *)a->out->data);)
    CU_LAUNCHED("nonfinite");
    return MOE_OK;
}
