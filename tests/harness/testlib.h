/* Shared scaffolding for the CUnit test programs: one main() that runs the registered
 * suites and exits non-zero on any failure, plus helpers used by many tests. */
#ifndef MOE_TESTS_TESTLIB_H
#define MOE_TESTS_TESTLIB_H

#include <CUnit/Basic.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "core/status.h"

/* Runs CUnit over the suites added by `register_suites` and returns the process exit
 * code (0 when every assertion passed). Test programs do:
 *   int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
 * An optional argv[1] runs only the suite of that name. */
int moe_test_main(int argc, char **argv, void (*register_suites)(void));

/* Adds a suite with the given tests; `tests` ends with a {NULL, NULL} entry. */
typedef struct moe_test_entry {
    const char *name;
    void (*fn)(void);
} moe_test_entry;
void moe_test_add_suite(const char *suite, const moe_test_entry *tests);

/* A fresh scratch directory under the build tree (tests/tmp/<name>-<pid>), created empty. */
const char *moe_test_tmpdir(const char *name);

/* The program's own scratch directory: moe_test_tmpdir(name) on the first call, the same
 * directory (kept) on later calls, which must give the same name. */
const char *moe_test_scratch_dir(const char *name);

/* Fails the test (fatal) when `expr` is not MOE_OK, printing the expression and the message. */
#define CHECK_OK(expr)                                                          \
    do {                                                                        \
        moe_status s_ = (expr);                                                 \
        if (s_ != MOE_OK) fprintf(stderr, "%s: %s\n", #expr, moe_last_error()); \
        CU_ASSERT_EQUAL_FATAL(s_, MOE_OK);                                      \
    } while (0)

/* Fails the test (not fatal) when the last error message lacks `text`, printing both. */
#define CHECK_ERROR_HAS(text)                                                            \
    do {                                                                                 \
        bool has_ = strstr(moe_last_error(), (text)) != NULL;                            \
        CU_ASSERT(has_);                                                                 \
        if (!has_) fprintf(stderr, "    '%s' not in '%s'\n", (text), moe_last_error()); \
    } while (0)

#endif
