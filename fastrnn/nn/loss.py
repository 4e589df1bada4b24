"""Losses: fused softmax cross-entropy (with ignore_index) and mean squared error.

Each loss is available as a function returning ``(loss, grad)`` and as a
module whose ``forward`` returns the loss (a Python float) and whose
``backward(scale=1.0)`` returns the gradient with respect to the input.
"""

import numpy as np

from fastrnn.modules.module import NO_CACHE, Module

__all__ = ["log_softmax", "softmax", "softmax_cross_entropy", "mse",
           "CrossEntropyLoss", "MSELoss"]

_REDUCTIONS = ("mean", "sum", "none")


def log_softmax(x, axis=-1):
    """Numerically stable log-softmax (subtracts the max first)."""
    x = np.asarray(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def softmax(x, axis=-1):
    """Numerically stable softmax."""
    x = np.asarray(x)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def softmax_cross_entropy(logits, targets, ignore_index=-100, reduction="mean",
                          need_grad=True):
    """Cross-entropy of ``softmax(logits)`` against integer ``targets``.

    logits: (..., C) floats; targets: (...) integers in [0, C) or
    ``ignore_index`` (those positions contribute neither loss nor gradient).

    reduction "mean" divides by the number of non-ignored targets (0.0 when
    there are none), "sum" adds them, "none" returns the per-position losses
    (0 where ignored). Returns ``(loss, dlogits)``; ``dlogits`` is the gradient
    of the reduced loss (for "none", of the sum) and ``None`` when
    ``need_grad`` is false. Work is done in the logits' dtype; the reduced loss
    is accumulated in float64.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    logits = np.asarray(logits)
    if logits.dtype.kind != "f":
        logits = logits.astype(np.float64)
    targets = np.asarray(targets)
    if targets.dtype.kind not in "iu":
        raise TypeError(f"targets must be integers, got dtype {targets.dtype}")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape (..., C) with C >= 1 classes, got "
                         f"{logits.shape}")
    C = logits.shape[-1]
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {targets.shape} does not match logits "
                         f"shape {logits.shape} without its class axis")
    flat = logits.reshape(-1, C)
    t = targets.reshape(-1)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= C))
    if bad.any():
        raise IndexError(f"target {int(t[bad][0])} is out of range [0, {C}) "
                         f"(and is not ignore_index={ignore_index})")
    safe_t = np.where(valid, t, 0)
    rows = np.arange(flat.shape[0])

    shifted = flat - flat.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sumexp = exp.sum(axis=1)
    # where(), not * valid: an ignored row's NaN or inf must not reach the loss (NaN * 0)
    per = np.where(valid, np.log(sumexp) - shifted[rows, safe_t], 0)
    n_valid = int(valid.sum())

    if reduction == "mean":
        loss = float(per.sum(dtype=np.float64) / n_valid) if n_valid else 0.0
        scale = 1.0 / n_valid if n_valid else 0.0
    elif reduction == "sum":
        loss = float(per.sum(dtype=np.float64))
        scale = 1.0
    else:
        loss = per.reshape(targets.shape)
        scale = 1.0
    if not need_grad:
        return loss, None
    grad = exp
    grad /= sumexp[:, None]
    grad[rows, safe_t] -= 1
    grad *= (valid * scale).astype(grad.dtype)[:, None]
    grad[~valid] = 0                      # (an ignored row of NaN stays NaN after * 0)
    return loss, grad.reshape(logits.shape)


def mse(pred, target, reduction="mean", need_grad=True):
    """Mean squared error. Returns ``(loss, dpred)``."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    pred = np.asarray(pred)
    target = np.asarray(target, dtype=pred.dtype if pred.dtype.kind == "f" else np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
    diff = pred - target
    sq = diff * diff
    if reduction == "mean":
        n = max(diff.size, 1)
        loss = float(sq.sum(dtype=np.float64) / n)
        scale = 2.0 / n
    elif reduction == "sum":
        loss = float(sq.sum(dtype=np.float64))
        scale = 2.0
    else:
        loss = sq
        scale = 2.0
    if not need_grad:
        return loss, None
    return loss, diff * diff.dtype.type(scale)


class _Loss(Module):
    def __init__(self, reduction="mean"):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self._grad = None

    def backward(self, scale=1.0):
        """Gradient of (scale * loss) with respect to the forward input."""
        if self._grad is None:
            raise RuntimeError(NO_CACHE.format(type(self).__name__))
        g = self._grad
        if np.ndim(scale) == 0:
            if scale != 1.0:
                g = g * g.dtype.type(scale)
        else:  # reduction "none": per-position upstream gradient
            g = g * np.asarray(scale, dtype=g.dtype)[..., None] if g.ndim > np.ndim(scale) \
                else g * np.asarray(scale, dtype=g.dtype)
        return g


class CrossEntropyLoss(_Loss):
    """``loss = crit(logits, targets)``; ``dlogits = crit.backward()``.

    Fused, stable log-softmax + negative log-likelihood; see
    :func:`softmax_cross_entropy`.
    """

    def __init__(self, ignore_index=-100, reduction="mean"):
        super().__init__(reduction)
        self.ignore_index = ignore_index

    def forward(self, logits, targets):
        loss, self._grad = softmax_cross_entropy(
            logits, targets, self.ignore_index, self.reduction, need_grad=self.training)
        return loss

    def extra_repr(self):
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class MSELoss(_Loss):
    """``loss = crit(pred, target)``; ``dpred = crit.backward()``."""

    def forward(self, pred, target):
        loss, self._grad = mse(pred, target, self.reduction, need_grad=self.training)
        return loss

    def extra_repr(self):
        return f"reduction={self.reduction!r}"
