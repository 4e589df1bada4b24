"""Compiled kernels (fastrnn.functional) against the NumPy reference (fastrnn.reference).

Outputs, final states and every gradient, for every cell x dtype x shape x
bias x lengths x direction. Tolerances: float64 rel. 1e-9, float32 rel. 1e-4,
relative to the largest magnitude of the reference value.
"""

import sys
import zlib

import numpy as np
import pytest

import fastrnn
from fastrnn import functional as F
from fastrnn import reference as R

# gru_rb: GRU(reset_after=False), the seed's GRU (CELL_GRU_RESET_BEFORE)
CELLS = {"rnn_tanh": 1, "rnn_relu": 1, "rnn_identity": 1, "gru": 3, "gru_rb": 3, "lstm": 4}
# (T, B, I, H): batch 1, T=1, odd sizes, I != H, sizes not multiples of 8,
# batches large enough for the packed micro-kernel and several row tiles.
SHAPES = [(1, 1, 3, 5), (4, 1, 6, 3), (5, 3, 4, 7), (3, 7, 9, 17), (6, 13, 10, 33), (2, 20, 17, 24)]
TOL = {np.float64: 1e-9, np.float32: 1e-4}


def rel_err(actual, expected):
    scale = max(np.abs(expected).max(), 1e-30)
    return np.abs(actual - expected).max() / scale


def make_case(cell, dtype, shape, bias, with_lengths, with_state, seed):
    rng = np.random.default_rng(seed)
    T, B, I, H = shape
    G = CELLS[cell]
    w = lambda *s: (rng.standard_normal(s) * 0.4).astype(dtype)  # noqa: E731
    case = {
        "x": w(T, B, I) * 2.5,
        "h0": w(B, H) * 2.5 if with_state else None,
        "c0": w(B, H) * 2.5 if with_state else None,
        "w_ih": w(G * H, I), "w_hh": w(G * H, H),
        "b_ih": w(G * H) if bias else None, "b_hh": w(G * H) if bias else None,
        "lengths": rng.integers(1, T + 1, B) if with_lengths else None,
    }
    return case


def live_case(cell, dtype, shape, bias, with_lengths, with_state, seed):
    """(make_case(...), seed) with the seed moved on while the reference's outputs are
    all zero: a ReLU cell can draw weights under which every unit is dead, and then its
    outputs and gradients are exactly 0 on both sides and the comparison checks nothing
    (the crc32 seed of one (1, 1, 3, 5) case did: a review of the tests)."""
    for _ in range(16):
        case = make_case(cell, dtype, shape, bias, with_lengths, with_state, seed)
        if cell != "rnn_relu" or any(np.any(o != 0) for o in run(R, cell, case, False, 0)[0]):
            return case, seed
        seed += 1
    raise AssertionError(f"{cell} {shape}: 16 seeds in a row gave dead units")


def run(module, cell, case, reverse, dy_seed):
    """Forward then backward with random output gradients; returns all arrays."""
    rng = np.random.default_rng(dy_seed)
    c = case
    kw = dict(lengths=c["lengths"], reverse=reverse)
    if c.get("x_ids") is not None:   # x is a table, read by id (tests/test_ids_input.py)
        kw["x_ids"] = c["x_ids"]
    if cell == "lstm":
        y, h_n, c_n, cache = module.lstm_forward(c["x"], c["h0"], c["c0"], c["w_ih"], c["w_hh"],
                                                 c["b_ih"], c["b_hh"], **kw)
        outs = [y, h_n, c_n]
    elif cell.startswith("gru"):
        y, h_n, cache = module.gru_forward(c["x"], c["h0"], c["w_ih"], c["w_hh"], c["b_ih"],
                                           c["b_hh"], reset_after=cell == "gru", **kw)
        outs = [y, h_n]
    else:
        y, h_n, cache = module.rnn_forward(c["x"], c["h0"], c["w_ih"], c["w_hh"], c["b_ih"],
                                           c["b_hh"], cell[4:], **kw)
        outs = [y, h_n]
    dy = rng.standard_normal(y.shape).astype(y.dtype)
    dh_n = rng.standard_normal(h_n.shape).astype(y.dtype)
    if cell == "lstm":
        dc_n = rng.standard_normal(h_n.shape).astype(y.dtype)
        grads = module.lstm_backward(dy, dh_n, dc_n, cache)
    elif cell.startswith("gru"):
        grads = module.gru_backward(dy, dh_n, cache)
    else:
        grads = module.rnn_backward(dy, dh_n, cache)
    return outs, list(grads)


def assert_same_bits_for_thread_counts(cell, case, reverse, dy_seed, counts):
    """run(F, ...) under each thread count in `counts`: every output and gradient
    bitwise equal to the first count's (None where the first is None)."""
    before = fastrnn.get_num_threads()
    results = []
    try:
        for n in counts:
            fastrnn.set_num_threads(n)
            outs, grads = run(F, cell, case, reverse, dy_seed)
            results.append(outs + grads)
    finally:
        fastrnn.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert (a is None and b is None) or np.array_equal(a, b)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["plain", "no_bias_no_state", "lengths", "lengths_reverse",
                                     "reverse"])
def test_kernel_matches_reference(cell, dtype, shape, variant):
    bias = variant != "no_bias_no_state"
    with_state = variant != "no_bias_no_state"
    with_lengths = variant.startswith("lengths")
    reverse = variant.endswith("reverse")
    seed = zlib.crc32(repr((cell, shape, variant)).encode())
    case, seed = live_case(cell, dtype, shape, bias, with_lengths, with_state, seed)
    outs, grads = run(F, cell, case, reverse, seed + 1)
    ref_outs, ref_grads = run(R, cell, case, reverse, seed + 1)
    for got, want in zip(outs, ref_outs):
        assert got.dtype == dtype
        assert rel_err(got, want) <= TOL[dtype]
    assert len(grads) == len(ref_grads)
    for i, (got, want) in enumerate(zip(grads, ref_grads)):
        if want is None:
            assert got is None, f"gradient {i} should be None without bias"
            continue
        assert got.dtype == dtype and got.shape == want.shape
        assert rel_err(got, want) <= TOL[dtype], f"gradient {i}"


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_padded_steps_are_zero_and_ignored(cell):
    case = make_case(cell, np.float64, (6, 5, 3, 4), True, False, True, 3)
    case["lengths"] = np.array([6, 2, 4, 1, 3])
    outs, grads = run(F, cell, case, False, 4)
    y, dx = outs[0], grads[0]
    for b, n in enumerate(case["lengths"]):
        assert np.all(y[n:, b] == 0)
        assert np.all(dx[n:, b] == 0)
        if cell != "rnn_relu":  # relu outputs are legitimately 0
            assert np.all(y[:n, b] != 0)


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "gru_rb", "lstm"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("variant", ["plain", "lengths_reverse"])
def test_bias_gradients_over_many_k_blocks(cell, dtype, variant):
    """The biases' gradients are summed on the dW GEMM's pass over the gate
    gradients' columns, per block of FASTRNN_KC = 1024 rows (t, b): 1,500 rows
    cross that block, and so do the 1,200-1,500 that exist when sequences are
    padded (the padded rows are left out), also in reverse."""
    seed = zlib.crc32(repr((cell, variant, "k blocks")).encode())
    case = make_case(cell, dtype, (50, 30, 6, 11), True, False, True, seed)
    if variant != "plain":
        case["lengths"] = np.random.default_rng(seed).integers(40, 51, 30)
        assert case["lengths"].sum() > 1024 and case["lengths"].min() < 50
    reverse = variant.endswith("reverse")
    grads = run(F, cell, case, reverse, seed + 1)[1]
    ref = run(R, cell, case, reverse, seed + 1)[1]
    for got, want in zip(grads[-2:], ref[-2:]):      # db_ih, db_hh
        assert got.dtype == dtype and got.shape == want.shape
        assert rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("split", ["rows", "units"])
@pytest.mark.parametrize("batch", [2, 11])
def test_one_and_two_threads_bitwise_identical(cell, dtype, split, batch, monkeypatch):
    """Results do not depend on the thread count, nor on splitting rows or hidden units."""
    monkeypatch.setattr(F, "SMALL_WORK_FLOP", 0)   # use every thread even for a small case
    monkeypatch.setattr(F, "UNITS_STEP_MIN_FLOP", 0)
    monkeypatch.setattr(F, "UNITS_MAX_BATCH", 10**6 if split == "units" else 0)
    monkeypatch.setattr(F, "ROWS_MIN_PER_THREAD", 10**6)    # units even where rows would win
    monkeypatch.setattr(F, "UNITS_MIN_STEPS", 0)
    case = make_case(cell, dtype, (7, batch, 13, 19), True, True, True, 5)
    assert_same_bits_for_thread_counts(cell, case, True, 6, (1, 2, 3))


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_gradient_task_size_does_not_change_a_bit(cell, dtype):
    """The dW GEMMs' tasks are sized from the L2 (_gradients.pxd dw_task_rows):
    48-row tasks (L2 unknown) and one task a thread (a huge L2) give the same bits,
    with 1 and 2 threads."""
    from fastrnn import _cpu_cache, _dense, _recurrent
    H = {"rnn_tanh": 150, "gru": 50, "lstm": 40}[cell]            # 150-160 gate rows
    case = make_case(cell, dtype, (30, 40, 13, H), True, True, True, 8)   # 1,200 rows (t, b)
    results = []
    before = fastrnn.get_num_threads()
    try:
        for l2 in (0, 1 << 30):
            _recurrent._set_l2_bytes(l2)
            for n in (1, 2):
                fastrnn.set_num_threads(n)
                results.append(run(F, cell, case, False, 9)[1])
    finally:
        _recurrent._set_l2_bytes(_cpu_cache.l2_bytes())
        _dense._set_l2_bytes(_cpu_cache.l2_bytes())
        fastrnn.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert (a is None and b is None) or np.array_equal(a, b)


def test_inference_equals_training_forward():
    case = make_case("lstm", np.float32, (9, 6, 5, 12), True, True, True, 7)
    args = (case["x"], case["h0"], case["c0"], case["w_ih"], case["w_hh"], case["b_ih"],
            case["b_hh"])
    y1, h1, c1, cache = F.lstm_forward(*args, training=True)
    y2, h2, c2, none = F.lstm_forward(*args, training=False)
    assert none is None and cache is not None
    assert np.array_equal(y1, y2) and np.array_equal(h1, h2) and np.array_equal(c1, c2)


def test_float32_activations_close_to_float64():
    """Float32 gate activations stay within 1e-5 absolute of float64 on O(1) values."""
    case64 = make_case("lstm", np.float64, (20, 8, 16, 64), True, True, False, 8)
    case32 = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float64
                  else v) for k, v in case64.items()}
    y64 = F.lstm_forward(case64["x"][:1], case64["h0"], case64["c0"], case64["w_ih"],
                         case64["w_hh"], case64["b_ih"], case64["b_hh"], training=False)[0]
    y32 = F.lstm_forward(case32["x"][:1], case32["h0"], case32["c0"], case32["w_ih"],
                         case32["w_hh"], case32["b_ih"], case32["b_hh"], training=False)[0]
    assert np.abs(y32 - y64).max() < 1e-5


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
def test_nan_and_inf_propagate_without_crashing(cell):
    case = make_case(cell, np.float32, (4, 6, 5, 9), True, False, True, 9)
    case["x"][1, 2, 0] = np.nan
    case["x"][2, 4, 1] = np.inf
    outs, grads = run(F, cell, case, False, 10)
    y = outs[0]
    assert np.isnan(y[1:, 2]).any()
    assert np.isfinite(y[:, 0]).all()
    assert np.isnan(grads[0]).any()


def test_backward_twice_on_one_cache_raises():
    case = make_case("gru", np.float64, (3, 2, 4, 5), True, True, False, 11)
    y, h_n, cache = F.gru_forward(case["x"], case["h0"], case["w_ih"], case["w_hh"],
                                  case["b_ih"], case["b_hh"])
    F.gru_backward(np.ones_like(y), None, cache)
    with pytest.raises(RuntimeError, match="already used"):
        F.gru_backward(np.ones_like(y), None, cache)


def test_non_contiguous_input_is_copied_not_misread():
    case = make_case("lstm", np.float64, (5, 4, 6, 7), True, True, False, 12)
    x_wide = np.zeros((5, 4, 12))
    x_wide[:, :, ::2] = case["x"]
    strided = x_wide[:, :, ::2]
    assert not strided.flags.c_contiguous
    args = (case["h0"], case["c0"], case["w_ih"], case["w_hh"], case["b_ih"], case["b_hh"])
    y1 = F.lstm_forward(strided, *args, training=False)[0]
    y2 = F.lstm_forward(case["x"], *args, training=False)[0]
    assert np.array_equal(y1, y2)


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 8, 37, 45), (1, 1, 37, 300), (1, 64, 37, 45),
                                   (1, 3, 1100, 2), (1, 2, 5, 400), (1, 40, 37, 256)])
def test_a_single_step_reads_its_weights_in_place_with_the_same_bits(cell, dtype, threads,
                                                                      shape):
    """A single step's backward (T=1, batch up to 64) reads W_hh and W_ih in place
    (gemm_nn) instead of packing their transposes, and sums as the packed products
    do: every output and gradient bitwise as with the packing. H=45, I=37: ragged
    panels; G*H over one K block of 1024: H=300 (LSTM), H=400 (GRU, LSTM); I=1100:
    dx's many panels; batch 40 with H=256: W_hh packed (rows a multiple of 1 KB),
    W_ih in place; 2 threads: the unit split (batch up to 8), the row split and the
    column blocks of dx."""
    assert_single_step_in_place_bits(cell, dtype, threads, shape)


def assert_single_step_in_place_bits(cell, dtype, threads, shape):
    """run(F, ...) of a T=1 case with the weights read in place and with their
    transposes packed (_recurrent._set_in_place_steps): every array bitwise equal."""
    from fastrnn import _recurrent
    case = make_case(cell, dtype, shape, True, False, True, 7)
    before = fastrnn.get_num_threads()
    results = []
    try:
        fastrnn.set_num_threads(threads)
        for in_place in (False, True):
            was = _recurrent._set_in_place_steps(in_place)
            try:
                outs, grads = run(F, cell, case, False, 3)
            finally:
                _recurrent._set_in_place_steps(was)
            results.append(outs + grads)
    finally:
        fastrnn.set_num_threads(before)
    for a, b in zip(*results):
        assert (a is None and b is None) or np.array_equal(a, b)
    assert np.any(results[1][len(results[1]) - len(grads)] != 0)      # dx


_GUARD_SCRIPT = r"""
import ctypes, mmap, sys
import numpy as np
import fastrnn
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
keep = []

def guarded(a):
    '''A copy of `a` whose last byte is the last before a PROT_NONE page.'''
    pg, n = mmap.PAGESIZE, a.nbytes
    span = -(-n // pg) * pg
    buf = mmap.mmap(-1, span + pg)
    raw = np.frombuffer(buf, np.uint8)
    assert libc.mprotect(raw.ctypes.data + span, pg, 0) == 0   # PROT_NONE
    keep.append((buf, raw))
    out = raw[span - n:span].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out

for kind in ("RNNCell", "GRUCell", "LSTMCell"):
    for dtype in (np.float32, np.float64):
        for I, H in ((1, 9), (7, 3), (15, 2), (16, 1)):
            cell = getattr(fastrnn, kind)(I, H, dtype=dtype, seed=0)
            cell.weight_ih.data = guarded(cell.weight_ih.data)
            cell.weight_hh.data = guarded(cell.weight_hh.data)
            x = np.ones((5, I), dtype)
            out = cell(x)
            dh = np.ones((5, H), dtype)
            cell.backward((dh, None) if kind == "LSTMCell" else dh)
            assert np.isfinite(cell.weight_ih.grad).all()
print("ok")
"""


@pytest.mark.skipif(not hasattr(__import__("mmap"), "PAGESIZE") or sys.platform != "linux",
                    reason="needs Linux mprotect")
def test_a_single_step_never_reads_past_its_weights():
    """The weights read in place by a single step's backward (gemm_nn) end right
    before an unmapped page: narrow matrices (I or H under a panel's 16 or 32 values)
    must not read past their last row (a review: I=7 and 15 segfaulted)."""
    import subprocess
    done = subprocess.run([sys.executable, "-c", _GUARD_SCRIPT], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode,
                                                                  done.stderr[-2000:])
