/* Runs a fuzz harness without libFuzzer: every argument is a file or a directory of files
 * (not recursive; names starting with '.' skipped), each read whole and passed to
 * LLVMFuzzerTestOneInput in name order. A broken check or a sanitizer report aborts; a
 * directory that cannot be read or no input at all is a failure (exit 1). Prints the
 * number of inputs run. */
#include <dirent.h>
#include <errno.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tests/fuzz/common.h"

static int run_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s: %s\n", path, strerror(errno));
        return -1;
    }
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0, got;
    do {
        if (len == cap) {
            cap = cap ? 2 * cap : 65536;
            uint8_t *grown = realloc(buf, cap);
            FUZZ_CHECK(grown, "out of memory reading %s", path);
            buf = grown;
        }
        got = fread(buf + len, 1, cap - len, f);
        len += got;
    } while (got > 0);
    int err = ferror(f);
    fclose(f);
    if (err) {
        fprintf(stderr, "cannot read %s\n", path);
        free(buf);
        return -1;
    }
    if (getenv("MOE_FUZZ_VERBOSE")) fprintf(stderr, "%s (%zu bytes)\n", path, len);
    LLVMFuzzerTestOneInput(buf, len);
    free(buf);
    return 1;
}

static int by_name(const struct dirent **a, const struct dirent **b) {
    return strcmp((*a)->d_name, (*b)->d_name);
}

/* Inputs run from one path, or -1 when it cannot be read. */
static int run_path(const char *path) {
    struct stat sb;
    if (stat(path, &sb) != 0) {
        fprintf(stderr, "cannot stat %s: %s\n", path, strerror(errno));
        return -1;
    }
    if (!S_ISDIR(sb.st_mode)) return run_file(path);
    struct dirent **names;
    int n = scandir(path, &names, NULL, by_name), ran = 0;
    if (n < 0) {
        fprintf(stderr, "cannot list %s: %s\n", path, strerror(errno));
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (names[i]->d_name[0] != '.' && ran >= 0) {
            char full[4096];
            snprintf(full, sizeof full, "%s/%s", path, names[i]->d_name);
            int r = run_file(full);
            ran = r < 0 ? -1 : ran + r;
        }
        free(names[i]);
    }
    free(names);
    return ran;
}

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif

/* Caps the address space at what is mapped now plus 2 GiB, so that an input asking for
 * gigabytes fails its allocation (libFuzzer reports such a request as a crash) instead of
 * passing unnoticed. Not under ASan, whose shadow memory reserves terabytes. */
static void limit_address_space(void) {
#ifndef UNDER_ASAN
    unsigned long pages = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    int ok = f && fscanf(f, "%lu", &pages) == 1;
    if (f) fclose(f);
    struct rlimit rl;
    if (!ok || getrlimit(RLIMIT_AS, &rl) != 0) return;
    rlim_t cap = (rlim_t)pages * (rlim_t)sysconf(_SC_PAGESIZE) + ((rlim_t)2 << 30);
    if (rl.rlim_max == RLIM_INFINITY || cap < rl.rlim_max) rl.rlim_cur = cap;
    setrlimit(RLIMIT_AS, &rl);
#endif
}

int main(int argc, char **argv) {
    LLVMFuzzerInitialize(&argc, &argv);
    limit_address_space();
    int total = 0;
    for (int i = 1; i < argc; i++) {
        int ran = run_path(argv[i]);
        if (ran < 0) return 1;
        total += ran;
    }
    printf("%s: %d inputs ran\n", argv[0], total);
    return total > 0 ? 0 : 1;
}
