"""SAC as a LightningModule: tanh-squashed Gaussian actor, twin critics with Polyak targets,
temperature tuned toward a target entropy; one `update` = one update (vibe_rl_jax/sac.py).

One update = `train_frequency` vector-env steps (uniform random actions in
the Box until `learning_starts` env steps), then `gradient_steps` x (critic
step, actor step, temperature step, Polyak step of the target critics), in
that order, as on the JAX side. The soft TD target, actor loss and
temperature loss are `common.rl_math`'s. The policy is
`torch.distributions`' composition Normal -> TanhTransform -> AffineTransform
(onto [low, high]); its log-density is the Gaussian one minus the two
transforms' log|det J| (the tanh one in torch's stable form), evaluated at the
pre-tanh sample, so no atanh of a saturated action is ever taken.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from torch.distributions import Normal
from torch.distributions.transforms import AffineTransform, TanhTransform

from common import metrics as metrics_lib
from common import rl_math
from common.config import ConfigError, SACConfig, TrainConfig
from vibe_rl_torch.envs import VecEnv
from vibe_rl_torch.networks import SACActor, TwinCritic
from vibe_rl_torch.offpolicy import OffPolicyModule, mean_over_learning, update_target

_TANH = TanhTransform()


class Squash:
    """u -> low + (high - low) (tanh(u) + 1) / 2, and the log-density correction of that map."""

    def __init__(self, low: torch.Tensor, high: torch.Tensor):
        self.affine = AffineTransform(loc=(high + low) / 2, scale=(high - low) / 2)
        # The affine map's log|det J| does not depend on the point: sum it over action dims once.
        zero = torch.zeros_like(low)
        self.affine_log_det = self.affine.log_abs_det_jacobian(zero, self.affine(zero)).sum()

    def action(self, pre_tanh: torch.Tensor) -> torch.Tensor:
        return self.affine(torch.tanh(pre_tanh))

    def __call__(self, pre_tanh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(action, log|d action / d u| summed over action dims)."""
        squashed = torch.tanh(pre_tanh)
        action = self.affine(squashed)
        log_det = _TANH.log_abs_det_jacobian(pre_tanh, squashed).sum(-1) + self.affine_log_det
        return action, log_det


def squashed_log_prob(mean: torch.Tensor, log_std: torch.Tensor, pre_tanh: torch.Tensor,
                      squash: Squash) -> tuple[torch.Tensor, torch.Tensor]:
    """(action, log pi(action)) for a pre-tanh sample of N(mean, exp(log_std))."""
    action, log_det = squash(pre_tanh)
    gaussian = Normal(mean, log_std.exp(), validate_args=False).log_prob(pre_tanh).sum(-1)
    return action, gaussian - log_det


class SAC(OffPolicyModule):
    METRIC_KEYS = ("critic", "actor", "alpha_loss", "q_values", "alpha", "entropy", "learn_count")
    LEARN_KEYS = METRIC_KEYS[:-1]

    def __init__(self, config: TrainConfig, venv: VecEnv, *, rank_seed: int, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        super().__init__(config, venv, rank_seed=rank_seed, world_size=world_size, device=device)
        algo: SACConfig = config.algo
        spec = venv.action_spec
        if not spec.continuous:
            raise ConfigError(f"--env.id {config.env.id} has discrete actions; SAC needs a Box "
                              f"action space (use DQN or PPO).")
        self.action_dim = spec.dim
        init_rng = torch.Generator().manual_seed(config.seed)  # identical on every rank
        hidden = tuple(algo.hidden_sizes)
        self.actor = SACActor(venv.obs_dim, spec.dim, hidden, algo.activation, algo.log_std_min,
                              algo.log_std_max, generator=init_rng)
        self.critic = TwinCritic(venv.obs_dim, spec.dim, hidden, algo.activation, generator=init_rng)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(algo.init_alpha), dtype=torch.float32))
        self.target_entropy = (-float(spec.dim) if algo.target_entropy is None
                               else float(algo.target_entropy))
        self.low = torch.as_tensor(spec.low, device=self.rollout_device)
        self.high = torch.as_tensor(spec.high, device=self.rollout_device)
        self.squash = Squash(self.low, self.high)
        self.buffer = self.make_buffer((spec.dim,), torch.float32)
        self.to(self.rollout_device)
        # Made once (every gradient step uses them): moving the module to a device or loading
        # a state dict changes the parameters in place, so these stay the module's own.
        self._actor_params = list(self.actor.parameters())
        self._critic_params = list(self.critic.parameters())
        self._target_params = list(self.target_critic.parameters())

    def configure_optimizers(self):
        algo = self.algo
        # optax.adam's update rule and defaults (eps 1e-8), one optimizer per loss as on the JAX side.
        return [torch.optim.Adam(self.critic.parameters(), lr=algo.critic_lr, fused=True),
                torch.optim.Adam(self.actor.parameters(), lr=algo.actor_lr, fused=True),
                torch.optim.Adam([self.log_alpha], lr=algo.alpha_lr, fused=True)]

    # ---------------------------------------------------------------- policy
    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(action in the Box, its log-probability), reparameterised, noise from action_rng."""
        mean, log_std = self.actor(obs)
        noise = torch.randn(mean.shape, generator=self.action_rng, device=mean.device,
                            dtype=mean.dtype)
        return squashed_log_prob(mean, log_std, mean + log_std.exp() * noise, self.squash)

    def select_action(self, obs: torch.Tensor, random: bool) -> torch.Tensor:
        if random:  # uniform in the Box before learning_starts
            u = torch.rand(obs.shape[:1] + self.low.shape, generator=self.action_rng,
                           device=obs.device)
            return self.low + (self.high - self.low) * u
        mean, log_std = self.actor(obs)  # the same draw as `sample`, without the log-density
        noise = torch.randn(mean.shape, generator=self.action_rng, device=mean.device,
                            dtype=mean.dtype)
        return self.squash.action(mean + log_std.exp() * noise)

    # ---------------------------------------------------------------- update
    def critic_loss(self, batch: dict[str, torch.Tensor], alpha: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(twin-critic TD loss, mean Q) against the soft target of the target critics."""
        with torch.no_grad():
            next_action, next_log_prob = self.sample(batch["next_obs"])
            next_q1, next_q2 = self.target_critic(batch["next_obs"], next_action)
            target = rl_math.sac_critic_target(
                torch, reward=batch["reward"], terminated=batch["terminated"], next_q1=next_q1,
                next_q2=next_q2, next_log_prob=next_log_prob, alpha=alpha, gamma=self.algo.gamma)
        q1, q2 = self.critic(batch["obs"], batch["action"])
        loss = 0.5 * (((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean())
        return loss, 0.5 * (q1 + q2).detach().mean()

    def actor_loss(self, obs: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(actor loss, log-probs of the sampled actions); gradients reach the actor only."""
        for p in self._critic_params:  # critic.requires_grad_(False), without the module walk
            p.requires_grad_(False)
        try:
            action, log_prob = self.sample(obs)
            q1, q2 = self.critic(obs, action)
        finally:
            for p in self._critic_params:
                p.requires_grad_(True)
        return rl_math.sac_actor_loss(torch, q1=q1, q2=q2, log_prob=log_prob, alpha=alpha), log_prob

    def gradient_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Critic, actor, temperature and target steps; returns this step's metrics (LEARN_KEYS)."""
        algo = self.algo
        critic_opt, actor_opt, alpha_opt = self.trainer.optimizers
        alpha = self.log_alpha.detach().exp()
        critic_loss, q_mean = self.critic_loss(batch, alpha)
        self.optimizer_step(critic_opt, critic_loss, self._critic_params)

        actor_loss, log_prob = self.actor_loss(batch["obs"], alpha)
        self.optimizer_step(actor_opt, actor_loss, self._actor_params)

        log_prob = log_prob.detach()
        alpha_loss = rl_math.sac_temperature_loss(log_alpha=self.log_alpha, log_prob=log_prob,
                                                  target_entropy=self.target_entropy)
        if algo.autotune_alpha:
            self.optimizer_step(alpha_opt, alpha_loss, [self.log_alpha])

        update_target(self._target_params, self._critic_params, algo.tau)
        return torch.stack([critic_loss.detach(), actor_loss.detach(), alpha_loss.detach(), q_mean,
                            self.log_alpha.detach().exp(), -log_prob.mean()])

    def update(self) -> tuple[dict[str, float], torch.Tensor | None]:
        algo = self.algo
        random = self.env_steps(self.update_step) < algo.learning_starts
        metrics: dict[str, float] = self.collect(lambda obs: self.select_action(obs, random))
        means = None
        learned = self.learning_started(self.env_steps(self.update_step + 1))
        if learned:
            sums = torch.zeros(len(self.LEARN_KEYS), dtype=torch.float64, device=self.rollout_device)
            for _ in range(algo.gradient_steps):
                sums += self.gradient_step(self.buffer.sample(self.local_batch, self.sample_rng))
            means = sums / algo.gradient_steps
        self.update_step += 1
        metrics["learn_count"] = float(learned)
        return metrics, means

    def chunk_metrics(self, sums: dict[str, float], num_updates: int, step: int) -> dict[str, float]:
        """Tags of vibe_rl_jax.sac.SAC.chunk_metrics; `sums` are over updates and ranks."""
        out = mean_over_learning(sums, self.LEARN_KEYS)
        return {metrics_lib.loss_tag("critic"): out["critic"],
                metrics_lib.loss_tag("actor"): out["actor"],
                metrics_lib.loss_tag("alpha"): out["alpha_loss"],
                "train/q_values": out["q_values"], "train/alpha": out["alpha"],
                "train/entropy": out["entropy"], metrics_lib.LEARNING_RATE: self.algo.actor_lr}

    # ---------------------------------------------------------------- state
    @property
    def inference_network(self) -> SACActor:
        return self.actor  # inference needs the actor only (canonical actor/...), as on JAX

    def algo_state(self) -> dict[str, Any]:
        return {"critic": self.critic.state_dict(), "target_critic": self.target_critic.state_dict(),
                "log_alpha": self.log_alpha.detach().clone()}

    def load_algo_state(self, state: dict[str, Any]) -> None:
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
