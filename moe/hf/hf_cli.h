/* `moe hf-logits` and `moe hf-convert` (see hf_cli.c for the flags). argv[0] is the
 * subcommand's name; the return value is the process exit code (0 ok, 1 runtime error,
 * 2 usage or config error). */
#ifndef MOE_HF_HF_CLI_H
#define MOE_HF_HF_CLI_H

int moe_cli_logits(int argc, char **argv);
int moe_cli_convert(int argc, char **argv);

#endif
