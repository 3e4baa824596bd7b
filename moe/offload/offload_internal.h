/* The expert offload state shared by the cache (cache.c: slots, victims, loads) and the
 * provider (offload.c: budget, prefetch, the expert groups of a step). Not installed. */
#ifndef MOE_OFFLOAD_OFFLOAD_INTERNAL_H
#define MOE_OFFLOAD_OFFLOAD_INTERNAL_H

#include "core/xfer.h"
#include "moe/offload/offload.h"

/* One routed expert in the host store: pointers into the decoder view's stacks. */
typedef struct store_entry {
    moe_tensor *stack13, *stack2; /* host tensors holding its w13 and w2 (compute dtype): the
                                   * group's stacks [n, d, 2 w], [n, w, d] */
    int64_t at13, at2;            /* the expert's first element in each */
    const void *w13, *w2;         /* its w13 [d, 2 w] and w2 [w, d] */
    int64_t n13, n2;              /* their elements */
    int ffn_dim;
} store_entry;

/* A device slot of the expert cache: w13 then w2 of one expert. */
typedef struct cache_slot {
    int layer, expert;          /* block index and expert, -1: empty */
    moe_xfer_job j13, j2;
    bool prefetched, used;      /* loaded ahead of demand; used since it was loaded */
    uint64_t last_use;          /* o->clock at its last use */
    uint64_t pin;               /* == o->epoch: needed by the expert group in progress */
} cache_slot;

/* The newest tokens of a sequence (at most opt.predict_context), which the predictor sees
 * before a run of new ones. */
typedef struct seq_context {
    int32_t *tok;     /* [opt.predict_context], oldest first (in ctx_store) */
    int n;
    int32_t next_pos; /* the position that continues them */
} seq_context;

struct moe_offload {
    moe_offload_options opt;
    moe_offload_split split;
    moe_model *m;
    moe_decoder *dec;
    const moe_model *v;         /* the decoder's view: the store's stacks */
    moe_expert_provider provider;
    int n_layers, E, top_k, n_moe;
    int *moe_ord;               /* [n_layers] ordinal among the MoE layers, -1 for dense */
    int *moe_block;             /* [n_moe] block index of each MoE layer */
    store_entry *store;         /* [n_layers * E] (dense layers' entries unused) */
    moe_xfer *xfer;
    moe_tensor *arena;          /* on the device, compute dtype: w13 [n_slots, d, 2 W], then w2 [n_slots, W, d] */
    int64_t slot_elems, d, slot_w; /* 3 d W; d_model; W the widest expert */
    cache_slot *slots;
    int n_slots, floor;         /* floor: slots a layer keeps against other layers' demand */
    int *where;                 /* [n_layers * E] slot of each expert or -1 */
    int *held;                  /* [n_layers] slots each layer holds */
    uint64_t *freq;             /* [n_layers * E] uses (lfu) */
    uint64_t *predicted;        /* [n_layers * E] the step whose prediction named it, 0: none */
    uint64_t clock, epoch, step;
    int cur_ord, prefetched_to; /* MoE layer running now; last ordinal prefetched this step */
    float *scores;              /* [n_moe, max_batch_tokens, E] the predictor's output for a batch's tokens */
    int32_t *ctx_tok, *ctx_pos, *ctx_seq; /* [list_cap] the batch's runs, each after its sequence's context */
    int32_t *ctx_rows;          /* [max_batch_tokens] where the batch's tokens are in that list */
    int list_cap;               /* max_batch_tokens + predict_context x min(max_seqs, max_batch_tokens) */
    seq_context *context;       /* [max_seqs] */
    int32_t *ctx_store;         /* [max_seqs, predict_context] their tokens */
    moe_offload_counts *counts; /* [n_layers] */
    double host_row_ms;         /* measured: one expert's SwiGLU on the host, per row */
    double rate0;               /* bytes/s of the copy measured at open */
    size_t device_bytes;        /* device PERSIST bytes the open took (view and cache arena) */
    double layer_ms, last_t;    /* running mean of a MoE layer's time; when the last one began */
    double predict_ms;          /* the predictor's runs since the counts were reset (host clock) */
    int depth;                  /* layers prefetched ahead */
    int wave;                   /* experts gathered and run at once */
};

/* cache.c */
bool cache_policy_predicts(const moe_offload *o);
/* A slot for an expert of block `layer`: an empty one, else the policy's victim (evicted
 * here); -1 when every candidate is pinned, held at a layer's floor or (prefetch)
 * predicted for a layer still to run. */
int cache_take_slot(moe_offload *o, int layer, bool prefetch);
/* Starts copying expert e of block `layer` into slot s (urgent: ahead of prefetches). */
moe_status cache_load(moe_offload *o, int s, int layer, int e, bool urgent, bool prefetch);
bool cache_slot_ready(moe_offload *o, int s);
void cache_slot_expedite(moe_offload *o, int s);
moe_status cache_slot_wait(moe_offload *o, int s);
/* Empties slot s (cancelling its copies; an unused prefetch counts as wasted). */
void cache_evict(moe_offload *o, int s);
/* The arena as stacks of every slot, w13 [n_slots, d, 2 W] and w2 [n_slots, W, d] (W: the
 * widest expert; a group of that width runs on them in place, its rows in slot order). */
void cache_stacks(moe_offload *o, moe_tensor **w13, moe_tensor **w2);
/* Slot s's w13 [d, 2 w] and w2 [w, d] as views of the arena. */
void cache_slot_views(moe_offload *o, int s, moe_tensor **w13, moe_tensor **w2);

#endif
