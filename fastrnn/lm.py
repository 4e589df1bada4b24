"""Recurrent language model: Embedding -> RNN/LSTM/GRU stack -> Linear decoder.

Parameter names match the classic torch word_language_model layout
(``encoder.weight``, ``rnn.weight_ih_l0``, ..., ``decoder.weight``), so an
equivalent torch module with attributes ``encoder``/``rnn``/``decoder`` loads
this model's ``state_dict`` and vice versa.

Shapes (time-major): ids x (T, B) -> logits (T, B, V). The recurrent state is
``h`` (L, B, H) for RNN/GRU and ``(h, c)`` for LSTM; ``None`` means zeros.
"""

import numpy as np

from fastrnn.modules.module import Module
from fastrnn.modules.rnn import GRU, LSTM, RNN
from fastrnn.nn import Dropout, Embedding, Linear

__all__ = ["CELLS", "RNNLanguageModel"]

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def _child_seeds(seed, n):
    """n independent integer seeds derived from one seed."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


class RNNLanguageModel(Module):
    """``logits, state = lm(x, state)``; ``lm.backward(dlogits)``.

    cell: "lstm", "gru", "rnn_tanh" or "rnn_relu". ``dropout`` is applied to
    the embeddings, between recurrent layers and before the decoder (training
    mode only). Everything random (weights, dropout masks) derives from
    ``seed``, so two models built with the same arguments are identical.
    """

    def __init__(self, vocab_size, embed_size=64, hidden_size=256, num_layers=1, cell="lstm",
                 dropout=0.0, dtype=np.float32, seed=0):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        if vocab_size < 1:
            raise ValueError("vocab_size must be >= 1")
        self.vocab_size = int(vocab_size)
        self.embed_size = int(embed_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.cell = cell
        self.dropout = float(dropout)
        self.dtype = np.dtype(dtype)
        self.seed = int(seed)
        s_emb, s_rnn, s_dec, s_d1, s_d2 = _child_seeds(self.seed, 5)

        self.encoder = Embedding(self.vocab_size, self.embed_size, dtype=self.dtype, rng=s_emb)
        self.drop_in = Dropout(self.dropout, rng=s_d1)
        rnn_dropout = self.dropout if self.num_layers > 1 else 0.0
        common = dict(num_layers=self.num_layers, dropout=rnn_dropout, dtype=self.dtype,
                      seed=s_rnn)
        if cell == "lstm":
            self.rnn = LSTM(self.embed_size, self.hidden_size, **common)
        elif cell == "gru":
            self.rnn = GRU(self.embed_size, self.hidden_size, **common)
        else:
            self.rnn = RNN(self.embed_size, self.hidden_size, nonlinearity=cell[4:], **common)
        self.drop_out = Dropout(self.dropout, rng=s_d2)
        self.decoder = Linear(self.hidden_size, self.vocab_size, dtype=self.dtype, rng=s_dec)

    # -- configuration ----------------------------------------------------------
    def config(self):
        """Constructor arguments (JSON-friendly); ``from_config`` rebuilds the model."""
        return dict(vocab_size=self.vocab_size, embed_size=self.embed_size,
                    hidden_size=self.hidden_size, num_layers=self.num_layers, cell=self.cell,
                    dropout=self.dropout, dtype=self.dtype.name, seed=self.seed)

    @classmethod
    def from_config(cls, cfg):
        return cls(**cfg)

    @property
    def is_lstm(self):
        return self.cell == "lstm"

    def extra_repr(self):
        return f"cell={self.cell!r}, vocab_size={self.vocab_size}"

    # -- state helpers ------------------------------------------------------------
    def init_state(self, batch_size):
        """Zero state for ``batch_size`` streams (same as passing ``None``)."""
        shape = (self.num_layers, batch_size, self.hidden_size)
        h = np.zeros(shape, self.dtype)
        return (h, np.zeros(shape, self.dtype)) if self.is_lstm else h

    def state_arrays(self, state):
        """State -> list of arrays ([h] or [h, c]); ``None`` -> []."""
        if state is None:
            return []
        return list(state) if self.is_lstm else [state]

    def state_from_arrays(self, arrays):
        """Inverse of :meth:`state_arrays`."""
        if not arrays:
            return None
        if self.is_lstm:
            h, c = arrays
            return (np.array(h, dtype=self.dtype), np.array(c, dtype=self.dtype))
        (h,) = arrays
        return np.array(h, dtype=self.dtype)

    def rng_states(self):
        """States of every random stream that training consumes (for exact resume)."""
        states = {"drop_in": self.drop_in.get_rng_state(),
                  "drop_out": self.drop_out.get_rng_state()}
        rnn_rng = getattr(self.rnn, "_dropout_rng", None)
        if isinstance(rnn_rng, np.random.Generator):
            states["rnn"] = rnn_rng.bit_generator.state
        return states

    def set_rng_states(self, states):
        self.drop_in.set_rng_state(states["drop_in"])
        self.drop_out.set_rng_state(states["drop_out"])
        rnn_rng = getattr(self.rnn, "_dropout_rng", None)
        if "rnn" in states and isinstance(rnn_rng, np.random.Generator):
            rnn_rng.bit_generator.state = states["rnn"]

    # -- compute ---------------------------------------------------------------------
    def forward(self, x, state=None):
        """x: (T, B) int ids. Returns logits (T, B, V) and the final state."""
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"x: expected (T, B) token ids, got shape {x.shape}")
        emb = self.drop_in(self.encoder(x))                     # (T, B, E)
        out, state = self.rnn(emb, state)                       # (T, B, H)
        logits = self.decoder(self.drop_out(out))               # (T, B, V)
        return logits, state

    def backward(self, dlogits, dstate=None):
        """Back-propagate d(loss)/d(logits) (T, B, V); gradients accumulate into
        ``.grad``. ``dstate=None`` cuts the gradient at the chunk's final state
        (truncated BPTT). Returns the gradient of the initial state."""
        dout = self.drop_out.backward(self.decoder.backward(dlogits))
        demb, dstate0 = self.rnn.backward(dout, dstate)
        self.encoder.backward(self.drop_in.backward(demb))
        return dstate0
