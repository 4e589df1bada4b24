"""Parameter and Module: the small object model every layer is built on.

A `Parameter` is a pair of NumPy arrays, `data` and `grad` (same shape and
dtype). A `Module` finds its parameters and sub-modules from its attributes, in
the order they were assigned, and names them the way torch.nn does
(`lstm.weight_ih_l0`, `decoder.weight`), so that state dicts interchange.
"""

import contextlib
import copy
import functools
import math
import sys
import threading
from collections import OrderedDict, namedtuple

import numpy as np

from fastrnn._buffers import frozen_copy, is_frozen

__all__ = ["Parameter", "Module", "training_call", "grad_targets", "aligned_zeros", "aligned_copy",
           "parameter_budget", "weights_to_be_loaded", "charge_values", "ParameterBudgetError", "is_frozen",
           "check_writeable"]

# Parameters start on a cache line. The batch-1 kernels read W_ih and W_hh in place,
# and a 64-byte load that straddles two lines costs both; NumPy's own arrays usually
# do not start on one (large ones 16 bytes past a line). LSTMCell I=256 H=1024 eval
# step on the 2-core Zen 4 EPYC (AVX-512), four interleaved rounds of medians:
# 0.178 -> 0.155 ms; H=512 0.057 -> 0.052 ms; GRUCell H=1024 0.125 -> 0.113 ms
# (docs/inference.md).
ALIGN = 64

# What a block's backward (Linear, Embedding, losses) says without a forward cache:
# as the recurrent layers, only a training-mode forward keeps one (docs/layers.md).
NO_CACHE = ("{}.backward: no forward cache. Run forward in training mode (module.train()) "
            "before backward.")

# Guards the per-module bookkeeping of which threads are inside a call (held for
# a few dictionary operations only, never while a kernel runs).
_USE_LOCK = threading.Lock()
_get_ident = threading.get_ident


class ParameterBudgetError(ValueError):
    """Building a module would take more values than the parameter_budget allows."""


_budget = threading.local()   # .left: values the current thread may still build, or None


@contextlib.contextmanager
def parameter_budget(values):
    """Within the block, this thread building more than `values` array values in all
    (parameters and their gradients: twice the parameter count) raises
    ParameterBudgetError before the memory is taken. A loader builds a module from a
    file's config with a budget from the values the file stores, so that a config
    declaring absurd sizes fails at once instead of allocating them."""
    prev = getattr(_budget, "left", None)
    _budget.left = int(values)
    try:
        yield
    finally:
        _budget.left = prev


_init = threading.local()      # .skip: recurrent layers and cells built now keep zeros


@contextlib.contextmanager
def weights_to_be_loaded():
    """Within the block, fastrnn's recurrent layers and cells that this thread
    constructs skip their random init (their weights stay zeros; an explicit
    reset_parameters() still draws): a loader that then sets every parameter (a strict
    `load_state_dict`, which refuses a missing one) would throw the draws away. The
    init's stream is the layer's own, so nothing else draws differently. Loaders enter
    it for fastrnn's own classes only (a registered class may read its initial
    weights). LSTM I=H=512, two layers, from a file: its construction took 17 ms of a
    53 ms load (a helper's first-use scan, 2-core Xeon)."""
    prev = getattr(_init, "skip", False)
    _init.skip = True
    try:
        yield
    finally:
        _init.skip = prev


def init_skipped():
    """Is this thread inside weights_to_be_loaded (constructors skip their init)?"""
    return getattr(_init, "skip", False)


def charge_values(shape):
    """Count an array of `shape` (a tuple) against this thread's parameter_budget, if any."""
    left = getattr(_budget, "left", None)
    if left is None:
        return
    n = math.prod(int(d) for d in shape)   # Python ints: huge sizes do not wrap
    if n > left:
        raise ParameterBudgetError(f"an array of shape {shape} is over the budget "
                                   f"({left} values left)")
    _budget.left = left - n


def aligned_zeros(shape, dtype):
    """np.zeros(shape, dtype) whose data starts on an ALIGN-byte boundary."""
    charge_values(shape if isinstance(shape, tuple) else (shape,))
    dtype = np.dtype(dtype)
    dims = shape if isinstance(shape, tuple) else (shape,)
    nbytes = math.prod(int(d) for d in dims) * dtype.itemsize   # Python ints: no wrap
    if nbytes > np.iinfo(np.intp).max - ALIGN:
        raise MemoryError(f"an array of shape {shape} and dtype {dtype} would take "
                          f"{nbytes} bytes: more than any address space")
    raw = np.zeros(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned_copy(a, dtype=None):
    """A C-contiguous copy of array a (cast to dtype if given) whose data starts on an
    ALIGN-byte boundary."""
    out = aligned_zeros(a.shape, a.dtype if dtype is None else dtype)
    out[...] = a
    return out


def _aligned_deepcopy(value, memo):
    """copy.deepcopy(value, memo), an array copied straight into aligned memory (the
    same array met twice in one deepcopy gives one copy, as deepcopy does)."""
    if type(value) is not np.ndarray:
        return copy.deepcopy(value, memo)
    if id(value) not in memo:
        memo[id(value)] = aligned_copy(value)
    return memo[id(value)]


def training_call(method):
    """Decorator for a module's backward: a training call, exclusive to one thread."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        tid = self._begin_call(True)
        try:
            return method(self, *args, **kwargs)
        finally:
            self._end_call(tid)
    return wrapper


class Parameter:
    """A trainable array and the gradient that `backward` accumulates into it.

    `zero_grad()` does not write the gradient: it marks it as zero, and the
    next backward writes its gradient into the array instead of adding to it
    (for an LSTM layer of 1024 units that spares a 32 MB fill and a 32 MB add
    per step). Reading `.grad` before then fills it with zeros, so what `.grad`
    shows is always the sum of the backward calls since the last zero_grad.
    An array of an earlier `.grad` that is still referenced elsewhere keeps its
    values: zero_grad then gives the parameter a new array (as torch's default
    `zero_grad(set_to_none=True)` leaves a kept tensor alone).

    A cell stepped through time adds its steps' weight gradients all at once
    (`_pending`, fastrnn.modules.cells); every way of reading or changing the
    gradient here adds them first, so `.grad` always shows them (an array taken
    from `.grad` earlier and held sees them once they are added).
    """

    __slots__ = ("data", "_grad", "_grad_is_zero", "_pending")

    def __init__(self, data):
        self.data = np.ascontiguousarray(data)
        self._grad = aligned_zeros(self.data.shape, self.data.dtype)
        self._grad_is_zero = False
        self._pending = None    # None, or what adds the gradients a cell still owes

    def add_pending(self):
        """Add the gradients a cell's backward calls still owe this parameter."""
        if self._pending is not None:
            self._pending.add_pending()

    # Copies start on a cache line as the original did (NumPy's copies usually do not).
    def __copy__(self):
        self.add_pending()
        new = Parameter.__new__(Parameter)
        new.data, new._grad, new._grad_is_zero = self.data, self._grad, self._grad_is_zero
        new._pending = None
        return new

    def __deepcopy__(self, memo):
        self.add_pending()
        new = Parameter.__new__(Parameter)
        memo[id(self)] = new
        new.data = _aligned_deepcopy(self.data, memo)
        new._grad = _aligned_deepcopy(self._grad, memo)
        new._grad_is_zero = self._grad_is_zero
        new._pending = None
        return new

    def __getstate__(self):             # pickle: the gradient with what is owed added
        self.add_pending()
        return None, {"data": self.data, "_grad": self._grad,
                      "_grad_is_zero": self._grad_is_zero}

    def __setstate__(self, state):      # pickle
        _, slots = state
        object.__setattr__(self, "_pending", None)
        for name, value in slots.items():
            if name == "_pending":
                continue
            if (name in ("data", "_grad") and isinstance(value, np.ndarray)
                    and value.ctypes.data % ALIGN):
                value = aligned_copy(value)
            object.__setattr__(self, name, value)

    @property
    def grad(self):
        self.add_pending()
        if self._grad_is_zero:
            self._grad[...] = 0
            self._grad_is_zero = False
        return self._grad

    @grad.setter
    def grad(self, value):
        """An array of the parameter's shape (as torch, which refuses another size: a
        backward would otherwise fail half-way, some gradients already added), or None
        for zero (torch's "no gradient yet")."""
        self.add_pending()
        if value is None:
            self._grad = aligned_zeros(self.data.shape, self.data.dtype)
            self._grad_is_zero = True
            return
        if np.shape(value) != self.data.shape:
            raise ValueError(f"grad: expected an array of the parameter's shape "
                             f"{self.data.shape}, got shape {np.shape(value)}")
        self._grad = value
        self._grad_is_zero = False

    def _grad_references(self):
        """(references to the gradient array, to the array owning its memory or 0):
        a view of .grad refers to the owner, g.base. Counted by the same code for
        every parameter, so that _UNSHARED (these counts for a gradient nobody
        else holds, measured at import) is what they read in this interpreter
        (CPython 3.14 counts fewer references of locals than 3.13)."""
        g = self._grad
        n = sys.getrefcount(g)
        base = g.base
        return n, (sys.getrefcount(base) if base is not None else 0)

    def zero_grad(self):
        """Set the gradient to zero (lazily: see the class docstring)."""
        self.add_pending()
        n, nbase = self._grad_references()
        if n > _UNSHARED[0] or nbase > _UNSHARED[1]:
            # someone keeps the array or a view of it: it keeps its values
            self._grad = aligned_zeros(self._grad.shape, self._grad.dtype)
        self._grad_is_zero = True

    def add_grad(self, g):
        """grad += g (grad := g after zero_grad)."""
        self.add_pending()
        if self._grad_is_zero:
            self._grad[...] = g
            self._grad_is_zero = False
        else:
            self._grad += g

    def grad_target(self):
        """(array, accumulate) for a kernel to write this gradient into in place:
        accumulate False right after zero_grad (overwrite), else True (add).
        None when `.grad` was replaced by something the kernels cannot write (not
        a C-contiguous, writeable array of the parameter's shape and dtype, apart
        from the parameter's data): the caller then adds a fresh gradient with
        add_grad. Hand the gradient back to take_grad()."""
        self.add_pending()
        g = self._grad
        if (isinstance(g, np.ndarray) and g.dtype == self.data.dtype
                and g.shape == self.data.shape and g.flags.c_contiguous
                and g.flags.writeable and not np.may_share_memory(g, self.data)):
            return g, not self._grad_is_zero
        return None

    def take_grad(self, g):
        """Take one backward's gradient g: if g is the array grad_target() gave (a
        kernel wrote it there in place), mark it written; else add it."""
        self.add_pending()
        if g is self._grad:
            self._grad_is_zero = False
        else:
            self.add_grad(g)

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


def check_writeable(named, what):
    """Raise ValueError naming the first frozen parameter of `named` ((name, Parameter)
    pairs) before `what` (an optimiser step, a state dict load) writes any of them."""
    for name, p in named:
        if not p.data.flags.writeable:
            why = ("frozen by Module.freeze(); call unfreeze() first" if is_frozen(p.data)
                   else "its array is read-only")
            raise ValueError(f"{what}: parameter {name!r} cannot be written: {why}")


def reset_recurrent_parameters(module, rng=None):
    """torch's init of a recurrent layer or cell: every parameter ~ U(-1/sqrt(H),
    1/sqrt(H)), H its hidden_size, drawn in registration order from rng (a
    numpy Generator; None: fresh entropy)."""
    check_writeable(module.named_parameters(), f"{type(module).__name__}.reset_parameters")
    rng = np.random.default_rng() if rng is None else rng
    bound = 1.0 / math.sqrt(module.hidden_size)
    for _, p in module.named_parameters():
        fill_uniform(p.data, bound, rng)


# values drawn per piece by fill_uniform / fill_normal: a whole-array draw made a
# float64 temporary twice a float32 weight's size in fresh pages (LSTM(13, 2048):
# 134 MB, 231 ms of its 277 ms construction on the 2-core Xeon; by pieces 50-60 ms)
_DRAW_PIECE = 1 << 16


def fill_uniform(out, bound, rng):
    """out[...] = U(-bound, bound) draws of rng, in float64 then cast to out's dtype:
    bitwise what `rng.uniform(-bound, bound, out.shape)` gives, drawn piece by piece."""
    _fill_by_pieces(out, lambda n: rng.uniform(-bound, bound, n))


def fill_normal(out, std, rng):
    """out[...] = rng's standard normal draws times std, in float64 then cast to out's
    dtype: bitwise `rng.standard_normal(out.shape) * std`, piece by piece."""
    _fill_by_pieces(out, lambda n: rng.standard_normal(n) * std)


def _fill_by_pieces(out, draw):
    """out's values in C order from draw(n) (n values at a time, float64)."""
    if not out.flags.c_contiguous:     # (a reshape would be a copy: fill one, then out)
        whole = np.empty(out.shape, out.dtype)
        _fill_by_pieces(whole, draw)
        out[...] = whole
        return
    flat = out.reshape(-1)
    for s in range(0, flat.size, _DRAW_PIECE):
        e = min(flat.size, s + _DRAW_PIECE)
        flat[s:e] = draw(e - s)


def grad_targets(params):
    """(out, accumulate) for a functional backward's weight gradients: the
    parameters' .grad arrays, which the kernel then writes (right after
    zero_grad) or adds into; (None, False) when one of them cannot be written in
    place or they disagree on being zeroed. Hand each gradient the backward
    returns to its parameter's take_grad()."""
    targets = [p.grad_target() for p in params]
    if any(t is None for t in targets) or len({acc for _, acc in targets}) != 1:
        return None, False
    return tuple(g for g, _ in targets), targets[0][1]


# Parameter._grad_references() of a gradient nobody else holds (aligned_zeros'
# arrays are views of the buffer that owns their memory).
_UNSHARED = Parameter(np.zeros(1))._grad_references()


# what load_state_dict returns, named as torch's: unpacks as (missing, unexpected)
IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class Module:
    """Base class: parameter discovery, train/eval mode, state dicts."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        params = self.__dict__.get("_parameters")
        if params is None:
            raise AttributeError(
                f"{type(self).__name__}.__init__ must call Module.__init__() "
                f"before assigning {name!r}")
        params.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            params[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        if isinstance(value, Parameter) or (name != "training" and not name.startswith("_")):
            # the eval fast path's plan holds the parameter arrays it validated and
            # the settings it read (batch_first, bidirectional, ...): build it again.
            # Under the lock plans are built with, so that a plan another thread is
            # building from the old setting is dropped, not kept
            from fastrnn._fastpath import _BUILD_LOCK
            with _BUILD_LOCK:
                object.__setattr__(self, name, value)
                self.__dict__.pop("_fp_plan", None)
            return
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    # -- traversal ---------------------------------------------------------
    def named_children(self):
        return iter(self._modules.items())

    def children(self):
        return iter(self._modules.values())

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix="", *, remove_duplicate=True):
        """(name, Parameter) pairs, this module's first, then its children's. A
        parameter shared by two places (tied weights) comes once, under its first
        name, as in torch, so an optimiser steps it once; remove_duplicate=False
        gives every name (what state dicts and model files hold)."""
        seen = set() if remove_duplicate else None
        for name, p in self._named_parameters_all(prefix):
            if seen is not None:
                if id(p) in seen:
                    continue
                seen.add(id(p))
            yield name, p

    def _named_parameters_all(self, prefix):
        for name, p in self._parameters.items():
            yield (f"{prefix}.{name}" if prefix else name), p
        for name, child in self._modules.items():
            yield from child._named_parameters_all(f"{prefix}.{name}" if prefix else name)

    def parameters(self):
        """Every distinct parameter once (tied weights once), in named_parameters' order."""
        return [p for _, p in self.named_parameters()]

    # -- modes and gradients -----------------------------------------------
    def train(self, mode=True):
        for _, m in self.named_modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        """Every parameter's gradient to zero (lazily: see Parameter)."""
        for p in self.parameters():
            p.zero_grad()

    # -- frozen weights ------------------------------------------------------
    def freeze(self):
        """Make every parameter's values read-only for good; returns self.

        Each parameter gets a new array holding a copy of its values on an immutable
        bytes object (`fastrnn._buffers.frozen_copy`), which no view can make
        writeable. Eval calls then skip reading and hashing the weights to find
        their packed copies (`docs/inference.md`, "Frozen weights"), as an ONNX
        Runtime session treats its weights as constants: for an LSTM of 512
        units at batch 2 that read is 8 MB a call. Writes raise: optimiser steps
        and `load_state_dict` name the frozen parameter; `p.data[...] = v`
        raises NumPy's read-only error. Arrays taken from `p.data` before are
        no longer the module's weights. Parameters sharing one array still share
        one after (the same array object; views of one array become separate
        copies). Gradients are unaffected; `copy.deepcopy` and model files give
        writeable copies. `unfreeze()` undoes it; `is_frozen()` tells."""
        return self._copy_parameters(lambda d: not is_frozen(d), frozen_copy)

    def unfreeze(self):
        """Give every frozen parameter a writeable copy of its values; returns self."""
        return self._copy_parameters(is_frozen, aligned_copy)

    def _copy_parameters(self, wanted, make_copy):
        """p.data := make_copy(p.data) for every parameter whose array is `wanted`, one
        copy per array object (parameters that shared one share the copy); then the
        eval plans, which hold the old arrays, go. Returns self."""
        copies = {}
        for _, p in self.named_parameters():
            d = p.data
            if wanted(d):
                if id(d) not in copies:
                    copies[id(d)] = (d, make_copy(d))    # (d kept: its id stays unique)
                p.data = copies[id(d)][1]
        self._forget_plans()
        return self

    def is_frozen(self):
        """True when the module has parameters and every one is frozen (freeze())."""
        params = self.parameters()
        return bool(params) and all(is_frozen(p.data) for p in params)

    def _forget_plans(self):
        """Drop the eval fast path's plans here and below: they hold the arrays they
        were built from (the next eval call builds new ones)."""
        for _, m in self.named_modules():
            m.__dict__.pop("_fp_plan", None)

    # -- state dicts ---------------------------------------------------------
    def state_dict(self):
        """Name -> copy of each parameter's data, in registration order."""
        return OrderedDict((n, p.data.copy())
                           for n, p in self.named_parameters(remove_duplicate=False))

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays into the parameters, checking every name and shape.

        Values may be anything `np.asarray` reads (a CPU torch tensor does; a
        bfloat16 one is read through float32, exactly).
        Values are cast to each parameter's dtype. With `strict`, missing or
        unexpected keys are an error; mis-shaped or non-numeric values always are. Returns
        the key lists as `IncompatibleKeys(missing_keys, unexpected_keys)`, a named
        tuple (as torch's; it unpacks as `missing, unexpected`).
        """
        if not hasattr(state_dict, "items"):
            raise TypeError(f"state_dict: expected a mapping of names to arrays (a dict), "
                            f"got {type(state_dict).__name__}")
        own = OrderedDict(self.named_parameters(remove_duplicate=False))
        given = OrderedDict()
        for key, value in state_dict.items():
            if hasattr(value, "detach"):  # a torch tensor: leave autograd first
                value = value.detach().cpu()
                if getattr(value, "is_floating_point", lambda: False)() and str(
                        value.dtype) not in ("torch.float16", "torch.float32", "torch.float64"):
                    value = value.float()   # bfloat16 (no NumPy dtype): exact in float32
                value = value.numpy()
            try:
                given[key] = np.asarray(value)
            except (ValueError, TypeError) as exc:      # ragged nested lists, ...
                raise ValueError(f"state_dict[{key!r}]: not an array ({exc})") from None
        missing = [k for k in own if k not in given]
        unexpected = [k for k in given if k not in own]
        misshaped = [f"{k}: expected shape {own[k].shape}, got {given[k].shape}"
                     for k in own if k in given and given[k].shape != own[k].shape]
        # strings, objects or complex numbers would cast badly or lose information, and
        # floats cast into a quantised module's integer codes would be other weights
        badtype = [f"{k}: expected a real numeric array, got dtype {given[k].dtype}"
                   for k in own if k in given and given[k].dtype.kind not in "biuf"]
        codes = [f"{k}: expected {own[k].data.dtype}, got {given[k].dtype}"
                 for k in own if k in given and own[k].data.dtype.kind in "iu"
                 and given[k].dtype.kind == "f"]
        # integer codes must fit their array (astype would wrap them) and, for int8
        # weight codes, quantize's +-127 (a Parameter's code_range)
        out_of_range = []
        for k in own:
            if (k in given and own[k].data.dtype.kind in "iu"
                    and given[k].dtype.kind in "biu" and given[k].size):
                info = np.iinfo(own[k].data.dtype)
                lo, hi = getattr(own[k], "code_range", None) or (int(info.min), int(info.max))
                got = (int(given[k].min()), int(given[k].max()))
                if got[0] < lo or got[1] > hi:
                    out_of_range.append(f"{k}: expected integers in [{lo}, {hi}], got values "
                                        f"from {got[0]} to {got[1]}")
        problems = []
        if misshaped:
            problems.append("mis-shaped keys: " + "; ".join(misshaped))
        if badtype:
            problems.append("non-numeric keys: " + "; ".join(badtype))
        if out_of_range:
            problems.append("out-of-range integer codes: " + "; ".join(out_of_range))
        if codes:
            problems.append("float values for a quantised module's integer codes (quantise "
                            "the float module instead): " + "; ".join(codes))
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if problems:
            raise ValueError(f"load_state_dict into {type(self).__name__} failed: "
                             + " | ".join(problems))
        check_writeable(((k, p) for k, p in own.items() if k in given),
                        f"load_state_dict into {type(self).__name__}")
        for key, p in own.items():
            if key in given:
                p.data[...] = given[key].astype(p.data.dtype, copy=False)
        return IncompatibleKeys(missing, unexpected)

    # -- calling -------------------------------------------------------------
    def _eval_call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) with this thread registered as an eval user. Eval calls
        register in a plain list: append and remove are atomic under the GIL, so no
        lock is taken (a training call checks this list)."""
        d = self.__dict__
        users = d.get("_eval_users")
        if users is None:
            users = d.setdefault("_eval_users", [])
        tid = _get_ident()
        users.append(tid)
        try:
            return fn(*args, **kwargs)
        finally:
            users.remove(tid)

    def __call__(self, *args, **kwargs):
        if not self.training:
            return self._eval_call(self.forward, *args, **kwargs)
        tid = self._begin_call(True)
        try:
            return self.forward(*args, **kwargs)
        finally:
            self._end_call(tid)

    # -- threads ---------------------------------------------------------------
    # Eval-mode calls may run on one module from any number of threads at once.
    # A training call (training-mode forward, backward) caches per-call state in
    # the module, so it must not overlap another thread's call, and no other
    # thread may start one while this thread's forward cache awaits its backward
    # (`_train_owner`). Breaking either rule raises RuntimeError.
    def _begin_call(self, training):
        tid = threading.get_ident()
        d = self.__dict__
        with _USE_LOCK:
            users = d.get("_users")
            if users is None:
                users = {}
                object.__setattr__(self, "_users", users)
            if training:
                owner = d.get("_train_owner")
                if owner is not None and owner != tid:
                    raise RuntimeError(
                        f"{type(self).__name__}: another thread ran a training-mode forward on "
                        f"this module and has not run its backward yet; train a module from "
                        f"one thread at a time (or give each thread its own copy)")
                if any(t != tid for t in users) or any(
                        t != tid for t in d.get("_eval_users", ())):
                    raise RuntimeError(
                        f"{type(self).__name__}: a training-mode call while another thread is "
                        f"running this module; training caches state in the module, so it "
                        f"must not overlap other calls (use eval() for concurrent inference)")
            users[tid] = users.get(tid, 0) + 1
        return tid

    def _end_call(self, tid):
        with _USE_LOCK:
            users = self.__dict__["_users"]
            n = users[tid] - 1
            if n:
                users[tid] = n
            else:
                del users[tid]

    def _set_train_owner(self, pending):
        """Mark (pending=True) or clear this thread's unconsumed training cache."""
        object.__setattr__(self, "_train_owner", threading.get_ident() if pending else None)

    def __getstate__(self):
        # copies (copy.deepcopy) start with no threads inside a call and no fast-path plan
        state = self.__dict__.copy()
        for key in ("_eval_users", "_users", "_fp_plan"):
            state.pop(key, None)
        return state

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            child_repr = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child_repr}")
        if len(lines) == 1:
            return lines[0] + ")"
        return "\n".join(lines) + "\n)"
