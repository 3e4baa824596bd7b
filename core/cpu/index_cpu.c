/* CPU kernels of the index family: row select / row add / row copy, the fused MoE combine
 * (combine: weighted sum of each token's expert rows, and its backward), last-axis
 * gather / scatter-add, top-k, stable argsort, bincount, cumsum, the routing plan.
 *
 * Conventions shared by these kernels (the front-ends in core/ops_index.c guarantee them):
 *  - every tensor handed to them is contiguous;
 *  - in[0] is the data operand, in[1] the I32 index tensor (combine: in[2]);
 *  - indices are validated before anything is written: a bad one returns MOE_ERR_INVALID
 *    naming the kernel, the first bad index, its position and the valid range, and leaves
 *    `out` untouched (this matters for the in-place INDEX_ADD / SCATTER_ADD);
 *  - the accumulating kernels (INDEX_ADD, SCATTER_ADD) are deterministic: each target
 *    element receives its contributions in ascending source order, whatever the thread
 *    count. On CUDA, INDEX_ADD is deterministic too (each target's sources summed in f32
 *    in a fixed order, rounded once); SCATTER_ADD uses atomics there and differs by
 *    rounding only. */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "core/cpu/cpu_common.h"
#include "core/cpu/fast_math.h"
#include "core/ops.h"

/* Runs the statements with T = an unsigned integer as wide as the element: kernels that
 * only move elements (select, gather) handle every dtype that way. */
#define CPU_BITS_DISPATCH(es, kname, ...)                                                   \
    switch (es) {                                                                          \
    case 2: { typedef uint16_t T; __VA_ARGS__ } break;                                     \
    case 4: { typedef uint32_t T; __VA_ARGS__ } break;                                     \
    case 8: { typedef uint64_t T; __VA_ARGS__ } break;                                     \
    default:                                                                               \
        return moe_error(MOE_ERR_UNSUPPORTED, "%s: elements of %zu bytes are not supported", kname, \
                         (size_t)(es));                                                    \
    }

/* Product of the dims after the first: the width of one row of a [N, ...] tensor. */
static int64_t row_width(const moe_tensor *t) {
    int64_t r = 1;
    for (int d = 1; d < t->ndim; d++) r *= t->shape[d];
    return r;
}

/* MOE_OK when every idx[i] lies in [0, hi); otherwise MOE_ERR_INVALID naming the kernel and
 * the first bad `what` (index, value), its position and the range. Used before any write. */
static moe_status check_indices(const char *kname, const char *what, const int32_t *idx, int64_t n, int64_t hi) {
    int64_t first = n;
#pragma omp parallel for reduction(min : first) schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++)
        if ((idx[i] < 0 || idx[i] >= hi) && i < first) first = i;
    if (first == n) return MOE_OK;
    return moe_error(MOE_ERR_INVALID, "%s: %s %d at position %lld is out of range [0, %lld)", kname, what,
                     (int)idx[first], (long long)first, (long long)hi);
}

/* INDEX_SELECT: in[0] = x [N, ...] (N rows of R = numel / N elements), in[1] = idx with M
 * elements (any shape, read flat), out holds M * R elements: out row i = x row idx[i].
 * Any dtype (rows are copied as bytes). */
moe_status moe_cpu_index_select(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0], *idx = a->in[1];
    int64_t n = x->ndim ? x->shape[0] : 1, r = row_width(x), m = moe_tensor_numel(idx);
    const int32_t *pi = (const int32_t *)idx->data;
    MOE_TRY(check_indices("index_select", "index", pi, m, n));
    size_t row_bytes = (size_t)r * moe_dtype_size(x->dtype);
    const char *px = (const char *)x->data;
    char *po = (char *)a->out->data;
#pragma omp parallel for schedule(static) if (m * r > 32768)
    for (int64_t i = 0; i < m; i++) memcpy(po + (size_t)i * row_bytes, px + (size_t)pi[i] * row_bytes, row_bytes);
    return MOE_OK;
}

/* INDEX_ADD, in place: out [N, ...] (N rows of R elements) is the accumulator, in[0] = src
 * with M * R elements, in[1] = idx with M elements: out row idx[i] += src row i.
 * Duplicates accumulate in ascending i: threads split the R columns, never the rows.
 * F32 / F64. */
moe_status moe_cpu_index_add(const moe_kernel_args *a) {
    moe_tensor *o = a->out;
    const moe_tensor *src = a->in[0], *idx = a->in[1];
    int64_t n = o->ndim ? o->shape[0] : 1, r = row_width(o), m = moe_tensor_numel(idx);
    const int32_t *pi = (const int32_t *)idx->data;
    MOE_TRY(check_indices("index_add", "index", pi, m, n));
    const int64_t block = 64; /* columns per task */
    int64_t nblocks = (r + block - 1) / block;
    CPU_FLOAT_DISPATCH(o->dtype, "index_add",
        T *po = (T *)o->data;
        const T *ps = (const T *)src->data;
_Pragma("omp parallel for schedule(static) if (m * r > 32768)")
        for (int64_t b = 0; b < nblocks; b++) {
            int64_t c0 = b * block, c1 = c0 + block < r ? c0 + block : r;
            for (int64_t i = 0; i < m; i++) {
                T *dst = po + (int64_t)pi[i] * r;
                const T *s = ps + i * r;
                for (int64_t c = c0; c < c1; c++) dst[c] += s[c];
            }
        })
    return MOE_OK;
}

/* INDEX_COPY, in place: out [N, ...] (N rows of R elements), in[0] = src with M * R
 * elements, in[1] = idx with M elements naming distinct rows: out row idx[i] = src row i.
 * Any dtype (rows are copied as bytes). */
moe_status moe_cpu_index_copy(const moe_kernel_args *a) {
    moe_tensor *o = a->out;
    const moe_tensor *src = a->in[0], *idx = a->in[1];
    int64_t n = o->ndim ? o->shape[0] : 1, r = row_width(o), m = moe_tensor_numel(idx);
    const int32_t *pi = (const int32_t *)idx->data;
    MOE_TRY(check_indices("index_copy", "index", pi, m, n));
    size_t es = moe_dtype_size(o->dtype), row_bytes = (size_t)r * es;
    size_t src_step = src->ndim == 2 ? (size_t)moe_tensor_row_stride(src) * es : row_bytes;
    const char *ps = (const char *)src->data;
    char *po = (char *)o->data;
#pragma omp parallel for schedule(static) if (m * r > 32768)
    for (int64_t i = 0; i < m; i++) memcpy(po + (size_t)pi[i] * row_bytes, ps + (size_t)i * src_step, row_bytes);
    return MOE_OK;
}

/* GATHER along the last axis: in[0] = x [..., n], in[1] = idx [..., k] (same leading
 * dims), out [..., k]: out[r, j] = x[r, idx[r, j]]. Any dtype. */
moe_status moe_cpu_gather(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0], *idx = a->in[1];
    moe_tensor *o = a->out;
    int64_t rows = cpu_rows(idx), n = cpu_cols(x), k = cpu_cols(idx);
    const int32_t *pi = (const int32_t *)idx->data;
    MOE_TRY(check_indices("gather", "index", pi, rows * k, n));
    CPU_BITS_DISPATCH(moe_dtype_size(x->dtype), "gather",
        const T *px = (const T *)x->data;
        T *po = (T *)o->data;
_Pragma("omp parallel for schedule(static) if (rows * k > 32768)")
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = 0; j < k; j++) po[r * k + j] = px[r * n + pi[r * k + j]];)
    return MOE_OK;
}

/* COMBINE: in[0] = y [N, d], in[1] = w [T, k] (NULL: all 1, the dispatch backward),
 * in[2] = src [T, k] (row of y or -1); out [T, d] row t = sum over j in order of
 * w[t, j] * y[src[t, j]]. F32 / F64. */
moe_status moe_cpu_combine(const moe_kernel_args *a) {
    const moe_tensor *y = a->in[0], *w = a->in[1], *src = a->in[2];
    moe_tensor *o = a->out;
    const int64_t N = y->shape[0], d = y->shape[1], Tn = src->shape[0], k = src->shape[1];
    const int32_t *ps = (const int32_t *)src->data;
    for (int64_t i = 0; i < Tn * k; i++)
        if (ps[i] < -1 || ps[i] >= N)
            return moe_error(MOE_ERR_INVALID, "combine: source row %d at position %lld is out of range [-1, %lld)",
                             (int)ps[i], (long long)i, (long long)N);
    return cpu_combine_rows(o->dtype, y->data, w ? w->data : NULL, ps, Tn, k, d, o->data);
}

moe_status cpu_combine_rows(moe_dtype dt, const void *y, const void *w, const int32_t *src, int64_t Tn, int64_t k,
                            int64_t d, void *out) {
    CPU_FLOAT_DISPATCH(dt, "combine",
        const T *py = y, *pw = w;
        T *po = out;
_Pragma("omp parallel for schedule(static) if (Tn * d > 32768)")
        for (int64_t t = 0; t < Tn; t++) {
            T *row = po + t * d;
            for (int64_t c = 0; c < d; c++) row[c] = 0;
            for (int64_t j = 0; j < k; j++) {
                const int64_t r = src ? src[t * k + j] : t * k + j;
                if (r < 0) continue;
                const T wv = pw ? pw[t * k + j] : (T)1, *yr = py + r * d;
                _Pragma("omp simd")
                for (int64_t c = 0; c < d; c++) row[c] += wv * yr[c];
            }
        })
    return MOE_OK;
}

/* COMBINE_BWD: in g [T, d], y [N, d], w [T, k], src [T, k]; out = gy [N, d] (each row
 * named once by src: checked), out2 = gw [T, k] (0 where src is -1). F32 / F64. */
moe_status moe_cpu_combine_bwd(const moe_kernel_args *a) {
    const moe_tensor *g = a->in[0], *y = a->in[1], *w = a->in[2], *src = a->in[3];
    moe_tensor *gy = a->out, *gw = a->out2;
    const int64_t N = y->shape[0], d = y->shape[1], Tn = w->shape[0], k = w->shape[1];
    const int32_t *ps = (const int32_t *)src->data;
    unsigned char *seen = calloc((size_t)(N > 0 ? N : 1), 1);
    if (!seen) return moe_error(MOE_ERR_OOM, "combine backward: out of host memory for %lld row marks", (long long)N);
    int64_t named = 0;
    for (int64_t i = 0; i < Tn * k; i++) {
        int32_t r = ps[i];
        if (r < 0) continue;
        if (r >= N || seen[r]) {
            free(seen);
            return moe_error(MOE_ERR_INVALID, "combine: source row %d at position %lld is %s", (int)r, (long long)i,
                             r >= N ? "out of range" : "named twice (src must name each row of y once)");
        }
        seen[r] = 1;
        named++;
    }
    free(seen);
    if (named != N)
        return moe_error(MOE_ERR_INVALID, "combine: src names %lld of y's %lld rows (each must be named once)",
                         (long long)named, (long long)N);
    CPU_FLOAT_DISPATCH(gy->dtype, "combine_bwd",
        const T *pg = (const T *)g->data, *py = (const T *)y->data, *pw = (const T *)w->data;
        T *pgy = (T *)gy->data, *pgw = (T *)gw->data;
_Pragma("omp parallel for schedule(static) if (Tn * d > 32768)")
        for (int64_t t = 0; t < Tn; t++) {
            const T *gr = pg + t * d;
            for (int64_t j = 0; j < k; j++) {
                int32_t r = ps[t * k + j];
                if (r < 0) {
                    pgw[t * k + j] = 0;
                    continue;
                }
                const T wv = pw[t * k + j], *yr = py + (int64_t)r * d;
                T *gyr = pgy + (int64_t)r * d, dot = 0;
                _Pragma("omp simd reduction(+ : dot)")
                for (int64_t c = 0; c < d; c++) {
                    dot += gr[c] * yr[c];
                    gyr[c] = wv * gr[c];
                }
                pgw[t * k + j] = dot;
            }
        })
    return MOE_OK;
}

/* SCATTER_ADD along the last axis, in place: out [..., n] is the accumulator, in[0] = src
 * [..., k], in[1] = idx [..., k] (same leading dims): out[r, idx[r, j]] += src[r, j].
 * Threads split the rows; within a row duplicates accumulate in ascending j. F32 / F64. */
moe_status moe_cpu_scatter_add(const moe_kernel_args *a) {
    moe_tensor *o = a->out;
    const moe_tensor *src = a->in[0], *idx = a->in[1];
    int64_t rows = cpu_rows(idx), n = cpu_cols(o), k = cpu_cols(idx);
    const int32_t *pi = (const int32_t *)idx->data;
    MOE_TRY(check_indices("scatter_add", "index", pi, rows * k, n));
    CPU_FLOAT_DISPATCH(o->dtype, "scatter_add",
        T *po = (T *)o->data;
        const T *ps = (const T *)src->data;
_Pragma("omp parallel for schedule(static) if (rows * k > 32768)")
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = 0; j < k; j++) po[r * n + pi[r * k + j]] += ps[r * k + j];)
    return MOE_OK;
}

/* Stable bottom-up merge sort of the positions idx[0..n) by key[idx[.]]: ascending, or
 * descending when `desc` (equal keys keep their order either way). Runs of 32 are
 * insertion-sorted first. tmp has room for n positions. NaN keys end up somewhere
 * unspecified but the result is still a permutation. */
#define SORT_RUN 32
#define DEFINE_SORT_IDX(SUF, KT)                                                            \
    static void sort_idx_##SUF(const KT *key, int32_t *idx, int32_t *tmp, int64_t n, bool desc) { \
        for (int64_t lo = 0; lo < n; lo += SORT_RUN) {                                     \
            int64_t hi = lo + SORT_RUN < n ? lo + SORT_RUN : n;                              \
            for (int64_t i = lo + 1; i < hi; i++) {                                        \
                int32_t v = idx[i];                                                        \
                int64_t j = i;                                                             \
                while (j > lo && (desc ? key[v] > key[idx[j - 1]] : key[v] < key[idx[j - 1]])) { \
                    idx[j] = idx[j - 1];                                                   \
                    j--;                                                                   \
                }                                                                          \
                idx[j] = v;                                                                \
            }                                                                              \
        }                                                                                  \
        int32_t *from = idx, *to = tmp;                                                    \
        for (int64_t w = SORT_RUN; w < n; w *= 2) {                                        \
            for (int64_t lo = 0; lo < n; lo += 2 * w) {                                    \
                int64_t mid = lo + w < n ? lo + w : n, hi = lo + 2 * w < n ? lo + 2 * w : n; \
                int64_t i = lo, j = mid, o = lo;                                           \
                while (i < mid && j < hi) {                                                \
                    KT kj = key[from[j]], ki = key[from[i]];                               \
                    to[o++] = (desc ? kj > ki : kj < ki) ? from[j++] : from[i++];          \
                }                                                                          \
                while (i < mid) to[o++] = from[i++];                                       \
                while (j < hi) to[o++] = from[j++];                                        \
            }                                                                              \
            int32_t *t = from;                                                             \
            from = to;                                                                     \
            to = t;                                                                        \
        }                                                                                  \
        if (from != idx) memcpy(idx, from, sizeof(int32_t) * (size_t)n);                  \
    }
DEFINE_SORT_IDX(f32, float)
DEFINE_SORT_IDX(f64, double)
DEFINE_SORT_IDX(i32, int32_t)

#define SORT_IDX(key, idx, tmp, n, desc)                                                    \
    _Generic((key), const float *: sort_idx_f32, const double *: sort_idx_f64,            \
             const int32_t *: sort_idx_i32)(key, idx, tmp, n, desc)

/* TOPK along the last axis: in[0] = x [..., n], out = values [..., k] (x's dtype), out2 =
 * indices [..., k] I32; attrs moe_topk_attrs, 1 <= k <= n. Each row is sorted descending,
 * equal values by ascending index. k <= 16 (the router: k <= 8 of <= 256 experts): one
 * pass per row keeping the best k in insertion order in the output row itself. Larger k:
 * a stable descending merge sort of the row's positions. Threads split the rows. F32 / F64. */
#define TOPK_SMALL 16
moe_status moe_cpu_topk(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    int64_t rows = cpu_rows(x), n = cpu_cols(x), k = ((const moe_topk_attrs *)a->attrs)->k;
    int32_t *pidx = (int32_t *)a->out2->data;
    bool failed = false;
    CPU_FLOAT_DISPATCH(x->dtype, "topk",
        const T *px = (const T *)x->data;
        T *pv = (T *)a->out->data;
_Pragma("omp parallel for schedule(static) reduction(|| : failed) if (rows * n > 8192)")
        for (int64_t r = 0; r < rows; r++) {
            const T *row = px + r * n;
            T *vals = pv + r * k;
            int32_t *ids = pidx + r * k;
            if (k <= TOPK_SMALL) {
                T bv[TOPK_SMALL]; /* the best so far, descending (locals: no aliasing with row) */
                int32_t bi[TOPK_SMALL];
                int64_t have = 0;
                for (int64_t j = 0; j < n; j++) {
                    T v = row[j];
                    if (have == k && !(v > bv[k - 1])) continue;
                    int64_t p = have < k ? have++ : k - 1; /* drop the last when full */
                    while (p > 0 && v > bv[p - 1]) {
                        bv[p] = bv[p - 1];
                        bi[p] = bi[p - 1];
                        p--;
                    }
                    bv[p] = v;
                    bi[p] = (int32_t)j;
                }
                memcpy(vals, bv, sizeof(T) * (size_t)k);
                memcpy(ids, bi, sizeof(int32_t) * (size_t)k);
            } else {
                int32_t *buf = malloc(sizeof(int32_t) * 2 * (size_t)n);
                if (!buf) {
                    failed = true;
                    continue;
                }
                for (int64_t j = 0; j < n; j++) buf[j] = (int32_t)j;
                SORT_IDX(row, buf, buf + n, n, true);
                for (int64_t j = 0; j < k; j++) {
                    ids[j] = buf[j];
                    vals[j] = row[buf[j]];
                }
                free(buf);
            }
        })
    if (failed) return moe_error(MOE_ERR_OOM, "topk: out of host memory for a sort buffer of %lld rows", (long long)n);
    return MOE_OK;
}

/* Stable ascending positions of one I32 row by counting sort; false when out of memory. */
static bool counting_sort_row(const int32_t *key, int32_t *out, int64_t n, int32_t lo, int64_t range) {
    int32_t *pos = calloc((size_t)range, sizeof *pos);
    if (!pos) return false;
    for (int64_t i = 0; i < n; i++) pos[key[i] - lo]++;
    int32_t acc = 0;
    for (int64_t v = 0; v < range; v++) {
        int32_t c = pos[v];
        pos[v] = acc;
        acc += c;
    }
    for (int64_t i = 0; i < n; i++) out[pos[key[i] - lo]++] = (int32_t)i;
    free(pos);
    return true;
}

/* ARGSORT along the last axis: in[0] = x [..., n] (I32, F32 or F64), out [..., n] I32 holds
 * the positions of each row in stable ascending order (equal keys keep their order).
 * I32 rows whose key range (max - min + 1) is at most 2n + 4096 use a counting sort, O(n +
 * range) (expert ids: the MoE dispatch groups ~100k token-expert pairs by expert this
 * way); other rows a stable merge sort, O(n log n). Threads split the rows. */
moe_status moe_cpu_argsort(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    int64_t rows = cpu_rows(x), n = cpu_cols(x);
    int32_t *po = (int32_t *)a->out->data;
    moe_dtype dt = x->dtype;
    if (dt != MOE_I32 && dt != MOE_F32 && dt != MOE_F64)
        return moe_error(MOE_ERR_UNSUPPORTED, "argsort: dtype %s is not supported on cpu", moe_dtype_name(dt));
    bool failed = false;
#pragma omp parallel for schedule(dynamic, 1) reduction(|| : failed) if (rows > 1 && rows * n > 8192)
    for (int64_t r = 0; r < rows; r++) {
        int32_t *out = po + r * n;
        if (n == 0) continue;
        if (dt == MOE_I32) {
            const int32_t *key = (const int32_t *)x->data + r * n;
            int32_t lo = 0, hi = -1;
            for (int64_t i = 0; i < n; i++) {
                if (i == 0 || key[i] < lo) lo = key[i];
                if (i == 0 || key[i] > hi) hi = key[i];
            }
            int64_t range = (int64_t)hi - lo + 1;
            if (range <= 2 * n + 4096) {
                if (!counting_sort_row(key, out, n, lo, range)) failed = true;
                continue;
            }
        }
        int32_t *tmp = malloc(sizeof(int32_t) * (size_t)n);
        if (!tmp) {
            failed = true;
            continue;
        }
        for (int64_t i = 0; i < n; i++) out[i] = (int32_t)i;
        if (dt == MOE_I32) SORT_IDX((const int32_t *)x->data + r * n, out, tmp, n, false);
        else if (dt == MOE_F32) SORT_IDX((const float *)x->data + r * n, out, tmp, n, false);
        else SORT_IDX((const double *)x->data + r * n, out, tmp, n, false);
        free(tmp);
    }
    if (failed) return moe_error(MOE_ERR_OOM, "argsort: out of host memory for sort buffers of rows of %lld", (long long)n);
    return MOE_OK;
}

/* BINCOUNT: in[0] = x [n] I32, out [nbins] I32 (attrs moe_int_attrs.nbins): out[v] = number
 * of i with x[i] == v. A value outside [0, nbins) is MOE_ERR_INVALID (out untouched).
 * Sequential: O(n), a small part of a routing step. */
moe_status moe_cpu_bincount(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    int64_t n = moe_tensor_numel(x), nbins = ((const moe_int_attrs *)a->attrs)->nbins;
    const int32_t *px = (const int32_t *)x->data;
    MOE_TRY(check_indices("bincount", "value", px, n, nbins));
    int32_t *po = (int32_t *)a->out->data;
    memset(po, 0, sizeof(int32_t) * (size_t)nbins);
    for (int64_t i = 0; i < n; i++) po[px[i]]++;
    return MOE_OK;
}

/* CUMSUM: in[0] = x [n] I32, out [n] I32 (attrs moe_int_attrs.exclusive): inclusive
 * out[i] = x[0] + ... + x[i]; exclusive out[i] = x[0] + ... + x[i-1] (out[0] = 0).
 * Sequential; sums wrap like int32. */
moe_status moe_cpu_cumsum(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    int64_t n = moe_tensor_numel(x);
    bool exclusive = ((const moe_int_attrs *)a->attrs)->exclusive;
    const int32_t *px = (const int32_t *)x->data;
    int32_t *po = (int32_t *)a->out->data;
    uint32_t acc = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t v = (uint32_t)px[i];
        if (exclusive) {
            po[i] = (int32_t)acc;
            acc += v;
        } else {
            acc += v;
            po[i] = (int32_t)acc;
        }
    }
    return MOE_OK;
}

/* ROUTE_PLAN: in[0] = ids [T, k] I32, each in [0, E) (attrs moe_int_attrs.nbins = E); out =
 * [tok (n = T k) | offsets (E + 1)] I32, out2 = src [T, k] I32. A stable counting sort of
 * the assignments by expert: expert e's run is tok[offsets[e] .. offsets[e + 1]), its
 * tokens in order; src[i] = the position of assignment i. An id outside [0, E) is
 * MOE_ERR_INVALID (nothing written). */
moe_status moe_cpu_route_plan(const moe_kernel_args *a) {
    const moe_tensor *ids = a->in[0];
    const int64_t n = moe_tensor_numel(ids), k = ids->shape[1], E = ((const moe_int_attrs *)a->attrs)->nbins;
    const int32_t *pi = (const int32_t *)ids->data;
    MOE_TRY(check_indices("route_plan", "expert id", pi, n, E));
    int32_t *tok = (int32_t *)a->out->data, *offsets = tok + n, *src = (int32_t *)a->out2->data;
    memset(offsets, 0, sizeof(int32_t) * (size_t)(E + 1));
    for (int64_t i = 0; i < n; i++) offsets[pi[i] + 1]++;
    for (int64_t e = 0; e < E; e++) offsets[e + 1] += offsets[e];
    for (int64_t i = 0; i < n; i++) { /* offsets[e] walks to the end of e's run, then back */
        int32_t at = offsets[pi[i]]++;
        tok[at] = (int32_t)(i / k);
        src[i] = at;
    }
    for (int64_t e = E; e > 0; e--) offsets[e] = offsets[e - 1];
    offsets[0] = 0;
    return MOE_OK;
}

/* ROUTE_TOPK: per row, p = softmax or sigmoid of the logits, then k rounds each taking the
 * best p + bias ordered after the previous pick (descending, ties to the lower index; NaNs
 * never picked, index 0 when nothing is left), gates = p there, renormalised and scaled. */
moe_status moe_cpu_route_topk(const moe_kernel_args *a) {
    const moe_tensor *lg = a->in[0], *bias = a->in[1];
    const moe_route_spec *sp = a->attrs;
    const int64_t rows = lg->shape[0], E = lg->shape[1];
    int32_t *ids = a->out2->data;
    CPU_FLOAT_DISPATCH(lg->dtype, "route_topk",
        const T *pb = bias ? (const T *)bias->data : NULL;
        T *gates = a->out->data;
_Pragma("omp parallel for schedule(static) if (rows * E > 8192)")
        for (int64_t r = 0; r < rows; r++) {
            const T *row = (const T *)lg->data + r * E;
            T mx = -INFINITY, sum = 0;
            for (int64_t e = 0; e < E && !sp->sigmoid; e++) mx = row[e] > mx ? row[e] : mx;
            for (int64_t e = 0; e < E && !sp->sigmoid; e++) sum += cpu_exp(row[e] - mx);
            T prev = INFINITY, total = 0;
            int64_t prev_i = -1;
            for (int t = 0; t < sp->k; t++) {
                T best = 0;
                int64_t bi = -1;
                for (int64_t e = 0; e < E; e++) {
                    T p = sp->sigmoid ? (T)1 / ((T)1 + cpu_exp(-row[e])) : cpu_exp(row[e] - mx) / sum;
                    T v = p + (pb ? pb[e] : (T)0);
                    bool after = v < prev || (v == prev && e > prev_i);
                    if (after && (bi < 0 || v > best)) best = v, bi = e;
                }
                int64_t id = bi < 0 ? 0 : bi;
                T g = sp->sigmoid ? (T)1 / ((T)1 + cpu_exp(-row[id])) : cpu_exp(row[id] - mx) / sum;
                ids[r * sp->k + t] = (int32_t)id;
                gates[r * sp->k + t] = g;
                total += g;
                prev = best, prev_i = bi;
            }
            for (int t = 0; t < sp->k; t++) {
                T *g = gates + r * sp->k + t;
                if (sp->renormalize) *g /= total;
                if (sp->scale > 0) *g *= (T)sp->scale;
            }
        }
    )
    return MOE_OK;
}

/* ROUTE_SELECT: the logits x @ w into step memory in x's dtype, then ROUTE_TOPK on them. */
moe_status moe_cpu_route_select(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0], *w = a->in[1];
    moe_tensor *logits = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, x->dtype, 2, (int64_t[]){x->shape[0], w->shape[1]});
    if (!logits) return moe_last_status();
    MOE_TRY(moe_cpu_gemm(x, w, logits, 1.0f, 0.0f));
    moe_kernel_args topk = {.out = a->out, .out2 = a->out2, .in = {logits, a->in[2]}, .attrs = a->attrs};
    return moe_cpu_route_topk(&topk);
}
