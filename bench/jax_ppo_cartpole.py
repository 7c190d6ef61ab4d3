"""Benchmark: cartpole_ppo on the JAX backend vs Stable-Baselines3 PPO, same script.

PureJaxRL's CartPole settings (4 envs x 128 steps, 4 epochs x 4 minibatches,
5e5 env steps). Three vibe-rl runs in this process:
  * "full":  the preset as users run it, logging every 10 updates and async
             checkpoints every 100 (what the issue's target is about);
  * "bare":  one chunk, no intermediate logs or checkpoints (the compute floor),
             so full/bare shows what logging and checkpointing cost;
then SB3 PPO with matched hyperparameters for --sb3-steps env steps.
Figures are ratios measured in the same run (the machine is shared and noisy).

    python bench/jax_ppo_cartpole.py [--sb3-steps 50000] [--seed 0]
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import budget, parser_with_common_flags, print_row, run_vibe, setup, time_sb3  # noqa: E402


def run_sb3(total_steps: int, seed: int):
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env("CartPole-v1", n_envs=4, seed=seed)
    model = PPO("MlpPolicy", env, n_steps=128, batch_size=128, n_epochs=4, learning_rate=lambda f: 2.5e-4 * f,
                gamma=0.99, gae_lambda=0.95, clip_range=0.2, ent_coef=0.01, vf_coef=0.5,
                max_grad_norm=0.5, policy_kwargs={"net_arch": [64, 64]}, seed=seed, device="cpu",
                verbose=0)
    return time_sb3(model, "CartPole-v1", total_steps)


def main() -> None:
    args = parser_with_common_flags(__doc__, 50_000, backends=False).parse_args()
    setup(args)
    with tempfile.TemporaryDirectory() as base:
        full = run_vibe("cartpole_ppo", base, "full", args.seed, threshold=475, **budget(args))
        bare = run_vibe("cartpole_ppo", base, "bare", args.seed, log_interval=976,
                        save_interval=976, **budget(args))
    sb3 = run_sb3(args.sb3_steps, args.seed)

    print(f"\ncartpole_ppo, {full['steps']:,} env steps, {os.cpu_count()} CPU cores "
          "(threshold = return >= 475, time after compile; bare: return is the whole-run mean)")
    print_row("vibe-rl JAX (logs+ckpts)", full)
    print_row("vibe-rl JAX (bare, 1 chunk)", bare)
    print_row(f"SB3 PPO ({args.sb3_steps} steps)", sb3)
    print(f"logging+checkpointing overhead: full/bare speed = {full['sps'] / bare['sps']:.2f}")
    print(f"vibe-rl JAX / SB3 env steps/s = {full['sps'] / sb3['sps']:.1f}x")


if __name__ == "__main__":
    main()
