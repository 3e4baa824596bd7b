/* The scratch file and folder of the fuzz harnesses (see common.h). */
#include "tests/fuzz/common.h"

#include <dirent.h>
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char scratch_path[512];

static void remove_scratch(void) {
    if (scratch_path[0]) unlink(scratch_path);
}

const char *fuzz_write_file(const char *tag, const uint8_t *data, size_t size) {
    if (!scratch_path[0]) {
        const char *dir = getenv("TMPDIR");
        snprintf(scratch_path, sizeof scratch_path, "%s/moe-fuzz-%s-%ld", dir && *dir ? dir : "/tmp",
                 tag, (long)getpid());
        atexit(remove_scratch);
    }
    FILE *f = fopen(scratch_path, "wb");
    FUZZ_CHECK(f, "cannot create the scratch file %s", scratch_path);
    FUZZ_CHECK(fwrite(data, 1, size, f) == size && fclose(f) == 0, "cannot write %s", scratch_path);
    return scratch_path;
}

static char scratch_dir[512];

static void remove_scratch_dir(void) {
    DIR *d = opendir(scratch_dir);
    if (!d) return;
    for (struct dirent *e; (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", scratch_dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    rmdir(scratch_dir);
}

const char *fuzz_scratch_dir(const char *tag) {
    if (!scratch_dir[0]) {
        const char *dir = getenv("TMPDIR");
        snprintf(scratch_dir, sizeof scratch_dir, "%s/moe-fuzz-%s-%ld.d", dir && *dir ? dir : "/tmp", tag,
                 (long)getpid());
        FUZZ_CHECK(mkdir(scratch_dir, 0700) == 0 || errno == EEXIST, "cannot create %s", scratch_dir);
        atexit(remove_scratch_dir);
    }
    return scratch_dir;
}

void fuzz_put_file(const char *dir, const char *name, const uint8_t *data, size_t size) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (!data) {
        FUZZ_CHECK(unlink(path) == 0 || errno == ENOENT, "cannot remove %s", path);
        return;
    }
    FILE *f = fopen(path, "wb");
    FUZZ_CHECK(f, "cannot create %s", path);
    FUZZ_CHECK(fwrite(data, 1, size, f) == size && fclose(f) == 0, "cannot write %s", path);
}
