/* Lifetime-based allocation: bump arenas for STEP memory, backend allocations for PERSIST.
 * A step arena has two ends: the forward fills chunks from their starts; during a
 * freeing backward (moe_mem_step_from_top) new memory comes from the last chunk's end
 * downwards, so the forward end can be rewound as the sweep passes its activations. */
#include "core/memory.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/arena_top.h"
#include "core/autograd.h"
#include "core/kernels.h"

#define ARENA_ALIGN 256
#define ARENA_MIN_CHUNK (64u << 20)
#define ARENA_MAX_CHUNKS 64

typedef struct arena {
    void *chunk[ARENA_MAX_CHUNKS];
    size_t size[ARENA_MAX_CHUNKS];
    size_t top_used[ARENA_MAX_CHUNKS]; /* bytes the top end holds at the chunk's end */
    int n_chunks;
    int cur;           /* chunk the forward end fills */
    size_t used;       /* bytes the forward end uses from chunk[cur]'s start */
    size_t total_used; /* bytes the forward end holds */
    bool from_top;     /* new memory comes from the top end */
    int top;           /* chunk the top end's bump front moves in */
    size_t top_total;  /* bytes of live top blocks */
    size_t top_span;   /* the top_used of all chunks together (live blocks and holes) */
    size_t span_peak;  /* most bytes both ends spanned at once since the last reset */
    top_heap heap;     /* the top end's blocks and holes */
    uint64_t generation; /* counts the times chunks were handed back (addresses moved) */
} arena;

static arena step_arena[MOE_DEVICE_COUNT];
static arena host_struct_arena; /* tensor structs and tape nodes, always host */
static moe_mem_stats stats[MOE_DEVICE_COUNT];
static bool poison_step;
static bool snug; /* tests: small chunks, consolidated to the step's exact peak */

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

static size_t align_up(size_t bytes) { return (bytes + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN; }

/* The bytes of chunk i the forward end may use: all but what the top end holds. */
static size_t bottom_room(const arena *a, int i) { return a->size[i] - a->top_used[i]; }

/* A new chunk for `bytes` (taken from its start, or from its end for the top end);
 * geometric growth: at least as large as all earlier chunks together. */
static void *arena_grow(arena *a, size_t bytes, moe_device dev, bool host_structs, bool top) {
    size_t held = 0;
    for (int i = 0; i < a->n_chunks; i++) held += a->size[i];
    if (a->n_chunks == ARENA_MAX_CHUNKS) {
        moe_error(MOE_ERR_OOM, "step arena on %s: out of memory: %d chunks hold %.2f GiB and the step asks %zu bytes more",
                  moe_device_name(dev), ARENA_MAX_CHUNKS, (double)held / (1u << 30), bytes);
        return NULL;
    }
    size_t min_chunk = snug ? 4096 : ARENA_MIN_CHUNK;
    size_t want = bytes > min_chunk ? bytes : min_chunk;
    if (want < held) want = held;
    if (host_structs) want = bytes > (4u << 20) ? bytes : (4u << 20);
    void *p = host_structs ? host_malloc(want) : backend_alloc(dev, want);
    size_t least = bytes > min_chunk ? bytes : min_chunk;
    while (!p && !host_structs && want > least) { /* a shared device may not have the doubling: halve to what fits */
        want = align_up(want / 2 > least ? want / 2 : least);
        p = backend_alloc(dev, want);
    }
    if (!p) {
        if (host_structs) moe_error(MOE_ERR_OOM, "out of host memory: asked %zu bytes", want);
        return NULL;
    }
    int i = a->n_chunks++;
    a->chunk[i] = p;
    a->size[i] = want;
    a->top_used[i] = 0;
    if (top) {
        a->top = i;
        a->top_used[i] = bytes;
        a->top_span += bytes;
        return (char *)p + want - bytes;
    }
    a->cur = i;
    a->used = bytes;
    return p;
}

/* The top end's next `bytes`: a hole that fits, else below the bump front of chunk[top],
 * whose floor is the forward end's fill of that chunk. */
static void *top_alloc(arena *a, size_t bytes, int *chunk) {
    char *p = top_heap_reuse(&a->heap, bytes, chunk);
    if (p) return p;
    int i = *chunk = a->top;
    if (i >= a->n_chunks) return NULL;
    size_t floor = i == a->cur ? a->used : i < a->cur ? a->size[i] : 0;
    if (a->top_used[i] + bytes + floor > a->size[i]) return NULL;
    a->top_used[i] += bytes;
    a->top_span += bytes;
    return (char *)a->chunk[i] + a->size[i] - a->top_used[i];
}

/* Top block i back: a hole, and the holes that reach their chunk's bump front taken back
 * into it. */
static void top_give(arena *a, int i) {
    top_block b = a->heap.log[i];
    top_heap_give(&a->heap, i);
    a->top_total -= b.bytes;
    size_t back;
    while ((back = top_heap_take_front(&a->heap, b.chunk,
                                       (char *)a->chunk[b.chunk] + a->size[b.chunk] - a->top_used[b.chunk]))) {
        a->top_used[b.chunk] -= back;
        a->top_span -= back;
    }
}

static void *bottom_alloc(arena *a, size_t bytes) {
    while (a->cur < a->n_chunks) {
        if (a->used + bytes <= bottom_room(a, a->cur)) {
            void *p = (char *)a->chunk[a->cur] + a->used;
            a->used += bytes;
            return p;
        }
        a->cur++;
        a->used = 0;
    }
    return NULL;
}

static void *arena_alloc(arena *a, size_t asked, moe_device dev, bool host_structs) {
    size_t bytes = align_up(asked ? asked : 1);
    bool top = a->from_top;
    if (top && !top_heap_reserve(&a->heap)) {
        moe_error(MOE_ERR_OOM, "out of host memory for the step arena's block list on %s", moe_device_name(dev));
        return NULL;
    }
    int chunk = 0;
    void *p = top ? top_alloc(a, bytes, &chunk) : bottom_alloc(a, bytes);
    if (!p && (p = arena_grow(a, bytes, dev, host_structs, top))) chunk = a->n_chunks - 1;
    if (!p) return NULL;
    if (top) {
        top_heap_log(&a->heap, p, bytes, asked, chunk);
        a->top_total += bytes;
    } else {
        a->total_used += bytes;
    }
    if (a->total_used + a->top_span > a->span_peak) a->span_peak = a->total_used + a->top_span;
    return p;
}

/* Rewinds; when the step needed several chunks, replaces them by one that holds the
 * step's peak span with a quarter to spare (a step that asks the same fits it; one that
 * asks more grows it geometrically), or exactly in snug mode. */
/* Hands every chunk back to its allocator. */
static void arena_free_chunks(arena *a, moe_device dev, bool host_structs) {
    if (a->n_chunks) a->generation++;
    for (int i = 0; i < a->n_chunks; i++) {
        if (host_structs) free(a->chunk[i]);
        else backend_free(dev, a->chunk[i]);
    }
    a->n_chunks = 0;
}

static void arena_reset(arena *a, moe_device dev, bool host_structs) {
    if (a->n_chunks > 1) {
        arena_free_chunks(a, dev, host_structs);
        size_t want = align_up(snug ? a->span_peak : a->span_peak + a->span_peak / 4);
        void *p = host_structs ? host_malloc(want) : backend_alloc(dev, want);
        if (p) {
            a->chunk[0] = p;
            a->size[0] = want;
            a->n_chunks = 1;
        }
    }
    a->top_used[0] = 0;
    a->cur = a->top = 0;
    a->used = a->total_used = a->top_total = a->top_span = a->span_peak = 0;
    a->from_top = false;
    top_heap_clear(&a->heap);
}

void *moe_mem_alloc(moe_device dev, moe_lifetime life, size_t bytes) {
    if (life == MOE_LIFE_STEP) {
        void *p = arena_alloc(&step_arena[dev], bytes, dev, false);
        if (p && poison_step) moe_backend_get(dev)->memset(p, 0xff, bytes);
        if (p) {
            moe_mem_stats *s = &stats[dev];
            s->step_bytes = step_arena[dev].total_used + step_arena[dev].top_total;
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
    if (a->from_top) return (moe_mem_mark){true, a->heap.n_log, 0, a->top_total};
    return (moe_mem_mark){false, a->cur, a->used, a->total_used};
}

/* The forward end back to mark (a point it passed). */
static void forward_rewind(arena *a, moe_mem_mark mark) {
    if (a->n_chunks == 0) return; /* nothing was ever taken */
    a->cur = mark.cur < a->n_chunks ? mark.cur : 0;
    a->used = mark.used;
    a->total_used = mark.total_used;
}

void moe_mem_step_release(moe_device dev, moe_mem_mark mark) {
    arena *a = &step_arena[dev];
    MOE_ASSERT(mark.top == a->from_top, "step arena on %s: releasing a mark of the %s end while the %s end fills",
               moe_device_name(dev), mark.top ? "top" : "forward", a->from_top ? "top" : "forward");
    if (mark.top) { /* every block taken since goes back */
        MOE_ASSERT(mark.cur <= a->heap.n_log, "step arena on %s: releasing to a top mark past the fill",
                   moe_device_name(dev));
        for (; a->heap.n_log > mark.cur; a->heap.n_log--)
            if (a->heap.log[a->heap.n_log - 1].live) top_give(a, a->heap.n_log - 1);
    } else {
        MOE_ASSERT(mark.total_used <= a->total_used, "step arena on %s: releasing to a mark past the fill (%zu > %zu bytes)",
                   moe_device_name(dev), mark.total_used, a->total_used);
        forward_rewind(a, mark);
    }
    stats[dev].step_bytes = a->total_used + a->top_total;
}

bool moe_mem_step_give_back(moe_device dev, const void *p, size_t bytes) {
    arena *a = &step_arena[dev];
    int i = top_heap_find(&a->heap, p);
    if (i < 0 || bytes == 0 || a->heap.log[i].asked != bytes) return false;
    top_give(a, i);
    stats[dev].step_bytes = a->total_used + a->top_total;
    return true;
}

void moe_mem_step_from_top(bool on) {
    for (int d = 0; d < MOE_DEVICE_COUNT; d++) {
        arena *a = &step_arena[d];
        a->from_top = on;
        if (on && a->top_total == 0) a->top = a->n_chunks ? a->n_chunks - 1 : 0;
    }
}

bool moe_mem_mark_before(moe_mem_mark a, moe_mem_mark b) {
    MOE_ASSERT(!a.top && !b.top, "only forward-end marks are ordered");
    return a.cur < b.cur || (a.cur == b.cur && a.used < b.used);
}

void moe_mem_step_rewind_forward(moe_device dev, moe_mem_mark mark) {
    arena *a = &step_arena[dev];
    MOE_ASSERT(!mark.top && mark.total_used <= a->total_used, "rewinding the forward end past its fill");
    if (!moe_mem_mark_before(mark, (moe_mem_mark){false, a->cur, a->used, 0})) return;
    forward_rewind(a, mark);
    stats[dev].step_bytes = a->total_used + a->top_total;
}

bool moe_mem_step_position(moe_device dev, const void *p, moe_mem_mark *at) {
    const arena *a = &step_arena[dev];
    for (int i = 0; i <= a->cur && i < a->n_chunks; i++) {
        const char *c = a->chunk[i];
        if ((const char *)p < c || (const char *)p >= c + bottom_room(a, i)) continue;
        size_t off = (size_t)((const char *)p - c);
        if (i == a->cur && off >= a->used) return false;
        *at = (moe_mem_mark){false, i, off, 0};
        return true;
    }
    return false;
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

void moe_mem_set_snug(bool on) {
    for (int d = 0; d < MOE_DEVICE_COUNT; d++) {
        arena *a = &step_arena[d];
        MOE_ASSERT(a->total_used == 0 && a->top_total == 0, "moe_mem_set_snug between steps only");
        arena_free_chunks(a, (moe_device)d, false);
        arena_reset(a, (moe_device)d, false); /* forgets the top end's blocks and holes too */
        stats[d].step_capacity = 0;
    }
    snug = on;
}

moe_mem_stats moe_mem_get_stats(moe_device dev) { return stats[dev]; }

uint64_t moe_mem_step_generation(moe_device dev) { return step_arena[dev].generation; }

void moe_mem_reset_peaks(moe_device dev) {
    stats[dev].step_peak = stats[dev].step_bytes;
    stats[dev].persist_peak = stats[dev].persist_bytes;
}
