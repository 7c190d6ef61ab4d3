"""Benchmark: pendulum_sac (vibe-rl) vs Stable-Baselines3 SAC on Pendulum-v1, same script.

Two SB3 runs: "matched" uses the preset's hyperparameters (8 envs, one gradient
step per vector step, batch 128, [128, 128] nets, buffer 1e5, learning starts
1e3); "default" is SB3's own recipe (1 env, one update per env step, batch
256, [256, 256]), the usual point of comparison. "matched" runs the preset's whole
budget (--sb3-matched-steps, 6e4: learning starts are then 1.7% of it, as for
vibe-rl; a short window would be mostly warm-up and flatter SB3's speed); the slow
"default" runs --sb3-steps env steps.

    python bench/sac_vs_sb3.py [--backends jax,torch] [--sb3-steps 10000] [--sb3-matched-steps 60000]
                               [--total-timesteps N]
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import budget, parser_with_common_flags, print_row, run_vibe, setup, time_sb3  # noqa: E402


def run_sb3(total_steps: int, seed: int, matched: bool) -> dict:
    from stable_baselines3 import SAC
    from stable_baselines3.common.env_util import make_vec_env

    if matched:
        env = make_vec_env("Pendulum-v1", n_envs=8, seed=seed)
        model = SAC("MlpPolicy", env, learning_rate=3e-4, buffer_size=100_000, learning_starts=1_000,
                    batch_size=128, tau=0.005, gamma=0.99, train_freq=1, gradient_steps=1,
                    policy_kwargs={"net_arch": [128, 128]}, seed=seed, device="cpu", verbose=0)
    else:
        env = make_vec_env("Pendulum-v1", n_envs=1, seed=seed)
        model = SAC("MlpPolicy", env, seed=seed, device="cpu", verbose=0, learning_starts=1_000)
    return time_sb3(model, "Pendulum-v1", total_steps)


def main() -> None:
    parser = parser_with_common_flags(__doc__, 10_000, backends=True)
    parser.add_argument("--sb3-matched-steps", type=int, default=60_000,
                        help="env steps of the matched SB3 run (default: the preset's budget)")
    args = parser.parse_args()
    setup(args)
    results = {}
    with tempfile.TemporaryDirectory() as base:
        for backend in args.backends.split(","):
            results[backend] = run_vibe("pendulum_sac", base, backend, args.seed, backend=backend,
                                        last=5, **budget(args))
    steps = {"matched": args.sb3_matched_steps, "default": args.sb3_steps}
    sb3 = {name: run_sb3(steps[name], args.seed, name == "matched") for name in steps}
    budget_steps = next(iter(results.values()))["steps"]
    print(f"\npendulum_sac, {budget_steps:,} env steps, {os.cpu_count()} CPU cores (training return: vibe-rl "
          f"the last 5 logged chunks = 1e4 steps, SB3 its last 100 episodes; eval return: 10 "
          f"mean-action episodes of the final policy, both sides)")
    for backend, r in results.items():
        print_row(f"vibe-rl {backend}", r)
    for name, r in sb3.items():
        print_row(f"SB3 SAC {name} ({steps[name]} steps)", r)
    for backend, r in results.items():
        for name, s in sb3.items():
            print(f"vibe-rl {backend} / SB3 {name} env steps/s = {r['sps'] / s['sps']:.1f}x")


if __name__ == "__main__":
    main()
