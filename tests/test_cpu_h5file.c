/* Tests for core/h5file: round trips of every dtype, strings and scalars; refusal of
 * missing, truncated, uncommitted and bit-flipped files with clear messages; atomic
 * replacement; retention (keep_last) and find_latest; no leaked HDF5 ids; reads run in a
 * child process (a fault there fails the read). */
#include "tests/harness/testlib.h"
#include "tests/harness/files.h"

#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/contain.h"
#include "core/h5file.h"

static const char *const yaml_text =
    "model:\n  d_model: 64\n  experts: 8 # comment\n\ntrain:\n  lr: 3.0e-4\n  name: \"x y\"\n";

/* A fresh scratch dir copied out of the harness's static buffer. */
static void scratch(const char *name, char *dir, size_t cap) {
    const char *d = moe_test_tmpdir(name);
    CU_ASSERT_PTR_NOT_NULL_FATAL(d);
    snprintf(dir, cap, "%s", d);
}

static bool file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* A small committed checkpoint holding "step" and a 1000-float array. */
static void write_small(const char *path, int64_t step) {
    moe_h5 *w;
    float data[1000];
    for (int i = 0; i < 1000; i++) data[i] = (float)(step * 1000 + i);
    CHECK_OK(moe_h5_create(path, &w));
    CHECK_OK(moe_h5_put_i64(w, "train/step", step));
    CHECK_OK(moe_h5_put_array(w, "params/w", MOE_H5_F32, 1, (int64_t[]){1000}, data));
    CHECK_OK(moe_h5_commit(w));
}

static int64_t read_step(const char *path) {
    moe_h5 *r;
    int64_t step = -1;
    CHECK_OK(moe_h5_open(path, &r));
    CHECK_OK(moe_h5_get_i64(r, "train/step", &step));
    moe_h5_close(r);
    return step;
}

static void test_roundtrip(void) {
    char dir[256], path[300];
    scratch("h5_roundtrip", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/ckpt-000001.h5", dir);
    int64_t ids_before = moe_h5_open_object_count();
    CU_ASSERT_EQUAL(ids_before, 0);

    float wq[2][3][4];
    for (int i = 0; i < 24; i++) (&wq[0][0][0])[i] = (float)i * 0.5f - 3.25f;
    uint16_t bf[5] = {0x3f80, 0xbf80, 0x0000, 0x7f80, 0x4049};
    double f64[1] = {-1.0 / 3.0};
    int32_t i32[3][1] = {{-7}, {0}, {2147483647}};
    int64_t i64_scalar = -9000000000000LL;
    uint8_t u8[7] = {0, 1, 2, 127, 128, 254, 255};
    float w1[2][2] = {{1.5f, -2.5f}, {1e-30f, 3e30f}};

    moe_h5 *w;
    CHECK_OK(moe_h5_create(path, &w));
    CHECK_OK(moe_h5_put_array(w, "params/layers.0.attn.wq", MOE_H5_F32, 3,
                              (int64_t[]){2, 3, 4}, wq));
    CHECK_OK(moe_h5_put_array(w, "params/emb", MOE_H5_BF16, 1, (int64_t[]){5}, bf));
    CHECK_OK(moe_h5_put_array(w, "opt/f64", MOE_H5_F64, 1, (int64_t[]){1}, f64));
    CHECK_OK(moe_h5_put_array(w, "opt/i32", MOE_H5_I32, 2, (int64_t[]){3, 1}, i32));
    CHECK_OK(moe_h5_put_array(w, "opt/i64_scalar", MOE_H5_I64, 0, NULL, &i64_scalar));
    CHECK_OK(moe_h5_put_array(w, "rng/u8", MOE_H5_U8, 1, (int64_t[]){7}, u8));
    CHECK_OK(moe_h5_put_array(w, "opt/empty", MOE_H5_F32, 2, (int64_t[]){0, 4}, NULL));
    CHECK_OK(moe_h5_put_array(w, "experts/layer3/expert17/w1", MOE_H5_F32, 2,
                              (int64_t[]){2, 2}, w1));
    CHECK_OK(moe_h5_put_string(w, "config", yaml_text));
    CHECK_OK(moe_h5_put_string(w, "meta/empty_text", ""));
    CHECK_OK(moe_h5_put_i64(w, "train/step", 123456789012LL));
    CHECK_OK(moe_h5_put_f64(w, "train/lr", 3.0e-4));
    CHECK_OK(moe_h5_commit(w));
    CU_ASSERT_TRUE(file_exists(path));
    char tmp[320];
    snprintf(tmp, sizeof tmp, "%s.tmp-%d", path, (int)getpid());
    CU_ASSERT_FALSE(file_exists(tmp));

    moe_h5 *r;
    CHECK_OK(moe_h5_open(path, &r));
    CU_ASSERT_TRUE(moe_h5_has(r, "params/layers.0.attn.wq"));
    CU_ASSERT_TRUE(moe_h5_has(r, "config"));
    CU_ASSERT_FALSE(moe_h5_has(r, "params/layers.1.attn.wq"));
    CU_ASSERT_FALSE(moe_h5_has(r, "params")); /* a group, not a dataset */
    CU_ASSERT_FALSE(moe_h5_has(r, "nope/deeper/x"));

    moe_h5_dtype dt;
    int ndim;
    int64_t shape[MOE_H5_MAX_NDIM];
    CHECK_OK(moe_h5_shape(r, "params/layers.0.attn.wq", &dt, &ndim, shape));
    CU_ASSERT_EQUAL(dt, MOE_H5_F32);
    CU_ASSERT_EQUAL(ndim, 3);
    CU_ASSERT(shape[0] == 2 && shape[1] == 3 && shape[2] == 4);
    CHECK_OK(moe_h5_shape(r, "params/emb", &dt, &ndim, shape));
    CU_ASSERT_EQUAL(dt, MOE_H5_BF16);
    CU_ASSERT(ndim == 1 && shape[0] == 5);
    CHECK_OK(moe_h5_shape(r, "opt/i64_scalar", &dt, &ndim, shape));
    CU_ASSERT(dt == MOE_H5_I64 && ndim == 0);
    CHECK_OK(moe_h5_shape(r, "opt/empty", &dt, &ndim, shape));
    CU_ASSERT(dt == MOE_H5_F32 && ndim == 2 && shape[0] == 0 && shape[1] == 4);
    CHECK_OK(moe_h5_shape(r, "rng/u8", &dt, &ndim, shape));
    CU_ASSERT(dt == MOE_H5_U8 && ndim == 1 && shape[0] == 7);

    float wq2[2][3][4];
    memset(wq2, 0, sizeof wq2);
    CHECK_OK(moe_h5_get_array(r, "params/layers.0.attn.wq", MOE_H5_F32, 3,
                              (int64_t[]){2, 3, 4}, wq2));
    CU_ASSERT_EQUAL(memcmp(wq, wq2, sizeof wq), 0);
    CU_ASSERT_EQUAL(wq2[1][2][3], 23 * 0.5f - 3.25f);
    uint16_t bf2[5] = {0};
    CHECK_OK(moe_h5_get_array(r, "params/emb", MOE_H5_BF16, 1, (int64_t[]){5}, bf2));
    CU_ASSERT_EQUAL(memcmp(bf, bf2, sizeof bf), 0);
    double f64b[1] = {0};
    CHECK_OK(moe_h5_get_array(r, "opt/f64", MOE_H5_F64, 1, (int64_t[]){1}, f64b));
    CU_ASSERT_EQUAL(f64b[0], -1.0 / 3.0);
    int32_t i32b[3][1] = {{0}};
    CHECK_OK(moe_h5_get_array(r, "opt/i32", MOE_H5_I32, 2, (int64_t[]){3, 1}, i32b));
    CU_ASSERT(i32b[0][0] == -7 && i32b[1][0] == 0 && i32b[2][0] == 2147483647);
    int64_t i64b = 0;
    CHECK_OK(moe_h5_get_array(r, "opt/i64_scalar", MOE_H5_I64, 0, NULL, &i64b));
    CU_ASSERT_EQUAL(i64b, -9000000000000LL);
    uint8_t u8b[7] = {0};
    CHECK_OK(moe_h5_get_array(r, "rng/u8", MOE_H5_U8, 1, (int64_t[]){7}, u8b));
    CU_ASSERT_EQUAL(memcmp(u8, u8b, sizeof u8), 0);
    CHECK_OK(moe_h5_get_array(r, "opt/empty", MOE_H5_F32, 2, (int64_t[]){0, 4}, NULL));
    float w1b[2][2] = {{0}};
    CHECK_OK(moe_h5_get_array(r, "experts/layer3/expert17/w1", MOE_H5_F32, 2,
                              (int64_t[]){2, 2}, w1b));
    CU_ASSERT_EQUAL(memcmp(w1, w1b, sizeof w1), 0);

    char *text = NULL;
    CHECK_OK(moe_h5_get_string(r, "config", &text));
    CU_ASSERT_STRING_EQUAL(text, yaml_text);
    free(text);
    CHECK_OK(moe_h5_get_string(r, "meta/empty_text", &text));
    CU_ASSERT_STRING_EQUAL(text, "");
    free(text);
    int64_t step = 0;
    double lr = 0;
    CHECK_OK(moe_h5_get_i64(r, "train/step", &step));
    CHECK_OK(moe_h5_get_f64(r, "train/lr", &lr));
    CU_ASSERT_EQUAL(step, 123456789012LL);
    CU_ASSERT_EQUAL(lr, 3.0e-4);
    moe_h5_close(r);
    CU_ASSERT_EQUAL(moe_h5_open_object_count(), ids_before);
}

typedef struct name_list {
    int n;
    char names[16][96];
    int stop_after; /* 0: never */
} name_list;

static moe_status collect(const char *name, void *user) {
    name_list *l = user;
    if (l->n < 16) snprintf(l->names[l->n], sizeof l->names[0], "%s", name);
    l->n++;
    if (l->stop_after && l->n == l->stop_after)
        return moe_error(MOE_ERR_INVALID, "stop at %s", name);
    return MOE_OK;
}

static void test_list(void) {
    char dir[256], path[300];
    scratch("h5_list", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/c.h5", dir);
    float one = 1.0f;
    moe_h5 *w;
    CHECK_OK(moe_h5_create(path, &w));
    CHECK_OK(moe_h5_put_array(w, "params/b", MOE_H5_F32, 1, (int64_t[]){1}, &one));
    CHECK_OK(moe_h5_put_array(w, "params/a.w", MOE_H5_F32, 1, (int64_t[]){1}, &one));
    CHECK_OK(moe_h5_put_array(w, "experts/layer0/expert1/w1", MOE_H5_F32, 0, NULL, &one));
    CHECK_OK(moe_h5_put_array(w, "experts/layer0/expert0/w1", MOE_H5_F32, 0, NULL, &one));
    CHECK_OK(moe_h5_put_array(w, "experts/layer0/expert0/w2", MOE_H5_F32, 0, NULL, &one));
    CHECK_OK(moe_h5_put_string(w, "config", "a: 1\n"));
    CHECK_OK(moe_h5_commit(w));

    moe_h5 *r;
    CHECK_OK(moe_h5_open(path, &r));
    name_list l = {0};
    CHECK_OK(moe_h5_list(r, "params", collect, &l));
    CU_ASSERT_EQUAL_FATAL(l.n, 2);
    CU_ASSERT_STRING_EQUAL(l.names[0], "params/a.w");
    CU_ASSERT_STRING_EQUAL(l.names[1], "params/b");

    memset(&l, 0, sizeof l);
    CHECK_OK(moe_h5_list(r, "experts", collect, &l));
    CU_ASSERT_EQUAL_FATAL(l.n, 3);
    CU_ASSERT_STRING_EQUAL(l.names[0], "experts/layer0/expert0/w1");
    CU_ASSERT_STRING_EQUAL(l.names[1], "experts/layer0/expert0/w2");
    CU_ASSERT_STRING_EQUAL(l.names[2], "experts/layer0/expert1/w1");

    memset(&l, 0, sizeof l);
    CHECK_OK(moe_h5_list(r, "", collect, &l));
    CU_ASSERT_EQUAL_FATAL(l.n, 6);
    CU_ASSERT_STRING_EQUAL(l.names[0], "config");

    memset(&l, 0, sizeof l);
    CHECK_OK(moe_h5_list(r, "no_such_group", collect, &l));
    CU_ASSERT_EQUAL(l.n, 0);

    memset(&l, 0, sizeof l);
    l.stop_after = 2;
    CU_ASSERT_EQUAL(moe_h5_list(r, NULL, collect, &l), MOE_ERR_INVALID);
    CU_ASSERT_EQUAL(l.n, 2);
    CHECK_ERROR_HAS("stop at ");
    moe_h5_close(r);
}

static void test_mismatch(void) {
    char dir[256], path[300];
    scratch("h5_mismatch", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/c.h5", dir);
    float w[6] = {1, 2, 3, 4, 5, 6};
    moe_h5 *wr;
    CHECK_OK(moe_h5_create(path, &wr));
    CHECK_OK(moe_h5_put_array(wr, "params/w", MOE_H5_F32, 2, (int64_t[]){2, 3}, w));
    CHECK_OK(moe_h5_put_string(wr, "config", "x: 1\n"));
    CHECK_OK(moe_h5_commit(wr));

    moe_h5 *r;
    CHECK_OK(moe_h5_open(path, &r));
    int64_t ids_open = moe_h5_open_object_count();
    CU_ASSERT_EQUAL(ids_open, 1); /* the file itself */
    float dst[6] = {0};
    CU_ASSERT_EQUAL(moe_h5_get_array(r, "params/w", MOE_H5_F32, 2, (int64_t[]){3, 2}, dst),
                    MOE_ERR_FORMAT);
    CHECK_ERROR_HAS("'params/w'");
    CHECK_ERROR_HAS("has shape [2, 3], expected [3, 2]");
    CU_ASSERT_EQUAL(dst[0], 0.0f); /* nothing read */
    CU_ASSERT_EQUAL(moe_h5_get_array(r, "params/w", MOE_H5_F32, 1, (int64_t[]){6}, dst),
                    MOE_ERR_FORMAT);
    CHECK_ERROR_HAS("has shape [2, 3], expected [6]");
    CU_ASSERT_EQUAL(moe_h5_get_array(r, "params/w", MOE_H5_BF16, 2, (int64_t[]){2, 3}, dst),
                    MOE_ERR_FORMAT);
    CHECK_ERROR_HAS("'params/w'");
    CHECK_ERROR_HAS("is f32, expected bf16");
    int64_t v;
    CU_ASSERT_EQUAL(moe_h5_get_i64(r, "params/w", &v), MOE_ERR_FORMAT);
    CHECK_ERROR_HAS("is f32, expected i64");
    CU_ASSERT_EQUAL(moe_h5_get_array(r, "params/missing", MOE_H5_F32, 1, (int64_t[]){6}, dst),
                    MOE_ERR_FORMAT);
    CHECK_ERROR_HAS("has no dataset 'params/missing'");
    CHECK_ERROR_HAS(path);
    CU_ASSERT_EQUAL(moe_h5_get_array(r, "config", MOE_H5_U8, 1, (int64_t[]){5}, dst),
                    MOE_ERR_FORMAT);
    CHECK_ERROR_HAS("'config'");
    CHECK_ERROR_HAS("is text, not an array");
    char *text = (char *)"unchanged";
    CU_ASSERT_EQUAL(moe_h5_get_string(r, "params/w", &text), MOE_ERR_FORMAT);
    CU_ASSERT_PTR_NULL(text);
    CHECK_ERROR_HAS("not a text");
    CU_ASSERT_EQUAL(moe_h5_get_string(r, "nothing", &text), MOE_ERR_FORMAT);
    CHECK_ERROR_HAS("has no dataset 'nothing'");
    moe_h5_dtype dt;
    int ndim;
    int64_t shape[MOE_H5_MAX_NDIM];
    CU_ASSERT_EQUAL(moe_h5_shape(r, "config", &dt, &ndim, shape), MOE_ERR_FORMAT);
    CU_ASSERT_EQUAL(moe_h5_shape(r, "params", &dt, &ndim, shape), MOE_ERR_FORMAT);
    /* the failures above left no HDF5 id open */
    CU_ASSERT_EQUAL(moe_h5_open_object_count(), ids_open);
    moe_h5_close(r);
}

static void test_writer_errors(void) {
    char dir[256], path[300];
    scratch("h5_writer_errors", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/c.h5", dir);
    int64_t ids_before = moe_h5_open_object_count();
    CU_ASSERT_EQUAL(ids_before, 0);
    moe_h5 *w;
    CHECK_OK(moe_h5_create(path, &w));
    float x = 1.0f;
    const char *bad[] = {"", "/abs", "trail/", "a//b", "./x", "a/../b", "a/."};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CU_ASSERT_EQUAL(moe_h5_put_array(w, bad[i], MOE_H5_F32, 0, NULL, &x), MOE_ERR_INVALID);
        CHECK_ERROR_HAS("bad dataset name");
    }
    CHECK_OK(moe_h5_put_array(w, "a/x", MOE_H5_F32, 0, NULL, &x));
    CU_ASSERT_EQUAL(moe_h5_put_array(w, "a/x", MOE_H5_F32, 0, NULL, &x), MOE_ERR_INVALID);
    CHECK_ERROR_HAS("'a/x' is written twice");
    CU_ASSERT_EQUAL(moe_h5_put_string(w, "a/x", "t"), MOE_ERR_INVALID);
    /* "a/x" is a dataset, so it cannot also be a group */
    CU_ASSERT_EQUAL(moe_h5_put_array(w, "a/x/y", MOE_H5_F32, 0, NULL, &x), MOE_ERR_IO);
    CHECK_ERROR_HAS("'a/x/y'");
    CU_ASSERT_EQUAL(moe_h5_put_array(w, "neg", MOE_H5_F32, 1, (int64_t[]){-1}, &x),
                    MOE_ERR_INVALID);
    CHECK_ERROR_HAS("negative");
    CHECK_OK(moe_h5_commit(w));
    CHECK_OK(moe_h5_open(path, &w));
    CU_ASSERT_TRUE(moe_h5_has(w, "a/x"));
    CU_ASSERT_FALSE(moe_h5_has(w, "neg"));
    moe_h5_close(w);

    char missing_dir[320];
    snprintf(missing_dir, sizeof missing_dir, "%s/no/such/dir/c.h5", dir);
    w = (moe_h5 *)&x;
    CU_ASSERT_EQUAL(moe_h5_create(missing_dir, &w), MOE_ERR_IO);
    CU_ASSERT_PTR_NULL(w);
    CHECK_ERROR_HAS(missing_dir);
    CHECK_ERROR_HAS("directory exists");
    CU_ASSERT_EQUAL(moe_h5_open_object_count(), ids_before);
}

static void test_open_errors(void) {
    char dir[256], path[300];
    scratch("h5_open_errors", dir, sizeof dir);
    moe_h5 *r = (moe_h5 *)dir;
    snprintf(path, sizeof path, "%s/missing.h5", dir);
    CU_ASSERT_EQUAL(moe_h5_open(path, &r), MOE_ERR_IO);
    CU_ASSERT_PTR_NULL(r);
    CHECK_ERROR_HAS(path);
    CHECK_ERROR_HAS("No such file");
    CU_ASSERT_PTR_NULL(strstr(moe_last_error(), "checkpoint")); /* a trace or a predictor too: no kind named */

    CU_ASSERT_EQUAL(moe_h5_open(dir, &r), MOE_ERR_IO);
    CHECK_ERROR_HAS("is a directory");
    CU_ASSERT_PTR_NULL(strstr(moe_last_error(), "checkpoint"));

    snprintf(path, sizeof path, "%s/text.h5", dir);
    moe_test_write_file(path, yaml_text, strlen(yaml_text));
    CU_ASSERT_EQUAL(moe_h5_open(path, &r), MOE_ERR_FORMAT);
    CHECK_ERROR_HAS(path);
    CHECK_ERROR_HAS("is damaged or incomplete");

    snprintf(path, sizeof path, "%s/empty.h5", dir);
    moe_test_write_file(path, "", 0);
    CU_ASSERT_EQUAL(moe_h5_open(path, &r), MOE_ERR_FORMAT);
    CHECK_ERROR_HAS("is damaged or incomplete");
}

static void test_truncated(void) {
    char dir[256], path[300], cut[320];
    scratch("h5_truncated", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/c.h5", dir);
    write_small(path, 7);
    size_t size;
    unsigned char *bytes = moe_test_read_file(path, &size);
    CU_ASSERT_FATAL(size > 4000);
    int64_t ids_before = moe_h5_open_object_count();
    CU_ASSERT_EQUAL(ids_before, 0);
    const size_t lengths[] = {0, 8, 100, size / 10, size / 2, size * 9 / 10, size - 1};
    for (size_t i = 0; i < sizeof lengths / sizeof lengths[0]; i++) {
        snprintf(cut, sizeof cut, "%s/cut-%zu.h5", dir, lengths[i]);
        moe_test_write_file(cut, bytes, lengths[i]);
        moe_h5 *r = (moe_h5 *)dir;
        moe_status st = moe_h5_open(cut, &r);
        CU_ASSERT_EQUAL(st, MOE_ERR_FORMAT);
        CU_ASSERT_PTR_NULL(r);
        CHECK_ERROR_HAS(cut);
        CHECK_ERROR_HAS("is damaged or incomplete");
        if (st == MOE_OK) moe_h5_close(r);
    }
    CU_ASSERT_EQUAL(moe_h5_open_object_count(), ids_before);
    CU_ASSERT_EQUAL(read_step(path), 7);
    free(bytes);
}

/* Offset of the only occurrence of `pat` in buf, or -1. */
static long find_unique(const unsigned char *buf, size_t n, const void *pat, size_t m) {
    long at = -1;
    for (size_t i = 0; i + m <= n; i++) {
        if (memcmp(buf + i, pat, m) != 0) continue;
        if (at >= 0) return -1;
        at = (long)i;
    }
    return at;
}

static void test_flipped_byte(void) {
    char dir[256], path[300];
    scratch("h5_flipped", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/c.h5", dir);
    uint8_t pattern[256];
    for (int i = 0; i < 256; i++) pattern[i] = (uint8_t)(i * 37 + 11);
    const char *text = "marker-text: Zq8#kV2!pX\nsecond: line\n";
    float other[4] = {1, 2, 3, 4};
    moe_h5 *w;
    CHECK_OK(moe_h5_create(path, &w));
    CHECK_OK(moe_h5_put_array(w, "rng/state", MOE_H5_U8, 1, (int64_t[]){256}, pattern));
    CHECK_OK(moe_h5_put_array(w, "params/other", MOE_H5_F32, 1, (int64_t[]){4}, other));
    CHECK_OK(moe_h5_put_string(w, "config", text));
    CHECK_OK(moe_h5_commit(w));

    size_t size;
    unsigned char *bytes = moe_test_read_file(path, &size);
    long at = find_unique(bytes, size, pattern, sizeof pattern);
    long text_at = find_unique(bytes, size, text, strlen(text));
    CU_ASSERT_FATAL(at >= 0 && text_at >= 0);
    bytes[at + 100] ^= 0x01;
    bytes[text_at + 3] ^= 0x20;
    moe_test_write_file(path, bytes, size);
    free(bytes);

    moe_h5 *r;
    CHECK_OK(moe_h5_open(path, &r));
    uint8_t got[256];
    CU_ASSERT_EQUAL(moe_h5_get_array(r, "rng/state", MOE_H5_U8, 1, (int64_t[]){256}, got),
                    MOE_ERR_FORMAT);
    CHECK_ERROR_HAS("dataset 'rng/state' failed its checksum");
    CHECK_ERROR_HAS(path);
    char *s = NULL;
    CU_ASSERT_EQUAL(moe_h5_get_string(r, "config", &s), MOE_ERR_FORMAT);
    CU_ASSERT_PTR_NULL(s);
    CHECK_ERROR_HAS("dataset 'config' failed its checksum");
    float other2[4] = {0};
    CHECK_OK(moe_h5_get_array(r, "params/other", MOE_H5_F32, 1, (int64_t[]){4}, other2));
    CU_ASSERT_EQUAL(memcmp(other, other2, sizeof other), 0);
    moe_h5_close(r);
}

static pid_t dead_pid(void) {
    pid_t pid = fork();
    if (pid == 0) _exit(0);
    waitpid(pid, NULL, 0);
    return pid;
}

static void test_uncommitted(void) {
    char dir[256], path[300], tmp[340];
    scratch("h5_uncommitted", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/ckpt-000001.h5", dir);
    write_small(path, 1);

    /* aborted: the old file stays, the temporary goes */
    moe_h5 *w;
    CHECK_OK(moe_h5_create(path, &w));
    CHECK_OK(moe_h5_put_i64(w, "train/step", 2));
    snprintf(tmp, sizeof tmp, "%s.tmp-%d", path, (int)getpid());
    CU_ASSERT_TRUE(file_exists(tmp));
    moe_h5_abort(w);
    CU_ASSERT_FALSE(file_exists(tmp));
    CU_ASSERT_EQUAL(read_step(path), 1);

    /* still being written (never committed): readers see the old file */
    CHECK_OK(moe_h5_create(path, &w));
    CHECK_OK(moe_h5_put_i64(w, "train/step", 3));
    CU_ASSERT_EQUAL(read_step(path), 1);
    moe_h5_abort(w);

    /* a writer that dies mid-save leaves its temporary file, which is refused */
    fflush(NULL);
    pid_t child = fork();
    CU_ASSERT_FATAL(child >= 0);
    if (child == 0) {
        moe_h5 *cw;
        float big[4096] = {0};
        if (moe_h5_create(path, &cw) != MOE_OK) _exit(1);
        if (moe_h5_put_i64(cw, "train/step", 4) != MOE_OK) _exit(1);
        if (moe_h5_put_array(cw, "params/w", MOE_H5_F32, 1, (int64_t[]){4096}, big) != MOE_OK)
            _exit(1);
        _exit(0); /* crash: no commit, no close */
    }
    int status = -1;
    waitpid(child, &status, 0);
    CU_ASSERT_FATAL(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    snprintf(tmp, sizeof tmp, "%s.tmp-%d", path, (int)child);
    CU_ASSERT_TRUE_FATAL(file_exists(tmp));
    moe_h5 *r = NULL;
    CU_ASSERT_EQUAL(moe_h5_open(tmp, &r), MOE_ERR_FORMAT);
    CHECK_ERROR_HAS("is damaged or incomplete");
    CU_ASSERT_EQUAL(read_step(path), 1);
    char found[400];
    CHECK_OK(moe_h5_find_latest(dir, "ckpt-", ".h5", found, sizeof found));
    CU_ASSERT_STRING_EQUAL(found, path);
    CHECK_OK(moe_h5_keep_last(dir, "ckpt-", ".h5", 5));
    CU_ASSERT_FALSE(file_exists(tmp)); /* its writer is gone */
    CU_ASSERT_TRUE(file_exists(path));

    /* a later commit replaces the file */
    write_small(path, 5);
    CU_ASSERT_EQUAL(read_step(path), 5);
}

static void test_keep_last(void) {
    char dir[256], path[400];
    scratch("h5_keep_last", dir, sizeof dir);
    const char *ckpts[] = {"ckpt-000001.h5", "ckpt-000002.h5", "ckpt-10.h5",
                           "ckpt-000100.h5", "ckpt-99.h5"};
    const char *others[] = {"ckpt-abc.h5", "other-000001.h5", "ckpt-000005.h5.bak",
                            "ckpt-.h5", "ckpt-000003.h5.tmp-x"};
    for (size_t i = 0; i < 5; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, ckpts[i]);
        moe_test_write_file(path, "x", 1);
        snprintf(path, sizeof path, "%s/%s", dir, others[i]);
        moe_test_write_file(path, "x", 1);
    }
    char stale[400], live[400];
    snprintf(stale, sizeof stale, "%s/ckpt-000200.h5.tmp-%d", dir, (int)dead_pid());
    snprintf(live, sizeof live, "%s/ckpt-000200.h5.tmp-%d", dir, (int)getpid());
    moe_test_write_file(stale, "x", 1);
    moe_test_write_file(live, "x", 1);

    CHECK_OK(moe_h5_keep_last(dir, "ckpt-", ".h5", 3));
    const bool expect_kept[] = {false, false, true, true, true};
    for (size_t i = 0; i < 5; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, ckpts[i]);
        CU_ASSERT_EQUAL(file_exists(path), expect_kept[i]);
        snprintf(path, sizeof path, "%s/%s", dir, others[i]);
        CU_ASSERT_TRUE(file_exists(path));
    }
    CU_ASSERT_FALSE(file_exists(stale));
    CU_ASSERT_TRUE(file_exists(live));

    CHECK_OK(moe_h5_keep_last(dir, "ckpt-", ".h5", 1));
    snprintf(path, sizeof path, "%s/ckpt-000100.h5", dir);
    CU_ASSERT_TRUE(file_exists(path));
    snprintf(path, sizeof path, "%s/ckpt-99.h5", dir);
    CU_ASSERT_FALSE(file_exists(path));

    snprintf(path, sizeof path, "%s/none", dir);
    CU_ASSERT_EQUAL(moe_h5_keep_last(path, "ckpt-", ".h5", 1), MOE_ERR_IO);
    CHECK_ERROR_HAS(path);
}

static void test_find_latest(void) {
    char dir[256], path[400], found[400];
    scratch("h5_find_latest", dir, sizeof dir);
    CU_ASSERT_EQUAL(moe_h5_find_latest(dir, "ckpt-", ".h5", found, sizeof found), MOE_ERR_IO);
    CHECK_ERROR_HAS("no usable checkpoint");

    const int64_t steps[] = {1, 2, 9, 10};
    for (size_t i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/ckpt-%lld.h5", dir, (long long)steps[i]);
        write_small(path, steps[i]);
    }
    CHECK_OK(moe_h5_find_latest(dir, "ckpt-", ".h5", found, sizeof found));
    snprintf(path, sizeof path, "%s/ckpt-10.h5", dir);
    CU_ASSERT_STRING_EQUAL(found, path);
    CU_ASSERT_EQUAL(read_step(found), 10);

    /* damage the newest (truncate) and the next (not HDF5): step 2 is picked */
    size_t size;
    unsigned char *bytes = moe_test_read_file(path, &size);
    moe_test_write_file(path, bytes, size / 2);
    free(bytes);
    snprintf(path, sizeof path, "%s/ckpt-9.h5", dir);
    moe_test_write_file(path, "garbage", 7);
    CHECK_OK(moe_h5_find_latest(dir, "ckpt-", ".h5", found, sizeof found));
    snprintf(path, sizeof path, "%s/ckpt-2.h5", dir);
    CU_ASSERT_STRING_EQUAL(found, path);
    CU_ASSERT_EQUAL(read_step(found), 2);

    char small[8];
    CU_ASSERT_EQUAL(moe_h5_find_latest(dir, "ckpt-", ".h5", small, sizeof small),
                    MOE_ERR_INVALID);
    snprintf(path, sizeof path, "%s/none", dir);
    CU_ASSERT_EQUAL(moe_h5_find_latest(path, "ckpt-", ".h5", found, sizeof found), MOE_ERR_IO);
    CHECK_ERROR_HAS("cannot read checkpoint directory");
}

static moe_status contained_ok(void *unused) {
    (void)unused;
    return MOE_OK;
}

static moe_status contained_refusal(void *unused) {
    (void)unused;
    return moe_error(MOE_ERR_INVALID, "the child's own message");
}

static moe_status contained_fault(void *unused) {
    (void)unused;
    raise(SIGILL); /* a fault the sanitizers leave to the default action */
    return MOE_OK;
}

static moe_status contained_kill(void *unused) {
    (void)unused;
    raise(SIGKILL);
    return MOE_OK;
}

/* A read run in a child process: its status and message come back; a fault in it fails
 * the read as a damaged file (a sanitizer's report included), a kill as an i/o fault. */
static void test_contained(void) {
    CU_ASSERT_EQUAL(moe_run_contained(contained_ok, NULL, "f.h5"), MOE_OK);
    CU_ASSERT_EQUAL(moe_run_contained(contained_refusal, NULL, "f.h5"), MOE_ERR_INVALID);
    CHECK_ERROR_HAS("the child's own message");
    CU_ASSERT_EQUAL(moe_run_contained(contained_fault, NULL, "f.h5"), MOE_ERR_FORMAT);
    CHECK_ERROR_HAS("f.h5 is damaged: reading it crashed the file library (signal 4");
    CU_ASSERT_EQUAL(moe_run_contained(contained_kill, NULL, "f.h5"), MOE_ERR_IO);
    CHECK_ERROR_HAS("signal 9");
}

static void register_suites(void) {
    moe_test_add_suite("h5file", (moe_test_entry[]){
                                     {"roundtrip", test_roundtrip},
                                     {"list", test_list},
                                     {"mismatch", test_mismatch},
                                     {"writer_errors", test_writer_errors},
                                     {"open_errors", test_open_errors},
                                     {"truncated", test_truncated},
                                     {"flipped_byte", test_flipped_byte},
                                     {"uncommitted", test_uncommitted},
                                     {"keep_last", test_keep_last},
                                     {"find_latest", test_find_latest},
                                     {"contained", test_contained},
                                     {NULL, NULL},
                                 });
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
