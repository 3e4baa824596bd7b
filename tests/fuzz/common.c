/* The scratch file of the fuzz harnesses (see common.h). */
#include "tests/fuzz/common.h"

#include <string.h>
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
