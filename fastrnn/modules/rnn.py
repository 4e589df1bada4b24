"""Multi-layer, optionally bidirectional RNN / LSTM / GRU layers (torch.nn-compatible).

Every layer is a stack of single-layer, single-direction runs of the functional
kernels (`fastrnn.functional`, see docs/DESIGN.md). This file only wires them up:
input checks, the batch_first transpose, stacking, bidirectional merging, dropout
between layers, and accumulating the kernels' gradients into `Parameter.grad`.
An LSTM with `proj_size > 0` runs `F.lstmp_forward` / `F.lstmp_backward`.

Shape letters: T steps, B batch, I input size, H hidden size, P projection size,
O = P if projected else H (the size of h), L layers, D directions (1 or 2).
"""

import threading

import numpy as np

from fastrnn import _buffers, _fastpath, _placement
from fastrnn._validate import as_ids, describe
from fastrnn import functional as F  # the module, looked up at call time
from fastrnn.modules.module import (Module, Parameter, aligned_zeros, grad_targets,
                                    init_skipped, reset_recurrent_parameters, training_call)

__all__ = ["RNNBase", "RNN", "LSTM", "GRU"]

_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_NONLINEARITIES = ("tanh", "relu", "identity")
_MERGE_MODES = ("concat", "sum")


# When a bidirectional layer runs its two directions at once, each on its share
# of the threads, rather than one after the other on all of them. Measured on the
# 2-core AMD EPYC Zen 4 (AVX-512), 2026-12-05, I=H=128-512, B=1-64, three runs of
# `python bench/bidirectional.py` (docs/results-2026-12-05-bidirectional-zen4.txt):
# - Training, when one direction's recurrent product takes at least
#   CONCURRENT_TRAIN_MIN_STEP_FLOP a step: at once took 0.61-1.02x the time of one
#   after the other for the LSTM, 0.65-1.05x for the GRU, 0.86-1.08x for the RNN
#   (each thread runs its direction with no barrier per step). Below that line
#   the RNN lost up to 1.50x (H=128, B=1); the LSTM at H=128, B=1-4 would have
#   gained (0.66-0.81x), left out to keep one rule for every cell.
# - Inference: one after the other. At once was mostly slower at batch 1-3 (up
#   to 2.08x), 0.95-1.08x from 32 rows up, and in between the runs disagreed
#   (RNN H=128, B=8: 0.62x in one run, 1.63x and 1.65x in the others).
# - Never below CONCURRENT_MIN_FLOP per direction (measured when a Python thread was
#   started per call, ~80 us; the helper thread is kept since session 31 and the line
#   was not measured again):
#   with 21-42 MFLOP at once lost 3-15 % (LSTM H=128 B=8 T=20, GRU H=256 B=4
#   T=20, RNN H=512 B=4 T=10, LSTM H=512 B=2 T=10); at T=25-50 of the same rows
#   (52-105 MFLOP) it took 0.83-0.98x; interleaved in one process, one run each.
#   (Near the line the host's noise is as large: GRU H=256 B=4 T=100 read 1.07x
#   in that run and 0.95-0.99x in bench/bidirectional.py's three.)
# On the Zen 3 machine (2026-12-02, an older build) training at once was
# 0.75-0.86x as fast at LSTM I=H=256 T=100, B=1/8/64; not re-measured there.
CONCURRENT_MIN_FLOP = 5e7
CONCURRENT_TRAIN_MIN_STEP_FLOP = 1e6


def _at_once(D, T, step_flop, training):
    """Should the D directions (T steps, step_flop FLOP of recurrent product per
    direction and step) run at once? The rule above."""
    return (training and D == 2 and step_flop >= CONCURRENT_TRAIN_MIN_STEP_FLOP
            and T * step_flop >= CONCURRENT_MIN_FLOP)


def _call_threads():
    """Threads this Python thread's calls may use (functional.call_threads)."""
    call_threads = getattr(F, "call_threads", None)   # (tests may swap in the reference)
    return call_threads() if call_threads is not None else 1


def _directions(run, D, at_once):
    """[run(0), ..., run(D-1)]. The two directions of a bidirectional layer are
    independent: with two or more threads and `at_once` (_at_once) they run at
    once, each on its share of the threads (the reverse one on a kept helper
    thread, _placement.Beside; the kernels release the GIL), so no thread waits on another
    at every step. Results are bitwise those of running them one after the other."""
    n = _call_threads()
    if D == 1 or n < 2 or not at_once:
        return [run(d) for d in range(D)]
    # the reverse direction on a kept helper thread, off this thread's CPU (_placement)
    # when it runs alone (with more threads it starts OpenMP teams: see Beside)
    helper = _placement.Beside(lambda: _run_on_share(run, 1, n // 2), step_aside=n // 2 == 1)
    try:
        first = _run_on_share(run, 0, n - n // 2)
    finally:
        helper.wait()
    return [first, helper.result()]


def _run_on_share(run, d, threads):
    with F.thread_share(threads):
        return run(d)


def _check_dtype(dtype):
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype: expected float32 or float64, got {dt}")
    return dt


def _check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_lengths(lengths, T, B):
    """Validate per-sequence lengths (size B, integers, each in [1, T]) -> int64 array (B,)."""
    arr = np.asarray(lengths)
    if (arr.dtype.kind == "f" and isinstance(lengths, (list, tuple))
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
                    for v in lengths)):
        # NumPy promotes e.g. [np.int8(2), np.uint64(3)] to float64: integers all the same
        values = [int(v) for v in lengths]
        if any(not 1 <= v <= T for v in values):
            raise ValueError(f"lengths: every length must be in [1, {T}] (T = number of "
                             f"steps), got min {min(values)} and max {max(values)}")
        arr = np.array(values, dtype=np.int64)
    if arr.dtype.kind not in "iu":  # bools and floats are mistakes, not lengths
        raise TypeError(f"lengths: expected integers, got dtype {arr.dtype}")
    if arr.shape != (B,):
        raise ValueError(f"lengths: expected shape ({B},) (one length per sequence), "
                         f"got {arr.shape}")
    if B and (arr.min() < 1 or arr.max() > T):
        raise ValueError(f"lengths: every length must be in [1, {T}] (T = number of steps), "
                         f"got min {arr.min()} and max {arr.max()}")
    return np.ascontiguousarray(arr, dtype=np.int64)  # (B,)


class RNNBase(Module):
    """Shared machinery of RNN, LSTM and GRU. Use those classes.

    Parameters follow torch.nn exactly (names, shapes, gate order, registration
    order, U(-1/sqrt(H), 1/sqrt(H)) init), so `state_dict`s interchange.

    Gradients: `forward` in training mode keeps a cache; `backward` consumes it
    (once, like torch frees its graph) and *adds* into each `Parameter.grad`.
    In eval mode no cache is kept (cheaper inference) and `backward` raises.
    The cache references `x`, `hx` and the weights: do not modify them in
    place between forward and backward.
    """

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, proj_size=0,
                 dtype=np.float32, seed=None, merge_mode="concat", nonlinearity="tanh"):
        super().__init__()
        self.mode = mode
        self.input_size = _check_positive_int("input_size", input_size)
        self.hidden_size = _check_positive_int("hidden_size", hidden_size)
        self.num_layers = _check_positive_int("num_layers", num_layers)
        self.proj_size = _check_positive_int("proj_size", proj_size, minimum=0)
        if self.proj_size and mode != "LSTM":
            raise ValueError("proj_size: only LSTM supports a projection")
        if self.proj_size >= self.hidden_size:
            raise ValueError(f"proj_size: must be smaller than hidden_size "
                             f"({self.hidden_size}), got {self.proj_size}")
        dropout = float(dropout)
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1], got {dropout}")
        if merge_mode not in _MERGE_MODES:
            raise ValueError(f"merge_mode: expected one of {_MERGE_MODES}, got {merge_mode!r}")
        if nonlinearity not in _NONLINEARITIES:
            raise ValueError(f"nonlinearity: expected one of {_NONLINEARITIES}, "
                             f"got {nonlinearity!r}")
        if seed is not None:
            seed = _check_positive_int("seed", seed, minimum=0)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = dropout
        self.bidirectional = bool(bidirectional)
        self.dtype = _check_dtype(dtype)
        self.seed = seed
        self.merge_mode = merge_mode
        self.nonlinearity = nonlinearity
        self._cache = None  # set by a training-mode forward, consumed by backward

        # Two independent streams from one seed: weights, then dropout masks.
        init_seq, drop_seq = np.random.SeedSequence(seed).spawn(2)
        self._dropout_rng = np.random.default_rng(drop_seq)

        G, H, O = _GATES[mode], self.hidden_size, self.out_hidden_size
        layer_out = O * self.num_directions if merge_mode == "concat" else O
        self._param_names = []  # [layer*D + direction] -> names, in kernel argument order
        self._param_shapes = {}  # name -> the shape the configuration gives it
        for k in range(self.num_layers):
            in_size = self.input_size if k == 0 else layer_out
            for d in range(self.num_directions):
                sfx = f"_l{k}" + ("_reverse" if d else "")
                shapes = [(f"weight_ih{sfx}", (G * H, in_size)),   # (G·H, I)
                          (f"weight_hh{sfx}", (G * H, O))]          # (G·H, O)
                if self.bias:
                    shapes += [(f"bias_ih{sfx}", (G * H,)),          # (G·H,)
                               (f"bias_hh{sfx}", (G * H,))]          # (G·H,)
                if self.proj_size:
                    shapes += [(f"weight_hr{sfx}", (self.proj_size, H))]  # (P, H)
                for name, shape in shapes:
                    setattr(self, name, Parameter(aligned_zeros(shape, self.dtype)))
                    self._param_shapes[name] = shape
                self._param_names.append([name for name, _ in shapes])
        if not init_skipped():          # (weights_to_be_loaded: a loader sets them all)
            self.reset_parameters(np.random.default_rng(init_seq))

    # -- configuration ------------------------------------------------------
    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    @property
    def out_hidden_size(self):
        """Size of h (and of each direction's output): proj_size if set, else hidden_size."""
        return self.proj_size or self.hidden_size

    @property
    def output_size(self):
        """Last dimension of the output `out`."""
        D = self.num_directions if self.merge_mode == "concat" else 1
        return D * self.out_hidden_size

    def reset_parameters(self, rng=None):
        """torch's init: every parameter ~ U(-1/sqrt(H), 1/sqrt(H)), in registration order."""
        reset_recurrent_parameters(self, rng)

    def config(self):
        """Constructor arguments as a JSON-friendly dict (used by fastrnn.save/load)."""
        cfg = dict(input_size=self.input_size, hidden_size=self.hidden_size,
                   num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first,
                   dropout=self.dropout, bidirectional=self.bidirectional,
                   dtype=self.dtype.name, seed=self.seed, merge_mode=self.merge_mode)
        cfg.update(self._extra_config())
        return cfg

    def _extra_config(self):
        return {}

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.mode == "RNN" and self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
            if self.merge_mode != "concat":
                s += f", merge_mode={self.merge_mode!r}"
        if self.dtype != np.float32:
            s += f", dtype={self.dtype.name}"
        return s

    def _weights(self, idx):
        """Kernel arguments (w_ih, w_hh, b_ih, b_hh[, w_hr]) of run idx = layer*D + direction."""
        names = self._param_names[idx]
        arrays = [getattr(self, n).data for n in names]
        for n, a in zip(names, arrays):   # a `.data` replaced by hand is checked here
            if getattr(a, "shape", None) != self._param_shapes[n]:
                raise ValueError(f"{n}: expected shape {self._param_shapes[n]} (from the "
                                 f"module's sizes), got {getattr(a, 'shape', type(a).__name__)}")
            if getattr(a, "dtype", None) != self.dtype:
                raise TypeError(f"{n}: expected dtype {self.dtype} (the module's dtype), got "
                                f"{getattr(a, 'dtype', type(a).__name__)}")
        if not self.bias:  # kernels take explicit None biases
            arrays[2:2] = [None, None]
        return arrays

    # -- input checks (messages name the argument and expected/actual) -----
    def _check_array(self, name, a, shape, given=None):
        """given: the type of what the caller passed, when it was not an array."""
        if not isinstance(a, np.ndarray):
            given = given or type(a).__name__
            a = np.asarray(a)
        if a.dtype != self.dtype and given is not None:   # a list of floats reads as float64
            raise TypeError(f"{name}: expected an array of dtype {self.dtype} (the module's "
                            f"dtype), got a {given} (read as {a.dtype}); pass "
                            f"np.asarray({name}, dtype=np.{self.dtype})")
        if a.dtype != self.dtype:  # never a silent cast
            other = (f" or build the module with dtype=np.{a.dtype}"
                     if a.dtype in (np.float32, np.float64) else "")   # the dtypes it takes
            raise TypeError(f"{name}: expected dtype {self.dtype} (the module's dtype), got "
                            f"{a.dtype}; convert with .astype(np.{self.dtype}){other}")
        if a.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")
        return np.ascontiguousarray(a)

    def _check_input(self, x):
        """x (T,B,I) or (B,T,I) if batch_first -> contiguous time-major (T,B,I)."""
        given = None
        if not isinstance(x, np.ndarray):
            given = type(x).__name__
            x = np.asarray(x)
        layout = "(B, T, I)" if self.batch_first else "(T, B, I)"
        if x.ndim != 3:
            raise ValueError(f"x: expected a 3-D array {layout}, got shape {x.shape}")
        if x.shape[2] != self.input_size:
            raise ValueError(f"x: expected last dimension I = input_size = {self.input_size}, "
                             f"got shape {x.shape} {layout}")
        if x.shape[1 if self.batch_first else 0] == 0:   # (an empty batch is torch's: allowed)
            raise ValueError(f"x: expected at least one step, got shape {x.shape} {layout}")
        if self.batch_first:
            x = x.transpose(1, 0, 2)  # (T, B, I)
        return self._check_array("x", x, x.shape, given)

    def _state_shape(self, B, cell=False):
        size = self.hidden_size if cell else self.out_hidden_size
        return (self.num_layers * self.num_directions, B, size)

    def _split_state(self, name, hx):
        """RNN/GRU take one array; LSTM a pair. -> (h, c) with c None for RNN/GRU."""
        if self.mode != "LSTM":
            return hx, None
        if hx is None:
            return None, None
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"{name}: expected a tuple (h, c) for LSTM, got {describe(hx)}")
        return hx[0], hx[1]

    def _check_state(self, name, hx, B):
        """-> (h (L·D,B,O) or None, c (L·D,B,H) or None)."""
        h, c = self._split_state(name, hx)
        hname, cname = (f"{name}[0]", f"{name}[1]") if self.mode == "LSTM" else (name, None)
        if h is not None:
            h = self._check_array(hname, h, self._state_shape(B))
        if c is not None:
            c = self._check_array(cname, c, self._state_shape(B, cell=True))
        return h, c

    # -- forward ------------------------------------------------------------
    def __call__(self, x, hx=None, lengths=None, x_ids=None):
        # eval calls try the fast path first, registered like Module.__call__ does
        if not self.training and x_ids is None:
            fast = _fastpath.eval_call(self, False, x, hx, lengths)
            if fast is not None:
                return fast
        if x_ids is None:
            return Module.__call__(self, x, hx, lengths)
        return Module.__call__(self, x, hx, lengths, x_ids=x_ids)

    def _check_ids_input(self, x, x_ids):
        """x a table (V, I) and x_ids (T, B) ((B, T) if batch_first) -> (x, ids (T, B))."""
        if self.proj_size:
            raise ValueError("x_ids: not with proj_size; pass x[x_ids] instead")
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.input_size:
            raise ValueError(f"x: with x_ids, expected a table (V, I = input_size = "
                             f"{self.input_size}), got shape {x.shape}")
        x = self._check_array("x", x, x.shape)
        ids = as_ids("x_ids", x_ids, x.shape[0])
        return x, (ids.T.copy() if self.batch_first else ids)

    def forward(self, x, hx=None, lengths=None, x_ids=None):
        """Run the stack. Returns `out, h_n` (RNN/GRU) or `out, (h_n, c_n)` (LSTM).

        x: (T,B,I), or (B,T,I) with batch_first. hx: initial state(s) or None
        for zeros, h0 (L·D,B,O) and for LSTM c0 (L·D,B,H), never batch_first.
        lengths: optional (B,) ints in [1, T]; padded outputs are 0 and h_n/c_n
        are taken at each sequence's last valid step (torch's packed-sequence
        result, padded with `pad_packed_sequence(..., total_length=T)`).
        out: (T,B,D·O) for merge_mode 'concat' ([forward | reverse]), (T,B,O)
        for 'sum'; h_n (L·D,B,O) and c_n (L·D,B,H) indexed layer*D + direction.
        x_ids: (T,B) ints ((B,T) with batch_first): x is then a table (V,I), an
        embedding's weights, and sequence b reads row x[x_ids[t, b]] at step t. The
        result is forward(x[x_ids])'s, and backward returns the table's gradient (V,I).
        With V <= T*B (and float products, not bf16) the first layer takes its input
        projections from rows of x W_ih^T, computed once; else it gathers x[x_ids]
        (fastrnn/_ids_input.py). Every id must be a row of x, padded steps' too.
        Not with proj_size.

        Unbatched, as torch takes it: x (T,I) (batch_first or not), hx h0 (L·D,O) and
        c0 (L·D,H) -> out (T,D·O), h_n (L·D,O), c_n (L·D,H): a batch of one, without
        its axis; backward then takes and returns the same shapes. No lengths.
        An empty batch (B = 0) gives empty outputs, as torch's, without a kernel call.
        """
        if x_ids is None and np.ndim(x) == 2:
            return self._forward_unbatched(x, hx, lengths)
        if not self.training and lengths is None and x_ids is None:
            fast = _fastpath.layer_forward(self, x, hx)     # None: the call does not qualify
            if fast is not None:                            # (a direct .forward() call)
                return fast
        if x_ids is None:
            x = self._check_input(x)                         # (T, B, I)
            T, B, _ = x.shape
        else:
            x, x_ids = self._check_ids_input(x, x_ids)       # (V, I), (T, B)
            T, B = x_ids.shape
        h0, c0 = self._check_state("hx", hx, B)
        if lengths is not None:
            lengths = check_lengths(lengths, T, B)           # (B,)
        keep = self.training  # only a training forward can be differentiated
        if keep or self.__dict__.get("_train_owner") in (None, threading.get_ident()):
            self._cache = None    # a stale cache must never meet new gradients
            self._set_train_owner(False)  # (another thread's pending cache is left alone)

        D, O = self.num_directions, self.out_hidden_size
        if B == 0:
            return self._forward_empty(T, keep)
        h_n = np.empty(self._state_shape(B), self.dtype)               # (L·D, B, O)
        c_n = np.empty(self._state_shape(B, True), self.dtype) if self.mode == "LSTM" else None
        caches, masks = [], []
        layer_in = x                                                    # (T, B, I or D·O)
        # Both directions concatenated: each writes its half (inference: in place;
        # training: a copy of its states, which the kernel writes as the steps run).
        # One direction's last layer in training: the same copy, the output the caller
        # may edit without touching the cache (batch_first transposes into a new array,
        # unless B or T is 1: the transpose is then contiguous, a view).
        halves = D == 2 and self.merge_mode == "concat"
        copy_last = keep and D == 1 and (not self.batch_first or B == 1 or T == 1)
        for k in range(self.num_layers):
            joined = None
            if halves or (copy_last and k == self.num_layers - 1):     # (T, B, D·O)
                joined = (_buffers.empty if keep else np.empty)((T, B, D * O), self.dtype)
            by_id = {"x_ids": x_ids} if k == 0 and x_ids is not None else {}

            def direction(d, layer_in=layer_in, k=k, joined=joined, by_id=by_id):
                idx = k * D + d
                half = None if joined is None else joined[:, :, d * O:(d + 1) * O]
                result = self._forward_direction(
                    layer_in, None if h0 is None else h0[idx], None if c0 is None else c0[idx],
                    self._weights(idx), lengths, bool(d), keep, half,
                    **by_id)                                            # y (T, B, O), ...
                if half is not None and result[0] is not half:   # an override ignored `out`
                    _buffers.copy_rows(half.reshape(T * B, O), result[0].reshape(T * B, O),
                                       _call_threads())
                    result = (half,) + tuple(result[1:])
                return result
            results = _directions(direction, D, _at_once(D, T, self._step_flop(B), keep))
            ys = []
            for d, (y, hn, cn, cache) in enumerate(results):
                idx = k * D + d
                ys.append(y)
                h_n[idx] = hn
                if c_n is not None:
                    c_n[idx] = cn
                caches.append(cache)
            if D == 1:
                layer_out = ys[0]                                       # (T, B, O)
            elif joined is not None:
                layer_out = joined                                      # (T, B, 2·O)
            else:
                layer_out = ys[0] + ys[1]                               # (T, B, O)
            if k < self.num_layers - 1 and self.training and self.dropout > 0:
                mask = self._dropout_mask(layer_out.shape)              # (T, B, D·O or O)
                layer_out = layer_out * mask
                masks.append(mask)
            else:
                masks.append(None)
            layer_in = layer_out
        out = layer_in.transpose(1, 0, 2) if self.batch_first else layer_in
        out = np.ascontiguousarray(out)                                 # (T,B,·) or (B,T,·)
        if keep:
            self._cache = dict(caches=caches, masks=masks, out_shape=out.shape, B=B,
                               by_id=x_ids is not None)
            self._set_train_owner(True)
        return (out, (h_n, c_n)) if self.mode == "LSTM" else (out, h_n)

    def _forward_empty(self, T, keep):
        """An empty batch, as torch gives it: out (T,0,F) ((0,T,F) batch_first), states
        (L·D,0,·); no kernel runs, and backward adds nothing to the gradients (x_ids
        refuses an empty batch before this)."""
        F = self.out_hidden_size * (self.num_directions if self.merge_mode == "concat" else 1)
        out = np.zeros((0, T, F) if self.batch_first else (T, 0, F), self.dtype)
        h_n = np.zeros(self._state_shape(0), self.dtype)
        c_n = np.zeros(self._state_shape(0, True), self.dtype) if self.mode == "LSTM" else None
        if keep:
            self._cache = dict(empty=True, out_shape=out.shape, B=0, T=T)
            self._set_train_owner(True)
        return (out, (h_n, c_n)) if self.mode == "LSTM" else (out, h_n)

    def _unbatched_state(self, name, hx):
        """A state for an unbatched call, h (L·D,O) and c (L·D,H) or None, as the
        batched call's (L·D,1,·) views; the shapes checked here."""
        h, c = self._split_state(name, hx)
        hname, cname = (f"{name}[0]", f"{name}[1]") if self.mode == "LSTM" else (name, None)
        out = []
        for n, a, cell in ((hname, h, False), (cname, c, True)):
            if a is not None:
                shape = self._state_shape(1, cell)
                a = self._check_array(n, a, (shape[0], shape[2]))    # (L·D, O or H)
                a = a[:, None]                                        # (L·D, 1, ·)
            out.append(a)
        return tuple(out) if self.mode == "LSTM" else out[0]

    def _forward_unbatched(self, x, hx, lengths):
        """forward() of an unbatched x (T,I): a batch of one, its axis dropped."""
        if lengths is not None:
            raise ValueError("lengths: not taken with an unbatched x (T, I); give x a batch "
                             "axis to pass lengths")
        given = None if isinstance(x, np.ndarray) else type(x).__name__
        x = self._check_array("x", x, np.shape(x), given)
        if x.shape[1] != self.input_size:
            raise ValueError(f"x: expected last dimension I = input_size = {self.input_size}, "
                             f"got shape {x.shape} (T, I)")
        if x.shape[0] == 0:
            raise ValueError(f"x: expected at least one step, got shape {x.shape} (T, I)")
        x3 = x[None] if self.batch_first else x[:, None]              # (1,T,I) or (T,1,I)
        out, state = self.forward(x3, self._unbatched_state("hx", hx))
        if self.training:
            self._cache["unbatched"] = True
        out = out[0] if self.batch_first else out[:, 0]               # (T, D·O): contiguous
        if self.mode == "LSTM":
            return out, (state[0][:, 0], state[1][:, 0])
        return out, state[:, 0]

    def _backward_unbatched(self, cache, dout, dstate):
        """backward() after an unbatched forward: dout (T,D·O), dstate (L·D,·) -> dx (T,I),
        dh0 (L·D,O) (and dc0 (L·D,H)). Everything is checked before the cache is used."""
        shape = cache["out_shape"]                                    # (T,1,F) or (1,T,F)
        if dout is not None:
            dout = self._check_array("dout", dout, (shape[1] if self.batch_first else shape[0],
                                                    shape[2]))
            dout = dout[None] if self.batch_first else dout[:, None]
        dx, dst = self._backward_batched(cache, dout, self._unbatched_state("dstate", dstate))
        dx = dx[0] if self.batch_first else dx[:, 0]                  # (T, I)
        if self.mode == "LSTM":
            return dx, (dst[0][:, 0], dst[1][:, 0])
        return dx, dst[:, 0]

    def _backward_empty(self, cache, dout, dstate):
        """backward() after an empty batch's forward: empty gradients, nothing added."""
        if dout is not None:
            self._check_array("dout", dout, cache["out_shape"])
        self._check_state("dstate", dstate, 0)
        self._cache = None
        self._set_train_owner(False)
        T, I = cache["T"], self.input_size
        dx = np.zeros((0, T, I) if self.batch_first else (T, 0, I), self.dtype)
        dh0 = np.zeros(self._state_shape(0), self.dtype)
        if self.mode == "LSTM":
            return dx, (dh0, np.zeros(self._state_shape(0, True), self.dtype))
        return dx, dh0

    def _dropout_mask(self, shape):
        """Inverted dropout: keep with prob 1-p and scale by 1/(1-p) (p=1 drops all)."""
        p = self.dropout
        if p >= 1.0:
            return np.zeros(shape, self.dtype)
        keep = self._dropout_rng.random(shape, dtype=self.dtype) >= p
        return keep.astype(self.dtype) * self.dtype.type(1.0 / (1.0 - p))

    # -- backward -----------------------------------------------------------
    @training_call
    def backward(self, dout=None, dstate=None):
        """Gradients of the last training-mode forward; adds into each Parameter.grad.

        dout: gradient of `out` (same shape and layout), None for zeros.
        dstate: gradient of the final state, None for zeros: dh_n (RNN/GRU) or
        (dh_n, dc_n) (LSTM; either may be None).
        Returns `dx, dh0` (RNN/GRU) or `dx, (dh0, dc0)` (LSTM); dx has x's layout
        (with x_ids: the table's gradient, (V, I)).
        Consumes the cache: run forward again before another backward.
        After an unbatched forward (x (T,I)), dout is (T,D·O) and dstate (L·D,·), and
        dx is (T,I), dh0 (L·D,O), dc0 (L·D,H).
        """
        cache = self._cache
        if cache is None:
            raise RuntimeError(
                "backward: no forward cache. Run forward in training mode (module.train()) "
                "right before backward; each forward supports one backward.")
        if cache.get("unbatched"):
            return self._backward_unbatched(cache, dout, dstate)
        return self._backward_batched(cache, dout, dstate)

    def _backward_batched(self, cache, dout, dstate):
        """backward() of a 3-D forward's cache (backward's arguments and result)."""
        if cache.get("empty"):
            return self._backward_empty(cache, dout, dstate)
        B = cache["B"]
        if dout is None:
            dout = np.zeros(cache["out_shape"], self.dtype)
        dout = self._check_array("dout", dout, cache["out_shape"])
        if self.batch_first:
            dout = dout.transpose(1, 0, 2)                      # (T, B, ·)
        T = dout.shape[0]
        dh_n, dc_n = self._check_state("dstate", dstate, B)
        self._cache = None
        self._set_train_owner(False)

        D, O = self.num_directions, self.out_hidden_size
        dh0 = np.empty(self._state_shape(B), self.dtype)                # (L·D, B, O)
        dc0 = np.empty(self._state_shape(B, True), self.dtype) if self.mode == "LSTM" else None
        dlayer = dout                                                   # d(layer output)
        for k in reversed(range(self.num_layers)):
            mask = cache["masks"][k]
            if mask is not None:
                dlayer = dlayer * mask
            dx_layer = None

            def direction(d, dlayer=dlayer, k=k):
                idx = k * D + d
                dy = dlayer                                             # (T, B, O)
                if self.merge_mode == "concat" and D == 2:
                    # this direction's half, read in place by the kernels (rows 2·O
                    # apart); batch_first's transposed view is copied by the backward
                    dy = dlayer[:, :, d * O:(d + 1) * O]
                return self._backward_direction(
                    dy,                                                 # (T, B, O)
                    None if dh_n is None else dh_n[idx], None if dc_n is None else dc_n[idx],
                    cache["caches"][idx], *self._weight_grad_targets(idx))
            results = _directions(direction, D, _at_once(D, T, self._step_flop(B), True))
            for d, (dx, dh, dc, grads) in enumerate(results):
                idx = k * D + d
                dh0[idx] = dh
                if dc0 is not None:
                    dc0[idx] = dc
                self._take_grads(idx, grads)
                # both directions read the same input, so their input gradients add
                if dx_layer is None:
                    dx_layer = dx                   # this call's own array: added into
                else:
                    # in place, one thread: a team woken here would spin while the
                    # next concurrent directions run, one thread each
                    np.add(dx_layer, dx, out=dx_layer)
            dlayer = dx_layer                                           # (T, B, I or D·O)
        dx = dlayer.transpose(1, 0, 2) if self.batch_first and not cache["by_id"] else dlayer
        dx = np.ascontiguousarray(dx)                       # x's layout, or the table's (V, I)
        return (dx, (dh0, dc0)) if self.mode == "LSTM" else (dx, dh0)

    def _weight_params(self, idx):
        """The weight matrices of run idx, in the order backward's `out` takes them:
        weight_ih, weight_hh[, weight_hr]."""
        return [getattr(self, n) for n in self._param_names[idx] if not n.startswith("bias")]

    def _weight_grad_targets(self, idx):
        """(out, accumulate) for run idx's backward (module.grad_targets)."""
        return grad_targets(self._weight_params(idx))

    def _take_grads(self, idx, grads):
        """Hand run idx's gradients (in _param_names order, None for no bias) to
        their parameters (Parameter.take_grad)."""
        for name, g in zip(self._param_names[idx], (g for g in grads if g is not None)):
            getattr(self, name).take_grad(g)

    def _step_flop(self, B):
        """FLOP of one direction's recurrent product per step, B rows: h W_hh^T
        (and the LSTM projection's W_hr)."""
        G = {"LSTM": 4, "GRU": 3}.get(self.mode, 1)
        H, O = self.hidden_size, self.out_hidden_size
        return 2 * B * G * H * O + 2 * B * O * H * (O != H)

    # -- one layer, one direction (overridden per cell type) -----------------
    def _forward_direction(self, x, h0, c0, w, lengths, reverse, keep, out=None, x_ids=None):
        """-> y (T,B,O), h_n (B,O), c_n (B,H) or None, cache. out: None, or where y
        goes (the functional forward's `out`: in training a copy of the cached y);
        x_ids: the functional forward's (x a table)."""
        raise NotImplementedError

    def _backward_direction(self, dy, dh_n, dc_n, cache, out=None, accumulate=False):
        """-> dx (T,B,·), dh0 (B,O), dc0 (B,H) or None, grads in _param_names order
        (bias grads None when bias=False). out, accumulate: as the functional
        backward's (the weight gradients written or added in place)."""
        raise NotImplementedError


class RNN(RNNBase):
    """Elman RNN, h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh), act tanh | relu | identity.

    Same positional order as torch.nn.RNN. `out, h_n = rnn(x, hx=None, lengths=None)`
    (hx: h0), `dx, dh0 = rnn.backward(dout, dstate=None)` (dstate: dh_n).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, dtype=np.float32,
                 seed=None, merge_mode="concat"):
        super().__init__("RNN", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0, dtype, seed, merge_mode, nonlinearity)

    def _extra_config(self):
        return {"nonlinearity": self.nonlinearity}

    def _forward_direction(self, x, h0, c0, w, lengths, reverse, keep, out=None, x_ids=None):
        y, h_n, cache = F.rnn_forward(x, h0, *w, nonlinearity=self.nonlinearity,
                                      lengths=lengths, reverse=reverse, training=keep, out=out,
                                      x_ids=x_ids)
        return y, h_n, None, cache

    def _backward_direction(self, dy, dh_n, dc_n, cache, out=None, accumulate=False):
        dx, dh0, *grads = F.rnn_backward(dy, dh_n, cache, out, accumulate)
        return dx, dh0, None, grads


class GRU(RNNBase):
    """GRU with torch's gate order (r, z, n) and "linear before reset" form.

    Same positional order as torch.nn.GRU. `out, h_n = gru(x, hx=None, lengths=None)`
    (hx: h0), `dx, dh0 = gru.backward(dout, dstate=None)` (dstate: dh_n).

    reset_after=False is the seed's GRU (Cho et al.'s; Keras reset_after=False, ONNX
    linear_before_reset=0): n = tanh(W_in x + b_in + W_hn (r * h) + b_hn) instead of
    torch's tanh(W_in x + b_in + r * (W_hn h + b_hn)); same parameters. Inference and
    training run in the kernels; with bf16 products (matmul precision "medium"), on
    fastrnn.reference's NumPy loop (docs/layers.md).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, dtype=np.float32, seed=None,
                 merge_mode="concat", reset_after=True):
        if not isinstance(reset_after, (bool, np.bool_)):
            raise TypeError(f"reset_after: expected True or False, got {reset_after!r}")
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0, dtype, seed, merge_mode)
        self.reset_after = bool(reset_after)

    def _extra_config(self):
        return {"reset_after": self.reset_after}

    def extra_repr(self):
        return super().extra_repr() + ("" if self.reset_after else ", reset_after=False")

    def _forward_direction(self, x, h0, c0, w, lengths, reverse, keep, out=None, x_ids=None):
        y, h_n, cache = F.gru_forward(x, h0, *w, lengths=lengths, reverse=reverse,
                                      training=keep, out=out, x_ids=x_ids,
                                      reset_after=self.reset_after)
        return y, h_n, None, cache

    def _backward_direction(self, dy, dh_n, dc_n, cache, out=None, accumulate=False):
        dx, dh0, *grads = F.gru_backward(dy, dh_n, cache, out, accumulate)
        return dx, dh0, None, grads


class LSTM(RNNBase):
    """LSTM with torch's gate order (i, f, g, o), optional projection (proj_size).

    Same positional order as torch.nn.LSTM.
    `out, (h_n, c_n) = lstm(x, hx=None, lengths=None)` (hx: (h0, c0)),
    `dx, (dh0, dc0) = lstm.backward(dout, dstate=None)` (dstate: (dh_n, dc_n)).

    With proj_size > 0, h = (o*tanh(c)) @ weight_hr.T and c keeps hidden_size;
    the projection runs in the same kernels (one more GEMM per step, rows split
    across threads).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, dtype=np.float32, seed=None,
                 merge_mode="concat"):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, proj_size, dtype, seed, merge_mode)

    def _extra_config(self):
        return {"proj_size": self.proj_size}

    def _forward_direction(self, x, h0, c0, w, lengths, reverse, keep, out=None, x_ids=None):
        if self.proj_size:
            return F.lstmp_forward(x, h0, c0, *w, lengths=lengths, reverse=reverse,
                                   training=keep, out=out)
        return F.lstm_forward(x, h0, c0, *w, lengths=lengths, reverse=reverse, training=keep,
                              out=out, x_ids=x_ids)

    def _backward_direction(self, dy, dh_n, dc_n, cache, out=None, accumulate=False):
        if self.proj_size:
            dx, dh0, dc0, *grads = F.lstmp_backward(dy, dh_n, dc_n, cache, out, accumulate)
        else:
            dx, dh0, dc0, *grads = F.lstm_backward(dy, dh_n, dc_n, cache, out, accumulate)
        return dx, dh0, dc0, grads
