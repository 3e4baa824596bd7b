/* Files written whole or not at all: write to PATH.tmp, flush, fsync, rename over PATH.
 * A crash at any point leaves the previous PATH untouched. Also the clock helpers shared
 * by timing code (monotonic wall time, median of samples). */
#ifndef MOE_CORE_FILEIO_H
#define MOE_CORE_FILEIO_H

#include <stdbool.h>
#include <stdio.h>

#include "core/status.h"

typedef struct moe_atomic_file {
    FILE *f;         /* write here */
    char *tmp, *path;
} moe_atomic_file;

/* Opens PATH.tmp for writing; MOE_ERR_IO naming `what` and the path on failure. */
moe_status moe_atomic_open(moe_atomic_file *af, const char *path, const char *what);
/* ok = everything written: flushes, fsyncs, closes and renames; otherwise (or on any
 * failure) removes the temporary file. Always releases af. */
moe_status moe_atomic_close(moe_atomic_file *af, bool ok, const char *what);

/* Monotonic wall time in milliseconds. */
double moe_clock_ms(void);
/* Median of n samples (sorts them in place). */
double moe_median(double *v, int n);

#endif
