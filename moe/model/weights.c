/* Reading a checkpoint's model (see weights.h; the layout is in moe/train/checkpoint.h). */
#include "moe/model/weights.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/memory.h"

const char *moe_ckpt_stack_base(const moe_param_ref *p) { return p->expert_name ? p->expert_name : p->name; }

void moe_ckpt_expert_piece_name(const char *base, int64_t e, char *name, size_t cap) {
    const char *dot = strrchr(base, '.');
    MOE_ASSERT(dot, "checkpoint: expert stack name '%s' has no '.'", base);
    snprintf(name, cap, "%.*s.%lld%s", (int)(dot - base), base, (long long)e, dot);
}

moe_status moe_ckpt_for_each_piece(const moe_param_ref *p, moe_tensor *t, moe_ckpt_piece_fn fn, void *ctx) {
    if (!p->expert_stack) return fn(p->name, t, ctx);
    int64_t rows = t->shape[1], cols = t->shape[2];
    for (int64_t j = 0; j < t->shape[0]; j++) {
        char name[192];
        moe_ckpt_expert_piece_name(moe_ckpt_stack_base(p), p->expert_ids ? p->expert_ids[j] : p->expert_begin + j,
                                   name, sizeof name);
        moe_tensor *v = moe_tensor_view_raw(t, 2, (int64_t[]){rows, cols}, (int64_t[]){cols, 1}, j * rows * cols);
        if (!v) return moe_last_status();
        MOE_TRY(fn(name, v, ctx));
    }
    return MOE_OK;
}

int64_t moe_ckpt_local_slot(const moe_param_ref *p, int64_t e) {
    for (int64_t j = 0; j < p->t->shape[0]; j++)
        if ((p->expert_ids ? p->expert_ids[j] : p->expert_begin + j) == e) return j;
    return -1;
}

moe_status moe_ckpt_for_each_router_bias(const moe_model *m, moe_ckpt_piece_fn fn, void *ctx) {
    for (int i = 0; i < m->cfg.model.n_layers; i++) {
        const moe_block *b = &m->blocks[i];
        if (b->dense || !b->moe.router.bias) continue;
        char name[96];
        snprintf(name, sizeof name, "layers.%d.moe", i);
        MOE_TRY(fn(name, b->moe.router.bias, ctx));
    }
    return MOE_OK;
}

typedef struct { moe_h5 *f; const char *group; } get_ctx;

static moe_status get_piece(const char *name, moe_tensor *piece, void *ctx) {
    get_ctx *c = ctx;
    char full[256];
    snprintf(full, sizeof full, "%s/%s", c->group, name);
    if (!moe_h5_has(c->f, full))
        return moe_error(MOE_ERR_FORMAT, "dataset '%s' is missing (was the checkpoint written with another model config?)", full);
    const moe_mem_mark mark = moe_mem_step_mark(MOE_CPU); /* the host copy goes back after */
    moe_tensor *h = moe_tensor_empty(MOE_LIFE_STEP, MOE_CPU, MOE_F32, piece->ndim, piece->shape);
    moe_status s = h ? moe_h5_get_array(c->f, full, MOE_H5_F32, piece->ndim, piece->shape, h->data) : moe_last_status();
    if (s == MOE_OK) s = moe_tensor_copy_(piece, h);
    moe_mem_step_release(MOE_CPU, mark);
    return s;
}

moe_status moe_ckpt_read_pieces(moe_h5 *f, const char *group, const moe_param_ref *p, moe_tensor *t) {
    get_ctx gc = {f, group};
    return moe_ckpt_for_each_piece(p, t, get_piece, &gc);
}

moe_status moe_ckpt_read_model(moe_h5 *f, moe_model *m) {
    for (int i = 0; i < m->n_params; i++) MOE_TRY(moe_ckpt_read_pieces(f, "params", &m->params[i], m->params[i].t));
    get_ctx rb = {f, "router_bias"};
    return moe_ckpt_for_each_router_bias(m, get_piece, &rb);
}

/* Reads dataset `name` whole, which checks its CRC (moe_h5_get_array / _get_string). */
static moe_status verify_dataset(const char *name, void *user) {
    moe_h5 *f = user;
    moe_h5_dtype dt;
    int nd = 0;
    int64_t shape[MOE_H5_MAX_NDIM];
    if (moe_h5_shape(f, name, &dt, &nd, shape) != MOE_OK) { /* not an array: a text */
        char *text = NULL;
        moe_status s = moe_h5_get_string(f, name, &text);
        free(text);
        return s;
    }
    size_t bytes = moe_h5_dtype_size(dt);
    for (int i = 0; i < nd; i++) bytes *= (size_t)shape[i];
    void *buf = malloc(bytes ? bytes : 1);
    if (!buf) return moe_error(MOE_ERR_OOM, "out of host memory verifying dataset '%s' (%zu bytes)", name, bytes);
    moe_status s = moe_h5_get_array(f, name, dt, nd, shape, buf);
    free(buf);
    return s;
}

/* A checkpoint that fails its checks: the finding, then what to do about it. */
static moe_status checkpoint_damaged(moe_status s) {
    if (s != MOE_ERR_FORMAT) return s;
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", moe_last_error());
    return moe_error(s, "checkpoint %s; move it away and resume from an earlier checkpoint", msg);
}

static moe_status checkpoint_open(const char *path, moe_h5 **f) { return checkpoint_damaged(moe_h5_open(path, f)); }

moe_status moe_checkpoint_verify(const char *path) {
    static const char *const required[] = {"config", "version", "step", "loader_seed", "loader_step", "bad_steps"};
    moe_h5 *f = NULL;
    MOE_TRY(checkpoint_open(path, &f));
    moe_status s = MOE_OK;
    for (size_t i = 0; i < sizeof required / sizeof *required && s == MOE_OK; i++)
        if (!moe_h5_has(f, required[i]))
            s = moe_error(MOE_ERR_FORMAT, "%s has no dataset '%s' (not a training checkpoint, or damaged)", path,
                          required[i]);
    if (s == MOE_OK) s = moe_h5_list(f, "", verify_dataset, f);
    moe_h5_close(f);
    return checkpoint_damaged(s);
}

static moe_status verify_accept(const char *path, void *unused) { return moe_checkpoint_verify(path); }

moe_status moe_checkpoint_find_latest(const char *dir, char *path, size_t cap) {
    return moe_h5_find_latest_where(dir, "ckpt-", ".h5", verify_accept, NULL, path, cap);
}

moe_status moe_checkpoint_load_weights(const char *path, moe_model *m) {
    MOE_TRY(moe_checkpoint_verify(path));
    moe_h5 *f = NULL;
    MOE_TRY(checkpoint_open(path, &f));
    moe_status s = moe_ckpt_read_model(f, m);
    moe_h5_close(f);
    return s == MOE_OK ? MOE_OK : moe_error_context(s, "loading checkpoint %s", path);
}

moe_status moe_checkpoint_read_config(const char *path, char **text) {
    moe_h5 *f = NULL;
    MOE_TRY(checkpoint_open(path, &f));
    moe_status s = moe_h5_get_string(f, "config", text);
    moe_h5_close(f);
    return s == MOE_OK ? MOE_OK : moe_error_context(s, "reading the config of checkpoint %s", path);
}

moe_status moe_checkpoint_read_tokenizer(const char *path, moe_tokenizer **tok) {
    *tok = NULL;
    moe_h5 *f = NULL;
    MOE_TRY(checkpoint_open(path, &f));
    moe_status s = MOE_OK;
    uint8_t *img = NULL;
    int64_t shape[MOE_H5_MAX_NDIM] = {0};
    if (moe_h5_has(f, "tokenizer")) {
        moe_h5_dtype dt;
        int nd = 0;
        s = moe_h5_shape(f, "tokenizer", &dt, &nd, shape);
        if (s == MOE_OK && (dt != MOE_H5_U8 || nd != 1))
            s = moe_error(MOE_ERR_FORMAT, "dataset /tokenizer is not a byte array");
        if (s == MOE_OK && !(img = malloc(shape[0] > 0 ? (size_t)shape[0] : 1)))
            s = moe_error(MOE_ERR_OOM, "out of memory reading /tokenizer (%lld bytes)", (long long)shape[0]);
        if (s == MOE_OK) s = moe_h5_get_array(f, "tokenizer", MOE_H5_U8, 1, shape, img);
    }
    moe_h5_close(f);
    if (s == MOE_OK && img) {
        size_t n = strlen(path) + 32;
        char *src = malloc(n);
        if (src) snprintf(src, n, "checkpoint %s: /tokenizer", path);
        s = src ? moe_tokenizer_from_bytes(img, (size_t)shape[0], src, tok) : moe_error(MOE_ERR_OOM, "out of memory");
        free(src);
    }
    free(img);
    return s == MOE_OK ? MOE_OK : moe_error_context(s, "reading the tokenizer of checkpoint %s", path);
}
