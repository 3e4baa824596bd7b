/* The op table (names, backward functions) and kernel dispatch to the backends.
 * Backward functions and kernels are weak references so that a missing one shows up
 * as NULL, which tests/test_cpu_optable.c reports by name. */
#include <stdio.h>
#include <stdlib.h>

#include "core/fileio.h"
#include "core/kernels.h"

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
 * kernel, so CUDA figures are per-kernel too), printed to stderr at exit. */
static int profile_on = -1;
static double profile_s[MOE_KERNEL_COUNT];
static long profile_calls[MOE_KERNEL_COUNT];


static void profile_report(void) {
    double total = 0;
    for (int k = 0; k < MOE_KERNEL_COUNT; k++) total += profile_s[k];
    fprintf(stderr, "kernel profile (MOE_PROFILE): %.3f s in kernels\n", total);
    for (int done = 0; done < MOE_KERNEL_COUNT; done++) {
        int best = -1;
        for (int k = 0; k < MOE_KERNEL_COUNT; k++)
            if (profile_calls[k] >= 0 && (best < 0 || profile_s[k] > profile_s[best])) best = k;
        if (best < 0 || profile_calls[best] == 0) break;
        fprintf(stderr, "  %-20s %9.3f ms %5.1f%%  %8ld calls\n", moe_kernel_names[best], 1e3 * profile_s[best],
                100 * profile_s[best] / (total > 0 ? total : 1), profile_calls[best]);
        profile_calls[best] = -1;
    }
}

moe_status moe_kernel_run(moe_kernel_id k, const moe_kernel_args *a) {
    const moe_tensor *t = a->out ? a->out : a->in[0];
    MOE_ASSERT(t, "kernel %s without tensors", moe_kernel_names[k]);
    const moe_backend *be = moe_backend_get(t->device);
    if (!be) return moe_error(MOE_ERR_UNSUPPORTED, "no %s backend in this build", moe_device_name(t->device));
    if (!be->kernels[k])
        return moe_error(MOE_ERR_UNSUPPORTED, "kernel %s is not implemented on %s", moe_kernel_names[k], be->name);
    if (profile_on < 0) {
        const char *e = getenv("MOE_PROFILE");
        profile_on = e && *e && *e != '0';
        if (profile_on) atexit(profile_report);
    }
    if (!profile_on) return be->kernels[k](a);
    double t0 = (moe_clock_ms() / 1e3);
    moe_status s = be->kernels[k](a);
    if (s == MOE_OK) s = be->sync();
    profile_s[k] += (moe_clock_ms() / 1e3) - t0;
    profile_calls[k]++;
    return s;
}
