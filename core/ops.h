/* The differentiable op API: every function records itself on the autograd tape when
 * grad mode is on and an input requires grad.
 *
 * Errors: a shape / dtype / device mismatch returns NULL and leaves a message naming
 * the op and the shapes in moe_last_error(). Every op returns NULL at once when any
 * input is NULL, so a chain of ops can be checked once at its end.
 * Index tensors are I32. Float ops take F32, F64 (CPU reference) and BF16 (CUDA). */
#ifndef MOE_CORE_OPS_H
#define MOE_CORE_OPS_H

#include "core/tensor.h"

/* ---- shapes and views (views share storage; the backward routes grads back) ---- */
moe_tensor *moe_reshape(moe_tensor *x, int ndim, const int64_t *shape); /* -1 infers one dim */
moe_tensor *moe_transpose(moe_tensor *x, int d0, int d1);
moe_tensor *moe_permute(moe_tensor *x, const int *perm);
moe_tensor *moe_slice(moe_tensor *x, int axis, int64_t start, int64_t end);
moe_tensor *moe_contiguous(moe_tensor *x); /* x itself when already contiguous */
moe_tensor *moe_concat(moe_tensor *const *xs, int n, int axis);
/* n pieces along axis with the given sizes (views); writes them into out[]. */
moe_status moe_split(moe_tensor *x, int axis, int n, const int64_t *sizes, moe_tensor **out);
moe_tensor *moe_cast(moe_tensor *x, moe_dtype dt);

/* ---- linear algebra ---- */
/* [..., m, k] @ [..., k, n] -> [..., m, n]; b may be 2-D and is then shared by all batches.
 * Transposed operands (views) are used in place, without copies. */
moe_tensor *moe_matmul(moe_tensor *a, moe_tensor *b);
/* x [N, K] with rows grouped by expert, w [E, K, M], offsets[E+1] (host, offsets[0] = 0,
 * offsets[E] = N): y[offsets[e]:offsets[e+1]] = x[...] @ w[e]. One call for all experts. */
moe_tensor *moe_grouped_matmul(moe_tensor *x, moe_tensor *w, const int64_t *offsets);
/* The SwiGLU experts of a few tokens, each reading its experts' weights where they lie,
 * and their combine: x [T, d], ids [T, k] I32 (on the device, never read back), gates
 * [T, k] in x's dtype, w13 [E, d, 2f], w2 [E, f, d] contiguous -> [T, d], row t = sum over
 * j = 0 .. k-1 in order of gates[t, j] * (swiglu(x[t] @ w13[e]) @ w2[e]), e = ids[t, j]
 * (each product rounded to x's dtype, as the grouped path rounds; the sum accumulated as
 * moe_combine does, f32 for bf16, and rounded once). Inference only: inputs that need
 * grads are refused (training runs the grouped path). */
moe_tensor *moe_gathered_swiglu(moe_tensor *x, moe_tensor *ids, moe_tensor *gates, moe_tensor *w13, moe_tensor *w2);

/* ---- elementwise (binary ops broadcast numpy-style) ---- */
moe_tensor *moe_add(moe_tensor *a, moe_tensor *b);
moe_tensor *moe_sub(moe_tensor *a, moe_tensor *b);
moe_tensor *moe_mul(moe_tensor *a, moe_tensor *b);
moe_tensor *moe_div(moe_tensor *a, moe_tensor *b);
moe_tensor *moe_add_scalar(moe_tensor *x, double s);
moe_tensor *moe_mul_scalar(moe_tensor *x, double s);
moe_tensor *moe_pow_scalar(moe_tensor *x, double s);
moe_tensor *moe_neg(moe_tensor *x);
moe_tensor *moe_exp(moe_tensor *x);
moe_tensor *moe_log(moe_tensor *x);
moe_tensor *moe_sqrt(moe_tensor *x);
moe_tensor *moe_rsqrt(moe_tensor *x);
moe_tensor *moe_sigmoid(moe_tensor *x);
moe_tensor *moe_tanh(moe_tensor *x);
moe_tensor *moe_relu(moe_tensor *x);
moe_tensor *moe_silu(moe_tensor *x);
moe_tensor *moe_gelu(moe_tensor *x);     /* tanh approximation */
moe_tensor *moe_softplus(moe_tensor *x);
moe_tensor *moe_swiglu(moe_tensor *h); /* packed [..., 2f] -> silu(h[..., :f]) * h[..., f:] [..., f] */

/* ---- reductions ---- */
moe_tensor *moe_sum(moe_tensor *x, int axis, bool keepdim);
moe_tensor *moe_mean(moe_tensor *x, int axis, bool keepdim);
moe_tensor *moe_max(moe_tensor *x, int axis, bool keepdim);
moe_tensor *moe_sum_all(moe_tensor *x);  /* scalar (0-d) */
moe_tensor *moe_softmax(moe_tensor *x);      /* over the last axis */
moe_tensor *moe_log_softmax(moe_tensor *x);  /* over the last axis */
moe_tensor *moe_logsumexp(moe_tensor *x);    /* over the last axis, drops it */

/* ---- normalisation ---- */
moe_tensor *moe_rmsnorm(moe_tensor *x, moe_tensor *w, double eps);  /* w may be NULL */
moe_tensor *moe_layernorm(moe_tensor *x, moe_tensor *w, moe_tensor *b, double eps);
/* Inference (no grads): *sum = x + r (rounded to x's dtype) and rmsnorm(*sum) * w, in one
 * pass: the residual add and the norm that follows it in a pre-norm block. x, r [..., d] of
 * one shape, w [d]; equal to moe_add then moe_rmsnorm, bit for bit. */
moe_tensor *moe_add_rmsnorm(moe_tensor *x, moe_tensor *r, moe_tensor *w, double eps, moe_tensor **sum);
/* The same with r = a @ b, the output projection before the residual add: a [..., K] with
 * x's leading shape, b [K, d], r rounded to x's dtype as moe_matmul leaves it. The values of
 * moe_matmul then moe_add_rmsnorm; on CUDA a few rows take one kernel, whose last block adds
 * and normalises. */
moe_tensor *moe_matmul_add_rmsnorm(moe_tensor *x, moe_tensor *a, moe_tensor *b, moe_tensor *w, double eps,
                                   moe_tensor **sum);

/* ---- indexing ---- */
moe_tensor *moe_embedding(moe_tensor *table, moe_tensor *ids);     /* [V,d], ids[...] -> [..., d] */
moe_tensor *moe_index_select(moe_tensor *x, moe_tensor *idx);      /* rows: [N,...], [M] -> [M,...] */
/* The MoE dispatch: x [T, d] -> [N, d] with row i = x[tok[i]], where tok [N] and src
 * [T, k] describe the same assignment (src[t, j] = i exactly when tok[i] = t, -1 for a
 * dropped slot, every row named once); the backward sums each token's rows through src in
 * j order (deterministic, no atomics). */
moe_tensor *moe_dispatch(moe_tensor *x, moe_tensor *tok, moe_tensor *src);
/* The MoE combine, fused: y [N, d] rows, w [T, k] weights, src [T, k] i32 (the row of y
 * holding assignment (t, j), or -1 when it was dropped; every row of y is named exactly
 * once) -> [T, d] with row t = sum over j (in order) of w[t, j] * y[src[t, j]]. */
moe_tensor *moe_combine(moe_tensor *y, moe_tensor *w, moe_tensor *src);
moe_tensor *moe_index_add(moe_tensor *x, moe_tensor *idx, moe_tensor *src); /* x + rows of src added at idx */
/* In place, not recorded (like moe_tensor_copy_): dst[idx[i]] = src[i] for the rows of
 * dst [M, ...] (contiguous), idx [N] I32 on dst's device naming distinct rows in [0, M),
 * src [N, ...] of the same trailing shape and dtype (any strides). A host idx is checked
 * (range and duplicates: MOE_ERR_INVALID, dst untouched); a device idx is range-checked on
 * the device (the bad row skipped, the fault reported at the next synchronisation) and
 * its distinctness is the caller's to guarantee. */
moe_status moe_index_copy_(moe_tensor *dst, moe_tensor *idx, moe_tensor *src);
moe_tensor *moe_gather(moe_tensor *x, moe_tensor *idx);            /* last axis */
moe_tensor *moe_scatter_add(moe_tensor *x, moe_tensor *idx, moe_tensor *src); /* last axis */
/* Largest k along the last axis, sorted descending; indices (I32) into *indices. */
moe_tensor *moe_topk(moe_tensor *x, int k, moe_tensor **indices);

/* A router's selection of few tokens in one pass per token (inference only; logits that
 * need grads are refused): p = softmax(logits) or sigmoid(logits) per row, the k largest
 * of p + bias (descending, ties to the lower index; bias [E] or NULL), gates = p at them,
 * divided by their sum when renormalize, times scale when scale > 0. logits [T, E] f32
 * (f64 on the CPU; bf16 on CUDA, converted exactly and computed in f32) -> gates [T, k] of
 * logits' dtype (rounded once, at the end), *ids [T, k] I32. The bias is used in f32 (f64
 * for f64 logits) whatever its dtype. */
typedef struct moe_route_spec {
    int k;
    bool sigmoid, renormalize;
    double scale;
} moe_route_spec;
moe_tensor *moe_route_topk(moe_tensor *logits, moe_tensor *bias, const moe_route_spec *spec, moe_tensor **ids);
/* The gate projection and the selection in one (inference only): logits = x [T, d] @ w [d, E]
 * rounded to x's dtype as moe_matmul leaves them, then moe_route_topk on them. The same
 * gates and ids as those two ops; on CUDA a few tokens take one kernel, whose last block
 * selects. */
moe_tensor *moe_route_select(moe_tensor *x, moe_tensor *w, moe_tensor *bias, const moe_route_spec *spec,
                             moe_tensor **ids);

/* ---- integer ops for routing (not differentiable) ---- */
moe_tensor *moe_argsort(moe_tensor *x);                 /* stable ascending, last axis, I32 */
moe_tensor *moe_bincount(moe_tensor *x, int64_t nbins); /* 1-D I32 -> [nbins] I32 */
moe_tensor *moe_cumsum(moe_tensor *x, bool exclusive);  /* 1-D I32 */
/* A routing of T tokens to k experts each (ids [T, k] I32, each in [0, n_experts)) sorted by
 * expert, stably (an expert's assignments in token order), on the routing's device:
 * returns tok [T k] I32, the token of each assignment in that order; *src [T, k] I32, the
 * position in it of assignment (t, j); *offsets [n_experts + 1] I32, where each expert's run
 * begins (the last is T k). What moe_dispatch, moe_grouped_matmul and moe_combine take, with
 * only the offsets to read back. */
moe_tensor *moe_route_plan(moe_tensor *ids, int64_t n_experts, moe_tensor **src, moe_tensor **offsets);

/* ---- neural-network ops ---- */
moe_tensor *moe_dropout(moe_tensor *x, double p, uint64_t seed, uint64_t counter);
/* Rotary embedding on x [B, T, H, hd] (HF rotate-half form); positions pos0 + t. */
moe_tensor *moe_rope(moe_tensor *x, int64_t pos0, double theta);
/* The same rotation at given positions: pos [T] I32 on x's device, token t of every batch
 * row at position pos[t] (>= 0; the CPU kernel refuses a negative one). */
moe_tensor *moe_rope_at(moe_tensor *x, moe_tensor *pos, double theta);
/* How moe_rope_append normalises q and k before rotating them. */
typedef enum moe_qk_norm_mode {
    MOE_QK_NORM_NONE,     /* rotated as they are (moe_rope_at) */
    MOE_QK_NORM_PER_HEAD, /* RMSNorm of each head, weights [hd] */
    MOE_QK_NORM_ALL,      /* RMSNorm of each token's heads together, weights [n hd] */
} moe_qk_norm_mode;
typedef struct moe_rope_append_spec {
    moe_qk_norm_mode norm;
    moe_tensor *q_w, *k_w; /* the norms' weights (not read with MOE_QK_NORM_NONE) */
    double eps, theta;
    moe_tensor *pos;       /* I32 [T] on q's device: each token's position */
} moe_rope_append_spec;
/* Inference only, one kernel: an attention layer's new tokens made ready and stored.
 * q [1, T, H, hd], k, v [1, T, Hkv, hd] (unit last stride, heads at stride hd: slices of a
 * fused qkv projection are read in place). Returns q normalised as spec says and rotated
 * at spec->pos, [1, T, H, hd]; writes k so prepared, and v as it is, into row rows[t] (I32
 * [T] on q's device, distinct rows) of k_pool and v_pool [R, Hkv, hd] (contiguous). The
 * same values as rmsnorm then moe_rope_at (the CPU computes them with RMSNorm's and rope's
 * arithmetic) and moe_index_copy_. */
moe_tensor *moe_rope_append(moe_tensor *q, moe_tensor *k, moe_tensor *v, const moe_rope_append_spec *spec,
                            moe_tensor *k_pool, moe_tensor *v_pool, moe_tensor *rows);
/* Multi-head attention, q [B, Tq, H, hd], k/v [B, Tk, Hkv, hd] (H % Hkv == 0: grouped-query).
 * Causal: query i sits at absolute position Tk - Tq + i (so a decode step with a KV cache
 * sees every cached key). Never materialises the [Tq, Tk] score matrix in memory. */
moe_tensor *moe_attention(moe_tensor *q, moe_tensor *k, moe_tensor *v, bool causal);
/* Block-diagonal (variable-length) attention over packed sequences: q [1, Tq, H, hd],
 * k/v [1, Tk, Hkv, hd]; q_off, k_off host arrays of n_seg + 1 ascending offsets from 0 to
 * Tq and Tk. Segment s: queries [q_off[s], q_off[s+1]) see only keys [k_off[s], k_off[s+1]),
 * exactly as moe_attention on that segment alone (causal: query i of the segment sits at
 * key position klen - qlen + i, so qlen <= klen). A segment with no queries does nothing;
 * one with queries needs keys. Same kernels (and speed per segment) as moe_attention. */
moe_tensor *moe_attention_varlen(moe_tensor *q, moe_tensor *k, moe_tensor *v, const int64_t *q_off,
                                 const int64_t *k_off, int n_seg, bool causal);
/* moe_attention_varlen over keys and values kept in pools: k_pool, v_pool [R, Hkv, hd]
 * (contiguous), rows I32 [Tk] on their device: packed key j is pool row rows[j] (a paged
 * KV cache's block table, flattened). Equal to moe_attention_varlen(q, k_pool[rows],
 * v_pool[rows], ...) without gathering the keys: segments of at most
 * MOE_ATTENTION_PAGED_MAX_Q queries (decode steps) run a kernel that reads the pools through
 * rows and splits long key runs over blocks; longer ones gather and take the varlen
 * kernels. Inference only (refuses inputs that need grads). */
#define MOE_ATTENTION_PAGED_MAX_Q 16
moe_tensor *moe_attention_paged(moe_tensor *q, moe_tensor *k_pool, moe_tensor *v_pool, moe_tensor *rows,
                                const int64_t *q_off, const int64_t *k_off, int n_seg, bool causal);
/* moe_attention_paged with its segments already in a table on the device: seg I32
 * [2, n_seg + 1] (query offsets, then key offsets into rows, as moe_attention_paged's), read
 * only by the kernels, so that a recorded graph (core/graph.h) may replay it with new
 * contents. max_q: the longest segment's queries; max_k bounds every segment's keys (the
 * grid is sized by it; any bound >= the longest works where max_q <= MOE_ATTENTION_PAGED_MAX_Q,
 * else it must be the longest). The table's contents are trusted (the caller built them). */
moe_tensor *moe_attention_paged_table(moe_tensor *q, moe_tensor *k_pool, moe_tensor *v_pool, moe_tensor *rows,
                                      moe_tensor *seg, int64_t max_q, int64_t max_k, bool causal);
/* Mean over rows of -log softmax(h @ w^T)[target], computed block by block over the
 * vocabulary without materialising [T, V] logits. h [T, d], w [V, d], targets [T] I32;
 * target -1 is ignored (all ignored: loss 0); any other target outside [0, V) is
 * MOE_ERR_INVALID. Reads the targets on the host to count them. Scalar output. */
moe_tensor *moe_cross_entropy(moe_tensor *h, moe_tensor *w, moe_tensor *targets);
/* Vocabulary rows per block of moe_cross_entropy (process-wide; <= 0 restores the
 * default 2048). A tuning and testing knob: the result does not depend on it. */
void moe_cross_entropy_set_block(int64_t block);

/* ---- communication ---- */
/* The expert-parallel token exchange: rows of x [N, ...] (contiguous) go to the ranks of
 * `group` (a moe_dist_group), send_rows[r] to rank r in order; the result holds
 * recv_rows[r] rows from each rank r in rank order. The backward sends the grads back
 * the same way. Identity on a group of one. Device tensors are staged through the host. */
moe_tensor *moe_all_to_all(moe_tensor *x, const int64_t *send_rows, const int64_t *recv_rows, int group);

/* ---- linear-attention scans (MoM, gated delta net; moe/README.md §2) ---- */
/* Gated delta-rule scan over N independent sequences: q, k [N, T, H, dk], v [N, T, H, dv],
 * beta, alpha [N, T, H] (same float dtype), state0 [N, H, dk, dv] or NULL (zeros) in the
 * state dtype (F64 for F64 inputs, else F32). Per step (delta):
 *   S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
 * or (!delta, gated linear attention) S_t = alpha_t S_{t-1} + k_t v_t^T (beta unused);
 * returns o [N, T, H, dv] with o_t = q_t^T S_t. The final state goes to *state_out when
 * state_out is not NULL (a new STEP tensor; it carries no gradient: generation caches).
 * Differentiable in q, k, v, beta, alpha and state0. moe_delta_scan runs step by step;
 * moe_delta_scan_chunked the chunked (WY / UT-transform) form with chunk length `chunk`
 * (same result to rounding). Both backwards run the reverse-time recurrence with states
 * recomputed from per-chunk checkpoints (memory O(N H dk dv T / chunk)). */
moe_tensor *moe_delta_scan(moe_tensor *q, moe_tensor *k, moe_tensor *v, moe_tensor *beta, moe_tensor *alpha,
                           moe_tensor *state0, bool delta, moe_tensor **state_out);
moe_tensor *moe_delta_scan_chunked(moe_tensor *q, moe_tensor *k, moe_tensor *v, moe_tensor *beta,
                                   moe_tensor *alpha, moe_tensor *state0, bool delta, int64_t chunk,
                                   moe_tensor **state_out);

/* ---- recomputation (activation checkpointing) ---- */
/* A piece of the graph run without keeping its intermediates: out = fn(ctx, in) with the
 * tape off, copied out, and the step memory fn took handed back. The backward runs fn
 * again with the tape on (parameters in in[] as they are, other inputs as fresh leaves),
 * sweeps that tape from d out and frees its memory again, so the piece's activations live
 * only while its own backward runs. Trades one more forward of the piece for its memory.
 * Contract (misuse asserts where it can be seen): fn returns a tensor of in[0]'s shape,
 * dtype and device; is deterministic (the same inputs give the same result: dropout and
 * noise from fixed counters); changes no state outside its result and talks to no other
 * rank; every tensor whose grad depends on the result is one of in[] (at most
 * MOE_NODE_MAX_INPUTS; parameters as themselves, so the readiness hook sees them); ctx
 * stays valid until the backward has run. Without grad recording it is fn(ctx, in). */
typedef moe_tensor *(*moe_recompute_fn)(void *ctx, moe_tensor *const *in);
moe_tensor *moe_recompute(moe_recompute_fn fn, void *ctx, int n_in, moe_tensor *const *in);
/* out = fn(ctx, in) off the tape (no grad recording, or no input that needs a grad),
 * keeping only the result: it is copied to memory taken before fn ran and the step memory
 * fn took is handed back at once (inference: a layer's intermediates do not outlive the
 * layer). The same contract on fn as above; fn must leave nothing it allocated in use. */
moe_tensor *moe_keep_result(moe_recompute_fn fn, void *ctx, int n_in, moe_tensor *const *in);

#endif
