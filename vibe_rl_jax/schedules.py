"""Learning-rate schedules, built from optax's own schedule functions."""

from __future__ import annotations

import optax


def make(kind: str, lr: float, *, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """`kind` is PPOConfig.lr_schedule; steps count optimizer (minibatch) steps."""
    if kind == "constant":
        return optax.constant_schedule(lr)
    if kind == "linear":
        return optax.linear_schedule(lr, 0.0, max(total_steps, 1))
    if kind == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps,
                                                  max(total_steps, warmup_steps + 1), end_value=0.0)
    raise ValueError(f"unknown lr_schedule {kind!r}")
