/* `moe serve` (serve_cli.c): the OpenAI-compatible HTTP server; argv are the words after
 * "serve". Returns the exit code (0 after a signal-initiated stop, 2 for usage errors). */
#ifndef MOE_SERVE_SERVE_CLI_H
#define MOE_SERVE_SERVE_CLI_H

int moe_cli_serve(int argc, char **argv);

#endif
