/* lstm_pointwise.h: the elementwise part of one LSTM backward step, for one row.
 *
 * Why in C: the same loop written in Cython ran scalar (no restrict, so no
 * vectorisation, and Cython compiles outside the AVX2 clones). Here the gate
 * segments are separate restrict pointers and the loop is an `omp simd` loop
 * in an x86-64-v3 clone. Gate order i, f, g, o (torch.nn).
 *
 *   dh  = dh_carry + dy                       (dL/dh_t)
 *   dc  = dc_carry + dh * o * (1 - tanh(c_t)^2)
 *   da_i = dc * g * i (1 - i)      da_f = dc * c_{t-1} * f (1 - f)
 *   da_g = dc * i * (1 - g^2)      da_o = dh * tanh(c_t) * o (1 - o)
 *   dc_carry := dc * f                        (to step t-1)
 *
 * The gates come in activated and leave as dL/da, in place.
 */
#ifndef FASTRNN_LSTM_POINTWISE_H
#define FASTRNN_LSTM_POINTWISE_H

#include <stddef.h>
#include "recurrent_gemm.h"  /* FASTRNN_CLONES */

#define FASTRNN_DEFINE_LSTM_POINTWISE(REAL, SUFFIX)                                \
FASTRNN_CLONES static void                                                         \
fastrnn_lstm_backward_pointwise_##SUFFIX(                                          \
    REAL *restrict gi, REAL *restrict gf, REAL *restrict gg, REAL *restrict go,    \
    REAL *restrict dc_carry, const REAL *restrict dh_carry,                        \
    const REAL *restrict dy, const REAL *restrict c_prev,                          \
    const REAL *restrict tanh_c, ptrdiff_t H)                                      \
{                                                                                  \
    const REAL one = 1;                                                            \
    _Pragma("omp simd")                                                            \
    for (ptrdiff_t j = 0; j < H; ++j) {                                            \
        REAL i = gi[j], f = gf[j], g = gg[j], o = go[j], tc = tanh_c[j];           \
        REAL dh = dh_carry[j] + dy[j];                                             \
        REAL dc = dc_carry[j] + dh * o * (one - tc * tc);                          \
        gi[j] = dc * g * i * (one - i);                                            \
        gf[j] = dc * c_prev[j] * f * (one - f);                                    \
        gg[j] = dc * i * (one - g * g);                                            \
        go[j] = dh * tc * o * (one - o);                                           \
        dc_carry[j] = dc * f;                                                      \
    }                                                                              \
}

FASTRNN_DEFINE_LSTM_POINTWISE(float, s)
FASTRNN_DEFINE_LSTM_POINTWISE(double, d)

#endif
