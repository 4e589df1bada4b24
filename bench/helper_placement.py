"""Two threads that should run side by side after the process has idled: a helper
thread started per call (threading.Thread) against a kept helper that steps off its
caller's CPU (fastrnn._placement.Beside, what a bidirectional layer's training runs
its reverse direction on). Each round sleeps --gap seconds, then the caller and the
helper each run the same one-thread RNN forward at once; the round's time is the
slower of the two. Rounds alternate between the two ways, in one process.

    python bench/helper_placement.py                  # 40 rounds each, 0.15 s idle
    python bench/helper_placement.py --rounds 20 --gap 0.05

A round well over one forward's time means the two shared a CPU (Linux started or
woke the helper on its caller's CPU and had not yet moved one of them).
"""

import argparse
import os
import sys
import threading
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # measure the checkout, not some installed copy
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn import _placement  # noqa: E402
from fastrnn import functional as F  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40, help="rounds of each way")
    ap.add_argument("--gap", type=float, default=0.15, help="idle seconds before each round")
    ap.add_argument("-H", type=int, default=256, help="input and hidden size (T=100, B=32)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds: expected >= 1, got {args.rounds}")
    if args.gap < 0:
        ap.error(f"--gap: expected >= 0, got {args.gap}")
    m = fastrnn.RNN(args.H, args.H, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((100, 32, args.H)).astype(np.float32)

    def work():
        with F.thread_share(1):
            t0 = time.perf_counter()
            m(x)
            return (time.perf_counter() - t0) * 1e3

    def per_call():
        box = {}
        th = threading.Thread(target=lambda: box.__setitem__("ms", work()))
        th.start()
        mine = work()
        th.join()
        return max(mine, box["ms"])

    def kept():
        helper = _placement.Beside(work)
        mine = work()
        return max(mine, helper.result())

    # the baseline first, apart: the same forward after the same idle, no helper. (Rounds
    # of it interleaved with the others changed where Linux then woke the helpers: with
    # them, both ways shared a CPU in most rounds on the Xeon guest.)
    times = {"caller alone": []}
    for _ in range(args.rounds):
        time.sleep(args.gap)
        times["caller alone"].append(work())
    alone = float(np.median(times["caller alone"]))
    ways = {"thread per call": per_call, "kept, steps aside": kept}
    for name, fn in ways.items():
        fn()
        times[name] = []
    for r in range(args.rounds):
        for name in (list(ways) if r % 2 else list(ways)[::-1]):
            time.sleep(args.gap)
            times[name].append(ways[name]())
    info = fastrnn.config()
    print(f"# {info.get('cpu', '?')}, ISA {info.get('isa', '?')}; {args.rounds} rounds "
          f"each after {args.gap} s idle (the two ways interleaved); medians")
    print(f"{'way':<20} {'median ms':>10} {'rounds over 1.5x alone':>24}")
    for name, ms in times.items():
        ms = np.array(ms)
        print(f"{name:<20} {np.median(ms):>10.2f} {int(np.sum(ms > 1.5 * alone)):>18} / {len(ms)}")


if __name__ == "__main__":
    main()
