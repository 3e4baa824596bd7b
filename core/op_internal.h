/* Internal helpers for op front-ends and backward functions (core/ only). */
#ifndef MOE_CORE_OP_INTERNAL_H
#define MOE_CORE_OP_INTERNAL_H

#include "core/kernels.h"
#include "core/memory.h"
#include "core/ops.h"

/* Returns NULL from the calling op when any listed input is NULL (error already set). */
#define OP_NEED(...)                                                          \
    do {                                                                      \
        const moe_tensor *op_need_[] = {__VA_ARGS__};                         \
        for (size_t op_i_ = 0; op_i_ < sizeof op_need_ / sizeof *op_need_; op_i_++) \
            if (!op_need_[op_i_]) return NULL;                                \
    } while (0)

/* A new contiguous STEP tensor of the given shape on x's device. */
static inline moe_tensor *op_new(const moe_tensor *like, moe_dtype dt, int ndim, const int64_t *shape) {
    return moe_tensor_empty(MOE_LIFE_STEP, like->device, dt, ndim, shape);
}

/* Runs a kernel; on failure returns NULL from the calling op. */
#define OP_RUN(k, ...)                                                        \
    do {                                                                      \
        moe_kernel_args op_args_ = {__VA_ARGS__};                             \
        if (moe_kernel_run((k), &op_args_) != MOE_OK) return NULL;            \
    } while (0)

/* Same as OP_RUN for backward functions (void): the error is recorded for moe_backward. */
#define BWD_RUN(k, ...)                                                       \
    do {                                                                      \
        moe_kernel_args bwd_args_ = {__VA_ARGS__};                            \
        if (moe_kernel_run((k), &bwd_args_) != MOE_OK) {                      \
            moe_grad_give(n->in[0], NULL);                                    \
            return;                                                           \
        }                                                                     \
    } while (0)

/* "[2, 3] f32 cpu" style descriptions for messages: D(t) gives a temporary string. */
#define D(t) moe_tensor_describe((t), (char[96]){0}, 96)

/* Checks that all tensors share device and (for float ops) dtype; records the error. */
bool op_check_same(const char *op, int n, moe_tensor *const *ts, bool same_dtype);

/* A view of x with the given ndim and (broadcast-compatible) shape, stride 0 along the
 * broadcast dims; records nothing. */
moe_tensor *op_broadcast_view(moe_tensor *x, int ndim, const int64_t *shape);

/* Sums g over the broadcast dimensions so that it has `shape` (ndim <= g->ndim). */
moe_tensor *op_reduce_to_shape(moe_tensor *g, int ndim, const int64_t *shape);

/* Makes x contiguous without recording (for kernels that need it inside backward). */
moe_tensor *op_contiguous_nograd(const moe_tensor *x);

#endif
