/* The command-line parser (moe/cli/args.h): typed values with full-string and range
 * checks, unknown flags with a suggestion, repeatable flags, positionals, --help. */
#include <math.h>
#include <string.h>

#include "core/yaml_config.h"
#include "moe/cli/args.h"
#include "tests/harness/testlib.h"

typedef struct values {
    int n;
    int64_t seed;
    double p;
    const char *dev, *name;
    bool quiet;
    moe_arg_list sets;
} values;

/* Parses a NULL-terminated word list against a fixed table into *v (reset first). */
static moe_status parse(values *v, moe_args *a, const char *const *words) {
    moe_arg_list_free(&v->sets);
    *v = (values){.n = 7, .p = 0.5};
    const moe_flag_spec specs[] = {
        {"--tokens", MOE_FLAG_INT, "N", 1, 100, NULL, "count", &v->n},
        {"--seed", MOE_FLAG_I64, "S", 0, 1e15, NULL, "seed", &v->seed},
        {"--top-p", MOE_FLAG_DOUBLE, "P", 0, 1, NULL, "mass", &v->p, true, false},
        {"--device", MOE_FLAG_STRING, "D", 0, 0, "cpu|cuda", "device", &v->dev},
        {"--name", MOE_FLAG_STRING, "X", 0, 0, NULL, "any text", &v->name},
        {"--quiet", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "less output", &v->quiet},
        {"--set", MOE_FLAG_MULTI, "K=V", 0, 0, NULL, "override", &v->sets},
        {0}};
    int argc = 0;
    char *argv[32];
    for (; words[argc]; argc++) argv[argc] = (char *)words[argc];
    return moe_args_parse("test", specs, argc, argv, a);
}

static void expect_error(const char *const *words, const char *text) {
    values v = {0};
    moe_args a;
    CU_ASSERT_EQUAL(parse(&v, &a, words), MOE_ERR_CONFIG);
    if (!strstr(moe_last_error(), text)) printf("\nmessage '%s' lacks '%s'\n", moe_last_error(), text);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), text));
    moe_arg_list_free(&v.sets);
}

static void test_values(void) {
    values v = {0};
    moe_args a;
    const char *w[] = {"in.txt", "--tokens", "42", "--seed=123456789012", "--top-p", "1", "--device", "cuda",
                       "--name", "-x", "--quiet", "--set", "a=1", "--set=b=2", "-", "--", "--tokens", NULL};
    CU_ASSERT_EQUAL_FATAL(parse(&v, &a, w), MOE_OK);
    CU_ASSERT_EQUAL(v.n, 42);
    CU_ASSERT_EQUAL(v.seed, 123456789012LL);
    CU_ASSERT_EQUAL(v.p, 1.0);
    CU_ASSERT_STRING_EQUAL(v.dev, "cuda");
    CU_ASSERT_STRING_EQUAL(v.name, "-x"); /* a value may start with '-' */
    CU_ASSERT_TRUE(v.quiet);
    CU_ASSERT_EQUAL_FATAL(v.sets.n, 2);
    CU_ASSERT_STRING_EQUAL(v.sets.items[0], "a=1");
    CU_ASSERT_STRING_EQUAL(v.sets.items[1], "b=2");
    CU_ASSERT_EQUAL_FATAL(a.n_positional, 3); /* in.txt, "-", and what follows "--" */
    CU_ASSERT_STRING_EQUAL(a.positional[0], "in.txt");
    CU_ASSERT_STRING_EQUAL(a.positional[1], "-");
    CU_ASSERT_STRING_EQUAL(a.positional[2], "--tokens");
    CU_ASSERT_FALSE(a.help);
    moe_args_free(&a);
    /* defaults stay when a flag is absent */
    const char *none[] = {NULL};
    CU_ASSERT_EQUAL_FATAL(parse(&v, &a, none), MOE_OK);
    CU_ASSERT_TRUE(v.n == 7 && v.p == 0.5 && !v.quiet && v.sets.n == 0 && a.n_positional == 0);
    moe_args_free(&a);
    const char *help[] = {"--tokens", "3", "--help", "--bogus", NULL};
    CU_ASSERT_EQUAL_FATAL(parse(&v, &a, help), MOE_OK);
    CU_ASSERT_TRUE(a.help);
    moe_args_free(&a);
    moe_arg_list_free(&v.sets);
}

static void test_refusals(void) {
    expect_error((const char *[]){"--tokens", "abc", NULL}, "--tokens 'abc' is not an integer (expected an integer in [1, 100])");
    expect_error((const char *[]){"--tokens", "-1", NULL}, "--tokens -1 is out of range (expected an integer in [1, 100])");
    expect_error((const char *[]){"--tokens", "101", NULL}, "--tokens 101 is out of range");
    expect_error((const char *[]){"--tokens", "5x", NULL}, "'5x' is not an integer");
    expect_error((const char *[]){"--tokens", "2.5", NULL}, "'2.5' is not an integer");
    expect_error((const char *[]){"--tokens", "", NULL}, "'' is not an integer");
    expect_error((const char *[]){"--tokens", " 5", NULL}, "' 5' is not an integer");
    expect_error((const char *[]){"--tokens", "99999999999999999999", NULL}, "is not an integer");
    expect_error((const char *[]){"--top-p", "nan", NULL}, "--top-p 'nan' is not a number (expected a number in (0, 1])");
    expect_error((const char *[]){"--top-p", "inf", NULL}, "'inf' is not a number");
    expect_error((const char *[]){"--top-p", "0", NULL}, "--top-p 0 is out of range (expected a number in (0, 1])");
    expect_error((const char *[]){"--top-p", "1.0001", NULL}, "out of range");
    expect_error((const char *[]){"--device", "tpu", NULL}, "--device 'tpu' is not one of cpu|cuda");
    expect_error((const char *[]){"--device", "cu", NULL}, "is not one of cpu|cuda");
    expect_error((const char *[]){"--tokens", NULL}, "--tokens needs a value (N)");
    expect_error((const char *[]){"--quiet=yes", NULL}, "--quiet takes no value");
    expect_error((const char *[]){"--tokes", "3", NULL}, "test: unknown flag --tokes (did you mean --tokens?)");
    expect_error((const char *[]){"--see=3", NULL}, "unknown flag --see (did you mean --seed?)");
    expect_error((const char *[]){"--zzzzzzzz", NULL}, "unknown flag --zzzzzzzz (moe test --help lists the flags)");
    expect_error((const char *[]){"-t", NULL}, "unknown flag -t");
}

static void test_edit_distance(void) {
    CU_ASSERT_EQUAL(moe_edit_distance("", ""), 0);
    CU_ASSERT_EQUAL(moe_edit_distance("abc", ""), 3);
    CU_ASSERT_EQUAL(moe_edit_distance("--resum", "--resume"), 1);
    CU_ASSERT_EQUAL(moe_edit_distance("--tpo-k", "--top-k"), 1); /* a transposition */
    CU_ASSERT_EQUAL(moe_edit_distance("kitten", "sitting"), 3);
}

static void test_help_text(void) {
    values v = {.n = 9};
    const moe_flag_spec specs[] = {{"--tokens", MOE_FLAG_INT, "N", 1, 100, NULL, "new tokens", &v.n},
                                   {"--top-p", MOE_FLAG_DOUBLE, "P", 0, 1, NULL, "mass", &v.p, true, false},
                                   {0}};
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    moe_args_print_help(f, "moe test [flags]", specs);
    fclose(f);
    CU_ASSERT_PTR_NOT_NULL(strstr(text, "usage: moe test [flags]"));
    CU_ASSERT_PTR_NOT_NULL(strstr(text, "--tokens N"));
    CU_ASSERT_PTR_NOT_NULL(strstr(text, "new tokens (integer in [1, 100], default 9)"));
    CU_ASSERT_PTR_NOT_NULL(strstr(text, "(number in (0, 1], default 0)"));
    CU_ASSERT_PTR_NOT_NULL(strstr(text, "--help"));
    free(text);
}

static void register_suites(void) {
    moe_test_add_suite("args", (moe_test_entry[]){{"values", test_values},
                                                  {"refusals", test_refusals},
                                                  {"edit_distance", test_edit_distance},
                                                  {"help_text", test_help_text},
                                                  {NULL, NULL}});
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
