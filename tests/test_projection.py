"""LSTM with a projection (torch's proj_size): fastrnn.functional.lstmp_* on the
recurrence driver against fastrnn.reference.lstmp_*, and the reference against
finite differences. (Against torch.nn.LSTM(proj_size=...): test_layers_torch.py.)"""

import zlib

import numpy as np
import pytest

import fastrnn
from fastrnn import functional as F
from fastrnn import reference as R

# (T, B, I, H, P): batch 1, T=1, odd sizes, batches for the packed kernel and several tiles
SHAPES = [(1, 1, 3, 5, 2), (4, 2, 6, 7, 3), (5, 5, 4, 9, 8), (6, 13, 10, 33, 17)]
TOL = {np.float64: 1e-9, np.float32: 1e-4}


def rel_err(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def make_case(dtype, shape, bias, lengths, state, seed):
    rng = np.random.default_rng(seed)
    T, B, I, H, P = shape
    w = lambda *s: (rng.standard_normal(s) * 0.4).astype(dtype)  # noqa: E731
    return dict(x=w(T, B, I) * 2, h0=w(B, P) if state else None, c0=w(B, H) if state else None,
                w_ih=w(4 * H, I), w_hh=w(4 * H, P), b_ih=w(4 * H) if bias else None,
                b_hh=w(4 * H) if bias else None, w_hr=w(P, H),
                lengths=rng.integers(1, T + 1, B) if lengths else None)


def run(M, c, reverse, seed=1):
    y, h_n, c_n, cache = M.lstmp_forward(c["x"], c["h0"], c["c0"], c["w_ih"], c["w_hh"],
                                         c["b_ih"], c["b_hh"], c["w_hr"], lengths=c["lengths"],
                                         reverse=reverse)
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal(y.shape).astype(y.dtype)
    dh_n = rng.standard_normal(h_n.shape).astype(y.dtype)
    dc_n = rng.standard_normal(c_n.shape).astype(y.dtype)
    return [y, h_n, c_n] + list(M.lstmp_backward(dy, dh_n, dc_n, cache))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["plain", "no_bias_no_state", "lengths", "lengths_reverse",
                                     "reverse"])
def test_kernel_matches_reference(dtype, shape, variant):
    plain = variant != "no_bias_no_state"
    c = make_case(dtype, shape, plain, variant.startswith("lengths"), plain, zlib.crc32(repr((shape, variant)).encode()))
    got, want = run(F, c, variant.endswith("reverse")), run(R, c, variant.endswith("reverse"))
    assert len(got) == len(want) == 11
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None, f"output {i} should be None without bias"
            continue
        assert a.dtype == dtype and a.shape == b.shape, f"output {i}"
        assert rel_err(a, b) <= TOL[dtype], f"output {i}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("batch", [1, 2, 11])
def test_thread_counts_bitwise_identical(batch, monkeypatch):
    monkeypatch.setattr(F, "SMALL_WORK_FLOP", 0)
    c = make_case(np.float32, (7, batch, 13, 19, 6), True, True, True, 5)
    before = fastrnn.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            fastrnn.set_num_threads(n)
            results.append(run(F, c, True))
    finally:
        fastrnn.set_num_threads(before)
    for a, b, d in zip(*results):
        if a is not None:
            assert np.array_equal(a, b) and np.array_equal(a, d)


def test_inference_equals_training():
    c = make_case(np.float32, (9, 6, 5, 12, 4), True, True, True, 7)
    args = [c[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")]
    y1, h1, c1, cache = F.lstmp_forward(*args, training=True)
    y2, h2, c2, none = F.lstmp_forward(*args, training=False)
    assert none is None and cache is not None
    assert np.array_equal(y1, y2) and np.array_equal(h1, h2) and np.array_equal(c1, c2)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [False, True])
def test_reference_gradients_match_finite_differences(reverse, lengths):
    c = make_case(np.float64, (4, 3, 3, 5, 2), True, lengths, True, 3)
    rng = np.random.default_rng(9)
    y, h_n, c_n, _ = R.lstmp_forward(*[c[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih",
                                                        "b_hh", "w_hr")],
                                     lengths=c["lengths"], reverse=reverse)
    wy, wh, wc = (rng.standard_normal(a.shape) for a in (y, h_n, c_n))

    def loss():
        y, h_n, c_n, _ = R.lstmp_forward(*[c[k] for k in ("x", "h0", "c0", "w_ih", "w_hh",
                                                            "b_ih", "b_hh", "w_hr")],
                                         lengths=c["lengths"], reverse=reverse, training=False)
        return (wy * y).sum() + (wh * h_n).sum() + (wc * c_n).sum()

    cache = R.lstmp_forward(*[c[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh",
                                             "w_hr")],
                            lengths=c["lengths"], reverse=reverse)[3]
    grads = R.lstmp_backward(wy, wh, wc, cache)
    names = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]
    for name, g in zip(names, grads):
        a = c[name]
        num = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            old = a[i]
            a[i] = old + 1e-6
            up = loss()
            a[i] = old - 1e-6
            down = loss()
            a[i] = old
            num[i] = (up - down) / 2e-6
        assert rel_err(g, num) < 1e-6, f"d{name}: {rel_err(g, num):.2e}"


def test_bad_arguments_are_named():
    c = make_case(np.float32, (3, 2, 4, 6, 3), True, False, True, 1)
    args = [c[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")]
    bad = list(args)
    bad[7] = np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError, match=r"w_hr must have shape \(3, 6\), got \(3, 5\)"):
        F.lstmp_forward(*bad)
    bad = list(args)
    bad[1] = np.zeros((2, 6), np.float32)    # h0 is (B, P), not (B, H)
    with pytest.raises(ValueError, match="h0"):
        F.lstmp_forward(*bad)
    bad = list(args)
    bad[4] = np.zeros((24, 6), np.float32)   # w_hh is (4H, P)
    with pytest.raises(ValueError, match=r"w_hh must have shape \(24, 3\)"):
        F.lstmp_forward(*bad)
    bad = list(args)
    bad[7] = bad[7].astype(np.float64)
    with pytest.raises((TypeError, ValueError), match="w_hr"):
        F.lstmp_forward(*bad)
    y, h_n, c_n, cache = F.lstmp_forward(*args)
    with pytest.raises(ValueError, match=r"dy must have shape \(3, 2, 3\)"):
        F.lstmp_backward(np.zeros((3, 2, 6), np.float32), None, None, cache)
    _, _, _, plain = F.lstm_forward(c["x"], None, None, c["w_ih"], np.zeros((24, 6), np.float32),
                                    None, None)
    with pytest.raises(ValueError, match="lstm_backward"):
        F.lstmp_backward(np.zeros((3, 2, 6), np.float32), None, None, plain)
