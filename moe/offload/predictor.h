/* The routing-path predictor (after ExpertFlow): before a token is computed, a small
 * network predicts which experts it will use in every MoE layer, so that they can be
 * fetched while earlier layers run, and tokens can be grouped so that a micro-batch needs
 * fewer experts (schedule.h).
 *
 * The network (moe_route_net), one definition for training (moe/train/predictor_train.h)
 * and prediction, built from the engine's ops on the CPU in f32:
 *   slots [n, C+1]: the token and its C previous tokens (-1 where there is none)
 *   x = embed[slots, with -1 as row V]   [n, (C+1) r]  own embedding table [V+1, r]
 *   h = gelu(x w1 + b1)                  [n, H]
 *   z = h w2 + b2                        [n, Lm E]      logits: layer l's experts at [l E, (l+1) E)
 * trained with a per-layer softmax cross-entropy against the traced top-k sets.
 *
 * The predictor file (HDF5, our checkpoint format):
 *   /kind "moe-route-predictor", /model/name, /model/fingerprint (trace.h)
 *   /shape i64 [7]: vocab, context C, embed r, hidden H, Lm, E, top_k
 *   /params/embed [V+1, r], /params/w1, /params/b1, /params/w2, /params/b2 (f32) */
#ifndef MOE_OFFLOAD_PREDICTOR_H
#define MOE_OFFLOAD_PREDICTOR_H

#include <stdint.h>

#include "moe/offload/trace.h"

typedef struct moe_route_net_shape {
    int vocab, context, embed, hidden, n_moe_layers, n_experts, top_k;
} moe_route_net_shape;

typedef struct moe_route_net {
    moe_route_net_shape shape;
    moe_tensor *embed, *w1, *b1, *w2, *b2; /* PERSIST f32 on the CPU, named "embed", "w1", ... */
} moe_route_net;

/* Parameters drawn from `seed` (normal, std 1/sqrt(fan-in); biases zero). */
moe_status moe_route_net_init(moe_route_net *net, const moe_route_net_shape *shape, uint64_t seed);
void moe_route_net_free(moe_route_net *net);
int64_t moe_route_net_param_count(const moe_route_net *net);
/* The five parameter tensors, in the order above. */
void moe_route_net_params(moe_route_net *net, moe_tensor **params);

/* The slots [count, C+1] of tokens [first, first + count) of a token list with positions
 * pos and sequence numbers seq (NULL: one sequence): slot j > 0 holds the token j places
 * earlier in the list when it is the same sequence's token at position pos - j, else -1. */
void moe_route_net_slots(int context, const int32_t *tokens, const int32_t *pos, const int32_t *seq, int64_t first,
                         int64_t count, int32_t *slots);
/* Logits z [n, Lm E] (a STEP tensor, recorded on the tape when grad mode is on) for slots
 * [n, C+1]; NULL with an error set on failure. */
moe_tensor *moe_route_net_forward(const moe_route_net *net, const int32_t *slots, int64_t n);

moe_status moe_route_net_save(const moe_route_net *net, const char *path, const char *model_name,
                              const moe_route_fingerprint *fp);

/* ---- the predictor: a trained net tied to one model ---- */
typedef struct moe_predictor moe_predictor;

/* Refuses a predictor of another model, by name (fingerprint: layer count, experts, top_k,
 * vocabulary and a hash of the router weights), and a missing or damaged file, naming it. */
moe_status moe_predictor_load(const char *path, const moe_model *m, moe_predictor **out);
/* The same against a fingerprint (e.g. a trace's) instead of a model. */
moe_status moe_predictor_load_for(const char *path, const moe_route_fingerprint *fp, const char *model_name,
                                  moe_predictor **out);
void moe_predictor_free(moe_predictor *p);
/* scores [n_moe_layers, m, n_experts] (higher = more likely used) of the tokens rows[0..m)
 * (indices) of a token list: tokens [n] at positions pos [n] of sequences seq [n] (NULL:
 * one sequence). A token's context is the tokens just before it in the list of the same
 * sequence at the positions just before its own, so the list's other tokens serve as
 * context only: to predict a decode step of several sequences in one call, list each
 * sequence's last few tokens before its new one and name the new ones' rows. Uses the CPU
 * step arena and gives its memory back before returning (moe_mem_step_mark / release); no
 * gradient is recorded. */
moe_status moe_predictor_predict(moe_predictor *p, const int32_t *tokens, const int32_t *pos, const int32_t *seq, int n,
                                 const int32_t *rows, int m, float *scores);
const moe_route_net *moe_predictor_net(const moe_predictor *p);

/* Scores [Lm, count, E] of net for the trace's tokens [first, first + count), each with
 * its context from the trace (no gradient; step memory given back). */
moe_status moe_route_net_score_trace(const moe_route_net *net, const moe_trace *t, int64_t first, int64_t count,
                                     float *scores);
/* Seconds per prediction of one token with a full context (the median of `reps`). */
moe_status moe_route_net_time_token(const moe_route_net *net, int reps, double *seconds);

#endif
