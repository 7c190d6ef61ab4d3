"""The two-goal task: a 2-D point mass that must reach one of two goals, with a bimodal expert.

Why it exists: the goals sit at (-1, 1) and (1, 1), and the expert picks one at
random each episode and heads straight for it, so from the start the
demonstrations fan out in a V: half go up-left, half up-right. A policy trained
by mean regression (MSE on actions) predicts the average of the two modes,
straight up; off the start it sits between the two arms of the V, where its
prediction stays the average, so it climbs between the goals and reaches
neither. A generative policy (flow matching) samples one mode and commits.
In a quick experiment with 100-200 demos (torch, outside the test suite), an
MSE-trained MLP predicting 8-action chunks and executing 4 per prediction
succeeded in 0% of episodes (10-20% executing 1 per prediction), a small
flow-matching MLP (same data, Euler sampling) in 89-98%; tests/common/
test_two_goal.py shows the least-squares regressor's failure (< 20%) directly.

The dynamics are plain numpy over a batch of episodes (`step` works on
`(N, 2)` arrays; pass `xp=jax.numpy` to use the same function in JAX). The
gymnasium environment is in `common/two_goal_gym.py` (id `vibe_rl/TwoGoal-v0`),
so importing this module needs neither gymnasium nor a framework.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

ENV_ID = "vibe_rl/TwoGoal-v0"
TASK = "Reach either goal"
"""The LeRobot task string of the demonstrations."""


@dataclasses.dataclass(frozen=True)
class TwoGoalParams:
    """Geometry and limits of the task."""

    goals: tuple[tuple[float, float], ...] = ((-1.0, 1.0), (1.0, 1.0))
    """Goal positions; reaching any one is a success."""
    goal_radius: float = 0.1
    """Success when the distance to a goal is at most this."""
    max_speed: float = 0.1
    """Largest displacement per step; longer actions are scaled down to this norm."""
    start_noise: float = 0.02
    """Start position uniform in [-start_noise, start_noise]^2 around the origin."""
    max_steps: int = 20
    """Time limit; the shortest path from the origin takes 14 steps."""
    bound: float = 1.5
    """Positions are clipped to [-bound, bound]^2."""

    @property
    def goal_array(self) -> np.ndarray:
        return np.asarray(self.goals, dtype=np.float32)


def sample_start(params: TwoGoalParams, rng: np.random.Generator, n: int) -> np.ndarray:
    """`(n, 2)` float32 start positions near the origin."""
    return rng.uniform(-params.start_noise, params.start_noise, size=(n, 2)).astype(np.float32)


def clip_action(params: TwoGoalParams, action: Any, xp: Any = np) -> Any:
    """Scales each action down to norm `max_speed` if longer (bounded velocity)."""
    action = xp.asarray(action, dtype=xp.float32)
    norm = xp.sqrt(xp.sum(action * action, axis=-1, keepdims=True))
    return action * xp.minimum(1.0, params.max_speed / xp.maximum(norm, 1e-12))


def goal_distances(params: TwoGoalParams, position: Any, xp: Any = np) -> Any:
    """`(..., num_goals)` distances from each position to each goal."""
    goals = xp.asarray(params.goals, dtype=xp.float32)
    diff = position[..., None, :] - goals
    return xp.sqrt(xp.sum(diff * diff, axis=-1))


def step(params: TwoGoalParams, position: Any, action: Any, t: Any, xp: Any = np) -> dict[str, Any]:
    """One step for a batch: position `(..., 2)`, action `(..., 2)`, t = steps taken before.

    Returns the new position (also the observation), reward (1 on reaching a
    goal, else 0), `success` (= terminated) and `truncated` (time limit hit
    without success).
    """
    position = xp.clip(position + clip_action(params, action, xp), -params.bound, params.bound)
    success = xp.min(goal_distances(params, position, xp), axis=-1) <= params.goal_radius
    truncated = xp.logical_and(xp.logical_not(success), xp.asarray(t) + 1 >= params.max_steps)
    return {"position": position, "reward": success.astype(xp.float32), "success": success,
            "terminated": success, "truncated": truncated}


def expert_action(params: TwoGoalParams, position: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """Straight toward `goal` at full speed, slowing only to land on it: `(..., 2)`."""
    delta = np.asarray(goal, np.float32) - np.asarray(position, np.float32)
    return clip_action(params, delta)


class ScriptedExpert:
    """The demonstrator: picks a goal uniformly at random at each `reset`, then heads to it.

    `__call__(obs)` takes the position `(2,)` or a batch `(N, 2)` (one goal per
    row after `reset(n)`), so it fits the same loop as a trained policy.
    """

    def __init__(self, params: TwoGoalParams | None = None, seed: int = 0):
        self.params = params or TwoGoalParams()
        self._rng = np.random.default_rng(seed)
        self.goal_index = np.zeros(1, np.int64)

    def reset(self, n: int = 1) -> np.ndarray:
        self.goal_index = self._rng.integers(len(self.params.goals), size=n)
        return self.goal_index

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, np.float32)
        goals = self.params.goal_array[self.goal_index]
        return expert_action(self.params, obs, goals if obs.ndim > 1 else goals[0])


def rollout(params: TwoGoalParams, policy: Any, starts: np.ndarray) -> dict[str, np.ndarray]:
    """Runs `policy(positions (N, 2)) -> actions (N, 2)` from `starts` until every episode ends.

    Returns per-episode `success` (N,), `length` (N,), and the per-step
    `observations` / `actions` (max_steps, N, 2) with `active` (max_steps, N)
    marking steps that belong to a running episode.
    """
    position = np.asarray(starts, np.float32).copy()
    n = position.shape[0]
    done = np.zeros(n, bool)
    success = np.zeros(n, bool)
    length = np.zeros(n, np.int64)
    observations = np.zeros((params.max_steps, n, 2), np.float32)
    actions = np.zeros((params.max_steps, n, 2), np.float32)
    active = np.zeros((params.max_steps, n), bool)
    for t in range(params.max_steps):
        if done.all():
            break
        action = np.asarray(policy(position), np.float32).reshape(n, 2)
        observations[t], actions[t], active[t] = position, action, ~done
        out = step(params, position, action, t)
        position = np.where(done[:, None], position, out["position"])
        success |= out["success"] & ~done
        length += ~done
        done |= out["terminated"] | out["truncated"]
    return {"success": success, "length": length, "observations": observations,
            "actions": actions, "active": active}


def render(params: TwoGoalParams, position: np.ndarray, size: int = 64) -> np.ndarray:
    """A `(size, size, 3)` uint8 top view: goals green, the point mass red, on black."""
    image = np.zeros((size, size, 3), np.uint8)
    scale = (size - 1) / (2 * params.bound)

    def pixel(xy: np.ndarray) -> tuple[int, int]:
        col = int(round((xy[0] + params.bound) * scale))
        row = int(round((params.bound - xy[1]) * scale))
        return min(max(row, 0), size - 1), min(max(col, 0), size - 1)

    rows, cols = np.mgrid[0:size, 0:size]
    radius = max(1.0, params.goal_radius * scale)
    for goal in params.goal_array:
        r, c = pixel(goal)
        image[(rows - r) ** 2 + (cols - c) ** 2 <= radius ** 2] = (0, 200, 0)
    r, c = pixel(np.asarray(position))
    image[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] = (255, 40, 40)
    return image
