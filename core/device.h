/* Device-level helpers outside the op API: whether a device can run work in this
 * process, and waiting until the work queued on it has finished (for timing). */
#ifndef MOE_CORE_DEVICE_H
#define MOE_CORE_DEVICE_H

#include <stdbool.h>

#include "core/status.h"
#include "core/tensor.h"

/* True when the backend of `dev` was built and found a device; otherwise false, with
 * moe_last_error() saying why. */
bool moe_device_available(moe_device dev);

/* Blocks until every kernel and copy queued on `dev` has finished (no-op on the CPU).
 * MOE_ERR_UNSUPPORTED when the device is not available, MOE_ERR_DEVICE when the wait
 * reports an earlier asynchronous failure. */
moe_status moe_device_sync(moe_device dev);

/* With MOE_PROFILE set (1: per kernel, 2: per kernel, dtype and shapes): prints the kernel
 * times gathered since the last report under `title` (stderr) and starts afresh; a no-op
 * otherwise. */
void moe_profile_report(const char *title);

#endif
