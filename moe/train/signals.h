/* Signals for long runs, received by one watcher thread instead of a handler.
 *
 *   SIGINT, SIGTERM, SIGHUP  stop after the current step with a checkpoint; a second one
 *                            is noted and ignored (the save goes on); a third ends the
 *                            process at once with _exit(128 + signal), no checkpoint
 *   SIGUSR1                  write a checkpoint after the current step and go on
 *
 * Why no handler: oneDNN's sgemm kernels run with the stack pointer inside a heap
 * workspace, so a signal frame pushed by the kernel for any handler lands on the heap
 * below it and overwrites malloc's chunk headers (glibc then aborts with "corrupted size
 * vs. prev_size" or OpenMPI's crash handler deadlocks in malloc). moe_signal_watch_start
 * blocks these signals in the calling thread before any other thread exists (OpenMP
 * workers, oneDNN, the MPI progress threads inherit the mask), and a watcher thread takes
 * them with sigtimedwait: no code ever runs asynchronously on a computing thread. The
 * state it keeps is read with the functions below. */
#ifndef MOE_MOE_SIGNALS_H
#define MOE_MOE_SIGNALS_H

#include <stdbool.h>

#include "core/status.h"

typedef struct moe_signal_watch moe_signal_watch;

/* Call before any thread is created (before MPI and OpenMP start). */
moe_status moe_signal_watch_start(moe_signal_watch **out);
/* Stops and joins the watcher; the signals stay blocked in the threads that exist. */
void moe_signal_watch_stop(moe_signal_watch *w);

/* The first stop signal received (SIGINT, SIGTERM or SIGHUP), or 0. */
int moe_signal_watch_stop_signal(const moe_signal_watch *w);
/* True once per SIGUSR1 burst: a checkpoint was asked for since the last call. */
bool moe_signal_watch_take_checkpoint(moe_signal_watch *w);
/* Whether the watcher's notes go to stderr (under MPI only rank 0 speaks). */
void moe_signal_watch_set_verbose(moe_signal_watch *w, bool verbose);

#endif
