"""Recurrent language model: Embedding -> RNN/LSTM/GRU stack -> Linear decoder.

Parameter names match the classic torch word_language_model layout
(``encoder.weight``, ``rnn.weight_ih_l0``, ..., ``decoder.weight``), so an
equivalent torch module with attributes ``encoder``/``rnn``/``decoder`` loads
this model's ``state_dict`` and vice versa.

Shapes (time-major): ids x (T, B) -> logits (T, B, V). The recurrent state is
``h`` (L, B, H) for RNN/GRU and ``(h, c)`` for LSTM; ``None`` means zeros.
"""

import numpy as np

from fastrnn import _precision
from fastrnn.modules.module import Module
from fastrnn.modules.rnn import GRU, LSTM, RNN
from fastrnn.nn import Dropout, Embedding, Linear, LockedDropout, WeightDrop

__all__ = ["CELLS", "RNNLanguageModel"]

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def _child_seeds(seed, n):
    """n independent integer seeds derived from one seed."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


def _lock_inter_layer_dropout(rnn):
    """Make the stack's dropout between layers locked: its masks are drawn as
    (1, B, F), one per sequence, and broadcast over the T steps (the stack
    multiplies its layer output and, in backward, its gradient by the mask)."""
    per_element = rnn._dropout_mask

    def per_sequence(shape):                      # shape (T, B, F) -> mask (1, B, F)
        return per_element((1,) + tuple(shape[1:]))

    object.__setattr__(rnn, "_dropout_mask", per_sequence)


class RNNLanguageModel(Module):
    """``logits, state = lm(x, state)``; ``lm.backward(dlogits)``.

    cell: "lstm", "gru", "rnn_tanh" or "rnn_relu" (``reset_after=False`` with "gru":
    the seed's GRU, fastrnn.GRU's option). ``dropout`` is applied to
    the embeddings, between recurrent layers and before the decoder (training
    mode only); with ``locked_dropout`` each of those masks is drawn once per
    sequence, shape (1, B, F), and shared by every time step of the chunk
    (variational dropout) instead of once per element. ``weight_drop`` is
    DropConnect on every layer's recurrent weights W_hh (one mask per forward
    call, as in AWD-LSTM; :class:`fastrnn.nn.WeightDrop`). Everything random
    (weights, dropout masks) derives from ``seed``, so two models built with
    the same arguments are identical.
    """

    def __init__(self, vocab_size, embed_size=64, hidden_size=256, num_layers=1, cell="lstm",
                 dropout=0.0, dtype=np.float32, seed=0, weight_drop=0.0, locked_dropout=False,
                 reset_after=True):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        if not isinstance(reset_after, (bool, np.bool_)) or (not reset_after and cell != "gru"):
            raise ValueError(f"reset_after: expected True, or False for cell='gru' (the seed's "
                             f"GRU), got {reset_after!r} for cell={cell!r}")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1], got {dropout!r}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size: expected an integer >= 1, got {vocab_size!r}")
        self.vocab_size = int(vocab_size)
        self.embed_size = int(embed_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.cell = cell
        self.dropout = float(dropout)
        self.dtype = np.dtype(dtype)
        self.seed = int(seed)
        self.weight_drop = float(weight_drop)
        if not 0.0 <= self.weight_drop < 1.0:
            raise ValueError(f"weight_drop must be in [0, 1), got {weight_drop}")
        self.locked_dropout = bool(locked_dropout)
        self.reset_after = bool(reset_after)
        # (children 0-4 are those of models built before weight drop existed: same weights)
        s_emb, s_rnn, s_dec, s_d1, s_d2, s_wd = _child_seeds(self.seed, 6)
        drop = LockedDropout if self.locked_dropout else Dropout

        self.encoder = Embedding(self.vocab_size, self.embed_size, dtype=self.dtype, rng=s_emb)
        self.drop_in = drop(self.dropout, rng=s_d1)
        rnn_dropout = self.dropout if self.num_layers > 1 else 0.0
        common = dict(num_layers=self.num_layers, dropout=rnn_dropout, dtype=self.dtype,
                      seed=s_rnn)
        if cell == "lstm":
            self.rnn = LSTM(self.embed_size, self.hidden_size, **common)
        elif cell == "gru":
            self.rnn = GRU(self.embed_size, self.hidden_size, reset_after=self.reset_after,
                           **common)
        else:
            self.rnn = RNN(self.embed_size, self.hidden_size, nonlinearity=cell[4:], **common)
        if self.locked_dropout:
            _lock_inter_layer_dropout(self.rnn)
        # not a Module: the parameter names (rnn.weight_hh_l0, ...) stay torch's
        self._weight_drop = None
        if self.weight_drop > 0:
            names = [f"weight_hh_l{k}" for k in range(self.num_layers)]
            self._weight_drop = WeightDrop(self.rnn, names, self.weight_drop, rng=s_wd)
        self.drop_out = drop(self.dropout, rng=s_d2)
        self.decoder = Linear(self.hidden_size, self.vocab_size, dtype=self.dtype, rng=s_dec)
        self._by_id = False   # the last forward's first layer read the embeddings by id

    # -- configuration ----------------------------------------------------------
    def config(self):
        """Constructor arguments (JSON-friendly); ``from_config`` rebuilds the model."""
        return dict(vocab_size=self.vocab_size, embed_size=self.embed_size,
                    hidden_size=self.hidden_size, num_layers=self.num_layers, cell=self.cell,
                    dropout=self.dropout, dtype=self.dtype.name, seed=self.seed,
                    weight_drop=self.weight_drop, locked_dropout=self.locked_dropout,
                    reset_after=self.reset_after)

    @classmethod
    def from_config(cls, cfg):
        return cls(**cfg)

    @property
    def is_lstm(self):
        return self.cell == "lstm"

    def extra_repr(self):
        s = f"cell={self.cell!r}, vocab_size={self.vocab_size}"
        if self.weight_drop:
            s += f", weight_drop={self.weight_drop}"
        if self.locked_dropout:
            s += ", locked_dropout=True"
        return s

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
        if self._weight_drop is not None:
            states["weight_drop"] = self._weight_drop.get_rng_state()
        return states

    def set_rng_states(self, states):
        self.drop_in.set_rng_state(states["drop_in"])
        self.drop_out.set_rng_state(states["drop_out"])
        rnn_rng = getattr(self.rnn, "_dropout_rng", None)
        if "rnn" in states and isinstance(rnn_rng, np.random.Generator):
            rnn_rng.bit_generator.state = states["rnn"]
        if self._weight_drop is not None and "weight_drop" in states:
            self._weight_drop.set_rng_state(states["weight_drop"])

    # -- compute ---------------------------------------------------------------------
    def _embeddings_by_id(self, T, B):
        """Training with no dropout on the embeddings, a vocabulary of at most T*B rows
        and float products: the first layer reads the embedding table by id (x_ids)
        and takes its input projections from rows of x W_ih^T (fastrnn/_ids_input.py).
        (A larger vocabulary would gather rows and sum a dense table gradient: slower
        than the embedding's own backward, which touches only the rows used.)"""
        return (self.training and self.drop_in.p == 0.0 and self.vocab_size <= T * B
                and not _precision.bf16_products(self.dtype))

    def forward(self, x, state=None):
        """x: (T, B) int ids. Returns logits (T, B, V) and the final state."""
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"x: expected (T, B) token ids, got shape {x.shape}")
        rnn = self.rnn if self._weight_drop is None else self._weight_drop
        self._by_id = self._embeddings_by_id(*x.shape)
        if self._by_id:
            ids = self.encoder._check(x).astype(np.intp, copy=False)   # (T, B)
            out, state = rnn(self.encoder.weight.data, state, x_ids=ids)   # (T, B, H)
        else:
            emb = self.drop_in(self.encoder(x))                 # (T, B, E)
            out, state = rnn(emb, state)                        # (T, B, H)
        logits = self.decoder(self.drop_out(out))               # (T, B, V)
        return logits, state

    def backward(self, dlogits, dstate=None):
        """Back-propagate d(loss)/d(logits) (T, B, V); gradients accumulate into
        ``.grad``. ``dstate=None`` cuts the gradient at the chunk's final state
        (truncated BPTT). Returns the gradient of the initial state."""
        dout = self.drop_out.backward(self.decoder.backward(dlogits))
        rnn = self.rnn if self._weight_drop is None else self._weight_drop
        dx, dstate0 = rnn.backward(dout, dstate)
        if self._by_id:
            self.encoder.backward_table(dx)                     # (V, E)
        else:
            self.encoder.backward(self.drop_in.backward(dx))    # (T, B, E)
        return dstate0
