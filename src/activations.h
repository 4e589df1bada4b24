/* activations.h: scalar sigmoid and tanh, written so that the pointwise passes'
 * `omp simd` loops (rnn_pointwise.h, lstm_pointwise.h, gru_pointwise.h) vectorise.
 *
 * Why not libm: a scalar call to expf/tanhf per gate value made the LSTM gate
 * pass 2.5x slower than a vectorised loop. Float32 uses a Cephes-style
 * polynomial exp (range reduction x = n*ln2 + r, |r| <= ln2/2, then
 * expm1(r) = r + r^2 P(r) with P of degree 5; about 1 ulp) that the compiler
 * vectorises:
 *
 *   sigmoid(x) = 1 / (1 + exp(-x))
 *   tanh(x)    = e / (e + 2),  e = expm1(2x)
 *
 * tanh through expm1 has no cancellation near 0 (expm1 keeps its relative
 * accuracy there) and no branch: one range reduction, one polynomial and one
 * division per value. The former form, sign(x) * (1 - 2 / (exp(2|x|) + 1))
 * with an odd polynomial below |x| = 0.625, computed both branches in every
 * lane; the LSTM forward pass went from 2.8 to 2.5 ns a unit (Zen 4, AVX-512).
 *
 * Float64 uses the same range reduction and a rational exp, 2^n P(r) / Q(r)
 * (fastrnn_exp_pade_d), whose division is folded into the one sigmoid and tanh
 * make anyway. Within 7e-16 relative of long-double libm over [-40, 40] in a C
 * check; tests/test_isa.py holds tanh to 2e-15 and sigmoid to 3e-15 of NumPy,
 * relative, under every ISA. It replaced a degree-13 series for expm1 (within
 * 4e-16): the float64 LSTM pass went from 5.4 to 3.8 ns a unit (one Zen 4 core,
 * AVX-512, a throw-away C loop).
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

/* x clamped to [-87.3, 88.0] (overflow-free: e^88 * 2^0.5 < FLT_MAX), reduced to
 * x = n*ln2 + r with |r| <= ln2/2; returns expm1(r) = r + r^2 P(r) (P of degree
 * 5, about 1 ulp) and sets *scale = 2^n. Vectorisable: no libm call. */
static inline float fastrnn_exp_reduced_f(float x, float *scale)
{
    x = x > 88.0f ? 88.0f : x;
    x = x < -87.3f ? -87.3f : x;
    /* n = round(x / ln2) by the 1.5*2^23 trick (exact for |n| < 2^22) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;          /* ln2 split in two so r is exact */
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    int32_t bits = ((int32_t)n + 127) << 23;  /* 2^n */
    memcpy(scale, &bits, sizeof *scale);
    return p * r * r + r;
}

/* exp(x) for float: 2^n (expm1(r) + 1). */
static inline float fastrnn_expf(float x)
{
    float scale, e = fastrnn_exp_reduced_f(x, &scale);
    return (e + 1.0f) * scale;
}

/* exp(x) - 1 for float: 2^n expm1(r) + (2^n - 1), so full relative accuracy
 * near 0 (exact reduction for n = 0); expm1(-87.3) rounds to -1. */
static inline float fastrnn_expm1f(float x)
{
    float scale, e = fastrnn_exp_reduced_f(x, &scale);
    return scale * e + (scale - 1.0f);
}

/* 0 below -88, where exp(-x) is clamped: 1 / (1 + e^88) = 6e-39 there would turn
 * 0 * inf into inf instead of torch's NaN, and make a gate's gradient at x = -3e38
 * of order 1 (found by an audit). */
static inline float fastrnn_sigmoidf(float x)
{
    float s = 1.0f / (1.0f + fastrnn_expf(-x));
    return x < -88.0f ? 0.0f : s;
}

/* tanh(x) = e / (e + 2), e = expm1(2x): +-1 once e is clamped (|x| > 44). */
static inline float fastrnn_tanhf(float x)
{
    float e = fastrnn_expm1f(2.0f * x);
    return e / (e + 2.0f);
}

/* exp(y) for double as 2^n P(r) / Q(r), vectorisable: y clamped to [-708, 709],
 * y = n*ln2 + r with |r| <= ln2/2, and P/Q the [6/6] Pade approximant of exp(r):
 * P(r) = E(r^2) + r O(r^2), Q(r) = P(-r) = E - r O, truncation ~2e-19 relative
 * at |r| = ln2/2. Its one division is the one sigmoid and tanh make anyway, so a
 * value costs 7 multiply-adds of polynomial instead of a degree-13 series's 12.
 * Sets *p, *q, *scale = 2^n and *ro = r O: P - Q is 2 r O, which tanh uses
 * as it is rather than subtracting P and Q (no cancellation near 0). */
static inline void fastrnn_exp_pade_d(double y, double *p, double *q, double *scale, double *ro)
{
    y = y > 709.0 ? 709.0 : y;
    y = y < -708.0 ? -708.0 : y;
    double n = (y * 1.4426950408889634 + 6755399441055744.0) - 6755399441055744.0;
    double r = y - n * 6.93147180369123816490e-01;   /* ln2 in two parts: r is exact */
    r = r - n * 1.90821492927058770002e-10;
    double s = r * r;
    double e = 1.0 + s * (5.0 / 44.0 + s * (1.0 / 792.0 + s * (1.0 / 665280.0)));
    double o = r * (0.5 + s * (1.0 / 66.0 + s * (1.0 / 15840.0)));
    *p = e + o;
    *q = e - o;
    *ro = o;
    int64_t bits = ((int64_t)n + 1023) << 52;        /* 2^n */
    memcpy(scale, &bits, sizeof *scale);
}

/* sigmoid(x) = 1 / (1 + e^-x) = Q / (Q + 2^n P), with e^-x = 2^n P / Q */
static inline double fastrnn_sigmoidd(double x)
{
    double p, q, scale, ro;
    fastrnn_exp_pade_d(-x, &p, &q, &scale, &ro);
    double s = q / (scale * p + q);
    return x < -709.0 ? 0.0 : s;   /* where e^-x is clamped, as fastrnn_sigmoidf */
}

/* tanh(x) = (e^2x - 1) / (e^2x + 1) = (2^n P - Q) / (2^n P + Q), the numerator
 * as (2^n - 1) P + 2 r O: for |2x| <= ln2/2 (n = 0) that is 2 r O, with r exact,
 * so no cancellation near 0; +-1 once 2^n P dwarfs Q. */
static inline double fastrnn_tanhd(double x)
{
    double p, q, scale, ro;
    fastrnn_exp_pade_d(2.0 * x, &p, &q, &scale, &ro);
    return ((scale - 1.0) * p + 2.0 * ro) / (scale * p + q);
}

#endif
