"""`fastrnn bench --onnx FILE`: one ONNX file, run by ONNX Runtime and imported into fastrnn.

The file is imported with `fastrnn.onnx.load` (a fastrnn module: fastrnn's
kernels run it), both engines get the same random feeds, outputs are checked
against each other (exit 1 without timing when they differ by more than
MAX_REL_DIFF), and the median wall time of each is printed (repeats in a rotated
order, each timed call after the runner's quiet gap and one untimed call;
fastrnn and ONNX Runtime each on --threads threads).
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from fastrnn._argtypes import positive_int
from fastrnn.benchmark.common import TOLERANCE
from fastrnn.benchmark.timing import QUIET_GAP_DEFAULT

# float32 kernels that sum in other orders: the runner's tolerance
MAX_REL_DIFF = TOLERANCE[np.dtype(np.float32)]

__all__ = ["main", "make_feeds"]


def _parser():
    p = argparse.ArgumentParser(prog="fastrnn bench --onnx",
                                description="Time an ONNX file in fastrnn and ONNX Runtime.")
    p.add_argument("--onnx", required=True, metavar="FILE", help="the .onnx model")
    p.add_argument("-T", "--steps", type=positive_int, default=100,
                   help="sequence length (default 100)")
    p.add_argument("-B", "--batch", type=positive_int, default=32,
                   help="batch size (default 32)")
    p.add_argument("--lengths", action="store_true",
                   help="random per-sequence lengths (if the model takes them)")
    p.add_argument("--repeats", type=positive_int, default=10)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="last line: a JSON object")
    return p


def make_feeds(sess, model, T, B, rng, lengths=False):
    """Random inputs for every graph input, sized T x B (as ONNX Runtime wants them)."""
    sig = model.onnx_signature
    emb = next((m for _, m in model.named_modules() if type(m).__name__ == "Embedding"), None)
    feeds = {}
    for i in sess.get_inputs():
        dims = list(i.shape)
        if i.name == sig["x"]:
            tb = [B, T] if sig["batch_first"] else [T, B]
            shape = tb + [d for d in dims[2:]]
            if "int" in i.type:
                feeds[i.name] = rng.integers(0, emb.num_embeddings, tb).astype(np.int64)
                continue
        elif i.name == sig["lengths"]:
            lens = rng.integers(1, T + 1, B) if lengths else np.full(B, T)
            lens[0] = T
            feeds[i.name] = lens.astype(np.int32)
            continue
        else:                                        # initial state (L·D, B, H)
            shape = [dims[0], B, dims[2]]
        dt = np.float64 if "double" in i.type else np.float32
        feeds[i.name] = rng.standard_normal(shape).astype(dt)
    return feeds


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    if not os.path.isfile(args.onnx):
        p.error(f"--onnx {args.onnx!r}: no such file")
    import onnxruntime as ort

    import fastrnn
    fastrnn.set_num_threads(args.threads)
    model = fastrnn.onnx.load(args.onnx)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(args.onnx, so, providers=["CPUExecutionProvider"])
    feeds = make_feeds(sess, model, args.steps, args.batch, np.random.default_rng(args.seed),
                       args.lengths)
    names = [o.name for o in sess.get_outputs()]
    ref = dict(zip(names, sess.run(None, feeds)))
    ours = fastrnn.onnx.run(model, feeds)
    err = max(float(np.max(np.abs(ours[n] - ref[n])) / (np.max(np.abs(ref[n])) or 1.0))
              for n in names)
    if not err <= MAX_REL_DIFF:   # (NaN fails too) timing two different functions means nothing
        print(f"fastrnn bench --onnx: the outputs differ from ONNX Runtime's (max relative "
              f"difference {err:.2e} > {MAX_REL_DIFF:g}); not timing", file=sys.stderr)
        return 1
    engines = {"fastrnn": lambda: fastrnn.onnx.run(model, feeds),
               "onnxruntime": lambda: sess.run(None, feeds)}
    for run in engines.values():                     # warm-up
        run()
    times = {name: [] for name in engines}
    order = list(engines)
    for r in range(args.repeats):                    # rotated, each after a quiet gap
        for name in order[r % 2:] + order[:r % 2]:   # (the runner's method)
            time.sleep(QUIET_GAP_DEFAULT)
            engines[name]()                          # the cold call after idle, untimed
            t0 = time.perf_counter()
            engines[name]()
            times[name].append(time.perf_counter() - t0)
    f_ms, o_ms = (statistics.median(times[n]) * 1e3 for n in ("fastrnn", "onnxruntime"))
    print(f"model: {model!r}".replace("\n", " "))
    print(f"inputs: " + ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in feeds.items()))
    print(f"fastrnn      {f_ms:10.3f} ms")
    print(f"onnxruntime  {o_ms:10.3f} ms   ratio (onnxruntime / fastrnn) {o_ms / f_ms:.2f}")
    print(f"max relative difference of the outputs: {err:.2e}")
    if args.json:
        print(json.dumps(dict(file=args.onnx, T=args.steps, B=args.batch, threads=args.threads,
                              fastrnn_ms=f_ms, onnxruntime_ms=o_ms, max_rel_diff=err)))
    return 0
