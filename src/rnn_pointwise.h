/* rnn_pointwise.h: the elementwise parts of one Elman RNN step, for one row.
 *
 * Forward (a = x_t W_ih^T + h_{t-1} W_hh^T in, h_t out, in place):
 *   h_t = act(a + b),  act = tanh | relu | identity
 * Backward (act'(a) is computed from h_t, so nothing else is saved):
 *   da = (dh_carry + dy) * act'(a):  1 - h^2 | [not h <= 0] | 1
 * (the driver then sets dh_carry := da W_hh).
 *
 * relu keeps NaN: `a < 0 ? 0 : a` is false for NaN; and so does its gradient, as
 * torch's (`h <= 0 ? 0 : g` passes g where h is NaN; `h > 0 ? g : 0` dropped it).
 */
#ifndef FASTRNN_RNN_POINTWISE_H
#define FASTRNN_RNN_POINTWISE_H

#include <stddef.h>
#include "activations.h"  /* fastrnn_tanhf/d */
#include "isa.h"          /* FASTRNN_MULTIVERSION */

enum { FASTRNN_ACT_TANH = 0, FASTRNN_ACT_RELU = 1, FASTRNN_ACT_IDENTITY = 2 };

#define FASTRNN_DEFINE_RNN_FORWARD(REAL, SUFFIX, TANH)                               \
FASTRNN_MULTIVERSION(fastrnn_rnn_forward_pointwise_##SUFFIX,                         \
    (REAL *restrict a, const REAL *restrict bias, int act, ptrdiff_t n),             \
    (a, bias, act, n),                                                               \
{                                                                                    \
    const REAL zero = 0;                                                             \
    if (act == FASTRNN_ACT_TANH) {                                                   \
        _Pragma("omp simd")                                                          \
        for (ptrdiff_t j = 0; j < n; ++j) a[j] = TANH(a[j] + bias[j]);               \
    } else if (act == FASTRNN_ACT_RELU) {                                            \
        _Pragma("omp simd")                                                          \
        for (ptrdiff_t j = 0; j < n; ++j) {                                          \
            REAL v = a[j] + bias[j];                                                 \
            a[j] = v < zero ? zero : v;                                              \
        }                                                                            \
    } else {                                                                         \
        _Pragma("omp simd")                                                          \
        for (ptrdiff_t j = 0; j < n; ++j) a[j] = a[j] + bias[j];                     \
    }                                                                                \
})

FASTRNN_DEFINE_RNN_FORWARD(float, s, fastrnn_tanhf)
FASTRNN_DEFINE_RNN_FORWARD(double, d, fastrnn_tanhd)

#define FASTRNN_DEFINE_RNN_BACKWARD(REAL, SUFFIX)                                    \
FASTRNN_MULTIVERSION(fastrnn_rnn_backward_pointwise_##SUFFIX,                        \
    (REAL *restrict g, const REAL *restrict dh_carry, const REAL *restrict dy,       \
     const REAL *restrict h, int act, ptrdiff_t H),                                  \
    (g, dh_carry, dy, h, act, H),                                                    \
{                                                                                    \
    const REAL one = 1, zero = 0;                                                    \
    if (act == FASTRNN_ACT_TANH) {                                                   \
        _Pragma("omp simd")                                                          \
        for (ptrdiff_t j = 0; j < H; ++j)                                            \
            g[j] = (dh_carry[j] + dy[j]) * (one - h[j] * h[j]);                      \
    } else if (act == FASTRNN_ACT_RELU) {                                            \
        _Pragma("omp simd")                                                          \
        for (ptrdiff_t j = 0; j < H; ++j)                                            \
            g[j] = h[j] <= zero ? zero : dh_carry[j] + dy[j];                        \
    } else {                                                                         \
        _Pragma("omp simd")                                                          \
        for (ptrdiff_t j = 0; j < H; ++j) g[j] = dh_carry[j] + dy[j];                \
    }                                                                                \
})

FASTRNN_DEFINE_RNN_BACKWARD(float, s)
FASTRNN_DEFINE_RNN_BACKWARD(double, d)

#endif
