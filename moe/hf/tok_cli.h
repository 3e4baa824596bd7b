/* `moe tokenize`: a Hugging Face model folder's tokenizer from the command line (encode,
 * decode, chat template, encode speed). */
#ifndef MOE_HF_TOK_CLI_H
#define MOE_HF_TOK_CLI_H

/* argv: the words after "tokenize". Returns the exit code (0, 1 runtime error, 2 usage). */
int moe_cli_tokenize(int argc, char **argv);

#endif
