/* Helpers shared by the CPU kernels: dtype dispatch, element load/store, row offsets.
 * Float kernels are written once over a type T (float or double) with <tgmath.h>, so
 * exp(x) is expf for float and exp for double. bf16 is storage-only on the CPU except
 * in matmul and copy. */
#ifndef MOE_CORE_CPU_COMMON_H
#define MOE_CORE_CPU_COMMON_H

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

#endif
