/* Fuzz target: the safetensors reader (moe_st_set_open_dir, hence moe_st_open, and the
 * widening reads), alone and behind a sharded index.
 *
 * Input: a safetensors file, written as model.safetensors of a scratch folder; or, when it
 * starts with '{', a model.safetensors.index.json, then a NUL byte, then the bytes of one
 * shard, written as SHARD (the index seeds map their tensors to it).
 * Checks: a refused input gives a message and never MOE_ERR_OOM (nothing is allocated by
 * size from the header); in an opened file every tensor lies inside the data area after the
 * header, holds numel x dtype-size bytes, is found by name, no two overlap, and every one
 * widens to f32 / int64 (read whole and in two ranges, which must agree). */
#include <string.h>

#include "moe/hf/safetensors.h"
#include "tests/fuzz/common.h"

#define SHARD "model-00001-of-00001.safetensors"

int LLVMFuzzerInitialize(int *argc, char ***argv) { return 0; }

static int by_start(const void *a, const void *b) {
    const char *x = (*(const moe_st_view *const *)a)->data, *y = (*(const moe_st_view *const *)b)->data;
    return x < y ? -1 : x > y;
}

/* Reads every value of v, whole and in two halves. */
static void check_read(const moe_st_view *v) {
    int64_t n = moe_st_numel(v);
    if (v->dtype == MOE_ST_I64 || v->dtype == MOE_ST_I32) {
        int64_t *out = malloc(sizeof *out * (size_t)(n ? n : 1));
        FUZZ_CHECK(out, "out of memory");
        FUZZ_CHECK(moe_st_read_i64(v, out) == MOE_OK, "read_i64 '%s': %s", v->name, moe_last_error());
        free(out);
        return;
    }
    float *whole = malloc(sizeof *whole * (size_t)(n ? n : 1)), *parts = malloc(sizeof *parts * (size_t)(n ? n : 1));
    FUZZ_CHECK(whole && parts, "out of memory");
    FUZZ_CHECK(moe_st_read_f32(v, whole) == MOE_OK, "read_f32 '%s': %s", v->name, moe_last_error());
    FUZZ_CHECK(moe_st_read_f32_range(v, 0, n / 2, parts) == MOE_OK &&
                   moe_st_read_f32_range(v, n / 2, n - n / 2, parts + n / 2) == MOE_OK,
               "read_f32_range '%s': %s", v->name, moe_last_error());
    FUZZ_CHECK(memcmp(whole, parts, sizeof *whole * (size_t)n) == 0, "'%s': ranges differ from the whole", v->name);
    free(whole);
    free(parts);
}

/* The promises of safetensors.h about an opened file. */
static void check_file(const moe_st_file *f) {
    uint64_t hlen;
    memcpy(&hlen, f->map, 8);
    const char *lo = (const char *)f->map + 8 + hlen, *hi = (const char *)f->map + f->size;
    const moe_st_view **order = malloc(sizeof *order * (size_t)(f->n ? f->n : 1));
    FUZZ_CHECK(order, "out of memory");
    for (int i = 0; i < f->n; i++) {
        const moe_st_view *v = &f->tensors[i];
        const char *d = v->data;
        FUZZ_CHECK(d >= lo && d <= hi && v->nbytes <= (size_t)(hi - d), "'%s' lies outside the data area", v->name);
        FUZZ_CHECK(v->ndim >= 0 && v->ndim <= MOE_MAX_DIMS, "'%s' has %d dimensions", v->name, v->ndim);
        FUZZ_CHECK((uint64_t)moe_st_numel(v) * moe_st_dtype_size(v->dtype) == v->nbytes, "'%s': %zu bytes for %lld values",
                   v->name, v->nbytes, (long long)moe_st_numel(v));
        FUZZ_CHECK(i == 0 || strcmp(f->tensors[i - 1].name, v->name) < 0, "names not sorted or repeated at '%s'",
                   v->name);
        FUZZ_CHECK(moe_st_find(f, v->name) == v, "'%s' is not found by name", v->name);
        order[i] = v;
        check_read(v);
        moe_st_release(v);
    }
    qsort(order, (size_t)f->n, sizeof *order, by_start);
    for (int i = 1; i < f->n; i++)
        FUZZ_CHECK((const char *)order[i]->data >= (const char *)order[i - 1]->data + order[i - 1]->nbytes,
                   "'%s' and '%s' overlap", order[i - 1]->name, order[i]->name);
    free(order);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *dir = fuzz_scratch_dir("safetensors");
    const uint8_t *nul = size && data[0] == '{' ? memchr(data, 0, size) : NULL;
    if (size && data[0] == '{') {
        size_t ilen = nul ? (size_t)(nul - data) : size;
        fuzz_put_file(dir, "model.safetensors.index.json", data, ilen);
        fuzz_put_file(dir, SHARD, nul ? nul + 1 : data, nul ? size - ilen - 1 : 0);
        fuzz_put_file(dir, "model.safetensors", NULL, 0);
    } else {
        fuzz_put_file(dir, "model.safetensors.index.json", NULL, 0);
        fuzz_put_file(dir, "model.safetensors", data, size);
    }
    moe_st_set set;
    moe_status st = moe_st_set_open_dir(&set, dir);
    if (st != MOE_OK) {
        FUZZ_CHECK(*moe_last_error(), "refused without a message");
        FUZZ_CHECK(st != MOE_ERR_OOM, "a %zu-byte input ran out of memory: %s", size, moe_last_error());
        FUZZ_CHECK(!set.files && !set.n_files, "a refused set left files open");
        return 0;
    }
    for (int i = 0; i < set.n_files; i++) {
        check_file(&set.files[i]);
        for (int k = 0; k < set.files[i].n; k++)
            FUZZ_CHECK(moe_st_set_find(&set, set.files[i].tensors[k].name), "the set does not find '%s'",
                       set.files[i].tensors[k].name);
    }
    moe_st_set_close(&set);
    return 0;
}
