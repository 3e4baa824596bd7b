/* Latency-aware balance loss, its weights and the running latency average. */
#include "router/latency.h"

#include <math.h>
#include <stdlib.h>

#include "core/ops.h"

moe_tensor *moe_cv_squared(moe_tensor *x) {
    if (!x) return NULL;
    int64_t n = x->shape[0];
    MOE_ASSERT(x->ndim == 1 && n > 0, "cv_squared: needs a non-empty 1-D tensor");
    moe_tensor *mean = moe_mean(x, 0, true);
    if (n == 1) return moe_mul_scalar(moe_sum_all(mean), 0.0);
    moe_tensor *dev = moe_sub(x, mean);
    moe_tensor *var = moe_mul_scalar(moe_sum_all(moe_mul(dev, dev)), 1.0 / (double)(n - 1));
    moe_tensor *m = moe_sum_all(mean);
    return moe_div(var, moe_add_scalar(moe_mul(m, m), 1e-10));
}

moe_status moe_latency_alpha(const double *latency, int E, double *alpha) {
    double mean = 0;
    for (int e = 0; e < E; e++) {
        if (!(latency[e] > 0) || !isfinite(latency[e]))
            return moe_error(MOE_ERR_INVALID, "latency balance: expert %d has latency %g; every expert needs a "
                             "positive measured latency", e, latency[e]);
        mean += latency[e] / E;
    }
    for (int e = 0; e < E; e++) alpha[e] = latency[e] / mean;
    return MOE_OK;
}

moe_tensor *moe_latency_loss(moe_tensor *gates, moe_tensor *experts, const int64_t *load, moe_tensor *smooth_load,
                             const double *alpha, int E, double coef) {
    if (!gates || !experts) return NULL;
    int64_t T = gates->shape[0];
    double *host = malloc(sizeof(double) * 2 * (size_t)E);
    if (!host) {
        moe_error(MOE_ERR_OOM, "latency balance: out of host memory");
        return NULL;
    }
    for (int e = 0; e < E; e++) {
        host[e] = alpha ? alpha[e] : 1.0;
        host[E + e] = host[e] * (double)load[e];
    }
    moe_tensor *h = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F64, 2, (int64_t[]){2, E}, host);
    free(host);
    moe_tensor *w = h ? moe_tensor_to(moe_cast(h, gates->dtype), gates->device, MOE_LIFE_STEP) : NULL;
    if (!w) return NULL;
    moe_tensor *a = moe_reshape(moe_slice(w, 0, 0, 1), 1, (int64_t[]){E});
    moe_tensor *weighted_load = moe_reshape(moe_slice(w, 0, 1, 2), 1, (int64_t[]){E});
    moe_tensor *zeros = moe_tensor_zeros(MOE_LIFE_STEP, gates->device, gates->dtype, 2, (int64_t[]){T, E});
    moe_tensor *importance = moe_sum(moe_scatter_add(zeros, experts, gates), 0, false);
    if (smooth_load) weighted_load = moe_mul(a, moe_cast(smooth_load, gates->dtype));
    moe_tensor *loss = moe_add(moe_cv_squared(moe_mul(a, importance)), moe_cv_squared(weighted_load));
    return moe_mul_scalar(loss, coef);
}

void moe_latency_ema_update(double *avg, const double *sample, int E, double decay) {
    for (int e = 0; e < E; e++) avg[e] = avg[e] > 0 ? decay * avg[e] + (1.0 - decay) * sample[e] : sample[e];
}
