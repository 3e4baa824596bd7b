/* The routing commands of offloaded inference: `moe trace` records a model's routes on
 * text, `moe predictor train|eval` trains and evaluates the routing-path predictor on
 * them (moe/offload/trace.h, predictor.h, schedule.h). Each takes the words after its
 * name and returns the exit code: 0, 1 for a runtime error, 2 for a usage error. */
#ifndef MOE_CLI_ROUTING_H
#define MOE_CLI_ROUTING_H

int moe_cmd_trace(int argc, char **argv);     /* trace.c */
int moe_cmd_predictor(int argc, char **argv); /* predictor.c */

#endif
