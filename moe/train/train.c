/* The training loop (see train.h). */
#include "moe/train/train.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/autograd.h"
#include "core/dist.h"
#include "core/fused.h"
#include "core/fileio.h"
#include "core/h5file.h"
#include "core/memory.h"
#include "core/ops.h"
#include "moe/train/checkpoint.h"
#include "moe/train/data.h"
#include "moe/train/grad_buckets.h"
#include "moe/train/mqar.h"
#include "moe/model/model.h"
#include "moe/train/signals.h"
#include "optim/optim.h"
#include "optim/schedule.h"


/* One evaluation batch of B x T rows: the cross-entropy, and with `recall` the hits and
 * scored targets of the argmax (one forward gives both). */
static moe_status eval_batch(moe_model *m, const int32_t *in, const int32_t *tg, int B, int T, bool recall, double *ce,
                             int64_t *hits, int64_t *scored) {
    if (!recall) {
        moe_loss_parts parts;
        MOE_TRY(moe_model_loss(m, in, tg, B, T, &parts));
        *ce = parts.ce;
        return MOE_OK;
    }
    moe_tensor *ids = moe_tensor_from_host(MOE_LIFE_STEP, m->dev, MOE_I32, 2, (int64_t[]){B, T}, in);
    moe_tensor *targets = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_I32, 1, (int64_t[]){(int64_t)B * T}, tg);
    moe_forward f = {.mode = MOE_FORWARD_TRAIN, .B = B, .T = T};
    moe_tensor *h = ids && targets ? moe_model_forward(m, ids, &f) : NULL; /* [B T, d] */
    moe_tensor *loss = moe_cross_entropy(h, moe_model_head(m), targets);
    if (!loss) return moe_last_status();
    *ce = moe_tensor_item(loss);
    return moe_recall_count(h, moe_model_head(m), tg, hits, scored);
}

moe_status moe_evaluate_full(moe_model *m, const moe_token_file *val, int batches, moe_eval_result *r) {
    /* Every rank takes its rows of each batch (the MoE exchange needs all ranks in step). */
    int W = moe_dist_world_size(), rank = moe_dist_world_rank();
    int B = m->cfg.data.batch_size, T = m->cfg.model.seq_len, Bl = B / W;
    bool recall = moe_data_has_mask(val);
    moe_eval_iter it;
    MOE_TRY(moe_eval_iter_init(&it, val, B, T, (uint64_t)batches));
    int32_t *in = malloc(sizeof(int32_t) * (size_t)B * (size_t)T), *tg = malloc(sizeof(int32_t) * (size_t)B * (size_t)T);
    if (!in || !tg) {
        free(in);
        free(tg);
        return moe_error(MOE_ERR_OOM, "evaluation: out of host memory");
    }
    bool was = moe_grad_set_enabled(false);
    double sum = 0;
    int64_t counts[2] = {0, 0}; /* recall hits, scored targets */
    int n = 0;
    moe_status s = MOE_OK;
    while (s == MOE_OK && moe_eval_iter_next(&it, rank, W, in, tg)) {
        moe_step_reset();
        double ce = 0;
        s = eval_batch(m, in, tg, Bl, T, recall, &ce, &counts[0], &counts[1]);
        if (s == MOE_OK) {
            sum += ce;
            n++;
        }
    }
    moe_grad_set_enabled(was);
    moe_step_reset();
    free(in);
    free(tg);
    MOE_TRY(moe_dist_check_all(s));
    if (n == 0) return moe_error(MOE_ERR_INVALID, "evaluation: the validation file %s is too short for one batch of %dx%d",
                                 moe_data_path(val), B, T);
    MOE_TRY(moe_dist_allreduce_f64(MOE_GROUP_WORLD, &sum, 1));
    if (recall) MOE_TRY(moe_dist_allreduce_i64(MOE_GROUP_WORLD, counts, 2));
    r->loss = sum / n / W;
    r->bpb = r->loss / log(2.0) / moe_data_bytes_per_token(val);
    r->scored = counts[1];
    r->recall = recall && counts[1] > 0 ? (double)counts[0] / (double)counts[1] : NAN;
    return MOE_OK;
}

moe_status moe_evaluate(moe_model *m, const moe_token_file *val, int batches, double *loss, double *bpb) {
    moe_eval_result r;
    MOE_TRY(moe_evaluate_full(m, val, batches, &r));
    *loss = r.loss;
    *bpb = r.bpb;
    return MOE_OK;
}

/* Latency balance: the first MoE layer's measured expert latencies and the token shares
 * they ask for (inverse latency, normalised), so a user sees what the balance aims at. */
static void print_latency(const moe_model *m) {
    const int E = m->cfg.model.n_experts;
    for (int i = 0; i < m->cfg.model.n_layers; i++) {
        if (m->blocks[i].dense) continue;
        const double *lat = m->blocks[i].moe.latency;
        double inv_sum = 0;
        for (int e = 0; e < E; e++) inv_sum += lat[e] > 0 ? 1.0 / lat[e] : 0;
        fprintf(stderr, "latency balance, layer %d: expert latency (us per token) / target share:", i);
        for (int e = 0; e < E; e++)
            fprintf(stderr, " %.3g/%.3f", 1e3 * lat[e], lat[e] > 0 && inv_sum > 0 ? 1.0 / lat[e] / inv_sum : 0);
        fputc('\n', stderr);
        return;
    }
}

/* Per-layer min/max share and coefficient of variation of the expert load. */
static void load_stats(const int64_t *load, int E, double *min_share, double *max_share, double *cv) {
    double tot = 0, mn = 1e30, mx = 0;
    for (int e = 0; e < E; e++) tot += (double)load[e];
    double mean = tot / E, var = 0;
    for (int e = 0; e < E; e++) {
        double sh = tot > 0 ? load[e] / tot : 0;
        mn = fmin(mn, sh);
        mx = fmax(mx, sh);
        var += ((double)load[e] - mean) * ((double)load[e] - mean) / E;
    }
    *min_share = mn;
    *max_share = mx;
    *cv = mean > 0 ? sqrt(var) / mean : 0;
}

typedef struct trainer {
    const moe_config *cfg;
    moe_model model;
    moe_optimizer *opt;
    moe_tensor **params;
    int n_params;
    moe_token_file *train, *val;
    moe_loader *loader;
    moe_train_state st;
    FILE *metrics;     /* rank 0 only */
    FILE *rank_log;    /* under MPI: RUN_DIR/rank-R.log, every rank's own step line */
    moe_grad_buckets grads;   /* the gradient buckets (none on one rank) */
    char dir[512];
    int world, rank;
} trainer;

/* True when every parameter is finite (a checkpoint of a diverged model is not written,
 * so the last good one survives). */
static moe_status params_finite(trainer *t, bool *finite) {
    moe_tensor *flag = moe_tensor_zeros(MOE_LIFE_STEP, t->model.dev, MOE_I32, 1, (int64_t[]){1});
    if (!flag) return moe_last_status();
    for (int i = 0; i < t->n_params; i++) MOE_TRY(moe_fused_nonfinite(t->params[i], flag));
    *finite = moe_tensor_item(flag) == 0;
    return MOE_OK;
}

static moe_status save_checkpoint(trainer *t, moe_train_summary *sum) {
    bool finite = true;
    MOE_TRY(moe_dist_check_all(params_finite(t, &finite)));
    int64_t bad = !finite; /* every rank decides the same: the save is collective */
    if (t->world > 1) MOE_TRY(moe_dist_allreduce_i64(MOE_GROUP_WORLD, &bad, 1));
    if (bad) {
        if (t->rank == 0)
            fprintf(stderr, "\nstep %lld: parameters are not finite; no checkpoint written (the last good one stays)\n",
                    (long long)t->st.step);
        return MOE_OK;
    }
    char path[640];
    snprintf(path, sizeof path, "%s/ckpt-%06lld.h5", t->dir, (long long)t->st.step);
    moe_loader_state ls = moe_loader_get_state(t->loader);
    t->st.loader_seed = ls.seed;
    t->st.loader_step = ls.step;
    MOE_TRY(moe_dist_check_all(moe_checkpoint_save(path, &t->model, t->opt, &t->st)));
    snprintf(sum->last_checkpoint, sizeof sum->last_checkpoint, "%s", path);
    /* clean-up: only this run's checkpoints, never the one just written */
    moe_h5_owner mine = {"run_id", t->st.run_id, strrchr(path, '/') + 1};
    if (t->rank == 0 && t->cfg->checkpoint.keep > 0)
        MOE_TRY(moe_h5_keep_last_owned(t->dir, "ckpt-", ".h5", t->cfg->checkpoint.keep, &mine));
    return MOE_OK;
}

static moe_status mkdir_p(const char *dir) {
    char buf[512];
    snprintf(buf, sizeof buf, "%s", dir);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return moe_error(MOE_ERR_IO, "cannot create directory %s: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST)
        return moe_error(MOE_ERR_IO, "cannot create the run directory %s: %s", buf, strerror(errno));
    return MOE_OK;
}

/* A fresh id for this run's checkpoints: 64 random bits in hex (time and pid when the
 * kernel has no randomness to give). */
static void new_run_id(char *id, size_t cap) {
    uint64_t r = 0;
    if (getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r)
        r = (uint64_t)time(NULL) * 6364136223846793005ull ^ (uint64_t)getpid();
    snprintf(id, cap, "%016llx", (unsigned long long)r);
}

static bool is_run_file(const char *name) {
    return strcmp(name, "metrics.jsonl") == 0 || (strncmp(name, "ckpt-", 5) == 0 && strstr(name, ".h5"));
}

/* How many files of a run (metrics.jsonl, ckpt-*.h5 and their temporary files) dir holds;
 * with `remove`, deletes them. */
static moe_status run_files(const char *dir, bool remove, int *count) {
    *count = 0;
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? MOE_OK : moe_error(MOE_ERR_IO, "cannot read the run directory %s: %s", dir, strerror(errno));
    moe_status s = MOE_OK;
    for (struct dirent *e; s == MOE_OK && (e = readdir(d));) {
        if (!is_run_file(e->d_name)) continue;
        ++*count;
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (remove && unlink(path) != 0 && errno != ENOENT)
            s = moe_error(MOE_ERR_IO, "--overwrite: cannot delete %s: %s", path, strerror(errno));
    }
    closedir(d);
    return s;
}

/* The run directory: --resume needs an existing one (and never creates it); a fresh run
 * refuses a directory that holds a run unless --overwrite, which deletes that run's
 * checkpoints and metrics.jsonl first. Rank 0 decides; every rank creates the directory. */
static moe_status open_run_dir(trainer *t, const moe_config *cfg, const moe_train_options *o) {
    const char *dir = o->resume_dir ? o->resume_dir : cfg->checkpoint.dir;
    if (!dir[0])
        return moe_error(MOE_ERR_CONFIG, o->resume_dir ? "--resume needs a run directory"
                         : "checkpoint.dir is empty: set it to the run directory (checkpoints and metrics.jsonl go there)");
    if (strlen(dir) + 32 > sizeof t->dir) return moe_error(MOE_ERR_CONFIG, "the run directory name %s is too long", dir);
    snprintf(t->dir, sizeof t->dir, "%s", dir);
    if (o->resume_dir) {
        struct stat sb;
        if (stat(dir, &sb) != 0) return moe_error(MOE_ERR_IO, "--resume %s: %s (nothing to resume)", dir, strerror(errno));
        if (!S_ISDIR(sb.st_mode)) return moe_error(MOE_ERR_IO, "--resume %s: not a directory (give the run directory)", dir);
        return MOE_OK;
    }
    int n = 0;
    if (t->rank == 0) MOE_TRY(run_files(dir, o->overwrite, &n));
    if (n > 0 && !o->overwrite)
        return moe_error(MOE_ERR_INVALID, "the run directory %s already holds a run (metrics.jsonl or ckpt-*.h5); "
                         "continue it with --resume %s, or start over with --overwrite (deletes its checkpoints and "
                         "metrics.jsonl)", dir, dir);
    if (n > 0) fprintf(stderr, "--overwrite: deleted %d file(s) of the earlier run in %s\n", n, dir);
    return mkdir_p(dir);
}

/* The "step" of a metrics.jsonl line, or -1. */
static int64_t line_step(const char *line) {
    const char *p = strstr(line, "\"step\":");
    return p ? strtoll(p + 7, NULL, 10) : -1;
}

/* On resume from step `step`: lines of later steps in metrics.jsonl (written after that
 * checkpoint by a run that did not save again) move to metrics-discarded.jsonl, so
 * metrics.jsonl keeps one line per step of the run as it continues. */
static moe_status trim_metrics(const char *dir, int64_t step) {
    char path[1024], tmp[1100], gone[1024], line[65536];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    snprintf(gone, sizeof gone, "%s/metrics-discarded.jsonl", dir);
    FILE *in = fopen(path, "r");
    if (!in) return MOE_OK;
    FILE *out = fopen(tmp, "w"), *drop = NULL;
    int moved = 0;
    moe_status s = out ? MOE_OK : moe_error(MOE_ERR_IO, "cannot write %s: %s", tmp, strerror(errno));
    while (s == MOE_OK && fgets(line, sizeof line, in)) {
        bool later = line_step(line) > step;
        if (later && !drop && !(drop = fopen(gone, "a"))) s = moe_error(MOE_ERR_IO, "cannot write %s: %s", gone, strerror(errno));
        else if (fputs(line, later ? drop : out) < 0) s = moe_error(MOE_ERR_IO, "cannot write %s: %s", later ? gone : tmp, strerror(errno));
        moved += later;
    }
    fclose(in);
    if (drop && fclose(drop) != 0 && s == MOE_OK) s = moe_error(MOE_ERR_IO, "cannot write %s: %s", gone, strerror(errno));
    if (out && fclose(out) != 0 && s == MOE_OK) s = moe_error(MOE_ERR_IO, "cannot write %s: %s", tmp, strerror(errno));
    if (s == MOE_OK && moved && rename(tmp, path) != 0) s = moe_error(MOE_ERR_IO, "cannot replace %s: %s", path, strerror(errno));
    if (!moved || s != MOE_OK) unlink(tmp);
    if (s == MOE_OK && moved)
        fprintf(stderr, "metrics.jsonl: %d line(s) after step %lld moved to %s\n", moved, (long long)step, gone);
    return s;
}

/* Every input checked before the first step: the token files exist, hold ids the model's
 * vocabulary covers, and are long enough for a training batch and an evaluation batch. */
static moe_status check_inputs(trainer *t, const moe_config *cfg) {
    if (cfg->train.steps < 1)
        return moe_error(MOE_ERR_CONFIG, "train.steps=%d: nothing to train (set it to at least 1)", cfg->train.steps);
    MOE_TRY(moe_data_open(cfg->data.train_path, &t->train));
    MOE_TRY(moe_data_open(cfg->data.val_path, &t->val));
    const moe_token_file *files[2] = {t->train, t->val};
    for (int i = 0; i < 2; i++)
        if (moe_data_vocab(files[i]) > cfg->model.vocab_size)
            return moe_error(MOE_ERR_CONFIG, "%s holds token ids of a vocabulary of %d, beyond model.vocab_size=%d; "
                             "prepare it with the model's tokenizer or raise model.vocab_size", moe_data_path(files[i]),
                             moe_data_vocab(files[i]), cfg->model.vocab_size);
    moe_eval_iter probe;
    return moe_eval_iter_init(&probe, t->val, cfg->data.batch_size, cfg->model.seq_len, 1);
}

/* --resume: the newest checkpoint that passes verification (newer damaged ones are
 * skipped with a warning naming them), loaded with the loader position. */
static moe_status resume(trainer *t, const moe_config *cfg) {
    char path[640];
    MOE_TRY(moe_checkpoint_find_latest(t->dir, path, sizeof path));
    MOE_TRY(moe_checkpoint_load(path, &t->model, t->opt, &t->st));
    if (t->st.step >= cfg->train.steps)
        return moe_error(MOE_ERR_CONFIG, "%s is at step %lld and train.steps=%d: nothing left to train; raise "
                         "train.steps to continue", path, (long long)t->st.step, cfg->train.steps);
    moe_loader_set_state(t->loader, (moe_loader_state){t->st.loader_seed, t->st.loader_step});
    if (!t->st.run_id[0]) new_run_id(t->st.run_id, sizeof t->st.run_id); /* written before run ids */
    if (t->rank == 0) fprintf(stderr, "resumed from %s at step %lld\n", path, (long long)t->st.step);
    return t->rank == 0 ? trim_metrics(t->dir, t->st.step) : MOE_OK;
}

static moe_status trainer_open(trainer *t, const moe_config *cfg, const moe_train_options *o) {
    memset(t, 0, sizeof *t);
    t->cfg = cfg;
    t->world = moe_dist_world_size();
    t->rank = moe_dist_world_rank();
    int ep = moe_dist_ep_size();
    if (ep != cfg->parallel.expert_parallel)
        return moe_error(MOE_ERR_CONFIG, "parallel.expert_parallel=%d but the process groups were built for %d",
                         cfg->parallel.expert_parallel, ep);
    if (cfg->data.batch_size % (t->world * cfg->train.grad_accum))
        return moe_error(MOE_ERR_CONFIG, "data.batch_size=%d must be divisible by the world size %d times train.grad_accum=%d",
                         cfg->data.batch_size, t->world, cfg->train.grad_accum);
    MOE_TRY(check_inputs(t, cfg));
    MOE_TRY(open_run_dir(t, cfg, o));
    MOE_TRY(moe_model_init(&t->model, cfg, moe_dist_ep_rank(), ep));
    if (cfg->router.balance == MOE_CFG_BALANCE_LATENCY) MOE_TRY(moe_model_measure_latency(&t->model));
    t->params = moe_model_param_tensors(&t->model, &t->n_params);
    moe_optim_config oc = moe_optim_config_default(cfg->train.optimizer == MOE_CFG_OPTIMIZER_SGD ? MOE_OPTIM_SGD : MOE_OPTIM_ADAMW);
    oc.beta1 = cfg->train.beta1;
    oc.beta2 = cfg->train.beta2;
    oc.eps = cfg->train.eps;
    oc.weight_decay = cfg->train.weight_decay;
    oc.momentum = cfg->train.momentum;
    t->opt = moe_optimizer_create(t->params, t->n_params, &oc);
    if (!t->opt) return moe_last_status();
    MOE_TRY(moe_loader_create(t->train, (uint64_t)cfg->train.seed, cfg->data.batch_size, cfg->model.seq_len, &t->loader));
    if (o->resume_dir) MOE_TRY(resume(t, cfg));
    else {
        new_run_id(t->st.run_id, sizeof t->st.run_id);
        moe_train_state ignored; /* a fresh run from another model's weights: its own step 0 */
        if (o->init_weights) MOE_TRY(moe_checkpoint_load(o->init_weights, &t->model, NULL, &ignored));
    }
    MOE_TRY(moe_grad_buckets_init(&t->grads, &t->model));
    if (t->world > 1) MOE_TRY(moe_dist_prepare(t->model.dev));
    if (t->world > 1 && !(t->rank_log = moe_dist_log_file(t->dir))) return moe_last_status();
    if (t->rank != 0) return MOE_OK;
    char mpath[640];
    snprintf(mpath, sizeof mpath, "%s/metrics.jsonl", t->dir);
    t->metrics = fopen(mpath, "a"); /* appended on resume, never truncated */
    if (!t->metrics) return moe_error(MOE_ERR_IO, "cannot write %s: %s", mpath, strerror(errno));
    return MOE_OK;
}

static void trainer_close(trainer *t) {
    if (t->metrics) fclose(t->metrics);
    if (t->rank_log) fclose(t->rank_log);
    moe_optimizer_free(t->opt);
    free(t->params);
    moe_model_free(&t->model); /* with the grads, views into the buckets */
    moe_grad_buckets_free(&t->grads);
    moe_loader_free(t->loader);
    moe_data_close(t->train);
    moe_data_close(t->val);
    moe_step_reset();
}

/* Global grad norm of the mean gradient: dense grads are equal on all ranks after the
 * all-reduce (counted once), each expert lives once per EP group. */
static moe_status clip_scale(trainer *t, double max_norm, double *norm, double *scale) {
    int n = t->model.n_params, nd = 0, ne = 0;
    moe_tensor **dense = malloc(sizeof *dense * (size_t)n), **expert = malloc(sizeof *expert * (size_t)n);
    if (!dense || !expert) {
        free(dense);
        free(expert);
        return moe_error(MOE_ERR_OOM, "clipping: out of host memory");
    }
    for (int i = 0; i < n; i++) {
        if (t->model.params[i].expert_stack) expert[ne++] = t->model.params[i].t;
        else dense[nd++] = t->model.params[i].t;
    }
    double sd = 0, se = 0;
    moe_status s = moe_grad_sumsq_local(dense, nd, &sd);
    if (s == MOE_OK) s = moe_grad_sumsq_local(expert, ne, &se);
    free(dense);
    free(expert);
    MOE_TRY(s);
    MOE_TRY(moe_dist_allreduce_f64(MOE_GROUP_EP, &se, 1));
    double w = (double)t->world;
    return moe_clip_grad_finish((sd + se) / (w * w), max_norm, norm, scale);
}

static void write_metrics(trainer *t, const char *fmt_extra, double loss, double aux, double z, double lr, double gnorm,
                          double tps, const int64_t *load) {
    const moe_cfg_model *c = &t->cfg->model;
    FILE *f = t->metrics;
    if (!f) return;
    fprintf(f, "{\"step\":%lld,\"loss\":%.6f,\"aux_loss\":%.6g,\"z_loss\":%.6g,\"lr\":%.6g,\"grad_norm\":%.6g,"
               "\"tokens_per_s\":%.1f,\"step_mem_peak\":%zu%s",
            (long long)t->st.step, loss, aux, z, lr, gnorm, tps, moe_mem_get_stats(t->model.dev).step_peak, fmt_extra);
    if (load) {
        fputs(",\"expert_load\":[", f);
        bool first = true;
        for (int i = 0; i < c->n_layers; i++) {
            if (t->model.blocks[i].dense) continue;
            double tot = 0;
            for (int e = 0; e < c->n_experts; e++) tot += (double)load[i * c->n_experts + e];
            fprintf(f, "%s[", first ? "" : ",");
            first = false;
            for (int e = 0; e < c->n_experts; e++) fprintf(f, "%s%.4f", e ? "," : "", tot > 0 ? load[i * c->n_experts + e] / tot : 0);
            fputc(']', f);
        }
        fputc(']', f);
    }
    fputs("}\n", f);
    fflush(f);
}

/* MOE_DIST_TIMING=1: the step time and the part of it spent communicating, summed over
 * the steps of this run after its first (warm-up: NCCL setup, first allocations). */
typedef struct step_timing {
    int64_t steps;
    double step_ms, alltoall_ms, wait_ms;
} step_timing;

/* Adds the step that took step_ms, with the communication counted since it began. */
static void step_timing_add(step_timing *tm, double step_ms) {
    moe_dist_stats ds = moe_dist_get_stats();
    tm->steps++;
    tm->step_ms += step_ms;
    tm->alltoall_ms += ds.alltoall_ms;
    tm->wait_ms += ds.reduce_wait_ms;
}

/* Collective: rank 0 prints the means over ranks, e.g. for scripts/scale-gpu.sh. */
static moe_status step_timing_report(const trainer *t, const step_timing *tm, double tokens_per_step) {
    double v[3] = {tm->step_ms, tm->alltoall_ms, tm->wait_ms};
    MOE_TRY(moe_dist_allreduce_f64(MOE_GROUP_WORLD, v, 3));
    if (t->rank != 0 || tm->steps == 0) return MOE_OK;
    double n = (double)tm->steps * t->world, step = v[0] / n, a2a = v[1] / n, wait = v[2] / n;
    fprintf(stderr, "timing: %lld steps after the first, mean of %d rank(s): step %.2f ms, %.0f tokens/s per rank, "
            "all-to-all %.2f ms (%.1f%% of the step), gradient all-reduce not hidden %.2f ms (%.1f%%)\n",
            (long long)tm->steps, t->world, step, tokens_per_step / t->world / (step / 1e3), a2a, 100 * a2a / step,
            wait, 100 * wait / step);
    return MOE_OK;
}

/* train.threads, at most 4 per core (more only slows every step down), with a warning. */
static int capped_threads(int asked) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (cores < 1 || asked <= 4 * cores) return asked;
    if (moe_dist_world_rank() == 0)
        fprintf(stderr, "warning: train.threads=%d on %ld cores; using %ld (4 per core at most)\n", asked, cores, 4 * cores);
    return (int)(4 * cores);
}

static const char *signal_name(int sig) {
    return sig == SIGINT ? "INT" : sig == SIGTERM ? "TERM" : sig == SIGHUP ? "HUP" : "a signal";
}

/* The signals the ranks have seen, agreed on at a step boundary so that every rank acts
 * at the same step: the stop signal (0: go on; SIGINT before SIGTERM before SIGHUP when
 * ranks saw different ones) and whether a checkpoint was asked for (SIGUSR1). */
static moe_status poll_signals(const trainer *t, moe_signal_watch *w, int *stop_sig, bool *checkpoint) {
    int sig = moe_signal_watch_stop_signal(w);
    int64_t v[4] = {sig == SIGINT, sig == SIGTERM, sig == SIGHUP, moe_signal_watch_take_checkpoint(w)};
    if (t->world > 1) MOE_TRY(moe_dist_allreduce_i64(MOE_GROUP_WORLD, v, 4));
    *stop_sig = v[0] ? SIGINT : v[1] ? SIGTERM : v[2] ? SIGHUP : 0;
    *checkpoint = v[3] > 0;
    return MOE_OK;
}

/* At a step boundary: a stop signal saves and ends the run (MOE_ERR_INTERRUPTED, the
 * signal in sum->stop_signal); SIGUSR1 saves and training goes on. */
static moe_status act_on_signals(trainer *t, moe_signal_watch *w, moe_train_summary *sum) {
    int sig = 0;
    bool ask_checkpoint = false;
    MOE_TRY(poll_signals(t, w, &sig, &ask_checkpoint));
    if (!sig && !ask_checkpoint) return MOE_OK;
    if (t->rank == 0)
        fprintf(stderr, "\nSIG%s: saving a checkpoint at step %lld\n", sig ? signal_name(sig) : "USR1", (long long)t->st.step);
    MOE_TRY(save_checkpoint(t, sum));
    if (!sig) return MOE_OK;
    sum->stop_signal = sig;
    return moe_error(MOE_ERR_INTERRUPTED, "training stopped by SIG%s at step %lld; resume with --resume %s",
                     signal_name(sig), (long long)t->st.step, t->dir);
}

/* A failure every rank saw (forward, backward, evaluation) with the training state
 * intact: save first, then stop with the failure's message. mid_step: the failing step's
 * batch was drawn, so the loader goes back to `step_start` and the grads are dropped. */
static moe_status save_then_fail(trainer *t, moe_train_summary *sum, moe_status failure, bool mid_step,
                                 moe_loader_state step_start) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", moe_last_error());
    if (mid_step) {
        moe_loader_set_state(t->loader, step_start);
        moe_optimizer_zero_grad(t->opt);
    }
    moe_step_reset();
    moe_status saved = save_checkpoint(t, sum);
    if (saved == MOE_OK)
        return moe_error(failure, "%s (a checkpoint of step %lld was saved first: %s)", msg, (long long)t->st.step,
                         sum->last_checkpoint);
    return moe_error(failure, "%s (saving a checkpoint failed too: %s)", msg, moe_last_error());
}

/* The loop's state over the whole run: the batch buffers, the schedule, the clock and
 * the counters behind the progress line and the summary, and how to stop after a failure. */
typedef struct run_state {
    int32_t *in, *tg;      /* this rank's rows of the batch: inputs and targets */
    int64_t *load;         /* [n_layers * n_experts] tokens per expert in the current step */
    size_t tokens_per_step; /* B x T, over all ranks */
    moe_lr_schedule sched;
    step_timing timing;
    int64_t steps_run;     /* good steps of this run (the timing leaves out the first) */
    double t_start, tokens_done, last_loss;
    int consecutive_bad;   /* skipped steps in a row */
    bool quiet, tty;       /* no progress lines (options or rank > 0); stderr is a terminal */
    bool save_first, mid_step; /* how to stop after a failure that every rank saw (see save_then_fail) */
    moe_loader_state step_start; /* the loader before the current step's batch */
} run_state;

/* One step's values: the loss parts (means over the micro-batches, and over the ranks
 * once reduce_step_values ran), the expert load, the lr, grad norm and throughput. */
typedef struct step_values {
    double loss, aux, z;
    double local_loss;     /* this rank's loss, before the reduction */
    bool bad;              /* the loss or the gradient is not finite: the step is skipped */
    int64_t *load;         /* run_state.load */
    double lr, grad_norm, tokens_per_s;
} step_values;

/* Rank 0's start-up lines: the world, the model and the latency balance. */
static void print_banner(const trainer *t, const moe_train_options *o) {
    const moe_cfg_model *mc = &t->cfg->model;
    if (t->rank == 0 && !o->quiet)
        fprintf(stderr, "world: %d rank(s), expert parallel %d, data parallel %d\n", t->world, moe_dist_ep_size(), moe_dist_dp_size());
    if (t->rank == 0)
        fprintf(stderr, "model: %.2fM parameters (%lld; %.2fM active per token), %d layers, %d experts top-%d, on %s %s\n",
                moe_model_param_count(&t->model, false) / 1e6, (long long)moe_model_param_count(&t->model, false),
                moe_model_param_count(&t->model, true) / 1e6, mc->n_layers, mc->n_experts, mc->top_k,
                moe_device_name(t->model.dev), moe_dtype_name(t->model.compute));
    if (t->rank == 0 && !o->quiet && t->cfg->router.balance == MOE_CFG_BALANCE_LATENCY) print_latency(&t->model);
}

/* Before the first step: the batch buffers, the start-up lines, the schedule and the clock
 * (MOE_ERR_OOM when a buffer cannot be had). */
static moe_status run_begin(trainer *t, const moe_train_options *o, run_state *r, moe_train_summary *sum) {
    const moe_cfg_train *tc = &t->cfg->train;
    const moe_cfg_model *mc = &t->cfg->model;
    memset(r, 0, sizeof *r);
    r->tokens_per_step = (size_t)t->cfg->data.batch_size * (size_t)mc->seq_len;
    r->in = malloc(sizeof(int32_t) * r->tokens_per_step);
    r->tg = malloc(sizeof(int32_t) * r->tokens_per_step);
    r->load = calloc((size_t)(mc->n_layers * mc->n_experts), sizeof(int64_t));
    if (!r->in || !r->tg || !r->load)
        return moe_error(MOE_ERR_OOM, "train: out of host memory for a batch of %zu tokens", r->tokens_per_step);
    sum->unigram_bpb = moe_data_unigram_bpb(t->val);
    print_banner(t, o);
    r->sched = (moe_lr_schedule){tc->schedule == MOE_CFG_SCHEDULE_COSINE ? MOE_LR_COSINE : MOE_LR_CONSTANT, tc->lr,
                                 tc->min_lr, tc->warmup, tc->steps > tc->warmup ? tc->steps : tc->warmup};
    r->quiet = o->quiet || t->rank != 0;
    r->tty = isatty(STDERR_FILENO) && !r->quiet;
    r->t_start = moe_clock_ms() / 1e3;
    r->last_loss = NAN;
    moe_mem_reset_peaks(t->model.dev);
    return MOE_OK;
}

/* Forward and backward over the step's A micro-batches of this rank's B / world rows: the
 * loss parts and the expert load into v, the gradients into the buckets. The buckets'
 * reduction starts on every rank whatever happened, and the status is agreed by all ranks. */
static moe_status forward_backward(trainer *t, const moe_train_options *o, const run_state *r, step_values *v) {
    const moe_cfg_model *mc = &t->cfg->model;
    const int A = t->cfg->train.grad_accum, T = mc->seq_len, Bm = t->cfg->data.batch_size / t->world / A;
    memset(v->load, 0, sizeof(int64_t) * (size_t)(mc->n_layers * mc->n_experts));
    moe_status s = MOE_OK;
    moe_grad_buckets_begin(&t->grads);
    for (int a = 0; a < A && s == MOE_OK; a++) {
        moe_step_reset();
        moe_loss_parts parts;
        s = moe_model_loss(&t->model, r->in + (size_t)a * Bm * T, r->tg + (size_t)a * Bm * T, Bm, T, &parts);
        if (s != MOE_OK) break;
        double lv = parts.ce + parts.aux + parts.z; /* already on the host: no extra device read */
        v->bad |= !isfinite(lv);
        v->loss += lv / A;
        v->aux += parts.aux / A;
        v->z += parts.z / A;
        for (int i = 0; i < mc->n_layers * mc->n_experts; i++) v->load[i] += parts.load[i];
        /* The backward runs even after a non-finite loss: under expert parallelism it
         * exchanges tokens with the other ranks, which must all take part. */
        if (a == A - 1 && moe_grad_buckets_overlap()) moe_set_grad_ready_hook(moe_grad_buckets_ready, &t->grads);
        s = moe_backward_freeing(A > 1 ? moe_mul_scalar(parts.loss, 1.0 / A) : parts.loss);
        moe_set_grad_ready_hook(NULL, NULL);
    }
    moe_grad_buckets_start(&t->grads, true); /* on every rank, whatever happened: the collectives stay matched */
    if (s == MOE_OK && t->grads.status != MOE_OK) s = moe_error(t->grads.status, "%s", t->grads.msg);
    if (s == MOE_OK && o->fail_at_step > 0 && t->st.step + 1 == o->fail_at_step)
        s = moe_error(MOE_ERR_DEVICE, "step %lld failed (moe_train_options.fail_at_step)", (long long)o->fail_at_step);
    return moe_dist_check_all(s);
}

/* Under MPI: the global mean loss parts and the total expert load; a NaN anywhere makes
 * the sum NaN, so every rank sees the same `bad`. */
static moe_status reduce_step_values(const trainer *t, step_values *v) {
    double sums[3] = {v->loss, v->aux, v->z};
    moe_status s = moe_dist_allreduce_f64(MOE_GROUP_WORLD, sums, 3);
    if (s == MOE_OK) s = moe_dist_allreduce_i64(MOE_GROUP_WORLD, v->load, t->cfg->model.n_layers * t->cfg->model.n_experts);
    v->loss = sums[0] / t->world;
    v->aux = sums[1] / t->world;
    v->z = sums[2] / t->world;
    v->bad = !isfinite(v->loss);
    return s;
}

/* A step with a non-finite loss or gradient: no update, a "skipped" metrics line, and a
 * failure once train.max_bad_steps come in a row. */
static moe_status skip_bad_step(trainer *t, run_state *r, const moe_train_summary *sum) {
    const int max_bad_steps = t->cfg->train.max_bad_steps;
    t->st.bad_steps++;
    r->consecutive_bad++;
    if (t->rank == 0) {
        fprintf(stderr, "\nstep %lld: non-finite loss or gradient, step skipped (%d in a row, %lld in all)\n",
                (long long)t->st.step, r->consecutive_bad, (long long)t->st.bad_steps);
        fprintf(t->metrics, "{\"step\":%lld,\"skipped\":true,\"bad_steps\":%lld}\n", (long long)t->st.step,
                (long long)t->st.bad_steps);
    }
    moe_status s = moe_optimizer_zero_grad(t->opt);
    if (s == MOE_OK && r->consecutive_bad >= max_bad_steps)
        s = moe_error(MOE_ERR_NUMERIC, "%d steps in a row had a non-finite loss or gradient (train.max_bad_steps=%d); %s%s",
                      r->consecutive_bad, max_bad_steps,
                      sum->last_checkpoint[0] ? "the last good checkpoint is " : "no checkpoint was written yet",
                      sum->last_checkpoint);
    t->st.step++;
    return s;
}

/* The evaluation after a step (collective): the results into the summary, and as
 * metrics.jsonl fields into `extra`. */
static moe_status evaluate_step(trainer *t, moe_train_summary *sum, char *extra, size_t cap) {
    moe_eval_result ev;
    MOE_TRY(moe_evaluate_full(&t->model, t->val, t->cfg->train.eval_batches, &ev));
    sum->val_loss = ev.loss;
    sum->val_bpb = ev.bpb;
    sum->val_recall = ev.recall;
    int at = snprintf(extra, cap, ",\"val_loss\":%.6f,\"val_bpb\":%.6f", ev.loss, ev.bpb);
    if (!isnan(ev.recall)) snprintf(extra + at, cap - (size_t)at, ",\"val_recall\":%.6f", ev.recall);
    return MOE_OK;
}

/* Over the MoE layers: the smallest and the largest expert share and the largest
 * coefficient of variation of the load. */
static void load_range(const trainer *t, const int64_t *load, double *min_share, double *max_share, double *max_cv) {
    const int E = t->cfg->model.n_experts;
    *min_share = 1;
    *max_share = 0;
    *max_cv = 0;
    for (int i = 0; i < t->cfg->model.n_layers; i++) {
        if (t->model.blocks[i].dense) continue;
        double layer_min, layer_max, layer_cv;
        load_stats(load + i * E, E, &layer_min, &layer_max, &layer_cv);
        *min_share = fmin(*min_share, layer_min);
        *max_share = fmax(*max_share, layer_max);
        *max_cv = fmax(*max_cv, layer_cv);
    }
}

/* The progress line on stderr (rewritten in place on a terminal), and after an
 * evaluation its results and the memory in use. */
static void print_progress(const trainer *t, const run_state *r, const moe_train_summary *sum, const step_values *v,
                           bool evaluated) {
    const moe_cfg_train *tc = &t->cfg->train;
    double min_share, max_share, max_cv;
    load_range(t, v->load, &min_share, &max_share, &max_cv);
    double elapsed = (moe_clock_ms() / 1e3) - r->t_start,
           eta = elapsed / r->tokens_done * (double)r->tokens_per_step * (tc->steps - t->st.step);
    fprintf(stderr, "%sstep %5lld/%d  loss %.4f  aux %.4f  lr %.2e  |g| %.3f  %.0f tok/s  load %.2f..%.2f cv %.2f  eta %.0fs%s%s",
            r->tty ? "\r" : "", (long long)t->st.step, tc->steps, v->loss, v->aux, v->lr, v->grad_norm, v->tokens_per_s,
            min_share, max_share, max_cv, eta, evaluated ? "" : "   ", (evaluated || !r->tty) ? "\n" : "");
    if (!evaluated) return;
    fprintf(stderr, "  eval: val_loss %.4f  val_bpb %.4f  (unigram baseline %.4f bpb)", sum->val_loss, sum->val_bpb,
            sum->unigram_bpb);
    if (!isnan(sum->val_recall)) fprintf(stderr, "  recall %.4f", sum->val_recall);
    fputc('\n', stderr);
    const moe_mem_stats ms = moe_mem_get_stats(t->model.dev);
    fprintf(stderr, "  memory on %s: step arena peak %.2f GiB, persistent %.2f GiB (weights, grads, "
            "optimizer state)\n", moe_device_name(t->model.dev), (double)ms.step_peak / (1 << 30),
            (double)ms.persist_bytes / (1 << 30));
}

/* After a good step: the evaluation when one is due (its failure saves first), then at
 * train.log_every, evaluations and the last step, the metrics, rank log and progress lines. */
static moe_status report_step(trainer *t, run_state *r, moe_train_summary *sum, const step_values *v) {
    const moe_cfg_train *tc = &t->cfg->train;
    bool do_eval = (tc->eval_every > 0 && t->st.step % tc->eval_every == 0) || t->st.step == tc->steps;
    char extra[160] = "";
    if (do_eval) {
        moe_status s = evaluate_step(t, sum, extra, sizeof extra);
        if (s != MOE_OK) {
            r->save_first = true; /* moe_evaluate fails on every rank together */
            return s;
        }
    }
    if (!(t->st.step % tc->log_every == 0 || do_eval || t->st.step == tc->steps)) return MOE_OK;
    write_metrics(t, extra, v->loss, v->aux, v->z, v->lr, v->grad_norm, v->tokens_per_s, v->load);
    if (t->rank_log)
        fprintf(t->rank_log, "step %lld local loss %.6f global loss %.6f tokens/s %.0f\n", (long long)t->st.step,
                v->local_loss, v->loss, v->tokens_per_s);
    if (!r->quiet) print_progress(t, r, sum, v, do_eval);
    return MOE_OK;
}

/* One training step: forward and backward, the sums over the ranks, then the update (or
 * a skipped step), the report and the periodic checkpoint. */
static moe_status train_step(trainer *t, const moe_train_options *o, run_state *r, moe_train_summary *sum) {
    const moe_cfg_train *tc = &t->cfg->train;
    double t0 = (moe_clock_ms() / 1e3);
    moe_dist_reset_stats();
    step_values v = {.load = r->load, .lr = moe_lr_at(&r->sched, t->st.step)};
    r->step_start = moe_loader_get_state(t->loader);
    moe_loader_next(t->loader, t->rank, t->world, r->in, r->tg);
    t->model.dropout_counter = (uint64_t)t->st.step << 48; /* masks and noise depend on the step: exact resume */
    moe_status s = forward_backward(t, o, r, &v);
    r->save_first = r->mid_step = s != MOE_OK; /* every rank failed here together */
    v.local_loss = v.loss;
    if (s == MOE_OK && t->world > 1) s = reduce_step_values(t, &v);
    moe_status ws = moe_grad_buckets_finish(&t->grads); /* the summed grads, before the clip reads them */
    if (s == MOE_OK) s = ws;
    MOE_TRY(s);
    double scale = 1;
    if (!v.bad) {
        moe_status cs = clip_scale(t, tc->grad_clip, &v.grad_norm, &scale);
        if (cs == MOE_ERR_NUMERIC) v.bad = true;
        else MOE_TRY(cs);
    }
    if (v.bad) return skip_bad_step(t, r, sum);
    r->consecutive_bad = 0;
    s = moe_optimizer_step(t->opt, v.lr, scale / t->world);
    if (s == MOE_OK) s = moe_optimizer_zero_grad(t->opt);
    if (s == MOE_OK) s = moe_model_update_router_bias(&t->model, v.load);
    MOE_TRY(s);
    t->st.step++;
    r->last_loss = v.loss;
    double dt = (moe_clock_ms() / 1e3) - t0;
    if (r->steps_run++ > 0) step_timing_add(&r->timing, dt * 1e3);
    r->tokens_done += (double)r->tokens_per_step;
    v.tokens_per_s = r->tokens_per_step / dt;
    MOE_TRY(report_step(t, r, sum, &v));
    if (t->cfg->checkpoint.every > 0 && t->st.step % t->cfg->checkpoint.every == 0 && t->st.step < tc->steps)
        return save_checkpoint(t, sum);
    return MOE_OK;
}

/* What the run did, for the caller. */
static void fill_summary(const trainer *t, const run_state *r, moe_train_summary *sum) {
    sum->steps_done = t->st.step;
    sum->final_loss = r->last_loss;
    sum->bad_steps = t->st.bad_steps;
    sum->tokens_per_s = r->tokens_done / ((moe_clock_ms() / 1e3) - r->t_start);
    sum->step_mem_peak = moe_mem_get_stats(t->model.dev).step_peak;
}

moe_status moe_train_run(const moe_config *cfg, const moe_train_options *o, moe_train_summary *sum) {
    memset(sum, 0, sizeof *sum);
    sum->val_recall = NAN;
    trainer t;
    if (cfg->train.threads > 0) omp_set_num_threads(capped_threads(cfg->train.threads));
    moe_status s = moe_dist_check_all(trainer_open(&t, cfg, o));
    if (s != MOE_OK) {
        trainer_close(&t);
        return s;
    }
    run_state r;
    s = moe_dist_check_all(run_begin(&t, o, &r, sum)); /* every rank starts, or none */
    while (s == MOE_OK && t.st.step < cfg->train.steps) {
        if (o->stop_after > 0 && t.st.step >= o->stop_after) break;
        if ((s = act_on_signals(&t, o->signals, sum)) != MOE_OK) break;
        s = train_step(&t, o, &r, sum);
    }
    if (s != MOE_OK && r.save_first) s = save_then_fail(&t, sum, s, r.mid_step, r.step_start);
    if (s == MOE_OK && moe_dist_timing()) s = step_timing_report(&t, &r.timing, (double)r.tokens_per_step);
    if (s == MOE_OK) s = save_checkpoint(&t, sum);
    fill_summary(&t, &r, sum);
    free(r.in);
    free(r.tg);
    free(r.load);
    trainer_close(&t);
    return s;
}
