/* Helper for scripts/test-mpi-kill.sh: rank 2 dies mid-run while every other rank waits
 * in an all-reduce that can never complete, to show that the job ends (non-zero, naming
 * the rank) instead of hanging. argv[1] picks the death:
 *   kill   raise(SIGKILL)                     (a process killed from outside)
 *   abort  abort()                            (a crash: SIGABRT)
 *   moe    moe_dist_abort(MOE_ERR_IO, ...)    (the CLI's path for a fatal status) */
#include "core/dist.h"

#include <signal.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    const char *how = argc > 1 ? argv[1] : "kill";
    moe_status s = moe_dist_init(&argc, &argv, 1);
    if (s != MOE_OK) moe_dist_abort(s, moe_last_error());
    if (moe_dist_world_rank() == 2) {
        sleep(1); /* let the others block in the all-reduce first */
        if (strcmp(how, "abort") == 0) abort();
        if (strcmp(how, "moe") == 0) moe_dist_abort(MOE_ERR_IO, "disk full writing ckpt.h5");
        raise(SIGKILL);
    }
    double v = 1.0;
    s = moe_dist_allreduce_f64(MOE_GROUP_WORLD, &v, 1);
    /* Not reached while rank 2 is dead: the launcher ends this rank first. */
    fprintf(stderr, "rank %d: all-reduce returned %s\n", moe_dist_world_rank(),
            moe_status_name(s));
    moe_dist_finalize();
    return 0;
}
