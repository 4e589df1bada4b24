# The three cells as the recurrence driver (_recurrent.pyx) sees them: a gate
# count, where the recurrent product lands, and one pointwise pass per
# direction (the C files named below). Nothing here loops over time or rows.
#
#   cell            gates  recurrent product h W_hh^T     saved per step (aux)
#   RNN tanh/relu/id   1   added into a_t                 -
#   LSTM               4   added into a_t                 c_t
#   GRU                3   apart (gh), scaled by r         gh_n + b_hn
#   GRU, reset before  3   r,z into a_t; then (r*h) W_hn^T  r * h_{t-1}
#                          into a_t's n block (two products and two passes a step,
#                          each direction: gru_reset_before_step, _backward_step)
from _simd cimport floating

cdef enum:
    CELL_RNN_TANH = 0
    CELL_RNN_RELU = 1
    CELL_RNN_IDENTITY = 2
    CELL_LSTM = 3
    CELL_GRU = 4
    CELL_GRU_RESET_BEFORE = 5   # reset_after=False (gru_reset_before_step, _backward_step)


cdef extern from "rnn_pointwise.h" nogil:
    void fastrnn_rnn_forward_pointwise_s(float *a, const float *bias, int act, Py_ssize_t n)
    void fastrnn_rnn_forward_pointwise_d(double *a, const double *bias, int act, Py_ssize_t n)
    void fastrnn_rnn_backward_pointwise_s(float *g, const float *dh_carry, const float *dy,
                                          const float *h, int act, Py_ssize_t H)
    void fastrnn_rnn_backward_pointwise_d(double *g, const double *dh_carry, const double *dy,
                                          const double *h, int act, Py_ssize_t H)

cdef extern from "lstm_pointwise.h" nogil:
    void fastrnn_lstm_forward_pointwise_s(float *ai, float *af, float *ag, float *ao,
                                          const float *bias, const float *c_prev,
                                          float *c_new, float *h, Py_ssize_t n,
                                          int keep_gates)
    void fastrnn_lstm_forward_pointwise_d(double *ai, double *af, double *ag, double *ao,
                                          const double *bias, const double *c_prev,
                                          double *c_new, double *h, Py_ssize_t n,
                                          int keep_gates)
    void fastrnn_lstm_backward_pointwise_s(float *gi, float *gf, float *gg, float *go,
                                           float *dc_carry, const float *dh_carry,
                                           const float *dy, const float *c_prev,
                                           const float *c, Py_ssize_t H)
    void fastrnn_lstm_backward_pointwise_d(double *gi, double *gf, double *gg, double *go,
                                           double *dc_carry, const double *dh_carry,
                                           const double *dy, const double *c_prev,
                                           const double *c, Py_ssize_t H)

cdef extern from "gru_pointwise.h" nogil:
    void fastrnn_gru_forward_pointwise_s(float *a, const float *gh, const float *bias,
                                         const float *bias_hn, const float *h_prev,
                                         float *hn_out, float *h, Py_ssize_t n)
    void fastrnn_gru_forward_pointwise_d(double *a, const double *gh, const double *bias,
                                         const double *bias_hn, const double *h_prev,
                                         double *hn_out, double *h, Py_ssize_t n)
    void fastrnn_gru_backward_pointwise_s(float *g, float *dgh, float *dh_carry,
                                          const float *dy, const float *h_prev,
                                          const float *hn, Py_ssize_t n, Py_ssize_t stride)
    void fastrnn_gru_backward_pointwise_d(double *g, double *dgh, double *dh_carry,
                                          const double *dy, const double *h_prev,
                                          const double *hn, Py_ssize_t n, Py_ssize_t stride)
    void fastrnn_gru_rb_gates_pointwise_s(float *a, const float *bias, const float *h_prev,
                                          float *rh, Py_ssize_t n)
    void fastrnn_gru_rb_gates_pointwise_d(double *a, const double *bias,
                                          const double *h_prev, double *rh, Py_ssize_t n)
    void fastrnn_gru_rb_state_pointwise_s(float *a, const float *bias,
                                          const float *h_prev, float *h, Py_ssize_t n)
    void fastrnn_gru_rb_state_pointwise_d(double *a, const double *bias,
                                          const double *h_prev, double *h, Py_ssize_t n)
    void fastrnn_gru_rb_backward_state_pointwise_s(float *g, float *dh_carry, const float *dy,
                                                   const float *h_prev, Py_ssize_t n,
                                                   Py_ssize_t stride)
    void fastrnn_gru_rb_backward_state_pointwise_d(double *g, double *dh_carry,
                                                   const double *dy, const double *h_prev,
                                                   Py_ssize_t n, Py_ssize_t stride)
    void fastrnn_gru_rb_backward_gates_pointwise_s(float *g, float *dh_carry, const float *drh,
                                                   const float *h_prev, Py_ssize_t n)
    void fastrnn_gru_rb_backward_gates_pointwise_d(double *g, double *dh_carry,
                                                   const double *drh, const double *h_prev,
                                                   Py_ssize_t n)


cdef inline Py_ssize_t cell_gates(int cell) noexcept nogil:
    """Gate blocks of H rows in W_ih / W_hh: 1 (RNN), 4 (LSTM, i f g o), 3 (GRU, r z n)."""
    return 4 if cell == CELL_LSTM else (3 if cell == CELL_GRU or cell == CELL_GRU_RESET_BEFORE
                                        else 1)


cdef inline bint product_apart(int cell) noexcept nogil:
    """Does h W_hh^T land in its own buffer (GRU) instead of being added into a_t?"""
    return cell == CELL_GRU


cdef inline void forward_pointwise(
        int cell,
        floating *a,                # IN/OUT (G*n) x W_ih^T [+ h W_hh^T] in; activated gates out
        const floating *gh,         # IN  (G*n) h W_hh^T when product_apart, else unused
        const floating *bias,       # IN  (G*n) bias slice (zeros when the layer has none)
        const floating *bias_h,     # IN  (n) GRU b_hn slice, else unused
        const floating *h_prev,     # IN  (n) this slice of h_{t-1} (GRU)
        const floating *c_prev,     # IN  (n) c_{t-1} (LSTM)
        floating *aux,              # OUT (n) c_t (LSTM) or gh_n + b_hn (GRU); may be c_prev
        floating *h,                # OUT (n) h_t (RNN: h is a itself)
        Py_ssize_t n,
        bint keep_gates) noexcept nogil:    # training: the LSTM leaves its activated gates in a
                                            # for backward (inference: it does not)
    """One row's forward pass for n hidden units, gate segments n apart."""
    if cell == CELL_LSTM:
        if floating is float:
            fastrnn_lstm_forward_pointwise_s(a, a + n, a + 2 * n, a + 3 * n, bias, c_prev,
                                             aux, h, n, keep_gates)
        else:
            fastrnn_lstm_forward_pointwise_d(a, a + n, a + 2 * n, a + 3 * n, bias, c_prev,
                                             aux, h, n, keep_gates)
    elif cell == CELL_GRU:
        if floating is float:
            fastrnn_gru_forward_pointwise_s(a, gh, bias, bias_h, h_prev, aux, h, n)
        else:
            fastrnn_gru_forward_pointwise_d(a, gh, bias, bias_h, h_prev, aux, h, n)
    else:
        if floating is float:
            fastrnn_rnn_forward_pointwise_s(a, bias, cell, n)
        else:
            fastrnn_rnn_forward_pointwise_d(a, bias, cell, n)


cdef inline void backward_pointwise(
        int cell,
        floating *g,                # IN/OUT (G blocks of n, stride apart) saved gates in
                                    #   (RNN: unused in); dL/d(x W_ih^T) out
        floating *dgh,              # OUT (likewise) dL/d(h W_hh^T) (GRU only)
        floating *dh,               # IN/OUT (n) dL/dh_t from step t+1; GRU: out dh * z
        floating *dc,               # IN/OUT (n) LSTM dL/dc carried
        const floating *dy,         # IN  (n) dL/dy_t
        const floating *h,          # IN  (n) h_t (RNN)
        const floating *h_prev,     # IN  (n) h_{t-1} (GRU)
        const floating *aux,        # IN  (n) aux_t: c_t (LSTM), gh_n + b_hn (GRU)
        const floating *aux_prev,   # IN  (n) c_{t-1} (LSTM)
        Py_ssize_t n,               # hidden units: H, or one thread's slice
        Py_ssize_t stride) noexcept nogil:   # distance between gate blocks: H
    """One row's backward pass over n hidden units; afterwards the driver adds
    (dgh or g) W_hh into dh (GRU) or overwrites dh with it (RNN, LSTM)."""
    if cell == CELL_LSTM:
        if floating is float:
            fastrnn_lstm_backward_pointwise_s(g, g + stride, g + 2 * stride, g + 3 * stride,
                                              dc, dh, dy, aux_prev, aux, n)
        else:
            fastrnn_lstm_backward_pointwise_d(g, g + stride, g + 2 * stride, g + 3 * stride,
                                              dc, dh, dy, aux_prev, aux, n)
    elif cell == CELL_GRU:
        if floating is float:
            fastrnn_gru_backward_pointwise_s(g, dgh, dh, dy, h_prev, aux, n, stride)
        else:
            fastrnn_gru_backward_pointwise_d(g, dgh, dh, dy, h_prev, aux, n, stride)
    else:
        if floating is float:
            fastrnn_rnn_backward_pointwise_s(g, dh, dy, h, cell, n)
        else:
            fastrnn_rnn_backward_pointwise_d(g, dh, dy, h, cell, n)


cdef inline void gru_reset_before_gates(
        floating *a,                # IN/OUT (3n) a_t in; r, z out in a_r, a_z
        const floating *bias,       # IN  (3n) b_ih + b_hh
        const floating *h_prev,     # IN  (n) h_{t-1}
        floating *rh,               # OUT (n) r * h_{t-1}, the second product's input
        Py_ssize_t n) noexcept nogil:
    """The reset-before GRU's first pass of a step (gru_pointwise.h)."""
    if floating is float:
        fastrnn_gru_rb_gates_pointwise_s(a, bias, h_prev, rh, n)
    else:
        fastrnn_gru_rb_gates_pointwise_d(a, bias, h_prev, rh, n)


cdef inline void gru_reset_before_state(
        floating *a,                # IN/OUT (3n) z in a_z, a_t's n block with (r*h) W_hn^T
                                    #   added in; n out there
        const floating *bias,       # IN  (3n) b_ih + b_hh
        const floating *h_prev,     # IN  (n) h_{t-1}
        floating *h,                # OUT (n) h_t
        Py_ssize_t n) noexcept nogil:
    """The reset-before GRU's second pass of a step (gru_pointwise.h)."""
    if floating is float:
        fastrnn_gru_rb_state_pointwise_s(a, bias, h_prev, h, n)
    else:
        fastrnn_gru_rb_state_pointwise_d(a, bias, h_prev, h, n)


cdef inline void gru_reset_before_backward_state(
        floating *g,                # IN/OUT (3 blocks of n, stride apart) r, z, n in;
                                    #   r kept, dL/da_z, dL/da_n out
        floating *dh,               # IN/OUT (n) dL/dh_t from step t+1; out dh * z
        const floating *dy,         # IN  (n) dL/dy_t
        const floating *h_prev,     # IN  (n) h_{t-1}
        Py_ssize_t n, Py_ssize_t stride) noexcept nogil:
    """The reset-before GRU's first backward pass of a step (gru_pointwise.h); the
    driver then takes drh = dL/da_n W_hn."""
    if floating is float:
        fastrnn_gru_rb_backward_state_pointwise_s(g, dh, dy, h_prev, n, stride)
    else:
        fastrnn_gru_rb_backward_state_pointwise_d(g, dh, dy, h_prev, n, stride)


cdef inline void gru_reset_before_backward_gates(
        floating *g,                # IN/OUT (n) r in, dL/da_r out
        floating *dh,               # IN/OUT (n) drh * r added
        const floating *drh,        # IN  (n) dL/d(r * h_{t-1})
        const floating *h_prev,     # IN  (n) h_{t-1}
        Py_ssize_t n) noexcept nogil:
    """The reset-before GRU's second backward pass of a step (gru_pointwise.h); the
    driver then adds [dL/da_r, dL/da_z] W_h{r,z} into dh."""
    if floating is float:
        fastrnn_gru_rb_backward_gates_pointwise_s(g, dh, drh, h_prev, n)
    else:
        fastrnn_gru_rb_backward_gates_pointwise_d(g, dh, drh, h_prev, n)
