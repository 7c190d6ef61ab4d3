"""Benchmark: pendulum_sac (vibe-rl) vs Stable-Baselines3 SAC on Pendulum-v1, same script.

Two SB3 runs: "matched" uses the preset's hyperparameters (8 envs, one gradient
step per vector step, batch 128, [128, 128] nets, buffer 1e5, learning starts
1e3); "default" is SB3's own recipe (1 env, one update per env step, batch
256, [256, 256]), the usual point of comparison. Both run --sb3-steps env steps.

    python bench/sac_vs_sb3.py [--backends jax,torch] [--sb3-steps 10000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import print_row, quiet_logging, run_vibe  # noqa: E402


def run_sb3(total_steps: int, seed: int, matched: bool) -> dict:
    import gymnasium as gym
    from stable_baselines3 import SAC
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    if matched:
        env = make_vec_env("Pendulum-v1", n_envs=8, seed=seed)
        model = SAC("MlpPolicy", env, learning_rate=3e-4, buffer_size=100_000, learning_starts=1_000,
                    batch_size=128, tau=0.005, gamma=0.99, train_freq=1, gradient_steps=1,
                    policy_kwargs={"net_arch": [128, 128]}, seed=seed, device="cpu", verbose=0)
    else:
        env = make_vec_env("Pendulum-v1", n_envs=1, seed=seed)
        model = SAC("MlpPolicy", env, seed=seed, device="cpu", verbose=0, learning_starts=1_000)
    start = time.perf_counter()
    model.learn(total_timesteps=total_steps)
    seconds = time.perf_counter() - start
    mean_return, _ = evaluate_policy(model, gym.make("Pendulum-v1"), n_eval_episodes=10)
    return {"train_s": seconds, "sps": total_steps / seconds, "final_return": float(mean_return)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="jax")
    parser.add_argument("--sb3-steps", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sb3-threads", type=int, default=1,
                        help="torch threads for SB3 (1 is its fastest on a small shared CPU)")
    args = parser.parse_args()
    quiet_logging()
    import torch

    torch.set_num_threads(args.sb3_threads)
    results = {}
    with tempfile.TemporaryDirectory() as base:
        for backend in args.backends.split(","):
            results[backend] = run_vibe("pendulum_sac", base, backend, args.seed, backend=backend,
                                        last=5)
    sb3 = {"matched": run_sb3(args.sb3_steps, args.seed, True),
           "default": run_sb3(args.sb3_steps, args.seed, False)}
    print(f"\npendulum_sac, 6e4 env steps, {os.cpu_count()} CPU cores (final return: mean of the "
          f"last 5 logged chunks = 1e4 steps; SB3: 10 eval episodes after {args.sb3_steps} steps)")
    for backend, r in results.items():
        print_row(f"vibe-rl {backend}", r)
    for name, r in sb3.items():
        print_row(f"SB3 SAC {name} ({args.sb3_steps} steps)", r)
    for backend, r in results.items():
        for name, s in sb3.items():
            print(f"vibe-rl {backend} / SB3 {name} env steps/s = {r['sps'] / s['sps']:.1f}x")


if __name__ == "__main__":
    main()
