"""float64 against float32: the same layer, the same values, forward (inference)
and forward + backward (training), timed in interleaved rounds in one process.
Issue 9 asks float64 to take at most 2.0x float32's time.

    python bench/float64.py                            # LSTM, GRU, RNN at (256, 256, 100, 64)
    python bench/float64.py --cells lstm -I 512 -H 512 -T 50 -B 8 --rounds 9

Each round times every (cell, mode, dtype) for --seconds, median of its calls;
the table gives the median over rounds and the ratio of those medians, with the
range of the per-round ratios.
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

MODULES = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN"}


def calls(cell, I, H, T, B, dtype):
    """{"forward": f, "train": f}: closures running one layer of `dtype`."""
    layer = getattr(fastrnn, MODULES[cell])(I, H, seed=0, dtype=dtype)
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(dtype)   # (T, B, I)
    dy = np.ones((T, B, H), dtype)                                           # (T, B, H)

    def forward():
        layer.eval()
        layer(x)

    def train():
        layer.train()
        layer(x)
        layer.backward(dy)
        layer.zero_grad()

    return {"forward": forward, "train": train}


def median_ms(fn, seconds):
    """Median of repeated calls of fn over `seconds` (at least 3 calls), in ms."""
    times = []
    end = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default="lstm,gru,rnn_tanh")
    ap.add_argument("-I", type=int, default=256)
    ap.add_argument("-H", type=int, default=256)
    ap.add_argument("-T", type=int, default=100)
    ap.add_argument("-B", type=int, default=64)
    ap.add_argument("--modes", default="forward,train")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5, help="timing per case per round")
    args = ap.parse_args(argv)
    cells = args.cells.split(",")
    modes = args.modes.split(",")
    for cell in cells:
        if cell not in MODULES:
            ap.error(f"--cells: expected some of {sorted(MODULES)}, got {cell!r}")
    for mode in modes:
        if mode not in ("forward", "train"):
            ap.error(f"--modes: expected forward and/or train, got {mode!r}")
    info = fastrnn.config()
    print(f"# {info.get('cpu', '?')}, ISA {info.get('isa', '?')}, "
          f"{fastrnn.get_num_threads()} threads; (I, H, T, B) = "
          f"({args.I}, {args.H}, {args.T}, {args.B}); {args.rounds} interleaved rounds")
    fns = {(c, d): calls(c, args.I, args.H, args.T, args.B, d)
           for c in cells for d in (np.float32, np.float64)}
    for f in fns.values():          # warm up: packed weights, kept buffers
        for m in modes:
            f[m]()
    ms = {}
    for _ in range(args.rounds):
        for c in cells:
            for m in modes:
                for d in (np.float32, np.float64):
                    ms.setdefault((c, m, d), []).append(median_ms(fns[c, d][m], args.seconds))
    print(f"{'cell':9s} {'mode':8s} {'float32 ms':>11s} {'float64 ms':>11s} {'ratio':>6s}  per round")
    for c in cells:
        for m in modes:
            a, b = np.array(ms[c, m, np.float32]), np.array(ms[c, m, np.float64])
            r = b / a
            print(f"{c:9s} {m:8s} {np.median(a):11.4g} {np.median(b):11.4g} "
                  f"{np.median(b) / np.median(a):6.2f}  {r.min():.2f}-{r.max():.2f}")


if __name__ == "__main__":
    main()
