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
 * at exit. MOE_PROFILE=2 splits each kernel by dtype and operand shapes. MOE_PROFILE=3 and
 * 4 are 1 and 2 timed on the device by marks around each kernel, without synchronising:
 * the host runs ahead as it does unprofiled, and each report adds how much of its window
 * (the first kernel's start to the last one's end) the device spent in kernels; the rest
 * it waited for the host or ran copies. Backends without marks (the CPU) time as 1 and 2. */
static int profile_level = -1;
#define PROFILE_SLOTS 1024
typedef struct {
    int kernel; /* -1: free slot */
    char shape[120];
    double s;
    long calls;
} profile_slot;
static profile_slot profile_tab[PROFILE_SLOTS];

/* Kernels launched but not yet timed (MOE_PROFILE=3, 4): their slot and marks. */
typedef struct {
    profile_slot *slot;
    int from, to;
} profile_pending;
static profile_pending *pending;
static int n_pending, cap_pending;
static const moe_backend *pending_backend;

static void pending_push(const moe_backend *be, profile_slot *sl, int from, int to) {
    if (n_pending == cap_pending) {
        int cap = cap_pending ? 2 * cap_pending : 4096;
        profile_pending *p = realloc(pending, sizeof *p * (size_t)cap);
        if (!p) return; /* the call goes untimed */
        pending = p;
        cap_pending = cap;
    }
    pending[n_pending++] = (profile_pending){sl, from, to};
    pending_backend = be;
}

/* Waits for the marked kernels, adds their device times to their slots, and prints how
 * busy the device was over the window. */
static void pending_settle(const char *title) {
    const moe_backend *be = pending_backend;
    if (!n_pending) return;
    if (be->sync() != MOE_OK) { /* the run's own error reports it; the marks start afresh */
        n_pending = 0;
        be->marks_reset();
        return;
    }
    double busy = 0;
    for (int i = 0; i < n_pending; i++) {
        double ms = be->mark_ms(pending[i].from, pending[i].to);
        pending[i].slot->s += ms / 1e3;
        busy += ms;
    }
    double window = be->mark_ms(pending[0].from, pending[n_pending - 1].to);
    fprintf(stderr, "device timeline (MOE_PROFILE) %s: %d kernel calls, %.3f ms in kernels of a %.3f ms window "
            "(%.1f%% busy; the rest waits for the host or copies)\n", title, n_pending, busy, window,
            window > 0 ? 100 * busy / window : 0);
    n_pending = 0;
    be->marks_reset();
}

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
    pending_settle(title);
    profile_slot *rows = malloc(sizeof profile_tab);
    if (!rows) return;
    int n = 0;
    double total = 0;
    if (profile_level != 2 && profile_level != 4) { /* merge the shapes of each kernel */
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

/* One kernel under MOE_PROFILE: timed by the device's marks (levels 3, 4, where the
 * backend has them) or by the host clock around the kernel and a synchronisation. */
static moe_status profiled_run(const moe_backend *be, moe_kernel_id k, const moe_kernel_args *a, moe_device dev,
                                moe_mem_mark mark) {
    char shape[120] = "";
    if (profile_level == 2 || profile_level == 4) shape_text(shape, sizeof shape, a);
    profile_slot *sl = profile_slot_of((int)k, shape);
    if (sl) sl->calls++;
    if (profile_level >= 3 && be->mark) {
        int from = be->mark();
        moe_status s = be->kernels[k](a);
        moe_mem_step_release(dev, mark);
        int to = be->mark();
        if (sl && from >= 0 && to >= 0) pending_push(be, sl, from, to);
        return s;
    }
    double t0 = moe_clock_ms();
    moe_status s = be->kernels[k](a);
    moe_mem_step_release(dev, mark);
    if (s == MOE_OK) s = be->sync();
    if (sl) sl->s += (moe_clock_ms() - t0) / 1e3;
    return s;
}

int moe_profile_level(void) {
    if (profile_level < 0) {
        const char *e = getenv("MOE_PROFILE");
        profile_level = e && *e ? atoi(e) : 0;
        if (profile_level > 0) atexit(profile_report_at_exit);
    }
    return profile_level;
}

moe_status moe_kernel_run(moe_kernel_id k, const moe_kernel_args *a) {
    const moe_tensor *t = a->out ? a->out : a->in[0];
    MOE_ASSERT(t, "kernel %s without tensors", moe_kernel_names[k]);
    const moe_backend *be = moe_backend_get(t->device);
    if (!be) return moe_error(MOE_ERR_UNSUPPORTED, "no %s backend in this build", moe_device_name(t->device));
    if (!be->kernels[k])
        return moe_error(MOE_ERR_UNSUPPORTED, "kernel %s is not implemented on %s", moe_kernel_names[k], be->name);
    moe_profile_level();
    /* what the kernel takes from the step arena for itself goes back when it returns */
    const moe_mem_mark mark = moe_mem_step_mark(t->device);
    if (profile_level <= 0) {
        moe_status s = be->kernels[k](a);
        moe_mem_step_release(t->device, mark);
        return s;
    }
    return profiled_run(be, k, a, t->device, mark);
}
