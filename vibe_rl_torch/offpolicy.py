"""What DQN and SAC share on the Torch backend: the collect loop, the replay buffer, the generators,
the gradient averaging over DDP ranks and the optimizer/RNG state (vibe_rl_jax/offpolicy.py's mirror).

One update (`update`; one Lightning `training_step` runs several, see
`update_batches`) = `train_frequency` vector-env steps, every transition added
to this rank's buffer with the true final observation as `next_obs`, then, once `learning_starts` env steps (over all
ranks) are collected and the buffer holds a batch, `gradient_steps` gradient
steps. Same meaning as on the JAX side.

Under DDP each rank steps `num_envs / WORLD_SIZE` envs into its own buffer of
`buffer_size / WORLD_SIZE` transitions (the same total, holding the same
number of vector steps as the single buffer of the JAX mesh) and samples
`batch_size / WORLD_SIZE` of every batch from it; gradients are averaged over
the ranks before each optimizer step, so every step follows the gradient of
one global batch of `batch_size`. The averaging is an explicit all-reduce (one
flat tensor per optimizer step) instead of DDP's reducer: SAC takes three
optimizer steps on three parameter subsets per gradient step, which the
reducer (one backward over all parameters per forward) does not fit. (Lightning
still wraps the module in DDP; under manual optimisation its reducer is armed
only by `manual_backward`, which these modules do not call.) Ranks always agree
on whether to learn: they add the same number of transitions.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from common import rl_math
from common.config import ConfigError, DQNConfig, SACConfig, TrainConfig
from vibe_rl_torch import envs
from vibe_rl_torch.distributed import DistInfo, LaunchError
from vibe_rl_torch.envs import VecEnv
from vibe_rl_torch.replay import ReplayBuffer


def check_config(config: TrainConfig, info: DistInfo) -> None:
    """Checks before anything starts: the action space fits the algorithm; the batch splits over ranks."""
    algo = config.algo
    probe = envs.make_gym_vector_env(config.env.id, 1)
    spec = envs.action_spec(probe.single_action_space, config.env.id)
    probe.close()
    if isinstance(algo, DQNConfig) and spec.continuous:
        raise ConfigError(f"--env.id {config.env.id} has continuous actions; DQN needs a "
                          f"discrete action space (use SAC or PPO).")
    if isinstance(algo, SACConfig) and not spec.continuous:
        raise ConfigError(f"--env.id {config.env.id} has discrete actions; SAC needs a Box "
                          f"action space (use DQN or PPO).")
    if algo.batch_size % info.world_size:
        raise LaunchError(
            f"--algo.batch-size ({algo.batch_size}) must be divisible by WORLD_SIZE="
            f"{info.world_size}: each rank samples an equal share of every batch from its own "
            f"replay buffer.")


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Replace each gradient by its mean over all ranks (one all-reduce of a flat tensor)."""
    if world_size == 1:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def update_target(target: list[torch.Tensor], online: list[torch.Tensor], tau: float) -> None:
    """optax.incremental_update: target <- tau * online + (1 - tau) * target (tau = 1: a copy).

    Takes the two networks' parameter lists (made once: SAC calls this every gradient step).
    """
    with torch.no_grad():
        if tau == 1.0:
            torch._foreach_copy_(target, online)
        else:
            torch._foreach_lerp_(target, online, tau)


class OffPolicyModule(L.LightningModule):
    """Base of DQN and SAC. Subclasses build their networks, `buffer`, optimizers and
    `update`, and say which parameters make the inference weights."""

    METRIC_KEYS: tuple[str, ...] = ()  # per-update metrics the training loop sums
    LEARN_KEYS: tuple[str, ...] = ()  # those of them that are means over an update's grad steps

    def __init__(self, config: TrainConfig, venv: VecEnv, *, rank_seed: int, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.automatic_optimization = False
        self.config = config
        self.algo: DQNConfig | SACConfig = config.algo
        self.venv = venv
        self.world_size = world_size
        self.local_batch = self.algo.batch_size // world_size
        self.rollout_device = torch.device(device)
        self.update_step = 0  # updates completed
        self._restore_optim: dict[str, Any] | None = None
        self.seed_streams(rank_seed)
        self.nstep_windows = self.empty_nstep_windows()  # numpy, saved with this rank's state

    def make_buffer(self, action_shape: tuple[int, ...], action_dtype: torch.dtype) -> ReplayBuffer:
        return ReplayBuffer(self.algo.buffer_size // self.world_size, (self.venv.obs_dim,),
                            action_shape, action_dtype, self.rollout_device,
                            discount=self.n_step > 1)

    @property
    def n_step(self) -> int:
        return getattr(self.algo, "n_step", 1)

    def empty_nstep_windows(self) -> dict[str, np.ndarray] | None:
        """This rank's empty n-step windows (common.rl_math.nstep_empty); None for one-step."""
        if self.n_step == 1:
            return None
        return rl_math.nstep_empty(np, self.n_step, self.venv.num_envs, (self.venv.obs_dim,),
                                   np.int64)

    def seed_streams(self, rank_seed: int) -> None:
        """This rank's generators: exploration/policy noise and replay sampling."""
        self.action_rng = torch.Generator(self.rollout_device).manual_seed(rank_seed + 1)
        self.sample_rng = torch.Generator(self.rollout_device).manual_seed(rank_seed + 2)

    # ---------------------------------------------------------------- updates
    def update_batches(self, start: int, end: int) -> "UpdateBatches":
        """What Lightning iterates from update `start` to `end`: runs of consecutive updates.

        One Lightning batch per update would cost its loop's per-batch hooks (~0.1 ms) on every
        vector step. A run ends at every multiple of `log_interval` and `save_interval` (and at
        `end`), so the bookkeeping callback still sees each point where it logs or saves; the
        updates themselves are the same ones in the same order however they are grouped.
        """
        log, save = self.config.log_interval, self.config.save_interval
        runs, s = [], start
        while s < end:
            stop = min(end, (s // log + 1) * log, (s // save + 1) * save)
            runs.append((s, stop))
            s = stop
        return UpdateBatches(runs)

    def update(self) -> tuple[dict[str, float], torch.Tensor | None]:
        """One update: (episode sums and per-update floats, LEARN_KEYS means or None)."""
        raise NotImplementedError

    def training_step(self, batch: tuple[int, int], batch_idx: int) -> dict[str, float]:
        """Updates `batch[0]` to `batch[1]`; returns their metrics summed, and `num_updates`."""
        start, stop = batch
        if start != self.update_step:
            raise RuntimeError(f"Lightning fed updates from {start}, the module is at "
                               f"{self.update_step}.")
        totals: dict[str, float] = {}
        learn = torch.zeros(len(self.LEARN_KEYS), dtype=torch.float64, device=self.rollout_device)
        for _ in range(start, stop):
            metrics, means = self.update()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
            if means is not None:
                learn += means
        totals.update(zip(self.LEARN_KEYS, learn.tolist()))
        totals["num_updates"] = stop - start
        return totals

    def load_nstep_windows(self, saved: dict[str, np.ndarray] | None) -> None:
        expected = self.empty_nstep_windows()
        if (saved is None) != (expected is None) or (
                saved is not None and saved["reward"].shape != expected["reward"].shape):
            raise ConfigError(
                f"The checkpoint's n-step windows do not fit --algo.n-step {self.n_step}: resume "
                f"with the --algo.n-step the run was trained with.")
        self.nstep_windows = None if saved is None else {k: v.copy() for k, v in saved.items()}

    # ---------------------------------------------------------------- collect
    @torch.inference_mode()
    def collect(self, select_action: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Step this rank's envs `train_frequency` times into the buffer; returns episode sums."""
        venv, device = self.venv, self.rollout_device
        scale = self.config.env.reward_scale
        ret = length = count = 0.0
        for _ in range(self.algo.train_frequency):
            obs = venv.obs  # a fresh array every step: the buffer may keep it as it is
            action = select_action(torch.from_numpy(obs).to(device)).cpu().numpy()
            step = venv.step(action)
            if self.nstep_windows is None:
                self.buffer.add(obs=obs, action=action, reward=step.reward * scale,
                                next_obs=step.final_obs, terminated=step.terminated)
            else:
                self.nstep_windows, leaving = rl_math.nstep_push(
                    np, self.nstep_windows, obs=obs, action=action, reward=step.reward * scale,
                    terminated=step.terminated.astype(np.float32), done=step.done,
                    next_obs=step.final_obs, gamma=self.algo.gamma)
                if leaving["valid"][0]:  # only the first n - 1 steps of a run hand out none
                    self.buffer.add(**{k: leaving[k] for k in self.buffer.data})
            if step.done.any():
                ret += float(step.episode_return.sum())
                length += float(step.episode_length.sum())
                count += float(step.done.sum())
        return {"episode_return_sum": ret, "episode_length_sum": length, "episode_count": count}

    def env_steps(self, updates: int) -> int:
        """Environment steps (all ranks) collected by `updates` updates."""
        return updates * self.config.steps_per_update

    def learning_started(self, env_steps: int) -> bool:
        """After `learning_starts` env steps, and once this rank's buffer holds a batch
        (which, short of a resume onto another world size, the first condition implies)."""
        return (env_steps >= max(self.algo.learning_starts, self.algo.batch_size)
                and self.buffer.size >= self.local_batch)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                       params: list[torch.nn.Parameter], max_grad_norm: float | None = None) -> None:
        """Backward, average over ranks, clip the global norm (optax.clip_by_global_norm), step."""
        for p in params:  # optimizer.zero_grad(set_to_none=True) without its per-call overhead
            p.grad = None
        loss.backward()
        average_gradients(params, self.world_size)
        if max_grad_norm is not None:  # optax.clip_by_global_norm: rescale only above the bound
            grads = [p.grad for p in params]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            if norm > max_grad_norm:
                torch._foreach_mul_(grads, max_grad_norm / norm)
        optimizer.step()

    # ---------------------------------------------------------------- state
    @property
    def inference_network(self) -> torch.nn.Module:
        """The network whose canonical params are `params/model.safetensors`."""
        raise NotImplementedError

    def algo_state(self) -> dict[str, Any]:
        """What resume needs besides the inference weights (targets, critics, temperature...)."""
        raise NotImplementedError

    def load_algo_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def optimizer_state(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.trainer.optimizers],
                "schedulers": [cfg.scheduler.state_dict()
                               for cfg in self.trainer.lr_scheduler_configs]}

    def restore_optimizer_state(self, state: dict[str, Any]) -> None:
        """Applied at fit start, once Lightning has built the optimizers."""
        self._restore_optim = state

    def on_fit_start(self) -> None:
        if self._restore_optim is not None:
            for opt, saved in zip(self.trainer.optimizers, self._restore_optim["optimizers"],
                                  strict=True):
                opt.load_state_dict(saved)
            for cfg, saved in zip(self.trainer.lr_scheduler_configs,
                                  self._restore_optim["schedulers"], strict=True):
                cfg.scheduler.load_state_dict(saved)
            self._restore_optim = None

    def rng_state(self) -> dict[str, Any]:
        return {"action_rng": self.action_rng.get_state(), "sample_rng": self.sample_rng.get_state(),
                "device": self.rollout_device.type}

    def restore_rng_state(self, state: dict[str, Any]) -> bool:
        """Restore the generators; False (and left as seeded) if saved on another device type."""
        if state["device"] != self.rollout_device.type:
            return False
        self.action_rng.set_state(state["action_rng"])
        self.sample_rng.set_state(state["sample_rng"])
        return True


class UpdateBatches:
    """The runs of `update_batches` as Lightning's "dataloader" (a plain list of tuples would be
    taken for several dataloaders)."""

    def __init__(self, runs: list[tuple[int, int]]):
        self.runs = runs

    def __iter__(self):
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)


def mean_over_learning(sums: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    """Learning metrics averaged over the updates (and ranks) that learned; NaN before any."""
    learned = sums["learn_count"]
    return {k: (sums[k] / learned if learned else float("nan")) for k in keys}
