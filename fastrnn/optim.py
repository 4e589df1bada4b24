"""Optimisers (SGD, Adam, AdamW) and gradient clipping for fastrnn parameters.

The update rules follow torch.optim exactly (same order of operations), so a
model trained here and one trained with torch from the same weights and
gradients take the same steps up to floating-point rounding.

``state_dict()`` is a flat ``{str: numpy array}`` mapping (hyper-parameters
as 0-d arrays, per-parameter buffers as ``"state.<i>.<name>"``) that
``numpy.savez`` stores without pickle; ``load_state_dict`` checks it.
"""

import math

import numpy as np

from fastrnn.modules.module import Module, Parameter, check_writeable
from fastrnn import _adam, _recurrent
from fastrnn._config import get_num_threads

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "clip_grad_norm", "clip_grad_value",
           "grad_norm"]


def _as_number(name, value):
    """float(value), or a ValueError naming the argument."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None


def _at_least_zero(**values):
    """ValueError naming the first of the keyword arguments that is not a number >= 0
    (NaN included, which `< 0` lets through)."""
    for name, value in values.items():
        if not _as_number(name, value) >= 0:
            raise ValueError(f"{name}: expected a number >= 0, got {value!r}")


def _as_param_list(params):
    if isinstance(params, Module):
        params = params.parameters()
    elif isinstance(params, Parameter):
        params = [params]
    params = list(params)
    for p in params:
        if not isinstance(p, Parameter):
            raise TypeError(f"optimisers take fastrnn Parameters, got {type(p).__name__}")
    return params


class Optimizer:
    """Base class: a list of parameters, hyper-parameters and per-parameter state.

    Subclasses list their hyper-parameter names in ``_hyper`` and their
    per-parameter buffer names in ``_buffers``.
    """

    _hyper = ()
    _buffers = ()

    def __init__(self, params, **hyper):
        self.params = _as_param_list(params)
        if not self.params:
            raise ValueError("optimiser got an empty parameter list")
        for k, v in hyper.items():
            setattr(self, k, v)
        self.step_count = 0
        # state[i][name] -> array, created lazily on the first step
        self.state = [dict() for _ in self.params]

    def zero_grad(self):
        """Every parameter's gradient to zero (lazily: see fastrnn.Parameter)."""
        for p in self.params:
            p.zero_grad()

    def step(self):
        raise NotImplementedError

    def _check_writeable(self):
        """Before a step writes any parameter: a frozen one (Module.freeze()) is an
        error naming it, not a step half applied."""
        check_writeable(((f"params[{i}]", p) for i, p in enumerate(self.params)),
                        f"{type(self).__name__}.step")

    # -- checkpoints -----------------------------------------------------------
    def state_dict(self):
        sd = {"type": np.array(type(self).__name__),
              "num_params": np.array(len(self.params), dtype=np.int64),
              "step_count": np.array(self.step_count, dtype=np.int64)}
        for k in self._hyper:
            sd[f"hyper.{k}"] = np.array(getattr(self, k), dtype=np.float64)
        for i, st in enumerate(self.state):
            for name, arr in st.items():
                sd[f"state.{i}.{name}"] = np.array(arr, copy=True)
        return sd

    def load_state_dict(self, sd):
        def get(key):
            if key not in sd:
                raise ValueError(f"optimiser state dict has no {key!r}")
            return np.asarray(sd[key])

        kind = str(get("type"))
        if kind != type(self).__name__:
            raise ValueError(f"state dict is for {kind}, this optimiser is {type(self).__name__}")
        n = int(get("num_params"))
        if n != len(self.params):
            raise ValueError(f"state dict has {n} parameters, optimiser has {len(self.params)}")
        new_state = [dict() for _ in self.params]
        for key, value in sd.items():
            if not key.startswith("state."):
                continue
            _, idx, name = key.split(".", 2)
            i = int(idx)
            if not 0 <= i < n or name not in self._buffers:
                raise ValueError(f"unexpected optimiser state entry {key!r}")
            value = np.asarray(value)
            p = self.params[i]
            if value.shape != p.data.shape:
                raise ValueError(f"optimiser state {key!r}: shape {value.shape} does not "
                                 f"match parameter shape {p.data.shape}")
            new_state[i][name] = value.astype(p.data.dtype, copy=True)
        for k in self._hyper:
            v = get(f"hyper.{k}")
            setattr(self, k, tuple(float(x) for x in v) if v.ndim else
                    (bool(v) if isinstance(getattr(self, k), bool) else float(v)))
        self.step_count = int(get("step_count"))
        self.state = new_state

    def __repr__(self):
        hp = ", ".join(f"{k}={getattr(self, k)}" for k in self._hyper)
        return f"{type(self).__name__}({hp})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (torch semantics:
    the buffer starts as the first gradient), dampening, Nesterov momentum
    and L2 weight decay (added to the gradient)."""

    _hyper = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    _buffers = ("momentum_buffer",)

    def __init__(self, params, lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False):
        _at_least_zero(lr=lr, momentum=momentum, weight_decay=weight_decay)   # as torch.optim.SGD
        if not math.isfinite(_as_number("dampening", dampening)):
            raise ValueError(f"dampening: expected a finite number, got {dampening!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"nesterov=True: expected momentum > 0 and dampening 0, got "
                             f"momentum {momentum!r}, dampening {dampening!r}")
        super().__init__(params, lr=float(lr), momentum=float(momentum),
                         dampening=float(dampening), weight_decay=float(weight_decay),
                         nesterov=bool(nesterov))

    def step(self):
        self._check_writeable()
        self.step_count += 1
        lr, mom, damp, wd = self.lr, self.momentum, self.dampening, self.weight_decay
        for p, st in zip(self.params, self.state):
            g = p.grad
            if wd != 0:
                g = g + wd * p.data
            if mom != 0:
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = np.array(g, copy=True)
                else:
                    buf *= mom
                    buf += (1 - damp) * g
                g = g + mom * buf if self.nesterov else buf
            p.data -= lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction, as torch.optim.Adam:
    L2 ``weight_decay`` is added to the gradient. See :class:`AdamW` for the
    decoupled form."""

    _hyper = ("lr", "betas", "eps", "weight_decay")
    _buffers = ("exp_avg", "exp_avg_sq")
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        _at_least_zero(lr=lr, eps=eps, weight_decay=weight_decay)
        b1, b2 = (float(b) for b in betas)
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {tuple(betas)!r}")
        super().__init__(params, lr=float(lr), betas=(b1, b2), eps=float(eps),
                         weight_decay=float(weight_decay))

    def step(self):
        self._check_writeable()
        self.step_count += 1
        t = self.step_count
        lr, (b1, b2), eps, wd = self.lr, self.betas, self.eps, self.weight_decay
        step_size = lr / (1 - b1 ** t)
        bc2_sqrt = math.sqrt(1 - b2 ** t)
        n_threads = get_num_threads()
        for p, st in zip(self.params, self.state):
            g = p.grad
            if wd != 0:
                if self._decoupled:
                    p.data *= 1 - lr * wd
                else:
                    g = g + wd * p.data
            m = st.get("exp_avg")
            if m is None:
                m = st["exp_avg"] = np.zeros_like(p.data)
                st["exp_avg_sq"] = np.zeros_like(p.data)
            v = st["exp_avg_sq"]
            # one fused pass (src/_adam.pyx), bitwise the NumPy arithmetic:
            # m <- m + (1-b1)(g - m); v <- b2 v + (1-b2) g^2;
            # p <- p - step_size * m / (sqrt(v)/sqrt(bc2) + eps)
            data = p.data if p.data.flags.c_contiguous else np.ascontiguousarray(p.data)
            _adam.step(data.reshape(-1), np.ascontiguousarray(g, dtype=p.data.dtype).reshape(-1),
                       m.reshape(-1), v.reshape(-1), b1, b2, step_size, bc2_sqrt, eps,
                       n_threads)
            if data is not p.data:   # (reshape of a non-contiguous array is a copy)
                p.data[...] = data
        if n_threads > 1 and self.params:
            # its OpenMP workers spin now: an eval call right after runs alone until they
            # sleep, rather than team with a worker beside one (a stall, then calls alone
            # for a back-off of 10 ms or more; the window was the backward's, which a long
            # step outlasts)
            _recurrent.note_openmp()


class AdamW(Adam):
    """Adam with decoupled weight decay (torch.optim.AdamW; default 0.01)."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def grad_norm(params, norm_type=2.0):
    """Total norm of all gradients taken together (as one long vector), as
    torch.linalg.vector_norm takes it: inf the largest |g|, -inf the smallest, 0 the
    count of non-zeros; NaN anywhere gives NaN."""
    params = _as_param_list(params)
    norm_type = float(norm_type)
    if math.isinf(norm_type) or norm_type == 0.0:
        if norm_type == 0.0:
            parts = [float(np.count_nonzero(p.grad)) for p in params]
            if any(np.isnan(p.grad).any() for p in params if p.grad.size):
                return math.nan
            return float(sum(parts))
        pick = np.max if norm_type > 0 else np.min
        parts = [float(pick(np.abs(p.grad))) for p in params if p.grad.size]
        if not parts:
            return 0.0
        if any(math.isnan(v) for v in parts):   # Python's max() would skip a NaN
            return math.nan
        return float(max(parts) if norm_type > 0 else min(parts))
    if norm_type == 2.0:
        total = 0.0
        for p in params:
            g = p.grad.reshape(-1)
            total += float(np.dot(g, g))
        return math.sqrt(total)
    total = sum(float((np.abs(p.grad.astype(np.float64)) ** norm_type).sum()) for p in params)
    return total ** (1.0 / norm_type)


def clip_grad_norm(params, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """Scale all gradients in place so their total norm is at most ``max_norm``.

    Returns the total norm *before* clipping (like torch's clip_grad_norm_: the
    ``norm_type``-norm of the per-parameter norms, which for ``norm_type=0`` counts the
    parameters with a non-zero gradient; grad_norm counts elements).
    The scale is ``max_norm / (norm + 1e-6)``, applied only when below 1. A
    non-finite norm raises RuntimeError with ``error_if_nonfinite``; otherwise the
    gradients are scaled as torch scales them (by 0 for an infinite norm, so
    infinite entries become NaN; by NaN for a NaN norm).
    """
    params = _as_param_list(params)
    if float(norm_type) == 0.0:
        # torch takes the norm of the per-parameter norms: for 0, the count of
        # parameters whose gradient has a non-zero (NaN counts), not of elements
        total = float(sum(1 for p in params if np.count_nonzero(p.grad)))
    else:   # for every other norm_type the same as one long vector (grad_norm)
        total = grad_norm(params, norm_type)
    if not math.isfinite(total) and error_if_nonfinite:
        raise RuntimeError(f"the total gradient norm is {total}; cannot clip")
    coef = float(max_norm) / (total + 1e-6)
    if not coef >= 1.0:      # below 1, or NaN
        with np.errstate(invalid="ignore"):   # inf * 0, as torch: no warning
            for p in params:
                p.grad *= p.grad.dtype.type(coef)
    return total


def clip_grad_value(params, clip_value):
    """Clamp every gradient element to [-clip_value, clip_value] in place.

    Returns the total 2-norm of the gradients *before* clipping.
    """
    params = _as_param_list(params)
    _at_least_zero(clip_value=clip_value)
    total = grad_norm(params, 2.0)
    for p in params:
        np.clip(p.grad, -clip_value, clip_value, out=p.grad)
    return total
