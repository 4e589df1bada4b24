"""Single-layer, single-direction RNN / LSTM / GRU on the compiled kernels.

The same functions as `fastrnn.reference`, with the same argument names and
meanings (see docs/DESIGN.md); the reference also takes `bf16` (to emulate bf16
products) before `out`, so pass `out` by name, and its caches are its own:

    rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, lengths, reverse, training, out)
        -> y, h_n, cache
    lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training, out)
        -> y, h_n, c_n, cache
    lstmp_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, training, out)
        -> y, h_n, c_n, cache              (LSTM with projection, torch's proj_size)
    gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training, out)
        -> y, h_n, cache
    *_backward(dy, dh_n[, dc_n], cache, out=None, accumulate=False)
        -> dx, dh0[, dc0], dw_ih, dw_hh, db_ih, db_hh [, dw_hr for lstmp_backward]

A forward's `out` is where y goes: a (T, B, H) array whose rows are contiguous
and evenly spaced, such as one direction's half out2[:, :, :H] of a (T, B, 2H)
array (how a bidirectional layer fills its output with no copy); y is then
`out` itself. In training the cache keeps its own y, and `out` receives a copy
of it, written by the kernel as the steps run (how a module returns an output
the caller may edit without a separate copy pass).

`x_ids` (T, B) ints (not for lstmp): x is then a table (V, I), such as an
embedding's weights, and step t of sequence b reads row x[x_ids[t, b]]; the
result is the call on x[x_ids], and backward's dx is the table's gradient
(V, I). When V <= T*B (and the products are not bf16) the input projection is
taken once per table row and the time loop copies rows of it; else x[x_ids]
is gathered (fastrnn/_ids_input.py). Every id must be a row of x, padded
steps' too.

A backward's `out` takes arrays for the weight gradients (dw_ih, dw_hh[, dw_hr]):
the kernel writes them there, or adds into them with accumulate=True (how a
module fills its parameters' .grad: no temporary, no extra pass over them).

This module checks every argument, allocates outputs and decides the schedule
(rows sorted by length; one chunk of rows per thread, or at small batch each
thread a slice of the hidden units: `splits_units`, `rows_upto`); the recurrence
driver `fastrnn._recurrent` (src/_recurrent.pyx) then runs without the GIL.

A cache holds references to x and the weights, not copies, and `y` is a view
of the saved states: do not modify them in place between forward and backward.
Backward consumes its cache (it reuses the saved gates as gradient storage);
a second backward on the same cache raises RuntimeError.
"""

import threading
from contextlib import contextmanager

import numpy as np

from fastrnn import _buffers, _cpu_cache, _dense, _ids_input, _precision, _recurrent, reference
from fastrnn._config import get_num_threads
from fastrnn._frozen import both_frozen
from fastrnn._validate import (as_float_array, as_rows_array, as_lengths, check_input, check_rows_out,
                               check_shape, check_weights, optional_state)

__all__ = ["rnn_forward", "rnn_backward", "lstm_forward", "lstm_backward",
           "lstmp_forward", "lstmp_backward", "gru_forward", "gru_backward"]

_cpu_cache.check_amx_setting()                     # before any bf16 GEMM reads FASTRNN_AMX
_recurrent._set_l2_bytes(_cpu_cache.l2_bytes())   # the unit split's blocks, dW tasks (_recurrent.pyx)
_dense._set_l2_bytes(_cpu_cache.l2_bytes())        # the dW tasks of Linear's backward

PACK_MIN_BATCH = 4   # below this, the recurrent GEMM reads W_hh unpacked (dot-product kernel) ...
PACK_SMALL_MIN_ROWS = 32           # ... unless T*B reaches this
STEP_IN_PLACE_MAX_BATCH = 8  # a single step (T = 1) of up to this batch reads W in place too
ROWS_MAX_WEIGHTS = 1 << 20   # an inference row split below UNITS_MAX_BATCH only up to this W_hh
PACK_MIN_ROWS = 8    # below this many T*B rows, the input projection does too
UNITS_MAX_BATCH = 24  # batches up to this split hidden units, not rows, across threads
BF16_UNITS_MAX_BATCH = 64  # ... up to this at inference with bf16 products (splits_units)
UNITS_L2_MAX_BATCH = 48  # ... and up to this when W_hh overflows a core's L2 (splits_units)
UNITS_MIN_STEPS = 16  # ... when the sequence is long enough to repay regrouping the weights
FROZEN_UNITS_MAX_BATCH = 8   # ... or up to this batch at any T when the slices are kept
                             # (frozen weights at inference: splits_units)
# Frozen weights at inference are read packed (pack_flags) when a layer's W_ih and W_hh
# take at most this many bytes: the pack cache holds 256 MB (src/pack_cache.h), and
# weights whose packings could not stay there would be packed again at every call,
# where in place they are only read.
FROZEN_PACK_MAX_BYTES = 32 << 20
ROWS_MIN_PER_THREAD = 4   # ... but at inference rows when every thread gets this many
                          # and W_hh is small (rows_upto)
BACKWARD_UNITS_MAX_BATCH = 8   # backward's reverse loop splits hidden units up to this batch (measured:
                               # LSTM H=512 T=50 B=1 21.5 -> 15.7 ms, B=4 27.3 -> 23.0, neutral at 16-24)
BACKWARD_UNITS_L2_MAX_BATCH = 20   # ... and up to this when W_hh overflows a core's L2
                                   # (backward_splits_units)
# Calls smaller than this run on one thread: waking a team costs ~3 us (Xeon KVM guest),
# more than it saves below this. Measured there (cell step, B=1, I=H, 1 thread -> team):
# RNN H=64 (16k FLOP) 2.4 -> 5.9 us, LSTM H=128 (262k) 12.5 -> 11.0, LSTM H=256 (1M)
# 68.9 -> 26.5, RNN H=512 (1M) 50.0 -> 23.3. (It was 2e6, set on Zen 3: batch-1 steps of
# 1-4 MB of weights then streamed from L3 on one core.)
SMALL_WORK_FLOP = 2.5e5
# A call that splits hidden units waits at a barrier after every step, so what a team
# must repay is per step: below this many FLOP per step it runs on one thread. Measured
# on the 2-core Ice Lake Xeon KVM guest (layer call, B=1, I=1, T=64, 1 thread -> team):
# GRU H=32 (6k FLOP a step) 21.2 -> 50.1 us, LSTM H=32 (8k) 33.2 -> 52.4, RNN H=64 (8k)
# 19.5 -> 48.9; GRU H=64 (25k) 71.6 -> 63.9, LSTM H=64 (33k) 89.6 -> 76.0.
UNITS_STEP_MIN_FLOP = 2e4
NONLINEARITIES = {"tanh": 0, "relu": 1, "identity": 2}   # = CELL_RNN_* (src/_cells.pxd)
CELL_LSTM = 3
CELL_GRU = 4
CELL_GRU_RESET_BEFORE = 5   # reset_after=False (src/_cells.pxd)


_share = threading.local()   # .threads: this Python thread's share of the cores, or unset


@contextmanager
def thread_share(n):
    """Within the block, kernels called from this Python thread use n threads
    (bidirectional layers run their two directions at once, each on its share)."""
    old = getattr(_share, "threads", None)
    _share.threads = max(1, int(n))
    try:
        yield
    finally:
        _share.threads = old


def call_threads():
    """Threads a kernel call from this Python thread may use."""
    return getattr(_share, "threads", None) or get_num_threads()


class Schedule:
    """Row order and per-thread chunks for one call.

    lengths (B,) intp; order (B,) rows by decreasing length (stable);
    bounds (chunks+1,) chunk k is order[bounds[k]:bounds[k+1]], balanced by
    total length. padded: some sequence is shorter than T.
    """

    __slots__ = ("lengths", "order", "bounds", "padded", "n_threads")

    def __init__(self, lengths, B, T, n_threads):
        self.n_threads = n_threads
        if lengths is None:
            self.lengths = np.full(B, T, dtype=np.intp)
            self.order = np.arange(B, dtype=np.intp)
            self.padded = False
        else:
            self.lengths = lengths
            self.order = np.argsort(-lengths, kind="stable").astype(np.intp)
            self.padded = bool(lengths.min() < T)
        chunks = max(1, min(n_threads, B))
        if chunks == 1:
            self.bounds = np.array([0, B], dtype=np.intp)
        elif lengths is None:   # equal lengths: equal row counts
            self.bounds = np.array([k * B // chunks for k in range(chunks + 1)], dtype=np.intp)
        else:                   # balance total length per chunk
            work = np.cumsum(self.lengths[self.order])
            cuts = np.searchsorted(work, work[-1] * np.arange(1, chunks) / chunks,
                                   side="left") + 1
            self.bounds = np.unique(np.concatenate(([0], np.clip(cuts, 1, B), [B]))
                                    ).astype(np.intp)

    def valid_rows(self, T):
        """(V,) intp flat indices t*B + b of the steps that exist (t < lengths[b]),
        ascending, or None when nothing is padded. Backward's dX and dW GEMMs
        run over these rows only."""
        if not self.padded:
            return None
        steps = np.arange(T, dtype=np.intp)[:, None] < self.lengths[None, :]   # (T, B)
        return np.flatnonzero(steps).astype(np.intp)

    def single_thread(self):
        """The same rows in one chunk."""
        one = Schedule.__new__(Schedule)
        one.lengths, one.order, one.padded, one.n_threads = (self.lengths, self.order,
                                                              self.padded, 1)
        one.bounds = np.array([0, len(self.order)], dtype=np.intp)
        return one


class Cache:
    """What backward needs from forward; single use. Fields are documented per cell."""

    def __init__(self, **fields):
        self.__dict__.update(fields)
        self.used = False

    def take(self):
        if self.used:
            raise RuntimeError("this cache was already used by a backward call; run forward "
                               "again (backward reuses the saved gates as gradient storage)")
        self.used = True
        return self


def _run_forward(args, sched, reverse, pack_ih, pack_hh, bf16=False, training=True,
                 ids_in=None, y_copy=None):
    """Run the driver's forward with the row split or, for small batches, the hidden-unit split.

    args: (cell, y, h_n, c_n, gates, aux, x, h0, c0, w_ih, w_hh, bias, bias_h, w_hr, hr).
    Both splits give bitwise the same numbers; this only picks the faster one.
    If OpenMP grants fewer threads than asked, run again on one thread.
    bf16: the GEMMs on bf16 operands (fastrnn._precision).
    training=False: the packed weights are kept for the next call with the same
    weights (src/pack_cache.h); a training step changes them, so it does not, except
    a single step (T=1): a cell stepped through a sequence reads the same weights at
    every step.
    ids_in: an _ids_input.IdsInput; when fused the driver reads its table by id, not x.
    y_copy: None, or a (T, B, H) array that receives a copy of y (_output_rows).
    """
    n = sched.n_threads
    table = {} if y_copy is None else {"y_copy": y_copy}
    if ids_in is not None and ids_in.fused:
        args = args[:6] + (None,) + args[7:]        # x
        table.update(x_table=ids_in.table, x_ids=ids_in.ids)
    T = args[1].shape[0]   # y (T, B, H)
    B = len(sched.order)
    hh_itemsize = product_itemsize(args[10], bf16)
    gated_eval = not training and args[0] in (CELL_LSTM, CELL_GRU, CELL_GRU_RESET_BEFORE)
    by_units = (n > 1 and splits_units(T, B, pack_hh,
                                       bf16 and not training and _recurrent._amx_bf16(),
                                       args[10].size * hh_itemsize, gated_eval,
                                       frozen_eval(training, args[9], args[10]))
                and (training or n > rows_upto(B, args[10].size, hh_itemsize, gated_eval))
                and args[13] is None)   # a projection needs all of h_t: rows only
    if not _recurrent.forward(*args, sched.lengths, sched.order, sched.bounds, bool(reverse),
                              pack_ih, pack_hh, n, by_units, bf16=bf16,
                              cache_weights=not training,
                              keep_packs=training and keeps_step_packs(T, args[9], args[10]),
                              **table):
        one = sched.single_thread()
        _recurrent.forward(*args, one.lengths, one.order, one.bounds, bool(reverse), pack_ih,
                           pack_hh, 1, False, bf16=bf16, cache_weights=not training,
                           keep_packs=training and keeps_step_packs(T, args[9], args[10]),
                           **table)


# A training call keeps its packed weights only for a single step (a cell's steps
# through a sequence read the same weights), and only weights this small: the pack
# cache holds 256 MB, and a model whose steps' packings do not fit beside each other
# would evict, at every call, the copy the next call needs (a review: two
# LSTMCell(2048, 2048), 64 MB a weight), hashing and packing into fresh pages each
# time instead of packing into warm scratch.
STEP_PACKS_MAX_BYTES = 32 << 20


def product_itemsize(w, bf16):
    """Bytes a value of weight w takes as the products read it: 2 on bf16 operands."""
    return 2 if bf16 else w.itemsize


def keeps_step_packs(T, w_ih, w_hh):
    """Does a training call of T steps keep its packings (src/_recurrent.pyx keep_packs)?"""
    return T == 1 and w_ih.nbytes + w_hh.nbytes <= STEP_PACKS_MAX_BYTES


def backward_splits_units(T, B, hh_bytes):
    """Would backward's reverse loop split hidden units (each thread its panels of
    W_hh^T, one barrier per step) rather than rows? Batches up to
    BACKWARD_UNITS_MAX_BATCH always; up to BACKWARD_UNITS_L2_MAX_BATCH when W_hh
    (hh_bytes as the products read it) overflows a core's L2 (fills_l2) and the
    sequence has UNITS_MIN_STEPS steps (as the forward's unit split; measured only
    at T=25-50, and single steps keep their in-place rows): with rows, each thread
    streams all of W_hh^T from L3 every step for its few rows. 2-core Xeon
    KVM guest (AVX-512, 2 MB L2 a core), float32 training, backward alone, medians
    of 12-15 interleaved calls, rows -> units, ms (session 39; bitwise the same):
    LSTM (I, H, T) = (128, 1024, 30) B=20 36.7 -> 33.9, (1024, 1024, 25) B=16 46.0
    -> 43.6, B=24 even, B=32 79.0 -> 74.9, B=48 even; LSTM (512, 512, 50) B=16 19.5
    -> 18.6, B=24 and 32 even or +2 %, B=48 even; GRU (128, 1024, 30) B=20 27.2 ->
    26.0, (1024, 1024, 25) B=16 34.7 -> 33.1, B=24 even; GRU (512, 512, 50) B=16
    15.6 -> 15.1, B=24 21.8 -> 22.4 (lost), B=32 31.4 -> 31.9 (lost); RNN (128, 1024,
    30) B=20 8.11 -> 7.71, (1024, 1024, 25) B=16 10.1 -> 9.65. Where W_hh fits
    (LSTM (256, 256, 100), 1 MB) B=16 lost: 9.0 -> 10.3. Not measured on Zen 4 (1
    MB L2) or Zen 3."""
    if B <= BACKWARD_UNITS_MAX_BATCH:
        return True
    return B <= BACKWARD_UNITS_L2_MAX_BATCH and T >= UNITS_MIN_STEPS and fills_l2(hh_bytes)


def _run_backward(sched, T, reverse, bf16, accumulate, *args, dtable=None, ids_in=None,
                  db_x=None, db_h=None, weights=True):
    """Run the driver's backward; the reverse loop splits hidden units for small
    batches (every thread reads only its panels of W_hh^T, and a batch of 1
    uses every thread), row chunks otherwise. Both give bitwise the same
    numbers. args: the driver's arguments up to the schedule's; bf16 as forward ran.
    If OpenMP grants fewer threads than asked, the row split runs instead.
    ids_in, fused (forward read a table by id): x, dx and dw_ih are not used, and
    dtable (V, G*H) receives the gradient of the table's rows.
    db_x, db_h (G*H,) or None: receive the biases' gradients (_bias_gradients).
    weights False: dx, dh0 (dc0) only; the gate gradients stay in their arrays for
    _recurrent.weight_gradients later (GateGradients).
    """
    n = sched.n_threads
    hh_bytes = args[21].size * product_itemsize(args[21], bf16)
    by_units = (n > 1 and backward_splits_units(T, len(sched.order), hh_bytes)
                and args[6] is None)   # dw_hr: a projection's backward splits rows
    tail = (sched.lengths, sched.order, sched.bounds, sched.valid_rows(T), bool(reverse), n)
    table = {} if db_x is None else dict(db_x=db_x, db_h=db_h)
    if not weights:
        table["weights"] = False
    if ids_in is not None and ids_in.fused:
        args = list(args)
        args[4] = args[18] = None                    # dw_ih, x
        args[1] = np.empty((0, 0, 0), dtable.dtype)  # dx (typed: the kernel's dtype comes from it)
        table = dict(x_ids=ids_in.ids, dx_table=dtable)
    if not _recurrent.backward(*args, *tail, by_units, bf16=bf16, accumulate=accumulate,
                               **table):
        _recurrent.backward(*args, *tail, False, bf16=bf16, accumulate=accumulate, **table)


def _bias_gradients(cache, GH, apart=False):
    """(db_x, db_h) arrays for the driver to fill with the column sums of
    dL/d(x W_ih^T) (and, apart: the GRU's dL/d(h W_hh^T)) on its dW pass, or
    (None, None) when it cannot: no bias, or forward read a table by id. A NumPy
    sum of those (T*B, G*H) arrays afterwards was one thread reading them
    again: 4.8 % of a GRU (256, 256, 100, 64) training step on the 2-core Xeon."""
    ids_in = getattr(cache, "ids_in", None)
    if not cache.has_bias or (ids_in is not None and ids_in.fused):
        return None, None
    dtype = cache.x.dtype
    return np.empty(GH, dtype), (np.empty(GH, dtype) if apart else None)


def _shared_bias_gradients(cache, db_ih, da):
    """(db_ih, db_hh) of a cell whose biases both sit outside its products (RNN, LSTM,
    the reset-before GRU), so db_hh = db_ih: the driver's sums (_bias_gradients), or,
    where it took none (x read by id, fused), da's (T, B, G*H) column sums. (None,
    None) without biases."""
    if not cache.has_bias:
        return None, None
    if db_ih is None:
        db_ih = da.reshape(-1, da.shape[-1]).sum(axis=0)
    return db_ih, db_ih.copy()


def _hidden_buffer(x, H, h0, sched, reverse, training):
    """hs (T+1, B, H): h0 in slot 0 (slot T if reverse); y is the other T slots.
    On kept memory (_buffers) in training, where it is the cache."""
    T, B, _ = x.shape
    if training:
        hs = (_buffers.zeros if sched.padded else _buffers.empty)((T + 1, B, H), x.dtype)
    else:
        hs = (np.zeros if sched.padded else np.empty)((T + 1, B, H), dtype=x.dtype)
    slot = T if reverse else 0
    if h0 is None:
        hs[slot] = 0
    else:
        hs[slot] = h0
    y = hs[:T] if reverse else hs[1:]
    return hs, y


def _output_rows(x, H, h0, sched, reverse, training, out, inputs, ids_in=None):
    """(hs, y, y_copy): where the kernel writes h_t. Training: hs (T+1, B, H), h0's
    slot and y, kept in the cache, and y_copy = `out` (or None), which the kernel
    fills with a copy of y as the steps run. Inference: hs None, y = `out` when
    given, y_copy None. `out` is checked against `inputs`, the arrays the kernel
    reads (with x given by id, ids_in: the whole table x and its x W_ih^T, not the
    view standing for x[x_ids]), and zeroed first when sequences are padded (the
    kernel leaves the steps past their ends alone)."""
    if out is None:
        return _hidden_buffer(x, H, h0, sched, reverse, training) + (None,)
    T, B, _ = x.shape
    if ids_in is not None:
        inputs = tuple(inputs) + tuple(a for a in (ids_in.x, ids_in.table) if a is not None)
    check_rows_out("out", out, (T, B, H), x.dtype, inputs)
    if sched.padded:
        out[...] = 0
    if training:
        return _hidden_buffer(x, H, h0, sched, reverse, training) + (out,)
    return None, out, None


def _h_prev(cache):
    """(T, B, H) view of the state each step read (forward: hs[:T], reverse: hs[1:])."""
    T = cache.x.shape[0]
    return cache.hs[1:] if cache.reverse else cache.hs[:T]


def _fix_reverse_first_step(dw_hh, dgates_h, cache):
    """Reverse + padding: a short sequence's first step read h0, not hs[len] (zero padding).

    dw_hh += da[len_b - 1, b]^T h0[b] for every row b shorter than T.
    """
    if not (cache.reverse and cache.sched.padded and cache.h0 is not None):
        return
    lens = cache.sched.lengths
    rows = np.nonzero(lens < cache.x.shape[0])[0]
    da, h0 = dgates_h[lens[rows] - 1, rows].T, cache.h0[rows]
    if cache.bf16:   # as the kernels' other products: bf16 operands
        from fastrnn.reference import _mm
        dw_hh += _mm(da, h0, True)
    else:
        dw_hh += da @ h0


def _common_forward(x, h0, w_ih, w_hh, b_ih, b_hh, gates, lengths, x_ids=None, training=True):
    """Validated arguments, H, the schedule and packing flags, and ids_in (None, or
    the _ids_input.IdsInput of an x given as a table with x_ids; x is then what
    stands for x[x_ids])."""
    x = as_float_array("x", x, 3 if x_ids is None else 2)
    w_ih, w_hh, b_ih, b_hh, H = check_weights(w_ih, w_hh, b_ih, b_hh, gates, x.dtype)
    ids_in = None
    if x_ids is not None:
        flop = 2 * x.size * w_ih.shape[0]
        x, ids_in = _ids_input.prepare(x, x_ids, w_ih, _precision.bf16_products(x.dtype),
                                       call_threads() if flop >= SMALL_WORK_FLOP else 1)
    check_input(x, w_ih)
    T, B, _ = x.shape
    h0 = optional_state("h0", h0, (B, H), x.dtype)
    lens = as_lengths(lengths, B, T)
    flop = 2 * T * B * w_hh.shape[0] * (x.shape[2] + H)
    frozen = frozen_eval(training, w_ih, w_hh)
    pack_ih, pack_hh = pack_flags(T, B, frozen)
    sched = Schedule(lens, B, T, call_threads() if use_team(flop, T, B, pack_hh, frozen) else 1)
    return x, h0, w_ih, w_hh, b_ih, b_hh, H, sched, pack_ih, pack_hh, ids_in


def frozen_eval(training, w_ih, w_hh):
    """Is this an inference call on frozen weights small enough to keep packed
    (pack_flags' frozen_eval)?"""
    return (not training and both_frozen(w_ih, w_hh)
            and w_ih.nbytes + w_hh.nbytes <= FROZEN_PACK_MAX_BYTES)


def fills_l2(hh_bytes, gated_eval=False):
    """Does W_hh (hh_bytes as the products read them) crowd a core's L2, so that each
    thread's slice of it (the hidden-unit split) beats every thread reading all of it
    (the row split)? All cells when it overflows the L2; at inference, an LSTM's or
    GRU's once it fills 5/8 of it. 2-core Xeon KVM guest (AVX-512, 2 MB L2 a core),
    eval, I=H, T=100, medians of 5 x 3 calls, rows -> units, ms (session 32, one
    process each way, two rounds): LSTM float32 H=288 (1.27 MB) B=8 3.60 -> 3.19,
    H=320 (1.56 MB) B=8 4.74 -> 3.86, B=32 18.04 -> 14.41, H=352 B=8 6.54 -> 4.60;
    GRU float32 H=400 (1.83 MB) B=8 5.94 -> 4.42; float64 H=256 (LSTM 2 MB, GRU 1.5
    MB) B=8 6.88 -> 5.20 and 4.62 -> 3.91, GRU B=32 15.67 -> 14.58. Three
    alternating process pairs of the builds before and after: LSTM H=320 B=8
    4.20-4.52 -> 3.80-3.83, B=32 16.03-18.37 -> 14.28-15.12, GRU H=400 B=8 4.99-5.59
    -> 4.37-4.79. Mixed at 1.0-1.17 MB (LSTM H=256 and 272, GRU H=320 float32:
    0.89-1.01x), so 5/8. The Elman RNN's product is a third or a quarter as wide and
    did not gain: float32 H=640 (1.56 MB) B=8 3.90 -> 3.98, B=32 14.05 -> 14.76
    (float64 H=512, 2 MB, B=8 gained, 6.31 -> 5.45; left as it was). Not measured
    on Zen 4 (1 MB L2) or Zen 3."""
    l2 = _cpu_cache.l2_bytes()
    if l2 <= 0 or hh_bytes <= 0:
        return False
    return hh_bytes > l2 or (gated_eval and 8 * hh_bytes >= 5 * l2)


def splits_units(T, B, pack_hh, bf16_eval=False, hh_bytes=0, gated_eval=False,
                 frozen_eval=False):
    """Would a team split hidden units (one barrier per step) rather than rows?
    Small batches do. Unpacked weights are read in place by each thread's gate
    blocks (no copy), so that split runs at any T; packed slices are built per
    call and need UNITS_MIN_STEPS steps to repay the copy, except for frozen
    weights at inference (frozen_eval, pack_flags), whose slices are kept: up to
    FROZEN_UNITS_MAX_BATCH rows those split units at any T (with rows each thread
    reads all of W_hh every step for its few rows). The figures in pack_flags are of
    this split; frozen, T=10, 2-core Zen 4 (AVX-512), medians of three process pairs,
    rows -> units, ms: LSTM I=H=512 B=4 0.93-0.97 -> 0.81-0.85, GRU 0.69-0.77 ->
    0.61-0.63, LSTM B=6 1.29-1.35 -> 1.18-1.29, LSTM I=H=1024 B=4 5.1-5.8 -> 3.8-4.3,
    LSTM I=H=256 B=4 0.26-0.29 -> 0.23-0.25; B=12 to 24 (and T=5 B=16) ran alike.

    hh_bytes (W_hh's bytes as the products read them; 0: not given): when all of
    W_hh overflows a core's L2 (_cpu_cache), batches up to UNITS_L2_MAX_BATCH. With
    rows each thread streams all of W_hh from L3 every step for its few rows; with
    units only its slice, from its own L2 where the slice fits. 2-core Xeon KVM guest
    (AVX-512, 2 MB L2 a core), one layer, medians of 40 eval calls (frozen), two
    runs, rows -> units, ms: LSTM I=H=512 T=50 B=32 26.6-27.4 -> 23.4-23.8, GRU
    20.7-20.9 -> 17.5-17.8; B=40 LSTM 33.6 -> 30.2, GRU 23.4 -> 22.1; B=48 LSTM
    36.9 -> 35.6, GRU 27.7 -> 26.8; B=64 even (48.1 -> 47.7, 35.6 -> 36.2) and B=128
    lost (91.1 -> 92.9); LSTM I=H=768 B=32 63.9 -> 51.4, GRU 48.2 -> 39.4; LSTM
    I=H=1024 T=25 B=32 51.4 -> 46.5 (8 MB halves: still fewer bytes a step);
    training steps (forward + backward) LSTM I=H=512 B=32 84.6-85.9 -> 81.8-82.1,
    GRU 64.0-65.1 -> 62.0-62.2. Where W_hh fits (LSTM I=H=256, 1 MB; RNN I=H=512)
    B=32 read the same either way, so the rule leaves it. Not measured on Zen 4
    (1 MB L2) or Zen 3.

    bf16_eval (inference with bf16 products on AMX tiles, always packed): up to
    BF16_UNITS_MAX_BATCH. On AMX tiles the product is so fast that each thread
    streaming all of W_hh every step, as rows do, is what costs. 2-core Xeon KVM
    guest (AMX-BF16), LSTM I=64 H=704 T=64, medians of 10 calls in two runs, rows
    -> units, ms: B=32 13.1 -> 8.9-9.1, B=48 16.7-16.8 -> 12.6-12.9, B=64
    18.1-18.3 -> 16.3-16.7. Training keeps UNITS_MAX_BATCH: there B=32 and 48 were
    even and B=64 lost (71.8-72.8 -> 77.3-78.0 ms a step). Not for the vdpbf16ps
    kernels (AMD Zen 4), where it was not measured.

    gated_eval (an LSTM or GRU at inference): the same from 5/8 of the L2 on
    (fills_l2). Beyond 48 rows it made no steady difference (session 32, Xeon, four
    alternating process pairs, rows -> units, ms: LSTM float32 I=H=512 T=50 B=64
    35.1-36.2 -> 35.0-39.1; float64 I=H=256 T=100 B=64 LSTM 38.7-39.2 -> 37.9-39.4,
    GRU 28.4-28.8 -> 28.3-29.1)."""
    most = BF16_UNITS_MAX_BATCH if bf16_eval else UNITS_MAX_BATCH
    if fills_l2(hh_bytes, gated_eval):
        most = max(most, UNITS_L2_MAX_BATCH)
    return B <= most and (T >= UNITS_MIN_STEPS or not pack_hh
                          or (frozen_eval and B <= FROZEN_UNITS_MAX_BATCH))


def rows_upto(B, hh_size, itemsize, gated=False):
    """The most threads whose team splits B rows, at inference, even where
    splits_units allows hidden units: every thread gets ROWS_MIN_PER_THREAD rows,
    W_hh (hh_size values of itemsize bytes) has at most ROWS_MAX_WEIGHTS
    values, and splitting the hidden units would not keep each thread's slice of
    W_hh in its own L2 while all of W_hh does not fit there (_cpu_cache). Each
    thread of a row split reads all of W_hh every step, from the shared L3, with
    no barrier after each step.

    Training keeps the unit split as before: at B=8 its backward splits hidden
    units too (BACKWARD_UNITS_MAX_BATCH), and rows in the forward made the LSTM
    I=H=512 T=50 B=8 training step slower (Zen 4, five alternating process pairs:
    units 29.75-29.82 ms, rows 30.09-30.22); B=9-24 in training was not measured.
    Eval, 2-core Zen 4 EPYC (AVX-512, 1 MB L2), medians of 4 interleaved rounds,
    units -> rows, ms: I=H=512 T=50 B=8 LSTM 8.30 -> 7.89, GRU 6.62 -> 6.00, RNN
    2.01 -> 1.92; LSTM I=H=256 T=100 B=8 4.08 -> 4.01; LSTM I=H=512 B=12 11.94 ->
    11.88. Larger W_hh lose: LSTM I=H=1024 T=25 B=8 17.3 -> 19.8, GRU 12.4 -> 13.1
    (LSTM H=768, 9.4 MB: even); and fewer rows a thread lose (LSTM H=512 B=6:
    6.21 -> 6.64). float64 LSTM I=H=512 B=8 (8 MB of W_hh) gains too: 17.1-17.2
    -> 16.1-16.3. On a 2-core Xeon with AVX-512 and 2 MB of L2 per core (KVM
    guest, family 6 model 167; medians of 30 calls, T=50, rows -> units, ms), where
    the 2 MB halves of a 4 MB W_hh fit: LSTM I=H=512 B=8 9.81 -> 6.13, B=12 10.49
    -> 8.34, B=16 12.84 -> 11.09; GRU (3 MB) B=8 6.86 -> 4.22; RNN (1 MB, all of
    it fits) B=8 1.40 -> 1.51, so rows stay there.

    gated (an LSTM or GRU): the slices win once W_hh fills 5/8 of the L2 (fills_l2)."""
    if hh_size > ROWS_MAX_WEIGHTS:
        return 0
    most = B // ROWS_MIN_PER_THREAD
    hh_bytes, l2 = hh_size * itemsize, _cpu_cache.l2_bytes()
    if fills_l2(hh_bytes, gated):
        # n threads' slices fit from n >= hh_bytes / l2 on: rows only below that
        most = min(most, -(-hh_bytes // l2) - 1)
    return most


def use_team(flop, T, B, pack_hh, frozen_eval=False):
    """Is a layer call of `flop` FLOP over T steps of B rows worth a thread team?
    Not below SMALL_WORK_FLOP (waking the team costs more than the work), nor when it
    would split hidden units with under UNITS_STEP_MIN_FLOP per step (the barrier after
    every step costs more than the step's share of the work). frozen_eval: as for
    pack_flags."""
    if flop < SMALL_WORK_FLOP:
        return False
    # (no hh_bytes: the batches it adds to the unit split, 25-48 rows over a W_hh larger
    # than L2, do far more than UNITS_STEP_MIN_FLOP a step)
    return not (splits_units(T, B, pack_hh, frozen_eval=frozen_eval)
                and flop < UNITS_STEP_MIN_FLOP * T)


# The reset-before GRU's eval calls run on an OpenMP team, not the eval pool (its step's
# second barrier has no stop for a pool team), whose start and two barriers a step cost
# more: a team only from these FLOP a step (2*B*3H*(I+H)). 2-core Xeon KVM guest
# (AVX-512), GRU(H, H, reset_after=False) eval, medians, one thread -> two (session 41):
# GRUCell B=1 step H=192 10.6 -> 35.7 us, H=256 21.6 -> 39.3, H=320 54.5 -> 46.3, H=384
# 113 -> 95; layer T=50 B=1 H=128 128 -> 160 us, H=192 318 -> 299, H=256 580 -> 441.
RESET_BEFORE_TEAM_STEP_FLOP = 4e5
RESET_BEFORE_TEAM_SINGLE_STEP_FLOP = 1e6


def reset_before_eval_team(flop, T):
    """May a reset-before GRU eval call of `flop` FLOP over T steps have a thread team
    (besides use_team)?"""
    return flop >= T * (RESET_BEFORE_TEAM_SINGLE_STEP_FLOP if T == 1
                        else RESET_BEFORE_TEAM_STEP_FLOP)


def pack_flags(T, B, frozen_eval=False):
    """(pack_ih, pack_hh): read W_ih / W_hh as packed panels (else in place).

    Decided from the shapes, never from the thread count (the packed and the
    dot-product kernels round differently, and 1 and 2 threads give the same bits),
    and from the mode only for frozen weights at inference (frozen_eval: an eval call
    whose W_ih and W_hh are both frozen, `Module.freeze()`, and together at most
    FROZEN_PACK_MAX_BYTES): their packings come from the cache without reading the
    weights, so every call reads both packed, single steps too; where the rules below
    read in place, those calls round as the packed kernels do, not as the same call
    unfrozen or in training (the two agree to float rounding: tests/test_freeze.py).
    Frozen, short sequences at small batch ran like this, 2-core AMD EPYC Zen 4
    (AVX-512), eval, one layer timed back to back for 1.5 s per process, medians of
    two processes each, in place -> packed (with splits_units' hidden-unit split),
    ms: LSTM I=H=512 T=10 B=3
    0.82-0.85 -> 0.65-0.68, T=15 B=2 0.89-0.91 -> 0.70-0.73, T=10 B=1 0.42-0.54 ->
    0.33-0.35, T=4 B=2 0.24-0.25 -> 0.19, T=3 B=1 0.13-0.14 -> 0.12-0.14, I=H=1024 T=10
    B=1 2.3-3.0 -> 1.5-1.7, I=H=256 T=10 B=3 0.25-0.27 -> 0.18; GRU I=H=512 T=10 B=3
    0.61-0.62 -> 0.50-0.51; RNN 0.21 -> 0.17. In training (packing every call) the same
    change was mixed, LSTM I=H=1024 T=10 B=1 10.2 -> 12.9 ms a step, and unfrozen eval
    calls pay a read of the weights to find their packing, LSTM I=H=1024 T=4 B=1
    1.20-1.34 -> 1.76-1.79 ms: those keep the rules below. Frozen single steps (a
    cell's eval calls, T=1), medians of 1.5 s of back-to-back calls, three process
    pairs, in place -> packed, us: LSTMCell(512, 512) B=1 59-65 -> 53-59, B=4 147-178
    -> 83-93, B=8 263-351 -> 157-174, LSTMCell(1024, 1024) B=1 436-719 -> 305-475,
    GRUCell(1024, 1024) 212-350 -> 159-261, RNNCell(1024, 1024) 64-77 -> 51-61,
    LSTMCell(64, 64) 4.4-4.5 -> 3.4-3.5.

    Otherwise batches below PACK_MIN_BATCH pack W_hh only
    for sequences long enough to repay the copy (measured on the 2-core AVX-512
    Xeon: LSTM H=512 batch 2, T=50, 6.25 -> 4.93 ms packed). Short small-batch
    calls read W_ih in place too: packing it would cost more than the few rows it
    serves.

    Single steps (a cell stepped through time) of batches up to
    STEP_IN_PLACE_MAX_BATCH read both in place as well. In training every call
    packed all of W_ih and W_hh afresh for its few rows (the weights change between
    optimiser steps; training keeps a packing only since session 38, for single
    steps: keeps_step_packs), and even in eval, where the
    packing is kept, reading in place was faster there. 2-core Xeon, AVX-512,
    forwards of 20 (10) steps of a cell in a Python loop, two runs each, packed ->
    in place, ms: training LSTMCell(300, 1000) B=8 45.1-46.3 -> 20.9-22.4 (with the
    20 backward steps 115.9-120.0 -> 94.9-98.0; torch 2.13's loop 77-81, a
    helper's scan), B=4 34.6-35.1 -> 14.0-15.5, GRUCell(300, 1000) B=8 32.5-33.3
    -> 15.8-17.3, LSTMCell(300, 513) B=8 14.7-14.8 -> 8.1-9.2; eval LSTMCell(300,
    1000) B=8 21.8-22.0 -> 18.7-19.5, GRUCell(300, 1000) B=8 16.7-17.1 -> 13.9-14.8,
    LSTMCell(300, 256) B=4 2.3-2.4 -> 1.2-1.3, RNNCell(300, 1000) B=8 6.0-6.3 ->
    4.6-5.1. From B=16 packing wins again (eval LSTMCell(300, 1000) B=16 10.8-10.9
    -> 17.2-18.6 in place), and so it does for a few steps at B=8 (eval LSTM(300,
    512) T=3 B=8 0.66-0.68 -> 0.77-0.85).

    Until session 36 W_hh over 2^20 values was read in place at those batches too
    (a session-26 measurement: LSTM H=1024 B=1 T=100 45.5 ms in place, 49.9
    packed). Measured again once the unit split's threads shared one block
    schedule (session 36, the same Xeon, two alternating runs each, in place ->
    packed, ms): eval LSTM I=H=513 B=1 T=100 5.2-5.4 -> 3.4-3.5, B=3 9.9 ->
    6.4-7.1, T=200 11.8-12.6 -> 7.9-8.0; LSTM I=H=1000 B=1 33.9-34.4 -> 28.9-29.0,
    B=3 42.2-43.3 -> 35.9-36.8; LSTM I=H=1024 B=1 34.8-35.3 -> 30.3-31.4, T=32
    11.8-12.4 -> 10.8-11.3, B=2 39.3-39.8 -> 35.0-36.7; GRU I=1024 H=1000 B=1
    26.0-26.5 -> 20.5-21.2, GRU I=H=768 B=1 T=32 4.7-4.8 -> 3.4; RNN I=H=1500 B=1
    19.0-19.5 -> 16.6; training steps (forward and backward, packing every call)
    LSTM I=H=1024 B=1 T=32 33.5-33.6 -> 30.8-32.9, B=2 T=100 94.9-96.1 ->
    92.0-93.4, GRU I=H=768 T=32 14.0-14.7 -> 13.3-13.5, LSTM I=H=513 T=200
    27.7-28.5 -> 24.2-25.2, RNN I=H=1500 43.3-44.6 -> 40.8-41.9.
    """
    if frozen_eval:
        return True, True
    pack_hh = T * B >= PACK_SMALL_MIN_ROWS or (
        B >= PACK_MIN_BATCH and (T > 1 or B > STEP_IN_PLACE_MAX_BATCH))
    return T * B >= PACK_MIN_ROWS and (pack_hh or T >= UNITS_MIN_STEPS), pack_hh


def _check_cache_kind(cache, kind):
    """A cache from `kind`_forward (training=True), else a ValueError saying which."""
    if cache is None:
        raise ValueError("cache is None: run forward with training=True before backward")
    got = getattr(cache, "kind", None)
    if got != kind:
        raise ValueError(f"cache comes from {got}_forward, not {kind}_forward: use "
                         f"{got}_backward" if got else
                         f"cache: expected the cache of {kind}_forward, got "
                         f"{type(cache).__name__}")


def _backward_setup(dy, dh_n, cache, kind):
    """Validate dy and dh_n against the cache; returns dy, dh_n, T, B, I, H, dtype.
    dy is read in place when its (t, b) rows are evenly spaced (a column block of a
    wider array: a bidirectional layer's half), else copied to C order."""
    _check_cache_kind(cache, kind)
    T, B, I = cache.x.shape
    H = cache.w_hh.shape[1]
    dtype = cache.x.dtype
    dy = as_rows_array("dy", dy, 3, dtype)
    check_shape("dy", dy, (T, B, H))
    dh_n = optional_state("dh_n", dh_n, (B, H), dtype)
    return dy, dh_n, T, B, I, H, dtype


def _weight_gradient_out(out, cache):
    """The arrays a backward writes its weight gradients into: `out` checked, or
    fresh ones. out: None or a tuple of arrays shaped like (w_ih, w_hh[, w_hr])."""
    weights = [cache.w_ih, cache.w_hh] + ([cache.w_hr] if getattr(cache, "w_hr", None)
                                           is not None else [])
    if out is None:
        return [np.empty_like(w) for w in weights]
    names = ["dw_ih", "dw_hh", "dw_hr"][:len(weights)]
    if not isinstance(out, (tuple, list)) or len(out) != len(weights):
        raise ValueError(f"out: expected a tuple of {len(weights)} arrays ({', '.join(names)}), "
                         f"got {type(out).__name__}"
                         + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    inputs = weights + [cache.x]
    for name, a, w in zip(names, out, weights):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"out ({name}): expected a NumPy array, got {type(a).__name__}")
        if a.dtype != w.dtype or a.shape != w.shape:
            raise ValueError(f"out ({name}): expected a {w.dtype} array of shape {w.shape}, "
                             f"got {a.dtype} {a.shape}")
        if not a.flags.c_contiguous or not a.flags.writeable:
            raise ValueError(f"out ({name}): expected a C-contiguous, writeable array")
        if any(np.may_share_memory(a, b) for b in inputs):
            raise ValueError(f"out ({name}): overlaps the weights or the input; the kernel "
                             "reads those while it writes the gradients")
    if any(np.may_share_memory(a, b) for i, a in enumerate(out) for b in out[i + 1:]):
        raise ValueError("out: the weight gradients must be separate arrays")
    return list(out)


def _gradient_buffers(cache, out=None):
    """Consume the cache; fresh dx (T,B,I), dh0 (B,H), and the weight gradient
    arrays (_weight_gradient_out: `out`, or fresh dw_ih, dw_hh[, dw_hr]).

    dx starts at zero when sequences are padded: the kernels write only the
    rows of steps that exist. `out` is checked before the cache is consumed.
    """
    dws = _weight_gradient_out(out, cache)
    cache = cache.take()
    T, B, I = cache.x.shape
    H = cache.w_hh.shape[1]
    dtype = cache.x.dtype
    ids_in = getattr(cache, "ids_in", None)
    if ids_in is not None and ids_in.fused:
        dx = np.empty(ids_in.table.shape, dtype)    # the driver's dL/d(table) (V, G*H)
    else:
        dx = (_buffers.zeros if cache.sched.padded else _buffers.empty)((T, B, I), dtype)
    return (cache, dx, np.empty((B, H), dtype), *dws)


def _input_gradient(cache, dx, dw_ih, accumulate):
    """dx as a backward returns it: with x given as a table and ids, dL/dx (V, I)
    from the driver's dx rows or, fused, dL/d(table) (also filling dw_ih)."""
    ids_in = cache.ids_in
    if ids_in is None:
        return dx
    flop = 4 * ids_in.x.size * cache.w_ih.shape[0]
    return _ids_input.gradient(ids_in, dx, cache.w_ih, dw_ih, accumulate,
                               call_threads() if flop >= SMALL_WORK_FLOP else 1)


class GateGradients:
    """The terms of a step's weight gradients that a cell's backward leaves for later
    (deferred_backward): dgx (V, G*H) dL/d(x W_ih^T), dgh (V, G*H) dL/d(h W_hh^T) or
    None (the same as dgx: RNN, LSTM), x (V, I), h_prev (V, H); V = T*B rows.
        dW_ih = dgx^T x,  dW_hh = dgh^T h_prev,  db_ih = sum of dgx's rows,
        db_hh = sum of dgh's rows
    (_recurrent.weight_gradients over the rows of many steps at once)."""

    __slots__ = ("dgx", "dgh", "x", "h_prev")

    def __init__(self, dgx, dgh, x, h_prev):
        self.dgx, self.dgh, self.x, self.h_prev = dgx, dgh, x, h_prev


def defers_weights(cache):
    """Can deferred_backward take this cache: a kernel's (not the reference's) cache of
    a forward call in full precision, every row of every step present, no table by id?"""
    return (getattr(cache, "reference", None) is None and not cache.reverse
            and not getattr(cache, "reset_before", False)
            and not cache.bf16 and not cache.sched.padded and cache.ids_in is None
            and getattr(cache, "w_hr", None) is None)


def deferred_backward(name, dy, dh_n, dc_n, cache):
    """The backward of an "rnn", "lstm" or "gru" cache without its weight and bias
    gradients -> (dx, dh0, dc0 (LSTM; else None), GateGradients), for a cell stepped
    through time: summing all its steps' weight gradients in one GEMM afterwards
    reads and writes each .grad once per sequence instead of once per step (LSTMCell(300, 1000) at B=8 adds a 20 MB
    gradient per step). The caller checked defers_weights(cache). x is copied (it is
    the caller's array, which may be reused before the sum is taken)."""
    dy, dh_n, T, B, I, H, dtype = _backward_setup(dy, dh_n, cache, name)
    if name == "lstm":
        dc_n = optional_state("dc_n", dc_n, (B, H), dtype)
    cache = cache.take()
    dx = _buffers.empty((T, B, I), dtype)
    dh0 = np.empty((B, H), dtype)
    dc0 = np.empty((B, H), dtype) if name == "lstm" else None
    G = 4 if name == "lstm" else 3 if name == "gru" else 1
    dgx = _buffers.empty((T, B, H), dtype) if name == "rnn" else cache.gates   # (T, B, G*H)
    dgh = _buffers.empty((T, B, 3 * H), dtype) if name == "gru" else None
    aux = cache.cs if name == "lstm" else cache.hns if name == "gru" else None
    cell = cache.act if name == "rnn" else CELL_LSTM if name == "lstm" else CELL_GRU
    _run_backward(cache.sched, T, False, False, False, cell,
                  dx, dh0, dc0, None, None, None, dgx, dgh, None, dy, dh_n, dc_n, aux, None,
                  cache.y if name != "lstm" else cache.hs_y, cache.h0,
                  cache.c0 if name == "lstm" else None, cache.x, _h_prev(cache), cache.w_ih,
                  cache.w_hh, None, weights=False)
    terms = GateGradients(dgx.reshape(T * B, G * H),
                          None if dgh is None else dgh.reshape(T * B, G * H),
                          cache.x.reshape(T * B, I).copy(), _h_prev(cache).reshape(T * B, H))
    return dx, dh0, dc0, terms


# ---------------------------------------------------------------------------- LSTM
def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False,
                 training=True, out=None, x_ids=None):
    """LSTM layer forward. x (T,B,I), h0/c0 (B,H) or None, w_ih (4H,I), w_hh (4H,H).

    Returns y (T,B,H), h_n (B,H), c_n (B,H), cache (None unless training).
    Cache: gates (T,B,4H) activated i,f,g,o; cs (T,B,H) c_t; hs (T+1,B,H).
    """
    x, h0, w_ih, w_hh, b_ih, b_hh, H, sched, pack_ih, pack_hh, ids_in = _common_forward(
        x, h0, w_ih, w_hh, b_ih, b_hh, 4, lengths, x_ids, training)
    T, B, _ = x.shape
    c0 = optional_state("c0", c0, (B, H), x.dtype)
    hs, y, y_copy = _output_rows(x, H, h0, sched, reverse, training, out,
                         (x, h0, c0, w_ih, w_hh, b_ih, b_hh), ids_in)
    h_n = np.empty((B, H), x.dtype)
    c_n = np.empty((B, H), x.dtype)
    gates = _buffers.empty((T, B, 4 * H), x.dtype) if training else None
    cs = _buffers.empty((T, B, H), x.dtype) if training else None
    bias = b_ih + b_hh if b_ih is not None else None
    bf16 = _precision.bf16_products(x.dtype)
    _run_forward((CELL_LSTM, y, h_n, c_n, gates, cs, x, h0, c0, w_ih, w_hh, bias, None, None,
                  None), sched, reverse, pack_ih, pack_hh, bf16, training, ids_in, y_copy)
    cache = None
    if training:
        cache = Cache(kind="lstm", x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh,
                      has_bias=b_ih is not None,
                      sched=sched, reverse=bool(reverse), hs=hs, hs_y=y, gates=gates, cs=cs,
                      bf16=bf16, ids_in=ids_in)
    return y if y_copy is None else y_copy, h_n, c_n, cache


def lstm_backward(dy, dh_n, dc_n, cache, out=None, accumulate=False):
    """LSTM layer backward -> dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh (db None without bias).

    out: (dw_ih, dw_hh) arrays to write the weight gradients into (added into
    with accumulate=True); they are the ones returned.
    """
    dy, dh_n, T, B, I, H, dtype = _backward_setup(dy, dh_n, cache, "lstm")
    dc_n = optional_state("dc_n", dc_n, (B, H), dtype)
    cache, dx, dh0, dw_ih, dw_hh = _gradient_buffers(cache, out)
    dc0 = np.empty((B, H), dtype)
    sched = cache.sched
    db_ih, _ = _bias_gradients(cache, 4 * H)
    _run_backward(sched, T, cache.reverse, cache.bf16, bool(accumulate and out is not None),
                  CELL_LSTM, dx, dh0, dc0, dw_ih, dw_hh, None, cache.gates, None, None,
                  dy, dh_n, dc_n, cache.cs, None, cache.hs_y, cache.h0, cache.c0,
                  cache.x, _h_prev(cache), cache.w_ih, cache.w_hh, None,
                  dtable=dx, ids_in=cache.ids_in, db_x=db_ih)
    dx = _input_gradient(cache, dx, dw_ih, bool(accumulate and out is not None))
    da = cache.gates   # (T, B, 4H) now dL/da
    _fix_reverse_first_step(dw_hh, da, cache)
    db_ih, db_hh = _shared_bias_gradients(cache, db_ih, da)
    return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh


# ---------------------------------------------------------------------------- LSTM with projection
def lstmp_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths=None, reverse=False,
                  training=True, out=None):
    """LSTM with a projection (torch's proj_size P < H): h_t = (o * tanh(c_t)) W_hr^T.

    x (T,B,I), h0 (B,P) or None, c0 (B,H) or None, w_ih (4H,I), w_hh (4H,P),
    w_hr (P,H). Returns y (T,B,P), h_n (B,P), c_n (B,H), cache (None unless training).
    Cache: gates (T,B,4H), cs (T,B,H) c_t, hr (T,B,H) o*tanh(c_t), hs (T+1,B,P).
    """
    x = as_float_array("x", x, 3)
    w_hr = as_float_array("w_hr", w_hr, 2, x.dtype)
    w_ih, w_hh, b_ih, b_hh, H = check_weights(w_ih, w_hh, b_ih, b_hh, 4, x.dtype,
                                              proj=w_hr)
    check_input(x, w_ih)
    T, B, _ = x.shape
    P = w_hr.shape[0]
    h0 = optional_state("h0", h0, (B, P), x.dtype)
    c0 = optional_state("c0", c0, (B, H), x.dtype)
    lens = as_lengths(lengths, B, T)
    flop = 2 * T * B * 4 * H * (x.shape[2] + P) + 2 * T * B * P * H
    sched = Schedule(lens, B, T, 1 if flop < SMALL_WORK_FLOP else call_threads())
    pack_ih, pack_hh = pack_flags(T, B, frozen_eval(training, w_ih, w_hh))
    hs, y, y_copy = _output_rows(x, P, h0, sched, reverse, training, out,
                         (x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh))
    h_n = np.empty((B, P), x.dtype)
    c_n = np.empty((B, H), x.dtype)
    gates = _buffers.empty((T, B, 4 * H), x.dtype) if training else None
    cs = _buffers.empty((T, B, H), x.dtype) if training else None
    hr = _buffers.empty((T, B, H), x.dtype) if training else None
    bias = b_ih + b_hh if b_ih is not None else None
    _run_forward((CELL_LSTM, y, h_n, c_n, gates, cs, x, h0, c0, w_ih, w_hh, bias, None, w_hr,
                  hr), sched, reverse, pack_ih, pack_hh, False, training, y_copy=y_copy)
    cache = None
    if training:
        cache = Cache(kind="lstmp", x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, w_hr=w_hr,
                      has_bias=b_ih is not None, sched=sched, reverse=bool(reverse), hs=hs,
                      hs_y=y, gates=gates, cs=cs, hr=hr, bf16=False)
    return y if y_copy is None else y_copy, h_n, c_n, cache


def lstmp_backward(dy, dh_n, dc_n, cache, out=None, accumulate=False):
    """Projected LSTM backward -> dx, dh0 (B,P), dc0 (B,H), dw_ih, dw_hh, db_ih, db_hh, dw_hr.

    out: (dw_ih, dw_hh, dw_hr) arrays to write the weight gradients into (added
    into with accumulate=True); they are the ones returned.
    """
    _check_cache_kind(cache, "lstmp")
    T, B, I = cache.x.shape
    P, H = cache.w_hr.shape
    dtype = cache.x.dtype
    dy = as_rows_array("dy", dy, 3, dtype)   # read in place when rows are evenly spaced
    check_shape("dy", dy, (T, B, P))
    dh_n = optional_state("dh_n", dh_n, (B, P), dtype)
    dc_n = optional_state("dc_n", dc_n, (B, H), dtype)
    cache, dx, dh0, dw_ih, dw_hh, dw_hr = _gradient_buffers(cache, out)
    dc0 = np.empty((B, H), dtype)
    dhp = _buffers.empty((T, B, P), dtype)   # (T, B, P) dL/dh_t, for dW_hr
    sched = cache.sched
    db_ih, _ = _bias_gradients(cache, 4 * H)
    _run_backward(sched, T, cache.reverse, cache.bf16, bool(accumulate and out is not None),
                  CELL_LSTM, dx, dh0, dc0, dw_ih, dw_hh, dw_hr, cache.gates, None, dhp,
                  dy, dh_n, dc_n, cache.cs, cache.hr, cache.hs_y, cache.h0, cache.c0,
                  cache.x, _h_prev(cache), cache.w_ih, cache.w_hh, cache.w_hr, db_x=db_ih)
    da = cache.gates   # (T, B, 4H) now dL/da
    _fix_reverse_first_step(dw_hh, da, cache)
    db_hh = db_ih.copy() if db_ih is not None else None
    return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr


# ---------------------------------------------------------------------------- RNN
def rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh", lengths=None,
                reverse=False, training=True, out=None, x_ids=None):
    """Elman RNN layer forward. x (T,B,I), h0 (B,H) or None, w_ih (H,I), w_hh (H,H).

    Returns y (T,B,H), h_n (B,H), cache (None unless training).
    Cache: hs (T+1,B,H) (y is its view; act' is computed from y).
    """
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {sorted(NONLINEARITIES)}, "
                         f"got {nonlinearity!r}")
    x, h0, w_ih, w_hh, b_ih, b_hh, H, sched, pack_ih, pack_hh, ids_in = _common_forward(
        x, h0, w_ih, w_hh, b_ih, b_hh, 1, lengths, x_ids, training)
    T, B, _ = x.shape
    hs, y, y_copy = _output_rows(x, H, h0, sched, reverse, training, out,
                         (x, h0, w_ih, w_hh, b_ih, b_hh), ids_in)
    h_n = np.empty((B, H), x.dtype)
    bias = b_ih + b_hh if b_ih is not None else None
    act = NONLINEARITIES[nonlinearity]
    bf16 = _precision.bf16_products(x.dtype)
    _run_forward((act, y, h_n, None, None, None, x, h0, None, w_ih, w_hh, bias, None, None,
                  None), sched, reverse, pack_ih, pack_hh, bf16, training, ids_in, y_copy)
    cache = None
    if training:
        cache = Cache(kind="rnn", x=x, h0=h0, w_ih=w_ih, w_hh=w_hh, has_bias=b_ih is not None,
                      sched=sched, reverse=bool(reverse), hs=hs, y=y, act=act, bf16=bf16,
                      ids_in=ids_in)
    return y if y_copy is None else y_copy, h_n, cache


def rnn_backward(dy, dh_n, cache, out=None, accumulate=False):
    """RNN layer backward -> dx, dh0, dw_ih, dw_hh, db_ih, db_hh (db None without bias).

    out: (dw_ih, dw_hh) arrays to write the weight gradients into (added into
    with accumulate=True); they are the ones returned.
    """
    dy, dh_n, T, B, I, H, dtype = _backward_setup(dy, dh_n, cache, "rnn")
    cache, dx, dh0, dw_ih, dw_hh = _gradient_buffers(cache, out)
    da = _buffers.empty((T, B, H), dtype)   # (T, B, H) dL/da
    sched = cache.sched
    db_ih, _ = _bias_gradients(cache, H)
    _run_backward(sched, T, cache.reverse, cache.bf16, bool(accumulate and out is not None),
                  cache.act, dx, dh0, None, dw_ih, dw_hh, None, da, None, None, dy,
                  dh_n, None, None, None, cache.y, cache.h0, None, cache.x,
                  _h_prev(cache), cache.w_ih, cache.w_hh, None, dtable=dx, ids_in=cache.ids_in,
                  db_x=db_ih)
    dx = _input_gradient(cache, dx, dw_ih, bool(accumulate and out is not None))
    _fix_reverse_first_step(dw_hh, da, cache)
    db_ih, db_hh = _shared_bias_gradients(cache, db_ih, da)
    return dx, dh0, dw_ih, dw_hh, db_ih, db_hh


# ---------------------------------------------------------------------------- GRU
def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, training=True,
                out=None, x_ids=None, reset_after=True):
    """GRU layer forward. x (T,B,I), h0 (B,H) or None, w_ih (3H,I), w_hh (3H,H).

    Returns y (T,B,H), h_n (B,H), cache (None unless training).
    Cache: gates (T,B,3H) r,z,n; hns (T,B,H) W_hn h + b_hn; hs (T+1,B,H).

    reset_after=False: the seed's GRU, n = tanh(W_in x + b_in + W_hn (r*h) + b_hn)
    (fastrnn.reference.gru_forward has both forms), in the kernels (its cache: gates,
    rhs (T,B,H) r*h_{t-1}, hs); with bf16 products (matmul precision "medium") by the
    NumPy reference, whose cache gru_backward then takes (and then not with x_ids).
    """
    if not reset_after:
        return _gru_reset_before_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                                         training, out, x_ids)
    x, h0, w_ih, w_hh, b_ih, b_hh, H, sched, pack_ih, pack_hh, ids_in = _common_forward(
        x, h0, w_ih, w_hh, b_ih, b_hh, 3, lengths, x_ids, training)
    T, B, _ = x.shape
    hs, y, y_copy = _output_rows(x, H, h0, sched, reverse, training, out,
                         (x, h0, w_ih, w_hh, b_ih, b_hh), ids_in)
    h_n = np.empty((B, H), x.dtype)
    gates = _buffers.empty((T, B, 3 * H), x.dtype) if training else None
    hns = _buffers.empty((T, B, H), x.dtype) if training else None
    bias_x = bias_hn = None
    if b_ih is not None:
        # r and z see b_ih + b_hh; n sees b_in outside and b_hn inside the reset product
        bias_x = np.concatenate((b_ih[:2 * H] + b_hh[:2 * H], b_ih[2 * H:]))
        bias_hn = np.ascontiguousarray(b_hh[2 * H:])
    bf16 = _precision.bf16_products(x.dtype)
    _run_forward((CELL_GRU, y, h_n, None, gates, hns, x, h0, None, w_ih, w_hh, bias_x,
                  bias_hn, None, None), sched, reverse, pack_ih, pack_hh, bf16, training,
                 ids_in, y_copy)
    cache = None
    if training:
        cache = Cache(kind="gru", x=x, h0=h0, w_ih=w_ih, w_hh=w_hh, has_bias=b_ih is not None,
                      sched=sched, reverse=bool(reverse), hs=hs, y=y, gates=gates, hns=hns,
                      bf16=bf16, ids_in=ids_in)
    return y if y_copy is None else y_copy, h_n, cache


def gru_backward(dy, dh_n, cache, out=None, accumulate=False):
    """GRU layer backward -> dx, dh0, dw_ih, dw_hh, db_ih, db_hh (db None without bias).

    out: (dw_ih, dw_hh) arrays to write the weight gradients into (added into
    with accumulate=True); they are the ones returned.
    """
    if getattr(cache, "reset_before", False):        # reset_after=False, in the kernels
        return _gru_reset_before_backward(dy, dh_n, cache, out, accumulate)
    if getattr(cache, "reference", None) is not None:   # reset_after=False, bf16 products
        dy, dh_n, *_ = _backward_setup(dy, dh_n, cache, "gru")
        if out is not None:
            _weight_gradient_out(out, cache)               # checked before the cache is used
        return reference.gru_backward(dy, dh_n, cache.take().reference, out, accumulate)
    dy, dh_n, T, B, I, H, dtype = _backward_setup(dy, dh_n, cache, "gru")
    cache, dx, dh0, dw_ih, dw_hh = _gradient_buffers(cache, out)
    dgx = cache.gates                          # (T, B, 3H) receives dL/dgx
    dgh = _buffers.empty((T, B, 3 * H), dtype)   # (T, B, 3H) dL/dgh
    sched = cache.sched
    db_ih, db_hh = _bias_gradients(cache, 3 * H, apart=True)
    _run_backward(sched, T, cache.reverse, cache.bf16, bool(accumulate and out is not None),
                  CELL_GRU, dx, dh0, None, dw_ih, dw_hh, None, dgx, dgh, None, dy,
                  dh_n, None, cache.hns, None, cache.y, cache.h0, None, cache.x,
                  _h_prev(cache), cache.w_ih, cache.w_hh, None, dtable=dx, ids_in=cache.ids_in,
                  db_x=db_ih, db_h=db_hh)
    dx = _input_gradient(cache, dx, dw_ih, bool(accumulate and out is not None))
    _fix_reverse_first_step(dw_hh, dgh, cache)
    if cache.has_bias and db_ih is None:
        db_ih = dgx.reshape(T * B, 3 * H).sum(axis=0)
        db_hh = dgh.reshape(T * B, 3 * H).sum(axis=0)
    return dx, dh0, dw_ih, dw_hh, db_ih, db_hh


def _gru_reset_before_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, training, out,
                              x_ids):
    """gru_forward with reset_after=False: arguments checked as for the kernels. Float
    products run in the kernels (CELL_GRU_RESET_BEFORE: two products a step); a
    training call keeps the activated gates and every step's r * h_{t-1} (rhs) for
    gru_backward. bf16 products (matmul precision "medium") run fastrnn.reference's
    loop (NumPy products, bf16-rounded as the kernels round theirs), whose cache
    gru_backward then takes: the kernels have no bf16 path for this cell (nor, then,
    x_ids)."""
    x, h0, w_ih, w_hh, b_ih, b_hh, H, sched, pack_ih, pack_hh, ids_in = _common_forward(
        x, h0, w_ih, w_hh, b_ih, b_hh, 3, lengths, x_ids, training)
    T, B, _ = x.shape
    bf16 = _precision.bf16_products(x.dtype)
    if ids_in is not None and bf16:
        raise ValueError("x_ids: not with reset_after=False under bf16 products (matmul "
                         "precision \"medium\"): pass the rows x[x_ids]")
    if not training and sched.n_threads > 1 and not reset_before_eval_team(
            2.0 * T * B * 3 * H * (x.shape[2] + H), T):
        sched = sched.single_thread()
    if not bf16:
        hs, y, y_copy = _output_rows(x, H, h0, sched, reverse, training, out,
                                     (x, h0, w_ih, w_hh, b_ih, b_hh), ids_in)
        h_n = np.empty((B, H), x.dtype)
        gates = _buffers.empty((T, B, 3 * H), x.dtype) if training else None
        rhs = _buffers.empty((T, B, H), x.dtype) if training else None
        bias = None if b_ih is None else b_ih + b_hh   # b_hn sits outside (r*h) W_hn^T
        _run_forward((CELL_GRU_RESET_BEFORE, y, h_n, None, gates, rhs, x, h0, None, w_ih,
                      w_hh, bias, None, None, None), sched, reverse, pack_ih, pack_hh,
                     training=training, ids_in=ids_in, y_copy=y_copy)
        cache = None
        if training:
            cache = Cache(kind="gru", reset_before=True, x=x, h0=h0, w_ih=w_ih, w_hh=w_hh,
                          has_bias=b_ih is not None, sched=sched, reverse=bool(reverse), hs=hs,
                          y=y, gates=gates, rhs=rhs, bf16=False, ids_in=ids_in)
        return y if y_copy is None else y_copy, h_n, cache
    if out is not None:
        check_rows_out("out", out, (T, B, H), x.dtype, (x, h0, w_ih, w_hh, b_ih, b_hh))
    y, h_n, ref_cache = reference.gru_forward(
        x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None if not sched.padded else sched.lengths,
        reverse=bool(reverse), training=training, bf16=bf16, reset_after=False)
    if out is not None:
        out[...] = y
        y = out
    cache = Cache(kind="gru", x=x, w_ih=w_ih, w_hh=w_hh, reference=ref_cache) if training else None
    return y, h_n, cache


def _gru_reset_before_backward(dy, dh_n, cache, out, accumulate):
    """gru_backward of a reset_after=False cache from the kernels: the reverse loop's
    two products a step and W_hn's gradient against r * h_{t-1} (CELL_GRU_RESET_BEFORE)."""
    dy, dh_n, T, B, I, H, dtype = _backward_setup(dy, dh_n, cache, "gru")
    cache, dx, dh0, dw_ih, dw_hh = _gradient_buffers(cache, out)
    da = cache.gates                           # (T, B, 3H) receives dL/da
    db_ih, _ = _bias_gradients(cache, 3 * H)
    _run_backward(cache.sched, T, cache.reverse, False, bool(accumulate and out is not None),
                  CELL_GRU_RESET_BEFORE, dx, dh0, None, dw_ih, dw_hh, None, da, None, None,
                  dy, dh_n, None, cache.rhs, None, cache.y, cache.h0, None, cache.x,
                  _h_prev(cache), cache.w_ih, cache.w_hh, None, dtable=dx,
                  ids_in=cache.ids_in, db_x=db_ih)
    dx = _input_gradient(cache, dx, dw_ih, bool(accumulate and out is not None))
    # (W_hn's rows read r * h_{t-1}, which forward took from h0 itself: nothing to fix)
    _fix_reverse_first_step(dw_hh[:2 * H], da[..., :2 * H], cache)
    db_ih, db_hh = _shared_bias_gradients(cache, db_ih, da)
    return dx, dh0, dw_ih, dw_hh, db_ih, db_hh
