"""common.schedules.lr_at against optax's schedules and the JAX backend's, at many steps."""

import math

import numpy as np
import optax
import pytest

from common import schedules
from vibe_rl_jax import schedules as jax_schedules

CASES = [
    # (kind, lr, total_steps, warmup_steps)
    ("constant", 3e-4, 1000, 0),
    ("linear", 2.5e-4, 3904, 0),
    ("linear", 1e-3, 1, 0),
    ("linear", 1e-3, 0, 0),  # the JAX side guards a zero length with max(total, 1)
    ("warmup_cosine", 1e-3, 1000, 100),
    ("warmup_cosine", 1e-3, 1000, 0),
    ("warmup_cosine", 5e-4, 50, 50),  # warmup as long as training: decay length guarded to 1
    ("warmup_cosine", 5e-4, 10, 40),  # warmup longer than training
]


def _steps(total, warmup):
    edges = {0, 1, warmup - 1, warmup, warmup + 1, total - 1, total, total + 1, 2 * total + 7}
    return sorted({s for s in edges if s >= 0} | set(range(0, max(total, warmup) + 3, 7)))


def _optax_reference(kind, lr, total, warmup):
    """The schedule written directly with optax, as vibe_rl_jax/schedules.py documents it."""
    if kind == "constant":
        return optax.constant_schedule(lr)
    if kind == "linear":
        return optax.linear_schedule(lr, 0.0, max(total, 1))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1), end_value=0.0)


@pytest.mark.parametrize("kind,lr,total,warmup", CASES)
def test_lr_at_matches_optax(kind, lr, total, warmup):
    reference = _optax_reference(kind, lr, total, warmup)
    backend = jax_schedules.make(kind, lr, total_steps=total, warmup_steps=warmup)
    for step in _steps(total, warmup):
        ours = schedules.lr_at(kind, lr, step, total, warmup)
        # optax computes in float32: allow float32 rounding relative to the peak rate.
        np.testing.assert_allclose(ours, float(reference(step)), rtol=1e-6, atol=1e-6 * lr,
                                   err_msg=f"{kind} step {step}")
        np.testing.assert_allclose(ours, float(backend(step)), rtol=1e-6, atol=1e-6 * lr,
                                   err_msg=f"{kind} step {step} (vibe_rl_jax)")


def test_hand_computed_values():
    # linear: lr * (1 - s / T), clipped at T.
    assert schedules.lr_at("linear", 1.0, 0, 4) == 1.0
    assert schedules.lr_at("linear", 1.0, 1, 4) == 0.75
    assert schedules.lr_at("linear", 1.0, 4, 4) == 0.0
    assert schedules.lr_at("linear", 1.0, 9, 4) == 0.0
    # warmup_cosine, warmup 2 of 6: 0, lr/2, then lr * (1 + cos(pi k / 4)) / 2 for k = s - 2.
    values = [schedules.lr_at("warmup_cosine", 2.0, s, 6, 2) for s in range(8)]
    expected = [0.0, 1.0] + [1.0 + math.cos(math.pi * k / 4) for k in range(5)] + [0.0]
    np.testing.assert_allclose(values, expected, atol=1e-12)


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown lr_schedule 'cosine'"):
        schedules.lr_at("cosine", 1e-3, 0, 10)
