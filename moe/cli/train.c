/* `moe train`: one training run from a config, its resume, or a fine-tuning from a hub
 * folder (model.init_from; moe/train/train.h). */
#include "moe/cli/commands.h"

#include <stdio.h>
#include <unistd.h>

#include "core/dist.h"
#include "moe/cli/cli.h"
#include "moe/cli/init_from.h"
#include "moe/train/signals.h"
#include "moe/train/train.h"

/* Under mpirun every rank runs this; rank 0 prints. A failure on any rank ends every
 * rank (moe_dist_abort) with the message naming the failing rank; no rank is left waiting.
 * A stop signal ends the run with a checkpoint and exit status 128 + signal. */
static int run_train(const char *path, const moe_arg_list *sets, moe_train_options *o, moe_signal_watch *signals) {
    moe_config cfg;
    moe_status s = moe_config_load_file(&cfg, path);
    if (s == MOE_OK) s = moe_cli_apply_sets(&cfg, sets);
    if (s == MOE_OK) s = moe_config_validate(&cfg);
    if (s == MOE_OK && o->resume_dir && o->overwrite)
        s = moe_error(MOE_ERR_CONFIG, "--overwrite starts a fresh run and cannot go with --resume");
    char init_weights[4096] = ""; /* model.init_from: the folder's weights for a fresh run */
    if (s == MOE_OK && cfg.model.init_from[0])
        s = moe_cli_init_from(&cfg, !o->resume_dir, init_weights, sizeof init_weights);
    o->init_weights = init_weights[0] ? init_weights : NULL;
    if (s == MOE_OK) s = moe_dist_init(NULL, NULL, cfg.parallel.expert_parallel);
    if (s != MOE_OK) {
        if (init_weights[0]) unlink(init_weights);
        if (moe_dist_world_size() > 1) moe_dist_abort(s, moe_last_error());
        return moe_cli_fail(s);
    }
    bool root = moe_dist_is_root();
    moe_signal_watch_set_verbose(signals, root);
    if (root) {
        fprintf(stderr, "effective config:\n");
        moe_config_write(&cfg, stderr);
    }
    o->signals = signals;
    moe_train_summary sum;
    s = moe_train_run(&cfg, o, &sum);
    if (init_weights[0]) unlink(init_weights);
    if (s != MOE_OK && s != MOE_ERR_INTERRUPTED && moe_dist_world_size() > 1) moe_dist_abort(s, moe_last_error());
    moe_dist_finalize();
    if (s == MOE_ERR_INTERRUPTED) {
        if (root) moe_cli_fail(s);
        return 128 + sum.stop_signal;
    }
    if (s != MOE_OK) return root ? moe_cli_fail(s) : 1;
    if (root) {
        printf("trained %lld steps: loss %.4f, val_loss %.4f, val_bpb %.4f (unigram %.4f), %.0f tokens/s, %lld skipped steps\n",
               (long long)sum.steps_done, sum.final_loss, sum.val_loss, sum.val_bpb, sum.unigram_bpb, sum.tokens_per_s,
               (long long)sum.bad_steps);
        printf("checkpoint: %s\n", sum.last_checkpoint);
    }
    return 0;
}

int moe_cmd_train(int argc, char **argv) {
    moe_signal_watch *signals = NULL; /* first: the threads MPI and OpenMP start inherit its mask */
    moe_status s = moe_signal_watch_start(&signals);
    if (s != MOE_OK) return moe_cli_fail(s);
    moe_arg_list sets = {0};
    moe_train_options o = {0};
    const moe_flag_spec specs[] = {
        {"--set", MOE_FLAG_MULTI, "KEY=VALUE", 0, 0, NULL, "override a config key (section.key=value)", &sets},
        {"--resume", MOE_FLAG_STRING, "RUN_DIR", 0, 0, NULL, "continue the run in RUN_DIR from its newest good checkpoint",
         &o.resume_dir},
        {"--overwrite", MOE_FLAG_BOOL, NULL, 0, 0, NULL,
         "start over in a checkpoint.dir that holds a run (deletes its checkpoints and metrics.jsonl)", &o.overwrite},
        {"--quiet", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "no progress line", &o.quiet},
        {0}};
    moe_args a;
    int rc = moe_cli_parse("train", "moe train CONFIG.yaml [--set section.key=value ...] [--resume RUN_DIR] [--overwrite] [--quiet]",
                           specs, argc, argv, 1, 1, "CONFIG.yaml is", &a);
    if (rc < 0) {
        rc = run_train(a.positional[0], &sets, &o, signals);
        moe_args_free(&a);
    }
    moe_arg_list_free(&sets);
    moe_signal_watch_stop(signals);
    return rc;
}
