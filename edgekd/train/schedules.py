"""Learning-rate schedules as pure functions of the step: exactly reproducible after a resume."""
from __future__ import annotations

import math

from ..config import OptimConfig

STEP_MILESTONES = (0.3, 0.6, 0.9)  # fractions of a phase's steps (after warm-up) where "step" divides lr by 10


def lr_at(step: int, total_steps: int, steps_per_epoch: int, optim: OptimConfig) -> float:
    warmup = int(round(optim.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, max(total_steps - 1, 0))
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "step":
        done = (step - warmup) / max(total_steps - warmup, 1)
        return optim.lr * 0.1 ** sum(done >= m for m in STEP_MILESTONES)
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return 0.5 * optim.lr * (1.0 + math.cos(math.pi * min(progress, 1.0)))
