"""LSTM with a projection (proj_size): fastrnn against torch.nn.LSTM, side by side.

    python bench/projection.py                   # I=256 H=512 P=128 T=100, B=1, 8, 64
    python bench/projection.py -B 32 --threads 2 --rounds 15

Same weights (torch's, loaded with load_state_dict), same input, same threads
(2 unless --threads); outputs and every gradient are checked against torch's
before anything is timed. Forward (eval, no autograd) and training
(forward + backward) are timed interleaved with a quiet gap before each sample;
medians are printed with the ratio torch ms / fastrnn ms (above 1: fastrnn faster).
A benchmark, not a test: needs torch (pip install torch==2.13.0).
"""

import argparse
import sys

import numpy as np

import fastrnn
from fastrnn.benchmark.timing import set_threads, time_interleaved


class Engine:
    def __init__(self, name, run):
        self.name, self.run = name, run


def engines(I, H, P, T, B, seed=0):
    import torch
    torch.manual_seed(seed)
    tm = torch.nn.LSTM(I, H, proj_size=P)
    fm = fastrnn.LSTM(I, H, proj_size=P)
    fm.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    dy = rng.standard_normal((T, B, P)).astype(np.float32)
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)

    def f_forward():
        fm.eval()
        return fm(x)[0]

    xg = xt.clone().requires_grad_(True)   # made once: not timed (a 6.5 MB copy at B=64)

    def t_forward():
        tm.eval()
        with torch.no_grad():
            return tm(xt)[0]

    def f_train():
        fm.train()
        out, _ = fm(x)
        dx, _ = fm.backward(dy)
        return out, dx

    def t_train():
        tm.train()
        xg.grad = None
        tm.zero_grad()
        out, _ = tm(xg)
        out.backward(dyt)
        return out, xg.grad

    # check once: outputs and input gradients (float32 tolerance)
    fm.zero_grad()
    out_f, dx_f = f_train()
    out_t, dx_t = t_train()
    for name, a, b in (("out", out_f, out_t), ("dx", dx_f, dx_t)):
        b = b.detach().numpy()
        err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
        if err > 2e-3:
            raise SystemExit(f"fastrnn and torch disagree on {name}: rel. error {err:.2e}")
    grads_t = {k: p.grad.numpy() for k, p in tm.named_parameters()}
    for k, p in fm.named_parameters():
        err = np.abs(p.grad - grads_t[k]).max() / max(np.abs(grads_t[k]).max(), 1e-30)
        if err > 2e-3:
            raise SystemExit(f"fastrnn and torch disagree on d{k}: rel. error {err:.2e}")
    return ([Engine("fastrnn", f_forward), Engine("torch", t_forward)],
            [Engine("fastrnn", f_train), Engine("torch", t_train)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-I", type=int, default=256)
    p.add_argument("-H", type=int, default=512)
    p.add_argument("-P", type=int, default=128)
    p.add_argument("-T", type=int, default=100)
    p.add_argument("-B", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("bench/projection.py needs torch (pip install torch==2.13.0)", file=sys.stderr)
        return 2
    with set_threads(args.threads, ("torch",)):
        for B in args.B:
            fwd, train = engines(args.I, args.H, args.P, args.T, B)
            for mode, es in (("forward", fwd), ("train", train)):
                for e in es:
                    e.run()
                res = time_interleaved(es, budget=None, repeats=args.rounds)
                f, t = res["fastrnn"][0], res["torch"][0]
                print(f"LSTM proj (I={args.I}, H={args.H}, P={args.P}, T={args.T}, B={B}) "
                      f"{mode:7s}: fastrnn {f * 1e3:8.2f} ms, torch {t * 1e3:8.2f} ms, "
                      f"torch/fastrnn {t / f:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
