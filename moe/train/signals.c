/* The signal watcher thread (see signals.h). */
#include "moe/train/signals.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct moe_signal_watch {
    pthread_t thread;
    sigset_t set;            /* the signals it takes */
    atomic_int stop_signal;  /* the first stop signal, or 0 */
    atomic_int stop_count;   /* stop signals received */
    atomic_bool checkpoint;  /* SIGUSR1 not yet taken */
    atomic_bool verbose, quit;
};

static bool is_stop_signal(int sig) { return sig == SIGINT || sig == SIGTERM || sig == SIGHUP; }

/* A line on stderr from the watcher (write(2): no stdio lock shared with the trainer). */
static void note(const moe_signal_watch *w, const char *text) {
    if (!atomic_load(&w->verbose)) return;
    ssize_t rc = write(STDERR_FILENO, text, strlen(text));
    (void)rc;
}

static void take(moe_signal_watch *w, int sig) {
    if (sig == SIGUSR1) {
        atomic_store(&w->checkpoint, true);
        note(w, "\nSIGUSR1: a checkpoint after this step\n");
        return;
    }
    if (!is_stop_signal(sig)) return;
    int n = atomic_fetch_add(&w->stop_count, 1) + 1;
    int none = 0;
    atomic_compare_exchange_strong(&w->stop_signal, &none, sig);
    if (n == 1)
        note(w, "\nstopping after this step with a checkpoint (signal again twice to quit at once without one)\n");
    else if (n == 2)
        note(w, "\nstill saving; one more signal quits at once without a checkpoint\n");
    else {
        note(w, "\nquitting at once: no checkpoint\n");
        _exit(128 + sig);
    }
}

static void *watch(void *arg) {
    moe_signal_watch *w = arg;
    const struct timespec tick = {0, 100 * 1000 * 1000}; /* to see `quit` */
    while (!atomic_load(&w->quit)) {
        int sig = sigtimedwait(&w->set, NULL, &tick);
        if (sig > 0) take(w, sig);
    }
    return NULL;
}

moe_status moe_signal_watch_start(moe_signal_watch **out) {
    *out = NULL;
    moe_signal_watch *w = calloc(1, sizeof *w);
    if (!w) return moe_error(MOE_ERR_OOM, "signal watcher: out of host memory");
    sigemptyset(&w->set);
    sigaddset(&w->set, SIGINT);
    sigaddset(&w->set, SIGTERM);
    sigaddset(&w->set, SIGHUP);
    sigaddset(&w->set, SIGUSR1);
    atomic_init(&w->verbose, true);
    int rc = pthread_sigmask(SIG_BLOCK, &w->set, NULL);
    if (rc == 0) rc = pthread_create(&w->thread, NULL, watch, w);
    if (rc != 0) {
        free(w);
        return moe_error(MOE_ERR_INVALID, "cannot start the signal watcher: %s", strerror(rc));
    }
    *out = w;
    return MOE_OK;
}

void moe_signal_watch_stop(moe_signal_watch *w) {
    if (!w) return;
    atomic_store(&w->quit, true);
    pthread_join(w->thread, NULL);
    free(w);
}

int moe_signal_watch_stop_signal(const moe_signal_watch *w) { return w ? atomic_load(&w->stop_signal) : 0; }

bool moe_signal_watch_take_checkpoint(moe_signal_watch *w) { return w && atomic_exchange(&w->checkpoint, false); }

void moe_signal_watch_set_verbose(moe_signal_watch *w, bool verbose) {
    if (w) atomic_store(&w->verbose, verbose);
}
