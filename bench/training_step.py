"""Training-step timings that session 34's notes quote (docs/results-history.md), reproducible:

    python bench/training_step.py steps --cell rnn           # forward / backward / step, ms
    python bench/training_step.py dw                         # the dW GEMM's task size

`steps`: one layer in training mode, `layer(x)`, `layer.backward(dy)`, `zero_grad()`
back to back after warm-up calls; the medians of each part over --seconds, in ms. Run it
once per build, alternating builds (each build's own copy of this script measures its
own checkout), and compare the medians.

`dw`: Linear's backward (fastrnn._dense.backward: dx = dy W, then dW^T = x^T dy, the
weight-gradient GEMM the recurrent layers' backward also runs) at M = T*B rows, timed
in interleaved rounds with the dW GEMM's tasks sized for an unknown L2 (48 rows, the
floor) and for this machine's L2 (src/_gradients.pxd dw_task_rows). The difference is
that GEMM's alone: the dx product is the same call either way.
"""

import argparse
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # measure the checkout, not some installed copy
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn import _cpu_cache, _dense  # noqa: E402

MODULES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def _header(what):
    info = fastrnn.config()
    print(f"# {info.get('cpu', '?')}, ISA {info.get('isa', '?')}, "
          f"{fastrnn.get_num_threads()} threads; {what}")


def steps(args):
    """Medians (ms) of a training step's forward, backward and whole step."""
    layer = getattr(fastrnn, MODULES[args.cell])(args.I, args.H, num_layers=args.layers,
                                                 bidirectional=args.bidirectional, seed=0)
    D = 2 if args.bidirectional else 1
    x = np.random.default_rng(0).standard_normal((args.T, args.B, args.I)).astype(np.float32)
    dy = np.ones((args.T, args.B, D * args.H), np.float32)        # (T, B, D*H)
    layer.train()

    def step():
        t0 = time.perf_counter()
        layer(x)
        t1 = time.perf_counter()
        layer.backward(dy)
        t2 = time.perf_counter()
        layer.zero_grad()
        return t1 - t0, t2 - t1, time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    parts = []
    end = time.perf_counter() + args.seconds
    while len(parts) < 3 or time.perf_counter() < end:
        parts.append(step())
    fwd, bwd, step = (float(np.median(c)) * 1e3 for c in zip(*parts))
    _header(f"{args.cell} training, (I, H, T, B) = ({args.I}, {args.H}, {args.T}, {args.B}), "
            f"{args.layers} layer(s), {D} direction(s); medians of {len(parts)} steps")
    print(f"forward {fwd:.3f} ms  backward {bwd:.3f} ms  step {step:.3f} ms")


def dw(args):
    """Linear's backward with 48-row dW tasks against this machine's L2-sized ones."""
    rng = np.random.default_rng(0)
    M = args.T * args.B
    x = rng.standard_normal((M, args.K), dtype=np.float32)      # (M, K) the layer's input
    dy = rng.standard_normal((M, args.N), dtype=np.float32)     # (M, N)
    w = rng.standard_normal((args.N, args.K), dtype=np.float32)  # (N, K)
    dx = np.empty((M, args.K), np.float32)
    dw_t = np.empty((args.K, args.N), np.float32)
    threads = fastrnn.get_num_threads()
    settings = {"48-row tasks": 0, "L2-sized tasks": _cpu_cache.l2_bytes()}
    ms = {name: [] for name in settings}
    try:
        for _ in range(args.rounds):
            for name, l2 in settings.items():
                _dense._set_l2_bytes(l2)
                _dense.backward(dx, dw_t, dy, x, w, threads)             # warm
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    _dense.backward(dx, dw_t, dy, x, w, threads)
                ms[name].append((time.perf_counter() - t0) / args.calls * 1e3)
    finally:
        _dense._set_l2_bytes(_cpu_cache.l2_bytes())
    _header(f"Linear backward, M = {M} rows, K = {args.K}, N = {args.N}; "
            f"{args.rounds} interleaved rounds of {args.calls} calls; L2 "
            f"{_cpu_cache.l2_bytes() // 1024} KB")
    base = float(np.median(ms["48-row tasks"]))
    for name, v in ms.items():
        med = float(np.median(v))
        print(f"{name:15s} {med:8.3f} ms  (rounds {min(v):.3f}-{max(v):.3f})  "
              f"{base / med:5.3f}x the 48-row tasks")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("steps", help="a layer's training step, parts timed")
    s.add_argument("--cell", choices=sorted(MODULES), default="rnn")
    s.add_argument("-I", type=int, default=256)
    s.add_argument("-H", type=int, default=256)
    s.add_argument("-T", type=int, default=100)
    s.add_argument("-B", type=int, default=64)
    s.add_argument("--layers", type=int, default=1)
    s.add_argument("--bidirectional", action="store_true")
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--seconds", type=float, default=3.0)
    d = sub.add_parser("dw", help="the dW GEMM's task size, through Linear's backward")
    d.add_argument("-T", type=int, default=100)
    d.add_argument("-B", type=int, default=64)
    d.add_argument("-K", type=int, default=256, help="output rows of dW^T (the GEMM's M)")
    d.add_argument("-N", type=int, default=256)
    d.add_argument("--rounds", type=int, default=7)
    d.add_argument("--calls", type=int, default=5)
    args = ap.parse_args(argv)
    for name in ("I", "H", "T", "B", "K", "N", "layers", "rounds", "calls"):
        if getattr(args, name, 1) < 1:
            ap.error(f"-{name if len(name) == 1 else '-' + name}: expected >= 1, "
                     f"got {getattr(args, name)}")
    (steps if args.what == "steps" else dw)(args)


if __name__ == "__main__":
    main()
