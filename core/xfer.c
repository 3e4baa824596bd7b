/* The copy queue (see xfer.h): a doubly linked list of caller-owned jobs under one lock,
 * served by one copy thread: memcpy on the CPU, the copy stream on CUDA (xfer_cuda.cu). */
#include "core/xfer.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileio.h"
#ifdef MOE_HAVE_CUDA
#include "core/cuda/xfer_cuda.h"
#endif

struct moe_xfer {
    moe_device dev;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work, done; /* a job was queued / a job finished */
    moe_xfer_job *head, *tail;
    bool stop;
    size_t bytes;
    double busy_ms;
    void *stream;  /* CUDA: the copy stream */
    int device;    /* CUDA: its device */
    char err[512]; /* the message of the last failed copy */
};

/* One copy on the copy thread, issued (on the CPU: done). */
static moe_status copy_issue(moe_xfer *x, moe_xfer_job *j) {
#ifdef MOE_HAVE_CUDA
    if (x->dev == MOE_CUDA)
        return moe_cuda_copy_issue(x->stream, x->device, j->fence, &j->landed, j->dst, j->src, j->bytes);
#endif
    memcpy(j->dst, j->src, j->bytes);
    return MOE_OK;
}

/* Blocks until an issued copy has landed (CUDA). */
static moe_status copy_settle(moe_xfer *x, moe_xfer_job *j) {
#ifdef MOE_HAVE_CUDA
    if (x->dev == MOE_CUDA) return moe_cuda_copy_settle(j->landed);
#endif
    (void)x, (void)j;
    return MOE_OK;
}

static void unlink_job(moe_xfer *x, moe_xfer_job *j) {
    if (j->prev) j->prev->next = j->next;
    else x->head = j->next;
    if (j->next) j->next->prev = j->prev;
    else x->tail = j->prev;
    j->prev = j->next = NULL;
}

/* Inserts j before `at` (NULL: at the tail). */
static void insert_before(moe_xfer *x, moe_xfer_job *j, moe_xfer_job *at) {
    j->next = at;
    j->prev = at ? at->prev : x->tail;
    if (j->prev) j->prev->next = j;
    else x->head = j;
    if (at) at->prev = j;
    else x->tail = j;
}

/* The first queued job that is not urgent (where an urgent one goes), or NULL. */
static moe_xfer_job *first_plain(moe_xfer *x) {
    moe_xfer_job *j = x->head;
    while (j && j->urgent) j = j->next;
    return j;
}

static void *copy_thread(void *arg) {
    moe_xfer *x = arg;
    pthread_mutex_lock(&x->mu);
    for (;;) {
        while (!x->head && !x->stop) pthread_cond_wait(&x->work, &x->mu);
        if (!x->head) break;
        moe_xfer_job *j = x->head;
        unlink_job(x, j);
        j->state = MOE_XFER_COPYING;
        pthread_mutex_unlock(&x->mu);
        double t0 = moe_clock_ms();
        moe_status st = copy_issue(x, j);
        if (st == MOE_OK) { /* waiters may go on from here (CUDA: on the landing event) */
            pthread_mutex_lock(&x->mu);
            j->issued = true;
            pthread_cond_broadcast(&x->done);
            pthread_mutex_unlock(&x->mu);
            st = copy_settle(x, j);
        }
        double ms = moe_clock_ms() - t0;
        pthread_mutex_lock(&x->mu);
        j->status = st;
        if (st != MOE_OK) snprintf(x->err, sizeof x->err, "%s", moe_last_error());
        x->bytes += j->bytes;
        x->busy_ms += ms;
        j->state = MOE_XFER_DONE;
        pthread_cond_broadcast(&x->done);
    }
    pthread_mutex_unlock(&x->mu);
    return NULL;
}

/* Frees what moe_xfer_create made once the copy thread is gone (or never started). */
static void release_queue(moe_xfer *x) {
    pthread_mutex_destroy(&x->mu);
    pthread_cond_destroy(&x->work);
    pthread_cond_destroy(&x->done);
#ifdef MOE_HAVE_CUDA
    moe_cuda_copy_stream_free(x->stream);
#endif
    free(x);
}

moe_status moe_xfer_create(moe_device dev, moe_xfer **out) {
    *out = NULL;
#ifndef MOE_HAVE_CUDA
    if (dev != MOE_CPU) return moe_error(MOE_ERR_UNSUPPORTED, "copy queue: %s is not built", moe_device_name(dev));
#endif
    moe_xfer *x = calloc(1, sizeof *x);
    if (!x) return moe_error(MOE_ERR_OOM, "copy queue: out of host memory");
    x->dev = dev;
#ifdef MOE_HAVE_CUDA
    if (dev == MOE_CUDA) {
        moe_status s = moe_cuda_copy_stream_create(&x->stream, &x->device);
        if (s != MOE_OK) {
            free(x);
            return s;
        }
    }
#endif
    pthread_mutex_init(&x->mu, NULL);
    pthread_cond_init(&x->work, NULL);
    pthread_cond_init(&x->done, NULL);
    if (pthread_create(&x->thread, NULL, copy_thread, x) != 0) {
        release_queue(x);
        return moe_error(MOE_ERR_DEVICE, "copy queue: cannot start the copy thread");
    }
    *out = x;
    return MOE_OK;
}

void moe_xfer_free(moe_xfer *x) {
    if (!x) return;
    pthread_mutex_lock(&x->mu);
    while (x->head) {
        moe_xfer_job *j = x->head;
        unlink_job(x, j);
        j->state = MOE_XFER_IDLE;
    }
    x->stop = true;
    pthread_cond_signal(&x->work);
    pthread_mutex_unlock(&x->mu);
    pthread_join(x->thread, NULL);
    release_queue(x);
}

moe_status moe_xfer_submit(moe_xfer *x, moe_xfer_job *j, bool urgent) {
    MOE_ASSERT(j->state == MOE_XFER_IDLE || j->state == MOE_XFER_DONE, "copy queue: job submitted twice");
#ifdef MOE_HAVE_CUDA
    if (x->dev == MOE_CUDA) MOE_TRY(moe_cuda_fence_record(&j->fence));
#endif
    pthread_mutex_lock(&x->mu);
    j->status = MOE_OK;
    j->urgent = urgent;
    j->issued = false;
    j->state = MOE_XFER_QUEUED;
    insert_before(x, j, urgent ? first_plain(x) : NULL);
    pthread_cond_signal(&x->work);
    pthread_mutex_unlock(&x->mu);
    return MOE_OK;
}

void moe_xfer_job_release(moe_xfer_job *j) {
#ifdef MOE_HAVE_CUDA
    moe_cuda_event_free(j->fence);
    moe_cuda_event_free(j->landed);
#endif
    j->fence = j->landed = NULL;
}

void moe_xfer_expedite(moe_xfer *x, moe_xfer_job *j) {
    pthread_mutex_lock(&x->mu);
    if (j->state == MOE_XFER_QUEUED && !j->urgent) {
        unlink_job(x, j);
        j->urgent = true;
        insert_before(x, j, first_plain(x));
    }
    pthread_mutex_unlock(&x->mu);
}

bool moe_xfer_done(moe_xfer *x, moe_xfer_job *j) {
    pthread_mutex_lock(&x->mu);
    bool done = j->state == MOE_XFER_DONE;
    pthread_mutex_unlock(&x->mu);
    return done;
}

moe_status moe_xfer_wait(moe_xfer *x, moe_xfer_job *j) {
    pthread_mutex_lock(&x->mu);
    MOE_ASSERT(j->state != MOE_XFER_IDLE, "copy queue: waiting on a job never submitted");
    bool on_device = x->dev != MOE_CPU;
    while (j->state != MOE_XFER_DONE && !(on_device && j->state == MOE_XFER_COPYING && j->issued))
        pthread_cond_wait(&x->done, &x->mu);
#ifdef MOE_HAVE_CUDA
    if (j->state != MOE_XFER_DONE) { /* issued, landing: the compute stream waits for it */
        void *landed = j->landed;
        pthread_mutex_unlock(&x->mu);
        return moe_cuda_compute_wait(landed);
    }
#endif
    moe_status st = j->status;
    char err[sizeof x->err];
    memcpy(err, x->err, sizeof err);
    pthread_mutex_unlock(&x->mu);
    return st == MOE_OK ? MOE_OK : moe_error(st, "%s", err);
}

moe_status moe_xfer_pin(moe_device dev, void *p, size_t bytes) {
#ifdef MOE_HAVE_CUDA
    if (dev == MOE_CUDA) return moe_cuda_host_register(p, bytes);
#endif
    (void)dev, (void)p, (void)bytes;
    return MOE_OK;
}

void moe_xfer_unpin(moe_device dev, void *p) {
#ifdef MOE_HAVE_CUDA
    if (dev == MOE_CUDA) moe_cuda_host_unregister(p);
#endif
    (void)dev, (void)p;
}

moe_tensor *moe_xfer_pinned_empty(moe_device dev, moe_dtype dt, int ndim, const int64_t *shape) {
    moe_tensor *t = moe_tensor_empty(MOE_LIFE_PERSIST, MOE_CPU, dt, ndim, shape);
    size_t bytes = t ? (size_t)moe_tensor_numel(t) * moe_dtype_size(dt) : 0;
    if (bytes && moe_xfer_pin(dev, t->base, bytes) != MOE_OK) {
        moe_tensor_free(t);
        return NULL;
    }
    return t;
}

void moe_xfer_pinned_free(moe_device dev, moe_tensor *t) {
    if (!t) return;
    if (moe_tensor_numel(t) > 0) moe_xfer_unpin(dev, t->base);
    moe_tensor_free(t);
}

bool moe_xfer_cancel(moe_xfer *x, moe_xfer_job *j) {
    pthread_mutex_lock(&x->mu);
    if (j->state == MOE_XFER_QUEUED) {
        unlink_job(x, j);
        j->state = MOE_XFER_IDLE;
    }
    while (j->state == MOE_XFER_COPYING) pthread_cond_wait(&x->done, &x->mu);
    bool copied = j->state == MOE_XFER_DONE;
    pthread_mutex_unlock(&x->mu);
    return copied;
}

void moe_xfer_stats(moe_xfer *x, size_t *bytes, double *busy_ms) {
    pthread_mutex_lock(&x->mu);
    *bytes = x->bytes;
    *busy_ms = x->busy_ms;
    pthread_mutex_unlock(&x->mu);
}
