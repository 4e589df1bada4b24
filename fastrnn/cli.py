"""Command line: ``fastrnn train``, ``fastrnn generate``, ``fastrnn bench``.

    fastrnn train [TEXTFILE] [options]    train a language model (default text:
                                          the bundled tinyshakespeare.txt)
    fastrnn generate CHECKPOINT [options] sample text from a trained model
    fastrnn bench [...]                   speed benchmarks (fastrnn.benchmark.runner)
    fastrnn predict MODEL INPUT -o OUT    batch inference on Dask (fastrnn.predict_cli)
    fastrnn bench --onnx FILE [...]       an ONNX file imported into fastrnn vs ONNX Runtime

Run ``fastrnn train --help`` for every option. ``--json`` makes the last line
of output a JSON object with the results. ``fastrnn train --config FILE.toml``
reads options from a TOML file (keys are the option names; flags given on the
command line override the file), see :mod:`fastrnn._configfile`.
"""

import argparse
import json
import math
import os
import shlex
import signal
import sys
import time

from fastrnn._argtypes import fraction as _fraction
from fastrnn._argtypes import nonneg_float as _nonneg_float
from fastrnn._argtypes import nonneg_int as _nonneg_int
from fastrnn._argtypes import positive_float as _positive_float
from fastrnn._argtypes import positive_int as _positive_int
from fastrnn._argtypes import thread_count as _thread_count

__all__ = ["main", "build_parser", "DEFAULT_TEXT"]

DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                            "tinyshakespeare.txt")


class CLIError(Exception):
    pass


# Tokens one command may generate: a sanity bound (at ~10^4 tokens/s, hours), so that
# a mistyped length is a usage error and not an out-of-memory failure after training.
MAX_GENERATE = 10**8

# Options of `fastrnn train --resume` that apply to the resumed run; every other
# training setting comes from the checkpoint (said on stderr when given).
RESUME_OVERRIDES = ("epochs", "time_budget", "max_steps", "threads", "eval_every",
                    "skip_nonfinite")


def _check_outputs(args, text_path):
    """--save / --save-best checked before training, so that a run is not lost to a
    path found bad only when the checkpoint is written, and no run overwrites its
    own training text or its best checkpoint with its last (found by an audit)."""
    paths = [(opt, p) for opt, p in (("--save", args.save), ("--save-best", args.save_best))
             if p is not None]
    for opt, p in paths:
        if not p:
            raise CLIError(f"{opt}: expected a file path, got ''")
        if os.path.isdir(p):
            raise CLIError(f"{opt}: {p} is a directory; give a file path (e.g. {p}/model.npz)")
        parent = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(parent):
            raise CLIError(f"{opt}: {parent} is not a directory" if os.path.exists(parent)
                           else f"{opt}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise CLIError(f"{opt}: cannot write into {parent} (permission denied)")
        if _same_file(p, text_path):
            raise CLIError(f"{opt}: {p} is the training text; the checkpoint would "
                           f"overwrite it")
        if getattr(args, "config", None) and _same_file(p, args.config):
            raise CLIError(f"{opt}: {p} is the --config file; the checkpoint would "
                           f"overwrite it")
    if len(paths) == 2 and _same_file(args.save, args.save_best):
        raise CLIError(f"--save and --save-best name the same file ({args.save}); the final "
                       f"checkpoint would replace the best one")
    if args.save_every is not None and args.save is None:
        raise CLIError("--save-every needs --save PATH (where to write the checkpoints)")
    if args.sample_length > MAX_GENERATE:
        raise CLIError(f"--sample-length: expected at most {MAX_GENERATE:,}, got "
                       f"{args.sample_length:,}")


def _same_file(a, b):
    """a and b are one file: the same inode if both exist, else the same real path."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _typed_dests(parser, argv):
    """The destinations of the options present in argv (argparse's unique prefixes too)."""
    opts = parser._option_string_actions
    dests = set()
    for tok in argv:
        if not tok.startswith("--") or tok == "--":
            continue
        name = tok.split("=", 1)[0]
        hits = [opts[name]] if name in opts else [a for o, a in opts.items() if o.startswith(name)]
        if len({id(a) for a in hits}) == 1:
            dests.add(hits[0].dest)
    return dests


def _given_on_resume(args):
    """Training settings given with --resume, on the command line or in a --config
    file (whatever their value: one equal to the built-in default counts too): the
    checkpoint's replace them."""
    import dataclasses

    from fastrnn.train import TrainConfig
    given = set(getattr(args, "_typed", ())) | set(getattr(args, "config_values", None) or ())
    return [f.name for f in dataclasses.fields(TrainConfig)
            if f.name not in RESUME_OVERRIDES and f.name in given and hasattr(args, f.name)]


def _weight_fraction(s):
    return _fraction(s)


def build_parser():
    from fastrnn.train import TrainConfig
    d = TrainConfig()
    from fastrnn import __version__
    p = argparse.ArgumentParser(prog="fastrnn", description="fastrnn: CPU recurrent networks.")
    p.add_argument("--version", action="version", version=f"fastrnn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,generate,bench,predict}")
    sub.required = True

    t = sub.add_parser("train", help="train a language model on a text file",
                       description="Train a recurrent language model on a text file with "
                                   "truncated BPTT, then report validation loss and print a "
                                   "sample. Without TEXTFILE the bundled tinyshakespeare.txt "
                                   "is used.")
    t.add_argument("textfile", nargs="?", default=None,
                   help="UTF-8 text to train on (default: bundled tinyshakespeare)")
    t.add_argument("--config", metavar="FILE.toml", default=None,
                   help="read options from a TOML file (keys: these option names, e.g. "
                        "hidden = 512, time-budget = 900); options given on the command "
                        "line override it")
    t.add_argument("--print-config", action="store_true",
                   help="print the effective options as a TOML config file and exit")
    g = t.add_argument_group("model")
    g.add_argument("--cell", choices=["rnn_tanh", "rnn_relu", "lstm", "gru"], default=d.cell)
    g.add_argument("--layers", type=_positive_int, default=d.layers)
    g.add_argument("--hidden", type=_positive_int, default=d.hidden, help="hidden units per layer")
    g.add_argument("--embed", type=_positive_int, default=d.embed, help="embedding size")
    g.add_argument("--dtype", choices=["float32", "float64"], default=d.dtype)
    g = t.add_argument_group("regularisation")
    g.add_argument("--dropout", type=_fraction, default=d.dropout,
                   help="dropout on the embeddings, between layers and before the decoder")
    g.add_argument("--locked-dropout", action="store_true",
                   help="draw those dropout masks once per sequence, shared by all time "
                        "steps of a chunk (variational dropout)")
    g.add_argument("--weight-drop", type=_weight_fraction, default=d.weight_drop,
                   metavar="P", help="DropConnect on the recurrent weights W_hh: one mask "
                                     "per batch (AWD-LSTM's weight drop)")
    g = t.add_argument_group("data")
    g.add_argument("--tokenizer", choices=["char", "word", "bpe"], default=d.tokenizer)
    g.add_argument("--bpe-merges", type=_positive_int, default=d.bpe_merges)
    g.add_argument("--word-min-freq", type=_positive_int, default=d.word_min_freq,
                   help="word tokenizer: words seen fewer times are <unk>")
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help="parallel streams (B)")
    g.add_argument("--seq-len", type=_positive_int, default=d.seq_len,
                   help="truncated-BPTT chunk length (T)")
    g.add_argument("--batching", choices=["sequential", "random"], default=d.batching,
                   help="sequential: state carried across chunks; random: random chunks, "
                        "state reset")
    g.add_argument("--val-fraction", type=_fraction, default=d.val_fraction,
                   help="hold out this last fraction of the text for validation")
    g = t.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default=d.optimizer)
    g.add_argument("--lr", type=_positive_float, default=d.lr,
                   help="learning rate (the peak, with a schedule)")
    g.add_argument("--momentum", type=_nonneg_float, default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=_nonneg_float, default=d.weight_decay)
    g.add_argument("--clip", type=_nonneg_float, default=d.clip,
                   help="clip the gradient norm to this (0: no clipping)")
    g.add_argument("--clip-value", type=_nonneg_float, default=d.clip_value,
                   help="first clamp every gradient value to [-this, this] (0, the default: "
                        "no; torch's clip_grad_value_)")
    g = t.add_argument_group("schedule")
    g.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"],
                   default=d.lr_schedule,
                   help="learning-rate schedule from --lr to --min-lr; driven by training "
                        "time under --time-budget, else by steps (--max-steps/--epochs)")
    g.add_argument("--warmup-steps", type=_nonneg_int, default=d.warmup_steps, metavar="N",
                   help="ramp the learning rate up linearly over the first N steps")
    g.add_argument("--min-lr", type=_nonneg_float, default=d.min_lr,
                   help="learning rate at the end of a cosine/linear schedule")
    g = t.add_argument_group("run")
    g.add_argument("--epochs", type=_nonneg_float, default=None,
                   help="passes over the training text (may be fractional; default 1 "
                        "unless --time-budget or --max-steps is given)")
    g.add_argument("--time-budget", type=_nonneg_float, default=None, metavar="SECONDS",
                   help="stop training after this many seconds")
    g.add_argument("--max-steps", type=_positive_int, default=None)
    g.add_argument("--eval-every", type=_nonneg_float, default=None, metavar="SECONDS",
                   help=f"validate every this many seconds of training (0: only at the end; "
                        f"default {d.eval_every:g}, or the checkpoint's with --resume)")
    g.add_argument("--eval-seq-len", type=_positive_int, default=d.eval_seq_len, metavar="T",
                   help="chunk length of validation (the state is carried; no effect on "
                        "the loss beyond float rounding)")
    g.add_argument("--seed", type=_nonneg_int, default=d.seed)
    g.add_argument("--threads", type=_thread_count, default=None)
    g.add_argument("--matmul-precision", choices=["highest", "high", "medium"],
                   default=d.matmul_precision,
                   help="float32 matrix products: 'medium' rounds their operands to bf16 "
                        "(float32 sums) where that is faster: AMX-BF16 tiles (Intel Xeon "
                        "from Sapphire Rapids on) and AVX512-BF16 on AMD Zen 4 (about 1.8x "
                        "per LSTM layer there); elsewhere it runs float32. 'highest' "
                        "(default) and 'high' keep float32 (docs/precision.md)")
    g.add_argument("--save", metavar="PATH", default=None, help="write a checkpoint (.npz)")
    g.add_argument("--save-every", type=_positive_int, default=None, metavar="STEPS")
    g.add_argument("--save-best", metavar="PATH", default=None,
                   help="keep a checkpoint of the model with the best validation loss seen "
                        "(at --eval-every and at the end) in PATH")
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a step whose loss or gradient norm is NaN/inf (counted as "
                        "skipped_steps) instead of stopping")
    g.add_argument("--resume", metavar="CHECKPOINT", default=None,
                   help="continue a run saved with --save (same text; model, optimiser and "
                        "data settings come from the checkpoint)")
    g.add_argument("--sample-length", type=_nonneg_int, default=300,
                   help="characters/tokens to generate after training (0: none)")
    g.add_argument("--temperature", type=_nonneg_float, default=0.8)
    g.add_argument("--json", action="store_true",
                   help="print a JSON summary as the last line of output")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    gen = sub.add_parser("generate", help="sample text from a checkpoint",
                         description="Generate text from a model saved with "
                                     "`fastrnn train --save`.")
    gen.add_argument("checkpoint")
    gen.add_argument("--prime", default="", help="text to start from")
    gen.add_argument("--length", type=_positive_int, default=500, help="tokens to generate")
    gen.add_argument("--temperature", type=_nonneg_float, default=0.8,
                     help="sampling temperature (0: greedy)")
    gen.add_argument("--top-k", type=_positive_int, default=None)
    gen.add_argument("--greedy", action="store_true", help="always take the most likely token")
    gen.add_argument("--seed", type=_nonneg_int, default=None)
    gen.add_argument("--threads", type=_thread_count, default=None)
    gen.add_argument("--num-samples", type=_positive_int, default=None, metavar="N",
                     help="sample N texts at once (one batch; sample i has its own random "
                          "stream from --seed)")
    gen.add_argument("--quantize", choices=["int8", "bfloat16"], default=None,
                     help="generate from an int8 / bfloat16 copy of the model")
    gen.add_argument("--json", action="store_true")

    sub.add_parser("bench", help="speed benchmarks (see `fastrnn bench --help`)",
                   add_help=False)
    sub.add_parser("predict", help="batch inference on Dask (see `fastrnn predict --help`)",
                   add_help=False)
    p._train_parser = t
    return p


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise CLIError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise CLIError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise CLIError(f"{path}: cannot read ({e.strerror or e})") from None


def _fmt(x, spec=".4f"):
    return "n/a" if x is None else format(x, spec)


def cmd_train(args, out):
    from fastrnn.generate import generate
    from fastrnn.train import Trainer
    from fastrnn import _precision

    path = DEFAULT_TEXT if args.textfile is None else args.textfile   # "" is a bad path
    text = _read_text(path)
    name = os.path.basename(path)
    _check_outputs(args, path)
    if args.resume:
        given = _given_on_resume(args)
        overrides = dict(epochs=args.epochs, time_budget=args.time_budget,
                         max_steps=args.max_steps)
        if args.threads is not None:      # given: else the checkpoint's thread count stays
            overrides["threads"] = args.threads
        if args.eval_every is not None:   # given: else the checkpoint's stays
            overrides["eval_every"] = args.eval_every
        if args.skip_nonfinite:
            overrides["skip_nonfinite"] = True
        trainer = Trainer.resume(args.resume, text, text_name=name, **overrides)
        ignored = [n for n in given if getattr(trainer.cfg, n) != getattr(args, n)]
        if ignored:   # were dropped without a word (found by an audit)
            print("fastrnn train: --resume: the checkpoint's settings are used; ignoring "
                  + ", ".join(f"--{n.replace('_', '-')} {getattr(args, n)}" for n in ignored)
                  + " (the checkpoint has "
                  + ", ".join(f"{getattr(trainer.cfg, n)}" for n in ignored) + ")",
                  file=sys.stderr)
    else:
        trainer = Trainer(config_from_args(args), text, text_name=name)
    cfg = trainer.cfg
    if args.save_best and len(trainer.val_ids) == 0:
        raise CLIError("--save-best needs validation data; --val-fraction is 0")
    print(f"config{' (' + args.config + ' + command line)' if args.config else ''}: "
          + effective_config_line(cfg), file=out, flush=True)
    nparams = sum(p.data.size for p in trainer.model.parameters())
    print(f"{name}: {len(trainer.train_ids):,} training and {len(trainer.val_ids):,} "
          f"validation tokens ({cfg.tokenizer}, vocabulary {trainer.tokenizer.vocab_size:,}); "
          f"{cfg.cell} {cfg.layers}x{cfg.hidden}, embed {cfg.embed}, "
          f"{nparams:,} parameters", file=out, flush=True)
    if cfg.matmul_precision == "medium" and not _precision.medium_runs_bf16():
        print("matmul-precision 'medium': this CPU runs bf16 products no faster than "
              "float32 (that needs AMX-BF16 tiles or AVX512-BF16 on AMD Zen 4), so they run in float32 "
              "(docs/precision.md)", file=out, flush=True)
    res = trainer.run(progress=not args.no_progress, save_path=args.save,
                      save_every=args.save_every, save_best=args.save_best,
                      log=lambda m: print(m, file=out, flush=True))
    print(f"trained {res['steps']} steps, {res['train_tokens']:,} tokens in "
          f"{res['seconds']:.1f} s ({res['tokens_per_s']:,.0f} tokens/s); "
          f"train loss {_fmt(res['train_loss'])}", file=out)
    if res["val_loss"] is not None:
        print(f"validation loss {res['val_loss']:.4f} nats/token, perplexity "
              f"{res['val_ppl']:.2f} ({res['val_tokens']:,} tokens)", file=out)
    if res.get("skipped_steps"):
        print(f"skipped {res['skipped_steps']} step(s) with a non-finite loss or gradient",
              file=out)
    res["checkpoint"] = res["sample"] = None       # (always present in --json: null if none)
    if args.save:
        print(f"checkpoint saved to {args.save}", file=out)
        res["checkpoint"] = args.save
    if args.save_best and res.get("best_val_loss") is not None:
        print(f"best validation loss {res['best_val_loss']:.4f} at step {res['best_step']}: "
              f"checkpoint in {args.save_best}", file=out)
        res["best_checkpoint"] = args.save_best
    res["config"] = cfg.to_dict()
    if args.config:
        res["config_file"] = args.config
    if res.get("interrupted"):
        if args.time_budget is not None:
            args._time_left = max(args.time_budget - res["seconds"], 0.0)
        if args.json:
            print(json.dumps(_jsonable(res), allow_nan=False), file=out)
        out.flush()
        print(f"fastrnn train: interrupted by {res['interrupted']} after step "
              f"{res['total_steps']}; {_resume_hint(args)}", file=sys.stderr, flush=True)
        return 128 + int(getattr(signal, res["interrupted"]))
    sample = None
    if args.sample_length > 0:
        sample = generate(trainer.model, trainer.tokenizer, length=args.sample_length,
                          temperature=args.temperature, seed=cfg.seed)
        print("--- sample ---", file=out)
        print(sample, file=out)
        print("--------------", file=out)
        res["sample"] = sample
    if args.json:
        print(json.dumps(_jsonable(res), allow_nan=False), file=out)
    return 0


def _resume_hint(args):
    if not args.save:
        return "no checkpoint was written (run with --save PATH to be able to resume)"
    cmd = ["fastrnn", "train"] + ([args.textfile] if args.textfile else [])
    cmd += ["--resume", args.save, "--save", args.save]
    for opt in ("max_steps", "epochs", "save_every", "save_best", "threads"):
        if getattr(args, opt) is not None:
            cmd += ["--" + opt.replace("_", "-"), str(getattr(args, opt))]
    left = getattr(args, "_time_left", None)
    if left is not None:
        cmd += ["--time-budget", f"{left:.1f}"]
    return (f"checkpoint saved to {args.save}; resume with:\n  "
            + " ".join(shlex.quote(c) for c in cmd))


def config_from_args(args):
    """The TrainConfig that parsed ``fastrnn train`` arguments describe."""
    import dataclasses

    from fastrnn.train import TrainConfig
    values = {f.name: getattr(args, f.name)
              for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if values.get("eval_every", 0) is None:    # --eval-every not given: the default
        del values["eval_every"]
    return TrainConfig(**values)


def effective_config_line(cfg):
    """``key=value`` for every training setting, on one line (printed before training)."""
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                    for k, v in cfg.to_dict().items())


def _jsonable(v):
    """v with every non-finite float, however deep in dicts and lists, as None: strict
    JSON has no NaN or Infinity (a validation curve of a run that diverged has them)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def cmd_generate(args, out):
    from fastrnn.checkpoint import load_checkpoint
    from fastrnn.generate import generate
    from fastrnn.train import thread_limits

    if args.length * (args.num_samples or 1) > MAX_GENERATE:
        raise CLIError(f"--length x --num-samples: expected at most {MAX_GENERATE:,} tokens, "
                       f"got {args.length * (args.num_samples or 1):,}")
    ckpt = load_checkpoint(args.checkpoint)
    tok = ckpt.build_tokenizer()
    if tok is None:
        raise CLIError(f"{args.checkpoint}: checkpoint has no vocabulary; cannot generate text")
    model = ckpt.build_model()
    if args.quantize:
        import fastrnn
        model = fastrnn.quantize(model, args.quantize)
    try:
        with thread_limits(args.threads):
            t0 = time.perf_counter()
            text = generate(model, tok, prime=args.prime, length=args.length,
                            temperature=args.temperature, top_k=args.top_k,
                            greedy=args.greedy, seed=args.seed, num_samples=args.num_samples)
            seconds = time.perf_counter() - t0
    except KeyError as e:
        raise CLIError(f"--prime: {e.args[0]}") from None
    texts = [text] if args.num_samples is None else text
    for k, t in enumerate(texts):
        if args.num_samples is not None:
            print(f"--- sample {k + 1} of {len(texts)} ---", file=out)
        print(_joined(tok, args.prime, t), file=out)
    tokens = args.length * len(texts)
    tps = tokens / seconds if seconds > 0 else None
    print(f"generated {len(texts)} x {args.length} tokens in {seconds:.3f} s "
          f"({tps:,.0f} tokens/s, priming included)" if tps else
          f"generated {len(texts)} x {args.length} tokens", file=sys.stderr)
    if args.json:
        res = {"prime": args.prime, "length": args.length, "seconds": seconds,
               "tokens_per_s": tps}
        if args.num_samples is None:
            res["text"] = text
        else:
            res["texts"] = texts
        print(json.dumps(res), file=out)
    return 0


def _joined(tok, prime, text):
    """The prime and its continuation as one text: words are separated by a space
    (a word tokenizer decodes without a leading one), characters are not."""
    from fastrnn.data.tokenizers import WordTokenizer
    if (isinstance(tok, WordTokenizer) and prime and text and not prime[-1].isspace()
            and not text[0].isspace()):
        return prime + " " + text
    return prime + text


def cmd_bench(argv):
    if any(a == "--onnx" or a.startswith("--onnx=") for a in argv):
        from fastrnn.benchmark import onnx_file  # time an ONNX file: fastrnn vs ONNX Runtime
        return onnx_file.main(argv)
    from fastrnn.benchmark import runner  # imported lazily: optional, heavier
    rc = runner.main(argv)
    return 0 if rc is None else rc


def main(argv=None):
    """Entry point of the ``fastrnn`` console script. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    if argv and argv[0] == "predict":
        from fastrnn import predict_cli  # imported lazily: needs the optional Dask extra
        return predict_cli.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from fastrnn._configfile import ConfigFileError, apply_config_file, config_to_toml
    from fastrnn.checkpoint import CheckpointError
    out = sys.stdout
    if args.command == "train" and args.config:
        try:
            args = apply_config_file(parser._train_parser, args.config, argv[1:])
        except ConfigFileError as e:
            print(f"fastrnn train: error: {e}", file=sys.stderr)
            return 2
    if args.command == "train":
        args._typed = _typed_dests(parser._train_parser, argv[1:])
    if args.command == "train" and args.print_config:
        if args.resume:   # what would run is the checkpoint's, not these
            print("fastrnn train: error: --print-config: not with --resume (a resumed run "
                  "takes its settings from the checkpoint)", file=sys.stderr)
            return 2
        print(config_to_toml(parser._train_parser, args), file=out, end="")
        return 0
    try:
        if args.command == "train":
            return cmd_train(args, out)
        if args.command == "generate":
            return cmd_generate(args, out)
    except (CLIError, CheckpointError, ValueError, FloatingPointError) as e:
        print(f"fastrnn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:   # sizes too large for this machine: say so, no traceback
        print(f"fastrnn {args.command}: error: out of memory ({type(e).__name__}: {e}); use "
              f"smaller sizes", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastrnn {args.command}: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
