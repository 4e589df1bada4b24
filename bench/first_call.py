"""A fresh process's first calls: what a script that builds a model and runs it once
sees, and what a service pays on its first request. Each trial starts one new Python
process per engine (engines interleaved, trial after trial), which times the import
of NumPy and the engine, building the model from the weights (ONNX Runtime: its
session), then the engine's first call, its second, and the median of
five more ("steady"), on the same weights and input as `fastrnn bench`
(fastrnn.benchmark.engines; fastrnn's inference modules frozen, as the runner's).

    python bench/first_call.py                               # four eval shapes, one training
    python bench/first_call.py --configs LSTM:1024:1024:1:100:eval --trials 9 --peers torch

A config is CELL:I:H:B:T:MODE (CELL LSTM, GRU or RNN; MODE eval or train). Medians over
the trials, ms; "first x" is the peer's first call over fastrnn's, "b+f x" the same of
build and first call together (above 1: fastrnn faster). A benchmark, not a test; the
peers are optional.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT = ("LSTM:1024:1024:1:100:eval,LSTM:13:2048:17:20:eval,LSTM:256:256:64:100:eval,"
           "GRU:512:512:8:50:eval,LSTM:256:256:64:100:train")
CELLS = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn_tanh"}
MODES = {"eval": "forward", "train": "train"}    # this script's names -> the runner's
PACKAGES = {"fastrnn": ("fastrnn",), "torch": ("torch",), "onnxruntime": ("onnxruntime", "onnx")}
STEADY_CALLS = 5


def parse_configs(text):
    """'CELL:I:H:B:T:MODE,...' -> [(cell, I, H, B, T, mode)]; ValueError naming the bad one."""
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if (len(parts) != 6 or parts[0].upper() not in CELLS or parts[5] not in MODES
                or not all(p.isdigit() and int(p) >= 1 for p in parts[1:5])):
            raise ValueError(f"--configs: expected CELL:I:H:B:T:MODE (CELL LSTM, GRU or RNN, "
                             f"sizes >= 1, MODE eval or train), got {item!r}")
        out.append((parts[0].upper(), *(int(p) for p in parts[1:5]), parts[5]))
    return out


def child(engine, config, threads):
    """In the fresh process: the timings of one engine on one config, as a JSON line
    (ms): import (NumPy and the engine's packages), build (the module from the
    weights; ONNX Runtime's session), first, second, steady; or
    {"skip": reason} when the engine cannot run the config."""
    if _ROOT not in sys.path:        # measure the checkout, not some installed copy
        sys.path.insert(0, _ROOT)
    t0 = time.perf_counter()
    import numpy  # noqa: F401
    for name in PACKAGES[engine]:
        __import__(name)
    t_import = time.perf_counter() - t0
    import fastrnn
    from fastrnn.benchmark.engines import ENGINES, Case, EngineUnavailable
    cell, I, H, B, T, mode = config
    fastrnn.set_num_threads(threads)
    if engine == "torch":
        import torch
        torch.set_num_threads(threads)
    case = Case(CELLS[cell], MODES[mode], I, H, T, B)
    data = case.make_data()
    t0 = time.perf_counter()
    try:
        kw = {"threads": threads} if engine == "onnxruntime" else {}
        eng = ENGINES[engine](case, *data, **kw)
    except EngineUnavailable as exc:
        return {"skip": str(exc)}
    t_build = time.perf_counter() - t0
    times = []
    for _ in range(2 + STEADY_CALLS):
        t = time.perf_counter()
        eng.run()
        times.append(time.perf_counter() - t)
    ms = [1e3 * t for t in times]
    return {"import": 1e3 * t_import, "build": 1e3 * t_build, "first": ms[0], "second": ms[1],
            "steady": statistics.median(ms[2:])}


def run_child(engine, config, threads):
    spec = ":".join(map(str, config))
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", engine,
                          "--configs", spec, "--threads", str(threads)],
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise SystemExit(f"{engine} {spec}: the child process failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=DEFAULT, help="CELL:I:H:B:T:MODE,... (default: %(default)s)")
    ap.add_argument("--trials", type=int, default=5, help="fresh processes per engine and config")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", default="auto",
                    help="auto (whichever of torch, onnxruntime import), none, or a list")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        configs = parse_configs(args.configs)
    except ValueError as exc:
        ap.error(str(exc))
    if args.trials < 1:
        ap.error(f"--trials: expected >= 1, got {args.trials}")
    if args.threads < 1:
        ap.error(f"--threads: expected >= 1, got {args.threads}")
    if args.child is not None:
        if args.child not in PACKAGES or len(configs) != 1:
            ap.error(f"--child: expected one of {sorted(PACKAGES)} and one config")
        print(json.dumps(child(args.child, configs[0], args.threads)))
        return 0
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    from fastrnn.benchmark.engines import available_peers
    if args.peers == "auto":
        peers = available_peers()
    elif args.peers == "none":
        peers = []
    else:
        peers = args.peers.split(",")
        for p in peers:
            if p not in ("torch", "onnxruntime"):
                ap.error(f"--peers: expected auto, none or some of onnxruntime, torch, got {p!r}")
    from fastrnn.benchmark.runner import machine_header
    print(f"# {machine_header(peers, args.threads)}")
    print(f"# {args.trials} fresh processes per engine and config, interleaved; medians, ms")
    print(f"{'config':28s} {'engine':12s} {'import':>8s} {'build':>8s} {'first':>8s} {'second':>8s} "
          f"{'steady':>8s} {'first x':>8s} {'b+f x':>7s}")
    for config in configs:
        engines = ["fastrnn"] + [p for p in peers if not (p == "onnxruntime" and config[5] == "train")]
        got = {e: [] for e in engines}
        for _ in range(args.trials):
            for e in engines:
                got[e].append(run_child(e, config, args.threads))
        ours = None
        for e in engines:
            rows = got[e]
            if "skip" in rows[0]:
                print(f"# {e}: {rows[0]['skip']}")
                continue
            med = {k: statistics.median(r[k] for r in rows) for k in ("import", "build", "first", "second", "steady")}
            if e == "fastrnn":
                ours = med
                ratios = ("", "")
            elif ours is None:
                ratios = ("-", "-")
            else:
                ratios = (f"{med['first'] / ours['first']:.2f}x",
                          f"{(med['build'] + med['first']) / (ours['build'] + ours['first']):.2f}x")
            label = ":".join(map(str, config))
            print(f"{label:28s} {e:12s} {med['import']:8.1f} {med['build']:8.3f} {med['first']:8.3f} "
                  f"{med['second']:8.3f} {med['steady']:8.3f} {ratios[0]:>8s} {ratios[1]:>7s}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
