/* Token scheduling in a decoder's forwards (after ExpertFlow; the grouping is schedule.h's).
 *
 * A batch's decode rows (sequences bringing exactly one token) run in micro-batches of M,
 * grouped by the predicted routing paths of their tokens when a predictor is given, else
 * in arrival order; the rest of the batch (prompt chunks) runs as one forward after them.
 * Each sequence's logits row lands where one forward of the whole batch would put it. The
 * rows are those of one forward up to the last bits (on the CPU oneDNN computes a product
 * of one row with another kernel than one of several, e.g. a micro-batch of one sequence's
 * LM head), so greedy tokens agree but for near ties: the same holds for any change of
 * batch composition.
 *
 * The predictor reads a token with the last `context` tokens of its sequence: each
 * sequence slot keeps them (oldest first, -1 before the start), fed by every forward run
 * here (or told with moe_token_sched_observe) and emptied when the slot's sequence ends. A
 * row whose position does not continue its slot's history is predicted without it.
 *
 * Every forward is counted with the distinct (MoE layer, routed expert) pairs it routed
 * to: what one forward needs resident. One thread; forwards reset the step arena. */
#ifndef MOE_OFFLOAD_TOKEN_SCHED_H
#define MOE_OFFLOAD_TOKEN_SCHED_H

#include <stdint.h>

#include "moe/infer/decoder.h"
#include "moe/offload/predictor.h"

typedef struct moe_token_sched moe_token_sched;

typedef struct moe_forward_tally {
    int64_t forwards; /* decoder forwards */
    int64_t experts;  /* distinct (MoE layer, routed expert) pairs per forward, summed */
} moe_forward_tally;

typedef struct moe_token_sched_counts {
    moe_forward_tally decode;  /* forwards of decode rows alone (one token per sequence) */
    moe_forward_tally prefill; /* forwards where a sequence brings several tokens */
} moe_token_sched_counts;

/* A scheduler for decoder d (borrowed) and sequence slots [0, max_seqs): micro-batches of
 * `micro` decode rows (0: every batch is one forward), grouped by the paths that pred
 * (borrowed, of d's model; NULL: arrival order) predicts. */
moe_status moe_token_sched_create(moe_decoder *d, int max_seqs, int micro, moe_predictor *pred,
                                  moe_token_sched **out);
void moe_token_sched_free(moe_token_sched *t);

/* Runs b through the scheduler's decoder on state s into logits as one
 * moe_decoder_forward(b) would write them (b->logits other than MOE_LOGITS_LAST, or
 * decode rows that fit one micro-batch: one forward). Resets the step arena before each
 * forward. MOE_ERR_INVALID for a slot out of range or in two runs of b. A forward that
 * fails leaves the sequences of the forwards before it advanced: the caller ends them. */
moe_status moe_token_sched_forward(moe_token_sched *t, moe_decode_state *s, const moe_batch *b, float *logits);

/* order [n]: rows i of tokens, pos, seq [n] (one token per sequence) in micro-batches of
 * M, micro-batch j at order[j M .. j M + M): by predicted paths, or 0..n-1 without a
 * predictor. Uses the step arena and gives it back. */
moe_status moe_token_sched_order(moe_token_sched *t, const int32_t *tokens, const int32_t *pos, const int32_t *seq,
                                 int n, int32_t *order);

/* Appends b's tokens to their slots' histories (forwards run elsewhere). */
void moe_token_sched_observe(moe_token_sched *t, const moe_batch *b);
/* Slot `seq`'s sequence ended: its history empties. */
void moe_token_sched_seq_free(moe_token_sched *t, int seq);
/* Slot `seq`'s history [*context] (the predictor's window; 0 without one). */
const int32_t *moe_token_sched_history(const moe_token_sched *t, int seq, int *context);

moe_token_sched_counts moe_token_sched_get_counts(const moe_token_sched *t);

#endif
