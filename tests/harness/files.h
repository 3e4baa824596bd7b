/* Files the tests read: paths inside the source tree (fixtures, shipped configs) and
 * whole-file reads and writes that fail the running test when they cannot be done, fields of
 * JSON-lines files. */
#ifndef MOE_TESTS_FILES_H
#define MOE_TESTS_FILES_H

#include <cjson/cJSON.h>
#include <stddef.h>

/* `rel` (a path inside the source tree) under $MOE_SOURCE_DIR, else ".." (tests run in the
 * build dir), else ".", else the tree this harness was compiled from (CMake passes __FILE__
 * as an absolute path); `rel` itself when none of them holds it. The result lives until the
 * next call. */
const char *moe_test_source_path(const char *rel);

/* The whole file at `path`, with a NUL after its last byte (so text reads as a string);
 * *len gets its size when len is not NULL. Fails the test (fatal) when it cannot be read.
 * Caller frees. */
void *moe_test_read_file(const char *path, size_t *len);

/* Writes data[0..len) to the file at `path` (replaced). Fails the test (fatal) when it
 * cannot be written. */
void moe_test_write_file(const char *path, const void *data, size_t len);

/* The JSON document at `rel` inside the source tree; fails the test (fatal) when it cannot
 * be read or parsed. Caller frees with cJSON_Delete. */
cJSON *moe_test_load_json(const char *rel);

/* The numbers after "`key`": in the lines of the file at `path` that hold one (at most `cap`
 * of them, in order, e.g. one field of a run's metrics.jsonl); returns how many were read,
 * 0 when the file cannot be opened. */
int moe_test_jsonl_values(const char *path, const char *key, double *out, int cap);

#endif
