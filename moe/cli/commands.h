/* The `moe` commands, one file each (moe/cli/main.c dispatches; the routing commands are in
 * routing.h). Each takes the words after its name and returns the process exit code: 0,
 * 1 for a runtime error, 2 for a usage or config error (128 + signal for a stopped run). */
#ifndef MOE_CLI_COMMANDS_H
#define MOE_CLI_COMMANDS_H

int moe_cmd_generate(int argc, char **argv); /* generate.c */
int moe_cmd_eval(int argc, char **argv);     /* eval.c */
int moe_cmd_tokenize(int argc, char **argv); /* tokenize.c */
int moe_cmd_logits(int argc, char **argv);   /* logits.c */
int moe_cmd_convert(int argc, char **argv);  /* convert.c */
int moe_cmd_train(int argc, char **argv);     /* train.c */
int moe_cmd_data(int argc, char **argv);      /* data.c: data prepare | mqar */
int moe_cmd_tokenizer(int argc, char **argv); /* tokenizer.c: tokenizer train */
int moe_cmd_inspect(int argc, char **argv);   /* inspect.c */
int moe_cmd_config(int argc, char **argv);    /* config.c */
int moe_cmd_bench(int argc, char **argv);     /* bench.c */
int moe_cmd_serve(int argc, char **argv);     /* serve.c */

#endif
