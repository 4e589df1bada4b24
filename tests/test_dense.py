"""The dense kernel (src/_dense.pyx, behind fastrnn.nn.Linear) against its NumPy twin."""

import numpy as np
import pytest

from fastrnn import _dense, nn, reference

SHAPES = [  # (M, K, N): rows, in features, out features
    (1, 1, 1),
    (1, 7, 3),
    (5, 1, 9),
    (37, 13, 65),      # odd everything, a char-LM decoder's width
    (130, 70, 17),     # several row blocks, panel tails
    (2048, 64, 33),
]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


def _data(M, K, N, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)).astype(dtype)
    w = rng.standard_normal((N, K)).astype(dtype)
    b = rng.standard_normal(N).astype(dtype)
    dy = rng.standard_normal((M, N)).astype(dtype)
    return x, w, b, dy


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("pack", [True, False])     # packed W, or read in place (few rows)
def test_kernel_matches_reference(M, K, N, dtype, bias, pack):
    x, w, b, dy = _data(M, K, N, dtype)
    b = b if bias else None
    y = np.empty((M, N), dtype)
    _dense.forward(y, x, w, b, 2 if pack else 1, pack)
    # float32 sums run over K values in a different order than NumPy's: scale the
    # tolerance by the size of the terms
    scale = np.sqrt(K)
    np.testing.assert_allclose(y, reference.dense_forward(x, w, b), rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["atol"] * scale)
    dx = np.empty((M, K), dtype)
    dw_t = np.empty((K, N), dtype)
    _dense.backward(dx, dw_t, dy, x, w, 2)
    rdx, rdw, _ = reference.dense_backward(dy, x, w)
    np.testing.assert_allclose(dx, rdx, rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["atol"] * np.sqrt(N))
    np.testing.assert_allclose(dw_t.T, rdw, rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["atol"] * np.sqrt(M))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_count_does_not_change_a_bit(dtype):
    x, w, b, dy = _data(517, 96, 65, dtype, seed=3)
    outs = []
    for n in (1, 2, 3):
        y = np.empty((517, 65), dtype)
        dx = np.empty((517, 96), dtype)
        dw_t = np.empty((96, 65), dtype)
        _dense.forward(y, x, w, b, n)
        _dense.backward(dx, dw_t, dy, x, w, n)
        outs.append((y, dx, dw_t))
    for other in outs[1:]:
        for a, c in zip(outs[0], other):
            assert np.array_equal(a, c)


def test_reference_gradients_by_finite_differences():
    x, w, b, dy = _data(4, 3, 2, np.float64, seed=5)
    loss = lambda x_, w_, b_: float(np.sum(reference.dense_forward(x_, w_, b_) * dy))  # noqa: E731
    dx, dw, db = reference.dense_backward(dy, x, w)
    eps = 1e-6
    for arr, grad in ((x, dx), (w, dw), (b, db)):
        num = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + eps
            up = loss(x, w, b)
            arr[i] = old - eps
            down = loss(x, w, b)
            arr[i] = old
            num[i] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grad, num, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_module_uses_kernel_and_accumulates(dtype):
    lin = nn.Linear(13, 65, dtype=dtype, rng=0)
    x, _, _, _ = _data(3 * 37, 13, 65, dtype)
    x = x.reshape(3, 37, 13)
    dy = np.random.default_rng(1).standard_normal((3, 37, 65)).astype(dtype)
    y = lin(x)
    assert y.shape == (3, 37, 65) and y.dtype == dtype
    w, b = lin.weight.data, lin.bias.data
    np.testing.assert_allclose(y, reference.dense_forward(x, w, b), **TOL[dtype])
    lin.zero_grad()
    dx = lin.backward(dy)
    dx2 = lin.backward(dy)   # a second backward accumulates into the gradients
    rdx, rdw, rdb = reference.dense_backward(dy.reshape(-1, 65), x.reshape(-1, 13), w)
    np.testing.assert_allclose(dx, rdx.reshape(x.shape), rtol=1e-4 if dtype == np.float32 else 1e-12)
    np.testing.assert_array_equal(dx, dx2)
    np.testing.assert_allclose(lin.weight.grad, 2 * rdw, rtol=1e-4 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(lin.bias.grad, 2 * rdb, rtol=1e-4 if dtype == np.float32 else 1e-12)


def test_linear_bad_dout_shape_is_named():
    lin = nn.Linear(4, 3, rng=0)
    lin(np.ones((5, 4), np.float32))
    with pytest.raises(ValueError, match=r"dout: expected shape \(5, 3\), got \(5, 4\)"):
        lin.backward(np.ones((5, 4), np.float32))


def test_linear_empty_batch():
    lin = nn.Linear(4, 3, rng=0)
    y = lin(np.ones((0, 4), np.float32))
    assert y.shape == (0, 3)
    assert lin.backward(np.ones((0, 3), np.float32)).shape == (0, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 4, 7, 8, 9])   # both sides of PACK_MIN_ROWS
def test_linear_numbers_depend_on_neither_threads_nor_mode(rows, dtype):
    """Linear's forward gives the same bits on 1 and 2 threads, in training and eval
    (with 2 threads and fewer than 8 rows, training had packed W while one thread and
    eval read it in place: a different rounding)."""
    import fastrnn
    lin = nn.Linear(256, 256, rng=0, dtype=dtype)
    x = np.random.default_rng(1).standard_normal((rows, 256)).astype(dtype)
    old = fastrnn.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            fastrnn.set_num_threads(n)
            lin.train()
            outs.append(lin(x))
            lin.eval()
            outs.append(lin(x))
    finally:
        fastrnn.set_num_threads(old)
    for other in outs[1:]:
        assert np.array_equal(outs[0], other)


# ---- eval calls: the same product on the recurrent layers' worker pool (src/dense_eval.pxi)

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,K,N", SHAPES + [(4, 512, 65), (64, 512, 65)])
@pytest.mark.parametrize("bias", [True, False])
def test_pool_kernel_matches_reference_and_any_thread_count(M, K, N, dtype, bias):
    from fastrnn import _recurrent
    x, w, b, _ = _data(M, K, N, dtype, seed=5)
    b = b if bias else None
    outs = []
    for n in (1, 2, 3):
        y = np.empty((M, N), dtype)
        _recurrent.dense_forward(y, x, w, b, n)
        outs.append(y)
    np.testing.assert_allclose(outs[0], reference.dense_forward(x, w, b),
                               rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * np.sqrt(K))
    for other in outs[1:]:
        assert np.array_equal(outs[0], other)


def test_linear_eval_forward_runs_on_the_pool_not_openmp(monkeypatch):
    """An eval call never starts an OpenMP team (_dense.forward); training does."""
    lin = nn.Linear(96, 65, rng=0)
    x = np.random.default_rng(1).standard_normal((40, 96)).astype(np.float32)
    want = lin(x)                                   # training mode: the OpenMP kernel
    lin.eval()

    def no_openmp(*args):
        raise AssertionError("eval forward ran the OpenMP kernel")

    monkeypatch.setattr(_dense, "forward", no_openmp)
    got = lin(x)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.sqrt(96))
    assert got.shape == (40, 65)


def test_pool_kernel_rejects_mismatched_shapes():
    from fastrnn import _recurrent
    x, w, b, _ = _data(5, 7, 3, np.float32)
    with pytest.raises(ValueError, match="dense_forward"):
        _recurrent.dense_forward(np.empty((5, 4), np.float32), x, w, b, 2)
    with pytest.raises(ValueError, match="dense_forward"):
        _recurrent.dense_forward(np.empty((5, 3), np.float32), x, w, b[:2], 2)
