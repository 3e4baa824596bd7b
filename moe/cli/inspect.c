/* `moe inspect`: a checkpoint's datasets and config; --verify checks every CRC. */
#include "moe/cli/commands.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/h5file.h"
#include "moe/cli/cli.h"
#include "moe/model/weights.h"

static moe_status print_dataset(const char *name, void *user) {
    moe_h5 *f = user;
    moe_h5_dtype dt;
    int nd = 0;
    int64_t shape[MOE_H5_MAX_NDIM];
    if (moe_h5_shape(f, name, &dt, &nd, shape) != MOE_OK) { /* not an array: a text dataset */
        char *text = NULL;
        MOE_TRY(moe_h5_get_string(f, name, &text));
        printf("  %-48s text (%zu bytes)\n", name, strlen(text));
        free(text);
        return MOE_OK;
    }
    printf("  %-48s %s [", name, moe_h5_dtype_name(dt));
    for (int i = 0; i < nd; i++) printf(i ? ", %lld" : "%lld", (long long)shape[i]);
    printf("]\n");
    return MOE_OK;
}

/* The header line, the datasets and the stored config; the step, version and config
 * are read with their CRC checked, so a damaged value is an error, never shown. */
static moe_status inspect(const char *path) {
    moe_h5 *f = NULL;
    MOE_TRY(moe_h5_open(path, &f));
    int64_t step = 0;
    char *ver = NULL, *cfg = NULL, *run = NULL;
    moe_status s = moe_h5_get_i64(f, "step", &step);
    if (s == MOE_OK) s = moe_h5_get_string(f, "version", &ver);
    if (s == MOE_OK && moe_h5_has(f, "run_id")) s = moe_h5_get_string(f, "run_id", &run);
    if (s == MOE_OK) s = moe_h5_get_string(f, "config", &cfg);
    if (s == MOE_OK) printf("%s: step %lld, written by moe %s, run %s\n", path, (long long)step, ver, run ? run : "-");
    if (s == MOE_OK) s = moe_h5_list(f, "", print_dataset, f);
    if (s == MOE_OK) printf("config:\n%s", cfg);
    free(ver);
    free(run);
    free(cfg);
    moe_h5_close(f);
    return s;
}

int moe_cmd_inspect(int argc, char **argv) {
    bool verify = false;
    const moe_flag_spec specs[] = {
        {"--verify", MOE_FLAG_BOOL, NULL, 0, 0, NULL, "read every dataset and check its CRC-32; exit 1 on damage", &verify},
        {0}};
    moe_args a;
    int rc = moe_cli_parse("inspect", "moe inspect CHECKPOINT.h5 [--verify]", specs, argc, argv, 1, 1,
                           "CHECKPOINT.h5 is", &a);
    if (rc >= 0) return rc;
    const char *path = a.positional[0];
    moe_status s = inspect(path);
    if (s == MOE_OK && verify) s = moe_checkpoint_verify(path);
    if (s == MOE_OK && verify) printf("verified: every dataset matches its CRC-32\n");
    moe_args_free(&a);
    return s == MOE_OK ? 0 : moe_cli_fail(s);
}
