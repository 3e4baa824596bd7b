/* Internals shared by the chat-template parser (jinja.c) and renderer (jinja_render.c): the
 * arena, the value and AST types, and the names of the supported filters, tests, methods and
 * functions. Not part of the API (jinja.h is). */
#ifndef MOE_HF_JINJA_INTERNAL_H
#define MOE_HF_JINJA_INTERNAL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe/hf/jinja.h"

/* ---------- arena ---------- */

typedef struct arena_chunk {
    struct arena_chunk *next;
    size_t used, cap;
    max_align_t data[];
} arena_chunk;

typedef struct arena {
    arena_chunk *head;
} arena;

/* NULL only when out of memory. */
static inline void *arena_alloc(arena *a, size_t n) {
    n = (n + sizeof(max_align_t) - 1) / sizeof(max_align_t) * sizeof(max_align_t);
    if (!a->head || a->head->used + n > a->head->cap) {
        size_t cap = n > 65536 ? n : 65536;
        arena_chunk *c = malloc(sizeof *c + cap);
        if (!c) return NULL;
        c->next = a->head;
        c->used = 0;
        c->cap = cap;
        a->head = c;
    }
    void *p = (char *)a->head->data + a->head->used;
    a->head->used += n;
    memset(p, 0, n);
    return p;
}

static inline void arena_free(arena *a) {
    while (a->head) {
        arena_chunk *next = a->head->next;
        free(a->head);
        a->head = next;
    }
}

/* ---------- values ---------- */

typedef struct str {
    const char *s;
    size_t n;
} str;

typedef enum vtype { V_UNDEF, V_NONE, V_BOOL, V_INT, V_FLOAT, V_STR, V_LIST, V_DICT, V_FUNC, V_METHOD, V_MACRO } vtype;

typedef struct value value;
typedef struct vlist {
    value *v;
    size_t n;
    bool tuple; /* prints as (a, b) */
} vlist;
typedef struct vdict {
    str *k;
    value *v;
    size_t n, cap;
    bool ns; /* a namespace(): attributes may be set */
} vdict;
struct node;

struct value {
    vtype t;
    union {
        bool b;
        int64_t i;
        double f;
        str s;           /* V_STR; V_UNDEF: the missing name */
        vlist *l;
        vdict *d;
        int fn;          /* V_FUNC */
        const struct node *macro;
        struct {
            value *self;
            const char *name;
        } m;             /* V_METHOD */
    };
};

/* ---------- AST ---------- */

typedef enum nkind {
    N_TEXT, N_OUT, N_BLOCK, N_IF, N_FOR, N_SET, N_SET_BLOCK, N_BREAK, N_CONTINUE, N_MACRO,
    E_LIT, E_NAME, E_LIST, E_TUPLE, E_DICT, E_ATTR, E_ITEM, E_SLICE, E_CALL, E_FILTER, E_TEST,
    E_NEG, E_POS, E_NOT, E_AND, E_OR, E_BIN, E_COND
} nkind;

typedef enum binop {
    OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_FLOORDIV, OP_MOD, OP_POW, OP_CONCAT,
    OP_EQ, OP_NE, OP_LT, OP_LE, OP_GT, OP_GE, OP_IN, OP_NOTIN
} binop;

typedef struct node {
    nkind kind;
    int line;
    binop op;
    bool negate;      /* E_TEST: is not */
    const char *name; /* E_NAME, E_ATTR, E_FILTER, E_TEST, N_SET_BLOCK, N_MACRO; N_FOR: the first target */
    const char *name2; /* N_FOR: the second target */
    value lit;        /* E_LIT, N_TEXT */
    struct node *a, *b, *c, *d;
    struct node **kids;
    size_t n_kids;
    const char **kw_names; /* E_CALL / E_FILTER keyword arguments; N_MACRO parameters */
    struct node **kw_vals;
    size_t n_kw;
} node;

struct moe_jinja {
    arena mem;
    node *root;
    char *name;
};

/* ---------- names the parser accepts (NULL-terminated; the renderer dispatches on the index) ---------- */

extern const char *const moe_jinja_tests[], *const moe_jinja_methods[], *const moe_jinja_funcs[];

/* True for a filter the renderer has (its table of filters is the one list of them). */
bool moe_jinja_filter_known(const char *name);

typedef enum func { F_RAISE, F_NAMESPACE, F_RANGE, F_DICT, F_STRFTIME } func;

static inline int name_index(const char *const *names, const char *s) {
    for (int i = 0; names[i]; i++)
        if (!strcmp(names[i], s)) return i;
    return -1;
}

/* ---------- errors ---------- */

/* A parse or a render stops at its first error and unwinds to its entry point, which did
 * setjmp(f->jb) and then returns moe_error(f->code, "%s", f->err). */
typedef struct jinja_fault {
    jmp_buf jb;
    moe_status code;
    char err[600];
} jinja_fault;

/* Records code and "chat template NAME:LINE: <message>" in f, then unwinds to f->jb. */
static inline _Noreturn void jinja_fail(jinja_fault *f, const char *name, int line, moe_status code,
                                        const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static inline _Noreturn void jinja_fail(jinja_fault *f, const char *name, int line, moe_status code,
                                        const char *fmt, ...) {
    char msg[480];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    snprintf(f->err, sizeof f->err, "chat template %s:%d: %s", name, line, msg);
    f->code = code;
    longjmp(f->jb, 1);
}

#endif
