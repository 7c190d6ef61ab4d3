"""SAC on the JAX backend: tanh-squashed Gaussian actor, twin critics with Polyak targets,
temperature tuned toward a target entropy; collection and updates in one jitted chunk.

One update = `train_frequency` vector-env steps (uniform random actions until
`learning_starts`), then `gradient_steps` x (critic step, actor step,
temperature step, target Polyak step). The formulas (soft TD target, actor and
temperature losses) are `common.rl_math`'s, shared with the Torch backend.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import metrics as metrics_lib
from common import rl_math
from common.config import ConfigError, SACConfig, TrainConfig
from vibe_rl_jax import chunks, envs, offpolicy, sharding
from vibe_rl_jax.distributions import DiagGaussian, tanh_log_det_jacobian
from vibe_rl_jax.networks import SACActor, TwinCritic


class SACTrainState(NamedTuple):
    actor_params: Any
    critic_params: Any
    target_critic_params: Any
    log_alpha: jax.Array
    actor_opt: Any
    critic_opt: Any
    alpha_opt: Any
    update_step: jax.Array  # updates completed


class SACRunner(NamedTuple):
    train: SACTrainState
    buffer: Any
    env_state: Any
    obs: jax.Array
    rng: jax.Array


def squash(pre_tanh: jax.Array, low: np.ndarray, high: np.ndarray) -> jax.Array:
    """Map an unbounded sample to the Box [low, high] through tanh."""
    return low + 0.5 * (high - low) * (jnp.tanh(pre_tanh) + 1.0)


def squashed_log_prob(dist: DiagGaussian, pre_tanh: jax.Array, low, high) -> jax.Array:
    """log pi(a) of a = squash(u): Gaussian log-density of u minus log|da/du|.

    da/du = 0.5 (high - low) (1 - tanh(u)^2); the tanh part uses the stable form.
    """
    scale = jnp.log(0.5 * (high - low)).sum()
    return dist.log_prob(pre_tanh) - tanh_log_det_jacobian(pre_tanh) - scale


class SAC:
    def __init__(self, config: TrainConfig, mesh: jax.sharding.Mesh):
        self.config = config
        self.algo: SACConfig = config.algo
        self.mesh = mesh
        sharding.check_divisible("--env.num-envs", config.env.num_envs, mesh)
        self.venv = envs.make_vec_env(config.env.id, config.env.num_envs, config.env.normalize_obs)
        spec = self.venv.action_spec
        if not spec.continuous:
            raise ConfigError(f"--env.id {config.env.id} has discrete actions; SAC needs a Box "
                              f"action space (use DQN or PPO).")
        self.spec = spec
        algo = self.algo
        self.actor = SACActor(spec.dim, tuple(algo.hidden_sizes), algo.activation,
                              algo.log_std_min, algo.log_std_max)
        self.critic = TwinCritic(tuple(algo.hidden_sizes), algo.activation)
        self.actor_tx = optax.adam(algo.actor_lr)
        self.critic_tx = optax.adam(algo.critic_lr)
        self.alpha_tx = optax.adam(algo.alpha_lr)
        self.target_entropy = (-float(spec.dim) if algo.target_entropy is None
                               else algo.target_entropy)
        self.buffer = offpolicy.make_buffer(algo.buffer_size, algo.batch_size)
        self._data = sharding.data_sharding(mesh)
        self._replicated = sharding.replicated(mesh)

    # ---------------------------------------------------------------- state
    def init(self, key: jax.Array) -> SACRunner:
        key, k_actor, k_critic, k_env = jax.random.split(key, 4)
        obs, env_state = self.venv.reset(k_env)
        actor_params = self.actor.init(k_actor, obs[:1])
        critic_params = self.critic.init(k_critic, obs[:1], jnp.zeros((1, self.spec.dim)))
        log_alpha = jnp.asarray(math.log(self.algo.init_alpha), jnp.float32)
        train = SACTrainState(actor_params, critic_params, critic_params, log_alpha,
                              self.actor_tx.init(actor_params), self.critic_tx.init(critic_params),
                              self.alpha_tx.init(log_alpha), jnp.zeros((), jnp.int32))
        buffer = self.buffer.init(offpolicy.example_transition(
            self.venv.obs_shape, jnp.zeros((self.spec.dim,), jnp.float32)))
        return SACRunner(train, buffer, env_state, obs, key)

    def shardings(self, abstract: SACRunner) -> SACRunner:
        train = jax.tree.map(lambda _: self._replicated, abstract.train)
        for name in ("actor_params", "critic_params", "target_critic_params", "actor_opt",
                     "critic_opt"):
            train = train._replace(**{name: sharding.fsdp_sharding(getattr(abstract.train, name),
                                                                    self.mesh)})
        return SACRunner(train, self._replicated,
                         self.venv.state_sharding(self._data, self._replicated), self._data,
                         self._replicated)

    def inference_params(self, runner: SACRunner) -> dict[str, Any]:
        # Inference needs the actor only; canonical names are actor/dense_<i>/..., actor/mean/...
        out = {"model": {"actor": runner.train.actor_params["params"]}}
        rms = envs.obs_normalizer(runner.env_state)
        if rms is not None:
            out["obs_normalizer"] = {"mean": rms.mean, "var": rms.var}
        return out

    # ---------------------------------------------------------------- update
    def _sample(self, actor_params, obs, key):
        mean, log_std = self.actor.apply(actor_params, obs)
        dist = DiagGaussian(mean, log_std)
        pre_tanh = dist.sample(key)
        action = squash(pre_tanh, self.spec.low, self.spec.high)
        return action, squashed_log_prob(dist, pre_tanh, self.spec.low, self.spec.high)

    def _critic_loss(self, critic_params, train: SACTrainState, batch, key):
        next_action, next_log_prob = self._sample(train.actor_params, batch["next_obs"], key)
        next_q1, next_q2 = self.critic.apply(train.target_critic_params, batch["next_obs"],
                                             next_action)
        target = jax.lax.stop_gradient(rl_math.sac_critic_target(
            jnp, reward=batch["reward"], terminated=batch["terminated"], next_q1=next_q1,
            next_q2=next_q2, next_log_prob=next_log_prob, alpha=jnp.exp(train.log_alpha),
            gamma=self.algo.gamma))
        q1, q2 = self.critic.apply(critic_params, batch["obs"], batch["action"])
        loss = 0.5 * (((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean())
        return loss, 0.5 * (q1 + q2).mean()

    def _actor_loss(self, actor_params, train: SACTrainState, obs, key):
        action, log_prob = self._sample(actor_params, obs, key)
        q1, q2 = self.critic.apply(train.critic_params, obs, action)
        loss = rl_math.sac_actor_loss(jnp, q1=q1, q2=q2, log_prob=log_prob,
                                      alpha=jnp.exp(train.log_alpha))
        return loss, log_prob

    def _gradient_step(self, train: SACTrainState, batch, key):
        algo = self.algo
        k_critic, k_actor = jax.random.split(key)
        (critic_loss, q_mean), grads = jax.value_and_grad(self._critic_loss, has_aux=True)(
            train.critic_params, train, batch, k_critic)
        updates, critic_opt = self.critic_tx.update(grads, train.critic_opt)
        train = train._replace(critic_params=optax.apply_updates(train.critic_params, updates),
                               critic_opt=critic_opt)

        (actor_loss, log_prob), grads = jax.value_and_grad(self._actor_loss, has_aux=True)(
            train.actor_params, train, batch["obs"], k_actor)
        updates, actor_opt = self.actor_tx.update(grads, train.actor_opt)
        train = train._replace(actor_params=optax.apply_updates(train.actor_params, updates),
                               actor_opt=actor_opt)

        log_prob = jax.lax.stop_gradient(log_prob)
        alpha_loss, grad = jax.value_and_grad(
            lambda la: rl_math.sac_temperature_loss(log_alpha=la, log_prob=log_prob,
                                                    target_entropy=self.target_entropy))(
            train.log_alpha)
        if algo.autotune_alpha:
            updates, alpha_opt = self.alpha_tx.update(grad, train.alpha_opt)
            train = train._replace(log_alpha=optax.apply_updates(train.log_alpha, updates),
                                   alpha_opt=alpha_opt)

        train = train._replace(target_critic_params=optax.incremental_update(
            train.critic_params, train.target_critic_params, algo.tau))
        metrics = {"critic": critic_loss, "actor": actor_loss, "alpha_loss": alpha_loss,
                   "q_values": q_mean, "alpha": jnp.exp(train.log_alpha),
                   "entropy": -log_prob.mean()}
        return train, metrics

    def update(self, runner: SACRunner):
        algo, spec = self.algo, self.spec
        train = runner.train
        env_steps = train.update_step * self.config.steps_per_update
        started_collect = env_steps >= algo.learning_starts

        def select_action(key, obs):
            k_policy, k_random = jax.random.split(key)
            action, _ = self._sample(train.actor_params, obs, k_policy)
            random = jax.random.uniform(k_random, action.shape, minval=spec.low, maxval=spec.high)
            action = jnp.where(started_collect, action, random)
            return action, action

        col = offpolicy.collect(self.venv, self.buffer, env_state=runner.env_state, obs=runner.obs,
                                rng=runner.rng, buffer_state=runner.buffer,
                                num_steps=algo.train_frequency,
                                reward_scale=self.config.env.reward_scale,
                                select_action=select_action)

        def learn(train, rng):
            def grad_step(carry, _):
                train, rng = carry
                rng, k_sample, k_step = jax.random.split(rng, 3)
                batch = self.buffer.sample(col.buffer_state, k_sample).experience
                train, metrics = self._gradient_step(train, batch, k_step)
                return (train, rng), metrics

            (train, rng), metrics = jax.lax.scan(grad_step, (train, rng), None,
                                                 algo.gradient_steps)
            metrics = jax.tree.map(jnp.mean, metrics)
            return train, rng, {**metrics, "learn_count": jnp.ones((), jnp.float32)}

        def skip(train, rng):
            zero = jnp.zeros((), jnp.float32)
            return train, rng, {k: zero for k in ("critic", "actor", "alpha_loss", "q_values",
                                                  "alpha", "entropy", "learn_count")}

        started = offpolicy.learning_started(env_steps + self.config.steps_per_update,
                                             algo.learning_starts, algo.batch_size)
        train, rng, metrics = jax.lax.cond(started, learn, skip, train, col.rng)
        train = train._replace(update_step=train.update_step + 1)
        metrics.update(episode_return_sum=col.episode_return_sum,
                       episode_length_sum=col.episode_length_sum, episode_count=col.episode_count)
        return SACRunner(train, col.buffer_state, col.env_state, col.obs, rng), metrics

    def train_chunk(self, runner: SACRunner, num_updates: jax.Array):
        return chunks.run_updates(self.update, runner, num_updates)

    def chunk_metrics(self, sums: dict[str, Any], num_updates: int, step: int) -> dict[str, float]:
        out = offpolicy.mean_over_learning(
            sums, num_updates, ("critic", "actor", "alpha_loss", "q_values", "alpha", "entropy"))
        return {metrics_lib.loss_tag("critic"): out["critic"],
                metrics_lib.loss_tag("actor"): out["actor"],
                metrics_lib.loss_tag("alpha"): out["alpha_loss"],
                "train/q_values": out["q_values"], "train/alpha": out["alpha"],
                "train/entropy": out["entropy"],
                metrics_lib.LEARNING_RATE: self.algo.actor_lr}
