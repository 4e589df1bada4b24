"""Eval-mode fast path of the float layers and cells: little Python per call.

A small inference call (batch 1, a few steps, H = 32) costs a few microseconds
in the kernel, and a generation step at H = 512 is called once per token, so
every microsecond around the kernel counts. The general path
(`RNNBase.forward` -> `fastrnn.functional.*_forward`) validates every argument
with messages, builds a schedule and allocates its buffers on every call, then
hands the driver two dozen typed memoryviews (acquiring those alone cost ~3 us).
For the calls that qualify, this module keeps what a module can keep between
calls, and `_recurrent.eval_layer` / `eval_cell` (src/forward_small.pxi) do the
per-call checks, allocations and kernel calls in C:

* a *plan* per module, built once (under a lock) on the first eval call: the
  parameter arrays it validated (dtype, C-contiguity, shape);
* per (T, B) the general path's decisions: packing (`functional.pack_flags`),
  which layers are big enough for a thread team (`functional.use_team`)
  and whether a team splits hidden units or rows.

What is NOT cached is anything computed from the weights' *values*: the kernel
sums the biases on every call (O(G*H)), and the weights are passed by
reference. So the rule for users is simply: any change to the parameters is
seen by the next call — an optimiser step, a `load_state_dict`, an in-place
write to `p.data`, or assigning a new array to `p.data` or a new Parameter to
the module. Reassignments are caught per call by an identity and shape check of
each parameter array (a different object means the plan is rebuilt, and
validated again); a new Parameter object clears the plan in
`Module.__setattr__`.

A call qualifies when: eval mode, a layer's GEMMs in float32 (not under matmul
precision "medium" where that runs bf16 products; cells always qualify), `lengths`
None or integers of shape (B,) in [1, T] (rows sorted by length here, padded steps
0 in y, each row's state at its last step), uni-directional or bidirectional (the
directions one after the other, the reverse one from each row's last step back, each
writing its half of y; merge_mode "sum" then adds the halves), with or without
`proj_size` (a projected LSTM's rows split, never its hidden units, as on the general
path), a GRU with `reset_after=False` only where the general path runs it on one
thread (its step's second barrier has no stop for a pool team), x a
C-contiguous ndarray of the module's
dtype with the right shape (batch_first: an ndarray of that dtype, copied time-major
for the kernel and its output copied back, as the general path does), states None
or C-contiguous arrays of the right shape and dtype, and no pending training
cache. Anything else returns
None and the general path runs, which validates with its full messages (so
every bad input raises exactly as before) and handles copies, lengths and the
other layouts. Both paths run the same thread body (`forward_thread`) with the
same packing, and every thread split gives the same numbers, so results are
bitwise equal (tested). `kernel_only` exposes the prepared one-thread kernel
call (`_recurrent.forward_small`) so the benchmark can time the kernel alone.
"""

import os
import threading

import numpy as np

from fastrnn import _precision, _recurrent
from fastrnn import functional as F
from fastrnn._frozen import frozen_digests, frozen_mark, still_frozen

__all__ = ["eval_call", "layer_forward", "cell_forward", "kernel_only", "clear_plan"]

_BUILD_LOCK = threading.RLock()     # plans are built, and settings change, under it


def _fresh_lock_after_fork():
    """A fork child: no thread holds the lock there (Module.__setattr__ takes it, so a
    fork while another thread built a plan would hang the child's first module)."""
    global _BUILD_LOCK
    _BUILD_LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_lock_after_fork)
_get_ident = threading.get_ident
_MAX_SCHEDULES = 64          # (T, B) schedules kept per plan
_NOT_ELIGIBLE = False        # plan value of a module the fast path never serves


class _Plan:
    """What one module's fast calls share (immutable once built)."""

    __slots__ = ("kind", "dtype", "typenum", "lstm", "kernel", "I", "H", "O", "L", "D", "G",
                 "cell_code", "summed", "layer_out", "w_hr",
                 "params", "layers", "digests", "frozen", "row_flop", "max_rows", "threads",
                 "scheds", "call", "batch_first")

    def __init__(self, kind, dtype, kernel, I, H, L, G, cell_code, params, layers, row_flop,
                 cell=False, batch_first=False, D=1, summed=False, w_hr=None):
        self.kind, self.dtype, self.kernel = kind, dtype, kernel
        # the eval call: eval_cell / eval_layer (src/forward_small.pxi), or for a
        # batch_first layer eval_layer between two transposing copies
        self.batch_first = batch_first
        self.call = (_recurrent.eval_cell if cell else
                     _eval_batch_first if batch_first else _recurrent.eval_layer)
        self.typenum, self.lstm = dtype.num, kind == "lstm"     # what the Cython side reads
        self.I, self.H, self.L, self.D, self.G = I, H, L, D, G
        self.cell_code = cell_code   # the driver's CELL_RNN_* (tanh, relu, identity), CELL_*
        # per run: a projected LSTM's w_hr (P, H), else None; h then has O = P values
        self.w_hr = w_hr if w_hr is not None else (None,) * len(layers)
        self.O = H if w_hr is None else w_hr[0].shape[0]
        # merge_mode "sum": the directions' outputs added (eval_layer), so a layer's
        # output, and the next layer's input, has O values, not D * O
        self.summed = summed
        self.layer_out = self.O if summed else D * self.O
        self.params = params        # ((Parameter, data array, shape, frozen mark), ...)
        # per run (layer k, direction d at k * D + d): (w_ih, w_hh, b_ih, b_hh), biases
        # None without
        self.layers = layers
        # per run: (digest of w_ih, of w_hh) when both are frozen (Module.freeze()), else
        # None. Their values cannot change, and the plan is stale once an array is
        # replaced or is no longer that frozen memory (params' frozen marks, checked
        # per call), so eval calls need not read and hash them to find their packings.
        self.digests = tuple(frozen_digests(w_ih, w_hh) for w_ih, w_hh, _, _ in layers)
        # every run's weights frozen and small enough to keep packed: functional's
        # frozen_eval, for the schedule (_build leaves a module with some runs so and
        # some not to the general path, which decides per run)
        self.frozen = all(F.frozen_eval(False, w_ih, w_hh) for w_ih, w_hh, _, _ in layers)
        self.row_flop = row_flop    # per layer: FLOPs per row of T*B (the thread decision)
        # largest T*B that every layer runs on one thread (kernel_only's limit)
        self.max_rows = min(int(np.ceil(F.SMALL_WORK_FLOP / f)) - 1 for f in row_flop)
        self.threads = F.call_threads   # the threads a kernel call may use (thread_share)
        self.scheds = {}

    def valid(self):
        for p, arr, shape, mark in self.params:
            d = p.data
            if d is not arr or d.shape != shape or (mark is not None and not still_frozen(d, mark)):
                return False
        return True

    def schedule(self, T, B):
        """The general path's decisions for a (T, B) call, kept per (T, B): (pack_ih,
        pack_hh, threaded, units_ok, rows_upto); threaded: per layer, whether it is big
        enough for a team; units_ok: a team may split hidden units rather than rows,
        unless it has at most rows_upto threads (F.rows_upto)."""
        s = self.scheds.get((T, B))
        if s is None:
            hh_size = self.G * self.H * self.O
            frozen = self.frozen
            pack_ih, pack_hh = F.pack_flags(T, B, frozen)
            if self.cell_code == F.CELL_GRU_RESET_BEFORE:   # (functional's rule for it)
                threaded = tuple(F.use_team(T * B * f, T, B, pack_hh, frozen)
                                 and F.reset_before_eval_team(T * B * f, T)
                                 for f in self.row_flop)
            elif self.O == self.H:
                threaded = tuple(F.use_team(T * B * f, T, B, pack_hh, frozen)
                                 for f in self.row_flop)
            else:   # rows only, so no step barrier to repay (functional.lstmp_forward's rule)
                threaded = tuple(T * B * f >= F.SMALL_WORK_FLOP for f in self.row_flop)
            gated = self.G > 1
            # a projection needs all of h_t: rows only (as the general path)
            units_ok = self.O == self.H and F.splits_units(
                T, B, pack_hh, hh_bytes=hh_size * self.dtype.itemsize, gated_eval=gated,
                frozen_eval=frozen)
            s = (pack_ih, pack_hh, threaded, units_ok,
                 F.rows_upto(B, hh_size, self.dtype.itemsize, gated))
            if len(self.scheds) >= _MAX_SCHEDULES:
                self.scheds.clear()
            self.scheds[(T, B)] = s
        return s


def _ok_array(a, dtype, shape):
    return (type(a) is np.ndarray and a.dtype == dtype and a.shape == shape
            and a.flags.c_contiguous)


def _build(module, cell):
    """A plan for `module`; _NOT_ELIGIBLE for a module the fast path never serves; None
    while a parameter array is unfit (wrong dtype, shape or layout: checked again on the
    next call, so fixing the parameter brings the fast path back)."""
    from fastrnn.modules.cells import GRUCell, LSTMCell, RNNCell, _CellBase
    from fastrnn.modules.rnn import GRU, LSTM, RNN, RNNBase
    dtype = module.dtype
    cls = type(module)
    if cell:
        # a subclass that computes a step its own way (forward or _step_forward
        # overridden) is not served: the fast path would skip its code
        stock = next((c for c in (RNNCell, LSTMCell, GRUCell) if isinstance(module, c)), None)
        if (stock is None or cls.forward is not _CellBase.forward
                or cls._step_forward is not stock._step_forward):
            return _NOT_ELIGIBLE
        kind = {RNNCell: "rnn", LSTMCell: "lstm", GRUCell: "gru"}[stock]
        names = [["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if module.bias else [])]
        L = D = 1
        summed = False
    else:
        stock = next((c for c in (RNN, LSTM, GRU) if isinstance(module, c)), None)
        if (stock is None or cls.forward is not RNNBase.forward
                or cls._forward_direction is not stock._forward_direction):
            return _NOT_ELIGIBLE      # a subclass computing its own way: as for cells
        kind = module.mode.lower()
        names = module._param_names
        L = module.num_layers
        D = module.num_directions
        summed = D == 2 and module.merge_mode == "sum"
    G = {"rnn": 1, "lstm": 4, "gru": 3}[kind]
    I, H = module.input_size, module.hidden_size
    O = getattr(module, "proj_size", 0) or H          # h's size: proj_size, else H
    # the driver's cell code: CELL_RNN_* (tanh, relu, identity), CELL_LSTM, CELL_GRU, or
    # CELL_GRU_RESET_BEFORE (reset_after=False: served only where it runs on one thread,
    # src/forward_small.pxi)
    cell_code = {"rnn": F.NONLINEARITIES.get(getattr(module, "nonlinearity", "tanh")),
                 "lstm": F.CELL_LSTM,
                 "gru": F.CELL_GRU if getattr(module, "reset_after", True)
                 else F.CELL_GRU_RESET_BEFORE}[kind]
    params, layers, w_hrs, row_flop = [], [], [], []
    for k in range(L):
        in_size = I if k == 0 else (O if summed else D * O)
        shapes = {"weight_ih": (G * H, in_size), "weight_hh": (G * H, O),
                  "bias_ih": (G * H,), "bias_hh": (G * H,), "weight_hr": (O, H)}
        for d in range(D):
            arrays = {}
            for name in names[k * D + d]:     # weight_ih_l0[_reverse], ... (cells: no suffix)
                role = name.split("_l")[0]
                p = getattr(module, name)
                if not _ok_array(p.data, dtype, shapes[role]):
                    return None           # not now: the general path reports what is wrong
                params.append((p, p.data, shapes[role], frozen_mark(p.data)))
                arrays[role] = p.data
            layers.append((arrays["weight_ih"], arrays["weight_hh"], arrays.get("bias_ih"),
                           arrays.get("bias_hh")))
            w_hrs.append(arrays.get("weight_hr"))
        # functional runs a direction on one thread when 2*T*B*G*H*(in+O) < SMALL_WORK_FLOP
        # (+ 2*O*H a projection's product)
        row_flop.append(2.0 * G * H * (in_size + O) + (2.0 * O * H if O != H else 0.0))
    if len({F.frozen_eval(False, w_ih, w_hh) for w_ih, w_hh, _, _ in layers}) > 1:
        return None     # some runs frozen, some not: the general path (_Plan.frozen)
    return _Plan(kind, dtype, _recurrent.forward_small, I, H, L, G, cell_code,
                 tuple(params), tuple(layers), tuple(row_flop), cell,
                 not cell and module.batch_first, D, summed,
                 tuple(w_hrs) if O != H else None)


def _eval_batch_first(plan, x, hx, lengths=None, order=None):
    """eval_layer for a batch_first layer: x (B, T, I) copied time-major for the
    kernel, y copied back to (B, T, D*O); the states are (L*D, B, O) (c: H) either
    way. None
    when the call does not qualify (then the general path reports bad input)."""
    if type(x) is not np.ndarray or x.ndim != 3 or x.dtype != plan.dtype:
        return None
    out = _recurrent.eval_layer(plan, np.ascontiguousarray(x.transpose(1, 0, 2)), hx,
                                lengths, order)
    if out is None or out is False:
        return out
    y, states = out                                     # y (T, B, D*O), or O summed
    return np.ascontiguousarray(y.transpose(1, 0, 2)), states


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


def _args(plan, k, x, y, h_n, c_n, h0, c0, sched):
    """forward_small's arguments for layer k: (cell, y, h_n, c_n, x, h0, c0, w_ih, w_hh,
    b_ih, b_hh, pack_ih, pack_hh)."""
    return (plan.cell_code, y, h_n, c_n, x, h0, c0) + plan.layers[k] + sched[:2]


def _bf16_layer(cell, x):
    """Does this layer call run its GEMMs on bf16 operands (matmul precision "medium",
    or this thread inside _precision.bf16_precision: a bf16 quantised stack's twin)?
    Then the general path serves it; the fast path's kernels are float32."""
    return not cell and _precision.bf16_products(getattr(x, "dtype", np.float64))


def _fast_call(module, cell, x, hx):
    if _bf16_layer(cell, x):
        return None
    plan = module.__dict__.get("_fp_plan")
    if plan is not None and plan is not _NOT_ELIGIBLE and module.__dict__.get("_cache") is None:
        out = plan.call(plan, x, hx)
        if out is not False:          # a result, or None: the call does not qualify
            return out
    return _replan_call(module, cell, x, hx)


def _replan_call(module, cell, x, hx):
    """The call after (re)building the plan: a first call, or a parameter array was
    replaced since the plan was built."""
    plan = _plan(module, cell)
    if plan is _NOT_ELIGIBLE or module.__dict__.get("_cache") is not None:
        return None
    out = plan.call(plan, x, hx)
    return None if out is False else out


def _sorted_lengths(lengths, x, batch_first):
    """A layer call's `lengths` as eval_layer takes them: (lengths, order), both intp
    (B,), order the rows by decreasing length (stable, as functional.Schedule); ()
    when every row is T long (the call runs as without them); None when they do not
    qualify (not integers of shape (B,) in [1, T]: the general path reports it)."""
    if type(x) is not np.ndarray or x.ndim != 3:
        return None
    T, B = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
    try:
        a = lengths if type(lengths) is np.ndarray else np.asarray(lengths)
    except Exception:               # whatever it is, the general path reports it
        return None
    if a.dtype.kind not in "iu" or a.shape != (B,) or B == 0 or T == 0:
        return None
    lo, hi = a.min(), a.max()
    if lo < 1 or hi > T:
        return None
    if lo == T:
        return ()
    a = a.astype(np.intp)
    return a, np.argsort(-a, kind="stable").astype(np.intp, copy=False)


def eval_call(module, cell, x, hx, lengths=None):
    """`module(x, hx[, lengths])` of an eval-mode layer (cell False) or cell (cell
    True) on the fast path, else None. The calling thread is registered as an eval
    user for the call, in the list `Module._eval_call` keeps (a training call checks
    it). This is `Module._eval_call(layer_forward, ...)` folded into one Python frame:
    the microseconds around a small call are counted (issue 10, at most 3 us)."""
    if _bf16_layer(cell, x):
        return None
    if lengths is not None:
        return _eval_call_with_lengths(module, x, hx, lengths)
    d = module.__dict__
    users = d.get("_eval_users")
    if users is None:
        users = d.setdefault("_eval_users", [])
    tid = _get_ident()
    users.append(tid)
    try:
        plan = d.get("_fp_plan")
        if plan is not None and plan is not _NOT_ELIGIBLE and d.get("_cache") is None:
            out = plan.call(plan, x, hx)
            if out is not False:      # a result, or None: the call does not qualify
                return out
        return _replan_call(module, cell, x, hx)   # first call, or a stale plan
    finally:
        users.remove(tid)


def _eval_call_with_lengths(module, x, hx, lengths):
    """eval_call of a layer given `lengths` (rows of different lengths)."""
    d = module.__dict__
    plan = d.get("_fp_plan")
    if plan is None:                # (a stale plan: eval_layer returns False, below)
        plan = _plan(module, False)
    if plan is _NOT_ELIGIBLE or d.get("_cache") is not None:
        return None
    rows = _sorted_lengths(lengths, x, plan.batch_first)
    if rows is None:
        return None
    return module._eval_call(_call_with_rows, module, plan, x, hx, rows)


def _call_with_rows(module, plan, x, hx, rows):
    out = plan.call(plan, x, hx, *rows)
    if out is False:                # a parameter array was replaced: plan again
        plan = _plan(module, False)
        out = None if plan is _NOT_ELIGIBLE else plan.call(plan, x, hx, *rows)
    return None if out is False else out


def layer_forward(module, x, hx):
    """The eval-mode result of `module(x, hx)` for a qualifying call, else None: checks,
    outputs and kernel calls in C (src/forward_small.pxi, eval_layer)."""
    return _fast_call(module, False, x, hx)


def cell_forward(cell, x, hx):
    """The eval-mode result of `cell(x, hx)` for a qualifying call, else None
    (src/forward_small.pxi, eval_cell)."""
    return _fast_call(cell, True, x, hx)


def kernel_only(module, x, hx=None):
    """A zero-argument callable running just the kernel call(s) of `module(x, hx)`,
    with every array prepared beforehand (outputs, biases, schedule): what the
    benchmark subtracts from a module call to get the Python overhead. Its attribute
    `outputs` is (y, h_n, c_n or None), the arrays each run writes (y of the last
    layer, (T, B, H); a cell's is (1, B, H)). Raises ValueError when the call does not
    qualify for the fast path."""
    cell = not hasattr(module, "num_layers")
    plan = _plan(module, cell)
    if plan is _NOT_ELIGIBLE or plan.batch_first or plan.D != 1 or plan.O != plan.H:
        raise ValueError(f"{type(module).__name__}: this module does not qualify for "
                         f"kernel_only (uni-directional, time-major, no proj_size)")
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
                           sched))
    kernel = plan.kernel
    if L == 1:
        args0 = calls[0]
        run = lambda: kernel(*args0)  # noqa: E731 - one call, nothing around it to time
    else:
        def run():
            for args in calls:
                kernel(*args)
    run.outputs = (ys[-1], h_n, c_n if lstm else None)
    return run
