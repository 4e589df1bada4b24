"""GRU with the reset gate before the recurrent product (reset_after=False: the seed's
GRU, Keras reset_after=False, ONNX linear_before_reset=0), inference: fastrnn against
ONNX Runtime's GRU operator with linear_before_reset=0, side by side.

    python bench/gru_reset_before.py                       # I=H=256 T=100, B=1, 8, 64
    python bench/gru_reset_before.py -I 512 -H 512 -T 50 -B 8 128 --rounds 15

The model is fastrnn's, written to ONNX by fastrnn.onnx.export (same weights, same
input); ONNX Runtime's output is checked against fastrnn's before anything is timed.
Also timed: fastrnn's torch-form GRU (reset_after=True) on the same weights, the
cell this one is measured against in the docs (same FLOPs; torch has no
reset-before GRU). Calls are timed interleaved with a quiet gap before each sample
(fastrnn.benchmark.timing); medians are printed with the ratio ONNX Runtime ms /
fastrnn ms (above 1: fastrnn faster). A benchmark, not a test: needs onnx and
onnxruntime (pip install onnx onnxruntime).
"""

import argparse
import os
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # measure the checkout, not some installed copy
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn.benchmark.timing import set_threads, time_interleaved  # noqa: E402


class Engine:
    def __init__(self, name, run):
        self.name, self.run = name, run


def _session(path, threads):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def engines(I, H, T, B, threads, workdir, seed=0):
    """[fastrnn reset-before, ONNX Runtime linear_before_reset=0, fastrnn torch form]."""
    before = fastrnn.GRU(I, H, seed=seed, reset_after=False).eval()
    after = fastrnn.GRU(I, H, seed=seed).eval()
    after.load_state_dict(before.state_dict())
    x = np.random.default_rng(seed).standard_normal((T, B, I)).astype(np.float32)
    path = fastrnn.onnx.export(before, os.path.join(workdir, f"gru_{I}_{H}.onnx"))
    sess = _session(path, threads)
    name = sess.get_inputs()[0].name
    got = sess.run(None, {name: x})[0].reshape(T, B, H)
    want = before(x)[0]
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    if err > 2e-3:
        raise SystemExit(f"fastrnn and ONNX Runtime disagree: rel. error {err:.2e}")
    return [Engine("fastrnn", lambda: before(x)),
            Engine("onnxruntime", lambda: sess.run(None, {name: x})),
            Engine("fastrnn reset_after=True", lambda: after(x))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-I", type=int, default=256)
    p.add_argument("-H", type=int, default=256)
    p.add_argument("-T", type=int, default=100)
    p.add_argument("-B", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        print("bench/gru_reset_before.py needs onnx and onnxruntime "
              "(pip install onnx onnxruntime)", file=sys.stderr)
        return 2
    info = fastrnn.config()
    print(f"# {info.get('cpu', '?')}, ISA {info.get('isa', '?')}, {args.threads} threads; "
          f"GRU reset_after=False inference, medians of {args.rounds} interleaved rounds")
    with set_threads(args.threads, ("onnxruntime",)), tempfile.TemporaryDirectory() as tmp:
        for B in args.B:
            es = engines(args.I, args.H, args.T, B, args.threads, tmp)
            for e in es:
                e.run()
            res = time_interleaved(es, budget=None, repeats=args.rounds)
            f, o, a = (res[e.name][0] for e in es)
            print(f"GRU reset-before (I={args.I}, H={args.H}, T={args.T}, B={B}): "
                  f"fastrnn {f * 1e3:8.3f} ms, ONNX Runtime {o * 1e3:8.3f} ms "
                  f"(ORT/fastrnn {o / f:.2f}x); fastrnn reset_after=True {a * 1e3:8.3f} ms",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
