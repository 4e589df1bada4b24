"""Linear: y = x W^T + b over the last axis."""

import math

import numpy as np

from fastrnn import _dense, _recurrent
from fastrnn._config import get_num_threads
from fastrnn._validate import FLOAT_DTYPES
from fastrnn.functional import PACK_MIN_ROWS, SMALL_WORK_FLOP
from fastrnn.modules.module import NO_CACHE, Module, Parameter
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

    def _checked_parameters(self):
        """(weight, bias) data as the kernels need them: weight (out_features,
        in_features), bias (out_features,) or None, one float dtype (a parameter
        replaced through `.data` is checked here, not only by load_state_dict)."""
        w = self.weight.data
        bias = None if self.bias is None else self.bias.data
        shape = (self.out_features, self.in_features)
        if (type(w) is np.ndarray and w.shape == shape and w.dtype in FLOAT_DTYPES
                and w.flags.c_contiguous and (bias is None or (
                    type(bias) is np.ndarray and bias.shape == shape[:1]
                    and bias.dtype == w.dtype and bias.flags.c_contiguous))):
            return w, bias   # the usual case, in a few attribute reads (a decoder per token)
        for name, a, want in (("weight", w, shape), ("bias", bias, shape[:1])):
            if a is None:
                continue
            if not isinstance(a, np.ndarray) or a.dtype not in FLOAT_DTYPES:
                raise TypeError(f"Linear.{name}: expected a float32 or float64 ndarray, got "
                                f"{type(a).__name__} {getattr(a, 'dtype', '')}".rstrip())
            if a.shape != want:
                raise ValueError(f"Linear.{name}: expected shape {want} (from out_features="
                                 f"{self.out_features}, in_features={self.in_features}), got "
                                 f"{a.shape}")
        if bias is not None and bias.dtype != w.dtype:
            raise TypeError(f"Linear.bias: expected dtype {w.dtype} (the weight's), got "
                            f"{bias.dtype}")
        return np.ascontiguousarray(w), None if bias is None else np.ascontiguousarray(bias)

    def forward(self, x):
        x = np.asarray(x)
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"Linear expects last dim {self.in_features}, got shape {x.shape}")
        w, bias = self._checked_parameters()
        if x.dtype != w.dtype:   # never a silent cast, as the recurrent layers
            raise TypeError(f"Linear: x: expected dtype {w.dtype} (the module's dtype), got "
                            f"{x.dtype}; convert with .astype(np.{w.dtype})")
        x = np.ascontiguousarray(x)
        self._x = x if self.training else None   # what backward needs (eval: nothing)
        x2 = x.reshape(-1, self.in_features)
        if x2.size == 0 or w.size == 0:   # nothing for the kernel to do
            y = np.matmul(x, w.T)
            if bias is not None:
                y += bias
            return y
        y = np.empty((x2.shape[0], self.out_features), w.dtype)
        threads = self._threads(x2.shape[0])
        if not self.training:
            # eval calls on the recurrent layers' worker pool, not an OpenMP team: a
            # decoder between recurrent steps (generation) then shares the cores with
            # nothing spinning (src/dense_eval.pxi)
            _recurrent.dense_forward(y, x2, w, bias, threads)
            return y.reshape(x.shape[:-1] + (self.out_features,))
        # a few rows: W read in place (packing it would cost more). Decided from the
        # shape alone, as in eval calls: the two kernels round differently, and the
        # numbers may depend on neither the thread count nor the mode
        pack = x2.shape[0] >= PACK_MIN_ROWS
        _dense.forward(y, x2, w, bias, threads, pack)
        return y.reshape(x.shape[:-1] + (self.out_features,))

    def backward(self, dout):
        if self._x is None:
            raise RuntimeError(NO_CACHE.format(type(self).__name__))
        x = self._x
        w, _ = self._checked_parameters()
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
