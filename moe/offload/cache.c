/* The device expert cache: slots in one arena shared by every MoE layer, victims by policy
 * with a floor per layer, copies through the device's copy queue (see offload.h). */
#include <string.h>

#include "core/fileio.h"
#include "moe/offload/offload_internal.h"

bool cache_policy_predicts(const moe_offload *o) {
    return (o->opt.predict || o->opt.lookahead) &&
           (o->opt.policy == MOE_OFFLOAD_PREDICT || o->opt.policy == MOE_OFFLOAD_AUTO);
}

/* Whether slot s holds an expert the current step's prediction wants in a layer still to run. */
static bool wanted_ahead(const moe_offload *o, const cache_slot *c) {
    return cache_policy_predicts(o) && o->predicted[c->layer * o->E + c->expert] == o->step &&
           o->moe_ord[c->layer] >= o->cur_ord;
}

/* Eviction order: a smaller key goes first. */
typedef struct victim_key {
    int ahead;       /* predicted for a layer still to run */
    uint64_t first;  /* the policy's measure: lfu uses, else last use */
    uint64_t second; /* last use */
} victim_key;

static victim_key slot_key(const moe_offload *o, const cache_slot *c) {
    victim_key k = {.ahead = wanted_ahead(o, c), .first = c->last_use, .second = c->last_use};
    if (o->opt.policy == MOE_OFFLOAD_LFU) k.first = o->freq[c->layer * o->E + c->expert];
    return k;
}

static bool key_less(victim_key a, victim_key b) {
    if (a.ahead != b.ahead) return a.ahead < b.ahead;
    if (a.first != b.first) return a.first < b.first;
    return a.second < b.second;
}

int cache_take_slot(moe_offload *o, int layer, bool prefetch) {
    int best = -1;
    victim_key bk = {0};
    for (int s = 0; s < o->n_slots; s++) {
        const cache_slot *c = &o->slots[s];
        if (c->layer < 0) return s;
        if (c->pin == o->epoch) continue;
        if (c->layer != layer && o->held[c->layer] <= o->floor) continue;
        victim_key k = slot_key(o, c);
        if (prefetch && k.ahead) continue;
        if (best < 0 || key_less(k, bk)) best = s, bk = k;
    }
    if (best >= 0) cache_evict(o, best);
    return best;
}

void cache_evict(moe_offload *o, int s) {
    cache_slot *c = &o->slots[s];
    if (c->layer < 0) return;
    double t0 = moe_clock_ms();
    moe_xfer_cancel(o->xfer, &c->j13);
    moe_xfer_cancel(o->xfer, &c->j2);
    o->counts[c->layer].wait_ms += moe_clock_ms() - t0;
    if (c->prefetched && !c->used) o->counts[c->layer].wasted++;
    o->where[c->layer * o->E + c->expert] = -1;
    o->held[c->layer]--;
    c->layer = c->expert = -1;
    c->j13.state = c->j2.state = MOE_XFER_IDLE;
}

/* Where slot s's w13 and w2 start in the arena: [n_slots, d, 2 W] then [n_slots, W, d]. */
static int64_t slot_at13(const moe_offload *o, int s) { return (int64_t)s * 2 * o->slot_w * o->d; }
static int64_t slot_at2(const moe_offload *o, int s) {
    return (int64_t)o->n_slots * 2 * o->slot_w * o->d + (int64_t)s * o->slot_w * o->d;
}

void cache_slot_views(moe_offload *o, int s, moe_tensor **w13, moe_tensor **w2) {
    const cache_slot *c = &o->slots[s];
    int64_t d = o->d, w = o->store[c->layer * o->E + c->expert].ffn_dim;
    *w13 = moe_tensor_view_raw(o->arena, 2, (int64_t[]){d, 2 * w}, (int64_t[]){2 * w, 1}, slot_at13(o, s));
    *w2 = moe_tensor_view_raw(o->arena, 2, (int64_t[]){w, d}, (int64_t[]){d, 1}, slot_at2(o, s));
}

void cache_stacks(moe_offload *o, moe_tensor **w13, moe_tensor **w2) {
    int64_t n = o->n_slots, d = o->d, w = o->slot_w;
    *w13 = moe_tensor_view_raw(o->arena, 3, (int64_t[]){n, d, 2 * w}, (int64_t[]){2 * w * d, 2 * w, 1}, 0);
    *w2 = moe_tensor_view_raw(o->arena, 3, (int64_t[]){n, w, d}, (int64_t[]){w * d, d, 1}, slot_at2(o, 0));
}

moe_status cache_load(moe_offload *o, int s, int layer, int e, bool urgent, bool prefetch) {
    cache_slot *c = &o->slots[s];
    MOE_ASSERT(c->layer < 0 && o->where[layer * o->E + e] < 0, "expert cache: slot %d is taken", s);
    const store_entry *se = &o->store[layer * o->E + e];
    size_t es = moe_dtype_size(o->arena->dtype);
    char *base = o->arena->data;
    c->layer = layer;
    c->expert = e;
    c->prefetched = prefetch;
    c->used = false;
    c->j13 = (moe_xfer_job){.dst = base + (size_t)slot_at13(o, s) * es, .src = se->w13, .bytes = (size_t)se->n13 * es,
                            .fence = c->j13.fence, .landed = c->j13.landed}; /* the job's events are reused */
    c->j2 = (moe_xfer_job){.dst = base + (size_t)slot_at2(o, s) * es, .src = se->w2, .bytes = (size_t)se->n2 * es,
                           .fence = c->j2.fence, .landed = c->j2.landed};
    o->where[layer * o->E + e] = s;
    o->held[layer]++;
    o->counts[layer].copies++;
    o->counts[layer].bytes += c->j13.bytes + c->j2.bytes;
    MOE_TRY(moe_xfer_submit(o->xfer, &c->j13, urgent));
    return moe_xfer_submit(o->xfer, &c->j2, urgent);
}

bool cache_slot_ready(moe_offload *o, int s) {
    return moe_xfer_done(o->xfer, &o->slots[s].j13) && moe_xfer_done(o->xfer, &o->slots[s].j2);
}

void cache_slot_expedite(moe_offload *o, int s) {
    moe_xfer_expedite(o->xfer, &o->slots[s].j13);
    moe_xfer_expedite(o->xfer, &o->slots[s].j2);
}

moe_status cache_slot_wait(moe_offload *o, int s) {
    double t0 = moe_clock_ms();
    moe_status st = moe_xfer_wait(o->xfer, &o->slots[s].j13);
    if (st == MOE_OK) st = moe_xfer_wait(o->xfer, &o->slots[s].j2);
    o->counts[o->slots[s].layer].wait_ms += moe_clock_ms() - t0;
    return st;
}
