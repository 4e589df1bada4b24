"""NumPy twins of the quantised kernels (src/quant_gemm.h, src/quant_rnn.h).

Plain time-major loops over the *dequantised* weights, with the activation
quantisation of int8 ``dynamic`` mode reproduced exactly (float32 scale and
rint, exact integer sums), so the kernels can be compared element by element:

    int8 weight-only:  y = (a . q_w) * s_w                     (float32 a)
    int8 dynamic:      y = float32(q_a . q_w) * (s_w * s_a)    q_a = rint(a * 127/max|a|)
    bfloat16:          y = a . bf16(w)                         (float32 a, weight-only)
    bfloat16 dynamic:  y = bf16(a) . bf16(w)                   bf16 = nearest, ties to even
    float32:           y = a . w
"""

import numpy as np

__all__ = ["quantize_rows", "round_bf16", "gemm", "stack_forward", "cell_forward", "linear_forward"]


TINY = np.float32(1e-30)   # rows below it in magnitude count as zeros (127 / amax overflows)


def quantize_rows(a):
    """a (M, K) float32 -> q (M, K) float32 of integers in [-127, 127], scale (M,) float32.
    A row with NaN or inf gets codes 0 and a NaN scale (its products are NaN, as the float
    module's); a row of values all below TINY in magnitude, codes 0 and scale 0 (the
    kernels' qg_row_scale, src/quant_gemm.h)."""
    a = np.asarray(a, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(a).all(axis=1) if a.shape[1] else np.zeros(a.shape[0], bool)
        amax = np.abs(np.where(np.isfinite(a), a, 0)).max(axis=1) if a.shape[1] \
            else np.zeros(a.shape[0], np.float32)
        use = (amax >= TINY) & ~bad
        inv = np.where(use, np.float32(127.0) / np.where(use, amax, 1), 0).astype(np.float32)
        q = np.clip(np.rint((np.where(use[:, None], a, 0) * inv[:, None]).astype(np.float32)),
                    -127, 127)
        scale = np.where(use, amax / np.float32(127.0), 0).astype(np.float32)
    scale[bad] = np.nan
    return q, scale


def round_bf16(a):
    """a float32 -> float32 values rounded to bf16 (nearest, ties to even; NaN stays NaN)."""
    from fastrnn.quantization import bf16_bits, bf16_to_float
    return bf16_to_float(bf16_bits(a))


def gemm(a, stored, scale, qdtype, dynamic):
    """a (M, K) float32 times the stored weights (N, K)^T as the kernels compute it."""
    from fastrnn.quantization import dequantize
    a = np.asarray(a, dtype=np.float32)
    if qdtype == "int8" and dynamic:
        q, sa = quantize_rows(a)
        acc = q.astype(np.float64) @ stored.astype(np.float64).T          # exact integers
        return acc.astype(np.float32) * (scale[None, :] * sa[:, None]).astype(np.float32)
    if qdtype == "int8":
        acc = a.astype(np.float64) @ stored.astype(np.float64).T
        return (acc.astype(np.float32) * scale[None, :]).astype(np.float32)
    if qdtype == "bfloat16" and dynamic:
        a = round_bf16(a)
    w = dequantize(stored, scale, qdtype).astype(np.float64)
    return (a.astype(np.float64) @ w.T).astype(np.float32)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _step(cell, xp, rec, h, c, b_hn):
    """One gate pass (float64): xp = x W_ih^T + b_x, rec = h W_hh^T."""
    H = h.shape[1]
    if cell == "lstm":
        a = xp + rec
        i, f = _sigmoid(a[:, :H]), _sigmoid(a[:, H:2 * H])
        g, o = np.tanh(a[:, 2 * H:3 * H]), _sigmoid(a[:, 3 * H:])
        c = f * c + i * g
        return o * np.tanh(c), c
    if cell == "gru":
        r = _sigmoid(xp[:, :H] + rec[:, :H])
        z = _sigmoid(xp[:, H:2 * H] + rec[:, H:2 * H])
        n = np.tanh(xp[:, 2 * H:] + r * (rec[:, 2 * H:] + b_hn))
        return (1 - z) * n + z * h, c
    a = xp + rec
    if cell == "rnn_tanh":
        return np.tanh(a), c
    if cell == "rnn_relu":
        return np.maximum(a, 0), c
    return a, c


def _run(q, sfx, x, h0, c0, dyn_ih, dyn_hh, reverse):
    """One layer, one direction: x (T, B, I) -> y (T, B, H), h_n, c_n."""
    cell = q._cell_name()
    H = q.hidden_size
    T, B, I = x.shape
    w_ih, s_ih = q._stored(f"weight_ih{sfx}")
    w_hh, s_hh = q._stored(f"weight_hh{sfx}")
    GH = w_hh.shape[0]
    b_x = np.zeros(GH)
    b_hn = np.zeros(H)
    if q.bias:
        b_ih = q._parameters[f"bias_ih{sfx}"].data.astype(np.float64)
        b_hh = q._parameters[f"bias_hh{sfx}"].data.astype(np.float64)
        if cell == "gru":
            b_x = np.concatenate((b_ih[:2 * H] + b_hh[:2 * H], b_ih[2 * H:]))
            b_hn = b_hh[2 * H:]
        else:
            b_x = b_ih + b_hh
    xp = gemm(x.reshape(T * B, I), w_ih, s_ih, q.qdtype, dyn_ih).astype(np.float64)
    xp = xp.reshape(T, B, GH) + b_x
    h = np.zeros((B, H), np.float32) if h0 is None else np.asarray(h0, np.float32)
    c = np.zeros((B, H)) if c0 is None else np.asarray(c0, np.float64)
    y = np.empty((T, B, H), np.float32)
    for t in (reversed(range(T)) if reverse else range(T)):
        rec = gemm(h, w_hh, s_hh, q.qdtype, dyn_hh).astype(np.float64)
        hn, c = _step(cell, xp[t], rec, h.astype(np.float64), c, b_hn)
        h = hn.astype(np.float32)
        y[t] = h
    return y, h, c.astype(np.float32)


def stack_forward(q, x, h0=None, c0=None, dyn_ih=False, dyn_hh=False):
    """Twin of a quantised stack on time-major x (T, B, I) float32 -> y, h_n, c_n."""
    D = 2 if q.bidirectional else 1
    L = q.num_layers
    layer_in = np.asarray(x, np.float32)
    hs, cs = [], []
    for k in range(L):
        ys = []
        for d in range(D):
            r = k * D + d
            sfx = f"_l{k}" + ("_reverse" if d else "")
            y, h, c = _run(q, sfx, layer_in, None if h0 is None else h0[r],
                           None if c0 is None else c0[r], dyn_ih, dyn_hh, bool(d))
            ys.append(y)
            hs.append(h)
            cs.append(c)
        layer_in = np.concatenate(ys, axis=2) if D == 2 else ys[0]
    return layer_in, np.stack(hs), np.stack(cs)


def cell_forward(q, x, h=None, c=None, dyn_ih=False, dyn_hh=False):
    """Twin of a quantised cell on x (B, I) -> h1, c1."""
    _, h1, c1 = _run(q, "", np.asarray(x, np.float32)[None], h, c, dyn_ih, dyn_hh, False)
    return h1, c1


def linear_forward(q, x, dynamic=False):
    """Twin of QuantizedLinear on x (M, K)."""
    stored, scale = q._stored("weight")
    y = gemm(x, stored, scale, q.qdtype, dynamic)
    if q.has_bias:
        y = (y + q._parameters["bias"].data).astype(np.float32)
    return y
