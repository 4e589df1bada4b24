"""Small int8 calls, where per-call work around the kernel shows: a one-step call of a
quantised LSTM at batch 1, and a StreamPool step of a few streams out of many open.

    python bench/quantized_small_calls.py
    python bench/quantized_small_calls.py -H 512 --capacity 4096 --streams 16

Each figure is the median of --samples samples of --calls back-to-back calls, in
microseconds a call. Until session 33 every int8 call summed its inputs and initial
states to look for NaN, and a pool passes its whole state table as the states.
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


def median_us(fn, calls, samples):
    """Median over `samples` of the mean time of `calls` back-to-back calls, in us."""
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return float(np.median(times)) * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-I", type=int, default=64, help="input size of the pool's model")
    ap.add_argument("-H", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2, help="layers of the pool's model")
    ap.add_argument("--capacity", type=int, default=1024, help="streams the pool holds")
    ap.add_argument("--streams", type=int, default=8, help="streams stepped per call")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--samples", type=int, default=7)
    args = ap.parse_args(argv)
    for name in ("I", "H", "layers", "capacity", "streams", "calls", "samples"):
        if getattr(args, name) < 1:
            option = f"-{name}" if len(name) == 1 else f"--{name}"
            ap.error(f"{option}: expected an integer >= 1, got {getattr(args, name)}")
    if args.streams > args.capacity:
        ap.error(f"--streams: expected at most --capacity ({args.capacity}), got {args.streams}")
    info = fastrnn.config()
    print(f"# {info.get('cpu', '?')}, ISA {info.get('isa', '?')}, "
          f"{fastrnn.get_num_threads()} threads; int8, mode auto")
    rng = np.random.default_rng(0)
    H = args.H

    q = fastrnn.quantize(fastrnn.LSTM(H, H, seed=0).eval(), "int8")
    x = rng.standard_normal((1, 1, H)).astype(np.float32)                    # (T, B, I)
    state = (np.zeros((1, 1, H), np.float32), np.zeros((1, 1, H), np.float32))
    for _ in range(100):
        q(x, state)
    one = median_us(lambda: q(x, state), args.calls, args.samples)

    qp = fastrnn.quantize(fastrnn.LSTM(args.I, H, num_layers=args.layers, seed=0).eval(),
                          "int8")
    pool = fastrnn.StreamPool(qp, args.capacity)
    ids = [pool.open() for _ in range(args.streams)]
    xs = rng.standard_normal((args.streams, args.I)).astype(np.float32)     # (n, I)
    for _ in range(20):
        pool.step(ids, xs)
    step = median_us(lambda: pool.step(ids, xs), args.calls, args.samples)

    print(f"{'call':58s} {'us':>8s}")
    print(f"{f'LSTM({H}, {H}) one step, batch 1':58s} {one:8.1f}")
    print(f"{f'StreamPool of LSTM({args.I}, {H}, layers={args.layers}), {args.streams} of {args.capacity} streams':58s} "
          f"{step:8.1f}")


if __name__ == "__main__":
    main()
