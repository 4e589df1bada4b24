"""``fastrnn predict MODEL INPUT --output OUT [--scheduler ADDRESS]``: batch
inference with `fastrnn.dask.predict`, from files to files.

MODEL: a file written by `fastrnn.save`, `fastrnn.dask.save_model` (also
composites: Sequential, RNNLanguageModel) or `fastrnn train --save`.

INPUT:
  x.npy              dense (N, T, I) floats or (N, T) token ids; memory-mapped,
                     each partition reads its own rows (workers must see the path)
  x.npz              one array (as .npy), or 'data' + 'lengths': variable-length
                     sequences concatenated along the first axis; read on the client
  x.parquet          a column (--column, default the only/first one) of lists
                     (token ids) or lists of lists (features); one partition per
                     Parquet partition (file / row group), read by the workers

OUT:
  .npy               one fixed-shape array (dense input; or 'last', or a GRU/RNN
                     'state', of variable-length input), written as it arrives
  .npz               'output' (and 'lengths' for variable-length 'sequence'
                     outputs, concatenated; 'h' and 'c' for an LSTM's 'state')
  .parquet           (Parquet input) a column 'output' (or 'h', 'c') of lists,
                     with the input's index, written by the workers

Floating-point input is converted to the model's dtype. Runs on Dask's local
threaded scheduler unless --scheduler gives a distributed scheduler address.
"""

import argparse
import os
import re
import sys

import numpy as np

from fastrnn._argtypes import positive_int as _positive_int
from fastrnn._argtypes import thread_count as _thread_count
from fastrnn._atomic import replacing, replacing_directory

__all__ = ["main", "build_parser"]


class PredictError(Exception):
    pass


def build_parser():
    p = argparse.ArgumentParser(
        prog="fastrnn predict",
        description="Batch inference with a fastrnn model on Dask: read sequences from "
                    ".npy/.npz/Parquet, write the model's outputs.",
        epilog="Formats: see `python -c 'import fastrnn.predict_cli as m; print(m.__doc__)'` "
               "or docs/scale-out.md.")
    p.add_argument("model", help="model file (fastrnn.save, fastrnn.dask.save_model, "
                                 "or a `fastrnn train --save` checkpoint)")
    p.add_argument("input", help="input .npy, .npz or .parquet (file or directory)")
    p.add_argument("--output", "-o", required=True, help="output .npy, .npz or .parquet")
    p.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="a Dask distributed scheduler, e.g. tcp://scheduler:8786 "
                        "(default: local threads)")
    p.add_argument("--kind", choices=["sequence", "last", "state"], default="last",
                   help="what to write: every step's output, the output at each "
                        "sequence's last step (default), or the final recurrent state")
    p.add_argument("--column", default=None, help="Parquet input column")
    p.add_argument("--partition-size", type=_positive_int, default=2000,
                   help="sequences per partition (.npy/.npz input; default 2000)")
    p.add_argument("--batch-size", type=_positive_int, default=256,
                   help="sequences per kernel call inside a partition (default 256)")
    p.add_argument("--threads", type=_thread_count, default=None,
                   help="kernel threads per task (default: worker threads / running tasks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _suffix(path):
    base = path.rstrip("/").lower()
    for s in (".npy", ".npz", ".parquet", ".pq"):
        if base.endswith(s):
            return ".parquet" if s == ".pq" else s
    return os.path.splitext(base)[1]


def _npy_rows(path, a, b, dtype):
    """Rows a:b of a .npy file (memory-mapped), as `dtype` if floating point."""
    x = np.load(path, mmap_mode="r", allow_pickle=False)[a:b]
    return np.ascontiguousarray(x, dtype=dtype if x.dtype.kind == "f" else None)


def _as_model_dtype(a, plan):
    return a.astype(plan.dtype) if a.dtype.kind == "f" and a.dtype != plan.dtype else a


def _read_input(args, plan):
    """-> ('array', dask array, lengths or None) | ('bag', bag, lengths) | ('series', s)."""
    import dask
    import dask.array as da
    import dask.bag as db
    path, kind, size = args.input, _suffix(args.input), args.partition_size
    if not os.path.exists(path) and "://" not in path:
        raise PredictError(f"{path}: no such file")
    if kind == ".npy":
        try:
            head = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise PredictError(f"{path}: not a readable .npy array ({e})") from None
        shape = head.shape
        dtype = plan.dtype if head.dtype.kind == "f" else head.dtype
        path = os.path.abspath(path)
        blocks = [da.from_delayed(dask.delayed(_npy_rows, pure=True)(path, a, min(a + size,
                                                                              shape[0]), dtype),
                                  shape=(min(a + size, shape[0]) - a,) + shape[1:], dtype=dtype)
                  for a in range(0, shape[0], size)]
        if not blocks:
            raise PredictError(f"{path}: no sequences (shape {shape})")
        return "array", da.concatenate(blocks), None
    if kind == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:
            raise PredictError(f"{path}: not a readable .npz archive ({e})") from None
        if "lengths" in arrays and "data" in arrays:
            data = _as_model_dtype(arrays["data"], plan)
            lengths = arrays["lengths"].astype(np.int64)
            if lengths.ndim != 1 or (lengths < 1).any() or lengths.sum() != len(data):
                raise PredictError(f"{path}: 'lengths' must be positive and sum to "
                                   f"len(data) = {len(data)}, got sum {lengths.sum()}")
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            seqs = [data[offsets[i]:offsets[i + 1]] for i in range(len(lengths))]
            nparts = max(1, -(-len(seqs) // size))
            return "bag", db.from_sequence(seqs, npartitions=nparts), lengths
        if len(arrays) != 1:
            raise PredictError(f"{path}: expected one array, or 'data' and 'lengths'; got "
                               f"{sorted(arrays)}")
        (x,) = arrays.values()
        x = _as_model_dtype(x, plan)
        return "array", da.from_array(x, chunks=(size,) + x.shape[1:]), None
    if kind == ".parquet":
        try:
            import dask.dataframe as dd
            import pyarrow  # noqa: F401
        except ImportError:
            raise PredictError("Parquet input needs pyarrow (pip install pyarrow)") from None
        df = dd.read_parquet(path, split_row_groups=True)     # a partition per row group
        col = args.column or df.columns[0]
        if col not in df.columns:
            raise PredictError(f"{path}: no column {col!r}; columns: {list(df.columns)}")
        return "series", df[col], None
    raise PredictError(f"{path}: unknown input format {kind!r} (use .npy, .npz or .parquet)")


def _progress_compute(objs, client, progress):
    """Compute dask objects; results in order. Dask's progress bar."""
    import dask
    if client is None:
        if progress:
            from dask.diagnostics import ProgressBar
            with ProgressBar():
                return list(dask.compute(*objs, scheduler="threads"))
        return list(dask.compute(*objs, scheduler="threads"))
    futures = client.compute(list(objs))
    if progress:
        from distributed import progress as dprogress
        dprogress(futures)
        print(file=sys.stderr)
    out = []
    for f in futures:      # one at a time: the client holds its part, then releases it
        out.append(f.result())
        f.release()
    return out


def _write_npz(path, arrays):
    """np.savez to exactly `path`, through a temporary file (fastrnn._atomic)."""
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _write_npy(path, parts, total_shape, dtype):
    with replacing(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=total_shape)
        a = 0
        for p in parts:
            out[a:a + len(p)] = p
            a += len(p)
        out.flush()
        del out


_PART = re.compile(r"part\.\d{5,}\.parquet")     # the files of a Parquet output (_write_part)


def _check_output(args, okind):
    """Refuse an --output that would destroy the user's data: the model or the input
    itself, or a directory holding anything but the part files a Parquet output is
    made of (replacing it would delete the rest)."""
    out = os.path.realpath(args.output)
    for what, path in (("the model file", args.model), ("the input", args.input)):
        if os.path.realpath(path) == out:
            raise PredictError(f"--output {args.output}: that is {what}; give another name")
    parent = os.path.dirname(os.path.abspath(args.output))   # checked before the job runs
    if not os.path.isdir(parent):
        raise PredictError(f"--output {args.output}: directory {parent} does not exist"
                           if not os.path.exists(parent) else
                           f"--output {args.output}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise PredictError(f"--output {args.output}: cannot write into {parent} "
                           f"(permission denied)")
    if os.path.isdir(args.output):
        if okind != ".parquet":
            raise PredictError(f"--output {args.output}: a directory; give a file name")
        others = sorted(e for e in os.listdir(args.output) if not _PART.fullmatch(e))
        if others:
            raise PredictError(
                f"--output {args.output}: a directory with files fastrnn predict did not "
                f"write ({', '.join(repr(e) for e in others[:3])}"
                f"{', ...' if len(others) > 3 else ''}); it replaces only its own output: "
                "give another name")


def _run(args, out):
    from fastrnn import dask as fdask
    from fastrnn._scoring import Plan
    try:
        model = fdask.load_model(args.model)
    except FileNotFoundError:
        raise PredictError(f"{args.model}: no such file") from None
    plan = Plan(model)
    okind = _suffix(args.output)
    if okind not in (".npy", ".npz", ".parquet"):
        raise PredictError(f"--output {args.output}: use a .npy, .npz or .parquet name")
    _check_output(args, okind)
    client = None
    if args.scheduler:
        from distributed import Client
        client = Client(args.scheduler)
    try:
        kind, data, lengths = _read_input(args, plan)
        res = fdask.predict(model, data, output=args.kind, batch_size=args.batch_size,
                            threads=args.threads, batch_first=True)
        progress = not args.no_progress
        if kind == "series":
            return _write_series(args, plan, res, client, progress, out)
        if okind == ".parquet":
            raise PredictError("Parquet output is for Parquet input; use .npy or .npz")
        if kind == "array":
            arrays = list(res) if isinstance(res, tuple) else [res]
            parts = [list(a.to_delayed().reshape(-1)) for a in arrays]
            flat = _progress_compute([p for ps in parts for p in ps], client, progress)
            n = len(parts[0])
            chunks = [flat[k * n:(k + 1) * n] for k in range(len(arrays))]
            if okind == ".npy":
                if len(arrays) != 1:
                    raise PredictError("an LSTM's state is two arrays (h, c): use --output "
                                       "NAME.npz")
                _write_npy(args.output, chunks[0], arrays[0].shape, arrays[0].dtype)
            else:
                keys = ["h", "c"] if len(arrays) == 2 else ["output"]
                _write_npz(args.output, {k: np.concatenate(c) for k, c in zip(keys, chunks)})
            n_seq = arrays[0].shape[0]
        else:                                            # a bag of variable-length outputs
            parts = _progress_compute(res.to_delayed(), client, progress)  # SequenceOutputs
            n_seq = sum(len(p) for p in parts)
            cat = [np.concatenate([p.arrays[k] for p in parts])
                   for k in range(len(parts[0].arrays))]
            if len(cat) == 2:                                   # an LSTM's (h, c)
                arrays = {"h": cat[0], "c": cat[1]}
            elif args.kind == "sequence":
                arrays = {"output": cat[0], "lengths": lengths}
            else:
                arrays = {"output": cat[0]}
            if okind == ".npy":
                if len(arrays) != 1:
                    raise PredictError(f"{args.kind} outputs of variable-length input are "
                                       f"{' + '.join(arrays)}: use --output NAME.npz")
                _write_npy(args.output, [arrays["output"]], arrays["output"].shape,
                           arrays["output"].dtype)
            else:
                _write_npz(args.output, arrays)
        print(f"fastrnn predict: {n_seq:,} sequences -> {args.output} ({args.kind})", file=out)
        return 0
    finally:
        if client is not None:
            client.close()


def _write_part(series_part, directory, i):
    """One output partition -> directory/part.{i}.parquet: a column 'output'
    (or 'h' and 'c') of (nested) lists, and the input's index."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    values = series_part.tolist()
    keys = ["h", "c"] if values and isinstance(values[0], tuple) else ["output"]
    cols = {}
    for k, key in enumerate(keys):
        cols[key] = [np.asarray(v[k] if isinstance(v, tuple) else v).tolist() for v in values]
    table = pa.Table.from_pandas(pd.DataFrame(cols, index=series_part.index))
    pq.write_table(table, os.path.join(directory, f"part.{i:05d}.parquet"))
    return len(values)


def _write_series(args, plan, res, client, progress, out):
    import dask
    okind = _suffix(args.output)
    if okind == ".parquet":
        # one file per partition, written by pyarrow where the partition is
        # (the object columns of lists are beyond dask's schema inference), into a
        # new directory that replaces the output only when every part is written
        with replacing_directory(args.output) as tmp:
            job = [dask.delayed(_write_part, pure=False)(p, tmp, i)
                   for i, p in enumerate(res.to_delayed())]
            n = f"{sum(_progress_compute(job, client, progress)):,}"
    else:
        parts = _progress_compute(res.to_delayed(), client, progress)
        results = [r for p in parts for r in p.tolist()]
        n = f"{len(results):,}"
        if not results:
            raise PredictError(f"{args.input}: no sequences to score")
        if results and isinstance(results[0], tuple):
            arrays = {"h": np.stack([r[0] for r in results]),
                      "c": np.stack([r[1] for r in results])}
        elif args.kind == "sequence":
            arrays = {"output": np.concatenate(results),
                      "lengths": np.array([len(r) for r in results])}
        else:
            arrays = {"output": np.stack(results)}
        if okind == ".npy":
            if len(arrays) != 1:
                raise PredictError(f"these outputs are {' + '.join(arrays)}: use .npz")
            _write_npy(args.output, [arrays["output"]], arrays["output"].shape,
                       arrays["output"].dtype)
        else:
            _write_npz(args.output, arrays)
    print(f"fastrnn predict: {n} sequences -> {args.output} ({args.kind})", file=out)
    return 0


def main(argv=None, out=None):
    out = sys.stdout if out is None else out
    args = build_parser().parse_args(argv)
    try:
        import fastrnn.dask  # noqa: F401
    except ImportError as e:
        print(f"fastrnn predict: error: needs Dask ({e}); pip install \"fastrnn[dask]\"",
              file=sys.stderr)
        return 2
    try:
        return _run(args, out)
    except (PredictError, ValueError, TypeError, OSError) as e:
        print(f"fastrnn predict: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastrnn predict: interrupted", file=sys.stderr)
        return 130
