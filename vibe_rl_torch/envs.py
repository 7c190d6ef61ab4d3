"""Gymnasium vector environments with the JAX backend's step contract (vibe_rl_jax/envs.py).

`VecEnv` wraps a `gymnasium.vector.SyncVectorEnv` in same-step autoreset
mode, so the true final observation of an episode arrives with the step that
ended it (`info["final_obs"]`) and a truncated episode can bootstrap from it.
Terminated and truncated stay separate. Episode returns/lengths are counted
here on the unscaled rewards, as on the JAX side.

With `normalize_obs`, observations are normalised by running mean/variance
(Chan's parallel update, clip 10, eps 1e-8), updated from every batch of
next observations exactly where the JAX `NormalizeObservation` does it. Under
DDP the batch moments are reduced over all ranks first, so every rank holds
the statistics of the global batch, as the JAX mesh does.

The whole env state (the gymnasium envs' internals and RNGs, pickled; the
current observation; episode counters; normaliser) is in `state_dict` so a
resumed run continues exactly.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import logging
import pickle
from typing import Any, Callable, NamedTuple

import gymnasium as gym
import numpy as np

from common.config import ConfigError

logger = logging.getLogger("vibe_rl")

OBS_CLIP = 10.0
OBS_EPS = 1e-8

# (batch of observations) -> (batch mean, batch variance, batch count) over all ranks.
MomentsFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, float]]


def check_env_id(env_id: str) -> None:
    """Raise a ConfigError naming --env.id and the closest gymnasium ids.

    Accepts gymnasium's `module:EnvName-v0` form (the module is imported first,
    so it can register the id).
    """
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"--env.id {env_id!r}: cannot import module {module!r} ({error}).")
    try:
        gym.spec(name)
    except gym.error.Error:
        close = difflib.get_close_matches(name, list(gym.registry), n=3, cutoff=0.0)
        raise ConfigError(f"--env.id {env_id!r} is not a gymnasium environment. Did you mean: "
                          f"{', '.join(close)}? (The JAX backend takes gymnax ids.)") from None


class ActionSpec(NamedTuple):
    """What the policy head needs to know about the action space."""

    continuous: bool
    dim: int  # number of discrete actions, or the action vector size
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    start: int = 0  # first discrete action (gymnasium Discrete(n, start))


def action_spec(space: gym.Space, env_id: str = "") -> ActionSpec:
    if isinstance(space, gym.spaces.Discrete):
        return ActionSpec(False, int(space.n), start=int(space.start))
    if isinstance(space, gym.spaces.Box):
        if len(space.shape) != 1:
            raise ConfigError(f"--env.id {env_id!r}: Box action spaces must be 1-D, "
                              f"got shape {space.shape}.")
        return ActionSpec(True, space.shape[0], np.asarray(space.low, np.float32),
                          np.asarray(space.high, np.float32))
    raise ConfigError(f"--env.id {env_id!r}: unsupported action space {type(space).__name__}; "
                      f"PPO takes Discrete or Box.")


def observation_dim(space: gym.Space, env_id: str = "") -> int:
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise ConfigError(f"--env.id {env_id!r}: the MLP policy needs a 1-D Box observation "
                          f"space, got {space}.")
    return int(space.shape[0])


# ------------------------------------------------------------------ observation statistics
class RunningMeanStd:
    """Running mean/variance of observations; count starts tiny so the first batch dominates."""

    def __init__(self, shape: tuple[int, ...]):
        self.mean = np.zeros(shape, np.float32)
        self.var = np.ones(shape, np.float32)
        self.count = 1e-4

    def update(self, batch_mean: np.ndarray, batch_var: np.ndarray, batch_count: float) -> None:
        """Merge batch moments (Chan et al.'s parallel update, as vibe_rl_jax.envs.update_rms)."""
        delta = batch_mean - self.mean
        total = self.count + batch_count
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.mean = (self.mean + delta * batch_count / total).astype(np.float32)
        self.var = (m2 / total).astype(np.float32)
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.copy(), "var": self.var.copy(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = np.asarray(state["mean"], np.float32).copy()
        self.var = np.asarray(state["var"], np.float32).copy()
        self.count = float(state["count"])


def local_moments(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    return batch.mean(axis=0), batch.var(axis=0), float(batch.shape[0])


def normalize(obs: np.ndarray, mean: np.ndarray, var: np.ndarray, clip: float = OBS_CLIP) -> np.ndarray:
    """The inference-time transform; the same function training applies."""
    return np.clip((obs - mean) / np.sqrt(var + OBS_EPS), -clip, clip).astype(np.float32)


# ------------------------------------------------------------------ vector env
class StepResult(NamedTuple):
    obs: np.ndarray  # next observation (after auto-reset where the episode ended), normalised
    reward: np.ndarray  # unscaled
    terminated: np.ndarray
    truncated: np.ndarray
    final_obs: np.ndarray  # true observation reached by this step (before any reset), normalised
    episode_return: np.ndarray  # return of the episode that ended at this step (0 otherwise)
    episode_length: np.ndarray
    done: np.ndarray


CARTPOLE_VECTOR_ENTRY_POINT = "gymnasium.envs.classic_control.cartpole:CartPoleVectorEnv"


class SameStepCartPole(gym.vector.VectorWrapper):
    """gymnasium's numpy `CartPoleVectorEnv` (all envs in one array step) in same-step autoreset.

    That env steps every CartPole with a few numpy calls instead of one Python env each (about
    3x less time per vector step at 4-10 envs), but it only autoresets on the *next* step.
    Here an episode that ends is reset within the step that ended it, by the env's own rule
    (its generator, its reset bounds, its step counter), exactly as SyncVectorEnv's SAME_STEP
    mode resets a single env: the true last observation is in `info["final_obs"]` (rows flagged
    by `info["_final_obs"]`) and the returned observation is the reset one. The envs share one
    generator, seeded by the first of the seeds `reset` is given.
    """

    def __init__(self, env: gym.vector.VectorEnv):
        super().__init__(env)
        self.metadata = {**env.metadata, "autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        if isinstance(seed, (list, tuple)):
            seed = seed[0]
        return self.env.reset(seed=seed, options=options)

    def step(self, actions: np.ndarray):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        done = terminated | truncated
        if done.any():
            env = self.env.unwrapped
            # What CartPoleVectorEnv.step does at the start of the following call, done now.
            env.state[:, done] = env.np_random.uniform(low=env.low, high=env.high,
                                                       size=(4, int(done.sum())))
            env.steps[done] = 0
            env.prev_done[:] = False
            info = {**info, "final_obs": obs, "_final_obs": done}
            obs = env.state.T.astype(np.float32)
        return obs, reward, terminated, truncated, info


def _vectorised(env_id: str, num_envs: int) -> gym.vector.VectorEnv | None:
    """A numpy-vectorised env with a same-step adapter for `env_id`, if there is one."""
    spec = gym.spec(env_id.rpartition(":")[2])
    if spec.vector_entry_point != CARTPOLE_VECTOR_ENTRY_POINT:
        return None
    return SameStepCartPole(gym.make_vec(env_id, num_envs, vectorization_mode="vector_entry_point"))



def make_gym_vector_env(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """Same-step autoreset, so `info["final_obs"]` holds the true last observation.

    CartPole ids get gymnasium's numpy-vectorised CartPole (`SameStepCartPole`); every other id
    a SyncVectorEnv of `gym.make` envs.
    """
    check_env_id(env_id)
    vectorised = _vectorised(env_id, num_envs)
    if vectorised is not None:
        return vectorised
    return gym.vector.SyncVectorEnv(
        [functools.partial(gym.make, env_id) for _ in range(num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, copy=False)


class VecEnv:
    """This process's share of the environments, with episode bookkeeping and normalisation."""

    def __init__(self, env_id: str, num_envs: int, *, normalize_obs: bool = False,
                 moments: MomentsFn = local_moments):
        self.env_id = env_id
        self.num_envs = num_envs
        self.envs = make_gym_vector_env(env_id, num_envs)
        self.obs_dim = observation_dim(self.envs.single_observation_space, env_id)
        self.action_spec = action_spec(self.envs.single_action_space, env_id)
        self.rms = RunningMeanStd((self.obs_dim,)) if normalize_obs else None
        self._moments = moments
        self.obs = np.zeros((num_envs, self.obs_dim), np.float32)  # what the policy sees next
        self._ep_return = np.zeros(num_envs, np.float32)
        self._ep_length = np.zeros(num_envs, np.int64)
        self._warned_unpicklable = False

    def _observe(self, raw: np.ndarray) -> np.ndarray:
        """Update the statistics with this batch (if normalising) and return what the policy sees."""
        raw = np.asarray(raw, np.float32)
        if self.rms is None:
            return raw.copy()
        self.rms.update(*self._moments(raw))
        return normalize(raw, self.rms.mean, self.rms.var)

    def _transform(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, np.float32)
        return raw.copy() if self.rms is None else normalize(raw, self.rms.mean, self.rms.var)

    def reset(self, seeds: list[int]) -> np.ndarray:
        raw, _ = self.envs.reset(seed=[int(s) for s in seeds])
        self.obs = self._observe(raw)
        self._ep_return[:] = 0
        self._ep_length[:] = 0
        return self.obs

    def env_action(self, action: np.ndarray) -> np.ndarray:
        """What the env receives: Box actions clipped to the bounds, Discrete shifted by `start`."""
        spec = self.action_spec
        if spec.continuous:
            return np.clip(action, spec.low, spec.high).astype(self.envs.single_action_space.dtype)
        return action + spec.start if spec.start else action

    def step(self, action: np.ndarray) -> StepResult:
        raw, reward, terminated, truncated, info = self.envs.step(self.env_action(action))
        reward = np.asarray(reward, np.float32)
        terminated = np.asarray(terminated, bool)
        truncated = np.asarray(truncated, bool)
        done = terminated | truncated
        final_raw = np.array(raw, np.float32)  # copy: the env reuses its buffer (copy=False)
        if done.any():
            for i in np.flatnonzero(done):
                final_raw[i] = info["final_obs"][i]
        self.obs = self._observe(raw)
        final_obs = self._transform(final_raw)
        self._ep_return += reward
        self._ep_length += 1
        ep_return = np.where(done, self._ep_return, 0.0).astype(np.float32)
        ep_length = np.where(done, self._ep_length, 0)
        self._ep_return[done] = 0
        self._ep_length[done] = 0
        return StepResult(self.obs, reward, terminated, truncated, final_obs, ep_return, ep_length,
                          done)

    def obs_normalizer(self) -> dict[str, np.ndarray] | None:
        """The statistics exported with the params (`obs_normalizer/mean`, `obs_normalizer/var`)."""
        if self.rms is None:
            return None
        return {"mean": self.rms.mean.copy(), "var": self.rms.var.copy()}

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue stepping exactly; the gymnasium envs are pickled.

        Envs that cannot be pickled (some simulators hold native handles) are
        left out with a warning; resuming then re-seeds them (not bit-exact).
        """
        try:
            envs = pickle.dumps(self.envs)
        except Exception as error:  # noqa: BLE001 - any pickling failure means "not saved"
            if not self._warned_unpicklable:
                logger.warning("Env %s cannot be pickled (%s): checkpoints will not hold its "
                               "internal state and a resumed run re-seeds it.", self.env_id, error)
                self._warned_unpicklable = True
            envs = None
        return {"envs": envs, "obs": self.obs.copy(), "episode_return": self._ep_return.copy(),
                "episode_length": self._ep_length.copy(),
                "rms": None if self.rms is None else self.rms.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore `state_dict` output. Returns False when the envs themselves could not be
        restored (not pickled, or a different env count): the caller then re-seeds with `reset`."""
        if (self.rms is None) != (state["rms"] is None):
            raise ConfigError("The checkpoint and the config disagree on --env.normalize-obs: "
                              "resume with the config the run was trained with.")
        if self.rms is not None:
            self.rms.load_state_dict(state["rms"])
        if state["envs"] is None or len(state["obs"]) != self.num_envs:
            return False
        self.envs.close()
        self.envs = pickle.loads(state["envs"])
        self.obs = np.asarray(state["obs"], np.float32).copy()
        self._ep_return = np.asarray(state["episode_return"], np.float32).copy()
        self._ep_length = np.asarray(state["episode_length"], np.int64).copy()
        return True

    def close(self) -> None:
        self.envs.close()
