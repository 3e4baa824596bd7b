/* exp for float that vectorises inside an omp simd loop (Cephes expf: 2^n * p(r) with
 * |r| <= ln2 / 2, within 1e-7 relative of exp). Written with integer masks rather than
 * float selects, which GCC would turn into branches: results below 2^-126 flush to 0,
 * above 2^128 give inf, NaN stays NaN. Float kernels use it (softmax, SwiGLU, SiLU);
 * the double kernels (the gradcheck reference) use libm through cpu_exp(). */
#ifndef MOE_CORE_CPU_FAST_MATH_H
#define MOE_CORE_CPU_FAST_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float cpu_expf(float x) {
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t ni = (int32_t)n, xb, yb;
    const int32_t keep = -(ni > -127);
    ni = ni > -127 ? ni : -127;
    ni = ni < 128 ? ni : 128;
    const int32_t bits = (ni + 127) << 23;
    float two_n, y;
    memcpy(&two_n, &bits, sizeof two_n);
    y = p * two_n;
    memcpy(&xb, &x, sizeof xb);
    memcpy(&yb, &y, sizeof yb);
    yb = (yb & keep) | (-((xb & 0x7fffffff) > 0x7f800000) & 0x7fc00000);
    memcpy(&y, &yb, sizeof y);
    return y;
}

static inline double cpu_expd(double x) { return exp(x); }

/* exp picked by the argument's type. */
#define cpu_exp(v) _Generic((v), float: cpu_expf, double: cpu_expd)(v)

#endif
