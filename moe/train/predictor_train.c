/* The routing-path predictor's training loop and its held-out report (predictor_train.h). */
#include "moe/train/predictor_train.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/autograd.h"
#include "core/memory.h"
#include "core/ops.h"
#include "optim/optim.h"
#include "optim/schedule.h"

moe_predictor_train_options moe_predictor_train_defaults(void) {
    return (moe_predictor_train_options){.steps = 2000, .batch = 256, .context = 3, .embed = 32, .hidden = 0,
                                         .lr = 3e-3, .weight_decay = 1.0, .holdout = 0.1, .context_dropout = 0.2,
                                         .seed = 1, .log_every = 200, .log = stderr};
}

/* splitmix64: the minibatch draws (their own stream, from the options' seed). */
static uint64_t next_rand(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* A minibatch: slots [B, C+1] of tokens drawn from [0, n_train), a share of them with a
 * shortened context, and the targets [B, Lm, E] (1/k on each routed expert). */
static void draw_batch(const moe_trace *t, int64_t n_train, const moe_predictor_train_options *o, uint64_t *rng,
                       int32_t *slots, float *target) {
    int lm = t->fp.n_moe_layers, E = t->fp.n_experts, k = t->fp.top_k, S = o->context + 1;
    memset(target, 0, sizeof *target * (size_t)o->batch * (size_t)(lm * E));
    for (int b = 0; b < o->batch; b++) {
        int64_t i = (int64_t)(next_rand(rng) % (uint64_t)n_train);
        int32_t *row = slots + (int64_t)b * S;
        moe_route_net_slots(o->context, t->tokens, t->pos, t->seq, i, 1, row);
        if (o->context > 0 && (double)(next_rand(rng) >> 11) * 0x1p-53 < o->context_dropout)
            for (int j = 1 + (int)(next_rand(rng) % (uint64_t)o->context); j < S; j++) row[j] = -1;
        for (int l = 0; l < lm; l++)
            for (int j = 0; j < k; j++)
                target[((int64_t)b * lm + l) * E + t->ids[((int64_t)l * t->n + i) * k + j]] = 1.0f / (float)k;
    }
}

/* The mean over tokens and layers of -sum_e target * log softmax(z) (a scalar on the tape). */
static moe_tensor *batch_loss(const moe_route_net *net, const int32_t *slots, const float *target, int B) {
    int64_t lm = net->shape.n_moe_layers, E = net->shape.n_experts;
    moe_tensor *z = moe_reshape(moe_route_net_forward(net, slots, B), 3, (int64_t[]){B, lm, E}); /* [B, Lm, E] */
    moe_tensor *y = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CPU, MOE_F32, 3, (int64_t[]){B, lm, E}, target);
    return moe_mul_scalar(moe_sum_all(moe_mul(moe_log_softmax(z), y)), -1.0 / ((double)B * (double)lm));
}

static moe_status train_loop(const moe_trace *t, int64_t n_train, const moe_predictor_train_options *o,
                             moe_route_net *net, double *final_loss) {
    moe_tensor *params[5];
    moe_route_net_params(net, params);
    moe_optim_config oc = moe_optim_config_default(MOE_OPTIM_ADAMW);
    oc.weight_decay = o->weight_decay;
    moe_optimizer *opt = moe_optimizer_create(params, 5, &oc);
    if (!opt) return moe_last_status();
    moe_lr_schedule sched = {.kind = MOE_LR_COSINE, .lr = o->lr, .min_lr = o->lr / 10, .warmup = o->steps / 20,
                             .total = o->steps};
    int S = o->context + 1, lm = t->fp.n_moe_layers, E = t->fp.n_experts;
    int32_t *slots = malloc(sizeof *slots * (size_t)o->batch * (size_t)S);
    float *target = malloc(sizeof *target * (size_t)o->batch * (size_t)(lm * E));
    moe_status s = slots && target ? MOE_OK : moe_error(MOE_ERR_OOM, "predictor training: out of host memory");
    uint64_t rng = o->seed;
    double tail = 0;
    int tail_n = 0, tail_from = o->steps - (o->steps < 50 ? o->steps : 50);
    for (int step = 0; s == MOE_OK && step < o->steps; step++) {
        draw_batch(t, n_train, o, &rng, slots, target);
        moe_tensor *loss = batch_loss(net, slots, target, o->batch);
        double v = loss ? moe_tensor_item(loss) : NAN;
        s = loss ? moe_backward_freeing(loss) : moe_last_status();
        if (s == MOE_OK) s = moe_optimizer_step(opt, moe_lr_at(&sched, step), 1.0);
        if (s == MOE_OK) s = moe_optimizer_zero_grad(opt);
        moe_step_reset();
        if (step >= tail_from) tail += v, tail_n++;
        if (s == MOE_OK && o->log && o->log_every > 0 && ((step + 1) % o->log_every == 0 || step == 0))
            fprintf(o->log, "predictor step %d/%d loss %.4f lr %.2e\n", step + 1, o->steps, v, moe_lr_at(&sched, step));
    }
    *final_loss = tail_n ? tail / tail_n : NAN;
    free(slots);
    free(target);
    moe_optimizer_free(opt);
    return s;
}

/* Recall of the net and of the token-identity baseline on tokens [split, n). */
static moe_status held_out_report(const moe_trace *t, int64_t split, const moe_route_net *net, moe_predictor_report *rep) {
    int lm = t->fp.n_moe_layers;
    int64_t n = t->n - split;
    float *scores = malloc(sizeof *scores * (size_t)(lm * n) * (size_t)t->fp.n_experts);
    rep->recall = calloc((size_t)lm, sizeof *rep->recall);
    rep->token_recall = calloc((size_t)lm, sizeof *rep->token_recall);
    if (!scores || !rep->recall || !rep->token_recall) {
        free(scores);
        return moe_error(MOE_ERR_OOM, "predictor report: out of host memory");
    }
    moe_status s = moe_route_net_score_trace(net, t, split, n, scores);
    if (s == MOE_OK) moe_trace_recall(t, split, n, scores, rep->recall);
    if (s == MOE_OK) s = moe_trace_token_freq_scores(t, split, split, n, scores);
    if (s == MOE_OK) moe_trace_recall(t, split, n, scores, rep->token_recall);
    free(scores);
    for (int l = 0; l < lm; l++) {
        rep->mean_recall += rep->recall[l] / lm;
        rep->mean_token_recall += rep->token_recall[l] / lm;
    }
    return s;
}

/* The largest hidden width up to 128 whose net fits 2% of the model's active parameters
 * (at least 16: a net whose embedding table alone passes the budget gets that). */
static int auto_hidden(const moe_trace *t, const moe_predictor_train_options *o) {
    double budget = 0.02 * (double)t->active_params, out = (double)t->fp.n_moe_layers * t->fp.n_experts;
    double fixed = (double)(t->fp.vocab + 1) * o->embed + out, per_unit = (double)(o->context + 1) * o->embed + 1 + out;
    double h = (budget - fixed) / per_unit;
    return h >= 128 ? 128 : h <= 16 ? 16 : (int)h;
}

moe_status moe_predictor_train(const moe_trace *t, const moe_predictor_train_options *o, moe_route_net *net,
                               moe_predictor_report *rep) {
    MOE_ASSERT(o->steps > 0 && o->batch > 0 && o->context >= 0 && o->context < 64, "predictor training: bad options");
    *rep = (moe_predictor_report){.n_moe_layers = t->fp.n_moe_layers,
                                  .chance = (double)t->fp.top_k / t->fp.n_experts};
    int64_t split;
    MOE_TRY(moe_trace_holdout_split(t, o->holdout, &split));
    rep->n_train = split, rep->n_held = t->n - split;
    moe_route_net_shape shape = {.vocab = t->fp.vocab, .context = o->context, .embed = o->embed,
                                 .hidden = o->hidden > 0 ? o->hidden : auto_hidden(t, o),
                                 .n_moe_layers = t->fp.n_moe_layers, .n_experts = t->fp.n_experts, .top_k = t->fp.top_k};
    MOE_TRY(moe_route_net_init(net, &shape, o->seed));
    moe_status s = train_loop(t, split, o, net, &rep->final_loss);
    if (s == MOE_OK) s = held_out_report(t, split, net, rep);
    if (s != MOE_OK) {
        moe_route_net_free(net);
        moe_predictor_report_free(rep);
    }
    return s;
}

void moe_predictor_report_free(moe_predictor_report *rep) {
    free(rep->recall);
    free(rep->token_recall);
    rep->recall = rep->token_recall = NULL;
}
