"""Benchmark: cartpole_dqn (vibe-rl) vs Stable-Baselines3 DQN on CartPole-v1, same script.

SB3 gets the preset's hyperparameters (10 envs, buffer 1e4, batch 128, lr 2.5e-4,
learning starts 1e4, one gradient step per vector step, target copy every 50
gradient steps = 500 env steps, epsilon 1 -> 0.05 over half the run, [120, 84]
ReLU net, grad-norm clip 10) and the preset's double-DQN target and squared-error
loss through a small subclass (SB3's DQN has neither option; without it SB3 does one
forward pass per gradient step less than the preset). By default SB3 runs the
preset's whole budget (5e5 env steps, ~90 s); a short --sb3-steps window is
mostly warm-up (5e4 steps: 20% without gradient steps) and flatters its speed.

    python bench/dqn_vs_sb3.py [--backends jax,torch] [--sb3-steps 500000] [--total-timesteps N]
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import budget, parser_with_common_flags, print_row, run_vibe, setup, time_sb3  # noqa: E402


def _double_dqn():
    """SB3's DQN with cartpole_dqn's loss: double-DQN target, 0.5 * squared TD error."""
    import numpy as np
    import torch as th
    import torch.nn.functional as F
    from stable_baselines3 import DQN

    class DoubleDQN(DQN):
        def train(self, gradient_steps: int, batch_size: int = 100) -> None:  # target/loss differ
            self.policy.set_training_mode(True)
            self._update_learning_rate(self.policy.optimizer)
            losses = []
            for _ in range(gradient_steps):
                data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)
                with th.no_grad():
                    best = self.q_net(data.next_observations).argmax(dim=1, keepdim=True)
                    next_q = self.q_net_target(data.next_observations).gather(1, best)
                    target = data.rewards + (1 - data.dones) * self.gamma * next_q
                q = th.gather(self.q_net(data.observations), dim=1, index=data.actions.long())
                loss = 0.5 * F.mse_loss(q, target)
                losses.append(loss.item())
                self.policy.optimizer.zero_grad()
                loss.backward()
                th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()
            self._n_updates += gradient_steps
            self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
            self.logger.record("train/loss", np.mean(losses))

    return DoubleDQN


def run_sb3(total_steps: int, seed: int) -> dict:
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env("CartPole-v1", n_envs=10, seed=seed)
    model = _double_dqn()("MlpPolicy", env, learning_rate=2.5e-4, buffer_size=10_000,
                learning_starts=10_000, batch_size=128, gamma=0.99, train_freq=1, gradient_steps=1,
                target_update_interval=500, exploration_fraction=0.5 * 500_000 / total_steps,
                exploration_initial_eps=1.0, exploration_final_eps=0.05, max_grad_norm=10,
                policy_kwargs={"net_arch": [120, 84]}, seed=seed, device="cpu", verbose=0)
    return time_sb3(model, "CartPole-v1", total_steps)


def main() -> None:
    args = parser_with_common_flags(__doc__, 500_000, backends=True).parse_args()
    setup(args)
    results = {}
    with tempfile.TemporaryDirectory() as base:
        for backend in args.backends.split(","):
            results[backend] = run_vibe("cartpole_dqn", base, backend, args.seed, backend=backend,
                                        threshold=475, last=10, **budget(args))
    sb3 = run_sb3(args.sb3_steps, args.seed)
    steps = next(iter(results.values()))["steps"]
    print(f"\ncartpole_dqn, {steps:,} env steps, {os.cpu_count()} CPU cores (training return: vibe-rl "
          f"the last 10 logged chunks, SB3 its last 100 episodes; eval return: 10 greedy episodes "
          f"of the final policy, both sides)")
    for backend, r in results.items():
        print_row(f"vibe-rl {backend}", r)
    print_row(f"SB3 double DQN ({args.sb3_steps} steps)", sb3)
    for backend, r in results.items():
        print(f"vibe-rl {backend} / SB3 env steps/s = {r['sps'] / sb3['sps']:.1f}x")


if __name__ == "__main__":
    main()
