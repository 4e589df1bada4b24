"""Learning-rate schedules: values, what drives them (time or steps), exact resume
including the schedule, --save-best, and the JSON curve."""

import math

import numpy as np
import pytest

from fastrnn.checkpoint import load_checkpoint
from fastrnn.cli import DEFAULT_TEXT
from fastrnn.schedule import LRSchedule
from fastrnn.train import TrainConfig, Trainer

with open(DEFAULT_TEXT, encoding="utf-8") as _f:
    TEXT = _f.read()[:2000]


pytestmark = pytest.mark.usefixtures("one_kernel_thread")   # conftest.py


def small_cfg(**kw):
    base = dict(hidden=16, embed=8, batch_size=8, seq_len=12, lr=3e-3, eval_every=None,
                val_fraction=0.1, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def test_schedule_values():
    cos = LRSchedule("cosine", 2e-3, 1e-4, warmup_steps=0)
    assert cos(0, 0.0) == pytest.approx(2e-3)
    assert cos(0, 0.5) == pytest.approx((2e-3 + 1e-4) / 2)
    assert cos(0, 1.0) == pytest.approx(1e-4)
    assert cos(0, 0.25) == pytest.approx(1e-4 + 1.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    lin = LRSchedule("linear", 1.0, 0.0)
    assert [lin(0, p) for p in (0, 0.25, 1, 2)] == pytest.approx([1, 0.75, 0, 0])
    const = LRSchedule("constant", 0.1, warmup_steps=4)
    assert [const(s, 0.9) for s in range(6)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


@pytest.mark.parametrize("kw, match", [
    (dict(kind="step"), "lr_schedule must be one of constant, cosine, linear, got 'step'"),
    (dict(min_lr=0.5), r"min_lr must be in \[0, lr\] = \[0, 0.1\], got 0.5"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0, got -1"),
    (dict(warmup_steps=1.5), "warmup_steps must be an integer >= 0, got 1.5"),
])
def test_schedule_errors(kw, match):
    args = dict(kind="cosine", lr=0.1, min_lr=0.0, warmup_steps=0)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        LRSchedule(**args)
    cfg = dict(lr_schedule=args["kind"], lr=0.1, min_lr=args["min_lr"],
               warmup_steps=args["warmup_steps"])
    with pytest.raises(ValueError, match=match.split(" must")[0]):
        small_cfg(**cfg).validate()


def test_step_driven_schedule_reaches_min_lr_at_max_steps():
    t = Trainer(small_cfg(max_steps=20, lr_schedule="cosine", min_lr=1e-4, warmup_steps=3), TEXT)
    lrs = []
    orig = t.train_step

    def spy(chunk):
        loss = orig(chunk)
        lrs.append(t.optimizer.lr)
        return loss
    t.train_step = spy
    res = t.run(progress=False)
    sched = LRSchedule("cosine", 3e-3, 1e-4, 3)
    assert lrs == [sched(s, s / 20) for s in range(20)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(sched(19, 0.95))
    assert res["schedule"] == dict(lr_schedule="cosine", lr=3e-3, min_lr=1e-4, warmup_steps=3,
                                   driven_by="steps", final_lr=lrs[-1])


def test_epoch_driven_schedule():
    t = Trainer(small_cfg(epochs=1.0, lr_schedule="linear"), TEXT)
    assert t.progress() == 0.0
    t.run(progress=False)
    assert t.progress() == 1.0 and t.schedule_driver() == "epochs"
    assert t.lr < 3e-3 * 2 / len(t.loader)                 # the last step: almost 0


def test_time_driven_schedule_follows_training_seconds(monkeypatch):
    t = Trainer(small_cfg(time_budget=10.0, max_steps=None, lr_schedule="cosine", min_lr=0.0),
                TEXT)
    assert t.schedule_driver() == "time"
    t.train_seconds = 5.0
    assert t.progress() == pytest.approx(0.5)
    chunk = next(t.loader.epoch(0))
    t.train_step(chunk)
    assert t.optimizer.lr == pytest.approx(1.5e-3)          # half-way down the cosine
    # a budgeted run anneals over its own budget: lr near min_lr at the end
    t2 = Trainer(small_cfg(time_budget=0.5, lr_schedule="linear", min_lr=1e-5), TEXT)
    t2.run(progress=False)
    assert t2.train_seconds >= 0.5 and t2.lr < 3e-3 * 0.2
    # resumed with more budget, the horizon is the seconds trained plus the new budget
    t2.cfg.time_budget = 0.5
    t2._set_horizon()
    assert t2.progress() == pytest.approx(t2.train_seconds / (t2.train_seconds + 0.5))


@pytest.mark.parametrize("kw", [
    dict(lr_schedule="cosine", warmup_steps=4, min_lr=1e-4, layers=2, dropout=0.2,
         weight_drop=0.3, locked_dropout=True),
    dict(lr_schedule="linear", cell="gru", weight_drop=0.2, batching="random"),
])
def test_resume_with_schedule_and_regularisation_is_bitwise_identical(tmp_path, kw):
    total, first = 26, 9
    full = Trainer(small_cfg(max_steps=total, **kw), TEXT)
    full.run(progress=False)
    part = Trainer(small_cfg(max_steps=total, **kw), TEXT)
    part.cfg.max_steps = first            # stop early, as an interrupted run does ...
    part.run(progress=False, save_path=tmp_path / "ck.npz")
    # ... but the schedule horizon of the interrupted run was `first`: resume from a
    # checkpoint written mid-run instead, by stepping by hand
    part = Trainer(small_cfg(max_steps=total, **kw), TEXT)
    for _ in range(first):
        if part.index >= part.loader.chunks_per_epoch(part.epoch):
            part.epoch, part.index = part.epoch + 1, 0
        part.train_step(next(part.loader.epoch(part.epoch, start=part.index)))
        part.index += 1
    part.save(tmp_path / "mid.npz")
    resumed = Trainer.resume(tmp_path / "mid.npz", TEXT, max_steps=total)
    resumed.run(progress=False)
    assert part.losses + resumed.losses == full.losses          # exact, schedule included
    assert resumed.lr == full.lr
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=n)


def test_save_best_keeps_the_best_validation(tmp_path):
    t = Trainer(small_cfg(max_steps=40, eval_every=1e-9, lr=1e-2), TEXT)
    res = t.run(progress=False, save_best=tmp_path / "best.npz")
    curve = res["val_curve"]
    assert len(curve) == 40 and [c["step"] for c in curve] == list(range(1, 41))
    assert all(c["seconds"] > 0 for c in curve)
    losses = [c["val_loss"] for c in curve]
    best = int(np.argmin(losses))
    assert res["best_val_loss"] == losses[best] and res["best_step"] == best + 1
    ck = load_checkpoint(tmp_path / "best.npz")
    assert ck.train_state["step"] == best + 1
    assert ck.train_state["best_val_loss"] == losses[best]
    # the saved model is the best one: its validation loss is the best loss
    model = ck.build_model()
    from fastrnn.metrics import evaluate_lm
    ev = evaluate_lm(model, t.val_ids, num_streams=8, seq_len=256)
    assert ev["loss"] == pytest.approx(losses[best], rel=1e-6)
    # resuming keeps the record, so a worse validation later does not overwrite it
    r = Trainer.resume(tmp_path / "best.npz", TEXT, max_steps=41)
    assert r.best_val_loss == losses[best] and len(r.val_curve) == best + 1
