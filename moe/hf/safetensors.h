/* Reader of safetensors files (the Hugging Face weight format) and of sharded sets
 * (model.safetensors.index.json). A file is memory-mapped; its JSON header is validated
 * before any tensor is handed out: header length within the file (and under 100 MB), the
 * JSON parses, dtypes F32 / BF16 / F16 / I64 / I32, shape x dtype size equals the byte
 * range, every range inside the data area and no two ranges overlapping. Tensors are
 * views into the mapping (pointer + dtype + shape); nothing is copied until the caller
 * converts one. Every error names the file, the tensor or key, and what was expected. */
#ifndef MOE_HF_SAFETENSORS_H
#define MOE_HF_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"
#include "core/tensor.h"

#define MOE_ST_HEADER_MAX (100u << 20) /* larger headers are refused */

typedef enum moe_st_dtype { MOE_ST_F32, MOE_ST_BF16, MOE_ST_F16, MOE_ST_I64, MOE_ST_I32 } moe_st_dtype;

/* One tensor of a mapped file. */
typedef struct moe_st_view {
    const char *name;
    const char *file;      /* path of the file it lives in */
    moe_st_dtype dtype;
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    const void *data;      /* inside the mapping */
    size_t nbytes;
} moe_st_view;

typedef struct moe_st_file {
    char *path;
    void *map;
    size_t size;
    moe_st_view *tensors;  /* sorted by name */
    int n;
} moe_st_file;

/* One checkpoint: a single file or every shard named by an index. */
typedef struct moe_st_set {
    moe_st_file *files;
    int n_files;
} moe_st_set;

const char *moe_st_dtype_name(moe_st_dtype dt);
size_t moe_st_dtype_size(moe_st_dtype dt);
int64_t moe_st_numel(const moe_st_view *v);

moe_status moe_st_open(moe_st_file *f, const char *path);
void moe_st_close(moe_st_file *f);
const moe_st_view *moe_st_find(const moe_st_file *f, const char *name);

/* dir/model.safetensors.index.json (every shard it names must exist and hold the tensors
 * mapped to it), else dir/model.safetensors. */
moe_status moe_st_set_open_dir(moe_st_set *s, const char *dir);
void moe_st_set_close(moe_st_set *s);
const moe_st_view *moe_st_set_find(const moe_st_set *s, const char *name);

/* The tensor widened to f32 (F32 / BF16 / F16; out holds numel floats). */
moe_status moe_st_read_f32(const moe_st_view *v, float *out);
/* Elements [first, first + n) (row-major) widened to f32 into out. */
moe_status moe_st_read_f32_range(const moe_st_view *v, int64_t first, int64_t n, float *out);
/* The tensor as int64 (I64 / I32). */
moe_status moe_st_read_i64(const moe_st_view *v, int64_t *out);
/* Drops the tensor's pages from this process's resident memory (they are re-read from
 * the file if touched again): a conversion that streams tensor by tensor calls it after
 * each one, so the mapping never adds a second copy of the model to the peak. */
void moe_st_release(const moe_st_view *v);

/* ---- writing (st_write.c) ---- */

/* One f32 tensor to write; its values come from the writer's fill callback. */
typedef struct moe_st_out {
    const char *name;
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
} moe_st_out;

/* Writes tensor i's values (row-major, numel floats) into `values`. */
typedef void (*moe_st_fill_fn)(void *user, int i, float *values);

/* Writes tensors[0..n) as F32 into a safetensors file at `path`, in the given order (header
 * padded to 8 bytes, "__metadata__": {"format": "pt"}), one tensor in memory at a time; the
 * file appears whole or not at all (written to a temporary name, then renamed). */
moe_status moe_st_write_f32(const char *path, const moe_st_out *tensors, int n, moe_st_fill_fn fill, void *user);

/* A small file's whole text, NUL-terminated (malloc'd), or NULL when it cannot be read
 * (the hub folder's JSON files). */
char *moe_hf_read_text(const char *path);

#endif
