/* Tensor creation, metadata helpers and host transfers. */
#include "core/tensor.h"

#include <stdarg.h>
#include <string.h>

#include "core/graph.h"
#include "core/kernels.h"
#include "core/memory.h"
#include "core/philox.h"

size_t moe_dtype_size(moe_dtype dt) {
    static const size_t sizes[MOE_DTYPE_COUNT] = {4, 2, 8, 4, 8};
    MOE_ASSERT(dt >= 0 && dt < MOE_DTYPE_COUNT, "bad dtype %d", dt);
    return sizes[dt];
}

const char *moe_dtype_name(moe_dtype dt) {
    static const char *names[MOE_DTYPE_COUNT] = {"f32", "bf16", "f64", "i32", "i64"};
    return (dt >= 0 && dt < MOE_DTYPE_COUNT) ? names[dt] : "?";
}

const char *moe_device_name(moe_device dev) { return dev == MOE_CUDA ? "cuda" : "cpu"; }
bool moe_dtype_is_float(moe_dtype dt) { return dt == MOE_F32 || dt == MOE_BF16 || dt == MOE_F64; }

void moe_strides_contiguous(int ndim, const int64_t *shape, int64_t *strides) {
    int64_t s = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        strides[i] = s;
        s *= shape[i];
    }
}

int64_t moe_tensor_numel(const moe_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

bool moe_tensor_is_contiguous(const moe_tensor *t) {
    int64_t s = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] != 1 && t->strides[i] != s) return false;
        s *= t->shape[i];
    }
    return true;
}

int64_t moe_tensor_row_stride(const moe_tensor *t) {
    if (t->ndim == 0) return 1;
    const int64_t d = t->shape[t->ndim - 1];
    if (d != 1 && t->strides[t->ndim - 1] != 1) return 0;
    int64_t ld = 0, next = 0; /* ld: the row stride; next: what the axis above must step by */
    for (int i = t->ndim - 2; i >= 0; i--) {
        if (t->shape[i] == 1) continue;
        if (!ld) ld = t->strides[i];
        else if (t->strides[i] != next) return 0;
        next = t->strides[i] * t->shape[i];
    }
    if (!ld) return d;
    return ld >= d ? ld : 0;
}

bool moe_view_strides(const moe_tensor *t, int ndim, const int64_t *shape, int64_t *strides) {
    if (moe_tensor_numel(t) == 0 || moe_tensor_is_contiguous(t)) {
        moe_strides_contiguous(ndim, shape, strides);
        return true;
    }
    int view_d = ndim - 1;
    int64_t base = t->strides[t->ndim - 1], tensor_n = 1, view_n = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        tensor_n *= t->shape[d];
        if (d > 0 && (t->shape[d - 1] == 1 || t->strides[d - 1] == tensor_n * base)) continue;
        /* axes d .. end of this chunk are contiguous among themselves: the view's axes take them */
        while (view_d >= 0 && (view_n < tensor_n || shape[view_d] == 1)) {
            strides[view_d] = view_n * base;
            view_n *= shape[view_d];
            view_d--;
        }
        if (view_n != tensor_n) return false;
        if (d > 0) {
            base = t->strides[d - 1];
            tensor_n = view_n = 1;
        }
    }
    return view_d == -1;
}

bool moe_tensor_same_shape(const moe_tensor *a, const moe_tensor *b) {
    if (a->ndim != b->ndim) return false;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return false;
    return true;
}

const char *moe_tensor_describe(const moe_tensor *t, char *buf, size_t cap) {
    if (!t) {
        snprintf(buf, cap, "(null)");
        return buf;
    }
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < t->ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    if (n < cap) snprintf(buf + n, cap - n, "] %s %s", moe_dtype_name(t->dtype), moe_device_name(t->device));
    return buf;
}

static moe_tensor *tensor_struct(moe_lifetime life) {
    moe_tensor *t = life == MOE_LIFE_STEP ? moe_step_host_alloc(sizeof *t) : calloc(1, sizeof *t);
    if (!t) moe_error(MOE_ERR_OOM, "out of host memory for a tensor header");
    return t;
}

moe_tensor *moe_tensor_empty(moe_lifetime life, moe_device dev, moe_dtype dt, int ndim, const int64_t *shape) {
    MOE_ASSERT(ndim >= 0 && ndim <= MOE_MAX_DIMS, "ndim %d out of range", ndim);
    moe_tensor *t = tensor_struct(life);
    if (!t) return NULL;
    t->dtype = dt;
    t->device = dev;
    t->life = life;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) {
        MOE_ASSERT(shape[i] >= 0, "negative dim %lld", (long long)shape[i]);
        t->shape[i] = shape[i];
    }
    moe_strides_contiguous(ndim, t->shape, t->strides);
    size_t bytes = (size_t)moe_tensor_numel(t) * moe_dtype_size(dt);
    t->data = moe_mem_alloc(dev, life, bytes ? bytes : 1);
    if (!t->data) {
        if (life != MOE_LIFE_STEP) free(t);
        return NULL;
    }
    if (life != MOE_LIFE_STEP) t->base = t->data;
    return t;
}

moe_tensor *moe_tensor_empty_like(const moe_tensor *t) {
    return moe_tensor_empty(MOE_LIFE_STEP, t->device, t->dtype, t->ndim, t->shape);
}

moe_tensor *moe_tensor_zeros(moe_lifetime life, moe_device dev, moe_dtype dt, int ndim, const int64_t *shape) {
    moe_tensor *t = moe_tensor_empty(life, dev, dt, ndim, shape);
    if (t && moe_tensor_fill(t, 0.0) != MOE_OK) {
        moe_tensor_free(t);
        return NULL;
    }
    return t;
}

moe_tensor *moe_tensor_from_host(moe_lifetime life, moe_device dev, moe_dtype dt, int ndim,
                                 const int64_t *shape, const void *host) {
    if (moe_graph_guard(dev, "a tensor from host memory") != MOE_OK) return NULL;
    moe_tensor *t = moe_tensor_empty(life, dev, dt, ndim, shape);
    if (!t) return NULL;
    size_t bytes = (size_t)moe_tensor_numel(t) * moe_dtype_size(dt);
    if (bytes && moe_backend_get(dev)->memcpy_to(t->data, host, bytes, MOE_CPU) != MOE_OK) {
        moe_tensor_free(t);
        return NULL;
    }
    return t;
}

/* Fills a host buffer of dtype dt from a double generator, then uploads. */
static moe_tensor *tensor_generate(moe_lifetime life, moe_device dev, moe_dtype dt, int ndim,
                                   const int64_t *shape, double (*gen)(int64_t i, const void *ctx),
                                   const void *ctx) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    void *host = malloc((size_t)(n ? n : 1) * moe_dtype_size(dt));
    if (!host) {
        moe_error(MOE_ERR_OOM, "out of host memory generating %lld values", (long long)n);
        return NULL;
    }
    /* The generators are counter-based (value i depends on i alone): any split of the loop
     * gives the same values, and a model of billions of parameters initialises in seconds. */
#pragma omp parallel for schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; i++) {
        double v = gen(i, ctx);
        switch (dt) {
        case MOE_F32: ((float *)host)[i] = (float)v; break;
        case MOE_BF16: ((uint16_t *)host)[i] = moe_f32_to_bf16((float)v); break;
        case MOE_F64: ((double *)host)[i] = v; break;
        case MOE_I32: ((int32_t *)host)[i] = (int32_t)v; break;
        case MOE_I64: ((int64_t *)host)[i] = (int64_t)v; break;
        default: MOE_ASSERT(0, "bad dtype");
        }
    }
    moe_tensor *t = moe_tensor_from_host(life, dev, dt, ndim, shape, host);
    free(host);
    return t;
}

typedef struct { uint64_t seed, offset; double std; int64_t lo, hi; } gen_ctx;

static double gen_normal(int64_t i, const void *c) {
    const gen_ctx *g = c;
    return g->std * moe_philox_normal(g->offset + (uint64_t)i, g->seed);
}

static double gen_int(int64_t i, const void *c) {
    const gen_ctx *g = c;
    uint64_t span = (uint64_t)(g->hi - g->lo);
    moe_philox_u4 r = moe_philox4x32((uint64_t)i, g->seed ^ 0x5bd1e995u);
    uint64_t bits = ((uint64_t)r.v[0] << 32) | r.v[1];
    return (double)(g->lo + (int64_t)(bits % span));
}

moe_tensor *moe_tensor_randn(moe_lifetime life, moe_device dev, moe_dtype dt, int ndim,
                             const int64_t *shape, uint64_t seed, uint64_t offset, double std) {
    gen_ctx g = {.seed = seed, .offset = offset, .std = std};
    return tensor_generate(life, dev, dt, ndim, shape, gen_normal, &g);
}

moe_tensor *moe_tensor_init_normal(moe_init_mode mode, moe_lifetime life, moe_device dev, moe_dtype dt, int ndim,
                                   const int64_t *shape, uint64_t seed, uint64_t offset, double std) {
    if (mode == MOE_INIT_ZEROS) return moe_tensor_zeros(life, dev, dt, ndim, shape);
    return moe_tensor_randn(life, dev, dt, ndim, shape, seed, offset, std);
}

moe_tensor *moe_tensor_randint(moe_lifetime life, moe_device dev, moe_dtype dt, int ndim,
                               const int64_t *shape, uint64_t seed, int64_t lo, int64_t hi) {
    MOE_ASSERT(hi > lo, "empty range [%lld, %lld)", (long long)lo, (long long)hi);
    gen_ctx g = {.seed = seed, .lo = lo, .hi = hi};
    return tensor_generate(life, dev, dt, ndim, shape, gen_int, &g);
}

void moe_tensor_free(moe_tensor *t) {
    if (!t || t->life == MOE_LIFE_STEP) return;
    if (t->grad && t->grad != t) moe_tensor_free(t->grad);
    if (t->base) {
        size_t bytes = (size_t)moe_tensor_numel(t) * moe_dtype_size(t->dtype);
        moe_mem_free(t->device, t->life, t->base, bytes ? bytes : 1);
    }
    free(t);
}

moe_status moe_tensor_fill(moe_tensor *t, double value) {
    moe_op_attrs_scalar a = {.op = 0, .value = value};
    moe_kernel_args args = {.out = t, .attrs = &a};
    return moe_kernel_run(MOE_K_FILL, &args);
}

moe_status moe_tensor_copy_(moe_tensor *dst, const moe_tensor *src) {
    char b1[96], b2[96];
    if (moe_tensor_numel(dst) != moe_tensor_numel(src) || !moe_tensor_same_shape(dst, src))
        return moe_error(MOE_ERR_INVALID, "copy: shape mismatch dst %s src %s",
                         moe_tensor_describe(dst, b1, sizeof b1), moe_tensor_describe(src, b2, sizeof b2));
    if (dst->device == src->device) {
        moe_kernel_args args = {.out = dst, .in = {src}};
        return moe_kernel_run(MOE_K_COPY, &args);
    }
    /* Across devices: make src contiguous in its dtype on its device, transfer, then cast/scatter. */
    MOE_TRY(moe_graph_guard(src->device, "a copy between devices"));
    MOE_TRY(moe_graph_guard(dst->device, "a copy between devices"));
    const moe_tensor *s = src;
    if (!moe_tensor_is_contiguous(src)) {
        moe_tensor *c = moe_tensor_empty(MOE_LIFE_STEP, src->device, src->dtype, src->ndim, src->shape);
        if (!c) return moe_last_status();
        moe_kernel_args args = {.out = c, .in = {src}};
        MOE_TRY(moe_kernel_run(MOE_K_COPY, &args));
        s = c;
    }
    moe_tensor *staged = moe_tensor_empty(MOE_LIFE_STEP, dst->device, src->dtype, src->ndim, src->shape);
    if (!staged) return moe_last_status();
    size_t bytes = (size_t)moe_tensor_numel(src) * moe_dtype_size(src->dtype);
    if (dst->device == MOE_CPU) {
        MOE_TRY(moe_backend_get(src->device)->memcpy_from(staged->data, s->data, bytes));
    } else {
        MOE_TRY(moe_backend_get(dst->device)->memcpy_to(staged->data, s->data, bytes, src->device));
    }
    moe_kernel_args args = {.out = dst, .in = {staged}};
    return moe_kernel_run(MOE_K_COPY, &args);
}

moe_status moe_tensor_write_host(moe_tensor *t, const void *host) {
    MOE_ASSERT(moe_tensor_is_contiguous(t), "write_host: needs a contiguous tensor");
    MOE_TRY(moe_graph_guard(t->device, "a write of host data"));
    size_t bytes = (size_t)moe_tensor_numel(t) * moe_dtype_size(t->dtype);
    return bytes ? moe_backend_get(t->device)->memcpy_to(t->data, host, bytes, MOE_CPU) : MOE_OK;
}

moe_tensor *moe_tensor_to(const moe_tensor *t, moe_device dev, moe_lifetime life) {
    moe_tensor *out = moe_tensor_empty(life, dev, t->dtype, t->ndim, t->shape);
    if (!out) return NULL;
    if (moe_tensor_copy_(out, t) != MOE_OK) {
        moe_tensor_free(out);
        return NULL;
    }
    return out;
}

moe_status moe_tensor_to_host_f64(const moe_tensor *t, double *out) {
    moe_tensor *h = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_F64, t->ndim, t->shape);
    if (!h) return moe_last_status();
    MOE_TRY(moe_tensor_copy_(h, t));
    memcpy(out, h->data, (size_t)moe_tensor_numel(t) * sizeof(double));
    return MOE_OK;
}

double moe_tensor_item(const moe_tensor *t) {
    MOE_ASSERT(moe_tensor_numel(t) == 1, "item() of a tensor with %lld elements", (long long)moe_tensor_numel(t));
    double v = 0;
    if (moe_tensor_to_host_f64(t, &v) != MOE_OK) return 0.0 / 0.0;
    return v;
}

moe_tensor *moe_tensor_view_raw(const moe_tensor *t, int ndim, const int64_t *shape,
                                const int64_t *strides, int64_t elem_offset) {
    moe_tensor *v = moe_step_host_alloc(sizeof *v);
    if (!v) {
        moe_error(MOE_ERR_OOM, "out of host memory for a view");
        return NULL;
    }
    v->dtype = t->dtype;
    v->device = t->device;
    v->life = MOE_LIFE_STEP;
    v->ndim = ndim;
    for (int i = 0; i < ndim; i++) {
        v->shape[i] = shape[i];
        v->strides[i] = strides[i];
    }
    v->data = (char *)t->data + elem_offset * (int64_t)moe_dtype_size(t->dtype);
    return v;
}

bool moe_check_failed(const char *op, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    moe_error(MOE_ERR_INVALID, "%s: %s", op, msg);
    return false;
}
