"""Dropout with its own seeded random stream (inverted scaling): element-wise
(:class:`Dropout`) and locked / variational (:class:`LockedDropout`, one mask
per sequence shared by every time step)."""

import numpy as np

from fastrnn.modules.module import Module
from fastrnn.nn.init import as_generator, generator_state, set_generator_state

__all__ = ["Dropout", "LockedDropout"]


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
            raise ValueError(f"p: expected a dropout probability in [0, 1], got {p}")
        self.p = p
        self.rng = as_generator(rng)
        self._mask = None

    def forward(self, x):
        x = np.asarray(x)
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        if x.dtype.kind != "f":   # the scale 1/(1-p) would be truncated
            raise TypeError(f"{type(self).__name__}: expected floating-point input, got "
                            f"dtype {x.dtype}")
        self._mask = self.draw_mask(self.mask_shape(x.shape), x.dtype)
        return x * self._mask

    def mask_shape(self, shape):
        """Shape of the mask drawn for an input of ``shape`` (element-wise: the same)."""
        return tuple(shape)

    def draw_mask(self, shape, dtype):
        """Draw the next mask from this module's stream: 0 with probability p,
        else 1/(1-p). (Public so that a comparison run in another framework can
        replay exactly the masks fastrnn uses, see bench/quality.py.)"""
        dtype = np.dtype(dtype)
        if self.p == 1.0:
            return np.zeros(shape, dtype=dtype)
        keep = self.rng.random(shape) >= self.p
        return keep.astype(dtype) * dtype.type(1.0 / (1.0 - self.p))

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


class LockedDropout(Dropout):
    """Locked (variational) dropout for time-major sequences (T, B, F): one mask
    of shape (1, B, F) per call, i.e. per sequence and feature, shared by all T
    time steps (Gal & Ghahramani 2016; AWD-LSTM's ``LockedDropout``). In eval
    mode (or p == 0) the identity. ``backward`` multiplies by the same mask.
    """

    def forward(self, x):
        x = np.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"LockedDropout expects time-major input (T, B, ...), got shape "
                             f"{x.shape}")
        return super().forward(x)

    def mask_shape(self, shape):
        return (1,) + tuple(shape[1:])
