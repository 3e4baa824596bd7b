/* The differentiable all-to-all exchange of the MoE layer (see core/ops.h). */
#include <string.h>

#include "core/dist.h"
#include "core/op_internal.h"

typedef struct {
    int64_t *send_rows, *recv_rows; /* per rank, host copies in the step arena */
    int group;
} a2a_attrs;

static moe_tensor *exchange(moe_tensor *x, const int64_t *send_rows, const int64_t *recv_rows, int group) {
    int P = moe_dist_size((moe_dist_group)group);
    int64_t rows_out = 0;
    for (int r = 0; r < P; r++) rows_out += recv_rows[r];
    int64_t shape[MOE_MAX_DIMS];
    memcpy(shape, x->shape, sizeof shape);
    shape[0] = rows_out;
    moe_tensor *src = op_contiguous_nograd(x);
    moe_tensor *o = src ? op_new(x, x->dtype, x->ndim, shape) : NULL;
    if (!o || moe_dist_alltoallv_tensor((moe_dist_group)group, src, send_rows, o, recv_rows) != MOE_OK) return NULL;
    return o;
}

moe_tensor *moe_all_to_all(moe_tensor *x, const int64_t *send_rows, const int64_t *recv_rows, int group) {
    OP_NEED(x);
    int P = moe_dist_size((moe_dist_group)group);
    int64_t sent = 0;
    for (int r = 0; r < P; r++) sent += send_rows[r];
    if (!moe_check(x->ndim >= 1 && sent == x->shape[0], "all_to_all", "send counts add up to %lld rows, x is %s",
                   (long long)sent, D(x)))
        return NULL;
    if (P == 1) return x;
    moe_tensor *o = exchange(x, send_rows, recv_rows, group);
    if (!o) return NULL;
    a2a_attrs at = {.group = group};
    moe_node *node = moe_autograd_record(MOE_OP_ALL_TO_ALL, o, 1, &x, &at, sizeof at);
    if (node) {
        a2a_attrs *na = (a2a_attrs *)node->attrs;
        na->send_rows = moe_step_host_alloc(sizeof(int64_t) * (size_t)P);
        na->recv_rows = moe_step_host_alloc(sizeof(int64_t) * (size_t)P);
        if (!na->send_rows || !na->recv_rows) return NULL;
        memcpy(na->send_rows, send_rows, sizeof(int64_t) * (size_t)P);
        memcpy(na->recv_rows, recv_rows, sizeof(int64_t) * (size_t)P);
    }
    return o;
}

void moe_backward_all_to_all(moe_node *n) {
    const a2a_attrs *at = (const a2a_attrs *)n->attrs;
    moe_grad_give(n->in[0], exchange(n->out->grad, at->recv_rows, at->send_rows, at->group));
}
