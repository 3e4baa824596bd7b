/* The CPU backend: host memory and the table of CPU kernels (moe_cpu_<kernel>). */
#include <stdlib.h>
#include <string.h>

#include "core/kernels.h"

#define MOE_X_DECL_CPU(ID, name) moe_status moe_cpu_##name(const moe_kernel_args *a) __attribute__((weak));
MOE_KERNEL_LIST(MOE_X_DECL_CPU)
#undef MOE_X_DECL_CPU

static void *cpu_alloc(size_t bytes) {
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) moe_error(MOE_ERR_OOM, "out of host memory: asked %.1f MiB", bytes / 1048576.0);
    return p;
}

static void cpu_free(void *p) { free(p); }

static moe_status cpu_memcpy_to(void *dst, const void *src, size_t bytes, moe_device src_dev) {
    MOE_ASSERT(src_dev == MOE_CPU, "cpu backend copies from host only");
    memcpy(dst, src, bytes);
    return MOE_OK;
}

static moe_status cpu_memcpy_from(void *dst, const void *src, size_t bytes) {
    memcpy(dst, src, bytes);
    return MOE_OK;
}

static moe_status cpu_memset(void *p, int byte, size_t bytes) {
    memset(p, byte, bytes);
    return MOE_OK;
}

static moe_status cpu_sync(void) { return MOE_OK; }

const moe_backend moe_cpu_backend = {
    .name = "cpu",
    .device = MOE_CPU,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .memcpy_to = cpu_memcpy_to,
    .memcpy_from = cpu_memcpy_from,
    .memset = cpu_memset,
    .sync = cpu_sync,
    .kernels = {
#define MOE_X_CPU_ENTRY(ID, name) [MOE_K_##ID] = moe_cpu_##name,
        MOE_KERNEL_LIST(MOE_X_CPU_ENTRY)
#undef MOE_X_CPU_ENTRY
    },
};
