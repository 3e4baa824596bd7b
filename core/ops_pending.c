/* TEMPORARY: placeholders for ops whose family file is being written. Delete each line
 * when the real op lands; delete the file when empty. */
#include "core/op_internal.h"

moe_tensor *moe_scatter_add(moe_tensor *x, moe_tensor *idx, moe_tensor *src) {
    moe_error(MOE_ERR_UNSUPPORTED, "scatter_add: not implemented yet");
    return NULL;
}
