/* Recorded device work through the backend's capture hooks (see graph.h); the guard that
 * keeps host transfers out of a recording; replay validity from the step arena's mark. */
#include "core/graph.h"

#include <stdlib.h>

#include "core/kernels.h"
#include "core/memory.h"

struct moe_graph {
    moe_device dev;
    void *exec;        /* the backend's instantiated graph */
    moe_mem_mark at;   /* the step arena's mark when the recording began */
    uint64_t generation;
};

static bool recording[MOE_DEVICE_COUNT];
static moe_mem_mark recording_at[MOE_DEVICE_COUNT];

moe_status moe_graph_begin(moe_device dev) {
    const moe_backend *be = moe_backend_get(dev);
    if (!be) return moe_last_status();
    if (recording[dev]) return moe_error(MOE_ERR_INVALID, "graph: %s is recording already", moe_device_name(dev));
    if (moe_profile_level() != 0)
        return moe_error(MOE_ERR_UNSUPPORTED, "graph: kernel profiling (MOE_PROFILE) times kernels one by one");
    if (be->capture_begin) MOE_TRY(be->capture_begin());
    recording[dev] = true;
    recording_at[dev] = moe_mem_step_mark(dev);
    return MOE_OK;
}

moe_status moe_graph_end(moe_device dev, bool keep, moe_graph **out) {
    *out = NULL;
    MOE_ASSERT(recording[dev], "graph: %s is not recording", moe_device_name(dev));
    recording[dev] = false;
    moe_mem_step_release(dev, recording_at[dev]); /* the recording's step memory is the graph's own */
    const moe_backend *be = moe_backend_get(dev);
    if (!be->capture_begin) return MOE_OK; /* the work ran as it was issued */
    void *exec = NULL;
    MOE_TRY(be->capture_end(keep, &exec));
    if (!keep) return MOE_OK;
    moe_graph *g = malloc(sizeof *g);
    if (!g) {
        be->graph_free(exec);
        return moe_error(MOE_ERR_OOM, "graph: out of host memory");
    }
    *g = (moe_graph){dev, exec, recording_at[dev], moe_mem_step_generation(dev)};
    *out = g;
    return MOE_OK;
}

bool moe_graph_recording(moe_device dev) { return recording[dev]; }

bool moe_graph_replayable(const moe_graph *g) {
    moe_mem_mark now = moe_mem_step_mark(g->dev);
    return g->generation == moe_mem_step_generation(g->dev) && now.top == g->at.top && now.cur == g->at.cur &&
           now.used == g->at.used && now.total_used == g->at.total_used;
}

moe_status moe_graph_launch(moe_graph *g) {
    MOE_ASSERT(moe_graph_replayable(g), "graph: launched where it was not recorded (see moe_graph_replayable)");
    return moe_backend_get(g->dev)->graph_launch(g->exec);
}

void moe_graph_free(moe_graph *g) {
    if (!g) return;
    moe_backend_get(g->dev)->graph_free(g->exec);
    free(g);
}

moe_status moe_graph_guard(moe_device dev, const char *what) {
    if (!recording[dev]) return MOE_OK;
    return moe_error(MOE_ERR_INVALID, "graph: %s on %s while recording (a replay would not redo it: keep host data "
                     "out of recorded work)", what, moe_device_name(dev));
}
