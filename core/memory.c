/* Lifetime-based allocation: bump arenas for STEP memory, backend allocations for PERSIST. */
#include "core/memory.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/kernels.h"

#define ARENA_ALIGN 256
#define ARENA_MIN_CHUNK (64u << 20)
#define ARENA_MAX_CHUNKS 64

typedef struct arena {
    void *chunk[ARENA_MAX_CHUNKS];
    size_t size[ARENA_MAX_CHUNKS];
    int n_chunks;
    int cur;        /* chunk being filled */
    size_t used;    /* bytes used in chunk[cur] */
    size_t total_used;
} arena;

static arena step_arena[MOE_DEVICE_COUNT];
static arena host_struct_arena; /* tensor structs and tape nodes, always host */
static moe_mem_stats stats[MOE_DEVICE_COUNT];
static bool poison_step;

void moe_mem_set_poison(bool on) { poison_step = on; }

static void *host_malloc(size_t bytes) { return aligned_alloc(ARENA_ALIGN, (bytes + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN); }

static void *backend_alloc(moe_device dev, size_t bytes) {
    const moe_backend *be = moe_backend_get(dev);
    if (!be) {
        moe_error(MOE_ERR_UNSUPPORTED, "no %s backend in this build", moe_device_name(dev));
        return NULL;
    }
    stats[dev].backend_allocs++;
    return be->alloc(bytes);
}

static void backend_free(moe_device dev, void *p) {
    const moe_backend *be = moe_backend_get(dev);
    if (be && p) be->free(p);
}

static void *arena_alloc(arena *a, size_t bytes, moe_device dev, bool host_structs) {
    bytes = (bytes + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN;
    if (bytes == 0) bytes = ARENA_ALIGN;
    while (a->cur < a->n_chunks) {
        if (a->used + bytes <= a->size[a->cur]) {
            void *p = (char *)a->chunk[a->cur] + a->used;
            a->used += bytes;
            a->total_used += bytes;
            return p;
        }
        a->cur++;
        a->used = 0;
    }
    size_t held = 0;
    for (int i = 0; i < a->n_chunks; i++) held += a->size[i];
    if (a->n_chunks == ARENA_MAX_CHUNKS) {
        moe_error(MOE_ERR_OOM, "step arena on %s: out of memory: %d chunks hold %.2f GiB and the step asks %zu bytes more",
                  moe_device_name(dev), ARENA_MAX_CHUNKS, (double)held / (1u << 30), bytes);
        return NULL;
    }
    /* Geometric growth: a new chunk is at least as large as all earlier ones together. */
    size_t want = bytes > ARENA_MIN_CHUNK ? bytes : ARENA_MIN_CHUNK;
    if (want < held) want = held;
    if (host_structs) want = bytes > (4u << 20) ? bytes : (4u << 20);
    void *p = host_structs ? host_malloc(want) : backend_alloc(dev, want);
    size_t least = bytes > ARENA_MIN_CHUNK ? bytes : ARENA_MIN_CHUNK;
    while (!p && !host_structs && want > least) { /* a shared device may not have the doubling: halve to what fits */
        want = want / 2 > least ? want / 2 : least;
        p = backend_alloc(dev, want);
    }
    if (!p) {
        if (host_structs) moe_error(MOE_ERR_OOM, "out of host memory: asked %zu bytes", want);
        return NULL;
    }
    a->chunk[a->n_chunks] = p;
    a->size[a->n_chunks] = want;
    a->cur = a->n_chunks++;
    a->used = bytes;
    a->total_used += bytes;
    return p;
}

/* Rewinds; when the step needed several chunks, replaces them by one that fits it all. */
static void arena_reset(arena *a, moe_device dev, bool host_structs) {
    if (a->n_chunks > 1) {
        size_t total = 0;
        for (int i = 0; i < a->n_chunks; i++) {
            total += a->size[i];
            if (host_structs) free(a->chunk[i]);
            else backend_free(dev, a->chunk[i]);
        }
        a->n_chunks = 0;
        void *p = host_structs ? host_malloc(total) : backend_alloc(dev, total);
        if (p) {
            a->chunk[0] = p;
            a->size[0] = total;
            a->n_chunks = 1;
        }
    }
    a->cur = 0;
    a->used = 0;
    a->total_used = 0;
}

void *moe_mem_alloc(moe_device dev, moe_lifetime life, size_t bytes) {
    if (life == MOE_LIFE_STEP) {
        void *p = arena_alloc(&step_arena[dev], bytes, dev, false);
        if (p && poison_step) moe_backend_get(dev)->memset(p, 0xff, bytes);
        if (p) {
            moe_mem_stats *s = &stats[dev];
            s->step_bytes = step_arena[dev].total_used;
            if (s->step_bytes > s->step_peak) s->step_peak = s->step_bytes;
        }
        return p;
    }
    void *p = backend_alloc(dev, bytes);
    if (!p) return NULL;
    stats[dev].persist_bytes += bytes;
    if (stats[dev].persist_bytes > stats[dev].persist_peak) stats[dev].persist_peak = stats[dev].persist_bytes;
    return p;
}

void moe_mem_free(moe_device dev, moe_lifetime life, void *p, size_t bytes) {
    if (!p || life == MOE_LIFE_STEP) return;
    stats[dev].persist_bytes -= bytes;
    backend_free(dev, p);
}

moe_mem_mark moe_mem_step_mark(moe_device dev) {
    const arena *a = &step_arena[dev];
    return (moe_mem_mark){a->cur, a->used, a->total_used};
}

void moe_mem_step_release(moe_device dev, moe_mem_mark mark) {
    arena *a = &step_arena[dev];
    MOE_ASSERT(mark.total_used <= a->total_used, "step arena on %s: releasing to a mark past the fill (%zu > %zu bytes)",
               moe_device_name(dev), mark.total_used, a->total_used);
    if (a->n_chunks == 0) return; /* nothing was ever taken */
    a->cur = mark.cur < a->n_chunks ? mark.cur : 0;
    a->used = mark.used;
    a->total_used = mark.total_used;
    stats[dev].step_bytes = a->total_used;
}

void *moe_step_host_alloc(size_t bytes) {
    void *p = arena_alloc(&host_struct_arena, bytes, MOE_CPU, true);
    if (p) memset(p, 0, bytes);
    return p;
}

void moe_step_reset(void) {
    moe_tape_reset();
    for (int d = 0; d < MOE_DEVICE_COUNT; d++) {
        if (step_arena[d].n_chunks) arena_reset(&step_arena[d], (moe_device)d, false);
        stats[d].step_bytes = 0;
        stats[d].step_capacity = step_arena[d].n_chunks ? step_arena[d].size[0] : 0;
    }
    arena_reset(&host_struct_arena, MOE_CPU, true);
}

moe_mem_stats moe_mem_get_stats(moe_device dev) { return stats[dev]; }

void moe_mem_reset_peaks(moe_device dev) {
    stats[dev].step_peak = stats[dev].step_bytes;
    stats[dev].persist_peak = stats[dev].persist_bytes;
}
