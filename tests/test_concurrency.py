"""Eval-mode calls from 8 threads give bitwise the serial results; training calls
that would mix caches across threads raise."""

import threading

import numpy as np
import pytest

import fastrnn


def run_threads(fn, n=8):
    results, errors = [None] * n, []

    def work(k):
        try:
            results[k] = fn(k)
        except Exception as e:
            errors.append(e)
    ts = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return results, errors


MODELS = {
    "lstm": lambda: fastrnn.LSTM(5, 24, num_layers=2, seed=0),
    "gru_cell": lambda: fastrnn.GRUCell(5, 24, seed=0),
    "int8_lstm": lambda: fastrnn.quantize(fastrnn.LSTM(5, 24, num_layers=2, seed=0), "int8"),
    "bf16_gru": lambda: fastrnn.quantize(fastrnn.GRU(5, 24, seed=0), "bfloat16"),
    "int8_cell": lambda: fastrnn.quantize(fastrnn.LSTMCell(5, 24, seed=0), "int8"),
    # frozen: every call reads the kept packings (functional.pack_flags), on a team
    "frozen_lstm": lambda: fastrnn.LSTM(5, 256, num_layers=2, seed=0).freeze(),
    "frozen_gru_cell": lambda: fastrnn.GRUCell(5, 256, seed=0).freeze(),
}


@pytest.mark.parametrize("name", MODELS)
def test_eval_threads_bitwise_serial(name):
    m = MODELS[name]().eval()
    rng = np.random.default_rng(0)
    cell = "cell" in name
    xs = [rng.standard_normal((3, 5) if cell else (7, 3, 5)).astype(np.float32)
          for _ in range(8)]

    def call(k):
        out = None
        for _ in range(5):
            out = m(xs[k])
        return out[0] if isinstance(out, tuple) else out
    serial = [call(k) for k in range(8)]
    par, errors = run_threads(call)
    assert not errors
    for a, b in zip(serial, par):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("H", [24, 256])       # one thread, or the pool's team
def test_eval_threads_with_lengths_and_two_directions_bitwise_serial(H):
    """The fast path's bidirectional calls with lengths from 8 threads at once: each
    thread its own rows and lengths, the serial results (one call owns the pool at a
    time; the others run alone)."""
    m = fastrnn.GRU(5, H, bidirectional=True, num_layers=2, seed=0).eval()
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((20, 3, 5)).astype(np.float32) for _ in range(8)]
    lens = [rng.integers(1, 21, size=3) for _ in range(8)]

    def call(k):
        out = None
        for _ in range(5):
            out = m(xs[k], None, lens[k])
        return out
    serial = [call(k) for k in range(8)]
    par, errors = run_threads(call)
    assert not errors
    for a, b in zip(serial, par):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_training_forward_of_another_thread_raises():
    m = fastrnn.LSTM(3, 8, seed=0)           # training mode
    x = np.ones((2, 1, 3), np.float32)
    m(x)                                      # this thread's cache awaits its backward
    _, errors = run_threads(lambda k: m(x), n=1)
    assert len(errors) == 1 and "has not run its backward" in str(errors[0])
    _, errors = run_threads(lambda k: m.backward(np.zeros((2, 1, 8), np.float32)), n=1)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    m.backward(np.zeros((2, 1, 8), np.float32))     # the owner still can
    # an eval call from another thread does not disturb a pending cache
    m(x)
    ev = fastrnn.LSTM(3, 8, seed=0).eval()
    ev.load_state_dict(m.state_dict())
    m.eval()
    _, errors = run_threads(lambda k: m(x), n=2)
    m.train()
    assert not errors
    m.backward(np.zeros((2, 1, 8), np.float32))


def test_training_during_a_running_call_raises():
    m = fastrnn.GRU(3, 8, seed=0)
    gate, release = threading.Event(), threading.Event()
    m._begin_call(False)                      # stands for a call running in this thread
    try:
        _, errors = run_threads(lambda k: m(np.ones((2, 1, 3), np.float32)), n=1)
    finally:
        m._end_call(threading.get_ident())
    assert len(errors) == 1 and "while another thread is running" in str(errors[0])
    del gate, release


def test_packed_weights_built_once_under_lock():
    q = fastrnn.quantize(fastrnn.LSTM(4, 16, seed=0), "int8")
    built = []
    orig = q._build

    def counting():
        built.append(1)
        return orig()
    object.__setattr__(q, "_build", counting)
    _, errors = run_threads(lambda k: q(np.ones((2, 1, 4), np.float32)))
    assert not errors and len(built) == 1
