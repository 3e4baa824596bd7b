/* HDF5 checkpoint files: an atomic writer (temporary file, fsync, rename, directory
 * fsync), a checked reader (format attributes, dtype, shape, CRC-32 per dataset) and
 * the retention / find-latest helpers for checkpoint directories. */
#include "core/h5file.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <hdf5.h>
#include <zlib.h>

#include "core/contain.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "h5file.c stores host arrays as little-endian datasets and checksums their bytes"
#endif

#define MOE_H5_FORMAT_NAME "moe-checkpoint"
#define MOE_H5_PATH_MAX 4096

struct moe_h5 {
    hid_t file;
    bool writing;
    char *path;     /* final path (writer) or opened path (reader) */
    char *tmp_path; /* writer only: "<path>.tmp-<pid>" */
    uint64_t file_bytes; /* reader only: the file's size when opened */
};

static const char *const dtype_names[MOE_H5_DTYPE_COUNT] = {"f32", "bf16", "f64",
                                                            "i32", "i64",  "u8"};
static const size_t dtype_sizes[MOE_H5_DTYPE_COUNT] = {4, 2, 8, 4, 8, 1};

const char *moe_h5_dtype_name(moe_h5_dtype dt) {
    MOE_ASSERT(dt >= 0 && dt < MOE_H5_DTYPE_COUNT, "bad moe_h5_dtype %d", (int)dt);
    return dtype_names[dt];
}

size_t moe_h5_dtype_size(moe_h5_dtype dt) {
    MOE_ASSERT(dt >= 0 && dt < MOE_H5_DTYPE_COUNT, "bad moe_h5_dtype %d", (int)dt);
    return dtype_sizes[dt];
}

/* The stored type; the host is little-endian, so it is also the memory type. */
static hid_t dtype_h5type(moe_h5_dtype dt) {
    switch (dt) {
    case MOE_H5_F32: return H5T_IEEE_F32LE;
    case MOE_H5_BF16: return H5T_STD_U16LE;
    case MOE_H5_F64: return H5T_IEEE_F64LE;
    case MOE_H5_I32: return H5T_STD_I32LE;
    case MOE_H5_I64: return H5T_STD_I64LE;
    case MOE_H5_U8: return H5T_STD_U8LE;
    default: MOE_ASSERT(0, "bad moe_h5_dtype %d", (int)dt); return -1;
    }
}

/* ---- HDF5 error capture: no printing; the innermost message of the latest failure
 * is kept, because any later API call (even a close) clears HDF5's error stack. ---- */

static char h5_last_reason[256];
static int h5_last_errno; /* errno when the latest HDF5 call failed (0: none) */

/* HDF5's innermost description; a failed system call's text ("file write failed: time =
 * ..., errno = 28, error message = 'No space left on device', buf = ...") shortened to
 * the part before its first ", " so that the message never ends mid-word. */
static herr_t keep_innermost(unsigned n, const H5E_error2_t *e, void *unused) {
    if (n != 0 || !e->desc) return 0;
    size_t len = strcspn(e->desc, ",");
    if (len >= sizeof h5_last_reason) len = sizeof h5_last_reason - 1;
    memcpy(h5_last_reason, e->desc, len);
    h5_last_reason[len] = '\0';
    return 0;
}

static herr_t on_h5_failure(hid_t estack, void *unused) {
    h5_last_errno = errno;
    snprintf(h5_last_reason, sizeof h5_last_reason, "no details");
    H5Ewalk2(estack, H5E_WALK_UPWARD, keep_innermost, NULL);
    return 0;
}

/* HDF5's own exit-time clean-up is turned off: after a close that failed (a full disk)
 * the file's handle stays half-open and H5_term_library crashes on it at exit. */
static void h5_init(void) {
    static bool done;
    if (!done) {
        H5dont_atexit();
        H5Eset_auto2(H5E_DEFAULT, on_h5_failure, NULL);
    }
    done = true;
}

static const char *h5_reason(void) { return h5_last_reason[0] ? h5_last_reason : "no details"; }

/* Why a write failed: the system's error text when a system call failed (disk full,
 * read-only file system, quota), else HDF5's. */
static void write_failure(char *buf, size_t cap) {
    if (h5_last_errno) snprintf(buf, cap, "%s", strerror(h5_last_errno));
    else snprintf(buf, cap, "HDF5: %s", h5_reason());
}

static moe_status damaged(const char *path, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static moe_status damaged(const char *path, const char *fmt, ...) {
    char detail[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    return moe_error(MOE_ERR_FORMAT, "%s is damaged or incomplete: %s", path, detail);
}

static uint32_t crc32_bytes(const void *data, size_t n) {
    uLong crc = crc32(0L, Z_NULL, 0);
    const Bytef *p = data;
    while (n > 0) {
        uInt chunk = n > (1u << 30) ? (1u << 30) : (uInt)n;
        crc = crc32(crc, p, chunk);
        p += chunk;
        n -= chunk;
    }
    return (uint32_t)crc;
}

static void format_shape(char *buf, size_t cap, int ndim, const int64_t *shape) {
    if (ndim == 0) {
        snprintf(buf, cap, "[] (scalar)");
        return;
    }
    size_t used = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && used < cap; i++)
        used += (size_t)snprintf(buf + used, cap - used, "%s%lld", i ? ", " : "",
                                 (long long)shape[i]);
    if (used < cap) snprintf(buf + used, cap - used, "]");
}

/* Bytes of a dense array of that shape; MOE_ERR_INVALID for negative or huge dims. */
static moe_status array_bytes(const char *name, moe_h5_dtype dt, int ndim,
                              const int64_t *shape, size_t *bytes) {
    size_t n = moe_h5_dtype_size(dt);
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return moe_error(MOE_ERR_INVALID, "dataset '%s': dim %d is negative (%lld)", name,
                             i, (long long)shape[i]);
        if (shape[i] > 0 && n > SIZE_MAX / (uint64_t)shape[i])
            return moe_error(MOE_ERR_INVALID, "dataset '%s': shape is too large", name);
        n *= (size_t)shape[i];
    }
    *bytes = n;
    return MOE_OK;
}

/* Non-empty parts separated by single '/', none of them "." or "..". */
static bool name_ok(const char *name) {
    for (const char *p = name;;) {
        size_t n = strcspn(p, "/");
        if (n == 0 || (n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.'))
            return false;
        if (!p[n]) return true;
        p += n + 1;
    }
}

static hid_t file_access_plist(void) {
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    if (fapl < 0) return -1;
    herr_t rc = H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG);
#if H5_VERSION_GE(1, 10, 7)
    /* Keep locking, but work on file systems without lock support (NFS, Lustre). */
    if (rc >= 0) rc = H5Pset_file_locking(fapl, 1, 1);
#endif
    if (rc < 0) {
        H5Pclose(fapl);
        return -1;
    }
    return fapl;
}

static void free_handle(moe_h5 *f) {
    if (f->file >= 0) H5Fclose(f->file);
    free(f->path);
    free(f->tmp_path);
    free(f);
}

/* ---- attributes ---- */

static herr_t write_attr(hid_t obj, const char *name, hid_t type, const void *value) {
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t attr = space < 0 ? -1 : H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    herr_t rc = attr < 0 ? -1 : H5Awrite(attr, type, value);
    if (attr >= 0) H5Aclose(attr);
    if (space >= 0) H5Sclose(space);
    return rc;
}

/* A fixed-length, NUL-terminated UTF-8 string type for `len` characters. */
static hid_t string_type(size_t len) {
    hid_t t = H5Tcopy(H5T_C_S1);
    if (t >= 0 && (H5Tset_size(t, len + 1) < 0 || H5Tset_cset(t, H5T_CSET_UTF8) < 0)) {
        H5Tclose(t);
        return -1;
    }
    return t;
}

static herr_t write_string_attr(hid_t obj, const char *name, const char *value) {
    hid_t t = string_type(strlen(value));
    herr_t rc = t < 0 ? -1 : write_attr(obj, name, t, value);
    if (t >= 0) H5Tclose(t);
    return rc;
}

/* 1: read, 0: absent, -1: present but not a readable scalar integer. */
static int read_int_attr(hid_t obj, const char *name, int64_t *v) {
    htri_t exists = H5Aexists(obj, name);
    if (exists <= 0) return exists < 0 ? -1 : 0;
    hid_t attr = H5Aopen(obj, name, H5P_DEFAULT);
    hid_t space = attr < 0 ? -1 : H5Aget_space(attr);
    hid_t type = attr < 0 ? -1 : H5Aget_type(attr);
    int rc = space >= 0 && type >= 0 && H5Sget_simple_extent_npoints(space) == 1 &&
                     H5Tget_class(type) == H5T_INTEGER &&
                     H5Aread(attr, H5T_NATIVE_INT64, v) >= 0
                 ? 1
                 : -1;
    if (type >= 0) H5Tclose(type);
    if (space >= 0) H5Sclose(space);
    if (attr >= 0) H5Aclose(attr);
    return rc;
}

/* 1: read into buf (NUL-terminated), 0: absent, -1: not a short fixed-length string. */
static int read_string_attr(hid_t obj, const char *name, char *buf, size_t cap) {
    htri_t exists = H5Aexists(obj, name);
    if (exists <= 0) return exists < 0 ? -1 : 0;
    hid_t attr = H5Aopen(obj, name, H5P_DEFAULT);
    hid_t space = attr < 0 ? -1 : H5Aget_space(attr);
    hid_t type = attr < 0 ? -1 : H5Aget_type(attr);
    size_t size = type < 0 ? 0 : H5Tget_size(type);
    int rc = space >= 0 && type >= 0 && H5Sget_simple_extent_npoints(space) == 1 &&
                     H5Tget_class(type) == H5T_STRING && H5Tis_variable_str(type) == 0 &&
                     size > 0 && size < cap && H5Aread(attr, type, buf) >= 0
                 ? 1
                 : -1;
    if (rc == 1) buf[size] = '\0';
    if (type >= 0) H5Tclose(type);
    if (space >= 0) H5Sclose(space);
    if (attr >= 0) H5Aclose(attr);
    return rc;
}

/* ---- writing ---- */

moe_status moe_h5_create(const char *final_path, moe_h5 **out) {
    MOE_ASSERT(final_path && out, "moe_h5_create needs a path and an output pointer");
    h5_init();
    h5_last_errno = 0;
    *out = NULL;
    moe_h5 *f = calloc(1, sizeof *f);
    if (!f) return moe_error(MOE_ERR_OOM, "out of memory creating checkpoint %s", final_path);
    f->file = -1;
    f->writing = true;
    size_t cap = strlen(final_path) + 32;
    f->path = strdup(final_path);
    f->tmp_path = malloc(cap);
    if (!f->path || !f->tmp_path) {
        free_handle(f);
        return moe_error(MOE_ERR_OOM, "out of memory creating checkpoint %s", final_path);
    }
    snprintf(f->tmp_path, cap, "%s.tmp-%d", final_path, (int)getpid());
    hid_t fapl = file_access_plist();
    f->file = fapl < 0 ? -1 : H5Fcreate(f->tmp_path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    if (fapl >= 0) H5Pclose(fapl);
    if (f->file < 0) {
        char why[300];
        write_failure(why, sizeof why);
        moe_status st = moe_error(MOE_ERR_IO, "cannot create checkpoint file %s: %s; check that "
                                  "the directory exists and is writable", f->tmp_path, why);
        unlink(f->tmp_path);
        free_handle(f);
        return st;
    }
    *out = f;
    return MOE_OK;
}

/* Creates dataset `name` (and missing groups), writes `data` unless NULL, and tags it
 * with the CRC-32 of its raw bytes and, when given, a "dtype" attribute. */
static moe_status write_dataset(moe_h5 *f, const char *name, hid_t type, hid_t space,
                                const void *data, uint32_t crc, const char *dtype_tag) {
    if (!name_ok(name))
        return moe_error(MOE_ERR_INVALID,
                         "checkpoint %s: bad dataset name '%s' (use non-empty parts joined "
                         "by single '/', e.g. params/layers.0.attn.wq)",
                         f->path, name);
    if (moe_h5_has(f, name))
        return moe_error(MOE_ERR_INVALID, "checkpoint %s: dataset '%s' is written twice",
                         f->path, name);
    moe_status st = MOE_OK;
    h5_last_errno = 0;
    hid_t dset = -1, lcpl = H5Pcreate(H5P_LINK_CREATE);
    if (lcpl < 0 || H5Pset_create_intermediate_group(lcpl, 1) < 0 ||
        (dset = H5Dcreate2(f->file, name, type, space, lcpl, H5P_DEFAULT, H5P_DEFAULT)) < 0 ||
        (data && H5Dwrite(dset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0) ||
        write_attr(dset, "crc32", H5T_STD_U32LE, &crc) < 0 ||
        (dtype_tag && write_string_attr(dset, "dtype", dtype_tag) < 0)) {
        char why[300];
        write_failure(why, sizeof why);
        st = moe_error(MOE_ERR_IO, "cannot write checkpoint %s: %s (writing dataset '%s')",
                       f->tmp_path, why, name);
    }
    if (dset >= 0) H5Dclose(dset);
    if (lcpl >= 0) H5Pclose(lcpl);
    return st;
}

moe_status moe_h5_put_array(moe_h5 *f, const char *name, moe_h5_dtype dt, int ndim,
                            const int64_t *shape, const void *data) {
    MOE_ASSERT(f && f->writing, "moe_h5_put_array needs a handle from moe_h5_create");
    MOE_ASSERT(name, "moe_h5_put_array: NULL name");
    MOE_ASSERT(ndim >= 0 && ndim <= MOE_H5_MAX_NDIM, "dataset '%s': ndim %d out of range",
               name, ndim);
    MOE_ASSERT(ndim == 0 || shape, "dataset '%s': NULL shape", name);
    size_t bytes = 0;
    MOE_TRY(array_bytes(name, dt, ndim, shape, &bytes));
    MOE_ASSERT(data || bytes == 0, "dataset '%s': NULL data", name);
    hsize_t dims[MOE_H5_MAX_NDIM];
    for (int i = 0; i < ndim; i++) dims[i] = (hsize_t)shape[i];
    hid_t space = ndim == 0 ? H5Screate(H5S_SCALAR) : H5Screate_simple(ndim, dims, NULL);
    if (space < 0)
        return moe_error(MOE_ERR_IO, "cannot describe dataset '%s' for %s (HDF5: %s)", name,
                         f->tmp_path, h5_reason());
    moe_status st = write_dataset(f, name, dtype_h5type(dt), space, bytes ? data : NULL,
                                  crc32_bytes(data, bytes), dt == MOE_H5_BF16 ? "bf16" : NULL);
    H5Sclose(space);
    return st;
}

moe_status moe_h5_put_string(moe_h5 *f, const char *name, const char *text) {
    MOE_ASSERT(f && f->writing, "moe_h5_put_string needs a handle from moe_h5_create");
    MOE_ASSERT(name && text, "moe_h5_put_string: NULL name or text");
    size_t len = strlen(text);
    hid_t type = string_type(len);
    hid_t space = H5Screate(H5S_SCALAR);
    moe_status st =
        type < 0 || space < 0
            ? moe_error(MOE_ERR_IO, "cannot describe string '%s' for %s (HDF5: %s)", name,
                        f->tmp_path, h5_reason())
            : write_dataset(f, name, type, space, text, crc32_bytes(text, len + 1), NULL);
    if (space >= 0) H5Sclose(space);
    if (type >= 0) H5Tclose(type);
    return st;
}

moe_status moe_h5_put_i64(moe_h5 *f, const char *name, int64_t v) {
    return moe_h5_put_array(f, name, MOE_H5_I64, 0, NULL, &v);
}

moe_status moe_h5_put_f64(moe_h5 *f, const char *name, double v) {
    return moe_h5_put_array(f, name, MOE_H5_F64, 0, NULL, &v);
}

static moe_status fsync_path(const char *path, bool directory) {
    int fd = open(path, directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
    if (fd < 0 || fsync(fd) != 0) {
        int err = errno;
        if (fd >= 0) close(fd);
        return moe_error(MOE_ERR_IO, "cannot flush %s to disk: %s", path, strerror(err));
    }
    close(fd);
    return MOE_OK;
}

static moe_status fsync_parent_dir(const char *path) {
    char dir[MOE_H5_PATH_MAX];
    const char *slash = strrchr(path, '/');
    if (!slash) return fsync_path(".", true);
    size_t n = slash == path ? 1 : (size_t)(slash - path);
    if (n >= sizeof dir)
        return moe_error(MOE_ERR_IO, "checkpoint path %s is too long", path);
    memcpy(dir, path, n);
    dir[n] = '\0';
    return fsync_path(dir, true);
}

moe_status moe_h5_commit(moe_h5 *f) {
    MOE_ASSERT(f && f->writing, "moe_h5_commit needs a handle from moe_h5_create");
    int32_t one = 1, version = MOE_H5_FORMAT_VERSION;
    moe_status st = MOE_OK;
    char why[300];
    h5_last_errno = 0;
    if (write_string_attr(f->file, "format", MOE_H5_FORMAT_NAME) < 0 ||
        write_attr(f->file, "format_version", H5T_STD_I32LE, &version) < 0 ||
        write_attr(f->file, "complete", H5T_STD_I32LE, &one) < 0) {
        write_failure(why, sizeof why);
        st = moe_error(MOE_ERR_IO, "cannot write checkpoint %s: %s (marking it complete)",
                       f->tmp_path, why);
    }
    herr_t closed = H5Fclose(f->file); /* flushes the buffered data: a full disk shows here */
    f->file = -1;
    if (st == MOE_OK && closed < 0) {
        write_failure(why, sizeof why);
        st = moe_error(MOE_ERR_IO, "cannot write checkpoint %s: %s (flushing it to disk)",
                       f->tmp_path, why);
    }
    if (st == MOE_OK) st = fsync_path(f->tmp_path, false);
    if (st == MOE_OK && rename(f->tmp_path, f->path) != 0)
        st = moe_error(MOE_ERR_IO, "cannot rename %s to %s: %s", f->tmp_path, f->path,
                       strerror(errno));
    if (st == MOE_OK)
        st = fsync_parent_dir(f->path);
    else
        unlink(f->tmp_path);
    free_handle(f);
    return st;
}

void moe_h5_abort(moe_h5 *f) {
    if (!f) return;
    MOE_ASSERT(f->writing, "moe_h5_abort needs a handle from moe_h5_create");
    if (f->file >= 0) H5Fclose(f->file);
    f->file = -1;
    unlink(f->tmp_path);
    free_handle(f);
}

/* ---- reading ---- */

/* The size of the file at path, refused when it cannot be opened or is a directory. */
static moe_status regular_file_size(const char *path, uint64_t *bytes) {
    struct stat sb;
    int fd = open(path, O_RDONLY);
    if (fd < 0 || fstat(fd, &sb) != 0) {
        int err = errno;
        if (fd >= 0) close(fd);
        return moe_error(MOE_ERR_IO, "cannot open %s: %s", path, strerror(err));
    }
    close(fd);
    if (S_ISDIR(sb.st_mode)) return moe_error(MOE_ERR_IO, "%s is a directory; give a file", path);
    *bytes = (uint64_t)sb.st_size;
    return MOE_OK;
}

/* The root attributes of an open file: moe's format name and version, marked complete. */
static moe_status check_root_attrs(hid_t file, const char *path) {
    char format[64];
    int64_t version = 0, complete = 0;
    int has_format = read_string_attr(file, "format", format, sizeof format);
    int has_version = read_int_attr(file, "format_version", &version);
    int has_complete = read_int_attr(file, "complete", &complete);
    if (has_format < 0 || has_version < 0 || has_complete < 0)
        return damaged(path, "its root attributes cannot be read (HDF5: %s)", h5_reason());
    if (has_format == 0 && has_complete == 0)
        return damaged(path, "it has no 'complete' mark (the save never finished, or this is "
                             "not a file written by moe)");
    if (has_format == 0 || strcmp(format, MOE_H5_FORMAT_NAME) != 0)
        return moe_error(MOE_ERR_FORMAT, "%s is not a file written by moe (format attribute is '%s')", path,
                         has_format ? format : "missing");
    if (has_version == 0 || version != MOE_H5_FORMAT_VERSION)
        return moe_error(MOE_ERR_FORMAT, "%s has format_version %lld, this build reads version %d; use a matching "
                         "moe build", path, (long long)version, MOE_H5_FORMAT_VERSION);
    if (has_complete == 0 || complete != 1) return damaged(path, "it is not marked complete");
    return MOE_OK;
}

/* Touches an object's header (basic information only): its link was decoded to get here. */
static herr_t probe_object(hid_t group, const char *name, const H5L_info_t *info, void *unused) {
    (void)info, (void)unused;
    H5O_info_t oi;
    return H5Oget_info_by_name2(group, name, &oi, H5O_INFO_BASIC, H5P_DEFAULT) < 0 ? -1 : 0;
}

/* Walks the file's groups, links and object headers as libhdf5 decodes them, no data. Run
 * in a child process before the file is read here (moe_run_contained): metadata damaged
 * so that libhdf5 crashes on it fails the open instead of the program. HDF5's own errors
 * are left to the open here, which says what they are. */
static moe_status probe_structure(void *path) {
    hid_t fapl = file_access_plist();
    hid_t file = fapl < 0 ? -1 : H5Fopen(path, H5F_ACC_RDONLY, fapl);
    if (fapl >= 0) H5Pclose(fapl);
    if (file >= 0) {
        H5Lvisit(file, H5_INDEX_NAME, H5_ITER_INC, probe_object, NULL);
        H5Fclose(file);
    }
    return MOE_OK;
}

moe_status moe_h5_open(const char *path, moe_h5 **out) {
    MOE_ASSERT(path && out, "moe_h5_open needs a path and an output pointer");
    h5_init();
    *out = NULL;
    uint64_t bytes = 0;
    MOE_TRY(regular_file_size(path, &bytes));
    MOE_TRY(moe_run_contained(probe_structure, (void *)path, path));
    hid_t fapl = file_access_plist();
    hid_t file = fapl < 0 ? -1 : H5Fopen(path, H5F_ACC_RDONLY, fapl);
    if (fapl >= 0) H5Pclose(fapl);
    if (file < 0) return damaged(path, "it is not a readable HDF5 file (HDF5: %s)", h5_reason());
    moe_status st = check_root_attrs(file, path);
    moe_h5 *f = st == MOE_OK ? calloc(1, sizeof *f) : NULL;
    if (f) {
        f->path = strdup(path);
        f->file_bytes = bytes;
    }
    if (st == MOE_OK && (!f || !f->path)) st = moe_error(MOE_ERR_OOM, "out of memory opening %s", path);
    if (st != MOE_OK) {
        if (f) free(f->path);
        free(f);
        H5Fclose(file);
        return st;
    }
    f->file = file;
    *out = f;
    return MOE_OK;
}

void moe_h5_close(moe_h5 *f) {
    if (!f) return;
    MOE_ASSERT(!f->writing, "moe_h5_close on a writer: use moe_h5_commit or moe_h5_abort");
    free_handle(f);
}

/* The dataset, or -1 (with HDF5's error cleared) when there is none of that name. */
static hid_t open_dataset(moe_h5 *f, const char *name) {
    hid_t d = H5Dopen2(f->file, name, H5P_DEFAULT);
    if (d < 0) H5Eclear2(H5E_DEFAULT);
    return d;
}

bool moe_h5_has(moe_h5 *f, const char *name) {
    MOE_ASSERT(f && name, "moe_h5_has: NULL handle or name");
    hid_t d = open_dataset(f, name);
    if (d >= 0) H5Dclose(d);
    return d >= 0;
}

static moe_status no_dataset(moe_h5 *f, const char *name) {
    return moe_error(MOE_ERR_FORMAT, "checkpoint %s has no dataset '%s'", f->path, name);
}

static moe_status classify_type(moe_h5 *f, const char *name, hid_t dset, hid_t type,
                                moe_h5_dtype *dt) {
    H5T_class_t cls = H5Tget_class(type);
    size_t size = H5Tget_size(type);
    bool is_signed = cls == H5T_INTEGER && H5Tget_sign(type) == H5T_SGN_2;
    char tag[16];
    if (cls == H5T_FLOAT && size == 4) *dt = MOE_H5_F32;
    else if (cls == H5T_FLOAT && size == 8) *dt = MOE_H5_F64;
    else if (cls == H5T_INTEGER && size == 1 && !is_signed) *dt = MOE_H5_U8;
    else if (cls == H5T_INTEGER && size == 4 && is_signed) *dt = MOE_H5_I32;
    else if (cls == H5T_INTEGER && size == 8 && is_signed) *dt = MOE_H5_I64;
    else if (cls == H5T_INTEGER && size == 2 && !is_signed &&
             read_string_attr(dset, "dtype", tag, sizeof tag) == 1 && strcmp(tag, "bf16") == 0)
        *dt = MOE_H5_BF16;
    else if (cls == H5T_STRING)
        return moe_error(MOE_ERR_FORMAT, "dataset '%s' in checkpoint %s is text, not an array",
                         name, f->path);
    else
        return moe_error(MOE_ERR_FORMAT,
                         "dataset '%s' in checkpoint %s has an element type this reader does "
                         "not support (HDF5 class %d, %zu bytes)",
                         name, f->path, (int)cls, size);
    return MOE_OK;
}

/* A dataset must store exactly the bytes its type and shape need, inside the file: a
 * damaged header can claim terabytes, refused here before anything is allocated or read. */
static moe_status check_storage(moe_h5 *f, const char *name, hid_t dset, size_t bytes) {
    hsize_t stored = H5Dget_storage_size(dset);
    if (stored != bytes || stored > f->file_bytes)
        return damaged(f->path, "dataset '%s' stores %llu bytes where its type and shape need %zu "
                       "(the file has %llu)", name, (unsigned long long)stored, bytes,
                       (unsigned long long)f->file_bytes);
    return MOE_OK;
}

static moe_status describe(moe_h5 *f, const char *name, hid_t dset, moe_h5_dtype *dt,
                           int *ndim, int64_t *shape) {
    hid_t type = H5Dget_type(dset), space = H5Dget_space(dset);
    moe_status st;
    if (type < 0 || space < 0)
        st = damaged(f->path, "dataset '%s' cannot be read (HDF5: %s)", name, h5_reason());
    else
        st = classify_type(f, name, dset, type, dt);
    if (st == MOE_OK) {
        int n = H5Sget_simple_extent_ndims(space);
        hsize_t dims[MOE_H5_MAX_NDIM];
        if (n < 0 || n > MOE_H5_MAX_NDIM ||
            H5Sget_simple_extent_type(space) == H5S_NULL ||
            H5Sget_simple_extent_dims(space, dims, NULL) < 0)
            st = moe_error(MOE_ERR_FORMAT,
                           "dataset '%s' in checkpoint %s has an unsupported shape (rank %d)",
                           name, f->path, n);
        else {
            *ndim = n;
            for (int i = 0; i < n; i++) shape[i] = (int64_t)dims[i];
        }
    }
    size_t bytes = 0;
    if (st == MOE_OK && array_bytes(name, *dt, *ndim, shape, &bytes) != MOE_OK)
        st = damaged(f->path, "dataset '%s' has a shape too large to hold", name);
    if (st == MOE_OK) st = check_storage(f, name, dset, bytes);
    if (space >= 0) H5Sclose(space);
    if (type >= 0) H5Tclose(type);
    return st;
}

moe_status moe_h5_shape(moe_h5 *f, const char *name, moe_h5_dtype *dt, int *ndim,
                        int64_t *shape) {
    MOE_ASSERT(f && name && dt && ndim && shape, "moe_h5_shape: NULL argument");
    hid_t dset = open_dataset(f, name);
    if (dset < 0) return no_dataset(f, name);
    moe_status st = describe(f, name, dset, dt, ndim, shape);
    H5Dclose(dset);
    return st;
}

static moe_status check_crc(moe_h5 *f, const char *name, hid_t dset, const void *data,
                            size_t bytes) {
    int64_t stored;
    int rc = read_int_attr(dset, "crc32", &stored);
    if (rc != 1)
        return damaged(f->path, "dataset '%s' has no readable crc32 attribute", name);
    uint32_t computed = crc32_bytes(data, bytes);
    if ((uint64_t)stored != computed)
        return damaged(f->path,
                       "dataset '%s' failed its checksum (stored crc32 %08llx, data has %08x)",
                       name, (unsigned long long)stored, computed);
    return MOE_OK;
}

moe_status moe_h5_get_array(moe_h5 *f, const char *name, moe_h5_dtype dt, int ndim,
                            const int64_t *shape, void *dst) {
    MOE_ASSERT(f && name, "moe_h5_get_array: NULL handle or name");
    MOE_ASSERT(ndim >= 0 && ndim <= MOE_H5_MAX_NDIM, "dataset '%s': ndim %d out of range",
               name, ndim);
    MOE_ASSERT(ndim == 0 || shape, "dataset '%s': NULL shape", name);
    size_t bytes = 0;
    MOE_TRY(array_bytes(name, dt, ndim, shape, &bytes));
    MOE_ASSERT(dst || bytes == 0, "dataset '%s': NULL destination", name);
    hid_t dset = open_dataset(f, name);
    if (dset < 0) return no_dataset(f, name);
    moe_h5_dtype have_dt;
    int have_ndim;
    int64_t have_shape[MOE_H5_MAX_NDIM];
    moe_status st = describe(f, name, dset, &have_dt, &have_ndim, have_shape);
    if (st == MOE_OK && have_dt != dt)
        st = moe_error(MOE_ERR_FORMAT, "dataset '%s' in checkpoint %s is %s, expected %s", name,
                       f->path, moe_h5_dtype_name(have_dt), moe_h5_dtype_name(dt));
    bool same_shape = st == MOE_OK && have_ndim == ndim;
    for (int i = 0; same_shape && i < ndim; i++) same_shape = have_shape[i] == shape[i];
    if (st == MOE_OK && !same_shape) {
        char have[256], want[256];
        format_shape(have, sizeof have, have_ndim, have_shape);
        format_shape(want, sizeof want, ndim, shape);
        st = moe_error(MOE_ERR_FORMAT,
                       "dataset '%s' in checkpoint %s has shape %s, expected %s", name,
                       f->path, have, want);
    }
    if (st == MOE_OK && bytes > 0 &&
        H5Dread(dset, dtype_h5type(dt), H5S_ALL, H5S_ALL, H5P_DEFAULT, dst) < 0)
        st = damaged(f->path, "dataset '%s' cannot be read (HDF5: %s)", name, h5_reason());
    if (st == MOE_OK) st = check_crc(f, name, dset, dst, bytes);
    H5Dclose(dset);
    return st;
}

moe_status moe_h5_get_string(moe_h5 *f, const char *name, char **text) {
    MOE_ASSERT(f && name && text, "moe_h5_get_string: NULL argument");
    *text = NULL;
    hid_t dset = open_dataset(f, name);
    if (dset < 0) return no_dataset(f, name);
    hid_t type = H5Dget_type(dset), space = H5Dget_space(dset);
    size_t size = type < 0 ? 0 : H5Tget_size(type);
    moe_status st = MOE_OK;
    char *buf = NULL;
    if (type < 0 || space < 0 || H5Tget_class(type) != H5T_STRING ||
        H5Tis_variable_str(type) != 0 || H5Sget_simple_extent_type(space) != H5S_SCALAR ||
        size == 0)
        st = moe_error(MOE_ERR_FORMAT,
                       "dataset '%s' in checkpoint %s is not a text (fixed-length string)",
                       name, f->path);
    if (st == MOE_OK) st = check_storage(f, name, dset, size);
    if (st == MOE_OK && !(buf = malloc(size + 1)))
        st = moe_error(MOE_ERR_OOM, "out of memory reading text '%s' from %s", name, f->path);
    if (st == MOE_OK && H5Dread(dset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0)
        st = damaged(f->path, "dataset '%s' cannot be read (HDF5: %s)", name, h5_reason());
    if (st == MOE_OK) st = check_crc(f, name, dset, buf, size);
    if (space >= 0) H5Sclose(space);
    if (type >= 0) H5Tclose(type);
    H5Dclose(dset);
    if (st != MOE_OK) {
        free(buf);
        return st;
    }
    buf[size] = '\0';
    *text = buf;
    return MOE_OK;
}

moe_status moe_h5_get_i64(moe_h5 *f, const char *name, int64_t *v) {
    return moe_h5_get_array(f, name, MOE_H5_I64, 0, NULL, v);
}

moe_status moe_h5_get_f64(moe_h5 *f, const char *name, double *v) {
    return moe_h5_get_array(f, name, MOE_H5_F64, 0, NULL, v);
}

typedef struct list_ctx {
    moe_h5 *f;
    const char *prefix;
    moe_h5_list_fn fn;
    void *user;
    moe_status st;
} list_ctx;

static herr_t list_visit(hid_t group, const char *rel, const H5L_info_t *info, void *data) {
    list_ctx *c = data;
    if (info->type != H5L_TYPE_HARD) return 0;
    hid_t obj = H5Oopen(group, rel, H5P_DEFAULT);
    if (obj < 0) {
        c->st = damaged(c->f->path, "object '%s' cannot be opened (HDF5: %s)", rel, h5_reason());
        return -1;
    }
    bool is_dataset = H5Iget_type(obj) == H5I_DATASET;
    H5Oclose(obj);
    if (!is_dataset) return 0;
    size_t cap = strlen(c->prefix) + strlen(rel) + 2;
    char *full = malloc(cap);
    if (!full) {
        c->st = moe_error(MOE_ERR_OOM, "out of memory listing checkpoint %s", c->f->path);
        return -1;
    }
    snprintf(full, cap, "%s%s%s", c->prefix, c->prefix[0] ? "/" : "", rel);
    c->st = c->fn(full, c->user);
    free(full);
    return c->st == MOE_OK ? 0 : 1;
}

moe_status moe_h5_list(moe_h5 *f, const char *prefix, moe_h5_list_fn fn, void *user) {
    MOE_ASSERT(f && fn, "moe_h5_list: NULL handle or callback");
    if (!prefix) prefix = "";
    MOE_ASSERT(!prefix[0] || name_ok(prefix), "moe_h5_list: bad group name '%s'", prefix);
    hid_t group = H5Gopen2(f->file, prefix[0] ? prefix : "/", H5P_DEFAULT);
    if (group < 0) {
        H5Eclear2(H5E_DEFAULT);
        return MOE_OK;
    }
    list_ctx c = {f, prefix, fn, user, MOE_OK};
    herr_t rc = H5Lvisit(group, H5_INDEX_NAME, H5_ITER_INC, list_visit, &c);
    if (rc < 0 && c.st == MOE_OK)
        c.st = damaged(f->path, "group '%s' cannot be listed (HDF5: %s)", prefix, h5_reason());
    H5Gclose(group);
    return c.st;
}

/* ---- checkpoint directories ---- */

typedef struct ckpt_entry {
    int64_t step;
    long pid; /* 0: a checkpoint; else the writer of a "<name>.tmp-<pid>" file */
    char *name;
} ckpt_entry;

/* Matches "<prefix><digits><suffix>" and "<prefix><digits><suffix>.tmp-<digits>". */
static bool parse_entry(const char *name, const char *prefix, const char *suffix,
                        ckpt_entry *e) {
    size_t np = strlen(prefix), ns = strlen(suffix);
    if (strncmp(name, prefix, np) != 0) return false;
    const char *p = name + np;
    size_t digits = strspn(p, "0123456789");
    if (digits == 0 || digits > 18 || strncmp(p + digits, suffix, ns) != 0) return false;
    e->step = strtoll(p, NULL, 10);
    const char *rest = p + digits + ns;
    e->pid = 0;
    if (!*rest) return true;
    static const char tmp_tag[] = ".tmp-";
    if (strncmp(rest, tmp_tag, sizeof tmp_tag - 1) != 0) return false;
    rest += sizeof tmp_tag - 1;
    size_t pid_digits = strspn(rest, "0123456789");
    if (pid_digits == 0 || pid_digits > 9 || rest[pid_digits]) return false;
    e->pid = strtol(rest, NULL, 10);
    return e->pid > 0;
}

static int newest_first(const void *a, const void *b) {
    const ckpt_entry *x = a, *y = b;
    if (x->step != y->step) return x->step < y->step ? 1 : -1;
    return strcmp(y->name, x->name);
}

static void free_entries(ckpt_entry *e, size_t n) {
    for (size_t i = 0; i < n; i++) free(e[i].name);
    free(e);
}

/* Checkpoints and temporary files of `dir`, newest step first. */
static moe_status scan_dir(const char *dir, const char *prefix, const char *suffix,
                           ckpt_entry **out, size_t *count) {
    DIR *d = opendir(dir);
    if (!d)
        return moe_error(MOE_ERR_IO, "cannot read checkpoint directory %s: %s", dir,
                         strerror(errno));
    ckpt_entry *list = NULL;
    size_t n = 0, cap = 0;
    moe_status st = MOE_OK;
    for (struct dirent *de; st == MOE_OK && (de = readdir(d));) {
        ckpt_entry e;
        if (!parse_entry(de->d_name, prefix, suffix, &e)) continue;
        if (n == cap) {
            size_t new_cap = cap ? 2 * cap : 16;
            ckpt_entry *grown = realloc(list, new_cap * sizeof *grown);
            if (!grown) {
                st = moe_error(MOE_ERR_OOM, "out of memory listing %s", dir);
                break;
            }
            list = grown;
            cap = new_cap;
        }
        e.name = strdup(de->d_name);
        if (!e.name) st = moe_error(MOE_ERR_OOM, "out of memory listing %s", dir);
        else list[n++] = e;
    }
    closedir(d);
    if (st != MOE_OK) {
        free_entries(list, n);
        return st;
    }
    if (n) qsort(list, n, sizeof *list, newest_first);
    *out = list;
    *count = n;
    return MOE_OK;
}

static moe_status join_path(char *buf, size_t cap, const char *dir, const char *name) {
    if ((size_t)snprintf(buf, cap, "%s/%s", dir, name) >= cap)
        return moe_error(MOE_ERR_INVALID, "path %s/%s is too long", dir, name);
    return MOE_OK;
}

/* True when checkpoint `path` carries the text dataset owner->dataset equal to
 * owner->value; an unreadable or damaged file, or one without it, is not owned. */
static bool owned_by(const char *path, const moe_h5_owner *owner) {
    moe_h5 *f;
    if (moe_h5_open(path, &f) != MOE_OK) {
        moe_error_clear();
        return false;
    }
    char *text = NULL;
    bool mine = moe_h5_has(f, owner->dataset) && moe_h5_get_string(f, owner->dataset, &text) == MOE_OK &&
                strcmp(text, owner->value) == 0;
    free(text);
    moe_h5_close(f);
    moe_error_clear();
    return mine;
}

moe_status moe_h5_keep_last_owned(const char *dir, const char *prefix, const char *suffix,
                                  int keep, const moe_h5_owner *owner) {
    MOE_ASSERT(dir && prefix && suffix, "moe_h5_keep_last: NULL argument");
    MOE_ASSERT(keep >= 1, "moe_h5_keep_last: keep must be >= 1, got %d", keep);
    ckpt_entry *list;
    size_t n;
    MOE_TRY(scan_dir(dir, prefix, suffix, &list, &n));
    moe_status st = MOE_OK;
    int kept = owner && owner->written ? 1 : 0; /* the file just written counts, first */
    for (size_t i = 0; i < n && st == MOE_OK; i++) {
        char path[MOE_H5_PATH_MAX];
        st = join_path(path, sizeof path, dir, list[i].name);
        if (st != MOE_OK) break;
        bool remove;
        if (list[i].pid != 0) /* a temporary file: only when its writer is gone */
            remove = kill((pid_t)list[i].pid, 0) != 0 && errno == ESRCH;
        else if (!owner)
            remove = kept++ >= keep;
        else if (owner->written && strcmp(list[i].name, owner->written) == 0)
            remove = false;
        else
            remove = owned_by(path, owner) && kept++ >= keep;
        if (remove && unlink(path) != 0 && errno != ENOENT)
            st = moe_error(MOE_ERR_IO, "cannot delete old checkpoint %s: %s", path,
                           strerror(errno));
    }
    free_entries(list, n);
    return st;
}

moe_status moe_h5_keep_last(const char *dir, const char *prefix, const char *suffix,
                            int keep) {
    return moe_h5_keep_last_owned(dir, prefix, suffix, keep, NULL);
}

/* The default test of moe_h5_find_latest: the file opens (metadata only). */
static moe_status opens(const char *path, void *unused) {
    moe_h5 *f;
    MOE_TRY(moe_h5_open(path, &f));
    moe_h5_close(f);
    return MOE_OK;
}

moe_status moe_h5_find_latest_where(const char *dir, const char *prefix, const char *suffix,
                                    moe_h5_accept_fn accept, void *user, char *path_out,
                                    size_t cap) {
    MOE_ASSERT(dir && prefix && suffix && path_out, "moe_h5_find_latest: NULL argument");
    if (!accept) accept = opens;
    ckpt_entry *list;
    size_t n;
    MOE_TRY(scan_dir(dir, prefix, suffix, &list, &n));
    int skipped = 0;
    bool found = false;
    moe_status st = MOE_OK;
    for (size_t i = 0; i < n && !found && st == MOE_OK; i++) {
        if (list[i].pid != 0) continue;
        char path[MOE_H5_PATH_MAX];
        st = join_path(path, sizeof path, dir, list[i].name);
        if (st != MOE_OK) break;
        if (accept(path, user) != MOE_OK) {
            fprintf(stderr, "moe: warning: skipping a checkpoint: %s\n", moe_last_error());
            skipped++;
            continue;
        }
        found = true;
        st = join_path(path_out, cap, dir, list[i].name);
    }
    free_entries(list, n);
    if (st == MOE_OK && !found)
        st = moe_error(MOE_ERR_IO,
                       "no usable checkpoint %s/%s<step>%s found (%d damaged ones skipped)",
                       dir, prefix, suffix, skipped);
    return st;
}

moe_status moe_h5_find_latest(const char *dir, const char *prefix, const char *suffix,
                              char *path_out, size_t cap) {
    return moe_h5_find_latest_where(dir, prefix, suffix, NULL, NULL, path_out, cap);
}

int64_t moe_h5_open_object_count(void) {
    h5_init();
    ssize_t n = H5Fget_obj_count((hid_t)H5F_OBJ_ALL, H5F_OBJ_ALL);
    return n < 0 ? -1 : (int64_t)n;
}
