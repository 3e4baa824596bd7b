/* CPU reductions over one axis (sum, max with argmax) of a contiguous input. */
#include "core/cpu/cpu_common.h"

/* At most this many blocks per long row; see sum_long_rows. */
#define SUM_MAX_BLOCKS 256

/* Sums of few long rows (a whole tensor flattened: the loss of a benchmark, a norm):
 * each row in fixed blocks summed in parallel and vectorised, the block sums added in
 * order. The blocks depend on n only, so the result does not depend on the threads. */
#define SUM_LONG_ROWS(T, px, po, outer, n)                                                  \
    do {                                                                                  \
        int64_t blk = (n + SUM_MAX_BLOCKS - 1) / SUM_MAX_BLOCKS;                          \
        blk = blk < CPU_FLAT_COLS ? CPU_FLAT_COLS : blk;                                  \
        const int64_t nb = (n + blk - 1) / blk;                                           \
        for (int64_t oi = 0; oi < outer; oi++) {                                          \
            const T *row = px + oi * n;                                                   \
            double part[SUM_MAX_BLOCKS], acc = 0;                                         \
            _Pragma("omp parallel for schedule(static)")                                  \
            for (int64_t b = 0; b < nb; b++) {                                            \
                const int64_t end = (b + 1) * blk < n ? (b + 1) * blk : n;                \
                double s = 0;                                                             \
                _Pragma("omp simd reduction(+ : s)")                                      \
                for (int64_t k = b * blk; k < end; k++) s += row[k];                      \
                part[b] = s;                                                              \
            }                                                                             \
            for (int64_t b = 0; b < nb; b++) acc += part[b];                              \
            po[oi] = (T)acc;                                                              \
        }                                                                                 \
    } while (0)

moe_status moe_cpu_reduce(const moe_kernel_args *a) {
    const moe_tensor *x = a->in[0];
    const moe_reduce_attrs *at = a->attrs;
    moe_tensor *o = a->out;
    int64_t outer = 1, inner = 1, n = x->shape[at->axis];
    for (int d = 0; d < at->axis; d++) outer *= x->shape[d];
    for (int d = at->axis + 1; d < x->ndim; d++) inner *= x->shape[d];
    int32_t *arg = a->out2 ? (int32_t *)a->out2->data : NULL;
    CPU_FLOAT_DISPATCH(x->dtype, "reduce",
        const T *px = (const T *)x->data;
        T *po = (T *)o->data;
        if (at->op == 0 && inner == 1 && outer < 4 && n > 4 * CPU_FLAT_COLS) {
            SUM_LONG_ROWS(T, px, po, outer, n);
            return MOE_OK;
        }
_Pragma("omp parallel for schedule(static) if (outer * inner * n > 32768)")
        for (int64_t oi = 0; oi < outer; oi++) {
            for (int64_t ii = 0; ii < inner; ii++) {
                const T *p = px + oi * n * inner + ii;
                if (at->op == 0) {
                    double acc = 0;
                    for (int64_t k = 0; k < n; k++) acc += p[k * inner];
                    po[oi * inner + ii] = (T)acc;
                } else {
                    T best = p[0];
                    int32_t bi = 0;
                    for (int64_t k = 1; k < n; k++)
                        if (p[k * inner] > best || best != best) { best = p[k * inner]; bi = (int32_t)k; }
                    po[oi * inner + ii] = best;
                    if (arg) arg[oi * inner + ii] = bi;
                }
            }
        })
    return MOE_OK;
}
