"""Learning-rate schedules as plain Python: the reference both backends must match.

The JAX backend builds its schedules from optax (`vibe_rl_jax/schedules.py`);
the Torch backend drives `torch.optim.lr_scheduler.LambdaLR` with `lr_at`.
`lr_at` reproduces optax's formulas and edge cases exactly (clipping, a
non-positive transition length meaning "constant", the warmup/decay join at
`warmup_steps`), and also the guards the JAX side wraps around them, so
`lr_at(kind, lr, s, total_steps=T, warmup_steps=W)` equals
`vibe_rl_jax.schedules.make(kind, lr, total_steps=T, warmup_steps=W)(s)` to
float32 precision. tests/common/test_schedules.py holds the two together.

Steps count optimizer (minibatch) steps: the value at step `s` is the learning
rate of the update that happens when `s` updates have already been applied.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "warmup_cosine")


def _linear(init: float, end: float, transition_steps: int, step: int) -> float:
    """optax.linear_schedule(init, end, transition_steps)(step)."""
    if transition_steps <= 0:
        return init
    count = min(max(step, 0), transition_steps)
    return (init - end) * (1.0 - count / transition_steps) + end


def linear_schedule(init: float, end: float, transition_steps: int, step: int) -> float:
    """optax.linear_schedule(init, end, transition_steps)(step), e.g. DQN's epsilon schedule."""
    return _linear(init, end, transition_steps, step)


def _cosine_decay(init: float, decay_steps: int, alpha: float, step: int) -> float:
    """optax.cosine_decay_schedule(init, decay_steps, alpha)(step)."""
    if decay_steps <= 0:
        raise ValueError(f"cosine decay needs positive decay_steps, got {decay_steps}.")
    count = min(step, decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * count / decay_steps))
    return init * ((1.0 - alpha) * cosine + alpha)


def lr_at(kind: str, lr: float, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Learning rate after `step` optimizer steps of a run of `total_steps` steps.

    constant: `lr`. linear: `lr` annealed linearly to 0 at `total_steps`.
    warmup_cosine: linear 0 -> `lr` over `warmup_steps`, then cosine decay to 0
    at `total_steps` (total includes the warmup, as in optax).
    """
    if kind == "constant":
        return float(lr)
    if kind == "linear":
        return _linear(lr, 0.0, max(total_steps, 1), step)
    if kind == "warmup_cosine":
        decay_steps = max(total_steps, warmup_steps + 1)
        if step < warmup_steps:
            return _linear(0.0, lr, warmup_steps, step)
        return _cosine_decay(lr, decay_steps - warmup_steps, 0.0, step - warmup_steps)
    raise ValueError(f"unknown lr_schedule {kind!r}; known: {', '.join(SCHEDULES)}.")
