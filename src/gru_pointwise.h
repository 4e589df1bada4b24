/* gru_pointwise.h: the elementwise parts of one GRU step, for one row.
 *
 * Gate order r, z, n (torch.nn), "linear before reset": the recurrent product
 * gh = h_{t-1} W_hh^T lands apart from gx = x_t W_ih^T (the reset gate scales
 * gh_n, not h_{t-1}), so the driver hands both in.
 *
 * Forward (a = gx in, activated gates r, z, n out, in place):
 *   r = sigmoid(gx_r + gh_r + b_r)      b_r = b_ir + b_hr
 *   z = sigmoid(gx_z + gh_z + b_z)      b_z = b_iz + b_hz
 *   hn = gh_n + b_hn                    (saved for backward)
 *   n = tanh(gx_n + b_in + r * hn)
 *   h_t = (1 - z) * n + z * h_{t-1}
 *
 * Backward (gates in, dL/dgx out in place; dL/dgh out; dh_carry in and out):
 *   dh = dh_carry + dy                  dn = dh (1 - z) (1 - n^2)
 *   dgx_r = dn * hn * r (1 - r)         dgx_z = dh (h_{t-1} - n) z (1 - z)
 *   dgx_n = dn;   dgh = [dgx_r, dgx_z, dn * r]
 *   dh_carry := dh * z                  (the driver then adds dgh W_hh)
 */
#ifndef FASTRNN_GRU_POINTWISE_H
#define FASTRNN_GRU_POINTWISE_H

#include <stddef.h>
#include "activations.h"  /* fastrnn_sigmoidf/d, fastrnn_tanhf/d */
#include "isa.h"          /* FASTRNN_MULTIVERSION */

#define FASTRNN_DEFINE_GRU_FORWARD(REAL, SUFFIX, SIGMOID, TANH)                      \
FASTRNN_MULTIVERSION(fastrnn_gru_forward_pointwise_##SUFFIX,                         \
    (REAL *restrict a, const REAL *restrict gh, const REAL *restrict bias,           \
     const REAL *restrict bias_hn, const REAL *restrict h_prev,                      \
     REAL *restrict hn_out, REAL *restrict h, ptrdiff_t n),                          \
    (a, gh, bias, bias_hn, h_prev, hn_out, h, n),                                    \
{                                                                                    \
    const REAL one = 1;                                                              \
    REAL *restrict ar = a, *restrict az = a + n, *restrict an = a + 2 * n;           \
    _Pragma("omp simd")                                                              \
    for (ptrdiff_t j = 0; j < n; ++j) {                                              \
        REAL r = SIGMOID(ar[j] + gh[j] + bias[j]);                                   \
        REAL z = SIGMOID(az[j] + gh[n + j] + bias[n + j]);                           \
        REAL hn = gh[2 * n + j] + bias_hn[j];                                        \
        REAL nn = TANH(an[j] + bias[2 * n + j] + r * hn);                            \
        ar[j] = r; az[j] = z; an[j] = nn;                                            \
        hn_out[j] = hn;                                                              \
        h[j] = (one - z) * nn + z * h_prev[j];                                       \
    }                                                                                \
})

FASTRNN_DEFINE_GRU_FORWARD(float, s, fastrnn_sigmoidf, fastrnn_tanhf)
FASTRNN_DEFINE_GRU_FORWARD(double, d, fastrnn_sigmoidd, fastrnn_tanhd)

#define FASTRNN_DEFINE_GRU_BACKWARD(REAL, SUFFIX)                                    \
/* n hidden units of one row, gate blocks `stride` apart (H, or a thread's slice). */ \
FASTRNN_MULTIVERSION(fastrnn_gru_backward_pointwise_##SUFFIX,                        \
    (REAL *restrict g, REAL *restrict dgh, REAL *restrict dh_carry,                  \
     const REAL *restrict dy, const REAL *restrict h_prev,                           \
     const REAL *restrict hn, ptrdiff_t n, ptrdiff_t stride),                        \
    (g, dgh, dh_carry, dy, h_prev, hn, n, stride),                                   \
{                                                                                    \
    const REAL one = 1;                                                              \
    const ptrdiff_t H = stride;                                                      \
    _Pragma("omp simd")                                                              \
    for (ptrdiff_t j = 0; j < n; ++j) {                                              \
        REAL r = g[j], z = g[H + j], nn = g[2 * H + j];                              \
        REAL dh = dh_carry[j] + dy[j];                                               \
        REAL dn = dh * (one - z) * (one - nn * nn);                                  \
        REAL dr = dn * hn[j] * r * (one - r);                                        \
        REAL dz = dh * (h_prev[j] - nn) * z * (one - z);                             \
        g[j] = dr; g[H + j] = dz; g[2 * H + j] = dn;                                 \
        dgh[j] = dr; dgh[H + j] = dz; dgh[2 * H + j] = dn * r;                       \
        dh_carry[j] = dh * z;                                                        \
    }                                                                                \
})

FASTRNN_DEFINE_GRU_BACKWARD(float, s)
FASTRNN_DEFINE_GRU_BACKWARD(double, d)

/* Reset before (reset_after=False: the seed's GRU, Keras reset_after=False, ONNX
 * linear_before_reset=0): the reset gate scales h_{t-1} before its product, so a
 * step has two products, h_{t-1} W_h{r,z}^T and then (r * h_{t-1}) W_hn^T, and
 * two passes, one after each. a = x_t W_ih^T plus the products, gate blocks n
 * apart; b = b_ih + b_hh (here b_hn sits outside the product, so it folds in with
 * b_in):
 *   gates pass:  r = sigmoid(a_r + b_r),  z = sigmoid(a_z + b_z),  rh = r * h_{t-1}
 *   state pass:  n = tanh(a_n + b_n),     h_t = (1 - z) * n + z * h_{t-1}
 * Each leaves its activated gates in a (r, z; then n): training keeps them.
 *
 * Backward, again two passes around two products (gates g = r, z, n in, dL/da out):
 *   state pass:  dh = dh_carry + dy,  da_n = dh (1 - z) (1 - n^2),
 *                da_z = dh (h_{t-1} - n) z (1 - z),  dh_carry := dh * z
 *   (the driver: drh = da_n W_hn, dL/d(r * h_{t-1}))
 *   gates pass:  da_r = drh * h_{t-1} * r (1 - r),  dh_carry += drh * r
 *   (the driver: dh_carry += [da_r, da_z] W_h{r,z}) */
#define FASTRNN_DEFINE_GRU_RESET_BEFORE(REAL, SUFFIX, SIGMOID, TANH)                 \
FASTRNN_MULTIVERSION(fastrnn_gru_rb_gates_pointwise_##SUFFIX,                        \
    (REAL *restrict a, const REAL *restrict bias, const REAL *restrict h_prev,       \
     REAL *restrict rh, ptrdiff_t n),                                                \
    (a, bias, h_prev, rh, n),                                                        \
{                                                                                    \
    REAL *restrict ar = a, *restrict az = a + n;                                     \
    _Pragma("omp simd")                                                              \
    for (ptrdiff_t j = 0; j < n; ++j) {                                              \
        REAL r = SIGMOID(ar[j] + bias[j]);                                           \
        ar[j] = r;                                                                   \
        az[j] = SIGMOID(az[j] + bias[n + j]);                                        \
        rh[j] = r * h_prev[j];                                                       \
    }                                                                                \
})                                                                                   \
FASTRNN_MULTIVERSION(fastrnn_gru_rb_state_pointwise_##SUFFIX,                        \
    (REAL *restrict a, const REAL *restrict bias, const REAL *restrict h_prev,       \
     REAL *restrict h, ptrdiff_t n),                                                 \
    (a, bias, h_prev, h, n),                                                         \
{                                                                                    \
    const REAL one = 1;                                                              \
    const REAL *restrict az = a + n;                                                 \
    REAL *restrict an = a + 2 * n;                                                   \
    _Pragma("omp simd")                                                              \
    for (ptrdiff_t j = 0; j < n; ++j) {                                              \
        REAL z = az[j];                                                              \
        REAL nn = TANH(an[j] + bias[2 * n + j]);                                     \
        an[j] = nn;                                                                  \
        h[j] = (one - z) * nn + z * h_prev[j];                                       \
    }                                                                                \
})                                                                                   \
/* n hidden units of one row, gate blocks `stride` apart (H, or a thread's slice). */ \
FASTRNN_MULTIVERSION(fastrnn_gru_rb_backward_state_pointwise_##SUFFIX,               \
    (REAL *restrict g, REAL *restrict dh_carry, const REAL *restrict dy,             \
     const REAL *restrict h_prev, ptrdiff_t n, ptrdiff_t stride),                    \
    (g, dh_carry, dy, h_prev, n, stride),                                            \
{                                                                                    \
    const REAL one = 1;                                                              \
    const ptrdiff_t H = stride;                                                      \
    _Pragma("omp simd")                                                              \
    for (ptrdiff_t j = 0; j < n; ++j) {                                              \
        REAL z = g[H + j], nn = g[2 * H + j];                                        \
        REAL dh = dh_carry[j] + dy[j];                                               \
        g[H + j] = dh * (h_prev[j] - nn) * z * (one - z);                            \
        g[2 * H + j] = dh * (one - z) * (one - nn * nn);                             \
        dh_carry[j] = dh * z;                                                        \
    }                                                                                \
})                                                                                   \
FASTRNN_MULTIVERSION(fastrnn_gru_rb_backward_gates_pointwise_##SUFFIX,               \
    (REAL *restrict g, REAL *restrict dh_carry, const REAL *restrict drh,            \
     const REAL *restrict h_prev, ptrdiff_t n),                                      \
    (g, dh_carry, drh, h_prev, n),                                                   \
{                                                                                    \
    const REAL one = 1;                                                              \
    _Pragma("omp simd")                                                              \
    for (ptrdiff_t j = 0; j < n; ++j) {                                              \
        REAL r = g[j];                                                               \
        g[j] = drh[j] * h_prev[j] * r * (one - r);                                   \
        dh_carry[j] += drh[j] * r;                                                   \
    }                                                                                \
})

FASTRNN_DEFINE_GRU_RESET_BEFORE(float, s, fastrnn_sigmoidf, fastrnn_tanhf)
FASTRNN_DEFINE_GRU_RESET_BEFORE(double, d, fastrnn_sigmoidd, fastrnn_tanhd)

#endif
