"""Arrays on kept memory (src/_buffers.pyx): what they are, that their memory
is reused only once nothing refers to it, and that training on reused, dirty
memory gives the numbers it gives on fresh memory."""

import numpy as np
import pytest

import fastrnn
from fastrnn import _buffers

BIG = (64, 32, 256)   # 2 MB of float32: pooled


def pooled():
    """Does this build pool (not under AddressSanitizer, where every buffer is a
    fresh malloc so that overreads show)? A released array's buffer comes back."""
    a = _buffers.empty(BIG, np.float32)
    ptr = a.ctypes.data
    del a
    b = _buffers.empty(BIG, np.float32)
    return b.ctypes.data == ptr


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_is_an_ordinary_c_array(dtype):
    a = _buffers.empty(BIG, dtype)
    assert a.shape == BIG and a.dtype == dtype
    assert a.flags["C_CONTIGUOUS"] and a.flags["WRITEABLE"] and a.flags["ALIGNED"]
    assert a.ctypes.data % 64 == 0
    a[...] = 3
    assert float(a.sum()) == 3 * a.size


def test_small_and_other_dtypes_are_plain_numpy():
    assert _buffers.empty((3, 4), np.float32).base is None
    assert _buffers.empty(BIG, np.int64).base is None
    assert _buffers.empty(BIG, np.dtype(">f4")).base is None
    assert _buffers.empty(BIG, np.float32).base is not None


def test_zeros_are_zero_on_dirty_memory():
    a = _buffers.empty(BIG, np.float32)
    a.fill(np.nan)
    del a
    z = _buffers.zeros(BIG, np.float32)
    assert not np.any(z)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        _buffers.empty((4, -1, 3), np.float32)
    with pytest.raises(MemoryError, match="would not fit"):   # the byte count would wrap
        _buffers.empty((1 << 40, 1 << 40), np.float32)


def test_a_view_keeps_its_buffer():
    if not pooled():
        pytest.skip("this build does not pool (AddressSanitizer)")
    a = _buffers.empty(BIG, np.float32)
    a[...] = 7
    view = a[5:]
    ptr = a.ctypes.data
    del a
    b = _buffers.empty(BIG, np.float32)   # must not land on the view's memory
    assert b.ctypes.data != ptr
    b.fill(-1)
    assert np.all(view == 7)
    del view
    c = _buffers.empty(BIG, np.float32)   # now it is free again (b holds the other)
    assert c.ctypes.data == ptr


def test_release_memory_frees_idle_buffers_and_keeps_live_ones():
    live = _buffers.empty(BIG, np.float32)
    live[...] = 1
    idle = _buffers.empty((128, 32, 256), np.float32)
    del idle
    fastrnn.release_memory()
    assert np.all(live == 1)
    again = _buffers.empty((128, 32, 256), np.float32)
    again[...] = 2
    assert float(again.sum()) == 2 * again.size


def dirty_the_pool():
    """Fill every idle pooled buffer with NaN (the sizes a training step uses)."""
    arrays = [_buffers.empty((n,), np.float64) for n in (1 << 17, 1 << 18, 1 << 19, 1 << 20)]
    arrays += [_buffers.empty((n,), np.float32) for n in (1 << 18, 1 << 19, 1 << 20, 1 << 21)]
    for a in arrays:
        a.fill(np.nan)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("padded", [False, True])
def test_training_on_reused_memory_gives_the_same_numbers(mode, padded):
    """Two layers, both directions: caches and work arrays large enough to be
    pooled. A step on memory left dirty by other arrays gives bitwise the outputs,
    input gradient and parameter gradients of the first step."""
    T, B, I, H = 40, 24, 64, 128   # LSTM gates (T, B, 4H): 1.9 MB
    rng = np.random.default_rng(7)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    dy = rng.standard_normal((T, B, 2 * H)).astype(np.float32)
    lengths = rng.integers(1, T + 1, B) if padded else None
    results = []
    for _ in range(2):
        m = getattr(fastrnn, mode)(I, H, num_layers=2, bidirectional=True, seed=3)
        out, _ = m(x, lengths=lengths)
        dx, _ = m.backward(dy)
        results.append([out.copy(), dx.copy()] + [p.grad.copy() for p in m.parameters()])
        del m, out, dx
        dirty_the_pool()
    assert all(np.isfinite(a).all() for a in results[0])
    for a, b in zip(*results):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0, 3), (5, 7), (3, 1000, 301), BIG])
def test_copy_is_an_independent_equal_array_for_any_threads(dtype, shape):
    src = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    copies = [_buffers.copy(src, n) for n in (1, 2, 3)]
    for c in copies:
        assert c.shape == src.shape and c.dtype == src.dtype and c.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(c, src)
        assert not np.shares_memory(c, src)
    if src.size:
        copies[0].flat[0] += 1
        assert copies[0].flat[0] != src.flat[0]


def test_copy_refuses_what_it_cannot_copy_as_bytes():
    with pytest.raises(ValueError, match="src: needs a C-contiguous ndarray"):
        _buffers.copy(np.zeros((4, 6))[:, ::2])
    with pytest.raises(ValueError, match="src: needs a C-contiguous ndarray, got list"):
        _buffers.copy([1.0, 2.0])
    with pytest.raises(ValueError, match="src: needs an array of plain values, got dtype object"):
        _buffers.copy(np.array([None, 1.0], dtype=object))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_copy_rows_fills_a_strided_half(dtype):
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal((7, 5, 3)).astype(dtype) for _ in range(2))
    joined = np.zeros((7, 5, 6), dtype)
    for n in (1, 2):
        _buffers.copy_rows(joined[:, :, :3].reshape(35, 3), a.reshape(35, 3), n)
        _buffers.copy_rows(joined[:, :, 3:].reshape(35, 3), b.reshape(35, 3), n)
        np.testing.assert_array_equal(joined, np.concatenate([a, b], axis=2))
    one = np.zeros((35, 2), dtype)       # rows of one value (a hidden size of 1)
    _buffers.copy_rows(one[:, 1:].reshape(35, 1), a[:, :, :1].reshape(35, 1), 2)
    np.testing.assert_array_equal(one[:, 1], a[:, :, 0].reshape(35))
    back = np.empty((7, 5, 3), dtype)
    _buffers.copy_rows(back.reshape(35, 3), joined[:, :, 3:].reshape(35, 3), 2)
    np.testing.assert_array_equal(back, b)


def test_copy_rows_refuses_mismatched_or_gapped_rows():
    a = np.zeros((4, 6))
    with pytest.raises(ValueError, match=r"dst: needs src's shape \(4, 3\), got \(4, 6\)"):
        _buffers.copy_rows(a, a[:, :3])
    with pytest.raises(ValueError, match="src: needs contiguous rows"):
        _buffers.copy_rows(a[:, :3], a[:, ::2])


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("layout", ["plain", "bidirectional", "batch_first_b1",
                                    "batch_first_t1", "batch_first", "two_layers",
                                    "two_layers_dropout", "bidirectional_sum", "lengths",
                                    "proj", "bidirectional_batch_first"])
def test_editing_a_training_output_leaves_the_gradients_alone(kind, layout):
    """A layer's training output is the caller's (a copy of the states backward reads)."""
    if layout == "proj" and kind != "LSTM":
        pytest.skip("proj_size is the LSTM's")
    B = 1 if layout == "batch_first_b1" else 40
    T = 1 if layout == "batch_first_t1" else 30
    x = np.random.default_rng(1).standard_normal((T, B, 9)).astype(np.float32)
    kw = {"bidirectional": layout.startswith("bidirectional"),
          "batch_first": "batch_first" in layout,
          "num_layers": 2 if layout.startswith("two_layers") else 1}
    if layout == "two_layers_dropout":
        kw["dropout"] = 0.3
    if layout == "bidirectional_sum":
        kw["merge_mode"] = "sum"
    if layout == "proj":
        kw["proj_size"] = 70
    lengths = np.random.default_rng(2).integers(1, T + 1, B) if layout == "lengths" else None
    if kw["batch_first"]:
        x = x.transpose(1, 0, 2).copy()
    grads = []
    for edit in (False, True):
        m = getattr(fastrnn, kind)(9, 300, seed=3, **kw)
        out, _ = m(x, lengths=lengths)
        dy = np.ones_like(out)
        if edit:
            out[...] = 7.0
        m.backward(dy)
        grads.append([p.grad.copy() for p in m.parameters()])
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)
