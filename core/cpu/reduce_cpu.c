/* CPU reductions over one axis (sum, max with argmax) of a contiguous input. */
#include "core/cpu/cpu_common.h"

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
