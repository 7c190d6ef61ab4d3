"""The two-goal task as a gymnasium environment, registered as `vibe_rl/TwoGoal-v0`.

Kept apart from common/two_goal.py so the task's numpy core imports without
gymnasium. Importing this module registers the id; `gymnasium.make(
"common.two_goal_gym:vibe_rl/TwoGoal-v0")` imports and registers in one step.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from common import two_goal


class TwoGoalEnv(gym.Env):
    """Observation: position (2,) float32. Action: velocity (2,), norm clipped to `max_speed`.

    Reward 1 on reaching a goal (the episode terminates), else 0; truncated at
    `max_steps`. `info["success"]` says whether a goal was reached.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode: str | None = None, image_size: int = 64, **params: Any):
        self.params = two_goal.TwoGoalParams(**params)
        bound = np.float32(self.params.bound)
        self.observation_space = gym.spaces.Box(-bound, bound, shape=(2,), dtype=np.float32)
        speed = np.float32(self.params.max_speed)
        self.action_space = gym.spaces.Box(-speed, speed, shape=(2,), dtype=np.float32)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"TwoGoalEnv renders 'rgb_array' only, got {render_mode!r}.")
        self.render_mode = render_mode
        self.image_size = image_size
        self._position = np.zeros(2, np.float32)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._position = two_goal.sample_start(self.params, self.np_random, 1)[0]
        self._t = 0
        return self._position.copy(), {"success": False}

    def step(self, action):
        out = two_goal.step(self.params, self._position, np.asarray(action, np.float32), self._t)
        self._position = np.asarray(out["position"], np.float32)
        self._t += 1
        success = bool(out["success"])
        return (self._position.copy(), float(out["reward"]), success, bool(out["truncated"]),
                {"success": success})

    def render(self):
        return two_goal.render(self.params, self._position, self.image_size)


def register() -> None:
    if two_goal.ENV_ID not in gym.registry:
        gym.register(id=two_goal.ENV_ID, entry_point=TwoGoalEnv,
                     max_episode_steps=None)  # the env truncates itself at params.max_steps


register()
