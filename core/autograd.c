/* The tape, backward pass (with the gradient-readiness hook) and gradient accumulation. */
#include "core/autograd.h"

#include <string.h>

#include "core/kernels.h"
#include "core/memory.h"
#include "core/ops.h"

#define TAPE_BLOCK 4096

typedef struct tape_block {
    moe_node *nodes[TAPE_BLOCK];
    struct tape_block *prev;
    int n;
} tape_block;

static tape_block *tape_top;
static int tape_count;
static bool grad_on = true;

bool moe_grad_enabled(void) { return grad_on; }

bool moe_grad_set_enabled(bool on) {
    bool was = grad_on;
    grad_on = on;
    return was;
}

void moe_param_init(moe_tensor *t, const char *name) {
    MOE_ASSERT(t->life == MOE_LIFE_PERSIST, "parameter %s must be PERSIST", name);
    t->requires_grad = true;
    t->is_param = true;
    t->name = name;
}

void moe_tape_reset(void) {
    tape_top = NULL; /* blocks live in the step host arena */
    tape_count = 0;
}

moe_tape moe_tape_swap(moe_tape t) {
    moe_tape was = {tape_top, tape_count};
    tape_top = t.top;
    tape_count = t.count;
    return was;
}

int moe_tape_size(void) { return tape_count; }

moe_node *moe_autograd_record(int op, moe_tensor *out, int n_in, moe_tensor *const *in,
                              const void *attrs, size_t attr_size) {
    MOE_ASSERT(n_in <= MOE_NODE_MAX_INPUTS && attr_size <= MOE_NODE_ATTR_BYTES, "node too large");
    if (!grad_on || !out) return NULL;
    bool any = false;
    for (int i = 0; i < n_in; i++) any |= in[i] && in[i]->requires_grad;
    if (!any) return NULL;
    if (!tape_top || tape_top->n == TAPE_BLOCK) {
        tape_block *b = moe_step_host_alloc(sizeof *b);
        if (!b) return NULL;
        b->prev = tape_top;
        tape_top = b;
    }
    moe_node *n = moe_step_host_alloc(sizeof *n);
    if (!n) return NULL;
    n->op = op;
    for (int d = 0; d < MOE_DEVICE_COUNT; d++) n->fill[d] = moe_mem_step_mark((moe_device)d);
    n->out = out;
    n->n_in = n_in;
    for (int i = 0; i < n_in; i++) n->in[i] = in[i];
    if (attrs) memcpy(n->attrs, attrs, attr_size);
    tape_top->nodes[tape_top->n++] = n;
    tape_count++;
    out->requires_grad = true;
    out->node = n;
    return n;
}

static moe_status backward_error;

/* A freeing sweep's plan (moe_backward_freeing). Forward index f is the node recorded
 * f-th. For each device: fill[f], the forward-end fill at node f's record (running
 * maximum); a tensor at position p is kept by rewinding to fill[m] when p lies before it.
 * need[f]: the smallest m that keeps the tensors of every node before f. Grads never lie
 * in forward memory: a backward that hands a forward buffer on as a grad has it copied. */
typedef struct free_plan {
    int n;
    moe_mem_mark *fill[MOE_DEVICE_COUNT];
    int *need[MOE_DEVICE_COUNT];
} free_plan;

static free_plan *freeing; /* the plan of the sweep running now; NULL: keep everything */

/* The smallest m >= from whose fill keeps the step memory at p on dev; -1 when p is not
 * forward-end memory, n when no recorded fill keeps it. */
static int hold_index(const free_plan *p, int dev, const void *ptr, int from) {
    moe_mem_mark at;
    if (!moe_mem_step_position((moe_device)dev, ptr, &at)) return -1;
    int lo = from, hi = p->n;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (moe_mem_mark_before(at, p->fill[dev][mid])) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

static int tensor_hold(const free_plan *p, const moe_tensor *t, int from) {
    if (!t || t->life != MOE_LIFE_STEP || moe_tensor_numel(t) == 0) return -1;
    return hold_index(p, t->device, t->data, from);
}

/* The smallest m that keeps node f's tensors on dev (its output, inputs and saved). */
static int node_hold(const free_plan *p, const moe_node *node, int f, int dev) {
    const moe_tensor *ts[MOE_NODE_MAX_INPUTS + MOE_NODE_MAX_SAVED + 1] = {node->out};
    int nt = 1, h = -1;
    for (int i = 0; i < node->n_in; i++) ts[nt++] = node->in[i];
    for (int i = 0; i < MOE_NODE_MAX_SAVED; i++) ts[nt++] = node->saved[i];
    for (int i = 0; i < nt; i++) {
        if (!ts[i] || ts[i]->device != (moe_device)dev) continue;
        int th = tensor_hold(p, ts[i], f);
        if (th > h) h = th;
    }
    return h;
}

/* order: the nodes in sweep (reverse) order. */
static moe_status plan_build(moe_node *const *order, int n, free_plan *p) {
    *p = (free_plan){.n = n};
    for (int d = 0; d < MOE_DEVICE_COUNT; d++) {
        p->fill[d] = moe_step_host_alloc(sizeof *p->fill[d] * (size_t)(n ? n : 1));
        p->need[d] = moe_step_host_alloc(sizeof *p->need[d] * (size_t)(n + 1));
        if (!p->fill[d] || !p->need[d]) return moe_last_status();
        for (int f = 0; f < n; f++) {
            moe_mem_mark m = order[n - 1 - f]->fill[d];
            MOE_ASSERT(!m.top, "a freeing backward over nodes recorded during a backward");
            p->fill[d][f] = f > 0 && moe_mem_mark_before(m, p->fill[d][f - 1]) ? p->fill[d][f - 1] : m;
        }
        p->need[d][0] = -1;
        for (int f = 1; f <= n; f++) {
            int h = node_hold(p, order[n - f], f - 1, d);
            p->need[d][f] = h > p->need[d][f - 1] ? h : p->need[d][f - 1];
        }
    }
    return MOE_OK;
}

/* After the backward of node f: rewinds each device's forward end as far as the nodes
 * before f allow. */
static void plan_release(const free_plan *p, int f) {
    for (int d = 0; d < MOE_DEVICE_COUNT; d++) {
        int m = f > p->need[d][f] ? f : p->need[d][f];
        if (m < p->n) moe_mem_step_rewind_forward((moe_device)d, p->fill[d][m]);
    }
}

/* After node f's backward in a freeing sweep: its output's grad is read no more (every
 * consumer ran before it), unless an input took it over, whole or in part. */
static void give_back_out_grad(moe_node *node) {
    moe_tensor *g = node->out->grad;
    if (!g || g->life != MOE_LIFE_STEP || !moe_tensor_is_contiguous(g) || moe_tensor_numel(g) == 0) return;
    size_t bytes = (size_t)moe_tensor_numel(g) * moe_dtype_size(g->dtype);
    const char *lo = g->data, *hi = lo + bytes;
    for (int i = 0; i < node->n_in; i++) {
        const moe_tensor *ig = node->in[i] ? node->in[i]->grad : NULL;
        if (ig && (const char *)ig->data >= lo && (const char *)ig->data < hi) return;
    }
    if (moe_mem_step_give_back(g->device, g->data, bytes)) node->out->grad = NULL;
}

/* g lies in memory a freeing sweep will hand back. */
static bool in_forward_memory(const moe_tensor *g) { return freeing && tensor_hold(freeing, g, 0) >= 0; }

static moe_status grad_add(moe_tensor *t, moe_tensor *g, bool owned) {
    if (!g) return backward_error = moe_last_status() ? moe_last_status() : MOE_ERR_OOM;
    if (!t || !t->requires_grad) return MOE_OK;
    char b1[96], b2[96];
    MOE_ASSERT(moe_tensor_same_shape(t, g), "grad shape %s does not match %s",
               moe_tensor_describe(g, b1, sizeof b1), moe_tensor_describe(t, b2, sizeof b2));
    bool was = moe_grad_set_enabled(false);
    moe_status s = MOE_OK;
    if (!t->grad) {
        if (t->is_param) {
            t->grad = moe_tensor_empty(MOE_LIFE_PERSIST, t->device, t->dtype == MOE_BF16 ? MOE_F32 : t->dtype,
                                       t->ndim, t->shape);
            s = t->grad ? moe_tensor_copy_(t->grad, g) : moe_last_status();
        } else if (owned && moe_tensor_is_contiguous(g) && g->dtype == t->dtype && !in_forward_memory(g)) {
            t->grad = g;
        } else {
            t->grad = moe_tensor_empty(MOE_LIFE_STEP, t->device, t->dtype, t->ndim, t->shape);
            s = t->grad ? moe_tensor_copy_(t->grad, g) : moe_last_status();
        }
    } else {
        if (g->dtype != t->grad->dtype) { /* e.g. a bf16 grad into the f32 grad of a bf16 parameter */
            moe_tensor *gc = moe_tensor_empty(MOE_LIFE_STEP, g->device, t->grad->dtype, g->ndim, g->shape);
            s = gc ? moe_tensor_copy_(gc, g) : moe_last_status();
            g = gc;
        }
        moe_op_attrs_scalar a = {.op = MOE_BIN_ADD};
        moe_kernel_args args = {.out = t->grad, .in = {t->grad, g}, .attrs = &a};
        if (s == MOE_OK) s = moe_kernel_run(MOE_K_BINARY, &args);
    }
    moe_grad_set_enabled(was);
    if (s != MOE_OK && backward_error == MOE_OK) backward_error = s;
    return s;
}

moe_status moe_grad_accumulate(moe_tensor *t, moe_tensor *g) { return grad_add(t, g, false); }

moe_tensor *moe_grad_buffer(moe_tensor *t) {
    if (t->grad) return t->grad;
    moe_lifetime life = t->is_param ? MOE_LIFE_PERSIST : MOE_LIFE_STEP;
    moe_dtype dt = (t->is_param && t->dtype == MOE_BF16) ? MOE_F32 : t->dtype;
    t->grad = moe_tensor_zeros(life, t->device, dt, t->ndim, t->shape);
    if (!t->grad && backward_error == MOE_OK) backward_error = moe_last_status();
    return t->grad;
}
moe_status moe_grad_give(moe_tensor *t, moe_tensor *g) { return grad_add(t, g, true); }

static moe_grad_ready_fn ready_fn;
static void *ready_user;

void moe_set_grad_ready_hook(moe_grad_ready_fn fn, void *user) {
    ready_fn = fn;
    ready_user = user;
}

/* For the readiness hook: each parameter's last position in the sweep, in an
 * open-addressing table keyed by the tensor's address (step host arena). */
typedef struct ready_table {
    moe_tensor **key;
    int *last;
    int mask;
} ready_table;

static bool is_watched(const moe_tensor *t) { return t && t->is_param && t->requires_grad; }

static int ready_slot(const ready_table *rt, const moe_tensor *t) {
    int h = (int)((((uintptr_t)t >> 4) * 0x9E3779B1u) & (uintptr_t)rt->mask);
    while (rt->key[h] && rt->key[h] != t) h = (h + 1) & rt->mask;
    return h;
}

static moe_status ready_build(moe_node *const *order, int n, ready_table *rt) {
    int uses = 0, cap = 16;
    for (int k = 0; k < n; k++)
        for (int i = 0; i < order[k]->n_in; i++) uses += is_watched(order[k]->in[i]);
    while (cap < 2 * uses) cap <<= 1;
    rt->mask = cap - 1;
    rt->key = moe_step_host_alloc(sizeof *rt->key * (size_t)cap); /* zeroed: empty slots */
    rt->last = moe_step_host_alloc(sizeof *rt->last * (size_t)cap);
    if (!rt->key || !rt->last) return moe_last_status();
    for (int k = 0; k < n; k++) /* a later position (an earlier node) overwrites */
        for (int i = 0; i < order[k]->n_in; i++) {
            moe_tensor *t = order[k]->in[i];
            if (!is_watched(t)) continue;
            int h = ready_slot(rt, t);
            rt->key[h] = t;
            rt->last[h] = k;
        }
    return MOE_OK;
}

/* Reports the parameters whose last use is the node at sweep position k. */
static void ready_report(const ready_table *rt, const moe_node *node, int k) {
    for (int i = 0; i < node->n_in; i++) {
        moe_tensor *t = node->in[i];
        if (!is_watched(t) || rt->last[ready_slot(rt, t)] != k) continue;
        bool seen = false; /* the same parameter twice in one node: report it once */
        for (int j = 0; j < i && !seen; j++) seen = node->in[j] == t;
        if (!seen) ready_fn(t, ready_user);
    }
}

/* The sweep: the current tape in reverse recording order from out, whose grad is seed;
 * report: call the readiness hook (when one is set); free_forward: hand the forward's
 * memory back as the sweep passes it. A sweep inside an op's backward (moe_recompute)
 * runs without the outer plan. */
static moe_status sweep(moe_tensor *out, moe_tensor *seed, bool report, bool free_forward) {
    backward_error = MOE_OK;
    moe_node **order = moe_step_host_alloc(sizeof *order * (size_t)(tape_count ? tape_count : 1));
    if (!order) return moe_last_status();
    int n = 0;
    for (tape_block *b = tape_top; b; b = b->prev)
        for (int i = b->n - 1; i >= 0; i--) order[n++] = b->nodes[i];
    report = report && ready_fn;
    ready_table rt = {0};
    if (report) MOE_TRY(ready_build(order, n, &rt));
    free_plan plan, *outer = freeing;
    if (free_forward) MOE_TRY(plan_build(order, n, &plan));
    freeing = free_forward ? &plan : NULL;
    out->grad = seed;
    bool was = moe_grad_set_enabled(false);
    for (int k = 0; k < n && backward_error == MOE_OK; k++) {
        moe_node *node = order[k];
        if (node->out->grad) {
            const moe_op_info *info = &moe_op_table[node->op];
            MOE_ASSERT(info->backward, "op %s has no backward", info->name);
            info->backward(node);
        }
        if (report && backward_error == MOE_OK) ready_report(&rt, node, k);
        if (free_forward && backward_error == MOE_OK) {
            give_back_out_grad(node);
            plan_release(&plan, n - 1 - k);
        }
    }
    moe_grad_set_enabled(was);
    freeing = outer;
    return backward_error;
}

static moe_status backward_seeded(moe_tensor *loss, bool free_forward) {
    if (!loss) return moe_last_status() ? moe_last_status() : MOE_ERR_INVALID;
    MOE_ASSERT(moe_tensor_numel(loss) == 1, "backward needs a scalar loss");
    if (!loss->requires_grad) return moe_error(MOE_ERR_INVALID, "backward: the loss does not require grad");
    if (free_forward) moe_mem_step_from_top(true);
    moe_tensor *seed = moe_tensor_empty(MOE_LIFE_STEP, loss->device, loss->dtype, loss->ndim, loss->shape);
    moe_status s = seed ? moe_tensor_fill(seed, 1.0) : moe_last_status();
    if (s == MOE_OK) s = sweep(loss, seed, true, free_forward);
    if (free_forward) {
        moe_mem_step_from_top(false);
        moe_tape_reset(); /* its tensors' memory went back */
    }
    return s;
}

moe_status moe_backward(moe_tensor *loss) { return backward_seeded(loss, false); }

moe_status moe_backward_freeing(moe_tensor *loss) { return backward_seeded(loss, true); }

moe_status moe_backward_from(moe_tensor *out, moe_tensor *grad) {
    char b1[96], b2[96];
    MOE_ASSERT(out && grad && moe_tensor_same_shape(out, grad), "backward_from: grad %s does not match %s",
               grad ? moe_tensor_describe(grad, b1, sizeof b1) : "NULL", out ? moe_tensor_describe(out, b2, sizeof b2) : "NULL");
    return out->requires_grad ? sweep(out, grad, false, false) : MOE_OK;
}

moe_status moe_zero_grad(moe_tensor *const *params, int n) {
    for (int i = 0; i < n; i++)
        if (params[i]->grad) MOE_TRY(moe_tensor_fill(params[i]->grad, 0.0));
    return MOE_OK;
}
