/* safetensors files and sharded sets: mmap, header validation, tensor views, widening. */
#include "moe/hf/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *const dtype_names[] = {"F32", "BF16", "F16", "I64", "I32"};
static const size_t dtype_sizes[] = {4, 2, 2, 8, 4};

const char *moe_st_dtype_name(moe_st_dtype dt) { return dtype_names[dt]; }
size_t moe_st_dtype_size(moe_st_dtype dt) { return dtype_sizes[dt]; }

int64_t moe_st_numel(const moe_st_view *v) {
    int64_t n = 1;
    for (int i = 0; i < v->ndim; i++) n *= v->shape[i];
    return n;
}

static int by_name(const void *a, const void *b) {
    return strcmp(((const moe_st_view *)a)->name, ((const moe_st_view *)b)->name);
}

static int by_offset(const void *a, const void *b) {
    const char *x = ((const moe_st_view *const *)a)[0]->data, *y = ((const moe_st_view *const *)b)[0]->data;
    return x < y ? -1 : x > y;
}

#define COUNT_MAX 9007199254740992.0 /* 2^53: every integer up to it is exact in a double */

/* A JSON number that is an integer in [0, 2^53] (so it converts to int64 exactly). */
static bool json_count(const cJSON *v) {
    return cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble <= COUNT_MAX &&
           v->valuedouble == floor(v->valuedouble);
}

/* One header entry -> view; data_base is the first byte of the data area of `avail` bytes. */
static moe_status parse_entry(const char *path, const cJSON *e, const char *data_base, uint64_t avail,
                              moe_st_view *v) {
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(dt) || !cJSON_IsArray(sh) || !cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2)
        return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s': expected {\"dtype\": string, \"shape\": [...], "
                         "\"data_offsets\": [begin, end]}", path, e->string);
    int d = 0;
    while (d < 5 && strcmp(dt->valuestring, dtype_names[d])) d++;
    if (d == 5)
        return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s': dtype %s is not supported (expected F32, BF16, F16, "
                         "I64 or I32)", path, e->string, dt->valuestring);
    v->dtype = (moe_st_dtype)d;
    v->ndim = cJSON_GetArraySize(sh);
    if (v->ndim > MOE_MAX_DIMS)
        return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s': %d dimensions (at most %d)", path, e->string, v->ndim,
                         MOE_MAX_DIMS);
    double numel = 1, nonzero = 1; /* nonzero: the product of the non-zero entries */
    for (int i = 0; i < v->ndim; i++) {
        const cJSON *s = cJSON_GetArrayItem(sh, i);
        if (!json_count(s))
            return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s': shape entry %d is not a non-negative integer", path,
                             e->string, i);
        v->shape[i] = (int64_t)s->valuedouble;
        numel *= s->valuedouble;
        nonzero *= s->valuedouble ? s->valuedouble : 1;
    }
    if (nonzero > COUNT_MAX) /* an empty tensor may not hide a shape whose element count overflows */
        return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s': the shape's entries multiply past 2^53", path, e->string);
    const cJSON *ob = cJSON_GetArrayItem(off, 0), *oe = cJSON_GetArrayItem(off, 1);
    if (!json_count(ob) || !json_count(oe))
        return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s': data_offsets are not two non-negative integers", path,
                         e->string);
    double b = ob->valuedouble, en = oe->valuedouble;
    if (!(en >= b && en <= (double)avail))
        return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s': data_offsets [%.0f, %.0f] leave the data area of %llu "
                         "bytes", path, e->string, b, en, (unsigned long long)avail);
    if (en - b != numel * (double)dtype_sizes[d])
        return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s': %.0f bytes for %.0f %s values (expected %.0f)", path,
                         e->string, en - b, numel, dt->valuestring, numel * (double)dtype_sizes[d]);
    v->data = data_base + (uint64_t)b;
    v->nbytes = (size_t)(en - b);
    v->name = strdup(e->string);
    v->file = path;
    return v->name ? MOE_OK : moe_error(MOE_ERR_OOM, "%s: out of host memory", path);
}

static moe_status check_overlaps(moe_st_file *f) {
    if (f->n < 2) return MOE_OK;
    const moe_st_view **o = malloc(sizeof *o * (size_t)f->n);
    if (!o) return moe_error(MOE_ERR_OOM, "%s: out of host memory", f->path);
    for (int i = 0; i < f->n; i++) o[i] = &f->tensors[i];
    qsort(o, (size_t)f->n, sizeof *o, by_offset);
    moe_status s = MOE_OK;
    for (int i = 1; i < f->n && s == MOE_OK; i++) {
        const char *end = (const char *)o[i - 1]->data + o[i - 1]->nbytes;
        if ((const char *)o[i]->data < end)
            s = moe_error(MOE_ERR_FORMAT, "%s: tensors '%s' and '%s' overlap (expected disjoint byte ranges)",
                          f->path, o[i - 1]->name, o[i]->name);
    }
    free(o);
    return s;
}

static moe_status parse_header(moe_st_file *f) {
    if (f->size < 8)
        return moe_error(MOE_ERR_FORMAT, "%s: %zu bytes, shorter than the 8-byte header length", f->path, f->size);
    uint64_t hlen;
    memcpy(&hlen, f->map, 8);
    if (hlen > f->size - 8 || hlen > MOE_ST_HEADER_MAX)
        return moe_error(MOE_ERR_FORMAT, "%s: header length %llu exceeds the file (%zu bytes) or the %u MB limit",
                         f->path, (unsigned long long)hlen, f->size, MOE_ST_HEADER_MAX >> 20);
    const char *h = (const char *)f->map + 8;
    cJSON *root = cJSON_ParseWithLength(h, (size_t)hlen);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return moe_error(MOE_ERR_FORMAT, "%s: the %llu-byte header is not a JSON object", f->path,
                         (unsigned long long)hlen);
    }
    int n = 0;
    for (const cJSON *e = root->child; e; e = e->next) n += strcmp(e->string, "__metadata__") != 0;
    f->tensors = calloc((size_t)(n ? n : 1), sizeof *f->tensors);
    moe_status s = f->tensors ? MOE_OK : moe_error(MOE_ERR_OOM, "%s: out of host memory", f->path);
    for (const cJSON *e = root->child; e && s == MOE_OK; e = e->next) {
        if (!strcmp(e->string, "__metadata__")) continue;
        s = parse_entry(f->path, e, h + hlen, f->size - 8 - hlen, &f->tensors[f->n]);
        if (s == MOE_OK) f->n++;
    }
    cJSON_Delete(root);
    MOE_TRY(s);
    qsort(f->tensors, (size_t)f->n, sizeof *f->tensors, by_name);
    for (int i = 1; i < f->n; i++)
        if (!strcmp(f->tensors[i - 1].name, f->tensors[i].name))
            return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s' appears twice in the header", f->path, f->tensors[i].name);
    return check_overlaps(f);
}

moe_status moe_st_open(moe_st_file *f, const char *path) {
    memset(f, 0, sizeof *f);
    f->path = strdup(path);
    if (!f->path) return moe_error(MOE_ERR_OOM, "%s: out of host memory", path);
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        int err = errno;
        if (fd >= 0) close(fd);
        moe_st_close(f);
        return moe_error(MOE_ERR_IO, "%s: cannot open: %s", path, strerror(err));
    }
    f->size = (size_t)st.st_size;
    f->map = f->size ? mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
    close(fd);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        moe_st_close(f);
        return moe_error(MOE_ERR_IO, "%s: cannot map: %s", path, strerror(errno));
    }
    moe_status s = parse_header(f);
    if (s != MOE_OK) moe_st_close(f);
    return s;
}

void moe_st_close(moe_st_file *f) {
    for (int i = 0; i < f->n; i++) free((char *)f->tensors[i].name);
    free(f->tensors);
    if (f->map) munmap(f->map, f->size);
    free(f->path);
    memset(f, 0, sizeof *f);
}

const moe_st_view *moe_st_find(const moe_st_file *f, const char *name) {
    moe_st_view key = {.name = name};
    return f->n ? bsearch(&key, f->tensors, (size_t)f->n, sizeof key, by_name) : NULL;
}

/* Opens every distinct shard of the index's weight_map and checks each mapped tensor. */
static moe_status open_index(moe_st_set *s, const char *dir, const char *ipath, const char *text) {
    cJSON *root = cJSON_Parse(text);
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(wm)) {
        cJSON_Delete(root);
        return moe_error(MOE_ERR_FORMAT, "%s: expected a JSON object with a \"weight_map\" object", ipath);
    }
    int n = cJSON_GetArraySize(wm);
    s->files = calloc((size_t)(n ? n : 1), sizeof *s->files);
    moe_status st = s->files ? MOE_OK : moe_error(MOE_ERR_OOM, "%s: out of host memory", ipath);
    for (const cJSON *e = wm->child; e && st == MOE_OK; e = e->next) {
        if (!cJSON_IsString(e) || strchr(e->valuestring, '/')) {
            st = moe_error(MOE_ERR_FORMAT, "%s: weight_map['%s']: expected a shard file name", ipath, e->string);
            break;
        }
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->valuestring);
        int i = 0;
        while (i < s->n_files && strcmp(s->files[i].path, path)) i++;
        if (i == s->n_files) {
            st = moe_st_open(&s->files[i], path);
            if (st != MOE_OK) {
                moe_error_context(st, "%s: shard of tensor '%s': ", ipath, e->string);
                break;
            }
            s->n_files++;
        }
        if (!moe_st_find(&s->files[i], e->string))
            st = moe_error(MOE_ERR_FORMAT, "%s: tensor '%s' is mapped to %s, which does not hold it", ipath,
                           e->string, path);
    }
    cJSON_Delete(root);
    return st;
}

char *moe_hf_read_text(const char *path) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *t = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (t && fread(t, 1, (size_t)n, fp) != (size_t)n) {
        free(t);
        t = NULL;
    }
    if (t) t[n] = '\0';
    fclose(fp);
    return t;
}

moe_status moe_st_set_open_dir(moe_st_set *s, const char *dir) {
    memset(s, 0, sizeof *s);
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    char *text = moe_hf_read_text(path);
    moe_status st;
    if (text) {
        st = open_index(s, dir, path, text);
        free(text);
    } else {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        s->files = calloc(1, sizeof *s->files);
        st = s->files ? moe_st_open(&s->files[0], path) : moe_error(MOE_ERR_OOM, "%s: out of host memory", dir);
        if (st == MOE_OK) s->n_files = 1;
    }
    if (st != MOE_OK) moe_st_set_close(s);
    return st;
}

void moe_st_set_close(moe_st_set *s) {
    for (int i = 0; i < s->n_files; i++) moe_st_close(&s->files[i]);
    free(s->files);
    memset(s, 0, sizeof *s);
}

const moe_st_view *moe_st_set_find(const moe_st_set *s, const char *name) {
    for (int i = 0; i < s->n_files; i++) {
        const moe_st_view *v = moe_st_find(&s->files[i], name);
        if (v) return v;
    }
    return NULL;
}

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);          /* inf / nan */
    else if (exp) u = sign | ((exp + 112) << 23) | (man << 13);      /* normal */
    else if (!man) u = sign;                                         /* zero */
    else {                                                           /* subnormal */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400u));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    union { uint32_t u; float f; } v = {.u = u};
    return v.f;
}

/* Element i of 2-byte values at p (the format does not promise aligned data). */
static uint16_t half_at(const void *p, int64_t i) {
    uint16_t h;
    memcpy(&h, (const char *)p + 2 * i, 2);
    return h;
}

moe_status moe_st_read_f32_range(const moe_st_view *v, int64_t first, int64_t n, float *out) {
    MOE_ASSERT(first >= 0 && n >= 0 && first + n <= moe_st_numel(v), "range [%lld, +%lld) outside tensor '%s'",
               (long long)first, (long long)n, v->name);
    switch (v->dtype) {
    case MOE_ST_F32: memcpy(out, (const char *)v->data + 4 * first, sizeof(float) * (size_t)n); return MOE_OK;
    case MOE_ST_BF16:
        for (int64_t i = 0; i < n; i++) out[i] = moe_bf16_to_f32(half_at(v->data, first + i));
        return MOE_OK;
    case MOE_ST_F16: for (int64_t i = 0; i < n; i++) out[i] = f16_to_f32(half_at(v->data, first + i)); return MOE_OK;
    default:
        return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s' is %s (expected a float dtype: F32, BF16 or F16)", v->file,
                         v->name, dtype_names[v->dtype]);
    }
}

moe_status moe_st_read_f32(const moe_st_view *v, float *out) { return moe_st_read_f32_range(v, 0, moe_st_numel(v), out); }

moe_status moe_st_read_i64(const moe_st_view *v, int64_t *out) {
    int64_t n = moe_st_numel(v);
    if (v->dtype == MOE_ST_I64) memcpy(out, v->data, v->nbytes);
    else if (v->dtype == MOE_ST_I32)
        for (int64_t i = 0; i < n; i++) {
            int32_t x;
            memcpy(&x, (const char *)v->data + 4 * i, 4);
            out[i] = x;
        }
    else
        return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s' is %s (expected I64 or I32)", v->file, v->name,
                         dtype_names[v->dtype]);
    return MOE_OK;
}

void moe_st_release(const moe_st_view *v) {
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t b = ((uintptr_t)v->data + (uintptr_t)page - 1) & ~(uintptr_t)(page - 1);
    uintptr_t e = ((uintptr_t)v->data + v->nbytes) & ~(uintptr_t)(page - 1);
    if (e > b) madvise((void *)b, e - b, MADV_DONTNEED);
}
