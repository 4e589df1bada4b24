"""Plain NumPy reference implementation of the RNN, LSTM and GRU cells.

Written for clarity, not speed: one Python loop over time steps, one line per
equation. The compiled kernels in :mod:`fastrnn.functional` are tested against
these functions, and these functions are tested against finite differences and
against ``torch.nn`` (see ``tests/test_reference.py``).

Shape letters (docs/DESIGN.md)
------------------------------
T time steps, B batch, I input features, H hidden units,
G gates per cell (RNN 1, GRU 3, LSTM 4).

All arrays are time-major: ``x`` is (T, B, I) and ``y`` is (T, B, H).
Weights use torch.nn's layout, so they interchange with it unchanged:
``w_ih`` (G*H, I), ``w_hh`` (G*H, H), ``b_ih`` and ``b_hh`` (G*H,) or both None.

Equations (``@`` is a matrix product, ``*`` elementwise, ``σ`` the logistic)
---------------------------------------------------------------------------
RNN (G = 1), act in {tanh, relu, identity}::

    h' = act(x @ w_ih.T + b_ih + h @ w_hh.T + b_hh)

LSTM (G = 4), gate rows of the weights in the order i, f, g, o::

    [a_i, a_f, a_g, a_o] = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh
    i = σ(a_i)   f = σ(a_f)   g = tanh(a_g)   o = σ(a_o)
    c' = f * c + i * g
    h' = o * tanh(c')

GRU (G = 3), gate rows in the order r, z, n, torch's "linear before reset"::

    [xr, xz, xn] = x @ w_ih.T + b_ih
    [hr, hz, hn] = h @ w_hh.T + b_hh
    r = σ(xr + hr)   z = σ(xz + hz)
    n = tanh(xn + r * hn)
    h' = (1 - z) * n + z * h

Sequences, lengths and direction
--------------------------------
``lengths`` (B,) says sequence b is valid for ``t < lengths[b]``
(1 <= lengths[b] <= T, any order; None means all T). At "step" s = 0..T-1 the
sequences with ``s < lengths[b]`` advance; the others are finished and keep
their state. Forward direction: step s consumes ``x[s]``. ``reverse=True``:
step s consumes ``x[lengths[b] - 1 - s]``, so each sequence runs from its own
last valid step down to 0. In both cases ``y[t]`` is the state right after
consuming ``x[t]``; padded outputs are 0 and ``h_n``/``c_n`` is the state
after each sequence's final step. This matches torch's packed sequences, and
``reverse=True`` matches the reverse half of a bidirectional torch layer.

``x_ids`` (T, B) ints: ``x`` is then a table (V, I) and step t of sequence b
reads row ``x[x_ids[t, b]]`` (an embedding table and token ids); the call is
the one on ``x[x_ids]``, and backward's ``dx`` is the gradient of the table
(V, I), the rows of each id summed.

Backward functions take the gradient of a scalar loss with respect to ``y``
(``dy``, padded entries ignored) and to the final state(s) (None means zero),
and return fresh arrays. All arithmetic is done in the dtype of the inputs
(float32 or float64); every array of one call must share that dtype.

Cache
-----
``*_forward(..., training=True)`` returns a ``cache`` dict that the matching
backward consumes; ``training=False`` returns ``cache = None``. The cache holds
*references* to ``x`` and the weights (do not modify them in between) plus
per-step intermediates laid out like ``y``, indexed by time t, zero at padded
steps. Keys common to all cells:

    "x"        (T, B, I)   the input (x[x_ids] when x_ids was given)
    "by_id"    None, or (x_ids, V): backward sums dx by id into (V, I)
    "w_ih"     (G*H, I)    input weights
    "w_hh"     (G*H, H)    recurrent weights
    "b_ih"     (G*H,) or None
    "b_hh"     (G*H,) or None
    "lengths"  (B,) int64  valid lengths (all T when None was given)
    "reverse"  bool        direction
    "h_prev"   (T, B, H)   hidden state entering the step that consumed x[t]

Extra keys per cell:

    RNN   "nonlinearity" str         'tanh', 'relu' or 'identity'
          "h"          (T, B, H)     hidden state after x[t] (equals y)
    LSTM  "c_prev"     (T, B, H)     cell state entering the step
          "gates"      (T, B, 4*H)   activated gates i, f, g, o
          "c"          (T, B, H)     cell state after x[t]
    GRU   "gates"      (T, B, 3*H)   activated gates r, z, n
          "hn"         (T, B, H)     h_prev @ W_hn.T + b_hn (the part r scales)
"""

import numpy as np

__all__ = ["rnn_forward", "rnn_backward", "lstm_forward", "lstm_backward",
           "lstmp_forward", "lstmp_backward", "gru_forward", "gru_backward", "dense_forward", "dense_backward"]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def _check_dtypes(*arrays):
    """Assert all non-None arrays share one float dtype (float32 or float64)."""
    present = [a for a in arrays if a is not None]
    dtype = present[0].dtype
    assert dtype in (np.float32, np.float64), "dtype must be float32 or float64, got %s" % dtype
    for a in present:
        assert a.dtype == dtype, "dtype mismatch: %s vs %s" % (a.dtype, dtype)
    return dtype


def _as_lengths(lengths, T, B):
    """(B,) int64 array of valid lengths; None means every sequence has T steps."""
    if lengths is None:
        return np.full(B, T, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(B)
    assert np.all((lengths >= 1) & (lengths <= T)), "lengths must lie in [1, T]"
    return lengths


def _schedule(s, lengths, reverse):
    """Which sequences advance at step s, and which time index each consumes.

    Returns (rows, times), two int arrays of equal length: sequence rows[k]
    consumes x[times[k], rows[k]] at step s.
    """
    rows = np.flatnonzero(s < lengths)
    if reverse:
        times = lengths[rows] - 1 - s
    else:
        times = np.full(rows.shape, s, dtype=np.int64)
    return rows, times


def _mm(a, b, bf16):
    """a @ b. With bf16: of a and b rounded to bf16 (nearest even), exact products
    summed in float64, the result in a's dtype: the products of a float32 layer
    under set_float32_matmul_precision("medium") (the kernels sum in float32)."""
    if not bf16:
        return a @ b
    from fastrnn.quant_reference import round_bf16
    wide = round_bf16(a).astype(np.float64) @ round_bf16(b).astype(np.float64)
    return wide.astype(a.dtype)


def _sigmoid(a):
    # σ(a) = (1 + tanh(a/2)) / 2: exact, and never overflows.
    return 0.5 * (np.tanh(0.5 * a) + 1.0)


def _zeros_or_copy(state, shape, dtype):
    return np.zeros(shape, dtype=dtype) if state is None else np.array(state, dtype=dtype, copy=True)


# nonlinearity -> (activation, derivative expressed through the activation's output)
_RNN_ACTIVATIONS = {
    "tanh": (np.tanh, lambda h: 1.0 - h * h),
    "relu": (lambda a: np.maximum(a, 0), lambda h: (~(h <= 0)).astype(h.dtype)),  # NaN: 1, as torch
    "identity": (lambda a: a, lambda h: np.ones_like(h)),
}


# --------------------------------------------------------------------------
# Elman RNN
# --------------------------------------------------------------------------

def _rows_by_id(x, x_ids):
    """x given as a table (V, I) and x_ids (T, B): the input x[x_ids] (T, B, I), and
    what backward needs to sum dx back into the table's rows; else x as it is."""
    if x_ids is None:
        return x, None
    x_ids = np.asarray(x_ids)
    return x[x_ids], (x_ids, x.shape[0])


def _gradient_by_id(dx, cache):
    """dx (T, B, I), or with x given by ids its rows summed by id into (V, I)."""
    if cache["by_id"] is None:
        return dx
    x_ids, V = cache["by_id"]
    table = np.zeros((V, dx.shape[2]), dx.dtype)
    np.add.at(table, x_ids, dx)
    return table


def _into(out, y):
    """y, or `out` holding it: a forward's `out`, as functional's (in training the
    cache keeps its own y there and `out` gets a copy; here `out` is always a copy)."""
    if out is None:
        return y
    out[...] = y
    return out


def rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh", lengths=None,
                reverse=False, training=True, bf16=False, out=None, x_ids=None):
    """Single-layer, single-direction Elman RNN.

    x (T, B, I); h0 (B, H) or None; w_ih (H, I); w_hh (H, H);
    b_ih, b_hh (H,) or both None; lengths (B,) ints or None.
    Returns y (T, B, H), h_n (B, H), cache (dict, or None if not training).
    """
    activation, _ = _RNN_ACTIVATIONS[nonlinearity]
    x, by_id = _rows_by_id(x, x_ids)
    dtype = _check_dtypes(x, h0, w_ih, w_hh, b_ih, b_hh)
    T, B, _ = x.shape
    H = w_hh.shape[1]
    lengths = _as_lengths(lengths, T, B)

    h = _zeros_or_copy(h0, (B, H), dtype)
    y = np.zeros((T, B, H), dtype=dtype)
    h_prev = np.zeros((T, B, H), dtype=dtype)

    for s in range(T):
        rows, times = _schedule(s, lengths, reverse)
        hp = h[rows]
        a = _mm(x[times, rows], w_ih.T, bf16) + _mm(hp, w_hh.T, bf16)
        if b_ih is not None:
            a = a + b_ih + b_hh
        h_new = activation(a)
        h_prev[times, rows] = hp
        y[times, rows] = h_new
        h[rows] = h_new

    cache = None
    if training:
        cache = {"x": x, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh,
                 "lengths": lengths, "reverse": reverse, "nonlinearity": nonlinearity,
                 "bf16": bf16, "by_id": by_id,
                 "h_prev": h_prev, "h": y.copy()}
    return _into(out, y), h, cache


def _weight_grads_into(out, accumulate, *grads):
    """The backward functions' `out` (as fastrnn.functional's): with out given,
    each weight gradient is written into its array there (added with
    accumulate=True) and those arrays are returned."""
    if out is None:
        return grads
    for dst, g in zip(out, grads):
        if accumulate:
            dst += g
        else:
            dst[...] = g
    return tuple(out)


def defers_weights(cache):
    """False: this reference's backward adds each call's weight gradients itself
    (fastrnn.functional.defers_weights: the kernels' cells may sum them later)."""
    return False


def rnn_backward(dy, dh_n, cache, out=None, accumulate=False):
    """Gradients of the Elman RNN.

    dy (T, B, H) gradient w.r.t. y (padded steps ignored); dh_n (B, H) or None.
    Returns dx (T, B, I), dh0 (B, H), dw_ih (H, I), dw_hh (H, H),
    db_ih (H,), db_hh (H,) -- the last two None when there is no bias.
    """
    x, w_ih, w_hh = cache["x"], cache["w_ih"], cache["w_hh"]
    has_bias = cache["b_ih"] is not None
    lengths, reverse = cache["lengths"], cache["reverse"]
    bf16 = cache.get("bf16", False)   # products as forward ran them
    h_prev, h_out = cache["h_prev"], cache["h"]
    _, dactivation = _RNN_ACTIVATIONS[cache["nonlinearity"]]
    dtype = _check_dtypes(x, dy, dh_n)
    T, B, _ = x.shape
    H = w_hh.shape[1]

    dx = np.zeros_like(x)
    dw_ih = np.zeros_like(w_ih)
    dw_hh = np.zeros_like(w_hh)
    db = np.zeros(H, dtype=dtype)
    dh = _zeros_or_copy(dh_n, (B, H), dtype)    # gradient w.r.t. the running state

    for s in reversed(range(T)):
        rows, times = _schedule(s, lengths, reverse)
        g = dh[rows] + dy[times, rows]           # d loss / d h_new
        da = g * dactivation(h_out[times, rows])  # d loss / d pre-activation
        dx[times, rows] = _mm(da, w_ih, bf16)
        dw_ih += _mm(da.T, x[times, rows], bf16)
        dw_hh += _mm(da.T, h_prev[times, rows], bf16)
        db += da.sum(axis=0)
        dh[rows] = _mm(da, w_hh, bf16)

    db_ih, db_hh = (db, db.copy()) if has_bias else (None, None)
    dw_ih, dw_hh = _weight_grads_into(out, accumulate, dw_ih, dw_hh)
    return _gradient_by_id(dx, cache), dh, dw_ih, dw_hh, db_ih, db_hh


# --------------------------------------------------------------------------
# LSTM
# --------------------------------------------------------------------------

def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False,
                 training=True, bf16=False, out=None, x_ids=None):
    """Single-layer, single-direction LSTM (gates i, f, g, o).

    x (T, B, I); h0, c0 (B, H) or None; w_ih (4H, I); w_hh (4H, H);
    b_ih, b_hh (4H,) or both None; lengths (B,) ints or None.
    Returns y (T, B, H), h_n (B, H), c_n (B, H), cache (dict or None).
    """
    x, by_id = _rows_by_id(x, x_ids)
    dtype = _check_dtypes(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    T, B, _ = x.shape
    H = w_hh.shape[1]
    lengths = _as_lengths(lengths, T, B)

    h = _zeros_or_copy(h0, (B, H), dtype)
    c = _zeros_or_copy(c0, (B, H), dtype)
    y = np.zeros((T, B, H), dtype=dtype)
    h_prev = np.zeros((T, B, H), dtype=dtype)
    c_prev = np.zeros((T, B, H), dtype=dtype)
    c_out = np.zeros((T, B, H), dtype=dtype)
    gates = np.zeros((T, B, 4 * H), dtype=dtype)

    for s in range(T):
        rows, times = _schedule(s, lengths, reverse)
        hp, cp = h[rows], c[rows]
        a = _mm(x[times, rows], w_ih.T, bf16) + _mm(hp, w_hh.T, bf16)
        if b_ih is not None:
            a = a + b_ih + b_hh
        i = _sigmoid(a[:, 0 * H:1 * H])
        f = _sigmoid(a[:, 1 * H:2 * H])
        g = np.tanh(a[:, 2 * H:3 * H])
        o = _sigmoid(a[:, 3 * H:4 * H])
        c_new = f * cp + i * g
        h_new = o * np.tanh(c_new)

        h_prev[times, rows] = hp
        c_prev[times, rows] = cp
        gates[times, rows] = np.concatenate([i, f, g, o], axis=1)
        c_out[times, rows] = c_new
        y[times, rows] = h_new
        h[rows] = h_new
        c[rows] = c_new

    cache = None
    if training:
        cache = {"x": x, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh,
                 "lengths": lengths, "reverse": reverse, "bf16": bf16, "by_id": by_id,
                 "h_prev": h_prev, "c_prev": c_prev, "gates": gates, "c": c_out}
    return _into(out, y), h, c, cache


def lstm_backward(dy, dh_n, dc_n, cache, out=None, accumulate=False):
    """Gradients of the LSTM.

    dy (T, B, H) (padded steps ignored); dh_n, dc_n (B, H) or None.
    Returns dx (T, B, I), dh0 (B, H), dc0 (B, H), dw_ih (4H, I), dw_hh (4H, H),
    db_ih (4H,), db_hh (4H,) -- the last two None when there is no bias.
    """
    x, w_ih, w_hh = cache["x"], cache["w_ih"], cache["w_hh"]
    has_bias = cache["b_ih"] is not None
    lengths, reverse = cache["lengths"], cache["reverse"]
    bf16 = cache.get("bf16", False)   # products as forward ran them
    dtype = _check_dtypes(x, dy, dh_n, dc_n)
    T, B, _ = x.shape
    H = w_hh.shape[1]

    dx = np.zeros_like(x)
    dw_ih = np.zeros_like(w_ih)
    dw_hh = np.zeros_like(w_hh)
    db = np.zeros(4 * H, dtype=dtype)
    dh = _zeros_or_copy(dh_n, (B, H), dtype)
    dc = _zeros_or_copy(dc_n, (B, H), dtype)

    for s in reversed(range(T)):
        rows, times = _schedule(s, lengths, reverse)
        gts = cache["gates"][times, rows]
        i, f = gts[:, 0 * H:1 * H], gts[:, 1 * H:2 * H]
        g, o = gts[:, 2 * H:3 * H], gts[:, 3 * H:4 * H]
        cp = cache["c_prev"][times, rows]
        hp = cache["h_prev"][times, rows]
        tanh_c = np.tanh(cache["c"][times, rows])

        dh_new = dh[rows] + dy[times, rows]                    # d loss / d h'
        dc_new = dc[rows] + dh_new * o * (1.0 - tanh_c * tanh_c)  # d loss / d c'
        do = dh_new * tanh_c
        di = dc_new * g
        df = dc_new * cp
        dg = dc_new * i
        # back through the activations to the pre-activations a_i, a_f, a_g, a_o
        da = np.concatenate([di * i * (1.0 - i),
                             df * f * (1.0 - f),
                             dg * (1.0 - g * g),
                             do * o * (1.0 - o)], axis=1)

        dx[times, rows] = _mm(da, w_ih, bf16)
        dw_ih += _mm(da.T, x[times, rows], bf16)
        dw_hh += _mm(da.T, hp, bf16)
        db += da.sum(axis=0)
        dh[rows] = _mm(da, w_hh, bf16)
        dc[rows] = dc_new * f

    db_ih, db_hh = (db, db.copy()) if has_bias else (None, None)
    dw_ih, dw_hh = _weight_grads_into(out, accumulate, dw_ih, dw_hh)
    return _gradient_by_id(dx, cache), dh, dc, dw_ih, dw_hh, db_ih, db_hh



# --------------------------------------------------------------------------
# LSTM with projection (torch's proj_size): h_t = (o * tanh(c_t)) W_hr^T
# --------------------------------------------------------------------------

def lstmp_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths=None, reverse=False,
                  training=True, out=None):
    """One direction of an LSTM with projection, same contract as lstm_forward.

    x (T,B,I), h0 (B,P) or None, c0 (B,H) or None, w_ih (4H,I), w_hh (4H,P),
    b_ih/b_hh (4H,) or None, w_hr (P,H).  -> y (T,B,P), h_n (B,P), c_n (B,H), cache.
    Padded steps (t >= lengths[b]) leave the state untouched and output 0, so
    the forward direction ends at each sequence's last valid step and the
    reverse direction starts there.
    """
    T, B, I = x.shape
    H, P = w_hr.shape[1], w_hr.shape[0]
    dt = x.dtype
    lengths = None if lengths is None else _as_lengths(lengths, T, B)
    # input contribution of every step in one GEMM; biases folded in
    xw = (x.reshape(T * B, I) @ w_ih.T).reshape(T, B, 4 * H)          # (T, B, 4H)
    if b_ih is not None:
        xw += b_ih + b_hh
    r = np.zeros((B, P), dt) if h0 is None else np.array(h0, dt)       # (B, P) projected h
    c = np.zeros((B, H), dt) if c0 is None else np.array(c0, dt)       # (B, H)
    y = np.zeros((T, B, P), dt)                                        # (T, B, P)
    valid = None if lengths is None else np.arange(T)[:, None] < lengths[None, :]  # (T, B)
    if training:
        gates = np.empty((T, B, 4 * H), dt)  # activated i, f, g, o   (T, B, 4H)
        c_prev = np.empty((T, B, H), dt)     # c entering step t     (T, B, H)
        r_prev = np.empty((T, B, P), dt)     # r entering step t     (T, B, P)
        tanh_c = np.empty((T, B, H), dt)     # tanh(c) after step t  (T, B, H)
    for t in (reversed(range(T)) if reverse else range(T)):
        a = xw[t] + r @ w_hh.T                                         # (B, 4H)
        i, f = _sigmoid(a[:, :H]), _sigmoid(a[:, H:2 * H])             # (B, H) each
        g, o = np.tanh(a[:, 2 * H:3 * H]), _sigmoid(a[:, 3 * H:])      # (B, H) each
        c_new = f * c + i * g                                          # (B, H)
        tc = np.tanh(c_new)                                            # (B, H)
        r_new = (o * tc) @ w_hr.T                                      # (B, P)
        if training:
            gates[t] = np.concatenate([i, f, g, o], axis=1)
            c_prev[t], r_prev[t], tanh_c[t] = c, r, tc
        if valid is not None:  # finished / not yet started sequences keep their state
            v = valid[t][:, None]                                      # (B, 1)
            c_new = np.where(v, c_new, c)
            r_new = np.where(v, r_new, r)
            y[t] = np.where(v, r_new, 0)
        else:
            y[t] = r_new
        c, r = c_new, r_new
    cache = None
    if training:
        cache = dict(x=x, w_ih=w_ih, w_hh=w_hh, w_hr=w_hr, bias=b_ih is not None,
                     reverse=reverse, valid=valid, gates=gates, c_prev=c_prev,
                     r_prev=r_prev, tanh_c=tanh_c)
    return _into(out, y), r, c, cache


def lstmp_backward(dy, dh_n, dc_n, cache, out=None, accumulate=False):
    """Backward of `lstmp_forward`.

    dy (T,B,P), dh_n (B,P) or None, dc_n (B,H) or None.
    -> dx (T,B,I), dh0 (B,P), dc0 (B,H), dw_ih, dw_hh, db_ih, db_hh, dw_hr.
    """
    if cache is None:
        raise RuntimeError("backward: forward ran with training=False, nothing was cached")
    x, w_ih, w_hh, w_hr = cache["x"], cache["w_ih"], cache["w_hh"], cache["w_hr"]
    gates, valid = cache["gates"], cache["valid"]
    T, B, I = x.shape
    H, P = w_hr.shape[1], w_hr.shape[0]
    dt = x.dtype
    dr = np.zeros((B, P), dt) if dh_n is None else np.array(dh_n, dt)  # dL/d r after step
    dc = np.zeros((B, H), dt) if dc_n is None else np.array(dc_n, dt)  # dL/d c after step
    da_all = np.empty((T, B, 4 * H), dt)        # gate pre-activation grads   (T, B, 4H)
    dw_hh = np.zeros_like(w_hh)                 # (4H, P)
    dw_hr = np.zeros_like(w_hr)                 # (P, H)
    # walk the steps in the opposite order of the forward pass
    for t in (range(T) if cache["reverse"] else reversed(range(T))):
        i, f = gates[t, :, :H], gates[t, :, H:2 * H]                    # (B, H) each
        g, o = gates[t, :, 2 * H:3 * H], gates[t, :, 3 * H:]
        tc = cache["tanh_c"][t]                                         # (B, H)
        dr_t = dr + dy[t]                                               # (B, P)
        dc_t = dc                                                       # (B, H)
        if valid is not None:  # padded steps pass gradients through untouched
            v = valid[t][:, None]                                       # (B, 1)
            dr_t = np.where(v, dr_t, 0)
            dc_t = np.where(v, dc_t, 0)
        h = o * tc                                                      # (B, H)
        dw_hr += dr_t.T @ h
        dh = dr_t @ w_hr                                                # (B, H)
        dc_t = dc_t + dh * o * (1 - tc * tc)                            # (B, H)
        da = np.concatenate([dc_t * g * i * (1 - i),                    # d a_i
                             dc_t * cache["c_prev"][t] * f * (1 - f),   # d a_f
                             dc_t * i * (1 - g * g),                    # d a_g
                             dh * tc * o * (1 - o)], axis=1)            # d a_o  (B, 4H)
        da_all[t] = da
        dw_hh += da.T @ cache["r_prev"][t]
        dr_prev = da @ w_hh                                             # (B, P)
        dc_prev = dc_t * f                                              # (B, H)
        if valid is not None:
            dr_prev = np.where(v, dr_prev, dr)
            dc_prev = np.where(v, dc_prev, dc)
        dr, dc = dr_prev, dc_prev
    da2 = da_all.reshape(T * B, 4 * H)                                  # (T·B, 4H)
    dx = (da2 @ w_ih).reshape(T, B, I)                                  # (T, B, I)
    dw_ih = da2.T @ x.reshape(T * B, I)                                 # (4H, I)
    db = da2.sum(axis=0) if cache["bias"] else None                     # (4H,)
    dw_ih, dw_hh, dw_hr = _weight_grads_into(out, accumulate, dw_ih, dw_hh, dw_hr)
    return dx, dr, dc, dw_ih, dw_hh, db, None if db is None else db.copy(), dw_hr


# --------------------------------------------------------------------------
# GRU
# --------------------------------------------------------------------------

def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True,
                bf16=False, out=None, x_ids=None, reset_after=True):
    """Single-layer, single-direction GRU (gates r, z, n).

    x (T, B, I); h0 (B, H) or None; w_ih (3H, I); w_hh (3H, H);
    b_ih, b_hh (3H,) or both None; lengths (B,) ints or None.
    Returns y (T, B, H), h_n (B, H), cache (dict or None).

    reset_after=True (torch's form, "linear before reset"):
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    reset_after=False (the seed's and Cho et al.'s form; ONNX linear_before_reset=0,
    Keras reset_after=False): the reset gate scales h before its product,
        n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)
    In both, r, z = sigmoid(W_i{r,z} x + b_i{r,z} + W_h{r,z} h + b_h{r,z}) and
    h' = (1 - z) * n + z * h (the seed writes h' = (1 - z) h + z n: its z is this 1 - z,
    the same model with W_z and b_z negated).
    """
    x, by_id = _rows_by_id(x, x_ids)
    dtype = _check_dtypes(x, h0, w_ih, w_hh, b_ih, b_hh)
    T, B, _ = x.shape
    H = w_hh.shape[1]
    lengths = _as_lengths(lengths, T, B)

    h = _zeros_or_copy(h0, (B, H), dtype)
    y = np.zeros((T, B, H), dtype=dtype)
    h_prev = np.zeros((T, B, H), dtype=dtype)
    gates = np.zeros((T, B, 3 * H), dtype=dtype)
    hn_all = np.zeros((T, B, H), dtype=dtype)

    for s in range(T):
        rows, times = _schedule(s, lengths, reverse)
        hp = h[rows]
        gi = _mm(x[times, rows], w_ih.T, bf16)   # (nb, 3H) input side
        gh = _mm(hp, w_hh[:2 * H].T if not reset_after else w_hh.T, bf16)   # hidden side
        if b_ih is not None:
            gi = gi + b_ih
            gh = gh + b_hh[:gh.shape[1]]
        r = _sigmoid(gi[:, 0 * H:1 * H] + gh[:, 0 * H:1 * H])
        z = _sigmoid(gi[:, 1 * H:2 * H] + gh[:, 1 * H:2 * H])
        if reset_after:
            hn = gh[:, 2 * H:3 * H]              # W_hn h + b_hn
            n = np.tanh(gi[:, 2 * H:3 * H] + r * hn)
        else:
            hn = _mm(r * hp, w_hh[2 * H:].T, bf16)    # W_hn (r * h) + b_hn
            if b_ih is not None:
                hn = hn + b_hh[2 * H:]
            n = np.tanh(gi[:, 2 * H:3 * H] + hn)
        h_new = (1.0 - z) * n + z * hp

        h_prev[times, rows] = hp
        gates[times, rows] = np.concatenate([r, z, n], axis=1)
        hn_all[times, rows] = hn
        y[times, rows] = h_new
        h[rows] = h_new

    cache = None
    if training:
        cache = {"x": x, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh,
                 "lengths": lengths, "reverse": reverse, "bf16": bf16, "by_id": by_id,
                 "h_prev": h_prev, "gates": gates, "hn": hn_all, "reset_after": reset_after}
    return _into(out, y), h, cache


def gru_backward(dy, dh_n, cache, out=None, accumulate=False):
    """Gradients of the GRU.

    dy (T, B, H) (padded steps ignored); dh_n (B, H) or None.
    Returns dx (T, B, I), dh0 (B, H), dw_ih (3H, I), dw_hh (3H, H),
    db_ih (3H,), db_hh (3H,) -- the last two None when there is no bias.
    """
    x, w_ih, w_hh = cache["x"], cache["w_ih"], cache["w_hh"]
    has_bias = cache["b_ih"] is not None
    lengths, reverse = cache["lengths"], cache["reverse"]
    bf16 = cache.get("bf16", False)   # products as forward ran them
    reset_after = cache.get("reset_after", True)
    dtype = _check_dtypes(x, dy, dh_n)
    T, B, _ = x.shape
    H = w_hh.shape[1]

    dx = np.zeros_like(x)
    dw_ih = np.zeros_like(w_ih)
    dw_hh = np.zeros_like(w_hh)
    db_ih = np.zeros(3 * H, dtype=dtype)
    db_hh = np.zeros(3 * H, dtype=dtype)
    dh = _zeros_or_copy(dh_n, (B, H), dtype)

    for s in reversed(range(T)):
        rows, times = _schedule(s, lengths, reverse)
        gts = cache["gates"][times, rows]
        r, z, n = gts[:, 0 * H:1 * H], gts[:, 1 * H:2 * H], gts[:, 2 * H:3 * H]
        hn = cache["hn"][times, rows]
        hp = cache["h_prev"][times, rows]

        dh_new = dh[rows] + dy[times, rows]       # d loss / d h'
        dn = dh_new * (1.0 - z)
        dz = dh_new * (hp - n)
        da_n = dn * (1.0 - n * n)                 # d loss / d (xn + r*hn) (or + hn)
        if reset_after:
            dr = da_n * hn
        else:
            drh = _mm(da_n, w_hh[2 * H:], bf16)   # d loss / d (r * h)
            dr = drh * hp
        da_r = dr * r * (1.0 - r)
        da_z = dz * z * (1.0 - z)
        dgi = np.concatenate([da_r, da_z, da_n], axis=1)       # d loss / d gi

        dx[times, rows] = _mm(dgi, w_ih, bf16)
        dw_ih += _mm(dgi.T, x[times, rows], bf16)
        db_ih += dgi.sum(axis=0)
        if reset_after:
            dgh = np.concatenate([da_r, da_z, da_n * r], axis=1)   # d loss / d gh
            dw_hh += _mm(dgh.T, hp, bf16)
            db_hh += dgh.sum(axis=0)
            dh[rows] = _mm(dgh, w_hh, bf16) + dh_new * z
        else:
            drz = np.concatenate([da_r, da_z], axis=1)            # d loss / d (W_h{r,z} h)
            dw_hh[:2 * H] += _mm(drz.T, hp, bf16)
            dw_hh[2 * H:] += _mm(da_n.T, r * hp, bf16)
            db_hh += dgi.sum(axis=0)
            dh[rows] = _mm(drz, w_hh[:2 * H], bf16) + drh * r + dh_new * z

    if not has_bias:
        db_ih = db_hh = None
    dw_ih, dw_hh = _weight_grads_into(out, accumulate, dw_ih, dw_hh)
    return _gradient_by_id(dx, cache), dh, dw_ih, dw_hh, db_ih, db_hh


# --------------------------------------------------------------------------
# dense layer (fastrnn.nn.Linear; kernel src/_dense.pyx)
# --------------------------------------------------------------------------

def dense_forward(x, w, b):
    """y = x @ w.T + b for x (M, K), w (N, K), b (N,) or None."""
    y = x @ w.T
    return y if b is None else y + b


def dense_backward(dy, x, w):
    """dx = dy @ w, dw = dy.T @ x, db = dy summed over rows, for dy (M, N)."""
    return dy @ w, dy.T @ x, dy.sum(axis=0)
