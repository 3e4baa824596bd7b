/* Chat-template parser: the Jinja2 subset of jinja.h. The source is cut into text and tags with
 * Jinja's whitespace rules (trim_blocks, lstrip_blocks, - and +), tokenised and parsed into an
 * AST (unsupported names refused here, by name and line); jinja_render.c walks it. The AST lives
 * in the template's arena; a parse error unwinds with longjmp to moe_jinja_parse, which turns
 * it into a moe_status and the message "chat template NAME:LINE: ...". */
#include <ctype.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <utf8proc.h>

#include "moe/hf/jinja_internal.h"

const char *const moe_jinja_tests[] = {
    "defined", "undefined", "none", "string", "number", "integer", "float", "boolean", "true", "false", "mapping",
    "iterable", "sequence", "callable", "even", "odd", "divisibleby", "eq", "equalto", "==", "ne", "!=", "lt", "<",
    "le", "<=", "gt", ">", "ge", ">=", "in", "sameas", NULL};

const char *const moe_jinja_methods[] = {
    "startswith", "endswith", "strip", "lstrip", "rstrip", "split", "rsplit", "upper", "lower", "title",
    "capitalize", "replace", "find", "count", "join", "splitlines", "items", "keys", "values", "get", NULL};

const char *const moe_jinja_funcs[] = {"raise_exception", "namespace", "range", "dict", "strftime_now", NULL};

/* ---------- lexer ---------- */

typedef enum ttype { T_EOF, T_TEXT, T_BLOCK_BEGIN, T_BLOCK_END, T_VAR_BEGIN, T_VAR_END, T_NAME, T_STR, T_INT,
                     T_FLOAT, T_OP } ttype;

typedef struct token {
    ttype type;
    int line;
    const char *s; /* T_NAME, T_OP, T_TEXT, T_STR (decoded): NUL-terminated in the arena */
    size_t n;
    int64_t i;
    double f;
} token;

typedef struct parser {
    const char *name;
    arena *mem;
    token *tk;
    size_t n, cap, pos;
    node **calls; /* name calls, checked once macros are known */
    size_t n_calls, cap_calls;
    const char **macros;
    size_t n_macros, cap_macros;
    int depth; /* nesting of expressions and blocks being parsed */
    jinja_fault fault;
} parser;

#define MAX_NESTING 200 /* deeper templates are refused rather than overflowing the stack */

/* Stops the parse: "chat template NAME:LINE: <message>" (jinja_fail). */
#define perr(p, line, code, ...) jinja_fail(&(p)->fault, (p)->name, line, code, __VA_ARGS__)

/* One level deeper into expressions or blocks; too deep is refused. */
static void enter(parser *p, int line, const char *what) {
    if (++p->depth > MAX_NESTING) perr(p, line, MOE_ERR_UNSUPPORTED, "%s nest deeper than %d", what, MAX_NESTING);
}

static void *palloc(parser *p, size_t n) {
    void *x = arena_alloc(p->mem, n);
    if (!x) perr(p, 0, MOE_ERR_OOM, "out of memory");
    return x;
}

static char *pstrdup(parser *p, const char *s, size_t n) {
    char *c = palloc(p, n + 1);
    memcpy(c, s, n);
    c[n] = '\0';
    return c;
}

static void grow_array(parser *p, void **arr, size_t *cap, size_t need, size_t size) {
    if (need <= *cap) return;
    size_t c = *cap ? 2 * *cap : 16;
    while (c < need) c *= 2;
    void *q = realloc(*arr, c * size);
    if (!q) perr(p, 0, MOE_ERR_OOM, "out of memory");
    *arr = q;
    *cap = c;
}

static token *push_token(parser *p, ttype type, int line) {
    grow_array(p, (void **)&p->tk, &p->cap, p->n + 1, sizeof *p->tk);
    token *t = &p->tk[p->n++];
    *t = (token){.type = type, .line = line};
    return t;
}

static int count_lines(const char *s, size_t n) {
    int k = 0;
    for (size_t i = 0; i < n; i++) k += s[i] == '\n';
    return k;
}

/* A string literal at src[*i] (a quote); decodes Python escapes into the arena. */
static void lex_string(parser *p, const char *src, size_t len, size_t *i, int *line) {
    char q = src[*i];
    size_t j = *i + 1;
    char *out = palloc(p, len - *i + 1);
    size_t n = 0;
    int start_line = *line;
    while (j < len && src[j] != q) {
        char c = src[j++];
        if (c == '\n') (*line)++;
        if (c != '\\' || j >= len) {
            out[n++] = c;
            continue;
        }
        char e = src[j++];
        switch (e) {
        case 'n': out[n++] = '\n'; break;
        case 't': out[n++] = '\t'; break;
        case 'r': out[n++] = '\r'; break;
        case '0': out[n++] = '\0'; break;
        case '\\': case '\'': case '"': out[n++] = e; break;
        case '\n': (*line)++; break;
        case 'u': case 'x': {
            int digits = e == 'u' ? 4 : 2;
            unsigned cp = 0;
            for (int k = 0; k < digits && j < len; k++, j++) {
                char h = src[j];
                cp = cp * 16 + (unsigned)(h >= 'a' ? h - 'a' + 10 : h >= 'A' ? h - 'A' + 10 : h - '0');
            }
            n += (size_t)utf8proc_encode_char((utf8proc_int32_t)cp, (utf8proc_uint8_t *)out + n);
            break;
        }
        default: out[n++] = '\\'; out[n++] = e; break;
        }
    }
    if (j >= len) perr(p, start_line, MOE_ERR_FORMAT, "unterminated string literal");
    out[n] = '\0';
    token *t = push_token(p, T_STR, start_line);
    t->s = out;
    t->n = n;
    *i = j + 1;
}

static const char *OPS2[] = {"**", "//", "==", "!=", "<=", ">=", NULL};

/* Tokens of one tag from src[*i] up to its closing delimiter (`close`: '}' or '%'); returns the
 * whitespace sign before the delimiter ('-', '+' or 0) and leaves *i after it. */
static char lex_tag(parser *p, const char *src, size_t len, size_t *i, int *line, char close) {
    int depth = 0;
    for (;;) {
        while (*i < len && strchr(" \t\r\n", src[*i])) *line += src[(*i)++] == '\n';
        if (*i >= len) perr(p, *line, MOE_ERR_FORMAT, "tag not closed before the end of the template");
        const char *s = src + *i;
        for (int sign = 0; sign < 3 && depth == 0; sign++) {
            const char *pre = sign == 0 ? "" : sign == 1 ? "-" : "+";
            size_t pl = strlen(pre);
            if (!strncmp(s, pre, pl) && s[pl] == close && s[pl + 1] == '}') {
                *i += pl + 2;
                return pre[0];
            }
        }
        char c = *s;
        if (c == '\'' || c == '"') {
            lex_string(p, src, len, i, line);
        } else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_') {
            size_t j = *i;
            while (j < len && (isalnum((unsigned char)src[j]) || src[j] == '_')) j++;
            token *t = push_token(p, T_NAME, *line);
            t->s = pstrdup(p, s, j - *i);
            t->n = j - *i;
            *i = j;
        } else if (c >= '0' && c <= '9') {
            char *end;
            double f = strtod(s, &end);
            size_t k = (size_t)(end - s);
            bool is_float = memchr(s, '.', k) || memchr(s, 'e', k) || memchr(s, 'E', k);
            if (is_float && s[k - 1] == '.') k--, is_float = false; /* "1." is 1 then '.' */
            token *t = push_token(p, is_float ? T_FLOAT : T_INT, *line);
            t->f = f;
            t->i = strtoll(s, NULL, 10);
            *i += k;
        } else {
            size_t k = 1;
            for (int o = 0; OPS2[o]; o++)
                if (!strncmp(s, OPS2[o], 2)) k = 2;
            if (k == 1 && !strchr("+-*/%~<>=()[]{}.,:|!", c))
                perr(p, *line, MOE_ERR_FORMAT, "unexpected character '%c'", c);
            if (k == 1 && c == '!') perr(p, *line, MOE_ERR_FORMAT, "unexpected character '!'");
            if (strchr("([{", c)) depth++;
            if (strchr(")]}", c)) depth--;
            token *t = push_token(p, T_OP, *line);
            t->s = pstrdup(p, s, k);
            t->n = k;
            *i += k;
        }
    }
}

static bool only_blanks(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t') return false;
    return true;
}

/* Text before a tag, with the tag's left whitespace rule applied. */
static void emit_text(parser *p, const char *s, size_t n, int line, char kind, char sign, bool line_starting) {
    if (sign == '-') {
        while (n && strchr(" \t\r\n\v\f", s[n - 1])) n--;
    } else if (kind != '{' && kind != 0 && sign != '+') { /* lstrip_blocks */
        size_t l = n;
        while (l && s[l - 1] != '\n') l--;
        if ((l > 0 || line_starting) && only_blanks(s + l, n - l)) n = l;
    }
    if (!n) return;
    token *t = push_token(p, T_TEXT, line);
    t->s = pstrdup(p, s, n);
    t->n = n;
}

static void lex(parser *p, const char *src) {
    size_t len = strlen(src), i = 0;
    int line = 1;
    bool line_starting = true;
    while (i <= len) {
        size_t k = i;
        while (k + 1 < len && !(src[k] == '{' && strchr("{%#", src[k + 1]))) k++;
        bool tag = k + 1 < len;
        char kind = tag ? src[k + 1] : 0, sign = tag && strchr("-+", src[k + 2]) ? src[k + 2] : 0;
        emit_text(p, src + i, (tag ? k : len) - i, line, kind, sign, line_starting);
        line += count_lines(src + i, (tag ? k : len) - i);
        if (!tag) break;
        i = k + 2 + (sign ? 1 : 0);
        char close_sign;
        if (kind == '#') {
            const char *end = strstr(src + i, "#}");
            if (!end) perr(p, line, MOE_ERR_FORMAT, "comment not closed before the end of the template");
            close_sign = end > src + i && strchr("-+", end[-1]) ? end[-1] : 0;
            line += count_lines(src + i, (size_t)(end - (src + i)));
            i = (size_t)(end - src) + 2;
        } else {
            int at = line;
            push_token(p, kind == '%' ? T_BLOCK_BEGIN : T_VAR_BEGIN, at);
            close_sign = lex_tag(p, src, len, &i, &line, kind == '%' ? '%' : '}');
            push_token(p, kind == '%' ? T_BLOCK_END : T_VAR_END, line);
        }
        line_starting = false;
        if (close_sign == '-') {
            size_t j = i;
            while (j < len && strchr(" \t\r\n\v\f", src[j])) j++;
            line_starting = j > i && src[j - 1] == '\n';
            line += count_lines(src + i, j - i);
            i = j;
        } else if (kind != '{' && close_sign != '+' && i < len && src[i] == '\n') { /* trim_blocks */
            i++;
            line++;
            line_starting = true;
        }
    }
    push_token(p, T_EOF, line);
}

/* ---------- parser: expressions ---------- */

static token *peek(parser *p) { return &p->tk[p->pos]; }
static token *next(parser *p) { return &p->tk[p->pos < p->n - 1 ? p->pos++ : p->pos]; }

static bool is_op(const token *t, const char *op) { return t->type == T_OP && !strcmp(t->s, op); }
static bool is_name(const token *t, const char *nm) { return t->type == T_NAME && !strcmp(t->s, nm); }

static const char *describe(const token *t) {
    switch (t->type) {
    case T_EOF: return "the end of the template";
    case T_BLOCK_END: return "'%}'";
    case T_VAR_END: return "'}}'";
    case T_NAME: case T_OP: return t->s;
    case T_STR: return "a string";
    default: return "a literal";
    }
}

static void expect_op(parser *p, const char *op) {
    token *t = next(p);
    if (!is_op(t, op)) perr(p, t->line, MOE_ERR_FORMAT, "expected '%s', found %s", op, describe(t));
}

static const char *expect_name(parser *p) {
    token *t = next(p);
    if (t->type != T_NAME) perr(p, t->line, MOE_ERR_FORMAT, "expected a name, found %s", describe(t));
    return t->s;
}

static node *mk(parser *p, nkind kind, int line) {
    node *n = palloc(p, sizeof *n);
    n->kind = kind;
    n->line = line;
    return n;
}

static void add_kid(parser *p, node *n, node *kid) {
    node **k = palloc(p, (n->n_kids + 1) * sizeof *k);
    if (n->n_kids) memcpy(k, n->kids, n->n_kids * sizeof *k);
    k[n->n_kids++] = kid;
    n->kids = k;
}

static void add_kw(parser *p, node *n, const char *name, node *val) {
    const char **kn = palloc(p, (n->n_kw + 1) * sizeof *kn);
    node **kv = palloc(p, (n->n_kw + 1) * sizeof *kv);
    if (n->n_kw) {
        memcpy(kn, n->kw_names, n->n_kw * sizeof *kn);
        memcpy(kv, n->kw_vals, n->n_kw * sizeof *kv);
    }
    kn[n->n_kw] = name;
    kv[n->n_kw++] = val;
    n->kw_names = kn;
    n->kw_vals = kv;
}

static node *parse_expr(parser *p);
static node *parse_unary(parser *p, bool with_filter);
static node *parse_or(parser *p);

/* (args) after a callee or filter: positional and name=value. */
static void parse_args(parser *p, node *n) {
    expect_op(p, "(");
    while (!is_op(peek(p), ")")) {
        if (peek(p)->type == T_NAME && is_op(&p->tk[p->pos + 1], "=")) {
            const char *nm = next(p)->s;
            next(p);
            add_kw(p, n, nm, parse_expr(p));
        } else {
            add_kid(p, n, parse_expr(p));
        }
        if (!is_op(peek(p), ",")) break;
        next(p);
    }
    expect_op(p, ")");
}

static node *literal(parser *p, int line, value v) {
    node *n = mk(p, E_LIT, line);
    n->lit = v;
    return n;
}

/* A string literal and the ones right after it, concatenated. */
static node *parse_strings(parser *p, const token *t) {
    node *n = literal(p, t->line, (value){.t = V_STR, .s = {t->s, t->n}});
    while (peek(p)->type == T_STR) { /* adjacent literals concatenate */
        token *u = next(p);
        char *c = palloc(p, n->lit.s.n + u->n + 1);
        memcpy(c, n->lit.s.s, n->lit.s.n);
        memcpy(c + n->lit.s.n, u->s, u->n);
        n->lit.s = (str){c, n->lit.s.n + u->n};
    }
    return n;
}

/* After '(': the empty tuple, a parenthesised expression or a tuple. */
static node *parse_parens(parser *p, int line) {
    if (is_op(peek(p), ")")) {
        next(p);
        return mk(p, E_TUPLE, line);
    }
    node *e = parse_expr(p);
    if (!is_op(peek(p), ",")) {
        expect_op(p, ")");
        return e;
    }
    node *tup = mk(p, E_TUPLE, line);
    add_kid(p, tup, e);
    while (is_op(peek(p), ",")) {
        next(p);
        if (is_op(peek(p), ")")) break;
        add_kid(p, tup, parse_expr(p));
    }
    expect_op(p, ")");
    return tup;
}

/* After '[' or '{': the items of a list, or the key: value pairs of a dict, up to `close`. */
static node *parse_collection(parser *p, nkind kind, int line, const char *close) {
    node *c = mk(p, kind, line);
    while (!is_op(peek(p), close)) {
        add_kid(p, c, parse_expr(p));
        if (kind == E_DICT) {
            expect_op(p, ":");
            add_kid(p, c, parse_expr(p));
        }
        if (!is_op(peek(p), ",")) break;
        next(p);
    }
    expect_op(p, close);
    return c;
}

static node *parse_primary(parser *p) {
    token *t = next(p);
    switch (t->type) {
    case T_STR: return parse_strings(p, t);
    case T_INT: return literal(p, t->line, (value){.t = V_INT, .i = t->i});
    case T_FLOAT: return literal(p, t->line, (value){.t = V_FLOAT, .f = t->f});
    case T_NAME:
        if (!strcmp(t->s, "true") || !strcmp(t->s, "True")) return literal(p, t->line, (value){.t = V_BOOL, .b = true});
        if (!strcmp(t->s, "false") || !strcmp(t->s, "False")) return literal(p, t->line, (value){.t = V_BOOL});
        if (!strcmp(t->s, "none") || !strcmp(t->s, "None")) return literal(p, t->line, (value){.t = V_NONE});
        {
            node *n = mk(p, E_NAME, t->line);
            n->name = t->s;
            return n;
        }
    case T_OP:
        if (is_op(t, "(")) return parse_parens(p, t->line);
        if (is_op(t, "[")) return parse_collection(p, E_LIST, t->line, "]");
        if (is_op(t, "{")) return parse_collection(p, E_DICT, t->line, "}");
        /* fallthrough */
    default:
        perr(p, t->line, MOE_ERR_FORMAT, "unexpected %s in an expression", describe(t));
    }
}

/* [index] or [start:stop:step] */
static node *parse_subscript(parser *p, node *obj, int line) {
    node *parts[3] = {NULL, NULL, NULL};
    int k = 0;
    bool slice = false;
    while (!is_op(peek(p), "]")) {
        if (is_op(peek(p), ":")) {
            next(p);
            if (++k > 2) perr(p, line, MOE_ERR_FORMAT, "a slice has at most three parts");
            slice = true;
            continue;
        }
        if (parts[k]) perr(p, line, MOE_ERR_FORMAT, "expected ':' or ']' in a subscript");
        parts[k] = parse_expr(p);
    }
    expect_op(p, "]");
    node *n = mk(p, slice ? E_SLICE : E_ITEM, line);
    n->a = obj;
    if (!slice) {
        if (!parts[0]) perr(p, line, MOE_ERR_FORMAT, "empty subscript");
        n->b = parts[0];
    } else {
        n->b = parts[0], n->c = parts[1], n->d = parts[2];
    }
    return n;
}

static node *parse_call(parser *p, node *callee) {
    node *n = mk(p, E_CALL, peek(p)->line);
    n->a = callee;
    if (callee->kind == E_ATTR) {
        if (name_index(moe_jinja_methods, callee->name) < 0)
            perr(p, n->line, MOE_ERR_UNSUPPORTED, "method '%s' is not supported", callee->name);
    } else if (callee->kind == E_NAME) {
        grow_array(p, (void **)&p->calls, &p->cap_calls, p->n_calls + 1, sizeof *p->calls);
        p->calls[p->n_calls++] = n;
    } else {
        perr(p, n->line, MOE_ERR_UNSUPPORTED, "only functions, macros and methods can be called");
    }
    parse_args(p, n);
    return n;
}

static node *parse_postfix(parser *p, node *n) {
    for (;;) {
        token *t = peek(p);
        if (is_op(t, ".")) {
            next(p);
            token *a = next(p);
            if (a->type != T_NAME && a->type != T_INT)
                perr(p, a->line, MOE_ERR_FORMAT, "expected an attribute name after '.'");
            node *x = mk(p, a->type == T_NAME ? E_ATTR : E_ITEM, a->line);
            x->a = n;
            if (a->type == T_NAME) x->name = a->s;
            else x->b = literal(p, a->line, (value){.t = V_INT, .i = a->i});
            n = x;
        } else if (is_op(t, "[")) {
            next(p);
            n = parse_subscript(p, n, t->line);
        } else if (is_op(t, "(")) {
            n = parse_call(p, n);
        } else {
            return n;
        }
    }
}

static node *parse_filter(parser *p, node *operand) {
    token *t = next(p); /* '|' */
    node *n = mk(p, E_FILTER, t->line);
    n->a = operand;
    n->name = expect_name(p);
    if (!moe_jinja_filter_known(n->name))
        perr(p, t->line, MOE_ERR_UNSUPPORTED, "filter '%s' is not supported", n->name);
    if (is_op(peek(p), "(")) parse_args(p, n);
    return n;
}

static node *parse_test(parser *p, node *operand) {
    token *t = next(p); /* 'is' */
    node *n = mk(p, E_TEST, t->line);
    n->a = operand;
    if (is_name(peek(p), "not")) {
        next(p);
        n->negate = true;
    }
    token *nm = next(p);
    if (nm->type != T_NAME && nm->type != T_OP) perr(p, nm->line, MOE_ERR_FORMAT, "expected a test name after 'is'");
    n->name = nm->s;
    if (name_index(moe_jinja_tests, n->name) < 0)
        perr(p, t->line, MOE_ERR_UNSUPPORTED, "test '%s' is not supported", n->name);
    token *a = peek(p);
    if (is_op(a, "(")) parse_args(p, n);
    else if (a->type == T_STR || a->type == T_INT || a->type == T_FLOAT ||
             (a->type == T_NAME && !is_name(a, "and") && !is_name(a, "or") && !is_name(a, "else") &&
              !is_name(a, "if") && !is_name(a, "in") && !is_name(a, "not") && !is_name(a, "is")))
        add_kid(p, n, parse_postfix(p, parse_primary(p)));
    return n;
}

static node *parse_filters_and_tests(parser *p, node *n) {
    for (;;) {
        if (is_op(peek(p), "|")) n = parse_filter(p, n);
        else if (is_name(peek(p), "is")) n = parse_test(p, n);
        else if (is_op(peek(p), "(")) n = parse_call(p, n);
        else return n;
    }
}

static node *parse_unary(parser *p, bool with_filter) {
    token *t = peek(p);
    node *n;
    if (is_op(t, "-") || is_op(t, "+")) {
        next(p);
        enter(p, t->line, "expressions");
        n = mk(p, is_op(t, "-") ? E_NEG : E_POS, t->line);
        n->a = parse_unary(p, false);
        p->depth--;
    } else {
        n = parse_postfix(p, parse_primary(p));
    }
    return with_filter ? parse_filters_and_tests(p, n) : n;
}

static node *binary(parser *p, binop op, node *a, node *b, int line) {
    node *n = mk(p, E_BIN, line);
    n->op = op;
    n->a = a;
    n->b = b;
    return n;
}

static node *parse_pow(parser *p) {
    node *n = parse_unary(p, true);
    while (is_op(peek(p), "**")) {
        int line = next(p)->line;
        n = binary(p, OP_POW, n, parse_unary(p, true), line);
    }
    return n;
}

static node *parse_math2(parser *p) {
    node *n = parse_pow(p);
    for (;;) {
        token *t = peek(p);
        binop op = is_op(t, "*") ? OP_MUL : is_op(t, "/") ? OP_DIV : is_op(t, "//") ? OP_FLOORDIV
                 : is_op(t, "%") ? OP_MOD : OP_EQ;
        if (op == OP_EQ) return n;
        next(p);
        n = binary(p, op, n, parse_pow(p), t->line);
    }
}

static node *parse_concat(parser *p) {
    node *n = parse_math2(p);
    while (is_op(peek(p), "~")) {
        int line = next(p)->line;
        n = binary(p, OP_CONCAT, n, parse_math2(p), line);
    }
    return n;
}

static node *parse_math1(parser *p) {
    node *n = parse_concat(p);
    for (;;) {
        token *t = peek(p);
        if (!is_op(t, "+") && !is_op(t, "-")) return n;
        next(p);
        n = binary(p, is_op(t, "+") ? OP_ADD : OP_SUB, n, parse_concat(p), t->line);
    }
}

/* a < b < c is (a < b) and (b < c), as in Python. */
static node *parse_compare(parser *p) {
    node *left = parse_math1(p), *chain = NULL;
    for (;;) {
        token *t = peek(p);
        static const char *ops[] = {"==", "!=", "<", "<=", ">", ">="};
        static const binop codes[] = {OP_EQ, OP_NE, OP_LT, OP_LE, OP_GT, OP_GE};
        binop op = OP_ADD;
        for (int i = 0; i < 6; i++)
            if (is_op(t, ops[i])) op = codes[i];
        if (op == OP_ADD && is_name(t, "in")) op = OP_IN;
        if (op == OP_ADD && is_name(t, "not") && is_name(&p->tk[p->pos + 1], "in")) {
            next(p);
            op = OP_NOTIN;
        }
        if (op == OP_ADD) return chain ? chain : left;
        next(p);
        node *right = parse_math1(p), *cmp = binary(p, op, left, right, t->line);
        if (chain) {
            node *both = mk(p, E_AND, t->line);
            both->a = chain;
            both->b = cmp;
            cmp = both;
        }
        chain = cmp;
        left = right;
    }
}

static node *parse_not(parser *p) {
    if (is_name(peek(p), "not")) {
        node *n = mk(p, E_NOT, next(p)->line);
        enter(p, n->line, "expressions");
        n->a = parse_not(p);
        p->depth--;
        return n;
    }
    return parse_compare(p);
}

static node *parse_and(parser *p) {
    node *n = parse_not(p);
    while (is_name(peek(p), "and")) {
        node *x = mk(p, E_AND, next(p)->line);
        x->a = n;
        x->b = parse_not(p);
        n = x;
    }
    return n;
}

static node *parse_or(parser *p) {
    node *n = parse_and(p);
    while (is_name(peek(p), "or")) {
        node *x = mk(p, E_OR, next(p)->line);
        x->a = n;
        x->b = parse_and(p);
        n = x;
    }
    return n;
}

static node *parse_expr(parser *p) {
    enter(p, peek(p)->line, "expressions");
    node *n = parse_or(p);
    while (is_name(peek(p), "if")) {
        node *c = mk(p, E_COND, next(p)->line);
        c->a = n;
        c->b = parse_or(p);
        if (is_name(peek(p), "else")) {
            next(p);
            c->c = parse_expr(p);
        }
        n = c;
    }
    p->depth--;
    return n;
}

/* expr or a bare tuple "a, b" (for set and for targets / values). */
static node *parse_tuple_expr(parser *p, bool names_only) {
    int line = peek(p)->line;
    node *n = names_only ? parse_primary(p) : parse_expr(p);
    if (names_only && is_op(peek(p), ".")) n = parse_postfix(p, n);
    if (!is_op(peek(p), ",")) return n;
    node *t = mk(p, E_TUPLE, line);
    add_kid(p, t, n);
    while (is_op(peek(p), ",")) {
        next(p);
        add_kid(p, t, names_only ? parse_primary(p) : parse_expr(p));
    }
    return t;
}

/* ---------- parser: statements ---------- */

static void expect_block_end(parser *p) {
    token *t = next(p);
    if (t->type != T_BLOCK_END) perr(p, t->line, MOE_ERR_FORMAT, "expected '%%}', found %s", describe(t));
}

static node *parse_body(parser *p, const char *const *ends, const char **which);

static node *parse_if(parser *p, int line) {
    node *n = mk(p, N_IF, line);
    static const char *ends[] = {"elif", "else", "endif", NULL};
    add_kid(p, n, parse_expr(p));
    for (;;) {
        expect_block_end(p);
        const char *which;
        add_kid(p, n, parse_body(p, ends, &which));
        if (!strcmp(which, "elif")) {
            add_kid(p, n, parse_expr(p));
            continue;
        }
        if (!strcmp(which, "else")) {
            static const char *end_only[] = {"endif", NULL};
            expect_block_end(p);
            n->c = parse_body(p, end_only, &which);
        }
        expect_block_end(p);
        return n;
    }
}

static node *parse_for(parser *p, int line) {
    node *n = mk(p, N_FOR, line);
    n->name = expect_name(p);
    if (is_op(peek(p), ",")) {
        next(p);
        n->name2 = expect_name(p);
    }
    if (!is_name(next(p), "in")) perr(p, line, MOE_ERR_FORMAT, "expected 'in' in a for loop");
    n->a = parse_or(p); /* "if" after it filters */
    if (is_name(peek(p), "if")) {
        next(p);
        n->d = parse_expr(p);
    }
    if (is_name(peek(p), "recursive")) perr(p, line, MOE_ERR_UNSUPPORTED, "recursive for loops are not supported");
    expect_block_end(p);
    static const char *ends[] = {"else", "endfor", NULL};
    const char *which;
    n->b = parse_body(p, ends, &which);
    if (!strcmp(which, "else")) {
        static const char *end_only[] = {"endfor", NULL};
        expect_block_end(p);
        n->c = parse_body(p, end_only, &which);
    }
    expect_block_end(p);
    return n;
}

static node *parse_set(parser *p, int line) {
    node *target = parse_tuple_expr(p, true);
    if (is_op(peek(p), "=")) {
        next(p);
        node *n = mk(p, N_SET, line);
        n->a = target;
        n->b = parse_tuple_expr(p, false);
        expect_block_end(p);
        return n;
    }
    if (target->kind != E_NAME) perr(p, line, MOE_ERR_FORMAT, "expected '=' in set");
    expect_block_end(p);
    node *n = mk(p, N_SET_BLOCK, line);
    n->name = target->name;
    static const char *ends[] = {"endset", NULL};
    const char *which;
    n->b = parse_body(p, ends, &which);
    expect_block_end(p);
    return n;
}

static node *parse_macro(parser *p, int line) {
    node *n = mk(p, N_MACRO, line);
    n->name = expect_name(p);
    expect_op(p, "(");
    while (!is_op(peek(p), ")")) {
        const char *param = expect_name(p);
        node *dflt = NULL;
        if (is_op(peek(p), "=")) {
            next(p);
            dflt = parse_expr(p);
        }
        add_kw(p, n, param, dflt);
        if (!is_op(peek(p), ",")) break;
        next(p);
    }
    expect_op(p, ")");
    expect_block_end(p);
    static const char *ends[] = {"endmacro", NULL};
    const char *which;
    n->b = parse_body(p, ends, &which);
    if (peek(p)->type == T_NAME) next(p); /* {% endmacro name %} */
    expect_block_end(p);
    grow_array(p, (void **)&p->macros, &p->cap_macros, p->n_macros + 1, sizeof *p->macros);
    p->macros[p->n_macros++] = n->name;
    return n;
}

/* One {% ... %} statement whose keyword was just read. */
static node *parse_statement(parser *p, token *kw) {
    const char *k = kw->s;
    if (!strcmp(k, "if")) return parse_if(p, kw->line);
    if (!strcmp(k, "for")) return parse_for(p, kw->line);
    if (!strcmp(k, "set")) return parse_set(p, kw->line);
    if (!strcmp(k, "macro")) return parse_macro(p, kw->line);
    if (!strcmp(k, "break") || !strcmp(k, "continue")) {
        expect_block_end(p);
        return mk(p, !strcmp(k, "break") ? N_BREAK : N_CONTINUE, kw->line);
    }
    if (!strcmp(k, "generation")) { /* transformers' assistant-mask marker: plain text here */
        expect_block_end(p);
        static const char *ends[] = {"endgeneration", NULL};
        const char *which;
        node *body = parse_body(p, ends, &which);
        expect_block_end(p);
        return body;
    }
    perr(p, kw->line, MOE_ERR_UNSUPPORTED, "statement '%s' is not supported", k);
}

/* Statements up to {% <one of ends> %}; *which gets the end keyword (the parser stands after
 * it). ends == NULL: up to the end of the template. */
static node *parse_body(parser *p, const char *const *ends, const char **which) {
    enter(p, peek(p)->line, "blocks");
    node *body = mk(p, N_BLOCK, peek(p)->line);
    for (;;) {
        token *t = next(p);
        if (t->type == T_EOF) {
            size_t last = 0;
            while (ends && ends[last + 1]) last++;
            if (ends) perr(p, t->line, MOE_ERR_FORMAT, "missing {%% %s %%} before the end of the template", ends[last]);
            p->depth--;
            return body;
        }
        if (t->type == T_TEXT) {
            node *n = mk(p, N_TEXT, t->line);
            n->lit = (value){.t = V_STR, .s = {t->s, t->n}};
            add_kid(p, body, n);
        } else if (t->type == T_VAR_BEGIN) {
            node *n = mk(p, N_OUT, t->line);
            n->a = parse_expr(p);
            token *e = next(p);
            if (e->type != T_VAR_END) perr(p, e->line, MOE_ERR_FORMAT, "expected '}}', found %s", describe(e));
            add_kid(p, body, n);
        } else if (t->type == T_BLOCK_BEGIN) {
            token *kw = next(p);
            if (kw->type != T_NAME) perr(p, kw->line, MOE_ERR_FORMAT, "expected a statement name after '{%%'");
            for (size_t i = 0; ends && ends[i]; i++)
                if (!strcmp(kw->s, ends[i])) {
                    *which = ends[i];
                    p->depth--;
                    return body;
                }
            if (!strncmp(kw->s, "end", 3) || !strcmp(kw->s, "elif") || !strcmp(kw->s, "else"))
                perr(p, kw->line, MOE_ERR_FORMAT, "unexpected {%% %s %%}", kw->s);
            add_kid(p, body, parse_statement(p, kw));
        } else {
            perr(p, t->line, MOE_ERR_FORMAT, "unexpected %s", describe(t));
        }
    }
}

moe_status moe_jinja_parse(moe_jinja **out, const char *source, const char *name) {
    MOE_ASSERT(out && source, "moe_jinja_parse: NULL argument");
    *out = NULL;
    moe_jinja *t = calloc(1, sizeof *t);
    if (!t || !(t->name = strdup(name ? name : "<string>"))) {
        free(t);
        return moe_error(MOE_ERR_OOM, "out of memory");
    }
    parser *p = calloc(1, sizeof *p);
    if (!p) {
        moe_jinja_free(t);
        return moe_error(MOE_ERR_OOM, "out of memory");
    }
    p->name = t->name;
    p->mem = &t->mem;
    moe_status st = MOE_OK;
    if (setjmp(p->fault.jb) == 0) {
        lex(p, source);
        t->root = parse_body(p, NULL, NULL);
        for (size_t i = 0; i < p->n_calls; i++) {
            const char *fn = p->calls[i]->a->name;
            bool known = name_index(moe_jinja_funcs, fn) >= 0;
            for (size_t m = 0; !known && m < p->n_macros; m++) known = !strcmp(p->macros[m], fn);
            if (!known) perr(p, p->calls[i]->line, MOE_ERR_UNSUPPORTED, "function '%s' is not supported", fn);
        }
    } else {
        st = moe_error(p->fault.code, "%s", p->fault.err);
    }
    free(p->tk);
    free(p->calls);
    free(p->macros);
    free(p);
    if (st != MOE_OK) {
        moe_jinja_free(t);
        return st;
    }
    *out = t;
    return MOE_OK;
}

void moe_jinja_free(moe_jinja *t) {
    if (!t) return;
    arena_free(&t->mem);
    free(t->name);
    free(t);
}
