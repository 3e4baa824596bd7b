/* Fuzz target: the chat-template parser and renderer (moe_jinja_parse, moe_jinja_render).
 *
 * Input: template source. A template that parses is rendered with a fixed conversation
 * (system, user, an assistant turn with a tool call and reasoning, a tool answer, a user
 * turn with list content), tools, the special tokens and add_generation_prompt, twice.
 * Checks: a refused template or a failed render gives a message and never MOE_ERR_OOM (the
 * renderer's limits keep a small template from asking for gigabytes); the two renders are
 * byte for byte the same (unless the template reads the clock through strftime_now). */
#include <string.h>

#include "moe/hf/jinja.h"
#include "tests/fuzz/common.h"

static const char vars_json[] =
    "{\"messages\": ["
    "{\"role\": \"system\", \"content\": \"You are terse.\"},"
    "{\"role\": \"user\", \"content\": \"Weather in Paris? \\u00e9t\\u00e9 \\ud83d\\ude00\"},"
    "{\"role\": \"assistant\", \"content\": \"\", \"reasoning_content\": \"look it up\", \"tool_calls\": ["
    "{\"type\": \"function\", \"id\": \"call_1\", \"function\": {\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 2}}}]},"
    "{\"role\": \"tool\", \"tool_call_id\": \"call_1\", \"content\": \"{\\\"temp\\\": 21.5}\"},"
    "{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"Thanks!\"}, {\"type\": \"image\"}]}],"
    "\"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"weather\", \"description\": \"Forecast\","
    "\"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}, \"days\": "
    "{\"type\": \"integer\"}}, \"required\": [\"city\"]}}}],"
    "\"documents\": null, \"add_generation_prompt\": true, \"enable_thinking\": false,"
    "\"bos_token\": \"<s>\", \"eos_token\": \"</s>\", \"unk_token\": \"<unk>\", \"pad_token\": null}";

static cJSON *vars;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    vars = cJSON_Parse(vars_json);
    FUZZ_CHECK(cJSON_IsObject(vars), "the fixed variables do not parse");
    return 0;
}

static moe_status render(const moe_jinja *t, char **out, size_t *len) {
    *out = NULL;
    moe_status st = moe_jinja_render(t, vars, out);
    FUZZ_CHECK(st == MOE_OK ? *out != NULL : *out == NULL && *moe_last_error(), "render: status %s, output %p",
               moe_status_name(st), (void *)*out);
    FUZZ_CHECK(st != MOE_ERR_OOM, "render ran out of memory: %s", moe_last_error());
    *len = *out ? strlen(*out) : 0;
    return st;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *src = malloc(size + 1);
    FUZZ_CHECK(src, "out of memory");
    memcpy(src, data, size);
    src[size] = '\0';
    moe_jinja *t = NULL;
    moe_status st = moe_jinja_parse(&t, src, "<fuzz>");
    if (st != MOE_OK) {
        FUZZ_CHECK(!t && *moe_last_error(), "a refused template left a tree or no message");
        FUZZ_CHECK(st != MOE_ERR_OOM, "a %zu-byte template ran out of memory: %s", size, moe_last_error());
        free(src);
        return 0;
    }
    char *a, *b;
    size_t la, lb;
    moe_status sa = render(t, &a, &la), sb = render(t, &b, &lb);
    FUZZ_CHECK(sa == sb, "two renders gave %s and %s", moe_status_name(sa), moe_status_name(sb));
    if (!strstr(src, "strftime_now"))
        FUZZ_CHECK(la == lb && (!a || !memcmp(a, b, la)), "two renders differ:\n%s\n----\n%s", a, b);
    free(a);
    free(b);
    moe_jinja_free(t);
    free(src);
    return 0;
}
