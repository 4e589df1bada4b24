# One call of the recurrence driver (_recurrent.pyx), as every thread sees it:
# the sizes, the split, the weights and the buffers. Arrays are untyped here
# (a struct cannot hold a fused type); the driver casts them to float or double.
# Shapes: T steps, B batch, I input, H hidden, G gates (_cells.pxd).

cdef struct Plan:
    int cell                    # CELL_* (_cells.pxd)
    Py_ssize_t G, T, B, I, H
    bint reverse                # run t = length-1 .. 0, each row from its own end
    const Py_ssize_t *lengths   # (B,) steps per row
    const Py_ssize_t *order     # (B,) rows by decreasing length
    int nslices                 # hidden-unit slices (one per thread), 1 for the row split
    bint pack_ih, pack_hh       # packed panels, else the weights are read in place
    # weights
    const void *w_ih            # (G*H, I) row-major
    const void *w_hh            # (G*H, H) row-major
    const void *w_ih_slices     # packed per-slice copy of w_ih (gate_slices), or NULL
    const void *w_hh_slices     # likewise for w_hh; backward: packed w_hh^T (H x G*H)
    const void *bias            # (G*H,) b_ih + b_hh (GRU: b_in for n), or NULL
    const void *bias_h          # (H,) GRU's b_hn, or NULL
    # forward
    const void *x               # (T, B, I)
    const void *h0              # (B, H) or NULL for zeros
    const void *c0              # (B, H) LSTM, or NULL for zeros
    void *y                     # (T, B, H) h_t at valid steps (padded steps untouched)
    void *h_n                   # (B, H) state after each row's last step
    void *c_n                   # (B, H) LSTM, else NULL
    void *gates                 # (T, B, G*H) activated gates, or NULL (inference, RNN)
    void *aux                   # (T, B, H) c_t (LSTM) / gh_n + b_hn (GRU), or NULL
    # backward (gates then holds the saved gates and receives dL/d(x W_ih^T))
    void *dgh                   # (T, B, G*H) GRU dL/d(h W_hh^T), else NULL
    const void *dy              # (T, B, H)
    const void *dh_n            # (B, H) or NULL for zeros
    const void *dc_n            # (B, H) LSTM, or NULL for zeros
    void *dh0                   # (B, H)
    void *dc0                   # (B, H) LSTM, else NULL
