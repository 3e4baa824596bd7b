/* Schema-driven YAML config: defaults, loading (libyaml document API), --set overrides,
 * the effective-config dump and help text, all from one key table (see yaml_config.h). */
#include "core/yaml_config.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#define PATH_MAX_LEN 256
#define MAX_DEPTH 8

/* Where values come from while loading: a file/text with positions, or one label
 * (an override "--set a.b=c" or a schema default) without positions. */
typedef struct load_ctx {
    const moe_yaml_schema *schema;
    void *obj;            /* working copy, committed on success */
    const char *origin;   /* file path or "<checkpoint>" */
    const char *label;    /* replaces origin:line:col when set */
    size_t *seen_line;    /* per key: 1-based line of its first occurrence, 0 = unseen */
} load_ctx;

/* ---------- messages ---------- */

static moe_status fail(const load_ctx *c, yaml_mark_t mark, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static moe_status fail(const load_ctx *c, yaml_mark_t mark, const char *fmt, ...) {
    char where[PATH_MAX_LEN + 64], msg[1024];
    if (c->label) {
        snprintf(where, sizeof where, "%s", c->label);
    } else {
        snprintf(where, sizeof where, "%s:%zu:%zu", c->origin, (size_t)mark.line + 1,
                 (size_t)mark.column + 1);
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return moe_error(MOE_ERR_CONFIG, "%s: %s", where, msg);
}

static void join_values(const char *const *values, const char *sep, char *buf, size_t n) {
    size_t used = 0;
    buf[0] = '\0';
    for (size_t i = 0; values[i] && used < n; i++) {
        used += (size_t)snprintf(buf + used, n - used, "%s%s", i ? sep : "", values[i]);
    }
}

/* "an integer", "one of: a, b", ... for "expected ..." messages. */
static void describe_expected(const moe_yaml_key *k, bool element, char *buf, size_t n) {
    char names[512] = "";
    if (k->values) join_values(k->values, ", ", names, sizeof names);
    moe_yaml_type t = k->type;
    if (element) t = (t == MOE_YAML_INT_LIST) ? MOE_YAML_INT : MOE_YAML_ENUM;
    switch (t) {
    case MOE_YAML_INT: snprintf(buf, n, "an integer"); break;
    case MOE_YAML_FLOAT: snprintf(buf, n, "a finite number"); break;
    case MOE_YAML_BOOL: snprintf(buf, n, "true or false"); break;
    case MOE_YAML_STRING: snprintf(buf, n, "a string"); break;
    case MOE_YAML_ENUM: snprintf(buf, n, "one of: %s", names); break;
    case MOE_YAML_INT_LIST: snprintf(buf, n, "a list of integers such as [256, 128]"); break;
    case MOE_YAML_ENUM_LIST: snprintf(buf, n, "a list of values from: %s", names); break;
    case MOE_YAML_ENUM_OR_LIST:
        snprintf(buf, n, "one of: %s, or a list of them", names);
        break;
    }
}

static void describe_node(const yaml_node_t *node, char *buf, size_t n) {
    switch (node->type) {
    case YAML_SCALAR_NODE: {
        bool quoted = node->data.scalar.style == YAML_SINGLE_QUOTED_SCALAR_STYLE ||
                      node->data.scalar.style == YAML_DOUBLE_QUOTED_SCALAR_STYLE;
        if (node->data.scalar.length == 0 && !quoted) {
            snprintf(buf, n, "nothing");
        } else {
            snprintf(buf, n, "%s'%.60s%s'", quoted ? "the quoted string " : "",
                     (const char *)node->data.scalar.value,
                     node->data.scalar.length > 60 ? "..." : "");
        }
        break;
    }
    case YAML_SEQUENCE_NODE: snprintf(buf, n, "a list"); break;
    case YAML_MAPPING_NODE: snprintf(buf, n, "a mapping"); break;
    default: snprintf(buf, n, "an empty value"); break;
    }
}

static moe_status fail_type(const load_ctx *c, const moe_yaml_key *k, const char *label,
                            const yaml_node_t *node, bool element) {
    char expected[640], got[128];
    describe_expected(k, element, expected, sizeof expected);
    describe_node(node, got, sizeof got);
    return fail(c, node->start_mark, "%s: expected %s, got %s", label, expected, got);
}

/* ---------- scalar conversion ---------- */

static bool is_plain_scalar(const yaml_node_t *node) {
    return node->type == YAML_SCALAR_NODE && node->data.scalar.style != YAML_SINGLE_QUOTED_SCALAR_STYLE &&
           node->data.scalar.style != YAML_DOUBLE_QUOTED_SCALAR_STYLE;
}

static const char *scalar_text(const yaml_node_t *node) {
    return (const char *)node->data.scalar.value;
}

static moe_status parse_int(const load_ctx *c, const moe_yaml_key *k, const char *label,
                            const yaml_node_t *node, bool element, int *out) {
    if (!is_plain_scalar(node) || node->data.scalar.length == 0)
        return fail_type(c, k, label, node, element);
    const char *s = scalar_text(node);
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (*end != '\0') return fail_type(c, k, label, node, element);
    if (errno == ERANGE || (double)v < k->min || (double)v > k->max) {
        return fail(c, node->start_mark, "%s: %s is out of range [%.0f, %.0f]", label, s,
                    k->min, k->max);
    }
    *out = (int)v;
    return MOE_OK;
}

static moe_status parse_float(const load_ctx *c, const moe_yaml_key *k, const char *label,
                              const yaml_node_t *node, double *out) {
    if (!is_plain_scalar(node) || node->data.scalar.length == 0)
        return fail_type(c, k, label, node, false);
    const char *s = scalar_text(node);
    char *end;
    double v = strtod(s, &end);
    if (*end != '\0' || !isfinite(v)) return fail_type(c, k, label, node, false);
    if (v < k->min || v > k->max) {
        return fail(c, node->start_mark, "%s: %s is out of range [%g, %g]", label, s, k->min,
                    k->max);
    }
    *out = v;
    return MOE_OK;
}

static moe_status parse_bool(const load_ctx *c, const moe_yaml_key *k, const char *label,
                             const yaml_node_t *node, bool *out) {
    static const char *const yes[] = {"true", "True", "TRUE", NULL};
    static const char *const no[] = {"false", "False", "FALSE", NULL};
    if (is_plain_scalar(node)) {
        for (int i = 0; yes[i]; i++) {
            if (strcmp(scalar_text(node), yes[i]) == 0) {
                *out = true;
                return MOE_OK;
            }
            if (strcmp(scalar_text(node), no[i]) == 0) {
                *out = false;
                return MOE_OK;
            }
        }
    }
    return fail_type(c, k, label, node, false);
}

static moe_status parse_enum(const load_ctx *c, const moe_yaml_key *k, const char *label,
                             const yaml_node_t *node, bool element, int *out) {
    if (node->type != YAML_SCALAR_NODE) return fail_type(c, k, label, node, element);
    for (int i = 0; k->values[i]; i++) {
        if (strcmp(scalar_text(node), k->values[i]) == 0) {
            *out = i;
            return MOE_OK;
        }
    }
    char names[512];
    join_values(k->values, ", ", names, sizeof names);
    return fail(c, node->start_mark, "%s: '%.60s' is not allowed; expected one of: %s", label,
                scalar_text(node), names);
}

/* Decodes the UTF-8 sequence at s[0..n): its length (1-4) and code point in *cp, or 0
 * when it is not valid UTF-8 (bad or missing continuation byte, overlong form, surrogate,
 * beyond U+10FFFF). */
static size_t utf8_decode(const unsigned char *s, size_t n, uint32_t *cp) {
    static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
    size_t len = s[0] < 0x80 ? 1 : (s[0] & 0xe0) == 0xc0 ? 2 : (s[0] & 0xf0) == 0xe0 ? 3
               : (s[0] & 0xf8) == 0xf0 ? 4 : 0;
    if (len == 0 || len > n) return 0;
    uint32_t v = len == 1 ? s[0] : s[0] & (0x7fu >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        v = v << 6 | (s[i] & 0x3fu);
    }
    if (v < min_cp[len] || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff)) return 0;
    *cp = v;
    return len;
}

static bool utf8_valid(const char *s, size_t n) {
    uint32_t cp;
    for (size_t i = 0, len; i < n; i += len)
        if (!(len = utf8_decode((const unsigned char *)s + i, n - i, &cp))) return false;
    return true;
}

static moe_status parse_string(const load_ctx *c, const moe_yaml_key *k, const char *label,
                               const yaml_node_t *node, char *out) {
    if (node->type != YAML_SCALAR_NODE) return fail_type(c, k, label, node, false);
    size_t len = node->data.scalar.length;
    if (strlen(scalar_text(node)) != len)
        return fail(c, node->start_mark, "%s: the string contains a NUL character", label);
    if (!utf8_valid(scalar_text(node), len))
        return fail(c, node->start_mark, "%s: the string is not valid UTF-8", label);
    if (len >= MOE_YAML_STRING_MAX) {
        return fail(c, node->start_mark, "%s: the string is %zu characters long; at most %d allowed",
                    label, len, MOE_YAML_STRING_MAX - 1);
    }
    memset(out, 0, MOE_YAML_STRING_MAX);
    memcpy(out, scalar_text(node), len);
    return MOE_OK;
}

static moe_status parse_list(const load_ctx *c, const moe_yaml_key *k, yaml_document_t *doc,
                             const yaml_node_t *node, moe_yaml_list *out) {
    moe_yaml_list list;
    memset(&list, 0, sizeof list);
    if (node->type == YAML_SCALAR_NODE && k->type == MOE_YAML_ENUM_OR_LIST) {
        MOE_TRY(parse_enum(c, k, k->path, node, false, &list.values[0]));
        list.count = 1;
    } else if (node->type == YAML_SEQUENCE_NODE) {
        yaml_node_item_t *items = node->data.sequence.items.start;
        ptrdiff_t n = node->data.sequence.items.top - items;
        if (n > MOE_YAML_LIST_MAX) {
            return fail(c, node->start_mark, "%s: the list has %td entries; at most %d allowed",
                        k->path, n, MOE_YAML_LIST_MAX);
        }
        for (ptrdiff_t i = 0; i < n; i++) {
            const yaml_node_t *item = yaml_document_get_node(doc, items[i]);
            char label[PATH_MAX_LEN + 16];
            snprintf(label, sizeof label, "%s[%td]", k->path, i);
            if (k->type == MOE_YAML_INT_LIST) {
                MOE_TRY(parse_int(c, k, label, item, true, &list.values[i]));
            } else {
                MOE_TRY(parse_enum(c, k, label, item, true, &list.values[i]));
            }
        }
        list.count = (int)n;
    } else {
        return fail_type(c, k, k->path, node, false);
    }
    *out = list;
    return MOE_OK;
}

/* Converts `node` and stores it in the key's field of the working copy. */
static moe_status set_field(const load_ctx *c, const moe_yaml_key *k, yaml_document_t *doc,
                            const yaml_node_t *node) {
    char *field = (char *)c->obj + k->offset;
    switch (k->type) {
    case MOE_YAML_INT: return parse_int(c, k, k->path, node, false, (int *)field);
    case MOE_YAML_FLOAT: return parse_float(c, k, k->path, node, (double *)field);
    case MOE_YAML_BOOL: return parse_bool(c, k, k->path, node, (bool *)field);
    case MOE_YAML_STRING: return parse_string(c, k, k->path, node, field);
    case MOE_YAML_ENUM: return parse_enum(c, k, k->path, node, false, (int *)field);
    case MOE_YAML_INT_LIST:
    case MOE_YAML_ENUM_LIST:
    case MOE_YAML_ENUM_OR_LIST: return parse_list(c, k, doc, node, (moe_yaml_list *)field);
    }
    MOE_ASSERT(0, "key %s has an invalid type %d", k->path, (int)k->type);
    return MOE_ERR_INVALID;
}

/* ---------- key lookup and suggestions ---------- */

const moe_yaml_key *moe_yaml_find_key(const moe_yaml_schema *schema, const char *path) {
    for (size_t i = 0; i < schema->n_keys; i++) {
        if (strcmp(schema->keys[i].path, path) == 0) return &schema->keys[i];
    }
    return NULL;
}

/* True when `path` names a section (a proper prefix of some key, ending at a dot). */
static bool is_section(const moe_yaml_schema *schema, const char *path) {
    size_t n = strlen(path);
    for (size_t i = 0; i < schema->n_keys; i++) {
        if (strncmp(schema->keys[i].path, path, n) == 0 && schema->keys[i].path[n] == '.')
            return true;
    }
    return false;
}

/* Optimal-string-alignment distance (an adjacent transposition costs 1), three rows. */
size_t moe_edit_distance(const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b);
    if (na >= PATH_MAX_LEN || nb >= PATH_MAX_LEN) return SIZE_MAX;
    size_t rows[3][PATH_MAX_LEN + 1];
    size_t *two_up = rows[0], *up = rows[1], *row = rows[2];
    for (size_t j = 0; j <= nb; j++) up[j] = j;
    for (size_t i = 1; i <= na; i++) {
        row[0] = i;
        for (size_t j = 1; j <= nb; j++) {
            size_t best = up[j - 1] + (a[i - 1] != b[j - 1]);
            if (up[j] + 1 < best) best = up[j] + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
                two_up[j - 2] + 1 < best)
                best = two_up[j - 2] + 1;
            row[j] = best;
        }
        size_t *oldest = two_up;
        two_up = up;
        up = row;
        row = oldest;
    }
    return up[nb];
}

static size_t count_dots(const char *s) {
    size_t n = 0;
    for (; *s; s++) n += *s == '.';
    return n;
}

/* The closest key or section name to an unknown `path`: a near spelling at the same
 * depth, else the same leaf name in another section. Returns false if none is close. */
static bool suggest(const moe_yaml_schema *schema, const char *path, char *buf, size_t n) {
    const char *leaf = strrchr(path, '.');
    size_t leaf_len = strlen(leaf ? leaf + 1 : path);
    size_t depth = count_dots(path), best = SIZE_MAX, limit = leaf_len / 3 > 2 ? leaf_len / 3 : 2;
    for (size_t i = 0; i < schema->n_keys; i++) {
        /* The candidate: this key's path cut to the same number of components. */
        char cand[PATH_MAX_LEN];
        snprintf(cand, sizeof cand, "%s", schema->keys[i].path);
        char *p = cand;
        for (size_t dots = 0; *p && !(*p == '.' && dots == depth); p++) dots += *p == '.';
        if (count_dots(schema->keys[i].path) < depth) continue;
        *p = '\0';
        size_t dist = moe_edit_distance(path, cand);
        if (dist < best && dist <= limit) {
            best = dist;
            snprintf(buf, n, "%s", cand);
        }
    }
    if (best != SIZE_MAX) return true;
    if (!leaf) return false;
    for (size_t i = 0; i < schema->n_keys; i++) {
        const char *kleaf = strrchr(schema->keys[i].path, '.');
        if (kleaf && strcmp(kleaf, leaf) == 0) {
            snprintf(buf, n, "%s", schema->keys[i].path);
            return true;
        }
    }
    return false;
}

static moe_status fail_unknown(const load_ctx *c, yaml_mark_t mark, const char *path) {
    char hint[PATH_MAX_LEN];
    if (suggest(c->schema, path, hint, sizeof hint))
        return fail(c, mark, "unknown key '%s' (did you mean '%s'?)", path, hint);
    return fail(c, mark, "unknown key '%s'; --help lists the valid keys", path);
}

/* ---------- document walk ---------- */

static moe_status walk_mapping(const load_ctx *c, yaml_document_t *doc, const yaml_node_t *map,
                               const char *prefix) {
    for (yaml_node_pair_t *pair = map->data.mapping.pairs.start; pair < map->data.mapping.pairs.top;
         pair++) {
        const yaml_node_t *kn = yaml_document_get_node(doc, pair->key);
        const yaml_node_t *vn = yaml_document_get_node(doc, pair->value);
        if (kn->type != YAML_SCALAR_NODE) {
            return fail(c, kn->start_mark, "expected a key name%s%s, got a %s", *prefix ? " in " : "",
                        prefix, kn->type == YAML_SEQUENCE_NODE ? "list" : "mapping");
        }
        char path[PATH_MAX_LEN];
        int len = snprintf(path, sizeof path, "%s%s%s", prefix, *prefix ? "." : "", scalar_text(kn));
        const moe_yaml_key *k = len < PATH_MAX_LEN ? moe_yaml_find_key(c->schema, path) : NULL;
        if (k) {
            size_t idx = (size_t)(k - c->schema->keys);
            if (c->seen_line[idx]) {
                return fail(c, kn->start_mark, "duplicate key '%s' (first given at line %zu)", path,
                            c->seen_line[idx]);
            }
            c->seen_line[idx] = (size_t)kn->start_mark.line + 1;
            MOE_TRY(set_field(c, k, doc, vn));
        } else if (len < PATH_MAX_LEN && is_section(c->schema, path)) {
            if (vn->type != YAML_MAPPING_NODE) {
                return fail(c, vn->start_mark, "'%s' is a section: expected a mapping of its keys, got a %s",
                            path, vn->type == YAML_SEQUENCE_NODE ? "list" : "scalar");
            }
            MOE_TRY(walk_mapping(c, doc, vn, path));
        } else {
            return fail_unknown(c, kn->start_mark, path);
        }
    }
    return MOE_OK;
}

static moe_status syntax_error(const yaml_parser_t *parser, const char *origin) {
    if (parser->error == YAML_MEMORY_ERROR)
        return moe_error(MOE_ERR_OOM, "%s: out of memory while parsing YAML", origin);
    if (parser->error == YAML_READER_ERROR) {
        return moe_error(MOE_ERR_CONFIG, "%s: byte %zu: %s; the config must be UTF-8 text", origin,
                         parser->problem_offset, parser->problem ? parser->problem : "read error");
    }
    char context[256] = "";
    if (parser->context) {
        snprintf(context, sizeof context, " (%s at line %zu)", parser->context,
                 (size_t)parser->context_mark.line + 1);
    }
    return moe_error(MOE_ERR_CONFIG, "%s:%zu:%zu: YAML syntax error: %s%s", origin,
                     (size_t)parser->problem_mark.line + 1, (size_t)parser->problem_mark.column + 1,
                     parser->problem ? parser->problem : "unknown problem", context);
}

/* Parses the whole text, walks its one document into a copy of obj, commits on success. */
static moe_status load_buffer(const moe_yaml_schema *schema, void *obj, const char *text,
                              size_t len, const char *origin) {
    yaml_parser_t parser;
    yaml_document_t doc;
    if (!yaml_parser_initialize(&parser))
        return moe_error(MOE_ERR_OOM, "%s: yaml_parser_initialize failed", origin);
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    if (!yaml_parser_load(&parser, &doc)) {
        moe_status st = syntax_error(&parser, origin);
        yaml_parser_delete(&parser);
        return st;
    }
    void *work = malloc(schema->struct_size);
    size_t *seen = calloc(schema->n_keys, sizeof *seen);
    moe_status st = MOE_OK;
    if (!work || !seen) {
        st = moe_error(MOE_ERR_OOM, "%s: out of memory loading the config", origin);
        goto done;
    }
    memcpy(work, obj, schema->struct_size);
    load_ctx c = {.schema = schema, .obj = work, .origin = origin, .seen_line = seen};
    const yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (root && root->type != YAML_MAPPING_NODE) {
        st = fail(&c, root->start_mark, "expected a mapping of sections (such as 'model:') at the top level");
    } else if (root) {
        st = walk_mapping(&c, &doc, root, "");
    }
    if (st == MOE_OK) {
        yaml_document_t extra;
        if (!yaml_parser_load(&parser, &extra)) {
            st = syntax_error(&parser, origin);
        } else {
            const yaml_node_t *extra_root = yaml_document_get_root_node(&extra);
            if (extra_root) {
                st = fail(&c, extra_root->start_mark,
                          "a second YAML document; put every section in one document");
            }
            yaml_document_delete(&extra);
        }
    }
    if (st == MOE_OK) memcpy(obj, work, schema->struct_size);
done:
    free(seen);
    free(work);
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    return st;
}

moe_status moe_yaml_load_text(const moe_yaml_schema *schema, void *obj, const char *text,
                              const char *origin) {
    MOE_ASSERT(schema && obj && text && origin, "NULL argument");
    return load_buffer(schema, obj, text, strlen(text), origin);
}

moe_status moe_yaml_load_file(const moe_yaml_schema *schema, void *obj, const char *path) {
    MOE_ASSERT(schema && obj && path, "NULL argument");
    FILE *f = fopen(path, "rb");
    if (!f) {
        return moe_error(MOE_ERR_IO, "cannot open config file '%s': %s; check the path",
                         path, strerror(errno));
    }
    char *text = NULL;
    size_t len = 0, cap = 0;
    moe_status st = MOE_OK;
    for (;;) {
        if (len + 4096 > cap) {
            cap = cap ? 2 * cap : 16384;
            char *grown = realloc(text, cap);
            if (!grown) {
                st = moe_error(MOE_ERR_OOM, "out of memory reading config file '%s'", path);
                break;
            }
            text = grown;
        }
        size_t got = fread(text + len, 1, cap - len, f);
        len += got;
        if (got == 0) {
            if (ferror(f))
                st = moe_error(MOE_ERR_IO, "cannot read config file '%s': %s", path, strerror(errno));
            break;
        }
    }
    fclose(f);
    if (st == MOE_OK) st = load_buffer(schema, obj, text, len, path);
    free(text);
    return st;
}

/* Converts one value given as text (an override or a schema default) into k's field of
 * c->obj. Strings are taken verbatim; everything else is parsed as a YAML value. */
static moe_status apply_value_text(const load_ctx *c, const moe_yaml_key *k, const char *value) {
    yaml_node_t literal;
    memset(&literal, 0, sizeof literal);
    literal.type = YAML_SCALAR_NODE;
    literal.data.scalar.value = (yaml_char_t *)value;
    literal.data.scalar.length = strlen(value);
    literal.data.scalar.style = YAML_PLAIN_SCALAR_STYLE;
    if (k->type == MOE_YAML_STRING) return set_field(c, k, NULL, &literal);

    yaml_parser_t parser;
    yaml_document_t doc;
    if (!yaml_parser_initialize(&parser))
        return moe_error(MOE_ERR_OOM, "%s: yaml_parser_initialize failed", c->label);
    yaml_parser_set_input_string(&parser, (const unsigned char *)value, strlen(value));
    moe_status st;
    if (!yaml_parser_load(&parser, &doc)) {
        yaml_mark_t none = {0, 0, 0};
        st = fail(c, none, "%s: '%s' is not a valid YAML value (%s)", k->path, value,
                  parser.problem ? parser.problem : "syntax error");
    } else {
        const yaml_node_t *root = yaml_document_get_root_node(&doc);
        st = set_field(c, k, &doc, root ? root : &literal);
        yaml_document_delete(&doc);
    }
    yaml_parser_delete(&parser);
    return st;
}

moe_status moe_yaml_set(const moe_yaml_schema *schema, void *obj, const char *assignment) {
    MOE_ASSERT(schema && obj && assignment, "NULL argument");
    char label[PATH_MAX_LEN + 64];
    snprintf(label, sizeof label, "--set %.*s%s", PATH_MAX_LEN, assignment,
             strlen(assignment) > PATH_MAX_LEN ? "..." : "");
    load_ctx c = {.schema = schema, .obj = obj, .label = label};
    yaml_mark_t none = {0, 0, 0};
    const char *eq = strchr(assignment, '=');
    size_t key_len = eq ? (size_t)(eq - assignment) : 0;
    if (key_len == 0 || key_len >= PATH_MAX_LEN)
        return fail(&c, none, "expected section.key=value, such as model.d_model=256");
    char path[PATH_MAX_LEN];
    memcpy(path, assignment, key_len);
    path[key_len] = '\0';
    const moe_yaml_key *k = moe_yaml_find_key(schema, path);
    if (!k) {
        if (is_section(schema, path))
            return fail(&c, none, "'%s' is a section; give one of its keys, such as %s.<key>=value",
                        path, path);
        return fail_unknown(&c, none, path);
    }
    void *work = malloc(schema->struct_size);
    if (!work) return moe_error(MOE_ERR_OOM, "%s: out of memory", label);
    memcpy(work, obj, schema->struct_size);
    c.obj = work;
    moe_status st = apply_value_text(&c, k, eq + 1);
    if (st == MOE_OK) memcpy(obj, work, schema->struct_size);
    free(work);
    return st;
}

/* ---------- defaults and schema checks ---------- */

static size_t top_section_len(const char *path) {
    const char *dot = strchr(path, '.');
    return dot ? (size_t)(dot - path) : 0;
}

static bool same_top_section(const char *a, const char *b) {
    size_t n = top_section_len(a);
    return n == top_section_len(b) && strncmp(a, b, n) == 0;
}

/* Asserts the table is well formed: typed enums have names, paths are unique and
 * sections contiguous, fields fit in the struct. */
static void check_schema(const moe_yaml_schema *schema) {
    static const size_t field_size[] = {
        [MOE_YAML_INT] = sizeof(int), [MOE_YAML_FLOAT] = sizeof(double),
        [MOE_YAML_BOOL] = sizeof(bool), [MOE_YAML_STRING] = MOE_YAML_STRING_MAX,
        [MOE_YAML_ENUM] = sizeof(int), [MOE_YAML_INT_LIST] = sizeof(moe_yaml_list),
        [MOE_YAML_ENUM_LIST] = sizeof(moe_yaml_list), [MOE_YAML_ENUM_OR_LIST] = sizeof(moe_yaml_list),
    };
    for (size_t i = 0; i < schema->n_keys; i++) {
        const moe_yaml_key *k = &schema->keys[i];
        MOE_ASSERT(k->path && k->def && k->help, "key %zu lacks a path, default or help", i);
        MOE_ASSERT(k->type >= MOE_YAML_INT && k->type <= MOE_YAML_ENUM_OR_LIST, "%s: bad type", k->path);
        MOE_ASSERT(strlen(k->path) < PATH_MAX_LEN && count_dots(k->path) < MAX_DEPTH,
                   "%s: path too long", k->path);
        MOE_ASSERT(k->offset + field_size[k->type] <= schema->struct_size,
                   "%s: offset outside the struct", k->path);
        bool is_enum = k->type == MOE_YAML_ENUM || k->type == MOE_YAML_ENUM_LIST ||
                       k->type == MOE_YAML_ENUM_OR_LIST;
        MOE_ASSERT(!is_enum || (k->values && k->values[0]), "%s: enum without values", k->path);
        for (size_t j = 0; j < i; j++) {
            MOE_ASSERT(strcmp(k->path, schema->keys[j].path) != 0, "%s: duplicate key", k->path);
            MOE_ASSERT(j + 1 == i || !same_top_section(k->path, schema->keys[j].path) ||
                           same_top_section(k->path, schema->keys[i - 1].path),
                       "%s: the keys of a section must be contiguous", k->path);
        }
    }
}

void moe_yaml_defaults(const moe_yaml_schema *schema, void *obj) {
    MOE_ASSERT(schema && obj, "NULL argument");
    check_schema(schema);
    memset(obj, 0, schema->struct_size);
    for (size_t i = 0; i < schema->n_keys; i++) {
        const moe_yaml_key *k = &schema->keys[i];
        char label[PATH_MAX_LEN + 32];
        snprintf(label, sizeof label, "default of %s", k->path);
        load_ctx c = {.schema = schema, .obj = obj, .label = label};
        moe_status st = apply_value_text(&c, k, k->def);
        MOE_ASSERT(st == MOE_OK, "schema default does not parse: %s", moe_last_error());
    }
}

/* ---------- output ---------- */

const char *moe_yaml_enum_name(const moe_yaml_key *key, int value) {
    MOE_ASSERT(key && key->values, "not an enum key");
    for (int i = 0; key->values[i]; i++) {
        if (i == value) return key->values[i];
    }
    MOE_ASSERT(0, "%s: enum value %d out of range", key->path, value);
    return NULL;
}

/* Shortest text that reads back as exactly `v`, always recognisable as a float;
 * whole numbers below 1e17 keep all their digits ("10000.0", not "1e+04"). */
static void format_double(double v, char *buf, size_t n) {
    int int_digits = fabs(v) >= 1.0 ? (int)floor(log10(fabs(v))) + 1 : 1;
    for (int prec = int_digits < 17 ? int_digits : 17; prec <= 17; prec++) {
        snprintf(buf, n, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) break;
    }
    if (!strpbrk(buf, ".eEn")) strncat(buf, ".0", n - strlen(buf) - 1);
}

/* A double-quoted YAML string that reads back as exactly `s` when s is valid UTF-8 (the
 * reader stores only such strings; another byte is written as an escape). Escaped: the
 * quote, the backslash, what a YAML reader refuses (C0 and C1 controls, U+FFFE, U+FFFF)
 * and what it would fold or drop (U+0085, U+2028, U+2029 line breaks; U+FEFF). */
static void write_string(FILE *out, const char *s) {
    fputc('"', out);
    const unsigned char *p = (const unsigned char *)s;
    size_t n = strlen(s);
    for (size_t i = 0, len; i < n; i += len) {
        uint32_t cp;
        if (!(len = utf8_decode(p + i, n - i, &cp))) {
            fprintf(out, "\\x%02x", p[i]);
            len = 1;
        } else if (cp == '"' || cp == '\\') {
            fprintf(out, "\\%c", (char)cp);
        } else if (cp < 0x20 || (cp >= 0x7f && cp <= 0x9f)) {
            fprintf(out, "\\x%02x", (unsigned)cp);
        } else if (cp == 0x2028 || cp == 0x2029 || cp == 0xfeff || cp == 0xfffe || cp == 0xffff) {
            fprintf(out, "\\u%04x", (unsigned)cp);
        } else {
            fwrite(p + i, 1, len, out);
        }
    }
    fputc('"', out);
}

static void write_value(FILE *out, const moe_yaml_key *k, const void *field) {
    char num[64];
    switch (k->type) {
    case MOE_YAML_INT: fprintf(out, "%d", *(const int *)field); return;
    case MOE_YAML_FLOAT:
        format_double(*(const double *)field, num, sizeof num);
        fputs(num, out);
        return;
    case MOE_YAML_BOOL: fputs(*(const bool *)field ? "true" : "false", out); return;
    case MOE_YAML_STRING: write_string(out, (const char *)field); return;
    case MOE_YAML_ENUM: fputs(moe_yaml_enum_name(k, *(const int *)field), out); return;
    case MOE_YAML_INT_LIST:
    case MOE_YAML_ENUM_LIST:
    case MOE_YAML_ENUM_OR_LIST: {
        const moe_yaml_list *list = field;
        if (k->type == MOE_YAML_ENUM_OR_LIST && list->count == 1) {
            fputs(moe_yaml_enum_name(k, list->values[0]), out);
            return;
        }
        fputc('[', out);
        for (int i = 0; i < list->count; i++) {
            if (i) fputs(", ", out);
            if (k->type == MOE_YAML_INT_LIST) fprintf(out, "%d", list->values[i]);
            else fputs(moe_yaml_enum_name(k, list->values[i]), out);
        }
        fputc(']', out);
        return;
    }
    }
}

/* Splits a dotted path into components (in `buf`); returns the count. */
static int split_path(const char *path, char *buf, size_t n, char *parts[MAX_DEPTH]) {
    snprintf(buf, n, "%s", path);
    int count = 0;
    char *save = NULL;
    for (char *tok = strtok_r(buf, ".", &save); tok && count < MAX_DEPTH; tok = strtok_r(NULL, ".", &save))
        parts[count++] = tok;
    return count;
}

moe_status moe_yaml_write(const moe_yaml_schema *schema, const void *obj, FILE *out) {
    MOE_ASSERT(schema && obj && out, "NULL argument");
    char prev_buf[PATH_MAX_LEN], cur_buf[PATH_MAX_LEN];
    char *prev[MAX_DEPTH], *cur[MAX_DEPTH];
    int n_prev = 0;
    for (size_t i = 0; i < schema->n_keys; i++) {
        const moe_yaml_key *k = &schema->keys[i];
        int n = split_path(k->path, cur_buf, sizeof cur_buf, cur);
        int common = 0; /* leading sections shared with the previous key */
        while (common < n - 1 && common < n_prev - 1 && strcmp(cur[common], prev[common]) == 0)
            common++;
        for (int d = common; d < n - 1; d++) fprintf(out, "%*s%s:\n", 2 * d, "", cur[d]);
        fprintf(out, "%*s%s: ", 2 * (n - 1), "", cur[n - 1]);
        write_value(out, k, (const char *)obj + k->offset);
        fputc('\n', out);
        memcpy(prev_buf, cur_buf, sizeof prev_buf);
        for (int d = 0; d < n; d++) prev[d] = prev_buf + (cur[d] - cur_buf);
        n_prev = n;
    }
    if (ferror(out)) return moe_error(MOE_ERR_IO, "writing the config failed: %s", strerror(errno));
    return MOE_OK;
}

moe_status moe_yaml_to_text(const moe_yaml_schema *schema, const void *obj, char **out_text) {
    MOE_ASSERT(out_text, "NULL argument");
    *out_text = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(out_text, &len);
    if (!mem) return moe_error(MOE_ERR_OOM, "cannot allocate the config text");
    moe_status st = moe_yaml_write(schema, obj, mem);
    if (fclose(mem) != 0 && st == MOE_OK) st = moe_error(MOE_ERR_OOM, "cannot allocate the config text");
    if (st != MOE_OK) {
        free(*out_text);
        *out_text = NULL;
    }
    return st;
}

void moe_yaml_print_help(const moe_yaml_schema *schema, FILE *out) {
    MOE_ASSERT(schema && out, "NULL argument");
    for (size_t i = 0; i < schema->n_keys; i++) {
        const moe_yaml_key *k = &schema->keys[i];
        if (i == 0 || !same_top_section(k->path, schema->keys[i - 1].path))
            fprintf(out, "%s%.*s:\n", i ? "\n" : "", (int)top_section_len(k->path), k->path);
        char type[600], names[512] = "";
        if (k->values) join_values(k->values, "|", names, sizeof names);
        switch (k->type) {
        case MOE_YAML_INT: snprintf(type, sizeof type, "int %.0f..%.0f", k->min, k->max); break;
        case MOE_YAML_FLOAT: snprintf(type, sizeof type, "float %g..%g", k->min, k->max); break;
        case MOE_YAML_BOOL: snprintf(type, sizeof type, "bool"); break;
        case MOE_YAML_STRING: snprintf(type, sizeof type, "string"); break;
        case MOE_YAML_ENUM: snprintf(type, sizeof type, "%s", names); break;
        case MOE_YAML_INT_LIST:
            snprintf(type, sizeof type, "list of int %.0f..%.0f", k->min, k->max);
            break;
        case MOE_YAML_ENUM_LIST: snprintf(type, sizeof type, "list of %s", names); break;
        case MOE_YAML_ENUM_OR_LIST: snprintf(type, sizeof type, "%s or a list of them", names); break;
        }
        fprintf(out, "  %-28s %-26s default %-22s %s\n", k->path, type,
                k->type == MOE_YAML_STRING ? (*k->def ? k->def : "\"\"") : k->def, k->help);
    }
}
