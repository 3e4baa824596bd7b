/* A read that a third-party parser may crash on: libhdf5 decodes a damaged file's metadata
 * without bounds checks, so a bad checkpoint could take the program down. Such a read runs
 * here in a child process (fork): a fault there fails the read with a message, and the
 * program goes on. */
#ifndef MOE_CORE_CONTAIN_H
#define MOE_CORE_CONTAIN_H

#include "core/status.h"

typedef moe_status (*moe_contained_fn)(void *ctx);

/* Runs fn(ctx) in a child process and returns its status with its message. A child that a
 * fault signal ends (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT) or that exits without a
 * result (a sanitizer's report) gives MOE_ERR_FORMAT "<what> is damaged: reading it
 * crashed ..."; another signal (a kill) gives MOE_ERR_IO. fn runs on the child's only
 * thread: it must not use threads, MPI or a device, and it returns only a status. When
 * the system cannot fork, fn runs in this process. */
moe_status moe_run_contained(moe_contained_fn fn, void *ctx, const char *what);

#endif
