/* The shared GRU cell of the layerwise recurrent router (RMoE, router/README.md §2).
 *
 * One cell per model, shared by the routers of every MoE layer. Row-vector convention
 * (x' and h are rows of [T, p], weights are [p_in, p_out]):
 *   r  = sigmoid(x' W_ir + b_ir + h W_hr + b_hr)
 *   z  = sigmoid(x' W_iz + b_iz + h W_hz + b_hz)
 *   n  = tanh(x' W_in + b_in + r * (h W_hn + b_hn))
 *   h' = (1 - z) * n + z * h */
#ifndef MOE_ROUTER_RMOE_H
#define MOE_ROUTER_RMOE_H

#include "core/tensor.h"

/* Parameter order everywhere: w_ir, w_iz, w_in, w_hr, w_hz, w_hn, b_ir, b_iz, b_in, b_hr, b_hz, b_hn. */
enum { MOE_RMOE_GRU_NPARAMS = 12 };

typedef struct moe_rmoe_gru {
    int dim;                                  /* p */
    moe_tensor *w[6];                         /* [p, p]: ir, iz, in, hr, hz, hn */
    moe_tensor *b[6];                         /* [p]:    ir, iz, in, hr, hz, hn */
    char names[MOE_RMOE_GRU_NPARAMS][96];     /* "<prefix>.w_ir", ..., "<prefix>.b_hn" */
} moe_rmoe_gru;

/* Weights normal(init_std) from `seed` (each weight its own counter range; zeros under
 * MOE_INIT_ZEROS), biases zero. The model uses prefix "router.gru". */
moe_status moe_rmoe_gru_init(moe_rmoe_gru *g, int dim, moe_device dev, moe_dtype dt, const char *prefix,
                             uint64_t seed, double init_std, moe_init_mode mode);
void moe_rmoe_gru_free(moe_rmoe_gru *g);

/* The 12 parameters with their names, in the order above. Writes min(12, cap), returns 12. */
int moe_rmoe_gru_params(const moe_rmoe_gru *g, moe_tensor **ts, const char **names, int cap);

/* One step: x' [T, p], h [T, p] or NULL (zeros) -> h' [T, p], in x'->dtype (the
 * parameters are cast to it). Differentiable in x', h and every parameter. */
moe_tensor *moe_rmoe_gru_step(const moe_rmoe_gru *g, moe_tensor *xp, moe_tensor *h);

#endif
