/* Recorded device work (CUDA graphs): a piece of a step whose kernels are recorded once and
 * then replayed with one launch, without the host issuing each kernel again. What a replay
 * reads must sit at the addresses it had when recorded (persistent tensors whose contents
 * the caller updates before each launch, and the step arena from the same point), and its
 * kernels' host-side arguments must not change: a replay redoes exactly the recorded work.
 *
 * Inside a recording no host data may enter or leave the device: a transfer, a read back
 * or a synchronisation fails with MOE_ERR_INVALID naming it (that work would not be
 * redone by a replay). A device that cannot record (the CPU) runs the work at once
 * instead, under the same rule, so that the host build checks what a GPU would record.
 *
 * Typical use (one device, one thread):
 *   moe_graph_begin(dev);
 *   ... ops on persistent inputs, results into persistent outputs ...
 *   moe_graph_end(dev, ok, &g);            -> g NULL: the device ran the work already
 *   later: if (moe_graph_replayable(g)) moe_graph_launch(g); else record again */
#ifndef MOE_CORE_GRAPH_H
#define MOE_CORE_GRAPH_H

#include <stdbool.h>

#include "core/status.h"
#include "core/tensor.h"

typedef struct moe_graph moe_graph; /* opaque: recorded work of one device */

/* Starts recording dev's work. MOE_ERR_UNSUPPORTED where recording cannot work now (kernel
 * profiling on: MOE_PROFILE); MOE_ERR_INVALID when a recording is already open. */
moe_status moe_graph_begin(moe_device dev);
/* Ends the recording. keep: the recorded work succeeded and is wanted; then *out is the
 * graph (not yet run: launch it), or NULL on a device that ran the work as it went (the
 * CPU). Without keep the recording is dropped (*out NULL). Either way the step memory
 * taken since moe_graph_begin goes back to the arena (it is the graph's own: results
 * meant to outlive it go into persistent tensors), so the arena stands where a launch
 * needs it. */
moe_status moe_graph_end(moe_device dev, bool keep, moe_graph **out);
/* Whether dev is recording now. */
bool moe_graph_recording(moe_device dev);
/* Whether g may be launched now: its device's step arena stands where it stood when g was
 * recorded and has not moved its memory since (else record again). */
bool moe_graph_replayable(const moe_graph *g);
/* Queues g's work on its device (stream order, like any op). */
moe_status moe_graph_launch(moe_graph *g);
void moe_graph_free(moe_graph *g);

/* For core's transfer paths: MOE_ERR_INVALID naming `what` while dev records, else OK. */
moe_status moe_graph_guard(moe_device dev, const char *what);

#endif
