/* Internal to core/: the op ids (autograd), the kernel ids (what backends implement),
 * the kernel argument block and the backend table. Nothing outside core/ includes this.
 *
 * Adding an op: add it to MOE_OP_LIST (name + whether it is differentiable), write its
 * front-end and backward in the core/ops_*.c file of its family, its kernels in
 * core/cpu/ and core/cuda/ (new kernel ids in MOE_KERNEL_LIST), and a test case in
 * tests/op_cases.c. tests/test_cpu_optable.c fails while any of these is missing. */
#ifndef MOE_CORE_KERNELS_H
#define MOE_CORE_KERNELS_H

#include "core/autograd.h"
#include "core/tensor.h"

/* X(ID, name, differentiable) */
#define MOE_OP_LIST(X)                       \
    X(RESHAPE, reshape, 1)                   \
    X(TRANSPOSE, transpose, 1)               \
    X(PERMUTE, permute, 1)                   \
    X(SLICE, slice, 1)                       \
    X(CONTIGUOUS, contiguous, 1)             \
    X(CONCAT, concat, 1)                     \
    X(CAST, cast, 1)                         \
    X(MATMUL, matmul, 1)                     \
    X(GROUPED_MATMUL, grouped_matmul, 1)     \
    X(GATHERED_SWIGLU, gathered_swiglu, 0)   \
    X(ADD, add, 1)                           \
    X(SUB, sub, 1)                           \
    X(MUL, mul, 1)                           \
    X(DIV, div, 1)                           \
    X(ADD_SCALAR, add_scalar, 1)             \
    X(MUL_SCALAR, mul_scalar, 1)             \
    X(POW_SCALAR, pow_scalar, 1)             \
    X(NEG, neg, 1)                           \
    X(EXP, exp, 1)                           \
    X(LOG, log, 1)                           \
    X(SQRT, sqrt, 1)                         \
    X(RSQRT, rsqrt, 1)                       \
    X(SIGMOID, sigmoid, 1)                   \
    X(TANH, tanh, 1)                         \
    X(RELU, relu, 1)                         \
    X(SILU, silu, 1)                         \
    X(GELU, gelu, 1)                         \
    X(SOFTPLUS, softplus, 1)                 \
    X(SWIGLU, swiglu, 1)                     \
    X(SUM, sum, 1)                           \
    X(MEAN, mean, 1)                         \
    X(MAX, max, 1)                           \
    X(SOFTMAX, softmax, 1)                   \
    X(LOG_SOFTMAX, log_softmax, 1)           \
    X(LOGSUMEXP, logsumexp, 1)               \
    X(RMSNORM, rmsnorm, 1)                   \
    X(LAYERNORM, layernorm, 1)               \
    X(EMBEDDING, embedding, 1)               \
    X(INDEX_SELECT, index_select, 1)         \
    X(INDEX_ADD, index_add, 1)               \
    X(GATHER, gather, 1)                     \
    X(DISPATCH, dispatch, 1)                 \
    X(COMBINE, combine, 1)               \
    X(SCATTER_ADD, scatter_add, 1)           \
    X(TOPK, topk, 1)                         \
    X(ROUTE_TOPK, route_topk, 0)             \
    X(ROUTE_SELECT, route_select, 0)         \
    X(ARGSORT, argsort, 0)                   \
    X(BINCOUNT, bincount, 0)                 \
    X(CUMSUM, cumsum, 0)                     \
    X(ROUTE_PLAN, route_plan, 0)             \
    X(DROPOUT, dropout, 1)                   \
    X(ROPE, rope, 1)                         \
    X(ROPE_APPEND, rope_append, 0)           \
    X(ADD_RMSNORM, add_rmsnorm, 0)           \
    X(MATMUL_ADD_RMSNORM, matmul_add_rmsnorm, 0) \
    X(ATTENTION, attention, 1)               \
    X(ATTENTION_PAGED, attention_paged, 0)   \
    X(CROSS_ENTROPY, cross_entropy, 1)       \
    X(ALL_TO_ALL, all_to_all, 1)             \
    X(DELTA_SCAN, delta_scan, 1)             \
    X(RECOMPUTE, recompute, 1)

typedef enum moe_op_id {
#define MOE_X_ENUM(ID, name, diff) MOE_OP_##ID,
    MOE_OP_LIST(MOE_X_ENUM)
#undef MOE_X_ENUM
    MOE_OP_COUNT
} moe_op_id;

typedef struct moe_op_info {
    const char *name;
    bool differentiable;
    void (*backward)(moe_node *n); /* NULL only for non-differentiable ops */
} moe_op_info;

extern const moe_op_info moe_op_table[MOE_OP_COUNT];

/* Kernels: the units a backend implements. Several ops share one (all unary ops share
 * UNARY with an opcode); backward passes that need their own kernel have one here. */
#define MOE_KERNEL_LIST(X) \
    X(COPY, copy)                /* strided copy with dtype cast: out <- in[0] */            \
    X(FILL, fill)                /* out <- attrs.value */                                    \
    X(BINARY, binary)              /* out <- in[0] (op) in[1], broadcast via strides */       \
    X(SCALAR, scalar)              /* out <- in[0] (op) scalar */                              \
    X(UNARY, unary)               /* out <- f(in[0]) */                                       \
    X(UNARY_BWD, unary_bwd)           /* out <- g * f'(x): in[0]=g, in[1]=x, in[2]=y */           \
    X(SWIGLU, swiglu)              /* out [.., f] <- silu(in[0][.., :f]) * in[0][.., f:] */   \
    X(SWIGLU_BWD, swiglu_bwd)          /* out = gh [.., 2f] from in[0] = g [.., f], in[1] = h */   \
    X(REDUCE, reduce)              /* sum/max over one axis; out2 = argmax (I32) for max */    \
    /* Softmax family and norms: every in/out is contiguous [rows, d] (d = last axis); the */ \
    /* stats / param-grad dtype "S" is F64 for F64 x, else F32; w, b are [d] or NULL.     */ \
    X(SOFTMAX, softmax)             /* attrs.log: log-softmax; an all -inf row gives 0 (log: -inf) */ \
    X(SOFTMAX_BWD, softmax_bwd)         /* out=gx from in[0]=g, in[1]=y: y*(g-sum(g*y)); log: g-exp(y)*sum(g) */ \
    X(LOGSUMEXP, logsumexp)           /* out [rows] <- logsumexp of in[0] rows; all -inf row gives -inf */ \
    X(RMSNORM, rmsnorm)             /* in: x, w; out = y, out2 = rstd [rows] S; attrs moe_norm_attrs */ \
    X(ADD_RMSNORM, add_rmsnorm)         /* in: x, r [rows, d] contiguous, w; out = rmsnorm(s) w, out2 = s = x + r (x's dtype); attrs moe_norm_attrs */ \
    X(MATMUL_ADD_RMSNORM, matmul_add_rmsnorm) /* in: x [rows, d], a [rows, K], b [K, d], w; as ADD_RMSNORM with r = a @ b rounded to x's dtype */ \
    X(RMSNORM_BWD, rmsnorm_bwd)         /* in: g, x, w, rstd; out=gx; out2 (NULL: skip) = gw [d] S, += sum over rows */ \
    X(LAYERNORM, layernorm)           /* in: x, w, b; out = y, out2 = [rows, 2] S mean and rstd */ \
    X(LAYERNORM_BWD, layernorm_bwd)       /* in: g, x, w, stats; out=gx; out2 (NULL: skip) = [2, d] S gw;gb, += */ \
    X(MATMUL, matmul)              /* out <- alpha * a @ b + beta * out, batched, strided */   \
    X(GROUPED_MATMUL, grouped_matmul)      /* per-expert row groups, attrs: offsets, transposes */     \
    X(GATHERED_SWIGLU, gathered_swiglu)    /* out [T, d] <- sum_j gates[t, j] * swiglu(x[t] @ w13[e]) @ w2[e], e = ids[t, j]; in: x ids gates w13 w2; out2: swiglu [T k, f] */ \
    X(INDEX_SELECT, index_select)        /* out row i <- in[0] row in[1][i] (rows of [N, ...]) */     \
    X(INDEX_ADD, index_add)           /* out[in[1][i]] += in[0][i] (rows, in place on out) */     \
    X(INDEX_COPY, index_copy)          /* out[in[1][i]] = in[0][i] (rows, in place, distinct; in[0] contiguous or rows at one stride) */ \
    X(GATHER, gather)              /* out[r, j] <- in[0][r, in[1][r, j]], last axis */         \
    X(COMBINE, combine)           /* out [T, d] <- sum_j in[1][t, j] * in[0][in[2][t, j]] (-1: none; in[1] NULL: 1) */ \
    X(COMBINE_BWD, combine_bwd)       /* in: g, y, w, src; out = gy (src a bijection onto y's rows), out2 = gw */ \
    X(SCATTER_ADD, scatter_add)         /* out[r, in[1][r, j]] += in[0][r, j], in place on out */   \
    X(TOPK, topk)                /* out = values, out2 = indices */                          \
    X(ROUTE_TOPK, route_topk)          /* out = gates [T, k], out2 = ids [T, k] I32; in: logits [T, E], bias [E] or NULL; attrs moe_route_spec */ \
    X(ROUTE_SELECT, route_select)        /* out = gates [T, k], out2 = ids [T, k] I32; in: x [T, d], w [d, E] (x's dtype), bias [E] or NULL; route_topk of x @ w */ \
    X(ARGSORT, argsort)             /* out I32 <- stable ascending positions, last axis */      \
    X(BINCOUNT, bincount)            /* out [nbins] I32 <- counts of in[0]; attrs moe_int_attrs */ \
    X(CUMSUM, cumsum)              /* out I32 <- (exclusive) prefix sums of in[0] */           \
    X(ROUTE_PLAN, route_plan)          /* in: ids [T, k] I32; out = [tok (T k) | offsets (E + 1)] I32, out2 = src [T, k] I32; attrs moe_int_attrs.nbins = E (moe_route_plan) */ \
    X(DROPOUT, dropout)             /* out <- x * mask / (1-p), keep i iff philox_uniform(counter + i, seed) >= p */ \
    X(ROPE, rope)                /* in[1] = positions [T] I32 or NULL (pos0 + t); attrs: pos0, theta, inverse */ \
    X(ROPE_APPEND, rope_append)         /* in: q k v [1, T, n, hd] (unit last stride, heads at stride hd), q_w k_w (NULL: no norm), pos, rows [T]; out q's result; attrs moe_rope_append_attrs (the pools) */ \
    X(ATTENTION, attention)           /* out, out2 = logsumexp [B, H, Tq] F32 (F64 for F64); attrs.seg */ \
    X(ATTENTION_BWD, attention_bwd)       /* in: q k v o g lse; out=dq; attrs hold dk, dv, seg; all written fully */ \
    X(ATTENTION_PAGED, attention_paged)     /* in: q [1, Tq, H, hd], k, v pools [R, Hkv, hd], rows [Tk] I32; out = o; attrs.seg (no lse) */ \
    X(CROSS_ENTROPY, cross_entropy)       /* in: h w targets; out = per-row loss [T], out2 = lse [T], F32 (F64 for F64) */ \
    X(CROSS_ENTROPY_BWD, cross_entropy_bwd)   /* in: h w targets lse g(0-d); out = dh, out2 = dw, written fully, either NULL */ \
    X(ADAMW, adamw)               /* in place: out=param, out2=m, in[0]=grad, in[1]=v */      \
    X(SGD, sgd)                 /* in place: out=param, out2=momentum buf or NULL, in[0]=grad */ \
    X(REDUCE_SQ, reduce_sq)           /* out[0] += sum(x^2) in F32 (grad-norm), no alloc */       \
    X(NONFINITE, nonfinite)           /* out[0] I32 <- 1 if any element of in[0] is NaN/Inf, else kept */ \
    X(DELTA_SCAN, delta_scan)           /* gated delta / linear-attention scan; see moe_scan_attrs */ \
    X(DELTA_SCAN_BWD, delta_scan_bwd)       /* its backward; see moe_scan_attrs */

typedef enum moe_kernel_id {
#define MOE_X_KENUM(ID, name) MOE_K_##ID,
    MOE_KERNEL_LIST(MOE_X_KENUM)
#undef MOE_X_KENUM
    MOE_KERNEL_COUNT
} moe_kernel_id;

extern const char *const moe_kernel_names[MOE_KERNEL_COUNT];

typedef struct moe_kernel_args {
    moe_tensor *out;
    moe_tensor *out2;
    const moe_tensor *in[MOE_NODE_MAX_INPUTS];
    const void *attrs;
} moe_kernel_args;

typedef moe_status (*moe_kernel_fn)(const moe_kernel_args *a);

/* A backend: memory, transfers and one function per kernel (NULL = not supported). */
typedef struct moe_backend {
    const char *name;
    moe_device device;
    void *(*alloc)(size_t bytes);  /* NULL + moe_error on failure */
    void (*free)(void *p);
    moe_status (*memcpy_to)(void *dst, const void *src, size_t bytes, moe_device src_dev);
    moe_status (*memcpy_from)(void *dst_host, const void *src, size_t bytes);
    moe_status (*memset)(void *p, int byte, size_t bytes);
    moe_status (*sync)(void);
    /* Device-side timing (MOE_PROFILE=3, 4), NULL where kernels run on the calling thread:
     * mark records an event in stream order and returns its index (-1: none), mark_ms the
     * time between two marks once both have completed (after sync), marks_reset reuses
     * the indices from 0. */
    int (*mark)(void);
    double (*mark_ms)(int from, int to);
    void (*marks_reset)(void);
    /* Recording (core/graph.h), NULL where kernels run on the calling thread: capture_begin
     * records the device's queue instead of running it; capture_end stops, and with keep
     * instantiates the recording into *exec (else drops it); graph_launch queues *exec's
     * work; graph_free releases it. */
    moe_status (*capture_begin)(void);
    moe_status (*capture_end)(bool keep, void **exec);
    moe_status (*graph_launch)(void *exec);
    void (*graph_free)(void *exec);
    moe_kernel_fn kernels[MOE_KERNEL_COUNT];
} moe_backend;

/* The backend of a device: NULL when it was not built or has no device. */
const moe_backend *moe_backend_get(moe_device dev);
/* MOE_PROFILE's level (0: off), read once from the environment. */
int moe_profile_level(void);
/* Runs kernel `k` on the device of a.out (or a.in[0]); error when the backend lacks it. */
moe_status moe_kernel_run(moe_kernel_id k, const moe_kernel_args *a);

/* ---- kernel attribute blocks shared by front-ends and backends ---- */
typedef enum moe_binary_op { MOE_BIN_ADD, MOE_BIN_SUB, MOE_BIN_MUL, MOE_BIN_DIV } moe_binary_op;
typedef enum moe_unary_op {
    MOE_UN_NEG, MOE_UN_EXP, MOE_UN_LOG, MOE_UN_SQRT, MOE_UN_RSQRT, MOE_UN_SIGMOID,
    MOE_UN_TANH, MOE_UN_RELU, MOE_UN_SILU, MOE_UN_GELU, MOE_UN_SOFTPLUS
} moe_unary_op;
typedef enum moe_scalar_op { MOE_SC_ADD, MOE_SC_MUL, MOE_SC_POW } moe_scalar_op;

typedef struct { int op; double value; } moe_op_attrs_scalar;  /* op: binary/unary/scalar opcode */
typedef struct { int op; int axis; } moe_reduce_attrs;           /* op 0 = sum, 1 = max */
typedef struct { bool log; } moe_softmax_attrs;
typedef struct { double eps; } moe_norm_attrs;
typedef struct {
    float alpha, beta;
} moe_matmul_attrs;
typedef struct {
    const int64_t *offsets; /* host, E+1 row offsets into the grouped operand */
    int n_groups;
    /* mode 0: y[g] = x[g] @ w[e]        (x [N,K], w [E,K,M], y [N,M])
     * mode 1: y[g] = x[g] @ w[e]^T      (x [N,M], w [E,K,M], y [N,K])   dX
     * mode 2: w[e] += x[g]^T @ y[g]     (x [N,K], y=in[1] [N,M], out [E,K,M]) dW */
    int mode;
} moe_grouped_attrs;
typedef struct { int k; } moe_topk_attrs;
typedef struct { int64_t nbins; bool exclusive; } moe_int_attrs;
typedef struct { double p; uint64_t seed, counter; } moe_dropout_attrs;
typedef struct { int64_t pos0; double theta; bool inverse; } moe_rope_attrs;
typedef struct {
    double eps, theta;
    int norm;                  /* moe_qk_norm_mode */
    moe_tensor *k_pool, *v_pool; /* [R, Hkv, hd] contiguous, written at rows in[6] */
} moe_rope_append_attrs;
/* Attention segments: with seg NULL, segment s is batch s (B segments of Tq queries and Tk
 * keys); with seg = an I32 [2, n_seg + 1] table on the op's device (query offsets, then key
 * offsets, ascending from 0 to Tq and Tk), segment s is queries [q_off[s], q_off[s + 1]) and
 * keys [k_off[s], k_off[s + 1]) of batch 0. max_q, max_k: the longest segment (grid sizes). */
typedef struct {
    bool causal;
    float scale;
    int64_t n_seg, max_q, max_k;
    const moe_tensor *seg; /* the segment table or NULL (uniform batches) */
    moe_tensor *dk, *dv;
} moe_attention_attrs;

#ifdef __CUDACC__
#define MOE_HOST_DEVICE __host__ __device__
#else
#define MOE_HOST_DEVICE
#endif
/* One attention segment: batch b, queries [q0, q0 + nq), keys [k0, k0 + nk). */
typedef struct { int64_t b, q0, nq, k0, nk; } moe_att_seg;
/* Segment s of a call with Tq queries and Tk keys per batch; seg = the table's data or NULL. */
static inline MOE_HOST_DEVICE moe_att_seg moe_att_seg_at(const int32_t *seg, int64_t n_seg, int64_t s, int64_t Tq,
                                                         int64_t Tk) {
    moe_att_seg r = {s, 0, Tq, 0, Tk};
    if (seg) {
        const int32_t *ko = seg + n_seg + 1;
        r.b = 0;
        r.q0 = seg[s];
        r.nq = seg[s + 1] - seg[s];
        r.k0 = ko[s];
        r.nk = ko[s + 1] - ko[s];
    }
    return r;
}
typedef struct { int64_t block; float inv_count; } moe_ce_attrs;
/* Optimizer kernels (core/fused.c launches them; all tensors contiguous, same shape and
 * dtype, F32 master weights; arithmetic in the param dtype), per element i:
 * ADAMW: g = grad*grad_scale; m = beta1*m + (1-beta1)*g; v = beta2*v + (1-beta2)*g*g;
 *        p = p*(1 - lr*weight_decay) - lr*(m/bias1)/(sqrt(v/bias2)+eps)  (decoupled decay).
 * SGD:   g = grad*grad_scale + weight_decay*p (L2); with a buf: buf = momentum*buf + g, g = buf;
 *        p -= lr*g.
 * REDUCE_SQ accumulates in double (CPU) / float partials (CUDA) and adds once to out[0].
 * NONFINITE only ever writes 1, so one zeroed flag can collect several tensors. */
typedef struct {
    float lr, beta1, beta2, eps, weight_decay, grad_scale;
    float bias1, bias2; /* 1 - beta1^t and 1 - beta2^t for step t >= 1, computed on the host */
} moe_adamw_attrs;
typedef struct { float lr, momentum, weight_decay, grad_scale; } moe_sgd_attrs;
/* DELTA_SCAN / DELTA_SCAN_BWD (core/ops_scan.c, moe/README.md §2). Every tensor is contiguous:
 * q, k [N, T, H, dk], v [N, T, H, dv], beta, alpha [N, T, H]; states [N, H, dk, dv] of the
 * state dtype S (F64 for F64 inputs, else F32). Per (n, h), step t (delta rule):
 *   S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T q_t
 * or, !delta (gated linear attention): S_t = alpha_t S_{t-1} + k_t v_t^T (beta unused).
 * DELTA_SCAN: in = {q, k, v, beta, alpha, state0 or NULL (zeros)}; out = o [N, T, H, dv];
 *   out2 = the final state or NULL; ckpt (NULL: skip) = [N, H, ceil(T / chunk), dk, dv] S,
 *   the state before steps 0, chunk, 2 chunk, ...; chunked: the chunked (WY) form (on CUDA
 *   for chunks of 2..128 steps), else step by step. Same result either way.
 * DELTA_SCAN_BWD: in = {q, k, v, beta, alpha, g = dL/do}, ckpt from DELTA_SCAN with the same
 *   chunk; out = dq; dk, dv, dbeta, dalpha written fully (dbeta = 0 when !delta), dstate0
 *   (NULL: skip) = dL/d state0. Reverse-time recurrence, states recomputed chunk by chunk
 *   (CUDA with `chunked` and 2..128 steps: the chunked form's own backward). */
typedef struct {
    bool delta, chunked;
    int64_t chunk;
    moe_tensor *ckpt;
    moe_tensor *dk, *dv, *dbeta, *dalpha, *dstate0;
} moe_scan_attrs;

/* Shape-check helper for front-ends: on failure records "op: what (shapes)" and is false.
 * A macro, so that the message's arguments (shape descriptions, formatted by snprintf) are
 * evaluated only when the check fails, not on every op call. */
#define moe_check(cond, op, ...) ((cond) || moe_check_failed((op), __VA_ARGS__))
/* Records "op: message" (MOE_ERR_INVALID) and returns false. */
bool moe_check_failed(const char *op, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
