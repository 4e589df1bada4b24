"""A call right after a NumPy matmul: what an inference pipeline that does its own
NumPy work between model calls sees. NumPy's OpenBLAS keeps its worker threads
spinning for about 0.1 s after a threaded matmul, never yielding, so one of the
machine's CPUs is taken when the next call starts. Each trial, per engine
(interleaved): a quiet call (0.2 s idle, one untimed call, then the timed one), then
a 512 x 512 matmul and the timed call right after it.

    python bench/after_numpy.py                            # LSTM and GRU, I=H=512, T=50, B=2 and 8
    python bench/after_numpy.py --cells lstm -B 2 --trials 40 --peers none
    python bench/after_numpy.py --mode train               # training steps (forward + backward)

fastrnn's eval calls run on their own worker pool (src/team_pool.h): a team whose
thread waits milliseconds for a teammate has lost a CPU, stops at that step and
the caller finishes alone, and calls run alone for a while after. Training steps
(--mode train) run on OpenMP teams, which have no such rule (session 29, 2-core
Xeon: LSTM I=H=512 T=50 B=2 8.7 ms quiet, 17.4 after a matmul, p90 110). fastrnn
runs at 1 and --threads threads, the peers (if installed, and able to train) at
--threads.
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
from bench.idle_latency import (cells_arg, engines_for, peers_arg, set_threads,  # noqa: E402
                                warm_up)
from fastrnn.benchmark.engines import Case  # noqa: E402

def measure(engines, peers, trials, quiet_s, a, b):
    """{label: (quiet call ms list, call-after-matmul ms list)}, engines interleaved."""
    res = {label: ([], []) for label, _, _ in engines}
    warm_up(engines, peers)
    for _ in range(trials):
        for label, run, n in engines:
            set_threads(n, peers)
            time.sleep(quiet_s)
            run()
            t0 = time.perf_counter()
            run()
            t1 = time.perf_counter()
            np.matmul(a, b)
            t2 = time.perf_counter()
            run()
            t3 = time.perf_counter()
            res[label][0].append((t1 - t0) * 1e3)
            res[label][1].append((t3 - t2) * 1e3)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default="lstm,gru")
    ap.add_argument("-H", type=int, default=512, help="input and hidden size")
    ap.add_argument("-T", type=int, default=50, help="steps")
    ap.add_argument("-B", default="2,8", help="batch sizes, comma-separated")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--mode", default="forward", choices=("forward", "train"),
                    help="forward: eval calls (default); train: forward + backward steps")
    ap.add_argument("--quiet", type=float, default=0.2,
                    help="idle seconds before the quiet call: longer than OpenBLAS's "
                         "workers spin after a matmul (~0.1 s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", default="auto",
                    help="auto (whichever of torch, onnxruntime import), none, or a list")
    args = ap.parse_args(argv)
    cells = cells_arg(ap, args.cells)
    try:
        batches = [int(v) for v in args.B.split(",")]
    except ValueError:
        ap.error(f"-B: expected comma-separated integers, got {args.B!r}")
    if not args.quiet >= 0:
        ap.error(f"--quiet: expected >= 0, got {args.quiet}")
    for opt, value in (("-H", args.H), ("-T", args.T), ("--trials", args.trials),
                       ("--threads", args.threads)) + tuple(("-B", v) for v in batches):
        if value < 1:
            ap.error(f"{opt}: expected >= 1, got {value}")
    peers = peers_arg(ap, args.peers)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512)).astype(np.float32)
    b = rng.standard_normal((512, 512)).astype(np.float32)
    info = fastrnn.config()
    print(f"# {info.get('cpu', '?')}, ISA {info.get('isa', '?')}; numpy {np.__version__}; "
          f"{args.trials} trials; median (p10-p90) ms")
    print(f"{'case':<34} {'engine':<16} {'quiet':>22} {'after a NumPy matmul':>24}")
    old = fastrnn.get_num_threads()
    try:
        for cell in cells:
            for B in batches:
                case = Case(cell, args.mode, args.H, args.H, args.T, B)
                engines = engines_for(case, args.threads, peers)
                res = measure(engines, peers, args.trials, args.quiet, a, b)
                for label, _, _ in engines:
                    quiet, after = (np.percentile(v, [50, 10, 90]) for v in res[label])
                    print(f"{case.label():<34} {label:<16} "
                          f"{quiet[0]:>9.3f} ({quiet[1]:.3f}-{quiet[2]:.3f}) "
                          f"{after[0]:>11.3f} ({after[1]:.3f}-{after[2]:.3f})", flush=True)
    finally:
        fastrnn.set_num_threads(old)


if __name__ == "__main__":
    main()
