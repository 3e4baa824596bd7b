/* Thread-local error message slot behind moe_error()/moe_last_error(). */
#include "core/status.h"

#include <stdarg.h>
#include <string.h>

#define MOE_ERROR_LEN 2048

static _Thread_local char error_text[MOE_ERROR_LEN];
static _Thread_local moe_status error_code;

moe_status moe_error(moe_status code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error_text, sizeof error_text, fmt, ap);
    va_end(ap);
    error_code = code;
    return code;
}

moe_status moe_error_context(moe_status code, const char *fmt, ...) {
    char prefix[MOE_ERROR_LEN], old[MOE_ERROR_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, error_text, sizeof old);
    size_t n = strnlen(prefix, sizeof error_text - 3);
    memcpy(error_text, prefix, n);
    memcpy(error_text + n, ": ", 2);
    size_t room = sizeof error_text - n - 3;
    size_t m = strnlen(old, room);
    memcpy(error_text + n + 2, old, m);
    error_text[n + 2 + m] = '\0';
    error_code = code;
    return code;
}

const char *moe_last_error(void) { return error_text[0] ? error_text : "no error"; }
moe_status moe_last_status(void) { return error_code; }

void moe_error_clear(void) {
    error_text[0] = '\0';
    error_code = MOE_OK;
}

const char *moe_status_name(moe_status s) {
    static const char *names[MOE_STATUS_COUNT] = {
        "ok", "invalid argument", "i/o error", "config error", "format error",
        "out of memory", "device error", "distributed error", "numeric error",
        "interrupted", "unsupported",
    };
    return (s >= 0 && s < MOE_STATUS_COUNT) ? names[s] : "unknown status";
}
