/* Routing traces: for every token of a text, its id, its position in its sequence and, per
 * MoE layer, the top-k experts the router chose. `moe trace` records them on real text;
 * the routing-path predictor (predictor.h) trains and is evaluated on them.
 *
 * A trace file is an HDF5 file of our checkpoint format (core/h5file.h: CRC per dataset,
 * written atomically):
 *   /kind                 "moe-routing-trace"
 *   /model/name           the traced model (its checkpoint file or hub folder)
 *   /model/fingerprint    i64 [6]: layers, MoE layers, experts, top_k, vocab, router hash
 *   /model/active_params  i64: the model's active parameters per token
 *   /model/decode_step_s  f64: one single-token decode step, timed when tracing (0: not timed)
 *   /context              i64: tokens per traced sequence
 *   /tokens /pos /seq     i32 [N]: token id, position in its sequence, sequence number
 *   /moe_layers           i32 [Lm]: the model layer of each MoE layer
 *   /route_ids            i32 [Lm, N, k]: the experts chosen (the router's order)
 * Sequences of `context` tokens are stored one after another, each at positions 0, 1, 2, ...
 *
 * Also here: the model fingerprint that ties traces and predictors to one model, the
 * per-layer top-k recall of any scores against a trace, and the token-identity baseline. */
#ifndef MOE_OFFLOAD_TRACE_H
#define MOE_OFFLOAD_TRACE_H

#include <stdint.h>

#include "core/h5file.h"
#include "moe/infer/decoder.h"
#include "moe/model/model.h"

/* What routing depends on, to refuse a predictor or trace of another model. */
typedef struct moe_route_fingerprint {
    int32_t n_layers, n_moe_layers, n_experts, top_k, vocab;
    uint32_t router_hash; /* CRC-32 of every MoE layer's router parameters (and aux-free selection
                           * bias) as f32, in layer order */
} moe_route_fingerprint;

moe_status moe_route_fingerprint_of(const moe_model *m, moe_route_fingerprint *fp);
/* MOE_OK when `have` equals `want` (what `file` was made for: model `want_name`); else
 * MOE_ERR_INVALID naming the file, both models and the first field that differs.
 * have_name says which model is at hand ("this model", "model B.h5"). */
moe_status moe_route_fingerprint_check(const moe_route_fingerprint *want, const char *want_name,
                                       const moe_route_fingerprint *have, const char *have_name, const char *file);
/* The fingerprint as an i64 [6] dataset of a trace or predictor file. */
moe_status moe_route_fingerprint_put(moe_h5 *f, const char *name, const moe_route_fingerprint *fp);
moe_status moe_route_fingerprint_get(moe_h5 *f, const char *name, moe_route_fingerprint *fp);
/* MOE_OK when dataset `name` has exactly that dtype and shape (so a reader may allocate by
 * it: core/h5file.h checks that the file holds its bytes); else MOE_ERR_FORMAT naming it. */
moe_status moe_trace_expect_shape(moe_h5 *f, const char *name, moe_h5_dtype dt, int ndim, const int64_t *shape);

typedef struct moe_trace {
    char *model_name;           /* malloc'd */
    moe_route_fingerprint fp;
    int64_t active_params;
    double decode_step_s;
    int64_t context;
    int64_t n;                  /* tokens */
    int32_t *tokens, *pos, *seq; /* [n] */
    int32_t *moe_layers;        /* [fp.n_moe_layers] */
    int32_t *ids;               /* [fp.n_moe_layers, n, fp.top_k] */
} moe_trace;

/* Runs decoder d (its model on its device and dtype) over tokens [n_tokens] cut into sequences of
 * `context` tokens (a shorter tail is dropped, unless it is the only sequence), `batch`
 * sequences per forward, and records their routes into *out (free with moe_trace_free).
 * `name` names the model in the trace. Needs a model with at least one MoE layer. Resets
 * the step arena (moe_step_reset) after each forward, as moe_trace_time_decode after each step. */
moe_status moe_trace_record(moe_decoder *d, const char *name, const int32_t *tokens, int64_t n_tokens, int context,
                            int batch, moe_trace *out);
/* Seconds per single-token decode step of d (one sequence, after a prompt of `prompt`
 * tokens; the median of `reps` steps). */
moe_status moe_trace_time_decode(moe_decoder *d, int prompt, int reps, double *seconds);

moe_status moe_trace_save(const moe_trace *t, const char *path);
/* Refuses a missing or damaged file, or one that is not a trace, naming the file. */
moe_status moe_trace_load(const char *path, moe_trace *t);
void moe_trace_free(moe_trace *t);

/* Tokens before the first sequence that holds out about `fraction` of the trace's
 * sequences (at least one sequence on each side): [0, split) trains, [split, n) is held
 * out. MOE_ERR_INVALID when the trace has a single sequence. */
moe_status moe_trace_holdout_split(const moe_trace *t, double fraction, int64_t *split);

/* Per-layer top-k recall of scores [Lm, count, E] (higher = more likely) for the trace's
 * tokens [first, first + count): recall[l] = mean over those tokens of
 * |top-k of the scores ∩ the routed experts| / k. */
void moe_trace_recall(const moe_trace *t, int64_t first, int64_t count, const float *scores, double *recall);

/* The token-identity baseline as scores [Lm, count, E] for tokens [first, first + count):
 * how often each expert served this token id in the trace's tokens [0, n_train), ties and
 * unseen ids broken by the expert's overall frequency there. */
moe_status moe_trace_token_freq_scores(const moe_trace *t, int64_t n_train, int64_t first, int64_t count,
                                       float *scores);

#endif
