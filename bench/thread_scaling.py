"""Thread scaling of a training step: LSTM forward+backward with 1 and with N threads.

    python bench/thread_scaling.py                 # I=256 H=256 T=100 B=64, 1 vs 2 threads
    python bench/thread_scaling.py --cell gru -B 32 --threads 4

Checks first that the 1-thread and the N-thread results are bitwise identical,
then times both, interleaved (median of --repeats after a warm-up), and prints
the speed-up. A benchmark, not a test: shared machines make timings noisy.
"""

import argparse
import time

import numpy as np

import fastrnn
from fastrnn import functional as F

GATES = {"rnn_tanh": 1, "lstm": 4, "gru": 3}


def make_step(cell, I, H, T, B, seed=0):
    """A function running one forward+backward and returning every output and gradient."""
    rng = np.random.default_rng(seed)
    G = GATES[cell]
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    w_ih = (rng.standard_normal((G * H, I)) / np.sqrt(H)).astype(np.float32)
    w_hh = (rng.standard_normal((G * H, H)) / np.sqrt(H)).astype(np.float32)
    b = np.zeros(G * H, np.float32)
    dy = rng.standard_normal((T, B, H)).astype(np.float32)

    def step():
        if cell == "lstm":
            y, h, c, cache = F.lstm_forward(x, None, None, w_ih, w_hh, b, b)
            return (y, h, c) + F.lstm_backward(dy, None, None, cache)
        if cell == "gru":
            y, h, cache = F.gru_forward(x, None, w_ih, w_hh, b, b)
            return (y, h) + F.gru_backward(dy, None, cache)
        y, h, cache = F.rnn_forward(x, None, w_ih, w_hh, b, b, "tanh")
        return (y, h) + F.rnn_backward(dy, None, cache)
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", choices=sorted(GATES), default="lstm")
    p.add_argument("-I", type=int, default=256)
    p.add_argument("-H", type=int, default=256)
    p.add_argument("-T", type=int, default=100)
    p.add_argument("-B", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    step = make_step(args.cell, args.I, args.H, args.T, args.B)
    before = fastrnn.get_num_threads()
    try:
        fastrnn.set_num_threads(1)
        one = step()
        fastrnn.set_num_threads(args.threads)
        many = step()
        identical = all(np.array_equal(a, b) for a, b in zip(one, many))
        times = {1: [], args.threads: []}
        for _ in range(args.repeats):
            for n in times:
                fastrnn.set_num_threads(n)
                t0 = time.perf_counter()
                step()
                times[n].append(time.perf_counter() - t0)
    finally:
        fastrnn.set_num_threads(before)
    t1 = float(np.median(times[1]))
    tn = float(np.median(times[args.threads]))
    flop = 3 * 2 * args.T * args.B * GATES[args.cell] * args.H * (args.I + args.H)
    print(f"{args.cell} train (I={args.I}, H={args.H}, T={args.T}, B={args.B}): "
          f"1 thread {t1 * 1e3:.1f} ms ({flop / t1 / 1e9:.0f} GFLOP/s), "
          f"{args.threads} threads {tn * 1e3:.1f} ms ({flop / tn / 1e9:.0f} GFLOP/s), "
          f"speed-up {t1 / tn:.2f}x, results bitwise identical: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
