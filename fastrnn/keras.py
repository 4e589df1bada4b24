"""Keras 3 -> fastrnn: `fastrnn.from_keras(obj)` (Keras is imported only when called).

obj: a built `keras.layers.LSTM`, `GRU`, `SimpleRNN`, `Bidirectional(...)` of
one of them, `Embedding`, `Dense`, `Dropout`, a `keras.Sequential` of these,
or the path of a `.keras` file (loaded with `keras.saving.load_model(...,
safe_mode=True, compile=False)`: no code from the file runs).

Weight layout: Keras stores `kernel` (I, G·H), `recurrent_kernel` (H, G·H) and
a bias, gates side by side in columns -- LSTM i, f, c, o (= fastrnn i, f, g, o),
GRU z, r, h (-> fastrnn r, z, n), SimpleRNN one block. fastrnn's weights are
the transposes, gate blocks reordered. Keras's LSTM/SimpleRNN have one bias
(-> bias_ih, with bias_hh zero); a GRU with `reset_after=True` (Keras 3's
default) has two, (2, 3H): input and recurrent, which is exactly fastrnn's
(torch's) GRU. A GRU with `reset_after=False` (one bias, (3H,)) becomes
`fastrnn.GRU(..., reset_after=False)`, the reset gate applied before the
recurrent product.

A recurrent layer becomes `fastrnn.wrappers.Recurrent(rnn, return_sequences,
return_state, go_backwards)` around a batch-first fastrnn RNN/LSTM/GRU, so the
result returns what Keras returns; a Sequential becomes `fastrnn.nn.Sequential`.
Dense -> Linear (+ `Activation` unless linear), Embedding -> Embedding, Dropout
-> Dropout (inactive: the model is returned in eval mode).

Refused with a ValueError naming the layer and option: activations other than
Keras's defaults (SimpleRNN: tanh, relu or linear), LSTM/GRU `recurrent_activation`
other than sigmoid, `unroll=True`, `stateful=True`, masking
(`Embedding(mask_zero=True)`, `Masking`), Bidirectional `merge_mode` other than
'concat'/'sum', layers fastrnn has no counterpart for.
"""

import os

import numpy as np

from fastrnn.modules.rnn import GRU, LSTM, RNN
from fastrnn.nn import Dropout, Embedding, Linear, Sequential
from fastrnn.wrappers import ACTIVATIONS, Activation, Recurrent

__all__ = ["from_keras"]

_CELLS = ("LSTM", "GRU", "SimpleRNN")


def _keras():
    try:
        import keras
    except ImportError as e:   # also Keras installed without a backend (tensorflow, ...)
        raise ImportError(f"fastrnn.from_keras needs Keras 3 with a backend (pip install keras "
                          f"torch, and KERAS_BACKEND=torch); importing keras failed: {e}") from e
    return keras


def _act_name(v):
    if isinstance(v, dict):                      # a serialised activation
        v = v.get("config", {}).get("name", v.get("class_name"))
    if callable(v):
        v = getattr(v, "__name__", repr(v))
    return v


def _fail(layer, why, option=None):
    name = getattr(layer, "name", "?")
    where = f"layer {name!r} ({type(layer).__name__}"
    where += f", option {option!r})" if option else ")"
    return ValueError(f"from_keras: {where}: {why}")


def _weights(layer):
    if not layer.built:
        raise _fail(layer, "the layer is not built (call it on an input or give it an "
                           "input shape first)")
    return [np.asarray(w) for w in layer.get_weights()]


def _dtype(layer, arrays):
    dt = arrays[0].dtype if arrays else np.dtype(np.float32)
    if dt not in (np.float32, np.float64):
        raise _fail(layer, f"weights must be float32 or float64, got {dt}", "dtype")
    return dt


def _check_cell(layer):
    cls = type(layer).__name__
    cfg = layer.get_config()
    for opt in ("unroll", "stateful"):
        if cfg.get(opt):
            raise _fail(layer, f"{opt}=True is not supported", opt)
    act = _act_name(cfg.get("activation"))
    if cls == "SimpleRNN":
        if act not in ("tanh", "relu", "linear"):
            raise _fail(layer, f"activation {act!r} is not supported (tanh, relu or linear)",
                        "activation")
    else:
        if act != "tanh":
            raise _fail(layer, f"activation {act!r} is not supported (only tanh)", "activation")
        ract = _act_name(cfg.get("recurrent_activation"))
        if ract != "sigmoid":
            raise _fail(layer, f"recurrent_activation {ract!r} is not supported (only "
                               f"sigmoid)", "recurrent_activation")
    return cfg


def _cell_params(layer, cfg):
    """-> (kind, I, H, use_bias, [w_ih, w_hh, b_ih, b_hh]) in fastrnn layout."""
    cls = type(layer).__name__
    ws = _weights(layer)
    use_bias = bool(cfg.get("use_bias", True))
    kernel, rec = ws[0], ws[1]
    I, GH = kernel.shape
    H = rec.shape[0]
    G = {"LSTM": 4, "GRU": 3, "SimpleRNN": 1}[cls]
    if GH != G * H or rec.shape != (H, G * H):
        raise _fail(layer, f"unexpected weight shapes {kernel.shape}, {rec.shape}")
    order = (1, 0, 2) if cls == "GRU" else tuple(range(G))     # Keras z,r,h -> r,z,n

    def reorder(cols):                                         # (..., G·H) -> (G·H, ...)
        cols = np.concatenate([cols[..., k * H:(k + 1) * H] for k in order], axis=-1)
        return np.ascontiguousarray(cols.T)

    w_ih, w_hh = reorder(kernel), reorder(rec)
    b_ih = b_hh = None
    if use_bias:
        bias = ws[2]
        if cls == "GRU" and cfg.get("reset_after", True):
            if bias.shape != (2, G * H):
                raise _fail(layer, f"GRU bias must be (2, {G * H}), got {bias.shape}")
            b_ih, b_hh = reorder(bias[0]), reorder(bias[1])
        else:
            b_ih = reorder(bias)
            b_hh = np.zeros_like(b_ih)
    return cls, I, H, use_bias, [w_ih, w_hh, b_ih, b_hh], _dtype(layer, ws)


def _build_rnn(kind, I, H, use_bias, dtype, act, bidirectional, merge_mode, cfg):
    kw = dict(bias=use_bias, batch_first=True, bidirectional=bidirectional, dtype=dtype,
              merge_mode=merge_mode, seed=0)
    if kind == "LSTM":
        return LSTM(I, H, **kw)
    if kind == "GRU":
        return GRU(I, H, reset_after=bool(cfg.get("reset_after", True)), **kw)
    return RNN(I, H, nonlinearity={"linear": "identity"}.get(act, act), **kw)


def _set(rnn, sfx, params):
    names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    for n, v in zip(names, params):
        if v is not None:
            getattr(rnn, n + sfx).data[...] = v


def _recurrent(layer):
    cfg = _check_cell(layer)
    kind, I, H, use_bias, params, dt = _cell_params(layer, cfg)
    act = _act_name(cfg.get("activation"))
    rnn = _build_rnn(kind, I, H, use_bias, dt, act, False, "concat", cfg)
    _set(rnn, "_l0", params)
    return Recurrent(rnn, return_sequences=cfg.get("return_sequences", False),
                     return_state=cfg.get("return_state", False),
                     go_backwards=cfg.get("go_backwards", False))


def _bidirectional(layer):
    fw, bw = layer.forward_layer, layer.backward_layer
    for sub in (fw, bw):
        if type(sub).__name__ not in _CELLS:
            raise _fail(layer, f"wraps {type(sub).__name__}; only LSTM, GRU, SimpleRNN")
    merge = layer.merge_mode
    if merge not in ("concat", "sum"):
        raise _fail(layer, f"merge_mode={merge!r} is not supported ('concat' or 'sum')",
                    "merge_mode")
    cf, cb = _check_cell(fw), _check_cell(bw)
    if fw.go_backwards or not bw.go_backwards:
        raise _fail(layer, "the forward layer must read forwards and the backward layer "
                           "backwards", "go_backwards")
    pf, pb = _cell_params(fw, cf), _cell_params(bw, cb)
    if (pf[:4] != pb[:4] or _act_name(cf.get("activation")) != _act_name(cb.get("activation"))
            or pf[5] != pb[5] or cf.get("reset_after", True) != cb.get("reset_after", True)):
        raise _fail(layer, "forward and backward layers differ in type, size, bias, "
                           "activation or reset_after", "backward_layer")
    kind, I, H, use_bias, _, dt = pf
    rnn = _build_rnn(kind, I, H, use_bias, dt, _act_name(cf.get("activation")), True, merge,
                     cf)
    _set(rnn, "_l0", pf[4])
    _set(rnn, "_l0_reverse", pb[4])
    return Recurrent(rnn, return_sequences=cf.get("return_sequences", False),
                     return_state=getattr(layer, "return_state", False))


def _layer(layer):
    cls = type(layer).__name__
    if cls in _CELLS:
        return [_recurrent(layer)]
    if cls == "Bidirectional":
        return [_bidirectional(layer)]
    if cls == "Embedding":
        if layer.get_config().get("mask_zero"):
            raise _fail(layer, "mask_zero=True (masking) is not supported", "mask_zero")
        (w,) = _weights(layer)[:1]
        m = Embedding(w.shape[0], w.shape[1], dtype=_dtype(layer, [w]))
        m.weight.data[...] = w
        return [m]
    if cls == "Dense":
        cfg = layer.get_config()
        ws = _weights(layer)
        k = ws[0]
        m = Linear(k.shape[0], k.shape[1], bias=cfg.get("use_bias", True),
                   dtype=_dtype(layer, ws))
        m.weight.data[...] = k.T
        if cfg.get("use_bias", True):
            m.bias.data[...] = ws[1]
        act = _act_name(cfg.get("activation")) or "linear"
        if act not in ACTIVATIONS:
            raise _fail(layer, f"activation {act!r} is not supported "
                               f"({', '.join(sorted(ACTIVATIONS))})", "activation")
        return [m] if act == "linear" else [m, Activation(act)]
    if cls == "Dropout":
        return [Dropout(float(layer.rate))]
    if cls == "InputLayer":
        return []
    raise _fail(layer, "no fastrnn counterpart for this layer (supported: LSTM, GRU, "
                       "SimpleRNN, Bidirectional, Embedding, Dense, Dropout)")


def from_keras(obj):
    """A fastrnn module computing what the Keras layer/Sequential/.keras file computes
    (in eval mode). See the module docstring for what maps to what."""
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if not path.endswith(".keras"):
            raise ValueError(f"from_keras: expected a .keras file, got {path!r}")
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        keras = _keras()
        try:
            obj = keras.saving.load_model(path, compile=False, safe_mode=True)
        except Exception as e:
            raise ValueError(f"from_keras: cannot read {path!r} as a Keras model "
                             f"({type(e).__name__}: {e})") from e
    else:
        keras = _keras()
    if isinstance(obj, keras.Sequential):
        mods = []
        for i, layer in enumerate(obj.layers):
            for m in _layer(layer):
                if isinstance(m, Recurrent) and m.return_state:
                    raise _fail(layer, "return_state=True cannot feed the next layer of a "
                                       "Sequential", "return_state")
                mods.append(m)
        if not mods:
            raise ValueError("from_keras: the Sequential has no layers")
        return Sequential(*mods).eval()
    if isinstance(obj, keras.Model):
        raise ValueError(f"from_keras: {type(obj).__name__} {obj.name!r}: only keras.Sequential "
                         f"models (and single layers) are supported")
    if isinstance(obj, keras.layers.Layer):
        mods = _layer(obj)
        if len(mods) != 1:
            return Sequential(*mods).eval()
        return mods[0].eval()
    raise TypeError(f"from_keras: expected a Keras layer, Sequential or .keras path, got "
                    f"{type(obj).__name__}")
