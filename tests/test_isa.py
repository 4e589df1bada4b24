"""Every kernel under every ISA this CPU has, against the NumPy reference.

The micro-kernels and elementwise passes are built for AVX-512, AVX2+FMA and
baseline x86-64 from one source (src/isa.h, src/gemm_kernels.inc); here each
variant the machine can run is selected in-process (fastrnn.set_isa) and
checked: outputs and every gradient against fastrnn.reference, 1 vs 2 threads
bitwise within the ISA, and agreement across ISAs to float tolerance. ISAs the
CPU lacks are skipped with the reason.
"""

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

import fastrnn
from fastrnn import functional as F
from fastrnn import reference as R
from test_fastpath import general
from test_kernels import (TOL, assert_same_bits_for_thread_counts, assert_single_step_in_place_bits,
                          make_case, rel_err, run)

ISAS = ["baseline", "avx2", "avx512"]
# Shapes chosen for the register tiles: batch 1-3 (dot-product kernel), 13 and
# 30 rows (a full 12-row AVX-512 tile plus a ragged one), H giving ragged
# 16- and 32-column panels, I > the 1024 K block (FASTRNN_KC).
SHAPES = [(1, 1, 3, 5), (3, 2, 9, 17), (4, 13, 21, 41), (2, 30, 37, 33), (2, 14, 1030, 12)]


@pytest.fixture(params=ISAS)
def isa(request):
    name = request.param
    if name not in fastrnn.available_isas():
        pytest.skip(f"this CPU ({fastrnn._isa.cpu_model()}) lacks {name}; "
                    f"it has {', '.join(fastrnn.available_isas())}")
    before = fastrnn.get_isa()
    fastrnn.set_isa(name)
    yield name
    fastrnn.set_isa(before)


def _check(cell, dtype, shape, variant, isa):
    seed = zlib.crc32(repr((cell, shape, variant)).encode())
    case = make_case(cell, dtype, shape, variant != "no_bias", variant == "lengths", True, seed)
    reverse = variant == "reverse"
    outs, grads = run(F, cell, case, reverse, seed + 1)
    ref_outs, ref_grads = run(R, cell, case, reverse, seed + 1)
    for got, want in zip(outs + grads, ref_outs + ref_grads):
        if want is None:
            assert got is None
            continue
        assert got.dtype == dtype
        assert rel_err(got, want) <= TOL[dtype], f"{isa}"
    return outs, grads


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "gru_rb", "lstm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["plain", "no_bias", "lengths", "reverse"])
def test_kernels_match_reference_under_each_isa(isa, cell, dtype, shape, variant):
    _check(cell, dtype, shape, variant, isa)


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "gru_rb", "lstm"])
@pytest.mark.parametrize("split", ["rows", "units"])
def test_one_and_two_threads_bitwise_under_each_isa(isa, cell, split, monkeypatch):
    monkeypatch.setattr(F, "SMALL_WORK_FLOP", 0)
    monkeypatch.setattr(F, "UNITS_STEP_MIN_FLOP", 0)
    monkeypatch.setattr(F, "UNITS_MAX_BATCH", 10**6 if split == "units" else 0)
    monkeypatch.setattr(F, "ROWS_MIN_PER_THREAD", 10**6)    # units even where rows would win
    monkeypatch.setattr(F, "UNITS_MIN_STEPS", 0)
    case = make_case(cell, np.float32, (5, 26, 19, 45), True, True, True, 21)
    assert_same_bits_for_thread_counts(cell, case, False, 22, (1, 2))


def test_isas_agree_to_float_tolerance():
    """Different vector widths round differently; float32 results agree to 1e-5."""
    have = fastrnn.available_isas()
    if len(have) < 2:
        pytest.skip(f"only {have} on this CPU")
    case = make_case("lstm", np.float32, (6, 20, 33, 70), True, True, True, 23)
    before = fastrnn.get_isa()
    results = {}
    try:
        for name in have:
            fastrnn.set_isa(name)
            results[name] = run(F, "lstm", case, False, 24)
    finally:
        fastrnn.set_isa(before)
    base = results[have[0]]
    for name in have[1:]:
        for a, b in zip(base[0] + base[1], results[name][0] + results[name][1]):
            assert rel_err(b, a) < 1e-5, name


def test_float64_activations_accurate():
    """The vectorised float64 exp/tanh (src/activations.h) stay within 1e-12 of NumPy's."""
    rng = np.random.default_rng(0)
    case = make_case("lstm", np.float64, (3, 9, 11, 37), True, True, False, 25)
    case["x"] = case["x"] * rng.uniform(0.01, 20, case["x"].shape)   # tiny to saturating
    args = (case["x"], case["h0"], case["c0"], case["w_ih"], case["w_hh"], case["b_ih"],
            case["b_hh"])
    y = F.lstm_forward(*args, training=False)[0]
    y_ref = R.lstm_forward(*args, training=False)[0]
    assert np.abs(y - y_ref).max() < 1e-12


def _float64_points():
    """(1, B, 1) values from 1e-300 to saturating, both signs, and across the
    range-reduction boundaries |y| = ln2/2 (tanh: |x| = ln2/4)."""
    mags = np.concatenate([np.logspace(-300, -3, 200), np.linspace(1e-3, 40, 4001),
                           np.log(2) / 4 + np.linspace(-1e-6, 1e-6, 101),
                           np.log(2) / 2 + np.linspace(-1e-6, 1e-6, 101)])
    x = np.concatenate([mags, -mags])
    return x.reshape(1, -1, 1)


def test_float64_tanh_relative_accuracy(isa):
    """tanh alone, through an RNN layer whose weights pass x through unchanged
    (w_ih = 1, w_hh = 0, no bias): within 2e-15 of NumPy's, relative, from 1e-300
    to saturation (src/activations.h: rational exp, no cancellation near 0)."""
    x = _float64_points()                                  # (1, B, 1)
    one, zero = np.ones((1, 1)), np.zeros((1, 1))
    y = F.rnn_forward(x, None, one, zero, None, None, training=False)[0]
    want = np.tanh(x)
    assert (np.abs(y - want) <= 2e-15 * np.abs(want)).all(), np.max(np.abs(y - want) / np.abs(want))


def test_float64_sigmoid_relative_accuracy(isa):
    """sigmoid alone, through an LSTM step: i = g = 1 (bias 800), c_0 = 0, so
    c = 1 and h = o tanh(1) with o = sigmoid(x) (the o rows of w_ih pass x).
    Within 3e-15 of NumPy's relative to h (sigmoid, tanh(1), one product)."""
    x = _float64_points()                                  # (1, B, 1)
    w_ih = np.array([[0.0], [0.0], [0.0], [1.0]])          # (4H, I): gates i, f, g, o
    b_ih = np.array([800.0, 0.0, 800.0, 0.0])              # i = sigmoid(800) = 1, g = tanh(800) = 1
    y = F.lstm_forward(x, None, None, w_ih, np.zeros((4, 1)), b_ih, np.zeros(4),
                       training=False)[0]
    want = np.tanh(1.0) / (1.0 + np.exp(-x))
    assert (np.abs(y - want) <= 3e-15 * np.abs(want)).all(), np.max(np.abs(y - want) / np.abs(want))


def test_set_isa_rejects_unknown_and_missing():
    with pytest.raises(ValueError, match="isa must be one of"):
        fastrnn.set_isa("sse9")
    missing = [name for name in ISAS if name not in fastrnn.available_isas()]
    if missing:
        with pytest.raises(ValueError, match="not supported by this CPU"):
            fastrnn.set_isa(missing[0])
    cfg = fastrnn.config()
    assert cfg["isa"] == fastrnn.get_isa() and cfg["isa"] in cfg["isas_available"]
    assert cfg["cpu"]


def test_fastrnn_isa_environment_variable():
    env = dict(os.environ, FASTRNN_ISA="baseline")
    out = subprocess.run([sys.executable, "-c", "import fastrnn; print(fastrnn.get_isa())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "baseline"
    env["FASTRNN_ISA"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", "import fastrnn"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "FASTRNN_ISA='bogus'" in bad.stderr


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "gru_rb", "lstm"])
@pytest.mark.parametrize("B", [1, 2, 3, 4])
def test_packed_weights_at_one_to_three_rows_under_each_isa(isa, cell, B, monkeypatch):
    """Batches of 1-3 rows against packed weights run whole panels two at a time
    (gemm_kernels.inc, tile_pair), then the ragged last panel alone: against the
    reference, and bitwise across 1 and 2 threads (hidden units split). H = 41
    gives 2-5 panels with a ragged one for every cell and ISA."""
    monkeypatch.setattr(F, "pack_flags", lambda T, B, frozen_eval=False: (True, True))
    monkeypatch.setattr(F, "SMALL_WORK_FLOP", 0)
    monkeypatch.setattr(F, "UNITS_STEP_MIN_FLOP", 0)
    monkeypatch.setattr(F, "UNITS_MIN_STEPS", 0)
    for dtype in (np.float32, np.float64):
        _check(cell, dtype, (4, B, 23, 41), "plain", isa)
    case = make_case(cell, np.float32, (4, B, 23, 41), True, False, True, 31)
    assert_same_bits_for_thread_counts(cell, case, False, 32, (1, 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pack", [True, False])
def test_a_row_gets_the_same_bits_whatever_its_tile(isa, dtype, pack):
    """The packed GEMM cuts M rows into register tiles of up to 12 (AVX-512) or 6
    rows, spread evenly (src/recurrent_gemm.h); the dot-product kernel (W read in
    place) into tiles of 3, 2 and 1 rows within blocks of 24 columns, with 8, 6 or
    4 columns a tile and single columns at a block's end (gemm_kernels.inc): every
    row count from 1 to 50, each row bitwise equal to the same row computed alone,
    and close to float64. N = 70: two whole column blocks and a ragged one; K = 37:
    a scalar tail after the vectors."""
    from fastrnn import _dense
    rng = np.random.default_rng(7)
    K, N = 37, 70
    x = rng.standard_normal((50, K)).astype(dtype)
    w = rng.standard_normal((N, K)).astype(dtype)
    alone = np.empty((50, N), dtype)
    for i in range(50):
        _dense.forward(alone[i:i + 1], x[i:i + 1], w, None, 1, pack)
    assert np.allclose(alone, x.astype(np.float64) @ w.T.astype(np.float64),
                       rtol=1e-4 if dtype == np.float32 else 1e-12,
                       atol=1e-4 if dtype == np.float32 else 1e-12)
    for M in range(1, 51):
        y = np.empty((M, N), dtype)
        _dense.forward(y, x[:M], w, None, 1, pack)
        assert np.array_equal(y, alone[:M]), M


@pytest.mark.parametrize("cell", ["lstm", "gru", "gru_rb"])
def test_weight_gradients_over_more_rows_than_one_k_block(isa, cell):
    """The dW GEMMs sum over T*B rows in K blocks of FASTRNN_KC (1024): 55 x 20 =
    1100 rows take two blocks, the second added onto the first; against the
    reference, under each ISA."""
    _check(cell, np.float64, (55, 20, 6, 9), "plain", isa)
    _check(cell, np.float32, (55, 20, 6, 9), "plain", isa)


def test_config_names_the_env_override_only_while_it_is_in_use():
    """config()["isa_forced"] is FASTRNN_ISA's value while its ISA runs; set_isa
    replaces it (it had kept reporting the variable), and a blank value forces nothing."""
    code = ("import fastrnn; c = fastrnn.config(); a = (c['isa'], c['isa_forced']); "
            "fastrnn.set_isa('baseline'); c = fastrnn.config(); "
            "print(a, (c['isa'], c['isa_forced']))")
    for env, want in (("baseline", "('baseline', 'baseline') ('baseline', None)"),
                      (" ", None)):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=dict(os.environ, FASTRNN_ISA=env))
        assert out.returncode == 0, out.stderr
        if want is not None:
            assert out.stdout.strip() == want
        else:
            assert "None) ('baseline', None)" in out.stdout


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [False, True])
def test_sigmoid_is_zero_past_the_exp_clamp_as_torch(isa, dtype, training):
    """An audit (session 25): sigmoid had a floor of 6e-39 (float32) / 1e-308
    (float64) where exp(-x) is clamped, so f * c_0 at x = -inf, c_0 = inf gave inf
    where torch gives NaN (0 * inf), and a gate's gradient at x = -3e38 was of
    order 1 instead of 0. Gates i, f, o read x; g is tanh(0) = 0."""
    w_ih = np.array([[1.0], [1.0], [0.0], [1.0]], dtype)           # (4H, I): i, f, g, o
    zero = np.zeros((4, 1), dtype)
    x = np.array([-np.inf, -1e300 if dtype == np.float64 else -3e38, -710.0, -89.0],
                 dtype).reshape(1, 4, 1)                             # (T, B, I)
    c0 = np.array([[np.inf], [1.0], [1.0], [1.0]], dtype)           # (B, H)
    out = F.lstm_forward(x, None, c0, w_ih, zero, None, None, training=training)
    c_n = out[2]
    assert np.isnan(c_n[0, 0])                                     # 0 * inf, as torch
    assert (c_n[1:3] == 0).all()                                   # f = sigmoid(x) = 0
    if dtype == np.float32:
        assert c_n[3, 0] == 0                                      # past the float32 clamp
    else:                                                          # float64: 2.2e-39 still
        assert abs(c_n[3, 0] - 1 / (1 + np.exp(89.0))) <= 1e-14 * c_n[3, 0]
    y = F.lstm_forward(x[:, 1:], None, c0[1:], w_ih, zero, None, None, training=False)[0]
    assert (y[0, 0] == 0).all()                                    # o = sigmoid(-huge) = 0


def test_relu_gradient_passes_at_nan_as_torch(isa):
    """relu's backward dropped the gradient where h is NaN (`h > 0 ? g : 0`);
    torch's `h <= 0 ? 0 : g` passes it (session 25's audit). RNN(1, 1, relu),
    w_ih = 2, w_hh = 0.5, x = NaN, h_0 = 1, dy = 1: dx = 2, dh_0 = 0.5, dW_hh = 1."""
    for mod in (F, R):
        x = np.array([[[np.nan]]])
        h0 = np.ones((1, 1))
        y, h_n, cache = mod.rnn_forward(x, h0, np.array([[2.0]]), np.array([[0.5]]), None,
                                        None, nonlinearity="relu", training=True)
        assert np.isnan(y).all()
        dx, dh0, dw_ih, dw_hh, *_ = mod.rnn_backward(np.ones_like(y), None, cache)
        assert dx[0, 0, 0] == 2.0 and dh0[0, 0] == 0.5 and dw_hh[0, 0] == 1.0, mod.__name__
        assert np.isnan(dw_ih[0, 0])


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "gru_rb", "lstm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 8, 37, 45), (1, 13, 21, 300)])
def test_a_single_step_in_place_has_the_packed_bits_under_each_isa(isa, cell, dtype, shape):
    """gemm_nn (src/gemm_kernels.inc) under each ISA's tile: a single step's backward
    with the weights read in place is bitwise the packed one (1 and 2 threads)."""
    for threads in (1, 2):
        assert_single_step_in_place_bits(cell, dtype, threads, shape)


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU", "GRU_reset_before"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T,B,lengths", [(10, 3, None), (6, 1, None), (2, 2, None),
                                         (4, 5, None), (1, 1, None), (1, 4, None),
                                         (9, 3, [9, 4, 1])])
def test_frozen_short_sequences_read_packed_weights(isa, kind, dtype, T, B, lengths,
                                                    monkeypatch):
    """Frozen weights at inference read their kept packings, single steps too (pack_flags'
    frozen_eval), hidden units split up to 8 rows: against the NumPy reference, and
    bitwise across 1 and 2 threads, fast path and general path. I = 23, H = 41:
    ragged panels; teams even for this little work."""
    monkeypatch.setattr(F, "SMALL_WORK_FLOP", 0)
    monkeypatch.setattr(F, "UNITS_STEP_MIN_FLOP", 0)
    monkeypatch.setattr(F, "RESET_BEFORE_TEAM_STEP_FLOP", 0)
    assert F.pack_flags(T, B, frozen_eval=True)[1] and F.splits_units(T, B, True,
                                                                      frozen_eval=True)
    I, H = 23, 41
    cls = {"RNN": fastrnn.RNN, "LSTM": fastrnn.LSTM}.get(kind, fastrnn.GRU)
    kw = {"reset_after": False} if kind == "GRU_reset_before" else {}
    m = cls(I, H, dtype=dtype, seed=3, **kw).eval().freeze()
    x = np.random.default_rng(4).standard_normal((T, B, I)).astype(dtype)
    w = [getattr(m, n).data for n in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0",
                                      "bias_hh_l0")]
    if kind == "LSTM":
        want = R.lstm_forward(x, None, None, *w, lengths=lengths)[0]
    elif kind == "RNN":
        want = R.rnn_forward(x, None, *w, lengths=lengths)[0]
    else:
        want = R.gru_forward(x, None, *w, lengths=lengths, reset_after=not kw)[0]
    before = fastrnn.get_num_threads()
    got = []
    try:
        for n in (1, 2):
            fastrnn.set_num_threads(n)
            got += [m(x, lengths=lengths)[0], general(m, x, lengths=lengths)[0]]
    finally:
        fastrnn.set_num_threads(before)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[0], want, **tol)
    for other in got[1:]:
        assert np.array_equal(other, got[0])
