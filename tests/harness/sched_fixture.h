/* What the token-scheduling tests (test_cpu_offload_sched, test_cpu_serve) run on: a small
 * MoE model of ours and a routing-path predictor of it with random weights (saved and
 * loaded back through the file, as `moe predictor train` would leave one): its paths are
 * arbitrary but fixed, which is all an ordering test needs. */
#ifndef MOE_TESTS_SCHED_FIXTURE_H
#define MOE_TESTS_SCHED_FIXTURE_H

#include "moe/infer/decoder.h"
#include "moe/model/model.h"
#include "moe/offload/predictor.h"

typedef struct sched_fixture {
    moe_model m;         /* 4 blocks (block 0 dense: 3 MoE layers) of 8 experts, top-2,
                          * context 64, f32 on the CPU */
    moe_predictor *pred; /* context 3, random weights */
    moe_decoder *dec;    /* resident, over m */
} sched_fixture;

/* The model with vocabulary V, its predictor drawn from seed and its decoder; fails the
 * test (fatal) when one cannot be built. */
void sched_fixture_open(sched_fixture *f, int V, uint64_t seed);
void sched_fixture_close(sched_fixture *f);

#endif
