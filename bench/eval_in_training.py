"""Eval calls inside a training loop: what a model evaluated between weight updates
costs (docs/inference.md).

    python bench/eval_in_training.py --case update     # eval after each weight update
    python bench/eval_in_training.py --case steps      # single steps right after training

update: an LSTM layer in eval mode whose W_ih and W_hh change before every call (as
after an optimiser step): the median extra time of that call over the call after it
(which finds the packed weights kept), and the packed copies the cache holds after
--rounds updates, with the process's peak RSS.
steps: an LSTM layer's training step (forward and backward, OpenMP), then --steps
LSTMCell eval steps timed one by one: their total, median and slowest, per round.
"""

import argparse
import os
import resource
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # measure the checkout, not some installed copy
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn import _recurrent  # noqa: E402


def after_update(H, T, B, rounds):
    m = fastrnn.LSTM(H, H, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((T, B, H)).astype(np.float32)
    for _ in range(3):
        m(x)
    extra = []
    for _ in range(rounds):
        m.weight_ih_l0.data[0, 0] += np.float32(1e-3)
        m.weight_hh_l0.data[0, 0] += np.float32(1e-3)
        t0 = time.perf_counter()
        m(x)
        t1 = time.perf_counter()
        m(x)
        t2 = time.perf_counter()
        extra.append(((t1 - t0) - (t2 - t1)) * 1e3)
    copies, nbytes = _recurrent._pack_cache_stats()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KB on Linux
    print(f"LSTM I=H={H} T={T} B={B}, weights changed before each of {rounds} calls: "
          f"extra {np.median(extra):.2f} ms (p25 {np.percentile(extra, 25):.2f}, "
          f"p75 {np.percentile(extra, 75):.2f}); kept {copies} packed copies, "
          f"{nbytes / 2**20:.0f} MB; peak RSS {rss:.0f} MB")


def steps_after_training(H, steps, rounds):
    cell = fastrnn.LSTMCell(H, H, seed=0).eval()
    layer = fastrnn.LSTM(H, H, seed=0)
    x1 = np.random.default_rng(0).standard_normal((1, H)).astype(np.float32)
    state = (np.zeros((1, H), np.float32),) * 2
    xb = np.random.default_rng(1).standard_normal((20, 4, H)).astype(np.float32)
    dy = np.ones((20, 4, H), np.float32)

    def train():
        y, _ = layer(xb)
        layer.backward(dy)
        layer.zero_grad()

    for _ in range(20):
        cell(x1, state)
    for _ in range(5):
        train()
    t = np.zeros((rounds, steps))
    for r in range(rounds):
        train()
        for i in range(steps):
            t0 = time.perf_counter()
            cell(x1, state)
            t[r, i] = time.perf_counter() - t0
    t *= 1e6
    print(f"{steps} LSTMCell H={H} eval steps right after an LSTM I=H={H} T=20 B=4 "
          f"training step, {rounds} rounds: total {np.median(t.sum(1)) / 1e3:.2f} ms "
          f"(median round), step median {np.median(t):.1f} us, slowest {t.max():.0f} us")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=("update", "steps"), default="update")
    ap.add_argument("-H", type=int, default=None, help="hidden size (update 1024, steps 256)")
    ap.add_argument("-T", type=int, default=25, help="steps of the update case's calls")
    ap.add_argument("-B", type=int, default=16, help="batch of the update case's calls")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=200, help="eval steps per round (steps)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for opt in ("T", "B", "rounds", "steps", "threads"):
        if getattr(args, opt) < 1:
            ap.error(f"-{opt if len(opt) == 1 else '-' + opt}: expected >= 1, "
                     f"got {getattr(args, opt)}")
    if args.H is not None and args.H < 1:
        ap.error(f"-H: expected >= 1, got {args.H}")
    info = fastrnn.config()
    print(f"# {info.get('cpu', '?')}, ISA {info.get('isa', '?')}, {args.threads} threads")
    old = fastrnn.get_num_threads()
    fastrnn.set_num_threads(args.threads)
    try:
        if args.case == "update":
            after_update(args.H or 1024, args.T, args.B, args.rounds)
        else:
            steps_after_training(args.H or 256, args.steps, args.rounds)
    finally:
        fastrnn.set_num_threads(old)


if __name__ == "__main__":
    main()
