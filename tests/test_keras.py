"""fastrnn.from_keras against Keras 3's own outputs (torch backend, no TensorFlow)."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")   # before keras is imported

import numpy as np
import pytest

import fastrnn

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":            # pragma: no cover
    pytest.skip("Keras runs on another backend in this process", allow_module_level=True)

RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 7, 4)).astype(np.float32)
L = keras.layers


def as_list(y):
    return [keras.ops.convert_to_numpy(t) for t in (y if isinstance(y, (list, tuple)) else [y])]


def close(a, b):
    assert a.shape == b.shape
    assert float(np.abs(a - b).max()) <= 1e-5 * max(float(np.abs(b).max()), 1e-6) + 1e-7


LAYERS = []
for cell in (L.LSTM, L.GRU, L.SimpleRNN):
    LAYERS += [lambda c=cell: c(5), lambda c=cell: c(5, return_sequences=True),
               lambda c=cell: c(5, return_sequences=True, return_state=True, go_backwards=True),
               lambda c=cell: c(5, use_bias=False, return_state=True),
               lambda c=cell: L.Bidirectional(c(5, return_sequences=True)),
               lambda c=cell: L.Bidirectional(c(5), merge_mode="sum")]
LAYERS += [lambda: L.SimpleRNN(5, activation="relu"), lambda: L.SimpleRNN(5, activation="linear"),
           lambda: L.GRU(5, reset_after=False, return_sequences=True),   # the reset gate first
           lambda: L.Bidirectional(L.GRU(5, reset_after=False, use_bias=False))]


@pytest.mark.parametrize("make", LAYERS)
def test_layers_match_keras(make):
    layer = make()
    want = as_list(layer(X))
    got = fastrnn.from_keras(layer)(X)
    got = got if isinstance(got, list) else [got]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        close(a, b)


def test_sequential_and_keras_file(tmp_path):
    model = keras.Sequential([keras.Input((None,), dtype="int32"), L.Embedding(20, 4),
                              L.LSTM(6, return_sequences=True), L.Dropout(0.3),
                              L.Bidirectional(L.GRU(3)), L.Dense(5, activation="softmax")])
    ids = RNG.integers(0, 20, (3, 7))
    want = keras.ops.convert_to_numpy(model(ids))
    close(fastrnn.from_keras(model)(ids), want)
    path = tmp_path / "m.keras"
    model.save(path)
    close(fastrnn.from_keras(str(path))(ids), want)


@pytest.mark.parametrize("make,option", [
    (lambda: L.LSTM(3, activation="relu"), "activation"),
    (lambda: L.LSTM(3, recurrent_activation="hard_sigmoid"), "recurrent_activation"),
    (lambda: L.SimpleRNN(3, unroll=True), "unroll"),
    (lambda: L.Bidirectional(L.LSTM(3), merge_mode="mul"), "merge_mode")])
def test_unsupported_options_are_named(make, option):
    layer = make()
    layer(X)
    with pytest.raises(ValueError, match=rf"layer '{layer.name}'.*{option}"):
        fastrnn.from_keras(layer)


def test_other_bad_inputs(tmp_path):
    emb = L.Embedding(10, 3, mask_zero=True)
    emb(np.zeros((1, 2), np.int32))
    with pytest.raises(ValueError, match="mask_zero"):
        fastrnn.from_keras(emb)
    with pytest.raises(ValueError, match="not built"):
        fastrnn.from_keras(L.LSTM(3))
    conv = L.Conv1D(2, 3)
    conv(X)
    with pytest.raises(ValueError, match="no fastrnn counterpart"):
        fastrnn.from_keras(conv)
    with pytest.raises(TypeError, match="expected a Keras layer"):
        fastrnn.from_keras(42)
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.keras"):
        fastrnn.from_keras(tmp_path / "bad.keras")
