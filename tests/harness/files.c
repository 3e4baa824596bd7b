/* Files of the tests: source-tree paths, whole files read and written, JSON fixtures,
 * JSON-lines fields. */
#include "tests/harness/files.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/harness/testlib.h"

const char *moe_test_source_path(const char *rel) {
    static char path[1024], compiled[1024];
    snprintf(compiled, sizeof compiled, "%s", __FILE__);
    char *tail = strstr(compiled, "/tests/harness/files.c");
    if (tail) *tail = '\0';
    const char *dirs[] = {getenv("MOE_SOURCE_DIR"), "..", ".", tail ? compiled : NULL};
    for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
        if (!dirs[i]) continue;
        snprintf(path, sizeof path, "%s/%s", dirs[i], rel);
        if (access(path, R_OK) == 0) return path;
    }
    return rel;
}

void *moe_test_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) fprintf(stderr, "\n  cannot open %s\n", path);
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    rewind(f);
    char *bytes = malloc((size_t)n + 1);
    CU_ASSERT_PTR_NOT_NULL_FATAL(bytes);
    size_t got = fread(bytes, 1, (size_t)n, f);
    fclose(f);
    CU_ASSERT_EQUAL_FATAL(got, (size_t)n);
    bytes[n] = '\0';
    if (len) *len = (size_t)n;
    return bytes;
}

void moe_test_write_file(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) fprintf(stderr, "\n  cannot create %s\n", path);
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    size_t put = fwrite(data, 1, len, f);
    CU_ASSERT_EQUAL_FATAL(fclose(f), 0);
    CU_ASSERT_EQUAL_FATAL(put, len);
}

cJSON *moe_test_load_json(const char *rel) {
    char *text = moe_test_read_file(moe_test_source_path(rel), NULL);
    cJSON *j = cJSON_Parse(text);
    free(text);
    CU_ASSERT_PTR_NOT_NULL_FATAL(j);
    return j;
}

int moe_test_jsonl_values(const char *path, const char *key, double *out, int cap) {
    char quoted[128], line[8192];
    snprintf(quoted, sizeof quoted, "\"%s\":", key);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    int n = 0;
    while (n < cap && fgets(line, sizeof line, f)) {
        const char *p = strstr(line, quoted);
        if (p) out[n++] = atof(p + strlen(quoted));
    }
    fclose(f);
    return n;
}
