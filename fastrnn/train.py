"""Training loop for recurrent language models (used by ``fastrnn train``,
``bench/quality.py`` and the word-LM example).

:class:`TrainConfig` holds every setting; :class:`Trainer` owns the data,
tokenizer, model, optimiser and position in the data, and can save and resume
a checkpoint such that the resumed run is bit-for-bit the uninterrupted one.

Data: the text is split by characters; the last ``val_fraction`` is held out
for validation. The vocabulary is built from the training part (the character
alphabet, also for BPE, is taken from the whole text so validation never
meets an unknown character; the word vocabulary maps unseen words to
``<unk>``). Training walks the training ids with truncated BPTT
(:class:`fastrnn.data.batching.TBPTTLoader`); validation covers every token of
the held-out part (:func:`fastrnn.metrics.evaluate_lm`).

The learning rate follows ``lr_schedule`` (:mod:`fastrnn.schedule`), driven by
elapsed training time under ``time_budget`` and by steps (or epochs)
otherwise; see :meth:`Trainer.progress`. Regularisation: ``dropout`` (with
``locked_dropout``, one mask per sequence) and ``weight_drop`` (DropConnect on
W_hh), see :class:`fastrnn.lm.RNNLanguageModel`.
"""

import contextlib
import dataclasses
import hashlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from fastrnn import _precision
from fastrnn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastrnn.data.batching import TBPTTLoader
from fastrnn.data.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer
from fastrnn.lm import CELLS, RNNLanguageModel
from fastrnn.metrics import evaluate_lm, perplexity
from fastrnn.nn.loss import softmax_cross_entropy
from fastrnn.optim import SGD, Adam, clip_grad_norm, clip_grad_value, grad_norm
from fastrnn.schedule import SCHEDULES, LRSchedule

__all__ = ["TrainConfig", "Trainer", "NonFiniteError", "split_text", "build_tokenizer",
           "thread_limits"]

PROGRESS_SECONDS = 5.0   # seconds between progress lines when stderr is not a terminal
RECENT_STEPS = 50         # the result's train_loss: the mean over this many last steps


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm of a step was NaN or infinite (training stopped
    before the step changed the model). ``step`` is the number of that step."""

    def __init__(self, message, step):
        super().__init__(message)
        self.step = step


@dataclass
class TrainConfig:
    """Every training setting. ``None`` for ``epochs``/``time_budget``/
    ``max_steps`` means "no limit"; with none of the three set, one epoch."""
    cell: str = "lstm"
    layers: int = 1
    hidden: int = 256
    embed: int = 64
    dropout: float = 0.0
    locked_dropout: bool = False       # dropout masks (1, B, F): one per sequence, all steps
    weight_drop: float = 0.0           # DropConnect on W_hh, one mask per batch
    batch_size: int = 32
    seq_len: int = 64
    batching: str = "sequential"       # or "random"
    optimizer: str = "adam"            # or "sgd"
    lr: float = 2e-3
    lr_schedule: str = "constant"      # "constant", "cosine" or "linear"
    warmup_steps: int = 0              # linear warm-up over this many steps
    min_lr: float = 0.0                # where "cosine"/"linear" end
    momentum: float = 0.0              # SGD only
    weight_decay: float = 0.0
    clip: float = 5.0                  # max gradient norm; 0 disables clipping
    clip_value: float = 0.0            # clamp each gradient value to [-this, this] first; 0: no
    epochs: Optional[float] = None
    time_budget: Optional[float] = None
    max_steps: Optional[int] = None
    val_fraction: float = 0.1
    eval_every: Optional[float] = 60.0  # seconds of training between validations; 0/None: end only
    eval_seq_len: int = 256
    tokenizer: str = "char"            # "char", "word" or "bpe"
    bpe_merges: int = 256
    word_min_freq: int = 1
    seed: int = 0
    threads: Optional[int] = None
    dtype: str = "float32"
    matmul_precision: str = "highest"  # "medium": float32 GEMMs on bf16 operands where faster
    skip_nonfinite: bool = False       # skip steps with a NaN/inf loss or gradient norm

    def validate(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.tokenizer not in ("char", "word", "bpe"):
            raise ValueError(f"tokenizer must be char, word or bpe, got {self.tokenizer!r}")
        if self.batching not in ("sequential", "random"):
            raise ValueError(f"batching must be sequential or random, got {self.batching!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("layers", "hidden", "embed", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.weight_drop < 1.0:
            raise ValueError(f"weight_drop must be in [0, 1), got {self.weight_drop}")
        if not isinstance(self.locked_dropout, bool):
            raise ValueError(f"locked_dropout must be true or false, got {self.locked_dropout!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        from fastrnn._precision import PRECISIONS
        if self.matmul_precision not in PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.matmul_precision!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, "
                             f"got {self.lr_schedule!r}")
        # what the command line's types hold its flags to, for a config built in Python
        # too (a NaN time budget trained forever, eval_seq_len 0 failed after training)
        def number(name, minimum, integer=False, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            ok = (not isinstance(v, bool) and isinstance(v, (int, np.integer))) if integer \
                else (not isinstance(v, bool) and isinstance(v, (int, float, np.integer,
                                                                  np.floating))
                      and math.isfinite(v))
            if not ok or v < minimum:
                kind = "an integer" if integer else "a finite number"
                raise ValueError(f"{name} must be {kind} >= {minimum}"
                                 f"{' or None' if optional else ''}, got {v!r}")
        for name in ("epochs", "time_budget", "eval_every"):
            number(name, 0, optional=True)
        number("max_steps", 1, integer=True, optional=True)
        number("threads", 1, integer=True, optional=True)
        for name in ("eval_seq_len", "word_min_freq", "bpe_merges"):
            number(name, 1, integer=True)
        number("seed", 0, integer=True)
        for name in ("momentum", "weight_decay", "clip", "clip_value"):
            number(name, 0)
        self.schedule()        # checks min_lr and warmup_steps
        return self

    def schedule(self):
        """The :class:`fastrnn.schedule.LRSchedule` these settings describe."""
        return LRSchedule(self.lr_schedule, self.lr, self.min_lr, self.warmup_steps)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def split_text(text, val_fraction):
    """-> (train_text, val_text): the last ``val_fraction`` of the characters."""
    n_val = int(len(text) * val_fraction)
    if val_fraction > 0 and n_val < 2:
        n_val = 2 if len(text) > 4 else 0
    cut = len(text) - n_val
    return text[:cut], text[cut:]


def build_tokenizer(cfg, train_text, full_text):
    if cfg.tokenizer == "char":
        return CharTokenizer.fit(full_text)
    if cfg.tokenizer == "word":
        return WordTokenizer.fit(train_text, min_freq=cfg.word_min_freq)
    return BPETokenizer.fit(train_text, num_merges=cfg.bpe_merges, alphabet=full_text)


@contextlib.contextmanager
def thread_limits(threads):
    """Run fastrnn's kernels on ``threads`` (None: leave as is) and NumPy's BLAS on one.

    NumPy's BLAS (the dense layers: a few per cent of the work) keeps one
    thread: a second thread pool would spin after each call and take cores
    from the kernels' OpenMP team (measured: backward 145 ms against 91 ms).
    """
    import fastrnn
    old = fastrnn.get_num_threads()
    if threads:
        fastrnn.set_num_threads(int(threads))
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl is a dependency
            yield
        else:
            with threadpool_limits(limits=1, user_api="blas"):
                yield
    finally:
        fastrnn.set_num_threads(old)


def _text_digest(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


LAYER_OVERHEAD_BYTES = 8192


def _check_model_fits(cfg, V):
    """Refuse sizes whose parameters, gradients and optimiser state (four values a
    parameter) would not fit in this machine's memory, before building any of it: a
    mistyped --layers 100000000 otherwise ran for minutes, --hidden 10**9 ended in
    a traceback (found by an audit)."""
    G = {"lstm": 4, "gru": 3}.get(cfg.cell, 1)
    E, H, L = cfg.embed, cfg.hidden, cfg.layers
    n = V * E + G * H * (E + H + 2) + (L - 1) * G * H * (2 * H + 2) + V * (H + 1)
    # + each layer's Python objects and arrays (about 5 KB measured at H=2): many
    # thin layers take far more than their values
    need = 4 * n * np.dtype(cfg.dtype).itemsize + L * LAYER_OVERHEAD_BYTES
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # not POSIX: let allocation decide
        return
    if have <= 0:   # sysconf could not tell
        return
    if need > have:
        raise ValueError(f"the model would have {n:,} parameters in {L:,} layers "
                         f"({need / 2**30:,.1f} GiB with gradients, optimiser state and the "
                         f"layers' own objects), more than this machine's "
                         f"{have / 2**30:,.1f} GiB of memory; use a smaller --hidden, --embed "
                         f"or --layers (or a smaller vocabulary: {V:,} tokens)")


class Trainer:
    """Train a :class:`fastrnn.lm.RNNLanguageModel` on a text.

    ``Trainer(cfg, text)`` builds everything; ``run()`` trains until a limit
    (epochs, time budget, max steps) is reached and returns a result dict;
    ``save(path)`` / ``Trainer.resume(path, text)`` checkpoint and continue.
    ``losses`` is the list of training losses, one per step (since this
    object was created).
    """

    def __init__(self, cfg, text, tokenizer=None, text_name=None, _model=None):
        self.cfg = cfg = cfg.validate()
        if not isinstance(text, str):
            raise TypeError("text must be a str")
        where = f" ({text_name})" if text_name else ""
        if not text.strip():
            raise ValueError(f"the training text{where} is empty")
        self.text_name = text_name
        self.text_digest = _text_digest(text)
        train_text, val_text = split_text(text, cfg.val_fraction)
        self.tokenizer = tokenizer or build_tokenizer(cfg, train_text, text)
        self.train_ids = self.tokenizer.encode(train_text)
        self.val_ids = self.tokenizer.encode(val_text) if val_text else np.zeros(0, np.int64)
        need = cfg.batch_size * (cfg.seq_len + 1)
        if len(self.train_ids) < need:
            raise ValueError(
                f"the training text{where} is too short: {len(self.train_ids):,} training tokens "
                f"cannot fill one chunk of {cfg.batch_size} streams x {cfg.seq_len + 1} tokens "
                f"(batch size x (seq len + 1) = {need:,}); use a longer text or a smaller "
                f"--batch-size/--seq-len")
        try:
            self.loader = TBPTTLoader(self.train_ids, cfg.batch_size, cfg.seq_len,
                                      mode=cfg.batching, seed=cfg.seed)
        except ValueError as e:
            raise ValueError(f"the training text{where} is too short: {e}; use a longer text "
                             f"or a smaller --batch-size/--seq-len") from None
        if cfg.val_fraction > 0 and len(self.val_ids) < 2:
            raise ValueError(f"the training text{where} is too short to hold out "
                             f"{cfg.val_fraction:.0%} for validation")
        if _model is None:
            _check_model_fits(cfg, self.tokenizer.vocab_size)
        self.model = _model or RNNLanguageModel(
            self.tokenizer.vocab_size, cfg.embed, cfg.hidden, cfg.layers, cfg.cell,
            cfg.dropout, np.dtype(cfg.dtype), cfg.seed, weight_drop=cfg.weight_drop,
            locked_dropout=cfg.locked_dropout)
        if cfg.optimizer == "adam":
            self.optimizer = Adam(self.model.parameters(), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
        else:
            self.optimizer = SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                 weight_decay=cfg.weight_decay)
        # position in the data and counters (all saved in checkpoints)
        self.epoch = 0
        self.index = 0             # next chunk within the epoch
        self.step = 0
        self.train_tokens = 0
        self.train_seconds = 0.0
        self.state = None          # recurrent state carried between sequential chunks
        self.losses = []
        self.recent_losses = []    # the last RECENT_STEPS finite training losses (saved too)
        self.last_val = None
        self.val_history = []      # (step, val_loss)
        self.skipped_steps = 0     # steps skipped for a non-finite loss/gradient (saved too)
        self.val_curve = []        # {"seconds", "step", "val_loss"}: training seconds so far
        self.best_val_loss = None  # best validation loss seen (what --save-best keeps)
        self.best_step = None
        self.schedule = cfg.schedule()
        self.lr = self.optimizer.lr
        self._set_horizon()

    # -- learning-rate schedule -------------------------------------------------
    def _set_horizon(self):
        """Where the schedule ends in training seconds: this run's time budget on
        top of the seconds already trained (so a resumed run continues the curve)."""
        tb = self.cfg.time_budget
        self._time_horizon = None if tb is None else self.train_seconds + float(tb)

    def progress(self):
        """Fraction of the run done, in [0, 1]: the largest of elapsed training
        seconds / time horizon (under a time budget), steps / ``max_steps`` and
        epochs / the epoch limit, for those limits that are set. Without a time
        budget it depends on the position only, so a resumed run's learning
        rates are exactly those of the uninterrupted run."""
        cfg = self.cfg
        fracs = [0.0]
        if self._time_horizon:
            fracs.append(self.train_seconds / self._time_horizon)
        if cfg.max_steps:
            fracs.append(self.step / cfg.max_steps)
        lim = self._epoch_limit
        if lim:
            fracs.append(self._epoch_progress() / lim)
        return min(max(fracs), 1.0)

    def schedule_driver(self):
        """What drives the schedule: "time", "steps", "epochs" (or "constant")."""
        if self.cfg.lr_schedule == "constant":
            return "constant"
        if self.cfg.time_budget is not None:
            return "time"
        return "steps" if self.cfg.max_steps is not None else "epochs"

    # -- one step ---------------------------------------------------------------
    def train_step(self, chunk):
        """One step on `chunk`; returns its loss.

        A non-finite loss or gradient norm never reaches the optimiser: the
        step raises :class:`NonFiniteError` (the trainer stays at the previous
        step), or with ``cfg.skip_nonfinite`` is skipped (counted in
        ``skipped_steps``; the carried recurrent state is reset) and returns
        the non-finite loss.
        """
        model, cfg = self.model, self.cfg
        self.lr = self.schedule(self.step, self.progress())
        self.optimizer.lr = self.lr
        model.train()
        model.zero_grad()
        state = None if chunk.reset else self.state
        logits, state = model(chunk.x, state)
        with np.errstate(over="ignore", invalid="ignore"):
            loss, dlogits = softmax_cross_entropy(logits, chunk.y)
        bad = None
        if not math.isfinite(loss):
            bad = ("loss", loss)
        else:
            model.backward(dlogits)             # dstate=None: gradient cut at the chunk border
            with np.errstate(over="ignore", invalid="ignore"):
                raw = None   # the norm before clipping by value (which turns inf finite)
                if cfg.clip_value > 0:          # by value (torch's clip_grad_value_), then by norm
                    raw = clip_grad_value(self.optimizer.params, cfg.clip_value)
                if cfg.clip and cfg.clip > 0:
                    norm = clip_grad_norm(self.optimizer.params, cfg.clip)
                else:
                    norm = grad_norm(self.optimizer.params)
                if raw is not None and not math.isfinite(raw):
                    norm = raw
            if not math.isfinite(norm):
                bad = ("gradient norm", norm)
        if bad is not None:
            if not cfg.skip_nonfinite:
                raise NonFiniteError(
                    f"training stopped at step {self.step + 1}: the {bad[0]} is {bad[1]}; "
                    f"the model was not updated with it (it is as after step {self.step}). "
                    f"Try a smaller --lr or --clip, or --skip-nonfinite to skip such steps",
                    self.step + 1)
            model.zero_grad()
            self.skipped_steps += 1
            state = None                        # a non-finite state must not be carried on
        else:
            self.optimizer.step()
        self.state = state if cfg.batching == "sequential" else None
        self.step += 1
        self.train_tokens += chunk.num_tokens
        self.losses.append(loss)
        return loss

    def evaluate(self, ids=None):
        ids = self.val_ids if ids is None else ids
        if len(ids) < 2:
            return None
        return evaluate_lm(self.model, ids, num_streams=self.cfg.batch_size,
                           seq_len=self.cfg.eval_seq_len)

    # -- the loop ------------------------------------------------------------------
    @property
    def _epoch_limit(self):
        cfg = self.cfg
        if cfg.epochs is not None:
            return float(cfg.epochs)
        if cfg.time_budget is None and cfg.max_steps is None:
            return 1.0
        return None

    def _epoch_progress(self):
        n = self.loader.chunks_per_epoch(self.epoch)
        return self.epoch + min(self.index, n) / max(n, 1)

    def _limits_reached(self, run_seconds):
        cfg = self.cfg
        if cfg.max_steps is not None and self.step >= cfg.max_steps:
            return True
        if cfg.time_budget is not None and run_seconds >= cfg.time_budget:
            return True
        limit = self._epoch_limit
        return limit is not None and self._epoch_progress() >= limit - 1e-12

    def run(self, progress=True, save_path=None, save_every=None, log=None,
            handle_signals=True, save_best=None):
        """Train until a limit is reached; validate periodically and at the end.

        ``progress``: show progress on stderr (a tqdm bar on a terminal, else a
        plain line every ``PROGRESS_SECONDS``, env ``FASTRNN_PROGRESS_SECONDS``).
        ``save_path``: write a checkpoint there at the end (and every
        ``save_every`` steps). ``log``: a function taking a message string
        (e.g. ``print``), used for periodic validation messages when there is
        no progress bar. ``handle_signals`` (main thread only): SIGINT and
        SIGTERM stop training at the end of the current step, the final
        checkpoint is written as usual, and the result's ``interrupted`` names
        the signal (a second signal raises KeyboardInterrupt at once).
        ``save_best``: after each validation (periodic and final) that is the
        best so far, write a checkpoint there (a full, resumable one).
        Returns a result dict (see :meth:`result`).
        """
        cfg = self.cfg
        self._set_horizon()
        stop = []   # the signal that asked to stop, once one did
        bar = self._make_bar(progress)
        run_seconds = 0.0
        run_steps = 0
        run_tokens = 0
        next_eval = cfg.eval_every if cfg.eval_every else None
        wall0 = time.perf_counter()
        recent = self.recent_losses   # carried across runs and a resume: "the last 50 steps"
        try:
            with thread_limits(cfg.threads), _precision.scoped(cfg.matmul_precision), \
                    _stop_on_signals(stop, handle_signals):
                done = self._limits_reached(run_seconds) or bool(stop)
                while not done:
                    if self.index >= self.loader.chunks_per_epoch(self.epoch):
                        self.epoch += 1
                        self.index = 0
                        done = self._limits_reached(run_seconds)
                        continue
                    for chunk in self.loader.epoch(self.epoch, start=self.index):
                        t0 = time.perf_counter()
                        loss = self.train_step(chunk)
                        dt = time.perf_counter() - t0
                        self.index += 1
                        run_seconds += dt
                        run_steps += 1
                        run_tokens += chunk.num_tokens
                        self.train_seconds += dt
                        if math.isfinite(loss):      # (a skipped step's loss is not)
                            recent.append(loss)
                        if len(recent) > RECENT_STEPS:
                            recent.pop(0)
                        if bar is not None:
                            self._update_bar(bar, dt, np.mean(recent) if recent else math.nan,
                                             run_tokens / run_seconds)
                        if save_path and save_every and self.step % save_every == 0:
                            self.save(save_path)
                        if (next_eval is not None and run_seconds >= next_eval
                                and len(self.val_ids) > 1):
                            next_eval = run_seconds + cfg.eval_every
                            ev = self.evaluate()
                            best = self._record_validation(ev, save_best)
                            msg = (f"step {self.step}: val loss {ev['loss']:.4f} "
                                   f"(ppl {ev['ppl']:.2f}), lr {self.lr:.3g}, "
                                   f"{self.train_seconds:.0f} s"
                                   + (" (best)" if best and save_best else ""))
                            if bar is not None:
                                bar.write(msg, file=sys.stderr)
                            elif log:
                                log(msg)
                        done = self._limits_reached(run_seconds) or bool(stop)
                        if done:
                            break
                if bar is not None:
                    bar.close()
                    bar = None
                fresh = (self.last_val is not None and self.val_history
                         and self.val_history[-1][0] == self.step)
                ev = (self.evaluate() if len(self.val_ids) > 1 and not fresh and not stop
                      else None)
                if ev is not None:
                    self._record_validation(ev, save_best)
        finally:
            if bar is not None:
                bar.close()
        if save_path:
            self.save(save_path)
        res = self.result(run_steps=run_steps, run_tokens=run_tokens, run_seconds=run_seconds,
                          wall_seconds=time.perf_counter() - wall0, recent=recent)
        res["interrupted"] = signal.Signals(stop[0]).name if stop else None
        return res

    def _record_validation(self, ev, save_best=None):
        """Note a validation result; returns True (and writes ``save_best``) when
        it is the best so far."""
        self.last_val = ev
        self.val_history.append((self.step, ev["loss"]))
        # microseconds: a tiny model's first steps take under a millisecond, and
        # rounding to ms recorded them at 0 s (tests/test_schedule.py failed so on Zen 4)
        self.val_curve.append({"seconds": round(self.train_seconds, 6), "step": self.step,
                               "val_loss": ev["loss"]})
        if self.best_val_loss is not None and not ev["loss"] < self.best_val_loss:
            return False
        self.best_val_loss, self.best_step = ev["loss"], self.step
        if save_best:
            self.save(save_best)
        return True

    def result(self, run_steps=0, run_tokens=0, run_seconds=0.0, wall_seconds=0.0, recent=()):
        ev = self.last_val or {}
        return {
            "val_loss": ev.get("loss"),
            "val_ppl": ev.get("ppl"),
            "val_tokens": ev.get("tokens", 0),
            "train_loss": float(np.mean(recent)) if len(recent) else None,
            "train_ppl": perplexity(float(np.mean(recent))) if len(recent) else None,
            "train_tokens": int(run_tokens),
            "tokens_per_s": run_tokens / run_seconds if run_seconds > 0 else 0.0,
            "steps": int(run_steps),
            "seconds": run_seconds,
            "wall_seconds": wall_seconds,
            "total_steps": self.step,
            "total_train_tokens": self.train_tokens,
            "epochs": round(self._epoch_progress(), 4),
            "vocab_size": self.tokenizer.vocab_size,
            "parameters": int(sum(p.data.size for p in self.model.parameters())),
            "cell": self.cfg.cell,
            "tokenizer": self.cfg.tokenizer,
            "skipped_steps": self.skipped_steps,
            "schedule": dict(self.schedule.to_dict(), driven_by=self.schedule_driver(),
                             final_lr=self.lr),
            "regularisation": {"dropout": self.cfg.dropout,
                               "locked_dropout": self.cfg.locked_dropout,
                               "weight_drop": self.cfg.weight_drop},
            "val_curve": [dict(v) for v in self.val_curve],
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
        }

    # -- progress bar -----------------------------------------------------------------
    def _make_bar(self, progress):
        if not progress:
            return None
        tqdm = progress_bar_class()
        cfg = self.cfg
        if cfg.time_budget is not None and cfg.max_steps is None and cfg.epochs is None:
            self._bar_mode = "time"
            return tqdm(total=float(cfg.time_budget), unit="s", file=sys.stderr,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [ETA {remaining}{postfix}]",
                        desc="train", dynamic_ncols=True, leave=False)
        self._bar_mode = "steps"
        if cfg.max_steps is not None:
            total = max(cfg.max_steps - self.step, 0)
        else:
            lim = self._epoch_limit
            total = int(round((lim - self._epoch_progress()) * len(self.loader)))
        return tqdm(total=total, unit="step", file=sys.stderr, desc="train",
                    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [ETA {remaining}{postfix}]",
                    dynamic_ncols=True, leave=False)

    def _update_bar(self, bar, dt, loss, tok_s):
        if self._bar_mode == "time":
            bar.update(min(dt, max(bar.total - bar.n, 0)))
        else:
            bar.update(1)
        bar.set_postfix_str(f"loss={loss:.3f}, {tok_s:,.0f} tok/s", refresh=False)

    # -- checkpoints --------------------------------------------------------------------
    def train_state(self):
        return {
            "epoch": self.epoch, "index": self.index, "step": self.step,
            "train_tokens": self.train_tokens, "train_seconds": self.train_seconds,
            "rng": self.model.rng_states(),
            "text_digest": self.text_digest, "text_name": self.text_name,
            "val_history": self.val_history, "skipped_steps": self.skipped_steps,
            "val_curve": self.val_curve, "best_val_loss": self.best_val_loss,
            "best_step": self.best_step, "lr": self.lr,
            "recent_losses": list(self.recent_losses),
        }

    def save(self, path):
        extra = {f"state{i}": a for i, a in enumerate(self.model.state_arrays(self.state))}
        return save_checkpoint(path, self.model, self.optimizer, self.tokenizer,
                               config=self.cfg.to_dict(), train_state=self.train_state(),
                               extra=extra)

    @classmethod
    def resume(cls, path, text, text_name=None, **overrides):
        """Continue from a checkpoint written by :meth:`save`, on the same text.

        ``overrides`` change limits only (``epochs``, ``time_budget``,
        ``max_steps``, ``eval_every``, ``threads``, ``skip_nonfinite``): anything that would change
        the computation is taken from the checkpoint.
        """
        ckpt = load_checkpoint(path)
        allowed = {"epochs", "time_budget", "max_steps", "eval_every", "threads",
                   "skip_nonfinite"}
        bad = set(overrides) - allowed
        if bad:
            raise ValueError(f"cannot override {sorted(bad)} when resuming")
        try:
            cfg = TrainConfig.from_dict(ckpt.config).validate()   # (meta edited by hand)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad training config: {e}") from None
        for k, v in overrides.items():
            setattr(cfg, k, v)
        cfg.validate()
        ts = ckpt.train_state
        if ts.get("text_digest") and ts["text_digest"] != _text_digest(text):
            raise ValueError(f"{path} was trained on a different text "
                             f"({ts.get('text_name') or 'unknown'}); resume needs the same text")
        model = ckpt.build_model()
        self = cls(cfg, text, tokenizer=ckpt.build_tokenizer(), text_name=text_name,
                   _model=model)
        ckpt.load_optimizer(self.optimizer)
        try:
            self.epoch, self.index, self.step = int(ts["epoch"]), int(ts["index"]), int(ts["step"])
            self.train_tokens = int(ts["train_tokens"])
            self.train_seconds = float(ts["train_seconds"])
            self.val_history = [tuple(v) for v in ts.get("val_history", [])]
            self.skipped_steps = int(ts.get("skipped_steps", 0))
            self.val_curve = [dict(v) for v in ts.get("val_curve", [])]
            self.best_val_loss = ts.get("best_val_loss")
            self.best_step = ts.get("best_step")
            self.lr = float(ts.get("lr", self.optimizer.lr))
            self.recent_losses = [float(v) for v in ts.get("recent_losses", [])][-RECENT_STEPS:]
            if not all(math.isfinite(v) for v in self.recent_losses):
                raise ValueError("recent_losses: expected finite numbers")
            model.set_rng_states(ts["rng"])
            arrays = [ckpt.extra[f"state{i}"] for i in range(len(ckpt.extra))]
            self.state = model.state_from_arrays(arrays)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad training state: {e}") from None
        self._set_horizon()
        return self


@contextlib.contextmanager
def _stop_on_signals(stop, enabled=True):
    """While active, SIGINT/SIGTERM append their number to `stop` instead of killing
    the process; a second one raises KeyboardInterrupt. Only in the main thread
    (signal handlers cannot be installed elsewhere)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {}

    def handler(signum, frame):
        if stop:
            for s, h in saved.items():
                signal.signal(s, h)
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        stop.append(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        saved[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _fmt_seconds(s):
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def progress_bar_class(file=None):
    """tqdm on a terminal; on a log file or a pipe, _LineProgress (plain lines,
    no carriage-return redraws). Both take the same arguments."""
    file = file or sys.stderr
    isatty = getattr(file, "isatty", None)
    if isatty and isatty():
        from tqdm import tqdm
        return tqdm
    return _LineProgress


class _LineProgress:
    """The part of tqdm's interface the trainer uses, printing a plain line every
    few seconds (for logs and pipes: no carriage returns, nothing redrawn)."""

    def __init__(self, total=None, unit="step", file=None, desc="train", **_):
        self.total, self.unit, self.desc = total, unit, desc
        self.file = file or sys.stderr
        self.n = 0
        self.postfix = ""
        self.interval = float(os.environ.get("FASTRNN_PROGRESS_SECONDS", PROGRESS_SECONDS))
        self.t0 = self.last = time.monotonic()
        self.printed_n = 0

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def set_postfix_str(self, s, refresh=False):
        self.postfix = s

    def _line(self, now):
        elapsed = now - self.t0
        if self.unit == "s":
            done = f"{self.n:.0f}/{self.total:.0f} s of training"
        else:
            done = f"step {self.n:,}/{self.total:,}"
        frac = self.n / self.total if self.total else None
        eta = elapsed * (1 - frac) / frac if frac else None
        pct = f" ({100 * frac:.0f} %)" if frac is not None else ""
        post = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done}{pct}{post}, elapsed {_fmt_seconds(elapsed)}, "
              f"ETA {_fmt_seconds(eta)}", file=self.file, flush=True)
        self.printed_n = self.n

    def write(self, msg, file=None):
        print(msg, file=file or self.file, flush=True)

    def close(self):
        if self.n != self.printed_n:
            self._line(time.monotonic())
            self.printed_n = self.n
