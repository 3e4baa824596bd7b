/* Fuzz target: the YAML config reader (moe_config_load_text / _load_file, --set overrides,
 * validation, the effective-config dump).
 *
 * Input: YAML text, then NUL-separated overrides: "model:\n  d_model: 64\n\0model.top_k=3".
 * Checks: the text and file readers agree (same status, same struct); every failure
 * leaves a message; any config that loads writes out YAML that loads back to an identical
 * struct (the checkpoint stores a config that way and resume reads it back). */
#include <string.h>

#include "moe/model/config.h"
#include "tests/fuzz/common.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) { return 0; }

/* The config written as YAML must load back to the same bytes. */
static void check_round_trip(const moe_config *cfg) {
    char *text = NULL;
    FUZZ_CHECK(moe_config_to_yaml(cfg, &text) == MOE_OK, "to_yaml: %s", moe_last_error());
    moe_config back;
    moe_status st = moe_config_load_text(&back, text, "<written>");
    FUZZ_CHECK(st == MOE_OK, "the written config does not load: %s\n%s", moe_last_error(), text);
    FUZZ_CHECK(memcmp(&back, cfg, sizeof back) == 0, "the written config loads differently:\n%s", text);
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *buf = malloc(size + 1);
    FUZZ_CHECK(buf, "out of memory");
    memcpy(buf, data, size);
    buf[size] = '\0';
    size_t yaml_len = strlen(buf);

    moe_config cfg, from_file;
    moe_status st = moe_config_load_text(&cfg, buf, "<fuzz>");
    FUZZ_CHECK(st == MOE_OK || *moe_last_error(), "load_text failed without a message");
    moe_status st_file = moe_config_load_file(&from_file, fuzz_write_file("config", data, yaml_len));
    FUZZ_CHECK(st_file == st, "load_text gave %s, load_file %s (%s)", moe_status_name(st),
               moe_status_name(st_file), moe_last_error());
    FUZZ_CHECK(memcmp(&cfg, &from_file, sizeof cfg) == 0, "load_text and load_file disagree");

    for (char *p = buf + yaml_len + 1; st == MOE_OK && p < buf + size; p += strlen(p) + 1) {
        moe_config before = cfg;
        st = moe_config_set(&cfg, p);
        FUZZ_CHECK(st == MOE_OK || *moe_last_error(), "--set failed without a message");
        FUZZ_CHECK(st == MOE_OK || memcmp(&before, &cfg, sizeof cfg) == 0,
                   "a failed --set changed the config");
    }
    if (st == MOE_OK) {
        check_round_trip(&cfg);
        st = moe_config_validate(&cfg);
        FUZZ_CHECK(st == MOE_OK || *moe_last_error(), "validate failed without a message");
    }
    free(buf);
    return 0;
}
