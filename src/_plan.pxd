# One call of the recurrence driver (_recurrent.pyx), as every thread sees it:
# the sizes, the split, the weights and the buffers. Arrays are untyped here
# (a struct cannot hold a fused type); the driver casts them to float or double.
# Shapes: T steps, B batch, I input, H hidden, G gates (_cells.pxd), O the size
# of h: H, or P for an LSTM with a projection (h_t = W_hr (o * tanh(c_t))).

cdef struct Plan:
    int cell                    # CELL_* (_cells.pxd)
    Py_ssize_t G, T, B, I, H
    Py_ssize_t O                # size of h: H, or the LSTM's proj_size P
    bint reverse                # run t = length-1 .. 0, each row from its own end
    const Py_ssize_t *lengths   # (B,) steps per row
    const Py_ssize_t *order     # (B,) rows by decreasing length
    Py_ssize_t max_steps        # forward: run at most this many steps (0: all); a segment
                                # of an eval call, whose rows may have 0 steps left
    int nslices                 # hidden-unit slices (one per thread), 1 for the row split
    bint pool_team              # threads are a team of team_pool.h (eval calls), not OpenMP's
    bint pack_ih, pack_hh       # packed panels, else the weights are read in place
    # weights
    const void *w_ih            # (G*H, I) row-major
    const void *w_hh            # (G*H, O) row-major
    const void *w_ih_slices     # packed per-slice copy of w_ih (gate_slices), or NULL
    const void *w_hh_slices     # likewise for w_hh; backward: packed w_hh^T (O x G*H)
    const void *w_hr            # (P, H) LSTM projection, or NULL
    const void *w_hr_packed     # packed w_hr (forward) / w_hr^T (backward), or NULL (read in place)
    void *rh                    # (B, H) reset-before GRU: r * h_{t-1}, the step's second
                                # product's input, shared by a unit split's threads (a
                                # training call keeps every step's in aux instead)
    const void *w_hn_packed     # reset-before GRU backward: packed W_hn^T (O x H), or NULL
                                # (read in place); w_hh_slices then holds W_h{r,z}^T (O x 2H)
    bint bf16                   # float32 GEMMs on bf16 operands (bf16_gemm.h); no projection
    const void *w_ih_bf16       # bf16 panels of w_ih's slices (forward), or NULL
    const void *w_hh_bf16       # likewise for w_hh; backward: bf16 panels of w_hh^T
    const void *bias            # (G*H,) b_ih + b_hh (GRU: b_in for n), or NULL
    const void *bias_h          # (H,) GRU's b_hn, or NULL
    # forward
    const void *x               # (T, B, I); with x_ids a table (V, G*H) of input projections
    const Py_ssize_t *x_ids     # (T, B) row of the table x each step reads, or NULL
    const void *h0              # (B, O) or NULL for zeros
    Py_ssize_t ldh0             # h0's row stride in values (0: O; a segment of an eval call
                                # starts from h in a bidirectional layer's y, rows ldy apart)
    const void *c0              # (B, H) LSTM, or NULL for zeros
    void *y                     # (T, B, O) h_t at valid steps (padded steps untouched)
    Py_ssize_t ldy              # y's row stride in values: O, or more when y is a column
                                # block of a wider array (a bidirectional layer's output)
    void *y_copy                # (T, B, O) the caller's copy of y, written as the steps
                                # run (a training call: the cache keeps y), or NULL
    Py_ssize_t ldy_copy         # its row stride in values
    void *h_n                   # (B, O) state after each row's last step
    void *c_n                   # (B, H) LSTM, else NULL
    void *gates                 # (T, B, G*H) activated gates, or NULL (inference, RNN)
    void *aux                   # (T, B, H) c_t (LSTM) / gh_n + b_hn (GRU) / r * h_{t-1}
                                # (reset-before GRU), or NULL
    void *hr                    # (T, B, H) projected LSTM: o * tanh(c_t), or NULL
    # backward (gates then holds the saved gates and receives dL/d(x W_ih^T))
    void *dgh                   # (T, B, G*H) GRU dL/d(h W_hh^T), else NULL
    void *dhp                   # (T, B, P) projected LSTM: dL/dh_t, for dW_hr; else NULL
    const void *dy              # (T, B, O) rows lddy apart
    Py_ssize_t lddy             # dy's row stride in values: O, or more for a column block
                                # of a wider array (a bidirectional layer's half of dL/dy)
    const void *dh_n            # (B, O) or NULL for zeros
    const void *dc_n            # (B, H) LSTM, or NULL for zeros
    void *dh0                   # (B, O)
    void *dc0                   # (B, H) LSTM, else NULL
