"""GRU(reset_after=False): the seed's GRU, the reset gate applied before the recurrent
product (n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)), in the layers and cells
against fastrnn.reference, inference and training in the kernels (CELL_GRU_RESET_BEFORE;
the reference's gradients test_reference.py holds to finite differences; test_keras.py and test_onnx.py hold the outputs to Keras's
reset_after=False and ONNX Runtime's linear_before_reset=0)."""

import zlib

import numpy as np
import pytest

import fastrnn
from fastrnn import _recurrent
from fastrnn import functional as F
from fastrnn import reference as ref
from test_isa import isa  # noqa: F401 (the fixture: every ISA this CPU has)

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}
REFERENCE_FORWARD = ref.gru_forward   # kept: tests of the kernel path refuse the reference


def _close(a, b, dtype):
    np.testing.assert_allclose(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T,B,I,H,lengths", [
    (6, 3, 4, 5, None), (6, 3, 4, 5, [6, 2, 4]), (1, 1, 3, 2, None), (5, 1, 7, 33, None)])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_the_reference_forward_and_every_gradient(dtype, T, B, I, H, lengths,
                                                                bias):
    g = fastrnn.GRU(I, H, bias=bias, dtype=dtype, seed=2, reset_after=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = rng.standard_normal((1, B, H)).astype(dtype)
    y, h_n = g(x, h0, lengths=lengths)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dh_n = rng.standard_normal(h_n.shape).astype(dtype)
    dx, dh0 = g.backward(dy, dh_n)

    b = (g.bias_ih_l0.data, g.bias_hh_l0.data) if bias else (None, None)
    ry, rh, cache = ref.gru_forward(x, h0[0], g.weight_ih_l0.data, g.weight_hh_l0.data, *b,
                                    lengths=lengths, reset_after=False)
    rdx, rdh0, rdw_ih, rdw_hh, rdb_ih, rdb_hh = ref.gru_backward(dy, dh_n[0], cache)
    _close(y, ry, dtype)
    _close(h_n[0], rh, dtype)
    _close(dx, rdx, dtype)
    _close(dh0[0], rdh0, dtype)
    _close(g.weight_ih_l0.grad, rdw_ih, dtype)
    _close(g.weight_hh_l0.grad, rdw_hh, dtype)
    if bias:
        _close(g.bias_ih_l0.grad, rdb_ih, dtype)
        _close(g.bias_hh_l0.grad, rdb_hh, dtype)
    # and it is not torch's form
    assert np.abs(ry - ref.gru_forward(x, h0[0], g.weight_ih_l0.data, g.weight_hh_l0.data, *b,
                                       lengths=lengths)[0]).max() > 1e-3


def test_cell_steps_as_the_layer():
    layer = fastrnn.GRU(4, 6, seed=1, reset_after=False, dtype=np.float64)
    cell = fastrnn.GRUCell(4, 6, reset_after=False, dtype=np.float64)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(cell, name).data[...] = getattr(layer, name + "_l0").data
    x = np.random.default_rng(5).standard_normal((3, 2, 4))
    y, _ = layer(x)
    h = None
    for t in range(3):
        h = cell(x[t], h)
        np.testing.assert_allclose(h, y[t], rtol=1e-13, atol=1e-14)
    dh = np.zeros_like(h)
    for t in reversed(range(3)):
        _, dh = cell.backward(dh + 1.0)
    layer.backward(np.ones_like(y))
    np.testing.assert_allclose(cell.weight_hh.grad, layer.weight_hh_l0.grad, rtol=1e-12)
    assert repr(cell) == "GRUCell(4, 6, dtype=float64, reset_after=False)"


def test_stacked_bidirectional_eval_equals_training_and_saves(tmp_path):
    g = fastrnn.GRU(3, 5, num_layers=2, bidirectional=True, batch_first=True, seed=0,
                    reset_after=False)
    x = np.random.default_rng(1).standard_normal((4, 6, 3)).astype(np.float32)
    y, h = g(x, lengths=[6, 1, 3, 6])
    g.eval()     # training keeps its gates: not necessarily the same bits as inference
    y2, h2 = g(x, lengths=[6, 1, 3, 6])
    np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h2, h, rtol=1e-5, atol=1e-6)
    fastrnn.save(tmp_path / "g.npz", g)
    back = fastrnn.load(tmp_path / "g.npz")
    assert back.reset_after is False and back.config() == g.config()
    assert np.array_equal(back(x, lengths=[6, 1, 3, 6])[0], y2)
    assert fastrnn.GRU(3, 5).config()["reset_after"] is True


def test_what_it_does_not_do_is_named():
    with pytest.raises(TypeError, match="reset_after: expected True or False"):
        fastrnn.GRU(3, 4, reset_after="no")
    g = fastrnn.GRU(3, 4, reset_after=False)
    with pytest.raises(ValueError, match="quantize.*reset_after=False"):
        fastrnn.quantize(g, "int8")
    with pytest.raises(ValueError, match="quantize.*reset_after=False"):
        fastrnn.quantize(fastrnn.GRUCell(3, 4, reset_after=False), "int8")
    with pytest.raises(ValueError, match="to_torch.*reset_after=False"):
        fastrnn.to_torch(g)
    with pytest.raises(ValueError, match="model: a stream pool.*reset_after=False"):
        fastrnn.StreamPool(g.eval(), 4)


def test_no_input_by_id_under_bf16_products(monkeypatch):
    """bf16 products run this cell on the reference's loop, which takes rows, not ids."""
    from fastrnn import _precision
    monkeypatch.setattr(_precision, "_force_bf16", True)      # bf16 on any CPU
    g = fastrnn.GRU(3, 4, reset_after=False)
    with _precision.scoped("medium"), pytest.raises(ValueError, match="x_ids: not with "
                                                    "reset_after=False under bf16"):
        F.gru_forward(np.zeros((5, 3), np.float32), None, g.weight_ih_l0.data,
                      g.weight_hh_l0.data, None, None, x_ids=np.zeros((2, 1), np.int64),
                      reset_after=False)


def test_language_model_keeps_its_seed_gru_through_save_onnx_and_training(tmp_path):
    """RNNLanguageModel(cell="gru", reset_after=False) saves and loads as itself (the
    setting was lost: a reloaded or Dask-shipped model ran torch's GRU on the same
    weights); an ONNX language model with linear_before_reset=0 imports as one and
    trains, its first layer reading the embeddings by id (which the reference path
    refused; test_ids_input.py holds that path to the gathered rows')."""
    lm = fastrnn.RNNLanguageModel(11, embed_size=4, hidden_size=6, cell="gru", seed=0,
                                  reset_after=False)
    assert lm.rnn.reset_after is False and lm.config()["reset_after"] is False
    ids = np.random.default_rng(0).integers(0, 11, (6, 2))
    lm.eval()
    want, _ = lm(ids)
    fastrnn.save(tmp_path / "lm.npz", lm)
    back = fastrnn.load(tmp_path / "lm.npz")
    assert back.rnn.reset_after is False
    np.testing.assert_array_equal(back(ids)[0], want)
    lm.train()
    logits, _ = lm(ids)                                # T*B = 12 >= V: reads by id
    assert lm._by_id
    lm.backward(np.ones_like(logits))
    assert np.abs(lm.encoder.weight.grad).sum() > 0
    with pytest.raises(ValueError, match="reset_after"):
        fastrnn.RNNLanguageModel(11, cell="lstm", reset_after=False)
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = fastrnn.onnx.export(lm.eval(), tmp_path / "lm.onnx")
    assert any(a.name == "linear_before_reset" and a.i == 0
               for n in onnx.load(path).graph.node if n.op_type == "GRU" for a in n.attribute)
    imported = fastrnn.onnx.load(path)
    assert isinstance(imported, fastrnn.RNNLanguageModel) and imported.reset_after is False
    np.testing.assert_allclose(imported(ids)[0], want, rtol=1e-5, atol=1e-6)
    imported.train()
    out, _ = imported(ids)
    imported.backward(np.ones_like(out))



# --- inference in the kernels (CELL_GRU_RESET_BEFORE, src/_recurrent.pyx) ---------------
# Shapes for the tiles as in test_isa.py: batch 1-3 (the dot-product kernel), 13 and 30
# rows (a whole 12-row AVX-512 tile and a ragged one), H ragged against 16- and 32-column
# panels, I past the 1024 K block; T=1 and short batches read the weights in place
# (functional.pack_flags), the longer ones packed.
KERNEL_SHAPES = [(1, 1, 3, 5), (4, 13, 21, 41), (2, 30, 37, 33), (40, 3, 9, 17),
                 (2, 14, 1030, 12), (20, 64, 16, 64)]
KERNEL_TOL = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-11, atol=1e-12)}


def _case(dtype, T, B, I, H, seed, bias, state):
    rng = np.random.default_rng(seed)
    scale = 1 / np.sqrt(H)
    w = [(rng.uniform(-scale, scale, (3 * H, n))).astype(dtype) for n in (I, H)]
    b = [rng.uniform(-scale, scale, 3 * H).astype(dtype) for _ in range(2)] if bias else [None] * 2
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = rng.standard_normal((B, H)).astype(dtype) if state else None
    return x, h0, w, b


@pytest.fixture
def kernels_only(monkeypatch):
    """Inference with reset_after=False must not fall back on the NumPy reference."""
    def refuse(*args, **kwargs):
        raise AssertionError("an inference call ran fastrnn.reference.gru_forward")
    monkeypatch.setattr(ref, "gru_forward", refuse)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("variant", ["plain", "no_bias_no_state", "lengths",
                                     "lengths_reverse", "reverse"])
def test_inference_runs_in_the_kernels_as_the_reference(dtype, shape, variant, isa,
                                                        kernels_only):
    T, B, I, H = shape
    seed = zlib.crc32(repr((shape, variant)).encode())
    plain = variant == "no_bias_no_state"
    x, h0, w, b = _case(dtype, T, B, I, H, seed, not plain, not plain)
    lengths = (np.maximum(1, T - np.arange(B) % T) if variant.startswith("lengths")
               else None)
    reverse = variant.endswith("reverse")
    want_y, want_h, _ = REFERENCE_FORWARD(x, h0, *w, *b, lengths=lengths, reverse=reverse,
                                          training=False, reset_after=False)
    y, h_n, cache = F.gru_forward(x, h0, *w, *b, lengths=lengths, reverse=reverse,
                                  training=False, reset_after=False)
    assert cache is None
    np.testing.assert_allclose(y, want_y, **KERNEL_TOL[dtype])
    np.testing.assert_allclose(h_n, want_h, **KERNEL_TOL[dtype])
    if lengths is not None:     # steps past a row's end stay zero, as the reference's
        for bi, n in enumerate(lengths):
            assert not y[n:, bi].any()
    # and not torch's form, where the two differ (not from h = 0 in one step): the test
    # would pass on the wrong cell otherwise
    if h0 is not None or T > 1:
        torch_form = F.gru_forward(x, h0, *w, *b, lengths=lengths, reverse=reverse,
                                   training=False)[0]
        assert np.abs(torch_form - want_y).max() > 1e-4


def spy_on_threads(monkeypatch, name, at):
    """The (n_threads, by_units) (positional arguments at, at + 1) of every call
    functional makes of _recurrent.<name>, as a list that fills as they run."""
    calls = []
    real = getattr(_recurrent, name)

    def spy(*args, **kwargs):
        calls.append((args[at], args[at + 1]))
        return real(*args, **kwargs)
    monkeypatch.setattr(F._recurrent, name, spy)
    return calls


@pytest.fixture
def driver_calls(monkeypatch):
    """The (n_threads, by_units) of every _recurrent.forward call functional makes."""
    return spy_on_threads(monkeypatch, "forward", 21)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
# (sizes with a team's FLOP a step: functional.RESET_BEFORE_TEAM_STEP_FLOP)
@pytest.mark.parametrize("T,B,I,H,split", [(50, 1, 64, 256, True), (30, 3, 60, 127, True),
                                           (12, 40, 19, 45, False)])
@pytest.mark.parametrize("variant", ["plain", "lengths_reverse"])
def test_inference_is_the_same_bits_on_one_and_two_threads(dtype, T, B, I, H, split, variant,
                                                           kernels_only, driver_calls):
    """Through functional: small batches take the unit split on two threads (checked
    by the driver's arguments), larger ones the row split; both bitwise one thread's."""
    x, h0, w, b = _case(dtype, T, B, I, H, B, True, True)
    lengths = np.maximum(1, T - 7 * np.arange(B)) if variant != "plain" else None
    reverse = variant != "plain"
    before = fastrnn.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            fastrnn.set_num_threads(n)
            out.append(F.gru_forward(x, h0, *w, *b, lengths=lengths, reverse=reverse,
                                     training=False, reset_after=False)[:2])
    finally:
        fastrnn.set_num_threads(before)
    if driver_calls[1][0] != 2:
        pytest.skip(f"the schedule gave {driver_calls[1][0]} thread(s), not 2")
    assert driver_calls[0] == (1, False) and driver_calls[1] == (2, split)
    assert all(np.array_equal(a, c) for a, c in zip(*out))
    want = REFERENCE_FORWARD(x, h0, *w, *b, lengths=lengths, reverse=reverse, training=False,
                             reset_after=False)[0]
    np.testing.assert_allclose(out[1][0], want, **KERNEL_TOL[dtype])


def test_inference_writes_out_and_layers_run_it(kernels_only):
    x, h0, w, b = _case(np.float32, 9, 4, 6, 10, 3, True, True)
    out = np.full((9, 4, 10), np.nan, np.float32)
    y, h_n, _ = F.gru_forward(x, h0, *w, *b, lengths=[9, 2, 5, 9], training=False,
                              out=out, reset_after=False)
    assert y is out and not out[5:, 2].any() and np.isfinite(out).all()
    want = REFERENCE_FORWARD(x, h0, *w, *b, lengths=[9, 2, 5, 9], training=False,
                             reset_after=False)[0]
    np.testing.assert_allclose(out, want, **KERNEL_TOL[np.float32])
    # the layer and the cell in eval mode, against the reference on their own weights
    g = fastrnn.GRU(6, 10, seed=4, reset_after=False).eval()
    cell = fastrnn.GRUCell(6, 10, reset_after=False, seed=4).eval()
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(cell, name).data[...] = getattr(g, name + "_l0").data
    params = [getattr(g, n + "_l0").data for n in ("weight_ih", "weight_hh", "bias_ih",
                                                   "bias_hh")]
    want_y, want_h, _ = REFERENCE_FORWARD(x, h0, *params, training=False, reset_after=False)
    y, h_n = g(x, h0[None])
    np.testing.assert_allclose(y, want_y, **KERNEL_TOL[np.float32])
    np.testing.assert_allclose(h_n[0], want_h, **KERNEL_TOL[np.float32])
    h = h0
    for t in range(9):
        h = cell(x[t], h)
    np.testing.assert_allclose(h, want_h, **KERNEL_TOL[np.float32])
    # (stacked and bidirectional layers: test_stacked_bidirectional_eval_equals_training)


def _driver_args(dtype, T, B, I, H, seed, pack, lengths=None, reverse=False):
    """Arguments of _recurrent.forward for a reset-before GRU inference call, up to
    n_threads, and its y, h_n."""
    x, h0, w, b = _case(dtype, T, B, I, H, seed, True, True)
    y, h_n = np.zeros((T, B, H), dtype), np.empty((B, H), dtype)
    sched = F._common_forward(x, h0, *w, *b, 3, lengths)[7]
    return (F.CELL_GRU_RESET_BEFORE, y, h_n, None, None, None, x, h0, None, *w, b[0] + b[1],
            None, None, None, sched.lengths, sched.order, sched.bounds, reverse, pack,
            pack), y, h_n


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("B,H", [(1, 45), (3, 64), (2, 1)])
@pytest.mark.parametrize("variant", ["plain", "lengths_reverse"])
def test_the_unit_split_gives_the_row_split_bits(dtype, pack, B, H, variant, isa):
    """Small batches split hidden units over the threads, which then meet twice a step
    (every thread's r * h_{t-1} before the n product): bitwise one thread's numbers,
    packed or read in place, H = 1 leaving a thread no units."""
    lengths = np.maximum(1, 9 - 4 * np.arange(B)) if variant != "plain" else None
    reverse = variant != "plain"
    args, y1, h1 = _driver_args(dtype, 9, B, 13, H, 7, pack, lengths, reverse)
    assert _recurrent.forward(*args, 1, False)
    want_y, want_h = y1.copy(), h1.copy()
    args, y2, h2 = _driver_args(dtype, 9, B, 13, H, 7, pack, lengths, reverse)
    if not _recurrent.forward(*args, 2, True):
        pytest.skip("OpenMP gave fewer than 2 threads")
    assert np.array_equal(y2, want_y) and np.array_equal(h2, want_h)
    x, h0, w, b = _case(dtype, 9, B, 13, H, 7, True, True)
    ref_y, ref_h, _ = REFERENCE_FORWARD(x, h0, *w, *b, lengths=lengths, reverse=reverse,
                                        training=False, reset_after=False)
    np.testing.assert_allclose(want_y, ref_y, **KERNEL_TOL[dtype])
    np.testing.assert_allclose(want_h, ref_h, **KERNEL_TOL[dtype])


def test_the_driver_refuses_what_this_cell_does_not_run():
    args, _, _ = _driver_args(np.float32, 3, 2, 4, 5, 0, True)
    with pytest.raises(ValueError, match="gates, aux: the reset-before GRU takes"):
        _recurrent.forward(*args, 2, False, bf16=True)
    gates = np.empty((3, 2, 15), np.float32)
    with pytest.raises(ValueError, match="reset-before GRU"):
        _recurrent.forward(*args[:4], gates, *args[5:], 2, False)   # gates without aux
    with pytest.raises(ValueError, match="aux \\(T, B, H\\)"):   # aux of the wrong shape
        _recurrent.forward(*args[:4], gates, np.empty((3, 2, 4), np.float32), *args[6:], 2,
                           False)
    bad_y = np.zeros((2, 3, 5), np.float32).transpose(1, 0, 2)   # rows not evenly spaced
    with pytest.raises(ValueError, match="y: its T\\*B rows"):
        _recurrent.forward(args[0], bad_y, *args[2:], 2, False)
    x, h0, w, b = _case(np.float32, 3, 2, 4, 5, 0, True, True)
    with pytest.raises(ValueError, match="forward_small: cell must be"):
        _recurrent.forward_small(F.CELL_GRU_RESET_BEFORE + 1, np.empty((3, 2, 5), np.float32),
                                 np.empty((2, 5), np.float32), None, x, h0, None, *w, *b,
                                 False, False)


# --- training in the kernels: forward keeps r, z, n and r * h_{t-1}; backward's reverse
# step has two passes and two products (src/_recurrent.pyx gru_reset_before_backward_step)
REFERENCE_BACKWARD = ref.gru_backward


@pytest.fixture
def training_kernels_only(monkeypatch):
    """Training with reset_after=False must not fall back on the NumPy reference."""
    def refuse(*args, **kwargs):
        raise AssertionError("a training call ran fastrnn.reference")
    monkeypatch.setattr(ref, "gru_forward", refuse)
    monkeypatch.setattr(ref, "gru_backward", refuse)


def _training_case(dtype, shape, variant, seed):
    T, B, I, H = shape
    plain = variant == "no_bias_no_state"
    x, h0, w, b = _case(dtype, T, B, I, H, seed, not plain, not plain)
    # pre-activations of order 1 however large I: saturated gates make 1 - n^2 and
    # z (1 - z) cancel, and float32 gradients then differ from the reference's by more
    # than rounding of the products
    x = (x * min(1.0, np.sqrt(32 / I))).astype(dtype)
    lengths = (np.maximum(1, T - np.arange(B) % T) if variant.startswith("lengths")
               else None)
    rng = np.random.default_rng(seed + 1)
    dy = rng.standard_normal((T, B, H)).astype(dtype)
    dh_n = rng.standard_normal((B, H)).astype(dtype) if not plain else None
    return x, h0, w, b, lengths, variant.endswith("reverse"), dy, dh_n


def _train(x, h0, w, b, lengths, reverse, dy, dh_n, out=None, accumulate=False):
    y, h_n, cache = F.gru_forward(x, h0, *w, *b, lengths=lengths, reverse=reverse,
                                  training=True, reset_after=False)
    return (y.copy(), h_n) + tuple(F.gru_backward(dy, dh_n, cache, out=out,
                                                  accumulate=accumulate))


GRAD_NAMES = ("y", "h_n", "dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh")


def _close_to_scale(a, c, dtype, name):
    """KERNEL_TOL, with the absolute part scaled to the array's largest value: a weight
    gradient sums T*B rows, and an element that cancels to near 0 keeps the rounding
    of its large terms (float32: 1e-5 of an element 1e-2 from terms of order 1)."""
    tol = KERNEL_TOL[dtype]
    np.testing.assert_allclose(a, c, rtol=tol["rtol"],
                               atol=tol["atol"] * max(1.0, 10 * float(np.abs(c).max())),
                               err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("variant", ["plain", "no_bias_no_state", "lengths",
                                     "lengths_reverse", "reverse"])
def test_training_runs_in_the_kernels_as_the_reference(dtype, shape, variant, isa,
                                                       training_kernels_only):
    seed = zlib.crc32(repr((shape, variant, "train")).encode())
    x, h0, w, b, lengths, reverse, dy, dh_n = _training_case(dtype, shape, variant, seed)
    got = _train(x, h0, w, b, lengths, reverse, dy, dh_n)
    ry, rh, cache = REFERENCE_FORWARD(x, h0, *w, *b, lengths=lengths, reverse=reverse,
                                      reset_after=False)
    want = (ry, rh) + tuple(REFERENCE_BACKWARD(dy, dh_n, cache))
    for name, a, c in zip(GRAD_NAMES, got, want):
        if c is None:
            assert a is None, name
        else:
            _close_to_scale(a, c, dtype, name)
    assert np.abs(got[2]).max() > 0    # the check above cannot pass on zeros


def test_training_writes_out_and_accumulates(training_kernels_only):
    dtype = np.float64
    x, h0, w, b, lengths, reverse, dy, dh_n = _training_case(dtype, (7, 5, 6, 11),
                                                             "lengths_reverse", 3)
    want = _train(x, h0, w, b, lengths, reverse, dy, dh_n)
    rng = np.random.default_rng(4)
    start = [rng.standard_normal(a.shape) for a in w]
    out = [a.copy() for a in start]
    got = _train(x, h0, w, b, lengths, reverse, dy, dh_n, out=tuple(out), accumulate=True)
    assert got[4] is out[0] and got[5] is out[1]
    np.testing.assert_allclose(out[0], start[0] + want[4], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out[1], start[1] + want[5], rtol=1e-12, atol=1e-12)
    y_out = np.full((7, 5, 11), np.nan)
    y, _, cache = F.gru_forward(x, h0, *w, *b, lengths=lengths, reverse=reverse, out=y_out,
                                reset_after=False)
    assert y is y_out and np.array_equal(y_out, want[0])
    assert np.array_equal(F.gru_backward(dy, dh_n, cache)[0], want[2])
    with pytest.raises(RuntimeError, match="already used"):
        F.gru_backward(dy, dh_n, cache)


@pytest.fixture
def backward_calls(monkeypatch):
    """The (n_threads, by_units) of every _recurrent.backward call functional makes."""
    return spy_on_threads(monkeypatch, "backward", 28)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T,B,I,H,split", [(30, 1, 16, 64, True), (20, 3, 20, 127, True),
                                           (1, 2, 200, 200, True), (12, 70, 19, 45, False)])
@pytest.mark.parametrize("variant", ["plain", "lengths_reverse"])
def test_training_is_the_same_bits_on_one_and_two_threads(dtype, T, B, I, H, split, variant,
                                                          training_kernels_only,
                                                          backward_calls):
    """Through functional: small batches' reverse loop splits hidden units on two
    threads (checked by the driver's arguments), larger ones rows; every output and
    gradient bitwise one thread's."""
    x, h0, w, b, lengths, reverse, dy, dh_n = _training_case(
        dtype, (T, B, I, H), "lengths_reverse" if variant != "plain" else "plain", B)
    before = fastrnn.get_num_threads()
    try:
        got = []
        for n in (1, 2):
            fastrnn.set_num_threads(n)
            got.append(_train(x, h0, w, b, lengths, reverse, dy, dh_n))
    finally:
        fastrnn.set_num_threads(before)
    if backward_calls[1][0] != 2:
        pytest.skip(f"the schedule gave {backward_calls[1][0]} thread(s), not 2")
    assert backward_calls[0] == (1, False) and backward_calls[1] == (2, split)
    for name, a, c in zip(GRAD_NAMES, *got):
        assert np.array_equal(a, c), name


def _backward_driver(dtype, T, B, I, H, n, by_units, in_place, lengths=None, reverse=False):
    """Forward (training) then backward through the driver itself for a reset-before GRU
    -> y, h_n, dx, dh0, dw_ih, dw_hh, db; or None if OpenMP gave fewer threads."""
    x, h0, w, b = _case(dtype, T, B, I, H, 11, True, True)
    sched = F._common_forward(x, h0, *w, *b, 3, lengths)[7]
    hs = np.zeros((T + 1, B, H), dtype)
    hs[T if reverse else 0] = h0
    y = hs[:T] if reverse else hs[1:]
    h_n = np.empty((B, H), dtype)
    gates, rhs = np.empty((T, B, 3 * H), dtype), np.empty((T, B, H), dtype)
    assert _recurrent.forward(F.CELL_GRU_RESET_BEFORE, y, h_n, None, gates, rhs, x, h0, None,
                              *w, b[0] + b[1], None, None, None, sched.lengths, sched.order,
                              sched.bounds, reverse, True, True, 1, False)
    dy = np.random.default_rng(12).standard_normal((T, B, H)).astype(dtype)
    dx, dh0 = np.zeros((T, B, I), dtype), np.empty((B, H), dtype)
    dw_ih, dw_hh, db = np.empty_like(w[0]), np.empty_like(w[1]), np.empty(3 * H, dtype)
    h_prev = hs[1:] if reverse else hs[:T]
    _recurrent._set_in_place_steps(in_place)
    try:
        ran = _recurrent.backward(F.CELL_GRU_RESET_BEFORE, dx, dh0, None, dw_ih, dw_hh, None,
                                  gates, None, None, dy, None, None, rhs, None, y, h0, None, x,
                                  h_prev, *w, None, sched.lengths, sched.order, sched.bounds,
                                  sched.valid_rows(T), reverse, n, by_units, db_x=db)
    finally:
        _recurrent._set_in_place_steps(True)
    return (y, h_n, dx, dh0, dw_ih, dw_hh, db) if ran else None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T,in_place", [(9, False), (1, True), (1, False)])
@pytest.mark.parametrize("B,H", [(1, 45), (3, 64), (2, 1)])
@pytest.mark.parametrize("variant", ["plain", "lengths_reverse"])
def test_the_backward_unit_split_gives_the_row_split_bits(dtype, T, in_place, B, H, variant,
                                                          isa):
    """Split by units, the threads meet twice a reverse step (every unit's dL/da_n before
    drh = dL/da_n W_hn, every dL/da_r before the W_h{r,z} product): bitwise one
    thread's row split, weights packed or (single steps) read in place, H = 1 leaving
    a thread no units; and as the reference."""
    lengths = np.maximum(1, T - 4 * np.arange(B)) if variant != "plain" else None
    reverse = variant != "plain"
    one = _backward_driver(dtype, T, B, 13, H, 1, False, in_place, lengths, reverse)
    two = _backward_driver(dtype, T, B, 13, H, 2, True, in_place, lengths, reverse)
    if two is None:
        pytest.skip("OpenMP gave fewer than 2 threads")
    for name, a, c in zip(("y", "h_n", "dx", "dh0", "dw_ih", "dw_hh", "db"), one, two):
        assert np.array_equal(a, c), name
    x, h0, w, b = _case(dtype, T, B, 13, H, 11, True, True)
    _, _, cache = REFERENCE_FORWARD(x, h0, *w, *b, lengths=lengths, reverse=reverse,
                                    reset_after=False)
    dy = np.random.default_rng(12).standard_normal((T, B, H)).astype(dtype)
    rdx, rdh0, rdw_ih, rdw_hh, rdb, _ = REFERENCE_BACKWARD(dy, None, cache)
    for name, a, c in zip(("dx", "dh0", "dw_ih", "dw_hh", "db"), one[2:],
                          (rdx, rdh0, rdw_ih, rdw_hh, rdb)):
        if reverse and lengths is not None and name == "dw_hh":
            # the driver's W_h{r,z} rows read h_prev = 0 at a short row's first step
            # (functional adds its h0 term: _fix_reverse_first_step); W_hn's read the
            # r * h_{t-1} forward kept, which came from h0 itself
            a, c, name = a[2 * H:], c[2 * H:], "dw_hh (W_hn's rows)"
        _close_to_scale(a, c, dtype, name)


def test_the_backward_driver_refuses_what_this_cell_does_not_take():
    dtype = np.float32
    T, B, I, H = 3, 2, 4, 5
    x, h0, w, b = _case(dtype, T, B, I, H, 0, True, True)
    sched = F._common_forward(x, h0, *w, *b, 3, None)[7]
    dx, dh0 = np.zeros((T, B, I), dtype), np.empty((B, H), dtype)
    gates, rhs = np.empty((T, B, 3 * H), dtype), np.empty((T, B, H), dtype)
    dy, y = np.zeros((T, B, H), dtype), np.zeros((T, B, H), dtype)

    def call(aux=rhs, dgh=None, **kw):
        return _recurrent.backward(F.CELL_GRU_RESET_BEFORE, dx, dh0, None, *[np.empty_like(a)
                                   for a in w], None, gates, dgh, None, dy, None, None, aux,
                                   None, y, h0, None, x, y, *w, None, sched.lengths,
                                   sched.order, sched.bounds, None, False, 1, False, **kw)
    for kw in (dict(aux=None), dict(aux=np.empty((T, B, H + 1), dtype)),
               dict(dgh=np.empty_like(gates)), dict(bf16=True), dict(weights=False)):
        with pytest.raises(ValueError, match="aux: the reset-before GRU.s backward takes aux"):
            call(**kw)


# --- the eval fast path (fastrnn/_fastpath.py, src/forward_small.pxi): one thread only
def test_the_fast_path_serves_calls_that_run_on_one_thread():
    from test_fastpath import counting_served_calls, general, took_fast_path
    cell = fastrnn.GRUCell(20, 64, reset_after=False, seed=3).eval()
    layer = fastrnn.GRU(20, 64, num_layers=2, bidirectional=True, reset_after=False,
                        seed=4).eval()
    rng = np.random.default_rng(6)
    h1 = None
    xs = rng.standard_normal((3, 1, 20)).astype(np.float32)
    with counting_served_calls():
        for t in range(3):                        # a stream of single steps, B=1
            h1 = cell(xs[t], h1)
            assert took_fast_path(cell)
        assert np.array_equal(h1, general(cell, xs[2], general(cell, xs[1],
                                                               general(cell, xs[0]))))
        h_unbatched = cell(xs[0, 0])              # x (I,): h (H,)
        assert took_fast_path(cell) and h_unbatched.shape == (64,)
        assert np.array_equal(h_unbatched, general(cell, xs[0, 0]))
        xr = rng.standard_normal((5, 3, 20)).astype(np.float32)   # rows of 5, 2, 4 steps
        before = fastrnn.get_num_threads()
        try:
            fastrnn.set_num_threads(1)    # (rows of different lengths, one thread)
            y, h_n = layer(xr, lengths=[5, 2, 4])
            assert took_fast_path(layer)
            gy, gh = general(layer, xr, lengths=[5, 2, 4])
        finally:
            fastrnn.set_num_threads(before)
        assert np.array_equal(y, gy) and np.array_equal(h_n, gh)
        assert not y[2:, 1].any()
    params = [getattr(cell, n).data for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    want = REFERENCE_FORWARD(xs, None, *params, training=False, reset_after=False)[1]
    np.testing.assert_allclose(h1, want, **KERNEL_TOL[np.float32])


def test_the_fast_path_hashes_only_the_weight_it_packs():
    """This cell packs its own rows of W_hh per call: an eval call finds W_ih's packing
    by its digest and hashes nothing of W_hh (a review: it hashed both)."""
    g = fastrnn.GRU(16, 64, reset_after=False, seed=1).eval()
    x = np.random.default_rng(2).standard_normal((8, 4, 16)).astype(np.float32)
    assert F.pack_flags(8, 4) == (True, True)     # both weights packed at this size
    before = fastrnn.get_num_threads()
    try:
        fastrnn.set_num_threads(1)
        g(x)
        hashed = _recurrent._digested_bytes()
        g(x)
        assert _recurrent._digested_bytes() - hashed == g.weight_ih_l0.data.nbytes
    finally:
        fastrnn.set_num_threads(before)


def test_a_call_for_a_thread_team_takes_the_general_path():
    """The fast path runs this cell on one thread; a call the general path gives a
    team (2 threads, work above functional.RESET_BEFORE_TEAM_STEP_FLOP a step) is
    declined, and runs
    there as before."""
    from test_fastpath import counting_served_calls, general, took_fast_path
    g = fastrnn.GRU(256, 256, reset_after=False, seed=5).eval()
    x = np.random.default_rng(7).standard_normal((20, 4, 256)).astype(np.float32)
    before = fastrnn.get_num_threads()
    try:
        fastrnn.set_num_threads(2)
        with counting_served_calls():
            y, h_n = g(x)
            if F.call_threads() < 2:
                pytest.skip("fewer than 2 threads for this call")
            assert not took_fast_path(g)
            fastrnn.set_num_threads(1)      # one thread: served
            y1, h1 = g(x)
            assert took_fast_path(g)
            assert np.array_equal(y1, general(g, x)[0])
    finally:
        fastrnn.set_num_threads(before)
    assert np.array_equal(y1, y)     # (the team's split gives one thread's bits)


def test_forward_small_runs_it_as_forward():
    args, y, h_n = _driver_args(np.float64, 7, 3, 9, 21, 2, True)
    assert _recurrent.forward(*args, 1, False)
    x, h0, w, b = _case(np.float64, 7, 3, 9, 21, 2, True, True)
    y2, h2 = np.empty_like(y), np.empty_like(h_n)
    _recurrent.forward_small(F.CELL_GRU_RESET_BEFORE, y2, h2, None, x, h0, None, *w, *b,
                             True, True)
    assert np.array_equal(y2, y) and np.array_equal(h2, h_n)


def test_small_eval_calls_run_on_one_thread(driver_calls):
    """Its eval teams are OpenMP's, whose start and two barriers a step cost more than
    the pool's: a team only from RESET_BEFORE_TEAM_(SINGLE_)STEP_FLOP a step, on the
    general path and the fast path alike (functional.reset_before_eval_team)."""
    from test_fastpath import counting_served_calls, took_fast_path
    before = fastrnn.get_num_threads()
    try:
        fastrnn.set_num_threads(2)
        if F.call_threads() < 2:
            pytest.skip("fewer than 2 threads")
        for T, H, team in ((1, 256, False), (1, 512, True), (50, 128, False), (50, 192, True)):
            x, h0, w, b = _case(np.float32, T, 1, H, H, 0, True, True)
            flop = 2.0 * T * 3 * H * 2 * H
            assert F.reset_before_eval_team(flop, T) == team
            first = len(driver_calls)
            F.gru_forward(x, h0, *w, *b, training=False, reset_after=False)
            if team and driver_calls[first][0] == 2 and len(driver_calls) > first + 1:
                pytest.skip("OpenMP gave fewer than 2 threads (the call ran again on one)")
            assert driver_calls[first][0] == (2 if team else 1), (T, H)
        cell = fastrnn.GRUCell(256, 256, reset_after=False, seed=0).eval()
        with counting_served_calls():
            cell(np.ones((1, 256), np.float32))
            assert took_fast_path(cell)          # one thread: the fast path serves it
    finally:
        fastrnn.set_num_threads(before)
