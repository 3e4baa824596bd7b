/* Chat-template renderer: walks the AST of jinja.c with the variables of a JSON object. Values
 * live in one arena per render, strings are built in streams; a runtime error (undefined
 * value, bad operands, raise_exception, a budget spent) unwinds with longjmp to
 * moe_jinja_render, which frees everything and returns a moe_status with
 * "chat template NAME:LINE: ...". A template comes with the model, so a render has budgets:
 * RENDER_STEPS expressions and statements (loops in filters count their items) and
 * RENDER_BYTES of values and output, far above what a chat of any length needs. */
#define _GNU_SOURCE /* fopencookie, memmem */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <time.h>
#include <utf8proc.h>

#include "moe/hf/jinja_internal.h"

/* ---------- rendering: state, errors, allocation ---------- */

typedef struct scope {
    struct scope *up;
    vdict vars;
} scope;

typedef enum flow { FLOW_NONE, FLOW_BREAK, FLOW_CONTINUE } flow;

#define RENDER_STEPS 1000000L            /* a chat takes about 100 per message */
#define RENDER_BYTES ((size_t)128 << 20) /* values and output: about 7x the text rendered */

struct render;

/* A string being written (fopencookie: every byte counts against the render's budget). */
typedef struct stream {
    FILE *f;
    struct render *r;
    char *buf; /* NUL-terminated */
    size_t len, cap;
    struct stream *next;
} stream;

typedef struct render {
    const moe_jinja *t;
    arena mem;
    FILE *out;
    scope *sc, *global;
    flow ctl;
    stream *streams; /* every memstream opened, for cleanup */
    int depth;       /* macro calls in progress */
    long steps;      /* budgets spent: RENDER_STEPS, RENDER_BYTES */
    size_t bytes;
    bool over, oom;  /* a stream write passed the byte budget / failed to allocate */
    jinja_fault fault;
} render;

/* Stops the render: "chat template NAME:LINE: <message>" (jinja_fail). */
#define rerr(r, line, code, ...) jinja_fail(&(r)->fault, (r)->t->name, line, code, __VA_ARGS__)

/* Charges n bytes (of a value or of output) to the render. */
static void spend_bytes(render *r, int line, size_t n) {
    r->bytes += n;
    if (r->over || r->bytes > RENDER_BYTES)
        rerr(r, line, MOE_ERR_INVALID, "the template's values and output pass %zu MiB", RENDER_BYTES >> 20);
    if (r->oom) rerr(r, line, MOE_ERR_OOM, "out of memory");
}

/* Charges n steps (expressions, statements, items a filter walks) to the render. */
static void spend(render *r, int line, size_t n) {
    r->steps += (long)(n < (size_t)RENDER_STEPS ? n : (size_t)RENDER_STEPS);
    if (r->steps > RENDER_STEPS)
        rerr(r, line, MOE_ERR_INVALID, "the template takes over %ld steps to render", RENDER_STEPS);
    spend_bytes(r, line, 0);
}

static void *ralloc(render *r, size_t n) {
    spend_bytes(r, 0, n);
    void *x = arena_alloc(&r->mem, n);
    if (!x) rerr(r, 0, MOE_ERR_OOM, "out of memory");
    return x;
}

static value mkstr(render *r, const char *s, size_t n) {
    char *c = ralloc(r, n + 1);
    memcpy(c, s, n);
    return (value){.t = V_STR, .s = {c, n}};
}

static value mkint(int64_t i) { return (value){.t = V_INT, .i = i}; }
static value mkbool(bool b) { return (value){.t = V_BOOL, .b = b}; }
static value undef(const char *name) { return (value){.t = V_UNDEF, .s = {name, strlen(name)}}; }

static vlist *mklist(render *r, size_t n) {
    vlist *l = ralloc(r, sizeof *l);
    l->v = ralloc(r, (n ? n : 1) * sizeof *l->v);
    l->n = n;
    return l;
}

static value list_value(vlist *l) { return (value){.t = V_LIST, .l = l}; }

/* The stream's write function: appends, or fails once the render's bytes are spent. */
static ssize_t stream_write(void *cookie, const char *p, size_t n) {
    stream *s = cookie;
    if (s->r->bytes + n > RENDER_BYTES) {
        s->r->over = true;
        return 0;
    }
    if (s->len + n + 1 > s->cap) {
        size_t cap = s->cap ? s->cap : 256;
        while (cap < s->len + n + 1) cap *= 2;
        char *b = realloc(s->buf, cap);
        if (!b) {
            s->r->oom = true;
            return 0;
        }
        s->buf = b;
        s->cap = cap;
    }
    memcpy(s->buf + s->len, p, n);
    s->len += n;
    s->buf[s->len] = '\0';
    s->r->bytes += n;
    return (ssize_t)n;
}

/* A stream for building strings, in the render's list so an error unwinding past it closes
 * it; take_stream turns it into a string value. */
static stream *open_stream(render *r) {
    stream *s = ralloc(r, sizeof *s);
    s->r = r;
    s->f = fopencookie(s, "w", (cookie_io_functions_t){.write = stream_write});
    if (!s->f) rerr(r, 0, MOE_ERR_OOM, "out of memory");
    setvbuf(s->f, NULL, _IONBF, 0); /* most streams hold a short string: no 4 KiB buffer for each */
    s->next = r->streams;
    r->streams = s;
    return s;
}

static value take_stream(render *r, stream *s) {
    fclose(s->f);
    s->f = NULL;
    spend_bytes(r, 0, 0);
    value v = mkstr(r, s->buf ? s->buf : "", s->buf ? s->len : 0);
    free(s->buf);
    s->buf = NULL;
    return v;
}

static const char *type_name(value v) {
    static const char *names[] = {"undefined", "none", "boolean", "integer", "float", "string",
                                  "list", "dict", "function", "method", "macro"};
    return names[v.t];
}

/* ---------- dicts and scopes ---------- */

static value *dict_get(const vdict *d, const char *k, size_t kn) {
    for (size_t i = 0; i < d->n; i++)
        if (d->k[i].n == kn && !memcmp(d->k[i].s, k, kn)) return &d->v[i];
    return NULL;
}

static void dict_set(render *r, vdict *d, str k, value v) {
    value *have = dict_get(d, k.s, k.n);
    if (have) {
        *have = v;
        return;
    }
    if (d->n == d->cap) {
        size_t cap = d->cap ? 2 * d->cap : 8;
        str *nk = ralloc(r, cap * sizeof *nk);
        value *nv = ralloc(r, cap * sizeof *nv);
        if (d->n) {
            memcpy(nk, d->k, d->n * sizeof *nk);
            memcpy(nv, d->v, d->n * sizeof *nv);
        }
        d->k = nk, d->v = nv, d->cap = cap;
    }
    d->k[d->n] = k;
    d->v[d->n++] = v;
}

static value lookup(render *r, const char *name) {
    for (scope *s = r->sc; s; s = s->up) {
        value *v = dict_get(&s->vars, name, strlen(name));
        if (v) return *v;
    }
    int f = name_index(moe_jinja_funcs, name);
    if (f >= 0) return (value){.t = V_FUNC, .fn = f};
    return undef(name);
}

static void assign(render *r, const char *name, value v) {
    dict_set(r, &r->sc->vars, (str){name, strlen(name)}, v);
}

static scope *push_scope(render *r, scope *parent) {
    scope *s = ralloc(r, sizeof *s);
    s->up = parent;
    r->sc = s;
    return s;
}

/* ---------- JSON in ---------- */

static value from_json(render *r, const cJSON *j) {
    if (!j || cJSON_IsNull(j)) return (value){.t = V_NONE};
    if (cJSON_IsBool(j)) return mkbool(cJSON_IsTrue(j));
    if (cJSON_IsNumber(j)) {
        double d = j->valuedouble;
        if (d == floor(d) && fabs(d) < 9007199254740992.0) return mkint((int64_t)d);
        return (value){.t = V_FLOAT, .f = d};
    }
    if (cJSON_IsString(j)) return mkstr(r, j->valuestring, strlen(j->valuestring));
    if (cJSON_IsArray(j)) {
        vlist *l = mklist(r, (size_t)cJSON_GetArraySize(j));
        size_t i = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, j) l->v[i++] = from_json(r, e);
        return list_value(l);
    }
    vdict *d = ralloc(r, sizeof *d);
    const cJSON *e;
    cJSON_ArrayForEach(e, j) dict_set(r, d, mkstr(r, e->string, strlen(e->string)).s, from_json(r, e));
    return (value){.t = V_DICT, .d = d};
}

/* ---------- text out: str(), repr(), JSON ---------- */

static void write_float(FILE *f, double d) {
    if (isnan(d)) fputs("nan", f);
    else if (isinf(d)) fputs(d > 0 ? "inf" : "-inf", f);
    else if (d == floor(d) && fabs(d) < 1e16) fprintf(f, "%.1f", d);
    else {
        char b[40];
        for (int prec = 1; prec <= 17; prec++) {
            snprintf(b, sizeof b, "%.*g", prec, d);
            if (strtod(b, NULL) == d) break;
        }
        fputs(b, f);
    }
}

#define VALUE_DEPTH 500 /* lists and dicts nested deeper (or holding themselves) are not printed or compared */

static _Noreturn void too_deep(render *r) {
    rerr(r, 0, MOE_ERR_INVALID, "a value nests deeper than %d levels (or holds itself)", VALUE_DEPTH);
}

static void write_value(render *r, FILE *f, value v, bool repr, int depth);

static void write_repr_str(FILE *f, str s) {
    char q = memchr(s.s, '\'', s.n) && !memchr(s.s, '"', s.n) ? '"' : '\'';
    fputc(q, f);
    for (size_t i = 0; i < s.n; i++) {
        unsigned char c = (unsigned char)s.s[i];
        if (c == '\\' || c == (unsigned char)q) fprintf(f, "\\%c", c);
        else if (c == '\n') fputs("\\n", f);
        else if (c == '\r') fputs("\\r", f);
        else if (c == '\t') fputs("\\t", f);
        else if (c < 0x20 || c == 0x7f) fprintf(f, "\\x%02x", c);
        else fputc(c, f);
    }
    fputc(q, f);
}

static void write_value(render *r, FILE *f, value v, bool repr, int depth) {
    if (depth > VALUE_DEPTH) too_deep(r);
    switch (v.t) {
    case V_UNDEF: break;
    case V_NONE: fputs("None", f); break;
    case V_BOOL: fputs(v.b ? "True" : "False", f); break;
    case V_INT: fprintf(f, "%lld", (long long)v.i); break;
    case V_FLOAT: write_float(f, v.f); break;
    case V_STR:
        if (repr) write_repr_str(f, v.s);
        else fwrite(v.s.s, 1, v.s.n, f);
        break;
    case V_LIST:
        fputc(v.l->tuple ? '(' : '[', f);
        for (size_t i = 0; i < v.l->n; i++) {
            if (i) fputs(", ", f);
            write_value(r, f, v.l->v[i], true, depth + 1);
        }
        fputs(v.l->tuple ? (v.l->n == 1 ? ",)" : ")") : "]", f);
        break;
    case V_DICT:
        fputc('{', f);
        for (size_t i = 0; i < v.d->n; i++) {
            if (i) fputs(", ", f);
            write_repr_str(f, v.d->k[i]);
            fputs(": ", f);
            write_value(r, f, v.d->v[i], true, depth + 1);
        }
        fputc('}', f);
        break;
    default: fputs("<function>", f); break;
    }
}

static void write_json_str(FILE *f, str s) {
    fputc('"', f);
    for (size_t i = 0; i < s.n; i++) {
        unsigned char c = (unsigned char)s.s[i];
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c == '\n') fputs("\\n", f);
        else if (c == '\r') fputs("\\r", f);
        else if (c == '\t') fputs("\\t", f);
        else if (c == '\b') fputs("\\b", f);
        else if (c == '\f') fputs("\\f", f);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

static void json_newline(FILE *f, int indent, int level) {
    fputc('\n', f);
    for (int i = 0; i < indent * level; i++) fputc(' ', f);
}

/* json.dumps(v, ensure_ascii=False, indent=indent) (indent < 0: none). */
static void write_json(render *r, int line, FILE *f, value v, int indent, int level) {
    if (level > VALUE_DEPTH) too_deep(r);
    switch (v.t) {
    case V_NONE: fputs("null", f); return;
    case V_BOOL: fputs(v.b ? "true" : "false", f); return;
    case V_INT: fprintf(f, "%lld", (long long)v.i); return;
    case V_FLOAT:
        if (isnan(v.f) || isinf(v.f)) fputs(isnan(v.f) ? "NaN" : v.f > 0 ? "Infinity" : "-Infinity", f);
        else write_float(f, v.f);
        return;
    case V_STR: write_json_str(f, v.s); return;
    case V_LIST:
    case V_DICT: {
        bool is_list = v.t == V_LIST;
        size_t n = is_list ? v.l->n : v.d->n;
        fputc(is_list ? '[' : '{', f);
        for (size_t i = 0; i < n; i++) {
            if (i) fputs(indent >= 0 ? "," : ", ", f);
            if (indent >= 0) json_newline(f, indent, level + 1);
            if (!is_list) {
                write_json_str(f, v.d->k[i]);
                fputs(": ", f);
            }
            write_json(r, line, f, is_list ? v.l->v[i] : v.d->v[i], indent, level + 1);
        }
        if (indent >= 0 && n) json_newline(f, indent, level);
        fputc(is_list ? ']' : '}', f);
        return;
    }
    default: rerr(r, line, MOE_ERR_INVALID, "tojson: a value of type %s is not JSON serializable", type_name(v));
    }
}

static value to_string(render *r, value v) {
    if (v.t == V_STR) return v;
    stream *s = open_stream(r);
    write_value(r, s->f, v, false, 0);
    return take_stream(r, s);
}

/* ---------- truth, equality, order ---------- */

static bool truthy(value v) {
    switch (v.t) {
    case V_UNDEF: case V_NONE: return false;
    case V_BOOL: return v.b;
    case V_INT: return v.i != 0;
    case V_FLOAT: return v.f != 0;
    case V_STR: return v.s.n > 0;
    case V_LIST: return v.l->n > 0;
    case V_DICT: return v.d->n > 0;
    default: return true;
    }
}

static bool is_number(value v) { return v.t == V_INT || v.t == V_FLOAT || v.t == V_BOOL; }
static double num(value v) { return v.t == V_FLOAT ? v.f : v.t == V_INT ? (double)v.i : (double)v.b; }

static bool equal_at(render *r, value a, value b, int depth) {
    if (depth > VALUE_DEPTH) too_deep(r);
    if (is_number(a) && is_number(b)) return num(a) == num(b);
    if ((a.t == V_LIST && b.t == V_LIST && a.l == b.l) || (a.t == V_DICT && b.t == V_DICT && a.d == b.d)) return true;
    if (a.t != b.t) return false;
    switch (a.t) {
    case V_UNDEF: case V_NONE: return true;
    case V_STR: return a.s.n == b.s.n && !memcmp(a.s.s, b.s.s, a.s.n);
    case V_LIST:
        if (a.l->n != b.l->n) return false;
        for (size_t i = 0; i < a.l->n; i++)
            if (!equal_at(r, a.l->v[i], b.l->v[i], depth + 1)) return false;
        return true;
    case V_DICT:
        if (a.d->n != b.d->n) return false;
        for (size_t i = 0; i < a.d->n; i++) {
            value *o = dict_get(b.d, a.d->k[i].s, a.d->k[i].n);
            if (!o || !equal_at(r, a.d->v[i], *o, depth + 1)) return false;
        }
        return true;
    default: return a.d == b.d;
    }
}

static bool equal(render *r, value a, value b) { return equal_at(r, a, b, 0); }

static int order(render *r, int line, value a, value b) {
    if (is_number(a) && is_number(b)) return num(a) < num(b) ? -1 : num(a) > num(b);
    if (a.t == V_STR && b.t == V_STR) {
        int c = memcmp(a.s.s, b.s.s, a.s.n < b.s.n ? a.s.n : b.s.n);
        return c ? c : (a.s.n > b.s.n) - (a.s.n < b.s.n);
    }
    rerr(r, line, MOE_ERR_INVALID, "cannot order %s and %s", type_name(a), type_name(b));
}

/* ---------- strings by code point ---------- */

static size_t cp_count(str s) {
    size_t n = 0;
    for (size_t i = 0; i < s.n; i++) n += ((unsigned char)s.s[i] & 0xC0) != 0x80;
    return n;
}

/* Byte offset of code point k (k <= count). */
static size_t cp_offset(str s, size_t k) {
    size_t i = 0;
    while (k && i < s.n) {
        i++;
        while (i < s.n && ((unsigned char)s.s[i] & 0xC0) == 0x80) i++;
        k--;
    }
    return i;
}

static bool str_has(str s, str sub) {
    return sub.n == 0 || (sub.n <= s.n && memmem(s.s, s.n, sub.s, sub.n) != NULL);
}

/* Each code point mapped by fn (upper / lower / title case). */
static value map_case(render *r, str s, int mode /* 0 lower, 1 upper, 2 title, 3 capitalize */) {
    stream *o = open_stream(r);
    bool word_start = true, first = true;
    for (size_t i = 0; i < s.n;) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s.s + i, (utf8proc_ssize_t)(s.n - i), &cp);
        if (k <= 0) cp = (unsigned char)s.s[i], k = 1;
        bool up = mode == 1 || (mode == 2 && word_start) || (mode == 3 && first);
        utf8proc_int32_t m = up ? utf8proc_toupper(cp) : utf8proc_tolower(cp);
        utf8proc_uint8_t b[4];
        fwrite(b, 1, (size_t)utf8proc_encode_char(m, b), o->f);
        utf8proc_category_t cat = utf8proc_category(cp);
        word_start = !(cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO);
        first = false;
        i += (size_t)k;
    }
    return take_stream(r, o);
}

static bool in_set(str set, const char *s, size_t k) { return k <= set.n && memmem(set.s, set.n, s, k) != NULL; }

/* Python's strip family: chars NULL = whitespace. */
static value strip(render *r, str s, const str *chars, bool left, bool right) {
    size_t a = 0, b = s.n;
    str ws = {" \t\n\r\v\f", 6};
    str set = chars ? *chars : ws;
    while (left && a < b) {
        size_t k = cp_offset((str){s.s + a, b - a}, 1);
        if (!in_set(set, s.s + a, k)) break;
        a += k;
    }
    while (right && b > a) {
        size_t c = b - 1;
        while (c > a && ((unsigned char)s.s[c] & 0xC0) == 0x80) c--;
        if (!in_set(set, s.s + c, b - c)) break;
        b = c;
    }
    return mkstr(r, s.s + a, b - a);
}

/* Python's str.split / rsplit (sep NULL: runs of whitespace, empties dropped). */
static value split(render *r, str s, const str *sep, int64_t maxsplit, bool from_right) {
    value parts[4096];
    size_t n = 0;
    if (!sep) {
        str cur = strip(r, s, NULL, true, true).s;
        size_t i = 0;
        while (i < cur.n && n < 4095) {
            size_t j = i;
            while (j < cur.n && !strchr(" \t\n\r\v\f", cur.s[j])) j++;
            if (maxsplit >= 0 && (int64_t)n == maxsplit) j = cur.n;
            parts[n++] = mkstr(r, cur.s + i, j - i);
            i = j;
            while (i < cur.n && strchr(" \t\n\r\v\f", cur.s[i])) i++;
        }
    } else {
        if (!sep->n) rerr(r, 0, MOE_ERR_INVALID, "split: empty separator");
        if (from_right && maxsplit >= 0) { /* collect from the right, then reverse */
            size_t end = s.n;
            value rev[4096];
            size_t m = 0;
            while ((int64_t)m < maxsplit && m < 4095) {
                const char *hit = NULL;
                for (size_t i = end; i-- > 0 && !hit;)
                    if (i + sep->n <= end && !memcmp(s.s + i, sep->s, sep->n)) hit = s.s + i;
                if (!hit) break;
                rev[m++] = mkstr(r, hit + sep->n, (size_t)(s.s + end - hit) - sep->n);
                end = (size_t)(hit - s.s);
            }
            parts[n++] = mkstr(r, s.s, end);
            while (m) parts[n++] = rev[--m];
        } else {
            size_t i = 0;
            for (;;) {
                const char *hit = (maxsplit < 0 || (int64_t)n < maxsplit) && n < 4095
                                      ? memmem(s.s + i, s.n - i, sep->s, sep->n) : NULL;
                if (!hit) break;
                parts[n++] = mkstr(r, s.s + i, (size_t)(hit - (s.s + i)));
                i = (size_t)(hit - s.s) + sep->n;
            }
            parts[n++] = mkstr(r, s.s + i, s.n - i);
        }
    }
    vlist *l = mklist(r, n);
    memcpy(l->v, parts, n * sizeof *parts);
    return list_value(l);
}

static value replace(render *r, str s, str from, str to, int64_t count) {
    stream *o = open_stream(r);
    size_t i = 0;
    int64_t done = 0;
    while (i <= s.n && (count < 0 || done < count)) {
        const char *hit = from.n ? memmem(s.s + i, s.n - i, from.s, from.n) : (i <= s.n ? s.s + i : NULL);
        if (!hit) break;
        fwrite(s.s + i, 1, (size_t)(hit - (s.s + i)), o->f);
        fwrite(to.s, 1, to.n, o->f);
        i = (size_t)(hit - s.s) + from.n;
        done++;
        if (!from.n) {
            if (i < s.n) {
                size_t k = cp_offset((str){s.s + i, s.n - i}, 1);
                fwrite(s.s + i, 1, k, o->f);
                i += k;
            } else break;
        }
    }
    if (i < s.n) fwrite(s.s + i, 1, s.n - i, o->f);
    return take_stream(r, o);
}

/* ---------- sequences ---------- */

/* What a for loop walks: lists as they are, dict keys, string characters. */
static vlist *iterate(render *r, int line, value v) {
    spend(r, line, v.t == V_LIST ? v.l->n : v.t == V_DICT ? v.d->n : v.t == V_STR ? v.s.n : 0);
    switch (v.t) {
    case V_LIST: return v.l;
    case V_UNDEF: return mklist(r, 0);
    case V_DICT: {
        vlist *l = mklist(r, v.d->n);
        for (size_t i = 0; i < v.d->n; i++) l->v[i] = (value){.t = V_STR, .s = v.d->k[i]};
        return l;
    }
    case V_STR: {
        vlist *l = mklist(r, cp_count(v.s));
        for (size_t i = 0, at = 0; i < l->n; i++) {
            size_t k = cp_offset((str){v.s.s + at, v.s.n - at}, 1);
            l->v[i] = (value){.t = V_STR, .s = {v.s.s + at, k}};
            at += k;
        }
        return l;
    }
    default: rerr(r, line, MOE_ERR_INVALID, "a value of type %s is not iterable", type_name(v));
    }
}

static int64_t length(render *r, int line, value v) {
    switch (v.t) {
    case V_STR: return (int64_t)cp_count(v.s);
    case V_LIST: return (int64_t)v.l->n;
    case V_DICT: return (int64_t)v.d->n;
    case V_UNDEF: return 0;
    default: rerr(r, line, MOE_ERR_INVALID, "a value of type %s has no length", type_name(v));
    }
}

static int64_t slice_bound(value v, int64_t n, int64_t step, bool is_start) {
    if (v.t == V_NONE || v.t == V_UNDEF) return step > 0 ? (is_start ? 0 : n) : (is_start ? n - 1 : -1);
    int64_t i = v.t == V_INT ? v.i : v.b; /* slice() checks the type */
    if (i < 0) i += n;
    if (step > 0) return i < 0 ? 0 : i > n ? n : i;
    return i < -1 ? -1 : i > n - 1 ? n - 1 : i;
}

static bool slice_index(value v) { return v.t == V_INT || v.t == V_BOOL || v.t == V_NONE || v.t == V_UNDEF; }

static value slice(render *r, int line, value obj, value a, value b, value c) {
    if (!slice_index(a) || !slice_index(b) || !slice_index(c))
        rerr(r, line, MOE_ERR_INVALID, "slice indices must be integers or none");
    int64_t step = c.t == V_INT ? c.i : c.t == V_BOOL ? c.b : 1;
    if (step == 0) rerr(r, line, MOE_ERR_INVALID, "slice step cannot be zero");
    vlist *src = obj.t == V_LIST ? obj.l : obj.t == V_STR ? iterate(r, line, obj) : NULL;
    if (!src) rerr(r, line, MOE_ERR_INVALID, "a value of type %s cannot be sliced", type_name(obj));
    int64_t n = (int64_t)src->n, from = slice_bound(a, n, step, true), to = slice_bound(b, n, step, false);
    vlist *l = mklist(r, (size_t)(n ? n : 1));
    l->n = 0;
    for (int64_t i = from; step > 0 ? i < to : i > to; i += step) {
        l->v[l->n++] = src->v[i];
        if (step > 0 ? to - i <= step : (uint64_t)(i - to) <= 0 - (uint64_t)step) break; /* i + step would pass `to` */
    }
    if (obj.t == V_LIST) return list_value(l);
    stream *o = open_stream(r);
    for (size_t i = 0; i < l->n; i++) fwrite(l->v[i].s.s, 1, l->v[i].s.n, o->f);
    return take_stream(r, o);
}

static value get_item(render *r, int line, value obj, value key) {
    switch (obj.t) {
    case V_DICT: {
        if (key.t != V_STR) return undef("item");
        value *v = dict_get(obj.d, key.s.s, key.s.n);
        return v ? *v : undef("item");
    }
    case V_LIST:
    case V_STR: {
        if (key.t != V_INT) return undef("item");
        vlist *l = obj.t == V_LIST ? obj.l : iterate(r, line, obj);
        int64_t i = key.i < 0 ? key.i + (int64_t)l->n : key.i;
        return i >= 0 && i < (int64_t)l->n ? l->v[i] : undef("item");
    }
    case V_UNDEF:
        rerr(r, line, MOE_ERR_INVALID, "'%.*s' is undefined", (int)obj.s.n, obj.s.s);
    default: return undef("item");
    }
}

static bool is_method_of(value obj, const char *name) {
    static const char *dict_methods[] = {"items", "keys", "values", "get", NULL};
    static const char *str_methods[] = {"startswith", "endswith", "strip", "lstrip", "rstrip", "split", "rsplit",
                                        "upper", "lower", "title", "capitalize", "replace", "find", "count",
                                        "join", "splitlines", NULL};
    if (obj.t == V_DICT && !obj.d->ns) return name_index(dict_methods, name) >= 0;
    if (obj.t == V_STR) return name_index(str_methods, name) >= 0;
    return false;
}

static value get_attr(render *r, int line, value obj, const char *name) {
    if (obj.t == V_UNDEF)
        rerr(r, line, MOE_ERR_INVALID, "'%.*s' is undefined (reading its attribute '%s')", (int)obj.s.n, obj.s.s,
             name);
    if (is_method_of(obj, name)) {
        value *self = ralloc(r, sizeof *self);
        *self = obj;
        return (value){.t = V_METHOD, .m = {self, name}};
    }
    if (obj.t == V_DICT) {
        value *v = dict_get(obj.d, name, strlen(name));
        return v ? *v : undef(name);
    }
    return undef(name);
}

/* ---------- arithmetic ---------- */

static _Noreturn void type_error(render *r, int line, const char *what, value a, value b) {
    if (a.t == V_UNDEF || b.t == V_UNDEF) {
        value u = a.t == V_UNDEF ? a : b;
        rerr(r, line, MOE_ERR_INVALID, "'%.*s' is undefined", (int)u.s.n, u.s.s);
    }
    rerr(r, line, MOE_ERR_INVALID, "cannot %s %s and %s", what, type_name(a), type_name(b));
}

static value concat_lists(render *r, vlist *a, vlist *b) {
    vlist *l = mklist(r, a->n + b->n);
    memcpy(l->v, a->v, a->n * sizeof *l->v);
    memcpy(l->v + a->n, b->v, b->n * sizeof *l->v);
    return list_value(l);
}

static value concat_strs(render *r, str a, str b) {
    char *c = ralloc(r, a.n + b.n + 1);
    memcpy(c, a.s, a.n);
    memcpy(c + a.n, b.s, b.n);
    return (value){.t = V_STR, .s = {c, a.n + b.n}};
}

static value repeat(render *r, int line, value seq, int64_t times) {
    size_t unit = seq.t == V_STR ? seq.s.n : seq.l->n;
    if (times > 0 && unit && (uint64_t)times > (64u << 20) / unit)
        rerr(r, line, MOE_ERR_INVALID, "repetition by %lld makes a value over 64 Mi items", (long long)times);
    size_t k = times > 0 ? (size_t)times : 0;
    if (seq.t == V_STR) {
        char *c = ralloc(r, unit * k + 1);
        for (size_t i = 0; i < k; i++) memcpy(c + i * unit, seq.s.s, unit);
        return (value){.t = V_STR, .s = {c, unit * k}};
    }
    vlist *l = mklist(r, unit * k);
    for (size_t i = 0; i < k; i++) memcpy(l->v + i * unit, seq.l->v, unit * sizeof *l->v);
    return list_value(l);
}

/* Python's integer + - * // % ** (j != 0 for // and %). Python's integers have no bounds: a
 * result past 64 bits becomes the nearest float here (so 2 ** 100 > 0 still holds), as does a
 * negative power. */
static value int_arith(render *r, int line, binop op, int64_t i, int64_t j) {
    int64_t k;
    double x = (double)i, y = (double)j;
    switch (op) {
    case OP_ADD: return __builtin_add_overflow(i, j, &k) ? (value){.t = V_FLOAT, .f = x + y} : mkint(k);
    case OP_SUB: return __builtin_sub_overflow(i, j, &k) ? (value){.t = V_FLOAT, .f = x - y} : mkint(k);
    case OP_MUL: return __builtin_mul_overflow(i, j, &k) ? (value){.t = V_FLOAT, .f = x * y} : mkint(k);
    case OP_FLOORDIV:
        if (j == -1) return int_arith(r, line, OP_SUB, 0, i);
        return mkint(i / j - ((i % j != 0) && ((i < 0) != (j < 0))));
    case OP_MOD:
        if (j == -1) return mkint(0);
        k = i % j;
        return mkint(k != 0 && (k < 0) != (j < 0) ? k + j : k);
    case OP_POW:
        if (j < 0) {
            if (!i) rerr(r, line, MOE_ERR_INVALID, "division by zero (0 to a negative power)");
            return (value){.t = V_FLOAT, .f = pow(x, y)};
        }
        if (i == 0 || i == 1) return mkint(j ? i : 1);
        if (i == -1) return mkint(j % 2 ? -1 : 1);
        for (k = 1; j > 0; j--) /* |i| >= 2: overflows within 63 steps */
            if (__builtin_mul_overflow(k, i, &k)) return (value){.t = V_FLOAT, .f = pow(x, y)};
        return mkint(k);
    default: rerr(r, line, MOE_ERR_INVALID, "not an integer operation");
    }
}

static value arith(render *r, int line, binop op, value a, value b) {
    if (op == OP_CONCAT) return concat_strs(r, to_string(r, a).s, to_string(r, b).s);
    if (op == OP_ADD && a.t == V_STR && b.t == V_STR) return concat_strs(r, a.s, b.s);
    if (op == OP_ADD && a.t == V_LIST && b.t == V_LIST) return concat_lists(r, a.l, b.l);
    if (op == OP_MUL && (a.t == V_STR || a.t == V_LIST) && b.t == V_INT) return repeat(r, line, a, b.i);
    if (op == OP_MUL && (b.t == V_STR || b.t == V_LIST) && a.t == V_INT) return repeat(r, line, b, a.i);
    if (op == OP_MOD && a.t == V_STR) rerr(r, line, MOE_ERR_UNSUPPORTED, "string %% formatting is not supported");
    static const char *verbs[] = {"add", "subtract", "multiply", "divide", "floor-divide", "take the modulo of",
                                  "raise"};
    if (!is_number(a) || !is_number(b)) type_error(r, line, verbs[op], a, b);
    bool ints = a.t != V_FLOAT && b.t != V_FLOAT;
    double x = num(a), y = num(b);
    if ((op == OP_DIV || op == OP_FLOORDIV || op == OP_MOD) && y == 0)
        rerr(r, line, MOE_ERR_INVALID, "division by zero");
    if (ints && op != OP_DIV) return int_arith(r, line, op, a.t == V_INT ? a.i : a.b, b.t == V_INT ? b.i : b.b);
    switch (op) {
    case OP_ADD: return (value){.t = V_FLOAT, .f = x + y};
    case OP_SUB: return (value){.t = V_FLOAT, .f = x - y};
    case OP_MUL: return (value){.t = V_FLOAT, .f = x * y};
    case OP_DIV: return (value){.t = V_FLOAT, .f = x / y};
    case OP_FLOORDIV: return (value){.t = V_FLOAT, .f = floor(x / y)};
    case OP_MOD: return (value){.t = V_FLOAT, .f = x - y * floor(x / y)};
    case OP_POW: return (value){.t = V_FLOAT, .f = pow(x, y)};
    default: type_error(r, line, "combine", a, b);
    }
}

static bool contains(render *r, int line, value hay, value needle) {
    switch (hay.t) {
    case V_STR:
        if (needle.t != V_STR)
            rerr(r, line, MOE_ERR_INVALID, "'in <string>' needs a string, not %s", type_name(needle));
        return str_has(hay.s, needle.s);
    case V_LIST:
        spend(r, line, hay.l->n);
        for (size_t i = 0; i < hay.l->n; i++)
            if (equal(r, hay.l->v[i], needle)) return true;
        return false;
    case V_DICT: return needle.t == V_STR && dict_get(hay.d, needle.s.s, needle.s.n);
    case V_UNDEF: return false;
    default: rerr(r, line, MOE_ERR_INVALID, "'in' needs a string, list or dict, not %s", type_name(hay));
    }
}

/* ---------- calls ---------- */

typedef struct args {
    value *pos;
    size_t n;
    const char **kw;
    value *kv;
    size_t n_kw;
} args;

static value eval(render *r, const node *e);

static args eval_args(render *r, const node *n) {
    args a = {ralloc(r, (n->n_kids + 1) * sizeof(value)), n->n_kids, n->kw_names,
              ralloc(r, (n->n_kw + 1) * sizeof(value)), n->n_kw};
    for (size_t i = 0; i < n->n_kids; i++) a.pos[i] = eval(r, n->kids[i]);
    for (size_t i = 0; i < n->n_kw; i++) a.kv[i] = eval(r, n->kw_vals[i]);
    return a;
}

/* Argument i by position, else by keyword, else dflt. */
static value arg(const args *a, size_t i, const char *kw, value dflt) {
    if (i < a->n) return a->pos[i];
    for (size_t k = 0; kw && k < a->n_kw; k++)
        if (!strcmp(a->kw[k], kw)) return a->kv[k];
    return dflt;
}

static str want_str(render *r, int line, value v, const char *what) {
    if (v.t != V_STR) rerr(r, line, MOE_ERR_INVALID, "%s needs a string, not %s", what, type_name(v));
    return v.s;
}

static int64_t want_int(render *r, int line, value v, const char *what) {
    if (v.t != V_INT && v.t != V_BOOL)
        rerr(r, line, MOE_ERR_INVALID, "%s needs an integer, not %s", what, type_name(v));
    return v.t == V_INT ? v.i : v.b;
}

static value kv_pairs(render *r, vdict *d, bool values_only, bool keys_only) {
    vlist *l = mklist(r, d->n);
    for (size_t i = 0; i < d->n; i++) {
        value k = {.t = V_STR, .s = d->k[i]};
        if (keys_only) l->v[i] = k;
        else if (values_only) l->v[i] = d->v[i];
        else {
            vlist *pair = mklist(r, 2);
            pair->tuple = true;
            pair->v[0] = k;
            pair->v[1] = d->v[i];
            l->v[i] = list_value(pair);
        }
    }
    return list_value(l);
}

/* prefix may be a string or a list / tuple of strings */
static bool affix_match(render *r, int line, str s, value affix, bool start) {
    if (affix.t == V_LIST) {
        for (size_t i = 0; i < affix.l->n; i++)
            if (affix_match(r, line, s, affix.l->v[i], start)) return true;
        return false;
    }
    str a = want_str(r, line, affix, start ? "startswith" : "endswith");
    return a.n <= s.n && !memcmp(start ? s.s : s.s + s.n - a.n, a.s, a.n);
}

static value join(render *r, int line, value seq, str sep) {
    vlist *l = iterate(r, line, seq);
    stream *o = open_stream(r);
    for (size_t i = 0; i < l->n; i++) {
        if (i) fwrite(sep.s, 1, sep.n, o->f);
        value s = to_string(r, l->v[i]);
        fwrite(s.s.s, 1, s.s.n, o->f);
    }
    return take_stream(r, o);
}

static value str_method(render *r, int line, str s, const char *m, const args *a) {
    value none = {.t = V_NONE};
    if (!strcmp(m, "startswith") || !strcmp(m, "endswith"))
        return mkbool(affix_match(r, line, s, arg(a, 0, NULL, mkstr(r, "", 0)), m[0] == 's'));
    if (!strcmp(m, "strip") || !strcmp(m, "lstrip") || !strcmp(m, "rstrip")) {
        value c = arg(a, 0, "chars", none);
        str chars = c.t == V_STR ? c.s : (str){0};
        return strip(r, s, c.t == V_STR ? &chars : NULL, m[0] != 'r', m[0] != 'l');
    }
    if (!strcmp(m, "split") || !strcmp(m, "rsplit")) {
        value sep = arg(a, 0, "sep", none);
        str sp = sep.t == V_STR ? sep.s : (str){0};
        int64_t mx = want_int(r, line, arg(a, 1, "maxsplit", mkint(-1)), "split");
        return split(r, s, sep.t == V_STR ? &sp : NULL, mx, m[0] == 'r');
    }
    if (!strcmp(m, "splitlines")) {
        str nl = {"\n", 1};
        value v = split(r, s, &nl, -1, false);
        if (v.l->n && v.l->v[v.l->n - 1].s.n == 0) v.l->n--;
        for (size_t i = 0; i < v.l->n; i++)
            if (v.l->v[i].s.n && v.l->v[i].s.s[v.l->v[i].s.n - 1] == '\r') v.l->v[i].s.n--;
        return v;
    }
    if (!strcmp(m, "upper")) return map_case(r, s, 1);
    if (!strcmp(m, "lower")) return map_case(r, s, 0);
    if (!strcmp(m, "title")) return map_case(r, s, 2);
    if (!strcmp(m, "capitalize")) return map_case(r, s, 3);
    if (!strcmp(m, "replace"))
        return replace(r, s, want_str(r, line, arg(a, 0, NULL, none), "replace"),
                       want_str(r, line, arg(a, 1, NULL, none), "replace"),
                       want_int(r, line, arg(a, 2, "count", mkint(-1)), "replace"));
    if (!strcmp(m, "find") || !strcmp(m, "count")) {
        str sub = want_str(r, line, arg(a, 0, NULL, none), m);
        if (m[0] == 'f') {
            const char *hit = memmem(s.s, s.n, sub.s, sub.n);
            return mkint(hit ? (int64_t)cp_count((str){s.s, (size_t)(hit - s.s)}) : -1);
        }
        int64_t k = 0;
        for (const char *h = s.s; sub.n && (h = memmem(h, s.n - (size_t)(h - s.s), sub.s, sub.n)); h += sub.n) k++;
        return mkint(sub.n ? k : (int64_t)cp_count(s) + 1);
    }
    if (!strcmp(m, "join")) return join(r, line, arg(a, 0, NULL, none), s);
    rerr(r, line, MOE_ERR_UNSUPPORTED, "string method '%s' is not supported", m);
}

static value call_method(render *r, int line, value self, const char *m, const args *a) {
    if (self.t == V_STR) return str_method(r, line, self.s, m, a);
    if (!strcmp(m, "items")) return kv_pairs(r, self.d, false, false);
    if (!strcmp(m, "keys")) return kv_pairs(r, self.d, false, true);
    if (!strcmp(m, "values")) return kv_pairs(r, self.d, true, false);
    value key = arg(a, 0, NULL, (value){.t = V_NONE});
    value *v = key.t == V_STR ? dict_get(self.d, key.s.s, key.s.n) : NULL; /* get */
    return v ? *v : arg(a, 1, "default", (value){.t = V_NONE});
}

static void exec(render *r, const node *s);
static stream *open_out(render *r);
static value close_out(render *r, stream *s, FILE *saved);

static value call_macro(render *r, int line, const node *mac, const args *a) {
    if (++r->depth > 100) rerr(r, line, MOE_ERR_INVALID, "macro '%s' nests deeper than 100 calls", mac->name);
    scope *saved_sc = r->sc;
    flow saved_ctl = r->ctl;
    push_scope(r, r->global->up ? r->global : r->global);
    for (size_t i = 0; i < mac->n_kw; i++) {
        value v = arg(a, i, mac->kw_names[i], (value){.t = V_UNDEF, .s = {mac->kw_names[i], strlen(mac->kw_names[i])}});
        if (v.t == V_UNDEF && mac->kw_vals[i]) v = eval(r, mac->kw_vals[i]);
        assign(r, mac->kw_names[i], v);
    }
    FILE *saved_out = r->out;
    stream *s = open_out(r);
    exec(r, mac->b);
    value out = close_out(r, s, saved_out);
    r->sc = saved_sc;
    r->ctl = saved_ctl;
    r->depth--;
    return out;
}

static value call_func(render *r, int line, func f, const args *a) {
    switch (f) {
    case F_RAISE: {
        value msg = to_string(r, arg(a, 0, NULL, mkstr(r, "", 0)));
        rerr(r, line, MOE_ERR_INVALID, "raise_exception: %.*s", (int)msg.s.n, msg.s.s);
    }
    case F_NAMESPACE:
    case F_DICT: {
        vdict *d = ralloc(r, sizeof *d);
        d->ns = f == F_NAMESPACE;
        if (a->n && a->pos[0].t == V_DICT)
            for (size_t i = 0; i < a->pos[0].d->n; i++) dict_set(r, d, a->pos[0].d->k[i], a->pos[0].d->v[i]);
        for (size_t i = 0; i < a->n_kw; i++) dict_set(r, d, (str){a->kw[i], strlen(a->kw[i])}, a->kv[i]);
        return (value){.t = V_DICT, .d = d};
    }
    case F_RANGE: {
        int64_t lo = 0, hi, step = 1;
        if (a->n == 1) hi = want_int(r, line, a->pos[0], "range");
        else if (a->n >= 2) {
            lo = want_int(r, line, a->pos[0], "range");
            hi = want_int(r, line, a->pos[1], "range");
            if (a->n > 2) step = want_int(r, line, a->pos[2], "range");
        } else rerr(r, line, MOE_ERR_INVALID, "range needs 1 to 3 arguments");
        if (step == 0) rerr(r, line, MOE_ERR_INVALID, "range step cannot be zero");
        /* ceil((hi - lo) / step) items, computed without overflow */
        uint64_t span = step > 0 ? (hi > lo ? (uint64_t)hi - (uint64_t)lo : 0) : (lo > hi ? (uint64_t)lo - (uint64_t)hi : 0);
        uint64_t by = step > 0 ? (uint64_t)step : 0 - (uint64_t)step;
        int64_t count = span ? (int64_t)((span - 1) / by + 1) : 0;
        if (count > 1000000) rerr(r, line, MOE_ERR_INVALID, "range of %lld items is too long", (long long)count);
        vlist *l = mklist(r, (size_t)count);
        for (int64_t i = 0; i < count; i++) l->v[i] = mkint((int64_t)((uint64_t)lo + (uint64_t)i * (uint64_t)step));
        return list_value(l);
    }
    case F_STRFTIME: {
        str fmt = want_str(r, line, arg(a, 0, NULL, (value){.t = V_NONE}), "strftime_now");
        char f0[256], out[512];
        snprintf(f0, sizeof f0, "%.*s", (int)fmt.n, fmt.s);
        time_t now = time(NULL);
        struct tm tmv;
        localtime_r(&now, &tmv);
        size_t k = strftime(out, sizeof out, f0, &tmv);
        return mkstr(r, out, k);
    }
    }
    rerr(r, line, MOE_ERR_UNSUPPORTED, "unknown function");
}

static value call(render *r, const node *e) {
    value callee = eval(r, e->a);
    args a = eval_args(r, e);
    switch (callee.t) {
    case V_FUNC: return call_func(r, e->line, (func)callee.fn, &a);
    case V_METHOD: return call_method(r, e->line, *callee.m.self, callee.m.name, &a);
    case V_MACRO: return call_macro(r, e->line, callee.macro, &a);
    case V_UNDEF:
        rerr(r, e->line, MOE_ERR_INVALID, "'%.*s' is undefined (called as a function)", (int)callee.s.n, callee.s.s);
    default:
        if (e->a->kind == E_ATTR)
            rerr(r, e->line, MOE_ERR_INVALID, "a value of type %s has no method '%s'", type_name(*(value *)&callee),
                 e->a->name);
        rerr(r, e->line, MOE_ERR_INVALID, "a value of type %s is not callable", type_name(callee));
    }
}

/* ---------- tests ---------- */

static bool run_test(render *r, int line, const char *name, value v, const args *a) {
    value x = arg(a, 0, NULL, (value){.t = V_UNDEF, .s = {"argument", 8}});
    switch (name_index(moe_jinja_tests, name)) {
    case 0: return v.t != V_UNDEF;                          /* defined */
    case 1: return v.t == V_UNDEF;                          /* undefined */
    case 2: return v.t == V_NONE;                           /* none */
    case 3: return v.t == V_STR;                            /* string */
    case 4: return is_number(v);                            /* number */
    case 5: return v.t == V_INT;                            /* integer */
    case 6: return v.t == V_FLOAT;                          /* float */
    case 7: return v.t == V_BOOL;                           /* boolean */
    case 8: return v.t == V_BOOL && v.b;                    /* true */
    case 9: return v.t == V_BOOL && !v.b;                   /* false */
    case 10: return v.t == V_DICT;                          /* mapping */
    case 11: case 12: return v.t == V_LIST || v.t == V_DICT || v.t == V_STR; /* iterable, sequence */
    case 13: return v.t == V_FUNC || v.t == V_METHOD || v.t == V_MACRO;     /* callable */
    case 14: return want_int(r, line, v, "even") % 2 == 0;
    case 15: return want_int(r, line, v, "odd") % 2 != 0;
    case 16: { /* divisibleby */
        int64_t i = want_int(r, line, v, "divisibleby"), j = want_int(r, line, x, "divisibleby");
        if (!j) rerr(r, line, MOE_ERR_INVALID, "divisibleby 0");
        return j == -1 || i % j == 0;
    }
    case 17: case 18: case 19: return equal(r, v, x);
    case 20: case 21: return !equal(r, v, x);
    case 22: case 23: return order(r, line, v, x) < 0;
    case 24: case 25: return order(r, line, v, x) <= 0;
    case 26: case 27: return order(r, line, v, x) > 0;
    case 28: case 29: return order(r, line, v, x) >= 0;
    case 30: return contains(r, line, x, v);                /* in */
    case 31: return v.t == x.t && (v.t == V_NONE || (v.t == V_BOOL && v.b == x.b) || equal(r, v, x)); /* sameas */
    }
    rerr(r, line, MOE_ERR_UNSUPPORTED, "test '%s' is not supported", name);
}

/* ---------- filters ---------- */

static value apply_filter(render *r, int line, const char *name, value v, const args *a);

/* selectattr / rejectattr (by_attr: argument 0 names the attribute) and select / reject:
 * the items whose value passes the named test (or is true when no test is named). */
static value select_items(render *r, int line, value seq, const args *a, bool reject, bool by_attr) {
    vlist *in = iterate(r, line, seq), *out = mklist(r, in->n);
    char an[128] = "";
    if (by_attr) {
        str attr = want_str(r, line, arg(a, 0, NULL, (value){.t = V_NONE}), "selectattr");
        snprintf(an, sizeof an, "%.*s", (int)attr.n, attr.s);
    }
    size_t at = by_attr ? 1 : 0;
    value test = arg(a, at, NULL, (value){.t = V_NONE});
    char tn[64] = "";
    if (test.t == V_STR) snprintf(tn, sizeof tn, "%.*s", (int)test.s.n, test.s.s);
    if (tn[0] && name_index(moe_jinja_tests, tn) < 0)
        rerr(r, line, MOE_ERR_UNSUPPORTED, "test '%s' is not supported", tn);
    args rest = {a->pos + (a->n > at + 1 ? at + 1 : a->n), a->n > at + 1 ? a->n - at - 1 : 0, NULL, NULL, 0};
    out->n = 0;
    for (size_t i = 0; i < in->n; i++) {
        value x = !by_attr ? in->v[i] : in->v[i].t == V_DICT ? get_attr(r, line, in->v[i], an) : undef(an);
        bool pass = tn[0] ? run_test(r, line, tn, x, &rest) : truthy(x);
        if (pass != reject) out->v[out->n++] = in->v[i];
    }
    return list_value(out);
}

/* sort(reverse=false, case_sensitive=false, attribute=none): a stable insertion sort. */
static value sort_items(render *r, int line, const char *name, value seq, const args *a) {
    vlist *in = iterate(r, line, seq), *l = mklist(r, in->n);
    memcpy(l->v, in->v, in->n * sizeof *l->v);
    bool rev = truthy(arg(a, 0, "reverse", mkbool(false))), cs = truthy(arg(a, 1, "case_sensitive", mkbool(false)));
    value attr = arg(a, 2, "attribute", (value){.t = V_NONE});
    value *keys = ralloc(r, (l->n + 1) * sizeof *keys);
    for (size_t i = 0; i < l->n; i++) {
        value k = l->v[i];
        if (attr.t == V_STR) k = get_item(r, line, k, attr);
        keys[i] = k.t == V_STR && !cs ? map_case(r, k.s, 0) : k;
    }
    for (size_t i = 1; i < l->n; i++)
        for (size_t j = i; j > 0; j--) {
            int c = order(r, line, keys[j - 1], keys[j]);
            if (rev ? c >= 0 : c <= 0) break;
            value tk = keys[j], tv = l->v[j];
            keys[j] = keys[j - 1], l->v[j] = l->v[j - 1];
            keys[j - 1] = tk, l->v[j - 1] = tv;
        }
    return list_value(l);
}

/* map(filter, *args): each item through the filter; map(attribute=, default=): each item's attribute. */
static value map_items(render *r, int line, const char *name, value seq, const args *a) {
    vlist *in = iterate(r, line, seq), *out = mklist(r, in->n);
    value attr = arg(a, 99, "attribute", (value){.t = V_NONE});
    for (size_t i = 0; i < in->n; i++) {
        if (attr.t == V_STR) {
            char an[128];
            snprintf(an, sizeof an, "%.*s", (int)attr.s.n, attr.s.s);
            out->v[i] = get_attr(r, line, in->v[i], an);
            if (out->v[i].t == V_UNDEF) out->v[i] = arg(a, 99, "default", out->v[i]);
        } else {
            str f = want_str(r, line, arg(a, 0, NULL, (value){.t = V_NONE}), "map");
            char fn[64];
            snprintf(fn, sizeof fn, "%.*s", (int)f.n, f.s);
            args rest = {a->pos + 1, a->n ? a->n - 1 : 0, NULL, NULL, 0};
            out->v[i] = apply_filter(r, line, fn, in->v[i], &rest);
        }
    }
    return list_value(out);
}

/* dictsort: a dict's [key, value] pairs by case-folded key. */
static value dictsort(render *r, int line, const char *name, value v, const args *a) {
    if (v.t != V_DICT) rerr(r, line, MOE_ERR_INVALID, "dictsort needs a dict, not %s", type_name(v));
    value pairs = kv_pairs(r, v.d, false, false);
    vlist *l = pairs.l;
    for (size_t i = 1; i < l->n; i++) /* insertion sort by case-folded key */
        for (size_t j = i; j > 0; j--) {
            value ka = map_case(r, l->v[j - 1].l->v[0].s, 0), kb = map_case(r, l->v[j].l->v[0].s, 0);
            if (order(r, line, ka, kb) <= 0) break;
            value t = l->v[j];
            l->v[j] = l->v[j - 1];
            l->v[j - 1] = t;
        }
    return pairs;
}

/* indent(width=4, first=false, blank=false): every line but the first (and blank ones) padded. */
static value indent_filter(render *r, int line, const char *name, value v, const args *a) {
    str s = to_string(r, v).s;
    value w = arg(a, 0, "width", mkint(4));
    bool first = truthy(arg(a, 1, "first", mkbool(false))), blank = truthy(arg(a, 2, "blank", mkbool(false)));
    str pad = w.t == V_STR ? w.s : (str){"                                ", (size_t)want_int(r, line, w, "indent")};
    if (pad.n > 32 && w.t != V_STR) pad.n = 32;
    stream *o = open_stream(r);
    bool line_start = true, is_first = true;
    for (size_t i = 0; i < s.n; i++) {
        if (line_start) {
            size_t e = i;
            while (e < s.n && s.s[e] != '\n') e++;
            bool empty = e == i;
            if ((!is_first || first) && (blank || !empty)) fwrite(pad.s, 1, pad.n, o->f);
            line_start = false;
            is_first = false;
        }
        fputc(s.s[i], o->f);
        if (s.s[i] == '\n') line_start = true;
    }
    return take_stream(r, o);
}

/* trim(chars=none). */
static value trim_filter(render *r, int line, const char *name, value v, const args *a) {
    value c = arg(a, 0, "chars", (value){.t = V_NONE});
    str chars = c.t == V_STR ? c.s : (str){0};
    return strip(r, to_string(r, v).s, c.t == V_STR ? &chars : NULL, true, true);
}

/* length, count. */
static value length_filter(render *r, int line, const char *name, value v, const args *a) {
    return mkint(length(r, line, v));
}

/* tojson(indent=none). */
static value tojson_filter(render *r, int line, const char *name, value v, const args *a) {
    value ind = arg(a, 0, "indent", (value){.t = V_NONE});
    if (ind.t == V_INT && ind.i > 1000)
        rerr(r, line, MOE_ERR_INVALID, "tojson: indent %lld is over 1000", (long long)ind.i);
    stream *o = open_stream(r);
    write_json(r, line, o->f, v, ind.t == V_INT ? (int)ind.i : -1, 0);
    return take_stream(r, o);
}

/* upper, lower, title, capitalize: the map_case mode the name asks for. */
static value case_filter(render *r, int line, const char *name, value v, const args *a) {
    int mode = !strcmp(name, "upper") ? 1 : !strcmp(name, "lower") ? 0 : !strcmp(name, "title") ? 2 : 3;
    return map_case(r, to_string(r, v).s, mode);
}

/* first, last: the end item, undefined for an empty sequence. */
static value end_item_filter(render *r, int line, const char *name, value v, const args *a) {
    vlist *l = iterate(r, line, v);
    return l->n ? l->v[name[0] == 'f' ? 0 : l->n - 1] : undef(name);
}

/* join(d="", attribute=none). */
static value join_filter(render *r, int line, const char *name, value v, const args *a) {
    value attr = arg(a, 1, "attribute", (value){.t = V_NONE});
    if (attr.t == V_STR) {
        args m = {NULL, 0, (const char *[]){"attribute"}, &attr, 1};
        v = map_items(r, line, "map", v, &m);
    }
    value sep = arg(a, 0, "d", mkstr(r, "", 0));
    return join(r, line, v, want_str(r, line, sep, "join"));
}

/* default, d (default_value="", boolean=false). */
static value default_filter(render *r, int line, const char *name, value v, const args *a) {
    bool boolean = truthy(arg(a, 1, "boolean", mkbool(false)));
    return v.t == V_UNDEF || (boolean && !truthy(v)) ? arg(a, 0, "default_value", mkstr(r, "", 0)) : v;
}

/* list: a list's items, a dict's keys or a string's characters. */
static value list_filter(render *r, int line, const char *name, value v, const args *a) {
    return list_value(iterate(r, line, v));
}

/* string: any value as text. */
static value string_filter(render *r, int line, const char *name, value v, const args *a) { return to_string(r, v); }

/* int(default=0): Python's int() of a number, or of a string's leading decimal digits. */
static value int_filter(render *r, int line, const char *name, value v, const args *a) {
    if (v.t == V_INT) return v;
    if (v.t == V_BOOL) return mkint(v.b);
    if (v.t == V_FLOAT) {
        if (!(fabs(v.f) < 9223372036854775808.0)) /* Python: OverflowError / ValueError */
            rerr(r, line, MOE_ERR_INVALID, "int: %g does not fit 64 bits", v.f);
        return mkint((int64_t)v.f);
    }
    if (v.t == V_STR) {
        char b[64], *end;
        snprintf(b, sizeof b, "%.*s", (int)v.s.n, v.s.s);
        long long k = strtoll(b, &end, 10);
        if (end != b) return mkint(k);
    }
    return arg(a, 0, "default", mkint(0));
}

/* float(default=0.0). */
static value float_filter(render *r, int line, const char *name, value v, const args *a) {
    if (is_number(v)) return (value){.t = V_FLOAT, .f = num(v)};
    char b[64], *end;
    snprintf(b, sizeof b, "%.*s", v.t == V_STR ? (int)v.s.n : 0, v.t == V_STR ? v.s.s : "");
    double d = strtod(b, &end);
    return end != b ? (value){.t = V_FLOAT, .f = d} : arg(a, 0, "default", (value){.t = V_FLOAT});
}

/* abs: of an int or a float. */
static value abs_filter(render *r, int line, const char *name, value v, const args *a) {
    if (v.t == V_INT) return v.i < 0 ? arith(r, line, OP_SUB, mkint(0), v) : v;
    if (v.t == V_FLOAT) return (value){.t = V_FLOAT, .f = fabs(v.f)};
    rerr(r, line, MOE_ERR_INVALID, "abs needs a number, not %s", type_name(v));
}

/* reverse: a list, or a string for a string. */
static value reverse_filter(render *r, int line, const char *name, value v, const args *a) {
    vlist *src = iterate(r, line, v), *l = mklist(r, src->n);
    for (size_t i = 0; i < src->n; i++) l->v[i] = src->v[src->n - 1 - i];
    if (v.t != V_STR) return list_value(l);
    return join(r, line, list_value(l), (str){"", 0});
}

/* items: a dict's [key, value] pairs; an empty list for undefined. */
static value items_filter(render *r, int line, const char *name, value v, const args *a) {
    if (v.t == V_UNDEF) return list_value(mklist(r, 0));
    if (v.t != V_DICT) rerr(r, line, MOE_ERR_INVALID, "items needs a dict, not %s", type_name(v));
    return kv_pairs(r, v.d, false, false);
}

/* replace(old, new, count=-1). */
static value replace_filter(render *r, int line, const char *name, value v, const args *a) {
    value none = {.t = V_NONE};
    return replace(r, to_string(r, v).s, want_str(r, line, arg(a, 0, "old", none), "replace"),
                   want_str(r, line, arg(a, 1, "new", none), "replace"),
                   want_int(r, line, arg(a, 2, "count", mkint(-1)), "replace"));
}

/* safe: the value unchanged (nothing is auto-escaped). */
static value safe_filter(render *r, int line, const char *name, value v, const args *a) { return v; }

/* unique: the items in order, each first occurrence only. */
static value unique_filter(render *r, int line, const char *name, value v, const args *a) {
    vlist *src = iterate(r, line, v), *l = mklist(r, src->n);
    l->n = 0;
    for (size_t i = 0; i < src->n; i++) {
        spend(r, line, l->n); /* quadratic */
        bool seen = false;
        for (size_t j = 0; j < l->n && !seen; j++) seen = equal(r, l->v[j], src->v[i]);
        if (!seen) l->v[l->n++] = src->v[i];
    }
    return list_value(l);
}

/* selectattr, rejectattr. */
static value select_attr_filter(render *r, int line, const char *name, value v, const args *a) {
    return select_items(r, line, v, a, name[0] == 'r', true);
}

/* select, reject. */
static value select_filter(render *r, int line, const char *name, value v, const args *a) {
    return select_items(r, line, v, a, name[0] == 'r', false);
}

/* wordcount: the whitespace-separated words. */
static value wordcount_filter(render *r, int line, const char *name, value v, const args *a) {
    return mkint((int64_t)split(r, to_string(r, v).s, NULL, -1, false).l->n);
}

/* The filters by name (the parser accepts these); one function may serve several names. */
static const struct {
    const char *name;
    value (*fn)(render *r, int line, const char *name, value v, const args *a);
} filters[] = {
    {"trim", trim_filter}, {"length", length_filter}, {"count", length_filter}, {"tojson", tojson_filter},
    {"upper", case_filter}, {"lower", case_filter}, {"title", case_filter}, {"capitalize", case_filter},
    {"first", end_item_filter}, {"last", end_item_filter}, {"join", join_filter}, {"default", default_filter},
    {"d", default_filter}, {"list", list_filter}, {"string", string_filter}, {"int", int_filter},
    {"float", float_filter}, {"abs", abs_filter}, {"reverse", reverse_filter}, {"items", items_filter},
    {"replace", replace_filter}, {"safe", safe_filter}, {"unique", unique_filter},
    {"selectattr", select_attr_filter}, {"rejectattr", select_attr_filter}, {"map", map_items},
    {"dictsort", dictsort}, {"indent", indent_filter}, {"wordcount", wordcount_filter}, {"select", select_filter},
    {"reject", select_filter}, {"sort", sort_items}};

static int filter_index(const char *name) {
    for (size_t i = 0; i < sizeof filters / sizeof filters[0]; i++)
        if (!strcmp(filters[i].name, name)) return (int)i;
    return -1;
}

bool moe_jinja_filter_known(const char *name) { return filter_index(name) >= 0; }

static value apply_filter(render *r, int line, const char *name, value v, const args *a) {
    int i = filter_index(name);
    if (i < 0) rerr(r, line, MOE_ERR_UNSUPPORTED, "filter '%s' is not supported", name);
    return filters[i].fn(r, line, name, v, a);
}

/* ---------- expressions ---------- */

static value eval_bin(render *r, const node *e) {
    value a = eval(r, e->a), b = eval(r, e->b);
    switch (e->op) {
    case OP_EQ: return mkbool(equal(r, a, b));
    case OP_NE: return mkbool(!equal(r, a, b));
    case OP_LT: return mkbool(order(r, e->line, a, b) < 0);
    case OP_LE: return mkbool(order(r, e->line, a, b) <= 0);
    case OP_GT: return mkbool(order(r, e->line, a, b) > 0);
    case OP_GE: return mkbool(order(r, e->line, a, b) >= 0);
    case OP_IN: return mkbool(contains(r, e->line, b, a));
    case OP_NOTIN: return mkbool(!contains(r, e->line, b, a));
    default: return arith(r, e->line, e->op, a, b);
    }
}

static value eval_seq(render *r, const node *e) {
    if (e->kind == E_DICT) {
        vdict *d = ralloc(r, sizeof *d);
        for (size_t i = 0; i + 1 < e->n_kids; i += 2)
            dict_set(r, d, to_string(r, eval(r, e->kids[i])).s, eval(r, e->kids[i + 1]));
        return (value){.t = V_DICT, .d = d};
    }
    vlist *l = mklist(r, e->n_kids);
    l->tuple = e->kind == E_TUPLE;
    for (size_t i = 0; i < e->n_kids; i++) l->v[i] = eval(r, e->kids[i]);
    return list_value(l);
}

static value eval(render *r, const node *e) {
    spend(r, e->line, 1);
    switch (e->kind) {
    case E_LIT: return e->lit;
    case E_NAME: return lookup(r, e->name);
    case E_LIST: case E_TUPLE: case E_DICT: return eval_seq(r, e);
    case E_ATTR: return get_attr(r, e->line, eval(r, e->a), e->name);
    case E_ITEM: return get_item(r, e->line, eval(r, e->a), eval(r, e->b));
    case E_SLICE: {
        value none = {.t = V_NONE};
        return slice(r, e->line, eval(r, e->a), e->b ? eval(r, e->b) : none, e->c ? eval(r, e->c) : none,
                     e->d ? eval(r, e->d) : none);
    }
    case E_CALL: return call(r, e);
    case E_FILTER: {
        value v = eval(r, e->a);
        args a = eval_args(r, e);
        return apply_filter(r, e->line, e->name, v, &a);
    }
    case E_TEST: {
        value v = eval(r, e->a);
        args a = eval_args(r, e);
        return mkbool(run_test(r, e->line, e->name, v, &a) != e->negate);
    }
    case E_NEG: case E_POS: {
        value v = eval(r, e->a);
        if (!is_number(v)) rerr(r, e->line, MOE_ERR_INVALID, "unary minus needs a number, not %s", type_name(v));
        if (e->kind == E_POS) return v;
        return v.t == V_FLOAT ? (value){.t = V_FLOAT, .f = -v.f} : arith(r, e->line, OP_SUB, mkint(0), v);
    }
    case E_NOT: return mkbool(!truthy(eval(r, e->a)));
    case E_AND: {
        value a = eval(r, e->a);
        return truthy(a) ? eval(r, e->b) : a;
    }
    case E_OR: {
        value a = eval(r, e->a);
        return truthy(a) ? a : eval(r, e->b);
    }
    case E_BIN: return eval_bin(r, e);
    case E_COND:
        if (truthy(eval(r, e->b))) return eval(r, e->a);
        return e->c ? eval(r, e->c) : undef("conditional");
    default: rerr(r, e->line, MOE_ERR_INVALID, "not an expression");
    }
}

/* ---------- statements ---------- */

/* Redirects output into a new stream (a macro call, a set block); close_out restores it. */
static stream *open_out(render *r) {
    stream *s = open_stream(r);
    r->out = s->f;
    return s;
}

static value close_out(render *r, stream *s, FILE *saved) {
    r->out = saved;
    return take_stream(r, s);
}

static void bind_target(render *r, const node *s, value item) {
    if (!s->name2) {
        assign(r, s->name, item);
        return;
    }
    vlist *l = iterate(r, s->line, item);
    if (l->n != 2) rerr(r, s->line, MOE_ERR_INVALID, "cannot unpack %zu values into 2 loop variables", l->n);
    assign(r, s->name, l->v[0]);
    assign(r, s->name2, l->v[1]);
}

static vlist *filtered(render *r, const node *s, vlist *items) {
    if (!s->d) return items;
    vlist *out = mklist(r, items->n);
    out->n = 0;
    scope *outer = r->sc;
    for (size_t i = 0; i < items->n; i++) {
        push_scope(r, outer);
        bind_target(r, s, items->v[i]);
        if (truthy(eval(r, s->d))) out->v[out->n++] = items->v[i];
        r->sc = outer;
    }
    return out;
}

static void exec_for(render *r, const node *s) {
    vlist *items = filtered(r, s, iterate(r, s->line, eval(r, s->a)));
    if (!items->n) {
        if (s->c) exec(r, s->c);
        return;
    }
    scope *outer = r->sc;
    int64_t n = (int64_t)items->n;
    for (int64_t i = 0; i < n; i++) {
        push_scope(r, outer);
        bind_target(r, s, items->v[i]);
        vdict *loop = ralloc(r, sizeof *loop);
        static const char *keys[] = {"index", "index0", "revindex", "revindex0", "first", "last", "length",
                                     "previtem", "nextitem"};
        value vals[] = {mkint(i + 1), mkint(i), mkint(n - i), mkint(n - i - 1), mkbool(i == 0), mkbool(i == n - 1),
                        mkint(n), i > 0 ? items->v[i - 1] : undef("previtem"),
                        i + 1 < n ? items->v[i + 1] : undef("nextitem")};
        for (size_t k = 0; k < 9; k++) dict_set(r, loop, (str){keys[k], strlen(keys[k])}, vals[k]);
        assign(r, "loop", (value){.t = V_DICT, .d = loop});
        exec(r, s->b);
        r->sc = outer;
        flow f = r->ctl;
        r->ctl = FLOW_NONE;
        if (f == FLOW_BREAK) break;
    }
}

static void exec_set(render *r, const node *s) {
    value v = eval(r, s->b);
    const node *t = s->a;
    if (t->kind == E_NAME) {
        assign(r, t->name, v);
    } else if (t->kind == E_ATTR) {
        value obj = eval(r, t->a);
        if (obj.t != V_DICT || !obj.d->ns)
            rerr(r, s->line, MOE_ERR_INVALID, "only a namespace() can have attributes set, not %s", type_name(obj));
        dict_set(r, obj.d, mkstr(r, t->name, strlen(t->name)).s, v);
    } else if (t->kind == E_TUPLE) {
        vlist *l = iterate(r, s->line, v);
        if (l->n != t->n_kids)
            rerr(r, s->line, MOE_ERR_INVALID, "cannot unpack %zu values into %zu names", l->n, t->n_kids);
        for (size_t i = 0; i < t->n_kids; i++) {
            if (t->kids[i]->kind != E_NAME) rerr(r, s->line, MOE_ERR_INVALID, "set: expected names to unpack into");
            assign(r, t->kids[i]->name, l->v[i]);
        }
    } else {
        rerr(r, s->line, MOE_ERR_INVALID, "set: cannot assign to this expression");
    }
}

static void exec(render *r, const node *s) {
    spend(r, s->line, 1);
    switch (s->kind) {
    case N_BLOCK:
        for (size_t i = 0; i < s->n_kids && r->ctl == FLOW_NONE; i++) exec(r, s->kids[i]);
        return;
    case N_TEXT: fwrite(s->lit.s.s, 1, s->lit.s.n, r->out); return;
    case N_OUT: write_value(r, r->out, eval(r, s->a), false, 0); return;
    case N_IF:
        for (size_t i = 0; i + 1 < s->n_kids; i += 2)
            if (truthy(eval(r, s->kids[i]))) {
                exec(r, s->kids[i + 1]);
                return;
            }
        if (s->c) exec(r, s->c);
        return;
    case N_FOR: exec_for(r, s); return;
    case N_SET: exec_set(r, s); return;
    case N_SET_BLOCK: {
        FILE *saved = r->out;
        stream *o = open_out(r);
        exec(r, s->b);
        assign(r, s->name, close_out(r, o, saved));
        return;
    }
    case N_BREAK: r->ctl = FLOW_BREAK; return;
    case N_CONTINUE: r->ctl = FLOW_CONTINUE; return;
    case N_MACRO: assign(r, s->name, (value){.t = V_MACRO, .macro = s}); return;
    default: rerr(r, s->line, MOE_ERR_INVALID, "not a statement");
    }
}

moe_status moe_jinja_render(const moe_jinja *t, const cJSON *vars, char **out) {
    MOE_ASSERT(t && out, "moe_jinja_render: NULL argument");
    *out = NULL;
    render *r = calloc(1, sizeof *r);
    if (!r) return moe_error(MOE_ERR_OOM, "out of memory");
    r->t = t;
    moe_status st = MOE_OK;
    if (setjmp(r->fault.jb) == 0) {
        r->global = push_scope(r, NULL);
        const cJSON *e = cJSON_IsObject(vars) ? vars->child : NULL;
        for (; e; e = e->next) assign(r, mkstr(r, e->string, strlen(e->string)).s.s, from_json(r, e));
        r->global = push_scope(r, r->global); /* the template's own top-level variables */
        stream *top = open_out(r);
        exec(r, t->root);
        fclose(top->f);
        top->f = NULL;
        spend_bytes(r, 0, 0);
        *out = top->buf ? top->buf : calloc(1, 1);
        top->buf = NULL;
        if (!*out) st = moe_error(MOE_ERR_OOM, "out of memory");
    } else {
        st = moe_error(r->fault.code, "%s", r->fault.err);
    }
    for (stream *s = r->streams; s; s = s->next) {
        if (s->f) fclose(s->f);
        free(s->buf);
    }
    arena_free(&r->mem);
    free(r);
    return st;
}
