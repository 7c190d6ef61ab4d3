"""Tiny deterministic gymnasium envs for the Torch backend tests.

Used as `--env.id torch_toy_envs:<Name>-v0` (gymnasium imports this module,
which registers the ids); subprocess tests put this folder on PYTHONPATH.

    Counter-v0       obs [t, 1], reward 1 + t, terminates after 4 steps
    CounterTrunc-v0  never terminates, truncated by a TimeLimit of 3 steps
    RankCounter-v0   reward 1, terminates after 3 + 2 * RANK steps (RANK from torchrun):
                     each DDP rank sees different episodes, so reduced statistics are checkable
    BoxCounter-v0    like Counter-v0 with a 2-D Box action in [-1, 1] (reward ignores it)
"""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np


class Counter(gym.Env):
    def __init__(self, terminate_at: int | None = 4, continuous: bool = False,
                 rank_lengths: bool = False, constant_reward: bool = False):
        if rank_lengths:
            terminate_at = 3 + 2 * int(os.environ.get("RANK", "0"))
        self.terminate_at = terminate_at
        self.constant_reward = constant_reward
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = (gym.spaces.Box(-1.0, 1.0, (2,), np.float32) if continuous
                             else gym.spaces.Discrete(2))
        self.t = 0
        self.last_action = None

    def _obs(self) -> np.ndarray:
        return np.array([self.t, 1.0], np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.last_action = action
        reward = 1.0 if self.constant_reward else 1.0 + self.t
        self.t += 1
        terminated = self.terminate_at is not None and self.t >= self.terminate_at
        return self._obs(), reward, terminated, False, {}


def _register(name: str, **kwargs) -> None:
    if name not in gym.registry:
        max_steps = kwargs.pop("max_episode_steps", None)
        gym.register(name, entry_point=Counter, kwargs=kwargs, max_episode_steps=max_steps)


_register("Counter-v0")
_register("CounterTrunc-v0", terminate_at=None, max_episode_steps=3)
_register("RankCounter-v0", rank_lengths=True, constant_reward=True)
_register("BoxCounter-v0", continuous=True)
