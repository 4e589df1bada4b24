"""Linear: y = x W^T + b over the last axis."""

import math

import numpy as np

from fastrnn.modules.module import Module, Parameter
from fastrnn.nn.init import as_generator, uniform_

__all__ = ["Linear"]


class Linear(Module):
    """Affine map of the last axis: (..., in_features) -> (..., out_features).

    ``weight`` is (out_features, in_features) and ``bias`` (out_features,), as
    torch.nn.Linear, initialised from U(-1/sqrt(in), 1/sqrt(in)).
    ``backward(dout)`` accumulates ``weight.grad``/``bias.grad`` and returns dx.
    """

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, rng=None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        gen = as_generator(rng)
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        self.weight = Parameter(uniform_((self.out_features, self.in_features), bound, gen, dtype))
        if bias:
            self.bias = Parameter(uniform_((self.out_features,), bound, gen, dtype))
        else:
            self.bias = None
        self._x = None

    def forward(self, x):
        x = np.asarray(x)
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"Linear expects last dim {self.in_features}, got shape {x.shape}")
        w = self.weight.data
        if x.dtype != w.dtype:
            x = x.astype(w.dtype)
        self._x = x
        y = np.matmul(x, w.T)
        if self.bias is not None:
            y += self.bias.data
        return y

    def backward(self, dout):
        if self._x is None:
            raise RuntimeError("Linear.backward called before forward")
        x = self._x
        w = self.weight.data
        dout = np.asarray(dout, dtype=w.dtype)
        d2 = dout.reshape(-1, self.out_features)
        x2 = x.reshape(-1, self.in_features)
        self.weight.grad += d2.T @ x2
        if self.bias is not None:
            self.bias.grad += d2.sum(axis=0)
        return np.matmul(dout, w)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")
