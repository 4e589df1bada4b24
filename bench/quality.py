"""Quality target, side by side: a character LSTM (and GRU) language model on
tinyshakespeare trained by fastrnn and by an equivalent PyTorch model with
identical settings, reporting validation loss and training speed for both.

Settings (all options): 1 layer, hidden 512, embedding 64, batch 32, sequence
length 64, Adam lr 2e-3, gradient norm clipped to 5, training time budget 180 s
per run, the last 10% of the text held out, 2 threads, sequential truncated
BPTT with the state carried across chunks (random offset per epoch).

Both engines start from the *same* initial weights (the fastrnn model's are
loaded into torch), see the same chunks in the same order, use the same loss
(mean token cross-entropy), clipping and optimiser, and are validated on every
held-out token the same way (fastrnn.metrics.evaluate_lm's layout). Only
training steps count towards the budget and tokens/s; validation runs after.

    python bench/quality.py                      # the full target: 2 cells x 2 engines x 180 s
    python bench/quality.py --budget 5 --cells lstm   # smoke test
    python bench/quality.py --engines fastrnn --json

Run it on an otherwise idle machine: tokens/s are meaningless when other
processes compete for the cores.
"""

import argparse
import json
import math
import os
import platform
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # measure the checkout, not some installed copy
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn.cli import DEFAULT_TEXT  # noqa: E402
from fastrnn.data.batching import eval_streams  # noqa: E402
from fastrnn.train import TrainConfig, Trainer, thread_limits  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description="fastrnn vs PyTorch: char-LM quality and speed "
                                            "at equal settings and time budget.")
    p.add_argument("--text", default=DEFAULT_TEXT, help="training text (default: tinyshakespeare)")
    p.add_argument("--cells", default="lstm,gru", help="comma-separated: lstm,gru,rnn_tanh,rnn_relu")
    p.add_argument("--engines", default="fastrnn,torch", help="comma-separated: fastrnn,torch")
    p.add_argument("--budget", type=float, default=180.0, help="training seconds per run")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip", type=float, default=5.0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None,
                   help="also stop after this many steps (for equal-steps comparisons)")
    p.add_argument("--json", action="store_true", help="print the results as JSON last")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def make_trainer(args, cell, text):
    cfg = TrainConfig(cell=cell, layers=args.layers, hidden=args.hidden, embed=args.embed,
                      batch_size=args.batch_size, seq_len=args.seq_len, batching="sequential",
                      optimizer="adam", lr=args.lr, clip=args.clip, time_budget=args.budget,
                      max_steps=args.max_steps, val_fraction=args.val_fraction,
                      eval_every=None, tokenizer="char", seed=args.seed, threads=args.threads)
    return Trainer(cfg, text, text_name=os.path.basename(args.text))


def warm_up_fastrnn(trainer):
    """One untimed step on a throw-away copy (first-call costs stay out of the timing)."""
    from fastrnn.lm import RNNLanguageModel
    from fastrnn.nn import softmax_cross_entropy
    model = RNNLanguageModel.from_config(trainer.model.config())
    chunk = next(trainer.loader.epoch(0))
    with thread_limits(trainer.cfg.threads):
        logits, _ = model(chunk.x)
        model.backward(softmax_cross_entropy(logits, chunk.y)[1])


def run_fastrnn(trainer, args):
    warm_up_fastrnn(trainer)
    res = trainer.run(progress=not args.quiet)
    return {"engine": "fastrnn", "steps": res["steps"], "train_tokens": res["train_tokens"],
            "seconds": res["seconds"], "tokens_per_s": res["tokens_per_s"],
            "train_loss": res["train_loss"], "val_loss": res["val_loss"],
            "val_ppl": res["val_ppl"]}


def run_torch(trainer, init_state, args):
    """Train the equivalent torch model on the trainer's data, from init_state."""
    import torch
    from torch import nn

    cfg = trainer.cfg
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(args.threads)
    V = trainer.tokenizer.vocab_size

    class TorchLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Embedding(V, cfg.embed)
            if cfg.cell == "lstm":
                self.rnn = nn.LSTM(cfg.embed, cfg.hidden, cfg.layers)
            elif cfg.cell == "gru":
                self.rnn = nn.GRU(cfg.embed, cfg.hidden, cfg.layers)
            else:
                self.rnn = nn.RNN(cfg.embed, cfg.hidden, cfg.layers, nonlinearity=cfg.cell[4:])
            self.decoder = nn.Linear(cfg.hidden, V)

        def forward(self, x, state=None):
            out, state = self.rnn(self.encoder(x), state)
            return self.decoder(out), state

    # one untimed step on a throw-away model: first-call costs stay out of the timing
    scratch = TorchLM()
    chunk = next(trainer.loader.epoch(0))
    logits, _ = scratch(torch.from_numpy(chunk.x))
    nn.functional.cross_entropy(logits.reshape(-1, V), torch.from_numpy(chunk.y).reshape(-1)).backward()
    del scratch

    model = TorchLM()
    model.load_state_dict({k: torch.tensor(v) for k, v in init_state.items()})
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss()

    def detach(state):
        if state is None:
            return None
        return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()

    bar = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=float(args.budget), unit="s", desc=f"torch {cfg.cell}", leave=False,
                   file=sys.stderr,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [ETA {remaining}{postfix}]")
    loader = trainer.loader
    steps = tokens = 0
    seconds = 0.0
    recent = []
    state = None
    epoch = 0
    done = False
    model.train()
    while not done:
        for chunk in loader.epoch(epoch):
            t0 = time.perf_counter()
            x = torch.from_numpy(chunk.x)
            y = torch.from_numpy(chunk.y)
            state = None if chunk.reset else detach(state)      # gradient cut at the border
            opt.zero_grad(set_to_none=False)
            logits, state = model(x, state)
            loss = loss_fn(logits.reshape(-1, V), y.reshape(-1))
            loss.backward()
            if cfg.clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            lv = loss.item()
            dt = time.perf_counter() - t0
            seconds += dt
            steps += 1
            tokens += chunk.num_tokens
            recent = (recent + [lv])[-50:]
            if bar is not None:
                bar.update(min(dt, max(bar.total - bar.n, 0)))
                bar.set_postfix_str(f"loss={np.mean(recent):.3f}, {tokens / seconds:,.0f} tok/s",
                                    refresh=False)
            if seconds >= args.budget or (args.max_steps and steps >= args.max_steps):
                done = True
                break
        epoch += 1
    if bar is not None:
        bar.close()

    # validation: every held-out token once, same layout as fastrnn.metrics.evaluate_lm
    xv, yv = eval_streams(trainer.val_ids, cfg.batch_size, pad_id=0, ignore_index=-100)
    model.eval()
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for i in range(0, xv.shape[0], cfg.eval_seq_len):
            logits, state = model(torch.from_numpy(xv[i:i + cfg.eval_seq_len]), state)
            tgt = torch.from_numpy(yv[i:i + cfg.eval_seq_len])
            total += nn.functional.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1),
                                                 ignore_index=-100, reduction="sum").item()
            count += int((tgt != -100).sum())
    val = total / count
    return {"engine": "torch", "steps": steps, "train_tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "train_loss": float(np.mean(recent)) if recent else None, "val_loss": val,
            "val_ppl": math.exp(val)}


def format_table(rows):
    head = ("cell", "engine", "steps", "tokens", "tokens/s", "train loss", "val loss", "val ppl")
    lines = ["{:<9} {:<8} {:>7} {:>11} {:>10} {:>10} {:>9} {:>8}".format(*head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['cell']:<9} {r['engine']:<8} {r['error']}")
            continue
        lines.append("{:<9} {:<8} {:>7} {:>11,} {:>10,.0f} {:>10.4f} {:>9.4f} {:>8.2f}".format(
            r["cell"], r["engine"], r["steps"], r["train_tokens"], r["tokens_per_s"],
            r["train_loss"] if r["train_loss"] is not None else float("nan"),
            r["val_loss"], r["val_ppl"]))
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in ("fastrnn", "torch"):
            raise SystemExit(f"unknown engine {e!r} (fastrnn, torch)")
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    print(f"quality target: {args.text}, char tokens, {args.layers} layer(s) x {args.hidden}, "
          f"embed {args.embed}, batch {args.batch_size}, seq-len {args.seq_len}, Adam lr "
          f"{args.lr}, clip {args.clip}, budget {args.budget:g} s per run, val-fraction "
          f"{args.val_fraction}, {args.threads} threads", flush=True)
    rows = []
    for cell in cells:
        trainer = make_trainer(args, cell, text)
        init_state = trainer.model.state_dict()       # the torch run starts from these weights
        for engine in engines:
            if engine == "fastrnn":
                row = run_fastrnn(trainer, args)
            else:
                try:
                    import torch  # noqa: F401
                except ImportError:
                    row = {"engine": "torch", "error": "not installed (skipped)"}
                else:
                    with thread_limits(args.threads):
                        row = run_torch(trainer, init_state, args)
            row["cell"] = cell
            rows.append(row)
            if "error" not in row:
                print(f"{cell} {engine}: val loss {row['val_loss']:.4f} (ppl "
                      f"{row['val_ppl']:.2f}), {row['tokens_per_s']:,.0f} tokens/s, "
                      f"{row['steps']} steps", flush=True)
    print()
    print(format_table(rows))
    if args.json:
        print(json.dumps({"settings": vars(args), "machine": platform.platform(),
                          "fastrnn_config": fastrnn.config(), "results": rows}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
