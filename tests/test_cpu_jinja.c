/* Tests of the chat-template interpreter: the real templates of Mixtral-8x7B-Instruct, Qwen3,
 * OLMoE-Instruct and DeepSeek-V3 (tests/fixtures/chat, expected text rendered by Jinja2 as
 * transformers sets it up), short templates for each feature, the Hugging Face fixtures' chat
 * cases (text, then its ids), the tokenizer_config.json chat_template forms, and the errors. */
#include "tests/harness/testlib.h"
#include "tests/harness/files.h"

#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "moe/hf/hf_tokenizer.h"
#include "moe/hf/jinja.h"

/* ---------- helpers ---------- */

static void write_file(const char *path, const char *text) { moe_test_write_file(path, text, strlen(text)); }

/* Renders `source` with `vars` (JSON text); returns the status, the output in *out. */
static moe_status render(const char *source, const char *vars_json, char **out) {
    moe_jinja *t = NULL;
    *out = NULL;
    moe_status st = moe_jinja_parse(&t, source, "inline.jinja");
    if (st != MOE_OK) return st;
    cJSON *vars = vars_json ? cJSON_Parse(vars_json) : NULL;
    st = moe_jinja_render(t, vars, out);
    cJSON_Delete(vars);
    moe_jinja_free(t);
    return st;
}

/* Checks one rendered case against its "text" or "error". */
static void check_case(const cJSON *c, const char *source, const char *label) {
    moe_jinja *t = NULL;
    moe_status st = moe_jinja_parse(&t, source, label);
    if (st != MOE_OK) fprintf(stderr, "\n  %s: %s\n", label, moe_last_error());
    CU_ASSERT_EQUAL_FATAL(st, MOE_OK);
    char *out = NULL;
    st = moe_jinja_render(t, cJSON_GetObjectItem(c, "vars"), &out);
    const cJSON *text = cJSON_GetObjectItem(c, "text"), *err = cJSON_GetObjectItem(c, "error");
    if (text) {
        if (st != MOE_OK) fprintf(stderr, "\n  %s: %s\n", label, moe_last_error());
        CU_ASSERT_EQUAL(st, MOE_OK);
        bool same = out && !strcmp(out, text->valuestring);
        if (!same) fprintf(stderr, "\n  %s\n  got : [%s]\n  want: [%s]\n", label, out ? out : "", text->valuestring);
        CU_ASSERT_TRUE(same);
    } else {
        CU_ASSERT_PTR_NOT_NULL_FATAL(err);
        CU_ASSERT_NOT_EQUAL(st, MOE_OK);
        const char *msg = moe_last_error();
        /* raise_exception's text and Jinja's "'x' is undefined" are reproduced word for word */
        if (strstr(err->valuestring, "is undefined") || strstr(source, "raise_exception")) {
            bool has = strstr(msg, err->valuestring) != NULL;
            if (!has) fprintf(stderr, "\n  %s: message [%s] lacks [%s]\n", label, msg, err->valuestring);
            CU_ASSERT_TRUE(has);
        }
    }
    free(out);
    moe_jinja_free(t);
}

/* ---------- the real templates and the feature templates ---------- */

static void test_real_templates(void) {
    cJSON *cases = moe_test_load_json("tests/fixtures/chat/cases.json");
    CU_ASSERT_TRUE(cJSON_GetArraySize(cases) >= 25);
    int i = 0, errors = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, cases) {
        char rel[256], label[300];
        snprintf(rel, sizeof rel, "tests/fixtures/chat/%s", cJSON_GetObjectItem(c, "template")->valuestring);
        snprintf(label, sizeof label, "%s case %d", rel, i++);
        char *source = moe_test_read_file(moe_test_source_path(rel), NULL);
        /* transformers passes tools and documents (None unless given) */
        cJSON *vars = cJSON_GetObjectItem(c, "vars");
        if (!cJSON_GetObjectItem(vars, "tools")) cJSON_AddNullToObject(vars, "tools");
        if (!cJSON_GetObjectItem(vars, "documents")) cJSON_AddNullToObject(vars, "documents");
        check_case(c, source, label);
        errors += cJSON_GetObjectItem(c, "error") != NULL;
        free(source);
    }
    CU_ASSERT_TRUE(errors >= 2);
    cJSON_Delete(cases);
}

static void test_feature_templates(void) {
    cJSON *cases = moe_test_load_json("tests/fixtures/chat/expr_cases.json");
    CU_ASSERT_TRUE(cJSON_GetArraySize(cases) >= 20);
    int i = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, cases) {
        char label[64];
        snprintf(label, sizeof label, "expr_cases.json case %d", i++);
        check_case(c, cJSON_GetObjectItem(c, "source")->valuestring, label);
    }
    cJSON_Delete(cases);
}

/* ---------- the Hugging Face fixtures: text and ids ---------- */

static void test_fixture_chats(void) {
    static const char *names[] = {"mixtral-tiny", "olmoe-tiny", "qwen2-moe-tiny", "qwen3-moe-tiny", "deepseek-v3-tiny"};
    for (size_t f = 0; f < 5; f++) {
        char rel[256];
        snprintf(rel, sizeof rel, "tests/fixtures/hf/%s", names[f]);
        moe_hf_tokenizer *tok = NULL;
        moe_status st = moe_hf_tokenizer_load_dir(&tok, moe_test_source_path(rel));
        if (st != MOE_OK) fprintf(stderr, "\n  %s\n", moe_last_error());
        CU_ASSERT_EQUAL_FATAL(st, MOE_OK);
        CU_ASSERT_PTR_NOT_NULL(strstr(moe_hf_chat_template_origin(tok), "chat_template.jinja"));
        snprintf(rel, sizeof rel, "tests/fixtures/hf/%s/chat_cases.json", names[f]);
        cJSON *cases = moe_test_load_json(rel);
        CU_ASSERT_TRUE(cJSON_GetArraySize(cases) >= 1);
        const cJSON *c;
        cJSON_ArrayForEach(c, cases) {
            char *messages = cJSON_PrintUnformatted(cJSON_GetObjectItem(c, "messages"));
            char *text = NULL;
            bool gen = f != 0; /* the fixtures ask for the generation prompt except with Mixtral's template */
            CU_ASSERT_EQUAL_FATAL(moe_hf_apply_chat_template(tok, messages, gen, NULL, &text), MOE_OK);
            CU_ASSERT_STRING_EQUAL(text, cJSON_GetObjectItem(c, "text")->valuestring);
            moe_token_buf ids = {0};
            CU_ASSERT_EQUAL(moe_hf_encode(tok, text, strlen(text), false, &ids), MOE_OK);
            const cJSON *want = cJSON_GetObjectItem(c, "ids");
            CU_ASSERT_EQUAL_FATAL(ids.len, (size_t)cJSON_GetArraySize(want));
            size_t i = 0;
            const cJSON *e;
            cJSON_ArrayForEach(e, want) CU_ASSERT_EQUAL(ids.data[i++], (int32_t)e->valuedouble);
            moe_token_buf_free(&ids);
            free(text);
            free(messages);
        }
        cJSON_Delete(cases);
        moe_hf_tokenizer_free(tok);
    }
}

/* A directory with olmoe-tiny's tokenizer.json and the given tokenizer_config.json. */
static const char *config_dir(const char *name, const char *config) {
    static char dir[700];
    snprintf(dir, sizeof dir, "%s/%s", moe_test_scratch_dir("jinja"), name);
    mkdir(dir, 0755);
    char path[800];
    char *tok = moe_test_read_file(moe_test_source_path("tests/fixtures/hf/olmoe-tiny/tokenizer.json"), NULL);
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    write_file(path, tok);
    free(tok);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    write_file(path, config);
    return dir;
}

static void test_config_template_forms(void) {
    const char *forms[] = {
        "{\"eos_token\": \"<|endoftext|>\", \"chat_template\": \"{{ messages|length }}:{{ eos_token }}\"}",
        "{\"eos_token\": {\"content\": \"<|endoftext|>\"}, \"chat_template\": [{\"name\": \"tool_use\", "
        "\"template\": \"tools\"}, {\"name\": \"default\", \"template\": \"{{ messages|length }}:{{ eos_token }}\"}]}",
    };
    for (int i = 0; i < 2; i++) {
        char name[16];
        snprintf(name, sizeof name, "form%d", i);
        moe_hf_tokenizer *tok = NULL;
        CU_ASSERT_EQUAL_FATAL(moe_hf_tokenizer_load_dir(&tok, config_dir(name, forms[i])), MOE_OK);
        char *text = NULL;
        const char *messages = "[{\"role\": \"user\", \"content\": \"hi\"}]";
        CU_ASSERT_EQUAL(moe_hf_apply_chat_template(tok, messages, true, NULL, &text), MOE_OK);
        CU_ASSERT_STRING_EQUAL(text, "1:<|endoftext|>");
        free(text);
        moe_hf_tokenizer_free(tok);
    }
    /* no template at all: a clear error */
    moe_hf_tokenizer *tok = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_hf_tokenizer_load_dir(&tok, config_dir("none", "{}")), MOE_OK);
    char *text = NULL;
    CU_ASSERT_EQUAL(moe_hf_apply_chat_template(tok, "[]", true, NULL, &text), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "no chat template"));
    moe_hf_tokenizer_free(tok);
    /* a template that does not parse fails the load, naming the config file and the line */
    const char *dir = config_dir("bad", "{\"chat_template\": \"line one\\n{% if x %}never closed\"}");
    tok = (moe_hf_tokenizer *)1;
    CU_ASSERT_EQUAL(moe_hf_tokenizer_load_dir(&tok, dir), MOE_ERR_FORMAT);
    CU_ASSERT_PTR_NULL(tok);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "tokenizer_config.json:"));
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "endif"));
    /* chat_template.jinja wins over the config's field, and its errors name it */
    dir = config_dir("file", "{\"chat_template\": \"from the config\"}");
    char path[800];
    snprintf(path, sizeof path, "%s/chat_template.jinja", dir);
    write_file(path, "{{ messages|length }}\n{{ x|nosuchfilter }}");
    CU_ASSERT_EQUAL(moe_hf_tokenizer_load_dir(&tok, dir), MOE_ERR_UNSUPPORTED);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "chat_template.jinja:2: filter 'nosuchfilter' is not supported"));
    write_file(path, "file: {{ messages|length }}");
    CU_ASSERT_EQUAL_FATAL(moe_hf_tokenizer_load_dir(&tok, dir), MOE_OK);
    CU_ASSERT_EQUAL(moe_hf_apply_chat_template(tok, "[{}, {}]", false, NULL, &text), MOE_OK);
    CU_ASSERT_STRING_EQUAL(text, "file: 2");
    free(text);
    moe_hf_tokenizer_free(tok);
}

/* ---------- errors ---------- */

static void expect_parse_error(const char *source, moe_status code, const char *part) {
    moe_jinja *t = (moe_jinja *)1;
    CU_ASSERT_EQUAL(moe_jinja_parse(&t, source, "dir/chat_template.jinja"), code);
    CU_ASSERT_PTR_NULL(t);
    const char *msg = moe_last_error();
    bool ok = strstr(msg, "chat template dir/chat_template.jinja:") && strstr(msg, part);
    if (!ok) fprintf(stderr, "\n  message [%s] lacks [%s]\n", msg, part);
    CU_ASSERT_TRUE(ok);
}

static void test_parse_errors(void) {
    expect_parse_error("a\nb\n{% if x %}c", MOE_ERR_FORMAT, "jinja:3: missing {% endif %}");
    expect_parse_error("{{ x + }}", MOE_ERR_FORMAT, "unexpected '}}'");
    expect_parse_error("{{ 'open }}", MOE_ERR_FORMAT, "unterminated string");
    expect_parse_error("{% for x in y %}{% endif %}", MOE_ERR_FORMAT, "unexpected {% endif %}");
    expect_parse_error("{{ x", MOE_ERR_FORMAT, "not closed");
    expect_parse_error("{# x", MOE_ERR_FORMAT, "comment not closed");
    expect_parse_error("\n{% include 'other.jinja' %}", MOE_ERR_UNSUPPORTED, ":2: statement 'include'");
    expect_parse_error("{% raw %}{{ x }}{% endraw %}", MOE_ERR_UNSUPPORTED, "statement 'raw'");
    expect_parse_error("{{ x|frobnicate }}", MOE_ERR_UNSUPPORTED, "filter 'frobnicate'");
    expect_parse_error("{{ x is frob }}", MOE_ERR_UNSUPPORTED, "test 'frob'");
    expect_parse_error("{{ x.frob() }}", MOE_ERR_UNSUPPORTED, "method 'frob'");
    expect_parse_error("{{ cycler(1) }}", MOE_ERR_UNSUPPORTED, "function 'cycler'");
    expect_parse_error("{% for x in y recursive %}{% endfor %}", MOE_ERR_UNSUPPORTED, "recursive");
}

static void test_render_errors(void) {
    char *out = NULL;
    CU_ASSERT_EQUAL(render("ok\n{{ raise_exception('bad input') }}", NULL, &out), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "inline.jinja:2: raise_exception: bad input"));
    CU_ASSERT_PTR_NULL(out);
    CU_ASSERT_EQUAL(render("{{ ['a'] | map('nosuch') | list }}", NULL, &out), MOE_ERR_UNSUPPORTED);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "filter 'nosuch' is not supported"));
    CU_ASSERT_EQUAL(render("{{ 1 // 0 }}", NULL, &out), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "division by zero"));
    CU_ASSERT_EQUAL(render("{% set x = 1 %}{% set x.a = 2 %}", NULL, &out), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "namespace"));
    CU_ASSERT_EQUAL(render("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", NULL, &out), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "deeper than 100"));
    /* the error inside a macro's and a set block's captured output frees them (run under ASan) */
    CU_ASSERT_EQUAL(render("{% macro f() %}x{{ 1 + none }}{% endmacro %}{% set b %}{{ f() }}{% endset %}", NULL, &out),
                    MOE_ERR_INVALID);
    /* values come in from JSON: integral numbers are integers, the rest floats */
    CU_ASSERT_EQUAL(render("{{ a }} {{ b }} {{ c }} {{ d|tojson }}", "{\"a\": 3, \"b\": 2.5, \"c\": null, "
                           "\"d\": {\"k\": [1, \"\\u00e9\"]}}", &out), MOE_OK);
    CU_ASSERT_STRING_EQUAL(out, "3 2.5 None {\"k\": [1, \"\xC3\xA9\"]}");
    free(out);
}

/* Limits: deep nesting is refused at parse time, huge repetitions and ranges at render time. */
static void test_limits(void) {
    char deep[4000];
    size_t n = 0;
    n += (size_t)snprintf(deep + n, sizeof deep - n, "{{ ");
    for (int i = 0; i < 1000; i++) deep[n++] = '(';
    deep[n++] = '1';
    for (int i = 0; i < 1000; i++) deep[n++] = ')';
    snprintf(deep + n, sizeof deep - n, " }}");
    expect_parse_error(deep, MOE_ERR_UNSUPPORTED, "nest deeper");
    n = 0;
    for (int i = 0; i < 300; i++) n += (size_t)snprintf(deep + n, sizeof deep - n, "{%% if 1 %%}");
    expect_parse_error(deep, MOE_ERR_UNSUPPORTED, "nest deeper");
    char *out = NULL;
    CU_ASSERT_EQUAL(render("{{ 'ab' * 1000000000 }}", NULL, &out), MOE_ERR_INVALID);
    CU_ASSERT_EQUAL(render("{{ range(100000000)|length }}", NULL, &out), MOE_ERR_INVALID);
    CU_ASSERT_EQUAL(render("{{ 2 ** 100 > 0 }} {{ 'ab' * 3 }}", NULL, &out), MOE_OK);
    CU_ASSERT_STRING_EQUAL(out, "True ababab");
    free(out);
    /* found by fuzzing (undefined behaviour, a division trap): integers past 64 bits become
     * floats, as Python's unbounded ones compare; huge slice steps, ranges and indexes stay
     * in bounds; `divisibleby 0` and an out-of-range int() fail with a message */
    CU_ASSERT_EQUAL(render("{{ 9223372036854775807 + 1 > 0 }} {{ -(-9223372036854775807 - 1) > 0 }} "
                           "{{ (-9223372036854775807 - 1) // -1 > 0 }} {{ (-9223372036854775807 - 1) % -1 }} "
                           "{{ 3 ** 50 > 3 ** 49 }} {{ (-2) ** 3 }} {{ 1 ** -1 }} {{ (-9223372036854775807 - 1)|abs > 0 }} "
                           "{{ 'abcdef'[1::9223372036854775807] }} {{ 'abcdef'[::-9223372036854775807 - 1] }} "
                           "{{ range(-9223372036854775807 - 1, 9223372036854775807, 4611686018427387904)|list }}",
                           NULL, &out), MOE_OK);
    CU_ASSERT_STRING_EQUAL(out, "True True True 0 True -8 1.0 True b f "
                                "[-9223372036854775808, -4611686018427387904, 0, 4611686018427387904]");
    free(out);
    CU_ASSERT_EQUAL(render("{{ 4 is divisibleby 0 }}", NULL, &out), MOE_ERR_INVALID);
    CU_ASSERT_EQUAL(render("{{ 1e300|int }}", NULL, &out), MOE_ERR_INVALID);
    CU_ASSERT_EQUAL(render("{{ 'abc'[1.5:] }}", NULL, &out), MOE_ERR_INVALID);
    CU_ASSERT_EQUAL(render("{{ 0 ** -1 }}", NULL, &out), MOE_ERR_INVALID);
    /* a render has a budget of steps and bytes: endless loops, quadratic filters and huge
     * strings fail with a message; a 5000-message chat through a real template stays far
     * inside it */
    CU_ASSERT_EQUAL(render("{% for a in range(1000000) %}{% for b in range(1000000) %}{% endfor %}{% endfor %}",
                           NULL, &out), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "steps"));
    CU_ASSERT_EQUAL(render("{{ range(1000000)|unique|length }}", NULL, &out), MOE_ERR_INVALID);
    CU_ASSERT_EQUAL(render("{% set s = 'x' * 60000000 %}{{ [s, s, s, s, s, s, s]|join }}", NULL, &out),
                    MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "MiB"));
    /* values nested past 500 levels, or holding themselves, fail to print (no stack overflow) */
    CU_ASSERT_EQUAL(render("{% set ns = namespace(x=[]) %}{% for i in range(50000) %}{% set ns.x = [ns.x] %}"
                           "{% endfor %}{{ ns.x == ns.x }}{{ ns.x }}", NULL, &out), MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "nests deeper"));
    CU_ASSERT_EQUAL(render("{% set ns = namespace(a=1) %}{% set ns.b = ns %}{{ ns == ns }}{{ ns|tojson }}", NULL, &out),
                    MOE_ERR_INVALID);
    CU_ASSERT_PTR_NOT_NULL(strstr(moe_last_error(), "holds itself"));
    char *source = moe_test_read_file(moe_test_source_path("tests/fixtures/chat/qwen3.jinja"), NULL);
    cJSON *vars = cJSON_CreateObject(), *msgs = cJSON_AddArrayToObject(vars, "messages");
    for (int i = 0; i < 5000; i++) {
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "role", i % 2 ? "assistant" : "user");
        cJSON_AddStringToObject(m, "content", "Some words of a message, about as long as a short one.");
        cJSON_AddItemToArray(msgs, m);
    }
    moe_jinja *t = NULL;
    CU_ASSERT_EQUAL_FATAL(moe_jinja_parse(&t, source, "qwen3.jinja"), MOE_OK);
    moe_status st = moe_jinja_render(t, vars, &out);
    if (st != MOE_OK) fprintf(stderr, "\n  %s\n", moe_last_error());
    CU_ASSERT_EQUAL(st, MOE_OK);
    CU_ASSERT_TRUE(out && strlen(out) > 5000 * 55);
    free(out);
    moe_jinja_free(t);
    cJSON_Delete(vars);
    free(source);
}

/* Random templates made of template syntax fragments: parse and render either succeed or fail
 * with a message, never crash (run under ASan). */
static void test_random_templates(void) {
    static const char *frags[] = {"{{", "}}", "{%", "%}", "{#", "#}", "-", "+", " if ", " for ", " in ", " set ",
                                  " endif ", " endfor ", " else ", "x", "messages", "loop.index", "'s'", "\"", "(",
                                  ")", "[", "]", "{", "}", ":", ",", "|", "length", "trim", " is ", " not ", "1",
                                  "2.5", "=", "==", "~", "+", "*", "/", " and ", " or ", "\n", " ", ".", "[::-1]",
                                  "namespace(", "raise_exception(", " macro ", " endmacro ", "tojson"};
    const size_t nf = sizeof frags / sizeof frags[0];
    uint64_t state = 42;
    cJSON *vars = cJSON_Parse("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"x\": [1, \"a\"]}");
    int parsed = 0;
    for (int iter = 0; iter < 3000; iter++) {
        char src[512];
        size_t n = 0;
        int k = 1 + (int)((state >> 33) % 24);
        for (int i = 0; i < k; i++) {
            state = state * 6364136223846793005ULL + 1442695040888963407ULL;
            const char *f = frags[(state >> 33) % nf];
            size_t l = strlen(f);
            if (n + l >= sizeof src) break;
            memcpy(src + n, f, l);
            n += l;
        }
        src[n] = '\0';
        moe_jinja *t = NULL;
        if (moe_jinja_parse(&t, src, "random") != MOE_OK) {
            CU_ASSERT_PTR_NULL(t);
            CU_ASSERT_TRUE(strlen(moe_last_error()) > 0);
            continue;
        }
        parsed++;
        char *out = NULL;
        if (moe_jinja_render(t, vars, &out) != MOE_OK) CU_ASSERT_PTR_NULL(out);
        free(out);
        moe_jinja_free(t);
    }
    CU_ASSERT_TRUE(parsed > 100);
    cJSON_Delete(vars);
}

static void register_suites(void) {
    static const moe_test_entry tests[] = {
        {"real templates", test_real_templates},
        {"feature templates", test_feature_templates},
        {"fixture chats", test_fixture_chats},
        {"config template forms", test_config_template_forms},
        {"parse errors", test_parse_errors},
        {"render errors", test_render_errors},
        {"limits", test_limits},
        {"random templates", test_random_templates},
        {NULL, NULL},
    };
    moe_test_add_suite("jinja", tests);
}

int main(int argc, char **argv) { return moe_test_main(argc, argv, register_suites); }
