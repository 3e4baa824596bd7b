/* HDF5 checkpoint files: named arrays, strings and scalars written atomically
 * (temporary file, fsync, rename) and read back with shape, dtype and CRC-32 checks.
 *
 * Independent of the tensor library: arrays are raw host pointers plus shapes.
 * Layout: a name with '/' creates groups ("params/layers.0.attn.wq" is dataset
 * "layers.0.attn.wq" in group "params"). Arrays are contiguous little-endian datasets;
 * bf16 is stored as uint16 with the attribute dtype="bf16". Strings are scalar
 * fixed-length UTF-8 string datasets; moe_h5_put_i64/f64 write 0-d datasets. Every
 * dataset carries an attribute "crc32" (uint32, zlib CRC-32 of its raw bytes). A
 * committed file has the root attributes format="moe-checkpoint", format_version=1
 * and complete=1; the reader refuses a file without them.
 *
 * On first use this module turns off HDF5's automatic error-stack printing for the
 * whole process (H5Eset_auto2), so users see moe_last_error() instead. Not thread-safe. */
#ifndef MOE_CORE_H5FILE_H
#define MOE_CORE_H5FILE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

#define MOE_H5_MAX_NDIM 8
#define MOE_H5_FORMAT_VERSION 1

typedef enum moe_h5_dtype {
    MOE_H5_F32,
    MOE_H5_BF16, /* raw bf16 bits, uint16_t in memory */
    MOE_H5_F64,
    MOE_H5_I32,
    MOE_H5_I64,
    MOE_H5_U8,
    MOE_H5_DTYPE_COUNT
} moe_h5_dtype;

typedef struct moe_h5 moe_h5;

/* "f32", "bf16", "f64", "i32", "i64", "u8". */
const char *moe_h5_dtype_name(moe_h5_dtype dt);
/* Bytes per element. */
size_t moe_h5_dtype_size(moe_h5_dtype dt);

/* ---- writing ---- */

/* Starts a checkpoint that becomes `final_path` on moe_h5_commit. Data goes to
 * "<final_path>.tmp-<pid>"; an existing final_path is untouched until the commit. */
moe_status moe_h5_create(const char *final_path, moe_h5 **out);

/* Writes an array of `ndim` (0..MOE_H5_MAX_NDIM) dims; ndim 0 is a scalar, a dim
 * may be 0 (then `data` may be NULL). Each name may be written once;
 * MOE_ERR_INVALID for a bad name ("", leading/trailing '/', "a//b", "." parts) or
 * a repeated one, MOE_ERR_IO when HDF5 cannot write. */
moe_status moe_h5_put_array(moe_h5 *f, const char *name, moe_h5_dtype dt, int ndim,
                            const int64_t *shape, const void *data);
/* A NUL-terminated text (may contain newlines, e.g. a YAML config). */
moe_status moe_h5_put_string(moe_h5 *f, const char *name, const char *text);
moe_status moe_h5_put_i64(moe_h5 *f, const char *name, int64_t v);
moe_status moe_h5_put_f64(moe_h5 *f, const char *name, double v);

/* Marks the file complete, closes and fsyncs it, renames it to the final path and
 * fsyncs the directory. Always consumes `f`; on failure the temporary file is
 * removed and the previous final file (if any) is left as it was. */
moe_status moe_h5_commit(moe_h5 *f);
/* Drops an uncommitted checkpoint: closes and removes the temporary file. */
void moe_h5_abort(moe_h5 *f);

/* ---- reading ---- */

/* Opens a committed checkpoint. MOE_ERR_IO when the file is missing or unreadable;
 * MOE_ERR_FORMAT when it is not HDF5, truncated, never committed or not a moe
 * checkpoint of this format version ("checkpoint X is damaged or incomplete: ..."). */
moe_status moe_h5_open(const char *path, moe_h5 **out);
void moe_h5_close(moe_h5 *f);

/* True when a dataset (array, string or scalar) of that name exists. */
bool moe_h5_has(moe_h5 *f, const char *name);
/* The dtype and shape of an array dataset (shape has room for MOE_H5_MAX_NDIM).
 * MOE_ERR_FORMAT unless the dataset stores exactly that many bytes, inside the file: a
 * caller may allocate by the shape. */
moe_status moe_h5_shape(moe_h5 *f, const char *name, moe_h5_dtype *dt, int *ndim,
                        int64_t *shape);
/* Reads an array into `dst` after checking that its dtype and shape are exactly the
 * expected ones, then verifies its CRC-32. MOE_ERR_FORMAT (naming the dataset, and
 * for a mismatch both shapes or dtypes) when it is missing, differs or is damaged. */
moe_status moe_h5_get_array(moe_h5 *f, const char *name, moe_h5_dtype dt, int ndim,
                            const int64_t *shape, void *dst);
/* A string dataset as a malloc'd NUL-terminated text; the caller frees it. */
moe_status moe_h5_get_string(moe_h5 *f, const char *name, char **text);
moe_status moe_h5_get_i64(moe_h5 *f, const char *name, int64_t *v);
moe_status moe_h5_get_f64(moe_h5 *f, const char *name, double *v);

/* Calls fn(full_name, user) for every dataset below group `prefix` ("" or NULL: the
 * whole file), recursively, in name order; full_name is e.g. "params/embed.w".
 * A missing group yields no calls. A callback returning non-OK stops the walk and
 * that status is returned. */
typedef moe_status (*moe_h5_list_fn)(const char *name, void *user);
moe_status moe_h5_list(moe_h5 *f, const char *prefix, moe_h5_list_fn fn, void *user);

/* ---- checkpoint directories: files named <prefix><step digits><suffix> ---- */

/* Deletes all but the `keep` (>= 1) newest checkpoints by step number, and removes
 * temporary files "<prefix><step><suffix>.tmp-<pid>" whose writer process is no
 * longer running on this host. */
moe_status moe_h5_keep_last(const char *dir, const char *prefix, const char *suffix,
                            int keep);
/* Whose checkpoints clean-up may delete: those holding the text dataset `dataset` equal
 * to `value` (e.g. "run_id" and this run's id). `written` (a file name in the directory,
 * or NULL) is the checkpoint just written: never deleted, counted as the newest. */
typedef struct moe_h5_owner {
    const char *dataset, *value, *written;
} moe_h5_owner;
/* moe_h5_keep_last counting and deleting only the checkpoints of `owner` (NULL: all):
 * another run's files, damaged ones and files without the dataset are left alone. */
moe_status moe_h5_keep_last_owned(const char *dir, const char *prefix, const char *suffix,
                                  int keep, const moe_h5_owner *owner);
/* Puts "<dir>/<name>" of the newest checkpoint that moe_h5_open accepts into
 * path_out. Newer files it refuses are skipped with a warning on stderr (only
 * their metadata is checked, not every dataset's CRC). MOE_ERR_IO when the
 * directory is unreadable or holds no usable checkpoint. */
moe_status moe_h5_find_latest(const char *dir, const char *prefix, const char *suffix,
                              char *path_out, size_t cap);
/* The same with the test `accept` (MOE_OK: usable; else its message names the fault and
 * goes into the warning), e.g. a check of every dataset's CRC; NULL: moe_h5_open. */
typedef moe_status (*moe_h5_accept_fn)(const char *path, void *user);
moe_status moe_h5_find_latest_where(const char *dir, const char *prefix, const char *suffix,
                                    moe_h5_accept_fn accept, void *user, char *path_out,
                                    size_t cap);

/* For leak tests: HDF5 files, groups, datasets, named datatypes and attributes open
 * in this process (H5Fget_obj_count; dataspaces and property lists are not counted).
 * With one checkpoint open and nothing leaked it is 1. */
int64_t moe_h5_open_object_count(void);

#endif
