/* The `moe` commands that run a model or its tokenizer, from a hub folder (--model DIR) or
 * one of our checkpoints (--checkpoint FILE). Each takes the words after its name and
 * returns the process exit code: 0, 1 for a runtime error, 2 for a usage or config error. */
#ifndef MOE_CLI_COMMANDS_H
#define MOE_CLI_COMMANDS_H

int moe_cmd_generate(int argc, char **argv); /* generate.c */
int moe_cmd_eval(int argc, char **argv);     /* eval.c */
int moe_cmd_tokenize(int argc, char **argv); /* tokenize.c */
int moe_cmd_logits(int argc, char **argv);   /* logits.c */
int moe_cmd_convert(int argc, char **argv);  /* convert.c */

#endif
