/* The library version and the versions of the backends compiled in. */
#ifndef MOE_CORE_VERSION_H
#define MOE_CORE_VERSION_H

#include <stdio.h>

/* One line per component: "moe 0.1.0", "cpu: oneDNN 2.6.3 (OpenMP, N threads)",
 * "cuda: ..." or "cuda: not built", "mpi: ...", "hdf5: ...", "libyaml: ...". */
void moe_version_print(FILE *f);

#endif
