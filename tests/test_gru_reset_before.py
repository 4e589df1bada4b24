"""GRU(reset_after=False): the seed's GRU, the reset gate applied before the recurrent
product (n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)), in the layers and cells
against fastrnn.reference (whose gradients test_reference.py holds to finite
differences; test_keras.py and test_onnx.py hold the outputs to Keras's
reset_after=False and ONNX Runtime's linear_before_reset=0)."""

import numpy as np
import pytest

import fastrnn
from fastrnn import reference as ref

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


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
    g.eval()
    y2, h2 = g(x, lengths=[6, 1, 3, 6])
    assert np.array_equal(y, y2) and np.array_equal(h, h2)
    fastrnn.save(tmp_path / "g.npz", g)
    back = fastrnn.load(tmp_path / "g.npz")
    assert back.reset_after is False and back.config() == g.config()
    assert np.array_equal(back(x, lengths=[6, 1, 3, 6])[0], y)
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
    from fastrnn import functional as F
    with pytest.raises(ValueError, match="x_ids"):
        F.gru_forward(np.zeros((5, 3), np.float32), None, g.weight_ih_l0.data,
                      g.weight_hh_l0.data, None, None, x_ids=np.zeros((2, 1), np.int64),
                      reset_after=False)


def test_language_model_keeps_its_seed_gru_through_save_onnx_and_training(tmp_path):
    """RNNLanguageModel(cell="gru", reset_after=False) saves and loads as itself (the
    setting was lost: a reloaded or Dask-shipped model ran torch's GRU on the same
    weights); an ONNX language model with linear_before_reset=0 imports as one and
    trains (its first layer read the embeddings by id, which the reference path refused)."""
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
    logits, _ = lm(ids)                                # T*B = 12 >= V: would read by id
    assert not lm._by_id
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
