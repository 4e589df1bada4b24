"""float32 layers at matmul precision "highest" and "medium", beside PyTorch's
float32 and bf16 autocast: one layer's forward (inference) and forward + backward
(training), medians of interleaved rounds in one process.

    python bench/precision.py                       # LSTM, GRU, RNN at the quality config's size
    python bench/precision.py --hidden 1024 --cells lstm --rounds 9

"medium" runs fastrnn's GEMMs on bf16 operands with float32 sums where the CPU
runs bf16 dot products faster than float32 FMAs (src/bf16_gemm.h); the header
says whether it did on this machine. PyTorch's counterpart is
``torch.autocast("cpu", dtype=torch.bfloat16)`` (skipped without torch).
Training is timed as forward, the sum of the outputs as the loss, backward, the
input's gradient included for both (torch's input requires grad). Every engine has
fastrnn's weights, and the float32 outputs are checked against torch's first. Each
round times the engines in a rotated order, each call after a 0.15 s quiet gap and
one untimed call (the runner's method, docs/benchmarks.md: back to back, one
engine's spinning worker threads slowed the next one).
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
from fastrnn import _precision  # noqa: E402

MODULES = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN"}


from fastrnn.benchmark.timing import QUIET_GAP_DEFAULT as QUIET_GAP  # noqa: E402


def fastrnn_layer(cell, I, H):
    return getattr(fastrnn, MODULES[cell])(I, H, seed=0)


def fastrnn_calls(cell, I, H, x, precision):
    """(forward, training step) closures for a fastrnn layer run at `precision`;
    forward returns its output."""
    layer = fastrnn_layer(cell, I, H)

    def forward():
        with _precision.scoped(precision):
            layer.eval()
            return layer(x)[0]

    def train():
        with _precision.scoped(precision):
            layer.train()
            y, _ = layer(x)
            layer.backward(np.ones_like(y))
    return forward, train


def torch_calls(cell, I, H, x, autocast):
    """The same for torch, with the fastrnn layer's weights."""
    import torch
    layer = getattr(torch.nn, MODULES[cell])(I, H)
    layer.load_state_dict({k: torch.from_numpy(v)
                           for k, v in fastrnn_layer(cell, I, H).state_dict().items()})
    xt = torch.from_numpy(x)
    xg = torch.from_numpy(x.copy()).requires_grad_(True)   # dx, as fastrnn's backward

    def forward():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return layer(xt)[0]

    def train():
        xg.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, _ = layer(xg)
            loss = y.float().sum()
        loss.backward()
    return forward, train


def time_into(fn, times):
    """After the quiet gap and one untimed call (the first call after idle waits for
    sleeping worker threads: the runner times it apart), time one call of fn and
    append its time (ms) to `times`."""
    time.sleep(QUIET_GAP)
    fn()
    t = time.perf_counter()
    fn()
    times.append((time.perf_counter() - t) * 1e3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="lstm,gru,rnn_tanh")
    p.add_argument("--input", type=int, default=64)
    p.add_argument("--hidden", type=int, default=704)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7,
                   help="interleaved timed rounds (after one warm-up)")
    args = p.parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    for c in cells:
        if c not in MODULES:
            raise SystemExit(f"--cells: unknown cell {c!r} (expected {', '.join(MODULES)})")
    fastrnn.set_num_threads(args.threads)
    try:
        import torch
        torch.set_num_threads(args.threads)
        torch_version = torch.__version__
    except ImportError:
        torch = None
        torch_version = "not installed"
    with _precision.scoped("medium"):
        bf16 = _precision.bf16_products(np.float32)
    fc = fastrnn.config()
    print(f"{fc.get('cpu')}, ISA {fc.get('isa')}, {args.threads} threads, torch {torch_version}; "
          "medium runs " + (f"bf16 products ({fc.get('bf16_gemm')})" if bf16
                            else "float32 (bf16 would not be faster here)"))
    print(f"T={args.steps} B={args.batch} I={args.input} H={args.hidden}, medians of "
          f"{args.rounds} interleaved rounds, ms")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.steps, args.batch, args.input)).astype(np.float32)
    print(f"{'cell':9}{'call':10}{'highest':>9}{'medium':>9}{'torch32':>9}{'autocast':>9}"
          f"{'hi/med':>8}{'ac/med':>8}")
    for cell in cells:
        runs = {"highest": fastrnn_calls(cell, args.input, args.hidden, x, "highest"),
                "medium": fastrnn_calls(cell, args.input, args.hidden, x, "medium")}
        if torch is not None:
            runs["torch32"] = torch_calls(cell, args.input, args.hidden, x, False)
            runs["autocast"] = torch_calls(cell, args.input, args.hidden, x, True)
        if torch is not None:   # same weights, same function: check before timing
            ours, theirs = runs["highest"][0](), runs["torch32"][0]().float().numpy()
            err = float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))
            if err > 1e-4:
                raise SystemExit(f"{cell}: fastrnn and torch float32 outputs differ "
                                 f"(max rel err {err:.2g}); not timing")
        names = list(runs)
        for k, call in enumerate(("forward", "train")):
            times = {name: [] for name in runs}
            for name, fns in runs.items():
                fns[k]()                       # warm-up
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:   # rotated
                    time_into(runs[name][k], times[name])
            med = {name: float(np.median(v)) for name, v in times.items()}
            cols = "".join(f"{med[n]:9.1f}" if n in med else f"{'-':>9}"
                           for n in ("highest", "medium", "torch32", "autocast"))
            ratio = f"{med['highest'] / med['medium']:8.2f}"
            ac = f"{med['autocast'] / med['medium']:8.2f}" if "autocast" in med else f"{'-':>8}"
            print(f"{cell:9}{call:10}{cols}{ratio}{ac}")


if __name__ == "__main__":
    main()
