/* Inference: a decoder (the model's weights cast once to the compute dtype) runs explicit
 * batches of tokens from many sequences against a decode state that owns every cache
 * (paged KV blocks, MoM / gated-delta recurrent states). The model itself holds no cache:
 * training never sees one.
 *
 * A batch is a flat list of tokens, each with its position in its sequence and its
 * sequence slot (as llama.cpp's llama_batch). A sequence's tokens in one batch are
 * contiguous and in consecutive position order and continue where the sequence's cache
 * ends: a fresh (empty) sequence starts at any position p0 >= 0 (usually 0), and then each
 * token's position is p0 + its index in the sequence. So a prompt prefill, a one-token
 * decode step and a mix of both (continuous batching) are the same call.
 *
 * Paged KV: the attention keys and values of every layer live in one pool of fixed-size
 * blocks (MOE_KV_BLOCK tokens); each sequence has a block table that grows a block at a
 * time, so nothing is reserved for a maximum length. moe_decode_state_seq_free gives a
 * sequence's blocks back to the pool and restarts its recurrent state.
 *
 * Cost: every projection, router and expert runs once over all the batch's tokens; one
 * variable-length attention reads every sequence's keys in place in the pool
 * (moe_attention_paged_table), MoM / GDN layers run as one forward when the sequences
 * bring equally many tokens (a decode step), else one by one. Decode steps replay recorded
 * graphs where they can (moe_decoder_set_graphs).
 *
 * Typical use (one thread; every call may use the step arena: moe_step_reset between
 * batches is the caller's):
 *   moe_decoder *d; moe_decode_state *s;
 *   moe_decoder_open(&model, MOE_F32, &d);
 *   moe_decode_state_create(d, 8, 4096, &s);
 *   moe_batch b = {.n_tokens = n, .tokens = ids, .pos = pos, .seq = seq, .logits = MOE_LOGITS_LAST};
 *   moe_decoder_forward(d, s, &b, logits, NULL);  -> logits [n_seqs in b, V]
 *   moe_decode_state_seq_free(s, seq);            -> when a request ends
 *   moe_decode_state_free(s); moe_decoder_close(d); */
#ifndef MOE_INFER_DECODER_H
#define MOE_INFER_DECODER_H

#include <stdint.h>

#include "moe/model/model.h"

/* Tokens per KV block. */
#define MOE_KV_BLOCK 16

typedef struct moe_decoder moe_decoder;           /* opaque: weights in the compute dtype */
typedef struct moe_decode_state moe_decode_state; /* opaque: caches of up to max_seqs sequences */

/* Which rows of logits a forward writes. */
typedef enum moe_logits_mode {
    MOE_LOGITS_LAST, /* one row per sequence in the batch: its last token's (decode, prefill) */
    MOE_LOGITS_ALL,  /* one row per token (scoring, parity tests) */
    MOE_LOGITS_NONE  /* nothing (prefill whose logits are not needed) */
} moe_logits_mode;

typedef struct moe_batch {
    int n_tokens;          /* tokens in the batch, > 0 */
    const int32_t *tokens; /* [n_tokens] token ids in [0, vocab) */
    const int32_t *pos;    /* [n_tokens] position of each token in its sequence (RoPE, causal mask) */
    const int32_t *seq;    /* [n_tokens] sequence slot in [0, max_seqs); a slot's tokens are
                            * contiguous, at consecutive positions continuing the slot's */
    moe_logits_mode logits;
} moe_batch;

/* What a forward reports besides the logits (optional: pass NULL). */
typedef struct moe_decode_info {
    int32_t *route_ids; /* in: NULL or [n_layers, n_tokens, top_k]: the experts chosen per layer
                         * and token, the router's order; -1 in dense layers */
    double issue_ms;    /* out: host milliseconds from the call until the forward's last kernel
                         * was queued, before waiting for its logits (on a GPU: how long the
                         * host takes to issue the step; it includes any mid-forward read-back,
                         * as the grouped experts' routing). On the CPU, the whole forward. */
    bool recorded;      /* out: the step ran from a recorded graph (on the CPU: the recordable way) */
} moe_decode_info;

/* A decoder over model m (borrowed: m must outlive it and keep its weights unchanged):
 * m's parameters cast once to `dtype` (MOE_F32, MOE_BF16 on CUDA, MOE_F64 for reference
 * checks) on m's device; with dtype F32 on f32 masters the decoder shares m's tensors.
 * Every routed expert is resident. */
moe_status moe_decoder_open(moe_model *m, moe_dtype dtype, moe_decoder **out);
/* The same with the view (and the decode states) on device `dev`: m's own, or MOE_CUDA for
 * a model on the host, whose parameters are cast there and copied once to the device (only
 * the view takes device memory; MOE_ERR_UNSUPPORTED for masters on another device). */
moe_status moe_decoder_open_on(moe_model *m, moe_device dev, moe_dtype dtype, moe_decoder **out);

/* Where the routed experts of a decoder's MoE layers come from, said at open. */
typedef enum moe_expert_placement {
    MOE_EXPERTS_RESIDENT, /* the view's expert stacks, all in place */
    MOE_EXPERTS_PROVIDED  /* `provider` (e.g. an expert offload cache) runs each expert group */
} moe_expert_placement;

typedef struct moe_decoder_options {
    moe_dtype dtype;
    moe_device dev;                      /* the view's device (as moe_decoder_open_on) */
    moe_expert_placement experts;        /* PROVIDED on a device view: the view's routed expert
                                          * stacks are in page-locked host memory (the provider's
                                          * store), none of them on the device */
    const moe_expert_provider *provider; /* PROVIDED: installed on every MoE layer of the view and
                                          * its begin called before each forward; it must
                                          * outlive the decoder. RESIDENT: must be NULL */
} moe_decoder_options;
moe_status moe_decoder_open_with(moe_model *m, const moe_decoder_options *o, moe_decoder **out);
void moe_decoder_close(moe_decoder *d);
const moe_model *moe_decoder_model(const moe_decoder *d);
/* The decoder's view of the model: its weights in the compute dtype (what an expert
 * provider serves the routed experts from). */
const moe_model *moe_decoder_view(const moe_decoder *d);
/* How every forward runs its MoE layers' experts (moe_forward.experts); AUTO at open. */
void moe_decoder_set_expert_path(moe_decoder *d, moe_expert_path path);
/* Recorded decode steps (on at open). A batch of one token per sequence whose forward
 * issues no host transfer (moe_model_decode_recordable: attention mixers, gathered experts,
 * no routes asked for, no expert provider), issued first in its step (after moe_step_reset,
 * nothing in the step arena yet), is recorded once per batch size and key bound
 * (core/graph.h) and then replayed with one launch, its inputs (token ids, positions, KV
 * tables) rewritten in place; other batches run op by op. The CPU cannot record: it runs
 * such steps op by op through the same fixed inputs, under the recording rule. A recording
 * that fails (e.g. MOE_PROFILE on) turns recording off for the decoder, with the reason
 * kept (moe_decoder_graphs_off); the step then runs op by op. Setting it again clears it. */
void moe_decoder_set_graphs(moe_decoder *d, bool on);
/* NULL while steps may be recorded; else why not ("turned off", or the failure). */
const char *moe_decoder_graphs_off(const moe_decoder *d);

/* Caches for up to max_seqs sequence slots sharing a pool of kv_tokens KV positions per
 * attention layer (rounded up to whole blocks); recurrent states for every slot are
 * allocated here (their size does not depend on the length). */
moe_status moe_decode_state_create(moe_decoder *d, int max_seqs, int64_t kv_tokens, moe_decode_state **out);
void moe_decode_state_free(moe_decode_state *s);

/* Ends sequence `seq`: its KV blocks return to the pool, its length and recurrent state
 * restart from zero (the slot may be reused at once). Freeing an empty slot is allowed. */
moe_status moe_decode_state_seq_free(moe_decode_state *s, int seq);
/* Tokens of sequence `seq` in the cache (its next position: its first one plus this). */
int64_t moe_decode_state_seq_len(const moe_decode_state *s, int seq);
/* KV positions still free in the pool (whole free blocks times MOE_KV_BLOCK; admission
 * control); INT64_MAX when the model has no attention layer. */
int64_t moe_decode_state_free_tokens(const moe_decode_state *s);
int moe_decode_state_max_seqs(const moe_decode_state *s);

/* Runs batch b, appends its tokens to their sequences' caches and writes logits (host f32)
 * per b->logits: LAST [number of distinct sequences in b, V] in the order the sequences
 * appear in b; ALL [n_tokens, V]; NONE: logits may be NULL. No gradient is recorded.
 * Errors (MOE_ERR_INVALID: a batch that breaks the rules above; MOE_ERR_OOM: the KV pool
 * is full) leave the caches as they were. */
moe_status moe_decoder_forward(moe_decoder *d, moe_decode_state *s, const moe_batch *b, float *logits,
                               moe_decode_info *info);

/* Convenience for one sequence: feeds tokens [n] of sequence `seq` at its current length
 * and writes its last token's logits [V]. */
moe_status moe_decoder_feed(moe_decoder *d, moe_decode_state *s, int seq, const int32_t *tokens, int n,
                            float *logits);

/* Logits of every position without gradient through decoder d over a fresh decode state
 * of B sequences: tokens [B, T] (host) at positions pos0 .. pos0 + T - 1 into
 * logits [B, T, V] (host f32). route_ids, when not NULL, receives the experts chosen per
 * layer: [n_layers, B * T, top_k] (the router's order; -1 in dense layers). */
moe_status moe_decoder_logits(moe_decoder *d, const int32_t *tokens, int B, int T, int64_t pos0, float *logits,
                              int32_t *route_ids);
/* The same through a decoder of m in m->compute on m's device. */
moe_status moe_model_logits(moe_model *m, const int32_t *tokens, int B, int T, int64_t pos0, float *logits,
                            int32_t *route_ids);

#endif
