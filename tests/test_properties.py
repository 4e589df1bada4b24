"""Differential property tests of fastrnn.functional against fastrnn.reference.

Hypothesis draws a cell (RNN tanh/relu/identity, GRU, LSTM), a dtype, shapes
(1 and odd sizes, batches on both sides of the packing, threading and
hidden-unit-split thresholds), lengths, direction, bias, initial states, the
memory layout of every argument (C order, Fortran order, negative strides,
strided views) and the thread count. Every valid draw runs forward and
backward through the compiled kernels and through the NumPy reference, and
outputs, final states and every gradient must agree (float64 rel. 1e-9,
float32 rel. 1e-4 of the largest magnitude, as tests/test_kernels.py); the
kernels must not write into their arguments. Draws with NaN/inf injected into
some batch rows must leave every other row exactly as the reference computes
it (rows are independent: a leak between rows is an indexing bug).

Invalid draws (one argument broken in one way) must raise ValueError or
TypeError whose message names the argument.

Profiles: see tests/conftest.py (``ci`` default, ``long`` for the big runs).
"""

import contextlib

import numpy as np
import pytest
from hypothesis import assume, given, note
from hypothesis import strategies as st

import fastrnn
from fastrnn import functional as F
from fastrnn import reference as R

pytestmark = pytest.mark.fuzz

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "rnn_identity": 1, "gru": 3, "lstm": 4}
TOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 1e-4}
LAYOUTS = ["C", "F", "neg", "view"]


# ----------------------------------------------------------------------------- helpers
def with_layout(arr, layout, axis=0):
    """An array equal to `arr` laid out in memory as `layout`."""
    if arr is None or layout == "C":
        return arr
    if layout == "F":
        return np.asfortranarray(arr)
    axis = axis % arr.ndim
    if layout == "neg":          # negative stride along `axis`
        return np.flip(np.flip(arr, axis).copy(), axis)
    shape = list(arr.shape)      # "view": every other element of a bigger buffer
    shape[axis] *= 2
    big = np.full(shape, 7.0, arr.dtype)
    sl = [slice(None)] * arr.ndim
    sl[axis] = slice(None, None, 2)
    big[tuple(sl)] = arr
    return big[tuple(sl)]


def rel_err(actual, expected):
    scale = max(float(np.abs(expected).max()) if expected.size else 0.0, 1e-30)
    return float(np.abs(actual.astype(np.float64) - expected).max()) / scale if expected.size \
        else 0.0


def assert_close(name, actual, expected, tol, rounding=0.0):
    """actual within `tol` (relative to the largest magnitude of `expected`) or within
    10x `rounding`, the relative error of a computation as accurate as the kernel's
    (reference_run)."""
    if expected is None:
        assert actual is None, f"{name}: expected None"
        return
    assert actual is not None, f"{name}: got None"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert np.isfinite(actual).all() == np.isfinite(expected).all(), f"{name}: finiteness"
    err = rel_err(actual, expected)
    assert err <= max(tol, 10 * rounding), \
        f"{name}: relative error {err:.3g} > {tol:g} (reference's own error {rounding:.3g})"


def as64(d):
    return {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
            for k, v in d.items()}


class _NumPyWithTanhOff:
    """numpy, but tanh moves each result by `ulps` units in the last place of
    `ulp_dtype` (None: the result's own), up or down at random (fastrnn.reference's
    sigmoid is built on tanh too)."""

    def __init__(self, rng, ulps, ulp_dtype=None):
        self._rng, self._ulps, self._ulp_dtype = rng, ulps, ulp_dtype

    def __getattr__(self, name):
        return getattr(np, name)

    def tanh(self, a):
        t = np.tanh(a)
        sign = self._rng.choice(np.array([-1.0, 1.0], t.dtype), size=np.shape(t))
        mag = np.abs(t) if self._ulp_dtype is None else np.abs(t).astype(self._ulp_dtype)
        return t + self._ulps * sign * np.spacing(mag).astype(t.dtype)


@contextlib.contextmanager
def reference_tanh_off_by(ulps, seed=0, ulp_dtype=None):
    """fastrnn.reference with its tanh (and sigmoid) results `ulps` ulps (of ulp_dtype)
    off."""
    saved_np, saved_act = R.np, R._RNN_ACTIVATIONS["tanh"]
    off = _NumPyWithTanhOff(np.random.default_rng(seed), ulps, ulp_dtype)
    R.np = off
    R._RNN_ACTIVATIONS["tanh"] = (off.tanh, saved_act[1])
    try:
        yield
    finally:
        R.np = saved_np
        R._RNN_ACTIVATIONS["tanh"] = saved_act


def reference_run(cell, dtype, a, g):
    """Reference outputs and gradients in float64, and how far from them a computation
    as accurate as the kernel's can be, relative. float32 draws: the float32
    reference's error (cancellation makes some entries, e.g. a 1-element dw_hh, much
    less accurate than 1e-4 of their magnitude in any float32 computation), or how far
    the float64 reference moves when its tanh and sigmoid move by 2 float32 ulps, if
    further. float64 draws: how far the reference moves when its tanh and sigmoid results move by 2 ulps
    (the kernels' are within a few ulps of NumPy's), which 1 - h^2 of a saturated h
    turns into a large relative change (the long profile found an rnn_tanh dw_hh at
    H=1, with h = -1 + 8.7e-15, 1.3e-2 from the reference: h one ulp apart)."""
    with np.errstate(all="ignore"):
        outs, cache = forward(R, cell, as64(a))
        grads = backward(R, cell, as64(g), cache)
        exact = outs + grads
        if dtype == np.float64:
            with reference_tanh_off_by(2):
                outs_off, cache_off = forward(R, cell, a)
                low = outs_off + backward(R, cell, g, cache_off)
        else:
            outs32, cache32 = forward(R, cell, a)
            low = outs32 + backward(R, cell, g, cache32)
            # and the float64 reference with its activations 2 float32 ulps off: the
            # float32 reference's own error is one summation order's, which can be lucky
            # where terms cancel (the long profile: a GRU H=1 dh0 of 2.2e-5 from terms of
            # about 1, the kernel 0.8 % off it in float32, the float32 reference 0.008 %)
            with reference_tanh_off_by(2, ulp_dtype=np.float32):
                outs_off, cache_off = forward(R, cell, as64(a))
                off = outs_off + backward(R, cell, as64(g), cache_off)
    errs = [0.0 if e is None else rel_err(lo, e) for lo, e in zip(low, exact)]
    if dtype != np.float64:
        errs = [max(err, 0.0 if e is None else rel_err(o, e))
                for err, o, e in zip(errs, off, exact)]
    return exact, errs


@contextlib.contextmanager
def num_threads(n):
    old = fastrnn.get_num_threads()
    fastrnn.set_num_threads(n)
    try:
        yield
    finally:
        fastrnn.set_num_threads(old)


def forward(module, cell, a, training=True):
    kw = dict(lengths=a["lengths"], reverse=a["reverse"], training=training)
    if cell == "lstm":
        y, h, c, cache = module.lstm_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"],
                                             a["b_ih"], a["b_hh"], **kw)
        return [y, h, c], cache
    if cell == "gru":
        y, h, cache = module.gru_forward(a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"],
                                         a["b_hh"], **kw)
        return [y, h], cache
    y, h, cache = module.rnn_forward(a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"],
                                     a["b_hh"], cell[4:], **kw)
    return [y, h], cache


def backward(module, cell, g, cache):
    if cell == "lstm":
        return list(module.lstm_backward(g["dy"], g["dh_n"], g["dc_n"], cache))
    if cell == "gru":
        return list(module.gru_backward(g["dy"], g["dh_n"], cache))
    return list(module.rnn_backward(g["dy"], g["dh_n"], cache))


OUT_NAMES = {"lstm": ["y", "h_n", "c_n"]}
GRAD_NAMES = {"lstm": ["dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh"]}


def out_names(cell):
    return OUT_NAMES.get(cell, ["y", "h_n"])


def grad_names(cell):
    return GRAD_NAMES.get(cell, ["dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"])


# ----------------------------------------------------------------------------- strategies
# sizes: mostly small (the reference is slow), sometimes across the thresholds of
# functional.py: packing (B >= 4, T*B >= 8), row split, unit split (B <= 24, T >= 16)
small = st.integers(1, 9)
sizes = st.one_of(small, st.integers(10, 40))


@st.composite
def kernel_cases(draw, nonfinite=False):
    cell = draw(st.sampled_from(sorted(GATES)))
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    T = draw(st.one_of(st.integers(1, 6), st.integers(7, 20)))
    B = draw(st.one_of(st.integers(1, 5), st.integers(6, 33)))
    I, H = draw(sizes), draw(sizes)
    G = GATES[cell]
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(H)

    def normal(*shape, s=1.0):
        return (rng.standard_normal(shape) * s).astype(dtype)

    a = {
        "x": normal(T, B, I),
        "h0": normal(B, H, s=0.5) if draw(st.booleans()) else None,
        "c0": normal(B, H, s=0.5) if cell == "lstm" and draw(st.booleans()) else None,
        "w_ih": normal(G * H, I, s=scale), "w_hh": normal(G * H, H, s=scale),
        "b_ih": normal(G * H, s=0.3) if bias else None,
        "b_hh": normal(G * H, s=0.3) if bias else None,
        "lengths": None, "reverse": draw(st.booleans()),
    }
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
        a["lengths"] = draw(st.sampled_from([np.array(lengths), lengths,
                                             np.array(lengths, np.int32)]))
    g = {"dy": normal(T, B, H),
         "dh_n": normal(B, H) if draw(st.booleans()) else None,
         "dc_n": normal(B, H) if cell == "lstm" and draw(st.booleans()) else None}
    bad_rows = []
    if nonfinite:
        bad_rows = sorted(draw(st.sets(st.integers(0, B - 1), min_size=1, max_size=B)))
        for b in bad_rows:
            value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            where = draw(st.sampled_from(["x", "h0", "c0"] if cell == "lstm" else ["x", "h0"]))
            if where == "x" or a[where] is None:
                t = draw(st.integers(0, T - 1))
                a["x"][t, b, draw(st.integers(0, I - 1))] = value
            else:
                a[where][b, draw(st.integers(0, H - 1))] = value
    layouts = {k: draw(st.sampled_from(LAYOUTS))
               for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "dy", "dh_n", "dc_n")}
    layouts["b_hh"] = layouts["b_ih"]
    axes = {k: draw(st.integers(0, 2)) for k in layouts}
    threads = draw(st.sampled_from([1, 2]))
    note(f"cell={cell} dtype={dtype} T={T} B={B} I={I} H={H} bias={bias} "
         f"reverse={a['reverse']} lengths={a['lengths']} layouts={layouts} threads={threads} "
         f"bad_rows={bad_rows}")
    return cell, dtype, a, g, layouts, axes, threads, bad_rows


def laid_out(d, layouts, axes):
    return {k: (with_layout(v, layouts[k], axes[k]) if k in layouts and isinstance(v, np.ndarray)
                else v) for k, v in d.items()}


# ----------------------------------------------------------------------------- valid draws
@given(kernel_cases())
def test_kernels_match_reference(case):
    cell, dtype, a, g, layouts, axes, threads, _ = case
    tol = TOL[dtype]
    ka, kg = laid_out(a, layouts, axes), laid_out(g, layouts, axes)
    before = {k: v.copy() for k, v in {**ka, **kg}.items() if isinstance(v, np.ndarray)}
    with num_threads(threads):
        outs, cache = forward(F, cell, ka)
        grads = backward(F, cell, kg, cache)
    for k, v in before.items():   # the kernels never write into their arguments
        assert np.array_equal({**ka, **kg}[k], v, equal_nan=True), f"{k} was modified"
    for got in outs + grads:
        assert got is None or got.dtype == dtype
    exact, rounding = reference_run(cell, dtype, a, g)
    for name, got, want, r in zip(out_names(cell) + grad_names(cell), outs + grads, exact,
                                  rounding):
        assert_close(name, got, want, tol, r)


@given(kernel_cases())
def test_inference_equals_training_forward_and_threads_agree(case):
    """training=False gives bitwise the training outputs; 1 and 2 threads agree bitwise."""
    cell, dtype, a, g, layouts, axes, threads, _ = case
    ka = laid_out(a, layouts, axes)
    with num_threads(1):
        one, _ = forward(F, cell, ka, training=True)
    with num_threads(2):
        two, cache = forward(F, cell, ka, training=False)
    assert cache is None
    for name, x1, x2 in zip(out_names(cell), one, two):
        assert np.array_equal(x1, x2, equal_nan=True), f"{name} differs between modes/threads"


@given(kernel_cases(nonfinite=True))
def test_nonfinite_rows_stay_in_their_rows(case):
    """NaN/inf in some batch rows: no crash, and every other row equals the reference."""
    cell, dtype, a, g, layouts, axes, threads, bad_rows = case
    tol = TOL[dtype]
    ka, kg = laid_out(a, layouts, axes), laid_out(g, layouts, axes)
    with num_threads(threads), np.errstate(all="ignore"):   # NaN in NumPy's parts too
        outs, cache = forward(F, cell, ka)
        grads = backward(F, cell, kg, cache)
    B = a["x"].shape[1]
    good = np.setdiff1d(np.arange(B), bad_rows)
    rows = lambda arr: np.take(arr, good, 1 if arr.ndim == 3 else 0)  # noqa: E731
    clean = {k: (rows(v) if isinstance(v, np.ndarray) and k in ("x", "h0", "c0", "dy", "dh_n",
                                                                "dc_n") else v)
             for k, v in {**a, **g}.items()}
    if a["lengths"] is not None:
        clean["lengths"] = np.asarray(a["lengths"])[good]
    # the good rows alone, through the reference: what the good rows must be
    if len(good):
        exact, rounding = reference_run(cell, dtype, clean, clean)
        # dx, dh0 (and dc0) are per row; weight gradients mix all rows
        per_row = len(out_names(cell)) + (3 if cell == "lstm" else 2)
        names = out_names(cell) + grad_names(cell)
        for name, got, want, r in list(zip(names, outs + grads, exact, rounding))[:per_row]:
            assert_close(name, rows(got), want, tol, r)


# ----------------------------------------------------------------------------- invalid draws
ARRAY_ARGS = {"x": 3, "h0": 2, "c0": 2, "w_ih": 2, "w_hh": 2, "b_ih": 1, "b_hh": 1}


@st.composite
def invalid_forward_cases(draw):
    cell = draw(st.sampled_from(sorted(GATES)))
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    T, B, I, H = draw(small), draw(small), draw(small), draw(small)
    G = GATES[cell]
    z = lambda *s: np.full(s, 0.25, dtype)  # noqa: E731
    a = {"x": z(T, B, I), "h0": z(B, H), "c0": z(B, H) if cell == "lstm" else None,
         "w_ih": z(G * H, I), "w_hh": z(G * H, H), "b_ih": z(G * H), "b_hh": z(G * H),
         "lengths": None, "reverse": False}
    names = [k for k in ARRAY_ARGS if a[k] is not None] + ["lengths"]
    name = draw(st.sampled_from(names))
    if name == "lengths":
        kind = draw(st.sampled_from(["too_small", "too_big", "count", "float", "bool", "2d"]))
        base = [1] * B
        if kind == "too_small":
            base[draw(st.integers(0, B - 1))] = draw(st.integers(-5, 0))
            exc = ValueError
        elif kind == "too_big":
            base[draw(st.integers(0, B - 1))] = T + draw(st.integers(1, 5))
            exc = ValueError
        elif kind == "count":
            base = [1] * draw(st.integers(0, B + 3).filter(lambda n: n != B))
            exc = ValueError if base else (ValueError, TypeError)   # [] is a float array
        elif kind == "float":
            base = np.full(B, 1.5)
            exc = TypeError
        elif kind == "bool":
            base = np.ones(B, bool)
            exc = TypeError
        else:
            base = np.ones((B, 1), np.intp)
            exc = ValueError
        a["lengths"] = base
        return cell, a, name, exc, kind
    kind = draw(st.sampled_from(["dtype_int", "dtype_other", "dtype_mixed", "ndim", "shape",
                                 "none", "list"]))
    arr = a[name]
    if kind == "dtype_int":
        a[name] = arr.astype(draw(st.sampled_from([np.int64, np.int32, np.uint8, bool])))
        exc = TypeError
    elif kind == "dtype_other":
        a[name] = arr.astype(draw(st.sampled_from([np.float16, np.complex64, object])))
        exc = TypeError
    elif kind == "dtype_mixed":
        if name == "x":   # x sets the dtype: break every other array instead
            other = np.float64 if dtype == np.float32 else np.float32
            a["x"] = arr.astype(other)
        else:
            a[name] = arr.astype(np.float64 if dtype == np.float32 else np.float32)
        exc = TypeError
        if name == "x":
            name = "w_ih"   # the first array checked against x's dtype
    elif kind == "ndim":
        nd = draw(st.sampled_from([n for n in range(0, 5) if n != arr.ndim]))
        a[name] = np.full((2,) * nd, 0.25, dtype) if nd else dtype.type(0.25)
        exc = ValueError
    elif kind == "shape":
        axis = draw(st.integers(0, arr.ndim - 1))
        shape = list(arr.shape)
        shape[axis] = draw(st.integers(0, 12).filter(lambda n: n != arr.shape[axis]))
        if name == "x" and axis == 0 and shape[0] > 0:
            assume(False)            # another T is a valid call
        a[name] = np.full(shape, 0.25, dtype)
        exc = ValueError
    elif kind == "none":
        if name in ("h0", "c0"):
            assume(False)            # None is a valid initial state
        a[name] = None
        exc = TypeError if name in ("x", "w_ih", "w_hh") else ValueError
    else:   # a nested list is accepted like an array: only an int list is wrong
        a[name] = np.asarray(arr, dtype=np.int64).tolist()
        exc = TypeError
    return cell, a, name, exc, kind


@given(invalid_forward_cases())
def test_invalid_forward_raises_named_error(case):
    cell, a, name, exc, kind = case
    note(f"cell={cell} broken={name} kind={kind}")
    with pytest.raises((ValueError, TypeError)) as info:
        forward(F, cell, a)
    msg = str(info.value)
    # w_ih and w_hh define I and H: a wrong size in one may be reported against the
    # array it must match (x's B against h0 too); the message names one of them
    related = {"w_ih": ["w_hh", "x"], "w_hh": ["w_ih"], "x": ["w_ih", "h0"], "h0": [], "c0": [],
               "b_ih": ["b_hh"], "b_hh": ["b_ih"], "lengths": []}
    assert any(n in msg for n in [name] + related[name]), f"{name!r} not named in {msg!r}"
    assert isinstance(info.value, exc), f"expected {exc}, got {info.value!r}"


@st.composite
def invalid_backward_cases(draw):
    cell = draw(st.sampled_from(sorted(GATES)))
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    T, B, I, H = draw(small), draw(small), draw(small), draw(small)
    G = GATES[cell]
    z = lambda *s: np.full(s, 0.25, dtype)  # noqa: E731
    a = {"x": z(T, B, I), "h0": None, "c0": None, "w_ih": z(G * H, I), "w_hh": z(G * H, H),
         "b_ih": None, "b_hh": None, "lengths": None, "reverse": draw(st.booleans())}
    g = {"dy": z(T, B, H), "dh_n": None, "dc_n": None}
    names = ["dy", "dh_n"] + (["dc_n"] if cell == "lstm" else [])
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["shape", "dtype", "ndim"]))
    ref = g[name] if g[name] is not None else z(B, H)
    if kind == "shape":
        shape = list(ref.shape)
        axis = draw(st.integers(0, len(shape) - 1))
        shape[axis] = draw(st.integers(0, 12).filter(lambda n: n != ref.shape[axis]))
        g[name] = np.zeros(shape, dtype)
    elif kind == "dtype":
        g[name] = ref.astype(draw(st.sampled_from(
            [np.int64, np.float16, np.float64 if dtype == np.float32 else np.float32])))
    else:
        g[name] = np.zeros((2,) * draw(st.sampled_from([1, 4])), dtype)
    return cell, a, g, name, kind


@given(invalid_backward_cases())
def test_invalid_backward_raises_named_error_and_keeps_cache(case):
    cell, a, g, name, kind = case
    _, cache = forward(F, cell, a)
    with pytest.raises((ValueError, TypeError)) as info:
        backward(F, cell, g, cache)
    assert name in str(info.value), f"{name!r} not named in {info.value}"
    # a rejected call consumes nothing; a second backward on a used cache is refused
    good = {"dy": np.zeros_like(a["x"][:, :, :1].repeat(a["w_hh"].shape[1], 2)),
            "dh_n": None, "dc_n": None}
    backward(F, cell, good, cache)
    with pytest.raises(RuntimeError, match="already used"):
        backward(F, cell, good, cache)
