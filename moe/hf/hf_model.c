/* Hub folder <-> moe_model: one walk over the model names every tensor and where it goes
 * (the name table); loading copies each from the mapped files as it is named, exporting
 * collects them and then writes config.json and model.safetensors. */
#include "moe/hf/hf_model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileio.h"
#include "core/memory.h"
#include "moe/hf/safetensors.h"

typedef struct export_entry export_entry;

typedef struct loader {
    const char *dir;
    moe_st_set set;
    bool **used;      /* [file][tensor] */
    float *rows;      /* up to PUT_ROWS widened rows of a tensor */
    int64_t rows_cap; /* floats */
    const moe_hf_info *info;
    bool exporting;   /* collect the tensors into `entries` instead of reading them */
    export_entry *entries;
    int n_entries, cap_entries;
} loader;

/* Where a HF tensor goes: rows of W [rows, cols] (cols 0: a vector of rows) land in dst.
 * transpose: dst[i * ld + col0 + o] = W[src(o)][i] (nn.Linear [out, in] -> our [in, out]);
 * else dst[o * ld + col0 + i] = W[src(o)][i]. src(o) = row_map ? row_map[o] : o. */
typedef struct dst_spec {
    float *dst;
    int64_t ld, col0;
    bool transpose;
    const int64_t *row_map;
} dst_spec;

static void mark_used(loader *L, const moe_st_view *v) {
    for (int f = 0; f < L->set.n_files; f++) {
        const moe_st_file *F = &L->set.files[f];
        if (v >= F->tensors && v < F->tensors + F->n) L->used[f][v - F->tensors] = true;
    }
}

/* The first present of the candidate names (NULL-terminated). */
static const moe_st_view *lookup(loader *L, const char *const *names) {
    for (const char *const *n = names; *n; n++) {
        const moe_st_view *v = moe_st_set_find(&L->set, *n);
        if (v) return v;
    }
    return NULL;
}

/* Rows of a transposed tensor widened together: each column of the block is then written as
 * one run of PUT_ROWS floats instead of PUT_ROWS scattered stores (a hub model's linear
 * layers are nearly all transposed on the way in). */
#define PUT_ROWS 64
#define PUT_PARALLEL (1 << 16) /* elements of a block worth spreading over threads */

static int64_t row_of(const dst_spec *d, int64_t o) { return d->row_map ? d->row_map[o] : o; }

/* Rows src(o0 .. o0 + n - 1) of W [rows, in] widened to f32 into L->rows [n, in]. */
static const float *rows_f32(loader *L, const moe_st_view *v, const dst_spec *d, int64_t o0, int64_t n, int64_t in) {
    if (n * in > L->rows_cap) {
        free(L->rows);
        L->rows = malloc(sizeof(float) * (size_t)(n * in));
        L->rows_cap = L->rows ? n * in : 0;
        if (!L->rows) {
            moe_error(MOE_ERR_OOM, "%s: out of host memory widening tensor '%s'", v->file, v->name);
            return NULL;
        }
    }
    /* the first row checks the dtype; the others cannot fail then */
    if (moe_st_read_f32_range(v, row_of(d, o0) * in, in, L->rows) != MOE_OK) return NULL;
#pragma omp parallel for schedule(static) if (n * in >= PUT_PARALLEL)
    for (int64_t j = 1; j < n; j++) (void)moe_st_read_f32_range(v, row_of(d, o0 + j) * in, in, L->rows + j * in);
    return L->rows;
}

/* One tensor for export: names[0] of shape [rows, cols] (cols 0: [rows]), read back from d. */
struct export_entry {
    char name[320];
    int64_t rows, cols;
    dst_spec d;
};

static moe_status record(loader *L, const char *name, int64_t rows, int64_t cols, dst_spec d) {
    if (L->n_entries == L->cap_entries) {
        int cap = L->cap_entries ? 2 * L->cap_entries : 256;
        export_entry *e = realloc(L->entries, sizeof *e * (size_t)cap);
        if (!e) return moe_error(MOE_ERR_OOM, "%s: out of host memory", L->dir);
        L->entries = e;
        L->cap_entries = cap;
    }
    MOE_ASSERT(!d.row_map, "export writes rope dims in rotate-half order (no row map)");
    export_entry *e = &L->entries[L->n_entries++];
    snprintf(e->name, sizeof e->name, "%s", name);
    e->rows = rows, e->cols = cols, e->d = d;
    return MOE_OK;
}

/* Copies the first present candidate of shape [rows, cols] (cols 0: [rows]) to d; when
 * exporting, records names[0] instead. */
static moe_status put(loader *L, const char *const *names, int64_t rows, int64_t cols, dst_spec d) {
    if (L->exporting) return record(L, names[0], rows, cols, d);
    const moe_st_view *v = lookup(L, names);
    if (!v) return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s' is missing", L->dir, names[0]);
    bool ok = cols ? v->ndim == 2 && v->shape[0] == rows && v->shape[1] == cols : v->ndim == 1 && v->shape[0] == rows;
    if (!ok) {
        char got[96] = "[", *p = got + 1;
        for (int i = 0; i < v->ndim && p < got + 80; i++) p += sprintf(p, i ? ", %lld" : "%lld", (long long)v->shape[i]);
        strcat(got, "]");
        return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s' has shape %s; config.json implies [%lld%s%.0lld]", v->file,
                         v->name, got, (long long)rows, cols ? ", " : "", (long long)cols);
    }
    int64_t in = cols ? cols : 1;
    for (int64_t o0 = 0; o0 < rows; o0 += PUT_ROWS) {
        const int64_t n = rows - o0 < PUT_ROWS ? rows - o0 : PUT_ROWS;
        const float *src = rows_f32(L, v, &d, o0, n, in);
        if (!src) return moe_last_status();
        if (d.transpose) {
#pragma omp parallel for schedule(static) if (n * in >= PUT_PARALLEL)
            for (int64_t i = 0; i < in; i++) {
                float *dst = d.dst + i * d.ld + d.col0 + o0;
                for (int64_t j = 0; j < n; j++) dst[j] = src[j * in + i];
            }
        } else {
#pragma omp parallel for schedule(static) if (n * in >= PUT_PARALLEL)
            for (int64_t j = 0; j < n; j++)
                memcpy(d.dst + (o0 + j) * d.ld + d.col0, src + j * in, sizeof(float) * (size_t)in);
        }
    }
    mark_used(L, v);
    moe_st_release(v);
    return MOE_OK;
}

#define NAMES(...) ((const char *const[]){__VA_ARGS__, NULL})

static float *F(moe_tensor *t) { return t->data; }

/* A [out, in] linear into columns col0.. of our [in, ld] matrix. */
static dst_spec lin(moe_tensor *t, int64_t col0) { return (dst_spec){F(t), t->shape[t->ndim - 1], col0, true, NULL}; }
static dst_spec vec(moe_tensor *t, int64_t off) { return (dst_spec){F(t), 1, off, false, NULL}; }

/* HF de-interleaves the rope dims of q_pe and k_pe before rotate-half; the same is a
 * permutation of the columns that produce them: output j takes source row map[j]. */
static int64_t *rope_row_map(int64_t rows, int64_t per, int64_t first, int64_t rope, bool interleave) {
    int64_t *map = malloc(sizeof(int64_t) * (size_t)rows);
    if (!map) return NULL;
    for (int64_t o = 0; o < rows; o++) {
        int64_t h = o / per, j = o % per - first;
        map[o] = o;
        if (interleave && j >= 0 && j < rope) map[o] = h * per + first + (j < rope / 2 ? 2 * j : 2 * (j - rope / 2) + 1);
    }
    return map;
}

static moe_status load_mla(loader *L, moe_model *m, moe_block *b, const char *p) {
    const moe_cfg_model *c = &m->cfg.model;
    int64_t d = c->d_model, H = m->n_heads, Dq = m->head_dim, nope = c->qk_nope_dim, rope = c->qk_rope_dim;
    int64_t rkv = c->kv_lora_rank, vd = c->v_head_dim, rq = c->q_lora_rank;
    char n[6][192];
    snprintf(n[0], 192, "%s.self_attn.q_a_proj.weight", p);
    snprintf(n[1], 192, "%s.self_attn.q_a_layernorm.weight", p);
    snprintf(n[2], 192, "%s.self_attn.%s.weight", p, rq ? "q_b_proj" : "q_proj");
    snprintf(n[3], 192, "%s.self_attn.kv_a_proj_with_mqa.weight", p);
    snprintf(n[4], 192, "%s.self_attn.kv_a_layernorm.weight", p);
    snprintf(n[5], 192, "%s.self_attn.kv_b_proj.weight", p);
    bool il = L->info->rope_interleave && !L->exporting;
    int64_t *qmap = il ? rope_row_map(H * Dq, Dq, nope, rope, true) : NULL;
    int64_t *kmap = il ? rope_row_map(rkv + rope, rkv + rope, rkv, rope, true) : NULL;
    moe_status s = !il || (qmap && kmap) ? MOE_OK : moe_error(MOE_ERR_OOM, "%s: out of host memory", L->dir);
    if (s == MOE_OK && rq) s = put(L, NAMES(n[0]), rq, d, lin(b->wq_a, 0));
    if (s == MOE_OK && rq) s = put(L, NAMES(n[1]), rq, 0, vec(b->q_a_norm, 0));
    if (s == MOE_OK) s = put(L, NAMES(n[2]), H * Dq, rq ? rq : d, (dst_spec){F(b->wq_b), H * Dq, 0, true, qmap});
    if (s == MOE_OK) s = put(L, NAMES(n[3]), rkv + rope, d, (dst_spec){F(b->wkv_a), rkv + rope, 0, true, kmap});
    if (s == MOE_OK) s = put(L, NAMES(n[4]), rkv, 0, vec(b->kv_a_norm, 0));
    if (s == MOE_OK) s = put(L, NAMES(n[5]), H * (nope + vd), rkv, lin(b->wkv_b, 0));
    free(qmap);
    free(kmap);
    return s;
}

static moe_status load_attention(loader *L, moe_model *m, moe_block *b, const char *p) {
    const moe_cfg_model *c = &m->cfg.model;
    int64_t d = c->d_model, H = m->n_heads, Hkv = m->n_kv_heads, hd = m->head_dim;
    char n[96 * 3];
    int64_t vw = c->attention == MOE_CFG_ATTENTION_MLA ? c->v_head_dim : hd;
    snprintf(n, sizeof n, "%s.self_attn.o_proj.weight", p);
    MOE_TRY(put(L, NAMES(n), d, H * vw, lin(b->wo, 0)));
    if (c->attention == MOE_CFG_ATTENTION_MLA) return load_mla(L, m, b, p);
    const char *proj[3] = {"q_proj", "k_proj", "v_proj"};
    int64_t width[3] = {H * hd, Hkv * hd, Hkv * hd}, off = 0;
    for (int j = 0; j < 3; off += width[j], j++) {
        snprintf(n, sizeof n, "%s.self_attn.%s.weight", p, proj[j]);
        MOE_TRY(put(L, NAMES(n), width[j], d, lin(b->wqkv, off)));
        snprintf(n, sizeof n, "%s.self_attn.%s.bias", p, proj[j]);
        if (b->bqkv) MOE_TRY(put(L, NAMES(n), width[j], 0, vec(b->bqkv, off)));
    }
    if (!b->q_norm) return MOE_OK;
    snprintf(n, sizeof n, "%s.self_attn.q_norm.weight", p);
    MOE_TRY(put(L, NAMES(n), b->q_norm->shape[0], 0, vec(b->q_norm, 0)));
    snprintf(n, sizeof n, "%s.self_attn.k_norm.weight", p);
    return put(L, NAMES(n), b->k_norm->shape[0], 0, vec(b->k_norm, 0));
}

static bool is_family(const loader *L, const char *model_type) { return !strcmp(L->info->model_type, model_type); }

/* Whether `name` is in the files (exporting: never). */
static bool has(loader *L, const char *name) { return !L->exporting && moe_st_set_find(&L->set, name); }

/* A SwiGLU MLP ("<p>.gate_proj/up_proj/down_proj", or Mixtral's w1/w3/w2) of width f into
 * w13 [d, 2f] (gate | up) and w2 [f, d] at the given element pointers. */
static moe_status load_mlp(loader *L, const char *p, int64_t d, int64_t f, float *w13, float *w2) {
    char g[3][192], a[3][192];
    const char *hf[3] = {"gate_proj", "up_proj", "down_proj"}, *w123[3] = {"w1", "w3", "w2"};
    for (int j = 0; j < 3; j++) {
        snprintf(g[j], 192, "%s.%s.weight", p, hf[j]);
        snprintf(a[j], 192, "%s.%s.weight", p, w123[j]);
    }
    bool mx = is_family(L, "mixtral"); /* the name written on export */
    MOE_TRY(put(L, NAMES(mx ? a[0] : g[0], mx ? g[0] : a[0]), f, d, (dst_spec){w13, 2 * f, 0, true, NULL}));
    MOE_TRY(put(L, NAMES(mx ? a[1] : g[1], mx ? g[1] : a[1]), f, d, (dst_spec){w13, 2 * f, f, true, NULL}));
    return put(L, NAMES(mx ? a[2] : g[2], mx ? g[2] : a[2]), d, f, (dst_spec){w2, d, 0, true, NULL});
}

static moe_status load_moe(loader *L, moe_model *m, moe_block *b, const char *p) {
    moe_moe_layer *M = &b->moe;
    int64_t d = m->cfg.model.d_model, E = m->cfg.model.n_experts;
    char mlp[160], n[192], n2[192];
    snprintf(n, sizeof n, "%s.mlp.gate.weight", p);
    snprintf(n2, sizeof n2, "%s.block_sparse_moe.gate.weight", p);
    bool sparse_moe = L->exporting ? is_family(L, "mixtral") : !has(L, n);
    const char *base = sparse_moe ? "block_sparse_moe" : "mlp";
    if (sparse_moe) snprintf(n, sizeof n, "%s", n2);
    MOE_TRY(put(L, NAMES(n, n2), E, d, lin(M->router.w_gate, 0)));
    if (M->router.bias) {
        snprintf(n, sizeof n, "%s.mlp.gate.e_score_correction_bias", p);
        MOE_TRY(put(L, NAMES(n), E, 0, vec(M->router.bias, 0)));
    }
    for (int g = 0; g < M->n_groups; g++) {
        const moe_expert_group *G = &M->groups[g];
        int64_t f = G->ffn_dim;
        for (int j = 0; j < G->n; j++) {
            snprintf(mlp, sizeof mlp, "%s.%s.experts.%d", p, base, G->experts[j]);
            MOE_TRY(load_mlp(L, mlp, d, f, F(G->w13) + j * d * 2 * f, F(G->w2) + j * f * d));
        }
    }
    if (M->shared_w13) {
        int64_t fs = M->shared_w2->shape[0];
        snprintf(mlp, sizeof mlp, "%s.mlp.shared_expert", p);
        snprintf(n, sizeof n, "%s.gate_proj.weight", mlp);
        if (L->exporting ? !is_family(L, "qwen2_moe") : !has(L, n))
            snprintf(mlp, sizeof mlp, "%s.mlp.shared_experts", p);
        MOE_TRY(load_mlp(L, mlp, d, fs, F(M->shared_w13), F(M->shared_w2)));
    }
    if (M->shared_gate) {
        snprintf(n, sizeof n, "%s.mlp.shared_expert_gate.weight", p);
        MOE_TRY(put(L, NAMES(n), 1, d, lin(M->shared_gate, 0)));
    }
    return MOE_OK;
}

/* The folder's layer `layer` ("model.layers.<layer>") into m->blocks[block]. */
static moe_status load_block(loader *L, moe_model *m, int block, int layer) {
    moe_block *b = &m->blocks[block];
    int64_t d = m->cfg.model.d_model;
    char p[64], n[160], mlp[96];
    snprintf(p, sizeof p, "model.layers.%d", layer);
    snprintf(n, sizeof n, "%s.input_layernorm.weight", p);
    MOE_TRY(put(L, NAMES(n), d, 0, vec(b->attn_norm, 0)));
    snprintf(n, sizeof n, "%s.post_attention_layernorm.weight", p);
    MOE_TRY(put(L, NAMES(n), d, 0, vec(b->ffn_norm, 0)));
    MOE_TRY(load_attention(L, m, b, p));
    if (!b->dense) return load_moe(L, m, b, p);
    snprintf(mlp, sizeof mlp, "%s.mlp", p);
    return load_mlp(L, mlp, d, b->dense_w2->shape[0], F(b->dense_w13), F(b->dense_w2));
}

/* Every tensor of the files must have been used, but for buffers transformers itself
 * drops (rotary inv_freq, layers past num_hidden_layers such as multi-token prediction). */
static moe_status check_all_used(loader *L, int n_layers) {
    for (int f = 0; f < L->set.n_files; f++) {
        const moe_st_file *F = &L->set.files[f];
        for (int t = 0; t < F->n; t++) {
            const char *nm = F->tensors[t].name;
            int layer;
            if (L->used[f][t] || strstr(nm, "rotary_emb.inv_freq")) continue;
            if (sscanf(nm, "model.layers.%d.", &layer) == 1 && layer >= n_layers) continue;
            return moe_error(MOE_ERR_UNSUPPORTED, "%s: tensor '%s' has no place in the model (a feature config.json "
                             "does not announce, or one that is not supported)", F->path, nm);
        }
    }
    return MOE_OK;
}

/* The parameters outside the blocks: embedding, final norm, LM head. */
static moe_status load_top(loader *L, moe_model *m) {
    const moe_cfg_model *c = &m->cfg.model;
    int64_t V = c->vocab_size, d = c->d_model;
    MOE_TRY(put(L, NAMES("model.embed_tokens.weight"), V, d, (dst_spec){F(m->embed), d, 0, false, NULL}));
    MOE_TRY(put(L, NAMES("model.norm.weight"), d, 0, vec(m->final_norm, 0)));
    if (m->lm_head) return put(L, NAMES("lm_head.weight"), V, d, (dst_spec){F(m->lm_head), d, 0, false, NULL});
    if (has(L, "lm_head.weight")) /* tied: the copy some savers keep is ignored */
        mark_used(L, moe_st_set_find(&L->set, "lm_head.weight"));
    return MOE_OK;
}

/* The whole model (export: the walk that names every tensor). */
static moe_status load_all(loader *L, moe_model *m) {
    MOE_TRY(load_top(L, m));
    for (int i = 0; i < m->cfg.model.n_layers; i++) MOE_TRY(load_block(L, m, i, i));
    return L->exporting ? MOE_OK : check_all_used(L, m->cfg.model.n_layers);
}

/* ---- loading, whole or block by block ---- */

struct moe_hf_reader {
    loader L;
    moe_config cfg;
    moe_hf_info info;
};

moe_status moe_hf_reader_open(const char *dir, moe_hf_reader **out) {
    *out = NULL;
    moe_hf_reader *r = calloc(1, sizeof *r);
    if (!r) return moe_error(MOE_ERR_OOM, "%s: out of host memory", dir);
    moe_status s = moe_hf_config_read(dir, &r->cfg, &r->info);
    if (s != MOE_OK) {
        free(r);
        return s;
    }
    r->L = (loader){.dir = dir, .info = &r->info};
    s = moe_st_set_open_dir(&r->L.set, dir);
    if (s != MOE_OK) {
        free(r);
        return s;
    }
    r->L.used = calloc((size_t)r->L.set.n_files, sizeof *r->L.used);
    for (int f = 0; r->L.used && f < r->L.set.n_files; f++)
        if (!(r->L.used[f] = calloc((size_t)r->L.set.files[f].n + 1, sizeof **r->L.used))) s = MOE_ERR_OOM;
    if (!r->L.used || s != MOE_OK) s = moe_error(MOE_ERR_OOM, "%s: out of host memory", dir);
    if (s == MOE_OK && r->cfg.train.device != MOE_CFG_DEVICE_CPU)
        s = moe_error(MOE_ERR_UNSUPPORTED, "%s: loading a hub folder needs train.device=cpu", dir);
    if (s != MOE_OK) moe_hf_reader_close(r);
    else *out = r;
    return s;
}

const moe_config *moe_hf_reader_config(const moe_hf_reader *r) { return &r->cfg; }

int64_t moe_hf_reader_bytes(const moe_hf_reader *r) {
    int64_t n = 0;
    for (int f = 0; f < r->L.set.n_files; f++) n += (int64_t)r->L.set.files[f].size;
    return n;
}

moe_status moe_hf_reader_load_top(moe_hf_reader *r, moe_model *m) { return load_top(&r->L, m); }

moe_status moe_hf_reader_load_block(moe_hf_reader *r, moe_model *m, int block, int layer) {
    MOE_ASSERT(block >= 0 && block < m->cfg.model.n_layers && layer >= 0 && layer < r->cfg.model.n_layers,
               "block %d of %d, layer %d of %d", block, m->cfg.model.n_layers, layer, r->cfg.model.n_layers);
    return load_block(&r->L, m, block, layer);
}

moe_status moe_hf_reader_finish(moe_hf_reader *r) { return check_all_used(&r->L, r->cfg.model.n_layers); }

void moe_hf_reader_close(moe_hf_reader *r) {
    if (!r) return;
    for (int f = 0; r->L.used && f < r->L.set.n_files; f++) free(r->L.used[f]);
    free(r->L.used);
    free(r->L.rows);
    moe_st_set_close(&r->L.set);
    free(r);
}

moe_status moe_hf_load(const char *dir, moe_model *m, moe_hf_info *info) {
    memset(m, 0, sizeof *m);
    moe_hf_reader *r = NULL;
    MOE_TRY(moe_hf_reader_open(dir, &r));
    *info = r->info;
    moe_status s = moe_model_init_for_load(m, &r->cfg, 0, 1); /* load_all writes every parameter */
    if (s == MOE_OK) s = load_all(&r->L, m);
    moe_hf_reader_close(r);
    if (s != MOE_OK) moe_model_free(m);
    return s;
}

static int argmax_allowed(const float *v, int n, const int *banned, int n_banned) {
    int best = -1;
    for (int i = 0; i < n; i++) {
        bool skip = false;
        for (int j = 0; j < n_banned && !skip; j++) skip = banned[j] == i;
        if (!skip && (best < 0 || v[i] > v[best])) best = i;
    }
    return best;
}

moe_status moe_hf_generate_greedy(moe_decoder *d, const int32_t *prompt, int n_prompt, int n_new, const int *banned,
                                  int n_banned, int32_t *out) {
    int V = moe_decoder_model(d)->cfg.model.vocab_size;
    float *lg = malloc(sizeof(float) * (size_t)V);
    if (!lg) return moe_error(MOE_ERR_OOM, "generate: out of host memory");
    memcpy(out, prompt, sizeof(int32_t) * (size_t)n_prompt);
    moe_decode_state *ds = NULL;
    moe_status s = moe_decode_state_create(d, 1, n_prompt + n_new, &ds);
    for (int t = 0; s == MOE_OK && t < n_new; t++) {
        moe_step_reset();
        const int32_t *in = t == 0 ? prompt : out + n_prompt + t - 1;
        s = moe_decoder_feed(d, ds, 0, in, t == 0 ? n_prompt : 1, lg);
        if (s == MOE_OK) out[n_prompt + t] = argmax_allowed(lg, V, banned, n_banned);
    }
    moe_step_reset();
    moe_decode_state_free(ds);
    free(lg);
    return s;
}

/* ---- export ---- */

/* Entry e's values in the file's layout (W [rows, cols]) into w. */
static void gather_entry(const export_entry *e, float *w) {
    int64_t in = e->cols ? e->cols : 1;
    for (int64_t o = 0; o < e->rows; o++) {
        float *dst = w + o * in;
        if (e->d.transpose)
            for (int64_t i = 0; i < in; i++) dst[i] = e->d.dst[i * e->d.ld + e->d.col0 + o];
        else
            memcpy(dst, e->d.dst + o * e->d.ld + e->d.col0, sizeof(float) * (size_t)in);
    }
}

static void fill_entry(void *user, int i, float *w) { gather_entry(&((const loader *)user)->entries[i], w); }

/* The entries (f32, in walk order) as dir/model.safetensors. */
static moe_status write_model_file(loader *L, const char *path) {
    moe_st_out *t = calloc((size_t)L->n_entries + 1, sizeof *t);
    if (!t) return moe_error(MOE_ERR_OOM, "%s: out of host memory", path);
    for (int i = 0; i < L->n_entries; i++) {
        const export_entry *e = &L->entries[i];
        t[i] = (moe_st_out){.name = e->name, .ndim = e->cols ? 2 : 1, .shape = {e->rows, e->cols}};
    }
    moe_status s = moe_st_write_f32(path, t, L->n_entries, fill_entry, L);
    free(t);
    return s;
}

moe_status moe_hf_export(const moe_model *m, const char *model_type, const char *dir) {
    char *text = NULL, path[4096];
    moe_hf_info info;
    memset(&info, 0, sizeof info);
    const char *fam;
    MOE_TRY(moe_hf_config_format(&m->cfg, model_type, &text, &fam));
    snprintf(info.model_type, sizeof info.model_type, "%s", fam);
    snprintf(path, sizeof path, "%s/config.json", dir);
    moe_atomic_file af;
    moe_status s = moe_atomic_open(&af, path, "config.json export");
    if (s == MOE_OK) {
        bool ok = fputs(text, af.f) >= 0;
        s = moe_atomic_close(&af, ok, "config.json export");
    }
    free(text);
    MOE_TRY(s);
    loader L = {.dir = dir, .info = &info, .exporting = true};
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    s = load_all(&L, (moe_model *)m); /* the walk only reads the model when exporting */
    if (s == MOE_OK) s = write_model_file(&L, path);
    free(L.entries);
    return s;
}
