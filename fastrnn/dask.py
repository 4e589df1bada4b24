"""Batch inference on Dask: ``fastrnn.dask.predict(model, collection)``.

Needs the optional extra ``pip install "fastrnn[dask]"`` (dask and
distributed). ``import fastrnn`` never imports this module or dask.

    import dask.array as da, fastrnn, fastrnn.dask
    from distributed import Client
    client = Client("tcp://scheduler:8786")        # or a LocalCluster, or none
    x = da.from_zarr(...)                          # (N, T, I), chunked along N
    scores = fastrnn.dask.predict(model, x, output="last")   # lazy dask array
    scores.to_zarr(...)

What travels: the model is serialised once (``fastrnn.save`` bytes, or for
a composite the same kind of archive describing its tree, see
`fastrnn._modelfile`) into a single key of the graph; every task depends on
that key, so each worker receives the bytes once per computation and loads
them once per process (cached by SHA-256). The tasks run the model in eval
mode on their partition, in padded batches; kernels use
``threads`` threads per task (default: the worker's threads divided by the
tasks it is running, never more than its cores). See docs/scale-out.md.
"""

import copy

try:
    import dask
    import dask.array as da
    import dask.bag as db
    from dask import delayed
    from dask.base import tokenize
except ImportError as e:   # the optional extra: say which
    raise ImportError(f"fastrnn.dask needs Dask: pip install \"fastrnn[dask]\" ({e})") from e
import numpy as np

from fastrnn import _modelfile, _scoring
from fastrnn._scoring import OUTPUTS, ModelBlob, PartitionError, Plan, cache_info, clear_cache

__all__ = ["predict", "predict_local", "model_blob", "cache_info", "clear_cache",
           "save_model", "load_model", "OUTPUTS", "PartitionError"]

save_model = _modelfile.save_model
load_model = _modelfile.load_model


def model_blob(model):
    """The model as shipped: its bytes and their SHA-256 (a `ModelBlob`)."""
    return ModelBlob(_modelfile.to_bytes(model))


def _blob_node(blob):
    # one literal key per model content: every task depends on it, so the
    # scheduler sends it to each worker once and keeps one copy per worker
    return delayed(blob, name=f"fastrnn-model-{blob.digest[:20]}", pure=True)


def _is_dataframe_like(obj):
    try:
        import dask.dataframe as dd
    except ImportError:
        return False
    return isinstance(obj, (dd.Series, dd.DataFrame))


def predict(model, data, output="sequence", batch_size=256, threads=None, batch_first=None,
            lengths=None, name="output"):
    """Score a Dask collection with a fastrnn model, lazily.

    model: an eval-mode fastrnn module (RNN/LSTM/GRU stack, `Sequential`,
        `RNNLanguageModel`, anything `fastrnn.save` round-trips).
    data:
        * a `dask.array.Array` (N, T, I) chunked along N (the first axis; with
          ``batch_first=False`` (T, N, I) chunked along N, the second), or
          (N, T) integer token ids for a model that starts with an Embedding
          -> a dask array: 'sequence' (N, T, F) (or (T, N, F)), 'last' (N, F),
          'state' (N, L*D, H) (an LSTM: a tuple of two dask arrays h, c).
          ``lengths``: optional (N,) valid lengths (numpy or dask array).
        * a `dask.bag.Bag` of variable-length sequences ((T_i, I) arrays, or
          token-id lists) -> a Bag of per-sequence outputs in the same order:
          'sequence' (T_i, F), 'last' (F,), 'state' (L*D, H) or an (h, c) pair.
        * a dask DataFrame column (`dask.dataframe.Series`, or a one-column
          DataFrame) of such sequences -> a Series named `name`, same index.
    output: "sequence", "last" (the output at each sequence's last valid
        step) or "state" (the last recurrent layer's final state).
    batch_size: sequences per kernel call inside a partition. Variable-length
        partitions are sorted by length and cut into padded batches.
    threads: kernel threads per task (default: the worker's threads divided by
        its running tasks, at most its cores).
    batch_first: layout of a dense array (default: the model's own
        ``batch_first`` if it has one, else True).
    """
    _scoring.check_output(output)
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    batch_size = int(batch_size)
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise ValueError(f"threads must be an integer >= 1 or None, got {threads!r}")
    plan = Plan(model)
    blob = model_blob(model)
    if isinstance(data, da.Array):
        if plan.token_ids:
            batch_first = True       # token ids are (N, T) whatever the flag
        elif batch_first is None:
            batch_first = bool(getattr(model, "batch_first", True))
        return _predict_array(plan, blob, data, output, batch_size, threads, batch_first,
                              lengths)
    if lengths is not None:
        raise ValueError("lengths= is for dense arrays; a bag's sequences carry their own")
    if isinstance(data, db.Bag):
        return _predict_bag(plan, blob, data, output, batch_size, threads)
    if _is_dataframe_like(data):
        return _predict_series(plan, blob, data, output, batch_size, threads, name)
    raise TypeError(f"data must be a dask Array, Bag or DataFrame column, got "
                    f"{type(data).__name__} (for in-memory data use predict_local)")


def _call_token(*settings):
    """A short token of a call's settings (output kind, lengths, batch size, ...) for
    its task keys: with the model's digest and the input's name alone, two calls
    on the same data with other settings shared keys, and dask returned one
    call's results for the other (found by an audit)."""
    return tokenize(*settings)[:12]


def _predict_array(plan, blob, x, output, batch_size, threads, batch_first, lengths):
    naxis = 0 if (batch_first or plan.token_ids) else 1
    ndim = 2 if plan.token_ids else 3
    if x.ndim != ndim:
        want = "(N, T) token ids" if plan.token_ids else \
            ("(N, T, I)" if batch_first else "(T, N, I)")
        raise ValueError(f"fastrnn.dask.predict: expected a {ndim}-D array {want}, got "
                         f"shape {x.shape}")
    # early checks from the metadata; every block is checked again when it runs
    if plan.token_ids:
        if x.dtype.kind not in "iu":
            raise TypeError(f"fastrnn.dask.predict: expected integer token ids, got dtype "
                            f"{x.dtype}")
    else:
        if x.shape[2] != plan.input_size:
            raise ValueError(f"fastrnn.dask.predict: feature size {x.shape[2]} does not "
                             f"match the model's input size {plan.input_size}")
        if x.dtype != plan.dtype:
            raise TypeError(f"fastrnn.dask.predict: dtype {x.dtype} does not match the "
                            f"model's dtype {plan.dtype} (x.astype(np.{plan.dtype}))")
    # one chunk along every axis but N
    if any(len(c) > 1 for a, c in enumerate(x.chunks) if a != naxis):
        x = x.rechunk({a: (-1 if a != naxis else x.chunks[naxis]) for a in range(x.ndim)})
    nchunks = x.chunks[naxis]
    N, T = x.shape[naxis], x.shape[1 - naxis]
    if lengths is not None:
        if not isinstance(lengths, da.Array):
            lengths = da.from_array(np.asarray(lengths), chunks=(nchunks,))
        if lengths.shape != (N,):
            raise ValueError(f"lengths: expected shape ({N},), got {lengths.shape}")
        lengths = lengths.rechunk((nchunks,))
        lparts = list(lengths.to_delayed())
    else:
        lparts = [None] * len(nchunks)
    blocks = x.to_delayed().reshape(-1)
    spec, dtype = plan.output_spec(output)
    node = _blob_node(blob)
    nparts = len(nchunks)
    call = _call_token(output, batch_size, threads, bool(batch_first), lengths)
    outs = []
    for i, (blk, L, n) in enumerate(zip(blocks, lparts, nchunks)):
        d = delayed(_scoring.array_task, pure=True)(
            node, blk, L, i, output, batch_size, bool(batch_first), threads, nparts,
            dask_key_name=f"fastrnn-predict-{blob.digest[:8]}-{call}-{x.name}-{i}")
        outs.append((d, n))

    def assemble(shape_of, getter=None):
        arrays = []
        for d, n in outs:
            v = d if getter is None else d[getter]
            arrays.append(da.from_delayed(v, shape=shape_of(n), dtype=dtype))
        axis = 1 if (output == "sequence" and naxis == 1) else 0
        return da.concatenate(arrays, axis=axis)

    if output == "sequence":
        return assemble(lambda n: ((n, T) if naxis == 0 else (T, n)) + tuple(spec))
    if output == "last":
        return assemble(lambda n: (n,) + tuple(spec))
    if isinstance(spec[0], tuple):           # LSTM: (h, c)
        return tuple(assemble(lambda n, s=s: (n,) + s, k) for k, s in enumerate(spec))
    return assemble(lambda n: (n,) + tuple(spec))


def _predict_bag(plan, blob, bag, output, batch_size, threads):
    node = _blob_node(blob)
    parts = bag.to_delayed()
    call = _call_token(output, batch_size, threads)
    outs = [delayed(_scoring.sequences_task, pure=True)(
                node, p, i, output, batch_size, threads, len(parts),
                dask_key_name=f"fastrnn-predict-{blob.digest[:8]}-{call}-{bag.name}-{i}")
            for i, p in enumerate(parts)]
    return db.from_delayed(outs)


def _predict_series(plan, blob, data, output, batch_size, threads, name):
    import dask.dataframe as dd
    import pandas as pd
    if isinstance(data, dd.DataFrame):
        if len(data.columns) != 1:
            raise ValueError(f"fastrnn.dask.predict: a DataFrame with columns "
                             f"{list(data.columns)}; pass one column, e.g. df[{data.columns[0]!r}]")
        data = data[data.columns[0]]
    node = _blob_node(blob)
    parts = data.to_delayed()
    call = _call_token(output, batch_size, threads, name)
    outs = [delayed(_scoring.series_task, pure=True)(
                node, p, i, output, batch_size, threads, len(parts), name,
                dask_key_name=f"fastrnn-predict-{blob.digest[:8]}-{call}-{data._name}-{i}")
            for i, p in enumerate(parts)]
    meta = pd.Series([], dtype=object, name=name, index=data._meta.index)
    # outputs are arrays in an object column: never let dask turn them into strings
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_delayed(outs, meta=meta, divisions=data.divisions, verify_meta=False)


def predict_local(model, data, output="sequence", batch_size=256, batch_first=None,
                  lengths=None, threads=None):
    """The same computation in this process, without Dask: `data` a NumPy
    array (one block) or a list of variable-length sequences (one partition).
    Dask's result for a partition is bitwise this function's on that
    partition. threads: kernel threads (default: fastrnn.get_num_threads())."""
    _scoring.check_output(output)
    plan = Plan(model)       # (checks the model first)
    if not model.is_frozen():
        # as the workers run it (_scoring.model_from_blob): frozen weights, which short
        # sequences at small batch read packed (functional.pack_flags), not in place
        plan = Plan(copy.deepcopy(model).freeze())
    n = threads or _scoring.get_num_threads()
    with _scoring.task_threads(n):
        if isinstance(data, np.ndarray):
            if plan.token_ids:
                batch_first = True   # token ids are (N, T) whatever the flag
            elif batch_first is None:
                batch_first = bool(getattr(model, "batch_first", True))
            return _scoring.score_block(plan, data, lengths, output, int(batch_size),
                                        bool(batch_first))
        return _scoring.score_sequences(plan, list(data), output, int(batch_size))
