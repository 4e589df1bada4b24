"""Small modules the importers (`fastrnn.onnx.load`, `fastrnn.from_keras`) build models from.

- `Recurrent(rnn, ...)`: an RNN/LSTM/GRU layer as one step of a
  `fastrnn.nn.Sequential` (whose steps map one array to one array; a bare
  recurrent layer returns `(out, state)`). It also gives Keras's output options:
  `return_sequences`, `return_state`, `go_backwards`.
- `Activation(name)`: an elementwise activation (or softmax over the last axis),
  used for Keras `Dense(activation=...)`.

Both have `forward` and `backward` like every fastrnn module.
"""

import numpy as np

from fastrnn.modules.module import Module
from fastrnn.modules.rnn import RNNBase

__all__ = ["Recurrent", "Activation", "ACTIVATIONS"]


class Recurrent(Module):
    """`Recurrent(rnn)(x)` -> `out` of `rnn(x)` (one array), so the layer can sit in a Sequential.

    return_sequences: True -> every step's output, shaped like `rnn`'s `out`;
        False -> the last output only, (B, D·O): the final state of the last
        layer, each direction's concatenated (or summed, merge_mode='sum').
        For a bidirectional layer that is the forward direction after the last
        step beside the reverse direction after the first, as Keras returns.
    return_state: also return the last layer's final states, as a list
        `[out, h_fwd(, c_fwd)(, h_bwd(, c_bwd))]`, each (B, O) or (B, H).
        (Not usable inside a Sequential.)
    go_backwards: read the input in reverse time order (Keras's option); the
        returned sequence is in processing order, i.e. reversed too.
    The state after the last call is kept in `self.state`.
    """

    def __init__(self, rnn, return_sequences=True, return_state=False, go_backwards=False):
        super().__init__()
        if not isinstance(rnn, RNNBase):
            raise TypeError(f"Recurrent: rnn must be a fastrnn RNN, LSTM or GRU, "
                            f"got {type(rnn).__name__}")
        self.rnn = rnn
        self.return_sequences = bool(return_sequences)
        self.return_state = bool(return_state)
        self.go_backwards = bool(go_backwards)
        self.state = None
        self._shape = None

    @property
    def _time_axis(self):
        return 1 if self.rnn.batch_first else 0

    def forward(self, x, state=None, lengths=None):
        x = np.asarray(x)
        if self.go_backwards:
            if lengths is not None:
                raise ValueError("lengths: not supported together with go_backwards=True")
            x = np.flip(x, axis=self._time_axis)
        out, state = self.rnn(np.ascontiguousarray(x), state, lengths=lengths)
        self.state = state
        self._shape = out.shape
        rnn = self.rnn
        D = rnn.num_directions
        h_n = state[0] if rnn.mode == "LSTM" else state                  # (L·D, B, O)
        if not self.return_sequences:
            last = h_n[-D:]                                             # (D, B, O)
            if D == 1:
                out = last[0].copy()
            elif rnn.merge_mode == "concat":
                out = np.concatenate(list(last), axis=1)                # (B, 2·O)
            else:
                out = last[0] + last[1]                                 # (B, O)
        if not self.return_state:
            return out
        states = []
        for d in range(D):
            idx = (rnn.num_layers - 1) * D + d
            states.append(h_n[idx].copy())
            if rnn.mode == "LSTM":
                states.append(state[1][idx].copy())
        return [out] + states

    def backward(self, dout):
        """Gradient of `out` (the first returned array) -> gradient of x."""
        rnn = self.rnn
        if self.return_state:
            raise NotImplementedError("Recurrent.backward: not implemented with return_state=True")
        if self.return_sequences:
            dx, _ = rnn.backward(dout)
        else:
            D, L, O = rnn.num_directions, rnn.num_layers, rnn.out_hidden_size
            dout = np.asarray(dout, rnn.dtype)
            B = self._shape[0] if rnn.batch_first else self._shape[1]
            dh = np.zeros((L * D, B, O), rnn.dtype)
            for d in range(D):
                part = dout if (D == 1 or rnn.merge_mode == "sum") else dout[:, d * O:(d + 1) * O]
                dh[(L - 1) * D + d] = part
            dx, _ = rnn.backward(None, (dh, None) if rnn.mode == "LSTM" else dh)
        if self.go_backwards:
            dx = np.ascontiguousarray(np.flip(dx, axis=self._time_axis))
        return dx

    def extra_repr(self):
        opts = []
        if not self.return_sequences:
            opts.append("return_sequences=False")
        if self.return_state:
            opts.append("return_state=True")
        if self.go_backwards:
            opts.append("go_backwards=True")
        return ", ".join(opts)


def _sigmoid(a):
    return 0.5 + 0.5 * np.tanh(0.5 * a)


def _softmax(a):
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


#: name -> (forward, derivative from the output y)
ACTIVATIONS = {
    "linear": (lambda a: a, None),
    "relu": (lambda a: np.maximum(a, 0), lambda y: (y > 0).astype(y.dtype)),
    "tanh": (np.tanh, lambda y: 1 - y * y),
    "sigmoid": (_sigmoid, lambda y: y * (1 - y)),
    "softmax": (_softmax, None),
}


class Activation(Module):
    """Elementwise `relu`, `tanh`, `sigmoid`, `linear` (identity), or `softmax` over the last axis."""

    def __init__(self, name):
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"Activation: expected one of {sorted(ACTIVATIONS)}, got {name!r}")
        self.name = name
        self._y = None

    def forward(self, x):
        y = ACTIVATIONS[self.name][0](np.asarray(x))
        self._y = y
        return y

    def backward(self, dout):
        y = self._y
        if y is None:
            raise RuntimeError("Activation.backward called before forward")
        if self.name == "linear":
            return dout
        if self.name == "softmax":
            return y * (dout - (dout * y).sum(axis=-1, keepdims=True))
        return dout * ACTIVATIONS[self.name][1](y)

    def extra_repr(self):
        return repr(self.name)
