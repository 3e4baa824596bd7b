/* The top end of a step arena as a small heap: log, holes and address map (arena_top.h). */
#include "core/arena_top.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TOMB ((const void *)1)

/* Room for one more element in a growing array; false when host memory runs out. */
static bool reserve(void **arr, int *cap, int need, size_t elem) {
    if (need <= *cap) return true;
    int c = *cap ? *cap * 2 : 64;
    while (c < need) c *= 2;
    void *p = realloc(*arr, (size_t)c * elem);
    if (!p) return false;
    *arr = p;
    *cap = c;
    return true;
}

static int slot_of(const void *p, int mask) { return (int)((((uintptr_t)p >> 8) * 0x9E3779B1u) & (uintptr_t)mask); }

static void map_put(top_heap *h, const void *p, int i) {
    int s = slot_of(p, h->map_cap - 1);
    while (h->keys[s] && h->keys[s] != TOMB) s = (s + 1) & (h->map_cap - 1);
    h->keys[s] = p;
    h->vals[s] = i;
    h->map_used++;
}

/* Rebuilds the map from the log's live entries, with room for `need` keys at half load. */
static bool map_rebuild(top_heap *h, int need) {
    int cap = 64;
    while (cap < 2 * need) cap *= 2;
    const void **keys = calloc((size_t)cap, sizeof *keys);
    int *vals = malloc(sizeof *vals * (size_t)cap);
    if (!keys || !vals) {
        free(keys);
        free(vals);
        return false;
    }
    free(h->keys);
    free(h->vals);
    h->keys = keys;
    h->vals = vals;
    h->map_cap = cap;
    h->map_used = 0;
    for (int i = 0; i < h->n_log; i++)
        if (h->log[i].live) map_put(h, h->log[i].p, i);
    return true;
}

bool top_heap_reserve(top_heap *h) {
    if (!reserve((void **)&h->log, &h->cap_log, h->n_log + 1, sizeof *h->log)) return false;
    return 2 * (h->map_used + 1) <= h->map_cap || map_rebuild(h, h->n_log + 1);
}

void top_heap_log(top_heap *h, char *p, size_t bytes, size_t asked, int chunk) {
    h->log[h->n_log] = (top_block){p, bytes, asked, chunk, true};
    map_put(h, p, h->n_log++);
}

int top_heap_find(const top_heap *h, const void *p) {
    if (!h->map_cap) return -1;
    for (int s = slot_of(p, h->map_cap - 1); h->keys[s]; s = (s + 1) & (h->map_cap - 1))
        if (h->keys[s] == p) return h->log[h->vals[s]].live ? h->vals[s] : -1;
    return -1;
}

static void map_remove(top_heap *h, const void *p) {
    for (int s = slot_of(p, h->map_cap - 1); h->keys[s]; s = (s + 1) & (h->map_cap - 1))
        if (h->keys[s] == p) {
            h->keys[s] = TOMB; /* still counted in map_used until the next rebuild */
            return;
        }
}

static bool hole_before(const top_block *a, int chunk, const char *p) {
    return a->chunk < chunk || (a->chunk == chunk && a->p < p);
}

/* Index of the first hole not before (chunk, p). */
static int hole_search(const top_heap *h, int chunk, const char *p) {
    int lo = 0, hi = h->n_holes;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (hole_before(&h->holes[mid], chunk, p)) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static void hole_delete(top_heap *h, int k) {
    memmove(h->holes + k, h->holes + k + 1, sizeof *h->holes * (size_t)(h->n_holes - k - 1));
    h->n_holes--;
}

/* Adds b to the holes, merged with the holes it touches in its chunk. A hole that cannot
 * be recorded (host memory) is left out: its bytes stay taken until the step ends. */
static void hole_add(top_heap *h, top_block b) {
    int k = hole_search(h, b.chunk, b.p);
    if (k > 0 && h->holes[k - 1].chunk == b.chunk && h->holes[k - 1].p + h->holes[k - 1].bytes == b.p) {
        b.p = h->holes[k - 1].p;
        b.bytes += h->holes[k - 1].bytes;
        hole_delete(h, --k);
    }
    if (k < h->n_holes && h->holes[k].chunk == b.chunk && b.p + b.bytes == h->holes[k].p) {
        b.bytes += h->holes[k].bytes;
        hole_delete(h, k);
    }
    if (!reserve((void **)&h->holes, &h->cap_holes, h->n_holes + 1, sizeof *h->holes)) return;
    memmove(h->holes + k + 1, h->holes + k, sizeof *h->holes * (size_t)(h->n_holes - k));
    b.live = false;
    h->holes[k] = b;
    h->n_holes++;
}

char *top_heap_reuse(top_heap *h, size_t bytes, int *chunk) {
    int best = -1;
    for (int k = 0; k < h->n_holes; k++)
        if (h->holes[k].bytes >= bytes && (best < 0 || h->holes[k].bytes < h->holes[best].bytes)) best = k;
    if (best < 0) return NULL;
    top_block *b = &h->holes[best];
    *chunk = b->chunk;
    char *p = b->p + b->bytes - bytes;
    if (b->bytes == bytes) hole_delete(h, best);
    else b->bytes -= bytes;
    return p;
}

void top_heap_give(top_heap *h, int i) {
    top_block *b = &h->log[i];
    b->live = false;
    map_remove(h, b->p);
    hole_add(h, *b);
}

size_t top_heap_take_front(top_heap *h, int c, const char *front) {
    int k = hole_search(h, c, front);
    if (k >= h->n_holes || h->holes[k].chunk != c || h->holes[k].p != front) return 0;
    size_t bytes = h->holes[k].bytes;
    hole_delete(h, k);
    return bytes;
}

void top_heap_clear(top_heap *h) {
    h->n_log = h->n_holes = 0;
    if (h->map_cap) memset(h->keys, 0, sizeof *h->keys * (size_t)h->map_cap);
    h->map_used = 0;
}

void top_heap_release(top_heap *h) {
    free(h->log);
    free(h->holes);
    free(h->keys);
    free(h->vals);
    memset(h, 0, sizeof *h);
}
