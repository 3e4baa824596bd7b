/* Saving and loading training state (layout in checkpoint.h; the model-only reader and the
 * piece naming are moe/model/weights.c). */
#include "moe/train/checkpoint.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dist.h"
#include "core/h5file.h"
#include "core/memory.h"
#include "moe/model/tokenizer.h"

/* Where a piece goes: group/<name>, with a layer number "layers.<j>." stored as
 * "layers.<j + first_layer>." (a streamed block; 0 for a whole model). */
typedef struct { moe_h5 *f; const char *group; int first_layer; } put_ctx;

static void stored_name(const put_ctx *c, const char *name, char *full, size_t cap) {
    int j, n = 0;
    if (c->first_layer && sscanf(name, "layers.%d.%n", &j, &n) == 1 && n > 0)
        snprintf(full, cap, "%s/layers.%d.%s", c->group, j + c->first_layer, name + n);
    else
        snprintf(full, cap, "%s/%s", c->group, name);
}

/* Writes one piece through host f32 copies, whose step-arena bytes go back afterwards (a
 * checkpoint of a large model passes far more bytes than one step holds). */
static moe_status put_piece(const char *name, moe_tensor *piece, void *ctx) {
    put_ctx *c = ctx;
    if (!c->f) return MOE_OK; /* not the writing rank: it only took part in the gathers */
    const moe_mem_mark mark = moe_mem_step_mark(MOE_CPU);
    moe_tensor *h = moe_tensor_to(piece, MOE_CPU, MOE_LIFE_STEP);
    moe_tensor *h32 = h ? moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_F32, h->ndim, h->shape) : NULL;
    moe_status s = h32 ? moe_tensor_copy_(h32, h) : moe_last_status();
    if (s == MOE_OK) {
        char full[256];
        stored_name(c, name, full, sizeof full);
        s = moe_h5_put_array(c->f, full, MOE_H5_F32, h32->ndim, h32->shape, h32->data);
    }
    moe_mem_step_release(MOE_CPU, mark);
    return s;
}

/* Parameter i, then its optimizer states m and v (NULL where the optimizer keeps none). */
static void param_sources(const moe_model *m, const moe_optimizer *opt, int i, moe_tensor *src[3]) {
    src[0] = m->params[i].t;
    src[1] = src[2] = NULL;
    if (opt) moe_optimizer_state(opt, i, &src[1], &src[2]);
}

/* Under expert parallelism each expert lives on one rank of its EP group, and the ranks'
 * stacks differ (heterogeneous experts group by width per rank). For every stack base in
 * order of first appearance (the layers' w13 and w2: the same list on every rank), every
 * global expert e and each of parameter, m and v: the owner's slice is summed over the EP
 * group into a zeroed host [rows, cols] (shape from the config) and the writer stores it.
 * Checkpoint time only; a few small all-reduces per expert. */
static moe_status put_experts_ep(moe_h5 *f, const moe_model *m, const moe_optimizer *opt,
                                 const char *const groups[3]) {
    const int64_t E = m->cfg.model.n_experts, d = m->cfg.model.d_model;
    for (int i = 0; i < m->n_params; i++) {
        const moe_param_ref *p = &m->params[i];
        if (!p->expert_stack) continue;
        bool first = true; /* this base not seen in an earlier parameter */
        for (int j = 0; j < i && first; j++)
            first = !(m->params[j].expert_stack && strcmp(moe_ckpt_stack_base(&m->params[j]), moe_ckpt_stack_base(p)) == 0);
        if (!first) continue;
        const char *base = moe_ckpt_stack_base(p), *suffix = strrchr(base, '.');
        MOE_ASSERT(suffix && (strcmp(suffix, ".w13") == 0 || strcmp(suffix, ".w2") == 0),
                   "checkpoint: expert stack '%s' is neither w13 nor w2", base);
        bool w13 = strcmp(suffix, ".w13") == 0;
        moe_tensor *probe[3];
        param_sources(m, opt, i, probe);
        for (int64_t e = 0; e < E; e++) {
            const int64_t w = moe_config_expert_ffn_dim(&m->cfg, (int)e);
            const int64_t rows = w13 ? d : w, cols = w13 ? 2 * w : d;
            /* the owner: the parameter with this base whose stack holds e */
            int owner = -1;
            int64_t slot = -1;
            for (int j = 0; j < m->n_params && owner < 0; j++)
                if (m->params[j].expert_stack && strcmp(moe_ckpt_stack_base(&m->params[j]), base) == 0 &&
                    (slot = moe_ckpt_local_slot(&m->params[j], e)) >= 0)
                    owner = j;
            moe_tensor *src[3] = {NULL, NULL, NULL};
            if (owner >= 0) param_sources(m, opt, owner, src);
            char name[192];
            moe_ckpt_expert_piece_name(base, e, name, sizeof name);
            for (int k = 0; k < 3; k++) {
                if (!probe[k]) continue; /* same optimizer on every rank: same states everywhere */
                const moe_mem_mark mark = moe_mem_step_mark(MOE_CPU); /* one expert's buffers at a time */
                moe_tensor *buf = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 2, (int64_t[]){rows, cols});
                if (!buf) return moe_last_status();
                if (owner >= 0) {
                    moe_tensor *t = src[k];
                    MOE_ASSERT(t->shape[1] == rows && t->shape[2] == cols, "checkpoint: %s is %lldx%lld, expected "
                               "%lldx%lld", name, (long long)t->shape[1], (long long)t->shape[2], (long long)rows,
                               (long long)cols);
                    moe_tensor *v = moe_tensor_view_raw(t, 2, (int64_t[]){rows, cols}, (int64_t[]){cols, 1},
                                                        slot * rows * cols);
                    if (!v) return moe_last_status();
                    moe_tensor *h = moe_tensor_to(v, MOE_CPU, MOE_LIFE_STEP);
                    if (!h || moe_tensor_copy_(buf, h) != MOE_OK) return moe_last_status();
                }
                MOE_TRY(moe_dist_allreduce_sum(MOE_GROUP_EP, buf));
                put_ctx pc = {f, groups[k], 0};
                MOE_TRY(put_piece(name, buf, &pc));
                moe_mem_step_release(MOE_CPU, mark);
            }
        }
    }
    return MOE_OK;
}

/* With a BPE tokenizer, its image as /tokenizer (u8), so that the checkpoint alone is
 * enough to generate. A tokenizer file that cannot be read is left out (generation then
 * reads data.tokenizer_path, as before): training never needs it. */
static moe_status put_tokenizer(moe_h5 *f, const moe_config *cfg) {
    moe_tokenizer *tok = NULL;
    if (cfg->data.tokenizer != MOE_CFG_TOKENIZER_BPE || moe_tokenizer_load(cfg->data.tokenizer_path, &tok) != MOE_OK) {
        moe_error_clear();
        return MOE_OK;
    }
    uint8_t *img = NULL;
    size_t n = 0;
    moe_status s = moe_tokenizer_to_bytes(tok, &img, &n);
    moe_tokenizer_free(tok);
    if (s == MOE_OK) s = moe_h5_put_array(f, "tokenizer", MOE_H5_U8, 1, (int64_t[]){(int64_t)n}, img);
    free(img);
    return s;
}

moe_status moe_checkpoint_put_header(moe_h5 *f, const moe_config *cfg, const moe_optimizer *opt,
                                     const moe_train_state *ts) {
    char *cfg_text = NULL;
    MOE_TRY(moe_config_to_yaml(cfg, &cfg_text));
    moe_status s = moe_h5_put_string(f, "config", cfg_text);
    free(cfg_text);
    MOE_TRY(s);
    MOE_TRY(moe_h5_put_string(f, "version", MOE_VERSION));
    if (ts->run_id[0]) MOE_TRY(moe_h5_put_string(f, "run_id", ts->run_id));
    MOE_TRY(put_tokenizer(f, cfg));
    MOE_TRY(moe_h5_put_i64(f, "step", ts->step));
    MOE_TRY(moe_h5_put_i64(f, "loader_seed", (int64_t)ts->loader_seed));
    MOE_TRY(moe_h5_put_i64(f, "loader_step", (int64_t)ts->loader_step));
    MOE_TRY(moe_h5_put_i64(f, "bad_steps", ts->bad_steps));
    if (opt) MOE_TRY(moe_h5_put_i64(f, "optim_step", moe_optimizer_get_step(opt)));
    return MOE_OK;
}

/* Each parameter of m (and its optimizer states) but the expert stacks under expert
 * parallelism, and the router biases; the parameters outside the layers only with `top`. */
static moe_status put_params(moe_h5 *f, const moe_model *m, const moe_optimizer *opt, int first_layer, bool top) {
    bool ep = moe_dist_ep_size() > 1;
    static const char *const groups[3] = {"params", "optim/m", "optim/v"};
    for (int i = 0; i < m->n_params; i++) {
        if (ep && m->params[i].expert_stack) continue;
        if (!top && strncmp(m->params[i].name, "layers.", 7) != 0) continue;
        moe_tensor *src[3];
        param_sources(m, opt, i, src);
        for (int k = 0; k < 3; k++) {
            put_ctx pc = {f, groups[k], first_layer};
            if (src[k]) MOE_TRY(moe_ckpt_for_each_piece(&m->params[i], src[k], put_piece, &pc));
        }
    }
    if (ep) MOE_TRY(put_experts_ep(f, m, opt, groups));
    put_ctx rb = {f, "router_bias", first_layer};
    return moe_ckpt_for_each_router_bias(m, put_piece, &rb);
}

moe_status moe_checkpoint_put_block(moe_h5 *f, const moe_model *m, int first_layer, bool top) {
    MOE_ASSERT(moe_dist_ep_size() == 1, "checkpoint: a block-by-block write is for one process");
    return put_params(f, m, NULL, first_layer, top);
}

/* f is NULL on the ranks that do not write (they still join the expert gathers). */
static moe_status save_all(moe_h5 *f, const moe_model *m, const moe_optimizer *opt, const moe_train_state *ts) {
    if (f) MOE_TRY(moe_checkpoint_put_header(f, &m->cfg, opt, ts));
    return put_params(f, m, opt, 0, true);
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

static moe_status load_all(moe_h5 *f, moe_model *m, moe_optimizer *opt, moe_train_state *ts) {
    int64_t v;
    memset(ts, 0, sizeof *ts);
    if (moe_h5_has(f, "run_id")) {
        char *id = NULL;
        MOE_TRY(moe_h5_get_string(f, "run_id", &id));
        snprintf(ts->run_id, sizeof ts->run_id, "%s", id);
        free(id);
    }
    MOE_TRY(moe_h5_get_i64(f, "step", &ts->step));
    MOE_TRY(moe_h5_get_i64(f, "loader_seed", &v));
    ts->loader_seed = (uint64_t)v;
    MOE_TRY(moe_h5_get_i64(f, "loader_step", &v));
    ts->loader_step = (uint64_t)v;
    MOE_TRY(moe_h5_get_i64(f, "bad_steps", &ts->bad_steps));
    if (ts->step < 0 || ts->bad_steps < 0)
        return moe_error(MOE_ERR_FORMAT, "step %lld or bad_steps %lld is negative",
                         (long long)ts->step, (long long)ts->bad_steps);
    MOE_TRY(moe_ckpt_read_model(f, m));
    if (!opt) return MOE_OK;
    MOE_TRY(moe_h5_get_i64(f, "optim_step", &v));
    if (v < 0) return moe_error(MOE_ERR_FORMAT, "optim_step %lld is negative", (long long)v);
    moe_optimizer_set_step(opt, v);
    for (int i = 0; i < m->n_params; i++) {
        moe_tensor *mm = NULL, *vv = NULL;
        moe_optimizer_state(opt, i, &mm, &vv);
        if (mm) MOE_TRY(moe_ckpt_read_pieces(f, "optim/m", &m->params[i], mm));
        if (vv) MOE_TRY(moe_ckpt_read_pieces(f, "optim/v", &m->params[i], vv));
    }
    return MOE_OK;
}

moe_status moe_checkpoint_load(const char *path, moe_model *m, moe_optimizer *opt, moe_train_state *ts) {
    MOE_TRY(moe_checkpoint_verify(path));
    moe_h5 *f = NULL;
    MOE_TRY(moe_h5_open(path, &f));
    moe_status s = load_all(f, m, opt, ts);
    moe_h5_close(f);
    return s == MOE_OK ? MOE_OK : moe_error_context(s, "loading checkpoint %s", path);
}
