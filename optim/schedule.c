/* Learning-rate schedules (see optim/schedule.h). */
#include "optim/schedule.h"

#include <math.h>
#include <string.h>

double moe_lr_at(const moe_lr_schedule *sched, int64_t s) {
    MOE_ASSERT(s >= 0, "lr schedule: step %lld must be >= 0", (long long)s);
    if (s < sched->warmup) return sched->lr * (double)(s + 1) / (double)sched->warmup;
    if (sched->kind == MOE_LR_CONSTANT) return sched->lr;
    if (s >= sched->total) return sched->min_lr;
    double progress = (double)(s - sched->warmup) / (double)(sched->total - sched->warmup);
    return sched->min_lr + (sched->lr - sched->min_lr) * 0.5 * (1.0 + cos(M_PI * progress));
}

moe_status moe_lr_schedule_check(const moe_lr_schedule *sched) {
    if (!(sched->lr > 0) || !isfinite(sched->lr))
        return moe_error(MOE_ERR_CONFIG, "lr schedule: lr %g must be finite and > 0", sched->lr);
    if (sched->warmup < 0)
        return moe_error(MOE_ERR_CONFIG, "lr schedule: warmup %lld must be >= 0", (long long)sched->warmup);
    if (sched->kind == MOE_LR_COSINE) {
        if (!(sched->min_lr >= 0 && sched->min_lr <= sched->lr))
            return moe_error(MOE_ERR_CONFIG, "lr schedule: min_lr %g must lie in [0, lr = %g]", sched->min_lr, sched->lr);
        if (sched->total < sched->warmup)
            return moe_error(MOE_ERR_CONFIG, "lr schedule: total %lld must be >= warmup %lld",
                             (long long)sched->total, (long long)sched->warmup);
    } else if (sched->kind != MOE_LR_CONSTANT) {
        return moe_error(MOE_ERR_CONFIG, "lr schedule: unknown kind %d: use constant or cosine", (int)sched->kind);
    }
    return MOE_OK;
}

moe_status moe_lr_kind_parse(const char *name, moe_lr_kind *out) {
    if (strcmp(name, "constant") == 0) *out = MOE_LR_CONSTANT;
    else if (strcmp(name, "cosine") == 0) *out = MOE_LR_COSINE;
    else return moe_error(MOE_ERR_CONFIG, "unknown lr schedule '%s': use constant or cosine", name);
    return MOE_OK;
}
