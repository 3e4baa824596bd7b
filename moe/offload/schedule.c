/* Token scheduling: routing paths as bitsets and greedy grouping by shared experts
 * (schedule.h). */
#include "moe/offload/schedule.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

int moe_path_words(int n_layers, int n_experts) { return (n_layers * n_experts + 63) / 64; }

static void set_bit(uint64_t *path, int bit) { path[bit / 64] |= 1ull << (bit % 64); }

void moe_paths_from_scores(const float *scores, int n_layers, int64_t N, int n_experts, int k, const int64_t *rows,
                           int n, uint64_t *paths) {
    int words = moe_path_words(n_layers, n_experts);
    memset(paths, 0, sizeof *paths * (size_t)n * (size_t)words);
    for (int i = 0; i < n; i++)
        for (int l = 0; l < n_layers; l++) {
            const float *row = scores + ((int64_t)l * N + rows[i]) * n_experts;
            uint64_t *p = paths + (int64_t)i * words;
            for (int j = 0; j < k; j++) { /* the j-th best expert not yet set */
                int best = -1;
                for (int e = 0; e < n_experts; e++) {
                    int bit = l * n_experts + e;
                    bool taken = (p[bit / 64] >> (bit % 64)) & 1;
                    if (!taken && (best < 0 || row[e] > row[best])) best = e;
                }
                set_bit(p, l * n_experts + best);
            }
        }
}

void moe_paths_from_routes(const int32_t *ids, int n_layers, int64_t N, int n_experts, int k, const int64_t *rows,
                           int n, uint64_t *paths) {
    int words = moe_path_words(n_layers, n_experts);
    memset(paths, 0, sizeof *paths * (size_t)n * (size_t)words);
    for (int i = 0; i < n; i++)
        for (int l = 0; l < n_layers; l++)
            for (int j = 0; j < k; j++)
                set_bit(paths + (int64_t)i * words, l * n_experts + ids[((int64_t)l * N + rows[i]) * k + j]);
}

static int popcount_or(const uint64_t *a, const uint64_t *b, int words) {
    int c = 0;
    for (int w = 0; w < words; w++) c += __builtin_popcountll(a[w] | b[w]);
    return c;
}

static int popcount_and(const uint64_t *a, const uint64_t *b, int words) {
    int c = 0;
    for (int w = 0; w < words; w++) c += __builtin_popcountll(a[w] & b[w]);
    return c;
}

/* The unplaced path adding the fewest experts to `uni` (ties: most shared, lowest index). */
static int best_next(const uint64_t *paths, int n, int words, const bool *placed, const uint64_t *uni) {
    int best = -1, best_add = 0, best_common = 0, have = popcount_or(uni, uni, words);
    for (int i = 0; i < n; i++) {
        if (placed[i]) continue;
        const uint64_t *p = paths + (int64_t)i * words;
        int add = popcount_or(uni, p, words) - have, common = popcount_and(uni, p, words);
        if (best < 0 || add < best_add || (add == best_add && common > best_common))
            best = i, best_add = add, best_common = common;
    }
    return best;
}

moe_status moe_schedule_group(const uint64_t *paths, int n, int words, int micro, int32_t *order) {
    MOE_ASSERT(n >= 0 && words > 0 && micro > 0, "schedule: %d paths of %d words, micro-batch %d", n, words, micro);
    bool *placed = calloc((size_t)n + 1, sizeof *placed);
    uint64_t *uni = malloc(sizeof *uni * (size_t)words);
    if (!placed || !uni) {
        free(placed);
        free(uni);
        return moe_error(MOE_ERR_OOM, "schedule: out of host memory for %d paths", n);
    }
    int done = 0, seed = 0;
    while (done < n) {
        while (placed[seed]) seed++;
        memcpy(uni, paths + (int64_t)seed * words, sizeof *uni * (size_t)words);
        placed[seed] = true;
        order[done++] = seed;
        for (int j = 1; j < micro && done < n; j++) {
            int i = best_next(paths, n, words, placed, uni);
            for (int w = 0; w < words; w++) uni[w] |= paths[(int64_t)i * words + w];
            placed[i] = true;
            order[done++] = i;
        }
    }
    free(placed);
    free(uni);
    return MOE_OK;
}

int64_t moe_schedule_distinct(const uint64_t *paths, const int32_t *order, int n, int words, int micro) {
    int64_t total = 0;
    for (int b = 0; b < n; b += micro)
        for (int w = 0; w < words; w++) {
            uint64_t uni = 0;
            for (int j = b; j < b + micro && j < n; j++) uni |= paths[(int64_t)(order ? order[j] : j) * words + w];
            total += __builtin_popcountll(uni);
        }
    return total;
}
