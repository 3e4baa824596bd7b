/* Helpers shared by the CPU kernels: dtype dispatch, element load/store, row offsets.
 * Float kernels are written once over a type T (float or double) with <tgmath.h>, so
 * exp(x) is expf for float and exp for double. bf16 is storage-only on the CPU except
 * in matmul and copy. */
#ifndef MOE_CORE_CPU_COMMON_H
#define MOE_CORE_CPU_COMMON_H

#include <stdbool.h>
#include <stdint.h>
#include <tgmath.h>

#include "core/kernels.h"

/* Runs the statements with T = float or double by the dtype; other dtypes are an error
 * that names the kernel. */
#define CPU_FLOAT_DISPATCH(dt, kname, ...)                                                  \
    switch (dt) {                                                                          \
    case MOE_F32: { typedef float T; __VA_ARGS__ } break;                                  \
    case MOE_F64: { typedef double T; __VA_ARGS__ } break;                                 \
    default:                                                                               \
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: dtype %s is not supported on cpu", kname, \
                         moe_dtype_name(dt));                                              \
    }

#define CPU_INT_DISPATCH(dt, kname, ...)                                                    \
    switch (dt) {                                                                          \
    case MOE_I32: { typedef int32_t T; __VA_ARGS__ } break;                                \
    case MOE_I64: { typedef int64_t T; __VA_ARGS__ } break;                                \
    default:                                                                               \
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: dtype %s is not an integer dtype", kname, \
                         moe_dtype_name(dt));                                              \
    }

static inline double cpu_load(const void *p, moe_dtype dt, int64_t i) {
    switch (dt) {
    case MOE_F32: return ((const float *)p)[i];
    case MOE_BF16: return moe_bf16_to_f32(((const uint16_t *)p)[i]);
    case MOE_F64: return ((const double *)p)[i];
    case MOE_I32: return ((const int32_t *)p)[i];
    case MOE_I64: return (double)((const int64_t *)p)[i];
    default: return 0;
    }
}

static inline void cpu_store(void *p, moe_dtype dt, int64_t i, double v) {
    switch (dt) {
    case MOE_F32: ((float *)p)[i] = (float)v; break;
    case MOE_BF16: ((uint16_t *)p)[i] = moe_f32_to_bf16((float)v); break;
    case MOE_F64: ((double *)p)[i] = v; break;
    case MOE_I32: ((int32_t *)p)[i] = (int32_t)v; break;
    case MOE_I64: ((int64_t *)p)[i] = (int64_t)v; break;
    default: break;
    }
}

/* Dense products for kernels that run their own (core/cpu/matmul_cpu.c): C = alpha * A @ B
 * + beta * C on strided views. 2-D f32 views (also batches that fold into rows) go to
 * oneDNN's shape-agnostic sgemm, other products to a oneDNN primitive cached per shape. */
moe_status moe_cpu_gemm(const moe_tensor *A, const moe_tensor *B, moe_tensor *C, float alpha, float beta);
/* The COPY kernel (core/cpu/elementwise_cpu.c): out <- in[0], same shape, any strides, the
 * dtype cast on the way. */
moe_status moe_cpu_copy(const moe_kernel_args *a);

/* Row-major blocks on raw pointers: C [m, n] = alpha * op(A) @ op(B) + beta * C, op(A)
 * [m, k], op(B) [k, n], op transposing when ta / tb; lda, ldb, ldc are the row strides of
 * A, B, C as stored; beta = 0 never reads C. Float goes to oneDNN's sgemm (one thread when
 * called inside a parallel region), double to a plain loop (the gradcheck reference).
 * False when oneDNN rejects the arguments. cpu_gemm picks by the type of C. */
bool cpu_gemm_f32(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float *A, int64_t lda,
                  const float *B, int64_t ldb, float beta, float *C, int64_t ldc);
bool cpu_gemm_f64(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double *A, int64_t lda,
                  const double *B, int64_t ldb, double beta, double *C, int64_t ldc);
#define cpu_gemm(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc) \
    _Generic((C), float *: cpu_gemm_f32, double *: cpu_gemm_f64)(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)

/* The combine's sum (core/cpu/index_cpu.c) on raw rows: out [Tn, d] row t = sum over j in
 * order of w[t, j] * y[src[t, j]] in the dtype's type, y [N, d] (w NULL: weights 1; src
 * NULL: row t k + j; a src of -1: none, others already checked). F32 / F64. */
moe_status cpu_combine_rows(moe_dtype dt, const void *y, const void *w, const int32_t *src, int64_t Tn, int64_t k,
                            int64_t d, void *out);

/* Rows = all dims but the last; a 0-d tensor is one row of one element. */
static inline int64_t cpu_rows(const moe_tensor *t) {
    int64_t r = 1;
    for (int d = 0; d < t->ndim - 1; d++) r *= t->shape[d];
    return r;
}
static inline int64_t cpu_cols(const moe_tensor *t) { return t->ndim ? t->shape[t->ndim - 1] : 1; }
static inline int64_t cpu_col_stride(const moe_tensor *t) { return t->ndim ? t->strides[t->ndim - 1] : 1; }

/* Element offset of the first element of row `row` (dims 0..ndim-2 in row-major order). */
static inline int64_t cpu_row_offset(const moe_tensor *t, int64_t row) {
    int64_t off = 0;
    for (int d = t->ndim - 2; d >= 0; d--) {
        int64_t i = row % t->shape[d];
        row /= t->shape[d];
        off += i * t->strides[d];
    }
    return off;
}

/* Elementwise iteration over out's shape. When every input is either contiguous with out's
 * shape or one value broadcast everywhere (all strides 0: the grad of a sum) and out is
 * contiguous, the elements are taken flat, cut into rows of CPU_FLAT_COLS: a tensor with
 * one long row (a flattened loss, a vector) then still splits over the threads, and the
 * inner loops run with unit (or zero) stride. Otherwise the rows are out's rows. */
#define CPU_FLAT_COLS 16384
typedef struct {
    int64_t rows, cols, numel;
    bool flat;
} cpu_grid;

static inline bool cpu_is_splat(const moe_tensor *t) {
    for (int d = 0; d < t->ndim; d++)
        if (t->strides[d] != 0) return false;
    return true;
}

static inline cpu_grid cpu_grid_make(const moe_tensor *o, int n_in, const moe_tensor *const *in) {
    bool flat = moe_tensor_is_contiguous(o);
    for (int i = 0; i < n_in && flat; i++)
        flat = (moe_tensor_is_contiguous(in[i]) && moe_tensor_same_shape(in[i], o)) || cpu_is_splat(in[i]);
    cpu_grid g = {.rows = cpu_rows(o), .cols = cpu_cols(o), .flat = flat};
    g.numel = g.rows * g.cols;
    if (flat) {
        g.rows = (g.numel + CPU_FLAT_COLS - 1) / CPU_FLAT_COLS;
        g.cols = CPU_FLAT_COLS;
    }
    return g;
}

/* Element offset in t of the grid's row r, the row's length, t's stride along it. */
static inline int64_t cpu_grid_offset(const cpu_grid *g, const moe_tensor *t, int64_t r) {
    return !g->flat ? cpu_row_offset(t, r) : cpu_is_splat(t) ? 0 : r * CPU_FLAT_COLS;
}
static inline int64_t cpu_grid_cols(const cpu_grid *g, int64_t r) {
    return g->flat && g->numel - r * CPU_FLAT_COLS < CPU_FLAT_COLS ? g->numel - r * CPU_FLAT_COLS : g->cols;
}
static inline int64_t cpu_grid_stride(const cpu_grid *g, const moe_tensor *t) {
    return !g->flat ? cpu_col_stride(t) : cpu_is_splat(t) ? 0 : 1;
}

#endif
