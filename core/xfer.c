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

/* Jobs linked through their prev/next: the queue (not yet issued, in issue order) or the
 * flight (CUDA: issued on the copy stream, landing, in the order issued). */
typedef struct job_list {
    moe_xfer_job *head, *tail;
} job_list;

struct moe_xfer {
    moe_device dev;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work, done; /* a job was queued or issued / a job was issued or finished */
    job_list queue, flight;
    int n_flight, max_flight;  /* jobs the copy thread keeps issued ahead of their landing */
    bool stop;
    size_t bytes;
    double busy_ms, busy_since; /* copy engine busy: while the flight is not empty (CUDA) */
    void *stream;  /* CUDA: the copy stream */
    int device;    /* CUDA: its device */
    char err[512]; /* the message of the last failed copy */
};

/* One copy issued (on the CPU: done) by whichever thread takes the job off the queue. */
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

static void list_unlink(job_list *l, moe_xfer_job *j) {
    if (j->prev) j->prev->next = j->next;
    else l->head = j->next;
    if (j->next) j->next->prev = j->prev;
    else l->tail = j->prev;
    j->prev = j->next = NULL;
}

/* Inserts j before `at` (NULL: at the tail). */
static void list_insert_before(job_list *l, moe_xfer_job *j, moe_xfer_job *at) {
    j->next = at;
    j->prev = at ? at->prev : l->tail;
    if (j->prev) j->prev->next = j;
    else l->head = j;
    if (at) at->prev = j;
    else l->tail = j;
}

/* The first queued job that is not urgent (where an urgent one goes), or NULL. */
static moe_xfer_job *first_plain(moe_xfer *x) {
    moe_xfer_job *j = x->queue.head;
    while (j && j->urgent) j = j->next;
    return j;
}

/* Job j leaves the state COPYING (lock held): done, with the copy's status. */
static void finish_job(moe_xfer *x, moe_xfer_job *j, moe_status st) {
    j->status = st;
    if (st != MOE_OK) snprintf(x->err, sizeof x->err, "%s", moe_last_error());
    else x->bytes += j->bytes;
    j->state = MOE_XFER_DONE;
    pthread_cond_broadcast(&x->done);
}

/* Takes queued job j and issues its copy (lock held on entry and exit, released during
 * the copy): on CUDA it joins the flight, which the copy thread settles; on the CPU the
 * copy is done here. */
static void issue_job(moe_xfer *x, moe_xfer_job *j) {
    list_unlink(&x->queue, j);
    j->state = MOE_XFER_COPYING;
    pthread_mutex_unlock(&x->mu);
    double t0 = moe_clock_ms();
    moe_status st = copy_issue(x, j);
    double t1 = moe_clock_ms();
    pthread_mutex_lock(&x->mu);
    if (st != MOE_OK || x->dev == MOE_CPU) {
        if (x->dev == MOE_CPU) x->busy_ms += t1 - t0;
        finish_job(x, j, st);
        return;
    }
    if (!x->flight.head) x->busy_since = t0;
    j->issued = true;
    list_insert_before(&x->flight, j, NULL);
    x->n_flight++;
    pthread_cond_broadcast(&x->done);
    pthread_cond_signal(&x->work); /* the copy thread settles it */
}

/* The copy thread settles the oldest issued copy (lock held on entry and exit). */
static void settle_oldest(moe_xfer *x) {
    moe_xfer_job *j = x->flight.head;
    pthread_mutex_unlock(&x->mu);
    moe_status st = copy_settle(x, j);
    double now = moe_clock_ms();
    pthread_mutex_lock(&x->mu);
    list_unlink(&x->flight, j);
    x->n_flight--;
    if (!x->flight.head) x->busy_ms += now - x->busy_since;
    finish_job(x, j, st);
}

/* Issues queued jobs while fewer than max_flight are landing, settles the landing ones in
 * order; on stop, once the flight has landed. A job the compute path waits on may be
 * issued there first (moe_xfer_wait), so that a demanded copy never waits for this thread
 * to wake. */
static void *copy_thread(void *arg) {
    moe_xfer *x = arg;
    pthread_mutex_lock(&x->mu);
    for (;;) {
        if (x->queue.head && !x->stop && x->n_flight < x->max_flight) issue_job(x, x->queue.head);
        else if (x->flight.head) settle_oldest(x);
        else if (x->stop) break;
        else pthread_cond_wait(&x->work, &x->mu);
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
    x->max_flight = 2; /* one expert's two tensors: the next starts as the last lands */
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
    while (x->queue.head) {
        moe_xfer_job *j = x->queue.head;
        list_unlink(&x->queue, j);
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
    list_insert_before(&x->queue, j, urgent ? first_plain(x) : NULL);
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
        list_unlink(&x->queue, j);
        j->urgent = true;
        list_insert_before(&x->queue, j, first_plain(x));
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
    if (j->state == MOE_XFER_QUEUED) issue_job(x, j); /* behind what is landing, ahead of the queue */
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
        list_unlink(&x->queue, j);
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
