"""What DQN and SAC share on the JAX backend: the replay buffer and the collect loop.

The buffer is flashbax's item buffer (device arrays, sampled with the training
PRNG key, a pytree that orbax checkpoints with the rest of the runner state).
`collect` steps the vmapped envs `num_steps` times inside `lax.scan` and adds
each transition, storing the true final observation as `next_obs`, so a
truncated episode bootstraps from where it really ended.

DQN's training PRNG is a philox4x32 key (a JAX built-in generator with the same
64-bit key as the default threefry2x32). Its update is small (10 env steps, one
gradient step of a 120x84 net) and draws several small random tensors (epsilon,
random actions, env reset noise, buffer indices); on CPU JAX lowers threefry to a
rolled `while` loop costing ~10-15 us per draw inside the chunk, while philox lowers
to straight-line code: ~290 -> ~225 us per update, measured A/B on 2 busy cores.
SAC keeps threefry: its update is ~1 ms of matmuls and the same switch measured no
difference. The runner stores the raw key data (uint32[2]), so checkpoints hold plain
arrays and resume stays bit-exact. On a mesh of more than one device DQN falls back to
threefry: XLA's SPMD partitioner cannot lower philox's `mulhi` inside the sharded, vmapped
env resets ("Unable to convert MHLO to StableHLO", jax 0.10 on CPU). The key data has the
same shape for both, so a checkpoint moves between device counts (as a different stream).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flashbax
import jax
import jax.numpy as jnp

from common import rl_math


PRNG_IMPL = "philox4x32"
SHARDED_PRNG_IMPL = "threefry2x32"


def prng_impl(mesh: jax.sharding.Mesh) -> str:
    """philox on one device; threefry where the envs are split over several (see above)."""
    return PRNG_IMPL if mesh.size == 1 else SHARDED_PRNG_IMPL


def new_key_data(key: jax.Array) -> jax.Array:
    """Raw data of a fresh training key derived from `key` (any JAX key)."""
    return jax.random.bits(key, (2,), jnp.uint32)


def wrap_key(data: jax.Array, impl: str = PRNG_IMPL) -> jax.Array:
    return jax.random.wrap_key_data(data, impl=impl)


def unwrap_key(key: jax.Array) -> jax.Array:
    return jax.random.key_data(key)


def make_buffer(capacity: int, batch_size: int):
    return flashbax.make_item_buffer(max_length=capacity, min_length=batch_size,
                                     sample_batch_size=batch_size, add_batches=True)


def example_transition(obs_shape: tuple[int, ...], action: jax.Array,
                       n_step: int = 1) -> dict[str, jax.Array]:
    """One transition's structure (shapes/dtypes) to initialise the buffer.

    n-step transitions also carry their `discount` (gamma ** rewards summed)."""
    out = {"obs": jnp.zeros(obs_shape, jnp.float32), "action": action,
           "reward": jnp.zeros((), jnp.float32), "next_obs": jnp.zeros(obs_shape, jnp.float32),
           "terminated": jnp.zeros((), jnp.float32)}
    if n_step > 1:
        out["discount"] = jnp.zeros((), jnp.float32)
    return out


NSTEP_STORED = ("obs", "action", "reward", "next_obs", "terminated", "discount")


def nstep_windows(n_step: int, num_envs: int, obs_shape: tuple[int, ...]) -> dict | None:
    """The empty n-step windows (common.rl_math.nstep_empty) or None for one-step targets."""
    if n_step == 1:
        return None
    return rl_math.nstep_empty(jnp, n_step, num_envs, obs_shape, jnp.int32)


class CollectResult(NamedTuple):
    env_state: Any
    obs: jax.Array
    rng: jax.Array
    buffer_state: Any
    episode_return_sum: jax.Array
    episode_length_sum: jax.Array
    episode_count: jax.Array
    nstep: Any = None  # the n-step windows after collecting (None: one-step transitions)


def collect(venv, buffer, *, env_state: Any, obs: jax.Array, rng: jax.Array, buffer_state: Any,
            num_steps: int, reward_scale: float,
            select_action: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
            nstep: dict | None = None, gamma: float | None = None) -> CollectResult:
    """Step every env `num_steps` times; `select_action(key, obs) -> (stored, sent to env)`.

    With `nstep` windows (`nstep_windows`), each step stores the n-step transition that leaves
    them (rl_math.nstep_push, discounting with `gamma`) instead of the step's own.
    """

    def step(carry, _):
        env_state, obs, rng, buffer_state, windows = carry
        rng, k_act, k_env = jax.random.split(rng, 3)
        action, env_action = select_action(k_act, obs)
        out = venv.step(k_env, env_state, env_action)
        done = jnp.logical_or(out.terminated, out.truncated)
        transition = {"obs": obs, "action": action, "reward": out.reward * reward_scale,
                      "next_obs": out.final_obs, "terminated": out.terminated.astype(jnp.float32)}
        if windows is None:
            buffer_state = buffer.add(buffer_state, transition)
        else:
            windows, leaving = rl_math.nstep_push(jnp, windows, done=done, gamma=gamma,
                                                  **transition)
            stored = {k: leaving[k] for k in NSTEP_STORED}
            # Only the first n - 1 steps of a run hand out no transition, in every env at once.
            buffer_state = jax.lax.cond(leaving["valid"][0],
                                        lambda b: buffer.add(b, stored), lambda b: b, buffer_state)
        stats = (out.episode_return.sum(), out.episode_length.sum().astype(jnp.float32),
                 done.sum().astype(jnp.float32))
        return (out.state, out.obs, rng, buffer_state, windows), stats

    (env_state, obs, rng, buffer_state, nstep), (ret, length, count) = jax.lax.scan(
        step, (env_state, obs, rng, buffer_state, nstep), None, num_steps)
    return CollectResult(env_state, obs, rng, buffer_state, ret.sum(), length.sum(), count.sum(),
                         nstep)


def learning_started(env_steps: jax.Array, learning_starts: int, batch_size: int) -> jax.Array:
    return env_steps >= max(learning_starts, batch_size)


def mean_over_learning(sums: dict[str, Any], num_updates: int, keys: tuple[str, ...]
                       ) -> dict[str, float]:
    """Learning metrics averaged over the updates that actually learned (NaN before any)."""
    learned = float(sums["learn_count"])
    return {k: (float(sums[k]) / learned if learned else float("nan")) for k in keys}
