"""Dropout with its own seeded random stream (inverted scaling)."""

import numpy as np

from fastrnn.modules.module import Module
from fastrnn.nn.init import as_generator, generator_state, set_generator_state

__all__ = ["Dropout"]


class Dropout(Module):
    """In training mode zero each element with probability ``p`` and scale the
    survivors by 1/(1-p); in eval mode (or p == 0) the identity.

    The mask comes from the module's own Generator (``rng``: None, int seed or
    Generator), so a run is reproducible; ``get_rng_state``/``set_rng_state``
    save and restore it (checkpoints use this for exact resume).
    """

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p
        self.rng = as_generator(rng)
        self._mask = None

    def forward(self, x):
        x = np.asarray(x)
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        if self.p == 1.0:
            self._mask = np.zeros(x.shape, dtype=x.dtype)
        else:
            keep = self.rng.random(x.shape) >= self.p
            self._mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.p))
        return x * self._mask

    def backward(self, dout):
        if self._mask is None:
            return dout
        return dout * self._mask

    def get_rng_state(self):
        return generator_state(self.rng)

    def set_rng_state(self, state):
        set_generator_state(self.rng, state)

    def extra_repr(self):
        return f"p={self.p}"
