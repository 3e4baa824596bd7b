/* Schema-driven YAML configuration reader/writer (libyaml document API).
 *
 * A schema is a static table of key descriptors: a dotted path ("model.d_model"),
 * a type, the byte offset of the field in the caller's struct, a numeric range or
 * the allowed enum names, a default given as YAML text and a one-line description.
 * Defaults, validation, `--set` overrides, the effective-config dump and the help
 * text all come from that one table. This module knows nothing about any model.
 *
 * Field storage by type (the struct member at `offset` must have exactly this type):
 *   MOE_YAML_INT           int          (range [min, max])
 *   MOE_YAML_FLOAT         double       (finite, range [min, max])
 *   MOE_YAML_BOOL          bool         (true / false)
 *   MOE_YAML_STRING        char[MOE_YAML_STRING_MAX]
 *   MOE_YAML_ENUM          int-sized enum, value = index into `values`
 *   MOE_YAML_INT_LIST      moe_yaml_list (each entry in [min, max])
 *   MOE_YAML_ENUM_LIST     moe_yaml_list (each entry an index into `values`)
 *   MOE_YAML_ENUM_OR_LIST  moe_yaml_list; a scalar is stored as a one-entry list and
 *                          written back as a scalar (per-layer values: one for all
 *                          layers, or one per layer).
 *
 * Keys of one section must be contiguous in the table (the dump groups by section).
 * Loading is atomic: on error the target struct is unchanged. Messages name the
 * origin and position ("cfg.yaml:3:12: ...", or "--set model.d_model=abc: ...")
 * and the key. */
#ifndef MOE_CORE_YAML_CONFIG_H
#define MOE_CORE_YAML_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "core/status.h"

#define MOE_YAML_LIST_MAX 64
#define MOE_YAML_STRING_MAX 256

typedef enum moe_yaml_type {
    MOE_YAML_INT,
    MOE_YAML_FLOAT,
    MOE_YAML_BOOL,
    MOE_YAML_STRING,
    MOE_YAML_ENUM,
    MOE_YAML_INT_LIST,
    MOE_YAML_ENUM_LIST,
    MOE_YAML_ENUM_OR_LIST,
} moe_yaml_type;

/* Fixed-capacity list stored inside the config struct. */
typedef struct moe_yaml_list {
    int count;
    int values[MOE_YAML_LIST_MAX];
} moe_yaml_list;

typedef struct moe_yaml_key {
    const char *path;          /* dotted: "section.key" (deeper nesting allowed) */
    moe_yaml_type type;
    size_t offset;             /* offsetof(struct, field) */
    double min, max;           /* INT, FLOAT, INT_LIST entries: inclusive range */
    const char *const *values; /* ENUM*: allowed names, NULL-terminated */
    const char *def;           /* default as YAML text: "256", "1e-3", "[]", "cpu", "" */
    const char *help;          /* one line */
} moe_yaml_key;

typedef struct moe_yaml_schema {
    const moe_yaml_key *keys;
    size_t n_keys;
    size_t struct_size;        /* sizeof the target struct */
} moe_yaml_schema;

/* Zeroes the struct (padding included, so memcmp works) and applies every default.
 * A default that does not parse is a schema bug and asserts. */
void moe_yaml_defaults(const moe_yaml_schema *schema, void *obj);

/* Overlays the keys present in a YAML file / text onto `obj` (keys not mentioned keep
 * their current values). MOE_ERR_IO: the file cannot be read. MOE_ERR_CONFIG: syntax
 * error, unknown or duplicate key, wrong type, out-of-range value. `origin` names the
 * text in messages (e.g. "<checkpoint>"). */
moe_status moe_yaml_load_file(const moe_yaml_schema *schema, void *obj, const char *path);
moe_status moe_yaml_load_text(const moe_yaml_schema *schema, void *obj, const char *text,
                              const char *origin);

/* Applies one override "section.key=value"; the value is YAML text (so lists are
 * written "[a,b]"). Same checks as loading; messages name "--set <assignment>". */
moe_status moe_yaml_set(const moe_yaml_schema *schema, void *obj, const char *assignment);

/* Writes every key, grouped by section in schema order, as YAML that loads back into
 * an identical struct. moe_yaml_to_text returns malloc'd text (caller frees). */
moe_status moe_yaml_write(const moe_yaml_schema *schema, const void *obj, FILE *out);
moe_status moe_yaml_to_text(const moe_yaml_schema *schema, const void *obj, char **out_text);

/* Lists every key with its type, range or allowed values, default and description. */
void moe_yaml_print_help(const moe_yaml_schema *schema, FILE *out);

/* The descriptor of `path`, or NULL. */
const moe_yaml_key *moe_yaml_find_key(const moe_yaml_schema *schema, const char *path);

/* Optimal-string-alignment distance (an adjacent transposition costs 1), for "did you
 * mean" suggestions here and in the command-line parser; SIZE_MAX when either string is
 * longer than a key path can be. */
size_t moe_edit_distance(const char *a, const char *b);

/* Name of enum value `value` of an ENUM* key (asserts on a bad value). */
const char *moe_yaml_enum_name(const moe_yaml_key *key, int value);

#endif
