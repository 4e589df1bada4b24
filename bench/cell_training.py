"""A cell stepped through time in training, as a decoder or a custom loop runs it:
T forward calls, then T backward calls (last step first), then the weights'
gradients read; against torch.nn's cell unrolled the same way with autograd.

    python bench/cell_training.py                              # LSTMCell(300, 1000), B=8, T=50
    python bench/cell_training.py --cell gru -I 256 -H 256 -B 1 --rounds 9
    python bench/cell_training.py --peers none

Rounds alternate the engines; medians in ms, ratio = torch ms / fastrnn ms (above 1:
fastrnn is faster). The gradients of the two are compared once first (the largest
relative difference of weight_hh's gradient is printed).
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

CELLS = {"lstm": "LSTMCell", "gru": "GRUCell", "rnn": "RNNCell"}


def fastrnn_loop(kind, I, H, x, dys):
    """run() -> weight_hh's gradient of one forward + backward pass over x."""
    cell = getattr(fastrnn, CELLS[kind])(I, H, seed=0)
    cell.train()

    def run():
        cell.zero_grad()
        state = None
        for t in range(x.shape[0]):
            state = cell(x[t], state)
        carry = (np.zeros_like(dys[0]), None) if kind == "lstm" else np.zeros_like(dys[0])
        for t in reversed(range(x.shape[0])):
            if kind == "lstm":
                _, carry = cell.backward(carry[0] + dys[t], carry[1])
            else:
                _, carry = cell.backward(carry + dys[t])
        return cell.weight_hh.grad
    return cell, run


def torch_loop(kind, cell, x, dys, threads):
    """The same weights in torch.nn's cell; None if torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    tc = getattr(torch.nn, CELLS[kind])(cell.input_size, cell.hidden_size)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(tc, name).copy_(torch.from_numpy(getattr(cell, name).data))
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dys)

    def run():
        tc.zero_grad()
        state, loss = None, 0
        for t in range(x.shape[0]):
            state = tc(xt[t], state)
            h = state[0] if kind == "lstm" else state
            loss = loss + (h * dyt[t]).sum()
        loss.backward()
        return tc.weight_hh.grad.numpy()
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", choices=sorted(CELLS), default="lstm")
    ap.add_argument("-I", type=int, default=300)
    ap.add_argument("-H", type=int, default=1000)
    ap.add_argument("-B", type=int, default=8)
    ap.add_argument("-T", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--peers", choices=["torch", "none"], default="torch")
    args = ap.parse_args(argv)
    for name in ("I", "H", "B", "T", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"-{name if len(name) == 1 else '-' + name}: expected an integer >= 1, "
                     f"got {getattr(args, name)}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.T, args.B, args.I)).astype(np.float32)    # (T, B, I)
    dys = rng.standard_normal((args.T, args.B, args.H)).astype(np.float32)  # (T, B, H)
    threads = fastrnn.get_num_threads()
    info = fastrnn.config()
    print(f"# {info.get('cpu', '?')}, ISA {info.get('isa', '?')}, {threads} threads; "
          f"{CELLS[args.cell]}({args.I}, {args.H}), B={args.B}, T={args.T}, "
          f"medians of {args.rounds} rounds")
    cell, ours = fastrnn_loop(args.cell, args.I, args.H, x, dys)
    runs = [("fastrnn", ours)]
    theirs = torch_loop(args.cell, cell, x, dys, threads) if args.peers == "torch" else None
    if theirs is not None:
        runs.append(("torch", theirs))
        a, b = ours(), theirs()
        print(f"# weight_hh gradient, largest difference / largest value: "
              f"{np.abs(a - b).max() / np.abs(b).max():.2e}")
    times = {name: [] for name, _ in runs}
    for _ in range(args.rounds):
        for name, run in runs:
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    ms = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
    line = f"{args.cell} cell I={args.I} H={args.H} B={args.B} T={args.T}: fastrnn {ms['fastrnn']:.2f} ms"
    if "torch" in ms:
        line += f", torch {ms['torch']:.2f} ms, ratio {ms['torch'] / ms['fastrnn']:.2f}"
    print(line)
    return ms


if __name__ == "__main__":
    main()
