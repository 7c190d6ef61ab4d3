"""Flow-matching math for action chunks (pi0's recipe), written once for numpy, JAX and torch.

Every function takes the array namespace `xp` (numpy, jax.numpy or torch), like
common/rl_math.py, so both backends call this code and the tests compare them
with hand-computed numpy values.

Which way time points (pi0 / openpi convention)
-----------------------------------------------
t = 1 is pure noise, t = 0 is data::

    x_t = t * noise + (1 - t) * actions          (t in (0, 1])
    u   = d x_t / d t = noise - actions           (the velocity target)

Training samples t ~ Beta(1.5, 1), which puts more weight near t = 1 (the noisy
end, where predicting the velocity is hardest): the density is 1.5 * sqrt(t).
Sampling integrates dx/dt = v(x_t, t) with Euler steps from t = 1 (x = noise)
down to t = 0 (x = actions): x <- x - v / num_steps.

Shapes: actions, noise and velocities are `(B, H, A)` (batch, horizon H,
action dim A); t is `(B,)`; the pad mask `action_is_pad` is `(B, H)`, True for
chunk steps past the episode end (LeRobot's `action_is_pad`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

BETA_A, BETA_B = 1.5, 1.0
"""Parameters of the Beta distribution of training times (pi0)."""
T_MIN = 0.001
"""Times are mapped to [T_MIN, 1]: t = 0 exactly would make the target noise-free (openpi)."""
DEFAULT_INTEGRATION_STEPS = 10


def time_from_uniform(u: Any, xp: Any = np) -> Any:
    """Beta(1.5, 1) times from uniform u in [0, 1), mapped to [T_MIN, 1).

    Inverse-CDF sampling: Beta(1.5, 1) has CDF t^1.5, so t = u^(2/3) is exactly
    Beta(1.5, 1) distributed; this keeps the sampler framework-free (each
    backend draws u with its own RNG). Then t * (1 - T_MIN) + T_MIN, as openpi's
    `beta(1.5, 1) * 0.999 + 0.001`.
    """
    t = u ** (1.0 / BETA_A)
    return t * (1.0 - T_MIN) + T_MIN


def noisy_actions(t: Any, noise: Any, actions: Any) -> Any:
    """x_t = t * noise + (1 - t) * actions, with t `(B,)` broadcast over `(B, H, A)`."""
    t = t[:, None, None]
    return t * noise + (1.0 - t) * actions


def velocity_target(noise: Any, actions: Any) -> Any:
    """u = noise - actions: the velocity of the straight path from actions (t=0) to noise (t=1)."""
    return noise - actions


def masked_mse(prediction: Any, target: Any, action_is_pad: Any | None, xp: Any = np) -> Any:
    """Mean squared error over the valid (not padded) chunk steps.

    Padded steps contribute nothing, and the sum is divided by the number of
    valid entries (valid steps x action dim), so a batch with many padded steps
    is not down-weighted. All-padded batches give 0, not NaN.
    """
    squared = (prediction - target) ** 2
    if action_is_pad is None:
        return xp.mean(squared)
    valid = xp.where(action_is_pad, 0.0, 1.0)
    total = (squared * valid[..., None]).sum()
    count = valid.sum() * squared.shape[-1]
    return total / xp.clip(count, 1.0, None)


def flow_loss(velocity: Any, noise: Any, actions: Any, action_is_pad: Any | None,
              xp: Any = np) -> Any:
    """pi0's training loss: masked MSE between the predicted velocity and noise - actions."""
    return masked_mse(velocity, velocity_target(noise, actions), action_is_pad, xp)


def integration_times(num_steps: int = DEFAULT_INTEGRATION_STEPS) -> list[float]:
    """The times at which Euler sampling evaluates the velocity: 1, 1 - 1/n, ..., 1/n."""
    if num_steps <= 0:
        raise ValueError(f"num_integration_steps must be positive, got {num_steps}.")
    return [1.0 - i / num_steps for i in range(num_steps)]


def euler_sample(velocity_fn: Callable[[Any, float], Any], noise: Any,
                 num_steps: int = DEFAULT_INTEGRATION_STEPS) -> Any:
    """Integrate dx/dt = velocity_fn(x, t) from t = 1 (x = noise) to t = 0 with Euler steps.

    `velocity_fn(x, t)` gets the current `(B, H, A)` sample and the scalar time
    t (a Python float; it broadcasts it to the batch). Times are computed as
    1 - i/n rather than accumulated, so every backend evaluates the same times.
    The loop is plain Python: under jit it unrolls into `num_steps` model calls.
    """
    dt = 1.0 / num_steps
    x = noise
    for t in integration_times(num_steps):
        x = x - dt * velocity_fn(x, t)
    return x


def sincos_embedding(t: Any, dim: int, xp: Any = np, min_period: float = 4e-3,
                     max_period: float = 4.0) -> Any:
    """Sinusoidal embedding of times `(B,)` -> `(B, dim)`: [sin(2 pi t / p_k), cos(2 pi t / p_k)].

    openpi's `posemb_sincos`: periods p_k geometric from `min_period` to
    `max_period` over dim / 2 frequencies, so both the fine structure near one t
    and the whole [0, 1] range are resolved.
    """
    if dim % 2:
        raise ValueError(f"time_embed_dim must be even (sin and cos halves), got {dim}.")
    half = dim // 2
    fraction = np.linspace(0.0, 1.0, half) if half > 1 else np.zeros(1)
    period = min_period * (max_period / min_period) ** fraction
    frequency = (2.0 * math.pi / period).astype(np.float32)
    # torch tensors take constants on their own device; numpy/jax broadcast a numpy constant.
    frequency = t.new_tensor(frequency) if hasattr(t, "new_tensor") else xp.asarray(frequency)
    angles = t[:, None] * frequency[None, :]
    return xp.concat([xp.sin(angles), xp.cos(angles)], axis=-1)
