/* The CUDA side of the copy queue (core/xfer.c): a copy stream of its own, host-to-device
 * copies on it that first wait for a fence recorded on the compute stream (so a slot is
 * never overwritten before the kernels queued to read it have run), and page-locking of
 * host memory the copies read. Plain C declarations; defined in xfer_cuda.cu. */
#ifndef MOE_CORE_CUDA_XFER_CUDA_H
#define MOE_CORE_CUDA_XFER_CUDA_H

#include <stddef.h>

#include "core/status.h"

/* A non-blocking stream on the current device (*device: that device). */
moe_status moe_cuda_copy_stream_create(void **stream, int *device);
void moe_cuda_copy_stream_free(void *stream);
/* Records *fence (created on first use) on the compute stream: what is queued there now. */
moe_status moe_cuda_fence_record(void **fence);
/* Frees an event of the above (a fence or a landing event); NULL is a no-op. */
void moe_cuda_event_free(void *event);
/* On the copy stream: waits for fence (or not, NULL), copies bytes host -> device and
 * records *landed (created on first use) after the copy; returns once they are queued. */
moe_status moe_cuda_copy_issue(void *stream, int device, void *fence, void **landed, void *dst, const void *src,
                               size_t bytes);
/* Blocks the calling thread until the copy before `landed` has landed. */
moe_status moe_cuda_copy_settle(void *landed);
/* The compute stream waits (on the device) for the copy before `landed`. */
moe_status moe_cuda_compute_wait(void *landed);
/* Page-locks host memory [p, p + bytes) for fast asynchronous copies (and unlocks it). */
moe_status moe_cuda_host_register(void *p, size_t bytes);
void moe_cuda_host_unregister(void *p);

#endif
