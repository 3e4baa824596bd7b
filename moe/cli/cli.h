/* What every `moe` command shares: the exit code of a failure, the flag parse with --help
 * and positional checks, reading a text file, and token id lists from the command line. */
#ifndef MOE_CLI_CLI_H
#define MOE_CLI_CLI_H

#include <stddef.h>

#include "core/status.h"
#include "moe/cli/args.h"
#include "moe/model/config.h"
#include "moe/model/tokenizer.h"

/* Prints "moe: error (STATUS): message" and returns the exit code: 2 for a usage or config
 * error, 130 for an interruption, else 1. */
int moe_cli_fail(moe_status s);

/* Parses a command's flags (moe_args_parse) and checks that it got lo..hi positional
 * arguments (`what` names them: "CONFIG.yaml is"). Returns -1 to go on (the caller then owns
 * *a: moe_args_free), else the exit code: 0 after --help, 2 after a usage error (both printed). */
int moe_cli_parse(const char *cmd, const char *usage_line, const moe_flag_spec *specs, int argc, char **argv, int lo,
                  int hi, const char *what, moe_args *a);

/* A whole file ("-": standard input) into a malloc'd NUL-terminated buffer of *len bytes. */
moe_status moe_cli_read_text(const char *path, char **text, size_t *len);

/* Whether a list of token ids may be empty (decoding nothing is fine, a prompt of nothing is not). */
typedef enum moe_cli_ids_empty { MOE_IDS_EMPTY_REFUSED, MOE_IDS_EMPTY_ALLOWED } moe_cli_ids_empty;

/* "5,17,42" (commas and/or spaces) -> ids appended to *ids; `flag` names the list in
 * messages. Each id must be an integer in [0, vocab) (vocab <= 0: no upper bound); anything
 * else is MOE_ERR_CONFIG naming the flag and the offending entry, and so is an empty list
 * when `empty` refuses it. */
moe_status moe_cli_parse_ids(const char *flag, const char *list, int vocab, moe_cli_ids_empty empty,
                             moe_token_buf *ids);

/* Text files ("-": standard input) concatenated into one malloc'd NUL-terminated buffer. */
moe_status moe_cli_read_texts(const char *const *paths, int n, char **text, size_t *len);

/* Every "section.key=value" of a --set list, in order (moe_config_set). */
moe_status moe_cli_apply_sets(moe_config *cfg, const moe_arg_list *sets);

#endif
