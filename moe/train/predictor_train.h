/* Training the routing-path predictor (moe/offload/predictor.h) on a routing trace with
 * our engine: minibatches of traced tokens (each with its context, shortened at random
 * for a share of them so that a prediction with less context still works), the net's
 * forward, a per-layer softmax cross-entropy against the routed top-k set (target 1/k on
 * each routed expert), AdamW on a warm-up + cosine schedule.
 *
 * The trace's last sequences are held out; the report gives the per-layer top-k recall on
 * them beside two baselines: chance (k/E) and token identity (each token id's most frequent
 * experts in the training part). */
#ifndef MOE_TRAIN_PREDICTOR_TRAIN_H
#define MOE_TRAIN_PREDICTOR_TRAIN_H

#include <stdio.h>

#include "moe/offload/predictor.h"

typedef struct moe_predictor_train_options {
    int steps;              /* optimizer steps */
    int batch;              /* tokens per step */
    int context;            /* previous tokens the net sees */
    int embed, hidden;      /* embedding width r, hidden width H (0: the largest up to 128 whose net
                             * fits 2% of the model's active parameters, at least 16) */
    double lr, weight_decay;
    double holdout;         /* share of the trace's sequences held out */
    double context_dropout; /* share of training tokens whose context is cut to a random length */
    uint64_t seed;
    int log_every;          /* progress line every N steps on `log` (0: none) */
    FILE *log;
} moe_predictor_train_options;

/* steps 2000, batch 256, context 3, embed 32, hidden 0 (fit to 2%), lr 3e-3, weight decay 1 (decoupled:
 * keeps the net from fitting context that carries no signal on small traces),
 * holdout 0.1, context dropout 0.2, seed 1, log every 200 steps to stderr. */
moe_predictor_train_options moe_predictor_train_defaults(void);

typedef struct moe_predictor_report {
    int n_moe_layers;
    int64_t n_train, n_held;         /* tokens */
    double *recall, *token_recall;   /* [n_moe_layers] on the held-out tokens: the net, token identity */
    double mean_recall, mean_token_recall, chance;
    double final_loss;               /* mean of the last steps' losses */
} moe_predictor_report;

/* Trains a fresh net (*net: free with moe_route_net_free) on trace t and fills *rep
 * (free with moe_predictor_report_free). Resets the step arena after every step. */
moe_status moe_predictor_train(const moe_trace *t, const moe_predictor_train_options *o, moe_route_net *net,
                               moe_predictor_report *rep);
void moe_predictor_report_free(moe_predictor_report *rep);

#endif
