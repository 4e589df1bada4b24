"""W_hh slices over half a core's L2 are read back and forth, one panel order at even
steps and the reverse at odd ones (_recurrent.pyx, zigzag_bytes). Each output column
is the same sum in either order, so the numbers are bitwise those of one order. A tiny
L2 (the test hook _set_l2_bytes) turns it on for every slice here; it also shortens
the unit split's input-projection blocks, which do not change the bits either."""
import numpy as np
import pytest

import fastrnn
from fastrnn import _cpu_cache, _recurrent


@pytest.fixture
def tiny_l2():
    yield lambda: _recurrent._set_l2_bytes(2048)
    _recurrent._set_l2_bytes(_cpu_cache.l2_bytes())


def run(cls, dtype, T, B, threads, train):
    m = getattr(fastrnn, cls)(37, 45, seed=B, dtype=dtype).train(train)
    x = np.random.default_rng(B).standard_normal((T, B, 37)).astype(dtype)
    with fastrnn.functional.thread_share(threads):
        y, state = m(x)
        out = [y] + list(state if isinstance(state, tuple) else (state,))
        if train:
            dx = m.backward(np.cos(y))
            out += [dx[0] if isinstance(dx, tuple) else dx]
            out += [p.grad.copy() for _, p in m.named_parameters()]
    return out


@pytest.mark.parametrize("cls", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T,B", [(40, 1), (20, 2), (9, 5), (5, 30)])   # W_hh packed (pack_flags)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("train", [False, True])
def test_back_and_forth_gives_the_same_bits(tiny_l2, cls, dtype, T, B, threads, train):
    want = run(cls, dtype, T, B, threads, train)
    tiny_l2()
    got = run(cls, dtype, T, B, threads, train)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b), f"max difference {np.abs(a - b).max()}"
