"""PPO as a LightningModule: one `training_step` = one PPO update, read top to bottom.

rollout (`num_steps` batched policy calls on this rank's vector env) ->
GAE (`common.rl_math.gae`, the numpy reference itself) -> `update_epochs` x
`num_minibatches` Adam steps on `common.rl_math.ppo_loss(torch, ...)`.
Same hyperparameters mean the same as on the JAX side
(vibe_rl_jax/ppo.py): minibatches are permutations of the update's batch, the
gradient norm is clipped globally, and the learning-rate schedule counts
minibatch steps (`common.schedules.lr_at` through `LambdaLR`).

Optimisation is manual because one update takes many optimizer steps. Under
DDP each rank holds `num_envs / WORLD_SIZE` envs and an equal slice of every
minibatch; Lightning re-arms the DDP reducer before every `manual_backward`,
so each backward averages gradients over all ranks and the global minibatch
gradient is the one a single process would compute from the same samples
(the ranks' losses are means over equal-sized slices). One difference from a
single process remains by design: advantages are standardised per rank's
slice of the minibatch (as in CleanRL's multi-GPU PPO), not over the global
minibatch.

Randomness is explicit: parameters are initialised from `config.seed` (the
same on every rank); action sampling and minibatch shuffling use this rank's
own generators, which are checkpointed with the env state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch

from common import rl_math, schedules
from common.config import PPOConfig, TrainConfig
from vibe_rl_torch.envs import VecEnv
from vibe_rl_torch.networks import ActorCritic

LOSS_NAMES = rl_math.PPOLoss._fields  # total, policy, value, entropy, approx_kl, clip_fraction


class Batch(NamedTuple):
    """One update's flattened samples ([num_steps * local envs, ...]) on the module's device."""

    obs: torch.Tensor
    action: torch.Tensor
    log_prob: torch.Tensor
    value: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def take(self, idx: torch.Tensor) -> "Batch":
        return Batch(*(x.index_select(0, idx) for x in self))


def sample_action(network: ActorCritic, out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw actions with an explicit generator (torch.distributions' `sample` cannot take one).

    Gaussian: mean + std * N(0, 1). Categorical: the Gumbel-max trick, argmax(logits + G) with
    G = -log(E), E ~ Exp(1), as jax.random.categorical does (and much cheaper than multinomial).
    """
    if network.continuous:
        noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        return out + network.log_std.exp() * noise
    exponential = torch.empty_like(out).exponential_(generator=generator)
    return torch.argmax(out - exponential.log(), dim=-1)


def loss(network: ActorCritic, algo: PPOConfig, batch: Batch) -> rl_math.PPOLoss:
    """The shared PPO loss on one minibatch."""
    out, values = network(batch.obs)
    dist = network.distribution(out)
    return rl_math.ppo_loss(
        torch, log_prob=dist.log_prob(batch.action), old_log_prob=batch.log_prob,
        advantages=batch.advantages, values=values, old_values=batch.value,
        returns=batch.returns, entropy=dist.entropy(), clip_eps=algo.clip_eps,
        clip_value=algo.clip_value, vf_coef=algo.vf_coef, ent_coef=algo.ent_coef,
        normalize_advantages=algo.normalize_advantages)


class PPO(L.LightningModule):
    def __init__(self, config: TrainConfig, venv: VecEnv, *, rank_seed: int):
        super().__init__()
        if not isinstance(config.algo, PPOConfig):
            raise TypeError(f"PPO got a {type(config.algo).__name__}")
        self.automatic_optimization = False
        self.config = config
        self.algo: PPOConfig = config.algo
        self.venv = venv
        spec = venv.action_spec
        init_rng = torch.Generator().manual_seed(config.seed)  # identical on every rank
        self.network = ActorCritic(venv.obs_dim, spec.dim, spec.continuous,
                                   tuple(self.algo.hidden_sizes), self.algo.activation,
                                   self.algo.init_log_std, generator=init_rng)
        self.steps_per_update = self.algo.update_epochs * self.algo.num_minibatches
        self.total_steps = config.num_updates * self.steps_per_update
        self.warmup_steps = self.algo.warmup_updates * self.steps_per_update
        self.update_step = 0  # updates completed
        self._restore_optim: dict[str, Any] | None = None
        self._restore_rng: dict[str, Any] | None = None
        self.seed_streams(rank_seed)

    def seed_streams(self, rank_seed: int) -> None:
        """Seed this rank's generators (the action one moves to the module's device at fit start)."""
        self._rank_seed = rank_seed
        self.shuffle_rng = torch.Generator().manual_seed(rank_seed)
        self.action_rng = torch.Generator().manual_seed(rank_seed + 1)

    # ---------------------------------------------------------------- schedule / optimizer
    def learning_rate(self, update_step: int) -> float:
        """The learning rate of the first minibatch step after `update_step` updates."""
        return schedules.lr_at(self.algo.lr_schedule, self.algo.lr,
                               update_step * self.steps_per_update, self.total_steps,
                               self.warmup_steps)

    def configure_optimizers(self):
        algo = self.algo
        # optax.adam's update rule (eps outside the sqrt, bias-corrected); the fused kernel is
        # the same math in one call per step, which matters for these tiny networks.
        optimizer = torch.optim.Adam(self.network.parameters(), lr=algo.lr, eps=1e-5, fused=True)
        scale = lambda step: schedules.lr_at(  # noqa: E731 - LambdaLR multiplies the base lr
            algo.lr_schedule, algo.lr, step, self.total_steps, self.warmup_steps) / algo.lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    def optimizer_state(self) -> dict[str, Any]:
        return {"optimizer": self.trainer.optimizers[0].state_dict(),
                "scheduler": self.trainer.lr_scheduler_configs[0].scheduler.state_dict()}

    def restore_optimizer_state(self, state: dict[str, Any]) -> None:
        """Applied at fit start, once Lightning has built the optimizer."""
        self._restore_optim = state

    def on_fit_start(self) -> None:
        if self.action_rng.device != self.device:
            self.action_rng = torch.Generator(device=self.device).manual_seed(self._rank_seed + 1)
        if self._restore_rng is not None:
            self.shuffle_rng.set_state(self._restore_rng["shuffle_rng"])
            if self._restore_rng["action_rng_device"] == self.action_rng.device.type:
                self.action_rng.set_state(self._restore_rng["action_rng"])
            self._restore_rng = None
        if self._restore_optim is not None:
            self.trainer.optimizers[0].load_state_dict(self._restore_optim["optimizer"])
            self.trainer.lr_scheduler_configs[0].scheduler.load_state_dict(
                self._restore_optim["scheduler"])
            self._restore_optim = None

    # ---------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self) -> tuple[Batch, dict[str, float]]:
        """Step this rank's envs `num_steps` times; returns the flat batch and episode sums.

        Per step only the policy forward (actor and critic fused, `frozen_forward`), the
        action draw and the env step run; the network outputs stay in preallocated tensors
        and the log-probabilities of all the actions are computed in one call after the loop
        (the same function, on the whole rollout), so the loop makes no per-step Distribution
        objects or host copies beyond the actions.
        """
        algo, venv, device, network = self.algo, self.venv, self.device, self.network
        T, N, D = algo.num_steps, venv.num_envs, venv.obs_dim
        spec = venv.action_spec
        action_shape = (spec.dim,) if spec.continuous else ()
        obs = np.empty((T, N, D), np.float32)
        final_obs = np.empty((T, N, D), np.float32)
        rewards = np.empty((T, N), np.float32)
        terminated = np.empty((T, N), bool)
        truncated = np.empty((T, N), bool)
        outs = torch.empty((T, N, spec.dim), device=device)
        values = torch.empty((T, N), device=device)
        actions = torch.empty((T, N) + action_shape, device=device,
                              dtype=torch.float32 if spec.continuous else torch.int64)
        ep_return = ep_length = ep_count = 0.0
        policy = network.frozen_forward()
        for t in range(T):
            obs[t] = venv.obs
            out, values[t] = policy(torch.from_numpy(obs[t]).to(device))
            outs[t] = out
            action = actions[t] = sample_action(network, out, self.action_rng)
            step = venv.step(action.cpu().numpy())
            rewards[t] = step.reward
            terminated[t] = step.terminated
            truncated[t] = step.truncated
            final_obs[t] = step.final_obs
            if step.done.any():
                ep_return += float(step.episode_return.sum())
                ep_length += float(step.episode_length.sum())
                ep_count += float(step.done.sum())
        log_probs = network.distribution(outs).log_prob(actions)
        # V of the observation that followed each step: the true final observation where an
        # episode ended (terminated or truncated), else simply the next observation.
        next_values = network.critic(torch.from_numpy(final_obs.reshape(T * N, D)).to(device))
        advantages, returns = rl_math.gae(rewards * self.config.env.reward_scale,
                                          values.cpu().numpy(),
                                          next_values.reshape(T, N).cpu().numpy(),  # (T*N, 1)
                                          terminated, truncated, algo.gamma, algo.gae_lambda)

        def flat(x: np.ndarray | torch.Tensor) -> torch.Tensor:
            x = torch.as_tensor(x).reshape((T * N,) + tuple(x.shape[2:]))
            return x.to(device, torch.float32 if x.dtype == torch.float64 else x.dtype)

        batch = Batch(flat(obs), flat(actions), flat(log_probs), flat(values), flat(advantages),
                      flat(returns))
        return batch, {"episode_return_sum": ep_return, "episode_length_sum": ep_length,
                       "episode_count": ep_count}

    # ---------------------------------------------------------------- update
    def training_step(self, update: Any, batch_idx: int) -> dict[str, float]:
        """One PPO update; returns per-update metrics (losses averaged over minibatch steps).

        The optimizer, scheduler and clipping are called directly rather than through
        Lightning's LightningOptimizer/clip_gradients wrappers (their hooks cost about as much
        as the step itself on these small networks); the backward stays `manual_backward`,
        which under DDP arms the reducer so the gradients are averaged over the ranks before
        they are clipped and applied.
        """
        algo = self.algo
        optimizer = self.trainer.optimizers[0]
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler
        params = list(self.network.parameters())
        batch, metrics = self.rollout()
        size = batch.obs.shape[0]
        minibatch = size // algo.num_minibatches
        sums = torch.zeros(len(LOSS_NAMES), dtype=torch.float64, device=self.device)
        for _ in range(algo.update_epochs):
            perm = torch.randperm(size, generator=self.shuffle_rng).to(self.device)
            for i in range(algo.num_minibatches):
                result = loss(self.network, algo, batch.take(perm[i * minibatch:(i + 1) * minibatch]))
                for p in params:  # zero_grad(set_to_none=True)
                    p.grad = None
                self.manual_backward(result.total)
                torch.nn.utils.clip_grad_norm_(params, algo.max_grad_norm, foreach=True)
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    sums += torch.stack(result)
        self.update_step += 1
        means = (sums / self.steps_per_update).cpu().numpy()
        metrics.update(zip(LOSS_NAMES, means.tolist()))
        return metrics

    # ---------------------------------------------------------------- state
    def rng_state(self) -> dict[str, Any]:
        return {"shuffle_rng": self.shuffle_rng.get_state(),
                "action_rng": self.action_rng.get_state(),
                "action_rng_device": self.action_rng.device.type}

    def restore_rng_state(self, state: dict[str, Any]) -> None:
        """Applied at fit start, once the action generator lives on the module's device."""
        self._restore_rng = state
