"""Benchmark: cartpole_ppo on the Torch backend vs Stable-Baselines3 PPO, and DDP 2 vs 1 process.

All runs use PureJaxRL's CartPole settings, matched in SB3: 4 envs x 128 steps,
4 epochs x 4 minibatches (SB3 batch_size 128), Adam lr 2.5e-4 annealed linearly
to 0 (eps 1e-5), gamma 0.99, GAE lambda 0.95, clip 0.2 on the ratio and on the
value (SB3 clip_range_vf=0.2), entropy 0.01, value 0.5, grad norm 0.5,
separate 64-64 tanh actor/critic with orthogonal init, advantages
standardised per minibatch, seed 0. (SB3 steps its learning rate once per
rollout, vibe-rl once per minibatch, as optax does.)

Runs, in this order, all in this process unless noted:
  * torch   vibe-rl Torch backend, 1 process (its default: one intra-op thread);
  * sb3-1t  SB3 PPO with torch.set_num_threads(1), the same thread budget (fair);
  * sb3     SB3 PPO as shipped (torch's default thread count), throughput only
            over --sb3-default-steps steps (it can be very slow on a shared box);
  * ddp     vibe-rl Torch backend under `torchrun --standalone --nproc_per_node 2`
            (a subprocess), the same global batch split over 2 ranks.
Steps/s are env steps over the training loop's wall time; "wall" includes set-up.
"return" is the mean training-episode return at the end (vibe-rl: the last 5
logged chunks = 50 updates; SB3: its last 100 episodes); "eval" the mean of 10
greedy episodes of the final policy (torch and sb3-1t; SB3's evaluate_policy
protocol on both sides). The machine is shared and noisy: compare ratios from
one invocation.

    python bench/torch_ppo_vs_sb3.py [--total-timesteps 500000] [--sb3-default-steps 20000]
                                     [--skip-ddp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import EVAL_EPISODES, evaluate_run, keep_sb3_logs_in_temp  # noqa: E402


def run_torch(base_dir: str, name: str, total: int, seed: int, evaluate: bool = True) -> dict:
    from common import presets
    from vibe_rl_torch import train as torch_train

    cfg = presets.replace(presets.get_preset("cartpole_ppo"), backend="torch", exp_name=name,
                          seed=seed, checkpoint_base_dir=base_dir, progress_bar=False,
                          overwrite=True, total_timesteps=total)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = torch_train.train(cfg)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    steps = result.final_step * cfg.batch_size
    returns = [h["train/episode_return"] for h in result.history]
    reached = next((h["time"] for h in result.history if h["train/episode_return"] >= 475), None)
    return {"steps": steps, "train_s": result.train_seconds, "wall_s": wall, "cpu_s": cpu,
            "sps": steps / result.train_seconds, "final_return": float(np.mean(returns[-5:])),
            "time_to_475_s": reached,
            "eval_return": (evaluate_run(result.run_dir, cfg.env.id, seed) if evaluate
                            else float("nan"))}


def run_sb3(total: int, seed: int, threads: int | None, evaluate: bool = True) -> dict:
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    env = make_vec_env("CartPole-v1", n_envs=4, seed=seed)
    model = PPO("MlpPolicy", env, learning_rate=lambda remaining: 2.5e-4 * remaining, n_steps=128,
                batch_size=128, n_epochs=4, gamma=0.99, gae_lambda=0.95, clip_range=0.2,
                clip_range_vf=0.2, normalize_advantage=True, ent_coef=0.01, vf_coef=0.5,
                max_grad_norm=0.5,
                policy_kwargs={"net_arch": {"pi": [64, 64], "vf": [64, 64]},
                               "activation_fn": torch.nn.Tanh, "ortho_init": True},
                seed=seed, device="cpu", verbose=0)
    learn_start, cpu_start = time.perf_counter(), time.process_time()
    model.learn(total_timesteps=total)
    end, cpu = time.perf_counter(), time.process_time() - cpu_start
    returns = [info["r"] for info in model.ep_info_buffer]
    eval_return = float("nan")
    if evaluate:
        import gymnasium as gym
        from stable_baselines3.common.evaluation import evaluate_policy
        from stable_baselines3.common.monitor import Monitor

        eval_return = float(evaluate_policy(model, Monitor(gym.make("CartPole-v1")),
                                            n_eval_episodes=EVAL_EPISODES)[0])
    return {"steps": total, "train_s": end - learn_start, "wall_s": end - start, "cpu_s": cpu,
            "sps": total / (end - learn_start), "threads": torch.get_num_threads(),
            "final_return": float(np.mean(returns)) if returns else float("nan"),
            "eval_return": eval_return}


def ddp_worker(base_dir: str, total: int, seed: int, out: str) -> None:
    """Runs under torchrun; rank 0 writes the figures."""
    figures = run_torch(base_dir, "ddp", total, seed, evaluate=False)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(figures, f)


def run_ddp(base_dir: str, total: int, seed: int) -> dict:
    out = os.path.join(base_dir, "ddp.json")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", os.path.abspath(__file__), "--ddp-worker", out,
                           "--base-dir", base_dir, "--total-timesteps", str(total),
                           "--seed", str(seed)], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"torchrun failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
        figures = json.load(f)
    figures["launch_wall_s"] = time.perf_counter() - start  # incl. interpreter + rendezvous
    return figures


def _row(name: str, r: dict) -> str:
    return (f"{name:<8} {r['sps']:>10,.0f} {r['train_s']:>9.1f} {r['wall_s']:>9.1f} "
            f"{r.get('cpu_s', float('nan')):>9.1f} {r['final_return']:>8.1f} "
            f"{r.get('eval_return', float('nan')):>8.1f}  {r.get('steps', 0):>9,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-timesteps", type=int, default=500_000)
    parser.add_argument("--sb3-default-steps", type=int, default=20_000,
                        help="steps for SB3 with default threads (throughput only; 0 skips)")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--ddp-worker", help=argparse.SUPPRESS)
    parser.add_argument("--base-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from common.metrics import init_logging

    init_logging()
    logging.getLogger("vibe_rl").setLevel(logging.WARNING)
    keep_sb3_logs_in_temp()
    if args.ddp_worker:
        ddp_worker(args.base_dir, args.total_timesteps, args.seed, args.ddp_worker)
        return

    import torch

    default_threads = torch.get_num_threads()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as base:
        results["torch"] = run_torch(base, "one", args.total_timesteps, args.seed)
        results["sb3-1t"] = run_sb3(args.total_timesteps, args.seed, threads=1)
        if args.sb3_default_steps:
            results["sb3"] = run_sb3(args.sb3_default_steps, args.seed, threads=default_threads,
                                     evaluate=False)
        if not args.skip_ddp:
            results["ddp"] = run_ddp(base, args.total_timesteps, args.seed)

    print(f"\nload average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores at the end (other "
          f"processes share the cores: compare the ratios, and the CPU seconds, which a busy "
          f"machine inflates less)")
    print(f"\n{'run':<8} {'steps/s':>10} {'train s':>9} {'wall s':>9} {'cpu s':>9} {'return':>8} "
          f"{'eval':>8}  {'env steps':>9}")
    for name, r in results.items():
        print(_row(name, r))
    torch_sps = results["torch"]["sps"]
    torch_cpu = results["torch"]["cpu_s"] / results["torch"]["steps"]
    sb3_cpu = results["sb3-1t"]["cpu_s"] / results["sb3-1t"]["steps"]
    print(f"\nTorch backend / SB3 (1 thread, same budget): {torch_sps / results['sb3-1t']['sps']:.2f}x "
          f"steps/s ({sb3_cpu / torch_cpu:.2f}x in CPU time per step); training returns "
          f"{results['torch']['final_return']:.1f} vs {results['sb3-1t']['final_return']:.1f}, "
          f"eval returns {results['torch']['eval_return']:.1f} vs "
          f"{results['sb3-1t']['eval_return']:.1f}")
    if "sb3" in results:
        print(f"Torch backend / SB3 as shipped ({results['sb3']['threads']} threads): "
              f"{torch_sps / results['sb3']['sps']:.2f}x steps/s")
    if "ddp" in results:
        print(f"DDP 2 processes / 1 process: {results['ddp']['sps'] / torch_sps:.2f}x steps/s "
              f"(return {results['ddp']['final_return']:.1f}; this machine has "
              f"{os.cpu_count()} cores)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
