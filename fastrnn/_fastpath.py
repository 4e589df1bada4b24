"""Eval-mode fast path of the float layers and cells: small calls, little Python.

A small inference call (batch 1, a few steps, H = 32) costs a few microseconds
in the kernel, so every microsecond of Python around it counts. The general
path (`RNNBase.forward` -> `fastrnn.functional.*_forward`) validates every
argument with messages, builds a schedule and allocates its buffers on every
call. For the calls that qualify, this module does the same work with what a
module can keep between calls:

* a *plan* per module, built once (under a lock) on the first eval call: the
  kernel specialised for the module's dtype (a Cython fused function indexed
  by "float"/"double", which skips the per-call signature dispatch), the
  parameter arrays it validated (dtype, C-contiguity, shape) and views of the
  bias pieces;
* per (T, B) the schedule arrays of a full-length single-chunk call
  (lengths, order, bounds; read-only, shared).

What is NOT cached is anything computed from the weights' *values*: the biases
are summed on every call (O(G*H), well under a microsecond at H = 32), and the
weights are passed by reference. So the rule for users is simply: any change
to the parameters is seen by the next call — an optimiser step, a
`load_state_dict`, an in-place write to `p.data`, or assigning a new array to
`p.data` or a new Parameter to the module. Reassignments are caught per call
by an identity and shape check of each parameter array (a different object
means the plan is rebuilt, and validated again); a new Parameter object
clears the plan in `Module.__setattr__`.

A call qualifies when: eval mode, no `lengths`, uni-directional, no
`proj_size`, time-major (not batch_first), x a C-contiguous ndarray of the
module's dtype with the right shape, states None or C-contiguous arrays of the
right shape and dtype, no pending training cache, and the call small enough
that the general path would run it on one thread (below
`functional.SMALL_WORK_FLOP` per layer). Anything else returns None and the
general path runs, which validates with its full messages (so every bad input
raises exactly as before) and handles copies, threads and lengths. Both paths
call the same kernel with the same arguments, so results are bitwise equal
(tested).

The kernel call is the one `fastrnn.functional._run_forward` makes into the
recurrence driver (`fastrnn._recurrent.forward`, src/_recurrent.pyx), with the
same pack_ih / pack_hh decisions (`functional.pack_flags`); `kernel_only` exposes the prepared
call so the benchmark can time the kernel alone.
"""

import threading

import numpy as np

from fastrnn import _recurrent
from fastrnn import functional as F

__all__ = ["layer_forward", "cell_forward", "kernel_only", "clear_plan"]

_SPECIALISATION = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_BUILD_LOCK = threading.Lock()
_MAX_SCHEDULES = 64          # (T, B) schedules kept per plan
_NOT_ELIGIBLE = False        # plan value of a module the fast path never serves


def _specialised(kernel, dtype):
    """The fused kernel's specialisation for dtype, or the kernel itself."""
    try:
        return kernel[_SPECIALISATION[dtype]]
    except (TypeError, KeyError, IndexError):
        return kernel


class _Plan:
    """What one module's fast calls share (immutable once built)."""

    __slots__ = ("kind", "dtype", "kernel", "I", "H", "L", "G", "act", "params",
                 "layers", "max_rows", "scheds", "pack_rows", "pack_batch", "units_steps")

    def __init__(self, kind, dtype, kernel, I, H, L, G, act, params, layers, max_rows):
        self.kind, self.dtype, self.kernel = kind, dtype, kernel
        self.I, self.H, self.L, self.G, self.act = I, H, L, G, act
        self.params = params        # ((Parameter, data array, shape), ...)
        self.layers = layers        # per layer: (w_ih, w_hh, bias views or None)
        self.max_rows = max_rows    # largest T*B that runs on one thread
        self.scheds = {}

    def valid(self):
        for p, arr, shape in self.params:
            d = p.data
            if d is not arr or d.shape != shape:
                return False
        return True

    def schedule(self, T, B):
        """The driver's trailing arguments for a (T, B) call: (lengths, order, bounds,
        reverse, pack_ih, pack_hh, n_threads, by_units), built once per (T, B)."""
        s = self.scheds.get((T, B))
        if s is None:
            lengths = np.full(B, T, dtype=np.intp)
            order = np.arange(B, dtype=np.intp)
            bounds = np.array([0, B], dtype=np.intp)
            for a in (lengths, order, bounds):
                a.flags.writeable = False
            pack_ih, pack_hh = F.pack_flags(T, B, self.G * self.H * self.H)   # the general path's decision
            s = (lengths, order, bounds, False, pack_ih, pack_hh, 1, False)
            if len(self.scheds) >= _MAX_SCHEDULES:
                self.scheds.clear()
            self.scheds[(T, B)] = s
        return s


def _ok_array(a, dtype, shape):
    return (type(a) is np.ndarray and a.dtype == dtype and a.shape == shape
            and a.flags.c_contiguous)


def _bias_views(kind, b_ih, b_hh, H):
    """Views of the bias parameters for the per-call combination (no values copied)."""
    if b_ih is None:
        return None
    if kind == "gru":
        return (b_ih[:2 * H], b_hh[:2 * H], b_ih[2 * H:], b_hh[2 * H:])
    return (b_ih, b_hh)


def _combine(kind, views):
    """The kernel's bias arguments from the current bias values: (bias,) or (bias_x, bias_hn)."""
    if views is None:
        return (None, None) if kind == "gru" else (None,)
    if kind == "gru":
        b_ih_rz, b_hh_rz, b_ih_n, b_hn = views
        return (np.concatenate((b_ih_rz + b_hh_rz, b_ih_n)), b_hn)
    return (views[0] + views[1],)


def _build(module, cell):
    """A plan for `module`; _NOT_ELIGIBLE for a module the fast path never serves; None
    while a parameter array is unfit (wrong dtype, shape or layout: checked again on the
    next call, so fixing the parameter brings the fast path back)."""
    dtype = module.dtype
    if cell:
        kind = {"RNNCell": "rnn", "LSTMCell": "lstm", "GRUCell": "gru"}.get(type(module).__name__)
        if kind is None:
            return _NOT_ELIGIBLE
        names = [["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if module.bias else [])]
        L = 1
    else:
        if module.proj_size or module.bidirectional or module.batch_first:
            return _NOT_ELIGIBLE
        kind = module.mode.lower()
        names = module._param_names
        L = module.num_layers
    G = {"rnn": 1, "lstm": 4, "gru": 3}[kind]
    I, H = module.input_size, module.hidden_size
    # the driver's cell code: CELL_RNN_* (tanh, relu, identity), CELL_LSTM, CELL_GRU
    act = {"rnn": F.NONLINEARITIES.get(getattr(module, "nonlinearity", "tanh")),
           "lstm": F.CELL_LSTM, "gru": F.CELL_GRU}[kind]
    params, layers, max_rows = [], [], None
    for k in range(L):
        in_size = I if k == 0 else H
        shapes = [(G * H, in_size), (G * H, H), (G * H,), (G * H,)]
        arrays = []
        for name, shape in zip(names[k], shapes):
            p = getattr(module, name)
            if not _ok_array(p.data, dtype, shape):
                return None               # not now: the general path reports what is wrong
            params.append((p, p.data, shape))
            arrays.append(p.data)
        b_ih, b_hh = (arrays[2], arrays[3]) if len(arrays) == 4 else (None, None)
        layers.append((arrays[0], arrays[1], _bias_views(kind, b_ih, b_hh, H)))
        # functional runs a layer on one thread when 2*T*B*G*H*(in+H) < SMALL_WORK_FLOP
        per_row = 2.0 * G * H * (in_size + H)
        rows = int(np.ceil(F.SMALL_WORK_FLOP / per_row)) - 1
        max_rows = rows if max_rows is None else min(max_rows, rows)
    return _Plan(kind, dtype, _specialised(_recurrent.forward, dtype), I, H, L, G, act,
                 tuple(params),
                 tuple(layers), max_rows)


def _plan(module, cell):
    plan = module.__dict__.get("_fp_plan")
    if plan is None or (plan is not _NOT_ELIGIBLE and not plan.valid()):
        with _BUILD_LOCK:
            plan = module.__dict__.get("_fp_plan")
            if plan is None or (plan is not _NOT_ELIGIBLE and not plan.valid()):
                plan = _build(module, cell)
                if plan is None:
                    module.__dict__.pop("_fp_plan", None)
                    return _NOT_ELIGIBLE
                object.__setattr__(module, "_fp_plan", plan)
    return plan


def clear_plan(module):
    """Forget the module's plan (the next eval call builds and validates a new one)."""
    module.__dict__.pop("_fp_plan", None)


def _args(plan, k, x, y, h_n, c_n, h0, c0, T, B, sched):
    """The driver's arguments for layer k, exactly as fastrnn.functional passes them on
    one thread (forward direction, full lengths, one chunk, no training buffers):
    (cell, y, h_n, c_n, gates, aux, x, h0, c0, w_ih, w_hh, bias, bias_h, w_hr, hr,
    lengths, order, bounds, reverse, pack_ih, pack_hh, n_threads, by_units); no
    projection (w_hr, hr None: proj_size modules take the general path)."""
    w_ih, w_hh, views = plan.layers[k]
    if views is None:
        bias = bias_h = None
    elif plan.kind == "gru":
        bias, bias_h = _combine("gru", views)
    else:
        bias, bias_h = views[0] + views[1], None
    return (plan.act, y, h_n, c_n, None, None, x, h0, c0, w_ih, w_hh, bias, bias_h,
            None, None) + sched


def layer_forward(module, x, hx):
    """The eval-mode result of `module(x, hx)` for a qualifying call, else None."""
    plan = module.__dict__.get("_fp_plan")
    if plan is None or plan is _NOT_ELIGIBLE or not plan.valid():
        plan = _plan(module, False)
        if plan is _NOT_ELIGIBLE:
            return None
    dt = plan.dtype
    if (type(x) is not np.ndarray or x.dtype is not dt or x.ndim != 3
            or not x.flags.c_contiguous or module._cache is not None):
        return None
    T, B, I = x.shape
    if I != plan.I or T == 0 or B == 0 or T * B > plan.max_rows:
        return None
    L, H = plan.L, plan.H
    lstm = plan.kind == "lstm"
    h0 = c0 = None
    if hx is not None:
        shape = (L, B, H)
        if lstm:
            if type(hx) is not tuple or len(hx) != 2:
                return None
            h0, c0 = hx
            if c0 is not None and not _ok_array(c0, dt, shape):
                return None
        else:
            h0 = hx
        if h0 is not None and not _ok_array(h0, dt, shape):
            return None
    if lstm:
        states = np.empty((2, L, B, H), dt)      # h_n and c_n in one allocation
        h_n, c_n = states
    else:
        h_n, c_n = np.empty((L, B, H), dt), None
    sched = plan.schedule(T, B)
    kernel = plan.kernel
    layer_in = x
    for k in range(L):
        y = np.empty((T, B, H), dt)
        kernel(*_args(plan, k, layer_in, y, h_n[k], c_n[k] if lstm else None,
                      None if h0 is None else h0[k], None if c0 is None else c0[k], T, B, sched))
        layer_in = y
    return (layer_in, (h_n, c_n)) if lstm else (layer_in, h_n)


def cell_forward(cell, x, hx):
    """The eval-mode result of `cell(x, hx)` for a qualifying call, else None."""
    plan = cell.__dict__.get("_fp_plan")
    if plan is None or plan is _NOT_ELIGIBLE or not plan.valid():
        plan = _plan(cell, True)
        if plan is _NOT_ELIGIBLE:
            return None
    dt = plan.dtype
    if type(x) is not np.ndarray or x.dtype is not dt or not x.flags.c_contiguous:
        return None
    H = plan.H
    if x.ndim == 2:
        B = x.shape[0]
        if x.shape[1] != plan.I or B == 0 or B > plan.max_rows:
            return None
        batched = True
        shape = (B, H)
    elif x.ndim == 1 and x.shape[0] == plan.I:
        B, batched, shape = 1, False, (H,)
    else:
        return None
    lstm = plan.kind == "lstm"
    h0 = c0 = None
    if hx is not None:
        if lstm:
            if (type(hx) is not tuple and type(hx) is not list) or len(hx) != 2:
                return None
            h0, c0 = hx
            if not _ok_array(h0, dt, shape) or not _ok_array(c0, dt, shape):
                return None
        elif not _ok_array(hx, dt, shape):
            return None
        else:
            h0 = hx
        if not batched:
            h0 = h0.reshape(1, H)
            c0 = None if c0 is None else c0.reshape(1, H)
    if lstm:
        block = np.empty((3, B, H), dt)          # y (the driver's (1, B, H)), h_n, c_n
        y, h_n, c_n = block[:1], block[1], block[2]
    else:
        block = np.empty((2, B, H), dt)
        y, h_n, c_n = block[:1], block[1], None
    plan.kernel(*_args(plan, 0, x.reshape(1, B, plan.I), y, h_n, c_n, h0, c0, 1, B,
                       plan.schedule(1, B)))
    if not batched:
        return (h_n[0], c_n[0]) if lstm else h_n[0]
    return (h_n, c_n) if lstm else h_n


def kernel_only(module, x, hx=None):
    """A zero-argument callable running just the kernel call(s) of `module(x, hx)`,
    with every array prepared beforehand (outputs, biases, schedule): what the
    benchmark subtracts from a module call to get the Python overhead. Raises
    ValueError when the call does not qualify for the fast path."""
    cell = not hasattr(module, "num_layers")
    plan = _plan(module, cell)
    if plan is _NOT_ELIGIBLE:
        raise ValueError(f"{type(module).__name__}: this module does not qualify for the fast "
                         f"path (bidirectional, proj_size or batch_first)")
    dt = plan.dtype
    x3 = x.reshape(1, x.shape[0], x.shape[1]) if cell else x
    T, B, _ = x3.shape
    if T * B > plan.max_rows:
        raise ValueError("kernel_only: the call is too large for the one-thread fast path")
    L, H = plan.L, plan.H
    lstm = plan.kind == "lstm"
    sched = plan.schedule(T, B)
    ys = [np.empty((T, B, H), dt) for _ in range(L)]
    h_n = np.empty((L, B, H), dt)
    c_n = np.empty((L, B, H), dt)
    h0 = c0 = None
    if hx is not None:
        h0, c0 = hx if lstm else (hx, None)
        if cell:
            h0 = h0.reshape(1, B, H)
            c0 = None if c0 is None else c0.reshape(1, B, H)
    calls = []
    for k in range(L):
        xin = x3 if k == 0 else ys[k - 1]
        calls.append(_args(plan, k, xin, ys[k], h_n[k], c_n[k] if lstm else None,
                           None if h0 is None else h0[k], None if c0 is None else c0[k],
                           T, B, sched))
    kernel = plan.kernel
    if L == 1:
        args0 = calls[0]
        return lambda: kernel(*args0)

    def run():
        for args in calls:
            kernel(*args)
    return run
