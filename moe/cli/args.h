/* One strict command-line parser for every `moe` command.
 *
 * A command describes its flags in a table of moe_flag_spec (ended by an entry whose
 * name is NULL); each entry says the flag's kind, its accepted range or choices, a help
 * line and where the parsed value goes. moe_args_parse walks argv once:
 *   - `--name VALUE` and `--name=VALUE` both work; a value may start with '-' (so
 *     `--tokens -1` is refused for its range, not taken for a flag);
 *   - integers go through strtoll and numbers through strtod with a full-string check,
 *     then a range check (NaN and infinities are refused); the message names the flag,
 *     the value and the accepted range;
 *   - an unknown flag is refused with the nearest known one:
 *     "unknown flag --resum (did you mean --resume?)";
 *   - `--help` / `-h` sets moe_args.help (the caller prints moe_args_print_help);
 *   - anything else (and everything after `--`, and `-` alone) is positional.
 * Every fault is MOE_ERR_CONFIG with the message in moe_last_error() (the program exits 2).
 *
 * Defaults are whatever the destinations hold before the call; --help prints them. */
#ifndef MOE_CLI_ARGS_H
#define MOE_CLI_ARGS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "core/status.h"

typedef enum moe_flag_kind {
    MOE_FLAG_BOOL,   /* takes no value: *(bool *)dest = true */
    MOE_FLAG_INT,    /* *(int *)dest, an integer in [min, max] */
    MOE_FLAG_I64,    /* *(int64_t *)dest, an integer in [min, max] (|bounds| < 2^53) */
    MOE_FLAG_DOUBLE, /* *(double *)dest, a finite number in [min, max] */
    MOE_FLAG_STRING, /* *(const char **)dest = the argv entry; `choices` ("cpu|cuda") limits it */
    MOE_FLAG_MULTI,  /* repeatable string: appended to *(moe_arg_list *)dest */
} moe_flag_kind;

/* The values of a repeatable flag, in command-line order; the strings are argv's.
 * Zero-initialise; moe_arg_list_free releases the array. */
typedef struct moe_arg_list {
    const char **items;
    int n;
} moe_arg_list;

typedef struct moe_flag_spec {
    const char *name;    /* with the dashes: "--tokens" */
    moe_flag_kind kind;
    const char *metavar; /* the value's name in --help ("N", "FILE"); NULL for BOOL */
    double min, max;     /* INT / I64 / DOUBLE: the inclusive accepted range */
    const char *choices; /* STRING: the accepted values separated by '|', or NULL for any */
    const char *help;    /* one line */
    void *dest;
    bool min_excluded, max_excluded; /* an open end of the range: (0, 1) */
    const char *default_text; /* --help shows this as the default instead of dest's value (a
                               * default decided later, e.g. "the model's"), or NULL */
} moe_flag_spec;

/* What is left after the flags. */
typedef struct moe_args {
    const char **positional; /* argv entries that are not flags or their values, in order */
    int n_positional;
    bool help;               /* --help or -h was given (nothing else was checked after it) */
} moe_args;

/* Parses argv[0..argc) (the words after the command name) against `specs`, writing each
 * flag's value to its destination. `command` names the command in messages ("generate").
 * On MOE_OK release `out` with moe_args_free (and MULTI lists with moe_arg_list_free);
 * on failure nothing needs releasing except MULTI lists. */
moe_status moe_args_parse(const char *command, const moe_flag_spec *specs, int argc, char **argv,
                          moe_args *out);
void moe_args_free(moe_args *a);
void moe_arg_list_free(moe_arg_list *l);

/* `usage` (e.g. "moe generate --checkpoint FILE [flags]"), then one line per flag: name,
 * value, help, accepted range or choices and the current value of its destination. */
void moe_args_print_help(FILE *f, const char *usage, const moe_flag_spec *specs);

#endif
