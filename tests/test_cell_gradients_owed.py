"""A cell's weight gradients, summed once over its steps (fastrnn.modules.cells).

A cell's backward keeps each step's terms of the weight gradients and adds them to
`.grad` in one GEMM per weight: when its last cached step has gone back, every
PENDING_ROWS rows, or as soon as anything reads or changes a gradient. None of it
may show: what `.grad` reads, an optimizer steps with, a copy or a pickle holds is
always the sum of every backward call made, as when each step added its own.
The kernel that sums them (_recurrent.weight_gradients) is checked against NumPy.
"""

import copy
import pickle

import numpy as np
import pytest

import fastrnn
from fastrnn import _recurrent
from fastrnn.modules import cells as cells_module

T, B, I, H = 5, 3, 7, 9
KINDS = ["rnn", "lstm", "gru"]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-11, atol=1e-13)}


def make(kind, dtype=np.float64, bias=True, seed=0, **kw):
    cls = {"rnn": fastrnn.RNNCell, "lstm": fastrnn.LSTMCell, "gru": fastrnn.GRUCell}[kind]
    return cls(I, H, bias=bias, dtype=dtype, seed=seed, **kw)


def data(dtype, seed=1, t=T, b=B):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((t, b, I)).astype(dtype),        # x (T, B, I)
            rng.standard_normal((t, b, H)).astype(dtype))        # dL/dh_t (T, B, H)


def forward(cell, kind, x):
    state = None
    for t in range(x.shape[0]):
        state = cell(x[t], state)


def backward_steps(cell, kind, dys, steps, carry=None, each=None):
    """`steps` backward calls, last step first; each(t) after every call. Returns the carry."""
    T_ = dys.shape[0]
    if carry is None:
        carry = (np.zeros_like(dys[0]), None) if kind == "lstm" else np.zeros_like(dys[0])
    for k in range(steps):
        t = T_ - 1 - k
        if kind == "lstm":
            _, carry = cell.backward(carry[0] + dys[t], carry[1])
        else:
            _, carry = cell.backward(carry + dys[t])
        if each is not None:
            each(t)
    return carry


def grads(cell):
    return [p.grad.copy() for p in cell.parameters()]


def step_by_step(kind, dtype, x, dys, **kw):
    """The gradients as each step adds its own: .grad read after every backward call
    (each read adds what is owed), with the sums after every call."""
    cell = make(kind, dtype, **kw)
    forward(cell, kind, x)
    partial = []
    backward_steps(cell, kind, dys, x.shape[0], each=lambda t: partial.append(grads(cell)))
    return partial


def assert_close(got, want, dtype):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **TOL[dtype])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_a_sequence_sums_to_the_layer_gradients(kind, dtype, bias):
    """The owed sum, added once at the sequence's end, is the sequence layer's
    gradient of the same loss (and .grad read after every step gives the same)."""
    x, dys = data(dtype)
    cell = make(kind, dtype, bias=bias)
    layer = {"rnn": fastrnn.RNN, "lstm": fastrnn.LSTM, "gru": fastrnn.GRU}[kind](
        I, H, bias=bias, dtype=dtype)
    layer.load_state_dict({k + "_l0": v for k, v in cell.state_dict().items()})
    layer.train()
    layer(x)
    layer.backward(dys)
    forward(cell, kind, x)
    backward_steps(cell, kind, dys, T)
    assert cell.num_cached_steps == 0
    assert all(p._pending is None for p in cell.parameters())   # added at the last step
    assert_close(grads(cell), [p.grad for p in layer.parameters()], dtype)
    assert_close(grads(cell), step_by_step(kind, dtype, x, dys, bias=bias)[-1], dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_grad_read_part_way_shows_the_calls_made(kind):
    """After k of T backward calls, .grad is the sum of those k steps' gradients."""
    x, dys = data(np.float64)
    partial = step_by_step(kind, np.float64, x, dys)
    for k in (1, 3):
        cell = make(kind)
        forward(cell, kind, x)
        backward_steps(cell, kind, dys, k)
        assert cell.weight_hh._pending is not None           # owed, not yet added
        assert_close(grads(cell), partial[k - 1], np.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_grad_part_way_drops_only_the_calls_before_it(kind):
    x, dys = data(np.float64)
    partial = step_by_step(kind, np.float64, x, dys)
    cell = make(kind)
    forward(cell, kind, x)
    carry = backward_steps(cell, kind, dys, 2)
    cell.zero_grad()
    backward_steps(cell, kind, dys[:T - 2], T - 2, carry=carry)   # the other steps
    want = [a - b for a, b in zip(partial[-1], partial[1])]
    assert_close(grads(cell), want, np.float64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle"])
def test_a_copy_part_way_holds_what_is_owed_once(kind, how):
    """A cell copied (or a parameter pickled) between backward calls: the copy holds
    the gradients of the calls made, the original goes on to the full sum, and
    neither counts a step twice."""
    x, dys = data(np.float64)
    partial = step_by_step(kind, np.float64, x, dys)
    cell = make(kind)
    forward(cell, kind, x)
    carry = backward_steps(cell, kind, dys, 2)
    if how == "deepcopy":
        twin = copy.deepcopy(cell)
        twin_grads = grads(twin)
    elif how == "copy":
        twin_grads = [copy.copy(p).grad.copy() for p in cell.parameters()]
    else:
        twin_grads = [pickle.loads(pickle.dumps(p)).grad for p in cell.parameters()]
    assert_close(twin_grads, partial[1], np.float64)
    backward_steps(cell, kind, dys[:T - 2], T - 2, carry=carry)   # the other steps
    assert_close(grads(cell), partial[-1], np.float64)
    if how == "deepcopy":
        assert_close(grads(twin), partial[1], np.float64)     # the copy owed nothing more


def test_an_optimizer_step_sees_every_call():
    x, dys = data(np.float32)
    a, b = make("lstm", np.float32), make("lstm", np.float32)
    for cell in (a, b):
        forward(cell, "lstm", x)
    backward_steps(a, "lstm", dys, 3)                          # owes its last 3 steps
    backward_steps(b, "lstm", dys, 3, each=lambda t: b.weight_hh.grad)   # added per step
    for cell in (a, b):
        fastrnn.optim.SGD(cell.parameters(), lr=0.5).step()
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_a_weight_shared_by_two_cells_gets_both_sums(kind):
    """Two cells holding the same weight_hh Parameter, their backward calls
    interleaved: its gradient is the sum of both cells' steps."""
    x, dys = data(np.float64)
    x2, dys2 = data(np.float64, seed=2)
    a, b = make(kind, seed=0), make(kind, seed=0)
    b.weight_hh = a.weight_hh
    forward(a, kind, x)
    forward(b, kind, x2)
    ca = backward_steps(a, kind, dys, 2)
    cb = backward_steps(b, kind, dys2, 2)
    backward_steps(a, kind, dys[:T - 2], T - 2, carry=ca)
    backward_steps(b, kind, dys2[:T - 2], T - 2, carry=cb)
    want = step_by_step(kind, np.float64, x, dys)[-1][1] + step_by_step(
        kind, np.float64, x2, dys2)[-1][1]
    np.testing.assert_allclose(a.weight_hh.grad, want, **TOL[np.float64])


@pytest.mark.parametrize("kind", KINDS)
def test_sums_taken_every_few_rows_and_after_clear_cache(kind, monkeypatch):
    """PENDING_ROWS bounds what is kept (here 2 steps of 3 rows); clear_cache adds
    what is owed, as the last step would."""
    monkeypatch.setattr(cells_module, "PENDING_ROWS", 2 * B)
    x, dys = data(np.float64)
    partial = step_by_step(kind, np.float64, x, dys)
    cell = make(kind)
    forward(cell, kind, x)
    seen = []
    backward_steps(cell, kind, dys, 3,
                   each=lambda t: seen.append(cell.__dict__["_owed"].rows))
    assert seen == [B, 0, B]                                   # added at the second call
    cell.clear_cache()
    assert cell.weight_ih._pending is None
    assert_close(grads(cell), partial[2], np.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_the_input_is_kept_when_its_step_goes_back(kind):
    """A caller reusing its input arrays after a step's backward, before the sum is
    taken (here at the last call), does not change the gradient."""
    x, dys = data(np.float64)
    want = step_by_step(kind, np.float64, x, dys)[-1]
    xs = [x[t].copy() for t in range(T)]
    cell = make(kind)
    state = None
    for t in range(T):
        state = cell(xs[t], state)
    backward_steps(cell, kind, dys, T, each=lambda t: xs[t].fill(1e6))
    assert_close(grads(cell), want, np.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_one_and_two_threads_owe_the_same_bits(kind):
    """Sizes whose sums run on a team of 2 (over the small-work bound)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 40, 33)).astype(np.float32)      # (T, B, I)
    dys = rng.standard_normal((6, 40, 70)).astype(np.float32)    # (T, B, H)
    cls = {"rnn": fastrnn.RNNCell, "lstm": fastrnn.LSTMCell, "gru": fastrnn.GRUCell}[kind]
    got, old = [], fastrnn.get_num_threads()
    try:
        for n in (1, 2):
            fastrnn.set_num_threads(n)
            cell = cls(33, 70, seed=0)
            forward(cell, kind, x)
            backward_steps(cell, kind, dys, 6)
            got.append(grads(cell))
    finally:
        fastrnn.set_num_threads(old)
    for a, b in zip(*got):
        np.testing.assert_array_equal(a, b)


def test_a_gru_with_reset_before_still_adds_per_step():
    """reset_after=False (its W_hn gradient is against r * h_{t-1}, which GateGradients
    does not carry) adds its weight gradients at every step: nothing is owed, the sums
    are right."""
    x, dys = data(np.float64)
    cell = make("gru", reset_after=False)
    forward(cell, "gru", x)
    backward_steps(cell, "gru", dys, 2)
    assert cell.weight_hh._pending is None
    assert_close(grads(cell), step_by_step("gru", np.float64, x, dys, reset_after=False)[1],
                 np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("apart", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_weight_gradients_kernel_against_numpy(dtype, apart, accumulate):
    rng = np.random.default_rng(3)
    V, GH, I_, H_ = 37, 45, 13, 15                                # odd sizes
    dgx = rng.standard_normal((V, GH)).astype(dtype)
    dgh = rng.standard_normal((V, GH)).astype(dtype) if apart else None
    x = rng.standard_normal((V, I_)).astype(dtype)
    h = rng.standard_normal((V, H_)).astype(dtype)
    dw_ih = rng.standard_normal((GH, I_)).astype(dtype)
    dw_hh = rng.standard_normal((GH, H_)).astype(dtype)
    start_ih, start_hh = dw_ih.copy(), dw_hh.copy()
    db_x = np.empty(GH, dtype)
    db_h = np.empty(GH, dtype) if apart else None
    _recurrent.weight_gradients(dw_ih, dw_hh, dgx, dgh, x, h, 2, accumulate, db_x, db_h)
    gh = dgh if apart else dgx
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw_ih, (start_ih if accumulate else 0) + dgx.T @ x, **tol)
    np.testing.assert_allclose(dw_hh, (start_hh if accumulate else 0) + gh.T @ h, **tol)
    np.testing.assert_allclose(db_x, dgx.sum(0), **tol)
    if apart:
        np.testing.assert_allclose(db_h, dgh.sum(0), **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("apart", [False, True])
def test_weight_gradients_over_parts_equal_the_joined_arrays(dtype, apart):
    """A cell's steps are passed as lists of their arrays, read in place: bitwise the
    numbers of the same rows joined into one array (the rows are summed in the same
    order), whatever the cut, an empty part included."""
    rng = np.random.default_rng(4)
    V, GH, I_, H_ = 1100, 45, 13, 15                 # past one K block of 1024 rows
    f = lambda *s: rng.standard_normal(s).astype(dtype)     # noqa: E731
    dgx, dgh, x, h = f(V, GH), (f(V, GH) if apart else None), f(V, I_), f(V, H_)
    cuts = [0, 7, 7, 500, 1093, V]                   # parts of 7, 0, 493, 593, 7 rows
    split = lambda a: [a[i:j] for i, j in zip(cuts, cuts[1:])]   # noqa: E731
    outs = []
    for parts in (False, True):
        dw_ih, dw_hh = np.empty((GH, I_), dtype), np.empty((GH, H_), dtype)
        db_x, db_h = np.empty(GH, dtype), (np.empty(GH, dtype) if apart else None)
        args = (dgx, dgh, x, h)
        if parts:
            args = tuple(None if a is None else split(a) for a in args)
        _recurrent.weight_gradients(dw_ih, dw_hh, *args, 2, False, db_x, db_h)
        outs.append([dw_ih, dw_hh, db_x] + ([db_h] if apart else []))
    for a, b in zip(*outs):
        assert np.array_equal(a, b)
    np.testing.assert_allclose(outs[0][0], dgx.T @ x, rtol=1e-4 if dtype == np.float32
                               else 1e-11, atol=1e-3 if dtype == np.float32 else 1e-10)


def test_weight_gradients_kernel_refuses_mismatched_shapes():
    f = np.zeros
    with pytest.raises(ValueError, match=r"weight_gradients: x: expected 5 rows in all "
                                         r"\(dgx's\), got 6"):
        _recurrent.weight_gradients(f((4, 3)), f((4, 2)), f((5, 4)), None, f((6, 3)),
                                    f((5, 2)), 1)
    with pytest.raises(ValueError, match=r"h_prev: expected rows of 2 values, 5 in all, "
                                         r"got a part of shape \(3, 4\)"):
        _recurrent.weight_gradients(f((4, 3)), f((4, 2)), [f((2, 4)), f((3, 4))], None,
                                    [f((5, 3))], [f((2, 2)), f((3, 4))], 1)
    with pytest.raises(ValueError, match="dgx: Buffer dtype mismatch"):
        _recurrent.weight_gradients(f((4, 3)), f((4, 2)), [f((5, 4), np.float32)], None,
                                    f((5, 3)), f((5, 2)), 1)
    with pytest.raises(ValueError, match="x: .*contiguous"):
        _recurrent.weight_gradients(f((4, 3)), f((4, 2)), f((5, 4)), None, f((5, 6))[:, ::2],
                                    f((5, 2)), 1)
    with pytest.raises(ValueError, match="db_h only with dgh"):
        _recurrent.weight_gradients(f((4, 3)), f((4, 2)), f((5, 4)), None, f((5, 3)),
                                    f((5, 2)), 1, False, f(4), f(4))


def test_weight_gradients_reads_read_only_arrays():
    """The parts are only read: read-only arrays are taken, as before parts (a review)."""
    rng = np.random.default_rng(6)
    dgx, x, h = (rng.standard_normal(s) for s in ((9, 8), (9, 3), (9, 2)))
    for a in (dgx, x, h):
        a.flags.writeable = False
    dw_ih, dw_hh = np.empty((8, 3)), np.empty((8, 2))
    _recurrent.weight_gradients(dw_ih, dw_hh, [dgx[:4], dgx[4:]], None, x, [h], 1)
    np.testing.assert_allclose(dw_ih, dgx.T @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw_hh, dgx.T @ h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_a_cell_whose_weight_hh_is_its_weight_ih_gets_both_terms(kind):
    """weight_hh tied to weight_ih (I == H): their one gradient is dW_ih + dW_hh. Both
    sums went into the one .grad array, the second overwriting the first, in a first
    version (a review); before that the per-step backward refused the two as one."""
    cls = {"rnn": fastrnn.RNNCell, "lstm": fastrnn.LSTMCell, "gru": fastrnn.GRUCell}[kind]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 2, 6))
    dys = rng.standard_normal((4, 2, 6))
    untied, tied = cls(6, 6, dtype=np.float64, seed=0), cls(6, 6, dtype=np.float64, seed=0)
    tied.weight_hh = tied.weight_ih
    untied.weight_hh.data[...] = untied.weight_ih.data
    for cell in (untied, tied):
        cell.zero_grad()
        forward(cell, kind, x)
        backward_steps(cell, kind, dys, 4)
    want = untied.weight_ih.grad + untied.weight_hh.grad
    np.testing.assert_allclose(tied.weight_ih.grad, want, **TOL[np.float64])


@pytest.mark.parametrize("kind", KINDS)
def test_sums_that_fail_stay_owed(kind, monkeypatch):
    """Out of memory while summing: the read that asked raises, nothing was added,
    and the next read adds everything."""
    x, dys = data(np.float64)
    partial = step_by_step(kind, np.float64, x, dys)
    cell = make(kind)
    forward(cell, kind, x)
    backward_steps(cell, kind, dys, 2)
    real = _recurrent.weight_gradients

    def fail(*args):
        raise MemoryError("fastrnn recurrent weight_gradients: out of memory")
    monkeypatch.setattr(_recurrent, "weight_gradients", fail)
    with pytest.raises(MemoryError):
        cell.weight_hh.grad
    monkeypatch.setattr(_recurrent, "weight_gradients", real)
    assert cell.weight_ih._pending is not None and cell.__dict__["_owed"].rows == 2 * B
    assert_close(grads(cell), partial[1], np.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_batch_as_the_last_step_adds_what_is_owed(kind):
    cell = make(kind)
    rng = np.random.default_rng(6)
    cell(np.zeros((0, I)))                                     # step 0: an empty batch
    cell(rng.standard_normal((B, I)))                          # step 1
    dh = rng.standard_normal((B, H))
    cell.backward((dh, None) if kind == "lstm" else dh)        # step 1 back: owed
    assert cell.weight_hh._pending is not None
    cell.backward(np.zeros((0, H)))                            # the last step
    assert cell.weight_hh._pending is None and cell.num_cached_steps == 0
