/* The command-line parser (see args.h). */
#include "moe/cli/args.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/yaml_config.h"

static const moe_flag_spec *find_spec(const moe_flag_spec *specs, const char *name, size_t len) {
    for (const moe_flag_spec *s = specs; s->name; s++)
        if (strlen(s->name) == len && !strncmp(s->name, name, len)) return s;
    return NULL;
}

/* "unknown flag --x", with the nearest known flag when one is close (a third of its length, at least 2). */
static moe_status unknown_flag(const char *command, const moe_flag_spec *specs, const char *flag) {
    const moe_flag_spec *best = NULL;
    size_t best_d = (size_t)-1, len = strlen(flag);
    size_t limit = len / 3 > 2 ? len / 3 : 2;
    for (const moe_flag_spec *s = specs; s->name; s++) {
        size_t d = moe_edit_distance(flag, s->name);
        if (d < best_d && d <= limit) best_d = d, best = s;
    }
    if (best) return moe_error(MOE_ERR_CONFIG, "%s: unknown flag %s (did you mean %s?)", command, flag, best->name);
    return moe_error(MOE_ERR_CONFIG, "%s: unknown flag %s (moe %s --help lists the flags)", command, flag, command);
}

/* "[1, 1000000]" or "(0, 1)" for messages and help. */
static void range_text(const moe_flag_spec *s, char *buf, size_t n) {
    snprintf(buf, n, "%c%.16g, %.16g%c", s->min_excluded ? '(' : '[', s->min, s->max, s->max_excluded ? ')' : ']');
}

static moe_status parse_number(const char *command, const moe_flag_spec *s, const char *v) {
    char range[96];
    range_text(s, range, sizeof range);
    const bool integer = s->kind != MOE_FLAG_DOUBLE;
    const char *what = integer ? "an integer" : "a number";
    char *end = NULL;
    errno = 0;
    double x;
    if (integer) {
        long long i = strtoll(v, &end, 10);
        x = (double)i;
    } else {
        x = strtod(v, &end);
    }
    if (!*v || isspace((unsigned char)*v) || *end || end == v || errno == ERANGE || isnan(x) || isinf(x))
        return moe_error(MOE_ERR_CONFIG, "%s: %s '%s' is not %s (expected %s in %s)", command, s->name, v, what, what, range);
    if (x < s->min || x > s->max || (s->min_excluded && x == s->min) || (s->max_excluded && x == s->max))
        return moe_error(MOE_ERR_CONFIG, "%s: %s %s is out of range (expected %s in %s)", command, s->name, v, what, range);
    if (s->kind == MOE_FLAG_INT) *(int *)s->dest = (int)x;
    else if (s->kind == MOE_FLAG_I64) *(int64_t *)s->dest = (int64_t)strtoll(v, NULL, 10);
    else *(double *)s->dest = x;
    return MOE_OK;
}

static bool is_choice(const char *choices, const char *v) {
    size_t n = strlen(v);
    for (const char *p = choices; p;) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && !strncmp(p, v, n)) return true;
        p = bar ? bar + 1 : NULL;
    }
    return false;
}

/* Stores `v` (the value given to flag `s`) in its destination. `room` is argv's length:
 * no list can grow beyond it. */
static moe_status store(const char *command, const moe_flag_spec *s, const char *v, int room) {
    switch (s->kind) {
    case MOE_FLAG_INT:
    case MOE_FLAG_I64:
    case MOE_FLAG_DOUBLE: return parse_number(command, s, v);
    case MOE_FLAG_STRING:
        if (s->choices && !is_choice(s->choices, v))
            return moe_error(MOE_ERR_CONFIG, "%s: %s '%s' is not one of %s", command, s->name, v, s->choices);
        *(const char **)s->dest = v;
        return MOE_OK;
    case MOE_FLAG_MULTI: {
        moe_arg_list *l = s->dest;
        if (!l->items && !(l->items = malloc(sizeof *l->items * (size_t)room)))
            return moe_error(MOE_ERR_OOM, "%s: out of memory parsing %s", command, s->name);
        l->items[l->n++] = v;
        return MOE_OK;
    }
    case MOE_FLAG_BOOL: break;
    }
    MOE_ASSERT(0, "flag %s: a BOOL takes no value", s->name);
    return MOE_ERR_INVALID;
}

/* One flag word at argv[*i] (and its value, which may be the next word). */
static moe_status parse_flag(const char *command, const moe_flag_spec *specs, int argc, char **argv, int *i) {
    const char *word = argv[*i], *eq = strchr(word, '=');
    size_t len = eq ? (size_t)(eq - word) : strlen(word);
    const moe_flag_spec *s = find_spec(specs, word, len);
    if (!s) {
        char name[128];
        snprintf(name, sizeof name, "%.*s", (int)(len < 127 ? len : 127), word);
        return unknown_flag(command, specs, name);
    }
    if (s->kind == MOE_FLAG_BOOL) {
        if (eq) return moe_error(MOE_ERR_CONFIG, "%s: %s takes no value (got '%s')", command, s->name, eq + 1);
        *(bool *)s->dest = true;
        return MOE_OK;
    }
    const char *v = eq ? eq + 1 : NULL;
    if (!v) {
        if (*i + 1 >= argc) return moe_error(MOE_ERR_CONFIG, "%s: %s needs a value (%s)", command, s->name, s->metavar ? s->metavar : "VALUE");
        v = argv[++*i];
    }
    return store(command, s, v, argc);
}

moe_status moe_args_parse(const char *command, const moe_flag_spec *specs, int argc, char **argv, moe_args *out) {
    *out = (moe_args){0};
    out->positional = malloc(sizeof *out->positional * (size_t)(argc > 0 ? argc : 1));
    if (!out->positional) return moe_error(MOE_ERR_OOM, "%s: out of memory parsing the command line", command);
    bool flags_done = false;
    for (int i = 0; i < argc; i++) {
        const char *w = argv[i];
        if (!flags_done && (!strcmp(w, "--help") || !strcmp(w, "-h"))) {
            out->help = true;
            return MOE_OK;
        }
        if (!flags_done && !strcmp(w, "--")) {
            flags_done = true;
            continue;
        }
        if (flags_done || w[0] != '-' || w[1] == '\0') {
            out->positional[out->n_positional++] = w;
            continue;
        }
        moe_status st = parse_flag(command, specs, argc, argv, &i);
        if (st != MOE_OK) {
            moe_args_free(out);
            return st;
        }
    }
    return MOE_OK;
}

void moe_args_free(moe_args *a) {
    free(a->positional);
    *a = (moe_args){0};
}

void moe_arg_list_free(moe_arg_list *l) {
    free(l->items);
    *l = (moe_arg_list){0};
}

/* The accepted values and the default, e.g. "integer in [1, 1e6], default 200". */
static void describe(const moe_flag_spec *s, char *buf, size_t n) {
    char range[96];
    range_text(s, range, sizeof range);
    if (s->default_text && s->kind != MOE_FLAG_BOOL && s->kind != MOE_FLAG_MULTI) {
        snprintf(buf, n, "%s%s%sdefault %s", s->kind == MOE_FLAG_STRING ? "" : s->kind == MOE_FLAG_DOUBLE ? "number in " : "integer in ",
                 s->kind == MOE_FLAG_STRING ? (s->choices ? s->choices : "") : range,
                 s->kind == MOE_FLAG_STRING && !s->choices ? "" : ", ", s->default_text);
        return;
    }
    switch (s->kind) {
    case MOE_FLAG_BOOL: snprintf(buf, n, "%s", ""); break;
    case MOE_FLAG_INT: snprintf(buf, n, "integer in %s, default %d", range, *(const int *)s->dest); break;
    case MOE_FLAG_I64: snprintf(buf, n, "integer in %s, default %lld", range, (long long)*(const int64_t *)s->dest); break;
    case MOE_FLAG_DOUBLE: snprintf(buf, n, "number in %s, default %g", range, *(const double *)s->dest); break;
    case MOE_FLAG_STRING: {
        const char *d = *(const char *const *)s->dest;
        if (s->choices) snprintf(buf, n, "%s%s%s", s->choices, d ? ", default " : "", d ? d : "");
        else snprintf(buf, n, "%s%s", d ? "default " : "", d ? d : "");
        break;
    }
    case MOE_FLAG_MULTI: snprintf(buf, n, "%s", "repeatable"); break;
    }
}

void moe_args_print_help(FILE *f, const char *usage, const moe_flag_spec *specs) {
    fprintf(f, "usage: %s\n\nflags:\n", usage);
    for (const moe_flag_spec *s = specs; s->name; s++) {
        char left[64], info[160];
        snprintf(left, sizeof left, "%s%s%s", s->name, s->metavar ? " " : "", s->metavar ? s->metavar : "");
        describe(s, info, sizeof info);
        fprintf(f, "  %-22s %s%s%s%s\n", left, s->help, info[0] ? " (" : "", info, info[0] ? ")" : "");
    }
    fprintf(f, "  %-22s %s\n", "--help", "print this help");
}
