/* The shared GRU cell of the RMoE router: parameters and one differentiable step. */
#include "router/rmoe.h"

#include <stdio.h>
#include <string.h>

#include "core/autograd.h"
#include "core/ops.h"

static const char *const gru_suffix[6] = {"ir", "iz", "in", "hr", "hz", "hn"};

moe_status moe_rmoe_gru_init(moe_rmoe_gru *g, int dim, moe_device dev, moe_dtype dt, const char *prefix,
                             uint64_t seed, double init_std, moe_init_mode mode) {
    MOE_ASSERT(dim > 0, "rmoe: GRU width must be positive, got %d", dim);
    memset(g, 0, sizeof *g);
    g->dim = dim;
    int64_t p = dim;
    for (int j = 0; j < 6; j++) {
        snprintf(g->names[j], sizeof g->names[j], "%s.w_%s", prefix, gru_suffix[j]);
        snprintf(g->names[6 + j], sizeof g->names[6 + j], "%s.b_%s", prefix, gru_suffix[j]);
        g->w[j] = moe_tensor_init_normal(mode, MOE_LIFE_PERSIST, dev, dt, 2, (int64_t[]){p, p}, seed,
                                         (uint64_t)(j * p * p), init_std);
        g->b[j] = moe_tensor_zeros(MOE_LIFE_PERSIST, dev, dt, 1, (int64_t[]){p});
        if (!g->w[j] || !g->b[j]) {
            moe_status st = moe_last_status();
            moe_rmoe_gru_free(g);
            return st;
        }
        moe_param_init(g->w[j], g->names[j]);
        moe_param_init(g->b[j], g->names[6 + j]);
    }
    return MOE_OK;
}

void moe_rmoe_gru_free(moe_rmoe_gru *g) {
    for (int j = 0; j < 6; j++) {
        moe_tensor_free(g->w[j]);
        moe_tensor_free(g->b[j]);
    }
    memset(g, 0, sizeof *g);
}

int moe_rmoe_gru_params(const moe_rmoe_gru *g, moe_tensor **ts, const char **names, int cap) {
    for (int j = 0; j < MOE_RMOE_GRU_NPARAMS && j < cap; j++) {
        ts[j] = j < 6 ? g->w[j] : g->b[j - 6];
        names[j] = g->names[j];
    }
    return MOE_RMOE_GRU_NPARAMS;
}

/* The three [p, p] weights (or [p] biases) starting at `first`, side by side, in dt. */
static moe_tensor *gate_stack(moe_tensor *const *ts, int first, moe_dtype dt) {
    moe_tensor *c[3] = {moe_cast(ts[first], dt), moe_cast(ts[first + 1], dt), moe_cast(ts[first + 2], dt)};
    return moe_concat(c, 3, ts[first]->ndim - 1);
}

moe_tensor *moe_rmoe_gru_step(const moe_rmoe_gru *g, moe_tensor *xp, moe_tensor *h) {
    if (!xp) return NULL;
    moe_dtype dt = xp->dtype;
    int64_t p = g->dim;
    moe_tensor *const *w = g->w, *const *b = g->b;
    /* [T, 3p] pre-activations of r, z, n from the input and from the state. */
    moe_tensor *gi = moe_add(moe_matmul(xp, gate_stack(w, 0, dt)), gate_stack(b, 0, dt));
    moe_tensor *bh = gate_stack(b, 3, dt);
    if (h) h = moe_cast(h, dt);
    moe_tensor *gh = h ? moe_add(moe_matmul(h, gate_stack(w, 3, dt)), bh) : bh;
    if (!gi || !gh) return NULL;
    moe_tensor *r = moe_sigmoid(moe_add(moe_slice(gi, 1, 0, p), moe_slice(gh, gh->ndim - 1, 0, p)));
    moe_tensor *z = moe_sigmoid(moe_add(moe_slice(gi, 1, p, 2 * p), moe_slice(gh, gh->ndim - 1, p, 2 * p)));
    moe_tensor *n = moe_tanh(moe_add(moe_slice(gi, 1, 2 * p, 3 * p), moe_mul(r, moe_slice(gh, gh->ndim - 1, 2 * p, 3 * p))));
    /* h' = (1 - z) n + z h = n + z (h - n); with h = 0: n - z n. */
    return h ? moe_add(n, moe_mul(z, moe_sub(h, n))) : moe_sub(n, moe_mul(z, n));
}
