"""Thread safety of inference: 8 Python threads running one module and one cell at
once get bitwise the results of running the same calls one after another.

Inference (eval mode, or the functional kernels with training=False) keeps no
state in the module, and the kernels release the GIL, so the threads really
run the kernels concurrently (each call with its own OpenMP team). Training a
module from several threads at once is not supported (the cache is per module).
"""

import threading

import numpy as np
import pytest

import fastrnn

THREADS, CALLS = 8, 12


def concurrent(fn, inputs):
    """fn on every input from THREADS threads at once (all released together)."""
    results = [None] * len(inputs)
    errors = []
    start = threading.Barrier(THREADS)

    def worker(k):
        try:
            start.wait()
            for i in range(k, len(inputs), THREADS):
                results[i] = fn(inputs[i])
        except BaseException as e:   # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    return results


def flat(r):
    out = []
    for a in (r if isinstance(r, tuple) else (r,)):
        out.extend(flat(a) if isinstance(a, tuple) else [a])
    return out


@pytest.mark.parametrize("make", [
    lambda: fastrnn.LSTM(12, 40, num_layers=2, bidirectional=True, batch_first=True, seed=0),
    lambda: fastrnn.GRU(12, 33, seed=1, dtype=np.float64),
    lambda: fastrnn.RNN(12, 64, nonlinearity="relu", seed=2),
], ids=["lstm", "gru", "rnn"])
def test_eight_threads_on_one_module_match_serial_bitwise(make):
    m = make().eval()
    rng = np.random.default_rng(0)
    inputs = []
    for k in range(THREADS * CALLS):
        B, T = 1 + k % 30, 3 + k % 20     # row split, unit split and small-batch paths
        x = rng.standard_normal((B, T, 12) if m.batch_first else (T, B, 12)).astype(m.dtype)
        lengths = rng.integers(1, T + 1, B) if k % 3 == 0 else None
        inputs.append((x, lengths))
    fn = lambda a: m(a[0], lengths=a[1])  # noqa: E731
    serial = [fn(a) for a in inputs]
    for _ in range(2):
        for got, want in zip(concurrent(fn, inputs), serial):
            for g, w in zip(flat(got), flat(want)):
                assert np.array_equal(g, w)


@pytest.mark.parametrize("cls", [fastrnn.LSTMCell, fastrnn.GRUCell, fastrnn.RNNCell])
def test_eight_threads_on_one_cell_match_serial_bitwise(cls):
    cell = cls(10, 48, seed=3).eval()
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((1 + k % 9, 10)).astype(np.float32)
              for k in range(THREADS * CALLS)]

    def fn(x):   # a few steps of a recurrence, the state threaded through
        h = None
        for _ in range(5):
            h = cell(x, h)
        return h
    serial = [fn(x) for x in inputs]
    for got, want in zip(concurrent(fn, inputs), serial):
        for g, w in zip(flat(got), flat(want)):
            assert np.array_equal(g, w)
