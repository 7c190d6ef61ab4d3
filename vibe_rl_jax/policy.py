"""Load a JAX checkpoint step as a batched inference function for `common.policy.Policy`.

The params come from `<step>/params` as host numpy (`checkpoints.load_params`,
whatever device mesh saved them) and are checked strictly against the network
the resolved config describes: a missing, extra or mis-shaped parameter is one
error listing them all. The forward pass is jitted: the observation
normalizer saved with the params (when training normalised observations), then

    PPO  the actor -> greedy (Discrete) or mean (Box) action, or a sample from a seeded
         stream; Box actions clipped to the action bounds as in training
    DQN  the Q network -> argmax Q (greedy; DQN has no sampling policy)
    SAC  the actor -> tanh-squashed mean into the action bounds, or a squashed sample
Batches are padded to the next power of two so a few compiled shapes (made
during the Policy's warm-up) serve every batch size.
"""

from __future__ import annotations

import itertools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common.config import TrainConfig
from common.policy import (ACTIONS_KEY, OBSERVATION_KEY, ArraySpec, CheckpointError, LoadedModel,
                           action_spec_metadata)
from convert import canonical
from convert.families import Spaces
from vibe_rl_jax import checkpoints, envs
from vibe_rl_jax.distributions import DiagGaussian
from vibe_rl_jax.networks import ActorCritic, QNetwork, SACActor
from vibe_rl_jax.sac import squash


def use_inline_cpu_execution() -> None:
    """Run CPU computations inline in the calling thread instead of dispatching them async.

    A policy server runs one tiny computation per request and waits for it at
    once, so async dispatch buys nothing and costs a thread handoff per call:
    the MLP forward takes ~15 us inline vs ~40 us async here, with far smaller
    tails. JAX reads this flag when it creates the CPU client, so call it
    before JAX first touches a device (serve_policy.py does); later it has no
    effect. Training processes should keep async dispatch.
    """
    jax.config.update("jax_cpu_enable_async_dispatch", False)


def check_params(params: dict[str, Any], network: Any, obs_shape: tuple[int, ...],
                 normalize_obs: bool, step_dir: pathlib.Path | str, scope: str | None = None) -> None:
    """Raise one CheckpointError listing every missing, unexpected or mis-shaped parameter.

    `scope` nests the network's params under one key (SAC saves `{"actor": ...}`).
    """
    expected_tree = jax.eval_shape(network.init, jax.random.PRNGKey(0),
                                   jnp.zeros((1, *obs_shape), jnp.float32))["params"]
    if scope is not None:
        expected_tree = {scope: expected_tree}
    expected = canonical.shapes({"model": dict(expected_tree)})
    if normalize_obs:
        expected.update({"obs_normalizer/mean": obs_shape, "obs_normalizer/var": obs_shape})
    problems = canonical.problems(canonical.shapes(params), expected)
    if problems:
        raise CheckpointError(
            f"The params in {step_dir} do not match the network its assets/config.json describes: "
            f"{' | '.join(problems)}.")


def spaces(config: TrainConfig) -> Spaces:
    """The config's env spaces as convert/ declares network layouts with them."""
    if config.algo.kind == "flow":  # imitation configs name no env to build; dims are in the params
        raise CheckpointError("A flow checkpoint's state and action sizes come from its params "
                              "(convert.checkpoint.checkpoint_spaces), not from an env.")
    venv = envs.VecEnv(config.env.id, 1)
    return Spaces(tuple(venv.obs_shape), venv.action_spec.dim, venv.action_spec.continuous)


# (network, scope of its params in the checkpoint, action(model params, obs, key) -> action)
def _ppo(config: TrainConfig, spec: envs.ActionSpec, deterministic: bool):
    network = ActorCritic(spec.dim, spec.continuous, tuple(config.algo.hidden_sizes),
                          config.algo.activation, config.algo.init_log_std)

    def act(model, obs, key):
        dist, _ = network.apply({"params": model}, obs)
        action = dist.mode() if deterministic else dist.sample(key)
        return jnp.clip(action, spec.low, spec.high) if spec.continuous else action

    return network, None, act


def _dqn(config: TrainConfig, spec: envs.ActionSpec, deterministic: bool):
    if not deterministic:
        raise CheckpointError("A DQN policy is greedy (argmax Q); it has no action distribution "
                              "to sample. Serve it with deterministic actions (drop "
                              "--no-deterministic).")
    network = QNetwork(spec.dim, tuple(config.algo.hidden_sizes), config.algo.activation)
    return network, None, lambda model, obs, key: jnp.argmax(
        network.apply({"params": model}, obs), axis=-1)


def _sac(config: TrainConfig, spec: envs.ActionSpec, deterministic: bool):
    algo = config.algo
    network = SACActor(spec.dim, tuple(algo.hidden_sizes), algo.activation, algo.log_std_min,
                       algo.log_std_max)

    def act(model, obs, key):
        mean, log_std = network.apply({"params": model["actor"]}, obs)
        pre_tanh = mean if deterministic else DiagGaussian(mean, log_std).sample(key)
        return squash(pre_tanh, spec.low, spec.high)

    return network, "actor", act


_BUILDERS = {"ppo": _ppo, "dqn": _dqn, "sac": _sac}


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def load_model(step_dir: pathlib.Path | str, config: TrainConfig, *, deterministic: bool = True,
               seed: int = 0) -> LoadedModel:
    """Params of `step_dir` + the network of `config` -> a batched `{"observation"} -> {"actions"}`."""
    if config.algo.kind == "flow":  # imitation chunk policies (norm stats from assets/)
        from vibe_rl_jax import flow
        return flow.load_model(step_dir, config, deterministic=deterministic, seed=seed)
    build = _BUILDERS.get(config.algo.kind)
    if build is None:
        raise CheckpointError(f"No JAX policy loader for algo kind {config.algo.kind!r}; known: "
                              f"{', '.join(sorted(_BUILDERS))}.")
    venv = envs.VecEnv(config.env.id, 1)  # the observation shape and action space training used
    spec = venv.action_spec
    obs_shape = tuple(venv.obs_shape)
    network, scope, act = build(config, spec, deterministic)
    params = checkpoints.load_params(step_dir)
    check_params(params, network, obs_shape, config.env.normalize_obs, step_dir, scope)

    device_params = jax.device_put({"model": params["model"],
                                    "obs_normalizer": params.get("obs_normalizer")})
    base_key = jax.random.PRNGKey(seed)

    @jax.jit
    def forward(p: dict[str, Any], obs: jax.Array, call_index: jax.Array) -> jax.Array:
        if p["obs_normalizer"] is not None:
            obs = envs.normalize(obs, p["obs_normalizer"]["mean"], p["obs_normalizer"]["var"])
        return act(p["model"], obs, jax.random.fold_in(base_key, call_index))

    calls = itertools.count()

    def infer_fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs = batch[OBSERVATION_KEY]
        n = obs.shape[0]
        size = _bucket(n)
        if size != n:
            obs = np.concatenate([obs, np.zeros((size - n, *obs.shape[1:]), obs.dtype)])
        actions = forward(device_params, obs, np.uint32(next(calls) & 0xFFFFFFFF))
        return {ACTIONS_KEY: np.asarray(actions)[:n]}

    return LoadedModel(
        infer_fn=infer_fn,
        input_spec={OBSERVATION_KEY: ArraySpec(obs_shape, "float32")},
        metadata={"action_spec": action_spec_metadata(spec.continuous, spec.dim, spec.low,
                                                      spec.high)},
    )
