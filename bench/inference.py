"""Inference figures of issue 10: fastrnn float32 / int8 / bf16 vs torch quantize_dynamic
and ONNX Runtime float32, LSTM I = H, medians of interleaved repeats.

    python bench/inference.py [--threads 2] [--repeats 7]
"""
import argparse
import time
import warnings

import numpy as np

import fastrnn
from fastrnn import quantization as Q

warnings.filterwarnings("ignore")


def median_ms(fns, repeats):
    """Interleave the engines: one call of each per round; medians in ms."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    fastrnn.set_num_threads(args.threads)
    try:
        import onnxruntime as ort
        from fastrnn.benchmark import onnx_model  # noqa: F401
    except ImportError:
        ort = None
    print(f"CPU ISA path: {Q.isa()}; threads {args.threads}")
    for H, T, B in [(512, 50, 1), (1024, 25, 1), (512, 50, 8), (512, 50, 64)]:
        m = fastrnn.LSTM(H, H, seed=0).eval()
        x = np.random.default_rng(0).standard_normal((T, B, H)).astype(np.float32)
        tm = torch.nn.Sequential(fastrnn.to_torch(m).eval())
        tq = torch.ao.quantization.quantize_dynamic(tm, {torch.nn.LSTM}, dtype=torch.qint8)
        xt = torch.from_numpy(x)
        q8, bf = fastrnn.quantize(m, "int8"), fastrnn.quantize(m, "bfloat16")
        fns = {"fastrnn f32": lambda: m(x), "fastrnn int8": lambda: q8(x),
               "fastrnn bf16": lambda: bf(x)}

        def torch_q8():
            with torch.no_grad():
                return tq(xt)
        fns["torch int8"] = torch_q8
        res = median_ms(fns, args.repeats)
        ref = m(x)[0]
        with torch.no_grad():
            terr = np.abs(tq(xt)[0].numpy() - ref).max()
        e8, eb = np.abs(q8(x)[0] - ref).max(), np.abs(bf(x)[0] - ref).max()
        print(f"H={H} T={T} B={B}: " + "  ".join(f"{k} {v:.2f} ms" for k, v in res.items())
              + f"  | int8 vs torch {res['torch int8'] / res['fastrnn int8']:.2f}x, "
              f"int8 vs f32 {res['fastrnn f32'] / res['fastrnn int8']:.2f}x, "
              f"bf16 vs f32 {res['fastrnn f32'] / res['fastrnn bf16']:.2f}x"
              f"  | max abs err int8 {e8:.1e} bf16 {eb:.1e} torch-int8 {terr:.1e}", flush=True)
    # per-call overhead: batch 1, 4 steps, H = 32
    m = fastrnn.LSTM(8, 32, seed=0).eval()
    x = np.ones((4, 1, 8), np.float32)
    q = fastrnn.quantize(m, "float32")
    n = 2000
    for name, f in [("LSTM H=32 float module", lambda: m(x)), ("packed float32 copy", lambda: q(x))]:
        f()
        t = time.perf_counter()
        for _ in range(n):
            f()
        print(f"{name}: {1e6 * (time.perf_counter() - t) / n:.1f} us per call (T=4, B=1)")
    pool = fastrnn.StreamPool(fastrnn.LSTM(64, 128, seed=0).eval(), 1024)
    ids = [pool.open() for _ in range(1024)]
    sub = np.array(ids[::16][:64])
    x64 = np.ones((64, 64), np.float32)
    plain = fastrnn.quantize(fastrnn.LSTM(64, 128, seed=0).eval(), "float32")
    x3 = x64[None]
    h = np.zeros((1, 64, 128), np.float32)
    res = median_ms({"pool step 64 of 1024": lambda: pool.step(sub, x64),
                     "plain batch-64 call": lambda: plain(x3, (h, h))}, 51)
    print("StreamPool: " + ", ".join(f"{k} {1e3 * v:.0f} us" for k, v in res.items())
          + f" -> ratio {res['pool step 64 of 1024'] / res['plain batch-64 call']:.2f}")


if __name__ == "__main__":
    main()
