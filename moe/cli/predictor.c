/* `moe predictor train|eval`: trains the routing-path predictor on a trace and reports its
 * per-layer recall beside chance and the token-identity baseline, its size and run time
 * against the model's, and the experts per micro-batch that token scheduling saves. */
#include "moe/cli/routing.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe/cli/cli.h"
#include "moe/offload/predictor.h"
#include "moe/offload/schedule.h"
#include "moe/train/predictor_train.h"

/* Parameters against the model's active ones, one token's prediction against a decode step. */
static moe_status print_cost(const moe_route_net *net, const moe_trace *t) {
    double step = 0;
    MOE_TRY(moe_route_net_time_token(net, 50, &step));
    int64_t params = moe_route_net_param_count(net);
    printf("size: %lld parameters = %.2f%% of the model's %lld active parameters per token (budget 2%%)\n",
           (long long)params, 100.0 * (double)params / (double)t->active_params, (long long)t->active_params);
    if (t->decode_step_s > 0)
        printf("time: %.1f us per token = %.2f%% of a decode step of the model (%.3f ms, timed when tracing; budget 5%%)\n",
               step * 1e6, 100.0 * step / t->decode_step_s, t->decode_step_s * 1e3);
    else
        printf("time: %.1f us per token (the trace holds no decode-step time)\n", step * 1e6);
    return MOE_OK;
}

static void print_recall(const moe_trace *t, const double *recall, const double *token_recall) {
    printf("%-6s %-6s %10s %10s %8s\n", "layer", "model", "predictor", token_recall ? "token-id" : "", "chance");
    double chance = (double)t->fp.top_k / t->fp.n_experts, mean = 0, mean_tok = 0;
    for (int l = 0; l < t->fp.n_moe_layers; l++) {
        printf("%-6d %-6d %10.3f ", l, t->moe_layers[l], recall[l]);
        if (token_recall) printf("%10.3f ", token_recall[l]);
        else printf("%10s ", "");
        printf("%8.3f\n", chance);
        mean += recall[l] / t->fp.n_moe_layers;
        if (token_recall) mean_tok += token_recall[l] / t->fp.n_moe_layers;
    }
    printf("%-13s %10.3f ", "mean", mean);
    if (token_recall) printf("%10.3f ", mean_tok);
    else printf("%10s ", "");
    printf("%8.3f   (top-%d recall)\n", chance, t->fp.top_k);
}

static moe_status run_train(const char *trace_path, const char *out, const moe_predictor_train_options *o) {
    moe_trace t;
    MOE_TRY(moe_trace_load(trace_path, &t));
    moe_route_net net;
    moe_predictor_report rep;
    moe_status s = moe_predictor_train(&t, o, &net, &rep);
    if (s != MOE_OK) {
        moe_trace_free(&t);
        return s;
    }
    printf("held-out: %lld tokens (%lld trained on), traced from %s\n", (long long)rep.n_held, (long long)rep.n_train,
           t.model_name);
    print_recall(&t, rep.recall, rep.token_recall);
    s = print_cost(&net, &t);
    if (s == MOE_OK) s = moe_route_net_save(&net, out, t.model_name, &t.fp);
    if (s == MOE_OK) printf("wrote %s\n", out);
    moe_predictor_report_free(&rep);
    moe_route_net_free(&net);
    moe_trace_free(&t);
    return s;
}

/* Distinct experts per micro-batch of `micro` over every position: the tokens at position p
 * of all sequences (one decode step of N sequences), in arrival order, grouped by the
 * predicted paths and grouped by the true paths (the best the grouping could do). */
static moe_status schedule_report(const moe_trace *t, const float *scores, int micro) {
    int lm = t->fp.n_moe_layers, E = t->fp.n_experts, k = t->fp.top_k, words = moe_path_words(lm, E);
    int n_seqs = t->seq[t->n - 1] + 1;
    int64_t *rows = malloc(sizeof *rows * (size_t)n_seqs);
    uint64_t *pred = malloc(sizeof *pred * (size_t)n_seqs * (size_t)words);
    uint64_t *truth = malloc(sizeof *truth * (size_t)n_seqs * (size_t)words);
    int32_t *order = malloc(sizeof *order * (size_t)n_seqs);
    moe_status s = rows && pred && truth && order ? MOE_OK : moe_error(MOE_ERR_OOM, "schedule: out of host memory");
    int64_t plain = 0, grouped = 0, oracle = 0, batches = 0;
    for (int64_t p = 0; s == MOE_OK && p < t->context; p++) {
        for (int q = 0; q < n_seqs; q++) rows[q] = (int64_t)q * t->context + p;
        moe_paths_from_scores(scores, lm, t->n, E, k, rows, n_seqs, pred);
        moe_paths_from_routes(t->ids, lm, t->n, E, k, rows, n_seqs, truth);
        plain += moe_schedule_distinct(truth, NULL, n_seqs, words, micro);
        s = moe_schedule_group(pred, n_seqs, words, micro, order);
        if (s == MOE_OK) grouped += moe_schedule_distinct(truth, order, n_seqs, words, micro);
        if (s == MOE_OK) s = moe_schedule_group(truth, n_seqs, words, micro, order);
        if (s == MOE_OK) oracle += moe_schedule_distinct(truth, order, n_seqs, words, micro);
        batches += (n_seqs + micro - 1) / micro;
    }
    if (s == MOE_OK) {
        double per = 1.0 / ((double)batches * lm);
        printf("scheduling %d sequences into micro-batches of %d (%lld micro-batches over %lld positions):\n", n_seqs,
               micro, (long long)batches, (long long)t->context);
        printf("  distinct experts per micro-batch and MoE layer: %.2f in arrival order, %.2f grouped by predicted "
               "paths (%.1f%% fewer), %.2f grouped by the true paths\n",
               plain * per, grouped * per, 100.0 * (1.0 - (double)grouped / (double)plain), oracle * per);
    }
    free(rows), free(pred), free(truth), free(order);
    return s;
}

static moe_status run_eval(const char *trace_path, const char *pred_path, int micro) {
    moe_trace t;
    MOE_TRY(moe_trace_load(trace_path, &t));
    char have[700];
    snprintf(have, sizeof have, "the model of trace %s (%s)", trace_path, t.model_name);
    moe_predictor *p = NULL;
    float *scores = malloc(sizeof *scores * (size_t)(t.n * t.fp.n_moe_layers) * (size_t)t.fp.n_experts);
    double *recall = calloc((size_t)t.fp.n_moe_layers, sizeof *recall);
    moe_status s = scores && recall ? moe_predictor_load_for(pred_path, &t.fp, have, &p)
                                    : moe_error(MOE_ERR_OOM, "eval: out of host memory for the scores");
    if (s == MOE_OK) s = moe_route_net_score_trace(moe_predictor_net(p), &t, 0, t.n, scores);
    if (s == MOE_OK) {
        printf("%lld tokens of %s, predictor %s\n", (long long)t.n, trace_path, pred_path);
        moe_trace_recall(&t, 0, t.n, scores, recall);
        print_recall(&t, recall, NULL);
        s = print_cost(moe_predictor_net(p), &t);
    }
    if (s == MOE_OK) s = schedule_report(&t, scores, micro);
    free(scores);
    free(recall);
    moe_predictor_free(p);
    moe_trace_free(&t);
    return s;
}

static int cmd_train(int argc, char **argv) {
    moe_predictor_train_options o = moe_predictor_train_defaults();
    const char *out = NULL;
    int64_t seed = (int64_t)o.seed;
    const moe_flag_spec specs[] = {
        {"--out", MOE_FLAG_STRING, "FILE", 0, 0, NULL, "the predictor file to write (required)", &out},
        {"--steps", MOE_FLAG_INT, "N", 1, 1e7, NULL, "optimizer steps", &o.steps},
        {"--batch", MOE_FLAG_INT, "B", 1, 1 << 16, NULL, "tokens per step", &o.batch},
        {"--hidden", MOE_FLAG_INT, "H", 0, 65536, NULL,
         "hidden width (0: the largest up to 128 that keeps the predictor within 2% of the model's active parameters)",
         &o.hidden},
        {"--embed", MOE_FLAG_INT, "R", 1, 4096, NULL, "token embedding width", &o.embed},
        {"--context", MOE_FLAG_INT, "C", 0, 63, NULL, "previous tokens the predictor sees", &o.context},
        {"--lr", MOE_FLAG_DOUBLE, "LR", 0, 10, NULL, "peak learning rate (AdamW, warm-up then cosine)", &o.lr,
         .min_excluded = true},
        {"--weight-decay", MOE_FLAG_DOUBLE, "WD", 0, 10, NULL, "AdamW weight decay", &o.weight_decay},
        {"--holdout", MOE_FLAG_DOUBLE, "F", 0, 1, NULL, "share of the traced sequences held out", &o.holdout,
         .min_excluded = true, .max_excluded = true},
        {"--context-dropout", MOE_FLAG_DOUBLE, "P", 0, 1, NULL, "share of training tokens with a shortened context",
         &o.context_dropout},
        {"--seed", MOE_FLAG_I64, "S", 0, 1e15, NULL, "initialisation and minibatch seed", &seed},
        {"--log-every", MOE_FLAG_INT, "N", 0, 1e7, NULL, "progress line every N steps (0: none)", &o.log_every},
        {0}};
    const char *usage = "moe predictor train traces.h5 --out predictor.h5 [flags]";
    moe_args a;
    int rc = moe_cli_parse("predictor train", usage, specs, argc, argv, 1, 1, "a trace file is", &a);
    if (rc >= 0) return rc;
    o.seed = (uint64_t)seed;
    moe_status s = out ? run_train(a.positional[0], out, &o)
                       : moe_error(MOE_ERR_CONFIG, "predictor train: --out FILE is required (usage: %s)", usage);
    moe_args_free(&a);
    return s == MOE_OK ? 0 : moe_cli_fail(s);
}

static int cmd_eval(int argc, char **argv) {
    const char *pred = NULL;
    int micro = 8;
    const moe_flag_spec specs[] = {
        {"--predictor", MOE_FLAG_STRING, "FILE", 0, 0, NULL, "the predictor file (required)", &pred},
        {"--micro-batch", MOE_FLAG_INT, "M", 1, 1 << 16, NULL, "sequences per micro-batch for token scheduling", &micro},
        {0}};
    const char *usage = "moe predictor eval traces.h5 --predictor predictor.h5 [--micro-batch M]";
    moe_args a;
    int rc = moe_cli_parse("predictor eval", usage, specs, argc, argv, 1, 1, "a trace file is", &a);
    if (rc >= 0) return rc;
    moe_status s = pred ? run_eval(a.positional[0], pred, micro)
                        : moe_error(MOE_ERR_CONFIG, "predictor eval: --predictor FILE is required (usage: %s)", usage);
    moe_args_free(&a);
    return s == MOE_OK ? 0 : moe_cli_fail(s);
}

int moe_cmd_predictor(int argc, char **argv) {
    if (argc >= 1 && !strcmp(argv[0], "train")) return cmd_train(argc - 1, argv + 1);
    if (argc >= 1 && !strcmp(argv[0], "eval")) return cmd_eval(argc - 1, argv + 1);
    bool help = argc >= 1 && (!strcmp(argv[0], "--help") || !strcmp(argv[0], "-h"));
    fprintf(help ? stdout : stderr,
            "usage: moe predictor train traces.h5 --out predictor.h5 [--steps N] [--hidden H] [--holdout F] ...\n"
            "       moe predictor eval traces.h5 --predictor predictor.h5 [--micro-batch M]\n"
            "(moe predictor train --help lists its flags)\n");
    return help ? 0 : 2;
}
