/* lstm_pointwise.h: the elementwise parts of one LSTM step, for one row.
 *
 * Why in C: the same loops written in Cython ran scalar (no restrict, so no
 * vectorisation, and Cython's code is built for baseline x86-64 only). Here the gate
 * segments are separate restrict pointers and each loop is one `omp simd`
 * pass, built for AVX-512, AVX2 and baseline (isa.h). Gate order i, f, g, o (torch.nn).
 *
 * Forward (pre-activations a in, activated gates out, in place; the infer
 * variant leaves a as it is):
 *   i, f, o = sigmoid(a + b);  g = tanh(a + b)
 *   c_t = f * c_{t-1} + i * g;  h_t = o * tanh(c_t)
 * (c_new may be c_prev itself: inference updates c in place.)
 *
 * Backward:
 *   dh  = dh_carry + dy                       (dL/dh_t)
 *   dc  = dc_carry + dh * o * (1 - tanh(c_t)^2)      (tanh(c_t) recomputed from c_t)
 *   da_i = dc * g * i (1 - i)      da_f = dc * c_{t-1} * f (1 - f)
 *   da_g = dc * i * (1 - g^2)      da_o = dh * tanh(c_t) * o (1 - o)
 *   dc_carry := dc * f                        (to step t-1)
 *
 * The gates come in activated and leave as dL/da, in place.
 */
#ifndef FASTRNN_LSTM_POINTWISE_H
#define FASTRNN_LSTM_POINTWISE_H

#include <stddef.h>
#include "activations.h"  /* fastrnn_sigmoidf, fastrnn_tanhf */
#include "isa.h"          /* FASTRNN_MULTIVERSION: one body, an AVX-512, AVX2 and baseline build */

/* NAME keeps the activated gates (training: backward reads them); with
 * KEEP_GATES 0 it only writes c_t and h_t (inference: 4 stores a unit fewer;
 * the same operations, so the same bits). */
#define FASTRNN_DEFINE_LSTM_FORWARD(NAME, KEEP_GATES, REAL, SIGMOID, TANH)          \
FASTRNN_MULTIVERSION(NAME,                                                         \
    (REAL *restrict ai, REAL *restrict af, REAL *restrict ag, REAL *restrict ao,   \
     const REAL *restrict bias, const REAL *c_prev, REAL *c_new,                   \
     REAL *restrict h, ptrdiff_t n),                                               \
    (ai, af, ag, ao, bias, c_prev, c_new, h, n),                                   \
{                                                                                  \
    const REAL *restrict bi = bias, *restrict bf = bias + n;                       \
    const REAL *restrict bg = bias + 2 * n, *restrict bo = bias + 3 * n;           \
    _Pragma("omp simd")                                                            \
    for (ptrdiff_t j = 0; j < n; ++j) {                                            \
        REAL i = SIGMOID(ai[j] + bi[j]), f = SIGMOID(af[j] + bf[j]);               \
        REAL g = TANH(ag[j] + bg[j]), o = SIGMOID(ao[j] + bo[j]);                  \
        REAL c = f * c_prev[j] + i * g;                                            \
        if (KEEP_GATES) {                                                          \
            ai[j] = i; af[j] = f; ag[j] = g; ao[j] = o;                            \
        }                                                                          \
        c_new[j] = c;                                                              \
        h[j] = o * TANH(c);                                                        \
    }                                                                              \
})

FASTRNN_DEFINE_LSTM_FORWARD(fastrnn_lstm_train_pointwise_s, 1, float, fastrnn_sigmoidf, fastrnn_tanhf)
FASTRNN_DEFINE_LSTM_FORWARD(fastrnn_lstm_train_pointwise_d, 1, double, fastrnn_sigmoidd, fastrnn_tanhd)
FASTRNN_DEFINE_LSTM_FORWARD(fastrnn_lstm_infer_pointwise_s, 0, float, fastrnn_sigmoidf, fastrnn_tanhf)
FASTRNN_DEFINE_LSTM_FORWARD(fastrnn_lstm_infer_pointwise_d, 0, double, fastrnn_sigmoidd, fastrnn_tanhd)

/* fastrnn_lstm_forward_pointwise_s / _d: the forward pass of one row;
 * keep_gates (training) leaves the activated gates in ai..ao for backward. */
#define FASTRNN_DEFINE_LSTM_FORWARD_ENTRY(REAL, SUFFIX)                            \
static inline void fastrnn_lstm_forward_pointwise_##SUFFIX(                        \
    REAL *ai, REAL *af, REAL *ag, REAL *ao, const REAL *bias, const REAL *c_prev,  \
    REAL *c_new, REAL *h, ptrdiff_t n, int keep_gates)                             \
{                                                                                  \
    if (keep_gates)                                                                \
        fastrnn_lstm_train_pointwise_##SUFFIX(ai, af, ag, ao, bias, c_prev, c_new, h, n); \
    else                                                                           \
        fastrnn_lstm_infer_pointwise_##SUFFIX(ai, af, ag, ao, bias, c_prev, c_new, h, n); \
}
FASTRNN_DEFINE_LSTM_FORWARD_ENTRY(float, s)
FASTRNN_DEFINE_LSTM_FORWARD_ENTRY(double, d)

/* fastrnn_lstm_backward_pointwise_s / _d: the backward pass of one row. */
#define FASTRNN_DEFINE_LSTM_BACKWARD(REAL, SUFFIX, TANH)                           \
FASTRNN_MULTIVERSION(fastrnn_lstm_backward_pointwise_##SUFFIX,                     \
    (REAL *restrict gi, REAL *restrict gf, REAL *restrict gg, REAL *restrict go,   \
     REAL *restrict dc_carry, const REAL *restrict dh_carry,                       \
     const REAL *restrict dy, const REAL *restrict c_prev,                         \
     const REAL *restrict c, ptrdiff_t H),                                         \
    (gi, gf, gg, go, dc_carry, dh_carry, dy, c_prev, c, H),                        \
{                                                                                  \
    const REAL one = 1;                                                            \
    _Pragma("omp simd")                                                            \
    for (ptrdiff_t j = 0; j < H; ++j) {                                            \
        REAL i = gi[j], f = gf[j], g = gg[j], o = go[j], tc = TANH(c[j]);          \
        REAL dh = dh_carry[j] + dy[j];                                             \
        REAL dc = dc_carry[j] + dh * o * (one - tc * tc);                          \
        gi[j] = dc * g * i * (one - i);                                            \
        gf[j] = dc * c_prev[j] * f * (one - f);                                    \
        gg[j] = dc * i * (one - g * g);                                            \
        go[j] = dh * tc * o * (one - o);                                           \
        dc_carry[j] = dc * f;                                                      \
    }                                                                              \
})

FASTRNN_DEFINE_LSTM_BACKWARD(float, s, fastrnn_tanhf)
FASTRNN_DEFINE_LSTM_BACKWARD(double, d, fastrnn_tanhd)

#endif
