"""Shapes off the benchmark grid: fastrnn against torch.nn at small batches and hidden
sizes that are not multiples of the kernels' tiles, where a helper's scan of 153
shapes found fastrnn at 0.56-0.73x torch in session 36 (fixed that session).

    python bench/odd_shapes.py                       # the scan's cliff rows, eval and train
    python bench/odd_shapes.py --configs LSTM:300:513:3:100,GRU:64:700:2:50 --rounds 15

A config is CELL:I:H:B:T (CELL LSTM, GRU or RNN). The engines are `fastrnn bench`'s
(fastrnn.benchmark.engines: same weights, same input, same threads, 2 unless
--threads; the inference modules frozen, as the runner's), and torch's outputs and
every gradient are checked against fastrnn's first. Eval forward (torch in inference
mode) and a training step (forward and backward) are timed interleaved with a quiet
gap before each sample; medians, and torch ms / fastrnn ms (above 1: fastrnn faster).
A benchmark, not a test: needs torch (pip install torch==2.13.0).
"""

import argparse
import sys

from fastrnn.benchmark import common
from fastrnn.benchmark.engines import Case, FastrnnEngine, TorchEngine
from fastrnn.benchmark.timing import set_threads, time_interleaved

# the session-36 scan's cliff rows (before its fixes: 0.56-0.73x torch) and a near miss
DEFAULT = ("LSTM:300:513:3:100,LSTM:300:520:8:100,LSTM:300:385:8:100,"
           "LSTM:1000:1000:1:100,GRU:1024:1000:1:100,RNN:13:1025:3:100")
CELLS = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn_tanh"}
MODES = {"eval": "forward", "train": "train"}   # this script's names -> the runner's


def parse_configs(text):
    """'CELL:I:H:B:T,...' -> [(cell, I, H, B, T)]; ValueError naming the bad one."""
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if (len(parts) != 5 or parts[0].upper() not in CELLS
                or not all(p.isdigit() and int(p) >= 1 for p in parts[1:])):
            raise ValueError(f"--configs: expected CELL:I:H:B:T (CELL LSTM, GRU or RNN, "
                             f"sizes >= 1), got {item!r}")
        out.append((parts[0].upper(),) + tuple(int(p) for p in parts[1:]))
    return out


def engines(cell, I, H, B, T, mode):
    """[fastrnn's engine, torch's] for one config and mode ("eval" or "train"), run once
    and checked against each other (SystemExit on a mismatch)."""
    case = Case(CELLS[cell], MODES[mode], I, H, T, B)
    data = case.make_data()
    es = [FastrnnEngine(case, *data), TorchEngine(case, *data)]
    for e in es:
        e.run()
    ok, key, err, _ = common.compare(es[1].results(), es[0].results(),
                                     common.TOLERANCE[case.np_dtype])
    if not ok:
        raise SystemExit(f"{case.label()}: fastrnn and torch disagree on {key}: rel. error "
                         f"{err:.2e}")
    return es


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
    import fastrnn
    cfg = fastrnn.config()
    print(f"# {cfg.get('cpu', '?')}, ISA {cfg.get('isa', '?')}, {args.threads} threads; "
          f"ms medians of {args.rounds} interleaved samples", flush=True)
    print(f"{'config':34s} {'mode':5s} {'fastrnn':>9s} {'torch':>9s} {'torch/fastrnn':>13s}")
    with set_threads(args.threads, ("torch",)):
        for cell, I, H, B, T in configs:
            for mode in ("eval", "train"):
                if mode not in modes:
                    continue
                es = engines(cell, I, H, B, T, mode)
                res = time_interleaved(es, budget=None, repeats=args.rounds)
                f, t = res["fastrnn"][0], res["torch"][0]
                name = f"{cell} I={I} H={H} B={B} T={T}"
                print(f"{name:34s} {mode:5s} {f * 1e3:9.4g} {t * 1e3:9.4g} {t / f:12.2f}x",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
