/* Saving and loading training state (layout in checkpoint.h). */
#include "moe/checkpoint.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dist.h"
#include "core/h5file.h"
#include "core/memory.h"

/* Calls fn for each stored tensor of a parameter: the whole tensor, or one 2-D slice per
 * expert of a stack with its global expert name (moe_param_ref). */
typedef moe_status (*piece_fn)(const char *name, moe_tensor *piece, void *ctx);

/* All experts of a stack on every rank of the EP group: each rank fills its slice of a
 * zeroed [E, rows, cols] host tensor and the group sums them (checkpoint time only).
 * Only contiguous stacks of equal widths are expert-parallel (moe_model_init). */
static moe_tensor *gather_stack(const moe_param_ref *p, moe_tensor *t, int64_t n_experts) {
    MOE_ASSERT(!p->expert_ids, "checkpoint: %s: an expert-parallel stack must hold contiguous experts", p->name);
    int64_t rows = t->shape[1], cols = t->shape[2];
    moe_tensor *full = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 3, (int64_t[]){n_experts, rows, cols});
    moe_tensor *mine = full ? moe_tensor_view_raw(full, 3, t->shape, full->strides, p->expert_begin * rows * cols) : NULL;
    if (!mine || moe_tensor_copy_(mine, t) != MOE_OK || moe_dist_allreduce_sum(MOE_GROUP_EP, full) != MOE_OK) return NULL;
    return full;
}

/* Saving gathers expert stacks to all experts (gather = true); loading reads the local ones. */
static moe_status for_each_piece(const moe_param_ref *p, moe_tensor *t, int64_t n_experts, bool gather, piece_fn fn,
                                 void *ctx) {
    if (!p->expert_stack) return fn(p->name, t, ctx);
    const char *base = p->expert_name ? p->expert_name : p->name, *dot = strrchr(base, '.');
    MOE_ASSERT(dot, "checkpoint: expert stack name '%s' has no '.'", base);
    int64_t rows = t->shape[1], cols = t->shape[2], begin = p->expert_begin;
    const int *ids = p->expert_ids;
    if (gather && moe_dist_ep_size() > 1) {
        t = gather_stack(p, t, n_experts);
        if (!t) return moe_last_status();
        begin = 0;
    }
    for (int64_t j = 0; j < t->shape[0]; j++) {
        char name[192];
        snprintf(name, sizeof name, "%.*s.%lld%s", (int)(dot - base), base, (long long)(ids ? ids[j] : begin + j), dot);
        moe_tensor *v = moe_tensor_view_raw(t, 2, (int64_t[]){rows, cols}, (int64_t[]){cols, 1}, j * rows * cols);
        if (!v) return moe_last_status();
        MOE_TRY(fn(name, v, ctx));
    }
    return MOE_OK;
}

typedef struct { moe_h5 *f; const char *group; } put_ctx;

static moe_status put_piece(const char *name, moe_tensor *piece, void *ctx) {
    put_ctx *c = ctx;
    if (!c->f) return MOE_OK; /* not the writing rank: it only took part in the gathers */
    moe_tensor *h = moe_tensor_to(piece, MOE_CPU, MOE_LIFE_STEP);
    moe_tensor *h32 = h ? moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_F32, h->ndim, h->shape) : NULL;
    if (!h32 || moe_tensor_copy_(h32, h) != MOE_OK) return moe_last_status();
    char full[256];
    snprintf(full, sizeof full, "%s/%s", c->group, name);
    return moe_h5_put_array(c->f, full, MOE_H5_F32, h32->ndim, h32->shape, h32->data);
}

/* f is NULL on the ranks that do not write (they still join the expert gathers). */
static moe_status save_all(moe_h5 *f, const moe_model *m, const moe_optimizer *opt, const moe_train_state *ts) {
    int64_t E = m->cfg.model.n_experts;
    if (f) {
        char *cfg_text = NULL;
        MOE_TRY(moe_config_to_yaml(&m->cfg, &cfg_text));
        moe_status s = moe_h5_put_string(f, "config", cfg_text);
        free(cfg_text);
        MOE_TRY(s);
        MOE_TRY(moe_h5_put_string(f, "version", MOE_VERSION));
        MOE_TRY(moe_h5_put_i64(f, "step", ts->step));
        MOE_TRY(moe_h5_put_i64(f, "loader_seed", (int64_t)ts->loader_seed));
        MOE_TRY(moe_h5_put_i64(f, "loader_step", (int64_t)ts->loader_step));
        MOE_TRY(moe_h5_put_i64(f, "bad_steps", ts->bad_steps));
        if (opt) MOE_TRY(moe_h5_put_i64(f, "optim_step", moe_optimizer_get_step(opt)));
    }
    put_ctx pc = {f, "params"};
    for (int i = 0; i < m->n_params; i++) MOE_TRY(for_each_piece(&m->params[i], m->params[i].t, E, true, put_piece, &pc));
    if (opt) {
        for (int i = 0; i < m->n_params; i++) {
            moe_tensor *mm = NULL, *vv = NULL;
            moe_optimizer_state(opt, i, &mm, &vv);
            put_ctx cm = {f, "optim/m"}, cv = {f, "optim/v"};
            if (mm) MOE_TRY(for_each_piece(&m->params[i], mm, E, true, put_piece, &cm));
            if (vv) MOE_TRY(for_each_piece(&m->params[i], vv, E, true, put_piece, &cv));
        }
    }
    for (int i = 0; i < m->cfg.model.n_layers; i++) {
        const moe_block *b = &m->blocks[i];
        if (b->dense || !b->moe.router.bias) continue;
        char name[96];
        snprintf(name, sizeof name, "layers.%d.moe", i);
        put_ctx rb = {f, "router_bias"};
        MOE_TRY(put_piece(name, b->moe.router.bias, &rb));
    }
    return MOE_OK;
}

moe_status moe_checkpoint_save(const char *path, const moe_model *m, const moe_optimizer *opt,
                               const moe_train_state *ts) {
    moe_h5 *f = NULL;
    bool writer = moe_dist_world_rank() == 0;
    moe_status cs = writer ? moe_h5_create(path, &f) : MOE_OK;
    moe_status s = save_all(cs == MOE_OK ? f : NULL, m, opt, ts); /* every rank joins the gathers */
    if (!writer) return s;
    if (cs != MOE_OK) return moe_error_context(cs, "saving checkpoint %s", path);
    if (s != MOE_OK) {
        if (f) moe_h5_abort(f);
        return moe_error_context(s, "saving checkpoint %s", path);
    }
    s = moe_h5_commit(f);
    return s == MOE_OK ? MOE_OK : moe_error_context(s, "saving checkpoint %s", path);
}

typedef struct { moe_h5 *f; const char *group; } get_ctx;

static moe_status get_piece(const char *name, moe_tensor *piece, void *ctx) {
    get_ctx *c = ctx;
    char full[256];
    snprintf(full, sizeof full, "%s/%s", c->group, name);
    if (!moe_h5_has(c->f, full))
        return moe_error(MOE_ERR_FORMAT, "dataset '%s' is missing (was the checkpoint written with another model config?)", full);
    moe_tensor *h = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_F32, piece->ndim, piece->shape);
    if (!h) return moe_last_status();
    MOE_TRY(moe_h5_get_array(c->f, full, MOE_H5_F32, piece->ndim, piece->shape, h->data));
    return moe_tensor_copy_(piece, h);
}

static moe_status load_all(moe_h5 *f, moe_model *m, moe_optimizer *opt, moe_train_state *ts) {
    int64_t v;
    memset(ts, 0, sizeof *ts);
    MOE_TRY(moe_h5_get_i64(f, "step", &ts->step));
    MOE_TRY(moe_h5_get_i64(f, "loader_seed", &v));
    ts->loader_seed = (uint64_t)v;
    MOE_TRY(moe_h5_get_i64(f, "loader_step", &v));
    ts->loader_step = (uint64_t)v;
    MOE_TRY(moe_h5_get_i64(f, "bad_steps", &ts->bad_steps));
    get_ctx gc = {f, "params"};
    for (int i = 0; i < m->n_params; i++) MOE_TRY(for_each_piece(&m->params[i], m->params[i].t, 0, false, get_piece, &gc));
    if (opt) {
        MOE_TRY(moe_h5_get_i64(f, "optim_step", &v));
        moe_optimizer_set_step(opt, v);
        for (int i = 0; i < m->n_params; i++) {
            moe_tensor *mm = NULL, *vv = NULL;
            moe_optimizer_state(opt, i, &mm, &vv);
            get_ctx cm = {f, "optim/m"}, cv = {f, "optim/v"};
            if (mm) MOE_TRY(for_each_piece(&m->params[i], mm, 0, false, get_piece, &cm));
            if (vv) MOE_TRY(for_each_piece(&m->params[i], vv, 0, false, get_piece, &cv));
        }
    }
    for (int i = 0; i < m->cfg.model.n_layers; i++) {
        moe_block *b = &m->blocks[i];
        if (b->dense || !b->moe.router.bias) continue;
        char name[96];
        snprintf(name, sizeof name, "layers.%d.moe", i);
        get_ctx rb = {f, "router_bias"};
        MOE_TRY(get_piece(name, b->moe.router.bias, &rb));
    }
    return MOE_OK;
}

moe_status moe_checkpoint_load(const char *path, moe_model *m, moe_optimizer *opt, moe_train_state *ts) {
    moe_h5 *f = NULL;
    MOE_TRY(moe_h5_open(path, &f));
    moe_status s = load_all(f, m, opt, ts);
    moe_h5_close(f);
    return s == MOE_OK ? MOE_OK : moe_error_context(s, "loading checkpoint %s", path);
}

moe_status moe_checkpoint_read_config(const char *path, char **text) {
    moe_h5 *f = NULL;
    MOE_TRY(moe_h5_open(path, &f));
    moe_status s = moe_h5_get_string(f, "config", text);
    moe_h5_close(f);
    return s == MOE_OK ? MOE_OK : moe_error_context(s, "reading the config of checkpoint %s", path);
}
