/* Runs are never lost: the signal watcher's state (and its third stop signal quitting at
 * once with 128 + signal), run ids and clean-up (only this run's
 * checkpoints, never the one just written), a fresh run refused in a directory holding a
 * run (--overwrite starts over), --resume of a missing directory creates nothing, resume
 * falls back past a checkpoint whose CRC fails (any dataset, the config included) and moves
 * metrics lines of abandoned steps aside, and inputs are checked before the first step. */
#define _GNU_SOURCE /* memmem */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/h5file.h"
#include "moe/train/checkpoint.h"
#include "moe/train/data.h"
#include "moe/train/signals.h"
#include "moe/model/tokenizer.h"
#include "moe/train/train.h"
#include "tests/harness/files.h"
#include "tests/harness/testlib.h"

static char dir[256];

static bool exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

static const char *at(const char *name) {
    static char path[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(path[k], sizeof path[k], "%s/%s", dir, name);
    return path[k];
}

/* Token files data/train.bin, data/val.bin (bytes) and bpe/val.bin (a 300-token BPE). */
static void make_data(void) {
    snprintf(dir, sizeof dir, "%s", moe_test_tmpdir("runs"));
    FILE *f = fopen(at("text.txt"), "w");
    for (int i = 0; i < 300; i++) fprintf(f, "the quick brown fox %d jumps over the lazy dog.\n\n", i % 13);
    fclose(f);
    const char *inputs[1] = {at("text.txt")};
    moe_data_summary sum;
    moe_tokenizer *tok = moe_tokenizer_byte();
    CU_ASSERT_EQUAL_FATAL(moe_data_prepare(inputs, 1, tok, 0.1, at("data"), &sum), MOE_OK);
    moe_tokenizer_free(tok);
    char *text = NULL;
    size_t len = 0;
    FILE *t = fopen(at("text.txt"), "rb");
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    text = malloc(1 << 16);
    len = fread(text, 1, 1 << 16, t);
    fclose(t);
    CU_ASSERT_EQUAL_FATAL(moe_tokenizer_train_bpe(text, len, 300, &tok), MOE_OK);
    free(text);
    CU_ASSERT_EQUAL_FATAL(moe_data_prepare(inputs, 1, tok, 0.5, at("bpe"), &sum), MOE_OK);
    moe_tokenizer_free(tok);
}

static void tiny(moe_config *c, const char *run, int steps) {
    moe_config_defaults(c);
    c->model.d_model = 16;
    c->model.n_layers = 1;
    c->model.n_heads = 2;
    c->model.seq_len = 8;
    c->model.ffn_dim = 16;
    c->model.n_experts = 4;
    c->model.top_k = 2;
    c->data.batch_size = 2;
    c->train.steps = steps;
    c->train.warmup = 1;
    c->train.eval_every = 0;
    c->train.eval_batches = 1;
    c->train.log_every = 1;
    c->checkpoint.every = 0;
    c->checkpoint.keep = 0;
    snprintf(c->data.train_path, sizeof c->data.train_path, "%s", at("data/train.bin"));
    snprintf(c->data.val_path, sizeof c->data.val_path, "%s", at("data/val.bin"));
    snprintf(c->checkpoint.dir, sizeof c->checkpoint.dir, "%s", at(run));
    CU_ASSERT_EQUAL_FATAL(moe_config_validate(c), MOE_OK);
}

static moe_status train(const moe_config *c, const char *resume, bool overwrite) {
    moe_train_options o = {.quiet = true, .overwrite = overwrite, .resume_dir = resume};
    moe_train_summary s;
    return moe_train_run(c, &o, &s);
}

static void copy_file(const char *from, const char *to, long truncate_at) {
    FILE *in = fopen(from, "rb"), *out = fopen(to, "wb");
    CU_ASSERT_FATAL(in && out);
    char buf[4096];
    size_t got;
    long total = 0;
    while ((got = fread(buf, 1, sizeof buf, in)) > 0 && (truncate_at < 0 || total < truncate_at)) {
        fwrite(buf, 1, got, out);
        total += (long)got;
    }
    fclose(in);
    fclose(out);
}

/* Flips one byte of the first occurrence of `text` in the file (a stored string). */
static void damage_text(const char *path, const char *text) {
    FILE *f = fopen(path, "r+b");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    static char buf[1 << 22];
    size_t n = fread(buf, 1, sizeof buf, f);
    char *p = memmem(buf, n, text, strlen(text));
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    fseek(f, p - buf, SEEK_SET);
    fputc(*p ^ 0x20, f);
    fclose(f);
}

static void test_signal_watch(void) {
    moe_signal_watch *w = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_signal_watch_start(&w), MOE_OK);
    moe_signal_watch_set_verbose(w, false);
    CU_ASSERT_EQUAL(moe_signal_watch_stop_signal(w), 0);
    CU_ASSERT_FALSE(moe_signal_watch_take_checkpoint(w));
    kill(getpid(), SIGUSR1); /* blocked here: the watcher thread takes it */
    bool got = false;
    for (int i = 0; i < 200 && !got; i++) {
        got = moe_signal_watch_take_checkpoint(w);
        if (!got) nanosleep(&(struct timespec){0, 10000000}, NULL);
    }
    CU_ASSERT_TRUE(got);
    CU_ASSERT_FALSE(moe_signal_watch_take_checkpoint(w)); /* taken once */
    CU_ASSERT_EQUAL(moe_signal_watch_stop_signal(w), 0); /* SIGUSR1 does not stop */
    kill(getpid(), SIGTERM);
    for (int i = 0; i < 200 && !moe_signal_watch_stop_signal(w); i++) nanosleep(&(struct timespec){0, 10000000}, NULL);
    CU_ASSERT_EQUAL(moe_signal_watch_stop_signal(w), SIGTERM);
    kill(getpid(), SIGINT); /* the second is noted, the first one stays */
    nanosleep(&(struct timespec){0, 300000000}, NULL);
    CU_ASSERT_EQUAL(moe_signal_watch_stop_signal(w), SIGTERM);
    moe_signal_watch_stop(w);
}

/* The third stop signal quits at once: a child with a watcher signals itself three times
 * (each taken before the next, so none merge) and must end with exit status 128 + SIGTERM;
 * one that outlives them exits 0. */
static void test_signal_watch_third_quits(void) {
    fflush(NULL);
    pid_t pid = fork();
    CU_ASSERT_FATAL(pid >= 0);
    if (pid == 0) {
        moe_signal_watch *w = NULL;
        if (moe_signal_watch_start(&w) != MOE_OK) _exit(1);
        moe_signal_watch_set_verbose(w, false);
        for (int n = 0; n < 3; n++) {
            kill(getpid(), SIGTERM);
            nanosleep(&(struct timespec){0, 200000000}, NULL); /* the watcher takes it well within */
        }
        _exit(0);
    }
    int wstatus = 0;
    CU_ASSERT_EQUAL_FATAL(waitpid(pid, &wstatus, 0), pid);
    CU_ASSERT_TRUE(WIFEXITED(wstatus));
    CU_ASSERT_EQUAL(WEXITSTATUS(wstatus), 128 + SIGTERM);
}

/* A fresh run refuses a directory holding a run (files untouched); --overwrite starts over. */
static void test_fresh_run_refused(void) {
    make_data();
    moe_config c;
    tiny(&c, "d", 9);
    c.checkpoint.every = 3;
    CU_ASSERT_EQUAL_FATAL(train(&c, NULL, false), MOE_OK);
    tiny(&c, "d", 2);
    CU_ASSERT_EQUAL(train(&c, NULL, false), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), at("d")));
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "--resume"));
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "--overwrite"));
    CU_ASSERT_TRUE(exists(at("d/ckpt-000009.h5")));
    CU_ASSERT_FALSE(exists(at("d/ckpt-000002.h5")));
    CU_ASSERT_EQUAL(train(&c, NULL, true), MOE_OK);
    CU_ASSERT_TRUE(exists(at("d/ckpt-000002.h5"))); /* the old run's clean-up used to delete it */
    CU_ASSERT_FALSE(exists(at("d/ckpt-000009.h5")));
    double steps[64];
    CU_ASSERT_EQUAL(moe_test_jsonl_values(at("d/metrics.jsonl"), "step", steps, 64), 2);
    /* --resume of a missing directory fails and creates nothing; an empty dir is refused */
    CU_ASSERT_EQUAL(train(&c, at("none/deeper"), false), MOE_ERR_IO);
    CU_ASSERT_FALSE(exists(at("none")));
    c.checkpoint.dir[0] = '\0';
    CU_ASSERT_EQUAL(train(&c, NULL, false), MOE_ERR_CONFIG);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "checkpoint.dir is empty"));
}

/* Clean-up keeps the checkpoint just written and deletes only this run's older files:
 * another run's checkpoint and a damaged one stay. */
static void test_keep_owned(void) {
    make_data();
    moe_config c;
    tiny(&c, "other", 1);
    CU_ASSERT_EQUAL_FATAL(train(&c, NULL, false), MOE_OK);
    tiny(&c, "k", 4);
    c.checkpoint.every = 1;
    CU_ASSERT_EQUAL_FATAL(train(&c, NULL, false), MOE_OK); /* ckpt 1..4, keep 0: all stay */
    copy_file(at("other/ckpt-000001.h5"), at("k/ckpt-000077.h5"), -1);
    copy_file(at("k/ckpt-000004.h5"), at("k/ckpt-000088.h5"), 3000);
    moe_h5 *f;
    char *id = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_h5_open(at("k/ckpt-000002.h5"), &f), MOE_OK);
    CU_ASSERT_EQUAL_FATAL(moe_h5_get_string(f, "run_id", &id), MOE_OK);
    moe_h5_close(f);
    CU_ASSERT_EQUAL(strlen(id), 16);
    moe_h5_owner mine = {"run_id", id, "ckpt-000002.h5"};
    CU_ASSERT_EQUAL(moe_h5_keep_last_owned(at("k"), "ckpt-", ".h5", 2, &mine), MOE_OK);
    CU_ASSERT_TRUE(exists(at("k/ckpt-000002.h5")));  /* just written */
    CU_ASSERT_TRUE(exists(at("k/ckpt-000004.h5")));  /* the newest of this run */
    CU_ASSERT_FALSE(exists(at("k/ckpt-000003.h5")));
    CU_ASSERT_FALSE(exists(at("k/ckpt-000001.h5")));
    CU_ASSERT_TRUE(exists(at("k/ckpt-000077.h5")));  /* another run's */
    CU_ASSERT_TRUE(exists(at("k/ckpt-000088.h5")));  /* damaged: not known to be this run's */
    free(id);
}

/* Resume skips a newer checkpoint whose CRC fails (in a data array, or in the config that
 * resume never read before) with the same verification for every reader, and metrics
 * lines after the resumed step move to metrics-discarded.jsonl. */
static void test_resume_fallback(void) {
    make_data();
    moe_config c;
    tiny(&c, "r", 6);
    c.checkpoint.every = 3;
    CU_ASSERT_EQUAL_FATAL(train(&c, NULL, false), MOE_OK);
    damage_text(at("r/ckpt-000006.h5"), "expert_parallel");
    CU_ASSERT_EQUAL(moe_checkpoint_verify(at("r/ckpt-000006.h5")), MOE_ERR_FORMAT);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "'config'"));
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "checkpoint "));
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "resume from an earlier checkpoint")); /* what to do */
    moe_model m;
    moe_train_state ts;
    CU_ASSERT_EQUAL_FATAL(moe_model_init(&m, &c, 0, 1), MOE_OK);
    CU_ASSERT_EQUAL(moe_checkpoint_load(at("r/ckpt-000006.h5"), &m, NULL, &ts), MOE_ERR_FORMAT);
    moe_model_free(&m);
    CU_ASSERT_EQUAL(moe_checkpoint_verify(at("r/ckpt-000003.h5")), MOE_OK);
    char found[600];
    CU_ASSERT_EQUAL(moe_checkpoint_find_latest(at("r"), found, sizeof found), MOE_OK);
    CU_ASSERT_STRING_EQUAL(found, at("r/ckpt-000003.h5"));
    tiny(&c, "r", 8);
    c.checkpoint.keep = 1;
    CU_ASSERT_EQUAL_FATAL(train(&c, at("r"), false), MOE_OK);
    CU_ASSERT_TRUE(exists(at("r/ckpt-000008.h5")));
    CU_ASSERT_FALSE(exists(at("r/ckpt-000003.h5"))); /* this run's, older: cleaned */
    double steps[64];
    int n = moe_test_jsonl_values(at("r/metrics.jsonl"), "step", steps, 64);
    CU_ASSERT_EQUAL(n, 8);
    for (int i = 0; i < n; i++) CU_ASSERT_EQUAL(steps[i], i + 1);
    n = moe_test_jsonl_values(at("r/metrics-discarded.jsonl"), "step", steps, 64);
    CU_ASSERT_EQUAL(n, 3);
    for (int i = 0; i < n; i++) CU_ASSERT_EQUAL(steps[i], i + 4);
}

/* Every input is checked before the first step; nothing is created on failure. */
static void test_inputs_checked(void) {
    make_data();
    moe_config c;
    tiny(&c, "in", 2);
    snprintf(c.data.val_path, sizeof c.data.val_path, "%s", at("bpe/val.bin"));
    CU_ASSERT_EQUAL(train(&c, NULL, false), MOE_ERR_CONFIG);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), at("bpe/val.bin")));
    CU_ASSERT_FALSE(exists(at("in")));
    tiny(&c, "in", 2);
    c.data.batch_size = 64;
    c.model.seq_len = 64; /* the validation file holds fewer than 64 x 64 + 1 tokens */
    CU_ASSERT_EQUAL(train(&c, NULL, false), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), at("data/val.bin")));
    CU_ASSERT_FALSE(exists(at("in")));
    tiny(&c, "in", 0);
    CU_ASSERT_EQUAL(train(&c, NULL, false), MOE_ERR_CONFIG);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "train.steps=0"));
    CU_ASSERT_FALSE(exists(at("in")));
}

/* A failure in the middle of a step saves the state before that step first, and --resume
 * then continues with the losses of a run that never failed. */
static void test_save_on_failure(void) {
    make_data();
    moe_config c;
    tiny(&c, "plain", 6);
    CU_ASSERT_EQUAL_FATAL(train(&c, NULL, false), MOE_OK);
    tiny(&c, "fails", 6);
    moe_train_options o = {.quiet = true, .fail_at_step = 4};
    moe_train_summary s;
    CU_ASSERT_EQUAL_FATAL(moe_train_run(&c, &o, &s), MOE_ERR_DEVICE);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "step 4 failed"));
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "a checkpoint of step 3 was saved first"));
    CU_ASSERT_TRUE(exists(at("fails/ckpt-000003.h5")));
    CU_ASSERT_EQUAL_FATAL(train(&c, at("fails"), false), MOE_OK);
    char line[8192], other[8192];
    FILE *a = fopen(at("plain/metrics.jsonl"), "r"), *b = fopen(at("fails/metrics.jsonl"), "r");
    CU_ASSERT_FATAL(a && b);
    int n = 0;
    while (fgets(line, sizeof line, a)) {
        CU_ASSERT_PTR_NOT_NULL_FATAL(fgets(other, sizeof other, b));
        *strstr(line, ",\"tokens_per_s\"") = *strstr(other, ",\"tokens_per_s\"") = '\0'; /* step, loss, ..., grad_norm */
        CU_ASSERT_STRING_EQUAL(line, other);
        n++;
    }
    CU_ASSERT_EQUAL(n, 6);
    fclose(a);
    fclose(b);
}

static void register_suites(void) {
    moe_test_add_suite("runs", (moe_test_entry[]){{"signal watcher", test_signal_watch},
                                                   {"a third stop signal quits at once", test_signal_watch_third_quits},
                                                   {"fresh run refused, --overwrite", test_fresh_run_refused},
                                                   {"clean-up of this run's files only", test_keep_owned},
                                                   {"resume falls back past a CRC failure", test_resume_fallback},
                                                   {"inputs checked at start-up", test_inputs_checked},
                                                   {"a failed step saves first", test_save_on_failure},
                                                   {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
