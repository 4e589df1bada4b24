"""Embedding: integer ids -> rows of a (num_embeddings, embedding_dim) table."""

import numpy as np

from fastrnn.modules.module import NO_CACHE, Module, Parameter
from fastrnn.nn.init import as_generator, normal_

__all__ = ["Embedding"]


class Embedding(Module):
    """Lookup table. ``forward(ids)`` maps an integer array of any shape S to
    an array of shape S + (embedding_dim,).

    ``backward(dout)`` accumulates into ``weight.grad`` (rows of repeated ids
    add up) and returns ``None``: ids have no gradient.

    Initialisation is N(0, 1), as torch.nn.Embedding. ``padding_idx`` (if
    given) is a row that starts at zero and never receives gradient.
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None,
                 dtype=np.float32, rng=None):
        super().__init__()
        for name, v in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"Embedding: {name}: expected an integer >= 1, got {v!r}")
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        if padding_idx is not None:
            given = padding_idx
            if isinstance(given, bool) or not isinstance(given, (int, np.integer)):
                raise TypeError(f"Embedding: padding_idx: expected an integer, got {given!r}")
            padding_idx = int(given)
            if padding_idx < 0:
                padding_idx += self.num_embeddings
            if not 0 <= padding_idx < self.num_embeddings:
                raise ValueError(f"Embedding: padding_idx: expected an integer in "
                                 f"[-{num_embeddings}, {num_embeddings}), got {given}")
        self.padding_idx = padding_idx
        w = normal_((self.num_embeddings, self.embedding_dim), 1.0, as_generator(rng), dtype)
        if padding_idx is not None:
            w[padding_idx] = 0
        self.weight = Parameter(w)
        self._ids = None

    def _check(self, ids):
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":   # bool too: NumPy would index by mask
            if ids.size == 0 and ids.dtype.kind != "b":
                ids = ids.astype(np.int64)
            else:
                raise TypeError(f"Embedding expects integer ids, got dtype {ids.dtype}")
        if ids.size:
            bad = (ids < 0) | (ids >= self.num_embeddings)
            if bad.any():
                bad_id = ids[bad].flat[0]
                where = tuple(int(i) for i in np.argwhere(bad)[0])
                raise IndexError(
                    f"Embedding: id {int(bad_id)} at index {where} is out of range "
                    f"[0, {self.num_embeddings})")
        return ids

    def forward(self, ids):
        ids = self._check(ids)
        self._ids = ids if self.training else None   # what backward needs (eval: nothing)
        return self.weight.data[ids]

    def backward(self, dout):
        if self._ids is None:
            raise RuntimeError(NO_CACHE.format(type(self).__name__))
        want = self._ids.shape + (self.embedding_dim,)
        dout = np.asarray(dout)
        if dout.shape != want:
            raise ValueError(f"Embedding.backward: dout: expected shape {want} (the ids' shape "
                             f"+ (embedding_dim,)), got {dout.shape}")
        ids = self._ids.reshape(-1)
        dout = np.asarray(dout, dtype=self.weight.data.dtype).reshape(-1, self.embedding_dim)
        # Sum the rows of each id (np.add.at is ~10x slower): a stable sort keeps
        # each id's rows in their original order, so the sums are deterministic.
        if ids.size == 0:
            return None
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
        self.weight.grad[sorted_ids[starts]] += np.add.reduceat(dout[order], starts, axis=0)
        if self.padding_idx is not None:
            self.weight.grad[self.padding_idx] = 0
        return None

    def backward_table(self, dweight):
        """Accumulate a gradient of the whole table (num_embeddings, embedding_dim)
        into ``weight.grad`` (the padding row excepted): for a layer that read the
        table by id itself (the recurrent layers' x_ids)."""
        dweight = np.asarray(dweight, dtype=self.weight.data.dtype)
        if dweight.shape != self.weight.data.shape:
            raise ValueError(f"Embedding.backward_table: expected shape "
                             f"{self.weight.data.shape}, got {dweight.shape}")
        self.weight.grad += dweight
        if self.padding_idx is not None:
            self.weight.grad[self.padding_idx] = 0

    def extra_repr(self):
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s
