/* CUDA INDEX_ADD (the embedding backward) against the CPU kernel: hot rows (16384 source
 * rows into 256 targets, skewed), a 32k-row table, widths off the column tile, m = 0 and
 * m = 1. f32: within 1e-5 of each element's sum of magnitudes; bf16 (inputs that f32 adds
 * exactly): within one bf16 ulp of the CPU's f32 result rounded once, which a kernel that
 * rounds every add to bf16 misses by far on hot rows. Two CUDA runs give the same bits,
 * and an out-of-range index is reported at the next synchronisation. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/device.h"
#include "core/kernels.h"
#include "core/memory.h"
#include "core/ops.h"
#include "core/tensor.h"
#include "tests/harness/testlib.h"

typedef struct ia_case {
    const char *name;
    int64_t n, m, r; /* x [n, r], idx [m], src [m, r] */
    bool skewed;     /* 40% of the rows into target 32, the rest crowded towards row 0 */
} ia_case;

static const ia_case CASES[] = {
    {"hot rows: 16384 into 256, width 768", 256, 16384, 768, true},
    {"hot rows, width 300 (off the column tile)", 256, 16384, 300, true},
    {"32k-row table, width 1024", 32768, 16384, 1024, false},
    {"32k-row table skewed, width 5", 32768, 4000, 5, true},
    {"m = 1", 256, 1, 77, false},
    {"m = 0", 256, 0, 64, false},
};
#define N_CASES ((int)(sizeof CASES / sizeof *CASES))

/* Host data as f32: idx [m], x [n * r], src [m * r] (each at least one element). */
typedef struct ia_data {
    int32_t *idx;
    float *x, *src;
} ia_data;

static uint64_t next_u64(uint64_t *s) { /* splitmix64 */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double next_unit(uint64_t *s) { return (double)(next_u64(s) >> 11) * 0x1p-53; }

/* dyadic: multiples of 1/64 in [-2, 2] (x: of 1/16 in [-8, 8]), exact in bf16, and any f32
 * sum of 16384 of them is exact; otherwise uniform in [-2, 2) (x: [-8, 8)). */
static float value(uint64_t *s, bool dyadic, float scale) {
    if (dyadic) return scale * (float)((int)(next_u64(s) % 257) - 128) / 64.0f;
    return scale * (float)(4.0 * next_unit(s) - 2.0);
}

static void make_data(const ia_case *c, bool dyadic, ia_data *d) {
    uint64_t s = (uint64_t)(c->n * 1000003 + c->m * 31 + c->r);
    d->idx = malloc(sizeof(int32_t) * (size_t)(c->m + 1));
    d->x = malloc(sizeof(float) * (size_t)(c->n * c->r + 1));
    d->src = malloc(sizeof(float) * (size_t)(c->m * c->r + 1));
    CU_ASSERT_FATAL(d->idx && d->x && d->src);
    for (int64_t i = 0; i < c->m; i++) {
        double u = next_unit(&s);
        if (!c->skewed) d->idx[i] = (int32_t)(u * (double)c->n);
        else if (u < 0.4) d->idx[i] = 32;
        else d->idx[i] = (int32_t)(pow(next_unit(&s), 3.0) * (double)c->n);
    }
    for (int64_t i = 0; i < c->n * c->r; i++) d->x[i] = value(&s, dyadic, 4.0f);
    for (int64_t i = 0; i < c->m * c->r; i++) d->src[i] = value(&s, dyadic, 1.0f);
}

static void free_data(ia_data *d) {
    free(d->idx);
    free(d->x);
    free(d->src);
}

/* A [rows, r] tensor on dev holding f32 host data as dt. */
static moe_tensor *upload(moe_device dev, moe_dtype dt, int64_t rows, int64_t r, const float *host) {
    int64_t shape[2] = {rows, r};
    if (dt == MOE_F32) return moe_tensor_from_host(MOE_LIFE_STEP, dev, MOE_F32, 2, shape, host);
    uint16_t *h = malloc(sizeof(uint16_t) * (size_t)(rows * r + 1));
    CU_ASSERT_FATAL(h != NULL);
    for (int64_t i = 0; i < rows * r; i++) h[i] = moe_f32_to_bf16(host[i]);
    moe_tensor *t = moe_tensor_from_host(MOE_LIFE_STEP, dev, MOE_BF16, 2, shape, h);
    free(h);
    return t;
}

/* out [n * r] = moe_index_add(x, idx, src) on dev in dt, read back. */
static moe_status index_add_on(moe_device dev, moe_dtype dt, const ia_case *c, const ia_data *d, double *out) {
    moe_tensor *x = upload(dev, dt, c->n, c->r, d->x), *src = upload(dev, dt, c->m, c->r, d->src);
    moe_tensor *idx = moe_tensor_from_host(MOE_LIFE_STEP, dev, MOE_I32, 1, (int64_t[]){c->m}, d->idx);
    moe_tensor *y = x && src && idx ? moe_index_add(x, idx, src) : NULL;
    return y ? moe_tensor_to_host_f64(y, out) : moe_last_status();
}

/* Each element's |x| + sum of |src| added into it: the scale of f32 rounding. */
static double *magnitudes(const ia_case *c, const ia_data *d) {
    double *mag = malloc(sizeof(double) * (size_t)(c->n * c->r + 1));
    CU_ASSERT_FATAL(mag != NULL);
    for (int64_t i = 0; i < c->n * c->r; i++) mag[i] = fabs(d->x[i]);
    for (int64_t i = 0; i < c->m; i++)
        for (int64_t j = 0; j < c->r; j++) mag[d->idx[i] * c->r + j] += fabs(d->src[i * c->r + j]);
    return mag;
}

/* One bf16 ulp at v (a bf16 value); 0 has none (exact). */
static double bf16_ulp(double v) {
    int e = 0;
    if (v == 0) return 0;
    frexp(v, &e);
    return ldexp(1.0, e - 8);
}

/* Elements of got outside the tolerance around the CPU's f32 result ref. */
static int64_t count_bad(const ia_case *c, moe_dtype dt, const ia_data *d, const double *ref, const double *got,
                         double *worst) {
    double *mag = dt == MOE_F32 ? magnitudes(c, d) : NULL;
    int64_t bad = 0;
    *worst = 0;
    for (int64_t i = 0; i < c->n * c->r; i++) {
        double want = ref[i], tol = 0;
        if (dt == MOE_F32) {
            tol = 1e-5 * mag[i];
        } else {
            want = moe_bf16_to_f32(moe_f32_to_bf16((float)ref[i])); /* rounded once */
            tol = bf16_ulp(want);
        }
        double err = fabs(got[i] - want);
        if (err > tol) bad++;
        if (tol > 0 && err / tol > *worst) *worst = err / tol;
    }
    free(mag);
    return bad;
}

static void check_case(const ia_case *c, moe_dtype dt) {
    ia_data d;
    make_data(c, dt == MOE_BF16, &d);
    size_t bytes = sizeof(double) * (size_t)(c->n * c->r);
    double *ref = malloc(bytes), *g1 = malloc(bytes), *g2 = malloc(bytes);
    CU_ASSERT_FATAL(ref && g1 && g2);
    CHECK_OK(index_add_on(MOE_CPU, MOE_F32, c, &d, ref));
    CHECK_OK(index_add_on(MOE_CUDA, dt, c, &d, g1));
    CHECK_OK(index_add_on(MOE_CUDA, dt, c, &d, g2));
    double worst = 0;
    int64_t bad = count_bad(c, dt, &d, ref, g1, &worst);
    bool same = memcmp(g1, g2, bytes) == 0;
    fprintf(stderr, "  %-44s %s: %lld of %lld outside, worst %.3g of the tolerance, runs %s\n", c->name,
            moe_dtype_name(dt), (long long)bad, (long long)(c->n * c->r), worst, same ? "bitwise equal" : "DIFFER");
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT(same);
    free(ref);
    free(g1);
    free(g2);
    free_data(&d);
    moe_step_reset();
}

static bool have_cuda(void) {
    if (moe_backend_get(MOE_CUDA)) return true;
    fprintf(stderr, "  no CUDA device: %s\n", moe_last_error());
    CU_FAIL("no CUDA device");
    return false;
}

static void test_f32(void) {
    if (!have_cuda()) return;
    for (int i = 0; i < N_CASES; i++) check_case(&CASES[i], MOE_F32);
}

static void test_bf16(void) {
    if (!have_cuda()) return;
    for (int i = 0; i < N_CASES; i++) check_case(&CASES[i], MOE_BF16);
}

static void test_fault_reported(void) {
    if (!have_cuda()) return;
    moe_tensor *x = moe_tensor_zeros(MOE_LIFE_STEP, MOE_CUDA, MOE_BF16, 2, (int64_t[]){256, 8});
    moe_tensor *src = moe_tensor_randn(MOE_LIFE_STEP, MOE_CUDA, MOE_BF16, 2, (int64_t[]){6, 8}, 1, 0, 1.0);
    int32_t ids[6] = {3, 3, 0, 255, 3, 300};
    moe_tensor *idx = moe_tensor_from_host(MOE_LIFE_STEP, MOE_CUDA, MOE_I32, 1, (int64_t[]){6}, ids);
    CU_ASSERT_PTR_NOT_NULL_FATAL(idx);
    CU_ASSERT_PTR_NOT_NULL(moe_index_add(x, idx, src)); /* launches without a host wait */
    CU_ASSERT_EQUAL(moe_device_sync(MOE_CUDA), MOE_ERR_INVALID);
    const char *msg = moe_last_error();
    fprintf(stderr, "  reported: %s\n", msg);
    CU_ASSERT(strstr(msg, "index_add") && strstr(msg, "index 300 at position 5") && strstr(msg, "[0, 256)"));
    CU_ASSERT_EQUAL(moe_device_sync(MOE_CUDA), MOE_OK);
    moe_step_reset();
}

static void register_suites(void) {
    moe_test_add_suite("cuda_ops_index", (moe_test_entry[]){{"index_add f32 = cpu, deterministic", test_f32},
                                                             {"index_add bf16 = cpu rounded once, deterministic",
                                                              test_bf16},
                                                             {"index_add out-of-range index reported", test_fault_reported},
                                                             {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
