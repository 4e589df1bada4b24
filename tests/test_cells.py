"""RNNCell / LSTMCell / GRUCell: torch equivalence, step-by-step BPTT, checks.

BPTT over T steps with the cell's cache stack must give the same gradients
as the sequence layer (fastrnn.RNN/LSTM/GRU) with the same weights, and as
torch.nn's cells unrolled in a loop.
"""

import numpy as np
import pytest

import fastrnn

T, B, I, H = 4, 3, 5, 6
CELLS = ["rnn_tanh", "rnn_relu", "rnn_identity", "lstm", "gru"]
TOL = {np.float32: 1e-4, np.float64: 1e-8}


def make_cell(kind, dtype=np.float64, bias=True, seed=0):
    if kind.startswith("rnn"):
        return fastrnn.RNNCell(I, H, bias=bias, nonlinearity=kind.split("_")[1], dtype=dtype,
                               seed=seed)
    cls = fastrnn.LSTMCell if kind == "lstm" else fastrnn.GRUCell
    return cls(I, H, bias=bias, dtype=dtype, seed=seed)


def make_layer_like(cell, kind):
    """A 1-layer sequence module holding the cell's weights (names get an _l0 suffix)."""
    dtype = cell.dtype
    if kind.startswith("rnn"):
        layer = fastrnn.RNN(I, H, nonlinearity=cell.nonlinearity, bias=cell.bias, dtype=dtype)
    elif kind == "lstm":
        layer = fastrnn.LSTM(I, H, bias=cell.bias, dtype=dtype)
    else:
        layer = fastrnn.GRU(I, H, bias=cell.bias, dtype=dtype)
    layer.load_state_dict({k + "_l0": v for k, v in cell.state_dict().items()})
    return layer


def unroll(cell, kind, x, state):
    """Forward T steps; returns per-step h (T,B,H) and the final state."""
    hs = []
    for t in range(x.shape[0]):
        state = cell(x[t], state)
        hs.append(state[0] if kind == "lstm" else state)
    return np.stack(hs), state


def bptt(cell, kind, dys, dstate):
    """Backward T steps, last first; returns dx (T,B,I) and d(initial state)."""
    dxs = []
    if kind == "lstm":
        dh, dc = dstate
        for t in reversed(range(len(dys))):
            dx, (dh, dc) = cell.backward(dh + dys[t], dc)
            dxs.append(dx)
        return np.stack(dxs[::-1]), (dh, dc)
    dh = dstate
    for t in reversed(range(len(dys))):
        dx, dh = cell.backward(dh + dys[t])
        dxs.append(dx)
    return np.stack(dxs[::-1]), dh


def assert_close(ours, ref, tol, what):
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    err = float(np.max(np.abs(ours - ref)))
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} x {scale:.3g}"


def problem(kind, dtype, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, I)).astype(dtype)            # (T, B, I)
    h0 = 0.5 * rng.standard_normal((B, H)).astype(dtype)        # (B, H)
    state = (h0, 0.5 * rng.standard_normal((B, H)).astype(dtype)) if kind == "lstm" else h0
    dys = rng.standard_normal((T, B, H)).astype(dtype)          # (T, B, H)
    dfinal = tuple(rng.standard_normal((B, H)).astype(dtype) for _ in range(2))
    return x, state, dys, dfinal if kind == "lstm" else dfinal[0]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", CELLS)
def test_bptt_matches_sequence_layer(kind, dtype, bias):
    cell = make_cell(kind, dtype, bias)
    layer = make_layer_like(cell, kind)
    x, state, dys, dfinal = problem(kind, dtype)
    hs, final = unroll(cell, kind, x, state)
    assert cell.num_cached_steps == T
    dx, dstate0 = bptt(cell, kind, dys, dfinal)
    assert cell.num_cached_steps == 0

    out, lfinal = layer(x, tuple(s[None] for s in state) if kind == "lstm" else state[None])
    ldx, ldstate0 = layer.backward(dys, tuple(d[None] for d in dfinal) if kind == "lstm"
                                   else dfinal[None])
    tol = TOL[dtype]
    assert_close(hs, out, tol, "h per step")
    pairs = zip(final, lfinal) if kind == "lstm" else [(final, lfinal)]
    for a, b in pairs:
        assert_close(a, b[0], tol, "final state")
    assert_close(dx, ldx, tol, "dx")
    pairs = zip(dstate0, ldstate0) if kind == "lstm" else [(dstate0, ldstate0)]
    for a, b in pairs:
        assert_close(a, b[0], tol, "d initial state")
    for (n, p), (ln, lp) in zip(cell.named_parameters(), layer.named_parameters()):
        assert ln == n + "_l0"
        assert_close(p.grad, lp.grad, tol, "grad " + n)


@pytest.mark.parametrize("kind", CELLS[:2] + CELLS[3:])
def test_matches_torch_cells(kind):
    torch = pytest.importorskip("torch")
    cell = make_cell(kind, np.float64)
    if kind == "lstm":
        tcell = torch.nn.LSTMCell(I, H, dtype=torch.float64)
    elif kind == "gru":
        tcell = torch.nn.GRUCell(I, H, dtype=torch.float64)
    else:
        tcell = torch.nn.RNNCell(I, H, nonlinearity=kind.split("_")[1], dtype=torch.float64)
    assert [n for n, _ in cell.named_parameters()] == [n for n, _ in tcell.named_parameters()]
    tcell.load_state_dict({k: torch.from_numpy(v) for k, v in cell.state_dict().items()})
    x, state, dys, dfinal = problem(kind, np.float64)
    hs, final = unroll(cell, kind, x, state)
    dx, dstate0 = bptt(cell, kind, dys, dfinal)

    xt = torch.tensor(x, requires_grad=True)
    st = tuple(torch.tensor(s, requires_grad=True) for s in (state if kind == "lstm" else (state,)))
    s = st if kind == "lstm" else st[0]
    loss = 0
    for t in range(T):
        s = tcell(xt[t], s)
        loss = loss + ((s[0] if kind == "lstm" else s) * torch.from_numpy(dys[t])).sum()
    for a, d in zip(s if kind == "lstm" else (s,), dfinal if kind == "lstm" else (dfinal,)):
        loss = loss + (a * torch.from_numpy(d)).sum()
    loss.backward()
    assert_close(hs[-1], (s[0] if kind == "lstm" else s).detach().numpy(), 1e-8, "h_T")
    assert_close(dx, xt.grad.numpy(), 1e-8, "dx")
    for a, b in zip(dstate0 if kind == "lstm" else (dstate0,), st):
        assert_close(a, b.grad.numpy(), 1e-8, "d state0")
    for (n, p), (_, tp) in zip(cell.named_parameters(), tcell.named_parameters()):
        assert_close(p.grad, tp.grad.numpy(), 1e-8, "grad " + n)


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_unbatched_input(kind):
    """x (I,) and h (H,) work like a batch of one, as in torch."""
    cell = make_cell(kind)
    x, state, _, _ = problem(kind, np.float64)
    s1 = tuple(s[0] for s in state) if kind == "lstm" else state[0]
    out1 = cell(x[0, 0], s1)
    outb = cell(x[0, :1], tuple(s[:1] for s in state) if kind == "lstm" else state[:1])
    for a, b in zip(out1 if kind == "lstm" else (out1,), outb if kind == "lstm" else (outb,)):
        assert a.shape == (H,)
        np.testing.assert_allclose(a, b[0], rtol=1e-12)
    grads = cell.backward(np.ones((1, H)))          # the batched step (pushed last)
    dx1, _ = cell.backward(np.ones(H))              # the unbatched one
    assert dx1.shape == (I,)
    np.testing.assert_allclose(dx1, grads[0][0], rtol=1e-12)


def test_default_state_is_zeros_and_lstm_tuple_backward():
    cell = make_cell("lstm")
    x = np.random.default_rng(0).standard_normal((B, I))
    h, c = cell(x)
    h2, c2 = cell(x, (np.zeros((B, H)), np.zeros((B, H))))
    np.testing.assert_array_equal(h, h2)
    np.testing.assert_array_equal(c, c2)
    g1 = cell.backward((np.ones((B, H)), np.ones((B, H))))
    g2 = cell.backward(np.ones((B, H)), np.ones((B, H)))
    np.testing.assert_allclose(g1[0], g2[0], rtol=1e-12)


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("batched", [True, False])
def test_backward_of_none_is_a_zero_gradient(kind, batched):
    """dh = None means zeros for every cell (it did for LSTMCell only; an audit found
    GRUCell / RNNCell raising a TypeError after they had dropped the cached step)."""
    x = np.random.default_rng(1).standard_normal((B, I) if batched else I)
    a, b = make_cell(kind), make_cell(kind)                  # the same weights
    for c in (a, b):
        c(x)
        c(x)
    got = a.backward(None)
    want = b.backward(np.zeros((B, H) if batched else H))   # the same step's
    assert a.num_cached_steps == b.num_cached_steps == 1
    for g, w in zip(got if kind != "lstm" else (got[0], *got[1]),
                    want if kind != "lstm" else (want[0], *want[1])):
        np.testing.assert_array_equal(g, w)
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(p.grad, q.grad)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_cells_keep_full_precision_under_medium(kind, monkeypatch):
    """Matmul precision "medium" runs a layer's products on bf16 operands where that
    pays (fastrnn._precision); the single-step cells stay in float32 on both of their
    paths, so an eval call gives the same numbers whether or not it takes the fast
    path, and a training step the numbers it gives at "highest"."""
    from fastrnn import _precision
    monkeypatch.setattr(_precision, "_force_bf16", True)      # bf16 on any CPU
    cell = make_cell(kind, dtype=np.float32)
    x = np.random.default_rng(2).standard_normal((B, I)).astype(np.float32)
    full = cell(x)
    with _precision.scoped("medium"):
        assert _precision.bf16_products(np.float32)
        trained = cell(x)                                     # the general path
        cell.eval()
        fast = cell(x)                                        # the fast path
        general = cell(x.T.copy().T)                          # not C-contiguous: general
    for a, b in ((full, trained), (full, fast), (full, general)):
        for u, v in zip(a if kind == "lstm" else (a,), b if kind == "lstm" else (b,)):
            np.testing.assert_array_equal(u, v)


def test_a_subclass_with_its_own_forward_is_called_in_eval_mode():
    """The eval fast path serves the stock cells and layers and subclasses that keep
    their forward; an overridden forward (or a cell's _step_forward, a layer's
    _forward_direction) runs (an audit found it skipped in eval mode)."""
    class Halved(fastrnn.GRUCell):
        def forward(self, input, hx=None):
            return 0.5 * super().forward(input, hx)

    class Zeroed(fastrnn.GRU):
        def forward(self, x, hx=None, lengths=None, x_ids=None):
            y, h = super().forward(x, hx, lengths, x_ids)
            return 0 * y, h

    class Plain(fastrnn.LSTMCell):
        pass

    class OwnDirection(fastrnn.GRU):
        def _forward_direction(self, x, h0, c0, w, lengths, reverse, keep, out=None,
                               x_ids=None):
            y, *rest = super()._forward_direction(x, h0, c0, w, lengths, reverse, keep,
                                                  out, x_ids)
            return (0 * y, *rest)

    x = np.ones((2, 3), np.float32)
    c = Halved(3, 4, seed=0).eval()
    np.testing.assert_array_equal(c(x), 0.5 * fastrnn.GRUCell(3, 4, seed=0).eval()(x))
    layer = Zeroed(3, 4, seed=0).eval()
    assert not layer(x[None])[0].any()
    own = OwnDirection(3, 4, seed=0).eval()
    assert not own(x[None])[0].any()                  # (the review found this one served)
    p = Plain(3, 4, seed=0).eval()
    got = p(x)
    assert isinstance(p.__dict__.get("_fp_plan"), fastrnn._fastpath._Plan)   # served
    np.testing.assert_array_equal(got[0], fastrnn.LSTMCell(3, 4, seed=0).eval()(x)[0])


def test_eval_mode_keeps_no_cache_and_clear_cache():
    cell = make_cell("gru").eval()
    x = np.zeros((B, I))
    cell(x)
    assert cell.num_cached_steps == 0
    with pytest.raises(RuntimeError, match="no cached step"):
        cell.backward(np.zeros((B, H)))
    cell.train()
    cell(x)
    cell(x)
    assert cell.num_cached_steps == 2
    cell.clear_cache()
    assert cell.num_cached_steps == 0


def test_names_shapes_and_seeded_init():
    for kind, G in [("rnn_tanh", 1), ("lstm", 4), ("gru", 3)]:
        cell = make_cell(kind, np.float32, seed=7)
        shapes = {n: p.shape for n, p in cell.named_parameters()}
        assert shapes == {"weight_ih": (G * H, I), "weight_hh": (G * H, H),
                          "bias_ih": (G * H,), "bias_hh": (G * H,)}
        bound = 1 / np.sqrt(H)
        for p in cell.parameters():
            assert p.dtype == np.float32 and np.all(np.abs(p.data) <= bound)
        same = make_cell(kind, np.float32, seed=7)
        for a, b in zip(cell.parameters(), same.parameters()):
            np.testing.assert_array_equal(a.data, b.data)
    assert [n for n, _ in make_cell("gru", bias=False).named_parameters()] == \
        ["weight_ih", "weight_hh"]


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_bad_inputs(kind):
    cell = make_cell(kind, np.float32)
    ok = np.zeros((B, I), np.float32)
    with pytest.raises(TypeError, match=r"input: expected dtype float32.*got float64"):
        cell(np.zeros((B, I)))
    with pytest.raises(TypeError, match="input: expected a numpy array"):
        cell([[0.0] * I])
    with pytest.raises(ValueError, match=r"input: expected shape"):
        cell(np.zeros((B, I + 1), np.float32))
    with pytest.raises(ValueError, match=r"input: expected shape"):
        cell(np.zeros((1, B, I), np.float32))
    with pytest.raises(ValueError, match=r"input: expected shape"):
        cell(np.zeros((0,), np.float32))                 # ((0, I) is an empty batch: fine)
    bad_h = np.zeros((B + 1, H), np.float32)
    if kind == "lstm":
        with pytest.raises(ValueError, match=r"hx\[0\]: expected shape \(3, 6\)"):
            cell(ok, (bad_h, bad_h))
        with pytest.raises(TypeError, match="hx: expected a tuple"):
            cell(ok, np.zeros((B, H), np.float32))
    else:
        with pytest.raises(ValueError, match=r"hx: expected shape \(3, 6\), got \(4, 6\)"):
            cell(ok, bad_h)
        with pytest.raises(TypeError, match="hx: expected dtype float32"):
            cell(ok, np.zeros((B, H)))
    cell(ok)
    with pytest.raises(ValueError, match="dh: expected shape"):
        cell.backward(np.zeros((B, H + 1), np.float32))
    assert cell.num_cached_steps == 1  # a rejected backward keeps the step
    cell.backward(np.zeros((B, H), np.float32))


@pytest.mark.parametrize("args, err", [((0, 4), ValueError), ((3, 4.5), ValueError),
                                       ((3, 4, True, "tanh", np.int32), TypeError),
                                       ((3, 4, True, "sigmoid"), ValueError)])
def test_bad_constructor_args(args, err):
    with pytest.raises(err):
        fastrnn.RNNCell(*args)


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn_tanh"])
@pytest.mark.parametrize("training", [True, False])
def test_an_empty_batch_gives_empty_results_as_torch(kind, training):
    """x (0, I): h (0, H) (the LSTM's (h, c)) as torch gives it; in training the step is
    cached like any other, and its backward returns empty gradients and adds nothing."""
    cell = make_cell(kind, dtype=np.float32).train(training)
    lstm = kind == "lstm"
    x0, h0 = np.zeros((0, I), np.float32), np.zeros((0, H), np.float32)
    out = cell(x0, (h0, h0) if lstm else h0)
    for o in (out if lstm else (out,)):
        assert o.shape == (0, H) and o.dtype == np.float32
    if not training:
        return
    before = [p.grad.copy() for p in cell.parameters()]
    with pytest.raises(ValueError, match=r"dh: expected shape \(0, 6\)"):
        cell.backward(np.zeros((1, H), np.float32))      # checked first: the step stays
    dx, dstate = cell.backward(h0)
    assert dx.shape == (0, I) and cell.num_cached_steps == 0
    assert all(d.shape == (0, H) for d in (dstate if lstm else (dstate,)))
    assert all(np.array_equal(p.grad, b) for p, b in zip(cell.parameters(), before))


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn_tanh"])
@pytest.mark.parametrize("training", [True, False])
def test_weights_resized_behind_the_cells_back_are_refused(kind, training):
    """Arrays of another (consistent) hidden size assigned to .data: a ValueError
    naming the parameter, as the layers give, not outputs of another size."""
    cell = make_cell(kind, dtype=np.float32)
    cell.train(training)
    G = {"gru": 3, "lstm": 4}.get(kind, 1)
    for name, shape in (("weight_ih", (G * 8, I)), ("weight_hh", (G * 8, 8)),
                        ("bias_ih", (G * 8,)), ("bias_hh", (G * 8,))):
        getattr(cell, name).data = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=r"weight_ih: expected shape"):
        cell(np.ones((2, I), np.float32))
