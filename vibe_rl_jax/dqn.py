"""DQN on the JAX backend: epsilon-greedy collection into a device replay buffer, then
double-DQN gradient steps, all inside one jitted chunk (PureJaxRL's DQN layout).

One update = `train_frequency` vector-env steps, then (once `learning_starts`
env steps are in the buffer) `gradient_steps` gradient steps. The target
network follows the online one every `target_update_interval` gradient steps
(copy for tau=1, Polyak otherwise). With `n_step` > 1 the buffer holds n-step
transitions (common.rl_math.nstep_push; the open windows ride in the runner).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from common import metrics as metrics_lib
from common import rl_math
from common.config import ConfigError, DQNConfig, TrainConfig
from vibe_rl_jax import chunks, envs, offpolicy, sharding
from vibe_rl_jax.networks import QNetwork


class DQNTrainState(NamedTuple):
    params: Any
    target_params: Any
    opt_state: Any
    grad_step: jax.Array
    update_step: jax.Array  # updates completed


class DQNRunner(NamedTuple):
    train: DQNTrainState
    buffer: Any
    env_state: Any
    obs: jax.Array
    rng: jax.Array  # raw training key data (offpolicy.wrap_key: philox on one device)
    nstep: Any = None  # n-step windows (offpolicy.nstep_windows); None for one-step targets


def double_dqn_target(reward, terminated, next_q_online, next_q_target, gamma, double: bool):
    """TD target; with `double`, the online net picks a', the target net evaluates it.

    `gamma` is a float, or per transition (n-step: gamma ** rewards summed)."""
    if double:
        best = jnp.argmax(next_q_online, axis=-1)
        next_value = jnp.take_along_axis(next_q_target, best[..., None], axis=-1)[..., 0]
    else:
        next_value = next_q_target.max(axis=-1)
    return rl_math.td_target(reward, terminated, next_value, gamma)


class DQN:
    def __init__(self, config: TrainConfig, mesh: jax.sharding.Mesh):
        self.config = config
        self.algo: DQNConfig = config.algo
        self.mesh = mesh
        sharding.check_divisible("--env.num-envs", config.env.num_envs, mesh)
        self.venv = envs.make_vec_env(config.env.id, config.env.num_envs, config.env.normalize_obs)
        if self.venv.action_spec.continuous:
            raise ConfigError(f"--env.id {config.env.id} has continuous actions; DQN needs a "
                              f"discrete action space (use SAC or PPO).")
        self.num_actions = self.venv.action_spec.dim
        self.network = QNetwork(self.num_actions, tuple(self.algo.hidden_sizes), self.algo.activation)
        total_grad_steps = config.num_updates * self.algo.gradient_steps
        lr = (optax.linear_schedule(self.algo.lr, 0.0, max(total_grad_steps, 1))
              if self.algo.lr_schedule == "linear" else self.algo.lr)
        self.tx = optax.chain(optax.clip_by_global_norm(self.algo.max_grad_norm),
                              optax.adam(lr))
        self._lr = lr
        self.epsilon = optax.linear_schedule(
            self.algo.eps_start, self.algo.eps_end,
            max(int(self.algo.exploration_fraction * config.total_timesteps), 1))
        self.buffer = offpolicy.make_buffer(self.algo.buffer_size, self.algo.batch_size)
        self._data = sharding.data_sharding(mesh)
        self._replicated = sharding.replicated(mesh)
        self._prng_impl = offpolicy.prng_impl(mesh)

    def init(self, key: jax.Array) -> DQNRunner:
        key, k_params, k_env = jax.random.split(key, 3)
        obs, env_state = self.venv.reset(k_env)
        params = self.network.init(k_params, obs[:1])
        train = DQNTrainState(params, params, self.tx.init(params), jnp.zeros((), jnp.int32),
                              jnp.zeros((), jnp.int32))
        buffer = self.buffer.init(offpolicy.example_transition(
            self.venv.obs_shape, jnp.zeros((), jnp.int32), self.algo.n_step))
        windows = offpolicy.nstep_windows(self.algo.n_step, self.config.env.num_envs,
                                          self.venv.obs_shape)
        return DQNRunner(train, buffer, env_state, obs, offpolicy.new_key_data(key), windows)

    def shardings(self, abstract: DQNRunner) -> DQNRunner:
        train = jax.tree.map(lambda _: self._replicated, abstract.train)
        train = train._replace(params=sharding.fsdp_sharding(abstract.train.params, self.mesh),
                               target_params=sharding.fsdp_sharding(abstract.train.target_params,
                                                                    self.mesh),
                               opt_state=sharding.fsdp_sharding(abstract.train.opt_state, self.mesh))
        # The buffer is replicated: uniform sampling over it needs every transition everywhere.
        return DQNRunner(train, self._replicated,
                         self.venv.state_sharding(self._data, self._replicated), self._data,
                         self._replicated, None if abstract.nstep is None else self._replicated)

    def inference_params(self, runner: DQNRunner) -> dict[str, Any]:
        out = {"model": runner.train.params["params"]}
        rms = envs.obs_normalizer(runner.env_state)
        if rms is not None:
            out["obs_normalizer"] = {"mean": rms.mean, "var": rms.var}
        return out

    def _env_steps(self, update_step):
        return update_step * self.config.steps_per_update

    def _loss(self, params, target_params, batch):
        q = self.network.apply(params, batch["obs"])
        q_taken = jnp.take_along_axis(q, batch["action"][..., None], axis=-1)[..., 0]
        next_online = self.network.apply(params, batch["next_obs"])
        next_target = self.network.apply(target_params, batch["next_obs"])
        # n-step transitions carry their own discount (gamma ** rewards summed).
        target = jax.lax.stop_gradient(double_dqn_target(
            batch["reward"], batch["terminated"], next_online, next_target,
            batch.get("discount", self.algo.gamma), self.algo.double_dqn))
        error = q_taken - target
        loss = rl_math.huber(jnp, error) if self.algo.loss == "huber" else 0.5 * error**2
        return loss.mean(), q_taken.mean()

    def update(self, runner: DQNRunner):
        algo = self.algo
        train = runner.train
        epsilon = self.epsilon(self._env_steps(train.update_step))

        def select_action(key, obs):
            k_explore, k_random = jax.random.split(key)
            greedy = jnp.argmax(self.network.apply(train.params, obs), axis=-1)
            random = jax.random.randint(k_random, greedy.shape, 0, self.num_actions)
            action = jnp.where(jax.random.uniform(k_explore, greedy.shape) < epsilon, random, greedy)
            return action, action

        col = offpolicy.collect(self.venv, self.buffer, env_state=runner.env_state, obs=runner.obs,
                                rng=offpolicy.wrap_key(runner.rng, self._prng_impl),
                                buffer_state=runner.buffer,
                                num_steps=algo.train_frequency,
                                reward_scale=self.config.env.reward_scale,
                                select_action=select_action, nstep=runner.nstep,
                                gamma=algo.gamma)
        rng = col.rng
        env_steps = self._env_steps(train.update_step + 1)

        def learn(train, rng):
            def grad_step(carry, _):
                train, rng = carry
                rng, k = jax.random.split(rng)
                batch = self.buffer.sample(col.buffer_state, k).experience
                (loss, q_mean), grads = jax.value_and_grad(self._loss, has_aux=True)(
                    train.params, train.target_params, batch)
                updates, opt_state = self.tx.update(grads, train.opt_state, train.params)
                params = optax.apply_updates(train.params, updates)
                grad_step = train.grad_step + 1
                target = jax.lax.cond(grad_step % algo.target_update_interval == 0,
                                      lambda: optax.incremental_update(params, train.target_params,
                                                                       algo.tau),
                                      lambda: train.target_params)
                train = train._replace(params=params, target_params=target, opt_state=opt_state,
                                       grad_step=grad_step)
                return (train, rng), (loss, q_mean)

            (train, rng), (loss, q_mean) = jax.lax.scan(grad_step, (train, rng), None,
                                                        algo.gradient_steps)
            return train, rng, {"td": loss.mean(), "q_values": q_mean.mean(),
                                "learn_count": jnp.ones((), jnp.float32)}

        def skip(train, rng):
            zero = jnp.zeros((), jnp.float32)
            return train, rng, {"td": zero, "q_values": zero, "learn_count": zero}

        # n-step transitions enter the buffer n - 1 vector steps late: wait until it holds a batch
        # (the Torch side checks its buffer's size the same way).
        stored = env_steps - (algo.n_step - 1) * self.config.env.num_envs
        started = jnp.logical_and(
            offpolicy.learning_started(env_steps, algo.learning_starts, algo.batch_size),
            stored >= algo.batch_size)
        train, rng, learn_metrics = jax.lax.cond(started, learn, skip, train, rng)
        train = train._replace(update_step=train.update_step + 1)
        metrics = {**learn_metrics, "epsilon": epsilon.astype(jnp.float32),
                   "episode_return_sum": col.episode_return_sum,
                   "episode_length_sum": col.episode_length_sum,
                   "episode_count": col.episode_count}
        return (DQNRunner(train, col.buffer_state, col.env_state, col.obs,
                          offpolicy.unwrap_key(rng), col.nstep), metrics)

    def train_chunk(self, runner: DQNRunner, num_updates: jax.Array):
        return chunks.run_updates(self.update, runner, num_updates)

    def learning_rate(self, update_step: int) -> float:
        lr = self._lr
        return float(lr(update_step * self.algo.gradient_steps)) if callable(lr) else float(lr)

    def chunk_metrics(self, sums: dict[str, Any], num_updates: int, step: int) -> dict[str, float]:
        out = offpolicy.mean_over_learning(sums, num_updates, ("td", "q_values"))
        return {metrics_lib.loss_tag("td"): out["td"], "train/q_values": out["q_values"],
                "train/epsilon": float(sums["epsilon"]) / num_updates,
                metrics_lib.LEARNING_RATE: self.learning_rate(step)}

