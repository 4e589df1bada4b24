"""Shapes off the benchmark grid: fastrnn against torch.nn at small batches and hidden
sizes that are not multiples of the kernels' tiles, where a helper's scan of 153
shapes found fastrnn at 0.56-0.73x torch in session 36 (fixed that session).

    python bench/odd_shapes.py                       # the scan's cliff rows, eval and train
    python bench/odd_shapes.py --configs LSTM:300:513:3:100,GRU:64:700:2:50 --rounds 15

A config is CELL:I:H:B:T (CELL LSTM, GRU or RNN). Same weights (fastrnn.from_torch),
same input, same threads (2 unless --threads); the outputs are checked against
torch's first. Eval forward (torch under no_grad) and a training step (forward and
backward) are timed interleaved with a quiet gap before each sample; medians, and
torch ms / fastrnn ms (above 1: fastrnn faster). A benchmark, not a test: needs torch
(pip install torch==2.13.0).
"""

import argparse
import sys

import numpy as np

import fastrnn
from fastrnn.benchmark.timing import set_threads, time_interleaved

# the session-36 scan's cliff rows (before its fixes: 0.56-0.73x torch) and a near miss
DEFAULT = ("LSTM:300:513:3:100,LSTM:300:520:8:100,LSTM:300:385:8:100,"
           "LSTM:1000:1000:1:100,GRU:1024:1000:1:100,RNN:13:1025:3:100")


class Engine:
    def __init__(self, name, run):
        self.name, self.run = name, run


def parse_configs(text):
    """'CELL:I:H:B:T,...' -> [(cell, I, H, B, T)]; ValueError naming the bad one."""
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if (len(parts) != 5 or parts[0].upper() not in ("LSTM", "GRU", "RNN")
                or not all(p.isdigit() and int(p) >= 1 for p in parts[1:])):
            raise ValueError(f"--configs: expected CELL:I:H:B:T (CELL LSTM, GRU or RNN, "
                             f"sizes >= 1), got {item!r}")
        out.append((parts[0].upper(),) + tuple(int(p) for p in parts[1:]))
    return out


def engines(cell, I, H, B, T, seed=0):
    """(eval engines, training engines) for fastrnn and torch on the same weights."""
    import torch
    torch.manual_seed(seed)
    tm = getattr(torch.nn, cell)(I, H)
    fm = fastrnn.from_torch(tm)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    xg = xt.clone().requires_grad_(True)

    def f_eval():
        fm.eval()
        return fm(x)[0]

    def t_eval():
        tm.eval()
        with torch.no_grad():
            return tm(xt)[0]

    def f_train():
        fm.train()
        fm.zero_grad()
        out, _ = fm(x)
        return out, fm.backward(dy)[0]

    def t_train():
        tm.train()
        xg.grad = None
        tm.zero_grad()
        out, _ = tm(xg)
        out.backward(dyt)
        return out, xg.grad

    a, b = f_eval(), t_eval().numpy()
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
    if err > 2e-3:
        raise SystemExit(f"{cell} ({I}, {H}, {B}, {T}): fastrnn and torch disagree, "
                         f"rel. error {err:.2e}")
    return ([Engine("fastrnn", f_eval), Engine("torch", t_eval)],
            [Engine("fastrnn", f_train), Engine("torch", t_train)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default=DEFAULT, help="CELL:I:H:B:T, comma-separated")
    p.add_argument("--modes", default="eval,train", help="eval, train or both")
    p.add_argument("--threads", type=int, default=2, help="threads for both engines")
    p.add_argument("--rounds", type=int, default=9, help="interleaved samples per engine")
    args = p.parse_args(argv)
    try:
        configs = parse_configs(args.configs)
    except ValueError as e:
        p.error(str(e))
    modes = [m.strip() for m in args.modes.split(",")]
    if not modes or any(m not in ("eval", "train") for m in modes):
        p.error(f"--modes: expected eval, train or both, got {args.modes!r}")
    if args.threads < 1 or args.rounds < 1:
        p.error("--threads and --rounds: expected integers >= 1")
    try:
        import torch  # noqa: F401
    except ImportError:
        print("bench/odd_shapes.py needs torch (pip install torch==2.13.0)", file=sys.stderr)
        return 2
    cfg = fastrnn.config()
    print(f"# {cfg.get('cpu', '?')}, ISA {cfg.get('isa', '?')}, {args.threads} threads; "
          f"ms medians of {args.rounds} interleaved samples", flush=True)
    print(f"{'config':34s} {'mode':5s} {'fastrnn':>9s} {'torch':>9s} {'torch/fastrnn':>13s}")
    with set_threads(args.threads, ("torch",)):
        for cell, I, H, B, T in configs:
            ev, tr = engines(cell, I, H, B, T)
            for mode, es in (("eval", ev), ("train", tr)):
                if mode not in modes:
                    continue
                for e in es:
                    e.run()
                res = time_interleaved(es, budget=None, repeats=args.rounds)
                f, t = res["fastrnn"][0], res["torch"][0]
                name = f"{cell} I={I} H={H} B={B} T={T}"
                print(f"{name:34s} {mode:5s} {f * 1e3:9.4g} {t * 1e3:9.4g} {t / f:12.2f}x",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
