"""Weight drop (DropConnect on W_hh) and locked (variational) dropout: masks of the
right shape, applied in training only, resumable, and gradients that match finite
differences through the masks (float64)."""

import numpy as np
import pytest

import fastrnn
from fastrnn.lm import RNNLanguageModel
from fastrnn.nn import LockedDropout, WeightDrop
from fastrnn.nn.loss import softmax_cross_entropy


pytestmark = pytest.mark.usefixtures("one_kernel_thread")   # conftest.py


V, T, B = 7, 5, 3


def data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))


def loss_of(model, x, y, rng_state):
    """Training-mode loss with the masks that `rng_state` draws (the same every call)."""
    model.set_rng_states(rng_state)
    logits, _ = model(x)
    return softmax_cross_entropy(logits, y)


def check_gradients(model, names, n_entries=12, seed=0):
    x, y = data(seed)
    model.train()
    state = model.rng_states()
    model.zero_grad()
    _, dlogits = loss_of(model, x, y, state)
    model.backward(dlogits)
    params = dict(model.named_parameters())
    rng = np.random.default_rng(seed + 1)
    eps = 1e-6
    for name in names:
        p = params[name]
        analytic = p.grad.copy()
        for flat in rng.choice(p.data.size, size=min(n_entries, p.data.size), replace=False):
            idx = np.unravel_index(flat, p.data.shape)
            old = p.data[idx]
            p.data[idx] = old + eps
            lp = loss_of(model, x, y, state)[0]
            p.data[idx] = old - eps
            lm = loss_of(model, x, y, state)[0]
            p.data[idx] = old
            numeric = (lp - lm) / (2 * eps)
            assert analytic[idx] == pytest.approx(numeric, rel=1e-5, abs=1e-9), (name, idx)
    return {n: params[n].grad.copy() for n in names}


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_weight_drop_gradient_matches_finite_differences(cell):
    model = RNNLanguageModel(V, 4, 6, num_layers=2, cell=cell, dtype=np.float64, seed=3,
                             weight_drop=0.5)
    names = ["rnn.weight_hh_l0", "rnn.weight_hh_l1", "rnn.weight_ih_l0", "encoder.weight",
             "decoder.weight"]
    grads = check_gradients(model, names)
    # the gradient reaches the raw weight through the mask: dropped entries get exactly 0
    masks = _last_masks(model)
    assert set(masks) == {"weight_hh_l0", "weight_hh_l1"}
    m = masks["weight_hh_l0"]
    assert 0.3 < (m == 0).mean() < 0.7 and set(np.unique(m)) <= {0.0, 2.0}
    for k in (0, 1):
        g = grads[f"rnn.weight_hh_l{k}"]
        assert np.all(g[masks[f"weight_hh_l{k}"] == 0] == 0)
        assert np.all(g[masks[f"weight_hh_l{k}"] != 0] != 0)


def _last_masks(model):
    """The first masks a fresh copy of `model` draws: those of its first forward."""
    fresh = RNNLanguageModel.from_config(model.config())
    return fresh._weight_drop.draw_masks()


def test_weight_drop_masks_once_per_batch_and_raw_weight_untouched():
    model = RNNLanguageModel(V, 4, 6, num_layers=1, dtype=np.float64, seed=1, weight_drop=0.3)
    raw = model.rnn.weight_hh_l0.data.copy()
    x, y = data()
    base = RNNLanguageModel(V, 4, 6, num_layers=1, dtype=np.float64, seed=1)
    la, _ = model(x)
    lb, _ = base(x)
    assert not np.allclose(la, lb)                          # training: masked W_hh
    np.testing.assert_array_equal(model.rnn.weight_hh_l0.data, raw)
    # the masked forward equals a plain forward with W_hh * M (one mask for all steps/rows)
    mask = _last_masks(model)["weight_hh_l0"]
    base.rnn.weight_hh_l0.data[...] = raw * mask
    np.testing.assert_allclose(la, base(x)[0], rtol=1e-12, atol=1e-12)
    model.eval()
    base.rnn.weight_hh_l0.data[...] = raw
    np.testing.assert_array_equal(model(x)[0], base.eval()(x)[0])   # eval: raw weights


@pytest.mark.parametrize("layers", [1, 2])
def test_locked_dropout_gradient_matches_finite_differences(layers):
    model = RNNLanguageModel(V, 4, 6, num_layers=layers, dtype=np.float64, seed=2,
                             dropout=0.4, locked_dropout=True)
    names = ["encoder.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "decoder.weight"]
    if layers == 2:
        names.append("rnn.weight_ih_l1")
    check_gradients(model, names)


def test_locked_dropout_masks_are_shared_across_time():
    model = RNNLanguageModel(V, 4, 6, num_layers=2, dtype=np.float64, seed=2, dropout=0.5,
                             locked_dropout=True)
    x, _ = data()
    model(x)
    assert model.drop_in._mask.shape == (1, B, 4)
    assert model.drop_out._mask.shape == (1, B, 6)
    (between,) = [m for m in model.rnn._cache["masks"] if m is not None]
    assert between.shape == (1, B, 6)
    # a constant input over time stays constant over time after the layer
    d = LockedDropout(0.5, rng=0)
    out = d(np.ones((T, B, 8)))
    assert np.all(out == out[:1]) and (out == 0).any() and (out == 2).any()
    np.testing.assert_array_equal(d.backward(np.ones((T, B, 8))), out)
    assert np.array_equal(d.eval()(np.ones((T, B, 8))), np.ones((T, B, 8)))
    with pytest.raises(ValueError, match="time-major"):
        d.train()(np.ones(4))


def test_weight_drop_errors():
    lstm = fastrnn.LSTM(3, 4)
    with pytest.raises(ValueError, match="no parameter 'weight_hh_l9'"):
        WeightDrop(lstm, ["weight_hh_l9"], 0.2)
    with pytest.raises(ValueError, match=r"\[0, 1\), got 1.0"):
        WeightDrop(lstm, ["weight_hh_l0"], 1.0)
    with pytest.raises(ValueError, match="weight_drop must be in"):
        RNNLanguageModel(V, weight_drop=-0.1)


def test_regularised_model_config_roundtrip_keeps_old_weights():
    old = RNNLanguageModel(V, 4, 6, num_layers=2, seed=9)
    new = RNNLanguageModel(V, 4, 6, num_layers=2, seed=9, weight_drop=0.2, locked_dropout=True)
    for (n, a), (_, b) in zip(old.named_parameters(), new.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=n)    # same init with or without
    again = RNNLanguageModel.from_config(new.config())
    assert again.weight_drop == 0.2 and again.locked_dropout
    assert list(new.state_dict()) == list(old.state_dict())        # names unchanged


def test_weight_drop_on_a_linear_and_by_dotted_name():
    # Linear's backward reads its weight: it must see W' = W * M, not W (dx was wrong)
    rng = np.random.default_rng(0)
    for target, name in ((fastrnn.nn.Linear(5, 4, dtype=np.float64, rng=0), "weight"),
                         (fastrnn.nn.Sequential(fastrnn.nn.Linear(5, 4, dtype=np.float64,
                                                                  rng=0)), "0.weight")):
        lin = target if name == "weight" else target[0]
        wd = WeightDrop(target, [name], p=0.5, rng=1)
        mask = WeightDrop(target, [name], p=0.5, rng=1).draw_masks()[name]   # wd's first
        raw = lin.weight.data.copy()
        x = rng.standard_normal((3, 5))
        dout = rng.standard_normal((3, 4))
        y = wd(x)
        np.testing.assert_allclose(y, x @ (raw * mask).T + lin.bias.data, rtol=1e-12)
        lin.zero_grad()
        dx = wd.backward(dout)
        np.testing.assert_allclose(dx, dout @ (raw * mask), rtol=1e-12)
        np.testing.assert_allclose(lin.weight.grad, mask * (dout.T @ x), rtol=1e-12)
        np.testing.assert_array_equal(lin.weight.data, raw)
        np.testing.assert_allclose(wd.backward(dout), dx, rtol=1e-12)   # Linear: again, W'
        np.testing.assert_allclose(lin.weight.grad, 2 * mask * (dout.T @ x), rtol=1e-12)


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell"])
def test_weight_drop_on_a_cell_stepped_through_time(cell):
    # each step's forward draws its mask; backward (last step first) must use each
    # step's own mask (only the last was kept). Reference: one cell per step, each
    # holding that step's W' as its weight, chained by hand.
    T, B, I, H = 4, 2, 3, 5
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((T, B, I))
    dys = rng.standard_normal((T, B, H))
    c = getattr(fastrnn, cell)(I, H, dtype=np.float64, seed=0)
    wd = WeightDrop(c, ["weight_hh"], p=0.4, rng=2)
    twin = WeightDrop(c, ["weight_hh"], p=0.4, rng=2)       # draws wd's masks, in order
    lstm = cell == "LSTMCell"
    state, masks = None, []
    for t in range(T):
        state = wd(xs[t], state)
        masks.append(twin.draw_masks()["weight_hh"])
    c.zero_grad()
    dstate = None
    for t in reversed(range(T)):
        dh = dys[t] + (dstate[0] if lstm and dstate is not None else
                       (dstate if dstate is not None else 0))
        dx, dstate = wd.backward((dh, dstate[1] if dstate is not None else None) if lstm
                                 else dh)
    got = c.weight_hh.grad.copy()

    want = np.zeros_like(got)
    steps, state = [], None
    for t in range(T):
        ct = getattr(fastrnn, cell)(I, H, dtype=np.float64, seed=0)
        ct.weight_hh.data[...] = c.weight_hh.data * masks[t]
        state = ct(xs[t], state)
        steps.append(ct)
    dstate = None
    for t in reversed(range(T)):
        dh = dys[t] + (dstate[0] if lstm and dstate is not None else
                       (dstate if dstate is not None else 0))
        dx, dstate = steps[t].backward((dh, dstate[1] if dstate is not None else None) if lstm
                                       else dh)
        want += masks[t] * steps[t].weight_hh.grad
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
