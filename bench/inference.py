"""Inference figures of issue 10: fastrnn float32 / int8 / bf16 vs torch quantize_dynamic
and ONNX Runtime float32, LSTM I = H, medians of interleaved repeats.

    python bench/inference.py [--threads 2] [--repeats 7]
    python bench/inference.py --accuracy [--budget 180]   # only the char-LM accuracy
    python bench/inference.py --accuracy --checkpoint run.npz   # ... of a `fastrnn train --save` model
    python bench/inference.py --bf16-modes   # float32 vs bf16 weight-only / dynamic vs int8

--accuracy trains the quality benchmark's char-LSTM (bench/quality.py's settings:
tinyshakespeare, 1 x 512, embedding 64, batch 32, 64-step chunks, Adam 2e-3, clip
5, the last 10 % held out) in float32 for --budget seconds, then reports the
validation loss of the float32 model and of its int8 and bfloat16 copies (both bf16
modes) against
the targets (+0.5 % and +0.1 %) and the max abs logit error on a validation chunk.
The speed figures of issue 10 are in `fastrnn bench --quantize int8,bfloat16` and
`fastrnn bench --mode stream`.
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


def accuracy(budget, threads, seed=0, checkpoint=None):
    """Validation loss of the quality benchmark's char-LSTM: float32, int8 and bfloat16
    (both bf16 modes: weight-only and dynamic). Trained here for `budget` seconds, or
    read from a `fastrnn train --save` checkpoint (its own text split and vocabulary)."""
    from fastrnn.checkpoint import load_checkpoint
    from fastrnn.cli import DEFAULT_TEXT
    from fastrnn.metrics import evaluate_lm
    from fastrnn.train import TrainConfig, Trainer, split_text
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        text = f.read()
    if checkpoint:
        ck = load_checkpoint(checkpoint)
        model = ck.build_model().eval()
        ids = ck.build_tokenizer().encode(split_text(text, ck.config.get("val_fraction", 0.1))[1])
        what = f"{checkpoint} ({ck.train_state.get('step', '?')} steps)"
        streams = int(ck.config.get("batch_size", 32))
    else:
        cfg = TrainConfig(cell="lstm", layers=1, hidden=512, embed=64, batch_size=32, seq_len=64,
                          batching="sequential", optimizer="adam", lr=2e-3, clip=5.0,
                          time_budget=budget, val_fraction=0.1, eval_every=None,
                          tokenizer="char", seed=seed, threads=threads)
        trainer = Trainer(cfg, text)
        res = trainer.run(progress=False)
        model, ids, streams = trainer.model.eval(), trainer.val_ids, cfg.batch_size
        what = f"char-LSTM 1x512 trained {res['steps']} steps ({budget:g} s)"
    base = evaluate_lm(model, ids, num_streams=streams)["loss"]
    print(f"{what} in float32: validation loss {base:.5f} ({len(ids):,} tokens); "
          f"quantised ISA {Q.isa()}")
    x = ids[:64 * 32].reshape(32, 64).T.copy()
    ref = model(x)[0]
    out = {"float32": base}
    for qdtype, mode, limit in (("int8", "auto", 0.5), ("bfloat16", "weight_only", 0.1),
                                ("bfloat16", "dynamic", 0.1)):
        q = fastrnn.quantize(model, qdtype, mode)
        loss = evaluate_lm(q, ids, num_streams=streams)["loss"]
        excess = 100.0 * (loss - base) / base
        err = float(np.abs(q(x)[0] - ref).max())
        out[f"{qdtype} {mode}"] = loss
        print(f"  {qdtype:<9} {mode:<12} validation loss {loss:.5f} ({excess:+.3f} %, target "
              f"<= +{limit} %: {'met' if excess <= limit else 'MISSED'}); max abs logit error "
              f"{err:.2e} on a 64 x 32 validation chunk", flush=True)
    return out


def bf16_modes(rounds=5):
    """float32 module against bf16 weight-only, bf16 dynamic and int8 copies on the same
    weights (LSTM/GRU I=H=512 T=50 at B 1-64, I=H=1024 T=25 B=1), ms, medians of
    `rounds` interleaved rounds."""
    def med(f, n):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts))
    print(f"quantised ISA {Q.isa()}; ms, medians of {rounds} interleaved rounds")
    for cell in ("LSTM", "GRU"):
        for (I, H, T, B) in [(512, 512, 50, b) for b in (1, 2, 4, 8, 16, 64)] + [(1024, 1024, 25, 1)]:
            m = getattr(fastrnn, cell)(I, H, seed=0).eval()
            x = np.random.default_rng(0).uniform(-1, 1, (T, B, I)).astype(np.float32)
            eng = {"f32": m, "bf16 weight-only": fastrnn.quantize(m, "bfloat16", "weight_only"),
                   "bf16 dynamic": fastrnn.quantize(m, "bfloat16", "dynamic"),
                   "int8": fastrnn.quantize(m, "int8")}
            calls = {k: (lambda e=e: e(x)) for k, e in eng.items()}
            for f in calls.values():
                f()
                f()
            n = max(3, int(0.3 / (med(calls["f32"], 3) + 1e-9)))
            res = {k: [] for k in calls}
            for _ in range(rounds):
                for k, f in calls.items():
                    res[k].append(med(f, n))
            r = {k: 1e3 * float(np.median(v)) for k, v in res.items()}
            print(f"{cell} I={I} H={H} T={T} B={B:3d}: " + "  ".join(f"{k} {v:.3f}" for k, v in r.items())
                  + f"   f32/weight-only {r['f32'] / r['bf16 weight-only']:.2f}"
                  + f"  f32/dynamic {r['f32'] / r['bf16 dynamic']:.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--accuracy", action="store_true",
                    help="only the char-LM accuracy of the quantised copies")
    ap.add_argument("--budget", type=float, default=180.0,
                    help="--accuracy: float32 training seconds (default 180, as bench/quality.py)")
    ap.add_argument("--checkpoint", default=None,
                    help="--accuracy: evaluate this `fastrnn train --save` checkpoint instead "
                         "of training one")
    ap.add_argument("--bf16-modes", action="store_true",
                    help="only float32 against bf16 weight-only / dynamic and int8 copies")
    args = ap.parse_args()
    if args.bf16_modes:
        fastrnn.set_num_threads(args.threads)
        bf16_modes()
        return
    if args.accuracy:
        fastrnn.set_num_threads(args.threads)
        accuracy(args.budget, args.threads, checkpoint=args.checkpoint)
        return
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
