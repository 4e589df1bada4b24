"""Gradients written straight into Parameter.grad.

A module's backward hands its parameters' .grad arrays to the kernel, which
writes the weight gradients there (right after zero_grad) or adds into them
(otherwise): no temporary array and no extra pass. zero_grad itself only marks
the gradient as zero. These tests pin what a user sees: .grad always holds the
sum of the backward calls since the last zero_grad, however .grad is read,
replaced or zeroed in between, and the functional `out=` checks its arrays.
"""

import ctypes

import numpy as np
import pytest

import fastrnn
from fastrnn import functional as F
from fastrnn.optim import SGD

TOL = {np.float32: 2e-5, np.float64: 1e-12}


def make_layer(kind, dtype, **kw):
    cls = {"rnn": fastrnn.RNN, "gru": fastrnn.GRU, "lstm": fastrnn.LSTM}[kind]
    return cls(5, 7, dtype=dtype, seed=3, **kw)


def run_backward(m, seed):
    """One training forward + backward of m on fixed data; returns nothing (grads in m)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((6, 3, m.input_size)).astype(m.dtype)
    y, _ = m(x)
    m.backward(rng.standard_normal(y.shape).astype(m.dtype))


def fresh_grads(m, seed):
    """The gradients of one backward, from zero, on a copy-free fresh module state."""
    m.zero_grad()
    run_backward(m, seed)
    return {n: p.grad.copy() for n, p in m.named_parameters()}


LAYERS = [("rnn", {}), ("gru", {}), ("lstm", {}), ("lstm", {"proj_size": 4}),
          ("gru", {"bidirectional": True}), ("lstm", {"num_layers": 2})]


@pytest.mark.parametrize("kind,kw", LAYERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_after_zero_grad_equals_fresh_gradients(kind, kw, dtype):
    m = make_layer(kind, dtype, **kw)
    m.train()
    run_backward(m, 1)                       # leaves stale gradients behind
    m.zero_grad()
    run_backward(m, 2)
    got = {n: p.grad.copy() for n, p in m.named_parameters()}
    # the same call through the functional path into fresh arrays
    m2 = make_layer(kind, dtype, **kw)
    m2.train()
    want = fresh_grads(m2, 2)
    for n in want:
        assert np.array_equal(got[n], want[n]), n


def assert_two_backwards_add(m, tol):
    """Two backward calls after one zero_grad leave the sum of their gradients."""
    m.train()
    g1 = fresh_grads(m, 1)
    g2 = fresh_grads(m, 2)
    m.zero_grad()
    run_backward(m, 1)
    run_backward(m, 2)
    for n, p in m.named_parameters():
        want = g1[n] + g2[n]
        err = np.abs(p.grad - want).max() / max(np.abs(want).max(), 1e-30)
        assert err <= tol, (n, err)


@pytest.mark.parametrize("kind,kw", LAYERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_two_backwards_add(kind, kw, dtype):
    assert_two_backwards_add(make_layer(kind, dtype, **kw), TOL[dtype])


def test_zero_grad_reads_as_zero_and_is_lazy():
    m = make_layer("lstm", np.float32)
    m.train()
    run_backward(m, 1)
    p = m.weight_hh_l0
    ident, addr = id(p._grad), p._grad.ctypes.data   # (no reference kept: see below)
    first = float(p._grad.reshape(-1)[0])
    assert first != 0
    m.zero_grad()
    assert id(p._grad) == ident              # the same array ...
    assert ctypes.c_float.from_address(addr).value == first   # ... nothing written yet ...
    assert np.all(p.grad == 0)               # ... but .grad reads as zero
    run_backward(m, 2)                       # and backward then adds to those zeros
    want = fresh_grads(make_layer("lstm", np.float32).train(), 2)
    assert np.array_equal(p.grad, want["weight_hh_l0"])


def test_a_kept_gradient_array_keeps_its_values():
    """docs/layers.md: an array kept from before zero_grad() keeps its old values, as
    with torch's zero_grad(set_to_none=True); reading .grad or the next backward
    does not touch it."""
    m = make_layer("gru", np.float64)
    m.train()
    run_backward(m, 1)
    kept = m.weight_hh_l0.grad
    view = m.bias_ih_l0.grad[2:5]            # a view keeps its array too
    before, before_view = kept.copy(), view.copy()
    m.zero_grad()
    assert np.all(m.weight_hh_l0.grad == 0)
    run_backward(m, 2)
    assert np.array_equal(kept, before) and np.array_equal(view, before_view)
    want = fresh_grads(make_layer("gru", np.float64).train(), 2)
    assert np.array_equal(m.weight_hh_l0.grad, want["weight_hh_l0"])
    assert np.array_equal(m.bias_ih_l0.grad, want["bias_ih_l0"])


def test_a_training_loop_keeps_its_gradient_arrays():
    """Nobody keeps .grad in an ordinary loop: zero_grad reuses the arrays (no new
    allocation per step; the kernels write into them)."""
    m = make_layer("lstm", np.float32)
    m.train()
    opt = SGD(m.parameters(), lr=0.01)
    ids = [id(p._grad) for p in m.parameters()]
    for _ in range(3):
        opt.zero_grad()
        run_backward(m, 1)
        opt.step()
    assert [id(p._grad) for p in m.parameters()] == ids


def test_optimiser_zero_grad_is_lazy_too():
    m = make_layer("gru", np.float64)
    m.train()
    opt = SGD(m.parameters(), lr=0.1)
    run_backward(m, 1)
    opt.zero_grad()
    for p in m.parameters():
        assert np.all(p.grad == 0)


def test_replaced_grad_that_kernels_cannot_write_still_accumulates():
    """A user may put any array of the right shape in .grad (here Fortran order):
    backward then adds a fresh gradient to it instead of writing in place."""
    m = make_layer("lstm", np.float64)
    m.train()
    want = fresh_grads(m, 4)
    base = np.random.default_rng(0).standard_normal(m.weight_ih_l0.shape)
    m.zero_grad()
    m.weight_ih_l0.grad = np.asfortranarray(base.copy())
    run_backward(m, 4)
    got = m.weight_ih_l0.grad
    assert got.flags.f_contiguous
    assert np.allclose(got, base + want["weight_ih_l0"], rtol=1e-12, atol=1e-12)
    assert np.array_equal(m.weight_hh_l0.grad, want["weight_hh_l0"])


@pytest.mark.parametrize("cls", [fastrnn.RNNCell, fastrnn.GRUCell, fastrnn.LSTMCell])
def test_cells_accumulate_in_place(cls):
    cell = cls(4, 6, dtype=np.float64, seed=1)
    cell.train()
    rng = np.random.default_rng(2)
    xs = rng.standard_normal((2, 3, 4))
    dhs = rng.standard_normal((2, 3, 6))

    def one(t):
        cell(xs[t])
        cell.backward(dhs[t])

    singles = []
    for t in range(2):
        cell.zero_grad()
        one(t)
        singles.append({n: p.grad.copy() for n, p in cell.named_parameters()})
    cell.zero_grad()
    one(0)
    one(1)
    for n, p in cell.named_parameters():
        assert np.allclose(p.grad, singles[0][n] + singles[1][n], rtol=1e-12, atol=1e-12), n


def lstm_cache(dtype=np.float32, I=5):
    rng = np.random.default_rng(5)
    T, B, H = 4, 3, 6
    w_ih = rng.standard_normal((4 * H, I)).astype(dtype)
    w_hh = rng.standard_normal((4 * H, H)).astype(dtype)
    b = rng.standard_normal(4 * H).astype(dtype)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    y, _, _, cache = F.lstm_forward(x, None, None, w_ih, w_hh, b, b, training=True)
    dy = rng.standard_normal(y.shape).astype(dtype)
    return cache, dy, w_ih, w_hh, x


def test_functional_out_written_and_added():
    cache, dy, w_ih, w_hh, _ = lstm_cache()
    ref = F.lstm_backward(dy, None, None, lstm_cache()[0])
    out = (np.full_like(w_ih, np.nan), np.full_like(w_hh, np.nan))
    got = F.lstm_backward(dy, None, None, cache, out=out)
    assert got[3] is out[0] and got[4] is out[1]
    assert np.array_equal(out[0], ref[3]) and np.array_equal(out[1], ref[4])
    base = (np.ones_like(w_ih), np.ones_like(w_hh))
    got = F.lstm_backward(dy, None, None, lstm_cache()[0], out=base, accumulate=True)
    assert np.allclose(base[0], 1 + ref[3], rtol=1e-6, atol=1e-6)
    assert np.allclose(base[1], 1 + ref[4], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (lambda w_ih, w_hh, x: (np.zeros_like(w_ih),), "tuple of 2"),
    (lambda w_ih, w_hh, x: (np.zeros_like(w_ih, np.float64), np.zeros_like(w_hh)), "float32"),
    (lambda w_ih, w_hh, x: (np.asfortranarray(np.zeros_like(w_ih)), np.zeros_like(w_hh)),
     "C-contiguous"),
    (lambda w_ih, w_hh, x: (w_ih, np.zeros_like(w_hh)), "overlaps"),
    (lambda w_ih, w_hh, x: (np.zeros_like(w_ih), np.zeros((w_hh.shape[0] + 1, w_hh.shape[1]),
                                                          np.float32)), "shape"),
    (lambda w_ih, w_hh, x: ([0.0], np.zeros_like(w_hh)), "NumPy array"),
])
def test_functional_out_checked_before_the_cache_is_used(bad, match):
    cache, dy, w_ih, w_hh, x = lstm_cache()
    with pytest.raises((ValueError, TypeError), match=match):
        F.lstm_backward(dy, None, None, cache, out=bad(w_ih, w_hh, x))
    F.lstm_backward(dy, None, None, cache)   # the cache is still usable


def test_functional_out_arrays_must_be_separate():
    cache, dy, w_ih, w_hh, _ = lstm_cache(I=6)   # I = H: both gradients have one shape
    g = np.zeros_like(w_hh)
    with pytest.raises(ValueError, match="separate"):
        F.lstm_backward(dy, None, None, cache, out=(g, g))


def test_grad_that_aliases_the_weights_falls_back_to_adding():
    """A .grad that is the weights' own array cannot be the kernel's output (the
    kernel reads the weights); backward then adds into it as before, no error."""
    m = make_layer("rnn", np.float64)
    m.train()
    want = fresh_grads(m, 6)["weight_ih_l0"]
    p = m.weight_ih_l0
    before = p.data.copy()
    m.zero_grad()
    p.grad = p.data
    run_backward(m, 6)
    assert np.allclose(p.data, before + want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_two_backwards_add_under_bf16_products(kind):
    """Matmul precision "medium" (bf16 GEMM operands where the CPU has AVX512-BF16,
    float32 elsewhere): the kernel adds the second backward's weight gradients
    into .grad through the bf16 column GEMM (beta 1) as well."""
    before = fastrnn.get_float32_matmul_precision()
    fastrnn.set_float32_matmul_precision("medium")
    try:
        assert_two_backwards_add(make_layer(kind, np.float32), 2e-5)
    finally:
        fastrnn.set_float32_matmul_precision(before)


def test_a_grad_of_another_shape_is_refused_when_set():
    """As torch: .grad takes an array of the parameter's shape (or None: zero). A
    wrong one made backward fail half-way, some gradients already added (an audit)."""
    m = fastrnn.LSTM(3, 4, seed=0)
    with pytest.raises(ValueError, match=r"grad: expected an array of the parameter's "
                                         r"shape \(16, 4\), got shape \(3, 3\)"):
        m.weight_hh_l0.grad = np.zeros((3, 3))
    m.weight_hh_l0.grad = None
    x = np.ones((2, 1, 3), np.float32)
    y, _ = m(x)
    m.backward(np.ones_like(y))
    got = m.weight_hh_l0.grad.copy()
    m.zero_grad()
    y, _ = m(x)
    m.backward(np.ones_like(y))
    np.testing.assert_array_equal(got, m.weight_hh_l0.grad)      # None was zero
