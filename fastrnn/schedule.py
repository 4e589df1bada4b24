"""Learning-rate schedules for the trainer (``fastrnn train --lr-schedule``).

The learning rate of optimiser step ``step`` (0-based) at ``progress`` (the
fraction of the run done before that step, in [0, 1]) is

    decay(progress) * warmup(step)

    warmup(step)   = min(1, (step + 1) / warmup_steps)     (1 when warmup_steps = 0)
    constant:  decay(p) = lr
    linear:    decay(p) = lr + (min_lr - lr) * p
    cosine:    decay(p) = min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2

so a linear or cosine run ends at ``min_lr``. What ``progress`` measures is
the trainer's business (:meth:`fastrnn.train.Trainer.progress`): elapsed
training time over the time budget under ``--time-budget``, steps over
``--max-steps`` or epochs over ``--epochs`` otherwise (the largest of those
that are set, so the schedule ends with whichever limit ends the run).
"""

import math

__all__ = ["SCHEDULES", "LRSchedule"]

SCHEDULES = ("constant", "cosine", "linear")


class LRSchedule:
    """``LRSchedule(kind, lr, min_lr=0.0, warmup_steps=0)``; ``sched(step, progress)``
    is the learning rate (see the module docstring)."""

    def __init__(self, kind="constant", lr=1e-3, min_lr=0.0, warmup_steps=0):
        if kind not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
        lr, min_lr = float(lr), float(min_lr)
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if not (0 <= min_lr <= lr):
            raise ValueError(f"min_lr must be in [0, lr] = [0, {lr}], got {min_lr}")
        if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps \
                or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.kind, self.lr, self.min_lr, self.warmup_steps = kind, lr, min_lr, int(warmup_steps)

    def decay(self, progress):
        p = min(max(float(progress), 0.0), 1.0)
        if self.kind == "constant":
            return self.lr
        if self.kind == "linear":
            return self.lr + (self.min_lr - self.lr) * p
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))

    def warmup(self, step):
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (int(step) + 1) / self.warmup_steps)

    def __call__(self, step, progress):
        return self.decay(progress) * self.warmup(step)

    def to_dict(self):
        return {"lr_schedule": self.kind, "lr": self.lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps}

    def __repr__(self):
        return (f"LRSchedule({self.kind!r}, lr={self.lr}, min_lr={self.min_lr}, "
                f"warmup_steps={self.warmup_steps})")
