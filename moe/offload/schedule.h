/* Token scheduling for offloaded inference (after ExpertFlow): N sequences each bring
 * their next token; ordered into micro-batches of M so that tokens with similar routing
 * paths run together, each micro-batch activates fewer distinct experts and fewer experts
 * must be resident at once.
 *
 * A routing path is a bitset of Lm × E bits (bit l E + e: expert e of MoE layer l is
 * used), `words` = moe_path_words(Lm, E) uint64 words per path. Pure functions. */
#ifndef MOE_OFFLOAD_SCHEDULE_H
#define MOE_OFFLOAD_SCHEDULE_H

#include <stdint.h>

#include "core/status.h"

int moe_path_words(int n_layers, int n_experts);

/* paths [n, words] from the top-k of scores [Lm, N, E] (predictor.h's layout) of rows
 * rows[0..n) (indices into N). */
void moe_paths_from_scores(const float *scores, int n_layers, int64_t N, int n_experts, int k, const int64_t *rows,
                           int n, uint64_t *paths);
/* paths [n, words] from routes ids [Lm, N, k] (trace.h's layout) of rows rows[0..n). */
void moe_paths_from_routes(const int32_t *ids, int n_layers, int64_t N, int n_experts, int k, const int64_t *rows,
                           int n, uint64_t *paths);

/* Orders paths [n, words] into micro-batches of `micro` (the last may be smaller): order
 * [n] is a permutation of 0..n-1; micro-batch b is order[b M .. b M + M). Greedy: each
 * micro-batch starts from the first path not yet placed, then repeatedly takes the path
 * that adds the fewest experts to the batch's union (ties: the most experts in common,
 * then the lowest index). O(n^2 words). MOE_ERR_OOM only. */
moe_status moe_schedule_group(const uint64_t *paths, int n, int words, int micro, int32_t *order);

/* Distinct (layer, expert) pairs summed over the micro-batches of `micro` in `order`
 * (NULL: 0..n-1). */
int64_t moe_schedule_distinct(const uint64_t *paths, const int32_t *order, int n, int words, int micro);

#endif
