"""Benchmark: cartpole_dqn (vibe-rl) vs Stable-Baselines3 DQN on CartPole-v1, same script.

SB3 gets the preset's hyperparameters (10 envs, buffer 1e4, batch 128, lr 2.5e-4,
learning starts 1e4, one gradient step per vector step, target copy every 50
gradient steps = 500 env steps, epsilon 1 -> 0.05 over half the run, [120, 84]
ReLU net, grad-norm clip 10). SB3 is slow, so by default it runs --sb3-steps
env steps for its speed; pass --sb3-steps 500000 for its return at full budget.

    python bench/dqn_vs_sb3.py [--backends jax,torch] [--sb3-steps 50000]
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import parser_with_common_flags, print_row, run_vibe, setup, time_sb3  # noqa: E402


def run_sb3(total_steps: int, seed: int) -> dict:
    from stable_baselines3 import DQN
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env("CartPole-v1", n_envs=10, seed=seed)
    model = DQN("MlpPolicy", env, learning_rate=2.5e-4, buffer_size=10_000,
                learning_starts=10_000, batch_size=128, gamma=0.99, train_freq=1, gradient_steps=1,
                target_update_interval=500, exploration_fraction=0.5 * 500_000 / total_steps,
                exploration_initial_eps=1.0, exploration_final_eps=0.05, max_grad_norm=10,
                policy_kwargs={"net_arch": [120, 84]}, seed=seed, device="cpu", verbose=0)
    return time_sb3(model, "CartPole-v1", total_steps)


def main() -> None:
    args = parser_with_common_flags(__doc__, 50_000, backends=True).parse_args()
    setup(args)
    results = {}
    with tempfile.TemporaryDirectory() as base:
        for backend in args.backends.split(","):
            results[backend] = run_vibe("cartpole_dqn", base, backend, args.seed, backend=backend,
                                        threshold=475, last=10)
    sb3 = run_sb3(args.sb3_steps, args.seed)
    print(f"\ncartpole_dqn, 5e5 env steps, {os.cpu_count()} CPU cores (final return: mean of the "
          f"last 10 logged chunks; SB3: 10 greedy eval episodes after {args.sb3_steps} steps)")
    for backend, r in results.items():
        print_row(f"vibe-rl {backend}", r)
    print_row(f"SB3 DQN ({args.sb3_steps} steps)", sb3)
    for backend, r in results.items():
        print(f"vibe-rl {backend} / SB3 env steps/s = {r['sps'] / sb3['sps']:.1f}x")


if __name__ == "__main__":
    main()
