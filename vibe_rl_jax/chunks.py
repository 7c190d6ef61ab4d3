"""The compiled chunk every algorithm runs: a traced number of updates in one program."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def run_updates(update: Callable[[Any], tuple[Any, dict]], runner: Any, num_updates: jax.Array):
    """`fori_loop` over `num_updates` (a traced scalar) updates, summing their metrics.

    The trip count is dynamic, so every chunk length shares one compiled program,
    and N updates straight or N/2 + N/2 run exactly the same code (bit-exact resume).
    """
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(update, runner)[1])

    def body(_, carry):
        runner, sums = carry
        runner, metrics = update(runner)
        return runner, jax.tree.map(jnp.add, sums, metrics)

    return jax.lax.fori_loop(0, num_updates, body, (runner, zeros))
