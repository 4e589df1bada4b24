"""The first call after the process has been idle: what a service that receives one
small request at a time sees. Each trial sleeps --gap seconds, then times one call
("first") and the call right after it ("next"), engine after engine (interleaved).

    python bench/idle_latency.py                          # LSTM step and sequence, 0.15 s idle
    python bench/idle_latency.py --cells lstm,gru --gap 0.02 --trials 40
    python bench/idle_latency.py -T 1 --precision medium  # layers' GEMMs on bf16
    python bench/idle_latency.py -H 512 -T 50 -B 8 --bidirectional
    python bench/idle_latency.py -H 512 -T 50 -B 8 --lengths --peers none

A thread team's workers go to sleep when idle; on a virtual machine the idle vCPU
must then be scheduled again by the host before a worker can run. fastrnn's eval
calls never wait for that (src/team_pool.h): a call starts alone and a worker joins
when it is awake. fastrnn runs at 1 and --threads threads, the peers (if installed)
at --threads.
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
from fastrnn.benchmark.engines import ENGINES, Case, EngineUnavailable, available_peers  # noqa: E402


def engines_for(case, threads, peers, lengths=None):
    """[(label, run, threads)]: fastrnn at 1 and `threads` threads, then each peer.
    lengths (B,): fastrnn's layer is called with them (rows of different lengths)."""
    data = case.make_data()
    out = []
    fr = ENGINES["fastrnn"](case, *data)
    run = fr.run
    if lengths is not None:
        x = data[1]

        def run():
            fr.module(x, None, lengths)
    for n in sorted({1, threads}):
        out.append((f"fastrnn {n}t", run, n))
    for name in peers:
        try:
            kw = {"threads": threads} if name == "onnxruntime" else {}
            eng = ENGINES[name](case, *data, **kw)
        except EngineUnavailable as exc:
            print(f"# {name} skipped: {exc}")
            continue
        out.append((f"{name} {threads}t", eng.run, threads))
    return out


def set_threads(n, peers):
    fastrnn.set_num_threads(n)
    if "torch" in peers:
        import torch
        torch.set_num_threads(n)


def warm_up(engines, peers):
    """Three untimed calls of each engine: packing, plans, sessions."""
    for label, run, n in engines:
        set_threads(n, peers)
        for _ in range(3):
            run()


def cells_arg(ap, text):
    """--cells as a list, or an argparse error naming it."""
    cells = text.split(",")
    for cell in cells:
        if cell not in ("lstm", "gru", "rnn_tanh"):
            ap.error(f"--cells: expected some of gru, lstm, rnn_tanh, got {cell!r}")
    return cells


def peers_arg(ap, text):
    """--peers as a list of peer names (auto: whichever import), or an argparse error."""
    if text == "auto":
        return available_peers()
    if text == "none":
        return []
    peers = text.split(",")
    for p in peers:
        if p not in ("torch", "onnxruntime"):
            ap.error(f"--peers: expected auto, none or some of onnxruntime, torch, got {p!r}")
    return peers


def measure(engines, peers, gap, trials):
    """{label: (first call ms list, next call ms list)}, engines interleaved per trial."""
    res = {label: ([], []) for label, _, _ in engines}
    warm_up(engines, peers)
    for _ in range(trials):
        for label, run, n in engines:
            set_threads(n, peers)
            time.sleep(gap)
            t0 = time.perf_counter()
            run()
            t1 = time.perf_counter()
            run()
            t2 = time.perf_counter()
            res[label][0].append((t1 - t0) * 1e3)
            res[label][1].append((t2 - t1) * 1e3)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default="lstm")
    ap.add_argument("-H", type=int, default=256, help="input and hidden size")
    ap.add_argument("-T", type=int, default=100, help="steps of the sequence case")
    ap.add_argument("-B", type=int, default=1, help="batch of the sequence case")
    ap.add_argument("--gap", type=float, default=0.15, help="idle seconds before each trial")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", default="auto",
                    help="auto (whichever of torch, onnxruntime import), none, or a list")
    ap.add_argument("--bidirectional", action="store_true",
                    help="the sequence case's layer is bidirectional")
    ap.add_argument("--lengths", action="store_true",
                    help="the sequence case's rows have lengths drawn uniformly from [1, T] "
                         "(seeded; the longest is T); fastrnn only (needs --peers none)")
    ap.add_argument("--precision", default="highest", choices=("highest", "high", "medium"),
                    help="fastrnn's float32 matmul precision; at medium a layer's GEMMs run "
                         "on bf16 where the CPU has AVX512-BF16 (cells, the step case, stay "
                         "float32)")
    args = ap.parse_args(argv)
    cells = cells_arg(ap, args.cells)
    for opt in ("H", "T", "B", "trials", "threads"):
        if getattr(args, opt) < 1:
            ap.error(f"-{opt if len(opt) == 1 else '-' + opt}: expected >= 1, got {getattr(args, opt)}")
    if args.gap < 0:
        ap.error(f"--gap: expected >= 0, got {args.gap}")
    peers = peers_arg(ap, args.peers)
    if args.lengths and peers:
        ap.error("--lengths: times fastrnn only; add --peers none")
    lengths = None
    if args.lengths:
        lengths = np.random.default_rng(0).integers(1, args.T + 1, size=args.B)
        lengths[0] = args.T
        print(f"# lengths {lengths.tolist()}")
    info = fastrnn.config()
    print(f"# {info.get('cpu', '?')}, ISA {info.get('isa', '?')}, matmul precision "
          f"{args.precision}; {args.trials} trials after {args.gap} s idle each; "
          f"median (p10-p90) ms")
    print(f"{'case':<34} {'engine':<16} {'first call':>22} {'next call':>22}")
    old = fastrnn.get_num_threads()
    old_precision = fastrnn.get_float32_matmul_precision()
    fastrnn.set_float32_matmul_precision(args.precision)
    try:
        for cell in cells:
            for mode, T, B in (("step", 1, 1), ("forward", args.T, args.B)):
                seq = mode == "forward"
                case = Case(cell, mode, args.H, args.H, T, B, 1, args.bidirectional and seq)
                engines = engines_for(case, args.threads, peers, lengths if seq else None)
                res = measure(engines, peers, args.gap, args.trials)
                for label, _, _ in engines:
                    first, nxt = (np.percentile(v, [50, 10, 90]) for v in res[label])
                    print(f"{case.label():<34} {label:<16} "
                          f"{first[0]:>9.3f} ({first[1]:.3f}-{first[2]:.3f}) "
                          f"{nxt[0]:>9.3f} ({nxt[1]:.3f}-{nxt[2]:.3f})")
    finally:
        fastrnn.set_num_threads(old)
        fastrnn.set_float32_matmul_precision(old_precision)


if __name__ == "__main__":
    main()
