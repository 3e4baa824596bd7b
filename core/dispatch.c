/* The op table (names, backward functions) and kernel dispatch to the backends.
 * Backward functions and kernels are weak references so that a missing one shows up
 * as NULL, which tests/test_cpu_optable.c reports by name. */
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

moe_status moe_kernel_run(moe_kernel_id k, const moe_kernel_args *a) {
    const moe_tensor *t = a->out ? a->out : a->in[0];
    MOE_ASSERT(t, "kernel %s without tensors", moe_kernel_names[k]);
    const moe_backend *be = moe_backend_get(t->device);
    if (!be) return moe_error(MOE_ERR_UNSUPPORTED, "no %s backend in this build", moe_device_name(t->device));
    if (!be->kernels[k])
        return moe_error(MOE_ERR_UNSUPPORTED, "kernel %s is not implemented on %s", moe_kernel_names[k], be->name);
    return be->kernels[k](a);
}
