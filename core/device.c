/* Device availability and synchronisation through the backend table (see device.h). */
#include "core/device.h"

#include "core/graph.h"
#include "core/kernels.h"

static moe_status unavailable(moe_device dev, moe_status prior) {
    /* moe_backend_get leaves its reason in the error slot when the backend exists but
     * found no device; a build without the backend leaves nothing to quote. */
    if (prior != MOE_OK)
        return moe_error_context(MOE_ERR_UNSUPPORTED, "no %s device", moe_device_name(dev));
    return moe_error(MOE_ERR_UNSUPPORTED, "no %s device: this build has no %s backend (configure with -DMOE_CUDA=ON)",
                     moe_device_name(dev), moe_device_name(dev));
}

bool moe_device_available(moe_device dev) {
    moe_error_clear();
    if (moe_backend_get(dev)) return true;
    unavailable(dev, moe_last_status());
    return false;
}

moe_status moe_device_sync(moe_device dev) {
    moe_error_clear();
    const moe_backend *be = moe_backend_get(dev);
    if (!be) return unavailable(dev, moe_last_status());
    MOE_TRY(moe_graph_guard(dev, "a wait for the device"));
    return be->sync();
}
