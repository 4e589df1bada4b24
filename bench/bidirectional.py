"""A bidirectional layer's two directions run one after the other (every thread
on each in turn) against both at once (each on its share of the threads):
inference and training (forward + backward), medians of interleaved rounds in
one process. The numbers behind the rule in fastrnn.modules.rnn (_at_once).

    python bench/bidirectional.py                         # LSTM, GRU, RNN; H 128-512; B 1-64
    python bench/bidirectional.py --cells lstm --hidden 256 --batches 8,32 --rounds 9

I = H; T = 100 (50 at H >= 512). "at once / in turn" below 1: at once is faster.
"default" says which the layer picks by itself for that call.
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
import fastrnn.modules.rnn as rnn_module  # noqa: E402

MODULES = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN"}
DEFAULT_RULE = rnn_module._at_once


def layer_call(cell, H, B, T, mode):
    """A closure running one inference call or one training step of a fresh
    bidirectional layer (I = H), and the layer."""
    layer = getattr(fastrnn, MODULES[cell])(H, H, bidirectional=True, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, H)).astype(np.float32)         # (T, B, I)
    dout = rng.standard_normal((T, B, 2 * H)).astype(np.float32)  # (T, B, 2H)
    if mode == "eval":
        layer.eval()
        return (lambda: layer(x)), layer
    layer.train()

    def step():
        layer.zero_grad()
        layer(x)
        layer.backward(dout)
    return step, layer


def forced(at_once):
    """Make every bidirectional call run its directions at once (True) or in turn."""
    rnn_module._at_once = lambda *args: at_once


def measure(call, rounds, reps):
    """Medians (ms) of in-turn and at-once runs, `rounds` interleaved rounds of
    `reps` calls each (median per round, then the median of the rounds)."""
    out = {"in turn": [], "at once": []}
    for _ in range(rounds):
        for name, at_once in (("in turn", False), ("at once", True)):
            forced(at_once)
            call()                                   # warm-up after the switch
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                call()
                ts.append(time.perf_counter() - t)
            out[name].append(float(np.median(ts)) * 1e3)
    return {k: float(np.median(v)) for k, v in out.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="lstm,gru,rnn_tanh")
    p.add_argument("--hidden", default="128,256,512")
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--modes", default="eval,train")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--reps", type=int, default=9, help="timed calls per round")
    args = p.parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    for c in cells:
        if c not in MODULES:
            raise SystemExit(f"--cells: unknown cell {c!r} (expected {', '.join(MODULES)})")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("eval", "train"):
            raise SystemExit(f"--modes: unknown mode {m!r} (expected eval, train)")
    hiddens = [int(h) for h in args.hidden.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    fastrnn.set_num_threads(args.threads)
    fc = fastrnn.config()
    print(f"{fc.get('cpu')}, ISA {fc.get('isa')}, {args.threads} threads; I = H, "
          f"T = 100 (50 at H >= 512); medians of {args.rounds} interleaved rounds of "
          f"{args.reps} calls, ms")
    print(f"{'cell':9}{'mode':7}{'H':>5}{'B':>5}{'in turn':>10}{'at once':>10}"
          f"{'at once / in turn':>19}{'default':>10}")
    try:
        for mode in modes:
            for cell in cells:
                for H in hiddens:
                    T = 50 if H >= 512 else 100
                    for B in batches:
                        call, layer = layer_call(cell, H, B, T, mode)
                        med = measure(call, args.rounds, args.reps)
                        picks = "at once" if DEFAULT_RULE(2, T, layer._step_flop(B),
                                                          mode == "train") else "in turn"
                        print(f"{cell:9}{mode:7}{H:5d}{B:5d}{med['in turn']:10.3f}"
                              f"{med['at once']:10.3f}{med['at once'] / med['in turn']:19.2f}"
                              f"{picks:>10}", flush=True)
    finally:
        rnn_module._at_once = DEFAULT_RULE


if __name__ == "__main__":
    main()
