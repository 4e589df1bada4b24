"""Batch inference over one partition: what a `fastrnn.dask` task runs.

Nothing here imports dask at module level, so the same code is the local
reference (`fastrnn.dask.predict_local`) and the body of every task.

A model is run as a chain of steps (`plan`): a `Sequential`/`ModuleList` is
flattened, an `RNNLanguageModel` is encoder -> rnn -> decoder (its dropouts
are identities in eval mode), and every module whose ``forward`` takes
``lengths`` (RNN, LSTM, GRU and anything built like them) is called with the
lengths of the padded batch in its own layout; every other step is applied
to the whole (B, T, ...) array (Linear, Embedding, Dropout: pointwise in time,
so padding never leaks into valid steps).
"""

import inspect
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np

from fastrnn import _modelfile
from fastrnn._config import get_num_threads, set_num_threads
from fastrnn.lm import RNNLanguageModel
from fastrnn.modules.cells import _CellBase
from fastrnn.quantization import _QuantizedCell
from fastrnn.modules.module import Module
from fastrnn.nn import Embedding, ModuleList

OUTPUTS = ("sequence", "last", "state")


class PartitionError(ValueError):
    """A partition cannot be scored; the message names the partition and the problem."""


def _fail(index, msg, cls=ValueError):
    where = "" if index is None else f"partition {index}: "
    return cls(f"fastrnn.dask.predict: {where}{msg}")


# -- the model as a chain of steps ---------------------------------------------
def _takes_lengths(module):
    try:
        return "lengths" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _flatten(module):
    if isinstance(module, ModuleList):          # Sequential is a ModuleList
        return [s for child in module.children() for s in _flatten(child)]
    if isinstance(module, RNNLanguageModel):
        return [s for child in (module.encoder, module.drop_in, module.rnn, module.drop_out,
                                module.decoder) for s in _flatten(child)]
    return [("rnn" if _takes_lengths(module) else "map", module)]


class Plan:
    """How to run `model` on a padded batch; what its input must look like."""

    def __init__(self, model):
        if not isinstance(model, Module):
            raise TypeError(f"expected a fastrnn Module, got {type(model).__name__}")
        if model.training:
            raise ValueError("the model is in training mode; call model.eval() first "
                             "(inference runs without dropout and keeps no caches)")
        self.steps = _flatten(model)
        if not self.steps:
            raise ValueError("the model has no layers")
        for _, m in self.steps:
            if isinstance(m, (_CellBase, _QuantizedCell)):   # one step: no sequence to score
                raise TypeError(
                    f"{type(m).__name__} runs a single time step; scoring takes sequence "
                    f"models: use a layer (fastrnn.LSTM, GRU, RNN, or fastrnn.quantize of "
                    f"one) with the cell's weights (weight_ih_l0 = cell.weight_ih, ...)")
        params = model.parameters()
        self.dtype = np.dtype(params[0].dtype) if params else np.dtype(np.float32)
        first = self.steps[0][1]
        self.token_ids = isinstance(first, Embedding)
        if self.token_ids:
            self.vocab_size = first.num_embeddings
            self.input_size = None
        else:
            self.input_size = getattr(first, "input_size", getattr(first, "in_features", None))
        self.has_state = any(kind == "rnn" for kind, _ in self.steps)

    def describe_input(self):
        if self.token_ids:
            return f"integer token ids in [0, {self.vocab_size})"
        return f"{self.dtype} features of size {self.input_size}"

    def run(self, x, lengths):
        """x (B, T, I) or ids (B, T); lengths (B,) or None -> out (B, T, F), state.

        state is None (no recurrent layer), an array (B, L*D, H), or for an
        LSTM a tuple (h (B, L*D, O), c (B, L*D, H)), of the last recurrent layer.
        """
        state = None
        for kind, m in self.steps:
            if kind == "rnn":
                bf = bool(getattr(m, "batch_first", False))
                res = m(x if bf else x.transpose(1, 0, 2), lengths=lengths)
                out, st = res if isinstance(res, tuple) else (res, None)
                x = out if bf else out.transpose(1, 0, 2)
                if isinstance(st, tuple):
                    state = tuple(np.ascontiguousarray(s.transpose(1, 0, 2)) for s in st)
                elif st is not None:
                    state = np.ascontiguousarray(st.transpose(1, 0, 2))
            else:
                x = m(x)
        return np.asarray(x), state

    def output_spec(self, output):
        """Shapes (per sequence, without T for 'sequence') and dtype of an output kind."""
        dummy = np.zeros((1, 1), np.int64) if self.token_ids else \
            np.zeros((1, 1, self.input_size), self.dtype)
        out, state = self.run(dummy, None)
        if output == "state":
            if state is None:
                raise ValueError("output='state': the model has no recurrent layer")
            if isinstance(state, tuple):
                return tuple(s.shape[1:] for s in state), out.dtype
            return state.shape[1:], out.dtype
        return out.shape[2:], out.dtype


def check_output(output):
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")


def _select(output, out, state, lengths):
    """Per-batch outputs of a kind: 'sequence' -> out; 'last' -> (B, F); 'state' -> state."""
    if output == "sequence":
        return out
    if output == "last":
        B = out.shape[0]
        last = (np.full(B, out.shape[1] - 1) if lengths is None
                else np.asarray(lengths) - 1)
        return out[np.arange(B), last]
    return state


# -- the model on the workers: loaded once per process, keyed by content hash -----
class ModelBlob:
    """A model's bytes and their SHA-256, as shipped to the workers."""

    __slots__ = ("digest", "data")

    def __init__(self, data):
        self.data = bytes(data)
        self.digest = _modelfile.digest(self.data)

    def __getstate__(self):
        return (self.digest, self.data)

    def __setstate__(self, state):
        self.digest, self.data = state

    def __repr__(self):
        return f"ModelBlob(sha256={self.digest[:12]}, {len(self.data)} bytes)"


_CACHE_SIZE = 4
_cache = OrderedDict()          # digest -> (model, plan)
_cache_lock = threading.Lock()
_stats = {"loads": 0, "hits": 0}


def model_from_blob(blob):
    """(model, plan) for a blob, loaded at most once per process per digest."""
    with _cache_lock:
        hit = _cache.get(blob.digest)
        if hit is not None:
            _cache.move_to_end(blob.digest)
            _stats["hits"] += 1
            return hit
        if _modelfile.digest(blob.data) != blob.digest:
            raise ValueError("fastrnn.dask: model bytes do not match their SHA-256 "
                             "(corrupted in transfer?)")
        model = _modelfile.from_bytes(blob.data, what=f"model {blob.digest[:12]}")
        # only this cache holds it, for inference: weights as constants, so calls do
        # not hash them (Module.freeze(), docs/inference.md)
        model.freeze()
        entry = (model, Plan(model))
        _cache[blob.digest] = entry
        _stats["loads"] += 1
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        return entry


def cache_info():
    """This process's model cache: loads (cache misses), hits, cached digests, pid."""
    with _cache_lock:
        return dict(_stats, digests=list(_cache), pid=os.getpid())


def clear_cache():
    with _cache_lock:
        _cache.clear()
        _stats.update(loads=0, hits=0)


# -- threads per task ------------------------------------------------------------------
_thread_lock = threading.Lock()
_active = 0
_saved_threads = None


def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_threads(partitions=None):
    """The worker's threads divided by the tasks it runs at once, at most its cores."""
    cores = _usable_cores()
    try:
        from distributed import get_worker
        w = get_worker()
        slots, running = w.state.nthreads, max(1, w.state.executing_count)
    except (ImportError, ValueError):        # not on a distributed worker
        try:
            import dask
            from dask.system import CPU_COUNT
            slots = dask.config.get("num_workers", None) or CPU_COUNT
        except ImportError:
            slots = cores
        running = max(1, min(slots, partitions or slots))
    return max(1, min(cores, slots // running))


@contextmanager
def task_threads(n):
    """Run the kernels on n threads for the duration; restore the setting after
    the last concurrent task of this process ends."""
    global _active, _saved_threads
    with _thread_lock:
        if _active == 0:
            _saved_threads = get_num_threads()
        _active += 1
        set_num_threads(int(n))
    try:
        yield
    finally:
        with _thread_lock:
            _active -= 1
            if _active == 0:
                set_num_threads(_saved_threads)


# -- input checks ----------------------------------------------------------------------
def check_array_block(plan, x, index, batch_first=True):
    """A (B, T, I) float block (or (B, T) ids) -> itself, or a PartitionError."""
    x = np.asarray(x)
    if plan.token_ids:
        if x.ndim != 2:
            raise _fail(index, f"expected token ids of shape (N, T), got shape {x.shape}")
        if x.dtype.kind not in "iu":
            raise _fail(index, f"expected integer token ids, got dtype {x.dtype}", TypeError)
        bad = (x < 0) | (x >= plan.vocab_size)
        if bad.any():
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            raise _fail(index, f"token id {int(x[pos])} at {pos} is outside "
                               f"[0, {plan.vocab_size})")
        return x
    layout = "(N, T, I)" if batch_first else "(T, N, I)"
    if x.ndim != 3:
        raise _fail(index, f"expected a 3-D block {layout}, got shape {x.shape}")
    if x.shape[2] != plan.input_size:
        raise _fail(index, f"feature size {x.shape[2]} does not match the model's "
                           f"input size {plan.input_size} (block shape {x.shape} {layout})")
    if x.dtype != plan.dtype:
        raise _fail(index, f"dtype {x.dtype} does not match the model's dtype {plan.dtype} "
                           f"(convert with .astype(np.{plan.dtype}))", TypeError)
    return x


def _check_sequence(plan, s, index, j):
    """One variable-length sequence -> an array (T_j, I) or ids (T_j,)."""
    if type(s) is np.ndarray and not plan.token_ids and s.dtype == plan.dtype and \
            s.ndim == 2 and s.shape[1] == plan.input_size and s.shape[0] > 0:
        return s                                   # the common case, checked cheaply
    if isinstance(s, (str, bytes)):
        raise _fail(index, f"sequence {j}: a string ({s[:40]!r}), not a sequence; a dask "
                           f"DataFrame made from lists converts them to strings unless "
                           f"dask.config.set({{'dataframe.convert-string': False}})", TypeError)
    # a typed NumPy array keeps its dtype (a wrong one is an error, as in the layers);
    # lists and object arrays (Parquet list columns) are converted to the model's dtype
    typed = isinstance(s, np.ndarray) and s.dtype != object
    try:
        if isinstance(s, np.ndarray) and s.dtype == object:
            s = [np.asarray(r) for r in s] if s.ndim == 1 and s.size and \
                isinstance(s[0], (np.ndarray, list, tuple)) else s.tolist()
        a = np.asarray(s) if typed or plan.token_ids else np.asarray(s, dtype=plan.dtype)
    except (TypeError, ValueError) as e:
        raise _fail(index, f"sequence {j}: not a numeric sequence ({e})") from None
    if plan.token_ids:
        if a.ndim != 1:
            raise _fail(index, f"sequence {j}: expected a 1-D list of token ids, "
                               f"got shape {a.shape}")
        if a.size and a.dtype.kind not in "iu":
            raise _fail(index, f"sequence {j}: expected integer token ids, got dtype "
                               f"{a.dtype}", TypeError)
        if a.size and ((a < 0) | (a >= plan.vocab_size)).any():
            bad = a[(a < 0) | (a >= plan.vocab_size)][0]
            raise _fail(index, f"sequence {j}: token id {int(bad)} is outside "
                               f"[0, {plan.vocab_size})")
    else:
        if a.ndim == 2 and a.shape[1] != plan.input_size:
            raise _fail(index, f"sequence {j}: feature size {a.shape[1]} does not match the "
                               f"model's input size {plan.input_size} (shape {a.shape})")
        if a.ndim != 2:
            raise _fail(index, f"sequence {j}: expected shape (T, {plan.input_size}), "
                               f"got {a.shape}")
        if a.dtype != plan.dtype:
            raise _fail(index, f"sequence {j}: dtype {a.dtype} does not match the model's "
                               f"dtype {plan.dtype}", TypeError)
    if a.shape[0] == 0:
        raise _fail(index, f"sequence {j}: empty (no time steps)")
    return a


def _run_guarded(plan, x, lengths, index):
    try:
        return plan.run(x, lengths)
    except (ValueError, TypeError, IndexError) as e:
        raise _fail(index, f"{type(e).__name__} from the model: {e}") from e


# -- one partition -----------------------------------------------------------------------
def score_block(plan, x, lengths=None, output="sequence", batch_size=256, batch_first=True,
                index=None):
    """A dense block (N, T, I) / (T, N, I) / ids (N, T) -> outputs for its N sequences.

    'sequence' keeps the input's layout; 'last' is (N, F); 'state' is
    (N, L*D, H) or a pair for an LSTM. Rows run in slices of batch_size.
    """
    x = check_array_block(plan, x, index, batch_first)
    if not plan.token_ids and not batch_first:
        x = x.transpose(1, 0, 2)
    N, T = x.shape[0], x.shape[1]
    if lengths is not None:
        lengths = np.asarray(lengths)
        if lengths.shape != (N,) or lengths.dtype.kind not in "iu" or \
                (N and (lengths.min() < 1 or lengths.max() > T)):
            raise _fail(index, f"lengths must be {N} integers in [1, {T}], got "
                               f"shape {lengths.shape} dtype {lengths.dtype}")
    if N == 0:       # no rows (an empty chunk, or all of the data): empty outputs
        spec, dtype = plan.output_spec(output)
        if output == "state" and isinstance(spec[0], tuple):
            return tuple(np.empty((0,) + tuple(s), dtype) for s in spec)
        lead = ((0, T) if batch_first or plan.token_ids else (T, 0)) \
            if output == "sequence" else (0,)
        return np.empty(lead + tuple(spec), dtype)
    parts = []
    for a in range(0, N, batch_size):
        L = None if lengths is None else lengths[a:a + batch_size]
        out, state = _run_guarded(plan, x[a:a + batch_size], L, index)
        parts.append(_select(output, out, state, L))
    if output == "state" and isinstance(parts[0], tuple):
        res = tuple(np.concatenate([p[k] for p in parts]) for k in range(len(parts[0])))
    else:
        res = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if output == "sequence" and not batch_first:
            res = np.ascontiguousarray(res.transpose(1, 0, 2))
    return res


class SequenceOutputs(Sequence):
    """Per-sequence outputs of one partition, stored as a few contiguous arrays.

    Behaves as a read-only list: ``out[j]`` is sequence j's output, a view
    ((T_j, F) for 'sequence', (F,) for 'last', (L*D, H) or an LSTM (h, c)
    pair for 'state'). Shipping it between processes costs a few arrays,
    not one serialised object per sequence.
    """

    __slots__ = ("arrays", "offsets")

    def __init__(self, arrays, offsets=None):
        self.arrays = tuple(arrays)       # one array, or (h, c)
        self.offsets = offsets            # (n+1,) for 'sequence', else None

    def __len__(self):
        n = self.arrays[0].shape[0]
        return n if self.offsets is None else len(self.offsets) - 1

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        n = len(self)
        if j < 0:
            j += n
        if not 0 <= j < n:
            raise IndexError(f"index {j} out of range for {n} outputs")
        if self.offsets is not None:
            return self.arrays[0][self.offsets[j]:self.offsets[j + 1]]
        if len(self.arrays) > 1:
            return tuple(a[j] for a in self.arrays)
        return self.arrays[0][j]

    def __array__(self, dtype=None, copy=None):
        """'last' or a GRU/RNN 'state': the (n, ...) array; ragged or paired outputs raise."""
        if self.offsets is not None or len(self.arrays) != 1:
            raise TypeError("variable-length or (h, c) outputs are not one array; use "
                            ".arrays (and .offsets)")
        a = self.arrays[0]
        return a if dtype is None else a.astype(dtype, copy=False)

    def __getstate__(self):
        return (self.arrays, self.offsets)

    def __setstate__(self, state):
        self.arrays, self.offsets = state

    def __repr__(self):
        shapes = ", ".join(str(a.shape) for a in self.arrays)
        return f"SequenceOutputs({len(self)} outputs in {shapes})"


def score_sequences(plan, seqs, output="sequence", batch_size=256, index=None):
    """Variable-length sequences -> their outputs in input order (`SequenceOutputs`).

    Sequences are sorted by length (longest first, stable) and run in padded
    batches of batch_size with `lengths`, so padding costs next to nothing.
    'sequence' -> (T_j, F); 'last' -> (F,); 'state' -> (L*D, H) or an LSTM pair.
    """
    arrays = [_check_sequence(plan, s, index, j) for j, s in enumerate(seqs)]
    n = len(arrays)
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]) if output == "sequence" else None
    store = None
    if n == 0:
        spec, dtype = plan.output_spec(output)
        specs = spec if isinstance(spec[0], tuple) else (spec,)
        return SequenceOutputs([np.empty((0,) + tuple(s), dtype) for s in specs], offsets)
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        L = lengths[idx]
        T = int(L.max())
        first = arrays[idx[0]]
        # token ids of mixed integer dtypes (uint8 and int64, say) pad as int64: in the
        # first sequence's dtype a larger id wrapped (300 as uint8 is 44)
        dtype = np.int64 if plan.token_ids else first.dtype
        batch = np.zeros((len(idx), T) + first.shape[1:], dtype)
        for r, j in enumerate(idx):
            batch[r, :L[r]] = arrays[j]
        out, state = _run_guarded(plan, batch, L, index)
        sel = _select(output, out, state, L)
        sel = sel if isinstance(sel, tuple) else (sel,)
        if store is None:
            rows = int(offsets[-1]) if output == "sequence" else n
            store = [np.empty((rows,) + a.shape[2 if output == "sequence" else 1:], a.dtype)
                     for a in sel]
        if output == "sequence":
            for r, j in enumerate(idx):
                store[0][offsets[j]:offsets[j + 1]] = sel[0][r, :L[r]]
        else:
            for k, a in enumerate(sel):
                store[k][idx] = a
    return SequenceOutputs(store, offsets)


# -- task bodies (what the dask graph calls) ------------------------------------------
def array_task(blob, x, lengths, index, output, batch_size, batch_first, threads, partitions):
    model, plan = model_from_blob(blob)
    with task_threads(threads or default_threads(partitions)):
        return score_block(plan, x, lengths, output, batch_size, batch_first, index)


def sequences_task(blob, seqs, index, output, batch_size, threads, partitions):
    model, plan = model_from_blob(blob)
    with task_threads(threads or default_threads(partitions)):
        return score_sequences(plan, list(seqs), output, batch_size, index)


def series_task(blob, series, index, output, batch_size, threads, partitions, name):
    import pandas as pd
    res = sequences_task(blob, series.tolist(), index, output, batch_size, threads, partitions)
    values = np.empty(len(res), dtype=object)
    for k in range(len(res)):
        values[k] = res[k]
    return pd.Series(values, index=series.index, name=name)
