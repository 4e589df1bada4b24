"""StreamPool: many independent streams over one model, their states kept by fastrnn.

    pool = fastrnn.StreamPool(lstm, capacity=1024)     # eval-mode, uni-directional
    a, b = pool.open(), pool.open()
    y = pool.step([a, b], x)          # x (2, I): one frame each, or (T, 2, I): a chunk each
    h, c = pool.state(a)              # torch layout (L, 1, H)

The pool owns one state table per layer, (L, capacity, H) for h and for c
(LSTM). `step` runs one batched kernel call over the listed streams: the kernel
reads each stream's state from its table row and writes the new state back to
that row (row indices, no gather or scatter in Python). The model's weights are
packed once when the pool is built (a float model as packed float32, a model
from `fastrnn.quantize` as it is): later changes to the model's parameters do
not reach the pool.

For an RNNLanguageModel (float or quantised), `x` is token ids, (n,) or (T, n),
and `step` returns logits (n, V) or (T, n, V).

Errors (unknown, closed or repeated ids, wrong shapes or dtypes) raise before
anything runs, so no stream's state changes. Threads: `step` may be called from
several threads at once; calls touching a common stream wait for each other,
others run in parallel (the kernel releases the GIL).
"""

import threading

import numpy as np

from fastrnn._validate import describe

__all__ = ["StreamPool"]


class StreamPool:
    """`capacity` streams over `model` (RNN/LSTM/GRU stack, or a language model)."""

    def __init__(self, model, capacity):
        from fastrnn.lm import RNNLanguageModel
        from fastrnn.modules.rnn import RNNBase
        from fastrnn.quantization import (QuantizedLanguageModel, _QuantizedStack, quantize)

        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) \
                or capacity < 1:
            raise ValueError(f"capacity: expected an integer >= 1, got {capacity!r}")
        self.capacity = int(capacity)
        self.encoder = self.decoder = None
        if not getattr(getattr(model, "rnn", model), "reset_after", True):
            raise ValueError("model: a stream pool runs the quantised kernels, which have no "
                             "GRU with reset_after=False (the seed's GRU)")
        if isinstance(model, (RNNLanguageModel, QuantizedLanguageModel)):
            if isinstance(model, RNNLanguageModel):
                model = quantize(model, "float32")
            stack, self.encoder, self.decoder = model.rnn, model.encoder, model.decoder
        elif isinstance(model, RNNBase):
            if model.training:
                raise ValueError("model: expected an eval-mode module (call model.eval()); "
                                 "a pool runs inference only")
            if model.bidirectional:
                raise ValueError("model: a stream pool needs a uni-directional model, got "
                                 "bidirectional=True")
            stack = quantize(model, "float32")
        elif isinstance(model, _QuantizedStack):
            stack = model
        else:
            raise TypeError(f"model: expected an RNN/LSTM/GRU stack or an RNNLanguageModel "
                            f"(float or quantised), got {type(model).__name__}")
        if stack.bidirectional:
            raise ValueError("model: a stream pool needs a uni-directional model")
        self.stack = stack
        self.is_lstm = stack.mode_name == "LSTM"
        L, H = stack.num_layers, stack.hidden_size
        self.num_layers, self.hidden_size = L, H
        self._h = np.zeros((L, self.capacity, H), np.float32)
        self._c = np.zeros((L, self.capacity, H), np.float32) if self.is_lstm else None
        self._free = list(range(self.capacity - 1, -1, -1))   # pop() gives 0, 1, 2, ...
        self._open = set()
        self._busy = set()
        self._cond = threading.Condition()
        stack._kernels()   # pack now, not on the first step

    # -- bookkeeping -------------------------------------------------------------
    def __len__(self):
        return len(self._open)

    @property
    def open_ids(self):
        with self._cond:
            return sorted(self._open)

    def open(self):
        """A new stream with a zero state -> its id (an int in [0, capacity))."""
        with self._cond:
            if not self._free:
                raise RuntimeError(f"StreamPool: all {self.capacity} streams are open; "
                                   f"close one first")
            sid = self._free.pop()
            self._zero(sid)
            self._open.add(sid)
            return sid

    def _check_id(self, sid, name="id"):
        if isinstance(sid, bool) or not isinstance(sid, (int, np.integer)):
            raise TypeError(f"{name}: expected an int stream id, got {type(sid).__name__}")
        sid = int(sid)
        if sid not in self._open:
            raise KeyError(f"{name}: stream {sid} is not open (unknown or closed)")
        return sid

    def _exclusive(self, sid):
        """Wait until stream sid is not being stepped (caller holds the condition)."""
        while sid in self._busy:
            self._cond.wait()

    def _zero(self, sid):
        self._h[:, sid] = 0
        if self._c is not None:
            self._c[:, sid] = 0

    def close(self, sid):
        with self._cond:
            sid = self._check_id(sid)
            self._exclusive(sid)
            self._open.discard(sid)
            self._free.append(sid)

    def reset(self, sid):
        """Zero the stream's state."""
        with self._cond:
            sid = self._check_id(sid)
            self._exclusive(sid)
            self._zero(sid)

    def state(self, sid):
        """Copy of the state in torch layout: h (L, 1, H), or (h, c) for an LSTM."""
        with self._cond:
            sid = self._check_id(sid)
            self._exclusive(sid)
            h = self._h[:, sid:sid + 1].copy()
            return (h, self._c[:, sid:sid + 1].copy()) if self.is_lstm else h

    def set_state(self, sid, state):
        """Set the state from torch layout: h (L, 1, H) or (L, H); (h, c) for an LSTM."""
        shape = (self.num_layers, 1, self.hidden_size)
        if self.is_lstm:
            if type(state) not in (tuple, list) or len(state) != 2:
                raise TypeError(f"state: expected a tuple (h, c) for an LSTM, got "
                                f"{describe(state)}")
            arrays = [self._state_array("state[0]", state[0], shape),
                      self._state_array("state[1]", state[1], shape)]
        else:
            arrays = [self._state_array("state", state, shape)]
        with self._cond:
            sid = self._check_id(sid)
            self._exclusive(sid)
            self._h[:, sid] = arrays[0][:, 0]
            if self.is_lstm:
                self._c[:, sid] = arrays[1][:, 0]

    def _state_array(self, name, a, shape):
        a = np.asarray(a)
        if a.dtype.kind != "f":
            raise TypeError(f"{name}: expected a float array, got dtype {a.dtype}")
        if a.shape == (shape[0], shape[2]):
            a = a[:, None]
        if a.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")
        return a.astype(np.float32)

    # -- stepping -----------------------------------------------------------------
    def _ids(self, ids):
        """-> (rows (n,) intp array for the kernel, the same ids as a list of ints)."""
        arr = np.asarray(ids)
        if arr.ndim == 0:
            arr = arr[None]
        if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
            raise TypeError(f"ids: expected a non-empty list of int stream ids, got "
                            f"{arr.dtype} array of shape {arr.shape}")
        rows = arr.astype(np.intp)
        listed = rows.tolist()
        if len(set(listed)) != len(listed):
            raise ValueError(f"ids: each stream may appear once per step, got repeats in "
                             f"{listed}")
        return rows, listed

    def _inputs(self, x, n):
        """-> (x3 (T, n, I) float32 or ids (T, n), single frame?)."""
        if self.encoder is not None:
            a = np.asarray(x)
            if a.dtype.kind not in "iu":
                raise TypeError(f"x: expected integer token ids, got dtype {a.dtype}")
            if a.shape == (n,):
                return a[None], True
            if a.ndim == 2 and a.shape[1] == n and a.shape[0] >= 1:
                return a, False
            raise ValueError(f"x: expected token ids of shape ({n},) or (T, {n}), got {a.shape}")
        I = self.stack.input_size
        if type(x) is not np.ndarray or x.dtype != np.float32:
            raise TypeError(f"x: expected a float32 numpy array, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.shape == (n, I):
            return np.ascontiguousarray(x)[None], True
        if x.ndim == 3 and x.shape[1:] == (n, I) and x.shape[0] >= 1:
            return np.ascontiguousarray(x), False
        raise ValueError(f"x: expected shape ({n}, {I}) or (T, {n}, {I}) for {n} streams, "
                         f"got {x.shape}")

    def step(self, ids, x):
        """Advance the streams `ids` by x; returns their outputs in the order given:
        (n, H) for x (n, I), (T, n, H) for x (T, n, I); logits for a language model."""
        rows, listed = self._ids(ids)
        n = len(rows)
        x3, single = self._inputs(x, n)
        if self.encoder is not None:
            x3 = self.encoder(x3)          # checks the id range; (T, n, E) float32
        with self._cond:
            if not self._open.issuperset(listed):
                sid = next(s for s in listed if s not in self._open)
                raise KeyError(f"ids: stream {sid} is not open (unknown or closed)")
            waited = False
            while not self._busy.isdisjoint(listed):
                self._cond.wait()
                waited = True
            if waited and not self._open.issuperset(listed):   # closed while we waited
                sid = next(s for s in listed if s not in self._open)
                raise KeyError(f"ids: stream {sid} was closed")
            self._busy.update(listed)
        try:
            y = self.stack._run(x3, self._h, self._c, self._h, self._c, rows, rows,
                                self.capacity)
        finally:
            with self._cond:
                self._busy.difference_update(listed)
                self._cond.notify_all()
        if self.decoder is not None:
            y = self.decoder(y)
        return y[0] if single else y
