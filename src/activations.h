/* activations.h: in-place sigmoid and tanh over arrays, written to vectorise.
 *
 * Why not libm: a scalar call to expf/tanhf per gate value made the LSTM gate
 * pass 2.5x slower than a vectorised loop. Float32 uses a Cephes-style
 * polynomial exp (range reduction x = n*ln2 + r, |r| <= ln2/2, degree-6
 * polynomial; about 1 ulp) that the compiler turns into AVX2 code. Float64
 * keeps libm's exp, since the float64 path is the accuracy reference
 * (rel. 1e-9 against NumPy).
 *
 *   sigmoid(x) = 1 / (1 + exp(-x))
 *   tanh(x)    = sign(x) * (1 - 2 / (exp(2|x|) + 1)),  odd polynomial for |x| < 0.625
 *                (the subtraction would cancel digits near 0)
 *
 * NaN in gives NaN out: the clamps are written as comparisons that a NaN fails.
 */
#ifndef FASTRNN_ACTIVATIONS_H
#define FASTRNN_ACTIVATIONS_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stddef.h>
#include "isa.h"  /* FASTRNN_MULTIVERSION */

/* exp(x) for float, vectorisable; x clamped to [-87.3, 88.0] (overflow-free). */
static inline float fastrnn_expf(float x)
{
    x = x > 88.0f ? 88.0f : x;  /* e^88 * 2^0.5 < FLT_MAX */
    x = x < -87.3f ? -87.3f : x;
    /* n = round(x / ln2) by the 1.5*2^23 trick (no libm call, exact for |n| < 2^22) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;          /* ln2 split in two so r is exact */
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;  /* 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float fastrnn_sigmoidf(float x)
{
    return 1.0f / (1.0f + fastrnn_expf(-x));
}

static inline float fastrnn_tanhf(float x)
{
    float ax = fabsf(x);
    float z = x * x;
    float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z
                     - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z
                   - 3.33332819422e-1f) * z * x + x;
    float big = 1.0f - 2.0f / (fastrnn_expf(2.0f * ax) + 1.0f);
    big = x < 0.0f ? -big : big;
    return ax < 0.625f ? small : big;
}

static inline double fastrnn_sigmoidd(double x)
{
    return 1.0 / (1.0 + exp(-x));
}

/* x[i] := sigmoid(x[i]) for i < n */
FASTRNN_MULTIVERSION(fastrnn_sigmoid_s, (float *x, ptrdiff_t n), (x, n), {
    _Pragma("omp simd")
    for (ptrdiff_t i = 0; i < n; ++i) x[i] = fastrnn_sigmoidf(x[i]);
})

/* x[i] := tanh(x[i]) for i < n */
FASTRNN_MULTIVERSION(fastrnn_tanh_s, (float *x, ptrdiff_t n), (x, n), {
    _Pragma("omp simd")
    for (ptrdiff_t i = 0; i < n; ++i) x[i] = fastrnn_tanhf(x[i]);
})

/* y[i] := tanh(x[i]) for i < n */
FASTRNN_MULTIVERSION(fastrnn_tanh_to_s, (float *y, const float *x, ptrdiff_t n), (y, x, n), {
    _Pragma("omp simd")
    for (ptrdiff_t i = 0; i < n; ++i) y[i] = fastrnn_tanhf(x[i]);
})

static void fastrnn_sigmoid_d(double *x, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; ++i) x[i] = fastrnn_sigmoidd(x[i]);
}

static void fastrnn_tanh_d(double *x, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; ++i) x[i] = tanh(x[i]);
}

static void fastrnn_tanh_to_d(double *y, const double *x, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; ++i) y[i] = tanh(x[i]);
}

#endif
