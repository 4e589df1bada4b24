"""Batching for truncated back-propagation through time (TBPTT).

A token stream is cut into ``B`` parallel streams (:func:`batchify`), and the
streams are walked in chunks of ``seq_len`` steps. Every chunk is a
:class:`Chunk` of time-major int64 arrays ``x`` and ``y`` (T, B) with
``y[t] = x[t+1]`` in the original stream, plus ``reset``: whether the model
must start this chunk from a zero state.

Two partitionings:

* ``"sequential"`` - chunk k+1 of stream b continues chunk k of stream b, so
  the final state of one chunk is the initial state of the next (``reset`` is
  True only for the first chunk of an epoch). The gradient is cut at the chunk
  border simply by not back-propagating into the previous chunk (pass
  ``dh_n=None`` to ``backward``). Each epoch starts at a random offset in
  [0, seq_len) when ``random_offset`` is true.
* ``"random"`` - the stream is cut (after a random offset) into
  non-overlapping sub-sequences of ``seq_len``; each epoch visits them in a
  random order, ``B`` at a time; every chunk starts from a zero state.

Iteration is resumable: :meth:`TBPTTLoader.epoch` takes the index of the
first chunk to yield, and the per-epoch randomness is derived from
``(seed, epoch)`` alone, so (epoch, step) is all a checkpoint has to save.
"""

from dataclasses import dataclass

import numpy as np

__all__ = ["batchify", "Chunk", "TBPTTLoader", "eval_streams"]


def batchify(ids, batch_size):
    """Cut a 1-D id array into ``batch_size`` contiguous streams.

    Returns a C-contiguous (N, B) array whose column b is stream b
    (``N = len(ids) // B``; the remainder is dropped).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"batchify expects a 1-D id array, got shape {ids.shape}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    n = len(ids) // batch_size
    if n == 0:
        raise ValueError(f"{len(ids)} tokens are too few for batch size {batch_size}")
    return np.ascontiguousarray(ids[: n * batch_size].reshape(batch_size, n).T)


@dataclass
class Chunk:
    x: np.ndarray       # (T, B) input ids
    y: np.ndarray       # (T, B) target ids (next tokens)
    reset: bool         # start from a zero state?
    epoch: int
    index: int          # position of this chunk within its epoch

    @property
    def num_tokens(self):
        return int(self.y.size)


class TBPTTLoader:
    """Chunks of a token stream for TBPTT training, epoch by epoch.

    ``for chunk in loader.epoch(e, start=k)`` yields chunks k, k+1, ... of
    epoch e; ``len(loader)`` (or ``loader.chunks_per_epoch(e)``) is the number
    of chunks in an epoch. ``mode`` is ``"sequential"`` or ``"random"`` (see
    the module docstring).
    """

    def __init__(self, ids, batch_size, seq_len, mode="sequential", seed=0,
                 random_offset=True):
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError("ids must be 1-D")
        if mode not in ("sequential", "random"):
            raise ValueError(f"mode must be 'sequential' or 'random', got {mode!r}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError("batch_size and seq_len must be >= 1")
        self.ids = ids
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.mode = mode
        self.seed = int(seed)
        self.random_offset = bool(random_offset)
        self._layout_cache = (None, None)
        need = self.batch_size * (self.seq_len + 1) if mode == "random" else self.batch_size * 2
        if len(ids) < need:
            raise ValueError(f"{len(ids)} tokens are too few for batch size {batch_size} and "
                             f"sequence length {seq_len} ({mode} batching needs at least {need})")

    def _offset(self, epoch):
        if not self.random_offset:
            return 0
        rng = np.random.default_rng([self.seed, epoch])
        # never let the offset leave fewer than 2 tokens per stream
        limit = min(self.seq_len, len(self.ids) - self.batch_size * (
            self.seq_len + 1 if self.mode == "random" else 2) + 1)
        return int(rng.integers(0, max(limit, 1)))

    def _layout(self, epoch):
        if self._layout_cache[0] != epoch:
            make = self._sequential_layout if self.mode == "sequential" else self._random_layout
            self._layout_cache = (epoch, make(epoch))
        return self._layout_cache[1]

    def _sequential_layout(self, epoch):
        data = batchify(self.ids[self._offset(epoch):], self.batch_size)
        starts = list(range(0, data.shape[0] - 1, self.seq_len))
        return data, starts

    def _random_layout(self, epoch):
        off = self._offset(epoch)
        n_sub = (len(self.ids) - off - 1) // self.seq_len
        starts = off + self.seq_len * np.arange(n_sub)
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(n_sub)
        n_batches = n_sub // self.batch_size
        return starts[order][: n_batches * self.batch_size].reshape(n_batches, self.batch_size)

    def chunks_per_epoch(self, epoch=0):
        if self.mode == "sequential":
            return len(self._layout(epoch)[1])
        return len(self._layout(epoch))

    def __len__(self):
        return self.chunks_per_epoch(0)

    def tokens_per_epoch(self, epoch=0):
        return sum(c.num_tokens for c in self.epoch(epoch))

    def epoch(self, epoch, start=0):
        """Yield the chunks of ``epoch`` from chunk index ``start`` on."""
        if self.mode == "sequential":
            data, starts = self._layout(epoch)
            for k in range(start, len(starts)):
                i = starts[k]
                T = min(self.seq_len, data.shape[0] - 1 - i)
                yield Chunk(data[i:i + T], data[i + 1:i + 1 + T], k == 0, epoch, k)
        else:
            batches = self._layout(epoch)
            T = self.seq_len
            steps = np.arange(T + 1)
            for k in range(start, len(batches)):
                idx = batches[k][None, :] + steps[:, None]          # (T+1, B)
                seq = self.ids[idx]
                yield Chunk(np.ascontiguousarray(seq[:-1]), np.ascontiguousarray(seq[1:]),
                            True, epoch, k)

    def __iter__(self):
        return self.epoch(0)


def eval_streams(ids, num_streams, pad_id=0, ignore_index=-100):
    """Lay out a whole evaluation text so every token after the first is
    predicted exactly once.

    The ids are split into ``num_streams`` contiguous streams that overlap by
    one token (stream b's last input token is stream b+1's first), so the
    targets of all streams together are ``ids[1:]``. Streams are padded at the
    end to equal length: inputs with ``pad_id``, targets with ``ignore_index``
    (padding comes after the real tokens, so it cannot affect them).

    Returns ``(x, y)``, time-major (N, S) int64 arrays; walk them in chunks of
    any length, carrying the state, and average the loss over non-ignored
    targets (there are ``len(ids) - 1`` of them).
    """
    ids = np.asarray(ids, dtype=np.int64)
    n_targets = len(ids) - 1
    if n_targets < 1:
        raise ValueError("need at least 2 tokens to evaluate")
    S = max(1, min(int(num_streams), n_targets))
    bounds = np.linspace(0, n_targets, S + 1).round().astype(np.int64)
    L = int(np.diff(bounds).max())
    x = np.full((L, S), pad_id, dtype=np.int64)
    y = np.full((L, S), ignore_index, dtype=np.int64)
    for b in range(S):
        lo, hi = bounds[b], bounds[b + 1]
        x[: hi - lo, b] = ids[lo:hi]
        y[: hi - lo, b] = ids[lo + 1:hi + 1]
    return x, y
