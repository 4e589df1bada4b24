"""Weight drop (DropConnect on weights, as AWD-LSTM applies it to W_hh).

    W' = W * M,   M[i, j] = 0 with probability p, else 1/(1-p)

One mask per weight per forward call (per batch of sequences): the same W'
serves every time step and every sequence of that call. The wrapped module
runs on W' (its parameter's ``data`` is W' during the forward call, so the
kernels, which take whatever weight array they are given, see W'), and
``backward`` routes the gradient back through the mask to the raw weight:

    dL/dW = M * dL/dW'

In eval mode (or p == 0) the module runs on the raw weights.
"""

import numpy as np

from fastrnn.nn.init import as_generator, generator_state, set_generator_state

__all__ = ["WeightDrop"]


class WeightDrop:
    """DropConnect on the parameters ``names`` of ``module``.

    ``wd = WeightDrop(lstm, ["weight_hh_l0"], p=0.3, rng=0)``, then
    ``out, state = wd(x, state)`` (same arguments as ``lstm(...)``) and
    ``dx, dstate = wd.backward(dout, dstate)`` (same as ``lstm.backward``).

    Not a Module: it holds no parameters of its own and registers nothing, so
    the wrapped module's parameter names (and a model's ``state_dict``) are
    unchanged. The masks come from its own Generator (``rng``: None, int seed
    or Generator); ``get_rng_state``/``set_rng_state`` save and restore it.
    """

    def __init__(self, module, names, p=0.5, rng=None):
        p = float(p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p: expected a weight drop probability in [0, 1), got {p}")
        names = list(names)
        if not names:
            raise ValueError("WeightDrop: names must list at least one parameter")
        own = dict(module.named_parameters(remove_duplicate=False))
        for n in names:
            if n not in own:
                raise ValueError(f"WeightDrop: {type(module).__name__} has no parameter {n!r} "
                                 f"(it has {', '.join(own)})")
        self.module = module
        self.names = names
        self.p = p
        self.rng = as_generator(rng)
        # (masks, masked weights) of training-mode forwards not yet given their backward,
        # most recent last: one for a layer, one per cached step for a cell stepped
        # through time (its backward runs last step first)
        self._pending = []

    @property
    def training(self):
        return self.module.training

    def _param(self, name):
        """The Parameter called `name` in the module (a dotted name reaches a child's)."""
        m = self.module
        *path, last = name.split(".")
        for part in path:
            m = m._modules[part]
        return m._parameters[last]

    def draw_masks(self):
        """The next masks from this object's stream, one per name (in ``names``
        order), each shaped and typed like its weight."""
        masks = {}
        scale = 1.0 / (1.0 - self.p)
        for n in self.names:
            w = self._param(n).data
            keep = self.rng.random(w.shape) >= self.p
            masks[n] = keep.astype(w.dtype) * w.dtype.type(scale)
        return masks

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        if not self.module.training or self.p == 0.0:
            self._pending.clear()
            return self.module(*args, **kwargs)
        masks = self.draw_masks()
        params = {n: self._param(n) for n in self.names}
        raw = {n: p.data for n, p in params.items()}
        masked = {n: raw[n] * masks[n] for n in self.names}   # W' = W * M, fresh arrays
        try:
            for n, p in params.items():
                p.data = masked[n]
            out = self.module(*args, **kwargs)        # the forward cache keeps W'
        finally:
            for n, p in params.items():
                p.data = raw[n]                       # the raw weight is untouched
        self._pending.append((masks, masked))
        # a cell keeps a mask per cached step; a layer or block the last forward's (its
        # cache answers any backward until the next forward)
        cached = getattr(self.module, "num_cached_steps", 1)
        del self._pending[:max(0, len(self._pending) - cached)]
        return out

    def backward(self, *args, **kwargs):
        """The module's backward, run on the masked weights W' of the forward it
        answers (a module whose backward reads its weights, as Linear's does, then
        sees W'); the gradients of W' are multiplied by their masks and added into
        the raw weights' ``grad``."""
        if not self._pending:
            return self.module.backward(*args, **kwargs)
        masks, masked = self._pending[-1]
        params = {n: self._param(n) for n in self.names}
        raw = {n: p.data for n, p in params.items()}
        saved = {n: p.grad for n, p in params.items()}
        try:
            for n, p in params.items():
                p.data = masked[n]
                p.grad = np.zeros_like(saved[n])      # collects dL/dW' alone
            result = self.module.backward(*args, **kwargs)
            for n, p in params.items():
                saved[n] += masks[n] * p.grad         # dL/dW = M * dL/dW'
        finally:
            for n, p in params.items():
                p.data = raw[n]
                p.grad = saved[n]
        if hasattr(self.module, "num_cached_steps"):   # a cell: that step is answered
            self._pending.pop()
        return result

    def get_rng_state(self):
        return generator_state(self.rng)

    def set_rng_state(self, state):
        set_generator_state(self.rng, state)

    def __repr__(self):
        return f"WeightDrop(p={self.p}, names={self.names})"
