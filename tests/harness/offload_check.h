/* Offloaded generation against the resident decoder (test_cpu_offload, test_cuda_offload):
 * greedy generation of a fixed prompt under every policy at the least budget (one layer's
 * top-k; resident: every expert), at a larger one and in waves of gathered experts, with
 * the ids, the logits and the counters checked; predict runs with an oracle that replays
 * the resident run's routes and must beat lru. */
#ifndef MOE_TESTS_OFFLOAD_CHECK_H
#define MOE_TESTS_OFFLOAD_CHECK_H

#include "moe/model/model.h"
#include "moe/offload/offload.h"

/* Options for one sequence of the check's length in m's compute dtype. */
moe_offload_options offload_check_options(const moe_model *m, moe_offload_policy p);
/* The least budget of o on m. */
size_t offload_check_min_budget(const moe_model *m, const moe_offload_options *o);
/* Every policy against the resident decoder of m; max_rel 0: the logits bit for bit, else
 * their largest difference over the largest logit (the ids always equal). */
void offload_check_model(moe_model *m, const char *name, double max_rel);
/* The same with the decoders on device dev (m's own, or MOE_CUDA for a model on the host).
 * For a model on the host and a device, also the memory: the device's live PERSIST bytes
 * (moe_mem_get_stats) an offloaded open takes are the resident decoder's minus the routed
 * experts' (the store, on the host) plus the cache arena. */
void offload_check_model_on(moe_model *m, moe_device dev, const char *name, double max_rel);

#endif
