/* A Jinja2 subset for chat templates, rendering as transformers does (Jinja2 with trim_blocks and
 * lstrip_blocks, loop controls, tojson without HTML escaping and with ensure_ascii off).
 *
 * Supported:
 *  - {{ expr }}, {% stmt %}, {# comment #}, whitespace control with - and +;
 *  - statements: if / elif / else / endif, for / else / endfor (loop.index, index0, revindex,
 *    revindex0, first, last, length, previtem, nextitem; `for a, b in ...`; `for x in xs if cond`),
 *    set (name, ns.attr, a, b = ..., and the {% set x %}...{% endset %} block form), break,
 *    continue, macro / endmacro (positional and keyword arguments with defaults), generation /
 *    endgeneration (rendered as plain text);
 *  - expressions: literals (strings, numbers, true/false/none in either case, lists, dicts,
 *    tuples), + - * / // % **, ~, comparisons, and / or / not, in / not in, is [not] <test>,
 *    a if c else b, attribute and item access, slices ([::-1]);
 *  - filters: trim, length / count, tojson (indent), upper, lower, title, capitalize, first, last,
 *    join, default / d, list, string, int, float, abs, reverse, items, replace, safe, unique,
 *    selectattr / rejectattr, select / reject, map (attribute= or a filter name), sort, dictsort,
 *    indent, wordcount;
 *  - tests: defined, undefined, none, string, number, integer, float, boolean, true, false,
 *    mapping, iterable, sequence, callable, even, odd, divisibleby, eq / equalto / ==, ne, lt, le,
 *    gt, ge, in, sameas;
 *  - string methods: startswith, endswith, strip, lstrip, rstrip, split, rsplit, upper, lower,
 *    title, capitalize, replace, find, count, join, splitlines; dict methods: items, keys,
 *    values, get;
 *  - functions: raise_exception(msg), namespace(...), range(...), dict(...), strftime_now(fmt).
 * Anything else (a statement, filter, test, method or function outside this list) is refused
 * when the template is parsed, with its name, the template's name and the line.
 *
 * Values come from a JSON object (cJSON): JSON numbers with an integral value become integers. */
#ifndef MOE_HF_JINJA_H
#define MOE_HF_JINJA_H

#include <cjson/cJSON.h>

#include "core/status.h"

typedef struct moe_jinja moe_jinja;

/* Parses `source`; `name` (a file path) prefixes every error message, with the line. */
moe_status moe_jinja_parse(moe_jinja **out, const char *source, const char *name);
void moe_jinja_free(moe_jinja *t);

/* Renders with the variables of the JSON object `vars` (may be NULL) into *out (malloc'd).
 * raise_exception(msg) in the template gives MOE_ERR_INVALID with msg in the message. */
moe_status moe_jinja_render(const moe_jinja *t, const cJSON *vars, char **out);

#endif
