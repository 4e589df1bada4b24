"""fastrnn.quantize: kernels against their NumPy twin on every ISA this CPU has,
accuracy against float32 and torch, save/load, bad input."""

import os

import numpy as np
import pytest

import fastrnn
from fastrnn import quant_reference as R
from fastrnn import quantization as Q

ISAS = ["baseline", "avx2", "avx512", "avx512_bf16"]
CELLS = ["LSTM", "GRU", "RNN"]


def isa_param(name):
    if name not in Q.available_isas():
        return pytest.param(name, marks=pytest.mark.skip(
            reason=f"this CPU lacks {Q.ISA_NEEDS[name]} (ISA path {name!r})"))
    return name


@pytest.fixture(params=[isa_param(n) for n in ISAS])
def isa(request):
    Q.set_isa(request.param)
    yield request.param
    Q.set_isa(None)


def _tol(qdtype, isa):
    return 2e-6      # float32 sums in another order than the twin's (every kernel, every ISA)


# bf16 dynamic rounds each step's h_{t-1} (and each layer's input) to bf16. The kernel's
# h and the twin's differ in the last float32 bits (gate functions, summation order),
# and where an element lies within those bits of a bf16 rounding boundary the two round
# it to neighbouring bf16 values, 2^-8 apart relative. One such flip moves the next
# step's pre-activation by up to 2^-9 |h| |w| (here |w| <= 1/sqrt(H) <= 0.38): at most
# ~7e-4, ~2e-4 at H=33. With the tanh of session 16 (through expm1) the RNN case
# T=3, B=5, H=33 flips one element on every ISA: 1.6e-4; the other bf16 dynamic
# cases stay at or below 1.2e-7.
# Which mode ran is asserted on its own (dyn_hh), not told apart by this tolerance.
# Exact inputs (one step, one layer; a Linear) are held to _tol in the tests below.
BF16_DYNAMIC_RECURRENT_TOL = 1e-3


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("qdtype,mode", [("float32", "auto"), ("bfloat16", "auto"),
                                         ("bfloat16", "weight_only"), ("bfloat16", "dynamic"),
                                         ("int8", "weight_only"), ("int8", "dynamic")])
@pytest.mark.parametrize("shape", [(1, 1, 5, 7), (6, 3, 13, 37), (3, 5, 16, 33), (2, 11, 20, 70)])
def test_stack_matches_twin(isa, cell, qdtype, mode, shape):
    T, B, I, H = shape
    rng = np.random.default_rng(T * 100 + H)
    m = getattr(fastrnn, cell)(I, H, num_layers=2, bidirectional=(H == 37), seed=3).eval()
    q = fastrnn.quantize(m, qdtype, mode)
    D = 2 if m.bidirectional else 1
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = (0.5 * rng.standard_normal((2 * D, B, H))).astype(np.float32)
    c0 = (0.5 * rng.standard_normal((2 * D, B, H))).astype(np.float32)
    out, st = q(x, (h0, c0) if cell == "LSTM" else h0)
    dyn_ih, dyn_hh = q._dyn(T * B), q._dyn(B)
    assert dyn_hh == (mode == "dynamic" or (mode == "auto" and qdtype == "int8")
                      or (mode == "auto" and qdtype == "bfloat16" and isa == "avx512_bf16"
                          and (Q._BF16_DOT_PAYS or Q.bf16_on_amx())))
    y, hr, cr = R.stack_forward(q, x, h0, c0 if cell == "LSTM" else None, dyn_ih, dyn_hh)
    tol = _tol(qdtype, isa)
    if qdtype == "bfloat16" and dyn_hh:
        tol = BF16_DYNAMIC_RECURRENT_TOL
    np.testing.assert_allclose(out, y, atol=tol, rtol=0)
    np.testing.assert_allclose(st[0] if cell == "LSTM" else st, hr, atol=tol, rtol=0)
    if cell == "LSTM":
        np.testing.assert_allclose(st[1], cr, atol=2 * tol, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_bf16_large_batch_runs_the_float_driver_on_the_same_weights(cell):
    """From BF16_FLOAT_MIN_BATCH rows a bf16 call runs the float32 driver on the bf16
    weights widened: the twin's numbers on both sides of the switch, and a weight change
    through load_state_dict reaches the float copy too."""
    m = getattr(fastrnn, cell)(13, 37, num_layers=2, bidirectional=True, seed=5).eval()
    q = fastrnn.quantize(m, "bfloat16", "weight_only")
    rng = np.random.default_rng(4)
    for B in (Q.BF16_FLOAT_MIN_BATCH - 1, Q.BF16_FLOAT_MIN_BATCH, 2 * Q.BF16_FLOAT_MIN_BATCH + 3):
        x = rng.standard_normal((4, B, 13)).astype(np.float32)
        h0 = (0.5 * rng.standard_normal((4, B, 37))).astype(np.float32)
        c0 = (0.5 * rng.standard_normal((4, B, 37))).astype(np.float32)
        out, st = q(x, (h0, c0) if cell == "LSTM" else h0)
        y, hr, cr = R.stack_forward(q, x, h0, c0 if cell == "LSTM" else None)
        np.testing.assert_allclose(out, y, atol=2e-6, rtol=0)
        np.testing.assert_allclose(st[0] if cell == "LSTM" else st, hr, atol=2e-6, rtol=0)
        if cell == "LSTM":
            np.testing.assert_allclose(st[1], cr, atol=4e-6, rtol=0)
    assert q._twin is not None                    # the large batches took the float route
    state = q.state_dict()
    state["weight_hh_l1_reverse"] = np.zeros_like(state["weight_hh_l1_reverse"])
    q.load_state_dict(state)
    x = rng.standard_normal((4, Q.BF16_FLOAT_MIN_BATCH, 13)).astype(np.float32)
    np.testing.assert_allclose(q(x)[0], R.stack_forward(q, x)[0], atol=2e-6, rtol=0)


def test_bf16_dynamic_large_batch_keeps_its_numbers():
    """bf16 dynamic keeps its own numbers at any batch: the bf16 kernel, or where AMX
    tiles run it, the float32 twin with bf16 products (the same rounding)."""
    m = fastrnn.LSTM(13, 37, seed=5).eval()
    q = fastrnn.quantize(m, "bfloat16", "dynamic")
    x = np.random.default_rng(4).standard_normal((1, 2 * Q.BF16_FLOAT_MIN_BATCH, 13)).astype(np.float32)
    out, _ = q(x)
    np.testing.assert_allclose(out, R.stack_forward(q, x, None, None, True, True)[0],
                               atol=2e-6, rtol=0)
    assert (q._twin is not None) == Q.bf16_on_amx()


@pytest.mark.skipif(not Q.bf16_on_amx(), reason="this CPU has no AMX-BF16 tiles")
@pytest.mark.parametrize("cell", CELLS)
def test_bf16_on_amx_runs_the_twin_with_bf16_products_pools_too(cell):
    """Where AMX tiles run bf16 products, bf16 stacks ("auto" and "dynamic") run calls of
    2+ rows as their float32 twin with bf16 products: the twin's dynamic numbers; a
    StreamPool step gathers its rows and gets the same; batch 1 stays on vdpbf16ps."""
    rng = np.random.default_rng(7)
    m = getattr(fastrnn, cell)(24, 40, num_layers=2, seed=1).eval()
    q = fastrnn.quantize(m, "bfloat16")                       # auto
    x = rng.standard_normal((5, 6, 24)).astype(np.float32)
    out = q(x)[0]
    assert q._twin is not None and q._on_amx(6) and not q._on_amx(1)
    np.testing.assert_allclose(out, R.stack_forward(q, x, None, None, 1, 1)[0], atol=2e-6,
                               rtol=0)
    one = q(x[:, :1])[0]
    np.testing.assert_allclose(one, R.stack_forward(q, x[:, :1], None, None, 1, 1)[0],
                               atol=2e-6, rtol=0)
    pool = fastrnn.StreamPool(q, 9)
    ids = [pool.open() for _ in range(6)][::-1]               # rows in another order
    steps = np.stack([pool.step(ids, np.ascontiguousarray(x[t, ::-1])) for t in range(5)])
    np.testing.assert_allclose(steps[:, ::-1], out, atol=2e-6, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_bf16_dynamic_one_step_matches_twin_closely(isa, cell):
    """One step of one layer: the inputs the kernel rounds to bf16 (x, h0) are the
    twin's exactly, so only the summation order differs."""
    rng = np.random.default_rng(8)
    m = getattr(fastrnn, cell)(21, 45, seed=4).eval()
    q = fastrnn.quantize(m, "bfloat16", "dynamic")
    x = rng.standard_normal((1, 3, 21)).astype(np.float32)
    h0 = (0.5 * rng.standard_normal((1, 3, 45))).astype(np.float32)
    out, st = q(x, (h0, h0) if cell == "LSTM" else h0)
    y, _, cr = R.stack_forward(q, x, h0, h0 if cell == "LSTM" else None, True, True)
    np.testing.assert_allclose(out, y, atol=2e-6, rtol=0)
    if cell == "LSTM":
        np.testing.assert_allclose(st[1], cr, atol=4e-6, rtol=0)
    yw = R.stack_forward(q, x, h0, h0 if cell == "LSTM" else None, False, False)[0]
    assert np.abs(out - yw).max() > 1e-5          # the activations really were rounded


def test_bf16_dynamic_rounds_activations_to_nearest_even_on_every_isa():
    """Identity weights: y = bf16(x), bitwise, on every ISA (ties to even, zero padding
    beyond K; an inf or NaN input would make its whole row NaN through 0 * inf)."""
    K = 19
    lin = fastrnn.nn.Linear(K, K, rng=0)
    lin.weight.data[...] = np.eye(K, dtype=np.float32)
    lin.bias.data[...] = 0.0
    q = fastrnn.quantize(lin, "bfloat16", "dynamic")
    x = np.zeros((2, K), np.float32)
    x[0, :6] = [1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, -(1 + 2.0 ** -8 + 2.0 ** -20), 0.1,
                3.0e38, 1e-30]
    x[1] = np.linspace(-2, 2, K, dtype=np.float32)
    want = R.round_bf16(x)
    assert want[0, 0] == 1.0 and want[0, 1] == 1 + 2.0 ** -6       # ties to even
    assert want[0, 2] == -(1 + 2.0 ** -7)                          # above the tie: away
    nan_bits = R.round_bf16(np.array([np.nan, np.inf, -np.inf], np.float32))
    assert np.isnan(nan_bits[0]) and nan_bits[1] == np.inf and nan_bits[2] == -np.inf
    for name in Q.available_isas():
        Q.set_isa(name)
        y = q(x)
        Q.set_isa(None)
        np.testing.assert_array_equal(y, want, err_msg=f"isa {name}")
    # vdpbf16ps treats subnormal bf16 inputs as zero (DAZ); the emulation keeps them
    x[0, 0] = 1e-40
    for name in Q.available_isas():
        Q.set_isa(name)
        y = q(x)
        Q.set_isa(None)
        assert y[0, 0] == (0.0 if name == "avx512_bf16" else R.round_bf16(x)[0, 0]), name


def test_bf16_auto_follows_the_cpu():
    """mode 'auto' is dynamic exactly where vdpbf16ps runs and pays, or (recurrent
    modules) where AMX tiles run the calls of 2 rows or more; else weight-only."""
    q = fastrnn.quantize(fastrnn.nn.Linear(8, 4, rng=0), "bfloat16")
    r = fastrnn.quantize(fastrnn.GRU(8, 4, seed=0).eval(), "bfloat16")
    for name in Q.available_isas():
        Q.set_isa(name)
        at_bf16 = name == "avx512_bf16"
        assert q._dyn(5) == int(at_bf16 and Q._BF16_DOT_PAYS), name
        assert r._dyn(1) == r._dyn(5) == int(at_bf16 and (Q._BF16_DOT_PAYS or Q.bf16_on_amx()))
        assert Q.bf16_auto_is_dynamic() == bool(r._dyn(5))
        assert r._on_amx(5) == (at_bf16 and Q.bf16_on_amx()) and not r._on_amx(1)
        assert fastrnn.config()["quantized_isa"] == name
    Q.set_isa(None)
    assert fastrnn.quantize(fastrnn.nn.Linear(8, 4, rng=0), "bfloat16", "weight_only")._dyn(5) == 0


def test_bf16_cell_large_batch_matches_twin():
    c = fastrnn.LSTMCell(9, 21, seed=2).eval()
    q = fastrnn.quantize(c, "bfloat16", "weight_only")
    x = np.random.default_rng(1).standard_normal((Q.BF16_FLOAT_MIN_BATCH + 2, 9)).astype(np.float32)
    h, cc = q(x)
    rh, rc = R.cell_forward(q, x)
    np.testing.assert_allclose(h, rh, atol=2e-6, rtol=0)
    np.testing.assert_allclose(cc, rc, atol=4e-6, rtol=0)
    assert q._twin is not None


def test_dynamic_int8_is_bitwise_across_isas():
    """Exact integer sums: every ISA gives bitwise the same int8-dynamic GEMM (the
    recurrent layers' gate passes may differ in the last bit: FMA contraction)."""
    q = fastrnn.quantize(fastrnn.nn.Linear(37, 50, rng=1), "int8", "dynamic")
    x = np.random.default_rng(0).standard_normal((9, 37)).astype(np.float32)
    x[0] = 0.0                                    # zero row: scale 0
    x[1, :6] = [127.0, 2.5, 3.5, -2.5, -3.5, 0.5]  # ties of the activation rounding (to even)
    outs = []
    for name in Q.available_isas():
        Q.set_isa(name)
        outs.append(q(x))
    Q.set_isa(None)
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


def test_int8_dynamic_dot_products_that_could_wrap_run_weight_only_or_are_refused(isa):
    """Past INT8_DYNAMIC_MAX_K terms an int32 sum of int8 products could wrap: "auto"
    runs such a module weight-only (here the dynamic kernel would return -1262.9 for
    1400), "dynamic" refuses it, naming the size, before any weights are allocated."""
    K = 140000
    lin = fastrnn.nn.Linear(K, 16, rng=0)
    w = np.full((16, K), 0.01, np.float32)      # (16, K): every product at the int8 maximum
    w[1::2] *= -1
    lin.load_state_dict({"weight": w, "bias": np.zeros(16, np.float32)})
    x = np.ones((3, K), np.float32)             # (3, K)
    q = fastrnn.quantize(lin, "int8")
    assert q._dyn(3) == 0
    np.testing.assert_allclose(q(x), x @ w.T, rtol=2e-3)   # (float32 sums of 140000 terms)
    with pytest.raises(ValueError, match=r"in_features: int8 mode 'dynamic' sums at most "
                                         r"133144 products in int32, got 140000"):
        fastrnn.quantize(lin, "int8", "dynamic")
    for make, what in [(lambda: Q.QuantizedLSTM(K, 4, mode="dynamic"), "input_size"),
                       (lambda: Q.QuantizedGRUCell(4, K, mode="dynamic"), "hidden_size"),
                       (lambda: Q.QuantizedRNN(4, 70000, num_layers=2, bidirectional=True,
                                               mode="dynamic"), "num_directions")]:
        with pytest.raises(ValueError, match=what):
            make()
    at_limit = Q.QuantizedLinear(Q.INT8_DYNAMIC_MAX_K, 1, mode="dynamic")   # fits: dynamic
    assert at_limit._dyn(1) == 1


@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN])
@pytest.mark.parametrize("batch_first", [False, True])
def test_quantised_stack_takes_unbatched_input_as_the_float_module(cls, batch_first):
    """x (T, I) and states (L·D, H): the batch-of-one call's numbers without its axis."""
    m = cls(3, 5, num_layers=2, bidirectional=True, batch_first=batch_first, seed=0).eval()
    q = fastrnn.quantize(m, "int8")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3)).astype(np.float32)                 # (T, I)
    h = rng.standard_normal((4, 5)).astype(np.float32)                 # (L·D, H)
    lstm = cls is fastrnn.LSTM
    y, state = q(x, (h, h) if lstm else h)
    y3, state3 = q(x[None] if batch_first else x[:, None],
                   (h[:, None], h[:, None]) if lstm else h[:, None])
    assert y.shape == (4, 10)
    assert np.array_equal(y, y3[0] if batch_first else y3[:, 0])
    assert np.array_equal(state[0] if lstm else state, (state3[0] if lstm else state3)[:, 0])
    assert np.abs(y - m(x, (h, h) if lstm else h)[0]).max() < 0.05    # the float module's call
    with pytest.raises(ValueError, match=r"expected shape \(4, 5\) with an unbatched x"):
        q(x, (h[:, None], h[:, None]) if lstm else h[:, None])
    empty = np.zeros((0, 4, 3) if batch_first else (4, 0, 3), np.float32)   # B = 0
    y0, s0 = q(empty)
    assert y0.shape == m(empty)[0].shape and (s0[0] if lstm else s0).shape == (4, 0, 5)


def test_load_state_dict_refuses_codes_that_would_wrap_or_exceed_127():
    """int8 weight codes stop at +-127 (quantize_int8; the int32 sums' bound assumes it),
    and integer codes must fit their array: -128, or an int16 200 that astype would
    turn into -56, are refused with the key and the range, before anything is written."""
    q = fastrnn.quantize(fastrnn.nn.Linear(8, 2, rng=0), "int8")
    good = {k: np.array(v.data) for k, v in q.named_parameters()}
    for bad, lo_hi in [(np.full((2, 8), -128, np.int8), "from -128 to -128"),
                       (np.full((2, 8), 200, np.int16), "from 200 to 200")]:
        with pytest.raises(ValueError, match=r"weight: expected integers in \[-127, 127\], "
                                             r"got values " + lo_hi):
            q.load_state_dict(dict(good, weight=bad, bias=np.ones(2, np.float32)))
        assert np.array_equal(q.state_dict()["bias"], good["bias"])    # nothing written
    q.load_state_dict(dict(good, weight=np.full((2, 8), -127, np.int64)))   # in range: loads
    assert (q.state_dict()["weight"] == -127).all()
    b = fastrnn.quantize(fastrnn.nn.Linear(8, 2, rng=0), "bfloat16")
    codes = {k: np.array(v.data) for k, v in b.named_parameters()}
    with pytest.raises(ValueError, match=r"expected integers in \[0, 65535\]"):
        b.load_state_dict(dict(codes, weight=codes["weight"].astype(np.int32) + 70000))


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("qdtype", ["int8", "bfloat16"])
def test_cells_match_twin(isa, cls, qdtype):
    rng = np.random.default_rng(1)
    cell = getattr(fastrnn, cls)(9, 21, seed=2).eval()
    q = fastrnn.quantize(cell, qdtype)
    x = rng.standard_normal((2, 9)).astype(np.float32)
    h = (0.3 * rng.standard_normal((2, 21))).astype(np.float32)
    lstm = cls == "LSTMCell"
    res = q(x, (h, h) if lstm else h)
    h1r, c1r = R.cell_forward(q, x, h, h if lstm else None, q._dyn(2), q._dyn(2))
    tol = _tol(qdtype, isa)
    np.testing.assert_allclose(res[0] if lstm else res, h1r, atol=tol, rtol=0)
    one = q(x[0], (h[0], h[0]) if lstm else h[0])          # unbatched
    h1r, c1r = R.cell_forward(q, x[:1], h[:1], h[:1] if lstm else None, q._dyn(1), q._dyn(1))
    np.testing.assert_allclose(one[0] if lstm else one, h1r[0], atol=tol, rtol=0)


@pytest.mark.parametrize("qdtype,mode", [("int8", "dynamic"), ("int8", "weight_only"),
                                         ("bfloat16", "auto"), ("bfloat16", "dynamic"),
                                         ("bfloat16", "weight_only"), ("float32", "auto")])
@pytest.mark.parametrize("M,K,N", [(1, 5, 3), (7, 33, 70), (40, 64, 16)])
def test_linear_matches_twin(isa, qdtype, mode, M, K, N):
    rng = np.random.default_rng(M + K + N)
    lin = fastrnn.nn.Linear(K, N, rng=0)
    q = fastrnn.quantize(lin, qdtype, mode)
    x = rng.standard_normal((M, K)).astype(np.float32)
    y = q(x)
    np.testing.assert_allclose(y, R.linear_forward(q, x, q._dyn(M)),
                               atol=_tol(qdtype, isa) * 10, rtol=0)
    assert q(x.reshape(1, M, K)).shape == (1, M, N)


def test_accuracy_against_float_and_torch():
    """Max abs output error below torch's quantize_dynamic on the same weights."""
    torch = pytest.importorskip("torch")
    H, T, B = 128, 20, 2
    m = fastrnn.LSTM(H, H, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((T, B, H)).astype(np.float32)
    ref, _ = m(x)
    errs = {d: np.abs(fastrnn.quantize(m, d)(x)[0] - ref).max() for d in ("int8", "bfloat16")}
    tm = torch.nn.Sequential(fastrnn.to_torch(m))
    tq = torch.ao.quantization.quantize_dynamic(tm, {torch.nn.LSTM}, dtype=torch.qint8)
    with torch.no_grad():
        terr = np.abs(tq(torch.from_numpy(x))[0].numpy() - ref).max()
    assert errs["int8"] < terr
    assert errs["bfloat16"] < errs["int8"]
    assert errs["bfloat16"] < 5e-3


@pytest.mark.parametrize("make", [
    lambda: fastrnn.LSTM(6, 40, num_layers=2, batch_first=True, seed=0),
    lambda: fastrnn.GRU(6, 40, bidirectional=True, seed=0),
    lambda: fastrnn.RNN(6, 40, nonlinearity="relu", bias=False, seed=0),
    lambda: fastrnn.LSTMCell(6, 40, seed=0),
    lambda: fastrnn.nn.Linear(6, 40, rng=0),
])
@pytest.mark.parametrize("qdtype", ["int8", "bfloat16"])
def test_save_load_stays_quantised(tmp_path, make, qdtype):
    m = make().eval()
    q = fastrnn.quantize(m, qdtype)
    fastrnn.save(tmp_path / "q.npz", q)
    back = fastrnn.load(tmp_path / "q.npz")
    assert type(back) is type(q) and back.qdtype == qdtype
    x = np.random.default_rng(0).standard_normal(
        (3, 6) if "Cell" in type(m).__name__ or "Linear" in type(m).__name__ else (2, 3, 6)
    ).astype(np.float32)
    a, b = q(x), back(x)
    for u, v in zip(np.atleast_1d(a[0] if isinstance(a, tuple) else a),
                    np.atleast_1d(b[0] if isinstance(b, tuple) else b)):
        assert np.array_equal(u, v)
    wbytes = sum(p.data.nbytes for n, p in q.named_parameters() if n.startswith("weight")
                 and not n.endswith("_scale"))
    fbytes = sum(p.data.nbytes for n, p in m.named_parameters() if n.startswith("weight"))
    assert wbytes == fbytes // (4 if qdtype == "int8" else 2)


@pytest.mark.parametrize("qdtype,ratio", [("int8", 0.27), ("bfloat16", 0.51)])
def test_file_size(tmp_path, qdtype, ratio):
    m = fastrnn.LSTM(64, 256, num_layers=2, seed=0).eval()
    fastrnn.save(tmp_path / "f.npz", m)
    fastrnn.save(tmp_path / "q.npz", fastrnn.quantize(m, qdtype))
    size_q, size_f = os.path.getsize(tmp_path / "q.npz"), os.path.getsize(tmp_path / "f.npz")
    assert size_q < size_f * ratio


def test_language_model_quantised_and_saved(tmp_path):
    lm = fastrnn.RNNLanguageModel(30, 16, 48, num_layers=2, seed=0).eval()
    q = fastrnn.quantize(lm, "int8")
    assert isinstance(q, Q.QuantizedLanguageModel)
    assert isinstance(q.rnn, Q.QuantizedLSTM) and q.rnn.qdtype == "int8"
    assert isinstance(q.decoder, Q.QuantizedLinear) and q.decoder.qdtype == "int8"
    ids = np.random.default_rng(0).integers(0, 30, (7, 3))
    lf, _ = lm(ids)
    lq, (h, c) = q(ids)
    assert lq.shape == (7, 3, 30) and np.abs(lq - lf).max() < 0.05
    fastrnn.save(tmp_path / "lm.npz", q)
    back = fastrnn.load(tmp_path / "lm.npz")
    assert np.array_equal(back(ids)[0], lq)
    from fastrnn.generate import generate_ids
    assert generate_ids(q, [1, 2], 5, seed=0).shape == (5,)


def test_sequential_quantises_children():
    seq = fastrnn.nn.Sequential(fastrnn.nn.Linear(4, 8, rng=0), fastrnn.nn.Linear(8, 2, rng=1))
    q = fastrnn.quantize(seq, "bfloat16")
    assert [type(m) for m in q] == [Q.QuantizedLinear] * 2
    assert all(m.qdtype == "bfloat16" for m in q)
    x = np.ones((3, 4), np.float32)
    assert np.abs(q(x) - seq(x)).max() < 1e-2


def test_bad_input_raises_clearly():
    q = fastrnn.quantize(fastrnn.LSTM(4, 8, seed=0).eval(), "int8")
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        q(np.zeros((2, 1, 4)))
    with pytest.raises(ValueError, match=r"x: expected .* I = 4"):
        q(np.zeros((2, 1, 5), np.float32))
    with pytest.raises(ValueError, match=r"hx\[0\]: expected shape \(1, 1, 8\)"):
        q(np.zeros((2, 1, 4), np.float32), (np.zeros((1, 2, 8), np.float32),) * 2)
    with pytest.raises(ValueError, match="lengths"):
        q(np.zeros((2, 1, 4), np.float32), lengths=[1])
    with pytest.raises(RuntimeError, match="inference-only"):
        q.backward(np.zeros((2, 1, 8), np.float32))
    with pytest.raises(ValueError, match="dtype: expected one of"):
        fastrnn.quantize(fastrnn.LSTM(4, 8), "int4")
    with pytest.raises(ValueError, match="proj_size"):
        fastrnn.quantize(fastrnn.LSTM(4, 8, proj_size=2), "int8")
    with pytest.raises(TypeError, match="already quantised"):
        fastrnn.quantize(q)
    with pytest.raises(ValueError, match="finite"):
        lin = fastrnn.nn.Linear(2, 2)
        lin.weight.data[0, 0] = np.nan
        fastrnn.quantize(lin)


def test_isa_override_errors():
    with pytest.raises(ValueError, match="expected one of"):
        Q.set_isa("sse9")
    if "avx512" not in Q.available_isas():
        with pytest.raises(RuntimeError, match="lacks"):
            Q.set_isa("avx512")
    Q.set_isa(None)
    assert Q.isa() in Q.available_isas()


def test_generate_num_samples():
    from fastrnn.generate import generate_ids
    lm = fastrnn.RNNLanguageModel(20, 8, 16, seed=0)
    q = fastrnn.quantize(lm, "int8")
    ids = generate_ids(q, [1, 2], 6, seed=0, num_samples=4)
    assert ids.shape == (4, 6) and ids.min() >= 0 and ids.max() < 20
    greedy = generate_ids(lm, [3], 5, greedy=True, num_samples=3)
    assert (greedy == greedy[0]).all()
    assert np.array_equal(greedy[0], generate_ids(lm, [3], 5, greedy=True))
    assert lm.training    # mode restored


@pytest.mark.parametrize("qdtype", ["int8", "bfloat16"])
def test_work_buffers_reused_between_calls_give_the_same_numbers(qdtype):
    """The stack's work buffers are kept between calls (src/scratch.h): a call that
    gets a buffer a larger call left behind, stale values and all, and a call after
    release_memory() give bitwise the numbers of the first call."""
    rng = np.random.default_rng(7)
    q = fastrnn.quantize(fastrnn.LSTM(24, 40, num_layers=2, seed=1).eval(), qdtype)
    small = rng.standard_normal((5, 3, 24)).astype(np.float32)
    big = rng.standard_normal((30, 9, 24)).astype(np.float32)
    first_small, first_big = q(small)[0], q(big)[0]
    again_small = q(small)[0]            # reuses big's (larger) buffer
    fastrnn.release_memory()
    again_big = q(big)[0]                # a fresh buffer
    assert np.array_equal(first_small, again_small)
    assert np.array_equal(first_big, again_big)


def test_large_packed_weights_sit_on_huge_page_boundaries():
    """Packed weights of 1 MB or more are copied to 2 MB-aligned memory advised for
    huge pages (fastrnn._hugepages); smaller ones are plain copies. Same values."""
    import mmap
    from fastrnn import _hugepages
    a = np.random.default_rng(0).standard_normal((600, 700)).astype(np.float32)   # 1.6 MB
    b = _hugepages.copy(a)
    assert np.array_equal(a, b) and b.flags.c_contiguous and b.flags.writeable
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert b.ctypes.data % _hugepages.HUGE_PAGE == 0
    s = np.arange(12.0).reshape(3, 4)
    assert np.array_equal(_hugepages.copy(s), s) and _hugepages.copy(s) is not s


@pytest.mark.parametrize("qdtype,mode", [("float32", "auto"), ("bfloat16", "weight_only"),
                                         ("bfloat16", "dynamic"), ("int8", "dynamic")])
@pytest.mark.parametrize("cell", CELLS)
def test_stack_bitwise_for_any_thread_count_and_split(isa, cell, qdtype, mode):
    """1, 2 and 3 threads, splitting hidden units or batch rows: bitwise the same
    outputs and final states (each element is computed by the same code either way),
    and the twin's numbers. Each split runs several times: a race between threads
    (one already in the next layer while another is still in this one, sharing a
    work buffer) made some runs differ."""
    from fastrnn import _quantized
    assert [_quantized.split_by_rows(13, n, k) for n, k in [(1, 0), (2, 0), (2, 1), (3, 2), (2, 6), (2, 7)]] \
        == [False, False, True, True, True, False]
    rng = np.random.default_rng(11)
    T, B, I, H = 5, 13, 19, 45
    m = getattr(fastrnn, cell)(I, H, num_layers=2, bidirectional=True, seed=6).eval()
    q = fastrnn.quantize(m, qdtype, mode)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = (0.5 * rng.standard_normal((4, B, H))).astype(np.float32)
    lstm = cell == "LSTM"
    stack = q._kernels()
    results = []
    for threads, split_min in [(1, 0), (2, 0), (3, 0), (2, 1), (3, 2), (2, 6)] * 4:
        hn = np.empty_like(h0)
        cn = np.empty_like(h0) if lstm else None
        y = stack.forward(Q._level(), q._dyn(T * B), q._dyn(B), x, h0, h0 if lstm else None,
                          hn, cn, None, None, B, threads, split_min)
        results.append((y, hn, cn))
    for y, hn, cn in results[1:]:
        assert np.array_equal(y, results[0][0]) and np.array_equal(hn, results[0][1])
        if lstm:
            assert np.array_equal(cn, results[0][2])
    yr, hr, _ = R.stack_forward(q, x, h0, h0 if lstm else None, q._dyn(T * B), q._dyn(B))
    tol = BF16_DYNAMIC_RECURRENT_TOL if (qdtype == "bfloat16" and q._dyn(B)) else 2e-6
    np.testing.assert_allclose(results[0][0], yr, atol=tol, rtol=0)


@pytest.mark.parametrize("B", [15, 16])      # from 16 rows bf16 weight_only runs its float twin
def test_bf16_lstm_keeps_c0_when_h0_is_none(B):
    m = fastrnn.LSTM(4, 8, seed=0).eval()
    q = fastrnn.quantize(m, "bfloat16", mode="weight_only")
    x = np.random.default_rng(0).standard_normal((3, B, 4)).astype(np.float32)
    c0 = np.random.default_rng(1).standard_normal((1, B, 8)).astype(np.float32)
    np.testing.assert_array_equal(q(x, (None, c0))[0], q(x, (np.zeros_like(c0), c0))[0])
    cell = fastrnn.quantize(fastrnn.LSTMCell(4, 8, seed=0), "bfloat16", mode="weight_only")
    np.testing.assert_array_equal(cell(x[0], (None, c0[0]))[0],
                                  cell(x[0], (np.zeros_like(c0[0]), c0[0]))[0])


def test_int8_dynamic_carries_nan_and_inf_through_like_the_float_module():
    """int8 codes have no NaN: a NaN input had given finite outputs for its row."""
    m = fastrnn.LSTM(4, 8, seed=0).eval()
    q = fastrnn.quantize(m, "int8")                       # dynamic by default at this size
    x = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
    x[0, 0, 1] = np.nan
    y = q(x)[0]
    assert not np.isfinite(y[:, 0]).any() and np.isfinite(y[:, 1]).all()
    lin = fastrnn.quantize(fastrnn.nn.Linear(4, 3, rng=0), "int8")
    xs = np.ones((5, 4), np.float32)
    xs[2, 1] = np.inf
    out = lin(xs)
    assert not np.isfinite(out[2]).any() and np.isfinite(np.delete(out, 2, 0)).all()


@pytest.mark.parametrize("cell", CELLS)
def test_bf16_weight_only_keeps_float32_inputs_under_medium_precision(cell):
    """From BF16_FLOAT_MIN_BATCH rows bf16 weight-only runs a float32 twin module, which
    followed set_float32_matmul_precision("medium") and rounded its inputs to bf16
    (1.2e-3 off; found by an audit): it runs in full precision now."""
    from fastrnn import _precision
    m = getattr(fastrnn, cell)(64, 64, seed=0).eval()
    q = fastrnn.quantize(m, "bfloat16", "weight_only")
    x = np.random.default_rng(0).standard_normal((4, Q.BF16_FLOAT_MIN_BATCH, 64)) \
        .astype(np.float32)
    want = R.stack_forward(q, x, None, None, 0, 0)[0]
    before = fastrnn.get_float32_matmul_precision()
    fastrnn.set_float32_matmul_precision("medium")
    _precision._force_bf16 = True          # the bf16 path whatever the CPU
    try:
        y = q(x)[0]
    finally:
        _precision._force_bf16 = False
        fastrnn.set_float32_matmul_precision(before)
    np.testing.assert_allclose(y, want, atol=2e-6, rtol=0)


def test_int8_dynamic_nan_or_inf_arising_inside_is_not_finite_as_in_the_float_module(isa):
    """A NaN in c0 (which the up-front check of x and h0 does not see) and a ReLU RNN
    whose state overflows: the quantised rows holding NaN or inf had become finite
    (a NaN scale now, src/quant_gemm.h qg_row_scale); the twin gives the same."""
    rng = np.random.default_rng(0)
    m = fastrnn.LSTM(4, 8, seed=0).eval()
    q = fastrnn.quantize(m, "int8", "dynamic")
    x = rng.standard_normal((3, 2, 4)).astype(np.float32)
    h0 = np.zeros((1, 2, 8), np.float32)
    c0 = np.zeros((1, 2, 8), np.float32)
    c0[0, 0, 3] = np.nan
    want = np.isfinite(m(x, (h0, c0))[0])
    assert not want[1:, 0].any() and not want[0, 0].all() and want[:, 1].all()
    y = q(x, (h0, c0))[0]
    np.testing.assert_array_equal(np.isfinite(y), want)
    yr, _, _ = R.stack_forward(q, x, h0, c0, 1, 1)
    np.testing.assert_array_equal(np.isfinite(yr), want)

    r = fastrnn.RNN(3, 4, nonlinearity="relu", bias=False, seed=0).eval()
    r.weight_ih_l0.data[...] = 1.0
    r.weight_hh_l0.data[...] = 10.0 * np.eye(4, dtype=np.float32)
    x = np.ones((45, 1, 3), np.float32)
    with np.errstate(all="ignore"):
        want = np.isfinite(r(x)[0])
    assert want[0].all() and not want[-1].any()       # the state overflows part-way
    qr = fastrnn.quantize(r, "int8", "dynamic")
    y, h_n = qr(x)
    np.testing.assert_array_equal(np.isfinite(y), want)
    assert not np.isfinite(h_n).any()


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_int8_dynamic_with_inf_in_x_or_the_states_gives_the_float_modules_numbers(cell):
    """An inf in x saturates a gate: the float module's outputs stay finite. int8 codes
    cannot hold it, so such a call runs weight-only, as the float module (a NaN scale
    for the row had made it all NaN; a review of session 33's change)."""
    rng = np.random.default_rng(0)
    m = getattr(fastrnn, cell)(4, 8, seed=0).eval()
    q = fastrnn.quantize(m, "int8", "dynamic")
    x = rng.standard_normal((3, 2, 4)).astype(np.float32)
    x[0, 0, 1] = np.inf
    h0 = (0.5 * rng.standard_normal((1, 2, 8))).astype(np.float32)
    c0 = h0.copy()
    c0[0, 1, 2] = -np.inf
    hx = (h0, c0) if cell == "LSTM" else h0
    with np.errstate(all="ignore"):
        want = m(x, hx)[0]
    got = q(x, hx)[0]
    assert np.isfinite(want).all()          # one inf per row: a saturated gate, no NaN
    np.testing.assert_allclose(got, want, atol=5e-2)


def test_int8_dynamic_rows_of_tiny_values_count_as_zeros(isa):
    """127 / amax overflowed for rows below ~4e-37: every code became +-127 (kernel)
    or NaN (twin). Rows below 1e-30 now quantise to zeros in both."""
    lin = fastrnn.nn.Linear(4, 3, rng=0)
    q = fastrnn.quantize(lin, "int8", "dynamic")
    x = np.array([[1e-38, 0.0, -5e-39, 0.0], [1.0, 2.0, -3.0, 0.5]], np.float32)
    y = q(x)
    np.testing.assert_allclose(y[0], lin.bias.data, rtol=0, atol=0)
    np.testing.assert_allclose(y, R.linear_forward(q, x, 1), rtol=0, atol=2e-5)
    np.testing.assert_allclose(y[1], lin(x)[1], rtol=0, atol=5e-2)


@pytest.mark.parametrize("qdtype", ["bfloat16", "int8"])
def test_float_weights_are_not_loaded_into_integer_codes(qdtype):
    m = fastrnn.GRU(4, 8, seed=0).eval()
    q = fastrnn.quantize(m, qdtype)
    with pytest.raises(ValueError, match="float values for a quantised module's integer codes"):
        q.load_state_dict({k: p.data for k, p in m.named_parameters()}, strict=False)


def test_kernel_objects_initialise_once_and_refuse_to_run_uninitialised():
    """A second __init__ that failed half-way left new sizes over the old weights, and
    forward then read past them (a segfault; found by an audit)."""
    from fastrnn import _quantized
    w = np.zeros(1 * 4 * 64, np.uint8)                 # one float32 panel, K padded to 4
    lin = _quantized.Linear("float32", 4, 4, w, None, None, None)
    with pytest.raises(RuntimeError, match="already initialised"):
        lin.__init__("float32", 200000, 16, w, None, None, None)
    assert (lin.in_features, lin.out_features) == (4, 4)
    assert lin.forward(0, 0, np.ones((1, 4), np.float32), 1).shape == (1, 4)
    stack = fastrnn.quantize(fastrnn.GRU(3, 5, seed=0).eval(), "int8")._kernels()
    with pytest.raises(RuntimeError, match="already initialised"):
        stack.__init__("int8", "gru", 3, 5, 1, 1, [])
    x = np.ones((1, 1, 3), np.float32)
    for blank in (_quantized.Linear.__new__(_quantized.Linear),
                  _quantized.Stack.__new__(_quantized.Stack)):
        with pytest.raises(RuntimeError, match="not initialised"):
            if isinstance(blank, _quantized.Linear):
                blank.forward(0, 0, x[0], 1)
            else:
                blank.forward(0, 0, 0, x, None, None, None, None, None, None, 1, 1)


def test_stack_refuses_rows_that_would_race():
    """Stack.forward (internal; a StreamPool's step): two batch rows writing one state
    row, or a table given as h0 and hn whose rows are read for one batch row and
    written for another, are refused before the kernel runs (threads split the batch)."""
    m = fastrnn.LSTM(5, 8, seed=0)
    q = fastrnn.quantize(m, "int8")
    stack = q._kernels()
    x = np.zeros((1, 3, 5), np.float32)
    h = np.zeros((1, 6, 8), np.float32)
    c = np.zeros((1, 6, 8), np.float32)
    rows = lambda *r: np.array(r, np.intp)   # noqa: E731
    level = Q._level()
    with pytest.raises(ValueError, match="row 4 is written for two batch rows"):
        stack.forward(level, 0, 0, x, h, c, h.copy(), c.copy(), rows(0, 1, 2), rows(4, 3, 4),
                      6, 1)
    with pytest.raises(ValueError, match="batch row 1 reads 1, writes 5"):
        stack.forward(level, 0, 0, x, h, c, h, c, rows(0, 1, 2), rows(0, 5, 2), 6, 1)
    hn, cn = h.copy(), c.copy()
    stack.forward(level, 0, 0, x, h, c, hn, cn, rows(0, 1, 2), rows(5, 3, 4), 6, 2)
    stack.forward(level, 0, 0, x, h, c, h, c, rows(2, 0, 1), rows(2, 0, 1), 6, 2)


def test_quantisers_match_their_definitions_bitwise():
    """quantize_int8 and bf16_bits work in place in narrow types (session 37: 20-54 ms
    -> 8 ms and 30-60 -> 5 for two 2048 x 512 weights); their results are bitwise the
    definitions' in float64 / uint64: every float32 bit pattern family (random bits,
    signed NaNs with any payload, infinities, the largest finite values, subnormals)."""
    from fastrnn.quantization import bf16_bits, quantize_int8
    rng = np.random.default_rng(7)
    u = np.concatenate([rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32),
                        np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0xFFFF8000,
                                  0x7FFFFFFF, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF,
                                  0x00000001, 0x80000001, 0x3F808000, 0x3F818000], np.uint32)])
    wide = u.astype(np.uint64)
    rounded = ((wide + 0x7FFF + ((wide >> 16) & 1)) >> 16) & 0xFFFF
    nan = (wide & 0x7FFFFFFF) > 0x7F800000
    want = np.where(nan, (wide >> 16) | 0x40, rounded).astype(np.uint16)
    assert np.array_equal(bf16_bits(u.view(np.float32)), want)
    mixed = rng.standard_normal((64, 33)).astype(np.float32) * 0.05
    mixed[::3] = 0.0                    # zero rows, some of them -0.0 (a scale's sign bit)
    mixed[1::6] = -0.0
    for w in (mixed, rng.standard_normal((5, 7)) * 1e30,
              np.array([[3.4e38, -3.4e38, 0.0]], np.float32), np.zeros((40, 4), np.float32),
              -np.zeros((40, 4), np.float32)):
        w64 = w.astype(np.float64)
        scale = (np.abs(w64).max(axis=1) / 127.0).astype(np.float32)
        safe = np.where(scale > 0, scale, 1).astype(np.float64)
        q, s = quantize_int8(w)
        assert np.array_equal(s.view(np.uint32), scale.view(np.uint32))     # -0.0 != +0.0
        assert np.array_equal(q, np.clip(np.rint(w64 / safe[:, None]), -127, 127).astype(np.int8))
