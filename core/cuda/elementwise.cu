/* CUDA elementwise kernels: copy/cast (every dtype, any strides), fill, binary
 * (broadcast through stride-0 views of out's shape), scalar, unary and its backward,
 * fused SwiGLU on the packed [.., 2f] projection and its backward. Same formulas as
 * core/cpu/elementwise_cpu.c, computed in f32 for f32 and bf16 storage. Contiguous
 * float operands with 8 | n take the 8-wide path (cu_vec8), the rest the strided one. */
#include "core/cuda/cuda_common.cuh"

/* ---- copy with dtype cast (through double, as the CPU does) ---- */
__device__ __forceinline__ double to_f64(float v) { return v; }
__device__ __forceinline__ double to_f64(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_f64(double v) { return v; }
__device__ __forceinline__ double to_f64(int32_t v) { return v; }
__device__ __forceinline__ double to_f64(int64_t v) { return (double)v; }

template <class T> __device__ __forceinline__ T from_f64(double v);
template <> __device__ __forceinline__ float from_f64<float>(double v) { return (float)v; }
template <> __device__ __forceinline__ bf16 from_f64<bf16>(double v) { return __float2bfloat16_rn((float)v); }
template <> __device__ __forceinline__ double from_f64<double>(double v) { return v; }
template <> __device__ __forceinline__ int32_t from_f64<int32_t>(double v) { return (int32_t)v; }
template <> __device__ __forceinline__ int64_t from_f64<int64_t>(double v) { return (int64_t)v; }

template <class TO, class TI> struct copy_f {
    TO *o;
    const TI *x;
    __device__ void operator()(const int64_t *off) const { o[off[0]] = from_f64<TO>(to_f64(x[off[1]])); }
};

template <class TO, class TI> struct cast8_f {
    TO *o;
    const TI *x;
    __device__ void operator()(int64_t i) const {
        float v[8];
        cu_ld8(x + i, v);
        cu_st8(o + i, v);
    }
};

/* Same dtype: moves the bits (U has the element size). */
template <class U> struct move_f {
    U *o;
    const U *x;
    __device__ void operator()(const int64_t *off) const { o[off[0]] = x[off[1]]; }
};

#define CU_ANY_DISPATCH(dt, TN, kname, ...)                                                     \
    switch (dt) {                                                                              \
    case MOE_F32: { typedef float TN; __VA_ARGS__ } break;                                     \
    case MOE_BF16: { typedef bf16 TN; __VA_ARGS__ } break;                                     \
    case MOE_F64: { typedef double TN; __VA_ARGS__ } break;                                    \
    case MOE_I32: { typedef int32_t TN; __VA_ARGS__ } break;                                   \
    case MOE_I64: { typedef int64_t TN; __VA_ARGS__ } break;                                   \
    default: return moe_error(MOE_ERR_UNSUPPORTED, "%s: dtype %s unknown", kname, moe_dtype_name(dt)); \
    }

extern "C" moe_status moe_cuda_copy(const moe_kernel_args *a) {
    moe_tensor *o = a->out;
    const moe_tensor *x = a->in[0];
    size_t es = moe_dtype_size(o->dtype);
    if (o->dtype == x->dtype) {
        if (moe_tensor_is_contiguous(o) && moe_tensor_is_contiguous(x)) {
            size_t bytes = (size_t)moe_tensor_numel(o) * es;
            if (bytes)
                CU_TRY(cudaMemcpyAsync(o->data, x->data, bytes, cudaMemcpyDeviceToDevice, moe_cu.stream),
                       "copying a contiguous %zu-byte tensor", bytes);
            return MOE_OK;
        }
        const moe_tensor *t[2] = {o, x};
        if (es == 2) return cu_elementwise("copy", t, move_f<uint16_t>{(uint16_t *)o->data, (const uint16_t *)x->data});
        if (es == 4) return cu_elementwise("copy", t, move_f<uint32_t>{(uint32_t *)o->data, (const uint32_t *)x->data});
        return cu_elementwise("copy", t, move_f<uint64_t>{(uint64_t *)o->data, (const uint64_t *)x->data});
    }
    const moe_tensor *t[2] = {o, x};
    const int64_t n = moe_tensor_numel(o);
    const bool floats = (o->dtype == MOE_F32 || o->dtype == MOE_BF16) && (x->dtype == MOE_F32 || x->dtype == MOE_BF16);
    if (floats && moe_tensor_is_contiguous(o) && moe_tensor_is_contiguous(x) && cu_vec8_ok(n, {o->data, x->data})) {
        CU_FLOAT_DISPATCH(o->dtype, "copy", typedef T TO;
            CU_FLOAT_DISPATCH(x->dtype, "copy",
                return cu_vec8("copy", n, cast8_f<TO, T>{(TO *)o->data, (const T *)x->data});))
    }
    CU_ANY_DISPATCH(o->dtype, TO, "copy",
        CU_ANY_DISPATCH(x->dtype, TI, "copy",
            return cu_elementwise("copy", t, copy_f<TO, TI>{(TO *)o->data, (const TI *)x->data});))
    return MOE_OK;
}

/* ---- fill ---- */
template <class T> struct fill_f {
    T *o;
    T v;
    __device__ void operator()(const int64_t *off) const { o[off[0]] = v; }
};

extern "C" moe_status moe_cuda_fill(const moe_kernel_args *a) {
    moe_tensor *o = a->out;
    double v = ((const moe_op_attrs_scalar *)a->attrs)->value;
    if (v == 0.0 && moe_tensor_is_contiguous(o)) {
        size_t bytes = (size_t)moe_tensor_numel(o) * moe_dtype_size(o->dtype);
        if (bytes) CU_TRY(cudaMemsetAsync(o->data, 0, bytes, moe_cu.stream), "zero-filling %zu bytes", bytes);
        return MOE_OK;
    }
    const moe_tensor *t[1] = {o};
    switch (o->dtype) {
    case MOE_F32: return cu_elementwise("fill", t, fill_f<float>{(float *)o->data, (float)v});
    case MOE_BF16: return cu_elementwise("fill", t, fill_f<bf16>{(bf16 *)o->data, __float2bfloat16_rn((float)v)});
    case MOE_F64: return cu_elementwise("fill", t, fill_f<double>{(double *)o->data, v});
    case MOE_I32: return cu_elementwise("fill", t, fill_f<int32_t>{(int32_t *)o->data, (int32_t)v});
    case MOE_I64: return cu_elementwise("fill", t, fill_f<int64_t>{(int64_t *)o->data, (int64_t)v});
    default: return moe_error(MOE_ERR_UNSUPPORTED, "fill: dtype %s unknown", moe_dtype_name(o->dtype));
    }
}

/* ---- binary and scalar ---- */
__device__ __forceinline__ float binary_fn(int op, float p, float q) {
    return op == MOE_BIN_ADD ? p + q : op == MOE_BIN_SUB ? p - q : op == MOE_BIN_MUL ? p * q : p / q;
}

template <class T> struct binary_f {
    T *o;
    const T *x, *y;
    int op;
    __device__ void operator()(const int64_t *off) const {
        stf(o + off[0], binary_fn(op, ldf(x + off[1]), ldf(y + off[2])));
    }
};

template <class T> struct binary8_f {
    T *o;
    const T *x, *y;
    int op;
    __device__ void operator()(int64_t i) const {
        float p[8], q[8];
        cu_ld8(x + i, p);
        cu_ld8(y + i, q);
#pragma unroll
        for (int k = 0; k < 8; k++) p[k] = binary_fn(op, p[k], q[k]);
        cu_st8(o + i, p);
    }
};

/* o = x op s[row] (or s[row] op x when scalar_first), x and o contiguous [rows, C]. */
template <class T> struct binary_row8_f {
    T *o;
    const T *x, *s;
    int64_t C;
    int op;
    bool scalar_first;
    __device__ void operator()(int64_t i) const {
        float p[8], q = ldf(s + i / C);
        cu_ld8(x + i, p);
#pragma unroll
        for (int k = 0; k < 8; k++) p[k] = scalar_first ? binary_fn(op, q, p[k]) : binary_fn(op, p[k], q);
        cu_st8(o + i, p);
    }
};

/* t (with out's shape) holds one value per row: last stride 0, the rest a contiguous
 * [.., 1] tensor (e.g. gate weights [T, 1] broadcast over a row of width C). */
static bool row_scalar_view(const moe_tensor *t) {
    int64_t want = 1;
    if (t->ndim < 1 || t->strides[t->ndim - 1] != 0) return false;
    for (int d = t->ndim - 2; d >= 0; d--) {
        if (t->shape[d] != 1 && t->strides[d] != want) return false;
        want *= t->shape[d];
    }
    return true;
}

extern "C" moe_status moe_cuda_binary(const moe_kernel_args *a) {
    int op = ((const moe_op_attrs_scalar *)a->attrs)->op;
    const moe_tensor *t[3] = {a->out, a->in[0], a->in[1]};
    const int64_t n = moe_tensor_numel(a->out);
    /* contiguous, same numel (no broadcast) */
    if (moe_tensor_is_contiguous(a->out) && moe_tensor_is_contiguous(a->in[0]) && moe_tensor_is_contiguous(a->in[1]) &&
        moe_tensor_numel(a->in[0]) == n && moe_tensor_numel(a->in[1]) == n &&
        cu_vec8_ok(n, {a->out->data, a->in[0]->data, a->in[1]->data}))
        CU_FLOAT_DISPATCH(a->out->dtype, "binary",
            return cu_vec8("binary", n, binary8_f<T>{(T *)a->out->data, (const T *)a->in[0]->data,
                                                     (const T *)a->in[1]->data, op});)
    /* one operand full and contiguous, the other one value per row */
    const int64_t C = cu_cols(a->out);
    for (int full = 0; full < 2 && C % 8 == 0; full++) {
        const moe_tensor *x = a->in[full], *sc = a->in[1 - full];
        if (moe_tensor_is_contiguous(a->out) && moe_tensor_is_contiguous(x) && moe_tensor_numel(x) == n &&
            row_scalar_view(sc) && cu_vec8_ok(n, {a->out->data, x->data}))
            CU_FLOAT_DISPATCH(a->out->dtype, "binary",
                return cu_vec8("binary", n, binary_row8_f<T>{(T *)a->out->data, (const T *)x->data,
                                                             (const T *)sc->data, C, op, full == 1});)
    }
    CU_FLOAT_DISPATCH(a->out->dtype, "binary",
        return cu_elementwise("binary", t, binary_f<T>{(T *)a->out->data, (const T *)a->in[0]->data,
                                                      (const T *)a->in[1]->data, op});)
    return MOE_OK;
}

template <class T> struct scalar_f {
    T *o;
    const T *x;
    float s;
    int op;
    __device__ void operator()(const int64_t *off) const {
        float v = ldf(x + off[1]);
        /* pow in double: the fast-math powf is wrong for negative bases */
        float r = op == MOE_SC_ADD ? v + s : op == MOE_SC_MUL ? v * s : (float)pow((double)v, (double)s);
        stf(o + off[0], r);
    }
};

extern "C" moe_status moe_cuda_scalar(const moe_kernel_args *a) {
    const moe_op_attrs_scalar *at = (const moe_op_attrs_scalar *)a->attrs;
    const moe_tensor *t[2] = {a->out, a->in[0]};
    CU_FLOAT_DISPATCH(a->out->dtype, "scalar",
        return cu_elementwise("scalar", t, scalar_f<T>{(T *)a->out->data, (const T *)a->in[0]->data,
                                                      (float)at->value, at->op});)
    return MOE_OK;
}

/* ---- unary functions and their derivatives ---- */
__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float unary_fn(int op, float x) {
    switch (op) {
    case MOE_UN_NEG: return -x;
    case MOE_UN_EXP: return expf(x);
    case MOE_UN_LOG: return logf(x);
    case MOE_UN_SQRT: return sqrtf(x);
    case MOE_UN_RSQRT: return 1.0f / sqrtf(x);
    case MOE_UN_SIGMOID: return sigmoidf_(x);
    case MOE_UN_TANH: return tanhf(x);
    case MOE_UN_RELU: return x > 0 ? x : 0.0f;
    case MOE_UN_SILU: return x / (1.0f + expf(-x));
    case MOE_UN_GELU: return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    default: return x > 20 ? x : log1pf(expf(x)); /* softplus */
    }
}

/* f'(x) from x and y = f(x), as the CPU writes it. */
__device__ __forceinline__ float unary_deriv(int op, float x, float y) {
    switch (op) {
    case MOE_UN_NEG: return -1.0f;
    case MOE_UN_EXP: return y;
    case MOE_UN_LOG: return 1.0f / x;
    case MOE_UN_SQRT: return 0.5f / y;
    case MOE_UN_RSQRT: return -0.5f * y * y * y;
    case MOE_UN_SIGMOID: return y * (1.0f - y);
    case MOE_UN_TANH: return 1.0f - y * y;
    case MOE_UN_RELU: return x > 0 ? 1.0f : 0.0f;
    case MOE_UN_SILU: {
        float s = sigmoidf_(x);
        return s * (1.0f + x * (1.0f - s));
    }
    case MOE_UN_GELU: {
        float k = 0.7978845608028654f, t = tanhf(k * (x + 0.044715f * x * x * x));
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k * (1.0f + 0.134145f * x * x);
    }
    default: return sigmoidf_(x); /* softplus */
    }
}

template <class T> struct unary_f {
    T *o;
    const T *x;
    int op;
    __device__ void operator()(const int64_t *off) const { stf(o + off[0], unary_fn(op, ldf(x + off[1]))); }
};

extern "C" moe_status moe_cuda_unary(const moe_kernel_args *a) {
    int op = ((const moe_op_attrs_scalar *)a->attrs)->op;
    const moe_tensor *t[2] = {a->out, a->in[0]};
    CU_FLOAT_DISPATCH(a->out->dtype, "unary",
        return cu_elementwise("unary", t, unary_f<T>{(T *)a->out->data, (const T *)a->in[0]->data, op});)
    return MOE_OK;
}

template <class T> struct unary_bwd_f {
    T *o;
    const T *g, *x, *y;
    int op;
    __device__ void operator()(const int64_t *off) const {
        stf(o + off[0], ldf(g + off[1]) * unary_deriv(op, ldf(x + off[2]), ldf(y + off[3])));
    }
};

extern "C" moe_status moe_cuda_unary_bwd(const moe_kernel_args *a) {
    int op = ((const moe_op_attrs_scalar *)a->attrs)->op;
    const moe_tensor *t[4] = {a->out, a->in[0], a->in[1], a->in[2]};
    CU_FLOAT_DISPATCH(a->out->dtype, "unary_bwd",
        return cu_elementwise("unary_bwd", t, unary_bwd_f<T>{(T *)a->out->data, (const T *)a->in[0]->data,
                                                            (const T *)a->in[1]->data, (const T *)a->in[2]->data, op});)
    return MOE_OK;
}

/* ---- SwiGLU on the packed projection: row r of h = [gate (f) | up (f)] ---- */
/* Strided path: offsets come from out's shape over the gate half of h (view hg); the
 * up value sits f columns further. */
template <class T> struct swiglu_f {
    T *o;
    const T *h;
    int64_t up; /* element distance gate -> up */
    __device__ void operator()(const int64_t *off) const {
        float v = ldf(h + off[1]);
        stf(o + off[0], v / (1.0f + expf(-v)) * ldf(h + off[1] + up));
    }
};

/* 8-wide path: h [rows, 2f] and out [rows, f] contiguous, 8 | f. */
template <class T> struct swiglu8_f {
    T *o;
    const T *h;
    int64_t f;
    __device__ void operator()(int64_t i) const {
        int64_t r = i / f, c = i - r * f;
        float x[8], y[8];
        cu_ld8(h + r * 2 * f + c, x);
        cu_ld8(h + r * 2 * f + f + c, y);
#pragma unroll
        for (int k = 0; k < 8; k++) x[k] = x[k] / (1.0f + expf(-x[k])) * y[k];
        cu_st8(o + i, x);
    }
};

/* The gate half of h as a view with out's shape. */
static moe_tensor swiglu_gate_view(const moe_tensor *h, int64_t f) {
    moe_tensor g = *h;
    g.shape[g.ndim - 1] = f;
    return g;
}

extern "C" moe_status moe_cuda_swiglu(const moe_kernel_args *a) {
    moe_tensor *o = a->out;
    const moe_tensor *h = a->in[0];
    const int64_t f = cu_cols(o), n = moe_tensor_numel(o);
    if (moe_tensor_is_contiguous(o) && moe_tensor_is_contiguous(h) && f % 8 == 0 && cu_vec8_ok(n, {o->data, h->data}))
        CU_FLOAT_DISPATCH(o->dtype, "swiglu",
            return cu_vec8("swiglu", n, swiglu8_f<T>{(T *)o->data, (const T *)h->data, f});)
    moe_tensor hg = swiglu_gate_view(h, f);
    const moe_tensor *t[2] = {o, &hg};
    const int64_t up = f * h->strides[h->ndim - 1];
    CU_FLOAT_DISPATCH(o->dtype, "swiglu",
        return cu_elementwise("swiglu", t, swiglu_f<T>{(T *)o->data, (const T *)h->data, up});)
    return MOE_OK;
}

__device__ __forceinline__ void swiglu_grads(float g, float x, float y, float *gx, float *gy) {
    float s = sigmoidf_(x);
    *gx = g * y * s * (1.0f + x * (1.0f - s));
    *gy = g * x * s;
}

/* gh [.., 2f] from g [.., f] and h [.., 2f]; off = {gh gate, g, h gate}. */
template <class T> struct swiglu_bwd_f {
    T *gh;
    const T *g, *h;
    int64_t up_gh, up_h;
    __device__ void operator()(const int64_t *off) const {
        float gx, gy;
        swiglu_grads(ldf(g + off[1]), ldf(h + off[2]), ldf(h + off[2] + up_h), &gx, &gy);
        stf(gh + off[0], gx);
        stf(gh + off[0] + up_gh, gy);
    }
};

template <class T> struct swiglu_bwd8_f {
    T *gh;
    const T *g, *h;
    int64_t f;
    __device__ void operator()(int64_t i) const {
        int64_t r = i / f, c = i - r * f, at = r * 2 * f + c;
        float gv[8], x[8], y[8], gx[8], gy[8];
        cu_ld8(g + i, gv);
        cu_ld8(h + at, x);
        cu_ld8(h + at + f, y);
#pragma unroll
        for (int k = 0; k < 8; k++) swiglu_grads(gv[k], x[k], y[k], &gx[k], &gy[k]);
        cu_st8(gh + at, gx);
        cu_st8(gh + at + f, gy);
    }
};

extern "C" moe_status moe_cuda_swiglu_bwd(const moe_kernel_args *a) {
    moe_tensor *gh = a->out;
    const moe_tensor *g = a->in[0], *h = a->in[1];
    const int64_t f = cu_cols(g), n = moe_tensor_numel(g);
    if (moe_tensor_is_contiguous(gh) && moe_tensor_is_contiguous(g) && moe_tensor_is_contiguous(h) && f % 8 == 0 &&
        cu_vec8_ok(n, {gh->data, g->data, h->data}))
        CU_FLOAT_DISPATCH(gh->dtype, "swiglu_bwd",
            return cu_vec8("swiglu_bwd", n, swiglu_bwd8_f<T>{(T *)gh->data, (const T *)g->data, (const T *)h->data, f});)
    moe_tensor ghg = swiglu_gate_view(gh, f), hg = swiglu_gate_view(h, f);
    const moe_tensor *t[3] = {&ghg, g, &hg};
    const int64_t up_gh = f * gh->strides[gh->ndim - 1], up_h = f * h->strides[h->ndim - 1];
    CU_FLOAT_DISPATCH(gh->dtype, "swiglu_bwd",
        return cu_elementwise("swiglu_bwd", t, swiglu_bwd_f<T>{(T *)gh->data, (const T *)g->data, (const T *)h->data,
                                                              up_gh, up_h});)
    return MOE_OK;
}
