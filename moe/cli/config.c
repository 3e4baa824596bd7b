/* `moe config`: the effective config of a file with its --set overrides. */
#include "moe/cli/commands.h"

#include <stdio.h>

#include "moe/cli/cli.h"
#include "moe/model/config.h"

int moe_cmd_config(int argc, char **argv) {
    moe_arg_list sets = {0};
    const moe_flag_spec specs[] = {
        {"--set", MOE_FLAG_MULTI, "KEY=VALUE", 0, 0, NULL, "override a config key (section.key=value)", &sets}, {0}};
    moe_args a;
    int rc = moe_cli_parse("config", "moe config CONFIG.yaml [--set section.key=value ...]", specs, argc, argv, 1, 1,
                           "CONFIG.yaml is", &a);
    if (rc < 0) {
        moe_config cfg;
        moe_status s = moe_config_load_file(&cfg, a.positional[0]);
        if (s == MOE_OK) s = moe_cli_apply_sets(&cfg, &sets);
        if (s == MOE_OK) s = moe_config_validate(&cfg);
        if (s == MOE_OK) moe_config_write(&cfg, stdout);
        rc = s == MOE_OK ? 0 : moe_cli_fail(s);
        moe_args_free(&a);
    }
    moe_arg_list_free(&sets);
    return rc;
}
