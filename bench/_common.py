"""What the benchmark scripts share: run a vibe-rl preset and summarise it."""

from __future__ import annotations

import logging
import time

import numpy as np

from common import presets
from common.metrics import init_logging


def quiet_logging() -> None:
    init_logging()
    logging.getLogger("vibe_rl").setLevel(logging.WARNING)


def run_vibe(preset: str, base_dir: str, name: str, seed: int, backend: str = "jax",
             threshold: float | None = None, last: int = 3, **changes) -> dict:
    """Train `preset` on `backend`; speed excludes compile time (reported apart)."""
    cfg = presets.replace(presets.get_preset(preset), exp_name=name, seed=seed, backend=backend,
                          checkpoint_base_dir=base_dir, progress_bar=False, overwrite=True,
                          **changes)
    if backend == "jax":
        from vibe_rl_jax import train as backend_train
    else:
        from vibe_rl_torch import train as backend_train
    start = time.perf_counter()
    result = backend_train.train(cfg)
    wall = time.perf_counter() - start
    steps = result.final_step * cfg.steps_per_update
    returns = [h["train/episode_return"] for h in result.history]
    train_s = getattr(result, "train_seconds", wall)
    reached = None
    if threshold is not None:
        reached = next((h.get("time") for h in result.history
                        if h["train/episode_return"] >= threshold), None)
    return {"compile_s": getattr(result, "compile_seconds", 0.0), "train_s": train_s,
            "wall_s": wall, "sps": steps / train_s, "steps": steps,
            "final_return": float(np.nanmean(returns[-last:])), "time_to_threshold_s": reached,
            "eval_return": evaluate_run(result.run_dir, cfg.env.id, seed)}


EVAL_EPISODES = 10


def evaluate_run(run_dir, env_id: str, seed: int) -> float:
    """Mean return of EVAL_EPISODES greedy/mean-action episodes of the run's last checkpoint.

    The protocol of SB3's `evaluate_policy` (deterministic actions, gymnasium env, 10
    episodes), through the same Policy path `serve_policy.py` uses, so the returns of both
    sides of a comparison are measured the same way.
    """
    from common import client, policy

    trained = policy.create_trained_policy(run_dir, deterministic=True)
    return float(np.mean(client.run_episodes(trained, env_id, EVAL_EPISODES, seed=seed)))


def print_row(name: str, r: dict) -> None:
    extra = f" compile {r['compile_s']:.1f} s |" if r.get("compile_s") else ""
    reach = (f" threshold after {r['time_to_threshold_s']:.1f} s |"
             if r.get("time_to_threshold_s") is not None else "")
    print(f"{name:<34}|{extra} train {r['train_s']:.1f} s | {r['sps']:>9,.0f} env steps/s |"
          f"{reach} training return {r['final_return']:.1f} | eval return {r['eval_return']:.1f}")


def parser_with_common_flags(doc: str, sb3_steps: int, backends: bool = True):
    """The flags every SB3 comparison takes."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if backends:
        parser.add_argument("--backends", default="jax", help="comma-separated: jax,torch")
    parser.add_argument("--sb3-steps", type=int, default=sb3_steps)
    parser.add_argument("--total-timesteps", type=int, default=None,
                        help="budget of the vibe-rl runs (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sb3-threads", type=int, default=1,
                        help="torch threads for SB3 (1 is its fastest on a small shared CPU)")
    return parser


def keep_sb3_logs_in_temp() -> None:
    """SB3 makes a /tmp/SB3-<date> folder per model (even with no log output); put them all in
    one temporary folder removed at exit, so repeated benchmark runs leave nothing behind."""
    import atexit
    import os
    import shutil
    import tempfile

    if "SB3_LOGDIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="vibe-rl-bench-sb3-")
        os.environ["SB3_LOGDIR"] = folder
        atexit.register(shutil.rmtree, folder, True)


def budget(args) -> dict:
    """run_vibe's override of the preset's total_timesteps, if --total-timesteps was given."""
    return {} if args.total_timesteps is None else {"total_timesteps": args.total_timesteps}


def setup(args) -> None:
    quiet_logging()
    keep_sb3_logs_in_temp()
    import torch

    torch.set_num_threads(args.sb3_threads)


def time_sb3(model, env_id: str, total_steps: int) -> dict:
    """Train an SB3 model for `total_steps`, then EVAL_EPISODES deterministic evaluation episodes.

    The training return is the mean over SB3's episode buffer (its last 100 training episodes).
    """
    import gymnasium as gym
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.monitor import Monitor

    start = time.perf_counter()
    model.learn(total_timesteps=total_steps)
    seconds = time.perf_counter() - start
    mean_return, _ = evaluate_policy(model, Monitor(gym.make(env_id)),
                                    n_eval_episodes=EVAL_EPISODES)
    training = [info["r"] for info in model.ep_info_buffer]
    return {"train_s": seconds, "sps": total_steps / seconds, "eval_return": float(mean_return),
            "final_return": float(np.mean(training)) if training else float("nan")}
