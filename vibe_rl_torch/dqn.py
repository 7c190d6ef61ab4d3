"""DQN as a LightningModule: epsilon-greedy collection into a torch replay buffer, then double-DQN
gradient steps; one `update` = one update of the JAX backend's (vibe_rl_jax/dqn.py).

One update = `train_frequency` vector-env steps with epsilon from an
optax-style linear schedule over `exploration_fraction * total_timesteps` env
steps, then (after `learning_starts` env steps) `gradient_steps` Adam steps on
the TD error (Huber or 0.5 * squared, the target from `common.rl_math.td_target`
with double-DQN action selection; terminated transitions do not bootstrap,
truncated ones bootstrap from the true final observation). The target network
moves toward the online one every `target_update_interval` gradient steps
(copy for tau = 1, Polyak otherwise). The learning rate schedule counts
optimizer steps, like optax's. With `n_step` > 1 the buffer holds n-step
transitions and their discount (common.rl_math.nstep_push, as on the JAX side).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from common import metrics as metrics_lib
from common import rl_math, schedules
from common.config import ConfigError, DQNConfig, TrainConfig
from vibe_rl_torch.envs import VecEnv
from vibe_rl_torch.networks import QNetwork
from vibe_rl_torch.offpolicy import OffPolicyModule, mean_over_learning, update_target


def double_dqn_target(reward: torch.Tensor, terminated: torch.Tensor, next_q_online: torch.Tensor,
                      next_q_target: torch.Tensor, gamma: float | torch.Tensor,
                      double: bool) -> torch.Tensor:
    """TD target; with `double`, the online net picks a', the target net evaluates it."""
    if double:
        best = next_q_online.argmax(dim=-1, keepdim=True)
        next_value = next_q_target.gather(-1, best)[..., 0]
    else:
        next_value = next_q_target.max(dim=-1).values
    return rl_math.td_target(reward, terminated, next_value, gamma)


class DQN(OffPolicyModule):
    METRIC_KEYS = ("td", "q_values", "epsilon", "learn_count")
    LEARN_KEYS = ("td", "q_values")

    def __init__(self, config: TrainConfig, venv: VecEnv, *, rank_seed: int, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        super().__init__(config, venv, rank_seed=rank_seed, world_size=world_size, device=device)
        algo: DQNConfig = config.algo
        spec = venv.action_spec
        if spec.continuous:
            raise ConfigError(f"--env.id {config.env.id} has continuous actions; DQN needs a "
                              f"discrete action space (use SAC or PPO).")
        self.num_actions = spec.dim
        init_rng = torch.Generator().manual_seed(config.seed)  # identical on every rank
        self.q_network = QNetwork(venv.obs_dim, spec.dim, tuple(algo.hidden_sizes),
                                  algo.activation, generator=init_rng)
        self.target_network = copy.deepcopy(self.q_network).requires_grad_(False)
        self.total_grad_steps = config.num_updates * algo.gradient_steps
        self.grad_step = 0
        self.epsilon_steps = max(int(algo.exploration_fraction * config.total_timesteps), 1)
        self.buffer = self.make_buffer((), torch.int64)
        self.to(self.rollout_device)
        # Made once: moving the module to a device or loading a state dict changes the
        # parameters in place, so these stay the module's own.
        self._params = list(self.q_network.parameters())
        self._target_params = list(self.target_network.parameters())

    # ---------------------------------------------------------------- schedules / optimizer
    def epsilon(self, env_steps: int) -> float:
        algo = self.algo
        return schedules.linear_schedule(algo.eps_start, algo.eps_end, self.epsilon_steps, env_steps)

    def learning_rate(self, update_step: int) -> float:
        """The learning rate logged after `update_step` updates (the JAX backend's convention)."""
        return schedules.lr_at(self.algo.lr_schedule, self.algo.lr,
                               update_step * self.algo.gradient_steps, self.total_grad_steps)

    def configure_optimizers(self):
        algo = self.algo
        # optax.adam's update rule and defaults (eps 1e-8 outside the sqrt); fused: one kernel.
        optimizer = torch.optim.Adam(self.q_network.parameters(), lr=algo.lr, fused=True)
        scale = lambda step: schedules.lr_at(  # noqa: E731 - LambdaLR multiplies the base lr
            algo.lr_schedule, algo.lr, step, self.total_grad_steps) / algo.lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    # ---------------------------------------------------------------- update
    def select_action(self, obs: torch.Tensor, epsilon: float) -> torch.Tensor:
        """Epsilon-greedy, per env, with this rank's action generator."""
        greedy = self.q_network(obs).argmax(dim=-1)
        n = (obs.shape[0],)
        explore = torch.rand(n, generator=self.action_rng, device=obs.device) < epsilon
        random = torch.randint(0, self.num_actions, n, generator=self.action_rng, device=obs.device)
        return torch.where(explore, random, greedy)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(TD loss, mean Q of the taken actions) on one batch."""
        algo = self.algo
        q_taken = self.q_network(batch["obs"]).gather(-1, batch["action"][:, None])[:, 0]
        with torch.no_grad():
            next_target = self.target_network(batch["next_obs"])
            next_online = self.q_network(batch["next_obs"]) if algo.double_dqn else next_target
            # n-step transitions carry their own discount (gamma ** rewards summed).
            target = double_dqn_target(batch["reward"], batch["terminated"], next_online,
                                       next_target, batch.get("discount", algo.gamma),
                                       algo.double_dqn)
        error = q_taken - target
        loss = rl_math.huber(torch, error) if algo.loss == "huber" else 0.5 * error * error
        return loss.mean(), q_taken.detach().mean()

    def update(self) -> tuple[dict[str, float], torch.Tensor | None]:
        algo = self.algo
        optimizer = self.trainer.optimizers[0]
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler
        epsilon = self.epsilon(self.env_steps(self.update_step))
        metrics: dict[str, float] = self.collect(lambda obs: self.select_action(obs, epsilon))
        means = None
        learned = self.learning_started(self.env_steps(self.update_step + 1))
        if learned:
            params = self._params
            sums = torch.zeros(2, dtype=torch.float64, device=self.rollout_device)
            for _ in range(algo.gradient_steps):
                loss, q_mean = self.loss(self.buffer.sample(self.local_batch, self.sample_rng))
                self.optimizer_step(optimizer, loss, params, algo.max_grad_norm)
                scheduler.step()
                self.grad_step += 1
                if self.grad_step % algo.target_update_interval == 0:
                    update_target(self._target_params, params, algo.tau)
                sums += torch.stack([loss.detach(), q_mean])
            means = sums / algo.gradient_steps
        self.update_step += 1
        metrics.update(epsilon=epsilon, learn_count=float(learned))
        return metrics, means

    def chunk_metrics(self, sums: dict[str, float], num_updates: int, step: int) -> dict[str, float]:
        """Tags of vibe_rl_jax.dqn.DQN.chunk_metrics; `sums` are over updates and ranks."""
        out = mean_over_learning(sums, ("td", "q_values"))
        return {metrics_lib.loss_tag("td"): out["td"], "train/q_values": out["q_values"],
                "train/epsilon": sums["epsilon"] / (num_updates * self.world_size),
                metrics_lib.LEARNING_RATE: self.learning_rate(step)}

    # ---------------------------------------------------------------- state
    @property
    def inference_network(self) -> QNetwork:
        return self.q_network

    def algo_state(self) -> dict[str, Any]:
        return {"target_network": self.target_network.state_dict(), "grad_step": self.grad_step}

    def load_algo_state(self, state: dict[str, Any]) -> None:
        self.target_network.load_state_dict(state["target_network"])
        self.grad_step = int(state["grad_step"])
