/* `moe data mqar`: the multi-query associative recall task's token files (moe/train/mqar.h). */
#ifndef MOE_CLI_DATA_MQAR_H
#define MOE_CLI_DATA_MQAR_H

/* The words after `moe data mqar`; returns the exit code (0, 1 runtime error, 2 usage). */
int moe_cmd_data_mqar(int argc, char **argv);

#endif
