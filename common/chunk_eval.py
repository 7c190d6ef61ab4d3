"""Evaluate an action-chunk policy in gymnasium environments with receding-horizon execution.

Framework-free, so both backends evaluate the same way: the policy is any
`chunk_fn(states (N, S)) -> chunks (N, H, A)` in the dataset's units. All
episodes run side by side (one env each, episode i reset with seed + i); every
`execute_horizon` steps the policy predicts a new chunk for every running
episode and the first k actions of it are executed (pi0's receding horizon).
Box actions are clipped to the action space. `success_rate` is reported when
the environment says `info["success"]` (the two-goal task does).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from common import two_goal


def make_env(env_id: str, **kwargs: Any):
    """gymnasium.make, registering vibe-rl's own environments first."""
    import gymnasium as gym

    if env_id == two_goal.ENV_ID:
        from common import two_goal_gym  # noqa: F401  (registers the id)
    return gym.make(env_id, **kwargs)


def evaluate(chunk_fn: Callable[[np.ndarray], np.ndarray], env_id: str, *, episodes: int,
             execute_horizon: int, seed: int = 0) -> dict[str, float]:
    """Mean return, length and (when the env reports it) success rate over `episodes`."""
    import gymnasium as gym

    envs = [make_env(env_id) for _ in range(episodes)]
    space = envs[0].action_space
    low = high = None
    if isinstance(space, gym.spaces.Box):
        low, high = space.low, space.high
    obs = np.stack([np.asarray(env.reset(seed=seed + i)[0], np.float32).reshape(-1)
                    for i, env in enumerate(envs)])
    running = np.ones(episodes, bool)
    returns = np.zeros(episodes)
    lengths = np.zeros(episodes, np.int64)
    success = np.zeros(episodes, bool)
    reports_success = False
    chunk = None
    t = 0
    while running.any():
        if t % execute_horizon == 0:
            active = np.flatnonzero(running)
            predicted = np.asarray(chunk_fn(obs[active]), np.float32)
            chunk = np.zeros((episodes, *predicted.shape[1:]), np.float32)
            if predicted.shape[1] < execute_horizon:
                raise ValueError(f"The policy predicts {predicted.shape[1]} actions per chunk, fewer "
                                 f"than the execute horizon {execute_horizon}.")
            chunk[active] = predicted
        for i in np.flatnonzero(running):
            action = chunk[i, t % execute_horizon]
            if low is not None:
                action = np.clip(action, low, high).reshape(space.shape)
            next_obs, reward, terminated, truncated, info = envs[i].step(action)
            obs[i] = np.asarray(next_obs, np.float32).reshape(-1)
            returns[i] += float(reward)
            lengths[i] += 1
            if "success" in info:
                reports_success = True
                success[i] |= bool(info["success"])
            if terminated or truncated:
                running[i] = False
        t += 1
    for env in envs:
        env.close()
    out = {"episode_return": float(returns.mean()), "episode_length": float(lengths.mean()),
           "episodes": float(episodes)}
    if reports_success:
        out["success_rate"] = float(success.mean())
    return out
