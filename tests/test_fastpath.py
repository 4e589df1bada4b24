"""The eval-mode fast path (fastrnn/_fastpath.py): bitwise the general path's results,
taken when it should be, every parameter change seen, bad input still raising."""

import contextlib
import os

import numpy as np
import pytest

import fastrnn
from fastrnn import _fastpath, _recurrent
from fastrnn.modules.module import Parameter

LAYERS = ["RNN", "LSTM", "GRU"]


def general(module, *args, **kwargs):
    """The module's result with the fast path switched off (each of its entries: the
    modules' __call__ tries eval_call, their forward layer_forward / cell_forward)."""
    saved = _fastpath.eval_call, _fastpath.layer_forward, _fastpath.cell_forward
    _fastpath.eval_call = _fastpath.layer_forward = _fastpath.cell_forward = \
        lambda *a, **k: None
    try:
        return module(*args, **kwargs)
    finally:
        _fastpath.eval_call, _fastpath.layer_forward, _fastpath.cell_forward = saved


def flat(out):
    if isinstance(out, tuple):
        return [a for o in out for a in flat(o)]
    return [out]


def assert_bitwise(a, b):
    fa, fb = flat(a), flat(b)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert np.array_equal(x, y), np.abs(x - y).max()


_SERVED = []   # the plans of the calls the fast path's C entries served, in order


@contextlib.contextmanager
def counting_served_calls():
    """Wrap the fast path's C entries (plans built meanwhile call the wrappers) so that
    took_fast_path can tell which module's plan served calls."""
    saved = {name: getattr(_recurrent, name) for name in ("eval_layer", "eval_cell")}
    for name, real in saved.items():
        def spy(plan, *args, _real=real):
            out = _real(plan, *args)
            if out is not None and out is not False:   # None: not qualified; False: stale
                _SERVED.append(plan)
            return out
        setattr(_recurrent, name, spy)
    _SERVED.clear()
    try:
        yield
    finally:
        for name, real in saved.items():
            setattr(_recurrent, name, real)
        _SERVED.clear()


@pytest.fixture(autouse=True)
def count_served_calls():
    with counting_served_calls():
        yield


def took_fast_path(module):
    """Did module's plan serve a call since the last check (or the test's start)? (Its
    plan being kept is not enough: it stays after calls the fast path declined.)"""
    plan = module.__dict__.get("_fp_plan")
    served = isinstance(plan, _fastpath._Plan) and any(p is plan for p in _SERVED)
    _SERVED.clear()
    return served


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layers,bias", [(1, True), (2, True), (1, False)])
def test_layer_bitwise_general_path(cls, dtype, layers, bias):
    m = getattr(fastrnn, cls)(5, 12, num_layers=layers, bias=bias, dtype=dtype, seed=1).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5)).astype(dtype)
    h = rng.standard_normal((layers, 3, 12)).astype(dtype)
    hx = (h, 0.5 * h) if cls == "LSTM" else h
    for args in ((x,), (x, hx)):
        fast = m(*args)
        assert took_fast_path(m)
        assert_bitwise(fast, general(m, *args))


def test_general_switches_the_fast_path_off():
    """(The helper above: a check against it must compare two different paths.)"""
    m = fastrnn.LSTM(5, 12, seed=1).eval()
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    m(x)
    plan = m.__dict__["_fp_plan"]
    calls = []
    real = plan.call
    plan.call = lambda *a: calls.append(1) or real(*a)
    general(m, x)
    assert calls == []
    m(x)
    assert calls == [1]


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layers,T,B", [(1, 4, 3), (2, 4, 3), (1, 1, 5), (1, 7, 1), (2, 40, 20)])
def test_batch_first_layer_bitwise_general_path(cls, dtype, layers, T, B):
    """batch_first layers take the fast path too (x copied time-major, y copied back),
    with the general path's numbers, states given or not, one thread or a team."""
    m = getattr(fastrnn, cls)(5, 12 if T * B < 100 else 96, num_layers=layers, dtype=dtype,
                              batch_first=True, seed=3).eval()
    H = m.hidden_size
    rng = np.random.default_rng(T * 10 + B)
    x = rng.standard_normal((B, T, 5)).astype(dtype)                   # (B, T, I)
    h = rng.standard_normal((layers, B, H)).astype(dtype)
    hx = (h, 0.5 * h) if cls == "LSTM" else h
    for args in ((x,), (x, hx)):
        want = general(m, *args)
        assert want[0].shape == (B, T, H)
        for threads in (1, 2):
            with fastrnn.functional.thread_share(threads):
                fast = m(*args)
            assert took_fast_path(m)
            assert_bitwise(fast, want)
            assert fast[0].flags.c_contiguous


def test_batch_first_calls_the_fast_path_does_not_take_give_the_same_results():
    m = fastrnn.GRU(5, 8, batch_first=True, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((3, 6, 5)).astype(np.float32)
    want = general(m, x)
    assert_bitwise(m(np.asfortranarray(x)), want)        # any layout
    wide = np.zeros((3, 12, 5), np.float32)
    wide[:, ::2] = x
    assert_bitwise(m(wide[:, ::2]), want)                # a strided view
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        m(x.astype(np.float64))                          # the general path's message
    with pytest.raises(ValueError, match="x"):
        m(x[:, :, :4])


@pytest.mark.parametrize("cls", LAYERS)
def test_cell_bitwise_general_path_batched_and_unbatched(cls):
    c = getattr(fastrnn, cls + "Cell")(5, 12, seed=2).eval()
    rng = np.random.default_rng(0)
    for B in (None, 1, 3):
        shape = (5,) if B is None else (B, 5)
        hshape = (12,) if B is None else (B, 12)
        x = rng.standard_normal(shape).astype(np.float32)
        h = rng.standard_normal(hshape).astype(np.float32)
        hx = (h, 0.5 * h) if cls == "LSTM" else h
        for args in ((x,), (x, hx)):
            fast = c(*args)
            assert took_fast_path(c)
            assert_bitwise(fast, general(c, *args))


def test_calls_outside_the_fast_path_give_the_same_results():
    m = fastrnn.LSTM(5, 12, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((6, 4, 5)).astype(np.float32)
    want = general(m, x)
    x_f = np.asfortranarray(x)                          # not C-contiguous: general path copies
    assert_bitwise(m(x_f), want)
    assert_bitwise(m(x, [np.zeros((1, 4, 12), np.float32)] * 2), general(m, x))   # list state
    y, _ = m(x, lengths=[6, 6, 6, 6])                   # lengths: general path
    np.testing.assert_array_equal(y, want[0])
    y, _ = fastrnn.GRU(5, 8, bidirectional=True, seed=0).eval()(x, lengths=[6, 5, 6, 1])
    assert not y[5:, 3].any()                           # lengths: the general path's padding


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layers,T,B,H", [(1, 4, 3, 12), (2, 4, 3, 12), (1, 1, 1, 12),
                                          (2, 7, 1, 12), (1, 30, 2, 96), (2, 40, 20, 96)])
@pytest.mark.parametrize("merge_mode", ["concat", "sum"])
def test_bidirectional_layer_bitwise_general_path(cls, dtype, layers, T, B, H, merge_mode):
    """Bidirectional layers take the fast path: the directions in turn, each writing its
    half of y, the reverse one from the last step back (merge_mode "sum" then adds the
    halves); the general path's numbers, states given or not, one thread or a team,
    time-major or batch_first."""
    rng = np.random.default_rng(T * 10 + B)
    O = 2 * H if merge_mode == "concat" else H
    for batch_first in (False, True):
        m = getattr(fastrnn, cls)(5, H, num_layers=layers, bidirectional=True, dtype=dtype,
                                  batch_first=batch_first, merge_mode=merge_mode,
                                  seed=layers).eval()
        x = rng.standard_normal((B, T, 5) if batch_first else (T, B, 5)).astype(dtype)
        h = rng.standard_normal((2 * layers, B, H)).astype(dtype)
        hx = (h, 0.5 * h) if cls == "LSTM" else h
        for args in ((x,), (x, hx)):
            want = general(m, *args)
            assert want[0].shape == ((B, T, O) if batch_first else (T, B, O))
            for threads in (1, 2):
                with fastrnn.functional.thread_share(threads):
                    fast = m(*args)
                assert took_fast_path(m) and m.__dict__["_fp_plan"].D == 2
                assert_bitwise(fast, want)


def spy_calls(m):
    """A list that grows by one at every call the module's plan serves."""
    plan = m.__dict__["_fp_plan"]
    calls, real = [], plan.call
    plan.call = lambda *a: calls.append(len(a)) or real(*a)
    return calls


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layers,D,T,B,H,merge_mode", [
    (1, 1, 6, 3, 12, "concat"), (2, 2, 6, 3, 12, "concat"), (2, 2, 6, 3, 12, "sum"),
    (1, 2, 1, 1, 12, "concat"), (2, 1, 9, 1, 12, "concat"), (1, 2, 30, 2, 96, "concat"),
    (1, 2, 30, 2, 96, "sum"), (2, 2, 40, 20, 96, "concat"), (2, 2, 40, 20, 96, "sum"),
    (1, 1, 25, 64, 64, "concat")])
def test_lengths_bitwise_general_path(cls, dtype, layers, D, T, B, H, merge_mode):
    """Calls with `lengths` take the fast path (rows sorted by length, padded steps 0,
    each row's state at its last step, the reverse direction from each row's end):
    the general path's numbers for lengths ragged or all T (as a list or an array),
    states given or not, one thread or a team, time-major or batch_first."""
    rng = np.random.default_rng(T * 100 + B * 10 + D)
    ragged = rng.integers(1, T + 1, size=B)
    ragged[0] = T if B > 1 else ragged[0]
    for batch_first in (False, True):
        m = getattr(fastrnn, cls)(5, H, num_layers=layers, bidirectional=D == 2, dtype=dtype,
                                  batch_first=batch_first, merge_mode=merge_mode,
                                  seed=layers).eval()
        x = rng.standard_normal((B, T, 5) if batch_first else (T, B, 5)).astype(dtype)
        h = rng.standard_normal((D * layers, B, H)).astype(dtype)
        hx = (h, 0.5 * h) if cls == "LSTM" else h
        m(x)
        calls = spy_calls(m)
        for lengths in (ragged, list(ragged), np.full(B, T, np.int32)):
            for state in (None, hx):
                want = general(m, x, state, lengths)
                for threads in (1, 2):
                    n = len(calls)
                    with fastrnn.functional.thread_share(threads):
                        fast = m(x, state, lengths)
                    assert len(calls) == n + 1                  # served by the plan
                    assert_bitwise(fast, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layers,D,T,B,merge_mode", [
    (1, 1, 4, 3, "concat"), (2, 1, 6, 1, "concat"), (1, 1, 1, 1, "concat"),
    (2, 2, 7, 4, "concat"), (2, 2, 7, 4, "sum"), (1, 2, 40, 20, "concat"),
    (2, 1, 30, 64, "concat")])
def test_projected_lstm_bitwise_general_path(dtype, layers, D, T, B, merge_mode):
    """An LSTM with proj_size takes the fast path: h (y's rows, h_n, h0) has P values
    and c (c_n, c0) H; rows split on a team, never hidden units (the projection needs
    all of h_t). The general path's numbers with lengths or without, states given or
    not, one thread or a team, time-major or batch_first."""
    H, P = 24, 7
    rng = np.random.default_rng(T * 100 + B * 10 + D)
    ragged = rng.integers(1, T + 1, size=B)
    for batch_first in (False, True):
        m = fastrnn.LSTM(5, H, num_layers=layers, bidirectional=D == 2, proj_size=P,
                         dtype=dtype, batch_first=batch_first, merge_mode=merge_mode,
                         seed=layers).eval()
        x = rng.standard_normal((B, T, 5) if batch_first else (T, B, 5)).astype(dtype)
        hx = (rng.standard_normal((D * layers, B, P)).astype(dtype),
              rng.standard_normal((D * layers, B, H)).astype(dtype))
        m(x)
        assert took_fast_path(m) and m.__dict__["_fp_plan"].O == P
        assert not m.__dict__["_fp_plan"].schedule(T, B)[3]     # never hidden units
        calls = spy_calls(m)
        for lengths in (None, ragged):
            for state in (None, hx):
                want = general(m, x, state, lengths)
                assert want[0].shape[-1] == (P if merge_mode == "sum" else D * P)
                for threads in (1, 2, 3):
                    n = len(calls)
                    with fastrnn.functional.thread_share(threads):
                        fast = m(x, state, lengths)
                    assert len(calls) == n + 1                  # served by the plan
                    assert_bitwise(fast, want)


def test_projected_lstm_weight_changes_are_seen():
    """w_hr is read on every call (packed per call, never kept), and a new array for it
    is caught like any other parameter's."""
    m = fastrnn.LSTM(4, 8, proj_size=3, seed=0).eval()
    x = np.random.default_rng(1).standard_normal((3, 2, 4)).astype(np.float32)
    before = m(x)[0]
    m.weight_hr_l0.data[0, 0] += 0.5
    changed = m(x)[0]
    assert not np.array_equal(changed, before)
    assert_bitwise(changed, general(m, x)[0])
    m.weight_hr_l0.data = m.weight_hr_l0.data * 0.5
    halved = m(x)[0]
    assert not np.array_equal(halved, changed)
    assert_bitwise(halved, general(m, x)[0])
    m.weight_hr_l0.data = np.zeros((3, 7), np.float32)      # a wrong shape: general path
    with pytest.raises(ValueError, match="weight_hr"):
        m(x)


@pytest.mark.parametrize("lengths, error, match", [
    ([3, 0], ValueError, "lengths"), ([3, 4], ValueError, "lengths"),
    ([3.0, 2.0], TypeError, "lengths"), ([True, True], TypeError, "lengths"),
    ([3], ValueError, "lengths"), ([[3, 2]], ValueError, "lengths"), ("ab", TypeError, "lengths")])
def test_lengths_the_fast_path_does_not_take_get_the_general_paths_messages(lengths, error,
                                                                            match):
    m = fastrnn.GRU(5, 8, bidirectional=True, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((3, 2, 5)).astype(np.float32)
    m(x)
    calls = spy_calls(m)
    with pytest.raises(error, match=match):
        m(x, None, lengths)
    assert calls == []


@pytest.mark.parametrize("lengths, order, ok", [
    ([3, 5, 1], [1, 0, 2], True), ([2, 2, 2], [0, 1, 2], True), ([2, 2, 2], [2, 0, 1], True),
    ([1, 3, 3], [1, 0, 2], False),       # not by decreasing length: a row would run too long
    ([3, 5, 1], [1, 1, 2], False),       # not a permutation
    ([3, 5, 1], [1, 0, 3], False),       # a row that is not there
    ([3, 0, 1], [0, 2, 1], False), ([3, 6, 1], [1, 0, 2], False)])   # lengths outside [1, 5]
def test_eval_layer_takes_only_rows_sorted_by_length(lengths, order, ok):
    """eval_layer copies and checks the rows it is given (the driver counts active rows
    from that order, so a slip would index outside x and y); one it rejects goes to the
    general path."""
    intp = lambda v: np.array(v, np.intp)
    assert _recurrent._eval_layer_checks_rows(intp(lengths), intp(order), 5) is ok
    m = fastrnn.LSTM(4, 6, bidirectional=True, seed=0).eval()
    x = np.ones((5, 3, 4), np.float32)
    m(x)
    out = _recurrent.eval_layer(m.__dict__["_fp_plan"], x, None, intp(lengths), intp(order))
    assert (out is None) is not ok


def test_sorted_lengths_orders_rows_as_the_general_path():
    x = np.zeros((9, 6, 2), np.float32)
    lengths, order = _fastpath._sorted_lengths([3, 9, 3, 1, 9, 5], x, False)
    assert lengths.dtype == order.dtype == np.intp
    assert list(order) == [1, 4, 5, 0, 2, 3]             # decreasing, ties in row order
    assert list(order) == list(fastrnn.functional.Schedule(lengths, 6, 9, 2).order)
    assert _fastpath._sorted_lengths([9] * 6, x, False) == ()       # all T: as without
    assert _fastpath._sorted_lengths([9] * 9, x, True) is None      # read (B, T) = (9, 6): 9 > T
    assert _fastpath._sorted_lengths([2] * 6, x.transpose(1, 0, 2), True) is not None


def test_bidirectional_fast_path_rejects_what_the_general_path_rejects():
    m = fastrnn.LSTM(5, 8, bidirectional=True, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((3, 2, 5)).astype(np.float32)
    h = np.zeros((1, 2, 8), np.float32)                  # one direction's state: too few
    with pytest.raises(ValueError, match=r"hx\[0\]: expected shape \(2, 2, 8\)"):
        m(x, (h, h))
    with pytest.raises(ValueError, match="x"):
        m(x[:, :, :4])


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("T,B", [(1, 24), (40, 1), (40, 5), (50, 16), (6, 40)])
def test_large_calls_run_on_a_team_bitwise_the_general_path(cls, T, B):
    """Above functional.SMALL_WORK_FLOP the fast path runs a thread team (hidden units
    split at batch 1 and 5, rows at 16 and more: functional.rows_upto), packed or not
    as the general path decides."""
    m = getattr(fastrnn, cls)(64, 200, num_layers=2, seed=0).eval()
    x = np.random.default_rng(T + B).standard_normal((T, B, 64)).astype(np.float32)
    plan = _fastpath._plan(m, False)
    assert any(plan.schedule(T, B)[2])                  # some layer runs on a team
    want = general(m, x)
    for threads in (1, 2, 3):
        with fastrnn.functional.thread_share(threads):
            assert_bitwise(m(x), want)
        assert took_fast_path(m)


@pytest.mark.parametrize("cls", LAYERS)
def test_every_parameter_change_is_seen(cls):
    m = getattr(fastrnn, cls)(4, 8, seed=0).eval()
    x = np.random.default_rng(1).standard_normal((3, 2, 4)).astype(np.float32)
    before = m(x)[0]

    def check():
        got = m(x)[0]
        assert_bitwise(got, general(m, x)[0])
        return got
    # in-place write to a weight and to a bias
    m.weight_hh_l0.data[0, 0] += 0.5
    assert not np.array_equal(check(), before)
    m.bias_hh_l0.data[:] += 0.25
    after_bias = check()
    # a new array assigned to p.data
    m.weight_ih_l0.data = m.weight_ih_l0.data * 0.5
    after_new = check()
    assert not np.array_equal(after_new, after_bias)
    # a new Parameter object
    m.weight_ih_l0 = Parameter(np.zeros_like(m.weight_ih_l0.data))
    after_param = check()
    assert not np.array_equal(after_param, after_new)
    # load_state_dict and an optimiser step
    m.load_state_dict(getattr(fastrnn, cls)(4, 8, seed=5).state_dict())
    loaded = check()
    m.train()
    y, _ = m(x)
    m.backward(np.ones_like(y))
    fastrnn.optim.SGD(m.parameters(), lr=0.1).step()
    m.eval()
    assert not np.array_equal(check(), loaded)


@pytest.mark.parametrize("cls", LAYERS)
def test_a_changed_setting_is_seen(cls):
    """A setting changed after an eval call (batch_first here) is read by the next one,
    as by a module built with it: the fast path's plan does not keep the old one."""
    m = getattr(fastrnn, cls)(3, 5, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)   # (T, B, I)
    m(x)                                                  # builds the plan
    assert took_fast_path(m)
    m.batch_first = True                                  # x is now read as (B, T, I)
    fresh = getattr(fastrnn, cls)(3, 5, seed=0, batch_first=True).eval()
    assert_bitwise(m(x), fresh(x))
    m.batch_first = False
    assert_bitwise(m(x), getattr(fastrnn, cls)(3, 5, seed=0).eval()(x))
    assert took_fast_path(m)


def test_cell_parameter_changes_are_seen():
    c = fastrnn.GRUCell(4, 8, seed=0).eval()
    x = np.ones((2, 4), np.float32)
    a = c(x)
    c.bias_ih.data[17] = 3.0                            # the n gate's input bias
    b = c(x)
    assert not np.array_equal(a, b)
    assert_bitwise(b, general(c, x))


def test_bad_parameters_and_inputs_raise_as_before():
    m = fastrnn.LSTM(4, 8, seed=0).eval()
    x = np.ones((3, 2, 4), np.float32)
    m(x)
    good = m.weight_hh_l0.data
    m.weight_hh_l0.data = good.astype(np.float64)       # wrong dtype assigned
    with pytest.raises(TypeError, match=r"weight_hh_l0: expected dtype float32"):
        m(x)                                            # (named by its parameter since s35)
    m.weight_hh_l0.data = good[:, :4].copy()            # wrong shape assigned
    with pytest.raises(ValueError, match=r"weight_hh_l0: expected shape \(32, 8\)"):
        m(x)
    m.weight_hh_l0.data = good
    m(x)
    assert took_fast_path(m)                            # fixed: the fast path is back
    good.shape = (8, 32)                                # the same array reshaped in place
    with pytest.raises(ValueError, match=r"weight_hh_l0: expected shape \(32, 8\)"):
        m(x)
    good.shape = (32, 8)
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        m(x.astype(np.float64))
    with pytest.raises(ValueError, match="x: expected last dimension"):
        m(np.ones((3, 2, 5), np.float32))
    with pytest.raises(ValueError, match=r"hx\[0\]: expected shape \(1, 2, 8\)"):
        m(x, (np.zeros((1, 3, 8), np.float32), np.zeros((1, 2, 8), np.float32)))
    with pytest.raises(TypeError, match=r"hx\[1\]: expected dtype"):
        m(x, (np.zeros((1, 2, 8), np.float32), np.zeros((1, 2, 8), np.float64)))
    c = fastrnn.RNNCell(4, 8, seed=0).eval()
    with pytest.raises(ValueError, match="input: expected shape"):
        c(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="hx: expected shape"):
        c(np.ones((2, 4), np.float32), np.ones((3, 8), np.float32))
    with pytest.raises(TypeError, match="input: expected a numpy array"):
        c([1.0, 2.0, 3.0, 4.0])


def test_eval_after_training_forward_still_drops_the_stale_cache():
    m = fastrnn.GRU(4, 8, seed=0)
    x = np.ones((3, 2, 4), np.float32)
    m(x)                                                # training forward: cache pending
    m.eval()
    m(x)                                                # general path clears it
    assert m._cache is None
    with pytest.raises(RuntimeError, match="no forward cache"):
        m.backward(np.ones((3, 2, 8), np.float32))
    m(x)
    assert took_fast_path(m)


def test_eval_registration_is_released_after_errors():
    m = fastrnn.LSTM(4, 8, seed=0).eval()
    with pytest.raises(ValueError):
        m(np.ones((3, 2, 5), np.float32))
    m(np.ones((3, 2, 4), np.float32))
    assert m.__dict__["_eval_users"] == []
    m.train()
    y, _ = m(np.ones((3, 2, 4), np.float32))           # a training call is allowed again
    m.backward(np.ones_like(y))


@pytest.mark.parametrize("cls,layers", [("LSTM", 1), ("GRU", 2), ("RNN", 1), ("GRUCell", 1),
                                        ("LSTMCell", 1)])
def test_kernel_only_runs_the_same_kernel_call(cls, layers):
    """What the benchmark times as "the kernel" computes the module call's numbers."""
    kw = {"num_layers": layers} if layers > 1 else {}
    m = getattr(fastrnn, cls)(4, 8, seed=0, **kw).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 4) if "Cell" not in cls else (2, 4)).astype(np.float32)
    run = _fastpath.kernel_only(m, x)
    y, h_n, c_n = run.outputs
    y[...] = h_n[...] = np.nan
    assert run() is None
    want = flat(m(x))
    if "Cell" in cls:     # h (B, H) [, c]
        got = [y[0]] + ([c_n[0]] if c_n is not None else [])
    else:                 # y (T, B, H), h_n (L, B, H) [, c_n]
        got = [y, h_n] + ([c_n] if c_n is not None else [])
    assert_bitwise(tuple(got), tuple(want))


def test_kernel_only_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="does not qualify"):
        _fastpath.kernel_only(fastrnn.LSTM(4, 8, bidirectional=True).eval(),
                              np.ones((3, 1, 4), np.float32))
    with pytest.raises(ValueError, match="does not qualify"):
        _fastpath.kernel_only(fastrnn.LSTM(4, 8, batch_first=True).eval(),
                              np.ones((1, 3, 4), np.float32))


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_small_is_bitwise_the_module_call(cls, dtype):
    """The one-thread driver entry (src/forward_small.pxi), called as kernel_only calls it."""
    m = getattr(fastrnn, cls)(5, 7, dtype=dtype, seed=3).eval()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 5)).astype(dtype)
    h0 = rng.standard_normal((2, 7)).astype(dtype)
    plan = _fastpath._plan(m, False)
    y, h_n, c_n = np.empty((3, 2, 7), dtype), np.empty((2, 7), dtype), np.empty((2, 7), dtype)
    _recurrent_small(plan, y, h_n, c_n, x, h0, 0.5 * h0)
    out = general(m, x, ((h0[None], 0.5 * h0[None]) if cls == "LSTM" else h0[None]))
    assert_bitwise(y, out[0])
    assert_bitwise(h_n, (out[1][0] if cls == "LSTM" else out[1])[0])


def _recurrent_small(plan, y, h_n, c_n, x, h0, c0):
    from fastrnn import _recurrent
    lstm = plan.kind == "lstm"
    _recurrent.forward_small(plan.cell_code, y, h_n, c_n if lstm else None, x, h0,
                             c0 if lstm else None, *plan.layers[0],
                             *plan.schedule(x.shape[0], x.shape[1])[:2])


def test_forward_small_rejects_bad_arrays_with_the_argument_named():
    from fastrnn import _recurrent
    m = fastrnn.LSTM(5, 7, seed=0).eval()
    plan = _fastpath._plan(m, False)
    w = plan.layers[0]
    x = np.ones((3, 2, 5), np.float32)
    ok = dict(y=np.empty((3, 2, 7), np.float32), h_n=np.empty((2, 7), np.float32),
              c_n=np.empty((2, 7), np.float32), x=x, h0=None, c0=None)

    def call(**kw):
        a = {**ok, **kw}
        _recurrent.forward_small(plan.cell_code, a["y"], a["h_n"], a["c_n"], a["x"], a["h0"],
                                 a["c0"], *w, False, False)
    call()
    for name, bad in [("y", np.empty((3, 2, 6), np.float32)),
                      ("h_n", np.empty((2, 7), np.float64)),
                      ("c_n", np.empty((7, 2), np.float32).T),       # not C-contiguous
                      ("h0", np.empty((3, 7), np.float32)),
                      ("w_ih", np.ones((3, 2, 4), np.float32))]:   # x of another I
        with pytest.raises(ValueError, match=name):
            call(**{("x" if name == "w_ih" else name): bad})
    with pytest.raises(ValueError, match="required"):
        call(c_n=None)
    with pytest.raises(ValueError, match="float32 or float64"):
        call(x=np.ones((3, 2, 5), np.int32))
    with pytest.raises(ValueError, match="empty"):
        call(x=np.ones((0, 2, 5), np.float32), y=np.empty((0, 2, 7), np.float32))


def test_training_call_refused_while_another_thread_is_in_an_eval_call():
    """Eval calls register in a lock-free list; a training call from another thread sees it."""
    import threading
    m = fastrnn.LSTM(4, 8, seed=0).eval()
    inside, release = threading.Event(), threading.Event()
    seen = []

    x = np.ones((3, 2, 4), np.float32)

    real = _fastpath._recurrent

    class Waiting:      # the kernel module, with an eval call that waits inside
        def __getattr__(self, name):
            return getattr(real, name)

        def eval_layer(self, plan, x_, hx):
            inside.set()
            release.wait(5)
            return real.eval_layer(plan, x_, hx)

    def slow_eval():
        _fastpath._recurrent = Waiting()
        try:
            seen.append(m(x)[0])
        finally:
            _fastpath._recurrent = real
    t = threading.Thread(target=slow_eval)
    t.start()
    assert inside.wait(5)
    m.train()
    try:
        with pytest.raises(RuntimeError, match="another thread is running this module"):
            m(x)
    finally:
        release.set()
        t.join()
    assert len(seen) == 1 and m.__dict__["_eval_users"] == []


@pytest.mark.parametrize("kind", ["LSTM", "GRUCell", "RNNCell"])
def test_parameters_start_on_a_cache_line_and_results_do_not_depend_on_it(kind):
    """Modules allocate data and grad 64-byte aligned (the batch-1 kernels read the
    weights in place), copies and pickles keep it, and a parameter replaced by an
    array at another address gives bitwise the same results."""
    import copy
    import pickle
    m = getattr(fastrnn, kind)(5, 33, seed=1).eval()
    twins = [copy.deepcopy(m), pickle.loads(pickle.dumps(m))]
    for module in [m] + twins:
        for name, p in module.named_parameters():
            assert p.data.ctypes.data % 64 == 0, name
            assert p.grad.ctypes.data % 64 == 0, name
    for (name, p), (_, q) in zip(m.named_parameters(), twins[0].named_parameters()):
        assert np.array_equal(p.data, q.data) and not np.may_share_memory(p.data, q.data), name
    x = np.random.default_rng(0).standard_normal((1, 5) if "Cell" in kind else (4, 1, 5))
    x = x.astype(np.float32)
    want = m(x)
    off = twins[0]
    for name, p in off.named_parameters():          # the same values, 4 bytes past a line
        raw = np.empty(p.data.nbytes + 128, np.uint8)
        start = -raw.ctypes.data % 64 + 4
        moved = raw[start:start + p.data.nbytes].view(p.data.dtype).reshape(p.data.shape)
        moved[...] = p.data
        p.data = moved
    assert_bitwise(off(x), want)
    assert took_fast_path(off)
    assert_bitwise(twins[1](x), want)


def test_deepcopy_drops_call_bookkeeping_and_plan():
    import copy
    m = fastrnn.GRU(4, 8, num_layers=2, seed=0).eval()
    x = np.ones((3, 2, 4), np.float32)
    want = m(x)
    m.__dict__["_eval_users"].append(-1)              # as if a call were in flight
    c = copy.deepcopy(m)
    m.__dict__["_eval_users"].remove(-1)
    assert "_fp_plan" not in c.__dict__ and "_eval_users" not in c.__dict__
    assert_bitwise(c(x), want)
    assert took_fast_path(c) and c._fp_plan.params[0][0] is c.weight_ih_l0
    c.train()
    y, _ = c(x)                                         # no phantom thread inside the copy
    c.backward(np.ones_like(y))


def test_a_setting_changed_while_another_thread_builds_the_plan_is_not_lost():
    """A plan built from the old batch_first by one thread while another sets it is
    dropped, not kept (plans are built, and settings set, under one lock; an audit
    found the setter dropping the plan before it set the value)."""
    import threading
    m = fastrnn.GRU(3, 5, seed=0).eval()
    reading, go_on = threading.Event(), threading.Event()
    real = _fastpath._build

    def slow_build(module, cell):
        plan = real(module, cell)            # reads batch_first = False
        reading.set()
        go_on.wait(5)
        return plan

    _fastpath._build = slow_build
    try:
        builder = threading.Thread(target=_fastpath._plan, args=(m, False))
        builder.start()
        assert reading.wait(5)
        setter = threading.Thread(target=setattr, args=(m, "batch_first", True))
        setter.start()
        setter.join(0.2)
        assert setter.is_alive()             # waits for the build to end
        go_on.set()
        builder.join(5)
        setter.join(5)
    finally:
        _fastpath._build = real
    plan = m.__dict__.get("_fp_plan")
    assert plan is None or plan.batch_first
    x = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)  # (B, T, I)
    assert_bitwise(m(x), fastrnn.GRU(3, 5, seed=0, batch_first=True).eval()(x))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_while_another_thread_builds_a_plan_leaves_the_child_working():
    """Module.__setattr__ takes the plan-building lock: a fork while another thread
    holds it must not leave the child's first module hanging (the lock is made anew
    in a child)."""
    import threading
    import time
    held, release = threading.Event(), threading.Event()

    def hold():
        with _fastpath._BUILD_LOCK:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(5)
    try:
        pid = os.fork()
        if pid == 0:                                    # the child
            try:
                fastrnn.GRU(2, 3, seed=0).eval()(np.ones((2, 1, 2), np.float32))
                os._exit(0)
            except BaseException:
                os._exit(1)
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung building a module")
            time.sleep(0.01)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        release.set()
        t.join()
