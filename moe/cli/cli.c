/* Helpers every command uses (see cli.h). */
#include "moe/cli/cli.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int moe_cli_fail(moe_status s) {
    fprintf(stderr, "moe: error (%s): %s\n", moe_status_name(s), moe_last_error());
    return s == MOE_ERR_INTERRUPTED ? 130 : s == MOE_ERR_CONFIG ? 2 : 1;
}

int moe_cli_parse(const char *cmd, const char *usage_line, const moe_flag_spec *specs, int argc, char **argv, int lo,
                  int hi, const char *what, moe_args *a) {
    moe_status s = moe_args_parse(cmd, specs, argc, argv, a);
    if (s == MOE_OK && a->help) {
        moe_args_print_help(stdout, usage_line, specs);
        moe_args_free(a);
        return 0;
    }
    if (s == MOE_OK && a->n_positional > hi)
        s = moe_error(MOE_ERR_CONFIG, "%s: unexpected argument '%s' (moe %s --help lists the flags)", cmd,
                      a->positional[hi], cmd);
    else if (s == MOE_OK && a->n_positional < lo)
        s = moe_error(MOE_ERR_CONFIG, "%s: %s required (usage: %s)", cmd, what, usage_line);
    if (s == MOE_OK) return -1;
    if (a->positional) moe_args_free(a);
    return moe_cli_fail(s);
}

moe_status moe_cli_read_text(const char *path, char **text, size_t *len) {
    bool std_in = !strcmp(path, "-");
    FILE *f = std_in ? stdin : fopen(path, "rb");
    if (!f) return moe_error(MOE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    char *buf = NULL;
    size_t n = 0, cap = 0;
    moe_status s = MOE_OK;
    for (;;) {
        if (n + 1 >= cap) {
            size_t want = cap ? 2 * cap : 1 << 16;
            char *grown = realloc(buf, want);
            if (!grown) {
                s = moe_error(MOE_ERR_OOM, "out of memory reading %s (%zu bytes so far)", path, n);
                break;
            }
            buf = grown, cap = want;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0) break;
    }
    if (s == MOE_OK && ferror(f)) s = moe_error(MOE_ERR_IO, "error reading %s: %s", path, strerror(errno));
    if (!std_in) fclose(f);
    if (s != MOE_OK) {
        free(buf);
        return s;
    }
    buf[n] = '\0';
    *text = buf;
    *len = n;
    return MOE_OK;
}

static moe_status push_id(moe_token_buf *ids, int32_t v) {
    if (ids->len == ids->cap) {
        size_t cap = ids->cap ? 2 * ids->cap : 64;
        int32_t *d = realloc(ids->data, cap * sizeof *d);
        if (!d) return moe_error(MOE_ERR_OOM, "out of memory for %zu token ids", cap);
        ids->data = d;
        ids->cap = cap;
    }
    ids->data[ids->len++] = v;
    return MOE_OK;
}

moe_status moe_cli_parse_ids(const char *flag, const char *list, int vocab, moe_cli_ids_empty empty,
                             moe_token_buf *ids) {
    const char *p = list;
    size_t first = ids->len;
    for (;;) {
        while (*p == ',' || *p == ' ') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long long v = strtoll(p, &end, 10);
        int n = (int)strcspn(p, ", ");
        if (end == p || (*end && *end != ',' && *end != ' ') || errno == ERANGE || v < 0 || v > INT32_MAX)
            return moe_error(MOE_ERR_CONFIG, "%s: '%.*s' is not a token id (expected ids like 5,17,42)", flag, n, p);
        if (vocab > 0 && v >= vocab)
            return moe_error(MOE_ERR_CONFIG, "%s: id %lld is outside the vocabulary of %d tokens", flag, v, vocab);
        MOE_TRY(push_id(ids, (int32_t)v));
        p = end;
    }
    if (ids->len == first && empty == MOE_IDS_EMPTY_REFUSED)
        return moe_error(MOE_ERR_CONFIG, "%s: no token ids given (expected ids like 5,17,42)", flag);
    return MOE_OK;
}

moe_status moe_cli_read_texts(const char *const *paths, int n, char **text, size_t *len) {
    char *all = NULL;
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        char *one = NULL;
        size_t one_len = 0;
        moe_status s = moe_cli_read_text(paths[i], &one, &one_len);
        char *grown = s == MOE_OK ? realloc(all, total + one_len + 1) : NULL;
        if (s == MOE_OK && !grown) s = moe_error(MOE_ERR_OOM, "out of memory reading %s", paths[i]);
        if (s != MOE_OK) {
            free(one);
            free(all);
            return s;
        }
        all = grown;
        memcpy(all + total, one, one_len);
        total += one_len;
        all[total] = '\0';
        free(one);
    }
    *text = all;
    *len = total;
    return MOE_OK;
}

moe_status moe_cli_apply_sets(moe_config *cfg, const moe_arg_list *sets) {
    for (int i = 0; i < sets->n; i++) MOE_TRY(moe_config_set(cfg, sets->items[i]));
    return MOE_OK;
}
