/* CPU kernels: copy/cast, fill, binary (broadcast through strides), scalar, unary and
 * the unary backward, fused SwiGLU. Inputs arrive as views of out's shape. */
#include <math.h>
#include <string.h>

#include "core/cpu/cpu_common.h"
#include "core/cpu/fast_math.h"

moe_status moe_cpu_copy(const moe_kernel_args *a) {
    moe_tensor *o = a->out;
    const moe_tensor *x = a->in[0];
    const cpu_grid g = cpu_grid_make(o, 1, &x);
    int64_t so = cpu_grid_stride(&g, o), sx = cpu_grid_stride(&g, x);
    size_t es = moe_dtype_size(o->dtype);
    bool same = o->dtype == x->dtype;
    if (same && g.flat && sx == 1) {
        memcpy(o->data, x->data, (size_t)g.numel * es);
        return MOE_OK;
    }
_Pragma("omp parallel for schedule(static) if (g.numel > 32768)")
    for (int64_t r = 0; r < g.rows; r++) {
        char *po = (char *)o->data + cpu_grid_offset(&g, o, r) * (int64_t)es;
        const char *px = (const char *)x->data + cpu_grid_offset(&g, x, r) * (int64_t)moe_dtype_size(x->dtype);
        const int64_t cols = cpu_grid_cols(&g, r);
        if (same && es == 4) {
            for (int64_t c = 0; c < cols; c++) ((uint32_t *)po)[c * so] = ((const uint32_t *)px)[c * sx];
        } else if (same && es == 8) {
            for (int64_t c = 0; c < cols; c++) ((uint64_t *)po)[c * so] = ((const uint64_t *)px)[c * sx];
        } else if (same && es == 2) {
            for (int64_t c = 0; c < cols; c++) ((uint16_t *)po)[c * so] = ((const uint16_t *)px)[c * sx];
        } else {
            for (int64_t c = 0; c < cols; c++) cpu_store(po, o->dtype, c * so, cpu_load(px, x->dtype, c * sx));
        }
    }
    return MOE_OK;
}

moe_status moe_cpu_fill(const moe_kernel_args *a) {
    moe_tensor *o = a->out;
    double v = ((const moe_op_attrs_scalar *)a->attrs)->value;
    int64_t rows = cpu_rows(o), cols = cpu_cols(o), so = cpu_col_stride(o);
    if (v == 0.0 && moe_tensor_is_contiguous(o)) { /* zeroing grads and accumulators: split over threads */
        size_t bytes = (size_t)(rows * cols) * moe_dtype_size(o->dtype), piece = 1u << 20;
        int64_t n = (int64_t)((bytes + piece - 1) / piece);
#pragma omp parallel for schedule(static) if (n > 1)
        for (int64_t i = 0; i < n; i++) {
            size_t at = (size_t)i * piece;
            memset((char *)o->data + at, 0, bytes - at < piece ? bytes - at : piece);
        }
        return MOE_OK;
    }
    if (o->dtype == MOE_F32) { /* ones for the grads of sums, constants */
        const cpu_grid g = cpu_grid_make(o, 0, NULL);
        const float fv = (float)v;
        so = cpu_grid_stride(&g, o);
#pragma omp parallel for schedule(static) if (g.numel > 32768)
        for (int64_t r = 0; r < g.rows; r++) {
            float *po = (float *)o->data + cpu_grid_offset(&g, o, r);
            for (int64_t c = 0, n = cpu_grid_cols(&g, r); c < n; c++) po[c * so] = fv;
        }
        return MOE_OK;
    }
    for (int64_t r = 0; r < rows; r++) {
        int64_t off = cpu_row_offset(o, r);
        for (int64_t c = 0; c < cols; c++) cpu_store(o->data, o->dtype, off + c * so, v);
    }
    return MOE_OK;
}

moe_status moe_cpu_binary(const moe_kernel_args *a) {
    moe_tensor *o = a->out;
    const moe_tensor *x = a->in[0], *y = a->in[1];
    int op = ((const moe_op_attrs_scalar *)a->attrs)->op;
    const cpu_grid g = cpu_grid_make(o, 2, a->in);
    int64_t so = cpu_grid_stride(&g, o), sx = cpu_grid_stride(&g, x), sy = cpu_grid_stride(&g, y);
    CPU_FLOAT_DISPATCH(o->dtype, "binary",
_Pragma("omp parallel for schedule(static) if (g.numel > 32768)")
        for (int64_t r = 0; r < g.rows; r++) {
            T *po = (T *)o->data + cpu_grid_offset(&g, o, r);
            const T *px = (const T *)x->data + cpu_grid_offset(&g, x, r);
            const T *py = (const T *)y->data + cpu_grid_offset(&g, y, r);
            const int64_t cols = cpu_grid_cols(&g, r);
            switch (op) {
            case MOE_BIN_ADD: for (int64_t c = 0; c < cols; c++) po[c * so] = px[c * sx] + py[c * sy]; break;
            case MOE_BIN_SUB: for (int64_t c = 0; c < cols; c++) po[c * so] = px[c * sx] - py[c * sy]; break;
            case MOE_BIN_MUL: for (int64_t c = 0; c < cols; c++) po[c * so] = px[c * sx] * py[c * sy]; break;
            default: for (int64_t c = 0; c < cols; c++) po[c * so] = px[c * sx] / py[c * sy]; break;
            }
        })
    return MOE_OK;
}

moe_status moe_cpu_scalar(const moe_kernel_args *a) {
    moe_tensor *o = a->out;
    const moe_tensor *x = a->in[0];
    const moe_op_attrs_scalar *at = a->attrs;
    const cpu_grid g = cpu_grid_make(o, 1, &x);
    int64_t so = cpu_grid_stride(&g, o), sx = cpu_grid_stride(&g, x);
    CPU_FLOAT_DISPATCH(o->dtype, "scalar",
        T s = (T)at->value;
_Pragma("omp parallel for schedule(static) if (g.numel > 32768)")
        for (int64_t r = 0; r < g.rows; r++) {
            T *po = (T *)o->data + cpu_grid_offset(&g, o, r);
            const T *px = (const T *)x->data + cpu_grid_offset(&g, x, r);
            const int64_t cols = cpu_grid_cols(&g, r);
            switch (at->op) {
            case MOE_SC_ADD: for (int64_t c = 0; c < cols; c++) po[c * so] = px[c * sx] + s; break;
            case MOE_SC_MUL: for (int64_t c = 0; c < cols; c++) po[c * so] = px[c * sx] * s; break;
            default: for (int64_t c = 0; c < cols; c++) po[c * so] = pow(px[c * sx], s); break;
            }
        })
    return MOE_OK;
}

/* f(x) for every unary opcode, in T. */
#define UNARY_F(T, op, x)                                                                      \
    ((op) == MOE_UN_NEG ? -(x) : (op) == MOE_UN_EXP ? exp(x) : (op) == MOE_UN_LOG ? log(x)    \
     : (op) == MOE_UN_SQRT ? sqrt(x) : (op) == MOE_UN_RSQRT ? (T)1 / sqrt(x)                  \
     : (op) == MOE_UN_SIGMOID ? (T)1 / ((T)1 + exp(-(x))) : (op) == MOE_UN_TANH ? tanh(x)     \
     : (op) == MOE_UN_RELU ? ((x) > 0 ? (x) : (T)0) : (op) == MOE_UN_SILU ? (x) / ((T)1 + exp(-(x))) \
     : (op) == MOE_UN_GELU ? (T)0.5 * (x) * ((T)1 + tanh((T)0.7978845608028654 * ((x) + (T)0.044715 * (x) * (x) * (x)))) \
     : ((x) > 20 ? (x) : log1p(exp(x))))

moe_status moe_cpu_unary(const moe_kernel_args *a) {
    moe_tensor *o = a->out;
    const moe_tensor *x = a->in[0];
    int op = ((const moe_op_attrs_scalar *)a->attrs)->op;
    const cpu_grid g = cpu_grid_make(o, 1, &x);
    int64_t so = cpu_grid_stride(&g, o), sx = cpu_grid_stride(&g, x);
    CPU_FLOAT_DISPATCH(o->dtype, "unary",
_Pragma("omp parallel for schedule(static) if (g.numel > 16384)")
        for (int64_t r = 0; r < g.rows; r++) {
            T *po = (T *)o->data + cpu_grid_offset(&g, o, r);
            const T *px = (const T *)x->data + cpu_grid_offset(&g, x, r);
            const int64_t cols = cpu_grid_cols(&g, r);
            for (int64_t c = 0; c < cols; c++) {
                T v = px[c * sx];
                po[c * so] = UNARY_F(T, op, v);
            }
        })
    return MOE_OK;
}

/* g * f'(x), written with x (in[1]) and, where cheaper, y = f(x) (in[2]). */
moe_status moe_cpu_unary_bwd(const moe_kernel_args *a) {
    moe_tensor *o = a->out;
    const moe_tensor *g = a->in[0], *x = a->in[1], *y = a->in[2];
    int op = ((const moe_op_attrs_scalar *)a->attrs)->op;
    const cpu_grid gr = cpu_grid_make(o, 3, a->in);
    int64_t so = cpu_grid_stride(&gr, o), sg = cpu_grid_stride(&gr, g), sx = cpu_grid_stride(&gr, x),
            sy = cpu_grid_stride(&gr, y);
    CPU_FLOAT_DISPATCH(o->dtype, "unary_bwd",
_Pragma("omp parallel for schedule(static) if (gr.numel > 16384)")
        for (int64_t r = 0; r < gr.rows; r++) {
            T *po = (T *)o->data + cpu_grid_offset(&gr, o, r);
            const T *pg = (const T *)g->data + cpu_grid_offset(&gr, g, r);
            const T *px = (const T *)x->data + cpu_grid_offset(&gr, x, r);
            const T *py = (const T *)y->data + cpu_grid_offset(&gr, y, r);
            const int64_t cols = cpu_grid_cols(&gr, r);
            for (int64_t c = 0; c < cols; c++) {
                T gv = pg[c * sg], xv = px[c * sx], yv = py[c * sy], d;
                switch (op) {
                case MOE_UN_NEG: d = -1; break;
                case MOE_UN_EXP: d = yv; break;
                case MOE_UN_LOG: d = (T)1 / xv; break;
                case MOE_UN_SQRT: d = (T)0.5 / yv; break;
                case MOE_UN_RSQRT: d = (T)-0.5 * yv * yv * yv; break;
                case MOE_UN_SIGMOID: d = yv * ((T)1 - yv); break;
                case MOE_UN_TANH: d = (T)1 - yv * yv; break;
                case MOE_UN_RELU: d = xv > 0 ? (T)1 : (T)0; break;
                case MOE_UN_SILU: { T s = (T)1 / ((T)1 + exp(-xv)); d = s * ((T)1 + xv * ((T)1 - s)); } break;
                case MOE_UN_GELU: {
                    T k = (T)0.7978845608028654, u = k * (xv + (T)0.044715 * xv * xv * xv), t = tanh(u);
                    d = (T)0.5 * ((T)1 + t) + (T)0.5 * xv * ((T)1 - t * t) * k * ((T)1 + (T)0.134145 * xv * xv);
                } break;
                default: d = (T)1 / ((T)1 + exp(-xv)); break; /* softplus */
                }
                po[c * so] = gv * d;
            }
        })
    return MOE_OK;
}

/* The packed SwiGLU in bf16 (an expert run on the host beside a GPU, from its bf16 host
 * copy): each value through f32, one rounding, as the CUDA kernel does. */
static void swiglu_bf16(moe_tensor *o, const moe_tensor *h, int64_t rows, int64_t f, int64_t so, int64_t sh) {
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *po = (uint16_t *)o->data + cpu_row_offset(o, r);
        const uint16_t *px = (const uint16_t *)h->data + cpu_row_offset(h, r), *py = px + f * sh;
        for (int64_t c = 0; c < f; c++) {
            float v = moe_bf16_to_f32(px[c * sh]);
            po[c * so] = moe_f32_to_bf16(v / (1.0f + expf(-v)) * moe_bf16_to_f32(py[c * sh]));
        }
    }
}

/* Packed SwiGLU: row r of h holds the gate [0, f) then the up projection [f, 2f). */
moe_status moe_cpu_swiglu(const moe_kernel_args *a) {
    moe_tensor *o = a->out;
    const moe_tensor *h = a->in[0];
    int64_t rows = cpu_rows(o), f = cpu_cols(o);
    int64_t so = cpu_col_stride(o), sh = cpu_col_stride(h);
    if (o->dtype == MOE_BF16) {
        swiglu_bf16(o, h, rows, f, so, sh);
        return MOE_OK;
    }
    CPU_FLOAT_DISPATCH(o->dtype, "swiglu",
_Pragma("omp parallel for schedule(static) if (rows * f > 16384)")
        for (int64_t r = 0; r < rows; r++) {
            T *po = (T *)o->data + cpu_row_offset(o, r);
            const T *px = (const T *)h->data + cpu_row_offset(h, r), *py = px + f * sh;
            if (so == 1 && sh == 1) {
                _Pragma("omp simd")
                for (int64_t c = 0; c < f; c++) po[c] = px[c] / ((T)1 + cpu_exp(-px[c])) * py[c];
            } else {
                for (int64_t c = 0; c < f; c++) {
                    T v = px[c * sh];
                    po[c * so] = v / ((T)1 + cpu_exp(-v)) * py[c * sh];
                }
            }
        })
    return MOE_OK;
}

/* One row of the SwiGLU backward at the given strides (literal 1s give the unit-stride
 * loop, which vectorises without gathers). */
#define SWIGLU_BWD_ROW(T, sg, sh, sgh)                                                    \
    _Pragma("omp simd")                                                                   \
    for (int64_t c = 0; c < f; c++) {                                                     \
        T v = px[c * (sh)], s = (T)1 / ((T)1 + cpu_exp(-v));                              \
        T gv = pg[c * (sg)];                                                              \
        pa[c * (sgh)] = gv * py[c * (sh)] * s * ((T)1 + v * ((T)1 - s));                  \
        pb[c * (sgh)] = gv * v * s;                                                       \
    }

moe_status moe_cpu_swiglu_bwd(const moe_kernel_args *a) {
    moe_tensor *gh = a->out;
    const moe_tensor *g = a->in[0], *h = a->in[1];
    int64_t rows = cpu_rows(g), f = cpu_cols(g);
    int64_t sg = cpu_col_stride(g), sh = cpu_col_stride(h), sgh = cpu_col_stride(gh);
    const bool unit = sg == 1 && sh == 1 && sgh == 1;
    CPU_FLOAT_DISPATCH(gh->dtype, "swiglu_bwd",
_Pragma("omp parallel for schedule(static) if (rows * f > 16384)")
        for (int64_t r = 0; r < rows; r++) {
            T *pa = (T *)gh->data + cpu_row_offset(gh, r), *pb = pa + f * sgh;
            const T *pg = (const T *)g->data + cpu_row_offset(g, r);
            const T *px = (const T *)h->data + cpu_row_offset(h, r), *py = px + f * sh;
            if (unit) {
                SWIGLU_BWD_ROW(T, 1, 1, 1)
            } else {
                SWIGLU_BWD_ROW(T, sg, sh, sgh)
            }
        })
    return MOE_OK;
}
