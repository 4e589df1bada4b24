"""A forward's `out`: y written into given rows, such as one half of a
bidirectional layer's (T, B, 2H) output, with the same bits as a fresh y; in
training a copy of y, the cache keeping its own. And backward's dy read in place
from such a half (a bidirectional layer's backward no longer copies it)."""

import numpy as np
import pytest

import fastrnn
from fastrnn import functional as F
from fastrnn import reference as R

SHAPES = [(6, 5), (1, 5), (6, 1), (1, 1), (30, 20)]   # (T, B)
CELLS = ["rnn", "lstm", "lstmp", "gru"]
GATES = {"rnn": 1, "lstm": 4, "lstmp": 4, "gru": 3}


def problem(cell, T, B, dtype, seed=0, I=7, H=9, P=5):
    """(forward function name, positional arguments, O) for one layer call."""
    rng = np.random.default_rng(seed)
    G = GATES[cell]
    O = P if cell == "lstmp" else H

    def r(*shape):
        return (rng.standard_normal(shape) * 0.4).astype(dtype)
    x = r(T, B, I)
    w_ih, w_hh, b_ih, b_hh = r(G * H, I), r(G * H, O), r(G * H), r(G * H)
    if cell == "rnn":
        return "rnn_forward", (x, r(B, H), w_ih, w_hh, b_ih, b_hh), O
    if cell == "gru":
        return "gru_forward", (x, r(B, H), w_ih, w_hh, b_ih, b_hh), O
    if cell == "lstm":
        return "lstm_forward", (x, r(B, H), r(B, H), w_ih, w_hh, b_ih, b_hh), O
    return "lstmp_forward", (x, r(B, P), r(B, H), w_ih, w_hh, b_ih, b_hh, r(P, H)), O


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T, B", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reverse", [False, True])
def test_out_half_of_a_wider_array_gets_the_same_bits(cell, T, B, dtype, reverse):
    name, args, O = problem(cell, T, B, dtype)
    padded = np.random.default_rng(1).integers(1, T + 1, B) if T > 1 else None
    for lengths in (None, padded):
        want = getattr(F, name)(*args, lengths=lengths, reverse=reverse, training=False)
        for side in (0, 1):
            joined = np.full((T, B, 2 * O), np.nan, dtype)
            half = joined[:, :, side * O:(side + 1) * O]
            got = getattr(F, name)(*args, lengths=lengths, reverse=reverse, training=False,
                                   out=half)
            assert got[0] is half
            assert np.array_equal(half, want[0])
            assert np.isnan(joined[:, :, (1 - side) * O:(2 - side) * O]).all()
            for a, b in zip(got[1:-1], want[1:-1]):   # h_n (and c_n)
                assert np.array_equal(a, b)
            ref = getattr(R, name)(*args, lengths=lengths, reverse=reverse, training=False)
            ref_joined = np.full((T, B, 2 * O), np.nan, dtype)
            ref_got = getattr(R, name)(*args, lengths=lengths, reverse=reverse,
                                       training=False,
                                       out=ref_joined[:, :, side * O:(side + 1) * O])
            assert np.array_equal(ref_got[0], ref[0])
            tol = 1e-5 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(half, ref[0], rtol=tol, atol=tol)


BACKWARD = {"rnn": ("rnn_backward", 1), "lstm": ("lstm_backward", 2),
            "lstmp": ("lstmp_backward", 2), "gru": ("gru_backward", 1)}   # (name, states)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T, B", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reverse", [False, True])
def test_backward_reads_dy_from_half_of_a_wider_array_with_the_same_bits(cell, T, B, dtype,
                                                                         reverse):
    name, args, O = problem(cell, T, B, dtype)
    back, states = BACKWARD[cell]
    padded = np.random.default_rng(2).integers(1, T + 1, B) if T > 1 else None
    wide = np.random.default_rng(3).standard_normal((T, B, 2 * O)).astype(dtype)
    for lengths in (None, padded):
        for side in (0, 1):
            half = wide[:, :, side * O:(side + 1) * O]
            results = []
            for dy in (np.ascontiguousarray(half), half):
                cache = getattr(F, name)(*args, lengths=lengths, reverse=reverse)[-1]
                results.append(getattr(F, back)(dy, *([None] * states), cache))
            for a, b in zip(*results):
                assert (a is None and b is None) or np.array_equal(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_backward_hands_the_half_itself_to_the_kernel(cell, monkeypatch):
    """Not a copy: the kernel gets the view of the wider array (rows 2·O apart)."""
    from fastrnn import _recurrent
    name, args, O = problem(cell, 5, 3, np.float32)
    back, states = BACKWARD[cell]
    wide = np.ones((5, 3, 2 * O), np.float32)
    seen = []
    backward = _recurrent.backward

    def spy(*a, **k):
        seen.append(a[10])                      # dy
        return backward(*a, **k)
    monkeypatch.setattr(F._recurrent, "backward", spy)
    cache = getattr(F, name)(*args)[-1]
    getattr(F, back)(wide[:, :, O:], *([None] * states), cache)
    assert len(seen) == 1 and np.shares_memory(seen[0], wide)
    assert seen[0].strides == wide[:, :, O:].strides


def test_the_kernel_refuses_a_dy_whose_rows_it_cannot_step_through(monkeypatch):
    name, args, O = problem("lstm", 4, 3, np.float32)
    cache = F.lstm_forward(*args)[-1]
    monkeypatch.setattr(F, "as_rows_array", lambda name, value, ndim, dtype: value)
    dy = np.zeros((3, 4, O), np.float32).transpose(1, 0, 2)   # (t, b) rows not in order
    with pytest.raises(ValueError, match=r"dy: its T\*B rows of \d+ values must be evenly spaced"):
        F.lstm_backward(dy, None, None, cache)


def test_dy_views_the_kernels_can_read_are_not_copied():
    from fastrnn._validate import as_rows_array
    wide = np.zeros((4, 3, 10), np.float32)
    for view in (wide[:, :, 5:], wide[:, :, :5], wide[:1, :, 2:7], wide[:, :1, 3:8],
                 wide[:1, :1, :4]):
        assert as_rows_array("dy", view, 3, np.float32) is view
    # copied to C order: rows not evenly spaced (a transposed batch_first view, a step
    # between time steps), reversed or overlapping rows, a strided last axis
    overlapping = np.lib.stride_tricks.as_strided(wide, (4, 3, 10), (40, 8, 4))
    for view in (wide.transpose(1, 0, 2)[:, :, :5], wide[::2, :, :5], wide[::-1, :, :5],
                 overlapping, wide[:, :, ::2]):
        got = as_rows_array("dy", view, 3, np.float32)
        assert got is not view and got.flags.c_contiguous and np.array_equal(got, view)
    with pytest.raises(TypeError, match="dy has dtype float64"):
        as_rows_array("dy", wide[:, :, :5].astype(np.float64), 3, np.float32)
    with pytest.raises(ValueError, match="dy must have 3 dimensions"):
        as_rows_array("dy", wide[0], 3, np.float32)


def test_out_gives_the_same_bits_on_one_and_two_threads():
    name, args, O = problem("lstm", 40, 24, np.float32, I=64, H=96)
    results = []
    before = fastrnn.get_num_threads()
    try:
        for n in (1, 2):
            fastrnn.set_num_threads(n)
            joined = np.zeros((40, 24, 2 * O), np.float32)
            getattr(F, name)(*args, training=False, out=joined[:, :, O:])
            results.append(joined)
    finally:
        fastrnn.set_num_threads(before)
    assert np.array_equal(results[0], results[1])


def bad_outs(T, B, O, dtype, x):
    """(out, exception, message fragment) for each way `out` can be wrong."""
    wide = np.zeros((T, B, 3 * O), dtype)
    overlap = np.lib.stride_tricks.as_strided(np.zeros(T * B * O, dtype), (T, B, O),
                                              (B * (O // 2) * np.dtype(dtype).itemsize,
                                               (O // 2) * np.dtype(dtype).itemsize,
                                               np.dtype(dtype).itemsize))
    ro = np.zeros((T, B, O), dtype)
    ro.flags.writeable = False
    other = np.float64 if dtype == np.float32 else np.float32
    return [
        ([[0.0]], TypeError, "numpy array"),
        (np.zeros((T, B, O), other), TypeError, "dtype"),
        (np.zeros((T, B, O + 1), dtype), ValueError, "shape"),
        (wide[:, :, ::3], ValueError, "contiguous"),
        (overlap, ValueError, "overlap"),
        (np.zeros((B, T, O), dtype).transpose(1, 0, 2), ValueError, "evenly spaced"),
        (ro, ValueError, "writeable"),
        (x[:, :, :O], ValueError, "share memory"),
    ]


@pytest.mark.parametrize("cell", CELLS)
def test_bad_out_is_rejected_before_the_kernel(cell):
    T, B = 6, 5
    name, args, O = problem(cell, T, B, np.float32, I=12)
    x = args[0]
    for out, exc, fragment in bad_outs(T, B, O, np.float32, x):
        with pytest.raises(exc, match=fragment):
            getattr(F, name)(*args, training=False, out=out)
        with pytest.raises(exc, match=fragment):
            getattr(F, name)(*args, training=True, out=out)


BACKWARDS = {"rnn_forward": "rnn_backward", "gru_forward": "gru_backward",
             "lstm_forward": "lstm_backward", "lstmp_forward": "lstmp_backward"}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T, B", [(6, 5), (1, 1), (30, 20)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("split", ["rows", "units"])
def test_training_out_is_a_copy_the_cache_does_not_see(cell, T, B, dtype, reverse, split,
                                                      monkeypatch):
    """In training `out` (here half of a wider array) receives y, bit for bit the y of
    a call without it, zeros at padded steps, the other half untouched; the cache
    keeps its own y, so editing `out` before backward changes no gradient. On one
    and two threads, rows or hidden units split."""
    monkeypatch.setattr(F, "SMALL_WORK_FLOP", 0)
    monkeypatch.setattr(F, "UNITS_MAX_BATCH", 10**6 if split == "units" else 0)
    monkeypatch.setattr(F, "UNITS_STEP_MIN_FLOP", 0)
    monkeypatch.setattr(F, "ROWS_MIN_PER_THREAD", 10**6 if split == "units" else 1)
    monkeypatch.setattr(F, "UNITS_MIN_STEPS", 0)
    name, args, O = problem(cell, T, B, dtype)
    dy = np.random.default_rng(2).standard_normal((T, B, O)).astype(dtype)
    padded = np.random.default_rng(1).integers(1, T + 1, B) if T > 1 else None
    before = fastrnn.get_num_threads()
    try:
        for n in (1, 2):
            fastrnn.set_num_threads(n)
            for lengths in (None, padded):
                kw = dict(lengths=lengths, reverse=reverse, training=True)
                want = getattr(F, name)(*args, **kw)
                want_grads = getattr(F, BACKWARDS[name])(dy, *([None] * (len(want) - 2)),
                                                         want[-1])
                joined = np.full((T, B, 2 * O), np.nan, dtype)
                half = joined[:, :, O:]
                got = getattr(F, name)(*args, out=half, **kw)
                assert got[0] is half
                assert np.array_equal(half, want[0])
                assert np.isnan(joined[:, :, :O]).all()
                if lengths is not None:
                    for b, n_b in enumerate(lengths):
                        assert not half[n_b:, b].any()
                half[...] = 7.0                       # the caller's edit
                grads = getattr(F, BACKWARDS[name])(dy, *([None] * (len(got) - 2)), got[-1])
                for a, b in zip(grads, want_grads):
                    assert (a is None and b is None) or np.array_equal(a, b)
                ref_out = np.zeros((T, B, O), dtype)
                ref = getattr(R, name)(*args, out=ref_out, **kw)
                assert ref[0] is ref_out
                assert np.array_equal(ref_out, getattr(R, name)(*args, **kw)[0])
    finally:
        fastrnn.set_num_threads(before)


@pytest.mark.parametrize("mode", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("padded", [False, True])
def test_bidirectional_inference_equals_the_training_forward(mode, padded):
    """Inference writes each direction into its half of the output; a training
    forward concatenates the cached ones. Same bits, two layers, and with lengths."""
    rng = np.random.default_rng(3)
    T, B, I, H = 12, 6, 5, 8
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    lengths = rng.integers(1, T + 1, B) if padded else None
    kwargs = {"proj_size": 3} if mode == "LSTM" and padded else {}
    m = getattr(fastrnn, mode)(I, H, num_layers=2, bidirectional=True, seed=2, **kwargs)
    m.train()
    want, want_state = m(x, lengths=lengths)
    m.eval()
    got, got_state = m(x, lengths=lengths)
    assert np.array_equal(got, want)
    flat = (lambda s: s if isinstance(s, np.ndarray) else np.concatenate([a.ravel() for a in s]))
    assert np.array_equal(flat(got_state), flat(want_state))


@pytest.mark.parametrize("via", ["x_ids", "bf16"])
def test_training_out_with_ids_or_bf16_products(via):
    """Training `out` on the input-by-id path and under bf16 products ("medium"):
    y's bits, and edits of `out` change no gradient."""
    rng = np.random.default_rng(4)
    T, B, I, H, V = 7, 6, 5, 33, 11
    w = [(rng.standard_normal(s) * 0.4).astype(np.float32)
         for s in ((3 * H, I), (3 * H, H), (3 * H,), (3 * H,))]
    shape = (V, I) if via == "x_ids" else (T, B, I)      # a table read by id, or x
    x = rng.standard_normal(shape).astype(np.float32)
    kw = {"x_ids": rng.integers(0, V, (T, B))} if via == "x_ids" else {}
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    prec = "medium" if via == "bf16" else "highest"
    with fastrnn._precision.scoped(prec):
        want = F.gru_forward(x, None, *w, **kw)
        want_grads = F.gru_backward(dy, None, want[-1])
        out = np.zeros((T, B, H), np.float32)
        got = F.gru_forward(x, None, *w, out=out, **kw)
        assert got[0] is out and np.array_equal(out, want[0])
        out[...] = -3.0
        grads = F.gru_backward(dy, None, got[-1])
    for a, b in zip(grads, want_grads):
        assert (a is None and b is None) or np.array_equal(a, b)
