/* The CPU backend: host memory and the table of CPU kernels (moe_cpu_<kernel>). */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "core/kernels.h"

#define MOE_X_DECL_CPU(ID, name) moe_status moe_cpu_##name(const moe_kernel_args *a) __attribute__((weak));
MOE_KERNEL_LIST(MOE_X_DECL_CPU)
#undef MOE_X_DECL_CPU

#define HUGE_PAGE ((size_t)2 << 20)

/* Host memory, 64-byte aligned; blocks of 2 MiB and more are 2 MiB aligned and advised to
 * be backed by transparent huge pages, so that the step arena and the parameters fault in
 * and sit in the TLB as 2 MiB pages rather than 4 KiB ones (advice only: a kernel that
 * declines it leaves ordinary pages). */
static void *cpu_alloc(size_t bytes) {
    const size_t align = bytes >= HUGE_PAGE ? HUGE_PAGE : 64, n = (bytes + align - 1) / align * align;
    void *p = aligned_alloc(align, n);
    if (!p) moe_error(MOE_ERR_OOM, "out of host memory: asked %.1f MiB", bytes / 1048576.0);
    else if (align == HUGE_PAGE) madvise(p, n, MADV_HUGEPAGE);
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
