/* Fuzz target: a hub folder's config.json mapping (moe_hf_config_read / _parse) and the
 * export back to config.json (moe_hf_config_format).
 *
 * Input: config.json text, optionally followed by a NUL byte and generation_config.json
 * text; both are written into a scratch folder that moe_hf_config_read reads.
 * Checks: the folder and text readers agree on the status and the config; a refused input
 * gives a message; an accepted config is valid (moe_config_validate), its eos/bos ids are
 * counted within bounds, and when a family can express it, its exported config.json reads
 * back to the same model and router settings (fields whose 0 means "derived" compared
 * derived). */
#include <string.h>

#include "moe/hf/hf_config.h"
#include "tests/fuzz/common.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) { return 0; }

/* Fields where 0 means "derived from others" are written out derived: compare them so. */
static moe_config resolved(const moe_config *c) {
    moe_config r = *c;
    r.model.n_kv_heads = moe_config_kv_heads(c);
    r.model.dense_ffn_dim = moe_config_dense_ffn_dim(c);
    return r;
}

/* Export, import, compare. */
static void check_round_trip(const moe_config *cfg) {
    char *text = NULL;
    const char *family = NULL;
    if (moe_hf_config_format(cfg, NULL, &text, &family) != MOE_OK) {
        FUZZ_CHECK(*moe_last_error(), "export refused without a message");
        return;
    }
    moe_config back;
    moe_hf_info back_info;
    moe_status st = moe_hf_config_parse(text, "<exported>", &back, &back_info);
    FUZZ_CHECK(st == MOE_OK, "the exported %s config does not read back: %s\n%s", family, moe_last_error(), text);
    FUZZ_CHECK(!strcmp(back_info.model_type, family), "exported as %s, read as %s", family, back_info.model_type);
    moe_config a = resolved(cfg), b = resolved(&back);
    FUZZ_CHECK(memcmp(&a.model, &b.model, sizeof a.model) == 0, "the exported model section differs:\n%s", text);
    FUZZ_CHECK(memcmp(&a.router, &b.router, sizeof a.router) == 0, "the exported router section differs:\n%s", text);
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *dir = fuzz_scratch_dir("hf_config");
    const uint8_t *nul = memchr(data, 0, size);
    size_t clen = nul ? (size_t)(nul - data) : size;
    fuzz_put_file(dir, "config.json", data, clen);
    fuzz_put_file(dir, "generation_config.json", nul ? nul + 1 : NULL, nul ? size - clen - 1 : 0);

    moe_config cfg, from_text;
    moe_hf_info info, text_info;
    moe_status st = moe_hf_config_read(dir, &cfg, &info);
    FUZZ_CHECK(st == MOE_OK || *moe_last_error(), "config_read failed without a message");
    char *text = malloc(clen + 1);
    FUZZ_CHECK(text, "out of memory");
    memcpy(text, data, clen);
    text[clen] = '\0';
    moe_status st_text = moe_hf_config_parse(text, "<fuzz>", &from_text, &text_info);
    free(text);
    /* a NUL inside the text ends it for both readers (the file is read as a C string) */
    FUZZ_CHECK(st_text == st, "config_read gave %s, config_parse %s (%s)", moe_status_name(st),
               moe_status_name(st_text), moe_last_error());
    if (st != MOE_OK) return 0;
    FUZZ_CHECK(memcmp(&cfg, &from_text, sizeof cfg) == 0, "config_read and config_parse disagree");
    FUZZ_CHECK(moe_config_validate(&cfg) == MOE_OK, "an accepted config does not validate: %s", moe_last_error());
    FUZZ_CHECK(info.n_eos >= 0 && info.n_eos <= MOE_HF_MAX_EOS, "%d eos ids", info.n_eos);
    check_round_trip(&cfg);
    return 0;
}
