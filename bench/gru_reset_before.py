"""GRU with the reset gate before the recurrent product (reset_after=False: the seed's
GRU, Keras reset_after=False, ONNX linear_before_reset=0), inference: fastrnn against
ONNX Runtime's GRU operator with linear_before_reset=0, side by side; with --train,
a training step against the same cell written in torch ops.

    python bench/gru_reset_before.py                       # I=H=256 T=100, B=1, 8, 64
    python bench/gru_reset_before.py -I 512 -H 512 -T 50 -B 8 128 --rounds 15
    python bench/gru_reset_before.py --train               # forward + backward

The model is fastrnn's, written to ONNX by fastrnn.onnx.export (same weights, same
input); ONNX Runtime's output is checked against fastrnn's before anything is timed.
Also timed: fastrnn's torch-form GRU (reset_after=True) on the same weights, the
cell this one is measured against in the docs (same FLOPs; torch has no
reset-before GRU). Calls are timed interleaved with a quiet gap before each sample
(fastrnn.benchmark.timing); medians are printed with the ratio ONNX Runtime ms /
fastrnn ms (above 1: fastrnn faster). A benchmark, not a test: needs onnx and
onnxruntime (pip install onnx onnxruntime).

--train times one training step, forward and backward through time from a given
dL/dy, with the weight gradients: fastrnn's layer; the same cell as a PyTorch user
would write it (torch has no reset-before GRU: x W_ih^T hoisted out of the loop,
then per step h W_h{r,z}^T, (r * h) W_hn^T and the pointwise ops, autograd for
backward, dL/dx included as fastrnn's backward returns it; eager, float32); and
fastrnn's reset_after=True layer on the same weights. torch's output and every
gradient (x's, the weights', the biases') are checked against fastrnn's first; the
ratio printed is torch ms / fastrnn ms. Needs torch.
"""

import argparse
import os
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # measure the checkout, not some installed copy
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn.benchmark.timing import set_threads, time_interleaved  # noqa: E402


class Engine:
    def __init__(self, name, run):
        self.name, self.run = name, run


def _session(path, threads):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def engines(I, H, T, B, threads, workdir, seed=0):
    """[fastrnn reset-before, ONNX Runtime linear_before_reset=0, fastrnn torch form]."""
    before = fastrnn.GRU(I, H, seed=seed, reset_after=False).eval()
    after = fastrnn.GRU(I, H, seed=seed).eval()
    after.load_state_dict(before.state_dict())
    x = np.random.default_rng(seed).standard_normal((T, B, I)).astype(np.float32)
    path = fastrnn.onnx.export(before, os.path.join(workdir, f"gru_{I}_{H}.onnx"))
    sess = _session(path, threads)
    name = sess.get_inputs()[0].name
    got = sess.run(None, {name: x})[0].reshape(T, B, H)
    want = before(x)[0]
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    if err > 2e-3:
        raise SystemExit(f"fastrnn and ONNX Runtime disagree: rel. error {err:.2e}")
    return [Engine("fastrnn", lambda: before(x)),
            Engine("onnxruntime", lambda: sess.run(None, {name: x})),
            Engine("fastrnn reset_after=True", lambda: after(x))]


def torch_seed_gru(I, H, T, B, state, x, dy):
    """A training step of the reset-before GRU in torch ops -> (run, gradients); run
    returns y, gradients() the weights' and biases' gradients and x's ("x")."""
    import torch
    w = {k: torch.tensor(v, requires_grad=True) for k, v in state.items()}
    xt, dyt = torch.from_numpy(x.copy()).requires_grad_(), torch.from_numpy(dy)

    def run():
        xt.grad = None
        for v in w.values():
            v.grad = None
        w_ih, w_hh, b_ih, b_hh = (w[k] for k in ("weight_ih_l0", "weight_hh_l0",
                                                 "bias_ih_l0", "bias_hh_l0"))
        gx = torch.addmm(b_ih, xt.reshape(T * B, I), w_ih.t()).reshape(T, B, 3 * H)
        # split once, outside the loop: a slice taken per step would cost its backward
        # a zero tensor of the whole (gx's, W_hh's) shape each step
        gx_rz, gx_n = (g.unbind(0) for g in gx.split([2 * H, H], dim=2))
        w_rz, w_n = (w_.t() for w_ in w_hh.split([2 * H, H]))
        b_rz, b_n = b_hh.split([2 * H, H])
        h = torch.zeros(B, H)
        ys = []
        for t in range(T):
            r, z = torch.sigmoid(gx_rz[t] + torch.addmm(b_rz, h, w_rz)).chunk(2, 1)
            n = torch.tanh(gx_n[t] + torch.addmm(b_n, r * h, w_n))
            h = (1 - z) * n + z * h
            ys.append(h)
        y = torch.stack(ys)
        y.backward(dyt)
        return y.detach().numpy()

    def gradients():
        return dict({k: v.grad.numpy() for k, v in w.items()}, x=xt.grad.numpy())
    return run, gradients


def train_engines(I, H, T, B, seed=0):
    """[fastrnn reset-before, torch ops, fastrnn torch form]: training steps, checked."""
    before = fastrnn.GRU(I, H, seed=seed, reset_after=False)
    after = fastrnn.GRU(I, H, seed=seed)
    after.load_state_dict(before.state_dict())
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    dy = rng.standard_normal((T, B, H)).astype(np.float32)

    def step(m):
        m.zero_grad()
        y, _ = m(x)
        return y, m.backward(dy)[0]
    run_torch, torch_grads = torch_seed_gru(I, H, T, B, before.state_dict(), x, dy)
    y, dx = step(before)
    want = {"y": y, "x": dx}
    y_torch = run_torch()
    got = dict(torch_grads(), y=y_torch)
    for name, g in got.items():
        w = want[name] if name in want else getattr(before, name).grad
        err = np.abs(g - w).max() / max(np.abs(w).max(), 1e-30)
        if err > 2e-3:
            raise SystemExit(f"fastrnn and torch disagree on {name}: rel. error {err:.2e}")
    return [Engine("fastrnn", lambda: step(before)), Engine("torch", run_torch),
            Engine("fastrnn reset_after=True", lambda: step(after))]


def print_rows(args, what, row, peer, short, make_engines):
    """The header, then per batch the interleaved medians of make_engines(B)'s three
    engines [fastrnn, peer, fastrnn reset_after=True] and the ratio peer / fastrnn."""
    info = fastrnn.config()
    print(f"# {info.get('cpu', '?')}, ISA {info.get('isa', '?')}, {args.threads} threads; "
          f"GRU reset_after=False {what}, medians of {args.rounds} interleaved rounds")
    for B in args.B:
        es = make_engines(B)
        res = time_interleaved(es, budget=None, repeats=args.rounds)
        f, o, a = (res[e.name][0] for e in es)
        print(f"GRU reset-before{row} (I={args.I}, H={args.H}, T={args.T}, B={B}): "
              f"fastrnn {f * 1e3:8.3f} ms, {peer} {o * 1e3:8.3f} ms "
              f"({short}/fastrnn {o / f:.2f}x); fastrnn reset_after=True {a * 1e3:8.3f} ms",
              flush=True)


def main_train(args):
    try:
        import torch  # noqa: F401
    except ImportError:
        print("bench/gru_reset_before.py --train needs torch", file=sys.stderr)
        return 2
    with set_threads(args.threads, ("torch",)):
        print_rows(args, "training step (forward + backward)", " training", "torch ops",
                   "torch", lambda B: train_engines(args.I, args.H, args.T, B))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-I", type=int, default=256)
    p.add_argument("-H", type=int, default=256)
    p.add_argument("-T", type=int, default=100)
    p.add_argument("-B", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--train", action="store_true",
                   help="a training step against the cell in torch ops (needs torch)")
    args = p.parse_args(argv)
    if args.train:
        return main_train(args)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        print("bench/gru_reset_before.py needs onnx and onnxruntime "
              "(pip install onnx onnxruntime)", file=sys.stderr)
        return 2
    def warm_engines(B):
        es = engines(args.I, args.H, args.T, B, args.threads, tmp)
        for e in es:
            e.run()
        return es
    with set_threads(args.threads, ("onnxruntime",)), tempfile.TemporaryDirectory() as tmp:
        print_rows(args, "inference", "", "ONNX Runtime", "ORT", warm_engines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
