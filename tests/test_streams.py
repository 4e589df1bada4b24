"""StreamPool: per-stream state, chunks, order, bad ids, language models, threads."""

import threading

import numpy as np
import pytest

import fastrnn


def make(cell="LSTM", L=2):
    return getattr(fastrnn, cell)(3, 20, num_layers=L, seed=0).eval()


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_pool_matches_module(cell):
    m = make(cell)
    pool = fastrnn.StreamPool(m, 8)
    ids = [pool.open() for _ in range(4)]
    x = np.random.default_rng(0).standard_normal((5, 4, 3)).astype(np.float32)
    ref, st = m(x)
    y01 = np.stack([pool.step(ids, x[t]) for t in range(2)])            # frames
    y2 = pool.step(ids[::-1], np.ascontiguousarray(x[2:, ::-1]))         # a chunk, reordered
    np.testing.assert_allclose(y01, ref[:2], atol=1e-6)
    np.testing.assert_allclose(y2[:, ::-1], ref[2:], atol=1e-6)
    got = pool.state(ids[1])
    h = got[0] if cell == "LSTM" else got
    np.testing.assert_allclose(h[:, 0], (st[0] if cell == "LSTM" else st)[:, 1], atol=1e-6)


def test_streams_are_independent_and_reset():
    m = make()
    pool = fastrnn.StreamPool(m, 4)
    a, b = pool.open(), pool.open()
    x = np.ones((1, 3), np.float32)
    ya = pool.step([a], x)
    for _ in range(3):
        pool.step([b], x)
    np.testing.assert_allclose(pool.step([a], x), m(np.ones((2, 1, 3), np.float32))[0][1],
                               atol=1e-6)
    pool.reset(a)
    assert np.array_equal(pool.step([a], x), ya)
    pool.close(b)
    assert pool.open() == b and np.all(pool.state(b)[0] == 0)


def test_set_state_round_trip():
    pool = fastrnn.StreamPool(make(), 2)
    a = pool.open()
    h = np.random.default_rng(0).standard_normal((2, 1, 20)).astype(np.float32)
    pool.set_state(a, (h, 2 * h))
    got_h, got_c = pool.state(a)
    assert np.array_equal(got_h, h) and np.array_equal(got_c, 2 * h)
    with pytest.raises(ValueError, match=r"state\[0\]: expected shape \(2, 1, 20\)"):
        pool.set_state(a, (h[:1], h))


def test_bad_ids_and_inputs_change_nothing():
    pool = fastrnn.StreamPool(make(), 3)
    a, b = pool.open(), pool.open()
    pool.step([a, b], np.ones((2, 3), np.float32))
    before = [s.copy() for s in (pool._h, pool._c)]
    x2 = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="once per step"):
        pool.step([a, a], x2)
    with pytest.raises(KeyError, match="not open"):
        pool.step([a, 2], x2)
    with pytest.raises(KeyError, match="not open"):
        pool.step([a, 99], x2)
    with pytest.raises(ValueError, match=r"x: expected shape \(2, 3\)"):
        pool.step([a, b], np.ones((3, 3), np.float32))
    with pytest.raises(TypeError, match="float32"):
        pool.step([a, b], np.ones((2, 3)))
    with pytest.raises(TypeError, match="stream ids"):
        pool.step([0.5], x2[:1])
    for s, t in zip(before, (pool._h, pool._c)):
        assert np.array_equal(s, t)
    pool.open()
    with pytest.raises(RuntimeError, match="all 3 streams are open"):
        pool.open()
    with pytest.raises(ValueError, match="uni-directional"):
        fastrnn.StreamPool(fastrnn.GRU(3, 4, bidirectional=True).eval(), 2)
    with pytest.raises(ValueError, match="eval-mode"):
        fastrnn.StreamPool(fastrnn.GRU(3, 4), 2)


@pytest.mark.parametrize("qdtype", [None, "int8", "bfloat16"])
def test_language_model_pool(qdtype):
    lm = fastrnn.RNNLanguageModel(25, 8, 16, num_layers=2, seed=0).eval()
    model = lm if qdtype is None else fastrnn.quantize(lm, qdtype)
    pool = fastrnn.StreamPool(model, 5)
    ids = [pool.open() for _ in range(3)]
    toks = np.random.default_rng(0).integers(0, 25, (4, 3))
    ref, _ = model(toks)
    out = np.stack([pool.step(ids, toks[t]) for t in range(4)])
    np.testing.assert_allclose(out, ref, atol=1e-5)
    with pytest.raises(IndexError):
        pool.step(ids, np.array([0, 1, 99]))


def test_threads_on_one_pool_match_serial():
    m = make("GRU")
    pool = fastrnn.StreamPool(m, 16)
    ids = [pool.open() for _ in range(16)]
    xs = np.random.default_rng(0).standard_normal((6, 16, 3)).astype(np.float32)
    ref, _ = m(xs)
    out = np.zeros_like(ref)
    errors = []

    def worker(k):
        try:
            mine = ids[2 * k:2 * k + 2]
            for t in range(6):
                out[t, 2 * k:2 * k + 2] = pool.step(mine, np.ascontiguousarray(xs[t, 2 * k:2 * k + 2]))
        except Exception as e:   # pragma: no cover
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    np.testing.assert_allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("qdtype", ["int8", "bfloat16"])
def test_a_stream_holding_nan_leaves_the_other_streams_numbers(qdtype):
    """A quantised pool's step quantises only the rows it steps; one stream whose state
    is NaN made every other stream's steps run weight-only (the whole table was checked
    for NaN, found by an audit): another stream's results changed by 3.4e-4."""
    q = fastrnn.quantize(make(), qdtype, "dynamic")
    x = np.random.default_rng(1).standard_normal((6, 1, 3)).astype(np.float32)

    def run(poison):
        pool = fastrnn.StreamPool(q, 4)
        a, b = pool.open(), pool.open()
        if poison:
            h = np.full((2, 1, 20), np.nan, np.float32)
            pool.set_state(b, (h, h))
        ya = np.stack([pool.step([a], x[t]) for t in range(len(x))])
        yb = pool.step([b], x[0])
        return ya, yb

    clean, _ = run(False)
    ya, yb = run(True)
    assert np.array_equal(ya, clean)
    assert not np.isfinite(yb).any()
