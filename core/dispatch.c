/* The op table (names, backward functions) and kernel dispatch to the backends.
 * Backward functions and kernels are weak references so that a missing one shows up
 * as NULL, which tests/test_cpu_optable.c reports by name. */
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileio.h"
#include "core/kernels.h"
#include "core/memory.h"

#define MOE_X_DECL_BWD(ID, name, diff) void moe_backward_##name(moe_node *n) __attribute__((weak));
MOE_OP_LIST(MOE_X_DECL_BWD)
#undef MOE_X_DECL_BWD

const moe_op_info moe_op_table[MOE_OP_COUNT] = {
#define MOE_X_INFO(ID, name, diff) [MOE_OP_##ID] = {#name, diff, diff ? moe_backward_##name : NULL},
    MOE_OP_LIST(MOE_X_INFO)
#undef MOE_X_INFO
};

const char *const moe_kernel_names[MOE_KERNEL_COUNT] = {
#define MOE_X_KNAME(ID, name) [MOE_K_##ID] = #name,
    MOE_KERNEL_LIST(MOE_X_KNAME)
#undef MOE_X_KNAME
};

extern const moe_backend moe_cpu_backend;
const moe_backend *moe_cuda_backend(void) __attribute__((weak));

const moe_backend *moe_backend_get(moe_device dev) {
    if (dev == MOE_CPU) return &moe_cpu_backend;
    return moe_cuda_backend ? moe_cuda_backend() : NULL;
}

/* MOE_PROFILE=1: wall time and calls per kernel (the device is synchronised after each
 * kernel, so CUDA figures are per-kernel too), printed to stderr by moe_profile_report and
 * at exit. MOE_PROFILE=2 splits each kernel by dtype and operand shapes. */
static int profile_level = -1;
#define PROFILE_SLOTS 1024
typedef struct {
    int kernel; /* -1: free slot */
    char shape[120];
    double s;
    long calls;
} profile_slot;
static profile_slot profile_tab[PROFILE_SLOTS];

static void shape_text(char *buf, size_t cap, const moe_kernel_args *a) {
    size_t n = 0;
    const moe_tensor *ts[3] = {a->out, a->in[0], a->in[1]};
    for (int i = 0; i < 3 && n + 1 < cap; i++) {
        const moe_tensor *t = ts[i];
        if (!t) continue;
        n += (size_t)snprintf(buf + n, cap - n, "%s%s[", i ? " " : "", moe_dtype_name(t->dtype));
        for (int d = 0; d < t->ndim && n + 1 < cap; d++)
            n += (size_t)snprintf(buf + n, cap - n, "%s%lld", d ? "," : "", (long long)t->shape[d]);
        if (n + 1 < cap) n += (size_t)snprintf(buf + n, cap - n, "]");
    }
}

static profile_slot *profile_slot_of(int kernel, const char *shape) {
    uint64_t h = 1469598103934665603ull ^ (uint64_t)kernel;
    for (const char *c = shape; *c; c++) h = (h ^ (unsigned char)*c) * 1099511628211ull;
    for (int probe = 0; probe < PROFILE_SLOTS; probe++) {
        profile_slot *sl = &profile_tab[(h + (uint64_t)probe) % PROFILE_SLOTS];
        if (sl->calls == 0) {
            sl->kernel = kernel;
            snprintf(sl->shape, sizeof sl->shape, "%s", shape);
            return sl;
        }
        if (sl->kernel == kernel && !strcmp(sl->shape, shape)) return sl;
    }
    return NULL; /* table full: the call goes unrecorded */
}

static int profile_by_time(const void *a, const void *b) {
    double x = ((const profile_slot *)a)->s, y = ((const profile_slot *)b)->s;
    return (x < y) - (x > y);
}

void moe_profile_report(const char *title) {
    if (profile_level <= 0) return;
    profile_slot *rows = malloc(sizeof profile_tab);
    if (!rows) return;
    int n = 0;
    double total = 0;
    if (profile_level == 1) { /* merge the shapes of each kernel */
        for (int i = 0; i < PROFILE_SLOTS; i++) {
            if (!profile_tab[i].calls) continue;
            int j = 0;
            while (j < n && rows[j].kernel != profile_tab[i].kernel) j++;
            if (j == n) rows[n++] = (profile_slot){profile_tab[i].kernel, "", 0, 0};
            rows[j].s += profile_tab[i].s;
            rows[j].calls += profile_tab[i].calls;
        }
    } else {
        for (int i = 0; i < PROFILE_SLOTS; i++)
            if (profile_tab[i].calls) rows[n++] = profile_tab[i];
    }
    for (int i = 0; i < n; i++) total += rows[i].s;
    if (n > 0) {
        qsort(rows, (size_t)n, sizeof *rows, profile_by_time);
        fprintf(stderr, "kernel profile (MOE_PROFILE) %s: %.3f ms in kernels\n", title, 1e3 * total);
        for (int i = 0; i < n && i < 60; i++)
            fprintf(stderr, "  %-20s %9.3f ms %5.1f%% %7ld calls %8.3f ms/call  %s\n", moe_kernel_names[rows[i].kernel],
                    1e3 * rows[i].s, 100 * rows[i].s / (total > 0 ? total : 1), rows[i].calls,
                    1e3 * rows[i].s / (double)rows[i].calls, rows[i].shape);
    }
    free(rows);
    memset(profile_tab, 0, sizeof profile_tab);
}

static void profile_report_at_exit(void) { moe_profile_report("(rest of the run)"); }

moe_status moe_kernel_run(moe_kernel_id k, const moe_kernel_args *a) {
    const moe_tensor *t = a->out ? a->out : a->in[0];
    MOE_ASSERT(t, "kernel %s without tensors", moe_kernel_names[k]);
    const moe_backend *be = moe_backend_get(t->device);
    if (!be) return moe_error(MOE_ERR_UNSUPPORTED, "no %s backend in this build", moe_device_name(t->device));
    if (!be->kernels[k])
        return moe_error(MOE_ERR_UNSUPPORTED, "kernel %s is not implemented on %s", moe_kernel_names[k], be->name);
    if (profile_level < 0) {
        const char *e = getenv("MOE_PROFILE");
        profile_level = e && *e ? atoi(e) : 0;
        if (profile_level > 0) atexit(profile_report_at_exit);
    }
    /* what the kernel takes from the step arena for itself goes back when it returns */
    const moe_mem_mark mark = moe_mem_step_mark(t->device);
    if (profile_level <= 0) {
        moe_status s = be->kernels[k](a);
        moe_mem_step_release(t->device, mark);
        return s;
    }
    char shape[120] = "";
    if (profile_level > 1) shape_text(shape, sizeof shape, a);
    double t0 = moe_clock_ms();
    moe_status s = be->kernels[k](a);
    moe_mem_step_release(t->device, mark);
    if (s == MOE_OK) s = be->sync();
    profile_slot *sl = profile_slot_of((int)k, shape);
    if (sl) {
        sl->s += (moe_clock_ms() - t0) / 1e3;
        sl->calls++;
    }
    return s;
}
