"""PPO on the JAX backend, compiled PureJaxRL-style.

One update = rollout (`lax.scan` over `num_steps` vmapped env steps) ->
GAE (reverse `lax.scan`) -> `update_epochs` x `num_minibatches` SGD steps
(nested scans over a permuted batch). `train_chunk` runs a dynamic number of
updates in a `fori_loop`, so every chunk length shares one compiled program and
N updates straight or N/2 + N/2 execute the very same code (bit-exact resume).
The runner state holds everything that changes: params, optimizer state,
update counter, env states (with observation statistics) and the PRNG key.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from common import metrics as metrics_lib
from common import rl_math
from common.config import PPOConfig, TrainConfig
from vibe_rl_jax import chunks, envs, schedules, sharding
from vibe_rl_jax.networks import ActorCritic


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    update_step: jax.Array  # updates completed


class RunnerState(NamedTuple):
    train: TrainState
    env_state: Any
    obs: jax.Array
    rng: jax.Array


class Transition(NamedTuple):
    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    final_obs: jax.Array
    episode_return: jax.Array
    episode_length: jax.Array
    episode_done: jax.Array


def gae(rewards, values, next_values, terminated, truncated, gamma: float, lam: float):
    """Reverse-scan GAE over [T, ...]; same contract as `common.rl_math.gae`."""
    done = jnp.logical_or(terminated, truncated)

    def step(running, xs):
        reward, value, next_value, term, dn = xs
        delta = reward + gamma * next_value * (1.0 - term) - value
        running = delta + gamma * lam * (1.0 - dn) * running
        return running, running

    _, advantages = jax.lax.scan(
        step, jnp.zeros_like(rewards[0]),
        (rewards, values, next_values, terminated.astype(rewards.dtype), done.astype(rewards.dtype)),
        reverse=True)
    return advantages, advantages + values


class PPO:
    """Builds the init and chunk functions for one TrainConfig on one mesh."""

    def __init__(self, config: TrainConfig, mesh: jax.sharding.Mesh):
        if not isinstance(config.algo, PPOConfig):
            raise TypeError(f"PPO got a {type(config.algo).__name__}")
        self.config = config
        self.algo: PPOConfig = config.algo
        self.mesh = mesh
        sharding.check_divisible("--env.num-envs", config.env.num_envs, mesh)
        sharding.check_divisible("the minibatch size", config.batch_size // self.algo.num_minibatches,
                                 mesh)
        self.venv = envs.make_vec_env(config.env.id, config.env.num_envs, config.env.normalize_obs)
        spec = self.venv.action_spec
        self.action_spec = spec
        self.network = ActorCritic(spec.dim, spec.continuous, tuple(self.algo.hidden_sizes),
                                   self.algo.activation, self.algo.init_log_std)
        opt_steps_per_update = self.algo.update_epochs * self.algo.num_minibatches
        self.schedule = schedules.make(self.algo.lr_schedule, self.algo.lr,
                                       total_steps=config.num_updates * opt_steps_per_update,
                                       warmup_steps=self.algo.warmup_updates * opt_steps_per_update)
        self.opt_steps_per_update = opt_steps_per_update
        self.tx = optax.chain(optax.clip_by_global_norm(self.algo.max_grad_norm),
                              optax.adam(self.schedule, eps=1e-5))
        self._data = sharding.data_sharding(mesh)
        self._replicated = sharding.replicated(mesh)

    # ---------------------------------------------------------------- state
    def init(self, key: jax.Array) -> RunnerState:
        key, k_params, k_env = jax.random.split(key, 3)
        obs, env_state = self.venv.reset(k_env)
        params = self.network.init(k_params, obs[:1])
        train = TrainState(params, self.tx.init(params), jnp.zeros((), jnp.int32))
        return RunnerState(train, env_state, obs, key)

    def shardings(self, abstract: RunnerState) -> RunnerState:
        """Params/optimizer by the fsdp rule, env data split over devices, scalars replicated."""
        train = TrainState(sharding.fsdp_sharding(abstract.train.params, self.mesh),
                           sharding.fsdp_sharding(abstract.train.opt_state, self.mesh),
                           self._replicated)
        return RunnerState(train, self.venv.state_sharding(self._data, self._replicated),
                           self._data, self._replicated)

    def inference_params(self, runner: RunnerState) -> dict[str, Any]:
        """What `params/` holds: network weights plus observation statistics if normalising."""
        out = {"model": runner.train.params["params"]}
        rms = envs.obs_normalizer(runner.env_state)
        if rms is not None:
            out["obs_normalizer"] = {"mean": rms.mean, "var": rms.var}
        return out

    def learning_rate(self, update_step: int) -> float:
        return float(self.schedule(update_step * self.opt_steps_per_update))

    def chunk_metrics(self, sums: dict[str, Any], num_updates: int, step: int) -> dict[str, float]:
        """Algorithm-specific scalars of a chunk (episode statistics and speed come from the loop)."""
        out = {metrics_lib.LEARNING_RATE: self.learning_rate(step),
               "train/approx_kl": float(sums["approx_kl"]) / num_updates,
               "train/clip_fraction": float(sums["clip_fraction"]) / num_updates}
        for name in ("total", "policy", "value", "entropy"):
            out[metrics_lib.loss_tag(name)] = float(sums[name]) / num_updates
        return out

    # ---------------------------------------------------------------- update
    def _rollout(self, runner: RunnerState):
        algo, spec = self.algo, self.action_spec

        def env_step(carry, _):
            params, env_state, obs, rng = carry
            rng, k_act, k_env = jax.random.split(rng, 3)
            dist, value = self.network.apply(params, obs)
            action = dist.sample(k_act)
            log_prob = dist.log_prob(action)
            env_action = jnp.clip(action, spec.low, spec.high) if spec.continuous else action
            out = self.venv.step(k_env, env_state, env_action)
            done = jnp.logical_or(out.terminated, out.truncated)
            transition = Transition(obs, action, log_prob, value,
                                    out.reward * self.config.env.reward_scale,
                                    out.terminated, out.truncated, out.final_obs,
                                    out.episode_return, out.episode_length, done)
            return (params, out.state, out.obs, rng), transition

        carry = (runner.train.params, runner.env_state, runner.obs, runner.rng)
        (_, env_state, obs, rng), traj = jax.lax.scan(env_step, carry, None, algo.num_steps)
        # V of the observation that followed each step: the true final observation where an
        # episode ended (terminated or truncated), else simply the next observation.
        _, next_values = self.network.apply(runner.train.params, traj.final_obs)
        return runner._replace(env_state=env_state, obs=obs, rng=rng), traj, next_values

    def _loss(self, params, batch):
        dist, values = self.network.apply(params, batch["obs"])
        algo = self.algo
        loss = rl_math.ppo_loss(
            jnp, log_prob=dist.log_prob(batch["action"]), old_log_prob=batch["log_prob"],
            advantages=batch["advantages"], values=values, old_values=batch["value"],
            returns=batch["returns"], entropy=dist.entropy(), clip_eps=algo.clip_eps,
            clip_value=algo.clip_value, vf_coef=algo.vf_coef, ent_coef=algo.ent_coef,
            normalize_advantages=algo.normalize_advantages)
        return loss.total, loss

    def update(self, runner: RunnerState) -> tuple[RunnerState, dict[str, jax.Array]]:
        """One PPO update: rollout, GAE, minibatch epochs."""
        algo = self.algo
        runner, traj, next_values = self._rollout(runner)
        advantages, returns = gae(traj.reward, traj.value, next_values, traj.terminated,
                                  traj.truncated, algo.gamma, algo.gae_lambda)
        batch = {"obs": traj.obs, "action": traj.action, "log_prob": traj.log_prob,
                 "value": traj.value, "advantages": advantages, "returns": returns}
        batch_size = self.config.batch_size
        batch = jax.tree.map(lambda x: x.reshape((batch_size,) + x.shape[2:]), batch)
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)

        def epoch(carry, _):
            train, rng = carry
            rng, k_perm = jax.random.split(rng)
            perm = jax.random.permutation(k_perm, batch_size)
            minibatches = jax.tree.map(
                lambda x: jnp.take(x, perm, axis=0).reshape(
                    (algo.num_minibatches, -1) + x.shape[1:]), batch)

            def minibatch_step(train, mb):
                mb = jax.lax.with_sharding_constraint(mb, self._data)
                (_, loss), grads = grad_fn(train.params, mb)
                updates, opt_state = self.tx.update(grads, train.opt_state, train.params)
                params = optax.apply_updates(train.params, updates)
                return train._replace(params=params, opt_state=opt_state), loss

            train, losses = jax.lax.scan(minibatch_step, train, minibatches)
            return (train, rng), losses

        (train, rng), losses = jax.lax.scan(epoch, (runner.train, runner.rng), None,
                                            algo.update_epochs)
        train = train._replace(update_step=train.update_step + 1)
        runner = runner._replace(train=train, rng=rng)
        metrics = {name: value.mean() for name, value in losses._asdict().items()}
        metrics["episode_return_sum"] = traj.episode_return.sum()
        metrics["episode_length_sum"] = traj.episode_length.sum().astype(jnp.float32)
        metrics["episode_count"] = traj.episode_done.sum().astype(jnp.float32)
        return runner, metrics

    def train_chunk(self, runner: RunnerState, num_updates: jax.Array):
        """Run `num_updates` updates (traced: one compile for every chunk length); metric sums."""
        return chunks.run_updates(self.update, runner, num_updates)
