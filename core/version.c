/* Version report for `moe --version`. */
#include "core/version.h"

#include <hdf5.h>
#include <omp.h>
#include <yaml.h>

#ifdef MOE_HAVE_MPI
#include <mpi.h>
#endif

const char *moe_cpu_dnnl_version(void);
const char *moe_cuda_describe(void) __attribute__((weak));

void moe_version_print(FILE *f) {
    fprintf(f, "moe %s\n", MOE_VERSION);
    fprintf(f, "cpu: oneDNN %s, OpenMP %d threads\n", moe_cpu_dnnl_version(), omp_get_max_threads());
    fprintf(f, "%s\n", moe_cuda_describe ? moe_cuda_describe() : "cuda: not built");
#ifdef MOE_HAVE_MPI
    char lib[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    MPI_Get_library_version(lib, &len);
    for (int i = 0; i < len; i++)
        if (lib[i] == '\n' || lib[i] == ',') { lib[i] = '\0'; break; }
    fprintf(f, "mpi: %s\n", lib);
#else
    fprintf(f, "mpi: not built\n");
#endif
    unsigned maj, min, rel;
    H5get_libversion(&maj, &min, &rel);
    fprintf(f, "hdf5: %u.%u.%u\n", maj, min, rel);
    fprintf(f, "libyaml: %s\n", yaml_get_version_string());
}
