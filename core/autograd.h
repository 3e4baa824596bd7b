/* Reverse-mode autograd over a recorded tape (define-by-run).
 *
 * Each op appends a node (op id, inputs, output, saved tensors, attributes) when grad
 * mode is on and one of its inputs requires grad. moe_backward(loss) walks the tape in
 * reverse and calls each op's backward, which adds into its inputs' grads through
 * moe_grad_accumulate(). Parameter grads are PERSIST tensors that accumulate (+=) across
 * backward calls until moe_zero_grad(); activation grads live in the step arena. */
#ifndef MOE_CORE_AUTOGRAD_H
#define MOE_CORE_AUTOGRAD_H

#include "core/memory.h"
#include "core/tensor.h"

#define MOE_NODE_MAX_INPUTS 8
#define MOE_NODE_MAX_SAVED 5
#define MOE_NODE_ATTR_BYTES 128

typedef struct moe_node {
    int op; /* moe_op_id */
    moe_tensor *out;
    int n_in;
    moe_tensor *in[MOE_NODE_MAX_INPUTS];
    moe_tensor *saved[MOE_NODE_MAX_SAVED];
    _Alignas(16) unsigned char attrs[MOE_NODE_ATTR_BYTES];
    moe_mem_mark fill[MOE_DEVICE_COUNT];  /* each device's step-arena fill when recorded */
} moe_node;

/* Grad mode (on by default). moe_grad_set_enabled returns the previous value. */
bool moe_grad_enabled(void);
bool moe_grad_set_enabled(bool on);

/* Marks a PERSIST leaf as a trainable parameter. */
void moe_param_init(moe_tensor *t, const char *name);

/* Appends a node for `out` if recording applies; copies attr_size bytes of attrs.
 * Returns the node (to add saved tensors) or NULL when nothing is recorded. */
moe_node *moe_autograd_record(int op, moe_tensor *out, int n_in, moe_tensor *const *in,
                              const void *attrs, size_t attr_size);

/* Seeds d loss / d loss = 1 (loss must be a scalar) and runs the tape backwards.
 * Returns the first error an op's backward met (e.g. out of memory). */
moe_status moe_backward(moe_tensor *loss);
/* moe_backward that hands the forward's step memory back as the sweep passes it: after
 * node k's backward, what was allocated after k was recorded goes back, unless a node
 * still to run refers to it, and so does the grad of k's output (no input took it
 * over). New memory during the sweep comes from the arena's top end
 * (moe_mem_step_from_top), which reuses both: the step's peak is about the forward plus
 * the grads alive at once instead of the forward plus every grad. Afterwards the tape is
 * forgotten and the forward's STEP tensors (outputs, the loss itself) and the grads of
 * non-leaf tensors must not be read; grads of parameters and of leaves stay. Read what
 * the caller needs from the forward first. */
moe_status moe_backward_freeing(moe_tensor *loss);

/* The tape as a value: an op whose backward records a piece of the graph again and
 * differentiates through it (moe_recompute) swaps in an empty tape of its own, sweeps it
 * with moe_backward_from and swaps the outer tape back. */
typedef struct moe_tape {
    struct tape_block *top;
    int count;
} moe_tape;
/* Installs t (a zeroed moe_tape: an empty one) and returns the tape that was current. */
moe_tape moe_tape_swap(moe_tape t);
/* Runs the current tape backwards from out with d out = grad (out's shape), without the
 * readiness hook (the outer sweep reports the parameters the op takes as inputs). */
moe_status moe_backward_from(moe_tensor *out, moe_tensor *grad);

/* Gradient readiness, to overlap gradient communication with the backward. With a hook
 * set, moe_backward calls fn(param, user) once for each parameter (is_param leaf that
 * requires grad) that the tape uses, as soon as its grad is final for this backward:
 * right after the backward of the earliest recorded node that takes it as an input (the
 * last of its nodes the reverse sweep reaches). Within one node, parameters are reported
 * in input order. Parameters the tape does not use are not reported, nor, once an op's
 * backward has failed, any more parameters. The hook must not record ops or touch the
 * grads of parameters not yet reported. fn NULL removes the hook. */
typedef void (*moe_grad_ready_fn)(moe_tensor *param, void *user);
void moe_set_grad_ready_hook(moe_grad_ready_fn fn, void *user);

/* Adds g into t->grad (allocating it on first use). No-op when t does not require grad.
 * accumulate copies g on first use (g may be shared, e.g. the same upstream grad handed
 * to both inputs of an add); give lets t->grad take g over, for a g that no other input
 * receives: one the backward just made, or the node's own upstream grad n->out->grad
 * (nothing reads it once the node's backward has run; the tape runs in reverse order).
 * A NULL g records the pending error. */
moe_status moe_grad_accumulate(moe_tensor *t, moe_tensor *g);
moe_status moe_grad_give(moe_tensor *t, moe_tensor *g);
/* t->grad, created zeroed when absent, for a backward that adds into part of it in place
 * (a slice's grad, an expert's weight grad). NULL on allocation failure (recorded). */
moe_tensor *moe_grad_buffer(moe_tensor *t);
/* Sets the grads of the given parameters to zero. */
moe_status moe_zero_grad(moe_tensor *const *params, int n);

/* Nodes recorded since the last moe_step_reset() (tests and diagnostics). */
int moe_tape_size(void);
/* Forgets the tape; called by moe_step_reset(). */
void moe_tape_reset(void);

#endif
