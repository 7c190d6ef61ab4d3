"""Roll out a policy in an environment and write the episodes as a LeRobot dataset.

    # The two-goal task's scripted expert (bimodal demonstrations), with camera images:
    python scripts/collect_demos.py --env vibe_rl/TwoGoal-v0 --policy expert \\
        --num-episodes 200 --root data/two_goal --images

    # A trained vibe-rl checkpoint (run dir or step dir) on a gymnasium task:
    python scripts/collect_demos.py --env Pendulum-v1 \\
        --policy checkpoints/pendulum_ppo/run1 --num-episodes 50 --root data/pendulum

The dataset is written through lerobot (`LeRobotDataset.create` -> `add_frame`
-> `save_episode` -> `finalize`) with features `observation.state`, `action`,
`next.reward`, `next.done`, `next.success` and, with `--images`,
`observation.image` (PNG frames in parquet, no video). Train on it with
`--data.root <root>`.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil
import sys
import time
from typing import Any, Callable

import numpy as np
import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import two_goal  # noqa: E402
from common import lerobot_data  # noqa: E402
from common.lerobot_data import INSTALL_HINT, SUPPORTED_LEROBOT  # noqa: E402
from common.transforms import resize_with_pad  # noqa: E402

logger = logging.getLogger("vibe_rl")

EXPERT = "expert"
IMAGE_KEY = "observation.image"


@dataclasses.dataclass(frozen=True)
class Args:
    """Collect demonstrations into a LeRobot dataset."""

    root: str
    """Directory of the new dataset (must not exist unless --overwrite)."""
    env: str = two_goal.ENV_ID
    """Gymnasium environment id (vibe_rl/TwoGoal-v0 is registered by vibe-rl)."""
    policy: str = EXPERT
    """'expert' (the two-goal task's scripted expert) or a vibe-rl checkpoint directory (RL or
    action-chunk policy; chunks run with the policy's receding horizon)."""
    num_episodes: int = 100
    """Episodes to record."""
    repo_id: str = "local/demos"
    """Dataset id stored in the metadata (the hub name if you push it later)."""
    seed: int = 0
    """Seed of the environment resets (episode i uses seed + i) and of the expert's goal choices."""
    fps: int = 10
    """Frames per second recorded in the dataset (sets the spacing of action chunks)."""
    images: bool = False
    """Also record rendered camera frames as observation.image (env must render rgb_array)."""
    image_size: int = 64
    """Side of the square recorded image (resized with padding)."""
    expert_noise: float = 0.0
    """Std of Gaussian noise added to the executed expert action; the clean action is recorded (DART)."""
    max_episode_steps: int | None = None
    """Cut episodes at this many steps (default: the environment's own limit)."""
    task: str | None = None
    """Task string stored with every frame (default: the task's description or the env id)."""
    only_successful: bool = False
    """Keep only episodes whose final info has success=True."""
    overwrite: bool = False
    """Delete an existing dataset at --root first."""


def make_env(env_id: str, render: bool, max_episode_steps: int | None):
    import gymnasium as gym

    if env_id == two_goal.ENV_ID:
        from common import two_goal_gym  # noqa: F401  (registers the id)
    kwargs: dict[str, Any] = {"render_mode": "rgb_array"} if render else {}
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as error:
        raise SystemExit(f"error: cannot make environment {env_id!r}: {error}") from None


class Actor:
    """`reset()` at each episode start, `__call__(obs) -> action` each step."""

    def __init__(self, act: Callable[[np.ndarray], np.ndarray], reset: Callable[[], Any] = lambda: None,
                 name: str = ""):
        self.act, self.reset, self.name = act, reset, name

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.act(obs)


def make_actor(args: Args, env) -> Actor:
    if args.policy == EXPERT:
        if args.env != two_goal.ENV_ID:
            raise SystemExit(f"error: --policy expert is the scripted expert of {two_goal.ENV_ID}; "
                             f"for {args.env!r} pass a vibe-rl checkpoint directory as --policy.")
        expert = two_goal.ScriptedExpert(env.unwrapped.params, seed=args.seed)
        return Actor(expert, lambda: expert.reset(1), name="scripted expert")
    path = pathlib.Path(args.policy)
    if not path.exists():
        raise SystemExit(f"error: --policy {args.policy!r} is neither 'expert' nor an existing "
                         f"checkpoint directory.")
    try:
        from common.policy import create_trained_policy  # lazily: loads a backend
    except ImportError as error:
        raise SystemExit(f"error: loading checkpoints needs common.policy.create_trained_policy, "
                         f"which is not available here ({error}).") from None
    from common.client import RecedingHorizonActor

    actor = RecedingHorizonActor(create_trained_policy(path))
    name = f"checkpoint {path}"
    if actor.chunked:
        name += f" (chunks, {actor.execute_horizon} actions executed per chunk)"
    return Actor(actor, actor.reset, name=name)


def features_for(env, images: bool, image_size: int) -> dict[str, dict]:
    import gymnasium as gym

    obs_space, act_space = env.observation_space, env.action_space
    if not isinstance(obs_space, gym.spaces.Box):
        raise SystemExit(f"error: only Box observation spaces can be recorded as a state vector, "
                         f"got {obs_space}.")
    state_dim = int(np.prod(obs_space.shape))
    if isinstance(act_space, gym.spaces.Box):
        action = {"dtype": "float32", "shape": (int(np.prod(act_space.shape)),), "names": None}
    elif isinstance(act_space, gym.spaces.Discrete):
        action = {"dtype": "int64", "shape": (1,), "names": None}
    else:
        raise SystemExit(f"error: unsupported action space {act_space}.")
    features = {
        "observation.state": {"dtype": "float32", "shape": (state_dim,), "names": None},
        "action": action,
        "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
        "next.done": {"dtype": "bool", "shape": (1,), "names": None},
        "next.success": {"dtype": "bool", "shape": (1,), "names": None},
    }
    if images:
        features[IMAGE_KEY] = {"dtype": "image", "shape": (image_size, image_size, 3),
                               "names": ["height", "width", "channel"]}
    return features


def _action_for_dataset(action: np.ndarray, spec: dict) -> np.ndarray:
    return np.asarray(action, dtype=spec["dtype"]).reshape(spec["shape"])


def collect(args: Args) -> dict[str, Any]:
    """Records `args.num_episodes` episodes; returns a summary (episodes, frames, success rate)."""
    if args.num_episodes <= 0:
        raise SystemExit(f"error: --num-episodes must be positive, got {args.num_episodes}.")
    root = pathlib.Path(args.root)
    if root.exists():
        if not args.overwrite:
            raise SystemExit(f"error: {root} exists; pass --overwrite to replace it or choose "
                             f"another --root.")
        shutil.rmtree(root)
    try:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset  # lazily: imports torch
    except ImportError as error:
        raise SystemExit(f"error: writing datasets needs lerobot ({SUPPORTED_LEROBOT}): "
                         f"{INSTALL_HINT}. ({error})") from None

    import datasets

    datasets.disable_progress_bars()  # one "Map" bar per saved episode otherwise
    env = make_env(args.env, args.images, args.max_episode_steps)
    actor = make_actor(args, env)
    features = features_for(env, args.images, args.image_size)
    task = args.task or (two_goal.TASK if args.env == two_goal.ENV_ID else args.env)
    noise_rng = np.random.default_rng([args.seed, 1])
    dataset = LeRobotDataset.create(args.repo_id, fps=args.fps, features=features, root=root,
                                    use_videos=False)
    start = time.perf_counter()
    kept, frames, successes, returns, attempts = 0, 0, 0, [], 0
    try:
        while kept < args.num_episodes:
            if args.only_successful and attempts >= 10 * args.num_episodes:
                raise SystemExit(f"error: only {kept} of {attempts} episodes succeeded; giving up "
                                 f"on --only-successful.")
            obs, info = env.reset(seed=args.seed + attempts)
            attempts += 1
            actor.reset()
            done, success, episode_return = False, False, 0.0
            while not done:
                action = np.asarray(actor(np.asarray(obs, np.float32)))
                executed = action
                if args.expert_noise > 0:
                    executed = action + noise_rng.normal(0.0, args.expert_noise, action.shape)
                    executed = executed.astype(action.dtype)
                frame = {
                    "observation.state": np.asarray(obs, np.float32).reshape(-1),
                    "action": _action_for_dataset(action, features["action"]),
                    "task": task,
                }
                if args.images:
                    frame[IMAGE_KEY] = resize_with_pad(np.asarray(env.render(), np.uint8),
                                                       args.image_size, args.image_size)
                env_action = executed if features["action"]["dtype"] == "float32" else int(
                    np.asarray(executed).reshape(-1)[0])
                obs, reward, terminated, truncated, info = env.step(env_action)
                done = bool(terminated or truncated)
                success = bool(info.get("success", False))
                episode_return += float(reward)
                frame["next.reward"] = np.array([reward], np.float32)
                frame["next.done"] = np.array([done], bool)
                frame["next.success"] = np.array([success], bool)
                dataset.add_frame(frame)
            if args.only_successful and not success:
                dataset.clear_episode_buffer()
                continue
            frames += dataset.episode_buffer["size"]
            lerobot_data.save_episode(dataset)
            kept += 1
            successes += success
            returns.append(episode_return)
    finally:
        dataset.finalize()  # without it the episodes index is never written
        env.close()
    summary = {
        "root": str(root), "episodes": kept, "frames": int(frames), "attempts": attempts,
        "success_rate": successes / max(kept, 1), "mean_return": float(np.mean(returns)),
        "seconds": time.perf_counter() - start, "policy": actor.name, "env": args.env,
    }
    logger.info("Wrote %d episodes (%d frames) to %s with the %s on %s in %.1f s; success rate "
                "%.2f, mean return %.2f.", kept, frames, root, actor.name, args.env,
                summary["seconds"], summary["success_rate"], summary["mean_return"])
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from common.metrics import init_logging

    init_logging()
    args = tyro.cli(Args, args=argv)
    return collect(args)


if __name__ == "__main__":
    main()
