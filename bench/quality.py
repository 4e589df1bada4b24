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

A recipe (``--config FILE.toml``, the format of ``fastrnn train --config``):
the model, data, optimiser, schedule and regularisation come from the file
(its time budget too, unless ``--budget`` is given), and the PyTorch model
replays fastrnn's run exactly where PyTorch can express it: the same initial
weights, the same chunks, the same learning rate at every step (the same
schedule function, driven by each engine's own training seconds under a time
budget), and the very same dropout, locked-dropout and weight-drop masks
(drawn from a copy of fastrnn's mask streams; weight drop through
``torch.func.functional_call`` with W_hh * M, so the gradient reaches the raw
weight through the mask). With ``--max-steps`` the two agree to float
rounding. ``--seeds 0,1,2`` repeats everything per seed; ``--plot FILE.png``
draws validation loss against training minutes for every run (matplotlib).

    python bench/quality.py --config examples/configs/shakespeare_char.toml --seeds 0,1,2 \
        --plot docs/quality_bf16.png

Precision: a recipe with ``matmul-precision = "medium"`` (fastrnn's GEMMs on bf16
operands, float32 sums) runs the PyTorch model under ``torch.autocast("cpu",
dtype=torch.bfloat16)``, PyTorch's own bf16 mixed precision, for training and
validation alike; "highest" runs both in float32.

Run it on an otherwise idle machine: tokens/s are meaningless when other
processes compete for the cores.
"""

import argparse
import json
import textwrap
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
from fastrnn import _precision  # noqa: E402
from fastrnn.cli import DEFAULT_TEXT  # noqa: E402
from fastrnn.data.batching import eval_streams  # noqa: E402
from fastrnn.schedule import LRSchedule  # noqa: E402
from fastrnn.train import TrainConfig, Trainer, thread_limits  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description="fastrnn vs PyTorch: char-LM quality and speed "
                                            "at equal settings and time budget.")
    p.add_argument("--text", default=DEFAULT_TEXT, help="training text (default: tinyshakespeare)")
    p.add_argument("--config", metavar="FILE.toml", default=None,
                   help="a `fastrnn train` recipe: model, data, optimiser, schedule and "
                        "regularisation come from it (the options below that it sets are "
                        "ignored, except --budget, --threads, --max-steps and --seeds)")
    p.add_argument("--cells", default="lstm,gru", help="comma-separated: lstm,gru,rnn_tanh,rnn_relu")
    p.add_argument("--engines", default="fastrnn,torch", help="comma-separated: fastrnn,torch")
    p.add_argument("--budget", type=float, default=None,
                   help="training seconds per run (default 180, or the recipe's time budget)")
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
    p.add_argument("--seeds", default=None, help="comma-separated seeds, one run each "
                                                 "(default: --seed)")
    p.add_argument("--eval-every", type=float, default=None, metavar="SECONDS",
                   help="validate every this many training seconds for the curve (default: "
                        "the recipe's, or only at the end)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="also stop after this many steps (for equal-steps comparisons)")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="plot validation loss against training minutes (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the results as JSON last")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def make_config(args, cell, seed):
    """The TrainConfig of one run: from --config, or from the options."""
    if args.config:
        from fastrnn._configfile import read_config
        from fastrnn.cli import build_parser as cli_parser, config_from_args
        t = cli_parser()._train_parser
        values = read_config(t, args.config)
        ns = t.parse_args([])
        for k, v in values.items():
            setattr(ns, k, v)
        cfg = config_from_args(ns)
        cfg.time_budget = args.budget if args.budget is not None else (cfg.time_budget or 180.0)
        cfg.max_steps = args.max_steps
        cfg.epochs = None
        cfg.threads = args.threads
        cfg.seed = seed
        cfg.tokenizer = "char"
        if args.eval_every is not None:
            cfg.eval_every = args.eval_every or None
        return cfg.validate()
    return TrainConfig(cell=cell, layers=args.layers, hidden=args.hidden, embed=args.embed,
                       batch_size=args.batch_size, seq_len=args.seq_len, batching="sequential",
                       optimizer="adam", lr=args.lr, clip=args.clip,
                       time_budget=args.budget if args.budget is not None else 180.0,
                       max_steps=args.max_steps, val_fraction=args.val_fraction,
                       eval_every=args.eval_every or None, tokenizer="char", seed=seed,
                       threads=args.threads).validate()


def make_trainer(args, cell, text, seed=None):
    cfg = make_config(args, cell, args.seed if seed is None else seed)
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
            "val_ppl": res["val_ppl"], "val_curve": res["val_curve"],
            "final_lr": res["schedule"]["final_lr"], "interrupted": res.get("interrupted")}


class MaskReplay:
    """Draws, step by step, exactly the masks fastrnn's model draws: a fresh
    fastrnn model built from the same config owns identically seeded streams,
    and each stream is consumed in the same order with the same shapes."""

    def __init__(self, model_config):
        from fastrnn.lm import RNNLanguageModel
        self.src = RNNLanguageModel.from_config(model_config)
        self.src.train()

    def step(self, T, B):
        """-> dict: "in" (T or 1, B, E), "between" [per layer gap], "weight" {name: M},
        "out"; None where fastrnn draws nothing."""
        src = self.src
        E, H, L = src.embed_size, src.hidden_size, src.num_layers
        masks = {"in": None, "between": [None] * (L - 1), "weight": None, "out": None}
        if src.drop_in.p > 0:
            masks["in"] = src.drop_in.draw_mask(src.drop_in.mask_shape((T, B, E)), src.dtype)
        if src._weight_drop is not None:                  # drawn before the stack runs
            masks["weight"] = src._weight_drop.draw_masks()
        if src.rnn.dropout > 0:
            masks["between"] = [src.rnn._dropout_mask((T, B, H)) for _ in range(L - 1)]
        if src.drop_out.p > 0:
            masks["out"] = src.drop_out.draw_mask(src.drop_out.mask_shape((T, B, H)),
                                                  src.dtype)
        return masks


def build_torch_lm(cfg, V):
    import torch
    from torch import nn

    class TorchLM(nn.Module):
        """Embedding -> one torch RNN module per layer (so that fastrnn's masks can
        go between layers and onto W_hh) -> Linear."""

        def __init__(self):
            super().__init__()
            self.encoder = nn.Embedding(V, cfg.embed)
            layers = []
            for k in range(cfg.layers):
                i = cfg.embed if k == 0 else cfg.hidden
                if cfg.cell == "lstm":
                    layers.append(nn.LSTM(i, cfg.hidden, 1))
                elif cfg.cell == "gru":
                    layers.append(nn.GRU(i, cfg.hidden, 1))
                else:
                    layers.append(nn.RNN(i, cfg.hidden, 1, nonlinearity=cfg.cell[4:]))
            self.layers = nn.ModuleList(layers)
            self.decoder = nn.Linear(cfg.hidden, V)

        def load_fastrnn(self, sd):
            """fastrnn's state_dict (rnn.weight_ih_l{k}, ...) into the per-layer modules."""
            mine = {}
            for name, v in sd.items():
                if name.startswith("rnn."):
                    base, k = name[4:].rsplit("_l", 1)
                    mine[f"layers.{k}.{base}_l0"] = torch.tensor(v)
                else:
                    mine[name] = torch.tensor(v)
            self.load_state_dict(mine)

        def forward(self, x, state=None, masks=None):
            masks = masks or {}
            inp = self.encoder(x)
            if masks.get("in") is not None:
                inp = inp * torch.from_numpy(masks["in"])
            lstm = cfg.cell == "lstm"
            new_h, new_c = [], []
            for k, layer in enumerate(self.layers):
                st = None
                if state is not None:
                    st = ((state[0][k:k + 1], state[1][k:k + 1]) if lstm
                          else state[k:k + 1])
                wm = (masks.get("weight") or {}).get(f"weight_hh_l{k}")
                if wm is not None:               # W_hh * M; the gradient reaches raw W_hh
                    params = dict(layer.named_parameters())
                    params["weight_hh_l0"] = layer.weight_hh_l0 * torch.from_numpy(wm)
                    out, st = torch.func.functional_call(layer, params, (inp, st))
                else:
                    out, st = layer(inp, st)
                if lstm:
                    new_h.append(st[0])
                    new_c.append(st[1])
                else:
                    new_h.append(st)
                between = masks.get("between") or []
                if k < len(self.layers) - 1 and k < len(between) and between[k] is not None:
                    out = out * torch.from_numpy(between[k])
                inp = out
            if masks.get("out") is not None:
                inp = inp * torch.from_numpy(masks["out"])
            h = torch.cat(new_h, 0)
            return self.decoder(inp), ((h, torch.cat(new_c, 0)) if lstm else h)

    return TorchLM()


def torch_precision(cfg):
    """PyTorch's counterpart of the recipe's matmul precision: bf16 autocast for "medium"."""
    import torch
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.matmul_precision == "medium")


def torch_validate(model, trainer, V):
    """Every held-out token once, same layout as fastrnn.metrics.evaluate_lm."""
    import torch
    from torch import nn
    cfg = trainer.cfg
    xv, yv = eval_streams(trainer.val_ids, cfg.batch_size, pad_id=0, ignore_index=-100)
    was = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for i in range(0, xv.shape[0], cfg.eval_seq_len):
            with torch_precision(cfg):
                logits, state = model(torch.from_numpy(xv[i:i + cfg.eval_seq_len]), state)
            logits = logits.float()
            tgt = torch.from_numpy(yv[i:i + cfg.eval_seq_len])
            total += nn.functional.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1),
                                                 ignore_index=-100, reduction="sum").item()
            count += int((tgt != -100).sum())
    model.train(was)
    return total / count


def run_torch(trainer, init_state, args, model_config=None):
    """Train the equivalent torch model on the trainer's data, from init_state, with
    the trainer's schedule and (replayed) masks."""
    import torch
    from torch import nn

    cfg = trainer.cfg
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(args.threads)
    V = trainer.tokenizer.vocab_size
    budget = cfg.time_budget

    # one untimed step on a throw-away model: first-call costs stay out of the timing
    scratch = build_torch_lm(cfg, V)
    chunk = next(trainer.loader.epoch(0))
    with torch_precision(cfg):
        logits, _ = scratch(torch.from_numpy(chunk.x))
    nn.functional.cross_entropy(logits.float().reshape(-1, V),
                                torch.from_numpy(chunk.y).reshape(-1)).backward()
    del scratch

    model = build_torch_lm(cfg, V)
    model.load_fastrnn(init_state)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    schedule = LRSchedule(cfg.lr_schedule, cfg.lr, cfg.min_lr, cfg.warmup_steps)
    replay = MaskReplay(model_config or trainer.model.config())

    def detach(state):
        if state is None:
            return None
        return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()

    bar = None
    if not args.quiet:
        from fastrnn.train import progress_bar_class
        bar = progress_bar_class()(total=float(budget), unit="s", desc=f"torch {cfg.cell}",
                                   leave=False, file=sys.stderr,
                                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [ETA {remaining}{postfix}]")
    loader = trainer.loader
    steps = tokens = 0
    seconds = 0.0
    recent = []
    curve = []
    next_eval = cfg.eval_every or None
    state = None
    epoch = 0
    done = False
    lr = cfg.lr
    model.train()
    while not done:
        for chunk in loader.epoch(epoch):
            t0 = time.perf_counter()
            # the trainer's progress: the largest fraction of the limits that are set
            fr = [seconds / budget if budget else 0.0]
            if args.max_steps:
                fr.append(steps / args.max_steps)
            lr = schedule(steps, min(max(fr), 1.0))
            for g in opt.param_groups:
                g["lr"] = lr
            x = torch.from_numpy(chunk.x)
            y = torch.from_numpy(chunk.y)
            state = None if chunk.reset else detach(state)      # gradient cut at the border
            opt.zero_grad(set_to_none=False)
            with torch_precision(cfg):
                logits, state = model(x, state, replay.step(*chunk.x.shape))
            loss = loss_fn(logits.float().reshape(-1, V), y.reshape(-1))
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
            finished = seconds >= budget or (args.max_steps and steps >= args.max_steps)
            if next_eval is not None and seconds >= next_eval and not finished:
                next_eval = seconds + cfg.eval_every
                curve.append({"seconds": round(seconds, 3), "step": steps,
                              "val_loss": torch_validate(model, trainer, V)})
            if finished:
                done = True
                break
        epoch += 1
    if bar is not None:
        bar.close()
    val = torch_validate(model, trainer, V)
    curve.append({"seconds": round(seconds, 3), "step": steps, "val_loss": val})
    return {"engine": "torch", "steps": steps, "train_tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "train_loss": float(np.mean(recent)) if recent else None, "val_loss": val,
            "val_ppl": math.exp(val), "val_curve": curve, "final_lr": lr}


def plot_curves(rows, path, title):
    """Validation loss against training minutes, one line per engine and seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = {"fastrnn": "tab:blue", "torch": "tab:orange"}
    for r in rows:
        if "error" in r or not r.get("val_curve"):
            continue
        xs = [c["seconds"] / 60 for c in r["val_curve"]]
        ys = [c["val_loss"] for c in r["val_curve"]]
        label = {"fastrnn": "fastrnn", "torch": "PyTorch"}[r["engine"]]
        ax.plot(xs, ys, marker="o", ms=3, color=colours[r["engine"]],
                label=f"{label} {r['cell']} seed {r['seed']}: {ys[-1]:.4f}",
                alpha=0.9 if r["seed"] == rows[0]["seed"] else 0.6)
    ax.set_xlabel("training minutes")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title(textwrap.fill(title, 100), fontsize=8)   # the machine line is long
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(rows):
    head = ("cell", "seed", "engine", "steps", "tokens", "tokens/s", "train loss", "val loss",
            "val ppl")
    lines = ["{:<9} {:>4} {:<8} {:>7} {:>11} {:>10} {:>10} {:>9} {:>8}".format(*head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['cell']:<9} {r.get('seed', ''):>4} {r['engine']:<8} {r['error']}")
            continue
        lines.append("{:<9} {:>4} {:<8} {:>7} {:>11,} {:>10,.0f} {:>10.4f} {:>9.4f} {:>8.2f}"
                     .format(r["cell"], r.get("seed", ""), r["engine"], r["steps"],
                             r["train_tokens"], r["tokens_per_s"],
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
    seeds = ([int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds
             else [args.seed])
    if args.config:
        cells = [make_config(args, None, seeds[0]).cell]
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    cfg0 = make_config(args, cells[0], seeds[0])
    fc = fastrnn.config()
    with _precision.scoped(cfg0.matmul_precision):   # what the runs will do
        bf16_products = _precision.bf16_products(np.float32)
    cpu = (f"{fc.get('cpu') or platform.processor() or 'unknown CPU'}, "
           f"{os.cpu_count()} CPUs, ISA {fc.get('isa')}, matmul precision "
           f"{cfg0.matmul_precision}"
           + (" (bf16 products)" if bf16_products else ""))
    recipe = f"recipe {args.config}: " if args.config else ""
    print(f"quality target: {args.text}, {recipe}char tokens, {cfg0.layers} layer(s) x "
          f"{cfg0.hidden}, embed {cfg0.embed}, batch {cfg0.batch_size}, seq-len "
          f"{cfg0.seq_len}, Adam lr {cfg0.lr} ({cfg0.lr_schedule}, warmup "
          f"{cfg0.warmup_steps}, min {cfg0.min_lr}), clip {cfg0.clip}, dropout "
          f"{cfg0.dropout}{' locked' if cfg0.locked_dropout else ''}, weight drop "
          f"{cfg0.weight_drop}, budget {cfg0.time_budget:g} s per run, val-fraction "
          f"{cfg0.val_fraction}, {args.threads} threads, seeds {seeds}, {cpu}", flush=True)
    rows = []
    stopped = False
    for seed in seeds:
        if stopped:
            break
        for cell in cells:
            if stopped:
                break
            trainer = make_trainer(args, cell, text, seed)
            init_state = trainer.model.state_dict()   # the torch run starts from these weights
            model_config = trainer.model.config()     # (mask streams before any are used)
            for engine in engines:
                if engine == "fastrnn":
                    row = run_fastrnn(trainer, args)
                    if row.pop("interrupted", None):       # SIGINT/SIGTERM: report what finished
                        print(f"{cell} fastrnn seed {seed}: interrupted, no validation; "
                              f"stopping", flush=True)
                        stopped = True
                        break
                else:
                    try:
                        import torch  # noqa: F401
                    except ImportError:
                        row = {"engine": "torch", "error": "not installed (skipped)"}
                    else:
                        with thread_limits(args.threads):
                            row = run_torch(trainer, init_state, args, model_config)
                row["cell"] = cell
                row["seed"] = seed
                rows.append(row)
                if "error" not in row:
                    print(f"{cell} {engine} seed {seed}: val loss {row['val_loss']:.4f} (ppl "
                          f"{row['val_ppl']:.2f}), {row['tokens_per_s']:,.0f} tokens/s, "
                          f"{row['steps']} steps", flush=True)
    print()
    print(format_table(rows))
    if args.plot:
        title = (f"{os.path.basename(args.config) if args.config else 'quality target'}: "
                 f"{cfg0.cell} {cfg0.layers}x{cfg0.hidden}, {cfg0.time_budget:g} s budget, "
                 f"{args.threads} threads, {cpu}")
        plot_curves(rows, args.plot, title)
        print(f"plot written to {args.plot}")
    if args.json:
        print(json.dumps({"settings": vars(args), "machine": platform.platform(), "cpu": cpu,
                          "train_config": cfg0.to_dict(),
                          "fastrnn_config": fastrnn.config(), "results": rows}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
