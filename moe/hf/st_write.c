/* The safetensors writer (see safetensors.h): the export of a model and `moe logits --out`. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileio.h"
#include "moe/hf/safetensors.h"

static int64_t out_numel(const moe_st_out *t) {
    int64_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= t->shape[d];
    return n;
}

/* The JSON header of the tensors (f32, back to back in order), padded with spaces to 8 bytes. */
static char *header_text(const moe_st_out *tensors, int n, uint64_t *len) {
    cJSON *h = cJSON_CreateObject(), *meta = cJSON_AddObjectToObject(h, "__metadata__");
    cJSON_AddStringToObject(meta, "format", "pt");
    double off = 0;
    for (int i = 0; i < n; i++) {
        const moe_st_out *t = &tensors[i];
        cJSON *e = cJSON_AddObjectToObject(h, t->name), *shape = cJSON_AddArrayToObject(e, "shape");
        cJSON_AddStringToObject(e, "dtype", "F32");
        for (int d = 0; d < t->ndim; d++) cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->shape[d]));
        double bytes = 4.0 * (double)out_numel(t);
        cJSON_AddItemToObject(e, "data_offsets", cJSON_CreateDoubleArray((double[]){off, off + bytes}, 2));
        off += bytes;
    }
    char *text = cJSON_PrintUnformatted(h);
    cJSON_Delete(h);
    if (!text) return NULL;
    size_t raw = strlen(text), padded = (raw + 7) & ~(size_t)7;
    char *out = realloc(text, padded + 1);
    if (!out) {
        free(text);
        return NULL;
    }
    memset(out + raw, ' ', padded - raw);
    out[padded] = '\0';
    *len = padded;
    return out;
}

moe_status moe_st_write_f32(const char *path, const moe_st_out *tensors, int n, moe_st_fill_fn fill, void *user) {
    uint64_t hlen = 0;
    char *header = header_text(tensors, n, &hlen);
    if (!header) return moe_error(MOE_ERR_OOM, "%s: out of host memory for the safetensors header", path);
    moe_atomic_file af;
    moe_status s = moe_atomic_open(&af, path, "safetensors file");
    bool ok = s == MOE_OK && fwrite(&hlen, 8, 1, af.f) == 1 && fwrite(header, 1, hlen, af.f) == hlen;
    for (int i = 0; ok && i < n; i++) {
        size_t count = (size_t)out_numel(&tensors[i]);
        float *w = malloc(sizeof(float) * (count ? count : 1));
        if (w) fill(user, i, w);
        ok = w && fwrite(w, sizeof(float), count, af.f) == count;
        free(w);
    }
    free(header);
    if (s != MOE_OK) return s;
    moe_status c = moe_atomic_close(&af, ok, "safetensors file");
    return ok ? c : moe_error(MOE_ERR_IO, "%s: write failed", path);
}
