"""Vectorised gymnax environments with separate terminated/truncated flags.

gymnax 1.0's `step` auto-resets and returns six values plus the true final
observation in `info["final_observation"]`; `VecEnv` vmaps it and surfaces
that final observation so truncated episodes can bootstrap from it.
`NormalizeObservation` wraps a `VecEnv` with running mean/variance whose
statistics live in the env state (so they are checkpointed) and are exported
with the params for inference.
"""

from __future__ import annotations

import difflib
from typing import Any, NamedTuple

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
from gymnax.environments import spaces

from common.config import ConfigError


def check_env_id(env_id: str) -> None:
    """Raise a ConfigError naming --env.id and the closest gymnax ids."""
    if env_id not in gymnax.registered_envs:
        close = difflib.get_close_matches(env_id, gymnax.registered_envs, n=3, cutoff=0.0)
        raise ConfigError(f"--env.id {env_id!r} is not a gymnax environment. Did you mean: "
                          f"{', '.join(close)}? (The Torch backend takes gymnasium ids.)")


class ActionSpec(NamedTuple):
    """What the policy head needs to know about the action space."""

    continuous: bool
    dim: int  # number of discrete actions, or the action vector size
    low: np.ndarray | None = None
    high: np.ndarray | None = None


def action_spec(space: Any) -> ActionSpec:
    if isinstance(space, spaces.Discrete):
        return ActionSpec(False, int(space.n))
    if isinstance(space, spaces.Box):
        shape = tuple(space.shape)
        if len(shape) != 1:
            raise ConfigError(f"Box action spaces must be 1-D, got shape {shape}.")
        low = np.broadcast_to(np.asarray(space.low, np.float32), shape)
        high = np.broadcast_to(np.asarray(space.high, np.float32), shape)
        return ActionSpec(True, shape[0], low, high)
    raise ConfigError(f"Unsupported action space {type(space).__name__}: PPO takes Discrete or Box.")


class StepResult(NamedTuple):
    obs: jax.Array  # next observation (after auto-reset where the episode ended)
    state: Any
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    final_obs: jax.Array  # true observation reached by this step (before any reset)
    episode_return: jax.Array  # return of the episode that ended at this step (0 otherwise)
    episode_length: jax.Array


class VecEnvState(NamedTuple):
    env_state: Any
    episode_return: jax.Array
    episode_length: jax.Array


class VecEnv:
    """`num_envs` copies of a gymnax env, vmapped, with episode bookkeeping."""

    def __init__(self, env_id: str, num_envs: int):
        check_env_id(env_id)
        self.env, self.params = gymnax.make(env_id)
        self.num_envs = num_envs
        self.obs_shape = tuple(self.env.observation_space(self.params).shape)
        self.action_spec = action_spec(self.env.action_space(self.params))

    def reset(self, key: jax.Array) -> tuple[jax.Array, VecEnvState]:
        keys = jax.random.split(key, self.num_envs)
        obs, env_state = jax.vmap(self.env.reset, in_axes=(0, None))(keys, self.params)
        zeros = jnp.zeros(self.num_envs, jnp.float32)
        return obs.astype(jnp.float32), VecEnvState(env_state, zeros, zeros.astype(jnp.int32))

    def step(self, key: jax.Array, state: VecEnvState, action: jax.Array) -> StepResult:
        keys = jax.random.split(key, self.num_envs)
        obs, env_state, reward, terminated, truncated, info = jax.vmap(
            self.env.step, in_axes=(0, 0, 0, None))(keys, state.env_state, action, self.params)
        reward = reward.astype(jnp.float32)
        done = jnp.logical_or(terminated, truncated)
        ep_return = state.episode_return + reward
        ep_length = state.episode_length + 1
        new_state = VecEnvState(env_state, jnp.where(done, 0.0, ep_return),
                                jnp.where(done, 0, ep_length))
        return StepResult(obs.astype(jnp.float32), new_state, reward, terminated, truncated,
                          info["final_observation"].astype(jnp.float32),
                          jnp.where(done, ep_return, 0.0), jnp.where(done, ep_length, 0))

    def state_sharding(self, data, replicated) -> VecEnvState:
        """Every leaf of the per-env state is split along the env axis."""
        return data


class RunningMeanStd(NamedTuple):
    mean: jax.Array
    var: jax.Array
    count: jax.Array


def init_rms(shape: tuple[int, ...]) -> RunningMeanStd:
    # count starts at a tiny value so the first update takes the batch stats (as in SB3).
    return RunningMeanStd(jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32),
                          jnp.asarray(1e-4, jnp.float32))


def update_rms(rms: RunningMeanStd, batch: jax.Array) -> RunningMeanStd:
    """Merge a batch into the running moments (Chan et al.'s parallel update)."""
    batch_mean = batch.mean(axis=0)
    batch_var = batch.var(axis=0)
    batch_count = jnp.asarray(batch.shape[0], jnp.float32)
    delta = batch_mean - rms.mean
    total = rms.count + batch_count
    mean = rms.mean + delta * batch_count / total
    m2 = rms.var * rms.count + batch_var * batch_count + delta**2 * rms.count * batch_count / total
    return RunningMeanStd(mean, m2 / total, total)


def normalize(obs: jax.Array, mean: jax.Array, var: jax.Array, clip: float = 10.0) -> jax.Array:
    """The inference-time transform; the same function the wrapper applies in training."""
    return jnp.clip((obs - mean) / jnp.sqrt(var + 1e-8), -clip, clip)


class NormState(NamedTuple):
    inner: VecEnvState
    rms: RunningMeanStd


class NormalizeObservation:
    """Wraps a VecEnv: observations come out normalised by running statistics."""

    def __init__(self, venv: VecEnv):
        self.venv = venv
        self.num_envs = venv.num_envs
        self.obs_shape = venv.obs_shape
        self.action_spec = venv.action_spec

    def reset(self, key: jax.Array) -> tuple[jax.Array, NormState]:
        obs, inner = self.venv.reset(key)
        rms = update_rms(init_rms(self.obs_shape), obs)
        return normalize(obs, rms.mean, rms.var), NormState(inner, rms)

    def step(self, key: jax.Array, state: NormState, action: jax.Array) -> StepResult:
        out = self.venv.step(key, state.inner, action)
        rms = update_rms(state.rms, out.obs)
        return out._replace(obs=normalize(out.obs, rms.mean, rms.var),
                            final_obs=normalize(out.final_obs, rms.mean, rms.var),
                            state=NormState(out.state, rms))

    def state_sharding(self, data, replicated) -> NormState:
        return NormState(self.venv.state_sharding(data, replicated),
                         RunningMeanStd(replicated, replicated, replicated))


def make_vec_env(env_id: str, num_envs: int, normalize_obs: bool) -> VecEnv | NormalizeObservation:
    venv = VecEnv(env_id, num_envs)
    return NormalizeObservation(venv) if normalize_obs else venv


def obs_normalizer(state: Any) -> RunningMeanStd | None:
    """The running statistics inside a (possibly wrapped) env state, for export."""
    return state.rms if isinstance(state, NormState) else None
