/* Reads run in a child process (see contain.h): the child sends its status and message
 * through a pipe and leaves with _exit (no atexit handlers, no stdio flush, nothing of
 * the parent's libraries torn down). */
#include "core/contain.h"

#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

typedef struct contained_result {
    int32_t status;
    char message[1024];
} contained_result;

static void write_all(int fd, const void *p, size_t n) {
    for (const char *c = p; n > 0;) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        c += w, n -= (size_t)w;
    }
}

static size_t read_all(int fd, void *p, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)p + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    return got;
}

static bool fault_signal(int sig) {
    return sig == SIGSEGV || sig == SIGBUS || sig == SIGFPE || sig == SIGILL || sig == SIGABRT;
}

/* The parent's reading of how the child ended. */
static moe_status child_outcome(const contained_result *r, size_t got, int wstatus, const char *what) {
    if (got == sizeof *r && WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0)
        return r->status == MOE_OK ? MOE_OK : moe_error((moe_status)r->status, "%s", r->message);
    if (WIFSIGNALED(wstatus) && !fault_signal(WTERMSIG(wstatus)))
        return moe_error(MOE_ERR_IO, "reading %s was stopped by signal %d (%s)", what, WTERMSIG(wstatus),
                         strsignal(WTERMSIG(wstatus)));
    if (WIFSIGNALED(wstatus))
        return moe_error(MOE_ERR_FORMAT, "%s is damaged: reading it crashed the file library (signal %d, %s)", what,
                         WTERMSIG(wstatus), strsignal(WTERMSIG(wstatus)));
    return moe_error(MOE_ERR_FORMAT, "%s is damaged: reading it stopped the reader (exit status %d)", what,
                     WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1);
}

moe_status moe_run_contained(moe_contained_fn fn, void *ctx, const char *what) {
    int fds[2];
    if (pipe(fds) != 0) return fn(ctx);
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        return fn(ctx);
    }
    if (pid == 0) {
        close(fds[0]);
        contained_result r = {.status = fn(ctx)};
        if (r.status != MOE_OK) snprintf(r.message, sizeof r.message, "%s", moe_last_error());
        write_all(fds[1], &r, sizeof r);
        _exit(0);
    }
    close(fds[1]);
    contained_result r;
    size_t got = read_all(fds[0], &r, sizeof r);
    close(fds[0]);
    int wstatus = 0;
    while (waitpid(pid, &wstatus, 0) < 0 && errno == EINTR) {}
    return child_outcome(&r, got, wstatus, what);
}
