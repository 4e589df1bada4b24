"""Packed weights kept between eval calls (src/pack_cache.h): what they save.

In one process, interleaved, each eval layer call timed with the cache on (the
default: the packed W_ih / W_hh slices of the previous call are found by the
weights' digest) and off (packed on every call, as before the cache). Medians of
the rounds, each round as many calls as fit in 0.3 s.

    python bench/pack_cache.py [--rounds 7]
"""

import argparse
import time

import numpy as np

import fastrnn
from fastrnn import _recurrent

# (cell, I, H, T, B): the default grid's small-batch and H=1024 rows, one large batch
CONFIGS = [("LSTM", 512, 512, 50, 2), ("LSTM", 512, 512, 50, 4), ("LSTM", 512, 512, 50, 8),
           ("LSTM", 256, 256, 100, 1), ("LSTM", 1024, 1024, 25, 16), ("LSTM", 256, 256, 100, 64),
           ("GRU", 512, 512, 50, 2), ("GRU", 1024, 1024, 25, 16), ("GRU", 256, 256, 100, 1),
           ("RNN", 512, 512, 50, 2)]


def per_call(module, x, seconds=0.3):
    module(x)
    n, t0 = 0, time.perf_counter()
    while True:
        module(x)
        n += 1
        if time.perf_counter() - t0 > seconds:
            return (time.perf_counter() - t0) / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    cfg = fastrnn.config()
    print(f"CPU {cfg['cpu']}, ISA {cfg['isa']}, {cfg['num_threads']} threads; eval calls, ms")
    try:
        for cell, I, H, T, B in CONFIGS:
            m = getattr(fastrnn, cell)(I, H, seed=0).eval()
            x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
            times = {True: [], False: []}
            for _ in range(args.rounds):
                for on in (True, False):
                    _recurrent._pack_cache_enable(on)
                    times[on].append(per_call(m, x))
            kept, packed = (np.median(times[on]) * 1e3 for on in (True, False))
            print(f"{cell} (I={I}, H={H}, T={T}, B={B}): kept {kept:.3f}, packed per call "
                  f"{packed:.3f}, {packed / kept:.2f}x", flush=True)
    finally:
        _recurrent._pack_cache_enable(True)


if __name__ == "__main__":
    main()
