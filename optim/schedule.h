/* Learning-rate schedules: linear warm-up, then constant or cosine decay. Pure functions
 * of the step, so a resumed run gets the same lr from the saved step alone. */
#ifndef MOE_OPTIM_SCHEDULE_H
#define MOE_OPTIM_SCHEDULE_H

#include <stdint.h>

#include "core/status.h"

typedef enum moe_lr_kind { MOE_LR_CONSTANT, MOE_LR_COSINE } moe_lr_kind;

typedef struct moe_lr_schedule {
    moe_lr_kind kind;
    double lr;      /* peak lr, reached at step `warmup` */
    double min_lr;  /* cosine: the lr at step `total` and after */
    int64_t warmup; /* warm-up steps (0: none) */
    int64_t total;  /* cosine: the step where the decay reaches min_lr (>= warmup) */
} moe_lr_schedule;

/* The lr of 0-based step s:
 *   s < warmup:          lr * (s + 1) / warmup
 *   constant, after:     lr
 *   cosine, s < total:   min_lr + (lr - min_lr) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2
 *   cosine, s >= total:  min_lr
 * Expects a schedule that passed moe_lr_schedule_check and s >= 0. */
double moe_lr_at(const moe_lr_schedule *sched, int64_t s);

/* MOE_ERR_CONFIG with the reason when lr <= 0 or warmup < 0, or, for cosine, min_lr
 * outside [0, lr] or total < warmup. */
moe_status moe_lr_schedule_check(const moe_lr_schedule *sched);

/* "constant" / "cosine" -> kind; MOE_ERR_CONFIG naming the accepted values otherwise. */
moe_status moe_lr_kind_parse(const char *name, moe_lr_kind *out);

#endif
