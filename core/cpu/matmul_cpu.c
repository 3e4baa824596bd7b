/* CPU matmul through oneDNN (f32, bf16) with a small primitive cache; a plain loop for
 * f64 (the gradient-check reference). Operands arrive as strided views, so transposed
 * operands need no copy: oneDNN reads any strides. */
#include <oneapi/dnnl/dnnl.h>
#include <stdlib.h>
#include <string.h>

#include "core/cpu/cpu_common.h"

#define MM_CACHE 128
#define MM_MAX_DIMS MOE_MAX_DIMS

typedef struct {
    int ndim;
    dnnl_dims_t da, sa, db, sb, dc, sc;
    moe_dtype dt_ab, dt_c;
    float alpha, beta;
    dnnl_primitive_t prim;
    dnnl_memory_desc_t ma, mb, mc, mscratch;
    size_t scratch_bytes;
} mm_entry;

static dnnl_engine_t engine;
static dnnl_stream_t stream;
static mm_entry cache[MM_CACHE];
static int cache_n, cache_next;
/* One scratchpad for all products (user mode), grown on demand and kept: oneDNN's own
 * per-call scratchpad allocations page-faulted on every large product. */
static void *scratch;
static size_t scratch_cap;

static dnnl_data_type_t dnnl_type(moe_dtype dt) { return dt == MOE_BF16 ? dnnl_bf16 : dnnl_f32; }

static moe_status dnnl_fail(const char *what, dnnl_status_t st) {
    return moe_error(MOE_ERR_DEVICE, "oneDNN %s failed (status %d)", what, (int)st);
}

/* Fills dims/strides of t, padded on the left with size-1 dims to `ndim`. */
static void fill_dims(const moe_tensor *t, int ndim, dnnl_dims_t d, dnnl_dims_t s) {
    int lead = ndim - t->ndim;
    for (int i = 0; i < ndim; i++) {
        d[i] = i < lead ? 1 : t->shape[i - lead];
        s[i] = i < lead ? 0 : t->strides[i - lead];
    }
    /* Size-1 dims may carry any stride; give them a harmless one. */
    for (int i = ndim - 1; i >= 0; i--)
        if (d[i] == 1) s[i] = (i + 1 < ndim) ? s[i + 1] * d[i + 1] : 1;
}

/* The engine and stream of every oneDNN matmul here, made on first use. */
static moe_status ensure_engine(void) {
    dnnl_status_t s;
    if (engine) return MOE_OK;
    if ((s = dnnl_engine_create(&engine, dnnl_cpu, 0)) != dnnl_success) return dnnl_fail("engine", s);
    if ((s = dnnl_stream_create(&stream, engine, dnnl_stream_default_flags)) != dnnl_success) {
        dnnl_engine_destroy(engine);
        engine = NULL;
        return dnnl_fail("stream", s);
    }
    return MOE_OK;
}

static mm_entry *get_primitive(const moe_tensor *A, const moe_tensor *B, const moe_tensor *C, float alpha,
                               float beta, moe_status *st) {
    mm_entry key;
    memset(&key, 0, sizeof key);
    key.ndim = C->ndim < 2 ? 2 : C->ndim;
    fill_dims(A, key.ndim, key.da, key.sa);
    fill_dims(B, key.ndim, key.db, key.sb);
    fill_dims(C, key.ndim, key.dc, key.sc);
    key.dt_ab = A->dtype;
    key.dt_c = C->dtype;
    key.alpha = alpha;
    key.beta = beta;
    size_t cmp = offsetof(mm_entry, prim);
    for (int i = 0; i < cache_n; i++)
        if (!memcmp(&cache[i], &key, cmp)) return &cache[i];
    dnnl_status_t s;
    if ((*st = ensure_engine()) != MOE_OK) return NULL;
    dnnl_memory_desc_init_by_strides(&key.ma, key.ndim, key.da, dnnl_type(A->dtype), key.sa);
    dnnl_memory_desc_init_by_strides(&key.mb, key.ndim, key.db, dnnl_type(B->dtype), key.sb);
    dnnl_memory_desc_init_by_strides(&key.mc, key.ndim, key.dc, dnnl_type(C->dtype), key.sc);
    dnnl_matmul_desc_t desc;
    if ((s = dnnl_matmul_desc_init(&desc, &key.ma, &key.mb, NULL, &key.mc)) != dnnl_success) { *st = dnnl_fail("matmul desc", s); return NULL; }
    dnnl_primitive_attr_t attr;
    dnnl_primitive_attr_create(&attr);
    dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user);
    if (alpha != 1.0f) dnnl_primitive_attr_set_output_scales(attr, 1, 0, &alpha);
    if (beta != 0.0f) {
        dnnl_post_ops_t po;
        dnnl_post_ops_create(&po);
        dnnl_post_ops_append_sum(po, beta);
        dnnl_primitive_attr_set_post_ops(attr, po);
        dnnl_post_ops_destroy(po);
    }
    dnnl_primitive_desc_t pd;
    s = dnnl_primitive_desc_create(&pd, &desc, attr, engine, NULL);
    dnnl_primitive_attr_destroy(attr);
    if (s != dnnl_success) { *st = dnnl_fail("matmul primitive desc", s); return NULL; }
    key.mscratch = *dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    key.scratch_bytes = dnnl_memory_desc_get_size(&key.mscratch);
    s = dnnl_primitive_create(&key.prim, pd);
    dnnl_primitive_desc_destroy(pd);
    if (s != dnnl_success) { *st = dnnl_fail("matmul primitive", s); return NULL; }
    mm_entry *slot;
    if (cache_n < MM_CACHE) {
        slot = &cache[cache_n++];
    } else {
        slot = &cache[cache_next];
        cache_next = (cache_next + 1) % MM_CACHE;
        dnnl_primitive_destroy(slot->prim);
    }
    *slot = key;
    return slot;
}

/* A 2-D view [rows, cols] of t when its leading dims fold into its rows (each dim's stride
 * is the extent of the dims after it), else false. */
static bool fold_rows(const moe_tensor *t, moe_tensor *v) {
    int nd = t->ndim;
    int64_t rows = t->shape[nd - 2], rs = t->strides[nd - 2];
    for (int d = nd - 3; d >= 0; d--) {
        if (t->shape[d] == 1) continue;
        if (rows == 1) rs = t->strides[d];
        else if (t->strides[d] != rows * rs) return false;
        rows *= t->shape[d];
    }
    *v = *t;
    v->ndim = 2;
    v->shape[0] = rows;
    v->shape[1] = t->shape[nd - 1];
    v->strides[0] = rs;
    v->strides[1] = t->strides[nd - 1];
    return true;
}

static bool blas_layout(const moe_tensor *t, bool *trans, int64_t *ld);

/* 2-D f32 products through oneDNN's shape-agnostic sgemm (transposed operands as such, no
 * reorder of a transposed weight, no primitive to create: an expert's rows follow the
 * routing, so a step meets new row counts all the time, and a new primitive costs 0.2-0.7
 * ms on 2 cores, about as much as the product; the sgemm runs within a few percent of a
 * cached primitive); false when the views do not fit it. */
static bool sgemm_2d(const moe_tensor *A, const moe_tensor *B, moe_tensor *C, float alpha, float beta) {
    bool ta, tb, tc;
    int64_t lda, ldb, ldc;
    if (A->dtype != MOE_F32 || B->dtype != MOE_F32 || C->dtype != MOE_F32 || A->ndim != 2 || B->ndim != 2 ||
        C->ndim != 2 || !blas_layout(A, &ta, &lda) || !blas_layout(B, &tb, &ldb) || !blas_layout(C, &tc, &ldc) || tc)
        return false;
    return cpu_gemm_f32(ta, tb, C->shape[0], C->shape[1], A->shape[1], alpha, A->data, lda, B->data, ldb, beta,
                        C->data, ldc);
}

/* Whether oneDNN has bf16 matmul kernels for this CPU (x86 needs AVX-512 for them), probed
 * once with a 2 x 2 product on the matmuls' engine. */
static bool bf16_native(void) {
    static int known = -1;
    if (known >= 0) return known;
    known = 0;
    if (ensure_engine() != MOE_OK) return false;
    dnnl_dims_t d = {2, 2};
    dnnl_memory_desc_t m;
    dnnl_matmul_desc_t desc;
    dnnl_primitive_desc_t pd;
    if (dnnl_memory_desc_init_by_tag(&m, 2, d, dnnl_bf16, dnnl_ab) == dnnl_success &&
        dnnl_matmul_desc_init(&desc, &m, &m, NULL, &m) == dnnl_success &&
        dnnl_primitive_desc_create(&pd, &desc, NULL, engine, NULL) == dnnl_success) {
        known = 1;
        dnnl_primitive_desc_destroy(pd);
    }
    return known;
}

/* A dense f32 copy of the strided view t in *w (w->data = a new buffer, freed by the
 * caller); the values copied only when `values`. NULL when the host memory runs out. */
static float *widened(const moe_tensor *t, moe_tensor *w, bool values) {
    int64_t n = moe_tensor_numel(t);
    float *buf = malloc(sizeof *buf * (size_t)(n > 0 ? n : 1));
    if (!buf) return NULL;
    *w = *t;
    w->dtype = MOE_F32;
    w->data = buf;
    int64_t step = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        w->strides[d] = step;
        step *= t->shape[d];
    }
    if (values) moe_cpu_copy(&(moe_kernel_args){.out = w, .in = {t}});
    return buf;
}

static moe_status matmul_dnnl(const moe_tensor *A, const moe_tensor *B, moe_tensor *C, float alpha, float beta);

/* A bf16 product on a CPU without oneDNN bf16 kernels: the operands widened to f32 (exact),
 * the f32 product, the result rounded into C. oneDNN's bf16 kernels also accumulate in f32,
 * so only the order of the sums differs. */
static moe_status matmul_widened(const moe_tensor *A, const moe_tensor *B, moe_tensor *C, float alpha, float beta) {
    moe_tensor a, b, c;
    float *pa = widened(A, &a, true), *pb = widened(B, &b, true), *pc = widened(C, &c, beta != 0.0f);
    moe_status st = pa && pb && pc ? matmul_dnnl(&a, &b, &c, alpha, beta)
                                   : moe_error(MOE_ERR_OOM, "matmul: out of host memory widening bf16 operands");
    if (st == MOE_OK) st = moe_cpu_copy(&(moe_kernel_args){.out = C, .in = {&c}});
    free(pa);
    free(pb);
    free(pc);
    return st;
}

/* C = alpha * A @ B + beta * C on strided views (batch dims broadcast). A batch against a
 * shared 2-D B whose batch dims fold into the rows of A and C runs as one 2-D product
 * (the projections of [B, T, d] activations): one GEMM over all rows rather than a batch
 * of short ones. */
static moe_status matmul_dnnl(const moe_tensor *A, const moe_tensor *B, moe_tensor *C, float alpha, float beta) {
    moe_status st = MOE_OK;
    moe_tensor a2, c2;
    if (A->ndim > 2 && B->ndim == 2 && fold_rows(A, &a2) && fold_rows(C, &c2)) {
        A = &a2;
        C = &c2;
    }
    if (sgemm_2d(A, B, C, alpha, beta)) return MOE_OK;
    if ((A->dtype == MOE_BF16 || B->dtype == MOE_BF16 || C->dtype == MOE_BF16) && !bf16_native())
        return matmul_widened(A, B, C, alpha, beta);
    mm_entry *e = get_primitive(A, B, C, alpha, beta, &st);
    if (!e) return st;
    if (e->scratch_bytes > scratch_cap) {
        free(scratch);
        scratch_cap = 0;
        scratch = aligned_alloc(4096, (e->scratch_bytes + 4095) / 4096 * 4096);
        if (!scratch) return moe_error(MOE_ERR_OOM, "matmul: out of host memory for a %zu-byte scratchpad", e->scratch_bytes);
        scratch_cap = e->scratch_bytes;
    }
    dnnl_memory_t ma, mb, mc, ms;
    dnnl_memory_create(&ma, &e->ma, engine, A->data);
    dnnl_memory_create(&mb, &e->mb, engine, B->data);
    dnnl_memory_create(&mc, &e->mc, engine, C->data);
    dnnl_memory_create(&ms, &e->mscratch, engine, scratch);
    dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}, {DNNL_ARG_SCRATCHPAD, ms}};
    dnnl_status_t s = dnnl_primitive_execute(e->prim, stream, 4, args);
    if (s == dnnl_success) s = dnnl_stream_wait(stream);
    dnnl_memory_destroy(ma);
    dnnl_memory_destroy(mb);
    dnnl_memory_destroy(mc);
    dnnl_memory_destroy(ms);
    return s == dnnl_success ? MOE_OK : dnnl_fail("matmul execute", s);
}

/* f64 reference: any strides, batch dims broadcast from the left. */
static moe_status matmul_f64(const moe_tensor *A, const moe_tensor *B, moe_tensor *C, double alpha, double beta) {
    int nd = C->ndim;
    int64_t M = C->shape[nd - 2], N = C->shape[nd - 1], K = A->shape[A->ndim - 1];
    int64_t batch = 1;
    for (int d = 0; d < nd - 2; d++) batch *= C->shape[d];
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t bi = 0; bi < batch; bi++) {
        for (int64_t m = 0; m < M; m++) {
            int64_t oa = 0, ob = 0, oc = 0, rem = bi;
            for (int d = nd - 3; d >= 0; d--) {
                int64_t i = rem % C->shape[d];
                rem /= C->shape[d];
                oc += i * C->strides[d];
                int da = d - (nd - A->ndim), db = d - (nd - B->ndim);
                if (da >= 0 && A->shape[da] > 1) oa += i * A->strides[da];
                if (db >= 0 && B->shape[db] > 1) ob += i * B->strides[db];
            }
            const double *pa = (const double *)A->data + oa + m * A->strides[A->ndim - 2];
            const double *pb = (const double *)B->data + ob;
            double *pc = (double *)C->data + oc + m * C->strides[nd - 2];
            for (int64_t n = 0; n < N; n++) {
                double acc = 0;
                for (int64_t k = 0; k < K; k++)
                    acc += pa[k * A->strides[A->ndim - 1]] * pb[k * B->strides[B->ndim - 2] + n * B->strides[B->ndim - 1]];
                double *c = pc + n * C->strides[nd - 1];
                *c = alpha * acc + (beta != 0 ? beta * *c : 0);
            }
        }
    }
    return MOE_OK;
}

moe_status moe_cpu_matmul(const moe_kernel_args *a) {
    const moe_matmul_attrs *at = a->attrs;
    if (a->in[0]->dtype == MOE_F64) return matmul_f64(a->in[0], a->in[1], a->out, at->alpha, at->beta);
    if (a->in[0]->dtype != MOE_F32 && a->in[0]->dtype != MOE_BF16)
        return moe_error(MOE_ERR_UNSUPPORTED, "matmul: dtype %s not supported on cpu", moe_dtype_name(a->in[0]->dtype));
    return matmul_dnnl(a->in[0], a->in[1], a->out, at->alpha, at->beta);
}

moe_status moe_cpu_gemm(const moe_tensor *A, const moe_tensor *B, moe_tensor *C, float alpha, float beta) {
    if (A->dtype == MOE_F64) return matmul_f64(A, B, C, alpha, beta);
    return matmul_dnnl(A, B, C, alpha, beta);
}

bool cpu_gemm_f32(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float *A, int64_t lda,
                  const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    return dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, alpha, A, lda, B, ldb, beta, C, ldc) == dnnl_success;
}

bool cpu_gemm_f64(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double *A, int64_t lda,
                  const double *B, int64_t ldb, double beta, double *C, int64_t ldc) {
    for (int64_t i = 0; i < m; i++) {
        for (int64_t j = 0; j < n; j++) {
            double acc = 0;
            for (int64_t p = 0; p < k; p++) acc += A[ta ? p * lda + i : i * lda + p] * B[tb ? j * ldb + p : p * ldb + j];
            double *c = C + i * ldc + j;
            *c = alpha * acc + (beta != 0 ? beta * *c : 0);
        }
    }
    return true;
}

/* Whether a 2-D view [r, c] is a row-major matrix, transposed (*trans) or not, with row
 * stride *ld as stored: its rows or its columns must be contiguous. */
static bool blas_layout(const moe_tensor *t, bool *trans, int64_t *ld) {
    int64_t r = t->shape[0], c = t->shape[1], s0 = t->strides[0], s1 = t->strides[1];
    if ((s1 == 1 || c == 1) && (s0 >= c || r == 1)) {
        *trans = false;
        *ld = s0 > c ? s0 : c;
        return true;
    }
    if ((s0 == 1 || r == 1) && (s1 >= r || c == 1)) {
        *trans = true;
        *ld = s1 > r ? s1 : r;
        return true;
    }
    return false;
}

const char *moe_cpu_dnnl_version(void) {
    static char buf[32];
    const dnnl_version_t *v = dnnl_version();
    snprintf(buf, sizeof buf, "%d.%d.%d", v->major, v->minor, v->patch);
    return buf;
}
