"""Property tests of the eval fast path (fastrnn/_fastpath.py, src/forward_small.pxi).

An eval call of a float layer or cell that qualifies runs its own C driver (plans kept
per module, thread teams splitting rows or hidden units, segments a waking worker joins
part-way, rows sorted by length, the directions one after the other). Example tests in
tests/test_fastpath.py pin chosen shapes; here hypothesis draws the module (every cell,
stacked, bidirectional with either merge mode, LSTM proj_size, bias or not, batch_first),
the sizes (on both sides of the team and hidden-unit-split thresholds), lengths, initial
states, frozen weights and the thread count, and every call must be

* bitwise the general path's result (fastrnn.functional: the fast path declines), and
* within the usual tolerance of the same module run on fastrnn.reference;

then the weights change in place and the next call must see it (the packed copies are
cached by the weights' digest).
"""

import contextlib

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import fastrnn
from fastrnn import _fastpath
from fastrnn import reference as R
from fastrnn.modules import cells as cells_mod
from fastrnn.modules import rnn as rnn_mod

from test_properties import num_threads
from test_properties_modules import close, on_reference

pytestmark = pytest.mark.fuzz

@contextlib.contextmanager
def fast_path_declines():
    """The fast path's entries all decline: eval calls take fastrnn.functional."""
    saved = _fastpath.eval_call, _fastpath.layer_forward, _fastpath.cell_forward
    _fastpath.eval_call = _fastpath.layer_forward = _fastpath.cell_forward = \
        lambda *a, **k: None
    try:
        yield
    finally:
        _fastpath.eval_call, _fastpath.layer_forward, _fastpath.cell_forward = saved


def flat(out):
    if isinstance(out, tuple):
        return [a for o in out for a in flat(o)]
    return [out]


def assert_bitwise(name, got, want):
    got, want = flat(got), flat(want)
    assert len(got) == len(want), name
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{name} {k}: {a.shape} {b.shape}"
        assert np.array_equal(a, b, equal_nan=True), \
            f"{name} {k}: fast path differs from the general path by {np.abs(a - b).max():.3g}"


def sizes(draw, small, large):
    """Mostly small, sometimes past the thresholds where teams form and units split."""
    return draw(st.one_of(st.integers(1, small), st.integers(small + 1, large)))


@st.composite
def layer_calls(draw):
    mode = draw(st.sampled_from(["RNN_TANH", "RNN_RELU", "GRU", "LSTM", "LSTMP"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    T, B = sizes(draw, 6, 48), sizes(draw, 8, 40)
    I, H = sizes(draw, 12, 48), max(2, sizes(draw, 16, 96))
    kw = dict(num_layers=draw(st.integers(1, 2)), bias=draw(st.booleans()),
              batch_first=draw(st.booleans()), bidirectional=draw(st.booleans()),
              dtype=dtype, seed=draw(st.integers(0, 1000)))
    if kw["bidirectional"] and draw(st.booleans()):
        kw["merge_mode"] = "sum"
    if mode.startswith("RNN"):
        m = fastrnn.RNN(I, H, nonlinearity=mode[4:].lower(), **kw)
    elif mode == "GRU":
        m = fastrnn.GRU(I, H, **kw)
    else:
        if mode == "LSTMP":
            kw["proj_size"] = draw(st.integers(1, H - 1))
        m = fastrnn.LSTM(I, H, **kw)
    m.eval()
    if draw(st.booleans()):
        m.freeze()
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((B, T, I) if kw["batch_first"] else (T, B, I)).astype(dtype)
    LD = m.num_layers * m.num_directions
    hx = None
    if draw(st.booleans()):
        h0 = (0.5 * rng.standard_normal((LD, B, m.out_hidden_size))).astype(dtype)
        hx = (h0, (0.5 * rng.standard_normal((LD, B, H))).astype(dtype)) \
            if m.mode == "LSTM" else h0
    lengths = None
    if draw(st.booleans()):
        lengths = [int(n) for n in rng.integers(1, T + 1, B)]
        if draw(st.booleans()):   # sorted longest first: what packed batches look like
            lengths.sort(reverse=True)
    threads = draw(st.sampled_from([1, 2]))
    note(f"{m!r} T={T} B={B} lengths={lengths} hx={hx is not None} "
         f"frozen={m.is_frozen()} threads={threads}")
    return m, x, hx, lengths, threads


@given(layer_calls())
def test_layer_eval_fast_path_is_the_general_path_and_the_reference(case):
    m, x, hx, lengths, threads = case
    with num_threads(threads):
        fast = m(x, hx, lengths=lengths)
        with fast_path_declines():
            general = m(x, hx, lengths=lengths)
    assert_bitwise("layer", fast, general)
    with fast_path_declines(), on_reference(rnn_mod):
        ref = m(x, hx, lengths=lengths)
    for k, (a, b) in enumerate(zip(flat(fast), flat(ref))):
        close(f"layer output {k}", a, b, m.dtype)

    if m.is_frozen():
        m.unfreeze()
    for p in m.parameters():   # in place: the same arrays, new values
        p.data *= 0.75
    with num_threads(threads):
        again = m(x, hx, lengths=lengths)
        with fast_path_declines():
            general = m(x, hx, lengths=lengths)
    assert_bitwise("layer after an in-place weight change", again, general)
    with fast_path_declines(), on_reference(rnn_mod):
        ref = m(x, hx, lengths=lengths)
    for k, (a, b) in enumerate(zip(flat(again), flat(ref))):
        close(f"layer output {k} after an in-place weight change", a, b, m.dtype)


@st.composite
def cell_calls(draw):
    kind = draw(st.sampled_from(["RNNCell", "LSTMCell", "GRUCell"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    I, H = sizes(draw, 12, 64), max(1, sizes(draw, 16, 128))
    kw = dict(bias=draw(st.booleans()), dtype=dtype, seed=draw(st.integers(0, 1000)))
    if kind == "RNNCell":
        kw["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    m = getattr(fastrnn, kind)(I, H, **kw).eval()
    if draw(st.booleans()):
        m.freeze()
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batched = draw(st.booleans())
    B = sizes(draw, 4, 24)
    lead = (B,) if batched else ()
    x = rng.standard_normal(lead + (I,)).astype(dtype)
    hx = None
    if draw(st.booleans()):
        h = (0.5 * rng.standard_normal(lead + (H,))).astype(dtype)
        hx = (h, (0.5 * rng.standard_normal(lead + (H,))).astype(dtype)) \
            if kind == "LSTMCell" else h
    threads = draw(st.sampled_from([1, 2]))
    note(f"{m!r} batch={lead} hx={hx is not None} frozen={m.is_frozen()} threads={threads}")
    return m, x, hx, threads


@given(cell_calls())
def test_cell_eval_fast_path_is_the_general_path_and_the_reference(case):
    m, x, hx, threads = case
    with num_threads(threads):
        fast = m(x, hx)
        with fast_path_declines():
            general = m(x, hx)
    assert_bitwise("cell", fast, general)
    with fast_path_declines(), on_reference(cells_mod):
        ref = m(x, hx)
    for k, (a, b) in enumerate(zip(flat(fast), flat(ref))):
        close(f"cell output {k}", a, b, m.dtype)


# ----------------------------------------------------------------------------- quantised
@st.composite
def quantised_calls(draw):
    from fastrnn import quantization as Q
    cell = draw(st.sampled_from(["LSTM", "GRU", "RNN"]))
    qdtype, mode = draw(st.sampled_from([("int8", "auto"), ("int8", "weight_only"),
                                         ("int8", "dynamic"), ("bfloat16", "auto"),
                                         ("bfloat16", "weight_only"),
                                         ("bfloat16", "dynamic"), ("float32", "auto")]))
    isa = draw(st.sampled_from(Q.available_isas()))
    T, B = sizes(draw, 5, 24), sizes(draw, 6, 40)
    I, H = sizes(draw, 12, 80), sizes(draw, 16, 96)
    m = getattr(fastrnn, cell)(I, H, num_layers=draw(st.integers(1, 2)),
                               bidirectional=draw(st.booleans()), bias=draw(st.booleans()),
                               seed=draw(st.integers(0, 1000))).eval()
    q = fastrnn.quantize(m, qdtype, mode)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    LD = m.num_layers * m.num_directions
    h0 = (0.5 * rng.standard_normal((LD, B, H))).astype(np.float32)
    c0 = (0.5 * rng.standard_normal((LD, B, H))).astype(np.float32)
    threads = draw(st.sampled_from([1, 2]))
    note(f"{m!r} {qdtype}/{mode} isa={isa} T={T} B={B} threads={threads}")
    return q, cell, isa, x, h0, c0, threads


@given(quantised_calls())
def test_quantised_stacks_match_their_twin(case):
    """Any shape, ISA, mode and thread count: fastrnn.quant_reference's numbers, to
    2e-6 where only float32 sums run in another order. Where activations are quantised
    on the fly (h_{t-1} at every step; a layer's input from the second layer on), the
    kernel's and the twin's float32 h differ in their last bits (gate functions), and a
    value that lies on a rounding boundary goes to neighbouring codes: one int8 step
    (max |h| / 127) or one bf16 step (2^-8 relative) in one product moves the next
    pre-activation by up to ~1e-3 for bf16 (tests/test_quantize.py's note) and
    max |h| / 127 * max |w| (~1.4e-3 at H=31) for int8, and a flip carries on through
    the steps after it: 3e-3 and 1e-2 there (the long profile found an int8 GRU at
    1.07e-3). An indexing bug moves outputs by far more."""
    from fastrnn import quant_reference as QR
    from fastrnn import quantization as Q
    q, cell, isa, x, h0, c0, threads = case
    T, B = x.shape[:2]
    Q.set_isa(isa)
    try:
        with num_threads(threads):
            out, state = q(x, (h0, c0) if cell == "LSTM" else h0)
        dyn_ih, dyn_hh = q._dyn(T * B), q._dyn(B)
        y, hr, cr = QR.stack_forward(q, x, h0, c0 if cell == "LSTM" else None, dyn_ih, dyn_hh)
    finally:
        Q.set_isa(None)
    on_the_fly = dyn_hh or (dyn_ih and q.num_layers > 1)
    tol = (1e-2 if q.qdtype == "int8" else 3e-3) if on_the_fly else 2e-6
    h_n = state[0] if cell == "LSTM" else state
    np.testing.assert_allclose(out, y, atol=tol * max(1.0, float(np.abs(y).max())), rtol=0)
    np.testing.assert_allclose(h_n, hr, atol=tol, rtol=0)
    if cell == "LSTM":
        np.testing.assert_allclose(state[1], cr, atol=2 * tol * max(1.0, float(np.abs(cr).max())),
                                   rtol=0)
