"""Tests of the NumPy reference cells (fastrnn.reference).

* every backward against central finite differences in float64;
* padding semantics (zeros, ignored dy, h_n from the last valid step);
* forward outputs and final states against torch.nn (skipped without torch).
"""

import numpy as np
import pytest

from fastrnn import reference as ref

CELLS = ["rnn_tanh", "rnn_relu", "rnn_identity", "lstm", "gru", "gru_resetbefore"]
GATES = {"rnn": 1, "lstm": 4, "gru": 3}

# (T, B, I, H): main odd shape, a single time step, a single sequence with I > H
SHAPES = [(4, 3, 3, 5), (1, 3, 3, 5), (5, 1, 4, 2)]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def kind_of(cell):
    return cell.split("_")[0]


def make_lengths(T, B):
    """Unsorted lengths covering 1, T and something in between."""
    base = [max(1, T // 2), T, 1]
    return np.array([base[b % 3] for b in range(B)], dtype=np.int64)


def make_problem(cell, T, B, I, H, bias, with_lengths, seed=0, dtype=np.float64):
    """Random inputs for one cell; returns a dict of the arrays the forward takes."""
    rng = np.random.default_rng(seed)
    G = GATES[kind_of(cell)]
    scale = 0.7 / np.sqrt(H)
    p = {
        "x": rng.standard_normal((T, B, I)),
        "h0": 0.5 * rng.standard_normal((B, H)),
        "w_ih": scale * rng.standard_normal((G * H, I)),
        "w_hh": scale * rng.standard_normal((G * H, H)),
    }
    if kind_of(cell) == "lstm":
        p["c0"] = 0.5 * rng.standard_normal((B, H))
    if bias:
        p["b_ih"] = 0.3 * rng.standard_normal(G * H)
        p["b_hh"] = 0.3 * rng.standard_normal(G * H)
    p = {k: v.astype(dtype) for k, v in p.items()}
    p["lengths"] = make_lengths(T, B) if with_lengths else None
    return p


def forward(cell, p, reverse=False, training=True):
    """Run the reference forward; returns (y, tuple of final states, cache)."""
    kind = kind_of(cell)
    args = dict(lengths=p["lengths"], reverse=reverse, training=training)
    b_ih, b_hh = p.get("b_ih"), p.get("b_hh")
    if kind == "rnn":
        y, h, cache = ref.rnn_forward(p["x"], p["h0"], p["w_ih"], p["w_hh"], b_ih, b_hh,
                                      nonlinearity=cell.split("_")[1], **args)
        return y, (h,), cache
    if kind == "lstm":
        y, h, c, cache = ref.lstm_forward(p["x"], p["h0"], p["c0"], p["w_ih"], p["w_hh"],
                                          b_ih, b_hh, **args)
        return y, (h, c), cache
    y, h, cache = ref.gru_forward(p["x"], p["h0"], p["w_ih"], p["w_hh"], b_ih, b_hh,
                                  reset_after=cell != "gru_resetbefore", **args)
    return y, (h,), cache


def backward(cell, dy, dstates, cache):
    """Run the reference backward; returns a dict name -> gradient."""
    kind = kind_of(cell)
    if kind == "lstm":
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh = ref.lstm_backward(dy, dstates[0], dstates[1], cache)
        grads = {"x": dx, "h0": dh0, "c0": dc0}
    else:
        fn = ref.rnn_backward if kind == "rnn" else ref.gru_backward
        dx, dh0, dw_ih, dw_hh, db_ih, db_hh = fn(dy, dstates[0], cache)
        grads = {"x": dx, "h0": dh0}
    grads.update(w_ih=dw_ih, w_hh=dw_hh, b_ih=db_ih, b_hh=db_hh)
    return grads


def valid_mask(T, lengths, B):
    """(T, B) bool: True where t < lengths[b]."""
    if lengths is None:
        return np.ones((T, B), dtype=bool)
    return np.arange(T)[:, None] < np.asarray(lengths)[None, :]


def rnn_preactivations(p, cache):
    """RNN pre-activations at every step (from the cached entering states)."""
    a = p["x"] @ p["w_ih"].T + cache["h_prev"] @ p["w_hh"].T
    if "b_ih" in p:
        a = a + p["b_ih"] + p["b_hh"]
    return a


def rel_err(a, b):
    scale = max(np.abs(a).max(), np.abs(b).max())
    return 0.0 if scale == 0 else np.abs(a - b).max() / scale


# --------------------------------------------------------------------------
# finite differences
# --------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("cell", CELLS)
def test_backward_matches_finite_differences(cell, shape, bias, with_lengths, reverse):
    T, B, I, H = shape
    seed = 0
    p = make_problem(cell, T, B, I, H, bias, with_lengths, seed=seed)
    if cell == "rnn_relu":
        # Keep every valid pre-activation away from the kink at 0.
        while True:
            _, _, cache = forward(cell, p, reverse)
            a = rnn_preactivations(p, cache)[valid_mask(T, p["lengths"], B)]
            if np.abs(a).min() > 1e-3:
                break
            seed += 1
            p = make_problem(cell, T, B, I, H, bias, with_lengths, seed=seed)

    rng = np.random.default_rng(100 + seed)
    y, states, cache = forward(cell, p, reverse)
    R = rng.standard_normal(y.shape)                  # includes padded steps on purpose
    S = [rng.standard_normal(s.shape) for s in states]

    def loss(q):
        y_, states_, _ = forward(cell, q, reverse, training=False)
        return np.sum(y_ * R) + sum(np.sum(s_ * S_) for s_, S_ in zip(states_, S))

    grads = backward(cell, R, S, cache)
    if not bias:
        assert grads["b_ih"] is None and grads["b_hh"] is None

    eps = 1e-6
    names = [k for k in p if k != "lengths"]
    assert set(names) == {k for k, v in grads.items() if v is not None}
    for name in names:
        numeric = np.zeros_like(p[name])
        for idx in np.ndindex(p[name].shape):
            q = {k: (v.copy() if k == name else v) for k, v in p.items()}
            q[name][idx] += eps
            up = loss(q)
            q[name][idx] -= 2 * eps
            down = loss(q)
            numeric[idx] = (up - down) / (2 * eps)
        analytic = grads[name]
        assert analytic.shape == numeric.shape and analytic.dtype == np.float64
        err = rel_err(analytic, numeric)
        assert err <= 1e-6, "%s: rel err %.3g" % (name, err)


# --------------------------------------------------------------------------
# padding, defaults, dtypes
# --------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS)
def test_padding_semantics(cell, reverse):
    T, B, I, H = 6, 4, 3, 5
    p = make_problem(cell, T, B, I, H, True, False, seed=3)
    p["lengths"] = np.array([3, 6, 1, 4])
    y, states, cache = forward(cell, p, reverse)
    valid = valid_mask(T, p["lengths"], B)

    # outputs at padded steps are exactly zero
    assert np.all(y[~valid] == 0.0)
    # h_n is the state after the last consumed step
    for b, L in enumerate(p["lengths"]):
        last = 0 if reverse else L - 1
        np.testing.assert_array_equal(states[0][b], y[last, b])

    # each sequence alone, truncated to its length, gives the same result
    for b, L in enumerate(p["lengths"]):
        q = dict(p, x=p["x"][:L, b:b + 1].copy(), h0=p["h0"][b:b + 1], lengths=None)
        if "c0" in p:
            q["c0"] = p["c0"][b:b + 1]
        y_b, states_b, _ = forward(cell, q, reverse)
        np.testing.assert_allclose(y[:L, b], y_b[:, 0], rtol=0, atol=1e-14)
        for s, s_b in zip(states, states_b):
            np.testing.assert_allclose(s[b], s_b[0], rtol=0, atol=1e-14)

    # dy at padded steps is ignored and dx there is zero
    rng = np.random.default_rng(7)
    dy = rng.standard_normal(y.shape)
    dstates = [rng.standard_normal(s.shape) for s in states]
    g1 = backward(cell, dy, dstates, cache)
    dy2 = dy.copy()
    dy2[~valid] = 1e3
    g2 = backward(cell, dy2, dstates, cache)
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k])
    assert np.all(g1["x"][~valid] == 0.0)


@pytest.mark.parametrize("cell", CELLS)
def test_none_states_mean_zeros_and_training_false(cell):
    T, B, I, H = 3, 2, 3, 4
    p = make_problem(cell, T, B, I, H, True, True, seed=5)
    zero = dict(p, h0=np.zeros_like(p["h0"]))
    none = dict(p, h0=None)
    if "c0" in p:
        zero["c0"] = np.zeros_like(p["c0"])
        none["c0"] = None
    y0, s0, c0 = forward(cell, zero)
    y1, s1, c1 = forward(cell, none)
    y2, s2, c2 = forward(cell, none, training=False)
    assert c2 is None and isinstance(c1, dict)
    for a, b, c in zip((y0,) + s0, (y1,) + s1, (y2,) + s2):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)

    dy = np.random.default_rng(1).standard_normal(y0.shape)
    g_none = backward(cell, dy, [None] * len(s0), c1)
    g_zero = backward(cell, dy, [np.zeros_like(s) for s in s0], c1)
    for k in g_none:
        np.testing.assert_array_equal(g_none[k], g_zero[k])


@pytest.mark.parametrize("cell", CELLS)
def test_backward_returns_fresh_arrays_and_keeps_inputs(cell):
    T, B, I, H = 3, 2, 3, 4
    p = make_problem(cell, T, B, I, H, True, True, seed=6)
    saved = {k: v.copy() for k, v in p.items() if v is not None}
    y, states, cache = forward(cell, p)
    rng = np.random.default_rng(2)
    dy = rng.standard_normal(y.shape)
    dstates = [rng.standard_normal(s.shape) for s in states]
    dy_saved = dy.copy()
    dstates_saved = [d.copy() for d in dstates]
    grads = backward(cell, dy, dstates, cache)
    backward(cell, dy, dstates, cache)           # the cache survives a backward

    arrays = list(grads.values()) + [dy] + dstates + [v for v in p.values() if v is not None]
    for i, a in enumerate(grads.values()):
        for j, b in enumerate(arrays):
            if i != j:
                assert not np.shares_memory(a, b)
    for k, v in saved.items():
        np.testing.assert_array_equal(p[k], v)
    np.testing.assert_array_equal(dy, dy_saved)
    for d, d_saved in zip(dstates, dstates_saved):
        np.testing.assert_array_equal(d, d_saved)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS)
def test_float32_works_in_float32(cell, reverse):
    T, B, I, H = 4, 3, 3, 5
    p64 = make_problem(cell, T, B, I, H, True, True, seed=8)
    p32 = {k: (v.astype(np.float32) if k != "lengths" else v) for k, v in p64.items()}
    y64, s64, c64 = forward(cell, p64, reverse)
    y32, s32, c32 = forward(cell, p32, reverse)
    for a32, a64 in zip((y32,) + s32, (y64,) + s64):
        assert a32.dtype == np.float32
        np.testing.assert_allclose(a32, a64, rtol=0, atol=1e-5)
    dy = np.random.default_rng(3).standard_normal(y64.shape)
    g64 = backward(cell, dy, [None] * len(s64), c64)
    g32 = backward(cell, dy.astype(np.float32), [None] * len(s32), c32)
    for k in g64:
        assert g32[k].dtype == np.float32
        np.testing.assert_allclose(g32[k], g64[k], rtol=0, atol=1e-4)


def test_dtype_mismatch_is_rejected():
    p = make_problem("gru", 2, 2, 3, 4, True, False)
    with pytest.raises(AssertionError):
        ref.gru_forward(p["x"].astype(np.float32), p["h0"], p["w_ih"], p["w_hh"],
                        p["b_ih"], p["b_hh"])


# --------------------------------------------------------------------------
# torch.nn agreement
# --------------------------------------------------------------------------

TORCH_CELLS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]   # torch has no identity RNN


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(4, 3, 3, 5), (5, 1, 4, 2), (1, 2, 3, 5)],
                         ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_forward_matches_torch(cell, shape, bias, with_lengths, reverse):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    T, B, I, H = shape
    kind = kind_of(cell)
    p = make_problem(cell, T, B, I, H, bias, with_lengths, seed=11)
    y, states, _ = forward(cell, p, reverse, training=False)

    kwargs = dict(input_size=I, hidden_size=H, bias=bias, bidirectional=reverse)
    if kind == "rnn":
        layer = torch.nn.RNN(nonlinearity=cell.split("_")[1], **kwargs)
    elif kind == "lstm":
        layer = torch.nn.LSTM(**kwargs)
    else:
        layer = torch.nn.GRU(**kwargs)
    layer = layer.double()
    suffix = "_reverse" if reverse else ""
    with torch.no_grad():
        for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
            if name in p:
                torch_name = name.replace("w_", "weight_").replace("b_", "bias_") + "_l0" + suffix
                getattr(layer, torch_name).copy_(torch.from_numpy(p[name]))

    D = 2 if reverse else 1

    def initial(state):
        # our state goes in the last direction slot; the forward half gets random values
        full = np.random.default_rng(12).standard_normal((D,) + state.shape)
        full[-1] = state
        return torch.from_numpy(full)

    hx = initial(p["h0"])
    if kind == "lstm":
        hx = (hx, initial(p["c0"]))

    inp = torch.from_numpy(p["x"])
    if with_lengths:
        inp = pack_padded_sequence(inp, torch.from_numpy(p["lengths"]), enforce_sorted=False)
    with torch.no_grad():
        out, hn = layer(inp, hx)
    if with_lengths:
        out, _ = pad_packed_sequence(out, total_length=T)
    out = out.numpy()[:, :, (D - 1) * H:]
    hn = hn if kind == "lstm" else (hn,)

    np.testing.assert_allclose(y, out, rtol=0, atol=1e-10)
    for ours, theirs in zip(states, hn):
        np.testing.assert_allclose(ours, theirs[-1].numpy(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("bias", [True, False])
def test_gru_reset_before_is_the_seeds_formula(bias):
    """reset_after=False is the seed's GRU (Cho et al.'s; ONNX linear_before_reset=0),
    step by step by hand: z = sigmoid(W_z [h, x]), r = sigmoid(W_r [h, x]),
    n = tanh(W [r * h, x]), h' = (1 - z) h + z n, with the seed's z = 1 - ours."""
    T, B, I, H = 3, 2, 4, 5
    p = make_problem("gru", T, B, I, H, bias, False, seed=3)
    y, h_n, _ = ref.gru_forward(p["x"], p["h0"], p["w_ih"], p["w_hh"], p.get("b_ih"),
                                p.get("b_hh"), reset_after=False)
    sig = lambda a: 1 / (1 + np.exp(-a))
    W = lambda g: np.concatenate([p["w_hh"][g * H:(g + 1) * H], p["w_ih"][g * H:(g + 1) * H]], 1)
    b = lambda g: (p["b_ih"] + p["b_hh"])[g * H:(g + 1) * H] if bias else 0
    h = p["h0"]
    for t in range(T):
        hx = np.concatenate([h, p["x"][t]], 1)
        z_seed = sig(-(hx @ W(1).T + b(1)))           # the seed's z: our z's weights negated
        r = sig(hx @ W(0).T + b(0))
        n = np.tanh(np.concatenate([r * h, p["x"][t]], 1) @ W(2).T + b(2))
        h = (1 - z_seed) * h + z_seed * n
        np.testing.assert_allclose(y[t], h, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(h_n, h, rtol=1e-13, atol=1e-13)
