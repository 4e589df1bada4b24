"""fastrnn.RNN / LSTM / GRU without torch: parameters and init, finite-difference
gradients (dropout, merge_mode='sum', identity nonlinearity), lengths, modes,
state dicts and every bad-input error. Torch equivalence is in test_layers_torch.py.
"""

import numpy as np
import pytest

import fastrnn

T, B, I, H = 5, 3, 4, 5


def loss_and_grads(m, x, hx, lengths, dout, dstate, drop_seed=None):
    """Forward (with a fixed dropout stream) -> scalar loss sum(out*dout) + sum(state*dstate)."""
    if drop_seed is not None:
        m._dropout_rng = np.random.default_rng(drop_seed)
    out, state = m(x, hx, lengths=lengths)
    states = state if isinstance(state, tuple) else (state,)
    dstates = dstate if isinstance(dstate, tuple) else (dstate,)
    return float(np.sum(out * dout) + sum(np.sum(s * d) for s, d in zip(states, dstates)))


def check_finite_differences(m, lengths=None, seed=0, drop_seed=None):
    """Analytic gradients of x, hx and every parameter vs central differences.

    One random direction per array (a directional derivative) covers every
    entry with two forward passes, which keeps this cheap.
    """
    rng = np.random.default_rng(seed)
    is_lstm = m.mode == "LSTM"
    LD = m.num_layers * m.num_directions
    x = rng.standard_normal((B, T, I) if m.batch_first else (T, B, I))
    h0 = 0.5 * rng.standard_normal((LD, B, m.out_hidden_size))
    c0 = 0.5 * rng.standard_normal((LD, B, H))
    hx = (h0, c0) if is_lstm else h0
    out, _ = m(x, hx, lengths=lengths)
    dout = rng.standard_normal(out.shape)
    dstate = (rng.standard_normal(h0.shape), rng.standard_normal(c0.shape)) if is_lstm \
        else rng.standard_normal(h0.shape)

    m.zero_grad()
    loss_and_grads(m, x, hx, lengths, dout, dstate, drop_seed)
    dx, dhx = m.backward(dout, dstate)
    targets = [("x", x, dx)]
    targets += [("h0", h0, dhx[0]), ("c0", c0, dhx[1])] if is_lstm else [("h0", h0, dhx)]
    targets += [(n, p.data, p.grad) for n, p in m.named_parameters()]
    eps = 1e-6
    for name, arr, grad in targets:
        v = rng.standard_normal(arr.shape)
        keep = arr.copy()
        arr += eps * v
        up = loss_and_grads(m, x, hx, lengths, dout, dstate, drop_seed)
        arr[...] = keep - eps * v
        down = loss_and_grads(m, x, hx, lengths, dout, dstate, drop_seed)
        arr[...] = keep
        numeric = (up - down) / (2 * eps)
        analytic = float(np.sum(grad * v))
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), \
            f"{name}: analytic {analytic} vs numeric {numeric}"


def make(kind, **kw):
    kw.setdefault("dtype", np.float64)
    kw.setdefault("seed", 0)
    if kind.startswith("rnn"):
        return fastrnn.RNN(I, H, nonlinearity=kind.split("_")[1], **kw)
    if kind == "lstm_proj":
        return fastrnn.LSTM(I, H, proj_size=2, **kw)
    return {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU}[kind](I, H, **kw)


KINDS = ["rnn_tanh", "rnn_identity", "lstm", "lstm_proj", "gru"]


# -- gradients of what torch cannot check ----------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_dropout_between_layers_gradients(kind):
    m = make(kind, num_layers=3, bidirectional=True, dropout=0.4)
    check_finite_differences(m, lengths=np.array([5, 2, 4]), drop_seed=11)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_sum_stacked_gradients(kind):
    m = make(kind, num_layers=2, bidirectional=True, merge_mode="sum", batch_first=True)
    out, _ = m(np.zeros((B, T, I)))
    assert out.shape == (B, T, m.out_hidden_size)
    assert m.weight_ih_l1.shape[1] == m.out_hidden_size  # layer 1 reads the summed output
    check_finite_differences(m, lengths=np.array([1, 5, 3]))


def test_identity_rnn_gradients_unidirectional():
    check_finite_differences(make("rnn_identity", num_layers=2, bias=False))


# -- dropout behaviour -------------------------------------------------------------
def test_dropout_train_vs_eval_and_seeding():
    x = np.random.default_rng(0).standard_normal((T, B, I))
    a = make("gru", num_layers=2, dropout=0.5, seed=3)
    b = make("gru", num_layers=2, dropout=0.5, seed=3)
    ref = make("gru", num_layers=2, dropout=0.0, seed=3)
    ya, yb, yr = a(x)[0], b(x)[0], ref(x)[0]
    np.testing.assert_array_equal(ya, yb)         # same seed: same weights and masks
    assert not np.allclose(ya, yr)                # dropout acted in training mode
    assert not np.allclose(a(x)[0], ya)           # fresh masks on every call
    a.eval()
    np.testing.assert_allclose(a(x)[0], ref.eval()(x)[0], rtol=1e-14)  # eval: no dropout


def test_dropout_one_layer_has_no_effect_and_full_dropout_zeroes_next_input():
    x = np.random.default_rng(0).standard_normal((T, B, I))
    one = make("lstm", dropout=0.9)   # dropout only acts between layers
    np.testing.assert_array_equal(one(x)[0], make("lstm")(x)[0])
    full = make("rnn_tanh", num_layers=2, dropout=1.0)
    out, _ = full(x)
    # layer 1 sees zeros: its output is independent of x
    np.testing.assert_allclose(out, full(np.ones_like(x))[0], rtol=1e-14)


def test_dropout_mask_rate():
    m = make("rnn_tanh", num_layers=2, dropout=0.3)
    mask = m._dropout_mask((200, 50, 10))
    assert abs(np.mean(mask == 0) - 0.3) < 0.01
    np.testing.assert_allclose(np.unique(mask), [0.0, 1 / 0.7])


# -- lengths ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_lengths_semantics(kind):
    m = make(kind, num_layers=2, bidirectional=True, batch_first=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, T, I))
    lengths = [2, 5, 1]
    out, state = m(x, lengths=lengths)
    for b, n in enumerate(lengths):
        assert np.all(out[b, n:] == 0)
        # each sequence alone, cut to its length, gives the same result
        alone, alone_state = m(x[b:b + 1, :n])
        np.testing.assert_allclose(out[b:b + 1, :n], alone, rtol=1e-12, atol=1e-14)
        for s, s1 in zip(state if isinstance(state, tuple) else (state,),
                         alone_state if isinstance(alone_state, tuple) else (alone_state,)):
            np.testing.assert_allclose(s[:, b], s1[:, 0], rtol=1e-12, atol=1e-14)
    # full lengths == no lengths; lists, int32 arrays and tuples are all accepted
    np.testing.assert_array_equal(m(x, lengths=np.full(B, T, np.int32))[0], m(x)[0])
    # gradients at padded steps are ignored and dx there is zero
    m(x, lengths=lengths)
    dout = np.ones((B, T, m.output_size))
    dx, _ = m.backward(dout)
    m(x, lengths=tuple(lengths))
    dout2 = dout.copy()
    dout2[0, 2:] = 123.0
    dx2, _ = m.backward(dout2)
    np.testing.assert_array_equal(dx, dx2)
    assert np.all(dx[0, 2:] == 0)


# -- parameters, init, config -------------------------------------------------------
def test_parameter_names_shapes_order_like_torch():
    m = fastrnn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    names = [n for n, _ in m.named_parameters()]
    expected = []
    for k in range(2):
        for sfx in ("", "_reverse"):
            expected += [f"{w}_l{k}{sfx}" for w in
                         ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")]
    assert names == expected
    assert m.weight_ih_l0.shape == (24, 4)
    assert m.weight_ih_l1_reverse.shape == (24, 6)     # reads [fwd | rev] projected outputs
    assert m.weight_hh_l1.shape == (24, 3)
    assert m.weight_hr_l0.shape == (3, 6)
    g = fastrnn.GRU(4, 6, 3, bias=False)
    assert [n for n, _ in g.named_parameters()][:3] == ["weight_ih_l0", "weight_hh_l0",
                                                       "weight_ih_l1"]
    assert g.weight_ih_l2.shape == (18, 6)


def test_init_seeded_uniform_and_dtype():
    a = fastrnn.RNN(4, 16, 2, seed=5)
    b = fastrnn.RNN(4, 16, 2, seed=5)
    c = fastrnn.RNN(4, 16, 2, seed=6)
    d = fastrnn.RNN(4, 16, 2)  # fresh entropy
    e = fastrnn.RNN(4, 16, 2)
    for pa, pb, pc, pd, pe in zip(a.parameters(), b.parameters(), c.parameters(),
                                  d.parameters(), e.parameters()):
        assert pa.dtype == np.float32 and pa.grad.dtype == np.float32
        np.testing.assert_array_equal(pa.data, pb.data)
        assert not np.array_equal(pa.data, pc.data)
        assert not np.array_equal(pd.data, pe.data)
        assert np.all(np.abs(pa.data) <= 0.25)                  # 1/sqrt(16)
    allw = np.concatenate([p.data.ravel() for p in fastrnn.LSTM(8, 64, seed=0).parameters()])
    assert abs(allw.mean()) < 0.005 and abs(allw.std() - 0.125 / np.sqrt(3)) < 0.002


@pytest.mark.parametrize("kind", KINDS)
def test_config_rebuilds_same_module(kind):
    m = make(kind, num_layers=2, bidirectional=True, dropout=0.1, batch_first=True)
    m2 = type(m)(**m.config())
    assert m2.config() == m.config()
    for p, p2 in zip(m.parameters(), m2.parameters()):
        np.testing.assert_array_equal(p.data, p2.data)  # the seed is part of the config
    assert "num_layers=2" in repr(m)


def test_backward_accumulates_and_zero_grad():
    m = make("lstm", num_layers=2)
    x = np.random.default_rng(0).standard_normal((T, B, I))
    out, _ = m(x)
    m.backward(np.ones_like(out))
    first = [p.grad.copy() for p in m.parameters()]
    m(x)
    m.backward(np.ones_like(out))
    for g, p in zip(first, m.parameters()):
        np.testing.assert_allclose(p.grad, 2 * g, rtol=1e-12)
    m.zero_grad()
    assert all(np.all(p.grad == 0) for p in m.parameters())


def test_backward_without_dout_or_dstate():
    m = make("gru", num_layers=2)
    x = np.random.default_rng(0).standard_normal((T, B, I))
    out, h = m(x)
    dx, dh0 = m.backward(None, np.ones_like(h))   # only the final state matters
    assert dx.shape == x.shape and dh0.shape == h.shape and np.any(dx != 0)
    m(x)
    dx, dh0 = m.backward(np.ones_like(out))       # only the output matters
    assert np.any(dh0 != 0)


# -- state dicts ---------------------------------------------------------------------
def test_load_state_dict_reports_keys_by_name():
    m = fastrnn.GRU(3, 4, bidirectional=True)
    sd = m.state_dict()
    sd.pop("bias_hh_l0_reverse")
    sd["weight_ih_l0"] = np.zeros((4, 3))
    sd["surprise"] = np.zeros(1)
    with pytest.raises(ValueError) as e:
        m.load_state_dict(sd)
    msg = str(e.value)
    assert "missing keys: bias_hh_l0_reverse" in msg
    assert "unexpected keys: surprise" in msg
    assert "weight_ih_l0: expected shape (12, 3), got (4, 3)" in msg
    sd2 = fastrnn.GRU(3, 4, bidirectional=True, seed=1).state_dict()
    sd2.pop("bias_hh_l0")
    result = m.load_state_dict(dict(sd2, extra=1), strict=False)
    missing, unexpected = result                  # unpacks as a pair, and is named as torch's
    assert missing == ["bias_hh_l0"] and unexpected == ["extra"]
    assert result.missing_keys == ["bias_hh_l0"] and result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(m.weight_ih_l0.data, sd2["weight_ih_l0"])
    with pytest.raises(ValueError, match="non-numeric keys: bias_ih_l0"):
        m.load_state_dict(dict(m.state_dict(), bias_ih_l0=np.array(["a"] * 12)))
    m.load_state_dict({k: v.tolist() for k, v in m.state_dict().items()})  # nested lists ok


# -- bad inputs: ValueError/TypeError naming the argument, never a crash ---------------
def test_bad_x():
    m = fastrnn.LSTM(I, H)                        # float32
    ok = np.zeros((T, B, I), np.float32)
    with pytest.raises(TypeError, match=r"x: expected dtype float32 .*got float64; convert "
                                        r"with .astype\(np.float32\) or build the module with "
                                        r"dtype=np.float64$"):
        m(ok.astype(np.float64))
    for dt in (np.int64, np.float16):    # no module takes these: the hint is the cast alone
        with pytest.raises(TypeError, match=rf"x: expected dtype float32 .*got {np.dtype(dt)}; "
                                            r"convert with .astype\(np.float32\)$"):
            m(np.zeros((T, B, I), dt))
        with pytest.raises(TypeError, match=r"input: .* convert with .astype\(np.float32\)$"):
            fastrnn.GRUCell(I, H)(np.zeros((B, I), dt))
    with pytest.raises(ValueError,
                       match=r"x: expected a 3-D array \(T, B, I\), got shape \(5, 3, 4, 1\)"):
        m(ok[..., None])
    with pytest.raises(ValueError, match="x: expected a 3-D array"):
        m(ok[None])
    with pytest.raises(ValueError, match=r"x: expected last dimension I = input_size = 4"):
        m(np.zeros((T, B, I + 1), np.float32))
    with pytest.raises(ValueError, match="at least one step"):
        m(np.zeros((0, B, I), np.float32))
    with pytest.raises(ValueError, match="at least one step"):
        fastrnn.GRU(I, H, batch_first=True)(np.zeros((B, 0, I), np.float32))
    with pytest.raises(ValueError, match=r"\(B, T, I\)"):
        fastrnn.GRU(I, H, batch_first=True)(np.zeros((B, T, I + 1), np.float32))
    with pytest.raises(ValueError, match=r"got shape \(3, 5\) \(T, I\)"):   # 2-D: unbatched
        fastrnn.GRU(I, H, batch_first=True)(np.zeros((B, T), np.float32))
    with pytest.raises(TypeError, match=r"x: expected an array of dtype float32 \(the module's "
                                        r"dtype\), got a list \(read as float64\); pass "
                                        r"np.asarray\(x, dtype=np.float32\)$"):
        m(ok.tolist())                            # a list says so, not ".astype"
    m(ok)                                         # still works after all those errors


def test_bad_hx():
    lstm, gru = fastrnn.LSTM(I, H, 2), fastrnn.GRU(I, H, 2, bidirectional=True)
    x = np.zeros((T, B, I), np.float32)
    h = np.zeros((2, B, H), np.float32)
    with pytest.raises(TypeError, match=r"hx: expected a tuple \(h, c\)"):
        lstm(x, h)
    with pytest.raises(TypeError, match=r"hx: expected a tuple \(h, c\) for LSTM, got a tuple "
                                        r"of length 3"):
        lstm(x, (h, h, h))
    with pytest.raises(TypeError, match=r"hx: expected a tuple \(h, c\), got a list of length 1"):
        fastrnn.LSTMCell(I, H)(x[0], [h[0]])
    with pytest.raises(ValueError, match=r"hx\[1\]: expected shape \(2, 3, 5\), got \(2, 3, 4\)"):
        lstm(x, (h, h[..., :4]))
    with pytest.raises(TypeError, match=r"hx\[0\]: expected dtype float32"):
        lstm(x, (h.astype(np.float64), h))
    with pytest.raises(ValueError, match=r"hx: expected shape \(4, 3, 5\), got \(2, 3, 5\)"):
        gru(x, h)
    with pytest.raises(ValueError, match=r"hx: expected shape \(4, 3, 5\)"):
        gru(x, h[0])


@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN])
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input_is_a_batch_of_one_without_its_axis(cls, batch_first):
    """x (T, I): the results and gradients of x[:, None] (x[None] batch_first), bitwise,
    without the batch axis; a bad unbatched call is refused before the cache changes."""
    rng = np.random.default_rng(3)
    a, b = (cls(I, H, num_layers=2, batch_first=batch_first, seed=1) for _ in range(2))
    x = rng.standard_normal((T, I)).astype(np.float32)                   # (T, I)
    x3 = x[None] if batch_first else x[:, None]                          # batch of one
    lstm = cls is fastrnn.LSTM
    h0 = rng.standard_normal((2, H)).astype(np.float32)                  # (L, H)
    out, state = a(x, (h0, h0) if lstm else h0)
    out3, state3 = b(x3, (h0[:, None], h0[:, None]) if lstm else h0[:, None])
    assert np.array_equal(out, out3[0] if batch_first else out3[:, 0])
    assert np.array_equal(state[0] if lstm else state,
                          (state3[0] if lstm else state3)[:, 0])
    dout = rng.standard_normal(out.shape).astype(np.float32)             # (T, H)
    with pytest.raises(ValueError, match=r"dout: expected shape \(5, 5\), got \(5, 1, 5\)"):
        a.backward(dout[:, None])                                        # the cache stays
    dx, dstate = a.backward(dout)
    dx3, dstate3 = b.backward(dout[None] if batch_first else dout[:, None])
    assert dx.shape == (T, I)
    assert np.array_equal(dx, dx3[0] if batch_first else dx3[:, 0])
    assert np.array_equal(dstate[0] if lstm else dstate, (dstate3[0] if lstm else dstate3)[:, 0])
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert np.array_equal(p.grad, q.grad), n
    a.eval()
    assert np.array_equal(a(x)[0], b.eval()(x3)[0][0 if batch_first else slice(None)]
                          .reshape(T, H))
    with pytest.raises(ValueError, match="lengths: not taken with an unbatched x"):
        a(x, lengths=[T])
    with pytest.raises(ValueError, match=r"expected shape \(2, 5\), got \(2, 1, 5\)"):
        a(x, (h0[:, None], h0[:, None]) if lstm else h0[:, None])
    with pytest.raises(ValueError, match=r"x: expected at least one step, got shape \(0, 4\)"):
        a(x[:0])


@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_an_empty_batch_gives_empty_results_as_torch(cls, batch_first, training):
    """B = 0: out (T, 0, D·H) ((0, T, D·H) batch_first) and states (L·D, 0, H), as torch
    returns them; backward returns empty gradients and leaves .grad as it was."""
    m = cls(I, H, num_layers=2, bidirectional=True, batch_first=batch_first).train(training)
    x = np.zeros((0, T, I) if batch_first else (T, 0, I), np.float32)
    out, state = m(x)
    assert out.shape == ((0, T, 2 * H) if batch_first else (T, 0, 2 * H))
    for s in (state if cls is fastrnn.LSTM else (state,)):
        assert s.shape == (4, 0, H)
    if not training:
        return
    before = {n: p.grad.copy() for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match="dout: expected shape"):
        m.backward(np.zeros((T, 1, 2 * H), np.float32))           # the cache stays
    dx, dstate = m.backward(np.zeros_like(out))
    assert dx.shape == x.shape
    assert (dstate[0] if cls is fastrnn.LSTM else dstate).shape == (4, 0, H)
    for n, p in m.named_parameters():
        assert np.array_equal(p.grad, before[n]), n
    with pytest.raises(RuntimeError, match="no forward cache"):
        m.backward()
    y, _ = m(np.ones((T, 2, I), np.float32) if not batch_first
             else np.ones((2, T, I), np.float32))                  # a batch after it runs
    assert y.shape[:2] == ((2, T) if batch_first else (T, 2))


@pytest.mark.parametrize("training", [True, False])
def test_a_parameter_replaced_by_another_dtype_or_none_is_named(training):
    """A .data replaced by hand with another dtype, or None: the error names the
    parameter (the kernel named its own argument, w_hh; a cell raised AttributeError)."""
    x = np.zeros((T, B, I), np.float32)
    m = fastrnn.LSTM(I, H, num_layers=2, bidirectional=True).train(training)
    m.weight_hh_l1_reverse.data = m.weight_hh_l1_reverse.data.astype(np.float64)
    with pytest.raises(TypeError, match=r"^weight_hh_l1_reverse: expected dtype float32 "
                                        r"\(the module's dtype\), got float64$"):
        m(x)
    for name, bad, err, match in [
            ("weight_ih", None, TypeError, r"^weight_ih: expected a numpy array of shape "
                                           r"\(15, 4\) and dtype float32, got NoneType$"),
            ("bias_hh", [0.0] * 15, TypeError, r"^bias_hh: expected a numpy array"),
            ("weight_hh", np.zeros((15, H)), TypeError,
             r"^weight_hh: expected dtype float32 \(the cell's dtype\), got float64$")]:
        cell = fastrnn.GRUCell(I, H).train(training)
        getattr(cell, name).data = bad
        with pytest.raises(err, match=match):
            cell(x[0])


@pytest.mark.parametrize("lengths, err, match", [
    ([1, 2], ValueError, r"lengths: expected shape \(3,\)"),
    ([[1, 2, 3]], ValueError, r"lengths: expected shape \(3,\)"),
    ([1.0, 2.0, 3.0], TypeError, "lengths: expected integers, got dtype float64"),
    ([True, True, True], TypeError, "lengths: expected integers"),
    ([0, 2, 3], ValueError, r"lengths: every length must be in \[1, 5\]"),
    ([6, 2, 3], ValueError, r"lengths: every length must be in \[1, 5\]"),
    ([-1, 2, 3], ValueError, "lengths: every length"),
    ("abc", TypeError, "lengths: expected integers"),
])
def test_bad_lengths(lengths, err, match):
    m = fastrnn.RNN(I, H)
    with pytest.raises(err, match=match):
        m(np.zeros((T, B, I), np.float32), lengths=lengths)


def test_bad_backward_calls():
    m = fastrnn.GRU(I, H, batch_first=True)
    x = np.zeros((B, T, I), np.float32)
    with pytest.raises(RuntimeError, match="no forward cache"):
        m.backward(np.zeros((B, T, H), np.float32))
    m(x)
    with pytest.raises(ValueError, match=r"dout: expected shape \(3, 5, 5\), got \(5, 3, 5\)"):
        m.backward(np.zeros((T, B, H), np.float32))
    with pytest.raises(TypeError, match="dout: expected dtype float32"):
        m.backward(np.zeros((B, T, H)))
    with pytest.raises(ValueError, match=r"dstate: expected shape \(1, 3, 5\)"):
        m.backward(np.zeros((B, T, H), np.float32), np.zeros((B, H), np.float32))
    m.backward(np.zeros((B, T, H), np.float32))  # the failed calls kept the cache
    with pytest.raises(RuntimeError, match="no forward cache"):
        m.backward(np.zeros((B, T, H), np.float32))
    m.eval()
    m(x)
    with pytest.raises(RuntimeError, match="training mode"):
        m.backward()


@pytest.mark.parametrize("ctor, err, match", [
    (lambda: fastrnn.LSTM(4, 5, proj_size=5), ValueError, "proj_size: must be smaller"),
    (lambda: fastrnn.LSTM(4, 5, proj_size=-1), ValueError, "proj_size"),
    (lambda: fastrnn.RNN(4, 5, dropout=1.5), ValueError, "dropout"),
    (lambda: fastrnn.RNN(4, 5, nonlinearity="gelu"), ValueError, "nonlinearity"),
    (lambda: fastrnn.GRU(4, 5, merge_mode="max"), ValueError, "merge_mode"),
    (lambda: fastrnn.GRU(4, 5, dtype=np.float16), TypeError, "dtype"),
    (lambda: fastrnn.GRU(0, 5), ValueError, "input_size"),
    (lambda: fastrnn.GRU(4, 5.0), ValueError, "hidden_size"),
    (lambda: fastrnn.GRU(4, 5, num_layers=0), ValueError, "num_layers"),
    (lambda: fastrnn.GRU(4, 5, seed=-3), ValueError, "seed"),
])
def test_bad_constructor_args(ctor, err, match):
    with pytest.raises(err, match=match):
        ctor()


@pytest.mark.parametrize("sizes", [(2 ** 62, 3), (3, 2 ** 62)])
def test_sizes_past_any_address_space_are_a_memory_error(sizes):
    """(An audit found int64 overflow giving a reshape error or an OverflowError.)"""
    with pytest.raises(MemoryError, match="more than any address space"):
        fastrnn.LSTM(*sizes)


def test_lengths_of_mixed_numpy_integer_types_are_integers():
    """NumPy promotes [np.int8(2), np.uint64(3)] to float64: still integers (an audit
    found them refused as floats); a real float still is."""
    m = fastrnn.GRU(3, 4, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    want = m(x, None, [2, 3])
    for train in (True, False):
        m.train(train)
        got = m(x, None, [np.int8(2), np.uint64(3)])
        np.testing.assert_array_equal(got[0], want[0])
    with pytest.raises(TypeError, match="lengths: expected integers, got dtype float64"):
        m(x, None, [2, 3.5])
