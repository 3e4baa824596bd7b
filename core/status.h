/* Status codes and error messages for runtime faults; asserts for programmer misuse.
 *
 * Library code never calls exit(). A runtime fault (I/O, config, allocation, device,
 * MPI, bad shapes handed to an op) returns a moe_status and leaves a message that says
 * what, where and what to do in a thread-local slot read with moe_last_error().
 * Programmer misuse (a NULL where none may be, an impossible enum) is MOE_ASSERT:
 * it prints file:line and the message, then aborts. */
#ifndef MOE_CORE_STATUS_H
#define MOE_CORE_STATUS_H

#include <stdio.h>
#include <stdlib.h>

typedef enum moe_status {
    MOE_OK = 0,
    MOE_ERR_INVALID,     /* bad argument: shapes, dtypes, indices, values out of range */
    MOE_ERR_IO,          /* a file could not be opened, read or written */
    MOE_ERR_CONFIG,      /* a config file or override is wrong */
    MOE_ERR_FORMAT,      /* a file exists but its content is damaged or does not match */
    MOE_ERR_OOM,         /* an allocation failed (host or device) */
    MOE_ERR_DEVICE,      /* a CUDA / cuBLAS / NCCL call failed */
    MOE_ERR_DIST,        /* an MPI peer failed or disagreed */
    MOE_ERR_NUMERIC,     /* NaN / Inf where a finite value was required */
    MOE_ERR_INTERRUPTED, /* the user asked to stop (SIGINT) */
    MOE_ERR_UNSUPPORTED, /* the backend or build lacks the feature */
    MOE_STATUS_COUNT
} moe_status;

/* Records a formatted message for the calling thread and returns `code`,
 * so a failing function can `return moe_error(MOE_ERR_IO, "...", ...);`. */
moe_status moe_error(moe_status code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Prefixes the current message with more context ("loading checkpoint X: " + old). */
moe_status moe_error_context(moe_status code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

const char *moe_last_error(void);
moe_status moe_last_status(void);
void moe_error_clear(void);
const char *moe_status_name(moe_status s);

/* Returns early from the calling function when `expr` is not MOE_OK. */
#define MOE_TRY(expr)                          \
    do {                                       \
        moe_status moe_try_s_ = (expr);        \
        if (moe_try_s_ != MOE_OK) return moe_try_s_; \
    } while (0)

/* Programmer misuse: never triggered by user input. */
#define MOE_ASSERT(cond, ...)                                                   \
    do {                                                                        \
        if (!(cond)) {                                                          \
            fprintf(stderr, "%s:%d: assertion '%s' failed: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                       \
            fputc('\n', stderr);                                                \
            abort();                                                            \
        }                                                                       \
    } while (0)

#endif
