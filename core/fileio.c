/* Atomic file writes and clock helpers (see fileio.h). */
#include "core/fileio.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

moe_status moe_atomic_open(moe_atomic_file *af, const char *path, const char *what) {
    size_t n = strlen(path);
    af->path = strdup(path);
    af->tmp = malloc(n + 5);
    af->f = NULL;
    if (!af->path || !af->tmp) {
        free(af->path);
        free(af->tmp);
        return moe_error(MOE_ERR_OOM, "out of memory writing %s %s", what, path);
    }
    memcpy(af->tmp, path, n);
    memcpy(af->tmp + n, ".tmp", 5);
    af->f = fopen(af->tmp, "wb");
    if (!af->f) {
        moe_status s = moe_error(MOE_ERR_IO, "cannot write %s %s: %s (does the directory exist and is it writable?)",
                                 what, af->tmp, strerror(errno));
        free(af->path);
        free(af->tmp);
        return s;
    }
    return MOE_OK;
}

moe_status moe_atomic_close(moe_atomic_file *af, bool ok, const char *what) {
    int err = ok ? 0 : (errno ? errno : EIO);
    if (ok && (fflush(af->f) != 0 || fsync(fileno(af->f)) != 0)) {
        ok = false;
        err = errno;
    }
    if (fclose(af->f) != 0 && ok) {
        ok = false;
        err = errno;
    }
    if (ok && rename(af->tmp, af->path) != 0) {
        ok = false;
        err = errno;
    }
    if (!ok) remove(af->tmp);
    moe_status s = ok ? MOE_OK : moe_error(MOE_ERR_IO, "cannot write %s %s: %s", what, af->path, strerror(err));
    free(af->tmp);
    free(af->path);
    return s;
}

double moe_clock_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double moe_median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
