"""Linear: y = x W^T + b over the last axis."""

import math

import numpy as np

from fastrnn import _dense, _recurrent
from fastrnn._config import get_num_threads
from fastrnn.functional import PACK_MIN_ROWS, SMALL_WORK_FLOP
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
        x = np.ascontiguousarray(x, dtype=w.dtype)
        self._x = x
        x2 = x.reshape(-1, self.in_features)
        if x2.size == 0 or w.size == 0:   # nothing for the kernel to do
            y = np.matmul(x, w.T)
            if self.bias is not None:
                y += self.bias.data
            return y
        y = np.empty((x2.shape[0], self.out_features), w.dtype)
        threads = self._threads(x2.shape[0])
        bias = None if self.bias is None else self.bias.data
        if not self.training:
            # eval calls on the recurrent layers' worker pool, not an OpenMP team: a
            # decoder between recurrent steps (generation) then shares the cores with
            # nothing spinning (src/dense_eval.pxi)
            _recurrent.dense_forward(y, x2, w, bias, threads)
            return y.reshape(x.shape[:-1] + (self.out_features,))
        # a few rows on one thread: W read in place (packing it would cost more)
        pack = threads > 1 or x2.shape[0] >= PACK_MIN_ROWS
        _dense.forward(y, x2, w, bias, threads, pack)
        return y.reshape(x.shape[:-1] + (self.out_features,))

    def backward(self, dout):
        if self._x is None:
            raise RuntimeError("Linear.backward called before forward")
        x = self._x
        w = self.weight.data
        dout = np.asarray(dout)
        if dout.shape != x.shape[:-1] + (self.out_features,):
            raise ValueError(f"dout: expected shape {x.shape[:-1] + (self.out_features,)}, "
                             f"got {dout.shape}")
        d2 = np.ascontiguousarray(dout, dtype=w.dtype).reshape(-1, self.out_features)
        x2 = x.reshape(-1, self.in_features)
        if self.bias is not None:
            self.bias.grad += d2.sum(axis=0)
        if x2.size == 0 or w.size == 0:
            self.weight.grad += d2.T @ x2
            return np.matmul(dout.astype(w.dtype, copy=False), w)
        dx = np.empty_like(x2)
        dw_t = np.empty((self.in_features, self.out_features), w.dtype)
        _dense.backward(dx, dw_t, d2, x2, w, self._threads(x2.shape[0]))
        self.weight.grad += dw_t.T
        return dx.reshape(x.shape)

    def _threads(self, rows):
        """The kernels' thread count, or one for calls too small to repay a team."""
        flop = 2 * rows * self.in_features * self.out_features
        return 1 if flop < SMALL_WORK_FLOP else get_num_threads()

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")
