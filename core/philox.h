/* Philox4x32-10 counter-based RNG (Salmon et al., SC'11), header-only so the CPU code
 * and the CUDA kernels draw the same numbers: element i of a tensor takes counter i. */
#ifndef MOE_CORE_PHILOX_H
#define MOE_CORE_PHILOX_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define MOE_HD __host__ __device__ __forceinline__
#else
#define MOE_HD static inline
#endif

typedef struct { uint32_t v[4]; } moe_philox_u4;

MOE_HD moe_philox_u4 moe_philox4x32(uint64_t counter, uint64_t key) {
    uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1;
        c3 = (uint32_t)p0;
        c0 = n0;
        c2 = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    moe_philox_u4 out = {{c0, c1, c2, c3}};
    return out;
}

/* Uniform in (0, 1) from 32 random bits. */
MOE_HD double moe_philox_unit(uint32_t bits) { return ((double)bits + 0.5) * (1.0 / 4294967296.0); }

/* One standard normal (Box-Muller on the first two words of the block). */
MOE_HD double moe_philox_normal(uint64_t counter, uint64_t key) {
    moe_philox_u4 r = moe_philox4x32(counter, key);
    double u1 = moe_philox_unit(r.v[0]), u2 = moe_philox_unit(r.v[1]);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

MOE_HD double moe_philox_uniform(uint64_t counter, uint64_t key) {
    return moe_philox_unit(moe_philox4x32(counter, key).v[0]);
}

#endif
