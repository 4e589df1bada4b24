"""Bad input to the functional kernels: a clear Python exception, never a crash."""

import numpy as np
import pytest

import fastrnn
from fastrnn import functional as F

T, B, I, H = 4, 3, 5, 6


def lstm_args(dtype=np.float32):
    rng = np.random.default_rng(0)
    return dict(
        x=rng.standard_normal((T, B, I)).astype(dtype),
        h0=np.zeros((B, H), dtype), c0=np.zeros((B, H), dtype),
        w_ih=rng.standard_normal((4 * H, I)).astype(dtype),
        w_hh=rng.standard_normal((4 * H, H)).astype(dtype),
        b_ih=np.zeros(4 * H, dtype), b_hh=np.zeros(4 * H, dtype),
    )


def call(**overrides):
    args = lstm_args()
    lengths = overrides.pop("lengths", None)
    args.update(overrides)
    return F.lstm_forward(args["x"], args["h0"], args["c0"], args["w_ih"], args["w_hh"],
                          args["b_ih"], args["b_hh"], lengths=lengths)


@pytest.mark.parametrize("name, value, exc, words", [
    ("x", np.zeros((T, B), np.float32), ValueError, ["x", "3 dimensions", "(4, 3)"]),
    ("x", np.zeros((T, B, I + 1), np.float32), ValueError, ["x", "(T, B, 5)", "(4, 3, 6)"]),
    ("x", np.zeros((0, B, I), np.float32), ValueError, ["x", "T >= 1"]),
    ("x", np.zeros((T, B, I), np.float64), TypeError, ["float64", "float32"]),
    ("x", np.zeros((T, B, I), np.int64), TypeError, ["x", "int64"]),
    ("h0", np.zeros((B + 1, H), np.float32), ValueError, ["h0", "(3, 6)", "(4, 6)"]),
    ("c0", np.zeros((B, H - 1), np.float32), ValueError, ["c0", "(3, 6)", "(3, 5)"]),
    ("w_hh", np.zeros((4 * H, H + 1), np.float32), ValueError, ["w_hh", "(24, 7)"]),
    ("w_ih", np.zeros((4 * H + 4, I), np.float32), ValueError, ["w_ih", "(28, 5)"]),
    ("b_ih", np.zeros(4 * H + 1, np.float32), ValueError, ["b_ih", "(24,)", "(25,)"]),
    ("b_ih", None, ValueError, ["b_ih", "b_hh", "both"]),
    ("lengths", [1, 2], ValueError, ["lengths", "(3,)", "(2,)"]),
    ("lengths", [1, 0, 2], ValueError, ["lengths", "[1, T=4]", "0"]),
    ("lengths", [1, 5, 2], ValueError, ["lengths", "[1, T=4]", "5"]),
    ("lengths", [1.5, 2, 3], TypeError, ["lengths", "integers"]),
])
def test_bad_argument_names_expected_and_actual(name, value, exc, words):
    with pytest.raises(exc) as info:
        call(**{name: value})
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_bad_gradient_shape_in_backward():
    args = lstm_args()
    y, h_n, c_n, cache = F.lstm_forward(*args.values())
    with pytest.raises(ValueError, match=r"dy must have shape \(4, 3, 6\)"):
        F.lstm_backward(np.zeros((T, B, H + 1), np.float32), None, None, cache)
    with pytest.raises(ValueError, match="dc_n"):
        F.lstm_backward(np.zeros((T, B, H), np.float32), None, np.zeros((1, H), np.float32),
                        cache)
    # the failed calls did not consume the cache
    F.lstm_backward(np.zeros((T, B, H), np.float32), None, None, cache)


def test_backward_without_training_cache():
    args = lstm_args()
    *_, cache = F.lstm_forward(*args.values(), training=False)
    with pytest.raises(ValueError, match="training=True"):
        F.lstm_backward(np.zeros((T, B, H), np.float32), None, None, cache)


def test_unknown_nonlinearity():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="nonlinearity"):
        F.rnn_forward(rng.standard_normal((2, 2, 3)), None, np.zeros((4, 3)), np.zeros((4, 4)),
                      None, None, nonlinearity="sigmoid")


def test_set_num_threads_validates():
    with pytest.raises(ValueError, match=r"n must be in \[1, 4096\], got 0"):
        fastrnn.set_num_threads(0)
    with pytest.raises(TypeError):
        fastrnn.set_num_threads("2")


def test_config_reports_openmp_and_threads(capsys):
    cfg = fastrnn.config()
    assert cfg["openmp"] is True, "the normal build must have OpenMP"
    assert cfg["num_threads"] == fastrnn.get_num_threads() >= 1
    fastrnn.show_config()
    out = capsys.readouterr().out
    assert "OpenMP compiled in: yes" in out
    assert "BLAS" in out


def test_a_cache_from_another_cell_is_named():
    """Each backward takes the cache of its own forward only; another's gets a
    ValueError naming both (an audit found AttributeError / unpacking errors)."""
    rng = np.random.default_rng(0)
    T, B, I, H, P = 3, 2, 4, 5, 2
    x = rng.standard_normal((T, B, I))
    w = lambda G, K: rng.standard_normal((G * H, K))           # noqa: E731
    caches = {
        "lstm": F.lstm_forward(x, None, None, w(4, I), w(4, H), None, None)[-1],
        "lstmp": F.lstmp_forward(x, None, None, w(4, I), w(4, P), None, None,
                                 rng.standard_normal((P, H)))[-1],
        "gru": F.gru_forward(x, None, w(3, I), w(3, H), None, None)[-1],
        "rnn": F.rnn_forward(x, None, w(1, I), w(1, H), None, None)[-1],
    }
    calls = {"lstm": lambda c: F.lstm_backward(np.ones((T, B, H)), None, None, c),
             "lstmp": lambda c: F.lstmp_backward(np.ones((T, B, P)), None, None, c),
             "gru": lambda c: F.gru_backward(np.ones((T, B, H)), None, c),
             "rnn": lambda c: F.rnn_backward(np.ones((T, B, H)), None, c)}
    for kind, backward in calls.items():
        for other, cache in caches.items():
            if other != kind:
                with pytest.raises(ValueError, match=f"cache comes from {other}_forward, "
                                                     f"not {kind}_forward"):
                    backward(cache)
        with pytest.raises(ValueError, match=f"expected the cache of {kind}_forward"):
            backward(object())
        backward(caches[kind])                                  # its own: fine
