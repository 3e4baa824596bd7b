/* The top end of a step arena as a small heap (core-internal, used by memory.c): the
 * blocks it handed out in order (a log, whose length is a top mark), the blocks given back
 * (holes, by chunk and address, coalesced) and a map from a block's address to its log
 * entry. The bump front of each chunk stays with the arena: a hole that reaches the front
 * is taken back into it with top_heap_take_front. */
#ifndef MOE_CORE_ARENA_TOP_H
#define MOE_CORE_ARENA_TOP_H

#include <stdbool.h>
#include <stddef.h>

typedef struct top_block {
    char *p;
    size_t bytes; /* as taken from the arena (aligned) */
    size_t asked; /* as asked for: what a caller giving it back names */
    int chunk;
    bool live;
} top_block;

typedef struct top_heap {
    top_block *log;
    int n_log, cap_log;
    top_block *holes; /* sorted by (chunk, p) */
    int n_holes, cap_holes;
    const void **keys; /* open addressing: NULL empty, TOMB a removed key */
    int *vals;
    int map_cap, map_used;
} top_heap;

/* Room to log one more block; false when host memory runs out. */
bool top_heap_reserve(top_heap *h);
/* Appends a block handed out (after top_heap_reserve). */
void top_heap_log(top_heap *h, char *p, size_t bytes, size_t asked, int chunk);
/* The smallest hole of at least `bytes` (its upper end; the rest stays a hole), removed
 * from the holes, with its chunk; NULL when none fits. */
char *top_heap_reuse(top_heap *h, size_t bytes, int *chunk);
/* The live log entry of the block at p, or -1. */
int top_heap_find(const top_heap *h, const void *p);
/* Log entry i (live) becomes a hole. */
void top_heap_give(top_heap *h, int i);
/* The hole of chunk c that starts at front, removed: its bytes (0 when none). */
size_t top_heap_take_front(top_heap *h, int c, const char *front);
/* Forgets every block and hole (a new step); top_heap_release also frees the arrays. */
void top_heap_clear(top_heap *h);
void top_heap_release(top_heap *h);

#endif
