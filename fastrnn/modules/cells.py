"""Single-step cells RNNCell, LSTMCell, GRUCell (torch.nn names, layout and init).

Each call runs the functional kernel on one time step (x[None], T = 1). For
backpropagation through time (BPTT) the cell keeps a *stack* of per-step
caches: every training-mode call pushes one, every `backward` pops the most
recent one. So run the steps forward, then call `backward` once per step in
reverse order, feeding each step the gradient of its output plus the state
gradient returned by the step after it:

    h = None
    hs = []
    for t in range(T):                      # forward: pushes T caches
        h = cell(x[t], h)
        hs.append(h)
    dh = np.zeros_like(h)
    for t in reversed(range(T)):            # backward: pops them, last step first
        dx_t, dh = cell.backward(dh + dloss_dh[t])

`LSTMCell.backward(dh, dc)` returns `dx, (dh_prev, dc_prev)`. Parameter
gradients add into `.grad`: a step's backward keeps its terms of them, and they are
summed in one GEMM over all the steps' rows when the last cached step has gone
back, after every PENDING_ROWS rows, or as soon as anything reads or changes
a parameter's gradient (`_PendingGradients`), so `.grad` always shows every
backward call made. `clear_cache()` drops unused caches (for example
after truncating BPTT); eval mode pushes nothing. Per-call checks are
deliberately shallow (rank, size, dtype) to keep the Python overhead per step
small.

Shape letters: B batch, I input size, H hidden size, G gates (1, 3, 4).
"""


import threading

import numpy as np

from fastrnn import _fastpath, _precision, _recurrent
from fastrnn._validate import describe
from fastrnn import functional as F  # the module, looked up at call time
from fastrnn.modules.module import (Module, Parameter, aligned_zeros, grad_targets,
                                    init_skipped, reset_recurrent_parameters, training_call)

__all__ = ["RNNCell", "LSTMCell", "GRUCell"]

# Rows (steps times batch) of gate gradients kept before they are summed into the
# weights' gradients. Added per step, a batch of 8 read and wrote the whole of each
# weight gradient for 8 rows' worth of products: LSTMCell(300, 1000) B=8 T=50
# training loop, forward + backward, 2-core Xeon (AVX-512), medians of 5 interleaved
# rounds: 210.6 ms per 50-step sequence against torch's 198.3 (0.94x) before.
PENDING_ROWS = 1024

_NONLINEARITIES = ("tanh", "relu", "identity")


class _PendingGradients:
    """The weight-gradient terms of a cell's backward calls not yet added to its
    parameters' .grad (functional.GateGradients, one per step), and the parameters
    they belong to: (weight_ih, weight_hh, bias_ih, bias_hh), the biases None
    without bias. Each parameter points here (Parameter._pending) until they are
    added; add_pending() sums them all in one GEMM per weight.

    Under a lock, so that a thread reading .grad while another's backward adds
    them waits for the sums instead of adding them a second time. If the sums
    fail (out of memory), nothing has been added and they stay owed."""

    __slots__ = ("params", "terms", "rows", "apart", "lock")

    def __init__(self, params, apart):
        self.params = params
        self.terms = []
        self.rows = 0
        self.apart = apart          # the GRU: dL/d(h W_hh^T) is not dL/d(x W_ih^T)
        self.lock = threading.RLock()

    def add(self, terms):
        with self.lock:
            self.terms.append(terms)
            self.rows += terms.dgx.shape[0]

    def add_pending(self):
        with self.lock:
            terms, rows, self.terms, self.rows = self.terms, self.rows, [], 0
            linked = [p for p in self.params if p is not None and p._pending is self]
            for p in linked:        # first: reading their gradients below must not come back
                p._pending = None
            if not terms:
                return
            try:
                sums = self._sums(terms)
            except BaseException:
                self.terms, self.rows = terms + self.terms, rows + self.rows
                for p in linked:
                    if p._pending is None:
                        p._pending = self
                raise
            for p, g in zip(self.params, sums):
                if p is not None:
                    p.take_grad(g)

    def _sums(self, terms):
        """The terms' sums (dW_ih, dW_hh, db_ih, db_hh; the biases' None without
        bias), for the parameters' take_grad: written into .grad in place right after
        zero_grad (take_grad then marks them written), else fresh arrays that
        take_grad adds (a kernel that failed part-way through adding into .grad
        could not be undone)."""
        def rows(name):   # the steps' arrays as they are: the kernel reads their rows
            return [getattr(t, name) for t in terms]

        dgx = rows("dgx")                                             # [(n_s, G*H)], V rows
        dgh = rows("dgh") if self.apart else None                     # [(n_s, G*H)] or None
        x, h_prev = rows("x"), rows("h_prev")                         # [(n_s, I)], [(n_s, H)]
        w_ih, w_hh, b_ih, b_hh = self.params
        out, accumulate = grad_targets((w_ih, w_hh))
        if out is None or accumulate or np.may_share_memory(out[0], out[1]):
            # (the two the same array: a cell whose weight_hh is its weight_ih)
            out, accumulate = (np.empty_like(w_ih.data), np.empty_like(w_hh.data)), False
        GH, dtype = dgx[0].shape[1], dgx[0].dtype
        V = sum(a.shape[0] for a in dgx)
        db_x = np.empty(GH, dtype) if b_ih is not None else None
        db_h = np.empty(GH, dtype) if b_ih is not None and self.apart else None
        flop = 2 * V * GH * (x[0].shape[1] + h_prev[0].shape[1])
        _recurrent.weight_gradients(*out, dgx, dgh, x, h_prev,
                                    F.call_threads() if flop >= F.SMALL_WORK_FLOP else 1,
                                    accumulate, db_x, db_h)
        if b_ih is None:
            return out[0], out[1], None, None
        return out[0], out[1], db_x, (db_h if self.apart else db_x.copy())

    # A copy of a cell (copy, deepcopy, pickle) owes nothing: what this owes is added
    # to the parameters first, whose copies then hold it.
    def __reduce__(self):
        self.add_pending()
        return _nothing_owed, ()

    def __deepcopy__(self, memo):
        self.add_pending()
        return None


def _nothing_owed():
    return None


class _CellBase(Module):
    """Parameters, init, input checks and the cache stack shared by the three cells."""

    _gates = 1

    def __init__(self, input_size, hidden_size, bias=True, dtype=np.float32, seed=None):
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                                 or seed < 0):
            raise ValueError(f"seed: expected None or an integer >= 0, got {seed!r}")
        dt = np.dtype(dtype)
        if dt not in (np.float32, np.float64):
            raise TypeError(f"dtype: expected float32 or float64, got {dt}")
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        self.bias, self.dtype, self.seed = bool(bias), dt, seed
        GH = self._gates * self.hidden_size
        self.weight_ih = Parameter(aligned_zeros((GH, self.input_size), dt))    # (G·H, I)
        self.weight_hh = Parameter(aligned_zeros((GH, self.hidden_size), dt))   # (G·H, H)
        if self.bias:
            self.bias_ih = Parameter(aligned_zeros(GH, dt))                     # (G·H,)
            self.bias_hh = Parameter(aligned_zeros(GH, dt))                     # (G·H,)
        else:
            self.bias_ih = self.bias_hh = None  # what the kernels take for "no bias"
        self._stack = []  # per-step (cache, batched, B), most recent last
        self._owed = None  # _PendingGradients of the backward calls so far, or None
        if not init_skipped():          # (weights_to_be_loaded: a loader sets them all)
            self.reset_parameters(np.random.default_rng(seed))

    def reset_parameters(self, rng=None):
        """torch's init: every parameter ~ U(-1/sqrt(H), 1/sqrt(H)), in registration order."""
        reset_recurrent_parameters(self, rng)

    def config(self):
        """Constructor arguments as a JSON-friendly dict (used by fastrnn.save/load)."""
        return dict(input_size=self.input_size, hidden_size=self.hidden_size, bias=self.bias,
                    dtype=self.dtype.name, seed=self.seed)

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if self.dtype != np.float32:
            s += f", dtype={self.dtype.name}"
        return s

    def _check_param_shapes(self):
        """The parameters still have the shapes and dtype the cell's sizes and dtype give
        them (a user may assign other arrays to .data: consistent other sizes would give
        outputs of another hidden size than hidden_size says, an audit found; a float64
        weight in a float32 cell was refused by the kernel under its argument's name,
        not the parameter's). Per step, so a few compares when all is well."""
        GH, I, H = self._gates * self.hidden_size, self.input_size, self.hidden_size
        want = [("weight_ih", self.weight_ih.data, (GH, I)),
                ("weight_hh", self.weight_hh.data, (GH, H))]
        if self.bias_ih is not None:
            want += [("bias_ih", self.bias_ih.data, (GH,)), ("bias_hh", self.bias_hh.data, (GH,))]
        for name, a, shape in want:
            if isinstance(a, np.ndarray) and a.shape == shape and a.dtype == self.dtype:
                continue
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{name}: expected a numpy array of shape {shape} and dtype "
                                f"{self.dtype}, got {type(a).__name__}")
            if a.shape != shape:
                raise ValueError(f"{name}: expected shape {shape} (input_size={I}, "
                                 f"hidden_size={H}), got {a.shape}")
            raise TypeError(f"{name}: expected dtype {self.dtype} (the cell's dtype), got "
                            f"{a.dtype}")

    def clear_cache(self):
        """Forget all pushed steps (e.g. when truncating BPTT)."""
        self._stack.clear()
        self._set_train_owner(False)
        self._add_owed()

    def _add_owed(self):
        """Add the gradients the backward calls so far owe (_PendingGradients)."""
        owed = self.__dict__.get("_owed")
        if owed is not None:
            owed.add_pending()

    def _step_backward_deferred(self, dy3, dc, cache):
        """(dx (1, B, I), dh0 (B, H), dc0 (LSTM) or None) of one step whose weight
        gradients are owed (_PendingGradients), or None if its cache cannot defer them."""
        if not F.defers_weights(cache):
            return None
        dx, dh0, dc0, terms = F.deferred_backward(self._kind, dy3, None, dc, cache)
        params = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        owed = self.__dict__.get("_owed")
        if owed is None or any(a is not b for a, b in zip(owed.params, params)):
            if owed is not None:        # parameters replaced since: what the old ones are owed
                owed.add_pending()
            owed = _PendingGradients(params, self._gates == 3)
            object.__setattr__(self, "_owed", owed)
        for p in params:
            if p is not None and p._pending is not owed:
                p.add_pending()         # owed by another cell that shares it
                p._pending = owed
        owed.add(terms)
        if owed.rows >= PENDING_ROWS or not self._stack:
            owed.add_pending()
        return dx, dh0, dc0

    @property
    def num_cached_steps(self):
        return len(self._stack)

    def __call__(self, input, hx=None):
        # eval calls try the fast path first, registered like Module.__call__ does
        if not self.training:
            fast = _fastpath.eval_call(self, True, input, hx)
            if fast is not None:
                return fast
        return Module.__call__(self, input, hx)

    def _biases(self):
        return (None, None) if self.bias_ih is None else (self.bias_ih.data, self.bias_hh.data)

    # -- one step: the cells differ in _check_hx and _step_forward (the LSTM's two
    # states) and in backward's arguments --------------------------------------
    def forward(self, input, hx=None):
        if not self.training:
            fast = _fastpath.cell_forward(self, input, hx)   # None: the call does not qualify
            if fast is not None:
                return fast
        self._check_param_shapes()
        x3, batched = self._check_x(input)                                 # (1, B, I)
        B = x3.shape[1]
        state = self._check_hx(hx, B, batched)
        if B == 0:           # an empty batch: torch's empty result, no kernel call
            self._push(None, True, 0)
            h1 = np.zeros((0, self.hidden_size), self.dtype)
            return (h1, h1.copy()) if self._gates == 4 else h1
        with _precision.full_precision():           # cells: float32 products (_precision)
            out, cache = self._step_forward(x3, state)   # h1 (B, H), or the LSTM's (h1, c1)
        self._push(cache, batched, B)
        if batched:
            return out
        return tuple(o[0] for o in out) if type(out) is tuple else out[0]

    def _check_hx(self, hx, B, batched):
        """The state argument: h (B, H) or None."""
        return self._check_state("hx", hx, B, batched)

    def _pop(self):
        """Drop the step backward has just checked its arguments against."""
        self._stack.pop()
        if not self._stack:
            self._set_train_owner(False)

    @training_call
    def backward(self, dh):
        """dh: gradient of this step's output h' (None: zero, as LSTMCell's) ->
        (dx, dh_prev); pops one step."""
        cache, batched, B = self._top()
        if dh is None:
            dh = np.zeros((B, self.hidden_size) if batched else self.hidden_size, self.dtype)
        dh = self._check_state("dh", dh, B, batched)                      # (B, H)
        self._pop()
        if B == 0:           # an empty batch's step: empty gradients, nothing added
            if not self._stack:
                self._add_owed()
            return self._empty_grads()
        done = self._step_backward_deferred(dh[None], None, cache)       # dx (1, B, I)
        if done is None:
            dx, dh0, grads = self._step_backward(dh[None], cache)
            self._accumulate(*grads)
        else:
            dx, dh0, _ = done
        return (dx[0], dh0) if batched else (dx[0, 0], dh0[0])

    # -- cheap per-step checks (rank, size, dtype); messages name the argument --
    def _check_x(self, x):
        """x (B,I) or unbatched (I,) -> (x3 (1,B,I), batched)."""
        if type(x) is not np.ndarray or x.dtype != self.dtype:
            self._dtype_error("input", x)
        if x.ndim == 2 and x.shape[1] == self.input_size:       # (B = 0: torch's empty batch)
            return x[None], True
        if x.ndim == 1 and x.shape[0] == self.input_size:
            return x[None, None], False
        raise ValueError(f"input: expected shape (B, {self.input_size}) or "
                         f"({self.input_size},), got {x.shape}")

    def _check_state(self, name, h, B, batched):
        """h (B,H) or unbatched (H,) or None -> (B,H) or None."""
        if h is None:
            return None
        if type(h) is not np.ndarray or h.dtype != self.dtype:
            self._dtype_error(name, h)
        shape = (B, self.hidden_size) if batched else (self.hidden_size,)
        if h.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {h.shape}")
        return h if batched else h[None]

    def _dtype_error(self, name, a):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name}: expected a numpy array of dtype {self.dtype}, "
                            f"got {type(a).__name__}")
        other = (f" or build the cell with dtype=np.{a.dtype}"
                 if a.dtype in (np.float32, np.float64) else "")   # the dtypes it takes
        raise TypeError(f"{name}: expected dtype {self.dtype} (the cell's dtype), got "
                        f"{a.dtype}; convert with .astype(np.{self.dtype}){other}")

    def _push(self, cache, batched, B):
        if self.training:
            self._stack.append((cache, batched, B))
            self._set_train_owner(True)

    def _empty_grads(self):
        """backward of an empty batch's step: dx (0, I), dh (0, H) (the LSTM's (dh, dc))."""
        dx, dh = np.zeros((0, self.input_size), self.dtype), np.zeros((0, self.hidden_size),
                                                                      self.dtype)
        return (dx, (dh, dh.copy())) if self._gates == 4 else (dx, dh)

    def _top(self):
        """The most recent step; backward pops it only after its checks pass."""
        if not self._stack:
            raise RuntimeError("backward: no cached step left. Each training-mode forward "
                               "call supports one backward call (last step first).")
        return self._stack[-1]

    def _grad_targets(self):
        """(out, accumulate) for the functional backward (module.grad_targets)."""
        return grad_targets((self.weight_ih, self.weight_hh))

    def _accumulate(self, dw_ih, dw_hh, db_ih, db_hh):
        for p, g in ((self.weight_ih, dw_ih), (self.weight_hh, dw_hh),
                     (self.bias_ih, db_ih), (self.bias_hh, db_hh)):
            if g is not None:
                p.take_grad(g)


class RNNCell(_CellBase):
    """h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh), act tanh | relu | identity.

    `h1 = cell(input, hx=None)` with input (B,I) or (I,), hx: h; `dx, dh = cell.backward(dh)`.
    """

    _gates = 1
    _kind = "rnn"

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh",
                 dtype=np.float32, seed=None):
        if nonlinearity not in _NONLINEARITIES:
            raise ValueError(f"nonlinearity: expected one of {_NONLINEARITIES}, "
                             f"got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, bias, dtype, seed)
        self.nonlinearity = nonlinearity

    def config(self):
        return dict(super().config(), nonlinearity=self.nonlinearity)

    def _step_forward(self, x3, h):
        """(h1 (B, H), cache) of one step: x3 (1, B, I), h (B, H) or None."""
        _, h1, cache = F.rnn_forward(x3, h, self.weight_ih.data, self.weight_hh.data,
                                     *self._biases(), nonlinearity=self.nonlinearity,
                                     training=self.training)
        return h1, cache

    def _step_backward(self, dh3, cache):
        """(dx (1, B, I), dh0 (B, H), grads) of one step, dh3 (1, B, H)."""
        dx, dh0, *grads = F.rnn_backward(dh3, None, cache, *self._grad_targets())
        return dx, dh0, grads


class GRUCell(_CellBase):
    """GRU step with torch's gate order (r, z, n), "linear before reset" (reset_after=False:
    the seed's form, as fastrnn.GRU's).

    `h1 = cell(input, hx=None)` with input (B,I) or (I,), hx: h; `dx, dh = cell.backward(dh)`.
    """

    _gates = 3
    _kind = "gru"

    def __init__(self, input_size, hidden_size, bias=True, dtype=np.float32, seed=None,
                 reset_after=True):
        if not isinstance(reset_after, (bool, np.bool_)):
            raise TypeError(f"reset_after: expected True or False, got {reset_after!r}")
        super().__init__(input_size, hidden_size, bias, dtype, seed)
        self.reset_after = bool(reset_after)

    def config(self):
        return dict(super().config(), reset_after=self.reset_after)

    def extra_repr(self):
        return super().extra_repr() + ("" if self.reset_after else ", reset_after=False")

    def _step_forward(self, x3, h):
        """(h1 (B, H), cache) of one step: x3 (1, B, I), h (B, H) or None."""
        _, h1, cache = F.gru_forward(x3, h, self.weight_ih.data, self.weight_hh.data,
                                     *self._biases(), training=self.training,
                                     reset_after=self.reset_after)
        return h1, cache

    def _step_backward(self, dh3, cache):
        """(dx (1, B, I), dh0 (B, H), grads) of one step, dh3 (1, B, H)."""
        dx, dh0, *grads = F.gru_backward(dh3, None, cache, *self._grad_targets())
        return dx, dh0, grads


class LSTMCell(_CellBase):
    """LSTM step with torch's gate order (i, f, g, o).

    `h1, c1 = cell(input, hx=None)` with input (B,I) or (I,), hx: (h, c);
    `dx, (dh, dc) = cell.backward(dh, dc=None)` (or `cell.backward((dh, dc))`): the
    gradients of this step's (h1, c1) in, of its (x, h, c) out.
    """

    _gates = 4
    _kind = "lstm"

    def _check_hx(self, hx, B, batched):
        """The state argument: (h, c), each (B, H), or None."""
        if hx is None:
            return None, None
        if type(hx) is not tuple and type(hx) is not list or len(hx) != 2:
            raise TypeError(f"hx: expected a tuple (h, c), got {describe(hx)}")
        return (self._check_state("hx[0]", hx[0], B, batched),             # (B, H)
                self._check_state("hx[1]", hx[1], B, batched))             # (B, H)

    def _step_forward(self, x3, state):
        """((h1, c1), cache) of one step: x3 (1, B, I), state (h, c), each (B, H) or None."""
        _, h1, c1, cache = F.lstm_forward(x3, *state, self.weight_ih.data, self.weight_hh.data,
                                          *self._biases(), training=self.training)
        return (h1, c1), cache

    @training_call
    def backward(self, dh, dc=None):
        """Gradients of this step's (h', c') -> (dx, (dh_prev, dc_prev)); pops one step.

        dh may be None (zero); dc None means zero. A tuple (dh, dc) as the
        single argument also works, mirroring the forward's state tuple.
        """
        if type(dh) is tuple and dc is None:
            dh, dc = dh
        cache, batched, B = self._top()
        if dh is None:
            dh = np.zeros((B, self.hidden_size) if batched else self.hidden_size, self.dtype)
        dh = self._check_state("dh", dh, B, batched)                      # (B, H)
        dc = self._check_state("dc", dc, B, batched)                      # (B, H) or None
        self._pop()
        if B == 0:
            if not self._stack:
                self._add_owed()
            return self._empty_grads()
        done = self._step_backward_deferred(dh[None], dc, cache)         # dx (1, B, I)
        if done is None:
            dx, dh0, dc0, *grads = F.lstm_backward(dh[None], None, dc, cache,
                                                   *self._grad_targets())
            self._accumulate(*grads)
        else:
            dx, dh0, dc0 = done
        return (dx[0], (dh0, dc0)) if batched else (dx[0, 0], (dh0[0], dc0[0]))
