/* The copy queue (core/xfer.h) on the CPU: every job lands its bytes whatever the order of
 * submits, urgent jobs, expedites and waits (a wait issues a queued job itself); a
 * cancelled job either landed whole or left its destination untouched, and says which; a
 * job can be submitted again; freeing the queue with jobs queued leaves none copying. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/philox.h"
#include "core/xfer.h"
#include "tests/harness/testlib.h"

enum { JOBS = 48, BIG = 32 << 20 };

typedef struct buffers {
    uint8_t *src[JOBS], *dst[JOBS];
    size_t bytes[JOBS];
    moe_xfer_job job[JOBS];
} buffers;

/* Jobs of 1 KiB .. 256 KiB from deterministic bytes into zeroed destinations. */
static buffers *buffers_make(void) {
    buffers *b = calloc(1, sizeof *b);
    for (int i = 0; i < JOBS; i++) {
        b->bytes[i] = (size_t)1024 << (i % 9);
        b->src[i] = malloc(b->bytes[i]);
        b->dst[i] = calloc(1, b->bytes[i]);
        for (size_t k = 0; k < b->bytes[i]; k++) b->src[i][k] = (uint8_t)(256 * moe_philox_uniform(k, (uint64_t)i + 1));
        b->job[i] = (moe_xfer_job){.dst = b->dst[i], .src = b->src[i], .bytes = b->bytes[i]};
    }
    return b;
}

static void buffers_free(buffers *b) {
    for (int i = 0; i < JOBS; i++) free(b->src[i]), free(b->dst[i]);
    free(b);
}

static bool landed(const buffers *b, int i) { return !memcmp(b->dst[i], b->src[i], b->bytes[i]); }

static bool untouched(const buffers *b, int i) {
    for (size_t k = 0; k < b->bytes[i]; k++)
        if (b->dst[i][k]) return false;
    return true;
}

/* Mixed urgent and plain submits, some expedited, waited in reverse order. */
static void test_every_job_lands(void) {
    moe_xfer *x;
    CHECK_OK(moe_xfer_create(MOE_CPU, &x));
    buffers *b = buffers_make();
    size_t total = 0;
    for (int i = 0; i < JOBS; i++) {
        CHECK_OK(moe_xfer_submit(x, &b->job[i], i % 3 == 0));
        if (i % 5 == 4) moe_xfer_expedite(x, &b->job[i - 2]);
        total += b->bytes[i];
    }
    int bad = 0;
    for (int i = JOBS - 1; i >= 0; i--) {
        CHECK_OK(moe_xfer_wait(x, &b->job[i]));
        bad += !landed(b, i) || !moe_xfer_done(x, &b->job[i]);
    }
    CU_ASSERT_EQUAL(bad, 0);
    size_t bytes;
    double ms;
    moe_xfer_stats(x, &bytes, &ms);
    CU_ASSERT_EQUAL(bytes, total);
    moe_xfer_free(x);
    buffers_free(b);
}

/* Behind one large copy, each job is cancelled: a copied one (true) landed whole, the rest
 * left their destination as it was; submitted again, every one lands. */
static void test_cancel_says_what_landed(void) {
    moe_xfer *x;
    CHECK_OK(moe_xfer_create(MOE_CPU, &x));
    buffers *b = buffers_make();
    uint8_t *big_src = calloc(1, BIG), *big_dst = malloc(BIG);
    moe_xfer_job big = {.dst = big_dst, .src = big_src, .bytes = BIG};
    CHECK_OK(moe_xfer_submit(x, &big, false));
    for (int i = 0; i < JOBS; i++) CHECK_OK(moe_xfer_submit(x, &b->job[i], false));
    int wrong = 0, kept = 0;
    for (int i = JOBS - 1; i >= 0; i--) {
        bool copied = moe_xfer_cancel(x, &b->job[i]);
        wrong += copied ? !landed(b, i) : !untouched(b, i);
        kept += !copied;
    }
    CU_ASSERT_EQUAL(wrong, 0);
    CU_ASSERT(kept > 0); /* the large copy ahead keeps most of them queued */
    for (int i = 0; i < JOBS; i++) CHECK_OK(moe_xfer_submit(x, &b->job[i], i % 2 == 0));
    for (int i = 0; i < JOBS; i++) {
        CHECK_OK(moe_xfer_wait(x, &b->job[i]));
        wrong += !landed(b, i);
    }
    CHECK_OK(moe_xfer_wait(x, &big));
    CU_ASSERT_EQUAL(wrong, 0);
    moe_xfer_free(x);
    free(big_src), free(big_dst);
    buffers_free(b);
}

/* Freed with jobs queued: each queued job is back to IDLE, none left copying. */
static void test_free_with_jobs_queued(void) {
    moe_xfer *x;
    CHECK_OK(moe_xfer_create(MOE_CPU, &x));
    buffers *b = buffers_make();
    for (int i = 0; i < JOBS; i++) CHECK_OK(moe_xfer_submit(x, &b->job[i], false));
    moe_xfer_free(x);
    int bad = 0;
    for (int i = 0; i < JOBS; i++) {
        moe_xfer_state s = b->job[i].state;
        bad += s == MOE_XFER_DONE ? !landed(b, i) : s != MOE_XFER_IDLE;
    }
    CU_ASSERT_EQUAL(bad, 0);
    buffers_free(b);
}

static void register_suites(void) {
    moe_test_add_suite("xfer", (moe_test_entry[]){{"every job lands", test_every_job_lands},
                                                  {"cancel says what landed", test_cancel_says_what_landed},
                                                  {"free with jobs queued", test_free_with_jobs_queued},
                                                  {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
