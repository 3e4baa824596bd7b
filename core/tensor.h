/* Tensors: metadata (dtype, shape, strides, device) plus a view into storage.
 *
 * Memory is organised by lifetime (core/memory.h). Tensors made by ops during a step
 * live in the STEP arena and vanish at moe_step_reset(); parameters, gradients,
 * optimizer state and caches are PERSIST tensors freed with moe_tensor_free().
 * Strides are in elements. `data` points at the view's first element. */
#ifndef MOE_CORE_TENSOR_H
#define MOE_CORE_TENSOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

#define MOE_MAX_DIMS 6

typedef enum moe_dtype { MOE_F32, MOE_BF16, MOE_F64, MOE_I32, MOE_I64, MOE_DTYPE_COUNT } moe_dtype;
typedef enum moe_device { MOE_CPU, MOE_CUDA, MOE_DEVICE_COUNT } moe_device;
typedef enum moe_lifetime {
    MOE_LIFE_STEP,    /* activations and scratch: bump arena, reset every step */
    MOE_LIFE_PERSIST, /* parameters, grads, optimizer state, KV caches: freed explicitly */
} moe_lifetime;

struct moe_node;

typedef struct moe_tensor {
    moe_dtype dtype;
    moe_device device;
    moe_lifetime life;
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    int64_t strides[MOE_MAX_DIMS];
    void *data;               /* first element of this view */
    void *base;               /* allocation owned by this tensor (NULL for views / STEP) */
    struct moe_tensor *grad;  /* d loss / d this, same shape, contiguous */
    struct moe_node *node;    /* tape node that produced it; NULL for leaves */
    bool requires_grad;
    bool is_param;            /* leaf whose grad persists and accumulates across backward calls */
    const char *name;         /* parameters: stable name used in checkpoints */
} moe_tensor;

size_t moe_dtype_size(moe_dtype dt);
const char *moe_dtype_name(moe_dtype dt);
const char *moe_device_name(moe_device dev);
bool moe_dtype_is_float(moe_dtype dt);

/* Creation. STEP tensors come from the step arena; PERSIST ones from the heap / device.
 * Return NULL with moe_last_error() set when memory runs out. */
moe_tensor *moe_tensor_empty(moe_lifetime life, moe_device dev, moe_dtype dt, int ndim,
                             const int64_t *shape);
moe_tensor *moe_tensor_zeros(moe_lifetime life, moe_device dev, moe_dtype dt, int ndim,
                             const int64_t *shape);
moe_tensor *moe_tensor_empty_like(const moe_tensor *t);
/* Copies host data of dtype `dt` into a new tensor. */
moe_tensor *moe_tensor_from_host(moe_lifetime life, moe_device dev, moe_dtype dt, int ndim,
                                 const int64_t *shape, const void *host);
/* Normal(0, std) from the counter-based RNG: element i takes counter (offset + i), so
 * the values do not depend on the device or the number of ranks. */
moe_tensor *moe_tensor_randn(moe_lifetime life, moe_device dev, moe_dtype dt, int ndim,
                             const int64_t *shape, uint64_t seed, uint64_t offset, double std);
/* How a parameter is first filled: drawn (training from scratch) or zeros (a loader
 * then writes every value, so drawing would be wasted). */
typedef enum moe_init_mode { MOE_INIT_RANDOM = 0, MOE_INIT_ZEROS } moe_init_mode;
/* moe_tensor_randn under MOE_INIT_RANDOM, moe_tensor_zeros under MOE_INIT_ZEROS. */
moe_tensor *moe_tensor_init_normal(moe_init_mode mode, moe_lifetime life, moe_device dev, moe_dtype dt, int ndim,
                                   const int64_t *shape, uint64_t seed, uint64_t offset, double std);
/* Uniform[lo, hi) integers, stored as `dt` (I32/I64), same counters rule. */
moe_tensor *moe_tensor_randint(moe_lifetime life, moe_device dev, moe_dtype dt, int ndim,
                               const int64_t *shape, uint64_t seed, int64_t lo, int64_t hi);
void moe_tensor_free(moe_tensor *t);

/* Fills in place (no autograd). */
moe_status moe_tensor_fill(moe_tensor *t, double value);
moe_status moe_tensor_copy_(moe_tensor *dst, const moe_tensor *src); /* any strides, dtype cast */
/* Host data of t's dtype into contiguous t, in stream order (the host buffer may be reused
 * at once): new contents for a persistent input of a recorded graph. */
moe_status moe_tensor_write_host(moe_tensor *t, const void *host);
/* A contiguous copy of `t` on `dev` (same lifetime rules as empty). */
moe_tensor *moe_tensor_to(const moe_tensor *t, moe_device dev, moe_lifetime life);
/* Reads the whole tensor into a host double array (test and logging helper). */
moe_status moe_tensor_to_host_f64(const moe_tensor *t, double *out);
double moe_tensor_item(const moe_tensor *t);

int64_t moe_tensor_numel(const moe_tensor *t);
bool moe_tensor_is_contiguous(const moe_tensor *t);
/* The stride between rows when t is a stack of contiguous rows (its last axis of unit
 * stride, all leading axes collapsing to one stride, as a slice of the columns of a
 * contiguous matrix does); 0 otherwise. A contiguous t gives its row length. */
int64_t moe_tensor_row_stride(const moe_tensor *t);
/* Strides of t's elements seen as `shape` (same count) without moving them, when its
 * layout allows (PyTorch's view rule: only runs of axes that are contiguous among
 * themselves merge or split); false when a copy is needed. */
bool moe_view_strides(const moe_tensor *t, int ndim, const int64_t *shape, int64_t *strides);
bool moe_tensor_same_shape(const moe_tensor *a, const moe_tensor *b);
/* "[2, 3, 4] f32 cuda" into buf; returns buf. */
const char *moe_tensor_describe(const moe_tensor *t, char *buf, size_t cap);
void moe_strides_contiguous(int ndim, const int64_t *shape, int64_t *strides);

/* Metadata-only view sharing storage (no autograd; the autograd-aware views are ops). */
moe_tensor *moe_tensor_view_raw(const moe_tensor *t, int ndim, const int64_t *shape,
                                const int64_t *strides, int64_t elem_offset);

/* bf16 <-> f32 (round to nearest even). */
static inline uint16_t moe_f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = {.f = f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u); /* NaN */
    uint32_t rounding = 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)((v.u + rounding) >> 16);
}
static inline float moe_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}

#endif
