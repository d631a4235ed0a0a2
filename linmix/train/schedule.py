"""Learning-rate schedule: linear warmup, then cosine decay to a floor (spec/k_operators.md 4.1)."""

from __future__ import annotations

import math


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, floor_ratio: float) -> float:
    """Multiplier of the peak learning rate at a schedule step.

    `max(step, 1) / warmup_steps` while `step < warmup_steps`; then a cosine from 1 at
    `warmup_steps` down to `floor_ratio` at `max_steps`, held at `floor_ratio` beyond it. Like
    torch's LambdaLR, the trainer's update number `s` (1-based) uses `lr_multiplier(s - 1, ...)`.

    Args:
        step: schedule step, >= 0.
        warmup_steps: length of the linear warmup, >= 0.
        max_steps: step at which the decay reaches the floor, >= warmup_steps.
        floor_ratio: `lr_floor / lr`, in [0, 1].

    Returns:
        The multiplier, in `(0, 1]` during warmup and `[floor_ratio, 1]` after.
    """
    if step < warmup_steps:
        return max(step, 1) / warmup_steps
    decay_steps = max_steps - warmup_steps
    progress = 1.0 if decay_steps == 0 else min(1.0, (step - warmup_steps) / decay_steps)
    return floor_ratio + (1.0 - floor_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
