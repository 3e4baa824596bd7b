/* CUnit runner and small helpers shared by all test programs. */
#include "tests/harness/testlib.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

void moe_test_add_suite(const char *suite, const moe_test_entry *tests) {
    CU_pSuite s = CU_add_suite(suite, NULL, NULL);
    if (!s) {
        fprintf(stderr, "CU_add_suite(%s) failed: %s\n", suite, CU_get_error_msg());
        exit(2);
    }
    for (const moe_test_entry *t = tests; t->name; t++) CU_add_test(s, t->name, t->fn);
}

int moe_test_main(int argc, char **argv, void (*register_suites)(void)) {
    if (CU_initialize_registry() != CUE_SUCCESS) return 2;
    register_suites();
    CU_basic_set_mode(CU_BRM_VERBOSE);
    if (argc > 1) {
        CU_pSuite s = CU_get_suite(argv[1]);
        if (!s) {
            fprintf(stderr, "no suite named %s\n", argv[1]);
            CU_cleanup_registry();
            return 2;
        }
        CU_basic_run_suite(s);
    } else {
        CU_basic_run_tests();
    }
    unsigned failed = CU_get_number_of_failures() + CU_get_number_of_tests_failed();
    unsigned ran = CU_get_number_of_tests_run();
    CU_cleanup_registry();
    if (ran == 0) {
        fprintf(stderr, "no test ran\n");
        return 1;
    }
    return failed ? 1 : 0;
}

const char *moe_test_tmpdir(const char *name) {
    static char path[512];
    mkdir("tests", 0755);
    mkdir("tests/tmp", 0755);
    snprintf(path, sizeof path, "tests/tmp/%s-%d", name, (int)getpid());
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", path);
    if (system(cmd) != 0) return NULL;
    mkdir(path, 0755);
    return path;
}

const char *moe_test_scratch_dir(const char *name) {
    static char dir[512], first[128];
    if (!dir[0]) {
        const char *made = moe_test_tmpdir(name);
        CU_ASSERT_PTR_NOT_NULL_FATAL(made);
        snprintf(dir, sizeof dir, "%s", made);
        snprintf(first, sizeof first, "%s", name);
    }
    MOE_ASSERT(!strcmp(name, first), "moe_test_scratch_dir(%s) after moe_test_scratch_dir(%s)", name, first);
    return dir;
}
