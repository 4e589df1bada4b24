"""Property tests of the eval fast path (fastrnn/_fastpath.py, src/forward_small.pxi).

An eval call of a float layer or cell that qualifies runs its own C driver (plans kept
per module, thread teams splitting rows or hidden units, segments a waking worker joins
part-way, rows sorted by length, the directions one after the other). Example tests in
tests/test_fastpath.py pin chosen shapes; here hypothesis draws the module (every cell,
stacked, bidirectional with either merge mode, LSTM proj_size, bias or not, batch_first),
the sizes (on both sides of the team and hidden-unit-split thresholds), lengths, initial
states, frozen weights and the thread count, and every call must be

* served by the fast path (it qualifies; a GRU with reset_after=False only where the
  general path runs it on one thread),
* bitwise the general path's result (fastrnn.functional: the fast path declines), and
* within the usual tolerance of the same module run on fastrnn.reference;

then the weights change in place and the next call must see it (the packed copies are
cached by the weights' digest).
"""

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import fastrnn
from fastrnn.modules import cells as cells_mod
from fastrnn.modules import rnn as rnn_mod

from test_fastpath import counting_served_calls, flat, general, took_fast_path
from test_properties import num_threads
from test_properties_modules import close, layer_cases, on_reference

pytestmark = pytest.mark.fuzz


def assert_bitwise(name, got, want):
    got, want = flat(got), flat(want)
    assert len(got) == len(want), name
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{name} {k}: {a.shape} {b.shape}"
        assert np.array_equal(a, b, equal_nan=True), \
            f"{name} {k}: fast path differs from the general path by {np.abs(a - b).max():.3g}"


def sizes(small, large):
    """Mostly small, sometimes past the thresholds where teams form and units split."""
    return st.one_of(st.integers(1, small), st.integers(small + 1, large))


@st.composite
def layer_calls(draw):
    m, x, hx, lengths, *_ = draw(layer_cases(T=sizes(6, 48), B=sizes(8, 40), I=sizes(12, 48),
                                             H=sizes(16, 96).map(lambda h: max(h, 2)),
                                             layers=st.integers(1, 2)))
    m.eval()
    if draw(st.booleans()):
        m.freeze()
    if lengths is not None and draw(st.booleans()):
        lengths = sorted(lengths, reverse=True)   # what packed batches look like
    threads = draw(st.sampled_from([1, 2]))
    note(f"frozen={m.is_frozen()} threads={threads} lengths={lengths}")
    return m, x, hx, lengths, threads


def general_and_threads(m, *args, **kwargs):
    """general(m, ...) and the thread count of every driver call it made."""
    from fastrnn import _recurrent
    forward, threads = _recurrent.forward, []

    def spy(*a, **k):
        threads.append(a[21])
        return forward(*a, **k)
    _recurrent.forward = spy
    try:
        return general(m, *args, **kwargs), threads
    finally:
        _recurrent.forward = forward


def check_served(m, served, general_threads):
    """Every qualifying call is served, except a reset-before GRU's that the general
    path runs on a thread team (src/forward_small.pxi runs that cell on one thread
    only): served exactly when every driver call of the general path had one thread."""
    want = getattr(m, "reset_after", True) or all(n == 1 for n in general_threads)
    assert served == want, (f"the fast path {'served' if served else 'did not serve'} "
                            f"the call (general path's threads: {general_threads})")


def reference(m, *args, **kwargs):
    """The module's result on fastrnn.reference (the general path's kernels swapped)."""
    with on_reference(cells_mod if isinstance(m, cells_mod._CellBase) else rnn_mod):
        return general(m, *args, **kwargs)


@given(layer_calls())
def test_layer_eval_fast_path_is_the_general_path_and_the_reference(case):
    m, x, hx, lengths, threads = case
    for change in (False, True):
        if change:   # in place: the same arrays, new values (the packed copies are cached)
            if m.is_frozen():
                m.unfreeze()
            for p in m.parameters():
                p.data *= 0.75
        with num_threads(threads), counting_served_calls():
            fast = m(x, hx, lengths=lengths)
            was_served = took_fast_path(m)
            want, used = general_and_threads(m, x, hx, lengths=lengths)
            check_served(m, was_served, used)
            assert_bitwise(f"layer (weights changed: {change})", fast, want)
        for k, (a, b) in enumerate(zip(flat(fast), flat(reference(m, x, hx, lengths=lengths)))):
            close(f"layer output {k} (weights changed: {change})", a, b, m.dtype)


@st.composite
def cell_calls(draw):
    kind = draw(st.sampled_from(["RNNCell", "LSTMCell", "GRUCell", "GRUCell_rb"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    I, H = draw(sizes(12, 64)), draw(sizes(16, 128))
    kw = dict(bias=draw(st.booleans()), dtype=dtype, seed=draw(st.integers(0, 1000)))
    if kind == "RNNCell":
        kw["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    if kind == "GRUCell_rb":
        kind, kw["reset_after"] = "GRUCell", False
    m = getattr(fastrnn, kind)(I, H, **kw).eval()
    if draw(st.booleans()):
        m.freeze()
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batched = draw(st.booleans())
    B = draw(sizes(4, 24))
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
    with num_threads(threads), counting_served_calls():
        fast = m(x, hx)
        was_served = took_fast_path(m)
        want, used = general_and_threads(m, x, hx)
        check_served(m, was_served, used)
        assert_bitwise("cell", fast, want)
    for k, (a, b) in enumerate(zip(flat(fast), flat(reference(m, x, hx)))):
        close(f"cell output {k}", a, b, m.dtype)


# ----------------------------------------------------------------------------- quantised
@st.composite
def quantised_calls(draw):
    from fastrnn import quantization as Q
    cell = draw(st.sampled_from(["LSTM", "GRU", "RNN", "RNN_RELU"]))
    qdtype, mode = draw(st.sampled_from([("int8", "auto"), ("int8", "weight_only"),
                                         ("int8", "dynamic"), ("bfloat16", "auto"),
                                         ("bfloat16", "weight_only"),
                                         ("bfloat16", "dynamic"), ("float32", "auto")]))
    isa = draw(st.sampled_from(Q.available_isas()))
    T, B = draw(sizes(5, 24)), draw(sizes(6, 40))
    I, H = draw(sizes(12, 80)), draw(sizes(16, 96))
    kw = {"nonlinearity": "relu"} if cell == "RNN_RELU" else {}
    cell = cell[:3] if cell == "RNN_RELU" else cell
    m = getattr(fastrnn, cell)(I, H, num_layers=draw(st.integers(1, 2)),
                               bidirectional=draw(st.booleans()), bias=draw(st.booleans()),
                               seed=draw(st.integers(0, 1000)), **kw).eval()
    q = fastrnn.quantize(m, qdtype, mode)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    LD = m.num_layers * m.num_directions
    h0 = (0.5 * rng.standard_normal((LD, B, H))).astype(np.float32)
    c0 = (0.5 * rng.standard_normal((LD, B, H))).astype(np.float32)
    if draw(st.booleans()):
        h0 = c0 = None                 # zeros
    threads = draw(st.sampled_from([1, 2]))
    note(f"{m!r} {qdtype}/{mode} isa={isa} T={T} B={B} threads={threads}")
    return q, cell, isa, x, h0, c0, threads


@given(quantised_calls())
def test_quantised_stacks_match_their_twin(case):
    """Any shape, ISA, mode and thread count: fastrnn.quant_reference's numbers, to
    2e-6 where only float32 sums run in another order.

    Where activations are quantised on the fly (h_{t-1} at every step; a layer's input
    from the second layer on), the kernel's and the twin's float32 h differ in their
    last bits (gate functions), and a value on a rounding boundary goes to neighbouring
    codes: one bf16 step (2^-8 relative) or one int8 step (max |h| / 127) in one product,
    which then carries on through the steps and layers after it (the long profile found
    an int8 GRU at 1.1e-3 and a two-layer bf16 RNN at 3.8e-3). There the first step of
    a one-layer stack, which rounds only the caller's x and h0 (the same codes on both
    sides), is held to 2e-6, and the rest to 2e-2 of the outputs' scale, five times the
    largest such drift seen: an indexing bug moves outputs by far more."""
    from fastrnn import quant_reference as QR
    from fastrnn import quantization as Q
    q, cell, isa, x, h0, c0, threads = case
    T, B = x.shape[:2]
    H = q.hidden_size
    Q.set_isa(isa)
    try:
        with num_threads(threads):
            out, state = q(x, None if h0 is None else (h0, c0) if cell == "LSTM" else h0)
        dyn_ih, dyn_hh = q._dyn(T * B), q._dyn(B)
        y, hr, cr = QR.stack_forward(q, x, h0, c0 if cell == "LSTM" else None, dyn_ih, dyn_hh)
    finally:
        Q.set_isa(None)
    h_n = state[0] if cell == "LSTM" else state
    got, want = [out, h_n], [y, hr]
    if cell == "LSTM":
        got.append(state[1])
        want.append(cr)
    on_the_fly = dyn_hh or (dyn_ih and q.num_layers > 1)
    if on_the_fly and q.num_layers == 1:
        np.testing.assert_allclose(out[0, :, :H], y[0, :, :H], atol=2e-6, rtol=0)
        if q.bidirectional:
            np.testing.assert_allclose(out[-1, :, H:], y[-1, :, H:], atol=2e-6, rtol=0)
    # float32 sums in another order alone: 4e-6 of the outputs' scale (the long profile
    # found 2.04e-6 at an int8 weight-only RNN(78, 3), T=4, B=31: 78 products a sum)
    tol = 2e-2 if on_the_fly else 4e-6
    for k, (a, b) in enumerate(zip(got, want)):
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, atol=tol * scale, rtol=0, err_msg=f"output {k}")
